//! `oxqcow snapshot`: qemu-img snapshot -l/-c/-a/-d over the engine's
//! internal snapshots. Owns the one-action rule, opening (read-only for
//! listing, read-write otherwise, never the backing file) and qemu-img's
//! error wording; the list table is info's.

use crate::img_util::{errno_text, open_named, usage_error};
use crate::util::{errmsg, snapshot_l1_failure, CliResult};
use oxqcow::{Error, Image, OpenOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Quiet operation
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    fmt: Option<String>,
    /// FILENAME is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// List the snapshots (the default)
    #[arg(short = 'l', long = "list")]
    list: bool,
    /// Apply (revert to) a snapshot, by ID or name
    #[arg(short = 'a', long = "apply", value_name = "SNAPSHOT")]
    apply: Vec<String>,
    /// Create a snapshot
    #[arg(short = 'c', long = "create", value_name = "SNAPSHOT")]
    create: Vec<String>,
    /// Delete a snapshot, by ID or name
    #[arg(short = 'd', long = "delete", value_name = "SNAPSHOT")]
    delete: Vec<String>,
    /// Open the image in shared mode (accepted, ignored)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Image file
    filename: String,
}

enum Action {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

pub fn run(a: Args) -> CliResult<()> {
    let _ = (a.quiet, a.force_share);
    let mut actions = Vec::new();
    if a.list {
        actions.push(Action::List);
    }
    actions.extend(a.apply.iter().cloned().map(Action::Apply));
    actions.extend(a.create.iter().cloned().map(Action::Create));
    actions.extend(a.delete.iter().cloned().map(Action::Delete));
    if actions.len() > 1 {
        usage_error("snapshot", "Cannot mix '-l', '-a', '-c', '-d'");
    }
    let action = actions.pop().unwrap_or(Action::List);
    let opts = OpenOptions {
        writable: !matches!(action, Action::List),
        no_backing: true,
        ..Default::default()
    };
    let img = open_named(&a.filename, a.image_opts, a.fmt.as_deref(), &opts)?.img;
    let q = match &img {
        Image::Qcow2(q) => Some(q),
        Image::Raw(_) | Image::Nbd(_) => None,
    };
    let unsupported = || strerror_of(&Error::Unsupported(String::new()));
    match action {
        Action::List => {
            if let Some(q) = q {
                print!("{}", crate::info::snapshot_list(&q.snapshots()));
            }
        }
        Action::Create(name) => {
            let r = match q {
                // QEMU: ENOTSUP for images with an external data file.
                Some(q) if q.data_file_name().is_some() => Err(unsupported()),
                // qemu-img words every failure by its errno.
                Some(q) => q.snapshot_create(&name).map_err(|e| errno_text(&e)),
                None => Err(unsupported()),
            };
            r.map_err(|e| format!("Could not create snapshot '{name}': {e}"))?;
        }
        Action::Apply(name) => {
            let r = match q {
                Some(q) => q.snapshot_apply(&name).map_err(|e| {
                    if is_not_found(q, &name) {
                        "Failed to load snapshot: No such file or directory".to_string()
                    } else {
                        snapshot_l1_failure(&e, "Failed to load snapshot")
                            .unwrap_or_else(|| errmsg(&e))
                    }
                }),
                None => Err("Block driver does not support snapshots".to_string()),
            };
            r.map_err(|e| format!("Could not apply snapshot '{name}': {e}"))?;
        }
        Action::Delete(name) => {
            let r = match q {
                Some(q) if is_not_found(q, &name) => Err("snapshot not found".to_string()),
                // The table no longer names it once the delete failed
                // later on: looked up first.
                Some(q) => q.snapshot_delete(&name).map_err(|e| errmsg(&e)),
                None => Err("snapshot not found".to_string()),
            };
            r.map_err(|e| format!("Could not delete snapshot '{name}': {e}"))?;
        }
    }
    img.close().map_err(|e| errmsg(&e))?;
    Ok(())
}

fn is_not_found(q: &oxqcow::Qcow2, name: &str) -> bool {
    !q.snapshots().iter().any(|s| s.id == name || s.name == name)
}

fn strerror_of(e: &Error) -> String {
    crate::img_util::errno_text(e)
}
