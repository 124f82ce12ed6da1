//! Zero writes and discard on images with extended L2 entries, with
//! QEMU's resulting entries: a whole cluster gets every "zero" bit (and
//! loses its host cluster with unmap, or when it was compressed), a part
//! of a cluster gets the "zero" bits of its subclusters and loses their
//! "allocated" bits, keeping the host cluster. Discard works on whole
//! clusters only, as QEMU's does (its discard granularity is the cluster).

use super::Qcow2;
use crate::error::Result;
use crate::format::entries::{L2Entry, COMPRESSED};
use crate::format::subcluster::{alloc_mask, ALL_ZERO};

impl Qcow2 {
    /// Makes subcluster-aligned guest bytes [a, b) (b may be the end of
    /// the image) read as zeros through their L2 entries, cluster after
    /// cluster. A part of a compressed cluster cannot be: as QEMU, the
    /// whole request is then written with zeros instead (the clusters
    /// already changed included).
    pub(super) fn zero_ext(&self, a: u64, b: u64, unmap: bool) -> Result<()> {
        let (cs, scs, size) = (self.cs, self.subcluster_size(), self.size());
        let mut fallback = false;
        self.for_each_claimed_chunk(a, b, |m, pos, n, clusters| {
            m.mark_dirty()?;
            for gc in clusters {
                let cstart = gc << self.cb;
                let s = pos.max(cstart) - cstart;
                let e = (pos + n).min(cstart + cs) - cstart;
                let (raw, bitmap) = self.ext_pair(m, gc)?;
                let compressed = raw & COMPRESSED != 0;
                let whole = s == 0 && (e == cs || cstart + e >= size);
                let (new_raw, new_bitmap, drop) = if whole {
                    let has_host = compressed
                        || matches!(m.decode(self.typed_raw(raw)), L2Entry::Normal { .. });
                    if compressed || (unmap && has_host) {
                        (0, ALL_ZERO, true)
                    } else {
                        (raw, ALL_ZERO, false)
                    }
                } else if compressed {
                    fallback = true;
                    return Ok(false);
                } else {
                    let mask = alloc_mask((s / scs) as u32, e.div_ceil(scs) as u32);
                    (raw, (bitmap | mask << 32) & !mask, false)
                };
                if (new_raw, new_bitmap) == (raw, bitmap) {
                    continue;
                }
                let l2 = m.l2_for_write(gc)?;
                m.set_l2_entry(l2, gc, new_raw, new_bitmap);
                if drop {
                    m.unref_entry(raw, unmap)?;
                }
            }
            Ok(true)
        })?;
        if fallback {
            self.zero_partial_forced(a, b - a)?;
        }
        Ok(())
    }

    /// Drops the mapping of whole clusters in [a, b): `full` leaves them
    /// unallocated, otherwise they read as zeros afterwards when they had
    /// a host cluster or the image has a backing file (QEMU's discard).
    pub(super) fn unmap_ext(&self, a: u64, b: u64, full: bool, punch: bool) -> Result<()> {
        self.for_each_claimed_chunk(a, b, |m, _, _, clusters| {
            for gc in clusters {
                let (raw, bitmap) = self.ext_pair(m, gc)?;
                let allocated = !matches!(
                    m.decode(self.typed_raw(raw)),
                    L2Entry::Unallocated | L2Entry::Zero { .. }
                );
                let new = if full {
                    (0, 0)
                } else if self.backing.is_some() || allocated {
                    (0, ALL_ZERO)
                } else {
                    (raw, bitmap)
                };
                if new == (raw, bitmap) {
                    continue;
                }
                let l2 = m.l2_for_write(gc)?;
                m.set_l2_entry(l2, gc, new.0, new.1);
                m.unref_entry(raw, punch)?;
            }
            Ok(true)
        })
    }
}
