//! `oxqcow convert`: copies the guest contents of a qcow2 or raw image
//! (its whole backing chain flattened) into a new qcow2 or raw image.
//! Owns target creation from the -o options, the chunked copy that skips
//! ranges block status reports as zero or unallocated and all-zero blocks
//! of the -S size (so the target stays sparse), and qemu-img's `-p`
//! progress line.

use crate::create::create_raw;
use crate::util::CliResult;
use crate::util::{errmsg, file_extent, open_ro, parse_img_size, split_opts, virtual_size};
use oxqcow::engine::{create, CreateOptions};
use oxqcow::{BlockStatus, Image, OpenOptions};
use std::fs::File;
use std::io::Write;
use std::path::Path;

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
    /// Compress the output (not supported)
    #[arg(short = 'c')]
    compress: bool,
    /// Accepted for compatibility (the source is always opened read-only)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Source image
    source: String,
    /// Destination image
    destination: String,
}

/// Bytes copied per step.
const CHUNK: u64 = 2 << 20;

pub fn run(a: Args) -> CliResult<()> {
    let _ = a.force_share;
    let sparse = match &a.sparse {
        None => 4096,
        Some(s) => {
            let bad = || {
                "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).".to_string()
            };
            let v = parse_img_size(s).map_err(|_| bad())?;
            if v % 512 != 0 || v > 16 << 20 {
                return Err(bad());
            }
            v
        }
    };
    if !["raw", "qcow2"].contains(&a.out_fmt.as_str()) {
        return Err(format!("Unknown file format '{}'", a.out_fmt));
    }
    if a.compress {
        return Err("Compression not supported for this file format".into());
    }
    let src = open_ro(&a.source, a.fmt.as_deref(), false)?;
    let size = virtual_size(&src);
    let dst_name = a.destination.clone();
    let fail = |e: String| format!("{dst_name}: error while converting {}: {e}", a.out_fmt);
    create_target(&a, size).map_err(fail)?;
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let dst =
        Image::open(Path::new(&a.destination), Some(&a.out_fmt), &opts).map_err(|e| errmsg(&e))?;
    // A raw source's holes can be skipped without reading them.
    let src_file = match &src {
        Image::Raw(_) => File::open(&a.source).ok(),
        Image::Qcow2(_) => None,
    };
    let mut progress = Progress::new(a.progress && !a.quiet);
    let r = copy(&src, &dst, src_file.as_ref(), size, sparse, &mut progress);
    let closed = dst.close().map_err(|e| errmsg(&e));
    r?;
    closed?;
    progress.finish();
    Ok(())
}

/// Creates the destination, empty, with the source's size.
fn create_target(a: &Args, size: u64) -> CliResult<()> {
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
        return create_raw(path, size, &prealloc);
    }
    let mut co = CreateOptions::default();
    for (k, v) in opts {
        match k.as_str() {
            "size" => {}
            "backing_file" | "backing_fmt" => {
                return Err("a backing file for the target is not supported by oxqcow".into())
            }
            "version" => return Err("Invalid parameter 'version'".into()),
            _ => co.set(&k, &v).map_err(|e| errmsg(&e))?,
        }
    }
    co.size = size;
    create(path, &co).map_err(|e| errmsg(&e))
}

fn copy(
    src: &Image,
    dst: &Image,
    src_file: Option<&File>,
    size: u64,
    sparse: u64,
    progress: &mut Progress,
) -> CliResult<()> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    while pos < size {
        // Zero ranges are skipped whole; data is copied a chunk at a time.
        let want = size - pos;
        let (st, mut n) = src.block_status(pos, want).map_err(|e| {
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
        if let (Some(f), false) = (src_file, zero) {
            let (is_data, len) = file_extent(f, pos, n);
            n = len.clamp(1, n);
            zero = !is_data;
        }
        if !zero || sparse == 0 {
            n = n.min(CHUNK);
            let b = &mut buf[..n as usize];
            if zero {
                b.fill(0);
            } else {
                src.read_at(b, pos)
                    .map_err(|e| format!("error while reading at byte {pos}: {}", errmsg(&e)))?;
            }
            write_nonzero(dst, b, pos, sparse)
                .map_err(|e| format!("error while writing at byte {pos}: {e}"))?;
        }
        pos += n;
        progress.update(pos, size);
    }
    Ok(())
}

/// Writes `b` at `pos`, leaving out every all-zero block of `sparse` bytes
/// (aligned to guest offsets); `sparse` 0 writes everything.
fn write_nonzero(dst: &Image, b: &[u8], pos: u64, sparse: u64) -> CliResult<()> {
    let write = |from: usize, to: usize| {
        dst.write_at(&b[from..to], pos + from as u64)
            .map_err(|e| errmsg(&e))
    };
    if sparse == 0 {
        return write(0, b.len());
    }
    let mut run_start: Option<usize> = None;
    let mut i = 0usize;
    while i < b.len() {
        let abs = pos + i as u64;
        let blk_end = ((abs / sparse + 1) * sparse - pos) as usize;
        let end = blk_end.min(b.len());
        let is_zero = b[i..end].iter().all(|&x| x == 0);
        match (is_zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                write(s, i)?;
                run_start = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(s) = run_start {
        write(s, b.len())?;
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
