//! External data files (incompatible feature bit 2, header extension
//! "DATA" with the file name): the guest data lives in a second file at
//! host offset == guest offset, and the qcow2 file keeps only metadata.
//!
//! L2 entries still say which clusters are allocated; since 0 is a valid
//! host offset there, an entry with offset 0 and the COPIED flag maps guest
//! cluster 0 (QEMU's rule: data clusters always have refcount 1, so COPIED
//! tells them from unallocated ones). Data clusters have no refcounts:
//! allocating one is only an L2 change, and freeing one (discard, zero
//! writes with unmap) punches a hole in the data file at once rather than
//! after the next flush, because the same guest cluster may be written
//! again before then. There are no compressed clusters and no internal
//! snapshots. With the autoclear bit "raw external data" the data file
//! must stay a valid raw image of the disk: every cluster is mapped, and
//! zero writes zero the data file too.
//!
//! Crash safety: rule 1 of `meta.rs` covers the data file — it is synced
//! before an L2 table that maps new data is written, and on every flush.
//!
//! Names: the header's name is used as it is, a relative name relative to
//! the current directory, as QEMU does (unlike backing file names, which
//! are relative to the image). The file is opened with the image's access
//! mode; `OpenOptions::data_file` replaces it (QEMU's `data-file` option).

use super::meta::Meta;
use super::{OpenOptions, Qcow2};
use crate::error::{Error, Result};
use crate::format::entries::{L2Entry, COPIED, ZERO};
use crate::format::header::Header;
use crate::format::*;
use crate::storage::{AbsentStorage, FileStorage, Storage};
use std::path::PathBuf;
use std::sync::Arc;

/// Where to find the data file instead of the name in the header.
#[derive(Clone)]
pub enum DataFileSource {
    /// This file.
    Path(PathBuf),
    /// Any storage (a QEMU block node given inline, e.g. `null-co`); `name`
    /// names it in messages and reports.
    Storage {
        storage: Arc<dyn Storage>,
        name: String,
    },
}

impl std::fmt::Debug for DataFileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataFileSource::Path(p) => f.debug_tuple("Path").field(p).finish(),
            DataFileSource::Storage { name, .. } => {
                f.debug_struct("Storage").field("name", name).finish()
            }
        }
    }
}

/// The open data file of an image.
#[derive(Clone)]
pub(super) struct DataFile {
    pub storage: Arc<dyn Storage>,
    pub name: String,
    /// Autoclear bit "raw external data".
    pub raw: bool,
}

/// Opens the data file the header (or `opts.data_file`) names, with QEMU's
/// refusals. None for an image without the feature bit.
pub(super) fn open_data_file(header: &Header, opts: &OpenOptions) -> Result<Option<DataFile>> {
    if header.incompatible_features & INCOMPAT_DATA_FILE == 0 {
        if opts.data_file.is_some() {
            return Err(Error::InvalidArgument(
                "'data-file' can only be set for images with an external data file".into(),
            ));
        }
        if header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 {
            return Err(Error::Invalid("data-file-raw requires a data file".into()));
        }
        return Ok(None);
    }
    let raw = header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0;
    if opts.metadata_only && opts.data_file.is_none() {
        return Ok(Some(DataFile {
            storage: Arc::new(AbsentStorage),
            name: header.data_file.clone().unwrap_or_default(),
            raw,
        }));
    }
    let path = match &opts.data_file {
        Some(DataFileSource::Storage { storage, name }) => {
            return Ok(Some(DataFile {
                storage: storage.clone(),
                name: name.clone(),
                raw,
            }))
        }
        Some(DataFileSource::Path(p)) => p.clone(),
        None => match &header.data_file {
            Some(n) if !n.is_empty() => PathBuf::from(n),
            _ => {
                return Err(Error::Invalid(
                    "'data-file' is required for this image".into(),
                ))
            }
        },
    };
    let name = path.display().to_string();
    let f = opts
        .open_file(&path)
        .map_err(|e| Error::io(format!("Could not open '{name}'"), e))?;
    Ok(Some(DataFile {
        storage: Arc::new(f),
        name,
        raw,
    }))
}

/// Creates (or truncates) a data file of `size` bytes for `qemu-img create`
/// (the name is used as given: relative to the current directory).
pub(super) fn create_data_file(name: &str, size: u64) -> Result<Arc<dyn Storage>> {
    let f = FileStorage::create(std::path::Path::new(name))
        .map_err(|e| Error::io(format!("Could not create '{name}'"), e))?;
    f.set_len(size)
        .map_err(|e| Error::io(format!("Could not resize '{name}'"), e))?;
    // Like QEMU's raw files: the first block is written, so that the file
    // has an allocated block to probe alignment with.
    let first = vec![0u8; size.min(4096) as usize];
    f.write_at(&first, 0)
        .map_err(|e| Error::io(format!("Could not write to '{name}'"), e))?;
    Ok(Arc::new(f))
}

impl Meta {
    pub fn has_data_file(&self) -> bool {
        self.data_file.is_some()
    }

    /// Gives back the data cluster an old L2 entry mapped: with `punch`, a
    /// hole in the data file (there is no refcount to drop).
    pub(super) fn release_data_cluster(&mut self, raw: u64, punch: bool) -> Result<()> {
        let host = match self.decode(raw) {
            L2Entry::Normal { host, .. } => host,
            L2Entry::Zero { host, .. } if host != 0 => host,
            _ => return Ok(()),
        };
        match &self.data_file {
            Some(d) if punch => d
                .punch_hole(host, self.cs)
                .map_err(|e| self.io("discard in the data file", e)),
            _ => Ok(()),
        }
    }

    /// Syncs the data file (rule 1 of the module comment of `meta.rs`).
    pub(super) fn sync_data(&self) -> Result<()> {
        match &self.data_file {
            Some(d) => d.sync().map_err(|e| self.io("sync the data file", e)),
            None => Ok(()),
        }
    }
}

impl Qcow2 {
    /// The data file's name, for an image with an external data file.
    pub fn data_file_name(&self) -> Option<&str> {
        self.data.as_ref().map(|d| d.name.as_str())
    }

    /// Whether the data file is kept a valid raw image ("raw external data").
    pub fn data_file_raw(&self) -> bool {
        self.data.as_ref().is_some_and(|d| d.raw)
    }

    /// Where guest data is read and written: the data file, or the image.
    pub(super) fn data_storage(&self) -> &Arc<dyn Storage> {
        match &self.data {
            Some(d) => &d.storage,
            None => &self.file,
        }
    }

    /// QEMU's refusals for a mapping in a data-file image: a compressed
    /// entry, or a host offset other than the guest offset. Marks the image
    /// corrupt, with QEMU's messages.
    pub(super) fn check_data_entry(&self, m: &mut Meta, gc: u64, e: L2Entry) -> Result<()> {
        let l2_index = gc & (m.l2_entries() - 1);
        match e {
            L2Entry::Compressed { .. } => {
                let l2_off = m.l1[(gc >> m.l2_bits) as usize] & OFFSET_MASK;
                Err(m.signal_corruption(&format!(
                    "Compressed cluster entry found in image with external data file (L2 offset: {l2_off:#x}, L2 index: {l2_index:#x})"
                )))
            }
            L2Entry::Normal { host, .. } | L2Entry::Zero { host, .. }
                if host != gc << self.cb && !(host == 0 && matches!(e, L2Entry::Zero { .. })) =>
            {
                Err(m.signal_corruption(&format!(
                    "External data file host cluster offset {host:#x} does not match guest cluster offset: {:#x}, L2 index: {l2_index:#x})",
                    gc << self.cb
                )))
            }
            _ => Ok(()),
        }
    }

    /// Maps guest clusters [first, end) to themselves in the data file
    /// (preallocation, and the raw data file's invariant after growing).
    /// A zero cluster without a host cluster (a grown area over a backing
    /// file) keeps its zero flag or bits and gets its host cluster, as
    /// QEMU's preallocation leaves it.
    pub(super) fn map_data_clusters(&self, m: &mut Meta, first: u64, end: u64) -> Result<()> {
        for gc in first..end {
            let (raw, bitmap) = m.l2_pair(gc)?;
            let keep = match m.decode(raw) {
                L2Entry::Unallocated => 0,
                L2Entry::Zero { host: 0, .. } => raw & ZERO,
                _ => continue,
            };
            let l2 = m.l2_for_write(gc)?;
            m.set_l2_entry(l2, gc, (gc << self.cb) | COPIED | keep, bitmap);
        }
        Ok(())
    }

    /// Zeroes guest bytes [off, off+len) in a raw data file, which must
    /// read as the disk does (zero writes; `unmap` may deallocate).
    pub(super) fn zero_raw_data(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        let Some(d) = self.data.as_ref().filter(|d| d.raw) else {
            return Ok(());
        };
        let io = |e| Error::io(format!("{}: zero the data file", d.name), e);
        d.storage.punch_hole(off, len).map_err(io)?;
        if !unmap {
            d.storage.allocate(off, len).map_err(io)?;
        }
        Ok(())
    }
}
