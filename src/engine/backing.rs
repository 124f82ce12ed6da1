//! Backing files: the layers under an image, qcow2 or raw.
//!
//! A file name found inside an image header is untrusted: it is resolved
//! the way QEMU resolves it (relative to the overlay's directory), opened
//! read-only, and the chain is cut at a fixed depth so a loop of images
//! cannot recurse forever.

use super::{BlockStatus, OpenOptions, Qcow2};
use crate::error::{Error, Result};
use crate::format::QCOW_MAGIC;
use crate::storage::{FileStorage, Storage};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Deepest backing chain we follow.
pub const MAX_CHAIN_DEPTH: u32 = 64;

/// One layer of a backing chain, read-only from the overlay's point of view.
pub trait Layer: Send + Sync {
    fn size(&self) -> u64;
    /// Reads guest bytes; the caller keeps the range inside `size()`.
    fn read(&self, buf: &mut [u8], off: u64) -> Result<()>;
    /// Allocation state at `off`, and for how many bytes it holds.
    fn status(&self, off: u64, len: u64) -> Result<(BlockStatus, u64)>;
    fn format(&self) -> &'static str;
    fn filename(&self) -> &str;
    fn backing(&self) -> Option<&dyn Layer> {
        None
    }
    /// The external data file holding the layer's data clusters, if any.
    fn data_file(&self) -> Option<&str> {
        None
    }
}

/// A raw image used as a backing file.
pub struct RawLayer {
    file: Arc<dyn Storage>,
    size: u64,
    name: String,
}

impl RawLayer {
    /// A raw layer over an already open storage (a blkdebug node, say).
    pub fn on(file: Arc<dyn Storage>, name: String) -> Result<RawLayer> {
        let size = file.len().map_err(|e| Error::io(name.clone(), e))?;
        Ok(RawLayer { file, size, name })
    }

    pub fn open(path: &Path) -> Result<RawLayer> {
        let name = path.display().to_string();
        let f = FileStorage::open(path, false, false)
            .map_err(|e| Error::io(format!("Could not open '{name}'"), e))?;
        let size = f.len().map_err(|e| Error::io(name.clone(), e))?;
        Ok(RawLayer {
            file: Arc::new(f),
            size,
            name,
        })
    }
}

impl Layer for RawLayer {
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.file
            .read_at(buf, off)
            .map_err(|e| Error::io(format!("{}: read", self.name), e))
    }
    fn status(&self, off: u64, len: u64) -> Result<(BlockStatus, u64)> {
        Ok((
            BlockStatus::Data {
                host: Some(off),
                depth: 0,
            },
            len,
        ))
    }
    fn format(&self) -> &'static str {
        "raw"
    }
    fn filename(&self) -> &str {
        &self.name
    }
}

/// Resolves a backing file name the way QEMU does: absolute names and
/// protocol-style names are used as they are; a relative name is taken
/// relative to the directory of the overlay.
pub fn resolve(overlay: &Path, backing: &str) -> PathBuf {
    let p = Path::new(backing);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match overlay.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// Guesses a format from the first bytes of a file.
pub fn probe(path: &Path) -> Result<&'static str> {
    let f = FileStorage::open(path, false, false)
        .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
    let mut b = [0u8; 8];
    f.read_at(&mut b, 0)
        .map_err(|e| Error::io(path.display().to_string(), e))?;
    let magic = u32::from_be_bytes(b[..4].try_into().unwrap());
    let version = u32::from_be_bytes(b[4..].try_into().unwrap());
    Ok(if magic == QCOW_MAGIC && version >= 2 {
        "qcow2"
    } else {
        "raw"
    })
}

/// Opens the backing file of an overlay.
pub fn open_backing(
    overlay: &Path,
    name: &str,
    fmt: Option<&str>,
    depth: u32,
    opts: &OpenOptions,
) -> Result<Box<dyn Layer>> {
    if depth >= MAX_CHAIN_DEPTH {
        return Err(Error::Invalid(format!(
            "Backing chain of '{}' is deeper than {MAX_CHAIN_DEPTH} images",
            overlay.display()
        )));
    }
    if let Some(json) = name.strip_prefix("json:") {
        return crate::blockdev::open_json_layer(json, fmt, depth, opts);
    }
    let path = resolve(overlay, name);
    let fmt = match fmt {
        Some(f) => f.to_string(),
        None => probe(&path)?.to_string(),
    };
    match fmt.as_str() {
        "qcow2" => {
            let base = match &opts.backing {
                Some(b) => (**b).clone(),
                None => OpenOptions {
                    key_secret: None,
                    encrypt_format: None,
                    backing_format: None,
                    data_file: None,
                    ..opts.clone()
                },
            };
            let o = OpenOptions {
                writable: false,
                chain_depth: depth + 1,
                metadata_only: opts.metadata_only,
                ..base
            };
            Ok(Box::new(Qcow2::open(&path, &o)?))
        }
        "raw" | "file" | "host_device" => Ok(Box::new(RawLayer::open(&path)?)),
        other => Err(Error::Unsupported(format!(
            "Could not open backing file '{}': Unknown driver '{other}'",
            path.display()
        ))),
    }
}
