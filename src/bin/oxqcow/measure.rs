//! `oxqcow measure`: how large a qcow2 or raw image would be, computed as
//! qemu-img measure computes it: for qcow2 the metadata of a fully
//! allocated image (header, L2 and L1 tables, refcount structure found as
//! a fixed point) plus the data clusters; "required" counts only the
//! target clusters the source's data touches. Owns the -o option checks
//! in qemu-img's order and wording, and the persistent-bitmap estimate.

use crate::img_util::{open_named, parse_size_param, usage_error, Named};
use crate::util::{file_extent, parse_c_number, parse_img_size, split_opts, virtual_size};
use crate::util::{CliResult, Json, Obj};
use oxqcow::format::header::Header;
use oxqcow::format::AUTOCLEAR_BITMAPS;
use oxqcow::{Image, OpenOptions};
use std::fs::File;
use std::os::unix::fs::FileExt;

#[derive(clap::Args)]
pub struct Args {
    /// Output format: human or json
    #[arg(long = "output", value_name = "human|json", default_value = "human")]
    output: String,
    /// Target format: raw (default) or qcow2
    #[arg(short = 'O', long = "target-format", value_name = "OUTPUT_FMT")]
    out_fmt: Option<String>,
    /// Target options, NAME=VALUE[,NAME=VALUE...] (may be repeated)
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    options: Vec<String>,
    /// Measure a new image of this virtual size
    #[arg(
        short = 's',
        long = "size",
        value_name = "SIZE",
        allow_hyphen_values = true
    )]
    size: Option<String>,
    /// Source image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    fmt: Option<String>,
    /// FILENAME is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Open the source in shared mode (accepted, ignored)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Define an object: secret,id=ID,data=PASSWORD|file=PATH[,format=raw|base64]
    #[arg(long = "object", value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// Measure an internal snapshot of the source: NAME_OR_ID, or
    /// snapshot.id=ID[,snapshot.name=NAME]
    #[arg(short = 'l', value_name = "SNAPSHOT_PARAM")]
    snapshot: Option<String>,
    /// Image to convert (instead of --size)
    filenames: Vec<String>,
}

/// The qcow2 target options measure looks at.
struct Qcow2Target {
    cluster_size: u64,
    version: u32,
    refcount_bits: u64,
    extended_l2: bool,
    prealloc_full: bool,
    backing: bool,
    size: u64,
    /// Bytes of a LUKS header (header and key material) the image holds.
    crypto_header: u64,
}

/// The result, as BlockMeasureInfo.
struct Measure {
    required: u64,
    fully_allocated: u64,
    bitmaps: Option<u64>,
}

pub fn run(a: Args) -> CliResult<()> {
    let _ = a.force_share;
    crate::secret::define(&a.object)?;
    let json = match a.output.as_str() {
        "human" => false,
        "json" => true,
        other => usage_error(
            "measure",
            &format!("--output expects 'human' or 'json' not '{other}'"),
        ),
    };
    if a.filenames.len() > 1 {
        return Err("At most one filename argument is allowed.".into());
    }
    let file = a.filenames.first();
    let size = match &a.size {
        Some(s) if s.trim_start().starts_with('-') => {
            return Err(
                "Invalid image size specified. Must be between 0 and 9223372036854775807.".into(),
            )
        }
        Some(s) => Some(parse_img_size(s)?),
        None => None,
    };
    if file.is_none() && (a.image_opts || a.fmt.is_some() || a.snapshot.is_some()) {
        return Err("--image-opts, -f, and -l require a filename argument.".into());
    }
    match (file, size) {
        (Some(_), Some(_)) => {
            return Err("--size N cannot be used together with a filename.".into())
        }
        (None, None) => return Err("Either --size N or one filename must be specified.".into()),
        _ => {}
    }
    let out_fmt = a.out_fmt.as_deref().unwrap_or("raw");
    let opts = split_opts(&a.options);
    let src = match file {
        Some(f) => {
            let named = open_named(f, a.image_opts, a.fmt.as_deref(), &OpenOptions::default())?;
            if let Some(p) = &a.snapshot {
                crate::convert::load_snapshot(&named.img, p)?;
            }
            Some(named)
        }
        None => None,
    };
    let m = match out_fmt {
        "qcow2" => {
            let mut t = qcow2_target(&opts)?;
            if let Some(s) = size {
                t.size = s;
            }
            measure_qcow2(&t, src.as_ref(), file.map(|s| s.as_str()))?
        }
        "raw" => {
            raw_target(&opts)?;
            let required = match &src {
                Some(named) => virtual_size(&named.img),
                None => size.unwrap_or(0).div_ceil(512) * 512,
            };
            Measure {
                required,
                fully_allocated: required,
                bitmaps: None,
            }
        }
        other => {
            return Err(format!(
                "Block driver '{other}' does not support size measurement"
            ))
        }
    };
    if json {
        let mut o = Obj::new()
            .put_int("required", m.required)
            .put_int("fully-allocated", m.fully_allocated);
        if let Some(b) = m.bitmaps {
            o = o.put_int("bitmaps", b);
        }
        println!("{}", Json::Obj(o).pretty());
    } else {
        println!("required size: {}", m.required);
        println!("fully allocated size: {}", m.fully_allocated);
        if let Some(b) = m.bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(())
}

fn invalid_options(fmt: &str, msg: String) -> String {
    format!(
        "{msg}\n{}: Invalid options for file format '{fmt}'",
        crate::util::prgname()
    )
}

fn bool_value(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{k}' expects 'on' or 'off'")),
    }
}

/// Checks raw target options (only size and preallocation exist).
fn raw_target(opts: &[(String, String)]) -> CliResult<()> {
    for (k, v) in opts {
        match k.as_str() {
            "size" => {
                parse_size_param(k, v).map_err(|e| invalid_options("raw", e))?;
            }
            "preallocation" => {}
            _ => return Err(invalid_options("raw", format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(())
}

/// Parses qcow2 target options: names and types in the order given, then
/// the driver's checks in its own order.
fn qcow2_target(opts: &[(String, String)]) -> CliResult<Qcow2Target> {
    let inv = |m: String| invalid_options("qcow2", m);
    let mut t = Qcow2Target {
        cluster_size: 65536,
        version: 3,
        refcount_bits: 16,
        extended_l2: false,
        prealloc_full: false,
        backing: false,
        size: 0,
        crypto_header: 0,
    };
    let mut compat: Option<String> = None;
    let mut refcount_bits: Option<u64> = None;
    let mut prealloc: Option<String> = None;
    let mut encrypt_format: Option<String> = None;
    for (k, v) in opts {
        match k.as_str() {
            "size" => t.size = parse_size_param(k, v).map_err(inv)?,
            "cluster_size" => t.cluster_size = parse_size_param(k, v).map_err(inv)?,
            "lazy_refcounts" | "data_file_raw" | "encryption" => {
                bool_value(k, v).map_err(inv)?;
            }
            "extended_l2" => t.extended_l2 = bool_value(k, v).map_err(inv)?,
            "refcount_bits" => {
                refcount_bits = Some(
                    parse_c_number(v)
                        .ok_or_else(|| inv(format!("Parameter '{k}' expects a number")))?,
                )
            }
            "encrypt.iter-time" => {
                parse_c_number(v)
                    .ok_or_else(|| inv(format!("Parameter '{k}' expects a number")))?;
            }
            "compat" => compat = Some(v.clone()),
            "preallocation" => prealloc = Some(v.clone()),
            "backing_file" => t.backing = true,
            "encrypt.format" => encrypt_format = Some(v.clone()),
            "backing_fmt"
            | "data_file"
            | "compression_type"
            | "encrypt.key-secret"
            | "encrypt.cipher-alg"
            | "encrypt.cipher-mode"
            | "encrypt.ivgen-alg"
            | "encrypt.ivgen-hash-alg"
            | "encrypt.hash-alg" => {}
            _ => return Err(inv(format!("Invalid parameter '{k}'"))),
        }
    }
    let cs = t.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err("Cluster size must be a power of two between 512 and 2048k".into());
    }
    if t.extended_l2 && cs < 16384 {
        return Err(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                .into(),
        );
    }
    if let Some(c) = compat {
        t.version = match c.as_str() {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            _ => return Err(format!("Invalid compatibility level: '{c}'")),
        };
    }
    if let Some(b) = refcount_bits {
        if b == 0 || !b.is_power_of_two() || b > 64 {
            return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
        }
        if t.version < 3 && b != 16 {
            return Err("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into());
        }
        t.refcount_bits = b;
    }
    if let Some(p) = prealloc {
        t.prealloc_full = match p.as_str() {
            "off" | "metadata" => false,
            "falloc" | "full" => true,
            _ => return Err(format!("invalid parameter value: {p}")),
        };
    }
    if encrypt_format.as_deref() == Some("luks") {
        // As qemu-img: the secret must exist; the header's size follows
        // from the cipher's key length.
        let enc: Vec<(String, String)> = opts
            .iter()
            .filter(|(k, _)| oxqcow::crypto::is_encrypt_option(k))
            .cloned()
            .collect();
        let e = oxqcow::crypto::encrypt_create_from_options(&enc, &mut |id| {
            crate::secret::get(id).map_err(oxqcow::Error::InvalidArgument)
        })
        .map_err(|e| crate::util::errmsg(&e))?;
        if let Some(e) = e {
            t.crypto_header = oxqcow::crypto::luks::area_len(e.spec.key_bytes());
        }
    }
    Ok(t)
}

/// Refcount table and block clusters needed to count `clusters` host
/// clusters and themselves: the smallest fixed point.
fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = cs * 8 / (1u64 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    (blocks + table) * cs
}

/// Bytes of a fully allocated image of `size` bytes: metadata and data.
fn prealloc_size(size: u64, cs: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let aligned = size.div_ceil(cs) * cs;
    let l2e = oxqcow::format::l2_entry_bytes(extended_l2);
    let mut meta = cs;
    let nl2e = (aligned / cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).div_ceil(cs / 8) * (cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_order);
    meta + aligned
}

fn measure_qcow2(t: &Qcow2Target, src: Option<&Named>, file: Option<&str>) -> CliResult<Measure> {
    let cs = t.cluster_size;
    let l2e = oxqcow::format::l2_entry_bytes(t.extended_l2);
    let mut vsize = t.size.div_ceil(cs) * cs;
    let l2_tables = (vsize / cs).div_ceil(cs / l2e);
    if l2_tables * 8 > 32 << 20 {
        return Err("The image size is too large (try using a larger cluster size)".into());
    }
    let mut required = 0u64;
    if let Some(named) = src {
        let ssize = virtual_size(&named.img);
        vsize = ssize.div_ceil(cs) * cs;
        if t.backing {
            // Nothing is known about what the new backing file shares.
            required = vsize;
        } else {
            required = data_clusters_bytes(named, ssize, cs)?;
        }
    }
    if t.prealloc_full {
        required = vsize;
    }
    let order = t.refcount_bits.trailing_zeros();
    let fully_allocated = prealloc_size(vsize, cs, order, t.extended_l2);
    let bitmaps = match (src.map(|n| &n.img), file) {
        (Some(img @ Image::Qcow2(q)), Some(f)) if t.version >= 3 && q.version() >= 3 => {
            Some(bitmaps_size(&q.header(), f, virtual_size(img), cs))
        }
        _ => None,
    };
    let crypto = t.crypto_header.div_ceil(cs) * cs;
    Ok(Measure {
        required: fully_allocated - vsize + required + crypto,
        fully_allocated: fully_allocated + crypto,
        bitmaps,
    })
}

/// Bytes of whole target clusters that the source's data touches (zero
/// and unallocated parts of the source need none).
fn data_clusters_bytes(src: &Named, size: u64, cs: u64) -> CliResult<u64> {
    let img = &src.img;
    let raw_file = match (img, &src.file) {
        (Image::Raw(_), Some(f)) => File::open(f).ok(),
        _ => None,
    };
    let mut layers = crate::map::chain(img, &src.name, src.file.as_deref());
    // Whole target clusters touched by data: the first not yet counted.
    let mut next = 0u64;
    let mut count = |start: u64, len: u64| {
        let first = (start / cs).max(next);
        let last = (start + len - 1) / cs;
        if last >= first {
            next = last + 1;
            last + 1 - first
        } else {
            0
        }
    };
    let mut clusters = 0u64;
    let mut off = 0u64;
    while off < size {
        let want = size - off;
        let n = match &raw_file {
            Some(f) => {
                let (d, n) = file_extent(f, off, want);
                let n = n.clamp(1, want);
                if d {
                    clusters += count(off, n);
                }
                n
            }
            None => {
                let (st, n) = img
                    .block_status(off, want.min(img.size().saturating_sub(off)).max(1))
                    .map_err(|_| "Unable to get block status".to_string())?;
                let n = n.clamp(1, want);
                // Data clusters over holes of a metadata-preallocated file
                // read as zeros and are not counted, as in QEMU.
                for (s, l) in crate::map::nonzero_data(&mut layers, st, off, n)? {
                    clusters += count(s, l);
                }
                n
            }
        };
        off += n;
    }
    Ok(clusters * cs)
}

/// What the source's persistent bitmaps would take in the target: every
/// bitmap fully allocated, its table, and the directory.
fn bitmaps_size(h: &Header, path: &str, vsize: u64, cs: u64) -> u64 {
    let Some(ext) = &h.bitmaps_ext else {
        return 0;
    };
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 || ext.len() < 24 {
        return 0;
    }
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let nb = be32(ext, 0);
    let dir_size = be64(ext, 8);
    let dir_off = be64(ext, 16);
    if dir_size > 64 << 20 {
        return 0;
    }
    let Ok(f) = File::open(path) else {
        return 0;
    };
    let mut dir = vec![0u8; dir_size as usize];
    if f.read_exact_at(&mut dir, dir_off).is_err() {
        return 0;
    }
    let mut total = 0u64;
    let mut dir_bytes = 0u64;
    let mut pos = 0usize;
    for _ in 0..nb {
        if pos + 24 > dir.len() {
            break;
        }
        let e = &dir[pos..];
        let gran_bits = e[17] as u32;
        let name_len = u16::from_be_bytes([e[18], e[19]]) as u64;
        let extra = be32(e, 20) as u64;
        let gran = 1u64.checked_shl(gran_bits).unwrap_or(u64::MAX);
        let bytes = vsize.div_ceil(gran).div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        total += clusters * cs;
        total += (clusters * 8).div_ceil(cs) * cs;
        dir_bytes += (24 + name_len).div_ceil(8) * 8;
        pos += ((24 + extra + name_len).div_ceil(8) * 8) as usize;
    }
    total + dir_bytes.div_ceil(cs) * cs
}
