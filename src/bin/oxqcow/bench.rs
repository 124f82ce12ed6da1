//! `oxqcow bench`: qemu-img bench over the oxqcow driver, so that one
//! command line measures QEMU's driver and ours. Owns qemu-img's option
//! checks and texts, the request offsets (each request `step` bytes after
//! the previous one, wrapping modulo the image size as QEMU 10.0 does), queue depth as
//! that many threads sharing one image, the flush interval with and
//! without draining, and the cache modes mapped to open options
//! (writethrough, O_DIRECT, unsafe = flushes skipped). Every request is
//! sent from the same pages, as qemu-img bench sends them (bench_buf).

use crate::bench_buf::{BenchBuffers, View};
use crate::img_util::{int_opt, open_named, parse_cache_mode, size_opt, strerror, CacheMode};
use crate::util::CliResult;
use oxqcow::{Error, OpenOptions};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Quiet (accepted; qemu-img bench prints its lines anyway)
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    fmt: Option<String>,
    /// Cache mode: writeback, writethrough, none, directsync, unsafe
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Number of requests
    #[arg(
        short = 'c',
        long = "count",
        value_name = "COUNT",
        allow_hyphen_values = true
    )]
    count: Option<String>,
    /// Requests in flight at once (threads)
    #[arg(
        short = 'd',
        long = "depth",
        value_name = "DEPTH",
        allow_hyphen_values = true
    )]
    depth: Option<String>,
    /// Offset of the first request
    #[arg(
        short = 'o',
        long = "offset",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    offset: Option<String>,
    /// Bytes per request
    #[arg(
        short = 's',
        long = "buffer-size",
        value_name = "BUFFER_SIZE",
        allow_hyphen_values = true
    )]
    size: Option<String>,
    /// Distance between the offsets of consecutive requests
    #[arg(
        short = 'S',
        long = "step-size",
        value_name = "STEP_SIZE",
        allow_hyphen_values = true
    )]
    step: Option<String>,
    /// AIO backend: threads, native, io_uring (accepted, ignored)
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    aio: Option<String>,
    /// Native AIO (accepted; needs a direct cache mode, as in QEMU)
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// Write test (default: read)
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// Byte written by write tests
    #[arg(long = "pattern", value_name = "PATTERN", allow_hyphen_values = true)]
    pattern: Option<String>,
    /// Flush after this many requests
    #[arg(
        long = "flush-interval",
        value_name = "FLUSH_INTERVAL",
        allow_hyphen_values = true
    )]
    flush_interval: Option<String>,
    /// Do not wait for requests in flight before flushing
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Open in shared mode (accepted, ignored)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The file name is an option string (driver=qcow2,file.filename=...,l2-cache-size=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Image file
    filenames: Vec<String>,
}

const INT_MAX: i64 = i32::MAX as i64;

/// What the workers share.
struct State {
    /// Requests handed out so far.
    submitted: u64,
    in_flight: u64,
    next_offset: u64,
    /// A draining flush is waiting for requests in flight.
    flushing: bool,
    /// The "requests not yet sent" count of the last flush.
    flushed_at: Option<u64>,
    error: Option<Error>,
}

pub fn run(a: Args) -> CliResult<()> {
    let _ = (a.quiet, a.force_share);
    let count = match &a.count {
        Some(v) => int_opt(v, "request count", 1, INT_MAX)?,
        None => 75000,
    } as u64;
    let depth = match &a.depth {
        Some(v) => int_opt(v, "queue depth", 1, INT_MAX)?,
        None => 64,
    } as u64;
    let offset = match &a.offset {
        Some(v) => size_opt(v, "offset", 0, i64::MAX)?,
        None => 0,
    } as u64;
    let bufsize = match &a.size {
        Some(v) => size_opt(v, "buffer size", 1, INT_MAX)?,
        None => 4096,
    } as u64;
    let step = match &a.step {
        Some(v) => size_opt(v, "step size", 0, INT_MAX)?,
        None => 0,
    } as u64;
    let pattern = match &a.pattern {
        Some(v) => int_opt(v, "pattern byte", 0, 255)?,
        None => 0,
    } as u8;
    let flush_interval = match &a.flush_interval {
        Some(v) => int_opt(v, "flush interval", 0, INT_MAX)?,
        None => 0,
    } as u64;
    let cache = match &a.cache {
        Some(c) => parse_cache_mode(c).ok_or_else(|| "Invalid cache mode".to_string())?,
        None => CacheMode::default(),
    };
    if let Some(aio) = &a.aio {
        if !["threads", "native", "io_uring"].contains(&aio.as_str()) {
            return Err(format!("Invalid aio option: {aio}"));
        }
    }
    if a.filenames.len() != 1 {
        crate::img_util::usage_error("bench", "Expecting one image file name");
    }
    let file = &a.filenames[0];
    if flush_interval > 0 && !a.write {
        return Err("--flush-interval is only available in write tests".into());
    }
    if flush_interval > 0 && flush_interval < depth {
        return Err("Flush interval can't be smaller than depth".into());
    }
    let native = a.native || a.aio.as_deref() == Some("native");
    if native && !cache.direct {
        return Err(format!("Could not open '{file}': aio=native was specified, but it requires cache.direct=on, which was not specified."));
    }
    let opts = OpenOptions {
        writable: a.write,
        writethrough: cache.writethrough,
        direct: cache.direct,
        no_flush: cache.no_flush,
        ..Default::default()
    };
    let img = open_named(file, a.image_opts, a.fmt.as_deref(), &opts)?.img;
    let image_size = img.size();
    let step = if step == 0 { bufsize } else { step };
    println!(
        "Sending {count} {} requests, {bufsize} bytes each, {depth} in parallel (starting at offset {offset}, step size {step})",
        if a.write { "write" } else { "read" }
    );
    if flush_interval > 0 {
        println!("Sending flush every {flush_interval} requests");
    }
    let state = Mutex::new(State {
        submitted: 0,
        in_flight: 0,
        next_offset: offset,
        flushing: false,
        flushed_at: None,
        error: None,
    });
    let cond = Condvar::new();
    let worker = |mut buf: View<'_>| {
        let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let off = {
                let mut st = lock();
                loop {
                    if st.error.is_some() || st.submitted >= count {
                        return;
                    }
                    if st.flushing {
                        st = cond.wait(st).unwrap_or_else(|e| e.into_inner());
                        continue;
                    }
                    break;
                }
                st.submitted += 1;
                st.in_flight += 1;
                let off = st.next_offset;
                // QEMU 10.0's rule: wrap modulo the image size (a wrapped
                // request may then run past the end and fail, as there).
                st.next_offset = if image_size == 0 {
                    0
                } else {
                    (st.next_offset + step) % image_size
                };
                off
            };
            let r = if off.checked_add(bufsize).is_none_or(|e| e > image_size) {
                Err(Error::Io {
                    context: String::new(),
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                })
            } else {
                match &mut buf {
                    View::Write(b) => img.write_at(b, off),
                    View::Read(b) => img.read_at(b, off),
                }
            };
            let mut st = lock();
            st.in_flight -= 1;
            if let Err(e) = r {
                st.error.get_or_insert(e);
                cond.notify_all();
                return;
            }
            let remaining = count - st.submitted;
            if flush_interval > 0
                && remaining.is_multiple_of(flush_interval)
                && st.flushed_at != Some(remaining)
            {
                st.flushed_at = Some(remaining);
                if a.no_drain {
                    drop(st);
                    if let Err(e) = img.flush() {
                        lock().error.get_or_insert(e);
                    }
                } else {
                    st.flushing = true;
                    while st.in_flight > 0 {
                        st = cond.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    drop(st);
                    let r = img.flush();
                    let mut st = lock();
                    if let Err(e) = r {
                        st.error.get_or_insert(e);
                    }
                    st.flushing = false;
                }
            } else {
                drop(st);
            }
            cond.notify_all();
        }
    };
    // The same pages for every request, as qemu-img bench sends them
    // (bench_buf says why that matters).
    let threads = depth.min(count) as usize;
    let mut bufs = BenchBuffers::new(a.write, threads, bufsize as usize, pattern);
    let views = bufs.views();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let worker = &worker;
        for view in views {
            s.spawn(move || worker(view));
        }
    });
    let elapsed = t0.elapsed();
    let st = state.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = st.error {
        drop(img);
        crate::img_util::fail_with(1, &format!("Failed request: {}", strerror(e.errno())));
    }
    println!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
    // Metadata is written back at close (outside the timed run), as QEMU's
    // close does; with cache=unsafe neither syncs.
    img.close().map_err(|e| crate::util::errmsg(&e))?;
    Ok(())
}
