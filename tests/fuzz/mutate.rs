//! Field-aware mutation of qcow2 images: the seed is parsed once into
//! "sites" (header fields, L1/L2/refcount entries, snapshot-table fields,
//! header-extension headers, bitmap directory fields and tables, the LUKS
//! pointer), and each mutant sets a few of them to values that break
//! something (0, 1, all ones, unaligned, flag bits, past the end of the
//! file, into other metadata), plus byte flips, zeroed tables and
//! truncation.

use super::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Header,
    L1,
    L2,
    RefTable,
    RefBlock,
    Snapshot,
    SnapL1,
    Extension,
    BitmapDir,
    BitmapTable,
    Crypto,
}

#[derive(Clone, Copy, Debug)]
pub struct Site {
    pub off: usize,
    /// Bytes (1, 2, 4 or 8).
    pub width: usize,
    pub kind: Kind,
}

/// What a seed looks like on disk.
pub struct Layout {
    pub sites: Vec<Site>,
    /// Metadata ranges (offset, length).
    pub meta: Vec<(usize, usize)>,
    pub cluster: u64,
    pub len: usize,
}

fn get(b: &[u8], off: usize, w: usize) -> u64 {
    match b.get(off..off + w) {
        Some(s) => s.iter().fold(0u64, |a, &x| (a << 8) | x as u64),
        None => 0,
    }
}

fn put(b: &mut [u8], off: usize, w: usize, v: u64) {
    if let Some(s) = b.get_mut(off..off + w) {
        for (i, x) in s.iter_mut().enumerate() {
            *x = (v >> (8 * (w - 1 - i))) as u8;
        }
    }
}

const OFF_MASK: u64 = 0x00ff_ffff_ffff_fe00;

impl Layout {
    pub fn parse(b: &[u8]) -> Layout {
        let mut l = Layout {
            sites: vec![],
            meta: vec![],
            cluster: 1 << get(b, 20, 4).min(21),
            len: b.len(),
        };
        let c = l.cluster as usize;
        let version = get(b, 4, 4);
        let hdr_len = if version >= 3 {
            get(b, 100, 4) as usize
        } else {
            72
        };
        let mut fields = vec![
            (0, 4),
            (4, 4),
            (8, 8),
            (16, 4),
            (20, 4),
            (24, 8),
            (32, 4),
            (36, 4),
            (40, 8),
            (48, 8),
            (56, 4),
            (60, 4),
            (64, 8),
        ];
        if version >= 3 {
            fields.extend([(72, 8), (80, 8), (88, 8), (96, 4), (100, 4)]);
            if hdr_len > 104 {
                fields.push((104, 1));
            }
        }
        for (off, width) in fields {
            l.site(off, width, Kind::Header);
        }
        l.meta.push((0, c));
        let ext_l2 = version >= 3 && get(b, 72, 8) & 16 != 0;
        let l2_entry = if ext_l2 { 16 } else { 8 };
        // Active L1 and its L2 tables.
        let (l1_off, l1_size) = (get(b, 40, 8) as usize, get(b, 36, 4) as usize);
        l.table(b, l1_off, l1_size, l2_entry, Kind::L1);
        // Refcount table and blocks.
        let rt_off = get(b, 48, 8) as usize;
        let rt_len = get(b, 56, 4) as usize * c;
        l.meta.push((rt_off, rt_len));
        let order = if version >= 3 { get(b, 96, 4) } else { 4 };
        let rc_bytes = ((1usize << order) / 8).max(1);
        let used_clusters = b.len().div_ceil(c);
        for i in 0..rt_len / 8 {
            let e = get(b, rt_off + 8 * i, 8);
            if e == 0 && i > 0 {
                continue;
            }
            l.site(rt_off + 8 * i, 8, Kind::RefTable);
            let rb = (e & !0x1ff) as usize;
            if rb == 0 || rb >= b.len() {
                continue;
            }
            l.meta.push((rb, c));
            let per_block_bytes = c;
            let n = (used_clusters * rc_bytes).min(per_block_bytes) / rc_bytes;
            for j in 0..n.max(1) {
                l.site(rb + j * rc_bytes, rc_bytes, Kind::RefBlock);
            }
        }
        // Snapshot table.
        let (nb, mut so) = (get(b, 60, 4) as usize, get(b, 64, 8) as usize);
        let start = so;
        for _ in 0..nb.min(64) {
            if so + 40 > b.len() {
                break;
            }
            for (o, w) in [(0, 8), (8, 4), (12, 2), (14, 2), (32, 4), (36, 4)] {
                l.site(so + o, w, Kind::Snapshot);
            }
            let extra = get(b, so + 36, 4) as usize;
            for k in 0..(extra / 8).min(3) {
                l.site(so + 40 + 8 * k, 8, Kind::Snapshot);
            }
            let (sl1, sl1n) = (get(b, so, 8) as usize, get(b, so + 8, 4) as usize);
            l.table(b, sl1, sl1n, l2_entry, Kind::SnapL1);
            let len = 40 + extra + get(b, so + 12, 2) as usize + get(b, so + 14, 2) as usize;
            so += len.div_ceil(8) * 8;
        }
        if nb > 0 {
            l.meta.push((start, so - start));
        }
        // Header extensions.
        let mut off = hdr_len;
        while off + 8 <= c.min(b.len()) {
            let (ty, len) = (get(b, off, 4), get(b, off + 4, 4) as usize);
            l.site(off, 4, Kind::Extension);
            l.site(off + 4, 4, Kind::Extension);
            if ty == 0 {
                break;
            }
            let data = off + 8;
            match ty {
                0x2385_2875 => l.bitmaps(b, data),
                0x0537_be77 => {
                    l.site(data, 8, Kind::Crypto);
                    l.site(data + 8, 8, Kind::Crypto);
                    let co = get(b, data, 8) as usize;
                    l.meta.push((co, get(b, data + 8, 8) as usize));
                    l.luks(co);
                }
                _ => {}
            }
            off = data + len.div_ceil(8) * 8;
        }
        l.meta.retain(|&(o, n)| n > 0 && o < b.len());
        l
    }

    fn site(&mut self, off: usize, width: usize, kind: Kind) {
        if off + width <= self.len {
            self.sites.push(Site { off, width, kind });
        }
    }

    /// An L1 table and the L2 tables it points to.
    fn table(&mut self, b: &[u8], l1_off: usize, l1_size: usize, l2_entry: usize, kind: Kind) {
        let c = self.cluster as usize;
        if l1_off >= b.len() {
            return;
        }
        self.meta.push((l1_off, l1_size * 8));
        for i in 0..l1_size.min(4096) {
            let e = get(b, l1_off + 8 * i, 8);
            if e == 0 && i > 2 {
                continue;
            }
            self.site(l1_off + 8 * i, 8, kind);
            let l2 = (e & OFF_MASK) as usize;
            if l2 == 0 || l2 >= b.len() {
                continue;
            }
            self.meta.push((l2, c));
            for j in 0..c / l2_entry {
                let at = l2 + j * l2_entry;
                if get(b, at, 8) != 0 || j < 2 {
                    self.site(at, 8, Kind::L2);
                    if l2_entry == 16 {
                        self.site(at + 8, 8, Kind::L2);
                    }
                }
            }
        }
    }

    /// The LUKS1 header's fields, except the PBKDF2 iteration counts:
    /// those are the work factor an image chooses (QEMU, too, spends as
    /// long as they say), so a huge one is a slow open, not a bug.
    fn luks(&mut self, co: usize) {
        for (o, w) in [(6, 2), (8, 8), (40, 8), (72, 8), (104, 4), (108, 4)] {
            self.site(co + o, w, Kind::Crypto);
        }
        for k in 0..8 {
            let slot = co + 208 + 48 * k;
            for o in [0, 40, 44] {
                self.site(slot + o, 4, Kind::Crypto);
            }
        }
    }

    fn bitmaps(&mut self, b: &[u8], data: usize) {
        self.site(data, 4, Kind::BitmapDir);
        self.site(data + 8, 8, Kind::BitmapDir);
        self.site(data + 16, 8, Kind::BitmapDir);
        let (n, size, mut d) = (
            get(b, data, 4) as usize,
            get(b, data + 8, 8) as usize,
            get(b, data + 16, 8) as usize,
        );
        self.meta.push((d, size));
        for _ in 0..n.min(64) {
            if d + 24 > b.len() {
                break;
            }
            for (o, w) in [(0, 8), (8, 4), (12, 4), (16, 1), (17, 1), (18, 2), (20, 4)] {
                self.site(d + o, w, Kind::BitmapDir);
            }
            let (t, tn) = (get(b, d, 8) as usize, get(b, d + 8, 4) as usize);
            self.meta.push((t, tn * 8));
            for k in 0..tn.min(512) {
                self.site(t + 8 * k, 8, Kind::BitmapTable);
                let e = get(b, t + 8 * k, 8) as usize & !0x1ff;
                if e > 1 && e < b.len() {
                    self.meta.push((e, self.cluster as usize));
                }
            }
            let len = 24 + get(b, d + 20, 4) as usize + get(b, d + 18, 2) as usize;
            d += len.div_ceil(8) * 8;
        }
    }

    /// A value for a site that is likely to break something.
    fn value(&self, rng: &mut Rng, site: &Site, orig: u64) -> u64 {
        let bits = site.width as u32 * 8;
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let c = self.cluster;
        let flags = orig & 0xc000_0000_0000_0001;
        let eof = (self.len as u64).div_ceil(c) * c;
        let v = match rng.below(14) {
            0 => 0,
            1 => 1,
            2 => u64::MAX,
            3 => orig.wrapping_add(1 + rng.below(511)),
            4 => orig ^ (1 << rng.below(bits as u64)),
            5 => orig ^ (1 << (56 + rng.below(8))),
            6 => orig ^ (1 << (1 + rng.below(8))),
            7 => (eof + c * rng.below(16)) | flags,
            8 => (1u64 << (30 + rng.below(30))) | flags,
            9 => {
                let (o, n) = self.meta[rng.below(self.meta.len() as u64) as usize];
                let inside = if rng.below(2) == 0 {
                    0
                } else {
                    rng.below(n as u64) & !7
                };
                (o as u64 + inside) | flags
            }
            10 => orig.wrapping_add(c),
            11 => orig.wrapping_sub(c),
            12 => orig.wrapping_mul(2 + rng.below(1000)),
            _ => rng.next(),
        };
        v & mask
    }

    /// Applies 1–3 mutations; returns what was done.
    pub fn mutate(&self, b: &mut Vec<u8>, rng: &mut Rng) -> String {
        let mut what = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let r = rng.below(100);
            if r < 60 && !self.sites.is_empty() {
                // Pick a kind first so that rare structures get their share.
                let mut kinds: Vec<Kind> = self.sites.iter().map(|s| s.kind).collect();
                kinds.dedup();
                kinds.sort_by_key(|k| *k as u8);
                kinds.dedup();
                let k = kinds[rng.below(kinds.len() as u64) as usize];
                let of: Vec<&Site> = self.sites.iter().filter(|s| s.kind == k).collect();
                let site = *of[rng.below(of.len() as u64) as usize];
                let orig = get(b, site.off, site.width);
                let v = self.value(rng, &site, orig);
                put(b, site.off, site.width, v);
                what.push(format!(
                    "{:?}@{:#x}/{}={:#x}",
                    site.kind, site.off, site.width, v
                ));
            } else if r < 78 && !self.meta.is_empty() {
                let (o, n) = self.meta[rng.below(self.meta.len() as u64) as usize];
                let flips = 1 + rng.below(8);
                for _ in 0..flips {
                    let i = o + rng.below(n.max(1) as u64) as usize;
                    if i < b.len() {
                        b[i] ^= (1 + rng.below(255)) as u8;
                    }
                }
                what.push(format!("flip{flips}@{o:#x}+{n:#x}"));
            } else if r < 86 {
                let cut = match rng.below(4) {
                    0 => rng.below(512) as usize,
                    1 => {
                        let (o, n) = self.meta[rng.below(self.meta.len() as u64) as usize];
                        o + rng.below(n as u64 + 1) as usize
                    }
                    2 => (rng.below(b.len() as u64 / self.cluster + 1) * self.cluster) as usize,
                    _ => rng.below(b.len() as u64) as usize,
                };
                b.truncate(cut);
                what.push(format!("truncate@{cut:#x}"));
            } else if r < 93 && !self.meta.is_empty() {
                let (o, n) = self.meta[rng.below(self.meta.len() as u64) as usize];
                let fill = [0u8, 0xff][rng.below(2) as usize];
                let end = (o + n).min(b.len());
                if o < end {
                    b[o..end].fill(fill);
                }
                what.push(format!("fill{fill:#x}@{o:#x}+{n:#x}"));
            } else {
                let i = rng.below(b.len().max(1) as u64) as usize;
                if i < b.len() {
                    b[i] ^= (1 + rng.below(255)) as u8;
                }
                what.push(format!("flip@{i:#x}"));
            }
        }
        what.join(" ")
    }
}
