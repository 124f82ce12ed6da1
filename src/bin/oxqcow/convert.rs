//! `oxqcow convert`: copies the guest contents of a qcow2 or raw image
//! (its whole backing chain flattened) into a new qcow2 or raw image.
//! Owns target creation from the -o options, the chunked copy that skips
//! ranges block status reports as zero or unallocated and all-zero blocks
//! of the -S size (so the target stays sparse), and qemu-img's `-p`
//! progress line. With -n the target exists already: it is not created
//! and its zero ranges are written as zeroes (unmapping). With -c every
//! target cluster holding data is written compressed, one whole cluster per
//! call. -m runs that many workers (reads in parallel; writes in order
//! unless -W allows them out of order).

use crate::create::create_raw;
use crate::img_util::open_arg;
use crate::util::CliResult;
use crate::util::{errmsg, file_extent, parse_img_size, split_opts, virtual_size};
use oxqcow::crypto::{
    check_encrypt_option_syntax, encrypt_create_from_options, is_encrypt_option, EncryptCreate,
};
use oxqcow::engine::{create, CreateOptions};
use oxqcow::format::entries::L2Entry;
use oxqcow::{BlockStatus, Image, OpenOptions};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Condvar, Mutex};

#[derive(clap::Args)]
pub struct Args {
    /// Show progress
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: no progress
    #[arg(short = 'q')]
    quiet: bool,
    /// Source image format (probed when not given)
    #[arg(short = 'f', value_name = "FMT")]
    fmt: Option<String>,
    /// Output format: raw or qcow2
    #[arg(short = 'O', value_name = "OUTPUT_FMT", default_value = "raw")]
    out_fmt: String,
    /// Output format options, NAME=VALUE[,NAME=VALUE...] (may be repeated)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Sparse detection granularity: all-zero blocks of this size are not
    /// written (0 writes everything)
    #[arg(short = 'S', value_name = "SPARSE_SIZE")]
    sparse: Option<String>,
    /// Compress the output (qcow2 targets)
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// The target exists: do not create it
    #[arg(short = 'n', long = "no-create")]
    no_create: bool,
    /// Parallel workers (1 to 16, default 8)
    #[arg(short = 'm', long = "parallel", value_name = "NUM_COROUTINES")]
    parallel: Option<String>,
    /// Allow writes out of order
    #[arg(short = 'W', long = "oob-writes")]
    oob_writes: bool,
    /// Target cache mode (accepted, ignored)
    #[arg(short = 't', long = "target-cache", value_name = "TGT_CACHE")]
    target_cache: Option<String>,
    /// Source cache mode (accepted, ignored)
    #[arg(short = 'T', long = "source-cache", value_name = "SRC_CACHE")]
    source_cache: Option<String>,
    /// Accepted for compatibility (the source is always opened read-only)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Define an object: secret,id=ID,data=PASSWORD|file=PATH[,format=raw|base64]
    #[arg(long = "object", value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// Treat the source name as an option string (driver=qcow2,file.filename=F,...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Source image
    source: String,
    /// Destination image
    destination: String,
}

/// Bytes copied per step.
const CHUNK: u64 = 2 << 20;

pub fn run(a: Args) -> CliResult<()> {
    let _ = (a.force_share, &a.target_cache, &a.source_cache);
    let workers = match &a.parallel {
        None => 8,
        Some(m) => {
            let n: i64 = crate::util::parse_c_number(m)
                .map(|v| v as i64)
                .or_else(|| m.trim().parse().ok())
                .ok_or_else(|| format!("Invalid number of coroutines specified: '{m}'."))?;
            if !(1..=16).contains(&n) {
                return Err(
                    "Invalid number of coroutines specified. Must be between 1 and 16.".into(),
                );
            }
            n as usize
        }
    };
    let sparse = match &a.sparse {
        None => 4096,
        Some(s) => {
            let bad = || {
                "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).".to_string()
            };
            let v = parse_img_size(s)
                .map_err(|_| format!("Invalid buffer size for sparse output specified: '{s}'."))?;
            if v % 512 != 0 || v > 16 << 20 {
                return Err(bad());
            }
            v
        }
    };
    if a.no_create && !a.options.is_empty() {
        return Err("-o has no effect when skipping image creation".into());
    }
    if !["raw", "qcow2"].contains(&a.out_fmt.as_str()) {
        return Err(format!("Unknown file format '{}'", a.out_fmt));
    }
    if a.compress && a.out_fmt != "qcow2" {
        return Err("Compression not supported for this file format".into());
    }
    crate::secret::define(&a.object)?;
    let encrypt_opts: Vec<(String, String)> = split_opts(&a.options)
        .into_iter()
        .filter(|(k, _)| is_encrypt_option(k))
        .collect();
    if a.compress && !encrypt_opts.is_empty() {
        return Err("Compression and encryption not supported at the same time".into());
    }
    let src = open_arg(
        &a.source,
        a.image_opts,
        a.fmt.as_deref(),
        &OpenOptions::default(),
    )?;
    let size = virtual_size(&src);
    let dst_name = a.destination.clone();
    let fail = |e: String| format!("{dst_name}: error while converting {}: {e}", a.out_fmt);
    let mut encrypted_prealloc = false;
    let mut opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    if !a.no_create {
        let (encrypt, prealloc) = create_target(&a, size).map_err(fail)?;
        if let Some(e) = encrypt {
            opts.key_secret = Some(e.password);
            encrypted_prealloc = prealloc;
        }
    }
    let dst = if a.no_create {
        crate::img_util::open_image(&a.destination, Some(&a.out_fmt), &opts)?
    } else {
        Image::open(Path::new(&a.destination), Some(&a.out_fmt), &opts).map_err(|e| errmsg(&e))?
    };
    if a.no_create && dst.size() < size {
        return Err("output file is smaller than input file".into());
    }
    // A raw source's holes can be skipped without reading them.
    let src_file = match &src {
        Image::Raw(_) => File::open(&a.source).ok(),
        Image::Qcow2(_) | Image::Nbd(_) => None,
    };
    let cluster = match (&dst, a.compress) {
        (Image::Qcow2(q), true) => Some(q.cluster_size()),
        _ => None,
    };
    let job = Job {
        src: &src,
        dst: &dst,
        src_file: src_file.as_ref(),
        size,
        sparse,
        // A preallocated encrypted image does not read as zeros.
        zero_init: !a.no_create && !encrypted_prealloc,
        cluster,
        ordered: !a.oob_writes,
    };
    let progress = Mutex::new(Progress::new(a.progress && !a.quiet));
    let r = job.run(workers, &progress);
    let closed = dst.close().map_err(|e| errmsg(&e));
    r?;
    closed?;
    progress
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .finish();
    Ok(())
}

/// Creates the destination, empty, with the source's size. Returns its
/// encryption and whether it is preallocated.
fn create_target(a: &Args, size: u64) -> CliResult<(Option<EncryptCreate>, bool)> {
    let path = Path::new(&a.destination);
    let opts = split_opts(&a.options);
    if a.out_fmt == "raw" {
        let mut prealloc = "off".to_string();
        for (k, v) in opts {
            match k.as_str() {
                "preallocation" if ["off", "falloc", "full"].contains(&v.as_str()) => prealloc = v,
                "preallocation" => {
                    return Err(format!(
                        "Parameter 'preallocation' does not accept value '{v}'"
                    ))
                }
                "size" => {}
                _ => return Err(format!("Invalid parameter '{k}'")),
            }
        }
        return create_raw(path, size, &prealloc).map(|_| (None, false));
    }
    let mut co = CreateOptions::default();
    let mut encrypt_opts = Vec::new();
    for (k, v) in opts {
        match k.as_str() {
            "size" => {}
            "backing_file" | "backing_fmt" => {
                return Err("a backing file for the target is not supported by oxqcow".into())
            }
            "version" => return Err("Invalid parameter 'version'".into()),
            _ if is_encrypt_option(&k) => encrypt_opts.push((k, v)),
            _ => co.set(&k, &v).map_err(|e| errmsg(&e))?,
        }
    }
    co.size = size;
    check_encrypt_option_syntax(&encrypt_opts).map_err(|e| errmsg(&e))?;
    co.encrypt = encrypt_create_from_options(&encrypt_opts, &mut |id| {
        crate::secret::get(id).map_err(oxqcow::Error::InvalidArgument)
    })
    .map_err(|e| errmsg(&e))?;
    create(path, &co).map_err(|e| errmsg(&e))?;
    Ok((co.encrypt, co.preallocation != oxqcow::Preallocation::Off))
}

/// One conversion: what to copy where, and how.
struct Job<'a> {
    src: &'a Image,
    dst: &'a Image,
    src_file: Option<&'a File>,
    size: u64,
    sparse: u64,
    /// The target reads as zeros already (freshly created).
    zero_init: bool,
    /// Compressed output: the target's cluster size.
    cluster: Option<u64>,
    /// Writes happen in guest order (no -W).
    ordered: bool,
}

/// What the workers share.
struct Shared {
    next_chunk: u64,
    /// The chunk whose turn it is to write (ordered mode).
    turn: u64,
    done: u64,
    error: Option<String>,
}

impl Job<'_> {
    fn run(&self, workers: usize, progress: &Mutex<Progress>) -> CliResult<()> {
        let chunks = self.size.div_ceil(CHUNK);
        let shared = Mutex::new(Shared {
            next_chunk: 0,
            turn: 0,
            done: 0,
            error: None,
        });
        let cond = Condvar::new();
        let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
        let worker = || {
            let mut buf = vec![0u8; CHUNK as usize];
            loop {
                let i = {
                    let mut sh = lock();
                    if sh.error.is_some() || sh.next_chunk >= chunks {
                        return;
                    }
                    sh.next_chunk += 1;
                    sh.next_chunk - 1
                };
                let r = self.chunk(i, &mut buf, &shared, &cond);
                let mut sh = lock();
                match r {
                    Ok(()) => {
                        sh.done += 1;
                        let pos = ((sh.done) * CHUNK).min(self.size);
                        progress
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .update(pos, self.size);
                    }
                    Err(e) => {
                        sh.error.get_or_insert(e);
                    }
                }
                cond.notify_all();
            }
        };
        std::thread::scope(|s| {
            for _ in 0..workers.min(chunks.max(1) as usize) {
                s.spawn(worker);
            }
        });
        match shared.into_inner().unwrap_or_else(|e| e.into_inner()).error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Reads chunk `i` and writes it (in its turn when ordered).
    fn chunk(
        &self,
        i: u64,
        buf: &mut [u8],
        shared: &Mutex<Shared>,
        cond: &Condvar,
    ) -> CliResult<()> {
        let start = i * CHUNK;
        let end = (start + CHUNK).min(self.size);
        let pieces = self.read_chunk(start, end, buf)?;
        if self.ordered {
            let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
            while sh.turn != i && sh.error.is_none() {
                sh = cond.wait(sh).unwrap_or_else(|e| e.into_inner());
            }
            if let Some(e) = &sh.error {
                return Err(e.clone());
            }
            drop(sh);
            let r = self.write_chunk(start, &pieces, buf);
            let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
            sh.turn += 1;
            cond.notify_all();
            r
        } else {
            self.write_chunk(start, &pieces, buf)
        }
    }

    /// Fills `buf` with [start, end) of the source; returns the pieces as
    /// (offset, length, has data), zero pieces left unread.
    fn read_chunk(&self, start: u64, end: u64, buf: &mut [u8]) -> CliResult<Vec<(u64, u64, bool)>> {
        let mut pieces = Vec::new();
        let mut pos = start;
        while pos < end {
            let want = end - pos;
            let (st, mut n) = self.src.block_status(pos, want).map_err(|e| {
                format!(
                    "error while reading block status at byte {pos}: {}",
                    errmsg(&e)
                )
            })?;
            n = n.clamp(1, want);
            let mut zero = matches!(
                st,
                BlockStatus::Zero { .. } | BlockStatus::Unallocated { .. }
            );
            if let (Some(f), false) = (self.src_file, zero) {
                let (is_data, len) = file_extent(f, pos, n);
                n = len.clamp(1, n);
                zero = !is_data;
            }
            let b = &mut buf[(pos - start) as usize..(pos - start + n) as usize];
            if zero {
                b.fill(0);
            } else {
                self.src
                    .read_at(b, pos)
                    .map_err(|e| format!("error while reading at byte {pos}: {}", errmsg(&e)))?;
            }
            pieces.push((pos, n, !zero));
            pos += n;
        }
        Ok(pieces)
    }

    fn write_chunk(&self, start: u64, pieces: &[(u64, u64, bool)], buf: &[u8]) -> CliResult<()> {
        let at = |pos: u64, n: u64| &buf[(pos - start) as usize..(pos - start + n) as usize];
        if let Some(cs) = self.cluster {
            // Whole target clusters, compressed when they hold data.
            let end = pieces.last().map(|p| p.0 + p.1).unwrap_or(start);
            let mut c = start;
            while c < end {
                let n = cs.min(end - c);
                let b = at(c, n);
                if b.iter().any(|&x| x != 0) {
                    let q = self.dst.qcow2().expect("compressed output is qcow2");
                    // QEMU compresses only into clusters without a host cluster.
                    let taken = match q.l2_entry_at(c) {
                        Ok(L2Entry::Unallocated) | Ok(L2Entry::Zero { host: 0, .. }) => false,
                        Ok(_) => true,
                        Err(e) => {
                            return Err(format!("error while writing at byte {c}: {}", errmsg(&e)))
                        }
                    };
                    if taken {
                        return Err(format!(
                            "error while writing at byte {c}: {}",
                            crate::img_util::strerror(libc::EIO)
                        ));
                    }
                    // qemu-img words a failed write with strerror() alone
                    // (ENOTSUP for an image with an external data file).
                    q.write_compressed(b, c).map_err(|e| {
                        format!(
                            "error while writing at byte {c}: {}",
                            crate::img_util::errno_text(&e)
                        )
                    })?;
                } else if !self.zero_init {
                    self.zero(c, n)?;
                }
                c += n;
            }
            return Ok(());
        }
        for &(pos, n, data) in pieces {
            if !data && self.sparse != 0 {
                if !self.zero_init {
                    self.zero(pos, n)?;
                }
                continue;
            }
            write_nonzero(self.dst, at(pos, n), pos, self.sparse, self.zero_init)
                .map_err(|e| format!("error while writing at byte {pos}: {e}"))?;
        }
        Ok(())
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

/// qemu-img's progress line: `    (12.34/100%)` rewritten with \r.
struct Progress {
    on: bool,
    last: f64,
}

impl Progress {
    fn new(on: bool) -> Progress {
        let p = Progress { on, last: 0.0 };
        p.print(0.0);
        p
    }

    fn print(&self, pct: f64) {
        if self.on {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "    ({pct:.2}/100%)\r");
            let _ = out.flush();
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        if pct - self.last >= 1.0 || (pct >= 100.0 && self.last < 100.0) {
            self.last = pct;
            self.print(pct);
        }
    }

    fn finish(&self) {
        if self.on {
            self.print(100.0);
            println!();
        }
    }
}
