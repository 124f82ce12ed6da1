//! Extended L2 entries (incompatible feature bit 4): 128-bit entries whose
//! second word is a subcluster bitmap, and the state of each of the 32
//! subclusters of a guest cluster decoded from the pair.
//!
//! The first word keeps the standard layout (host offset, COPIED and
//! COMPRESSED flags) except that its bit 0, the standard zero flag, has no
//! meaning: "reads as zero" lives in the bitmap. Bits 0–31 of the bitmap
//! say "subcluster i holds data at host + i × subcluster size", bits 32–63
//! "subcluster i reads as zeros"; a subcluster with both bits is corrupt.
//! Compressed clusters are whole: their bitmap is not used.

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
/// Every "allocated" bit of a bitmap.
pub const ALL_ALLOC: u64 = 0xffff_ffff;
/// Every "reads as zero" bit of a bitmap.
pub const ALL_ZERO: u64 = ALL_ALLOC << 32;
/// Smallest cluster size extended L2 entries allow (QEMU's limit).
pub const MIN_CLUSTER_BITS: u32 = 14;

/// The "allocated" bits of subclusters `first..end` (end <= 32); shift
/// left by 32 for the "zero" bits.
pub fn alloc_mask(first: u32, end: u32) -> u64 {
    debug_assert!(first <= end && end <= SUBCLUSTERS);
    if first >= end {
        return 0;
    }
    (((1u64 << (end - first)) - 1) << first) & ALL_ALLOC
}

/// What one subcluster reads as, from its cluster's entry pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubclusterType {
    /// No host cluster, not allocated: the backing file (or zeros).
    UnallocatedPlain,
    /// The cluster has a host cluster but this subcluster is not
    /// allocated in it: still the backing file (or zeros).
    UnallocatedAlloc,
    /// Reads as zeros; the cluster has no host cluster.
    ZeroPlain,
    /// Reads as zeros; the cluster keeps its host cluster.
    ZeroAlloc,
    /// Data at the host cluster plus the subcluster's offset.
    Normal,
    /// The whole cluster is compressed.
    Compressed,
    /// The pair contradicts itself (see [`invalid_reason`]).
    Invalid,
}

impl SubclusterType {
    /// The subcluster reads through to the backing file.
    pub fn is_unallocated(self) -> bool {
        matches!(
            self,
            SubclusterType::UnallocatedPlain | SubclusterType::UnallocatedAlloc
        )
    }
    pub fn is_zero(self) -> bool {
        matches!(self, SubclusterType::ZeroPlain | SubclusterType::ZeroAlloc)
    }
}

/// Host offset bits of the first word (as the standard OFFSET_MASK).
fn host(raw: u64) -> u64 {
    raw & super::OFFSET_MASK
}

/// Why an entry pair is corrupt, if it is: a subcluster both allocated and
/// zero, or an allocated subcluster in a cluster without a host cluster.
pub fn invalid_reason(raw: u64, bitmap: u64) -> Option<&'static str> {
    if raw & super::entries::COMPRESSED != 0 {
        return None;
    }
    if host(raw) == 0 {
        if bitmap & ALL_ALLOC != 0 {
            return Some("allocated subclusters in an unallocated cluster");
        }
    } else if (bitmap >> 32) & bitmap != 0 {
        return Some("subclusters both allocated and zero");
    }
    None
}

/// The type of subcluster `sc` (0..32) of the cluster `raw`/`bitmap` map.
pub fn subcluster_type(raw: u64, bitmap: u64, sc: u32) -> SubclusterType {
    if raw & super::entries::COMPRESSED != 0 {
        return SubclusterType::Compressed;
    }
    if invalid_reason(raw, bitmap).is_some() {
        return SubclusterType::Invalid;
    }
    let alloc = bitmap & (1u64 << sc) != 0;
    let zero = bitmap & (1u64 << (sc + 32)) != 0;
    match (host(raw) != 0, zero, alloc) {
        (true, true, _) => SubclusterType::ZeroAlloc,
        (true, false, true) => SubclusterType::Normal,
        (true, false, false) => SubclusterType::UnallocatedAlloc,
        (false, true, _) => SubclusterType::ZeroPlain,
        (false, false, _) => SubclusterType::UnallocatedPlain,
    }
}

/// The type of subcluster `sc` and how many subclusters from it on (to the
/// end of the cluster) share it.
pub fn subcluster_run(raw: u64, bitmap: u64, sc: u32) -> (SubclusterType, u32) {
    let t = subcluster_type(raw, bitmap, sc);
    if matches!(t, SubclusterType::Compressed | SubclusterType::Invalid) {
        return (t, SUBCLUSTERS - sc);
    }
    let mut n = 1;
    while sc + n < SUBCLUSTERS && subcluster_type(raw, bitmap, sc + n) == t {
        n += 1;
    }
    (t, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_cover_the_asked_subclusters() {
        assert_eq!(alloc_mask(0, 32), ALL_ALLOC);
        assert_eq!(alloc_mask(1, 4), 0xe);
        assert_eq!(alloc_mask(31, 32), 1 << 31);
        assert_eq!(alloc_mask(5, 5), 0);
    }

    #[test]
    fn types_of_entries_qemu_writes() {
        // qemu-io "write 3k 5k" in a 64 KiB cluster: subclusters 1..4.
        let (raw, bm) = (0x8000_0000_0005_0000, 0xe);
        assert_eq!(
            subcluster_type(raw, bm, 0),
            SubclusterType::UnallocatedAlloc
        );
        assert_eq!(subcluster_run(raw, bm, 1), (SubclusterType::Normal, 3));
        assert_eq!(
            subcluster_run(raw, bm, 4),
            (SubclusterType::UnallocatedAlloc, 28)
        );
        // "write -z" of subclusters 0, 1 and 3 of an unallocated cluster.
        let bm = 0x0000_000b_0000_0000;
        assert_eq!(subcluster_run(0, bm, 0), (SubclusterType::ZeroPlain, 2));
        assert_eq!(subcluster_type(0, bm, 2), SubclusterType::UnallocatedPlain);
        assert_eq!(subcluster_type(raw, ALL_ZERO, 7), SubclusterType::ZeroAlloc);
    }

    #[test]
    fn contradictions_are_invalid() {
        assert_eq!(
            subcluster_type(0x50000, (1 << 32) | 1, 5),
            SubclusterType::Invalid
        );
        assert_eq!(subcluster_type(0, 1 << 9, 0), SubclusterType::Invalid);
        assert!(invalid_reason(0x50000, 0xffff_0000_0000_ffff).is_none());
        let compressed = super::super::entries::COMPRESSED | 0x5004f;
        assert_eq!(
            subcluster_type(compressed, 0, 3),
            SubclusterType::Compressed
        );
    }
}
