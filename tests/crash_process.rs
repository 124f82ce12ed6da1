//! Real-process crashes.
//!
//! 1. An oxqcow writer process (this test binary, started again in writer
//!    mode) writes patterned generations to a lazy-refcounts image, with a
//!    flush after each. It is killed with SIGKILL at a random moment. Then
//!    QEMU (`qemu-img check -r all`) repairs one copy of the image and
//!    oxqcow (a read-write open) repairs another. Both copies pass
//!    `qemu-img check`, `qemu-img compare` finds them equal, and every
//!    generation the writer reported durable reads back.
//! 2. The reverse: qemu-io writes with lazy refcounts and kills itself
//!    (`sigraise 9`). oxqcow's read-write open repairs the dirty image.

mod common;
use common::*;
use oxqcow::engine::{OpenOptions, Qcow2};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WRITER_ENV: &str = "OXQCOW_CRASH_WRITER";
const WRITER_MODE_ENV: &str = "OXQCOW_CRASH_WRITER_MODE";
const K: u64 = 1024;
const M: u64 = 1024 * 1024;
const IMAGE_SIZE: u64 = 64 * M;
/// Generations the writer writes at most (then it waits to be killed).
const MAX_GENERATIONS: u64 = 600;
/// The block every generation overwrites.
const LATEST: (u64, u64) = (0, 4 * K);

/// The region generation `g` (1-based) allocates: unaligned, crossing
/// cluster boundaries, never overlapping another generation's.
fn region(g: u64) -> (u64, u64) {
    (64 * K + g * 96 * K + (g % 5) * 333, 40 * K + (g % 7) * 1000)
}

fn pattern_byte(g: u64, pos: u64) -> u8 {
    let h = pos
        .wrapping_mul(31)
        .wrapping_add(pos >> 9)
        .wrapping_add(g.wrapping_mul(0x9e37));
    (h % 251) as u8 + 1
}

fn pattern(g: u64, off: u64, len: u64) -> Vec<u8> {
    (off..off + len).map(|p| pattern_byte(g, p)).collect()
}

thread_local! {
    /// Warnings the library printed on this thread (repair lines).
    static LOG: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Routes the library's warnings to the calling thread's LOG.
fn install_log_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        oxqcow::log::set_hook(Some(Box::new(|m: &str| {
            LOG.with(|l| l.borrow_mut().push(m.to_string()))
        })));
    });
}

fn take_log() -> Vec<String> {
    LOG.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

/// Opens an image read-write with oxqcow (repairing it if dirty), checks
/// that the open printed QEMU-style repair lines and left the image clean,
/// and closes it.
fn repair_with_oxqcow(path: &Path) {
    install_log_hook();
    take_log();
    let img = Qcow2::open(
        path,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("oxqcow could not open the dirty image read-write: {e}"));
    let lines = take_log();
    assert!(!img.is_dirty(), "still dirty after the read-write open");
    assert!(
        lines.iter().any(|l| l.starts_with("Repairing")),
        "the open printed no repair lines: {lines:?}"
    );
    img.close().unwrap();
    drop(img);
    assert_eq!(
        incompat(path) & 3,
        0,
        "dirty or corrupt bit left after oxqcow's repair"
    );
}

fn incompat(path: &Path) -> u64 {
    let b = std::fs::read(path).unwrap();
    u64::from_be_bytes(b[72..80].try_into().unwrap())
}

/// The writer's main loop. Not a test by itself: without the environment
/// variable it returns at once. `writer_killed_by_sigkill_*` starts this
/// binary with the variable set.
#[test]
fn writer_process_helper() {
    let Some(path) = std::env::var_os(WRITER_ENV) else {
        return;
    };
    let writethrough = std::env::var(WRITER_MODE_ENV).as_deref() == Ok("writethrough");
    let img = Qcow2::open(
        Path::new(&path),
        &OpenOptions {
            writable: true,
            lazy_refcounts: Some(true),
            writethrough,
            ..Default::default()
        },
    )
    .unwrap();
    let mut out = std::io::stdout();
    for g in 1..=MAX_GENERATIONS {
        let (off, len) = region(g);
        img.write_at(&pattern(g, off, len), off).unwrap();
        img.write_at(&pattern(g, LATEST.0, LATEST.1), LATEST.0)
            .unwrap();
        img.flush().unwrap();
        writeln!(out, "DURABLE {g}").unwrap();
        out.flush().unwrap();
    }
    // Never closes: the parent kills this process.
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Per-run randomness: from the clock, printed so that a failure can be
/// replayed with OXQCOW_CRASH_SEED.
fn seed() -> u64 {
    std::env::var("OXQCOW_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

/// Starts the writer on `path`, kills it with SIGKILL `delay` after its
/// first durable generation, and returns the last generation it reported
/// durable.
fn run_and_kill(path: &Path, writethrough: bool, delay: Duration) -> u64 {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "writer_process_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WRITER_ENV, path)
        .env(
            WRITER_MODE_ENV,
            if writethrough {
                "writethrough"
            } else {
                "writeback"
            },
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(g) = line.strip_prefix("DURABLE ") {
                let _ = tx.send(g.trim().parse::<u64>().unwrap());
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(60));
    if first.is_err() {
        let _ = child.kill();
        panic!("the writer reported nothing durable within 60 s");
    }
    std::thread::sleep(delay);
    // Child::kill sends SIGKILL on Unix.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the writer ended by itself ({status}) instead of being killed"
    );
    reader.join().unwrap();
    rx.try_iter().last().unwrap_or(first.unwrap()).max(1)
}

/// Checks the guest view after a crash: generations 1..=durable present,
/// generation durable+1 (in flight) partly or not at all, nothing else.
fn check_generations(view: &[u8], durable: u64, who: &str) {
    assert_eq!(view.len() as u64, IMAGE_SIZE, "{who}: guest size");
    let mut expect = vec![0u8; view.len()];
    for g in 1..=durable {
        let (off, len) = region(g);
        expect[off as usize..(off + len) as usize].copy_from_slice(&pattern(g, off, len));
    }
    expect[..LATEST.1 as usize].copy_from_slice(&pattern(durable, LATEST.0, LATEST.1));
    let next = durable + 1;
    let in_flight = [region(next), LATEST];
    for (i, (&got, &want)) in view.iter().zip(&expect).enumerate() {
        if got == want {
            continue;
        }
        let p = i as u64;
        let maybe = in_flight
            .iter()
            .any(|&(o, l)| p >= o && p < o + l && got == pattern_byte(next, p));
        assert!(
            maybe,
            "{who}: guest byte {i:#x} is {got:#04x}, expected {want:#04x} (last durable generation {durable})"
        );
    }
}

fn writer_killed(writethrough: bool) {
    let seed = seed();
    let mut rng = Rng(seed);
    let d = Scratch::new(if writethrough {
        "kill-writethrough"
    } else {
        "kill-writeback"
    });
    for round in 0..3 {
        let img = d.path("img.qcow2");
        let s = img.display().to_string();
        let _ = std::fs::remove_file(&img);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            &s,
            &IMAGE_SIZE.to_string(),
        ]);
        let delay = Duration::from_millis(20 + rng.below(400));
        let t = Instant::now();
        let durable = run_and_kill(&img, writethrough, delay);
        eprintln!(
            "crash_process: seed {seed} round {round}: writer ({}) killed after {delay:?} (ran {:?}), generation {durable} durable",
            if writethrough { "writethrough" } else { "writeback" },
            t.elapsed()
        );

        // The killed writer left the image dirty, with refcounts behind.
        assert_ne!(
            incompat(&img) & 1,
            0,
            "the killed writer left a clean image"
        );
        let (code, out, err) = run("qemu-img", &["check", "-f", "qcow2", &s]);
        assert_eq!(
            code, 2,
            "qemu-img check on the dirty image: expected errors, got exit {code}: {out}{err}"
        );
        assert!(out.contains("errors were found"), "{out}{err}");
        assert!(err.contains("ERROR cluster"), "{out}{err}");

        // QEMU repairs one copy, oxqcow another.
        let by_qemu = d.path("by-qemu.qcow2");
        let by_ours = d.path("by-oxqcow.qcow2");
        std::fs::copy(&img, &by_qemu).unwrap();
        std::fs::copy(&img, &by_ours).unwrap();
        let q = by_qemu.display().to_string();
        let (code, out, err) = run("qemu-img", &["check", "-r", "all", "-f", "qcow2", &q]);
        assert_eq!(code, 0, "qemu-img check -r all: {out}{err}");
        repair_with_oxqcow(&by_ours);
        assert_eq!(
            incompat(&by_qemu) & 3,
            0,
            "dirty or corrupt after QEMU's repair"
        );
        assert_clean(&by_qemu);
        assert_clean(&by_ours);
        let (code, out, err) = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                &q,
                &by_ours.display().to_string(),
            ],
        );
        assert_eq!(code, 0, "the repaired copies differ: {out}{err}");
        check_generations(
            &read_all_qemu(&by_qemu, &d),
            durable,
            "QEMU-repaired, read by QEMU",
        );
        check_generations(
            &read_all_ours(&by_ours),
            durable,
            "oxqcow-repaired, read by oxqcow",
        );
        check_generations(
            &read_all_ours(&by_qemu),
            durable,
            "QEMU-repaired, read by oxqcow",
        );
    }
}

#[test]
fn writer_killed_by_sigkill_writeback() {
    writer_killed(false);
}

#[test]
fn writer_killed_by_sigkill_writethrough() {
    writer_killed(true);
}

/// QEMU dies with the image dirty (qemu-iotests 039's recipe); oxqcow's
/// read-write open repairs it.
#[test]
fn qemu_io_killed_oxqcow_repairs() {
    let d = Scratch::new("qemu-io-kill");
    let img = d.path("img.qcow2");
    let s = img.display().to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        &s,
        "64M",
    ]);
    let (code, out, err) = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 1M 100k",
            "-c",
            "sigraise 9",
            &s,
        ],
    );
    assert_eq!(
        code, -1,
        "qemu-io was expected to die by SIGKILL: {out}{err}"
    );
    assert_ne!(incompat(&img) & 1, 0, "qemu-io left the image clean");
    let (code, out, err) = run("qemu-img", &["check", "-f", "qcow2", &s]);
    assert_eq!(code, 2, "expected refcount errors: {out}{err}");

    repair_with_oxqcow(&img);
    assert_clean(&img);

    let mut want = vec![0u8; 64 * M as usize];
    want[..64 * K as usize].fill(1);
    want[M as usize..(M + 100 * K) as usize].fill(2);
    assert!(read_all_ours(&img) == want, "oxqcow reads wrong data");
    assert!(read_all_qemu(&img, &d) == want, "QEMU reads wrong data");
}
