//! Internal snapshots: create, apply (goto), delete and list, keeping
//! refcounts, COPIED flags and the snapshot table the way QEMU keeps them,
//! so that QEMU reads our snapshots and we read theirs.
//!
//! Ordering: a snapshot's L1 copy and its refcount increments are durable
//! before the table names it; on delete the table stops naming a snapshot
//! (synced) before its clusters lose their references. Create and delete
//! change refcounts and COPIED flags under the dirty bit (rule 5 of
//! meta.rs); apply switches trees through the header, never by a table
//! written in place while the header points at it (see `snapshot_apply`).
//! `tests/crash_ops.rs` cuts the power at every step of each.

use super::meta::Meta;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::entries::{L2Entry, COPIED};
use crate::format::snapshot::{self, Snapshot, MAX_SNAPSHOTS};
use crate::format::*;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

impl Meta {
    /// Adds `addend` (-1, 0 or +1) to the refcount of every L2 table and
    /// data cluster reachable from an L1 table, then sets the COPIED flags
    /// of that tree from the resulting refcounts (QEMU's
    /// update_snapshot_refcount).
    fn update_snapshot_refcount(&mut self, l1_off: u64, l1_size: u32, addend: i64) -> Result<()> {
        let cs = self.cs;
        self.flush()?;
        let active = l1_off == self.header.l1_table_offset;
        let mut l1 = if active {
            self.l1.clone()
        } else {
            self.read_table(l1_off, l1_size as u64 * 8, "read snapshot L1 table")?
        };
        let mut l1_changed = false;
        for e in l1.iter_mut() {
            let l2_off = *e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            self.load_l2(l2_off)?;
            let entries = self.l2_entries() as usize;
            let es = crate::format::l2_entry_bytes(self.ext_l2) as usize;
            for j in 0..entries {
                let raw = be64(&self.l2_cache.get(l2_off).unwrap().data, j * es);
                let new = match self.decode(raw) {
                    L2Entry::Compressed { offset, len } => {
                        if addend > 0 {
                            self.refuse_uncounted(offset)?;
                        }
                        if addend != 0 {
                            self.update_refcount(offset & !511, len + (offset & 511), addend)?;
                        }
                        continue;
                    }
                    L2Entry::Normal { host, .. } | L2Entry::Zero { host, .. } if host != 0 => {
                        if addend > 0 {
                            self.refuse_uncounted(host)?;
                        }
                        if addend != 0 {
                            self.update_refcount(host, cs, addend)?;
                        }
                        if self.refcount(host / cs)? == 1 {
                            raw | COPIED
                        } else {
                            raw & !COPIED
                        }
                    }
                    _ => continue,
                };
                if new != raw {
                    let slot = self.l2_cache.get(l2_off).unwrap();
                    put64(&mut slot.data, j * es, new);
                    slot.touch(j * es, j * es + 8);
                }
            }
            if addend > 0 {
                self.refuse_uncounted(l2_off)?;
            }
            if addend != 0 {
                self.update_refcount(l2_off, cs, addend)?;
            }
            let flagged = if self.refcount(l2_off / cs)? == 1 {
                l2_off | COPIED
            } else {
                l2_off
            };
            if flagged != *e {
                *e = flagged;
                l1_changed = true;
            }
        }
        if active {
            for (i, e) in l1.iter().enumerate() {
                if self.l1[i] != *e {
                    self.l1[i] = *e;
                    self.l1_dirty.insert(i);
                }
            }
        } else if l1_changed {
            self.flush()?;
            self.write_file(&encode_table(&l1, 0), l1_off, "write snapshot L1 table")?;
        }
        self.flush_all()
    }

    /// Refuses a new reference to a cluster no refcount block covers: the
    /// L2 entry naming it is damaged (nothing allocated it), and counting
    /// it would grow the refcount structure to reach it. QEMU's errnos:
    /// EFBIG where the refcount table cannot grow that far, else EAGAIN
    /// (QEMU creates the block, then answers with the errno that makes an
    /// allocating caller search again, and snapshot creation passes it on;
    /// iotest 080). Nothing changes here.
    fn refuse_uncounted(&self, host: u64) -> Result<()> {
        let ti = (host / self.cs) >> self.rb_bits;
        if self
            .reftable
            .get(ti as usize)
            .is_some_and(|&e| e & OFFSET_MASK != 0)
        {
            return Ok(());
        }
        let what = format!("{}: no refcount block covers cluster {host:#x}", self.name);
        if ti.saturating_add(1).saturating_mul(8) > MAX_REFTABLE_SIZE_BYTES {
            return Err(Error::TooLarge(what));
        }
        Err(Error::io(
            what,
            std::io::Error::from_raw_os_error(libc::EAGAIN),
        ))
    }

    /// Writes the snapshot table to new clusters and points the header at
    /// it; the old table is freed once the header no longer names it.
    pub(super) fn write_snapshot_table(&mut self, mut list: Vec<Snapshot>) -> Result<()> {
        for s in &mut list {
            s.extra_size = (24 + s.extra_unknown.len()) as u32;
        }
        if list.len() as u32 > MAX_SNAPSHOTS {
            return Err(Error::TooLarge("Too many snapshots".into()));
        }
        let (bytes, len) = snapshot::encode_table(&list);
        let new_off = if len > 0 {
            let off = self.alloc_metadata((len as u64).div_ceil(self.cs))?;
            self.flush_all()?;
            self.write_file(&bytes[..len], off, "write snapshot table")?;
            self.sync()?;
            off
        } else {
            0
        };
        let mut hdr = [0u8; 12];
        put32(&mut hdr, 0, list.len() as u32);
        put64(&mut hdr, 4, new_off);
        self.write_file(&hdr, 60, "write header")?;
        self.sync()?;
        let (old_off, old_len) = self.snapshot_table;
        self.header.nb_snapshots = list.len() as u32;
        self.header.snapshots_offset = new_off;
        self.snapshots = list;
        self.snapshot_table = (new_off, len as u64);
        if old_len > 0 {
            self.free_clusters_logged(old_off, old_len);
        }
        self.rebuild_metadata_map();
        self.flush_all()
    }

    /// Points the header at another active L1 table and gives the disk
    /// `size` bytes (header bytes 24..48 in one write inside its first
    /// sector, synced), and makes `l1` the active table in memory.
    fn switch_l1(&mut self, off: u64, l1: Vec<u64>, size: u64) -> Result<()> {
        let mut hdr = [0u8; 24];
        put64(&mut hdr, 0, size);
        put32(&mut hdr, 8, self.header.crypt_method);
        put32(&mut hdr, 12, l1.len() as u32);
        put64(&mut hdr, 16, off);
        self.write_file(&hdr, 24, "write header")?;
        self.sync()?;
        self.header.size = size;
        self.header.l1_size = l1.len() as u32;
        self.header.l1_table_offset = off;
        self.l2_cache = super::cache::TableCache::new(self.l2_cache.capacity());
        self.l1 = l1;
        self.rebuild_metadata_map();
        Ok(())
    }

    /// Frees clusters that nothing on disk names any more, as QEMU's
    /// qcow2_free_clusters does: the `cluster_free` event first, and a
    /// failure only logged (the clusters leak; `check -r` finds them). A
    /// range with a cluster whose refcount is already 0 (a table the
    /// header placed past the end of the file) is left alone with EINVAL,
    /// as QEMU's update_refcount undoes such a free, rather than marking
    /// the image corrupt.
    fn free_clusters_logged(&mut self, off: u64, len: u64) {
        self.event(crate::storage::DebugEvent::ClusterFree);
        let first = off / self.cs;
        let end = (off + len).div_ceil(self.cs);
        let r = (first..end)
            .try_fold(true, |ok, c| Ok::<_, Error>(ok && self.refcount(c)? > 0))
            .and_then(|ok| match ok {
                true => self.update_refcount(off, len, -1),
                false => Err(Error::Invalid("refcount underflow".into())),
            });
        if let Err(e) = r {
            let why = std::io::Error::from_raw_os_error(e.errno()).to_string();
            let why = why.split(" (os error").next().unwrap_or_default();
            crate::log::warn(&format!("qcow2_free_clusters failed: {why}"));
        }
    }

    fn find_snapshot(&self, name_or_id: &str) -> Result<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == name_or_id)
            .or_else(|| self.snapshots.iter().position(|s| s.name == name_or_id))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "Could not find snapshot '{name_or_id}' in '{}'",
                    self.name
                ))
            })
    }
}

impl Qcow2 {
    /// Internal snapshots cannot keep guest data that lives in an external
    /// data file (it has no refcounts), so QEMU refuses them there.
    fn refuse_with_data_file(&self) -> Result<()> {
        match &self.data {
            Some(_) => Err(Error::Unsupported(format!(
                "{}: internal snapshots are not supported with an external data file",
                self.name
            ))),
            None => Ok(()),
        }
    }

    /// The internal snapshots, in table order.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.lock().snapshots.clone()
    }

    /// Creates an internal snapshot of the current disk state.
    pub fn snapshot_create(&self, name: &str) -> Result<()> {
        self.snapshot_create_with(None, name, None, 0, 0)
            .map(|_| ())
    }

    /// Creates an internal snapshot with the caller's ID (None or "": the
    /// next free number), date (None: now), VM clock and VM state size, as
    /// QEMU's qcow2_snapshot_create takes them from a QEMUSnapshotInfo. An
    /// ID already in use is refused. With a VM state (`vm_state_size`
    /// bytes written first with [`Qcow2::write_vmstate`], as savevm does)
    /// the snapshot keeps it and the current disk drops its copy, as QEMU
    /// does (left there, it would cost a copy-on-write at the next
    /// savevm). Returns the new table entry.
    pub fn snapshot_create_with(
        &self,
        id: Option<&str>,
        name: &str,
        date: Option<(u32, u32)>,
        vm_clock_nsec: u64,
        vm_state_size: u64,
    ) -> Result<Snapshot> {
        self.refuse_with_data_file()?;
        let mut m = self.quiesce();
        m.ensure_writable()?;
        // Refused before anything is allocated, as QEMU refuses it.
        if m.snapshots.len() >= MAX_SNAPSHOTS as usize {
            return Err(Error::TooLarge(format!(
                "{}: the snapshot table is full ({MAX_SNAPSHOTS} snapshots)",
                self.name
            )));
        }
        // Names need not be unique (qemu-img snapshot -c allows duplicates).
        let id = match id.filter(|i| !i.is_empty()) {
            Some(i) if m.snapshots.iter().any(|s| s.id == i) => {
                return Err(Error::InvalidArgument(format!(
                    "Snapshot ID '{i}' already exists in '{}'",
                    self.name
                )))
            }
            Some(i) => i.to_string(),
            None => (1..)
                .map(|n: u64| n.to_string())
                .find(|id| !m.snapshots.iter().any(|s| &s.id == id))
                .unwrap(),
        };
        m.flush_all()?;
        // The L1 copy, as QEMU writes it (flags included).
        let l1 = m.l1.clone();
        let l1_off = if l1.is_empty() {
            0
        } else {
            m.alloc_metadata((l1.len() as u64 * 8).div_ceil(self.cs))?
        };
        m.flush_all()?;
        if !l1.is_empty() {
            m.write_file(&encode_table(&l1, 0), l1_off, "write snapshot L1 table")?;
        }
        let active_off = m.header.l1_table_offset;
        let active_size = m.l1.len() as u32;
        // Rule 5 of meta.rs: refcounts go to 2 and COPIED flags off.
        let set = m.begin_unordered()?;
        if let Err(e) = m
            .update_snapshot_refcount(active_off, active_size, 1)
            .and_then(|_| m.end_unordered(set))
        {
            // A refusal (a refcount past the width's maximum) changed
            // nothing; an I/O error may have left half the change.
            if !matches!(e, Error::Io { .. }) {
                let _ = m.end_unordered(set);
            }
            // Nothing names the copy: it need not leak.
            if !l1.is_empty() {
                m.free_unlinked(l1_off, l1.len() as u64 * 8);
            }
            return Err(e);
        }
        let (date_sec, date_nsec) = date.unwrap_or_else(|| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            (now.as_secs() as u32, now.subsec_nanos())
        });
        let sn = Snapshot {
            l1_table_offset: l1_off,
            l1_size: l1.len() as u32,
            id,
            name: name.to_string(),
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size: Some(m.header.size),
            icount: Some(0),
            extra_unknown: Vec::new(),
            extra_size: 24,
        };
        let mut list = m.snapshots.clone();
        list.push(sn.clone());
        m.write_snapshot_table(list)?;
        let mapped_end = m.l1.len() as u64 * self.l2_span();
        drop(m);
        if vm_state_size > 0 {
            // Only what the L1 table reaches can be mapped.
            let a = self.vm_state_offset();
            let b = (a + vm_state_size.div_ceil(self.cs) * self.cs).min(mapped_end);
            if a < b {
                self.unmap_range(a, b, false, false)?;
                self.flush()?;
            }
        }
        Ok(sn)
    }

    /// Reverts the disk to a snapshot (by ID or name).
    pub fn snapshot_apply(&self, name_or_id: &str) -> Result<()> {
        let (sn, cur_size) = {
            let mut m = self.quiesce();
            m.ensure_writable()?;
            let i = m.find_snapshot(name_or_id)?;
            self.refuse_with_data_file()?;
            m.snapshots[i].check_l1(self.cs)?;
            m.flush_all()?;
            (m.snapshots[i].clone(), m.header.size)
        };
        // A snapshot of another disk size: the size changes in the same
        // header write that switches trees (below), so that no crash shows
        // the old disk at the new size. The L1 table grows first (that
        // changes no guest view).
        let new_size = sn.disk_size.unwrap_or(cur_size);
        let mut m = self.quiesce();
        if new_size != cur_size {
            self.bitmaps_lock().check_resizable()?;
            if new_size > super::create::max_size(self.cb) {
                return Err(Error::TooLarge(format!(
                    "{}: The image size is too large for file format 'qcow2' (try using a larger cluster size)",
                    self.name
                )));
            }
        }
        let need_l1 = (sn.l1_size as u64).max(new_size.div_ceil(self.l2_span()));
        if need_l1 > m.l1.len() as u64 {
            m.grow_l1(need_l1)?;
        }
        let mut new_l1 = m.read_table(
            sn.l1_table_offset,
            sn.l1_size as u64 * 8,
            "read snapshot L1 table",
        )?;
        new_l1.resize(m.l1.len(), 0);
        // Take the snapshot's references first, then drop the old tree's.
        m.update_snapshot_refcount(sn.l1_table_offset, sn.l1_size, 1)?;
        // Every L2 table of the snapshot now has a second reference, the
        // active one: none is the active disk's alone (its L1 copy still
        // has the flags of the disk it was taken from).
        for e in new_l1.iter_mut() {
            *e &= !COPIED;
        }
        let old_l1 = m.l1.clone();
        let old_off = m.header.l1_table_offset;
        let bytes = old_l1.len() as u64 * 8;
        if bytes > 0 {
            // Not in place at once: a table of more than one sector written
            // over the old one could be torn into a mix of both trees. The
            // new table goes to free clusters first (its refcount durable,
            // then itself) and the header switches to it in one write
            // inside its first sector; the old tree loses its references;
            // then the table is written in place and the header switches
            // back, so that the table ends where QEMU leaves it. Every
            // crash point shows one whole tree.
            let tmp = m.alloc_metadata(bytes.div_ceil(self.cs))?;
            m.flush_all()?;
            let table = encode_table(&new_l1, bytes as usize);
            m.write_file(&table, tmp, "write L1 table")?;
            m.sync()?;
            m.switch_l1(tmp, new_l1, new_size)?;
            self.size.store(new_size, Ordering::Release);
            self.bitmaps_lock().resize(new_size);
            // The old tree, no longer reachable from disk (rule 4 of
            // meta.rs), loses its references.
            m.update_snapshot_refcount(old_off, old_l1.len() as u32, -1)?;
            m.write_file(&table, old_off, "write L1 table")?;
            m.sync()?;
            let l1 = std::mem::take(&mut m.l1);
            m.switch_l1(old_off, l1, new_size)?;
            m.update_refcount(tmp, bytes, -1)?;
        } else if new_size != cur_size {
            // No L1 table: only the size changes.
            m.write_file(&new_size.to_be_bytes(), 24, "write header")?;
            m.sync()?;
            m.header.size = new_size;
            self.size.store(new_size, Ordering::Release);
            self.bitmaps_lock().resize(new_size);
        }
        let n = m.l1.len() as u32;
        m.update_snapshot_refcount(old_off, n, 0)?;
        m.rebuild_metadata_map();
        m.flush_all()
    }

    /// Deletes a snapshot (by ID or name), releasing what only it held.
    pub fn snapshot_delete(&self, name_or_id: &str) -> Result<()> {
        let mut m = self.quiesce();
        m.ensure_writable()?;
        let i = m.find_snapshot(name_or_id)?;
        self.refuse_with_data_file()?;
        // Before the table changes: an entry that fails stays listed.
        m.snapshots[i].check_l1(self.cs)?;
        m.flush_all()?;
        let sn = m.snapshots[i].clone();
        let mut list = m.snapshots.clone();
        list.remove(i);
        // Rule 5 of meta.rs: refcounts drop to 1 and COPIED flags come
        // back. The bit goes first, so that a failing free of the old table
        // (blkdebug's cluster_free) fails the delete where QEMU's does.
        let set = m.begin_unordered()?;
        m.write_snapshot_table(list)?;
        // QEMU's words; the tree's references leak (`check -r` finds them).
        m.update_snapshot_refcount(sn.l1_table_offset, sn.l1_size, -1)
            .map_err(|e| match e {
                Error::Io { source, .. } => {
                    Error::io("Failed to free the cluster and L1 table", source)
                }
                e => e.context("Failed to free the cluster and L1 table"),
            })?;
        if sn.l1_size > 0 {
            m.free_clusters_logged(sn.l1_table_offset, sn.l1_size as u64 * 8);
        }
        let active_off = m.header.l1_table_offset;
        let n = m.l1.len() as u32;
        m.update_snapshot_refcount(active_off, n, 0)?;
        m.rebuild_metadata_map();
        m.end_unordered(set)
    }
}

impl Qcow2 {
    /// Makes a read-only image show an internal snapshot's contents in
    /// place of the active ones (QEMU's bdrv_snapshot_load_tmp, what
    /// `qemu-img convert -l` reads through): the snapshot's L1 table
    /// becomes the one guest reads go through, nothing on disk changes,
    /// and the virtual size stays the active one, as in QEMU. `id` and
    /// `name` must both match when both are given; with neither, nothing
    /// matches. The table is the snapshot's own size, so guest clusters
    /// past it read as unallocated.
    pub fn snapshot_load_tmp(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        let mut m = self.quiesce();
        if m.writable {
            return Err(Error::InvalidArgument(format!(
                "{}: a snapshot can be loaded temporarily only on a read-only image",
                self.name
            )));
        }
        let found = m.snapshots.iter().position(|s| {
            (id.is_some() || name.is_some())
                && id.is_none_or(|i| s.id == i)
                && name.is_none_or(|n| s.name == n)
        });
        let Some(i) = found else {
            return Err(Error::InvalidArgument("Can't find snapshot".into()));
        };
        let sn = m.snapshots[i].clone();
        sn.check_l1(self.cs)?;
        let l1 = if sn.l1_size == 0 {
            Vec::new()
        } else {
            m.read_table(
                sn.l1_table_offset,
                sn.l1_size as u64 * 8,
                "read snapshot L1 table",
            )?
        };
        m.l2_cache = super::cache::TableCache::new(m.l2_cache.capacity());
        m.l1 = l1;
        Ok(())
    }
}
