//! A structured fuzzer for hostile and truncated qcow2 images, shared by
//! the bounded test (`tests/hostile_fuzz.rs`) and the campaign driver
//! (`examples/fuzz.rs`, `make fuzz`). Seeds cover every on-disk structure
//! ([`seeds`]); each case copies one, damages it ([`mutate`]) and drives
//! it through the Rust API, the C ABI or the tool ([`exec`]). Found: a
//! panic (in process, or "panicked at" / exit 101 / a signal from the
//! tool, or the C ABI's panic guard), a hang (a watchdog in process, a
//! timeout for the tool), a read-only path that changed a byte of the
//! image or of a file it refers to, and (with `qemu_check`) a read-write
//! sequence after which `qemu-img check` counts more corruptions than
//! before. Every case follows from (seed, case number): the same seed
//! images and the same numbers give the same mutants.
#![allow(dead_code)]

pub mod exec;
pub mod mutate;
pub mod seeds;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// splitmix64: small, fast, deterministic.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// Which drivers a case may use.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Driver {
    ApiRo,
    ApiRw,
    Capi,
    Cli,
}

pub struct Config {
    pub seed: u64,
    /// Stop after this many cases...
    pub cases: u64,
    /// ...or after this long.
    pub duration: Duration,
    /// Only seeds whose name contains one of these (all when empty).
    pub kinds: Vec<String>,
    /// Only these drivers (all when empty).
    pub drivers: Vec<Driver>,
    /// The oxqcow binary (no CLI cases without it).
    pub bin: Option<PathBuf>,
    /// Compare `qemu-img check` before and after read-write cases.
    pub qemu_check: bool,
    /// Where seeds, cases and kept mutants live.
    pub dir: PathBuf,
    /// Run only this case number.
    pub only: Option<u64>,
    /// Limit for one case in process (the watchdog ends the process).
    pub hang: Duration,
    pub verbose: bool,
}

/// One problem found.
pub struct Finding {
    pub case: u64,
    pub seed: &'static str,
    pub mutation: String,
    pub problem: String,
    /// A copy of the mutant.
    pub kept: PathBuf,
}

pub struct Report {
    pub cases: u64,
    /// Cases per seed name.
    pub per_seed: Vec<(&'static str, u64)>,
    pub per_driver: [u64; 4],
    pub findings: Vec<Finding>,
    pub elapsed: Duration,
}

static PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Records the first panic's place and text for the report instead of
/// printing it (the campaign catches it only to name the case).
fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = format!(
            "panicked at {}: {}",
            info.location().map(|l| l.to_string()).unwrap_or_default(),
            info.payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default()
        );
        let mut p = PANIC.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none() {
            *p = Some(msg);
        }
    }));
}

fn hash_file(p: &Path) -> Option<Vec<u8>> {
    std::fs::read(p).ok()
}

/// `qemu-img check`'s corruption count, or None if it cannot check.
fn qemu_corruptions(path: &Path, seed: &seeds::Seed) -> Option<u64> {
    let mut a = vec!["check".to_string(), "--output=json".into()];
    if let Some(pw) = seed.secret {
        a.push("--object".into());
        a.push(format!("secret,id=sec0,data={pw}"));
        a.push("--image-opts".into());
        a.push(format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
            path.display()
        ));
    } else {
        a.extend(["-f".into(), "qcow2".into(), path.display().to_string()]);
    }
    let out = std::process::Command::new("qemu-img")
        .args(&a)
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout);
    if !s.contains("\"check-errors\"") {
        return None;
    }
    // qemu-img leaves the count out when it is 0.
    let Some(i) = s.find("\"corruptions\":") else {
        return Some(0);
    };
    let rest = s[i + 14..].trim_start();
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

pub fn run(cfg: &Config) -> Report {
    install_hook();
    // The library's repair and corruption lines would drown the report.
    if !cfg.verbose {
        oxqcow::log::set_hook(Some(Box::new(|_| {})));
    }
    let seed_dir = cfg.dir.join("seeds");
    let work = cfg.dir.join("work");
    let keep = cfg.dir.join("found");
    std::fs::create_dir_all(&keep).unwrap();
    let mut all = seeds::build_all(&seed_dir, &work);
    if !cfg.kinds.is_empty() {
        all.retain(|s| cfg.kinds.iter().any(|k| s.name.contains(k.as_str())));
    }
    assert!(!all.is_empty(), "no seed matches {:?}", cfg.kinds);
    let layouts: Vec<(Vec<u8>, mutate::Layout)> = all
        .iter()
        .map(|s| {
            let b = std::fs::read(&s.image).unwrap();
            let l = mutate::Layout::parse(&b);
            (b, l)
        })
        .collect();
    let shared_before: Vec<Vec<Option<Vec<u8>>>> = all
        .iter()
        .map(|s| s.shared.iter().map(|p| hash_file(p)).collect())
        .collect();
    let mut drivers = vec![Driver::ApiRo, Driver::ApiRw, Driver::Capi];
    if cfg.bin.is_some() {
        drivers.push(Driver::Cli);
    }
    if !cfg.drivers.is_empty() {
        drivers.retain(|d| cfg.drivers.contains(d));
    }
    // The watchdog: a case in process that runs too long ends the process.
    let current = Arc::new(Mutex::new(String::new()));
    let started = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    {
        // `deadline` is in ms since t0 (0: no case running); a tool case
        // gets twice the limit, its own timeout being the limit.
        let (current, deadline, hang) = (current.clone(), started.clone(), cfg.hang);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            let d = deadline.load(Ordering::SeqCst);
            if d != 0 && t0.elapsed().as_millis() as u64 > d {
                eprintln!("FUZZ HANG (over {hang:?}): {}", current.lock().unwrap());
                std::process::exit(3);
            }
        });
    }
    let img = work.join("case.qcow2");
    let mut report = Report {
        cases: 0,
        per_seed: all.iter().map(|s| (s.name, 0)).collect(),
        per_driver: [0; 4],
        findings: vec![],
        elapsed: Duration::ZERO,
    };
    let mut case = cfg.only.unwrap_or(0);
    loop {
        if cfg.only.is_some_and(|o| o != case)
            || report.cases >= cfg.cases
            || t0.elapsed() >= cfg.duration
        {
            break;
        }
        let mut rng = Rng(cfg.seed ^ case.wrapping_mul(0x2545_f491_4f6c_dd1d));
        // Every seed and driver in turn, so that a short run covers them all.
        let si = (case % all.len() as u64) as usize;
        let seed = &all[si];
        let (good, layout) = &layouts[si];
        let driver = drivers[((case / all.len() as u64) % drivers.len() as u64) as usize];
        let mut b = good.clone();
        let mutation = layout.mutate(&mut b, &mut rng);
        std::fs::write(&img, &b).unwrap();
        if cfg.only.is_some() {
            // A replay keeps the mutant as it was before the operations.
            std::fs::write(cfg.dir.join("mutant.qcow2"), &b).unwrap();
        }
        for (from, to) in &seed.aux {
            std::fs::copy(from, to).unwrap();
        }
        let aux_before: Vec<_> = seed.aux.iter().map(|(_, to)| hash_file(to)).collect();
        let label = format!(
            "case {case} seed {} driver {driver:?}: {mutation}",
            seed.name
        );
        if cfg.verbose {
            eprintln!("{label}");
        }
        *current.lock().unwrap() = label.clone();
        let mut problems = Vec::new();
        let before = if cfg.qemu_check && driver != Driver::ApiRo {
            qemu_corruptions(&img, seed)
        } else {
            None
        };
        let limit = cfg.hang.as_millis() as u64 * if driver == Driver::Cli { 2 } else { 1 };
        started.store(
            t0.elapsed().as_millis() as u64 + limit + 1,
            Ordering::SeqCst,
        );
        let mut ro = driver == Driver::ApiRo;
        let mut rw_ok = false;
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match driver {
            Driver::ApiRo => exec::api_ro(&img, seed, &mut rng),
            Driver::ApiRw => {
                let (log, ok) = exec::api_rw(&img, seed, &mut rng);
                rw_ok = ok;
                log
            }
            Driver::Capi => exec::capi(&img, &mut rng),
            Driver::Cli => {
                let r = exec::cli(
                    cfg.bin.as_ref().unwrap(),
                    &img,
                    seed,
                    &work,
                    &mut rng,
                    cfg.hang,
                );
                ro = r.read_only;
                let mut p = Vec::new();
                if r.timed_out {
                    p.push("hang (timeout)".to_string());
                } else if r.code.is_none() {
                    p.push("killed by a signal".to_string());
                } else if r.code == Some(101) {
                    p.push("exit code 101".to_string());
                }
                if r.stderr.contains("panicked at") {
                    p.push("panicked".to_string());
                }
                if !p.is_empty() {
                    format!(
                        "PROBLEM {} in `oxqcow {}`: {}",
                        p.join(", "),
                        r.args.join(" "),
                        r.stderr.trim()
                    )
                } else {
                    format!("oxqcow {} -> {:?}", r.args.join(" "), r.code)
                }
            }
        }));
        started.store(0, Ordering::SeqCst);
        match &res {
            Err(_) => {
                let msg = PANIC
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or_default();
                problems.push(format!("panic: {msg}"));
            }
            Ok(log) => {
                if cfg.verbose {
                    eprintln!("  {log}");
                }
                if let Some(i) = log.find("PROBLEM") {
                    problems.push(log[i..].to_string());
                }
                if log.contains("internal error in") {
                    problems.push(format!("C ABI panic guard: {log}"));
                }
            }
        }
        if ro {
            if std::fs::read(&img).ok().as_deref() != Some(&b[..]) {
                problems.push("read-only path changed the image".into());
            }
            for (i, (_, to)) in seed.aux.iter().enumerate() {
                if hash_file(to) != aux_before[i] {
                    problems.push(format!("read-only path changed {}", to.display()));
                }
            }
        } else if let Some(n) = before {
            match qemu_corruptions(&img, seed) {
                Some(m) if m > n => problems.push(format!(
                    "qemu-img check: {n} corruptions before, {m} after (all operations ok: {rw_ok}): {}",
                    res.as_ref().map(|s| s.as_str()).unwrap_or("")
                )),
                None => problems.push(format!("qemu-img check could check it before ({n}), not after")),
                _ => {}
            }
        }
        for (i, p) in seed.shared.iter().enumerate() {
            if hash_file(p) != shared_before[si][i] {
                problems.push(format!("a backing file changed: {}", p.display()));
            }
        }
        for problem in problems {
            let kept = keep.join(format!("case-{case}-{}.qcow2", seed.name));
            let _ = std::fs::write(&kept, &b);
            eprintln!(
                "FUZZ FINDING {label}\n    {problem}\n    mutant kept as {}",
                kept.display()
            );
            report.findings.push(Finding {
                case,
                seed: seed.name,
                mutation: mutation.clone(),
                problem,
                kept,
            });
        }
        report.cases += 1;
        report.per_driver[driver as usize] += 1;
        report.per_seed[si].1 += 1;
        case += 1;
    }
    report.elapsed = t0.elapsed();
    report
}
