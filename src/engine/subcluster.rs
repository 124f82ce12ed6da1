//! Extended L2 entries in the engine: mapping guest ranges at subcluster
//! granularity, and the write plan that allocates a host cluster but
//! writes and marks only the subclusters a request touches.
//!
//! The rules follow QEMU's: a write into a cluster without a host cluster
//! (or a compressed or shared one) gets a new host cluster; its
//! copy-on-write covers the touched subclusters only (for an unallocated
//! cluster), from the first to the last allocated subcluster (a shared
//! cluster), or the whole cluster (a compressed one). A write into a
//! cluster this image owns fills the touched subclusters that are not yet
//! data, in place. Copy-on-write reads the guest view of the old contents
//! (zeros, the backing file, or the old host data). Every subcluster the
//! data write covers becomes "allocated" and loses its "zero" bit, in the
//! same L2 update that links the cluster, after the data (rule 1 of
//! `meta.rs`).

use super::io::{ClusterWrite, CowSource, Run};
use super::meta::Meta;
use super::Qcow2;
use crate::error::Result;
use crate::format::entries::L2Entry;
use crate::format::subcluster::{self, alloc_mask, SubclusterType, SUBCLUSTERS};
use std::sync::atomic::Ordering;

impl Qcow2 {
    /// Bytes per subcluster (the cluster size for standard entries).
    pub(super) fn subcluster_size(&self) -> u64 {
        if self.ext_l2 {
            self.cs / SUBCLUSTERS as u64
        } else {
            self.cs
        }
    }

    /// The granularity at which allocation state changes: QEMU's
    /// allocation and zero-write alignment.
    pub fn allocation_granularity(&self) -> u64 {
        self.subcluster_size()
    }

    /// Guest bytes one L2 table maps.
    pub(super) fn l2_span(&self) -> u64 {
        crate::format::l2_span_ext(self.cb, self.ext_l2)
    }

    /// The host cluster the guest cluster holding `off` has in this image,
    /// if any (with extended L2 entries, whatever its subclusters say).
    pub fn host_cluster_at(&self, off: u64) -> Result<Option<u64>> {
        self.check_range(off, 1)?;
        let mut m = self.lock();
        let raw = m.l2_entry(off >> self.cb)?;
        Ok(match m.decode(raw) {
            // Guest cluster 0 of an external data file is at host 0.
            L2Entry::Normal { host, .. } if host != 0 || self.data.is_some() => Some(host),
            L2Entry::Zero { host, .. } if host != 0 => Some(host),
            _ => None,
        })
    }

    /// True when the image has extended L2 entries (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.ext_l2
    }

    /// The entry pair of `gc`, refused (and the image marked corrupt, as
    /// QEMU does) when it contradicts itself.
    pub(super) fn ext_pair(&self, m: &mut Meta, gc: u64) -> Result<(u64, u64)> {
        self.ext_pair_checked(m, gc, "  ")
    }

    /// [`Qcow2::ext_pair`] with QEMU's spacing of the message: two spaces
    /// before the parenthesis on the read path, one on the write path.
    fn ext_pair_checked(&self, m: &mut Meta, gc: u64, gap: &str) -> Result<(u64, u64)> {
        let (raw, bitmap) = m.l2_pair(gc)?;
        if subcluster::invalid_reason(self.typed_raw(raw), bitmap).is_some() {
            let l2_off = m.l1[(gc >> m.l2_bits) as usize] & crate::format::OFFSET_MASK;
            let index = gc & (m.l2_entries() - 1);
            let index = if index == 0 {
                "0".to_string()
            } else {
                format!("{index:#x}")
            };
            return Err(m.signal_corruption(&format!(
                "Invalid cluster entry found{gap}(L2 offset: {l2_off:#x}, L2 index: {index})"
            )));
        }
        Ok((raw, bitmap))
    }

    /// `raw` as the subcluster decoder should see it: in an external data
    /// file, guest cluster 0 lives at host offset 0, which its COPIED flag
    /// tells apart from "no host cluster" (a stand-in offset bit says so).
    pub(super) fn typed_raw(&self, raw: u64) -> u64 {
        let host_zero = raw & crate::format::OFFSET_MASK == 0;
        if self.data.is_some() && host_zero && raw & crate::format::entries::COPIED != 0 {
            raw | 1 << 9
        } else {
            raw
        }
    }

    /// The subcluster-level view of the entry at guest offset `off`, as a
    /// standard entry: data, zero (keeping the host cluster), unallocated
    /// (also for a subcluster not allocated in its host cluster), compressed.
    pub(super) fn ext_entry_at(&self, m: &mut Meta, off: u64) -> Result<L2Entry> {
        let gc = off >> self.cb;
        let (raw, bitmap) = self.ext_pair(m, gc)?;
        let sc = ((off & (self.cs - 1)) / self.subcluster_size()) as u32;
        let e = m.decode(raw);
        Ok(
            match (
                subcluster::subcluster_type(self.typed_raw(raw), bitmap, sc),
                e,
            ) {
                (SubclusterType::Normal, _) | (SubclusterType::Compressed, _) => e,
                (SubclusterType::ZeroAlloc, L2Entry::Normal { host, copied }) => {
                    L2Entry::Zero { host, copied }
                }
                (SubclusterType::ZeroPlain, _) | (SubclusterType::ZeroAlloc, _) => L2Entry::Zero {
                    host: 0,
                    copied: false,
                },
                _ => L2Entry::Unallocated,
            },
        )
    }

    /// [`Qcow2::map_run`] for extended L2 entries: the longest run from
    /// `off` (inside one L2 table) of subclusters of one kind, data ones
    /// contiguous on the host.
    pub(super) fn map_run_ext(&self, m: &mut Meta, off: u64, max: u64) -> Result<(Run, u64)> {
        let cs = self.cs;
        let table_end = (((off >> self.cb) >> m.l2_bits) + 1) << (m.l2_bits + self.cb);
        let limit = max.min(table_end - off);
        let first = self.classify_sc(m, off)?;
        if let (Run::Compressed { .. }, _) = first {
            return Ok((first.0, (cs - (off & (cs - 1))).min(limit)));
        }
        let mut len = first.1.min(limit);
        while len < limit {
            let at = off + len;
            let (r, n) = self.classify_sc(m, at)?;
            let same = match (first.0, r) {
                // Data(host of the cluster): contiguous when the offsets
                // in the host file keep pace with the guest offsets.
                (Run::Data(a), Run::Data(b)) => b + (at & (cs - 1)) == a + (off & (cs - 1)) + len,
                (Run::Zero, Run::Zero) | (Run::Unallocated, Run::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            len = (len + n).min(limit);
        }
        Ok((first.0, len))
    }

    /// The kind of the subcluster holding `off` and how many bytes from
    /// `off` to the end of its run inside the cluster share it.
    fn classify_sc(&self, m: &mut Meta, off: u64) -> Result<(Run, u64)> {
        let (cs, scs) = (self.cs, self.subcluster_size());
        let gc = off >> self.cb;
        let (raw, bitmap) = self.ext_pair(m, gc)?;
        let host = raw & crate::format::OFFSET_MASK;
        let compressed = raw & crate::format::entries::COMPRESSED != 0;
        if host & (cs - 1) != 0 && !compressed && self.data.is_none() {
            let l2_off = m.l1[(gc >> m.l2_bits) as usize] & crate::format::OFFSET_MASK;
            let index = match gc & (m.l2_entries() - 1) {
                0 => "0".to_string(),
                i => format!("{i:#x}"),
            };
            return Err(m.signal_corruption(&format!(
                "Cluster allocation offset {host:#x} unaligned (L2 offset: {l2_off:#x}, L2 index: {index})"
            )));
        }
        let in_cluster = off & (cs - 1);
        let sc = (in_cluster / scs) as u32;
        let (t, n) = subcluster::subcluster_run(self.typed_raw(raw), bitmap, sc);
        let bytes = (sc as u64 + n as u64) * scs - in_cluster;
        let run = match t {
            SubclusterType::Normal => match self.classify(m, gc)? {
                Run::Data(h) => Run::Data(h),
                r => r,
            },
            SubclusterType::Compressed => self.classify(m, gc)?,
            SubclusterType::ZeroAlloc | SubclusterType::ZeroPlain => Run::Zero,
            _ => Run::Unallocated,
        };
        Ok((run, bytes))
    }

    /// The plan for one cluster of a write to an image with extended L2
    /// entries (see the module comment). `start..end` is the part of the
    /// cluster the request covers.
    pub(super) fn plan_ext_cluster(
        &self,
        m: &mut Meta,
        gc: u64,
        start: u64,
        end: u64,
    ) -> Result<ClusterWrite> {
        let (cs, scs) = (self.cs, self.subcluster_size());
        let (raw, bitmap) = self.ext_pair_checked(m, gc, " ")?;
        let first_sc = (start / scs) as u32;
        let last_sc = ((end - 1) / scs) as u32;
        let mut w = ClusterWrite::new(gc, start, end, raw);
        w.source = CowSource::Guest;
        let typed = self.typed_raw(raw);
        let ty = |sc| subcluster::subcluster_type(typed, bitmap, sc);
        let e = match m.decode(raw) {
            // An external data file holds every cluster at its guest
            // offset: it is written in place, allocated or not.
            _ if self.data.is_some() => L2Entry::Normal {
                host: gc << self.cb,
                copied: raw & crate::format::entries::COPIED != 0,
            },
            e => e,
        };
        match e {
            L2Entry::Normal { host, copied }
                if copied || self.data.is_some() || m.refcount(host / cs)? == 1 =>
            {
                // In place: fill the touched subclusters that are not data.
                w.host = host;
                w.link = !copied;
                let all_data = (first_sc..=last_sc).all(|sc| ty(sc) == SubclusterType::Normal);
                if all_data {
                    w.bitmap = bitmap;
                    return Ok(w);
                }
                w.lo = if ty(first_sc) == SubclusterType::Normal {
                    start
                } else {
                    first_sc as u64 * scs
                };
                w.hi = if ty(last_sc) == SubclusterType::Normal {
                    end
                } else {
                    (last_sc as u64 + 1) * scs
                };
                w.link = true;
            }
            L2Entry::Normal { .. } => {
                // Shared with a snapshot: a new cluster gets the touched
                // subclusters and every allocated one around them.
                let alloc = (bitmap & subcluster::ALL_ALLOC) as u32;
                let from = first_sc.min(alloc.trailing_zeros());
                let to = (last_sc + 1).max(SUBCLUSTERS - alloc.leading_zeros());
                w.lo = (from as u64 * scs).min(start);
                w.hi = (to as u64 * scs).max(end);
            }
            L2Entry::Compressed { .. } => {
                w.lo = 0;
                w.hi = cs;
            }
            _ => {
                w.lo = first_sc as u64 * scs;
                w.hi = (last_sc as u64 + 1) * scs;
            }
        }
        w.fill = true;
        let covered = alloc_mask((w.lo / scs) as u32, w.hi.div_ceil(scs) as u32);
        let old = if matches!(m.decode(raw), L2Entry::Compressed { .. }) {
            0
        } else {
            bitmap
        };
        w.bitmap = (old | covered) & !(covered << 32);
        Ok(w)
    }

    /// Reads the current guest view of bytes `lo..hi` of cluster `gc` for
    /// copy-on-write (the caller holds the cluster's claim, so the mapping
    /// is still the old one).
    pub(super) fn read_guest_view(&self, gc: u64, lo: u64, out: &mut [u8]) -> Result<()> {
        let off = (gc << self.cb) + lo;
        let size = self.size.load(Ordering::Acquire);
        // The tail of a last partial cluster lies past the disk: zeros.
        let n = size.saturating_sub(off).min(out.len() as u64) as usize;
        out[n..].fill(0);
        if n > 0 {
            self.read_mapped(&mut out[..n], off)?;
        }
        Ok(())
    }
}
