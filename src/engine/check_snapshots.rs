//! The snapshot table's part of `check`, as QEMU does it: entries beyond
//! 65536, extra data over 1 KiB and entries past the 64 MiB table limit
//! (which a check-mode open set aside) fail the check unless `-r all` drops
//! them; v3 entries without the 16 bytes of extra data the format requires
//! are corruptions. Each counts as a corruption and, with `-r all`, the
//! table is rewritten (every entry with complete extra data) once the
//! refcounts were checked — so the clusters only the dropped entries used
//! were found leaked first. Dropped entries are mended by the header alone
//! (the count shrinks; the table stays).

use super::check::FIX_ERRORS;
use super::meta::Meta;
use crate::error::{Error, Result};
use crate::format::put32;

impl Meta {
    /// Reports the snapshot table's problems and returns how many
    /// corruptions they are and how many of them are already fixed.
    /// Without `FIX_ERRORS`, entries over a limit are an error (QEMU's
    /// wording and hint, EFBIG); with it, the header at once lists only the
    /// entries kept, which mends those (the table stays where it is, its
    /// tail leaked until the refcount repair frees it).
    pub(super) fn check_snapshot_table(
        &mut self,
        fix: u32,
        report: &mut dyn FnMut(&str),
    ) -> Result<(u64, u64)> {
        let repair = fix & FIX_ERRORS != 0;
        let issues = self.snapshot_issues.clone();
        let mut corruptions = 0u64;
        let mut dropped = 0u64;
        if issues.too_many > 0 {
            if !repair {
                return Err(Error::TooLarge(format!(
                    "ERROR snapshot table too large\nYou can force-remove all {} \
                     overhanging snapshots with qemu-img check -r all",
                    issues.too_many
                )));
            }
            report(&format!(
                "Discarding {} overhanging snapshots",
                issues.too_many
            ));
            dropped += issues.too_many as u64;
        }
        let failed = "ERROR failed to read the snapshot table";
        for &(i, size) in &issues.extra_dropped {
            if !repair {
                return Err(Error::TooLarge(format!(
                    "{failed}: Too much extra metadata in snapshot table entry {i}\n\
                     You can force-remove this extra metadata with qemu-img check -r all"
                )));
            }
            report(&format!(
                "Discarding too much extra metadata in snapshot table entry {i} ({size} > 1024)"
            ));
            corruptions += 1;
        }
        if issues.overhanging > 0 {
            let n = issues.overhanging;
            if !repair {
                return Err(Error::TooLarge(format!(
                    "{failed}: Snapshot table is too big\nYou can force-remove all {n} \
                     overhanging snapshots with qemu-img check -r all"
                )));
            }
            report(&format!(
                "Discarding {n} overhanging snapshots (snapshot table is too big)"
            ));
            dropped += n as u64;
        }
        if dropped > 0 {
            let mut b = [0u8; 4];
            put32(&mut b, 0, self.snapshots.len() as u32);
            self.write_file(&b, 60, "write header")?;
            self.sync()?;
            self.header.nb_snapshots = self.snapshots.len() as u32;
        }
        if self.header.version >= 3 {
            let word = if repair { "Repairing" } else { "ERROR" };
            for (i, s) in self.snapshots.iter().enumerate() {
                if s.extra_size < 16 {
                    report(&format!("{word} snapshot table entry {i} is incomplete"));
                    corruptions += 1;
                }
            }
        }
        self.snapshot_issues.too_many = 0;
        self.snapshot_issues.overhanging = 0;
        Ok((corruptions, dropped))
    }

    /// With `FIX_ERRORS` and something to mend, rewrites the snapshot
    /// table; returns whether it did.
    pub(super) fn fix_snapshot_table(&mut self, corruptions: u64, fix: u32) -> Result<bool> {
        if corruptions == 0 || fix & FIX_ERRORS == 0 {
            return Ok(false);
        }
        let list = self.snapshots.clone();
        self.write_snapshot_table(list)?;
        self.snapshot_issues = Default::default();
        Ok(true)
    }
}
