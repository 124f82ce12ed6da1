//! The `BlockDriver` tables `bdrv_qcow2` and `bdrv_raw`: QEMU's member
//! names with synchronous semantics, and their creation option lists.
//!
//! Most members point at the public `bdrv_*` entry points, which work on
//! either format; only probe, open and create are per driver. The qcow2
//! table fills every member; the raw table
//! leaves the format-specific ones (info, check, make_empty, backing file,
//! compressed writes, amend, snapshots) NULL.

use super::api::*;
use super::check::*;
use super::errors::{fail, guard_int};
use super::handle::*;
use super::options::list_entries;
use super::snapshot::*;
use super::types::*;
use crate::engine::{self, CreateOptions};
use crate::format::QCOW_MAGIC;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int};
use std::ptr::{null, null_mut};

/// A block driver: its name, creation options and operations. Every
/// operation is synchronous and returns 0 (or a byte count / size where
/// noted) or a negative errno; its message is in bdrv_last_error(). A NULL
/// member means "not supported by this driver".
#[repr(C)]
pub struct BlockDriver {
    /// "qcow2" or "raw".
    pub format_name: *const c_char,
    /// Size of the driver's per-image state. Informational: hosts get
    /// handles from bdrv_new(), never allocate them.
    pub instance_size: c_int,
    /// Scores how well the first `buf_size` bytes of a file match this
    /// format: 100 for a qcow2 magic with version >= 2, 1 for raw, 0 for no.
    pub bdrv_probe: Option<
        unsafe extern "C" fn(buf: *const u8, buf_size: c_int, filename: *const c_char) -> c_int,
    >,
    /// Opens `filename` in `bs` as this format; flags as for bdrv_open().
    pub bdrv_open: Option<
        unsafe extern "C" fn(
            bs: *mut BlockDriverState,
            filename: *const c_char,
            flags: c_int,
        ) -> c_int,
    >,
    /// As bdrv_close().
    pub bdrv_close: Option<unsafe extern "C" fn(bs: *mut BlockDriverState)>,
    /// Creates an image from an option list (see create_options).
    pub bdrv_create: Option<
        unsafe extern "C" fn(filename: *const c_char, options: *mut QEMUOptionParameter) -> c_int,
    >,
    /// As bdrv_read() (512-byte sectors).
    pub bdrv_read: Option<
        unsafe extern "C" fn(
            bs: *mut BlockDriverState,
            sector_num: i64,
            buf: *mut u8,
            nb_sectors: c_int,
        ) -> c_int,
    >,
    /// As bdrv_write() (512-byte sectors).
    pub bdrv_write: Option<
        unsafe extern "C" fn(
            bs: *mut BlockDriverState,
            sector_num: i64,
            buf: *const u8,
            nb_sectors: c_int,
        ) -> c_int,
    >,
    /// As bdrv_pread(): returns the byte count.
    pub bdrv_pread: Option<
        unsafe extern "C" fn(
            bs: *mut BlockDriverState,
            offset: i64,
            buf: *mut std::ffi::c_void,
            count: c_int,
        ) -> c_int,
    >,
    /// As bdrv_pwrite(): returns the byte count.
    pub bdrv_pwrite: Option<
        unsafe extern "C" fn(
            bs: *mut BlockDriverState,
            offset: i64,
            buf: *const std::ffi::c_void,
            count: c_int,
        ) -> c_int,
    >,
    /// As bdrv_flush().
    pub bdrv_flush: Option<unsafe extern "C" fn(bs: *mut BlockDriverState) -> c_int>,
    /// As bdrv_discard().
    pub bdrv_discard: Option<
        unsafe extern "C" fn(
            bs: *mut BlockDriverState,
            sector_num: i64,
            nb_sectors: c_int,
        ) -> c_int,
    >,
    /// As bdrv_write_zeroes().
    pub bdrv_write_zeroes: Option<
        unsafe extern "C" fn(
            bs: *mut BlockDriverState,
            sector_num: i64,
            nb_sectors: c_int,
            flags: c_int,
        ) -> c_int,
    >,
    /// As bdrv_is_allocated().
    pub bdrv_is_allocated: Option<
        unsafe extern "C" fn(
            bs: *mut BlockDriverState,
            sector_num: i64,
            nb_sectors: c_int,
            pnum: *mut c_int,
        ) -> c_int,
    >,
    /// As bdrv_truncate().
    pub bdrv_truncate:
        Option<unsafe extern "C" fn(bs: *mut BlockDriverState, offset: i64) -> c_int>,
    /// As bdrv_getlength(): returns the virtual size.
    pub bdrv_getlength: Option<unsafe extern "C" fn(bs: *mut BlockDriverState) -> i64>,
    /// As bdrv_get_allocated_file_size().
    pub bdrv_get_allocated_file_size:
        Option<unsafe extern "C" fn(bs: *mut BlockDriverState) -> i64>,
    /// As bdrv_get_info() (NULL for raw).
    pub bdrv_get_info:
        Option<unsafe extern "C" fn(bs: *mut BlockDriverState, bdi: *mut BlockDriverInfo) -> c_int>,
    /// As bdrv_check() (NULL for raw).
    pub bdrv_check: Option<
        unsafe extern "C" fn(
            bs: *mut BlockDriverState,
            result: *mut BdrvCheckResult,
            fix: BdrvCheckMode,
        ) -> c_int,
    >,
    /// As bdrv_make_empty() (NULL for raw).
    pub bdrv_make_empty: Option<unsafe extern "C" fn(bs: *mut BlockDriverState) -> c_int>,
    /// As bdrv_change_backing_file() (NULL for raw).
    pub bdrv_change_backing_file: Option<
        unsafe extern "C" fn(
            bs: *mut BlockDriverState,
            backing_file: *const c_char,
            backing_fmt: *const c_char,
        ) -> c_int,
    >,
    /// As bdrv_write_compressed(): one whole cluster (NULL for raw).
    pub bdrv_write_compressed: Option<
        unsafe extern "C" fn(
            bs: *mut BlockDriverState,
            sector_num: i64,
            buf: *const u8,
            nb_sectors: c_int,
        ) -> c_int,
    >,
    /// As bdrv_amend_options(): qemu-img amend with the `assigned` entries
    /// of an option list (QEMU 1.7's member; NULL for raw).
    pub bdrv_amend_options: Option<
        unsafe extern "C" fn(bs: *mut BlockDriverState, options: *mut QEMUOptionParameter) -> c_int,
    >,
    /// As bdrv_snapshot_create() (NULL for raw).
    pub bdrv_snapshot_create: Option<
        unsafe extern "C" fn(bs: *mut BlockDriverState, sn_info: *mut QEMUSnapshotInfo) -> c_int,
    >,
    /// As bdrv_snapshot_goto() (NULL for raw).
    pub bdrv_snapshot_goto: Option<
        unsafe extern "C" fn(bs: *mut BlockDriverState, snapshot_id: *const c_char) -> c_int,
    >,
    /// As bdrv_snapshot_delete() (NULL for raw).
    pub bdrv_snapshot_delete: Option<
        unsafe extern "C" fn(bs: *mut BlockDriverState, snapshot_id: *const c_char) -> c_int,
    >,
    /// As bdrv_snapshot_list(); free the array with bdrv_snapshot_list_free()
    /// or free() (NULL for raw).
    pub bdrv_snapshot_list: Option<
        unsafe extern "C" fn(
            bs: *mut BlockDriverState,
            psn_info: *mut *mut QEMUSnapshotInfo,
        ) -> c_int,
    >,
    /// Shows an internal snapshot through a read-only handle
    /// (bdrv_snapshot_load_tmp()).
    pub bdrv_snapshot_load_tmp: Option<
        unsafe extern "C" fn(bs: *mut BlockDriverState, snapshot_name: *const c_char) -> c_int,
    >,
    /// The creation options with their defaults and help texts, ending at
    /// an entry with a NULL name. Copy it with parse_option_parameters()
    /// rather than changing it in place.
    pub create_options: *mut QEMUOptionParameter,
}

const fn opt(
    name: &'static CStr,
    ty: OptionParameterType,
    n: u64,
    help: &'static CStr,
) -> QEMUOptionParameter {
    QEMUOptionParameter {
        name: name.as_ptr(),
        r#type: ty,
        value: QEMUOptionValue { n },
        help: help.as_ptr(),
        assigned: false,
    }
}

const fn opt_end() -> QEMUOptionParameter {
    QEMUOptionParameter {
        name: null(),
        r#type: 0,
        value: QEMUOptionValue { n: 0 },
        help: null(),
        assigned: false,
    }
}

static mut QCOW2_CREATE_OPTIONS: [QEMUOptionParameter; 14] = [
    opt(c"size", OPT_SIZE, 0, c"Virtual disk size"),
    opt(
        c"compat",
        OPT_STRING,
        0,
        c"Compatibility level (0.10 or 1.1; default 1.1)",
    ),
    opt(c"backing_file", OPT_STRING, 0, c"File name of a base image"),
    opt(
        c"backing_fmt",
        OPT_STRING,
        0,
        c"Image format of the base image",
    ),
    opt(
        c"encryption",
        OPT_FLAG,
        0,
        c"Encrypt the image (not supported)",
    ),
    opt(
        c"cluster_size",
        OPT_SIZE,
        65536,
        c"qcow2 cluster size (512 to 2M, a power of two; default 64k)",
    ),
    opt(
        c"preallocation",
        OPT_STRING,
        0,
        c"Preallocation mode (off, metadata, falloc, full; default off)",
    ),
    opt(
        c"lazy_refcounts",
        OPT_FLAG,
        0,
        c"Postpone refcount updates (compat 1.1 only; default off)",
    ),
    opt(
        c"refcount_bits",
        OPT_NUMBER,
        16,
        c"Width of a reference count entry in bits (1 to 64, a power of two; default 16)",
    ),
    opt(
        c"compression_type",
        OPT_STRING,
        0,
        c"Compression method for compressed clusters (zlib or zstd; default zlib)",
    ),
    opt(
        c"extended_l2",
        OPT_FLAG,
        0,
        c"Extended L2 tables (32 subclusters per cluster; cluster size at least 16k)",
    ),
    opt(
        c"data_file",
        OPT_STRING,
        0,
        c"File name of an external data file (not supported)",
    ),
    opt(
        c"data_file_raw",
        OPT_FLAG,
        0,
        c"The external data file must stay valid as a raw image (not supported)",
    ),
    opt_end(),
];

static mut RAW_CREATE_OPTIONS: [QEMUOptionParameter; 4] = [
    opt(c"size", OPT_SIZE, 0, c"Virtual disk size"),
    opt(
        c"preallocation",
        OPT_STRING,
        0,
        c"Preallocation mode (off, falloc, full; default off)",
    ),
    opt(
        c"extent_size_hint",
        OPT_SIZE,
        0,
        c"Extent size hint for the image file (default 1M where the file system takes one)",
    ),
    opt_end(),
];

/// The qcow2 driver. Pass &bdrv_qcow2 to bdrv_open() to insist on qcow2.
/// Every member is set.
#[no_mangle]
pub static mut bdrv_qcow2: BlockDriver = BlockDriver {
    format_name: c"qcow2".as_ptr(),
    instance_size: std::mem::size_of::<BlockDriverState>() as c_int,
    bdrv_probe: Some(qcow2_probe),
    bdrv_open: Some(qcow2_open),
    bdrv_close: Some(bdrv_close),
    bdrv_create: Some(qcow2_create),
    bdrv_read: Some(bdrv_read),
    bdrv_write: Some(bdrv_write),
    bdrv_pread: Some(bdrv_pread),
    bdrv_pwrite: Some(bdrv_pwrite),
    bdrv_flush: Some(bdrv_flush),
    bdrv_discard: Some(bdrv_discard),
    bdrv_write_zeroes: Some(bdrv_write_zeroes),
    bdrv_is_allocated: Some(bdrv_is_allocated),
    bdrv_truncate: Some(bdrv_truncate),
    bdrv_getlength: Some(bdrv_getlength),
    bdrv_get_allocated_file_size: Some(bdrv_get_allocated_file_size),
    bdrv_get_info: Some(bdrv_get_info),
    bdrv_check: Some(bdrv_check),
    bdrv_make_empty: Some(bdrv_make_empty),
    bdrv_change_backing_file: Some(bdrv_change_backing_file),
    bdrv_write_compressed: Some(bdrv_write_compressed),
    bdrv_amend_options: Some(bdrv_amend_options),
    bdrv_snapshot_create: Some(bdrv_snapshot_create),
    bdrv_snapshot_goto: Some(bdrv_snapshot_goto),
    bdrv_snapshot_delete: Some(bdrv_snapshot_delete),
    bdrv_snapshot_list: Some(bdrv_snapshot_list),
    bdrv_snapshot_load_tmp: Some(bdrv_snapshot_load_tmp),
    create_options: &raw mut QCOW2_CREATE_OPTIONS as *mut QEMUOptionParameter,
};

/// The raw driver: guest bytes are file bytes. Format-specific members
/// (get_info, check, make_empty, change_backing_file, write_compressed,
/// amend, snapshots) are NULL.
#[no_mangle]
pub static mut bdrv_raw: BlockDriver = BlockDriver {
    format_name: c"raw".as_ptr(),
    instance_size: std::mem::size_of::<BlockDriverState>() as c_int,
    bdrv_probe: Some(raw_probe),
    bdrv_open: Some(raw_open),
    bdrv_close: Some(bdrv_close),
    bdrv_create: Some(raw_create),
    bdrv_read: Some(bdrv_read),
    bdrv_write: Some(bdrv_write),
    bdrv_pread: Some(bdrv_pread),
    bdrv_pwrite: Some(bdrv_pwrite),
    bdrv_flush: Some(bdrv_flush),
    bdrv_discard: Some(bdrv_discard),
    bdrv_write_zeroes: Some(bdrv_write_zeroes),
    bdrv_is_allocated: Some(bdrv_is_allocated),
    bdrv_truncate: Some(bdrv_truncate),
    bdrv_getlength: Some(bdrv_getlength),
    bdrv_get_allocated_file_size: Some(bdrv_get_allocated_file_size),
    bdrv_get_info: None,
    bdrv_check: None,
    bdrv_make_empty: None,
    bdrv_change_backing_file: None,
    bdrv_write_compressed: None,
    bdrv_amend_options: None,
    bdrv_snapshot_create: None,
    bdrv_snapshot_goto: None,
    bdrv_snapshot_delete: None,
    bdrv_snapshot_list: None,
    bdrv_snapshot_load_tmp: None,
    create_options: &raw mut RAW_CREATE_OPTIONS as *mut QEMUOptionParameter,
};

/// The driver named `format_name` ("qcow2" or "raw"), or NULL.
///
/// # Safety
/// `format_name` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn bdrv_find_format(format_name: *const c_char) -> *mut BlockDriver {
    super::errors::guard("bdrv_find_format", null_mut(), || {
        // SAFETY: NULL or a C string by contract.
        match unsafe { c_str(format_name, "bdrv_find_format", "format_name") } {
            Ok(n) if n.to_bytes() == b"qcow2" => &raw mut bdrv_qcow2,
            Ok(n) if n.to_bytes() == b"raw" => &raw mut bdrv_raw,
            Ok(n) => {
                fail(
                    libc::ENOENT,
                    format!("Unknown driver '{}'", n.to_string_lossy()),
                );
                null_mut()
            }
            Err(_) => null_mut(),
        }
    })
}

/// # Safety
/// `buf` is NULL or valid for `buf_size` bytes.
unsafe fn probe_bytes<'a>(buf: *const u8, buf_size: c_int) -> &'a [u8] {
    if buf.is_null() || buf_size <= 0 {
        return &[];
    }
    // SAFETY: non-NULL and valid for buf_size bytes by contract.
    unsafe { std::slice::from_raw_parts(buf, buf_size as usize) }
}

unsafe extern "C" fn qcow2_probe(
    buf: *const u8,
    buf_size: c_int,
    _filename: *const c_char,
) -> c_int {
    super::errors::guard("bdrv_qcow2.bdrv_probe", 0, || {
        // SAFETY: forwarded caller contract.
        let b = unsafe { probe_bytes(buf, buf_size) };
        if b.len() >= 8
            && u32::from_be_bytes([b[0], b[1], b[2], b[3]]) == QCOW_MAGIC
            && u32::from_be_bytes([b[4], b[5], b[6], b[7]]) >= 2
        {
            100
        } else {
            0
        }
    })
}

unsafe extern "C" fn raw_probe(
    _buf: *const u8,
    _buf_size: c_int,
    _filename: *const c_char,
) -> c_int {
    1
}

/// The open and create callbacks of one format's driver table: the same
/// entry points with the format name (and the guard's label) filled in.
macro_rules! format_callbacks {
    ($open:ident, $create:ident, $fmt:literal) => {
        unsafe extern "C" fn $open(
            bs: *mut BlockDriverState,
            filename: *const c_char,
            flags: c_int,
        ) -> c_int {
            guard_int(concat!("bdrv_", $fmt, ".bdrv_open"), || {
                // SAFETY: forwarded caller contract.
                ret(unsafe { open_common(bs, filename, flags, Some($fmt), "bdrv_open") })
            })
        }

        unsafe extern "C" fn $create(
            filename: *const c_char,
            options: *mut QEMUOptionParameter,
        ) -> c_int {
            guard_int(concat!("bdrv_", $fmt, ".bdrv_create"), || {
                // SAFETY: forwarded caller contract.
                ret(unsafe { create_with_list($fmt, filename, options, "bdrv_create") })
            })
        }
    };
}

format_callbacks!(qcow2_open, qcow2_create, "qcow2");
format_callbacks!(raw_open, raw_create, "raw");

/// The options a raw image takes (QEMU's file driver's, without nocow).
pub(crate) const RAW_KEYS: [&str; 3] = ["size", "preallocation", "extent_size_hint"];

/// Creates an image from an option list: string options that are set
/// (non-NULL), numbers and sizes that are non-zero and flags that are on
/// are applied over the defaults.
///
/// # Safety
/// `filename` is NULL or a C string; `options` NULL or a valid list.
pub(crate) unsafe fn create_with_list(
    fmt: &str,
    filename: *const c_char,
    options: *mut QEMUOptionParameter,
    func: &str,
) -> CResult<c_int> {
    // SAFETY: forwarded caller contract.
    let path = c_path(unsafe { c_str(filename, func, "filename") }?).to_path_buf();
    let name = path.display().to_string();
    let mut o = CreateOptions::default();
    // SAFETY: forwarded caller contract.
    for (key, ty, value) in unsafe { list_entries(options, func) }? {
        let text = match ty {
            OPT_STRING => value,
            OPT_FLAG => value.filter(|v| v != "0").map(|_| "on".to_string()),
            _ => value.filter(|v| v != "0"),
        };
        let Some(text) = text else { continue };
        if fmt == "raw" && !RAW_KEYS.contains(&key.as_str()) {
            return Err(fail(
                libc::EINVAL,
                format!("{name}: Invalid parameter '{key}' for format 'raw'"),
            ));
        }
        engine(o.set(&key, &text).map_err(|e| e.context(&name)))?;
    }
    if fmt == "raw" {
        let r = engine::create_raw(&path, o.size, o.preallocation, o.extent_size_hint);
        engine(r.map_err(|e| e.context(&name)))?;
    } else {
        engine(engine::create(&path, &o).map_err(|e| e.context(&name)))?;
    }
    Ok(0)
}
