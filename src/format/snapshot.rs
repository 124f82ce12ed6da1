//! The internal snapshot table: variable-length entries, 8-byte aligned.
//!
//! Only decoding lives here; the engine uses it to know which clusters
//! snapshots hold (so that writes copy shared clusters) and to validate the
//! table against QEMU's limits.

use super::{be32, be64, MAX_L1_SIZE_BYTES};
use crate::error::{invalid, Error, Result};

/// QEMU's limits on the snapshot table.
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
pub const MAX_EXTRA_DATA: u32 = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: Option<u64>,
    /// Instruction count at the snapshot (-1 if none), when stored.
    pub icount: Option<u64>,
    /// Extra data beyond the fields we know, kept verbatim.
    pub extra_unknown: Vec<u8>,
    /// Bytes of extra data the entry had when read (at most
    /// [`MAX_EXTRA_DATA`]); under 16 is incomplete for a v3 image.
    pub extra_size: u32,
}

impl Snapshot {
    /// Bytes of this entry without its trailing padding.
    pub fn encoded_len(&self) -> usize {
        40 + 24 + self.extra_unknown.len() + self.id.len() + self.name.len()
    }

    /// Appends the entry (padded to 8 bytes) to `out`, as QEMU writes it:
    /// 24 bytes of known extra data plus whatever unknown extra data was read.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&(self.vm_state_size.min(u32::MAX as u64) as u32).to_be_bytes());
        out.extend_from_slice(&((24 + self.extra_unknown.len()) as u32).to_be_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&self.disk_size.unwrap_or(0).to_be_bytes());
        // -1: no instruction count, as QEMU writes an entry read without one.
        out.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(&self.extra_unknown);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        while !(out.len() - start).is_multiple_of(8) {
            out.push(0);
        }
    }
}

impl Snapshot {
    /// QEMU's check of a snapshot's L1 table, made where the table is
    /// about to be used (apply, delete, a temporary load, zero-cluster
    /// expansion, the inactive-L2 overlap check) and not when the image is
    /// opened: an image whose snapshot entry is damaged still opens for
    /// guest I/O. The offset may lie past the end of the file (the table
    /// then reads as zeros); only its alignment and the 63-bit limit count.
    pub fn check_l1(&self, cluster_size: u64) -> Result<()> {
        let bytes = self.l1_size as u64 * 8;
        if bytes > MAX_L1_SIZE_BYTES {
            return Err(Error::TooLarge("Snapshot L1 table too large".into()));
        }
        if (i64::MAX as u64) - bytes < self.l1_table_offset
            || !self.l1_table_offset.is_multiple_of(cluster_size)
        {
            return Err(invalid!("Snapshot L1 table offset invalid"));
        }
        Ok(())
    }
}

/// True for the errors of [`Snapshot::check_l1`], which QEMU reports on a
/// line of their own before the errno of the operation that failed.
pub fn is_l1_error(e: &Error) -> bool {
    matches!(e, Error::Invalid(m) | Error::TooLarge(m) if m.starts_with("Snapshot L1 table "))
}

/// Encodes a whole table; the last entry's padding is not counted in the
/// returned length, as QEMU sizes the table.
pub fn encode_table(list: &[Snapshot]) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut len = 0;
    for s in list {
        let start = out.len();
        s.encode_into(&mut out);
        len = start + s.encoded_len();
    }
    (out, len)
}

/// What reading a table found beyond QEMU's limits; `check` reports
/// these, and `check -r all` drops what they name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableIssues {
    /// Entries listed beyond [`MAX_SNAPSHOTS`] (never read).
    pub too_many: u32,
    /// Entries whose extra data passed [`MAX_EXTRA_DATA`]: (index, size).
    pub extra_dropped: Vec<(usize, u32)>,
    /// Entries past the 64 MiB table limit.
    pub overhanging: u32,
}

impl TableIssues {
    pub fn is_empty(&self) -> bool {
        *self == TableIssues::default()
    }
}

/// A decoded table.
pub struct Parsed {
    pub list: Vec<Snapshot>,
    /// Bytes the kept entries span on disk (the last one unpadded).
    pub len: usize,
    pub issues: TableIssues,
}

/// Decodes `count` entries through `read(offset, len)`, which returns
/// `len` bytes of the table at `offset` (zeros past the end of the file, as
/// QEMU reads it); the caller owns the I/O, so this stays pure.
/// An entry with less than 16 bytes of extra data gets `disk_size` (the
/// image's size) and one with less than 24 an icount of -1, as QEMU fills
/// them in. Without `lenient`, an entry over a limit is an error whose text
/// (with QEMU's hint) names it; with it, the entry's excess extra data or the
/// overhanging entries are dropped and listed in the returned issues.
pub fn parse_table(
    read: &mut dyn FnMut(u64, usize) -> Result<Vec<u8>>,
    count: u32,
    disk_size: u64,
    lenient: bool,
) -> Result<Parsed> {
    let mut out = Vec::new();
    let mut issues = TableIssues::default();
    let mut off = 0usize;
    let mut len = 0usize;
    // The table's length as it would be with over-long extra data cut.
    let mut new_len = 0u64;
    for i in 0..count as usize {
        let e = read(off as u64, 40)?;
        let id_len = u16::from_be_bytes([e[12], e[13]]) as usize;
        let name_len = u16::from_be_bytes([e[14], e[15]]) as usize;
        let on_disk = be32(&e, 36);
        if on_disk > MAX_EXTRA_DATA {
            if !lenient {
                return Err(Error::TooLarge(format!(
                    "Too much extra metadata in snapshot table entry {i}\n\
                     You can force-remove this extra metadata with qemu-img check -r all"
                )));
            }
            issues.extra_dropped.push((i, on_disk));
        }
        let on_disk = on_disk as usize;
        let extra = on_disk.min(MAX_EXTRA_DATA as usize);
        let total = 40 + on_disk + id_len + name_len;
        new_len = new_len.next_multiple_of(8) + (40 + extra + id_len + name_len) as u64;
        if new_len > MAX_SNAPSHOT_TABLE_BYTES {
            let n = count - i as u32;
            if !lenient {
                return Err(Error::TooLarge(format!(
                    "Snapshot table is too big\n\
                     You can force-remove all {n} overhanging snapshots with qemu-img check -r all"
                )));
            }
            issues.overhanging = n;
            break;
        }
        let x = read(off as u64 + 40, extra)?;
        let ids = read((off + 40 + on_disk) as u64, id_len + name_len)?;
        let mut vm_state_size = be32(&e, 32) as u64;
        if extra >= 8 {
            vm_state_size = be64(&x, 0);
        }
        let disk_size = if extra >= 16 { be64(&x, 8) } else { disk_size };
        let icount = if extra >= 24 { be64(&x, 16) } else { u64::MAX };
        out.push(Snapshot {
            l1_table_offset: be64(&e, 0),
            l1_size: be32(&e, 8),
            id: cstr(&ids[..id_len]),
            name: cstr(&ids[id_len..]),
            date_sec: be32(&e, 16),
            date_nsec: be32(&e, 20),
            vm_clock_nsec: be64(&e, 24),
            vm_state_size,
            disk_size: Some(disk_size),
            icount: Some(icount),
            extra_unknown: x.get(24..).unwrap_or_default().to_vec(),
            extra_size: extra as u32,
        });
        len = off + total;
        off += (total + 7) & !7;
    }
    Ok(Parsed {
        list: out,
        len,
        issues,
    })
}

/// An ID or name as QEMU keeps it: a C string, ending at its first NUL
/// (so a rewritten table stores it shorter).
fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}
