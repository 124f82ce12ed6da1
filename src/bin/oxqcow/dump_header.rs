//! `oxqcow dump-header`: the qcow2 header and its extensions in the text
//! format of QEMU iotests' `qcow2.py dump-header`. Owns its own decoding
//! of the raw bytes (no validation beyond staying inside the file), so it
//! works on images the engine refuses to open.

use crate::util::{ioerr, CliResult};
use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;

#[derive(clap::Args)]
pub struct Args {
    /// Image file
    filename: String,
}

const EXT_BITMAPS: u32 = 0x2385_2875;

/// Reads up to `len` bytes at `off`; fewer at the end of the file.
fn read_at(f: &File, file_len: u64, off: u64, len: u64) -> Vec<u8> {
    if off >= file_len {
        return Vec::new();
    }
    let n = len.min(file_len - off) as usize;
    let mut b = vec![0u8; n];
    let mut done = 0;
    while done < n {
        match f.read_at(&mut b[done..], off + done as u64) {
            Ok(0) | Err(_) => break,
            Ok(k) => done += k,
        }
    }
    b.truncate(done);
    b
}

fn be16(b: &[u8], o: usize) -> u64 {
    u16::from_be_bytes([b[o], b[o + 1]]) as u64
}
fn be32(b: &[u8], o: usize) -> u64 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as u64
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// A feature word as a Python list of its set bit numbers.
fn bit_list(v: u64) -> String {
    let bits: Vec<String> = (0..64)
        .filter(|b| v & (1u64 << b) != 0)
        .map(|b| b.to_string())
        .collect();
    format!("[{}]", bits.join(", "))
}

fn ext_name(magic: u32) -> &'static str {
    match magic {
        0xe279_2aca => "Backing format",
        0x6803_f857 => "Feature table",
        0x0537_be77 => "Crypto header",
        EXT_BITMAPS => "Bitmaps",
        0x4441_5441 => "Data file",
        _ => "<unknown>",
    }
}

/// Python's `string.printable`, byte by byte.
fn printable(c: u8) -> bool {
    (0x20..=0x7e).contains(&c) || (9..=13).contains(&c)
}

fn line(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{name:<25} {value}");
}

pub fn run(a: Args) -> CliResult<()> {
    let name = &a.filename;
    let f = File::open(name).map_err(|e| format!("Could not open '{name}': {}", ioerr(&e)))?;
    let file_len = f
        .metadata()
        .map_err(|e| format!("{name}: {}", ioerr(&e)))?
        .len();
    let mut h = read_at(&f, file_len, 0, 104);
    if h.len() < 72 {
        return Err(format!("{name}: File too short for a qcow2 header"));
    }
    h.resize(104, 0);
    let version = be32(&h, 4);
    let backing_file_offset = be64(&h, 8);
    let cluster_bits = be32(&h, 20);
    let (incompat, compat, autoclear, refcount_order, header_length) = if version == 2 {
        (0, 0, 0, 4, 72)
    } else {
        (
            be64(&h, 72),
            be64(&h, 80),
            be64(&h, 88),
            be32(&h, 96),
            be32(&h, 100),
        )
    };
    let mut out = String::new();
    line(&mut out, "magic", format!("{:#x}", be32(&h, 0)));
    line(&mut out, "version", version);
    line(
        &mut out,
        "backing_file_offset",
        format!("{backing_file_offset:#x}"),
    );
    line(
        &mut out,
        "backing_file_size",
        format!("{:#x}", be32(&h, 16)),
    );
    line(&mut out, "cluster_bits", cluster_bits);
    line(&mut out, "size", be64(&h, 24));
    line(&mut out, "crypt_method", be32(&h, 32));
    line(&mut out, "l1_size", be32(&h, 36));
    line(&mut out, "l1_table_offset", format!("{:#x}", be64(&h, 40)));
    line(
        &mut out,
        "refcount_table_offset",
        format!("{:#x}", be64(&h, 48)),
    );
    line(&mut out, "refcount_table_clusters", be32(&h, 56));
    line(&mut out, "nb_snapshots", be32(&h, 60));
    line(&mut out, "snapshot_offset", format!("{:#x}", be64(&h, 64)));
    line(&mut out, "incompatible_features", bit_list(incompat));
    line(&mut out, "compatible_features", bit_list(compat));
    line(&mut out, "autoclear_features", bit_list(autoclear));
    line(&mut out, "refcount_order", refcount_order);
    line(&mut out, "header_length", header_length);
    out.push('\n');

    let cluster_size = 1u64.checked_shl(cluster_bits as u32).unwrap_or(u64::MAX);
    let end = if backing_file_offset != 0 {
        cluster_size.min(backing_file_offset)
    } else {
        cluster_size
    };
    let mut pos = header_length;
    while pos < end {
        let eh = read_at(&f, file_len, pos, 8);
        if eh.len() < 8 {
            break;
        }
        let magic = be32(&eh, 0) as u32;
        let length = be32(&eh, 4);
        if magic == 0 {
            break;
        }
        let data_off = pos + 8;
        out.push_str("Header extension:\n");
        line(
            &mut out,
            "magic",
            format!("{magic:#x} ({})", ext_name(magic)),
        );
        line(&mut out, "length", length);
        if magic == EXT_BITMAPS {
            dump_bitmaps(&mut out, &f, file_len, data_off, cluster_size);
        } else {
            let data = read_at(&f, file_len, data_off, length);
            if data.iter().all(|&c| printable(c)) {
                line(
                    &mut out,
                    "data",
                    format!("'{}'", String::from_utf8_lossy(&data)),
                );
            } else {
                line(&mut out, "data", "<binary>");
            }
        }
        out.push('\n');
        pos = data_off + ((length + 7) & !7);
    }
    print!("{out}");
    Ok(())
}

/// The bitmaps extension, its directory and each bitmap's table.
fn dump_bitmaps(out: &mut String, f: &File, file_len: u64, off: u64, cluster_size: u64) {
    let mut e = read_at(f, file_len, off, 24);
    e.resize(24, 0);
    let nb = be32(&e, 0);
    let dir_size = be64(&e, 8);
    let dir_off = be64(&e, 16);
    line(out, "nb_bitmaps", nb);
    line(out, "reserved32", be32(&e, 4));
    line(out, "bitmap_directory_size", format!("{dir_size:#x}"));
    line(out, "bitmap_directory_offset", format!("{dir_off:#x}"));
    let mut pos = dir_off;
    // QEMU allows at most 65535 bitmaps.
    for _ in 0..nb.min(65535) {
        let d = read_at(f, file_len, pos, 24);
        if d.len() < 24 {
            break;
        }
        let table_offset = be64(&d, 0);
        let table_size = be32(&d, 8);
        let flags = be32(&d, 12);
        let name_size = be16(&d, 18);
        let extra = be32(&d, 20);
        let name = read_at(f, file_len, pos + 24 + extra, name_size);
        out.push('\n');
        line(out, "Bitmap name", String::from_utf8_lossy(&name));
        line(out, "bitmap_table_offset", format!("{table_offset:#x}"));
        line(out, "bitmap_table_size", table_size);
        line(out, "flags", bitmap_flags(flags));
        line(out, "type", d[16]);
        line(out, "granularity_bits", d[17]);
        line(out, "name_size", name_size);
        line(out, "extra_data_size", extra);
        let _ = writeln!(
            out,
            "{:<14} {:<15} {:<12} offset",
            "Bitmap table", "type", "size"
        );
        let table = read_at(f, file_len, table_offset, (table_size * 8).min(64 << 20));
        for (i, c) in table.chunks_exact(8).enumerate() {
            let v = be64(c, 0);
            let offset = v & 0x00ff_ffff_ffff_fe00;
            let kind = match (offset != 0, v & 1 != 0) {
                (true, true) => "invalid",
                (true, false) => "serialized",
                (false, true) => "all-ones",
                (false, false) => "all-zeroes",
            };
            let size = if kind == "serialized" {
                cluster_size
            } else {
                0
            };
            let _ = writeln!(out, "{i:<14} {kind:<15} {size:<12} {offset}");
        }
        let raw = 24 + name_size + extra;
        pos += (raw + 7) & !7;
    }
}

/// Bitmap flags as qcow2.py shows them: `0x2 (['auto'])`.
fn bitmap_flags(v: u64) -> String {
    let names: Vec<String> = (0..64)
        .filter(|b| v & (1u64 << b) != 0)
        .map(|b| match 1u64 << b {
            1 => "'in-use'".to_string(),
            2 => "'auto'".to_string(),
            _ => format!("'bit-{b}'"),
        })
        .collect();
    format!("{v:#x} ([{}])", names.join(", "))
}
