//! oxqcow: a qcow2 block driver in Rust, shipped as a C library.
//!
//! Layers, each depending only on those before it:
//! [`format`](mod@format) (on-disk types, pure) and [`crypto`] (ciphers,
//! LUKS headers) → [`storage`] (the host file) →
//! [`engine`] (caches, allocator, mapping, I/O) → [`image`] (the safe API)
//! → `ffi` (the C ABI) and the `oxqcow` tool. [`nbd`] is a small NBD
//! client: an export as a raw image or as the host file of a qcow2 image.

pub mod blockdev;
pub mod crypto;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod format;
pub mod image;
pub mod log;
pub mod nbd;
pub mod storage;

pub use engine::{BlockStatus, CreateOptions, DataFileSource, OpenOptions, Preallocation, Qcow2};
pub use error::{Error, Result};
pub use image::Image;
