//! The qemu-img half of the `oxqcow` tool against qemu-img itself: check,
//! amend, resize, snapshot, measure, compare, rebase, commit, bench and
//! the convert additions (-c, -n, -m, -W). Each case prepares one set of
//! files, copies it for each tool, runs the same command line in each copy
//! and compares exit status, stdout and stderr (tool name aside); where the
//! command changes images, the results are checked with `qemu-img check`
//! and compared with `qemu-img compare` (and `qemu-img map` where both
//! tools must lay the data out alike).

mod common;
use common::case::*;
use common::*;
use std::path::Path;

/// Sets a 16-bit refcount in the first refcount block of a fresh image.
fn poke_refcount(path: &Path, cluster: u64, value: u16) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 48).unwrap();
    let rt = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, rt).unwrap();
    let rb = u64::from_be_bytes(b);
    f.write_all_at(&value.to_be_bytes(), rb + 2 * cluster)
        .unwrap();
}

// ---- check ------------------------------------------------------------------------

#[test]
fn check_matches_qemu_img() {
    let d = Scratch::new("img-check");
    let c = Case::new(&d);
    c.qcow2("clean.qcow2", "64M", &[]);
    qemu_io_in(
        &c.setup,
        "clean.qcow2",
        &["write -P 1 0 1M", "write -c -P 2 2M 64k"],
    );
    // A dirty lazy-refcounts image: QEMU killed after an allocating write.
    c.qcow2("dirty.qcow2", "64M", &["-o", "lazy_refcounts=on"]);
    let _ = run_in(
        &c.setup,
        "qemu-io",
        &["-c", "write -P 1 0 64k", "-c", "sigraise 9", "dirty.qcow2"],
    );
    let info = ok_in(&c.setup, "qemu-img", &["info", "dirty.qcow2"]);
    assert!(info.contains("cleanly shut down: no"), "{info}");
    // Leaks: hand-raised refcounts of clusters inside the file.
    std::fs::copy(c.setup.join("clean.qcow2"), c.setup.join("leak.qcow2")).unwrap();
    poke_refcount(&c.setup.join("leak.qcow2"), 3, 2);
    poke_refcount(&c.setup.join("leak.qcow2"), 0, 3);
    std::fs::write(c.setup.join("r.raw"), vec![0u8; 65536]).unwrap();
    for img in ["clean.qcow2", "dirty.qcow2", "leak.qcow2"] {
        for extra in [
            &[][..],
            &["--output=json"],
            &["-r", "leaks"],
            &["-r", "all"],
            &["-r", "leaks", "--output=json"],
            &["-r", "all", "--output=json"],
            &["-q"],
            &["-q", "-r", "all"],
        ] {
            let mut a = vec!["check"];
            a.extend_from_slice(extra);
            a.push(img);
            let (code, _) = c.same(&a);
            if extra.contains(&"-r") {
                if extra.contains(&"all") || img != "dirty.qcow2" {
                    assert_eq!(code, 0, "{a:?}");
                    // What a repair leaves is the same guest data, and clean.
                    c.same_view(img);
                } else {
                    // -r leaks cannot rebuild the refcounts: check failed.
                    assert_eq!(code, 1, "{a:?}");
                }
            }
        }
    }
    let (code, out) = c.same(&["check", "dirty.qcow2"]);
    assert_eq!(code, 2);
    assert!(out.contains("2 errors were found on the image."), "{out}");
    let (code, out) = c.same(&["check", "leak.qcow2"]);
    assert_eq!(code, 3);
    assert!(
        out.contains("2 leaked clusters were found on the image."),
        "{out}"
    );
    let (code, _) = c.same(&["check", "-r", "leaks", "dirty.qcow2"]);
    assert_eq!(code, 1);
    let (code, out) = c.same(&["check", "-r", "all", "--output=json", "dirty.qcow2"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"corruptions-fixed\": 1"), "{out}");
    // Formats without checks, usage errors.
    assert_eq!(c.same(&["check", "-f", "raw", "r.raw"]).0, 63);
    c.same(&["check", "-r", "bogus", "clean.qcow2"]);
    c.same(&["check", "--output=xml", "clean.qcow2"]);
    c.same(&["check", "nonexist.qcow2"]);
    c.same(&["check", "-U", "-r", "all", "clean.qcow2"]);
}

/// An L2 entry whose host offset is not cluster aligned: a data cluster
/// (an error `-r all` cannot mend: QEMU still counts its references, which
/// reach into a second cluster and make it rebuild the refcounts) and a
/// cluster holding no data (a zero cluster, or no subcluster allocated),
/// which `-r all` repairs by dropping the offset. The same report and exit
/// status as qemu-img's for each, standard and extended L2 entries.
#[test]
fn misaligned_clusters_are_checked_and_repaired_like_qemu_img() {
    use std::os::unix::fs::FileExt;
    let d = Scratch::new("img-check-misaligned");
    let c = Case::new(&d);
    std::fs::write(c.setup.join("b.raw"), vec![0xffu8; 128 << 10]).unwrap();
    let ext = ["-o", "extended_l2=on", "-F", "raw", "-b", "b.raw"];
    let cases: [(&str, &[&str], &[&str]); 4] = [
        ("data.qcow2", &[], &["write -q -P 1 0 64k"]),
        (
            "zero.qcow2",
            &[],
            &["write -q -P 1 0 64k", "write -q -z 0 64k"],
        ),
        ("ext-data.qcow2", &ext, &["write -q -P 1 4k 2k"]),
        (
            "ext-zero.qcow2",
            &ext,
            &["write -q -P 1 4k 2k", "write -q -z 4k 2k"],
        ),
    ];
    for (name, opts, cmds) in cases {
        c.qcow2(name, "128k", opts);
        qemu_io_in(&c.setup, name, cmds);
        // The one L2 table is at 0x40000; its first entry's host offset
        // 0x50000 becomes 0x50200.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.setup.join(name))
            .unwrap();
        f.write_all_at(&[0x02], 0x40000 + 6).unwrap();
    }
    for (name, _, _) in cases {
        let (code, _) = c.same(&["check", name]);
        assert_eq!(code, 2, "{name}");
        c.same(&["check", "-r", "leaks", name]);
        let (code, out) = c.same(&["check", "-r", "all", name]);
        if name.contains("zero") {
            assert_eq!(code, 0, "{name}: {out}");
            c.same_view(name);
        } else {
            assert_eq!(code, 2, "{name}: {out}");
        }
    }
}

// ---- amend ------------------------------------------------------------------------

#[test]
fn amend_matches_qemu_img() {
    let d = Scratch::new("img-amend");
    let c = Case::new(&d);
    c.qcow2("a.qcow2", "64M", &[]);
    qemu_io_in(&c.setup, "a.qcow2", &["write -P 1 0 1M", "write -z 2M 64k"]);
    c.qcow2("v2.qcow2", "64M", &["-o", "compat=0.10"]);
    std::fs::write(c.setup.join("r.raw"), vec![0u8; 1 << 20]).unwrap();
    for o in [
        "compat=0.10",
        "compat=1.1",
        "lazy_refcounts=on",
        "refcount_bits=64",
        "refcount_bits=1",
        "size=128M",
        "size=32M",
        "size=1.5M",
        "compat=1.1,size=64M,compat=0.10",
        "cluster_size=4k",
        "preallocation=full",
        "compression_type=zstd",
        "extended_l2=on",
        "encrypt.format=luks",
        "encrypt.new-secret=x",
        "data_file=x",
        "data_file_raw=on",
        "bogus=1",
        "backing_file=x",
        "refcount_bits=abc",
        "refcount_bits=3",
        "compat=3",
        "compat",
        "compat=1.1,,x",
        ",compat=1.1",
        "compat=1.1,",
        "",
        "lazy_refcounts=maybe",
        "lazy_refcounts=on,compat=0.10",
        "compat=0.10,refcount_bits=64",
        "size=abc",
        "size=-1",
        "size=1000000000T",
        "help",
        "?",
    ] {
        let (code, _) = c.same(&["amend", "-o", o, "a.qcow2"]);
        if code == 0 {
            c.same_view("a.qcow2");
            c.same_info("a.qcow2");
        }
    }
    c.same(&[
        "amend",
        "-o",
        "compat=1.1",
        "-o",
        "lazy_refcounts=on",
        "v2.qcow2",
    ]);
    c.same_info("v2.qcow2");
    c.same(&["amend", "-o", "lazy_refcounts=on", "v2.qcow2"]);
    c.same(&["amend", "-p", "-o", "compat=0.10", "a.qcow2"]);
    c.same(&["amend", "-q", "-o", "compat=0.10", "a.qcow2"]);
    c.same(&["amend", "a.qcow2"]);
    c.same(&["amend", "-o", "size=2M", "r.raw"]);
    c.same(&["amend", "-f", "raw", "-o", "help", "r.raw"]);
    c.same(&["amend", "-o", "compat=1.1", "nonexist.qcow2"]);
}

// ---- resize -----------------------------------------------------------------------

#[test]
fn resize_matches_qemu_img() {
    let d = Scratch::new("img-resize");
    let c = Case::new(&d);
    c.qcow2("a.qcow2", "64M", &[]);
    qemu_io_in(
        &c.setup,
        "a.qcow2",
        &["write -P 1 0 1M", "write -P 2 40M 1M", "write -P 3 63M 1M"],
    );
    std::fs::copy(c.setup.join("a.qcow2"), c.setup.join("snap.qcow2")).unwrap();
    c.prep("qemu-img", &["snapshot", "-c", "s", "snap.qcow2"]);
    c.qcow2("v2.qcow2", "1M", &["-o", "compat=0.10"]);
    c.prep("qemu-img", &["snapshot", "-c", "s", "v2.qcow2"]);
    std::fs::write(c.setup.join("r.raw"), vec![5u8; 1000]).unwrap();
    for a in [
        &["a.qcow2", "+1M"][..],
        &["a.qcow2", "-1M"],
        &["--shrink", "a.qcow2", "-1M"],
        &["a.qcow2", "32M"],
        &["--shrink", "a.qcow2", "32M"],
        &["--shrink", "a.qcow2", "--", "-100M"],
        &["--shrink", "a.qcow2", "0"],
        &["a.qcow2", "abc"],
        &["a.qcow2", "1000000000T"],
        &["a.qcow2", "67109000"],
        &["a.qcow2", "-0"],
        &["a.qcow2", "1E"],
        &["a.qcow2", "1P"],
        &["-q", "a.qcow2", "+1M"],
        &["--preallocation=bogus", "a.qcow2", "+1M"],
        &["a.qcow2"],
        &["a.qcow2", "1", "2"],
        &["v2.qcow2", "+1M"],
        &["snap.qcow2", "+1M"],
        &["--shrink", "snap.qcow2", "20M"],
        &["-f", "raw", "r.raw", "+100"],
        &["-f", "raw", "--shrink", "r.raw", "100"],
        &["-f", "raw", "--preallocation=falloc", "r.raw", "1M"],
        &["-f", "raw", "--preallocation=full", "r.raw", "1M"],
        &["-f", "raw", "--preallocation=metadata", "r.raw", "1M"],
    ] {
        let mut args = vec!["resize"];
        args.extend_from_slice(a);
        let (code, _) = c.same(&args);
        if code == 0 {
            let file = a.iter().find(|x| x.contains('.')).unwrap();
            c.same_view(file);
        }
    }
    // The snapshot of a shrunk image still holds the old data.
    c.same(&["resize", "--shrink", "snap.qcow2", "20M"]);
    for dir in [&c.q, &c.o] {
        ok_in(dir, "qemu-img", &["snapshot", "-a", "s", "snap.qcow2"]);
    }
    c.same_view("snap.qcow2");
    let (code, out, err) = run_in(&c.o, "qemu-io", &["-c", "read -P 2 40M 1M", "snap.qcow2"]);
    assert!(code == 0 && !out.contains("fail"), "{out}{err}");
}

#[test]
fn resize_preallocates_like_qemu_img() {
    let d = Scratch::new("img-resize-prealloc");
    let c = Case::new(&d);
    // Aligned and unaligned old ends, the old last cluster allocated or
    // not, 4 KiB clusters (several L2 tables and new refcount blocks), a v2
    // image, lazy refcounts, extended L2 entries with and without a backing
    // file that would show through the grown area.
    c.qcow2("a.qcow2", "1M", &[]);
    qemu_io_in(&c.setup, "a.qcow2", &["write -P 1 0 100k"]);
    c.qcow2("u.qcow2", "1049088", &[]);
    qemu_io_in(
        &c.setup,
        "u.qcow2",
        &["write -P 7 1M 512", "write -P 1 0 64k"],
    );
    c.qcow2("small.qcow2", "3000k", &["-o", "cluster_size=4k"]);
    qemu_io_in(
        &c.setup,
        "small.qcow2",
        &["write -P 2 1M 1M", "write -P 3 2999k 1k"],
    );
    c.qcow2("v2.qcow2", "1M", &["-o", "compat=0.10"]);
    c.qcow2("lazy.qcow2", "1M", &["-o", "lazy_refcounts=on"]);
    std::fs::write(c.setup.join("b.raw"), vec![0xffu8; 8 << 20]).unwrap();
    let head = ["write -P 5 450k 10k", "write -P 6 500k 3k"];
    c.qcow2("ext.qcow2", "503k", &["-o", "extended_l2=on"]);
    qemu_io_in(&c.setup, "ext.qcow2", &head);
    let backed = ["-o", "extended_l2=on", "-F", "raw", "-b", "b.raw"];
    c.qcow2("extb.qcow2", "503k", &backed);
    qemu_io_in(&c.setup, "extb.qcow2", &head);
    let files = ["a", "u", "small", "v2", "lazy", "ext", "extb"];
    for file in files.map(|f| format!("{f}.qcow2")) {
        for mode in ["metadata", "falloc", "full"] {
            for size in ["3M", "5000k", "+40M"] {
                let p = format!("--preallocation={mode}");
                let (code, _) = c.same(&["resize", &p, &file, size]);
                assert_eq!(code, 0, "{file} {mode} {size}");
                c.same_view(&file);
                c.same_map(&file);
                // Over a backing file QEMU's metadata preallocation leaves
                // bytes past the guest's end in the last host cluster (a
                // copy-on-write it then zero-flags); the rest is byte for
                // byte.
                if file == "extb.qcow2" && mode == "metadata" {
                    continue;
                }
                let (q, o) = (c.q.join(&file), c.o.join(&file));
                assert!(
                    std::fs::read(&q).unwrap() == std::fs::read(&o).unwrap(),
                    "{file} {mode} {size}: the files differ"
                );
            }
        }
    }
    for a in [
        &["--preallocation=falloc", "a.qcow2", "1M"][..],
        &["--shrink", "--preallocation=full", "a.qcow2", "512k"],
        &["--preallocation=bogus", "a.qcow2", "2M"],
    ] {
        let mut args = vec!["resize"];
        args.extend_from_slice(a);
        assert_eq!(c.same(&args).0, 1, "{a:?}");
    }
}

/// With an external data file the grown clusters map to themselves in it,
/// as qemu-img maps them: aligned and unaligned old ends, the cluster
/// holding the old end written or not, a backing file that must not show
/// through it; the same map, guest view and data file bytes.
#[test]
fn resize_preallocates_data_files_like_qemu_img() {
    let d = Scratch::new("img-resize-prealloc-df");
    let c = Case::new(&d);
    std::fs::write(c.setup.join("b.raw"), vec![0xffu8; 8 << 20]).unwrap();
    c.qcow2("a.qcow2", "1M", &["-o", "data_file=a.dat"]);
    qemu_io_in(&c.setup, "a.qcow2", &["write -P 1 0 100k"]);
    c.qcow2("u.qcow2", "1000448", &["-o", "data_file=u.dat"]);
    qemu_io_in(&c.setup, "u.qcow2", &["write -P 7 0 1000448"]);
    c.qcow2("h.qcow2", "1000448", &["-o", "data_file=h.dat"]);
    qemu_io_in(&c.setup, "h.qcow2", &["write -P 3 64k 4k"]);
    let backed = ["-o", "data_file=bk.dat", "-F", "raw", "-b", "b.raw"];
    c.qcow2("bk.qcow2", "1000448", &backed);
    qemu_io_in(&c.setup, "bk.qcow2", &["write -P 4 0 64k"]);
    for f in ["a", "u", "h", "bk"] {
        let file = format!("{f}.qcow2");
        for mode in ["metadata", "falloc", "full"] {
            for size in ["3001344", "+40M"] {
                let p = format!("--preallocation={mode}");
                let (code, _) = c.same(&["resize", &p, &file, size]);
                assert_eq!(code, 0, "{file} {mode} {size}");
                same_view_here(&c, &file);
                c.same_map(&file);
                // Byte for byte up to the guest's end and as long: past
                // it, over a backing file, QEMU's metadata preallocation
                // leaves the backing file's bytes in the last cluster (a
                // copy-on-write it then zero-flags), ours zeros.
                let dat = format!("{f}.dat");
                let (q, o) = (
                    std::fs::read(c.q.join(&dat)).unwrap(),
                    std::fs::read(c.o.join(&dat)).unwrap(),
                );
                let old_end = if f == "a" { 1 << 20 } else { 1000448 };
                let end = if size == "+40M" {
                    old_end + (40 << 20)
                } else {
                    3001344
                };
                assert_eq!(q.len(), o.len(), "{file} {mode} {size}: data file lengths");
                assert!(
                    q[..end] == o[..end],
                    "{file} {mode} {size}: the data files differ"
                );
            }
        }
    }
}

/// Rebasing an image with extended L2 entries copies what differs per
/// subcluster, not per cluster: only those subclusters become allocated,
/// as qemu-img leaves them (iotest 271's rebase case).
#[test]
fn rebase_copies_subclusters_like_qemu_img() {
    let d = Scratch::new("img-rebase-ext");
    let c = Case::new(&d);
    let ext = "cluster_size=1M,extended_l2=on";
    c.qcow2("base.qcow2", "1M", &["-o", ext]);
    c.qcow2(
        "mid.qcow2",
        "1M",
        &["-o", ext, "-b", "base.qcow2", "-F", "qcow2"],
    );
    c.qcow2(
        "top.qcow2",
        "1M",
        &["-o", ext, "-b", "mid.qcow2", "-F", "qcow2"],
    );
    qemu_io_in(
        &c.setup,
        "mid.qcow2",
        &["write -q -P 0x11 32k 32k", "write -q -P 0x22 960k 32k"],
    );
    let (code, _) = c.same(&["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    assert_eq!(code, 0);
    c.same_view("top.qcow2");
    c.same_map("top.qcow2");
    let (_, map, _) = run_in(&c.o, "qemu-img", &["map", "top.qcow2"]);
    assert_eq!(map.lines().count(), 3, "two 32 KiB extents: {map}");
}

// ---- snapshot ---------------------------------------------------------------------

#[test]
fn snapshots_cross_between_the_tools() {
    let d = Scratch::new("img-snap");
    let c = Case::new(&d);
    c.qcow2("a.qcow2", "4M", &[]);
    qemu_io_in(&c.setup, "a.qcow2", &["write -P 1 0 1M"]);
    std::fs::write(c.setup.join("r.raw"), vec![0u8; 65536]).unwrap();
    for a in [
        &["-l", "a.qcow2"][..],
        &["a.qcow2"],
        &["-c", "s1", "a.qcow2"],
        &["-c", "", "a.qcow2"],
        &["-a", "nope", "a.qcow2"],
        &["-d", "nope", "a.qcow2"],
        &["-c", "x", "-d", "y", "a.qcow2"],
        &["-l", "nonexist.qcow2"],
        &["-f", "raw", "-l", "r.raw"],
        &["-f", "raw", "-c", "x", "r.raw"],
        &["-f", "raw", "-a", "x", "r.raw"],
        &["-f", "raw", "-d", "x", "r.raw"],
    ] {
        let mut args = vec!["snapshot"];
        args.extend_from_slice(a);
        c.same(&args);
    }

    // Ours, read by QEMU; QEMU's, read by us; duplicate names allowed.
    let dir = d.path("x");
    std::fs::create_dir_all(&dir).unwrap();
    ok_in(
        &dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "m.qcow2", "4M"],
    );
    qemu_io_in(&dir, "m.qcow2", &["write -P 1 0 1M"]);
    ok_in(&dir, BIN, &["snapshot", "-c", "s1", "m.qcow2"]);
    qemu_io_in(&dir, "m.qcow2", &["write -P 2 0 64k"]);
    ok_in(&dir, BIN, &["snapshot", "-c", "s1", "m.qcow2"]);
    ok_in(&dir, "qemu-img", &["snapshot", "-c", "s2", "m.qcow2"]);
    qemu_io_in(&dir, "m.qcow2", &["write -P 3 0 64k", "write -P 3 2M 64k"]);
    ok_in(&dir, BIN, &["snapshot", "-c", "", "m.qcow2"]);
    assert_clean(&dir.join("m.qcow2"));
    let theirs = ok_in(&dir, "qemu-img", &["snapshot", "-l", "m.qcow2"]);
    let ours = ok_in(&dir, BIN, &["snapshot", "-l", "m.qcow2"]);
    assert_eq!(theirs, ours);
    assert_eq!(theirs.lines().count(), 6, "{theirs}");
    assert!(theirs.starts_with(
        "Snapshot list:\nID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT\n1       s1                    0 B "
    ));
    let info = ok_in(&dir, "qemu-img", &["info", "m.qcow2"]);
    assert!(info.contains(&theirs["Snapshot list:\n".len()..]), "{info}");
    // QEMU applies ours; we apply theirs and ours.
    ok_in(&dir, "qemu-img", &["snapshot", "-a", "1", "m.qcow2"]);
    qemu_io_in(&dir, "m.qcow2", &["read -P 1 0 1M", "read -P 0 2M 64k"]);
    ok_in(&dir, BIN, &["snapshot", "-a", "s2", "m.qcow2"]);
    qemu_io_in(&dir, "m.qcow2", &["read -P 2 0 64k", "read -P 1 64k 960k"]);
    ok_in(&dir, BIN, &["snapshot", "-a", "4", "m.qcow2"]);
    qemu_io_in(&dir, "m.qcow2", &["read -P 3 0 64k", "read -P 3 2M 64k"]);
    assert_clean(&dir.join("m.qcow2"));
    // Deleting by name takes the first of that name, in either tool.
    ok_in(&dir, BIN, &["snapshot", "-d", "s1", "m.qcow2"]);
    ok_in(&dir, "qemu-img", &["snapshot", "-d", "s1", "m.qcow2"]);
    let left = ok_in(&dir, "qemu-img", &["snapshot", "-l", "m.qcow2"]);
    assert!(!left.contains(" s1 ") && left.contains(" s2 "), "{left}");
    assert_eq!(left, ok_in(&dir, BIN, &["snapshot", "-l", "m.qcow2"]));
    ok_in(&dir, "qemu-img", &["snapshot", "-d", "s2", "m.qcow2"]);
    ok_in(&dir, BIN, &["snapshot", "-d", "4", "m.qcow2"]);
    assert_eq!(ok_in(&dir, BIN, &["snapshot", "-l", "m.qcow2"]), "");
    assert_clean(&dir.join("m.qcow2"));
    qemu_io_in(&dir, "m.qcow2", &["read -P 3 0 64k", "read -P 3 2M 64k"]);
}

// ---- measure ----------------------------------------------------------------------

#[test]
fn measure_gives_qemu_img_numbers() {
    let d = Scratch::new("img-measure");
    let c = Case::new(&d);
    c.qcow2("a.qcow2", "64M", &[]);
    qemu_io_in(
        &c.setup,
        "a.qcow2",
        &[
            "write -P 1 100k 1M",
            "write -z 10M 1M",
            "write -c -P 3 20M 64k",
            "write -P 4 30M 4k",
        ],
    );
    c.qcow2("top.qcow2", "100M", &["-b", "a.qcow2", "-F", "qcow2"]);
    qemu_io_in(
        &c.setup,
        "top.qcow2",
        &["write -P 5 50M 1M", "write -z 100k 64k"],
    );
    c.qcow2("v2.qcow2", "10M", &["-o", "compat=0.10"]);
    c.qcow2("bm.qcow2", "100M", &[]);
    c.prep("qemu-img", &["bitmap", "--add", "bm.qcow2", "b0"]);
    c.prep(
        "qemu-img",
        &["bitmap", "--add", "-g", "4k", "bm.qcow2", "longer-name"],
    );
    let mut raw = vec![0u8; 10 << 20];
    let mut rng = Rng(3);
    for b in raw[(6400 << 10)..(6592 << 10)].iter_mut() {
        *b = rng.next() as u8;
    }
    raw[3_000_000] = 1;
    std::fs::write(c.setup.join("r.raw"), &raw).unwrap();
    let opts = [
        "",
        "cluster_size=512",
        "cluster_size=4k",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=64",
        "compat=0.10",
        "extended_l2=on",
        "extended_l2=on,cluster_size=2M",
        "preallocation=full",
        "preallocation=metadata",
        "backing_file=x",
    ];
    for size in ["0", "1000", "1.5k", "1M", "1G", "1.5G", "100G", "16T"] {
        for o in opts {
            let mut a = vec!["measure", "-O", "qcow2", "--size", size];
            if !o.is_empty() {
                a.extend_from_slice(&["-o", o]);
            }
            c.same(&a);
        }
        c.same(&["measure", "--size", size]);
        c.same(&["measure", "--output=json", "-O", "qcow2", "--size", size]);
    }
    for f in ["a.qcow2", "top.qcow2", "v2.qcow2", "bm.qcow2", "r.raw"] {
        for o in opts {
            let mut a = vec!["measure", "-O", "qcow2", f];
            if !o.is_empty() {
                a.extend_from_slice(&["-o", o]);
            }
            c.same(&a);
            a.push("--output=json");
            c.same(&a);
        }
        c.same(&["measure", f]);
        c.same(&["measure", "-f", "raw", f]);
    }
    let (_, out) = c.same(&["measure", "-O", "qcow2", "bm.qcow2"]);
    assert!(out.contains("bitmaps size: "), "{out}");
    for a in [
        &["measure"][..],
        &["measure", "--size", "abc"],
        &["measure", "--size", "-1"],
        &["measure", "--size", "1G", "a.qcow2"],
        &["measure", "-O", "qcow2", "a", "b"],
        &["measure", "-O", "qcow2", "nonexist"],
        &["measure", "-O", "vmdk", "--size", "1G"],
        &["measure", "-O", "qcow2", "--size", "1G", "--output=xml"],
        &[
            "measure",
            "-O",
            "qcow2",
            "--size",
            "100T",
            "-o",
            "cluster_size=512",
        ],
        &[
            "measure",
            "-O",
            "raw",
            "--size",
            "1G",
            "-o",
            "cluster_size=4k",
        ],
        &["measure", "-O", "qcow2", "--size", "1G", "-o", "bogus=1"],
        &[
            "measure",
            "-O",
            "qcow2",
            "--size",
            "1G",
            "-o",
            "cluster_size=3000",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "--size",
            "1G",
            "-o",
            "refcount_bits=3",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "--size",
            "1G",
            "-o",
            "compat=0.10,refcount_bits=64",
        ],
        &["measure", "-O", "qcow2", "--size", "1G", "-o", "compat=3"],
        &[
            "measure",
            "-O",
            "qcow2",
            "--size",
            "1G",
            "-o",
            "preallocation=bogus",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "--size",
            "1G",
            "-o",
            "extended_l2=on,cluster_size=4k",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "--size",
            "1G",
            "-o",
            "lazy_refcounts=bogus",
        ],
        &["measure", "-O", "qcow2", "--size", "1G", "-o", "size=abc"],
    ] {
        c.same(a);
    }
}

#[test]
fn measure_of_snapshots_and_preallocated_sources_matches_qemu_img() {
    let d = Scratch::new("img-measure-snap");
    let c = Case::new(&d);
    c.qcow2("s.qcow2", "64M", &[]);
    qemu_io_in(&c.setup, "s.qcow2", &["write -P 1 0 8M"]);
    c.prep("qemu-img", &["snapshot", "-c", "snap1", "s.qcow2"]);
    qemu_io_in(&c.setup, "s.qcow2", &["write -P 2 16M 16M"]);
    c.prep("qemu-img", &["convert", "-O", "raw", "s.qcow2", "s.raw"]);
    // The snapshot holds 8 MiB, the active layer 24 MiB: the two differ.
    let (_, active) = c.same(&["measure", "-O", "qcow2", "s.qcow2"]);
    let (_, snap) = c.same(&["measure", "-l", "snap1", "-O", "qcow2", "s.qcow2"]);
    assert_ne!(active, snap);
    for a in [
        &[
            "measure",
            "-l",
            "snapshot.name=snap1",
            "-O",
            "qcow2",
            "s.qcow2",
        ][..],
        &["measure", "-l", "snapshot.id=1", "-O", "raw", "s.qcow2"],
        &[
            "measure",
            "-l",
            "1",
            "--output=json",
            "-O",
            "qcow2",
            "s.qcow2",
        ],
        &["measure", "-l", "nope", "-O", "qcow2", "s.qcow2"],
        &["measure", "-l", "snapshot.foo=1", "-O", "qcow2", "s.qcow2"],
        &["measure", "-l", "snap1", "--size", "1G", "-O", "qcow2"],
        &["measure", "-f", "raw", "-l", "snap1", "s.raw"],
        &["measure", "-f", "raw"],
        &["measure", "-f", "raw", "--size", "1G", "s.raw"],
    ] {
        c.same(a);
    }
    // Metadata preallocation: data clusters over holes in the host file
    // read as zeros, and QEMU does not count them as required.
    c.qcow2("pm.qcow2", "16M", &["-o", "preallocation=metadata"]);
    qemu_io_in(&c.setup, "pm.qcow2", &["write -P 1 1M 64k"]);
    let num = |out: &str, key: &str| -> u64 {
        let line = out.lines().find(|l| l.starts_with(key)).expect(key);
        line[key.len()..].trim().parse().unwrap()
    };
    for o in ["cluster_size=64k", "cluster_size=4k", "cluster_size=2M"] {
        let (_, out) = c.same(&["measure", "-O", "qcow2", "-o", o, "pm.qcow2"]);
        let required = num(&out, "required size:");
        let full = num(&out, "fully allocated size:");
        assert!(required < full / 2, "{o}: {out}");
    }
}

// ---- compare ----------------------------------------------------------------------

#[test]
fn compare_matches_qemu_img() {
    let d = Scratch::new("img-compare");
    let c = Case::new(&d);
    let s = &c.setup;
    let create = |name: &str, size: &str| {
        ok_in(s, "qemu-img", &["create", "-q", "-f", "qcow2", name, size]);
    };
    create("a.qcow2", "4M");
    create("b.qcow2", "4M");
    create("c.qcow2", "8M");
    create("c5.qcow2", "8M");
    qemu_io_in(s, "c5.qcow2", &["write -P 1 5M 512"]);
    create("b1.qcow2", "4M");
    qemu_io_in(s, "b1.qcow2", &["write -P 1 1000 1"]);
    create("az.qcow2", "4M");
    qemu_io_in(s, "az.qcow2", &["write -z 2M 64k"]);
    create("d1.qcow2", "256k");
    create("d2.qcow2", "256k");
    qemu_io_in(s, "d1.qcow2", &["write -P 1 0 256k"]);
    // Same data, another host layout: strict mode sees other block status.
    qemu_io_in(
        s,
        "d2.qcow2",
        &["write -P 1 128k 128k", "write -P 1 0 128k"],
    );
    ok_in(
        s,
        "qemu-img",
        &["convert", "-O", "raw", "d1.qcow2", "d1.raw"],
    );
    std::fs::write(s.join("r4.raw"), vec![0u8; 4 << 20]).unwrap();
    ok_in(
        s,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "d1.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "1M",
        ],
    );
    let names = ["a", "b", "c", "c5", "b1", "az", "d1", "d2", "top"];
    for x in names {
        for y in names {
            let (fx, fy) = (format!("{x}.qcow2"), format!("{y}.qcow2"));
            c.same(&["compare", &fx, &fy]);
            c.same(&["compare", "-s", &fx, &fy]);
        }
    }
    for a in [
        &["-q", "a.qcow2", "b1.qcow2"][..],
        &["a.qcow2", "nonexist"],
        &["-f", "raw", "a.qcow2", "b.qcow2"],
        &["d1.raw", "d1.qcow2"],
        &["-s", "d1.raw", "d1.qcow2"],
        &["-s", "r4.raw", "a.qcow2"],
        &["r4.raw", "a.qcow2"],
        &["-F", "raw", "d1.qcow2", "d1.raw"],
        &["-p", "a.qcow2", "b.qcow2"],
        &["-p", "a.qcow2", "c5.qcow2"],
        &["-p", "-s", "a.qcow2", "c5.qcow2"],
    ] {
        let mut args = vec!["compare"];
        args.extend_from_slice(a);
        c.same(&args);
    }
    assert_eq!(
        c.same(&["compare", "a.qcow2", "b1.qcow2"]),
        (1, "Content mismatch at offset 512!\n".into())
    );
    assert_eq!(c.same(&["compare", "a.qcow2", "nonexist"]).0, 2);
}

// ---- rebase -----------------------------------------------------------------------

fn rebase_setup(c: &Case) {
    let s = &c.setup;
    let q = |args: &[&str]| ok_in(s, "qemu-img", args);
    q(&["create", "-q", "-f", "qcow2", "b1.qcow2", "4M"]);
    q(&["create", "-q", "-f", "qcow2", "b2.qcow2", "4M"]);
    qemu_io_in(s, "b1.qcow2", &["write -P 1 0 1M", "write -P 7 3M 100k"]);
    qemu_io_in(s, "b2.qcow2", &["write -P 2 512k 1M", "write -P 7 3M 100k"]);
    q(&[
        "create", "-q", "-f", "qcow2", "-b", "b1.qcow2", "-F", "qcow2", "t.qcow2",
    ]);
    qemu_io_in(s, "t.qcow2", &["write -P 3 0 64k", "write -z 700k 64k"]);
    q(&["convert", "-O", "raw", "b2.qcow2", "b2.raw"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b2.qcow2",
        "-F",
        "qcow2",
        "mid.qcow2",
    ]);
    qemu_io_in(s, "mid.qcow2", &["write -P 9 2M 64k"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "6M",
    ]);
    qemu_io_in(s, "top.qcow2", &["write -P 8 1M 4k"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "b1.qcow2",
        "-F",
        "qcow2",
        "small.qcow2",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "b1.qcow2",
        "-F",
        "qcow2",
        "v2.qcow2",
    ]);
    qemu_io_in(s, "v2.qcow2", &["write -P 4 1M 64k"]);
    std::fs::create_dir_all(s.join("d")).unwrap();
    std::fs::copy(s.join("t.qcow2"), s.join("d/t.qcow2")).unwrap();
    std::fs::copy(s.join("b1.qcow2"), s.join("d/b1.qcow2")).unwrap();
}

#[test]
fn rebase_matches_qemu_img() {
    let d = Scratch::new("img-rebase");
    let c = Case::new(&d);
    rebase_setup(&c);
    for a in [
        &["-b", "b2.qcow2", "-F", "qcow2", "t.qcow2"][..],
        &["-b", "b2.qcow2", "t.qcow2"],
        &["-b", "", "t.qcow2"],
        &["-b", "b2.raw", "-F", "raw", "t.qcow2"],
        &["-c", "-b", "b2.qcow2", "-F", "qcow2", "t.qcow2"],
        &["-p", "-b", "b2.qcow2", "-F", "qcow2", "t.qcow2"],
        &["-q", "-b", "b2.qcow2", "-F", "qcow2", "t.qcow2"],
        &["-b", "b2.qcow2", "-F", "qcow2", "top.qcow2"],
        &["-p", "-b", "b2.qcow2", "-F", "qcow2", "top.qcow2"],
        &["-p", "-b", "", "top.qcow2"],
        &["-p", "-b", "b1.qcow2", "-F", "qcow2", "top.qcow2"],
        &["-p", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
        &["-b", "b2.qcow2", "-F", "qcow2", "small.qcow2"],
        &["-b", "b2.qcow2", "-F", "qcow2", "v2.qcow2"],
        &["-b", "../b2.qcow2", "-F", "qcow2", "d/t.qcow2"],
    ] {
        let mut args = vec!["rebase"];
        args.extend_from_slice(a);
        let (code, _) = c.same(&args);
        let file = a[a.len() - 1];
        // Safe rebase keeps the guest view; both tools end up alike.
        c.same_view(file);
        c.same_info(file);
        if code == 0 && !file.starts_with("small") {
            c.same_map(file);
        }
    }
    for a in [
        &["-u", "-b", "nonexist", "t.qcow2"][..],
        &["-u", "-b", "nonexist", "-F", "qcow2", "t.qcow2"],
        &["-u", "-b", "", "t.qcow2"],
        &["-u", "t.qcow2"],
        &["t.qcow2"],
        &["-b", "nonexist", "-F", "qcow2", "t.qcow2"],
        &["-b", "nonexist", "-F", "qcow2", "d/t.qcow2"],
    ] {
        let mut args = vec!["rebase"];
        args.extend_from_slice(a);
        c.same(&args);
        c.same_info(a[a.len() - 1]);
    }
    // The guest view survives the rebase: compare with a flat copy.
    let dir = d.path("flat");
    copy_dir(&c.setup, &dir);
    ok_in(
        &dir,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "before.raw"],
    );
    ok_in(
        &dir,
        BIN,
        &["rebase", "-b", "b1.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    let (code, out, err) = run_in(
        &dir,
        "qemu-img",
        &["compare", "-F", "raw", "top.qcow2", "before.raw"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_clean(&dir.join("top.qcow2"));
}

// ---- commit -----------------------------------------------------------------------

#[test]
fn commit_matches_qemu_img() {
    let d = Scratch::new("img-commit");
    let c = Case::new(&d);
    let s = &c.setup;
    let q = |args: &[&str]| ok_in(s, "qemu-img", args);
    q(&["create", "-q", "-f", "qcow2", "b.qcow2", "4M"]);
    qemu_io_in(s, "b.qcow2", &["write -P 1 0 2M"]);
    q(&[
        "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "m.qcow2",
    ]);
    qemu_io_in(s, "m.qcow2", &["write -P 2 1M 64k", "write -z 1536k 64k"]);
    q(&[
        "create", "-q", "-f", "qcow2", "-b", "m.qcow2", "-F", "qcow2", "t.qcow2", "8M",
    ]);
    qemu_io_in(
        s,
        "t.qcow2",
        &[
            "write -P 3 3M 64k",
            "write -P 4 6M 64k",
            "write -z 0 64k",
            "discard 128k 64k",
        ],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        "v2.qcow2",
    ]);
    qemu_io_in(s, "v2.qcow2", &["write -P 3 0 64k", "write -z 512k 128k"]);
    q(&[
        "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "e.qcow2",
    ]);
    std::fs::write(s.join("r.raw"), vec![0u8; 4 << 20]).unwrap();
    q(&[
        "create", "-q", "-f", "qcow2", "-b", "r.raw", "-F", "raw", "tr.qcow2",
    ]);
    qemu_io_in(s, "tr.qcow2", &["write -P 5 100k 200k"]);
    let all = [
        "b.qcow2", "m.qcow2", "t.qcow2", "v2.qcow2", "r.raw", "tr.qcow2",
    ];
    for a in [
        &["t.qcow2"][..],
        &["-d", "t.qcow2"],
        &["-b", "m.qcow2", "t.qcow2"],
        &["-b", "b.qcow2", "t.qcow2"],
        &["v2.qcow2"],
        &["e.qcow2"],
        &["-q", "m.qcow2"],
        &["-t", "writethrough", "m.qcow2"],
        &["-r", "1M", "e.qcow2"],
        &["tr.qcow2"],
    ] {
        let mut args = vec!["commit"];
        args.extend_from_slice(a);
        let (code, out) = c.same(&args);
        assert_eq!(code, 0, "{args:?}");
        assert_eq!(
            out,
            if a.contains(&"-q") {
                ""
            } else {
                "Image committed.\n"
            }
        );
        for f in all {
            c.same_view(f);
            // QEMU's make_empty also truncates the emptied overlay; the
            // engine frees its clusters (punching holes) but keeps the length.
            c.same_info_but(f, "file length:");
        }
        // Layouts are not compared: QEMU's commit job copies with several
        // requests in flight, so even its own allocation order varies.
    }
    for a in [
        &["-b", "t.qcow2", "t.qcow2"][..],
        &["-b", "nonexist", "t.qcow2"],
        &["b.qcow2"],
        &["-r", "abc", "e.qcow2"],
        &["-t", "bogus", "e.qcow2"],
        &["nonexist.qcow2"],
    ] {
        let mut args = vec!["commit"];
        args.extend_from_slice(a);
        assert_eq!(c.same(&args).0, 1);
    }
}

// ---- bench ------------------------------------------------------------------------

#[test]
fn bench_prints_what_qemu_img_prints() {
    let d = Scratch::new("img-bench");
    let c = Case::new(&d);
    c.qcow2("a.qcow2", "64M", &[]);
    std::fs::write(c.setup.join("r.raw"), vec![0u8; 1 << 20]).unwrap();
    for a in [
        &["-c", "10", "a.qcow2"][..],
        &["-q", "-c", "10", "a.qcow2"],
        &["-w", "-c", "100", "-s", "64k", "a.qcow2"],
        &[
            "-c",
            "10",
            "-d",
            "2",
            "-o",
            "4096",
            "-S",
            "8192",
            "-w",
            "--pattern",
            "5",
            "--flush-interval",
            "3",
            "a.qcow2",
        ],
        &[
            "-c",
            "10",
            "--flush-interval",
            "3",
            "-d",
            "3",
            "--no-drain",
            "-w",
            "a.qcow2",
        ],
        &[
            "-c",
            "3",
            "-t",
            "writethrough",
            "-w",
            "-s",
            "64k",
            "a.qcow2",
        ],
        &["-c", "3", "-t", "directsync", "a.qcow2"],
        &["-c", "3", "-t", "none", "-n", "a.qcow2"],
        &["-c", "3", "-t", "unsafe", "-w", "a.qcow2"],
        &["-c", "3", "-t", "off", "a.qcow2"],
        &["-c", "3", "-S", "0", "a.qcow2"],
        &["-c", "2", "-s", "1.5k", "a.qcow2"],
        &["-c", "3", "-o", "0x10", "a.qcow2"],
        &["-c", "0x10", "a.qcow2"],
        &["-c", "3", "-i", "io_uring", "a.qcow2"],
        &["-c", "3", "-f", "raw", "r.raw"],
        &[
            "-c",
            "10",
            "--flush-interval",
            "3",
            "--no-drain",
            "-w",
            "a.qcow2",
        ],
        &["--flush-interval=2", "-c", "10", "a.qcow2"],
        &["-c", "0", "a.qcow2"],
        &["-c", "-1", "a.qcow2"],
        &["-c", "abc", "a.qcow2"],
        &["-c", "1k", "a.qcow2"],
        &["-d", "0", "a.qcow2"],
        &["-d", "abc", "a.qcow2"],
        &["-s", "0", "a.qcow2"],
        &["-s", "abc", "a.qcow2"],
        &["-S", "-5", "a.qcow2"],
        &["-S", "abc", "a.qcow2"],
        &["-o", "-1", "a.qcow2"],
        &["-o", "abc", "a.qcow2"],
        &["-w", "--pattern", "300", "a.qcow2"],
        &["-w", "--pattern", "abc", "a.qcow2"],
        &["-w", "--flush-interval", "-1", "a.qcow2"],
        &["-w", "--flush-interval", "abc", "a.qcow2"],
        &["-t", "bogus", "a.qcow2"],
        &["-i", "bogus", "a.qcow2"],
        &["-n", "-c", "10", "a.qcow2"],
        &["-o", "63M", "-s", "2M", "-c", "3", "a.qcow2"],
        &["-c", "3", "nonexist"],
        &["-c", "3", "a.qcow2", "a.qcow2"],
    ] {
        let mut args = vec!["bench"];
        args.extend_from_slice(a);
        c.same(&args);
    }
    let (code, out) = c.same(&[
        "bench",
        "-w",
        "-t",
        "writethrough",
        "-c",
        "2000",
        "-s",
        "64k",
        "-S",
        "64k",
        "a.qcow2",
    ]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "Sending 2000 write requests, 65536 bytes each, 64 in parallel (starting at offset 0, step size 65536)"
    );
    assert!(
        lines[1].starts_with("Run completed in ") && lines[1].ends_with(" seconds."),
        "{out}"
    );
    let secs = &lines[1]["Run completed in ".len()..lines[1].len() - " seconds.".len()];
    assert!(secs.parse::<f64>().is_ok() && secs.split('.').nth(1).map(str::len) == Some(3));
    // Same data; the layout differs, as 64 threads allocate in the order
    // they get the metadata lock, where QEMU allocates in submission order.
    c.same_view("a.qcow2");

    // Many requests in flight, flushes with and without draining, other
    // cache modes: the image QEMU checks is clean and holds what QEMU's
    // own run wrote.
    for a in [
        &[
            "-w",
            "-c",
            "3000",
            "-s",
            "4k",
            "-S",
            "60k",
            "-d",
            "8",
            "--flush-interval",
            "100",
            "--pattern",
            "7",
        ][..],
        &[
            "-w",
            "-c",
            "500",
            "-s",
            "100k",
            "-S",
            "33k",
            "-d",
            "16",
            "--flush-interval",
            "64",
            "--no-drain",
            "--pattern",
            "9",
        ],
        &[
            "-w",
            "-c",
            "500",
            "-s",
            "64k",
            "-t",
            "none",
            "-d",
            "4",
            "--pattern",
            "3",
        ],
        &[
            "-w",
            "-c",
            "500",
            "-s",
            "64k",
            "-t",
            "unsafe",
            "-d",
            "4",
            "--pattern",
            "3",
        ],
        &[
            "-w",
            "-c",
            "300",
            "-s",
            "64k",
            "-t",
            "directsync",
            "--pattern",
            "1",
        ],
    ] {
        let mut args = vec!["bench"];
        args.extend_from_slice(a);
        args.push("a.qcow2");
        assert_eq!(c.same(&args).0, 0);
        c.same_view("a.qcow2");
    }
    // Lazy refcounts: a writethrough run leaves a clean image once closed.
    let dir = d.path("lazy");
    std::fs::create_dir_all(&dir).unwrap();
    ok_in(
        &dir,
        BIN,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "l.qcow2",
            "4G",
        ],
    );
    ok_in(
        &dir,
        BIN,
        &[
            "bench",
            "-w",
            "-t",
            "writethrough",
            "-c",
            "500",
            "-s",
            "64k",
            "-S",
            "64k",
            "-d",
            "4",
            "--pattern",
            "6",
            "l.qcow2",
        ],
    );
    assert_clean(&dir.join("l.qcow2"));
    qemu_io_in(&dir, "l.qcow2", &["read -P 6 0 32000k"]);
}

// ---- convert ----------------------------------------------------------------------

fn convert_setup(c: &Case) {
    let s = &c.setup;
    let mut rng = Rng(11);
    let mut data = vec![0u8; 6 << 20];
    for (i, chunk) in data.chunks_mut(64 << 10).enumerate() {
        match i % 3 {
            0 => chunk.iter_mut().for_each(|b| *b = rng.next() as u8),
            1 => chunk.fill(i as u8),
            _ => {}
        }
    }
    data[(4 << 20) + 4097] = 0x55;
    std::fs::write(s.join("src.raw"), &data).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(s.join("src.raw"))
        .unwrap()
        .set_len(9 << 20)
        .unwrap();
    let q = |args: &[&str]| ok_in(s, "qemu-img", args);
    q(&["create", "-q", "-f", "qcow2", "z.qcow2", "9M"]);
    qemu_io_in(
        s,
        "z.qcow2",
        &[
            "write -z 0 128k",
            "write -P 3 512k 64k",
            "write -c -P 4 1M 64k",
            "write -P 5 3000k 100k",
        ],
    );
    q(&["create", "-q", "-f", "qcow2", "n.qcow2", "9M"]);
    qemu_io_in(s, "n.qcow2", &["write -P 9 0 9M"]);
    q(&["create", "-q", "-f", "qcow2", "big.qcow2", "12M"]);
    qemu_io_in(s, "big.qcow2", &["write -P 9 0 12M"]);
    q(&["create", "-q", "-f", "qcow2", "small.qcow2", "1M"]);
    q(&["convert", "-O", "raw", "n.qcow2", "n.raw"]);
}

/// -t (target cache, qemu-img's default unsafe) and -T (source cache):
/// the same data, and the same syncs as qemu-img (none for a throw-away
/// copy, one at the end with writeback or none, one per write with
/// writethrough), and qemu-img's errors for modes it does not know.
#[test]
fn convert_cache_modes_sync_as_qemu_img() {
    let d = Scratch::new("img-convert-cache");
    let c = Case::new(&d);
    convert_setup(&c);
    c.fresh();
    for a in [
        &[][..],
        &["-t", "unsafe"],
        &["-t", "writeback"],
        &["-t", "none"],
        &["-T", "none"],
        &["-t", "directsync", "-T", "none"],
    ] {
        let mut counts = Vec::new();
        for (tool, dir) in [("qemu-img", &c.q), (BIN, &c.o)] {
            let _ = std::fs::remove_file(dir.join("out.raw"));
            let mut args = vec!["convert"];
            args.extend_from_slice(a);
            args.extend_from_slice(&["-O", "raw", "z.qcow2", "out.raw"]);
            counts.push(syncs_of(dir, tool, &args));
        }
        let (q, o) = (counts[0], counts[1]);
        if a.contains(&"directsync") {
            // One per write at least (z.qcow2 holds three data extents);
            // how the copy is cut into writes differs.
            assert!(q >= 3 && o >= 3, "{a:?}: qemu-img {q} syncs, oxqcow {o}");
        } else {
            assert_eq!(o, q, "{a:?}: syncs");
        }
        ok_in(
            &c.o,
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "raw", "z.qcow2", "out.raw"],
        );
    }
    // An O_DIRECT target whose end is not block aligned ends where
    // qemu-img's does (a padded last write would lengthen the file).
    let odd: Vec<u8> = (0..1_000_001u32)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    for t in ["none", "directsync"] {
        let mut outs = Vec::new();
        for (tool, dir) in [("qemu-img", &c.q), (BIN, &c.o)] {
            std::fs::write(dir.join("odd.raw"), &odd).unwrap();
            let _ = std::fs::remove_file(dir.join("odd.out"));
            let args = [
                "convert", "-t", t, "-T", t, "-O", "raw", "odd.raw", "odd.out",
            ];
            ok_in(dir, tool, &args);
            outs.push(std::fs::read(dir.join("odd.out")).unwrap());
        }
        assert_eq!(outs[0].len(), outs[1].len(), "-t {t}: target length");
        assert!(outs[0] == outs[1], "-t {t}: target bytes");
    }
    // A qcow2 target written without a sync still gets all its metadata
    // at close.
    for t in ["unsafe", "writeback", "none"] {
        let _ = std::fs::remove_file(c.o.join("out.qcow2"));
        ok_in(
            &c.o,
            BIN,
            &["convert", "-t", t, "-O", "qcow2", "z.qcow2", "out.qcow2"],
        );
        assert_clean(&c.o.join("out.qcow2"));
        ok_in(&c.o, "qemu-img", &["compare", "z.qcow2", "out.qcow2"]);
    }
    for a in [
        &["-t", "bogus"][..],
        &["-T", "bogus"],
        &["-t", "none", "-T", "bogus"],
    ] {
        let mut args = vec!["convert"];
        args.extend_from_slice(a);
        args.extend_from_slice(&["-O", "raw", "z.qcow2", "out.raw"]);
        assert_eq!(c.same(&args).0, 1);
    }
}

#[test]
fn convert_additions_match_qemu_img() {
    let d = Scratch::new("img-convert");
    let c = Case::new(&d);
    convert_setup(&c);
    for (a, out, same_layout) in [
        (
            &["-c", "-O", "qcow2", "src.raw", "out.qcow2"][..],
            "out.qcow2",
            true,
        ),
        (
            &[
                "-c",
                "-O",
                "qcow2",
                "-o",
                "compression_type=zstd",
                "src.raw",
                "out.qcow2",
            ],
            "out.qcow2",
            true,
        ),
        (
            &["-c", "-O", "qcow2", "z.qcow2", "out.qcow2"],
            "out.qcow2",
            true,
        ),
        (
            &[
                "-c",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "z.qcow2",
                "out.qcow2",
            ],
            "out.qcow2",
            true,
        ),
        (
            &[
                "-c",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=2M",
                "src.raw",
                "out.qcow2",
            ],
            "out.qcow2",
            true,
        ),
        (
            &["-n", "-O", "qcow2", "z.qcow2", "n.qcow2"],
            "n.qcow2",
            true,
        ),
        (
            &["-n", "-S", "0", "-O", "qcow2", "z.qcow2", "n.qcow2"],
            "n.qcow2",
            true,
        ),
        (
            &["-n", "-O", "qcow2", "src.raw", "n.qcow2"],
            "n.qcow2",
            true,
        ),
        (
            &["-n", "-O", "qcow2", "z.qcow2", "big.qcow2"],
            "big.qcow2",
            true,
        ),
        (&["-n", "z.qcow2", "n.raw"], "n.raw", false),
        (&["-n", "-O", "raw", "src.raw", "n.raw"], "n.raw", false),
        (
            &["-m", "1", "-O", "qcow2", "src.raw", "out.qcow2"],
            "out.qcow2",
            true,
        ),
        (
            &["-m", "16", "-O", "qcow2", "src.raw", "out.qcow2"],
            "out.qcow2",
            true,
        ),
        (
            &["-m", "4", "-W", "-O", "qcow2", "src.raw", "out.qcow2"],
            "out.qcow2",
            false,
        ),
        (
            &["-c", "-m", "8", "-W", "-O", "qcow2", "src.raw", "out.qcow2"],
            "out.qcow2",
            false,
        ),
        (
            &["-S", "0", "-O", "qcow2", "z.qcow2", "out.qcow2"],
            "out.qcow2",
            true,
        ),
    ] {
        let mut args = vec!["convert"];
        args.extend_from_slice(a);
        assert_eq!(c.same(&args).0, 0, "{args:?}");
        c.same_view(out);
        if same_layout {
            c.same_map(out);
        }
    }
    for a in [
        &["-n", "-O", "qcow2", "z.qcow2", "small.qcow2"][..],
        &["-n", "-O", "qcow2", "z.qcow2", "nonexist.qcow2"],
        &["-n", "-c", "-O", "qcow2", "z.qcow2", "n.qcow2"],
        &[
            "-n",
            "-o",
            "cluster_size=4k",
            "-O",
            "qcow2",
            "z.qcow2",
            "n.qcow2",
        ],
        &["-m", "0", "z.qcow2", "out.raw"],
        &["-m", "17", "z.qcow2", "out.raw"],
        &["-m", "abc", "z.qcow2", "out.raw"],
        &["-c", "z.qcow2", "out.raw"],
        &["-c", "-O", "raw", "z.qcow2", "out.raw"],
        &["-S", "abc", "z.qcow2", "out.raw"],
    ] {
        let mut args = vec!["convert"];
        args.extend_from_slice(a);
        assert_eq!(c.same(&args).0, 1, "{args:?}");
    }
}

#[test]
fn compressed_output_is_read_by_qemu() {
    let d = Scratch::new("img-convc");
    let c = Case::new(&d);
    convert_setup(&c);
    let dir = &c.setup;
    for ctype in ["zlib", "zstd"] {
        let out = format!("{ctype}.qcow2");
        let o = format!("compression_type={ctype}");
        ok_in(
            dir,
            BIN,
            &["convert", "-c", "-O", "qcow2", "-o", &o, "src.raw", &out],
        );
        assert_clean(&dir.join(&out));
        let (code, txt, err) = run_in(dir, "qemu-img", &["compare", "-f", "raw", "src.raw", &out]);
        assert_eq!(code, 0, "{txt}{err}");
        let map = ok_in(dir, "qemu-img", &["map", "--output=json", &out]);
        assert!(map.contains("\"compressed\": true"), "{map}");
        let info = ok_in(dir, "qemu-img", &["info", &out]);
        assert!(
            info.contains(&format!("compression type: {ctype}")),
            "{info}"
        );
        // QEMU's own compressed image of the same data is as large.
        let theirs = format!("q-{ctype}.qcow2");
        ok_in(
            dir,
            "qemu-img",
            &["convert", "-c", "-O", "qcow2", "-o", &o, "src.raw", &theirs],
        );
        let ours = std::fs::metadata(dir.join(&out)).unwrap().len();
        let qs = std::fs::metadata(dir.join(&theirs)).unwrap().len();
        assert!(ours <= qs + 65536 && qs <= ours + 65536, "{ours} vs {qs}");
    }
    // Compressed data read back by us from QEMU's zstd image, and rewritten.
    ok_in(
        dir,
        BIN,
        &["convert", "-O", "raw", "q-zstd.qcow2", "back.raw"],
    );
    assert_eq!(
        std::fs::read(dir.join("back.raw")).unwrap(),
        std::fs::read(dir.join("src.raw")).unwrap()
    );
}

// ---- external data files ----------------------------------------------------------

/// The same files in both copies: `name` byte for byte.
fn same_bytes(c: &Case, name: &str) {
    let (q, o) = (c.q.join(name), c.o.join(name));
    let (a, b) = (std::fs::read(&q).unwrap(), std::fs::read(&o).unwrap());
    assert_eq!(a.len(), b.len(), "{name}: length differs");
    if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
        panic!("{name}: first difference at byte {i:#x}");
    }
}

/// Both copies of `file` read the same guest data, each read by qemu-img
/// in its own directory (relative data file names are relative to the
/// current directory); ours is clean.
fn same_view_here(c: &Case, file: &str) {
    for dir in [&c.q, &c.o] {
        ok_in(dir, "qemu-img", &["convert", "-O", "raw", file, "view.raw"]);
    }
    same_bytes(c, "view.raw");
    let (code, out, err) = run_in(&c.o, "qemu-img", &["check", file]);
    assert_eq!(code, 0, "qemu-img check {file} after oxqcow: {out}{err}");
}

#[test]
fn data_file_create_like_qemu_img() {
    let d = Scratch::new("img-df-create");
    let c = Case::new(&d);
    c.qcow2("b.qcow2", "1M", &[]);
    std::fs::create_dir_all(c.setup.join("sub")).unwrap();
    // Relative data file names are relative to the current directory.
    for (o, file) in [
        ("data_file=d.raw", "n.qcow2"),
        ("data_file=d.raw", "sub/n.qcow2"),
        ("data_file=sub/d.raw,data_file_raw=on", "n.qcow2"),
        (
            "data_file=d.raw,data_file_raw=off,preallocation=metadata",
            "n.qcow2",
        ),
        (
            "data_file=d.raw,preallocation=full,cluster_size=4k",
            "n.qcow2",
        ),
        (
            "data_file=d.raw,backing_file=b.qcow2,backing_fmt=qcow2",
            "n.qcow2",
        ),
        ("data_file=d.raw,compat=0.10", "n.qcow2"),
        ("data_file_raw=on", "n.qcow2"),
        ("data_file_raw=on,compat=0.10,lazy_refcounts=on", "n.qcow2"),
        (
            "data_file=d.raw,data_file_raw=on,backing_file=b.qcow2,backing_fmt=qcow2",
            "n.qcow2",
        ),
        (
            "data_file=d.raw,compat=0.10,compression_type=zstd",
            "n.qcow2",
        ),
        ("data_file=d.raw,compat=0.10,backing_fmt=qcow2", "n.qcow2"),
        ("data_file=/nonexistent/d.raw", "n.qcow2"),
        ("data_file=", "n.qcow2"),
        ("data_file_raw=maybe,data_file=d.raw", "n.qcow2"),
    ] {
        let (code, _) = c.same(&["create", "-f", "qcow2", "-o", o, file, "1M"]);
        for dir in [&c.q, &c.o] {
            assert_eq!(dir.join(file).exists(), code == 0, "{o}: image left behind");
        }
        if code == 0 {
            same_bytes(&c, file);
            let data = if o.contains("sub/d.raw") {
                "sub/d.raw"
            } else {
                "d.raw"
            };
            same_bytes(&c, data);
            let (code, out, err) = run_in(&c.o, "qemu-img", &["check", file]);
            assert_eq!(code, 0, "{out}{err}");
        }
    }
}

#[test]
fn data_file_images_like_qemu_img() {
    let d = Scratch::new("img-df");
    let c = Case::new(&d);
    c.qcow2("a.qcow2", "4M", &["-o", "data_file=a.raw"]);
    qemu_io_in(
        &c.setup,
        "a.qcow2",
        &["write -P 1 0 200k", "write -z 1M 64k", "write -P 2 3M 4k"],
    );
    c.prep(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=r.raw,data_file_raw=on",
            "r.qcow2",
            "2M",
        ],
    );
    c.qcow2("top.qcow2", "", &["-b", "a.qcow2", "-F", "qcow2"]);
    for f in ["a.qcow2", "r.qcow2", "top.qcow2"] {
        c.same(&["info", f]);
        c.same(&["info", "--output=json", f]);
        c.same(&["info", "--backing-chain", f]);
        c.same(&["map", f]);
        c.same(&["map", "--output=json", f]);
        c.same(&["check", f]);
        c.same(&["check", "--output=json", f]);
    }
    c.same(&["compare", "a.qcow2", "top.qcow2"]);
    // Snapshots are refused; the data file name and raw bit can be amended.
    c.same(&["snapshot", "-c", "s", "a.qcow2"]);
    c.same(&["snapshot", "-l", "a.qcow2"]);
    for o in [
        "data_file=b.raw",
        "data_file=",
        "data_file_raw=on",
        "data_file_raw=off",
        "compat=0.10",
        "lazy_refcounts=on,data_file=a.raw",
    ] {
        for f in ["a.qcow2", "r.qcow2"] {
            let (code, _) = c.same(&["amend", "-o", o, f]);
            if code == 0 {
                c.same(&["info", f]);
            }
        }
    }
    for args in [
        vec!["resize", "a.qcow2", "8M"],
        vec!["resize", "--shrink", "a.qcow2", "1M"],
        vec!["resize", "r.qcow2", "+2M"],
    ] {
        let (code, _) = c.same(&args);
        assert_eq!(code, 0);
        same_view_here(&c, args[args.len() - 2]);
        c.same_map(args[args.len() - 2]);
    }
    // Converting into and out of data-file images.
    c.same(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "data_file=c.raw",
        "a.qcow2",
        "c.qcow2",
    ]);
    same_view_here(&c, "c.qcow2");
    c.same_map("c.qcow2");
    same_bytes(&c, "c.raw");
    c.same(&["convert", "-O", "raw", "a.qcow2", "out.raw"]);
    same_bytes(&c, "out.raw");
    c.same(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "data_file=z.raw",
        "a.qcow2",
        "z.qcow2",
    ]);
    // Without its data file: info works, the rest does not.
    std::fs::remove_file(c.setup.join("a.raw")).unwrap();
    c.same(&["info", "a.qcow2"]);
    c.same(&["check", "a.qcow2"]);
    c.same(&["map", "a.qcow2"]);
}

/// Refcount width limits as qemu-img meets them (iotest 112): a negative
/// width is a number that fails as a width after the Formatting line; a
/// snapshot that would overflow 1-bit refcounts fails with EINVAL and
/// leaves the image unmarked (the new L1 copy given back: QEMU leaks it); too many
/// references for the width are an overflow `check` reports and cannot
/// repair; amend then widens the entries keeping the stored refcounts, so
/// `check -r all` mends the rest; a width too narrow for a shared cluster
/// is refused with QEMU's words.
#[test]
fn refcount_width_limits_like_qemu_img() {
    let d = Scratch::new("img-refcount-limits");
    let c = Case::new(&d);
    c.same(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=-1",
        "n.qcow2",
        "64M",
    ]);
    c.qcow2("one.qcow2", "64M", &["-o", "refcount_bits=1"]);
    qemu_io_in(&c.setup, "one.qcow2", &["write 0 512"]);
    let (code, _) = c.same(&["snapshot", "-c", "foo", "one.qcow2"]);
    assert_eq!(code, 1);
    // QEMU leaks the L1 copy it allocated; oxqcow gives it back.
    let (code, out, _) = run_in(&c.q, "qemu-img", &["check", "one.qcow2"]);
    assert!(code == 3 && out.contains("1 leaked clusters"), "{out}");
    assert_clean(&c.o.join("one.qcow2"));
    let info = ok_in(&c.o, "qemu-img", &["info", "one.qcow2"]);
    assert!(info.contains("corrupt: false"), "{info}");
    // Two references to one cluster of a 1-bit image.
    c.qcow2("two.qcow2", "64M", &["-o", "refcount_bits=1"]);
    qemu_io_in(&c.setup, "two.qcow2", &["write 0 64k"]);
    let mut f = std::fs::read(c.setup.join("two.qcow2")).unwrap();
    f[0x40008..0x40010].copy_from_slice(&[0x80, 0, 0, 0, 0, 5, 0, 0]);
    std::fs::write(c.setup.join("two.qcow2"), f).unwrap();
    c.fresh();
    for step in [
        &["check", "-r", "all", "two.qcow2"][..],
        &["amend", "-o", "refcount_bits=2", "two.qcow2"],
        &["check", "-r", "all", "two.qcow2"],
        &["check", "two.qcow2"],
    ] {
        c.step(step);
    }
    same_view_here(&c, "two.qcow2");
    // A shared cluster cannot go back to 1 bit.
    c.qcow2("snap.qcow2", "64M", &[]);
    qemu_io_in(&c.setup, "snap.qcow2", &["write 0 64k"]);
    ok_in(&c.setup, "qemu-img", &["snapshot", "-c", "s", "snap.qcow2"]);
    let (code, _) = c.same(&["amend", "-o", "refcount_bits=1", "snap.qcow2"]);
    assert_eq!(code, 1);
    c.step(&["check", "snap.qcow2"]);
}
