//! `oxqcow amend`: qemu-img amend over `Qcow2::amend`. Owns the option
//! list handling in qemu-img's order: the list syntax first, then the
//! image is opened read-write, `help` lists the amendable options, every
//! option is checked for name and type in the order given (last value of
//! a key wins), creation-only options are refused with qemu-img's hint,
//! and the engine applies the rest.

use crate::img_util::{open_named, parse_size_param, usage_error, QProgress};
use crate::util::{errmsg, parse_c_number, snapshot_l1_failure, CliResult};
use oxqcow::engine::AmendOptions;
use oxqcow::{Image, OpenOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Quiet operation
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    fmt: Option<String>,
    /// FILENAME is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Options to change, NAME=VALUE[,NAME=VALUE...] (may be repeated)
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    options: Vec<String>,
    /// Cache mode (accepted, ignored)
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Allow unsafe operations (accepted, ignored)
    #[arg(long = "force")]
    force: bool,
    /// Image file
    filename: String,
}

const HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// Options only `create` knows.
const CREATION_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "encryption",
    "encrypt.format",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.key-secret",
    "compression_type",
    "extended_l2",
];

/// The options amend knows, with their QemuOpts types.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Bool,
    Num,
    Size,
}

fn kind_of(key: &str) -> Option<Kind> {
    Some(match key {
        "backing_file" | "backing_fmt" | "compat" | "data_file" => Kind::Str,
        "encrypt.new-secret" | "encrypt.old-secret" | "encrypt.state" => Kind::Str,
        "data_file_raw" | "lazy_refcounts" => Kind::Bool,
        "encrypt.iter-time" | "encrypt.keyslot" | "refcount_bits" => Kind::Num,
        "size" => Kind::Size,
        _ => return None,
    })
}

/// Splits an option list the QemuOpts way: ",," is a literal comma, a
/// name without '=' means "on"; an empty element is an error.
fn split_list(s: &str) -> Option<Vec<(String, String)>> {
    let mut items = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                items.last_mut().expect("non-empty").push(',');
            } else {
                items.push(String::new());
            }
        } else {
            items.last_mut().expect("non-empty").push(c);
        }
    }
    if items.iter().any(|i| i.is_empty()) {
        return None;
    }
    Some(
        items
            .into_iter()
            .map(|i| match i.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (i, "on".to_string()),
            })
            .collect(),
    )
}

pub fn run(a: Args) -> CliResult<()> {
    let _ = (&a.cache, a.force);
    if a.options.is_empty() {
        usage_error("amend", "Must specify options (-o)");
    }
    let list = a.options.join(",");
    let items = split_list(&list).ok_or_else(|| format!("Invalid option list: {list}"))?;
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let img = open_named(&a.filename, a.image_opts, a.fmt.as_deref(), &opts)?.img;
    let Image::Qcow2(q) = &img else {
        return Err(format!(
            "Format driver '{}' does not support option amendment",
            img.format()
        ));
    };
    if items.iter().any(|(k, _)| k == "help" || k == "?") {
        print!("{HELP}");
        return Ok(());
    }
    // Names and types, in the order given; the last value of a key wins.
    let mut values: Vec<(String, String)> = Vec::new();
    for (k, v) in items {
        let Some(kind) = kind_of(&k) else {
            if CREATION_ONLY.contains(&k.as_str()) {
                return Err(format!(
                    "Invalid parameter '{k}'\nThis option is only supported for image creation"
                ));
            }
            return Err(format!("Invalid parameter '{k}'"));
        };
        let v = match kind {
            Kind::Str => v,
            Kind::Bool => match v.as_str() {
                "on" | "yes" | "true" | "y" => "on".to_string(),
                "off" | "no" | "false" | "n" => "off".to_string(),
                _ => return Err(format!("Parameter '{k}' expects 'on' or 'off'")),
            },
            Kind::Num => parse_c_number(&v)
                .ok_or_else(|| format!("Parameter '{k}' expects a number"))?
                .to_string(),
            Kind::Size => parse_size_param(&k, &v)?.to_string(),
        };
        values.retain(|(k2, _)| *k2 != k);
        values.push((k, v));
    }
    let mut o = AmendOptions::default();
    for (k, v) in &values {
        match k.as_str() {
            "data_file" => o.data_file = Some(v.clone()),
            "data_file_raw" => o.data_file_raw = Some(v == "on"),
            k if k.starts_with("encrypt.") => {
                return Err("Can't amend encryption options - encryption not present".into());
            }
            "compat" if v.contains(',') => {
                return Err(format!("Unknown compatibility level {v}"));
            }
            "backing_file" => o.backing_file = Some(v.clone()),
            "backing_fmt" => o.backing_fmt = Some(v.clone()),
            _ => {
                let one = AmendOptions::parse(&format!("{k}={v}")).map_err(|e| errmsg(&e))?;
                o.version = one.version.or(o.version);
                o.lazy_refcounts = one.lazy_refcounts.or(o.lazy_refcounts);
                o.refcount_bits = one.refcount_bits.or(o.refcount_bits);
                o.size = one.size.or(o.size);
            }
        }
    }
    let mut progress = QProgress::new(a.progress && !a.quiet, 1.0);
    progress.add(0.0, 100);
    // The amend job's reports (absolute, as qemu-img's status callback
    // sets them), then qemu-img's final one.
    let mut report = |done: u64, total: u64| progress.add(100.0 * done as f32 / total as f32, 0);
    q.amend_with_progress(&o, &mut report).map_err(|e| {
        // Only a downgrade's zero-cluster expansion reads snapshot L1 tables.
        snapshot_l1_failure(&e, "Failed to turn zero into data clusters")
            .unwrap_or_else(|| errmsg(&e))
    })?;
    img.close().map_err(|e| errmsg(&e))?;
    progress.add(100.0, 0);
    progress.end();
    Ok(())
}
