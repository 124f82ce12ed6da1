//! External data files against QEMU: images with a data file written by
//! QEMU read by oxqcow, written by oxqcow read by QEMU (`qemu-img check`
//! clean, `qemu-img compare` equal to a model; a raw data file equal to
//! the disk itself), copy-on-write from a backing file into the data
//! file, resizing, QEMU's refusals and corruption messages, the open-time
//! override, and rule 1 of the write ordering (the data file is synced
//! before an L2 table that maps new data is written).

mod common;
use common::*;
use oxqcow::engine::{create_with_data, DataFileSource};
use oxqcow::storage::{MemStorage, NullStorage, Storage};
use oxqcow::{CreateOptions, Image, OpenOptions, Qcow2};
use std::path::Path;
use std::sync::{Arc, Mutex};

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn qemu_written_images_read_by_oxqcow() {
    for raw in [false, true] {
        let d = Scratch::new(&format!("df-qemu-{raw}"));
        let img = d.path("q.qcow2");
        let data = d.path("q.data");
        let o = format!(
            "data_file={},data_file_raw={}",
            s(&data),
            if raw { "on" } else { "off" }
        );
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, &s(&img), "4M"]);
        qemu_io(
            &img,
            &[
                "write -P 0x11 0 100k",
                "write -P 0x22 200k 64k",
                "write -z 256k 64k",
                "write -z -u 64k 64k",
                "discard 512k 64k",
                "write -P 0x33 1000000 70000",
                "write -P 0x44 4128768 65536",
            ],
        );
        assert_clean(&img);
        assert_same_view(&img, &d);
        let q = Qcow2::open(&img, &OpenOptions::default()).unwrap();
        assert_eq!(q.data_file_name(), Some(s(&data).as_str()));
        assert_eq!(q.data_file_raw(), raw);
        // Guest cluster 0 lives at offset 0 of the data file.
        let mut b = [0u8; 16];
        q.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0x11; 16]);
        match q.block_status(0, 4096).unwrap().0 {
            oxqcow::BlockStatus::Data { host, depth: 0 } => assert_eq!(host, Some(0)),
            other => panic!("cluster 0: {other:?}"),
        }
    }
}

/// Random writes, zero writes and discards through oxqcow, against a model.
fn random_ops(opts: &str, cs: u64, seed: u64, writethrough: bool) {
    let d = Scratch::new(&format!("df-random-{seed}"));
    let img = d.path("o.qcow2");
    let data = d.path("o.data");
    let size = 64 * cs + 12345 / 512 * 512;
    create(&img, &format!("data_file={},{opts}", s(&data)), size);
    let raw = opts.contains("data_file_raw=on");
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(seed);
    let q = Qcow2::open(
        &img,
        &OpenOptions {
            writable: true,
            writethrough,
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..400 {
        let off = rng.below(size);
        let len = rng.below((size - off).min(3 * cs)) + 1;
        match rng.below(10) {
            0..=5 => {
                let buf: Vec<u8> = (0..len).map(|k| (i as u64 * 7 + k) as u8 | 1).collect();
                q.write_at(&buf, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            6 | 7 => {
                q.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            8 => {
                q.discard(off, len).unwrap();
                let (a, mut b) = (off.div_ceil(cs) * cs, (off + len) / cs * cs);
                if off + len == size {
                    b = size;
                }
                if a < b {
                    model[a as usize..b as usize].fill(0);
                }
            }
            _ => q.flush().unwrap(),
        }
    }
    q.close().unwrap();
    drop(q);
    assert_clean(&img);
    let m = d.path("model.raw");
    std::fs::write(&m, &model).unwrap();
    assert_same_as_raw(&img, &m);
    let bytes = std::fs::read(&data).unwrap();
    if raw {
        // The raw data file is the disk.
        assert_eq!(bytes.len() as u64, size);
        assert!(bytes == model, "raw data file differs from the disk");
    } else {
        // Every cluster mapped to data holds the guest bytes.
        let q = Qcow2::open(&img, &OpenOptions::default()).unwrap();
        let mut pos = 0;
        while pos < size {
            let (st, n) = q.block_status(pos, size - pos).unwrap();
            if let oxqcow::BlockStatus::Data { host: Some(h), .. } = st {
                assert_eq!(h, pos, "host offset != guest offset");
                let end = (pos + n) as usize;
                assert!(bytes[pos as usize..end.min(bytes.len())] == model[pos as usize..end]);
            }
            pos += n;
        }
    }
    // QEMU sees the same, and so do we through QEMU's eyes.
    assert_same_view(&img, &d);
}

#[test]
fn oxqcow_writes_read_by_qemu() {
    random_ops("cluster_size=4096", 4096, 1, false);
    random_ops("cluster_size=65536,lazy_refcounts=on", 65536, 2, true);
    random_ops("cluster_size=4096,data_file_raw=on", 4096, 3, false);
    random_ops(
        "cluster_size=512,data_file_raw=on,refcount_bits=1",
        512,
        4,
        true,
    );
}

#[test]
fn copy_on_write_from_a_backing_file_into_the_data_file() {
    let d = Scratch::new("df-backing");
    let base = d.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&base), "1M"]);
    qemu_io(&base, &["write -P 0x5a 0 1M"]);
    let img = d.path("top.qcow2");
    let data = d.path("top.data");
    let o = format!(
        "data_file={},backing_file={},backing_fmt=qcow2",
        s(&data),
        s(&base)
    );
    create(&img, &o, 1 << 20);
    let q = Qcow2::open(&img, &rw()).unwrap();
    q.write_at(&[1; 1000], 70000).unwrap();
    q.write_zeroes(200 << 10, 4096, false).unwrap();
    q.close().unwrap();
    drop(q);
    assert_clean(&img);
    let mut model = vec![0x5a; 1 << 20];
    model[70000..71000].fill(1);
    model[200 << 10..(200 << 10) + 4096].fill(0);
    let m = d.path("model.raw");
    std::fs::write(&m, &model).unwrap();
    assert_same_as_raw(&img, &m);
    // The copied-up cluster is in the data file, whole.
    let bytes = std::fs::read(&data).unwrap();
    assert!(bytes[65536..131072] == model[65536..131072]);
}

#[test]
fn resize_follows_qemu() {
    for raw in ["off", "on"] {
        let d = Scratch::new(&format!("df-resize-{raw}"));
        let (ours, theirs) = (d.path("o.qcow2"), d.path("q.qcow2"));
        let (od, qd) = (d.path("o.data"), d.path("q.data"));
        create(
            &ours,
            &format!("data_file={},data_file_raw={raw}", s(&od)),
            4 << 20,
        );
        let o = format!("data_file={},data_file_raw={raw}", s(&qd));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, &s(&theirs), "4M"]);
        for (size, arg) in [(8u64 << 20, "8M"), (2 << 20, "2M"), (3 << 20, "3M")] {
            let q = Qcow2::open(&ours, &rw()).unwrap();
            q.resize(size).unwrap();
            q.close().unwrap();
            drop(q);
            qemu_img(&["resize", "-q", "--shrink", &s(&theirs), arg]);
            assert_eq!(
                std::fs::metadata(&od).unwrap().len(),
                std::fs::metadata(&qd).unwrap().len(),
                "data file length after resize to {arg} ({raw})"
            );
            assert_clean(&ours);
            let map = |p: &Path| qemu_img(&["map", "--output=json", &s(p)]);
            assert_eq!(
                map(&ours),
                map(&theirs),
                "map after resize to {arg} ({raw})"
            );
        }
    }
}

#[test]
fn refusals_and_messages() {
    let d = Scratch::new("df-refuse");
    let img = d.path("a.qcow2");
    let data = d.path("a.data");
    create(&img, &format!("data_file={}", s(&data)), 1 << 20);
    let q = Qcow2::open(&img, &rw()).unwrap();
    q.write_at(&[3; 512], 0).unwrap();
    // No compressed clusters, no internal snapshots.
    let e = q.write_compressed(&[0; 65536], 0).unwrap_err();
    assert_eq!(e.errno(), libc::ENOTSUP);
    let e = q.snapshot_create("s").unwrap_err();
    assert_eq!(e.errno(), libc::ENOTSUP);
    q.close().unwrap();
    drop(q);
    // Open without the data file: QEMU's message; qemu-img info's
    // metadata-only open still works.
    let moved = d.path("moved.data");
    std::fs::rename(&data, &moved).unwrap();
    let e = Qcow2::open(&img, &OpenOptions::default()).err().unwrap();
    assert_eq!(
        e.to_string().replace(" (os error 2)", ""),
        format!(
            "Could not open '{}': Could not open '{}': No such file or directory",
            s(&img),
            s(&data)
        )
    );
    let meta = OpenOptions {
        metadata_only: true,
        ..Default::default()
    };
    let q = Qcow2::open(&img, &meta).unwrap();
    assert!(q.read_at(&mut [0u8; 512], 0).is_err());
    drop(q);
    // The override: another file, or a null device.
    let over = OpenOptions {
        writable: true,
        data_file: Some(DataFileSource::Path(moved.clone())),
        ..Default::default()
    };
    let q = Qcow2::open(&img, &over).unwrap();
    q.write_at(&[9; 512], 0).unwrap();
    q.close().unwrap();
    drop(q);
    assert_eq!(std::fs::read(&moved).unwrap()[..512], [9; 512]);
    let null = OpenOptions {
        writable: true,
        data_file: Some(DataFileSource::Storage {
            storage: Arc::new(NullStorage::new(1 << 20, true)),
            name: "null-co://".into(),
        }),
        ..Default::default()
    };
    let q = Qcow2::open(&img, &null).unwrap();
    q.write_at(&[7; 512], 65536).unwrap();
    let mut b = [1u8; 512];
    q.read_at(&mut b, 65536).unwrap();
    assert_eq!(b, [0; 512]);
    q.close().unwrap();
    drop(q);
    std::fs::rename(&moved, &data).unwrap();
    assert_clean(&img);
    // An override on an image without a data file; the name missing.
    let plain = d.path("plain.qcow2");
    create(&plain, "", 1 << 20);
    let e = Qcow2::open(&plain, &over).err().unwrap();
    assert!(
        e.to_string()
            .ends_with("'data-file' can only be set for images with an external data file"),
        "{e}"
    );
    qemu_img(&["amend", "-o", "data_file=", &s(&img)]);
    let e = Qcow2::open(&img, &OpenOptions::default()).err().unwrap();
    assert!(
        e.to_string()
            .ends_with("'data-file' is required for this image"),
        "{e}"
    );
}

/// Writes an L2 entry of guest cluster 1 of a fresh 64 KiB-cluster image
/// whose L2 table is the fifth cluster (QEMU's layout after one write).
fn poke_l2(img: &Path, entry: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&entry.to_be_bytes(), 0x40008).unwrap();
}

#[test]
fn corrupt_mappings_are_refused_as_qemu_refuses_them() {
    let d = Scratch::new("df-corrupt");
    let data = d.path("c.data");
    for (entry, msg, check_err) in [
        (
            0x8000_0000_0005_0000u64,
            "External data file host cluster offset 0x50000 does not match guest cluster offset: 0x10000, L2 index: 0x1)",
            None,
        ),
        (
            0x4000_0000_0005_0000,
            "Compressed cluster entry found in image with external data file (L2 offset: 0x40000, L2 index: 0x1)",
            Some("ERROR compressed cluster 1 with data file, entry=0x4000000000050000"),
        ),
    ] {
        let img = d.path("c.qcow2");
        let _ = std::fs::remove_file(&img);
        let o = format!("data_file={}", s(&data));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, &s(&img), "1M"]);
        qemu_io(&img, &["write 64k 64k"]);
        poke_l2(&img, entry);
        // check: QEMU's verdict and lines.
        let (qc, qout, qerr) = run("qemu-img", &["check", &s(&img)]);
        let q = Qcow2::open(&img, &OpenOptions::default()).unwrap();
        let mut lines = Vec::new();
        let r = q.check(0, &mut |l: &str| lines.push(l.to_string())).unwrap();
        assert_eq!(r.corruptions > 0, qc == 2, "{qout}{qerr}");
        if let Some(l) = check_err {
            assert!(qerr.contains(l), "{qerr}");
            assert_eq!(lines, vec![l.to_string()]);
        }
        drop(q);
        // A read marks the image corrupt, with QEMU's reason.
        let q = Qcow2::open(&img, &rw()).unwrap();
        let e = q.read_at(&mut [0u8; 512], 65536).unwrap_err();
        assert!(e.to_string().ends_with(msg), "{e}");
        drop(q);
        let (_, info, _) = run("qemu-img", &["info", "--output=json", &s(&img)]);
        assert!(info.contains("\"corrupt\": true"), "{info}");
    }
}

/// Records, across the image file and the data file, every request in
/// the order made.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    ImageWrite(u64, u64),
    DataWrite(u64),
    DataSync,
}

struct Rec {
    inner: MemStorage,
    data: bool,
    log: Arc<Mutex<Vec<Ev>>>,
}

impl Storage for Rec {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.log.lock().unwrap().push(if self.data {
            Ev::DataWrite(off)
        } else {
            Ev::ImageWrite(off, buf.len() as u64)
        });
        self.inner.write_at(buf, off)
    }
    fn sync(&self) -> std::io::Result<()> {
        if self.data {
            self.log.lock().unwrap().push(Ev::DataSync);
        }
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, l: u64) -> std::io::Result<()> {
        self.inner.set_len(l)
    }
    fn punch_hole(&self, o: u64, l: u64) -> std::io::Result<()> {
        self.inner.punch_hole(o, l)
    }
    fn allocate(&self, o: u64, l: u64) -> std::io::Result<()> {
        self.inner.allocate(o, l)
    }
}

#[test]
fn data_is_synced_before_the_l2_table_that_maps_it() {
    for (lazy, writethrough) in [(false, false), (true, false), (false, true), (true, true)] {
        let log = Arc::new(Mutex::new(Vec::new()));
        let file = Arc::new(Rec {
            inner: MemStorage::new(),
            data: false,
            log: log.clone(),
        });
        let data = Arc::new(Rec {
            inner: MemStorage::new(),
            data: true,
            log: log.clone(),
        });
        let mut o = CreateOptions::default();
        o.parse_into(if lazy { "lazy_refcounts=on" } else { "" })
            .unwrap();
        o.size = 64 << 20;
        o.data_file = Some("mem.data".into());
        let path = Path::new("mem.qcow2");
        create_with_data(file.clone(), Some(data.clone()), path, &o).unwrap();
        let opts = OpenOptions {
            writable: true,
            writethrough,
            data_file: Some(DataFileSource::Storage {
                storage: data.clone(),
                name: "mem.data".into(),
            }),
            ..Default::default()
        };
        let q = Qcow2::open_storage(file.clone(), path, &opts).unwrap();
        let l2 = {
            q.write_at(&[1; 512], 0).unwrap();
            q.flush().unwrap();
            q.header().l1_table_offset + 65536
        };
        log.lock().unwrap().clear();
        // Allocating writes only: every data write must be durable before
        // the L2 table (at `l2`) is next written.
        for i in 1..40u64 {
            q.write_at(&[i as u8; 4096], i * 65536 * 3).unwrap();
            if i % 7 == 0 {
                q.flush().unwrap();
            }
        }
        q.close().unwrap();
        let ev = log.lock().unwrap().clone();
        let mut unsynced = 0;
        let mut l2_writes = 0;
        for e in &ev {
            match e {
                Ev::DataWrite(_) => unsynced += 1,
                Ev::DataSync => unsynced = 0,
                Ev::ImageWrite(off, len) if *off < l2 + 65536 && off + len > l2 => {
                    l2_writes += 1;
                    assert_eq!(
                        unsynced, 0,
                        "L2 table written before the data it maps was synced (lazy {lazy}, writethrough {writethrough}): {ev:?}"
                    );
                }
                Ev::ImageWrite(..) => {}
            }
        }
        assert!(l2_writes > 0, "no L2 write seen: {ev:?}");
        // And the result reads back.
        let img = Image::Qcow2(Box::new(q));
        let mut b = [0u8; 4096];
        img.read_at(&mut b, 39 * 65536 * 3).unwrap();
        assert_eq!(b, [39; 4096]);
    }
}
