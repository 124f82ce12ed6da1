//! `oxqcow check`: qemu-img check over the engine's check and repair.
//! Report lines go to stderr as the engine finds them; the summary goes
//! to stdout in qemu-img's human or JSON form; after a repair the image
//! is checked again, read-only, and that second result is printed with
//! the repaired counts. Exit status: 0 clean, 1 check failed, 2
//! corruptions, 3 leaks only, 63 for formats without checks.

use crate::img_util::{errno_text, exit_with, fail_with, open_named, usage_error};
use crate::util::{CliResult, Json, Obj};
use oxqcow::engine::{CheckResult, FIX_ERRORS, FIX_LEAKS};
use oxqcow::{Image, OpenOptions};
use std::fmt::Write as _;

#[derive(clap::Args)]
pub struct Args {
    /// Quiet: print nothing on stdout
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    fmt: Option<String>,
    /// Repair: leaks or all (opens the image read-write)
    #[arg(short = 'r', long = "repair", value_name = "leaks|all")]
    repair: Option<String>,
    /// Output format: human or json
    #[arg(long = "output", value_name = "human|json", default_value = "human")]
    output: String,
    /// Cache mode (accepted, ignored)
    #[arg(short = 'T', long = "cache", value_name = "CACHE_MODE")]
    cache: Option<String>,
    /// Open the image in shared mode (read-only checks only)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Define an object: secret,id=ID,data=PASSWORD|file=PATH[,format=raw|base64]
    #[arg(long = "object", value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// Treat the image names as option strings (driver=qcow2,file.filename=F,encrypt.key-secret=ID)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Image file
    filename: String,
}

pub fn run(a: Args) -> CliResult<()> {
    let _ = &a.cache;
    crate::secret::define(&a.object)?;
    let fix = match a.repair.as_deref() {
        None => 0,
        Some("leaks") => FIX_LEAKS,
        Some("all") => FIX_LEAKS | FIX_ERRORS,
        Some(other) => usage_error(
            "check",
            &format!("--repair (-r) expects 'leaks' or 'all' not '{other}'"),
        ),
    };
    let json = match a.output.as_str() {
        "human" => false,
        "json" => true,
        other => usage_error(
            "check",
            &format!("--output expects 'human' or 'json' not '{other}'"),
        ),
    };
    let opts = OpenOptions {
        writable: fix != 0,
        check_mode: true,
        ..Default::default()
    };
    if fix != 0 && a.force_share {
        return Err(format!(
            "Could not open '{}': force-share=on can only be used with read-only images",
            a.filename
        ));
    }
    let img = open_named(&a.filename, a.image_opts, a.fmt.as_deref(), &opts)?.img;
    let Image::Qcow2(q) = &img else {
        drop(img);
        fail_with(63, "This image format does not support checks");
    };
    let mut report = |line: &str| eprintln!("{line}");
    let first = q.check(fix, &mut report);
    let mut res = match first {
        Ok(r) => r,
        Err(e) => {
            drop(img);
            // A snapshot table over QEMU's limits: its ERROR line and hint.
            if let oxqcow::Error::TooLarge(m) = &e {
                if m.starts_with("ERROR ") {
                    crate::util::report(m);
                }
            }
            fail_with(1, &format!("Check failed: {}", errno_text(&e)));
        }
    };
    let mut out = String::new();
    if res.leaks_fixed > 0 || res.corruptions_fixed > 0 {
        let (lf, cf) = (res.leaks_fixed, res.corruptions_fixed);
        if !json {
            let _ = write!(
                out,
                "The following inconsistencies were found and repaired:\n\n    {lf} leaked clusters\n    {cf} corruptions\n\nDouble checking the fixed image now...\n"
            );
        }
        match q.check(0, &mut report) {
            Ok(r) => res = r,
            Err(e) => {
                emit(&out, a.quiet);
                drop(img);
                fail_with(1, &format!("Check failed: {}", errno_text(&e)));
            }
        }
        res.leaks_fixed = lf;
        res.corruptions_fixed = cf;
    }
    if json {
        out.push_str(&Json::Obj(json_report(&res, &a.filename)).pretty());
        out.push('\n');
    } else {
        human_report(&res, &mut out);
    }
    emit(&out, a.quiet);
    let closed = img.close();
    drop(img);
    if res.check_errors > 0 {
        fail_with(1, "Check failed");
    }
    if let Err(e) = closed {
        fail_with(1, &format!("Check failed: {}", errno_text(&e)));
    }
    if res.corruptions > 0 {
        exit_with(2);
    }
    if res.leaks > 0 {
        exit_with(3);
    }
    Ok(())
}

fn emit(out: &str, quiet: bool) {
    if !quiet {
        print!("{out}");
    }
}

/// qemu-img's human summary of a check.
fn human_report(r: &CheckResult, out: &mut String) {
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            let _ = write!(
                out,
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            let _ = write!(
                out,
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            let _ = write!(
                out,
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            );
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
        let _ = writeln!(
            out,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        );
    }
    if r.image_end_offset != 0 {
        let _ = writeln!(out, "Image end offset: {}", r.image_end_offset);
    }
}

/// qemu-img's ImageCheck object: optional counters only when non-zero.
fn json_report(r: &CheckResult, filename: &str) -> Obj {
    let mut o = Obj::new()
        .put_str("filename", filename)
        .put_str("format", "qcow2")
        .put_int("check-errors", r.check_errors);
    let opt = [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (k, v) in opt {
        if v != 0 {
            o = o.put_int(k, v);
        }
    }
    o
}
