//! Opening images the way the block layer of QEMU's tools takes its
//! options: QemuOpts strings (`-o`, `--image-opts`, `open -o`), `json:`
//! file names, cache modes, and the options of the qcow2, raw, file and
//! null-co drivers with QEMU's error texts (the option syntax itself is
//! `blockopts`'s). The qemu-img commands open `json:` names and
//! `--image-opts` strings here too. Also the open device itself
//! (`Dev`): the I/O calls qemu-io's commands make, with errno results and
//! the block layer's request checks.

#[path = "io_compress.rs"]
mod io_compress;
#[path = "io_datafile.rs"]
mod io_datafile;
#[path = "io_qcow2_opts.rs"]
pub(crate) mod io_qcow2_opts;
#[path = "io_quorum.rs"]
mod io_quorum;
pub use io_compress::{reopen_error as compress_reopen_error, CompressNode};
use io_quorum::open_on_quorum;
pub use io_quorum::quorum_children;

use crate::io::io_filters::{self, filtered, is_protocol, wrap, DebugNodes};
use oxqcow::blockdev::is_node_opt;
use oxqcow::storage::blkdebug::IoType;
use oxqcow::storage::Blkdebug;
use oxqcow::{BlockStatus, Image, OpenOptions};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The largest request the block layer takes (BDRV_REQUEST_MAX_BYTES).
pub const REQUEST_MAX: u64 = (i32::MAX as u64 >> 9) << 9;

/// Open flags that follow a device through reopen.
#[derive(Clone, Debug)]
pub struct Flags {
    pub read_only: bool,
    pub nocache: bool,
    pub no_flush: bool,
    pub writethrough: bool,
    pub unmap: bool,
    /// What a qemu-img command asks of the engine beyond these flags
    /// (no_backing for info, check_mode for check); writable and
    /// writethrough come from the flags above.
    pub engine: OpenOptions,
}

impl Default for Flags {
    fn default() -> Flags {
        Flags {
            read_only: false,
            nocache: false,
            no_flush: false,
            writethrough: true,
            unmap: true,
            engine: OpenOptions::default(),
        }
    }
}

impl Flags {
    /// bdrv_parse_cache_mode(): false for an unknown mode.
    pub fn set_cache(&mut self, mode: &str) -> bool {
        let (nocache, no_flush, wt) = match mode {
            "off" | "none" => (true, false, false),
            "directsync" => (true, false, true),
            "writeback" => (false, false, false),
            "unsafe" => (false, true, false),
            "writethrough" => (false, false, true),
            _ => return false,
        };
        self.nocache = nocache;
        self.no_flush = no_flush;
        self.writethrough = wt;
        true
    }

    /// `base` with these flags' access and cache mode: the one mapping of
    /// read-only, writethrough, nocache (O_DIRECT) and no-flush onto the
    /// engine's options, so no opener sets some of them and forgets others.
    pub fn apply(&self, base: OpenOptions) -> OpenOptions {
        OpenOptions {
            writable: !self.read_only,
            writethrough: self.writethrough,
            direct: self.nocache,
            no_flush: self.no_flush,
            ..base
        }
    }

    /// bdrv_parse_discard_flags().
    pub fn set_discard(&mut self, mode: &str) -> bool {
        match mode {
            "off" | "ignore" => self.unmap = false,
            "on" | "unmap" => self.unmap = true,
            _ => return false,
        }
        true
    }
}

/// bdrv_parse_aio().
pub fn aio_mode_ok(mode: &str) -> bool {
    matches!(mode, "threads" | "native" | "io_uring")
}

/// QEMU's boolean option values.
pub(crate) fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// A QemuOpts size option.
pub fn parse_size_opt(key: &str, v: &str) -> Result<u64, String> {
    crate::io::io_fmt::strtosz(v).map_err(|e| match e {
        crate::io::io_fmt::NumErr::Range => {
            format!("Value '{v}' is out of range for parameter '{key}'")
        }
        crate::io::io_fmt::NumErr::Invalid => format!(
            "Parameter '{key}' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        ),
    })
}

/// What to open: a file name and/or options, and the flags.
#[derive(Clone, Debug, Default)]
pub struct OpenReq {
    pub name: Option<String>,
    /// Explicit options in the order given (later ones win).
    pub opts: Vec<(String, String)>,
    pub flags: Flags,
    pub snapshot: bool,
    /// Copy-on-read (`-C`).
    pub cor: bool,
}

/// What the open device is.
pub enum Backend {
    Img(Image),
    /// QEMU's null-co / null-aio: reads zeros (or garbage), drops writes.
    Null {
        size: u64,
        read_zeroes: bool,
    },
}

/// An open device: the image and how it was opened (for reopen).
pub struct Dev {
    pub be: Backend,
    pub driver: String,
    pub req: OpenReq,
    /// The options the device uses (explicit ones resolved), by key.
    pub explicit: BTreeMap<String, String>,
    pub flags: Flags,
    /// Zero-write limits of a blkdebug node on top of the image.
    pub zero_limits: Option<ZeroLimits>,
    /// Blkdebug nodes on top of the image, outermost first: every request
    /// of the device passes their rules (see `io_cor.rs`).
    pub top_dbg: Vec<Arc<Blkdebug>>,
    /// The blkdebug node `break`, `resume` and friends act on: the first
    /// one down from the top, as QEMU finds it.
    pub debug: Option<Arc<Blkdebug>>,
    /// Lines blkdebug printed (`blkdebug: Suspended request 'A'`), for the
    /// session to put on stdout in order with its own output.
    pub msgs: Arc<Mutex<Vec<String>>>,
    /// Reads copy what they find below the image into it (`-C`,
    /// `driver=copy-on-read`).
    pub cor: bool,
    /// A `compress` filter node on top: data writes are compressed
    /// writes of whole clusters (`io_compress.rs`).
    pub compress: Option<CompressNode>,
}

/// What a blkdebug node's request limits do to zero writes: the block
/// layer cuts them at `align` boundaries (at most `max` bytes a piece),
/// and blkdebug turns down the pieces shorter than `align`, which the
/// block layer then writes as data, `max_transfer` bytes at a time.
#[derive(Clone, Copy, Debug)]
pub struct ZeroLimits {
    pub align: u64,
    pub max: u64,
    pub max_transfer: u64,
}

/// Options of the `file` protocol driver (with or without "file.").
const FILE_OPTS: &[&str] = &[
    "driver",
    "filename",
    "node-name",
    "locking",
    "aio",
    "aio-max-batch",
    "pr-manager",
    "x-check-cache-dropped",
    "drop-cache",
    "cache.direct",
    "cache.no-flush",
    "read-only",
    "auto-read-only",
    "discard",
    "detect-zeroes",
    "force-share",
];

const BOOL_OPTS: &[&str] = &[
    "read-only",
    "auto-read-only",
    "cache.direct",
    "cache.no-flush",
    "force-share",
    "read-zeroes",
];

pub(crate) fn unsupported_driver(d: &str) -> String {
    format!("oxqcow does not implement the '{d}' block driver")
}

/// Opens what `req` names. The error is the text after
/// "can't open device NAME: ".
pub fn open(req: OpenReq) -> Result<Dev, String> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    let mut name = req.name.clone();
    if let Some(n) = name.as_deref() {
        if let Some(j) = n.strip_prefix("json:") {
            for (k, v) in crate::blockopts::parse_json_filename(j)? {
                map.insert(k, v);
            }
            name = None;
        }
    }
    for (k, v) in &req.opts {
        map.insert(k.clone(), v.clone());
    }
    for k in BOOL_OPTS {
        for key in [k.to_string(), format!("file.{k}")] {
            if let Some(v) = map.get(&key) {
                parse_bool(&key, v)?;
            }
        }
    }
    let mut flags = req.flags.clone();
    if let Some(v) = map.get("read-only") {
        flags.read_only = parse_bool("read-only", v)?;
    }
    if let Some(v) = map.get("cache.direct") {
        flags.nocache = parse_bool("cache.direct", v)?;
    }
    if let Some(v) = map.get("cache.no-flush") {
        flags.no_flush = parse_bool("cache.no-flush", v)?;
    }
    if let Some(v) = map.get("discard") {
        let mut f = flags.clone();
        if !f.set_discard(v) {
            return Err("Invalid discard option".to_string());
        }
        flags.unmap = f.unmap;
    }
    if req.cor && flags.read_only {
        return Err("Can't use copy-on-read on read-only device".into());
    }
    let (map, cor_node) = io_filters::strip_cor(map)?;
    if map.get("driver").map(String::as_str) == Some("compress") {
        let req = OpenReq {
            cor: req.cor || cor_node,
            ..req
        };
        return io_compress::open_compress(map, name, req, flags);
    }
    let st = io_filters::strip_blkdebug(map, name)?;
    let (map, name, zero_limits, nodes) = (st.map, st.name, st.limits, st.nodes);
    if let Some(r) = crate::io::io_nbd::open(&map, name.as_deref(), &flags, req.snapshot) {
        let (img, driver) = r?;
        let mut explicit = map;
        explicit.insert("driver".to_string(), driver.clone());
        return Ok(Dev {
            be: Backend::Img(img),
            driver,
            req,
            explicit,
            flags,
            zero_limits,
            top_dbg: Vec::new(),
            debug: None,
            msgs: Arc::default(),
            cor: cor_node,
            compress: None,
        });
    }
    if let Some(n) = name.as_deref() {
        if let Some(p) = crate::blockopts::protocol_of(n) {
            return Err(unsupported_driver(p));
        }
    }
    if matches!(
        map.get("driver").map(String::as_str),
        Some("null-co") | Some("null-aio")
    ) {
        return open_null(&map, req, flags);
    }
    let mut temp = None;
    let (img, driver) = if req.snapshot {
        let (img, path) = open_snapshot_overlay(&map, name.as_deref(), &flags)?;
        temp = Some(path);
        (img, "qcow2".to_string())
    } else {
        open_node(&map, name.as_deref(), &flags, &nodes, "")?
    };
    if cor_node && flags.read_only {
        // The copy-on-read filter needs to write to its child.
        return Err("Block node is read-only".into());
    }
    if let Some(p) = temp {
        // The overlay lives as long as the open image.
        let _ = std::fs::remove_file(p);
    }
    let mut explicit = map;
    explicit
        .entry("driver".to_string())
        .or_insert_with(|| driver.clone());
    let msgs: Arc<Mutex<Vec<String>>> = Arc::default();
    for (_, d) in &nodes {
        let q = msgs.clone();
        d.set_printer(Some(Box::new(move |l| {
            q.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(l.to_string())
        })));
    }
    let debug = nodes
        .iter()
        .min_by_key(|(p, _)| p.len())
        .map(|(_, d)| d.clone());
    let cor = req.cor || cor_node;
    Ok(Dev {
        be: Backend::Img(img),
        driver,
        req,
        explicit,
        flags,
        zero_limits,
        top_dbg: nodes
            .iter()
            .filter(|(p, _)| p.is_empty())
            .map(|(_, d)| d.clone())
            .collect(),
        debug,
        msgs,
        cor,
        compress: None,
    })
}

/// The options under `prefix` ("file."), with the prefix removed.
pub(crate) fn child_opts(map: &BTreeMap<String, String>, prefix: &str) -> BTreeMap<String, String> {
    map.iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|r| (r.to_string(), v.clone())))
        .collect()
}

/// Opens one node of the graph: a protocol driver over a file, or a
/// format driver over its "file" child (which may itself be a format:
/// qcow2 inside qcow2). Returns the image and the driver name.
fn open_node(
    map: &BTreeMap<String, String>,
    name: Option<&str>,
    flags: &Flags,
    nodes: &DebugNodes,
    prefix: &str,
) -> Result<(Image, String), String> {
    let driver = map.get("driver").cloned();
    if let Some(d) = driver.as_deref() {
        if is_protocol(d) {
            return open_protocol(d, map, name, flags).map(|i| (i, d.to_string()));
        }
    }
    let file_driver = map.get("file.driver").cloned();
    if file_driver.as_deref() == Some("quorum") {
        return open_on_quorum(map, flags);
    }
    if let Some(fd) = file_driver.as_deref() {
        if !is_protocol(fd) && fd != "qcow2" && fd != "raw" {
            return Err(unsupported_driver(fd));
        }
    }
    let nested = file_driver
        .as_deref()
        .is_some_and(|fd| fd == "qcow2" || fd == "raw");
    let fmt: String = match driver.as_deref() {
        Some(d) => d.to_string(),
        None if nested => return Err("Must specify either driver or file".into()),
        None => {
            let path = node_path(map, name)?;
            match oxqcow::engine::probe(Path::new(&path)) {
                Ok(f) => f.to_string(),
                Err(e) => return Err(open_errmsg(&e, &path)),
            }
        }
    };
    if fmt != "qcow2" && fmt != "raw" {
        if KNOWN_DRIVERS.contains(&fmt.as_str()) {
            return Err(unsupported_driver(&fmt));
        }
        return Err(format!("Unknown driver '{fmt}'"));
    }
    if fmt != "qcow2" {
        // A qcow2 node's own options are checked first (qcow2_options).
        check_format_opts(map, &fmt)?;
    }
    if !nested {
        if let Some(fd) = file_driver.as_deref() {
            let sub = child_opts(map, "file.");
            check_protocol_opts(&sub, fd)?;
        } else {
            check_protocol_opts(&child_opts(map, "file."), "file")?;
        }
    }
    // A writethrough node gets a flush after each write from this layer
    // (QEMU's FUA emulation), which is all a raw image's writethrough is:
    // the engine's own per-write sync would be a second one.
    let mut oo = flags.apply(flags.engine.clone());
    oo.writethrough &= fmt != "raw";
    let window = fmt == "raw" && (map.contains_key("offset") || map.contains_key("size"));
    if window && nested {
        return Err(
            "oxqcow does not implement the raw driver's offset and size over a format node".into(),
        );
    }
    if nested {
        let sub = child_opts(map, "file.");
        let file_prefix = format!("{prefix}file.");
        let (inner, _) = open_node(&sub, None, flags, nodes, &file_prefix)?;
        if fmt == "raw" && !filtered(nodes, &file_prefix) {
            // A raw layer over an image passes every request through.
            return Ok((inner, fmt));
        }
        let inner_name = inner_path(&sub);
        if fmt == "qcow2" {
            qcow2_options(map, &inner_name, &oo.clone(), &mut oo, Some(&inner))?;
            check_format_opts(map, &fmt)?;
            filter_data_file(&mut oo, nodes, prefix)?;
        }
        let storage = wrap(Arc::new(ImageStorage(inner)), nodes, &file_prefix);
        let img = Image::open_on(storage, &inner_name, &fmt, &oo)
            .map_err(|e| open_errmsg(&e, &inner_name))?;
        return Ok((img, fmt));
    }
    let path = node_path(map, name)?;
    if let Some(fd) = file_driver.as_deref() {
        check_special_file(fd, &path, flags)?;
    } else {
        check_special_file("file", &path, flags)?;
    }
    if fmt == "qcow2" {
        qcow2_options(map, &path, &oo.clone(), &mut oo, None)?;
        check_format_opts(map, &fmt)?;
        filter_data_file(&mut oo, nodes, prefix)?;
    }
    let file_prefix = format!("{prefix}file.");
    if window {
        // A raw node's offset and size: a window onto its file, which
        // never grows (writes past it fail with ENOSPC, as on a full
        // block device).
        let num = |k: &str| map.get(k).map(|v| parse_size_opt(k, v)).transpose();
        let (offset, size) = (num("offset")?.unwrap_or(0), num("size")?);
        let f = oo
            .open_file(Path::new(&path))
            .map_err(|e| format!("Could not open '{path}': {}", crate::util::ioerr(&e)))?;
        let storage = wrap(Arc::new(f), nodes, &file_prefix);
        let window = Arc::new(oxqcow::storage::WindowStorage::new(storage, offset, size));
        let img = Image::open_on(window, &path, &fmt, &oo).map_err(|e| open_errmsg(&e, &path))?;
        return Ok((img, fmt));
    }
    if filtered(nodes, &file_prefix) {
        let f = oo
            .open_file(Path::new(&path))
            .map_err(|e| format!("Could not open '{path}': {}", crate::util::ioerr(&e)))?;
        let storage = wrap(Arc::new(f), nodes, &file_prefix);
        let img = Image::open_on(storage, &path, &fmt, &oo).map_err(|e| open_errmsg(&e, &path))?;
        return Ok((img, fmt));
    }
    let img = Image::open(Path::new(&path), Some(&fmt), &oo).map_err(|e| open_errmsg(&e, &path))?;
    Ok((img, fmt))
}

/// The host file of a node: the file name, or file.filename.
fn node_path(map: &BTreeMap<String, String>, name: Option<&str>) -> Result<String, String> {
    if let Some(n) = name {
        if let Some(p) = crate::blockopts::protocol_of(n) {
            return Err(unsupported_driver(p));
        }
        return Ok(n.to_string());
    }
    if let Some(f) = map.get("file.filename") {
        return Ok(f.clone());
    }
    if let Some(f) = map.get("file") {
        return Err(format!("Cannot find device='' nor node-name='{f}'"));
    }
    Err("A block device must be specified for \"file\"".into())
}

/// The host file name deepest in a chain of nested format options.
fn inner_path(map: &BTreeMap<String, String>) -> String {
    let mut prefix = String::new();
    loop {
        if let Some(f) = map.get(&format!("{prefix}filename")) {
            return f.clone();
        }
        if let Some(f) = map.get(&format!("{prefix}file.filename")) {
            return f.clone();
        }
        if !map.keys().any(|k| k.starts_with(&format!("{prefix}file."))) {
            return String::new();
        }
        prefix.push_str("file.");
    }
}

/// Format drivers QEMU has that oxqcow does not implement.
const KNOWN_DRIVERS: &[&str] = &[
    "vmdk",
    "vpc",
    "vdi",
    "vhdx",
    "qed",
    "qcow",
    "luks",
    "parallels",
    "bochs",
    "cloop",
    "dmg",
    "blkdebug",
    "blkverify",
    "blklogwrites",
    "nbd",
    "copy-on-read",
    "throttle",
    "compress",
    "quorum",
    "replication",
    "preallocate",
    "snapshot-access",
    "copy-before-write",
    "ssh",
    "nfs",
    "null-co",
    "null-aio",
    "vvfat",
    "http",
    "https",
    "iscsi",
    "rbd",
    "gluster",
];

fn check_format_opts(map: &BTreeMap<String, String>, fmt: &str) -> Result<(), String> {
    for k in map.keys() {
        if k.starts_with("file.") {
            continue;
        }
        if fmt == "qcow2" {
            if let Some(bk) = k.strip_prefix("backing.") {
                if bk == "node-name"
                    || bk == "driver"
                    || bk.starts_with("file.")
                    || bk == "encrypt.key-secret"
                    || bk == "encrypt.format"
                {
                    continue;
                }
                return Err(format!(
                    "Block format 'qcow2' does not support the option '{k}'"
                ));
            }
            if k == "data-file" || k.starts_with("data-file.") {
                continue; // io_datafile.rs
            }
            if let Some(e) = k.strip_prefix("encrypt.") {
                if e == "key-secret" || e == "format" {
                    continue;
                }
                return Err(format!("Parameter '{e}' is unexpected"));
            }
        }
        let window = fmt == "raw" && (k == "offset" || k == "size");
        let ok = window
            || is_node_opt(k)
            || (fmt == "qcow2" && (io_qcow2_opts::is_runtime_opt(k) || k == "backing"))
            || k == "file";
        if !ok {
            return Err(format!(
                "Block format '{fmt}' does not support the option '{k}'"
            ));
        }
    }
    Ok(())
}

/// The option an unknown-option error of [`check_format_opts`] or
/// [`check_protocol_opts`] names (relative to its node).
pub fn unknown_option(msg: &str) -> Option<String> {
    let rest = msg
        .strip_prefix("Block format '")
        .or_else(|| msg.strip_prefix("Block protocol '"))?;
    let (_, key) = rest
        .split_once("' does not support the option '")
        .or_else(|| rest.split_once("' doesn't support the option '"))?;
    Some(key.strip_suffix('\'')?.to_string())
}

pub(crate) fn check_protocol_opts(
    map: &BTreeMap<String, String>,
    driver: &str,
) -> Result<(), String> {
    for k in map.keys() {
        if !FILE_OPTS.contains(&k.as_str()) {
            return Err(format!(
                "Block protocol '{driver}' doesn't support the option '{k}'"
            ));
        }
    }
    Ok(())
}

/// The file-posix drivers' checks on what the file is. An open that
/// fails (a directory opened for writing) reports the open error first.
fn check_special_file(driver: &str, path: &str, flags: &Flags) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let md = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok(()), // the open reports it
    };
    let ft = md.file_type();
    if !flags.read_only && ft.is_dir() {
        return Err(format!("Could not open '{path}': Is a directory"));
    }
    match driver {
        "file" if !ft.is_file() => Err(format!(
            "'file' driver requires '{path}' to be a regular file"
        )),
        "host_device" | "host_cdrom" if !(ft.is_char_device() || ft.is_block_device()) => Err(
            format!("'{driver}' driver requires '{path}' to be either a character or block device"),
        ),
        _ => Ok(()),
    }
}

fn open_protocol(
    driver: &str,
    map: &BTreeMap<String, String>,
    name: Option<&str>,
    flags: &Flags,
) -> Result<Image, String> {
    check_protocol_opts(map, driver)?;
    let path = match name {
        Some(n) => n.to_string(),
        None => map
            .get("filename")
            .cloned()
            .ok_or_else(|| format!("The '{driver}' block driver requires a file name"))?,
    };
    check_special_file(driver, &path, flags)?;
    // Writethrough comes from this layer's flush after each write (above).
    let oo = OpenOptions {
        writethrough: false,
        ..flags.apply(OpenOptions::default())
    };
    Image::open(Path::new(&path), Some("raw"), &oo).map_err(|e| open_errmsg(&e, &path))
}

/// `-s`: a temporary qcow2 overlay over the image, removed once open.
fn open_snapshot_overlay(
    map: &BTreeMap<String, String>,
    name: Option<&str>,
    flags: &Flags,
) -> Result<(Image, std::path::PathBuf), String> {
    let ro = Flags {
        read_only: true,
        ..flags.clone()
    };
    let (base, fmt) = open_node(map, name, &ro, &DebugNodes::new(), "")?;
    let size = base.size();
    let base_path = match name {
        Some(n) => n.to_string(),
        None => inner_path(map),
    };
    drop(base);
    let abs = std::fs::canonicalize(&base_path)
        .map_err(|e| format!("Could not open '{base_path}': {}", crate::util::ioerr(&e)))?;
    let dir = std::env::var("TMPDIR").unwrap_or_else(|_| "/var/tmp".into());
    let tmp = std::path::PathBuf::from(dir).join(format!(
        "vl.oxqcow.{}.{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    ));
    let co = oxqcow::CreateOptions {
        size,
        backing_file: Some(abs.display().to_string()),
        backing_fmt: Some(fmt),
        ..Default::default()
    };
    oxqcow::engine::create(&tmp, &co).map_err(|e| crate::util::errmsg(&e))?;
    let oo = OpenOptions {
        writable: true,
        ..flags.apply(OpenOptions::default())
    };
    match Image::open(&tmp, Some("qcow2"), &oo) {
        Ok(i) => Ok((i, tmp)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(crate::util::errmsg(&e))
        }
    }
}

/// An image used as the host file of another (qcow2 inside qcow2).
struct ImageStorage(Image);

fn to_io(e: oxqcow::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

impl oxqcow::storage::Storage for ImageStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let size = self.0.size();
        let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[n..].fill(0);
        if n > 0 {
            self.0.read_at(&mut buf[..n], offset).map_err(to_io)?;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.0.size() {
            self.0.resize(end.div_ceil(512) * 512).map_err(to_io)?;
        }
        self.0.write_at(buf, offset).map_err(to_io)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.flush().map_err(to_io)
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.size())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.resize(len.div_ceil(512) * 512).map_err(to_io)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let len = len.min(self.0.size().saturating_sub(offset));
        self.0.write_zeroes(offset, len, true).map_err(to_io)
    }
    fn allocate(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// A null-co device as a host file for the qemu-img commands: reads give
/// zeros (what `read-zeroes=on` promises; without it QEMU leaves the
/// buffer undefined, so zeros are as good), writes are dropped.
struct NullStorage(u64);

impl oxqcow::storage::Storage for NullStorage {
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0)
    }
    fn set_len(&self, _len: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::ENOTSUP))
    }
    fn punch_hole(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn allocate(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn allocated_size(&self) -> std::io::Result<u64> {
        Ok(0)
    }
}

/// An open failure in QEMU's words: the engine prefixes every failure
/// with "Could not open 'PATH': "; QEMU does that only for the host file,
/// and says "Could not open backing file: …" for the backing chain.
pub fn open_errmsg(e: &oxqcow::Error, path: &str) -> String {
    let msg = crate::util::errmsg(e);
    let top = format!("Could not open '{path}': ");
    let Some(mut rest) = msg.strip_prefix(&top) else {
        return collapse(&msg);
    };
    while let Some(r) = rest.strip_prefix(&top) {
        rest = r;
    }
    if is_strerror(rest) {
        return format!("{top}{rest}");
    }
    if crate::img_util::data_file_error(path, rest) {
        return collapse(rest);
    }
    if let Some(r) = rest.strip_prefix("Could not open backing file '") {
        if let Some(i) = r.find("': ") {
            return format!("Could not open backing file: {}", collapse(&r[i + 3..]));
        }
    }
    if rest.starts_with("Could not open '") {
        return format!("Could not open backing file: {}", collapse(rest));
    }
    rest.to_string()
}

/// "Could not open 'X': Could not open 'X': why" → "Could not open 'X': why".
fn collapse(msg: &str) -> String {
    let mut m = msg.to_string();
    if let Some(r) = m.strip_prefix("Could not open '") {
        if let Some(i) = r.find("': ") {
            let head = format!("Could not open '{}': ", &r[..i]);
            let mut rest = &m[head.len()..];
            while let Some(x) = rest.strip_prefix(&head) {
                rest = x;
            }
            m = format!("{head}{rest}");
        }
    }
    m
}

fn is_strerror(s: &str) -> bool {
    (1..134).any(|e| s == strerror(e))
}

/// Puts the blkdebug nodes stripped from over the external data file
/// (`data-file` itself, or the file under a raw `data-file`) in front of
/// it, so that their rules see the data writes as QEMU's do.
fn filter_data_file(oo: &mut OpenOptions, nodes: &DebugNodes, prefix: &str) -> Result<(), String> {
    for p in [
        format!("{prefix}data-file."),
        format!("{prefix}data-file.file."),
    ] {
        if !filtered(nodes, &p) {
            continue;
        }
        let (storage, name): (Arc<dyn oxqcow::storage::Storage>, String) = match oo.data_file.take()
        {
            Some(oxqcow::DataFileSource::Path(path)) => {
                let f = oo.open_file(&path).map_err(|e| {
                    format!(
                        "Could not open '{}': {}",
                        path.display(),
                        crate::util::ioerr(&e)
                    )
                })?;
                (Arc::new(f), path.display().to_string())
            }
            Some(oxqcow::DataFileSource::Storage { storage, name }) => (storage, name),
            None => return Ok(()),
        };
        oo.data_file = Some(oxqcow::DataFileSource::Storage {
            storage: wrap(storage, nodes, &p),
            name,
        });
    }
    Ok(())
}

/// QEMU's overlap-check options: the template (`overlap-check` or
/// `overlap-check.template`, the same value if both), then a flag per
/// check. Returns whether the inactive-L2 check is on (template `all`, or
/// its own flag); oxqcow's other checks are always on.
fn overlap_check_inactive_l2(map: &BTreeMap<String, String>) -> Result<bool, String> {
    // The values were checked with the other qcow2 options
    // (io_qcow2_opts::check): only the answer is left to find.
    let template = map
        .get("overlap-check")
        .or_else(|| map.get("overlap-check.template"))
        .map_or("cached", String::as_str);
    match map.get("overlap-check.inactive-l2") {
        Some(v) => parse_bool("overlap-check.inactive-l2", v),
        None => Ok(template == "all"),
    }
}

fn qcow2_options(
    map: &BTreeMap<String, String>,
    path: &str,
    _base: &OpenOptions,
    oo: &mut OpenOptions,
    inner: Option<&Image>,
) -> Result<(), String> {
    if let Some(d) = map.get("backing.driver") {
        oo.backing_format = Some(d.clone());
    }
    oo.data_file = io_datafile::data_file_source(map)?;
    if let Some(v) = map.get("backing") {
        if v.is_empty() {
            oo.no_backing = true;
        } else {
            return Err(format!(
                "oxqcow cannot use block node '{v}' as a backing file"
            ));
        }
    }
    let header = |len: usize| -> Option<Vec<u8>> {
        let mut b = vec![0u8; len];
        match inner {
            Some(i) => i.read_at(&mut b, 0).ok()?,
            None => {
                use std::os::unix::fs::FileExt;
                std::fs::File::open(path)
                    .ok()?
                    .read_exact_at(&mut b, 0)
                    .ok()?
            }
        }
        Some(b)
    };
    let geo = header(104)
        .or_else(|| header(72))
        .and_then(|b| io_qcow2_opts::Geometry::parse(&b));
    let rt = io_qcow2_opts::check(map, geo.as_ref())?;
    oo.l2_cache_size = rt.l2_cache;
    oo.refcount_cache_size = rt.refcount_cache;
    oo.overlap_check_inactive_l2 = overlap_check_inactive_l2(map)?;
    if rt.lazy_refcounts.is_some() {
        oo.lazy_refcounts = rt.lazy_refcounts;
    }
    let crypt_method = header(36).map(|b| u32::from_be_bytes(b[32..36].try_into().unwrap()));
    let (fmt, secret) = crate::secret::encrypt_open_options(map, "", crypt_method)?;
    oo.encrypt_format = fmt;
    oo.key_secret = secret;
    if map.keys().any(|k| k.starts_with("backing.encrypt.")) {
        // The backing file's header is not looked at here: its secret is
        // resolved whether it is encrypted or not.
        let (fmt, secret) = crate::secret::encrypt_open_options(map, "backing.", Some(1))?;
        oo.backing = Some(Box::new(OpenOptions {
            encrypt_format: fmt,
            key_secret: secret,
            backing: None,
            ..oo.clone()
        }));
    }
    Ok(())
}

fn open_null(map: &BTreeMap<String, String>, req: OpenReq, flags: Flags) -> Result<Dev, String> {
    let driver = map.get("driver").cloned().unwrap_or_default();
    for k in map.keys() {
        if !(is_node_opt(k)
            || matches!(
                k.as_str(),
                "size" | "read-zeroes" | "latency-ns" | "filename"
            ))
        {
            return Err(format!(
                "Block protocol '{driver}' doesn't support the option '{k}'"
            ));
        }
    }
    let size = match map.get("size") {
        Some(v) => parse_size_opt("size", v)?,
        None => 1 << 30,
    };
    let read_zeroes = match map.get("read-zeroes") {
        Some(v) => parse_bool("read-zeroes", v)?,
        None => false,
    };
    Ok(Dev {
        be: Backend::Null { size, read_zeroes },
        driver,
        req,
        explicit: map.clone(),
        flags,
        zero_limits: None,
        top_dbg: Vec::new(),
        debug: None,
        msgs: Arc::default(),
        cor: false,
        compress: None,
    })
}

/// A zero write as QEMU's block layer hands it to its qcow2 driver: the
/// request is cut at cluster boundaries; a partial cluster becomes a
/// zero cluster only when the rest of it already reads as zeros and it
/// holds no data in this image, otherwise zeros are written as data
/// (the block layer's fallback). Whole clusters get the zero flag (v3),
/// are discarded (v2 without a backing file) or are written as data.
/// With extended L2 entries all of this works on subclusters.
fn qcow2_write_zeroes(q: &oxqcow::Qcow2, off: u64, len: u64, unmap: bool) -> Result<(), i32> {
    let cs = q.allocation_granularity();
    let mut head = off % cs;
    let tail = (off + len) % cs;
    let (mut pos, mut left) = (off, len);
    while left > 0 {
        let mut num = left;
        if head != 0 {
            num = left.min(cs - head);
            head = (head + num) % cs;
        } else if tail != 0 && num > cs {
            num -= tail;
        }
        match qcow2_zero_piece(q, pos, num, unmap) {
            Err(e) if e == libc::ENOTSUP => {
                let zeros = vec![0u8; num as usize];
                q.write_at(&zeros, pos).map_err(|e| e.errno())?;
            }
            r => r?,
        }
        pos += num;
        left -= num;
    }
    Ok(())
}

/// A zero write through a blkdebug node with limits (see `ZeroLimits`).
fn limited_write_zeroes(
    q: &oxqcow::Qcow2,
    off: u64,
    len: u64,
    unmap: bool,
    l: ZeroLimits,
) -> Result<(), i32> {
    let mut head = off % l.align;
    let tail = (off + len) % l.align;
    let (mut pos, mut left) = (off, len);
    while left > 0 {
        let mut num = left;
        if head != 0 {
            num = left.min(l.max_transfer).min(l.align - head);
            head = (head + num) % l.align;
        } else if tail != 0 && num > l.align {
            num -= tail;
        }
        num = num.min(l.max);
        if num < l.align {
            num = num.min(l.max_transfer);
            let zeros = vec![0u8; num as usize];
            q.write_at(&zeros, pos).map_err(|e| e.errno())?;
        } else {
            qcow2_write_zeroes(q, pos, num, unmap)?;
        }
        pos += num;
        left -= num;
    }
    Ok(())
}

/// qcow2's pwrite_zeroes for one piece; ENOTSUP asks for the fallback.
fn qcow2_zero_piece(q: &oxqcow::Qcow2, off: u64, len: u64, unmap: bool) -> Result<(), i32> {
    let cs = q.allocation_granularity();
    let size = q.size();
    let head = off % cs;
    let mut tail = (off + len).div_ceil(cs) * cs - (off + len);
    if off + len == size {
        tail = 0;
    }
    let (mut start, mut bytes) = (off, len);
    if head != 0 || tail != 0 {
        if !(reads_zero(q, off - head, head)? && reads_zero(q, off + len, tail)?) {
            return Err(libc::ENOTSUP);
        }
        start = off - head;
        bytes = cs.min(size - start);
        match q.l2_entry_at(start).map_err(|e| e.errno())? {
            oxqcow::format::entries::L2Entry::Unallocated
            | oxqcow::format::entries::L2Entry::Zero { .. } => {}
            _ => return Err(libc::ENOTSUP),
        }
    }
    if q.version() < 3 {
        if q.backing_layer().is_some() {
            return Err(libc::ENOTSUP);
        }
        return q.write_zeroes(start, bytes, true).map_err(|e| e.errno());
    }
    q.write_zeroes(start, bytes, unmap).map_err(|e| e.errno())
}

/// Whether a range reads as zeros by allocation status alone (no data in
/// any layer), as QEMU's is_zero() decides.
fn reads_zero(q: &oxqcow::Qcow2, off: u64, len: u64) -> Result<bool, i32> {
    let (mut pos, end) = (off, (off + len).min(q.size()));
    while pos < end {
        let (st, n) = q.block_status(pos, end - pos).map_err(|e| e.errno())?;
        if matches!(st, BlockStatus::Data { .. }) {
            return Ok(false);
        }
        pos += n.max(1);
    }
    Ok(true)
}

/// The errno of an I/O error (EIO when it has none).
fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// An errno as strerror() words it.
pub fn strerror(errno: i32) -> String {
    crate::util::ioerr(&std::io::Error::from_raw_os_error(errno))
}

impl Dev {
    /// The device as an image for the qemu-img commands (null-co as a raw
    /// image that reads zeros).
    pub fn into_image(self) -> Image {
        match self.be {
            Backend::Img(i) => i,
            Backend::Null { size, .. } => Image::raw_on(
                std::sync::Arc::new(NullStorage(size)),
                &self.driver,
                !self.flags.read_only,
            ),
        }
    }

    /// The host file the device's data lives in: the plain file name it
    /// was opened by, or the deepest `filename` of its options.
    pub fn host_file(&self) -> Option<String> {
        let plain = |n: &&str| !crate::blockopts::is_spec_name(n);
        if let Some(n) = self.req.name.as_deref().filter(plain) {
            return Some(n.to_string());
        }
        Some(inner_path(&self.explicit)).filter(|p| !p.is_empty())
    }

    pub fn image(&self) -> Option<&Image> {
        match &self.be {
            Backend::Img(i) => Some(i),
            Backend::Null { .. } => None,
        }
    }

    /// bdrv_getlength(): bytes, raw files rounded up to whole sectors.
    pub fn length(&self) -> u64 {
        match &self.be {
            Backend::Img(i) => crate::util::virtual_size(i),
            Backend::Null { size, .. } => *size,
        }
    }

    /// blk_check_byte_request().
    fn check(&self, off: u64, len: u64) -> Result<(), i32> {
        let size = self.length();
        if off > size || size - off < len {
            return Err(libc::EIO);
        }
        Ok(())
    }

    fn check_write(&self) -> Result<(), i32> {
        if self.flags.read_only {
            return Err(libc::EPERM);
        }
        Ok(())
    }

    pub fn read(&self, buf: &mut [u8], off: u64) -> Result<(), i32> {
        self.check(off, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.cor {
            return self.cor_read(buf, off);
        }
        self.plain_read(buf, off)
    }

    /// A read of the device without copy-on-read.
    pub(crate) fn plain_read(&self, buf: &mut [u8], off: u64) -> Result<(), i32> {
        self.top_check(off, buf.len() as u64, IoType::Read)?;
        match &self.be {
            Backend::Img(i) => {
                let real = i.size();
                // Raw files read zeros past their end inside the last sector.
                if off + buf.len() as u64 > real {
                    let n = real.saturating_sub(off) as usize;
                    buf[n..].fill(0);
                    if n == 0 {
                        return Ok(());
                    }
                    return i.read_at(&mut buf[..n], off).map_err(|e| e.errno());
                }
                i.read_at(buf, off).map_err(|e| e.errno())
            }
            Backend::Null { read_zeroes, .. } => {
                if *read_zeroes {
                    buf.fill(0);
                }
                Ok(())
            }
        }
    }

    pub fn write(&self, buf: &[u8], off: u64, fua: bool) -> Result<(), i32> {
        self.check(off, buf.len() as u64)?;
        self.check_write()?;
        if buf.is_empty() {
            return Ok(());
        }
        match &self.be {
            Backend::Img(Image::Nbd(n)) => {
                // The server makes the data durable itself (FUA).
                let fua = (fua || self.flags.writethrough) && !self.flags.no_flush;
                n.client().write_at(buf, off, fua).map_err(|e| errno_of(&e))
            }
            Backend::Img(i) => {
                let wt = fua || self.flags.writethrough;
                self.through_top(off, buf.len() as u64, IoType::Write, wt, || {
                    if self.compress.is_some() {
                        return self.compress_write(buf, off);
                    }
                    i.write_at(buf, off).map_err(|e| e.errno())
                })?;
                if fua || self.flags.writethrough {
                    self.flush_inner()?;
                }
                Ok(())
            }
            Backend::Null { .. } => Ok(()),
        }
    }

    /// `write -b`: bytes of the VM state area (qcow2 only, as in QEMU).
    pub fn write_vmstate(&self, buf: &[u8], pos: u64) -> Result<(), i32> {
        self.check_write()?;
        match &self.be {
            Backend::Img(Image::Qcow2(q)) => {
                q.write_vmstate(buf, pos).map_err(|e| e.errno())?;
                if self.flags.writethrough {
                    self.flush_inner()?;
                }
                Ok(())
            }
            _ => Err(libc::ENOTSUP),
        }
    }

    /// `read -b`: bytes of the VM state area.
    pub fn read_vmstate(&self, buf: &mut [u8], pos: u64) -> Result<(), i32> {
        match &self.be {
            Backend::Img(Image::Qcow2(q)) => q.read_vmstate(buf, pos).map_err(|e| e.errno()),
            _ => Err(libc::ENOTSUP),
        }
    }

    /// qcow2's compressed write: cluster-aligned, whole clusters (or up
    /// to the end of the image), one compressed cluster at a time, none
    /// over an allocated cluster (`io_compress.rs`).
    pub fn write_compressed(&self, buf: &[u8], off: u64) -> Result<(), i32> {
        self.check(off, buf.len() as u64)?;
        self.check_write()?;
        match &self.be {
            // Neither blkdebug nor the compress filter has compressed
            // writes of its own.
            Backend::Img(_) if !self.top_dbg.is_empty() || self.compress.is_some() => {
                Err(libc::ENOTSUP)
            }
            Backend::Img(Image::Qcow2(q)) => {
                let cs = q.cluster_size();
                let len = buf.len() as u64;
                if len == 0 {
                    return Ok(());
                }
                if q.data_file_name().is_some() {
                    return Err(libc::ENOTSUP);
                }
                if !off.is_multiple_of(cs) || (!len.is_multiple_of(cs) && off + len != q.size()) {
                    return Err(libc::EINVAL);
                }
                self.compressed_clusters(q, buf, off)?;
                if self.flags.writethrough {
                    self.flush_inner()?;
                }
                Ok(())
            }
            _ => Err(libc::ENOTSUP),
        }
    }

    pub fn write_zeroes(&self, off: u64, len: u64, unmap: bool, fua: bool) -> Result<(), i32> {
        self.check(off, len)?;
        self.check_write()?;
        if len == 0 {
            return Ok(());
        }
        match &self.be {
            Backend::Img(_) => {
                let unmap = unmap && self.flags.unmap;
                let wt = fua || self.flags.writethrough;
                self.through_top(off, len, IoType::WriteZeroes, wt, || {
                    if self.compress.is_some() {
                        return self.compress_zeroes(off, len, unmap);
                    }
                    self.zero_image(off, len, unmap)
                })?;
                if fua || self.flags.writethrough {
                    self.flush_inner()?;
                }
                Ok(())
            }
            Backend::Null { .. } => Ok(()),
        }
    }

    /// Zeros in the image as the block layer and qcow2 driver write them.
    pub(crate) fn zero_image(&self, off: u64, len: u64, unmap: bool) -> Result<(), i32> {
        match &self.be {
            // The persistent bitmaps record the request, not the pieces
            // (some widened to whole clusters) it is cut into.
            Backend::Img(Image::Qcow2(q)) if self.zero_limits.is_some() => {
                let l = self.zero_limits.unwrap();
                q.as_one_request(off, len, || limited_write_zeroes(q, off, len, unmap, l))
            }
            Backend::Img(Image::Qcow2(q)) => {
                q.as_one_request(off, len, || qcow2_write_zeroes(q, off, len, unmap))
            }
            Backend::Img(Image::Nbd(n)) => n
                .client()
                .write_zeroes(off, len, unmap, false)
                .map_err(|e| errno_of(&e)),
            Backend::Img(i) => i.write_zeroes(off, len, unmap).map_err(|e| e.errno()),
            Backend::Null { .. } => Ok(()),
        }
    }

    pub fn discard(&self, off: u64, len: u64) -> Result<(), i32> {
        self.check(off, len)?;
        self.check_write()?;
        if len == 0 || !self.flags.unmap {
            return Ok(());
        }
        match &self.be {
            Backend::Img(i) => {
                // QEMU's qcow2 refuses (and the block layer ignores) discards
                // on v2 images with a backing file: without zero clusters
                // they would expose the backing file's data.
                if let Image::Qcow2(q) = i {
                    if q.version() < 3 && q.backing_layer().is_some() {
                        return Ok(());
                    }
                }
                self.top_check(off, len, IoType::Discard)?;
                for d in &self.top_dbg {
                    d.note_write();
                }
                i.discard(off, len).map_err(|e| e.errno())?;
                Ok(())
            }
            Backend::Null { .. } => Ok(()),
        }
    }

    /// The flush a writethrough (FUA) write does. Top blkdebug nodes do not
    /// see it: QEMU emulates FUA with a flush of the node that still
    /// counts no new write, so the node skips it.
    fn flush_inner(&self) -> Result<(), i32> {
        if self.flags.no_flush {
            return Ok(());
        }
        match &self.be {
            Backend::Img(i) => i.flush().map_err(|e| e.errno()),
            Backend::Null { .. } => Ok(()),
        }
    }

    pub fn flush(&self) -> Result<(), i32> {
        if self.flags.no_flush {
            return Ok(());
        }
        self.flush_through_top(|| self.flush_inner())
    }

    /// Whether [off, off+len) starts allocated in this layer, and for how
    /// long; (false, 0) at the end of the image.
    pub fn is_allocated(&self, off: u64, len: u64) -> Result<(bool, u64), i32> {
        let size = self.length();
        if off >= size || len == 0 {
            return Ok((false, 0));
        }
        let len = len.min(size - off);
        match &self.be {
            Backend::Img(i) => {
                let real = i.size();
                if off >= real {
                    return Ok((true, len));
                }
                let (st, n) = i
                    .block_status(off, len.min(real - off))
                    .map_err(|e| e.errno())?;
                let alloc = match st {
                    BlockStatus::Data { depth, .. } => depth == 0,
                    BlockStatus::Zero { depth } => depth == 0,
                    BlockStatus::Unallocated { .. } => false,
                };
                Ok((alloc, n.max(1).min(len)))
            }
            Backend::Null { .. } => Ok((true, len)),
        }
    }

    /// The flush that closing does.
    /// What qcow2 reports when closing fails (QEMU's error_report lines).
    pub fn close(&self) -> Vec<String> {
        let mut lines = Vec::new();
        match &self.be {
            Backend::Img(Image::Qcow2(q)) => {
                let (tables, refblocks) = q.close_caches();
                let mut say = |what: &str, r: oxqcow::Result<()>| {
                    if let Err(e) = r {
                        lines.push(format!(
                            "Failed to flush the {what}: {}",
                            strerror(e.errno())
                        ));
                    }
                };
                say("L2 table cache", tables);
                say("refcount block cache", refblocks);
            }
            // As blk_unref(): other failures at close are not reported.
            Backend::Img(i) => drop(i.close()),
            Backend::Null { .. } => {}
        }
        lines
    }
}
