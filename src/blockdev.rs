//! Block nodes described by options instead of a plain file name: the
//! `json:{...}` file names QEMU writes into image headers (a backing file
//! behind blkdebug, say) and the dotted option lists they flatten to.
//! Only what oxqcow can open is understood: the `file` protocol,
//! `blkdebug` over it, and qcow2 or raw on top.

use crate::engine::Layer;
use crate::engine::{OpenOptions, Qcow2, RawLayer};
use crate::error::{Error, Result};
use crate::format::QCOW_MAGIC;
use crate::storage::blkdebug_config::load_rules;
use crate::storage::{Blkdebug, BlkdebugStorage, FileStorage, Storage, WindowStorage};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Node options by dotted key (`file.driver`, `file.image.filename`).
pub type Options = BTreeMap<String, String>;

/// Options every block node takes, whatever its driver (qemu-io and
/// qemu-img accept them on any node; oxqcow has no use for most of them).
/// Each driver's own list adds to these.
pub const NODE_OPTS: &[&str] = &[
    "driver",
    "node-name",
    "read-only",
    "auto-read-only",
    "cache.direct",
    "cache.no-flush",
    "discard",
    "detect-zeroes",
    "force-share",
];

/// Whether `key` is one of the options every node takes (`NODE_OPTS`).
pub fn is_node_opt(key: &str) -> bool {
    NODE_OPTS.contains(&key)
}

/// Flattens a `json:{...}` file name into dotted option keys. QEMU's
/// parser also takes single-quoted strings. `null` becomes "" (only
/// `backing: null` uses it).
pub fn parse_json(s: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut p = JsonP {
        b: s.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    p.ws();
    if p.peek() != Some(b'{') {
        return Err("Could not parse the JSON options".into());
    }
    p.object("", &mut out)
        .map_err(|_| "Could not parse the JSON options".to_string())?;
    p.ws();
    if p.i != p.b.len() {
        return Err("Could not parse the JSON options".into());
    }
    Ok(out)
}

struct JsonP<'a> {
    b: &'a [u8],
    i: usize,
}

impl JsonP<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), ()> {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(())
        }
    }
    fn string(&mut self) -> std::result::Result<String, ()> {
        self.ws();
        let q = self.peek().ok_or(())?;
        if q != b'"' && q != b'\'' {
            return Err(());
        }
        self.i += 1;
        let mut v = Vec::new();
        while let Some(c) = self.peek() {
            self.i += 1;
            if c == q {
                return String::from_utf8(v).map_err(|_| ());
            }
            if c == b'\\' {
                let e = self.peek().ok_or(())?;
                self.i += 1;
                match e {
                    b'n' => v.push(b'\n'),
                    b't' => v.push(b'\t'),
                    b'r' => v.push(b'\r'),
                    b'b' => v.push(8),
                    b'f' => v.push(12),
                    b'u' => {
                        let h = std::str::from_utf8(self.b.get(self.i..self.i + 4).ok_or(())?)
                            .map_err(|_| ())?;
                        let cp = u32::from_str_radix(h, 16).map_err(|_| ())?;
                        self.i += 4;
                        let ch = char::from_u32(cp).ok_or(())?;
                        let mut tmp = [0u8; 4];
                        v.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
                    }
                    other => v.push(other),
                }
            } else {
                v.push(c);
            }
        }
        Err(())
    }
    fn object(
        &mut self,
        prefix: &str,
        out: &mut Vec<(String, String)>,
    ) -> std::result::Result<(), ()> {
        self.expect(b'{')?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            let k = self.string()?;
            self.expect(b':')?;
            let key = format!("{prefix}{k}");
            self.value(&key, out)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(()),
            }
        }
    }
    fn value(&mut self, key: &str, out: &mut Vec<(String, String)>) -> std::result::Result<(), ()> {
        self.ws();
        match self.peek().ok_or(())? {
            b'{' => self.object(&format!("{key}."), out),
            b'[' => {
                self.i += 1;
                let mut n = 0;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.value(&format!("{key}.{n}"), out)?;
                    n += 1;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(()),
                    }
                }
            }
            b'"' | b'\'' => {
                let s = self.string()?;
                out.push((key.to_string(), s));
                Ok(())
            }
            _ => {
                let st = self.i;
                while let Some(c) = self.peek() {
                    if c.is_ascii_alphanumeric() || c == b'-' || c == b'+' || c == b'.' {
                        self.i += 1;
                    } else {
                        break;
                    }
                }
                let tok = std::str::from_utf8(&self.b[st..self.i]).map_err(|_| ())?;
                let v = match tok {
                    "true" => "on".to_string(),
                    "false" => "off".to_string(),
                    "null" => String::new(),
                    "" => return Err(()),
                    t => t.to_string(),
                };
                out.push((key.to_string(), v));
                Ok(())
            }
        }
    }
}

/// The options under `prefix` (`"file."`), with the prefix removed.
pub fn child(map: &Options, prefix: &str) -> Options {
    map.iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|r| (r.to_string(), v.clone())))
        .collect()
}

/// The rules of a blkdebug node: its `config` file and its
/// `inject-error.*` / `set-state.*` options (keys relative to the node).
pub fn blkdebug_rules(map: &Options) -> Result<Blkdebug> {
    let opts: Vec<(String, String)> = map
        .iter()
        .filter(|(k, _)| k.starts_with("inject-error.") || k.starts_with("set-state."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let config = map.get("config").filter(|c| !c.is_empty());
    Ok(Blkdebug::new(load_rules(config.map(Path::new), &opts)?))
}

/// Opens a protocol node: `file` (the default) or `blkdebug` over one.
/// Returns the storage and the host file's name.
pub fn open_protocol(map: &Options, writable: bool) -> Result<(Arc<dyn Storage>, String)> {
    let driver = map.get("driver").map(String::as_str).unwrap_or("file");
    match driver {
        "file" | "host_device" | "host_cdrom" => {
            let name = map.get("filename").cloned().ok_or_else(|| {
                Error::InvalidArgument(format!("The '{driver}' block driver requires a file name"))
            })?;
            let f = FileStorage::open(Path::new(&name), writable, false)
                .map_err(|e| Error::io(format!("Could not open '{name}'"), e))?;
            Ok((Arc::new(f), name))
        }
        "blkdebug" => {
            let dbg = Arc::new(blkdebug_rules(map)?);
            let mut image = child(map, "image.");
            if image.is_empty() {
                let name = map.get("image").or_else(|| map.get("x-image")).cloned();
                let name = name.ok_or_else(|| {
                    Error::InvalidArgument(
                        "blkdebug requires both config file and image path".into(),
                    )
                })?;
                image.insert("filename".into(), name);
            }
            let (inner, name) = open_protocol(&image, writable)?;
            Ok((Arc::new(BlkdebugStorage::new(inner, dbg)), name))
        }
        "raw" => {
            // A raw node under a format (QEMU's `offset`/`size` options):
            // a window onto its own file child.
            let mut file = child(map, "file.");
            if let Some(f) = map.get("file").filter(|_| file.is_empty()) {
                file.insert("filename".into(), f.clone());
            }
            let num = |k: &str| -> Result<Option<u64>> {
                map.get(k)
                    .map(|v| {
                        v.parse::<u64>().map_err(|_| {
                            Error::InvalidArgument(format!(
                                "Parameter '{k}' expects a non-negative number below 2^64"
                            ))
                        })
                    })
                    .transpose()
            };
            let (offset, size) = (num("offset")?.unwrap_or(0), num("size")?);
            let (inner, name) = open_protocol(&file, writable)?;
            Ok((Arc::new(WindowStorage::new(inner, offset, size)), name))
        }
        other => Err(Error::Unsupported(format!(
            "oxqcow cannot open a '{other}' node here"
        ))),
    }
}

/// Opens the backing file named by a `json:` file name (`json` is what
/// follows the prefix); `fmt` is the overlay's backing format.
pub fn open_json_layer(
    json: &str,
    fmt: Option<&str>,
    depth: u32,
    opts: &OpenOptions,
) -> Result<Box<dyn Layer>> {
    let map: Options = parse_json(json)
        .map_err(Error::InvalidArgument)?
        .into_iter()
        .collect();
    let driver = map.get("driver").cloned();
    let (storage, name, format) = match driver.as_deref() {
        Some("qcow2") | Some("raw") => {
            let mut file = child(&map, "file.");
            if let Some(f) = map.get("file").filter(|_| file.is_empty()) {
                file.insert("filename".into(), f.clone());
            }
            let (s, n) = open_protocol(&file, false)?;
            (s, n, driver)
        }
        _ => {
            let (s, n) = open_protocol(&map, false)?;
            (s, n, fmt.map(str::to_string))
        }
    };
    let format = match format {
        Some(f) => f,
        None => {
            let mut b = [0u8; 8];
            storage
                .read_at(&mut b, 0)
                .map_err(|e| Error::io(format!("Could not read '{name}'"), e))?;
            let magic = u32::from_be_bytes(b[..4].try_into().unwrap());
            let version = u32::from_be_bytes(b[4..].try_into().unwrap());
            if magic == QCOW_MAGIC && version >= 2 {
                "qcow2"
            } else {
                "raw"
            }
            .to_string()
        }
    };
    match format.as_str() {
        "qcow2" => {
            let o = OpenOptions {
                writable: false,
                chain_depth: depth + 1,
                ..opts.clone()
            };
            let q = Qcow2::open_storage(storage, Path::new(&name), &o)
                .map_err(|e| e.context(&format!("Could not open '{name}'")))?;
            Ok(Box::new(q))
        }
        "raw" => Ok(Box::new(RawLayer::on(storage, name)?)),
        other => Err(Error::Unsupported(format!(
            "Could not open backing file: Unknown driver '{other}'"
        ))),
    }
}
