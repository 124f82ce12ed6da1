//! The error side of the C ABI: the per-thread message behind
//! `bdrv_last_error()`, the mapping from [`Error`] to a negative errno, and
//! the guard that keeps every panic on the Rust side of the boundary.

use crate::error::Error;
use std::any::Any;
use std::cell::RefCell;
use std::ffi::CString;
use std::os::raw::{c_char, c_int};
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `msg` as this thread's last error.
pub(crate) fn set_last_error(msg: &str) {
    // Interior NULs cannot appear in a C string: show them as spaces.
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Records `msg` and returns `-errno`.
pub(crate) fn fail(errno: c_int, msg: impl AsRef<str>) -> c_int {
    set_last_error(msg.as_ref());
    -errno
}

/// Records an engine error and returns its negative errno.
pub(crate) fn fail_with(e: &Error) -> c_int {
    fail(e.errno(), e.to_string())
}

/// The pointer `bdrv_last_error()` hands out: valid until the next failing
/// call on this thread replaces the message.
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

fn panic_text(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs one entry point's body. A panic becomes `on_panic` (normally
/// `-EIO`) and the message "internal error in <func>: <panic text>".
pub(crate) fn guard<T>(func: &str, on_panic: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(p) => {
            set_last_error(&format!("internal error in {func}: {}", panic_text(&*p)));
            on_panic
        }
    }
}

/// [`guard`] for the common `int`-returning entry point.
pub(crate) fn guard_int(func: &str, body: impl FnOnce() -> c_int) -> c_int {
    guard(func, -libc::EIO, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        // SAFETY: last_error_ptr() points to this thread's live CString.
        unsafe { CStr::from_ptr(last_error_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_eio_and_a_message() {
        let r = guard_int("bdrv_test", || panic!("boom"));
        assert_eq!(r, -libc::EIO);
        assert_eq!(last(), "internal error in bdrv_test: boom");
        let r = guard("bdrv_test2", 7, || -> i32 {
            panic!("{}", String::from("formatted"))
        });
        assert_eq!(r, 7);
        assert_eq!(last(), "internal error in bdrv_test2: formatted");
    }

    #[test]
    fn messages_are_per_thread_and_survive_success() {
        assert_eq!(fail(libc::EINVAL, "first"), -libc::EINVAL);
        std::thread::spawn(|| {
            set_last_error("other thread");
        })
        .join()
        .unwrap();
        assert_eq!(guard_int("ok", || 0), 0);
        assert_eq!(last(), "first");
        set_last_error("with\0nul");
        assert_eq!(last(), "with nul");
    }
}
