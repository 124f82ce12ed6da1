//! The bounded, deterministic fuzz run: a fixed number of damaged images
//! made from every seed kind (snapshots with VM state, bitmaps, zlib and
//! zstd clusters, extended L2, data files, backing files plain and json:,
//! LUKS, unknown extensions, v2, 512 B and 2 MiB clusters, 1- and 64-bit
//! refcounts), each through the Rust API read-only and read-write, the C
//! ABI and the tool. No panic, no hang, no write on a read-only path.
//! The long campaign is `examples/fuzz.rs` (README, "Fuzzing").

mod common;
#[path = "fuzz/mod.rs"]
mod fuzz;

use std::time::Duration;

#[test]
fn structured_fuzz_finds_nothing() {
    let d = common::Scratch::new("hostile-fuzz");
    let cfg = fuzz::Config {
        seed: 20261127,
        cases: 1200,
        duration: Duration::MAX,
        kinds: vec![],
        drivers: vec![],
        bin: Some(common::case::BIN.into()),
        qemu_check: false,
        dir: d.0.clone(),
        only: None,
        hang: Duration::from_secs(30),
        verbose: false,
    };
    let r = fuzz::run(&cfg);
    for (name, n) in &r.per_seed {
        assert!(*n >= 50, "seed {name} ran only {n} cases");
    }
    assert!(r.per_driver.iter().all(|&n| n >= 250), "{:?}", r.per_driver);
    let found: Vec<String> = r
        .findings
        .iter()
        .map(|f| {
            format!(
                "case {} ({}): {} [{}]",
                f.case, f.seed, f.problem, f.mutation
            )
        })
        .collect();
    assert!(found.is_empty(), "{}", found.join("\n"));
}
