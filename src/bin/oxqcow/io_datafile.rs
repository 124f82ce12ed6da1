//! The `data-file` option of a qcow2 node in `oxqcow io` (QEMU's BlockdevRef
//! for an external data file): inline options become an
//! `oxqcow::DataFileSource` — a file (`data-file.filename`, driver `file`
//! or `raw` over `file`) or a `null-co` device that reads zeros and drops
//! writes (what iotest 270 uses to "write" 2 GiB without the disk space).
//! A plain string names a block node, which qemu-io has no way to define.

use super::{check_protocol_opts, child_opts, parse_bool, parse_size_opt, unsupported_driver};
use oxqcow::storage::NullStorage;
use oxqcow::DataFileSource;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// The data file the options of a qcow2 node give, if any.
pub fn data_file_source(map: &BTreeMap<String, String>) -> Result<Option<DataFileSource>, String> {
    if let Some(r) = map.get("data-file") {
        return Err(format!("Cannot find device='{r}' nor node-name='{r}'"));
    }
    let sub = child_opts(map, "data-file.");
    if sub.is_empty() {
        return Ok(None);
    }
    match sub.get("driver").map(String::as_str) {
        None if !sub.contains_key("filename") => Err("Must specify either driver or file".into()),
        None | Some("file") => file_node(&sub, "file").map(Some),
        Some("raw") => {
            let file = child_opts(&sub, "file.");
            for k in sub.keys() {
                if !(k.starts_with("file.") || k == "driver" || k == "node-name") {
                    return Err(format!(
                        "Block format 'raw' does not support the option '{k}'"
                    ));
                }
            }
            match file.get("driver").map(String::as_str) {
                _ if file.is_empty() => Err("A block device must be specified for \"file\"".into()),
                None | Some("file") => file_node(&file, "file").map(Some),
                Some(d) => Err(unsupported_driver(d)),
            }
        }
        Some(d @ ("null-co" | "null-aio")) => {
            for k in sub.keys() {
                if !matches!(
                    k.as_str(),
                    "driver" | "node-name" | "size" | "read-zeroes" | "latency-ns" | "filename"
                ) {
                    return Err(format!(
                        "Block protocol '{d}' doesn't support the option '{k}'"
                    ));
                }
            }
            let read_zeroes = match sub.get("read-zeroes") {
                Some(v) => parse_bool("read-zeroes", v)?,
                None => false,
            };
            let size = match sub.get("size") {
                Some(v) => parse_size_opt("size", v)?,
                None => 1 << 30,
            };
            Ok(Some(DataFileSource::Storage {
                storage: Arc::new(NullStorage::new(size, read_zeroes)),
                name: format!("{d}://"),
            }))
        }
        Some(d) => Err(unsupported_driver(d)),
    }
}

/// A `file` protocol node: its file name. As in QEMU, the file is opened
/// before its other options are looked at.
fn file_node(opts: &BTreeMap<String, String>, driver: &str) -> Result<DataFileSource, String> {
    let Some(f) = opts.get("filename") else {
        return Err(format!("The '{driver}' block driver requires a file name"));
    };
    if let Err(e) = std::fs::metadata(f) {
        return Err(format!("Could not open '{f}': {}", crate::util::ioerr(&e)));
    }
    check_protocol_opts(opts, driver)?;
    Ok(DataFileSource::Path(PathBuf::from(f)))
}
