//! The filter nodes of `oxqcow io`'s block graph: blkdebug and
//! copy-on-read. Neither changes what is stored, so both are taken out of
//! the option tree before the image is opened, leaving what they do:
//! a blkdebug node becomes a [`Blkdebug`] (its rules and state) placed at
//! the node it filtered — behind the image's host file
//! ([`BlkdebugStorage`], where the engine's events reach it) or, at the
//! top, in front of the whole device (see `io_cor.rs`); a copy-on-read
//! node becomes the device's copy-on-read flag, as qemu-io's `-C`.

use crate::io_open::{parse_size_opt, ZeroLimits};
use oxqcow::blockdev::is_node_opt;
use oxqcow::storage::{Blkdebug, BlkdebugStorage, Storage};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The blkdebug nodes found, by the prefix of the node they filter
/// ("" = the device, "file." = the image's host file), outermost first.
pub type DebugNodes = Vec<(String, Arc<Blkdebug>)>;

/// Options of a blkdebug node that do not change what it reads and
/// writes: request limits (not enforced: oxqcow's storage needs no
/// alignment), permissions, and every node's options (`is_node_opt`).
const BLKDEBUG_PASSTHROUGH: &[&str] = &[
    "align",
    "max-transfer",
    "opt-write-zero",
    "max-write-zero",
    "opt-discard",
    "max-discard",
];

/// Takes a top `driver=copy-on-read` node out: its `file.*` options
/// become the device's; every node's options and `bottom` it takes, but
/// has no use for. True when there was one.
pub fn strip_cor(
    map: BTreeMap<String, String>,
) -> Result<(BTreeMap<String, String>, bool), String> {
    if map.get("driver").map(String::as_str) != Some("copy-on-read") {
        return Ok((map, false));
    }
    let mut out = BTreeMap::new();
    for (k, v) in map {
        if let Some(r) = k.strip_prefix("file.") {
            out.insert(r.to_string(), v);
        } else if !(is_node_opt(&k) || k == "bottom") {
            return Err(format!(
                "Block format 'copy-on-read' does not support the option '{k}'"
            ));
        }
    }
    Ok((out, true))
}

/// What [`strip_blkdebug`] leaves: the options without blkdebug nodes,
/// the file name, the zero-write limits of a top node, the nodes.
pub struct Stripped {
    pub map: BTreeMap<String, String>,
    pub name: Option<String>,
    pub limits: Option<ZeroLimits>,
    pub nodes: DebugNodes,
}

/// Takes the blkdebug nodes out of the option tree ("blkdebug:CONFIG:PATH"
/// names, `driver=blkdebug,image.…` / `x-image` options), their image
/// taking their place, and builds each one's rules (its config file and
/// `inject-error` / `set-state` options; QEMU's messages on errors).
pub fn strip_blkdebug(
    mut map: BTreeMap<String, String>,
    mut name: Option<String>,
) -> Result<Stripped, String> {
    let mut limits = None;
    let mut nodes = DebugNodes::new();
    if let Some(n) = name.clone() {
        if let Some(rest) = n.strip_prefix("blkdebug:") {
            let (config, path) = rest
                .split_once(':')
                .ok_or("blkdebug requires both config file and image path")?;
            let at = if map.get("driver").map(String::as_str) == Some("blkdebug") {
                ""
            } else {
                map.insert("file.driver".into(), "blkdebug".into());
                "file."
            };
            if !config.is_empty() {
                map.insert(format!("{at}config"), config.to_string());
            }
            map.insert(format!("{at}x-image"), path.to_string());
            name = None;
        }
    }
    loop {
        let level = map
            .iter()
            .find(|(k, v)| (k.as_str() == "driver" || k.ends_with(".driver")) && *v == "blkdebug")
            .map(|(k, _)| k[..k.len() - "driver".len()].to_string());
        let Some(p) = level else {
            return Ok(Stripped {
                map,
                name,
                limits,
                nodes,
            });
        };
        if p.is_empty() {
            let size = |k: &str| -> Result<u64, String> {
                map.get(k)
                    .map(|v| parse_size_opt(k, v))
                    .transpose()
                    .map(|v| v.unwrap_or(0))
            };
            let align = size("align")?.max(1);
            let zalign = size("opt-write-zero")?.max(align);
            let max = size("max-write-zero")?;
            let max = if max == 0 { i64::MAX as u64 } else { max };
            let mt = size("max-transfer")?;
            limits = Some(ZeroLimits {
                align: zalign,
                max: max / zalign * zalign,
                max_transfer: if mt == 0 { 16 << 20 } else { mt },
            });
        }
        let mut image: BTreeMap<String, String> = BTreeMap::new();
        let mut rules = BTreeMap::new();
        let mut path = None;
        for (k, v) in std::mem::take(&mut map) {
            let Some(rel) = k.strip_prefix(&p) else {
                map.insert(k, v);
                continue;
            };
            if let Some(ik) = rel.strip_prefix("image.") {
                image.insert(ik.to_string(), v);
            } else if rel == "image" || rel == "x-image" {
                path = Some(v);
            } else if rel == "config"
                || rel.starts_with("inject-error.")
                || rel.starts_with("set-state.")
            {
                rules.insert(rel.to_string(), v);
            } else if is_node_opt(rel)
                || BLKDEBUG_PASSTHROUGH.contains(&rel)
                || rel.starts_with("take-child-perms")
                || rel.starts_with("unshare-child-perms")
            {
                // Nothing to do for these.
            } else {
                return Err(format!(
                    "Block protocol 'blkdebug' doesn't support the option '{rel}'"
                ));
            }
        }
        let dbg = oxqcow::blockdev::blkdebug_rules(&rules).map_err(|e| crate::util::errmsg(&e))?;
        nodes.push((p.clone(), Arc::new(dbg)));
        if let Some(path) = path {
            if image.contains_key("driver") && !is_protocol(&image["driver"]) {
                image.entry("file.filename".into()).or_insert(path);
            } else {
                image.entry("filename".into()).or_insert(path);
            }
        }
        image
            .entry("driver".into())
            .or_insert_with(|| "file".into());
        for (k, v) in image {
            map.insert(format!("{p}{k}"), v);
        }
    }
}

pub fn is_protocol(d: &str) -> bool {
    matches!(d, "file" | "host_device" | "host_cdrom")
}

/// Puts the blkdebug nodes filtering the node at `prefix` in front of its
/// storage (the innermost next to it).
pub fn wrap(mut s: Arc<dyn Storage>, nodes: &DebugNodes, prefix: &str) -> Arc<dyn Storage> {
    for (_, d) in nodes.iter().rev().filter(|(p, _)| p == prefix) {
        s = Arc::new(BlkdebugStorage::new(s, d.clone()));
    }
    s
}

/// Whether some blkdebug node filters the node at `prefix`.
pub fn filtered(nodes: &DebugNodes, prefix: &str) -> bool {
    nodes.iter().any(|(p, _)| p == prefix)
}
