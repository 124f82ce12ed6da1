//! blkdebug: QEMU's rule-based error injection, as a storage wrapper.
//!
//! A [`Blkdebug`] holds rules that fire on [`DebugEvent`]s: `inject-error`
//! arms an error (errno, optionally only for one 512-byte sector or one
//! kind of request, optionally only once) that the next matching request
//! through the node fails with; `set-state` moves the node to another
//! state, and every rule may be limited to one state; a breakpoint
//! (qemu-io's `break EVENT TAG`) stops the thread that raised the event
//! until `resume TAG`. The semantics are QEMU's: the node starts in state
//! 1; the rules of one event are looked at in reverse order of definition
//! and all see the state as it was before the event; an event that arms
//! errors disarms the ones armed before; an armed error stays armed (and
//! fails every request it matches) until it fires with `once`, or another
//! event arms others.
//!
//! [`BlkdebugStorage`] puts a `Blkdebug` in front of a [`Storage`]: the
//! engine's reads, writes, discards and syncs are checked against the
//! armed errors, and the events the engine announces reach the rules.
//! Like QEMU's block layer it raises `pwritev` / `pwritev_done` around
//! each write, and skips a sync (and its error) when nothing was written
//! since the last one.

use super::event::DebugEvent;
use super::Storage;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The kinds of request an injected error can be limited to (`iotype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

impl IoType {
    pub fn from_name(s: &str) -> Option<IoType> {
        Some(match s {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            _ => return None,
        })
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// What an `inject-error` rule without `iotype` applies to.
    pub fn default_mask() -> u8 {
        IoType::Read.bit()
            | IoType::Write.bit()
            | IoType::WriteZeroes.bit()
            | IoType::Discard.bit()
            | IoType::Flush.bit()
    }

    pub fn mask(self) -> u8 {
        self.bit()
    }
}

/// What a rule does when its event fires in its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Arm an error for the next requests that match.
    InjectError {
        errno: i32,
        /// Disarm (and delete the rule) once it has failed a request.
        once: bool,
        /// Only requests covering this byte (`sector` × 512).
        offset: Option<u64>,
        /// Bit set of [`IoType::mask`].
        iotypes: u8,
    },
    SetState(i64),
    /// A breakpoint: stop the request until `resume` with this tag.
    Suspend(String),
}

/// One blkdebug rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub event: DebugEvent,
    /// 0: in every state.
    pub state: i64,
    pub action: Action,
}

struct Entry {
    id: u64,
    rule: Rule,
}

struct State {
    state: i64,
    /// Newest first (QEMU inserts at the head of each event's list).
    rules: Vec<Entry>,
    /// Ids of the armed errors, the most recently armed first.
    armed: Vec<u64>,
    /// Stopped requests (id, tag), the most recently stopped first.
    suspended: Vec<(u64, String)>,
    next_id: u64,
    /// Writes seen / writes covered by the last successful sync.
    write_gen: u64,
    flushed_gen: u64,
}

type Printer = Box<dyn Fn(&str) + Send + Sync>;

/// The rules and state of one blkdebug node. Shared between threads.
pub struct Blkdebug {
    st: Mutex<State>,
    cond: Condvar,
    printer: Mutex<Option<Printer>>,
}

impl Default for Blkdebug {
    fn default() -> Blkdebug {
        Blkdebug::new(Vec::new())
    }
}

impl Blkdebug {
    /// A node with these rules, in the order QEMU adds them (every
    /// `inject-error`, then every `set-state`). Raises `none`, as opening
    /// a blkdebug node does.
    pub fn new(rules: Vec<Rule>) -> Blkdebug {
        let d = Blkdebug {
            st: Mutex::new(State {
                state: 1,
                rules: Vec::new(),
                armed: Vec::new(),
                suspended: Vec::new(),
                next_id: 0,
                write_gen: 0,
                flushed_gen: 0,
            }),
            cond: Condvar::new(),
            printer: Mutex::new(None),
        };
        {
            let mut st = d.lock();
            for r in rules {
                add(&mut st, r);
            }
        }
        d.event(DebugEvent::NodeOpen);
        d
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the `blkdebug: Suspended request 'TAG'` lines go (QEMU prints
    /// them on stdout); by default, stdout.
    pub fn set_printer(&self, p: Option<Printer>) {
        *self.printer.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    fn print(&self, line: &str) {
        match &*self.printer.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(p) => p(line),
            None => println!("{line}"),
        }
    }

    /// The current state (1 after opening).
    pub fn state(&self) -> i64 {
        self.lock().state
    }

    /// Runs the rules of `ev`. Returns once every breakpoint it hit has
    /// been resumed.
    pub fn event(&self, ev: DebugEvent) {
        let mut st = self.lock();
        let cur = st.state;
        let mut new_state = cur;
        let mut armed_now = 0;
        let mut stops = Vec::new();
        let ids: Vec<u64> = st
            .rules
            .iter()
            .filter(|e| e.rule.event == ev && (e.rule.state == 0 || e.rule.state == cur))
            .map(|e| e.id)
            .collect();
        for id in ids {
            let Some(i) = st.rules.iter().position(|e| e.id == id) else {
                continue;
            };
            match st.rules[i].rule.action.clone() {
                Action::InjectError { .. } => {
                    armed_now += 1;
                    if armed_now == 1 {
                        st.armed.clear();
                    }
                    st.armed.insert(0, id);
                }
                Action::SetState(n) => new_state = n,
                Action::Suspend(tag) => {
                    st.rules.remove(i);
                    let req = st.next_id;
                    st.next_id += 1;
                    st.suspended.insert(0, (req, tag.clone()));
                    self.print(&format!("blkdebug: Suspended request '{tag}'"));
                    stops.push(req);
                }
            }
        }
        st.state = new_state;
        if !stops.is_empty() {
            self.cond.notify_all();
        }
        for req in stops {
            while st.suspended.iter().any(|(r, _)| *r == req) {
                st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// Checks a request against the armed errors: the first armed error
    /// that covers it fails it.
    pub fn check(&self, offset: u64, len: u64, io: IoType) -> io::Result<()> {
        let mut st = self.lock();
        let hit = st.armed.iter().copied().find_map(|id| {
            let e = st.rules.iter().find(|e| e.id == id)?;
            match e.rule.action {
                Action::InjectError {
                    errno,
                    once,
                    offset: at,
                    iotypes,
                } => {
                    let covered = at.is_none_or(|a| len > 0 && a >= offset && a - offset < len);
                    (covered && iotypes & io.mask() != 0).then_some((id, errno, once))
                }
                _ => None,
            }
        });
        let Some((id, errno, once)) = hit else {
            return Ok(());
        };
        if errno == 0 {
            return Ok(());
        }
        if once {
            st.armed.retain(|&a| a != id);
            st.rules.retain(|e| e.id != id);
        }
        Err(io::Error::from_raw_os_error(errno))
    }

    /// qemu-io's `break EVENT TAG`. ENOENT for an unknown event name.
    pub fn set_breakpoint(&self, event: &str, tag: &str) -> Result<(), i32> {
        let ev = DebugEvent::from_name(event).ok_or(libc::ENOENT)?;
        let mut st = self.lock();
        add(
            &mut st,
            Rule {
                event: ev,
                state: 0,
                action: Action::Suspend(tag.to_string()),
            },
        );
        Ok(())
    }

    /// qemu-io's `remove_break TAG`: deletes the breakpoints with this tag
    /// and resumes the requests stopped at them. ENOENT if there was none.
    pub fn remove_breakpoint(&self, tag: &str) -> Result<(), i32> {
        let mut st = self.lock();
        let before = st.rules.len();
        st.rules
            .retain(|e| !matches!(&e.rule.action, Action::Suspend(t) if t == tag));
        let mut found = st.rules.len() != before;
        while let Some(i) = st.suspended.iter().position(|(_, t)| t == tag) {
            st.suspended.remove(i);
            self.print(&format!("blkdebug: Resuming request '{tag}'"));
            found = true;
        }
        self.cond.notify_all();
        if found {
            Ok(())
        } else {
            Err(libc::ENOENT)
        }
    }

    /// qemu-io's `resume TAG`: lets the most recently stopped request with
    /// this tag go on. ENOENT if none is stopped.
    pub fn resume(&self, tag: &str) -> Result<(), i32> {
        let mut st = self.lock();
        let i = st
            .suspended
            .iter()
            .position(|(_, t)| t == tag)
            .ok_or(libc::ENOENT)?;
        st.suspended.remove(i);
        self.print(&format!("blkdebug: Resuming request '{tag}'"));
        self.cond.notify_all();
        Ok(())
    }

    /// Resumes every stopped request (closing the node).
    pub fn resume_all(&self) {
        let mut st = self.lock();
        st.suspended.clear();
        st.rules
            .retain(|e| !matches!(e.rule.action, Action::Suspend(_)));
        self.cond.notify_all();
    }

    pub fn is_suspended(&self, tag: &str) -> bool {
        self.lock().suspended.iter().any(|(_, t)| t == tag)
    }

    /// How many requests are stopped at breakpoints.
    pub fn suspended_count(&self) -> usize {
        self.lock().suspended.len()
    }

    pub fn has_breakpoints(&self) -> bool {
        self.lock()
            .rules
            .iter()
            .any(|e| matches!(e.rule.action, Action::Suspend(_)))
    }

    /// Counts a write (or discard, truncate) through the node.
    pub fn note_write(&self) {
        self.lock().write_gen += 1;
    }

    /// Checks a flush of the node: Ok(None) when nothing was written since
    /// the last successful one (QEMU skips it), Ok(Some(gen)) when it must
    /// go on (report success with [`Blkdebug::flushed`]).
    pub fn check_flush(&self) -> io::Result<Option<u64>> {
        let gen = {
            let st = self.lock();
            if st.write_gen == st.flushed_gen {
                return Ok(None);
            }
            st.write_gen
        };
        self.check(0, 0, IoType::Flush)?;
        Ok(Some(gen))
    }

    pub fn flushed(&self, gen: u64) {
        let mut st = self.lock();
        st.flushed_gen = st.flushed_gen.max(gen);
    }
}

fn add(st: &mut State, rule: Rule) {
    let id = st.next_id;
    st.next_id += 1;
    st.rules.insert(0, Entry { id, rule });
}

/// A [`Storage`] behind a blkdebug node.
pub struct BlkdebugStorage {
    inner: Arc<dyn Storage>,
    dbg: Arc<Blkdebug>,
}

impl BlkdebugStorage {
    pub fn new(inner: Arc<dyn Storage>, dbg: Arc<Blkdebug>) -> BlkdebugStorage {
        BlkdebugStorage { inner, dbg }
    }

    pub fn blkdebug(&self) -> &Arc<Blkdebug> {
        &self.dbg
    }
}

impl Storage for BlkdebugStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.dbg.check(offset, buf.len() as u64, IoType::Read)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.dbg.event(DebugEvent::Pwritev);
        let r = self
            .dbg
            .check(offset, buf.len() as u64, IoType::Write)
            .and_then(|_| self.inner.write_at(buf, offset));
        self.dbg.note_write();
        self.dbg.event(DebugEvent::PwritevDone);
        r
    }

    fn sync(&self) -> io::Result<()> {
        if let Some(gen) = self.dbg.check_flush()? {
            self.inner.sync()?;
            self.dbg.flushed(gen);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // blkdebug has no truncate of its own: the block layer passes it on.
        self.dbg.note_write();
        self.inner.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.dbg.check(offset, len, IoType::Discard)?;
        self.dbg.note_write();
        self.inner.punch_hole(offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.dbg.note_write();
        self.inner.allocate(offset, len)
    }

    fn allocated_size(&self) -> io::Result<u64> {
        self.inner.allocated_size()
    }

    fn debug_event(&self, ev: DebugEvent) {
        self.dbg.event(ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn inject(event: DebugEvent, errno: i32, once: bool) -> Rule {
        Rule {
            event,
            state: 0,
            action: Action::InjectError {
                errno,
                once,
                offset: None,
                iotypes: IoType::default_mask(),
            },
        }
    }

    fn errno(r: io::Result<()>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[test]
    fn an_error_arms_on_its_event_and_stays_armed() {
        let d = Blkdebug::new(vec![inject(DebugEvent::L2Load, libc::EIO, false)]);
        assert!(d.check(0, 512, IoType::Read).is_ok());
        d.event(DebugEvent::L2Update);
        assert!(d.check(0, 512, IoType::Read).is_ok());
        d.event(DebugEvent::L2Load);
        assert_eq!(errno(d.check(0, 512, IoType::Read)), Some(libc::EIO));
        assert_eq!(errno(d.check(4096, 512, IoType::Write)), Some(libc::EIO));
        // Flushes too (default iotypes), but not block status.
        assert_eq!(errno(d.check(0, 0, IoType::Flush)), Some(libc::EIO));
        assert!(d.check(0, 512, IoType::BlockStatus).is_ok());
    }

    #[test]
    fn once_fails_one_request_and_deletes_the_rule() {
        let d = Blkdebug::new(vec![inject(DebugEvent::WriteAio, libc::ENOSPC, true)]);
        d.event(DebugEvent::WriteAio);
        assert_eq!(errno(d.check(0, 512, IoType::Write)), Some(libc::ENOSPC));
        assert!(d.check(0, 512, IoType::Write).is_ok());
        d.event(DebugEvent::WriteAio);
        assert!(d.check(0, 512, IoType::Write).is_ok());
    }

    #[test]
    fn sector_and_iotype_filters() {
        let mut r = inject(DebugEvent::CorWrite, libc::EIO, false);
        if let Action::InjectError {
            offset, iotypes, ..
        } = &mut r.action
        {
            *offset = Some(2048 * 512);
            *iotypes = IoType::Write.mask();
        }
        let d = Blkdebug::new(vec![r]);
        d.event(DebugEvent::CorWrite);
        // The request must cover the sector's first byte.
        assert!(d.check(2048 * 512 + 65536, 65536, IoType::Write).is_ok());
        assert!(d.check(2048 * 512 - 512, 512, IoType::Write).is_ok());
        assert!(d.check(2048 * 512, 0, IoType::Write).is_ok());
        assert!(d.check(2048 * 512, 512, IoType::Read).is_ok());
        assert_eq!(
            errno(d.check(2048 * 512 - 512, 1024, IoType::Write)),
            Some(libc::EIO)
        );
    }

    #[test]
    fn set_state_changes_state_after_the_event_and_gates_rules() {
        // 066: the first write_aio moves to state 2; the error is armed
        // only by a write_aio that happens in state 2.
        let rules = vec![
            Rule {
                state: 2,
                ..inject(DebugEvent::WriteAio, libc::EIO, false)
            },
            Rule {
                event: DebugEvent::WriteAio,
                state: 0,
                action: Action::SetState(2),
            },
        ];
        let d = Blkdebug::new(rules);
        assert_eq!(d.state(), 1);
        d.event(DebugEvent::WriteAio);
        assert_eq!(d.state(), 2);
        assert!(d.check(0, 512, IoType::Write).is_ok());
        d.event(DebugEvent::WriteAio);
        assert_eq!(errno(d.check(0, 512, IoType::Write)), Some(libc::EIO));
    }

    #[test]
    fn rules_of_an_event_see_the_old_state() {
        let rules = vec![
            Rule {
                event: DebugEvent::L1Update,
                state: 1,
                action: Action::SetState(2),
            },
            Rule {
                event: DebugEvent::L1Update,
                state: 2,
                action: Action::SetState(3),
            },
        ];
        let d = Blkdebug::new(rules);
        d.event(DebugEvent::L1Update);
        assert_eq!(d.state(), 2);
        d.event(DebugEvent::L1Update);
        assert_eq!(d.state(), 3);
    }

    #[test]
    fn a_new_arming_disarms_the_old_errors() {
        let rules = vec![
            inject(DebugEvent::L2Load, libc::EIO, false),
            inject(DebugEvent::L1Update, libc::ENOSPC, false),
        ];
        let d = Blkdebug::new(rules);
        d.event(DebugEvent::L2Load);
        d.event(DebugEvent::L1Update);
        assert_eq!(errno(d.check(0, 1, IoType::Read)), Some(libc::ENOSPC));
    }

    #[test]
    fn the_none_event_fires_at_open() {
        let d = Blkdebug::new(vec![inject(DebugEvent::NodeOpen, libc::EIO, true)]);
        assert_eq!(errno(d.check(0, 512, IoType::Read)), Some(libc::EIO));
        assert!(d.check(0, 512, IoType::Read).is_ok());
    }

    #[test]
    fn breakpoints_stop_the_raising_thread_until_resumed() {
        let d = Arc::new(Blkdebug::default());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        d.set_printer(Some(Box::new(move |s| {
            l2.lock().unwrap().push(s.to_string())
        })));
        assert_eq!(d.set_breakpoint("bogus", "A"), Err(libc::ENOENT));
        d.set_breakpoint("write_aio", "A").unwrap();
        assert!(d.has_breakpoints());
        let d2 = d.clone();
        let t = std::thread::spawn(move || d2.event(DebugEvent::WriteAio));
        while !d.is_suspended("A") {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!d.has_breakpoints(), "a breakpoint fires once");
        assert_eq!(d.resume("B"), Err(libc::ENOENT));
        d.resume("A").unwrap();
        t.join().unwrap();
        assert_eq!(d.suspended_count(), 0);
        assert_eq!(
            *lines.lock().unwrap(),
            [
                "blkdebug: Suspended request 'A'",
                "blkdebug: Resuming request 'A'"
            ]
        );
        assert_eq!(d.remove_breakpoint("A"), Err(libc::ENOENT));
        d.set_breakpoint("l2_load", "A").unwrap();
        d.remove_breakpoint("A").unwrap();
        d.event(DebugEvent::L2Load); // no longer stops
    }

    #[test]
    fn storage_checks_requests_and_skips_idle_syncs() {
        let d = Arc::new(Blkdebug::new(vec![inject(
            DebugEvent::Pwritev,
            libc::EIO,
            true,
        )]));
        let s = BlkdebugStorage::new(Arc::new(MemStorage::new()), d.clone());
        // Nothing written yet: a sync is skipped.
        s.sync().unwrap();
        // pwritev arms the error before the write is checked: it fails.
        assert_eq!(errno(s.write_at(b"abc", 0)), Some(libc::EIO));
        s.write_at(b"abc", 0).unwrap();
        let mut b = [0u8; 3];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"abc");
        s.sync().unwrap();
        // An error armed for flushes hits only a sync with writes to cover.
        let f = Rule {
            action: Action::InjectError {
                errno: libc::EIO,
                once: false,
                offset: None,
                iotypes: IoType::Flush.mask(),
            },
            ..inject(DebugEvent::L1Update, 0, false)
        };
        let d = Arc::new(Blkdebug::new(vec![f]));
        let s = BlkdebugStorage::new(Arc::new(MemStorage::new()), d);
        s.debug_event(DebugEvent::L1Update);
        s.sync().unwrap();
        s.write_at(b"x", 0).unwrap();
        assert_eq!(errno(s.sync()), Some(libc::EIO));
    }
}
