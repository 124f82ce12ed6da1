//! The host file: positioned I/O, sync, length changes, hole punching.
//!
//! Everything above this layer sees a [`Storage`]: the real file
//! ([`FileStorage`]) or an in-memory one for tests ([`MemStorage`], and
//! [`CrashStorage`], which also simulates power loss), or one with nothing
//! behind it ([`NullStorage`], [`AbsentStorage`]); any of them possibly behind
//! [`BlkdebugStorage`], QEMU's error-injection filter. This layer knows
//! nothing of qcow2 and never interprets the bytes it moves; the engine
//! only tells it, through [`Storage::debug_event`], where in a request it
//! is (for blkdebug rules).

pub mod blkdebug;
pub mod blkdebug_config;
mod crash;
pub mod event;
mod file;
mod mem;
mod null;
mod quorum;
mod window;

pub use blkdebug::{Blkdebug, BlkdebugStorage};
pub use crash::{CrashSpec, CrashStorage, Keep, Replay, TraceEvent};
pub use event::DebugEvent;
pub use file::{set_extent_size_hint, FileStorage};
pub use mem::MemStorage;
pub use null::{AbsentStorage, NullStorage};
pub use quorum::QuorumStorage;
pub use window::WindowStorage;

use std::io;

/// A byte-addressed host file. Reads past the end return zeros, as QEMU's
/// file driver does; writes past the end extend the file.
pub trait Storage: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocates a range (reads return zeros afterwards). Best effort:
    /// storages that cannot punch holes write zeros instead.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Reserves space for a range without changing its contents.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Bytes the host actually uses for this file.
    fn allocated_size(&self) -> io::Result<u64> {
        self.len()
    }
    /// The engine is at `ev` (QEMU's blkdebug events). Only blkdebug
    /// acts on it; it may block the calling thread at a breakpoint.
    fn debug_event(&self, _ev: DebugEvent) {}
}
