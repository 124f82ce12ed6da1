//! The internal snapshot table: variable-length entries, 8-byte aligned.
//!
//! Only decoding lives here; the engine uses it to know which clusters
//! snapshots hold (so that writes copy shared clusters) and to validate the
//! table against QEMU's limits.

use super::{be32, be64};
use crate::error::{invalid, Result};

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
}

/// Decodes `count` entries from `buf`; refuses entries that run past it.
pub fn parse_table(buf: &[u8], count: u32) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    let mut off = 0usize;
    for _ in 0..count {
        if buf.len() < off + 40 {
            return Err(invalid!("Snapshot table is truncated"));
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
            return Err(invalid!("Snapshot table is truncated"));
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
        });
        off += (total + 7) & !7;
    }
    Ok(out)
}
