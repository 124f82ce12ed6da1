//! `oxqcow` creates files byte-identical to `qemu-img create -f qcow2`,
//! and with `data_file=` the same external data file (length, contents,
//! and for cluster-aligned sizes the same allocated blocks).

mod common;
use common::*;
use oxqcow::engine::{create, CreateOptions};

fn compare(opts: &str, size: &str, backing: bool) {
    let d = Scratch::new("create");
    let ours = d.path("ours.qcow2");
    let theirs = d.path("theirs.qcow2");
    let base = d.path("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let mut o = CreateOptions::default();
    let mut full = opts.to_string();
    if backing {
        let extra = format!("backing_file={},backing_fmt=raw", base.display());
        full = if full.is_empty() {
            extra
        } else {
            format!("{full},{extra}")
        };
    }
    o.parse_into(&full).unwrap();
    o.size = oxqcow::engine::parse_size(size).unwrap();
    create(&ours, &o).unwrap_or_else(|e| panic!("create {full} {size}: {e}"));
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !full.is_empty() {
        args.push("-o");
        args.push(&full);
    }
    let t = theirs.display().to_string();
    args.push(&t);
    args.push(size);
    qemu_img(&args);
    let a = std::fs::read(&ours).unwrap();
    let b = std::fs::read(&theirs).unwrap();
    assert_eq!(a.len(), b.len(), "file length differs for -o {full} {size}");
    if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
        panic!(
            "-o {full} {size}: first difference at byte {i:#x}: ours {:#x} theirs {:#x}",
            a[i], b[i]
        );
    }
    assert_clean(&ours);
}

/// The allocated bytes of a file.
fn allocated(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Like [`compare`] with `data_file=DATA` (an absolute name in the scratch
/// directory, the same in both headers) in the options.
fn compare_with_data(opts: &str, size: &str) {
    let d = Scratch::new("create-data");
    let data = d.path("data.raw");
    let full = opts.replace("DATA", &data.display().to_string());
    let ours = d.path("ours.qcow2");
    let theirs = d.path("theirs.qcow2");
    let our_data = d.path("ours-data.raw");
    let mut o = CreateOptions::default();
    o.parse_into(&full).unwrap();
    o.size = oxqcow::engine::parse_size(size).unwrap();
    create(&ours, &o).unwrap_or_else(|e| panic!("create {full} {size}: {e}"));
    std::fs::rename(&data, &our_data).unwrap();
    let t = theirs.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &full, &t, size]);
    let (a, b) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    assert_eq!(a.len(), b.len(), "file length differs for -o {full} {size}");
    if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
        panic!(
            "-o {full} {size}: first difference at byte {i:#x}: ours {:#x} theirs {:#x}",
            a[i], b[i]
        );
    }
    let (ld, lt) = (
        std::fs::metadata(&our_data).unwrap().len(),
        std::fs::metadata(&data).unwrap().len(),
    );
    assert_eq!(ld, lt, "data file length differs for -o {full} {size}");
    let (od, td) = (our_data.display().to_string(), data.display().to_string());
    let (code, out, _) = run("cmp", &[&od, &td]);
    assert_eq!(
        code, 0,
        "data file contents differ for -o {full} {size}: {out}"
    );
    if o.size % o.cluster_size == 0 {
        // QEMU's allocation of a partial last cluster's data is not
        // reproduced block for block (its contents are).
        assert_eq!(
            allocated(&our_data),
            allocated(&data),
            "data file allocation differs for -o {full} {size}"
        );
    }
    std::fs::rename(&our_data, &data).unwrap();
    assert_clean(&ours);
}

macro_rules! data_cases {
    ($($name:ident: $opts:expr, $size:expr;)*) => {
        $( #[test] fn $name() { compare_with_data($opts, $size); } )*
    };
}

data_cases! {
    data_file_64m: "data_file=DATA", "64M";
    data_file_odd: "data_file=DATA", "12345";
    data_file_zero_size: "data_file=DATA", "0";
    data_file_raw: "data_file=DATA,data_file_raw=on", "64M";
    data_file_raw_odd: "data_file=DATA,data_file_raw=on", "12345";
    data_file_raw_off: "data_file=DATA,data_file_raw=off", "1M";
    data_file_512: "data_file=DATA,cluster_size=512,refcount_bits=1", "100M";
    data_file_raw_512: "data_file=DATA,data_file_raw=on,cluster_size=512", "16M";
    data_file_lazy_zstd: "data_file=DATA,lazy_refcounts=on,compression_type=zstd", "1G";
    data_file_metadata: "data_file=DATA,preallocation=metadata", "100M";
    data_file_metadata_odd: "data_file=DATA,preallocation=metadata", "10000000";
    data_file_falloc: "data_file=DATA,preallocation=falloc", "32M";
    data_file_full: "data_file=DATA,preallocation=full", "16M";
    data_file_raw_full_2m: "data_file=DATA,data_file_raw=on,preallocation=full,cluster_size=2M", "1M";
    data_file_big: "data_file=DATA,cluster_size=2M", "4G";
}

macro_rules! cases {
    ($($name:ident: $opts:expr, $size:expr, $backing:expr;)*) => {
        $( #[test] fn $name() { compare($opts, $size, $backing); } )*
    };
}

cases! {
    default_64m: "", "64M", false;
    v2_64m: "compat=0.10", "64M", false;
    v2_backing: "compat=0.10", "64M", true;
    v3_backing: "", "1G", true;
    cs512: "cluster_size=512", "64M", false;
    cs512_1g: "cluster_size=512", "1G", false;
    cs512_max: "cluster_size=512", "128G", false;
    cs512_rc64_max: "cluster_size=512,refcount_bits=64", "100G", false;
    cs1k_v2: "cluster_size=1024,compat=0.10", "100M", false;
    cs4k: "cluster_size=4096", "1G", false;
    cs8k_lazy: "cluster_size=8192,lazy_refcounts=on", "1G", false;
    cs32k: "cluster_size=32768", "10G", false;
    cs128k: "cluster_size=131072", "1T", false;
    cs2m: "cluster_size=2M", "64M", false;
    cs2m_big: "cluster_size=2M", "100T", false;
    rc1: "refcount_bits=1", "64M", false;
    rc1_512: "refcount_bits=1,cluster_size=512", "128M", false;
    rc16_lazy: "refcount_bits=16,lazy_refcounts=on", "64M", false;
    rc64: "refcount_bits=64", "64M", false;
    rc64_4k: "refcount_bits=64,cluster_size=4096", "1G", false;
    lazy_off: "lazy_refcounts=off", "64M", false;
    zstd: "compression_type=zstd", "64M", false;
    zstd_lazy_backing: "compression_type=zstd,lazy_refcounts=on", "64M", true;
    prealloc_metadata: "preallocation=metadata", "64M", false;
    prealloc_metadata_512: "preallocation=metadata,cluster_size=512", "8M", false;
    prealloc_metadata_odd: "preallocation=metadata", "10000000", false;
    prealloc_falloc: "preallocation=falloc", "64M", false;
    prealloc_full: "preallocation=full", "16M", false;
    prealloc_full_v2: "preallocation=full,compat=0.10", "16M", false;
    prealloc_falloc_rc1: "preallocation=falloc,refcount_bits=1,cluster_size=4096", "32M", false;
    zero_size: "", "0", false;
    odd_size: "", "12345", false;
}
