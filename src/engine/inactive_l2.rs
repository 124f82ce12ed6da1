//! QEMU's `overlap-check.inactive-l2` (on with `overlap-check=all`): the
//! overlap guard also protects the L2 tables that only snapshots use, and
//! before any write it makes (guest data, or metadata outside the header
//! cluster) it checks every snapshot's L1 table, as QEMU's pre-write
//! overlap check reads them on each write.
//!
//! A snapshot entry whose L1 table fails that check therefore fails every
//! such write with the check's errno (EINVAL for an invalid offset, EFBIG
//! for a table too large) before anything reaches the disk: the image
//! stays as it was. Refcounts a failed request changed stay in the cache,
//! so closing reports "Failed to flush the refcount block cache", as QEMU
//! does (iotest 080). With the option off (the default, QEMU's `cached`
//! template) a damaged snapshot entry only matters where that snapshot is
//! used.

use super::meta::Meta;
use crate::error::Result;
use crate::format::OFFSET_MASK;

impl Meta {
    /// With the inactive-L2 check on, refuses with QEMU's error when some
    /// snapshot's L1 table is invalid.
    pub fn check_snapshot_l1_tables(&self) -> Result<()> {
        if self.check_inactive_l2 {
            for s in &self.snapshots {
                s.check_l1(self.cs)?;
            }
        }
        Ok(())
    }

    /// Collects the host clusters of the snapshots' L2 tables (with the
    /// check on). A snapshot L1 table that is invalid or cannot be read
    /// protects nothing: writes fail anyway while an entry is invalid.
    pub(super) fn load_inactive_l2(&mut self) {
        self.inactive_l2.clear();
        if !self.check_inactive_l2 {
            return;
        }
        let tables: Vec<(u64, u32)> = self
            .snapshots
            .iter()
            .filter(|s| s.l1_size > 0 && s.check_l1(self.cs).is_ok())
            .map(|s| (s.l1_table_offset, s.l1_size))
            .collect();
        for (off, size) in tables {
            let Ok(l1) = self.read_table(off, size as u64 * 8, "read snapshot L1 table") else {
                continue;
            };
            for e in l1 {
                let l2 = e & OFFSET_MASK;
                if l2 != 0 {
                    self.inactive_l2.insert(l2 / self.cs);
                }
            }
        }
    }
}
