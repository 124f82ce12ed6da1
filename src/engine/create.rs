//! Image creation, byte for byte as `qemu-img create -f qcow2` lays it out:
//! header, refcount table and first refcount block in clusters 0–2, the
//! full header rewrite, the L1 table sized for the image, preallocation,
//! the backing file, then encryption (the LUKS header in the clusters after
//! everything else).

use super::backing::resolve;
use super::data_file::{create_data_file, DataFileSource};
use super::{OpenOptions, Qcow2};
use crate::error::{Error, Result};
use crate::format::entries::COPIED;
use crate::format::header::{Header, V2_HEADER_LEN, V3_HEADER_LEN};
use crate::format::*;
use crate::storage::{FileStorage, Storage};
use std::path::Path;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Preallocation {
    #[default]
    Off,
    Metadata,
    Falloc,
    Full,
}

impl Preallocation {
    pub fn parse(s: &str) -> Result<Preallocation> {
        Ok(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "Parameter 'preallocation' does not accept value '{s}'"
                )))
            }
        })
    }
}

/// qcow2 creation options, with QEMU's names and defaults.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    pub cluster_size: u64,
    pub refcount_bits: u64,
    pub lazy_refcounts: bool,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
    pub preallocation: Preallocation,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
    /// The new file's extent size hint (see
    /// [`crate::storage::set_extent_size_hint`]): None gives QEMU's
    /// default of 1 MiB where the file system takes it; a hint given
    /// explicitly must be set, and fit in 32 bits.
    pub extent_size_hint: Option<u64>,
    /// External data file name (used as given: relative to the current
    /// directory, as QEMU does).
    pub data_file: Option<String>,
    /// Keep the data file a valid raw image of the disk ("raw external data").
    pub data_file_raw: bool,
    /// 128-bit L2 entries with 32 subclusters per cluster.
    pub extended_l2: bool,
    /// Encrypt the image (the resolved `encrypt.*` options, with the
    /// password; see `crypto::encrypt_create_from_options`).
    pub encrypt: Option<crate::crypto::EncryptCreate>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            backing_file: None,
            backing_fmt: None,
            preallocation: Preallocation::Off,
            compression_type: 0,
            extent_size_hint: None,
            data_file: None,
            data_file_raw: false,
            extended_l2: false,
            encrypt: None,
        }
    }
}

/// Largest virtual size a cluster size allows (standard L2 entries).
pub fn max_size(cluster_bits: u32) -> u64 {
    max_size_ext(cluster_bits, false)
}

/// Largest virtual size a cluster size and L2 entry width allow.
pub fn max_size_ext(cluster_bits: u32, extended_l2: bool) -> u64 {
    (MAX_L1_SIZE_BYTES / 8) * l2_span_ext(cluster_bits, extended_l2)
}

impl CreateOptions {
    /// Applies one `-o name=value` option.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bool_opt = |v: &str| match v {
            "on" | "true" | "yes" => Ok(true),
            "off" | "false" | "no" => Ok(false),
            _ => Err(Error::InvalidArgument(format!(
                "Parameter '{key}' expects 'on' or 'off'"
            ))),
        };
        match key {
            "size" => self.size = parse_size(value)?,
            "compat" | "version" => {
                self.version = match value {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "Parameter 'version' does not accept value '{value}'"
                        )))
                    }
                }
            }
            "cluster_size" => self.cluster_size = parse_size(value)?,
            "refcount_bits" => {
                // A negative number is a number to QEMU (it wraps), and
                // then a width no image can have.
                self.refcount_bits = value
                    .parse()
                    .or_else(|_| value.parse::<i64>().map(|v| v as u64))
                    .map_err(|_| {
                        Error::InvalidArgument(
                            "Parameter 'refcount_bits' expects a number".to_string(),
                        )
                    })?
            }
            "lazy_refcounts" => self.lazy_refcounts = bool_opt(value)?,
            "backing_file" => self.backing_file = Some(value.to_string()),
            "backing_fmt" => self.backing_fmt = Some(value.to_string()),
            "preallocation" => self.preallocation = Preallocation::parse(value)?,
            "extent_size_hint" => self.extent_size_hint = Some(parse_size(value)?),
            "compression_type" => {
                self.compression_type = match value {
                    "zlib" => 0,
                    "zstd" => 1,
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "Parameter 'compression-type' does not accept value '{value}'"
                        )))
                    }
                }
            }
            // Encryption needs a secret, which an option string cannot
            // carry: callers resolve `encrypt.*` options into `encrypt`.
            "encryption" | "encrypt.format" if bool_opt(value).ok() != Some(false) => {
                return Err(Error::Unsupported(
                    "qcow2 encryption needs a key secret, which this interface cannot pass".into(),
                ))
            }
            "encryption" => {}
            "extended_l2" => self.extended_l2 = bool_opt(value)?,
            "data_file" => self.data_file = Some(value.to_string()),
            "data_file_raw" => self.data_file_raw = bool_opt(value)?,
            _ => return Err(Error::InvalidArgument(format!("Invalid parameter '{key}'"))),
        }
        Ok(())
    }

    /// Parses a qemu-img `-o` string ("compat=1.1,lazy_refcounts=on").
    pub fn parse_into(&mut self, opts: &str) -> Result<()> {
        for item in split_opts(opts) {
            if item.is_empty() {
                continue;
            }
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None if item == "lazy_refcounts" => (item.clone(), "on".into()),
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "Invalid parameter '{item}'"
                    )))
                }
            };
            self.set(&k, &v)?;
        }
        Ok(())
    }

    /// QEMU's checks on the combination, with its messages.
    pub fn validate(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(Error::InvalidArgument(
                "Cluster size must be a power of two between 512 and 2048k".into(),
            ));
        }
        if self.lazy_refcounts && self.version < 3 {
            return Err(Error::InvalidArgument(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)".into(),
            ));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(Error::InvalidArgument(
                "Refcount width must be a power of two and may not exceed 64 bits".into(),
            ));
        }
        if self.version < 3 && self.refcount_bits != 16 {
            return Err(Error::InvalidArgument(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)".into(),
            ));
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return Err(Error::InvalidArgument(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on".into(),
            ));
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err(Error::InvalidArgument(
                "Backing format cannot be used without backing file".into(),
            ));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(Error::InvalidArgument(
                "data-file-raw requires data-file".into(),
            ));
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(Error::InvalidArgument(
                "Backing file and data-file-raw cannot be used at the same time".into(),
            ));
        }
        if self.version < 3 && self.data_file.is_some() {
            return Err(Error::InvalidArgument(
                "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)".into(),
            ));
        }
        if self.version < 3 && self.compression_type != 0 {
            return Err(Error::InvalidArgument(
                "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)".into(),
            ));
        }
        if self.extended_l2 && self.version < 3 {
            return Err(Error::InvalidArgument(
                "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)".into(),
            ));
        }
        if self.extended_l2 && cs < 1 << subcluster::MIN_CLUSTER_BITS {
            return Err(Error::InvalidArgument(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                    .into(),
            ));
        }
        if self.size > max_size_ext(cs.trailing_zeros(), self.extended_l2) {
            return Err(Error::TooLarge(
                "The image size is too large for file format 'qcow2' (try using a larger cluster size)".into(),
            ));
        }
        Ok(())
    }
}

/// Splits an option string at commas; ",," stands for a literal comma.
fn split_opts(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().unwrap().push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().unwrap().push(c);
        }
    }
    out
}

/// Parses a size with qemu-img's suffixes (k, M, G, T, P, E; powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || {
        Error::InvalidArgument(format!(
            "Invalid size '{s}': expected a number with an optional suffix of K, M, G, T, P or E"
        ))
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suf) = t.split_at(split);
    let shift = match suf {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(bad()),
    };
    if num.contains('.') {
        let f: f64 = num.parse().map_err(|_| bad())?;
        let v = f * (1u64 << shift) as f64;
        if !(0.0..1.8e19).contains(&v) {
            return Err(bad());
        }
        return Ok(v as u64);
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Creates a qcow2 image at `path`.
pub fn create(path: &Path, o: &CreateOptions) -> Result<()> {
    o.validate()?;
    let name = path.display().to_string();
    if let Some(b) = &o.backing_file {
        // QEMU opens the backing file to check it (and to take its size when
        // none is given); we require it to exist when its format must be probed.
        let bp = resolve(path, b);
        if o.backing_fmt.is_none() && !bp.exists() {
            return Err(Error::InvalidArgument(format!(
                "Could not open backing file '{}': No such file or directory",
                bp.display()
            )));
        }
    }
    let hint = extent_size_hint(o.extent_size_hint)?;
    // The data file first: if it cannot be made, no image is left behind.
    let data = match &o.data_file {
        Some(n) => Some(create_data_file(n, o.size.div_ceil(512) * 512)?),
        None => None,
    };
    let f = FileStorage::create(path)
        .map_err(|e| Error::io(format!("Could not create '{name}'"), e))?;
    apply_extent_size_hint(f.file(), hint, o.extent_size_hint.is_some())?;
    let file: Arc<dyn Storage> = Arc::new(f);
    create_with_data(file, data, path, o)
}

/// Creates (or truncates) a raw image of `size` bytes, rounded up to whole
/// sectors, with an extent size hint (`hint`, or 1 MiB where the file
/// system takes one). Like QEMU, the first block is written so that the
/// file has one allocated block to probe alignment with; the rest stays
/// sparse unless `prealloc` is falloc or full (metadata is no raw mode).
/// Not synced, as qemu-img does not: whoever needs the new file durable
/// flushes it (and a convert target is written with cache=unsafe).
pub fn create_raw(
    path: &Path,
    size: u64,
    prealloc: Preallocation,
    hint: Option<u64>,
) -> Result<()> {
    let name = path.display();
    if prealloc == Preallocation::Metadata {
        return Err(Error::InvalidArgument(
            "Parameter 'preallocation' does not accept value 'metadata'".into(),
        ));
    }
    let size = size.div_ceil(512) * 512;
    let hint_bytes = extent_size_hint(hint)?;
    let f = FileStorage::create(path)
        .map_err(|e| Error::io(format!("Could not create '{name}'"), e))?;
    apply_extent_size_hint(f.file(), hint_bytes, hint.is_some())?;
    let werr = |e| Error::io(format!("Could not write to '{name}'"), e);
    f.set_len(size).map_err(werr)?;
    match prealloc {
        Preallocation::Falloc if size > 0 => f.allocate(0, size),
        Preallocation::Full => write_zeros(&f, 0, size),
        _ if size > 0 => f.write_at(&[0u8; 4096][..size.min(4096) as usize], 0),
        _ => Ok(()),
    }
    .map_err(werr)
}

/// The extent size hint to give a new file (QEMU's default: 1 MiB).
fn extent_size_hint(given: Option<u64>) -> Result<u32> {
    u32::try_from(given.unwrap_or(1 << 20))
        .map_err(|_| Error::InvalidArgument("Extent size hint is too large".into()))
}

/// Sets a new file's extent size hint. Only a hint that was asked for
/// explicitly must succeed; the default one is best effort, as in QEMU.
fn apply_extent_size_hint(file: &std::fs::File, hint: u32, explicit: bool) -> Result<()> {
    match crate::storage::set_extent_size_hint(file, hint) {
        Err(e) if explicit => Err(Error::io("Failed to set extent size hint".to_string(), e)),
        _ => Ok(()),
    }
}

/// Lays the image out on any storage (the file must be empty). A data file
/// named in `o` is created on the host.
pub fn create_on(file: Arc<dyn Storage>, path: &Path, o: &CreateOptions) -> Result<()> {
    create_with_data(file, None, path, o)
}

/// [`create_on`] with the external data file on any storage: `data` is
/// used for the data file `o` names (and created by name when None).
pub fn create_with_data(
    file: Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
    path: &Path,
    o: &CreateOptions,
) -> Result<()> {
    o.validate()?;
    let data = match (&o.data_file, data) {
        (None, _) => None,
        (Some(n), Some(d)) => {
            d.set_len(o.size.div_ceil(512) * 512)
                .map_err(|e| Error::io(format!("Could not resize '{n}'"), e))?;
            Some(d)
        }
        (Some(n), None) => Some(create_data_file(n, o.size.div_ceil(512) * 512)?),
    };
    // qemu-img rounds the virtual size up to whole 512-byte sectors.
    let mut o = o.clone();
    o.size = o.size.div_ceil(512) * 512;
    let o = &o;
    let cs = o.cluster_size;
    let cb = cs.trailing_zeros();
    let io = |e| Error::io(format!("{}: write", path.display()), e);
    let mut h = Header {
        version: o.version,
        cluster_bits: cb,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        refcount_order: o.refcount_bits.trailing_zeros(),
        header_length: if o.version >= 3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        } as u32,
        compression_type: o.compression_type,
        ..Default::default()
    };
    if o.compression_type != 0 {
        h.incompatible_features |= INCOMPAT_COMPRESSION;
    }
    if o.extended_l2 {
        h.incompatible_features |= INCOMPAT_EXTL2;
    }
    if o.lazy_refcounts {
        h.compatible_features |= COMPAT_LAZY_REFCOUNTS;
    }
    if data.is_some() {
        h.incompatible_features |= INCOMPAT_DATA_FILE;
        if o.data_file_raw {
            h.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW;
        }
    }
    // Cluster 0: the bare header; clusters 1-2: refcount table and block.
    let mut first = vec![0u8; cs as usize];
    let full = h.encode()?;
    let bare = if o.version >= 3 {
        V3_HEADER_LEN
    } else {
        V2_HEADER_LEN
    };
    first[..bare].copy_from_slice(&full[..bare]);
    file.write_at(&first, 0).map_err(io)?;
    let mut rt = vec![0u8; 2 * cs as usize];
    put64(&mut rt, 0, 2 * cs);
    file.write_at(&rt, cs).map_err(io)?;

    let opts = OpenOptions {
        writable: true,
        no_backing: true,
        check_mode: true,
        data_file: data.map(|storage| DataFileSource::Storage {
            storage,
            name: o.data_file.clone().unwrap_or_default(),
        }),
        ..Default::default()
    };
    let img = Qcow2::open_storage(file.clone(), path, &opts)?;
    {
        let mut m = img.lock();
        m.header.data_file = o.data_file.clone();
        m.alloc_clusters(3)?;
        m.flush_all()?;
        m.write_header()?;
    }
    img.resize(o.size)?;
    // A raw data file maps every cluster: metadata preallocation at least.
    let prealloc = match o.preallocation {
        Preallocation::Off if o.data_file_raw => Preallocation::Metadata,
        p => p,
    };
    if prealloc != Preallocation::Off {
        img.preallocate(prealloc)?;
    }
    if let Some(b) = &o.backing_file {
        let mut m = img.lock();
        m.header.backing_file = Some(b.clone());
        m.header.backing_format = o.backing_fmt.clone();
        m.write_header()?;
    }
    if let Some(e) = &o.encrypt {
        img.set_up_encryption(e)?;
    }
    img.close()
}

impl Qcow2 {
    /// Grows the image to `new_size` with the new area preallocated as
    /// `qemu-img resize --preallocation=MODE` does (QEMU's truncate): the
    /// L1 table first, then the clusters from the one holding the old end.
    /// With an external data file the new clusters map to themselves there.
    /// Refused on encrypted images: preallocated clusters would have to be
    /// written all over with encrypted zeros to read as zeros (QEMU maps
    /// them and the grown area reads as garbage).
    pub fn resize_preallocated(&self, new_size: u64, mode: Preallocation) -> Result<()> {
        let old = self.size();
        if mode == Preallocation::Off || new_size <= old {
            return self.resize(new_size);
        }
        if self.encryption().is_some() {
            return Err(Error::Unsupported(format!(
                "{}: preallocating a grown area is not supported with encryption",
                self.name
            )));
        }
        // The guest bytes of the old last cluster before the old end: a
        // falloc or full area maps that cluster afresh and copies them
        // (metadata preallocation keeps the cluster and needs none), and a
        // data file gets them where the cluster, if unmapped, now maps.
        let head_start = old / self.cs * self.cs;
        let mut head = Vec::new();
        if mode != Preallocation::Metadata || self.data.is_some() {
            head.resize((old - head_start) as usize, 0);
            self.read_mapped(&mut head, head_start)?;
        }
        // Falloc and full map the new area to clusters that read as zeros.
        // Metadata preallocation over a backing file zeroes all of it first,
        // as QEMU does (the zero flags or subcluster bits stay when the
        // mapping below gives the clusters their host clusters), and so
        // does every mode with a data file.
        self.resize_zeroing(new_size, false)?;
        if (mode == Preallocation::Metadata || self.data.is_some()) && self.backing.is_some() {
            self.write_zeroes(old, new_size - old, false)?;
        }
        self.preallocate_from(mode, old, &head)
    }

    /// Allocates every cluster of a freshly created image (QEMU's
    /// preallocation modes: L2 tables and data clusters; falloc and full
    /// also reserve or zero the data area of the file).
    fn preallocate(&self, mode: Preallocation) -> Result<()> {
        self.preallocate_from(mode, 0, &[])
    }

    /// Preallocates the clusters from the one holding guest byte `old` to
    /// the end; `head` holds the guest bytes of that cluster before `old`.
    fn preallocate_from(&self, mode: Preallocation, old: u64, head: &[u8]) -> Result<()> {
        let mut m = self.quiesce();
        let cs = self.cs;
        let size = m.header.size;
        let first = old / cs;
        let ext = m.ext_l2;
        let n_data = size.div_ceil(cs).saturating_sub(first);
        if n_data == 0 {
            return Ok(());
        }
        let l2_entries = m.l2_entries();
        let io = |e| Error::io(format!("{}: preallocate", self.name), e);
        if let Some(d) = &self.data {
            // Data clusters map to themselves; falloc and full reserve or
            // zero the data file past the old end.
            match mode {
                Preallocation::Falloc => d.storage.allocate(old, size - old).map_err(io)?,
                Preallocation::Full => write_zeros(d.storage.as_ref(), old, size).map_err(io)?,
                _ => {}
            }
            // As QEMU: the data file then ends at a whole cluster.
            let end = (first + n_data) * cs;
            if end > size {
                let zeros = vec![0u8; (end - size) as usize];
                d.storage.write_at(&zeros, size).map_err(io)?;
            }
            // An unmapped cluster holding the old end is about to read the
            // data file: it gets the guest bytes first (rule 1: data
            // before the L2 entry; the flush below syncs the data file
            // before it writes the table).
            let raw = m.l2_entry(first)?;
            if !head.is_empty() && m.decode(raw) == L2Entry::Unallocated {
                d.storage.write_at(head, first * cs).map_err(io)?;
            }
            m.data_sync_needed = true;
            self.map_data_clusters(&mut m, first, first + n_data)?;
            return m.flush();
        }
        match mode {
            Preallocation::Metadata => {
                let last = first + n_data;
                let mut gc = first;
                let mut end = 0;
                while gc < last {
                    let l2 = m.l2_for_write(gc)?;
                    // A cluster with a host cluster already (the old last
                    // one) keeps it, as in QEMU.
                    let raw = m.l2_entry(gc)?;
                    if m.decode(raw).host_range().is_some() {
                        gc += 1;
                        continue;
                    }
                    let n = (l2_entries - (gc % l2_entries)).min(last - gc);
                    let host = m.alloc_clusters(n)?;
                    for i in 0..n {
                        // A zero flag or subcluster bits a grown area got
                        // over a backing file stay: the cluster keeps
                        // reading as zeros, now preallocated.
                        let (raw, bitmap) = m.l2_pair(gc + i)?;
                        let keep = if ext { 0 } else { raw & entries::ZERO };
                        m.set_l2_entry(l2, gc + i, (host + i * cs) | COPIED | keep, bitmap);
                    }
                    end = host + n * cs;
                    if gc + n == last {
                        // With extended entries the file ends with the
                        // subcluster holding the guest's last byte, as
                        // QEMU's preallocation leaves it (a whole cluster
                        // otherwise).
                        let unit = if ext {
                            cs / subcluster::SUBCLUSTERS as u64
                        } else {
                            cs
                        };
                        let tail = (size - (last - 1) * cs).div_ceil(unit) * unit;
                        end = host + (n - 1) * cs + tail.min(cs);
                    }
                    gc += n;
                }
                // Rule 1 of meta.rs: the file covers the new clusters
                // before an L2 entry points at them (the flush syncs the
                // new length before it writes the tables).
                if end > m.file_len()? {
                    self.file.set_len(end).map_err(io)?;
                }
                m.flush()?;
                // As QEMU clears the part of the last cluster past a new end
                // that is not cluster aligned: zeros written there (the host
                // file then holds data, not a hole, where `map` looks).
                let tail = size % cs;
                if !ext && tail != 0 {
                    let raw = m.l2_entry(size / cs)?;
                    if let Some((host, _)) = m.decode(raw).host_range() {
                        write_zeros(self.file.as_ref(), host + tail, host + cs).map_err(io)?;
                    }
                }
            }
            Preallocation::Falloc | Preallocation::Full => {
                let n_l2 = n_data.div_ceil(l2_entries);
                let last_used = m.last_used_cluster()?;
                let start = m.refcount_area(last_used + 1, n_data + n_l2, true, None)?;
                m.alloc_clusters_at(start * cs, n_data)?;
                let data_start = start * cs;
                let new_len = data_start + n_data * cs;
                let old_len = m.file_len()?;
                if mode == Preallocation::Falloc {
                    self.file.set_len(new_len).map_err(io)?;
                    self.file
                        .allocate(old_len.min(new_len), new_len - old_len.min(new_len))
                        .map_err(io)?;
                } else {
                    write_zeros(self.file.as_ref(), old_len, new_len).map_err(io)?;
                }
                // Extended entries: over a backing file every subcluster
                // reads its new cluster (zeros, or the head copied there);
                // without one the head cluster keeps its bitmap and the new
                // ones have none, as QEMU leaves them.
                let backed = self.backing.is_some();
                if !head.is_empty() {
                    // Rule 1: the old cluster's bytes reach the new one
                    // before the L2 entry that points there (the flush
                    // below syncs data before metadata).
                    self.file.write_at(head, data_start).map_err(io)?;
                }
                for i in 0..n_data {
                    let gc = first + i;
                    let l2 = m.l2_for_write(gc)?;
                    let (old_entry, old_bitmap) = m.l2_pair(gc)?;
                    let bitmap = match (ext, backed, i) {
                        (false, ..) => 0,
                        (true, true, _) => subcluster::ALL_ALLOC,
                        (true, false, 0) => old_bitmap,
                        (true, false, _) => 0,
                    };
                    m.set_l2_entry(l2, gc, (data_start + i * cs) | COPIED, bitmap);
                    m.unref_entry(old_entry, false)?;
                }
                m.flush()?;
            }
            Preallocation::Off => {}
        }
        self.file_end
            .fetch_max(m.file_len()?, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }
}

/// Writes zeros over `from..to` of `file`, 1 MiB at a time.
fn write_zeros(file: &dyn Storage, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; (1 << 20).min(to.saturating_sub(from)) as usize];
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(zeros.len() as u64);
        file.write_at(&zeros[..n as usize], pos)?;
        pos += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_options_parse_like_qemu_img() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999E").is_err());
        let mut o = CreateOptions::default();
        o.parse_into("compat=0.10,cluster_size=4k,backing_file=a,,b")
            .unwrap();
        assert_eq!(o.version, 2);
        assert_eq!(o.cluster_size, 4096);
        assert_eq!(o.backing_file.as_deref(), Some("a,b"));
        o.lazy_refcounts = true;
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("Lazy refcounts only"));
        let mut o = CreateOptions::default();
        assert!(o.parse_into("cluster_size=3000").is_ok());
        assert_eq!(
            o.validate().unwrap_err().to_string(),
            "Cluster size must be a power of two between 512 and 2048k"
        );
        assert!(CreateOptions::default().parse_into("bogus=1").is_err());
    }
}
