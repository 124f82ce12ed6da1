//! Internal snapshots with QEMU 1.x's entry points: `bdrv_snapshot_create`
//! (from a `QEMUSnapshotInfo`), `_goto`, `_delete`, `_list` (a malloc()ed
//! array), `bdrv_snapshot_list_free` and `_load_tmp` (a read-only handle
//! shows a snapshot); the VM state a snapshot keeps, with
//! `bdrv_save_vmstate` / `bdrv_load_vmstate`.

use super::check::with_qcow2;
use super::errors::{fail, guard, guard_int};
use super::handle::*;
use super::types::*;
use crate::format::snapshot::Snapshot;
use std::os::raw::{c_char, c_int};
use std::ptr::null_mut;

/// Copies `s` into a fixed C array, truncated to leave room for the NUL
/// (as QEMU's pstrcpy does).
fn put_str(dst: &mut [c_char], s: &str) {
    let n = s.len().min(dst.len() - 1);
    for (d, b) in dst.iter_mut().zip(&s.as_bytes()[..n]) {
        *d = *b as c_char;
    }
    dst[n] = 0;
}

/// Reads a fixed C array up to its first NUL (all of it if there is none).
fn get_str(src: &[c_char], func: &str, what: &str) -> CResult<String> {
    let bytes: Vec<u8> = src
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8(bytes)
        .map_err(|_| fail(libc::EINVAL, format!("{func}: {what} is not valid UTF-8")))
}

fn info_of(s: &Snapshot) -> QEMUSnapshotInfo {
    let mut info = QEMUSnapshotInfo {
        id_str: [0; 128],
        name: [0; 256],
        vm_state_size: s.vm_state_size,
        date_sec: s.date_sec,
        date_nsec: s.date_nsec,
        vm_clock_nsec: s.vm_clock_nsec,
    };
    put_str(&mut info.id_str, &s.id);
    put_str(&mut info.name, &s.name);
    info
}

/// The snapshot named by `id` (an ID first, then a name, as QEMU 1.x's
/// find_snapshot_by_id_or_name), or -ENOENT.
fn find(list: &[Snapshot], id: &str, func: &str, file: &str) -> CResult<Snapshot> {
    list.iter()
        .find(|s| s.id == id)
        .or_else(|| list.iter().find(|s| s.name == id))
        .cloned()
        .ok_or_else(|| {
            fail(
                libc::ENOENT,
                format!("{func}: Could not find snapshot '{id}' in '{file}'"),
            )
        })
}

/// Creates an internal snapshot of the current disk contents, as QEMU's
/// qcow2 driver does from `*sn_info`: `id_str` "" picks the next free
/// numeric ID (written back into `sn_info->id_str`), another ID must not
/// be in use yet (-EEXIST); `name` is stored as given (names need not be
/// unique); `date_sec` / `date_nsec` are stored as given, except that both
/// 0 means "now"; `vm_clock_nsec` is stored; `vm_state_size` is the size
/// of the VM state written before with bdrv_save_vmstate() (0: none),
/// which the snapshot keeps and the current disk then drops, as in QEMU's
/// savevm. The handle must be read-write. Returns 0 or a negative errno (-ENOTSUP for raw images,
/// -EFBIG past 65536 snapshots).
///
/// # Safety
/// `bs` is NULL or a live handle; `sn_info` is NULL or valid for reading
/// and writing.
#[no_mangle]
pub unsafe extern "C" fn bdrv_snapshot_create(
    bs: *mut BlockDriverState,
    sn_info: *mut QEMUSnapshotInfo,
) -> c_int {
    guard_int("bdrv_snapshot_create", || {
        const F: &str = "bdrv_snapshot_create";
        let r = (|| {
            // SAFETY: forwarded caller contract.
            let bs = unsafe { handle(bs, F) }?;
            if sn_info.is_null() {
                return Err(fail(libc::EINVAL, format!("{F}: sn_info is NULL")));
            }
            // SAFETY: non-NULL and valid for reading by contract.
            let info = unsafe { sn_info.read() };
            let id = get_str(&info.id_str, F, "sn_info->id_str")?;
            let name = get_str(&info.name, F, "sn_info->name")?;
            let date = match (info.date_sec, info.date_nsec) {
                (0, 0) => None,
                d => Some(d),
            };
            let created = with_qcow2(bs, F, true, |q, _| {
                if !id.is_empty() && q.snapshots().iter().any(|s| s.id == id) {
                    return Err(fail(
                        libc::EEXIST,
                        format!("{F}: a snapshot with ID '{id}' already exists"),
                    ));
                }
                let id = (!id.is_empty()).then_some(id.as_str());
                engine(q.snapshot_create_with(
                    id,
                    &name,
                    date,
                    info.vm_clock_nsec,
                    info.vm_state_size,
                ))
            })?;
            let out = info_of(&created);
            // SAFETY: valid for writing by contract.
            unsafe {
                (*sn_info).id_str = out.id_str;
                (*sn_info).date_sec = out.date_sec;
                (*sn_info).date_nsec = out.date_nsec;
            }
            Ok(0)
        })();
        ret(r)
    })
}

/// # Safety
/// `bs` is NULL or a live handle; `snapshot_id` NULL or a C string.
unsafe fn by_id(
    bs: *mut BlockDriverState,
    snapshot_id: *const c_char,
    func: &str,
    op: impl FnOnce(&crate::engine::Qcow2, &str) -> crate::error::Result<()>,
) -> CResult<c_int> {
    // SAFETY: forwarded caller contract.
    let bs = unsafe { handle(bs, func) }?;
    // SAFETY: forwarded caller contract.
    let id = unsafe { c_str(snapshot_id, func, "snapshot_id") }?;
    let id = id.to_str().map_err(|_| {
        fail(
            libc::EINVAL,
            format!("{func}: snapshot_id is not valid UTF-8"),
        )
    })?;
    with_qcow2(bs, func, true, |q, _| {
        let sn = find(&q.snapshots(), id, func, q.name())?;
        // Name the snapshot by its ID: a name may be shared, an ID not.
        engine(op(q, &sn.id))?;
        Ok(0)
    })
}

/// Reverts the disk to the snapshot `snapshot_id` (an ID, or else a name),
/// as `qemu-img snapshot -a`. The handle must be read-write. Returns 0,
/// -ENOENT (no such snapshot), -ENOTSUP (raw), -EACCES (read-only) or
/// another negative errno.
///
/// # Safety
/// `bs` is NULL or a live handle; `snapshot_id` NULL or a C string.
#[no_mangle]
pub unsafe extern "C" fn bdrv_snapshot_goto(
    bs: *mut BlockDriverState,
    snapshot_id: *const c_char,
) -> c_int {
    guard_int("bdrv_snapshot_goto", || {
        // SAFETY: forwarded caller contract.
        ret(unsafe {
            by_id(bs, snapshot_id, "bdrv_snapshot_goto", |q, id| {
                q.snapshot_apply(id)
            })
        })
    })
}

/// Deletes the snapshot `snapshot_id` (an ID, or else a name), freeing the
/// clusters only it used, as `qemu-img snapshot -d`. Returns as
/// bdrv_snapshot_goto().
///
/// # Safety
/// `bs` is NULL or a live handle; `snapshot_id` NULL or a C string.
#[no_mangle]
pub unsafe extern "C" fn bdrv_snapshot_delete(
    bs: *mut BlockDriverState,
    snapshot_id: *const c_char,
) -> c_int {
    guard_int("bdrv_snapshot_delete", || {
        // SAFETY: forwarded caller contract.
        ret(unsafe {
            by_id(bs, snapshot_id, "bdrv_snapshot_delete", |q, id| {
                q.snapshot_delete(id)
            })
        })
    })
}

/// Makes a read-only handle show the snapshot `snapshot_name` (an ID, or
/// else a name, as QEMU 1.x's find_snapshot_by_id_or_name) in place of the
/// current disk, as QEMU's bdrv_snapshot_load_tmp: reads then return the
/// snapshot's contents; nothing on disk changes; the length stays the
/// current disk's (clusters past the snapshot's size read as zeros or
/// from the backing file). Loading another snapshot later replaces it;
/// close and reopen the image to see the current disk again. Returns 0,
/// -EINVAL (the handle is read-write), -ENOENT (no such snapshot),
/// -ENOTSUP (raw) or another negative errno.
///
/// # Safety
/// `bs` is NULL or a live handle; `snapshot_name` NULL or a C string.
#[no_mangle]
pub unsafe extern "C" fn bdrv_snapshot_load_tmp(
    bs: *mut BlockDriverState,
    snapshot_name: *const c_char,
) -> c_int {
    guard_int("bdrv_snapshot_load_tmp", || {
        const F: &str = "bdrv_snapshot_load_tmp";
        let r = (|| {
            // SAFETY: forwarded caller contract.
            let bs = unsafe { handle(bs, F) }?;
            // SAFETY: forwarded caller contract.
            let id = unsafe { c_str(snapshot_name, F, "snapshot_name") }?;
            let id = id.to_str().map_err(|_| {
                fail(
                    libc::EINVAL,
                    format!("{F}: snapshot_name is not valid UTF-8"),
                )
            })?;
            with_qcow2(bs, F, false, |q, img| {
                if img.writable() {
                    return Err(fail(
                        libc::EINVAL,
                        format!("{F}: the image is open read-write (a snapshot loads on a read-only handle)"),
                    ));
                }
                let sn = find(&q.snapshots(), id, F, q.name())?;
                engine(q.snapshot_load_tmp(Some(&sn.id), None))?;
                Ok(0)
            })
        })();
        ret(r)
    })
}

/// Checks a VM state request and runs `op(image, pos, size)`
/// (`writable`: the handle must be).
fn vmstate_request(
    bs: &BlockDriverState,
    func: &str,
    pos: i64,
    size: c_int,
    writable: bool,
    op: impl FnOnce(&crate::engine::Qcow2, u64, usize) -> crate::error::Result<()>,
) -> CResult<c_int> {
    if pos < 0 || size < 0 {
        return Err(fail(
            libc::EINVAL,
            format!("{func}: negative position or size ({pos}, {size})"),
        ));
    }
    with_qcow2(bs, func, writable, |q, _| {
        engine(op(q, pos as u64, size as usize))?;
        Ok(size)
    })
}

/// Writes `size` bytes of VM state from `buf` at byte `pos` of the image's
/// VM state area (past the disk; QEMU's savevm stream), before
/// bdrv_snapshot_create() with `vm_state_size` set keeps it in a snapshot.
/// Returns `size`, or -EINVAL (negative `pos` or `size`, NULL `buf`,
/// past 2^63), -EACCES (read-only), -ENOTSUP (raw), -EFBIG (the L1 table
/// would pass its limit) or another negative errno.
///
/// # Safety
/// `bs` is NULL or a live handle; `buf` is valid for `size` bytes.
#[no_mangle]
pub unsafe extern "C" fn bdrv_save_vmstate(
    bs: *mut BlockDriverState,
    buf: *const u8,
    pos: i64,
    size: c_int,
) -> c_int {
    guard_int("bdrv_save_vmstate", || {
        const F: &str = "bdrv_save_vmstate";
        let r = (|| {
            // SAFETY: forwarded caller contract.
            let bs = unsafe { handle(bs, F) }?;
            if buf.is_null() && size > 0 {
                return Err(fail(libc::EINVAL, format!("{F}: buf is NULL")));
            }
            vmstate_request(bs, F, pos, size, true, |q, pos, n| {
                let data = match n {
                    0 => &[][..],
                    // SAFETY: non-NULL and valid for n bytes by contract.
                    _ => unsafe { std::slice::from_raw_parts(buf, n) },
                };
                q.write_vmstate(data, pos)
            })
        })();
        ret(r)
    })
}

/// Reads `size` bytes of VM state at byte `pos` into `buf` (QEMU's loadvm
/// after bdrv_snapshot_goto() brought a snapshot's state back; what was
/// never written reads as zeros). Read-only handles too. Returns `size`
/// or a negative errno as bdrv_save_vmstate().
///
/// # Safety
/// `bs` is NULL or a live handle; `buf` is valid for writing `size` bytes.
#[no_mangle]
pub unsafe extern "C" fn bdrv_load_vmstate(
    bs: *mut BlockDriverState,
    buf: *mut u8,
    pos: i64,
    size: c_int,
) -> c_int {
    guard_int("bdrv_load_vmstate", || {
        const F: &str = "bdrv_load_vmstate";
        let r = (|| {
            // SAFETY: forwarded caller contract.
            let bs = unsafe { handle(bs, F) }?;
            if buf.is_null() && size > 0 {
                return Err(fail(libc::EINVAL, format!("{F}: buf is NULL")));
            }
            vmstate_request(bs, F, pos, size, false, |q, pos, n| {
                if n == 0 {
                    return Ok(());
                }
                // SAFETY: non-NULL and valid for writing n bytes by
                // contract, not accessed by anyone else during the call.
                let out = unsafe { std::slice::from_raw_parts_mut(buf, n) };
                q.read_vmstate(out, pos)
            })
        })();
        ret(r)
    })
}

/// Lists the internal snapshots in table order: stores a malloc()ed array
/// of them in `*psn_info` and returns their number. With no snapshots it
/// returns 0 and stores NULL (as QEMU's qcow2 driver). Free the array with
/// bdrv_snapshot_list_free() or free() (QEMU's callers used g_free(); the
/// array holds no pointers). Works on read-only handles. Returns a
/// negative errno (-ENOTSUP for raw images) and leaves `*psn_info` NULL
/// on failure.
///
/// # Safety
/// `bs` is NULL or a live handle; `psn_info` NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn bdrv_snapshot_list(
    bs: *mut BlockDriverState,
    psn_info: *mut *mut QEMUSnapshotInfo,
) -> c_int {
    guard_int("bdrv_snapshot_list", || {
        const F: &str = "bdrv_snapshot_list";
        let r = (|| {
            // SAFETY: forwarded caller contract.
            let bs = unsafe { handle(bs, F) }?;
            if psn_info.is_null() {
                return Err(fail(libc::EINVAL, format!("{F}: psn_info is NULL")));
            }
            // SAFETY: non-NULL and valid for writing by contract.
            unsafe { psn_info.write(null_mut()) };
            let list = with_qcow2(bs, F, false, |q, _| Ok(q.snapshots()))?;
            if list.is_empty() {
                return Ok(0);
            }
            if list.len() > c_int::MAX as usize {
                return Err(fail(libc::EFBIG, format!("{F}: too many snapshots")));
            }
            // SAFETY: calloc of a count and element size that do not overflow
            // (calloc checks); NULL is handled below.
            let arr: *mut QEMUSnapshotInfo =
                unsafe { libc::calloc(list.len(), std::mem::size_of::<QEMUSnapshotInfo>()) }.cast();
            if arr.is_null() {
                return Err(fail(libc::ENOMEM, format!("{F}: out of memory")));
            }
            for (i, s) in list.iter().enumerate() {
                // SAFETY: i < list.len(), the array's length.
                unsafe { arr.add(i).write(info_of(s)) };
            }
            // SAFETY: as above.
            unsafe { psn_info.write(arr) };
            Ok(list.len() as c_int)
        })();
        ret(r)
    })
}

/// Frees an array from bdrv_snapshot_list() (the same as free()). NULL is
/// ignored.
///
/// # Safety
/// `sn_info` is NULL or an array from bdrv_snapshot_list() not freed yet.
#[no_mangle]
pub unsafe extern "C" fn bdrv_snapshot_list_free(sn_info: *mut QEMUSnapshotInfo) {
    guard("bdrv_snapshot_list_free", (), || {
        // SAFETY: NULL or calloc()ed by bdrv_snapshot_list, by contract.
        unsafe { libc::free(sn_info.cast()) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_truncated_and_terminated() {
        let mut a = [1 as c_char; 4];
        put_str(&mut a, "abcdef");
        assert_eq!(get_str(&a, "t", "x").unwrap(), "abc");
        put_str(&mut a, "");
        assert_eq!(get_str(&a, "t", "x").unwrap(), "");
        let full = [b'z' as c_char; 3];
        assert_eq!(get_str(&full, "t", "x").unwrap(), "zzz");
    }
}
