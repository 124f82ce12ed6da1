//! One NBD connection and the requests sent over it: READ, WRITE (with
//! FUA), FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS (`base:allocation`) and
//! DISC, with simple and structured replies.
//!
//! Requests are sent one at a time: a mutex holds the connection from the
//! request until its reply is read, so an [`NbdClient`] is `Send + Sync`
//! and threads sharing it simply take turns (no pipelining; enough for a
//! tool). Requests are cut to the server's maximum payload, and requests
//! that are not aligned to its minimum block size are widened (reads) or
//! done as read-modify-write (writes, under a second mutex so that two
//! such writes do not interleave). A transport failure (the server went
//! away, a reply that breaks the protocol) kills the connection: that
//! request and every later one fail with EIO, as in QEMU's client. An
//! error the server reports fails only its request, with the server's
//! errno.

use super::handshake::{negotiate, ExportInfo};
use super::proto::*;
use super::sock::Sock;
use super::target::NbdTarget;
use crate::error::{Error, Result};
use std::io::{self, BufReader, Read, Write};
use std::sync::Mutex;

/// An open NBD export.
pub struct NbdClient {
    target: NbdTarget,
    name: String,
    info: ExportInfo,
    conn: Mutex<Conn>,
    rmw: Mutex<()>,
}

struct Conn {
    r: BufReader<Sock>,
    w: Sock,
    cookie: u64,
    dead: bool,
}

/// Why a request failed.
enum Fail {
    /// The server answered with this errno; the connection is fine.
    Server(i32),
    /// The connection is gone or out of step.
    Transport,
}

impl From<io::Error> for Fail {
    fn from(_: io::Error) -> Fail {
        Fail::Transport
    }
}

/// Where the data of a reply goes.
enum Sink<'a> {
    Nothing,
    Read(&'a mut [u8]),
    Status(u32, &'a mut Vec<(u32, u32)>),
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// A reply that breaks the protocol; `what` documents the check.
fn bad_reply(_what: &str) -> Fail {
    Fail::Transport
}

impl NbdClient {
    /// Connects to the target's server and negotiates its export.
    pub fn connect(target: &NbdTarget) -> Result<NbdClient> {
        let mut sock = Sock::connect(target)?;
        let context = target.meta_context.as_deref().unwrap_or(BASE_ALLOCATION);
        let info = negotiate(&mut sock, &target.export, context)?;
        if target.meta_context.is_some() && info.alloc_context.is_none() {
            // QEMU's words when the server lacks the x-dirty-bitmap context.
            return Err(Error::InvalidArgument(
                "Could not open image: Invalid argument".into(),
            ));
        }
        let r = sock.try_clone().map_err(|e| Error::io(target.uri(), e))?;
        Ok(NbdClient {
            target: target.clone(),
            name: target.uri(),
            info,
            conn: Mutex::new(Conn {
                r: BufReader::with_capacity(64 << 10, r),
                w: sock,
                cookie: 0,
                dead: false,
            }),
            rmw: Mutex::new(()),
        })
    }

    pub fn target(&self) -> &NbdTarget {
        &self.target
    }
    /// The export's canonical name (`nbd+unix:///EXPORT?socket=PATH`).
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn size(&self) -> u64 {
        self.info.size
    }
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }
    fn flag(&self, f: u16) -> bool {
        self.info.flags & TF_HAS_FLAGS != 0 && self.info.flags & f != 0
    }
    pub fn read_only(&self) -> bool {
        self.flag(TF_READ_ONLY)
    }
    pub fn can_flush(&self) -> bool {
        self.flag(TF_SEND_FLUSH)
    }
    pub fn can_fua(&self) -> bool {
        self.flag(TF_SEND_FUA)
    }
    pub fn can_trim(&self) -> bool {
        self.flag(TF_SEND_TRIM)
    }
    pub fn can_zero(&self) -> bool {
        self.flag(TF_SEND_WRITE_ZEROES)
    }
    pub fn can_multi_conn(&self) -> bool {
        self.flag(TF_CAN_MULTI_CONN)
    }
    /// Whether the server reports allocation (`base:allocation`).
    pub fn has_block_status(&self) -> bool {
        self.info.alloc_context.is_some()
    }
    /// Whether the connection has failed (every request now fails).
    pub fn is_dead(&self) -> bool {
        self.conn.lock().map(|c| c.dead).unwrap_or(true)
    }

    /// Sends one request and reads its reply.
    fn exchange(
        &self,
        cmd: u16,
        flags: u16,
        off: u64,
        len: u32,
        payload: &[u8],
        sink: Sink,
    ) -> io::Result<()> {
        let mut c = self.conn.lock().map_err(|_| eio())?;
        if c.dead {
            return Err(eio());
        }
        c.cookie += 1;
        let cookie = c.cookie;
        match c.round_trip(cmd, flags, cookie, off, len, payload, sink, &self.info) {
            Ok(()) => Ok(()),
            Err(Fail::Server(e)) => Err(io::Error::from_raw_os_error(e)),
            Err(Fail::Transport) => {
                c.dead = true;
                c.w.shutdown();
                Err(eio())
            }
        }
    }

    fn align(&self) -> u64 {
        self.info.min_block as u64
    }

    fn check_range(&self, off: u64, len: u64) -> io::Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// Reads guest bytes; the range must lie inside the export.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.check_range(off, buf.len() as u64)?;
        let a = self.align();
        let end = off + buf.len() as u64;
        if a > 1 && !(off.is_multiple_of(a) && end.is_multiple_of(a)) {
            let start = off / a * a;
            let aend = end.div_ceil(a) * a;
            let mut tmp = vec![0u8; (aend - start) as usize];
            self.read_aligned(&mut tmp, start)?;
            let s = (off - start) as usize;
            buf.copy_from_slice(&tmp[s..s + buf.len()]);
            return Ok(());
        }
        self.read_aligned(buf, off)
    }

    fn read_aligned(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let max = self.info.max_payload as usize;
        for (i, chunk) in buf.chunks_mut(max).enumerate() {
            let o = off + (i * max) as u64;
            let n = chunk.len() as u32;
            self.exchange(CMD_READ, 0, o, n, &[], Sink::Read(chunk))?;
        }
        Ok(())
    }

    /// Writes guest bytes; `fua` makes them durable before the reply
    /// (a flush after the write when the server has no FUA).
    pub fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> io::Result<()> {
        self.check_range(off, buf.len() as u64)?;
        let a = self.align();
        let end = off + buf.len() as u64;
        if a > 1 && !(off.is_multiple_of(a) && end.is_multiple_of(a)) {
            let _g = self.rmw.lock().map_err(|_| eio())?;
            let start = off / a * a;
            let aend = end.div_ceil(a) * a;
            let mut tmp = vec![0u8; (aend - start) as usize];
            self.read_aligned(&mut tmp, start)?;
            let s = (off - start) as usize;
            tmp[s..s + buf.len()].copy_from_slice(buf);
            return self.write_aligned(&tmp, start, fua);
        }
        self.write_aligned(buf, off, fua)
    }

    fn write_aligned(&self, buf: &[u8], off: u64, fua: bool) -> io::Result<()> {
        let native_fua = fua && self.can_fua();
        let flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        let max = self.info.max_payload as usize;
        for (i, chunk) in buf.chunks(max).enumerate() {
            let o = off + (i * max) as u64;
            self.exchange(
                CMD_WRITE,
                flags,
                o,
                chunk.len() as u32,
                chunk,
                Sink::Nothing,
            )?;
        }
        if fua && !native_fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes every completed write durable (nothing to do when the
    /// server does not take flushes: it writes through).
    pub fn flush(&self) -> io::Result<()> {
        if !self.can_flush() {
            return self.check_alive();
        }
        self.exchange(CMD_FLUSH, 0, 0, 0, &[], Sink::Nothing)
    }

    fn check_alive(&self) -> io::Result<()> {
        if self.is_dead() {
            return Err(eio());
        }
        Ok(())
    }

    /// Discards a range. Advisory: only the part aligned to the minimum
    /// block size is sent, and nothing when the server takes no trims.
    pub fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.check_range(off, len)?;
        if !self.can_trim() {
            return self.check_alive();
        }
        let a = self.align();
        let start = off.div_ceil(a) * a;
        let end = (off + len) / a * a;
        self.ranged(CMD_TRIM, 0, start, end.saturating_sub(start))
    }

    /// Writes zeros; `may_trim` lets the server deallocate the range.
    /// Unaligned ends, and everything when the server has no
    /// WRITE_ZEROES, are written as zero data.
    pub fn write_zeroes(&self, off: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.check_range(off, len)?;
        let a = self.align();
        let end = off + len;
        let (mut start, mut stop) = (off.div_ceil(a) * a, end / a * a);
        if !self.can_zero() || start >= stop {
            start = end;
            stop = end;
        }
        self.zero_data(off, start - off, fua)?;
        self.zero_data(stop, end - stop, fua)?;
        let mut flags = if may_trim { 0 } else { CMD_FLAG_NO_HOLE };
        let native_fua = fua && self.can_fua();
        if native_fua {
            flags |= CMD_FLAG_FUA;
        }
        self.ranged(CMD_WRITE_ZEROES, flags, start, stop - start)?;
        if fua && !native_fua && stop > start {
            self.flush()?;
        }
        Ok(())
    }

    fn zero_data(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        let max = self.info.max_payload as u64;
        let zeros = vec![0u8; len.min(max) as usize];
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(max);
            self.write_at(&zeros[..n as usize], pos, fua)?;
            pos += n;
        }
        Ok(())
    }

    /// A request without payload over a range, in pieces of at most 1 GiB.
    fn ranged(&self, cmd: u16, flags: u16, off: u64, len: u64) -> io::Result<()> {
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(1 << 30);
            self.exchange(cmd, flags, pos, n as u32, &[], Sink::Nothing)?;
            pos += n;
        }
        Ok(())
    }

    /// The `base:allocation` state at `off`: (flags, bytes it holds for),
    /// `STATE_HOLE` / `STATE_ZERO` bits. Without the context every range
    /// is data (flags 0).
    pub fn block_status(&self, off: u64, len: u64) -> io::Result<(u32, u64)> {
        self.check_range(off, len)?;
        let Some(ctx) = self.info.alloc_context else {
            self.check_alive()?;
            return Ok((0, len));
        };
        if len == 0 {
            return Ok((0, 0));
        }
        let n = len.min(u32::MAX as u64 / 2 + 1) as u32;
        let mut ext = Vec::new();
        self.exchange(
            CMD_BLOCK_STATUS,
            0,
            off,
            n,
            &[],
            Sink::Status(ctx, &mut ext),
        )?;
        match ext.first() {
            Some(&(l, f)) if l > 0 => Ok((f, (l as u64).min(len))),
            _ => {
                self.kill();
                Err(eio())
            }
        }
    }

    fn kill(&self) {
        if let Ok(mut c) = self.conn.lock() {
            c.dead = true;
            c.w.shutdown();
        }
    }

    /// Ends the session (NBD_CMD_DISC) and closes the socket. Later
    /// requests fail with EIO.
    pub fn disconnect(&self) {
        if let Ok(mut c) = self.conn.lock() {
            if !c.dead {
                c.cookie += 1;
                let h = request_header(CMD_DISC, 0, c.cookie, 0, 0);
                let _ = c.w.write_all(&h);
                c.dead = true;
            }
            c.w.shutdown();
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.disconnect();
    }
}

fn request_header(cmd: u16, flags: u16, cookie: u64, off: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&off.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

impl Conn {
    #[allow(clippy::too_many_arguments)]
    fn round_trip(
        &mut self,
        cmd: u16,
        flags: u16,
        cookie: u64,
        off: u64,
        len: u32,
        payload: &[u8],
        mut sink: Sink,
        info: &ExportInfo,
    ) -> std::result::Result<(), Fail> {
        let h = request_header(cmd, flags, cookie, off, len);
        if payload.len() <= 64 << 10 {
            let mut b = Vec::with_capacity(28 + payload.len());
            b.extend_from_slice(&h);
            b.extend_from_slice(payload);
            self.w.write_all(&b)?;
        } else {
            self.w.write_all(&h)?;
            self.w.write_all(payload)?;
        }
        let mut m = [0u8; 4];
        self.r.read_exact(&mut m)?;
        match u32::from_be_bytes(m) {
            SIMPLE_REPLY_MAGIC => {
                let mut b = [0u8; 12];
                self.r.read_exact(&mut b)?;
                let err = u32::from_be_bytes(b[0..4].try_into().unwrap());
                if u64::from_be_bytes(b[4..12].try_into().unwrap()) != cookie {
                    return Err(bad_reply("reply for another request"));
                }
                if err != 0 {
                    return Err(Fail::Server(errno_from_wire(err)));
                }
                match sink {
                    Sink::Read(buf) => self.r.read_exact(buf)?,
                    Sink::Status(..) if info.structured => {
                        return Err(bad_reply("simple reply to NBD_CMD_BLOCK_STATUS"))
                    }
                    _ => {}
                }
                Ok(())
            }
            STRUCTURED_REPLY_MAGIC if info.structured => self.chunks(cookie, off, len, &mut sink),
            _ => Err(bad_reply("bad reply magic")),
        }
    }

    /// Reads structured reply chunks up to the one flagged DONE. The
    /// first error chunk decides the result.
    fn chunks(
        &mut self,
        cookie: u64,
        off: u64,
        len: u32,
        sink: &mut Sink,
    ) -> std::result::Result<(), Fail> {
        let mut first = true;
        let mut error = None;
        loop {
            if !first {
                let mut m = [0u8; 4];
                self.r.read_exact(&mut m)?;
                if u32::from_be_bytes(m) != STRUCTURED_REPLY_MAGIC {
                    return Err(bad_reply("bad structured reply magic"));
                }
            }
            first = false;
            let mut b = [0u8; 16];
            self.r.read_exact(&mut b)?;
            let flags = u16::from_be_bytes([b[0], b[1]]);
            let ty = u16::from_be_bytes([b[2], b[3]]);
            if u64::from_be_bytes(b[4..12].try_into().unwrap()) != cookie {
                return Err(bad_reply("reply chunk for another request"));
            }
            let clen = u32::from_be_bytes(b[12..16].try_into().unwrap()) as u64;
            if clen > len as u64 + (1 << 16) {
                return Err(bad_reply("reply chunk too long"));
            }
            match ty {
                REPLY_TYPE_NONE if clen == 0 => {}
                REPLY_TYPE_OFFSET_DATA if clen >= 8 => {
                    let Sink::Read(buf) = sink else {
                        return Err(bad_reply("data chunk for a request without data"));
                    };
                    let o = self.u64()?;
                    let n = clen - 8;
                    let s = o.checked_sub(off).filter(|s| s + n <= len as u64);
                    let s = s.ok_or_else(|| bad_reply("data chunk outside the request"))?;
                    self.r.read_exact(&mut buf[s as usize..(s + n) as usize])?;
                }
                REPLY_TYPE_OFFSET_HOLE if clen == 12 => {
                    let Sink::Read(buf) = sink else {
                        return Err(bad_reply("hole chunk for a request without data"));
                    };
                    let o = self.u64()?;
                    let n = self.u32()? as u64;
                    let s = o.checked_sub(off).filter(|s| s + n <= len as u64);
                    let s = s.ok_or_else(|| bad_reply("hole chunk outside the request"))?;
                    buf[s as usize..(s + n) as usize].fill(0);
                }
                REPLY_TYPE_BLOCK_STATUS if clen >= 12 && (clen - 4).is_multiple_of(8) => {
                    let Sink::Status(ctx, ext) = sink else {
                        return Err(bad_reply("block status for another request"));
                    };
                    let id = self.u32()?;
                    for _ in 0..(clen - 4) / 8 {
                        let l = self.u32()?;
                        let f = self.u32()?;
                        if id == *ctx {
                            ext.push((l, f));
                        }
                    }
                }
                t if t & REPLY_TYPE_ERROR_BIT != 0 && clen >= 6 => {
                    let e = self.u32()?;
                    let mut rest = vec![0u8; clen as usize - 4];
                    self.r.read_exact(&mut rest)?;
                    error.get_or_insert(errno_from_wire(e));
                }
                _ => return Err(bad_reply("bad structured reply chunk")),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        match error {
            Some(e) => Err(Fail::Server(e)),
            None => Ok(()),
        }
    }

    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.r.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
}
