//! The `bdrv_*` entry points a C host calls.
//!
//! Each one runs inside `errors::guard_int` (no panic crosses the boundary),
//! checks its pointers and ranges before touching memory, and reports
//! failure as a negative errno plus a message for `bdrv_last_error()`.
//! Synchronous semantics throughout: when a call returns, the request is
//! done (a C host has no coroutines).

use super::driver::BlockDriver;
use super::errors::{fail, guard, guard_int, last_error_ptr, set_last_error};
use super::handle::*;
use super::types::*;
use crate::engine::{self, BlockStatus, CreateOptions};
use crate::image::Image;
use std::ffi::{c_void, CStr, CString};
use std::os::raw::{c_char, c_int};
use std::path::{Path, PathBuf};

// ---- handles ------------------------------------------------------------------------------

/// Allocates a handle with no image open. `device_name` (may be NULL,
/// meaning "") names it in error messages. Returns NULL only if the name is
/// unusable; free the handle with bdrv_delete().
///
/// # Safety
/// `device_name` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn bdrv_new(device_name: *const c_char) -> *mut BlockDriverState {
    guard("bdrv_new", std::ptr::null_mut(), || {
        let name = if device_name.is_null() {
            CString::default()
        } else {
            // SAFETY: non-NULL and NUL-terminated by the caller's contract.
            unsafe { CStr::from_ptr(device_name) }.to_owned()
        };
        Box::into_raw(Box::new(BlockDriverState::new(name)))
    })
}

/// Closes the image (if one is open) and frees the handle. NULL is ignored.
/// No other thread may use the handle during or after this call.
///
/// # Safety
/// `bs` is NULL or a handle from bdrv_new() not yet deleted.
#[no_mangle]
pub unsafe extern "C" fn bdrv_delete(bs: *mut BlockDriverState) {
    guard("bdrv_delete", (), || {
        if bs.is_null() {
            return;
        }
        // SAFETY: a live handle by contract; no other thread uses it any more.
        unsafe { bdrv_close(bs) };
        // SAFETY: made by Box::into_raw in bdrv_new and not freed before.
        drop(unsafe { Box::from_raw(bs) });
    })
}

/// Opens the image `filename` in `bs`. `flags` is a combination of
/// BDRV_O_RDWR, BDRV_O_NOCACHE, BDRV_O_CACHE_WB, BDRV_O_NO_BACKING,
/// BDRV_O_NO_FLUSH and BDRV_O_CHECK (others give -EINVAL). `drv` is
/// &bdrv_qcow2, &bdrv_raw, or NULL to probe the format (qcow2 by its magic,
/// anything else raw). Returns 0, -EBUSY if an image is already open in
/// `bs`, or the open error (e.g. -ENOTSUP with QEMU's "Unsupported qcow2
/// feature(s): ..." message). A handle closed with bdrv_close() may be
/// opened again. BDRV_O_NO_FLUSH is cache=unsafe: the library never syncs
/// the file, not even to order its own metadata writes, so a host crash
/// can corrupt the image (for scratch copies only).
///
/// # Safety
/// `bs` is a handle from bdrv_new() (or NULL); `filename` NULL or a
/// NUL-terminated string; `drv` NULL or a valid BlockDriver.
#[no_mangle]
pub unsafe extern "C" fn bdrv_open(
    bs: *mut BlockDriverState,
    filename: *const c_char,
    flags: c_int,
    drv: *mut BlockDriver,
) -> c_int {
    guard_int("bdrv_open", || {
        // SAFETY: forwarded caller contract.
        ret(unsafe { driver_format(drv, "bdrv_open") }
            .and_then(|fmt| unsafe { open_common(bs, filename, flags, fmt, "bdrv_open") }))
    })
}

/// Like bdrv_open(), with runtime options as a comma-separated string
/// (NULL or "" for none), QEMU's qcow2 runtime option names:
/// - `lazy-refcounts=on|off` overrides the image's lazy-refcounts bit for
///   this open only (the header is not changed; use bdrv_amend() for
///   that). With on, refcount updates are deferred and the dirty bit is
///   set on disk before the first allocation; on needs a compat=1.1 image
///   (-EINVAL "Lazy refcounts require a qcow2 image with at least qemu 1.1
///   compatibility level", as QEMU). BlockDriverInfo.flags reports what is
///   in effect.
/// - `l2-cache-size=SIZE`, `refcount-cache-size=SIZE` (suffixes k, M, G).
///
/// Unknown names give -EINVAL ("Invalid parameter 'name'").
///
/// # Safety
/// As for bdrv_open(); `options` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn bdrv_open_with_options(
    bs: *mut BlockDriverState,
    filename: *const c_char,
    flags: c_int,
    drv: *mut BlockDriver,
    options: *const c_char,
) -> c_int {
    guard_int("bdrv_open_with_options", || {
        const F: &str = "bdrv_open_with_options";
        // SAFETY: forwarded caller contract.
        let r = unsafe { opt_utf8(options, F, "options") }.and_then(|o| {
            // SAFETY: forwarded caller contract.
            let fmt = unsafe { driver_format(drv, F) }?;
            // SAFETY: forwarded caller contract.
            unsafe { open_impl(bs, filename, flags, fmt, o.unwrap_or(""), F) }
        });
        ret(r)
    })
}

/// The format a BlockDriver pointer asks for (None: probe).
///
/// # Safety
/// `drv` is NULL or points to a valid BlockDriver.
pub(crate) unsafe fn driver_format(
    drv: *const BlockDriver,
    func: &str,
) -> CResult<Option<&'static str>> {
    if drv.is_null() {
        return Ok(None);
    }
    // SAFETY: a valid BlockDriver by contract; format_name is read by value.
    let name = unsafe { (*drv).format_name };
    // SAFETY: format_name of a valid BlockDriver is NULL or a C string.
    let name = unsafe { c_str(name, func, "drv->format_name") }?;
    match name.to_bytes() {
        b"qcow2" => Ok(Some("qcow2")),
        b"raw" => Ok(Some("raw")),
        other => Err(fail(
            libc::ENOTSUP,
            format!(
                "{func}: unknown block driver '{}' (this library has qcow2 and raw)",
                String::from_utf8_lossy(other)
            ),
        )),
    }
}

/// Opens `filename` in `bs` with a fixed or probed format.
///
/// # Safety
/// As for bdrv_open().
pub(crate) unsafe fn open_common(
    bs: *mut BlockDriverState,
    filename: *const c_char,
    flags: c_int,
    fmt: Option<&str>,
    func: &str,
) -> CResult<c_int> {
    // SAFETY: forwarded caller contract.
    unsafe { open_impl(bs, filename, flags, fmt, "", func) }
}

/// # Safety
/// As for bdrv_open().
unsafe fn open_impl(
    bs: *mut BlockDriverState,
    filename: *const c_char,
    flags: c_int,
    fmt: Option<&str>,
    runtime: &str,
    func: &str,
) -> CResult<c_int> {
    // SAFETY: forwarded caller contract.
    let bs = unsafe { handle(bs, func) }?;
    // SAFETY: forwarded caller contract.
    let filename = unsafe { c_str(filename, func, "filename") }?;
    let mut opts = open_options(flags, func)?;
    for item in runtime.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').unwrap_or((item, ""));
        let size = |v: &str| engine(engine::parse_size(v));
        match k {
            "lazy-refcounts" => {
                opts.lazy_refcounts = Some(match v {
                    "on" => true,
                    "off" => false,
                    _ => {
                        return Err(fail(
                            libc::EINVAL,
                            format!("{func}: Parameter 'lazy-refcounts' expects 'on' or 'off'"),
                        ))
                    }
                })
            }
            "l2-cache-size" => opts.l2_cache_size = Some(size(v)?),
            "refcount-cache-size" => opts.refcount_cache_size = Some(size(v)?),
            _ => {
                return Err(fail(
                    libc::EINVAL,
                    format!("{func}: Invalid parameter '{k}'"),
                ))
            }
        }
    }
    let mut slot = bs.write();
    if slot.is_some() {
        return Err(fail(
            libc::EBUSY,
            format!(
                "{func}: device '{}' already has an image open; call bdrv_close() first",
                bs.name()
            ),
        ));
    }
    let image = engine(Image::open(c_path(filename), fmt, &opts))?;
    *slot = Some(OpenImage { image, flags });
    Ok(0)
}

/// Flushes and closes the image; the handle stays valid and may be opened
/// again. Closing a closed handle (or NULL) does nothing. A failure while
/// writing the last metadata is reported through bdrv_last_error() only.
/// Waits for I/O requests in flight on other threads.
///
/// # Safety
/// `bs` is NULL or a handle from bdrv_new() not yet deleted.
#[no_mangle]
pub unsafe extern "C" fn bdrv_close(bs: *mut BlockDriverState) {
    guard("bdrv_close", (), || {
        if bs.is_null() {
            return;
        }
        // SAFETY: a live handle by contract.
        let bs = unsafe { &*bs };
        let taken = bs.write().take();
        if let Some(img) = taken {
            if let Err(e) = img.image.close() {
                set_last_error(&format!("bdrv_close: {e}"));
            }
        }
    })
}

// ---- creation -----------------------------------------------------------------------------

/// Creates an image like `qemu-img create`. `fmt` is "qcow2" (also when
/// NULL) or "raw". `base_filename` / `base_fmt` (NULL for none) set the
/// backing file and its format. `options` is a qemu-img `-o` string such as
/// "compat=1.1,lazy_refcounts=on" (NULL or "" for none); it may override
/// the size. `img_size` is the virtual size in bytes; (uint64_t)-1 takes the
/// size of the backing file. `flags` holds BLOCK_FLAG_* bits:
/// BLOCK_FLAG_LAZY_REFCOUNTS is the same as `lazy_refcounts=on`;
/// BLOCK_FLAG_ENCRYPT and BLOCK_FLAG_COMPAT6 fail with -ENOTSUP. Returns 0
/// or a negative errno (-EINVAL for a bad option, with QEMU's message).
///
/// # Safety
/// Every pointer is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn bdrv_img_create(
    filename: *const c_char,
    fmt: *const c_char,
    base_filename: *const c_char,
    base_fmt: *const c_char,
    options: *const c_char,
    img_size: u64,
    flags: c_int,
) -> c_int {
    guard_int("bdrv_img_create", || {
        // SAFETY: every pointer is NULL or a C string by contract.
        ret(unsafe {
            img_create(
                filename,
                fmt,
                base_filename,
                base_fmt,
                options,
                img_size,
                flags,
            )
        })
    })
}

/// # Safety
/// As for bdrv_img_create().
unsafe fn img_create(
    filename: *const c_char,
    fmt: *const c_char,
    base_filename: *const c_char,
    base_fmt: *const c_char,
    options: *const c_char,
    img_size: u64,
    flags: c_int,
) -> CResult<c_int> {
    const F: &str = "bdrv_img_create";
    // SAFETY: the four pointers are NULL or C strings by this function's
    // contract, and outlive the borrows taken here.
    let (path, fmt, base, base_fmt, options) = unsafe {
        (
            c_path(c_str(filename, F, "filename")?).to_path_buf(),
            opt_utf8(fmt, F, "fmt")?.unwrap_or("qcow2"),
            opt_utf8(base_filename, F, "base_filename")?.filter(|s| !s.is_empty()),
            opt_utf8(base_fmt, F, "base_fmt")?.filter(|s| !s.is_empty()),
            opt_utf8(options, F, "options")?.unwrap_or(""),
        )
    };

    if flags & BLOCK_FLAG_ENCRYPT != 0 {
        return Err(fail(
            libc::ENOTSUP,
            "bdrv_img_create: BLOCK_FLAG_ENCRYPT: encrypted images are not supported by oxqcow",
        ));
    }
    if flags & BLOCK_FLAG_COMPAT6 != 0 {
        return Err(fail(
            libc::ENOTSUP,
            format!("bdrv_img_create: BLOCK_FLAG_COMPAT6: VMDK version 6 is not supported by format '{fmt}' (only vmdk had it)"),
        ));
    }
    if flags & !BLOCK_FLAG_LAZY_REFCOUNTS != 0 {
        return Err(fail(
            libc::EINVAL,
            format!(
                "bdrv_img_create: unknown flags {:#x}",
                flags & !BLOCK_FLAG_LAZY_REFCOUNTS
            ),
        ));
    }
    let name = path.display().to_string();
    let err_ctx = |e: crate::error::Error| e.context(&name);
    match fmt {
        "qcow2" => {
            let mut o = CreateOptions::default();
            if img_size != u64::MAX {
                o.size = img_size;
            }
            engine(o.parse_into(options).map_err(err_ctx))?;
            if let Some(b) = base {
                o.backing_file = Some(b.to_string());
            }
            if let Some(f) = base_fmt {
                o.backing_fmt = Some(f.to_string());
            }
            if flags & BLOCK_FLAG_LAZY_REFCOUNTS != 0 {
                o.lazy_refcounts = true;
            }
            if img_size == u64::MAX && !options.split(',').any(|s| s.starts_with("size=")) {
                o.size = backing_size(&path, o.backing_file.as_deref(), o.backing_fmt.as_deref())?;
            }
            engine(engine::create(&path, &o).map_err(err_ctx))?;
        }
        "raw" => {
            if base.is_some() {
                return Err(fail(
                    libc::ENOTSUP,
                    format!("{name}: Backing file not supported for file format 'raw'"),
                ));
            }
            if img_size == u64::MAX {
                return Err(fail(
                    libc::EINVAL,
                    format!("{name}: Image creation needs a size parameter"),
                ));
            }
            let mut o = CreateOptions {
                size: img_size,
                ..CreateOptions::default()
            };
            for item in options.split(',').filter(|s| !s.is_empty()) {
                match item.split_once('=') {
                    Some((k, v)) if super::driver::RAW_KEYS.contains(&k) => {
                        engine(o.set(k, v).map_err(err_ctx))?
                    }
                    _ => {
                        return Err(fail(
                            libc::EINVAL,
                            format!("{name}: Invalid parameter '{item}' for format 'raw'"),
                        ))
                    }
                }
            }
            let r = engine::create_raw(&path, o.size, o.preallocation, o.extent_size_hint);
            engine(r.map_err(err_ctx))?;
        }
        other => {
            return Err(fail(
                libc::EINVAL,
                format!("bdrv_img_create: Unknown file format '{other}'"),
            ))
        }
    }
    Ok(0)
}

/// The virtual size of the backing file named for a new image.
fn backing_size(path: &Path, backing: Option<&str>, fmt: Option<&str>) -> CResult<u64> {
    let Some(b) = backing else {
        return Err(fail(
            libc::EINVAL,
            format!("{}: Image creation needs a size parameter", path.display()),
        ));
    };
    // Relative names are relative to the new image's directory, as in QEMU.
    let bp: PathBuf = if Path::new(b).is_absolute() {
        PathBuf::from(b)
    } else {
        match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.join(b),
            _ => PathBuf::from(b),
        }
    };
    let img = engine(Image::open(&bp, fmt, &Default::default()))?;
    let size = img.size();
    let _ = img.close();
    Ok(size)
}

// ---- I/O ----------------------------------------------------------------------------------

/// # Safety
/// `bs` as for bdrv_pread(); `buf` valid for `len` bytes of writing.
unsafe fn read_bytes(
    bs: *mut BlockDriverState,
    func: &str,
    offset: i64,
    buf: *mut u8,
    len: i64,
) -> CResult<()> {
    // SAFETY: forwarded caller contract.
    let bs = unsafe { handle(bs, func) }?;
    bs.with_image(func, |img| {
        let off = check_request(&img.image, func, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if buf.is_null() {
            return Err(fail(libc::EINVAL, format!("{func}: buf is NULL")));
        }
        // SAFETY: the caller guarantees `buf` is valid for `len` bytes and
        // not accessed by anyone else during the call.
        let out = unsafe { std::slice::from_raw_parts_mut(buf, len as usize) };
        engine(img.image.read_at(out, off))
    })
}

/// # Safety
/// `bs` as for bdrv_pwrite(); `buf` valid for `len` bytes of reading.
unsafe fn write_bytes(
    bs: *mut BlockDriverState,
    func: &str,
    offset: i64,
    buf: *const u8,
    len: i64,
) -> CResult<()> {
    // SAFETY: forwarded caller contract.
    let bs = unsafe { handle(bs, func) }?;
    bs.with_writable(func, |img| {
        let off = check_request(&img.image, func, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if buf.is_null() {
            return Err(fail(libc::EINVAL, format!("{func}: buf is NULL")));
        }
        // SAFETY: the caller guarantees `buf` is valid for `len` bytes.
        let data = unsafe { std::slice::from_raw_parts(buf, len as usize) };
        engine(img.image.write_at(data, off))
    })
}

/// A sector-addressed entry point: under `func`'s guard, turns
/// `nb_sectors` sectors at `sector_num` into a byte offset and length (or
/// -EINVAL) and hands them to `op` with `func` for its messages.
fn sector_request(
    func: &'static str,
    sector_num: i64,
    nb_sectors: c_int,
    op: impl FnOnce(&str, i64, i64) -> CResult<c_int>,
) -> c_int {
    guard_int(func, || {
        ret(sectors(func, sector_num, nb_sectors as i64).and_then(|(o, n)| op(func, o, n)))
    })
}

/// Reads `count` bytes at byte `offset` into `buf`. Returns `count`, or
/// -EINVAL (NULL pointer, negative offset or count), -EIO (past the end of
/// the image), -ENOMEDIUM (no image open), or the I/O error.
///
/// # Safety
/// `bs` is a live handle (or NULL); `buf` is valid for `count` bytes.
#[no_mangle]
pub unsafe extern "C" fn bdrv_pread(
    bs: *mut BlockDriverState,
    offset: i64,
    buf: *mut c_void,
    count: c_int,
) -> c_int {
    guard_int("bdrv_pread", || {
        // SAFETY: forwarded caller contract.
        ret(
            unsafe { read_bytes(bs, "bdrv_pread", offset, buf.cast(), count as i64) }
                .map(|_| count),
        )
    })
}

/// Writes `count` bytes from `buf` at byte `offset`. Returns `count` or a
/// negative errno as bdrv_pread(), plus -EACCES on a read-only handle.
///
/// # Safety
/// `bs` is a live handle (or NULL); `buf` is valid for `count` bytes.
#[no_mangle]
pub unsafe extern "C" fn bdrv_pwrite(
    bs: *mut BlockDriverState,
    offset: i64,
    buf: *const c_void,
    count: c_int,
) -> c_int {
    guard_int("bdrv_pwrite", || {
        // SAFETY: forwarded caller contract.
        ret(
            unsafe { write_bytes(bs, "bdrv_pwrite", offset, buf.cast(), count as i64) }
                .map(|_| count),
        )
    })
}

/// Reads `nb_sectors` 512-byte sectors from sector `sector_num`. Returns 0
/// or a negative errno as bdrv_pread().
///
/// # Safety
/// `bs` is a live handle (or NULL); `buf` is valid for nb_sectors * 512 bytes.
#[no_mangle]
pub unsafe extern "C" fn bdrv_read(
    bs: *mut BlockDriverState,
    sector_num: i64,
    buf: *mut u8,
    nb_sectors: c_int,
) -> c_int {
    sector_request("bdrv_read", sector_num, nb_sectors, |f, o, n| {
        // SAFETY: forwarded caller contract.
        unsafe { read_bytes(bs, f, o, buf, n) }.map(|_| 0)
    })
}

/// Writes `nb_sectors` 512-byte sectors at sector `sector_num`. Returns 0
/// or a negative errno as bdrv_pwrite().
///
/// # Safety
/// `bs` is a live handle (or NULL); `buf` is valid for nb_sectors * 512 bytes.
#[no_mangle]
pub unsafe extern "C" fn bdrv_write(
    bs: *mut BlockDriverState,
    sector_num: i64,
    buf: *const u8,
    nb_sectors: c_int,
) -> c_int {
    sector_request("bdrv_write", sector_num, nb_sectors, |f, o, n| {
        // SAFETY: forwarded caller contract.
        unsafe { write_bytes(bs, f, o, buf, n) }.map(|_| 0)
    })
}

/// Writes one cluster compressed (QEMU's bdrv_write_compressed, what
/// `qemu-img convert -c` uses): `sector_num` must start a cluster and
/// `nb_sectors` cover exactly one cluster, or end at the end of the image
/// for its last, partial cluster (the rest is padded with zeros). The
/// cluster is compressed with the image's compression type (zlib or zstd)
/// and packed byte-wise with its neighbours, as QEMU packs it; data that
/// does not shrink is written uncompressed. `nb_sectors` 0 does nothing.
/// Returns 0, -EINVAL (misaligned or not one cluster, NULL buffer), -EIO
/// (past the end), -EACCES (read-only), -ENOTSUP (raw images) or another
/// negative errno.
///
/// # Safety
/// `bs` is a live handle (or NULL); `buf` is valid for nb_sectors * 512 bytes.
#[no_mangle]
pub unsafe extern "C" fn bdrv_write_compressed(
    bs: *mut BlockDriverState,
    sector_num: i64,
    buf: *const u8,
    nb_sectors: c_int,
) -> c_int {
    guard_int("bdrv_write_compressed", || {
        const F: &str = "bdrv_write_compressed";
        let r = (|| {
            let (off, len) = sectors(F, sector_num, nb_sectors as i64)?;
            // SAFETY: forwarded caller contract.
            let bs = unsafe { handle(bs, F) }?;
            bs.with_writable(F, |img| {
                let Some(q) = img.image.qcow2() else {
                    return Err(fail(
                        libc::ENOTSUP,
                        format!("{F}: not supported for raw images"),
                    ));
                };
                let off = check_request(&img.image, F, off, len)?;
                if len == 0 {
                    return Ok(0);
                }
                if buf.is_null() {
                    return Err(fail(libc::EINVAL, format!("{F}: buf is NULL")));
                }
                // SAFETY: the caller guarantees `buf` is valid for `len` bytes.
                let data = unsafe { std::slice::from_raw_parts(buf, len as usize) };
                engine(q.write_compressed(data, off)).map(|_| 0)
            })
        })();
        ret(r)
    })
}

/// Writes cached metadata and syncs the image file to stable storage.
/// With BDRV_O_NO_FLUSH it returns 0 at once. Returns 0 or a negative errno.
///
/// # Safety
/// `bs` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn bdrv_flush(bs: *mut BlockDriverState) -> c_int {
    guard_int("bdrv_flush", || {
        // SAFETY: forwarded caller contract.
        let r = unsafe { handle(bs, "bdrv_flush") }.and_then(|bs| {
            bs.with_image("bdrv_flush", |img| {
                if img.flags & BDRV_O_NO_FLUSH != 0 {
                    return Ok(0);
                }
                engine(img.image.flush()).map(|_| 0)
            })
        });
        ret(r)
    })
}

/// # Safety
/// `bs` is NULL or a live handle.
unsafe fn discard_bytes(
    bs: *mut BlockDriverState,
    func: &str,
    offset: i64,
    bytes: i64,
) -> CResult<c_int> {
    // SAFETY: forwarded caller contract.
    let bs = unsafe { handle(bs, func) }?;
    bs.with_writable(func, |img| {
        let off = check_request(&img.image, func, offset, bytes)?;
        if bytes > 0 {
            engine(img.image.discard(off, bytes as u64))?;
        }
        Ok(0)
    })
}

/// # Safety
/// `bs` is NULL or a live handle.
unsafe fn zero_bytes(
    bs: *mut BlockDriverState,
    func: &str,
    offset: i64,
    bytes: i64,
    flags: c_int,
) -> CResult<c_int> {
    if flags & !BDRV_REQ_MAY_UNMAP != 0 {
        return Err(fail(
            libc::EINVAL,
            format!(
                "{func}: unsupported request flags {:#x}",
                flags & !BDRV_REQ_MAY_UNMAP
            ),
        ));
    }
    // SAFETY: forwarded caller contract.
    let bs = unsafe { handle(bs, func) }?;
    bs.with_writable(func, |img| {
        let off = check_request(&img.image, func, offset, bytes)?;
        if bytes > 0 {
            engine(
                img.image
                    .write_zeroes(off, bytes as u64, flags & BDRV_REQ_MAY_UNMAP != 0),
            )?;
        }
        Ok(0)
    })
}

/// Discards whole clusters of the sector range: their storage is freed and
/// they read as zeros afterwards (compat=1.1) or from the backing file
/// (compat=0.10). Partial clusters at either end are left alone. Returns 0
/// or a negative errno as bdrv_pwrite().
///
/// # Safety
/// `bs` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn bdrv_discard(
    bs: *mut BlockDriverState,
    sector_num: i64,
    nb_sectors: c_int,
) -> c_int {
    sector_request("bdrv_discard", sector_num, nb_sectors, |f, o, n| {
        // SAFETY: forwarded caller contract.
        unsafe { discard_bytes(bs, f, o, n) }
    })
}

/// bdrv_discard() in bytes.
///
/// # Safety
/// `bs` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn bdrv_pdiscard(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
) -> c_int {
    guard_int("bdrv_pdiscard", || {
        // SAFETY: forwarded caller contract.
        ret(unsafe { discard_bytes(bs, "bdrv_pdiscard", offset, bytes) })
    })
}

/// Makes the sector range read as zeros (zero clusters where the image
/// allows them). `flags` is 0 or BDRV_REQ_MAY_UNMAP (whole clusters may
/// give their storage back). Returns 0 or a negative errno as bdrv_pwrite().
///
/// # Safety
/// `bs` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn bdrv_write_zeroes(
    bs: *mut BlockDriverState,
    sector_num: i64,
    nb_sectors: c_int,
    flags: c_int,
) -> c_int {
    sector_request("bdrv_write_zeroes", sector_num, nb_sectors, |f, o, n| {
        // SAFETY: forwarded caller contract.
        unsafe { zero_bytes(bs, f, o, n, flags) }
    })
}

/// bdrv_write_zeroes() in bytes.
///
/// # Safety
/// `bs` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn bdrv_pwrite_zeroes(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
    flags: c_int,
) -> c_int {
    guard_int("bdrv_pwrite_zeroes", || {
        // SAFETY: forwarded caller contract.
        ret(unsafe { zero_bytes(bs, "bdrv_pwrite_zeroes", offset, bytes, flags) })
    })
}

/// Tells whether sector `sector_num` is allocated in this image (data or a
/// zero cluster of this layer, not of its backing file). Sets `*pnum` to the
/// number of sectors from there (at most `nb_sectors`) in the same state.
/// Returns 1 (allocated), 0 (not allocated; also with *pnum = 0 at or past
/// the end of the image) or a negative errno.
///
/// # Safety
/// `bs` is NULL or a live handle; `pnum` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn bdrv_is_allocated(
    bs: *mut BlockDriverState,
    sector_num: i64,
    nb_sectors: c_int,
    pnum: *mut c_int,
) -> c_int {
    guard_int("bdrv_is_allocated", || {
        const F: &str = "bdrv_is_allocated";
        let r = (|| {
            // SAFETY: forwarded caller contract.
            let bs = unsafe { handle(bs, F) }?;
            if pnum.is_null() {
                return Err(fail(libc::EINVAL, format!("{F}: pnum is NULL")));
            }
            let (off, len) = sectors(F, sector_num, nb_sectors as i64)?;
            let (allocated, n) = bs.with_image(F, |img| {
                let size = img.image.size();
                let (off, len) = (off as u64, len as u64);
                if off >= size || len == 0 {
                    return Ok((false, 0));
                }
                let len = len.min(size - off);
                let (st, bytes) = engine(img.image.block_status(off, len))?;
                let allocated = matches!(
                    st,
                    BlockStatus::Data { depth: 0, .. } | BlockStatus::Zero { depth: 0 }
                );
                let n = bytes.min(len).div_ceil(BDRV_SECTOR_SIZE).max(1);
                Ok((allocated, n.min(nb_sectors as u64)))
            })?;
            // SAFETY: `pnum` is non-NULL and valid for writing by contract.
            unsafe { pnum.write(n as c_int) };
            Ok(allocated as c_int)
        })();
        ret(r)
    })
}

/// The state of the guest range at `offset`, looking down the backing
/// chain: QEMU's BDRV_BLOCK_* flags, or a negative errno. `*pnum` is set to
/// the number of bytes from `offset` (at most `bytes`) in the same state;
/// `*depth` to the layer the state comes from (0 = this image, 1 = its
/// backing file, ...); `*map` to the host offset in that layer's file when
/// BDRV_BLOCK_OFFSET_VALID is set (else 0).
///
/// - data: BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED, plus
///   BDRV_BLOCK_OFFSET_VALID when stored uncompressed (raw images: always,
///   `*map` = `offset`, depth 0);
/// - zero cluster: BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED;
/// - in no layer: BDRV_BLOCK_ZERO (reads as zeros), `*depth` the deepest
///   layer asked.
///
/// At or past the end of the image, or with `bytes` 0, returns 0 with
/// `*pnum` = 0. `pnum` is required (-EINVAL if NULL); `map` and `depth` may
/// be NULL. Negative `offset` or `bytes` is -EINVAL.
///
/// # Safety
/// `bs` is NULL or a live handle; `pnum`, `map` and `depth` are NULL or
/// valid for writing.
#[no_mangle]
pub unsafe extern "C" fn bdrv_block_status(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
    pnum: *mut i64,
    map: *mut i64,
    depth: *mut c_int,
) -> c_int {
    guard_int("bdrv_block_status", || {
        const F: &str = "bdrv_block_status";
        let r = (|| {
            // SAFETY: forwarded caller contract.
            let bs = unsafe { handle(bs, F) }?;
            if pnum.is_null() {
                return Err(fail(libc::EINVAL, format!("{F}: pnum is NULL")));
            }
            if offset < 0 || bytes < 0 {
                return Err(fail(
                    libc::EINVAL,
                    format!("{F}: invalid range offset {offset}, bytes {bytes}"),
                ));
            }
            let (flags, n, host, layer) = bs.with_image(F, |img| {
                let size = img.image.size();
                let (off, len) = (offset as u64, bytes as u64);
                if off >= size || len == 0 {
                    return Ok((0, 0, 0, 0));
                }
                let len = len.min(size - off);
                let (st, n) = engine(img.image.block_status(off, len))?;
                let n = n.min(len);
                Ok(match st {
                    BlockStatus::Data {
                        host: Some(h),
                        depth,
                    } => (
                        BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_OFFSET_VALID,
                        n,
                        h,
                        depth,
                    ),
                    BlockStatus::Data { host: None, depth } => {
                        (BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED, n, 0, depth)
                    }
                    BlockStatus::Zero { depth } => {
                        (BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED, n, 0, depth)
                    }
                    BlockStatus::Unallocated { depth } => (BDRV_BLOCK_ZERO, n, 0, depth),
                })
            })?;
            // SAFETY: `pnum` is non-NULL and valid for writing by contract.
            unsafe { pnum.write(n as i64) };
            if !map.is_null() {
                // SAFETY: non-NULL, valid for writing by contract.
                unsafe { map.write(host as i64) };
            }
            if !depth.is_null() {
                // SAFETY: non-NULL, valid for writing by contract.
                unsafe { depth.write(layer as c_int) };
            }
            Ok(flags)
        })();
        ret(r)
    })
}

/// Changes the virtual size to `offset` bytes (growing or shrinking).
/// Returns 0, -EINVAL for a negative size, -EACCES on a read-only handle,
/// -EFBIG past the format's limit, or another negative errno.
///
/// # Safety
/// `bs` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn bdrv_truncate(bs: *mut BlockDriverState, offset: i64) -> c_int {
    guard_int("bdrv_truncate", || {
        const F: &str = "bdrv_truncate";
        // SAFETY: forwarded caller contract.
        let r = unsafe { handle(bs, F) }.and_then(|bs| {
            bs.with_writable(F, |img| {
                if offset < 0 {
                    return Err(fail(libc::EINVAL, format!("{F}: negative size {offset}")));
                }
                engine(img.image.resize(offset as u64)).map(|_| 0)
            })
        });
        ret(r)
    })
}

/// The virtual size in bytes, or a negative errno.
///
/// # Safety
/// `bs` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn bdrv_getlength(bs: *mut BlockDriverState) -> i64 {
    guard("bdrv_getlength", -(libc::EIO as i64), || {
        // SAFETY: forwarded caller contract.
        let r = unsafe { handle(bs, "bdrv_getlength") }
            .and_then(|bs| bs.with_image("bdrv_getlength", |img| Ok(img.image.size() as i64)));
        r.unwrap_or_else(|e| e as i64)
    })
}

/// Bytes the image file occupies on the host, or a negative errno.
///
/// # Safety
/// `bs` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn bdrv_get_allocated_file_size(bs: *mut BlockDriverState) -> i64 {
    guard("bdrv_get_allocated_file_size", -(libc::EIO as i64), || {
        const F: &str = "bdrv_get_allocated_file_size";
        // SAFETY: forwarded caller contract.
        let r = unsafe { handle(bs, F) }
            .and_then(|bs| bs.with_image(F, |img| Ok(img.image.allocated_file_size() as i64)));
        r.unwrap_or_else(|e| e as i64)
    })
}

/// Fills `bdi` (cluster size, VM state offset, dirty flag, and
/// BLOCK_FLAG_LAZY_REFCOUNTS in `flags`). Returns 0, -ENOTSUP for a raw
/// image, or another negative errno.
///
/// # Safety
/// `bs` is NULL or a live handle; `bdi` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn bdrv_get_info(
    bs: *mut BlockDriverState,
    bdi: *mut BlockDriverInfo,
) -> c_int {
    guard_int("bdrv_get_info", || {
        const F: &str = "bdrv_get_info";
        let r = (|| {
            // SAFETY: forwarded caller contract.
            let bs = unsafe { handle(bs, F) }?;
            if bdi.is_null() {
                return Err(fail(libc::EINVAL, format!("{F}: bdi is NULL")));
            }
            let info = bs.with_image(F, |img| {
                let Some(q) = img.image.qcow2() else {
                    return Err(fail(
                        libc::ENOTSUP,
                        format!("{F}: not supported for raw images"),
                    ));
                };
                Ok(BlockDriverInfo {
                    cluster_size: q.cluster_size() as c_int,
                    vm_state_offset: q.vm_state_offset() as i64,
                    is_dirty: q.is_dirty(),
                    flags: if q.lazy_refcounts() {
                        BLOCK_FLAG_LAZY_REFCOUNTS
                    } else {
                        0
                    },
                })
            })?;
            // SAFETY: `bdi` is non-NULL and valid for writing by contract.
            unsafe { bdi.write(info) };
            Ok(0)
        })();
        ret(r)
    })
}

/// Drops every cluster of the image: afterwards it reads as its backing
/// file (or zeros), as an overlay does after `qemu-img commit`. Returns 0,
/// -ENOTSUP for raw images, -EACCES on a read-only handle, or another
/// negative errno.
///
/// # Safety
/// `bs` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn bdrv_make_empty(bs: *mut BlockDriverState) -> c_int {
    guard_int("bdrv_make_empty", || {
        const F: &str = "bdrv_make_empty";
        // SAFETY: forwarded caller contract.
        let r = unsafe { handle(bs, F) }.and_then(|bs| {
            bs.with_writable(F, |img| match img.image.qcow2() {
                Some(q) => engine(q.make_empty()).map(|_| 0),
                None => Err(fail(
                    libc::ENOTSUP,
                    format!("{F}: not supported for raw images"),
                )),
            })
        });
        ret(r)
    })
}

/// Rewrites the header to name another backing file (NULL or "" for none)
/// and format (NULL or "" for none), like `qemu-img rebase -u`. Unknown
/// header extensions are preserved. The new file is not opened until the
/// image is opened again. Returns 0, -ENOTSUP for raw images, -EACCES on a
/// read-only handle, -EINVAL for a format name of 16 bytes or more, or
/// another negative errno (-ENOSPC if the header cluster is full).
///
/// # Safety
/// `bs` is NULL or a live handle; the strings are NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn bdrv_change_backing_file(
    bs: *mut BlockDriverState,
    backing_file: *const c_char,
    backing_fmt: *const c_char,
) -> c_int {
    guard_int("bdrv_change_backing_file", || {
        const F: &str = "bdrv_change_backing_file";
        let r = (|| {
            // SAFETY: forwarded caller contract.
            let bs = unsafe { handle(bs, F) }?;
            // SAFETY: NULL or C strings by contract.
            let file = unsafe { opt_utf8(backing_file, F, "backing_file") }?;
            // SAFETY: as above.
            let fmt = unsafe { opt_utf8(backing_fmt, F, "backing_fmt") }?;
            bs.with_writable(F, |img| match img.image.qcow2() {
                Some(q) => engine(q.change_backing_file(file, fmt)).map(|_| 0),
                None => Err(fail(
                    libc::ENOTSUP,
                    format!("{F}: not supported for raw images"),
                )),
            })
        })();
        ret(r)
    })
}

// ---- queries ------------------------------------------------------------------------------

/// The message of the last failure on the calling thread ("" if none). The
/// string stays valid until the next failing call on this thread; successful
/// calls leave it alone.
#[no_mangle]
pub extern "C" fn bdrv_last_error() -> *const c_char {
    guard("bdrv_last_error", c"".as_ptr(), last_error_ptr)
}

/// "qcow2" or "raw" for an open handle; NULL when `bs` is NULL or closed.
/// The string is static.
///
/// # Safety
/// `bs` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn bdrv_get_format_name(bs: *mut BlockDriverState) -> *const c_char {
    guard("bdrv_get_format_name", std::ptr::null(), || {
        const F: &str = "bdrv_get_format_name";
        // SAFETY: forwarded caller contract.
        let r = unsafe { handle(bs, F) }.and_then(|bs| {
            bs.with_image(F, |img| {
                Ok(match img.image.format() {
                    "qcow2" => c"qcow2".as_ptr(),
                    _ => c"raw".as_ptr(),
                })
            })
        });
        r.unwrap_or(std::ptr::null())
    })
}

/// The name given to bdrv_new(); valid as long as the handle. NULL for NULL.
///
/// # Safety
/// `bs` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn bdrv_get_device_name(bs: *mut BlockDriverState) -> *const c_char {
    guard("bdrv_get_device_name", std::ptr::null(), || {
        // SAFETY: forwarded caller contract.
        match unsafe { handle(bs, "bdrv_get_device_name") } {
            Ok(bs) => bs.device_name.as_ptr(),
            Err(_) => std::ptr::null(),
        }
    })
}

/// 1 if the open image is read-only, 0 if read-write, or a negative errno
/// (-EINVAL for NULL, -ENOMEDIUM when closed).
///
/// # Safety
/// `bs` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn bdrv_is_read_only(bs: *mut BlockDriverState) -> c_int {
    guard_int("bdrv_is_read_only", || {
        const F: &str = "bdrv_is_read_only";
        // SAFETY: forwarded caller contract.
        let r = unsafe { handle(bs, F) }
            .and_then(|bs| bs.with_image(F, |img| Ok(!img.writable() as c_int)));
        ret(r)
    })
}

/// The library version, e.g. "0.1.0" (static string).
#[no_mangle]
pub extern "C" fn bdrv_version() -> *const c_char {
    const V: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"",
        };
    V.as_ptr()
}

/// Creates an image with `drv`'s creation options (a list as
/// parse_option_parameters() returns; NULL for defaults, which needs a
/// non-zero size so is mostly useful with a list). Returns 0 or a negative
/// errno.
///
/// # Safety
/// `drv` is NULL or a valid BlockDriver; `filename` NULL or a C string;
/// `options` NULL or a list ending at a NULL name.
#[no_mangle]
pub unsafe extern "C" fn bdrv_create(
    drv: *mut BlockDriver,
    filename: *const c_char,
    options: *mut QEMUOptionParameter,
) -> c_int {
    guard_int("bdrv_create", || {
        const F: &str = "bdrv_create";
        if drv.is_null() {
            return fail(libc::EINVAL, format!("{F}: drv is NULL"));
        }
        // SAFETY: forwarded caller contract.
        let r = unsafe { driver_format(drv, F) }.and_then(|fmt| {
            // SAFETY: forwarded caller contract.
            unsafe { super::driver::create_with_list(fmt.unwrap_or("qcow2"), filename, options, F) }
        });
        ret(r)
    })
}
