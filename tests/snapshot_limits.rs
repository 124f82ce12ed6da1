//! Snapshot tables QEMU 10 calls broken or incomplete (as qemu-iotest 261
//! builds them), through `qemu-img` and `oxqcow` on copies of one image:
//! entries without the 16 bytes of extra data v3 needs, unknown extra data,
//! too much extra data, too many entries. The same texts and exit codes
//! from info, check and check -r all, the same bytes left behind (the header
//! and the snapshot table), and QEMU finds the repaired image clean.

mod common;
use common::case::normalize;
use common::*;
use std::path::Path;

fn be(b: &[u8], off: usize, n: usize) -> u64 {
    b[off..off + n].iter().fold(0, |a, &x| a << 8 | x as u64)
}

/// A v2 image from QEMU with snapshots sn0..sn2, their entries rewritten
/// with `extra` bytes of extra data each (the known fields kept as far as
/// they go; past 24 bytes, "very important data" as unknown data).
fn image_with_extra(path: &Path, extra: [usize; 3]) {
    create_qcow2(path, "64M", &["-o", "compat=0.10"]);
    for n in ["sn0", "sn1", "sn2"] {
        qemu_img(&["snapshot", "-c", n, &s(path)]);
    }
    let mut f = std::fs::read(path).unwrap();
    let table = be(&f, 64, 8) as usize;
    let mut off = table;
    let mut out = Vec::new();
    for want in extra {
        let ids = (be(&f, off + 12, 2) + be(&f, off + 14, 2)) as usize;
        let old = be(&f, off + 36, 4) as usize;
        let mut e = f[off..off + 40].to_vec();
        e[36..40].copy_from_slice(&(want as u32).to_be_bytes());
        let mut x = f[off + 40..off + 40 + old].to_vec();
        x.resize(want, 0);
        if want > 24 + 19 {
            x[24..24 + 19].copy_from_slice(b"very important data");
        }
        e.extend_from_slice(&x);
        e.extend_from_slice(&f[off + 40 + old..off + 40 + old + ids]);
        while !e.len().is_multiple_of(8) {
            e.push(0);
        }
        out.extend_from_slice(&e);
        off += (40 + old + ids).next_multiple_of(8);
    }
    if f.len() < table + out.len() {
        f.resize(table + out.len(), 0);
    }
    f[table..table + out.len()].copy_from_slice(&out);
    std::fs::write(path, f).unwrap();
}

/// Makes a v2 image claim v3 (version, header length, refcount order).
fn force_v3(path: &Path) {
    let mut f = std::fs::read(path).unwrap();
    f[4..8].copy_from_slice(&3u32.to_be_bytes());
    f[96..100].copy_from_slice(&4u32.to_be_bytes());
    f[100..104].copy_from_slice(&104u32.to_be_bytes());
    std::fs::write(path, f).unwrap();
}

/// Runs `args` (the image last) through qemu-img on `q` and oxqcow on `o`
/// and insists on the same status and texts; returns QEMU's status.
fn same(q: &Path, o: &Path, args: &[&str]) -> i32 {
    let mut qa: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let mut oa = qa.clone();
    qa.push(s(q));
    oa.push(s(o));
    let qa: Vec<&str> = qa.iter().map(String::as_str).collect();
    let oa: Vec<&str> = oa.iter().map(String::as_str).collect();
    let (qc, qo, qe) = run("qemu-img", &qa);
    let (oc, oo, oe) = ox(&oa);
    let fix = |t: &str| normalize(t).replace(&s(o), "IMG").replace(&s(q), "IMG");
    assert_eq!(
        (oc, fix(&oo), fix(&oe)),
        (qc, fix(&qo), fix(&qe)),
        "{args:?}"
    );
    qc
}

/// The header and the snapshot table (where the header puts it), bytes.
fn header_and_table(p: &Path) -> (Vec<u8>, Vec<u8>) {
    let f = std::fs::read(p).unwrap();
    let (n, t) = (be(&f, 60, 4), be(&f, 64, 8) as usize);
    let mut off = t;
    for _ in 0..n {
        let ids = (be(&f, off + 12, 2) + be(&f, off + 14, 2)) as usize;
        off += (40 + be(&f, off + 36, 4) as usize + ids).next_multiple_of(8);
    }
    (f[..104].to_vec(), f[t..off.min(f.len())].to_vec())
}

/// Both tools left the same header and snapshot table. (Not the whole
/// file: QEMU discards the clusters of a freed table, we leave their bytes.)
fn assert_same_bytes(q: &Path, o: &Path) {
    let (qh, qt) = header_and_table(q);
    let (oh, ot) = header_and_table(o);
    assert_eq!(oh, qh, "headers differ");
    let first = qt.iter().zip(&ot).position(|(x, y)| x != y);
    assert_eq!(
        (ot.len(), first),
        (qt.len(), None),
        "snapshot tables differ"
    );
}

fn pair(dir: &Scratch, src: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (q, o) = (dir.path("q.qcow2"), dir.path("o.qcow2"));
    std::fs::copy(src, &q).unwrap();
    std::fs::copy(src, &o).unwrap();
    (q, o)
}

#[test]
fn incomplete_v3_entries_are_corruptions_and_repaired() {
    let dir = Scratch::new("snaplim-incomplete");
    let src = dir.path("src.qcow2");
    image_with_extra(&src, [0, 50, 8]);
    force_v3(&src);
    let (q, o) = pair(&dir, &src);
    assert_eq!(same(&q, &o, &["check"]), 2);
    assert_eq!(same(&q, &o, &["check", "-r", "leaks"]), 2);
    assert_eq!(same(&q, &o, &["check", "-r", "all"]), 0);
    assert_same_bytes(&q, &o);
    assert_clean(&o);
    // The rewritten entries: 24 bytes (disk size, icount -1), and the
    // unknown data of the second kept.
    let f = std::fs::read(&o).unwrap();
    let t = be(&f, 64, 8) as usize;
    assert_eq!(be(&f, t + 36, 4), 24);
    assert_eq!(be(&f, t + 48, 8), 64 << 20);
    assert_eq!(be(&f, t + 56, 8), u64::MAX);
    same(&q, &o, &["snapshot", "-l"]);
}

#[test]
fn amend_to_v3_and_snapshot_ops_complete_entries() {
    let dir = Scratch::new("snaplim-amend");
    let src = dir.path("src.qcow2");
    image_with_extra(&src, [0, 50, 8]);
    let (q, o) = pair(&dir, &src);
    assert_eq!(same(&q, &o, &["check"]), 0);
    same(&q, &o, &["amend", "-o", "compat=1.1"]);
    assert_same_bytes(&q, &o);
    assert_clean(&o);
    for op in [["-d", "sn1"], ["-a", "sn0"]] {
        let (q, o) = pair(&dir, &src);
        same(&q, &o, &["snapshot", op[0], op[1]]);
        assert_same_bytes(&q, &o);
        assert_clean(&o);
    }
}

/// Both tools refuse the image (info, check) with the same words, then
/// `check -r all` repairs both copies to the same bytes, clean.
fn refused_then_repaired(q: &Path, o: &Path) {
    assert_eq!(same(q, o, &["info"]), 1);
    assert_eq!(same(q, o, &["check"]), 1);
    assert_eq!(same(q, o, &["check", "-r", "all"]), 0);
    assert_same_bytes(q, o);
    assert_clean(o);
}

#[test]
fn too_much_extra_data_is_refused_then_dropped() {
    let dir = Scratch::new("snaplim-extra");
    let src = dir.path("src.qcow2");
    image_with_extra(&src, [24, 24, 24]);
    force_v3(&src);
    let mut f = std::fs::read(&src).unwrap();
    let t = be(&f, 64, 8) as usize;
    let second =
        t + (40 + 24 + (be(&f, t + 12, 2) + be(&f, t + 14, 2)) as usize).next_multiple_of(8);
    f[second + 36..second + 40].copy_from_slice(&0x10000u32.to_be_bytes());
    std::fs::write(&src, f).unwrap();
    let (q, o) = pair(&dir, &src);
    refused_then_repaired(&q, &o);
    same(&q, &o, &["snapshot", "-l"]);
}

#[test]
fn too_many_snapshots_are_refused_then_dropped() {
    let dir = Scratch::new("snaplim-many");
    let src = dir.path("src.qcow2");
    create_qcow2(&src, "64M", &["-o", "compat=0.10"]);
    let mut f = std::fs::read(&src).unwrap();
    f[64..72].copy_from_slice(&(1u64 << 20).to_be_bytes());
    f[60..64].copy_from_slice(&131072u32.to_be_bytes());
    f.resize((1 << 20) + 40 * 131072, 0);
    // Refcounts for the table's clusters (refblock 0, 16-bit entries).
    let rb = be(&f, be(&f, 48, 8) as usize, 8) as usize;
    for c in 16..f.len().div_ceil(65536) {
        f[rb + 2 * c..rb + 2 * c + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    std::fs::write(&src, f).unwrap();
    let (q, o) = pair(&dir, &src);
    refused_then_repaired(&q, &o);
    assert_eq!(be(&std::fs::read(&o).unwrap(), 60, 4), 65536);
}
