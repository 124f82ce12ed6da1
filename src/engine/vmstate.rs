//! The VM state area: where QEMU's savevm keeps a virtual machine's memory
//! and device state inside a qcow2 image (qemu-io's `write -b` / `read -b`).
//!
//! It is guest address space past the disk: it starts at the first L1
//! entry the virtual size does not need ([`Qcow2::vm_state_offset`]) and is
//! mapped through the same L1 and L2 tables as the disk, so clusters are
//! allocated, copied on write and checked as disk clusters are, and an
//! internal snapshot taken afterwards keeps them. A write past the end of
//! the L1 table grows it by half its size at a time (QEMU's growth rule),
//! so QEMU and oxqcow leave the same L1 size; a read past it reads zeros.

use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::MAX_L1_SIZE_BYTES;

impl Qcow2 {
    /// Writes `buf` at byte `pos` of the VM state area.
    pub fn write_vmstate(&self, buf: &[u8], pos: u64) -> Result<()> {
        let off = self.vm_state_range(pos, buf.len() as u64)?;
        self.lock().ensure_writable()?;
        if buf.is_empty() {
            return Ok(());
        }
        let need = (off + buf.len() as u64).div_ceil(self.l2_span());
        {
            let mut m = self.quiesce();
            if need > m.l1.len() as u64 {
                let max = MAX_L1_SIZE_BYTES / 8;
                let mut n = (m.l1.len() as u64).max(1);
                while n < need {
                    n = (n * 3).div_ceil(2);
                }
                if n > max {
                    return Err(Error::TooLarge(format!(
                        "{}: VM state write at {pos} needs an L1 table of {n} entries (at most {max}): File too large",
                        self.name
                    )));
                }
                m.grow_l1(n)?;
            }
        }
        let len = buf.len() as u64;
        let mut done = 0;
        while done < len {
            let n = self.chunk_len(off + done, len - done);
            self.write_chunk(&buf[done as usize..(done + n) as usize], off + done)?;
            done += n;
        }
        if self.writethrough {
            self.flush()?;
        }
        Ok(())
    }

    /// Reads byte `pos` on of the VM state area into `buf`; what was never
    /// written reads as the backing file there, or zeros.
    pub fn read_vmstate(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        let off = self.vm_state_range(pos, buf.len() as u64)?;
        self.read_mapped(buf, off)
    }

    /// The guest offset of VM state byte `pos`, checking that the request
    /// stays inside the 64-bit offset space QEMU allows (below 2^63).
    fn vm_state_range(&self, pos: u64, len: u64) -> Result<u64> {
        self.vm_state_offset()
            .checked_add(pos)
            .filter(|o| o.checked_add(len).is_some_and(|e| e <= i64::MAX as u64))
            .ok_or_else(|| {
                Error::OutOfRange(format!(
                    "{}: VM state request [{pos}, +{len}) is out of range",
                    self.name
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::{create_on, CreateOptions, OpenOptions, Qcow2};
    use crate::storage::{MemStorage, Storage};
    use std::path::Path;
    use std::sync::Arc;

    fn image(size: u64, cluster_size: u64) -> Qcow2 {
        let file: Arc<dyn Storage> = Arc::new(MemStorage::default());
        let o = CreateOptions {
            size,
            cluster_size,
            ..Default::default()
        };
        create_on(file.clone(), Path::new("mem.qcow2"), &o).unwrap();
        let opts = OpenOptions {
            writable: true,
            ..Default::default()
        };
        Qcow2::open_storage(file, Path::new("mem.qcow2"), &opts).unwrap()
    }

    #[test]
    fn vm_state_lives_past_the_disk_and_grows_l1_as_qemu_does() {
        let q = image(64 << 20, 65536);
        assert_eq!(q.vm_state_offset(), 512 << 20);
        q.write_vmstate(&[0x11; 4096], 1 << 40).unwrap();
        // 1 → 2 → 3 → 5 → … → 2397 entries, as qemu-io leaves it.
        assert_eq!(q.header().l1_size, 2397);
        let mut b = vec![0u8; 4096];
        q.read_vmstate(&mut b, 1 << 40).unwrap();
        assert!(b.iter().all(|&x| x == 0x11));
        // The disk is untouched; unwritten VM state and state past L1 read zeros.
        let mut d = vec![1u8; 4096];
        q.read_at(&mut d, 0).unwrap();
        assert!(d.iter().all(|&x| x == 0));
        q.read_vmstate(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        q.read_vmstate(&mut b, 1 << 52).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        q.flush().unwrap();
        let mut log = |l: &str| panic!("check: {l}");
        let r = q.check(0, &mut log).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0));
    }

    #[test]
    fn vm_state_past_the_largest_l1_is_too_large() {
        let q = image(64 << 20, 65536);
        let e = q.write_vmstate(&[0; 512], 2047 << 40).unwrap_err();
        assert_eq!(e.errno(), libc::EFBIG);
        let e = q.write_vmstate(&[0; 512], u64::MAX - 100).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
    }
}
