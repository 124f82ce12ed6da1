//! Opening an image: header validation against the file, QEMU's table
//! limits, feature checks, loading L1 and the refcount table, and the
//! backing chain.
//!
//! Every offset the header gives is checked against the file length and
//! against the other metadata before anything is read through it, and no
//! allocation is sized by an unchecked count. The snapshot table is the
//! exception QEMU makes: past the end of the file it reads as zeros, and
//! its entries' L1 tables are checked where a snapshot is used.

use super::backing::open_backing;
use super::bitmaps;
use super::cache::TableCache;
use super::check::{FIX_ERRORS, FIX_LEAKS};
use super::crypt::open_encryption;
use super::data_file::open_data_file;
use super::meta::Meta;
use super::{OpenOptions, Qcow2};
use crate::error::{Error, Result};
use crate::format::entries::RefcountWidth;
use crate::format::header::Header;
use crate::format::snapshot::{self, MAX_SNAPSHOTS};
use crate::format::*;
use crate::storage::Storage;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex};

/// QEMU's default ceiling for the L2 cache.
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// Default refcount-block cache size.
const DEFAULT_REFCOUNT_CACHE: u64 = 1 << 20;

fn read_table(file: &dyn Storage, off: u64, entries: u64, what: &str) -> Result<Vec<u64>> {
    let mut b = vec![0u8; (entries * 8) as usize];
    file.read_at(&mut b, off)
        .map_err(|e| Error::io(format!("Could not read {what}"), e))?;
    Ok(decode_table(&b))
}

/// True when [off, off+len) is cluster aligned at the start and inside the file.
fn region_ok(off: u64, len: u64, cs: u64, file_len: u64) -> bool {
    off.is_multiple_of(cs) && off.checked_add(len).is_some_and(|e| e <= file_len)
}

impl Qcow2 {
    /// Opens an image file.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Qcow2> {
        let name = path.display().to_string();
        let f = opts
            .open_file(path)
            .map_err(|e| Error::io(format!("Could not open '{name}'"), e))?;
        Qcow2::open_storage(Arc::new(f), path, opts)
            .map_err(|e| e.context(&format!("Could not open '{name}'")))
    }

    /// Opens an image on any storage; `path` names it and anchors relative
    /// backing file names.
    pub fn open_storage(file: Arc<dyn Storage>, path: &Path, opts: &OpenOptions) -> Result<Qcow2> {
        let name = path.display().to_string();
        if opts.writable {
            // What is visible now becomes durable, so that `durable_end`
            // (see meta.rs, rule 1) describes the disk and not a page cache
            // left by an earlier process.
            file.sync().map_err(|e| Error::io("sync", e))?;
        }
        let file_len = file.len().map_err(|e| Error::io("stat", e))?;
        let mut header = Header::parse(&read_header_cluster(file.as_ref(), file_len)?)?;
        let cs = header.cluster_size();
        let cb = header.cluster_bits;

        let ext_l2 = header.extended_l2();
        if ext_l2 && cb < subcluster::MIN_CLUSTER_BITS {
            return Err(Error::Invalid(format!(
                "Unsupported subcluster size: {}",
                cs / subcluster::SUBCLUSTERS as u64
            )));
        }
        if header.incompatible_features & INCOMPAT_CORRUPT != 0 && opts.writable && !opts.check_mode
        {
            return Err(Error::ReadOnly(
                "qcow2: Image is corrupt; cannot be opened read/write".into(),
            ));
        }
        let data = open_data_file(&header, opts)?;
        // A stale bitmaps extension (autoclear bit 0 cleared by a program
        // without bitmap support) is dropped by the next header write.
        let drop_bitmaps = bitmaps::stale_ext(&header) && opts.writable;
        if drop_bitmaps {
            header.bitmaps_ext = None;
        }

        // Refcount table.
        if header.refcount_table_clusters == 0 && !opts.check_mode {
            return Err(Error::Invalid(
                "Image does not contain a reference count table".into(),
            ));
        }
        let rt_bytes = header.refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFTABLE_SIZE_BYTES {
            return Err(Error::Invalid("Reference count table too large".into()));
        }
        if !region_ok(header.refcount_table_offset, rt_bytes, cs, file_len)
            || header.refcount_table_offset == 0
        {
            return Err(Error::Invalid(
                "Reference count table offset invalid".into(),
            ));
        }

        // Snapshots: QEMU's limits on the table. Its entries' L1 tables are
        // checked where they are used (`Snapshot::check_l1`), not here. In
        // check mode, what is over the limits is set aside here and reported
        // (or repaired) by `check`, as QEMU reads the table only there.
        let lenient = opts.check_mode;
        let mut snap_issues = snapshot::TableIssues::default();
        let mut nb_snapshots = header.nb_snapshots;
        if nb_snapshots > MAX_SNAPSHOTS {
            if !lenient {
                return Err(Error::Invalid("Snapshot table too large".into()));
            }
            snap_issues.too_many = nb_snapshots - MAX_SNAPSHOTS;
            nb_snapshots = MAX_SNAPSHOTS;
        }
        let off = header.snapshots_offset;
        let min_bytes = nb_snapshots as u64 * SNAPSHOT_HEADER_LEN;
        if (i64::MAX as u64) - min_bytes < off
            || off % cs != 0
            // Stricter than QEMU, which reads the header as an entry.
            || (off == 0 && nb_snapshots > 0)
        {
            return Err(Error::Invalid("Snapshot table offset invalid".into()));
        }
        let parsed = read_snapshot_table(file.as_ref(), off, nb_snapshots, header.size, lenient)?;
        snap_issues.extra_dropped = parsed.issues.extra_dropped;
        snap_issues.overhanging = parsed.issues.overhanging;
        let snapshots = parsed.list;
        let snap_table = (off, parsed.len as u64);

        // Active L1 table.
        let l2_span = l2_span_ext(cb, ext_l2);
        let max_l1 = MAX_L1_SIZE_BYTES / 8;
        if header.size.div_ceil(l2_span) > max_l1 {
            return Err(Error::Invalid("Image is too big".into()));
        }
        if header.l1_size as u64 > max_l1 {
            return Err(Error::Invalid("Active L1 table too large".into()));
        }
        if (header.l1_size as u64) < header.size.div_ceil(l2_span) {
            return Err(Error::Invalid("L1 table is too small".into()));
        }
        let l1_bytes = header.l1_size as u64 * 8;
        if header.l1_size > 0 && !region_ok(header.l1_table_offset, l1_bytes, cs, file_len) {
            return Err(Error::Invalid("Active L1 table offset invalid".into()));
        }

        // The fixed metadata areas may not overlap each other or the header.
        let mut areas = vec![
            ("header", 0, cs),
            ("refcount table", header.refcount_table_offset, rt_bytes),
        ];
        if l1_bytes > 0 {
            areas.push(("active L1 table", header.l1_table_offset, l1_bytes));
        }
        if snap_table.1 > 0 {
            areas.push(("snapshot table", snap_table.0, snap_table.1));
        }
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                if a.1 < b.1 + b.2 && b.1 < a.1 + a.2 {
                    return Err(Error::Invalid(format!(
                        "The {} overlaps with the {}",
                        b.0, a.0
                    )));
                }
            }
        }

        let (encryption, cipher) = open_encryption(&*file, &header, file_len, opts)?;

        let lazy = opts
            .lazy_refcounts
            .unwrap_or(header.compatible_features & COMPAT_LAZY_REFCOUNTS != 0);
        if lazy && header.version < 3 {
            return Err(Error::Invalid(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                    .into(),
            ));
        }

        file.debug_event(crate::storage::DebugEvent::ReftableLoad);
        let reftable = read_table(
            &*file,
            header.refcount_table_offset,
            rt_bytes / 8,
            "refcount table",
        )?;
        let l1 = if header.l1_size > 0 {
            read_table(
                &*file,
                header.l1_table_offset,
                header.l1_size as u64,
                "L1 table",
            )?
        } else {
            Vec::new()
        };

        let l2_cache_bytes = opts
            .l2_cache_size
            .unwrap_or_else(|| (header.size.div_ceil(l2_span) * cs).min(DEFAULT_L2_CACHE_MAX));
        let rb_cache_bytes = opts.refcount_cache_size.unwrap_or(DEFAULT_REFCOUNT_CACHE);
        let rw = RefcountWidth {
            order: header.refcount_order,
        };
        let backing = match (&header.backing_file, opts.no_backing) {
            (Some(b), false) => Some(open_backing(
                path,
                b,
                opts.backing_format
                    .as_deref()
                    .or(header.backing_format.as_deref()),
                opts.chain_depth,
                opts,
            )?),
            _ => None,
        };

        let size = header.size;
        let version = header.version;
        let compression_type = header.compression_type;
        let corrupt = header.incompatible_features & INCOMPAT_CORRUPT != 0;
        let dirty = header.incompatible_features & INCOMPAT_DIRTY != 0;
        let clear_autoclear = opts.writable && header.autoclear_features & !AUTOCLEAR_KNOWN != 0;
        if clear_autoclear {
            header.autoclear_features &= AUTOCLEAR_KNOWN;
        }
        let mut meta = Meta {
            file: file.clone(),
            data_file: data.as_ref().map(|d| d.storage.clone()),
            name: name.clone(),
            header,
            cb,
            cs,
            l2_bits: l2_bits(cb, ext_l2),
            ext_l2,
            rw,
            rb_bits: cb + 3 - rw.order,
            l1,
            l1_dirty: BTreeSet::new(),
            reftable,
            l2_cache: TableCache::new((l2_cache_bytes / cs) as usize),
            rb_cache: TableCache::new((rb_cache_bytes / cs).max(4) as usize),
            free_cluster_index: 0,
            pending_unref: Vec::new(),
            frees_pending: false,
            allocs_since_flush: 0,
            flush_follows_writes: false,
            metadata: HashMap::new(),
            lazy,
            writable: opts.writable,
            corrupt: corrupt && opts.writable,
            inflight: HashSet::new(),
            reftable_moves: 0,
            unordered_open: false,
            free_byte_offset: 0,
            durable_end: file_len,
            written_end: file_len,
            extended_from: None,
            data_sync_needed: false,
            snapshots,
            snapshot_table: snap_table,
            invalid_inactive_l1: Vec::new(),
            check_inactive_l2: opts.overlap_check_inactive_l2,
            inactive_l2: HashSet::new(),
            snapshot_issues: snap_issues,
        };
        meta.rebuild_metadata_map();
        // Validated on every open; held in memory (and tracked) only by a
        // read-write session on an image not marked corrupt.
        let track_bitmaps = opts.writable && !meta.corrupt;
        let bitmaps = bitmaps::load(&mut meta, size, track_bitmaps)?;
        if clear_autoclear || drop_bitmaps {
            meta.write_header()?;
        }
        let img = Qcow2 {
            meta: Mutex::new(meta),
            cond: Condvar::new(),
            file,
            data,
            path: path.to_path_buf(),
            name,
            backing,
            cb,
            cs,
            ext_l2,
            size: AtomicU64::new(size),
            file_end: AtomicU64::new(file_len),
            compression_type,
            encryption,
            cipher,
            version,
            writable: opts.writable,
            writethrough: opts.writethrough,
            closed: AtomicBool::new(!opts.writable),
            flushes: Default::default(),
            flush_done: Condvar::new(),
            bitmaps: Default::default(),
        };
        if dirty && opts.writable && !opts.check_mode {
            // Lazy refcounts left the image dirty: repair before first use,
            // as QEMU does, then mark it clean.
            let mut log = |l: &str| crate::log::warn(l);
            let r = img.check(FIX_ERRORS | FIX_LEAKS, &mut log);
            match r {
                Ok(res) if res.check_errors == 0 && res.corruptions == 0 => {}
                Ok(_) => {
                    return Err(Error::Corrupt(
                        "Could not repair dirty image: Input/output error".into(),
                    ))
                }
                Err(e) => return Err(Error::Corrupt(format!("Could not repair dirty image: {e}"))),
            }
        }
        if track_bitmaps {
            let mut bitmaps = bitmaps;
            let mut m = img.lock();
            bitmaps.mark_in_use(&mut m)?;
            drop(m);
            *img.bitmaps_lock() = bitmaps;
        }
        Ok(img)
    }
}

/// Bytes of a snapshot table entry without its extra data, ID and name.
const SNAPSHOT_HEADER_LEN: u64 = 40;

/// QEMU's BDRV_MAX_LENGTH: its block layer fails a request that reaches
/// past it with EIO.
const MAX_REQUEST_END: u64 = 0x7fff_ffff_c000_0000;

/// Reads and decodes the snapshot table. The storage reads zeros past the
/// end of the file, as QEMU does, so a table that runs past it opens
/// (each missing entry empty, what QEMU lists); `qemu-img check` reports
/// it. Reads go through a window that starts at a typical entry size and
/// then moves on in 1 MiB steps, so a small table costs one small read and
/// a large one never a buffer of its whole span; an entry reaching past the largest offset QEMU reads fails as
/// QEMU's read of it does.
fn read_snapshot_table(
    file: &dyn Storage,
    off: u64,
    nb: u32,
    disk_size: u64,
    lenient: bool,
) -> Result<snapshot::Parsed> {
    const STEP: usize = 1 << 20;
    let mut window: (u64, Vec<u8>) = (0, Vec::new());
    let first = (nb as usize * 128).clamp(4096, STEP);
    let mut read = |at: u64, len: usize| -> Result<Vec<u8>> {
        let (start, buf) = &window;
        if at >= *start && at + len as u64 <= *start + buf.len() as u64 {
            let i = (at - start) as usize;
            return Ok(buf[i..i + len].to_vec());
        }
        // Onwards from the window: a full step. A jump (an entry past a
        // huge skipped extra data area, check mode only) reads little, so
        // a hostile table costs pages, not a step per entry.
        let onwards = at >= *start && at <= *start + buf.len() as u64;
        let want = if buf.is_empty() {
            first
        } else if onwards {
            STEP
        } else {
            4096
        };
        let size = len.max(want);
        let pos = off
            .checked_add(at)
            .filter(|p| p.saturating_add(len as u64) <= MAX_REQUEST_END);
        let Some(pos) = pos else {
            return Err(Error::io(
                "Failed to read snapshot table",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        };
        let mut buf = vec![0u8; (size as u64).min(MAX_REQUEST_END - pos) as usize];
        file.read_at(&mut buf, pos)
            .map_err(|e| Error::io("Failed to read snapshot table", e))?;
        let out = buf[..len].to_vec();
        window = (at, buf);
        Ok(out)
    };
    snapshot::parse_table(&mut read, nb, disk_size, lenient)
}

/// The header and its extensions live in the first cluster. Its size is in
/// the header itself, so read one page, then the rest of the cluster only
/// if it is larger: opening a 64 KiB-cluster image used to read 2 MiB (the
/// largest cluster size) where 64 KiB do, which is most of an open's I/O.
fn read_header_cluster(file: &dyn Storage, file_len: u64) -> Result<Vec<u8>> {
    const PAGE: u64 = 4096;
    let read = |len: u64| {
        let mut buf = vec![0u8; len as usize];
        file.read_at(&mut buf, 0)
            .map_err(|e| Error::io("Could not read qcow2 header", e))?;
        Ok::<_, Error>(buf)
    };
    let head = read(file_len.min(PAGE))?;
    let bits = head
        .get(20..24)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    // Out-of-range cluster bits: the page is enough for Header::parse to
    // name the error.
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) || (1u64 << bits) <= PAGE {
        return Ok(head);
    }
    read(file_len.min(1 << bits))
}
