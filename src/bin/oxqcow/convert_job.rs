//! The copy loop of `oxqcow convert`, cut into steps the way qemu-img's
//! convert cuts it, because the `-p` progress line counts those steps: one
//! block-status extent of the source at a time, data extents in pieces of
//! at most one buffer (2 MiB, or one target cluster when compressing),
//! and progress measured over the bytes that are read and written (data,
//! and zeros too with `-S 0`). A first walk adds up that total; the copy
//! walks the source again, handing the steps to the workers in order.
//! Ranges that read as zero are written as zeroes only when the target
//! does not read as zeros already (-n, or a backing file); with a backing
//! file for the target (-B) only what the source's top image holds is
//! copied, the rest is left to the backing file. Several sources are
//! one guest disk, laid end to end: an extent never reaches past the end
//! of its source, so only a compressed cluster's read spans two of them.

use crate::img_util::{strerror, QProgress};
use crate::util::{errmsg, file_extent, CliResult};
use oxqcow::format::entries::L2Entry;
use oxqcow::storage::blkdebug::IoType;
use oxqcow::storage::Blkdebug;
use oxqcow::{BlockStatus, Image};
use std::fs::File;
use std::sync::{Arc, Condvar, Mutex};

/// Bytes copied per step at most (qemu-img's buffer).
const BUF: u64 = 2 << 20;

/// What one step does with its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Read and written; all-zero blocks of the -S size are left out.
    Data,
    /// Reads as zeros: written as zeroes unless the target reads as zeros.
    Zero,
    /// Left to the target's backing file: not written.
    Backing,
}

#[derive(Clone, Copy, Debug)]
struct Step {
    pos: u64,
    len: u64,
    kind: Kind,
}

/// One source image and where it lies in the target.
pub struct Source<'a> {
    pub img: &'a Image,
    /// A raw source's host file, whose holes are read as zero extents.
    pub file: Option<File>,
    /// Blkdebug nodes above the source: their rules fail reads and
    /// block-status queries of the ranges they name.
    pub dbg: &'a [Arc<Blkdebug>],
    /// Its first byte's offset in the target.
    pub start: u64,
    pub size: u64,
}

/// One conversion: what to copy where, and how.
pub struct Job<'a> {
    /// The sources in target order (one, or several to concatenate).
    pub srcs: &'a [Source<'a>],
    pub dst: &'a Image,
    /// The sources' sizes added up.
    pub size: u64,
    /// -S: the all-zero block size left out of data (0: write everything).
    pub sparse: u64,
    /// The target reads as zeros already (freshly created, no backing).
    pub zero_init: bool,
    /// Compressed output: the target's cluster size.
    pub cluster: Option<u64>,
    /// Writes happen in guest order (no -W).
    pub ordered: bool,
    /// The target has a backing file: copy only the source's top image.
    pub top_only: bool,
    /// --salvage: a failed block-status query is retried on a quarter of
    /// its range down to one sector, which is then copied as data; a
    /// failed read is retried sector by sector and an unreadable sector
    /// is written as zeros; each with a warning, as qemu-img does.
    pub salvage: bool,
}

const SECTOR: u64 = 512;

/// Walks the source from the start, one step at a time.
struct Walker<'j, 'a> {
    job: &'j Job<'a>,
    pos: u64,
    /// The extent last asked about: start, end, kind.
    cached: Option<(u64, u64, Kind)>,
}

impl Walker<'_, '_> {
    /// The extent at `pos`: its kind and where it ends.
    fn extent(&mut self, pos: u64) -> CliResult<(Kind, u64)> {
        if let Some((s, e, k)) = self.cached {
            if s <= pos && pos < e {
                return Ok((k, e));
            }
        }
        let (kind, n) = self.job.status(pos)?;
        let end = pos + n;
        self.cached = Some((pos, end, kind));
        Ok((kind, end))
    }

    fn next(&mut self) -> CliResult<Option<Step>> {
        let (pos, size) = (self.pos, self.job.size);
        if pos >= size {
            return Ok(None);
        }
        let step = match self.job.cluster {
            Some(cs) => self.next_cluster_step(cs)?,
            None => {
                let (kind, end) = self.extent(pos)?;
                let len = match kind {
                    Kind::Data => (end - pos).min(BUF),
                    _ => end - pos,
                };
                Step { pos, len, kind }
            }
        };
        self.pos += step.len;
        Ok(Some(step))
    }

    /// Compressed output is written in whole target clusters: a run of
    /// clusters without data is one step, and every cluster with data in
    /// it is a step of its own.
    fn next_cluster_step(&mut self, cs: u64) -> CliResult<Step> {
        let (pos, size) = (self.pos, self.job.size);
        let (kind, end) = self.extent(pos)?;
        if kind != Kind::Data {
            let whole = if end == size { end } else { end / cs * cs };
            if whole > pos {
                return Ok(Step {
                    pos,
                    len: whole - pos,
                    kind,
                });
            }
        }
        let wend = (pos + cs).min(size);
        let mut p = pos;
        let mut kinds = Vec::new();
        while p < wend {
            let (k, e) = self.extent(p)?;
            kinds.push(k);
            p = e;
        }
        // A cluster of zeros and backing data alike is copied whole.
        let kind = if kinds.iter().all(|&k| k == kinds[0]) {
            kinds[0]
        } else {
            Kind::Data
        };
        Ok(Step {
            pos,
            len: wend - pos,
            kind,
        })
    }
}

/// What the workers share.
struct Shared<'j, 'a> {
    walker: Walker<'j, 'a>,
    /// Steps handed out so far.
    issued: u64,
    /// The step whose turn it is to write (ordered mode).
    turn: u64,
    error: Option<String>,
    /// The step the reported error came from: with several workers the
    /// lowest failing step is reported, whichever failed first in time.
    error_at: u64,
}

/// The progress line's accounting: data bytes written of `total`.
struct Done<'p> {
    bytes: u64,
    total: u64,
    line: &'p mut QProgress,
}

impl Done<'_> {
    /// Counts a step written. With ordered writes this happens in guest
    /// order, as in qemu-img, so the printed values match its own.
    fn add(&mut self, s: Step) {
        if s.kind == Kind::Data {
            self.bytes += s.len;
            let pct = 100.0 * self.bytes as f64 / self.total as f64;
            self.line.add(pct as f32, 0);
        }
    }
}

impl<'a> Job<'a> {
    /// The source holding target offset `pos` (sources of size 0 hold none).
    fn source_at(&self, pos: u64) -> &Source<'a> {
        let i = self.srcs.partition_point(|s| s.start + s.size <= pos);
        &self.srcs[i.min(self.srcs.len() - 1)]
    }

    /// The extent at `pos`, as a step kind, and its length: it ends at
    /// the end of its source at the latest.
    fn status(&self, pos: u64) -> CliResult<(Kind, u64)> {
        let src = self.source_at(pos);
        let rel = pos - src.start;
        let mut want = src.size - rel;
        let (st, n) = loop {
            match self.query(src, rel, want) {
                Ok(r) => break r,
                Err(e) if self.salvage && want > SECTOR => {
                    let _ = e;
                    want = want.div_ceil(SECTOR).div_ceil(4) * SECTOR;
                }
                Err(e) if self.salvage => {
                    crate::util::report(&format!(
                        "warning: error while reading block status at offset {pos}: {e}"
                    ));
                    return Ok((Kind::Data, want));
                }
                Err(e) => {
                    return Err(format!(
                        "error while reading block status at offset {pos}: {e}"
                    ))
                }
            }
        };
        let mut n = n.clamp(1, want);
        let mut kind = match st {
            BlockStatus::Data { depth, .. } | BlockStatus::Zero { depth }
                if self.top_only && depth > 0 =>
            {
                Kind::Backing
            }
            BlockStatus::Unallocated { .. } if self.top_only => Kind::Backing,
            BlockStatus::Data { .. } => Kind::Data,
            BlockStatus::Zero { .. } | BlockStatus::Unallocated { .. } => Kind::Zero,
        };
        if let (Some(f), Kind::Data) = (&src.file, kind) {
            let (is_data, len) = file_extent(f, rel, n);
            // Data ending in a partial last sector (a file size that is not
            // a multiple of 512) covers that sector whole, as in qemu-img.
            let len = if is_data {
                len.next_multiple_of(SECTOR)
            } else {
                len
            };
            n = len.clamp(1, n);
            if !is_data {
                kind = Kind::Zero;
            }
        }
        // Without sparse detection zeros are copied like data.
        if kind == Kind::Zero && self.sparse == 0 {
            kind = Kind::Data;
        }
        Ok((kind, n))
    }

    /// One block-status query of a source at its own offset `pos`, through
    /// the blkdebug rules above it; errors as strerror() words them (what
    /// qemu-img prints).
    fn query(&self, src: &Source, pos: u64, len: u64) -> Result<(BlockStatus, u64), String> {
        for d in src.dbg {
            d.check(pos, len, IoType::BlockStatus)
                .map_err(|e| crate::util::ioerr(&e))?;
        }
        src.img
            .block_status(pos, len)
            .map_err(|e| crate::img_util::errno_text(&e))
    }

    /// Reads target bytes from the sources holding them, through the
    /// blkdebug rules above each.
    fn read(&self, b: &mut [u8], pos: u64) -> Result<(), String> {
        let mut done = 0;
        while done < b.len() {
            let at = pos + done as u64;
            let src = self.source_at(at);
            let rel = at - src.start;
            let n = ((src.size - rel) as usize).min(b.len() - done);
            if n == 0 {
                return Err(format!("read past the end of the sources at byte {at}"));
            }
            let part = &mut b[done..done + n];
            for d in src.dbg {
                d.check(rel, n as u64, IoType::Read)
                    .map_err(|e| crate::util::ioerr(&e))?;
            }
            src.img.read_at(part, rel).map_err(|e| errmsg(&e))?;
            done += n;
        }
        Ok(())
    }

    /// A read that --salvage retries sector by sector, zeros in place of
    /// what cannot be read.
    fn read_salvaging(&self, b: &mut [u8], pos: u64) -> Result<(), String> {
        match self.read(b, pos) {
            Err(e) if !self.salvage => Err(e),
            Err(_) => {
                for (i, sec) in b.chunks_mut(SECTOR as usize).enumerate() {
                    let at = pos + i as u64 * SECTOR;
                    if let Err(e) = self.read(sec, at) {
                        let why = e.rsplit(": ").next().unwrap_or(&e).to_string();
                        crate::util::report(&format!(
                            "warning: error while reading offset {at}: {why}"
                        ));
                        sec.fill(0);
                    }
                }
                Ok(())
            }
            ok => ok,
        }
    }

    fn walker(&self) -> Walker<'_, 'a> {
        Walker {
            job: self,
            pos: 0,
            cached: None,
        }
    }

    /// Copies the source with `workers` threads; `progress` has printed
    /// its first line already.
    pub fn run(&self, workers: usize, progress: &mut QProgress) -> CliResult<()> {
        let mut total = 0u64;
        let mut w = self.walker();
        while let Some(s) = w.next()? {
            if s.kind == Kind::Data {
                total += s.len;
            }
        }
        let shared = Mutex::new(Shared {
            walker: self.walker(),
            issued: 0,
            turn: 0,
            error: None,
            error_at: u64::MAX,
        });
        let done = Mutex::new(Done {
            bytes: 0,
            total,
            line: progress,
        });
        // One condition variable per worker: the steps in flight are always
        // `workers` consecutive numbers from `turn` on, so step i's writer
        // waits alone on conds[i % workers] and an advancing turn wakes only
        // the next writer (one shared condvar woke every worker per step:
        // half of a compressed image's conversion time went to scheduling).
        let workers = workers.max(1);
        let conds: Vec<Condvar> = (0..workers).map(|_| Condvar::new()).collect();
        let wake_all = || conds.iter().for_each(Condvar::notify_all);
        let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
        let worker = || {
            let mut buf = vec![0u8; BUF.max(self.cluster.unwrap_or(0)) as usize];
            loop {
                let (i, step) = {
                    let mut sh = lock();
                    if sh.error.is_some() {
                        return;
                    }
                    match sh.walker.next() {
                        Ok(Some(s)) => {
                            sh.issued += 1;
                            (sh.issued - 1, s)
                        }
                        Ok(None) => return,
                        Err(e) => {
                            sh.error = Some(e);
                            wake_all();
                            return;
                        }
                    }
                };
                let r = self.step(i, step, &mut buf, &shared, &conds, &done);
                if let Err(e) = r {
                    let mut sh = lock();
                    if sh.error.is_none() || i < sh.error_at {
                        sh.error = Some(e);
                        sh.error_at = i;
                    }
                    wake_all();
                }
            }
        };
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(worker);
            }
        });
        match shared.into_inner().unwrap_or_else(|e| e.into_inner()).error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Reads step `i` and writes it (in its turn when ordered).
    fn step(
        &self,
        i: u64,
        s: Step,
        buf: &mut [u8],
        shared: &Mutex<Shared>,
        conds: &[Condvar],
        done: &Mutex<Done>,
    ) -> CliResult<()> {
        let count = || done.lock().unwrap_or_else(|e| e.into_inner()).add(s);
        let b = &mut buf[..if s.kind == Kind::Data {
            s.len as usize
        } else {
            0
        }];
        if s.kind == Kind::Data {
            self.read_salvaging(b, s.pos)
                .map_err(|e| format!("error while reading at byte {}: {e}", s.pos))?;
        }
        if !self.ordered {
            return self.write(s, b).map(|()| count());
        }
        let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
        let n = conds.len() as u64;
        while sh.turn != i && sh.error.is_none() {
            sh = conds[(i % n) as usize]
                .wait(sh)
                .unwrap_or_else(|e| e.into_inner());
        }
        if let Some(e) = &sh.error {
            return Err(e.clone());
        }
        drop(sh);
        let r = self.write(s, b).map(|()| count());
        let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
        sh.turn += 1;
        conds[(sh.turn % n) as usize].notify_all();
        r
    }

    fn write(&self, s: Step, b: &[u8]) -> CliResult<()> {
        match (s.kind, self.cluster) {
            (Kind::Backing, _) => Ok(()),
            (Kind::Zero, _) if self.zero_init => Ok(()),
            (Kind::Zero, _) => self.zero(s.pos, s.len),
            (Kind::Data, Some(_)) => self.write_compressed(s.pos, b),
            (Kind::Data, None) => write_nonzero(self.dst, b, s.pos, self.sparse, self.zero_init)
                .map_err(|e| format!("error while writing at byte {}: {e}", s.pos)),
        }
    }

    /// One target cluster: compressed when it holds data, or always
    /// without sparse detection (-S 0), as qemu-img does.
    fn write_compressed(&self, c: u64, b: &[u8]) -> CliResult<()> {
        if self.sparse != 0 && b.iter().all(|&x| x == 0) {
            return if self.zero_init {
                Ok(())
            } else {
                self.zero(c, b.len() as u64)
            };
        }
        let werr = |e: String| format!("error while writing at byte {c}: {e}");
        let q = self.dst.qcow2().expect("compressed output is qcow2");
        // QEMU compresses only into clusters without a host cluster.
        let taken = match q.l2_entry_at(c) {
            Ok(L2Entry::Unallocated) | Ok(L2Entry::Zero { host: 0, .. }) => false,
            Ok(_) => true,
            Err(e) => return Err(werr(errmsg(&e))),
        };
        if taken {
            return Err(werr(strerror(libc::EIO)));
        }
        // qemu-img words a failed write with strerror() alone (ENOTSUP
        // for an image with an external data file).
        q.write_compressed(b, c)
            .map_err(|e| werr(crate::img_util::errno_text(&e)))
    }

    fn zero(&self, pos: u64, n: u64) -> CliResult<()> {
        self.dst
            .write_zeroes(pos, n, true)
            .map_err(|e| format!("error while writing at byte {pos}: {}", errmsg(&e)))
    }
}

/// Writes `b` at `pos`, leaving out every all-zero block of `sparse` bytes
/// (aligned to guest offsets), or writing it as zeroes when the target
/// does not read as zeros already; `sparse` 0 writes everything.
fn write_nonzero(dst: &Image, b: &[u8], pos: u64, sparse: u64, zero_init: bool) -> CliResult<()> {
    let write = |from: usize, to: usize| {
        dst.write_at(&b[from..to], pos + from as u64)
            .map_err(|e| errmsg(&e))
    };
    let zero = |from: usize, to: usize| {
        if zero_init {
            Ok(())
        } else {
            dst.write_zeroes(pos + from as u64, (to - from) as u64, true)
                .map_err(|e| errmsg(&e))
        }
    };
    if sparse == 0 {
        return write(0, b.len());
    }
    // Runs of data blocks and of zero blocks, each written in one request.
    let mut run: Option<(usize, bool)> = None;
    let mut i = 0usize;
    while i < b.len() {
        let abs = pos + i as u64;
        let blk_end = ((abs / sparse + 1) * sparse - pos) as usize;
        let end = blk_end.min(b.len());
        let is_zero = b[i..end].iter().all(|&x| x == 0);
        match run {
            Some((s, z)) if z != is_zero => {
                if z {
                    zero(s, i)?;
                } else {
                    write(s, i)?;
                }
                run = Some((i, is_zero));
            }
            None => run = Some((i, is_zero)),
            _ => {}
        }
        i = end;
    }
    match run {
        Some((s, true)) => zero(s, b.len())?,
        Some((s, false)) => write(s, b.len())?,
        None => {}
    }
    Ok(())
}
