//! QEMU's encryption creation options (`encryption`, `encrypt.format`,
//! `encrypt.key-secret`, and LUKS's `encrypt.cipher-alg`, `cipher-mode`,
//! `ivgen-alg`, `ivgen-hash-alg`, `hash-alg`, `iter-time`), checked in
//! qemu-img's words.

use super::{set_luks_option, EncryptCreate, Format, Secret};
use crate::error::{Error, Result};

/// The LUKS-only options, without the "encrypt." prefix.
const LUKS_ONLY: &[&str] = &[
    "cipher-alg",
    "cipher-mode",
    "ivgen-alg",
    "ivgen-hash-alg",
    "hash-alg",
    "iter-time",
];

/// Whether `key` is one of the encryption creation options.
pub fn is_encrypt_option(key: &str) -> bool {
    key == "encryption" || key.starts_with("encrypt.")
}

/// The checks qemu-img makes while parsing `-o` (before it prints its
/// "Formatting" line): unknown `encrypt.*` names and values of the wrong
/// type.
pub fn check_encrypt_option_syntax(opts: &[(String, String)]) -> Result<()> {
    let arg = |m: String| Error::InvalidArgument(m);
    for (k, v) in opts {
        match k.as_str() {
            "encryption"
                if !matches!(v.as_str(), "on" | "off" | "yes" | "no" | "true" | "false") =>
            {
                return Err(arg("Parameter 'encryption' expects 'on' or 'off'".into()))
            }
            "encrypt.iter-time" if v.parse::<u64>().is_err() => {
                return Err(arg("Parameter 'encrypt.iter-time' expects a number".into()))
            }
            "encryption" | "encrypt.format" | "encrypt.key-secret" => {}
            _ => match k.strip_prefix("encrypt.") {
                Some(o) if !LUKS_ONLY.contains(&o) => {
                    return Err(arg(format!("Invalid parameter '{k}'")))
                }
                _ => {}
            },
        }
    }
    Ok(())
}

/// Builds the encryption of a new image from `-o` pairs in the order given
/// (a later value wins); None when the image is not encrypted. `secret`
/// returns the data of a secret by id (or the error naming it).
pub fn encrypt_create_from_options(
    opts: &[(String, String)],
    secret: &mut dyn FnMut(&str) -> Result<Secret>,
) -> Result<Option<EncryptCreate>> {
    let arg = |m: String| Error::InvalidArgument(m);
    let mut encryption: Option<&str> = None;
    let mut format: Option<&str> = None;
    let mut key_secret: Option<&str> = None;
    let mut luks: Vec<(&str, &str)> = Vec::new();
    for (k, v) in opts {
        match k.as_str() {
            "encryption" => encryption = Some(v),
            "encrypt.format" => format = Some(v),
            "encrypt.key-secret" => key_secret = Some(v),
            _ => match k.strip_prefix("encrypt.") {
                Some(o) if LUKS_ONLY.contains(&o) => {
                    luks.retain(|(x, _)| *x != o);
                    luks.push((o, v));
                }
                Some(_) => return Err(arg(format!("Invalid parameter '{k}'"))),
                None => {}
            },
        }
    }
    if encryption.is_some() && format.is_some() {
        return Err(arg(
            "'encrypt.format' and its alias 'encryption' can't be used at the same time".into(),
        ));
    }
    let format = match (encryption, format) {
        (Some(v), _) => match v {
            "on" | "yes" | "true" => Some(Format::Aes),
            "off" | "no" | "false" => None,
            _ => {
                return Err(arg(
                    "Parameter 'encryption' expects 'on' or 'off'".to_string()
                ))
            }
        },
        (None, Some(f)) => Some(
            Format::parse(f)
                .ok_or_else(|| arg(format!("Parameter 'format' does not accept value '{f}'")))?,
        ),
        (None, None) => None,
    };
    let Some(format) = format else {
        if key_secret.is_some() || !luks.is_empty() {
            return Err(arg("Parameter 'encrypt.format' is missing".into()));
        }
        return Ok(None);
    };
    if format == Format::Aes {
        if let Some((o, _)) = luks.first() {
            return Err(arg(format!("Parameter 'encrypt.{o}' is unexpected")));
        }
    }
    let mut e = match format {
        Format::Aes => EncryptCreate::aes(Secret::default()),
        Format::Luks => EncryptCreate::luks(Secret::default()),
    };
    for (o, v) in &luks {
        if *o == "iter-time" {
            e.iter_time_ms = v
                .parse::<u64>()
                .map_err(|_| arg("Parameter 'encrypt.iter-time' expects a number".into()))?;
        } else {
            set_luks_option(&mut e, o, v)?;
        }
    }
    let id = key_secret
        .ok_or_else(|| arg("Parameter 'encrypt.key-secret' is required for cipher".into()))?;
    e.password = secret(id)?;
    Ok(Some(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(o: &str) -> std::result::Result<Option<EncryptCreate>, String> {
        let pairs: Vec<(String, String)> = o
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        let mut secret = |id: &str| {
            if id == "sec0" {
                Ok(Secret(b"pw".to_vec()))
            } else {
                Err(Error::InvalidArgument(format!("No secret with id '{id}'")))
            }
        };
        encrypt_create_from_options(&pairs, &mut secret).map_err(|e| e.to_string())
    }

    #[test]
    fn options_resolve_as_qemu_img_resolves_them() {
        assert_eq!(run("compat=1.1").unwrap(), None);
        assert_eq!(run("encryption=off").unwrap(), None);
        let e = run("encryption=on,encrypt.key-secret=sec0")
            .unwrap()
            .unwrap();
        assert_eq!(e.method, super::super::CRYPT_AES);
        assert_eq!(e.password.0, b"pw");
        let e = run("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10")
            .unwrap()
            .unwrap();
        assert_eq!(e.iter_time_ms, 10);
        assert_eq!(e.spec.luks_mode(), "xts-plain64");
    }

    #[test]
    fn bad_combinations_get_qemu_img_messages() {
        let cases = [
            (
                "encrypt.format=luks",
                "Parameter 'encrypt.key-secret' is required for cipher",
            ),
            (
                "encrypt.format=luks,encrypt.key-secret=sec1",
                "No secret with id 'sec1'",
            ),
            (
                "encryption=on,encrypt.format=luks,encrypt.key-secret=sec0",
                "'encrypt.format' and its alias 'encryption' can't be used at the same time",
            ),
            (
                "encrypt.format=foo,encrypt.key-secret=sec0",
                "Parameter 'format' does not accept value 'foo'",
            ),
            (
                "encrypt.format=aes,encrypt.key-secret=sec0,encrypt.iter-time=10",
                "Parameter 'encrypt.iter-time' is unexpected",
            ),
            (
                "encrypt.key-secret=sec0",
                "Parameter 'encrypt.format' is missing",
            ),
            (
                "encryption=off,encrypt.key-secret=sec0",
                "Parameter 'encrypt.format' is missing",
            ),
            (
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=abc",
                "Parameter 'encrypt.iter-time' expects a number",
            ),
            (
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=foo",
                "Parameter 'cipher-alg' does not accept value 'foo'",
            ),
            (
                "encrypt.format=luks,encrypt.foo=1",
                "Invalid parameter 'encrypt.foo'",
            ),
        ];
        for (o, want) in cases {
            assert_eq!(run(o).unwrap_err(), want, "{o}");
        }
    }
}
