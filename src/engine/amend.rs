//! `amend`: change an existing image's compat level, lazy refcounts,
//! refcount width, size and external data file name, in QEMU's order
//! (upgrade first, then the refcount width, the raw-data bit and the data
//! file name in the header, lazy refcounts, the size, and a downgrade
//! last) and with QEMU's refusals.

use super::check::FIX_LEAKS;
use super::create::parse_size;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::entries::{L2Entry, COPIED};
use crate::format::header::V3_HEADER_LEN;
use crate::format::*;
use std::sync::atomic::Ordering;

/// The options `qemu-img amend -o` accepts for qcow2.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AmendOptions {
    pub version: Option<u32>,
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: Option<u64>,
    pub size: Option<u64>,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
    /// New name of the external data file ("" drops the name).
    pub data_file: Option<String>,
    /// `off` clears "raw external data"; `on` only where it is set.
    pub data_file_raw: Option<bool>,
}

const CREATION_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "encryption",
    "encrypt.format",
    "compression_type",
    "extended_l2",
];

impl AmendOptions {
    /// Parses a qemu-img `-o` string.
    pub fn parse(opts: &str) -> Result<AmendOptions> {
        let mut a = AmendOptions::default();
        for item in opts.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').unwrap_or((item, "on"));
            let bad =
                |what: &str| Error::InvalidArgument(format!("Parameter '{k}' expects {what}"));
            match k {
                "compat" => {
                    a.version = Some(match v {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => {
                            return Err(Error::InvalidArgument(format!(
                                "Unknown compatibility level {v}"
                            )))
                        }
                    })
                }
                "lazy_refcounts" | "data_file_raw" => {
                    let b = match v {
                        "on" | "true" => true,
                        "off" | "false" => false,
                        _ => return Err(bad("'on' or 'off'")),
                    };
                    if k == "lazy_refcounts" {
                        a.lazy_refcounts = Some(b);
                    } else {
                        a.data_file_raw = Some(b);
                    }
                }
                "data_file" => a.data_file = Some(v.to_string()),
                "refcount_bits" => a.refcount_bits = Some(v.parse().map_err(|_| bad("a number"))?),
                "size" => a.size = Some(parse_size(v)?),
                "backing_file" => a.backing_file = Some(v.to_string()),
                "backing_fmt" => a.backing_fmt = Some(v.to_string()),
                k if CREATION_ONLY.contains(&k) => {
                    return Err(Error::InvalidArgument(format!(
                        "Invalid parameter '{k}'\nThis option is only supported for image creation"
                    )))
                }
                _ => return Err(Error::InvalidArgument(format!("Invalid parameter '{k}'"))),
            }
        }
        Ok(a)
    }
}

impl Qcow2 {
    /// Applies `qemu-img amend` options to an open, writable image.
    pub fn amend(&self, o: &AmendOptions) -> Result<()> {
        self.amend_with_progress(o, &mut |_, _| {})
    }

    /// As [`Qcow2::amend`], reporting `progress(done, total)` as it goes,
    /// as qemu-img amend's job does: a downgrade's zero-cluster expansion
    /// reports each L1 entry of every tree (the active one, then each
    /// snapshot's); anything else reports once, at its end.
    pub fn amend_with_progress(
        &self,
        o: &AmendOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let hdr = self.header();
        let cur_version = hdr.version;
        let new_version = o.version.unwrap_or(cur_version);
        let cur_bits = 1u64 << hdr.refcount_order;
        let new_bits = o.refcount_bits.unwrap_or(cur_bits);
        let lazy_now = hdr.compatible_features & COMPAT_LAZY_REFCOUNTS != 0;
        if let Some(b) = &o.backing_file {
            if Some(b) != hdr.backing_file.as_ref() {
                return Err(Error::InvalidArgument(
                    "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into(),
                ));
            }
        }
        if let Some(f) = &o.backing_fmt {
            if Some(f) != hdr.backing_format.as_ref() {
                return Err(Error::InvalidArgument(
                    "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into(),
                ));
            }
        }
        let has_data_file = hdr.incompatible_features & INCOMPAT_DATA_FILE != 0;
        let raw_now = hdr.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0;
        if o.data_file.is_some() && !has_data_file {
            return Err(Error::InvalidArgument(
                "data-file can only be set for images that use an external data file".into(),
            ));
        }
        if o.data_file_raw == Some(true) && !raw_now {
            return Err(Error::InvalidArgument(
                "data-file-raw cannot be set on existing images".into(),
            ));
        }
        if o.lazy_refcounts == Some(true) && new_version < 3 {
            return Err(Error::InvalidArgument(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into(),
            ));
        }
        if !new_bits.is_power_of_two() || new_bits > 64 {
            return Err(Error::InvalidArgument(
                "Refcount width must be a power of two and may not exceed 64 bits".into(),
            ));
        }
        if new_version < 3 && new_bits != 16 {
            return Err(Error::InvalidArgument(if o.refcount_bits.is_some() {
                "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into()
            } else {
                "compat=0.10 requires refcount_bits=16".into()
            }));
        }
        if new_version < 3 && super::bitmaps::active_ext(&hdr).is_some() {
            // v2 has no autoclear bits: QEMU 10 downgrades anyway and the
            // bitmaps are lost (inconsistent) at the next open; refuse
            // instead of losing them silently.
            return Err(Error::Unsupported(
                "Cannot downgrade an image with persistent dirty bitmaps (remove them with 'qemu-img bitmap --remove' first)".into(),
            ));
        }
        {
            let m = self.lock();
            m.ensure_writable()?;
        }
        // The operations that report progress, as qemu-img's amend counts
        // them: a version change (either way) and a width change.
        let mut ops = OpsProgress::new(
            (new_version != cur_version) as u64 + (new_bits != cur_bits) as u64,
            progress,
        );
        if new_version > cur_version {
            ops.next();
            ops.report(0, 2);
            let mut m = self.quiesce();
            m.flush_all()?;
            // v3 needs every snapshot's 64-bit VM state size and disk
            // size; a rewrite stores them (as QEMU, only when one lacks them).
            if m.snapshots.iter().any(|s| s.extra_size < 16) {
                let list = m.snapshots.clone();
                m.write_snapshot_table(list)?;
            }
            ops.report(1, 2);
            m.header.version = 3;
            m.header.header_length = V3_HEADER_LEN as u32;
            m.write_header()?;
            ops.report(2, 2);
        }
        if new_bits != cur_bits {
            ops.next();
            self.change_refcount_width(new_bits.trailing_zeros(), &mut |d, t| ops.report(d, t))?;
        }
        let new_name = o
            .data_file
            .as_ref()
            .map(|n| Some(n.clone()).filter(|n| !n.is_empty()));
        let clear_raw = o.data_file_raw == Some(false) && raw_now;
        if clear_raw || new_name.as_ref().is_some_and(|n| *n != hdr.data_file) {
            let mut m = self.quiesce();
            m.flush_all()?;
            if clear_raw {
                m.header.autoclear_features &= !AUTOCLEAR_DATA_FILE_RAW;
            }
            if let Some(n) = new_name {
                m.header.data_file = n;
            }
            m.write_header()?;
        }
        if let Some(lazy) = o.lazy_refcounts {
            if lazy != lazy_now {
                let mut m = self.quiesce();
                m.flush_all()?;
                if lazy {
                    m.header.compatible_features |= COMPAT_LAZY_REFCOUNTS;
                } else {
                    m.header.compatible_features &= !COMPAT_LAZY_REFCOUNTS;
                    m.header.incompatible_features &= !INCOMPAT_DIRTY;
                }
                m.lazy = lazy;
                m.write_header()?;
            }
        }
        if let Some(size) = o.size {
            if size != self.size() {
                self.resize(size)?;
            }
        }
        if new_version < cur_version {
            ops.next();
            self.downgrade(&mut |d, t| ops.report(d, t))?;
        }
        Ok(())
    }

    fn downgrade(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        {
            let m = self.lock();
            // As QEMU: snapshots of another disk size, or with VM state
            // that needs the 64-bit field, cannot be described by v2.
            let size = m.header.size;
            let bad = m.snapshots.iter().any(|s| {
                s.disk_size.is_some_and(|d| d != size) || s.vm_state_size > u32::MAX as u64
            });
            if bad {
                return Err(Error::Unsupported(
                    "Internal snapshots prevent downgrade of image".into(),
                ));
            }
            let h = &m.header;
            if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
                return Err(Error::Unsupported(
                    "Cannot downgrade an image with a data file".into(),
                ));
            }
            let other = h.incompatible_features & !INCOMPAT_DIRTY;
            if other != 0 {
                return Err(Error::Unsupported(format!(
                    "Cannot downgrade an image with incompatible features {other:#x} set"
                )));
            }
        }
        self.expand_zero_clusters(progress)?;
        let mut m = self.quiesce();
        m.flush_all()?;
        m.header.version = 2;
        m.header.incompatible_features = 0;
        m.header.compatible_features = 0;
        m.header.autoclear_features = 0;
        m.header.header_length = 72;
        m.header.unknown_header_fields.clear();
        m.lazy = false;
        m.write_header()
    }

    /// v2 has no zero flag: in the active tree and in every snapshot's,
    /// zero clusters become data clusters of zeros, or unallocated clusters
    /// when nothing lies beneath them (QEMU's expansion). Tables are edited
    /// in place on disk: an L2 table shared by several trees changes for
    /// all of them, which is right because every one of them reads zeros
    /// there before and after; a new cluster then gets one reference per
    /// tree that shares the table.
    fn expand_zero_clusters(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let mut m = self.quiesce();
        m.flush_all()?;
        m.l2_cache = super::cache::TableCache::new(m.l2_cache.capacity());
        let cs = self.cs;
        let mut trees: Vec<Vec<u64>> = vec![m.l1.clone()];
        for sn in m.snapshots.clone() {
            sn.check_l1(cs)?;
            trees.push(m.read_table(
                sn.l1_table_offset,
                sn.l1_size as u64 * 8,
                "read snapshot L1 table",
            )?);
        }
        let zeros = vec![0u8; cs as usize];
        let total = trees.iter().map(|t| t.len() as u64).sum::<u64>();
        let mut done = 0;
        for l1 in trees {
            for (i, e) in l1.into_iter().enumerate() {
                if done > 0 {
                    progress(done, total);
                }
                done += 1;
                let l2_off = e & OFFSET_MASK;
                if l2_off == 0 {
                    continue;
                }
                let sharers = m.refcount(l2_off / cs)?;
                let mut t = vec![0u8; cs as usize];
                m.read_file(&mut t, l2_off, "read L2 table")?;
                let mut changed = false;
                for j in 0..(cs / 8) as usize {
                    let raw = be64(&t, j * 8);
                    let L2Entry::Zero { host, .. } = m.decode(raw) else {
                        continue;
                    };
                    let guest = ((i as u64) << (m.l2_bits + self.cb)) + ((j as u64) << self.cb);
                    // On an encrypted image zeros are stored encrypted.
                    let zeros_at = |host: u64| self.stored_form(&zeros, host, guest);
                    let new = if host != 0 {
                        m.check_overlap(host, cs)?;
                        m.write_file(&zeros_at(host), host, "write zeros")?;
                        host
                    } else if self.backing.is_none() {
                        0
                    } else {
                        let new = m.alloc_clusters(1)?;
                        if sharers > 1 {
                            m.update_refcount(new, cs, sharers as i64 - 1)?;
                        }
                        m.check_overlap(new, cs)?;
                        m.write_file(&zeros_at(new), new, "write zeros")?;
                        // A data cluster written outside the guest write
                        // path: guest reads of this session check data
                        // offsets against `file_end`, which must cover it.
                        self.file_end.fetch_max(new + cs, Ordering::AcqRel);
                        new
                    };
                    let copied = new != 0 && m.refcount(new / cs)? == 1;
                    put64(&mut t, j * 8, if copied { new | COPIED } else { new });
                    changed = true;
                }
                if changed {
                    // Data and refcounts first, then the table that maps them.
                    m.flush_all()?;
                    m.write_file(&t, l2_off, "write L2 table")?;
                    m.sync()?;
                }
            }
        }
        progress(total.max(1), total.max(1));
        Ok(())
    }

    /// Rewrites the refcount structure with entries of a new width.
    fn change_refcount_width(&self, order: u32, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let mut lines = Vec::new();
        let before = {
            let mut m = self.quiesce();
            m.flush_all()?;
            m.set_refcount_order_rebuilding(order, progress)?
        };
        // The old structure is now leaked: give it back (only that: other
        // disagreements stay for `check -r`, as in QEMU).
        let res = self.check(FIX_LEAKS, &mut |l: &str| lines.push(l.to_string()))?;
        if res.corruptions > before || res.check_errors > 0 {
            return Err(Error::Corrupt(format!(
                "{}: refcount width change left the image inconsistent: {}",
                self.name,
                lines.join("; ")
            )));
        }
        Ok(())
    }
}

/// Progress over several amend operations as qemu-img shows it: each
/// operation reports against its own total; the work of the operations not
/// started yet is projected from what the finished ones and the current
/// one took, so the percentage can step back when an operation turns out
/// larger than projected (QEMU's amend helper does the same).
struct OpsProgress<'a> {
    report: &'a mut dyn FnMut(u64, u64),
    total_ops: u64,
    /// Operations begun (the current one's number).
    begun: u64,
    /// The operation that reported last, and its total.
    last: Option<(u64, u64)>,
    /// Operations finished, and the work they took.
    done_ops: u64,
    offset_done: u64,
}

impl<'a> OpsProgress<'a> {
    fn new(total_ops: u64, report: &'a mut dyn FnMut(u64, u64)) -> OpsProgress<'a> {
        OpsProgress {
            report,
            total_ops,
            begun: 0,
            last: None,
            done_ops: 0,
            offset_done: 0,
        }
    }

    /// Starts the next operation.
    fn next(&mut self) {
        self.begun += 1;
    }

    fn report(&mut self, done: u64, size: u64) {
        // The first report of an operation closes the one that reported
        // before it.
        if let Some((op, last_size)) = self.last {
            if op != self.begun {
                self.offset_done += last_size;
                self.done_ops += 1;
            }
        }
        self.last = Some((self.begun, size));
        let current = self.offset_done + size;
        let left = self.total_ops.saturating_sub(self.done_ops + 1);
        let projected = current * left / (self.done_ops + 1);
        (self.report)(self.offset_done + done, (current + projected).max(1));
    }
}
