//! A window onto another storage: QEMU's `raw` format node with `offset`
//! and `size` options, as `json:` backing file names use it to make a
//! file look like a smaller block device.
//!
//! Byte 0 of the window is byte `offset` of the inner storage. With a
//! size, the window never grows: a write or length change past it fails
//! with ENOSPC, as a full block device does, and reads past it see zeros
//! (the `Storage` contract for reads past the end).

use super::{DebugEvent, Storage};
use std::io;
use std::sync::Arc;

pub struct WindowStorage {
    inner: Arc<dyn Storage>,
    offset: u64,
    size: Option<u64>,
}

impl WindowStorage {
    pub fn new(inner: Arc<dyn Storage>, offset: u64, size: Option<u64>) -> WindowStorage {
        WindowStorage {
            inner,
            offset,
            size,
        }
    }

    fn no_space() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOSPC)
    }

    /// The inner offset of window byte `off`, or None if it overflows.
    fn at(&self, off: u64) -> io::Result<u64> {
        self.offset
            .checked_add(off)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }

    /// Checks that [off, off+len) lies inside a fixed-size window.
    fn fits(&self, off: u64, len: u64) -> io::Result<()> {
        match self.size {
            Some(s) if off.checked_add(len).is_none_or(|e| e > s) => Err(Self::no_space()),
            _ => Ok(()),
        }
    }
}

impl Storage for WindowStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = self.size.unwrap_or(u64::MAX);
        let n = if offset >= end {
            0
        } else {
            (end - offset).min(buf.len() as u64) as usize
        };
        if n > 0 {
            self.inner.read_at(&mut buf[..n], self.at(offset)?)?;
        }
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.fits(offset, buf.len() as u64)?;
        self.inner.write_at(buf, self.at(offset)?)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> io::Result<u64> {
        match self.size {
            Some(s) => Ok(s),
            None => Ok(self.inner.len()?.saturating_sub(self.offset)),
        }
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        match self.size {
            Some(s) if len > s => Err(Self::no_space()),
            // A fixed window keeps its size; the bytes past `len` stay.
            Some(_) => Ok(()),
            None => self.inner.set_len(self.at(len)?),
        }
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fits(offset, len)?;
        self.inner.punch_hole(self.at(offset)?, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fits(offset, len)?;
        self.inner.allocate(self.at(offset)?, len)
    }
    fn debug_event(&self, ev: DebugEvent) {
        self.inner.debug_event(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn inner() -> Arc<dyn Storage> {
        let m = MemStorage::new();
        m.write_at(&(0..=255u8).collect::<Vec<_>>(), 0).unwrap();
        Arc::new(m)
    }

    #[test]
    fn offset_and_size_shift_and_bound_requests() {
        let w = WindowStorage::new(inner(), 16, Some(32));
        assert_eq!(w.len().unwrap(), 32);
        let mut b = [0u8; 40];
        w.read_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 16);
        assert_eq!(b[31], 47);
        assert!(
            b[32..].iter().all(|&x| x == 0),
            "past the window reads zeros"
        );
        w.write_at(&[9; 4], 28).unwrap();
        let e = w.write_at(&[9; 5], 28).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(
            w.set_len(33).unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        w.read_at(&mut b[..4], 28).unwrap();
        assert_eq!(&b[..4], &[9; 4]);
    }

    #[test]
    fn without_size_the_window_follows_the_inner_length() {
        let w = WindowStorage::new(inner(), 200, None);
        assert_eq!(w.len().unwrap(), 56);
        w.write_at(&[1; 8], 60).unwrap();
        assert_eq!(w.len().unwrap(), 68);
        let w2 = WindowStorage::new(inner(), u64::MAX, None);
        assert!(w2.write_at(&[1], 1).is_err());
    }
}
