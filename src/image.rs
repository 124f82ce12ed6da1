//! The safe Rust API: an [`Image`] is an open qcow2 or raw image with one
//! set of operations, whatever its format.

use crate::engine::{probe, BlockStatus, Layer, OpenOptions, Qcow2};
use crate::error::{Error, Result};
use crate::storage::{FileStorage, Storage};
use std::path::Path;
use std::sync::Arc;

/// An open image of either format.
pub enum Image {
    Qcow2(Box<Qcow2>),
    Raw(RawImage),
}

/// A raw image: guest bytes are file bytes.
pub struct RawImage {
    file: Arc<dyn Storage>,
    name: String,
    writable: bool,
}

impl Image {
    /// Opens `path`; `format` None probes it.
    pub fn open(path: &Path, format: Option<&str>, opts: &OpenOptions) -> Result<Image> {
        let fmt = match format {
            Some(f) => f,
            None => probe(path)?,
        };
        match fmt {
            "qcow2" => Ok(Image::Qcow2(Box::new(Qcow2::open(path, opts)?))),
            "raw" => {
                let name = path.display().to_string();
                let f = FileStorage::open(path, opts.writable, opts.direct)
                    .map_err(|e| Error::io(format!("Could not open '{name}'"), e))?;
                Ok(Image::Raw(RawImage {
                    file: Arc::new(f),
                    name,
                    writable: opts.writable,
                }))
            }
            other => Err(Error::InvalidArgument(format!(
                "Unknown file format '{other}'"
            ))),
        }
    }

    /// Opens an image of `format` ("qcow2" or "raw") on an already open
    /// storage (a blkdebug node, say); `name` names it in messages and
    /// anchors relative backing file names.
    pub fn open_on(
        file: Arc<dyn Storage>,
        name: &str,
        format: &str,
        opts: &OpenOptions,
    ) -> Result<Image> {
        match format {
            "qcow2" => Qcow2::open_storage(file, Path::new(name), opts)
                .map(|q| Image::Qcow2(Box::new(q)))
                .map_err(|e| e.context(&format!("Could not open '{name}'"))),
            "raw" => Ok(Image::Raw(RawImage {
                file,
                name: name.to_string(),
                writable: opts.writable,
            })),
            other => Err(Error::InvalidArgument(format!(
                "Unknown file format '{other}'"
            ))),
        }
    }

    pub fn format(&self) -> &'static str {
        match self {
            Image::Qcow2(_) => "qcow2",
            Image::Raw(_) => "raw",
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Image::Qcow2(q) => q.size(),
            Image::Raw(r) => r.file.len().unwrap_or(0),
        }
    }

    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.read_at(buf, off),
            Image::Raw(r) => r.file.read_at(buf, off).map_err(|e| r.io("read", e)),
        }
    }

    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.write_at(buf, off),
            Image::Raw(r) => {
                r.check_writable()?;
                r.file.write_at(buf, off).map_err(|e| r.io("write", e))
            }
        }
    }

    pub fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.write_zeroes(off, len, unmap),
            Image::Raw(r) => {
                r.check_writable()?;
                r.file
                    .punch_hole(off, len)
                    .map_err(|e| r.io("write zeroes", e))
            }
        }
    }

    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.discard(off, len),
            Image::Raw(r) => {
                r.check_writable()?;
                r.file.punch_hole(off, len).map_err(|e| r.io("discard", e))
            }
        }
    }

    pub fn flush(&self) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.flush(),
            Image::Raw(r) => r.file.sync().map_err(|e| r.io("flush", e)),
        }
    }

    pub fn resize(&self, size: u64) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.resize(size),
            Image::Raw(r) => {
                r.check_writable()?;
                r.file.set_len(size).map_err(|e| r.io("truncate", e))
            }
        }
    }

    pub fn block_status(&self, off: u64, len: u64) -> Result<(BlockStatus, u64)> {
        match self {
            Image::Qcow2(q) => q.block_status(off, len),
            Image::Raw(_) => Ok((
                BlockStatus::Data {
                    host: Some(off),
                    depth: 0,
                },
                len,
            )),
        }
    }

    pub fn close(&self) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.close(),
            Image::Raw(r) if r.writable => r.file.sync().map_err(|e| r.io("flush", e)),
            Image::Raw(_) => Ok(()),
        }
    }

    pub fn qcow2(&self) -> Option<&Qcow2> {
        match self {
            Image::Qcow2(q) => Some(q),
            Image::Raw(_) => None,
        }
    }

    /// Bytes the image file takes on the host.
    pub fn allocated_file_size(&self) -> u64 {
        match self {
            Image::Qcow2(q) => q.storage().allocated_size().unwrap_or(0),
            Image::Raw(r) => r.file.allocated_size().unwrap_or(0),
        }
    }

    /// The layer below this one, if any.
    pub fn backing(&self) -> Option<&dyn Layer> {
        self.qcow2().and_then(|q| q.backing_layer())
    }
}

impl RawImage {
    fn io(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("{}: {what}", self.name), e)
    }
    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly(format!(
                "{}: image is opened read-only",
                self.name
            )))
        }
    }
}
