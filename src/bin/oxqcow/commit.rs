//! `oxqcow commit`: qemu-img commit. Every range that the image (and,
//! with -b, every layer above the chosen base) has allocated is written
//! into the base: data as data, zero clusters as zeroes that unmap. The
//! base grows to the image's size when it is smaller. Afterwards the image
//! is emptied unless -d (or -b, which implies it) was given.

use crate::img_util::{open_named, parse_cache_mode, QProgress};
use crate::util::{errmsg, parse_img_size, resolve_backing, CliResult};
use oxqcow::{BlockStatus, Image, OpenOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Quiet operation
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    fmt: Option<String>,
    /// FILENAME is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Cache mode
    #[arg(short = 't', long = "cache", value_name = "CACHE_MODE")]
    cache: Option<String>,
    /// Commit into this image of the backing chain (implies -d)
    #[arg(short = 'b', long = "base", value_name = "BASE_IMG")]
    base: Option<String>,
    /// Do not empty the image afterwards
    #[arg(short = 'd', long = "drop")]
    drop: bool,
    /// I/O rate limit (accepted, not enforced)
    #[arg(short = 'r', long = "rate", value_name = "RATE")]
    rate: Option<String>,
    /// Image file
    filename: String,
}

/// Bytes copied per step.
const CHUNK: u64 = 2 << 20;

pub fn run(a: Args) -> CliResult<()> {
    if let Some(r) = &a.rate {
        parse_img_size(r).map_err(|_| format!("Invalid rate limit specified: '{r}'."))?;
    }
    let cache = match &a.cache {
        Some(c) => parse_cache_mode(c).ok_or_else(|| format!("Invalid cache option: {c}"))?,
        None => Default::default(),
    };
    let opts = OpenOptions {
        writable: true,
        writethrough: cache.writethrough,
        direct: cache.direct,
        ..Default::default()
    };
    let top = open_named(&a.filename, a.image_opts, a.fmt.as_deref(), &opts)?.img;
    // The chain below the image: (path, format) by depth, 1 = backing file.
    let mut chain: Vec<(PathBuf, &'static str, u64)> = Vec::new();
    let mut layer = top.backing();
    while let Some(l) = layer {
        chain.push((PathBuf::from(l.filename()), l.format(), l.size()));
        layer = l.backing();
    }
    if chain.is_empty() {
        return Err("Image does not have a backing file".into());
    }
    let depth = match &a.base {
        None => 1,
        Some(b) => {
            // Relative to the image's directory only, as QEMU looks it up.
            let want = std::fs::canonicalize(resolve_backing(&a.filename, b));
            let found = want.ok().and_then(|w| {
                chain
                    .iter()
                    .position(|(p, _, _)| std::fs::canonicalize(p).ok().as_ref() == Some(&w))
            });
            match found {
                Some(i) => i + 1,
                None => {
                    return Err(format!(
                        "Did not find '{b}' in the backing chain of '{}'",
                        a.filename
                    ))
                }
            }
        }
    };
    let drop_top = a.drop || a.base.is_some();
    let (base_path, base_fmt, _) = chain[depth - 1].clone();
    // A backing file named by a json: string (blkdebug rules, a raw
    // window) is opened with its options, as QEMU's commit writes through
    // the backing node itself.
    let json = match (depth, top.qcow2()) {
        (1, Some(q)) => q.header().backing_file.filter(|b| b.starts_with("json:")),
        _ => None,
    };
    let base_name = base_path.display().to_string();
    let base_opts = OpenOptions {
        writable: true,
        writethrough: cache.writethrough,
        direct: cache.direct,
        ..Default::default()
    };
    let base = match &json {
        Some(j) => open_named(j, false, None, &base_opts)?.img,
        None => open_named(&base_name, false, Some(base_fmt), &base_opts)?.img,
    };
    let size = top.size();
    let mut progress = QProgress::new(a.progress && !a.quiet, 1.0);
    progress.add(0.0, 100);
    if base.size() < size {
        base.resize(size).map_err(|e| {
            format!(
                "Top image {} is larger than base image {base_name}, and resize of base image failed: {}",
                a.filename,
                errmsg(&e)
            )
        })?;
    }
    let copied = copy(&top, &base, size, depth, &mut progress);
    // The base is closed whether the copy worked or not: bitmaps it
    // cannot store then are reported before the job's own failure.
    let closed = base.close().map_err(|e| errmsg(&e));
    let lost = match &closed {
        Err(e) => crate::img_util::report_lost_bitmaps(e, false, copied.is_err()),
        Ok(()) => false,
    };
    copied?;
    if lost {
        return Err(String::new());
    }
    closed?;
    drop(base);
    if !drop_top {
        if let Image::Qcow2(q) = &top {
            q.make_empty().map_err(|e| {
                format!(
                    "Failed to empty {}: {}",
                    a.filename,
                    crate::img_util::errno_text(&e)
                )
            })?;
        }
    }
    top.close().map_err(|e| errmsg(&e))?;
    progress.add(100.0, 0);
    progress.end();
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(())
}

/// A failed request of the copy: QEMU's commit job reports the errno.
fn job_failed(e: &oxqcow::Error) -> String {
    format!("Block job failed: {}", crate::img_util::errno_text(e))
}

/// Writes every range allocated above the base (layers shallower than
/// `depth`) into the base.
fn copy(
    top: &Image,
    base: &Image,
    size: u64,
    depth: usize,
    progress: &mut QProgress,
) -> CliResult<()> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    while off < size {
        let want = (size - off).min(CHUNK);
        let (st, n) = top.block_status(off, want).map_err(|e| errmsg(&e))?;
        let n = n.clamp(1, want);
        let above = |d: u32| (d as usize) < depth;
        match st {
            BlockStatus::Data { depth: d, .. } if above(d) => {
                let b = &mut buf[..n as usize];
                top.read_at(b, off).map_err(|e| job_failed(&e))?;
                base.write_at(b, off).map_err(|e| job_failed(&e))?;
            }
            // Past the end of a shorter layer above the base the image
            // reads zeros that this layer "has": QEMU commits them too.
            BlockStatus::Zero { depth: d } | BlockStatus::Unallocated { depth: d }
                if above(d) && (matches!(st, BlockStatus::Zero { .. }) || d > 0) =>
            {
                base.write_zeroes(off, n, true)
                    .map_err(|e| job_failed(&e))?;
            }
            _ => {}
        }
        off += n;
        progress.add(n as f32 * 100.0 / size as f32, 100);
    }
    Ok(())
}
