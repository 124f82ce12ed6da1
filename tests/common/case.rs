//! Running the same qemu-img command line through qemu-img and through
//! `oxqcow` on copies of one set of files, and comparing what they print
//! and what they leave behind (the `Case` of the tool's integration tests).

use super::{run, Scratch};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The tool under test (test binaries of this package are built with it).
pub const BIN: &str = env!("CARGO_BIN_EXE_oxqcow");

/// Runs `cmd args` in `dir`: (status, stdout, stderr).
pub fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a tool in `dir` and insists on success.
pub fn ok_in(dir: &Path, cmd: &str, args: &[&str]) -> String {
    let (code, out, err) = run_in(dir, cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?} in {}: {out}{err}", dir.display());
    out
}

/// Removes what legitimately differs between the tools' texts: the
/// program name and the run time of bench.
pub fn normalize(s: &str) -> String {
    let s = s
        .replace("qemu-img: ", "")
        .replace("oxqcow: ", "")
        .replace("'qemu-img ", "'TOOL ")
        .replace("'oxqcow ", "'TOOL ");
    s.lines()
        .map(|l| match l.strip_prefix("Run completed in ") {
            Some(_) => "Run completed in T seconds.".to_string(),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// qemu-img's arguments to create a qcow2 image `name` of `size` (none
/// when empty) with `extra` options.
pub fn create_args<'a>(name: &'a str, size: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(extra);
    args.push(name);
    if !size.is_empty() {
        args.push(size);
    }
    args
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            copy_sparse(&e.path(), &t);
        }
    }
}

/// Copies a file with its holes where they are (std::fs::copy fills them
/// in, and holes are what QEMU's metadata-preallocation and raw-file
/// block status look at): only the data extents SEEK_DATA finds are copied.
fn copy_sparse(from: &Path, to: &Path) {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let src = std::fs::File::open(from).unwrap();
    let len = src.metadata().unwrap().len();
    let dst = std::fs::File::create(to).unwrap();
    dst.set_len(len).unwrap();
    dst.set_permissions(src.metadata().unwrap().permissions())
        .unwrap();
    let fd = src.as_raw_fd();
    let mut off = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while off < len {
        // SAFETY: lseek on a descriptor this function owns.
        let data = unsafe { libc::lseek(fd, off as i64, libc::SEEK_DATA) };
        if data < 0 {
            break; // no data after `off`: the rest is a hole
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) }.max(data) as u64;
        let mut pos = data as u64;
        while pos < hole {
            let n = ((hole - pos) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], pos).unwrap();
            dst.write_all_at(&buf[..n], pos).unwrap();
            pos += n as u64;
        }
        off = hole;
    }
}

/// One prepared set of files, run through both tools.
pub struct Case {
    pub setup: PathBuf,
    pub q: PathBuf,
    pub o: PathBuf,
}

impl Case {
    pub fn new(d: &Scratch) -> Case {
        let setup = d.path("setup");
        std::fs::create_dir_all(&setup).unwrap();
        Case {
            setup,
            q: d.path("q"),
            o: d.path("o"),
        }
    }

    /// Runs a command in the setup directory (qemu-img / qemu-io / oxqcow).
    pub fn prep(&self, cmd: &str, args: &[&str]) {
        ok_in(&self.setup, cmd, args);
    }

    /// Creates a qcow2 image in the setup with qemu-img (`extra`: more
    /// `create` options, e.g. `-b base -F qcow2`); `size` may be empty.
    pub fn qcow2(&self, name: &str, size: &str, extra: &[&str]) {
        self.prep("qemu-img", &create_args(name, size, extra));
    }

    /// Runs `cmd` with each argument list through both tools: the same
    /// texts, and both fail with status 1.
    pub fn all_fail(&self, cmd: &str, cases: &[&[&str]]) {
        for a in cases {
            let mut args = vec![cmd];
            args.extend_from_slice(a);
            assert_eq!(self.same(&args).0, 1, "{args:?}");
        }
    }

    /// Fresh copies of the setup, one for each tool.
    pub fn fresh(&self) {
        for dir in [&self.q, &self.o] {
            let _ = std::fs::remove_dir_all(dir);
            copy_dir(&self.setup, dir);
        }
    }

    /// Fresh copies of the setup, the command run by each tool in its copy;
    /// asserts equal status and texts and returns (status, stdout).
    pub fn same(&self, args: &[&str]) -> (i32, String) {
        self.fresh();
        self.step_masked(args, str::to_string)
    }

    /// One step of a sequence: the command run by each tool in its copy as
    /// the earlier steps left it (no fresh copy); asserts equal status and
    /// texts and returns the status.
    pub fn step(&self, args: &[&str]) -> i32 {
        self.step_masked(args, str::to_string).0
    }

    /// As `step`, with `mask` applied to both (normalized) stderr texts
    /// before they are compared (for parts that differ from run to run);
    /// returns (status, stdout).
    pub fn step_masked(&self, args: &[&str], mask: impl Fn(&str) -> String) -> (i32, String) {
        let q = run_in(&self.q, "qemu-img", args);
        let o = run_in(&self.o, BIN, args);
        assert_eq!(
            normalize(&q.1),
            normalize(&o.1),
            "stdout differs for {args:?} (stderr: {} / {})",
            q.2,
            o.2
        );
        assert_eq!(
            mask(&normalize(&q.2)),
            mask(&normalize(&o.2)),
            "stderr differs for {args:?}"
        );
        assert_eq!(q.0, o.0, "exit status differs for {args:?}");
        (q.0, q.1)
    }

    /// Both copies of `file` read the same guest data; ours is clean.
    pub fn same_view(&self, file: &str) {
        let (q, o) = (self.q.join(file), self.o.join(file));
        let (code, out, err) = run(
            "qemu-img",
            &[
                "compare",
                &q.display().to_string(),
                &o.display().to_string(),
            ],
        );
        assert_eq!(code, 0, "guest views of {file} differ: {out}{err}");
        if !file.ends_with(".raw") {
            let (code, out, err) = run_in(&self.o, "qemu-img", &["check", file]);
            assert_eq!(code, 0, "qemu-img check {file} after oxqcow: {out}{err}");
        }
    }

    /// Both copies of `file` have the same allocation map.
    pub fn same_map(&self, file: &str) {
        let q = ok_in(&self.q, "qemu-img", &["map", "--output=json", file]);
        let o = ok_in(&self.o, "qemu-img", &["map", "--output=json", file]);
        if q != o {
            let diff: Vec<String> = q
                .lines()
                .zip(o.lines())
                .filter(|(a, b)| a != b)
                .map(|(a, b)| format!("qemu-img: {a}\noxqcow:   {b}"))
                .collect();
            panic!("allocation of {file} differs:\n{}", diff.join("\n"));
        }
    }

    /// `qemu-img info` says the same about both copies (disk use aside).
    pub fn same_info(&self, file: &str) {
        self.same_info_but(file, "disk size:");
    }

    /// `qemu-img info` says the same about both copies, apart from disk
    /// use and lines containing `skip`.
    pub fn same_info_but(&self, file: &str, skip: &str) {
        let mask = |t: String| -> String {
            t.lines()
                .filter(|l| !l.contains("disk size:") && !l.contains(skip))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let q = mask(ok_in(&self.q, "qemu-img", &["info", file]));
        let o = mask(ok_in(&self.o, "qemu-img", &["info", file]));
        assert_eq!(q, o, "qemu-img info {file} differs");
    }
}

pub fn qemu_io_in(dir: &Path, file: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(file);
    let (code, out, err) = run_in(dir, "qemu-io", &args);
    assert!(
        code == 0 && !out.contains("failed") && err.is_empty(),
        "qemu-io {cmds:?}: {out}{err}"
    );
}
