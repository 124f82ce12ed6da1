//! Damaged snapshot tables and snapshot entries, as QEMU's iotest 080
//! pokes them: each case runs through QEMU (qemu-io / qemu-img) and through
//! `oxqcow io` / `oxqcow` on copies of one image, and both must print the
//! same and, where QEMU leaves the image alone, leave it alone too.
//!
//! What QEMU checks at open (the table's count and offset) refuses the
//! image; a snapshot's L1 table is checked only where it is used (a
//! temporary load, apply, delete, the v2 downgrade, `check`, and with
//! `overlap-check.inactive-l2` every write), so such an image still opens
//! for guest I/O.

mod common;
use common::case::{run_in, BIN};
use common::*;
use std::path::Path;

/// Writes `bytes` at `off` of `file`.
fn poke(file: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// What may differ between the tools' texts: the program name and timing.
fn mask(s: &str) -> String {
    s.lines()
        .map(|l| {
            let l = l
                .replace("qemu-io: ", "PROG: ")
                .replace("qemu-img: ", "PROG: ")
                .replace("oxqcow: ", "PROG: ");
            match l.find(" ops; ") {
                Some(i) => format!("{} ops; T", &l[..i]),
                None => l,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Two directories holding a copy each of one image `t.qcow2`: `q` for
/// QEMU, `o` for oxqcow.
struct Pair {
    _d: Scratch,
    q: std::path::PathBuf,
    o: std::path::PathBuf,
}

impl Pair {
    fn new(tag: &str, base: &Path) -> Pair {
        let d = Scratch::new(tag);
        let (q, o) = (d.path("q"), d.path("o"));
        for dir in [&q, &o] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::copy(base, dir.join("t.qcow2")).unwrap();
        }
        Pair { _d: d, q, o }
    }

    fn bytes(&self, ours: bool) -> Vec<u8> {
        std::fs::read(if ours { &self.o } else { &self.q }.join("t.qcow2")).unwrap()
    }

    /// qemu-io and `oxqcow io` with these arguments (`t.qcow2` names the
    /// image): the same status and texts (stdout then stderr).
    fn io(&self, args: &[&str]) -> String {
        let q = run_in(&self.q, "qemu-io", args);
        let mut a = vec!["io"];
        a.extend_from_slice(args);
        let o = run_in(&self.o, BIN, &a);
        self.same(args, q, o)
    }

    /// qemu-img and `oxqcow` with these arguments.
    fn img(&self, args: &[&str]) -> String {
        let q = run_in(&self.q, "qemu-img", args);
        let o = run_in(&self.o, BIN, args);
        self.same(args, q, o)
    }

    fn same(&self, args: &[&str], q: (i32, String, String), o: (i32, String, String)) -> String {
        let (qt, ot) = (mask(&(q.1 + &q.2)), mask(&(o.1 + &o.2)));
        assert_eq!(qt, ot, "{args:?}: QEMU's text, then ours");
        assert_eq!(q.0, o.0, "{args:?}: exit status");
        qt
    }
}

fn fresh_image(dir: &Scratch) -> std::path::PathBuf {
    let p = dir.path("base.qcow2");
    create_qcow2(&p, "64M", &[]);
    p
}

/// The snapshot table's count and offset, checked at open as QEMU does:
/// refused with QEMU's messages (the offset is checked even with no
/// snapshot), or opened with the entries QEMU reads (zeros past the end of
/// the file). Nothing is written either way.
#[test]
fn snapshot_table_header_fields_as_qemu() {
    let d = Scratch::new("snaptable");
    let base = fresh_image(&d);
    let pristine = std::fs::read(&base).unwrap();
    // (snapshots_offset, nb_snapshots, QEMU's message or "" when it opens)
    let cases: &[(u64, u32, &str)] = &[
        (0x10000, 0xffff_ffff, "Snapshot table too large"),
        (0x10000, 0x7fff_ffff, "Snapshot table too large"),
        (
            0xffff_ffff_ffff_0000,
            0xffff,
            "Snapshot table offset invalid",
        ),
        (0x1234_5678_90ab_cdef, 0, "Snapshot table offset invalid"),
        (0x200, 0, "Snapshot table offset invalid"),
        (0x7fff_ffff_ffff_0000, 0, ""),
        // Past the end of the file: empty entries.
        (0x100_0000, 0x10000, ""),
        (0x10_0000, 1, ""),
        // The last offset QEMU's block layer reads, and the first it does not.
        (0x7fff_ffff_bfff_0000, 1, ""),
        (0x7fff_ffff_c000_0000, 1, "Failed to read snapshot table"),
    ];
    for &(off, nb, want) in cases {
        std::fs::write(&base, &pristine).unwrap();
        poke(&base, 64, &off.to_be_bytes());
        poke(&base, 60, &nb.to_be_bytes());
        let p = Pair::new("snaptable-case", &base);
        let out = p.io(&["-c", "read 0 512", "t.qcow2"]);
        if want.is_empty() {
            assert!(out.contains("read 512/512 bytes"), "{off:#x}/{nb}: {out}");
        } else {
            assert!(out.contains(want), "{off:#x}/{nb}: {out}");
        }
        let mine = std::fs::read(p.o.join("t.qcow2")).unwrap();
        assert!(
            mine == std::fs::read(&base).unwrap(),
            "{off:#x}/{nb}: a read changed the file"
        );
    }
}

/// 080's "Hitting snapshot table size limit": 65536 entries past the end
/// of the file open (all empty), a new snapshot is refused with EFBIG
/// before anything is allocated, and guest I/O works.
#[test]
fn full_snapshot_table_refuses_a_new_snapshot_untouched() {
    let d = Scratch::new("snapfull");
    let base = fresh_image(&d);
    poke(&base, 64, &0x100_0000u64.to_be_bytes());
    poke(&base, 60, &0x10000u32.to_be_bytes());
    let p = Pair::new("snapfull-pair", &base);
    let out = p.img(&["snapshot", "-c", "test", "t.qcow2"]);
    assert_eq!(
        out,
        "PROG: Could not create snapshot 'test': File too large"
    );
    assert!(
        p.bytes(true) == std::fs::read(&base).unwrap(),
        "the refused snapshot changed the file"
    );
    p.io(&["-c", "read -P 0 0 512", "t.qcow2"]);
    p.img(&["snapshot", "-l", "t.qcow2"]);

    let img = oxqcow::Image::open(&base, None, &oxqcow::OpenOptions::default()).unwrap();
    let q = img.qcow2().unwrap();
    let list = q.snapshots();
    assert_eq!(list.len(), 0x10000);
    assert!(list.iter().all(|s| s.id.is_empty() && s.l1_size == 0));
}

/// An image as 080 damages a snapshot entry: one write, snapshot `test`,
/// then its L1 table offset (`off`) or size (`size`) poked.
fn damaged_entry(dir: &Scratch, what: &str) -> std::path::PathBuf {
    let p = fresh_image(dir);
    qemu_io(&p, &["write 0 512"]);
    qemu_img(&["snapshot", "-c", "test", &s(&p)]);
    // qemu-img puts the first snapshot table at 0x70000.
    match what {
        "off" => poke(&p, 0x70000, &0x40_0200u64.to_be_bytes()),
        _ => poke(&p, 0x70008, &0x1000_0000u32.to_be_bytes()),
    }
    p
}

/// 080's "Invalid snapshot L1 table offset / size", step by step with both
/// tools on their own copy: the temporary load, the downgrade, a write
/// under `overlap-check.inactive-l2=on` (fails, file untouched, the close
/// reports the refcount cache), apply, delete, and `qemu-img check`.
#[test]
fn damaged_snapshot_l1_table_is_checked_where_used() {
    for (what, text, errno) in [
        (
            "off",
            "Snapshot L1 table offset invalid",
            "Invalid argument",
        ),
        ("size", "Snapshot L1 table too large", "File too large"),
    ] {
        let d = Scratch::new(&format!("snapl1-{what}"));
        let base = damaged_entry(&d, what);
        let p = Pair::new(&format!("snapl1-{what}-pair"), &base);
        let out = p.img(&["convert", "-l", "test", "t.qcow2", "t.snap"]);
        assert_eq!(out, format!("PROG: Failed to load snapshot: {text}"));
        let out = p.img(&["amend", "-o", "compat=0.10", "t.qcow2"]);
        assert_eq!(
            out,
            format!("PROG: {text}\nPROG: Failed to turn zero into data clusters: {errno}")
        );
        let before = p.bytes(true);
        let out = p.io(&[
            "-c",
            "open -o overlap-check.inactive-l2=on t.qcow2",
            "-c",
            "write 0 4k",
        ]);
        assert!(out.contains(&format!("write failed: {errno}")), "{out}");
        assert!(
            out.contains(&format!(
                "Failed to flush the refcount block cache: {errno}"
            )),
            "{out}"
        );
        assert!(
            p.bytes(true) == before,
            "the refused write changed the file"
        );
        assert!(p.bytes(false) == before, "QEMU's copy differs");
        let out = p.img(&["snapshot", "-a", "test", "t.qcow2"]);
        assert_eq!(
            out,
            format!("PROG: {text}\nPROG: Could not apply snapshot 'test': Failed to load snapshot: {errno}")
        );
        let out = p.img(&["snapshot", "-d", "test", "t.qcow2"]);
        assert_eq!(
            out,
            format!("PROG: Could not delete snapshot 'test': {text}")
        );
        assert!(
            p.bytes(true) == before,
            "refused apply/delete changed the file"
        );
        // Our check and QEMU's say the same about the image.
        let out = p.img(&["check", "t.qcow2"]);
        assert!(out.contains("snapshot table entry corrupted"), "{out}");
        assert!(
            out.contains("Leaked cluster 6 refcount=1 reference=0"),
            "{out}"
        );
    }
}

/// The damaged entry does not stop guest I/O, with QEMU's default overlap
/// checks or `overlap-check=all`, or reads with any.
#[test]
fn damaged_snapshot_l1_table_and_guest_io() {
    for what in ["off", "size"] {
        let d = Scratch::new(&format!("snapio-{what}"));
        let base = damaged_entry(&d, what);
        for (open, cmd) in [
            ("", "read -P 0 4k 4k"),
            ("overlap-check.inactive-l2=on", "read 0 4k"),
            ("overlap-check=all", "write 0 4k"),
            (
                "overlap-check=all,overlap-check.inactive-l2=off",
                "write 2M 4k",
            ),
            ("overlap-check.inactive-l2=on", "write 2M 4k"),
            ("overlap-check.inactive-l2=on", "write -z 0 64k"),
            ("", "write 0 4k"),
        ] {
            let p = Pair::new(&format!("snapio-{what}-pair"), &base);
            let o = format!("open -o {open} t.qcow2");
            let args: Vec<&str> = if open.is_empty() {
                vec!["-c", cmd, "t.qcow2"]
            } else {
                vec!["-c", &o, "-c", cmd]
            };
            p.io(&args);
            if cmd.starts_with("read") {
                assert!(p.bytes(true) == std::fs::read(&base).unwrap());
            }
        }
    }
}

/// With `overlap-check.inactive-l2` on, guest data may not land on an L2
/// table only a snapshot uses (QEMU's words; the image is marked corrupt);
/// with it off (QEMU's default) the write goes through, as in QEMU.
#[test]
fn inactive_l2_tables_are_protected_on_request() {
    let d = Scratch::new("inactivel2");
    let base = fresh_image(&d);
    qemu_io(&base, &["write -P 1 0 64k"]);
    qemu_img(&["snapshot", "-c", "s1", &s(&base)]);
    // The active tree gets its own L2 table; the old one is the snapshot's.
    qemu_io(&base, &["write -P 2 0 64k"]);
    let b = std::fs::read(&base).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    let active_l2 = u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    // Guest cluster 1 of the active tree mapped onto the snapshot's L2 table
    // (at 0x40000, where the first L2 table of a fresh image goes).
    assert_ne!(active_l2, 0x40000);
    poke(
        &base,
        active_l2 + 8,
        &(0x8000_0000_0004_0000u64).to_be_bytes(),
    );

    let p = Pair::new("inactivel2-on", &base);
    let out = p.io(&[
        "-c",
        "open -o overlap-check.inactive-l2=on t.qcow2",
        "-c",
        "write 64k 4k",
    ]);
    assert!(
        out.contains("Preventing invalid write on metadata (overlaps with inactive L2 table)"),
        "{out}"
    );
    let after = p.bytes(true);
    assert_eq!(&after[0x40000..0x50000], &b[0x40000..0x50000]);
    let incompat = u64::from_be_bytes(after[72..80].try_into().unwrap());
    assert_eq!(incompat & 2, 2, "corrupt bit not set");

    let p = Pair::new("inactivel2-off", &base);
    let out = p.io(&["-c", "write 64k 4k", "t.qcow2"]);
    assert!(out.contains("wrote 4096/4096"), "{out}");
}

/// QEMU's overlap-check options: the template's values, one flag per
/// check (a boolean), no other name, and the two template spellings agree.
#[test]
fn overlap_check_options_as_qemu() {
    let d = Scratch::new("olopts");
    let base = fresh_image(&d);
    let p = Pair::new("olopts-pair", &base);
    for o in [
        "overlap-check.active-l1=bogus",
        "overlap-check.foo=on",
        "overlap-check.inactive-l2=bogus",
        "overlap-check.template=bogus",
        "overlap-check=all,overlap-check.template=none",
        "overlap-check=all,overlap-check.template=all",
        "overlap-check.template=none,overlap-check.main-header=on",
    ] {
        p.io(&["-c", &format!("open -o {o} t.qcow2"), "-c", "read 0 1"]);
    }
}

/// 080's "Invalid L2 entry (huge physical offset)": a snapshot would count
/// a cluster no refcount block covers. QEMU's errnos (EFBIG where the
/// refcount table cannot grow that far, else EAGAIN), and ours leaks
/// nothing: `qemu-img check` says what it said before the attempts.
#[test]
fn snapshot_of_a_huge_l2_entry_is_refused() {
    let d = Scratch::new("hugel2");
    let base = fresh_image(&d);
    qemu_io(&base, &["write 0 512"]);
    poke(&base, 0x40000, &0xbfff_ffff_ffff_0000u64.to_be_bytes());
    let p = Pair::new("hugel2-pair", &base);
    let check = |dir: &Path| -> String {
        let (_, out, err) = run_in(dir, "qemu-img", &["check", "t.qcow2"]);
        (out + &err)
            .lines()
            .filter(|l| !l.starts_with("Image end offset"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = check(&p.o);
    let out = p.img(&["snapshot", "-c", "test", "t.qcow2"]);
    assert_eq!(
        out,
        "PROG: Could not create snapshot 'test': File too large"
    );
    assert_eq!(check(&p.o), before);
    for dir in [&p.q, &p.o] {
        poke(
            &dir.join("t.qcow2"),
            0x40000,
            &0x8000_00ff_ffff_0000u64.to_be_bytes(),
        );
    }
    let before = check(&p.o);
    let out = p.img(&["snapshot", "-c", "test", "t.qcow2"]);
    assert_eq!(
        out,
        "PROG: Could not create snapshot 'test': Resource temporarily unavailable"
    );
    assert_eq!(check(&p.o), before);
}
