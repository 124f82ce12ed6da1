//! `oxqcow info`: what `qemu-img info` shows about an image (and with
//! --backing-chain, about every image below it), as human text or JSON
//! with QEMU's keys and key order. Owns the snapshot table and bitmap
//! directory decoding that only this report needs. Images are opened
//! read-only and without their backing files.

use crate::img_util::open_named;
use crate::util::{dump_human, ioerr, resolve_backing, size_to_str, virtual_size};
use crate::util::{CliResult, Json, Obj};
use oxqcow::crypto::cipher::IvGenAlg;
use oxqcow::crypto::Encryption;
use oxqcow::format::header::Header;
use oxqcow::format::{AUTOCLEAR_BITMAPS, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use oxqcow::format::{AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DATA_FILE};
use oxqcow::{Image, OpenOptions};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;

#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when not given)
    #[arg(short = 'f', value_name = "FMT")]
    fmt: Option<String>,
    /// Output format
    #[arg(long = "output", value_name = "FMT", default_value = "human",
          value_parser = ["human", "json"])]
    output: String,
    /// Show every image of the backing chain
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// Accepted for compatibility (images are always opened read-only)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Define an object: secret,id=ID,data=PASSWORD|file=PATH[,format=raw|base64]
    #[arg(long = "object", value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// FILENAME is an option string (driver=qcow2,file.filename=F,encrypt.key-secret=ID)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Image file (or json:{...}, or an option string with --image-opts)
    filename: String,
}

/// What one image contributes to the report.
struct ImageReport {
    json: Obj,
    human: String,
    /// The next image of the chain: resolved path and format, if named.
    backing: Option<(String, Option<String>)>,
}

pub fn run(a: Args) -> CliResult<()> {
    let _ = a.force_share;
    crate::secret::define(&a.object)?;
    let json = a.output == "json";
    let mut reports = Vec::new();
    let mut seen = HashSet::new();
    let mut next = Some((a.filename.clone(), a.fmt.clone()));
    let mut image_opts = a.image_opts;
    while let Some((spec, fmt)) = next.take() {
        // As qemu-img's BDRV_O_NO_IO open: encrypted images need no password.
        let opts = OpenOptions {
            no_backing: true,
            metadata_only: true,
            ..Default::default()
        };
        let named = open_named(&spec, image_opts, fmt.as_deref(), &opts)?;
        image_opts = false;
        // A quorum node's image is read through its first child here.
        let path = match &named.quorum {
            Some(q) => q.first().cloned().unwrap_or_default(),
            None => named.file.clone().unwrap_or_else(|| spec.clone()),
        };
        let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone().into());
        if !seen.insert(key) {
            return Err(format!("Backing file '{path}' creates an infinite loop."));
        }
        let r = image_report(named.img, &named.name, &path, named.quorum.as_deref())?;
        if a.backing_chain {
            next = r.backing.clone();
        }
        reports.push(r);
    }
    let mut out = String::new();
    if json {
        if a.backing_chain {
            let list = Json::List(reports.into_iter().map(|r| Json::Obj(r.json)).collect());
            out = list.pretty();
        } else if let Some(r) = reports.pop() {
            out = Json::Obj(r.json).pretty();
        }
        out.push('\n');
    } else {
        let texts: Vec<String> = reports.into_iter().map(|r| r.human).collect();
        out = texts.join("\n");
    }
    print!("{out}");
    Ok(())
}

/// The report on one image: `name` is what QEMU calls the node, `path`
/// its host file.
fn image_report(
    img: Image,
    name: &str,
    path: &str,
    quorum: Option<&[String]>,
) -> CliResult<ImageReport> {
    if let Some(c) = img.nbd() {
        return Ok(nbd_report(c.name(), virtual_size(&img)));
    }
    if oxqcow::nbd::is_nbd_name(path) {
        return Err(format!(
            "{path}: oxqcow info reads qcow2 images from files only, not over NBD"
        ));
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("{path}: {}", ioerr(&e)))?;
    // QEMU counts the file in whole sectors.
    let file_len = meta.len().div_ceil(512) * 512;
    let actual = img.allocated_file_size();
    let vsize = virtual_size(&img);

    let (child_info, child_human) = match quorum {
        Some(files) => quorum_child(name, files, file_len, actual),
        None => (file_child(path, file_len, actual), String::new()),
    };
    let children = Json::List(vec![Json::Obj(
        Obj::new()
            .put_str("name", "file")
            .put("info", Json::Obj(child_info)),
    )]);
    let mut human = String::new();
    let _ = writeln!(human, "image: {name}");
    let _ = writeln!(human, "file format: {}", img.format());
    let _ = writeln!(
        human,
        "virtual size: {} ({vsize} bytes)",
        size_to_str(vsize)
    );
    let _ = writeln!(human, "disk size: {}", size_to_str(actual));

    let mut backing = None;
    let json = match img.qcow2() {
        None => Obj::new()
            .put_str("filename", name)
            .put_str("format", "raw")
            .put_bool("dirty-flag", false)
            .put_int("actual-size", actual)
            .put_int("virtual-size", vsize)
            .put("children", children),
        Some(q) => {
            let h = q.header();
            let dirty = h.incompatible_features & INCOMPAT_DIRTY != 0;
            let cs = h.cluster_size();
            let mut o = Obj::new()
                .put_str("filename", name)
                .put_str("format", "qcow2")
                .put_bool("dirty-flag", dirty)
                .put_int("actual-size", actual)
                .put_int("virtual-size", vsize)
                .put_int("cluster-size", cs);
            if q.encryption().is_some() {
                o = o.put_bool("encrypted", true);
                human.push_str("encrypted: yes\n");
            }
            let _ = writeln!(human, "cluster_size: {cs}");
            if dirty {
                human.push_str("cleanly shut down: no\n");
            }
            if let (Some(b), Some(_)) = (&h.backing_file, quorum) {
                // No directory to look the backing file up in.
                o = o.put_str("backing-filename", b);
                let _ = writeln!(human, "backing file: {b} (cannot determine actual path)");
                if let Some(f) = &h.backing_format {
                    o = o.put_str("backing-filename-format", f);
                    let _ = writeln!(human, "backing file format: {f}");
                }
            } else if let Some(b) = &h.backing_file {
                let full = resolve_backing(path, b).display().to_string();
                o = o
                    .put_str("backing-filename", b)
                    .put_str("full-backing-filename", &full);
                if &full == b {
                    let _ = writeln!(human, "backing file: {b}");
                } else {
                    let _ = writeln!(human, "backing file: {b} (actual path: {full})");
                }
                if let Some(f) = &h.backing_format {
                    o = o.put_str("backing-filename-format", f);
                    let _ = writeln!(human, "backing file format: {f}");
                }
                backing = Some((full, h.backing_format.clone()));
            }
            let file = File::open(path).map_err(|e| format!("{path}: {}", ioerr(&e)))?;
            let snaps = read_snapshots(&file, &h, meta.len());
            if !snaps.is_empty() {
                human.push_str(&snapshot_table(&snaps));
                let list = snaps.iter().map(|s| Json::Obj(s.json())).collect();
                o = o.put("snapshots", Json::List(list));
            }
            let data = qcow2_specific(&file, &h, meta.len(), q.encryption());
            human.push_str("Format specific information:\n");
            dump_human(&data, 4, &mut human);
            o.put(
                "format-specific",
                Json::Obj(
                    Obj::new()
                        .put_str("type", "qcow2")
                        .put("data", Json::Obj(data)),
                ),
            )
            .put("children", children)
        }
    };
    if quorum.is_some() {
        human.push_str(&child_human);
    } else {
        human.push_str("Child node '/file':\n");
        human.push_str(&file_child_human(path, file_len, actual, "    "));
    }
    drop(img);
    Ok(ImageReport {
        json,
        human,
        backing,
    })
}

/// The `file` protocol node under an image, as `info --output=json`
/// reports it.
fn file_child(path: &str, file_len: u64, actual: u64) -> Obj {
    Obj::new()
        .put_str("filename", path)
        .put_str("format", "file")
        .put_bool("dirty-flag", false)
        .put_int("actual-size", actual)
        .put_int("virtual-size", file_len)
        .put(
            "format-specific",
            Json::Obj(
                Obj::new()
                    .put_str("type", "file")
                    .put("data", Json::Obj(Obj::new())),
            ),
        )
        .put("children", Json::List(vec![]))
}

fn file_child_human(path: &str, file_len: u64, actual: u64, indent: &str) -> String {
    format!(
        "{indent}filename: {path}\n{indent}protocol type: file\n{indent}file length: {} ({file_len} bytes)\n{indent}disk size: {}\n",
        size_to_str(file_len),
        size_to_str(actual)
    )
}

/// A quorum node under the image and its file children, listed last to
/// first as QEMU lists them. `name` is the image's; the node's own name
/// is its `file` object of that json: name.
fn quorum_child(name: &str, files: &[String], len: u64, actual: u64) -> (Obj, String) {
    let node = name
        .strip_prefix("json:")
        .and_then(|j| {
            j.find("\"file\"")
                .or_else(|| j.find("'file'"))
                .map(|i| (j, i))
        })
        .map(|(j, i)| {
            let rest = j[i..]
                .split_once(':')
                .map(|x| x.1)
                .unwrap_or("")
                .trim_start();
            format!("json:{}", rest.strip_suffix('}').unwrap_or(rest).trim_end())
        })
        .unwrap_or_else(|| name.to_string());
    let mut human = format!(
        "Child node '/file':\n    image: {node}\n    file format: quorum\n    virtual size: {} ({len} bytes)\n    disk size: {}\n",
        size_to_str(len),
        size_to_str(actual)
    );
    let mut kids = Vec::new();
    for (n, f) in files.iter().enumerate().rev() {
        let (flen, fact) = match std::fs::metadata(f) {
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                (m.len().div_ceil(512) * 512, m.blocks() * 512)
            }
            Err(_) => (0, 0),
        };
        let _ = writeln!(human, "    Child node '/file/children.{n}':");
        human.push_str(&file_child_human(f, flen, fact, "        "));
        kids.push(Json::Obj(
            Obj::new()
                .put_str("name", &format!("children.{n}"))
                .put("info", Json::Obj(file_child(f, flen, fact))),
        ));
    }
    let json = Obj::new()
        .put("children", Json::List(kids))
        .put_int("virtual-size", len)
        .put_str("filename", &node)
        .put_str("format", "quorum")
        .put_int("actual-size", actual);
    (json, human)
}

/// A raw disk served over NBD: QEMU names it by its URI, reports the
/// nbd protocol node as its child and no disk size.
fn nbd_report(name: &str, vsize: u64) -> ImageReport {
    let child = Obj::new()
        .put("children", Json::List(vec![]))
        .put_int("virtual-size", vsize)
        .put_str("filename", name)
        .put_str("format", "nbd");
    let json = Obj::new()
        .put(
            "children",
            Json::List(vec![Json::Obj(
                Obj::new()
                    .put_str("name", "file")
                    .put("info", Json::Obj(child)),
            )]),
        )
        .put_int("virtual-size", vsize)
        .put_str("filename", name)
        .put_str("format", "raw");
    let size = format!("{} ({vsize} bytes)", size_to_str(vsize));
    let human = format!(
        "image: {name}\nfile format: raw\nvirtual size: {size}\ndisk size: unavailable\n\
         Child node '/file':\n    filename: {name}\n    protocol type: nbd\n\
         \x20   file length: {size}\n    disk size: unavailable\n"
    );
    ImageReport {
        json,
        human,
        backing: None,
    }
}

/// The "format-specific" data of a qcow2 image, in QAPI field order.
fn qcow2_specific(file: &File, h: &Header, file_len: u64, enc: Option<&Encryption>) -> Obj {
    if h.version < 3 {
        let mut o = Obj::new()
            .put_str("compat", "0.10")
            .put_int("refcount-bits", h.refcount_bits() as u64);
        if let Some(e) = enc {
            o = o.put("encrypt", Json::Obj(encrypt_info(e)));
        }
        return o.put_str("compression-type", compression_name(h.compression_type));
    }
    let mut o = Obj::new().put_str("compat", "1.1");
    if let Some(f) = &h.data_file {
        o = o.put_str("data-file", f);
    }
    if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
        o = o.put_bool(
            "data-file-raw",
            h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0,
        );
    }
    let mut o = o
        .put_bool("extended-l2", h.extended_l2())
        .put_bool(
            "lazy-refcounts",
            h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
        )
        .put_bool("corrupt", h.incompatible_features & INCOMPAT_CORRUPT != 0)
        .put_int("refcount-bits", h.refcount_bits() as u64);
    if let Some(e) = enc {
        o = o.put("encrypt", Json::Obj(encrypt_info(e)));
    }
    let bitmaps = read_bitmaps(file, h, file_len);
    if !bitmaps.is_empty() {
        o = o.put("bitmaps", Json::List(bitmaps));
    }
    o.put_str("compression-type", compression_name(h.compression_type))
}

/// The "encrypt" object: the format, and for LUKS the header's fields
/// (QAPI's QCryptoBlockInfoLUKS order).
pub(crate) fn encrypt_info(e: &Encryption) -> Obj {
    let o = Obj::new().put_str("format", e.format().name());
    let Encryption::Luks(l) = e else {
        return o;
    };
    let mut o = o
        .put_str("cipher-alg", &l.spec.alg_name())
        .put_str("cipher-mode", l.spec.mode.name())
        .put_str("ivgen-alg", l.spec.ivgen.name());
    if let IvGenAlg::Essiv(h) = l.spec.ivgen {
        o = o.put_str("ivgen-hash-alg", h.name());
    }
    let slots = l
        .slots
        .iter()
        .map(|s| {
            let mut j = Obj::new().put_bool("active", s.active);
            if s.active {
                j = j
                    .put_int("iters", s.iterations as u64)
                    .put_int("stripes", s.stripes as u64);
            }
            Json::Obj(j.put_int("key-offset", s.key_offset as u64 * 512))
        })
        .collect();
    o.put_str("hash-alg", l.hash.name())
        .put_bool("detached-header", false)
        .put_int("payload-offset", l.area_len())
        .put_int("master-key-iters", l.mk_iterations as u64)
        .put_str("uuid", &l.uuid)
        .put("slots", Json::List(slots))
}

fn compression_name(t: u8) -> &'static str {
    if t == 1 {
        "zstd"
    } else {
        "zlib"
    }
}

/// Reads `len` bytes at `off`, or None when the file is too short.
fn read_exact(file: &File, off: u64, len: u64, file_len: u64) -> Option<Vec<u8>> {
    if off.checked_add(len)? > file_len {
        return None;
    }
    let mut b = vec![0u8; len as usize];
    file.read_exact_at(&mut b, off).ok()?;
    Some(b)
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]))
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// One bitmap of the bitmap directory, as `qemu-img info` lists it.
fn read_bitmaps(file: &File, h: &Header, file_len: u64) -> Vec<Json> {
    let mut out = Vec::new();
    let Some(ext) = &h.bitmaps_ext else {
        return out;
    };
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 || ext.len() < 24 {
        return out;
    }
    let nb = be32(ext, 0) as u64;
    let dir_size = be64(ext, 8);
    let dir_off = be64(ext, 16);
    if dir_size > 64 << 20 {
        return out;
    }
    let Some(dir) = read_exact(file, dir_off, dir_size, file_len) else {
        return out;
    };
    let mut pos = 0usize;
    for _ in 0..nb {
        if pos + 24 > dir.len() {
            break;
        }
        let e = &dir[pos..];
        let flags = be32(e, 12);
        let gran_bits = e[17] as u32;
        let name_len = be16(e, 18) as usize;
        let extra = be32(e, 20) as usize;
        let name_start = 24 + extra;
        if name_start + name_len > e.len() {
            break;
        }
        let name = String::from_utf8_lossy(&e[name_start..name_start + name_len]).into_owned();
        let mut fl = Vec::new();
        if flags & 1 != 0 {
            fl.push(Json::Str("in-use".into()));
        }
        if flags & 2 != 0 {
            fl.push(Json::Str("auto".into()));
        }
        out.push(Json::Obj(
            Obj::new()
                .put_str("name", &name)
                .put_int("granularity", 1u64.checked_shl(gran_bits).unwrap_or(0))
                .put("flags", Json::List(fl)),
        ));
        pos += (name_start + name_len + 7) & !7;
    }
    out
}

/// One internal snapshot.
struct Snap {
    id: String,
    name: String,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_nsec: u64,
    vm_state_size: u64,
    icount: Option<u64>,
}

impl Snap {
    fn json(&self) -> Obj {
        let mut o = Obj::new()
            .put_str("id", &self.id)
            .put_str("name", &self.name)
            .put_int("vm-state-size", self.vm_state_size)
            .put_int("date-sec", self.date_sec as u64)
            .put_int("date-nsec", self.date_nsec as u64)
            .put_int("vm-clock-sec", self.vm_clock_nsec / 1_000_000_000)
            .put_int("vm-clock-nsec", self.vm_clock_nsec % 1_000_000_000);
        if let Some(i) = self.icount {
            o = o.put_int("icount", i);
        }
        o
    }
}

/// Decodes the snapshot table; a damaged table yields what could be read.
fn read_snapshots(file: &File, h: &Header, file_len: u64) -> Vec<Snap> {
    let mut out = Vec::new();
    let mut off = h.snapshots_offset;
    for _ in 0..h.nb_snapshots.min(65536) {
        let Some(e) = read_exact(file, off, 40, file_len) else {
            break;
        };
        let id_len = be16(&e, 12) as u64;
        let name_len = be16(&e, 14) as u64;
        let extra = be32(&e, 36) as u64;
        if extra > 1024 {
            break;
        }
        let total = 40 + extra + id_len + name_len;
        let Some(e) = read_exact(file, off, total, file_len) else {
            break;
        };
        let x = 40usize;
        let mut vm_state_size = be32(&e, 32) as u64;
        if extra >= 8 {
            vm_state_size = be64(&e, x);
        }
        let icount = if extra >= 24 {
            Some(be64(&e, x + 16)).filter(|&v| v != u64::MAX)
        } else {
            None
        };
        let ids = 40 + extra as usize;
        let idn = ids + id_len as usize;
        out.push(Snap {
            id: cstr(&String::from_utf8_lossy(&e[ids..idn])),
            name: cstr(&String::from_utf8_lossy(&e[idn..idn + name_len as usize])),
            date_sec: be32(&e, 16),
            date_nsec: be32(&e, 20),
            vm_clock_nsec: be64(&e, 24),
            vm_state_size,
            icount,
        });
        off += (total + 7) & !7;
    }
    out
}

/// An ID or name as QEMU shows it: a C string, ending at its first NUL.
fn cstr(s: &str) -> String {
    s.split('\0').next().unwrap_or_default().to_string()
}

/// The "Snapshot list:" table of qemu-img info.
fn snapshot_table(snaps: &[Snap]) -> String {
    let mut s = String::from("Snapshot list:\n");
    let _ = writeln!(
        s,
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snaps {
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (sn.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = sn
            .icount
            .map(|i| i.to_string())
            .unwrap_or_else(|| "--".into());
        let _ = writeln!(
            s,
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            sn.id,
            sn.name,
            size_to_str(sn.vm_state_size),
            local_time(sn.date_sec as i64),
            clock,
            icount
        );
    }
    s
}

/// "YYYY-MM-DD HH:MM:SS" in local time.
fn local_time(secs: i64) -> String {
    // SAFETY: localtime_r writes into the zeroed struct we pass; the time
    // value is a plain integer.
    let tm = unsafe {
        let t: libc::time_t = secs as libc::time_t;
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return String::new();
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The "Snapshot list:" table for snapshots the engine read (what
/// `qemu-img snapshot -l` prints); empty when there are none.
pub fn snapshot_list(list: &[oxqcow::format::snapshot::Snapshot]) -> String {
    if list.is_empty() {
        return String::new();
    }
    let snaps: Vec<Snap> = list
        .iter()
        .map(|s| Snap {
            id: cstr(&s.id),
            name: cstr(&s.name),
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_nsec: s.vm_clock_nsec,
            vm_state_size: s.vm_state_size,
            icount: s.icount.filter(|&v| v != u64::MAX),
        })
        .collect();
    snapshot_table(&snaps)
}
