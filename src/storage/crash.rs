//! [`Storage`] that simulates power loss, for crash-consistency tests.
//!
//! [`CrashStorage`] behaves like [`MemStorage`](super::MemStorage) for
//! reads and writes. It also records every request in a trace, in the order
//! the requests were made:
//! - `Write`
//! - `Sync`
//! - `SetLen`
//! - `PunchHole`
//! - `Allocate`
//!
//! From the trace it can build the file a power cut would leave behind.
//!
//! # The crash model
//!
//! A *cut point* `k` (`0..=trace_len()`) means the first `k` events were
//! issued and then the power failed. What survives:
//!
//! - Everything up to and including the last `Sync` before the cut is
//!   durable: it survives completely.
//! - The events after that sync (the *pending* operations: writes, length
//!   changes, hole punches, allocations) survive as an arbitrary subset,
//!   chosen by a [`Keep`]. The surviving ones are applied in trace order. So
//!   when two pending writes overlap and both survive, the later one wins.
//!   When only one survives, its data is what remains.
//! - A surviving write or hole punch may be *torn* (see [`CrashSpec::tear`]).
//!   Then only some of its 512-byte sectors land. A sector is a piece of
//!   the request inside one aligned 512-byte block of the file. So a
//!   request inside one sector is atomic, and a request spanning N sectors
//!   has N independent pieces.
//!
//! Length changes follow the same rules:
//!
//! - A `SetLen` is durable at the next sync. Before that, it survives only
//!   when the subset keeps it.
//! - A surviving write (or piece of one) past the end of the file extends
//!   the file, and the gap reads as zeros.
//! - A surviving `Allocate` extends the file to the end of its range and
//!   changes no content.
//! - `PunchHole` is a write of zeros that never changes the length (like
//!   `FALLOC_FL_KEEP_SIZE`). It is tearable like a write.
//!
//! Reads always see the live state: every completed request.
//!
//! All state sits behind one mutex, so the storage can be shared between
//! threads. The trace is in the order the requests took the lock.

use super::Storage;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// One recorded request (the data of writes is kept internally).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceEvent {
    Write { offset: u64, len: u64 },
    Sync,
    SetLen(u64),
    PunchHole { offset: u64, len: u64 },
    Allocate { offset: u64, len: u64 },
}

#[derive(Clone, Debug)]
enum Event {
    Write { offset: u64, data: Arc<[u8]> },
    Sync,
    SetLen(u64),
    PunchHole { offset: u64, len: u64 },
    Allocate { offset: u64, len: u64 },
}

impl Event {
    fn summary(&self) -> TraceEvent {
        match self {
            Event::Write { offset, data } => TraceEvent::Write {
                offset: *offset,
                len: data.len() as u64,
            },
            Event::Sync => TraceEvent::Sync,
            Event::SetLen(l) => TraceEvent::SetLen(*l),
            Event::PunchHole { offset, len } => TraceEvent::PunchHole {
                offset: *offset,
                len: *len,
            },
            Event::Allocate { offset, len } => TraceEvent::Allocate {
                offset: *offset,
                len: *len,
            },
        }
    }

    /// The 512-byte pieces a torn request can split into: byte ranges
    /// relative to the request's offset.
    fn pieces(&self) -> Vec<(u64, u64)> {
        let (offset, len) = match self {
            Event::Write { offset, data } => (*offset, data.len() as u64),
            Event::PunchHole { offset, len } => (*offset, *len),
            _ => return Vec::new(),
        };
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let next = ((pos / SECTOR) + 1) * SECTOR;
            let e = next.min(end);
            out.push((pos - offset, e - offset));
            pos = e;
        }
        out
    }
}

/// The granularity at which a write can be torn.
pub const SECTOR: u64 = 512;

/// Which pending (unsynced) operations survive a power cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Every pending operation reaches the disk.
    All,
    /// Only what was synced survives.
    None,
    /// Pending operation `i` survives when `mask[i]` is true; indexes past
    /// the end of the mask do not survive.
    Mask(Vec<bool>),
    /// Each pending operation survives with probability 1/2, from a seed.
    Random(u64),
}

impl Keep {
    /// A mask from the low bits of `bits` (operation `i` is bit `i`).
    pub fn bits(bits: u64, n: usize) -> Keep {
        Keep::Mask((0..n).map(|i| i < 64 && (bits >> i) & 1 == 1).collect())
    }
}

/// How a power cut treats the pending operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrashSpec {
    pub keep: Keep,
    /// With a seed, each surviving write or hole punch of more than one
    /// sector is torn with probability 1/2. Then each of its sectors lands
    /// with probability 1/2, independently.
    pub tear: Option<u64>,
}

impl CrashSpec {
    pub fn all() -> CrashSpec {
        CrashSpec {
            keep: Keep::All,
            tear: None,
        }
    }
    pub fn none() -> CrashSpec {
        CrashSpec {
            keep: Keep::None,
            tear: None,
        }
    }
    pub fn random(seed: u64) -> CrashSpec {
        CrashSpec {
            keep: Keep::Random(seed),
            tear: None,
        }
    }
    pub fn torn(seed: u64) -> CrashSpec {
        CrashSpec {
            keep: Keep::Random(seed),
            tear: Some(seed ^ 0x9e37_79b9_7f4a_7c15),
        }
    }
}

/// xorshift64* (the crate has no rand dependency).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn coin(&mut self) -> bool {
        self.next() >> 63 == 1
    }
}

fn write_into(buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[offset as usize..end].copy_from_slice(data);
}

fn zero_into(buf: &mut [u8], offset: u64, len: u64) {
    let start = (offset as usize).min(buf.len());
    let end = ((offset + len) as usize).min(buf.len());
    buf[start..end].fill(0);
}

/// Applies one event to a file image. `pieces`, for a write or a hole
/// punch, restricts it to some of its sectors (see [`Event::pieces`]).
fn apply(buf: &mut Vec<u8>, ev: &Event, pieces: Option<&[(u64, u64)]>) {
    match ev {
        Event::Write { offset, data } => match pieces {
            None => write_into(buf, *offset, data),
            Some(p) => {
                for &(s, e) in p {
                    write_into(buf, offset + s, &data[s as usize..e as usize]);
                }
            }
        },
        Event::PunchHole { offset, len } => match pieces {
            None => zero_into(buf, *offset, *len),
            Some(p) => {
                for &(s, e) in p {
                    zero_into(buf, offset + s, e - s);
                }
            }
        },
        Event::SetLen(l) => buf.resize(*l as usize, 0),
        Event::Allocate { offset, len } => {
            let end = (offset + len) as usize;
            if buf.len() < end {
                buf.resize(end, 0);
            }
        }
        Event::Sync => {}
    }
}

struct Inner {
    /// The durable contents at trace position 0.
    base: Arc<Vec<u8>>,
    trace: Vec<Event>,
    /// Every completed request applied: what reads see.
    live: Vec<u8>,
    /// Everything up to the last sync applied.
    durable: Vec<u8>,
    /// Trace indexes of the operations issued since the last sync.
    pending: Vec<usize>,
}

/// A [`Storage`] that records a trace and builds power-cut images from it
/// (see the module documentation for the crash model).
pub struct CrashStorage {
    inner: Mutex<Inner>,
}

impl Default for CrashStorage {
    fn default() -> Self {
        CrashStorage::from_bytes(Vec::new())
    }
}

impl CrashStorage {
    pub fn new() -> CrashStorage {
        CrashStorage::default()
    }

    /// A storage whose durable contents are `b` and whose trace is empty.
    pub fn from_bytes(b: Vec<u8>) -> CrashStorage {
        CrashStorage {
            inner: Mutex::new(Inner {
                base: Arc::new(b.clone()),
                trace: Vec::new(),
                live: b.clone(),
                durable: b,
                pending: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, ev: Event) {
        let mut g = self.lock();
        let g = &mut *g;
        if let Event::Sync = ev {
            for &i in &g.pending {
                apply(&mut g.durable, &g.trace[i], None);
            }
            g.pending.clear();
        } else {
            apply(&mut g.live, &ev, None);
            g.pending.push(g.trace.len());
        }
        g.trace.push(ev);
    }

    /// Makes the live contents durable (as if synced) and starts a new,
    /// empty trace. Use it to leave set-up work out of a sweep.
    pub fn restart_trace(&self) {
        let mut g = self.lock();
        g.base = Arc::new(g.live.clone());
        g.durable = g.live.clone();
        g.trace.clear();
        g.pending.clear();
    }

    /// The live contents (what reads return).
    pub fn bytes(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// The contents as of the last sync.
    pub fn durable_bytes(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// Number of events recorded.
    pub fn trace_len(&self) -> usize {
        self.lock().trace.len()
    }

    /// Number of operations issued since the last sync.
    pub fn pending_len(&self) -> usize {
        self.lock().pending.len()
    }

    /// The recorded events, without their data.
    pub fn trace(&self) -> Vec<TraceEvent> {
        self.lock().trace.iter().map(Event::summary).collect()
    }

    /// A cursor over a snapshot of the trace that builds crash images
    /// cheaply in order of increasing cut point.
    pub fn replay(&self) -> Replay {
        let g = self.lock();
        Replay::new(g.base.clone(), g.trace.clone())
    }

    /// The file a power cut after the first `cut` events would leave.
    pub fn crash_image(&self, cut: usize, spec: &CrashSpec) -> Vec<u8> {
        let mut r = self.replay();
        r.seek(cut);
        r.image(spec)
    }
}

/// Walks a trace snapshot. It keeps the durable image at the current cut
/// point and the pending operations since the last sync.
pub struct Replay {
    base: Arc<Vec<u8>>,
    trace: Vec<Event>,
    cut: usize,
    durable: Vec<u8>,
    pending: Vec<usize>,
}

impl Replay {
    fn new(base: Arc<Vec<u8>>, trace: Vec<Event>) -> Replay {
        Replay {
            durable: (*base).clone(),
            base,
            trace,
            cut: 0,
            pending: Vec::new(),
        }
    }

    /// Number of events in the trace (the last cut point).
    pub fn len(&self) -> usize {
        self.trace.len()
    }
    pub fn is_empty(&self) -> bool {
        self.trace.is_empty()
    }
    /// The current cut point.
    pub fn cut(&self) -> usize {
        self.cut
    }
    /// The event just before the cut, if any.
    pub fn last_event(&self) -> Option<TraceEvent> {
        self.cut.checked_sub(1).map(|i| self.trace[i].summary())
    }
    /// The event at index `i` of the trace.
    pub fn event(&self, i: usize) -> TraceEvent {
        self.trace[i].summary()
    }
    /// Number of pending (unsynced) operations at the cut point.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
    /// Pending operations that can be torn (more than one sector).
    pub fn tearable(&self) -> usize {
        self.pending
            .iter()
            .filter(|&&i| self.trace[i].pieces().len() > 1)
            .count()
    }
    /// The trace indexes of the pending operations, in order.
    pub fn pending_events(&self) -> &[usize] {
        &self.pending
    }
    /// The contents as of the last sync before the cut point.
    pub fn durable(&self) -> &[u8] {
        &self.durable
    }

    /// Moves the cut point to `cut` (clamped to the trace length). Moving
    /// forward is incremental; moving back restarts from the beginning.
    pub fn seek(&mut self, cut: usize) {
        let cut = cut.min(self.trace.len());
        if cut < self.cut {
            self.durable = (*self.base).clone();
            self.pending.clear();
            self.cut = 0;
        }
        while self.cut < cut {
            let i = self.cut;
            if let Event::Sync = self.trace[i] {
                for &p in &self.pending {
                    apply(&mut self.durable, &self.trace[p], None);
                }
                self.pending.clear();
            } else {
                self.pending.push(i);
            }
            self.cut += 1;
        }
    }

    /// The file a power cut at the current cut point leaves, with `spec`
    /// choosing what survives of the pending operations.
    pub fn image(&self, spec: &CrashSpec) -> Vec<u8> {
        let mut out = self.durable.clone();
        let mut keep_rng = match spec.keep {
            Keep::Random(seed) => Some(Rng::new(seed)),
            _ => None,
        };
        let mut tear_rng = spec.tear.map(Rng::new);
        for (k, &i) in self.pending.iter().enumerate() {
            let keep = match &spec.keep {
                Keep::All => true,
                Keep::None => false,
                Keep::Mask(m) => m.get(k).copied().unwrap_or(false),
                Keep::Random(_) => keep_rng.as_mut().unwrap().coin(),
            };
            if !keep {
                continue;
            }
            let ev = &self.trace[i];
            let pieces = ev.pieces();
            let torn = match tear_rng.as_mut() {
                Some(r) if pieces.len() > 1 => r.coin(),
                _ => false,
            };
            if torn {
                let r = tear_rng.as_mut().unwrap();
                let landed: Vec<(u64, u64)> = pieces.into_iter().filter(|_| r.coin()).collect();
                apply(&mut out, ev, Some(&landed));
            } else {
                apply(&mut out, ev, None);
            }
        }
        out
    }
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self.lock();
        buf.fill(0);
        if offset < g.live.len() as u64 {
            let start = offset as usize;
            let n = buf.len().min(g.live.len() - start);
            buf[..n].copy_from_slice(&g.live[start..start + n]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.record(Event::Write {
            offset,
            data: Arc::from(buf),
        });
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.record(Event::Sync);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().live.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.record(Event::SetLen(len));
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(Event::PunchHole { offset, len });
        Ok(())
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(Event::Allocate { offset, len });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn read(s: &dyn Storage, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        s.read_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn reads_see_every_completed_request() {
        let s = CrashStorage::new();
        s.write_at(&[1; 10], 5).unwrap();
        assert_eq!(s.len().unwrap(), 15);
        assert_eq!(read(&s, 0, 20), [&[0u8; 5][..], &[1; 10], &[0; 5]].concat());
        s.punch_hole(6, 2).unwrap();
        assert_eq!(read(&s, 5, 4), [1, 0, 0, 1]);
        s.set_len(8).unwrap();
        assert_eq!(s.len().unwrap(), 8);
        s.allocate(0, 100).unwrap();
        assert_eq!(s.len().unwrap(), 100);
        assert_eq!(read(&s, 5, 4), [1, 0, 0, 0]);
        assert_eq!(
            s.trace(),
            vec![
                TraceEvent::Write { offset: 5, len: 10 },
                TraceEvent::PunchHole { offset: 6, len: 2 },
                TraceEvent::SetLen(8),
                TraceEvent::Allocate {
                    offset: 0,
                    len: 100
                },
            ]
        );
    }

    #[test]
    fn unsynced_writes_survive_all_or_none() {
        let s = CrashStorage::from_bytes(vec![9; 1024]);
        s.write_at(&[1; 512], 0).unwrap();
        s.sync().unwrap();
        s.write_at(&[2; 512], 512).unwrap();
        s.write_at(&[3; 100], 2048).unwrap();
        assert_eq!(s.pending_len(), 2);
        let n = s.trace_len();
        let all = s.crash_image(n, &CrashSpec::all());
        assert_eq!(all, s.bytes());
        let none = s.crash_image(n, &CrashSpec::none());
        assert_eq!(none, [vec![1; 512], vec![9; 512]].concat());
        assert_eq!(none, s.durable_bytes());
        // Cut before the sync: the first write is pending too.
        let early = s.crash_image(1, &CrashSpec::none());
        assert_eq!(early, vec![9; 1024]);
        assert_eq!(s.crash_image(0, &CrashSpec::all()), vec![9; 1024]);
        // A subset: only the extending write.
        let sub = s.crash_image(
            n,
            &CrashSpec {
                keep: Keep::bits(0b10, 2),
                tear: None,
            },
        );
        assert_eq!(sub.len(), 2148);
        assert_eq!(&sub[512..1024], &[9; 512][..]);
        assert_eq!(&sub[1024..2048], &[0; 1024][..]);
        assert_eq!(&sub[2048..], &[3; 100][..]);
    }

    #[test]
    fn later_overlapping_write_wins_only_if_it_survives() {
        let s = CrashStorage::from_bytes(vec![0; 512]);
        s.write_at(&[1; 512], 0).unwrap();
        s.write_at(&[2; 512], 0).unwrap();
        let img = |bits| {
            s.crash_image(
                2,
                &CrashSpec {
                    keep: Keep::bits(bits, 2),
                    tear: None,
                },
            )
        };
        assert_eq!(img(0b00), vec![0; 512]);
        assert_eq!(img(0b01), vec![1; 512]);
        assert_eq!(img(0b10), vec![2; 512]);
        assert_eq!(img(0b11), vec![2; 512]);
    }

    #[test]
    fn all_at_every_cut_matches_a_plain_replay() {
        let s = CrashStorage::new();
        let m = MemStorage::new();
        let mut states = vec![m.bytes()];
        let mut x = 1u64;
        for i in 0..200u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 20) % 9000;
            let len = 1 + (x >> 40) % 1500;
            match i % 7 {
                0 => {
                    s.sync().unwrap();
                    m.sync().unwrap();
                }
                1 => {
                    s.punch_hole(off, len).unwrap();
                    m.punch_hole(off, len).unwrap();
                }
                2 if i % 3 == 0 => {
                    s.set_len(off).unwrap();
                    m.set_len(off).unwrap();
                }
                _ => {
                    let d = vec![(i % 250) as u8 + 1; len as usize];
                    s.write_at(&d, off).unwrap();
                    m.write_at(&d, off).unwrap();
                }
            }
            states.push(m.bytes());
        }
        assert_eq!(s.bytes(), m.bytes());
        let mut r = s.replay();
        for (cut, want) in states.iter().enumerate() {
            r.seek(cut);
            assert_eq!(&r.image(&CrashSpec::all()), want, "cut {cut}");
        }
        // Seeking backwards restarts.
        r.seek(3);
        assert_eq!(r.image(&CrashSpec::all()), states[3]);
        assert_eq!(s.crash_image(50, &CrashSpec::all()), states[50]);
    }

    #[test]
    fn set_len_is_durable_at_the_next_sync() {
        let s = CrashStorage::from_bytes(vec![7; 4096]);
        s.set_len(1024).unwrap();
        assert_eq!(s.crash_image(1, &CrashSpec::none()).len(), 4096);
        assert_eq!(s.crash_image(1, &CrashSpec::all()).len(), 1024);
        s.sync().unwrap();
        assert_eq!(s.crash_image(2, &CrashSpec::none()).len(), 1024);
        s.allocate(0, 8192).unwrap();
        assert_eq!(s.crash_image(3, &CrashSpec::none()).len(), 1024);
        let a = s.crash_image(3, &CrashSpec::all());
        assert_eq!(a.len(), 8192);
        assert_eq!(&a[..1024], &[7; 1024][..]);
        assert_eq!(&a[1024..], &vec![0; 7168][..]);
    }

    #[test]
    fn punch_hole_is_a_write_of_zeros_that_keeps_the_size() {
        let s = CrashStorage::from_bytes(vec![5; 2048]);
        s.punch_hole(1024, 4096).unwrap();
        let all = s.crash_image(1, &CrashSpec::all());
        assert_eq!(all.len(), 2048);
        assert_eq!(&all[..1024], &[5; 1024][..]);
        assert_eq!(&all[1024..], &[0; 1024][..]);
        assert_eq!(s.crash_image(1, &CrashSpec::none()), vec![5; 2048]);
    }

    #[test]
    fn torn_writes_land_whole_sectors() {
        let s = CrashStorage::from_bytes(vec![0; 8192]);
        // Unaligned: pieces are [100,512), then 5 whole sectors, then a tail.
        s.write_at(&vec![0xab; 3000], 100).unwrap();
        let mut r = s.replay();
        r.seek(1);
        assert_eq!(r.pending(), 1);
        assert_eq!(r.tearable(), 1);
        let (mut mixed, mut whole, mut nothing) = (0, 0, 0);
        for seed in 0..200 {
            let img = r.image(&CrashSpec {
                keep: Keep::All,
                tear: Some(seed),
            });
            assert_eq!(img.len(), 8192);
            assert!(img[..100].iter().all(|&b| b == 0));
            assert!(img[3100..].iter().all(|&b| b == 0));
            let mut landed = Vec::new();
            for sector in 0..7u64 {
                let s0 = (sector * 512).max(100) as usize;
                let s1 = ((sector + 1) * 512).min(3100) as usize;
                let v = &img[s0..s1];
                assert!(
                    v.iter().all(|&b| b == 0xab) || v.iter().all(|&b| b == 0),
                    "sector {sector} partly written (seed {seed})"
                );
                landed.push(v[0] == 0xab);
            }
            match landed.iter().filter(|&&l| l).count() {
                7 => whole += 1,
                0 => nothing += 1,
                _ => mixed += 1,
            }
        }
        assert!(mixed > 50 && whole > 50, "{mixed} {whole} {nothing}");
        // A write inside one sector never tears.
        let s = CrashStorage::from_bytes(vec![0; 1024]);
        s.write_at(&[1; 8], 600).unwrap();
        for seed in 0..50 {
            let img = s.crash_image(
                1,
                &CrashSpec {
                    keep: Keep::All,
                    tear: Some(seed),
                },
            );
            assert_eq!(&img[600..608], &[1; 8]);
        }
    }

    #[test]
    fn random_subsets_are_deterministic_and_varied() {
        let s = CrashStorage::from_bytes(vec![0; 16 * 512]);
        for i in 0..16u64 {
            s.write_at(&[i as u8 + 1; 512], i * 512).unwrap();
        }
        let a = s.crash_image(16, &CrashSpec::random(42));
        assert_eq!(a, s.crash_image(16, &CrashSpec::random(42)));
        let survivors = |img: &[u8]| img.chunks(512).filter(|c| c[0] != 0).count();
        let n = survivors(&a);
        assert!(n > 0 && n < 16, "{n}");
        let distinct: std::collections::HashSet<Vec<u8>> = (0..20)
            .map(|seed| s.crash_image(16, &CrashSpec::random(seed)))
            .collect();
        assert!(distinct.len() > 15);
        // Torn images come from the same subsets.
        let t = s.crash_image(16, &CrashSpec::torn(7));
        assert!(survivors(&t) < 16);
    }

    #[test]
    fn restart_trace_makes_everything_durable() {
        let s = CrashStorage::new();
        s.write_at(&[1; 100], 0).unwrap();
        s.restart_trace();
        assert_eq!(s.trace_len(), 0);
        assert_eq!(s.crash_image(0, &CrashSpec::none()), vec![1; 100]);
        s.write_at(&[2; 10], 0).unwrap();
        assert_eq!(&s.crash_image(1, &CrashSpec::none())[..10], &[1; 10]);
    }

    #[test]
    fn shared_between_threads() {
        let s = Arc::new(CrashStorage::new());
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..100u64 {
                        s.write_at(&[t as u8 + 1; 64], (t * 100 + i) * 64).unwrap();
                        if i % 10 == 0 {
                            s.sync().unwrap();
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(s.trace_len(), 440);
        s.sync().unwrap();
        let img = s.crash_image(s.trace_len(), &CrashSpec::none());
        assert_eq!(img, s.bytes());
        for t in 0..4u64 {
            let off = (t * 100 * 64) as usize;
            assert!(img[off..off + 6400].iter().all(|&b| b == t as u8 + 1));
        }
    }
}
