//! `oxqcow` creates files byte-identical to `qemu-img create -f qcow2`.

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
