//! Where the library's warnings go: stderr by default (as QEMU prints its
//! repair and corruption lines), or a hook a host installs.

use std::sync::RwLock;

type Hook = Box<dyn Fn(&str) + Send + Sync>;

static HOOK: RwLock<Option<Hook>> = RwLock::new(None);

/// Installs a function that receives every warning instead of stderr.
pub fn set_hook(hook: Option<Hook>) {
    *HOOK.write().unwrap_or_else(|e| e.into_inner()) = hook;
}

pub fn warn(msg: &str) {
    match &*HOOK.read().unwrap_or_else(|e| e.into_inner()) {
        Some(h) => h(msg),
        None => eprintln!("{msg}"),
    }
}
