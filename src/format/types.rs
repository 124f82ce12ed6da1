//! Offset newtypes: a guest (virtual disk) offset and a host (image file)
//! offset are different things, and mixing them must not compile.

use std::fmt;

/// A byte offset in the virtual disk the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte offset in the image file on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

impl GuestOffset {
    /// Index of the guest cluster holding this offset.
    pub fn cluster(self, cluster_bits: u32) -> u64 {
        self.0 >> cluster_bits
    }
    /// Offset within its cluster.
    pub fn in_cluster(self, cluster_bits: u32) -> u64 {
        self.0 & ((1u64 << cluster_bits) - 1)
    }
}

impl HostOffset {
    /// Index of the host cluster holding this offset.
    pub fn cluster(self, cluster_bits: u32) -> u64 {
        self.0 >> cluster_bits
    }
    /// True when the offset starts a cluster.
    pub fn is_aligned(self, cluster_bits: u32) -> bool {
        self.0 & ((1u64 << cluster_bits) - 1) == 0
    }
}

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}
