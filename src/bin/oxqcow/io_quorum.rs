//! The `quorum` node of the block graph (qemu-img and `oxqcow io`): a
//! qcow2 or raw image whose file is a quorum of host files
//! ([`oxqcow::storage::QuorumStorage`]): its options with QEMU's checks
//! and messages, and the refusal of a backing chain, which cannot be
//! found from a node without a directory.

use super::{check_format_opts, child_opts, open_errmsg, unsupported_driver, Flags};
use super::{FILE_OPTS, KNOWN_DRIVERS};
use oxqcow::blockdev::is_node_opt;
use oxqcow::{Image, OpenOptions};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Options a quorum node takes besides every node's (its children apart).
const QUORUM_OPTS: &[&str] = &[
    "vote-threshold",
    "read-pattern",
    "rewrite-corrupted",
    "blkverify",
];

/// The host files of a quorum node's children (`children.N.filename`,
/// or a raw child's `children.N.file.filename`), in order; None when
/// `map` has no quorum node as its file.
pub fn quorum_children(map: &BTreeMap<String, String>) -> Option<Vec<String>> {
    if map.get("file.driver").map(String::as_str) != Some("quorum") {
        return None;
    }
    let mut out = Vec::new();
    for n in 0.. {
        let p = format!("file.children.{n}.");
        let f = map
            .get(&format!("{p}filename"))
            .or_else(|| map.get(&format!("{p}file.filename")));
        match f {
            Some(f) => out.push(f.clone()),
            None if map.keys().any(|k| k.starts_with(&p)) => out.push(String::new()),
            None => break,
        }
    }
    Some(out)
}

/// A format node over a quorum node (QEMU's `quorum` driver over file
/// children, or raw nodes over files): see `QuorumStorage`. The image
/// has no directory, so a backing file cannot be found relative to it.
pub(super) fn open_on_quorum(
    map: &BTreeMap<String, String>,
    flags: &Flags,
) -> Result<(Image, String), String> {
    let fmt = match map.get("driver").map(String::as_str) {
        Some(f @ ("qcow2" | "raw")) => f.to_string(),
        Some(f) if KNOWN_DRIVERS.contains(&f) => return Err(unsupported_driver(f)),
        Some(f) => return Err(format!("Unknown driver '{f}'")),
        None => return Err("Must specify either driver or file".into()),
    };
    check_format_opts(map, &fmt)?;
    let q = child_opts(map, "file.");
    for k in q.keys().filter(|k| !k.starts_with("children.")) {
        if !(is_node_opt(k) || QUORUM_OPTS.contains(&k.as_str())) {
            return Err(format!(
                "Block format 'quorum' does not support the option '{k}'"
            ));
        }
    }
    let threshold = match q.get("vote-threshold") {
        Some(v) => v
            .trim()
            .parse::<i64>()
            .map_err(|_| "Parameter 'vote-threshold' expects a value >= 1".to_string())?,
        None => 0,
    };
    if threshold < 1 {
        return Err("Parameter 'vote-threshold' expects a value >= 1".into());
    }
    let fifo = match q.get("read-pattern").map(String::as_str) {
        None | Some("quorum") => false,
        Some("fifo") => true,
        Some(_) => return Err("Please set read-pattern as fifo or quorum".into()),
    };
    let files = quorum_children(map).unwrap_or_default();
    if files.is_empty() {
        return Err("Number of provided children must be 1 or more".into());
    }
    if threshold as usize > files.len() {
        return Err("threshold may not exceed children count".into());
    }
    let mut children: Vec<Arc<dyn oxqcow::storage::Storage>> = Vec::new();
    for (n, f) in files.iter().enumerate() {
        let c = child_opts(&q, &format!("children.{n}."));
        let ok = match c.get("driver").map(String::as_str) {
            None | Some("file") => c.keys().all(|k| FILE_OPTS.contains(&k.as_str())),
            Some("raw") => {
                matches!(
                    c.get("file.driver").map(String::as_str),
                    None | Some("file")
                ) && !c.contains_key("offset")
                    && !c.contains_key("size")
            }
            Some(_) => false,
        };
        if !ok || f.is_empty() {
            return Err(format!(
                "oxqcow's quorum node takes file children (or raw over a file) only: children.{n}"
            ));
        }
        let st = flags
            .apply(OpenOptions::default())
            .open_file(Path::new(f))
            .map_err(|e| format!("Could not open '{f}': {}", crate::util::ioerr(&e)))?;
        children.push(Arc::new(st));
    }
    let storage = Arc::new(oxqcow::storage::QuorumStorage::new(
        children,
        threshold as usize,
        fifo,
    ));
    let mut oo = flags.apply(flags.engine.clone());
    let wants_backing = !oo.no_backing;
    oo.no_backing = true;
    let name = "quorum".to_string();
    let img = Image::open_on(storage, &name, &fmt, &oo).map_err(|e| open_errmsg(&e, &name))?;
    let backed = img
        .qcow2()
        .is_some_and(|q| q.header().backing_file.is_some());
    if wants_backing && backed {
        return Err("Cannot generate a base directory for quorum nodes".into());
    }
    Ok((img, fmt))
}
