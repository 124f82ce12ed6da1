//! The `oxqcow` tool against the QEMU oracle: `create`'s Formatting line,
//! `info` and `map` output, `convert` results (checked with qemu-img),
//! `dump-header` text, and the error convention.

mod common;
use common::case::BIN;
use common::*;
use std::path::Path;

// ---- a minimal JSON reader, enough to compare qemu-img's output ----------------

#[derive(Clone, Debug, PartialEq)]
enum J {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    List(Vec<J>),
    Obj(Vec<(String, J)>),
}

struct P<'a> {
    b: &'a [u8],
    i: usize,
}

impl P<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) {
        self.ws();
        assert_eq!(self.b.get(self.i), Some(&c), "JSON: expected {}", c as char);
        self.i += 1;
    }
    fn value(&mut self) -> J {
        self.ws();
        match self.b[self.i] {
            b'{' => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.b[self.i] == b'}' {
                    self.i += 1;
                    return J::Obj(v);
                }
                loop {
                    self.ws();
                    let J::Str(k) = self.value() else {
                        panic!("JSON: key expected")
                    };
                    self.eat(b':');
                    v.push((k, self.value()));
                    self.ws();
                    self.i += 1;
                    if self.b[self.i - 1] == b'}' {
                        return J::Obj(v);
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.b[self.i] == b']' {
                    self.i += 1;
                    return J::List(v);
                }
                loop {
                    v.push(self.value());
                    self.ws();
                    self.i += 1;
                    if self.b[self.i - 1] == b']' {
                        return J::List(v);
                    }
                }
            }
            b'"' => {
                self.i += 1;
                let mut out = String::new();
                loop {
                    let c = self.b[self.i];
                    self.i += 1;
                    match c {
                        b'"' => return J::Str(out),
                        b'\\' => {
                            let e = self.b[self.i];
                            self.i += 1;
                            match e {
                                b'n' => out.push('\n'),
                                b't' => out.push('\t'),
                                b'r' => out.push('\r'),
                                b'b' => out.push('\u{8}'),
                                b'f' => out.push('\u{c}'),
                                b'u' => {
                                    let h =
                                        std::str::from_utf8(&self.b[self.i..self.i + 4]).unwrap();
                                    self.i += 4;
                                    let cp = u32::from_str_radix(h, 16).unwrap();
                                    out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                                }
                                other => out.push(other as char),
                            }
                        }
                        _ => {
                            // Re-decode multi-byte UTF-8 sequences.
                            let start = self.i - 1;
                            let mut end = self.i;
                            while end < self.b.len() && (self.b[end] & 0xc0) == 0x80 {
                                end += 1;
                            }
                            out.push_str(std::str::from_utf8(&self.b[start..end]).unwrap());
                            self.i = end;
                        }
                    }
                }
            }
            b't' => {
                self.i += 4;
                J::Bool(true)
            }
            b'f' => {
                self.i += 5;
                J::Bool(false)
            }
            b'n' => {
                self.i += 4;
                J::Null
            }
            _ => {
                let st = self.i;
                while self.i < self.b.len()
                    && (self.b[self.i].is_ascii_digit() || b"-+.eE".contains(&self.b[self.i]))
                {
                    self.i += 1;
                }
                J::Num(String::from_utf8(self.b[st..self.i].to_vec()).unwrap())
            }
        }
    }
}

fn parse_json(s: &str) -> J {
    let mut p = P {
        b: s.as_bytes(),
        i: 0,
    };
    let v = p.value();
    p.ws();
    assert_eq!(p.i, s.len(), "trailing text after JSON: {s}");
    v
}

/// Compares two JSON values key by key (in order), ignoring `skip` keys.
fn json_same(path: &str, a: &J, b: &J, skip: &[&str]) {
    match (a, b) {
        (J::Obj(x), J::Obj(y)) => {
            let xk: Vec<&String> = x
                .iter()
                .map(|(k, _)| k)
                .filter(|k| !skip.contains(&k.as_str()))
                .collect();
            let yk: Vec<&String> = y
                .iter()
                .map(|(k, _)| k)
                .filter(|k| !skip.contains(&k.as_str()))
                .collect();
            assert_eq!(xk, yk, "keys differ at {path}");
            for (k, v) in x {
                if skip.contains(&k.as_str()) {
                    continue;
                }
                let w = &y.iter().find(|(k2, _)| k2 == k).unwrap().1;
                json_same(&format!("{path}.{k}"), v, w, skip);
            }
        }
        (J::List(x), J::List(y)) => {
            assert_eq!(x.len(), y.len(), "list length differs at {path}");
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                json_same(&format!("{path}[{i}]"), v, w, skip);
            }
        }
        _ => assert_eq!(a, b, "value differs at {path}"),
    }
}

// ---- create -----------------------------------------------------------------------

/// Runs `create` with both tools on files of the same name in two
/// directories and compares stdout, exit status and (prefix aside) stderr.
fn create_same(args: &[&str], size: Option<&str>) {
    let d = Scratch::new("cli-create");
    let base = d.path("base.qcow2");
    create_qcow2(&base, "3M", &[]);
    let rawbase = d.path("base.raw");
    std::fs::write(&rawbase, vec![1u8; 5000]).unwrap();
    let mut outs = Vec::new();
    for (tool, dir) in [("qemu-img", "q"), (BIN, "o")] {
        std::fs::create_dir_all(d.path(dir)).unwrap();
        let file = s(&d.path(dir).join("img"));
        let mut a: Vec<String> = vec!["create".into()];
        for x in args {
            a.push(
                x.replace("BASE_RAW", &s(&rawbase))
                    .replace("BASE", &s(&base)),
            );
        }
        a.push(file.clone());
        if let Some(sz) = size {
            a.push(sz.to_string());
        }
        let av: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        let (code, out, err) = run(tool, &av);
        let err = err
            .replace("qemu-img: ", "")
            .replace("oxqcow: ", "")
            .replace(&file, "FILE");
        outs.push((code, out.replace(&file, "FILE"), err, file));
    }
    let (q, o) = (&outs[0], &outs[1]);
    assert_eq!(q.1, o.1, "stdout differs for create {args:?} {size:?}");
    assert_eq!(
        q.0, o.0,
        "exit status differs for {args:?}: {} / {}",
        q.2, o.2
    );
    assert_eq!(q.2, o.2, "stderr differs for {args:?}");
    if o.0 == 0 && args.contains(&"qcow2") && !args.contains(&"-u") {
        assert_clean(Path::new(&o.3));
        let qi = qemu_img(&["info", "--output=json", &q.3]);
        let oi = qemu_img(&["info", "--output=json", &o.3]);
        json_same(
            "info",
            &parse_json(&qi.replace(&q.3, "F")),
            &parse_json(&oi.replace(&o.3, "F")),
            &["actual-size"],
        );
    }
}

#[test]
fn create_prints_what_qemu_img_prints() {
    create_same(&["-f", "qcow2"], Some("64M"));
    create_same(&["-f", "qcow2", "-o", "compat=0.10"], Some("64M"));
    create_same(
        &[
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,cluster_size=4k,refcount_bits=64,compression_type=zstd",
        ],
        Some("1G"),
    );
    create_same(
        &["-f", "qcow2", "-o", "compat=v3", "-o", "cluster_size=128k"],
        Some("1.5G"),
    );
    create_same(&["-f", "qcow2", "-o", "preallocation=metadata"], Some("1M"));
    create_same(
        &["-f", "qcow2", "-o", "lazy_refcounts=true,extended_l2=off"],
        Some("1000"),
    );
    create_same(&["-f", "qcow2", "-b", "BASE", "-F", "qcow2"], None);
    create_same(
        &[
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "BASE",
            "-F",
            "qcow2",
        ],
        Some("32M"),
    );
    create_same(&["-f", "qcow2", "-b", "BASE_RAW", "-F", "raw"], None);
    create_same(
        &["-f", "qcow2", "-u", "-b", "/nonexistent/x", "-F", "raw"],
        Some("1M"),
    );
    create_same(&["-f", "raw"], Some("1M"));
    create_same(&["-f", "raw", "-o", "preallocation=falloc"], Some("100k"));
    create_same(&["-q", "-f", "qcow2"], Some("64M"));
}

#[test]
fn create_errors_like_qemu_img() {
    create_same(&["-f", "qcow2"], None);
    create_same(&["-f", "qcow2"], Some("12Q"));
    create_same(&["-f", "qcow2", "-o", "bogus=1"], Some("1M"));
    create_same(&["-f", "qcow2", "-o", "cluster_size=3000"], Some("1M"));
    create_same(&["-f", "qcow2", "-F", "qcow2"], Some("1M"));
    create_same(&["-f", "qcow2", "-b", "BASE"], Some("1M"));
    create_same(
        &["-f", "qcow2", "-b", "/nonexistent/x", "-F", "raw"],
        Some("1M"),
    );
    create_same(&["-f", "nosuchfmt"], Some("1M"));
}

// ---- info -------------------------------------------------------------------------

fn info_same(file: &Path, extra: &[&str]) {
    let f = s(file);
    let mut a = vec!["info", "--output=json"];
    a.extend_from_slice(extra);
    a.push(&f);
    let q = parse_json(&qemu_img(&a));
    let o = parse_json(&ox_ok(&a));
    json_same("info", &q, &o, &["actual-size"]);
    // Human text, disk usage aside.
    let mut a = vec!["info"];
    a.extend_from_slice(extra);
    a.push(&f);
    let mask = |t: String| -> String {
        t.lines()
            .filter(|l| !l.contains("disk size:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(mask(qemu_img(&a)), mask(ox_ok(&a)), "info {extra:?} {f}");
}

#[test]
fn info_matches_qemu_img() {
    let d = Scratch::new("cli-info");
    let v2 = d.path("v2.qcow2");
    create_qcow2(&v2, "64M", &["-o", "compat=0.10"]);
    qemu_io(&v2, &["write -P 1 0 100k"]);
    info_same(&v2, &[]);

    let lazy = d.path("lazy.qcow2");
    ox_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,compression_type=zstd",
        &s(&lazy),
        "1G",
    ]);
    qemu_io(&lazy, &["write -P 2 1M 64k"]);
    qemu_img(&["snapshot", "-c", "snap1", &s(&lazy)]);
    info_same(&lazy, &[]);

    std::fs::create_dir_all(d.path("sub")).unwrap();
    let base = d.path("sub/base.qcow2");
    let top = d.path("sub/top.qcow2");
    create_qcow2(&base, "16M", &[]);
    create_qcow2(&top, "", &["-b", "base.qcow2", "-F", "qcow2"]);
    info_same(&top, &[]);
    info_same(&top, &["--backing-chain"]);

    let raw = d.path("odd.raw");
    std::fs::write(&raw, vec![7u8; 1000]).unwrap();
    info_same(&raw, &[]);
    info_same(&raw, &["-f", "raw"]);
}

// ---- map --------------------------------------------------------------------------

fn map_same(file: &Path) {
    let f = s(file);
    let q = qemu_img(&["map", "--output=json", &f]);
    let o = ox_ok(&["map", "--output=json", &f]);
    assert_eq!(q, o, "map --output=json {f}");
    parse_json(&o);
    let q = qemu_img(&["map", &f]);
    let o = ox_ok(&["map", &f]);
    assert_eq!(q, o, "map {f}");
}

#[test]
fn map_matches_qemu_img() {
    let d = Scratch::new("cli-map");
    let base = d.path("base.qcow2");
    let top = d.path("top.qcow2");
    create_qcow2(&base, "4M", &[]);
    qemu_io(
        &base,
        &[
            "write -P 1 0 1M",
            "write -P 2 2M 512k",
            "write -z 256k 128k",
        ],
    );
    create_qcow2(&top, "8M", &["-b", &s(&base), "-F", "qcow2"]);
    qemu_io(
        &top,
        &[
            "write -P 3 512k 256k",
            "write -z 1M 128k",
            "discard 2M 64k",
            "write -z -u 3M 64k",
            "write -P 5 3584k 64k",
            "write -P 6 5M 64k",
            "write -z 5M 64k",
        ],
    );
    map_same(&base);
    map_same(&top);

    // A v2 overlay: discard falls through to the backing file.
    let v2 = d.path("v2.qcow2");
    create_qcow2(
        &v2,
        "",
        &["-o", "compat=0.10", "-b", &s(&top), "-F", "qcow2"],
    );
    qemu_io(
        &v2,
        &["discard 0 64k", "write -z 3M 64k", "write -P 3 7M 1M"],
    );
    map_same(&v2);

    // Raw files: holes read as zeros; a raw backing file.
    let raw = d.path("r.raw");
    qemu_img(&["create", "-q", "-f", "raw", &s(&raw), "1M"]);
    let (c, o, e) = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 128k 64k", &s(&raw)],
    );
    assert_eq!(c, 0, "{o}{e}");
    map_same(&raw);
    let rt = d.path("rt.qcow2");
    create_qcow2(&rt, "2M", &["-b", &s(&raw), "-F", "raw"]);
    qemu_io(&rt, &["write -P 1 64k 64k"]);
    map_same(&rt);

    // Metadata preallocation: data clusters over host holes read as zero.
    let pm = d.path("pm.qcow2");
    create_qcow2(&pm, "1M", &["-o", "preallocation=metadata"]);
    qemu_io(&pm, &["write -P 1 0 64k"]);
    map_same(&pm);

    // Our own images too.
    let own = d.path("own.qcow2");
    ox_ok(&["create", "-q", "-f", "qcow2", &s(&own), "0"]);
    map_same(&own);
}

#[test]
fn map_of_compressed_clusters() {
    let d = Scratch::new("cli-mapc");
    let img = d.path("c.qcow2");
    create_qcow2(&img, "4M", &[]);
    qemu_io(
        &img,
        &[
            "write -c -P 7 0 64k",
            "write -c -P 8 64k 64k",
            "write -P 9 128k 64k",
        ],
    );
    let q = qemu_img(&["map", "--output=json", &s(&img)]);
    assert_eq!(q, ox_ok(&["map", "--output=json", &s(&img)]));
    assert!(q.contains("\"compressed\": true"));
    // The human form cannot show compressed clusters.
    let (code, out, err) = ox(&["map", &s(&img)]);
    assert_eq!(code, 1);
    assert_eq!(
        out,
        "Offset          Length          Mapped to       File\n"
    );
    assert_eq!(
        err,
        "oxqcow: File contains external, encrypted or compressed clusters.\n"
    );
}

// ---- convert ----------------------------------------------------------------------

/// A raw file with random data, zero blocks and a hole.
fn sample_raw(path: &Path, seed: u64) {
    let mut rng = Rng(seed);
    let mut data = vec![0u8; 6 << 20];
    for chunk in data.chunks_mut(64 << 10).step_by(3) {
        for b in chunk.iter_mut() {
            *b = rng.next() as u8;
        }
    }
    // An odd little bit of data in an otherwise zero cluster.
    data[(4 << 20) + 4097] = 0x55;
    std::fs::write(path, &data).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(9 << 20).unwrap();
}

fn files_equal(a: &Path, b: &Path) {
    let (code, out, err) = run("cmp", &[&s(a), &s(b)]);
    assert_eq!(code, 0, "cmp: {out}{err}");
}

#[test]
fn convert_round_trip() {
    let d = Scratch::new("cli-conv");
    let src = d.path("src.raw");
    sample_raw(&src, 42);
    for opts in [
        "",
        "compat=0.10",
        "lazy_refcounts=on,cluster_size=4k",
        "cluster_size=2M,refcount_bits=1",
    ] {
        let q = d.path("out.qcow2");
        let back = d.path("back.raw");
        let mut a = vec!["convert", "-f", "raw", "-O", "qcow2"];
        if !opts.is_empty() {
            a.extend_from_slice(&["-o", opts]);
        }
        let (qs, srcs) = (s(&q), s(&src));
        a.extend_from_slice(&[&srcs, &qs]);
        assert_eq!(ox_ok(&a), "");
        assert_clean(&q);
        assert_same_as_raw(&q, &src);
        ox_ok(&["convert", "-O", "raw", &qs, &s(&back)]);
        files_equal(&src, &back);
        // Zeros were not written: the zero parts stay unallocated.
        let m = ox_ok(&["map", "--output=json", &qs]);
        assert!(
            m.contains("\"start\": 65536, \"length\": 131072, \"depth\": 0, \"present\": false")
                || opts.contains("2M"),
            "zero clusters were allocated with -o {opts}: {m}"
        );
        let info = ox_ok(&["info", "--output=json", &qs]);
        assert!(info.contains("\"dirty-flag\": false"), "{info}");
    }
}

#[test]
fn convert_progress_and_sparse_options() {
    let d = Scratch::new("cli-convp");
    let src = d.path("src.raw");
    sample_raw(&src, 7);
    let q = d.path("p.qcow2");
    let out = ox_ok(&["convert", "-p", "-O", "qcow2", &s(&src), &s(&q)]);
    assert!(out.starts_with("    (0.00/100%)\r"), "{out:?}");
    assert!(out.ends_with("    (100.00/100%)\r\n"), "{out:?}");
    assert_clean(&q);
    assert_eq!(
        ox_ok(&["convert", "-p", "-q", "-O", "qcow2", &s(&src), &s(&q)]),
        ""
    );
    // -S 0 writes everything.
    ox_ok(&["convert", "-S", "0", "-O", "qcow2", &s(&src), &s(&q)]);
    assert_clean(&q);
    assert_same_as_raw(&q, &src);
    let m = ox_ok(&["map", "--output=json", &s(&q)]);
    assert!(!m.contains("\"present\": false"), "{m}");
    let (code, _, err) = ox(&["convert", "-S", "100", &s(&src), &s(&q)]);
    assert_eq!(code, 1);
    assert!(err.starts_with("oxqcow: Invalid buffer size for sparse output"));
}

#[test]
fn convert_compressed_and_chained_images_like_qemu_img() {
    let d = Scratch::new("cli-convc");
    let src = d.path("src.raw");
    sample_raw(&src, 9);
    let base = d.path("base.qcow2");
    for ctype in ["zlib", "zstd"] {
        let c = d.path(&format!("{ctype}.qcow2"));
        let o = format!("compression_type={ctype}");
        qemu_img(&["convert", "-c", "-O", "qcow2", "-o", &o, &s(&src), &s(&c)]);
        let theirs = d.path("theirs.raw");
        let ours = d.path("ours.raw");
        qemu_img(&["convert", "-O", "raw", &s(&c), &s(&theirs)]);
        ox_ok(&["convert", "-O", "raw", &s(&c), &s(&ours)]);
        files_equal(&theirs, &ours);
        files_equal(&src, &ours);
        if ctype == "zlib" {
            std::fs::copy(&c, &base).unwrap();
        }
    }
    // An overlay on the compressed image: the chain is flattened.
    let top = d.path("top.qcow2");
    create_qcow2(&top, "", &["-b", &s(&base), "-F", "qcow2"]);
    qemu_io(
        &top,
        &[
            "write -P 0xaa 100k 300k",
            "write -z 2M 1M",
            "discard 4M 64k",
        ],
    );
    let theirs = d.path("t2.raw");
    let ours = d.path("o2.raw");
    qemu_img(&["convert", "-O", "raw", &s(&top), &s(&theirs)]);
    ox_ok(&["convert", "-O", "raw", &s(&top), &s(&ours)]);
    files_equal(&theirs, &ours);
    let flat = d.path("flat.qcow2");
    ox_ok(&["convert", "-O", "qcow2", &s(&top), &s(&flat)]);
    assert_clean(&flat);
    assert_same_as_raw(&flat, &theirs);
}

// ---- dump-header ------------------------------------------------------------------

const FRESH_64M: &str = "magic                     0x514649fb
version                   3
backing_file_offset       0x0
backing_file_size         0x0
cluster_bits              16
size                      67108864
crypt_method              0
l1_size                   1
l1_table_offset           0x30000
refcount_table_offset     0x10000
refcount_table_clusters   1
nb_snapshots              0
snapshot_offset           0x0
incompatible_features     []
compatible_features       []
autoclear_features        []
refcount_order            4
header_length             112

Header extension:
magic                     0x6803f857 (Feature table)
length                    384
data                      <binary>

";

#[test]
fn dump_header_of_fresh_and_edited_images() {
    let d = Scratch::new("cli-dump");
    let img = d.path("a.qcow2");
    ox_ok(&["create", "-q", "-f", "qcow2", &s(&img), "64M"]);
    assert_eq!(ox_ok(&["dump-header", &s(&img)]), FRESH_64M);

    // Add an unknown extension after the feature table (112 + 8 + 384).
    let mut b = std::fs::read(&img).unwrap();
    let text = b"This is a test header extension";
    let at = 504;
    b[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    b[at + 4..at + 8].copy_from_slice(&(text.len() as u32).to_be_bytes());
    b[at + 8..at + 8 + text.len()].copy_from_slice(text);
    let at2 = at + 8 + 32;
    b[at2..at2 + 4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    b[at2 + 4..at2 + 8].copy_from_slice(&3u32.to_be_bytes());
    b[at2 + 8..at2 + 11].copy_from_slice(&[1, 2, 3]);
    // And an incompatible feature bit no one knows: the engine refuses it.
    b[72..80].copy_from_slice(&((1u64 << 63) | 1).to_be_bytes());
    std::fs::write(&img, &b).unwrap();
    let expected = FRESH_64M.replace(
        "incompatible_features     []",
        "incompatible_features     [0, 63]",
    ) + "Header extension:
magic                     0x12345678 (<unknown>)
length                    31
data                      'This is a test header extension'

Header extension:
magic                     0xdeadbeef (<unknown>)
length                    3
data                      <binary>

";
    assert_eq!(ox_ok(&["dump-header", &s(&img)]), expected);
    let (code, _, err) = ox(&["info", &s(&img)]);
    assert_eq!(code, 1);
    assert!(err.starts_with("oxqcow: "), "{err}");

    // v2 with a backing file: no feature words, the name after the extensions.
    let v2 = d.path("v2.qcow2");
    ox_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        "-u",
        &s(&v2),
        "1M",
    ]);
    let out = ox_ok(&["dump-header", &s(&v2)]);
    assert!(out.contains("version                   2\n"), "{out}");
    assert!(
        out.contains("backing_file_offset       0x60\nbacking_file_size         0x7\n"),
        "{out}"
    );
    assert!(
        out.contains("refcount_order            4\nheader_length             72\n"),
        "{out}"
    );
    assert!(out.ends_with(
        "Header extension:\nmagic                     0xe2792aca (Backing format)\nlength                    5\ndata                      'qcow2'\n\n"
    ), "{out}");
}

#[test]
fn dump_header_of_bitmaps() {
    let d = Scratch::new("cli-dumpbm");
    let img = d.path("bm.qcow2");
    create_qcow2(&img, "1M", &[]);
    qemu_img(&["bitmap", "--add", &s(&img), "b0"]);
    let out = ox_ok(&["dump-header", &s(&img)]);
    assert!(out.contains("magic                     0x23852875 (Bitmaps)\nlength                    24\nnb_bitmaps                1\nreserved32                0\nbitmap_directory_size     0x20\n"), "{out}");
    assert!(out.contains("\nBitmap name               b0\n"), "{out}");
    assert!(
        out.contains("flags                     0x2 (['auto'])\n"),
        "{out}"
    );
    assert!(out.contains("Bitmap table   type            size         offset\n0              all-zeroes      0            0\n"), "{out}");
    info_same(&img, &[]);
}

// ---- errors -----------------------------------------------------------------------

#[test]
fn errors_are_one_line_with_status_1() {
    let d = Scratch::new("cli-err");
    let missing = s(&d.path("missing.qcow2"));
    let garbage = d.path("garbage.qcow2");
    let mut g = vec![0u8; 4096];
    g[..4].copy_from_slice(b"QFI\xfb");
    g[4..8].copy_from_slice(&3u32.to_be_bytes());
    g[20..24].copy_from_slice(&99u32.to_be_bytes());
    std::fs::write(&garbage, &g).unwrap();
    let tiny = d.path("tiny");
    std::fs::write(&tiny, b"QFI").unwrap();
    let (gs, ts) = (s(&garbage), s(&tiny));
    let out = s(&d.path("out"));
    let cases: Vec<Vec<&str>> = vec![
        vec!["info", &missing],
        vec!["info", "--output=json", &gs],
        vec!["info", "-f", "qcow2", &ts],
        vec!["map", &missing],
        vec!["map", &gs],
        vec!["convert", &missing, &out],
        vec!["convert", "-O", "qcow2", &gs, &out],
        vec!["convert", "-O", "vmdk", &ts, &out],
        vec!["dump-header", &missing],
        vec!["dump-header", &ts],
        vec!["create", "-f", "qcow2", &out],
        vec![
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3000",
            &out,
            "1M",
        ],
        vec!["info"],
        vec!["frobnicate"],
    ];
    for c in cases {
        let (code, _, err) = ox(&c);
        assert_eq!(code, 1, "{c:?}: {err}");
        assert!(err.starts_with("oxqcow: "), "{c:?}: {err}");
        assert!(!err.contains("panicked"), "{c:?}: {err}");
    }
    // qemu-img's wording: the format layer's open names the file again.
    let (_, _, err) = ox(&["info", &missing]);
    assert_eq!(
        err,
        format!(
            "oxqcow: Could not open '{missing}': Could not open '{missing}': No such file or directory\n"
        )
    );
    // dump-header shows whatever is there, even a header no one can open.
    let outp = ox_ok(&["dump-header", &gs]);
    assert!(outp.contains("cluster_bits              99\n"), "{outp}");
}
