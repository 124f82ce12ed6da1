//! Crash-point sweep of the engine's management operations: internal
//! snapshots (create, apply, delete and the copy-on-write after it), amend
//! (refcount width, compat down- and upgrade, lazy refcounts), resize
//! (grow with L1 growth, shrink), check with repair, `make_empty`,
//! compressed writes, the backing file change and bitmaps stored at close.
//!
//! Each case builds an image (closed cleanly, outside the trace), then
//! opens it on a [`CrashStorage`] and runs a few *steps*, each ending
//! durable (the operation syncs, or a flush follows), then closes it. The
//! guest view (active disk, and the snapshot list with each snapshot's
//! contents) is recorded after every step. Power is cut at every write
//! and sync of the trace, keeping all, none and sampled subsets of the
//! unsynced writes, some torn at 512 bytes (`common::crash`). At each
//! crash state:
//!
//! (a) oxqcow opens it read-write (repairing it if dirty), its own check
//!     finds no corruption (no leak after a repair on open), and the
//!     image is clean after close;
//! (b) on a sample, `qemu-img check` on the crashed file itself finds no
//!     corruption (leaks allowed: see each case) unless the file is
//!     dirty, and none after oxqcow repaired and closed it;
//! (c) the guest view is the one before or after the step the power cut
//!     interrupted: the snapshot list is one of the two as a whole (a
//!     snapshot listed has its contents), and the active disk is one of
//!     the two, or a mix of them in pieces of [`Case::mix`] bytes where
//!     the step is guest I/O or touches clusters one by one. Checked
//!     through oxqcow on every state and through `qemu-img convert`
//!     (`-l` for snapshots) on the sample.
//!
//! Where a case starts from a damaged image (check with repair), (a) and
//! (b) allow the damage the image had before the step, never more.

mod common;
use common::crash::*;
use common::*;
use oxqcow::engine::{create_on, AmendOptions, CreateOptions, OpenOptions, Qcow2};
use oxqcow::storage::{CrashStorage, MemStorage, Storage, TraceEvent};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// What an image shows a guest: the active disk and every snapshot.
#[derive(Clone, PartialEq, Eq)]
struct View {
    guest: Vec<u8>,
    /// (id, name, contents) in table order.
    snaps: Vec<(String, String, Vec<u8>)>,
}

impl View {
    fn describe(&self) -> String {
        let names: Vec<String> = self
            .snaps
            .iter()
            .map(|(i, n, _)| format!("{i}:{n}"))
            .collect();
        format!("size {} snapshots [{}]", self.guest.len(), names.join(" "))
    }
}

type Step = Box<dyn Fn(&Qcow2)>;
type Tamper = Box<dyn Fn(&mut Vec<u8>)>;

struct Case {
    name: &'static str,
    create: CreateOptions,
    /// Put the image on a qcow2 backing file with data in its first 3/4.
    backing: bool,
    /// Run before the trace starts (then the image is closed cleanly).
    setup: Step,
    /// Changes the file bytes of the set-up image (to damage it).
    tamper: Option<Tamper>,
    /// The swept steps: each ends durable (a flush follows it).
    steps: Vec<Step>,
    /// The active disk may mix the views before and after a step in
    /// pieces of this many bytes (0: it is one or the other whole).
    mix: u64,
    /// Bytes past the smaller of the two sizes may also read as zeros
    /// (a shrink unmaps the tail before the header gets the new size).
    tail_zero: bool,
    /// The operation sets the dirty bit without lazy refcounts.
    dirty_ok: bool,
    max_states: usize,
    qemu_states: usize,
}

impl Case {
    fn new(name: &'static str, create: CreateOptions) -> Case {
        Case {
            name,
            create,
            backing: false,
            setup: Box::new(|_| {}),
            tamper: None,
            steps: Vec::new(),
            mix: 0,
            tail_zero: false,
            dirty_ok: false,
            max_states: 600,
            qemu_states: 16,
        }
    }
    fn setup(mut self, f: impl Fn(&Qcow2) + 'static) -> Case {
        self.setup = Box::new(f);
        self
    }
    fn step(mut self, f: impl Fn(&Qcow2) + 'static) -> Case {
        self.steps.push(Box::new(f));
        self
    }
}

fn opts(size: u64, cs: u64, lazy: bool) -> CreateOptions {
    CreateOptions {
        size,
        cluster_size: cs,
        lazy_refcounts: lazy,
        ..Default::default()
    }
}

/// Guest data of request `id` at `pos`: never 0, varies with both.
fn pattern(id: u64, off: u64, len: u64) -> Vec<u8> {
    (off..off + len)
        .map(|p| {
            let h = (p / 512)
                .wrapping_mul(0x9e37_79b9)
                .wrapping_add(p.wrapping_mul(7))
                .wrapping_add(id.wrapping_mul(101));
            (h % 251) as u8 + 1
        })
        .collect()
}

fn w(img: &Qcow2, id: u64, off: u64, len: u64) {
    img.write_at(&pattern(id, off, len), off).unwrap();
}

fn rw_opts() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..Default::default()
    }
}

fn ro_opts() -> OpenOptions {
    OpenOptions::default()
}

/// Reads the active disk and the snapshot list of an open image (the
/// snapshots' contents come from [`read_snapshots`]).
fn read_view(img: &Qcow2) -> Result<View, String> {
    let mut guest = vec![0u8; img.size() as usize];
    img.read_at(&mut guest, 0)
        .map_err(|e| format!("read failed: {e}"))?;
    Ok(View {
        guest,
        snaps: img
            .snapshots()
            .into_iter()
            .map(|s| (s.id, s.name, Vec::new()))
            .collect(),
    })
}

/// Fills in the snapshots' contents of a closed image.
fn read_snapshots(view: &mut View, file: &Arc<dyn Storage>, path: &Path) -> Result<(), String> {
    for (id, _, data) in view.snaps.iter_mut() {
        let img = Qcow2::open_storage(file.clone(), path, &ro_opts())
            .map_err(|e| format!("read-only open failed: {e}"))?;
        img.snapshot_load_tmp(Some(id), None)
            .map_err(|e| format!("load snapshot {id}: {e}"))?;
        data.resize(img.size() as usize, 0);
        img.read_at(data, 0)
            .map_err(|e| format!("read snapshot {id}: {e}"))?;
    }
    Ok(())
}

/// The view of a clean, closed image (no repair involved).
fn view_of(file: Arc<dyn Storage>, path: &Path) -> View {
    let img = Qcow2::open_storage(file.clone(), path, &ro_opts()).unwrap();
    let mut v = read_view(&img).unwrap();
    drop(img);
    read_snapshots(&mut v, &file, path).unwrap();
    v
}

/// Whether `got` is `a`, `b`, or (with `mix`) a mix of them.
fn accepts(case: &Case, a: &View, b: &View, got: &View) -> Result<(), String> {
    if got == a || got == b {
        return Ok(());
    }
    let lists = |v: &View| v.snaps.clone();
    if lists(got) != lists(a) && lists(got) != lists(b) {
        return Err(format!(
            "snapshots differ from both the view before ({}) and after ({}) the step: {}",
            a.describe(),
            b.describe(),
            got.describe()
        ));
    }
    if got.guest.len() != a.guest.len() && got.guest.len() != b.guest.len() {
        return Err(format!(
            "guest size {} is neither {} nor {}",
            got.guest.len(),
            a.guest.len(),
            b.guest.len()
        ));
    }
    if case.mix == 0 {
        let which = if got.guest == a.guest || got.guest == b.guest {
            "snapshot contents"
        } else {
            "active disk"
        };
        return Err(format!(
            "{which} neither the view before nor after the step ({})",
            got.describe()
        ));
    }
    let m = case.mix as usize;
    // Pieces never straddle the smaller size (a shrink's new end).
    let short = a.guest.len().min(b.guest.len());
    let mut pieces = Vec::new();
    let mut pos = 0;
    while pos < got.guest.len() {
        let mut end = (pos / m + 1) * m;
        if pos < short && end > short {
            end = short;
        }
        let end = end.min(got.guest.len());
        pieces.push(pos..end);
        pos = end;
    }
    for r in pieces {
        let g = &got.guest[r.clone()];
        let from = |v: &View| v.guest.get(r.clone()).is_some_and(|x| x == g);
        if from(a) || from(b) {
            continue;
        }
        // Past the new end of a shrink: each sector the old bytes or
        // zeros (the tail of the last cluster is zeroed, maybe torn).
        let old_or_zero = |(j, s): (usize, &[u8])| {
            let at = r.start + j * 512..r.start + j * 512 + s.len();
            s.iter().all(|&x| x == 0)
                || [a, b]
                    .iter()
                    .any(|v| v.guest.get(at.clone()).is_some_and(|x| x == s))
        };
        if case.tail_zero && r.start >= short && g.chunks(512).enumerate().all(old_or_zero) {
            continue;
        }
        return Err(format!(
            "guest bytes {:#x}..{:#x} are neither the view before nor after the step",
            r.start, r.end
        ));
    }
    Ok(())
}

/// The incompatible features and the lazy-refcounts bit of an image's
/// header (none in a version 2 header).
fn header_flags(image: &[u8]) -> (u64, bool) {
    if u32::from_be_bytes(image[4..8].try_into().unwrap()) < 3 {
        return (0, false);
    }
    (incompat(image), be64(image, 80) & 1 != 0)
}

/// What checking one crash state found.
#[derive(Default)]
struct Outcome {
    dirty: bool,
    leaks: bool,
}

struct Ctx<'a> {
    case: &'a Case,
    dir: &'a Scratch,
    path: PathBuf,
    /// Damage the image had before the steps (a tampered case).
    base_corruptions: u64,
}

impl Ctx<'_> {
    /// (a): open read-write (repairing), check, read the view, close.
    /// Returns the view and the file bytes after close.
    fn open_repair_read(&self, image: Vec<u8>, dirty: bool) -> Result<(View, Vec<u8>), String> {
        let mem = Arc::new(MemStorage::from_bytes(image));
        let file: Arc<dyn Storage> = mem.clone();
        let img = Qcow2::open_storage(file.clone(), &self.path, &rw_opts())
            .map_err(|e| format!("read-write open failed: {e}"))?;
        if img.is_dirty() {
            return Err("still dirty after a read-write open".into());
        }
        let mut lines = Vec::new();
        let res = img
            .check(0, &mut |l: &str| lines.push(l.to_string()))
            .map_err(|e| format!("oxqcow check failed: {e}"))?;
        if res.corruptions > self.base_corruptions
            || res.check_errors > 0
            || (dirty && res.leaks > 0)
        {
            return Err(format!(
                "oxqcow check after open: {} corruptions, {} leaks, {} check errors{}: {}",
                res.corruptions,
                res.leaks,
                res.check_errors,
                if dirty { " (repaired on open)" } else { "" },
                lines.join("; ")
            ));
        }
        let mut view = read_view(&img)?;
        img.close().map_err(|e| format!("close failed: {e}"))?;
        drop(img);
        let bytes = mem.bytes();
        let (flags, _) = header_flags(&bytes);
        if flags & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) != 0 {
            return Err(format!(
                "incompatible features {flags:#x} after a read-write open and close"
            ));
        }
        read_snapshots(&mut view, &file, &self.path)?;
        Ok((view, bytes))
    }

    /// `qemu-img check` of a file: Ok(true) with leaks.
    fn qemu_check(&self, f: &str, allow_corrupt: bool) -> Result<bool, String> {
        let (code, out, err) = run("qemu-img", &["check", "-f", "qcow2", f]);
        match code {
            0 => Ok(false),
            3 => Ok(true),
            2 if allow_corrupt => Ok(false),
            _ => Err(format!("qemu-img check exit {code}: {out}{err}")),
        }
    }

    /// QEMU's view of a closed image file.
    fn qemu_view(&self, f: &str, like: &View) -> Result<View, String> {
        let raw = self.dir.path("qemu-view.raw");
        let r = raw.display().to_string();
        let conv = |extra: &[&str]| -> Result<Vec<u8>, String> {
            let mut a = vec!["convert", "-f", "qcow2", "-O", "raw"];
            a.extend_from_slice(extra);
            a.extend_from_slice(&[f, &r]);
            let (code, o, e) = run("qemu-img", &a);
            if code != 0 {
                return Err(format!("qemu-img convert {extra:?} failed: {o}{e}"));
            }
            std::fs::read(&raw).map_err(|e| e.to_string())
        };
        let guest = conv(&[])?;
        let mut snaps = Vec::new();
        for (id, name, _) in &like.snaps {
            let sel = format!("snapshot.id={id}");
            snaps.push((id.clone(), name.clone(), conv(&["-l", &sel])?));
        }
        Ok(View { guest, snaps })
    }

    fn check_state(
        &self,
        image: Vec<u8>,
        a: &View,
        b: &View,
        qemu: bool,
    ) -> Result<Outcome, String> {
        let case = self.case;
        let mut out = Outcome::default();
        let (flags, lazy) = header_flags(&image);
        out.dirty = flags & INCOMPAT_DIRTY != 0;
        if out.dirty && !lazy && !case.dirty_ok {
            return Err("dirty bit set without lazy refcounts".into());
        }
        if flags & INCOMPAT_CORRUPT != 0 {
            return Err("corrupt bit set".into());
        }
        let damaged = self.base_corruptions > 0;
        let f = self.path.display().to_string();
        if qemu {
            std::fs::write(&self.path, &image).map_err(|e| e.to_string())?;
            out.leaks = self
                .qemu_check(&f, out.dirty || damaged)
                .map_err(|e| format!("crashed file: {e}"))?;
        }
        let (view, closed) = self.open_repair_read(image, out.dirty)?;
        accepts(case, a, b, &view).map_err(|e| format!("oxqcow: {e}"))?;
        if !qemu {
            return Ok(out);
        }
        std::fs::write(&self.path, &closed).map_err(|e| e.to_string())?;
        let leaks = self
            .qemu_check(&f, damaged)
            .map_err(|e| format!("after oxqcow's open and close: {e}"))?;
        if leaks && out.dirty {
            return Err("qemu-img check finds leaks after oxqcow repaired a dirty image".into());
        }
        let theirs = self.qemu_view(&f, &view)?;
        if theirs != view {
            return Err(format!(
                "QEMU's view differs from oxqcow's: {} / {}",
                theirs.describe(),
                view.describe()
            ));
        }
        Ok(out)
    }
}

/// Builds the set-up image in memory: returns its bytes.
fn build(case: &Case, dir: &Scratch, path: &Path) -> Vec<u8> {
    let mut o = case.create.clone();
    if case.backing {
        let b = dir.path("backing.qcow2");
        let bs = b.display().to_string();
        qemu_img(&["create", "-q", "-f", "qcow2", &bs, &o.size.to_string()]);
        let q = o.size / 4;
        qemu_io(&b, &[&format!("write -P 0x5a 0 {}", 3 * q)]);
        o.backing_file = Some(bs);
        o.backing_fmt = Some("qcow2".into());
    }
    let mem = Arc::new(MemStorage::new());
    let s: Arc<dyn Storage> = mem.clone();
    create_on(s.clone(), path, &o).unwrap();
    let img = Qcow2::open_storage(s, path, &rw_opts()).unwrap();
    (case.setup)(&img);
    img.close().unwrap();
    drop(img);
    let mut bytes = mem.bytes();
    if let Some(t) = &case.tamper {
        t(&mut bytes);
    }
    bytes
}

/// Runs a case's steps on a crash storage holding the set-up image
/// `bytes`. Returns the storage (its trace: the steps and the close), the
/// view before the first step and after each, and the trace position
/// where each step ends (0 for the start).
fn run_steps(
    case: &Case,
    bytes: Vec<u8>,
    path: &Path,
) -> (Arc<CrashStorage>, Vec<View>, Vec<usize>) {
    let storage = Arc::new(CrashStorage::from_bytes(bytes));
    let file: Arc<dyn Storage> = storage.clone();
    let mut views = vec![view_of(file.clone(), path)];
    // Trace positions where each step ends (durable), and the active
    // disk the open image shows then.
    let mut ends = vec![0usize];
    let mut live = Vec::new();
    storage.restart_trace();
    take_log();
    {
        let img = Qcow2::open_storage(file.clone(), path, &rw_opts()).unwrap();
        for step in &case.steps {
            step(&img);
            img.flush().unwrap();
            ends.push(storage.trace_len());
            let mut g = vec![0u8; img.size() as usize];
            img.read_at(&mut g, 0).unwrap();
            live.push(g);
        }
        img.close().unwrap();
    }
    // Each step's view from what was durable when it returned.
    for (k, &end) in ends.iter().enumerate().skip(1) {
        let image = storage.crash_image(end, &oxqcow::storage::CrashSpec::none());
        let v = view_of(Arc::new(MemStorage::from_bytes(image)), path);
        assert!(
            v.guest == live[k - 1],
            "{}: step {k} is not durable when it returns",
            case.name
        );
        views.push(v);
    }
    (storage, views, ends)
}

fn sweep(case: Case) {
    install_log_hook();
    let t0 = Instant::now();
    let dir = Scratch::new(&format!("ops-{}", case.name));
    let path = dir.path("img.qcow2");
    let bytes = build(&case, &dir, &path);

    // The damage a tampered image starts with (oxqcow's count).
    let base_corruptions = {
        let mem: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes.clone()));
        let img = Qcow2::open_storage(mem, &path, &ro_opts()).unwrap();
        img.check(0, &mut |_| {}).unwrap().corruptions
    };

    let (storage, views, ends) = run_steps(&case, bytes, &path);
    let n = storage.trace_len();
    // Sanity: the final image is clean, QEMU sees the last view.
    std::fs::write(&path, storage.bytes()).unwrap();
    if base_corruptions == 0 {
        assert_clean(&path);
    }
    let ctx = Ctx {
        case: &case,
        dir: &dir,
        path: path.clone(),
        base_corruptions,
    };
    let last = views.last().unwrap().clone();
    let theirs = ctx.qemu_view(&path.display().to_string(), &last).unwrap();
    assert!(
        theirs == last,
        "{}: QEMU's view of the final image differs: {} / {}",
        case.name,
        theirs.describe(),
        last.describe()
    );

    let (mut states, total, cut_points) = sampled_states(&storage, 0x5eed, case.max_states);
    // A short trace gets more random and torn subsets (other seeds).
    let mut round = 1;
    while states.len() * 2 < case.max_states && round < 6 {
        let (more, _, _) = sampled_states(&storage, 0x5eed ^ (round << 40), case.max_states);
        states.extend(
            more.into_iter()
                .filter(|(_, kind, _)| kind.starts_with("random") || kind.starts_with("torn")),
        );
        round += 1;
    }
    let qemu_every = states.len().div_ceil(case.qemu_states.max(1)).max(1);
    let mut replay = storage.replay();
    let (mut tried, mut qemu_checked, mut dirty, mut leaky) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for (i, (cut, kind, spec)) in states.iter().enumerate() {
        replay.seek(*cut);
        // The step the cut falls in: between views[k] and views[k + 1].
        let k = ends.iter().rposition(|&e| e <= *cut).unwrap();
        let (a, b) = (&views[k], &views[(k + 1).min(views.len() - 1)]);
        let qemu = i % qemu_every == qemu_every / 2 || i + 1 == states.len();
        tried += 1;
        qemu_checked += qemu as usize;
        match ctx.check_state(replay.image(spec), a, b, qemu) {
            Ok(o) => {
                dirty += o.dirty as usize;
                leaky += o.leaks as usize;
            }
            Err(e) => {
                let ev = cut.checked_sub(1).map(|i| replay.event(i));
                let what = format!(
                    "{}: cut {cut}/{n} in step {} (after {ev:?}, {} pending), state {kind} {spec:?}: {e}",
                    case.name,
                    k + 1,
                    replay.pending(),
                );
                let name = format!("ops-failure-{}", case.name);
                record_failure(&mut failures, what, &name, &replay.image(spec));
            }
        }
        take_log();
    }
    eprintln!(
        "crash_ops {}: {n} trace events ({} syncs), {cut_points} crash points, {total} crash states (more with other seeds), {tried} tried, {qemu_checked} checked by qemu-img ({dirty} dirty and repaired, {leaky} with leaks), {:.1}s",
        case.name,
        storage
            .trace()
            .iter()
            .filter(|e| **e == TraceEvent::Sync)
            .count(),
        t0.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        let n = failures.len();
        failures.truncate(8);
        panic!(
            "{n} failing crash states, the first ones:\n{}",
            failures.join("\n")
        );
    }
}

// ---- helpers for the cases -------------------------------------------------------

fn amend(img: &Qcow2, o: AmendOptions) {
    img.amend(&o).unwrap();
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Sets the stored 16-bit refcount of `cluster` in an image's bytes.
fn poke_refcount(b: &mut [u8], cluster: u64, v: u16) {
    let cb = u32::from_be_bytes(b[20..24].try_into().unwrap());
    assert_eq!(u32::from_be_bytes(b[96..100].try_into().unwrap()), 4);
    let per_block = 1u64 << (cb - 1);
    let table = be64(b, 48) as usize;
    let block = be64(b, table + (cluster / per_block) as usize * 8) as usize;
    assert_ne!(block, 0);
    let at = block + (cluster % per_block) as usize * 2;
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The host cluster a guest offset maps to.
fn host_cluster(img: &Qcow2, off: u64) -> u64 {
    img.host_cluster_at(off).unwrap().unwrap() / img.cluster_size()
}

/// Data, a snapshot, then copy-on-write into part of it: the image the
/// snapshot cases start from (64 KiB clusters).
fn snapshot_setup(img: &Qcow2) {
    w(img, 1, 0, 300 * K);
    w(img, 2, M, 64 * K);
    img.write_zeroes(2 * M, 128 * K, false).unwrap();
    img.snapshot_create("s1").unwrap();
    w(img, 3, 64 * K, 100 * K);
    w(img, 4, 3 * M, 10 * K);
    img.discard(M, 64 * K).unwrap();
}

// ---- the cases ---------------------------------------------------------------------

fn snapshot_create(lazy: bool) -> Case {
    let mut c = Case::new(
        if lazy {
            "snapshot-create-lazy"
        } else {
            "snapshot-create"
        },
        opts(4 * M, 64 * K, lazy),
    )
    .setup(|img| {
        w(img, 1, 0, 300 * K);
        w(img, 2, M + 5, 64 * K);
        img.write_zeroes(2 * M, 128 * K, false).unwrap();
        img.snapshot_create("old").unwrap();
        w(img, 3, 64 * K, 64 * K);
    })
    .step(|img| img.snapshot_create("s1").unwrap());
    // Rule 5 of meta.rs: the image is dirty while refcounts and COPIED
    // flags change.
    c.dirty_ok = true;
    c
}

/// A second snapshot, then copy-on-write of clusters it shares.
fn snapshot_create_cow(lazy: bool) -> Case {
    let mut c = snapshot_create(lazy)
        .step(|img| {
            w(img, 10, 4 * K, 8 * K);
            w(img, 11, 200 * K, 100 * K);
            w(img, 12, 3 * M, 64 * K);
        })
        .step(|img| img.snapshot_create("s2").unwrap());
    c.name = if lazy {
        "snapshot-create-cow-lazy"
    } else {
        "snapshot-create-cow"
    };
    c.mix = 512;
    c
}

fn snapshot_apply(lazy: bool) -> Case {
    Case::new(
        if lazy {
            "snapshot-apply-lazy"
        } else {
            "snapshot-apply"
        },
        opts(4 * M, 64 * K, lazy),
    )
    .setup(snapshot_setup)
    .step(|img| img.snapshot_apply("s1").unwrap())
    // Copy-on-write after it, inside one cluster the snapshot shares.
    .step(|img| w(img, 40, 70 * K, 8 * K))
}

/// 512-byte clusters: the L1 table (128 entries) spans two sectors.
fn snapshot_apply_small_clusters() -> Case {
    Case::new("snapshot-apply-512", opts(4 * M, 512, false))
        .setup(|img| {
            for i in 0..8 {
                w(img, 1 + i, i * 512 * K + 1000, 3000);
            }
            img.snapshot_create("s1").unwrap();
            for i in 0..8 {
                w(img, 20 + i, i * 512 * K, 2000);
            }
        })
        .step(|img| img.snapshot_apply("s1").unwrap())
}

/// Delete the only snapshot: its clusters become the active disk's alone
/// (COPIED again) or free; then writes go in place and reuse freed space.
fn snapshot_delete_cow(lazy: bool) -> Case {
    let mut c = Case::new(
        if lazy {
            "snapshot-delete-cow-lazy"
        } else {
            "snapshot-delete-cow"
        },
        opts(4 * M, 64 * K, lazy),
    )
    .setup(snapshot_setup)
    .step(|img| img.snapshot_delete("s1").unwrap())
    .step(|img| {
        w(img, 20, 0, 64 * K);
        w(img, 21, 200 * K, 10 * K);
        w(img, 22, 2 * M + 64 * K, 64 * K);
        w(img, 23, 2 * M + 512 * K, 256 * K);
    });
    c.mix = 512;
    c.dirty_ok = true;
    c
}

/// Delete one of two snapshots that share clusters with each other and
/// with the active disk.
fn snapshot_delete_shared() -> Case {
    let mut c = Case::new("snapshot-delete-shared", opts(4 * M, 64 * K, false))
        .setup(|img| {
            snapshot_setup(img);
            img.snapshot_create("s2").unwrap();
            w(img, 5, 128 * K, 64 * K);
        })
        .step(|img| img.snapshot_delete("s1").unwrap())
        .step(|img| {
            w(img, 20, 0, 64 * K);
            w(img, 21, 128 * K + 7, 100);
        })
        .step(|img| img.snapshot_delete("s2").unwrap());
    c.mix = 512;
    c.dirty_ok = true;
    c
}

fn width(name: &'static str, cs: u64, size: u64, bits: u64, data: u64) -> Case {
    let mut c = Case::new(name, opts(size, cs, false))
        .setup(move |img| {
            w(img, 1, 0, data);
            img.discard(data / 4, data / 8).unwrap();
        })
        .step(move |img| {
            amend(
                img,
                AmendOptions {
                    refcount_bits: Some(bits),
                    ..Default::default()
                },
            )
        });
    c.max_states = 500;
    c
}

/// A width change on a lazy-refcounts image that is dirty (guest writes
/// in the same session before it).
fn width_lazy(name: &'static str, cs: u64, size: u64, bits: u64, data: u64) -> Case {
    let mut c = width(name, cs, size, bits, data);
    c.create.lazy_refcounts = true;
    c.steps
        .insert(0, Box::new(move |img| w(img, 9, data, 20 * K)));
    c.mix = 512;
    c
}

/// Zero clusters with and without a host cluster, over a backing file
/// (expanding an unallocated one needs a new cluster), some shared with a
/// snapshot.
fn downgrade(name: &'static str, lazy: bool, snapshots: bool) -> Case {
    let mut c = Case::new(name, opts(4 * M, 64 * K, lazy))
        .setup(move |img| {
            w(img, 1, 0, 1536 * K);
            img.write_zeroes(64 * K, 128 * K, false).unwrap();
            img.write_zeroes(512 * K, 128 * K, true).unwrap();
            img.write_zeroes(2 * M, 192 * K, false).unwrap();
            if snapshots {
                img.snapshot_create("s1").unwrap();
                img.write_zeroes(M, 64 * K, false).unwrap();
                img.write_zeroes(2 * M + 512 * K, 64 * K, false).unwrap();
            }
        })
        .step(|img| {
            amend(
                img,
                AmendOptions {
                    version: Some(2),
                    lazy_refcounts: Some(false),
                    ..Default::default()
                },
            )
        });
    c.backing = true;
    c
}

fn upgrade() -> Case {
    let mut o = opts(4 * M, 64 * K, false);
    o.version = 2;
    Case::new("upgrade", o)
        .setup(|img| {
            w(img, 1, 0, 256 * K);
            img.snapshot_create("s1").unwrap();
            w(img, 2, 64 * K, 64 * K);
        })
        .step(|img| {
            amend(
                img,
                AmendOptions {
                    version: Some(3),
                    ..Default::default()
                },
            )
        })
}

fn lazy_toggle() -> Case {
    let mut c = Case::new("lazy-on-off", opts(4 * M, 64 * K, false))
        .setup(|img| w(img, 1, 0, 256 * K))
        .step(|img| {
            amend(
                img,
                AmendOptions {
                    lazy_refcounts: Some(true),
                    ..Default::default()
                },
            )
        })
        .step(|img| {
            w(img, 2, 128 * K, 200 * K);
            w(img, 3, 2 * M, 64 * K);
        })
        .step(|img| {
            amend(
                img,
                AmendOptions {
                    lazy_refcounts: Some(false),
                    ..Default::default()
                },
            )
        });
    c.mix = 512;
    c
}

/// 512-byte clusters: an L2 table maps 32 KiB, so growing 1 MiB to 4 MiB
/// grows the L1 table from 32 to 128 entries (a new table).
fn resize_grow(lazy: bool) -> Case {
    let mut c = Case::new(
        if lazy {
            "resize-grow-lazy"
        } else {
            "resize-grow"
        },
        opts(M, 512, lazy),
    )
    .setup(|img| {
        for i in 0..8 {
            w(img, 1 + i, i * 128 * K + 100, 2000);
        }
    })
    .step(|img| img.resize(4 * M).unwrap())
    .step(|img| {
        w(img, 20, 3 * M, 4 * K);
        w(img, 21, 100 * K, 1000);
    });
    c.mix = 512;
    c
}

fn resize_shrink(lazy: bool) -> Case {
    let mut c = Case::new(
        if lazy {
            "resize-shrink-lazy"
        } else {
            "resize-shrink"
        },
        opts(4 * M, 64 * K, lazy),
    )
    .setup(|img| w(img, 1, 0, 4 * M))
    .step(|img| img.resize(M + 100 * K).unwrap())
    .step(|img| img.resize(2 * M).unwrap());
    c.mix = 64 * K;
    c.tail_zero = true;
    c
}

/// Leaks: freed clusters whose refcounts are set back to 1.
fn check_leaks() -> Case {
    let mut c = Case::new("check-repair-leaks", opts(4 * M, 64 * K, false))
        .setup(|img| {
            w(img, 1, 0, 2 * M);
            img.discard(512 * K, 256 * K).unwrap();
        })
        .step(|img| {
            let r = img.check(oxqcow::engine::FIX_LEAKS, &mut |_| {}).unwrap();
            assert_eq!(r.leaks_fixed, 4);
        });
    c.tamper = Some(Box::new(|b| {
        // The discarded clusters: the file's clusters 9..13 (header,
        // reftable, refblock, L1, L2, then data from cluster 5).
        for c in 13..17 {
            poke_refcount(b, c, 1);
        }
    }));
    c
}

/// A data cluster whose refcount is 0 (the refcount structure must be
/// rebuilt) and one counted twice (a leak and a wrong COPIED flag).
fn check_all() -> Case {
    let mut c = Case::new("check-repair-all", opts(4 * M, 64 * K, false))
        .setup(|img| {
            w(img, 1, 0, 2 * M);
            assert_eq!(host_cluster(img, 0), 5);
        })
        .step(|img| {
            let r = img
                .check(
                    oxqcow::engine::FIX_LEAKS | oxqcow::engine::FIX_ERRORS,
                    &mut |_| {},
                )
                .unwrap();
            assert_eq!(r.corruptions, 0);
        });
    c.tamper = Some(Box::new(|b| {
        poke_refcount(b, 6, 0);
        poke_refcount(b, 9, 2);
    }));
    c
}

/// What commit leaves: the backing file holds the overlay's data, and the
/// overlay is emptied. The guest view never changes.
fn make_empty(name: &'static str, snapshot: bool) -> Case {
    let mut c = Case::new(name, opts(4 * M, 64 * K, false)).setup(move |img| {
        w(img, 1, 0, 200 * K);
        w(img, 2, 3 * M + 5, 300 * K);
        if snapshot {
            img.snapshot_create("s1").unwrap();
            w(img, 3, 64 * K, 64 * K);
        }
        commit_to_backing(img);
    });
    c.backing = true;
    c.dirty_ok = !snapshot;
    c.steps.push(Box::new(|img| img.make_empty().unwrap()));
    c
}

fn lazy_make_empty() -> Case {
    let mut c = make_empty("make-empty-lazy", false);
    c.create.lazy_refcounts = true;
    c
}

/// Copies an overlay's guest view into its backing file.
fn commit_to_backing(img: &Qcow2) {
    let mut g = vec![0u8; img.size() as usize];
    img.read_at(&mut g, 0).unwrap();
    let b = img.header().backing_file.unwrap();
    let base = Qcow2::open(Path::new(&b), &rw_opts()).unwrap();
    base.write_at(&g, 0).unwrap();
    base.close().unwrap();
}

fn compressed() -> Case {
    let mut c = Case::new("write-compressed", opts(4 * M, 64 * K, false))
        .setup(|img| {
            w(img, 1, 0, 512 * K);
            img.snapshot_create("s1").unwrap();
            w(img, 2, 64 * K, 64 * K);
        })
        .step(|img| {
            let cs = 64 * K;
            // Over a cluster the snapshot shares, over one the active disk
            // owns, and into unallocated clusters (compressible or not).
            for (i, gc) in [0u64, 1, 8, 9, 20].into_iter().enumerate() {
                let mut d = pattern(30 + i as u64, gc * cs, cs);
                if gc != 9 {
                    d[..cs as usize / 2].fill(7);
                }
                img.write_compressed(&d, gc * cs).unwrap();
            }
        });
    c.mix = 64 * K;
    c
}

fn bitmap_store() -> Case {
    let mut c = Case::new("bitmap-store", opts(4 * M, 64 * K, false))
        .setup(|img| {
            w(img, 1, 0, 256 * K);
            img.bitmap_add("b0", None, true).unwrap();
        })
        .step(|img| {
            img.bitmap_add("b1", Some(128 * K), true).unwrap();
            w(img, 2, 100 * K, 300 * K);
            w(img, 3, 3 * M, 64 * K);
        });
    c.mix = 512;
    c
}

/// The same backing file under another name: the header is rewritten
/// (the name's length changes) and the guest view must not.
fn change_backing() -> Case {
    let mut c = Case::new("change-backing-file", opts(4 * M, 64 * K, false))
        .setup(|img| w(img, 1, 64 * K, 64 * K))
        .step(|img| {
            img.change_backing_file(Some("./backing.qcow2"), Some("qcow2"))
                .unwrap()
        });
    c.backing = true;
    c
}

/// Snapshots of a disk 1 MiB larger and of one as large as the current
/// one: the L1 table grows, and the size changes with the tree switch.
fn snapshot_apply_other_size() -> Case {
    Case::new("snapshot-apply-other-size", opts(M, 512, false))
        .setup(|img| {
            w(img, 1, 0, 300 * K);
            img.snapshot_create("small").unwrap();
            img.resize(2 * M).unwrap();
            w(img, 2, M + 100 * K, 200 * K);
            img.snapshot_create("big").unwrap();
            img.resize(M).unwrap();
            w(img, 3, 100 * K, 8 * K);
        })
        .step(|img| img.snapshot_apply("big").unwrap())
        .step(|img| img.snapshot_apply("small").unwrap())
}

/// savevm's order: VM state written past the disk, then a snapshot that
/// keeps it while the current disk drops its copy.
fn snapshot_vmstate() -> Case {
    let mut c = Case::new("snapshot-vmstate", opts(4 * M, 64 * K, false))
        .setup(|img| w(img, 1, 0, 128 * K))
        .step(|img| {
            img.write_vmstate(&pattern(5, 0, 200 * K), 0).unwrap();
            img.snapshot_create_with(None, "vm", None, 0, 200 * K)
                .unwrap();
        });
    c.dirty_ok = true;
    c
}

fn resize_prealloc(name: &'static str, mode: oxqcow::Preallocation, lazy: bool) -> Case {
    let mut c = Case::new(name, opts(M + 10 * K, 64 * K, lazy))
        .setup(|img| w(img, 1, 0, M + 10 * K))
        .step(move |img| img.resize_preallocated(3 * M, mode).unwrap())
        .step(|img| w(img, 2, 2 * M, 64 * K));
    c.mix = 512;
    c
}

/// Guest requests over clusters a snapshot shares (non-overlapping, so
/// that any state is a per-sector mix of before and after): copy-on-write,
/// zero writes with and without unmap, a discard, a compressed write.
fn io_over_snapshot(name: &'static str, lazy: bool) -> Case {
    let mut c = Case::new(name, opts(4 * M, 64 * K, lazy))
        .setup(|img| {
            w(img, 1, 0, 2 * M);
            img.snapshot_create("s1").unwrap();
        })
        .step(|img| {
            w(img, 2, 10 * K, 4 * K);
            img.write_zeroes(128 * K, 128 * K, false).unwrap();
            img.write_zeroes(320 * K, 64 * K, true).unwrap();
            img.discard(512 * K, 192 * K).unwrap();
            let cs = 64 * K;
            let mut d = pattern(3, M, cs);
            d[..1000].fill(9);
            img.write_compressed(&d, M).unwrap();
            w(img, 4, M + 200 * K, 300 * K);
        });
    c.mix = 512;
    c
}

/// Several amend options at once, in QEMU's order: width, lazy
/// refcounts, then the size.
fn amend_combined() -> Case {
    let mut c = Case::new("amend-combined", opts(2 * M, 4 * K, false))
        .setup(|img| w(img, 1, 0, M + 7))
        .step(|img| {
            amend(
                img,
                AmendOptions {
                    refcount_bits: Some(8),
                    lazy_refcounts: Some(true),
                    size: Some(3 * M),
                    ..Default::default()
                },
            )
        })
        .step(|img| w(img, 2, 2 * M + 5, 100 * K));
    c.mix = 512;
    c
}

/// A bitmap removed: close drops the directory and the extension.
fn bitmap_remove() -> Case {
    let mut c = Case::new("bitmap-remove", opts(4 * M, 64 * K, false))
        .setup(|img| {
            img.bitmap_add("b0", None, true).unwrap();
            w(img, 1, 0, 256 * K);
        })
        .step(|img| {
            img.bitmap_remove("b0").unwrap();
            w(img, 2, M, 64 * K);
        });
    c.mix = 512;
    c
}

macro_rules! sweeps {
    ($($name:ident: $case:expr;)*) => {
        $(
            #[test]
            fn $name() {
                sweep($case);
            }
        )*
    };
}

sweeps! {
    snapshot_create_sweep: snapshot_create(false);
    snapshot_create_lazy_sweep: snapshot_create(true);
    snapshot_create_cow_sweep: snapshot_create_cow(false);
    snapshot_create_cow_lazy_sweep: snapshot_create_cow(true);
    snapshot_apply_sweep: snapshot_apply(false);
    snapshot_apply_lazy_sweep: snapshot_apply(true);
    snapshot_apply_512_sweep: snapshot_apply_small_clusters();
    snapshot_delete_cow_sweep: snapshot_delete_cow(false);
    snapshot_delete_cow_lazy_sweep: snapshot_delete_cow(true);
    snapshot_delete_shared_sweep: snapshot_delete_shared();
    amend_width_16_to_1: width("width-16-1", 64 * K, 4 * M, 1, 2 * M);
    amend_width_16_to_64: width("width-16-64", 64 * K, 4 * M, 64, 2 * M);
    // 512-byte clusters: the new table takes two clusters, and the blocks
    // and table need blocks of their own.
    amend_width_512_16_to_64: {
        let mut c = width("width-512-16-64", 512, 3 * M, 64, 2560 * K);
        c.max_states = 1000;
        c
    };
    amend_width_512_16_to_2_lazy: width_lazy("width-512-16-2-lazy", 512, 2 * M, 2, M);
    amend_downgrade: downgrade("downgrade", false, false);
    amend_downgrade_lazy: downgrade("downgrade-lazy", true, false);
    amend_downgrade_snapshots: downgrade("downgrade-snapshots", false, true);
    amend_upgrade: upgrade();
    amend_lazy_on_off: lazy_toggle();
    resize_grow_sweep: resize_grow(false);
    resize_grow_lazy_sweep: resize_grow(true);
    resize_shrink_sweep: resize_shrink(false);
    resize_shrink_lazy_sweep: resize_shrink(true);
    check_repair_leaks: check_leaks();
    check_repair_all: check_all();
    make_empty_fresh_layout: make_empty("make-empty", false);
    make_empty_with_snapshot: make_empty("make-empty-snapshot", true);
    make_empty_lazy: lazy_make_empty();
    write_compressed_sweep: compressed();
    bitmap_store_at_close: bitmap_store();
    change_backing_file_sweep: change_backing();
    snapshot_apply_other_size_sweep: snapshot_apply_other_size();
    snapshot_vmstate_sweep: snapshot_vmstate();
    resize_prealloc_metadata: resize_prealloc("resize-prealloc-metadata", oxqcow::Preallocation::Metadata, false);
    resize_prealloc_falloc: resize_prealloc("resize-prealloc-falloc", oxqcow::Preallocation::Falloc, false);
    guest_io_over_snapshot: io_over_snapshot("io-over-snapshot", false);
    guest_io_over_snapshot_lazy: io_over_snapshot("io-over-snapshot-lazy", true);
    amend_combined_sweep: amend_combined();
    bitmap_remove_at_close: bitmap_remove();
    resize_prealloc_full_lazy: resize_prealloc("resize-prealloc-full-lazy", oxqcow::Preallocation::Full, true);
}

// ---- engine bugs found by this sweep: focused reproducers --------------------------

/// Calls `f(cut, image, before, after)` for the crashed image at every cut
/// point of a case's steps with every pending write kept, and with `torn`
/// also a torn version of each.
fn each_crash(case: &Case, torn: bool, mut f: impl FnMut(usize, Vec<u8>, &View, &View)) {
    let dir = Scratch::new(&format!("ops-bug-{}", case.name));
    let path = dir.path("img.qcow2");
    let bytes = build(case, &dir, &path);
    let (storage, views, ends) = run_steps(case, bytes, &path);
    let mut replay = storage.replay();
    for cut in 0..=storage.trace_len() {
        replay.seek(cut);
        let k = ends.iter().rposition(|&e| e <= cut).unwrap();
        let (a, b) = (&views[k], &views[(k + 1).min(views.len() - 1)]);
        f(cut, replay.image(&oxqcow::storage::CrashSpec::all()), a, b);
        if torn {
            for seed in 1..25 {
                let spec = oxqcow::storage::CrashSpec {
                    keep: oxqcow::storage::Keep::All,
                    tear: Some(seed * 0x1234_5678 + cut as u64),
                };
                f(cut, replay.image(&spec), a, b);
            }
        }
    }
}

/// oxqcow's check of a crashed image as it is (read-only, no repair):
/// (corruptions, report) — None when the image is dirty (the next
/// read-write open repairs it).
fn corruptions_if_clean(image: Vec<u8>) -> Option<(u64, String)> {
    if incompat(&image) & INCOMPAT_DIRTY != 0 {
        return None;
    }
    let mem: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image));
    let img = Qcow2::open_storage(mem, Path::new("crashed.qcow2"), &ro_opts()).unwrap();
    let mut lines = Vec::new();
    let r = img
        .check(0, &mut |l: &str| lines.push(l.to_string()))
        .unwrap();
    Some((r.corruptions, lines.join("; ")))
}

fn assert_no_clean_corruption(case: Case) {
    let mut bad = Vec::new();
    each_crash(&case, false, |cut, image, _, _| {
        if let Some((n, report)) = corruptions_if_clean(image) {
            if n > 0 {
                bad.push(format!("cut {cut}: {report}"));
            }
        }
    });
    assert!(
        bad.is_empty(),
        "{}: crashed images that are clean (not dirty) but corrupt:\n{}",
        case.name,
        bad.join("\n")
    );
}

/// ENGINE BUG: internal snapshot creation raised refcounts to 2 (synced)
/// before it wrote the L2 tables and L1 entries without their COPIED
/// flags. A power cut in between left a clean image whose active tree had
/// COPIED flags on clusters with refcount 2: `qemu-img check` reports
/// "ERROR OFLAG_COPIED L2 cluster ... refcount=2" and "ERROR OFLAG_COPIED
/// data cluster ... refcount=2" as corruptions, and nothing repairs them
/// on open. The other order (flags first) fails the same check with
/// refcount=1. Fix: rule 5 of meta.rs (the dirty bit around the change).
#[test]
fn bug_snapshot_create_leaves_copied_flags_on_shared_clusters() {
    assert_no_clean_corruption(snapshot_create(false));
}

/// ENGINE BUG: deleting a snapshot dropped refcounts to 1 (synced) before
/// the COPIED flags came back in the active tree's L2 tables: a crash in
/// between left a clean image with "ERROR OFLAG_COPIED data cluster:
/// l2_entry=... refcount=1" corruptions. Fix: rule 5 of meta.rs.
#[test]
fn bug_snapshot_delete_leaves_copied_flags_missing() {
    assert_no_clean_corruption(snapshot_delete_cow(false));
}

/// ENGINE BUG: applying a snapshot wrote the snapshot's L1 table over the
/// active one with the COPIED flags the snapshot's copy was taken with,
/// although every one of those L2 tables had just got its second
/// reference: a crash before the final flag pass left a clean image with
/// "ERROR OFLAG_COPIED L2 cluster ... refcount=2". Fix: the flags are
/// cleared before the table is written.
#[test]
fn bug_snapshot_apply_writes_copied_l1_entries() {
    assert_no_clean_corruption(snapshot_apply(false));
}

/// ENGINE BUG: applying a snapshot wrote the new L1 table in place, in one
/// write. With 512-byte clusters a 4 MiB disk has a 1 KiB L1 table (two
/// sectors): a torn write left half the old tree and half the snapshot's,
/// a disk that never existed. Fix: the new table goes to new clusters and
/// the header switches to it in one write inside its first sector.
#[test]
fn bug_snapshot_apply_torn_l1_mixes_two_trees() {
    let case = snapshot_apply_small_clusters();
    let path = PathBuf::from("crashed.qcow2");
    let mut bad = Vec::new();
    each_crash(&case, true, |cut, image, a, b| {
        let mem: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image));
        let img = Qcow2::open_storage(mem, &path, &ro_opts()).unwrap();
        let mut g = vec![0u8; img.size() as usize];
        img.read_at(&mut g, 0).unwrap();
        if g != a.guest && g != b.guest {
            bad.push(cut);
        }
    });
    assert!(
        bad.is_empty(),
        "crash points whose disk is neither the old one nor the snapshot's: {bad:?}"
    );
}

/// ENGINE BUG: `resize --preallocation=metadata` wrote the L2 entries of
/// the new clusters (synced) before it extended the file to hold them: a
/// crash in between left a clean image whose entries point past its end
/// ("ERROR: counting reference for region exceeding the end of the file by
/// one cluster or more", 31 corruptions). Fix: the file grows first, and
/// the flush syncs the new length before it writes the tables (rule 1).
#[test]
fn bug_prealloc_metadata_maps_clusters_past_the_end_of_the_file() {
    assert_no_clean_corruption(resize_prealloc(
        "bug-prealloc-metadata",
        oxqcow::Preallocation::Metadata,
        false,
    ));
}

/// ENGINE BUG: with lazy refcounts, `resize --preallocation=full` (or
/// falloc) took its data clusters with `alloc_clusters_at`, which never
/// set the dirty bit, then wrote the L2 tables while the refcounts stayed
/// in the cache (lazy): a crash before close left a clean image with
/// "ERROR cluster 23 refcount=0 reference=1" for every new cluster, which
/// no open repairs. Fix: `alloc_clusters_at` marks the image dirty first,
/// as `alloc_clusters` does (rule 2).
#[test]
fn bug_lazy_prealloc_full_leaves_clean_image_with_uncounted_clusters() {
    assert_no_clean_corruption(resize_prealloc(
        "bug-prealloc-full-lazy",
        oxqcow::Preallocation::Full,
        true,
    ));
}

/// ENGINE BUG: `write_header` rewrote cluster 0 in one write. The v2
/// downgrade moves every header extension 32 bytes down (the header is 72
/// bytes, not 104), so a torn write left a first sector whose extensions
/// and backing file name ran into the old layout: the image no longer
/// opened ("file name contained an unexpected NUL byte"). Fix: rule 6 of
/// meta.rs (a compact header in the first sector first).
#[test]
fn bug_torn_header_rewrite_breaks_the_image() {
    let case = downgrade("bug-torn-header", true, false);
    let path = PathBuf::from("crashed.qcow2");
    let mut bad = Vec::new();
    each_crash(&case, true, |cut, image, a, b| {
        let mem: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image));
        let opened = Qcow2::open_storage(mem, &path, &ro_opts());
        let ok = opened.is_ok_and(|img| {
            let mut g = vec![0u8; img.size() as usize];
            img.read_at(&mut g, 0).is_ok() && (g == a.guest || g == b.guest)
        });
        if !ok {
            bad.push(cut);
        }
    });
    assert!(bad.is_empty(), "crash points that break the image: {bad:?}");
}

/// ENGINE BUG: applying a snapshot of another disk size resized the disk
/// first (synced) and switched trees after: a crash in between showed the
/// old disk at the snapshot's size, a disk that never existed. Fix: the
/// size changes in the header write that switches trees.
#[test]
fn bug_snapshot_apply_other_size_resizes_before_the_switch() {
    let case = snapshot_apply_other_size();
    let path = PathBuf::from("crashed.qcow2");
    let mut bad = Vec::new();
    each_crash(&case, false, |cut, image, a, b| {
        let mem: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image));
        let img = Qcow2::open_storage(mem, &path, &ro_opts()).unwrap();
        let mut g = vec![0u8; img.size() as usize];
        img.read_at(&mut g, 0).unwrap();
        if g != a.guest && g != b.guest {
            bad.push(cut);
        }
    });
    assert!(
        bad.is_empty(),
        "crash points whose disk is neither the old one nor the snapshot's: {bad:?}"
    );
}

/// A storage whose `n`-th read or write from arming on fails with EIO.
struct FailNth {
    inner: MemStorage,
    left: std::sync::atomic::AtomicI64,
}

impl FailNth {
    fn hit(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.left.fetch_sub(1, SeqCst) == 0 {
            return Err(std::io::Error::from_raw_os_error(libc_eio()));
        }
        Ok(())
    }
}

fn libc_eio() -> i32 {
    5
}

impl Storage for FailNth {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.hit()?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.hit()?;
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.allocate(offset, len)
    }
}

/// A snapshot create or delete that fails half done (an I/O error in the
/// middle of its refcount and COPIED-flag walk) must not leave a clean
/// image with the half-done change: close keeps the dirty bit (rule 5) so
/// that the next open repairs it. Every read or write of the operation is
/// failed in turn (with 4 KiB clusters and a small L2 cache, the walk
/// reads tables as it goes).
#[test]
fn failed_snapshot_change_keeps_the_dirty_bit() {
    let mut o = opts(8 * M, 4 * K, false);
    o.size = 8 * M;
    let base = {
        let mem = Arc::new(MemStorage::new());
        let s: Arc<dyn Storage> = mem.clone();
        let p = Path::new("fail.qcow2");
        create_on(s.clone(), p, &o).unwrap();
        let img = Qcow2::open_storage(s, p, &rw_opts()).unwrap();
        for i in 0..6 {
            w(&img, 1 + i, i * 2 * M / 2 + 100 * K, 12 * K);
        }
        img.snapshot_create("old").unwrap();
        w(&img, 20, 100 * K, 4 * K);
        img.close().unwrap();
        mem.bytes()
    };
    let small_cache = OpenOptions {
        writable: true,
        l2_cache_size: Some(4 * K),
        ..Default::default()
    };
    let mut bad = Vec::new();
    let mut failed = 0;
    for delete in [false, true] {
        for n in 0..400 {
            let f = Arc::new(FailNth {
                inner: MemStorage::from_bytes(base.clone()),
                left: std::sync::atomic::AtomicI64::new(i64::MAX),
            });
            let s: Arc<dyn Storage> = f.clone();
            let img = Qcow2::open_storage(s, Path::new("fail.qcow2"), &small_cache).unwrap();
            f.left.store(n, std::sync::atomic::Ordering::SeqCst);
            let r = if delete {
                img.snapshot_delete("old")
            } else {
                img.snapshot_create("s1")
            };
            f.left.store(i64::MAX, std::sync::atomic::Ordering::SeqCst);
            if r.is_ok() {
                continue;
            }
            failed += 1;
            let _ = img.close();
            drop(img);
            if let Some((c, report)) = corruptions_if_clean(f.inner.bytes()) {
                if c > 0 {
                    bad.push(format!("delete={delete} n={n}: {report}"));
                }
            }
        }
    }
    assert!(failed > 10, "only {failed} failures injected");
    assert!(
        bad.is_empty(),
        "clean but corrupt after a failed snapshot change:\n{}",
        bad.join("\n")
    );
}
