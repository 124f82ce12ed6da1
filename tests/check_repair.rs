//! Check and repair, compared with `qemu-img check` on the same damage:
//! the same report lines, the same counters, and images QEMU calls clean
//! afterwards. Also: a dirty image left by QEMU (lazy refcounts, killed)
//! is repaired by oxqcow's read-write open.

mod common;
use common::*;
use oxqcow::engine::{FIX_ERRORS, FIX_LEAKS};
use oxqcow::{Image, OpenOptions, Qcow2};
use std::path::Path;

fn dirty_image_from_qemu(path: &Path) {
    let p = path.display().to_string();
    create_qcow2(path, "64M", &["-o", "lazy_refcounts=on"]);
    let _ = run(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 1M 128k",
            "-c",
            "sigraise 9",
            &p,
        ],
    );
    let hdr = std::fs::read(path).unwrap();
    assert_eq!(hdr[79] & 1, 1, "qemu-io did not leave the image dirty");
}

/// Our report lines (stderr lines of qemu-img check) and counters.
fn our_check(path: &Path, fix: u32) -> (Vec<String>, oxqcow::engine::CheckResult) {
    let opts = OpenOptions {
        writable: fix != 0,
        check_mode: true,
        ..Default::default()
    };
    let img = Qcow2::open(path, &opts).unwrap();
    let mut lines = Vec::new();
    let res = img
        .check(fix, &mut |l: &str| lines.push(l.to_string()))
        .unwrap();
    img.close().unwrap();
    (lines, res)
}

/// A counter from `qemu-img check --output=json` (absent keys are 0).
fn qemu_counter(path: &Path, key: &str) -> u64 {
    let (_, out, _) = run(
        "qemu-img",
        &["check", "--output=json", &path.display().to_string()],
    );
    let pat = format!("\"{key}\": ");
    out.find(&pat)
        .map(|i| {
            out[i + pat.len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
                .parse()
                .unwrap()
        })
        .unwrap_or(0)
}

fn qemu_lines(args: &[&str]) -> (i32, Vec<String>) {
    let (code, _out, err) = run("qemu-img", args);
    (code, err.lines().map(str::to_string).collect())
}

#[test]
fn dirty_image_check_matches_qemu() {
    let d = Scratch::new("chk");
    let a = d.path("a.qcow2");
    dirty_image_from_qemu(&a);
    let (code, theirs) = qemu_lines(&["check", &a.display().to_string()]);
    assert_eq!(code, 2);
    let (ours, res) = our_check(&a, 0);
    assert_eq!(ours, theirs);
    assert_eq!(res.corruptions, qemu_counter(&a, "corruptions"));
    assert_eq!(res.leaks, qemu_counter(&a, "leaks"));
    assert_eq!(res.image_end_offset, qemu_counter(&a, "image-end-offset"));
    assert_eq!(
        res.allocated_clusters,
        qemu_counter(&a, "allocated-clusters")
    );
    assert_eq!(res.total_clusters, qemu_counter(&a, "total-clusters"));
}

#[test]
fn repair_all_matches_qemu_and_leaves_a_clean_image() {
    let d = Scratch::new("repair");
    let a = d.path("a.qcow2");
    let b = d.path("b.qcow2");
    dirty_image_from_qemu(&a);
    std::fs::copy(&a, &b).unwrap();
    let (code, theirs) = qemu_lines(&["check", "-r", "all", &b.display().to_string()]);
    assert_eq!(code, 0);
    let (ours, res) = our_check(&a, FIX_ERRORS | FIX_LEAKS);
    // QEMU's lines before its "Double checking" pass are ours.
    assert_eq!(ours, theirs);
    assert_eq!(res.corruptions, 0);
    assert!(res.corruptions_fixed > 0);
    assert_clean(&a);
    assert_eq!(
        std::fs::read(&a).unwrap().len(),
        std::fs::read(&b).unwrap().len()
    );
    let hdr = std::fs::read(&a).unwrap();
    assert_eq!(hdr[79] & 1, 0, "dirty bit still set after repair");
    let (code, _) = qemu_lines(&[
        "compare",
        &a.display().to_string(),
        &b.display().to_string(),
    ]);
    assert_eq!(code, 0);
}

#[test]
fn read_write_open_repairs_a_dirty_image() {
    let d = Scratch::new("openrepair");
    let a = d.path("a.qcow2");
    dirty_image_from_qemu(&a);
    // Read-only: works, and leaves the bit alone.
    let ro = Image::open(&a, None, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 65536];
    ro.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![1u8; 65536]);
    drop(ro);
    assert_eq!(std::fs::read(&a).unwrap()[79] & 1, 1);
    let rw = Image::open(
        &a,
        None,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    rw.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![1u8; 65536]);
    rw.write_at(&[3u8; 4096], 8 << 20).unwrap();
    rw.close().unwrap();
    drop(rw);
    assert_eq!(std::fs::read(&a).unwrap()[79] & 1, 0);
    assert_clean(&a);
    let (code, out, err) = run(
        "qemu-io",
        &[
            "-c",
            "read -P 2 1M 128k",
            "-c",
            "read -P 3 8M 4k",
            &a.display().to_string(),
        ],
    );
    assert!(code == 0 && !out.contains("fail"), "{out}{err}");
}

#[test]
fn leaks_are_reported_and_repaired_like_qemu() {
    let d = Scratch::new("leaks");
    let a = d.path("a.qcow2");
    let p = a.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &p, "16M"]);
    qemu_io(&a, &["write -P 5 0 256k"]);
    // Raise refcounts of clusters 5 and 6 by hand: leaks.
    let mut bytes = std::fs::read(&a).unwrap();
    bytes[0x20000 + 10..0x20000 + 12].copy_from_slice(&2u16.to_be_bytes());
    bytes[0x20000 + 12..0x20000 + 14].copy_from_slice(&3u16.to_be_bytes());
    std::fs::write(&a, &bytes).unwrap();
    let (code, theirs) = qemu_lines(&["check", &p]);
    let (ours, res) = our_check(&a, 0);
    assert_eq!(ours, theirs);
    assert_eq!(code, 2, "raised refcounts also make COPIED flags wrong");
    assert_eq!(res.leaks, qemu_counter(&a, "leaks"));
    assert_eq!(res.corruptions, qemu_counter(&a, "corruptions"));
    let b = d.path("b.qcow2");
    std::fs::copy(&a, &b).unwrap();
    let (_, theirs) = qemu_lines(&["check", "-r", "leaks", &b.display().to_string()]);
    let (ours, res) = our_check(&a, FIX_LEAKS);
    assert_eq!(ours, theirs);
    assert_eq!(res.leaks_fixed, 2);
    assert_clean(&a);
}
