//! `oxqcow compare`: qemu-img compare. Two images are compared guest byte
//! for guest byte (backing chains included); the first difference is
//! reported at 512-byte sector granularity as qemu-img reports it, a size
//! difference is a warning (an error with -s) and the larger image's tail
//! must read as zeros. Strict mode also compares block status flags the
//! way qemu-img does (allocation, zero, data, offset-valid, EOF).
//! Exit status: 0 identical, 1 different, 2 open error, 3 block status
//! error, 4 read error.

use crate::img_util::{exit_with, fail_with, flush_held, open_named, print_held, Progress};
use crate::util::{errmsg, file_extent, virtual_size, CliResult};
use oxqcow::{BlockStatus, Image, OpenOptions};
use std::fs::File;

#[derive(clap::Args)]
pub struct Args {
    /// Quiet operation
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Format of the first image (probed when not given)
    #[arg(short = 'f', long = "a-format", value_name = "FMT")]
    fmt1: Option<String>,
    /// Format of the second image (probed when not given)
    #[arg(short = 'F', long = "b-format", value_name = "FMT")]
    fmt2: Option<String>,
    /// Strict mode: sizes and block status must match too
    #[arg(short = 's', long = "strict")]
    strict: bool,
    /// Cache mode (accepted, ignored)
    #[arg(short = 'T', long = "cache", value_name = "CACHE_MODE")]
    cache: Option<String>,
    /// Open the images in shared mode (accepted, ignored)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Define an object: secret,id=ID,data=PASSWORD|file=PATH[,format=raw|base64]
    #[arg(long = "object", value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// Treat the image names as option strings (driver=qcow2,file.filename=F,encrypt.key-secret=ID)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// First image
    filename1: String,
    /// Second image
    filename2: String,
}

/// qemu-img's buffer: at most this much is read per step.
const IO_BUF: u64 = 2 << 20;

// QEMU's block status flags.
const DATA: u32 = 0x01;
const ZERO: u32 = 0x02;
const OFFSET_VALID: u32 = 0x04;
const ALLOCATED: u32 = 0x10;
const EOF: u32 = 0x20;
const COMPRESSED: u32 = 0x80;

/// One side of the comparison.
struct Side {
    img: Image,
    name: String,
    size: u64,
    /// A raw image's file, for its holes.
    raw: Option<File>,
}

impl Side {
    fn open(name: &str, image_opts: bool, fmt: Option<&str>) -> Side {
        let named = match open_named(name, image_opts, fmt, &OpenOptions::default()) {
            Ok(n) => n,
            Err(e) => fail_with(2, &e),
        };
        let img = named.img;
        let raw = match (&img, named.file) {
            (Image::Raw(_), Some(f)) => File::open(f).ok(),
            _ => None,
        };
        Side {
            size: virtual_size(&img),
            img,
            name: name.to_string(),
            raw,
        }
    }

    /// The status flags bdrv_block_status_above would give at `off`, and
    /// for how many bytes they hold.
    fn status(&self, off: u64, len: u64) -> CliResult<(u32, u64)> {
        let len = len.min(self.size - off);
        let (mut flags, n) = if let Some(f) = &self.raw {
            let (data, n) = file_extent(f, off, len);
            let kind = if data { DATA } else { ZERO };
            (kind | OFFSET_VALID | ALLOCATED, n.clamp(1, len))
        } else {
            let real = self.img.size();
            if off >= real {
                (ZERO | ALLOCATED, len)
            } else {
                let (st, n) = self
                    .img
                    .block_status(off, len.min(real - off))
                    .map_err(|e| errmsg(&e))?;
                let flags = match st {
                    BlockStatus::Data { host: Some(_), .. } => DATA | OFFSET_VALID | ALLOCATED,
                    BlockStatus::Data { host: None, .. } => DATA | ALLOCATED | COMPRESSED,
                    BlockStatus::Zero { depth } => {
                        let host = depth == 0 && self.img.qcow2().is_some_and(|q| {
                            matches!(
                                q.l2_entry_at(off),
                                Ok(oxqcow::format::entries::L2Entry::Zero { host, .. }) if host != 0
                            )
                        });
                        ZERO | ALLOCATED | if host { OFFSET_VALID } else { 0 }
                    }
                    BlockStatus::Unallocated { depth } => {
                        let past_backing =
                            depth > 0 && self.img.backing().is_some_and(|b| off >= b.size());
                        if past_backing {
                            ZERO | ALLOCATED
                        } else {
                            ZERO
                        }
                    }
                };
                (flags, n.clamp(1, len))
            }
        };
        if off + n == self.size {
            flags |= EOF;
        }
        Ok((flags, n))
    }

    fn read(&self, buf: &mut [u8], off: u64) {
        let r = crate::img_util::read_padded(&self.img, buf, off);
        if let Err(e) = r {
            fail_with(
                4,
                &format!(
                    "Error while reading offset {off} of {}: {}",
                    self.name,
                    crate::img_util::errno_text(&e)
                ),
            );
        }
    }
}

/// Offset of the first 512-byte sector (counted from `buf`'s start) where
/// the buffers differ.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    let i = a.iter().zip(b).position(|(x, y)| x != y)?;
    Some(i - i % 512)
}

/// Offset of the first sector that is not all zeros.
fn first_nonzero(a: &[u8]) -> Option<usize> {
    let i = a.iter().position(|&x| x != 0)?;
    Some(i - i % 512)
}

pub fn run(a: Args) -> CliResult<()> {
    let _ = (&a.cache, a.force_share);
    let progress_on = a.progress && !a.quiet;
    // Prints a result line (then ends the progress line) and exits.
    let done = |s: &str, code: i32| -> ! {
        flush_held();
        if !a.quiet {
            println!("{s}");
        }
        if progress_on {
            println!();
        }
        exit_with(code)
    };
    if a.image_opts && a.fmt2.is_some() {
        fail_with(2, "--image-opts and -F are mutually exclusive");
    }
    if let Err(m) = crate::secret::define(&a.object) {
        fail_with(2, &m);
    }
    let s1 = Side::open(&a.filename1, a.image_opts, a.fmt1.as_deref());
    let s2 = Side::open(&a.filename2, a.image_opts, a.fmt2.as_deref());
    let total = s1.size.min(s2.size);
    let mut progress = Progress::new(progress_on);
    if a.strict && s1.size != s2.size {
        done("Strict mode: Image size mismatch!", 1);
    }
    let mut b1 = vec![0u8; IO_BUF as usize];
    let mut b2 = vec![0u8; IO_BUF as usize];
    let mut off = 0u64;
    while off < total {
        let st = |s: &Side| {
            s.status(off, s.size - off).unwrap_or_else(|_| {
                fail_with(3, &format!("Sector allocation test failed for {}", s.name))
            })
        };
        let (f1, n1) = st(&s1);
        let (f2, n2) = st(&s2);
        let mut chunk = n1.min(n2).min(total - off);
        if a.strict && f1 != f2 {
            done(
                &format!("Strict mode: Offset {off} block status mismatch!"),
                1,
            );
        }
        if f1 & ZERO == 0 || f2 & ZERO == 0 {
            chunk = chunk.min(IO_BUF);
            let n = chunk as usize;
            s1.read(&mut b1[..n], off);
            s2.read(&mut b2[..n], off);
            if let Some(i) = first_diff(&b1[..n], &b2[..n]) {
                done(
                    &format!("Content mismatch at offset {}!", off + i as u64),
                    1,
                );
            }
        }
        off += chunk;
        progress.update(off, s1.size.max(s2.size));
    }
    if s1.size != s2.size {
        if !a.quiet {
            print_held("Warning: Image size mismatch!");
        }
        let over = if s1.size > s2.size { &s1 } else { &s2 };
        while off < over.size {
            let (f, n) = over.status(off, over.size - off).unwrap_or_else(|_| {
                fail_with(
                    3,
                    &format!("Sector allocation test failed for {}", over.name),
                )
            });
            let chunk = n.min(IO_BUF).min(over.size - off);
            if f & ZERO == 0 {
                let n = chunk as usize;
                over.read(&mut b1[..n], off);
                if let Some(i) = first_nonzero(&b1[..n]) {
                    done(
                        &format!("Content mismatch at offset {}!", off + i as u64),
                        1,
                    );
                }
            }
            off += chunk;
            progress.update(off, over.size);
        }
    }
    done("Images are identical.", 0)
}
