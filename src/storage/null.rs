//! Storages with nothing behind them: [`NullStorage`] is QEMU's `null-co`
//! driver (writes vanish, reads leave the buffer alone unless
//! `read-zeroes` is on, a fixed length), used as an
//! external data file by qemu-iotests that need a huge data file without
//! the disk space; [`AbsentStorage`] stands for a data file that was not
//! opened (`qemu-img info` needs only metadata) and fails every access.

use super::Storage;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// Accepts and drops writes; reads zeros with `read_zeroes`, else leaves
/// the caller's buffer as it was (QEMU's null-co: the data is undefined).
pub struct NullStorage {
    len: AtomicU64,
    read_zeroes: bool,
}

impl NullStorage {
    pub fn new(len: u64, read_zeroes: bool) -> NullStorage {
        NullStorage {
            len: AtomicU64::new(len),
            read_zeroes,
        }
    }
}

impl Storage for NullStorage {
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        if self.read_zeroes {
            buf.fill(0);
        }
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.len.load(Ordering::Acquire))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.len.store(len, Ordering::Release);
        Ok(())
    }
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn allocated_size(&self) -> io::Result<u64> {
        Ok(0)
    }
}

/// Every access fails with ENOMEDIUM ("No medium found").
pub struct AbsentStorage;

fn absent<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::ENOMEDIUM))
}

impl Storage for AbsentStorage {
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<()> {
        absent()
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        absent()
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        absent()
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        absent()
    }
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        absent()
    }
    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        absent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_reads_zeros_and_drops_writes() {
        let s = NullStorage::new(4096, true);
        s.write_at(&[7; 512], 0).unwrap();
        let mut b = [1u8; 512];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0; 512]);
        let mut b = [1u8; 512];
        NullStorage::new(4096, false).read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1; 512]);
        assert_eq!(s.len().unwrap(), 4096);
        s.set_len(1 << 40).unwrap();
        assert_eq!(s.len().unwrap(), 1 << 40);
        let a = AbsentStorage;
        assert_eq!(
            a.read_at(&mut b, 0).unwrap_err().raw_os_error(),
            Some(libc::ENOMEDIUM)
        );
    }
}
