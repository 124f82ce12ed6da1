//! The points in a qcow2 request where QEMU's blkdebug driver can act
//! (QEMU's `BlkdebugEvent` list, by the names blkdebug rules use).
//!
//! The engine announces each one to its host file through
//! [`Storage::debug_event`](super::Storage::debug_event) at the place
//! where QEMU's qcow2 driver (or block layer) raises it; storages that do
//! not inject errors ignore them. The names are QEMU 10's, so a blkdebug
//! config file written for QEMU works unchanged.

/// One blkdebug event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DebugEvent {
    L1Update,
    L1GrowAllocTable,
    L1GrowWriteTable,
    L1GrowActivateTable,
    L2Load,
    L2Update,
    L2UpdateCompressed,
    L2AllocCowRead,
    L2AllocWrite,
    ReadAio,
    ReadBackingAio,
    ReadCompressed,
    WriteAio,
    WriteCompressed,
    VmstateLoad,
    VmstateSave,
    CowRead,
    CowWrite,
    ReftableLoad,
    ReftableGrow,
    ReftableUpdate,
    RefblockLoad,
    RefblockUpdate,
    RefblockUpdatePart,
    RefblockAlloc,
    RefblockAllocHookup,
    RefblockAllocWrite,
    RefblockAllocWriteBlocks,
    RefblockAllocWriteTable,
    RefblockAllocSwitchTable,
    ClusterAlloc,
    ClusterAllocBytes,
    ClusterFree,
    FlushToOs,
    FlushToDisk,
    PwritevRmwHead,
    PwritevRmwAfterHead,
    PwritevRmwTail,
    PwritevRmwAfterTail,
    Pwritev,
    PwritevZero,
    PwritevDone,
    EmptyImagePrepare,
    L1ShrinkWriteTable,
    L1ShrinkFreeL2Clusters,
    CorWrite,
    ClusterAllocSpace,
    /// QEMU's `none`: raised once, when the blkdebug node is opened.
    NodeOpen,
}

use DebugEvent::*;

/// Every event with its name, in QEMU's order.
const NAMES: &[(DebugEvent, &str)] = &[
    (L1Update, "l1_update"),
    (L1GrowAllocTable, "l1_grow_alloc_table"),
    (L1GrowWriteTable, "l1_grow_write_table"),
    (L1GrowActivateTable, "l1_grow_activate_table"),
    (L2Load, "l2_load"),
    (L2Update, "l2_update"),
    (L2UpdateCompressed, "l2_update_compressed"),
    (L2AllocCowRead, "l2_alloc_cow_read"),
    (L2AllocWrite, "l2_alloc_write"),
    (ReadAio, "read_aio"),
    (ReadBackingAio, "read_backing_aio"),
    (ReadCompressed, "read_compressed"),
    (WriteAio, "write_aio"),
    (WriteCompressed, "write_compressed"),
    (VmstateLoad, "vmstate_load"),
    (VmstateSave, "vmstate_save"),
    (CowRead, "cow_read"),
    (CowWrite, "cow_write"),
    (ReftableLoad, "reftable_load"),
    (ReftableGrow, "reftable_grow"),
    (ReftableUpdate, "reftable_update"),
    (RefblockLoad, "refblock_load"),
    (RefblockUpdate, "refblock_update"),
    (RefblockUpdatePart, "refblock_update_part"),
    (RefblockAlloc, "refblock_alloc"),
    (RefblockAllocHookup, "refblock_alloc_hookup"),
    (RefblockAllocWrite, "refblock_alloc_write"),
    (RefblockAllocWriteBlocks, "refblock_alloc_write_blocks"),
    (RefblockAllocWriteTable, "refblock_alloc_write_table"),
    (RefblockAllocSwitchTable, "refblock_alloc_switch_table"),
    (ClusterAlloc, "cluster_alloc"),
    (ClusterAllocBytes, "cluster_alloc_bytes"),
    (ClusterFree, "cluster_free"),
    (FlushToOs, "flush_to_os"),
    (FlushToDisk, "flush_to_disk"),
    (PwritevRmwHead, "pwritev_rmw_head"),
    (PwritevRmwAfterHead, "pwritev_rmw_after_head"),
    (PwritevRmwTail, "pwritev_rmw_tail"),
    (PwritevRmwAfterTail, "pwritev_rmw_after_tail"),
    (Pwritev, "pwritev"),
    (PwritevZero, "pwritev_zero"),
    (PwritevDone, "pwritev_done"),
    (EmptyImagePrepare, "empty_image_prepare"),
    (L1ShrinkWriteTable, "l1_shrink_write_table"),
    (L1ShrinkFreeL2Clusters, "l1_shrink_free_l2_clusters"),
    (CorWrite, "cor_write"),
    (ClusterAllocSpace, "cluster_alloc_space"),
    (NodeOpen, "none"),
];

impl DebugEvent {
    /// The event a blkdebug rule names (`"l2_update"`), if any.
    pub fn from_name(name: &str) -> Option<DebugEvent> {
        NAMES.iter().find(|(_, n)| *n == name).map(|(e, _)| *e)
    }

    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(e, _)| *e == self)
            .map(|(_, n)| *n)
            .unwrap_or("")
    }

    /// All events, in QEMU's order.
    pub fn all() -> impl Iterator<Item = DebugEvent> {
        NAMES.iter().map(|(e, _)| *e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        assert_eq!(DebugEvent::all().count(), 48);
        for e in DebugEvent::all() {
            assert_eq!(DebugEvent::from_name(e.name()), Some(e));
        }
        let mut names: Vec<_> = DebugEvent::all().map(DebugEvent::name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 48);
        // QEMU 10 spells the old dotted names with underscores only.
        assert_eq!(DebugEvent::from_name("l2_alloc.write"), None);
        assert_eq!(DebugEvent::from_name("read_encrypted"), None);
    }
}
