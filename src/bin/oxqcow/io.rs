//! `oxqcow io`: a qemu-io replacement over the oxqcow library. Owns the
//! command line (qemu-io's options), the session (the open device, the
//! output stream, completions of asynchronous requests not yet reported)
//! and the command loop: the `-c` commands in order, or else commands
//! read from standard input after a `PROGRAM> ` prompt. Like qemu-io,
//! messages are prefixed with the program's base name (argv[0]), so a
//! wrapper that runs it as `qemu-io` prints exactly what qemu-io prints.
//! The exit status is 1 when any command failed, else 0.

#[path = "io_async.rs"]
mod io_async;
#[path = "io_cmds.rs"]
mod io_cmds;
#[path = "io_cor.rs"]
mod io_cor;
#[path = "io_filters.rs"]
pub(crate) mod io_filters;
#[path = "io_fmt.rs"]
pub(crate) mod io_fmt;
#[path = "io_nbd.rs"]
pub(crate) mod io_nbd;

use crate::blockopts;
use crate::io_open::{self, aio_mode_ok, Dev, Flags, OpenReq};
use crate::util::CliResult;
use io_fmt::{err, Out};
use std::sync::Arc;

#[derive(clap::Args)]
#[command(args_override_self = true)]
pub struct Args {
    /// Execute a command (may be repeated); without -c, commands are read from stdin
    #[arg(
        short = 'c',
        long = "cmd",
        value_name = "STRING",
        allow_hyphen_values = true
    )]
    cmds: Vec<String>,
    /// Block driver to use (qcow2, raw, file, null-co, compress); probed when not given
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    fmt: Option<String>,
    /// Open the image read-only
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Use a temporary snapshot overlay (not implemented)
    #[arg(short = 's', long = "snapshot")]
    snapshot: bool,
    /// Disable the host cache (short for -t none)
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    /// Copy-on-read: reads copy data from the backing chain into the image
    #[arg(short = 'C', long = "copy-on-read")]
    copy_on_read: bool,
    /// Misalign buffers (accepted; buffers are not aligned anyway)
    #[arg(short = 'm', long = "misalign")]
    misalign: bool,
    /// Native AIO (accepted, ignored)
    #[arg(short = 'k', long = "native-aio")]
    native_aio: bool,
    /// AIO mode: threads, native or io_uring (accepted, ignored)
    #[arg(short = 'i', long = "aio", value_name = "MODE")]
    aio: Option<String>,
    /// Cache mode: none, writeback, writethrough, directsync, unsafe
    #[arg(short = 't', long = "cache", value_name = "MODE")]
    cache: Option<String>,
    /// Discard mode: ignore/off or unmap/on
    #[arg(short = 'd', long = "discard", value_name = "MODE")]
    discard: Option<String>,
    /// Tracing options (accepted, ignored)
    #[arg(short = 'T', long = "trace", value_name = "OPTS")]
    trace: Option<String>,
    /// Force shared permissions (accepted; oxqcow takes no image locks)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Define an object: secret,id=ID,data=PASSWORD|file=PATH[,format=raw|base64]
    #[arg(long = "object", value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// Treat FILE as an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Block driver options for the image (k=v,...; may be repeated)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Print the version and exit
    #[arg(short = 'V', long = "version")]
    version: bool,
    /// Image file (or option string with --image-opts)
    file: Option<String>,
}

/// The state of one `oxqcow io` run.
pub struct Session {
    pub out: Out,
    pub prg: String,
    /// Shared with the threads of asynchronous requests (`io_async.rs`).
    pub dev: Option<Arc<Dev>>,
    pub image_opts: bool,
    /// Report lines of asynchronous requests already done, printed when
    /// qemu-io would next run its event loop.
    pub pending: Vec<String>,
    pub workers: io_async::Workers,
    pub quit: bool,
}

impl Session {
    /// error_report(): "PROGRAM: message" on stderr.
    pub fn error(&self, msg: &str) {
        err(&format!("{}: {msg}", self.prg));
    }

    /// Prints the reports of finished asynchronous requests.
    pub fn drain(&mut self) {
        self.wait_workers();
        self.print_debug_msgs();
        for s in std::mem::take(&mut self.pending) {
            self.out.put(&s);
        }
    }

    /// Closes the device, reporting a failed flush as QEMU does.
    pub fn close_dev(&mut self) {
        self.finish_workers();
        self.drain();
        if let Some(d) = self.dev.take() {
            for l in d.close() {
                self.error(&l);
            }
        }
    }

    /// qemu-io's openfile(): 0, or 1 after the complaint.
    pub fn openfile(&mut self, req: OpenReq) -> i32 {
        if self.dev.is_some() {
            self.error("file open already, try 'help close'");
            return 1;
        }
        let name = req.name.clone();
        match io_open::open(req) {
            Ok(d) => {
                self.dev = Some(Arc::new(d));
                0
            }
            Err(msg) => {
                match name {
                    Some(n) => self.error(&format!("can't open device {n}: {msg}")),
                    None => self.error(&format!("can't open: {msg}")),
                }
                1
            }
        }
    }
}

pub fn run(a: Args) -> CliResult<()> {
    let prg = crate::util::prgname().to_string();
    crate::prefix_warnings(prg.clone());
    let mut s = Session {
        out: Out::new(),
        prg: prg.clone(),
        dev: None,
        image_opts: a.image_opts,
        pending: Vec::new(),
        workers: Default::default(),
        quit: false,
    };
    if a.version {
        s.out.line(&format!(
            "{prg} version {} (oxqcow)",
            env!("CARGO_PKG_VERSION")
        ));
        s.out.flush();
        return Ok(());
    }
    let _ = (a.misalign, a.native_aio, &a.trace, a.force_share);
    if let Err(m) = crate::secret::define(&a.object) {
        s.error(&m);
        std::process::exit(1);
    }
    let mut flags = Flags::default();
    if a.nocache {
        flags.nocache = true;
        flags.writethrough = false;
    }
    if let Some(d) = &a.discard {
        if !flags.set_discard(d) {
            s.error(&format!("Invalid discard option: {d}"));
            std::process::exit(1);
        }
    }
    if let Some(m) = &a.aio {
        if !aio_mode_ok(m) {
            s.error(&format!("Invalid aio option: {m}"));
            std::process::exit(1);
        }
    }
    if let Some(c) = &a.cache {
        if !flags.set_cache(c) {
            s.error(&format!("Invalid cache option: {c}"));
            std::process::exit(1);
        }
    }
    if a.fmt.is_some() && a.image_opts {
        s.error("--image-opts and -f are mutually exclusive");
        std::process::exit(1);
    }
    flags.read_only = a.read_only;
    if let Some(file) = &a.file {
        let mut opts = Vec::new();
        for o in &a.options {
            match blockopts::parse_qemu_opts(o) {
                Ok(v) => opts.extend(v),
                Err(m) => {
                    s.error(&m);
                    std::process::exit(1);
                }
            }
        }
        let req = if a.image_opts {
            match blockopts::parse_qemu_opts(file) {
                Ok(v) => {
                    opts.extend(v);
                    OpenReq {
                        name: None,
                        opts,
                        flags,
                        snapshot: a.snapshot,
                        cor: a.copy_on_read,
                    }
                }
                Err(m) => {
                    s.error(&m);
                    std::process::exit(1);
                }
            }
        } else {
            if let Some(f) = &a.fmt {
                opts.insert(0, ("driver".to_string(), f.clone()));
            }
            OpenReq {
                name: Some(file.clone()),
                opts,
                flags,
                snapshot: a.snapshot,
                cor: a.copy_on_read,
            }
        };
        if s.openfile(req) != 0 {
            s.out.flush();
            std::process::exit(1);
        }
    }

    let mut last_error = 0;
    if !a.cmds.is_empty() {
        for c in &a.cmds {
            if s.quit {
                break;
            }
            let r = crate::io::io_cmds::command(&mut s, c);
            if r < 0 {
                last_error = r;
            }
        }
    } else {
        let stdin = std::io::stdin();
        let mut line = Vec::new();
        while !s.quit {
            let prompt = format!("{}> ", s.prg);
            s.out.put(&prompt);
            s.out.flush();
            line.clear();
            if !read_line(&stdin, &mut line) {
                break;
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            let r = crate::io::io_cmds::command(&mut s, &text);
            if r < 0 {
                last_error = r;
            }
        }
    }
    s.close_dev();
    s.out.flush();
    if last_error < 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// fgets() with qemu-io's 1024-byte buffer: at most 1023 bytes a call,
/// the newline dropped. False at end of input.
fn read_line(stdin: &std::io::Stdin, line: &mut Vec<u8>) -> bool {
    use std::io::BufRead;
    let mut lock = stdin.lock();
    loop {
        let buf = match lock.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return !line.is_empty(),
        };
        if buf.is_empty() {
            return !line.is_empty();
        }
        let room = 1023 - line.len();
        let take = buf.len().min(room);
        if let Some(i) = buf[..take].iter().position(|&c| c == b'\n') {
            line.extend_from_slice(&buf[..i]);
            lock.consume(i + 1);
            return true;
        }
        line.extend_from_slice(&buf[..take]);
        lock.consume(take);
        if line.len() >= 1023 {
            return true;
        }
    }
}
