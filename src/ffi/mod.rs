//! The C ABI: `include/block_int.h` (generated from this module by
//! cbindgen) with QEMU's block-layer names.
//!
//! Layout: [`types`] (the `#[repr(C)]` structs and constants), [`handle`]
//! (the opaque `BlockDriverState` and shared argument checks), [`api`] (the
//! `bdrv_*` entry points for handles, creation, I/O and queries),
//! [`check`] (`bdrv_check`, `bdrv_amend*` and the log callback),
//! [`snapshot`] (internal snapshots), [`driver`] (the `bdrv_qcow2` /
//! `bdrv_raw` tables), [`options`] (`QEMUOptionParameter` lists) and
//! `errors` (`bdrv_last_error` and the panic guard).
//!
//! This is the only module with unsafe pointer work: each unsafe block
//! says why it is sound in a `// SAFETY:` comment, and every entry point
//! runs its body under `catch_unwind`.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod api;
pub mod check;
pub mod driver;
mod errors;
pub mod handle;
pub mod options;
pub mod snapshot;
pub mod types;

pub use api::*;
pub use check::*;
pub use driver::*;
pub use handle::BlockDriverState;
pub use options::*;
pub use snapshot::*;
pub use types::*;
