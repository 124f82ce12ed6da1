//! The commands of `oxqcow io`, with qemu-io's names, argument counts,
//! option letters, messages and return values (0, or a negative errno
//! that makes the run exit with status 1).

use crate::blockopts::parse_qemu_opts;
use crate::io::io_fmt::{cvtnum, cvtnum_err, cvtstr, dump_buffer, getopt, parse_pattern, report};
use crate::io::io_fmt::{err, strtol_full, Opt};
use crate::io::Session;
use crate::io_open::{self, strerror, Backend, OpenReq, REQUEST_MAX};
use std::time::{Duration, Instant};

const EINVAL: i32 = -libc::EINVAL;

type Handler = fn(&mut Session, &[String]) -> i32;

/// A command: name, short name, argument counts (-1: any), whether it
/// needs an open image, whether it needs write permission, usage text.
struct Cmd {
    name: &'static str,
    alt: Option<&'static str>,
    argmin: i32,
    argmax: i32,
    /// 0: needs a file; 1: works without one; 2: global (help, quit).
    nofile: u8,
    write: bool,
    args: &'static str,
    oneline: &'static str,
    help: &'static str,
    f: Handler,
}

macro_rules! cmd {
    ($name:expr, $alt:expr, $min:expr, $max:expr, $nofile:expr, $write:expr, $args:expr, $one:expr, $help:expr, $f:expr) => {
        Cmd {
            name: $name,
            alt: $alt,
            argmin: $min,
            argmax: $max,
            nofile: $nofile,
            write: $write,
            args: $args,
            oneline: $one,
            help: $help,
            f: $f,
        }
    };
}

/// The command table, sorted by name as qemu-io's `help` lists it.
#[rustfmt::skip]
static CMDS: &[Cmd] = &[
    cmd!("abort", None, 0, 0, 1, false, "", "simulate a program crash using abort(3)", "", abort_f),
    cmd!("aio_flush", None, 0, 0, 0, false, "", "completes all outstanding aio requests", "", aio_flush_f),
    cmd!("aio_read", None, 2, -1, 0, false, "[-Ciqrv] [-P pattern] off len [len..]", "asynchronously reads a number of bytes", AIO_READ_HELP, aio_read_f),
    cmd!("aio_write", None, 2, -1, 0, true, "[-Cfiqruz] [-P pattern] off len [len..]", "asynchronously writes a number of bytes", AIO_WRITE_HELP, aio_write_f),
    cmd!("alloc", Some("a"), 1, 2, 0, false, "offset [count]", "checks if offset is allocated in the file", "", alloc_f),
    cmd!("break", None, 2, 2, 0, false, "event tag", "sets a breakpoint on event and tags the stopped request as tag", "", break_f),
    cmd!("close", Some("c"), 0, 0, 0, false, "", "close the current open file", "", close_f),
    cmd!("discard", Some("d"), 2, -1, 0, true, "[-Cq] off len", "discards a number of bytes at a specified offset", DISCARD_HELP, discard_f),
    cmd!("flush", Some("f"), 0, 0, 0, false, "", "flush all in-core file state to disk", "", flush_f),
    cmd!("help", Some("?"), 0, 1, 2, false, "[command]", "help for one or all commands", "", help_f),
    cmd!("info", Some("i"), 0, 0, 0, false, "", "prints information about the current file", "", info_f),
    cmd!("length", Some("l"), 0, 0, 0, false, "", "gets the length of the current file", "", length_f),
    cmd!("map", None, 0, 0, 0, false, "", "prints the allocated areas of a file", "", map_f),
    cmd!("open", Some("o"), 1, -1, 1, false, "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]", "open the file specified by path", OPEN_HELP, open_f),
    cmd!("quit", Some("q"), -1, -1, 2, false, "", "exit the program", "", quit_f),
    cmd!("read", Some("r"), 2, -1, 0, false, "[-abCqrv] [-P pattern [-s off] [-l len]] off len", "reads a number of bytes at a specified offset", READ_HELP, read_f),
    cmd!("readv", None, 2, -1, 0, false, "[-Cqrv] [-P pattern] off len [len..]", "reads a number of bytes at a specified offset", READV_HELP, readv_f),
    cmd!("remove_break", None, 1, 1, 0, false, "tag", "remove a breakpoint by tag", "", remove_break_f),
    cmd!("reopen", None, 0, -1, 0, false, "[(-r|-w)] [-c cache] [-o options]", "reopens an image with new options", REOPEN_HELP, reopen_f),
    cmd!("resume", None, 1, 1, 0, false, "tag", "resumes the request tagged as tag", "", resume_f),
    cmd!("sigraise", None, 1, 1, 1, false, "signal", "raises a signal", SIGRAISE_HELP, sigraise_f),
    cmd!("sleep", None, 1, 1, 1, false, "", "waits for the given value in milliseconds", "", sleep_f),
    cmd!("truncate", Some("t"), 1, 3, 0, true, "[-m prealloc_mode] off", "truncates the current file at the given offset", "", truncate_f),
    cmd!("wait_break", None, 1, 1, 0, false, "tag", "waits for the suspension of a request", "", wait_break_f),
    cmd!("write", Some("w"), 2, -1, 0, true, "[-bcCfnqruz] [-P pattern | -s source_file] off len", "writes a number of bytes at a specified offset", WRITE_HELP, write_f),
    cmd!("writev", None, 2, -1, 0, true, "[-Cfqr] [-P pattern] off len [len..]", "writes a number of bytes at a specified offset", WRITEV_HELP, writev_f),
    cmd!("zone_append", Some("zap"), 3, 4, 0, false, "offset len [len..]", "append write a number of bytes at a specified offset", "", zone_append_f),
    cmd!("zone_close", Some("zc"), 2, 2, 0, false, "offset len", "close a range of zones in zone block device", "", zone_close_f),
    cmd!("zone_finish", Some("zf"), 2, 2, 0, false, "offset len", "finish a range of zones in zone block device", "", zone_finish_f),
    cmd!("zone_open", Some("zo"), 2, 2, 0, false, "offset len", "explicit open a range of zones in zone block device", "", zone_open_f),
    cmd!("zone_report", Some("zrp"), 2, 2, 0, false, "offset number", "report zone information", "", zone_report_f),
    cmd!("zone_reset", Some("zrs"), 2, 2, 0, false, "offset len", "reset a zone write pointer in zone block device", "", zone_reset_f),
];

fn find(name: &str) -> Option<&'static Cmd> {
    CMDS.iter().find(|c| c.name == name || c.alt == Some(name))
}

/// Runs one command line; returns 0 or a negative errno.
pub fn command(s: &mut Session, line: &str) -> i32 {
    let words: Vec<String> = line
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    if words.is_empty() {
        return 0;
    }
    let Some(ct) = find(&words[0]) else {
        err(&format!("command \"{}\" not found", words[0]));
        return EINVAL;
    };
    if ct.nofile == 0 && s.dev.is_none() {
        err("no file open, try 'help open'");
        return EINVAL;
    }
    let argc = words.len() as i32 - 1;
    if argc < ct.argmin || (ct.argmax != -1 && argc > ct.argmax) {
        let name = &words[0];
        if ct.argmax == -1 {
            err(&format!(
                "bad argument count {argc} to {name}, expected at least {} arguments",
                ct.argmin
            ));
        } else if ct.argmin == ct.argmax {
            err(&format!(
                "bad argument count {argc} to {name}, expected {} arguments",
                ct.argmin
            ));
        } else {
            err(&format!(
                "bad argument count {argc} to {name}, expected between {} and {} arguments",
                ct.argmin, ct.argmax
            ));
        }
        return EINVAL;
    }
    if ct.write {
        if let Some(d) = &s.dev {
            if d.flags.read_only {
                s.error("Block node is read-only");
                return -libc::EPERM;
            }
            if let Err(m) = d.compress_write_perm(ct.name == "truncate") {
                s.error(&m);
                return -libc::EPERM;
            }
        }
    }
    (ct.f)(s, &words)
}

fn usage(s: &mut Session, name: &str) -> i32 {
    if let Some(ct) = find(name) {
        s.out
            .line(&format!("{} {} -- {}", ct.name, ct.args, ct.oneline));
    }
    EINVAL
}

/// Parses a number argument, printing qemu-io's complaint.
fn num(s: &mut Session, arg: &str) -> Result<u64, i32> {
    cvtnum(arg).map_err(|e| {
        s.out.line(&cvtnum_err(&e, arg));
        match e {
            crate::io::io_fmt::NumErr::Invalid => EINVAL,
            crate::io::io_fmt::NumErr::Range => -libc::ERANGE,
        }
    })
}

/// Parses `offset length` (args[0], args[1]), refusing a length over
/// REQUEST_MAX with qemu-io's complaint.
fn offset_length(s: &mut Session, args: &[String]) -> Result<(u64, u64), i32> {
    let off = num(s, &args[0])?;
    let len = num(s, &args[1])?;
    if len > REQUEST_MAX {
        s.out.line(&format!(
            "length cannot exceed {REQUEST_MAX}, given {}",
            args[1]
        ));
        return Err(EINVAL);
    }
    Ok((off, len))
}

/// Lengths of a vectored request; None after the complaint.
fn iov_lengths(s: &mut Session, args: &[String]) -> Option<Vec<u64>> {
    let mut v = Vec::new();
    let mut total = 0u64;
    for a in args {
        let n = num(s, a).ok()?;
        if n > REQUEST_MAX {
            s.out.line(&format!(
                "Argument '{a}' exceeds maximum size {REQUEST_MAX}"
            ));
            return None;
        }
        if total > REQUEST_MAX - n {
            s.out.line(&format!(
                "The total number of bytes exceed the maximum size {REQUEST_MAX}"
            ));
            return None;
        }
        total += n;
        v.push(n);
    }
    Some(v)
}

fn dev(s: &Session) -> &io_open::Dev {
    s.dev.as_deref().expect("command needs an open device")
}

// ---- read ----------------------------------------------------------------------------

fn read_f(s: &mut Session, w: &[String]) -> i32 {
    let (mut cflag, mut qflag, mut vflag, mut pflag, mut sflag, mut lflag, mut bflag) =
        (false, false, false, false, false, false, false);
    let mut pattern = 0u8;
    let (mut poff, mut pcount) = (0u64, 0u64);
    let mut reg = false;
    let (opts, args) = getopt(w, "bCl:pP:qrs:v");
    for o in opts {
        match o {
            Opt::Flag('b', _) => bflag = true,
            Opt::Flag('C', _) => cflag = true,
            Opt::Flag('l', Some(a)) => {
                lflag = true;
                pcount = match num(s, &a) {
                    Ok(v) => v,
                    Err(e) => return e,
                };
            }
            Opt::Flag('p', _) => {}
            Opt::Flag('P', Some(a)) => {
                pflag = true;
                pattern = match parse_pattern(&mut s.out, &a) {
                    Some(p) => p,
                    None => return EINVAL,
                };
            }
            Opt::Flag('q', _) => qflag = true,
            Opt::Flag('r', _) => reg = true,
            Opt::Flag('s', Some(a)) => {
                sflag = true;
                poff = match num(s, &a) {
                    Ok(v) => v,
                    Err(e) => return e,
                };
            }
            Opt::Flag('v', _) => vflag = true,
            _ => return usage(s, "read"),
        }
    }
    if args.len() != 2 {
        return usage(s, "read");
    }
    let (off, count) = match offset_length(s, &args) {
        Ok(v) => v,
        Err(e) => return e,
    };
    if !pflag && (lflag || sflag) {
        return usage(s, "read");
    }
    if !lflag {
        pcount = count.wrapping_sub(poff);
    }
    if (pcount as i64) < 0 || pcount + poff > count {
        s.out
            .line("pattern verification range exceeds end of read data");
        return EINVAL;
    }
    if bflag {
        if off % 512 != 0 {
            s.out
                .line(&format!("{off} is not a sector-aligned value for 'offset'"));
            return EINVAL;
        }
        if count % 512 != 0 {
            s.out.line(&format!(
                "{count} is not a sector-aligned value for 'count'"
            ));
            return EINVAL;
        }
        if reg {
            s.out
                .line("I/O buffer registration is not supported when reading from vmstate");
            return EINVAL;
        }
    }
    let mut buf = vec![0xabu8; count as usize];
    s.drain();
    let t1 = Instant::now();
    let r = if count > i32::MAX as u64 {
        Err(libc::ERANGE)
    } else if bflag {
        dev(s).read_vmstate(&mut buf, off)
    } else {
        dev(s).read(&mut buf, off)
    };
    let d = t1.elapsed();
    if let Err(e) = r {
        s.out.line(&format!("read failed: {}", strerror(e)));
        return -e;
    }
    let mut ret = 0;
    if pflag {
        let a = poff as usize;
        let b = (poff + pcount) as usize;
        if buf[a..b].iter().any(|&x| x != pattern) {
            s.out.line(&format!(
                "Pattern verification failed at offset {}, {pcount} bytes",
                off + poff
            ));
            ret = EINVAL;
        }
    }
    if qflag {
        return ret;
    }
    if vflag {
        dump_buffer(&mut s.out, &buf, off);
    }
    report(&mut s.out, "read", d, off, count, count, 1, cflag);
    ret
}

/// What readv and aio_read take: -C, -P PATTERN, -q, -r (ignored), -v
/// (and aio_read's -i), an offset and the lengths of the vector.
struct VecRead {
    cflag: bool,
    qflag: bool,
    vflag: bool,
    pattern: Option<u8>,
    off: u64,
    total: u64,
}

/// Parses a readv / aio_read line; Err is the status to return (0 after
/// aio_read's -i message).
fn parse_vec_read(s: &mut Session, w: &[String], name: &str) -> Result<VecRead, i32> {
    let aio = name == "aio_read";
    let mut r = VecRead {
        cflag: false,
        qflag: false,
        vflag: false,
        pattern: None,
        off: 0,
        total: 0,
    };
    let (opts, args) = getopt(w, if aio { "CiP:qrv" } else { "CP:qrv" });
    for o in opts {
        match o {
            Opt::Flag('C', _) => r.cflag = true,
            Opt::Flag('P', Some(a)) => {
                r.pattern = Some(parse_pattern(&mut s.out, &a).ok_or(EINVAL)?);
            }
            Opt::Flag('i', _) => {
                s.out.line("injecting invalid read request");
                return Err(0);
            }
            Opt::Flag('q', _) => r.qflag = true,
            Opt::Flag('r', _) => {}
            Opt::Flag('v', _) => r.vflag = true,
            _ => return Err(usage(s, name)),
        }
    }
    if args.len() < 2 {
        return Err(usage(s, name));
    }
    r.off = num(s, &args[0])?;
    r.total = iov_lengths(s, &args[1..]).ok_or(EINVAL)?.iter().sum();
    Ok(r)
}

impl VecRead {
    /// Reads the vector: what qemu-io prints of it goes to `out`; the
    /// status (EINVAL when the pattern does not match).
    fn run(&self, dev: &io_open::Dev, out: &mut crate::io::io_fmt::Out) -> i32 {
        let (off, total) = (self.off, self.total);
        let mut buf = vec![0xabu8; total as usize];
        let t1 = Instant::now();
        let r = dev.read(&mut buf, off);
        let d = t1.elapsed();
        if let Err(e) = r {
            out.line(&format!("readv failed: {}", strerror(e)));
            return -e;
        }
        let mut ret = 0;
        if self.pattern.is_some_and(|p| buf.iter().any(|&x| x != p)) {
            out.line(&format!(
                "Pattern verification failed at offset {off}, {total} bytes"
            ));
            ret = EINVAL;
        }
        if self.qflag {
            return ret;
        }
        if self.vflag {
            dump_buffer(out, &buf, off);
        }
        report(out, "read", d, off, total, total, 1, self.cflag);
        ret
    }
}

fn readv_f(s: &mut Session, w: &[String]) -> i32 {
    let r = match parse_vec_read(s, w, "readv") {
        Ok(r) => r,
        Err(e) => return e,
    };
    s.drain();
    let dev = s.dev.clone().expect("readv needs an open device");
    r.run(&dev, &mut s.out)
}

// ---- write ---------------------------------------------------------------------------

/// Fills a buffer from a file, repeating its contents (write -s).
fn buffer_from_file(_s: &mut Session, len: u64, name: &str) -> Option<Vec<u8>> {
    let data = match std::fs::read(name) {
        Ok(d) => d,
        Err(e) => {
            err(&format!("{name}: {}", crate::util::ioerr(&e)));
            return None;
        }
    };
    if data.is_empty() {
        err(&format!("{name}: file is empty"));
        return None;
    }
    let mut buf = Vec::with_capacity(len as usize);
    while (buf.len() as u64) < len {
        let n = (len as usize - buf.len()).min(data.len());
        buf.extend_from_slice(&data[..n]);
    }
    Some(buf)
}

fn write_f(s: &mut Session, w: &[String]) -> i32 {
    let (mut cflag, mut qflag, mut bflag, mut pflag, mut zflag, mut compress, mut sflag) =
        (false, false, false, false, false, false, false);
    let (mut fua, mut nofallback, mut unmap, mut reg) = (false, false, false, false);
    let mut pattern = 0xcdu8;
    let mut file_name = String::new();
    let (opts, args) = getopt(w, "bcCfnpP:qrs:uz");
    for o in opts {
        match o {
            Opt::Flag('b', _) => bflag = true,
            Opt::Flag('c', _) => compress = true,
            Opt::Flag('C', _) => cflag = true,
            Opt::Flag('f', _) => fua = true,
            Opt::Flag('n', _) => nofallback = true,
            Opt::Flag('p', _) => {}
            Opt::Flag('P', Some(a)) => {
                pflag = true;
                pattern = match parse_pattern(&mut s.out, &a) {
                    Some(p) => p,
                    None => return EINVAL,
                };
            }
            Opt::Flag('q', _) => qflag = true,
            Opt::Flag('r', _) => reg = true,
            Opt::Flag('s', Some(a)) => {
                sflag = true;
                file_name = a;
            }
            Opt::Flag('u', _) => unmap = true,
            Opt::Flag('z', _) => zflag = true,
            _ => return usage(s, "write"),
        }
    }
    if args.len() != 2 {
        return usage(s, "write");
    }
    if bflag && zflag {
        s.out.line("-b and -z cannot be specified at the same time");
        return EINVAL;
    }
    if fua && (bflag || compress) {
        s.out
            .line("-f and -b or -c cannot be specified at the same time");
        return EINVAL;
    }
    if nofallback && !zflag {
        s.out.line("-n requires -z to be specified");
        return EINVAL;
    }
    if unmap && !zflag {
        s.out.line("-u requires -z to be specified");
        return EINVAL;
    }
    if zflag as u8 + pflag as u8 + sflag as u8 > 1 {
        s.out
            .line("Only one of -z, -P, and -s can be specified at the same time");
        return EINVAL;
    }
    let off = match num(s, &args[0]) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let count = match num(s, &args[1]) {
        Ok(v) => v,
        Err(e) => return e,
    };
    if count > REQUEST_MAX && !nofallback {
        s.out.line(&format!(
            "length cannot exceed {REQUEST_MAX} without -n, given {}",
            args[1]
        ));
        return EINVAL;
    }
    if bflag || compress {
        if off % 512 != 0 {
            s.out
                .line(&format!("{off} is not a sector-aligned value for 'offset'"));
            return EINVAL;
        }
        if count % 512 != 0 {
            s.out.line(&format!(
                "{count} is not a sector-aligned value for 'count'"
            ));
            return EINVAL;
        }
    }
    let buf = if zflag {
        if reg {
            s.out
                .line("cannot combine zero write with registered I/O buffer");
            return EINVAL;
        }
        Vec::new()
    } else if sflag {
        match buffer_from_file(s, count, &file_name) {
            Some(b) => b,
            None => return EINVAL,
        }
    } else {
        vec![pattern; count as usize]
    };
    s.drain();
    let t1 = Instant::now();
    let d0 = dev(s);
    let r = if bflag && count > i32::MAX as u64 {
        Err(libc::ERANGE)
    } else if bflag {
        d0.write_vmstate(&buf, off)
    } else if zflag {
        d0.write_zeroes(off, count, unmap, fua)
    } else if compress {
        d0.write_compressed(&buf, off)
    } else if count > i32::MAX as u64 {
        Err(libc::ERANGE)
    } else {
        d0.write(&buf, off, fua)
    };
    let d = t1.elapsed();
    if let Err(e) = r {
        s.out.line(&format!("write failed: {}", strerror(e)));
        return -e;
    }
    if qflag {
        return 0;
    }
    report(&mut s.out, "wrote", d, off, count, count, 1, cflag);
    0
}

/// What writev and aio_write take: -C, -f (FUA), -P PATTERN, -q, -r, an
/// offset and the vector's lengths; aio_write also -i, and -z [-u] with
/// one length (a zero write).
struct VecWrite {
    cflag: bool,
    qflag: bool,
    fua: bool,
    zflag: bool,
    unmap: bool,
    pattern: u8,
    off: u64,
    total: u64,
}

/// Parses a writev / aio_write line; Err is the status to return (0
/// after aio_write's -i message).
fn parse_vec_write(s: &mut Session, w: &[String], name: &str) -> Result<VecWrite, i32> {
    let aio = name == "aio_write";
    let mut v = VecWrite {
        cflag: false,
        qflag: false,
        fua: false,
        zflag: false,
        unmap: false,
        pattern: 0xcd,
        off: 0,
        total: 0,
    };
    let mut reg = false;
    let (opts, args) = getopt(w, if aio { "CfiP:qruz" } else { "CfP:qr" });
    for o in opts {
        match o {
            Opt::Flag('C', _) => v.cflag = true,
            Opt::Flag('f', _) => v.fua = true,
            Opt::Flag('q', _) => v.qflag = true,
            // aio_write: a registered buffer; writev ignores it.
            Opt::Flag('r', _) => reg = aio,
            Opt::Flag('u', _) => v.unmap = true,
            Opt::Flag('P', Some(a)) => {
                v.pattern = parse_pattern(&mut s.out, &a).ok_or(EINVAL)?;
            }
            Opt::Flag('i', _) => {
                s.out.line("injecting invalid write request");
                return Err(0);
            }
            Opt::Flag('z', _) => v.zflag = true,
            _ => return Err(usage(s, name)),
        }
    }
    if args.len() < 2 {
        return Err(usage(s, name));
    }
    let refuse = |s: &mut Session, msg: &str| {
        s.out.line(msg);
        Err(EINVAL)
    };
    if v.zflag && args.len() != 2 {
        return refuse(s, "-z supports only a single length parameter");
    }
    if v.unmap && !v.zflag {
        return refuse(s, "-u requires -z to be specified");
    }
    if v.zflag && reg {
        return refuse(s, "cannot combine zero write with registered I/O buffer");
    }
    v.off = num(s, &args[0])?;
    v.total = if v.zflag {
        num(s, &args[1])?
    } else {
        iov_lengths(s, &args[1..]).ok_or(EINVAL)?.iter().sum()
    };
    Ok(v)
}

impl VecWrite {
    /// Writes the vector (or the zeroes); `Err` is the errno, the Ok
    /// value what qemu-io prints of it.
    fn run(&self, dev: &io_open::Dev) -> Result<String, i32> {
        let t1 = Instant::now();
        if self.zflag {
            dev.write_zeroes(self.off, self.total, self.unmap, self.fua)?;
        } else {
            let buf = vec![self.pattern; self.total as usize];
            dev.write(&buf, self.off, self.fua)?;
        }
        let d = t1.elapsed();
        Ok(match self.qflag {
            true => String::new(),
            false => report_text("wrote", d, self.off, self.total, self.cflag),
        })
    }
}

fn writev_f(s: &mut Session, w: &[String]) -> i32 {
    let v = match parse_vec_write(s, w, "writev") {
        Ok(v) => v,
        Err(e) => return e,
    };
    s.drain();
    match v.run(dev(s)) {
        Ok(text) => {
            s.out.put(&text);
            0
        }
        Err(e) => {
            s.out.line(&format!("writev failed: {}", strerror(e)));
            -e
        }
    }
}

// ---- aio -----------------------------------------------------------------------------

/// Report text of a finished asynchronous request, kept for later.
fn report_text(op: &str, d: Duration, off: u64, n: u64, machine: bool) -> String {
    let mut tmp = crate::io::io_fmt::Out::capture();
    report(&mut tmp, op, d, off, n, n, 1, machine);
    tmp.take()
}

fn aio_read_f(s: &mut Session, w: &[String]) -> i32 {
    let r = match parse_vec_read(s, w, "aio_read") {
        Ok(r) => r,
        Err(e) => return e,
    };
    s.submit(Box::new(move |dev| {
        let mut out = crate::io::io_fmt::Out::capture();
        r.run(dev, &mut out);
        out.take()
    }));
    0
}

fn aio_write_f(s: &mut Session, w: &[String]) -> i32 {
    let v = match parse_vec_write(s, w, "aio_write") {
        Ok(v) => v,
        Err(e) => return e,
    };
    s.submit(Box::new(move |dev| match v.run(dev) {
        Ok(text) => text,
        Err(e) => format!("aio_write failed: {}\n", strerror(e)),
    }));
    0
}

fn aio_flush_f(s: &mut Session, _w: &[String]) -> i32 {
    s.drain();
    0
}

fn flush_f(s: &mut Session, _w: &[String]) -> i32 {
    s.drain();
    match dev(s).flush() {
        Ok(()) => 0,
        Err(e) => -e,
    }
}

// ---- discard, truncate, length, info, alloc, map -----------------------------------------

fn discard_f(s: &mut Session, w: &[String]) -> i32 {
    let (mut cflag, mut qflag) = (false, false);
    let (opts, args) = getopt(w, "Cq");
    for o in opts {
        match o {
            Opt::Flag('C', _) => cflag = true,
            Opt::Flag('q', _) => qflag = true,
            _ => return usage(s, "discard"),
        }
    }
    if args.len() != 2 {
        return usage(s, "discard");
    }
    let (off, bytes) = match offset_length(s, &args) {
        Ok(v) => v,
        Err(e) => return e,
    };
    s.drain();
    let t1 = Instant::now();
    let r = dev(s).discard(off, bytes);
    let d = t1.elapsed();
    if let Err(e) = r {
        s.out.line(&format!("discard failed: {}", strerror(e)));
        return -e;
    }
    if !qflag {
        report(&mut s.out, "discard", d, off, bytes, bytes, 1, cflag);
    }
    0
}

fn truncate_f(s: &mut Session, w: &[String]) -> i32 {
    let mut prealloc = "off".to_string();
    let (opts, args) = getopt(w, "m:");
    for o in opts {
        match o {
            Opt::Flag('m', Some(m)) => {
                if !matches!(m.as_str(), "off" | "metadata" | "falloc" | "full") {
                    s.error(&format!("Invalid preallocation mode '{m}'"));
                    return EINVAL;
                }
                prealloc = m;
            }
            _ => return usage(s, "truncate"),
        }
    }
    // qemu-io reads the operand at optind whatever follows it.
    let Some(arg) = args.first() else {
        return usage(s, "truncate");
    };
    let off = match cvtnum(arg) {
        Ok(v) => v,
        Err(e) => {
            s.out.line(&cvtnum_err(&e, &w[1]));
            return match e {
                crate::io::io_fmt::NumErr::Invalid => EINVAL,
                crate::io::io_fmt::NumErr::Range => -libc::ERANGE,
            };
        }
    };
    s.drain();
    match truncate(s, off, &prealloc) {
        Ok(()) => 0,
        Err((errno, msg)) => {
            s.error(&msg);
            -errno
        }
    }
}

/// blk_truncate(): resizes the image; the error is QEMU's text.
fn truncate(s: &mut Session, size: u64, prealloc: &str) -> Result<(), (i32, String)> {
    let d = dev(s);
    let old = d.length();
    match &d.be {
        Backend::Null { .. } => Err((
            libc::ENOTSUP,
            "Image format driver does not support resize".into(),
        )),
        Backend::Img(img) => {
            if prealloc != "off" && size < old {
                return Err((
                    libc::ENOTSUP,
                    "Preallocation can't be used for shrinking an image".into(),
                ));
            }
            if let oxqcow::Image::Qcow2(q) = img {
                if !size.is_multiple_of(512) {
                    return Err((
                        libc::EINVAL,
                        "The new size must be a multiple of 512".into(),
                    ));
                }
                let _ = q;
            }
            img.resize(size)
                .map_err(|e| (e.errno(), truncate_errmsg(&e)))?;
            if prealloc != "off" && size > old {
                // Allocate the new area with zeroed data clusters. Part of
                // the resize, not a guest write: no bitmap records it.
                let fill = || -> Result<(), (i32, String)> {
                    let zeros = vec![0u8; 1 << 20];
                    let mut pos = old;
                    while pos < size {
                        let n = (size - pos).min(zeros.len() as u64);
                        img.write_at(&zeros[..n as usize], pos)
                            .map_err(|e| (e.errno(), crate::util::errmsg(&e)))?;
                        pos += n;
                    }
                    Ok(())
                };
                match img.qcow2() {
                    Some(q) => q.as_one_request(old, 0, fill)?,
                    None => fill()?,
                }
            }
            if d.flags.writethrough {
                let _ = img.flush();
            }
            Ok(())
        }
    }
}

/// A resize failure in QEMU's words (without our file-name prefix).
fn truncate_errmsg(e: &oxqcow::Error) -> String {
    let m = crate::util::errmsg(e);
    match m.split_once(": ") {
        Some((_, rest)) if m.starts_with('/') || m.contains(".qcow2: ") => rest.to_string(),
        _ => m,
    }
}

fn length_f(s: &mut Session, _w: &[String]) -> i32 {
    s.drain();
    let n = dev(s).length();
    s.out.line(&cvtstr(n as f64));
    0
}

fn info_f(s: &mut Session, _w: &[String]) -> i32 {
    s.drain();
    let d = dev(s);
    // A blkdebug or compress node on top is what qemu-io describes: its
    // information is its image's, without the format-specific part.
    let top = !d.top_dbg.is_empty() || d.compress.is_some();
    let driver = if !d.top_dbg.is_empty() {
        "blkdebug"
    } else {
        d.driver.as_str()
    };
    let mut lines = vec![format!("format name: {driver}")];
    // Protocol drivers have a protocol name too, printed the same way.
    if matches!(
        driver,
        "file" | "host_device" | "host_cdrom" | "null-co" | "null-aio" | "blkdebug"
    ) {
        lines.push(lines[0].clone());
    }
    if d.driver == "nbd" {
        lines.push("format name: nbd+unix".into());
    }
    let ret = match &d.be {
        // The nbd driver has no driver information: qemu-io prints the
        // format name(s) and fails quietly.
        Backend::Null { .. } | Backend::Img(oxqcow::Image::Nbd(_)) => -libc::ENOTSUP,
        Backend::Img(oxqcow::Image::Raw(_)) => {
            lines.push("cluster size: 0 bytes".into());
            lines.push("vm state offset: 0 bytes".into());
            0
        }
        Backend::Img(oxqcow::Image::Qcow2(q)) => {
            let h = q.header();
            lines.push(format!("cluster size: {}", cvtstr(q.cluster_size() as f64)));
            lines.push(format!(
                "vm state offset: {}",
                cvtstr(q.vm_state_offset() as f64)
            ));
            if top {
                for l in lines {
                    s.out.line(&l);
                }
                return 0;
            }
            lines.push("Format specific information:".into());
            let v3 = h.version >= 3;
            lines.push(format!("    compat: {}", if v3 { "1.1" } else { "0.10" }));
            let ct = match h.compression_type {
                1 => "zstd",
                _ => "zlib",
            };
            lines.push(format!("    compression type: {ct}"));
            if v3 {
                let lazy = h.compatible_features & oxqcow::format::COMPAT_LAZY_REFCOUNTS != 0;
                lines.push(format!("    lazy refcounts: {lazy}"));
            }
            lines.push(format!("    refcount bits: {}", 1u32 << h.refcount_order));
            if let Some(e) = q.encryption() {
                let o = crate::util::Obj::new().put(
                    "encrypt",
                    crate::util::Json::Obj(crate::info::encrypt_info(e)),
                );
                let mut t = String::new();
                crate::util::dump_human(&o, 4, &mut t);
                lines.extend(t.lines().map(String::from));
            }
            if v3 {
                let corrupt = h.incompatible_features & oxqcow::format::INCOMPAT_CORRUPT != 0;
                lines.push(format!("    corrupt: {corrupt}"));
                let ext = h.incompatible_features & oxqcow::format::INCOMPAT_EXTL2 != 0;
                lines.push(format!("    extended l2: {ext}"));
            }
            0
        }
    };
    for l in lines {
        s.out.line(&l);
    }
    ret
}

fn alloc_f(s: &mut Session, w: &[String]) -> i32 {
    let start = match num(s, &w[1]) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let mut count = if w.len() == 3 {
        match num(s, &w[2]) {
            Ok(v) => v,
            Err(e) => return e,
        }
    } else {
        512
    };
    s.drain();
    let mut off = start;
    let mut remaining = count;
    let mut sum = 0u64;
    while remaining > 0 {
        let (alloc, n) = match dev(s).is_allocated(off, remaining) {
            Ok(v) => v,
            Err(e) => {
                s.out.line(&format!("is_allocated failed: {}", strerror(e)));
                return -e;
            }
        };
        off += n;
        remaining -= n;
        if alloc {
            sum += n;
        }
        if n == 0 {
            count -= remaining;
            remaining = 0;
        }
    }
    s.out.line(&format!(
        "{sum}/{count} bytes allocated at offset {}",
        cvtstr(start as f64)
    ));
    0
}

fn map_f(s: &mut Session, _w: &[String]) -> i32 {
    s.drain();
    let mut off = 0u64;
    let mut bytes = dev(s).length();
    while bytes > 0 {
        // Merge runs of the same kind, as map_is_allocated() does.
        let (first, mut n) = match dev(s).is_allocated(off, bytes) {
            Ok(v) => v,
            Err(e) => {
                s.error(&format!("Failed to get allocation status: {}", strerror(e)));
                return -e;
            }
        };
        if n == 0 {
            s.error("Unexpected end of image");
            return -libc::EIO;
        }
        loop {
            if n >= bytes {
                break;
            }
            match dev(s).is_allocated(off + n, bytes - n) {
                Ok((a, m)) if a == first && m > 0 => n += m,
                Ok(_) => break,
                Err(e) => {
                    s.error(&format!("Failed to get allocation status: {}", strerror(e)));
                    return -e;
                }
            }
        }
        let what = if first {
            "    allocated"
        } else {
            "not allocated"
        };
        s.out.line(&format!(
            "{} ({n:#x}) bytes {what} at offset {} ({off:#x})",
            cvtstr(n as f64),
            cvtstr(off as f64)
        ));
        off += n;
        bytes -= n;
    }
    0
}

// ---- open, close, reopen -------------------------------------------------------------------

fn open_f(s: &mut Session, w: &[String]) -> i32 {
    let mut req = OpenReq::default();
    let (opts, args) = getopt(w, "snCro:ki:t:d:U");
    for o in opts {
        match o {
            Opt::Flag('s', _) => req.snapshot = true,
            Opt::Flag('n', _) => {
                req.flags.nocache = true;
                req.flags.writethrough = false;
            }
            Opt::Flag('C', _) => req.cor = true,
            Opt::Flag('k', _) | Opt::Flag('U', _) => {}
            Opt::Flag('r', _) => req.flags.read_only = true,
            Opt::Flag('t', Some(m)) => {
                if !req.flags.set_cache(&m) {
                    s.error(&format!("Invalid cache option: {m}"));
                    return EINVAL;
                }
            }
            Opt::Flag('d', Some(m)) => {
                if !req.flags.set_discard(&m) {
                    s.error(&format!("Invalid discard option: {m}"));
                    return EINVAL;
                }
            }
            Opt::Flag('i', Some(m)) => {
                if !io_open::aio_mode_ok(&m) {
                    s.error(&format!("Invalid aio option: {m}"));
                    return EINVAL;
                }
            }
            Opt::Flag('o', Some(o)) => {
                if s.image_opts {
                    s.out
                        .line("--image-opts and 'open -o' are mutually exclusive");
                    return EINVAL;
                }
                match parse_qemu_opts(&o) {
                    Ok(v) => req.opts.extend(v),
                    Err(m) => {
                        s.error(&m);
                        return EINVAL;
                    }
                }
            }
            _ => return usage(s, "open"),
        }
    }
    let mut args = args;
    if s.image_opts && args.len() == 1 {
        match parse_qemu_opts(&args[0]) {
            Ok(v) => req.opts.extend(v),
            Err(m) => {
                s.error(&m);
                return EINVAL;
            }
        }
        args.clear();
    }
    match args.len() {
        0 => {}
        1 => req.name = Some(args[0].clone()),
        _ => return usage(s, "open"),
    }
    if s.openfile(req) != 0 {
        return EINVAL;
    }
    0
}

fn close_f(s: &mut Session, _w: &[String]) -> i32 {
    s.close_dev();
    0
}

fn reopen_f(s: &mut Session, w: &[String]) -> i32 {
    let cur = dev(s);
    let mut flags = cur.flags.clone();
    let mut has_rw = false;
    let mut has_cache = false;
    let mut new_opts: Vec<(String, String)> = Vec::new();
    let (opts, args) = getopt(w, "c:o:rw");
    for o in opts {
        match o {
            Opt::Flag('c', Some(m)) => {
                if !flags.set_cache(&m) {
                    s.error(&format!("Invalid cache option: {m}"));
                    return EINVAL;
                }
                has_cache = true;
            }
            Opt::Flag('o', Some(o)) => match parse_qemu_opts(&o) {
                Ok(v) => new_opts.extend(v),
                Err(m) => {
                    s.error(&m);
                    return EINVAL;
                }
            },
            Opt::Flag('r', _) | Opt::Flag('w', _) => {
                if has_rw {
                    s.error("Only one -r/-w option may be given");
                    return EINVAL;
                }
                flags.read_only = matches!(o, Opt::Flag('r', _));
                has_rw = true;
            }
            _ => return usage(s, "reopen"),
        }
    }
    if !args.is_empty() {
        return usage(s, "reopen");
    }
    let has = |k: &str| new_opts.iter().any(|(key, _)| key == k);
    if has("read-only") && has_rw {
        s.error("Cannot set both -r/-w and 'read-only'");
        return EINVAL;
    }
    if (has("cache.direct") || has("cache.no-flush")) && has_cache {
        s.error("Cannot set both -c and the cache options");
        return EINVAL;
    }
    for (k, v) in &new_opts {
        if matches!(
            k.as_str(),
            "read-only" | "cache.direct" | "cache.no-flush" | "auto-read-only" | "force-share"
        ) && !matches!(
            v.as_str(),
            "on" | "off" | "yes" | "no" | "true" | "false" | "y" | "n"
        ) {
            s.error(&format!("Parameter '{k}' expects 'on' or 'off'"));
            return EINVAL;
        }
    }
    if let Some(m) = io_open::compress_reopen_error(cur) {
        s.error(&m);
        return EINVAL;
    }
    // Options that cannot change: the driver and node names of every node.
    for (k, v) in &new_opts {
        let (prefix, leaf) = match k.rsplit_once('.') {
            Some((p, l)) => (format!("{p}."), l),
            None => (String::new(), k.as_str()),
        };
        if leaf != "driver" && leaf != "node-name" {
            continue;
        }
        let curv = cur
            .explicit
            .get(k)
            .cloned()
            .or_else(|| current_driver(cur, &prefix, leaf));
        if curv.as_deref() != Some(v.as_str()) {
            s.error(&format!("Cannot change the option '{leaf}'"));
            return EINVAL;
        }
    }
    // Reopen: close, then open again with the old explicit options
    // overridden by the new ones.
    s.drain();
    let Some(old) = s.dev.take() else {
        return EINVAL;
    };
    let mut req = old.req.clone();
    if let Some(j) = req.name.as_deref().and_then(|n| n.strip_prefix("json:")) {
        // As options, so that the merge below can drop some of them.
        if let Ok(mut v) = crate::blockopts::parse_json_filename(j) {
            v.append(&mut req.opts);
            req.opts = v;
            req.name = None;
        }
    }
    req.flags = flags;
    req.opts
        .retain(|(k, _)| !matches!(k.as_str(), "read-only" | "cache.direct" | "cache.no-flush"));
    let new_keys: Vec<String> = new_opts.iter().map(|(k, _)| k.clone()).collect();
    req.opts = io_open::io_qcow2_opts::join_reopen(&req.opts, &new_opts);
    let fallback = old.req.clone();
    let _ = old.close();
    match reopen_open(req, new_keys) {
        Ok(d) => {
            s.dev = Some(std::sync::Arc::new(d));
            0
        }
        Err(msg) => {
            s.error(&msg);
            // Keep the device as it was.
            if let Ok(d) = io_open::open(fallback) {
                s.dev = Some(std::sync::Arc::new(d));
            }
            EINVAL
        }
    }
}

/// Opens what a reopen asks for. QEMU checks the drivers' options first
/// and then refuses any other new option ("Cannot change the option"):
/// a new option no driver takes is taken out and the open tried again,
/// so that an error in the drivers' options is the one reported. Of
/// several refused options, the one of the node nearest the top is named.
fn reopen_open(mut req: OpenReq, mut new_keys: Vec<String>) -> Result<io_open::Dev, String> {
    // (depth of the node: length of the key's prefix, the option's name)
    let mut refused: Vec<(usize, String)> = Vec::new();
    loop {
        match io_open::open(req.clone()) {
            Ok(d) => {
                let Some((_, leaf)) = refused.into_iter().min_by_key(|(depth, _)| *depth) else {
                    return Ok(d);
                };
                let _ = d.close();
                return Err(format!("Cannot change the option '{leaf}'"));
            }
            Err(msg) => {
                let Some(leaf) = io_open::unknown_option(&msg) else {
                    return Err(msg);
                };
                let dotted = format!(".{leaf}");
                let Some(i) = new_keys
                    .iter()
                    .position(|k| *k == leaf || k.ends_with(&dotted))
                else {
                    return Err(msg);
                };
                let key = new_keys.remove(i);
                req.opts.retain(|(k, _)| *k != key);
                refused.push((key.len() - leaf.len(), leaf));
            }
        }
    }
}

/// The driver a node has when no option named it (for reopen's checks).
fn current_driver(d: &io_open::Dev, prefix: &str, leaf: &str) -> Option<String> {
    if leaf != "driver" {
        return None;
    }
    match prefix {
        "" => Some(d.driver.clone()),
        "file." => Some("file".into()),
        "backing." => d
            .image()
            .and_then(|i| i.backing())
            .map(|b| b.format().to_string()),
        _ => None,
    }
}

// ---- misc ----------------------------------------------------------------------------------

fn abort_f(s: &mut Session, _w: &[String]) -> i32 {
    // abort(3) neither flushes stdio nor closes the image.
    s.out.discard();
    // SAFETY: abort() never returns.
    unsafe { libc::abort() }
}

fn sigraise_f(s: &mut Session, w: &[String]) -> i32 {
    let sig = match num(s, &w[1]) {
        Ok(v) => v,
        Err(e) => return e,
    };
    if sig > 65 {
        s.out.line(&format!(
            "signal argument '{}' is too large to be a valid signal",
            w[1]
        ));
        return EINVAL;
    }
    s.out.flush();
    // SAFETY: raise() with a signal number in range.
    unsafe {
        libc::raise(sig as libc::c_int);
    }
    0
}

fn sleep_f(s: &mut Session, w: &[String]) -> i32 {
    match strtol_full(&w[1]) {
        Some(ms) if ms >= 0 => {
            s.drain();
            std::thread::sleep(Duration::from_millis(ms as u64));
            0
        }
        _ => {
            s.out.line(&format!("{} is not a valid number", w[1]));
            EINVAL
        }
    }
}

fn quit_f(s: &mut Session, _w: &[String]) -> i32 {
    s.quit = true;
    0
}

fn help_f(s: &mut Session, w: &[String]) -> i32 {
    if w.len() < 2 {
        for ct in CMDS {
            s.out.line(&oneline(ct, ct.name));
        }
        s.out.put("\nUse 'help commandname' for extended help.\n");
        return 0;
    }
    let Some(ct) = find(&w[1]) else {
        s.out.line(&format!("command {} not found", w[1]));
        return EINVAL;
    };
    s.out.line(&oneline(ct, &w[1]));
    if !ct.help.is_empty() {
        s.out.put(ct.help);
    }
    0
}

fn oneline(ct: &Cmd, name: &str) -> String {
    if ct.args.is_empty() && ct.name != "map" {
        format!("{name} -- {}", ct.oneline)
    } else {
        format!("{name} {} -- {}", ct.args, ct.oneline)
    }
}

use crate::io::io_async::{break_f, remove_break_f, resume_f, wait_break_f};

fn zone_fail(s: &mut Session, w: &[String], what: &str) -> i32 {
    for a in &w[1..] {
        if let Err(e) = num(s, a) {
            return e;
        }
    }
    s.out
        .line(&format!("zone {what} failed: {}", strerror(libc::ENOTSUP)));
    -libc::ENOTSUP
}

fn zone_report_f(s: &mut Session, w: &[String]) -> i32 {
    zone_fail(s, w, "report")
}
fn zone_open_f(s: &mut Session, w: &[String]) -> i32 {
    zone_fail(s, w, "open")
}
fn zone_close_f(s: &mut Session, w: &[String]) -> i32 {
    zone_fail(s, w, "close")
}
fn zone_finish_f(s: &mut Session, w: &[String]) -> i32 {
    zone_fail(s, w, "finish")
}
fn zone_reset_f(s: &mut Session, w: &[String]) -> i32 {
    zone_fail(s, w, "reset")
}
fn zone_append_f(s: &mut Session, w: &[String]) -> i32 {
    zone_fail(s, &w[..2], "append")
}

// ---- help texts (qemu-io's wording) -----------------------------------------------------------

const READ_HELP: &str = "
 reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output

";

const READV_HELP: &str = "
 reads a range of bytes from the given offset into multiple buffers

 Example:
 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 Uses multiple iovec buffers if more than one byte range is specified.
 -C, -- report statistics in a machine parsable format
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

";

const WRITE_HELP: &str = "
 writes a range of bytes from the given offset

 Example:
 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -b, -- write to the VM state rather than the virtual disk
 -c, -- write compressed data with blk_write_compressed
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -n, -- with -z, don't allow slow fallback
 -p, -- ignored for backwards compatibility
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- use a pattern file to fill the write buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_pwrite_zeroes

";

const WRITEV_HELP: &str = "
 writes a range of bytes from the given offset source from multiple buffers

 Example:
 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer

";

const AIO_READ_HELP: &str = "
 asynchronously reads a range of bytes from the given offset

 Example:
 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 The read is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -i, -- treat request as invalid, for exercising stats
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

";

const AIO_WRITE_HELP: &str = "
 asynchronously writes a range of bytes from the given offset source
 from multiple buffers

 Example:
 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 The write is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -i, -- treat request as invalid, for exercising stats
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_aio_pwrite_zeroes

";

const DISCARD_HELP: &str = "
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

";

const OPEN_HELP: &str = "
 opens a new file in the requested mode

 Example:
 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached

 Opens a file for subsequent use by all of the other qemu-io commands.
 -r, -- open file read-only
 -s, -- use snapshot file
 -C, -- use copy-on-read
 -n, -- disable host cache, short for -t none
 -U, -- force shared permissions
 -k, -- use kernel AIO implementation (Linux only, prefer use of -i)
 -i, -- use AIO mode (threads, native or io_uring)
 -t, -- use the given cache mode for the image
 -d, -- use the given discard mode for the image
 -o, -- options to be given to the block driver
";

const REOPEN_HELP: &str = "
 Changes the open options of an already opened image

 Example:
 'reopen -o lazy-refcounts=on' - activates lazy refcount writeback on a qcow2 image

 -r, -- Reopen the image read-only
 -w, -- Reopen the image read-write
 -c, -- Change the cache mode to the given value
 -o, -- Changes block driver options (cf. 'open' command)

";

const SIGRAISE_HELP: &str = "
 raises the given signal

 Example:
 'sigraise 15' - raises SIGTERM

 Invokes raise(signal), where \"signal\" is the mandatory integer argument
 given to sigraise.

";
