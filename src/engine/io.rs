//! The data path: mapping guest ranges to the host, reads (with backing
//! files and compressed clusters), and writes with copy-on-write.
//!
//! A write claims its guest clusters, plans under the metadata lock
//! (allocating new clusters), does the data I/O without the lock, and takes
//! the lock again to link the new clusters into L2 (see the module comment
//! of `engine` for the locking contract and `meta.rs` for the ordering).

use super::meta::Meta;
use super::{decompress, Qcow2, MAX_CHUNK};
use crate::error::{Error, Result};
use crate::format::entries::{L2Entry, COPIED};
use crate::storage::DebugEvent;
use std::sync::atomic::Ordering;

/// How a run of guest clusters maps to the host (one L2 table at most).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Run {
    Data(u64),
    Zero,
    Unallocated,
    Compressed { offset: u64, len: u64 },
}

/// Where the old contents of a cluster come from when a write covers only
/// part of it.
#[derive(Clone, Copy, Debug)]
pub(super) enum CowSource {
    Zeros,
    Backing,
    Host(u64),
    Compressed {
        offset: u64,
        len: u64,
    },
    /// The current guest view of the range (extended L2 entries, where
    /// subclusters of one cluster may live in different places).
    Guest,
}

/// The plan for one guest cluster of a write.
pub(super) struct ClusterWrite {
    pub gc: u64,
    /// Byte range of the cluster the request covers.
    pub start: u64,
    pub end: u64,
    pub host: u64,
    /// Needs a new L2 entry (new cluster, or a zero-flagged one made data).
    pub link: bool,
    pub old_raw: u64,
    pub source: CowSource,
    /// The host cluster is freshly allocated (release it if the write fails).
    pub fresh: bool,
    /// Bytes `lo..hi` of the cluster are written, the parts outside
    /// `start..end` filled from `source` (the whole cluster for standard
    /// entries; the copy-on-write subclusters with extended ones).
    pub fill: bool,
    pub lo: u64,
    pub hi: u64,
    /// A never-written cluster inside the durable file length (reads zeros).
    pub zero_host: bool,
    /// The subcluster bitmap to link with (extended L2 entries only).
    pub bitmap: u64,
}

impl ClusterWrite {
    pub(super) fn new(gc: u64, start: u64, end: u64, old_raw: u64) -> ClusterWrite {
        ClusterWrite {
            gc,
            start,
            end,
            host: 0,
            link: true,
            old_raw,
            source: CowSource::Zeros,
            fresh: false,
            fill: false,
            lo: start,
            hi: end,
            zero_host: false,
            bitmap: 0,
        }
    }
}

impl Qcow2 {
    // ---- mapping -------------------------------------------------------------------

    /// Maps the longest run starting at `off` (inside one L2 table) whose
    /// clusters share a kind and, for data, are contiguous on the host.
    pub(super) fn map_run(&self, m: &mut Meta, off: u64, max: u64) -> Result<(Run, u64)> {
        if self.ext_l2 {
            return self.map_run_ext(m, off, max);
        }
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

    pub(super) fn classify(&self, m: &mut Meta, gc: u64) -> Result<Run> {
        let raw = m.l2_entry(gc)?;
        if self.data.is_some() {
            let e = m.decode(raw);
            self.check_data_entry(m, gc, e)?;
            return Ok(match e {
                L2Entry::Normal { host, .. } => Run::Data(host),
                L2Entry::Zero { .. } => Run::Zero,
                _ => Run::Unallocated,
            });
        }
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
        self.read_mapped(buf, off)
    }

    /// Reads guest bytes through the mapping, without the size check (the
    /// VM state area lies past the end of the disk).
    pub(super) fn read_mapped(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_data_io()?;
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
                    self.data_storage().debug_event(DebugEvent::ReadAio);
                    self.read_data(out, host + (cur & (self.cs - 1)), cur)?
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

    pub(super) fn read_backing(&self, out: &mut [u8], off: u64) -> Result<()> {
        match &self.backing {
            None => out.fill(0),
            Some(b) => {
                self.file.debug_event(DebugEvent::ReadBackingAio);
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

    pub(super) fn read_compressed(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut input = vec![0u8; len as usize];
        self.file.debug_event(DebugEvent::ReadCompressed);
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
    pub(super) fn read_source(
        &self,
        src: CowSource,
        gc: u64,
        start: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let off = (gc << self.cb) + start;
        match src {
            CowSource::Zeros => out.fill(0),
            CowSource::Backing => self.read_backing(out, off)?,
            CowSource::Host(h) => self
                .read_data(out, h + start, off)
                .map_err(|e| e.context("copy-on-write"))?,
            CowSource::Compressed { offset, len } => {
                let d = self.read_compressed(offset, len)?;
                out.copy_from_slice(&d[start as usize..start as usize + out.len()]);
            }
            CowSource::Guest => self.read_guest_view(gc, start, out)?,
        }
        Ok(())
    }

    // ---- write -----------------------------------------------------------------------

    /// Writes guest bytes at any offset and length inside the image.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        self.lock().ensure_writable()?;
        self.track_write(off, buf.len() as u64);
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
    pub(super) fn chunk_len(&self, off: u64, remaining: u64) -> u64 {
        let l2_span = self.l2_span();
        let table_end = (off / l2_span + 1) * l2_span;
        remaining.min(table_end - off).min(MAX_CHUNK)
    }

    pub(super) fn write_chunk(&self, data: &[u8], off: u64) -> Result<()> {
        self.check_data_io()?;
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
                    m.free_unlinked(p.host, cs);
                }
                Err(e)
            }
        };
        self.release(&mut m, first, last);
        r
    }

    pub(super) fn plan_write(
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
            if self.ext_l2 {
                let w = self.plan_ext_cluster(m, gc, start, end)?;
                if w.host == 0 && self.data.is_none() {
                    need_alloc += 1;
                }
                plan.push(w);
                continue;
            }
            let raw = m.l2_entry(gc)?;
            if self.data.is_some() {
                plan.push(self.plan_data_cluster(m, gc, start, end, raw)?);
                continue;
            }
            let mut w = ClusterWrite::new(gc, start, end, raw);
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
                    (w.fill, w.lo, w.hi) = (true, 0, cs);
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
        if self.data.is_some() {
            if plan.iter().any(|w| w.link) {
                // QEMU's order: the L2 table before the data it will map.
                m.l2_for_write(first)?;
            }
            return Ok(plan);
        }
        if need_alloc > 0 {
            if m.frees_pending {
                // Discarded clusters become reusable only once their unref
                // is durable (rule 4): pay that flush now rather than grow
                // the file past space the guest just gave back.
                m.flush()?;
            }
            // As QEMU does: the L2 table (new, or a copy of a shared one)
            // is allocated before the data clusters it will map.
            m.l2_for_write(first)?;
            let never_written = m.written_end;
            let mut host = m.alloc_clusters(need_alloc)?;
            m.allocs_since_flush += need_alloc;
            // A run that was never written can have its L2 entries written
            // before its data (rule 1's exception) once the file durably
            // covers it. Only worth it when every write is flushed at once
            // (writethrough, or flushes that follow nearly every write).
            // Not with encryption: zeros on disk do not read as zeros there.
            let flushed_often = self.writethrough || m.flush_follows_writes;
            let zero_run = host >= never_written
                && flushed_often
                && m.lazy
                && self.cipher.is_none()
                && !self.ext_l2;
            if zero_run {
                m.reserve_zero_tail(host + need_alloc * cs)?;
            }
            for w in plan.iter_mut().filter(|w| w.host == 0) {
                w.host = host;
                w.fresh = true;
                if !w.fill {
                    (w.fill, w.lo, w.hi) = (true, 0, cs);
                }
                w.zero_host = zero_run;
                host += cs;
            }
        }
        for w in plan.iter_mut() {
            if w.fill && !self.ext_l2 {
                (w.lo, w.hi) = (0, cs);
            }
            let (s, e) = if w.fill {
                (w.lo, w.hi)
            } else {
                (w.start, w.end)
            };
            m.check_overlap(w.host + s, e - s)?;
        }
        Ok(plan)
    }

    /// The plan for one cluster of an image with an external data file: the
    /// data goes to host offset == guest offset, allocated or not; a
    /// cluster not yet holding data there is filled whole (from the backing
    /// file, or zeros) and linked.
    fn plan_data_cluster(
        &self,
        m: &mut Meta,
        gc: u64,
        start: u64,
        end: u64,
        raw: u64,
    ) -> Result<ClusterWrite> {
        let e = m.decode(raw);
        self.check_data_entry(m, gc, e)?;
        let mut w = ClusterWrite::new(gc, start, end, raw);
        w.host = gc << self.cb;
        (w.fill, w.lo, w.hi) = (true, 0, self.cs);
        match e {
            L2Entry::Normal { copied, .. } => {
                w.link = !copied;
                w.fill = false;
            }
            L2Entry::Unallocated if self.backing.is_some() => w.source = CowSource::Backing,
            _ => {}
        }
        Ok(w)
    }

    /// Writes the data (with copy-on-write fill) for a planned chunk,
    /// merging host-contiguous clusters into one write. On an encrypted
    /// image a partial write covers whole sectors: the rest of its first
    /// and last sector is read back from the cluster first.
    pub(super) fn write_data(
        &self,
        plan: &mut [ClusterWrite],
        data: &[u8],
        off: u64,
    ) -> Result<()> {
        let cs = self.cs;
        let mut i = 0;
        while i < plan.len() {
            // Extend a group of host-contiguous clusters.
            let mut j = i + 1;
            while j < plan.len() && plan[j].host == plan[j - 1].host + cs {
                j += 1;
            }
            let group = &plan[i..j];
            let first = &group[0];
            let last = &group[group.len() - 1];
            let g_start = if first.fill {
                first.lo
            } else {
                self.crypt_span(first.start, first.end).0
            };
            let g_end = if last.fill {
                last.hi
            } else {
                self.crypt_span(last.start, last.end).1
            };
            let host0 = first.host + g_start;
            let guest0 = (first.gc << self.cb) + g_start;
            let total = (group.len() as u64 - 1) * cs + g_end - g_start;
            let data_start = (first.gc << self.cb) + first.start;
            let data_len = (last.gc << self.cb) + last.end - data_start;
            let doff = (data_start - off) as usize;
            let caller = &data[doff..doff + data_len as usize];
            if g_start == first.start && g_end == last.end {
                // No fill needed: write the caller's bytes.
                self.data_storage().debug_event(DebugEvent::WriteAio);
                self.write_data_at(caller, host0, guest0)?;
            } else {
                // As QEMU's merged copy-on-write: the old data is read,
                // then written with the new in one request.
                self.data_storage().debug_event(DebugEvent::CowRead);
                let mut buf = vec![0u8; total as usize];
                for (k, w) in group.iter().enumerate() {
                    let base = (k as u64 * cs) as i64 - g_start as i64;
                    // The part of this cluster the buffer covers.
                    let lo = if k == 0 { g_start } else { 0 };
                    let hi = if k + 1 == group.len() { g_end } else { cs };
                    let at = |x: u64| (base + x as i64) as usize;
                    let gc_off = w.gc << self.cb;
                    if w.start > lo {
                        let out = &mut buf[at(lo)..at(w.start)];
                        if w.fill {
                            self.read_source(w.source, w.gc, lo, out)?;
                        } else {
                            self.read_data(out, w.host + lo, gc_off + lo)?;
                        }
                    }
                    if w.end < hi {
                        let out = &mut buf[at(w.end)..at(hi)];
                        if w.fill {
                            self.read_source(w.source, w.gc, w.end, out)?;
                        } else {
                            self.read_data(out, w.host + w.end, gc_off + w.end)?;
                        }
                    }
                }
                let s = (data_start - guest0) as usize;
                buf[s..s + data_len as usize].copy_from_slice(caller);
                self.data_storage().debug_event(DebugEvent::WriteAio);
                self.write_data_at(&buf, host0, guest0)?;
            }
            i = j;
        }
        Ok(())
    }

    pub(super) fn pwrite(&self, buf: &[u8], host: u64) -> Result<()> {
        self.data_storage()
            .write_at(buf, host)
            .map_err(|e| Error::io(format!("{}: write", self.name), e))?;
        if self.data.is_none() {
            self.file_end
                .fetch_max(host + buf.len() as u64, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Points the L2 entries of a written chunk at their clusters.
    pub(super) fn link(&self, m: &mut Meta, plan: &[ClusterWrite]) -> Result<()> {
        if !plan.iter().any(|w| w.link) {
            return Ok(());
        }
        m.mark_dirty()?;
        for w in plan.iter().filter(|w| w.link) {
            let l2 = m.l2_for_write(w.gc)?;
            if matches!(w.source, CowSource::Zeros) && w.zero_host {
                m.set_l2_entry_unordered(l2, w.gc, w.host | COPIED, w.bitmap);
            } else {
                m.set_l2_entry(l2, w.gc, w.host | COPIED, w.bitmap);
            }
            if w.fresh {
                m.unref_entry(w.old_raw, false)?;
            }
        }
        Ok(())
    }
}
