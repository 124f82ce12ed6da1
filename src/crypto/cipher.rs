//! Sector ciphers: AES in CBC or XTS mode over 512-byte sectors, each with
//! an initialisation vector made from its sector number (`plain`: 32-bit
//! little-endian, `plain64`: 64-bit little-endian, `essiv`: the 64-bit
//! number encrypted with a key hashed from the data key). This is what
//! LUKS1 and qcow2's legacy AES encryption need.
//!
//! The block ciphers and modes are RustCrypto's (`aes`, `cbc`, `xts-mode`);
//! the key schedule is expanded once per key, not once per sector.

use super::hash::HashAlg;
use crate::error::{Error, Result};
use aes::cipher::block_padding::NoPadding;
use aes::cipher::{BlockDecryptMut, BlockEncrypt, BlockEncryptMut, InnerIvInit, KeyInit};
use aes::{Aes128, Aes192, Aes256};
use xts_mode::Xts128;

/// The encryption sector: IVs count in these units.
pub const SECTOR: usize = 512;

/// Block cipher mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Cbc,
    Xts,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Cbc => "cbc",
            Mode::Xts => "xts",
        }
    }
}

/// How a sector's IV is made from its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGenAlg {
    Plain,
    Plain64,
    Essiv(HashAlg),
}

impl IvGenAlg {
    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv(_) => "essiv",
        }
    }
}

/// A complete cipher choice: AES key size (bits), mode, IV generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CipherSpec {
    pub aes_bits: u32,
    pub mode: Mode,
    pub ivgen: IvGenAlg,
}

impl CipherSpec {
    /// Bytes of key material the spec takes (XTS takes two AES keys).
    pub fn key_bytes(&self) -> usize {
        let k = self.aes_bits as usize / 8;
        match self.mode {
            Mode::Cbc => k,
            Mode::Xts => 2 * k,
        }
    }

    /// QEMU's name of the algorithm ("aes-256").
    pub fn alg_name(&self) -> String {
        format!("aes-{}", self.aes_bits)
    }

    /// The spec a LUKS1 header describes with `cipher_name` ("aes"),
    /// `cipher_mode` ("xts-plain64", "cbc-essiv:sha256") and its key size.
    pub fn from_luks(name: &str, mode: &str, key_bytes: u32) -> Result<CipherSpec> {
        if name != "aes" {
            return Err(Error::Unsupported(format!(
                "Algorithm '{name}' with key size {key_bytes} bytes not supported"
            )));
        }
        let (m, iv) = mode.split_once('-').unwrap_or((mode, ""));
        let mode_v = match m {
            "cbc" => Mode::Cbc,
            "xts" => Mode::Xts,
            _ => {
                return Err(Error::Unsupported(format!(
                    "Cipher mode '{m}' is not supported"
                )))
            }
        };
        let (ivname, ivhash) = iv.split_once(':').unwrap_or((iv, ""));
        let ivgen = match (ivname, ivhash) {
            ("plain", "") => IvGenAlg::Plain,
            ("plain64", "") => IvGenAlg::Plain64,
            ("essiv", h) => IvGenAlg::Essiv(HashAlg::from_name(h).ok_or_else(|| {
                Error::Unsupported(format!("Hash algorithm '{h}' is not supported"))
            })?),
            _ => {
                return Err(Error::Unsupported(format!(
                    "IV generator '{iv}' is not supported"
                )))
            }
        };
        let per_key = match mode_v {
            Mode::Cbc => key_bytes,
            Mode::Xts if key_bytes.is_multiple_of(2) => key_bytes / 2,
            Mode::Xts => 0,
        };
        if !matches!(per_key, 16 | 24 | 32) {
            return Err(Error::Unsupported(format!(
                "Algorithm '{name}' with key size {key_bytes} bytes not supported"
            )));
        }
        Ok(CipherSpec {
            aes_bits: per_key * 8,
            mode: mode_v,
            ivgen,
        })
    }

    /// The header's `cipher_mode` string for this spec.
    pub fn luks_mode(&self) -> String {
        match self.ivgen {
            IvGenAlg::Essiv(h) => format!("{}-essiv:{}", self.mode.name(), h.name()),
            iv => format!("{}-{}", self.mode.name(), iv.name()),
        }
    }
}

/// One AES key, expanded.
#[derive(Clone)]
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    fn new(key: &[u8]) -> Result<Aes> {
        let bad = || Error::Invalid(format!("Invalid AES key length {}", key.len()));
        Ok(match key.len() {
            16 => Aes::A128(Aes128::new_from_slice(key).map_err(|_| bad())?),
            24 => Aes::A192(Aes192::new_from_slice(key).map_err(|_| bad())?),
            32 => Aes::A256(Aes256::new_from_slice(key).map_err(|_| bad())?),
            _ => return Err(bad()),
        })
    }

    fn encrypt_block(&self, b: &mut [u8; 16]) {
        let blk = aes::Block::from_mut_slice(b);
        match self {
            Aes::A128(c) => c.encrypt_block(blk),
            Aes::A192(c) => c.encrypt_block(blk),
            Aes::A256(c) => c.encrypt_block(blk),
        }
    }
}

// Boxed: an expanded AES key is about 1 KiB.
enum Engine {
    Cbc(Box<Aes>),
    Xts128(Box<Xts128<Aes128>>),
    Xts192(Box<Xts128<Aes192>>),
    Xts256(Box<Xts128<Aes256>>),
}

enum IvGen {
    Plain,
    Plain64,
    Essiv(Box<Aes>),
}

/// A keyed sector cipher: encrypts and decrypts whole 512-byte sectors in place.
pub struct SectorCipher {
    engine: Engine,
    ivgen: IvGen,
}

fn cbc_encrypt<C>(c: &C, iv: &[u8; 16], buf: &mut [u8])
where
    C: aes::cipher::BlockCipher + BlockEncryptMut + Clone,
    C: aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
{
    let enc = cbc::Encryptor::<C>::inner_iv_init(c.clone(), iv.into());
    let n = buf.len();
    // Cannot fail: the length is a whole number of blocks and no padding is added.
    let _ = enc.encrypt_padded_mut::<NoPadding>(buf, n);
}

fn cbc_decrypt<C>(c: &C, iv: &[u8; 16], buf: &mut [u8])
where
    C: aes::cipher::BlockCipher + BlockDecryptMut + Clone,
    C: aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
{
    let dec = cbc::Decryptor::<C>::inner_iv_init(c.clone(), iv.into());
    let _ = dec.decrypt_padded_mut::<NoPadding>(buf);
}

impl SectorCipher {
    /// Keys a cipher; `key` must be `spec.key_bytes()` long.
    pub fn new(spec: &CipherSpec, key: &[u8]) -> Result<SectorCipher> {
        if key.len() != spec.key_bytes() {
            return Err(Error::Invalid(format!(
                "Key length {} does not match {} in {} mode",
                key.len(),
                spec.alg_name(),
                spec.mode.name()
            )));
        }
        let engine = match spec.mode {
            Mode::Cbc => Engine::Cbc(Box::new(Aes::new(key)?)),
            Mode::Xts => {
                let (k1, k2) = key.split_at(key.len() / 2);
                match (Aes::new(k1)?, Aes::new(k2)?) {
                    (Aes::A128(a), Aes::A128(b)) => Engine::Xts128(Box::new(Xts128::new(a, b))),
                    (Aes::A192(a), Aes::A192(b)) => Engine::Xts192(Box::new(Xts128::new(a, b))),
                    (Aes::A256(a), Aes::A256(b)) => Engine::Xts256(Box::new(Xts128::new(a, b))),
                    _ => return Err(Error::Invalid("Invalid XTS key".into())),
                }
            }
        };
        let ivgen = match spec.ivgen {
            IvGenAlg::Plain => IvGen::Plain,
            IvGenAlg::Plain64 => IvGen::Plain64,
            IvGenAlg::Essiv(h) => {
                let salt = h.digest(&[key]);
                if !matches!(salt.len(), 16 | 24 | 32) {
                    return Err(Error::Unsupported(format!(
                        "ESSIV with hash '{}' is not supported",
                        h.name()
                    )));
                }
                IvGen::Essiv(Box::new(Aes::new(&salt)?))
            }
        };
        Ok(SectorCipher { engine, ivgen })
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match &self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                c.encrypt_block(&mut iv);
            }
        }
        iv
    }

    /// Encrypts `buf` (whole sectors) whose first sector has number `sector`.
    pub fn encrypt(&self, sector: u64, buf: &mut [u8]) {
        debug_assert_eq!(buf.len() % SECTOR, 0);
        for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let iv = self.iv(sector.wrapping_add(i as u64));
            match &self.engine {
                Engine::Cbc(a) => match &**a {
                    Aes::A128(c) => cbc_encrypt(c, &iv, s),
                    Aes::A192(c) => cbc_encrypt(c, &iv, s),
                    Aes::A256(c) => cbc_encrypt(c, &iv, s),
                },
                Engine::Xts128(x) => x.encrypt_sector(s, iv),
                Engine::Xts192(x) => x.encrypt_sector(s, iv),
                Engine::Xts256(x) => x.encrypt_sector(s, iv),
            }
        }
    }

    /// Decrypts `buf` (whole sectors) whose first sector has number `sector`.
    pub fn decrypt(&self, sector: u64, buf: &mut [u8]) {
        debug_assert_eq!(buf.len() % SECTOR, 0);
        for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let iv = self.iv(sector.wrapping_add(i as u64));
            match &self.engine {
                Engine::Cbc(a) => match &**a {
                    Aes::A128(c) => cbc_decrypt(c, &iv, s),
                    Aes::A192(c) => cbc_decrypt(c, &iv, s),
                    Aes::A256(c) => cbc_decrypt(c, &iv, s),
                },
                Engine::Xts128(x) => x.decrypt_sector(s, iv),
                Engine::Xts192(x) => x.decrypt_sector(s, iv),
                Engine::Xts256(x) => x.decrypt_sector(s, iv),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(bits: u32, mode: Mode, ivgen: IvGenAlg) -> CipherSpec {
        CipherSpec {
            aes_bits: bits,
            mode,
            ivgen,
        }
    }

    #[test]
    fn every_spec_round_trips_and_depends_on_the_sector() {
        let ivs = [
            IvGenAlg::Plain,
            IvGenAlg::Plain64,
            IvGenAlg::Essiv(HashAlg::Sha256),
        ];
        for bits in [128, 192, 256] {
            for mode in [Mode::Cbc, Mode::Xts] {
                for iv in ivs {
                    let s = spec(bits, mode, iv);
                    let key: Vec<u8> = (0..s.key_bytes() as u8).collect();
                    let c = SectorCipher::new(&s, &key).unwrap();
                    let plain: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
                    let mut a = plain.clone();
                    c.encrypt(5, &mut a);
                    assert_ne!(a, plain);
                    let mut b = plain.clone();
                    c.encrypt(6, &mut b);
                    assert_ne!(a[..512], b[..512]);
                    // Sector 6 of the first buffer is sector 6 of the second.
                    assert_eq!(a[512..1024], b[..512]);
                    c.decrypt(5, &mut a);
                    assert_eq!(a, plain);
                }
            }
        }
    }

    #[test]
    fn xts_aes128_matches_ieee_1619_vector_2() {
        // IEEE 1619-2007 XTS-AES-128 vector 2: keys 11.. and 22.., data
        // unit 0x3333333333, 32 bytes of 0x44.
        let mut key = [0x11u8; 32];
        key[16..].fill(0x22);
        let s = spec(128, Mode::Xts, IvGenAlg::Plain64);
        let c = SectorCipher::new(&s, &key).unwrap();
        // Whole sectors only here: check the first block of a sector whose
        // IV is 0x3333333333, against the vector's first 16 bytes.
        let mut buf = vec![0x44u8; 512];
        c.encrypt(0x3333333333, &mut buf);
        assert_eq!(
            &buf[..16],
            &[
                0xc4, 0x54, 0x18, 0x5e, 0x6a, 0x16, 0x93, 0x6e, 0x39, 0x33, 0x40, 0x38, 0xac, 0xef,
                0x83, 0x8b
            ]
        );
    }

    #[test]
    fn luks_mode_strings_parse_and_print() {
        let s = CipherSpec::from_luks("aes", "xts-plain64", 64).unwrap();
        assert_eq!(s, spec(256, Mode::Xts, IvGenAlg::Plain64));
        assert_eq!(s.luks_mode(), "xts-plain64");
        let s = CipherSpec::from_luks("aes", "cbc-essiv:sha256", 32).unwrap();
        assert_eq!(s.luks_mode(), "cbc-essiv:sha256");
        assert_eq!(s.alg_name(), "aes-256");
        assert!(CipherSpec::from_luks("twofish", "xts-plain64", 64).is_err());
        assert!(CipherSpec::from_luks("aes", "xts-plain64", 33).is_err());
        assert!(CipherSpec::from_luks("aes", "ctr-plain", 32).is_err());
        assert!(CipherSpec::from_luks("aes", "cbc-essiv:md4", 32).is_err());
        assert!(SectorCipher::new(&s, &[0u8; 5]).is_err());
    }
}
