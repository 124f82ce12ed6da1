//! The engine behind blkdebug: errors injected at the engine's own events
//! (L2 table write-back, L1 update, refcount block write-back, data write)
//! fail the request they hit and leave an image QEMU's `qemu-img check`
//! accepts (leaked clusters at most, as QEMU leaves them; never a
//! corruption), whose acknowledged data survives once the error is gone.
//! Also `json:` backing files with blkdebug inside.

mod common;
use common::*;
use oxqcow::storage::blkdebug::{Action, IoType, Rule};
use oxqcow::storage::{Blkdebug, BlkdebugStorage, DebugEvent, FileStorage, Storage};
use oxqcow::{OpenOptions, Qcow2};
use std::path::Path;
use std::sync::Arc;

fn inject(event: DebugEvent, state: i64, once: bool) -> Rule {
    Rule {
        event,
        state,
        action: Action::InjectError {
            errno: libc::EIO,
            once,
            offset: None,
            iotypes: IoType::default_mask(),
        },
    }
}

fn set_state(event: DebugEvent, to: i64) -> Rule {
    Rule {
        event,
        state: 0,
        action: Action::SetState(to),
    }
}

fn open(path: &Path, rules: Vec<Rule>, writethrough: bool) -> (Qcow2, Arc<Blkdebug>) {
    let dbg = Arc::new(Blkdebug::new(rules));
    let f = FileStorage::open(path, true, false).unwrap();
    let s: Arc<dyn Storage> = Arc::new(BlkdebugStorage::new(Arc::new(f), dbg.clone()));
    let o = OpenOptions {
        writable: true,
        writethrough,
        ..Default::default()
    };
    (Qcow2::open_storage(s, path, &o).unwrap(), dbg)
}

/// `qemu-img check`: (exit code, report). 0 clean, 3 leaks only.
fn check(path: &Path) -> (i32, String) {
    let p = path.display().to_string();
    let (code, out, err) = run("qemu-img", &["check", "-f", "qcow2", &p]);
    (code, format!("{out}{err}"))
}

fn assert_no_corruption(path: &Path) -> i32 {
    let (code, report) = check(path);
    assert!(code == 0 || code == 3, "qemu-img check: {report}");
    assert!(!report.contains("ERROR"), "{report}");
    code
}

fn pattern(b: u8, n: usize) -> Vec<u8> {
    vec![b; n]
}

fn read(q: &Qcow2, off: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    q.read_at(&mut b, off).unwrap();
    b
}

#[test]
fn a_failed_l2_write_back_leaks_like_qemu_and_corrupts_nothing() {
    let d = Scratch::new("bd-l2");
    let img = d.path("t.qcow2");
    for lazy in ["off", "on"] {
        create(&img, &format!("lazy_refcounts={lazy}"), 64 << 20);
        // The first L1 update (the new L2 table's) moves to state 2, where
        // every L2 write-back arms an error that stays armed: the flush of
        // the two writes fails, as QEMU's does in the same setting.
        let rules = vec![
            inject(DebugEvent::L2Update, 2, false),
            set_state(DebugEvent::L1Update, 2),
        ];
        let (q, dbg) = open(&img, rules, false);
        q.write_at(&pattern(1, 65536), 0).unwrap();
        q.write_at(&pattern(2, 65536), 1 << 20).unwrap();
        assert_eq!(dbg.state(), 2);
        let e = q.flush().unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        // Every request fails now, as in QEMU.
        assert!(q.write_at(&pattern(3, 65536), 2 << 20).is_err());
        let (tables, refblocks) = q.close_caches();
        assert!(tables.is_err() && refblocks.is_err());
        drop(q);
        // No L2 entry reached the disk: the two data clusters leak (QEMU's
        // check finds the same two), and repairing them leaves a clean
        // image that reads zeros there.
        let code = assert_no_corruption(&img);
        if lazy == "off" {
            assert_eq!(code, 3, "{}", check(&img).1);
            assert!(
                check(&img).1.contains("2 leaked clusters"),
                "{}",
                check(&img).1
            );
        }
        let p = img.display().to_string();
        run("qemu-img", &["check", "-r", "all", "-f", "qcow2", &p]);
        assert_clean(&img);
        let q = Qcow2::open(&img, &OpenOptions::default()).unwrap();
        assert_eq!(read(&q, 0, 65536), pattern(0, 65536));
    }
}

#[test]
fn a_failed_write_back_is_retried_and_nothing_acknowledged_is_lost() {
    let d = Scratch::new("bd-retry");
    let img = d.path("t.qcow2");
    for (event, what) in [
        (DebugEvent::L2Update, "L2 table"),
        (DebugEvent::RefblockUpdatePart, "refcount block"),
        (DebugEvent::FlushToDisk, "flush"),
    ] {
        create(&img, "lazy_refcounts=off", 64 << 20);
        // Armed once, by the flush's own events (state 2 from the first
        // flush_to_os on): one write-back fails, the next flush redoes it.
        let rules = vec![inject(event, 2, true), set_state(DebugEvent::FlushToOs, 2)];
        let (q, _) = open(&img, rules, false);
        q.write_at(&pattern(1, 65536), 0).unwrap();
        q.write_at(&pattern(2, 4096), 70000).unwrap();
        let first = q.flush();
        q.flush()
            .unwrap_or_else(|e| panic!("{what}: second flush: {e}"));
        q.close().unwrap();
        drop(q);
        assert!(first.is_err(), "{what}: the first flush should fail");
        assert_clean(&img);
        let q = Qcow2::open(&img, &OpenOptions::default()).unwrap();
        assert_eq!(read(&q, 0, 65536), pattern(1, 65536), "{what}");
        assert_eq!(read(&q, 70000, 4096), pattern(2, 4096), "{what}");
    }
}

#[test]
fn failed_metadata_writes_during_allocation_fail_the_write_only() {
    let d = Scratch::new("bd-alloc");
    let img = d.path("t.qcow2");
    for event in [
        DebugEvent::L2AllocWrite,
        DebugEvent::L1Update,
        DebugEvent::ClusterAlloc,
        DebugEvent::WriteAio,
        DebugEvent::RefblockUpdatePart,
    ] {
        for writethrough in [true, false] {
            create(&img, "", 64 << 20);
            let (q, _) = open(&img, vec![inject(event, 0, true)], writethrough);
            let first = q.write_at(&pattern(1, 65536), 0).and_then(|_| q.flush());
            assert!(first.is_err(), "{event:?} should fail the first write");
            q.write_at(&pattern(2, 65536), 65536).unwrap();
            q.close().unwrap();
            drop(q);
            // The failed write's clusters are given back (or leak).
            assert_no_corruption(&img);
            let q = Qcow2::open(&img, &OpenOptions::default()).unwrap();
            assert_eq!(read(&q, 65536, 65536), pattern(2, 65536), "{event:?}");
        }
    }
}

#[test]
fn injected_read_errors_reach_the_reader() {
    let d = Scratch::new("bd-read");
    let img = d.path("t.qcow2");
    create(&img, "", 1 << 20);
    qemu_io(&img, &["write -P 7 0 64k"]);
    // As iotest 089: an error on the first L2 table load.
    let (q, _) = open(&img, vec![inject(DebugEvent::L2Load, 0, false)], true);
    let mut b = vec![0u8; 512];
    let e = q.read_at(&mut b, 0).unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    // Nothing was written: closing syncs nothing and fails nothing.
    q.close().unwrap();
    drop(q);
    assert_clean(&img);
}

#[test]
fn json_backing_file_behind_blkdebug() {
    let d = Scratch::new("bd-json");
    let base = d.path("base.qcow2");
    let top = d.path("top.qcow2");
    create(&base, "", 1 << 20);
    qemu_io(&base, &["write -P 5 0 64k", "write -P 6 128k 64k"]);
    let b = base.display().to_string();
    for (rules, want_err) in [
        ("", false),
        (
            ", 'inject-error': [{'event': 'read_aio', 'once': true}]",
            true,
        ),
    ] {
        let json = format!(
            "json:{{'driver': 'qcow2', 'file': {{'driver': 'blkdebug'{rules}, \
             'image': {{'driver': 'file', 'filename': '{b}'}}}}}}"
        );
        let t = top.display().to_string();
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &json, &t,
        ]);
        let q = Qcow2::open(&top, &OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 65536];
        let r = q.read_at(&mut buf, 0);
        assert_eq!(r.is_err(), want_err, "{json}: {r:?}");
        // once: the next read goes through.
        q.read_at(&mut buf, 128 << 10).unwrap();
        assert_eq!(buf, pattern(6, 65536));
        if !want_err {
            q.read_at(&mut buf, 0).unwrap();
            assert_eq!(buf, pattern(5, 65536));
        }
    }
}

/// blkdebug's refblock_alloc fires whenever a refcount update reaches a
/// refcount block, allocated or not, as QEMU raises it: a rule on it fails
/// an ordinary allocating write (iotest 026), with qemu-io's texts, and
/// leaves a consistent image. refblock_load rules fail it too (raised by
/// the update, not by the allocator's search). With once=off the failed
/// request leaves the file's flush failing, so closing reports both cache
/// flushes as qemu-io does, even with nothing dirty (stderr compared).
#[test]
fn refblock_rules_fail_allocating_writes_as_in_qemu_io() {
    let d = Scratch::new("blkdebug-refblock-alloc");
    for event in ["refblock_alloc", "refblock_load"] {
        for once in ["on", "off"] {
            let conf = d.path("bd.conf");
            std::fs::write(
                &conf,
                format!("[inject-error]\nevent = \"{event}\"\nerrno = \"5\"\nimmediately = \"off\"\nonce = \"{once}\"\n"),
            )
            .unwrap();
            let mut outs = Vec::new();
            for ours in [false, true] {
                let img = d.path(if ours { "o.qcow2" } else { "q.qcow2" });
                create_qcow2(&img, "1G", &["-o", "cluster_size=1024"]);
                let spec = format!("blkdebug:{}:{}", s(&conf), s(&img));
                let (code, out, err) = if ours {
                    ox(&["io", "-c", "write 0 512", &spec])
                } else {
                    run("qemu-io", &["-c", "write 0 512", &spec])
                };
                assert!(
                    out.contains("write failed: Input/output error"),
                    "{event} once={once} ours={ours}: {out}"
                );
                assert_eq!(
                    err.contains("Failed to flush the L2 table cache"),
                    once == "off",
                    "{event} once={once} ours={ours}: {err}"
                );
                assert_no_corruption(&img);
                // Named as the program that prints them.
                outs.push((code, out, err.replace("oxqcow: ", "qemu-io: ")));
            }
            assert_eq!(
                outs[0], outs[1],
                "{event} once={once}: (qemu-io, oxqcow io)"
            );
        }
    }
}

/// Closing flushes the whole node first, silently, as QEMU's close does
/// before its reported cache flushes: with cache=none (writeback) a
/// `once=on` rule on `l2_update` is spent there and nothing is reported,
/// while a `once=off` rule fails the reported flushes too (iotest 026's
/// nocache output). Output compared with qemu-io, image checked.
#[test]
fn close_flushes_silently_first_as_qemu_io() {
    let d = Scratch::new("blkdebug-close-flush");
    for once in ["on", "off"] {
        let conf = d.path("bd.conf");
        std::fs::write(
            &conf,
            format!("[inject-error]\nevent = \"l2_update\"\nerrno = \"5\"\nimmediately = \"off\"\nonce = \"{once}\"\n"),
        )
        .unwrap();
        let mut outs = Vec::new();
        for ours in [false, true] {
            let img = d.path(if ours { "o.qcow2" } else { "q.qcow2" });
            create_qcow2(&img, "1G", &[]);
            let spec = format!("blkdebug:{}:{}", s(&conf), s(&img));
            let io = |target: &str, cmd: &str| {
                let args = ["-t", "none", "-f", "qcow2", "-c", cmd, target];
                if ours {
                    let mut a = vec!["io"];
                    a.extend(args);
                    ox(&a)
                } else {
                    run("qemu-io", &args)
                }
            };
            // A first write allocates the L2 table, so the rule catches a
            // plain L2 update.
            assert_eq!(io(&s(&img), "write 0 512").0, 0);
            let (code, out, err) = io(&spec, "write 0 128k");
            assert_no_corruption(&img);
            let out = out.lines().next().unwrap_or_default().to_string();
            outs.push((code, out, err.replace("oxqcow: ", "qemu-io: ")));
        }
        assert_eq!(outs[0], outs[1], "once={once}: (qemu-io, oxqcow io)");
        assert_eq!(
            outs[1].2.contains("Failed to flush the L2 table cache"),
            once == "off",
            "once={once}: {:?}",
            outs[1]
        );
    }
}
