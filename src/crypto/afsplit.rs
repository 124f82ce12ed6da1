//! LUKS1's anti-forensic splitter: a key of n bytes is stored as `stripes`
//! blocks of n bytes, so that destroying any one block destroys the key.
//! Merging XORs the stripes into an accumulator that is "diffused" (hashed
//! piecewise) after each one; the last stripe is chosen at split time so
//! that the result is the key.

use super::hash::HashAlg;

/// Hashes `buf` in digest-sized pieces, each prefixed by its big-endian
/// index, the last piece truncated to what is left.
fn diffuse(h: HashAlg, buf: &mut [u8]) {
    let d = h.digest_len();
    for (i, piece) in buf.chunks_mut(d).enumerate() {
        let out = h.digest(&[&(i as u32).to_be_bytes(), piece]);
        let n = piece.len();
        piece.copy_from_slice(&out[..n]);
    }
}

/// Recovers a key from its split form (`stripes` blocks of `key.len()` bytes).
pub fn merge(h: HashAlg, split: &[u8], stripes: usize, key: &mut [u8]) {
    let n = key.len();
    debug_assert_eq!(split.len(), n * stripes);
    key.fill(0);
    for (i, block) in split.chunks_exact(n).take(stripes).enumerate() {
        for (k, b) in key.iter_mut().zip(block) {
            *k ^= b;
        }
        if i + 1 < stripes {
            diffuse(h, key);
        }
    }
}

/// Splits `key` into `stripes` blocks; `random` supplies the first
/// `stripes - 1` blocks (it must be `key.len() * (stripes - 1)` bytes).
pub fn split(h: HashAlg, key: &[u8], stripes: usize, random: &[u8]) -> Vec<u8> {
    let n = key.len();
    debug_assert_eq!(random.len(), n * (stripes - 1));
    let mut out = Vec::with_capacity(n * stripes);
    let mut acc = vec![0u8; n];
    for block in random.chunks_exact(n) {
        out.extend_from_slice(block);
        for (a, b) in acc.iter_mut().zip(block) {
            *a ^= b;
        }
        diffuse(h, &mut acc);
    }
    out.extend(acc.iter().zip(key).map(|(a, k)| a ^ k));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_gives_the_key_back() {
        for h in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            // 64-byte keys span several pieces of a 20- or 32-byte digest.
            let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
            let random: Vec<u8> = (0..64 * 9u32).map(|i| (i * 13 + 5) as u8).collect();
            let s = split(h, &key, 10, &random);
            assert_eq!(s.len(), 640);
            let mut back = vec![0u8; 64];
            merge(h, &s, 10, &mut back);
            assert_eq!(back, key);
            // Any damaged stripe loses the key.
            let mut bad = s.clone();
            bad[3] ^= 1;
            merge(h, &bad, 10, &mut back);
            assert_ne!(back, key);
        }
    }
}
