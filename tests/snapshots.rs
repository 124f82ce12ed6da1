//! Internal snapshots made by oxqcow are read by QEMU, and QEMU's by us:
//! create, apply, delete, with clean checks and the expected contents.

mod common;
use common::*;
use oxqcow::{OpenOptions, Qcow2};
use std::path::Path;

fn rw(p: &Path) -> Qcow2 {
    Qcow2::open(
        p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn qemu_read(p: &Path, cmds: &[&str]) {
    qemu_io(p, cmds);
}

#[test]
fn our_snapshots_are_qemus_snapshots() {
    let d = Scratch::new("snap-ours");
    let p = d.path("s.qcow2");
    let s = p.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &s, "16M"]);
    {
        let img = rw(&p);
        img.write_at(&[1u8; 200_000], 0).unwrap();
        img.write_zeroes(1 << 20, 65536, false).unwrap();
        img.snapshot_create("one").unwrap();
        img.write_at(&[2u8; 70_000], 100_000).unwrap();
        img.snapshot_create("two").unwrap();
        img.write_at(&[3u8; 4096], 0).unwrap();
        img.close().unwrap();
    }
    assert_clean(&p);
    let list = qemu_img(&["snapshot", "-l", &s]);
    assert!(list.contains("one") && list.contains("two"), "{list}");
    // QEMU applies ours.
    let q = d.path("q.qcow2");
    std::fs::copy(&p, &q).unwrap();
    qemu_img(&["snapshot", "-a", "one", &q.display().to_string()]);
    qemu_read(&q, &["read -P 1 0 200000", "read -P 0 200000 100000"]);
    assert_clean(&q);
    // We apply ours, and delete.
    {
        let img = rw(&p);
        img.snapshot_apply("two").unwrap();
        let mut b = vec![0u8; 270_000];
        img.read_at(&mut b, 0).unwrap();
        assert!(b[..100_000].iter().all(|&x| x == 1));
        assert!(b[100_000..170_000].iter().all(|&x| x == 2));
        img.snapshot_delete("one").unwrap();
        img.write_at(&[4u8; 1000], 50).unwrap();
        img.close().unwrap();
    }
    assert_clean(&p);
    qemu_read(
        &p,
        &[
            "read -P 1 0 50",
            "read -P 4 50 1000",
            "read -P 2 100000 70000",
        ],
    );
    let list = qemu_img(&["snapshot", "-l", &s]);
    assert!(!list.contains("one") && list.contains("two"), "{list}");
}

#[test]
fn qemus_snapshots_are_ours() {
    let d = Scratch::new("snap-theirs");
    let p = d.path("s.qcow2");
    let s = p.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", &s, "8M"]);
    qemu_io(&p, &["write -P 5 0 1M"]);
    qemu_img(&["snapshot", "-c", "a", &s]);
    qemu_io(&p, &["write -P 6 0 64k", "discard 512k 64k"]);
    qemu_img(&["snapshot", "-c", "b", &s]);
    qemu_io(&p, &["write -P 7 64k 64k"]);
    {
        let img = rw(&p);
        let names: Vec<String> = img.snapshots().iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, ["a", "b"]);
        img.snapshot_apply("a").unwrap();
        let mut b = vec![0u8; 1 << 20];
        img.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 5));
        img.snapshot_delete("b").unwrap();
        img.snapshot_create("c").unwrap();
        img.write_at(&[8u8; 100], 0).unwrap();
        img.close().unwrap();
    }
    assert_clean(&p);
    qemu_img(&["snapshot", "-a", "c", &s]);
    qemu_read(&p, &["read -P 5 0 1M"]);
    assert_clean(&p);
}

/// A version 2 header ends at byte 72, where its extensions begin: a
/// snapshot create or delete must leave them alone (the dirty bit that
/// guards those changes on v3 images has no place there). The backing
/// format extension survives, byte for byte, and qemu-img sees it.
#[test]
fn snapshots_of_a_v2_image_keep_its_header_extensions() {
    let d = Scratch::new("snap-v2-ext");
    let base = d.path("base.qcow2");
    let img = d.path("t.qcow2");
    create_qcow2(&base, "1M", &[]);
    create_qcow2(
        &img,
        "1M",
        &["-o", "compat=0.10", "-b", &s(&base), "-F", "qcow2"],
    );
    let before = std::fs::read(&img).unwrap()[..512].to_vec();
    ox_ok(&["snapshot", "-c", "s1", &s(&img)]);
    ox_ok(&["snapshot", "-d", "s1", &s(&img)]);
    let after = std::fs::read(&img).unwrap();
    assert!(
        after[72..512] == before[72..512],
        "v2 header extensions changed by snapshot -c/-d"
    );
    let info = qemu_img(&["info", &s(&img)]);
    assert!(info.contains("backing file format: qcow2"), "{info}");
    assert_clean(&img);
}
