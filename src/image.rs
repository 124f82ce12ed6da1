//! The safe Rust API: an [`Image`] is an open qcow2 or raw image with one
//! set of operations, whatever its format. A raw image may also be an NBD
//! export (`Image::Nbd`), and a qcow2 image may live on one: names such as
//! `nbd:unix:SOCKET` or `nbd+unix:///EXPORT?socket=SOCKET` are opened over
//! the network, as QEMU opens them.

use crate::engine::{probe, BlockStatus, Layer, OpenOptions, Qcow2};
use crate::error::{Error, Result};
use crate::nbd::{is_nbd_name, NbdClient, NbdStorage, NbdTarget};
use crate::storage::Storage;
use std::path::Path;
use std::sync::Arc;

/// An open image of either format.
pub enum Image {
    Qcow2(Box<Qcow2>),
    Raw(RawImage),
    /// A raw disk served over NBD.
    Nbd(NbdImage),
}

/// An NBD export read and written as a raw disk.
pub struct NbdImage {
    client: Arc<NbdClient>,
    writable: bool,
}

/// A raw image: guest bytes are file bytes.
pub struct RawImage {
    file: Arc<dyn Storage>,
    name: String,
    writable: bool,
    /// cache=writethrough/directsync: every write is synced before it
    /// completes.
    writethrough: bool,
}

impl Image {
    /// Opens `path`; `format` None probes it. An NBD name (see
    /// [`crate::nbd::NbdTarget::parse`]) connects to its server.
    pub fn open(path: &Path, format: Option<&str>, opts: &OpenOptions) -> Result<Image> {
        if let Some(name) = path.to_str().filter(|n| is_nbd_name(n)) {
            return Image::open_nbd(&NbdTarget::parse(name)?, format, opts);
        }
        let fmt = match format {
            Some(f) => f,
            None => probe(path)?,
        };
        match fmt {
            "qcow2" => Ok(Image::Qcow2(Box::new(Qcow2::open(path, opts)?))),
            "raw" => {
                let name = path.display().to_string();
                let f = opts
                    .open_file(path)
                    .map_err(|e| Error::io(format!("Could not open '{name}'"), e))?;
                Ok(Image::Raw(RawImage {
                    file: Arc::new(f),
                    name,
                    writable: opts.writable,
                    writethrough: opts.writethrough,
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
                writethrough: opts.writethrough,
            })),
            other => Err(Error::InvalidArgument(format!(
                "Unknown file format '{other}'"
            ))),
        }
    }

    /// Opens an NBD export as a raw disk, or as the host file of a qcow2
    /// image (`format` "qcow2", or None and the export starts with the
    /// qcow2 magic).
    pub fn open_nbd(target: &NbdTarget, format: Option<&str>, opts: &OpenOptions) -> Result<Image> {
        let client = Arc::new(NbdClient::connect(target)?);
        let name = client.name().to_string();
        if opts.writable && client.read_only() {
            return Err(Error::ReadOnly(format!(
                "{name}: the NBD export is read-only"
            )));
        }
        let fmt = match format {
            Some(f) => f,
            None => {
                let mut b = [0u8; 8];
                if client.size() >= 8 {
                    client
                        .read_at(&mut b, 0)
                        .map_err(|e| Error::io(format!("{name}: read"), e))?;
                }
                let magic = u32::from_be_bytes(b[..4].try_into().unwrap());
                let version = u32::from_be_bytes(b[4..].try_into().unwrap());
                if magic == crate::format::QCOW_MAGIC && version >= 2 {
                    "qcow2"
                } else {
                    "raw"
                }
            }
        };
        match fmt {
            "raw" => Ok(Image::Nbd(NbdImage {
                client,
                writable: opts.writable,
            })),
            "qcow2" => {
                let storage: Arc<dyn Storage> = Arc::new(NbdStorage(client));
                let q = Qcow2::open_storage(storage, Path::new(&name), opts)?;
                Ok(Image::Qcow2(Box::new(q)))
            }
            other => Err(Error::InvalidArgument(format!(
                "Unknown file format '{other}'"
            ))),
        }
    }

    pub fn format(&self) -> &'static str {
        match self {
            Image::Qcow2(_) => "qcow2",
            Image::Raw(_) | Image::Nbd(_) => "raw",
        }
    }

    /// The NBD connection of a raw image served over NBD.
    pub fn nbd(&self) -> Option<&NbdClient> {
        match self {
            Image::Nbd(n) => Some(&n.client),
            _ => None,
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Image::Qcow2(q) => q.size(),
            Image::Raw(r) => r.file.len().unwrap_or(0),
            Image::Nbd(n) => n.client.size(),
        }
    }

    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.read_at(buf, off),
            Image::Raw(r) => r.file.read_at(buf, off).map_err(|e| r.io("read", e)),
            Image::Nbd(n) => n.client.read_at(buf, off).map_err(|e| n.io("read", e)),
        }
    }

    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.write_at(buf, off),
            Image::Raw(r) => {
                r.check_writable()?;
                r.file.write_at(buf, off).map_err(|e| r.io("write", e))?;
                r.written_through()
            }
            Image::Nbd(n) => {
                n.check_writable()?;
                n.client
                    .write_at(buf, off, false)
                    .map_err(|e| n.io("write", e))
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
                    .map_err(|e| r.io("write zeroes", e))?;
                r.written_through()
            }
            Image::Nbd(n) => {
                n.check_writable()?;
                n.client
                    .write_zeroes(off, len, unmap, false)
                    .map_err(|e| n.io("write zeroes", e))
            }
        }
    }

    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.discard(off, len),
            Image::Raw(r) => {
                r.check_writable()?;
                r.file
                    .punch_hole(off, len)
                    .map_err(|e| r.io("discard", e))?;
                r.written_through()
            }
            Image::Nbd(n) => {
                n.check_writable()?;
                n.client.trim(off, len).map_err(|e| n.io("discard", e))
            }
        }
    }

    pub fn flush(&self) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.flush(),
            Image::Raw(r) => r.file.sync().map_err(|e| r.io("flush", e)),
            Image::Nbd(n) => n.client.flush().map_err(|e| n.io("flush", e)),
        }
    }

    pub fn resize(&self, size: u64) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.resize(size),
            Image::Raw(r) => {
                r.check_writable()?;
                r.file.set_len(size).map_err(|e| r.io("truncate", e))
            }
            Image::Nbd(n) if size == n.client.size() => Ok(()),
            Image::Nbd(n) if size > n.client.size() => {
                Err(Error::Unsupported("Cannot grow NBD nodes".into()))
            }
            Image::Nbd(_) => Err(Error::Unsupported("Cannot shrink NBD nodes".into())),
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
            Image::Nbd(n) => {
                let (flags, n_len) = n
                    .client
                    .block_status(off, len)
                    .map_err(|e| n.io("block status", e))?;
                use crate::nbd::proto::{STATE_HOLE, STATE_ZERO};
                // With x-dirty-bitmap a dirty range is a hole that does not
                // read as zeros (QEMU's hack): unallocated here. Otherwise
                // such a hole is data, as its contents are unknown.
                let dirty = n.client.target().meta_context.is_some()
                    && flags & (STATE_HOLE | STATE_ZERO) == STATE_HOLE;
                let st = if dirty {
                    BlockStatus::Unallocated { depth: 0 }
                } else if flags & STATE_ZERO != 0 {
                    BlockStatus::Zero { depth: 0 }
                } else {
                    BlockStatus::Data {
                        host: Some(off),
                        depth: 0,
                    }
                };
                Ok((st, n_len))
            }
        }
    }

    pub fn close(&self) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.close(),
            Image::Raw(r) if r.writable => r.file.sync().map_err(|e| r.io("flush", e)),
            Image::Raw(_) => Ok(()),
            Image::Nbd(n) => {
                let r = if n.writable {
                    n.client.flush().map_err(|e| n.io("flush", e))
                } else {
                    Ok(())
                };
                n.client.disconnect();
                r
            }
        }
    }

    pub fn qcow2(&self) -> Option<&Qcow2> {
        match self {
            Image::Qcow2(q) => Some(q),
            Image::Raw(_) | Image::Nbd(_) => None,
        }
    }

    /// Bytes the image file takes on the host.
    pub fn allocated_file_size(&self) -> u64 {
        match self {
            Image::Qcow2(q) => q.storage().allocated_size().unwrap_or(0),
            Image::Raw(r) => r.file.allocated_size().unwrap_or(0),
            Image::Nbd(_) => 0,
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
    /// The sync a writethrough open owes after each change.
    fn written_through(&self) -> Result<()> {
        if self.writethrough {
            self.file.sync().map_err(|e| self.io("flush", e))?;
        }
        Ok(())
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

impl Image {
    /// A raw image over any storage, for devices that are not host files
    /// (the tool's stand-in for QEMU's null-co driver). `name` is what
    /// error messages call it.
    pub fn raw_on(file: Arc<dyn Storage>, name: &str, writable: bool) -> Image {
        Image::Raw(RawImage {
            file,
            name: name.to_string(),
            writable,
            writethrough: false,
        })
    }
}

impl NbdImage {
    /// The connection, for requests the generic API does not have (FUA).
    pub fn client(&self) -> &NbdClient {
        &self.client
    }
    fn io(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("{}: {what}", self.client.name()), e)
    }
    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly(format!(
                "{}: image is opened read-only",
                self.client.name()
            )))
        }
    }
}
