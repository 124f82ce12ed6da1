//! `oxqcow bitmap` and `oxqcow convert --bitmaps` against qemu-img, and
//! the NBD client's `x-dirty-bitmap` option against QEMU's. A sequence of
//! command lines runs through qemu-img in one copy of the files and
//! through oxqcow in another (qemu-io writing between them in both): the
//! same texts and exit status at every step, then `qemu-img info` lists
//! the same bitmaps (names, flags, granularities, order), `qemu-img check`
//! finds our image clean, and qemu-nbd's dirty-bitmap export of each
//! bitmap (read by `qemu-img map` with `x-dirty-bitmap`) is the same for
//! both images.

mod common;
use common::case::*;
use common::*;
use std::path::Path;

/// What QEMU reports of each bitmap of `img`: `qemu-img map` of
/// qemu-nbd's dirty-bitmap export (dirty ranges as `"data": false`).
fn bitmap_maps(dir: &Path, img: &Path, bitmaps: &[&str]) -> Vec<String> {
    with_qemu_nbd(dir, img, bitmaps, |opts| {
        bitmaps
            .iter()
            .map(|b| {
                let o = format!("{opts},x-dirty-bitmap=qemu:dirty-bitmap:{b}");
                ok_in(
                    dir,
                    "qemu-img",
                    &["map", "--output=json", "--image-opts", &o],
                )
            })
            .collect()
    })
}

/// The bitmaps `qemu-img info --output=json` lists (the JSON array).
fn bitmap_list(dir: &Path, img: &str) -> String {
    let out = ok_in(dir, "qemu-img", &["info", "--output=json", "-U", img]);
    match out.find("\"bitmaps\"") {
        Some(i) => {
            let rest = &out[i..];
            rest[..rest.find(']').unwrap() + 1].to_string()
        }
        None => String::new(),
    }
}

fn io_both(c: &Case, img: &str, cmds: &[&str]) {
    qemu_io_in(&c.q, img, cmds);
    qemu_io_in(&c.o, img, cmds);
}

/// Both copies of `img` have the same bitmaps with the same bits, and
/// ours passes `qemu-img check`.
fn same_bitmaps(c: &Case, img: &str, names: &[&str]) {
    assert_eq!(
        bitmap_list(&c.q, img),
        bitmap_list(&c.o, img),
        "bitmaps of {img}"
    );
    let (code, out, err) = run_in(&c.o, "qemu-img", &["check", img]);
    assert_eq!(code, 0, "qemu-img check {img}: {out}{err}");
    assert_eq!(
        bitmap_maps(&c.q, &c.q.join(img), names),
        bitmap_maps(&c.o, &c.o.join(img), names),
        "bits of {names:?} in {img}"
    );
}

#[test]
fn bitmap_actions_match_qemu_img() {
    let d = Scratch::new("bitmap-actions");
    let c = Case::new(&d);
    c.qcow2("base.qcow2", "10M", &[]);
    c.qcow2("t.qcow2", "10M", &["-b", "base.qcow2", "-F", "qcow2"]);
    c.fresh();
    c.step(&["bitmap", "--add", "-f", "qcow2", "base.qcow2", "b0"]);
    io_both(&c, "base.qcow2", &["write 3M 1M"]);
    io_both(&c, "t.qcow2", &["write 0 1M"]);
    c.step(&["bitmap", "--add", "-g", "512k", "t.qcow2", "b1"]);
    c.step(&["bitmap", "--add", "--disable", "t.qcow2", "b2"]);
    c.step(&["bitmap", "--add", "--granularity", "4k", "t.qcow2", "small"]);
    io_both(&c, "t.qcow2", &["write 3M 1M", "write 100k 1k"]);
    c.step(&["bitmap", "--clear", "t.qcow2", "b1"]);
    io_both(&c, "t.qcow2", &["write 1M 1M"]);
    c.step(&["bitmap", "--disable", "t.qcow2", "b1"]);
    c.step(&["bitmap", "--enable", "t.qcow2", "b2"]);
    io_both(&c, "t.qcow2", &["write 2M 1M"]);
    same_bitmaps(&c, "t.qcow2", &["b1", "b2", "small"]);
    // Merges: within the image, from another image (-b, -F), into a new
    // bitmap (--add --merge), across granularities.
    c.step(&["bitmap", "--add", "--disable", "t.qcow2", "m"]);
    c.step(&["bitmap", "--merge", "small", "t.qcow2", "m"]);
    c.step(&[
        "bitmap",
        "--add",
        "--merge",
        "b0",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "t.qcow2",
        "tmp",
    ]);
    c.step(&["bitmap", "--merge", "tmp", "-f", "qcow2", "t.qcow2", "b1"]);
    c.step(&[
        "bitmap",
        "--remove",
        "--image-opts",
        "driver=qcow2,file.driver=file,file.filename=t.qcow2",
        "tmp",
    ]);
    c.step(&[
        "bitmap",
        "--add",
        "--merge",
        "b2",
        "-b",
        "t.qcow2",
        "base.qcow2",
        "b3",
    ]);
    same_bitmaps(&c, "t.qcow2", &["b1", "b2", "small", "m"]);
    same_bitmaps(&c, "base.qcow2", &["b0", "b3"]);
    // A failing action stops the rest, and what came before it is kept.
    assert_eq!(
        c.step(&["bitmap", "--add", "--merge", "nope", "t.qcow2", "kept"]),
        1
    );
    assert_eq!(
        c.step(&["bitmap", "--remove", "--remove", "t.qcow2", "m"]),
        1
    );
    c.step(&["bitmap", "--remove", "--add", "t.qcow2", "b2"]);
    same_bitmaps(&c, "t.qcow2", &["b1", "small", "kept", "b2"]);
    // Removing the last bitmap drops the extension, as QEMU does.
    for b in ["b0", "b3"] {
        c.step(&["bitmap", "--remove", "base.qcow2", b]);
    }
    assert_eq!(bitmap_list(&c.o, "base.qcow2"), "");
    same_bitmaps(&c, "base.qcow2", &[]);
    let dump = |dir: &Path| ok_in(dir, BIN, &["dump-header", "base.qcow2"]);
    assert_eq!(dump(&c.q), dump(&c.o));
    // Inconsistent bitmaps (left in use by a killed writer): refused by
    // every action but --remove.
    let _ = run_in(&c.q, "qemu-io", &["-c", "abort", "t.qcow2"]);
    let _ = run_in(&c.o, "qemu-io", &["-c", "abort", "t.qcow2"]);
    for a in ["--clear", "--enable", "--disable"] {
        assert_eq!(c.step(&["bitmap", a, "t.qcow2", "b1"]), 1);
    }
    assert_eq!(c.step(&["bitmap", "--merge", "b1", "t.qcow2", "small"]), 1);
    c.step(&["bitmap", "--add", "t.qcow2", "b4"]);
    c.step(&["bitmap", "--remove", "t.qcow2", "b1"]);
    assert_eq!(bitmap_list(&c.q, "t.qcow2"), bitmap_list(&c.o, "t.qcow2"));
    let (code, out, err) = run_in(&c.o, "qemu-img", &["check", "t.qcow2"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn bitmap_errors_match_qemu_img() {
    let d = Scratch::new("bitmap-errors");
    let c = Case::new(&d);
    c.qcow2("a.qcow2", "10M", &[]);
    c.qcow2("big.qcow2", "20M", &[]);
    c.qcow2("v2.qcow2", "1M", &["-o", "compat=0.10"]);
    c.prep("qemu-img", &["bitmap", "--add", "a.qcow2", "a"]);
    c.prep("qemu-img", &["bitmap", "--add", "big.qcow2", "a"]);
    c.prep("qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    let long = "n".repeat(1024);
    c.all_fail(
        "bitmap",
        &[
            &["a.qcow2", "x"],
            &["--add", "a.qcow2"],
            &["--add", "a.qcow2", "x", "y"],
            &["--add", "a.qcow2", "a"],
            &["--add", "a.qcow2", ""],
            &["--remove", "a.qcow2", "nope"],
            &["--clear", "a.qcow2", "nope"],
            &["--enable", "a.qcow2", "nope"],
            &["--disable", "a.qcow2", "nope"],
            &["--merge", "nope", "a.qcow2", "a"],
            &["--merge", "a", "a.qcow2", "nope"],
            &["--merge", "a", "-b", "big.qcow2", "a.qcow2", "a"],
            &[
                "--merge",
                "a",
                "-b",
                "a.qcow2",
                "-F",
                "raw",
                "big.qcow2",
                "a",
            ],
            &["--merge", "a", "-b", "nonexist", "a.qcow2", "a"],
            &["--add", "-g", "1000", "a.qcow2", "g"],
            &["--add", "-g", "256", "a.qcow2", "g"],
            &["--add", "-g", "4G", "a.qcow2", "g"],
            &["--add", "-g", "1x", "a.qcow2", "g"],
            &["--add", "-g", "-1", "a.qcow2", "g"],
            &["-g", "64k", "--remove", "a.qcow2", "a"],
            &["-b", "a.qcow2", "--add", "a.qcow2", "c"],
            &["-F", "qcow2", "--add", "a.qcow2", "c"],
            &["--add", "--image-opts", "-f", "qcow2", "a.qcow2", "c"],
            &["--add", "nonexist.qcow2", "a"],
            &["--add", "--add", "a.qcow2", "k"],
            &["--clear", "-f", "raw", "r.raw", "x"],
        ],
    );
    // Messages naming a node differ in the node's name only.
    for args in [
        &["--add", "v2.qcow2", "a"][..],
        &["--add", "-f", "raw", "r.raw", "a"],
        &["--add", "a.qcow2", &long],
    ] {
        let mut a = vec!["bitmap"];
        a.extend_from_slice(args);
        let q = run_in(&c.setup, "qemu-img", &a);
        let o = run_in(&c.setup, BIN, &a);
        assert_eq!((q.0, o.0), (1, 1));
        let tail = |s: &str| s.rsplit(": ").next().unwrap().to_string();
        assert_eq!(tail(&q.2), tail(&o.2), "{a:?}: {} / {}", q.2, o.2);
    }
    // Default granularities follow the cluster size (4 KiB to 64 KiB).
    for cs in ["512", "64k", "2M"] {
        let name = format!("c{cs}.qcow2");
        c.qcow2(&name, "4M", &["-o", &format!("cluster_size={cs}")]);
        c.fresh();
        c.step(&["bitmap", "--add", &name, "d"]);
        c.step(&["bitmap", "--add", "-g", "0", &name, "z"]);
        assert_eq!(bitmap_list(&c.q, &name), bitmap_list(&c.o, &name));
    }
}

#[test]
fn convert_copies_bitmaps_like_qemu_img() {
    let d = Scratch::new("convert-bitmaps");
    let c = Case::new(&d);
    c.qcow2("s.qcow2", "10M", &[]);
    c.prep(
        "qemu-img",
        &["bitmap", "--add", "-g", "512k", "s.qcow2", "b1"],
    );
    c.prep(
        "qemu-img",
        &["bitmap", "--add", "--disable", "s.qcow2", "b2"],
    );
    qemu_io_in(&c.setup, "s.qcow2", &["write 1M 1M"]);
    c.prep("qemu-img", &["bitmap", "--enable", "s.qcow2", "b2"]);
    c.prep(
        "qemu-img",
        &["bitmap", "--add", "-g", "4k", "s.qcow2", "b3"],
    );
    qemu_io_in(&c.setup, "s.qcow2", &["write 5M 4k", "write 9M 100k"]);
    c.prep("qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    c.fresh();
    for args in [
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "s.qcow2",
            "out.qcow2",
        ][..],
        &["convert", "--bitmaps", "-O", "raw", "s.qcow2", "out.raw"],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            "s.qcow2",
            "v2.qcow2",
        ],
        &[
            "convert",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "s.qcow2",
            "x.qcow2",
        ],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-f",
            "raw",
            "r.raw",
            "y.qcow2",
        ],
    ] {
        c.step(args);
    }
    same_bitmaps(&c, "out.qcow2", &["b1", "b2", "b3"]);
    assert_eq!(
        run_in(&c.o, "qemu-img", &["compare", "s.qcow2", "out.qcow2"]).0,
        0
    );
    // Inconsistent bitmaps: refused before the target exists, or skipped
    // with a warning each (last to first, as qemu-img looks at them).
    for dir in [&c.q, &c.o] {
        let _ = run_in(dir, "qemu-io", &["-c", "abort", "s.qcow2"]);
        ok_in(dir, "qemu-img", &["bitmap", "--add", "s.qcow2", "b4"]);
        ok_in(dir, "qemu-img", &["bitmap", "--remove", "s.qcow2", "b1"]);
    }
    assert_eq!(
        c.step(&["convert", "--bitmaps", "-O", "qcow2", "s.qcow2", "c.qcow2"]),
        1
    );
    assert!(!c.o.join("c.qcow2").exists());
    c.step(&[
        "convert",
        "--bitmaps",
        "--skip-broken-bitmaps",
        "-O",
        "qcow2",
        "s.qcow2",
        "c.qcow2",
    ]);
    same_bitmaps(&c, "c.qcow2", &["b4"]);
}

#[test]
fn x_dirty_bitmap_reads_as_qemus_nbd_client_reads() {
    let d = Scratch::new("x-dirty-bitmap");
    let c = Case::new(&d);
    c.qcow2("m.qcow2", "10M", &[]);
    c.prep(
        "qemu-img",
        &["bitmap", "--add", "-g", "512", "m.qcow2", "small"],
    );
    c.prep(
        "qemu-img",
        &["bitmap", "--add", "-g", "512k", "m.qcow2", "big"],
    );
    qemu_io_in(&c.setup, "m.qcow2", &["write 100k 1k", "write 7M 3M"]);
    let img = c.setup.join("m.qcow2");
    with_qemu_nbd(&c.setup, &img, &["small", "big"], |opts| {
        for b in ["small", "big", "nope"] {
            let o = format!("{opts},x-dirty-bitmap=qemu:dirty-bitmap:{b}");
            for out in ["--output=json", "--output=human"] {
                let args = ["map", out, "--image-opts", &o];
                let q = run_in(&c.setup, "qemu-img", &args);
                let ours = run_in(&c.setup, BIN, &args);
                assert_eq!(q.1, ours.1, "{b} {out}");
                assert_eq!(normalize(&q.2), normalize(&ours.2), "{b} {out}");
                assert_eq!(q.0, ours.0);
                if b != "nope" && out == "--output=json" {
                    assert!(q.1.contains("\"present\": false"), "{}", q.1);
                }
            }
        }
    });
}
