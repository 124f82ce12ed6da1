//! Asynchronous requests that really run concurrently, and qemu-io's
//! blkdebug breakpoint commands (`break`, `wait_break`, `resume`,
//! `remove_break`).
//!
//! Normally `aio_read` / `aio_write` run when submitted and their reports
//! wait for qemu-io's next event-loop turn (see `Session::pending`). While
//! a blkdebug breakpoint is set, or a request is stopped at one (or
//! threaded requests are still running), each runs on its own thread
//! instead, so that `break write_aio A`, `aio_write …`, `wait_break A`,
//! more requests that queue up behind A, and `resume A` interleave as they
//! do in QEMU (iotest 046). After starting (or resuming) a request the
//! session waits until it finished or stopped at a breakpoint, so that
//! blkdebug's lines come out where QEMU prints them; with no breakpoint
//! left to stop at, nothing more can be printed before the next wait, and
//! the session goes on at once.

use super::io_fmt::err;
use super::io_open::{strerror, Dev};
use super::Session;
use oxqcow::storage::Blkdebug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a request may make no visible progress before the session
/// assumes it waits behind a stopped one.
const STALL: Duration = Duration::from_millis(200);

/// An asynchronous request's work: returns its report.
pub type Job = Box<dyn FnOnce(&Dev) -> String + Send>;

struct Worker {
    handle: JoinHandle<()>,
    finished: Arc<AtomicBool>,
}

/// The threaded requests of a session.
#[derive(Default)]
pub struct Workers {
    list: Vec<Worker>,
    /// Reports of threaded requests, in the order they finished.
    done: Arc<Mutex<Vec<String>>>,
}

impl Workers {
    fn unfinished(&self) -> usize {
        self.list
            .iter()
            .filter(|w| !w.finished.load(Ordering::Acquire))
            .count()
    }

    /// Joins the threads that are done.
    fn reap(&mut self) {
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.list)
            .into_iter()
            .partition(|w| w.finished.load(Ordering::Acquire));
        for w in done {
            let _ = w.handle.join();
        }
        self.list = running;
    }
}

fn sleep() {
    std::thread::sleep(Duration::from_millis(1));
}

impl Session {
    fn debug_node(&self) -> Option<Arc<Blkdebug>> {
        self.dev.as_ref().and_then(|d| d.debug.clone())
    }

    /// Puts what blkdebug printed on stdout.
    pub fn print_debug_msgs(&mut self) {
        let Some(d) = &self.dev else { return };
        let lines = std::mem::take(&mut *d.msgs.lock().unwrap_or_else(|e| e.into_inner()));
        for l in lines {
            self.out.line(&l);
        }
    }

    /// Runs an asynchronous request (see the module comment).
    pub fn submit(&mut self, job: Job) {
        let dev = self.dev.clone().expect("aio needs an open device");
        let dbg = dev.debug.clone();
        let threaded = self.workers.unfinished() > 0
            || dbg
                .as_ref()
                .is_some_and(|d| d.has_breakpoints() || d.suspended_count() > 0);
        if !threaded {
            let report = job(&dev);
            self.pending.push(report);
            return;
        }
        let stopped = dbg.as_ref().map_or(0, |d| d.suspended_count());
        let finished = Arc::new(AtomicBool::new(false));
        let (fin, done) = (finished.clone(), self.workers.done.clone());
        let handle = std::thread::spawn(move || {
            let report = job(&dev);
            done.lock().unwrap_or_else(|e| e.into_inner()).push(report);
            fin.store(true, Ordering::Release);
        });
        self.workers.list.push(Worker { handle, finished });
        self.settle(stopped);
    }

    /// Waits while a threaded request could still print something before
    /// the next command: until every request finished, one more stopped at
    /// a breakpoint, or they stalled (waiting behind a stopped request).
    fn settle(&mut self, stopped: usize) {
        let Some(dbg) = self.debug_node() else {
            return;
        };
        let mut left = self.workers.unfinished();
        let mut since = Instant::now();
        while left > 0 && dbg.has_breakpoints() && dbg.suspended_count() <= stopped {
            sleep();
            let now = self.workers.unfinished();
            if now < left {
                (left, since) = (now, Instant::now());
            } else if since.elapsed() > STALL {
                break;
            }
        }
        self.workers.reap();
    }

    /// Waits for the threaded requests (those not held up by a request
    /// stopped at a breakpoint) and takes their reports.
    pub fn wait_workers(&mut self) {
        let stopped = || self.debug_node().is_some_and(|d| d.suspended_count() > 0);
        let mut left = self.workers.unfinished();
        let mut since = Instant::now();
        while left > 0 {
            sleep();
            let now = self.workers.unfinished();
            if now < left {
                (left, since) = (now, Instant::now());
            } else if stopped() && since.elapsed() > STALL {
                break;
            }
        }
        self.workers.reap();
        let done =
            std::mem::take(&mut *self.workers.done.lock().unwrap_or_else(|e| e.into_inner()));
        self.pending.extend(done);
    }

    /// Before closing: lets every stopped request go on and waits for all.
    pub fn finish_workers(&mut self) {
        if let Some(d) = self.debug_node() {
            d.resume_all();
        }
        for w in std::mem::take(&mut self.workers.list) {
            let _ = w.handle.join();
        }
        let done =
            std::mem::take(&mut *self.workers.done.lock().unwrap_or_else(|e| e.into_inner()));
        self.pending.extend(done);
    }
}

/// `break EVENT TAG`.
pub fn break_f(s: &mut Session, w: &[String]) -> i32 {
    let r = match s.debug_node() {
        None => Err(libc::ENOTSUP),
        Some(d) => d.set_breakpoint(&w[1], &w[2]),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            s.out
                .line(&format!("Could not set breakpoint: {}", strerror(e)));
            -e
        }
    }
}

/// `remove_break TAG`.
pub fn remove_break_f(s: &mut Session, w: &[String]) -> i32 {
    let r = match s.debug_node() {
        None => Err(libc::ENOTSUP),
        Some(d) => d.remove_breakpoint(&w[1]),
    };
    match r {
        Ok(()) => {
            s.print_debug_msgs();
            s.settle(0);
            0
        }
        Err(e) => {
            s.out.line(&format!(
                "Could not remove breakpoint {}: {}",
                w[1],
                strerror(e)
            ));
            -e
        }
    }
}

/// `resume TAG`.
pub fn resume_f(s: &mut Session, w: &[String]) -> i32 {
    let r = match s.debug_node() {
        None => Err(libc::ENOTSUP),
        Some(d) => d.resume(&w[1]).map(|_| d.suspended_count()),
    };
    match r {
        Ok(stopped) => {
            s.print_debug_msgs();
            s.settle(stopped);
            0
        }
        Err(e) => {
            s.out
                .line(&format!("Could not resume request: {}", strerror(e)));
            -e
        }
    }
}

/// `wait_break TAG`: waits until a request stops at the breakpoint TAG.
/// qemu-io would wait forever when none can; here that is an error once
/// no request is left running.
pub fn wait_break_f(s: &mut Session, w: &[String]) -> i32 {
    let Some(d) = s.debug_node() else {
        s.error(&format!(
            "wait_break: no blkdebug node: request '{}' cannot stop",
            w[1]
        ));
        return -libc::ENOTSUP;
    };
    while !d.is_suspended(&w[1]) {
        s.workers.reap();
        if s.workers.unfinished() == 0 {
            err(&format!(
                "{}: wait_break: no request is stopped or running to stop at '{}'",
                s.prg, w[1]
            ));
            return -libc::ENOENT;
        }
        sleep();
    }
    // qemu-io runs its event loop here: what the requests printed shows.
    s.print_debug_msgs();
    0
}
