//! The opaque `BlockDriverState` and the checks every entry point shares:
//! NULL pointers, C strings, "is an image open", flags.
//!
//! Locking: the open image sits in an `RwLock<Option<..>>`. I/O entry points
//! hold the read lock for the length of one request, so any number of
//! threads may do I/O on one handle at once (the engine is `Sync`);
//! `bdrv_open` and `bdrv_close` take the write lock, so a close waits for
//! requests in flight and a request after the close sees "no medium"
//! instead of freed memory.

use super::errors::{fail, fail_with};
use super::types::*;
use crate::engine::OpenOptions;
use crate::error::Error;
use crate::image::Image;
use std::ffi::{CStr, CString, OsStr};
use std::os::raw::{c_char, c_int};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// An image handle for C hosts (opaque). Create it with bdrv_new(), open
/// an image in it with bdrv_open(), free it with bdrv_delete().
pub struct BlockDriverState {
    pub(crate) device_name: CString,
    pub(crate) slot: RwLock<Option<OpenImage>>,
}

/// What an open handle holds.
pub(crate) struct OpenImage {
    pub(crate) image: Image,
    pub(crate) flags: c_int,
}

/// Every BDRV_O_* flag this library knows; others are refused.
pub(crate) const SUPPORTED_OPEN_FLAGS: c_int = BDRV_O_RDWR
    | BDRV_O_NOCACHE
    | BDRV_O_CACHE_WB
    | BDRV_O_NO_BACKING
    | BDRV_O_NO_FLUSH
    | BDRV_O_CHECK;

impl OpenImage {
    pub(crate) fn writable(&self) -> bool {
        self.flags & BDRV_O_RDWR != 0
    }
}

/// A result whose error is an already-recorded negative errno.
pub(crate) type CResult<T> = std::result::Result<T, c_int>;

/// Collapses `Ok(v)` / `Err(-errno)` into the C return value.
pub(crate) fn ret(r: CResult<c_int>) -> c_int {
    r.unwrap_or_else(|e| e)
}

/// Maps an engine error to a recorded negative errno.
pub(crate) fn engine<T>(r: crate::error::Result<T>) -> CResult<T> {
    r.map_err(|e: Error| fail_with(&e))
}

impl BlockDriverState {
    pub(crate) fn new(device_name: CString) -> BlockDriverState {
        BlockDriverState {
            device_name,
            slot: RwLock::new(None),
        }
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Option<OpenImage>> {
        self.slot.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Option<OpenImage>> {
        self.slot.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn name(&self) -> String {
        self.device_name.to_string_lossy().into_owned()
    }

    /// Runs `f` on the open image under the read lock; -ENOMEDIUM when
    /// nothing is open.
    pub(crate) fn with_image<T>(
        &self,
        func: &str,
        f: impl FnOnce(&OpenImage) -> CResult<T>,
    ) -> CResult<T> {
        let g = self.read();
        match &*g {
            Some(img) => f(img),
            None => Err(fail(
                libc::ENOMEDIUM,
                format!("{func}: no image is open on device '{}'", self.name()),
            )),
        }
    }

    /// Like [`with_image`](Self::with_image), but fails with -EACCES when
    /// the handle was opened read-only.
    pub(crate) fn with_writable<T>(
        &self,
        func: &str,
        f: impl FnOnce(&OpenImage) -> CResult<T>,
    ) -> CResult<T> {
        self.with_image(func, |img| {
            if !img.writable() {
                return Err(fail(
                    libc::EACCES,
                    format!(
                        "{func}: device '{}' is read-only (opened without BDRV_O_RDWR)",
                        self.name()
                    ),
                ));
            }
            f(img)
        })
    }
}

/// Turns a handle pointer into a reference; -EINVAL for NULL.
///
/// # Safety
/// `bs` is NULL or a pointer returned by bdrv_new() and not yet passed to
/// bdrv_delete().
pub(crate) unsafe fn handle<'a>(
    bs: *mut BlockDriverState,
    func: &str,
) -> CResult<&'a BlockDriverState> {
    if bs.is_null() {
        return Err(fail(libc::EINVAL, format!("{func}: bs is NULL")));
    }
    // SAFETY: non-NULL, and by this function's contract it points to a live
    // BlockDriverState made by bdrv_new(); we only hand out a shared reference.
    Ok(unsafe { &*bs })
}

/// Borrows a C string; -EINVAL for NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn c_str<'a>(p: *const c_char, func: &str, what: &str) -> CResult<&'a CStr> {
    if p.is_null() {
        return Err(fail(libc::EINVAL, format!("{func}: {what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the contract above.
    Ok(unsafe { CStr::from_ptr(p) })
}

/// Borrows an optional C string (NULL gives None) as UTF-8.
///
/// # Safety
/// As for [`c_str`].
pub(crate) unsafe fn opt_utf8<'a>(
    p: *const c_char,
    func: &str,
    what: &str,
) -> CResult<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded contract; `p` is not NULL.
    let s = unsafe { c_str(p, func, what)? };
    s.to_str()
        .map(Some)
        .map_err(|_| fail(libc::EINVAL, format!("{func}: {what} is not valid UTF-8")))
}

/// A C string as a path (any bytes but NUL).
pub(crate) fn c_path(s: &CStr) -> &Path {
    Path::new(OsStr::from_bytes(s.to_bytes()))
}

/// Maps BDRV_O_* flags onto the engine's open options.
pub(crate) fn open_options(flags: c_int, func: &str) -> CResult<OpenOptions> {
    if flags & !SUPPORTED_OPEN_FLAGS != 0 {
        return Err(fail(
            libc::EINVAL,
            format!(
                "{func}: unsupported open flags {:#x} (supported: BDRV_O_RDWR, BDRV_O_NOCACHE, BDRV_O_CACHE_WB, BDRV_O_NO_BACKING, BDRV_O_NO_FLUSH, BDRV_O_CHECK)",
                flags & !SUPPORTED_OPEN_FLAGS
            ),
        ));
    }
    Ok(OpenOptions {
        writable: flags & BDRV_O_RDWR != 0,
        direct: flags & BDRV_O_NOCACHE != 0,
        no_flush: flags & BDRV_O_NO_FLUSH != 0,
        writethrough: flags & BDRV_O_CACHE_WB == 0,
        no_backing: flags & BDRV_O_NO_BACKING != 0,
        check_mode: flags & BDRV_O_CHECK != 0,
        ..Default::default()
    })
}

/// Checks a byte request against the image: non-negative, inside it.
/// Returns the offset as u64.
pub(crate) fn check_request(img: &Image, func: &str, offset: i64, bytes: i64) -> CResult<u64> {
    if offset < 0 || bytes < 0 {
        return Err(fail(
            libc::EINVAL,
            format!("{func}: negative offset or length (offset {offset}, length {bytes})"),
        ));
    }
    let size = img.size();
    let (off, len) = (offset as u64, bytes as u64);
    if off.checked_add(len).is_none_or(|end| end > size) {
        return Err(fail(
            libc::EIO,
            format!("{func}: request [{off}, +{len}) is past the end of the image ({size} bytes)"),
        ));
    }
    Ok(off)
}

/// Converts a sector request to bytes: -EINVAL when negative or too large.
pub(crate) fn sectors(func: &str, sector_num: i64, nb_sectors: i64) -> CResult<(i64, i64)> {
    let conv = |s: i64| s.checked_mul(BDRV_SECTOR_SIZE as i64);
    match (conv(sector_num), conv(nb_sectors)) {
        (Some(o), Some(n)) if o >= 0 && n >= 0 => Ok((o, n)),
        _ => Err(fail(
            libc::EINVAL,
            format!("{func}: invalid sector request (sector {sector_num}, count {nb_sectors})"),
        )),
    }
}
