//! NBD exports for `oxqcow io`: what qemu-io's block layer opens when the
//! file name is an NBD name (`nbd:unix:SOCKET`, `nbd+unix:///EXPORT?
//! socket=SOCKET`, `nbd://HOST:PORT/EXPORT`) or the options name the nbd
//! driver (`driver=nbd,server.type=unix,server.path=…,export=…`, or
//! `file.driver=nbd,file.server.…` under raw or qcow2). `-f raw` reads
//! the export as a raw disk, `-f qcow2` as a qcow2 image, no `-f` probes
//! it; `driver=nbd` is the protocol node itself (qemu-io's `info` then
//! names two drivers, `nbd` and `nbd+unix`, as qemu-io prints them).

use crate::io_open::Flags;
use oxqcow::blockdev::is_node_opt;
use oxqcow::nbd::{is_nbd_name, NbdTarget};
use oxqcow::{Error, Image, OpenOptions};
use std::collections::BTreeMap;

/// Opens the NBD export the request names: None when it names none.
/// The result is the image and the driver name qemu-io reports.
pub fn open(
    map: &BTreeMap<String, String>,
    name: Option<&str>,
    flags: &Flags,
    snapshot: bool,
) -> Option<Result<(Image, String), String>> {
    let driver = map.get("driver").map(String::as_str);
    let (target, fmt, shown) = if let Some(n) = name.filter(|n| is_nbd_name(n)) {
        let (fmt, shown) = match driver {
            None => (None, None),
            Some("nbd") => (Some("raw"), Some("nbd")),
            Some(d @ ("raw" | "qcow2")) => (Some(d), Some(d)),
            Some(_) => return None,
        };
        if let Some(k) = map.keys().find(|k| !is_node_opt(k)) {
            let d = driver.unwrap_or("nbd");
            return Some(Err(format!(
                "Block format '{d}' does not support the option '{k}'"
            )));
        }
        (NbdTarget::parse(n), fmt, shown)
    } else if driver == Some("nbd") {
        (NbdTarget::from_options(map), Some("raw"), Some("nbd"))
    } else if map.get("file.driver").map(String::as_str) == Some("nbd") {
        let fmt = match driver {
            Some(d @ ("raw" | "qcow2")) => d,
            Some(_) => return None,
            None => return Some(Err("Must specify either driver or file".into())),
        };
        let child: BTreeMap<String, String> = map
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("file.").map(|r| (r.to_string(), v.clone())))
            .collect();
        (NbdTarget::from_options(&child), Some(fmt), Some(fmt))
    } else {
        return None;
    };
    if snapshot {
        return Some(Err(
            "oxqcow io cannot put a temporary overlay (-s) over an NBD export".into(),
        ));
    }
    let target = match target {
        Ok(t) => t,
        Err(e) => return Some(Err(crate::util::errmsg(&e))),
    };
    let oo = OpenOptions {
        writable: !flags.read_only,
        writethrough: flags.writethrough,
        ..Default::default()
    };
    Some(match Image::open_nbd(&target, fmt, &oo) {
        Ok(img) => {
            let shown = shown.unwrap_or(img.format()).to_string();
            Ok((img, shown))
        }
        // qemu-io's words for a read-write open of a read-only export.
        Err(Error::ReadOnly(_)) => Err("Could not open image: Permission denied".into()),
        Err(e) => Err(crate::io_open::open_errmsg(&e, &target.uri())),
    })
}
