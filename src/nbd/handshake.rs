//! The NBD handshake, client side: fixed newstyle negotiation with
//! structured replies, the `base:allocation` meta context and
//! `NBD_OPT_GO` (asking for the block sizes), falling back to
//! `NBD_OPT_EXPORT_NAME` when the server does not know `NBD_OPT_GO`, and
//! the oldstyle greeting of old servers (default export only). TLS is not
//! offered. Errors are worded as QEMU's NBD client words them where
//! qemu-io prints them (an unknown export: "Requested export not
//! available" plus the server's own message).

use super::proto::*;
use super::sock::Sock;
use crate::error::{Error, Result};
use std::io::{self, Read, Write};

/// What the handshake learned about the export.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags (`TF_*`).
    pub flags: u16,
    /// Block sizes: requests should be aligned to `min_block`; payloads
    /// are at most `max_payload` bytes.
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The id of the `base:allocation` context, if the server has it.
    pub alloc_context: Option<u32>,
}

fn proto_err(what: impl Into<String>) -> Error {
    Error::Invalid(what.into())
}

fn io_err(what: &str, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return Error::io(
            what,
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "Unexpected end-of-file before all data were read",
            ),
        );
    }
    Error::io(what, e)
}

fn read_u16(s: &mut Sock, what: &str) -> Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b).map_err(|e| io_err(what, e))?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut Sock, what: &str) -> Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).map_err(|e| io_err(what, e))?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut Sock, what: &str) -> Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b).map_err(|e| io_err(what, e))?;
    Ok(u64::from_be_bytes(b))
}

/// Negotiates `export` on a freshly connected socket.
pub fn negotiate(s: &mut Sock, export: &str, context: &str) -> Result<ExportInfo> {
    if read_u64(s, "Failed to read initial magic")? != NBDMAGIC {
        return Err(proto_err("Bad initial magic received"));
    }
    let magic = read_u64(s, "Failed to read server magic")?;
    if magic == OLDSTYLE_MAGIC {
        return oldstyle(s, export);
    }
    if magic != IHAVEOPT {
        return Err(proto_err(format!("Bad server magic received: 0x{magic:x}")));
    }
    let hflags = read_u16(s, "Failed to read server flags")?;
    let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = 0;
    if fixed {
        cflags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())
        .map_err(|e| io_err("Failed to send clientflags field", e))?;
    if !fixed {
        // Only NBD_OPT_EXPORT_NAME may be sent to a server that is not
        // fixed-newstyle.
        return export_name(s, export, no_zeroes, false, None);
    }
    let structured = match option(s, OPT_STRUCTURED_REPLY, &[])? {
        Reply::Ack => true,
        Reply::Err(..) => false,
        Reply::Other(..) => return Err(proto_err("Unexpected reply to NBD_OPT_STRUCTURED_REPLY")),
    };
    let alloc_context = if structured {
        set_meta_context(s, export, context)?
    } else {
        None
    };
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        min_block: 1,
        preferred_block: 4096,
        max_payload: DEFAULT_MAX_PAYLOAD,
        structured,
        alloc_context,
    };
    let mut have_export = false;
    loop {
        match read_reply(s, OPT_GO)? {
            Reply::Ack => break,
            Reply::Other(REP_INFO, d) if d.len() >= 2 => {
                let ty = u16::from_be_bytes([d[0], d[1]]);
                if ty == INFO_EXPORT && d.len() == 12 {
                    info.size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                    info.flags = u16::from_be_bytes([d[10], d[11]]);
                    have_export = true;
                } else if ty == INFO_BLOCK_SIZE && d.len() == 14 {
                    let w = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                    let (min, pref, max) = (w(2), w(6), w(10));
                    if !min.is_power_of_two() || min > 1 << 16 || pref < min || max < min {
                        return Err(proto_err(format!(
                            "Server reported invalid block sizes: minimum {min}, preferred {pref}, maximum {max}"
                        )));
                    }
                    info.min_block = min;
                    info.preferred_block = pref;
                    info.max_payload = max.min(DEFAULT_MAX_PAYLOAD) & !(min - 1);
                }
            }
            Reply::Other(..) => {}
            Reply::Err(REP_ERR_UNSUP, _) => {
                return export_name(s, export, no_zeroes, structured, alloc_context)
            }
            Reply::Err(code, msg) => return Err(option_error(code, &msg, export)),
        }
    }
    if !have_export {
        return Err(proto_err(
            "Server did not send NBD_INFO_EXPORT before NBD_REP_ACK",
        ));
    }
    Ok(info)
}

fn oldstyle(s: &mut Sock, export: &str) -> Result<ExportInfo> {
    if !export.is_empty() {
        return Err(proto_err("Server does not support non-empty export names"));
    }
    let size = read_u64(s, "Failed to read export length")?;
    let flags = read_u32(s, "Failed to read export flags")?;
    let mut pad = [0u8; 124];
    s.read_exact(&mut pad)
        .map_err(|e| io_err("Failed to read reserved block", e))?;
    Ok(ExportInfo {
        size,
        flags: flags as u16,
        min_block: 1,
        preferred_block: 4096,
        max_payload: DEFAULT_MAX_PAYLOAD,
        structured: false,
        alloc_context: None,
    })
}

fn export_name(
    s: &mut Sock,
    export: &str,
    no_zeroes: bool,
    structured: bool,
    alloc_context: Option<u32>,
) -> Result<ExportInfo> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    // A server that does not have the export closes the connection.
    let size = read_u64(s, "Failed to read export length").map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof => {
            proto_err("Requested export not available")
        }
        e => e,
    })?;
    let flags = read_u16(s, "Failed to read export flags")?;
    if !no_zeroes {
        let mut pad = [0u8; 124];
        s.read_exact(&mut pad)
            .map_err(|e| io_err("Failed to read reserved block", e))?;
    }
    Ok(ExportInfo {
        size,
        flags,
        min_block: 1,
        preferred_block: 4096,
        max_payload: DEFAULT_MAX_PAYLOAD,
        structured,
        alloc_context,
    })
}

/// Asks for the meta context block status reads (`base:allocation`, or
/// the one QEMU's `x-dirty-bitmap` names); None when the server does not
/// offer it.
fn set_meta_context(s: &mut Sock, export: &str, context: &str) -> Result<Option<u32>> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(&(context.len() as u32).to_be_bytes());
    data.extend_from_slice(context.as_bytes());
    send_option(s, OPT_SET_META_CONTEXT, &data)?;
    let mut id = None;
    loop {
        match read_reply(s, OPT_SET_META_CONTEXT)? {
            Reply::Ack => return Ok(id),
            Reply::Other(REP_META_CONTEXT, d) if d.len() >= 4 => {
                if &d[4..] == context.as_bytes() {
                    id = Some(u32::from_be_bytes(d[..4].try_into().unwrap()));
                }
            }
            Reply::Other(..) => {}
            // An unknown export is reported by NBD_OPT_GO, in its words.
            Reply::Err(..) => return Ok(None),
        }
    }
}

enum Reply {
    Ack,
    Other(u32, Vec<u8>),
    Err(u32, String),
}

fn send_option(s: &mut Sock, opt: u32, data: &[u8]) -> Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
        .map_err(|e| io_err(&format!("Failed to send option {opt}"), e))
}

fn option(s: &mut Sock, opt: u32, data: &[u8]) -> Result<Reply> {
    send_option(s, opt, data)?;
    read_reply(s, opt)
}

fn read_reply(s: &mut Sock, opt: u32) -> Result<Reply> {
    let what = "Failed to read option reply";
    if read_u64(s, what)? != OPT_REPLY_MAGIC {
        return Err(proto_err("Unexpected option reply magic"));
    }
    let got = read_u32(s, what)?;
    if got != opt {
        return Err(proto_err(format!(
            "Unexpected option type {got}, expected {opt}"
        )));
    }
    let ty = read_u32(s, what)?;
    let len = read_u32(s, what)?;
    if len > 1 << 20 {
        return Err(proto_err(format!(
            "Option reply of {len} bytes is too long"
        )));
    }
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).map_err(|e| io_err(what, e))?;
    Ok(match ty {
        REP_ACK => Reply::Ack,
        t if t & REP_FLAG_ERROR != 0 => Reply::Err(t, String::from_utf8_lossy(&d).into_owned()),
        t => Reply::Other(t, d),
    })
}

/// A refused NBD_OPT_GO in QEMU's words, with the server's message.
fn option_error(code: u32, msg: &str, export: &str) -> Error {
    let head = match code {
        REP_ERR_POLICY => "Denied by server for option 7 (go)".to_string(),
        REP_ERR_INVALID => "Invalid parameters for option 7 (go)".to_string(),
        REP_ERR_PLATFORM => "Server lacks support for option 7 (go)".to_string(),
        REP_ERR_TLS_REQD => {
            "TLS negotiation required before option 7 (go); oxqcow's NBD client does not support TLS"
                .to_string()
        }
        REP_ERR_UNKNOWN => "Requested export not available".to_string(),
        REP_ERR_SHUTDOWN => "Server shutting down before option 7 (go)".to_string(),
        REP_ERR_BLOCK_SIZE_REQD => "Server requires INFO_BLOCK_SIZE for option 7 (go)".to_string(),
        REP_ERR_TOO_BIG => "Request too big for option 7 (go)".to_string(),
        c => format!("Unknown error code {c:#x} for option 7 (go) of export '{export}'"),
    };
    let text = if msg.is_empty() {
        head
    } else {
        format!("{head}\nserver reported: {msg}")
    };
    Error::InvalidArgument(text)
}
