//! Persistent dirty bitmaps, with QEMU as the judge: qemu-img adds the
//! bitmaps, oxqcow writes, and QEMU reads the result back.
//!
//! - `oxqcow io` and QEMU's qemu-io run the same commands on copies of one
//!   image: the files come out byte for byte identical (bitmap data,
//!   tables, directory, header, refcounts), and qemu-nbd's dirty-bitmap
//!   export (read by `qemu-img map` with `x-dirty-bitmap`) reports the
//!   regions the test's own model expects.
//! - The library's requests (writes, zero writes, discards, compressed
//!   writes, resize) set exactly the granules they touch; QEMU reads them.
//! - A power cut at any point of a session (CrashStorage) leaves every
//!   bitmap either marked in use or complete: a bitmap that claims to be
//!   consistent never misses a changed granule.
//! - Bitmaps that were in use at open are kept as found and block resize;
//!   a stale extension (autoclear bit cleared) is dropped; `check` counts
//!   bitmap clusters; damaged directories are refused with QEMU's messages.
//!
//! Bitmaps are decoded here by a small reader of the on-disk format,
//! independent of the library's.

mod common;
use common::*;
use oxqcow::engine::{OpenOptions, Qcow2};
use oxqcow::storage::{CrashSpec, CrashStorage, MemStorage, Storage};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

const BIN: &str = env!("CARGO_BIN_EXE_oxqcow");
const K: u64 = 1024;
const M: u64 = 1024 * 1024;

// ---- an independent reader of bitmaps in an image file ----------------------------

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}
fn bytes_at(img: &[u8], off: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    let s = (off as usize).min(img.len());
    let e = ((off + len) as usize).min(img.len());
    v[..e - s].copy_from_slice(&img[s..e]);
    v
}

/// One bitmap as the file has it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Found {
    name: String,
    flags: u32,
    granularity: u64,
    table_offset: u64,
    /// Serialized bits: bit i of byte j is granule 8j + i.
    bits: Vec<u8>,
}

impl Found {
    fn in_use(&self) -> bool {
        self.flags & 1 != 0
    }
    fn granules(&self) -> BTreeSet<u64> {
        (0..self.bits.len() as u64 * 8)
            .filter(|&i| self.bits[(i / 8) as usize] >> (i % 8) & 1 == 1)
            .collect()
    }
}

/// The bitmaps of an image (none when the extension is absent or stale).
fn decode(img: &[u8]) -> Vec<Found> {
    if be32(img, 4) < 3 || be64(img, 88) & 1 == 0 {
        return Vec::new();
    }
    let cs = 1u64 << be32(img, 20);
    let size = be64(img, 24);
    let mut off = be32(img, 100) as usize;
    let ext = loop {
        let (magic, len) = (be32(img, off), be32(img, off + 4) as usize);
        if magic == 0 {
            return Vec::new();
        }
        if magic == 0x2385_2875 {
            break &img[off + 8..off + 8 + len];
        }
        off += 8 + len.div_ceil(8) * 8;
    };
    let (nb, dir_size, dir_off) = (be32(ext, 0), be64(ext, 8), be64(ext, 16));
    let dir = bytes_at(img, dir_off, dir_size);
    let mut pos = 0;
    let mut out = Vec::new();
    for _ in 0..nb {
        let e = &dir[pos..];
        let name_len = u16::from_be_bytes([e[18], e[19]]) as usize;
        let gran_bits = e[17] as u32;
        let granularity = 1u64 << gran_bits;
        let table_offset = be64(e, 0);
        let table = bytes_at(img, table_offset, be32(e, 8) as u64 * 8);
        let nbytes = size.div_ceil(granularity).div_ceil(8);
        let mut bits = vec![0u8; nbytes as usize];
        for (k, t) in table.chunks(8).map(|c| be64(c, 0)).enumerate() {
            let at = k as u64 * cs;
            if at >= nbytes {
                break;
            }
            let n = cs.min(nbytes - at) as usize;
            let data_off = t & 0x00ff_ffff_ffff_fe00;
            if data_off != 0 {
                bits[at as usize..at as usize + n]
                    .copy_from_slice(&bytes_at(img, data_off, n as u64));
            } else if t & 1 != 0 {
                bits[at as usize..at as usize + n].fill(0xff);
            }
        }
        out.push(Found {
            name: String::from_utf8_lossy(&e[24..24 + name_len]).into_owned(),
            flags: be32(e, 12),
            granularity,
            table_offset,
            bits,
        });
        pos += (24 + name_len).div_ceil(8) * 8;
    }
    out
}

fn decode_file(p: &Path) -> Vec<Found> {
    decode(&std::fs::read(p).unwrap())
}

fn find<'a>(list: &'a [Found], name: &str) -> &'a Found {
    list.iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("no bitmap {name} in {list:?}"))
}

/// Granules of granularity `g` that guest ranges touch.
fn touched(ranges: &[(u64, u64)], g: u64) -> BTreeSet<u64> {
    ranges
        .iter()
        .filter(|r| r.1 > 0)
        .flat_map(|&(o, l)| o / g..=(o + l - 1) / g)
        .collect()
}

// ---- QEMU as the reader: qemu-nbd's dirty-bitmap export ------------------------------

/// The dirty granules of each named bitmap as QEMU reports them: qemu-nbd
/// exports the bitmaps, `qemu-img map` with `x-dirty-bitmap` shows dirty
/// regions as `"data": false`.
fn qemu_dirty(img: &Path, names: &[(&str, u64)], dir: &Scratch) -> Vec<BTreeSet<u64>> {
    let bitmaps: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
    with_qemu_nbd(&dir.0, img, &bitmaps, |opts| {
        let mut out = Vec::new();
        for (n, g) in names {
            let opts = format!("{opts},x-dirty-bitmap=qemu:dirty-bitmap:{n}");
            let (code, text, err) =
                run("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
            assert_eq!(code, 0, "qemu-img map of bitmap {n}: {err}");
            let mut set = BTreeSet::new();
            for line in text.lines().filter(|l| l.contains("\"data\": false")) {
                let num = |key: &str| -> u64 {
                    let s = &line[line.find(key).unwrap() + key.len()..];
                    s.trim_start()
                        .split(|c: char| !c.is_ascii_digit())
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap()
                };
                let (s, l) = (num("\"start\":"), num("\"length\":"));
                set.extend(s / g..(s + l).div_ceil(*g));
            }
            out.push(set);
        }
        out
    })
}

// ---- running qemu-io and oxqcow io side by side ---------------------------------------

fn io(prog: &str, file: &Path, cmds: &[&str]) -> (i32, String, String) {
    let mut args: Vec<String> = Vec::new();
    if prog == BIN {
        args.push("io".into());
    }
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    args.push(file.display().to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = run(prog, &a);
    // Timings vary; program names differ.
    let clean = |s: String| {
        s.lines()
            .filter(|l| !l.contains("ops/sec"))
            .map(|l| {
                l.replace("qemu-io: ", "PROG: ")
                    .replace("oxqcow: ", "PROG: ")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    (code, clean(out), clean(err))
}

/// Runs the commands through qemu-io on a copy of `base` and through
/// `oxqcow io` on another; asserts the same output and byte-identical
/// files, and returns the path of oxqcow's result.
fn side_by_side(base: &Path, cmds: &[&str], dir: &Scratch, tag: &str) -> std::path::PathBuf {
    let ours = dir.path(&format!("{tag}-ours.qcow2"));
    let theirs = dir.path(&format!("{tag}-qemu.qcow2"));
    std::fs::copy(base, &ours).unwrap();
    std::fs::copy(base, &theirs).unwrap();
    let q = io("qemu-io", &theirs, cmds);
    let o = io(BIN, &ours, cmds);
    assert_eq!(o, q, "{tag}: output of {cmds:?}");
    let (a, b) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    assert_eq!(decode(&a), decode(&b), "{tag}: bitmaps after {cmds:?}");
    if let Some(i) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) {
        panic!("{tag}: files differ at byte {i:#x} after {cmds:?}");
    }
    ours
}

/// A 16 MiB image (64 KiB clusters) with guest data and four bitmaps set
/// up by QEMU: `b64k` (default granularity, already holding bits),
/// `fine` (4 KiB, finer than a cluster), `coarse` (1 MiB), and `off`
/// (disabled, holding bits of its own).
fn qemu_image(dir: &Scratch, name: &str) -> std::path::PathBuf {
    let p = dir.path(name);
    let f = p.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &f, "16M"]);
    qemu_io(&p, &["write -P 0x11 0 3M", "write -P 0x22 8M 1M"]);
    qemu_img(&["bitmap", "--add", &f, "b64k"]);
    qemu_img(&["bitmap", "--add", "-g", "4k", &f, "fine"]);
    qemu_img(&["bitmap", "--add", "-g", "1M", &f, "coarse"]);
    qemu_img(&["bitmap", "--add", &f, "off"]);
    qemu_io(&p, &["write -P 0x33 4M 64k", "write -P 0x44 12M 4k"]);
    qemu_img(&["bitmap", "--disable", &f, "off"]);
    p
}

const NAMES: [(&str, u64); 4] = [
    ("b64k", 64 * K),
    ("fine", 4 * K),
    ("coarse", M),
    ("off", 64 * K),
];

#[test]
fn oxqcow_io_leaves_the_file_qemu_io_leaves() {
    let dir = Scratch::new("bitmaps-io");
    let base = qemu_image(&dir, "base.qcow2");
    let before = decode_file(&base);
    let sets: [(&str, &[&str]); 6] = [
        (
            "writes",
            &[
                "write -P 1 64k 64k",
                "write -P 2 5M 4k",
                "write -P 3 7000 3000",
                "writev -P 4 10M 1k 2k",
                "aio_write -P 5 14M 8k",
                "aio_flush",
                "write -P 6 16380k 4k",
            ],
        ),
        (
            "zeroes",
            &[
                "write -z 70k 1k",
                "write -z 200k 3k",
                "write -z -u 8k 100k",
                "write -z -u 9M 2M",
            ],
        ),
        (
            "discard",
            &["discard 10k 20k", "discard 1M 1M", "discard 300k 1"],
        ),
        (
            "flushes",
            &["write 1M 4k", "flush", "write 2M 4k", "flush", "read 0 64k"],
        ),
        ("reads-only", &["read 0 1M", "readv 4M 4k 4k"]),
        (
            "grow",
            &[
                "write 15M 1M",
                "truncate 24M",
                "write 23M 64k",
                "write 16M 512",
            ],
        ),
    ];
    for (tag, cmds) in sets {
        let ours = side_by_side(&base, cmds, &dir, tag);
        assert_clean(&ours);
        let after = decode_file(&ours);
        // Same bitmaps, same flags (no longer in use), none lost.
        let names = |l: &[Found]| {
            l.iter()
                .map(|b| (b.name.clone(), b.flags))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&after), names(&before), "{tag}");
        // Enabled bitmaps gained exactly the touched granules; the
        // disabled one kept its bits.
        for (n, g) in NAMES {
            let (old, new) = (find(&before, n).granules(), find(&after, n).granules());
            let mut want = old.clone();
            if n != "off" {
                want.extend(touched(&guest_ranges(cmds), g));
            }
            let want: BTreeSet<u64> = want
                .into_iter()
                .filter(|&i| i < new_size(cmds).div_ceil(g))
                .collect();
            assert_eq!(new, want, "{tag}: bitmap {n}");
        }
        if tag == "writes" || tag == "zeroes" {
            // QEMU itself reads what oxqcow wrote.
            let q = qemu_dirty(&ours, &NAMES, &dir);
            for ((n, _), set) in NAMES.iter().zip(q) {
                assert_eq!(
                    set,
                    find(&after, n).granules(),
                    "{tag}: qemu-nbd's view of {n}"
                );
            }
        }
    }
}

/// The guest ranges the write-type commands of a list touch.
fn guest_ranges(cmds: &[&str]) -> Vec<(u64, u64)> {
    let num = |s: &str| -> u64 {
        let (n, mul) = match s.as_bytes()[s.len() - 1] {
            b'k' => (&s[..s.len() - 1], K),
            b'M' => (&s[..s.len() - 1], M),
            _ => (s, 1),
        };
        n.parse::<u64>().unwrap() * mul
    };
    let mut out = Vec::new();
    for c in cmds {
        let mut w = c.split_whitespace();
        let cmd = w.next().unwrap();
        // Operands only: options, and the pattern after -P, dropped.
        let (mut args, mut skip) = (Vec::new(), false);
        for a in w {
            if std::mem::take(&mut skip) {
                continue;
            }
            skip = a == "-P";
            if !a.starts_with('-') {
                args.push(num(a));
            }
        }
        match cmd {
            "write" | "aio_write" | "discard" => out.push((args[0], args[1])),
            "writev" => out.push((args[0], args[1..].iter().sum())),
            _ => {}
        }
    }
    out
}

fn new_size(cmds: &[&str]) -> u64 {
    cmds.iter()
        .filter_map(|c| c.strip_prefix("truncate "))
        .map(|s| s.trim_end_matches('M').parse::<u64>().unwrap() * M)
        .next_back()
        .unwrap_or(16 * M)
}

#[test]
fn library_requests_set_the_granules_they_touch() {
    let dir = Scratch::new("bitmaps-lib");
    let p = qemu_image(&dir, "lib.qcow2");
    let before = decode_file(&p);
    let img = oxqcow::Image::open(
        &p,
        Some("qcow2"),
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let q = img.qcow2().unwrap();
    let mut ranges = vec![];
    let mut req = |r: (u64, u64)| ranges.push(r);
    q.write_at(&[7u8; 5000], 3 * M + 100).unwrap();
    req((3 * M + 100, 5000));
    q.write_zeroes(6 * M + 512, 70 * K, true).unwrap();
    req((6 * M + 512, 70 * K));
    q.write_zeroes(7 * M, 64 * K, false).unwrap();
    req((7 * M, 64 * K));
    q.discard(9 * M + 4 * K, 200 * K).unwrap();
    req((9 * M + 4 * K, 200 * K));
    q.write_compressed(&[9u8; 65536], 11 * M).unwrap();
    req((11 * M, 64 * K));
    // A zero write served in pieces counts as the one request.
    q.as_one_request(13 * M + 10 * K, 2 * K, || {
        q.write_zeroes(13 * M, 64 * K, false).unwrap();
    });
    req((13 * M + 10 * K, 2 * K));
    // Failed checks record nothing; zero-length requests neither.
    assert!(q.write_at(&[1], 16 * M).is_err());
    q.write_at(&[], 2 * M).unwrap();
    // Grow: new granules start clear, then a write past the old end.
    q.resize(20 * M).unwrap();
    q.write_at(&[5u8; 512], 18 * M).unwrap();
    req((18 * M, 512));
    img.close().unwrap();
    drop(img);
    assert_clean(&p);
    let after = decode_file(&p);
    let q = qemu_dirty(&p, &NAMES, &dir);
    for ((n, g), theirs) in NAMES.iter().zip(q) {
        let mut want = find(&before, n).granules();
        if *n != "off" {
            want.extend(touched(&ranges, *g));
        }
        assert_eq!(find(&after, n).granules(), want, "bitmap {n}");
        assert_eq!(theirs, want, "qemu-nbd's view of bitmap {n}");
        assert_eq!(find(&after, n).flags, find(&before, n).flags, "{n}");
    }
    // QEMU copies them (it refuses inconsistent ones).
    let copy = dir.path("copy.qcow2");
    qemu_img(&[
        "convert",
        "--bitmaps",
        "-O",
        "qcow2",
        &p.display().to_string(),
        &copy.display().to_string(),
    ]);
    let copied = decode_file(&copy);
    for (n, _) in NAMES {
        assert_eq!(find(&copied, n).bits, find(&after, n).bits, "copy of {n}");
    }
}

#[test]
fn info_lists_bitmaps_as_qemu_img_does() {
    let dir = Scratch::new("bitmaps-info");
    let p = qemu_image(&dir, "i.qcow2");
    let f = p.display().to_string();
    let same = |what: &str| {
        for out in ["human", "json"] {
            let o = format!("--output={out}");
            let strip = |s: String| {
                s.lines()
                    .filter(|l| !l.contains("disk size") && !l.contains("actual-size"))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let (c1, o1, e1) = run("qemu-img", &["info", &o, &f]);
            let (c2, o2, e2) = run(BIN, &["info", &o, &f]);
            assert_eq!((c1, e1.is_empty()), (0, true), "{what}");
            assert_eq!((c2, strip(o2)), (c1, strip(o1)), "{what} {out}: {e2}");
        }
    };
    same("consistent");
    let o = io(BIN, &p, &["write 0 64k"]);
    assert_eq!(o.0, 0, "{o:?}");
    same("after an oxqcow session");
    let _ = run("qemu-io", &["-c", "write 6M 64k", "-c", "abort", &f]);
    same("in use");
}

#[test]
fn shrinking_drops_granules_past_the_end() {
    let dir = Scratch::new("bitmaps-shrink");
    let p = qemu_image(&dir, "s.qcow2");
    let o = io(BIN, &p, &["truncate 6M", "write 5M 4k", "truncate 10M"]);
    assert_eq!(o.0, 0, "{o:?}");
    assert_clean(&p);
    let after = decode_file(&p);
    let b = find(&after, "b64k");
    // The old bit below 6 MiB (4M) stays, the one at 12M is gone; the
    // write at 5 MiB is new; granules regrown past 6 MiB are clear.
    let want: BTreeSet<u64> = [64, 80].into_iter().collect();
    assert_eq!(b.granules(), want);
    assert_eq!(b.bits.len(), 20);
    let theirs = qemu_dirty(&p, &[("b64k", 64 * K)], &dir);
    assert_eq!(theirs[0], want);
}

#[test]
fn bitmaps_in_use_at_open_are_kept_and_block_resize() {
    let dir = Scratch::new("bitmaps-inuse");
    let base = qemu_image(&dir, "inuse.qcow2");
    let f = base.display().to_string();
    // A QEMU session that dies leaves the bitmaps in use.
    let (_, _, _) = run("qemu-io", &["-c", "write 6M 64k", "-c", "abort", &f]);
    qemu_img(&["bitmap", "--add", &f, "fresh"]);
    let before = decode_file(&base);
    assert!(find(&before, "b64k").in_use() && !find(&before, "fresh").in_use());
    let ours = side_by_side(&base, &["write 1M 4k", "discard 2M 64k"], &dir, "inuse");
    assert_clean(&ours);
    let after = decode_file(&ours);
    for (n, _) in NAMES {
        assert_eq!(
            find(&after, n),
            find(&before, n),
            "in-use bitmap {n} kept as found"
        );
    }
    let fresh = find(&after, "fresh");
    assert!(!fresh.in_use());
    assert_eq!(fresh.granules(), [16, 32].into_iter().collect());
    // Resize is refused, in QEMU's words.
    side_by_side(&base, &["truncate 32M"], &dir, "inuse-resize");
    let (code, _, err) = io(BIN, &base, &["truncate 32M"]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "PROG: Bitmap 'b64k' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
    );
    // A session where every bitmap is in use rewrites nothing of them.
    qemu_img(&["bitmap", "--remove", &f, "fresh"]);
    side_by_side(&base, &["write 0 4k"], &dir, "all-in-use");
}

#[test]
fn stale_extension_is_dropped_as_qemu_drops_it() {
    let dir = Scratch::new("bitmaps-stale");
    let base = qemu_image(&dir, "stale.qcow2");
    // A program without bitmap support clears autoclear bit 0.
    let mut b = std::fs::read(&base).unwrap();
    b[95] &= !1;
    std::fs::write(&base, &b).unwrap();
    let ours = side_by_side(&base, &["write 0 4k"], &dir, "stale");
    assert!(decode_file(&ours).is_empty());
    let (_, _, err) = io(BIN, &base, &["read 0 1"]);
    assert!(
        err.starts_with("PROG: warning: a program lacking bitmap support modified this file"),
        "{err}"
    );
    // The old bitmap clusters are leaks now, for both tools.
    let (c1, o1, e1) = run("qemu-img", &["check", &ours.display().to_string()]);
    let (c2, o2, e2) = run(BIN, &["check", &ours.display().to_string()]);
    assert_eq!(c1, 3, "{o1}{e1}");
    assert_eq!((c2, o2), (c1, o1));
    assert_eq!(e2, e1);
}

#[test]
fn check_counts_bitmap_clusters() {
    let dir = Scratch::new("bitmaps-check");
    let p = qemu_image(&dir, "c.qcow2");
    let f = p.display().to_string();
    let same = |what: &str| {
        let (c1, o1, e1) = run("qemu-img", &["check", &f]);
        let (c2, o2, e2) = run(BIN, &["check", &f]);
        assert_eq!((c2, o2.as_str()), (c1, o1.as_str()), "{what}: {e2}");
        assert_eq!(e2.replace("oxqcow: ", "qemu-img: "), e1, "{what}");
        c1
    };
    assert_eq!(same("clean"), 0);
    let _ = run("qemu-io", &["-c", "write 6M 64k", "-c", "abort", &f]);
    assert_eq!(same("in use"), 0);
    // An in-use bitmap's table is still checked.
    let b = std::fs::read(&p).unwrap();
    let t = find(&decode(&b), "b64k").table_offset as usize;
    let mut bad = b.clone();
    bad[t + 6] |= 1;
    std::fs::write(&p, &bad).unwrap();
    assert_eq!(same("bad table entry"), 1);
    std::fs::write(&p, &b).unwrap();

    // A dirty lazy-refcounts image is repaired on open without freeing
    // the bitmap clusters.
    let lazy = dir.path("lazy.qcow2");
    let l = lazy.display().to_string();
    create_qcow2(&lazy, "8M", &["-o", "lazy_refcounts=on"]);
    qemu_img(&["bitmap", "--add", &l, "a"]);
    qemu_io(&lazy, &["write 0 64k"]);
    qemu_img(&["bitmap", "--add", &l, "z"]);
    let _ = run("qemu-io", &["-c", "write 1M 64k", "-c", "sigraise 9", &l]);
    let img = Qcow2::open(
        &lazy,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    img.write_at(&[1u8; 512], 2 * M).unwrap();
    img.close().unwrap();
    drop(img);
    assert_clean(&lazy);
    let got = decode_file(&lazy);
    assert!(find(&got, "a").in_use() && find(&got, "z").in_use());
}

#[test]
fn damaged_bitmaps_are_refused_with_qemus_messages() {
    let dir = Scratch::new("bitmaps-damaged");
    let p = dir.path("d.qcow2");
    let f = p.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &f, "10M"]);
    for n in ["b0", "b1", "b2"] {
        qemu_img(&["bitmap", "--add", &f, n]);
    }
    qemu_io(&p, &["write 0 64k"]);
    let good = std::fs::read(&p).unwrap();
    let e = (0..good.len())
        .find(|&i| be32(&good, i) == 0x2385_2875)
        .unwrap()
        + 8;
    let dir_off = be64(&good, e + 16) as usize;
    let table = find(&decode(&good), "b0").table_offset as usize;
    let cases: &[(&str, usize, &[u8])] = &[
        ("granularity", dir_off + 17, &[8]),
        ("granularity too big", dir_off + 17, &[32]),
        ("table unaligned", dir_off + 6, &[0x01]),
        ("table size", dir_off + 11, &[2]),
        ("table size 0", dir_off + 11, &[0]),
        ("type", dir_off + 16, &[2]),
        ("flags", dir_off + 15, &[4]),
        ("extra data", dir_off + 23, &[8]),
        ("name size 0", dir_off + 19, &[0]),
        ("duplicate", dir_off + 32 + 24, b"b0"),
        ("nb_bitmaps", e + 3, &[4]),
        ("nb_bitmaps low", e + 3, &[2]),
        ("nb_bitmaps 0", e + 3, &[0]),
        ("reserved", e + 7, &[1]),
        ("directory size", e + 15, &[0x58]),
        ("directory size 0", e + 15, &[0]),
        ("directory too big", e + 12, &[4]),
        ("directory unaligned", e + 22, &[1]),
        ("extension length", e - 1, &[16]),
        ("table entry reserved", table, &[1]),
        ("table entry unaligned", table + 6, &[1]),
    ];
    for (what, off, bytes) in cases {
        let mut b = good.clone();
        b[*off..*off + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&p, &b).unwrap();
        for ro in [true, false] {
            let mut cmds = vec!["read 0 1"];
            let (q, o) = if ro {
                let a = ["-r", "-c", "read 0 1", &f];
                (
                    run("qemu-io", &a),
                    run(BIN, &[&["io"][..], &a[..]].concat()),
                )
            } else {
                cmds.push("write 0 1");
                (io("qemu-io", &p, &cmds), io(BIN, &p, &cmds))
            };
            let norm = |s: &str| {
                s.replace("qemu-io: ", "PROG: ")
                    .replace("oxqcow: ", "PROG: ")
            };
            assert_eq!(norm(&o.2), norm(&q.2), "{what} (read-only: {ro})");
            assert_eq!(o.0, q.0, "{what}");
            assert!(!q.2.is_empty(), "{what}: QEMU accepted it");
            std::fs::write(&p, &b).unwrap();
        }
    }
}

#[test]
fn downgrade_with_bitmaps_is_refused() {
    let dir = Scratch::new("bitmaps-amend");
    let p = qemu_image(&dir, "a.qcow2");
    let before = std::fs::read(&p).unwrap();
    let strip = |l: Vec<Found>| {
        l.into_iter()
            .map(|b| (b.name, b.flags, b.granularity, b.bits))
            .collect::<Vec<_>>()
    };
    let (code, _, err) = run(
        BIN,
        &["amend", "-o", "compat=0.10", &p.display().to_string()],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("Cannot downgrade an image with persistent dirty bitmaps"),
        "{err}"
    );
    let after = std::fs::read(&p).unwrap();
    assert_eq!(be32(&after, 4), 3);
    assert!(strip(decode(&after)) == strip(decode(&before)));
    // Other amendments keep the bitmaps.
    let o = run(
        BIN,
        &["amend", "-o", "lazy_refcounts=on", &p.display().to_string()],
    );
    assert_eq!(o.0, 0, "{o:?}");
    assert_clean(&p);
    assert!(strip(decode_file(&p)) == strip(decode(&before)));
}

// ---- crashes -------------------------------------------------------------------------

/// Cuts the power at every event of a read-write session over an image
/// with bitmaps. Every state must open; a bitmap not marked in use must
/// hold a bit for every granule whose guest data changed (the enabled
/// one) or its old bits exactly (the disabled one).
fn crash_sweep(tag: &str, img: Vec<u8>) {
    let dir = Scratch::new(&format!("bitmaps-crash-{tag}"));
    let path = dir.path("c.qcow2");
    let before = decode(&img);
    let img_before = img.clone();
    let original = guest_of(img.clone());
    let storage = Arc::new(CrashStorage::from_bytes(img));
    let s: Arc<dyn Storage> = storage.clone();
    let q = Qcow2::open_storage(
        s,
        &path,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    q.write_at(&[0xaa; 4096], 64 * K + 100).unwrap();
    q.write_zeroes(M, 128 * K, true).unwrap();
    q.flush().unwrap();
    q.write_at(&[0xbb; 70 * 1024], 3 * M - 5).unwrap();
    q.discard(0, 64 * K).unwrap();
    q.close().unwrap();
    drop(q);
    let n = storage.trace_len();
    // The header changes in its directory offset only: one sector.
    let final_bytes = storage.bytes();
    let changed: Vec<usize> = (0..4096)
        .filter(|&i| final_bytes[i] != img_before[i])
        .collect();
    assert!(
        changed.iter().all(|&i| i / 512 == changed[0] / 512),
        "{tag}: header bytes changed in several sectors: {changed:?}"
    );

    let (mut in_use, mut clean_new, mut states) = (0, 0, 0);
    let mut replay = storage.replay();
    for cut in 0..=n {
        replay.seek(cut);
        let mut specs = vec![CrashSpec::all(), CrashSpec::none()];
        if replay.pending() > 0 {
            specs.push(CrashSpec::torn(cut as u64 * 7919));
            specs.push(CrashSpec::random(cut as u64 * 104729));
        }
        for spec in specs {
            states += 1;
            let image = replay.image(&spec);
            let found = decode(&image);
            let guest = guest_of(image.clone());
            let ctx = format!("{tag}: cut {cut}/{n} {spec:?}");
            assert_eq!(found.len(), before.len(), "{ctx}: bitmaps lost");
            let a = find(&found, "a");
            let changed: BTreeSet<u64> = (0..guest.len() / 65536)
                .filter(|&g| guest[g * 65536..][..65536] != original[g * 65536..][..65536])
                .map(|g| g as u64)
                .collect();
            if a.in_use() {
                in_use += 1;
            } else {
                assert!(
                    changed.is_subset(&a.granules()),
                    "{ctx}: consistent bitmap misses changed granules {:?}",
                    changed.difference(&a.granules()).collect::<Vec<_>>()
                );
                if a.granules() != find(&before, "a").granules() {
                    clean_new += 1;
                }
            }
            let d = find(&found, "d");
            if !d.in_use() {
                assert_eq!(
                    d.bits,
                    find(&before, "d").bits,
                    "{ctx}: disabled bitmap changed"
                );
            }
            // QEMU checks a sample (and the final image).
            if cut % 8 == 0 || cut == n {
                std::fs::write(&path, &image).unwrap();
                let f = path.display().to_string();
                let (code, o, e) = run("qemu-img", &["check", &f]);
                assert!(
                    code == 0 || code == 3,
                    "{ctx}: qemu-img check {code}: {o}{e}"
                );
                let (code, o, e) = run("qemu-img", &["info", &f]);
                assert_eq!(code, 0, "{ctx}: {o}{e}");
            }
        }
    }
    assert!(
        in_use > 0 && clean_new > 0,
        "{tag}: {in_use} in use, {clean_new} complete of {states}"
    );
    let fin = decode(&storage.bytes());
    assert!(!find(&fin, "a").in_use() && !find(&fin, "d").in_use());
}

/// The guest view of an image in memory (read-only open, no repair).
fn guest_of(img: Vec<u8>) -> Vec<u8> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(img));
    let q = Qcow2::open_storage(s, Path::new("crashed.qcow2"), &OpenOptions::default())
        .expect("a crashed image opens");
    let mut buf = vec![0u8; q.size() as usize];
    q.read_at(&mut buf, 0).unwrap();
    buf
}

fn crash_base(dir: &Scratch, cluster: &str) -> Vec<u8> {
    let p = dir.path("base.qcow2");
    let f = p.display().to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster}"),
        &f,
        "4M",
    ]);
    qemu_io(&p, &["write -P 1 0 1M"]);
    qemu_img(&["bitmap", "--add", "-g", "64k", &f, "a"]);
    qemu_img(&["bitmap", "--add", "-g", "64k", &f, "d"]);
    qemu_io(&p, &["write -P 2 2M 64k"]);
    qemu_img(&["bitmap", "--disable", &f, "d"]);
    std::fs::read(&p).unwrap()
}

#[test]
fn a_crash_leaves_bitmaps_in_use_or_complete() {
    let dir = Scratch::new("bitmaps-crash-base");
    crash_sweep("plain", crash_base(&dir, "64k"));
}

#[test]
fn a_crash_with_the_extension_across_a_sector_boundary_is_safe() {
    // Unknown header fields push the bitmaps extension across a sector
    // boundary (4 KiB clusters: no feature table). The directory offset,
    // the only field a session changes, stays inside one sector.
    let dir = Scratch::new("bitmaps-crash-straddle");
    let mut img = crash_base(&dir, "4k");
    let mut h = oxqcow::format::Header::parse(&img).unwrap();
    h.unknown_header_fields = vec![0; 376];
    let enc = h.encode().unwrap();
    img[..enc.len()].copy_from_slice(&enc);
    let ext = (0..4096).find(|&i| be32(&img, i) == 0x2385_2875).unwrap() + 8;
    assert!(
        ext / 512 != (ext + 23) / 512,
        "extension data at {ext} does not straddle"
    );
    crash_sweep("straddle", img);
}
