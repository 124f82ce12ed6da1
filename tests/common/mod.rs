//! Helpers shared by the integration tests: scratch directories and the
//! QEMU oracle (qemu-img, qemu-io).
#![allow(dead_code)]

pub mod case;
pub mod crash;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let base = std::env::var("OXQCOW_TEST_DIR")
            .unwrap_or_else(|_| std::env::temp_dir().display().to_string());
        let p = PathBuf::from(base).join(format!(
            "oxqcow-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Open options for a read-write image through the Rust API.
pub fn rw() -> oxqcow::OpenOptions {
    oxqcow::OpenOptions {
        writable: true,
        ..Default::default()
    }
}

/// Creates a qcow2 image through the Rust API from a qemu-img `-o` string.
pub fn create(path: &Path, opts: &str, size: u64) {
    let mut o = oxqcow::CreateOptions::default();
    o.parse_into(opts).unwrap();
    o.size = size;
    oxqcow::engine::create(path, &o).unwrap();
}

/// Runs a command and returns (status code, stdout, stderr).
pub fn run(cmd: &str, args: &[&str]) -> (i32, String, String) {
    case::run_in(Path::new("."), cmd, args)
}

pub fn qemu_img(args: &[&str]) -> String {
    let (code, out, err) = run("qemu-img", args);
    assert_eq!(code, 0, "qemu-img {args:?} failed: {out}{err}");
    out
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Runs the oxqcow tool: (status, stdout, stderr).
pub fn ox(args: &[&str]) -> (i32, String, String) {
    run(case::BIN, args)
}

/// Runs oxqcow and insists on success.
pub fn ox_ok(args: &[&str]) -> String {
    let (code, out, err) = ox(args);
    assert_eq!(code, 0, "oxqcow {args:?} failed: {out}{err}");
    out
}

/// `qemu-img create -q -f qcow2 EXTRA… PATH [SIZE]` (`size` may be
/// empty, with a backing file), insisting on success.
pub fn create_qcow2(path: &Path, size: &str, extra: &[&str]) {
    let p = s(path);
    qemu_img(&case::create_args(&p, size, extra));
}

/// `-f qcow2 -c CMD… FILE`: the arguments of qemu-io and `oxqcow io`.
fn io_args(file: &Path, cmds: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    args.push(s(file));
    args
}

/// Runs `oxqcow io -f qcow2 -c CMD… FILE`: (status, stdout, stderr).
pub fn ox_io(file: &Path, cmds: &[&str]) -> (i32, String, String) {
    let args = io_args(file, cmds);
    let mut a = vec!["io"];
    a.extend(args.iter().map(String::as_str));
    ox(&a)
}

pub fn qemu_io(file: &Path, cmds: &[&str]) {
    let args = io_args(file, cmds);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let (code, out, err) = run("qemu-io", &a);
    assert!(
        code == 0 && !out.contains("failed") && err.is_empty(),
        "qemu-io {cmds:?}: {out}{err}"
    );
}

/// Asserts that `qemu-img check` finds neither errors nor leaks.
pub fn assert_clean(file: &Path) {
    let f = file.display().to_string();
    let (code, out, err) = run("qemu-img", &["check", "-f", "qcow2", &f]);
    assert_eq!(code, 0, "qemu-img check {f}: {out}{err}");
    assert!(out.contains("No errors were found"), "{out}");
}

/// Asserts that QEMU sees the qcow2 image's guest contents equal to a raw file.
pub fn assert_same_as_raw(qcow: &Path, raw: &Path) {
    let (code, out, err) = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            &qcow.display().to_string(),
            &raw.display().to_string(),
        ],
    );
    assert_eq!(code, 0, "qemu-img compare: {out}{err}");
}

/// Deterministic pseudo-random numbers (xorshift64*), so that a failing
/// seed can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Reads the whole guest view of an image through oxqcow.
pub fn read_all_ours(path: &Path) -> Vec<u8> {
    let img = oxqcow::Image::open(path, None, &oxqcow::OpenOptions::default())
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

/// Reads the whole guest view of an image through QEMU (qemu-img convert).
pub fn read_all_qemu(path: &Path, dir: &Scratch) -> Vec<u8> {
    let out = dir.path("qemu-view.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        &path.display().to_string(),
        &out.display().to_string(),
    ]);
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    v
}

/// Asserts that oxqcow and QEMU see the same guest bytes.
pub fn assert_same_view(path: &Path, dir: &Scratch) {
    let ours = read_all_ours(path);
    let theirs = read_all_qemu(path, dir);
    assert_eq!(
        ours.len(),
        theirs.len(),
        "size differs for {}",
        path.display()
    );
    if let Some(i) = (0..ours.len()).find(|&i| ours[i] != theirs[i]) {
        panic!(
            "{}: guest byte {i:#x} differs: ours {:#x} qemu {:#x}",
            path.display(),
            ours[i],
            theirs[i]
        );
    }
}

/// qemu-nbd serving a qcow2 image read-only with its persistent bitmaps
/// (the `x-dirty-bitmap` oracle of the bitmap tests).
/// Starts qemu-nbd on `img` exporting `bitmaps`, runs `f` with the
/// `--image-opts` string of the export (without the bitmap option).
pub fn with_qemu_nbd<T>(dir: &Path, img: &Path, bitmaps: &[&str], f: impl FnOnce(&str) -> T) -> T {
    let sock = dir.join("nbd.sock");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-r", "-t", "-f", "qcow2", "-k"]).arg(&sock);
    for b in bitmaps {
        cmd.args(["-B", b]);
    }
    let mut child = cmd
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let opts = format!("driver=nbd,server.type=unix,server.path={}", sock.display());
    let r = f(&opts);
    let _ = child.kill();
    let _ = child.wait();
    r
}

/// The lines strace writes for the `trace` system calls of `cmd args`,
/// run in `dir`; the command must succeed.
pub fn strace_calls(dir: &Path, trace: &str, cmd: &str, args: &[&str]) -> Vec<String> {
    let log = dir.join("strace.log");
    let trace = format!("trace={trace}");
    let mut a = vec!["-f", "-e", &trace, "-o", log.to_str().unwrap(), cmd];
    a.extend_from_slice(args);
    let out = Command::new("strace")
        .args(&a)
        .current_dir(dir)
        .output()
        .expect("strace (installed by .ci/run)");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    text.lines().map(str::to_string).collect()
}

/// How many fsync/fdatasync calls `cmd args` makes in `dir` (strace).
pub fn syncs_of(dir: &Path, cmd: &str, args: &[&str]) -> usize {
    strace_calls(dir, "fsync,fdatasync", cmd, args)
        .iter()
        .filter(|l| l.contains("fsync(") || l.contains("fdatasync("))
        .count()
}
