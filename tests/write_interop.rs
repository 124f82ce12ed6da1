//! What oxqcow writes, QEMU accepts: after every test `qemu-img check`
//! finds no errors and no leaks, and `qemu-img compare` finds the guest
//! contents equal to a raw model written with the same operations.

mod common;
use common::*;
use oxqcow::{CreateOptions, Image, OpenOptions};
use std::path::Path;

fn write_model(raw: &Path, model: &[u8]) {
    std::fs::write(raw, model).unwrap();
}

/// Applies QEMU's discard rule to the model: whole clusters only (plus a
/// partial last cluster of the image) read as zeros afterwards.
fn discard_model(model: &mut [u8], off: u64, len: u64, cs: u64) {
    let end = off + len;
    let a = off.div_ceil(cs) * cs;
    let mut b = end / cs * cs;
    if end == model.len() as u64 && end > b {
        b = end;
    }
    if a < b {
        model[a as usize..b as usize].fill(0);
    }
}

struct Case {
    opts: &'static str,
    cs: u64,
    seed: u64,
    /// Cache sizes in clusters (L2, refcount), to force evictions.
    caches: Option<(u64, u64)>,
    /// Open with O_DIRECT.
    direct: bool,
}

/// The same random operations with O_DIRECT (cache=none): unaligned
/// requests go through aligned bounce buffers.
#[test]
fn random_ops_direct_io() {
    random_ops(
        &Case {
            opts: "cluster_size=4096",
            cs: 4096,
            seed: 11,
            caches: Some((4, 4)),
            direct: true,
        },
        3_000,
    );
}

fn random_ops(case: &Case, ops: usize) {
    let d = Scratch::new("random");
    let path = d.path("r.qcow2");
    let raw = d.path("r.raw");
    let cs = case.cs;
    let l2_span = cs * cs / 8;
    let mut size = (64 * cs).max((3 * l2_span).min(16 << 20)) + 12345 / 512 * 512;
    create(&path, case.opts, size);
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(case.seed);
    let open_opts = OpenOptions {
        l2_cache_size: case.caches.map(|c| c.0 * cs),
        refcount_cache_size: case.caches.map(|c| c.1 * cs),
        direct: case.direct,
        ..rw()
    };
    let mut img = Image::open(&path, None, &open_opts).unwrap();
    for i in 0..ops {
        let pick = |rng: &mut Rng, size: u64| {
            let off = if rng.below(3) == 0 {
                rng.below(size / cs) * cs
            } else {
                rng.below(size)
            };
            let max = (size - off).min(3 * cs + 1000);
            (off, 1 + rng.below(max))
        };
        match rng.below(100) {
            0..=59 => {
                let (off, len) = pick(&mut rng, size);
                let byte = (i % 251) as u8 + 1;
                let data: Vec<u8> = (0..len).map(|k| byte ^ (k as u8 & 7)).collect();
                img.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            60..=69 => {
                let (off, len) = pick(&mut rng, size);
                img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            70..=79 => {
                let (off, len) = pick(&mut rng, size);
                img.discard(off, len).unwrap();
                discard_model(&mut model, off, len, cs);
            }
            80..=87 => {
                let (off, len) = pick(&mut rng, size);
                let mut buf = vec![0u8; len as usize];
                img.read_at(&mut buf, off).unwrap();
                assert!(
                    buf == model[off as usize..(off + len) as usize],
                    "seed {} op {i}: read mismatch at {off}+{len}",
                    case.seed
                );
            }
            88..=92 => img.flush().unwrap(),
            93..=95 => {
                img.close().unwrap();
                drop(img);
                img = Image::open(&path, None, &open_opts).unwrap();
            }
            _ => {
                let new = if rng.below(2) == 0 {
                    (size + rng.below(8 * cs)) / 512 * 512
                } else {
                    (size - rng.below(size / 4)).max(cs) / 512 * 512
                };
                img.resize(new).unwrap();
                model.resize(new as usize, 0);
                size = new;
            }
        }
    }
    img.close().unwrap();
    drop(img);
    assert_clean(&path);
    write_model(&raw, &model);
    assert_same_as_raw(&path, &raw);
    assert_eq!(read_all_ours(&path), model);
}

#[test]
fn random_ops_64k() {
    random_ops(
        &Case {
            opts: "",
            cs: 65536,
            seed: 1,
            caches: None,
            direct: false,
        },
        10_000,
    );
}

#[test]
fn random_ops_512_refcount_1() {
    random_ops(
        &Case {
            opts: "cluster_size=512,refcount_bits=1",
            cs: 512,
            seed: 2,
            caches: None,
            direct: false,
        },
        10_000,
    );
}

#[test]
fn random_ops_4k_v2() {
    random_ops(
        &Case {
            opts: "cluster_size=4096,compat=0.10",
            cs: 4096,
            seed: 3,
            caches: None,
            direct: false,
        },
        10_000,
    );
}

#[test]
fn random_ops_2m_refcount_64_lazy() {
    random_ops(
        &Case {
            opts: "cluster_size=2M,refcount_bits=64,lazy_refcounts=on",
            cs: 2 << 20,
            seed: 4,
            caches: None,
            direct: false,
        },
        10_000,
    );
}

#[test]
fn random_ops_1k_refcount_8() {
    random_ops(
        &Case {
            opts: "cluster_size=1024,refcount_bits=8",
            cs: 1024,
            seed: 5,
            caches: None,
            direct: false,
        },
        10_000,
    );
}

#[test]
fn random_ops_tiny_caches() {
    random_ops(
        &Case {
            opts: "cluster_size=512",
            cs: 512,
            seed: 6,
            caches: Some((2, 4)),
            direct: false,
        },
        10_000,
    );
    random_ops(
        &Case {
            opts: "cluster_size=4096,lazy_refcounts=on",
            cs: 4096,
            seed: 7,
            caches: Some((2, 4)),
            direct: false,
        },
        10_000,
    );
}

#[test]
fn eight_threads_writing_at_once() {
    let d = Scratch::new("threads");
    let path = d.path("t.qcow2");
    let cs = 65536u64;
    let slot = 96 * 1024u64; // slots straddle clusters, so threads share clusters
    let slots = 256u64;
    let size = slot * slots;
    create(&path, "", size);
    let img = Image::open(&path, None, &rw()).unwrap();
    let models: Vec<Vec<(u64, Vec<u8>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8u64)
            .map(|t| {
                let img = &img;
                s.spawn(move || {
                    let mut rng = Rng(100 + t);
                    let mut mine: Vec<(u64, Vec<u8>)> = Vec::new();
                    let mut model = vec![0u8; size as usize];
                    for i in 0..2000 {
                        let sl = rng.below(slots / 8) * 8 + t;
                        let start = sl * slot;
                        let off = start + rng.below(slot - 1);
                        let len = 1 + rng.below(start + slot - off);
                        let data = vec![(t as u8) << 4 | (i % 15) as u8; len as usize];
                        img.write_at(&data, off).unwrap();
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                        if i % 500 == 0 {
                            img.flush().unwrap();
                        }
                    }
                    for sl in (t..slots).step_by(8) {
                        let a = (sl * slot) as usize;
                        mine.push((sl * slot, model[a..a + slot as usize].to_vec()));
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut model = vec![0u8; size as usize];
    for m in models {
        for (off, bytes) in m {
            model[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
        }
    }
    let mut buf = vec![0u8; size as usize];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == model, "threaded writes lost data");
    img.close().unwrap();
    drop(img);
    assert_clean(&path);
    let raw = d.path("t.raw");
    write_model(&raw, &model);
    assert_same_as_raw(&path, &raw);
    let _ = cs;
}

/// Partial writes over backing data, compressed clusters and clusters
/// shared with internal snapshots all copy the old contents first.
#[test]
fn copy_on_write_sources() {
    let d = Scratch::new("cow");
    let s = |p: &Path| p.display().to_string();
    // Backing files: raw under qcow2 under our overlay.
    let base = d.path("base.raw");
    let mut model: Vec<u8> = (0..(4u64 << 20)).map(|i| (i % 253) as u8).collect();
    std::fs::write(&base, &model).unwrap();
    let mid = d.path("mid.qcow2");
    create_qcow2(&mid, "4M", &["-b", &s(&base), "-F", "raw"]);
    qemu_io(&mid, &["write -P 0x77 100000 70000"]);
    model[100000..170000].fill(0x77);
    let top = d.path("top.qcow2");
    let o = CreateOptions {
        size: 5 << 20,
        backing_file: Some("mid.qcow2".into()),
        backing_fmt: Some("qcow2".into()),
        ..Default::default()
    };
    oxqcow::engine::create(&top, &o).unwrap();
    model.resize(5 << 20, 0);
    {
        let img = Image::open(&top, None, &rw()).unwrap();
        for (off, len, b) in [
            (10u64, 5u64, 1u8),
            (65530, 20, 2),
            (131072 + 300, 65536, 3),
            (4194300, 100, 4),
            (3 << 20, 1, 5),
        ] {
            img.write_at(&vec![b; len as usize], off).unwrap();
            model[off as usize..(off + len) as usize].fill(b);
        }
        img.discard(196608, 65536).unwrap();
        model[196608..262144].fill(0);
        img.close().unwrap();
    }
    assert_clean(&top);
    let raw = d.path("top.raw");
    write_model(&raw, &model);
    assert_same_as_raw(&top, &raw);

    // Compressed clusters.
    let c = d.path("c.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", &s(&base), &s(&c)]);
    let mut cm: Vec<u8> = (0..(4u64 << 20)).map(|i| (i % 253) as u8).collect();
    {
        let img = Image::open(&c, None, &rw()).unwrap();
        img.write_at(&[9u8; 1000], 70000).unwrap();
        cm[70000..71000].fill(9);
        img.write_zeroes(1 << 20, 65536, false).unwrap();
        cm[1 << 20..(1 << 20) + 65536].fill(0);
        img.close().unwrap();
    }
    assert_clean(&c);
    let craw = d.path("c.raw");
    write_model(&craw, &cm);
    assert_same_as_raw(&c, &craw);

    // Clusters shared with an internal snapshot.
    let sn = d.path("sn.qcow2");
    create_qcow2(&sn, "4M", &[]);
    qemu_io(&sn, &["write -P 0x31 0 1M"]);
    qemu_img(&["snapshot", "-c", "snap", &s(&sn)]);
    let mut sm = vec![0u8; 4 << 20];
    sm[..1 << 20].fill(0x31);
    {
        let img = Image::open(&sn, None, &rw()).unwrap();
        img.write_at(&[0x32; 3000], 5000).unwrap();
        sm[5000..8000].fill(0x32);
        img.discard(262144, 65536).unwrap();
        sm[262144..327680].fill(0);
        img.close().unwrap();
    }
    assert_clean(&sn);
    let sraw = d.path("sn.raw");
    write_model(&sraw, &sm);
    assert_same_as_raw(&sn, &sraw);
    // The snapshot still holds the old data.
    qemu_img(&["snapshot", "-a", "snap", &s(&sn)]);
    sm[..1 << 20].fill(0x31);
    sm[1 << 20..].fill(0);
    write_model(&sraw, &sm);
    assert_same_as_raw(&sn, &sraw);
}

/// Growing past what one L1 cluster and one refcount block cover makes
/// the engine move its L1 table and refcount table.
#[test]
fn table_growth() {
    let d = Scratch::new("growth");
    let path = d.path("g.qcow2");
    create(&path, "cluster_size=512", 1 << 20);
    let img = Image::open(&path, None, &rw()).unwrap();
    img.resize(64 << 20).unwrap();
    let mut model = vec![0u8; 64 << 20];
    let mut rng = Rng(9);
    for i in 0..6000 {
        let off = rng.below((64 << 20) - 5000);
        let len = 1 + rng.below(4000);
        img.write_at(&vec![(i % 200) as u8 + 1; len as usize], off)
            .unwrap();
        model[off as usize..(off + len) as usize].fill((i % 200) as u8 + 1);
    }
    img.close().unwrap();
    drop(img);
    let h = oxqcow::format::Header::parse(&std::fs::read(&path).unwrap()[..512]).unwrap();
    assert!(h.refcount_table_clusters > 1, "refcount table did not grow");
    assert!(h.l1_size as u64 * 8 > 512);
    assert_clean(&path);
    let raw = d.path("g.raw");
    write_model(&raw, &model);
    assert_same_as_raw(&path, &raw);
}

/// Space the guest discards is reused by the next allocation, at the same
/// host offsets QEMU's allocator picks (discard, then write elsewhere): the
/// engine makes the unref durable first instead of growing the file.
#[test]
fn discarded_clusters_are_reused_like_qemu() {
    let d = Scratch::new("reuse");
    let ours = d.path("ours.qcow2");
    let theirs = d.path("theirs.qcow2");
    for p in [&ours, &theirs] {
        create_qcow2(p, "8M", &["-o", "preallocation=metadata"]);
    }
    let img = Image::open(&ours, None, &rw()).unwrap();
    img.discard(0, 1 << 20).unwrap();
    img.discard(7 << 20, 1 << 20).unwrap();
    img.write_at(&vec![7u8; 1 << 20], 7 << 20).unwrap();
    img.write_at(&vec![1u8; 1 << 20], 0).unwrap();
    img.close().unwrap();
    drop(img);
    qemu_io(
        &theirs,
        &[
            "discard 0 1M",
            "discard 7M 1M",
            "write -P 7 7M 1M",
            "write -P 1 0 1M",
        ],
    );
    let map = |p: &Path| {
        qemu_img(&[
            "map",
            "--output=json",
            "-f",
            "qcow2",
            &p.display().to_string(),
        ])
    };
    assert_eq!(map(&ours), map(&theirs));
    assert_eq!(
        std::fs::metadata(&ours).unwrap().len(),
        std::fs::metadata(&theirs).unwrap().len()
    );
    assert_clean(&ours);
    qemu_img(&[
        "compare",
        "-q",
        &ours.display().to_string(),
        &theirs.display().to_string(),
    ]);
}

/// Compressed cluster writes (zlib with QEMU's 4 KiB window, and zstd)
/// are read back by QEMU, packed several to a host cluster.
#[test]
fn compressed_writes_are_read_by_qemu() {
    let d = Scratch::new("cwrite");
    for (opts, cs) in [
        ("compression_type=zlib", 65536u64),
        ("compression_type=zstd", 65536),
        ("compression_type=zlib,cluster_size=512", 512),
        ("compression_type=zstd,cluster_size=2M", 2 << 20),
        ("compat=0.10,cluster_size=4096", 4096),
    ] {
        let p = d.path("c.qcow2");
        let size = 40 * cs + (cs / 2).max(512);
        create(&p, opts, size);
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(cs);
        {
            let img = oxqcow::Qcow2::open(&p, &rw()).unwrap();
            for k in 0..41u64 {
                let n = (size - k * cs).min(cs) as usize;
                let data: Vec<u8> = if k % 7 == 3 {
                    (0..n).map(|_| rng.next() as u8).collect() // incompressible
                } else {
                    (0..n)
                        .map(|i| ((i / 50) as u8).wrapping_add(k as u8))
                        .collect()
                };
                img.write_compressed(&data, k * cs).unwrap();
                model[(k * cs) as usize..(k * cs) as usize + n].copy_from_slice(&data);
            }
            // Overwrite part of a compressed cluster: copy-on-write.
            img.write_at(&[0xab; 100], 5 * cs + 10).unwrap();
            model[(5 * cs + 10) as usize..(5 * cs + 110) as usize].fill(0xab);
            img.close().unwrap();
        }
        assert_clean(&p);
        let raw = d.path("c.raw");
        write_model(&raw, &model);
        assert_same_as_raw(&p, &raw);
        let map = qemu_img(&["map", "--output=json", &p.display().to_string()]);
        assert!(map.contains("\"compressed\": true"), "{opts}: {map}");
    }
}

/// `write_compressed_fresh` keeps QEMU's qcow2 rule: no compressed data
/// over a cluster that has a host cluster (EIO, the image unchanged),
/// incompressible data written plainly even there, zero clusters
/// without a host cluster and discarded clusters taken over.
#[test]
fn fresh_compressed_writes_never_overwrite() {
    let d = Scratch::new("compress-fresh");
    let p = d.path("f.qcow2");
    let cs = 65536u64;
    create(&p, "", 8 * cs);
    let mut model = vec![0u8; 8 * cs as usize];
    let mut rng = Rng(7);
    let noise: Vec<u8> = (0..cs).map(|_| rng.next() as u8).collect();
    {
        let img = oxqcow::Qcow2::open(&p, &rw()).unwrap();
        let put = |model: &mut Vec<u8>, at: u64, data: &[u8]| {
            model[at as usize..at as usize + data.len()].copy_from_slice(data);
        };
        img.write_compressed_fresh(&[1; 65536], 0).unwrap();
        put(&mut model, 0, &[1; 65536]);
        img.write_at(&[2; 65536], cs).unwrap();
        put(&mut model, cs, &[2; 65536]);
        img.write_zeroes(2 * cs, cs, true).unwrap();
        img.write_at(&[3; 65536], 3 * cs).unwrap();
        img.write_zeroes(3 * cs, cs, false).unwrap(); // keeps its host cluster
        put(&mut model, 3 * cs, &[0; 65536]);
        for at in [0, cs, 3 * cs] {
            let e = img.write_compressed_fresh(&[9; 65536], at).unwrap_err();
            assert_eq!(e.errno(), libc::EIO, "{at}: {e}");
        }
        img.write_compressed_fresh(&[4; 65536], 2 * cs).unwrap();
        put(&mut model, 2 * cs, &[4; 65536]);
        img.write_compressed_fresh(&noise, cs).unwrap();
        put(&mut model, cs, &noise);
        img.discard(0, cs).unwrap();
        img.write_compressed_fresh(&[5; 65536], 0).unwrap();
        put(&mut model, 0, &[5; 65536]);
        // The unchecked write replaces what a cluster held.
        img.write_compressed(&[6; 65536], 0).unwrap();
        put(&mut model, 0, &[6; 65536]);
        img.close().unwrap();
    }
    assert_clean(&p);
    let raw = d.path("f.raw");
    write_model(&raw, &model);
    assert_same_as_raw(&p, &raw);
    let map = qemu_img(&["map", "--output=json", &p.display().to_string()]);
    let kinds: Vec<&str> = map
        .lines()
        .map(|l| {
            if l.contains("\"compressed\": true") {
                "compressed"
            } else if l.contains("\"data\": true") {
                "data"
            } else if l.contains("\"offset\"") {
                "zero, allocated"
            } else {
                "unallocated"
            }
        })
        .collect();
    let want = [
        "compressed",
        "data",
        "compressed",
        "zero, allocated",
        "unallocated",
    ];
    assert_eq!(kinds, want, "{map}");
}
