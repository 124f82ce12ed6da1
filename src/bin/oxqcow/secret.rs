//! `--object secret,id=ID,data=DATA|file=PATH[,format=raw|base64]`: the
//! secrets qemu-img and qemu-io take for encrypted images, named by
//! `encrypt.key-secret=ID`. Like QEMU's object tree they are process-wide:
//! a command defines them once from its `--object` options before opening
//! anything, and every open (also qemu-io's `open` command) looks them up.
//! Errors are QEMU's texts. Other object types and encrypted secrets
//! (`keyid`, `iv`) are refused.

use oxqcow::crypto::{Format, Secret};
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

static SECRETS: OnceLock<HashMap<String, Secret>> = OnceLock::new();

/// Defines the secrets of `--object` options (once per process).
pub fn define(objects: &[String]) -> Result<(), String> {
    let mut map = HashMap::new();
    for o in objects {
        let (id, s) = parse(o)?;
        if map.contains_key(&id) {
            return Err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        map.insert(id, s);
    }
    let _ = SECRETS.set(map);
    Ok(())
}

/// The secret with this id, or QEMU's message.
pub fn get(id: &str) -> Result<Secret, String> {
    SECRETS
        .get()
        .and_then(|m| m.get(id))
        .cloned()
        .ok_or_else(|| format!("No secret with id '{id}'"))
}

/// `PREFIXencrypt.format` and `PREFIXencrypt.key-secret`. As in QEMU, the
/// secret is looked up only when the image is encrypted in the format the
/// options ask for (a mismatch is the engine's error to report).
pub fn encrypt_open_options(
    map: &BTreeMap<String, String>,
    prefix: &str,
    crypt_method: Option<u32>,
) -> Result<(Option<Format>, Option<Secret>), String> {
    let fmt = match map.get(&format!("{prefix}encrypt.format")) {
        Some(f) => Some(
            Format::parse(f)
                .ok_or_else(|| format!("Parameter 'format' does not accept value '{f}'"))?,
        ),
        None => None,
    };
    let Some(id) = map.get(&format!("{prefix}encrypt.key-secret")) else {
        return Ok((fmt, None));
    };
    let wanted = match (crypt_method.unwrap_or(0), fmt) {
        (0, _) => false,
        (_, None) => true,
        (m, Some(f)) => (m == 1) == (f == Format::Aes),
    };
    let secret = if wanted { Some(get(id)?) } else { None };
    Ok((fmt, secret))
}

/// The `crypt_method` field of a qcow2 header (None: unreadable).
pub fn crypt_method(path: &str) -> Option<u32> {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 36];
    std::fs::File::open(path)
        .ok()?
        .read_exact_at(&mut b, 0)
        .ok()?;
    Some(u32::from_be_bytes(b[32..36].try_into().ok()?))
}

/// One object definition: "secret,id=..." or "qom-type=secret,id=...".
fn parse(def: &str) -> Result<(String, Secret), String> {
    let pairs = crate::io::io_open::parse_qemu_opts(def)?;
    let mut it = pairs.into_iter().peekable();
    let qom_type = match it.peek() {
        Some((k, v)) if k == "qom-type" => v.clone(),
        Some((k, v)) if v == "on" && !k.contains('=') => k.clone(),
        _ => String::new(),
    };
    if !qom_type.is_empty() {
        it.next();
    }
    let mut id = None;
    let mut data = None;
    let mut file = None;
    let mut format = "raw".to_string();
    for (k, v) in it {
        match k.as_str() {
            "id" => id = Some(v),
            "data" => data = Some(v),
            "file" => file = Some(v),
            "format" => format = v,
            "keyid" | "iv" if qom_type == "secret" => {
                return Err("oxqcow does not implement encrypted secrets (keyid, iv)".into())
            }
            _ if qom_type != "secret" => {}
            _ => return Err(format!("Parameter '{k}' is unexpected")),
        }
    }
    if qom_type.is_empty() {
        return Err("Parameter 'qom-type' is missing".into());
    }
    if qom_type != "secret" {
        return Err(format!(
            "Parameter 'qom-type' does not accept value '{qom_type}'"
        ));
    }
    let id = id.ok_or_else(|| "Parameter 'id' is missing".to_string())?;
    if format != "raw" && format != "base64" {
        return Err(format!(
            "Parameter 'format' does not accept value '{format}'"
        ));
    }
    let raw = match (data, file) {
        (Some(_), Some(_)) => return Err("'file' and 'data' are mutually exclusive".into()),
        (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
        (Some(d), None) => d.into_bytes(),
        (None, Some(f)) => std::fs::read(&f).map_err(|e| {
            format!(
                "Unable to read {f}: Failed to open file \u{201c}{f}\u{201d}: {}",
                crate::util::ioerr(&e)
            )
        })?,
    };
    let bytes = if format == "base64" {
        base64_decode(&raw)?
    } else {
        raw
    };
    Ok((id, Secret(bytes)))
}

/// Standard base64 (padding optional, as QEMU accepts it).
fn base64_decode(s: &[u8]) -> Result<Vec<u8>, String> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let body: &[u8] = {
        let end = s.iter().rposition(|&c| c != b'=').map_or(0, |i| i + 1);
        &s[..end]
    };
    if body.iter().any(|&c| val(c).is_none()) || s.len() - body.len() > 2 {
        return Err("Base64 data contains invalid characters".into());
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c).unwrap_or(0) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len().max(1)]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_parse_as_qemu_parses_them() {
        let (id, s) = parse("secret,id=sec0,data=astrochicken").unwrap();
        assert_eq!(
            (id.as_str(), s.0.as_slice()),
            ("sec0", &b"astrochicken"[..])
        );
        let (_, s) = parse("secret,id=s,data=YXN0cm9jaGlja2Vu,format=base64").unwrap();
        assert_eq!(s.0, b"astrochicken");
        let (_, s) = parse("secret,id=s,data=YQ,format=base64").unwrap();
        assert_eq!(s.0, b"a");
        let (_, s) = parse("qom-type=secret,id=s,data=a,,b").unwrap();
        assert_eq!(s.0, b"a,b");
        let err = |d: &str| parse(d).unwrap_err();
        assert_eq!(
            err("secret,id=s"),
            "Either 'file' or 'data' must be provided"
        );
        assert_eq!(err("secret,data=x"), "Parameter 'id' is missing");
        assert_eq!(
            err("foo,id=x"),
            "Parameter 'qom-type' does not accept value 'foo'"
        );
        assert_eq!(
            err("secret,id=s,data=x,bogus=1"),
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            err("secret,id=s,data=x,file=y"),
            "'file' and 'data' are mutually exclusive"
        );
        assert_eq!(
            err("secret,id=s,data=@@@,format=base64"),
            "Base64 data contains invalid characters"
        );
        assert_eq!(
            err("secret,id=s,data=x,format=hex"),
            "Parameter 'format' does not accept value 'hex'"
        );
    }
}
