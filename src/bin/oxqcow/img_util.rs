//! Helpers shared by the qemu-img style maintenance commands (check,
//! amend, resize, rebase, commit, snapshot, measure, compare, bench):
//! opening images with QEMU's error wording, cache modes, usage errors
//! with qemu-img's "Try ... --help" line, exit codes other than 1, errno
//! texts, opening what the command line names (file names, `json:`
//! names, `--image-opts` strings), and the `-p` progress line.

use crate::blockopts::{is_spec_name, parse_qemu_opts};
use crate::io_open::{self, Flags, OpenReq};
use crate::util::{errmsg, ioerr, parse_c_number, prgname, report, CliResult};
use oxqcow::{Image, OpenOptions};
use std::io::Write;
use std::path::Path;

/// Prints a usage error the way qemu-img does and exits with status 1.
pub fn usage_error(cmd: &str, msg: &str) -> ! {
    report(msg);
    eprintln!("Try '{} {cmd} --help' for more info", prgname());
    std::process::exit(1);
}

/// Stdout text held back the way C's stdio holds it when stdout is not a
/// terminal: qemu-img's lines then reach a pipe at exit, after whatever
/// went to stderr meanwhile (`2>&1` shows the error first).
static HELD: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Prints a line on stdout as a C program would: at once on a terminal,
/// held until exit (or `flush_held`) otherwise.
pub fn print_held(line: &str) {
    // SAFETY: isatty only inspects descriptor 1.
    if unsafe { libc::isatty(1) } == 1 {
        println!("{line}");
    } else {
        let mut h = HELD.lock().unwrap_or_else(|e| e.into_inner());
        h.push_str(line);
        h.push('\n');
    }
}

/// Writes out what `print_held` kept.
pub fn flush_held() {
    let text = std::mem::take(&mut *HELD.lock().unwrap_or_else(|e| e.into_inner()));
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Prints `PROGRAM: msg` and exits with `code` (held stdout after it).
pub fn fail_with(code: i32, msg: &str) -> ! {
    report(msg);
    flush_held();
    std::process::exit(code);
}

/// Flushes stdout and exits with `code`.
pub fn exit_with(code: i32) -> ! {
    flush_held();
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
    if path.is_empty() {
        return Err("Could not open '': The 'file' block driver requires a file name".into());
    }
    if oxqcow::nbd::is_nbd_name(path) {
        // An NBD export: the library connects; errors name the server.
    } else if let Err(e) = std::fs::File::open(path) {
        return Err(format!(
            "Could not open '{path}': Could not open '{path}': {}",
            ioerr(&e)
        ));
    }
    if let Some(f) = fmt {
        if f != "qcow2" && f != "raw" {
            return Err(format!("Could not open '{path}': Unknown driver '{f}'"));
        }
    }
    let img = Image::open(Path::new(path), fmt, opts).map_err(|e| {
        let msg = errmsg(&e);
        let own = format!("Could not open '{path}': ");
        match msg.strip_prefix(&own) {
            Some(rest) if rest.starts_with("Could not open '") && !data_file_error(path, rest) => {
                format!("{own}Could not open backing file: {rest}")
            }
            Some(_) => msg,
            None => format!("{own}{msg}"),
        }
    })?;
    if fmt.is_none() && opts.writable && matches!(img, Image::Raw(_) | Image::Nbd(_)) {
        eprintln!("WARNING: Image format was not specified for '{path}' and probing guessed raw.");
        eprintln!("         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.");
        eprintln!("         Specify the 'raw' format explicitly to remove the restrictions.");
    }
    Ok(img)
}

/// Whether an open error is about the image's external data file (not
/// its backing file): "Could not open 'NAME': ..." with the data file name
/// of the header.
pub fn data_file_error(path: &str, msg: &str) -> bool {
    header_data_file(path).is_some_and(|d| msg.starts_with(&format!("Could not open '{d}': ")))
}

/// The data file name in the header of a qcow2 image with an external
/// data file.
pub fn header_data_file(path: &str) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).ok()?;
    let mut b = vec![0u8; 1 << 16];
    let n = f.read_at(&mut b, 0).ok()?;
    b.truncate(n);
    let h = oxqcow::format::header::Header::parse(&b).ok()?;
    if h.incompatible_features & oxqcow::format::INCOMPAT_DATA_FILE == 0 {
        return None;
    }
    h.data_file
}

/// An image named on the command line, open.
pub struct Named {
    pub img: Image,
    /// The host file holding it, when there is one (not for null-co).
    pub file: Option<String>,
    /// What reports call it, as QEMU names the node: the name given
    /// ("blkdebug::F" included), or for options the host file.
    pub name: String,
    /// Blkdebug nodes above the image, outermost first: their rules
    /// apply to every request of the whole device (convert's reads and
    /// block-status queries check them).
    pub top_dbg: Vec<std::sync::Arc<oxqcow::storage::Blkdebug>>,
    /// The host files of the children of a quorum node the image lies on.
    pub quorum: Option<Vec<String>>,
}

/// Opens what a command line names: a file name, a `json:{...}` name or
/// one with a protocol prefix, or with --image-opts a QemuOpts string
/// (`driver=qcow2,file.filename=F`). All but plain file names go through
/// the block-option parser and graph opener that `oxqcow io` uses.
pub fn open_named(
    spec: &str,
    image_opts: bool,
    fmt: Option<&str>,
    opts: &OpenOptions,
) -> CliResult<Named> {
    if image_opts && fmt.is_some() {
        return Err("--image-opts and --format are mutually exclusive".into());
    }
    if !image_opts && !is_spec_name(spec) {
        return Ok(Named {
            img: open_image(spec, fmt, opts)?,
            file: Some(spec.to_string()),
            name: spec.to_string(),
            top_dbg: Vec::new(),
            quorum: None,
        });
    }
    let could_not = |e: String| format!("Could not open '{spec}': {e}");
    let mut req = OpenReq {
        flags: Flags {
            read_only: !opts.writable,
            writethrough: opts.writethrough,
            nocache: opts.direct,
            no_flush: opts.no_flush,
            engine: opts.clone(),
            ..Flags::default()
        },
        ..OpenReq::default()
    };
    // QEMU names a node by its host file only when the options say
    // nothing more than where it is: blkdebug rules make a json: name.
    let mut plain_graph = true;
    if image_opts {
        req.opts = parse_qemu_opts(spec).map_err(could_not)?;
    } else {
        if let Some(j) = spec.strip_prefix("json:") {
            let keys = crate::blockopts::parse_json_filename(j).unwrap_or_default();
            plain_graph = !keys.iter().any(|(k, _)| {
                k.split('.')
                    .any(|seg| matches!(seg, "set-state" | "inject-error" | "config"))
            });
        }
        req.name = Some(spec.to_string());
        if let Some(f) = fmt {
            req.opts.push(("driver".into(), f.into()));
        }
    }
    let dev = io_open::open(req).map_err(could_not)?;
    if dev.compress.is_some() {
        // The qemu-img commands see images, not filters that change writes.
        return Err(could_not(io_open::unsupported_driver("compress")));
    }
    let file = dev.host_file();
    let name = match &file {
        Some(f) if image_opts || (spec.starts_with("json:") && plain_graph) => f.clone(),
        _ => spec.to_string(),
    };
    let top_dbg = dev.top_dbg.clone();
    let quorum = io_open::quorum_children(&dev.explicit);
    Ok(Named {
        top_dbg,
        quorum,
        img: dev.into_image(),
        file,
        name,
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
            flush_held();
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

/// Parses a QemuOpts size parameter (`-o size=...`, resize's size) with
/// QEMU's two error texts.
pub fn parse_size_param(name: &str, v: &str) -> CliResult<u64> {
    let range = || format!("Value '{v}' is out of range for parameter '{name}'");
    let bad = || {
        format!(
            "Parameter '{name}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        )
    };
    if v.trim_start().starts_with('-') {
        return Err(range());
    }
    let t = v.trim_start();
    let (digits, rest, radix) = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => {
            let end = h.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(h.len());
            (&h[..end], &h[end..], 16)
        }
        None => {
            let end = t
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(t.len());
            (&t[..end], &t[end..], 10)
        }
    };
    if digits.is_empty() {
        return Err(bad());
    }
    let shift = match rest {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(bad()),
    };
    if radix == 16 {
        let n = u64::from_str_radix(digits, 16).map_err(|_| range())?;
        return n.checked_mul(1u64 << shift).ok_or_else(range);
    }
    if digits.contains('.') {
        let f: f64 = digits.parse().map_err(|_| bad())?;
        let x = f * (1u64 << shift) as f64;
        if x >= 18_446_744_073_709_550_592.0 {
            return Err(range());
        }
        return Ok(x as u64);
    }
    let n: u64 = digits.parse().map_err(|_| range())?;
    n.checked_mul(1u64 << shift).ok_or_else(range)
}

/// An integer option as qemu_strtoi reads it (0x hex, leading-0 octal),
/// in [min, max], with qemu-img's two error texts.
pub fn int_opt(v: &str, what: &str, min: i64, max: i64) -> CliResult<i64> {
    let t = v.trim();
    let (neg, body) = match t.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let n = parse_c_number(body)
        .filter(|_| !body.is_empty())
        .ok_or_else(|| format!("Invalid {what} specified: '{v}'."))?;
    let n = if neg { -(n as i128) } else { n as i128 };
    if n < min as i128 || n > max as i128 {
        return Err(format!(
            "Invalid {what} specified. Must be between {min} and {max}."
        ));
    }
    Ok(n as i64)
}

/// A size option as cvtnum reads it (k, M, G, ... suffixes), in [min, max].
pub fn size_opt(v: &str, what: &str, min: i64, max: i64) -> CliResult<i64> {
    let range = || format!("Invalid {what} specified. Must be between {min} and {max}.");
    if v.trim_start().starts_with('-') {
        return Err(range());
    }
    let n = parse_size_param("x", v).map_err(|e| {
        if e.starts_with("Value ") {
            range()
        } else {
            format!("Invalid {what} specified: '{v}'.")
        }
    })?;
    if n as u128 > max as u128 || (n as i128) < min as i128 {
        return Err(range());
    }
    Ok(n as i64)
}

/// qemu-img's progress accounting (qemu_progress_print): `add` moves the
/// job by `delta` percent of `max` (max 0: set it to `delta`), clamped to
/// 100; a line is printed at 0 and 100 and whenever the value moved by
/// more than `min_skip` since the last line.
pub struct QProgress {
    on: bool,
    current: f32,
    last_print: f32,
    min_skip: f32,
}

impl QProgress {
    pub fn new(on: bool, min_skip: f32) -> QProgress {
        QProgress {
            on,
            current: 0.0,
            last_print: 0.0,
            min_skip,
        }
    }

    pub fn add(&mut self, delta: f32, max: i32) {
        let mut cur = if max == 0 {
            delta
        } else {
            self.current + delta / 100.0 * max as f32
        };
        if cur > 100.0 {
            cur = 100.0;
        }
        self.current = cur;
        if cur > self.last_print + self.min_skip
            || cur < self.last_print - self.min_skip
            || cur == 100.0
            || cur == 0.0
        {
            self.last_print = cur;
            if self.on {
                let mut out = std::io::stdout().lock();
                let _ = write!(out, "    ({:.2}/100%)\r", cur);
                let _ = out.flush();
            }
        }
    }

    /// qemu_progress_end: a newline after the progress line.
    pub fn end(&self) {
        if self.on {
            println!();
        }
    }
}

/// When closing an image fails to write its persistent bitmaps back, the
/// lines qemu-img prints: QEMU tries twice (inactivation, then close) and
/// says so each time, naming the node by a generated name (`#blockNNN`),
/// and reports the close itself as failed with EINVAL. `close_between`
/// puts that report between the two tries, as `qemu-img bitmap` does;
/// commit prints it last, and not at all when its job failed (the job's
/// error follows instead). Returns false (nothing printed) for other
/// errors.
pub fn report_lost_bitmaps(msg: &str, close_between: bool, job_failed: bool) -> bool {
    if !msg.starts_with("Failed to write bitmap '") {
        return false;
    }
    let lost = format!("Lost persistent bitmaps during inactivation of node '#block100': {msg}");
    let closing = "Error while closing the image: Invalid argument";
    report(&lost);
    if close_between {
        report(closing);
        report(&lost);
    } else {
        report(&lost);
        if !job_failed {
            report(closing);
        }
    }
    true
}
