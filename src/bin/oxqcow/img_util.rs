//! Helpers shared by the qemu-img style maintenance commands (check,
//! amend, resize, rebase, commit, snapshot, measure, compare, bench):
//! opening images with QEMU's error wording, cache modes, usage errors
//! with qemu-img's "Try ... --help" line, exit codes other than 1, errno
//! texts, and the `-p` progress line.

use crate::util::{errmsg, ioerr, CliResult};
use oxqcow::{Image, OpenOptions};
use std::io::Write;
use std::path::Path;

/// Prints a usage error the way qemu-img does and exits with status 1.
pub fn usage_error(cmd: &str, msg: &str) -> ! {
    eprintln!("oxqcow: {msg}");
    eprintln!("Try 'oxqcow {cmd} --help' for more info");
    std::process::exit(1);
}

/// Prints `oxqcow: msg` and exits with `code`.
pub fn fail_with(code: i32, msg: &str) -> ! {
    eprintln!("oxqcow: {msg}");
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

/// Flushes stdout and exits with `code`.
pub fn exit_with(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

/// strerror() of a positive errno value.
pub fn strerror(errno: i32) -> String {
    ioerr(&std::io::Error::from_raw_os_error(errno))
}

/// The strerror() text of a library error (what qemu-img prints after
/// "Could not ...: ").
pub fn errno_text(e: &oxqcow::Error) -> String {
    strerror(e.errno())
}

/// What qemu-img's `-t`/`-T` cache modes mean for an open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheMode {
    pub writethrough: bool,
    pub direct: bool,
    /// cache=unsafe: flushes are ignored.
    pub no_flush: bool,
}

/// Parses a cache mode name as QEMU's bdrv_parse_cache_mode does.
pub fn parse_cache_mode(s: &str) -> Option<CacheMode> {
    let m = |writethrough, direct, no_flush| CacheMode {
        writethrough,
        direct,
        no_flush,
    };
    Some(match s {
        "writeback" => m(false, false, false),
        "writethrough" => m(true, false, false),
        "none" | "off" => m(false, true, false),
        "directsync" => m(true, true, false),
        "unsafe" => m(false, false, true),
        _ => return None,
    })
}

/// Opens an image with `opts`, wording failures as qemu-img does:
/// `Could not open 'F': Could not open 'F': No such file or directory`
/// for a missing file, `Could not open 'F': Could not open backing file:
/// ...` for a broken backing chain.
pub fn open_image(path: &str, fmt: Option<&str>, opts: &OpenOptions) -> CliResult<Image> {
    if let Err(e) = std::fs::File::open(path) {
        return Err(format!(
            "Could not open '{path}': Could not open '{path}': {}",
            ioerr(&e)
        ));
    }
    if let Some(f) = fmt {
        if f != "qcow2" && f != "raw" {
            return Err(format!("Unknown driver '{f}'"));
        }
    }
    Image::open(Path::new(path), fmt, opts).map_err(|e| {
        let msg = errmsg(&e);
        let own = format!("Could not open '{path}': ");
        match msg.strip_prefix(&own) {
            Some(rest) if rest.starts_with("Could not open '") => {
                format!("{own}Could not open backing file: {rest}")
            }
            Some(_) => msg,
            None => format!("{own}{msg}"),
        }
    })
}

/// qemu-img's `-p` progress line, `    (12.34/100%)` rewritten with \r.
pub struct Progress {
    on: bool,
    last: f64,
}

impl Progress {
    pub fn new(on: bool) -> Progress {
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

    pub fn update(&mut self, done: u64, total: u64) {
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

    pub fn finish(&self) {
        if self.on {
            self.print(100.0);
            println!();
        }
    }
}

/// Reads guest bytes, zero-filling what lies past the end of the image.
pub fn read_padded(img: &Image, buf: &mut [u8], off: u64) -> oxqcow::Result<()> {
    let size = img.size();
    let n = if off >= size {
        0
    } else {
        (size - off).min(buf.len() as u64) as usize
    };
    if n > 0 {
        img.read_at(&mut buf[..n], off)?;
    }
    buf[n..].fill(0);
    Ok(())
}
