//! On-disk qcow2 types: pure encode and decode, no I/O.
//!
//! This layer owns the byte layout of the header, its extensions, L1/L2
//! entries, compressed-cluster descriptors, refcount blocks, the snapshot
//! table and the persistent-bitmap directory, and the validation rules that
//! depend only on those bytes. It must never touch a file, allocate in
//! proportion to an untrusted count, or panic on any input.

pub mod bitmap;
pub mod entries;
pub mod header;
pub mod snapshot;
pub mod subcluster;
pub mod types;

pub use entries::{L1Entry, L2Entry, RefcountWidth};
pub use header::{FeatureEntry, Header};
pub use types::{GuestOffset, HostOffset};

/// "QFI\xfb"
pub const QCOW_MAGIC: u32 = 0x5146_49fb;
/// Smallest and largest cluster_bits QEMU accepts.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits on table sizes (bytes).
pub const MAX_L1_SIZE_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_SIZE_BYTES: u64 = 8 << 20;
/// Host offsets in L1/L2/refcount entries are limited to 56 bits.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount table entries have no flag bits: bits 9-63 are the offset,
/// so a damaged high bit is an offset past the end of the file (as QEMU's
/// `REFT_OFFSET_MASK` reads it), never silently the block it would be
/// without that bit.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature bits.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bits.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
pub const AUTOCLEAR_KNOWN: u64 = 0x3;

/// Guest bytes one L2 table maps (one L1 entry's reach) with standard
/// 64-bit entries.
pub fn l2_span(cluster_bits: u32) -> u64 {
    1u64 << (2 * cluster_bits - 3)
}

/// Bytes of one L2 entry: 16 with extended L2 entries, else 8.
pub fn l2_entry_bytes(extended: bool) -> u64 {
    if extended {
        16
    } else {
        8
    }
}

/// Log2 of the entries in one L2 table.
pub fn l2_bits(cluster_bits: u32, extended: bool) -> u32 {
    cluster_bits - if extended { 4 } else { 3 }
}

/// Guest bytes one L2 table maps, for either entry width.
pub fn l2_span_ext(cluster_bits: u32, extended: bool) -> u64 {
    1u64 << (cluster_bits + l2_bits(cluster_bits, extended))
}

/// Decodes a table of big-endian 64-bit entries (L1, L2, refcount table).
pub fn decode_table(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

/// Encodes a table of 64-bit entries big-endian, zero-padded to `bytes`.
pub fn encode_table(t: &[u64], bytes: usize) -> Vec<u8> {
    let mut b = vec![0u8; bytes.max(t.len() * 8)];
    for (i, e) in t.iter().enumerate() {
        put64(&mut b, i * 8, *e);
    }
    b
}

/// Big-endian helpers over byte slices; callers guarantee the bounds.
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}
pub(crate) fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
pub(crate) fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}
