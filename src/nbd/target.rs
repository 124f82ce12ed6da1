//! Where an NBD export lives: a server address and an export name, parsed
//! from the file names QEMU takes (`nbd:unix:PATH[:exportname=NAME]`,
//! `nbd:HOST:PORT[:exportname=NAME]`, `nbd://HOST[:PORT][/EXPORT]`,
//! `nbd+tcp://…`, `nbd+unix:///EXPORT?socket=PATH`) or from block-driver
//! options (`server.type=unix,server.path=…`, `server.type=inet,
//! server.host=…,server.port=…`, the older `path=`/`host=`/`port=`, and
//! `export=`). Errors use QEMU's wording, since qemu-io prints them after
//! "can't open device NAME: ".

use crate::blockdev::is_node_opt;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The port an NBD server listens on when none is named.
pub const DEFAULT_PORT: u16 = 10809;

/// A server address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

/// One export on one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdTarget {
    pub addr: NbdAddr,
    /// The export name ("" is the default export).
    pub export: String,
    /// The meta context block status reports instead of
    /// `base:allocation` (QEMU's `x-dirty-bitmap` option, e.g.
    /// `qemu:dirty-bitmap:NAME`: a dirty range then reads as a hole).
    pub meta_context: Option<String>,
}

/// Whether a file name names an NBD export (by its protocol prefix).
pub fn is_nbd_name(name: &str) -> bool {
    ["nbd:", "nbd+tcp:", "nbd+unix:"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

impl NbdTarget {
    /// Parses an NBD file name (see the module comment).
    pub fn parse(name: &str) -> Result<NbdTarget> {
        if name.starts_with("nbd://")
            || name.starts_with("nbd+tcp://")
            || name.starts_with("nbd+unix://")
        {
            return parse_uri(name).ok_or_else(|| bad("No valid URL specified"));
        }
        let rest = name
            .strip_prefix("nbd:")
            .ok_or_else(|| bad(format!("'{name}' is not an NBD file name")))?;
        if rest.is_empty() {
            return Err(bad("NBD server address missing"));
        }
        let (addr, export) = match rest.find(":exportname=") {
            Some(i) => (&rest[..i], rest[i + ":exportname=".len()..].to_string()),
            None => (rest, String::new()),
        };
        if let Some(path) = addr.strip_prefix("unix:") {
            return Ok(NbdTarget {
                addr: NbdAddr::Unix(PathBuf::from(path)),
                export,
                meta_context: None,
            });
        }
        let parse_err = || bad(format!("error parsing address '{addr}'"));
        let (host, port) = addr.rsplit_once(':').ok_or_else(parse_err)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = port.parse::<u16>().map_err(|_| parse_err())?;
        Ok(NbdTarget {
            addr: NbdAddr::Tcp {
                host: host.to_string(),
                port,
            },
            export,
            meta_context: None,
        })
    }

    /// Builds a target from the nbd driver's options (keys relative to
    /// the node: `server.type`, `server.path`, `export`, …). `filename`
    /// is refused as QEMU refuses it next to a server address.
    pub fn from_options(opts: &BTreeMap<String, String>) -> Result<NbdTarget> {
        // The nbd driver's own options; every node's are taken too.
        const KNOWN: &[&str] = &[
            "server.type",
            "server.path",
            "server.host",
            "server.port",
            "server.abstract",
            "server.tight",
            "server.numeric",
            "server.keep-alive",
            "path",
            "host",
            "port",
            "export",
            "reconnect-delay",
            "open-timeout",
            "x-dirty-bitmap",
        ];
        let get = |k: &str| opts.get(k).map(String::as_str);
        let has_server = opts.keys().any(|k| k.starts_with("server."));
        let legacy = get("path").is_some() || get("host").is_some();
        if has_server && legacy {
            return Err(bad("Cannot use 'server' and path/host at the same time"));
        }
        if get("path").is_some() && get("host").is_some() {
            return Err(bad("path and host may not be used at the same time"));
        }
        if !has_server && !legacy {
            return Err(bad("NBD server address missing"));
        }
        for k in opts.keys() {
            if !(is_node_opt(k) || KNOWN.contains(&k.as_str())) {
                return Err(bad(format!(
                    "Block protocol 'nbd' doesn't support the option '{k}'"
                )));
            }
        }
        let export = get("export").unwrap_or("").to_string();
        let addr = if has_server {
            match get("server.type") {
                Some("unix") => NbdAddr::Unix(PathBuf::from(
                    get("server.path").ok_or_else(|| bad("Parameter 'path' is missing"))?,
                )),
                Some("inet") => NbdAddr::Tcp {
                    host: get("server.host")
                        .ok_or_else(|| bad("Parameter 'host' is missing"))?
                        .to_string(),
                    port: parse_port(
                        get("server.port").ok_or_else(|| bad("Parameter 'port' is missing"))?,
                    )?,
                },
                Some(t) => {
                    return Err(bad(format!(
                        "oxqcow's NBD client does not support server.type={t}"
                    )))
                }
                None => return Err(bad("Parameter 'type' is missing")),
            }
        } else if let Some(p) = get("path") {
            if get("port").is_some() {
                return Err(bad("port may not be used without host"));
            }
            NbdAddr::Unix(PathBuf::from(p))
        } else {
            NbdAddr::Tcp {
                host: get("host").unwrap_or_default().to_string(),
                port: match get("port") {
                    Some(p) => parse_port(p)?,
                    None => DEFAULT_PORT,
                },
            }
        };
        Ok(NbdTarget {
            addr,
            export,
            meta_context: get("x-dirty-bitmap").map(str::to_string),
        })
    }

    /// The name QEMU gives the node (`nbd+unix:///EXPORT?socket=PATH`,
    /// `nbd://HOST:PORT/EXPORT`; no `/EXPORT` for the default export).
    pub fn uri(&self) -> String {
        let exp = if self.export.is_empty() {
            String::new()
        } else {
            format!("/{}", self.export)
        };
        match &self.addr {
            NbdAddr::Unix(p) => format!("nbd+unix://{exp}?socket={}", p.display()),
            NbdAddr::Tcp { host, port } => {
                let h = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                format!("nbd://{h}:{port}{exp}")
            }
        }
    }

    /// The address as QEMU names it in "Failed to connect to '…'".
    pub fn addr_text(&self) -> String {
        match &self.addr {
            NbdAddr::Unix(p) => p.display().to_string(),
            NbdAddr::Tcp { host, port } => format!("{host}:{port}"),
        }
    }
}

fn parse_port(p: &str) -> Result<u16> {
    p.parse::<u16>()
        .map_err(|_| bad(format!("error parsing port '{p}'")))
}

/// `nbd[+tcp|+unix]://[HOST[:PORT]]/[EXPORT][?socket=PATH]`; None when it
/// is not a valid NBD URL.
fn parse_uri(name: &str) -> Option<NbdTarget> {
    let (scheme, rest) = name.split_once("://")?;
    let unix = match scheme {
        "nbd" | "nbd+tcp" => false,
        "nbd+unix" => true,
        _ => return None,
    };
    let (before_q, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_q.find('/') {
        Some(i) => (&before_q[..i], &before_q[i..]),
        None => (before_q, ""),
    };
    let export = percent_decode(path.strip_prefix('/').unwrap_or(path))?;
    if unix {
        let socket = query?.strip_prefix("socket=")?;
        if !authority.is_empty() || socket.contains('&') {
            return None;
        }
        return Some(NbdTarget {
            addr: NbdAddr::Unix(PathBuf::from(percent_decode(socket)?)),
            export,
            meta_context: None,
        });
    }
    if query.is_some() || authority.is_empty() {
        return None;
    }
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, after) = r.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => DEFAULT_PORT,
            None => return None,
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (authority.to_string(), DEFAULT_PORT),
        }
    };
    Some(NbdTarget {
        addr: NbdAddr::Tcp { host, port },
        export,
        meta_context: None,
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(p: &str, e: &str) -> NbdTarget {
        NbdTarget {
            addr: NbdAddr::Unix(PathBuf::from(p)),
            export: e.into(),
            meta_context: None,
        }
    }
    fn tcp(h: &str, port: u16, e: &str) -> NbdTarget {
        NbdTarget {
            addr: NbdAddr::Tcp {
                host: h.into(),
                port,
            },
            export: e.into(),
            meta_context: None,
        }
    }

    #[test]
    fn legacy_names() {
        assert_eq!(NbdTarget::parse("nbd:unix:/s").unwrap(), unix("/s", ""));
        assert_eq!(
            NbdTarget::parse("nbd:unix:/s:exportname=a:b").unwrap(),
            unix("/s", "a:b")
        );
        assert_eq!(
            NbdTarget::parse("nbd:localhost:1234").unwrap(),
            tcp("localhost", 1234, "")
        );
        assert_eq!(
            NbdTarget::parse("nbd:[::1]:1234:exportname=x").unwrap(),
            tcp("::1", 1234, "x")
        );
        let e = NbdTarget::parse("nbd:127.0.0.1").unwrap_err().to_string();
        assert_eq!(e, "error parsing address '127.0.0.1'");
        let e = NbdTarget::parse("nbd:").unwrap_err().to_string();
        assert_eq!(e, "NBD server address missing");
    }

    #[test]
    fn uris() {
        assert_eq!(
            NbdTarget::parse("nbd+unix:///foo?socket=/tmp/s").unwrap(),
            unix("/tmp/s", "foo")
        );
        assert_eq!(
            NbdTarget::parse("nbd+unix://?socket=/tmp/s").unwrap(),
            unix("/tmp/s", "")
        );
        assert_eq!(
            NbdTarget::parse("nbd://h/e%20x").unwrap(),
            tcp("h", 10809, "e x")
        );
        assert_eq!(
            NbdTarget::parse("nbd+tcp://h:99").unwrap(),
            tcp("h", 99, "")
        );
        for b in [
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd+unix:///x?socket=/s&foo=1",
            "nbd://",
            "nbd://h:notaport/",
        ] {
            assert_eq!(
                NbdTarget::parse(b).unwrap_err().to_string(),
                "No valid URL specified",
                "{b}"
            );
        }
    }

    #[test]
    fn canonical_names() {
        assert_eq!(unix("/s", "").uri(), "nbd+unix://?socket=/s");
        assert_eq!(unix("/s", "foo").uri(), "nbd+unix:///foo?socket=/s");
        assert_eq!(tcp("h", 5, "").uri(), "nbd://h:5");
        assert_eq!(tcp("h", 5, "x").uri(), "nbd://h:5/x");
        assert_eq!(tcp("::1", 5, "").uri(), "nbd://[::1]:5");
    }

    #[test]
    fn options() {
        let m = |s: &[(&str, &str)]| -> BTreeMap<String, String> {
            s.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            NbdTarget::from_options(&m(&[
                ("server.type", "unix"),
                ("server.path", "/s"),
                ("export", "e")
            ]))
            .unwrap(),
            unix("/s", "e")
        );
        assert_eq!(
            NbdTarget::from_options(&m(&[("host", "h"), ("port", "7")])).unwrap(),
            tcp("h", 7, "")
        );
        let err = |s: &[(&str, &str)]| NbdTarget::from_options(&m(s)).unwrap_err().to_string();
        assert_eq!(err(&[("export", "e")]), "NBD server address missing");
        assert_eq!(
            err(&[("server.type", "inet"), ("server.host", "h")]),
            "Parameter 'port' is missing"
        );
        assert_eq!(
            err(&[("host", "h"), ("path", "/x")]),
            "path and host may not be used at the same time"
        );
        assert_eq!(
            err(&[("path", "/x"), ("bogus", "1")]),
            "Block protocol 'nbd' doesn't support the option 'bogus'"
        );
    }
}
