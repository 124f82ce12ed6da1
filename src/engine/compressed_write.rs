//! Compressed cluster writes (what `convert -c` produces): one whole
//! guest cluster compressed with the image's compression type and packed
//! byte-wise into host clusters shared with its neighbours, as QEMU packs
//! them. A cluster that does not shrink is written uncompressed.
//! QEMU's qcow2 driver never compresses over a cluster that has a host
//! cluster ([`Qcow2::write_compressed_fresh`], what `oxqcow io`'s
//! compressed writes go through); the C API's and `rebase -c`'s writes
//! replace it (`convert -c` checks on its own).

use super::compress::compress;
use super::meta::Meta;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::entries::L2Entry;
use crate::storage::DebugEvent;
use std::sync::atomic::Ordering;

impl Meta {
    /// Allocates `size` bytes for compressed data, continuing in the host
    /// cluster of the previous compressed write while it has room (every
    /// host cluster touched gains one reference).
    fn alloc_bytes(&mut self, size: u64) -> Result<u64> {
        let cs = self.cs;
        self.event(DebugEvent::ClusterAllocBytes);
        let mut off = self.free_byte_offset;
        if off != 0 && self.refcount(off / cs)? >= self.rw.max() {
            off = 0;
        }
        let free_in_cluster = if off == 0 { 0 } else { cs - off % cs };
        if off == 0 || free_in_cluster < size {
            let new = self.find_free(1)?;
            if off == 0 || off.div_ceil(cs) * cs != new {
                off = new;
            }
        }
        self.update_refcount(off, size, 1)?;
        self.free_byte_offset = if (off + size).is_multiple_of(cs) {
            0
        } else {
            off + size
        };
        Ok(off)
    }
}

impl Qcow2 {
    /// Writes one whole guest cluster compressed (the last cluster of the
    /// image may be shorter). Falls back to a plain write when the data
    /// does not compress.
    pub fn write_compressed(&self, data: &[u8], off: u64) -> Result<()> {
        self.write_compressed_as(data, off, false)
    }

    /// [`Qcow2::write_compressed`] with QEMU's qcow2 rule: compressed data
    /// cannot overwrite anything, so a cluster whose L2 entry holds a host
    /// offset (data, compressed data, or a zero cluster keeping its host
    /// cluster) fails with EIO, its data unchanged. Data that does not
    /// compress is written as a plain write, which may overwrite, as in
    /// QEMU (the check comes after compression there too).
    pub fn write_compressed_fresh(&self, data: &[u8], off: u64) -> Result<()> {
        self.write_compressed_as(data, off, true)
    }

    fn write_compressed_as(&self, data: &[u8], off: u64, fresh: bool) -> Result<()> {
        let cs = self.cs;
        let size = self.size();
        if !off.is_multiple_of(cs)
            || !(data.len() as u64 == cs || off + data.len() as u64 == size)
            || data.is_empty()
        {
            return Err(Error::InvalidArgument(format!(
                "{}: compressed writes must cover exactly one cluster",
                self.name
            )));
        }
        self.check_range(off, data.len() as u64)?;
        if self.data.is_some() {
            return Err(Error::Unsupported(format!(
                "{}: compressed clusters are not supported with an external data file",
                self.name
            )));
        }
        self.track_write(off, data.len() as u64);
        let mut full = data.to_vec();
        full.resize(cs as usize, 0);
        let Some(packed) = compress(self.compression_type, &full) else {
            return self.write_at(data, off);
        };
        let gc = off / cs;
        let mut m = self.claim(gc, gc);
        let r = (|| -> Result<()> {
            m.ensure_writable()?;
            // As QEMU: the L2 table first, then the compressed bytes.
            m.l2_for_write(gc)?;
            if fresh && m.l2_entry(gc)? & crate::format::OFFSET_MASK != 0 {
                return Err(Error::io(
                    format!(
                        "{}: compressed write over the allocated cluster at guest offset {off}",
                        self.name
                    ),
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
            let host = m.alloc_bytes(packed.len() as u64)?;
            m.check_overlap(host, packed.len() as u64)?;
            m.event(DebugEvent::WriteCompressed);
            m.write_file(&packed, host, "write compressed cluster")?;
            self.file_end
                .fetch_max(host + packed.len() as u64, Ordering::AcqRel);
            m.mark_dirty()?;
            let old = m.l2_entry(gc)?;
            let l2 = m.l2_for_write(gc)?;
            m.event(DebugEvent::L2UpdateCompressed);
            m.set_l2_entry(
                l2,
                gc,
                L2Entry::encode_compressed(host, packed.len() as u64, self.cb),
                0,
            );
            m.unref_entry(old, false)?;
            Ok(())
        })();
        self.release(&mut m, gc, gc);
        drop(m);
        r?;
        if self.writethrough {
            self.flush()?;
        }
        Ok(())
    }
}
