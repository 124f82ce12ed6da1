//! qcow2 encryption: the legacy AES format (header `crypt_method` 1) and
//! LUKS (`crypt_method` 2, a LUKS1 header in the clusters the crypto
//! header extension points at).
//!
//! Only guest data clusters are encrypted, in 512-byte sectors, each with
//! an IV made from a sector number. Which number is the one fact that
//! differs between the two formats (QEMU's behaviour, checked against
//! images QEMU wrote): legacy AES counts sectors of the *guest* offset,
//! LUKS counts sectors of the *host* offset in the image file. So a LUKS
//! cluster that moves in the file (copy-on-write) is re-encrypted, and an
//! AES cluster is not tied to where it is stored.
//!
//! Legacy AES is AES-128-CBC with `plain64` IVs; its key is the password's
//! first 16 bytes, zero padded. LUKS takes its cipher from the header
//! (default for new images: AES-256-XTS, `plain64`, SHA-256).

pub mod afsplit;
pub mod cipher;
pub mod hash;
pub mod luks;
mod options;

use crate::error::{Error, Result};
use cipher::{CipherSpec, IvGenAlg, Mode, SectorCipher, SECTOR};
use hash::HashAlg;
pub use luks::LuksHeader;
pub use options::{check_encrypt_option_syntax, encrypt_create_from_options, is_encrypt_option};

/// `crypt_method` of legacy AES images.
pub const CRYPT_AES: u32 = 1;
/// `crypt_method` of LUKS images.
pub const CRYPT_LUKS: u32 = 2;

/// The bytes of a secret (a password). `Debug` does not show them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The two encryption formats (QEMU's `encrypt.format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Aes,
    Luks,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "aes" => Some(Format::Aes),
            "luks" => Some(Format::Luks),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Format::Aes => "aes",
            Format::Luks => "luks",
        }
    }
}

/// How an image is encrypted: what `qemu-img info` shows, known without
/// the password.
#[derive(Clone, Debug)]
pub enum Encryption {
    Aes,
    Luks(Box<LuksHeader>),
}

impl Encryption {
    pub fn format(&self) -> Format {
        match self {
            Encryption::Aes => Format::Aes,
            Encryption::Luks(_) => Format::Luks,
        }
    }
}

/// Encrypts and decrypts guest data clusters of one open image.
pub struct DataCipher {
    cipher: SectorCipher,
    /// IVs count host (file) sectors (LUKS) rather than guest sectors (AES).
    by_host_offset: bool,
}

impl DataCipher {
    /// The cipher of a legacy AES image: the key is the password's first
    /// 16 bytes, zero padded.
    pub fn legacy_aes(password: &[u8]) -> Result<DataCipher> {
        let mut key = [0u8; 16];
        let n = password.len().min(16);
        key[..n].copy_from_slice(&password[..n]);
        Ok(DataCipher {
            cipher: SectorCipher::new(&legacy_aes_spec(), &key)?,
            by_host_offset: false,
        })
    }

    /// The cipher of a LUKS image, keyed with its unlocked master key.
    pub fn luks(header: &LuksHeader, master_key: &[u8]) -> Result<DataCipher> {
        Ok(DataCipher {
            cipher: SectorCipher::new(&header.spec, master_key)?,
            by_host_offset: true,
        })
    }

    fn sector(&self, host: u64, guest: u64) -> u64 {
        let off = if self.by_host_offset { host } else { guest };
        off / SECTOR as u64
    }

    /// Encrypts whole sectors stored at `host` holding guest bytes from `guest`.
    pub fn encrypt(&self, host: u64, guest: u64, buf: &mut [u8]) {
        self.cipher.encrypt(self.sector(host, guest), buf);
    }

    /// Decrypts whole sectors stored at `host` holding guest bytes from `guest`.
    pub fn decrypt(&self, host: u64, guest: u64, buf: &mut [u8]) {
        self.cipher.decrypt(self.sector(host, guest), buf);
    }
}

/// Legacy AES: AES-128-CBC with plain64 IVs.
fn legacy_aes_spec() -> CipherSpec {
    CipherSpec {
        aes_bits: 128,
        mode: Mode::Cbc,
        ivgen: IvGenAlg::Plain64,
    }
}

/// What a new encrypted image uses (QEMU's `encrypt.*` creation options).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptCreate {
    /// CRYPT_AES or CRYPT_LUKS.
    pub method: u32,
    /// The password (the bytes of the secret `encrypt.key-secret` names).
    pub password: Secret,
    /// LUKS only: cipher, key hash, PBKDF2 time per key slot.
    pub spec: CipherSpec,
    pub hash: HashAlg,
    pub iter_time_ms: u64,
}

impl EncryptCreate {
    /// QEMU's defaults for `encrypt.format=luks`: AES-256-XTS, plain64,
    /// SHA-256, 2 seconds of PBKDF2 per key slot.
    pub fn luks(password: Secret) -> EncryptCreate {
        EncryptCreate {
            method: CRYPT_LUKS,
            password,
            spec: CipherSpec {
                aes_bits: 256,
                mode: Mode::Xts,
                ivgen: IvGenAlg::Plain64,
            },
            hash: HashAlg::Sha256,
            iter_time_ms: 2000,
        }
    }

    /// Legacy AES (`encrypt.format=aes`, or `encryption=on`).
    pub fn aes(password: Secret) -> EncryptCreate {
        EncryptCreate {
            method: CRYPT_AES,
            password,
            spec: legacy_aes_spec(),
            hash: HashAlg::Sha256,
            iter_time_ms: 0,
        }
    }
}

/// Parses QEMU's names for the LUKS creation options into `e`:
/// `cipher-alg` (aes-128, aes-192, aes-256), `cipher-mode` (xts, cbc),
/// `ivgen-alg` (plain, plain64, essiv), `ivgen-hash-alg`, `hash-alg`.
pub fn set_luks_option(e: &mut EncryptCreate, key: &str, value: &str) -> Result<()> {
    let bad =
        || Error::InvalidArgument(format!("Parameter '{key}' does not accept value '{value}'"));
    match key {
        "cipher-alg" => {
            e.spec.aes_bits = match value {
                "aes-128" => 128,
                "aes-192" => 192,
                "aes-256" => 256,
                "des" | "3des" | "cast5-128" | "serpent-128" | "serpent-192" | "serpent-256"
                | "twofish-128" | "twofish-192" | "twofish-256" | "sm4" => {
                    return Err(Error::Unsupported(format!(
                        "Cipher algorithm '{value}' is not supported by oxqcow"
                    )))
                }
                _ => return Err(bad()),
            }
        }
        "cipher-mode" => {
            e.spec.mode = match value {
                "cbc" => Mode::Cbc,
                "xts" => Mode::Xts,
                "ecb" | "ctr" => {
                    return Err(Error::Unsupported(format!(
                        "Cipher mode '{value}' is not supported by oxqcow"
                    )))
                }
                _ => return Err(bad()),
            }
        }
        "ivgen-alg" => {
            e.spec.ivgen = match value {
                "plain" => IvGenAlg::Plain,
                "plain64" => IvGenAlg::Plain64,
                "essiv" => IvGenAlg::Essiv(match e.spec.ivgen {
                    IvGenAlg::Essiv(h) => h,
                    _ => HashAlg::Sha256,
                }),
                _ => return Err(bad()),
            }
        }
        "ivgen-hash-alg" => {
            let h = hash_option(value).ok_or_else(bad)?;
            if let IvGenAlg::Essiv(_) = e.spec.ivgen {
                e.spec.ivgen = IvGenAlg::Essiv(h);
            }
        }
        "hash-alg" => e.hash = hash_option(value).ok_or_else(bad)?,
        _ => return Err(Error::InvalidArgument(format!("Invalid parameter '{key}'"))),
    }
    Ok(())
}

fn hash_option(v: &str) -> Option<HashAlg> {
    HashAlg::from_name(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_aes_uses_guest_sectors_and_luks_host_sectors() {
        let aes = DataCipher::legacy_aes(b"astrochicken").unwrap();
        let mut a = vec![7u8; 1024];
        let mut b = a.clone();
        aes.encrypt(0x10000, 0, &mut a);
        aes.encrypt(0x50000, 0, &mut b);
        assert_eq!(a, b, "AES: the host offset does not matter");
        // A password longer than 16 bytes is cut at 16.
        let long = DataCipher::legacy_aes(b"astrochickenXXXXyyy").unwrap();
        let short = DataCipher::legacy_aes(b"astrochickenXXXX").unwrap();
        let mut c = vec![1u8; 512];
        let mut d = c.clone();
        long.encrypt(0, 512, &mut c);
        short.encrypt(0, 512, &mut d);
        assert_eq!(c, d);

        let (h, _, mk) = LuksHeader::create(
            EncryptCreate::luks(Secret::default()).spec,
            HashAlg::Sha256,
            b"x",
            1,
        )
        .unwrap();
        let luks = DataCipher::luks(&h, &mk).unwrap();
        let mut a = vec![7u8; 1024];
        let mut b = a.clone();
        luks.encrypt(0x10000, 0, &mut a);
        luks.encrypt(0x10000, 0x90000, &mut b);
        assert_eq!(a, b, "LUKS: the guest offset does not matter");
        luks.decrypt(0x10000, 0, &mut a);
        assert_eq!(a, vec![7u8; 1024]);
    }

    #[test]
    fn luks_options_parse_with_qemu_names() {
        let mut e = EncryptCreate::luks(Secret(b"p".to_vec()));
        set_luks_option(&mut e, "cipher-alg", "aes-128").unwrap();
        set_luks_option(&mut e, "cipher-mode", "cbc").unwrap();
        set_luks_option(&mut e, "ivgen-alg", "essiv").unwrap();
        set_luks_option(&mut e, "ivgen-hash-alg", "sha256").unwrap();
        set_luks_option(&mut e, "hash-alg", "sha1").unwrap();
        assert_eq!(e.spec.luks_mode(), "cbc-essiv:sha256");
        assert_eq!(e.spec.key_bytes(), 16);
        assert_eq!(e.hash, HashAlg::Sha1);
        assert!(set_luks_option(&mut e, "cipher-alg", "twofish-128").is_err());
        assert_eq!(
            set_luks_option(&mut e, "hash-alg", "md9")
                .unwrap_err()
                .to_string(),
            "Parameter 'hash-alg' does not accept value 'md9'"
        );
    }
}
