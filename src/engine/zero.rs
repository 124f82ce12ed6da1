//! Zero writes and discard: whole clusters change their L2 entries (zero
//! flag, or unmapped), partial clusters are written with zeros, and freed
//! host clusters go through the deferred-unreference queue.

use super::meta::Meta;
use super::{BlockStatus, Qcow2};
use crate::error::Result;
use crate::format::entries::{L2Entry, COPIED, ZERO};
use std::ops::RangeInclusive;

impl Qcow2 {
    // ---- zeroes and discard -----------------------------------------------------------

    /// Makes a guest range read as zeros. With `unmap`, whole clusters give
    /// their host storage back; without it, allocated clusters stay
    /// allocated (QEMU's preallocated zero clusters).
    pub fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_range(off, len)?;
        self.lock().ensure_writable()?;
        self.track_write(off, len);
        let end = off + len;
        let (a, b) = self.whole_units(off, end, self.subcluster_size());
        if a >= b {
            self.zero_partial(off, len)?;
        } else {
            if off < a {
                self.zero_partial(off, a - off)?;
            }
            self.zero_clusters(a, b, unmap)?;
            if b < end {
                self.zero_partial(b, end - b)?;
            }
        }
        if self.writethrough {
            self.flush()?;
        }
        Ok(())
    }

    /// The whole clusters inside [off, end) as [a, b) (empty when b <= a);
    /// a partial last cluster at the end of the image counts as whole.
    /// With extended L2 entries, zero writes work on whole subclusters.
    fn whole_clusters(&self, off: u64, end: u64) -> (u64, u64) {
        self.whole_units(off, end, self.cs)
    }

    fn whole_units(&self, off: u64, end: u64, cs: u64) -> (u64, u64) {
        let a = off.div_ceil(cs) * cs;
        let mut b = end / cs * cs;
        if end == self.size() && end > b {
            b = end;
        }
        (a, b.max(a))
    }

    pub(super) fn zero_partial(&self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // QEMU's rule: a cluster (subcluster) that already reads as zeros
        // all over becomes a zero one (v3); otherwise the bytes are written.
        let cs = self.subcluster_size();
        let mut all_zero = true;
        let mut c = off / cs * cs;
        while c < off + len {
            let cend = (c + cs).min(self.size());
            let (st, n) = self.block_status(c, cend - c)?;
            let zero = n >= cend - c
                && matches!(
                    st,
                    BlockStatus::Zero { .. } | BlockStatus::Unallocated { .. }
                );
            if zero && self.version >= 3 {
                self.zero_clusters(c, cend, false)?;
            }
            all_zero &= zero;
            c += cs;
        }
        if all_zero {
            return Ok(());
        }
        let zeros = vec![0u8; len as usize];
        let mut pos = 0;
        while pos < len {
            let n = self.chunk_len(off + pos, len - pos);
            self.write_chunk(&zeros[pos as usize..(pos + n) as usize], off + pos)?;
            pos += n;
        }
        Ok(())
    }

    pub(super) fn zero_clusters(&self, a: u64, b: u64, unmap: bool) -> Result<()> {
        if self.ext_l2 {
            return self.zero_ext(a, b, unmap);
        }
        if self.version < 3 {
            if unmap && self.backing.is_none() {
                return self.unmap_range(a, b, true, true);
            }
            return self.zero_partial_forced(a, b - a);
        }
        self.for_each_claimed_chunk(a, b, |m, pos, n, clusters| {
            m.mark_dirty()?;
            for gc in clusters {
                let raw = m.l2_entry(gc)?;
                let new = match m.decode(raw) {
                    L2Entry::Normal { host, copied: true } if !unmap => host | COPIED | ZERO,
                    L2Entry::Zero { host, copied: true } if !unmap => host | COPIED | ZERO,
                    L2Entry::Zero { host: 0, .. } => continue,
                    _ => ZERO,
                };
                // As QEMU: an entry that already says so is not rewritten
                // (no L2 update for zeros over zeros).
                if new == raw {
                    continue;
                }
                let l2 = m.l2_for_write(gc)?;
                m.set_l2_entry(l2, gc, new, 0);
                if new == ZERO {
                    m.unref_entry(raw, unmap)?;
                }
            }
            self.zero_raw_data(pos, n, unmap)?;
            Ok(true)
        })
    }

    pub(super) fn zero_partial_forced(&self, off: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; self.chunk_len(off, len).min(len) as usize];
        let mut pos = 0;
        while pos < len {
            let n = self.chunk_len(off + pos, len - pos).min(zeros.len() as u64);
            self.write_chunk(&zeros[..n as usize], off + pos)?;
            pos += n;
        }
        Ok(())
    }

    /// Discards whole clusters of a guest range: their host clusters are
    /// freed. Afterwards a v3 image reads zeros there; a v2 image reads the
    /// backing file (or zeros without one), as QEMU does. Partial clusters
    /// at either end are left alone, except a partial last cluster of the
    /// image.
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len)?;
        self.lock().ensure_writable()?;
        self.track_write(off, len);
        if self.version < 3 && self.backing.is_some() {
            // v2 has no zero flag: unmapping would expose the backing
            // file, so QEMU 10 leaves the data alone, and so do we.
            return Ok(());
        }
        let (a, b) = self.whole_clusters(off, off + len);
        if a < b {
            self.unmap_range(a, b, false, true)?;
        }
        if self.writethrough {
            self.flush()?;
        }
        Ok(())
    }

    /// Drops the mapping of whole clusters in [a, b). `full` sets entries to
    /// 0 (unallocated); otherwise QEMU's discard rule applies.
    pub(super) fn unmap_range(&self, a: u64, b: u64, full: bool, punch: bool) -> Result<()> {
        if self.ext_l2 {
            return self.unmap_ext(a, b, full, punch);
        }
        self.for_each_claimed_chunk(a, b, |m, _, _, clusters| {
            for gc in clusters {
                let raw = m.l2_entry(gc)?;
                let e = m.decode(raw);
                let allocated = !matches!(e, L2Entry::Unallocated | L2Entry::Zero { host: 0, .. });
                let new = if full {
                    0
                } else if self.backing.is_some() || allocated {
                    if self.version >= 3 {
                        ZERO
                    } else {
                        0
                    }
                } else {
                    raw
                };
                if new == raw {
                    continue;
                }
                let l2 = m.l2_for_write(gc)?;
                m.set_l2_entry(l2, gc, new, 0);
                m.unref_entry(raw, punch)?;
            }
            Ok(true)
        })
    }

    /// Runs `f(meta, pos, n, clusters)` over [a, b) one chunk at a time
    /// (see `chunk_len`), with the chunk's guest clusters claimed so that
    /// no other request works on them meanwhile; they are released even
    /// when `f` fails. Stops at the first error, or when `f` says Ok(false).
    pub(super) fn for_each_claimed_chunk(
        &self,
        a: u64,
        b: u64,
        mut f: impl FnMut(&mut Meta, u64, u64, RangeInclusive<u64>) -> Result<bool>,
    ) -> Result<()> {
        let mut pos = a;
        while pos < b {
            let n = self.chunk_len(pos, b - pos);
            let first = pos >> self.cb;
            let last = (pos + n - 1) >> self.cb;
            let mut m = self.claim(first, last);
            let r = f(&mut m, pos, n, first..=last);
            self.release(&mut m, first, last);
            if !r? {
                break;
            }
            pos += n;
        }
        Ok(())
    }
}
