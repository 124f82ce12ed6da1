//! One regression test per bug the structured fuzzer (`tests/fuzz/`,
//! `examples/fuzz.rs`) found, each with the mutant that showed it.

mod common;
use common::*;
use oxqcow::{Image, OpenOptions};

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

fn corruptions(p: &std::path::Path) -> u64 {
    let (_, out, _) = run("qemu-img", &["check", "--output=json", &s(p)]);
    out.split("\"corruptions\":")
        .nth(1)
        .map(|r| {
            r.trim_start()
                .split(',')
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .unwrap_or(0)
}

/// Mutant: refcount table entry 0 with bit 56 set (fuzz seed 2, case 797,
/// `RefTable@0x200000/8=0x100000000400000` on 2 MiB clusters). A refcount
/// table entry has no flag bits: QEMU reads that as a block past the end
/// of the file, and its check counts every cluster's refcount as wrong.
/// We masked the entry like an L2 entry, used the real block, and said
/// "No errors" while writes went on; qemu-img check then found more
/// corruptions after each of our allocating writes.
#[test]
fn refcount_table_entry_high_bits_are_part_of_the_offset() {
    let d = Scratch::new("found-reft");
    let p = d.path("r.qcow2");
    create(&p, "", 8 << 20);
    let img = Image::open(&p, None, &rw()).unwrap();
    img.write_at(&[1; 65536], 0).unwrap();
    img.close().unwrap();
    drop(img);
    let good = std::fs::read(&p).unwrap();
    let rt = be64(&good, 48) as usize;
    for bad in [be64(&good, rt) | 1 << 56, 0xffff_ffff_ffff_0000] {
        let mut b = good.clone();
        b[rt..rt + 8].copy_from_slice(&bad.to_be_bytes());
        std::fs::write(&p, &b).unwrap();
        let before = corruptions(&p);
        assert!(before > 0, "qemu-img sees the damage");
        let (code, out, err) = ox(&["check", &s(&p)]);
        let out = out + &err;
        assert_ne!(code, 0, "{out}");
        assert!(
            out.contains("ERROR refcount block 0 is outside image"),
            "{out}"
        );

        let img = Image::open(&p, None, &rw()).unwrap();
        img.write_at(&[2; 512], 0).unwrap(); // no allocation: fine
        let e = img.write_at(&[3; 65536], 4 << 20).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert!(
            e.to_string().contains(&format!(
                "Refblock offset {bad:#x} points past the end of the file"
            )),
            "{e}"
        );
        let _ = img.close();
        drop(img);
        assert!(corruptions(&p) <= before, "the write made it worse");
        let ro = Image::open(&p, None, &OpenOptions::default()).unwrap();
        let mut buf = [0u8; 512];
        ro.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [2; 512]);
    }
}

/// Mutant: refcount table entry 0 = 0x1 (fuzz seed 2, case 1114,
/// `RefTable@0x10000/8=0x1`): no refcount block, so every cluster looks
/// free. `snapshot -c` took clusters 0.. for the L1 copy and wrote it over
/// the header: the image was no longer qcow2 at all. New metadata (the
/// snapshot's L1 copy and table, L1 growth, bitmap tables, refcount
/// blocks) now never goes where known metadata is; the operation fails
/// with QEMU's message and the image is marked corrupt, bytes intact.
#[test]
fn new_metadata_never_lands_on_metadata() {
    let d = Scratch::new("found-fresh");
    let p = d.path("f.qcow2");
    create(&p, "", 8 << 20);
    let img = Image::open(&p, None, &rw()).unwrap();
    img.write_at(&[1; 65536], 0).unwrap();
    img.close().unwrap();
    drop(img);
    let good = std::fs::read(&p).unwrap();
    let rt = be64(&good, 48) as usize;
    let mut bad = good.clone();
    bad[rt..rt + 8].copy_from_slice(&1u64.to_be_bytes());
    type Op = fn(&oxqcow::Qcow2) -> oxqcow::Result<()>;
    let ops: [(&str, Op); 3] = [
        ("snapshot", |q| q.snapshot_create("fz")),
        ("bitmap", |q| {
            q.bitmap_add("b", None, true)?;
            q.close()
        }),
        ("l1 growth", |q| q.resize(1 << 40)),
    ];
    for (what, op) in ops {
        std::fs::write(&p, &bad).unwrap();
        let img = Image::open(&p, None, &rw()).unwrap();
        let e = op(img.qcow2().unwrap()).unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{what}: {e}");
        assert!(
            e.to_string()
                .contains("Preventing invalid write on metadata (overlaps with"),
            "{what}: {e}"
        );
        let _ = img.close();
        drop(img);
        let after = std::fs::read(&p).unwrap();
        assert_eq!(&after[..4], b"QFI\xfb", "{what}: header destroyed");
        let (code, out, err) = run("qemu-img", &["info", &s(&p)]);
        assert_eq!(code, 0, "{what}: {out}{err}");
        assert!(out.contains("corrupt: true"), "{what}: {out}");
        // Nothing but the header's corrupt bit (and the dirty bit on a
        // failed allocation) changed in the metadata clusters.
        let differ: Vec<usize> = (0..bad.len().min(after.len()))
            .filter(|&i| after[i] != bad[i] && !(72..80).contains(&i))
            .collect();
        assert!(differ.is_empty(), "{what}: bytes {differ:?} changed");
    }
}

/// Mutant: an active L1 entry moved off cluster alignment, flags dropped
/// (fuzz seed 3, case 2896, `L1@0xa0008/8=0xe4000` on an image with
/// snapshots). QEMU's check still counts the clusters such a table spans
/// and the entries read from there; ours skipped the table, so `check -r
/// all` "repaired" as leaks clusters it references, and qemu-img check
/// then found more corruptions than before the repair. Now both checks
/// report the same lines and the repair leaves what QEMU's leaves.
#[test]
fn misaligned_l2_table_is_counted_as_qemu_counts_it() {
    let d = Scratch::new("found-misaligned");
    let p = d.path("m.qcow2");
    create(&p, "", 1 << 30);
    let img = Image::open(&p, None, &rw()).unwrap();
    // Clusters start with 512 zero bytes: the part of the next cluster a
    // table moved by 512 bytes reads holds no entries.
    let data = |n: u8| [vec![0u8; 512], vec![n; 65024]].concat();
    img.write_at(&data(1), 0).unwrap();
    img.write_at(&data(2), 512 << 20).unwrap();
    img.qcow2().unwrap().snapshot_create("s").unwrap();
    img.write_at(&data(3), (512 << 20) + 65536).unwrap();
    img.close().unwrap();
    drop(img);
    let mut b = std::fs::read(&p).unwrap();
    let l1 = be64(&b, 40) as usize;
    let moved = (be64(&b, l1 + 8) & 0x00ff_ffff_ffff_fe00) + 0x200;
    b[l1 + 8..l1 + 16].copy_from_slice(&moved.to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    let q = d.path("q.qcow2");
    std::fs::write(&q, &b).unwrap();

    let lines = |(_, o, e): (i32, String, String)| -> Vec<String> {
        (o + &e)
            .lines()
            .filter(|l| l.starts_with("ERROR") || l.contains("errors were found"))
            .map(String::from)
            .collect()
    };
    let ours = lines(ox(&["check", &s(&p)]));
    let theirs = lines(run("qemu-img", &["check", &s(&q)]));
    assert!(
        ours.iter()
            .any(|l| l.contains("Table is not cluster aligned")),
        "{ours:?}"
    );
    assert_eq!(ours, theirs);

    ox(&["check", "-r", "all", &s(&p)]);
    run("qemu-img", &["check", "-r", "all", &s(&q)]);
    assert_eq!(
        corruptions(&p),
        corruptions(&q),
        "our repair left more damage"
    );
    assert_eq!(
        lines(run("qemu-img", &["check", &s(&p)])),
        lines(run("qemu-img", &["check", &s(&q)]))
    );
}

/// Mutant: a 512-byte-cluster image truncated in the middle of its
/// tables (fuzz seed 9, case 412, `truncate@0x10174`). References past
/// the end of the file are not counted (as in QEMU), so `check -r all`
/// took the clusters they point to for free and rebuilt the refcount
/// structure there: once written, L2 tables and data shared clusters with
/// the new refcount block (qemu-img check: `refcount block 0 refcount=2`,
/// `cluster 129 refcount=1 reference=2`). The rebuild now skips clusters
/// such references point to.
#[test]
fn rebuilt_refcounts_avoid_clusters_referenced_past_the_end() {
    let d = Scratch::new("found-pastend");
    let p = d.path("t.qcow2");
    let ps = s(&p);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        &ps,
        "4M",
    ]);
    let (code, out, err) = run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 0 96k",
            "-c",
            "write -P 0x22 300k 8k",
            "-c",
            "write -z 512k 64k",
            "-c",
            "write -P 0x33 1M 128k",
            "-c",
            "discard 1088k 64k",
            "-c",
            "write -P 0x44 3M 4k",
            &ps,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(0x10174).unwrap();
    drop(f);
    let (_, before, _) = run("qemu-img", &["check", &ps]);
    assert!(before.contains("exceeding the end of the file") || !before.is_empty());
    let (_, out, err) = ox(&["check", "-r", "all", &ps]);
    assert!(
        out.contains("Rebuilding refcount structure")
            || err.contains("Rebuilding refcount structure"),
        "{out}{err}"
    );
    let (_, after, after_err) = run("qemu-img", &["check", &ps]);
    let after = after + &after_err;
    assert!(!after.contains("refcount block 0 refcount=2"), "{after}");
    assert!(!after.contains("reference=2"), "{after}");
}
