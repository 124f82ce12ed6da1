//! The NBD client (`oxqcow::nbd`, `Image::Nbd`) against servers we did
//! not write: QEMU's qemu-nbd serving qcow2 and raw files (afterwards
//! `qemu-img check` and the file's contents are the judge), and nbdkit's
//! memory plugin in the modes that exercise the other code paths (simple
//! replies, the oldstyle handshake, a 4 KiB minimum block size, no
//! WRITE_ZEROES). Each flow runs random writes, FUA writes, zero writes
//! with and without trimming, discards and flushes against a model, and
//! compares what our client reads back and what QEMU reads over NBD with
//! it. Also: export names in every name form, errors worded as qemu-io
//! words them, a server that goes away (an error, never a panic), and
//! `oxqcow io` / `info` / `map` / `convert` next to qemu-io and qemu-img.

mod common;
use common::*;
use oxqcow::nbd::{NbdClient, NbdTarget};
use oxqcow::{BlockStatus, Error, Image, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_oxqcow");

/// A socket path short enough for sun_path (108 bytes) wherever the
/// scratch directory is: in the system's temporary directory.
fn short_sock(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("oxq-{tag}-{}-{n}.sock", std::process::id()))
}
const MIB: u64 = 1 << 20;

/// A daemonized NBD server (qemu-nbd --fork, nbdkit without -f), known
/// by its pid file; stopped with SIGTERM (or killed) by that pid.
struct Server {
    pid: i32,
    sock: PathBuf,
}

impl Server {
    fn start(prog: &str, args: &[String], sock: PathBuf, pidfile: &Path) -> Server {
        let _ = std::fs::remove_file(pidfile);
        let _ = std::fs::remove_file(&sock);
        let out = Command::new(prog).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{prog} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let t = Instant::now();
        let pid = loop {
            if let Ok(s) = std::fs::read_to_string(pidfile) {
                if let Ok(p) = s.trim().parse() {
                    break p;
                }
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{prog}: no pid file");
            std::thread::sleep(Duration::from_millis(10));
        };
        Server { pid, sock }
    }

    /// qemu-nbd -k SOCK --fork ARGS (ARGS end with the file).
    fn qemu_nbd(dir: &Scratch, args: &[&str]) -> Server {
        let sock = short_sock("qnbd");
        let pidf = dir.path("qnbd.pid");
        let mut a = vec![
            "--fork".to_string(),
            format!("--pid-file={}", pidf.display()),
            "-k".into(),
            sock.display().to_string(),
        ];
        a.extend(args.iter().map(|s| s.to_string()));
        Server::start("qemu-nbd", &a, sock, &pidf)
    }

    /// nbdkit -U SOCK -P PIDFILE ARGS.
    fn nbdkit(dir: &Scratch, args: &[&str]) -> Server {
        let sock = short_sock("nbdkit");
        let pidf = dir.path("nbdkit.pid");
        let mut a = vec![
            "-U".to_string(),
            sock.display().to_string(),
            "-P".into(),
            pidf.display().to_string(),
        ];
        a.extend(args.iter().map(|s| s.to_string()));
        Server::start("nbdkit", &a, sock, &pidf)
    }

    fn uri(&self, export: &str) -> String {
        let e = if export.is_empty() {
            String::new()
        } else {
            format!("/{export}")
        };
        format!("nbd+unix://{e}?socket={}", self.sock.display())
    }

    fn signal(&mut self, sig: i32) {
        if self.pid == 0 {
            return;
        }
        // SAFETY: plain kill(2) of the server this test started.
        unsafe { libc::kill(self.pid, sig) };
        let t = Instant::now();
        // SAFETY: kill(pid, 0) only asks whether the process exists.
        while unsafe { libc::kill(self.pid, 0) } == 0 {
            assert!(t.elapsed() < Duration::from_secs(20), "server did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.pid = 0;
    }

    fn stop(mut self) {
        self.signal(libc::SIGTERM);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = std::fs::remove_file(&self.sock);
    }
}

fn open_raw(name: &str) -> Image {
    Image::open(Path::new(name), Some("raw"), &rw()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Random requests through the client against a model of the disk;
/// returns the model.
fn exercise(img: &Image, seed: u64, ops: usize) -> Vec<u8> {
    let c = img.nbd().expect("an NBD image");
    let size = img.size();
    let mut model = vec![0u8; size as usize];
    img.read_at(&mut model, 0).unwrap();
    let mut rng = Rng(seed);
    for i in 0..ops {
        let off = rng.below(size);
        let len = (rng.below(192 << 10) + 1).min(size - off);
        let (o, l) = (off as usize, len as usize);
        match rng.below(8) {
            0..=2 => {
                let byte = (i % 250) as u8 + 1;
                let buf = vec![byte; l];
                c.write_at(&buf, off, rng.below(4) == 0).unwrap();
                model[o..o + l].fill(byte);
            }
            3 => {
                c.write_zeroes(off, len, false, rng.below(2) == 0).unwrap();
                model[o..o + l].fill(0);
            }
            4 => {
                img.write_zeroes(off, len, true).unwrap();
                model[o..o + l].fill(0);
            }
            5 => {
                // Advisory: the range may or may not read as zeros after.
                img.discard(off, len).unwrap();
                let mut after = vec![0u8; l];
                img.read_at(&mut after, off).unwrap();
                for (m, a) in model[o..o + l].iter_mut().zip(&after) {
                    assert!(*a == 0 || *a == *m, "discard produced {a:#x}");
                    *m = *a;
                }
            }
            6 => img.flush().unwrap(),
            _ => {
                let mut buf = vec![0u8; l];
                img.read_at(&mut buf, off).unwrap();
                assert!(buf == model[o..o + l], "read at {off}+{len} differs");
            }
        }
    }
    let mut all = vec![0u8; size as usize];
    img.read_at(&mut all, 0).unwrap();
    assert_eq!(first_diff(&all, &model), None, "read back differs");
    // Every extent the server calls zero reads as zeros.
    let mut pos = 0;
    while pos < size {
        let (st, n) = img.block_status(pos, size - pos).unwrap();
        assert!(n > 0 && n <= size - pos);
        if matches!(st, BlockStatus::Zero { .. }) {
            let r = pos as usize..(pos + n) as usize;
            assert!(
                model[r].iter().all(|&b| b == 0),
                "zero extent at {pos} holds data"
            );
        }
        pos += n;
    }
    model
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// QEMU's view of an export (qemu-img convert over NBD).
fn qemu_view(uri: &str, dir: &Scratch) -> Vec<u8> {
    let out = dir.path("view.raw");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        uri,
        &out.display().to_string(),
    ]);
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    v
}

#[test]
fn qemu_nbd_qcow2_export() {
    let dir = Scratch::new("nbdc-qcow2");
    let img_path = dir.path("a.qcow2");
    let p = img_path.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &p, "24M"]);
    qemu_io(&img_path, &["write -P 0x5a 1M 3M", "write -z 8M 1M"]);
    let srv = Server::qemu_nbd(
        &dir,
        &[
            "-t",
            "-e",
            "4",
            "-f",
            "qcow2",
            "--discard=unmap",
            "-x",
            "disk",
            &p,
        ],
    );
    let img = open_raw(&srv.uri("disk"));
    assert_eq!(img.size(), 24 * MIB);
    let c = img.nbd().unwrap();
    assert!(c.has_block_status() && c.can_fua() && c.can_trim() && c.can_zero());
    assert!(!c.read_only());
    let model = exercise(&img, 0x5eed_0001, 250);
    assert_eq!(
        first_diff(&qemu_view(&srv.uri("disk"), &dir), &model),
        None,
        "QEMU reads other data over NBD"
    );
    img.close().unwrap();
    srv.stop();
    assert_clean(&img_path);
    assert_eq!(first_diff(&read_all_qemu(&img_path, &dir), &model), None);
}

#[test]
fn qemu_nbd_raw_export_over_tcp_and_unix() {
    let dir = Scratch::new("nbdc-raw");
    let f = dir.path("disk.raw");
    let p = f.display().to_string();
    qemu_img(&["create", "-q", "-f", "raw", &p, "16M"]);
    let srv = Server::qemu_nbd(&dir, &["-t", "-f", "raw", "--discard=unmap", &p]);
    let img = open_raw(&format!("nbd:unix:{}", srv.sock.display()));
    let mut model = exercise(&img, 0x5eed_0002, 200);
    img.close().unwrap();
    srv.stop();
    assert_eq!(first_diff(&std::fs::read(&f).unwrap(), &model), None);

    // The same file over TCP on a port the kernel picked.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let pidf = dir.path("tcp.pid");
    let args: Vec<String> = [
        "--fork",
        &format!("--pid-file={}", pidf.display()),
        "-b",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        "-f",
        "raw",
        "-x",
        "t",
        &p,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let srv = Server::start("qemu-nbd", &args, PathBuf::new(), &pidf);
    for name in [
        format!("nbd://127.0.0.1:{port}/t"),
        format!("nbd:127.0.0.1:{port}:exportname=t"),
        format!("nbd+tcp://localhost:{port}/t"),
    ] {
        let img = open_raw(&name);
        let mut b = vec![0u8; 16 * MIB as usize];
        img.read_at(&mut b, 0).unwrap();
        assert_eq!(first_diff(&b, &model), None, "{name}");
        img.write_at(b"tcp", 5).unwrap();
        img.close().unwrap();
        model[5..8].copy_from_slice(b"tcp");
    }
    srv.stop();
    assert_eq!(&std::fs::read(&f).unwrap()[5..8], b"tcp");
}

/// nbdkit's memory plugin in the modes that take the client's other paths.
#[test]
fn nbdkit_modes() {
    let dir = Scratch::new("nbdc-nbdkit");
    // (what, options and filters, parameters after the plugin's)
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("default", &[], &[]),
        ("simple replies", &["--no-sr"], &[]),
        ("oldstyle", &["-o"], &[]),
        (
            "4 KiB blocks",
            &["--filter=blocksize-policy"],
            &[
                "blocksize-minimum=4096",
                "blocksize-maximum=65536",
                "blocksize-error-policy=error",
            ],
        ),
        (
            "no zero, no extents",
            &["--filter=nozero", "--filter=noextents"],
            &[],
        ),
    ];
    for (i, (what, opts, params)) in cases.iter().enumerate() {
        let plugin = if *what == "oldstyle" {
            "pattern"
        } else {
            "memory"
        };
        let mut args: Vec<&str> = opts.to_vec();
        args.extend([plugin, "size=12M"]);
        args.extend(params.iter());
        let srv = Server::nbdkit(&dir, &args);
        let img = if *what == "oldstyle" {
            let ro = OpenOptions::default();
            Image::open(Path::new(&srv.uri("")), Some("raw"), &ro).unwrap()
        } else {
            open_raw(&srv.uri(""))
        };
        let c = img.nbd().unwrap();
        match *what {
            "simple replies" | "oldstyle" => assert!(!c.has_block_status(), "{what}"),
            "4 KiB blocks" => {
                assert_eq!(c.info().min_block, 4096);
                assert_eq!(c.info().max_payload, 65536);
            }
            // nbdkit still offers base:allocation, reporting all data.
            "no zero, no extents" => assert!(!c.can_zero(), "{what}"),
            _ => assert!(c.has_block_status()),
        }
        let model = if *what == "oldstyle" {
            // nbdkit 1.32 fails every write of an oldstyle client with
            // EINVAL (qemu-io's too): reads only, of a known pattern.
            let mut all = vec![0u8; img.size() as usize];
            img.read_at(&mut all, 0).unwrap();
            for (k, w) in all.chunks(8).enumerate() {
                assert_eq!(w, (k as u64 * 8).to_be_bytes(), "{what}");
            }
            all
        } else {
            exercise(&img, 0x5eed_0100 + i as u64, 150)
        };
        assert_eq!(
            first_diff(&qemu_view(&srv.uri(""), &dir), &model),
            None,
            "{what}: QEMU reads other data"
        );
        img.close().unwrap();
        srv.stop();
    }
}

#[test]
fn export_names_and_errors() {
    let dir = Scratch::new("nbdc-names");
    let f = dir.path("d.qcow2");
    let p = f.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &p, "4M"]);
    qemu_io(&f, &["write -P 0x11 0 64k"]);
    let srv = Server::qemu_nbd(&dir, &["-t", "-f", "qcow2", "-x", "foo", &p]);
    let s = srv.sock.display().to_string();
    for name in [
        format!("nbd:unix:{s}:exportname=foo"),
        format!("nbd+unix:///foo?socket={s}"),
    ] {
        let img = Image::open(Path::new(&name), None, &OpenOptions::default()).unwrap();
        assert_eq!(img.format(), "raw");
        assert_eq!(
            img.nbd().unwrap().name(),
            format!("nbd+unix:///foo?socket={s}")
        );
        let mut b = [0u8; 4];
        img.read_at(&mut b, 100).unwrap();
        assert_eq!(b, [0x11; 4]);
    }
    let opts = [
        ("server.type", "unix"),
        ("server.path", s.as_str()),
        ("export", "foo"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    let t = NbdTarget::from_options(&opts).unwrap();
    assert_eq!(NbdClient::connect(&t).unwrap().size(), 4 * MIB);

    let err = |name: &str| match Image::open(Path::new(name), Some("raw"), &rw()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("{name} opened"),
    };
    assert_eq!(
        err(&format!("nbd:unix:{s}")),
        "Requested export not available\nserver reported: export '' not present"
    );
    assert_eq!(
        err(&format!("nbd+unix:///bar?socket={s}")),
        "Requested export not available\nserver reported: export 'bar' not present"
    );
    let missing = short_sock("none").display().to_string();
    assert_eq!(
        err(&format!("nbd:unix:{missing}")),
        format!("Failed to connect to '{missing}': No such file or directory (os error 2)")
    );
    assert_eq!(err("nbd+unix:///x"), "No valid URL specified");
    assert_eq!(err("nbd:"), "NBD server address missing");

    // A read-only export.
    srv.stop();
    let srv = Server::qemu_nbd(&dir, &["-t", "-r", "-f", "qcow2", &p]);
    match Image::open(Path::new(&srv.uri("")), Some("raw"), &rw()) {
        Err(Error::ReadOnly(m)) => assert!(m.contains("read-only"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a read-only export opened read-write"),
    }
    let img = Image::open(Path::new(&srv.uri("")), None, &OpenOptions::default()).unwrap();
    assert!(img.nbd().unwrap().read_only());
    assert!(matches!(img.write_at(b"x", 0), Err(Error::ReadOnly(_))));
    drop(img);
    srv.stop();
    assert_clean(&f);
}

/// qemu-nbd -f raw serving a qcow2 file: probed, read as qcow2.
#[test]
fn qcow2_image_inside_an_export() {
    let dir = Scratch::new("nbdc-inner");
    let f = dir.path("i.qcow2");
    let p = f.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &p, "8M"]);
    qemu_io(
        &f,
        &[
            "write -P 0x42 12k 100k",
            "write -z 2M 64k",
            "write -P 7 7M 1M",
        ],
    );
    let srv = Server::qemu_nbd(&dir, &["-t", "-r", "-f", "raw", &p]);
    let img = Image::open(Path::new(&srv.uri("")), None, &OpenOptions::default()).unwrap();
    assert_eq!(img.format(), "qcow2");
    assert_eq!(img.size(), 8 * MIB);
    let mut all = vec![0u8; 8 * MIB as usize];
    img.read_at(&mut all, 0).unwrap();
    assert_eq!(first_diff(&all, &read_all_qemu(&f, &dir)), None);
    drop(img);
    srv.stop();
}

#[test]
fn server_that_goes_away() {
    let dir = Scratch::new("nbdc-gone");
    let f = dir.path("g.qcow2");
    let p = f.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &p, "4M"]);
    let mut srv = Server::qemu_nbd(&dir, &["-t", "-f", "qcow2", &p]);
    let img = open_raw(&srv.uri(""));
    img.write_at(&[1u8; 4096], 0).unwrap();
    srv.signal(libc::SIGKILL);
    let mut b = [0u8; 4096];
    let eio = |r: oxqcow::Result<()>| match r {
        Err(e) => assert_eq!(e.errno(), libc::EIO, "{e}"),
        Ok(()) => panic!("a request to a dead server succeeded"),
    };
    eio(img.read_at(&mut b, 0));
    assert!(img.nbd().unwrap().is_dead());
    eio(img.write_at(&b, 0));
    eio(img.write_zeroes(0, 4096, false));
    eio(img.discard(0, 65536));
    eio(img.flush());
    assert!(img.block_status(0, 4096).is_err());
    eio(img.close());
    // The socket file is still there, nobody listens.
    let e = Image::open(Path::new(&srv.uri("")), Some("raw"), &rw())
        .err()
        .expect("connected to a dead server");
    assert!(e.to_string().starts_with("Failed to connect to '"), "{e}");

    // A server that closes during the handshake.
    let sock = short_sock("closer");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        drop(s);
    });
    let e = Image::open(
        Path::new(&format!("nbd:unix:{}", sock.display())),
        None,
        &OpenOptions::default(),
    )
    .err()
    .expect("opened without a handshake");
    assert!(
        e.to_string().starts_with("Failed to read initial magic"),
        "{e}"
    );
    t.join().unwrap();
    let _ = std::fs::remove_file(&sock);
}

/// Runs qemu-io or `oxqcow io` (as "qemu-io") and returns its output
/// with timing filtered.
fn io_run(ours: bool, args: &[&str]) -> (i32, String) {
    let mut cmd = if ours {
        let mut c = Command::new(BIN);
        c.arg0("qemu-io").arg("io");
        c
    } else {
        Command::new("qemu-io")
    };
    let o = cmd.args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // GLib's own warnings from QEMU's URI parser are not part of the answer.
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.contains("GLib"))
        .map(|l| {
            if l.contains(" ops; ") {
                l.split(" ops; ").next().unwrap().to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    (o.status.code().unwrap_or(-1), lines.join("\n"))
}

#[test]
fn oxqcow_io_matches_qemu_io() {
    let dir = Scratch::new("nbdc-cli");
    let f = dir.path("c.qcow2");
    let p = f.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &p, "16M"]);
    qemu_io(&f, &["write -P 0xa 4k 4k", "write -z 1M 1M"]);
    let srv = Server::qemu_nbd(&dir, &["-t", "-f", "qcow2", "-x", "e", &p]);
    let s = srv.sock.display().to_string();
    let legacy = format!("nbd:unix:{s}:exportname=e");
    let uri = srv.uri("e");
    let opts = format!("driver=nbd,server.type=unix,server.path={s},export=e");
    let raw_opts = format!(
        "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={s},file.export=e"
    );
    let missing = short_sock("missing").display().to_string();
    let long = format!("{}/{}.sock", dir.0.display(), "x".repeat(100));
    let cases: Vec<Vec<&str>> = vec![
        vec![
            "-f",
            "raw",
            "-c",
            "read -P 0xa 4k 4k",
            "-c",
            "read -P 0 1M 1M",
            &legacy,
        ],
        vec![
            "-f",
            "raw",
            "-c",
            "write -P 0xb 64k 12k",
            "-c",
            "read -P 0xb 64k 12k",
            &uri,
        ],
        vec![
            "-f",
            "raw",
            "-c",
            "write -z 64k 4k",
            "-c",
            "discard 2M 1M",
            "-c",
            "flush",
            &uri,
        ],
        vec![
            "-f",
            "raw",
            "-c",
            "write -f -P 3 8M 3",
            "-c",
            "read -v 8M 8",
            &uri,
        ],
        vec![
            "-f",
            "raw",
            "-c",
            "map",
            "-c",
            "alloc 0 16M",
            "-c",
            "length",
            "-c",
            "info",
            &uri,
        ],
        vec!["-r", "-c", "info", "-c", "write 0 1", &legacy],
        vec!["-f", "qcow2", "-c", "info", &legacy],
        vec![
            "--image-opts",
            "-c",
            "read -P 0xa 4k 4k",
            "-c",
            "info",
            &opts,
        ],
        vec![
            "--image-opts",
            "-c",
            "read -P 0xa 4k 4k",
            "-c",
            "info",
            &raw_opts,
        ],
        vec!["-f", "raw", "-c", "read 16M 1", "-c", "truncate 32M", &uri],
        vec!["-f", "raw", "-c", "read 0 1", "nbd:unix:MISSING"],
        vec!["-f", "raw", "-c", "read 0 1", "nbd:unix:LONG"],
        vec![
            "-f",
            "raw",
            "-c",
            "read 0 1",
            "nbd+unix:///nope?socket=SOCK",
        ],
        vec!["-f", "raw", "-c", "read 0 1", "nbd+unix:///x"],
        vec!["--image-opts", "driver=nbd,export=e"],
        vec![
            "--image-opts",
            "driver=nbd,server.type=inet,server.host=127.0.0.1",
        ],
        vec!["--image-opts", "driver=nbd,host=h,path=/p"],
    ];
    for case in cases {
        let args: Vec<String> = case
            .iter()
            .map(|a| {
                a.replace("MISSING", &missing)
                    .replace("LONG", &long)
                    .replace("SOCK", &s)
            })
            .collect();
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let theirs = io_run(false, &a);
        let ours = io_run(true, &a);
        assert_eq!(ours, theirs, "qemu-io {a:?}");
    }
    // qemu-img's commands.
    for args in [
        vec!["info", legacy.as_str()],
        vec!["info", "--output=json", "-f", "raw", uri.as_str()],
        vec!["map", "-f", "raw", uri.as_str()],
        vec!["map", "--output=json", legacy.as_str()],
    ] {
        let (c1, o1, e1) = run("qemu-img", &args);
        let (c2, o2, e2) = run(BIN, &args);
        assert_eq!((c2, o2), (c1, o1), "qemu-img {args:?}: {e1} / {e2}");
    }
    let out = dir.path("copy.qcow2").display().to_string();
    let (code, o, e) = run(BIN, &["convert", "-f", "raw", "-O", "qcow2", &uri, &out]);
    assert_eq!(code, 0, "{o}{e}");
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", &uri, &out]);
    srv.stop();
    assert_clean(&f);
}
