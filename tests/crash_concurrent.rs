//! Power cuts while several threads write at once in writethrough mode.
//!
//! The group-committed flush may run its sync without the metadata lock
//! (lazy refcounts, L2 entries over never-written clusters), so other
//! requests plan, write and link while the disk syncs. What must hold at
//! every cut: a write whose call returned before the cut's last sync is
//! read back whole after the repairing open, and the repaired image has no
//! corruption. The trace is the one the threads really produced; the
//! cuts replay it at every sync with nothing pending kept, with
//! everything kept, and with random subsets torn per sector.

mod common;
use common::Scratch;
use oxqcow::engine::{create_on, Qcow2};
use oxqcow::storage::{CrashSpec, CrashStorage, MemStorage, Storage, TraceEvent};
use oxqcow::{CreateOptions, OpenOptions};
use std::sync::{Arc, Mutex};

const CS: u64 = 65536;
const THREADS: u64 = 4;
const PER_THREAD: u64 = 24;

fn fill(id: u64, len: u64) -> Vec<u8> {
    (0..len).map(|i| (id * 31 + i / 512) as u8 | 1).collect()
}

/// (trace length when the write returned, guest offset, id)
type Returned = (usize, u64, u64);

/// `writethrough` false: write-back, each write followed by a flush of its
/// own (how NBD FUA and C callers pairing write and flush behave; the
/// engine then takes the writethrough allocation path).
fn run_threads(lazy: bool, writethrough: bool) -> (Arc<CrashStorage>, Vec<u8>, Vec<Returned>) {
    let d = Scratch::new(&format!("crash-concurrent-{lazy}-{writethrough}"));
    let path = d.path("c.qcow2");
    let o = CreateOptions {
        size: 64 << 20,
        lazy_refcounts: lazy,
        ..Default::default()
    };
    let storage = Arc::new(CrashStorage::new());
    let s: Arc<dyn Storage> = storage.clone();
    create_on(s.clone(), &path, &o).unwrap();
    s.sync().unwrap();
    let base = storage.bytes();
    storage.restart_trace();
    let opts = OpenOptions {
        writable: true,
        writethrough,
        ..Default::default()
    };
    let img = Qcow2::open_storage(s, &path, &opts).unwrap();
    let returned = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for t in 0..THREADS {
            let (img, storage, returned) = (&img, &storage, &returned);
            sc.spawn(move || {
                for i in 0..PER_THREAD {
                    let id = t * PER_THREAD + i + 1;
                    // Interleaved clusters, some writes spanning two.
                    let off =
                        (i * THREADS + t) * CS + if id.is_multiple_of(3) { CS / 2 } else { 0 };
                    img.write_at(&fill(id, CS), off).unwrap();
                    if !writethrough {
                        img.flush().unwrap();
                    }
                    let at = storage.trace_len();
                    returned.lock().unwrap().push((at, off, id));
                }
            });
        }
    });
    drop(img); // no close: the run ends in a power cut
    (storage, base, returned.into_inner().unwrap())
}

fn check_cuts(lazy: bool, writethrough: bool) {
    let (storage, _base, returned) = run_threads(lazy, writethrough);
    let trace = storage.trace();
    // Cut just before each sync (what it would have made durable is
    // still pending) and just after it, and at the end of the trace.
    let mut cuts: Vec<usize> = trace
        .iter()
        .enumerate()
        .filter(|(_, e)| **e == TraceEvent::Sync)
        .flat_map(|(i, _)| [i, i + 1])
        .collect();
    cuts.push(trace.len());
    assert!(cuts.len() > 8, "too few syncs traced: {}", cuts.len());
    let specs = [CrashSpec::none(), CrashSpec::all(), CrashSpec::torn(7)];
    let mut checked = 0;
    for (k, &cut) in cuts.iter().enumerate() {
        for (si, spec) in specs.iter().enumerate() {
            if si == 2 && k % 3 != 0 {
                continue;
            }
            let image = storage.crash_image(cut, spec);
            let mem: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image));
            let opts = OpenOptions {
                writable: true,
                ..Default::default()
            };
            let img = Qcow2::open_storage(mem, std::path::Path::new("cut.qcow2"), &opts)
                .unwrap_or_else(|e| panic!("lazy={lazy} cut {cut}: open failed: {e}"));
            let r = img.check(0, &mut |_| {}).unwrap();
            assert_eq!(r.corruptions, 0, "lazy={lazy} cut {cut} spec {si}: corrupt");
            // A write that returned by the cut had its sync in the trace
            // before the cut, so it is durable. A
            // later write may overlap one of them: only the newest write
            // covering a byte that returned by the cut is required.
            let mut buf = vec![0u8; CS as usize];
            for &(at, off, id) in returned.iter().filter(|r| r.0 <= cut) {
                let overlapped = returned
                    .iter()
                    .any(|&(_, o2, id2)| id2 != id && o2 < off + CS && off < o2 + CS);
                if overlapped {
                    continue;
                }
                img.read_at(&mut buf, off).unwrap();
                assert!(
                    buf == fill(id, CS),
                    "lazy={lazy} cut {cut} spec {si}: write {id} at {off:#x} (returned at {at}) lost"
                );
                checked += 1;
            }
            img.close().unwrap();
        }
    }
    assert!(checked > 100, "too few durable writes checked: {checked}");
}

#[test]
fn concurrent_writethrough_lazy_survives_power_cuts() {
    check_cuts(true, true);
}

#[test]
fn concurrent_write_and_flush_lazy_survives_power_cuts() {
    check_cuts(true, false);
}

#[test]
fn concurrent_writethrough_survives_power_cuts() {
    check_cuts(false, true);
}
