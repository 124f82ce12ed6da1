//! [`Storage`] in memory, for tests and fuzzing.

use super::Storage;
use std::io;
use std::sync::RwLock;

#[derive(Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    pub fn new() -> MemStorage {
        MemStorage::default()
    }
    pub fn from_bytes(b: Vec<u8>) -> MemStorage {
        MemStorage {
            data: RwLock::new(b),
        }
    }
    pub fn bytes(&self) -> Vec<u8> {
        self.data.read().unwrap().clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.read().unwrap();
        buf.fill(0);
        if offset < d.len() as u64 {
            let start = offset as usize;
            let n = buf.len().min(d.len() - start);
            buf[..n].copy_from_slice(&d[start..start + n]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.data.write().unwrap();
        let end = offset as usize + buf.len();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.data.write().unwrap().resize(len as usize, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.data.write().unwrap();
        let start = (offset as usize).min(d.len());
        let end = ((offset + len) as usize).min(d.len());
        d[start..end].fill(0);
        Ok(())
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.data.write().unwrap();
        let end = (offset + len) as usize;
        if d.len() < end {
            d.resize(end, 0);
        }
        Ok(())
    }
}
