//! A qcow2 image on a `quorum` node (`json:{'driver': 'qcow2', 'file':
//! {'driver': 'quorum', ...}}`) through `oxqcow info` and `oxqcow io`,
//! against qemu-img and qemu-io on copies of the same files: the same
//! report (the node names apart, which QEMU rebuilds in its hash order),
//! the same reads and writes under each vote threshold, the same
//! refusals (a backing file cannot be found from a quorum node, bad
//! options), and children that QEMU's check finds clean afterwards.

mod common;
use common::case::*;
use common::*;

fn spec(threshold: &str, extra: &str, files: &[&str]) -> String {
    let children: Vec<String> = files
        .iter()
        .map(|f| format!("{{'driver': 'file', 'filename': '{f}'}}"))
        .collect();
    format!(
        "json:{{'driver': 'qcow2', 'file': {{'driver': 'quorum', {threshold}{extra}'children': [{}]}}}}",
        children.join(", ")
    )
}

/// Lines naming the quorum node by a json: name left out.
fn without_names(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains("json:"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn info_on_a_quorum_node_like_qemu_img() {
    let d = Scratch::new("quorum-info");
    let c = Case::new(&d);
    c.qcow2("base.qcow2", "1M", &[]);
    c.qcow2("a.qcow2", "1M", &["-b", "base.qcow2", "-F", "qcow2"]);
    std::fs::copy(c.setup.join("a.qcow2"), c.setup.join("a.copy")).unwrap();
    let s = spec("'vote-threshold': 1, ", "", &["a.qcow2", "a.copy"]);
    for out in ["--output=human", "--output=json"] {
        let q = run_in(&c.setup, "qemu-img", &["info", out, &s]);
        let o = run_in(&c.setup, BIN, &["info", out, &s]);
        assert_eq!((q.0, o.0), (0, 0), "{}{}", q.2, o.2);
        assert_eq!(without_names(&q.1), without_names(&o.1), "{out}");
    }
    let o = ok_in(&c.setup, BIN, &["info", &s]);
    assert!(o.contains("backing file: base.qcow2 (cannot determine actual path)"));
    // Opening the backing chain is refused, as QEMU refuses it.
    let q = run_in(&c.setup, "qemu-io", &["-c", "read 0 512", &s]);
    let o = run_in(&c.setup, BIN, &["io", "-c", "read 0 512", &s]);
    let tail = |t: &str| {
        t.split_once(": ")
            .map(|x| x.1.to_string())
            .unwrap_or_default()
    };
    assert_eq!((q.0, tail(&q.2)), (o.0, tail(&o.2)));
    assert!(o
        .2
        .contains("Cannot generate a base directory for quorum nodes"));
    // Option errors, in QEMU's words.
    c.all_fail(
        "info",
        &[
            &[&spec("", "", &["a.qcow2", "a.copy"])],
            &[&spec("'vote-threshold': 0, ", "", &["a.qcow2"])],
            &[&spec("'vote-threshold': 3, ", "", &["a.qcow2", "a.copy"])],
            &[&spec(
                "'vote-threshold': 1, ",
                "'read-pattern': 'bogus', ",
                &["a.qcow2"],
            )],
            &[&spec("'vote-threshold': 1, ", "'foo': 1, ", &["a.qcow2"])],
            &[&spec("'vote-threshold': 1, ", "", &[])],
            &[&spec("'vote-threshold': 1, ", "", &["nonexist"])],
        ],
    );
}

#[test]
fn reads_vote_and_writes_reach_every_child() {
    let d = Scratch::new("quorum-io");
    let c = Case::new(&d);
    c.qcow2("x.qcow2", "1M", &[]);
    qemu_io_in(&c.setup, "x.qcow2", &["write -P 5 0 64k"]);
    std::fs::copy(c.setup.join("x.qcow2"), c.setup.join("y.qcow2")).unwrap();
    std::fs::copy(c.setup.join("x.qcow2"), c.setup.join("z.qcow2")).unwrap();
    // One child's first guest sector differs (same layout, other data).
    qemu_io_in(&c.setup, "y.qcow2", &["write -P 6 0 512"]);
    for (th, pattern) in [("1", "fifo"), ("1", "quorum"), ("2", "quorum")] {
        let s = spec(
            &format!("'vote-threshold': {th}, "),
            &format!("'read-pattern': '{pattern}', "),
            &["x.qcow2", "y.qcow2", "z.qcow2"],
        );
        let cmds = [
            "-c",
            "read -P 5 0 512",
            "-c",
            "read -P 5 512 512",
            "-c",
            "write -P 7 4k 4k",
            "-c",
            "read -P 7 4k 4k",
            &s,
        ];
        let mut dirs = Vec::new();
        for (prog, sub) in [("qemu-io", None), (BIN, Some("io"))] {
            let dir = d.path(&format!("{th}-{pattern}-{}", sub.unwrap_or("q")));
            copy_dir(&c.setup, &dir);
            let mut args: Vec<&str> = sub.into_iter().collect();
            args.extend_from_slice(&cmds);
            let (code, out, err) = run_in(&dir, prog, &args);
            let out: Vec<&str> = out.lines().filter(|l| !l.contains("ops;")).collect();
            dirs.push((dir, code, out.join("\n"), err));
        }
        let (q, o) = (&dirs[0], &dirs[1]);
        assert_eq!(
            (q.1, &q.2),
            (o.1, &o.2),
            "threshold {th} {pattern}: {} / {}",
            q.3,
            o.3
        );
        for f in ["x.qcow2", "y.qcow2", "z.qcow2"] {
            assert!(
                std::fs::read(q.0.join(f)).unwrap() == std::fs::read(o.0.join(f)).unwrap(),
                "{f} after threshold {th} {pattern} differs from qemu-io's"
            );
            assert_clean(&o.0.join(f));
        }
    }
}
