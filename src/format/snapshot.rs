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

/// Decodes `count` entries from `buf`. Returns None when they run past
/// it (the caller reads more), else the entries and the table's length
/// (the last entry unpadded).
pub fn parse_table(buf: &[u8], count: u32) -> Result<Option<(Vec<Snapshot>, usize)>> {
    let mut out = Vec::new();
    let mut off = 0usize;
    let mut len = 0usize;
    for _ in 0..count {
        if buf.len() < off + 40 {
            return Ok(None);
        }
        let e = &buf[off..];
        let id_len = u16::from_be_bytes([e[12], e[13]]) as usize;
        let name_len = u16::from_be_bytes([e[14], e[15]]) as usize;
        let extra = be32(e, 36);
        if extra > MAX_EXTRA_DATA {
            return Err(invalid!("Too much extra metadata in snapshot table entry"));
        }
        let extra = extra as usize;
        let total = 40 + extra + id_len + name_len;
        if e.len() < total {
            return Ok(None);
        }
        let mut vm_state_size = be32(e, 32) as u64;
        let mut disk_size = None;
        if extra >= 8 {
            vm_state_size = be64(e, 40);
        }
        if extra >= 16 {
            disk_size = Some(be64(e, 48));
        }
        let ids = 40 + extra;
        let icount = (extra >= 24).then(|| be64(e, 56));
        let extra_unknown = if extra > 24 {
            e[64..40 + extra].to_vec()
        } else {
            Vec::new()
        };
        out.push(Snapshot {
            l1_table_offset: be64(e, 0),
            l1_size: be32(e, 8),
            id: String::from_utf8_lossy(&e[ids..ids + id_len]).into_owned(),
            name: String::from_utf8_lossy(&e[ids + id_len..total]).into_owned(),
            date_sec: be32(e, 16),
            date_nsec: be32(e, 20),
            vm_clock_nsec: be64(e, 24),
            vm_state_size,
            disk_size,
            icount,
            extra_unknown,
        });
        len = off + total;
        off += (total + 7) & !7;
    }
    Ok(Some((out, len)))
}
