//! QEMU's creation-option lists (`QEMUOptionParameter` arrays ending at a
//! NULL name): parse, set, get, append, free.
//!
//! Ownership rules, as in QEMU: a list made by the library (by
//! parse_option_parameters() or append_option_parameters()) is one
//! malloc()ed array; its OPT_STRING values are malloc()ed strings owned by
//! the list; its `name` and `help` pointers are borrowed from the list it
//! was copied from (a driver's create_options are static). Memory comes
//! from the C allocator, so free_option_parameters() and free() agree.

use super::errors::{fail, guard, guard_int};
use super::handle::{c_str, ret, CResult};
use super::types::*;
use crate::engine::parse_size;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int};
use std::ptr::null_mut;

/// Number of entries before the terminator.
///
/// # Safety
/// `list` is non-NULL and ends at an entry with a NULL name.
unsafe fn list_len(list: *const QEMUOptionParameter) -> usize {
    let mut n = 0;
    // SAFETY: every entry up to and including the terminator is readable.
    while !unsafe { (*list.add(n)).name }.is_null() {
        n += 1;
    }
    n
}

/// Reads an entry's type as a plain int (never as a Rust enum).
///
/// # Safety
/// `p` points to a readable entry.
unsafe fn entry_type(p: *const QEMUOptionParameter) -> c_int {
    // SAFETY: readable by contract; the field is a C int.
    unsafe { (*p).r#type }
}

/// The entries of a list as (name, type, value as text), for consumers in
/// Rust. NULL gives an empty list. String values are None when unset.
///
/// # Safety
/// `list` is NULL or a valid list whose names and strings are C strings.
pub(crate) unsafe fn list_entries(
    list: *const QEMUOptionParameter,
    func: &str,
) -> CResult<Vec<(String, OptionParameterType, Option<String>)>> {
    let mut out = Vec::new();
    if list.is_null() {
        return Ok(out);
    }
    // SAFETY: a valid list by contract.
    let n = unsafe { list_len(list) };
    for i in 0..n {
        // SAFETY: i < n, inside the list.
        let p = unsafe { list.add(i) };
        // SAFETY: names of a valid list are C strings.
        let name = unsafe { CStr::from_ptr((*p).name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: readable entry.
        let ty = unsafe { entry_type(p) };
        let value = match ty {
            OPT_STRING => {
                // SAFETY: an OPT_STRING entry holds `s`.
                let s = unsafe { (*p).value.s };
                if s.is_null() {
                    None
                } else {
                    // SAFETY: non-NULL strings of a valid list are C strings.
                    Some(unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned())
                }
            }
            OPT_FLAG | OPT_NUMBER | OPT_SIZE => {
                // SAFETY: these entries hold `n`.
                Some(unsafe { (*p).value.n }.to_string())
            }
            other => {
                return Err(fail(
                    libc::EINVAL,
                    format!("{func}: option '{name}' has invalid type {other}"),
                ))
            }
        };
        out.push((name, ty, value));
    }
    Ok(out)
}

/// Reads an entry's `assigned` flag as a byte, so that a C `bool` holding
/// something other than 0 or 1 cannot be undefined behaviour.
///
/// # Safety
/// `p` points to a readable entry.
unsafe fn entry_assigned(p: *const QEMUOptionParameter) -> bool {
    // SAFETY: readable by contract; a bool field is one byte.
    unsafe { std::ptr::addr_of!((*p).assigned).cast::<u8>().read() != 0 }
}

/// The entries of a list marked `assigned`, as a qemu-img `-o` string
/// (QEMU 1.7's amend looks at those only): flags become on/off, numbers
/// and sizes decimal; a string option whose value is NULL keeps the
/// image's current value ("preserve default" in QEMU) and is left out.
/// A string value containing ',' cannot be expressed and gives -EINVAL.
///
/// # Safety
/// `list` is NULL or a valid list whose names and strings are C strings.
pub(crate) unsafe fn assigned_as_opts(
    list: *const QEMUOptionParameter,
    func: &str,
) -> CResult<String> {
    // SAFETY: forwarded caller contract.
    let entries = unsafe { list_entries(list, func) }?;
    let mut out = Vec::new();
    for (i, (name, ty, value)) in entries.into_iter().enumerate() {
        // SAFETY: i indexes an entry of the valid list (list_entries read
        // them all, so `list` is not NULL here).
        if !unsafe { entry_assigned(list.add(i)) } {
            continue;
        }
        let Some(value) = value else { continue };
        let text = match ty {
            OPT_FLAG => if value == "0" { "off" } else { "on" }.to_string(),
            _ => value,
        };
        if text.contains(',') {
            return Err(fail(
                libc::EINVAL,
                format!("{func}: the value of option '{name}' contains ','"),
            ));
        }
        out.push(format!("{name}={text}"));
    }
    Ok(out.join(","))
}

/// Finds the entry called `name`, or NULL (also for a NULL list or name).
///
/// # Safety
/// `list` is NULL or a valid list; `name` NULL or a C string.
#[no_mangle]
pub unsafe extern "C" fn get_option_parameter(
    list: *mut QEMUOptionParameter,
    name: *const c_char,
) -> *mut QEMUOptionParameter {
    guard("get_option_parameter", null_mut(), || {
        if list.is_null() || name.is_null() {
            return null_mut();
        }
        // SAFETY: a C string by contract.
        let want = unsafe { CStr::from_ptr(name) };
        // SAFETY: a valid list by contract.
        let n = unsafe { list_len(list) };
        for i in 0..n {
            // SAFETY: i < n; names in a valid list are C strings.
            let p = unsafe { list.add(i) };
            // SAFETY: as above.
            if unsafe { CStr::from_ptr((*p).name) } == want {
                return p;
            }
        }
        null_mut()
    })
}

/// Frees a string value if set, then stores `s`.
///
/// # Safety
/// `p` is a valid OPT_STRING entry whose value is NULL or malloc()ed.
unsafe fn replace_string(p: *mut QEMUOptionParameter, s: *mut c_char) {
    // SAFETY: OPT_STRING entry; its old value is NULL or ours to free.
    unsafe {
        libc::free((*p).value.s.cast());
        (*p).value.s = s;
    }
}

/// # Safety
/// As for set_option_parameter().
unsafe fn set_one(
    list: *mut QEMUOptionParameter,
    name: &CStr,
    value: Option<&CStr>,
    func: &str,
) -> CResult<c_int> {
    // SAFETY: forwarded caller contract.
    let p = unsafe { get_option_parameter(list, name.as_ptr()) };
    let key = name.to_string_lossy();
    if p.is_null() {
        return Err(fail(
            libc::EINVAL,
            format!("{func}: Unknown option '{key}'"),
        ));
    }
    let text = value.map(|v| v.to_string_lossy().into_owned());
    // SAFETY: `p` is an entry of a valid list.
    let ty = unsafe { entry_type(p) };
    let n = match (ty, text.as_deref()) {
        (OPT_FLAG, None | Some("on")) => 1,
        (OPT_FLAG, Some("off")) => 0,
        (OPT_FLAG, Some(_)) => {
            return Err(fail(
                libc::EINVAL,
                format!("{func}: Option '{key}' needs 'on' or 'off'"),
            ))
        }
        (OPT_NUMBER, Some(v)) => parse_number(v).ok_or_else(|| {
            fail(
                libc::EINVAL,
                format!("{func}: Parameter '{key}' expects a number"),
            )
        })?,
        (OPT_SIZE, Some(v)) => {
            parse_size(v).map_err(|e| fail(libc::EINVAL, format!("{func}: {e}")))?
        }
        (OPT_STRING, Some(_)) => {
            // SAFETY: `value` is a C string; strdup copies it with malloc.
            let s = unsafe { libc::strdup(value.unwrap_or_default().as_ptr()) };
            if s.is_null() {
                return Err(fail(libc::ENOMEM, format!("{func}: out of memory")));
            }
            // SAFETY: OPT_STRING entry of a list whose strings are malloc()ed.
            unsafe {
                replace_string(p, s);
                (*p).assigned = true;
            }
            return Ok(0);
        }
        (OPT_NUMBER | OPT_SIZE | OPT_STRING, None) => {
            return Err(fail(
                libc::EINVAL,
                format!("{func}: Option '{key}' needs a value"),
            ))
        }
        (other, _) => {
            return Err(fail(
                libc::EINVAL,
                format!("{func}: option '{key}' has invalid type {other}"),
            ))
        }
    };
    // SAFETY: a numeric entry of a valid list.
    unsafe {
        (*p).value.n = n;
        (*p).assigned = true;
    }
    Ok(0)
}

/// strtoull(v, .., 0) without its leniency: decimal, 0x hex or 0 octal.
fn parse_number(v: &str) -> Option<u64> {
    let v = v.trim();
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if v.len() > 1 && v.starts_with('0') {
        u64::from_str_radix(&v[1..], 8).ok()
    } else {
        v.parse().ok()
    }
}

/// Sets option `name` from text: "on"/"off" (or NULL for on) for
/// OPT_FLAG, a number for OPT_NUMBER, a size with an optional k/M/G/T/P/E
/// suffix for OPT_SIZE, a string (copied) for OPT_STRING, and marks it
/// `assigned`. Returns 0 or -EINVAL (unknown option, bad value; see
/// bdrv_last_error()).
///
/// # Safety
/// `list` is NULL or a valid list whose string values are NULL or
/// malloc()ed; `name` and `value` NULL or C strings.
#[no_mangle]
pub unsafe extern "C" fn set_option_parameter(
    list: *mut QEMUOptionParameter,
    name: *const c_char,
    value: *const c_char,
) -> c_int {
    guard_int("set_option_parameter", || {
        const F: &str = "set_option_parameter";
        let r = (|| {
            if list.is_null() {
                return Err(fail(libc::EINVAL, format!("{F}: list is NULL")));
            }
            // SAFETY: NULL or C strings by contract.
            let name = unsafe { c_str(name, F, "name") }?;
            let value = if value.is_null() {
                None
            } else {
                // SAFETY: non-NULL C string by contract.
                Some(unsafe { CStr::from_ptr(value) })
            };
            // SAFETY: forwarded caller contract.
            unsafe { set_one(list, name, value, F) }
        })();
        ret(r)
    })
}

/// Sets a numeric option (OPT_FLAG, OPT_NUMBER, OPT_SIZE) to `value` and
/// marks it `assigned`. Returns 0 or -EINVAL (unknown option, or a string
/// option).
///
/// # Safety
/// `list` is NULL or a valid list; `name` NULL or a C string.
#[no_mangle]
pub unsafe extern "C" fn set_option_parameter_int(
    list: *mut QEMUOptionParameter,
    name: *const c_char,
    value: u64,
) -> c_int {
    guard_int("set_option_parameter_int", || {
        const F: &str = "set_option_parameter_int";
        let r = (|| {
            // SAFETY: NULL or a C string by contract.
            let cname = unsafe { c_str(name, F, "name") }?;
            // SAFETY: forwarded caller contract.
            let p = unsafe { get_option_parameter(list, name) };
            if p.is_null() {
                return Err(fail(
                    libc::EINVAL,
                    format!("{F}: Unknown option '{}'", cname.to_string_lossy()),
                ));
            }
            // SAFETY: an entry of a valid list.
            match unsafe { entry_type(p) } {
                OPT_FLAG | OPT_NUMBER | OPT_SIZE => {
                    // SAFETY: a numeric entry of a valid list.
                    unsafe {
                        (*p).value.n = value;
                        (*p).assigned = true;
                    }
                    Ok(0)
                }
                _ => Err(fail(
                    libc::EINVAL,
                    format!("{F}: option '{}' is not numeric", cname.to_string_lossy()),
                )),
            }
        })();
        ret(r)
    })
}

/// Appends to `dest` (NULL, or a list made by this library) the entries of
/// `list` whose names `dest` does not have yet, copying string values.
/// Returns the new list (`dest` may move, as with realloc()) or NULL on
/// failure, in which case `dest` is unchanged.
///
/// # Safety
/// `dest` is NULL or a list from this library; `list` NULL or a valid list.
#[no_mangle]
pub unsafe extern "C" fn append_option_parameters(
    dest: *mut QEMUOptionParameter,
    list: *mut QEMUOptionParameter,
) -> *mut QEMUOptionParameter {
    guard("append_option_parameters", null_mut(), || {
        // SAFETY: forwarded caller contract.
        unsafe { append(dest, list) }.unwrap_or(null_mut())
    })
}

/// # Safety
/// As for append_option_parameters().
unsafe fn append(
    dest: *mut QEMUOptionParameter,
    list: *const QEMUOptionParameter,
) -> CResult<*mut QEMUOptionParameter> {
    const F: &str = "append_option_parameters";
    if list.is_null() {
        return Err(fail(libc::EINVAL, format!("{F}: list is NULL")));
    }
    // SAFETY: valid lists by contract.
    let (nd, nl) = unsafe {
        (
            if dest.is_null() { 0 } else { list_len(dest) },
            list_len(list),
        )
    };
    let size = std::mem::size_of::<QEMUOptionParameter>() * (nd + nl + 1);
    // SAFETY: `dest` is NULL or a malloc()ed list of this library; realloc
    // keeps its contents and leaves it untouched on failure.
    let out: *mut QEMUOptionParameter = unsafe { libc::realloc(dest.cast(), size) }.cast();
    if out.is_null() {
        return Err(fail(libc::ENOMEM, format!("{F}: out of memory")));
    }
    let mut n = nd;
    for i in 0..nl {
        // SAFETY: i < nl, inside `list`.
        let src = unsafe { *list.add(i) };
        // `out` holds n entries; terminate it so the lookup sees a list.
        // SAFETY: `out` has room for nd + nl + 1 entries and n <= nd + i.
        unsafe {
            out.add(n).write(QEMUOptionParameter {
                name: std::ptr::null(),
                ..src
            })
        };
        // SAFETY: `out` is a terminated list; src.name is a C string.
        if !unsafe { get_option_parameter(out, src.name) }.is_null() {
            continue;
        }
        let mut e = src;
        if src.r#type == OPT_STRING {
            // SAFETY: an OPT_STRING entry holds `s`, NULL or a C string.
            let s = unsafe { src.value.s };
            // SAFETY: strdup of a C string.
            e.value.s = if s.is_null() {
                s
            } else {
                unsafe { libc::strdup(s) }
            };
        }
        // SAFETY: n < nd + nl + 1.
        unsafe { out.add(n).write(e) };
        n += 1;
    }
    // SAFETY: n <= nd + nl: the terminator slot exists.
    unsafe {
        out.add(n).write(QEMUOptionParameter {
            name: std::ptr::null(),
            r#type: 0,
            value: QEMUOptionValue { n: 0 },
            help: std::ptr::null(),
            assigned: false,
        })
    };
    Ok(out)
}

/// Parses a qemu-img `-o` string ("compat=1.1,lazy_refcounts" — a bare
/// name turns a flag on; ",," is a literal comma) into `dest`, or, when
/// `dest` is NULL, into a new copy of `list`; the options it sets are
/// marked `assigned`. Returns the filled list
/// (free it with free_option_parameters()) or NULL on error (unknown option
/// or bad value; see bdrv_last_error()); a copy made here is freed on error.
///
/// # Safety
/// `param` is NULL or a C string; `list` NULL or a valid list; `dest` NULL
/// or a list from this library.
#[no_mangle]
pub unsafe extern "C" fn parse_option_parameters(
    param: *const c_char,
    list: *mut QEMUOptionParameter,
    dest: *mut QEMUOptionParameter,
) -> *mut QEMUOptionParameter {
    guard("parse_option_parameters", null_mut(), || {
        const F: &str = "parse_option_parameters";
        if list.is_null() {
            fail(libc::EINVAL, format!("{F}: list is NULL"));
            return null_mut();
        }
        // SAFETY: NULL or a C string by contract.
        let param = match unsafe { c_str(param, F, "param") } {
            Ok(p) => p.to_bytes(),
            Err(_) => return null_mut(),
        };
        let (target, allocated) = if dest.is_null() {
            // SAFETY: forwarded caller contract.
            match unsafe { append(null_mut(), list) } {
                Ok(l) => (l, true),
                Err(_) => return null_mut(),
            }
        } else {
            (dest, false)
        };
        for item in split_params(param) {
            if item.is_empty() {
                continue;
            }
            let (k, v) = match item.iter().position(|&c| c == b'=') {
                Some(i) => (&item[..i], Some(&item[i + 1..])),
                None => (&item[..], None),
            };
            let k = std::ffi::CString::new(k).unwrap_or_default();
            let v = v.map(|v| std::ffi::CString::new(v).unwrap_or_default());
            // SAFETY: `target` is a valid list of this library.
            if unsafe { set_one(target, &k, v.as_deref(), F) }.is_err() {
                if allocated {
                    // SAFETY: made above by append(); nobody else has it.
                    unsafe { free_option_parameters(target) };
                }
                return null_mut();
            }
        }
        target
    })
}

/// Splits at single commas; ",," is a literal comma.
fn split_params(s: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new()];
    let mut i = 0;
    while i < s.len() {
        if s[i] == b',' {
            if s.get(i + 1) == Some(&b',') {
                out.last_mut().unwrap().push(b',');
                i += 1;
            } else {
                out.push(Vec::new());
            }
        } else {
            out.last_mut().unwrap().push(s[i]);
        }
        i += 1;
    }
    out
}

/// Frees a list made by parse_option_parameters() or
/// append_option_parameters(), with its string values. NULL is ignored.
///
/// # Safety
/// `list` is NULL or a list from this library, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn free_option_parameters(list: *mut QEMUOptionParameter) {
    guard("free_option_parameters", (), || {
        if list.is_null() {
            return;
        }
        // SAFETY: a valid list by contract.
        let n = unsafe { list_len(list) };
        for i in 0..n {
            // SAFETY: i < n; OPT_STRING values of our lists are malloc()ed.
            unsafe {
                let p = list.add(i);
                if entry_type(p) == OPT_STRING {
                    replace_string(p, null_mut());
                }
            }
        }
        // SAFETY: the array itself was malloc()ed by this library.
        unsafe { libc::free(list.cast()) };
    })
}

/// Prints each option's name and help text to stdout, as `qemu-img create
/// -o help` does.
///
/// # Safety
/// `list` is NULL or a valid list.
#[no_mangle]
pub unsafe extern "C" fn print_option_help(list: *mut QEMUOptionParameter) {
    guard("print_option_help", (), || {
        // SAFETY: forwarded caller contract.
        let Ok(entries) = (unsafe { list_entries(list, "print_option_help") }) else {
            return;
        };
        println!("Supported options:");
        for (i, (name, _, _)) in entries.iter().enumerate() {
            // SAFETY: i indexes an entry of the valid list.
            let help = unsafe { (*list.add(i)).help };
            let help = if help.is_null() {
                String::new()
            } else {
                // SAFETY: non-NULL help texts are C strings.
                unsafe { CStr::from_ptr(help) }
                    .to_string_lossy()
                    .into_owned()
            };
            println!("{name:<16} {help}");
        }
    })
}
