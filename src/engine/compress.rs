//! Decompression of compressed clusters: raw deflate (QEMU's "zlib") and
//! zstd. A stream must fill exactly one cluster; anything else is an error,
//! never a partial read.

use crate::error::{Error, Result};
use std::cell::RefCell;
use zstd::stream::raw::{Decoder as ZstdDecoder, InBuffer, Operation, OutBuffer};

// One (de)compressor of each kind per thread, reset before each use: creating
// them per cluster (a zstd context is ~100 KiB to set up, zlib's state ~40
// KiB) was an eighth of a zstd-compressed image's conversion time.
thread_local! {
    static INFLATE: RefCell<Option<flate2::Decompress>> = const { RefCell::new(None) };
    static ZSTD_DEC: RefCell<Option<ZstdDecoder<'static>>> = const { RefCell::new(None) };
    static DEFLATE: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
    static ZSTD_ENC: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

pub fn decompress(kind: u8, input: &[u8], out: &mut [u8]) -> Result<()> {
    let bad = || Error::Corrupt("compressed cluster cannot be decompressed".into());
    match kind {
        0 => INFLATE.with_borrow_mut(|slot| {
            let d = match slot {
                Some(d) => {
                    d.reset(false);
                    d
                }
                None => slot.insert(flate2::Decompress::new(false)),
            };
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                _ => Err(bad()),
            }
        }),
        1 => ZSTD_DEC.with_borrow_mut(|slot| {
            let dec = match slot {
                Some(d) => {
                    d.reinit().map_err(|_| bad())?;
                    d
                }
                None => slot.insert(ZstdDecoder::new().map_err(|_| bad())?),
            };
            // QEMU writes one or more zstd frames that together fill the cluster.
            let mut inp = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            while outb.pos() < outb.capacity() {
                let before = (inp.pos, outb.pos());
                dec.run(&mut inp, &mut outb).map_err(|_| bad())?;
                if (inp.pos, outb.pos()) == before {
                    return Err(bad());
                }
            }
            Ok(())
        }),
        _ => Err(bad()),
    }
}

/// Compresses one cluster; returns None when it does not shrink.
pub fn compress(kind: u8, input: &[u8]) -> Option<Vec<u8>> {
    let out = match kind {
        0 => DEFLATE.with_borrow_mut(|slot| {
            // QEMU inflates with a 4 KiB window (-12 window bits): the
            // stream must not refer further back than that.
            let c = match slot {
                Some(c) => {
                    c.reset();
                    c
                }
                None => slot.insert(flate2::Compress::new_with_window_bits(
                    flate2::Compression::default(),
                    false,
                    12,
                )),
            };
            let mut out = vec![0u8; input.len()];
            match c.compress(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => {
                    out.truncate(c.total_out() as usize);
                    Some(out)
                }
                _ => None,
            }
        })?,
        _ => ZSTD_ENC.with_borrow_mut(|slot| {
            let c = match slot {
                Some(c) => c,
                None => slot.insert(zstd::bulk::Compressor::new(0).ok()?),
            };
            c.compress(input).ok()
        })?,
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
            // The thread's reused context is clean again after a failure.
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
            assert_eq!(compress(kind, &data).unwrap(), c);
        }
    }
}
