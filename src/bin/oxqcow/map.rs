//! `oxqcow map`: the allocation map of an image and its backing chain, in
//! `qemu-img map`'s JSON and human forms. Owns turning block status into
//! qemu-img's entries: the depth rule past the end of a shorter backing
//! file, host offsets of preallocated zero clusters, holes in raw files,
//! QEMU's metadata-preallocation detection (data clusters over host holes
//! read as zero), and the merging of adjacent entries.

use crate::img_util::open_named;
use crate::util::{errmsg, file_extent, parse_img_size, virtual_size, CliResult};
use oxqcow::format::entries::L2Entry;
use oxqcow::format::header::Header;
use oxqcow::{BlockStatus, Image, OpenOptions, Qcow2};
use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when not given)
    #[arg(short = 'f', value_name = "FMT")]
    fmt: Option<String>,
    /// Output format
    #[arg(long = "output", value_name = "FMT", default_value = "human",
          value_parser = ["human", "json"])]
    output: String,
    /// First guest byte to map
    #[arg(short = 's', long = "start-offset", value_name = "OFFSET")]
    start: Option<String>,
    /// Largest number of bytes to map
    #[arg(short = 'l', long = "max-length", value_name = "LENGTH")]
    max_length: Option<String>,
    /// Accepted for compatibility (images are always opened read-only)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// FILENAME is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Image file (or json:{...}, or an option string with --image-opts)
    filename: String,
}

/// One line of the map.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
}

impl Entry {
    fn mergeable(&self, n: &Entry) -> bool {
        self.length > 0
            && self.start + self.length == n.start
            && self.depth == n.depth
            && self.present == n.present
            && self.zero == n.zero
            && self.data == n.data
            && self.compressed == n.compressed
            && match (self.offset, n.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }

    fn json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            let _ = write!(s, ", \"offset\": {o}");
        }
        s.push('}');
        s
    }
}

/// One image of the chain, with what the map needs to know beyond block
/// status, looked up on first use.
pub(crate) struct LayerInfo {
    /// What the map's File column calls it.
    name: String,
    /// Its host file.
    path: String,
    format: &'static str,
    size: u64,
    /// The image opened on its own (qcow2 only), for L2 entries and header.
    qcow: Option<Qcow2>,
    /// Its host file, for SEEK_DATA / SEEK_HOLE.
    file: Option<File>,
    /// QEMU's "metadata preallocation" verdict (qcow2 only).
    prealloc: Option<bool>,
    /// The external data file, where the layer's data clusters are.
    data_file: Option<String>,
}

impl LayerInfo {
    fn qcow(&mut self) -> CliResult<&Qcow2> {
        if self.qcow.is_none() {
            let opts = OpenOptions {
                no_backing: true,
                ..Default::default()
            };
            let q = Qcow2::open(Path::new(&self.path), &opts).map_err(|e| errmsg(&e))?;
            self.qcow = Some(q);
        }
        Ok(self.qcow.as_ref().expect("opened above"))
    }

    fn file(&mut self) -> CliResult<&File> {
        if self.file.is_none() {
            let f = File::open(&self.path).map_err(|e| {
                format!("Could not open '{}': {}", self.path, crate::util::ioerr(&e))
            })?;
            self.file = Some(f);
        }
        Ok(self.file.as_ref().expect("opened above"))
    }

    fn preallocated(&mut self) -> CliResult<bool> {
        if let Some(p) = self.prealloc {
            return Ok(p);
        }
        if self.data_file.is_some() {
            // The heuristic looks at the image file, which holds no data.
            return Ok(false);
        }
        let h = self.qcow()?.header();
        let p = detect_metadata_preallocation(self.file()?, &h);
        self.prealloc = Some(p);
        Ok(p)
    }
}

pub fn run(a: Args) -> CliResult<()> {
    let _ = a.force_share;
    let named = open_named(
        &a.filename,
        a.image_opts,
        a.fmt.as_deref(),
        &OpenOptions::default(),
    )?;
    let img = named.img;
    let size = virtual_size(&img);
    let start = match &a.start {
        Some(s) => {
            parse_img_size(s).map_err(|_| format!("Invalid start offset specified: '{s}'"))?
        }
        None => 0,
    };
    let max_len = match &a.max_length {
        Some(s) => parse_img_size(s).map_err(|_| format!("Invalid length specified: '{s}'"))?,
        None => u64::MAX,
    };
    let end = start.saturating_add(max_len).min(size);
    let mut layers = chain(&img, &named.name, named.file.as_deref());
    // A raw NBD export: the server's allocation, named by its URI.
    let nbd = img.nbd().is_some();
    if let Some(c) = img.nbd() {
        layers[0].name = c.name().to_string();
    }
    let mut entries: Vec<Entry> = Vec::new();
    let mut pos = start;
    while pos < end {
        let (st, n) = img.block_status(pos, end - pos).map_err(|e| errmsg(&e))?;
        if n == 0 {
            return Err(format!(
                "{}: block status made no progress at {pos}",
                a.filename
            ));
        }
        let found = if nbd {
            // An unallocated range of an export is a dirty one with
            // x-dirty-bitmap: neither present nor known to be zeros.
            let zero = matches!(st, BlockStatus::Zero { .. });
            let present = !matches!(st, BlockStatus::Unallocated { .. });
            vec![Entry {
                start: pos,
                length: n,
                depth: 0,
                present,
                zero,
                data: present && !zero,
                compressed: false,
                offset: present.then_some(pos),
            }]
        } else {
            describe(&mut layers, st, pos, n)?
        };
        for e in found {
            match entries.last_mut() {
                Some(last) if last.mergeable(&e) => last.length += e.length,
                _ => entries.push(e),
            }
        }
        pos += n;
    }
    if a.output == "json" {
        let mut out = String::from("[");
        if entries.is_empty() {
            // What qemu-img prints for an empty range.
            out.push_str(
                "{ \"start\": 0, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}",
            );
        }
        let lines: Vec<String> = entries.iter().map(Entry::json).collect();
        out.push_str(&lines.join(",\n"));
        out.push_str("]\n");
        print!("{out}");
        return Ok(());
    }
    let mut out = String::from("Offset          Length          Mapped to       File\n");
    for e in &entries {
        if e.data && e.offset.is_none() {
            print!("{out}");
            return Err("File contains external, encrypted or compressed clusters.".into());
        }
        if e.data && !e.zero {
            let _ = writeln!(
                out,
                "{:<16}{:<16}{:<16}{}",
                c_hex(e.start),
                c_hex(e.length),
                c_hex(e.offset.unwrap_or(0)),
                layers[e.depth as usize]
                    .data_file
                    .as_ref()
                    .unwrap_or(&layers[e.depth as usize].name)
            );
        }
    }
    print!("{out}");
    Ok(())
}

/// C's `%#x`: no prefix for zero.
fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// The images of the chain, top first; the top one is called `top_name`
/// and lives in `top_file`.
pub(crate) fn chain(img: &Image, top_name: &str, top_file: Option<&str>) -> Vec<LayerInfo> {
    let mut v = vec![LayerInfo {
        name: top_name.to_string(),
        path: top_file.unwrap_or(top_name).to_string(),
        format: img.format(),
        size: img.size(),
        qcow: None,
        file: None,
        prealloc: None,
        data_file: img
            .qcow2()
            .and_then(|q| q.data_file_name())
            .map(String::from),
    }];
    let mut l = img.backing();
    while let Some(layer) = l {
        v.push(LayerInfo {
            name: layer.filename().to_string(),
            path: layer.filename().to_string(),
            format: layer.format(),
            size: layer.size(),
            qcow: None,
            file: None,
            prealloc: None,
            data_file: layer.data_file().map(String::from),
        });
        l = layer.backing();
    }
    v
}

/// The parts of one block-status answer that hold data and do not read as
/// zeros (what qemu-img measure counts), as (start, length) pairs.
pub(crate) fn nonzero_data(
    layers: &mut [LayerInfo],
    st: BlockStatus,
    pos: u64,
    n: u64,
) -> CliResult<Vec<(u64, u64)>> {
    Ok(describe(layers, st, pos, n)?
        .into_iter()
        .filter(|e| e.data && !e.zero)
        .map(|e| (e.start, e.length))
        .collect())
}

/// Turns one block-status answer into map entries.
fn describe(layers: &mut [LayerInfo], st: BlockStatus, pos: u64, n: u64) -> CliResult<Vec<Entry>> {
    let entry = |start, length, depth, present, zero, data, offset| Entry {
        start,
        length,
        depth,
        present,
        zero,
        data,
        compressed: false,
        offset,
    };
    let layer_of = |layers: &mut [LayerInfo], d: u32| -> CliResult<usize> {
        if (d as usize) < layers.len() {
            Ok(d as usize)
        } else {
            Err(format!(
                "block status names layer {d}, past the end of the chain"
            ))
        }
    };
    let mut out = Vec::new();
    match st {
        BlockStatus::Data { host: None, depth } => out.push(Entry {
            compressed: true,
            ..entry(pos, n, depth, true, false, true, None)
        }),
        BlockStatus::Data {
            host: Some(h),
            depth,
        } => {
            let li = layer_of(layers, depth)?;
            let layer = &mut layers[li];
            // Raw files: holes read as zeros. qcow2 with QEMU's metadata
            // preallocation heuristic: data clusters over holes read as zeros.
            let raw = layer.format == "raw";
            if raw || layer.preallocated()? {
                let f = layer.file()?;
                let mut done = 0;
                while done < n {
                    let (is_data, len) = file_extent(f, h + done, n - done);
                    let len = len.max(1).min(n - done);
                    let zero = !is_data;
                    let data = is_data || !raw;
                    out.push(entry(
                        pos + done,
                        len,
                        depth,
                        true,
                        zero,
                        data,
                        Some(h + done),
                    ));
                    done += len;
                }
            } else {
                out.push(entry(pos, n, depth, true, false, true, Some(h)));
            }
        }
        BlockStatus::Zero { depth } => {
            let li = layer_of(layers, depth)?;
            let q = layers[li].qcow()?;
            let cs = q.cluster_size();
            let mut p = pos;
            while p < pos + n {
                let len = (cs - p % cs).min(pos + n - p);
                let offset = match q.l2_entry_at(p).map_err(|e| errmsg(&e))? {
                    L2Entry::Zero { host, .. } if host != 0 => Some(host + p % cs),
                    _ => None,
                };
                out.push(entry(p, len, depth, true, true, false, offset));
                p += len;
            }
        }
        BlockStatus::Unallocated { depth } => {
            // Past the end of a shorter backing file QEMU stops at the
            // overlay: it reads zeros there itself.
            let li = layer_of(layers, depth)?;
            let depth = if depth > 0 && pos >= layers[li].size {
                depth - 1
            } else {
                depth
            };
            // A subcluster not allocated in its cluster's host cluster:
            // QEMU names the host offset all the same.
            if layers[depth as usize].format == "qcow2" {
                let q = layers[depth as usize].qcow()?;
                if q.extended_l2() {
                    let cs = q.cluster_size();
                    let mut p = pos;
                    while p < pos + n {
                        let len = (cs - p % cs).min(pos + n - p);
                        let host = q.host_cluster_at(p).map_err(|e| errmsg(&e))?;
                        let offset = host.map(|h| h + p % cs);
                        out.push(entry(p, len, depth, false, true, false, offset));
                        p += len;
                    }
                    return Ok(out);
                }
            }
            out.push(entry(pos, n, depth, false, true, false, None));
        }
    }
    Ok(out)
}

/// QEMU's guess that an image was created with preallocated metadata:
/// clearly more clusters carry a refcount than the host file really has
/// allocated. Then data clusters over holes in the host file read as zero.
fn detect_metadata_preallocation(file: &File, h: &Header) -> bool {
    let Ok(meta) = file.metadata() else {
        return false;
    };
    let cs = h.cluster_size();
    let real_clusters = meta.blocks() * 512 / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = meta.len().div_ceil(cs);
    let bits = 1u64 << h.refcount_order.min(6);
    let per_block = cs * 8 / bits;
    let rt_len = (h.refcount_table_clusters as u64 * cs).min(8 << 20);
    let rt_len = rt_len.min(meta.len().saturating_sub(h.refcount_table_offset));
    let mut rt = vec![0u8; rt_len as usize];
    if file
        .read_exact_at(&mut rt, h.refcount_table_offset)
        .is_err()
    {
        return false;
    }
    let mut count = 0u64;
    let mut block = vec![0u8; cs as usize];
    for (i, e) in rt.chunks_exact(8).enumerate() {
        let first = i as u64 * per_block;
        if first >= end_cluster || count >= threshold {
            break;
        }
        let off = u64::from_be_bytes(e.try_into().unwrap_or([0; 8])) & !0x1ff;
        if off == 0 || file.read_exact_at(&mut block, off).is_err() {
            continue;
        }
        let n = per_block.min(end_cluster - first);
        for j in 0..n {
            if refcount_nonzero(&block, j, bits) {
                count += 1;
            }
        }
    }
    count >= threshold
}

/// Whether entry `j` of a refcount block of `bits`-wide entries is nonzero.
fn refcount_nonzero(block: &[u8], j: u64, bits: u64) -> bool {
    if bits < 8 {
        let bit = j * bits;
        let byte = block[(bit / 8) as usize];
        let mask = ((1u16 << bits) - 1) as u8;
        (byte >> (bit % 8)) & mask != 0
    } else {
        let w = (bits / 8) as usize;
        let o = j as usize * w;
        block[o..o + w].iter().any(|&b| b != 0)
    }
}
