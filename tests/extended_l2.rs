//! Extended L2 entries (subclusters) against QEMU 10: creation byte for
//! byte, reading what qemu-io writes, writing what qemu-io would write
//! (the raw 128-bit L2 entries, `qemu-img map --output=json`, the guest
//! data and `qemu-img check` all equal), a randomized sequence of writes,
//! zero writes and discards over a backing file checked against a raw
//! model, snapshots, amend, resize, and hostile entries.

mod common;
use common::*;
use oxqcow::engine::{CreateOptions, OpenOptions, Qcow2};
use std::path::Path;

/// Every (entry, bitmap) pair of the active L2 tables, with its guest
/// cluster: the raw state to compare with what QEMU leaves.
fn l2_dump(path: &Path) -> Vec<(u64, u64, u64)> {
    let f = std::fs::read(path).unwrap();
    let be32 = |o: usize| u32::from_be_bytes(f[o..o + 4].try_into().unwrap());
    let be64 = |o: usize| u64::from_be_bytes(f[o..o + 8].try_into().unwrap());
    let cb = be32(20);
    let cs = 1usize << cb;
    let ext = be64(72) & 16 != 0;
    let es = if ext { 16 } else { 8 };
    let (l1n, l1o) = (be32(36) as usize, be64(40) as usize);
    let mut out = Vec::new();
    for i in 0..l1n {
        let l2 = (be64(l1o + 8 * i) & 0x00ff_ffff_ffff_fe00) as usize;
        if l2 == 0 {
            continue;
        }
        for j in 0..cs / es {
            let e = be64(l2 + j * es);
            let b = if ext { be64(l2 + j * es + 8) } else { 0 };
            if e != 0 || b != 0 {
                out.push(((i * (cs / es) + j) as u64, e, b));
            }
        }
    }
    out
}

fn map_json(path: &Path) -> String {
    qemu_img(&["map", "--output=json", "-f", "qcow2", &s(path)])
}

/// A 1 MiB extended-L2 backing file: pattern 0x11 but for the last
/// 100 KiB, zero subclusters there.
fn make_backing(dir: &Scratch) -> String {
    let b = dir.path("base.qcow2");
    create_qcow2(&b, "1M", &["-o", "extended_l2=on"]);
    qemu_io(&b, &["write -P 0x11 0 1M", "write -z 924k 100k"]);
    s(&b)
}

/// Runs `cmds` with qemu-io on one copy and `oxqcow io` on another of
/// the same fresh image, and asserts that QEMU cannot tell them apart.
fn same_as_qemu_io(dir: &Scratch, opts: &str, cmds: &[&str]) {
    same_as_qemu_io_with(dir, opts, cmds, true)
}

/// Without `same_hosts`, host offsets may differ: where a freed cluster
/// is reused is the allocator's business (QEMU's reuses a discarded
/// cluster later than ours in some sequences, with standard entries too).
fn same_as_qemu_io_with(dir: &Scratch, opts: &str, cmds: &[&str], same_hosts: bool) {
    let q = dir.path("qemu.qcow2");
    let o = dir.path("ours.qcow2");
    let _ = std::fs::remove_file(&q);
    let _ = std::fs::remove_file(&o);
    create_qcow2(&q, "1M", &["-o", opts]);
    std::fs::copy(&q, &o).unwrap();
    let (code, out, err) = ox_io(&o, cmds);
    assert!(code == 0 && !out.contains("failed"), "{cmds:?}: {out}{err}");
    qemu_io(&q, cmds);
    let (mut lo, mut lq) = (l2_dump(&o), l2_dump(&q));
    let (mut mo, mut mq) = (map_json(&o), map_json(&q));
    if !same_hosts {
        for e in lo.iter_mut().chain(lq.iter_mut()) {
            e.1 = (e.1 & 0x00ff_ffff_ffff_fe00 != 0) as u64 | (e.1 & 0xc000_0000_0000_0000);
        }
        // The map without host offsets, adjacent extents merged again.
        let strip = |m: &str| -> String {
            let field = |l: &str, k: &str| -> String {
                let at = l.find(&format!("\"{k}\": ")).map(|i| i + k.len() + 4);
                at.map(|i| l[i..].split([',', '}']).next().unwrap_or("").to_string())
                    .unwrap_or_default()
            };
            let mut out: Vec<(u64, u64, String)> = Vec::new();
            for l in m.lines() {
                let (start, len) = (field(l, "start"), field(l, "length"));
                let (start, len): (u64, u64) = (start.parse().unwrap(), len.parse().unwrap());
                let kind = ["depth", "present", "zero", "data", "compressed"]
                    .map(|k| field(l, k))
                    .join(" ");
                match out.last_mut() {
                    Some(last) if last.2 == kind && last.0 + last.1 == start => last.1 += len,
                    _ => out.push((start, len, kind)),
                }
            }
            format!("{out:?}")
        };
        (mo, mq) = (strip(&mo), strip(&mq));
    }
    assert_eq!(lo, lq, "L2 entries after {cmds:?}");
    assert_eq!(mo, mq, "map after {cmds:?}");
    assert_clean(&o);
    let (code, out, err) = run("qemu-img", &["compare", "-q", &s(&q), &s(&o)]);
    assert_eq!(code, 0, "{cmds:?}: {out}{err}");
}

#[test]
fn create_is_byte_identical_to_qemu_img() {
    let d = Scratch::new("extl2-create");
    let base = make_backing(&d);
    let cases: &[(&str, &str)] = &[
        ("extended_l2=on", "3M"),
        ("extended_l2=on,cluster_size=16k", "5M"),
        ("extended_l2=on,cluster_size=2M", "9M"),
        ("extended_l2=on,preallocation=metadata", "3M"),
        ("extended_l2=on,preallocation=falloc", "3M"),
        ("extended_l2=on,preallocation=full", "1M"),
        ("extended_l2=on,lazy_refcounts=on,refcount_bits=1", "3M"),
        ("extended_l2=on,compression_type=zstd", "3M"),
    ];
    let backed =
        format!("extended_l2=on,preallocation=metadata,backing_file={base},backing_fmt=qcow2");
    let mut all: Vec<(String, &str)> = cases.iter().map(|(o, n)| (o.to_string(), *n)).collect();
    all.push((backed, "1M"));
    for (opts, size) in &all {
        let q = d.path("q.qcow2");
        let o = d.path("o.qcow2");
        let _ = std::fs::remove_file(&q);
        let _ = std::fs::remove_file(&o);
        create_qcow2(&q, size, &["-o", opts]);
        let os = s(&o);
        let (code, out, err) = ox(&case::create_args(&os, size, &["-o", opts]));
        assert_eq!(code, 0, "{opts}: {out}{err}");
        assert!(
            std::fs::read(&q).unwrap() == std::fs::read(&o).unwrap(),
            "{opts}: files differ"
        );
    }
    // The Rust API's option, and QEMU's refusals with its messages.
    let p = d.path("api.qcow2");
    let o = CreateOptions {
        size: 3 << 20,
        extended_l2: true,
        ..Default::default()
    };
    oxqcow::engine::create(&p, &o).unwrap();
    assert!(Qcow2::open(&p, &OpenOptions::default())
        .unwrap()
        .extended_l2());
    let refuse = |opts: &str, size: &str, want: &str| {
        let x = s(&d.path("x.qcow2"));
        let (code, _, err) = ox(&case::create_args(&x, size, &["-o", opts]));
        assert_ne!(code, 0, "{opts}");
        assert!(err.contains(want), "{opts}: {err}");
    };
    refuse(
        "extended_l2=on,cluster_size=8k",
        "1M",
        "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
    );
    refuse(
        "extended_l2=on,compat=0.10",
        "1M",
        "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
    );
    refuse("extended_l2=on", "2P", "The image size is too large");
}

#[test]
fn reads_what_qemu_io_writes() {
    let d = Scratch::new("extl2-read");
    let base = make_backing(&d);
    for backing in [false, true] {
        let t = d.path("t.qcow2");
        let _ = std::fs::remove_file(&t);
        let mut opts = "extended_l2=on".to_string();
        if backing {
            opts += &format!(",backing_file={base},backing_fmt=qcow2");
        }
        create_qcow2(&t, "1M", &["-o", &opts]);
        qemu_io(
            &t,
            &[
                "write -P 3 3k 5k",
                "write -z 64k 4k",
                "write -z 70k 2k",
                "write -P 4 130k 200k",
                "write -c -P 5 512k 64k",
                "write -P 6 600k 1k",
                "write -z 602k 2k",
                "write -P 7 900k 100k",
                "write -z -u 960k 64k",
            ],
        );
        assert_same_view(&t, &d);
        let (code, ours, err) = ox(&["map", "--output=json", "-f", "qcow2", &s(&t)]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(ours, map_json(&t), "backing {backing}");
        let io = [
            "-c",
            "map",
            "-c",
            "alloc 0 1M",
            "-c",
            "alloc 1k 100k",
            "-c",
            "info",
        ];
        let mut a = vec!["-r", "-f", "qcow2"];
        a.extend_from_slice(&io);
        let ts = s(&t);
        a.push(&ts);
        let (_, theirs, _) = run("qemu-io", &a);
        let mut b = vec!["io"];
        b.extend_from_slice(&a);
        let (code, ours, err) = ox(&b);
        assert_eq!(code, 0, "{err}");
        assert_eq!(ours, theirs, "backing {backing}");
        assert!(ours.contains("    extended l2: true"), "{ours}");
    }
}

#[test]
fn info_says_extended_l2() {
    let d = Scratch::new("extl2-info");
    let t = d.path("t.qcow2");
    create_qcow2(&t, "1M", &["-o", "extended_l2=on"]);
    for fmt in ["human", "json"] {
        let f = format!("--output={fmt}");
        let theirs = qemu_img(&["info", &f, &s(&t)]);
        let (code, ours, err) = ox(&["info", &f, &s(&t)]);
        assert_eq!(code, 0, "{err}");
        let pick = |x: &str| -> Vec<String> {
            x.lines()
                .filter(|l| l.contains("extended"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(pick(&ours), pick(&theirs));
        assert_eq!(pick(&ours).len(), 1, "{ours}");
    }
}

#[test]
fn writes_leave_what_qemu_io_leaves() {
    let d = Scratch::new("extl2-write");
    let base = make_backing(&d);
    let plain = "extended_l2=on";
    let backed = format!("extended_l2=on,backing_file={base},backing_fmt=qcow2");
    let seqs: &[&[&str]] = &[
        // Partial head and tail subclusters of a new cluster.
        &["write -P 2 3k 5k", "write -P 3 1k 70k"],
        // Filling unallocated subclusters of an allocated cluster.
        &[
            "write -P 1 0 8k",
            "write -P 2 4k 60k",
            "write -P 3 65k 1k",
            "write -P 3 127k 2k",
            "write -P 5 190k 20k",
        ],
        // Zero writes: subclusters, whole clusters, with and without -u.
        &[
            "write -P 2 0 64k",
            "write -z 4k 4k",
            "write -z -u 8k 2k",
            "write -z 64k 64k",
            "write -z -u 128k 64k",
            "write -z 200k 3k",
            "write -z 300k 1k",
        ],
        &["write -z 4k 3k", "write -z 8k 1k", "write -P 5 33k 1"],
        // Discard works on whole clusters only.
        &["write -P 2 60k 10k", "discard 0 128k", "discard 200k 4k"],
        // Compressed clusters: overwritten in part, zeroed in part.
        &[
            "write -c -P 3 0 64k",
            "write -P 4 4k 1k",
            "write -c -P 3 64k 64k",
            "write -z 68k 4k",
            "write -c -P 7 128k 64k",
            "discard 128k 64k",
        ],
        // The end of the image.
        &[
            "write -P 3 1000k 24k",
            "write -z 1020k 4k",
            "write -P 9 1023k 1k",
        ],
    ];
    for opts in [plain, backed.as_str()] {
        for seq in seqs {
            same_as_qemu_io(&d, opts, seq);
        }
    }
}

#[test]
fn copy_on_read_allocates_only_the_subclusters_read() {
    let d = Scratch::new("extl2-cor");
    let base = d.path("base.qcow2");
    create_qcow2(&base, "64k", &[]);
    qemu_io(&base, &["write -P 0xaa 0 64k"]);
    let top = d.path("top.qcow2");
    let (bs, ts) = (s(&base), s(&top));
    let opts = ["-o", "extended_l2=on", "-F", "qcow2", "-b", &bs];
    let (code, _, err) = ox(&case::create_args(&ts, "64k", &opts));
    assert_eq!(code, 0, "{err}");
    let io = |args: &[&str]| {
        let mut a = vec!["io", "-f", "qcow2"];
        a.extend_from_slice(args);
        a.push(&ts);
        let (code, out, err) = ox(&a);
        assert_eq!(code, 0, "{err}");
        assert!(!out.contains("fail"), "{out}");
        out
    };
    io(&["-c", "write -P 0xbb 28K 2K", "-c", "write -P 0xcc 34K 2K"]);
    io(&["-C", "-c", "read -P 0xaa 30K 4K"]);
    let map = io(&["-c", "map"]);
    assert_eq!(
        map,
        "28 KiB (0x7000) bytes not allocated at offset 0 bytes (0x0)\n\
         8 KiB (0x2000) bytes     allocated at offset 28 KiB (0x7000)\n\
         28 KiB (0x7000) bytes not allocated at offset 36 KiB (0x9000)\n"
    );
    assert_clean(&top);
}

/// Random writes, zero writes and discards over a backing file, through
/// `oxqcow io` and qemu-io alike, checked against a raw model of the disk
/// and against each other.
#[test]
fn random_operations_match_qemu_and_the_model() {
    let d = Scratch::new("extl2-random");
    let base = make_backing(&d);
    let base_view = read_all_qemu(Path::new(&base), &d);
    for seed in 1..=6u64 {
        let mut rng = Rng(seed * 0x9e37_79b9_7f4a_7c15);
        let mut model = base_view.clone();
        let mut cmds = Vec::new();
        // QEMU compresses only into clusters without a host cluster, and
        // its allocator does not reuse a freed compressed cluster at once
        // (for standard entries too; not what this test is about): the
        // last two clusters get one compressed write each, and nothing else.
        let mut compressed = vec![14u64, 15];
        for i in 0..40 {
            let len = match rng.below(4) {
                0 => 1 + rng.below(3000),
                1 => 512 * (1 + rng.below(8)),
                2 => 2048 * (1 + rng.below(40)),
                _ => 1 + rng.below(150_000),
            };
            let off = rng.below((896 << 10) - len);
            let pat = (i % 250 + 1) as u8;
            let op = match rng.below(8) {
                7 if compressed.is_empty() => 0,
                op => op,
            };
            match op {
                0..=3 => {
                    cmds.push(format!("write -P {pat} {off} {len}"));
                    model[off as usize..(off + len) as usize].fill(pat);
                }
                4 | 5 => {
                    let u = if rng.below(2) == 0 { "-u " } else { "" };
                    cmds.push(format!("write -z {u}{off} {len}"));
                    model[off as usize..(off + len) as usize].fill(0);
                }
                6 => {
                    // Discard drops whole clusters (reading zeros after).
                    cmds.push(format!("discard {off} {len}"));
                    let a = off.div_ceil(65536) * 65536;
                    let b = (off + len) / 65536 * 65536;
                    if b > a {
                        model[a as usize..b as usize].fill(0);
                    }
                }
                _ => {
                    let c = compressed.pop().unwrap_or(14) * 65536;
                    cmds.push(format!("write -c -P {pat} {c} 65536"));
                    model[c as usize..c as usize + 65536].fill(pat);
                }
            }
        }
        let refs: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
        let opts = format!("extended_l2=on,backing_file={base},backing_fmt=qcow2");
        same_as_qemu_io_with(&d, &opts, &refs, false);
        let ours = d.path("ours.qcow2");
        assert!(
            read_all_ours(&ours) == model,
            "seed {seed}: data differs from the model"
        );
        assert!(
            read_all_qemu(&ours, &d) == model,
            "seed {seed}: QEMU sees other data"
        );
    }
}

#[test]
fn snapshots_share_and_copy_subclusters_as_qemu_does() {
    let d = Scratch::new("extl2-snap");
    let base = make_backing(&d);
    let opts = format!("extended_l2=on,backing_file={base},backing_fmt=qcow2");
    let q = d.path("qemu.qcow2");
    let o = d.path("ours.qcow2");
    create_qcow2(&q, "1M", &["-o", &opts]);
    qemu_io(
        &q,
        &["write -P 2 3k 5k", "write -P 3 70k 2k", "write -z 72k 2k"],
    );
    std::fs::copy(&q, &o).unwrap();
    qemu_img(&["snapshot", "-c", "s1", &s(&q)]);
    let (code, _, err) = ox(&["snapshot", "-c", "s1", &s(&o)]);
    assert_eq!(code, 0, "{err}");
    // Writes into clusters shared with the snapshot copy them.
    let cmds = ["write -P 4 10k 1k", "write -P 5 66k 2k", "write -z 0 2k"];
    qemu_io(&q, &cmds);
    let (code, out, err) = ox_io(&o, &cmds);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(l2_dump(&o), l2_dump(&q));
    assert_eq!(map_json(&o), map_json(&q));
    assert_clean(&o);
    let before = read_all_qemu(&o, &d);
    // Back to the snapshot, then delete it.
    let (code, _, err) = ox(&["snapshot", "-a", "s1", &s(&o)]);
    assert_eq!(code, 0, "{err}");
    qemu_img(&["snapshot", "-a", "s1", &s(&q)]);
    assert_eq!(read_all_ours(&o), read_all_qemu(&q, &d));
    assert_ne!(read_all_ours(&o), before);
    let (code, _, err) = ox(&["snapshot", "-d", "s1", &s(&o)]);
    assert_eq!(code, 0, "{err}");
    assert_clean(&o);
    assert_same_view(&o, &d);
}

#[test]
fn amend_resize_and_check() {
    let d = Scratch::new("extl2-amend");
    let t = d.path("t.qcow2");
    create_qcow2(&t, "1M", &["-o", "extended_l2=on"]);
    qemu_io(&t, &["write -P 1 3k 5k", "write -P 2 900k 4k"]);
    let amend = |o: &str| {
        let (code, _, err) = ox(&["amend", "-o", o, &s(&t)]);
        let (qcode, _, qerr) = run("qemu-img", &["amend", "-o", o, &s(&t)]);
        assert_ne!(code, 0);
        assert_eq!(code, qcode);
        let last = |e: &str| {
            e.lines()
                .last()
                .unwrap_or("")
                .split(": ")
                .last()
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(last(&err), last(&qerr), "{o}");
    };
    amend("compat=0.10");
    amend("extended_l2=off");
    // Shrink past the data, grow again: the tail reads zeros.
    let (code, _, err) = ox(&["resize", "--shrink", &s(&t), "902k"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = ox(&["resize", &s(&t), "3M"]);
    assert_eq!(code, 0, "{err}");
    assert_clean(&t);
    assert_same_view(&t, &d);
    let v = read_all_ours(&t);
    assert_eq!(v.len(), 3 << 20);
    assert!(v[900 * 1024..902 * 1024].iter().all(|&b| b == 2));
    assert!(v[902 * 1024..].iter().all(|&b| b == 0));
    // check on a clean image, as QEMU words it.
    let (code, out, _) = ox(&["check", &s(&t)]);
    assert_eq!(code, 0);
    assert!(out.contains("No errors were found on the image."), "{out}");
}

/// Writes `v` at byte `at` of the first L2 table (at 0x40000 in a fresh
/// 1 MiB image with 64 KiB clusters).
fn poke(path: &Path, at: u64, v: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&v.to_be_bytes(), 0x40000 + at).unwrap();
}

#[test]
fn hostile_entries_give_errors_and_qemus_check_report() {
    let d = Scratch::new("extl2-hostile");
    let cases: &[(u64, u64, &str)] = &[
        (
            8,
            0x1_0000_0001,
            "ERROR offset=50000: Allocated cluster has corrupted subcluster allocation bitmap",
        ),
        (
            16,
            0,
            "ERROR: Unallocated cluster has non-zero subcluster allocation map",
        ),
        (
            0,
            0x4000_0000_0005_0000,
            "ERROR compressed cluster 0 with non-zero subcluster allocation bitmap, entry=0x4000000000050000",
        ),
    ];
    for &(at, v, want) in cases {
        let t = d.path("t.qcow2");
        let _ = std::fs::remove_file(&t);
        create_qcow2(&t, "1M", &["-o", "extended_l2=on"]);
        qemu_io(&t, &["write 0 8k", "write 64k 4k"]);
        poke(&t, at, v);
        let c = d.path("c.qcow2");
        std::fs::copy(&t, &c).unwrap();
        let (qcode, qout, qerr) = run("qemu-img", &["check", &s(&c)]);
        let (code, out, err) = ox(&["check", &s(&t)]);
        assert_eq!((code, out.as_str()), (qcode, qout.as_str()), "{want}");
        assert!(err.contains(want) && qerr.contains(want), "{err}");
        // Reading the bad cluster is an error, never a panic.
        let img = Qcow2::open(&t, &OpenOptions::default()).unwrap();
        let bad = if at >= 16 { 64 << 10 } else { 0 };
        let mut buf = vec![0u8; 4096];
        if at != 0 {
            let e = img.read_at(&mut buf, bad).unwrap_err();
            assert!(e.to_string().contains("Invalid cluster entry found"), "{e}");
            assert!(img.block_status(bad, 4096).is_err());
        } else {
            assert!(img.read_at(&mut buf, bad).is_err());
        }
    }
    // Subclusters of 256 bytes (8 KiB clusters): refused as QEMU does.
    let t = d.path("small.qcow2");
    create_qcow2(&t, "1M", &["-o", "cluster_size=8k"]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&t).unwrap();
        f.write_all_at(&16u64.to_be_bytes(), 72).unwrap();
    }
    let e = Qcow2::open(&t, &OpenOptions::default()).err().unwrap();
    assert!(
        e.to_string().contains("Unsupported subcluster size: 256"),
        "{e}"
    );
    // An L2 table past the end of the file (a truncated image).
    let t = d.path("trunc.qcow2");
    create_qcow2(&t, "1M", &["-o", "extended_l2=on"]);
    qemu_io(&t, &["write 0 8k"]);
    let f = std::fs::OpenOptions::new().write(true).open(&t).unwrap();
    f.set_len(0x48000).unwrap();
    let img = Qcow2::open(&t, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(img.read_at(&mut buf, 0).is_err());
}

#[test]
fn convert_compressed_with_extended_l2() {
    let d = Scratch::new("extl2-convert");
    let src = d.path("src.raw");
    let mut data = vec![0u8; 1 << 20];
    for (i, b) in data.iter_mut().enumerate().take(600 << 10) {
        *b = (i / 1000) as u8;
    }
    std::fs::write(&src, &data).unwrap();
    let q = d.path("q.qcow2");
    let o = d.path("o.qcow2");
    let args = |out: &Path| {
        vec![
            "convert".to_string(),
            "-c".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            "qcow2".into(),
            "-o".into(),
            "extended_l2=on".into(),
            s(&src),
            s(out),
        ]
    };
    let qa = args(&q);
    qemu_img(&qa.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    let oa = args(&o);
    let (code, _, err) = ox(&oa.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    assert_clean(&o);
    assert_eq!(map_json(&o), map_json(&q));
    assert_same_as_raw(&o, &src);
}

#[test]
fn rebase_and_data_file_match_qemu() {
    let d = Scratch::new("extl2-rebase");
    let b0 = d.path("b0.qcow2");
    let b1 = d.path("b1.qcow2");
    create_qcow2(&b0, "1M", &[]);
    qemu_io(&b0, &["write -P 1 0 1M"]);
    create_qcow2(&b1, "", &["-b", &s(&b0), "-F", "qcow2"]);
    qemu_io(&b1, &["write -P 2 0 512k"]);
    let cmds = ["write -P 3 3k 5k", "write -z 600k 2k", "write -P 4 100k 3k"];
    let (q, o) = (d.path("q.qcow2"), d.path("o.qcow2"));
    for t in [&q, &o] {
        create_qcow2(
            t,
            "",
            &["-o", "extended_l2=on", "-b", &s(&b1), "-F", "qcow2"],
        );
        qemu_io(t, &cmds);
    }
    qemu_img(&["rebase", "-b", &s(&b0), "-F", "qcow2", &s(&q)]);
    let (code, _, err) = ox(&["rebase", "-b", &s(&b0), "-F", "qcow2", &s(&o)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(l2_dump(&o), l2_dump(&q));
    assert_clean(&o);
    assert_eq!(read_all_ours(&o), read_all_qemu(&q, &d));

    // An external data file: every cluster at its guest offset, allocated
    // per subcluster all the same.
    let cmds = [
        "write -P 1 4k 4k",
        "write -P 2 1k 1k",
        "write -z 64k 4k",
        "write -P 3 100k 70k",
        "write -z -u 128k 64k",
        "discard 192k 64k",
    ];
    let (q, o) = (d.path("dq.qcow2"), d.path("do.qcow2"));
    let (qd, od) = (d.path("dq.raw"), d.path("do.raw"));
    let with_data = |f: &Path| format!("extended_l2=on,data_file={}", s(f));
    create_qcow2(&q, "1M", &["-o", &with_data(&qd)]);
    let (os, opts) = (s(&o), with_data(&od));
    let (code, _, err) = ox(&case::create_args(&os, "1M", &["-o", &opts]));
    assert_eq!(code, 0, "{err}");
    qemu_io(&q, &cmds);
    let (code, out, err) = ox_io(&o, &cmds);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(l2_dump(&o), l2_dump(&q));
    assert!(std::fs::read(&od).unwrap() == std::fs::read(&qd).unwrap());
    assert_clean(&o);
    let (code, ours, err) = ox(&["map", "--output=json", &s(&q)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ours, map_json(&q));
}
