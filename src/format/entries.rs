//! L1 entries, standard L2 entries, compressed-cluster descriptors and
//! refcount-block entries of any width from 1 to 64 bits.

use super::OFFSET_MASK;

pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO: u64 = 1;
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// A decoded active-L1 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    pub fn l2_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }
    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }
}

/// What one standard (64-bit) L2 entry says about its guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Never written here: read from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `host` keeps a preallocated cluster (or 0).
    Zero { host: u64, copied: bool },
    /// Plain data at a cluster-aligned host offset.
    Normal { host: u64, copied: bool },
    /// Compressed data: `offset` is a byte offset, `len` a byte count that
    /// covers the whole compressed stream (whole 512-byte sectors).
    Compressed { offset: u64, len: u64 },
}

impl L2Entry {
    /// Decodes a raw entry. `cluster_bits` sizes the compressed descriptor.
    pub fn decode(raw: u64, cluster_bits: u32) -> L2Entry {
        if raw & COMPRESSED != 0 {
            let shift = 62 - (cluster_bits - 8);
            let mask = (1u64 << (cluster_bits - 8)) - 1;
            let offset = raw & ((1u64 << shift) - 1);
            let sectors = ((raw >> shift) & mask) + 1;
            let len = sectors * 512 - (offset & 511);
            return L2Entry::Compressed { offset, len };
        }
        let host = raw & OFFSET_MASK;
        let copied = raw & COPIED != 0;
        if raw & ZERO != 0 {
            L2Entry::Zero { host, copied }
        } else if host == 0 {
            L2Entry::Unallocated
        } else {
            L2Entry::Normal { host, copied }
        }
    }

    /// Encodes a compressed descriptor for data at `offset` of `len` bytes.
    pub fn encode_compressed(offset: u64, len: u64, cluster_bits: u32) -> u64 {
        let shift = 62 - (cluster_bits - 8);
        let sectors = ((offset + len - 1) >> 9) - (offset >> 9);
        COMPRESSED | (sectors << shift) | offset
    }

    /// The host cluster this entry holds a reference on, if any (compressed
    /// entries may span several; see [`L2Entry::host_range`]).
    pub fn host_range(self) -> Option<(u64, u64)> {
        match self {
            L2Entry::Normal { host, .. } | L2Entry::Zero { host, .. } if host != 0 => {
                Some((host, 0))
            }
            L2Entry::Compressed { offset, len } => Some((offset & !511, len + (offset & 511))),
            _ => None,
        }
    }
}

/// The width of refcount entries, from `refcount_order`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefcountWidth {
    pub order: u32,
}

impl RefcountWidth {
    pub fn bits(self) -> u32 {
        1 << self.order
    }
    pub fn max(self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }
    /// Entries in one refcount block of `cluster_size` bytes.
    pub fn per_block(self, cluster_bits: u32) -> u64 {
        1u64 << (cluster_bits + 3 - self.order)
    }
    pub fn get(self, block: &[u8], index: u64) -> u64 {
        let i = index as usize;
        match self.order {
            0..=2 => {
                let bits = self.bits() as usize;
                let bit = i * bits;
                let byte = block[bit / 8];
                ((byte >> (bit % 8)) as u64) & ((1u64 << bits) - 1)
            }
            3 => block[i] as u64,
            4 => u16::from_be_bytes([block[2 * i], block[2 * i + 1]]) as u64,
            5 => u32::from_be_bytes(block[4 * i..4 * i + 4].try_into().unwrap()) as u64,
            _ => u64::from_be_bytes(block[8 * i..8 * i + 8].try_into().unwrap()),
        }
    }
    pub fn set(self, block: &mut [u8], index: u64, v: u64) {
        let i = index as usize;
        match self.order {
            0..=2 => {
                let bits = self.bits() as usize;
                let bit = i * bits;
                let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
                let b = &mut block[bit / 8];
                *b = (*b & !mask) | (((v as u8) << (bit % 8)) & mask);
            }
            3 => block[i] = v as u8,
            4 => block[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
            5 => block[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
            _ => block[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_entries_seen_in_real_images() {
        assert_eq!(
            L2Entry::decode(0x8000000000060000, 16),
            L2Entry::Normal {
                host: 0x60000,
                copied: true
            }
        );
        assert_eq!(
            L2Entry::decode(1, 16),
            L2Entry::Zero {
                host: 0,
                copied: false
            }
        );
        assert_eq!(L2Entry::decode(0, 16), L2Entry::Unallocated);
        match L2Entry::decode(0x400000000005004f, 16) {
            L2Entry::Compressed { offset, len } => {
                assert_eq!(offset, 0x5004f);
                assert_eq!(len, 512 - 0x4f);
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn compressed_descriptor_roundtrips() {
        for bits in 9..=21 {
            let want = (1u64 << bits) / 2 + 1;
            let raw = L2Entry::encode_compressed(0x12345, want, bits);
            match L2Entry::decode(raw, bits) {
                L2Entry::Compressed { offset, len } => {
                    assert_eq!(offset, 0x12345);
                    assert!((want..want + 512).contains(&len), "bits {bits}: {len}");
                }
                e => panic!("{e:?}"),
            }
        }
    }

    #[test]
    fn refcounts_of_every_width() {
        for order in 0..=6 {
            let w = RefcountWidth { order };
            let mut block = vec![0u8; 512];
            let n = w.per_block(9);
            for i in 0..n {
                w.set(&mut block, i, (i * 7) & w.max());
            }
            for i in 0..n {
                assert_eq!(w.get(&block, i), (i * 7) & w.max(), "order {order} i {i}");
            }
        }
    }
}
