//! More of `oxqcow convert` against qemu-img: `-l` (copying an internal
//! snapshot instead of the active disk) and `--salvage` (reading past
//! errors that blkdebug injects). Each command line runs through both
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
