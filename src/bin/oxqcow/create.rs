//! `oxqcow create`: new qcow2 images through `oxqcow::engine::create`, and
//! raw files. Owns the qemu-img `create` option handling (-o, -b, -F, -u),
//! taking the size from the backing file when none is given, and the
//! `Formatting '…', fmt=… …` line in qemu-img 10's field order.

use crate::blockopts::is_spec_name;
use crate::img_util::{open_named, parse_size_param};
use crate::util::virtual_size;
use crate::util::{errmsg, ioerr, open_ro, parse_c_number, parse_img_size, resolve_backing};
use crate::util::{split_opts, CliResult};
use oxqcow::crypto::{check_encrypt_option_syntax, encrypt_create_from_options, is_encrypt_option};
use oxqcow::engine::{create, CreateOptions};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

#[derive(clap::Args)]
pub struct Args {
    /// Quiet: do not print the "Formatting" line
    #[arg(short = 'q')]
    quiet: bool,
    /// Image format: qcow2 or raw
    #[arg(short = 'f', value_name = "FMT", default_value = "raw")]
    fmt: String,
    /// Format options, NAME=VALUE[,NAME=VALUE...] (may be repeated)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file
    #[arg(short = 'b', value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// Backing file format
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_fmt: Option<String>,
    /// Do not open the backing file to check it
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Define an object: secret,id=ID,data=PASSWORD|file=PATH[,format=raw|base64]
    #[arg(long = "object", value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// Image file to create
    filename: String,
    /// Virtual size (with an optional k, M, G, T, P or E suffix)
    size: Option<String>,
}

pub fn run(a: Args) -> CliResult<()> {
    crate::secret::define(&a.object)?;
    let file = a.filename.clone();
    let size = a.size.as_deref().map(parse_img_size).transpose()?;
    match a.fmt.as_str() {
        "qcow2" => create_qcow2(&a, size).map_err(|e| format!("{file}: {e}")),
        "raw" => create_raw_cmd(&a, size).map_err(|e| format!("{file}: {e}")),
        "luks" => create_luks(&a, size).map_err(|e| format!("{file}: {e}")),
        other => Err(format!("{file}: Unknown file format '{other}'")),
    }
}

/// Options given with -o: the last value of each key wins, as in QEMU.
struct Given(HashMap<String, String>);

impl Given {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(|s| s.as_str())
    }
}

fn create_qcow2(a: &Args, size: Option<u64>) -> CliResult<()> {
    let opts = split_opts(&a.options);
    let mut co = CreateOptions::default();
    let mut given = Given(HashMap::new());
    let mut opt_size = None;
    for (k, v) in &opts {
        match k.as_str() {
            "size" => {
                opt_size = Some(parse_img_size(v).map_err(|_| {
                    "Parameter 'size' expects a non-negative number below 2^64".to_string()
                })?)
            }
            "refcount_bits" => {
                // Negative numbers wrap, as strtoull makes them (and then
                // fail as widths, after the Formatting line).
                let n = parse_c_number(v)
                    .or_else(|| {
                        v.trim()
                            .strip_prefix('-')
                            .and_then(parse_c_number)
                            .map(u64::wrapping_neg)
                    })
                    .ok_or_else(|| "Parameter 'refcount_bits' expects a number".to_string())?;
                co.set(k, &n.to_string()).map_err(|e| errmsg(&e))?;
            }
            "cluster_size" | "extent_size_hint" => {
                let n = parse_size_param(k, v)?;
                co.set(k, &n.to_string()).map_err(|e| errmsg(&e))?;
            }
            // qemu-img knows only "compat".
            "version" => return Err("Invalid parameter 'version'".into()),
            "backing_file" | "backing_fmt" => {}
            // Resolved once the line is printed (they need secrets).
            _ if is_encrypt_option(k) => {}
            _ => co.set(k, v).map_err(|e| errmsg(&e))?,
        }
        given.0.insert(k.clone(), v.clone());
    }
    let encrypt_opts: Vec<(String, String)> = opts
        .iter()
        .filter(|(k, _)| is_encrypt_option(k))
        .cloned()
        .collect();
    check_encrypt_option_syntax(&encrypt_opts).map_err(|e| errmsg(&e))?;
    let size = match (size, opt_size) {
        (Some(_), Some(_)) => return Err("The image size must be specified only once".into()),
        (s, o) => s.or(o),
    };
    let backing = a
        .backing
        .clone()
        .or_else(|| given.get("backing_file").map(String::from));
    let backing_fmt = a
        .backing_fmt
        .clone()
        .or_else(|| given.get("backing_fmt").map(String::from));
    let size = match &backing {
        Some(b) => check_backing(a, b, backing_fmt.as_deref(), size)?,
        None => size,
    };
    let size = size.ok_or_else(|| "Image creation needs a size parameter".to_string())?;
    co.size = size;
    co.backing_file = backing.clone();
    co.backing_fmt = backing_fmt.clone();
    if !a.quiet {
        println!("{}", formatting_line_qcow2(&a.filename, &co, &given));
    }
    co.encrypt = encrypt_create_from_options(&encrypt_opts, &mut |id| {
        crate::secret::get(id).map_err(oxqcow::Error::InvalidArgument)
    })
    .map_err(|e| errmsg(&e))?;
    create(Path::new(&a.filename), &co).map_err(|e| errmsg(&e))
}

/// Checks the backing file as qemu-img does: unless -u it must open (with
/// its format probed when none is given), and it must name its format;
/// returns the size to use.
fn check_backing(
    a: &Args,
    backing: &str,
    fmt: Option<&str>,
    size: Option<u64>,
) -> CliResult<Option<u64>> {
    let without_fmt = "Backing file specified without backing format";
    if a.unsafe_backing {
        return match fmt {
            Some(_) => Ok(size),
            None => Err(without_fmt.into()),
        };
    }
    let path = resolve_backing(&a.filename, backing).display().to_string();
    let img = if is_spec_name(&path) {
        let opts = oxqcow::OpenOptions {
            no_backing: true,
            ..Default::default()
        };
        // The block layer's own error, without the name of the spec.
        open_named(&path, false, fmt, &opts)
            .map(|n| n.img)
            .map_err(|e| {
                e.strip_prefix(&format!("Could not open '{path}': "))
                    .map(str::to_string)
                    .unwrap_or(e)
            })
    } else {
        open_ro(&path, fmt, true)
    }
    .map_err(|e| format!("{e}\nCould not open backing image."))?;
    if fmt.is_none() {
        return Err(format!(
            "{without_fmt}\nDetected format of {}.",
            img.format()
        ));
    }
    Ok(size.or(Some(virtual_size(&img))))
}

/// The encryption options in the order qemu-img's line shows them.
const ENCRYPT_OPTS: &[&str] = &[
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.iter-time",
];

/// The line qemu-img 10 prints for a qcow2 image: defaults for the options
/// it always shows, given values verbatim for the ones shown when set.
fn formatting_line_qcow2(file: &str, co: &CreateOptions, given: &Given) -> String {
    let mut s = format!("Formatting '{file}', fmt=qcow2");
    // Values print as QemuOpts spell them: a comma doubled.
    let mut push = |k: &str, v: &str| s.push_str(&format!(" {k}={}", v.replace(',', ",,")));
    for k in ENCRYPT_OPTS {
        if let Some(v) = given.get(k) {
            push(k, v);
        }
    }
    push("cluster_size", &co.cluster_size.to_string());
    push("extended_l2", given.get("extended_l2").unwrap_or("off"));
    if let Some(v) = given.get("preallocation") {
        push("preallocation", v);
    }
    push(
        "compression_type",
        given.get("compression_type").unwrap_or("zlib"),
    );
    push("size", &co.size.to_string());
    if let Some(v) = given.get("compat") {
        push("compat", v);
    }
    if let Some(b) = &co.backing_file {
        push("backing_file", b);
    }
    if let Some(b) = &co.backing_fmt {
        push("backing_fmt", b);
    }
    for k in ["data_file", "data_file_raw"] {
        if let Some(v) = given.get(k) {
            push(k, v);
        }
    }
    push(
        "lazy_refcounts",
        given.get("lazy_refcounts").unwrap_or("off"),
    );
    // QEMU prints numbers signed: a wrapped negative one comes back.
    push("refcount_bits", &(co.refcount_bits as i64).to_string());
    if let Some(h) = co.extent_size_hint {
        push("extent_size_hint", &h.to_string());
    }
    s
}

/// Options of QEMU's `luks` format, in the order its line shows them.
const LUKS_OPTS: &[&str] = &[
    "key-secret",
    "cipher-alg",
    "cipher-mode",
    "ivgen-alg",
    "ivgen-hash-alg",
    "hash-alg",
    "iter-time",
];

/// A raw LUKS1 volume (QEMU's `luks` format): the header and key
/// material, then `size` bytes of encrypted payload (left unwritten).
fn create_luks(a: &Args, size: Option<u64>) -> CliResult<()> {
    if a.backing.is_some() {
        return Err("Backing file not supported for file format 'luks'".into());
    }
    let mut given = Given(HashMap::new());
    let mut opt_size = None;
    for (k, v) in split_opts(&a.options) {
        if k == "size" {
            opt_size = Some(parse_img_size(&v).map_err(|_| {
                "Parameter 'size' expects a non-negative number below 2^64".to_string()
            })?);
        } else if !LUKS_OPTS.contains(&k.as_str()) {
            return Err(format!("Invalid parameter '{k}'"));
        }
        given.0.insert(k, v);
    }
    let size = match (size, opt_size) {
        (Some(_), Some(_)) => return Err("The image size must be specified only once".into()),
        (s, o) => s.or(o),
    };
    let size = size.ok_or_else(|| "Image creation needs a size parameter".to_string())?;
    // The same options as qcow2's encrypt.*, with the format fixed.
    let mut opts = vec![("encrypt.format".to_string(), "luks".to_string())];
    for k in LUKS_OPTS {
        if let Some(v) = given.get(k) {
            opts.push((format!("encrypt.{k}"), v.to_string()));
        }
    }
    let unprefix = |e: &oxqcow::Error| errmsg(e).replace("'encrypt.", "'");
    check_encrypt_option_syntax(&opts).map_err(|e| unprefix(&e))?;
    if !a.quiet {
        let mut line = format!("Formatting '{}', fmt=luks size={size}", a.filename);
        for k in LUKS_OPTS {
            if let Some(v) = given.get(k) {
                line.push_str(&format!(" {k}={v}"));
            }
        }
        println!("{line}");
    }
    let e = encrypt_create_from_options(&opts, &mut |id| {
        crate::secret::get(id).map_err(oxqcow::Error::InvalidArgument)
    })
    .map_err(|e| unprefix(&e))?
    .ok_or("no encryption")?;
    let (_, area, _) =
        oxqcow::crypto::LuksHeader::create(e.spec, e.hash, &e.password.0, e.iter_time_ms)
            .map_err(|e| errmsg(&e))?;
    let name = a.filename.as_str();
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(name)
        .map_err(|e| format!("Could not create '{name}': {}", ioerr(&e)))?;
    let werr = |e: std::io::Error| format!("Could not write to '{name}': {}", ioerr(&e));
    f.write_all_at(&area, 0).map_err(werr)?;
    f.set_len(area.len() as u64 + size.div_ceil(512) * 512)
        .map_err(werr)?;
    f.sync_all().map_err(werr)
}

fn create_raw_cmd(a: &Args, size: Option<u64>) -> CliResult<()> {
    if a.backing.is_some() {
        return Err("Backing file not supported for file format 'raw'".into());
    }
    let mut opt_size = None;
    let mut prealloc: Option<String> = None;
    let mut hint: Option<u64> = None;
    for (k, v) in split_opts(&a.options) {
        match k.as_str() {
            "size" => {
                opt_size = Some(parse_img_size(&v).map_err(|_| {
                    "Parameter 'size' expects a non-negative number below 2^64".to_string()
                })?)
            }
            "preallocation" => {
                if !["off", "falloc", "full"].contains(&v.as_str()) {
                    return Err(format!(
                        "Parameter 'preallocation' does not accept value '{v}'"
                    ));
                }
                prealloc = Some(v)
            }
            "extent_size_hint" => hint = Some(parse_size_param(&k, &v)?),
            "backing_file" => return Err("Backing file not supported for file format 'raw'".into()),
            _ => return Err(format!("Invalid parameter '{k}'")),
        }
    }
    let size = match (size, opt_size) {
        (Some(_), Some(_)) => return Err("The image size must be specified only once".into()),
        (s, o) => s.or(o),
    };
    let size = size.ok_or_else(|| "Image creation needs a size parameter".to_string())?;
    if !a.quiet {
        let mut line = format!("Formatting '{}', fmt=raw size={size}", a.filename);
        if let Some(p) = &prealloc {
            line.push_str(&format!(" preallocation={p}"));
        }
        if let Some(h) = hint {
            line.push_str(&format!(" extent_size_hint={h}"));
        }
        println!("{line}");
    }
    create_raw(
        Path::new(&a.filename),
        size,
        prealloc.as_deref().unwrap_or("off"),
        hint,
    )
}

/// Creates (or truncates) a raw image (engine::create_raw) with a
/// preallocation mode already checked to be off, falloc or full.
pub fn create_raw(path: &Path, size: u64, prealloc: &str, hint: Option<u64>) -> CliResult<()> {
    let mode = oxqcow::engine::Preallocation::parse(prealloc).map_err(|e| errmsg(&e))?;
    oxqcow::engine::create_raw(path, size, mode, hint).map_err(|e| errmsg(&e))
}
