//! `oxqcow resize`: qemu-img resize. Owns the size argument (absolute or
//! +/- relative, a leading '-' is a size and not an option), the
//! --shrink rule with qemu-img's error and warning, raw preallocation of
//! the new tail, and qemu-img's refusals worded as it words them.

use crate::img_util::{open_named, parse_size_param, usage_error};
use crate::util::{errmsg, virtual_size, CliResult};
use oxqcow::{Error, Image, OpenOptions};
use std::os::unix::io::AsRawFd;

#[derive(clap::Args)]
pub struct Args {
    /// Quiet operation
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    fmt: Option<String>,
    /// FILENAME is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Allow the new size to be smaller than the current one
    #[arg(long = "shrink")]
    shrink: bool,
    /// Preallocation of the new area: off (qcow2), off/falloc/full (raw)
    #[arg(long = "preallocation", value_name = "PREALLOC")]
    preallocation: Option<String>,
    /// Image file
    filename: Option<String>,
    /// New size, or +SIZE / -SIZE relative to the current size
    #[arg(allow_hyphen_values = true)]
    size: Option<String>,
    /// (qemu-img refuses extra arguments)
    #[arg(hide = true, allow_hyphen_values = true)]
    extra: Vec<String>,
}

pub fn run(a: Args) -> CliResult<()> {
    let (Some(file), Some(size_arg)) = (&a.filename, &a.size) else {
        usage_error("resize", "Expecting image file name and size");
    };
    if !a.extra.is_empty() {
        usage_error("resize", "Extra argument(s) in command line");
    }
    let prealloc = a.preallocation.as_deref().unwrap_or("off");
    if !["off", "metadata", "falloc", "full"].contains(&prealloc) {
        return Err(format!("Invalid preallocation mode '{prealloc}'"));
    }
    let (rel, digits) = match size_arg.as_bytes().first() {
        Some(b'+') => (1i8, &size_arg[1..]),
        Some(b'-') => (-1i8, &size_arg[1..]),
        _ => (0i8, size_arg.as_str()),
    };
    let amount = parse_size_param("size", digits)?;
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let img = open_named(file, a.image_opts, a.fmt.as_deref(), &opts)?.img;
    let cur = virtual_size(&img);
    let new = match rel {
        0 => amount as i128,
        1 => cur as i128 + amount as i128,
        _ => cur as i128 - amount as i128,
    };
    if new <= 0 {
        return Err("New image size must be positive".into());
    }
    if new > i64::MAX as i128 {
        return Err(format!(
            "Value '{digits}' is out of range for parameter 'size'"
        ));
    }
    let new = new as u64;
    if new < cur && !a.shrink {
        crate::util::report("Use the --shrink option to perform a shrink operation.");
        crate::util::report("warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.");
        std::process::exit(1);
    }
    match &img {
        Image::Qcow2(q) => {
            if !new.is_multiple_of(512) {
                return Err("The new size must be a multiple of 512".into());
            }
            let h = q.header();
            if h.nb_snapshots > 0 && h.version < 3 {
                return Err("Can't resize a v2 image which has snapshots".into());
            }
            let mode = oxqcow::Preallocation::parse(prealloc).map_err(|e| errmsg(&e))?;
            if mode != oxqcow::Preallocation::Off && new <= cur {
                return Err("Preallocation can only be used for growing images".into());
            }
            q.resize_preallocated(new, mode).map_err(|e| match e {
                Error::TooLarge(_) => "Failed to grow the L1 table: File too large".to_string(),
                e => errmsg(&e),
            })?;
        }
        Image::Nbd(_) => img.resize(new).map_err(|e| errmsg(&e))?,
        Image::Raw(_) => {
            if prealloc == "metadata" {
                return Err("Unsupported preallocation mode: metadata".into());
            }
            img.resize(new).map_err(|e| errmsg(&e))?;
            if new > cur && prealloc != "off" {
                preallocate_raw(file, cur, new, prealloc == "full")?;
            }
        }
    }
    img.close().map_err(|e| errmsg(&e))?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(())
}

/// Allocates the new tail of a raw file: fallocate, or zeros written out.
fn preallocate_raw(file: &str, from: u64, to: u64, full: bool) -> CliResult<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .map_err(|e| format!("Could not open '{file}': {e}"))?;
    if full {
        use std::os::unix::fs::FileExt;
        let zeros = vec![0u8; 1 << 20];
        let mut pos = from;
        while pos < to {
            let n = (to - pos).min(zeros.len() as u64) as usize;
            f.write_all_at(&zeros[..n], pos)
                .map_err(|e| format!("Could not write zeros for preallocation: {e}"))?;
            pos += n as u64;
        }
    } else {
        // SAFETY: fallocate on a descriptor we own, with integer arguments.
        let r = unsafe {
            libc::posix_fallocate(
                f.as_raw_fd(),
                from as libc::off_t,
                (to - from) as libc::off_t,
            )
        };
        if r != 0 {
            return Err(format!(
                "Could not preallocate new data: {}",
                crate::img_util::strerror(r)
            ));
        }
    }
    f.sync_all()
        .map_err(|e| format!("Could not sync '{file}': {e}"))?;
    Ok(())
}
