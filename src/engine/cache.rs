//! A bounded cache of metadata clusters (L2 tables or refcount blocks),
//! keyed by host offset, with dirty tracking and least-recently-used
//! eviction.
//!
//! The cache never writes on its own: it only tells its owner which entry
//! must go, so that the owner can write dirty entries back in dependency
//! order (see `meta.rs`).

use std::collections::HashMap;

pub struct Slot {
    pub data: Vec<u8>,
    pub dirty: bool,
    last_use: u64,
}

pub struct TableCache {
    slots: HashMap<u64, Slot>,
    capacity: usize,
    tick: u64,
}

impl TableCache {
    pub fn new(capacity: usize) -> TableCache {
        TableCache {
            slots: HashMap::new(),
            capacity: capacity.max(2),
            tick: 0,
        }
    }

    pub fn get(&mut self, offset: u64) -> Option<&mut Slot> {
        self.tick += 1;
        let t = self.tick;
        let slot = self.slots.get_mut(&offset)?;
        slot.last_use = t;
        Some(slot)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.slots.contains_key(&offset)
    }

    /// Inserts an entry. The caller must have made room with [`TableCache::victim`].
    pub fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool) {
        self.tick += 1;
        self.slots.insert(
            offset,
            Slot {
                data,
                dirty,
                last_use: self.tick,
            },
        );
    }

    /// The entry to evict before inserting, if the cache is full.
    pub fn victim(&self) -> Option<(u64, bool)> {
        if self.slots.len() < self.capacity {
            return None;
        }
        self.slots
            .iter()
            .min_by_key(|(_, s)| (s.dirty, s.last_use))
            .map(|(&o, s)| (o, s.dirty))
    }

    pub fn remove(&mut self, offset: u64) -> Option<Slot> {
        self.slots.remove(&offset)
    }

    /// Offsets of dirty entries, in ascending order (sequential write-back).
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&o, _)| o)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn has_dirty(&self) -> bool {
        self.slots.values().any(|s| s.dirty)
    }

    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(s) = self.slots.get_mut(&offset) {
            s.dirty = false;
        }
    }
}
