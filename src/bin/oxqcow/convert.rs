//! `oxqcow convert`: copies the guest contents of an image (its whole
//! backing chain flattened, or with a backing file for the target only
//! its top image) into a new qcow2 or raw image. Owns the command line,
//! target creation from the -o options and -B/-F, and opening both
//! sides; the copy itself (sparse detection, -c, -m/-W, the `-p`
//! progress steps) is `convert_job`'s. With -n the target exists
//! already: it is not created and its zero ranges are written as zeroes.
//! Several sources are concatenated into one target as large as all of
//! them (one source is the one-element case); -l, -B and --bitmaps then
//! refuse, in qemu-img's order: every source is opened before the
//! target's options are looked at.

#[path = "convert_job.rs"]
mod job;

use crate::create::create_raw;
use crate::img_util::{open_image, open_named, parse_cache_mode, CacheMode, QProgress};
use crate::util::{errmsg, parse_img_size, split_opts, virtual_size, CliResult};
use oxqcow::crypto::{
    check_encrypt_option_syntax, encrypt_create_from_options, is_encrypt_option, EncryptCreate,
};
use oxqcow::engine::{create, CreateOptions};
use oxqcow::{Image, OpenOptions};
use std::fs::File;
use std::path::Path;

#[derive(clap::Args)]
pub struct Args {
    /// Show progress
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: no progress
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Source image format (probed when not given)
    #[arg(short = 'f', long = "source-format", value_name = "FMT")]
    fmt: Option<String>,
    /// The source is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts", alias = "source-image-opts")]
    image_opts: bool,
    /// Internal snapshot of the source to copy: NAME_OR_ID, or
    /// snapshot.id=ID[,snapshot.name=NAME]
    #[arg(short = 'l', value_name = "SNAPSHOT_PARAMS")]
    snapshot: Option<String>,
    /// Output format: raw or qcow2
    #[arg(short = 'O', value_name = "OUTPUT_FMT", default_value = "raw")]
    out_fmt: String,
    /// Output format options, NAME=VALUE[,NAME=VALUE...] (may be repeated)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file of the target: only the source's top image is copied
    #[arg(short = 'B', long = "backing", value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// Format of the target's backing file
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_fmt: Option<String>,
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
    /// Target cache mode (default unsafe: no syncs, as qemu-img)
    #[arg(short = 't', long = "target-cache", value_name = "TGT_CACHE")]
    target_cache: Option<String>,
    /// Source cache mode (default writeback; none reads with O_DIRECT)
    #[arg(short = 'T', long = "source-cache", value_name = "SRC_CACHE")]
    source_cache: Option<String>,
    /// Copy the persistent bitmaps of the source's top image too
    #[arg(long = "bitmaps")]
    bitmaps: bool,
    /// With --bitmaps: skip inconsistent bitmaps instead of failing
    #[arg(long = "skip-broken-bitmaps")]
    skip_broken_bitmaps: bool,
    /// Copy what can be read: unreadable sectors become zeros, with a
    /// warning each
    #[arg(long = "salvage")]
    salvage: bool,
    /// Accepted for compatibility (the source is always opened read-only)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Define an object: secret,id=ID,data=PASSWORD|file=PATH[,format=raw|base64]
    #[arg(long = "object", value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// Source images (or json:{...}, or option strings with
    /// --image-opts), then the destination; several sources are
    /// concatenated into one target
    #[arg(value_name = "FILENAME")]
    files: Vec<String>,
}

impl Args {
    /// The source names: every file but the last.
    fn sources(&self) -> &[String] {
        &self.files[..self.files.len().saturating_sub(1)]
    }

    fn destination(&self) -> &str {
        self.files.last().map_or("", String::as_str)
    }
}

pub fn run(a: Args) -> CliResult<()> {
    let _ = a.force_share;
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
    let src_cache = a.source_cache.as_deref().unwrap_or("writeback");
    let src_cache = parse_cache_mode(src_cache)
        .ok_or_else(|| format!("Invalid source cache option: {src_cache}"))?;
    if a.skip_broken_bitmaps && !a.bitmaps {
        return Err("Use of --skip-broken-bitmaps requires --bitmaps".into());
    }
    if a.no_create && !a.options.is_empty() {
        return Err("-o has no effect when skipping image creation".into());
    }
    if a.files.len() < 2 {
        return Err("Must specify image file name".into());
    }
    crate::secret::define(&a.object)?;
    // qemu-img prints the first progress line before opening anything,
    // and ends the line whatever happens.
    let mut progress = QProgress::new(a.progress && !a.quiet, 1.0);
    progress.add(0.0, 0);
    let r = convert(&a, src_cache, workers, sparse, &mut progress);
    let r = match r {
        Ok(()) => {
            progress.add(100.0, 0);
            Ok(())
        }
        Err(e) => {
            crate::util::report(&e);
            Err(String::new())
        }
    };
    progress.end();
    r
}

/// What a new target is created with (dd's: nothing but its size).
#[derive(Default)]
pub struct Target {
    pub options: Vec<(String, String)>,
    pub backing: Option<String>,
    pub backing_fmt: Option<String>,
}

impl Target {
    /// -B and -F, or else backing_file and backing_fmt among the -o options
    /// (the -o values win, as the options are applied last).
    fn from_args(a: &Args) -> Target {
        let mut t = Target {
            options: Vec::new(),
            backing: a.backing.clone(),
            backing_fmt: a.backing_fmt.clone(),
        };
        for (k, v) in split_opts(&a.options) {
            match k.as_str() {
                "backing_file" => t.backing = Some(v),
                "backing_fmt" => t.backing_fmt = Some(v),
                _ => t.options.push((k, v)),
            }
        }
        t
    }
}

fn convert(
    a: &Args,
    src_cache: CacheMode,
    workers: usize,
    sparse: u64,
    progress: &mut QProgress,
) -> CliResult<()> {
    let ro = OpenOptions {
        direct: src_cache.direct,
        ..Default::default()
    };
    // qemu-img opens every source before it looks at the target's options.
    let srcs = (a.sources().iter())
        .map(|name| open_named(name, a.image_opts, a.fmt.as_deref(), &ro))
        .collect::<CliResult<Vec<_>>>()?;
    let single = srcs.len() == 1;
    if let Some(p) = &a.snapshot {
        if !single {
            return Err("No support for concatenating multiple snapshot".into());
        }
        load_snapshot(&srcs[0].img, p)?;
    }
    if !["raw", "qcow2"].contains(&a.out_fmt.as_str()) {
        return Err(format!("Unknown file format '{}'", a.out_fmt));
    }
    let target = &Target::from_args(a);
    if target.backing.is_some() && a.out_fmt == "raw" {
        return Err("Backing file not supported for file format 'raw'".into());
    }
    if a.compress && a.out_fmt != "qcow2" {
        return Err("Compression not supported for this file format".into());
    }
    if target.backing.is_some() && !single {
        return Err(
            "Having a backing file for the target makes no sense when concatenating multiple input images"
                .into(),
        );
    }
    if !a.no_create && target.backing.is_some() && target.backing_fmt.is_none() {
        return Err("Use of backing file requires explicit backing format".into());
    }
    if a.compress && target.options.iter().any(|(k, _)| is_encrypt_option(k)) {
        return Err("Compression and encryption not supported at the same time".into());
    }
    if a.bitmaps && !single {
        return Err("Copying bitmaps only possible with single source".into());
    }
    // A copy is made durable by whoever keeps it: qemu-img convert writes
    // its target with cache=unsafe unless told otherwise.
    let dst_cache = a.target_cache.as_deref().unwrap_or("unsafe");
    let dst_cache =
        parse_cache_mode(dst_cache).ok_or_else(|| format!("Invalid cache option: {dst_cache}"))?;
    let bitmaps = match a.bitmaps {
        true => bitmaps_to_copy(&srcs[0].img, a.skip_broken_bitmaps)?,
        false => Vec::new(),
    };
    // The target holds the sources one after the other.
    let mut sources = Vec::with_capacity(srcs.len());
    let mut size = 0;
    for s in &srcs {
        let len = virtual_size(&s.img);
        // A raw source's holes can be skipped without reading them.
        let file = match (&s.img, &s.file) {
            (Image::Raw(_), Some(f)) => File::open(f).ok(),
            _ => None,
        };
        sources.push(job::Source {
            img: &s.img,
            file,
            dbg: &s.top_dbg,
            start: size,
            size: len,
        });
        size += len;
    }
    let dst_name = a.destination().to_string();
    let fail = |e: String| format!("{dst_name}: error while converting {}: {e}", a.out_fmt);
    let mut encrypted_prealloc = false;
    let mut opts = OpenOptions {
        writable: true,
        writethrough: dst_cache.writethrough,
        direct: dst_cache.direct,
        no_flush: dst_cache.no_flush,
        ..Default::default()
    };
    if !a.no_create {
        let (encrypt, prealloc) =
            create_target(Path::new(&dst_name), &a.out_fmt, target, size).map_err(fail)?;
        if let Some(e) = encrypt {
            opts.key_secret = Some(e.password);
            encrypted_prealloc = prealloc;
        }
    }
    let dst = open_image(&dst_name, Some(&a.out_fmt), &opts)?;
    if a.bitmaps && !matches!(&dst, Image::Qcow2(q) if q.version() >= 3) {
        return Err(format!(
            "Format driver '{}' does not support bitmaps",
            a.out_fmt
        ));
    }
    if a.no_create && dst.size() < size {
        return Err("output file is smaller than input file".into());
    }
    let cluster = match (&dst, a.compress) {
        (Image::Qcow2(q), true) => Some(q.cluster_size()),
        _ => None,
    };
    let has_backing = target.backing.is_some();
    let job = job::Job {
        srcs: &sources,
        dst: &dst,
        size,
        sparse,
        // A preallocated encrypted image does not read as zeros.
        zero_init: !a.no_create && !has_backing && !encrypted_prealloc,
        cluster,
        ordered: !a.oob_writes,
        top_only: has_backing,
        salvage: a.salvage,
    };
    // Salvaging warns in guest order, as qemu-img does: one worker.
    let workers = if a.salvage { 1 } else { workers };
    let r = job
        .run(workers, progress)
        .and_then(|_| copy_bitmaps(&srcs[0].img, &dst, &bitmaps));
    let closed = dst.close().map_err(|e| errmsg(&e));
    r?;
    closed
}

/// --bitmaps: the persistent bitmaps of the source's top image that are
/// copied, in directory order. An inconsistent one fails the convert
/// before the target is created, or with `skip` is left out with a
/// warning; qemu-img looks at them last to first.
fn bitmaps_to_copy(src: &Image, skip: bool) -> CliResult<Vec<oxqcow::engine::BitmapInfo>> {
    let Image::Qcow2(q) = src else {
        return Err("Source lacks bitmap support".into());
    };
    let mut list = q.bitmap_list().map_err(|e| errmsg(&e))?;
    for b in list.iter().rev().filter(|b| b.inconsistent) {
        if !skip {
            return Err(format!(
                "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
                b.name
            ));
        }
        crate::util::report(&format!(
            "warning: Skipping inconsistent bitmap '{}'",
            b.name
        ));
    }
    list.retain(|b| !b.inconsistent);
    Ok(list)
}

/// Adds each bitmap to the target (same name, granularity and enabled
/// state) and merges the source's bits into it, once the data is copied
/// so that the copy's own writes leave no trace in them.
fn copy_bitmaps(src: &Image, dst: &Image, list: &[oxqcow::engine::BitmapInfo]) -> CliResult<()> {
    let (Image::Qcow2(s), Image::Qcow2(d)) = (src, dst) else {
        return Ok(());
    };
    for b in list {
        d.bitmap_add(&b.name, Some(b.granularity), b.enabled)
            .and_then(|_| d.bitmap_merge(&b.name, s, &b.name))
            .map_err(|e| errmsg(&e))?;
    }
    Ok(())
}

/// `-l`: makes the source show one of its internal snapshots. A plain
/// parameter is an ID or a name; `snapshot.id=` and `snapshot.name=` must
/// both match when both are given.
pub(crate) fn load_snapshot(img: &Image, param: &str) -> CliResult<()> {
    let (mut id, mut name) = (None, None);
    if param.starts_with("snapshot.") {
        for (k, v) in split_opts(&[param.to_string()]) {
            match k.as_str() {
                "snapshot.id" => id = Some(v),
                "snapshot.name" => name = Some(v),
                _ => {
                    crate::util::report(&format!("Invalid parameter '{k}'"));
                    return Err(format!("Failed in parsing snapshot param '{param}'"));
                }
            }
        }
    }
    let fail = |e: String| format!("Failed to load snapshot: {e}");
    let Image::Qcow2(q) = img else {
        return Err(fail(format!(
            "Block format '{}' used by device '' does not support temporarily loading internal snapshots",
            img.format()
        )));
    };
    let r = match (id, name) {
        (None, None) => q
            .snapshot_load_tmp(Some(param), None)
            .or_else(|_| q.snapshot_load_tmp(None, Some(param))),
        (id, name) => q.snapshot_load_tmp(id.as_deref(), name.as_deref()),
    };
    r.map_err(|e| fail(errmsg(&e)))
}

/// Creates the destination, empty, with the source's size. Returns its
/// encryption and whether it is preallocated.
pub fn create_target(
    path: &Path,
    fmt: &str,
    t: &Target,
    size: u64,
) -> CliResult<(Option<EncryptCreate>, bool)> {
    if fmt == "raw" {
        let mut prealloc = "off".to_string();
        let mut hint = None;
        for (k, v) in t.options.iter().cloned() {
            match k.as_str() {
                "preallocation" if ["off", "falloc", "full"].contains(&v.as_str()) => prealloc = v,
                "preallocation" => {
                    return Err(format!(
                        "Parameter 'preallocation' does not accept value '{v}'"
                    ))
                }
                "size" => {}
                "extent_size_hint" => hint = Some(crate::img_util::parse_size_param(&k, &v)?),
                _ => return Err(format!("Invalid parameter '{k}'")),
            }
        }
        return create_raw(path, size, &prealloc, hint).map(|_| (None, false));
    }
    let mut co = CreateOptions::default();
    let mut encrypt_opts = Vec::new();
    for (k, v) in &t.options {
        match k.as_str() {
            "size" => {}
            "version" => return Err("Invalid parameter 'version'".into()),
            _ if is_encrypt_option(k) => encrypt_opts.push((k.clone(), v.clone())),
            _ => co.set(k, v).map_err(|e| errmsg(&e))?,
        }
    }
    co.size = size;
    co.backing_file = t.backing.clone();
    co.backing_fmt = t.backing_fmt.clone();
    check_encrypt_option_syntax(&encrypt_opts).map_err(|e| errmsg(&e))?;
    co.encrypt = encrypt_create_from_options(&encrypt_opts, &mut |id| {
        crate::secret::get(id).map_err(oxqcow::Error::InvalidArgument)
    })
    .map_err(|e| errmsg(&e))?;
    create(path, &co).map_err(|e| errmsg(&e))?;
    Ok((co.encrypt, co.preallocation != oxqcow::Preallocation::Off))
}
