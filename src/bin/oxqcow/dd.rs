//! `oxqcow dd`: qemu-img's dd. Copies the input image, from block `skip`
//! on, `bs` bytes at a time, into a new image of the -O format (raw by
//! default), every block written as data. The operands and their errors
//! are qemu-img's, and so is how the sizes come out: the copy ends at
//! `count * bs` bytes of the input (or at its end when that is shorter),
//! counted from the start of the input rather than from `skip`, and a
//! skip past that end leaves an empty output and a warning.

use crate::convert::{create_target, Target};
use crate::img_util::{int_opt, open_image, open_named, size_opt};
use crate::util::{errmsg, report, virtual_size, CliResult};
use oxqcow::OpenOptions;
use std::path::Path;

#[derive(clap::Args)]
pub struct Args {
    /// Input format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    fmt: Option<String>,
    /// The input is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Output format: raw or qcow2
    #[arg(short = 'O', long = "output-format", value_name = "OUTPUT_FMT")]
    out_fmt: Option<String>,
    /// Accepted for compatibility (the input is opened read-only)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// bs=BLOCK_SIZE (default 512), count=BLOCKS, skip=BLOCKS, if=INPUT,
    /// of=OUTPUT
    #[arg(value_name = "OPERAND")]
    operands: Vec<String>,
}

/// The operands, as given.
struct Operands {
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
    input: Option<String>,
    output: Option<String>,
}

fn operands(list: &[String]) -> CliResult<Operands> {
    let mut o = Operands {
        bs: 512,
        count: None,
        skip: None,
        input: None,
        output: None,
    };
    for op in list {
        let (k, v) = op.split_once('=').unwrap_or((op, ""));
        match k {
            "bs" => o.bs = size_opt(v, "bs", 1, i32::MAX as i64)? as u64,
            "count" => o.count = Some(int_opt(v, "count", 0, i64::MAX)? as u64),
            "skip" => o.skip = Some(int_opt(v, "skip", 0, i64::MAX)? as u64),
            "if" => o.input = Some(v.to_string()),
            "of" => o.output = Some(v.to_string()),
            _ => return Err(format!("unrecognized operand {k}")),
        }
    }
    Ok(o)
}

pub fn run(a: Args) -> CliResult<()> {
    let _ = a.force_share;
    let o = operands(&a.operands)?;
    let (Some(input), Some(output)) = (&o.input, &o.output) else {
        return Err("Must specify both input and output files".into());
    };
    let src = open_named(
        input,
        a.image_opts,
        a.fmt.as_deref(),
        &OpenOptions::default(),
    )?
    .img;
    let out_fmt = a.out_fmt.as_deref().unwrap_or("raw");
    if !["raw", "qcow2"].contains(&out_fmt) {
        return Err("Unknown file format".into());
    }
    let in_size = virtual_size(&src);
    let bs = o.bs;
    let size = match o.count {
        Some(c) if c <= in_size / bs => c * bs,
        _ => in_size,
    };
    let mut in_pos = match o.skip {
        Some(s) if s > i64::MAX as u64 / bs || size < s * bs => {
            report(&format!("{input}: cannot skip to specified offset"));
            size
        }
        Some(s) => s * bs,
        None => 0,
    };
    create_target(
        Path::new(output),
        out_fmt,
        &Target::default(),
        size - in_pos,
    )
    .map_err(|e| format!("{output}: error while creating output image: {e}"))?;
    let rw = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let dst = open_image(output, Some(out_fmt), &rw)?;
    let mut buf = vec![0u8; bs as usize];
    let mut out_pos = 0;
    while in_pos < size {
        let n = bs.min(size - in_pos) as usize;
        src.read_at(&mut buf[..n], in_pos)
            .map_err(|e| format!("error while reading from input image file: {}", errmsg(&e)))?;
        dst.write_at(&buf[..n], out_pos)
            .map_err(|e| format!("error while writing to output image file: {}", errmsg(&e)))?;
        in_pos += n as u64;
        out_pos += n as u64;
    }
    dst.close().map_err(|e| errmsg(&e))
}
