//! The qcow2 driver's runtime options as QEMU's qcow2 driver takes them at
//! open and at reopen: `lazy-refcounts`, `pass-discard-*`,
//! `discard-no-unref`, the cache sizes (`cache-size`, `l2-cache-size`,
//! `refcount-cache-size`, `l2-cache-entry-size`), `cache-clean-interval`
//! and `overlap-check` with its `overlap-check.*` fields. Checked in
//! QEMU's order with its messages: first every value's syntax (in the
//! order QEMU's QDict iterates the keys), then the cache sizes, the clean
//! interval, lazy refcounts, the overlap-check template and
//! discard-no-unref. Also how reopen merges new options with the ones in
//! use ([`join_reopen`]).
//!
//! The engine always guards all metadata against overlapping writes and
//! caches whole L2 tables: `overlap-check` and `l2-cache-entry-size` are
//! checked and then have no effect; the cache sizes set the engine's
//! cache capacities.

use super::{parse_bool, parse_size_opt};
use std::collections::BTreeMap;

/// The boolean fields of `overlap-check.*` (one per kind of metadata).
const OVERLAP_FIELDS: &[&str] = &[
    "main-header",
    "active-l1",
    "active-l2",
    "refcount-table",
    "refcount-block",
    "snapshot-table",
    "inactive-l1",
    "inactive-l2",
    "bitmap-directory",
];

const BOOL_OPTS: &[&str] = &[
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
];

const SIZE_OPTS: &[&str] = &[
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
];

const OVERLAP_MODES: &str = "none, constant, cached, all";

/// The cache options reopen merges as one group.
const CACHE_SIZE_OPTS: [&str; 3] = ["cache-size", "l2-cache-size", "refcount-cache-size"];

/// QEMU's limits: caches of at least 2 L2 tables and 4 refcount blocks,
/// an L2 cache of at most 32 MiB unless asked, and at most INT_MAX
/// entries in either cache.
const MIN_L2_TABLES: u64 = 2;
const MIN_REFCOUNT_TABLES: u64 = 4;
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
const MAX_CACHE_ENTRIES: u64 = i32::MAX as u64;

/// Whether `key` (a qcow2 node's own option, no child prefix) is one of
/// these options.
pub fn is_runtime_opt(key: &str) -> bool {
    BOOL_OPTS.contains(&key)
        || SIZE_OPTS.contains(&key)
        || key == "cache-clean-interval"
        || key == "overlap-check"
        || key
            .strip_prefix("overlap-check.")
            .is_some_and(|f| f == "template" || OVERLAP_FIELDS.contains(&f))
}

/// What of the image header the checks depend on (QEMU reads the header
/// before it looks at the options).
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub version: u32,
    pub cluster_size: u64,
    pub virtual_size: u64,
    /// Extended L2 entries (16 bytes each instead of 8).
    pub extended_l2: bool,
}

impl Geometry {
    /// From the first bytes of a qcow2 file; None when they are not a
    /// qcow2 header the open would accept (the open reports that).
    pub fn parse(b: &[u8]) -> Option<Geometry> {
        let be32 = |o: usize| Some(u32::from_be_bytes(b.get(o..o + 4)?.try_into().ok()?));
        let be64 = |o: usize| Some(u64::from_be_bytes(b.get(o..o + 8)?.try_into().ok()?));
        if be32(0)? != 0x5146_49fb {
            return None;
        }
        let version = be32(4)?;
        let bits = be32(20)?;
        if !(2..=3).contains(&version) || !(9..=21).contains(&bits) {
            return None;
        }
        let incompat = if version >= 3 { be64(72)? } else { 0 };
        Some(Geometry {
            version,
            cluster_size: 1 << bits,
            virtual_size: be64(24)?,
            extended_l2: incompat & (1 << 4) != 0,
        })
    }
}

/// What the options ask of the engine.
#[derive(Debug, Default, PartialEq)]
pub struct Runtime {
    /// Bytes of L2 tables to cache, when an option sets it.
    pub l2_cache: Option<u64>,
    /// Bytes of refcount blocks to cache, when an option sets it.
    pub refcount_cache: Option<u64>,
    pub lazy_refcounts: Option<bool>,
}

/// Checks a qcow2 node's options (`map` holds the node's own options at
/// the top level) against its header. Without a header (`geo` None) only
/// the syntax is checked: the open then fails on the header itself.
pub fn check(map: &BTreeMap<String, String>, geo: Option<&Geometry>) -> Result<Runtime, String> {
    check_syntax(map)?;
    let Some(geo) = geo else {
        let lazy = map.get("lazy-refcounts");
        return Ok(Runtime {
            lazy_refcounts: lazy.map(|v| parse_bool("lazy-refcounts", v)).transpose()?,
            ..Runtime::default()
        });
    };
    let mut rt = cache_sizes(map, geo)?;
    if let Some(v) = map.get("cache-clean-interval") {
        if number(v).is_ok_and(|n| n > u32::MAX as u64) {
            return Err("Cache clean interval too big".into());
        }
    }
    if let Some(v) = map.get("lazy-refcounts") {
        let on = parse_bool("lazy-refcounts", v)?;
        if on && geo.version < 3 {
            return Err(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                    .into(),
            );
        }
        rt.lazy_refcounts = Some(on);
    }
    check_overlap_template(map)?;
    if let Some(v) = map.get("discard-no-unref") {
        if parse_bool("discard-no-unref", v)? && geo.version < 3 {
            return Err("discard-no-unref is only supported since qcow2 version 3".into());
        }
    }
    Ok(rt)
}

/// Every value parses as its type. QEMU takes the options out of a QDict
/// in its iteration order (by hash bucket), so with several bad values
/// that order decides which one is reported.
fn check_syntax(map: &BTreeMap<String, String>) -> Result<(), String> {
    let mut keys: Vec<&String> = map.keys().filter(|k| is_runtime_opt(k)).collect();
    keys.sort_by_key(|k| crate::util::qdict_bucket(k));
    for k in keys {
        let v = &map[k];
        let field = k
            .strip_prefix("overlap-check.")
            .filter(|f| *f != "template");
        if BOOL_OPTS.contains(&k.as_str()) || field.is_some() {
            parse_bool(k, v)?;
        } else if SIZE_OPTS.contains(&k.as_str()) {
            parse_size_opt(k, v)?;
        } else if k == "cache-clean-interval" {
            number(v).map_err(|range| {
                if range {
                    format!("Value '{v}' is too large for parameter '{k}'")
                } else {
                    format!("Parameter '{k}' expects a number")
                }
            })?;
        }
    }
    Ok(())
}

/// A QemuOpts number: strtoull in any base over the whole value, a
/// negative value wrapping around. Err(true) when out of range.
fn number(v: &str) -> Result<u64, bool> {
    use crate::io::io_fmt::{strtou64_full, NumErr};
    strtou64_full(v).map_err(|e| matches!(e, NumErr::Range))
}

/// The cache sizes as QEMU works them out: `cache-size` is shared out
/// between the two caches (the L2 cache first, up to what covers the
/// whole disk); an explicit `l2-cache-size` is capped at that too.
fn cache_sizes(map: &BTreeMap<String, String>, geo: &Geometry) -> Result<Runtime, String> {
    let size = |k: &str| -> Result<Option<u64>, String> {
        map.get(k).map(|v| parse_size_opt(k, v)).transpose()
    };
    let combined = size("cache-size")?;
    let l2 = size("l2-cache-size")?;
    let rc = size("refcount-cache-size")?;
    let entry = size("l2-cache-entry-size")?;
    if let Some(c) = combined {
        if l2.is_some() && rc.is_some() {
            return Err(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
                    .into(),
            );
        }
        if l2.is_some_and(|l| l > c) {
            return Err("l2-cache-size may not exceed cache-size".into());
        }
        if rc.is_some_and(|r| r > c) {
            return Err("refcount-cache-size may not exceed cache-size".into());
        }
    }
    let cs = geo.cluster_size;
    let entry_bytes = if geo.extended_l2 { 16 } else { 8 };
    let max_l2 = geo
        .virtual_size
        .div_ceil(cs)
        .saturating_mul(entry_bytes)
        .div_ceil(cs)
        .saturating_mul(cs);
    let min_rc = MIN_REFCOUNT_TABLES * cs;
    let l2 = l2.map(|l| l.min(max_l2));
    let (l2_bytes, rc_bytes) = match (combined, l2, rc) {
        (Some(c), Some(l), _) => (l, c - l),
        (Some(c), None, Some(r)) => (c - r, r),
        (Some(c), None, None) if c >= max_l2.saturating_add(min_rc) => (max_l2, c - max_l2),
        (Some(c), None, None) => (c - c.min(min_rc), c.min(min_rc)),
        (None, l, r) => (
            l.unwrap_or(max_l2.min(DEFAULT_L2_CACHE_MAX)),
            r.unwrap_or(min_rc),
        ),
    };
    let entry = entry.unwrap_or(cs);
    if !entry.is_power_of_two() || entry < 512 || entry > cs {
        return Err(format!(
            "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
        ));
    }
    if (l2_bytes / entry).max(MIN_L2_TABLES) > MAX_CACHE_ENTRIES {
        return Err("L2 cache size too big".into());
    }
    if (rc_bytes / cs).max(MIN_REFCOUNT_TABLES) > MAX_CACHE_ENTRIES {
        return Err("Refcount cache size too big".into());
    }
    Ok(Runtime {
        l2_cache: (combined.is_some() || l2.is_some()).then_some(l2_bytes),
        refcount_cache: (combined.is_some() || rc.is_some()).then_some(rc_bytes),
        lazy_refcounts: None,
    })
}

/// `overlap-check` and `overlap-check.template` name the same template:
/// both may be given only with one value, which must be a mode.
fn check_overlap_template(map: &BTreeMap<String, String>) -> Result<(), String> {
    let plain = map.get("overlap-check");
    let template = map.get("overlap-check.template");
    if let (Some(p), Some(t)) = (plain, template) {
        if p != t {
            return Err(format!(
                "Conflicting values for qcow2 options 'overlap-check' ('{p}') and 'overlap-check.template' ('{t}')"
            ));
        }
    }
    if let Some(v) = plain.or(template) {
        if !matches!(v.as_str(), "none" | "constant" | "cached" | "all") {
            return Err(format!(
                "Unsupported value '{v}' for qcow2 option 'overlap-check'. Allowed are any of the following: {OVERLAP_MODES}"
            ));
        }
    }
    Ok(())
}

/// The options a reopen opens with: `new` over `old`, where for each
/// qcow2 node (top level, `file.`, ...) a new overlap-check template
/// drops all old overlap-check options, a new `cache-size` drops the old
/// `l2-cache-size` and `refcount-cache-size`, and an old `cache-size`
/// goes whenever a cache size is set afterwards and `cache-size` is not
/// among the new options (so that `cache-size=1M` then `l2-cache-size=2M`
/// is no conflict).
pub fn join_reopen(old: &[(String, String)], new: &[(String, String)]) -> Vec<(String, String)> {
    let node_of = |k: &str| -> Option<(String, String)> {
        let mut prefix = String::new();
        let mut rest = k;
        loop {
            if is_runtime_opt(rest) {
                return Some((prefix, rest.to_string()));
            }
            let (head, tail) = rest.split_once('.')?;
            prefix.push_str(head);
            prefix.push('.');
            rest = tail;
        }
    };
    let new_has = |prefix: &str, pred: &dyn Fn(&str) -> bool| {
        new.iter()
            .filter_map(|(k, _)| node_of(k))
            .any(|(p, leaf)| p == prefix && pred(&leaf))
    };
    let is_template = |leaf: &str| leaf == "overlap-check" || leaf == "overlap-check.template";
    let is_overlap = |leaf: &str| leaf == "overlap-check" || leaf.starts_with("overlap-check.");
    let mut out: Vec<(String, String)> = old
        .iter()
        .filter(|(k, _)| {
            if new.iter().any(|(n, _)| n == k) {
                return false;
            }
            let Some((p, leaf)) = node_of(k) else {
                return true;
            };
            if is_overlap(&leaf) && new_has(&p, &is_template) {
                return false;
            }
            let new_total = new_has(&p, &|l| l == "cache-size");
            !(new_total && (leaf == "l2-cache-size" || leaf == "refcount-cache-size"))
        })
        .cloned()
        .collect();
    out.extend(new.iter().cloned());
    // An old total cache size gives way to any cache size now set.
    let prefixes: Vec<String> = out
        .iter()
        .filter_map(|(k, _)| node_of(k))
        .filter(|(_, leaf)| leaf == "cache-size")
        .map(|(p, _)| p)
        .collect();
    for p in prefixes {
        if new_has(&p, &|l| l == "cache-size") {
            continue;
        }
        let any_set = out
            .iter()
            .filter_map(|(k, _)| node_of(k))
            .any(|(q, leaf)| q == p && CACHE_SIZE_OPTS.contains(&leaf.as_str()));
        if any_set {
            out.retain(|(k, _)| *k != format!("{p}cache-size"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(s: &[(&str, &str)]) -> BTreeMap<String, String> {
        s.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn opts(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const GEO: Geometry = Geometry {
        version: 3,
        cluster_size: 65536,
        virtual_size: 64 << 20,
        extended_l2: false,
    };

    #[test]
    fn total_cache_size_is_shared_out() {
        let rt = check(&map(&[("cache-size", "1M")]), Some(&GEO)).unwrap();
        // 64 MiB needs one 64 KiB cluster of L2 tables.
        assert_eq!(rt.l2_cache, Some(65536));
        assert_eq!(rt.refcount_cache, Some((1 << 20) - 65536));
        let rt = check(&map(&[("cache-size", "100k")]), Some(&GEO)).unwrap();
        assert_eq!(rt.refcount_cache, Some(100 << 10));
        assert_eq!(rt.l2_cache, Some(0));
        let rt = check(&map(&[("l2-cache-size", "256T")]), Some(&GEO)).unwrap();
        assert_eq!(rt.l2_cache, Some(65536));
        assert_eq!(rt.refcount_cache, None);
    }

    #[test]
    fn cache_limits() {
        let err = |m: &[(&str, &str)], g: &Geometry| check(&map(m), Some(g)).unwrap_err();
        assert_eq!(
            err(&[("refcount-cache-size", "128T")], &GEO),
            "Refcount cache size too big"
        );
        assert!(check(&map(&[("refcount-cache-size", "131071G")]), Some(&GEO)).is_ok());
        assert_eq!(
            err(
                &[("cache-size", "256T"), ("refcount-cache-size", "1M")],
                &GEO
            ),
            "L2 cache size too big"
        );
        assert_eq!(
            err(&[("cache-size", "256T"), ("l2-cache-size", "256T")], &GEO),
            "Refcount cache size too big"
        );
        let big = Geometry {
            cluster_size: 256 << 10,
            virtual_size: 32 << 50,
            ..GEO
        };
        let e512 = ("l2-cache-entry-size", "512");
        assert_eq!(
            err(&[e512, ("l2-cache-size", "1T")], &big),
            "L2 cache size too big"
        );
        assert_eq!(
            err(&[e512, ("cache-size", "1025G")], &big),
            "L2 cache size too big"
        );
        assert!(check(&map(&[e512, ("cache-size", "1T")]), Some(&big)).is_ok());
        assert_eq!(
            err(&[("l2-cache-entry-size", "33k")], &GEO),
            "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"
        );
    }

    #[test]
    fn syntax_errors_in_qdict_order() {
        let err = |m: &[(&str, &str)]| check(&map(m), Some(&GEO)).unwrap_err();
        assert_eq!(
            err(&[
                ("overlap-check.main-header", "x"),
                ("overlap-check.active-l1", "x")
            ]),
            "Parameter 'overlap-check.active-l1' expects 'on' or 'off'"
        );
        assert!(
            err(&[("cache-size", "abc"), ("refcount-cache-size", "abc")])
                .starts_with("Parameter 'refcount-cache-size' expects")
        );
        assert_eq!(
            err(&[("cache-clean-interval", "5k")]),
            "Parameter 'cache-clean-interval' expects a number"
        );
        assert_eq!(
            err(&[("cache-clean-interval", "99999999999999999999")]),
            "Value '99999999999999999999' is too large for parameter 'cache-clean-interval'"
        );
        assert_eq!(
            err(&[("cache-clean-interval", "-1")]),
            "Cache clean interval too big"
        );
        assert!(check(&map(&[("cache-clean-interval", "4294967295")]), Some(&GEO)).is_ok());
        assert!(check(
            &map(&[("cache-clean-interval", "-18446744073709551615")]),
            Some(&GEO)
        )
        .is_ok());
    }

    #[test]
    fn overlap_check_template() {
        let err = |m: &[(&str, &str)]| check(&map(m), Some(&GEO)).unwrap_err();
        assert_eq!(
            err(&[("overlap-check", "constant"), ("overlap-check.template", "all")]),
            "Conflicting values for qcow2 options 'overlap-check' ('constant') and 'overlap-check.template' ('all')"
        );
        assert!(err(&[("overlap-check.template", "blubb")])
            .starts_with("Unsupported value 'blubb' for qcow2 option 'overlap-check'."));
        assert!(check(
            &map(&[("overlap-check", "all"), ("overlap-check.template", "all")]),
            Some(&GEO)
        )
        .is_ok());
        assert!(!is_runtime_opt("overlap-check.foo"));
        // The order of the later checks.
        assert_eq!(
            err(&[("overlap-check", "blubb"), ("cache-clean-interval", "-1")]),
            "Cache clean interval too big"
        );
        let v2 = Geometry { version: 2, ..GEO };
        let m = map(&[("lazy-refcounts", "on"), ("overlap-check", "blubb")]);
        assert!(check(&m, Some(&v2))
            .unwrap_err()
            .starts_with("Lazy refcounts require"));
        let m = map(&[("discard-no-unref", "on")]);
        assert_eq!(
            check(&m, Some(&v2)).unwrap_err(),
            "discard-no-unref is only supported since qcow2 version 3"
        );
    }

    #[test]
    fn reopen_joins_as_qemu() {
        let j = |o: &[(&str, &str)], n: &[(&str, &str)]| {
            let mut v = join_reopen(&opts(o), &opts(n));
            v.sort();
            v
        };
        assert_eq!(
            j(&[("cache-size", "1M")], &[("l2-cache-size", "2M")]),
            opts(&[("l2-cache-size", "2M")])
        );
        assert_eq!(
            j(
                &[("l2-cache-size", "512k"), ("refcount-cache-size", "1M")],
                &[("cache-size", "4M")]
            ),
            opts(&[("cache-size", "4M")])
        );
        assert_eq!(
            j(&[("cache-size", "1M"), ("lazy-refcounts", "on")], &[]),
            opts(&[("lazy-refcounts", "on")])
        );
        assert_eq!(
            j(
                &[
                    ("overlap-check", "constant"),
                    ("overlap-check.main-header", "off")
                ],
                &[("overlap-check.template", "all")]
            ),
            opts(&[("overlap-check.template", "all")])
        );
        assert_eq!(
            j(
                &[("overlap-check.template", "all")],
                &[("overlap-check.main-header", "off")]
            ),
            opts(&[
                ("overlap-check.main-header", "off"),
                ("overlap-check.template", "all")
            ])
        );
        // Each node on its own; an old total size goes unless set again.
        assert_eq!(
            j(
                &[("file.cache-size", "1M"), ("cache-size", "1M")],
                &[("cache-size", "2M")]
            ),
            opts(&[("cache-size", "2M")])
        );
        assert_eq!(
            j(
                &[("file.l2-cache-size", "1M"), ("l2-cache-size", "1M")],
                &[("file.cache-size", "2M")]
            ),
            opts(&[("file.cache-size", "2M"), ("l2-cache-size", "1M")])
        );
    }
}
