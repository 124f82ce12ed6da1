//! `oxqcow rebase`: qemu-img rebase. Unsafe mode (-u) only rewrites the
//! backing file name and format. Safe mode keeps the guest view: wherever
//! the overlay has no data of its own, the old backing chain and the new
//! backing file are compared, and the clusters where they differ get the
//! old chain's data written into the overlay (whole overlay clusters, so
//! no partial-cluster copy-on-write); then the backing file is changed.

use crate::img_util::{open_image, open_named, read_padded, usage_error, QProgress};
use crate::util::{errmsg, resolve_backing, CliResult};
use oxqcow::{BlockStatus, Image, OpenOptions};

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
    /// Cache mode of the image (accepted, ignored)
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// New backing file ("" for none)
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILENAME")]
    backing: Option<String>,
    /// Format of the new backing file
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_fmt: Option<String>,
    /// Cache mode of the backing file (accepted, ignored)
    #[arg(short = 'T', long = "backing-cache", value_name = "CACHE")]
    backing_cache: Option<String>,
    /// Unsafe: only change the backing file name, copy nothing
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_mode: bool,
    /// Write the copied clusters compressed
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Open in shared mode (accepted, ignored)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Image file
    filename: String,
}

/// Bytes compared per step.
const IO_BUF: u64 = 2 << 20;

pub fn run(a: Args) -> CliResult<()> {
    let _ = (&a.cache, &a.backing_cache, a.force_share);
    let Some(backing) = a.backing.clone() else {
        if !a.unsafe_mode {
            usage_error(
                "rebase",
                "Must specify backing file (-b) or use unsafe mode (-u)",
            );
        }
        return rebase_unsafe(&a, None);
    };
    if a.unsafe_mode {
        return rebase_unsafe(&a, Some(&backing));
    }
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let img = open_named(&a.filename, a.image_opts, a.fmt.as_deref(), &opts)?.img;
    let Image::Qcow2(q) = &img else {
        return Err(not_qcow2(&a, &backing));
    };
    let new = if backing.is_empty() {
        None
    } else {
        let path = resolve_backing(&a.filename, &backing).display().to_string();
        let nb =
            open_image(&path, a.backing_fmt.as_deref(), &OpenOptions::default()).map_err(|e| {
                let e = e
                    .strip_prefix(&format!("Could not open '{path}': "))
                    .map(str::to_string)
                    .unwrap_or(e);
                format!("Could not open new backing file '{backing}': {e}")
            })?;
        Some(nb)
    };
    let size = q.size();
    let cs = q.cluster_size();
    let old_size = img.backing().map(|b| b.size()).unwrap_or(0);
    let new_size = new.as_ref().map(|n| n.size()).unwrap_or(0);
    let prefix = new
        .as_ref()
        .and_then(|_| prefix_depth(&img, &resolve_backing(&a.filename, &backing)));
    let mut progress = QProgress::new(a.progress && !a.quiet, 2.0);
    progress.add(0.0, 100);
    let step = if size == 0 {
        0.0
    } else {
        100.0 / (size / size.min(IO_BUF)) as f32
    };
    let meta_err = |e: oxqcow::Error| {
        format!(
            "error while reading image metadata: {}",
            crate::img_util::errno_text(&e)
        )
    };
    let mut old_buf = vec![0u8; IO_BUF as usize + cs as usize];
    let mut new_buf = vec![0u8; IO_BUF as usize + cs as usize];
    let mut off = 0u64;
    while off < size {
        let mut n = (size - off).min(IO_BUF);
        let (own, m) = top_run(q, off, n).map_err(meta_err)?;
        n = m.clamp(1, n);
        if own {
            off += n;
            continue;
        }
        if let Some(depth) = prefix {
            match allocated_between(&img, depth, off, n).map_err(meta_err)? {
                (false, m) if m > 0 => {
                    off += m;
                    continue;
                }
                (_, 0) => {}
                (_, m) => n = m,
            }
        }
        // Whole overlay clusters, so that no write needs copy-on-write.
        let start = off / cs * cs;
        let mut end = (off + n).div_ceil(cs) * cs;
        end = end.min(size);
        let (off2, mut n2) = (start, end - start);
        let old_zero = off2 >= old_size;
        if !old_zero && off2 + n2 > old_size {
            n2 = old_size - off2;
        }
        if new.is_some() && off2 < new_size && off2 + n2 > new_size {
            n2 = new_size - off2;
        }
        let len = n2 as usize;
        if old_zero {
            old_buf[..len].fill(0);
        } else {
            // The overlay has nothing here: reading it gives the old chain.
            img.read_at(&mut old_buf[..len], off2).map_err(|e| {
                format!(
                    "error while reading from old backing file: {}",
                    crate::img_util::errno_text(&e)
                )
            })?;
        }
        match &new {
            Some(nb) => read_padded(nb, &mut new_buf[..len], off2).map_err(|e| {
                format!(
                    "error while reading from new backing file: {}",
                    crate::img_util::errno_text(&e)
                )
            })?,
            None => new_buf[..len].fill(0),
        }
        copy_differences(&a, q, &old_buf[..len], &new_buf[..len], off2, old_zero)?;
        off = off2 + n2;
        progress.add(step, 100);
    }
    let fmt = if backing.is_empty() {
        None
    } else {
        a.backing_fmt.clone()
    };
    if !backing.is_empty() && fmt.is_none() {
        return Err(format!(
            "Could not change the backing file to '{backing}': backing format must be specified"
        ));
    }
    q.change_backing_file(
        Some(&backing).filter(|b| !b.is_empty()).map(|s| s.as_str()),
        fmt.as_deref(),
    )
    .map_err(|e| {
        format!(
            "Could not change the backing file to '{backing}': {}",
            crate::img_util::errno_text(&e)
        )
    })?;
    drop(new);
    img.close().map_err(|e| errmsg(&e))?;
    progress.add(100.0, 0);
    progress.end();
    Ok(())
}

/// Whether the overlay itself has `off` allocated (data or zero
/// clusters, or subclusters), and for how many bytes of `len` that holds:
/// runs of clusters alike, within one L2 table, as QEMU's allocation query
/// reports them.
fn top_run(q: &oxqcow::Qcow2, off: u64, len: u64) -> oxqcow::Result<(bool, u64)> {
    use oxqcow::format::entries::L2Entry;
    let cb = q.cluster_size().trailing_zeros();
    let l2_span = oxqcow::format::l2_span_ext(cb, q.extended_l2());
    let limit = (off + len).min((off / l2_span + 1) * l2_span);
    // Extended L2 entries: allocation is per subcluster.
    let cs = q.allocation_granularity();
    let alloc =
        |o: u64| -> oxqcow::Result<bool> { Ok(!matches!(q.l2_entry_at(o)?, L2Entry::Unallocated)) };
    let first = alloc(off)?;
    let mut end = (off / cs + 1) * cs;
    while end < limit && alloc(end)? == first {
        end += cs;
    }
    Ok((first, end.min(limit) - off))
}

/// Where the new backing file sits in the overlay's current backing chain
/// (1 = it is the backing file already), if it does.
fn prefix_depth(img: &Image, new_path: &std::path::Path) -> Option<u32> {
    let want = std::fs::canonicalize(new_path).ok()?;
    let mut layer = img.backing();
    let mut depth = 1;
    while let Some(l) = layer {
        if std::fs::canonicalize(l.filename()).ok().as_ref() == Some(&want) {
            return Some(depth);
        }
        layer = l.backing();
        depth += 1;
    }
    None
}

/// Whether a layer between the overlay and the new backing file (depths
/// 1..depth) has `off` allocated, and for how many bytes that holds
/// (0: the old backing file ends before `off`).
fn allocated_between(img: &Image, depth: u32, off: u64, len: u64) -> oxqcow::Result<(bool, u64)> {
    let mut n = len;
    let mut layer = img.backing();
    let mut d = 1;
    while let Some(l) = layer {
        if d >= depth {
            break;
        }
        if off >= l.size() {
            if d == 1 {
                return Ok((false, 0));
            }
        } else {
            let (st, m) = l.status(off, n.min(l.size() - off))?;
            let own = match l.format() {
                "qcow2" => matches!(
                    st,
                    BlockStatus::Data { depth: 0, .. } | BlockStatus::Zero { depth: 0 }
                ),
                _ => true,
            };
            if own {
                return Ok((true, m.max(1)));
            }
            n = n.min(m.max(1));
        }
        layer = l.backing();
        d += 1;
    }
    Ok((false, n))
}

/// Writes the old data of every overlay cluster of `[off, off+len)` where
/// old and new backing data differ; runs of such clusters go in one write.
fn copy_differences(
    a: &Args,
    q: &oxqcow::Qcow2,
    old: &[u8],
    new: &[u8],
    off: u64,
    old_zero: bool,
) -> CliResult<()> {
    // What differs is copied per allocation unit (a subcluster with
    // extended L2 entries), compressed writes per whole cluster.
    let cs = if a.compress {
        q.cluster_size()
    } else {
        q.allocation_granularity()
    };
    let size = q.size();
    let end = off + old.len() as u64;
    let mut c = off / cs * cs;
    let mut run: Option<u64> = None;
    let flush = |from: u64, to: u64| -> CliResult<()> {
        let b = &old[(from - off) as usize..(to - off) as usize];
        let r = if old_zero {
            q.write_zeroes(from, to - from, false)
        } else if a.compress {
            let mut p = from;
            let mut res = Ok(());
            while p < to && res.is_ok() {
                let e = (p + cs).min(to);
                res = q.write_compressed(&old[(p - off) as usize..(e - off) as usize], p);
                p = e;
            }
            res
        } else {
            q.write_at(b, from)
        };
        r.map_err(|e| {
            format!(
                "error while writing to COW image: {}",
                crate::img_util::errno_text(&e)
            )
        })
    };
    while c < end {
        let s = c.max(off);
        let e = (c + cs).min(end).min(size);
        let differs = old[(s - off) as usize..(e - off) as usize]
            != new[(s - off) as usize..(e - off) as usize];
        match (differs, run) {
            (true, None) => run = Some(s),
            (false, Some(r)) => {
                flush(r, s)?;
                run = None;
            }
            _ => {}
        }
        c += cs;
    }
    if let Some(r) = run {
        flush(r, end.min(size))?;
    }
    Ok(())
}

/// Why a raw image cannot be rebased: -c is refused first (raw has no
/// compression), then the backing file change itself.
fn not_qcow2(a: &Args, backing: &str) -> String {
    if a.compress {
        return "Compression not supported for this file format".into();
    }
    format!("Could not change the backing file to '{backing}': Operation not supported")
}

fn rebase_unsafe(a: &Args, backing: Option<&str>) -> CliResult<()> {
    let opts = OpenOptions {
        writable: true,
        no_backing: true,
        ..Default::default()
    };
    let img = open_named(&a.filename, a.image_opts, a.fmt.as_deref(), &opts)?.img;
    let name = backing.unwrap_or("");
    let Image::Qcow2(q) = &img else {
        return Err(not_qcow2(a, name));
    };
    let file = backing.filter(|b| !b.is_empty());
    if file.is_some() && a.backing_fmt.is_none() {
        return Err(format!(
            "Could not change the backing file to '{name}': backing format must be specified"
        ));
    }
    q.change_backing_file(file, a.backing_fmt.as_deref())
        .map_err(|e| {
            format!(
                "Could not change the backing file to '{name}': {}",
                crate::img_util::errno_text(&e)
            )
        })?;
    img.close().map_err(|e| errmsg(&e))?;
    Ok(())
}
