//! The metadata state of one open image: header, active L1 table, refcount
//! table, the L2 and refcount-block caches, the cluster allocator, and the
//! write-back that keeps them crash safe.
//!
//! Write ordering, enforced in [`Meta::flush`], [`Meta::evict`] and, for a
//! new L2 table (written with its L1 entry at once, as QEMU does it),
//! [`Meta::l2_for_write`]:
//! 1. Guest data is synced before any L2 table that points at it is written
//!    (in the external data file when the image has one; see `data_file.rs`),
//!    and so is the file length that covers a mapped cluster (metadata
//!    preallocation extends the file before its L2 tables are written).
//! 2. Without lazy refcounts, refcount blocks are written and synced before
//!    the L2 tables (and L1 entries) that depend on them; with lazy
//!    refcounts the dirty bit is on disk before the first L2 change
//!    ([`Meta::mark_dirty`]) and refcount blocks go out only on eviction or
//!    close.
//! 3. A new L2 table is synced before the L1 entry that points at it.
//! 4. Freeing is deferred: an unreference is queued in `pending_unref` and
//!    applied only after the L2/L1 change that dropped the reference is
//!    durable, so the allocator can never hand out a cluster that some
//!    on-disk table still points at.
//! 5. A change that moves refcounts across 1 together with the COPIED
//!    flags that must follow them (internal snapshot create and delete)
//!    has no safe order: either the refcount or the flag reaches the disk
//!    first, and `check` calls the difference a corruption. Such a change
//!    runs between [`Meta::begin_unordered`] and [`Meta::end_unordered`]:
//!    the dirty bit is durable before it starts (lazy refcounts or not)
//!    and cleared only once all of it is durable, so a crash in between
//!    leaves an image the next read-write open repairs (as QEMU repairs a
//!    dirty image); one that fails half done keeps the bit at close
//!    (`unordered_open`). Found by `tests/crash_ops.rs`. A version 2
//!    image has no dirty bit, so there the window stays, as in QEMU.
//! 6. A header rewrite is atomic under 512-byte sector atomicity: when
//!    anything past the first sector changes, a compact header with the
//!    same meaning (no feature name table) that fits in the first sector
//!    is written and synced first, then the rest, then the first sector
//!    ([`Meta::write_header`]). Without it a torn rewrite (the v2
//!    downgrade moves every extension by 32 bytes) left a first sector
//!    whose extensions and backing file name run into the other layout.
//!
//! Everything here runs under the image's metadata mutex; nothing here
//! touches guest data except to copy it during allocation-free operations.

use super::cache::TableCache;
use crate::error::{Error, Result};
use crate::format::entries::{L2Entry, RefcountWidth, COPIED};
use crate::format::header::Header;
use crate::format::*;
use crate::storage::{DebugEvent, Storage};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// What a metadata cluster is, for the overlap guard's message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaKind {
    Header,
    ActiveL1,
    RefcountTable,
    ActiveL2,
    RefcountBlock,
    SnapshotTable,
    InactiveL1,
    InactiveL2,
    CryptoHeader,
    BitmapDirectory,
}

impl MetaKind {
    pub(super) fn describe(self) -> &'static str {
        match self {
            MetaKind::Header => "qcow2_header",
            MetaKind::ActiveL1 => "active L1 table",
            MetaKind::RefcountTable => "refcount table",
            MetaKind::ActiveL2 => "active L2 table",
            MetaKind::RefcountBlock => "refcount block",
            MetaKind::SnapshotTable => "snapshot table",
            MetaKind::InactiveL1 => "inactive L1 table",
            MetaKind::InactiveL2 => "inactive L2 table",
            MetaKind::CryptoHeader => "encryption header",
            MetaKind::BitmapDirectory => "bitmap directory",
        }
    }
}

/// Which cache a write-back concerns.
#[derive(Clone, Copy)]
enum Which {
    L2,
    Refblock,
}

pub struct Meta {
    pub file: Arc<dyn Storage>,
    /// The external data file, when guest data lives there (`data_file.rs`).
    pub data_file: Option<Arc<dyn Storage>>,
    pub name: String,
    pub header: Header,
    pub cb: u32,
    pub cs: u64,
    pub l2_bits: u32,
    /// 128-bit L2 entries with subcluster bitmaps (see format::subcluster).
    pub ext_l2: bool,
    pub rw: RefcountWidth,
    pub rb_bits: u32,
    pub l1: Vec<u64>,
    pub l1_dirty: BTreeSet<usize>,
    pub reftable: Vec<u64>,
    pub l2_cache: TableCache,
    pub rb_cache: TableCache,
    pub free_cluster_index: u64,
    /// (host offset, byte length, punch a hole once free)
    pub pending_unref: Vec<(u64, u64, bool)>,
    /// Some queued unreference frees a cluster (it dropped a COPIED entry):
    /// the next guest allocation flushes first so that it can reuse the
    /// space instead of growing the file, as QEMU's allocator would.
    pub frees_pending: bool,
    /// Clusters allocated for guest writes since the last flush the user
    /// asked for, and whether those flushes come after (nearly) every
    /// write: a write-back user that flushes like a writethrough one (NBD
    /// FUA, a C caller pairing bdrv_pwrite with bdrv_flush) then gets the
    /// writethrough allocation path (rule 1's zero-tail exception).
    pub allocs_since_flush: u64,
    pub flush_follows_writes: bool,
    pub metadata: HashMap<u64, MetaKind>,
    pub lazy: bool,
    pub writable: bool,
    pub corrupt: bool,
    /// File length at the last sync.
    pub durable_end: u64,
    /// End of everything ever allocated (so possibly written): the file
    /// past it is a hole that reads as zeros, durably so below `durable_end`.
    pub written_end: u64,
    /// Some L2 change made since the last sync points at data whose
    /// absence after a crash would be visible (see `sync_before_l2`).
    pub data_sync_needed: bool,
    /// File length before `reserve_zero_tail` first extended it.
    pub extended_from: Option<u64>,
    /// Where the next compressed cluster may start (0: in a new cluster).
    pub free_byte_offset: u64,
    /// Internal snapshots, as the snapshot table lists them.
    pub snapshots: Vec<crate::format::snapshot::Snapshot>,
    /// (offset, length) of the snapshot table.
    pub snapshot_table: (u64, u64),
    /// (offset, bytes) of the snapshot L1 tables that fail QEMU's check:
    /// the overlap guard keeps guest data off them as QEMU's does, by
    /// their raw values.
    pub invalid_inactive_l1: Vec<(u64, u64)>,
    /// QEMU's `overlap-check.inactive-l2` (see `inactive_l2.rs`).
    pub check_inactive_l2: bool,
    /// Host clusters of the snapshots' L2 tables, while `check_inactive_l2`.
    pub inactive_l2: HashSet<u64>,
    /// What the (check-mode) open dropped from the snapshot table.
    pub snapshot_issues: crate::format::snapshot::TableIssues,
    /// How many times the refcount table moved (see `alloc_clusters`).
    pub reftable_moves: u64,
    /// A change begun with [`Meta::begin_unordered`] has not ended: it
    /// failed half done, so close keeps the dirty bit for the next open's
    /// repair.
    pub unordered_open: bool,
    /// Guest clusters with a request in flight (see `Qcow2::lock_clusters`).
    pub inflight: HashSet<u64>,
}

impl Meta {
    pub fn rb_cache_capacity(&self) -> usize {
        self.rb_cache.capacity()
    }

    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    pub(super) fn io(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("{}: {what}", self.name), e)
    }

    /// Tells the host file where the engine is (blkdebug events).
    pub fn event(&self, ev: DebugEvent) {
        self.file.debug_event(ev);
    }

    /// Writes metadata. Outside the header cluster a write first passes
    /// the inactive-L2 check's validation of the snapshot L1 tables, as
    /// QEMU's pre-write overlap check runs before every metadata write but
    /// the header's.
    pub fn write_file(&self, buf: &[u8], off: u64, what: &str) -> Result<()> {
        if off >= self.cs {
            self.check_snapshot_l1_tables()?;
        }
        self.file.write_at(buf, off).map_err(|e| self.io(what, e))
    }

    pub fn read_file(&self, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
        self.file.read_at(buf, off).map_err(|e| self.io(what, e))
    }

    /// Reads a table of `bytes` bytes of big-endian 64-bit entries.
    pub fn read_table(&self, off: u64, bytes: u64, what: &str) -> Result<Vec<u64>> {
        let mut b = vec![0u8; bytes as usize];
        self.read_file(&mut b, off, what)?;
        Ok(decode_table(&b))
    }

    pub fn sync(&mut self) -> Result<()> {
        self.file.sync().map_err(|e| self.io("sync", e))?;
        self.durable_end = self.file_len()?;
        Ok(())
    }

    pub fn file_len(&self) -> Result<u64> {
        self.file.len().map_err(|e| self.io("stat", e))
    }

    // ---- overlap guard and corruption --------------------------------------------

    /// Rebuilds the map of metadata clusters the overlap guard protects.
    pub fn rebuild_metadata_map(&mut self) {
        let snap_table = self.snapshot_table;
        let cs = self.cs;
        // A snapshot whose L1 table fails QEMU's check (its size or offset
        // may be anything) is kept as a range, not cluster by cluster.
        let (snapshots, invalid): (Vec<_>, Vec<_>) = self
            .snapshots
            .iter()
            .filter(|s| s.l1_size > 0)
            .partition(|s| s.check_l1(cs).is_ok());
        let snapshots: Vec<(u64, u32)> = snapshots
            .iter()
            .map(|s| (s.l1_table_offset, s.l1_size))
            .collect();
        self.invalid_inactive_l1 = invalid
            .iter()
            .map(|s| (s.l1_table_offset, s.l1_size as u64 * 8))
            .collect();
        let mut m = HashMap::new();
        m.insert(0, MetaKind::Header);
        let range = |m: &mut HashMap<u64, MetaKind>, off: u64, len: u64, k: MetaKind| {
            if len == 0 {
                return;
            }
            for c in off / cs..(off + len).div_ceil(cs) {
                m.entry(c).or_insert(k);
            }
        };
        range(
            &mut m,
            self.header.l1_table_offset,
            self.l1.len() as u64 * 8,
            MetaKind::ActiveL1,
        );
        range(
            &mut m,
            self.header.refcount_table_offset,
            self.header.refcount_table_clusters as u64 * cs,
            MetaKind::RefcountTable,
        );
        range(&mut m, snap_table.0, snap_table.1, MetaKind::SnapshotTable);
        if let Some((off, len)) = self.header.crypto_header {
            // Untrusted: only the part inside the file can be written over.
            let len = len.min(self.durable_end.saturating_sub(off));
            range(&mut m, off, len, MetaKind::CryptoHeader);
        }
        if let Some((off, len)) = super::bitmaps::directory_region(&self.header) {
            range(&mut m, off, len, MetaKind::BitmapDirectory);
        }
        for &(off, size) in &snapshots {
            range(&mut m, off, size as u64 * 8, MetaKind::InactiveL1);
        }
        for &e in &self.l1 {
            let o = e & OFFSET_MASK;
            if o != 0 {
                m.entry(o / cs).or_insert(MetaKind::ActiveL2);
            }
        }
        for &e in &self.reftable {
            let o = e & REFT_OFFSET_MASK;
            if o != 0 {
                m.entry(o / cs).or_insert(MetaKind::RefcountBlock);
            }
        }
        self.metadata = m;
        self.load_inactive_l2();
    }

    /// Refuses a guest-data write that would land on metadata.
    pub fn check_overlap(&mut self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_snapshot_l1_tables()?;
        let (first, end) = (off / self.cs, (off + len).div_ceil(self.cs));
        let (lo, hi) = (first * self.cs, end * self.cs);
        let invalid_l1 = self
            .invalid_inactive_l1
            .iter()
            .any(|&(o, l)| o < hi && lo < o.saturating_add(l));
        for c in first..end {
            let k = self.metadata.get(&c).copied().or_else(|| {
                if invalid_l1 {
                    Some(MetaKind::InactiveL1)
                } else {
                    self.inactive_l2
                        .contains(&c)
                        .then_some(MetaKind::InactiveL2)
                }
            });
            if let Some(k) = k {
                return Err(self.signal_corruption(&format!(
                    "Preventing invalid write on metadata (overlaps with {})",
                    k.describe()
                )));
            }
        }
        Ok(())
    }

    /// Marks the image corrupt (on a writable image) and returns the error
    /// the failing request gets.
    pub fn signal_corruption(&mut self, reason: &str) -> Error {
        if self.writable && !self.corrupt {
            crate::log::warn(&format!(
                "qcow2: Marking image as corrupt: {reason}; further corruption events will be suppressed"
            ));
            self.corrupt = true;
            self.header.incompatible_features |= INCOMPAT_CORRUPT;
            if let Ok(b) = self.header.encode() {
                let _ = self
                    .write_file(&b, 0, "write header")
                    .and_then(|_| self.sync());
            }
        } else if !self.writable {
            crate::log::warn(&format!(
                "qcow2: Image is corrupt: {reason}; further non-fatal corruption events will be suppressed"
            ));
        }
        Error::Corrupt(format!("{}: {reason}", self.name))
    }

    pub fn ensure_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly(format!(
                "{}: image is opened read-only",
                self.name
            )));
        }
        if self.corrupt {
            return Err(Error::Corrupt(format!(
                "{}: image is marked corrupt; no further writes",
                self.name
            )));
        }
        Ok(())
    }

    // ---- caches --------------------------------------------------------------------

    /// Loads an L2 table into the cache (validating where it points).
    pub fn load_l2(&mut self, off: u64) -> Result<()> {
        if self.l2_cache.contains(off) {
            return Ok(());
        }
        match self.metadata.get(&(off / self.cs)) {
            Some(MetaKind::ActiveL2) | None => {}
            Some(k) => {
                let k = k.describe();
                return Err(
                    self.signal_corruption(&format!("L2 table at {off:#x} overlaps with {k}"))
                );
            }
        }
        if off + self.cs > self.file_len()? {
            return Err(self.signal_corruption(&format!(
                "L2 table offset {off:#x} points past the end of the file"
            )));
        }
        let mut data = self.l2_cache.buffer(self.cs as usize);
        self.event(DebugEvent::L2Load);
        self.read_file(&mut data, off, "read L2 table")?;
        self.evict_l2_if_full()?;
        self.l2_cache.insert(off, data, false);
        Ok(())
    }

    fn evict_l2_if_full(&mut self) -> Result<()> {
        if let Some((victim, dirty)) = self.l2_cache.victim() {
            if dirty {
                // Rules 1 and 2 of the module comment. The sync they cost
                // is paid once for every dirty table, not once per
                // eviction: all of them are written back now, so the next
                // evictions find clean victims.
                self.sync_before_l2()?;
                self.write_dirty_l2()?;
            }
            self.l2_cache.evict(victim);
        }
        Ok(())
    }

    /// `ti` is the refcount-table index the offset came from, named in the
    /// corruption message as QEMU names it.
    pub(super) fn load_refblock(&mut self, off: u64, ti: u64) -> Result<()> {
        if self.rb_cache.contains(off) {
            return Ok(());
        }
        if off & (self.cs - 1) != 0 {
            return Err(self.signal_corruption(&format!(
                "Refblock offset {off:#x} unaligned (reftable index: {ti:#x})"
            )));
        }
        // Checked: a refcount table entry may hold any offset below 2^64.
        let len = self.file_len()?;
        if off.checked_add(self.cs).is_none_or(|end| end > len) {
            return Err(self.signal_corruption(&format!(
                "Refblock offset {off:#x} points past the end of the file"
            )));
        }
        let mut data = self.rb_cache.buffer(self.cs as usize);
        self.read_file(&mut data, off, "read refcount block")?;
        self.evict_refblock_if_full()?;
        self.rb_cache.insert(off, data, false);
        Ok(())
    }

    pub(super) fn evict_refblock_if_full(&mut self) -> Result<()> {
        if let Some((victim, dirty)) = self.rb_cache.victim() {
            if dirty {
                // A refcount block has no prerequisite: increments may always
                // reach the disk first, and decrements are only applied to
                // the cache once the dropped references are durable.
                self.write_slot(Which::Refblock, victim)?;
            }
            self.rb_cache.evict(victim);
        }
        Ok(())
    }

    pub(super) fn write_refblocks(&mut self) -> Result<()> {
        for off in self.rb_cache.dirty_offsets() {
            self.write_slot(Which::Refblock, off)?;
        }
        Ok(())
    }

    /// Writes the changed part of a cached table and marks it clean.
    fn write_slot(&mut self, which: Which, off: u64) -> Result<()> {
        self.file.debug_event(match which {
            Which::L2 => DebugEvent::L2Update,
            Which::Refblock => DebugEvent::RefblockUpdatePart,
        });
        self.check_snapshot_l1_tables()?;
        let (cache, what) = match which {
            Which::L2 => (&mut self.l2_cache, "write L2 table"),
            Which::Refblock => (&mut self.rb_cache, "write refcount block"),
        };
        let slot = cache.get(off).unwrap();
        if let Some((lo, hi)) = slot.dirty_range() {
            self.file
                .write_at(&slot.data[lo..hi], off + lo as u64)
                .map_err(|e| Error::io(format!("{}: {what}", self.name), e))?;
        }
        cache.mark_clean(off);
        Ok(())
    }

    /// Writes every dirty L2 table; the caller has met its prerequisites
    /// (rules 1 and 2).
    fn write_dirty_l2(&mut self) -> Result<()> {
        for off in self.l2_cache.dirty_offsets() {
            self.write_slot(Which::L2, off)?;
        }
        Ok(())
    }

    /// Makes what an L2 write depends on durable: guest data (rule 1,
    /// unless every new mapping points at never-written clusters over
    /// guest zeros) and, without lazy refcounts, the refcount blocks
    /// (rule 2). One sync serves both.
    pub(super) fn sync_before_l2(&mut self) -> Result<()> {
        if self.data_sync_needed {
            self.sync_data()?;
        }
        if !self.lazy {
            self.write_refblocks()?;
            self.sync()?;
        } else if self.data_sync_needed && !self.has_data_file() {
            self.sync()?;
        }
        self.data_sync_needed = false;
        Ok(())
    }

    // ---- L1 / L2 -----------------------------------------------------------------

    /// Byte offset of the L2 entry of `gc` inside its table.
    fn l2_slot(&self, gc: u64) -> usize {
        ((gc & (self.l2_entries() - 1)) * l2_entry_bytes(self.ext_l2)) as usize
    }

    /// The cached L2 table covering `gc`, if one does (None: no L2 table).
    fn l2_table_of(&mut self, gc: u64) -> Result<Option<u64>> {
        let l1i = (gc >> self.l2_bits) as usize;
        if l1i >= self.l1.len() {
            return Ok(None);
        }
        let off = self.l1[l1i] & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        self.load_l2(off)?;
        Ok(Some(off))
    }

    /// The raw L2 entry of a guest cluster (0 if no L2 table covers it);
    /// with extended L2 entries, its first word.
    pub fn l2_entry(&mut self, gc: u64) -> Result<u64> {
        Ok(self.l2_pair(gc)?.0)
    }

    /// The L2 entry of a guest cluster and its subcluster bitmap (0 for
    /// standard entries).
    pub fn l2_pair(&mut self, gc: u64) -> Result<(u64, u64)> {
        let Some(off) = self.l2_table_of(gc)? else {
            return Ok((0, 0));
        };
        let at = self.l2_slot(gc);
        let data = &self.l2_cache.get(off).unwrap().data;
        let bitmap = if self.ext_l2 { be64(data, at + 8) } else { 0 };
        Ok((be64(data, at), bitmap))
    }

    pub fn decode(&self, raw: u64) -> L2Entry {
        // Bit 0 of an extended entry is not the zero flag: the bitmap is.
        let raw = if self.ext_l2 && raw & entries::COMPRESSED == 0 {
            raw & !entries::ZERO
        } else {
            raw
        };
        let e = L2Entry::decode(raw, self.cb);
        if e == L2Entry::Unallocated && raw & COPIED != 0 && self.has_data_file() {
            // Guest cluster 0 in the external data file (see data_file.rs).
            return L2Entry::Normal {
                host: 0,
                copied: true,
            };
        }
        e
    }

    /// Makes sure the L2 table covering `gc` is allocated and exclusively
    /// the active image's (copying a table shared with a snapshot).
    pub fn l2_for_write(&mut self, gc: u64) -> Result<u64> {
        let l1i = (gc >> self.l2_bits) as usize;
        if l1i >= self.l1.len() {
            return Err(Error::OutOfRange(format!(
                "{}: guest cluster {gc} is beyond the L1 table",
                self.name
            )));
        }
        let e = self.l1[l1i];
        let off = e & OFFSET_MASK;
        if off != 0 && e & COPIED != 0 {
            self.load_l2(off)?;
            return Ok(off);
        }
        if off != 0 && self.refcount(off / self.cs)? == 1 {
            self.load_l2(off)?;
            self.l1[l1i] = off | COPIED;
            self.l1_dirty.insert(l1i);
            return Ok(off);
        }
        let data = if off != 0 {
            self.event(DebugEvent::L2AllocCowRead);
            self.load_l2(off)?;
            let mut copy = self.l2_cache.buffer(self.cs as usize);
            copy.copy_from_slice(&self.l2_cache.get(off).unwrap().data);
            copy
        } else {
            self.l2_cache.buffer(self.cs as usize)
        };
        let new = self.alloc_clusters(1)?;
        if let Err(e) = self.check_new_l2(new) {
            self.free_unlinked(new, self.cs);
            return Err(e);
        }
        if let Err(e) = self.write_new_l2(new, &data) {
            self.free_unlinked(new, self.cs);
            return Err(e);
        }
        self.evict_l2_if_full()?;
        self.l2_cache.insert(new, data, false);
        self.metadata.insert(new / self.cs, MetaKind::ActiveL2);
        self.l1[l1i] = new | COPIED;
        self.event(DebugEvent::L1Update);
        let entry = self.header.l1_table_offset + l1i as u64 * 8;
        if let Err(err) = self.write_file(&self.l1[l1i].to_be_bytes(), entry, "write L1 table") {
            self.l1[l1i] = e;
            self.l2_cache.remove(new);
            self.metadata.remove(&(new / self.cs));
            self.free_unlinked(new, self.cs);
            return Err(err);
        }
        if off != 0 {
            self.pending_unref.push((off, self.cs, false));
        }
        if let Err(err) = self.sync() {
            // The entry may be on disk already: keep the new table, and
            // let the next flush write and sync the entry again.
            self.l1_dirty.insert(l1i);
            return Err(err);
        }
        Ok(new)
    }

    /// Where a new L2 table may go, checked before anything is written
    /// there, as QEMU checks it: never at offset 0 (the allocator hands
    /// out the header's cluster when a damaged refcount block says it is
    /// free), and not over other metadata (the overlap guard; a cluster
    /// that held an active L2 table may hold the new one).
    fn check_new_l2(&mut self, new: u64) -> Result<()> {
        if new == 0 {
            return Err(
                self.signal_corruption("Preventing invalid allocation of L2 table at offset 0")
            );
        }
        match self.metadata.get(&(new / self.cs)).copied() {
            None | Some(MetaKind::ActiveL2) => Ok(()),
            Some(k) => Err(self.signal_corruption(&format!(
                "Preventing invalid write on metadata (overlaps with {})",
                k.describe()
            ))),
        }
    }

    /// Refuses freshly allocated clusters that are known metadata: the
    /// allocator hands them out when a damaged refcount structure says
    /// they are free, and writing a new table there would destroy what
    /// they hold (a snapshot's L1 copy over the header, a bitmap table over
    /// an L2 table). QEMU's overlap check refuses these writes with the
    /// same message. The run is given back and the image marked corrupt.
    /// A cluster of the map's active L2 tables counts only while the
    /// active L1 table still points at it (a freed L2 table's cluster may
    /// be reused).
    pub fn check_fresh(&mut self, off: u64, n: u64) -> Result<()> {
        let first = off / self.cs;
        for c in first..first + n {
            if let Some(k) = self.metadata_at(c) {
                self.free_unlinked(off, n * self.cs);
                return Err(self.signal_corruption(&format!(
                    "Preventing invalid write on metadata (overlaps with {})",
                    k.describe()
                )));
            }
        }
        Ok(())
    }

    /// What metadata cluster `c` holds, for a cluster the allocator
    /// calls free (see [`Meta::check_fresh`]).
    pub(super) fn metadata_at(&self, c: u64) -> Option<MetaKind> {
        match self.metadata.get(&c).copied() {
            Some(MetaKind::ActiveL2) => self
                .l1
                .iter()
                .any(|&e| e & OFFSET_MASK != 0 && (e & OFFSET_MASK) / self.cs == c)
                .then_some(MetaKind::ActiveL2),
            Some(k) => Some(k),
            None => self
                .inactive_l2
                .contains(&c)
                .then_some(MetaKind::InactiveL2),
        }
    }

    /// Allocates `n` clusters for new metadata, refusing clusters that
    /// already hold some ([`Meta::check_fresh`]).
    pub fn alloc_metadata(&mut self, n: u64) -> Result<u64> {
        let off = self.alloc_clusters(n)?;
        self.check_fresh(off, n)?;
        Ok(off)
    }

    /// Writes a new L2 table as QEMU's l2_allocate() does, before anything
    /// points at it: its refcount durable (lazy refcounts or not), then
    /// the table itself durable (rule 3), so that the L1 entry can follow
    /// at once.
    fn write_new_l2(&mut self, new: u64, data: &[u8]) -> Result<()> {
        self.write_refblocks()?;
        self.sync()?;
        self.event(DebugEvent::L2AllocWrite);
        self.event(DebugEvent::L2Update);
        self.write_file(data, new, "write L2 table")?;
        self.sync()
    }

    /// Sets the raw L2 entry of `gc` (and, with extended L2 entries, its
    /// subcluster bitmap; ignored otherwise); the table must come from
    /// `l2_for_write`. Conservatively, the next L2 write-back waits for
    /// guest data to be durable.
    pub fn set_l2_entry(&mut self, l2_off: u64, gc: u64, raw: u64, bitmap: u64) {
        self.data_sync_needed = true;
        self.set_l2_entry_unordered(l2_off, gc, raw, bitmap);
    }

    /// Sets an L2 entry that may reach the disk before the data it maps:
    /// only for a never-written host cluster inside the durable file length
    /// (see [`Meta::reserve_zero_tail`]) mapped over guest bytes that read
    /// as zeros, where a crash that loses the data still shows zeros, the
    /// old contents, and the entry still points inside the file.
    pub fn set_l2_entry_unordered(&mut self, l2_off: u64, gc: u64, raw: u64, bitmap: u64) {
        let at = self.l2_slot(gc);
        let ext = self.ext_l2;
        let slot = self.l2_cache.get(l2_off).unwrap();
        put64(&mut slot.data, at, raw);
        if ext {
            put64(&mut slot.data, at + 8, bitmap);
            slot.touch(at, at + 16);
        } else {
            slot.touch(at, at + 8);
        }
    }

    /// Gives back clusters that were allocated but never linked into any
    /// table (a write that failed before its L2 update): nothing on disk or
    /// in the caches points at them, so rule 4 does not apply and they can
    /// be reused at once, as QEMU reuses them.
    pub fn free_unlinked(&mut self, off: u64, len: u64) {
        // If the refcount block cannot be read now, they leak: no harm.
        let _ = self.update_refcount(off, len, -1);
    }

    /// Queues the release of whatever host storage an old L2 entry held
    /// (a data cluster of an external data file is released at once).
    pub fn unref_entry(&mut self, raw: u64, punch: bool) -> Result<()> {
        if self.has_data_file() {
            return self.release_data_cluster(raw, punch);
        }
        if let Some((off, len)) = self.decode(raw).host_range() {
            let len = if len == 0 { self.cs } else { len };
            // A compressed cluster dropped by a discard or an unmapping
            // zero write is reusable at once in QEMU too (not one a
            // copy-on-write replaced).
            self.frees_pending |= raw & COPIED != 0 || (punch && raw & entries::COMPRESSED != 0);
            self.pending_unref.push((off, len, punch));
        }
        Ok(())
    }

    /// With lazy refcounts, puts the dirty bit on disk before the first
    /// L2 change that depends on refcounts not yet written.
    pub fn mark_dirty(&mut self) -> Result<()> {
        if self.lazy && self.header.incompatible_features & INCOMPAT_DIRTY == 0 {
            self.header.incompatible_features |= INCOMPAT_DIRTY;
            let w = self.header.incompatible_features.to_be_bytes();
            self.write_file(&w, 72, "mark image dirty")?;
            self.sync()?;
        }
        Ok(())
    }

    /// Puts the dirty bit on disk (synced), with or without lazy refcounts,
    /// before a change of refcounts *and* COPIED flags that no write order
    /// keeps consistent at every point (rule 5 of the module comment).
    /// Returns whether this call set it, for [`Meta::end_unordered`].
    pub fn begin_unordered(&mut self) -> Result<bool> {
        self.unordered_open = true;
        // A version 2 header has no feature bits: bytes 72.. are its
        // extensions (backing format, ...), which writing the bit would
        // destroy. Such an image keeps QEMU's window (a crash in between
        // leaves what `check -r` mends), as it has no way to say "dirty".
        if self.is_dirty() || self.header.version < 3 {
            return Ok(false);
        }
        self.header.incompatible_features |= INCOMPAT_DIRTY;
        let w = self.header.incompatible_features.to_be_bytes();
        self.write_file(&w, 72, "mark image dirty")?;
        self.sync()?;
        Ok(true)
    }

    /// Ends what [`Meta::begin_unordered`] began: everything written back
    /// and durable, then the dirty bit cleared (synced) if that call set it
    /// and refcounts are not lazy (lazy ones keep it until close).
    pub fn end_unordered(&mut self, set: bool) -> Result<()> {
        self.flush_all()?;
        self.unordered_open = false;
        if set && !self.lazy {
            self.header.incompatible_features &= !INCOMPAT_DIRTY;
            let w = self.header.incompatible_features.to_be_bytes();
            self.write_file(&w, 72, "mark image clean")?;
            self.sync()?;
        }
        Ok(())
    }

    pub fn is_dirty(&self) -> bool {
        self.header.incompatible_features & INCOMPAT_DIRTY != 0
    }

    // ---- write-back ----------------------------------------------------------------

    /// Writes every dirty table in dependency order and makes it durable;
    /// then applies the deferred unreferences (rule 4).
    pub fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let tables_dirty = self.l2_cache.has_dirty() || !self.l1_dirty.is_empty();
        if tables_dirty {
            self.sync_before_l2()?; // rules 1 and 2
            self.write_dirty_l2()?;
            if !self.l1_dirty.is_empty() {
                self.sync()?; // rule 3
                self.write_l1_entries()?;
            }
        }
        if !self.pending_unref.is_empty() {
            self.sync()?; // rule 4
            let pending = std::mem::take(&mut self.pending_unref);
            self.frees_pending = false;
            // Adjacent ranges are punched in one request, as QEMU merges
            // its queued discards: fewer, larger holes in the host file.
            let mut punches: Vec<(u64, u64)> = Vec::new();
            for &(off, len, punch) in &pending {
                self.event(DebugEvent::ClusterFree);
                self.update_refcount(off, len, -1)?;
                if punch {
                    match punches.last_mut() {
                        Some(last) if last.0 + last.1 == off => last.1 += len,
                        _ => punches.push((off, len)),
                    }
                }
            }
            for (off, len) in punches {
                self.punch_if_free(off, len)?;
            }
        }
        if !self.lazy {
            self.write_refblocks()?;
        }
        self.sync_data()?;
        self.sync()
    }

    /// The common writethrough flush with lazy refcounts, split so that its
    /// sync runs without the metadata lock: when every dirty L2 entry may
    /// precede its data (rule 1's exception), no L1 entry and no unref is
    /// waiting and refcounts stay in memory (rule 2 with lazy refcounts),
    /// the whole flush is "write the L2 tables, then sync", and nothing
    /// orders the sync against requests that start meanwhile. Returns false,
    /// having written nothing, when [`Meta::flush`] is needed instead.
    pub fn write_l2_for_unlocked_sync(&mut self) -> Result<bool> {
        if !self.writable {
            return Ok(true);
        }
        // With an external data file, the data file must be synced before
        // the L2 tables (rule 1): only the full flush does that.
        if !self.lazy
            || self.data_sync_needed
            || self.has_data_file()
            || !self.l1_dirty.is_empty()
            || !self.pending_unref.is_empty()
        {
            return Ok(false);
        }
        self.write_dirty_l2()?;
        Ok(true)
    }

    /// Records a flush the user asked for (see `flush_follows_writes`).
    pub fn note_user_flush(&mut self) {
        /// At most this many clusters allocated between two flushes make
        /// the flushes "after every write" (2 MiB with 64 KiB clusters).
        const FEW: u64 = 32;
        if self.allocs_since_flush > 0 {
            self.flush_follows_writes = self.allocs_since_flush <= FEW;
            self.allocs_since_flush = 0;
        }
    }

    /// Writes the refcount blocks too, so that nothing is left dirty (close,
    /// and before the dirty bit is cleared).
    pub fn flush_all(&mut self) -> Result<()> {
        self.flush()?;
        self.write_refblocks()?;
        self.sync()
    }

    fn write_l1_entries(&mut self) -> Result<()> {
        while let Some(&i) = self.l1_dirty.first() {
            let off = self.header.l1_table_offset + i as u64 * 8;
            self.event(DebugEvent::L1Update);
            // A failed entry stays dirty for the next flush.
            self.write_file(&self.l1[i].to_be_bytes(), off, "write L1 table")?;
            self.l1_dirty.remove(&i);
        }
        Ok(())
    }

    pub(super) fn punch_if_free(&mut self, off: u64, len: u64) -> Result<()> {
        let first = off / self.cs;
        let last = (off + len - 1) / self.cs;
        // Runs of free clusters, each punched in one request.
        let mut run: Option<u64> = None;
        for c in first..=last + 1 {
            let free = c <= last && self.refcount(c)? == 0;
            match (free, run) {
                (true, None) => run = Some(c),
                (false, Some(s)) => {
                    self.file
                        .punch_hole(s * self.cs, (c - s) * self.cs)
                        .map_err(|e| self.io("discard", e))?;
                    run = None;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Replaces the active L1 table with a larger one of `new_size` entries.
    pub fn grow_l1(&mut self, new_size: u64) -> Result<()> {
        if new_size * 8 > MAX_L1_SIZE_BYTES {
            return Err(Error::TooLarge(format!(
                "{}: Failed to grow the L1 table: File too large",
                self.name
            )));
        }
        self.flush()?;
        let bytes = new_size * 8;
        self.event(DebugEvent::L1GrowAllocTable);
        let new = self.alloc_metadata(bytes.div_ceil(self.cs))?;
        let mut table = self.l1.clone();
        table.resize(new_size as usize, 0);
        let b = encode_table(&table, bytes as usize);
        // Refcounts of the new table first, then the table, then the header.
        if !self.lazy {
            self.write_refblocks()?;
        }
        self.event(DebugEvent::L1GrowWriteTable);
        self.write_file(&b, new, "write L1 table")?;
        self.sync()?;
        self.event(DebugEvent::L1GrowActivateTable);
        let mut hdr = [0u8; 12];
        put32(&mut hdr, 0, new_size as u32);
        put64(&mut hdr, 4, new);
        self.write_file(&hdr, 36, "write header")?;
        self.sync()?;
        let old_off = self.header.l1_table_offset;
        let old_bytes = self.l1.len() as u64 * 8;
        for c in old_off / self.cs..(old_off + old_bytes).div_ceil(self.cs) {
            if self.metadata.get(&c) == Some(&MetaKind::ActiveL1) {
                self.metadata.remove(&c);
            }
        }
        // The header (synced) no longer points at the old table: free it now.
        if old_bytes > 0 {
            self.update_refcount(old_off, old_bytes, -1)?;
        }
        for c in new / self.cs..(new + bytes).div_ceil(self.cs) {
            self.metadata.insert(c, MetaKind::ActiveL1);
        }
        self.header.l1_size = new_size as u32;
        self.header.l1_table_offset = new;
        self.l1 = table;
        Ok(())
    }

    /// Rewrites all of cluster 0 from `self.header`, so that a crash
    /// leaves the old header or the new one (rule 6 of the module comment).
    pub fn write_header(&mut self) -> Result<()> {
        let b = self.header.encode()?;
        // The unit a power cut cannot tear.
        let sector = 512.min(b.len());
        let mut cur = vec![0u8; b.len()];
        let on_disk = self.file_len()? >= b.len() as u64;
        if on_disk {
            self.read_file(&mut cur, 0, "read header")?;
        }
        if on_disk && b[sector..] != cur[sector..] {
            // The layout past the first sector changes (a downgrade, a new
            // backing file name, extensions added or dropped): the old
            // first sector could be torn from its tail. A header with the
            // same meaning that fits in the first sector goes first, alone.
            let compact = self.header.encode_with(false)?;
            if compact[sector..].iter().all(|&x| x == 0) {
                self.write_file(&compact[..sector], 0, "write header")?;
                self.sync()?;
                self.write_file(&b[sector..], sector as u64, "write header")?;
                self.sync()?;
                if b[..sector] != compact[..sector] {
                    self.write_file(&b[..sector], 0, "write header")?;
                    self.sync()?;
                }
                return Ok(());
            }
        }
        self.write_file(&b, 0, "write header")?;
        self.sync()
    }
}
