//! The fuzz campaign driver: damaged qcow2 images through the Rust API,
//! the C ABI and the `oxqcow` tool, for as long as asked. See README
//! ("Fuzzing hostile images"). Usage:
//!
//! `cargo run --release --example fuzz -- [--seconds N] [--cases N]
//! [--seed S] [--case N] [--kinds a,b] [--drivers api-ro,api-rw,capi,cli]
//! [--qemu-check] [--dir DIR] [--hang SECS] [-v]`
//!
//! Exits 1 when something was found (each finding names its case number
//! and keeps the mutant under DIR/found).

#[path = "../tests/fuzz/mod.rs"]
mod fuzz;

use fuzz::{Config, Driver};
use std::path::PathBuf;
use std::time::Duration;

fn main() {
    let bin = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(|d| d.join("oxqcow")))
        .filter(|p| p.exists());
    let mut cfg = Config {
        seed: 1,
        cases: u64::MAX,
        duration: Duration::from_secs(60),
        kinds: vec![],
        drivers: vec![],
        bin,
        qemu_check: false,
        dir: std::env::temp_dir().join("oxqcow-fuzz"),
        only: None,
        hang: Duration::from_secs(20),
        verbose: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--seconds" => cfg.duration = Duration::from_secs(val().parse().unwrap()),
            "--cases" => cfg.cases = val().parse().unwrap(),
            "--seed" => cfg.seed = val().parse().unwrap(),
            "--case" => cfg.only = Some(val().parse().unwrap()),
            "--kinds" => cfg.kinds = val().split(',').map(String::from).collect(),
            "--drivers" => {
                cfg.drivers = val()
                    .split(',')
                    .map(|d| match d {
                        "api-ro" => Driver::ApiRo,
                        "api-rw" => Driver::ApiRw,
                        "capi" => Driver::Capi,
                        "cli" => Driver::Cli,
                        _ => panic!("unknown driver {d}"),
                    })
                    .collect()
            }
            "--qemu-check" => cfg.qemu_check = true,
            "--dir" => cfg.dir = PathBuf::from(val()),
            "--hang" => cfg.hang = Duration::from_secs(val().parse().unwrap()),
            "--bin" => cfg.bin = Some(PathBuf::from(val())),
            "-v" => cfg.verbose = true,
            _ => {
                eprintln!("unknown argument {a}; see examples/fuzz.rs");
                std::process::exit(2);
            }
        }
    }
    if cfg.only.is_some() {
        cfg.duration = Duration::MAX;
        cfg.verbose = true;
    }
    let r = fuzz::run(&cfg);
    println!(
        "fuzz: seed {} ran {} cases in {:.0} s (api-ro {}, api-rw {}, capi {}, cli {}): {} findings",
        cfg.seed,
        r.cases,
        r.elapsed.as_secs_f64(),
        r.per_driver[0],
        r.per_driver[1],
        r.per_driver[2],
        r.per_driver[3],
        r.findings.len()
    );
    for f in &r.findings {
        println!(
            "  case {} ({}): {} [{}] -> {}",
            f.case,
            f.seed,
            f.problem.lines().next().unwrap_or(""),
            f.mutation,
            f.kept.display()
        );
    }
    std::process::exit(if r.findings.is_empty() { 0 } else { 1 });
}
