//! Images written by QEMU read back through oxqcow byte for byte as QEMU
//! reads them: every cluster-size class, both compat levels, refcount
//! widths, compressed clusters, zero clusters, discards, backing chains and
//! internal snapshots.

mod common;
use common::*;

/// Writes a recognisable pattern set with qemu-io, crossing cluster and L2
/// boundaries, plus zero writes and discards.
fn populate(img: &std::path::Path, cs: u64, size: u64) {
    let l2_span = cs * cs / 8;
    let mut cmds = vec![
        "write -P 0x11 0 4096".to_string(),
        format!("write -P 0x22 {} {}", cs + cs / 3, 3 * cs),
        format!("write -z {} {}", 8 * cs, 2 * cs),
        format!("write -P 0x44 {} {}", 12 * cs, 4 * cs),
        format!("discard {} {}", 13 * cs, 2 * cs),
        format!("write -z -u {} {}", 14 * cs, cs),
        "write -P 0x55 1048576 1000".to_string(),
    ];
    if l2_span + 3 * cs < size {
        cmds.push(format!("write -P 0x33 {} {}", l2_span - 1000, 2 * cs + 77));
    }
    let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qemu_io(img, &refs);
}

fn matrix_case(cs: u64, compat: &str, refcount_bits: u32) {
    let d = Scratch::new("readq");
    let img = d.path("q.qcow2");
    let size = (cs * cs / 8 + 5 * cs).clamp(8 << 20, 64 << 20).max(20 * cs);
    let opts = format!("cluster_size={cs},compat={compat},refcount_bits={refcount_bits}");
    create_qcow2(&img, &size.to_string(), &["-o", &opts]);
    populate(&img, cs, size);
    assert_same_view(&img, &d);
}

#[test]
fn cluster_sizes_and_compat_levels() {
    for cs in [512u64, 4096, 65536, 2 << 20] {
        for compat in ["0.10", "1.1"] {
            matrix_case(cs, compat, 16);
        }
    }
}

#[test]
fn refcount_widths() {
    for bits in [1, 16, 64] {
        matrix_case(65536, "1.1", bits);
        matrix_case(512, "1.1", bits);
    }
}

#[test]
fn compressed_images_zlib_and_zstd() {
    let d = Scratch::new("compressed");
    let raw = d.path("src.raw");
    let mut data = vec![0u8; 6 << 20];
    let mut r = Rng(7);
    for (i, b) in data.iter_mut().enumerate() {
        // Compressible but not trivial; leave some zero holes.
        *b = if (i >> 16) % 5 == 3 {
            0
        } else {
            ((i / 97) as u8) ^ ((r.next() & 3) as u8)
        };
    }
    std::fs::write(&raw, &data).unwrap();
    for (ctype, cs) in [
        ("zlib", 65536),
        ("zstd", 65536),
        ("zlib", 4096),
        ("zstd", 2 << 20),
        ("zlib", 512),
    ] {
        let img = d.path(&format!("c-{ctype}-{cs}.qcow2"));
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ctype},cluster_size={cs}"),
            &raw.display().to_string(),
            &img.display().to_string(),
        ]);
        let map = qemu_img(&["map", "--output=json", &img.display().to_string()]);
        assert!(
            map.contains("\"compressed\": true"),
            "{ctype}: no compressed clusters"
        );
        assert_eq!(read_all_ours(&img), data, "{ctype} cs={cs}");
    }
}

#[test]
fn three_deep_chain_ending_in_raw() {
    let d = Scratch::new("chain");
    let base = d.path("base.raw");
    let mut b = vec![0u8; 3 << 20];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i % 251) as u8;
    }
    std::fs::write(&base, &b).unwrap();
    let mid = d.path("mid.qcow2");
    let top = d.path("top.qcow2");
    // Relative backing names, resolved against the overlay's directory.
    create_qcow2(&mid, "4M", &["-b", "base.raw", "-F", "raw"]);
    qemu_io(
        &mid,
        &[
            "write -P 0xaa 65536 65536",
            "write -z 131072 4096",
            "write -P 0xab 3670016 4096",
        ],
    );
    create_qcow2(
        &top,
        "6M",
        &["-o", "compat=0.10", "-b", "mid.qcow2", "-F", "qcow2"],
    );
    qemu_io(
        &top,
        &["write -P 0xcc 70000 5000", "write -P 0xcd 5242880 65536"],
    );
    assert_same_view(&top, &d);
    let img = oxqcow::Image::open(&top, None, &oxqcow::OpenOptions::default()).unwrap();
    let (st, _) = img.block_status(0, 4096).unwrap();
    assert_eq!(
        st,
        oxqcow::BlockStatus::Data {
            host: Some(0),
            depth: 2
        }
    );
}

#[test]
fn internal_snapshots() {
    let d = Scratch::new("snap");
    let img = d.path("s.qcow2");
    let s = img.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &s, "16M"]);
    qemu_io(&img, &["write -P 1 0 1M", "write -P 2 4M 64k"]);
    qemu_img(&["snapshot", "-c", "one", &s]);
    qemu_io(&img, &["write -P 3 512k 1M", "discard 4M 64k"]);
    qemu_img(&["snapshot", "-c", "two", &s]);
    qemu_io(&img, &["write -P 4 0 4096"]);
    assert_same_view(&img, &d);
}
