//! `oxqcow bitmap`: qemu-img bitmap's --add, --remove, --clear, --enable,
//! --disable and --merge on one persistent bitmap of a qcow2 image, over
//! the engine's bitmap operations. Owns the command line (the actions run
//! in the order given, as qemu-img runs them), its usage errors, opening
//! the image read-write (without its backing chain) and a merge source
//! read-only, and qemu-img's wording: `Operation OP on bitmap NAME
//! failed: WHY`. An action that fails stops the rest; the image is closed
//! either way, so what the earlier actions did is kept.

use crate::img_util::{open_named, report_lost_bitmaps, size_opt};
use crate::util::{errmsg, report, CliResult};
use oxqcow::{Image, OpenOptions, Qcow2};

#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    fmt: Option<String>,
    /// FILENAME is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Create BITMAP, recording future writes (unless --disable follows)
    #[arg(long = "add", action = clap::ArgAction::Count)]
    add: u8,
    /// Remove BITMAP
    #[arg(long = "remove", action = clap::ArgAction::Count)]
    remove: u8,
    /// Clear every bit of BITMAP
    #[arg(long = "clear", action = clap::ArgAction::Count)]
    clear: u8,
    /// Start recording writes in BITMAP
    #[arg(long = "enable", action = clap::ArgAction::Count)]
    enable: u8,
    /// Stop recording writes in BITMAP
    #[arg(long = "disable", action = clap::ArgAction::Count)]
    disable: u8,
    /// Merge the bits of bitmap SOURCE (of -b's image, or this one) into BITMAP
    #[arg(long = "merge", value_name = "SOURCE")]
    merge: Vec<String>,
    /// Granularity of a bitmap made by --add (default: the cluster size,
    /// within 4 KiB – 64 KiB)
    #[arg(
        short = 'g',
        long = "granularity",
        value_name = "SIZE",
        allow_hyphen_values = true
    )]
    granularity: Option<String>,
    /// The image holding --merge's source bitmap
    #[arg(short = 'b', long = "source-file", value_name = "SRC_FILENAME")]
    source_file: Option<String>,
    /// Format of -b's image
    #[arg(short = 'F', long = "source-format", value_name = "SRC_FMT")]
    source_fmt: Option<String>,
    /// Define an object: secret,id=ID,data=PASSWORD|file=PATH[,format=raw|base64]
    #[arg(long = "object", value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// Image file (or an option string with --image-opts)
    filename: Option<String>,
    /// Bitmap name
    bitmap: Option<String>,
    #[arg(hide = true)]
    extra: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    fn word(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

/// The actions in command-line order: clap has checked the syntax, the
/// order comes from the arguments after the subcommand's name.
fn actions_in_order(a: &Args) -> Vec<Action> {
    let mut merges = a.merge.iter().cloned();
    let mut out = Vec::new();
    let mut args = std::env::args().skip_while(|x| x != "bitmap").skip(1);
    while let Some(x) = args.next() {
        match x.as_str() {
            "--" => break,
            "--add" => out.push(Action::Add),
            "--remove" => out.push(Action::Remove),
            "--clear" => out.push(Action::Clear),
            "--enable" => out.push(Action::Enable),
            "--disable" => out.push(Action::Disable),
            _ if x == "--merge" || x.starts_with("--merge=") => {
                if let Some(src) = merges.next() {
                    out.push(Action::Merge(src));
                }
            }
            // Options whose value is the next argument: skip the value.
            "-f" | "--format" | "-g" | "--granularity" | "-b" | "--source-file" | "-F"
            | "--source-format" | "--object" => {
                args.next();
            }
            _ => {}
        }
    }
    out
}

pub fn run(a: Args) -> CliResult<()> {
    let actions = actions_in_order(&a);
    if actions.is_empty() {
        return Err(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge".into(),
        );
    }
    let (Some(file), Some(name), true) = (&a.filename, &a.bitmap, a.extra.is_empty()) else {
        return Err("Expecting filename and bitmap name".into());
    };
    let granularity = match &a.granularity {
        Some(_) if !actions.contains(&Action::Add) => {
            return Err("granularity only supported with --add".into())
        }
        Some(g) => match size_opt(g, "granularity", 0, i64::MAX)? {
            0 => None,
            g => Some(g as u64),
        },
        None => None,
    };
    if a.source_file.is_some() && !actions.iter().any(|x| matches!(x, Action::Merge(_))) {
        return Err("Merge bitmap source file only supported with --merge".into());
    }
    if a.source_fmt.is_some() && a.source_file.is_none() {
        return Err("-F only supported with -b".into());
    }
    crate::secret::define(&a.object)?;
    let rw = OpenOptions {
        writable: true,
        no_backing: true,
        ..Default::default()
    };
    let img = open_named(file, a.image_opts, a.fmt.as_deref(), &rw)?.img;
    let src = match &a.source_file {
        Some(s) => {
            let ro = OpenOptions {
                no_backing: true,
                ..Default::default()
            };
            Some(open_named(s, false, a.source_fmt.as_deref(), &ro)?.img)
        }
        None => None,
    };
    let mut result = Ok(());
    for act in &actions {
        if let Err(why) = apply(file, &img, src.as_ref(), act, name, granularity) {
            result = Err(format!(
                "Operation {} on bitmap {name} failed: {why}",
                act.word()
            ));
            break;
        }
    }
    if let Err(e) = &result {
        report(e);
    }
    let closed = img.close().map_err(|e| errmsg(&e));
    match closed {
        Err(e) if report_lost_bitmaps(&e, true, false) => Err(String::new()),
        Err(e) if result.is_ok() => Err(e),
        _ => result.map_err(|_| String::new()),
    }
}

fn apply(
    file_name: &str,
    img: &Image,
    src: Option<&Image>,
    act: &Action,
    name: &str,
    granularity: Option<u64>,
) -> CliResult<()> {
    let q = match img {
        Image::Qcow2(q) => q,
        _ => return unsupported(file_name, act, name),
    };
    let r = match act {
        Action::Add => q.bitmap_add(name, granularity, true),
        Action::Remove => q.bitmap_remove(name),
        Action::Clear => q.bitmap_clear(name),
        Action::Enable => q.bitmap_set_enabled(name, true),
        Action::Disable => q.bitmap_set_enabled(name, false),
        Action::Merge(from) => {
            let s: Option<&Qcow2> = match src {
                None => Some(q),
                Some(Image::Qcow2(s)) => Some(s),
                Some(_) => None,
            };
            match s {
                Some(s) => q.bitmap_merge(name, s, from),
                // A format without bitmaps has none of that name.
                None => q
                    .bitmap_check_usable(name)
                    .and(Err(oxqcow::Error::InvalidArgument(format!(
                        "Dirty bitmap '{from}' not found"
                    )))),
            }
        }
    };
    r.map_err(|e| errmsg(&e))
}

/// What QEMU answers for an image whose format keeps no bitmaps.
fn unsupported(file: &str, act: &Action, name: &str) -> CliResult<()> {
    match act {
        Action::Add => Err(format!(
            "Can't store persistent bitmaps to {file}: Operation not supported"
        )),
        _ => Err(format!("Dirty bitmap '{name}' not found")),
    }
}
