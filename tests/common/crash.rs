//! Crash-simulation machinery shared by the crash sweeps
//! (`tests/crash_sweep.rs`, `tests/crash_ops.rs`): which crash states to
//! try at a cut point, sampling them, the header flags of a crashed image,
//! and capturing the library's warnings (repair lines) per thread.

use super::Rng;
use oxqcow::storage::{CrashSpec, CrashStorage, Keep, Replay};
use std::cell::RefCell;

thread_local! {
    /// Warnings the library printed on this thread (repair lines).
    static LOG: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

pub fn install_log_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        oxqcow::log::set_hook(Some(Box::new(|m: &str| {
            LOG.with(|l| {
                let mut l = l.borrow_mut();
                if l.len() < 50 {
                    l.push(m.to_string());
                }
            })
        })));
    });
}

pub fn take_log() -> Vec<String> {
    LOG.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

pub const INCOMPAT_DIRTY: u64 = 1;
pub const INCOMPAT_CORRUPT: u64 = 2;

pub fn incompat(image: &[u8]) -> u64 {
    u64::from_be_bytes(image[72..80].try_into().unwrap())
}

/// The crash states tried at one cut point: all and none of the pending
/// operations, each single one lost (all of them when few are pending),
/// random subsets, a prefix (in-order write-back), and torn writes.
pub fn specs_at(r: &Replay, seed: u64) -> Vec<(&'static str, CrashSpec)> {
    let p = r.pending();
    let mut v = vec![("all", CrashSpec::all())];
    if p == 0 {
        return v;
    }
    v.push(("none", CrashSpec::none()));
    if p >= 2 {
        let mut rng = Rng(seed | 1);
        let singles: Vec<usize> = if p <= 8 {
            (0..p).collect()
        } else {
            (0..4).map(|_| rng.below(p as u64) as usize).collect()
        };
        for lost in singles {
            v.push((
                "one-lost",
                CrashSpec {
                    keep: Keep::Mask((0..p).map(|i| i != lost).collect()),
                    tear: None,
                },
            ));
        }
        for _ in 0..3 {
            v.push(("random", CrashSpec::random(rng.next())));
        }
        let k = 1 + rng.below(p as u64 - 1) as usize;
        v.push((
            "prefix",
            CrashSpec {
                keep: Keep::Mask((0..p).map(|i| i < k).collect()),
                tear: None,
            },
        ));
    }
    if r.tearable() > 0 {
        v.push((
            "torn",
            CrashSpec {
                keep: Keep::All,
                tear: Some(seed ^ 0xabcd),
            },
        ));
        v.push(("torn-random", CrashSpec::torn(seed ^ 0x1234)));
        v.push(("torn-random", CrashSpec::torn(seed ^ 0x4321)));
    }
    v
}

/// Every crash state of a trace (each cut point with [`specs_at`]'s
/// states), sampled down to about `max` when there are more: the last
/// state (the cut at the end) is always kept, the rest evenly spread.
/// Returns the states, how many there were in all, and the cut points.
pub fn sampled_states(
    storage: &CrashStorage,
    salt: u64,
    max: usize,
) -> (Vec<(usize, &'static str, CrashSpec)>, usize, usize) {
    let n = storage.trace_len();
    let mut replay = storage.replay();
    let mut states = Vec::new();
    for cut in 0..=n {
        replay.seek(cut);
        for (kind, spec) in specs_at(&replay, ((cut as u64 + 1) * 0x9e37_79b9) ^ salt) {
            states.push((cut, kind, spec));
        }
    }
    let total = states.len();
    if states.len() > max {
        let step = states.len() as f64 / max as f64;
        let last = states.len() - 1;
        states = (0..max)
            .map(|i| ((i as f64 * step) as usize).min(last))
            .chain(std::iter::once(last))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|i| states[i].clone())
            .collect();
    }
    (states, total, n + 1)
}

/// Records a failed crash state: `what` (the cut, the state and the
/// error) with the library's warnings for it, and for the first failure
/// of a sweep the crashed image kept under `$OXQCOW_CRASH_KEEP` as
/// `crash-NAME-PID.qcow2` (image building is deterministic, so it is the
/// same state again).
pub fn record_failure(failures: &mut Vec<String>, what: String, name: &str, image: &[u8]) {
    let log = take_log();
    let log = if log.is_empty() {
        String::new()
    } else {
        format!("\n    log: {}", log.join("\n    log: "))
    };
    failures.push(format!("{what}{log}"));
    if let (1, Some(dir)) = (failures.len(), std::env::var_os("OXQCOW_CRASH_KEEP")) {
        let keep = std::path::PathBuf::from(dir)
            .join(format!("crash-{name}-{}.qcow2", std::process::id()));
        let _ = std::fs::write(&keep, image);
        failures.push(format!("    crashed image kept at {}", keep.display()));
    }
}
