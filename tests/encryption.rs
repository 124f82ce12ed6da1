//! Encrypted images, with QEMU as the judge: images qemu-img and qemu-io
//! encrypt (LUKS and legacy AES) read by oxqcow, images oxqcow writes read
//! by QEMU with the same secret (`qemu-img compare` against a raw model,
//! `qemu-img check`), QEMU's messages for a wrong or missing password,
//! `oxqcow create` and `oxqcow info` next to qemu-img's, and damaged
//! headers that must fail cleanly.

mod common;
use common::*;
use oxqcow::crypto::Secret;
use oxqcow::{CreateOptions, Image, OpenOptions};
use std::path::Path;

const OX: &str = env!("CARGO_BIN_EXE_oxqcow");
const PW: &str = "astrochicken";

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn object(pw: &str) -> String {
    format!("secret,id=sec0,data={pw}")
}

/// QEMU's --image-opts spec of an encrypted qcow2 image.
fn spec(p: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        s(p)
    )
}

/// `-o` options of an encrypted image in the given format.
fn enc_opts(format: &str) -> String {
    match format {
        "luks" => "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10".into(),
        _ => "encrypt.format=aes,encrypt.key-secret=sec0".into(),
    }
}

fn qemu_create(p: &Path, format: &str, extra: &str, size: &str) {
    let o = format!("{}{extra}", enc_opts(format));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        &object(PW),
        "-o",
        &o,
        &s(p),
        size,
    ]);
}

fn qemu_io_enc(p: &Path, pw: &str, cmds: &[&str]) -> (i32, String, String) {
    let obj = object(pw);
    let sp = spec(p);
    let mut args = vec!["--object", obj.as_str()];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push("--image-opts");
    args.push(&sp);
    run("qemu-io", &args)
}

fn qemu_io_ok(p: &Path, cmds: &[&str]) {
    let (code, out, err) = qemu_io_enc(p, PW, cmds);
    assert!(
        code == 0 && !out.contains("failed") && err.is_empty(),
        "qemu-io {cmds:?}: {out}{err}"
    );
}

fn open_ours(p: &Path, pw: &str, writable: bool) -> oxqcow::Result<Image> {
    Image::open(
        p,
        Some("qcow2"),
        &OpenOptions {
            writable,
            key_secret: Some(Secret(pw.as_bytes().to_vec())),
            ..Default::default()
        },
    )
}

/// The guest contents as QEMU decrypts them.
fn qemu_view(p: &Path, d: &Scratch) -> Vec<u8> {
    let out = d.path("view.raw");
    qemu_img(&[
        "convert",
        "--object",
        &object(PW),
        "--image-opts",
        &spec(p),
        "-O",
        "raw",
        &s(&out),
    ]);
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    v
}

/// qemu-img check with the secret finds no errors and no leaks.
fn assert_clean_enc(p: &Path) {
    let (code, out, err) = run(
        "qemu-img",
        &["check", "--object", &object(PW), "--image-opts", &spec(p)],
    );
    assert_eq!(code, 0, "qemu-img check {}: {out}{err}", s(p));
    assert!(out.contains("No errors were found"), "{out}");
}

/// qemu-img compare with the secret: the image equals the raw model.
fn assert_same_as_model(p: &Path, model: &[u8], d: &Scratch) {
    let raw = d.path("model.raw");
    std::fs::write(&raw, model).unwrap();
    let (code, out, err) = run(
        "qemu-img",
        &[
            "compare",
            "--object",
            &object(PW),
            "--image-opts",
            &spec(p),
            &format!("driver=raw,file.filename={}", s(&raw)),
        ],
    );
    assert_eq!(code, 0, "qemu-img compare {}: {out}{err}", s(p));
}

/// Writes a fixed mix of patterns with qemu-io and returns the model:
/// partial sectors, a cluster boundary, a whole cluster, a tail.
fn qemu_pattern_writes(p: &Path, size: usize) -> Vec<u8> {
    let writes: [(u8, usize, usize); 5] = [
        (0x11, 0, 65536),
        (0x22, 100 << 10, 3000),
        (0x33, 0xfe00, 0x400),
        (0x44, 1000, 77),
        (0x55, size - 4096, 4096),
    ];
    let mut model = vec![0u8; size];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(pat, off, len)| format!("write -P {pat:#x} {off} {len}"))
        .collect();
    let c: Vec<&str> = cmds.iter().map(|x| x.as_str()).collect();
    qemu_io_ok(p, &c);
    for (pat, off, len) in writes {
        model[off..off + len].fill(pat);
    }
    model
}

fn read_ours(p: &Path, pw: &str) -> Vec<u8> {
    let img = open_ours(p, pw, false).unwrap();
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

fn qemu_images_read(format: &str) {
    let d = Scratch::new(&format!("enc-read-{format}"));
    let img = d.path("q.qcow2");
    let size = 1 << 20;
    qemu_create(&img, format, "", "1M");
    let model = qemu_pattern_writes(&img, size);
    assert_eq!(read_ours(&img, PW), model);
    // Unaligned reads straddling sectors and clusters.
    let i = open_ours(&img, PW, false).unwrap();
    for (off, len) in [(999usize, 80usize), (0xfdff, 0x402), (65535, 2), (7, 1)] {
        let mut b = vec![0u8; len];
        i.read_at(&mut b, off as u64).unwrap();
        assert_eq!(b, model[off..off + len], "{format} read at {off}");
    }
}

#[test]
fn reads_a_qemu_luks_image() {
    qemu_images_read("luks");
}

#[test]
fn reads_a_qemu_aes_image() {
    qemu_images_read("aes");
}

/// Random writes, zero writes and discards by oxqcow, mirrored into a
/// model; QEMU then sees the model and a clean image.
fn ours_written_qemu_reads(format: &str, created_by_qemu: bool, cluster: &str) {
    let d = Scratch::new(&format!("enc-write-{format}-{created_by_qemu}-{cluster}"));
    let img = d.path("o.qcow2");
    let size: usize = 3 << 20;
    if created_by_qemu {
        qemu_create(&img, format, &format!(",cluster_size={cluster}"), "3M");
    } else {
        let mut o = CreateOptions::default();
        o.parse_into(&format!("cluster_size={cluster}")).unwrap();
        o.size = size as u64;
        o.encrypt = oxqcow::crypto::encrypt_create_from_options(
            &[
                ("encrypt.format".into(), format.into()),
                ("encrypt.key-secret".into(), "sec0".into()),
            ]
            .into_iter()
            .chain((format == "luks").then(|| ("encrypt.iter-time".into(), "10".into())))
            .collect::<Vec<_>>(),
            &mut |_| Ok(Secret(PW.as_bytes().to_vec())),
        )
        .unwrap();
        oxqcow::engine::create(&img, &o).unwrap();
    }
    let mut model = vec![0u8; size];
    let mut rng = Rng(0x5eed ^ size as u64 ^ format.len() as u64);
    {
        let i = open_ours(&img, PW, true).unwrap();
        for n in 0..120 {
            let off = rng.below(size as u64 - 1);
            let len = 1 + rng.below((size as u64 - off).min(150_000));
            let (off, len) = (off as usize, len as usize);
            match rng.below(8) {
                0 => {
                    i.write_zeroes(off as u64, len as u64, n % 2 == 0).unwrap();
                    model[off..off + len].fill(0);
                }
                1 => {
                    // Discard changes whole clusters only; the engine's
                    // rule is tested elsewhere: zero the model likewise.
                    let cs = i.qcow2().unwrap().cluster_size();
                    let a = off.div_ceil(cs as usize) * cs as usize;
                    let b = (off + len) / cs as usize * cs as usize;
                    i.discard(off as u64, len as u64).unwrap();
                    if a < b {
                        model[a..b].fill(0);
                    }
                }
                _ => {
                    let pat = (n as u8).wrapping_mul(31) | 1;
                    let data = vec![pat; len];
                    i.write_at(&data, off as u64).unwrap();
                    model[off..off + len].copy_from_slice(&data);
                }
            }
        }
        i.close().unwrap();
    }
    assert_clean_enc(&img);
    assert_same_as_model(&img, &model, &d);
    assert_eq!(qemu_view(&img, &d), model);
    assert_eq!(read_ours(&img, PW), model);
}

#[test]
fn luks_writes_read_by_qemu() {
    ours_written_qemu_reads("luks", true, "64k");
    ours_written_qemu_reads("luks", false, "4k");
}

#[test]
fn aes_writes_read_by_qemu() {
    ours_written_qemu_reads("aes", true, "4k");
    ours_written_qemu_reads("aes", false, "64k");
}

/// An encrypted overlay over an encrypted base with another password:
/// copy-on-write decrypts the base's cluster and encrypts it for the
/// overlay (LUKS re-encrypts for the new host offset).
#[test]
fn copy_on_write_between_encrypted_layers() {
    for (base_fmt, top_fmt) in [("aes", "luks"), ("luks", "aes"), ("luks", "luks")] {
        let d = Scratch::new(&format!("enc-cow-{base_fmt}-{top_fmt}"));
        let base = d.path("base.qcow2");
        let top = d.path("top.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec1,data=basepw",
            "-o",
            &enc_opts(base_fmt).replace("sec0", "sec1"),
            &s(&base),
            "1M",
        ]);
        let (code, out, err) = run(
            "qemu-io",
            &[
                "--object",
                "secret,id=sec1,data=basepw",
                "-c",
                "write -P 0xa 0 1M",
                "--image-opts",
                &format!(
                    "driver=qcow2,file.filename={},encrypt.key-secret=sec1",
                    s(&base)
                ),
            ],
        );
        assert_eq!(code, 0, "{out}{err}");
        qemu_create(
            &top,
            top_fmt,
            &format!(",backing_file={},backing_fmt=qcow2", s(&base)),
            "1M",
        );
        let opts = OpenOptions {
            writable: true,
            key_secret: Some(Secret(PW.as_bytes().to_vec())),
            backing: Some(Box::new(OpenOptions {
                key_secret: Some(Secret(b"basepw".to_vec())),
                ..Default::default()
            })),
            ..Default::default()
        };
        let i = Image::open(&top, Some("qcow2"), &opts).unwrap();
        i.write_at(&[0xe; 1024], 0).unwrap();
        i.write_at(&[0xf; 10], 70_000).unwrap();
        i.close().unwrap();
        let both = format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0,backing.driver=qcow2,\
             backing.file.filename={},backing.encrypt.key-secret=sec1",
            s(&top),
            s(&base)
        );
        let (code, out, err) = run(
            "qemu-io",
            &[
                "--object",
                &object(PW),
                "--object",
                "secret,id=sec1,data=basepw",
                "-c",
                "read -P 0xe 0 1024",
                "-c",
                "read -P 0xa 1024 68976",
                "-c",
                "read -P 0xf 70000 10",
                "-c",
                "read -P 0xa 70010 978566",
                "--image-opts",
                &both,
            ],
        );
        assert!(
            code == 0 && !out.contains("failed"),
            "{base_fmt}/{top_fmt}: {out}{err}"
        );
        let (code, out, err) = run(
            "qemu-img",
            &[
                "check",
                "--object",
                &object(PW),
                "--object",
                "secret,id=sec1,data=basepw",
                "--image-opts",
                &both,
            ],
        );
        assert!(code == 0 && out.contains("No errors"), "{out}{err}");
    }
}

/// What QEMU's qemu-io says, oxqcow io says: wrong password, no secret,
/// unknown secret id, format mismatch.
#[test]
fn password_errors_match_qemu_io() {
    let d = Scratch::new("enc-errors");
    let l = d.path("l.qcow2");
    let a = d.path("a.qcow2");
    qemu_create(&l, "luks", "", "1M");
    qemu_create(&a, "aes", "", "1M");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--object".into(),
                object("platypus"),
                "--image-opts".into(),
                spec(&l),
            ],
            "luks wrong password",
        ),
        (vec!["-f".into(), "qcow2".into(), s(&l)], "luks no secret"),
        (vec!["-f".into(), "qcow2".into(), s(&a)], "aes no secret"),
        (
            vec![
                "--object".into(),
                object(PW),
                "--image-opts".into(),
                spec(&a).replace("sec0", "sec9"),
            ],
            "unknown secret",
        ),
        (
            vec![
                "--object".into(),
                object(PW),
                "--image-opts".into(),
                format!("{},encrypt.format=aes", spec(&l)),
            ],
            "format mismatch",
        ),
    ];
    for (args, what) in cases {
        let mut q: Vec<&str> = vec!["-c", "read 0 512"];
        q.extend(args.iter().map(|x| x.as_str()));
        let (qc, qo, qe) = run("qemu-io", &q);
        let mut o: Vec<&str> = vec!["io"];
        o.extend(q.iter());
        let (oc, oo, oe) = run(OX, &o);
        assert_eq!(oc, qc, "{what}");
        assert_eq!(oo, qo, "{what}");
        assert_eq!(oe.replacen("oxqcow:", "qemu-io:", 1), qe, "{what}");
        assert!(qe.contains("can't open"), "{what}: {qe}");
    }
    // The engine's own error kinds.
    let e = open_ours(&l, "platypus", false).err().unwrap();
    assert_eq!(e.errno(), libc_eacces());
    assert!(e
        .to_string()
        .ends_with("Invalid password, cannot unlock any keyslot"));
    // Legacy AES has no key check: a wrong password reads garbage.
    qemu_io_ok(&a, &["write -P 0x61 0 4096"]);
    assert_eq!(read_ours(&a, PW)[..4096], [0x61u8; 4096][..]);
    assert_ne!(read_ours(&a, "platypus")[..4096], [0x61u8; 4096][..]);
}

fn libc_eacces() -> i32 {
    13
}

/// `oxqcow create` with --object makes images qemu-img opens with the
/// secret; `oxqcow info` prints what qemu-img info prints.
#[test]
fn oxqcow_create_opened_by_qemu() {
    let d = Scratch::new("enc-create");
    for (format, extra) in [
        ("luks", ""),
        ("luks", ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1"),
        ("luks", ",compat=0.10,cluster_size=4k"),
        ("aes", ""),
    ] {
        let ours = d.path("ours.qcow2");
        let theirs = d.path("theirs.qcow2");
        let o = format!("{}{extra}", enc_opts(format));
        let args = |p: &Path| {
            vec![
                "create".to_string(),
                "-f".into(),
                "qcow2".into(),
                "--object".into(),
                object(PW),
                "-o".into(),
                o.clone(),
                s(p),
                "2M".into(),
            ]
        };
        let oa = args(&ours);
        let (code, out, err) = run(OX, &oa.iter().map(|x| x.as_str()).collect::<Vec<_>>());
        assert_eq!(code, 0, "{out}{err}");
        let ta = args(&theirs);
        let qout = qemu_img(&ta.iter().map(|x| x.as_str()).collect::<Vec<_>>());
        assert_eq!(out.replace("ours", "theirs"), qout);
        if format == "aes" {
            assert_eq!(std::fs::read(&ours).unwrap(), std::fs::read(&theirs).unwrap());
        }
        // Same layout; only the LUKS header's random parts differ.
        let strip = |t: String| -> String {
            t.lines()
                .filter(|l| {
                    !["uuid", "iters", "disk size", "actual-size", "image:", "filename"]
                        .iter()
                        .any(|k| l.contains(k))
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        for output in ["human", "json"] {
            let of = format!("--output={output}");
            let qi = qemu_img(&["info", &of, &s(&ours)]);
            let (c, oi, e) = run(OX, &["info", &of, &s(&ours)]);
            assert_eq!(c, 0, "{e}");
            assert_eq!(oi, qi, "oxqcow info {output} of {format}{extra}");
            assert_eq!(strip(qi), strip(qemu_img(&["info", &of, &s(&theirs)])));
        }
        qemu_io_ok(&ours, &["write -P 0x3c 4000 70000", "read -P 0x3c 4000 70000"]);
        assert_clean_enc(&ours);
        let mut model = vec![0u8; 2 << 20];
        model[4000..74000].fill(0x3c);
        assert_eq!(read_ours(&ours, PW), model);
        std::fs::remove_file(&ours).unwrap();
        std::fs::remove_file(&theirs).unwrap();
    }
}

/// QEMU stores compressed clusters of an encrypted image in the clear
/// (qemu-io `write -c`); oxqcow reads them back the same way.
#[test]
fn compressed_clusters_of_an_encrypted_image() {
    let d = Scratch::new("enc-compressed");
    let img = d.path("c.qcow2");
    qemu_create(&img, "luks", "", "1M");
    qemu_io_ok(&img, &["write -c -P 0x77 64k 64k", "write -P 0x12 0 512"]);
    let v = read_ours(&img, PW);
    assert!(v[65536..131072].iter().all(|&b| b == 0x77));
    assert!(v[..512].iter().all(|&b| b == 0x12));
    // Overwriting part of it copies it out into an encrypted cluster.
    let i = open_ours(&img, PW, true).unwrap();
    i.write_at(&[0x99; 100], 70_000).unwrap();
    i.close().unwrap();
    let mut model = vec![0u8; 1 << 20];
    model[..512].fill(0x12);
    model[65536..131072].fill(0x77);
    model[70_000..70_100].fill(0x99);
    assert_same_as_model(&img, &model, &d);
    assert_clean_enc(&img);
}

/// `oxqcow convert` into an encrypted target (qemu-iotest 188's
/// preallocated case): QEMU reads the copy with the secret.
#[test]
fn convert_into_an_encrypted_image() {
    let d = Scratch::new("enc-convert");
    let src = d.path("src.qcow2");
    let dst = d.path("dst.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&src), "2M"]);
    qemu_io(&src, &["write -P 0x42 100k 300k"]);
    for prealloc in ["off", "metadata"] {
        let _ = std::fs::remove_file(&dst);
        let o = format!("{},preallocation={prealloc}", enc_opts("luks"));
        let (code, out, err) = run(
            OX,
            &[
                "convert",
                "-O",
                "qcow2",
                "--object",
                &object(PW),
                "-o",
                &o,
                &s(&src),
                &s(&dst),
            ],
        );
        assert_eq!(code, 0, "{out}{err}");
        let mut model = vec![0u8; 2 << 20];
        model[100 << 10..400 << 10].fill(0x42);
        assert_same_as_model(&dst, &model, &d);
        assert_clean_enc(&dst);
    }
    let (code, _, err) = run(
        OX,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "--object",
            &object(PW),
            "-o",
            &enc_opts("luks"),
            &s(&src),
            &s(&dst),
        ],
    );
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "oxqcow: Compression and encryption not supported at the same time\n"
    );
}

/// Damaged LUKS headers and crypto header extensions: every open fails
/// (or succeeds) cleanly, never panics, and the checks QEMU words are
/// worded as QEMU words them.
#[test]
fn damaged_headers_fail_cleanly() {
    let d = Scratch::new("enc-hostile");
    let good = d.path("good.qcow2");
    qemu_create(&good, "luks", "", "1M");
    let bytes = std::fs::read(&good).unwrap();
    let ext = bytes
        .windows(4)
        .position(|w| w == [0x05, 0x37, 0xbe, 0x77])
        .unwrap();
    let area = u64::from_be_bytes(bytes[ext + 8..ext + 16].try_into().unwrap()) as usize;
    let t = d.path("t.qcow2");
    let try_open = |b: &[u8]| -> Result<(), String> {
        std::fs::write(&t, b).unwrap();
        let r = std::panic::catch_unwind(|| open_ours(&t, PW, false).map(|_| ()));
        match r {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => panic!("panic while opening a damaged image"),
        }
    };
    assert_eq!(try_open(&bytes), Ok(()));
    let poke = |at: usize, v: &[u8]| {
        let mut b = bytes.clone();
        b[at..at + v.len()].copy_from_slice(v);
        b
    };
    let expect = [
        (
            poke(ext + 15, &[1]),
            "is not a multiple of cluster size '65536'",
        ),
        (
            poke(ext + 12, &[0x10, 0, 0, 0]),
            "Volume is not in LUKS format",
        ),
        (
            poke(ext + 21, &[0]),
            "Request for data outside of extension header",
        ),
        (
            poke(35, &[1]),
            "CRYPTO header extension only expected with LUKS encryption method",
        ),
        (poke(area + 6, &[0, 2]), "LUKS version 2 is not supported"),
        (
            poke(area + 0xd3, &[1]),
            "Keyslot 0 state (active/disable) is corrupted",
        ),
        (
            poke(area + 0xfc, &[0, 0, 0, 1]),
            "Keyslot 0 is corrupted (stripes 1 != 4000)",
        ),
        (
            poke(area + 0x68, &[0, 0, 0, 0x10]),
            "Keyslot 0 is overlapping with the encrypted payload",
        ),
        (
            poke(area + 0x70, &[0xff]),
            "Invalid password, cannot unlock any keyslot",
        ),
    ];
    for (b, want) in expect {
        let e = try_open(&b).unwrap_err();
        assert!(e.ends_with(want), "{e} / {want}");
    }
    // Random byte damage over the LUKS header and the first key material
    // (not the iteration counts: a huge one is slow, not wrong).
    let mut rng = Rng(7);
    for _ in 0..200 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(700) as usize;
            if (164..168).contains(&at) || (212..216).contains(&at) {
                continue;
            }
            b[area + at] = rng.next() as u8;
        }
        let _ = try_open(&b);
    }
}

/// Downgrading to compat=0.10 turns zero clusters into data clusters of
/// zeros: on an encrypted image those are stored encrypted, so QEMU reads
/// zeros there (QEMU 10's own downgrade writes plain zeros, which then
/// decrypt to garbage).
#[test]
fn downgrade_stores_encrypted_zeros() {
    for format in ["luks", "aes"] {
        let d = Scratch::new(&format!("enc-downgrade-{format}"));
        let img = d.path("z.qcow2");
        qemu_create(&img, format, "", "1M");
        // A preallocated zero cluster (keeps its host cluster) and data.
        qemu_io_ok(
            &img,
            &["write -P 1 0 192k", "write -z 0 64k", "write -z 128k 64k"],
        );
        let i = open_ours(&img, PW, true).unwrap();
        i.qcow2()
            .unwrap()
            .amend(&oxqcow::engine::AmendOptions::parse("compat=0.10").unwrap())
            .unwrap();
        i.close().unwrap();
        let mut model = vec![0u8; 1 << 20];
        model[64 << 10..128 << 10].fill(1);
        assert_same_as_model(&img, &model, &d);
        assert_clean_enc(&img);
        assert!(qemu_img(&["info", &s(&img)]).contains("compat: 0.10"));
    }
}

/// `oxqcow measure` counts a LUKS header as qemu-img measure does, and
/// `oxqcow create -f luks` makes a raw LUKS volume QEMU opens.
#[test]
fn measure_and_raw_luks_volumes() {
    for o in [
        "encrypt.format=luks,encrypt.key-secret=sec0",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128,cluster_size=4k",
        "encrypt.format=luks,encrypt.key-secret=sec9",
        "encrypt.format=luks",
        "encrypt.format=aes,encrypt.key-secret=sec0",
    ] {
        let args = [
            "measure",
            "--object",
            &object(PW),
            "-O",
            "qcow2",
            "-o",
            o,
            "--size",
            "1G",
        ];
        let (qc, qo, qe) = run("qemu-img", &args);
        let (oc, oo, oe) = run(OX, &args);
        assert_eq!((oc, oo), (qc, qo), "{o}");
        assert_eq!(oe.replace("oxqcow:", "qemu-img:"), qe, "{o}");
    }
    let d = Scratch::new("enc-rawluks");
    let v = d.path("v.luks");
    let (code, out, err) = run(
        OX,
        &[
            "create",
            "-f",
            "luks",
            "--object",
            &object(PW),
            "-o",
            "key-secret=sec0",
            "-o",
            "iter-time=10",
            &s(&v),
            "1M",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "Formatting '{}', fmt=luks size=1048576 key-secret=sec0 iter-time=10\n",
            s(&v)
        )
    );
    let (code, out, err) = run(
        "qemu-io",
        &[
            "--object",
            &object(PW),
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "read -P 0x5a 0 1M",
            "--image-opts",
            &format!("driver=luks,key-secret=sec0,file.filename={}", s(&v)),
        ],
    );
    assert!(code == 0 && !out.contains("failed"), "{out}{err}");
    assert!(qemu_img(&["info", &s(&v)]).contains("virtual size: 1 MiB"));
}

/// qemu-io's `info` command shows the encrypt block; so does oxqcow io's.
#[test]
fn io_info_command_shows_encryption() {
    let d = Scratch::new("enc-ioinfo");
    for format in ["luks", "aes"] {
        let img = d.path(&format!("{format}.qcow2"));
        qemu_create(&img, format, "", "1M");
        let obj = object(PW);
        let sp = spec(&img);
        let args = [
            "--object",
            obj.as_str(),
            "-c",
            "info",
            "--image-opts",
            sp.as_str(),
        ];
        let (qc, qo, qe) = run("qemu-io", &args);
        let mut o = vec!["io"];
        o.extend(args);
        let (oc, oo, oe) = run(OX, &o);
        assert_eq!((oc, oe.as_str()), (qc, qe.as_str()));
        assert_eq!(oo, qo, "{format}");
        assert!(qo.contains("    encrypt:\n"), "{qo}");
    }
}

/// Growing an encrypted image with preallocation is refused and leaves it
/// as it was: preallocated clusters would not read as zeros (qemu-img
/// resize --preallocation maps them, and the grown area reads as garbage).
/// Growing it without preallocation works.
#[test]
fn preallocated_resize_of_an_encrypted_image_is_refused() {
    let d = Scratch::new("enc-resize-prealloc");
    let img = d.path("r.qcow2");
    qemu_create(&img, "luks", "", "1M");
    qemu_io_ok(&img, &["write -P 9 0 64k"]);
    let before = std::fs::read(&img).unwrap();
    let i = open_ours(&img, PW, true).unwrap();
    let q = i.qcow2().unwrap();
    for mode in ["metadata", "falloc", "full"] {
        let m = oxqcow::engine::Preallocation::parse(mode).unwrap();
        let e = q.resize_preallocated(2 << 20, m).unwrap_err();
        assert!(
            e.to_string().contains("not supported with encryption"),
            "{e}"
        );
        assert_eq!(e.errno(), libc::ENOTSUP, "{e}");
    }
    i.close().unwrap();
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a refused resize changed the file"
    );
    let i = open_ours(&img, PW, true).unwrap();
    i.qcow2().unwrap().resize(2 << 20).unwrap();
    i.close().unwrap();
    let mut model = vec![0u8; 2 << 20];
    model[..64 << 10].fill(9);
    assert_same_as_model(&img, &model, &d);
    assert_clean_enc(&img);
}
