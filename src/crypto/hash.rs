//! The hash algorithms LUKS1 headers name (`hash_spec`), with PBKDF2 over
//! their HMAC and plain digests for the anti-forensic splitter and ESSIV.
//!
//! One enum instead of generics at every call site: the header picks the
//! algorithm at run time, and each operation dispatches once here.

use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

/// A hash algorithm a LUKS1 header may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    /// The algorithm for a header's `hash_spec` or a `hash-alg` option.
    pub fn from_name(name: &str) -> Option<HashAlg> {
        Some(match name {
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            _ => return None,
        })
    }

    /// The name as headers and QEMU's `hash alg:` line spell it.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(parts),
            HashAlg::Sha224 => run::<Sha224>(parts),
            HashAlg::Sha256 => run::<Sha256>(parts),
            HashAlg::Sha384 => run::<Sha384>(parts),
            HashAlg::Sha512 => run::<Sha512>(parts),
        }
    }

    /// PBKDF2 with HMAC over this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Sha1 => pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => pbkdf2_hmac::<Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2_hmac::<Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
        }
    }

    /// How many PBKDF2 iterations take `millis` milliseconds on this
    /// machine for an output of `out_len` bytes (a short timed run scaled
    /// up), as LUKS tools size their iteration counts.
    pub fn pbkdf2_iterations_for(self, millis: u64, out_len: usize) -> u64 {
        let mut out = vec![0u8; out_len];
        let salt = [0u8; 32];
        let mut rounds: u32 = 1 << 12;
        loop {
            let t = std::time::Instant::now();
            self.pbkdf2(b"oxqcow benchmark", &salt, rounds, &mut out);
            let ns = t.elapsed().as_nanos().max(1);
            // Time at least 50 ms so that the estimate is stable.
            if ns >= 50_000_000 || rounds >= 1 << 28 {
                let per_ms = rounds as u128 * 1_000_000 / ns;
                return (per_ms * millis as u128).min(u64::MAX as u128) as u64;
            }
            rounds *= 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_sha256_matches_the_rfc_7914_vector() {
        // RFC 7914 section 11: PBKDF2-HMAC-SHA256("passwd", "salt", 1, 64).
        let mut out = [0u8; 64];
        HashAlg::Sha256.pbkdf2(b"passwd", b"salt", 1, &mut out);
        assert_eq!(&out[..8], &[0x55, 0xac, 0x04, 0x6e, 0x56, 0xe3, 0x08, 0x9f]);
    }

    #[test]
    fn names_round_trip_and_sizes_are_right() {
        for h in [
            HashAlg::Sha1,
            HashAlg::Sha224,
            HashAlg::Sha256,
            HashAlg::Sha384,
            HashAlg::Sha512,
        ] {
            assert_eq!(HashAlg::from_name(h.name()), Some(h));
            assert_eq!(h.digest(&[b"a", b"bc"]).len(), h.digest_len());
            assert_eq!(h.digest(&[b"a", b"bc"]), h.digest(&[b"abc"]));
        }
        assert_eq!(HashAlg::from_name("md5"), None);
    }
}
