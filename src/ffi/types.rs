//! The `#[repr(C)]` types and constants of `block_int.h`, with QEMU's names
//! and values.
//!
//! Values that a C host may combine with `|` (open flags, check modes,
//! option types) are plain `int` typedefs plus `#define`s rather than Rust
//! enums: a C caller can pass any integer, and a Rust enum holding a value
//! outside its variants would be undefined behaviour.

use std::ffi::c_void;
use std::os::raw::{c_char, c_int};

// ---- open flags (QEMU's BDRV_O_*) ---------------------------------------------------------

/// Open the image read-write (without it, read-only).
pub const BDRV_O_RDWR: c_int = 0x0002;
/// Bypass the host page cache (O_DIRECT; QEMU's cache=none/directsync).
pub const BDRV_O_NOCACHE: c_int = 0x0020;
/// Write-back caching. Without it every write is flushed before it
/// completes (writethrough), as in QEMU before 1.2.
pub const BDRV_O_CACHE_WB: c_int = 0x0040;
/// Do not open the backing file: unallocated clusters read as zeros.
pub const BDRV_O_NO_BACKING: c_int = 0x0100;
/// bdrv_flush() returns at once without syncing (QEMU's cache=unsafe).
/// Metadata still reaches the file at bdrv_close().
pub const BDRV_O_NO_FLUSH: c_int = 0x0200;
/// Open for consistency check and repair: a dirty or corrupt image is
/// opened as it is, without the automatic repair.
pub const BDRV_O_CHECK: c_int = 0x1000;

// ---- sectors ---------------------------------------------------------------------------------

/// log2 of BDRV_SECTOR_SIZE.
pub const BDRV_SECTOR_BITS: c_int = 9;
/// The unit of bdrv_read(), bdrv_write(), bdrv_discard(), bdrv_write_zeroes()
/// and bdrv_is_allocated(): 512 bytes.
pub const BDRV_SECTOR_SIZE: u64 = 512;

// ---- request flags ---------------------------------------------------------------------------

/// bdrv_write_zeroes() / bdrv_pwrite_zeroes(): whole clusters may give their
/// host storage back (QEMU's BDRV_REQ_MAY_UNMAP).
pub const BDRV_REQ_MAY_UNMAP: c_int = 0x4;

// ---- block status flags (QEMU's BDRV_BLOCK_*) --------------------------------------------

/// bdrv_block_status(): the range holds guest data (stored in some layer).
pub const BDRV_BLOCK_DATA: c_int = 0x01;
/// bdrv_block_status(): the range reads as zeros.
pub const BDRV_BLOCK_ZERO: c_int = 0x02;
/// bdrv_block_status(): `*map` is the host offset of the range's data.
pub const BDRV_BLOCK_OFFSET_VALID: c_int = 0x04;
/// bdrv_block_status(): some layer of the chain (`*depth`) has the range
/// (data or a zero cluster); clear when no layer has it.
pub const BDRV_BLOCK_ALLOCATED: c_int = 0x10;

// ---- image creation flags (QEMU's BLOCK_FLAG_*) ------------------------------------------

/// Encrypted image (legacy AES). Not supported: bdrv_img_create() fails
/// with -ENOTSUP.
pub const BLOCK_FLAG_ENCRYPT: c_int = 1;
/// VMDK hardware version 6 (vmdk only). bdrv_img_create() fails with
/// -ENOTSUP.
pub const BLOCK_FLAG_COMPAT6: c_int = 4;
/// The image has lazy refcounts (qcow2 compat=1.1). For bdrv_img_create()
/// the same as the option `lazy_refcounts=on`; BlockDriverInfo.flags
/// reports it for an open image.
pub const BLOCK_FLAG_LAZY_REFCOUNTS: c_int = 8;

// ---- bdrv_check modes --------------------------------------------------------------------

/// How bdrv_check() may repair: 0 (only check), BDRV_FIX_LEAKS,
/// BDRV_FIX_ERRORS or both ORed (QEMU's enum BdrvCheckMode).
pub type BdrvCheckMode = c_int;
/// Free leaked clusters.
pub const BDRV_FIX_LEAKS: BdrvCheckMode = 1;
/// Repair corruptions.
pub const BDRV_FIX_ERRORS: BdrvCheckMode = 2;

// ---- option parameter types --------------------------------------------------------------

/// The type of one QEMUOptionParameter (QEMU's enum QEMUOptionParType).
pub type OptionParameterType = c_int;
/// On/off; value.n is 0 or 1. Parsed from "on"/"off" (or a bare name for on).
pub const OPT_FLAG: OptionParameterType = 0;
/// A plain number in value.n.
pub const OPT_NUMBER: OptionParameterType = 1;
/// A byte count in value.n; parsed with the suffixes k, M, G, T, P, E.
pub const OPT_SIZE: OptionParameterType = 2;
/// A string in value.s (malloc()ed, or NULL when unset).
pub const OPT_STRING: OptionParameterType = 3;

/// The value of a QEMUOptionParameter: `n` for OPT_FLAG, OPT_NUMBER and
/// OPT_SIZE, `s` for OPT_STRING.
#[repr(C)]
#[derive(Clone, Copy)]
pub union QEMUOptionValue {
    /// Number, size or flag (0/1).
    pub n: u64,
    /// String; NULL when unset. Strings stored by the library are
    /// malloc()ed and released by free_option_parameters().
    pub s: *mut c_char,
}

/// One creation option. A list is an array ending at an entry whose `name`
/// is NULL.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct QEMUOptionParameter {
    /// Option name, e.g. BLOCK_OPT_SIZE; NULL ends the list.
    pub name: *const c_char,
    /// One of OPT_FLAG, OPT_NUMBER, OPT_SIZE, OPT_STRING.
    pub r#type: OptionParameterType,
    /// Current value (the default in a driver's create_options).
    pub value: QEMUOptionValue,
    /// One-line description, or NULL.
    pub help: *const c_char,
    /// Set by set_option_parameter(), set_option_parameter_int() and
    /// parse_option_parameters() (QEMU 1.7's flag): bdrv_amend_options()
    /// changes only the options that have it. Driver lists have it false.
    pub assigned: bool,
}

// ---- info and check results --------------------------------------------------------------

/// What bdrv_get_info() reports about an open image.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockDriverInfo {
    /// Cluster size in bytes.
    pub cluster_size: c_int,
    /// Where VM state would be stored (guest offset past the last L1 entry
    /// the virtual size needs).
    pub vm_state_offset: i64,
    /// True while the image is marked dirty (lazy refcounts in use and
    /// metadata not yet consistent on disk).
    pub is_dirty: bool,
    /// BLOCK_FLAG_LAZY_REFCOUNTS when the image uses lazy refcounts.
    pub flags: c_int,
}

/// Cluster statistics filled by bdrv_check().
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockFragInfo {
    /// Clusters allocated to guest data.
    pub allocated_clusters: u64,
    /// Clusters the virtual size spans.
    pub total_clusters: u64,
    /// Allocated clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
}

/// The result of bdrv_check(), as QEMU reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BdrvCheckResult {
    /// Metadata errors found (and not fixed).
    pub corruptions: c_int,
    /// Leaked clusters found (and not fixed).
    pub leaks: c_int,
    /// Errors that stopped the check itself (e.g. I/O errors).
    pub check_errors: c_int,
    /// Corruptions repaired.
    pub corruptions_fixed: c_int,
    /// Leaks repaired.
    pub leaks_fixed: c_int,
    /// First byte past the last used cluster of the image file.
    pub image_end_offset: i64,
    /// Cluster statistics.
    pub bfi: BlockFragInfo,
}

/// An internal snapshot (QEMU 1.x's QEMUSnapshotInfo): what
/// bdrv_snapshot_list() reports and what bdrv_snapshot_create() takes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct QEMUSnapshotInfo {
    /// Unique snapshot ID (NUL-terminated). "" in bdrv_snapshot_create()
    /// picks the next free number, as QEMU does, and writes it back.
    pub id_str: [c_char; 128],
    /// User-chosen name (NUL-terminated; names need not be unique).
    pub name: [c_char; 256],
    /// Size of the saved VM state (always 0 here: no VM state is stored).
    pub vm_state_size: u64,
    /// UTC date of the snapshot, seconds since the epoch.
    pub date_sec: u32,
    /// UTC date of the snapshot, nanoseconds.
    pub date_nsec: u32,
    /// VM clock relative to boot, nanoseconds.
    pub vm_clock_nsec: u64,
}

/// Receives one line of the library's report output (bdrv_check()'s
/// findings, the repair a read-write open of a dirty image does, warnings)
/// without a trailing newline; `msg` is valid only during the call.
/// Installed with bdrv_set_log_callback().
pub type BdrvLogFunc = Option<unsafe extern "C" fn(msg: *const c_char, opaque: *mut c_void)>;

// ---- creation option names (QEMU's BLOCK_OPT_*) ------------------------------------------
//
// cbindgen cannot emit string constants, so the header gets these as
// `#define`s from `after_includes` in cbindgen.toml; a unit test below
// keeps the two lists equal.

/// Virtual disk size in bytes (OPT_SIZE).
pub const BLOCK_OPT_SIZE: &str = "size";

/// Encrypt the image (OPT_FLAG; not supported).
pub const BLOCK_OPT_ENCRYPT: &str = "encryption";

/// VMDK version 6 (OPT_FLAG; vmdk only, not supported).
pub const BLOCK_OPT_COMPAT6: &str = "compat6";

/// File name of the backing image (OPT_STRING).
pub const BLOCK_OPT_BACKING_FILE: &str = "backing_file";

/// Format of the backing image (OPT_STRING).
pub const BLOCK_OPT_BACKING_FMT: &str = "backing_fmt";

/// qcow2 cluster size (OPT_SIZE; default 65536).
pub const BLOCK_OPT_CLUSTER_SIZE: &str = "cluster_size";

/// Table size of other formats (not used by qcow2).
pub const BLOCK_OPT_TABLE_SIZE: &str = "table_size";

/// Preallocation mode: off, metadata, falloc, full (OPT_STRING).
pub const BLOCK_OPT_PREALLOC: &str = "preallocation";

/// Subformat of other formats (not used by qcow2).
pub const BLOCK_OPT_SUBFMT: &str = "subformat";

/// qcow2 compatibility level: 0.10 or 1.1 (OPT_STRING; default 1.1).
pub const BLOCK_OPT_COMPAT_LEVEL: &str = "compat";

/// Lazy refcounts, compat 1.1 only (OPT_FLAG).
pub const BLOCK_OPT_LAZY_REFCOUNTS: &str = "lazy_refcounts";

/// Refcount width in bits (OPT_NUMBER; default 16).
pub const BLOCK_OPT_REFCOUNT_BITS: &str = "refcount_bits";

/// External data file (OPT_STRING; not supported).
pub const BLOCK_OPT_DATA_FILE: &str = "data_file";

/// External data file is a valid raw image (OPT_FLAG; not supported).
pub const BLOCK_OPT_DATA_FILE_RAW: &str = "data_file_raw";

/// Compression type: zlib or zstd (OPT_STRING).
pub const BLOCK_OPT_COMPRESSION_TYPE: &str = "compression_type";

/// Extended L2 entries (OPT_FLAG; not supported).
pub const BLOCK_OPT_EXTL2: &str = "extended_l2";

/// Every BLOCK_OPT_* name with its value, in header order.
pub const BLOCK_OPTS: &[(&str, &str)] = &[
    ("BLOCK_OPT_SIZE", BLOCK_OPT_SIZE),
    ("BLOCK_OPT_ENCRYPT", BLOCK_OPT_ENCRYPT),
    ("BLOCK_OPT_COMPAT6", BLOCK_OPT_COMPAT6),
    ("BLOCK_OPT_BACKING_FILE", BLOCK_OPT_BACKING_FILE),
    ("BLOCK_OPT_BACKING_FMT", BLOCK_OPT_BACKING_FMT),
    ("BLOCK_OPT_CLUSTER_SIZE", BLOCK_OPT_CLUSTER_SIZE),
    ("BLOCK_OPT_TABLE_SIZE", BLOCK_OPT_TABLE_SIZE),
    ("BLOCK_OPT_PREALLOC", BLOCK_OPT_PREALLOC),
    ("BLOCK_OPT_SUBFMT", BLOCK_OPT_SUBFMT),
    ("BLOCK_OPT_COMPAT_LEVEL", BLOCK_OPT_COMPAT_LEVEL),
    ("BLOCK_OPT_LAZY_REFCOUNTS", BLOCK_OPT_LAZY_REFCOUNTS),
    ("BLOCK_OPT_REFCOUNT_BITS", BLOCK_OPT_REFCOUNT_BITS),
    ("BLOCK_OPT_DATA_FILE", BLOCK_OPT_DATA_FILE),
    ("BLOCK_OPT_DATA_FILE_RAW", BLOCK_OPT_DATA_FILE_RAW),
    ("BLOCK_OPT_COMPRESSION_TYPE", BLOCK_OPT_COMPRESSION_TYPE),
    ("BLOCK_OPT_EXTL2", BLOCK_OPT_EXTL2),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cbindgen_toml_defines_every_block_opt() {
        let toml = include_str!("../../cbindgen.toml");
        for (name, value) in BLOCK_OPTS {
            let line = format!("#define {name} \"{value}\"");
            assert!(toml.contains(&line), "cbindgen.toml lacks {line}");
        }
        assert_eq!(toml.matches("#define BLOCK_OPT_").count(), BLOCK_OPTS.len());
    }
}
