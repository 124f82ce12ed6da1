//! Consistency check and repair: recount every reference the metadata makes,
//! compare with the stored refcounts, check the COPIED flags, and repair
//! leaks, errors or the whole refcount structure — with QEMU's report lines,
//! counters and rules (what is a corruption, what is a leak, when the
//! refcount structure must be rebuilt).
//!
//! The check reads tables straight from the file (after the caches were
//! written back), so it never trusts what it is checking.

use super::meta::Meta;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::entries::{L2Entry, COPIED};
use crate::format::*;

/// Repair leaked clusters (refcount too high).
pub const FIX_LEAKS: u32 = 1;
/// Repair errors (refcount too low, wrong COPIED flags, broken refcount structure).
pub const FIX_ERRORS: u32 = 2;

/// What a check found and fixed, with QEMU's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckResult {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
}

/// What a refcount rebuild tells its caller (amend's progress).
enum RebuildStep {
    /// The layout is chosen; QEMU's width change would have taken `walks`
    /// allocation walks to reach it.
    Planned { walks: u64 },
    /// The block with this index in the new table is about to be written.
    Writing { block: u64 },
}

/// Reference counts computed from the metadata, indexed by host cluster.
struct Refs {
    counts: Vec<u64>,
    /// The most a refcount of the image's width holds: a cluster with more
    /// references cannot be repaired, only reported (as QEMU does).
    max: u64,
    /// Clusters counted: the file's, and one more when a reference
    /// reaches less than a cluster past its end.
    nb_clusters: u64,
    /// Clusters just past the end of the file that references too far past
    /// it point to (not counted, as QEMU does not count them). A rebuilt
    /// refcount structure must not go there: once the file reaches them,
    /// it would share its clusters with those tables or data. Only the
    /// clusters a rebuild could reach are kept.
    past_end: std::collections::HashSet<u64>,
}

/// How far past the end of the file a rebuild may place its tables.
const PAST_END_WINDOW: u64 = 1 << 20;

struct Walk<'a, 'r> {
    res: CheckResult,
    /// The repair mask of this walk (0 while only looking).
    fix: u32,
    rebuild: bool,
    next_contiguous: u64,
    /// The file length when the walk started (one fstat, not one per entry).
    file_len: u64,
    report: &'a mut (dyn FnMut(&str) + 'r),
}

impl<'a, 'r> Walk<'a, 'r> {
    /// Counts a data cluster of the active table as allocated, and as
    /// fragmented when it does not follow the previous one on the host.
    fn note_allocated(&mut self, host: u64, cs: u64, active: bool) {
        if active {
            self.res.allocated_clusters += 1;
            if self.next_contiguous != 0 && host != self.next_contiguous {
                self.res.fragmented_clusters += 1;
            }
            self.next_contiguous = host + cs;
        }
    }

    fn new(file_len: u64, report: &'a mut (dyn FnMut(&str) + 'r)) -> Self {
        Walk {
            res: CheckResult::default(),
            fix: 0,
            rebuild: false,
            next_contiguous: 0,
            file_len,
            report,
        }
    }
}

impl Refs {
    fn inc(&mut self, w: &mut Walk<'_, '_>, cs: u64, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        // As QEMU: the last cluster may be partly past the end of the file
        // (a reference reaching less than a cluster beyond it is counted,
        // the table growing to hold it); one reaching further is an error.
        let end = off.saturating_add(len);
        if end > w.file_len && end - w.file_len >= cs {
            (w.report)(&format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
            ));
            w.res.corruptions += 1;
            let window = self.nb_clusters + PAST_END_WINDOW;
            for c in off / cs..(end - 1) / cs + 1 {
                if c >= window {
                    break;
                }
                self.past_end.insert(c);
            }
            return;
        }
        let (first, last) = (off / cs, (end - 1) / cs);
        if last >= self.nb_clusters {
            self.nb_clusters = last + 1;
            self.counts.resize(self.nb_clusters as usize, 0);
        }
        for c in first..=last {
            if self.counts[c as usize] >= self.max {
                (w.report)(&format!(
                    "ERROR: overflow cluster offset={:#x}\nUse qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing",
                    c * cs
                ));
                w.res.corruptions += 1;
                continue;
            }
            self.counts[c as usize] += 1;
        }
    }
    fn get(&self, c: u64) -> u64 {
        self.counts.get(c as usize).copied().unwrap_or(0)
    }
}

impl Meta {
    /// Counts the references of one L1 table and the L2 tables below it.
    fn count_l1(
        &mut self,
        refs: &mut Refs,
        w: &mut Walk<'_, '_>,
        l1: &[u64],
        active: bool,
    ) -> Result<()> {
        let cs = self.cs;
        for &e in l1 {
            let l2_off = e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            // As QEMU: a misaligned table still counts (the clusters it
            // spans, and the entries read from where it says it is), so
            // that a repair does not free clusters it may reference. It is
            // never written back: a repair there would land across two
            // clusters.
            refs.inc(w, cs, l2_off, cs);
            let aligned = l2_off.is_multiple_of(cs);
            if !aligned {
                (w.report)(&format!(
                    "ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                w.res.corruptions += 1;
            }
            if l2_off / cs >= w.file_len.div_ceil(cs) {
                continue;
            }
            let mut l2 = self.read_table(l2_off, cs, "read L2 table")?;
            // Contiguity is judged within one L2 table, as QEMU does.
            w.next_contiguous = 0;
            if self.has_data_file() {
                if self.count_data_l2(w, &mut l2, active) && aligned {
                    self.write_checked_l2(&l2, l2_off)?;
                }
                continue;
            }
            let mut repaired = false;
            let stride = l2_entry_bytes(self.ext_l2) as usize / 8;
            for (i, k) in (0..l2.len()).step_by(stride).enumerate() {
                let raw = l2[k];
                if self.ext_l2 && !self.bitmap_ok(w, i, raw, l2[k + 1]) {
                    continue;
                }
                match self.decode(raw) {
                    L2Entry::Compressed { offset, len } => {
                        if raw & COPIED != 0 {
                            (w.report)(&format!(
                                "ERROR: coffset={offset:#x}: copied flag must never be set for compressed clusters"
                            ));
                            w.res.corruptions += 1;
                        }
                        let start = offset & !511;
                        refs.inc(w, cs, start, len + (offset & 511));
                        if active {
                            w.res.allocated_clusters += 1;
                            w.res.compressed_clusters += 1;
                            w.res.fragmented_clusters += 1;
                        }
                    }
                    L2Entry::Normal { host, .. } | L2Entry::Zero { host, .. } if host != 0 => {
                        if host % cs != 0 && self.misaligned(w, &mut l2, k) {
                            repaired = true;
                            continue;
                        }
                        w.note_allocated(host, cs, active);
                        refs.inc(w, cs, host, cs);
                    }
                    _ => {}
                }
            }
            if repaired && aligned {
                self.write_checked_l2(&l2, l2_off)?;
            }
        }
        Ok(())
    }

    /// QEMU's rule for a data or preallocated cluster whose host offset is
    /// not cluster aligned: a corruption; one holding no data (a zero
    /// cluster, or no subcluster allocated) is repaired with `-r all` by
    /// dropping its host offset. Returns true when the entry was repaired
    /// (its cluster is then not counted); otherwise the cluster still
    /// counts as used, as in QEMU (its references span two clusters).
    fn misaligned(&self, w: &mut Walk<'_, '_>, l2: &mut [u64], k: usize) -> bool {
        let raw = l2[k];
        let host = raw & OFFSET_MASK;
        let data = if self.ext_l2 {
            l2[k + 1] & crate::format::subcluster::ALL_ALLOC != 0
        } else {
            raw & entries::ZERO == 0
        };
        if data {
            (w.report)(&format!(
                "ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted."
            ));
            w.res.corruptions += 1;
            return false;
        }
        let fixing = w.fix & FIX_ERRORS != 0;
        (w.report)(&format!(
            "{} offset={host:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
            if fixing { "Repairing" } else { "ERROR" }
        ));
        if !fixing {
            w.res.corruptions += 1;
            return false;
        }
        // Extended entries keep their bitmap (the zero bits still apply,
        // the rest reads from the backing file); standard ones become
        // plain zero clusters.
        l2[k] = if self.ext_l2 { 0 } else { entries::ZERO };
        w.res.corruptions_fixed += 1;
        true
    }

    /// Writes an L2 table check changed straight to the file, dropping any
    /// cached copy of it.
    fn write_checked_l2(&mut self, l2: &[u64], l2_off: u64) -> Result<()> {
        let b = encode_table(l2, self.cs as usize);
        self.l2_cache.remove(l2_off);
        self.write_file(&b, l2_off, "write L2 table")
    }

    /// QEMU's checks of a subcluster bitmap: false when the entry must
    /// not be counted (a compressed cluster with a bitmap).
    fn bitmap_ok(&self, w: &mut Walk<'_, '_>, index: usize, raw: u64, bitmap: u64) -> bool {
        use crate::format::subcluster::ALL_ALLOC;
        match self.decode(raw) {
            L2Entry::Compressed { .. } if bitmap != 0 => {
                (w.report)(&format!(
                    "ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, entry={raw:#x}"
                ));
                w.res.corruptions += 1;
                return false;
            }
            L2Entry::Normal { host, .. } if (bitmap >> 32) & bitmap != 0 => {
                (w.report)(&format!(
                    "ERROR offset={host:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                ));
                w.res.corruptions += 1;
            }
            L2Entry::Unallocated if bitmap & ALL_ALLOC != 0 => {
                (w.report)("ERROR: Unallocated cluster has non-zero subcluster allocation map");
                w.res.corruptions += 1;
            }
            _ => {}
        }
        true
    }

    /// An L2 table of an image with an external data file: its data
    /// clusters are counted as allocated (and fragmented) but hold no
    /// references; compressed entries are corruptions (QEMU's line).
    /// Returns whether an entry was repaired (the table must be written).
    fn count_data_l2(&self, w: &mut Walk<'_, '_>, l2: &mut [u64], active: bool) -> bool {
        let cs = self.cs;
        let mut repaired = false;
        let stride = l2_entry_bytes(self.ext_l2) as usize / 8;
        for (i, k) in (0..l2.len()).step_by(stride).enumerate() {
            let raw = l2[k];
            let host = match self.decode(raw) {
                L2Entry::Compressed { .. } => {
                    (w.report)(&format!(
                        "ERROR compressed cluster {i} with data file, entry={raw:#x}"
                    ));
                    w.res.corruptions += 1;
                    continue;
                }
                L2Entry::Normal { host, .. } => host,
                L2Entry::Zero { host, .. } if host != 0 => host,
                _ => continue,
            };
            if host % cs != 0 && self.misaligned(w, l2, k) {
                repaired = true;
                continue;
            }
            w.note_allocated(host, cs, active);
        }
        repaired
    }

    /// Counts every reference the image's metadata makes.
    fn calculate_refcounts(&mut self, w: &mut Walk<'_, '_>) -> Result<Refs> {
        let snap_table = self.snapshot_table;
        let snapshots = self.snapshots.clone();
        let cs = self.cs;
        let nb_clusters = w.file_len.div_ceil(cs);
        let mut refs = Refs {
            counts: vec![0; nb_clusters as usize],
            max: self.rw.max(),
            nb_clusters,
            past_end: Default::default(),
        };
        refs.inc(w, cs, 0, cs);
        let l1 = self.l1.clone();
        refs.inc(w, cs, self.header.l1_table_offset, l1.len() as u64 * 8);
        self.count_l1(&mut refs, w, &l1, true)?;
        for sn in &snapshots {
            let (off, size) = (sn.l1_table_offset, sn.l1_size);
            let what = if size as u64 * 8 > MAX_L1_SIZE_BYTES {
                Some(format!("l1_size={size:#x}: L1 table is too large"))
            } else if off % cs != 0 {
                Some(format!(
                    "l1_offset={off:#x}: L1 table is not cluster aligned"
                ))
            } else {
                None
            };
            if let Some(what) = what {
                (w.report)(&format!(
                    "ERROR snapshot {} ({}) {what}; snapshot table entry corrupted",
                    sn.id, sn.name
                ));
                w.res.corruptions += 1;
                continue;
            }
            refs.inc(w, cs, off, size as u64 * 8);
            // Past the 63-bit limit (reported just now as past the end of
            // the file) the table cannot be read.
            if sn.check_l1(cs).is_ok() {
                let sl1 = self.read_table(off, size as u64 * 8, "read snapshot L1 table")?;
                self.count_l1(&mut refs, w, &sl1, false)?;
            }
        }
        refs.inc(w, cs, snap_table.0, snap_table.1);
        if let Some((off, len)) = self.header.crypto_header {
            refs.inc(w, cs, off, len.min(u64::MAX - off));
        }
        refs.inc(
            w,
            cs,
            self.header.refcount_table_offset,
            self.header.refcount_table_clusters as u64 * cs,
        );
        for (off, len) in super::bitmaps::referenced_regions(self)? {
            refs.inc(w, cs, off, len);
        }
        for (i, &e) in self.reftable.clone().iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) {
                (w.report)(&format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                w.res.corruptions += 1;
                w.rebuild = true;
                continue;
            }
            if off / cs >= nb_clusters {
                (w.report)(&format!("ERROR refcount block {i} is outside image"));
                w.res.corruptions += 1;
                w.rebuild = true;
                continue;
            }
            refs.inc(w, cs, off, cs);
            if refs.get(off / cs) != 1 {
                (w.report)(&format!(
                    "ERROR refcount block {i} refcount={}",
                    refs.get(off / cs)
                ));
                w.res.corruptions += 1;
                w.rebuild = true;
            }
        }
        Ok(refs)
    }

    /// Stored refcount of a cluster, or None (a check error) if unreadable.
    fn stored_refcount(&mut self, c: u64, file_len: u64) -> Option<u64> {
        let ti = (c >> self.rb_bits) as usize;
        if ti < self.reftable.len() {
            let off = self.reftable[ti] & REFT_OFFSET_MASK;
            if off != 0 && (!off.is_multiple_of(self.cs) || off >= file_len) {
                return None;
            }
        }
        self.refcount(c).ok()
    }

    /// Compares stored refcounts with the computed ones, fixing what `fix` allows.
    fn compare_refcounts(
        &mut self,
        refs: &Refs,
        w: &mut Walk<'_, '_>,
        fix: u32,
        highest: &mut u64,
    ) -> Result<()> {
        // As QEMU: only clusters inside the file are compared.
        let n = refs.counts.len() as u64;
        for c in 0..n {
            let Some(stored) = self.stored_refcount(c, w.file_len) else {
                (w.report)(&format!("ERROR cluster {c}: cannot read its refcount"));
                w.res.check_errors += 1;
                continue;
            };
            let counted = refs.get(c);
            if stored > 0 || counted > 0 {
                *highest = c;
            }
            if stored == counted {
                continue;
            }
            let fixing = if stored == 0 {
                w.rebuild = true;
                false
            } else if stored > counted {
                fix & FIX_LEAKS != 0
            } else {
                fix & FIX_ERRORS != 0
            };
            let word = if fixing {
                "Repairing"
            } else if stored < counted {
                "ERROR"
            } else {
                "Leaked"
            };
            (w.report)(&format!(
                "{word} cluster {c} refcount={stored} reference={counted}"
            ));
            if fixing {
                if counted > self.rw.max() {
                    w.res.check_errors += 1;
                    continue;
                }
                self.set_refcount_exact(c, counted)?;
                if stored > counted {
                    w.res.leaks_fixed += 1;
                } else {
                    w.res.corruptions_fixed += 1;
                }
                continue;
            }
            if stored < counted {
                w.res.corruptions += 1;
            } else {
                w.res.leaks += 1;
            }
        }
        Ok(())
    }

    /// Checks that COPIED flags say "refcount is exactly 1".
    /// With leaks repaired only (`-r leaks`) they are fixed too, as in
    /// QEMU, when nothing else is left wrong (a leak fixed can leave a
    /// refcount of 1 whose flag was rightly clear before: iotest 217).
    fn check_oflag_copied(&mut self, w: &mut Walk<'_, '_>, fix: u32) -> Result<()> {
        let cs = self.cs;
        let clean = w.res.check_errors == 0 && w.res.corruptions == 0 && w.res.leaks == 0;
        let fixing = fix & FIX_ERRORS != 0 || (fix & FIX_LEAKS != 0 && clean);
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let l2_off = e & OFFSET_MASK;
            if l2_off == 0 || l2_off + cs > w.file_len {
                continue;
            }
            // A misaligned table is checked where it says it is, as QEMU
            // does, but never repaired in place (see count_l1).
            let fix_l2 = fixing && l2_off.is_multiple_of(cs);
            let rc = self.refcount(l2_off / cs)?;
            if (rc == 1) != (e & COPIED != 0) {
                (w.report)(&format!(
                    "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}",
                    if fixing { "Repairing" } else { "ERROR" }
                ));
                if fixing {
                    self.l1[i] = if rc == 1 { l2_off | COPIED } else { l2_off };
                    self.l1_dirty.insert(i);
                    w.res.corruptions_fixed += 1;
                } else {
                    w.res.corruptions += 1;
                }
            }
            let mut l2 = self.read_table(l2_off, cs, "read L2 table")?;
            let mut changed = false;
            let stride = l2_entry_bytes(self.ext_l2) as usize / 8;
            for raw in l2.iter_mut().step_by(stride) {
                let (host, copied) = match self.decode(*raw) {
                    L2Entry::Normal { host, copied } => (host, copied),
                    L2Entry::Zero { host, copied } if host != 0 => (host, copied),
                    _ => continue,
                };
                if !host.is_multiple_of(cs) {
                    continue;
                }
                // Data in an external data file is not refcounted: always 1.
                let rc = if self.has_data_file() {
                    1
                } else {
                    self.refcount(host / cs)?
                };
                if (rc == 1) != copied {
                    (w.report)(&format!(
                        "{} OFLAG_COPIED data cluster: l2_entry={:x} refcount={rc}",
                        if fix_l2 { "Repairing" } else { "ERROR" },
                        *raw
                    ));
                    if fix_l2 {
                        *raw = if rc == 1 {
                            *raw | COPIED
                        } else {
                            *raw & !COPIED
                        };
                        changed = true;
                        w.res.corruptions_fixed += 1;
                    } else {
                        w.res.corruptions += 1;
                    }
                }
            }
            if changed {
                self.write_checked_l2(&l2, l2_off)?;
            }
        }
        if fixing {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes a brand-new refcount table and blocks describing `refs`
    /// into free clusters (first fit), then points the header at them.
    /// `step` learns how many allocation passes QEMU's walks would take
    /// (see [`RebuildStep`]) and each block about to be written.
    fn rebuild_refcount_structure(
        &mut self,
        refs: &mut Refs,
        step: &mut dyn FnMut(RebuildStep),
    ) -> Result<()> {
        let cs = self.cs;
        let per_block = 1u64 << self.rb_bits;
        let mut first_free = 0u64;
        let mut alloc = |refs: &mut Refs, n: u64| -> u64 {
            let mut start = first_free;
            loop {
                if (start..start + n).all(|c| refs.get(c) == 0 && !refs.past_end.contains(&c)) {
                    break;
                }
                start += 1;
            }
            for c in start..start + n {
                if c as usize >= refs.counts.len() {
                    refs.counts.resize(c as usize + 1, 0);
                }
                refs.counts[c as usize] = 1;
            }
            if n == 1 {
                first_free = start + 1;
            }
            start
        };
        // Blocks for every block index holding a non-zero count, then a
        // table for them; the table's own clusters may need another block,
        // and more blocks a larger table, so repeat until nothing changes.
        // The table stays where it is while it is large enough (moving it
        // instead could chase an uncovered range forever).
        let mut blocks: Vec<u64> = Vec::new();
        let mut table: Option<(u64, u64)> = None;
        let mut passes = 0u64;
        let (table_off, tc) = loop {
            passes += 1;
            let before = blocks.iter().filter(|&&b| b != 0).count();
            let mut i = 0;
            while (i as u64) < (refs.counts.len() as u64).div_ceil(per_block) {
                if i >= blocks.len() {
                    blocks.resize(i + 1, 0);
                }
                let lo = i * per_block as usize;
                let hi = (lo + per_block as usize).min(refs.counts.len());
                if blocks[i] == 0 && refs.counts[lo..hi].iter().any(|&v| v != 0) {
                    blocks[i] = alloc(refs, 1) * cs;
                }
                i += 1;
            }
            let need = (blocks.len() as u64 * 8).div_ceil(cs).max(1);
            let allocated = blocks.iter().filter(|&&b| b != 0).count() > before;
            match table {
                Some((first, tc)) if tc >= need => {
                    // QEMU walks once more after a walk that allocated,
                    // to see that nothing else is needed.
                    step(RebuildStep::Planned {
                        walks: passes + allocated as u64,
                    });
                    break (first * cs, tc);
                }
                Some((first, tc)) => {
                    for c in first..first + tc {
                        refs.counts[c as usize] = 0;
                    }
                }
                None => {}
            }
            if need * cs > MAX_REFTABLE_SIZE_BYTES {
                return Err(Error::TooLarge("Reference count table too large".into()));
            }
            table = Some((alloc(refs, need), need));
        };
        for (b, &off) in blocks.iter().enumerate() {
            if off == 0 {
                continue;
            }
            step(RebuildStep::Writing { block: b as u64 });
            let mut data = vec![0u8; cs as usize];
            let lo = b as u64 * per_block;
            for k in 0..per_block {
                let v = refs.get(lo + k);
                if v > self.rw.max() {
                    return Err(Error::Corrupt(format!(
                        "{}: cluster {} needs a refcount above the maximum",
                        self.name,
                        lo + k
                    )));
                }
                self.rw.set(&mut data, k, v);
            }
            self.write_file(&data, off, "write refcount block")?;
        }
        let table = encode_table(&blocks, (tc * cs) as usize);
        self.write_file(&table, table_off, "write refcount table")?;
        self.sync()?;
        self.header.refcount_table_offset = table_off;
        self.header.refcount_table_clusters = tc as u32;
        if self.header.refcount_order != self.rw.order {
            // A new width: order and table change in one header write.
            self.header.refcount_order = self.rw.order;
            self.write_header()?;
        } else {
            let mut hdr = [0u8; 12];
            put64(&mut hdr, 0, table_off);
            put32(&mut hdr, 8, tc as u32);
            self.write_file(&hdr, 48, "write header")?;
            self.sync()?;
        }
        let mut rt = blocks.clone();
        rt.resize((tc * cs / 8) as usize, 0);
        self.reftable = rt;
        self.rb_cache = super::cache::TableCache::new(self.rb_cache_capacity());
        self.free_cluster_index = 0;
        Ok(())
    }

    /// Writes a new refcount structure with entries of `1 << order` bits
    /// holding the refcounts stored now (amend's refcount_bits change), as
    /// QEMU carries them over: an image whose refcounts disagree with its
    /// references keeps the disagreement for `check -r` to mend, and the
    /// old structure stays intact until the header switches to the new one.
    /// Returns the corruptions a check counts before the change, so that
    /// the caller can tell a change that made things worse.
    ///
    /// `progress(done, total)` reports as QEMU's width change does: one
    /// unit per entry of the old refcount table in each of its walks (the
    /// allocation walks, at least two, with the total raised when a walk
    /// has to be repeated, then the walk writing the blocks), so that
    /// `qemu-img amend -p` shows the same steps (iotest 112).
    pub fn set_refcount_order_rebuilding(
        &mut self,
        order: u32,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64> {
        let n = self.header.refcount_table_clusters as u64 * self.cs / 8;
        let old_rb_bits = self.rb_bits;
        let mut lines = Vec::new();
        let mut report = |l: &str| lines.push(l.to_string());
        let file_len = self.file_len()?;
        let mut w = Walk::new(file_len, &mut report);
        self.calculate_refcounts(&mut w)?;
        if w.res.check_errors > 0 {
            return Err(Error::Corrupt(format!(
                "{}: image is unreadable in places; repair it before changing the refcount width",
                self.name
            )));
        }
        let corruptions = w.res.corruptions;
        let nb_clusters = file_len.div_ceil(self.cs);
        let mut counts = Vec::with_capacity(nb_clusters as usize);
        for c in 0..nb_clusters {
            counts.push(self.refcount(c)?);
        }
        let max = crate::format::RefcountWidth { order }.max();
        if let Some(c) = counts.iter().position(|&v| v > max) {
            return Err(Error::InvalidArgument(format!(
                "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {}",
                1u32 << order,
                c as u64 * self.cs,
                counts[c]
            )));
        }
        let mut refs = Refs {
            counts,
            max,
            nb_clusters,
            past_end: Default::default(),
        };
        self.rw = crate::format::RefcountWidth { order };
        self.rb_bits = self.cb + 3 - order;
        let new_rb_bits = self.rb_bits;
        let mut walks = 0u64;
        let mut next = 0u64;
        // The write walk's entries up to `upto` (exclusive) not yet reported.
        let write_walk_to =
            |progress: &mut dyn FnMut(u64, u64), walks: u64, next: &mut u64, upto: u64| {
                while *next < upto.min(n) {
                    progress(walks * n + *next, (walks + 1) * n);
                    *next += 1;
                }
            };
        self.rebuild_refcount_structure(&mut refs, &mut |step| match step {
            RebuildStep::Planned { walks: w } => {
                walks = w;
                for k in 0..w {
                    let total = (k + 2).max(3) * n;
                    for i in 0..n {
                        progress(k * n + i, total);
                    }
                    progress((k + 1) * n, total);
                }
            }
            RebuildStep::Writing { block } => {
                let ri = (block << new_rb_bits) >> old_rb_bits;
                write_walk_to(progress, walks, &mut next, ri + 1);
            }
        })?;
        write_walk_to(progress, walks, &mut next, n);
        progress((walks + 1) * n, (walks + 1) * n);
        Ok(corruptions)
    }

    fn set_refcount_exact(&mut self, c: u64, v: u64) -> Result<()> {
        let cur = self.refcount(c)?;
        if v > cur {
            self.update_refcount(c * self.cs, self.cs, (v - cur) as i64)
        } else {
            self.update_refcount(c * self.cs, self.cs, -((cur - v) as i64))
        }
    }
}

impl Qcow2 {
    /// Checks the image; `fix` is a mask of [`FIX_LEAKS`] and [`FIX_ERRORS`].
    /// Report lines (QEMU's wording) go to `report`.
    pub fn check(&self, fix: u32, report: &mut dyn FnMut(&str)) -> Result<CheckResult> {
        let mut m = self.quiesce();
        if fix != 0 {
            if !m.writable {
                return Err(Error::ReadOnly(format!(
                    "{}: repairing needs a read-write image",
                    self.name
                )));
            }
            m.flush_all()?;
        }
        let (snap_corruptions, snap_dropped) = m.check_snapshot_table(fix, report)?;
        let file_len = m.file_len()?;
        let mut w = Walk::new(file_len, report);
        w.fix = fix;
        w.res.total_clusters = m.header.size.div_ceil(self.cs);
        let mut refs = m.calculate_refcounts(&mut w)?;
        let pre = w.res.clone();
        let mut highest = 0;
        m.compare_refcounts(&refs, &mut w, 0, &mut highest)?;
        if w.rebuild && fix & FIX_ERRORS != 0 {
            (w.report)("Rebuilding refcount structure");
            let old = w.res.clone();
            m.rebuild_refcount_structure(&mut refs, &mut |_| {})?;
            // The old structure's clusters are free now: the guard on new
            // metadata must not take them for live tables.
            m.rebuild_metadata_map();
            w.res.corruptions = 0;
            w.res.leaks = 0;
            w.rebuild = false;
            // Recount with the new structure in place; the old structure is
            // now leaked, and those leaks are repaired at once.
            let new_len = m.file_len()?;
            let mut w2 = Walk::new(new_len, &mut *w.report);
            let refs2 = m.calculate_refcounts(&mut w2)?;
            // What the rebuild could not mend (a misaligned data cluster)
            // is still a corruption, as QEMU counts it.
            w.res.corruptions = w2.res.corruptions;
            let mut fresh_leaks = 0;
            if fix & FIX_LEAKS != 0 {
                let mut w3 = Walk::new(new_len, &mut *w.report);
                m.compare_refcounts(&refs2, &mut w3, FIX_LEAKS, &mut highest)?;
                if w3.rebuild {
                    (w3.report)("ERROR rebuilt refcount structure is still broken");
                }
                fresh_leaks = w3.res.leaks;
            }
            if w.res.corruptions < old.corruptions {
                w.res.corruptions_fixed += old.corruptions - w.res.corruptions;
            }
            if w.res.leaks < old.leaks {
                w.res.leaks_fixed += old.leaks - w.res.leaks;
            }
            w.res.leaks += fresh_leaks;
        } else if fix != 0 {
            if w.rebuild {
                (w.report)("ERROR need to rebuild refcount structures");
                return Err(Error::Corrupt(format!(
                    "{}: Check failed: the refcount structure must be rebuilt (use -r all)",
                    self.name
                )));
            }
            if w.res.leaks > 0 || w.res.corruptions > 0 {
                w.res = pre;
                m.compare_refcounts(&refs, &mut w, fix, &mut highest)?;
            }
        }
        m.check_oflag_copied(&mut w, fix)?;
        if fix != 0 {
            m.rebuild_metadata_map();
        }
        let mut res = w.res;
        res.corruptions_fixed += snap_dropped;
        if m.fix_snapshot_table(snap_corruptions, fix)? {
            res.corruptions_fixed += snap_corruptions;
        } else {
            res.corruptions += snap_corruptions;
        }
        res.image_end_offset = (highest + 1) * self.cs;
        if fix != 0 {
            m.flush_all()?;
            m.rebuild_metadata_map();
            if res.corruptions == 0 && res.check_errors == 0 {
                // A consistent image is neither dirty nor corrupt any more.
                let flags = m.header.incompatible_features;
                m.header.incompatible_features &= !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
                m.unordered_open = false;
                if flags != m.header.incompatible_features {
                    m.write_header()?;
                }
                m.corrupt = false;
            }
        }
        Ok(res)
    }
}
