//! Text of `oxqcow io` (qemu-io's output and input conventions): stdout
//! with C stdio's buffering (so stdout and stderr interleave as qemu-io's
//! do when both go to one pipe), sizes as qemu-io words them ("64 KiB",
//! "512 bytes"), the timing line, the -v hex dump, qemu's size parser
//! (qemu_strtosz's syntax), strtol, and a getopt that permutes arguments
//! as glibc's does.

use std::io::Write as _;

/// Standard output with glibc's stdio buffering: fully buffered in blocks
/// of the descriptor's st_blksize when stdout is a pipe or a file, line
/// buffered on a terminal. Standard error is unbuffered.
pub struct Out {
    buf: Vec<u8>,
    cap: usize,
    line: bool,
}

impl Out {
    pub fn new() -> Out {
        // SAFETY: isatty and fstat on descriptor 1 with a zeroed stat buffer.
        let (line, cap) = unsafe {
            let line = libc::isatty(1) == 1;
            let mut st: libc::stat = std::mem::zeroed();
            let cap = if libc::fstat(1, &mut st) == 0 && st.st_blksize > 0 {
                st.st_blksize as usize
            } else {
                8192
            };
            (line, cap)
        };
        Out {
            buf: Vec::with_capacity(cap),
            cap,
            line,
        }
    }

    /// What one fputs/printf call does.
    pub fn put(&mut self, s: &str) {
        let data = s.as_bytes();
        if self.line {
            self.buf.extend_from_slice(data);
            if data.contains(&b'\n') || self.buf.len() >= self.cap {
                self.flush();
            }
            return;
        }
        // Fill the buffer; once it is full and more is left, write it out,
        // then whole blocks directly, and keep the rest.
        let n = (self.cap - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        let rest = &data[n..];
        if rest.is_empty() {
            return;
        }
        self.flush();
        let direct = if self.cap >= 128 {
            rest.len() - rest.len() % self.cap
        } else {
            rest.len()
        };
        raw_write(1, &rest[..direct]);
        self.buf.extend_from_slice(&rest[direct..]);
    }

    pub fn line(&mut self, s: &str) {
        let mut t = String::with_capacity(s.len() + 1);
        t.push_str(s);
        t.push('\n');
        self.put(&t);
    }

    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            raw_write(1, &self.buf);
            self.buf.clear();
        }
    }

    /// A stream that only collects text (see `take`).
    pub fn capture() -> Out {
        Out {
            buf: Vec::new(),
            cap: usize::MAX,
            line: false,
        }
    }

    /// The collected text of a `capture` stream.
    pub fn take(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned()
    }

    /// Drops buffered output, as abort() does.
    pub fn discard(&mut self) {
        self.buf.clear();
    }
}

fn raw_write(fd: i32, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: writing from a live slice to a descriptor we do not own
        // but that stays open for the life of the process.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        data = &data[n as usize..];
    }
}

/// One unbuffered write to standard error (fprintf(stderr, …)).
pub fn err(s: &str) {
    let mut t = String::with_capacity(s.len() + 1);
    t.push_str(s);
    t.push('\n');
    let _ = std::io::stderr().write_all(t.as_bytes());
}

/// qemu-io's cvtstr(): a size with three decimals in the largest binary
/// unit it reaches, ".000" dropped; below 1 KiB as "%f bytes".
pub fn cvtstr(v: f64) -> String {
    const UNITS: [(u32, &str); 6] = [
        (60, " EiB"),
        (50, " PiB"),
        (40, " TiB"),
        (30, " GiB"),
        (20, " MiB"),
        (10, " KiB"),
    ];
    let mut s = None;
    for (shift, suffix) in UNITS {
        let unit = (1u64 << shift) as f64;
        if v >= unit {
            s = Some((format!("{:.3}", v / unit), suffix));
            break;
        }
    }
    let (num, suffix) = s.unwrap_or_else(|| (c_float(v, 6), " bytes"));
    match num.find(".000") {
        Some(i) => format!("{}{suffix}", &num[..i]),
        None => format!("{num}{suffix}"),
    }
}

/// C's "%.Nf" (inf and nan spelled as C spells them).
pub fn c_float(v: f64, prec: usize) -> String {
    if v.is_nan() {
        return if v.is_sign_negative() { "-nan" } else { "nan" }.into();
    }
    if v.is_infinite() {
        return if v < 0.0 { "-inf" } else { "inf" }.into();
    }
    format!("{v:.prec$}")
}

/// qemu-io's timestr(): "00.02 sec" below a second, else "H:MM:SS.ss";
/// `fixed` (the -C format) always uses the long form.
pub fn timestr(d: std::time::Duration, fixed: bool) -> String {
    let secs = d.as_secs();
    let frac = d.subsec_nanos() as f64 / 1e9;
    if fixed || secs > 0 {
        let s = (secs % 60) as f64 + frac;
        format!("{}:{:02}:{}", secs / 3600, (secs % 3600) / 60, pad05(s))
    } else {
        format!("{} sec", pad05(frac))
    }
}

/// "%05.2f".
fn pad05(v: f64) -> String {
    format!("{v:05.2}")
}

fn per_sec(v: f64, d: std::time::Duration) -> f64 {
    v / d.as_secs_f64()
}

/// qemu-io's two report lines (or the -C line) for a finished request.
#[allow(clippy::too_many_arguments)]
pub fn report(
    out: &mut Out,
    op: &str,
    d: std::time::Duration,
    off: u64,
    count: u64,
    total: u64,
    ops: u32,
    machine: bool,
) {
    let ts = timestr(d, machine);
    if machine {
        out.line(&format!(
            "{total},{ops},{ts},{},{}",
            c_float(per_sec(total as f64, d), 3),
            c_float(per_sec(ops as f64, d), 3)
        ));
    } else {
        out.line(&format!("{op} {total}/{count} bytes at offset {off}"));
        out.line(&format!(
            "{}, {ops} ops; {ts} ({}/sec and {} ops/sec)",
            cvtstr(total as f64),
            cvtstr(per_sec(total as f64, d)),
            c_float(per_sec(ops as f64, d), 4)
        ));
    }
}

/// The -v hex dump: 16 bytes a line, offsets in hex, alphanumerics shown.
pub fn dump_buffer(out: &mut Out, buf: &[u8], off: u64) {
    let mut s = String::with_capacity(80);
    for (i, chunk) in buf.chunks(16).enumerate() {
        s.clear();
        s.push_str(&format!("{:08x}:  ", off + i as u64 * 16));
        for b in chunk {
            s.push_str(&format!("{b:02x} "));
        }
        s.push(' ');
        for &b in chunk {
            s.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        out.line(&s);
    }
}

/// Why a number did not parse (qemu_strtosz's errors).
#[derive(Debug, PartialEq, Eq)]
pub enum NumErr {
    Invalid,
    Range,
}

/// qemu-io's cvtnum(): qemu_strtosz syntax (decimal with an optional
/// fraction and a B/K/M/G/T/P/E suffix, or 0x hex without suffix), at
/// most INT64_MAX.
pub fn cvtnum(s: &str) -> Result<u64, NumErr> {
    let v = strtosz(s)?;
    if v > i64::MAX as u64 {
        return Err(NumErr::Range);
    }
    Ok(v)
}

/// The message qemu-io prints (on stdout) for a number that did not parse.
pub fn cvtnum_err(e: &NumErr, arg: &str) -> String {
    match e {
        NumErr::Invalid => format!(
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}"
        ),
        NumErr::Range => format!("Parsing error: argument too large -- {arg}"),
    }
}

fn suffix_mul(c: Option<u8>) -> Option<u64> {
    Some(match c?.to_ascii_uppercase() {
        b'B' => 1,
        b'K' => 1 << 10,
        b'M' => 1 << 20,
        b'G' => 1 << 30,
        b'T' => 1 << 40,
        b'P' => 1 << 50,
        b'E' => 1 << 60,
        _ => return None,
    })
}

/// strtoull(s, &end, base) over bytes: (value, bytes consumed, overflow,
/// negative). Consumed is 0 when no digits were found.
fn strtoull(b: &[u8], base: u32) -> (u64, usize, bool, bool) {
    let mut i = 0;
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
        i += 1;
    }
    let mut neg = false;
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        neg = b[i] == b'-';
        i += 1;
    }
    let mut base = base;
    if (base == 16 || base == 0)
        && i + 1 < b.len()
        && b[i] == b'0'
        && (b[i + 1] | 0x20) == b'x'
        && b.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit())
    {
        i += 2;
        base = 16;
    } else if base == 0 {
        base = if b.get(i) == Some(&b'0') { 8 } else { 10 };
    }
    let start = i;
    let mut v: u64 = 0;
    let mut over = false;
    while i < b.len() {
        let d = match (b[i] as char).to_digit(base) {
            Some(d) => d as u64,
            None => break,
        };
        match v.checked_mul(base as u64).and_then(|x| x.checked_add(d)) {
            Some(x) => v = x,
            None => over = true,
        }
        i += 1;
    }
    if i == start {
        return (0, 0, false, false);
    }
    if over {
        v = u64::MAX;
    }
    (v, i, over, neg)
}

/// qemu_strtosz(s, NULL, &v): the whole string must parse.
pub fn strtosz(s: &str) -> Result<u64, NumErr> {
    let b = s.as_bytes();
    // Integral part, decimal (parse_uint).
    let (mut val, mut end, over, neg) = strtoull(b, 10);
    if over {
        return Err(NumErr::Range);
    }
    let parsed = end > 0;
    if parsed && neg {
        return if end == b.len() {
            Err(NumErr::Range)
        } else {
            Err(NumErr::Invalid)
        };
    }
    let mut frac: f64 = 0.0;
    if parsed && val == 0 && matches!(b.get(end), Some(b'x') | Some(b'X')) {
        let (h, e, over, neg) = strtoull(b, 16);
        if over {
            return Err(NumErr::Range);
        }
        if e == 0 || neg {
            return Err(NumErr::Invalid);
        }
        if b.get(e) == Some(&b'.') || suffix_mul(b.get(e).copied()).is_some() {
            return Err(NumErr::Invalid);
        }
        val = h;
        end = e;
    } else if b.get(end) == Some(&b'.') || (!parsed && s.contains('.')) {
        if parsed && !b.get(end + 1).is_some_and(|c| c.is_ascii_digit()) {
            end += 1;
        } else {
            // strtod on the rest with any exponent cut off.
            let rest = &s[end..];
            let cut = rest.find(['e', 'E']).unwrap_or(rest.len());
            let (f, used) = parse_fraction(&rest[..cut]).ok_or(NumErr::Invalid)?;
            if f.is_sign_negative() {
                return Err(NumErr::Range);
            }
            frac = f;
            end += used;
        }
    } else if !parsed {
        return Err(NumErr::Invalid);
    }
    let mut valf: u64 = 0;
    if frac == 1.0 {
        val = val.checked_add(1).ok_or(NumErr::Range)?;
    } else if frac > 0.0 {
        valf = (frac * 18446744073709551616.0) as u64;
        if valf == 0 {
            valf = 1;
        }
    }
    let mul = match suffix_mul(b.get(end).copied()) {
        Some(m) => {
            end += 1;
            m
        }
        None => 1,
    };
    if end != b.len() {
        return Err(NumErr::Invalid);
    }
    if mul == 1 {
        if valf != 0 {
            return Err(NumErr::Invalid);
        }
        return Ok(val);
    }
    let whole = val as u128 * mul as u128;
    let fpart = valf as u128 * mul as u128;
    let mut r = whole + (fpart >> 64);
    // Round half up.
    r += (fpart >> 63) & 1;
    if r > u64::MAX as u128 {
        return Err(NumErr::Range);
    }
    Ok(r as u64)
}

/// strtod over something like ".5" or "5.25" (no exponent, no hex):
/// (value, bytes used). None when nothing parses.
fn parse_fraction(s: &str) -> Option<(f64, usize)> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    let st = i;
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        i += 1;
    }
    let d0 = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let mut digits = i - d0;
    if i < b.len() && b[i] == b'.' {
        let j = i + 1;
        let mut k = j;
        while k < b.len() && b[k].is_ascii_digit() {
            k += 1;
        }
        digits += k - j;
        if digits > 0 {
            i = k;
        }
    }
    if digits == 0 {
        return None;
    }
    let v: f64 = s[st..i].parse().ok()?;
    Some((v, i))
}

/// qemu_strtou64(s, NULL, 0, &v): the whole string in any base, a
/// negative value wrapping around as strtoull's does.
pub fn strtou64_full(s: &str) -> Result<u64, NumErr> {
    let (v, used, over, neg) = strtoull(s.as_bytes(), 0);
    if used == 0 || used != s.len() {
        return Err(NumErr::Invalid);
    }
    if over {
        return Err(NumErr::Range);
    }
    Ok(if neg { v.wrapping_neg() } else { v })
}

/// strtol(s, &end, 0) with the whole string required: None when there is
/// trailing text or no number.
pub fn strtol_full(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let (v, used, over, neg) = strtoull(b, 0);
    if used == 0 || used != b.len() {
        return None;
    }
    let v = if over {
        if neg {
            i64::MIN
        } else {
            i64::MAX
        }
    } else if neg {
        if v > i64::MAX as u64 + 1 {
            i64::MIN
        } else {
            (v as i128).wrapping_neg() as i64
        }
    } else {
        v.min(i64::MAX as u64) as i64
    };
    Some(v)
}

/// qemu-io's parse_pattern(): a byte, in any base strtol accepts.
pub fn parse_pattern(out: &mut Out, arg: &str) -> Option<u8> {
    match strtol_full(arg) {
        Some(v) if (0..=255).contains(&v) => Some(v as u8),
        _ => {
            out.line(&format!("{arg} is not a valid pattern byte"));
            None
        }
    }
}

/// What getopt returns, one item at a time.
#[derive(Debug, PartialEq, Eq)]
pub enum Opt {
    /// An option letter and its argument.
    Flag(char, Option<String>),
    /// getopt printed its complaint and returned '?'.
    Bad,
}

/// glibc getopt over a command's words (words[0] is the command name):
/// options anywhere (arguments permuted to the end), "--" ends them,
/// `spec` like "bCl:P:". Complaints go to stderr as glibc words them.
/// Returns the options in order (stopping after the first bad one) and
/// the operands.
pub fn getopt(words: &[String], spec: &str) -> (Vec<Opt>, Vec<String>) {
    let takes_arg = |c: char| -> Option<bool> {
        let i = spec.find(c)?;
        Some(spec[i + c.len_utf8()..].starts_with(':'))
    };
    let name = &words[0];
    let mut opts = Vec::new();
    let mut operands = Vec::new();
    let mut i = 1;
    while i < words.len() {
        let w = &words[i];
        i += 1;
        if w == "--" {
            operands.extend(words[i..].iter().cloned());
            break;
        }
        if !w.starts_with('-') || w.len() == 1 {
            operands.push(w.clone());
            continue;
        }
        let chars: Vec<char> = w[1..].chars().collect();
        let mut k = 0;
        while k < chars.len() {
            let c = chars[k];
            k += 1;
            match takes_arg(c) {
                _ if c == ':' => {
                    err(&format!("{name}: invalid option -- '{c}'"));
                    opts.push(Opt::Bad);
                    return (opts, operands);
                }
                None => {
                    err(&format!("{name}: invalid option -- '{c}'"));
                    opts.push(Opt::Bad);
                    return (opts, operands);
                }
                Some(false) => opts.push(Opt::Flag(c, None)),
                Some(true) => {
                    let arg: String = chars[k..].iter().collect();
                    if !arg.is_empty() {
                        opts.push(Opt::Flag(c, Some(arg)));
                    } else if i < words.len() {
                        opts.push(Opt::Flag(c, Some(words[i].clone())));
                        i += 1;
                    } else {
                        err(&format!("{name}: option requires an argument -- '{c}'"));
                        opts.push(Opt::Bad);
                        return (opts, operands);
                    }
                    break;
                }
            }
        }
    }
    (opts, operands)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sizes_read_like_qemu_io() {
        assert_eq!(cvtstr(4096.0), "4 KiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(512.0), "512 bytes");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(0.5), "0.500000 bytes");
        assert_eq!(cvtstr(1048576.0), "1 MiB");
        assert_eq!(cvtstr(f64::INFINITY), "inf EiB");
        assert_eq!(cvtstr(536870912.0), "512 MiB");
    }

    #[test]
    fn times_read_like_qemu_io() {
        assert_eq!(timestr(Duration::from_millis(20), false), "00.02 sec");
        assert_eq!(timestr(Duration::from_millis(1500), false), "0:00:01.50");
        assert_eq!(timestr(Duration::from_millis(20), true), "0:00:00.02");
        assert_eq!(timestr(Duration::from_secs(3725), false), "1:02:05.00");
    }

    #[test]
    fn numbers_parse_like_qemu_strtosz() {
        assert_eq!(cvtnum("512"), Ok(512));
        assert_eq!(cvtnum("64k"), Ok(65536));
        assert_eq!(cvtnum("1.5k"), Ok(1536));
        assert_eq!(cvtnum("1.k"), Ok(1024));
        assert_eq!(cvtnum(".5k"), Ok(512));
        assert_eq!(cvtnum("0x10"), Ok(16));
        assert_eq!(cvtnum("0x1E"), Ok(30));
        assert_eq!(cvtnum("0x10k"), Err(NumErr::Invalid));
        assert_eq!(cvtnum("1.5"), Err(NumErr::Invalid));
        assert_eq!(cvtnum("1.0"), Ok(1));
        assert_eq!(cvtnum("1x"), Err(NumErr::Invalid));
        assert_eq!(cvtnum("-1"), Err(NumErr::Range));
        assert_eq!(cvtnum("-1x"), Err(NumErr::Invalid));
        assert_eq!(cvtnum("99999999999999999999"), Err(NumErr::Range));
        assert_eq!(cvtnum("8E"), Err(NumErr::Range));
        assert_eq!(cvtnum("5P"), Ok(5 << 50));
        assert_eq!(cvtnum("4G"), Ok(4 << 30));
        assert_eq!(cvtnum(""), Err(NumErr::Invalid));
        assert_eq!(cvtnum("k"), Err(NumErr::Invalid));
        assert_eq!(cvtnum("12m"), Ok(12 << 20));
    }

    #[test]
    fn patterns_parse_like_strtol() {
        assert_eq!(strtol_full("0x33"), Some(0x33));
        assert_eq!(strtol_full("010"), Some(8));
        assert_eq!(strtol_full("-1"), Some(-1));
        assert_eq!(strtol_full("4k"), None);
        assert_eq!(strtol_full(""), None);
    }

    #[test]
    fn getopt_permutes() {
        let w: Vec<String> = ["read", "0", "-P", "1", "512", "-q"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (o, a) = getopt(&w, "P:q");
        assert_eq!(
            o,
            vec![Opt::Flag('P', Some("1".into())), Opt::Flag('q', None)]
        );
        assert_eq!(a, vec!["0".to_string(), "512".to_string()]);
        let w: Vec<String> = ["write", "-P0x11", "--", "-1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (o, a) = getopt(&w, "P:");
        assert_eq!(o, vec![Opt::Flag('P', Some("0x11".into()))]);
        assert_eq!(a, vec!["-1".to_string()]);
    }
}
