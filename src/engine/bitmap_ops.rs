//! Managing persistent dirty bitmaps: list, add, remove, clear, enable,
//! disable and merge, with the checks and messages of QEMU's
//! block-dirty-bitmap-* commands (what `qemu-img bitmap` and `qemu-img
//! convert --bitmaps` run). A read-write session changes its in-memory
//! list (bitmaps.rs); the directory on disk follows when the image is
//! closed, as in QEMU, so a crash before that leaves the bitmaps the open
//! found, marked in use. A read-only session lists and reads the bitmaps
//! on disk (the source of a merge or a convert).

use super::bitmaps::{read_bitmap_table, read_bits, read_directory, Bitmap, Bits};
use super::Qcow2;
use crate::error::{invalid, Error, Result};
use crate::format::bitmap::*;

/// One persistent bitmap, as `qemu-img info` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// Records guest writes (the `auto` flag).
    pub enabled: bool,
    /// Marked in use on disk by a session that did not close it: its bits
    /// cannot be trusted (QEMU's "inconsistent").
    pub inconsistent: bool,
}

/// The dirty granules of a bitmap over an image of `size` bytes: sorted,
/// disjoint guest byte ranges (offset, length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyRanges {
    pub size: u64,
    pub ranges: Vec<(u64, u64)>,
}

fn not_found(name: &str) -> Error {
    Error::InvalidArgument(format!("Dirty bitmap '{name}' not found"))
}

fn inconsistent(name: &str) -> Error {
    Error::InvalidArgument(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}

/// The set bits of `bits` as guest byte ranges, clamped to `size`.
fn ranges_of(bits: &Bits, size: u64) -> Vec<(u64, u64)> {
    let g = bits.granularity_bits;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in bits.words.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let i = w as u64 * 64 + word.trailing_zeros() as u64;
            word &= word - 1;
            let start = i << g;
            let end = ((i + 1) << g).min(size);
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l = end - *s,
                _ => out.push((start, end - start)),
            }
        }
    }
    out
}

impl Qcow2 {
    /// Bitmap granularity QEMU picks when none is given: the cluster size,
    /// at least 4 KiB and at most 64 KiB.
    pub fn default_bitmap_granularity(&self) -> u64 {
        self.cs.clamp(4096, 65536)
    }

    /// Whether this session holds the bitmaps in memory (read-write, not
    /// corrupt); otherwise they are read from disk.
    fn bitmaps_in_memory(&self) -> bool {
        self.writable && !self.lock().corrupt
    }

    /// The persistent bitmaps, in directory order (bitmaps added in this
    /// session last).
    pub fn bitmap_list(&self) -> Result<Vec<BitmapInfo>> {
        if self.bitmaps_in_memory() {
            let b = self.bitmaps_lock();
            return Ok(b
                .list
                .iter()
                .map(|b| BitmapInfo {
                    name: b.entry.display_name(),
                    granularity: 1 << b.entry.granularity_bits,
                    enabled: match &b.bits {
                        Some(bits) => bits.enabled,
                        None => b.entry.flags & FLAG_AUTO != 0,
                    },
                    inconsistent: b.bits.is_none(),
                })
                .collect());
        }
        let m = self.lock();
        let Some((_, entries)) = read_directory(&m, self.size())? else {
            return Ok(Vec::new());
        };
        Ok(entries
            .iter()
            .map(|e| BitmapInfo {
                name: e.display_name(),
                granularity: 1 << e.granularity_bits,
                enabled: e.flags & FLAG_AUTO != 0,
                inconsistent: e.in_use(),
            })
            .collect())
    }

    /// Adds an empty persistent bitmap (QEMU's block-dirty-bitmap-add with
    /// persistent=on). `granularity` None: the default.
    pub fn bitmap_add(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        let m = self.lock();
        m.ensure_writable()?;
        if name.is_empty() {
            return Err(invalid!("Bitmap name cannot be empty"));
        }
        let mut b = self.bitmaps_lock();
        if b.list.iter().any(|x| x.entry.name == name.as_bytes()) {
            return Err(Error::InvalidArgument(format!(
                "Bitmap already exists: {name}"
            )));
        }
        let g = granularity.unwrap_or_else(|| self.default_bitmap_granularity());
        if !g.is_power_of_two() || !(512..=1 << MAX_GRANULARITY_BITS).contains(&g) {
            return Err(Error::InvalidArgument(
                "Granularity must be power of 2 and at least 512".into(),
            ));
        }
        let cant = |why: &str| {
            Error::InvalidArgument(format!(
                "Can't make bitmap '{name}' persistent in '{}': {why}",
                self.name
            ))
        };
        if self.version < 3 {
            return Err(cant("Cannot store dirty bitmaps in qcow2 v2 files"));
        }
        if name.len() > MAX_NAME_SIZE {
            return Err(cant("Name length exceeds maximum (1023 characters)"));
        }
        if b.list.len() as u32 >= MAX_BITMAPS {
            return Err(cant(
                "Maximum number of persistent bitmaps is already reached",
            ));
        }
        let entry = DirEntry {
            table_offset: 0,
            table_size: 0,
            flags: if enabled { FLAG_AUTO } else { 0 },
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: g.trailing_zeros() as u8,
            name: name.as_bytes().to_vec(),
        };
        let dir_size: u64 = encode_directory(
            &b.list
                .iter()
                .map(|x| x.entry.clone())
                .chain(std::iter::once(entry.clone()))
                .collect::<Vec<_>>(),
        )
        .len() as u64;
        if dir_size > MAX_DIRECTORY_SIZE {
            return Err(cant("Not enough space in the bitmap directory"));
        }
        let bits = Bits::new(entry.granularity_bits, self.size(), enabled);
        b.list.push(Bitmap {
            entry,
            bits: Some(bits),
            table: Vec::new(),
        });
        b.changed = true;
        Ok(())
    }

    /// Removes a persistent bitmap, consistent or not; its clusters are
    /// freed once the directory on disk no longer names it (at close).
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        let m = self.lock();
        m.ensure_writable()?;
        let mut b = self.bitmaps_lock();
        let i = b
            .list
            .iter()
            .position(|x| x.entry.name == name.as_bytes())
            .ok_or_else(|| not_found(name))?;
        let gone = b.list.remove(i);
        let cs = m.cs;
        let table = match (&gone.bits, gone.entry.table_offset) {
            (_, 0) => Vec::new(),
            (Some(_), _) => gone.table.clone(),
            // An inconsistent bitmap's table was not read at open; a table
            // that cannot be read leaves its data clusters leaked.
            (None, _) => read_bitmap_table(&m, &gone.entry).unwrap_or_default(),
        };
        b.removed.extend(
            table
                .iter()
                .map(|&t| t & TABLE_OFFSET_MASK)
                .filter(|&o| o != 0)
                .map(|o| (o, cs, true)),
        );
        if gone.entry.table_offset != 0 {
            let len = gone.entry.table_size as u64 * 8;
            b.removed.push((gone.entry.table_offset, len, false));
        }
        b.changed = true;
        Ok(())
    }

    /// Runs `f` on the bits of a usable bitmap of this read-write session.
    fn with_bits<T>(&self, name: &str, f: impl FnOnce(&mut Bits) -> T) -> Result<T> {
        self.lock().ensure_writable()?;
        let mut b = self.bitmaps_lock();
        let x = b
            .list
            .iter_mut()
            .find(|x| x.entry.name == name.as_bytes())
            .ok_or_else(|| not_found(name))?;
        let bits = x.bits.as_mut().ok_or_else(|| inconsistent(name))?;
        Ok(f(bits))
    }

    /// Fails as the other operations do when bitmap `name` of this
    /// read-write session is missing or inconsistent.
    pub fn bitmap_check_usable(&self, name: &str) -> Result<()> {
        self.with_bits(name, |_| ())
    }

    /// Clears every bit of a bitmap.
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.with_bits(name, |bits| bits.words.fill(0))
    }

    /// Starts (true) or stops recording guest writes in a bitmap.
    pub fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.with_bits(name, |bits| bits.enabled = enabled)
    }

    /// The dirty ranges of a consistent bitmap: from memory in a
    /// read-write session, from disk otherwise.
    pub fn bitmap_dirty(&self, name: &str) -> Result<DirtyRanges> {
        let size = self.size();
        if self.bitmaps_in_memory() {
            let b = self.bitmaps_lock();
            let x = b
                .list
                .iter()
                .find(|x| x.entry.name == name.as_bytes())
                .ok_or_else(|| not_found(name))?;
            let bits = x.bits.as_ref().ok_or_else(|| inconsistent(name))?;
            return Ok(DirtyRanges {
                size,
                ranges: ranges_of(bits, size),
            });
        }
        let m = self.lock();
        let entries = read_directory(&m, size)?.map(|d| d.1).unwrap_or_default();
        let e = entries
            .iter()
            .find(|e| e.name == name.as_bytes())
            .ok_or_else(|| not_found(name))?;
        if e.in_use() {
            return Err(inconsistent(name));
        }
        let table = read_bitmap_table(&m, e)?;
        let bits = read_bits(&m, e, &table, size)?;
        Ok(DirtyRanges {
            size,
            ranges: ranges_of(&bits, size),
        })
    }

    /// Merges bitmap `src_name` of `src` (this image or another, whose
    /// granularity may differ) into bitmap `dst` of this read-write
    /// session: every granule of `dst` that a dirty range touches is set.
    /// Checked in QEMU's order: the target, then the source, then sizes.
    pub fn bitmap_merge(&self, dst: &str, src: &Qcow2, src_name: &str) -> Result<()> {
        self.bitmap_check_usable(dst)?;
        let d = src.bitmap_dirty(src_name)?;
        self.bitmap_merge_ranges(dst, &d)
    }

    /// Sets the granules of bitmap `dst` touched by `d`'s ranges; `d` must
    /// cover an image of this image's size.
    pub fn bitmap_merge_ranges(&self, dst: &str, d: &DirtyRanges) -> Result<()> {
        let size = self.size();
        if d.size != size {
            return Err(Error::InvalidArgument(format!(
                "Bitmaps are of different sizes (destination size is {size}, source size is {}) and can't be merged",
                d.size
            )));
        }
        self.with_bits(dst, |bits| {
            for &(off, len) in &d.ranges {
                if len > 0 {
                    bits.mark(off, len);
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_adjacent_granules_and_clamp() {
        let mut b = Bits::new(16, (1 << 20) + 100, true); // 17 granules
        b.set_range(1, 3);
        b.set_range(3, 4);
        b.set_range(16, 17);
        assert_eq!(
            ranges_of(&b, (1 << 20) + 100),
            vec![(65536, 3 * 65536), (1 << 20, 100)]
        );
        let mut w = Bits::new(9, 1 << 30, true);
        w.set_range(63, 65);
        assert_eq!(ranges_of(&w, 1 << 30), vec![(63 * 512, 1024)]);
    }
}
