//! Consistency check and repair (`bdrv_check`), option amendment
//! (`bdrv_amend`, `bdrv_amend_options`) and the log callback through which
//! a C host receives the report lines both of them (and a read-write open
//! of a dirty image) print.

use super::errors::{fail, guard, guard_int};
use super::handle::*;
use super::options::assigned_as_opts;
use super::types::*;
use crate::engine::{AmendOptions, CheckResult, Qcow2, FIX_ERRORS, FIX_LEAKS};
use std::ffi::{c_void, CString};
use std::os::raw::{c_char, c_int};

// ---- the log callback ------------------------------------------------------------------------

/// Sends the library's report lines to `cb` (with `opaque` passed back)
/// instead of stderr; NULL restores the default, one line per message on
/// stderr, as QEMU prints them. The lines are those QEMU prints: what
/// bdrv_check() finds and repairs ("ERROR cluster 5 refcount=0
/// reference=1", "Rebuilding refcount structure", "Repairing cluster 1
/// refcount=1 reference=0", "Leaked cluster 9 refcount=1 reference=0",
/// ...), the same lines for the repair a read-write bdrv_open() of a dirty
/// image does, "qcow2: Marking image as corrupt: ..." and warnings from
/// closing.
///
/// The setting is process-wide (not per handle or thread). `cb` may be
/// called from any thread that calls into the library, while the library
/// holds the image's internal lock: it must not call back into the library
/// for the same handle. Each message is one line without a trailing
/// newline, valid only during the call.
///
/// # Safety
/// `cb` is NULL or a function that may be called with `opaque` from any
/// thread until it is replaced.
#[no_mangle]
pub unsafe extern "C" fn bdrv_set_log_callback(cb: BdrvLogFunc, opaque: *mut c_void) {
    guard("bdrv_set_log_callback", (), || {
        // The opaque pointer travels as an integer: the C host promised it
        // may be used from any thread.
        let op = opaque as usize;
        crate::log::set_hook(cb.map(|f| {
            Box::new(move |msg: &str| {
                let line = CString::new(msg.replace('\0', " ")).unwrap_or_default();
                // SAFETY: `f` accepts (message, opaque) from any thread by
                // the caller's contract; `line` outlives the call.
                unsafe { f(line.as_ptr(), op as *mut c_void) }
            }) as Box<dyn Fn(&str) + Send + Sync>
        }));
    })
}

/// Runs `f` on the qcow2 image of an open handle (`writable`: -EACCES on a
/// read-only one); -ENOTSUP for raw images.
pub(crate) fn with_qcow2<T>(
    bs: &BlockDriverState,
    func: &str,
    writable: bool,
    f: impl FnOnce(&Qcow2, &OpenImage) -> CResult<T>,
) -> CResult<T> {
    let body = |img: &OpenImage| match img.image.qcow2() {
        Some(q) => f(q, img),
        None => Err(fail(
            libc::ENOTSUP,
            format!("{func}: not supported for raw images"),
        )),
    };
    if writable {
        bs.with_writable(func, body)
    } else {
        bs.with_image(func, body)
    }
}

// ---- check -----------------------------------------------------------------------------------

fn count(n: u64) -> c_int {
    n.min(c_int::MAX as u64) as c_int
}

fn check_result(r: &CheckResult) -> BdrvCheckResult {
    BdrvCheckResult {
        corruptions: count(r.corruptions),
        leaks: count(r.leaks),
        check_errors: count(r.check_errors),
        corruptions_fixed: count(r.corruptions_fixed),
        leaks_fixed: count(r.leaks_fixed),
        image_end_offset: r.image_end_offset.min(i64::MAX as u64) as i64,
        bfi: BlockFragInfo {
            allocated_clusters: r.allocated_clusters,
            total_clusters: r.total_clusters,
            fragmented_clusters: r.fragmented_clusters,
            compressed_clusters: r.compressed_clusters,
        },
    }
}

/// Checks the image's metadata as `qemu-img check` does and, with
/// BDRV_FIX_LEAKS and/or BDRV_FIX_ERRORS in `fix`, repairs it (including a
/// rebuild of a broken refcount structure with BDRV_FIX_ERRORS). Fills
/// `*res` with QEMU's counters: corruptions and leaks still present (a
/// repaired one counts in corruptions_fixed / leaks_fixed instead),
/// check_errors, image_end_offset and the cluster statistics in `bfi`.
/// Report lines (QEMU's wording) go to the log callback, stderr by default
/// (see bdrv_set_log_callback()). A repair that leaves no corruption and
/// no check error clears the dirty and corrupt bits.
///
/// Returns 0 when the check ran, whatever it found (look at `*res`, as
/// qemu-img does: corruptions give exit 2, leaks 3, check_errors 1); or
/// -EINVAL (NULL `res`, unknown bits in `fix`), -ENOTSUP (raw image),
/// -EACCES (`fix` != 0 on a read-only handle: open with BDRV_O_RDWR, and
/// BDRV_O_CHECK to get a dirty or corrupt image as it is rather than
/// repaired or refused at open), -EIO when the check itself failed (e.g.
/// "ERROR need to rebuild refcount structures" with only BDRV_FIX_LEAKS;
/// `*res` is then zeroed), or another negative errno.
///
/// A second call with `fix` = 0 after a repair is qemu-img's "Double
/// checking the fixed image now...".
///
/// # Safety
/// `bs` is NULL or a live handle; `res` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn bdrv_check(
    bs: *mut BlockDriverState,
    res: *mut BdrvCheckResult,
    fix: BdrvCheckMode,
) -> c_int {
    guard_int("bdrv_check", || {
        const F: &str = "bdrv_check";
        let r = (|| {
            // SAFETY: forwarded caller contract.
            let bs = unsafe { handle(bs, F) }?;
            if res.is_null() {
                return Err(fail(libc::EINVAL, format!("{F}: res is NULL")));
            }
            // SAFETY: `res` is non-NULL and valid for writing by contract.
            unsafe { res.write(BdrvCheckResult::default()) };
            if fix & !(BDRV_FIX_LEAKS | BDRV_FIX_ERRORS) != 0 {
                return Err(fail(libc::EINVAL, format!("{F}: invalid check mode {fix}")));
            }
            let mut mode = 0;
            if fix & BDRV_FIX_LEAKS != 0 {
                mode |= FIX_LEAKS;
            }
            if fix & BDRV_FIX_ERRORS != 0 {
                mode |= FIX_ERRORS;
            }
            let out = with_qcow2(bs, F, fix != 0, |q, _| {
                let mut report = |line: &str| crate::log::warn(line);
                engine(q.check(mode, &mut report).map_err(|e| e.context(F)))
            })?;
            // SAFETY: as above.
            unsafe { res.write(check_result(&out)) };
            Ok(0)
        })();
        ret(r)
    })
}

// ---- amend -----------------------------------------------------------------------------------

fn amend_impl(bs: &BlockDriverState, opts: &str, func: &str) -> CResult<c_int> {
    with_qcow2(bs, func, true, |q, img| {
        let parsed = engine(AmendOptions::parse(opts))?;
        // A handle opened with BDRV_O_CHECK skipped the repair of a dirty
        // image; qemu-img amend opens read-write and so repairs first. Do
        // the same before touching the header, so that lazy_refcounts=off
        // or a downgrade never marks inconsistent refcounts clean.
        if img.flags & BDRV_O_CHECK != 0 && q.is_dirty() {
            let mut report = |line: &str| crate::log::warn(line);
            let r = engine(q.check(FIX_LEAKS | FIX_ERRORS, &mut report))?;
            if r.corruptions > 0 || r.check_errors > 0 {
                return Err(fail(
                    libc::EIO,
                    "Could not repair dirty image: Input/output error",
                ));
            }
        }
        engine(q.amend(&parsed))?;
        Ok(0)
    })
}

/// Changes options of the open image like `qemu-img amend -o OPTIONS`:
/// `compat` (0.10 / v2 or 1.1 / v3; a downgrade turns zero clusters into
/// data and clears the dirty bit and unknown compatible and autoclear
/// bits), `lazy_refcounts` (on/off), `refcount_bits`, `size`, and
/// `backing_file` / `backing_fmt` when unchanged. Creation-only options
/// (`cluster_size`, `encryption`, `preallocation`, ...) are refused. The
/// handle must be read-write. Returns 0, or -EINVAL with qemu-img 10's
/// message in bdrv_last_error() (e.g. "Lazy refcounts only supported with
/// compatibility level 1.1 and above (use compat=1.1 or greater)",
/// "Unknown compatibility level 0.42", or for a creation-only option the
/// two lines "Invalid parameter 'cluster_size'" and "This option is only
/// supported for image creation"), -ENOTSUP (what the format cannot do,
/// e.g. "Internal snapshots prevent downgrade of image"; raw images),
/// -EACCES (read-only handle) or another negative errno.
///
/// A dirty image is repaired before it is amended, as by qemu-img amend:
/// a read-write bdrv_open() already did that; on a handle opened with
/// BDRV_O_CHECK bdrv_amend() does it (report lines to the log callback).
///
/// # Safety
/// `bs` is NULL or a live handle; `options` NULL or a C string.
#[no_mangle]
pub unsafe extern "C" fn bdrv_amend(bs: *mut BlockDriverState, options: *const c_char) -> c_int {
    guard_int("bdrv_amend", || {
        const F: &str = "bdrv_amend";
        let r = (|| {
            // SAFETY: forwarded caller contract.
            let bs = unsafe { handle(bs, F) }?;
            // SAFETY: NULL or a C string by contract.
            let opts = unsafe { opt_utf8(options, F, "options") }?.unwrap_or("");
            amend_impl(bs, opts, F)
        })();
        ret(r)
    })
}

/// bdrv_amend() with an option list, as QEMU 1.7's `bdrv_amend_options`:
/// only the entries marked `assigned` (those set by set_option_parameter(),
/// set_option_parameter_int() or parse_option_parameters()) change the
/// image; a string option assigned NULL keeps its current value. Typical
/// use: `parse_option_parameters("compat=0.10", bdrv_qcow2.create_options,
/// NULL)`, then this, then free_option_parameters(). Returns as
/// bdrv_amend().
///
/// # Safety
/// `bs` is NULL or a live handle; `options` NULL or a list ending at a
/// NULL name.
#[no_mangle]
pub unsafe extern "C" fn bdrv_amend_options(
    bs: *mut BlockDriverState,
    options: *mut QEMUOptionParameter,
) -> c_int {
    guard_int("bdrv_amend_options", || {
        const F: &str = "bdrv_amend_options";
        let r = (|| {
            // SAFETY: forwarded caller contract.
            let bs = unsafe { handle(bs, F) }?;
            // SAFETY: NULL or a valid list by contract.
            let opts = unsafe { assigned_as_opts(options, F) }?;
            amend_impl(bs, &opts, F)
        })();
        ret(r)
    })
}
