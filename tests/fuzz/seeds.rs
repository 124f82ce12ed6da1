//! Seed images for the fuzzer, one per on-disk structure worth damaging,
//! made with QEMU's own tools (and the engine where qemu-img has no
//! command for it: snapshots with a VM state). Each is small so that a
//! case (copy, mutate, open, a few operations) takes milliseconds.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The password of the LUKS seed.
pub const SECRET: &str = "fuzzpw";

/// One seed image and the files it refers to.
pub struct Seed {
    pub name: &'static str,
    /// The pristine image; cases mutate a copy.
    pub image: PathBuf,
    /// Files copied before each case (source, destination): an external
    /// data file, which writes change, lives at the name the header holds.
    pub aux: Vec<(PathBuf, PathBuf)>,
    /// Files the image reads but must never write (backing files).
    pub shared: Vec<PathBuf>,
    /// The LUKS password, for encrypted seeds.
    pub secret: Option<&'static str>,
}

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// qemu-io on `img` with commands (`extra` before the image name).
fn qio(img: &Path, extra: &[&str], cmds: &[&str]) {
    let mut args: Vec<String> = Vec::new();
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    args.extend(extra.iter().map(|x| x.to_string()));
    if !extra.contains(&"--image-opts") {
        args.push(s(img));
    }
    let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    sh("qemu-io", &a);
}

/// Writes that leave data, zero clusters and holes, so that L2 tables and
/// refcount blocks have entries of every kind.
const WRITES: &[&str] = &[
    "write -P 0x11 0 96k",
    "write -P 0x22 300k 8k",
    "write -z 512k 64k",
    "write -P 0x33 1M 128k",
    "discard 1088k 64k",
    "write -P 0x44 3M 4k",
];

fn create(img: &Path, opts: &str, size: &str) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        a.push("-o");
        a.push(opts);
    }
    let p = s(img);
    a.push(&p);
    a.push(size);
    sh("qemu-img", &a);
}

/// Adds an unknown header extension (type 0x12345678, 13 bytes) before the
/// end marker, and sets an unknown compatible feature bit.
fn add_unknown_extension(img: &Path) {
    let mut b = std::fs::read(img).unwrap();
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
    let mut off = be32(&b, 100) as usize;
    loop {
        let (ty, len) = (be32(&b, off), be32(&b, off + 4) as usize);
        if ty == 0 {
            break;
        }
        off += 8 + len.div_ceil(8) * 8;
    }
    let mut ext = Vec::new();
    ext.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    ext.extend_from_slice(&13u32.to_be_bytes());
    ext.extend_from_slice(b"unknown-data!\0\0\0");
    ext.extend_from_slice(&[0u8; 8]);
    b[off..off + ext.len()].copy_from_slice(&ext);
    b[87] |= 0x40; // compatible feature bit 6: unknown to everyone
    std::fs::write(img, &b).unwrap();
}

/// Builds every seed in `dir`. `work` is where cases run: names stored in
/// headers (data files) point there.
pub fn build_all(dir: &Path, work: &Path) -> Vec<Seed> {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::create_dir_all(work).unwrap();
    let mut seeds = Vec::new();
    let p = |n: &str| dir.join(n);
    let plain = |name: &'static str, opts: &str, size: &str| {
        let img = dir.join(format!("{name}.qcow2"));
        create(&img, opts, size);
        qio(&img, &[], WRITES);
        Seed {
            name,
            image: img,
            aux: vec![],
            shared: vec![],
            secret: None,
        }
    };

    // Snapshots with VM state, some L2 tables shared, some copied.
    {
        let img = p("snapshots.qcow2");
        create(&img, "", "4M");
        qio(&img, &[], WRITES);
        let q = oxqcow::Image::open(
            &img,
            None,
            &oxqcow::OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        let q2 = q.qcow2().unwrap();
        q2.write_vmstate(&[0x5a; 70_000], 0).unwrap();
        q2.snapshot_create_with(None, "s1", Some((1, 2)), 3, 70_000)
            .unwrap();
        q.write_at(&[0x66; 10_000], 65536).unwrap();
        q2.write_vmstate(&[0xa5; 5000], 0).unwrap();
        q2.snapshot_create_with(None, "s2", Some((4, 5)), 6, 5000)
            .unwrap();
        q.write_at(&[0x77; 4096], 2 << 20).unwrap();
        q.close().unwrap();
        drop(q);
        sh("qemu-img", &["snapshot", "-c", "s3", &s(&img)]);
        seeds.push(Seed {
            name: "snapshots",
            image: img,
            aux: vec![],
            shared: vec![],
            secret: None,
        });
    }
    // Persistent bitmaps: enabled, disabled, another granularity.
    {
        let img = p("bitmaps.qcow2");
        create(&img, "", "4M");
        let i = s(&img);
        sh("qemu-img", &["bitmap", "--add", &i, "b1"]);
        sh("qemu-img", &["bitmap", "--add", "-g", "128k", &i, "b2"]);
        qio(&img, &[], WRITES);
        sh("qemu-img", &["bitmap", "--add", "--disable", &i, "b3"]);
        sh("qemu-img", &["bitmap", "--add", "-g", "512", &i, "b4"]);
        qio(&img, &[], &["write -P 9 2M 200k"]);
        seeds.push(Seed {
            name: "bitmaps",
            image: img,
            aux: vec![],
            shared: vec![],
            secret: None,
        });
    }
    // Compressed clusters, zlib and zstd, mixed with plain ones.
    for (name, ty) in [("zlib", "zlib"), ("zstd", "zstd")] {
        let raw = p(&format!("{name}.raw"));
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(4 << 20).unwrap();
        drop(f);
        sh(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x31 0 200k",
                "-c",
                "write -P 0x32 1M 64k",
                "-c",
                "write -P 0x33 2M 33k",
                &s(&raw),
            ],
        );
        let img = p(&format!("{name}.qcow2"));
        sh(
            "qemu-img",
            &[
                "convert",
                "-q",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ty}"),
                &s(&raw),
                &s(&img),
            ],
        );
        qio(&img, &[], &["write -P 0x44 64k 4k", "write -z 1M 64k"]);
        let name: &'static str = if ty == "zlib" { "zlib" } else { "zstd" };
        seeds.push(Seed {
            name,
            image: img,
            aux: vec![],
            shared: vec![],
            secret: None,
        });
    }
    // Extended L2 entries with partly allocated and zeroed clusters.
    {
        let img = p("extl2.qcow2");
        create(&img, "extended_l2=on", "4M");
        qio(
            &img,
            &[],
            &[
                "write -P 1 0 4k",
                "write -P 2 66k 3k",
                "write -z 200k 8k",
                "write -P 3 1M 64k",
                "discard 1M 2k",
                "write -P 4 3M 1k",
            ],
        );
        seeds.push(Seed {
            name: "extl2",
            image: img,
            aux: vec![],
            shared: vec![],
            secret: None,
        });
    }
    // External data file (its name in the header points into `work`).
    for (name, raw) in [("datafile", "off"), ("datafile-raw", "on")] {
        let img = p(&format!("{name}.qcow2"));
        let live = work.join(format!("{name}.data"));
        let _ = std::fs::remove_file(&live);
        create(
            &img,
            &format!("data_file={},data_file_raw={raw}", s(&live)),
            "4M",
        );
        qio(&img, &[], WRITES);
        let keep = p(&format!("{name}.data"));
        std::fs::copy(&live, &keep).unwrap();
        let name: &'static str = if raw == "on" {
            "datafile-raw"
        } else {
            "datafile"
        };
        seeds.push(Seed {
            name,
            image: img,
            aux: vec![(keep, live)],
            shared: vec![],
            secret: None,
        });
    }
    // Backing files: a plain name and a json: one.
    {
        let base = p("base.qcow2");
        create(&base, "", "4M");
        qio(&base, &[], &["write -P 0xbb 0 4M"]);
        let img = p("backing.qcow2");
        create(
            &img,
            &format!("backing_file={},backing_fmt=qcow2", s(&base)),
            "4M",
        );
        qio(&img, &[], WRITES);
        seeds.push(Seed {
            name: "backing",
            image: img,
            aux: vec![],
            shared: vec![base.clone()],
            secret: None,
        });
        let img = p("json-backing.qcow2");
        let json = format!(
            "json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}",
            s(&base)
        );
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &json,
                "-F",
                "qcow2",
                &s(&img),
                "4M",
            ],
        );
        qio(&img, &[], WRITES);
        seeds.push(Seed {
            name: "json-backing",
            image: img,
            aux: vec![],
            shared: vec![base],
            secret: None,
        });
    }
    // LUKS encryption (a fast key derivation keeps each open cheap).
    {
        let img = p("luks.qcow2");
        let obj = format!("secret,id=sec0,data={SECRET}");
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                &obj,
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                &s(&img),
                "4M",
            ],
        );
        let opts = format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
            s(&img)
        );
        qio(&img, &["--object", &obj, "--image-opts", &opts], WRITES);
        seeds.push(Seed {
            name: "luks",
            image: img,
            aux: vec![],
            shared: vec![],
            secret: Some(SECRET),
        });
    }
    // Feature-name table (qemu-img writes one) plus an unknown extension.
    {
        let seed = plain("unknown-ext", "", "4M");
        add_unknown_extension(&seed.image);
        seeds.push(seed);
    }
    // Version 2 with a snapshot.
    {
        let seed = plain("v2", "compat=0.10", "4M");
        sh("qemu-img", &["snapshot", "-c", "old", &s(&seed.image)]);
        qio(&seed.image, &[], &["write -P 0x55 0 8k"]);
        seeds.push(seed);
    }
    seeds.push(plain("c512", "cluster_size=512", "4M"));
    seeds.push(plain("c2m", "cluster_size=2M", "8M"));
    seeds.push(plain("rc1", "refcount_bits=1", "4M"));
    {
        let seed = plain("rc64", "refcount_bits=64", "4M");
        sh("qemu-img", &["snapshot", "-c", "s", &s(&seed.image)]);
        qio(&seed.image, &[], &["write -P 0x66 0 8k"]);
        seeds.push(seed);
    }
    for seed in &seeds {
        check_clean(seed);
    }
    seeds
}

/// A seed QEMU does not call clean would blur what the fuzzer reports.
fn check_clean(seed: &Seed) {
    for (from, to) in &seed.aux {
        std::fs::copy(from, to).unwrap();
    }
    let mut a = vec!["check".to_string()];
    let img = s(&seed.image);
    if let Some(pw) = seed.secret {
        a.push("--object".into());
        a.push(format!("secret,id=sec0,data={pw}"));
        a.push("--image-opts".into());
        a.push(format!(
            "driver=qcow2,file.filename={img},encrypt.key-secret=sec0"
        ));
    } else {
        a.push(img);
    }
    let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
    sh("qemu-img", &a);
}
