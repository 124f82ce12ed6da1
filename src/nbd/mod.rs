//! A small NBD client: an export served by qemu-nbd, nbdkit or any other
//! NBD server, opened by a QEMU-style name (`nbd:unix:SOCKET`,
//! `nbd+unix:///EXPORT?socket=SOCKET`, `nbd://HOST:PORT/EXPORT`) or by the
//! nbd block driver's options, read and written as a raw disk
//! ([`crate::Image::Nbd`]) or used as the host file of a qcow2 image
//! ([`NbdStorage`]).
//!
//! [`target`] parses names and options, [`handshake`] negotiates the
//! export (fixed newstyle, `NBD_OPT_GO`, structured replies,
//! `base:allocation`), [`client`] sends the requests; [`proto`] holds the
//! protocol's numbers. Nothing here knows about qcow2.

pub mod client;
pub mod handshake;
pub mod proto;
mod sock;
pub mod target;

pub use client::NbdClient;
pub use handshake::ExportInfo;
pub use target::{is_nbd_name, NbdAddr, NbdTarget};

use crate::storage::Storage;
use std::io;
use std::sync::Arc;

/// An export as the host file of an image format (qcow2 over NBD). Reads
/// past the end of the export return zeros, as [`Storage`] promises;
/// an export cannot grow, so writes past its end fail with ENOSPC and a
/// length change with ENOTSUP.
pub struct NbdStorage(pub Arc<NbdClient>);

impl Storage for NbdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.0.size();
        let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[n..].fill(0);
        if n > 0 {
            self.0.read_at(&mut buf[..n], offset)?;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.0.size() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.0.write_at(buf, offset, false)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.size())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.0.size() {
            return Ok(());
        }
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = len.min(self.0.size().saturating_sub(offset));
        self.0.write_zeroes(offset, len, true, false)
    }
    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}
