//! `oxqcow` as a drop-in for qemu-img beyond the single commands that
//! tests/cli_img.rs covers: the program name in messages, images named by
//! `json:{...}` or `--image-opts` strings, `dd`, convert's backing file
//! (-B, -o backing_file) and progress line, info --backing-chain, create's
//! backing-file checks. Each case runs the same command line through
//! qemu-img and oxqcow on copies of one set of files and compares what
//! they print and leave behind.

mod common;
use common::case::*;
use common::*;

/// Runs `oxqcow` under another name, as the qemu-iotests wrapper does
/// (`exec -a qemu-img oxqcow`): a symlink named `name` in `dir`.
fn as_named(dir: &std::path::Path, name: &str, args: &[&str]) -> (i32, String, String) {
    let link = dir.join(name);
    if !link.exists() {
        std::os::unix::fs::symlink(BIN, &link).unwrap();
    }
    run_in(dir, &link.display().to_string(), args)
}

#[test]
fn messages_carry_the_program_name() {
    let d = Scratch::new("dropin-prg");
    let dir = d.path("");
    let bad = ["info", "nonexist.qcow2"];
    let (_, _, q) = run_in(&dir, "qemu-img", &bad);
    let (code, _, o) = as_named(&dir, "qemu-img", &bad);
    assert_eq!(code, 1);
    assert_eq!(q, o, "error text under the name qemu-img");
    assert!(o.starts_with("qemu-img: Could not open"), "{o}");
    let (_, _, o) = as_named(&dir, "myimg", &bad);
    assert!(o.starts_with("myimg: Could not open"), "{o}");
    // Usage errors too.
    let (code, _, o) = as_named(&dir, "qemu-img", &["info", "--bogus", "x"]);
    assert_eq!(code, 1);
    assert!(o.starts_with("qemu-img: "), "{o}");
    assert!(o.contains("Try 'qemu-img --help'"), "{o}");
}

#[test]
fn json_names_and_image_opts_open_like_qemu_img() {
    let d = Scratch::new("dropin-names");
    let c = Case::new(&d);
    c.qcow2("base.qcow2", "64M", &[]);
    c.qcow2("top.qcow2", "", &["-b", "base.qcow2", "-F", "qcow2"]);
    qemu_io_in(&c.setup, "base.qcow2", &["write -P 1 0 2M"]);
    qemu_io_in(&c.setup, "top.qcow2", &["write -P 2 1M 2M"]);
    let json = "json:{'driver':'qcow2','file':{'driver':'file','filename':'top.qcow2'}}";
    let opts = "driver=qcow2,file.driver=file,file.filename=top.qcow2";
    let blkdebug =
        "driver=blkdebug,image.driver=qcow2,image.file.driver=file,image.file.filename=top.qcow2,align=4k";
    for args in [
        &["info", json][..],
        &["info", "--output=json", json],
        &["info", "--backing-chain", "--image-opts", opts],
        &[
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=top.qcow2",
        ],
        &["map", "--image-opts", opts],
        &["map", "--output=json", json],
        &["map", "--image-opts", blkdebug],
        &["check", "--image-opts", opts],
        &["check", json],
        &[
            "compare",
            "--image-opts",
            opts,
            "driver=qcow2,file.filename=top.qcow2",
        ],
        &["compare", json, "base.qcow2"],
        // A protocol prefix: blkdebug without a config passes through.
        &["map", "blkdebug::top.qcow2"],
        &["check", "blkdebug::top.qcow2"],
        &["compare", "blkdebug::top.qcow2", "top.qcow2"],
        // Failures: a missing file, -f with --image-opts.
        &[
            "info",
            "json:{'driver':'qcow2','file':{'driver':'file','filename':'nonex'}}",
        ],
        &["map", "--image-opts", "driver=qcow2,file.filename=nonex"],
        &["info", "--image-opts", "-f", "qcow2", opts],
    ] {
        c.same(args);
    }
    // blkdebug rules: both report the image by a json: name (QEMU's
    // re-serialised, with nested child nodes that oxqcow does not show).
    for tool in ["qemu-img", BIN] {
        let out = ok_in(&c.setup, tool, &["info", JSON_RULES]);
        assert!(out.starts_with("image: json:{"), "{tool}: {out}");
    }
    // null-co as a source: zeros, converted sparse and not.
    let null = "json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true }";
    for sparse in ["512", "0"] {
        let (code, _) = c.same(&["convert", "-O", "qcow2", "-S", sparse, null, "n.qcow2"]);
        assert_eq!(code, 0);
        c.same_map("n.qcow2");
        c.same_view("n.qcow2");
    }
}

#[test]
fn create_checks_the_backing_file_like_qemu_img() {
    let d = Scratch::new("dropin-create");
    let c = Case::new(&d);
    c.qcow2("b.qcow2", "1M", &[]);
    for args in [
        &["create", "-f", "qcow2", "-b", "missing", "x.qcow2"][..],
        &[
            "create", "-f", "qcow2", "-b", "missing", "-F", "qcow2", "x.qcow2", "1M",
        ],
        &["create", "-f", "qcow2", "-b", "b.qcow2", "x.qcow2"],
        &[
            "create", "-f", "qcow2", "-u", "-b", "missing", "x.qcow2", "1M",
        ],
        &[
            "create", "-f", "qcow2", "-u", "-b", "missing", "-F", "qcow2", "x.qcow2", "1M",
        ],
        // Commas in values are doubled in the "Formatting" line.
        &[
            "create", "-f", "qcow2", "-u", "-b", "a,b", "-F", "qcow2", "x.qcow2", "1M",
        ],
        // A json: backing file is opened by the block layer, not as a path.
        &[
            "create", "-f", "qcow2", "-b", JSON_B, "-F", "qcow2", "x.qcow2",
        ],
        &["create", "-f", "qcow2", "-b", JSON_B, "x.qcow2"],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            JSON_MISSING,
            "-F",
            "qcow2",
            "x.qcow2",
        ],
    ] {
        c.same(args);
    }
    c.qcow2("j.qcow2", "", &["-b", JSON_B, "-F", "qcow2"]);
    c.same(&["info", "j.qcow2"]);
    c.same(&["info", "--backing-chain", "--output=json", "j.qcow2"]);
}

const JSON_RULES: &str = "json:{'driver':'qcow2','file':{'driver':'blkdebug','image':{'driver':'file','filename':'top.qcow2'},'set-state':[{'event':'read_aio','new_state':42}]}}";
const JSON_B: &str = "json:{'driver':'qcow2','file':{'driver':'file','filename':'b.qcow2'}}";
const JSON_MISSING: &str = "json:{'driver':'qcow2','file':{'driver':'file','filename':'nonex'}}";

#[test]
fn convert_with_a_backing_file_for_the_target() {
    let d = Scratch::new("dropin-convert-b");
    let c = Case::new(&d);
    c.qcow2("base.qcow2", "8M", &[]);
    qemu_io_in(
        &c.setup,
        "base.qcow2",
        &["write -P 1 0 4M", "write -P 3 6M 64k"],
    );
    c.qcow2("top.qcow2", "", &["-b", "base.qcow2", "-F", "qcow2"]);
    // Sectors over the backing file's data, a whole cluster, zero
    // clusters over backing data, data past the backing file's data.
    qemu_io_in(
        &c.setup,
        "top.qcow2",
        &[
            "write -P 2 512 512",
            "write -P 2 1M 64k",
            "write -z 2M 128k",
            "write -P 4 5M 64k",
            "write -P 0 7M 64k",
        ],
    );
    for args in [
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "t.qcow2",
        ][..],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-o",
            "backing_fmt=qcow2",
            "top.qcow2",
            "t.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            "top.qcow2",
            "t.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-c",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "t.qcow2",
        ],
    ] {
        let (code, _) = c.same(args);
        assert_eq!(code, 0, "{args:?}");
        c.same_map("t.qcow2");
        c.same_view("t.qcow2");
        // Compressed clusters are packed differently in the file.
        c.same_info_but("t.qcow2", "file length");
        // Only the top image was copied: the target reads like the source.
        let (code, out, err) = run_in(&c.o, "qemu-img", &["compare", "top.qcow2", "t.qcow2"]);
        assert_eq!(code, 0, "{out}{err}");
    }
    // What qemu-img refuses, and a backing file that is not there.
    c.all_fail(
        "convert",
        &[
            &["-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "t.qcow2"],
            &["-O", "raw", "-B", "base.qcow2", "top.qcow2", "t.raw"],
            &[
                "-O",
                "qcow2",
                "-o",
                "backing_fmt=qcow2",
                "top.qcow2",
                "t.qcow2",
            ],
            &[
                "-O",
                "qcow2",
                "-B",
                "missing",
                "-F",
                "qcow2",
                "top.qcow2",
                "t.qcow2",
            ],
        ],
    );
}

#[test]
fn convert_progress_steps_like_qemu_img() {
    let d = Scratch::new("dropin-convert-p");
    let c = Case::new(&d);
    let mk = |name: &str, size: &str, cmds: &[&str]| {
        c.qcow2(name, size, &[]);
        if !cmds.is_empty() {
            qemu_io_in(&c.setup, name, cmds);
        }
    };
    // 086's layout, extents of 2 MiB pieces and a remainder, many small
    // extents (steps below the 1% that makes a line), nothing at all.
    mk(
        "a.qcow2",
        "128M",
        &["write 0 1M", "write 2M 1M", "write 4M 1M", "write 32M 1M"],
    );
    mk(
        "b.qcow2",
        "128M",
        &["write 1M 9M", "write 64M 3M", "write -z 80M 1M"],
    );
    let small: Vec<String> = (0..150)
        .map(|i| format!("write {}k 64k", i * 128))
        .collect();
    let small: Vec<&str> = small.iter().map(|s| s.as_str()).collect();
    mk("c.qcow2", "64M", &small);
    mk("e.qcow2", "1M", &[]);
    for img in ["a.qcow2", "b.qcow2", "c.qcow2", "e.qcow2"] {
        for extra in [
            &["-O", "qcow2"][..],
            &["-S", "0"],
            &["-c", "-O", "qcow2"],
            &[],
        ] {
            let mut args = vec!["convert", "-p"];
            args.extend_from_slice(extra);
            args.extend_from_slice(&[img, "out"]);
            let (code, out) = c.same(&args);
            assert_eq!(code, 0, "{args:?}");
            assert!(out.starts_with("    (0.00/100%)\r"), "{out:?}");
            assert!(out.ends_with("    (100.00/100%)\r\n"), "{out:?}");
        }
    }
    // The first line comes before the source is opened, the newline after
    // the error.
    assert_eq!(c.same(&["convert", "-p", "missing", "out"]).0, 1);
}

#[test]
fn dd_copies_like_qemu_img() {
    let d = Scratch::new("dropin-dd");
    let c = Case::new(&d);
    c.qcow2("in.qcow2", "1M", &[]);
    qemu_io_in(
        &c.setup,
        "in.qcow2",
        &[
            "write -P 0xa 0 512k",
            "write -z 512k 64k",
            "write -P 0xb 700k 100k",
        ],
    );
    std::fs::write(c.setup.join("in.raw"), vec![7u8; 100_000]).unwrap();
    // 159's and 170's block sizes (5 bytes only for a while: qemu-img is
    // slow at it), then count and skip (counted from the start of the
    // input, as qemu-img does), a raw input whose size is not whole
    // sectors, and --image-opts.
    let mut cases: Vec<Vec<String>> = [
        "bs=5 count=2000",
        "bs=512",
        "bs=1999",
        "bs=1K",
        "bs=64K",
        "bs=1M",
    ]
    .iter()
    .map(|bs| format!("-O qcow2 {bs} if=in.qcow2 of=out.qcow2"))
    .chain(
        [
            "if=in.qcow2 of=out.raw",
            "-O qcow2 bs=1000 count=3 skip=2 if=in.qcow2 of=out.qcow2",
            "bs=64k count=100 if=in.qcow2 of=out.raw",
            "bs=64k count=4 skip=2 if=in.qcow2 of=out.raw",
            "bs=1.5k count=2 count=3 if=in.qcow2 of=out.raw",
            "count=0x10 if=in.qcow2 of=out.raw",
            "-f raw if=in.raw of=out.qcow2 -O qcow2",
            "--image-opts if=driver=qcow2,file.filename=in.qcow2 of=out.raw bs=4k",
            // A skip past the end: a warning and an empty output.
            "bs=64k skip=100 if=in.qcow2 of=out.raw",
        ]
        .iter()
        .map(|s| s.to_string()),
    )
    .map(|s| s.split(' ').map(String::from).collect())
    .collect();
    for case in &mut cases {
        case.insert(0, "dd".into());
        let args: Vec<&str> = case.iter().map(|s| s.as_str()).collect();
        let (code, _) = c.same(&args);
        assert_eq!(code, 0, "{args:?}");
        let out = args.iter().find_map(|a| a.strip_prefix("of=")).unwrap();
        c.same_view(out);
        c.same_map(out);
    }
    // Operand and option errors.
    c.all_fail(
        "dd",
        &[
            &["bs=0", "if=in.qcow2", "of=out"][..],
            &["bs=abc", "if=in.qcow2", "of=out"],
            &["bs=3G", "if=in.qcow2", "of=out"],
            &["count=-1", "if=in.qcow2", "of=out"],
            &["count=1k", "if=in.qcow2", "of=out"],
            &["skip=x", "if=in.qcow2", "of=out"],
            &["foo=1", "if=in.qcow2", "of=out"],
            &["bogus", "if=in.qcow2", "of=out"],
            &["if=in.qcow2"],
            &[],
            &["if=missing", "of=out"],
            &["if=", "of=out"],
            &["-O", "foo", "if=in.qcow2", "of=out"],
            &["if=in.qcow2", "of=nodir/out"],
            &[
                "--image-opts",
                "-f",
                "qcow2",
                "if=driver=qcow2,file.filename=in.qcow2",
                "of=out",
            ],
        ],
    );
}

#[test]
fn extent_size_hints_and_compressed_rebase_refusals() {
    let d = Scratch::new("dropin-hint");
    let c = Case::new(&d);
    c.qcow2("t.qcow2", "1M", &[]);
    c.prep("qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    for args in [
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=off,extent_size_hint=0",
            "x.qcow2",
            "64M",
        ][..],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata,extent_size_hint=1M",
            "x.qcow2",
            "64M",
        ],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "extent_size_hint=64k",
            "x.raw",
            "1M",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "extent_size_hint=1M",
            "t.qcow2",
            "x.qcow2",
        ],
        &[
            "convert",
            "-O",
            "raw",
            "-o",
            "extent_size_hint=1M",
            "t.qcow2",
            "x.raw",
        ],
    ] {
        assert_eq!(c.same(args).0, 0, "{args:?}");
        let out = args[args.len() - 2..].iter().find(|a| a.starts_with("x."));
        if let Some(&out) = out.filter(|o| o.ends_with(".qcow2")) {
            c.same_map(out);
        }
    }
    // Values qemu-img refuses: not a size, negative, more than 32 bits.
    for v in ["abc", "-1", "5G"] {
        let o = format!("extent_size_hint={v}");
        for fmt in ["qcow2", "raw"] {
            let (code, _) = c.same(&["create", "-f", fmt, "-o", &o, "y", "1M"]);
            assert_eq!(code, 1, "{fmt} {o}");
        }
    }
    // rebase -c of an image without compression (raw) is refused first.
    c.all_fail(
        "rebase",
        &[
            &["-c", "-f", "raw", "-b", "", "r.raw"],
            &["-c", "-u", "-f", "raw", "-b", "", "r.raw"],
            &["-f", "raw", "-b", "", "r.raw"],
        ],
    );
    assert_eq!(c.same(&["rebase", "-c", "-u", "-b", "", "t.qcow2"]).0, 0);
}

#[test]
fn shrinking_gives_the_file_tail_back_like_qemu_img() {
    use std::os::unix::fs::MetadataExt;
    let d = Scratch::new("dropin-shrink");
    let c = Case::new(&d);
    // 250's layout, smaller: the first 10 MiB of guest data live at the
    // end of the file, the last 10 MiB near its start.
    c.qcow2(
        "a.qcow2",
        "300M",
        &["-o", "cluster_size=1M,preallocation=metadata"],
    );
    qemu_io_in(
        &c.setup,
        "a.qcow2",
        &[
            "discard 0 10M",
            "discard 290M 10M",
            "write 290M 10M",
            "write 0 10M",
        ],
    );
    let (code, _) = c.same(&["resize", "--shrink", "a.qcow2", "5M"]);
    assert_eq!(code, 0);
    c.same_map("a.qcow2");
    c.same_view("a.qcow2");
    let meta = |dir: &std::path::Path| std::fs::metadata(dir.join("a.qcow2")).unwrap();
    let (q, o) = (meta(&c.q), meta(&c.o));
    assert_eq!(q.len(), o.len(), "file length after the shrink");
    // The tail's clusters are given back to the file system in one piece
    // (fragmentation of the host file may still differ by a block).
    assert!(
        o.blocks() <= q.blocks() + 8,
        "{} vs {}",
        o.blocks(),
        q.blocks()
    );
}

#[test]
fn stdout_reaches_a_pipe_after_stderr_like_c_stdio() {
    // 074: compare prints its size warning, then fails reading through a
    // blkdebug node; qemu-img's stdout is flushed at exit, so `2>&1`
    // shows the error first.
    let d = Scratch::new("dropin-held");
    let c = Case::new(&d);
    c.qcow2("big.qcow2", "2M", &[]);
    c.qcow2("small.qcow2", "1M", &[]);
    qemu_io_in(&c.setup, "big.qcow2", &["write -P 1 1536k 4k"]);
    std::fs::write(
        c.setup.join("blkdebug.conf"),
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nonce = \"off\"\n",
    )
    .unwrap();
    let merged = |tool: &str| {
        let script = format!("{tool} compare blkdebug:blkdebug.conf:big.qcow2 small.qcow2 2>&1");
        run_in(&c.setup, "sh", &["-c", &script])
    };
    let (qc, q, _) = merged("qemu-img");
    let (oc, o, _) = merged(BIN);
    assert_eq!(qc, oc);
    assert_eq!(normalize(&q), normalize(&o));
    assert!(q.ends_with("Warning: Image size mismatch!\n"), "{q}");
}

#[test]
fn commit_finds_the_base_relative_to_the_image() {
    // 020: -b names the base relative to the image's directory, not to
    // the working directory.
    let d = Scratch::new("dropin-commit-b");
    let c = Case::new(&d);
    std::fs::create_dir_all(c.setup.join("sub")).unwrap();
    c.qcow2("sub/t.base", "1M", &[]);
    c.qcow2("sub/t.mid", "", &["-b", "t.base", "-F", "qcow2"]);
    c.qcow2("sub/t", "", &["-b", "t.mid", "-F", "qcow2"]);
    qemu_io_in(&c.setup, "sub/t", &["write -P 7 0 64k"]);
    assert_eq!(c.same(&["commit", "-b", "sub/t.mid", "sub/t"]).0, 1);
    assert_eq!(c.same(&["commit", "-b", "t.mid", "sub/t"]).0, 0);
}
