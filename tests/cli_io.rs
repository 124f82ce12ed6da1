//! `oxqcow io` against the real qemu-io: every case runs the same command
//! line with both programs on two copies of one image (made by qemu-img)
//! and compares standard output, standard error, the exit status and the
//! resulting images (guest data and allocation map, judged by qemu-img).
//! Timing lines are filtered as qemu-iotests filter them. Our binary runs
//! with argv[0] = "qemu-io", as the iotests wrapper runs it.

mod common;
use common::*;
use std::io::Write as _;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_oxqcow");

struct Outcome {
    status: String,
    out: String,
    err: String,
}

/// Runs one program on `img` with `args` (IMG stands for the image path)
/// and optional standard input.
fn run_io(ours: bool, img: &Path, args: &[&str], stdin: Option<&str>) -> Outcome {
    let p = img.display().to_string();
    let args: Vec<String> = args.iter().map(|a| a.replace("IMG", &p)).collect();
    let mut cmd = if ours {
        let mut c = Command::new(BIN);
        c.arg0("qemu-io").arg("io");
        c
    } else {
        Command::new("qemu-io")
    };
    cmd.args(&args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let status = match (o.status.code(), o.status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "?".into(),
    };
    let clean = |b: &[u8]| filter(&String::from_utf8_lossy(b).replace(&p, "IMG"));
    Outcome {
        status,
        out: clean(&o.stdout),
        err: clean(&o.stderr),
    }
}

/// The iotests filter for the timing line, and the -C line's numbers.
fn filter(s: &str) -> String {
    s.lines()
        .map(|l| {
            if let Some(i) = l.find(" ops; ") {
                let head = &l[..i];
                let head = head.rsplit_once(", ").map(|(a, _)| a).unwrap_or(head);
                return format!("{head}, X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)");
            }
            let f: Vec<&str> = l.split(',').collect();
            if f.len() == 5 && f[2].contains(':') && f[0].chars().all(|c| c.is_ascii_digit()) {
                return format!("{},{},T,X,Y", f[0], f[1]);
            }
            l.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Creates an image with qemu-img, runs both programs on copies and
/// asserts the same behaviour and the same resulting images.
fn same(dir: &Scratch, create: &[&str], args: &[&str], stdin: Option<&str>) -> String {
    same_steps(dir, create, &[args], stdin)
}

/// [`same`] with several runs of each program, one after the other on
/// its image; returns qemu-io's output of the last one.
fn same_steps(dir: &Scratch, create: &[&str], steps: &[&[&str]], stdin: Option<&str>) -> String {
    let a = dir.path("a.img");
    let b = dir.path("b.img");
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    let fmt = create[0];
    // Each copy made by qemu-img itself (a file copy would not keep the
    // exact holes of a raw image).
    for img in [&a, &b] {
        let mut c: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), fmt.into()];
        c.extend(create[1..].iter().map(|s| s.to_string()));
        c.insert(4, img.display().to_string());
        let cr: Vec<&str> = c.iter().map(|s| s.as_str()).collect();
        qemu_img(&cr);
    }
    let mut last = String::new();
    for args in steps {
        let theirs = run_io(false, &a, args, stdin);
        let ours = run_io(true, &b, args, stdin);
        let what = format!("{args:?} on {create:?}");
        assert_eq!(ours.out, theirs.out, "stdout differs for {what}");
        assert_eq!(ours.err, theirs.err, "stderr differs for {what}");
        assert_eq!(ours.status, theirs.status, "status differs for {what}");
        if ours.status == "exit 0" || ours.status == "exit 1" {
            same_images(&a, &b, fmt);
        }
        last = theirs.out;
    }
    last
}

fn same_images(a: &Path, b: &Path, fmt: &str) {
    let (sa, sb) = (a.display().to_string(), b.display().to_string());
    let (code, out, err) = run("qemu-img", &["compare", "-f", fmt, "-F", fmt, &sa, &sb]);
    assert_eq!(code, 0, "images differ: {out}{err}");
    let map = |p: &str| {
        let (_, o, _) = run("qemu-img", &["map", "-f", fmt, "--output=json", p]);
        // Host offsets may differ; the allocation kinds must not.
        o.lines()
            .map(|l| match l.find(", \"offset\"") {
                Some(i) => format!("{}}}", &l[..i]),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(map(&sa), map(&sb), "allocation maps differ");
    if fmt == "qcow2" {
        assert_clean(b);
    }
}

fn c(cmds: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec!["-f", "qcow2"];
    for x in cmds {
        v.push("-c");
        v.push(x);
    }
    v.push("IMG");
    v
}

const Q: &[&str] = &["qcow2", "4M"];

#[test]
fn read_write_and_patterns() {
    let d = Scratch::new("io-rw");
    same(
        &d,
        Q,
        &c(&[
            "write -P 0x11 0 64k",
            "write -P 0x22 65536 1536",
            "write 1000 3000",
            "read -P 0x11 0 512",
            "read -P 0x22 -s 512 -l 1024 65024 2048",
            "read -P 0x11 4096 65536",
            "read -v 60000 100",
            "read -q -P 0x11 0 512",
            "read -C 0 512",
            "readv -P 0x11 4096 512 1k 2k",
            "readv -v 65536 16 16",
            "writev -P 7 131072 512 4k 1536",
            "readv -P 7 131072 6144",
            "write -q -P 3 1M 4k",
            "write -C 2M 4k",
            "writev -C -P 1 3M 512 512",
            "read 0 0",
            "write 0 0",
        ]),
        None,
    );
}

#[test]
fn zero_writes_discard_alloc_map() {
    let d = Scratch::new("io-zero");
    for unmap in ["", "-u "] {
        let w1 = format!("write -z {unmap}0 64k");
        let w2 = format!("write -z {unmap}70000 3000");
        let w3 = format!("write -z {unmap}128k 200k");
        let cmds: Vec<&str> = vec![
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 1M",
            "-c",
            &w1,
            "-c",
            &w2,
            "-c",
            &w3,
            "-c",
            "discard 512k 64k",
            "-c",
            "discard 600k 1k",
            "-c",
            "discard 1000000 100000",
            "-c",
            "alloc 0",
            "-c",
            "alloc 0 1M",
            "-c",
            "alloc 3M 5P",
            "-c",
            "map",
            "-c",
            "read -P 0 0 64k",
            "IMG",
        ];
        same(&d, Q, &cmds, None);
    }
    // Zero writes over a backing file: partial clusters become zero
    // clusters only where the rest of the cluster reads as zeros.
    let base = d.path("base.img");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &base.display().to_string(),
        "4M",
    ]);
    qemu_io(&base, &["write -P 5 64k 1k"]);
    let b = format!("backing_file={},backing_fmt=qcow2", base.display());
    same(
        &d,
        &["qcow2", "-o", &b, "4M"],
        &c(&[
            "write -z 1k 1k",
            "write -z 65536 512",
            "write -z 130k 2k",
            "map",
            "read -P 0 0 64k",
        ]),
        None,
    );
}

#[test]
fn aio_and_flush() {
    // Completions are reported when qemu-io next waits for requests; QEMU
    // completes concurrent requests in any order, so each case waits for
    // its requests before the next one starts.
    let d = Scratch::new("io-aio");
    same(
        &d,
        Q,
        &c(&[
            "aio_write -P 1 0 64k",
            "aio_flush",
            "aio_write -P 2 64k 512 512",
            "aio_flush",
            "aio_read -P 1 0 64k",
            "aio_flush",
            "aio_read -v 65536 32",
            "aio_flush",
            "aio_write -z 1M 64k",
            "aio_flush",
            "read -P 2 65536 1k",
            "aio_write -q 2M 4k",
            "aio_flush",
            "aio_read -P 9 0 512",
            "aio_flush",
            "flush",
            "aio_read -i 0 512",
            "aio_write -i 0 512",
            "aio_write -C 3M 512",
        ]),
        None,
    );
}

#[test]
fn length_info_truncate() {
    let d = Scratch::new("io-info");
    same(
        &d,
        Q,
        &c(&[
            "length",
            "info",
            "truncate 8M",
            "length",
            "write -P 1 7M 64k",
            "truncate 1M",
            "length",
            "map",
            "truncate -m bad 2M",
            "truncate abc",
        ]),
        None,
    );
    same(
        &d,
        &["qcow2", "-o", "compat=0.10,cluster_size=4k", "1G"],
        &c(&["info", "length"]),
        None,
    );
    same(
        &d,
        &[
            "qcow2",
            "-o",
            "lazy_refcounts=on,compression_type=zstd",
            "100M",
        ],
        &c(&["info"]),
        None,
    );
    same(
        &d,
        &["raw", "1M"],
        &io_args(&["-f", "raw"], &["info", "length", "map"], &["IMG"]),
        None,
    );
}

#[test]
fn compressed_writes() {
    let d = Scratch::new("io-compress");
    same(
        &d,
        Q,
        &c(&[
            "write -c -P 3 0 128k",
            "write -c 1000 64k",
            "write -c 64k 1000",
            "read -P 3 0 128k",
            "map",
        ]),
        None,
    );
}

#[test]
fn errors_and_exit_codes() {
    let d = Scratch::new("io-err");
    same(
        &d,
        Q,
        &c(&[
            "read 4M 512",
            "read 4193792 1024",
            "write -P 300 0 1",
            "read 0 1x",
            "read 0 -1",
            "read 0 99999999999999999999",
            "read 0",
            "foo",
            "read -P 1 -s 3 0 2",
            "read -l 1 0 2",
            "write -u 0 512",
            "write -z -P 1 0 512",
            "write -b -z 0 512",
            "write -c 0 512",
            "sleep -1",
            "sigraise 99",
            "flush x",
            "help nosuch",
            "zone_report 0 1",
            "break a b",
            "open IMG",
            "reopen -r -w",
            "read 0 2147483648",
            "discard 0 2147483648",
            "q x y",
            "read 0 512",
        ]),
        None,
    );
    // Exit status 0 when every command succeeds, 1 otherwise.
    same(&d, Q, &c(&["write 0 512", "read 0 512"]), None);
    same(&d, Q, &["-r", "-c", "write 0 512", "IMG"], None);
    same(&d, Q, &["-c", "read 0 512", "IMG.nonexistent"], None);
    same(&d, Q, &["-c", "read 0 512"], None);
    same(&d, Q, &["-f", "qcow2", "--image-opts", "IMG"], None);
    same(&d, Q, &["-t", "bogus", "IMG"], None);
}

#[test]
fn help_texts() {
    let d = Scratch::new("io-help");
    let mut cmds = vec!["help"];
    for x in [
        "read",
        "readv",
        "write",
        "writev",
        "aio_read",
        "aio_write",
        "discard",
        "alloc",
        "map",
        "open",
        "reopen",
        "truncate",
        "sleep",
        "sigraise",
        "length",
        "info",
        "flush",
        "close",
        "abort",
        "quit",
        "help",
    ] {
        cmds.push(Box::leak(format!("help {x}").into_boxed_str()));
    }
    same(&d, Q, &c(&cmds), None);
}

#[test]
fn stdin_prompt_and_buffering() {
    let d = Scratch::new("io-stdin");
    let out = same(
        &d,
        Q,
        &["-f", "qcow2", "IMG"],
        Some("write -P 1 0 4k\nread -P 1 0 4k\nfoo\nread -P 2 0 512\n\nlength\n"),
    );
    assert!(out.starts_with("qemu-io> wrote 4096/4096"), "{out}");
    // Without -c and with no image: commands still read, quit ends early.
    same(
        &d,
        Q,
        &[],
        Some("open -r IMG\nread 0 512\nquit\nread 0 512\n"),
    );
    // stdout is block-buffered in -c mode: stderr lines come first.
    same(
        &d,
        Q,
        &c(&["write 0 512", "nosuch", "read 0 512", "truncate -m bad 1M"]),
        None,
    );
}

#[test]
fn open_close_reopen_options() {
    let d = Scratch::new("io-open");
    same(
        &d,
        Q,
        &io_args(
            &[],
            &[
                "open -o driver=qcow2,lazy-refcounts=on IMG",
                "write -P 1 0 64k",
                "close",
                "open -r IMG",
                "write 0 512",
                "reopen -w",
                "write -P 2 0 512",
                "reopen -o lazy-refcounts=off",
                "reopen -c none -o cache.direct=on",
                "reopen -r -o read-only=on",
                "reopen -o read-only=foo",
                "reopen -o driver=raw",
                "reopen -o node-name=x",
                "read -P 2 0 512",
                "close",
                "close",
            ],
            &[],
        ),
        None,
    );
    same(
        &d,
        Q,
        &io_args(
            &[],
            &[
                "open -o cache-size=1M,l2-cache-size=2M IMG",
                "open -o l2-cache-entry-size=4242 IMG",
                "open -o l2-cache-size=0,refcount-cache-size=0 IMG",
                "read 0 64k",
            ],
            &[],
        ),
        None,
    );
    same(
        &d,
        Q,
        &[
            "--image-opts",
            "-c",
            "read 0 512",
            "-c",
            "info",
            "driver=qcow2,file.filename=IMG,lazy-refcounts=on",
        ],
        None,
    );
    same(
        &d,
        Q,
        &[
            "-c",
            "read 0 512",
            "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 'IMG'}}",
        ],
        None,
    );
    same(&d, Q, &["-c", "open -o foo=bar IMG"], None);
    same(&d, Q, &["-c", "open -o file.foo=bar IMG"], None);
    // -s: writes go to a temporary overlay; the image is left alone.
    same(
        &d,
        Q,
        &[
            "-f",
            "qcow2",
            "-s",
            "-c",
            "write -P 9 0 64k",
            "-c",
            "read -P 9 0 64k",
            "IMG",
        ],
        None,
    );
}

#[test]
fn nested_formats_and_null() {
    let d = Scratch::new("io-nested");
    let inner = d.path("inner.img");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &inner.display().to_string(),
        "8M",
    ]);
    qemu_io(&inner, &["write -P 42 0 512", "write -P 23 512 512"]);
    let i = inner.display().to_string();
    let outer = d.path("outer.img");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &i,
        &outer.display().to_string(),
    ]);
    // qcow2 inside qcow2: the outer image's host file is the inner image.
    let o = format!(
        "open -o driver=qcow2,file.driver=qcow2,file.file.filename={}",
        outer.display()
    );
    let (a, b) = (
        run_io(
            false,
            &outer,
            &[
                "-c",
                &o,
                "-c",
                "read -P 42 0 512",
                "-c",
                "read -P 23 512 512",
            ],
            None,
        ),
        run_io(
            true,
            &outer,
            &[
                "-c",
                &o,
                "-c",
                "read -P 42 0 512",
                "-c",
                "read -P 23 512 512",
            ],
            None,
        ),
    );
    assert_eq!((a.out, a.err, a.status), (b.out, b.err, b.status));
    let args = [
        "-f",
        "null-co",
        "-c",
        "reopen",
        "-c",
        "info",
        "-c",
        "read 0 512",
        "-c",
        "length",
        "json:{'driver': 'null-co', 'size': 65536}",
    ];
    let (a, b) = (
        run_io(false, &outer, &args, None),
        run_io(true, &outer, &args, None),
    );
    assert_eq!((a.out, a.err, a.status), (b.out, b.err, b.status));
}

#[test]
fn abort_and_signals() {
    let d = Scratch::new("io-abort");
    // abort: SIGABRT, buffered output lost, nothing flushed to the image
    // beyond what the write itself put there.
    let args = c(&["write -P 1 0 64k", "abort"]);
    let img = d.path("x.img");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &img.display().to_string(),
        "1M",
    ]);
    let theirs = run_io(false, &img, &args, None);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &img.display().to_string(),
        "1M",
    ]);
    let ours = run_io(true, &img, &args, None);
    assert_eq!(ours.status, format!("signal {}", libc::SIGABRT));
    assert_eq!(ours.status, theirs.status);
    assert_eq!(ours.out, theirs.out);
    // sigraise flushes stdout first.
    let args = c(&["write -P 1 0 4k", "sigraise 15", "read 0 512"]);
    let theirs = run_io(false, &img, &args, None);
    let ours = run_io(true, &img, &args, None);
    assert_eq!(ours.status, format!("signal {}", libc::SIGTERM));
    assert_eq!((ours.out, ours.status), (theirs.out, theirs.status));
    // A killed lazy-refcounts writer leaves the image dirty, as QEMU's does.
    let lazy = d.path("lazy.img");
    let l = lazy.display().to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        &l,
        "1M",
    ]);
    let r = run_io(
        true,
        &lazy,
        &c(&["write -P 0x5a 0 512", "sigraise 9"]),
        None,
    );
    assert_eq!(r.status, "signal 9");
    let (code, out, _) = run("qemu-img", &["check", &l]);
    assert_ne!(code, 0, "{out}");
    let (code, _, _) = run("qemu-img", &["check", "-r", "all", &l]);
    assert_eq!(code, 0);
    let r = run_io(true, &lazy, &c(&["read -P 0x5a 0 512"]), None);
    assert_eq!(r.status, "exit 0", "{}{}", r.out, r.err);
}

#[test]
fn backing_driver_overrides_the_backing_format() {
    // iotest 114: an image whose backing format extension names a driver
    // that does not exist opens only with `backing.driver` overriding it.
    let d = Scratch::new("io-backing-driver");
    let base = d.path("base.img");
    let b = base.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &b, "1M"]);
    qemu_io(&base, &["write -P 0x5c 0 64k"]);
    let img = d.path("top.img");
    let t = img.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &t]);
    {
        let opts = oxqcow::OpenOptions {
            writable: true,
            no_backing: true,
            ..Default::default()
        };
        let q = oxqcow::Qcow2::open(&img, &opts).unwrap();
        q.change_backing_file(Some(&b), Some("foo")).unwrap();
        q.close().unwrap();
    }
    for args in [
        vec!["-c", "open IMG", "-c", "read -P 0x5c 0 4k"],
        vec![
            "-c",
            "open -o backing.driver=qcow2 IMG",
            "-c",
            "read -P 0x5c 0 4k",
        ],
        vec![
            "-c",
            "open -o backing.driver=raw IMG",
            "-c",
            "read -P 0 0 4k",
        ],
    ] {
        let theirs = run_io(false, &img, &args, None);
        let ours = run_io(true, &img, &args, None);
        assert_eq!(
            (&ours.out, &ours.err, &ours.status),
            (&theirs.out, &theirs.err, &theirs.status),
            "{args:?}"
        );
    }
    let ok = run_io(
        true,
        &img,
        &[
            "-c",
            "open -o backing.driver=qcow2 IMG",
            "-c",
            "read -P 0x5c 0 4k",
        ],
        None,
    );
    assert!(ok.out.contains("read 4096/4096"), "{}", ok.out);
    // The override reaches the engine: read through the overridden format.
    let q = oxqcow::Qcow2::open(
        &img,
        &oxqcow::OpenOptions {
            backing_format: Some("qcow2".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; 4096];
    q.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0x5c));
    assert!(oxqcow::Qcow2::open(&img, &Default::default()).is_err());
}

#[test]
fn vm_state_writes_and_reads() {
    // write -b / read -b reach the VM state area past the disk (iotest
    // 029): the L1 table grows as QEMU grows it, so both images come out
    // byte for byte the same.
    let d = Scratch::new("io-vmstate");
    let cmds = c(&[
        "write -b 3000T 512",
        "write -b 2047T 512",
        "write -b -P 7 1T 4k",
        "read -b -P 7 1T 4k",
        "read -b 3000T 512",
        "read -b -P 0 4000000T 512",
        "write -b 1M 1000",
        "read -b 1000 512",
        "write -b -P 3 0 1M",
        "read -b -P 3 0 1M",
        "read -b -l 16 -s 8 -P 0 0 512",
        "read -P 0 0 4M",
    ]);
    same(&d, &["qcow2", "64M"], &cmds, None);
    let a = std::fs::read(d.path("a.img")).unwrap();
    let b = std::fs::read(d.path("b.img")).unwrap();
    assert!(a == b, "images differ byte-wise");
    same(
        &d,
        &["qcow2", "-o", "cluster_size=1024", "16M"],
        &c(&["write -b -P 9 0 4M", "read -b -P 9 0 4M"]),
        None,
    );
    // Read-only and raw images: QEMU's refusals.
    same(
        &d,
        Q,
        &["-r", "-c", "write -b 0 512", "-c", "read -b 0 512", "IMG"],
        None,
    );
    same(
        &d,
        &["raw", "1M"],
        &[
            "-f",
            "raw",
            "-c",
            "write -b 0 512",
            "-c",
            "read -b 0 512",
            "IMG",
        ],
        None,
    );
}

#[test]
fn external_data_files_and_their_options() {
    // Each program gets its own image and data file; the commands and
    // options are the same (DATA and X stand for paths).
    let d = Scratch::new("io-datafile");
    let x = d.path("x.raw");
    std::fs::write(&x, vec![0x77u8; 1 << 20]).unwrap();
    let plain = d.path("plain.img");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &plain.display().to_string(),
        "1M",
    ]);
    let cases: &[&[&str]] = &[
        &io_args(
            &[],
            &[
                "write -P 1 0 100k",
                "write -z 64k 64k",
                "write -z -u 128k 64k",
                "discard 1M 64k",
                "write -c 2M 64k",
                "write -P 3 3000 70000",
                "read -P 3 3000 70000",
                "map",
            ],
            &["IMG"],
        ),
        &[
            "-c",
            "open -o data-file.filename=X IMG",
            "-c",
            "read -P 0x77 0 4k",
        ],
        &[
            "-c",
            "open -o data-file.driver=raw,data-file.file.filename=X IMG",
            "-c",
            "read -P 0x77 1M 4k",
        ],
        &io_args(
            &[],
            &[
                "open -o data-file.driver=null-co,data-file.size=4M IMG",
                "write 0 64k",
                "read -P 0 0 64k",
            ],
            &[],
        ),
        &[
            "-c",
            "open -o data-file.driver=null-co,data-file.read-zeroes=on IMG",
            "-c",
            "read -P 0 0 64k",
        ],
        &["-c", "open -o data-file=foo IMG"],
        &["-c", "open -o data-file.driver=file IMG"],
        &["-c", "open -o data-file.node-name=n IMG"],
        &["-c", "open -o data-file.driver=raw IMG"],
        &["-c", "open -o data-file.bogus=1,data-file.filename=X IMG"],
        &[
            "-c",
            "open -o data-file.bogus=1,data-file.filename=/nonexistent IMG",
        ],
        &[
            "-c",
            "open -o data-file.driver=null-co,data-file.bogus=1 IMG",
        ],
        &["-c", "open -o data-file.filename=X PLAIN"],
        &[
            "-c",
            "write -b -P 5 0 64k",
            "-c",
            "read -b -P 5 0 64k",
            "IMG",
        ],
    ];
    for (i, args) in cases.iter().enumerate() {
        let mut outs = Vec::new();
        for ours in [false, true] {
            let img = d.path(&format!("{i}-{ours}.img"));
            let data = d.path(&format!("{i}-{ours}.data"));
            let o = format!("data_file={}", data.display());
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &o,
                &img.display().to_string(),
                "4M",
            ]);
            let a: Vec<String> = args
                .iter()
                .map(|a| {
                    a.replace("PLAIN", &plain.display().to_string())
                        .replace("X", &x.display().to_string())
                })
                .collect();
            let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
            let r = run_io(ours, &img, &a, None);
            let data_name = data.display().to_string();
            outs.push((
                r.out.replace(&data_name, "DATA"),
                r.err.replace(&data_name, "DATA"),
                r.status,
            ));
            if outs.last().unwrap().2 == "exit 0" {
                assert_clean(&img);
            }
        }
        assert_eq!(outs[0], outs[1], "{args:?}");
        // Same guest view and the same data file.
        let (qi, oi) = (
            d.path(&format!("{i}-false.img")),
            d.path(&format!("{i}-true.img")),
        );
        let (qd, od) = (
            d.path(&format!("{i}-false.data")),
            d.path(&format!("{i}-true.data")),
        );
        assert!(
            std::fs::read(&qd).unwrap() == std::fs::read(&od).unwrap(),
            "{args:?}: data files differ"
        );
        let (code, out, err) = run(
            "qemu-img",
            &[
                "compare",
                &qi.display().to_string(),
                &oi.display().to_string(),
            ],
        );
        assert_eq!(code, 0, "{args:?}: {out}{err}");
    }
}

/// Writes a blkdebug config file into the scratch directory.
fn blkdebug_conf(d: &Scratch, name: &str, text: &str) -> String {
    let p = d.path(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// A qemu-io command line: `before`, each of `cmds` after a `-c`, then
/// `after` (the image).
fn io_args<'a>(before: &[&'a str], cmds: &[&'a str], after: &[&'a str]) -> Vec<&'a str> {
    let mut v = before.to_vec();
    for c in cmds {
        v.extend(["-c", c]);
    }
    v.extend_from_slice(after);
    v
}

/// The same with the image given as an owned string (a `format!`ed name).
fn io_args_owned(cmds: &[&str], image: String) -> Vec<String> {
    let mut v: Vec<String> = io_args(&[], cmds, &[])
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.push(image);
    v
}

fn args_of(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn blkdebug_rules_against_qemu() {
    let d = Scratch::new("io-blkdebug");
    let m1: &[&str] = &["qcow2", "1M"];
    let writes = [
        "write -P 1 0 64k",
        "write -P 2 64k 64k",
        "read -P 2 64k 64k",
    ];
    // An error armed once at each of these events fails the first write
    // (the new L2 table is written at once, as QEMU's l2_allocate does).
    for ev in [
        "write_aio",
        "l2_alloc_write",
        "l2_update",
        "l1_update",
        "refblock_update_part",
        "cluster_alloc",
        "pwritev",
    ] {
        let conf = blkdebug_conf(
            &d,
            "once.conf",
            &format!("[inject-error]\nevent = \"{ev}\"\nerrno = \"28\"\nonce = \"on\"\n"),
        );
        let a = io_args_owned(&writes, format!("blkdebug:{conf}:IMG"));
        same(&d, m1, &args_of(&a), None);
    }
    // set-state: the error is armed only by a write_aio in state 2, which
    // the first L2 write-back reaches.
    let conf = blkdebug_conf(
        &d,
        "state.conf",
        "[set-state]\nevent = \"l2_update\"\nnew_state = \"2\"\n\
         [inject-error]\nevent = \"write_aio\"\nstate = \"2\"\nonce = \"on\"\n",
    );
    let a = io_args_owned(
        &[
            "write -P 1 0 64k",
            "write -P 2 64k 64k",
            "write -P 3 128k 64k",
            "read -P 3 128k 64k",
        ],
        format!("blkdebug:{conf}:IMG"),
    );
    same(&d, m1, &args_of(&a), None);
    // An error on the first L2 load, armed for good (iotest 089), and
    // json: options instead of a config file.
    let a = io_args_owned(
        &[
            "write -P 1 0 64k",
            "close",
            "open json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', \
         'inject-error': [{'event': 'l2_load'}], 'image.filename': 'IMG'}}",
            "read -P 1 0 512",
            "write 0 512",
        ],
        "IMG".to_string(),
    );
    same(&d, m1, &args_of(&a), None);
    // A sector filter and an iotype.
    let conf = blkdebug_conf(
        &d,
        "sector.conf",
        "[inject-error]\nevent = \"read_aio\"\nsector = \"130\"\niotype = \"read\"\n",
    );
    let a = io_args_owned(
        &[
            "write -P 1 0 128k",
            "read -P 1 0 64k",
            "read -P 1 64k 1k",
            "read -P 1 65536 64k",
            "write -P 2 66560 512",
        ],
        format!("blkdebug:{conf}:IMG"),
    );
    same(&d, m1, &args_of(&a), None);
    // A persistent error on L2 write-back in writeback mode: the flush
    // and the close fail (QEMU's "Failed to flush the L2 table cache").
    let conf = blkdebug_conf(
        &d,
        "wb.conf",
        "[set-state]\nevent = \"l1_update\"\nnew_state = \"2\"\n\
         [inject-error]\nevent = \"l2_update\"\nstate = \"2\"\n",
    );
    let mut a = vec!["-t".to_string(), "writeback".into()];
    a.extend(io_args_owned(
        &["write -P 1 0 64k", "flush", "write -P 3 2M 64k"],
        format!("blkdebug:{conf}:IMG"),
    ));
    for img in ["p.img", "o.img"] {
        let p = d.path(img).display().to_string();
        qemu_img(&["create", "-q", "-f", "qcow2", &p, "4M"]);
    }
    let theirs = run_io(false, &d.path("p.img"), &args_of(&a), None);
    let ours = run_io(true, &d.path("o.img"), &args_of(&a), None);
    assert_eq!(
        (&ours.out, &ours.err, &ours.status),
        (&theirs.out, &theirs.err, &theirs.status)
    );
    assert!(
        ours.err.contains("Failed to flush the L2 table cache"),
        "{}",
        ours.err
    );
    // Both leave the same leaked clusters, and no corruption.
    let check = |img: &str| run("qemu-img", &["check", &d.path(img).display().to_string()]);
    let (cq, oq, _) = check("p.img");
    let (co, oo, _) = check("o.img");
    assert_eq!((co, oo.clone()), (cq, oq), "{oo}");
    assert_eq!(co, 3);
}

#[test]
fn blkdebug_top_node_and_config_errors() {
    let d = Scratch::new("io-blkdebug-top");
    let m1: &[&str] = &["qcow2", "1M"];
    // A blkdebug node over the qcow2 node: guest requests pass its rules.
    for (name, text) in [
        (
            "pw.conf",
            "[inject-error]\nevent = \"pwritev\"\nonce = \"on\"\nerrno = \"28\"\n",
        ),
        (
            "rd.conf",
            "[inject-error]\nevent = \"none\"\niotype = \"read\"\nonce = \"on\"\n",
        ),
        (
            "fl.conf",
            "[inject-error]\nevent = \"none\"\niotype = \"flush\"\n",
        ),
        (
            "zw.conf",
            "[inject-error]\nevent = \"pwritev_zero\"\niotype = \"write-zeroes\"\n",
        ),
    ] {
        let conf = blkdebug_conf(&d, name, text);
        let spec =
            format!("driver=blkdebug,config={conf},image.driver=qcow2,image.file.filename=IMG");
        let a = [
            "--image-opts",
            "-c",
            "read 0 4k",
            "-c",
            "read 0 4k",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 64k 4k",
            "-c",
            "flush",
            "-c",
            "write -z 128k 64k",
            "-c",
            "discard 0 64k",
            "-c",
            "aio_write -P 3 192k 4k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 2 64k 4k",
            &spec,
        ];
        same(&d, m1, &a, None);
    }
    // What qemu-io says about such a device.
    same(
        &d,
        m1,
        &io_args(
            &["--image-opts"],
            &["info", "length", "map"],
            &["driver=blkdebug,image.driver=qcow2,image.file.filename=IMG"],
        ),
        None,
    );
    // Config file and option errors, in QEMU's words.
    for (i, text) in [
        "[inject-error]\nevent = \"read_aio\"\nfoo = \"1\"\n",
        "[inject-error]\nerrno = \"5\"\n",
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"x\"\n",
        "[inject-error]\nevent = \"read_aio\"\nonce = \"maybe\"\n",
        "[inject-error]\nevent = \"l2_alloc.write\"\n",
        "[bogus]\nevent = \"read_aio\"\n",
        "[inject-error]\nevent = \"read_aio\"\niotype = \"x\"\n",
    ]
    .iter()
    .enumerate()
    {
        let conf = blkdebug_conf(&d, &format!("bad{i}.conf"), text);
        let name = format!("blkdebug:{conf}:IMG");
        same(&d, m1, &["-c", "read 0 512", &name], None);
    }
    let missing = format!("blkdebug:{}:IMG", d.path("none.conf").display());
    same(&d, m1, &["-c", "read 0 512", &missing], None);
    same(&d, m1, &["-c", "read 0 512", "blkdebug:IMG"], None);
    same(
        &d,
        m1,
        &[
            "--image-opts",
            "-c",
            "read 0 512",
            "driver=qcow2,file.driver=blkdebug,file.image.filename=IMG,\
             file.inject-error.0.event=read_aio,file.inject-error.0.foo=1",
        ],
        None,
    );
}

#[test]
fn blkdebug_breakpoints() {
    let d = Scratch::new("io-blkdebug-break");
    // Requests queue up behind one stopped at a breakpoint (iotest 046);
    // -q keeps the completion order of the queued ones out of the output.
    let stdin = "break write_aio A\n\
                 aio_write -P 10 0x8000 0x2000\n\
                 wait_break A\n\
                 aio_write -q -P 11 0x2000 0x2000\n\
                 aio_write -q -P 12 0xc000 0x6000\n\
                 resume A\n\
                 aio_flush\n\
                 read -P 10 0x8000 0x2000\n\
                 read -P 11 0x2000 0x2000\n\
                 read -P 12 0xc000 0x6000\n\
                 read -P 0 0 0x2000\n\
                 resume A\n\
                 remove_break A\n\
                 break bogus B\n\
                 break l2_update B\n\
                 remove_break B\n";
    same(
        &d,
        &["qcow2", "1M"],
        &["-f", "qcow2", "blkdebug::IMG"],
        Some(stdin),
    );
    // Without blkdebug there is nothing to break at.
    same(
        &d,
        &["qcow2", "1M"],
        &io_args(
            &[],
            &["break write_aio A", "resume A", "remove_break A"],
            &["IMG"],
        ),
        None,
    );
}

#[test]
fn copy_on_read_against_qemu() {
    let d = Scratch::new("io-cor");
    let base = d.path("base.qcow2");
    let b = base.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &b, "4M"]);
    qemu_io(
        &base,
        &["write -P 5 0 64k", "write -P 6 1M 3k", "write -z 2M 64k"],
    );
    let top: &[&str] = &["qcow2", "-b", &b, "-F", "qcow2", "4M"];
    // Reads copy whole clusters up, zeros as zero clusters.
    same(
        &d,
        top,
        &c(&[
            "write -z -u 3M 64k",
            "read -P 5 1000 2000",
            "read -P 0 2M 4k",
            "read 1M 100k",
            "read 3M 128k",
            "map",
        ])
        .into_iter()
        .flat_map(|x| if x == "-f" { vec!["-C", "-f"] } else { vec![x] })
        .collect::<Vec<_>>(),
        None,
    );
    // The copy-on-read filter node, with a blkdebug node under it failing
    // the copy of one sector (iotests 197, 215).
    let conf = blkdebug_conf(
        &d,
        "cor.conf",
        "[inject-error]\nevent = \"cor_write\"\nsector = \"2048\"\n",
    );
    for spec in [
        format!(
            "driver=copy-on-read,file.driver=blkdebug,file.config={conf},file.image.driver=qcow2"
        ),
        format!("driver=blkdebug,config={conf},image.driver=qcow2"),
    ] {
        let open = if spec.starts_with("driver=blkdebug") {
            format!("open -C -o {spec} IMG")
        } else {
            format!("open -o {spec} IMG")
        };
        let a = [
            "-c",
            open.as_str(),
            "-c",
            "write -z -u 1M 64k",
            "-c",
            "read -P 0 1M 128k",
            "-c",
            "read 960k 128k",
            "-c",
            "map",
        ];
        same(&d, top, &a, None);
    }
    // Copy-on-read needs a writable image.
    same(&d, top, &["-C", "-r", "-c", "read 0 512", "IMG"], None);
    same(
        &d,
        top,
        &[
            "-r",
            "-c",
            "open -r -o driver=copy-on-read,file.driver=qcow2 IMG",
        ],
        None,
    );
}

#[test]
fn json_backing_with_blkdebug() {
    let d = Scratch::new("io-json-backing");
    let base = d.path("base.qcow2");
    let b = base.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &b, "1M"]);
    qemu_io(&base, &["write -P 5 0 64k"]);
    let json = format!(
        "json:{{'driver': 'qcow2', 'file': {{'driver': 'blkdebug', \
         'inject-error': [{{'event': 'read_aio', 'once': true}}], \
         'image': {{'driver': 'file', 'filename': '{b}'}}}}}}"
    );
    same(
        &d,
        &["qcow2", "-b", &json, "-F", "qcow2"],
        &c(&[
            "read -P 5 0 4k",
            "read -P 5 0 4k",
            "write -P 1 4k 4k",
            "read -P 5 0 4k",
            "info",
        ]),
        None,
    );
}

/// A blkdebug node over the external data file (iotest 289): its rules
/// see the data writes, the failed write leaves a clean image, as qemu-io.
#[test]
fn blkdebug_over_the_external_data_file() {
    let d = Scratch::new("io-datafile-blkdebug");
    let conf = d.path("bd.conf");
    std::fs::write(
        &conf,
        "[inject-error]\nevent = \"write_aio\"\nerrno = \"5\"\nonce = \"on\"\n",
    )
    .unwrap();
    let mut outs = Vec::new();
    for ours in [false, true] {
        let img = d.path(&format!("{ours}.qcow2"));
        let data = d.path(&format!("{ours}.data"));
        let (i, df) = (img.display().to_string(), data.display().to_string());
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={df}"),
            &i,
            "64k",
        ]);
        let json = format!(
            "json:{{'driver': 'qcow2', 'file': {{'driver': 'file', 'filename': '{i}'}}, \
             'data-file': {{'driver': 'raw', 'file': {{'driver': 'blkdebug', \
             'config': '{}', 'image': {{'driver': 'file', 'filename': '{df}'}}}}}}}}",
            conf.display()
        );
        let o = run_io(ours, Path::new(&json), &["-c", "write 0 64k", "IMG"], None);
        assert!(
            o.out.contains("write failed: Input/output error"),
            "{}",
            o.out
        );
        assert_clean(&img);
        outs.push((o.out, o.err, o.status));
    }
    assert_eq!(outs[0], outs[1]);
}

/// An image syncs at most as often as qemu-io makes it sync, and enough:
/// at least once per write in writethrough (the default) and directsync,
/// at least once (the close) in writeback and none, never with unsafe. A
/// qcow2 image may sync once more, at open (engine/open.rs: what an earlier
/// process left in the page cache becomes durable before the allocator
/// trusts the file's length); there is no second sync per write although
/// both the engine and the io layer's FUA emulation ask for one, and none
/// at close after a writethrough write (storage/file.rs skips a sync that
/// covers nothing). The writes allocate, rewrite and fill part of a cluster.
#[test]
fn writes_sync_as_qemu_io() {
    let d = Scratch::new("io-syncs");
    for fmt in ["raw", "qcow2"] {
        for cache in ["writethrough", "writeback", "none", "unsafe", "directsync"] {
            let mut counts = Vec::new();
            for ours in [false, true] {
                let img = d.path(&format!("{}.{fmt}", if ours { "o" } else { "q" }));
                let f = img.to_str().unwrap();
                qemu_img(&["create", "-q", "-f", fmt, f, "1M"]);
                let mut args = vec!["-t", cache, "-f", fmt];
                for c in ["write 0 64k", "write 64k 64k", "write 0 4k", "write 4k 512"] {
                    args.extend(["-c", c]);
                }
                args.push(f);
                counts.push(if ours {
                    let mut a = vec!["io"];
                    a.extend_from_slice(&args);
                    syncs_of(&d.0, BIN, &a)
                } else {
                    syncs_of(&d.0, "qemu-io", &args)
                });
                if fmt == "qcow2" {
                    assert_clean(&img);
                }
            }
            let open = usize::from(fmt == "qcow2" && cache != "unsafe");
            let least = match cache {
                "writethrough" | "directsync" => 4,
                "unsafe" => 0,
                _ => 1,
            };
            let (qemu, ours) = (counts[0], counts[1]);
            assert!(
                ours <= qemu + open && ours >= least + open && qemu >= least,
                "{fmt} -t {cache}: syncs qemu-io {qemu}, oxqcow io {ours}"
            );
        }
    }
}

/// Whether the image file is opened for writing with O_DIRECT follows the
/// cache mode as in qemu-io (`-t`, `-n`, `cache.direct`), for qcow2 and raw;
/// unaligned writes through O_DIRECT land where qemu-io reads them back.
#[test]
fn direct_opens_as_qemu_io() {
    let d = Scratch::new("io-direct-opens");
    let cases: &[&[&str]] = &[
        &["-t", "none"],
        &["-t", "directsync"],
        &["-n"],
        &["-t", "writeback"],
        &["-t", "writethrough"],
        &["-t", "unsafe"],
        &["--image-opts"],
    ];
    for fmt in ["qcow2", "raw"] {
        for (i, case) in cases.iter().enumerate() {
            let mut direct = Vec::new();
            for ours in [false, true] {
                let img = d.path(&format!("{}-{i}.{fmt}", if ours { "o" } else { "q" }));
                let f = img.to_str().unwrap();
                qemu_img(&["create", "-q", "-f", fmt, f, "1M"]);
                let spec = format!("driver={fmt},file.filename={f},cache.direct=on");
                let mut args: Vec<&str> = case.to_vec();
                if case[0] != "--image-opts" {
                    args.extend(["-f", fmt]);
                }
                args.extend(["-c", "write -P 0x5a 1k 3k", "-c", "write -P 0xa5 64k 64k"]);
                args.push(if case[0] == "--image-opts" { &spec } else { f });
                let calls = if ours {
                    let mut a = vec!["io"];
                    a.extend_from_slice(&args);
                    strace_calls(&d.0, "openat", BIN, &a)
                } else {
                    strace_calls(&d.0, "openat", "qemu-io", &args)
                };
                let name = img.file_name().unwrap().to_str().unwrap();
                direct.push(
                    calls.iter().any(|l| {
                        l.contains(name) && l.contains("O_RDWR") && l.contains("O_DIRECT")
                    }),
                );
                for (pattern, off, len) in [
                    ("0x5a", "1k", "3k"),
                    ("0xa5", "64k", "64k"),
                    ("0", "4k", "60k"),
                ] {
                    let read = format!("read -P {pattern} {off} {len}");
                    let (code, out, err) = run("qemu-io", &["-f", fmt, "-c", &read, f]);
                    assert!(
                        code == 0 && !out.contains("failed"),
                        "{case:?} {fmt} {read}: {out}{err}"
                    );
                }
                if fmt == "qcow2" {
                    assert_clean(&img);
                }
            }
            assert_eq!(
                direct[1], direct[0],
                "{fmt} {case:?}: O_DIRECT writable open (qemu-io, oxqcow io)"
            );
        }
    }
    // The test would pass if nothing ever opened with O_DIRECT.
    let img = d.path("n.qcow2");
    let f = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", f, "1M"]);
    let calls = strace_calls(
        &d.0,
        "openat",
        BIN,
        &["io", "-t", "none", "-c", "read 0 4k", f],
    );
    assert!(
        calls
            .iter()
            .any(|l| l.contains("n.qcow2") && l.contains("O_DIRECT")),
        "{calls:?}"
    );
}

/// QEMU's compress filter over the test image (`--image-opts`).
const CF: &str = "driver=compress,file.driver=qcow2,file.file.filename=IMG";

/// qemu-io's arguments for `cmds` through the compress filter.
fn through_cf<'a>(before: &[&'a str], cmds: &[&'a str]) -> Vec<&'a str> {
    let mut v = io_args(before, cmds, &[]);
    v.extend(["--image-opts", CF]);
    v
}

/// What `qemu-img check --output=json` counts in the two images `same`
/// left (a.img: qemu-io's, b.img: ours) must agree; returns qemu-io's
/// compressed-clusters line.
fn same_check_counts(d: &Scratch) -> String {
    let counts = |name: &str| {
        let p = d.path(name).display().to_string();
        let (_, out, _) = run("qemu-img", &["check", "--output=json", &p]);
        out.lines()
            .filter(|l| l.contains("clusters\"") || l.contains("errors"))
            .map(|l| l.trim().trim_end_matches(',').to_string())
            .collect::<Vec<_>>()
    };
    let (theirs, ours) = (counts("a.img"), counts("b.img"));
    assert_eq!(ours, theirs, "qemu-img check counts differ");
    theirs
        .into_iter()
        .find(|l| l.contains("compressed-clusters"))
        .unwrap_or_default()
}

/// Bytes that do not compress (a fixed xorshift stream).
fn noise_file(d: &Scratch, len: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let p = d.path("noise.bin");
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

/// iotest 214's case and QEMU's compress filter around it: every write
/// through the filter compressed, unaligned ones padded to whole clusters
/// with what the image reads there, nothing compressed over an allocated
/// cluster (EIO, the other clusters of the request still written), data
/// that does not compress written plainly, zero writes compressing their
/// partial clusters; same output, map, check counts and data as qemu-io.
#[test]
fn compress_filter_writes_against_qemu() {
    let d = Scratch::new("io-compress-filter");
    let img: &[&str] = &["qcow2", "-o", "cluster_size=64k", "2M"];
    // iotest 214: 3.5 and then (through a json: name) 3.5 more clusters.
    let json = "json:{'driver': 'compress', 'file': {'driver': 'qcow2', \
                'file': {'driver': 'file', 'filename': 'IMG'}}}";
    same_steps(
        &d,
        img,
        &[
            &through_cf(&[], &["write -P 0xbb 0 229376"]),
            &["-c", "write -P 0xcc 278528 229376", json],
            &through_cf(
                &[],
                &[
                    "read -P 0xbb 0 229376",
                    "read -P 0 229376 49152",
                    "read -P 0xcc 278528 229376",
                    "map",
                ],
            ),
        ],
        None,
    );
    assert_eq!(same_check_counts(&d), "\"compressed-clusters\": 8");
    let noise = noise_file(&d, 65536);
    let w_noise = format!("write -s {noise} 0 64k");
    let w_noise_part = format!("write -s {noise} 65536 1000");
    let w_noise_new = format!("write -s {noise} 1M 64k");
    let cases: Vec<Vec<&str>> = vec![
        // Read-modify-write of partial clusters; EIO over allocated ones.
        vec![
            "write -P 1 1000 2000",
            "read -P 0 0 1000",
            "read -P 1 1000 2000",
            "read -P 0 3000 62536",
            "write -P 2 70000 100",
            "write -P 3 1000 100",
            "write -P 4 128k 64k",
            "write -P 5 64k 256k",
            "read -P 5 192k 128k",
            "read -P 4 128k 64k",
            "map",
            "alloc 0 1M",
            "info",
            "length",
        ],
        // Incompressible data: a plain write, even over compressed data.
        vec![
            "write -P 1 0 128k",
            &w_noise,
            &w_noise_part,
            &w_noise_new,
            "map",
        ],
        // Zero writes: whole clusters as zeros, partial ones compressed;
        // the head, middle and tail in order, stopping at a failure.
        vec![
            "write -P 1 0 128k",
            "write -z 0 64k",
            "write -z 128k 64k",
            "write -z -u 192k 64k",
            "write -z 300k 200k",
            "write -z 1000 100",
            "write -P 1 1M 64k",
            "write -z 1049576 100",
            "write -P 1 1536k 64k",
            "write -z 1400k 180k",
            "read -P 0 1400k 136k",
            "map",
        ],
        // Discards pass through (whole clusters only); write -c does not.
        vec![
            "write -P 1 0 256k",
            "discard 1000 100k",
            "discard 128k 64k",
            "discard 200k 1000",
            "write -c -P 1 512k 64k",
            "write -c -P 1 512k 1000",
            "writev -P 6 640k 1000 1000",
            "aio_write -P 7 768k 1000",
            "aio_flush",
            "write -b -P 3 0 512",
            "read -b -P 3 0 512",
            "flush",
            "map",
        ],
        // Past the end of an image cut to a partial cluster.
        vec![
            "truncate 100k",
            "length",
            "write -P 1 70000 100",
            "read -P 1 70000 100",
            "read -P 0 65536 1000",
            "truncate 1M",
            "write -P 2 1000k 10k",
            "map",
        ],
    ];
    for cmds in &cases {
        same(&d, img, &through_cf(&[], cmds), None);
        same_check_counts(&d);
    }
    // Nine clusters, the first allocated: QEMU's eight workers still
    // write the other eight.
    let small: &[&str] = &["qcow2", "-o", "cluster_size=4k", "1M"];
    same(
        &d,
        small,
        &through_cf(&[], &["write -P 1 0 4k", "write -P 2 0 36k", "map"]),
        None,
    );
    same_check_counts(&d);
    // Subclusters: the filter aligns to whole clusters; a cluster whose
    // subclusters are all zero without a host cluster takes compressed data.
    let ext: &[&str] = &["qcow2", "-o", "cluster_size=64k,extended_l2=on", "1M"];
    same(
        &d,
        ext,
        &through_cf(
            &[],
            &[
                "write -P 1 0 1000",
                "write -P 2 64k 64k",
                "write -z 128k 8k",
                "write -P 3 128k 1000",
                "write -z -u 192k 64k",
                "write -P 3 192k 1000",
                "map",
            ],
        ),
        None,
    );
    same_check_counts(&d);
    // Over a backing file the padding reads the backing file's data.
    let base = d.path("base.qcow2");
    let b = base.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &b, "1M"]);
    qemu_io(&base, &["write -P 0x55 0 1M"]);
    let top: &[&str] = &["qcow2", "-b", &b, "-F", "qcow2", "1M"];
    same(
        &d,
        top,
        &through_cf(
            &[],
            &[
                "write -P 1 1000 100",
                "read -P 0x55 0 1000",
                "read -P 0x55 1100 64436",
                "write -z 64k 1000",
                "read -P 0x55 66536 64536",
                "map",
            ],
        ),
        None,
    );
    same_check_counts(&d);
}

/// Opening QEMU's compress filter: its child must be a qcow2 node (or a
/// copy-on-read node over one), the checks come in QEMU's order with its
/// messages, the write permission needs a whole number of clusters and
/// no read-only node; reopen is refused; copy-on-read over and under it.
#[test]
fn compress_filter_open_and_copy_on_read_against_qemu() {
    let d = Scratch::new("io-compress-open");
    let img: &[&str] = &["qcow2", "1M"];
    let specs = [
        "driver=compress,file.driver=raw,file.file.filename=IMG",
        "driver=compress,file.filename=IMG",
        "driver=compress,file.driver=file,file.filename=IMG",
        "driver=compress",
        "driver=compress,foo=1",
        "driver=compress,file.driver=null-co",
        "driver=compress,file.driver=raw,file.file.filename=IMG,foo=1",
        "driver=compress,file.driver=qcow2,file.file.filename=IMG,foo=1",
        "driver=compress,file.driver=qcow2,file.file.filename=IMG,file.foo=1",
        "driver=compress,file.driver=qcow2,file.file.filename=IMG.none",
        "driver=compress,file.driver=qcow2,file.file.filename=IMG,discard=foo",
        "driver=compress,file.driver=compress,file.file.driver=qcow2,file.file.file.filename=IMG",
        "driver=compress,file.driver=blkdebug,file.image.driver=qcow2,file.image.file.filename=IMG",
        "driver=compress,file.driver=qcow2,file.file.filename=IMG,read-only=on",
        "driver=compress,file.driver=qcow2,file.file.filename=IMG,file.read-only=on",
        "driver=compress,file.driver=qcow2,file.file.filename=IMG,file.file.read-only=on",
        "driver=compress,file.driver=qcow2,file.file.filename=IMG,read-only=off,auto-read-only=on",
        "driver=compress,node-name=top,cache.direct=on,discard=unmap,file.driver=qcow2,file.file.filename=IMG",
    ];
    for spec in specs {
        for ro in [&[][..], &["-r"][..]] {
            let mut a = ro.to_vec();
            a.extend([
                "-c",
                "info",
                "-c",
                "write -P 1 0 1000",
                "--image-opts",
                spec,
            ]);
            same(&d, img, &a, None);
        }
    }
    let named: &[&[&str]] = &[
        &["-c", "info", "json:{'driver':'compress','file':'IMG'}"],
        &[
            "-c",
            "info",
            "json:{'driver':'compress','file':{'filename':'IMG'}}",
        ],
        &["-c", "info", "-f", "compress", "IMG"],
        &["-c", "info", "-f", "compress", "IMG.none"],
        &[
            "-c",
            "open -o driver=compress,file.driver=qcow2,file.file.filename=IMG",
            "-c",
            "write -P 2 64k 100",
            "-c",
            "close",
            "-c",
            "read -P 2 64k 100",
        ],
        // Reopen is refused (a named node: QEMU's generated names differ).
        &[
            "-c",
            "reopen -r",
            "-c",
            "reopen -o file.lazy-refcounts=on",
            "-c",
            "write -P 3 0 1000",
            "--image-opts",
            "driver=compress,node-name=top,file.driver=qcow2,file.file.filename=IMG",
        ],
    ];
    for a in named {
        same(&d, img, a, None);
    }
    // Write permission needs the size to be whole clusters.
    let odd: &[&str] = &["qcow2", "100k"];
    for suffix in [
        "",
        ",read-only=on",
        ",file.read-only=on",
        ",file.file.read-only=on",
    ] {
        let spec = format!("{CF}{suffix}");
        for ro in [&[][..], &["-r"][..]] {
            let mut a = ro.to_vec();
            a.extend([
                "-c",
                "read 0 100k",
                "-c",
                "length",
                "--image-opts",
                spec.as_str(),
            ]);
            same(&d, odd, &a, None);
        }
    }
    // -r with read-only=off: a writable filter whose write permission is
    // taken (and checked) at the first command that writes; a truncate
    // takes it whatever the size.
    for create in [odd, img] {
        for suffix in [
            ",read-only=off",
            ",read-only=off,file.read-only=on",
            ",read-only=off,file.read-only=off",
            ",read-only=off,file.file.read-only=on",
        ] {
            let spec = format!("{CF}{suffix}");
            let cmds = [
                "write 64k 512",
                "write -z 0 512",
                "discard 0 64k",
                "truncate 200k",
                "length",
                "write 0 512",
                "write -P 1 64k 512",
            ];
            let mut a = io_args(&["-r"], &cmds, &["--image-opts"]);
            a.push(&spec);
            same(&d, create, &a, None);
        }
    }
    // Copy-on-read over the filter copies compressed, a copy-on-read
    // node under it plainly, and both: the plain copy first, then EIO.
    let base = d.path("base.qcow2");
    let b = base.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &b, "1M"]);
    qemu_io(&base, &["write -P 0x55 0 128k", "write -P 0x66 512k 64k"]);
    let top: &[&str] = &["qcow2", "-b", &b, "-F", "qcow2", "1M"];
    let under = "driver=compress,file.driver=copy-on-read,\
                 file.file.driver=qcow2,file.file.file.filename=IMG";
    let over = "driver=copy-on-read,file.driver=compress,\
                file.file.driver=qcow2,file.file.file.filename=IMG";
    let reads = [
        "-c",
        "read -P 0x55 1000 1000",
        "-c",
        "read -P 0 128k 1000",
        "-c",
        "read -P 0x66 500k 100k",
        "-c",
        "write -P 1 256k 1000",
        "-c",
        "write -c 320k 64k",
        "-c",
        "map",
    ];
    for (before, spec) in [
        (&["-C"][..], CF),
        (&[][..], under),
        (&["-C"][..], under),
        (&[][..], over),
    ] {
        let mut a = before.to_vec();
        a.extend(reads);
        a.extend(["--image-opts", spec]);
        same(&d, top, &a, None);
        same_check_counts(&d);
    }
    // QEMU 10's qemu-io hangs on -s over the filter; ours says no.
    let f = d.path("s.qcow2");
    let fs = f.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &fs, "1M"]);
    let spec = CF.replace("IMG", &fs);
    let (code, out, err) = ox(&["io", "-s", "-c", "read 0 512", "--image-opts", &spec]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("can't open: oxqcow does not implement -s over the 'compress' block driver"),
        "{err}"
    );
}

/// `write -c` follows QEMU's qcow2 driver: no compressed data over a
/// cluster that has a host cluster (EIO), incompressible data written
/// plainly, zero clusters without a host cluster taken over.
#[test]
fn compressed_writes_never_overwrite_as_qemu() {
    let d = Scratch::new("io-compress-fresh");
    let noise = noise_file(&d, 65536);
    let w_noise = format!("write -c -s {noise} 0 64k");
    let cmds = [
        "write -c -P 1 0 64k",
        "write -c -P 2 0 64k",
        "write -P 3 64k 64k",
        "write -c -P 2 64k 64k",
        "write -z 128k 64k",
        "write -c -P 4 128k 64k",
        "write -P 5 192k 64k",
        "write -z 192k 64k",
        "write -c -P 6 192k 64k",
        "write -z -u 192k 64k",
        "write -c -P 6 192k 64k",
        "discard 0 64k",
        "write -c -P 7 0 64k",
        "write -c -P 8 0 512k",
        &w_noise,
        "map",
    ];
    same(&d, Q, &io_args(&["-f", "qcow2"], &cmds, &["IMG"]), None);
    same_check_counts(&d);
    let ext: &[&str] = &["qcow2", "-o", "cluster_size=64k,extended_l2=on", "1M"];
    same(
        &d,
        ext,
        &c(&[
            "write -P 1 0 2k",
            "write -c 0 64k",
            "write -z 64k 2k",
            "write -c 64k 64k",
            "write -z -u 128k 64k",
            "write -c 128k 64k",
            "map",
        ]),
        None,
    );
    same_check_counts(&d);
}

/// The qcow2 driver's runtime options (qemu-iotest 137): each value's
/// syntax, the cache-size rules and limits, overlap-check and its
/// template, at open (`open -o`, `--image-opts`) and at reopen, where
/// new options merge with the ones in use as QEMU merges them.
#[test]
fn qcow2_runtime_options_as_qemu_io() {
    let d = Scratch::new("io-qcow2-opts");
    let m64 = &["qcow2", "64M"];
    // Every valid value, one reopen after another, then I/O.
    let valid: Vec<String> = [
        "lazy-refcounts=on,pass-discard-request=on",
        "pass-discard-snapshot=off,pass-discard-other=on,discard-no-unref=off",
        "overlap-check=all",
        "overlap-check=none",
        "overlap-check.template=cached",
        "overlap-check=constant",
        "overlap-check.main-header=off",
        "overlap-check.inactive-l2=on,overlap-check.bitmap-directory=off",
        "cache-size=1M",
        "l2-cache-size=512k",
        "l2-cache-entry-size=512",
        "refcount-cache-size=128k",
        "cache-size=2M",
        "cache-clean-interval=0x10",
        "cache-clean-interval=4294967295",
    ]
    .iter()
    .map(|o| format!("reopen -o {o}"))
    .collect();
    let mut cmds: Vec<&str> = valid.iter().map(String::as_str).collect();
    cmds.extend(["write -P 55 0 4M", "read -P 55 0 4M", "discard 0 4M"]);
    same(&d, m64, &io_args(&[], &cmds, &["IMG"]), None);
    // Invalid values, first at reopen, then at open.
    let bad = [
        "lazy-refcounts=42",
        "cache-size=1M,l2-cache-size=64k,refcount-cache-size=64k",
        "cache-size=1M,l2-cache-size=2M",
        "cache-size=1M,refcount-cache-size=2M",
        "l2-cache-entry-size=33k",
        "l2-cache-entry-size=128k",
        "refcount-cache-size=256T",
        "refcount-cache-size=128T",
        "cache-size=256T,refcount-cache-size=1M",
        "cache-size=256T,l2-cache-size=256T",
        "overlap-check=constant,overlap-check.template=all",
        "overlap-check=blubb",
        "overlap-check.template=blubb",
        "overlap-check.main-header=blubb,overlap-check.active-l1=x",
        "overlap-check.foo=on",
        "cache-clean-interval=-1",
        "cache-clean-interval=5k",
        "cache-clean-interval=99999999999999999999",
        "cache-size=abc,refcount-cache-size=abc",
        "l2-cache-size=-1",
        "overlap-check=blubb,cache-clean-interval=-1",
        "foo=bar,overlap-check=blubb",
        "file.foo=bar,overlap-check=blubb",
        "file.foo=bar,overlap-check.foo=on",
    ];
    let reopens: Vec<String> = bad.iter().map(|o| format!("reopen -o {o}")).collect();
    let opens: Vec<String> = bad.iter().map(|o| format!("open -o {o} IMG")).collect();
    for set in [&reopens, &opens] {
        let mut cmds: Vec<&str> = set.iter().map(String::as_str).collect();
        cmds.push("read 0 512");
        same(&d, m64, &io_args(&[], &cmds, &["IMG"]), None);
    }
    for o in [
        "overlap-check=all,overlap-check.template=blubb",
        "l2-cache-size=16E",
    ] {
        let spec = format!("driver=qcow2,file.filename=IMG,{o}");
        same(&d, m64, &["--image-opts", "-c", "read 0 512", &spec], None);
    }
    // What reopen keeps of the options in use.
    let merges: &[&[&str]] = &[
        &[
            "cache-size=1M",
            "l2-cache-size=2M",
            "l2-cache-size=2M,refcount-cache-size=1k",
        ],
        &["cache-size=1M,l2-cache-size=512k", "refcount-cache-size=2M"],
        &["refcount-cache-size=512k", "cache-size=256k"],
        &["overlap-check=constant", "overlap-check.template=all"],
        &["overlap-check.template=all", "overlap-check=constant"],
        &[
            "overlap-check.main-header=off",
            "overlap-check.main-header=x",
        ],
    ];
    for seq in merges {
        let spec = format!("driver=qcow2,file.filename=IMG,{}", seq[0]);
        let reopens: Vec<String> = seq[1..].iter().map(|o| format!("reopen -o {o}")).collect();
        let mut cmds: Vec<&str> = reopens.iter().map(String::as_str).collect();
        cmds.push("read 0 512");
        same(&d, m64, &io_args(&["--image-opts"], &cmds, &[&spec]), None);
    }
    // The L2 cache of a huge image in 512-byte pieces: 2^31 of them.
    // (qemu-img compare and map take minutes over 32 PiB: the outputs
    // are compared, and the file must stay as it was.)
    let huge = d.path("huge.qcow2");
    let hs = huge.display().to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=256k",
        &hs,
        "32P",
    ]);
    let before = std::fs::read(&huge).unwrap();
    let args = c(&[
        "reopen -o l2-cache-entry-size=512,l2-cache-size=1T",
        "reopen -o l2-cache-entry-size=512,cache-size=1025G",
        "reopen -o l2-cache-entry-size=256k,l2-cache-size=1M",
        "reopen -o l2-cache-entry-size=512k",
    ]);
    let (theirs, ours) = (
        run_io(false, &huge, &args, None),
        run_io(true, &huge, &args, None),
    );
    assert_eq!((&ours.out, &ours.err), (&theirs.out, &theirs.err));
    assert_eq!(ours.status, theirs.status);
    assert!(ours.err.contains("L2 cache size too big"), "{}", ours.err);
    assert!(
        std::fs::read(&huge).unwrap() == before,
        "the huge image changed"
    );
    // A v2 image refuses lazy refcounts and discard-no-unref.
    same(
        &d,
        &["qcow2", "-o", "compat=0.10", "64M"],
        &c(&[
            "reopen -o lazy-refcounts=on,overlap-check=blubb",
            "reopen -o discard-no-unref=on",
            "reopen -o discard-no-unref=on,overlap-check=blubb",
        ]),
        None,
    );
}

/// A refcount block that says the header's cluster is free (qemu-iotest
/// 137's last case): the new L2 table for a write would go to offset 0,
/// which both programs refuse with the same message, leaving the same
/// file behind (only the corrupt bit set). Clusters of other metadata
/// freed the same way meet the overlap guard with QEMU's message.
#[test]
fn l2_table_at_offset_0_as_qemu_io() {
    let d = Scratch::new("io-l2-at-0");
    for (cluster, bytes) in [(0usize, 8usize), (1, 2), (2, 2), (3, 2)] {
        let mut files = Vec::new();
        for (ours, name) in [(false, "a.qcow2"), (true, "b.qcow2")] {
            let p = d.path(name);
            let _ = std::fs::remove_file(&p);
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                &p.display().to_string(),
                "64M",
            ]);
            let mut b = std::fs::read(&p).unwrap();
            // qemu-img's layout: the refcount block is the third cluster.
            let at = 0x20000 + 2 * cluster;
            b[at..at + bytes].fill(0);
            std::fs::write(&p, &b).unwrap();
            let args = [
                "-c",
                "reopen -o overlap-check=none,lazy-refcounts=42",
                "-c",
                "write 64k 64k",
                "IMG",
            ];
            files.push((run_io(ours, &p, &args, None), p));
        }
        let ((theirs, a), (ours, b)) = (&files[0], &files[1]);
        assert_eq!(ours.out, theirs.out, "stdout, cluster {cluster}");
        assert_eq!(ours.err, theirs.err, "stderr, cluster {cluster}");
        assert_eq!(ours.status, theirs.status, "status, cluster {cluster}");
        let want = if cluster == 0 {
            "at offset 0"
        } else {
            "Preventing invalid write on metadata"
        };
        assert!(ours.err.contains(want), "cluster {cluster}: {}", ours.err);
        if cluster == 0 {
            assert!(
                std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
                "files differ"
            );
        }
    }
}
