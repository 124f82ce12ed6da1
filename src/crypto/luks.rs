//! The LUKS1 header: parsing and checking it (an image is untrusted
//! input), unlocking the master key with a password, and making a new
//! header for image creation.
//!
//! Layout (all numbers big-endian): magic "LUKS\xba\xbe", version 1,
//! cipher name, cipher mode and hash name (32 bytes each, NUL padded), the
//! payload offset (512-byte sectors), the key length, the master key's
//! PBKDF2 digest (20 bytes), its salt (32) and iteration count, a UUID
//! (40), then 8 key slots of 48 bytes: state, iterations, salt (32), key
//! material offset (sectors), stripes. A slot's key material is the master
//! key split into 4000 stripes (see `afsplit`), encrypted with the data
//! cipher under a key PBKDF2 derives from the password, IVs counted from 0
//! at the start of the material.
//!
//! In qcow2 the header lives in the clusters the crypto header extension
//! points at; the "payload offset" is then the length of that area.

use super::afsplit;
use super::cipher::{CipherSpec, SectorCipher, SECTOR};
use super::hash::HashAlg;
use crate::error::{Error, Result};

pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Bytes of the fixed header (before the key material).
pub const HEADER_LEN: usize = 592;
pub const SLOTS: usize = 8;
pub const STRIPES: u32 = 4000;
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_INACTIVE: u32 = 0x0000_DEAD;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
/// Key material areas start on this boundary.
const ALIGN: u64 = 4096;
/// Fewest PBKDF2 iterations a new header uses (master key and key slot).
const MIN_ITERATIONS: u64 = 1000;
/// Longest key a header may declare (AES-256 in XTS mode takes 64).
const MAX_KEY_BYTES: u32 = 64;

/// One key slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    /// Offset of the key material in 512-byte sectors from the header start.
    pub key_offset: u32,
    pub stripes: u32,
}

/// A parsed, checked LUKS1 header.
#[derive(Clone, Debug)]
pub struct LuksHeader {
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash_spec: String,
    /// In 512-byte sectors.
    pub payload_offset: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_salt: [u8; SALT_LEN],
    pub mk_iterations: u32,
    pub uuid: String,
    pub slots: Vec<KeySlot>,
    pub spec: CipherSpec,
    pub hash: HashAlg,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// A NUL-terminated string field.
fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn put_str(b: &mut [u8], s: &str) {
    let n = s.len().min(b.len() - 1);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Byte range of a slot's key material (from the header start).
fn slot_range(s: &KeySlot, key_bytes: u32) -> (u64, u64) {
    let start = s.key_offset as u64 * SECTOR as u64;
    (start, start + key_bytes as u64 * STRIPES as u64)
}

/// Bytes of a new header with its key material for keys of `key_bytes`:
/// where its payload starts.
pub fn area_len(key_bytes: usize) -> u64 {
    ALIGN + SLOTS as u64 * material_area(key_bytes as u32)
}

/// Bytes of one slot's key material area (split key, rounded up to ALIGN).
fn material_area(key_bytes: u32) -> u64 {
    (key_bytes as u64 * STRIPES as u64).div_ceil(ALIGN) * ALIGN
}

fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        Error::io(
            "Unable to read random bytes",
            std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)),
        )
    })
}

impl LuksHeader {
    /// Parses and checks a header (its first `HEADER_LEN` bytes). The key
    /// material must lie between the header and the payload offset.
    pub fn parse(b: &[u8]) -> Result<LuksHeader> {
        if b.len() < HEADER_LEN || b[..6] != MAGIC {
            return Err(Error::Invalid("Volume is not in LUKS format".into()));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(Error::Unsupported(format!(
                "LUKS version {version} is not supported"
            )));
        }
        let cipher_name = cstr(&b[8..40]);
        let cipher_mode = cstr(&b[40..72]);
        let hash_spec = cstr(&b[72..104]);
        let payload_offset = be32(b, 104);
        let key_bytes = be32(b, 108);
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_salt = [0u8; SALT_LEN];
        mk_salt.copy_from_slice(&b[132..164]);
        let mk_iterations = be32(b, 164);
        let uuid = cstr(&b[168..208]);
        // The key slots first (QEMU's order of checks), then the algorithms.
        let header_sectors = (HEADER_LEN as u64).div_ceil(SECTOR as u64);
        let payload_end = payload_offset as u64 * SECTOR as u64;
        let mut slots = Vec::with_capacity(SLOTS);
        let mut states = Vec::with_capacity(SLOTS);
        for i in 0..SLOTS {
            let s = &b[208 + i * 48..208 + (i + 1) * 48];
            let mut salt = [0u8; SALT_LEN];
            salt.copy_from_slice(&s[8..40]);
            states.push(be32(s, 0));
            slots.push(KeySlot {
                active: be32(s, 0) == SLOT_ACTIVE,
                iterations: be32(s, 4),
                salt,
                key_offset: be32(s, 40),
                stripes: be32(s, 44),
            });
        }
        for (i, slot) in slots.iter().enumerate() {
            if states[i] != SLOT_ACTIVE && states[i] != SLOT_INACTIVE {
                return Err(Error::Invalid(format!(
                    "Keyslot {i} state (active/disable) is corrupted"
                )));
            }
            if slot.active && slot.iterations == 0 {
                return Err(Error::Invalid(format!(
                    "Keyslot {i} iteration count is zero"
                )));
            }
            if slot.stripes != STRIPES {
                return Err(Error::Invalid(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    slot.stripes
                )));
            }
            if (slot.key_offset as u64) < header_sectors {
                return Err(Error::Invalid(format!(
                    "Keyslot {i} is overlapping with the LUKS header"
                )));
            }
            let (a0, a1) = slot_range(slot, key_bytes);
            if a1 > payload_end {
                return Err(Error::Invalid(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                )));
            }
            for (j, other) in slots.iter().enumerate().skip(i + 1) {
                let (b0, b1) = slot_range(other, key_bytes);
                if a0 < b1 && b0 < a1 {
                    return Err(Error::Invalid(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    )));
                }
            }
        }
        if key_bytes == 0 || key_bytes > MAX_KEY_BYTES {
            return Err(Error::Unsupported(format!(
                "Algorithm '{cipher_name}' with key size {key_bytes} bytes not supported"
            )));
        }
        let spec = CipherSpec::from_luks(&cipher_name, &cipher_mode, key_bytes)?;
        let hash = HashAlg::from_name(&hash_spec).ok_or_else(|| {
            Error::Unsupported(format!("Hash algorithm '{hash_spec}' is not supported"))
        })?;
        Ok(LuksHeader {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_salt,
            mk_iterations,
            uuid,
            slots,
            spec,
            hash,
        })
    }

    /// The header's first `HEADER_LEN` bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_str(&mut b[8..40], &self.cipher_name);
        put_str(&mut b[40..72], &self.cipher_mode);
        put_str(&mut b[72..104], &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        put_str(&mut b[168..208], &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + i * 48;
            let state = if s.active { SLOT_ACTIVE } else { SLOT_INACTIVE };
            b[o..o + 4].copy_from_slice(&state.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// Bytes of header plus key material: where the payload starts.
    pub fn area_len(&self) -> u64 {
        self.payload_offset as u64 * SECTOR as u64
    }

    /// Finds the master key: tries every active slot with `password`.
    /// `read` fills a buffer from the header area at a byte offset.
    pub fn unlock(
        &self,
        password: &[u8],
        read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<Vec<u8>> {
        let n = self.key_bytes as usize;
        let split_len = n * STRIPES as usize;
        // The split key need not be a whole number of sectors; both modes
        // are prefix-consistent, so the last sector is padded.
        let mut material = vec![0u8; split_len.div_ceil(SECTOR) * SECTOR];
        let mut slot_key = vec![0u8; n];
        let mut master = vec![0u8; n];
        let mut digest = [0u8; DIGEST_LEN];
        for s in self.slots.iter().filter(|s| s.active) {
            self.hash
                .pbkdf2(password, &s.salt, s.iterations, &mut slot_key);
            read(
                &mut material[..split_len],
                s.key_offset as u64 * SECTOR as u64,
            )?;
            SectorCipher::new(&self.spec, &slot_key)?.decrypt(0, &mut material);
            afsplit::merge(
                self.hash,
                &material[..split_len],
                STRIPES as usize,
                &mut master,
            );
            self.hash
                .pbkdf2(&master, &self.mk_salt, self.mk_iterations, &mut digest);
            if digest == self.mk_digest {
                return Ok(master);
            }
        }
        Err(Error::Key(
            "Invalid password, cannot unlock any keyslot".into(),
        ))
    }

    /// A new header with slot 0 holding a fresh random master key under
    /// `password`. Returns the header, the whole area (header and key
    /// material, `area_len()` bytes) and the master key.
    pub fn create(
        spec: CipherSpec,
        hash: HashAlg,
        password: &[u8],
        iter_time_ms: u64,
    ) -> Result<(LuksHeader, Vec<u8>, Vec<u8>)> {
        let n = spec.key_bytes();
        let mut master = vec![0u8; n];
        random(&mut master)?;
        let mut mk_salt = [0u8; SALT_LEN];
        random(&mut mk_salt)?;
        // As LUKS tools do: the master key digest gets an eighth of the
        // time (so that all 8 slots together cost about iter_time), each
        // slot the whole of it; never fewer than MIN_ITERATIONS.
        let clamp = |it: u64| it.clamp(MIN_ITERATIONS, u32::MAX as u64) as u32;
        let mk_iterations = clamp(hash.pbkdf2_iterations_for(iter_time_ms, DIGEST_LEN) / 8);
        let mut mk_digest = [0u8; DIGEST_LEN];
        hash.pbkdf2(&master, &mk_salt, mk_iterations, &mut mk_digest);

        let area = material_area(n as u32);
        let first = ALIGN;
        let payload = area_len(n);
        let mut slots = Vec::with_capacity(SLOTS);
        for i in 0..SLOTS as u64 {
            slots.push(KeySlot {
                active: false,
                iterations: 0,
                salt: [0; SALT_LEN],
                key_offset: ((first + i * area) / SECTOR as u64) as u32,
                stripes: STRIPES,
            });
        }
        let mut salt = [0u8; SALT_LEN];
        random(&mut salt)?;
        let iterations = clamp(hash.pbkdf2_iterations_for(iter_time_ms, n));
        let mut slot_key = vec![0u8; n];
        hash.pbkdf2(password, &salt, iterations, &mut slot_key);
        let mut stripes_random = vec![0u8; n * (STRIPES as usize - 1)];
        random(&mut stripes_random)?;
        let split = afsplit::split(hash, &master, STRIPES as usize, &stripes_random);
        let mut material = split;
        material.resize(material.len().div_ceil(SECTOR) * SECTOR, 0);
        SectorCipher::new(&spec, &slot_key)?.encrypt(0, &mut material);
        slots[0] = KeySlot {
            active: true,
            iterations,
            salt,
            key_offset: (first / SECTOR as u64) as u32,
            stripes: STRIPES,
        };
        let h = LuksHeader {
            cipher_name: "aes".into(),
            cipher_mode: spec.luks_mode(),
            hash_spec: hash.name().into(),
            payload_offset: (payload / SECTOR as u64) as u32,
            key_bytes: n as u32,
            mk_digest,
            mk_salt,
            mk_iterations,
            uuid: new_uuid()?,
            slots,
            spec,
            hash,
        };
        let mut bytes = vec![0u8; payload as usize];
        bytes[..HEADER_LEN].copy_from_slice(&h.encode());
        let split_len = n * STRIPES as usize;
        bytes[first as usize..first as usize + split_len].copy_from_slice(&material[..split_len]);
        Ok((h, bytes, master))
    }
}

/// A random (version 4) UUID in its 36-character text form.
fn new_uuid() -> Result<String> {
    let mut u = [0u8; 16];
    random(&mut u)?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        h[..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::cipher::{IvGenAlg, Mode};

    fn spec() -> CipherSpec {
        CipherSpec {
            aes_bits: 256,
            mode: Mode::Xts,
            ivgen: IvGenAlg::Plain64,
        }
    }

    #[test]
    fn create_then_unlock_with_the_right_password_only() {
        let (h, area, master) = LuksHeader::create(spec(), HashAlg::Sha256, b"pw", 1).unwrap();
        assert_eq!(h.payload_offset, 4040);
        assert_eq!(area.len(), 2068480);
        assert_eq!(h.slots[1].key_offset * 512, 262144);
        let parsed = LuksHeader::parse(&area).unwrap();
        assert_eq!(parsed.uuid, h.uuid);
        assert_eq!(parsed.slots, h.slots);
        let mut read = |b: &mut [u8], off: u64| {
            b.copy_from_slice(&area[off as usize..off as usize + b.len()]);
            Ok(())
        };
        assert_eq!(parsed.unlock(b"pw", &mut read).unwrap(), master);
        let e = parsed.unlock(b"wrong", &mut read).unwrap_err();
        assert_eq!(e.to_string(), "Invalid password, cannot unlock any keyslot");
    }

    #[test]
    fn hostile_headers_are_refused_with_messages() {
        let (_, area, _) = LuksHeader::create(spec(), HashAlg::Sha256, b"pw", 1).unwrap();
        let msg = |b: &[u8]| LuksHeader::parse(b).unwrap_err().to_string();
        assert_eq!(msg(&area[..100]), "Volume is not in LUKS format");
        let mut b = area[..HEADER_LEN].to_vec();
        b[7] = 2;
        assert_eq!(msg(&b), "LUKS version 2 is not supported");
        let mut b = area[..HEADER_LEN].to_vec();
        b[208 + 48 + 3] = 0x77;
        assert_eq!(msg(&b), "Keyslot 1 state (active/disable) is corrupted");
        let mut b = area[..HEADER_LEN].to_vec();
        b[208 + 44..208 + 48].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(msg(&b), "Keyslot 0 is corrupted (stripes 7 != 4000)");
        let mut b = area[..HEADER_LEN].to_vec();
        b[104..108].copy_from_slice(&16u32.to_be_bytes());
        assert_eq!(
            msg(&b),
            "Keyslot 0 is overlapping with the encrypted payload"
        );
        let mut b = area[..HEADER_LEN].to_vec();
        b[208 + 4..208 + 8].fill(0);
        assert_eq!(msg(&b), "Keyslot 0 iteration count is zero");
        let mut b = area[..HEADER_LEN].to_vec();
        b[208 + 40..208 + 44].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(msg(&b), "Keyslot 0 is overlapping with the LUKS header");
        let mut b = area[..HEADER_LEN].to_vec();
        b[208 + 48 + 40..208 + 48 + 44].copy_from_slice(&8u32.to_be_bytes());
        assert_eq!(msg(&b), "Keyslots 0 and 1 are overlapping in the header");
        let mut b = area[..HEADER_LEN].to_vec();
        b[108..112].copy_from_slice(&65u32.to_be_bytes());
        assert_eq!(msg(&b), "Keyslots 0 and 1 are overlapping in the header");
        let mut b = area[..HEADER_LEN].to_vec();
        b[104..108].copy_from_slice(&u32::MAX.to_be_bytes());
        for i in 0..SLOTS {
            let o = 208 + i * 48 + 40;
            b[o..o + 4].copy_from_slice(&(8 + i as u32 * 0x0100_0000).to_be_bytes());
        }
        b[108..112].copy_from_slice(&4000u32.to_be_bytes());
        assert_eq!(
            msg(&b),
            "Algorithm 'aes' with key size 4000 bytes not supported"
        );
        let mut b = area[..HEADER_LEN].to_vec();
        b[72..80].copy_from_slice(b"md5\0\0\0\0\0");
        assert_eq!(msg(&b), "Hash algorithm 'md5' is not supported");
    }
}
