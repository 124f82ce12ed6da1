//! QEMU's `compress` filter node for `oxqcow io`: every data write through
//! it becomes a compressed write of its child, which must be a qcow2 node
//! (`Compression is not supported for underlying format: X` otherwise).
//! The filter's request alignment is the child's cluster size, so the
//! block layer pads unaligned writes to whole clusters with what the
//! image reads there (the head and tail clusters are read first), and a
//! zero write becomes a compressed write of its partial head and tail
//! clusters around a plain zero write of the whole clusters between them.
//! Reads, discards, truncate and the VM state pass through; `write -c`
//! through the filter is `Operation not supported` (the filter itself
//! has no compressed writes); reopen is refused as QEMU refuses it. A
//! copy-on-read node may sit under it (its copies are plain writes) or
//! over it (`-C`: the copies go through it, compressed). The write
//! permission needs an image of whole clusters and no read-only node in
//! the chain of files, checked when qemu-io asks for it: at open, or
//! with `-r` and `read-only=off` at the first command that writes.
//! The qemu-img commands refuse the filter (`img_util.rs`).
//!
//! The compressed writes follow QEMU's qcow2 driver: a cluster that has
//! a host cluster fails with EIO (compressed data never overwrites), and
//! a request of several clusters is cut into one task per cluster run by
//! up to 8 workers, so after a failing cluster the next 8 still get
//! written, what QEMU's pool usually does before it sees the error.

use crate::io_open::{child_opts, open, parse_bool, Backend, Dev, Flags, OpenReq};
use oxqcow::blockdev::is_node_opt;
use oxqcow::Image;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

/// QEMU's QCOW2_MAX_WORKERS: the clusters of one compressed request in
/// flight at once.
const WORKERS: usize = 8;

/// What an open compress node keeps beyond the device.
pub struct CompressNode {
    /// A copy-on-read node under the filter: its copies are plain writes
    /// (those of `-C` over the filter go through it, compressed).
    pub cor_under: bool,
    /// `-r` with `read-only=off`: a writable node whose write permission
    /// is taken at the first command that writes, with the open's checks
    /// then (a truncate needs none for the size: it takes `resize` too).
    lazy_perm: bool,
    /// `file.read-only=on`: the qcow2 node refuses that permission.
    file_read_only: bool,
    perm_taken: AtomicBool,
    node_name: String,
}

/// reopen's answer: QEMU's compress driver cannot be reopened.
pub fn reopen_error(d: &Dev) -> Option<String> {
    d.compress.as_ref().map(|c| {
        format!(
            "Block format 'compress' used by node '{}' does not support reopening files",
            c.node_name
        )
    })
}

/// Whether a `read-only` option in `map` (already checked to be a
/// boolean) is on.
fn on(map: &BTreeMap<String, String>, k: &str) -> bool {
    map.get(k)
        .is_some_and(|v| parse_bool(k, v).unwrap_or(false))
}

const MISALIGNED: &str = "Cannot get 'write' permission without 'resize': \
                          Image size is not a multiple of request alignment";

/// Opens a `driver=compress` node (the options `map`, and `name` for
/// `-f compress FILE`): its child first, then the checks in QEMU's order
/// (the child can compress, no unknown option, the write permission).
/// `flags` are the node's (its `read-only` option over `-r`).
pub fn open_compress(
    map: BTreeMap<String, String>,
    name: Option<String>,
    req: OpenReq,
    flags: Flags,
) -> Result<Dev, String> {
    if req.snapshot {
        // QEMU 10's qemu-io hangs on -s over a compress node.
        return Err("oxqcow does not implement -s over the 'compress' block driver".into());
    }
    let mut child = child_opts(&map, "file.");
    if let Some(f) = map.get("file") {
        return Err(format!("Cannot find device='{f}' nor node-name='{f}'"));
    }
    if name.is_none() && child.is_empty() {
        return Err("A block device must be specified for \"file\"".into());
    }
    let driver = child
        .entry("driver".to_string())
        .or_insert_with(|| "file".to_string())
        .clone();
    if let Some(n) = &name {
        // The file name goes to the child, a protocol node unless the
        // options say otherwise.
        let key = if crate::io::io_filters::is_protocol(&driver) {
            "filename"
        } else {
            "file.filename"
        };
        child.entry(key.to_string()).or_insert_with(|| n.clone());
    }
    let d = open(OpenReq {
        name: None,
        opts: child.into_iter().collect(),
        flags: flags.clone(),
        snapshot: false,
        cor: false,
    })?;
    let under = if !d.top_dbg.is_empty() {
        "blkdebug".to_string()
    } else if d.cor {
        "copy-on-read".to_string()
    } else {
        d.driver.clone()
    };
    let (size, cs) = match &d.be {
        // A copy-on-read node passes compressed writes on to its image.
        Backend::Img(Image::Qcow2(q)) if under == "qcow2" || under == "copy-on-read" => {
            (q.size(), q.cluster_size())
        }
        _ => {
            return Err(format!(
                "Compression is not supported for underlying format: {under}"
            ))
        }
    };
    for k in map.keys() {
        if !(k.starts_with("file.") || is_node_opt(k)) {
            return Err(format!(
                "Block format 'compress' does not support the option '{k}'"
            ));
        }
    }
    // The write permission (qemu-io asks for it unless -r): a read-only
    // node down the filter's chain of files refuses it. QEMU checks the
    // filter and the protocol node before the qcow2 node's alignment,
    // and then the qcow2 node. A writable qcow2 node (the filter's
    // read-only=off under -r) needs a writable file at open already.
    let deep = map.keys().any(|k| {
        k.strip_suffix("read-only").is_some_and(|p| {
            p.len() > "file.".len() && p.split_terminator('.').all(|s| s == "file")
        }) && on(&map, k)
    });
    let file_read_only = on(&map, "file.read-only");
    if !req.flags.read_only {
        if on(&map, "read-only") || deep {
            return Err("Block node is read-only".into());
        }
        if !size.is_multiple_of(cs) {
            return Err(MISALIGNED.into());
        }
        if file_read_only {
            return Err("Block node is read-only".into());
        }
    } else if !flags.read_only && deep {
        return Err("Block node is read-only".into());
    }
    let node = CompressNode {
        cor_under: d.cor,
        lazy_perm: req.flags.read_only && !flags.read_only,
        file_read_only,
        perm_taken: AtomicBool::new(false),
        // QEMU's generated names are `#block` and a counter, which the
        // iotests filter out.
        node_name: map
            .get("node-name")
            .cloned()
            .unwrap_or_else(|| "#block100".to_string()),
    };
    let mut explicit = map;
    explicit.insert("driver".into(), "compress".into());
    // The device is as writable as the filter node (a read-only qcow2
    // node under it fails the write permission above).
    let flags = Flags {
        read_only: flags.read_only,
        ..d.flags.clone()
    };
    Ok(Dev {
        flags,
        driver: "compress".into(),
        cor: req.cor || d.cor,
        req,
        explicit,
        compress: Some(node),
        ..d
    })
}

impl Dev {
    /// The write permission a command that writes needs (see
    /// [`CompressNode`]); `resize` for truncate. The error is QEMU's.
    pub fn compress_write_perm(&self, resize: bool) -> Result<(), String> {
        let Some(c) = &self.compress else {
            return Ok(());
        };
        if !c.lazy_perm || c.perm_taken.load(Ordering::Acquire) {
            return Ok(());
        }
        let q = self.qcow2().map_err(|_| MISALIGNED.to_string())?;
        if !resize && !q.size().is_multiple_of(q.cluster_size()) {
            return Err(MISALIGNED.into());
        }
        if c.file_read_only {
            return Err("Block node is read-only".into());
        }
        c.perm_taken.store(true, Ordering::Release);
        Ok(())
    }

    fn qcow2(&self) -> Result<&oxqcow::Qcow2, i32> {
        match &self.be {
            Backend::Img(Image::Qcow2(q)) => Ok(q),
            _ => Err(libc::ENOTSUP),
        }
    }

    /// Whole clusters of `data` from `start` (a cluster boundary; the last
    /// one may end at the end of the image) written compressed as QEMU's
    /// qcow2 driver writes them (see the module comment): the first
    /// error, after the clusters QEMU's workers would still write.
    pub(crate) fn compressed_clusters(
        &self,
        q: &oxqcow::Qcow2,
        data: &[u8],
        start: u64,
    ) -> Result<(), i32> {
        let cs = q.cluster_size();
        let mut first = None;
        let mut last = usize::MAX;
        for (k, chunk) in data.chunks(cs as usize).enumerate() {
            if k > last {
                break;
            }
            if let Err(e) = q.write_compressed_fresh(chunk, start + k as u64 * cs) {
                if first.is_none() {
                    first = Some(e.errno());
                    last = k + WORKERS;
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The clusters [start, start+len) as the image reads them (zeros
    /// past its end), for the block layer's read-modify-write.
    fn read_clusters(&self, start: u64, len: u64) -> Result<Vec<u8>, i32> {
        let mut b = vec![0u8; len as usize];
        self.plain_read(&mut b, start)?;
        Ok(b)
    }

    /// Compressed-writes `buf` after a read-modify-write of its partial
    /// clusters; a padded request that runs past the end of an image
    /// whose size is not a whole number of clusters (after a truncate)
    /// stops there.
    fn padded_write(&self, q: &oxqcow::Qcow2, buf: &[u8], off: u64) -> Result<(), i32> {
        let cs = q.cluster_size();
        let end = off + buf.len() as u64;
        let (a0, a1) = (off / cs * cs, end.div_ceil(cs) * cs);
        let mut data = if off == a0 && end == a1 {
            Vec::new()
        } else {
            vec![0u8; (a1 - a0) as usize]
        };
        if !data.is_empty() {
            if off != a0 {
                let head = self.read_clusters(a0, cs)?;
                data[..cs as usize].copy_from_slice(&head);
            }
            if end != a1 && (off == a0 || a1 - cs > a0) {
                let tail = self.read_clusters(a1 - cs, cs)?;
                data[(a1 - cs - a0) as usize..].copy_from_slice(&tail);
            }
            data[(off - a0) as usize..(end - a0) as usize].copy_from_slice(buf);
            data.truncate((q.size().min(a1) - a0) as usize);
        }
        let data = if data.is_empty() { buf } else { &data[..] };
        self.compressed_clusters(q, data, a0)
    }

    /// A data write through the compress filter.
    pub(crate) fn compress_write(&self, buf: &[u8], off: u64) -> Result<(), i32> {
        let q = self.qcow2()?;
        self.padded_write(q, buf, off)
    }

    /// A zero write through the compress filter: the partial head
    /// cluster (the whole request when it ends there), the whole clusters
    /// as zeros, the partial tail cluster, stopping at the first failure.
    pub(crate) fn compress_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<(), i32> {
        let q = self.qcow2()?;
        let cs = q.cluster_size();
        let end = off + len;
        let mut pos = off;
        if !off.is_multiple_of(cs) {
            let head_end = end.min((off / cs + 1) * cs);
            self.padded_write(q, &vec![0u8; (head_end - off) as usize], off)?;
            pos = head_end;
        }
        let mid_end = end / cs * cs;
        if mid_end > pos {
            self.zero_image(pos, mid_end - pos, unmap)?;
            pos = mid_end;
        }
        if pos < end {
            self.padded_write(q, &vec![0u8; (end - pos) as usize], pos)?;
        }
        Ok(())
    }
}
