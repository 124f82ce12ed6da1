//! The qcow2 engine: open, guest-to-host mapping, read, write with
//! copy-on-write, zero writes, discard, block status, resize and close.
//!
//! Locking contract: all metadata lives in one `Mutex<Meta>`. A request
//! takes it to map its range (and, for writes, to allocate and to claim its
//! guest clusters in `inflight`), drops it for the data I/O, and takes it
//! again to link new clusters into L2. Two writers of the same guest cluster
//! are serialised by the in-flight set; readers never wait for writers.

mod amend;
mod backing;
mod cache;
mod check;
mod compress;
mod compressed_write;
mod create;
mod meta;
mod open;
mod snapshot;

pub use amend::AmendOptions;
pub use backing::{probe, Layer, RawLayer};
pub use check::{CheckResult, FIX_ERRORS, FIX_LEAKS};
pub use compress::{compress, decompress};
pub use create::{create, create_on, max_size, parse_size, CreateOptions, Preallocation};

use crate::error::{Error, Result};
use crate::format::entries::{L2Entry, COPIED, ZERO};
use crate::storage::Storage;
use meta::Meta;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub writable: bool,
    /// Overrides the image's lazy-refcounts bit (QEMU's `lazy-refcounts`).
    pub lazy_refcounts: Option<bool>,
    /// Bytes of L2 tables to cache (QEMU's `l2-cache-size`).
    pub l2_cache_size: Option<u64>,
    /// Bytes of refcount blocks to cache (QEMU's `refcount-cache-size`).
    pub refcount_cache_size: Option<u64>,
    /// Do not open the backing file (reads of unallocated clusters give zeros).
    pub no_backing: bool,
    /// Flush after every write (cache=writethrough / directsync).
    pub writethrough: bool,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// Open for check/repair: a corrupt or dirty image is opened as it is.
    pub check_mode: bool,
    /// Position in a backing chain (0 for the top image).
    pub chain_depth: u32,
}

/// The allocation state of a guest range, as block status reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockStatus {
    /// Guest data stored in layer `depth` (0 = this image); `host` is its
    /// offset in that layer's file when it is stored uncompressed.
    Data { host: Option<u64>, depth: u32 },
    /// Reads as zeros because layer `depth` says so.
    Zero { depth: u32 },
    /// No layer of the chain has it: reads as zeros. `depth` is the
    /// deepest layer that was asked (0 = this image has no backing file).
    Unallocated { depth: u32 },
}

/// How a run of guest clusters maps to the host (one L2 table at most).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    Data(u64),
    Zero,
    Unallocated,
    Compressed { offset: u64, len: u64 },
}

/// Where the old contents of a cluster come from when a write covers only
/// part of it.
#[derive(Clone, Copy, Debug)]
enum CowSource {
    Zeros,
    Backing,
    Host(u64),
    Compressed { offset: u64, len: u64 },
}

/// The plan for one guest cluster of a write.
struct ClusterWrite {
    gc: u64,
    /// Byte range of the cluster the request covers.
    start: u64,
    end: u64,
    host: u64,
    /// Needs a new L2 entry (new cluster, or a zero-flagged one made data).
    link: bool,
    old_raw: u64,
    source: CowSource,
    /// The host cluster is freshly allocated (release it if the write fails).
    fresh: bool,
    /// The whole cluster is written (head and tail filled from `source`).
    fill: bool,
    /// A never-written cluster inside the durable file length (reads zeros).
    zero_host: bool,
}

/// An open qcow2 image. Send + Sync: share it between threads freely.
pub struct Qcow2 {
    meta: Mutex<Meta>,
    cond: Condvar,
    file: Arc<dyn Storage>,
    path: PathBuf,
    name: String,
    backing: Option<Box<dyn Layer>>,
    cb: u32,
    cs: u64,
    size: AtomicU64,
    file_end: AtomicU64,
    compression_type: u8,
    version: u32,
    writable: bool,
    writethrough: bool,
    closed: AtomicBool,
}

/// Largest chunk one write or zero request handles under one claim.
const MAX_CHUNK: u64 = 32 << 20;

impl Qcow2 {
    fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims guest clusters first..=last, waiting for requests in flight on them.
    fn claim(&self, first: u64, last: u64) -> MutexGuard<'_, Meta> {
        let mut m = self.lock();
        while (first..=last).any(|c| m.inflight.contains(&c)) {
            m = self.cond.wait(m).unwrap_or_else(|e| e.into_inner());
        }
        for c in first..=last {
            m.inflight.insert(c);
        }
        m
    }

    fn release(&self, m: &mut Meta, first: u64, last: u64) {
        for c in first..=last {
            m.inflight.remove(&c);
        }
        self.cond.notify_all();
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    pub fn backing_layer(&self) -> Option<&dyn Layer> {
        self.backing.as_deref()
    }
    /// A copy of the current header.
    pub fn header(&self) -> crate::format::Header {
        self.lock().header.clone()
    }
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.file
    }
    pub fn lazy_refcounts(&self) -> bool {
        self.lock().lazy
    }
    /// The L2 entry of the guest cluster holding `off`, in this image only
    /// (e.g. the host cluster a preallocated zero cluster keeps).
    pub fn l2_entry_at(&self, off: u64) -> Result<L2Entry> {
        self.check_range(off, 1)?;
        let mut m = self.lock();
        let raw = m.l2_entry(off >> self.cb)?;
        Ok(m.decode(raw))
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        let size = self.size();
        if off.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange(format!(
                "{}: request [{off}, +{len}) is beyond the end of the image ({size} bytes)",
                self.name
            )));
        }
        Ok(())
    }

    // ---- mapping -------------------------------------------------------------------

    /// Maps the longest run starting at `off` (inside one L2 table) whose
    /// clusters share a kind and, for data, are contiguous on the host.
    fn map_run(&self, m: &mut Meta, off: u64, max: u64) -> Result<(Run, u64)> {
        let cs = self.cs;
        let gc = off >> self.cb;
        let in_cluster = off & (cs - 1);
        let table_end = ((gc >> m.l2_bits) + 1) << (m.l2_bits + self.cb);
        let limit = max.min(table_end - off);
        let first = self.classify(m, gc)?;
        let mut len = (cs - in_cluster).min(limit);
        if let Run::Compressed { .. } = first {
            return Ok((first, len));
        }
        let mut next = gc + 1;
        while len < limit {
            let r = self.classify(m, next)?;
            let same = match (first, r) {
                (Run::Data(a), Run::Data(b)) => b == a + (next - gc) * cs,
                (Run::Zero, Run::Zero) | (Run::Unallocated, Run::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            len = (len + cs).min(limit);
            next += 1;
        }
        Ok((first, len))
    }

    fn classify(&self, m: &mut Meta, gc: u64) -> Result<Run> {
        let raw = m.l2_entry(gc)?;
        let end = self.file_end.load(Ordering::Acquire);
        Ok(match m.decode(raw) {
            L2Entry::Unallocated => Run::Unallocated,
            L2Entry::Zero { .. } => Run::Zero,
            L2Entry::Normal { host, .. } => {
                if host >= end || host & (self.cs - 1) != 0 {
                    return Err(m.signal_corruption(&format!(
                        "Data cluster offset {host:#x} for guest cluster {gc} is invalid (past the end of the file or unaligned)"
                    )));
                }
                Run::Data(host)
            }
            L2Entry::Compressed { offset, len } => {
                if offset >= end {
                    return Err(m.signal_corruption(&format!(
                        "Compressed cluster at {offset:#x} for guest cluster {gc} points past the end of the file"
                    )));
                }
                Run::Compressed {
                    offset,
                    len: len.min(end - offset),
                }
            }
        })
    }

    // ---- read ------------------------------------------------------------------------

    /// Reads guest bytes at any offset and length inside the image.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        let mut pos = 0usize;
        while pos < buf.len() {
            let cur = off + pos as u64;
            let (run, len) = {
                let mut m = self.lock();
                self.map_run(&mut m, cur, (buf.len() - pos) as u64)?
            };
            let out = &mut buf[pos..pos + len as usize];
            match run {
                Run::Data(host) => {
                    let h = host + (cur & (self.cs - 1));
                    self.file
                        .read_at(out, h)
                        .map_err(|e| Error::io(format!("{}: read", self.name), e))?;
                }
                Run::Zero => out.fill(0),
                Run::Unallocated => self.read_backing(out, cur)?,
                Run::Compressed { offset, len: clen } => {
                    let data = self.read_compressed(offset, clen)?;
                    let s = (cur & (self.cs - 1)) as usize;
                    out.copy_from_slice(&data[s..s + out.len()]);
                }
            }
            pos += len as usize;
        }
        Ok(())
    }

    fn read_backing(&self, out: &mut [u8], off: u64) -> Result<()> {
        match &self.backing {
            None => out.fill(0),
            Some(b) => {
                let bsize = b.size();
                let n = if off >= bsize {
                    0
                } else {
                    (bsize - off).min(out.len() as u64) as usize
                };
                if n > 0 {
                    b.read(&mut out[..n], off)?;
                }
                out[n..].fill(0);
            }
        }
        Ok(())
    }

    fn read_compressed(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut input = vec![0u8; len as usize];
        self.file
            .read_at(&mut input, offset)
            .map_err(|e| Error::io(format!("{}: read compressed cluster", self.name), e))?;
        let mut out = vec![0u8; self.cs as usize];
        decompress(self.compression_type, &input, &mut out)
            .map_err(|e| e.context(&format!("{}: cluster at {offset:#x}", self.name)))?;
        Ok(out)
    }

    /// Fills `out` with the current contents of guest bytes [off, off+len)
    /// of one cluster, from where the cluster's old data lives.
    fn read_source(&self, src: CowSource, gc: u64, start: u64, out: &mut [u8]) -> Result<()> {
        let off = (gc << self.cb) + start;
        match src {
            CowSource::Zeros => out.fill(0),
            CowSource::Backing => self.read_backing(out, off)?,
            CowSource::Host(h) => self
                .file
                .read_at(out, h + start)
                .map_err(|e| Error::io(format!("{}: read for copy-on-write", self.name), e))?,
            CowSource::Compressed { offset, len } => {
                let d = self.read_compressed(offset, len)?;
                out.copy_from_slice(&d[start as usize..start as usize + out.len()]);
            }
        }
        Ok(())
    }

    // ---- write -----------------------------------------------------------------------

    /// Writes guest bytes at any offset and length inside the image.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        self.lock().ensure_writable()?;
        let mut pos = 0u64;
        let len = buf.len() as u64;
        while pos < len {
            let cur = off + pos;
            let n = self.chunk_len(cur, len - pos);
            self.write_chunk(&buf[pos as usize..(pos + n) as usize], cur)?;
            pos += n;
        }
        if self.writethrough {
            self.flush()?;
        }
        Ok(())
    }

    /// Length of the next chunk: inside one L2 table and at most MAX_CHUNK.
    fn chunk_len(&self, off: u64, remaining: u64) -> u64 {
        let l2_span = 1u64 << (2 * self.cb - 3);
        let table_end = (off / l2_span + 1) * l2_span;
        remaining.min(table_end - off).min(MAX_CHUNK)
    }

    fn write_chunk(&self, data: &[u8], off: u64) -> Result<()> {
        let cs = self.cs;
        let first = off >> self.cb;
        let last = (off + data.len() as u64 - 1) >> self.cb;
        let mut m = self.claim(first, last);
        let plan = self.plan_write(&mut m, first, last, off, data.len() as u64);
        let mut plan = match plan {
            Ok(p) => p,
            Err(e) => {
                self.release(&mut m, first, last);
                return Err(e);
            }
        };
        drop(m);
        let io = self.write_data(&mut plan, data, off);
        let mut m = self.lock();
        let r = match io {
            Ok(()) => self.link(&mut m, &plan),
            Err(e) => {
                for p in plan.iter().filter(|p| p.fresh) {
                    m.pending_unref.push((p.host, cs, false));
                }
                Err(e)
            }
        };
        self.release(&mut m, first, last);
        r
    }

    fn plan_write(
        &self,
        m: &mut Meta,
        first: u64,
        last: u64,
        off: u64,
        len: u64,
    ) -> Result<Vec<ClusterWrite>> {
        let cs = self.cs;
        let mut plan = Vec::with_capacity((last - first + 1) as usize);
        let mut need_alloc = 0;
        for gc in first..=last {
            let cstart = gc << self.cb;
            let start = off.max(cstart) - cstart;
            let end = (off + len).min(cstart + cs) - cstart;
            let raw = m.l2_entry(gc)?;
            let mut w = ClusterWrite {
                gc,
                start,
                end,
                host: 0,
                link: true,
                old_raw: raw,
                source: CowSource::Zeros,
                fresh: false,
                fill: false,
                zero_host: false,
            };
            match m.decode(raw) {
                L2Entry::Normal { host, copied } => {
                    if copied || m.refcount(host / cs)? == 1 {
                        w.host = host;
                        w.link = !copied;
                    } else {
                        w.source = CowSource::Host(host);
                    }
                }
                L2Entry::Zero { host, copied } if host != 0 && copied => {
                    w.host = host;
                    w.fill = true;
                }
                L2Entry::Zero { .. } => {}
                L2Entry::Unallocated => {
                    if self.backing.is_some() {
                        w.source = CowSource::Backing;
                    }
                }
                L2Entry::Compressed { offset, len } => {
                    w.source = CowSource::Compressed { offset, len };
                }
            }
            if w.host == 0 {
                need_alloc += 1;
            }
            plan.push(w);
        }
        if need_alloc > 0 {
            // As QEMU does: the L2 table (new, or a copy of a shared one)
            // is allocated before the data clusters it will map.
            m.l2_for_write(first)?;
            let never_written = m.written_end;
            let mut host = m.alloc_clusters(need_alloc)?;
            // A run that was never written can have its L2 entries written
            // before its data (rule 1's exception) once the file durably
            // covers it. Only worth it when every write is flushed at once.
            let zero_run = host >= never_written && self.writethrough && m.lazy;
            if zero_run {
                m.reserve_zero_tail(host + need_alloc * cs)?;
            }
            for w in plan.iter_mut().filter(|w| w.host == 0) {
                w.host = host;
                w.fresh = true;
                w.fill = true;
                w.zero_host = zero_run;
                host += cs;
            }
        }
        for w in &plan {
            let (s, e) = if w.fill { (0, cs) } else { (w.start, w.end) };
            m.check_overlap(w.host + s, e - s)?;
        }
        Ok(plan)
    }

    /// Writes the data (with copy-on-write fill) for a planned chunk,
    /// merging host-contiguous clusters into one write.
    fn write_data(&self, plan: &mut [ClusterWrite], data: &[u8], off: u64) -> Result<()> {
        let cs = self.cs;
        let mut i = 0;
        while i < plan.len() {
            // Extend a group of host-contiguous clusters.
            let mut j = i + 1;
            while j < plan.len() && plan[j].host == plan[j - 1].host + cs {
                j += 1;
            }
            let group = &plan[i..j];
            let whole = |w: &ClusterWrite| w.fill;
            let g_start = if whole(&group[0]) { 0 } else { group[0].start };
            let last = &group[group.len() - 1];
            let g_end = if whole(last) { cs } else { last.end };
            let host0 = group[0].host + g_start;
            let total = (group.len() as u64 - 1) * cs + g_end - g_start;
            let data_start = (group[0].gc << self.cb) + group[0].start;
            let data_len = (last.gc << self.cb) + last.end - data_start;
            let doff = (data_start - off) as usize;
            if g_start == group[0].start && g_end == last.end {
                // No fill needed: write the caller's bytes directly.
                self.pwrite(&data[doff..doff + data_len as usize], host0)?;
            } else {
                let mut buf = vec![0u8; total as usize];
                for (k, w) in group.iter().enumerate() {
                    let base = (k as u64 * cs) as i64 - g_start as i64;
                    if whole(w) {
                        let b0 = base as usize;
                        if w.start > 0 {
                            self.read_source(
                                w.source,
                                w.gc,
                                0,
                                &mut buf[b0..b0 + w.start as usize],
                            )?;
                        }
                        if w.end < cs {
                            let s = b0 + w.end as usize;
                            self.read_source(w.source, w.gc, w.end, &mut buf[s..b0 + cs as usize])?;
                        }
                    }
                }
                let s = (data_start - (group[0].gc << self.cb) - g_start) as usize;
                buf[s..s + data_len as usize]
                    .copy_from_slice(&data[doff..doff + data_len as usize]);
                self.pwrite(&buf, host0)?;
            }
            i = j;
        }
        Ok(())
    }

    fn pwrite(&self, buf: &[u8], host: u64) -> Result<()> {
        self.file
            .write_at(buf, host)
            .map_err(|e| Error::io(format!("{}: write", self.name), e))?;
        self.file_end
            .fetch_max(host + buf.len() as u64, Ordering::AcqRel);
        Ok(())
    }

    /// Points the L2 entries of a written chunk at their clusters.
    fn link(&self, m: &mut Meta, plan: &[ClusterWrite]) -> Result<()> {
        if !plan.iter().any(|w| w.link) {
            return Ok(());
        }
        m.mark_dirty()?;
        for w in plan.iter().filter(|w| w.link) {
            let l2 = m.l2_for_write(w.gc)?;
            if matches!(w.source, CowSource::Zeros) && w.zero_host {
                m.set_l2_entry_unordered(l2, w.gc, w.host | COPIED);
            } else {
                m.set_l2_entry(l2, w.gc, w.host | COPIED);
            }
            if w.fresh {
                m.unref_entry(w.old_raw, false);
            }
        }
        Ok(())
    }

    // ---- zeroes and discard -----------------------------------------------------------

    /// Makes a guest range read as zeros. With `unmap`, whole clusters give
    /// their host storage back; without it, allocated clusters stay
    /// allocated (QEMU's preallocated zero clusters).
    pub fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_range(off, len)?;
        self.lock().ensure_writable()?;
        let cs = self.cs;
        let end = off + len;
        let a = off.div_ceil(cs) * cs;
        let b = (end / cs * cs).max(a);
        // A partial last cluster at the end of the image counts as whole.
        let b = if end == self.size() && end > b && a < end {
            end
        } else {
            b
        };
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

    fn zero_partial(&self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (st, n) = self.block_status(off, len)?;
        if n >= len
            && matches!(
                st,
                BlockStatus::Zero { .. } | BlockStatus::Unallocated { .. }
            )
        {
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

    fn zero_clusters(&self, a: u64, b: u64, unmap: bool) -> Result<()> {
        if self.version < 3 {
            if unmap && self.backing.is_none() {
                return self.unmap_range(a, b, true, true);
            }
            return self.zero_partial_forced(a, b - a);
        }
        let mut pos = a;
        while pos < b {
            let n = self.chunk_len(pos, b - pos);
            let first = pos >> self.cb;
            let last = (pos + n - 1) >> self.cb;
            let mut m = self.claim(first, last);
            let r = (|| -> Result<()> {
                m.mark_dirty()?;
                for gc in first..=last {
                    let raw = m.l2_entry(gc)?;
                    let new = match m.decode(raw) {
                        L2Entry::Normal { host, copied: true } if !unmap => host | COPIED | ZERO,
                        L2Entry::Zero { host, copied: true } if !unmap => host | COPIED | ZERO,
                        L2Entry::Zero { host: 0, .. } => continue,
                        _ => ZERO,
                    };
                    let l2 = m.l2_for_write(gc)?;
                    m.set_l2_entry(l2, gc, new);
                    if new == ZERO {
                        m.unref_entry(raw, unmap);
                    }
                }
                Ok(())
            })();
            self.release(&mut m, first, last);
            r?;
            pos += n;
        }
        Ok(())
    }

    fn zero_partial_forced(&self, off: u64, len: u64) -> Result<()> {
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
        let cs = self.cs;
        let end = off + len;
        let a = off.div_ceil(cs) * cs;
        let mut b = end / cs * cs;
        if end == self.size() && end > b {
            b = end;
        }
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
    fn unmap_range(&self, a: u64, b: u64, full: bool, punch: bool) -> Result<()> {
        let mut pos = a;
        while pos < b {
            let n = self.chunk_len(pos, b - pos);
            let first = pos >> self.cb;
            let last = (pos + n - 1) >> self.cb;
            let mut m = self.claim(first, last);
            let r = (|| -> Result<()> {
                for gc in first..=last {
                    let raw = m.l2_entry(gc)?;
                    let e = m.decode(raw);
                    let allocated =
                        !matches!(e, L2Entry::Unallocated | L2Entry::Zero { host: 0, .. });
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
                    m.set_l2_entry(l2, gc, new);
                    m.unref_entry(raw, punch);
                }
                Ok(())
            })();
            self.release(&mut m, first, last);
            r?;
            pos += n;
        }
        Ok(())
    }

    // ---- status, flush, resize, close ----------------------------------------------

    /// The allocation state at `off` and the number of bytes it holds for
    /// (at most `len`), looking down the backing chain for unallocated parts.
    pub fn block_status(&self, off: u64, len: u64) -> Result<(BlockStatus, u64)> {
        self.check_range(off, len)?;
        let (run, n) = {
            let mut m = self.lock();
            self.map_run(&mut m, off, len)?
        };
        Ok(match run {
            Run::Data(h) => (
                BlockStatus::Data {
                    host: Some(h + (off & (self.cs - 1))),
                    depth: 0,
                },
                n,
            ),
            Run::Compressed { .. } => (
                BlockStatus::Data {
                    host: None,
                    depth: 0,
                },
                n,
            ),
            Run::Zero => (BlockStatus::Zero { depth: 0 }, n),
            Run::Unallocated => match &self.backing {
                None => (BlockStatus::Unallocated { depth: 0 }, n),
                Some(b) => {
                    let bsize = b.size();
                    if off >= bsize {
                        (BlockStatus::Unallocated { depth: 1 }, n)
                    } else {
                        let (s, bn) = b.status(off, n.min(bsize - off))?;
                        let s = match s {
                            BlockStatus::Data { host, depth } => BlockStatus::Data {
                                host,
                                depth: depth + 1,
                            },
                            BlockStatus::Zero { depth } => BlockStatus::Zero { depth: depth + 1 },
                            BlockStatus::Unallocated { depth } => {
                                BlockStatus::Unallocated { depth: depth + 1 }
                            }
                        };
                        (s, bn)
                    }
                }
            },
        })
    }

    /// Writes all cached metadata in dependency order and syncs the file.
    pub fn flush(&self) -> Result<()> {
        let mut m = self.lock();
        m.flush()
    }

    /// Waits until no request is in flight and returns the metadata lock.
    fn quiesce(&self) -> MutexGuard<'_, Meta> {
        let mut m = self.lock();
        while !m.inflight.is_empty() {
            m = self.cond.wait(m).unwrap_or_else(|e| e.into_inner());
        }
        m
    }

    /// Changes the virtual size. Growing extends the L1 table when needed;
    /// shrinking drops every cluster past the new end.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        {
            let m = self.lock();
            // QEMU 10: v3 snapshots keep their own size; v2 ones cannot.
            if m.header.nb_snapshots > 0 && m.header.version < 3 {
                return Err(Error::Unsupported(
                    "Can't resize a v2 image which has snapshots".into(),
                ));
            }
        }
        self.resize_unchecked(new_size)
    }

    /// Resize without the snapshot rule (reverting to a snapshot of another size).
    fn resize_unchecked(&self, new_size: u64) -> Result<()> {
        let mut m = self.quiesce();
        m.ensure_writable()?;
        let cs = self.cs;
        let old = m.header.size;
        if new_size > create::max_size(self.cb) {
            return Err(Error::TooLarge(format!(
                "{}: The image size is too large for file format 'qcow2' (try using a larger cluster size)",
                self.name
            )));
        }
        let l2_span = 1u64 << (2 * self.cb - 3);
        let need_l1 = new_size.div_ceil(l2_span);
        if need_l1 > m.l1.len() as u64 {
            m.grow_l1(need_l1)?;
        }
        if new_size < old {
            drop(m);
            let tail_start = new_size.div_ceil(cs) * cs;
            // Clear the tail of a partial last cluster so that a later grow reads zeros.
            if tail_start > new_size {
                let (st, _) =
                    self.block_status(new_size & !(cs - 1), cs.min(old - (new_size & !(cs - 1))))?;
                if !matches!(
                    st,
                    BlockStatus::Unallocated { .. } | BlockStatus::Zero { .. }
                ) {
                    let n = (tail_start.min(old) - new_size) as usize;
                    self.write_chunk(&vec![0u8; n], new_size)?;
                }
            }
            if tail_start < old {
                self.unmap_range(tail_start, old.div_ceil(cs) * cs, true, true)?;
            }
            m = self.quiesce();
            // Free L2 tables that now map nothing.
            let first_dead = need_l1 as usize;
            for i in first_dead..m.l1.len() {
                let off = m.l1[i] & crate::format::OFFSET_MASK;
                if off != 0 {
                    m.flush()?;
                    m.l1[i] = 0;
                    m.l1_dirty.insert(i);
                    m.metadata.remove(&(off / cs));
                    m.l2_cache.remove(off);
                    m.pending_unref.push((off, cs, false));
                }
            }
        }
        m.flush()?;
        m.write_file(&new_size.to_be_bytes(), 24, "write header")?;
        m.sync()?;
        m.header.size = new_size;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Points the image at another backing file (or none), rewriting the
    /// header as QEMU's `rebase -u` does. The new file is not opened.
    pub fn change_backing_file(&self, file: Option<&str>, fmt: Option<&str>) -> Result<()> {
        let mut m = self.quiesce();
        m.ensure_writable()?;
        if let Some(f) = fmt {
            if f.len() >= 16 {
                return Err(Error::InvalidArgument(format!(
                    "{}: backing format name '{f}' is too long",
                    self.name
                )));
            }
        }
        let old = (
            m.header.backing_file.clone(),
            m.header.backing_format.clone(),
        );
        m.header.backing_file = file.filter(|f| !f.is_empty()).map(str::to_string);
        m.header.backing_format = fmt
            .filter(|f| !f.is_empty() && m.header.backing_file.is_some())
            .map(str::to_string);
        if let Err(e) = m.flush().and_then(|_| m.write_header()) {
            (m.header.backing_file, m.header.backing_format) = old;
            return Err(e);
        }
        Ok(())
    }

    /// Drops every cluster of the image (guest reads return the backing
    /// file's data, or zeros), as `qemu-img commit` leaves an overlay.
    pub fn make_empty(&self) -> Result<()> {
        self.lock().ensure_writable()?;
        let size = self.size();
        let end = size.div_ceil(self.cs) * self.cs;
        if end > 0 {
            self.unmap_range(0, end, true, true)?;
        }
        self.flush()
    }

    /// True while the dirty bit (lazy refcounts) is set on disk.
    pub fn is_dirty(&self) -> bool {
        self.lock().is_dirty()
    }

    /// Where QEMU keeps VM state: right after the last L1 entry the
    /// virtual size needs.
    pub fn vm_state_offset(&self) -> u64 {
        let l2_span = 1u64 << (2 * self.cb - 3);
        self.size().div_ceil(l2_span) * l2_span
    }

    /// Flushes everything and, with lazy refcounts, clears the dirty bit.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut m = self.quiesce();
        if !m.writable {
            return Ok(());
        }
        m.flush_all()?;
        m.trim_zero_tail()?;
        if m.is_dirty() && !m.corrupt {
            m.header.incompatible_features &= !crate::format::INCOMPAT_DIRTY;
            m.write_header()?;
        }
        Ok(())
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            crate::log::warn(&format!("{}: error while closing: {e}", self.name));
        }
    }
}

impl Layer for Qcow2 {
    fn size(&self) -> u64 {
        Qcow2::size(self)
    }
    fn read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.read_at(buf, off)
    }
    fn status(&self, off: u64, len: u64) -> Result<(BlockStatus, u64)> {
        self.block_status(off, len)
    }
    fn format(&self) -> &'static str {
        "qcow2"
    }
    fn filename(&self) -> &str {
        &self.name
    }
    fn backing(&self) -> Option<&dyn Layer> {
        self.backing.as_deref()
    }
}
