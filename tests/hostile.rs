//! Hostile and truncated images give clear errors: no panic, no unbounded
//! allocation, and no write to the file (except the corrupt bit when a
//! write would damage metadata).

mod common;
use common::*;
use oxqcow::{CreateOptions, Image, OpenOptions};
use std::path::Path;

fn fresh(path: &Path, opts: &str) -> Vec<u8> {
    let mut o = CreateOptions::default();
    o.parse_into(opts).unwrap();
    o.size = 64 << 20;
    oxqcow::engine::create(path, &o).unwrap();
    // Put some data in so that L2 tables exist.
    let img = Image::open(
        path,
        None,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    img.write_at(&[7u8; 100_000], 0).unwrap();
    img.close().unwrap();
    drop(img);
    std::fs::read(path).unwrap()
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Opens a damaged image read-write and read-only; both must fail with a
/// message containing `want`, and the file must be unchanged.
fn expect_refused(path: &Path, bytes: &[u8], want: &str) {
    std::fs::write(path, bytes).unwrap();
    for writable in [false, true] {
        let r = Image::open(
            path,
            Some("qcow2"),
            &OpenOptions {
                writable,
                ..Default::default()
            },
        );
        match r {
            Ok(_) => panic!("damaged image opened (writable={writable}); expected '{want}'"),
            Err(e) => assert!(e.to_string().contains(want), "got '{e}', expected '{want}'"),
        }
    }
    assert!(
        std::fs::read(path).unwrap() == bytes,
        "refused open changed the file"
    );
}

#[test]
fn damaged_headers_are_refused_with_qemus_messages() {
    let d = Scratch::new("hostile");
    let p = d.path("h.qcow2");
    let good = fresh(&p, "");

    for cut in [0usize, 50, 71, 100] {
        let want = if cut < 72 {
            "Image is not in qcow2 format"
        } else {
            ""
        };
        expect_refused(&p, &good[..cut], want);
    }
    // (header offset, field width in bits, value) edits, and the message.
    type Edit = (usize, u32, u64);
    let cases: &[(&[Edit], &str)] = &[
        (
            &[(100, 32, 0xffff_fff0)],
            "qcow2 header exceeds cluster size",
        ),
        (&[(36, 32, 0x1000_0000)], "Active L1 table too large"),
        (&[(40, 64, 0x30001)], "Active L1 table offset invalid"),
        (&[(40, 64, 1 << 50)], "Active L1 table offset invalid"),
        (&[(40, 64, 0x10000)], "overlaps"), // L1 on the refcount table
        (&[(36, 32, 0)], "L1 table is too small"),
        (&[(56, 32, 0x0100_0000)], "Reference count table too large"),
        (&[(48, 64, 1 << 45)], "Reference count table offset invalid"),
        (
            &[(56, 32, 0)],
            "Image does not contain a reference count table",
        ),
        (&[(60, 32, 0xffff_ffff)], "Snapshot table too large"),
        (
            &[(8, 64, 0x1000), (16, 32, 0x10000)],
            "Backing file name too long",
        ),
        (
            &[(8, 64, 0x100000), (16, 32, 4)],
            "Invalid backing file offset",
        ),
        (&[(20, 32, 30)], "Unsupported cluster size: 2^30"),
        (&[(4, 32, 4)], "Unsupported qcow2 version 4"),
        (&[(24, 64, 1 << 62)], "Image is too big"),
        (&[(96, 32, 7)], "Reference count entry width too large"),
        (
            &[(32, 32, 1)],
            "Parameter 'encrypt.key-secret' is required for cipher",
        ),
        (&[(32, 32, 2)], "Missing CRYPTO header for crypt method 2"),
        (&[(32, 32, 3)], "Unsupported encryption method 3"),
        // Extended L2 entries need subclusters of at least 512 bytes.
        (
            &[(72, 64, 1 << 4), (20, 32, 13)],
            "Unsupported subcluster size: 256",
        ),
        (
            &[(72, 64, 1 << 2)],
            "'data-file' is required for this image",
        ),
        (
            &[(112, 32, 0x1234_5678), (116, 32, 0x7fff_0000)],
            "Header extension too large",
        ),
    ];
    for (edits, want) in cases {
        let mut b = good.clone();
        for &(off, width, v) in edits.iter() {
            if width == 32 {
                put32(&mut b, off, v as u32);
            } else {
                put64(&mut b, off, v);
            }
        }
        expect_refused(&p, &b, want);
    }
}

#[test]
fn l2_entries_past_the_end_of_the_file() {
    let d = Scratch::new("l2past");
    let p = d.path("p.qcow2");
    let mut b = fresh(&p, "");
    let l1_off = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2_off = (u64::from_be_bytes(b[l1_off..l1_off + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00) as usize;
    put64(&mut b, l2_off, (1u64 << 63) | (1 << 40)); // guest cluster 0 → 1 TiB
    std::fs::write(&p, &b).unwrap();
    let img = Image::open(&p, None, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = img.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("invalid"), "{e}");
    assert_eq!(e.errno(), libc::EIO);
    // The rest of the image still reads.
    img.read_at(&mut buf, 65536).unwrap();
    assert_eq!(buf, vec![7u8; 4096]);
    drop(img);
    assert!(
        std::fs::read(&p).unwrap() == b,
        "read-only access changed the file"
    );

    // L1 pointing past the end of the file.
    let mut b2 = b.clone();
    put64(&mut b2, l1_off, (1u64 << 63) | (1 << 44));
    std::fs::write(&p, &b2).unwrap();
    let img = Image::open(&p, None, &OpenOptions::default()).unwrap();
    assert!(img.read_at(&mut buf, 0).is_err());
}

/// The overlap guard: an L2 entry that points into the L1 table makes a
/// write fail with EIO, marks the image corrupt, and leaves L1 intact.
#[test]
fn overlap_guard_marks_the_image_corrupt() {
    let d = Scratch::new("overlap");
    let p = d.path("o.qcow2");
    let mut b = fresh(&p, "");
    let l1_off = u64::from_be_bytes(b[40..48].try_into().unwrap());
    let l1 = b[l1_off as usize..l1_off as usize + 8].to_vec();
    let l2_off = (u64::from_be_bytes(l1[..8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    put64(&mut b, l2_off + 8 * 3, (1u64 << 63) | l1_off);
    std::fs::write(&p, &b).unwrap();
    let img = Image::open(
        &p,
        None,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let e = img.write_at(&[0xee; 512], 3 * 65536).unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert!(
        e.to_string()
            .contains("Preventing invalid write on metadata (overlaps with active L1 table)"),
        "{e}"
    );
    // Further writes are refused; nothing reached the L1 table.
    assert!(img.write_at(&[1], 0).is_err());
    drop(img);
    let after = std::fs::read(&p).unwrap();
    assert_eq!(&after[l1_off as usize..l1_off as usize + 8], &l1[..]);
    let incompat = u64::from_be_bytes(after[72..80].try_into().unwrap());
    assert_eq!(incompat & 2, 2, "corrupt bit not set");
    let e = Image::open(
        &p,
        None,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(
        e.to_string()
            .contains("qcow2: Image is corrupt; cannot be opened read/write"),
        "{e}"
    );
    assert!(Image::open(&p, None, &OpenOptions::default()).is_ok());
    let info = qemu_img(&["info", "--output=json", &p.display().to_string()]);
    assert!(info.contains("\"corrupt\": true"), "{info}");
}

/// Random damage anywhere in the metadata never panics: open, read,
/// write, discard and close either work or return an error.
#[test]
fn random_metadata_damage_never_panics() {
    let d = Scratch::new("fuzz");
    let p = d.path("f.qcow2");
    for (k, opts) in [
        "",
        "cluster_size=512,compat=0.10",
        "cluster_size=4096,refcount_bits=1",
    ]
    .iter()
    .enumerate()
    {
        let good = fresh(&p, opts);
        let mut rng = Rng(1000 + k as u64);
        let meta_len = good.len().min(6 << 16);
        for _ in 0..300 {
            let mut b = good.clone();
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(meta_len as u64) as usize;
                b[i] = rng.next() as u8;
            }
            std::fs::write(&p, &b).unwrap();
            for writable in [false, true] {
                let r = std::panic::catch_unwind(|| {
                    if let Ok(img) = Image::open(
                        &p,
                        Some("qcow2"),
                        &OpenOptions {
                            writable,
                            ..Default::default()
                        },
                    ) {
                        let size = img.size().min(1 << 30);
                        let mut buf = vec![0u8; 70_000];
                        for off in [0, 65536, size.saturating_sub(70_000)] {
                            let _ = img.read_at(&mut buf, off);
                            if writable {
                                let _ = img.write_at(&buf[..1000], off);
                                let _ = img.discard(off, 65536);
                            }
                        }
                        let _ = img.close();
                    }
                });
                assert!(r.is_ok(), "panic on damaged image (opts '{opts}')");
            }
        }
    }
}

/// The largest virtual size the cluster size allows is usable to its last byte.
#[test]
fn last_byte_of_the_largest_image() {
    let d = Scratch::new("largest");
    let p = d.path("l.qcow2");
    let mut o = CreateOptions::default();
    o.parse_into("cluster_size=512").unwrap();
    o.size = 128 << 30;
    oxqcow::engine::create(&p, &o).unwrap();
    o.size += 512;
    let e = oxqcow::engine::create(&d.path("too.qcow2"), &o).unwrap_err();
    assert!(
        e.to_string()
            .contains("The image size is too large for file format 'qcow2'"),
        "{e}"
    );
    let img = Image::open(
        &p,
        None,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let end = 128u64 << 30;
    img.write_at(b"last bytes!", end - 11).unwrap();
    assert!(img.write_at(b"x", end).is_err());
    let mut b = [0u8; 11];
    img.read_at(&mut b, end - 11).unwrap();
    assert_eq!(&b, b"last bytes!");
    img.close().unwrap();
    drop(img);
    assert_clean(&p);
    let (code, out, _) = run(
        "qemu-io",
        &[
            "-c",
            &format!("read -P 0x21 {} 1", end - 1),
            &p.display().to_string(),
        ],
    );
    assert!(code == 0 && !out.contains("fail"), "{out}");
}

/// A refcount block that says a metadata cluster is free: the allocator
/// hands that cluster out for a new L2 table, and the write is refused
/// before anything lands there, with QEMU's messages (the header's cluster
/// is never an L2 table; any other is the overlap guard's). Nothing in the
/// file changes but the corrupt bit.
#[test]
fn l2_tables_never_land_on_metadata() {
    let d = Scratch::new("l2meta");
    let p = d.path("m.qcow2");
    let o = CreateOptions {
        size: 64 << 20,
        ..Default::default()
    };
    let be64 = |b: &[u8], off: usize| u64::from_be_bytes(b[off..off + 8].try_into().unwrap());
    let rw = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let mut seen = Vec::new();
    for victim in [
        "header",
        "refcount table",
        "refcount block",
        "active L1 table",
    ] {
        let _ = std::fs::remove_file(&p);
        oxqcow::engine::create(&p, &o).unwrap();
        let good = std::fs::read(&p).unwrap();
        let reftable = be64(&good, 48) as usize;
        let refblock = be64(&good, reftable) as usize;
        let cluster = match victim {
            "header" => 0,
            "refcount table" => reftable,
            "refcount block" => refblock,
            _ => be64(&good, 40) as usize,
        } / 65536;
        seen.push(cluster);
        let mut b = good.clone();
        // 16-bit refcounts: the victim's refcount goes to 0.
        b[refblock + 2 * cluster..refblock + 2 * cluster + 2].fill(0);
        std::fs::write(&p, &b).unwrap();
        let img = Image::open(&p, None, &rw).unwrap();
        let e = img.write_at(&[0x5a; 65536], 65536).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        let want = if cluster == 0 {
            "Preventing invalid allocation of L2 table at offset 0".to_string()
        } else {
            format!("Preventing invalid write on metadata (overlaps with {victim})")
        };
        assert!(e.to_string().contains(&want), "{victim}: {e}");
        assert!(
            img.write_at(&[1], 0).is_err(),
            "{victim}: corrupt image written"
        );
        let _ = img.close();
        drop(img);
        let after = std::fs::read(&p).unwrap();
        assert_eq!(after.len(), b.len(), "{victim}: file size changed");
        assert_eq!(be64(&after, 72), be64(&b, 72) | 2, "{victim}: corrupt bit");
        let differ: Vec<usize> = (0..b.len()).filter(|&i| after[i] != b[i]).collect();
        assert!(
            differ.iter().all(|i| (72..80).contains(i)),
            "{victim}: bytes {differ:?} changed"
        );
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4, "the four metadata clusters are distinct");
}
