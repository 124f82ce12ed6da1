//! Persistent dirty bitmaps on disk: the bitmaps header extension, the
//! bitmap directory, bitmap table entries and the serialized bitmap data,
//! with QEMU's limits and its messages, checked in QEMU's order (the order
//! decides which message a damaged image gets).
//!
//! Pure decode and encode; the engine reads and writes the clusters
//! (`engine::bitmaps`).

use super::{be32, be64, put32, put64};
use crate::error::{invalid, Result};

/// Length of the bitmaps header extension.
pub const EXT_LEN: usize = 24;
/// QEMU's limits.
pub const MAX_BITMAPS: u32 = 65535;
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * 65535;
pub const MIN_GRANULARITY_BITS: u8 = 9;
pub const MAX_GRANULARITY_BITS: u8 = 31;
pub const MAX_NAME_SIZE: usize = 1023;
pub const MAX_TABLE_SIZE: u32 = 0x800_0000;
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;

/// Directory entry flags. Bit 2 (extra data compatible) is defined by the
/// format but QEMU refuses it, since it refuses extra data altogether.
pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// Bitmap table entries: a data cluster offset, or (offset 0) bit 0 saying
/// whether the cluster's bits are all ones rather than all zeros.
pub const TABLE_ALL_ONES: u64 = 1;
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;

/// Fixed part of a directory entry (before extra data and name).
const ENTRY_HEADER: u64 = 24;

/// The bitmaps header extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub dir_size: u64,
    pub dir_offset: u64,
}

impl BitmapsExt {
    /// Decodes the extension with QEMU's checks, in QEMU's order (the
    /// length is also checked by `Header::parse`, where QEMU checks it).
    pub fn parse(data: &[u8], cluster_size: u64) -> Result<BitmapsExt> {
        if data.len() != EXT_LEN {
            return Err(invalid!("bitmaps_ext: Invalid extension length"));
        }
        let e = BitmapsExt {
            nb_bitmaps: be32(data, 0),
            dir_size: be64(data, 8),
            dir_offset: be64(data, 16),
        };
        if be32(data, 4) != 0 {
            return Err(invalid!("bitmaps_ext: Reserved field is not zero"));
        }
        if e.nb_bitmaps > MAX_BITMAPS {
            return Err(invalid!(
                "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}",
                e.nb_bitmaps
            ));
        }
        if e.nb_bitmaps == 0 {
            return Err(invalid!("found bitmaps extension with zero bitmaps"));
        }
        if !e.dir_offset.is_multiple_of(cluster_size) {
            return Err(invalid!("bitmaps_ext: invalid bitmap directory offset"));
        }
        if e.dir_size > MAX_DIRECTORY_SIZE {
            return Err(invalid!(
                "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({MAX_DIRECTORY_SIZE})",
                e.dir_size
            ));
        }
        Ok(e)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; EXT_LEN];
        put32(&mut b, 0, self.nb_bitmaps);
        put64(&mut b, 8, self.dir_size);
        put64(&mut b, 16, self.dir_offset);
        b
    }
}

/// One bitmap directory entry (QEMU refuses extra data, so there is none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    /// The name's bytes as stored (not necessarily UTF-8).
    pub name: Vec<u8>,
}

impl DirEntry {
    /// The name for messages, as QEMU's `%.*s` prints it (up to a NUL).
    pub fn display_name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// Bytes of this entry in the directory, padding included.
    fn encoded_len(&self) -> usize {
        (ENTRY_HEADER as usize + self.name.len()).next_multiple_of(8)
    }

    /// QEMU's constraints on an entry. `image_size` is the virtual size: a
    /// consistent bitmap's table must be large enough to cover it (an
    /// in-use one may be stale after a resize).
    fn satisfies_constraints(&self, cluster_size: u64, image_size: u64) -> bool {
        let basic = self.table_size != 0
            && self.table_offset != 0
            && self.table_offset.is_multiple_of(cluster_size)
            && self.table_size <= MAX_TABLE_SIZE
            && (MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits)
            && self.flags & RESERVED_FLAGS == 0
            && self.name.len() <= MAX_NAME_SIZE
            && self.kind == TYPE_DIRTY_TRACKING;
        if !basic {
            return false;
        }
        let phys = self.table_size as u64 * cluster_size;
        if phys > MAX_PHYS_SIZE {
            return false;
        }
        let covered = ((phys as u128) * 8) << self.granularity_bits;
        self.in_use() || image_size as u128 <= covered
    }
}

/// Decodes the bitmap directory (`dir` holds `dir_size` bytes) with QEMU's
/// checks and messages, in QEMU's order.
pub fn parse_directory(
    dir: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    image_size: u64,
) -> Result<Vec<DirEntry>> {
    let broken = || invalid!("Broken bitmap directory");
    if dir.is_empty() {
        return Err(invalid!("Requested bitmap directory size is zero"));
    }
    let end = dir.len() as u64;
    let mut pos = 0u64;
    let mut list = Vec::new();
    while pos < end {
        if end - pos < ENTRY_HEADER {
            return Err(broken());
        }
        if list.len() as u32 >= nb_bitmaps {
            return Err(invalid!(
                "More bitmaps found than specified in header extension"
            ));
        }
        let e = &dir[pos as usize..];
        let name_size = u16::from_be_bytes([e[18], e[19]]) as u64;
        let extra = be32(e, 20) as u64;
        let len = (ENTRY_HEADER + extra + name_size).next_multiple_of(8);
        if len > end - pos {
            return Err(broken());
        }
        let name_at = (ENTRY_HEADER + extra) as usize;
        let entry = DirEntry {
            table_offset: be64(e, 0),
            table_size: be32(e, 8),
            flags: be32(e, 12),
            kind: e[16],
            granularity_bits: e[17],
            name: e[name_at..name_at + name_size as usize].to_vec(),
        };
        if extra != 0 {
            return Err(invalid!("Bitmap extra data is not supported"));
        }
        if !entry.satisfies_constraints(cluster_size, image_size) {
            return Err(invalid!(
                "Bitmap '{}' doesn't satisfy the constraints",
                entry.display_name()
            ));
        }
        list.push(entry);
        pos += len;
    }
    if (list.len() as u32) < nb_bitmaps {
        return Err(invalid!(
            "Less bitmaps found than specified in header extension"
        ));
    }
    Ok(list)
}

/// Encodes a directory as QEMU writes it (names zero-padded to 8 bytes).
pub fn encode_directory(list: &[DirEntry]) -> Vec<u8> {
    let mut b = vec![0u8; list.iter().map(DirEntry::encoded_len).sum()];
    let mut pos = 0;
    for e in list {
        put64(&mut b, pos, e.table_offset);
        put32(&mut b, pos + 8, e.table_size);
        put32(&mut b, pos + 12, e.flags);
        b[pos + 16] = e.kind;
        b[pos + 17] = e.granularity_bits;
        b[pos + 18..pos + 20].copy_from_slice(&(e.name.len() as u16).to_be_bytes());
        let n = pos + ENTRY_HEADER as usize;
        b[n..n + e.name.len()].copy_from_slice(&e.name);
        pos += e.encoded_len();
    }
    b
}

/// Whether a bitmap table entry is valid: no reserved bits, and a data
/// cluster offset is cluster aligned and leaves bit 0 clear.
pub fn table_entry_ok(entry: u64, cluster_size: u64) -> bool {
    if entry & TABLE_RESERVED_MASK != 0 {
        return false;
    }
    let off = entry & TABLE_OFFSET_MASK;
    off == 0 || (entry & TABLE_ALL_ONES == 0 && off.is_multiple_of(cluster_size))
}

/// Bits a bitmap of granularity 2^`granularity_bits` has over `image_size`.
pub fn bitmap_bits(image_size: u64, granularity_bits: u8) -> u64 {
    image_size.div_ceil(1u64 << granularity_bits)
}

/// Entries the bitmap table of such a bitmap needs: one per cluster of
/// serialized bits.
pub fn table_entries(image_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    bitmap_bits(image_size, granularity_bits)
        .div_ceil(8)
        .div_ceil(cluster_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 65536;

    fn entry(name: &str, flags: u32) -> DirEntry {
        DirEntry {
            table_offset: 0x40000,
            table_size: 1,
            flags,
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: 16,
            name: name.as_bytes().to_vec(),
        }
    }

    #[test]
    fn directory_round_trip() {
        let list = vec![entry("b0", FLAG_AUTO), entry("a-longer-name", FLAG_IN_USE)];
        let d = encode_directory(&list);
        assert_eq!(d.len(), 32 + 40);
        assert_eq!(parse_directory(&d, 2, CS, 10 << 20).unwrap(), list);
    }

    #[test]
    fn directory_errors_in_qemu_order() {
        let d = encode_directory(&[entry("b0", 0), entry("b1", 0)]);
        let msg = |r: Result<Vec<DirEntry>>| r.unwrap_err().to_string();
        assert_eq!(
            msg(parse_directory(&d, 1, CS, 1 << 20)),
            "More bitmaps found than specified in header extension"
        );
        assert_eq!(
            msg(parse_directory(&d, 3, CS, 1 << 20)),
            "Less bitmaps found than specified in header extension"
        );
        assert_eq!(
            msg(parse_directory(&d[..40], 2, CS, 1 << 20)),
            "Broken bitmap directory"
        );
        assert_eq!(
            msg(parse_directory(&d[..8], 2, CS, 1 << 20)),
            "Broken bitmap directory"
        );
        assert_eq!(
            msg(parse_directory(&[], 2, CS, 1 << 20)),
            "Requested bitmap directory size is zero"
        );
        let mut bad = d.clone();
        bad[17] = 8;
        assert_eq!(
            msg(parse_directory(&bad, 2, CS, 1 << 20)),
            "Bitmap 'b0' doesn't satisfy the constraints"
        );
        let mut extra = d.clone();
        extra[23] = 8;
        assert_eq!(
            msg(parse_directory(&extra, 2, CS, 1 << 20)),
            "Bitmap extra data is not supported"
        );
        // A table too small for the image is refused unless in use.
        let huge = 65536u64 * 8 * 65536 + 1;
        assert!(parse_directory(&d, 2, CS, huge).is_err());
        let d2 = encode_directory(&[entry("b0", FLAG_IN_USE)]);
        assert!(parse_directory(&d2, 1, CS, huge).is_ok());
    }

    #[test]
    fn extension_checks() {
        let ok = BitmapsExt {
            nb_bitmaps: 2,
            dir_size: 64,
            dir_offset: 0x50000,
        };
        assert_eq!(BitmapsExt::parse(&ok.encode(), CS).unwrap(), ok);
        let msg = |e: BitmapsExt| BitmapsExt::parse(&e.encode(), CS).unwrap_err().to_string();
        assert_eq!(
            msg(BitmapsExt {
                nb_bitmaps: 0,
                ..ok
            }),
            "found bitmaps extension with zero bitmaps"
        );
        assert_eq!(
            msg(BitmapsExt {
                nb_bitmaps: 65536,
                ..ok
            }),
            "bitmaps_ext: Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535"
        );
        assert_eq!(
            msg(BitmapsExt {
                dir_offset: 0x50001,
                ..ok
            }),
            "bitmaps_ext: invalid bitmap directory offset"
        );
        assert!(msg(BitmapsExt {
            dir_size: 1 << 30,
            ..ok
        })
        .contains("exceeds the maximum supported size (67107840)"));
        assert_eq!(
            BitmapsExt::parse(&[0u8; 16], CS).unwrap_err().to_string(),
            "bitmaps_ext: Invalid extension length"
        );
        let mut reserved = ok.encode();
        reserved[7] = 1;
        assert_eq!(
            BitmapsExt::parse(&reserved, CS).unwrap_err().to_string(),
            "bitmaps_ext: Reserved field is not zero"
        );
    }

    #[test]
    fn table_entries_and_sizes() {
        assert!(table_entry_ok(0, CS));
        assert!(table_entry_ok(TABLE_ALL_ONES, CS));
        assert!(table_entry_ok(0x70000, CS));
        assert!(!table_entry_ok(0x70001, CS));
        assert!(!table_entry_ok(0x70200, CS));
        assert!(!table_entry_ok(1 << 63, CS));
        assert_eq!(bitmap_bits(10 << 20, 16), 160);
        assert_eq!(table_entries(10 << 20, 16, CS), 1);
        // 64 KiB of bits at 512-byte granularity cover 256 MiB.
        assert_eq!(table_entries(256 << 20, 9, CS), 1);
        assert_eq!(table_entries((256 << 20) + 1, 9, CS), 2);
        assert_eq!(table_entries(0, 16, CS), 0);
    }
}
