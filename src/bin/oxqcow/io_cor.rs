//! What sits in front of the image of an `oxqcow io` device: blkdebug
//! nodes on top of it (each request passes their armed errors; writes
//! raise `pwritev`/`pwritev_done` on them, as QEMU's block layer does) and
//! copy-on-read, done as QEMU's block layer does it: the request is
//! widened to whole clusters (subclusters with extended L2 entries);
//! ranges the image already has (data or zero clusters) are read as they
//! are; the others are read (at most 16 MiB at a time), the `cor_write`
//! event is raised on the top blkdebug node, and they are written into
//! the image — as zero clusters when all zeros — without the flush a
//! writethrough write would get (the guest data does not change). Over a
//! compress filter the copies are compressed writes (`io_compress.rs`).

use crate::io_open::{Backend, Dev};
use oxqcow::storage::blkdebug::IoType;
use oxqcow::storage::DebugEvent;
use oxqcow::Image;

/// QEMU's MAX_BOUNCE_BUFFER.
const MAX_BOUNCE: u64 = 16 << 20;

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Whether the image itself (not its backing chain) has the cluster at
/// `off`, and for how many bytes (at most `len`, whole clusters, up to
/// the end of the image) the answer holds: QEMU's bdrv_is_allocated().
fn top_allocated(q: &oxqcow::Qcow2, off: u64, len: u64) -> Result<(bool, u64), i32> {
    use oxqcow::format::entries::L2Entry;
    let (cs, size) = (q.allocation_granularity(), q.size());
    let end = (off + len).min(size);
    let has = |at: u64| -> Result<bool, i32> {
        let e = q.l2_entry_at(at).map_err(|e| e.errno())?;
        Ok(!matches!(e, L2Entry::Unallocated))
    };
    if off >= end {
        return Ok((false, 0));
    }
    let first = has(off)?;
    let mut pos = (off / cs + 1) * cs;
    while pos < end && has(pos)? == first {
        pos += cs;
    }
    Ok((first, pos.min(end) - off))
}

impl Dev {
    /// The armed errors of the top blkdebug nodes, for one request.
    pub(crate) fn top_check(&self, off: u64, len: u64, io: IoType) -> Result<(), i32> {
        for d in &self.top_dbg {
            d.check(off, len, io).map_err(errno)?;
        }
        Ok(())
    }

    pub(crate) fn top_event(&self, ev: DebugEvent) {
        for d in &self.top_dbg {
            d.event(ev);
        }
    }

    /// A write through the top blkdebug nodes: `pwritev` (or
    /// `pwritev_zero`), the check, the write, `pwritev_done`. With `fua`
    /// (writethrough), the flush QEMU emulates FUA with: it runs before
    /// the node counts this write, so it covers the earlier ones only (and
    /// is skipped when there are none).
    pub(crate) fn through_top(
        &self,
        off: u64,
        len: u64,
        io: IoType,
        fua: bool,
        f: impl FnOnce() -> Result<(), i32>,
    ) -> Result<(), i32> {
        if self.top_dbg.is_empty() {
            return f();
        }
        self.top_event(if io == IoType::WriteZeroes {
            DebugEvent::PwritevZero
        } else {
            DebugEvent::Pwritev
        });
        let mut r = self.top_check(off, len, io).and_then(|_| f());
        if r.is_ok() && fua {
            r = self.flush_through_top(|| Ok(()));
        }
        for d in &self.top_dbg {
            d.note_write();
        }
        self.top_event(DebugEvent::PwritevDone);
        r
    }

    /// A flush through the top blkdebug nodes (skipped by a node nothing
    /// was written through since its last flush, as QEMU skips it).
    pub(crate) fn flush_through_top(&self, f: impl FnOnce() -> Result<(), i32>) -> Result<(), i32> {
        let mut gens = Vec::new();
        for d in &self.top_dbg {
            gens.push(d.check_flush().map_err(errno)?);
        }
        f()?;
        for (d, g) in self.top_dbg.iter().zip(gens) {
            if let Some(g) = g {
                d.flushed(g);
            }
        }
        Ok(())
    }

    /// A read with copy-on-read (see the module comment).
    pub(crate) fn cor_read(&self, buf: &mut [u8], off: u64) -> Result<(), i32> {
        let q = match &self.be {
            Backend::Img(Image::Qcow2(q)) => q,
            _ => return self.plain_read(buf, off),
        };
        let cs = q.allocation_granularity();
        let end = off + buf.len() as u64;
        let mut pos = off / cs * cs;
        let aligned_end = end.div_ceil(cs) * cs;
        while pos < aligned_end {
            let want = (aligned_end - pos).min(crate::io_open::REQUEST_MAX);
            let (alloc, n) = top_allocated(q, pos, want)?;
            if n == 0 {
                break; // the image ends inside the last cluster
            }
            if alloc {
                let (a, b) = (pos.max(off), (pos + n).min(end));
                self.plain_read(&mut buf[(a - off) as usize..(b - off) as usize], a)?;
            } else {
                let n = n.min(MAX_BOUNCE);
                let mut bounce = vec![0u8; n as usize];
                self.plain_read(&mut bounce, pos)?;
                self.top_event(DebugEvent::CorWrite);
                if bounce.iter().all(|&b| b == 0) {
                    self.through_top(pos, n, IoType::WriteZeroes, false, || {
                        self.zero_image(pos, n, false)
                    })?;
                } else {
                    self.through_top(pos, n, IoType::Write, false, || {
                        // A copy-on-read node under a compress filter
                        // copies first, with a plain write; one over it
                        // copies through it, compressed (failing on the
                        // clusters the first one copied, as in QEMU).
                        let filter = self.compress.as_ref();
                        if filter.is_none_or(|c| c.cor_under) {
                            q.write_at(&bounce, pos).map_err(|e| e.errno())?;
                        }
                        if filter.is_some() && self.req.cor {
                            self.compressed_clusters(q, &bounce, pos)?;
                        }
                        Ok(())
                    })?;
                }
                let (a, b) = (pos.max(off), (pos + n).min(end));
                if a < b {
                    buf[(a - off) as usize..(b - off) as usize]
                        .copy_from_slice(&bounce[(a - pos) as usize..(b - pos) as usize]);
                }
                pos += n;
                continue;
            }
            pos += n;
        }
        Ok(())
    }
}
