//! Persistent dirty bitmaps of an open image, kept as QEMU keeps them.
//!
//! Every open validates the bitmaps extension and directory (QEMU refuses
//! to open an image whose bitmaps are damaged, read-only or not) and the
//! tables of the consistent bitmaps. A read-write open also loads each
//! consistent bitmap into memory and marks it in use on disk, synced
//! before any guest write: a crash from then on leaves the bitmaps marked
//! inconsistent, never silently stale. Guest writes, zero writes and
//! discards set the bits of enabled (`auto`) bitmaps at each bitmap's
//! granularity; disabled ones keep their bits. Closing writes every
//! consistent bitmap to new clusters (data clusters only where a bit is
//! set, then its table, then a new directory), makes them and their
//! refcounts durable, points the header at the new directory, and only
//! then frees the old directory, tables and data: a crash at any point
//! leaves either the old in-use directory or the new clean one, plus at
//! most leaked clusters. Bitmaps that were in use at open (left by a
//! crash) are kept exactly as found, as QEMU keeps them. Allocation order
//! is QEMU's, so both leave the same layout.
//!
//! The in-memory bits live behind their own mutex (lock order: metadata,
//! then bitmaps) so that tracking a write never waits for metadata I/O.

use super::meta::Meta;
use super::Qcow2;
use crate::error::{invalid, Error, Result};
use crate::format::bitmap::*;
use crate::format::header::Header;
use crate::format::{encode_table, AUTOCLEAR_BITMAPS};
use std::cell::Cell;
use std::collections::HashSet;

thread_local! {
    /// Depth of [`Qcow2::as_one_request`] scopes on this thread.
    static IN_REQUEST: Cell<u32> = const { Cell::new(0) };
}

/// The bits of one consistent bitmap, one per granule of the guest.
pub(super) struct Bits {
    pub(super) granularity_bits: u8,
    pub(super) nbits: u64,
    /// Bit i of the bitmap is bit i % 64 of word i / 64; serialized as
    /// little-endian words this is the on-disk order (bit 0 of byte 0
    /// first).
    pub(super) words: Vec<u64>,
    /// Tracks guest writes (the `auto` flag).
    pub(super) enabled: bool,
}

impl Bits {
    pub(super) fn new(granularity_bits: u8, image_size: u64, enabled: bool) -> Bits {
        let nbits = bitmap_bits(image_size, granularity_bits);
        Bits {
            granularity_bits,
            nbits,
            words: vec![0; nbits.div_ceil(64) as usize],
            enabled,
        }
    }

    /// Sets bits [a, b).
    pub(super) fn set_range(&mut self, a: u64, b: u64) {
        let b = b.min(self.nbits);
        let mut i = a;
        while i < b {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = (b - i + lo).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            self.words[w] |= mask;
            i += hi - lo;
        }
    }

    /// Marks every granule touched by guest bytes [off, off+len).
    pub(super) fn mark(&mut self, off: u64, len: u64) {
        let g = self.granularity_bits;
        self.set_range(off >> g, ((off + len - 1) >> g) + 1);
    }

    /// ORs serialized bits (on-disk byte order) in at byte offset `at`.
    fn or_bytes(&mut self, at: u64, data: &[u8]) {
        let nbytes = self.nbits.div_ceil(8);
        for (j, &b) in data.iter().enumerate() {
            let byte = at + j as u64;
            if byte >= nbytes {
                break;
            }
            self.words[(byte / 8) as usize] |= (b as u64) << (8 * (byte % 8));
        }
        self.clear_tail();
    }

    /// Bits past the end of the guest are always clear.
    fn clear_tail(&mut self) {
        let r = self.nbits % 64;
        if r != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << r) - 1;
            }
        }
    }

    /// The serialized bytes of bitmap cluster `k` (zero-padded to a whole
    /// cluster), or None when all its bits are clear.
    fn cluster(&self, k: u64, cs: u64) -> Option<Vec<u8>> {
        let words_per = (cs / 8) as usize;
        let first = k as usize * words_per;
        let words = self.words.get(first..)?;
        let words = &words[..words.len().min(words_per)];
        if words.iter().all(|&w| w == 0) {
            return None;
        }
        let mut out = vec![0u8; cs as usize];
        for (i, w) in words.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        Some(out)
    }

    /// Follows a resize: new granules are clear, dropped ones forgotten.
    fn resize(&mut self, image_size: u64) {
        self.nbits = bitmap_bits(image_size, self.granularity_bits);
        self.words.resize(self.nbits.div_ceil(64) as usize, 0);
        self.clear_tail();
    }
}

/// One entry of the directory and what the session knows of it.
pub(super) struct Bitmap {
    /// The entry as the on-disk directory has it (in use once marked);
    /// table offset 0 for a bitmap added in this session.
    pub(super) entry: DirEntry,
    /// The bits of a bitmap that was consistent at open (or added since);
    /// None for one that was already in use (inconsistent), which is kept
    /// as found.
    pub(super) bits: Option<Bits>,
    /// Its bitmap table as on disk (freed, with its data, once replaced).
    pub(super) table: Vec<u64>,
}

/// The persistent bitmaps of a read-write session (empty otherwise).
#[derive(Default)]
pub(super) struct Bitmaps {
    pub(super) list: Vec<Bitmap>,
    /// Bitmaps were added or removed: the next store writes a directory
    /// even when no bitmap is held in memory.
    pub(super) changed: bool,
    /// Clusters of removed bitmaps, (offset, length, data cluster?),
    /// freed once a stored directory no longer names them.
    pub(super) removed: Vec<(u64, u64, bool)>,
}

/// The raw bitmaps extension when the header says it is valid: a v3 image
/// with autoclear bit 0 set (an opener without bitmap support clears it).
pub(super) fn active_ext(h: &Header) -> Option<&[u8]> {
    match &h.bitmaps_ext {
        Some(e) if h.version >= 3 && h.autoclear_features & AUTOCLEAR_BITMAPS != 0 => Some(e),
        _ => None,
    }
}

/// Warns, as QEMU does, about a bitmaps extension that a program without
/// bitmap support left stale, and returns true when there is one (it is
/// dropped from the header by the next write of it).
pub(super) fn stale_ext(h: &Header) -> bool {
    if h.bitmaps_ext.is_none() || active_ext(h).is_some() {
        return false;
    }
    crate::log::warn(if h.version < 3 {
        "warning: This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent"
    } else {
        "warning: a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent"
    });
    crate::log::warn(
        "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.",
    );
    true
}

/// The directory's byte range, for the overlap guard (None without valid bitmaps).
pub(super) fn directory_region(h: &Header) -> Option<(u64, u64)> {
    let e = BitmapsExt::parse(active_ext(h)?, h.cluster_size()).ok()?;
    e.dir_offset.checked_add(e.dir_size)?;
    Some((e.dir_offset, e.dir_size))
}

/// Reads and decodes the directory.
pub(super) fn read_directory(
    m: &Meta,
    image_size: u64,
) -> Result<Option<(BitmapsExt, Vec<DirEntry>)>> {
    let Some(raw) = active_ext(&m.header) else {
        return Ok(None);
    };
    let ext = BitmapsExt::parse(raw, m.cs)?;
    let mut dir = vec![0u8; ext.dir_size as usize];
    m.file
        .read_at(&mut dir, ext.dir_offset)
        .map_err(|e| Error::io("Failed to read bitmap directory", e))?;
    let list = parse_directory(&dir, ext.nb_bitmaps, m.cs, image_size)?;
    Ok(Some((ext, list)))
}

/// Reads a bitmap's table and checks its entries.
pub(super) fn read_bitmap_table(m: &Meta, e: &DirEntry) -> Result<Vec<u64>> {
    let what = || {
        format!(
            "Could not read bitmap_table table from image for bitmap '{}'",
            e.display_name()
        )
    };
    let mut b = vec![0u8; e.table_size as usize * 8];
    m.file
        .read_at(&mut b, e.table_offset)
        .map_err(|err| Error::io(what(), err))?;
    let table = crate::format::decode_table(&b);
    if table.iter().any(|&t| !table_entry_ok(t, m.cs)) {
        return Err(Error::Invalid(format!("{}: Invalid argument", what())));
    }
    Ok(table)
}

/// Validates the image's bitmaps with QEMU's checks and messages; with
/// `load_bits` (read-write opens) also reads the consistent bitmaps' bits.
pub(super) fn load(m: &mut Meta, image_size: u64, load_bits: bool) -> Result<Bitmaps> {
    let Some((_, entries)) = read_directory(m, image_size)? else {
        return Ok(Bitmaps::default());
    };
    let mut names = HashSet::new();
    let mut list = Vec::with_capacity(entries.len());
    for entry in entries {
        let consistent = !entry.in_use();
        let table = if consistent {
            read_bitmap_table(m, &entry)?
        } else {
            Vec::new()
        };
        if !names.insert(entry.name.clone()) {
            return Err(invalid!("Bitmap already exists: {}", entry.display_name()));
        }
        let mut bits = None;
        if consistent {
            let need = table_entries(image_size, entry.granularity_bits, m.cs);
            if table.len() as u64 != need {
                return Err(invalid!(
                    "Could not read bitmap '{}' from image: Invalid argument",
                    entry.display_name()
                ));
            }
            if load_bits {
                check_clusters(m, &entry, &table)?;
                bits = Some(read_bits(m, &entry, &table, image_size)?);
            }
        }
        list.push(Bitmap { entry, bits, table });
    }
    Ok(Bitmaps {
        list,
        ..Default::default()
    })
}

/// A read-write session frees a bitmap's clusters when it replaces them:
/// refuse one whose table or data lies outside the file or on other
/// metadata rather than free what it points at.
fn check_clusters(m: &Meta, e: &DirEntry, table: &[u64]) -> Result<()> {
    let file_len = m.file_len()?;
    let tb_end = e.table_offset.saturating_add(e.table_size as u64 * 8);
    let data = table
        .iter()
        .map(|&t| t & TABLE_OFFSET_MASK)
        .filter(|&o| o != 0);
    for (off, end) in std::iter::once((e.table_offset, tb_end)).chain(data.map(|o| (o, o + m.cs))) {
        if end > file_len {
            return Err(Error::Corrupt(format!(
                "Bitmap '{}': cluster {off:#x} of its table or data is past the end of the file",
                e.display_name()
            )));
        }
        for c in off / m.cs..end.div_ceil(m.cs) {
            if let Some(k) = m.metadata.get(&c) {
                return Err(Error::Corrupt(format!(
                    "Bitmap '{}': cluster {:#x} of its table or data overlaps with {}",
                    e.display_name(),
                    c * m.cs,
                    k.describe()
                )));
            }
        }
    }
    Ok(())
}

pub(super) fn read_bits(m: &Meta, e: &DirEntry, table: &[u64], image_size: u64) -> Result<Bits> {
    let enabled = e.flags & FLAG_AUTO != 0;
    let mut bits = Bits::new(e.granularity_bits, image_size, enabled);
    let mut buf = vec![0u8; m.cs as usize];
    for (k, &t) in table.iter().enumerate() {
        let at = k as u64 * m.cs;
        let off = t & TABLE_OFFSET_MASK;
        if off != 0 {
            m.file.read_at(&mut buf, off).map_err(|err| {
                Error::io(
                    format!("Could not read bitmap '{}' from image", e.display_name()),
                    err,
                )
            })?;
            bits.or_bytes(at, &buf);
        } else if t & TABLE_ALL_ONES != 0 {
            bits.set_range(at * 8, (at + m.cs) * 8);
        }
    }
    Ok(bits)
}

/// Allocates clusters for `bytes` of bitmap metadata. No dirty bit: their
/// refcounts are durable before anything on disk points at them.
fn alloc(m: &mut Meta, bytes: u64) -> Result<u64> {
    let n = bytes.div_ceil(m.cs);
    let off = m.alloc_clusters_inner(n)?;
    m.written_end = m.written_end.max(off + n * m.cs);
    m.check_fresh(off, n)?;
    Ok(off)
}

/// Drops one reference to each cluster of [off, off+len), skipping
/// clusters whose refcount is already 0 (damage `check` reports). As QEMU
/// does, freed data clusters are punched (discarded) and freed tables and
/// directories keep their bytes until reuse.
fn free(m: &mut Meta, off: u64, len: u64, punch: bool) -> Result<()> {
    for c in off / m.cs..(off + len).div_ceil(m.cs) {
        if m.refcount(c)? > 0 {
            m.update_refcount(c * m.cs, m.cs, -1)?;
            if punch {
                m.punch_if_free(c * m.cs, m.cs)?;
            }
        }
    }
    Ok(())
}

impl Bitmaps {
    /// True when some bitmap is held in memory (was consistent at open).
    fn has_loaded(&self) -> bool {
        self.list.iter().any(|b| b.bits.is_some())
    }

    /// Marks the loaded bitmaps in use on disk: the directory is rewritten
    /// in place (only flag words change, each inside one sector, so a torn
    /// write still leaves a valid directory) and synced.
    pub(super) fn mark_in_use(&mut self, m: &mut Meta) -> Result<()> {
        let mut changed = false;
        for b in self.list.iter_mut().filter(|b| b.bits.is_some()) {
            if !b.entry.in_use() {
                b.entry.flags |= FLAG_IN_USE;
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        let Some((off, size)) = directory_region(&m.header) else {
            return Ok(());
        };
        let dir = encode_directory(
            &self
                .list
                .iter()
                .map(|b| b.entry.clone())
                .collect::<Vec<_>>(),
        );
        if dir.len() as u64 != size {
            return Err(invalid!("Broken bitmap directory"));
        }
        m.write_file(&dir, off, "mark bitmaps in use")?;
        m.sync()
    }

    /// Records a guest write request of [off, off+len).
    fn track(&mut self, off: u64, len: u64) {
        for bits in self.list.iter_mut().filter_map(|b| b.bits.as_mut()) {
            if bits.enabled {
                bits.mark(off, len);
            }
        }
    }

    /// QEMU refuses to resize an image with an inconsistent bitmap.
    pub(super) fn check_resizable(&self) -> Result<()> {
        if let Some(b) = self.list.iter().find(|b| b.bits.is_none()) {
            return Err(invalid!(
                "Bitmap '{}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk",
                b.entry.display_name()
            ));
        }
        Ok(())
    }

    pub(super) fn resize(&mut self, image_size: u64) {
        for bits in self.list.iter_mut().filter_map(|b| b.bits.as_mut()) {
            bits.resize(image_size);
        }
    }

    /// Writes the loaded bitmaps back (see the module comment) and clears
    /// their in-use flag. Nothing happens without loaded bitmaps, unless
    /// bitmaps were added or removed: then the directory is written (or
    /// the extension dropped, with its autoclear bit, when none is left).
    pub(super) fn store(&mut self, m: &mut Meta, image_size: u64) -> Result<()> {
        if !self.has_loaded() && !self.changed {
            return Ok(());
        }
        let old_dir = directory_region(&m.header);
        if old_dir.is_none() && !self.changed {
            return Ok(());
        }
        let cs = m.cs;
        let mut entries = Vec::with_capacity(self.list.len());
        let mut tables = Vec::with_capacity(self.list.len());
        let mut old = self.removed.clone();
        for b in &self.list {
            let Some(bits) = &b.bits else {
                entries.push(b.entry.clone());
                tables.push(b.table.clone());
                continue;
            };
            let n = table_entries(image_size, bits.granularity_bits, cs);
            if n == 0 {
                return Err(invalid!(
                    "Cannot store bitmap '{}' of an image of size 0",
                    b.entry.display_name()
                ));
            }
            // As QEMU: the data clusters in bitmap order, then the table.
            let mut table = vec![0u64; n as usize];
            let name = b.entry.display_name();
            let failed = |e: Error| store_failed(&name, e);
            for (k, slot) in table.iter_mut().enumerate() {
                if let Some(data) = bits.cluster(k as u64, cs) {
                    let off = alloc(m, cs).map_err(failed)?;
                    m.write_file(&data, off, "write bitmap data")
                        .map_err(failed)?;
                    *slot = off;
                }
            }
            let tb = alloc(m, n * 8).map_err(failed)?;
            m.write_file(
                &encode_table(&table, n as usize * 8),
                tb,
                "write bitmap table",
            )
            .map_err(failed)?;
            let mut e = b.entry.clone();
            e.table_offset = tb;
            e.table_size = n as u32;
            e.flags = if bits.enabled { FLAG_AUTO } else { 0 };
            entries.push(e);
            tables.push(table);
            // Freed in QEMU's order: the data clusters, then the table.
            old.extend(
                b.table
                    .iter()
                    .map(|&t| t & TABLE_OFFSET_MASK)
                    .filter(|&o| o != 0)
                    .map(|o| (o, cs, true)),
            );
            if b.entry.table_offset != 0 {
                old.push((b.entry.table_offset, b.entry.table_size as u64 * 8, false));
            }
        }
        let ext = if entries.is_empty() {
            None
        } else {
            let dir = encode_directory(&entries);
            let dir_off = alloc(m, dir.len() as u64)?;
            m.write_file(&dir, dir_off, "write bitmap directory")?;
            Some(BitmapsExt {
                nb_bitmaps: entries.len() as u32,
                dir_size: dir.len() as u64,
                dir_offset: dir_off,
            })
        };
        // Data, tables, directory and their refcounts before the header.
        m.write_refblocks()?;
        m.sync()?;
        // With the same bitmaps under the same names only the directory
        // offset changes in the header, 8 aligned bytes inside one sector,
        // so a torn header write leaves the old directory or the new one.
        // Adding or removing bitmaps rewrites the extension (as QEMU does).
        let prev_ext = m.header.bitmaps_ext.clone();
        let prev_autoclear = m.header.autoclear_features;
        match &ext {
            Some(e) => {
                m.header.bitmaps_ext = Some(e.encode());
                m.header.autoclear_features |= AUTOCLEAR_BITMAPS;
            }
            None => {
                m.header.bitmaps_ext = None;
                m.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
            }
        }
        if let Err(e) = m.write_header() {
            m.header.bitmaps_ext = prev_ext;
            m.header.autoclear_features = prev_autoclear;
            return Err(e);
        }
        // The header no longer points at the old structures: free them.
        if let Some((off, size)) = old_dir {
            free(m, off, size, false)?;
        }
        for (off, len, data) in old {
            free(m, off, len, data)?;
        }
        m.write_refblocks()?;
        m.sync()?;
        m.rebuild_metadata_map();
        for ((b, e), t) in self.list.iter_mut().zip(entries).zip(tables) {
            b.entry = e;
            b.table = t;
        }
        self.removed.clear();
        self.changed = false;
        Ok(())
    }
}

/// QEMU's words for a bitmap that could not be written at close, with
/// the cause's errno kept.
fn store_failed(name: &str, e: Error) -> Error {
    let what = format!("Failed to write bitmap '{name}' to file");
    match e {
        Error::Io { source, .. } => Error::io(what, source),
        e => e.context(&what),
    }
}

/// Every (offset, length) the bitmaps extension references on disk, for
/// `check`: the directory, each bitmap's table and its data clusters.
pub(super) fn referenced_regions(m: &Meta) -> Result<Vec<(u64, u64)>> {
    let Some((ext, entries)) = read_directory(m, m.header.size)? else {
        return Ok(Vec::new());
    };
    // A hostile offset near 2^64 is clamped so that the range still ends
    // past the file and `check` reports it.
    let mut out = vec![(ext.dir_offset, ext.dir_size.min(u64::MAX - ext.dir_offset))];
    for e in &entries {
        let len = (e.table_size as u64 * 8).min(u64::MAX - e.table_offset);
        out.push((e.table_offset, len));
        let table = read_bitmap_table(m, e)?;
        out.extend(
            table
                .iter()
                .map(|&t| t & TABLE_OFFSET_MASK)
                .filter(|&o| o != 0)
                .map(|o| (o, m.cs)),
        );
    }
    Ok(out)
}

impl Qcow2 {
    /// Runs `f`, whose engine requests together serve one guest request
    /// of [off, off+len) (e.g. the pieces a block layer cuts a zero write
    /// into, some widened to whole clusters), so that the persistent
    /// bitmaps record exactly that range, as QEMU's block layer records
    /// the request and not what its driver did. `len` 0 records nothing
    /// (e.g. the writes that preallocate a grown area).
    pub fn as_one_request<T>(&self, off: u64, len: u64, f: impl FnOnce() -> T) -> T {
        struct Scope;
        impl Drop for Scope {
            fn drop(&mut self) {
                IN_REQUEST.with(|c| c.set(c.get() - 1));
            }
        }
        IN_REQUEST.with(|c| c.set(c.get() + 1));
        let r = {
            let _scope = Scope;
            f()
        };
        self.track_write(off, len);
        r
    }

    /// Records a guest write (or zero write, or discard) of [off, off+len)
    /// in the enabled persistent bitmaps, whatever the request's outcome
    /// (as QEMU does once a request has passed its checks).
    pub(super) fn track_write(&self, off: u64, len: u64) {
        if len == 0 || IN_REQUEST.with(|c| c.get()) > 0 {
            return;
        }
        self.bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .track(off, len);
    }

    pub(super) fn bitmaps_lock(&self) -> std::sync::MutexGuard<'_, Bitmaps> {
        self.bitmaps.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_granules_touched() {
        let mut b = Bits::new(16, 10 << 20, true);
        assert_eq!(b.nbits, 160);
        b.mark(64 << 10, 64 << 10);
        b.mark(5 << 20, 4096);
        b.mark((10 << 20) - 1, 1);
        let c = b.cluster(0, 65536).unwrap();
        assert_eq!(
            &c[..20],
            &[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0x80]
        );
        assert!(c[20..].iter().all(|&x| x == 0));
        assert_eq!(c.len(), 65536);
    }

    #[test]
    fn set_range_crosses_words() {
        let mut b = Bits::new(9, 1 << 20, true); // 2048 bits
        b.set_range(60, 200);
        for i in 0..2048u64 {
            let set = b.words[(i / 64) as usize] >> (i % 64) & 1 == 1;
            assert_eq!(set, (60..200).contains(&i), "bit {i}");
        }
        b.set_range(2000, 5000);
        assert_eq!(b.words[31], u64::MAX << 16);
    }

    #[test]
    fn clusters_without_bits_are_not_stored() {
        let mut b = Bits::new(9, 1 << 30, true); // 2M bits = 4 clusters of 64 KiB
        assert!(b.cluster(0, 65536).is_none());
        b.mark(600 << 20, 1);
        assert!(b.cluster(0, 65536).is_none());
        assert!(b.cluster(2, 65536).is_some());
        assert!(b.cluster(4, 65536).is_none());
    }

    #[test]
    fn load_and_resize_keep_the_tail_clear() {
        let mut b = Bits::new(16, (10 << 20) + 1, true); // 161 bits
        b.or_bytes(0, &[0xff; 64]);
        assert_eq!(b.words, [u64::MAX, u64::MAX, (1 << 33) - 1]);
        // Shrinking forgets granules; growing back finds them clear.
        b.resize(8 << 20);
        assert_eq!(b.words, [u64::MAX, u64::MAX]);
        b.resize(10 << 20);
        assert_eq!(b.words, [u64::MAX, u64::MAX, 0]);
        b.resize((8 << 20) - 1);
        assert_eq!(b.words, [u64::MAX, u64::MAX]);
        b.resize((8 << 20) - (64 << 10));
        assert_eq!(b.words, [u64::MAX, u64::MAX >> 1]);
    }
}
