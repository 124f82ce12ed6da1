//! Decompression of compressed clusters: raw deflate (QEMU's "zlib") and
//! zstd. A stream must fill exactly one cluster; anything else is an error,
//! never a partial read.

use crate::error::{Error, Result};

pub fn decompress(kind: u8, input: &[u8], out: &mut [u8]) -> Result<()> {
    let bad = || Error::Corrupt("compressed cluster cannot be decompressed".into());
    match kind {
        0 => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                _ => Err(bad()),
            }
        }
        1 => {
            // QEMU writes one or more zstd frames that together fill the cluster.
            let mut dec = zstd::stream::raw::Decoder::new().map_err(|_| bad())?;
            let mut inp = zstd::stream::raw::InBuffer::around(input);
            let mut outb = zstd::stream::raw::OutBuffer::around(out);
            use zstd::stream::raw::Operation;
            while outb.pos() < outb.capacity() {
                let before = (inp.pos, outb.pos());
                dec.run(&mut inp, &mut outb).map_err(|_| bad())?;
                if (inp.pos, outb.pos()) == before {
                    return Err(bad());
                }
            }
            Ok(())
        }
        _ => Err(bad()),
    }
}

/// Compresses one cluster; returns None when it does not shrink.
pub fn compress(kind: u8, input: &[u8]) -> Option<Vec<u8>> {
    let out = match kind {
        0 => {
            // QEMU inflates with a 4 KiB window (-12 window bits): the
            // stream must not refer further back than that.
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = vec![0u8; input.len()];
            match c.compress(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => {
                    out.truncate(c.total_out() as usize);
                    out
                }
                _ => return None,
            }
        }
        _ => zstd::bulk::compress(input, 0).ok()?,
    };
    (out.len() < input.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_both_kinds_and_reject_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        for kind in [0u8, 1] {
            let c = compress(kind, &data).unwrap();
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
            let mut out = vec![0u8; data.len()];
            assert!(decompress(kind, &c[..c.len() / 2], &mut out).is_err());
            assert!(decompress(kind, &[0xff; 64], &mut out).is_err());
        }
    }
}
