//! More of `oxqcow convert` against qemu-img: `-l` (copying an internal
//! snapshot instead of the active disk), `--salvage` (reading past
//! errors that blkdebug injects) and several sources concatenated into
//! one target. Each command line runs through both
//! tools on copies of the same files; the texts, the exit status and the
//! resulting images (`qemu-img check` clean, `qemu-img compare` equal)
//! must match.

mod common;
use common::case::*;
use common::*;

/// An image whose two snapshots and active disk all differ: s1 at 1 MiB
/// (pattern 1), s2 at 2 MiB (pattern 2 over it), active pattern 3.
fn snapshot_setup(c: &Case) {
    c.qcow2("a.qcow2", "1M", &[]);
    qemu_io_in(
        &c.setup,
        "a.qcow2",
        &["write -P 1 0 64k", "write -c -P 7 128k 64k"],
    );
    c.prep("qemu-img", &["snapshot", "-c", "s1", "a.qcow2"]);
    c.prep("qemu-img", &["resize", "-q", "a.qcow2", "2M"]);
    qemu_io_in(
        &c.setup,
        "a.qcow2",
        &["write -P 2 0 64k", "write -P 2 1536k 64k"],
    );
    c.prep("qemu-img", &["snapshot", "-c", "s2", "a.qcow2"]);
    qemu_io_in(&c.setup, "a.qcow2", &["write -P 3 0 2M"]);
    c.prep("qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
}

#[test]
fn convert_l_copies_a_snapshot_like_qemu_img() {
    let d = Scratch::new("convert-l");
    let c = Case::new(&d);
    snapshot_setup(&c);
    for l in [
        "s1",
        "1",
        "s2",
        "2",
        "snapshot.name=s1",
        "snapshot.id=1",
        "snapshot.id=2,snapshot.name=s2",
    ] {
        for fmt in ["qcow2", "raw"] {
            let out = format!("out.{fmt}");
            let (code, _) = c.same(&["convert", "-O", fmt, "-l", l, "a.qcow2", &out]);
            assert_eq!(code, 0, "-l {l}");
            c.same_view(&out);
            c.same_info(&out);
        }
    }
    // What s1 holds: pattern 1, the compressed cluster, then zeros up to
    // the active size (2 MiB), which the copy keeps.
    let (code, _) = c.same(&["convert", "-O", "raw", "-l", "s1", "a.qcow2", "s1.raw"]);
    assert_eq!(code, 0);
    let got = std::fs::read(c.o.join("s1.raw")).unwrap();
    assert_eq!(got.len(), 2 << 20);
    assert!(got[..64 << 10].iter().all(|&b| b == 1));
    assert!(got[128 << 10..192 << 10].iter().all(|&b| b == 7));
    assert!(got[192 << 10..].iter().all(|&b| b == 0));
    // -l with -p and -q.
    c.same(&[
        "convert", "-p", "-l", "s2", "-O", "qcow2", "a.qcow2", "o.qcow2",
    ]);
    c.same_view("o.qcow2");
    c.same(&["convert", "--quiet", "-l", "s2", "a.qcow2", "o.raw"]);
    // Refusals: no such snapshot, ID and name naming different ones, an
    // unknown parameter, a raw source; the target is not created.
    c.all_fail(
        "convert",
        &[
            &["-O", "qcow2", "-l", "nope", "a.qcow2", "o.qcow2"],
            &["-O", "qcow2", "-l", "", "a.qcow2", "o.qcow2"],
            &["-O", "qcow2", "-l", "name=s1", "a.qcow2", "o.qcow2"],
            &[
                "-O",
                "qcow2",
                "-l",
                "snapshot.id=1,snapshot.name=s2",
                "a.qcow2",
                "o.qcow2",
            ],
            &["-O", "qcow2", "-l", "snapshot.foo=1", "a.qcow2", "o.qcow2"],
            &["-O", "qcow2", "-l", "s1", "-f", "raw", "r.raw", "o.qcow2"],
        ],
    );
    assert!(!c.o.join("o.qcow2").exists());
}

/// iotest 029's case: the header's size and L1 size are cut down after a
/// snapshot was taken; the snapshot's own (larger) L1 table is read.
#[test]
fn convert_l_reads_the_snapshots_own_l1_size() {
    let d = Scratch::new("convert-l-l1");
    let c = Case::new(&d);
    c.qcow2("t.qcow2", "64M", &["-o", "cluster_size=512"]);
    qemu_io_in(
        &c.setup,
        "t.qcow2",
        &["write -P 5 0 4k", "write -P 6 60M 4k"],
    );
    c.prep("qemu-img", &["snapshot", "-c", "foo", "t.qcow2"]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.setup.join("t.qcow2"))
            .unwrap();
        f.write_all_at(&512u64.to_be_bytes(), 24).unwrap();
        f.write_all_at(&1u32.to_be_bytes(), 36).unwrap();
    }
    let (code, _) = c.same(&["convert", "-l", "foo", "t.qcow2", "t.snap"]);
    assert_eq!(code, 0);
    let a = std::fs::read(c.q.join("t.snap")).unwrap();
    let b = std::fs::read(c.o.join("t.snap")).unwrap();
    assert_eq!(a.len(), 512);
    assert_eq!(a, b);
    assert!(b.iter().all(|&x| x == 5));
}

/// Sources of different formats and sizes for concatenation: a qcow2
/// with data and a zeroed range, a raw file with data off cluster
/// alignment and a hole, a raw file of 1000 bytes (a partial sector), and
/// a small-cluster qcow2 over a backing file (flattened into the target).
fn concat_setup(c: &Case) {
    c.qcow2("a.qcow2", "4M", &[]);
    qemu_io_in(
        &c.setup,
        "a.qcow2",
        &["write -P 0x11 0 64k", "write -z 1M 1M", "write -P 0 2M 64k"],
    );
    c.prep("qemu-img", &["create", "-q", "-f", "raw", "b.raw", "3M"]);
    ok_in(
        &c.setup,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x22 512 64k", "b.raw"],
    );
    std::fs::write(c.setup.join("odd.raw"), vec![0x5a; 1000]).unwrap();
    c.qcow2("base.qcow2", "1M", &[]);
    qemu_io_in(&c.setup, "base.qcow2", &["write -P 0x44 0 1M"]);
    c.qcow2(
        "c.qcow2",
        "1M",
        &["-o", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2"],
    );
    qemu_io_in(&c.setup, "c.qcow2", &["write -P 0x33 900k 124k"]);
}

const CONCAT: [&str; 4] = ["a.qcow2", "b.raw", "odd.raw", "c.qcow2"];

#[test]
fn convert_concatenates_several_sources_like_qemu_img() {
    let d = Scratch::new("convert-concat");
    let c = Case::new(&d);
    concat_setup(&c);
    let variants: [&[&str]; 9] = [
        &["-O", "qcow2"],
        &["-O", "raw"],
        &["-O", "qcow2", "-c"],
        &["-O", "qcow2", "-S", "0"],
        &["-O", "qcow2", "-c", "-S", "0"],
        &["-O", "qcow2", "-p", "-m", "1"],
        &["-O", "qcow2", "-W"],
        &["-O", "qcow2", "-o", "cluster_size=4k", "-S", "8k"],
        &["-O", "qcow2", "-q", "-t", "none", "-T", "none"],
    ];
    for v in variants {
        for srcs in [&CONCAT[..], &CONCAT[1..3], &["c.qcow2", "a.qcow2"]] {
            let out = if v[1] == "raw" { "o.raw" } else { "o.qcow2" };
            let mut args = vec!["convert"];
            args.extend_from_slice(v);
            args.extend_from_slice(srcs);
            args.push(out);
            let (code, _) = c.same(&args);
            assert_eq!(code, 0, "{args:?}");
            c.same_view(out);
            // Out-of-order writes (-W) place clusters as they come.
            if !v.contains(&"-W") {
                c.same_map(out);
            }
            c.same_info(out);
        }
    }
    // The target holds each source at the sum of the sizes before it (the
    // 1000-byte file takes two sectors, as its size rounds up).
    c.same(
        &["convert", "-O", "raw"]
            .iter()
            .chain(&CONCAT)
            .chain(&["o.raw"])
            .copied()
            .collect::<Vec<_>>(),
    );
    let got = std::fs::read(c.o.join("o.raw")).unwrap();
    let (a, b, odd) = (4 << 20, 3 << 20, 1024);
    assert_eq!(got.len(), a + b + odd + (1 << 20));
    assert!(got[..64 << 10].iter().all(|&x| x == 0x11));
    assert!(got[a + 512..a + 512 + (64 << 10)]
        .iter()
        .all(|&x| x == 0x22));
    assert!(got[a + b..a + b + 1000].iter().all(|&x| x == 0x5a));
    assert!(got[a + b + 1000..a + b + odd].iter().all(|&x| x == 0));
    let c0 = a + b + odd;
    assert!(got[c0..c0 + (900 << 10)].iter().all(|&x| x == 0x44));
    assert!(got[c0 + (900 << 10)..].iter().all(|&x| x == 0x33));
}

/// iotest 122's misaligned case: two 1023 KiB sources with 1 KiB clusters
/// compressed into 64 KiB clusters, one of which holds the end of the
/// first source and the start of the second.
#[test]
fn convert_compresses_clusters_spanning_two_sources() {
    let d = Scratch::new("convert-concat-c");
    let c = Case::new(&d);
    for (n, cmds) in [
        (
            "1.qcow2",
            &[
                "write -P 0x11 16k 16k",
                "write -P 0x22 130k 130k",
                "write -P 0x33 1022k 1k",
            ][..],
        ),
        ("2.qcow2", &["write -P 0x44 0 1k"][..]),
    ] {
        c.qcow2(n, "1023k", &["-o", "cluster_size=1024"]);
        qemu_io_in(&c.setup, n, cmds);
    }
    for v in [&["-c"][..], &[], &["-c", "-S", "0"]] {
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(v);
        args.extend_from_slice(&["1.qcow2", "2.qcow2", "o.qcow2"]);
        assert_eq!(c.same(&args).0, 0, "{args:?}");
        c.same_view("o.qcow2");
        c.same_map("o.qcow2");
    }
}

/// --image-opts and -f apply to every source; -n writes into an existing
/// target at least as large as the sources together.
#[test]
fn convert_concatenation_options_and_no_create() {
    let d = Scratch::new("convert-concat-opts");
    let c = Case::new(&d);
    concat_setup(&c);
    c.prep(
        "qemu-img",
        &["create", "-q", "-f", "raw", "r2.raw", "1536k"],
    );
    ok_in(
        &c.setup,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x66 1M 4k", "r2.raw"],
    );
    c.qcow2("big.qcow2", "16M", &[]);
    qemu_io_in(&c.setup, "big.qcow2", &["write -P 0x77 0 16M"]);
    c.qcow2("small.qcow2", "4M", &[]);
    c.qcow2("empty.qcow2", "16M", &[]);
    let cases: [&[&str]; 5] = [
        &[
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2",
            "driver=raw,file.filename=b.raw",
            "o.qcow2",
        ],
        &["-f", "raw", "b.raw", "r2.raw", "odd.raw", "o.qcow2"],
        &["-n", "a.qcow2", "b.raw", "big.qcow2"],
        &["-n", "-c", "b.raw", "a.qcow2", "empty.qcow2"],
        &["-n", "-S", "0", "r2.raw", "c.qcow2", "big.qcow2"],
    ];
    for a in cases {
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(a);
        assert_eq!(c.same(&args).0, 0, "{args:?}");
        let out = a[a.len() - 1];
        c.same_view(out);
        c.same_map(out);
    }
    // Refusals, in qemu-img's order: the sources are opened first, then
    // -l, --bitmaps, the output format and -B are looked at; no target.
    c.all_fail(
        "convert",
        &[
            &["-O", "qcow2", "-B", "x", "a.qcow2", "b.raw", "o.qcow2"],
            &[
                "-O", "qcow2", "-B", "x", "-F", "qcow2", "a.qcow2", "b.raw", "o.qcow2",
            ],
            &[
                "-O", "qcow2", "-c", "-B", "x", "a.qcow2", "b.raw", "o.qcow2",
            ],
            &["-O", "qcow2", "-l", "s", "a.qcow2", "b.raw", "o.qcow2"],
            &[
                "-O", "qcow2", "-l", "s", "-B", "x", "a.qcow2", "b.raw", "o.qcow2",
            ],
            &["-O", "qcow2", "--bitmaps", "a.qcow2", "b.raw", "o.qcow2"],
            &[
                "-O",
                "qcow2",
                "-t",
                "bad",
                "--bitmaps",
                "a.qcow2",
                "b.raw",
                "o.qcow2",
            ],
            &["-O", "vmdkx", "--bitmaps", "a.qcow2", "b.raw", "o.qcow2"],
            &[
                "-O",
                "raw",
                "-c",
                "--bitmaps",
                "a.qcow2",
                "b.raw",
                "o.qcow2",
            ],
            &[
                "-O",
                "qcow2",
                "-l",
                "s",
                "--bitmaps",
                "a.qcow2",
                "b.raw",
                "o.qcow2",
            ],
            &[
                "-O",
                "qcow2",
                "-c",
                "-o",
                "encrypt.format=luks",
                "--bitmaps",
                "a.qcow2",
                "b.raw",
                "o.qcow2",
            ],
            &[
                "-O",
                "qcow2",
                "-c",
                "-o",
                "encrypt.format=luks",
                "-B",
                "x",
                "a.qcow2",
                "b.raw",
                "o.qcow2",
            ],
            &[
                "-O",
                "raw",
                "--bitmaps",
                "-B",
                "x",
                "a.qcow2",
                "b.raw",
                "o.qcow2",
            ],
            &["-O", "vmdkx", "-B", "x", "a.qcow2", "b.raw", "o.qcow2"],
            &["-O", "raw", "-c", "-B", "x", "a.qcow2", "b.raw", "o.qcow2"],
            &[
                "-O", "qcow2", "-t", "bad", "-B", "x", "a.qcow2", "b.raw", "o.qcow2",
            ],
            &["-O", "qcow2", "-B", "x", "a.qcow2", "nope", "o.qcow2"],
            &["-O", "qcow2", "-l", "s", "nope", "a.qcow2", "o.qcow2"],
            &["-O", "vmdkx", "a.qcow2", "nope", "o.qcow2"],
            &["-O", "raw", "-c", "nope", "o.qcow2"],
            &["-O", "qcow2", "a.qcow2"],
            &["-O", "qcow2", "-n", "a.qcow2", "b.raw", "small.qcow2"],
            &["-O", "qcow2", "-n", "a.qcow2", "b.raw", "nope.qcow2"],
            &[
                "-O", "qcow2", "-S", "3", "-B", "x", "a.qcow2", "b.raw", "o.qcow2",
            ],
        ],
    );
    assert!(!c.o.join("o.qcow2").exists());
}
