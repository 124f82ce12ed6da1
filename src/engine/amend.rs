//! `amend`: change an existing image's compat level, lazy refcounts,
//! refcount width and size, in QEMU's order (upgrade first, then the
//! refcount width, the header, lazy refcounts, the size, and a downgrade
//! last) and with QEMU's refusals.

use super::check::{FIX_ERRORS, FIX_LEAKS};
use super::create::parse_size;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::entries::{L2Entry, COPIED};
use crate::format::header::V3_HEADER_LEN;
use crate::format::*;

/// The options `qemu-img amend -o` accepts for qcow2.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AmendOptions {
    pub version: Option<u32>,
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: Option<u64>,
    pub size: Option<u64>,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
}

const CREATION_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "encryption",
    "encrypt.format",
    "compression_type",
    "extended_l2",
    "data_file",
    "data_file_raw",
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
                "lazy_refcounts" => {
                    a.lazy_refcounts = Some(match v {
                        "on" | "true" => true,
                        "off" | "false" => false,
                        _ => return Err(bad("'on' or 'off'")),
                    })
                }
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

impl super::meta::Meta {
    /// True when an (inactive) L1 tree maps any cluster with the zero flag.
    fn tree_has_zero_clusters(&mut self, l1_off: u64, l1_size: u32) -> Result<bool> {
        let mut b = vec![0u8; l1_size as usize * 8];
        self.read_file(&mut b, l1_off, "read snapshot L1 table")?;
        for e in b.chunks_exact(8) {
            let l2 = u64::from_be_bytes(e.try_into().unwrap()) & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let mut t = vec![0u8; self.cs as usize];
            self.read_file(&mut t, l2, "read L2 table")?;
            if t.chunks_exact(8).any(|x| {
                matches!(
                    self.decode(u64::from_be_bytes(x.try_into().unwrap())),
                    L2Entry::Zero { .. }
                )
            }) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl Qcow2 {
    /// Applies `qemu-img amend` options to an open, writable image.
    pub fn amend(&self, o: &AmendOptions) -> Result<()> {
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
        {
            let m = self.lock();
            m.ensure_writable()?;
        }
        if new_version > cur_version {
            let mut m = self.quiesce();
            m.flush_all()?;
            m.header.version = 3;
            m.header.header_length = V3_HEADER_LEN as u32;
            m.write_header()?;
        }
        if new_bits != cur_bits {
            self.change_refcount_width(new_bits.trailing_zeros())?;
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
            self.downgrade()?;
        }
        Ok(())
    }

    fn downgrade(&self) -> Result<()> {
        {
            let mut m = self.lock();
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
            let snaps: Vec<(u64, u32)> = m
                .snapshots
                .iter()
                .map(|s| (s.l1_table_offset, s.l1_size))
                .collect();
            for (off, n) in snaps {
                if m.tree_has_zero_clusters(off, n)? {
                    return Err(Error::Unsupported(
                        "Cannot downgrade: an internal snapshot holds zero clusters, which oxqcow cannot expand inside snapshots".into(),
                    ));
                }
            }
            let h = &m.header;
            let other = h.incompatible_features & !INCOMPAT_DIRTY;
            if other != 0 {
                return Err(Error::Unsupported(format!(
                    "Cannot downgrade an image with incompatible features {other:#x} set"
                )));
            }
        }
        self.expand_zero_clusters()?;
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

    /// v2 has no zero flag: zero clusters become data clusters of zeros, or
    /// unallocated clusters when nothing lies beneath them.
    fn expand_zero_clusters(&self) -> Result<()> {
        let cs = self.cs;
        let nclusters = self.size().div_ceil(cs);
        let zeros = vec![0u8; cs as usize];
        for gc in 0..nclusters {
            let raw = {
                let mut m = self.lock();
                m.l2_entry(gc)?
            };
            let e = L2Entry::decode(raw, self.cb);
            let L2Entry::Zero { host, copied } = e else {
                continue;
            };
            let mut m = self.quiesce();
            let l2 = m.l2_for_write(gc)?;
            if host != 0 && copied {
                m.check_overlap(host, cs)?;
                m.write_file(&zeros, host, "write zeros")?;
                m.set_l2_entry(l2, gc, host | COPIED);
            } else if self.backing.is_none() {
                m.set_l2_entry(l2, gc, 0);
                m.unref_entry(raw, false);
            } else {
                let new = m.alloc_clusters(1)?;
                m.check_overlap(new, cs)?;
                m.write_file(&zeros, new, "write zeros")?;
                m.set_l2_entry(l2, gc, new | COPIED);
                m.unref_entry(raw, false);
            }
        }
        self.flush()
    }

    /// Rewrites the refcount structure with entries of a new width.
    fn change_refcount_width(&self, order: u32) -> Result<()> {
        let mut lines = Vec::new();
        {
            let mut m = self.quiesce();
            m.flush_all()?;
            m.set_refcount_order_rebuilding(order)?;
        }
        // The old structure is now leaked: give it back.
        let res = self.check(FIX_LEAKS | FIX_ERRORS, &mut |l: &str| {
            lines.push(l.to_string())
        })?;
        if res.corruptions > 0 || res.check_errors > 0 {
            return Err(Error::Corrupt(format!(
                "{}: refcount width change left the image inconsistent: {}",
                self.name,
                lines.join("; ")
            )));
        }
        Ok(())
    }
}
