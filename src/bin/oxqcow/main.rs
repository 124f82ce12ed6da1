//! The `oxqcow` command: qemu-img compatible syntax over the oxqcow
//! library. This file owns the command line (clap), dispatch to the
//! per-command modules, and the error convention: every failure is one
//! `PROGRAM: <what>: <why>` message on stderr and exit status 1, where
//! PROGRAM is argv[0]'s base name (`qemu-img` when a wrapper runs the
//! tool under that name, as the qemu-iotests do).

mod amend;
mod bench;
mod bench_buf;
mod bitmap;
mod blockopts;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod dd;
mod dump_header;
mod img_util;
mod info;
mod io;
mod io_open;
mod map;
mod measure;
mod rebase;
mod resize;
mod secret;
mod snapshot;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "oxqcow",
    version,
    about = "qcow2 image utility (qemu-img compatible syntax)",
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new image
    Create(create::Args),
    /// Copy input to output block by block (qemu-img dd: if=, of=, bs=, count=, skip=)
    Dd(dd::Args),
    /// Show information about an image
    Info(info::Args),
    /// Show the allocation map of an image
    Map(map::Args),
    /// Exercise an image with qemu-io commands (qemu-io replacement)
    Io(io::Args),
    /// Convert an image to another format
    Convert(convert::Args),
    /// Dump a qcow2 header and its extensions (like iotests' qcow2.py)
    #[command(name = "dump-header")]
    DumpHeader(dump_header::Args),
    /// Check an image for consistency (and repair it with -r)
    Check(check::Args),
    /// Change format options of an existing image
    Amend(amend::Args),
    /// Change the virtual size of an image
    Resize(resize::Args),
    /// List, create, apply or delete internal snapshots
    Snapshot(snapshot::Args),
    /// Compute the size a new image would need
    Measure(measure::Args),
    /// Compare the guest contents of two images
    Compare(compare::Args),
    /// Change the backing file of an image
    Rebase(rebase::Args),
    /// Write an image's data into its backing file
    Commit(commit::Args),
    /// Add, remove, clear, enable, disable or merge a persistent bitmap
    Bitmap(bitmap::Args),
    /// Run a simple I/O benchmark on an image
    Bench(bench::Args),
}

fn main() {
    // Die quietly on a closed pipe (`oxqcow map x | head`), as C tools do.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    std::process::exit(0);
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    std::process::exit(1);
                }
                _ => {
                    // clap's first paragraph, on one line.
                    let text = e.to_string();
                    let msg: Vec<&str> = text
                        .lines()
                        .take_while(|l| !l.trim().is_empty())
                        .map(str::trim)
                        .collect();
                    let msg = msg.join(" ");
                    let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
                    util::report(msg);
                    eprintln!("Try '{} --help' for more information", util::prgname());
                    std::process::exit(1);
                }
            }
        }
    };
    prefix_warnings(util::prgname().to_string());
    let r = match cli.cmd {
        Cmd::Create(a) => create::run(a),
        Cmd::Dd(a) => dd::run(a),
        Cmd::Info(a) => info::run(a),
        Cmd::Map(a) => map::run(a),
        Cmd::Io(a) => io::run(a),
        Cmd::Convert(a) => convert::run(a),
        Cmd::DumpHeader(a) => dump_header::run(a),
        Cmd::Check(a) => check::run(a),
        Cmd::Amend(a) => amend::run(a),
        Cmd::Resize(a) => resize::run(a),
        Cmd::Snapshot(a) => snapshot::run(a),
        Cmd::Measure(a) => measure::run(a),
        Cmd::Compare(a) => compare::run(a),
        Cmd::Rebase(a) => rebase::run(a),
        Cmd::Commit(a) => commit::run(a),
        Cmd::Bitmap(a) => bitmap::run(a),
        Cmd::Bench(a) => bench::run(a),
    };
    if let Err(msg) = r {
        if !msg.is_empty() {
            util::report(&msg);
        }
        std::process::exit(1);
    }
}

/// Library warnings (`warning: ...`) get the program's name in front, as
/// QEMU's warn_report() prints them; the library's other report lines
/// (check findings, `qcow2: Marking image as corrupt: ...`) go out as they are.
pub fn prefix_warnings(prog: String) {
    oxqcow::log::set_hook(Some(Box::new(move |l: &str| {
        if l.starts_with("warning: ") {
            eprintln!("{prog}: {l}");
        } else {
            eprintln!("{l}");
        }
    })));
}
