//! `json:` backing file names with a raw node that windows its file
//! (QEMU's `offset` and `size` options): oxqcow reads the same guest
//! bytes as qemu-io does through the same overlay.

mod common;
use common::*;
use oxqcow::engine::Qcow2;
use oxqcow::OpenOptions;

#[test]
fn raw_node_with_offset_and_size_under_a_backing_file() {
    let d = Scratch::new("json-window");
    let base = d.path("base.raw");
    let top = d.path("top.qcow2");
    let mut raw = vec![0u8; 2 << 20];
    raw[..65536].fill(1);
    raw[1 << 20..(1 << 20) + 65536].fill(2);
    raw[(1 << 20) + 65536..(1 << 20) + 131072].fill(3);
    std::fs::write(&base, &raw).unwrap();
    let b = base.display().to_string();
    // Guest bytes 0..64k come from file byte 1M; the window ends at 96k.
    let json = format!(
        "json:{{'driver': 'raw', 'file': {{'driver': 'raw', 'offset': 1048576, \
         'size': 98304, 'file': {{'driver': 'file', 'filename': '{b}'}}}}}}"
    );
    let t = top.display().to_string();
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-F", "raw", "-b", &json, &t, "1M",
    ]);
    // QEMU's view of the same overlay.
    qemu_io(
        &top,
        &["read -P 2 0 64k", "read -P 3 64k 32k", "read -P 0 96k 32k"],
    );
    let q = Qcow2::open(&top, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 131072];
    q.read_at(&mut buf, 0).unwrap();
    assert!(buf[..65536].iter().all(|&x| x == 2));
    assert!(buf[65536..98304].iter().all(|&x| x == 3));
    assert!(buf[98304..].iter().all(|&x| x == 0), "past the window");
    // A write to the overlay copies from the window, not from the file.
    drop(q);
    let rw = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let q = Qcow2::open(&top, &rw).unwrap();
    q.write_at(&[9; 512], 65536 + 512).unwrap();
    q.close().unwrap();
    drop(q);
    assert_clean(&top);
    qemu_io(
        &top,
        &[
            "read -P 3 64k 512",
            "read -P 9 66048 512",
            "read -P 3 66560 31232",
        ],
    );
}
