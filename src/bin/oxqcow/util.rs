//! Helpers shared by the commands: the tool's error type and how library
//! errors are worded, qemu-img's size syntax and human-readable sizes, the
//! `-o` option splitter, opening images, host-file extents (SEEK_DATA /
//! SEEK_HOLE), and a small JSON value printed the way QEMU prints QObjects
//! (QDict key order included).

use oxqcow::{Image, OpenOptions};
use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// A failed command: the text after `PROGRAM: ` (see `prgname`); empty
/// when the command has reported the failure itself.
pub type CliResult<T> = Result<T, String>;

/// The program name that messages start with: argv[0]'s base name, so a
/// wrapper that runs the tool as `qemu-img` (or `oxqcow io` as `qemu-io`)
/// prints exactly what the QEMU tool prints.
pub fn prgname() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let a0 = std::env::args_os().next().unwrap_or_default();
        let a0 = a0.to_string_lossy();
        let base = a0.rsplit('/').next().unwrap_or_default();
        if base.is_empty() {
            "oxqcow".to_string()
        } else {
            base.to_string()
        }
    })
}

/// error_report(): `PROGRAM: msg` on stderr.
pub fn report(msg: &str) {
    eprintln!("{}: {msg}", prgname());
}

/// The failure `what` as qemu-img words it when the qcow2 driver reports
/// the cause itself (error_report) and the operation only gets an errno:
/// a snapshot's invalid L1 table gets a line of its own, then "what:
/// strerror". Other errors: None (the caller words them).
pub fn snapshot_l1_failure(e: &oxqcow::Error, what: &str) -> Option<String> {
    oxqcow::format::snapshot::is_l1_error(e).then(|| {
        report(&errmsg(e));
        format!("{what}: {}", crate::img_util::errno_text(e))
    })
}

/// Words a library error without Rust's " (os error N)" suffix.
pub fn errmsg(e: &oxqcow::Error) -> String {
    strip_os_error(&e.to_string())
}

/// Words an I/O error the way strerror() does.
pub fn ioerr(e: &std::io::Error) -> String {
    strip_os_error(&e.to_string())
}

fn strip_os_error(s: &str) -> String {
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s.to_string(),
    }
}

/// Opens an image read-only; `no_backing` leaves its backing chain closed.
pub fn open_ro(path: &str, fmt: Option<&str>, no_backing: bool) -> CliResult<Image> {
    let opts = OpenOptions {
        writable: false,
        no_backing,
        ..Default::default()
    };
    Image::open(Path::new(path), fmt, &opts).map_err(|e| errmsg(&e))
}

/// The virtual size QEMU reports: raw images count whole 512-byte sectors.
pub fn virtual_size(img: &Image) -> u64 {
    match img {
        Image::Raw(_) | Image::Nbd(_) => img.size().div_ceil(512) * 512,
        Image::Qcow2(_) => img.size(),
    }
}

/// Resolves a backing file name as QEMU does: relative names are taken
/// relative to the directory of the overlay; `json:` names and names with
/// a protocol prefix stand as they are.
pub fn resolve_backing(overlay: &str, backing: &str) -> PathBuf {
    let p = Path::new(backing);
    if p.is_absolute() || crate::blockopts::is_spec_name(backing) {
        return p.to_path_buf();
    }
    match Path::new(overlay).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// Parses an image size as qemu-img does: decimal or 0x-hex bytes, or a
/// (possibly fractional) number with a K/M/G/T/P/E suffix.
pub fn parse_img_size(s: &str) -> CliResult<u64> {
    let bad = || format!("Invalid image size specified: '{s}'.");
    let t = s.trim();
    let v = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        let end = hex
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(hex.len());
        let (digits, suffix) = hex.split_at(end);
        let n = u64::from_str_radix(digits, 16).map_err(|_| bad())?;
        let shift = suffix_shift(suffix).ok_or_else(bad)?;
        n.checked_mul(1u64 << shift).ok_or_else(bad)?
    } else {
        let end = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, suffix) = t.split_at(end);
        // Fractions of a byte make no sense.
        if num.contains('.') && suffix_shift(suffix).unwrap_or(0) == 0 {
            return Err(bad());
        }
        if num.is_empty() || suffix_shift(suffix).is_none() {
            return Err(bad());
        }
        oxqcow::engine::parse_size(t).map_err(|_| bad())?
    };
    if v > i64::MAX as u64 {
        return Err(
            "Invalid image size specified. Must be between 0 and 9223372036854775807.".into(),
        );
    }
    Ok(v)
}

fn suffix_shift(s: &str) -> Option<u32> {
    Some(match s {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    })
}

/// Parses an integer option value the way strtoull(…, 0) does (0x hex,
/// leading-0 octal, else decimal).
pub fn parse_c_number(s: &str) -> Option<u64> {
    let t = s.trim();
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8).ok()
    } else {
        t.parse().ok()
    }
}

/// Splits qemu-img `-o` strings into (key, value) pairs; ",," is a literal
/// comma and a key without `=` gets the value "on".
pub fn split_opts(all: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in all {
        let mut items = vec![String::new()];
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    items.last_mut().unwrap().push(',');
                } else {
                    items.push(String::new());
                }
            } else {
                items.last_mut().unwrap().push(c);
            }
        }
        for item in items.into_iter().filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                Some((k, v)) => out.push((k.to_string(), v.to_string())),
                None => out.push((item, "on".to_string())),
            }
        }
    }
    out
}

/// qemu-img's human-readable size: three significant digits in the
/// largest binary unit that keeps the number below 1000.
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp's exponent e of val/(1000/1024): the unit is (e-1)/10, which
    // moves to the next unit once the number would reach 1000.
    let x = val as f64 / (1000.0 / 1024.0);
    let e = if val == 0 {
        0
    } else {
        ((x.to_bits() >> 52) & 0x7ff) as i64 - 1022
    };
    let i = ((e - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), SUFFIXES[i])
}

/// C's `%0.3g`.
fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let sci = format!("{v:.2e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let x: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&x) {
        let m = trim_zeros(mant);
        let sign = if x < 0 { '-' } else { '+' };
        return format!("{m}e{sign}{:02}", x.abs());
    }
    let prec = (2 - x).max(0) as usize;
    trim_zeros(&format!("{v:.prec$}"))
}

fn trim_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// Whether `[off, off + len)` of a host file starts with data or a hole,
/// and how long that extent is (capped at `len`). Files that cannot say
/// are all data.
pub fn file_extent(file: &File, off: u64, len: u64) -> (bool, u64) {
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a descriptor we own, with integer arguments.
    let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error();
        return if errno == Some(libc::ENXIO) {
            (false, len)
        } else {
            (true, len)
        };
    }
    let data = data as u64;
    if data > off {
        return (false, (data - off).min(len));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_HOLE) };
    if hole < 0 || (hole as u64) <= off {
        return (true, len);
    }
    (true, (hole as u64 - off).min(len))
}

/// A JSON value. Objects keep insertion order and print in QEMU's QDict
/// order.
#[derive(Clone, Debug)]
pub enum Json {
    Int(i64),
    Bool(bool),
    Str(String),
    List(Vec<Json>),
    Obj(Obj),
}

/// A JSON object built in QAPI field order.
#[derive(Clone, Debug, Default)]
pub struct Obj(Vec<(String, Json)>);

impl Obj {
    pub fn new() -> Obj {
        Obj(Vec::new())
    }
    pub fn put(mut self, key: &str, v: Json) -> Obj {
        self.0.push((key.to_string(), v));
        self
    }
    pub fn put_int(self, key: &str, v: u64) -> Obj {
        self.put(key, Json::Int(v.min(i64::MAX as u64) as i64))
    }
    pub fn put_str(self, key: &str, v: &str) -> Obj {
        self.put(key, Json::Str(v.to_string()))
    }
    pub fn put_bool(self, key: &str, v: bool) -> Obj {
        self.put(key, Json::Bool(v))
    }
    /// Entries in the order QEMU's QDict iterates them: by hash bucket,
    /// and within a bucket the most recently inserted first.
    pub fn entries(&self) -> Vec<&(String, Json)> {
        let mut v: Vec<(usize, &(String, Json))> = self.0.iter().enumerate().collect();
        v.sort_by_key(|(i, (k, _))| (qdict_bucket(k), std::cmp::Reverse(*i)));
        v.into_iter().map(|(_, e)| e).collect()
    }
}

/// QDict's bucket for a key (the TDB hash modulo 512 buckets).
pub(crate) fn qdict_bucket(key: &str) -> u32 {
    let b = key.as_bytes();
    let mut v = 0x238F_13AFu32.wrapping_mul(b.len() as u32);
    for (i, &c) in b.iter().enumerate() {
        v = v.wrapping_add((c as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % 512
}

impl Json {
    /// QEMU's pretty JSON (4-space indent), without a trailing newline.
    pub fn pretty(&self) -> String {
        let mut s = String::new();
        self.write_pretty(0, &mut s);
        s
    }

    fn write_pretty(&self, level: usize, out: &mut String) {
        let ind = |n: usize| " ".repeat(4 * n);
        match self {
            Json::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Str(s) => out.push_str(&json_quote(s)),
            Json::List(items) => {
                out.push('[');
                for (i, it) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push('\n');
                    out.push_str(&ind(level + 1));
                    it.write_pretty(level + 1, out);
                }
                out.push('\n');
                out.push_str(&ind(level));
                out.push(']');
            }
            Json::Obj(o) => {
                out.push('{');
                for (i, (k, v)) in o.entries().into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push('\n');
                    out.push_str(&ind(level + 1));
                    out.push_str(&json_quote(k));
                    out.push_str(": ");
                    v.write_pretty(level + 1, out);
                }
                out.push('\n');
                out.push_str(&ind(level));
                out.push('}');
            }
        }
    }

    /// A scalar as qemu-img's human output shows it.
    fn human_scalar(&self) -> String {
        match self {
            Json::Int(n) => n.to_string(),
            Json::Bool(b) => b.to_string(),
            Json::Str(s) => s.clone(),
            _ => String::new(),
        }
    }
}

/// Prints an object's entries as qemu-img's human output does: keys with
/// dashes turned to spaces, nested values indented by four more columns.
pub fn dump_human(o: &Obj, indent: usize, out: &mut String) {
    for (k, v) in o.entries() {
        let key = k.replace('-', " ");
        dump_human_value(&key, v, indent, out);
    }
}

fn dump_human_value(label: &str, v: &Json, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Json::Obj(o) => {
            let _ = writeln!(out, "{pad}{label}:");
            dump_human(o, indent + 4, out);
        }
        Json::List(items) => {
            let _ = writeln!(out, "{pad}{label}:");
            for (i, it) in items.iter().enumerate() {
                dump_human_value(&format!("[{i}]"), it, indent + 4, out);
            }
        }
        _ => {
            let _ = writeln!(out, "{pad}{label}: {}", v.human_scalar());
        }
    }
}

/// A JSON string literal as QEMU writes it: ASCII printable as is, the
/// rest as \uXXXX (upper-case hex, surrogate pairs above U+FFFF).
pub fn json_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04X}");
                }
            }
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_qemu_img() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(67108864), "64 MiB");
        assert_eq!(size_to_str(1572864), "1.5 MiB");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(parse_img_size("0x10").unwrap(), 16);
        assert_eq!(parse_img_size("1.5k").unwrap(), 1536);
        assert!(parse_img_size("1.5").is_err());
        assert!(parse_img_size("12Q").is_err());
        assert!(parse_img_size("100E").is_err());
        assert_eq!(parse_c_number("016"), Some(14));
    }

    #[test]
    fn json_looks_like_qemu() {
        let o = Obj::new()
            .put_str("filename", "a/\u{e9}\"")
            .put("children", Json::List(vec![]))
            .put("data", Json::Obj(Obj::new()));
        assert_eq!(
            Json::Obj(o).pretty(),
            "{\n    \"children\": [\n    ],\n    \"filename\": \"a/\\u00E9\\\"\",\n    \"data\": {\n    }\n}"
        );
    }
}
