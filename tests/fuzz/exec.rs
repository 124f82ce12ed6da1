//! Drives one mutant through the engine's Rust API, the C ABI and the
//! `oxqcow` tool. Each returns the operations' outcomes as text; a panic
//! propagates to the campaign (which catches it to report the case), and
//! the campaign compares the file's bytes around read-only drivers.

use super::seeds::Seed;
use super::Rng;
use oxqcow::{Image, OpenOptions};
use std::ffi::{CStr, CString};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn opts(seed: &Seed, writable: bool, check_mode: bool) -> OpenOptions {
    OpenOptions {
        writable,
        check_mode,
        key_secret: seed
            .secret
            .map(|s| oxqcow::crypto::Secret(s.as_bytes().to_vec())),
        ..Default::default()
    }
}

fn note<T>(log: &mut String, what: &str, r: oxqcow::Result<T>) -> bool {
    match r {
        Ok(_) => {
            log.push_str(what);
            log.push_str(" ok; ");
            true
        }
        Err(e) => {
            log.push_str(&format!("{what}: {e} ({}); ", -e.errno()));
            false
        }
    }
}

/// Guest offsets worth touching: the start, a random place, the end.
fn offsets(rng: &mut Rng, size: u64) -> [u64; 3] {
    let size = size.min(1 << 40);
    [0, rng.below(size.max(1)), size.saturating_sub(70_000)]
}

/// Read-only operations: open, read, block status, check, snapshots
/// (listed, loaded temporarily), bitmaps, VM state.
pub fn api_ro(path: &Path, seed: &Seed, rng: &mut Rng) -> String {
    let mut log = String::new();
    let img = match Image::open(path, Some("qcow2"), &opts(seed, false, false)) {
        Ok(i) => i,
        Err(e) => return format!("open ro: {e}"),
    };
    let size = img.size();
    let mut buf = vec![0u8; 70_000];
    for off in offsets(rng, size) {
        note(&mut log, "read", img.read_at(&mut buf, off));
    }
    let mut off = 0;
    for _ in 0..64 {
        match img.block_status(off, size.saturating_sub(off)) {
            Ok((_, n)) if n > 0 => off += n,
            r => {
                note(&mut log, "block_status", r);
                break;
            }
        }
        if off >= size {
            break;
        }
    }
    if let Some(q) = img.qcow2() {
        note(&mut log, "bitmap_list", q.bitmap_list());
        if let Ok(list) = q.bitmap_list() {
            for b in list.iter().take(2) {
                note(&mut log, "bitmap_dirty", q.bitmap_dirty(&b.name));
            }
        }
        let mut v = vec![0u8; 8192];
        note(
            &mut log,
            "read_vmstate",
            q.read_vmstate(&mut v, rng.below(100_000)),
        );
        let snaps = q.snapshots();
        if let Some(s) = snaps.get(rng.below(snaps.len().max(1) as u64) as usize) {
            if note(&mut log, "load_tmp", q.snapshot_load_tmp(Some(&s.id), None)) {
                for off in offsets(rng, size) {
                    note(&mut log, "snap read", img.read_at(&mut buf, off));
                }
            }
        }
    }
    note(&mut log, "close", img.close());
    drop(img);
    if let Ok(img) = Image::open(path, Some("qcow2"), &opts(seed, false, true)) {
        if let Some(q) = img.qcow2() {
            note(&mut log, "check", q.check(0, &mut |_| {}));
        }
    }
    log
}

/// Read-write operations, a random sequence of them. Returns the log and
/// whether every operation (and the close) succeeded.
pub fn api_rw(path: &Path, seed: &Seed, rng: &mut Rng) -> (String, bool) {
    let mut log = String::new();
    if rng.below(4) == 0 {
        // check -r all on the damaged image.
        let img = match Image::open(path, Some("qcow2"), &opts(seed, true, true)) {
            Ok(i) => i,
            Err(e) => return (format!("open check rw: {e}"), false),
        };
        let mut ok = true;
        if let Some(q) = img.qcow2() {
            ok &= note(&mut log, "check -r all", q.check(3, &mut |_| {}));
            note(&mut log, "recheck", q.check(0, &mut |_| {}));
        }
        ok &= note(&mut log, "close", img.close());
        return (log, ok);
    }
    let img = match Image::open(path, Some("qcow2"), &opts(seed, true, false)) {
        Ok(i) => i,
        Err(e) => return (format!("open rw: {e}"), false),
    };
    let size = img.size();
    let mut ok = true;
    let buf = vec![0xc3u8; 70_000];
    for _ in 0..2 + rng.below(5) {
        let off = offsets(rng, size)[rng.below(3) as usize];
        let len = 1 + rng.below(200_000);
        let q = img.qcow2();
        ok &= match rng.below(19) {
            0..=3 => note(
                &mut log,
                "write",
                img.write_at(&buf[..len.min(70_000) as usize], off),
            ),
            4 => note(&mut log, "write_zeroes", img.write_zeroes(off, len, false)),
            5 => note(
                &mut log,
                "write_zeroes unmap",
                img.write_zeroes(off, len, true),
            ),
            6 => note(&mut log, "discard", img.discard(off, len)),
            7 => note(&mut log, "block_status", img.block_status(off, len)),
            8 => note(
                &mut log,
                "snapshot create",
                q.unwrap().snapshot_create("fz"),
            ),
            9 => {
                let q = q.unwrap();
                match q.snapshots().first() {
                    Some(s) => note(&mut log, "snapshot apply", q.snapshot_apply(&s.id)),
                    None => true,
                }
            }
            10 => {
                let q = q.unwrap();
                match q.snapshots().last() {
                    Some(s) => note(&mut log, "snapshot delete", q.snapshot_delete(&s.id)),
                    None => true,
                }
            }
            11 => {
                let o = [
                    "compat=0.10",
                    "compat=1.1",
                    "lazy_refcounts=on",
                    "refcount_bits=16",
                    "refcount_bits=1",
                    "size=8M",
                ][rng.below(6) as usize];
                let a = oxqcow::engine::AmendOptions::parse(o).unwrap();
                note(&mut log, &format!("amend {o}"), q.unwrap().amend(&a))
            }
            12 => {
                let new = [size + 1_048_576, size / 2 / 512 * 512, size * 3][rng.below(3) as usize];
                note(&mut log, &format!("resize {new}"), img.resize(new))
            }
            13 => {
                let q = q.unwrap();
                if rng.below(2) == 0 {
                    note(&mut log, "bitmap add", q.bitmap_add("fzb", None, true))
                } else {
                    match q.bitmap_list() {
                        Ok(l) if !l.is_empty() => {
                            note(&mut log, "bitmap remove", q.bitmap_remove(&l[0].name))
                        }
                        _ => true,
                    }
                }
            }
            14 => note(
                &mut log,
                "write_vmstate",
                q.unwrap().write_vmstate(&buf[..4096], rng.below(300_000)),
            ),
            15 => {
                let q = q.unwrap();
                let cs = q.cluster_size();
                let at = off / cs * cs;
                let mut data = vec![0x5au8; cs as usize];
                data[..cs as usize / 2].fill(0);
                note(&mut log, "write_compressed", q.write_compressed(&data, at))
            }
            16 => note(&mut log, "make_empty", q.unwrap().make_empty()),
            17 => note(
                &mut log,
                "change_backing_file",
                q.unwrap().change_backing_file(None, None),
            ),
            _ => note(&mut log, "flush", img.flush()),
        };
    }
    ok &= note(&mut log, "close", img.close());
    (log, ok)
}

/// The C ABI on one mutant: what a C program linking liboxqcow sees.
/// Returns the log; "internal error" in it means the panic guard fired.
pub fn capi(path: &Path, rng: &mut Rng) -> String {
    use oxqcow::ffi::*;
    let mut log = String::new();
    let name = CString::new(path.display().to_string()).unwrap();
    let last = || {
        // SAFETY: bdrv_last_error returns a NUL-terminated thread-local string.
        unsafe { CStr::from_ptr(bdrv_last_error()) }
            .to_string_lossy()
            .into_owned()
    };
    for flags in [0, BDRV_O_RDWR, BDRV_O_RDWR | BDRV_O_CHECK] {
        // SAFETY: every pointer passed below is valid for the call.
        unsafe {
            let bs = bdrv_new(c"fuzz".as_ptr());
            let r = bdrv_open(bs, name.as_ptr(), flags, &raw mut bdrv_qcow2);
            if r < 0 {
                log.push_str(&format!("open {flags:#x}: {r} {}; ", last()));
                bdrv_delete(bs);
                continue;
            }
            let len = bdrv_getlength(bs).max(0);
            let mut buf = vec![0u8; 65536];
            let mut step = |what: &str, r: i64| {
                if r < 0 {
                    log.push_str(&format!("{what}: {r} {}; ", last()));
                }
            };
            for off in offsets(rng, len as u64) {
                let r = bdrv_pread(bs, off as i64, buf.as_mut_ptr().cast(), 65536);
                step("pread", r as i64);
            }
            let (mut pnum, mut map, mut depth) = (0i64, 0i64, 0i32);
            let r = bdrv_block_status(bs, 0, len, &mut pnum, &mut map, &mut depth);
            step("block_status", r as i64);
            let mut list = std::ptr::null_mut();
            let n = bdrv_snapshot_list(bs, &mut list);
            step("snapshot_list", n as i64);
            if n > 0 {
                bdrv_snapshot_list_free(list);
            }
            if flags & BDRV_O_CHECK != 0 {
                let mut res: BdrvCheckResult = std::mem::zeroed();
                let r = bdrv_check(bs, &mut res, BDRV_FIX_LEAKS | BDRV_FIX_ERRORS);
                step("check -r all", r as i64);
            } else if flags & BDRV_O_RDWR != 0 {
                let off = offsets(rng, len as u64)[rng.below(3) as usize] as i64;
                let r = bdrv_pwrite(
                    bs,
                    off,
                    buf.as_ptr().cast(),
                    4096 + rng.below(60_000) as i32,
                );
                step("pwrite", r as i64);
                step(
                    "pwrite_zeroes",
                    bdrv_pwrite_zeroes(bs, off, 131072, BDRV_REQ_MAY_UNMAP) as i64,
                );
                step("pdiscard", bdrv_pdiscard(bs, off, 131072) as i64);
                if rng.below(3) == 0 {
                    let mut sn: QEMUSnapshotInfo = std::mem::zeroed();
                    sn.name[0] = b'x' as _;
                    step("snapshot_create", bdrv_snapshot_create(bs, &mut sn) as i64);
                }
                if rng.below(4) == 0 {
                    step("truncate", bdrv_truncate(bs, len + 65536) as i64);
                }
                step("flush", bdrv_flush(bs) as i64);
            } else {
                let mut res: BdrvCheckResult = std::mem::zeroed();
                step("check", bdrv_check(bs, &mut res, 0) as i64);
            }
            bdrv_delete(bs);
        }
    }
    log
}

/// What running the tool on a mutant showed.
pub struct CliRun {
    pub args: Vec<String>,
    /// None: killed by a signal (or by the timeout).
    pub code: Option<i32>,
    pub timed_out: bool,
    pub stderr: String,
    pub read_only: bool,
}

/// Runs one `oxqcow` command on the mutant, chosen at random; `read_only`
/// says the command must not write the image.
pub fn cli(
    bin: &Path,
    path: &Path,
    seed: &Seed,
    work: &Path,
    rng: &mut Rng,
    timeout: Duration,
) -> CliRun {
    let p = path.display().to_string();
    let orig = seed.image.display().to_string();
    let out = |n: &str| work.join(n).display().to_string();
    let ro: &[&[&str]] = &[
        &["info", "%"],
        &["info", "--output=json", "--backing-chain", "%"],
        &["check", "%"],
        &["check", "--output=json", "%"],
        &["map", "%"],
        &["map", "--output=json", "%"],
        &["snapshot", "-l", "%"],
        &["compare", "%O", "%"],
        &["convert", "-O", "raw", "%", "%R"],
        &["convert", "-O", "qcow2", "%", "%Q"],
        &[
            "io",
            "-r",
            "-c",
            "read 0 64k",
            "-c",
            "map",
            "-c",
            "read -v 1M 512",
            "%",
        ],
        &["measure", "-O", "qcow2", "%"],
        &["convert", "-l", "1", "-O", "raw", "%", "%R"],
        &[
            "create", "-q", "-f", "qcow2", "-b", "%", "-F", "qcow2", "%Q",
        ],
        &["io", "-r", "-c", "read -b 0 64k", "-c", "read 3M 64k", "%"],
        &["compare", "%", "%"],
    ];
    let rw: &[&[&str]] = &[
        &["check", "-r", "all", "%"],
        &["check", "-r", "leaks", "%"],
        &["amend", "-o", "compat=0.10", "%"],
        &["amend", "-o", "refcount_bits=16", "%"],
        &["amend", "-o", "lazy_refcounts=on", "%"],
        &["snapshot", "-c", "fz", "%"],
        &["snapshot", "-a", "1", "%"],
        &["snapshot", "-d", "1", "%"],
        &["resize", "%", "+1M"],
        &["resize", "--shrink", "%", "2M"],
        &["bitmap", "--add", "%", "fzb"],
        &["bitmap", "--remove", "%", "b1"],
        &["bitmap", "--clear", "%", "b2"],
        &["bitmap", "--merge", "b1", "%", "b3"],
        &["rebase", "-u", "-b", "", "%"],
        &[
            "io",
            "-c",
            "write -c 0 64k",
            "-c",
            "write -b 0 64k",
            "-c",
            "read -b 0 64k",
            "%",
        ],
        &[
            "io",
            "-c",
            "write -P 0x55 0 64k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "discard 2M 64k",
            "-c",
            "write -P 7 3M 100k",
            "%",
        ],
    ];
    let read_only = rng.below(2) == 0;
    let pick = if read_only {
        ro[rng.below(ro.len() as u64) as usize]
    } else {
        rw[rng.below(rw.len() as u64) as usize]
    };
    let mut args: Vec<String> = Vec::new();
    let secret = seed.secret.filter(|_| pick[0] == "io");
    if let Some(pw) = secret {
        args.push(pick[0].into());
        args.push("--object".into());
        args.push(format!("secret,id=sec0,data={pw}"));
        args.push("--image-opts".into());
    }
    for (i, a) in pick.iter().enumerate() {
        if secret.is_some() && i == 0 {
            continue;
        }
        args.push(match *a {
            "%" if secret.is_some() => {
                format!("driver=qcow2,file.filename={p},encrypt.key-secret=sec0")
            }
            "%" => p.clone(),
            "%O" => orig.clone(),
            "%R" => out("out.raw"),
            "%Q" => out("out.qcow2"),
            x => x.to_string(),
        });
    }
    let _ = std::fs::remove_file(work.join("out.raw"));
    let _ = std::fs::remove_file(work.join("out.qcow2"));
    let mut child = Command::new(bin)
        .args(&args)
        .current_dir(work)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run oxqcow");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    CliRun {
        args,
        code: status.code(),
        timed_out,
        // A killed child's own children may hold the pipe: do not wait.
        stderr: if timed_out {
            String::new()
        } else {
            reader.join().unwrap()
        },
        read_only,
    }
}
