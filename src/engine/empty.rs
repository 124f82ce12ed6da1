//! Emptying an image at once (what `qemu-img commit` does to the image it
//! committed): instead of freeing cluster after cluster, a version 3
//! image without snapshots, bitmaps, LUKS encryption or data file gets a
//! fresh minimal layout, as QEMU's qcow2 driver gives it: header, refcount
//! table in cluster 1, its first refcount block in cluster 2, an all-zero
//! L1 table from cluster 3 on, and the file cut after it.
//!
//! The steps, in QEMU's order and with QEMU's blkdebug events (iotest 098
//! injects errors into each): flush the caches; set the dirty bit (the
//! refcounts are about to be wrong, and the next read-write open repairs
//! them); `l1_update`: zero the L1 table in place; `empty_image_prepare`:
//! zero the clusters the new tables take (1 to 3 + L1 clusters);
//! `l1_update` + `reftable_update`: point the header at the new L1 and
//! refcount table (synced); `refblock_alloc`: enter the refcount block
//! into the table (synced); then count the new metadata, clear the dirty
//! bit and truncate the file. A failure in one of the first steps leaves
//! the image dirty with refcounts that no longer describe it, so the
//! session stops writing (as QEMU drops the node's driver) and the next
//! open repairs the image.

use super::cache::TableCache;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::INCOMPAT_DIRTY;
use crate::storage::DebugEvent;
use std::sync::atomic::Ordering;

impl Qcow2 {
    /// Whether [`Qcow2::make_empty`] can lay the image out afresh.
    pub(super) fn can_empty_completely(&self) -> bool {
        let m = self.lock();
        let l1_clusters = (m.l1.len() as u64 * 8).div_ceil(self.cs);
        self.version >= 3
            && m.snapshots.is_empty()
            && self.bitmaps_lock().list.is_empty()
            && 3 + l1_clusters <= 1 << m.rb_bits
            && self.encryption.is_none()
            && self.data.is_none()
    }

    /// See the module comment.
    pub(super) fn make_completely_empty(&self) -> Result<()> {
        let mut m = self.quiesce();
        m.ensure_writable()?;
        m.flush_all()?;
        let cs = self.cs;
        let l1_bytes = m.l1.len() as u64 * 8;
        let l1_clusters = l1_bytes.div_ceil(cs);
        let broken = |m: &mut super::meta::Meta, e: Error| {
            // Refcounts on disk no longer match what the session knows.
            m.writable = false;
            e
        };
        // The dirty bit, even without lazy refcounts.
        m.header.incompatible_features |= INCOMPAT_DIRTY;
        let w = m.header.incompatible_features.to_be_bytes();
        m.write_file(&w, 72, "write header")?;
        m.sync()?;
        m.event(DebugEvent::L1Update);
        let old_l1 = m.header.l1_table_offset;
        let zeros = vec![0u8; cs as usize];
        let zero = |m: &mut super::meta::Meta, off: u64, n: u64| -> Result<()> {
            for c in 0..n {
                m.write_file(&zeros, off + c * cs, "zero metadata")?;
            }
            Ok(())
        };
        if let Err(e) = zero(&mut m, old_l1, l1_clusters) {
            return Err(broken(&mut m, e));
        }
        m.l1.iter_mut().for_each(|e| *e = 0);
        m.l1_dirty.clear();
        m.event(DebugEvent::EmptyImagePrepare);
        if let Err(e) = zero(&mut m, cs, 2 + l1_clusters) {
            return Err(broken(&mut m, e));
        }
        m.event(DebugEvent::L1Update);
        m.event(DebugEvent::ReftableUpdate);
        // l1_table_offset, refcount_table_offset, refcount_table_clusters:
        // header bytes 40..60, one write.
        let mut hdr = [0u8; 20];
        hdr[..8].copy_from_slice(&(3 * cs).to_be_bytes());
        hdr[8..16].copy_from_slice(&cs.to_be_bytes());
        hdr[16..].copy_from_slice(&1u32.to_be_bytes());
        if let Err(e) = m
            .write_file(&hdr, 40, "write header")
            .and_then(|_| m.sync())
        {
            return Err(broken(&mut m, e));
        }
        m.header.l1_table_offset = 3 * cs;
        m.header.refcount_table_offset = cs;
        m.header.refcount_table_clusters = 1;
        m.reftable = vec![0; (cs / 8) as usize];
        m.rb_cache = TableCache::new(m.rb_cache.capacity());
        m.l2_cache = TableCache::new(m.l2_cache.capacity());
        m.pending_unref.clear();
        m.frees_pending = false;
        m.free_byte_offset = 0;
        m.event(DebugEvent::RefblockAlloc);
        let entry = (2 * cs).to_be_bytes();
        if let Err(e) = m
            .write_file(&entry, cs, "write refcount table")
            .and_then(|_| m.sync())
        {
            return Err(broken(&mut m, e));
        }
        m.reftable[0] = 2 * cs;
        m.free_cluster_index = 0;
        m.rebuild_metadata_map();
        let off = m.alloc_clusters_inner(3 + l1_clusters)?;
        if off != 0 {
            return Err(broken(
                &mut m,
                Error::Corrupt(format!(
                    "{}: first cluster in emptied image is in use",
                    self.name
                )),
            ));
        }
        m.write_refblocks()?;
        m.sync()?;
        m.header.incompatible_features &= !INCOMPAT_DIRTY;
        let w = m.header.incompatible_features.to_be_bytes();
        m.write_file(&w, 72, "write header")?;
        m.sync()?;
        let end = (3 + l1_clusters) * cs;
        m.file
            .set_len(end)
            .map_err(|e| Error::io(format!("{}: truncate", self.name), e))?;
        m.durable_end = end;
        m.written_end = end;
        m.extended_from = None;
        m.data_sync_needed = false;
        self.file_end.store(end, Ordering::Release);
        m.rebuild_metadata_map();
        Ok(())
    }
}
