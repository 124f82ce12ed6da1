//! The stream under an NBD connection: a Unix socket or TCP (with
//! Nagle's algorithm off, since every request waits for its reply).
//! Connection failures are worded as QEMU words them: "Failed to connect
//! to 'ADDRESS': why", "address resolution failed for HOST:PORT: why".
//! The one unsafe call of the NBD client is here: send(2) with
//! MSG_NOSIGNAL.

use super::target::{NbdAddr, NbdTarget};
use crate::error::{Error, Result};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;

pub enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    pub fn connect(t: &NbdTarget) -> Result<Sock> {
        let failed =
            |e: io::Error| Error::io(format!("Failed to connect to '{}'", t.addr_text()), e);
        match &t.addr {
            NbdAddr::Unix(p) if p.as_os_str().len() >= 108 => Err(Error::InvalidArgument(format!(
                "UNIX socket path '{}' is too long\nPath must be less than 108 bytes",
                p.display()
            ))),
            NbdAddr::Unix(p) => UnixStream::connect(p).map(Sock::Unix).map_err(failed),
            NbdAddr::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| {
                        let why = e.to_string();
                        let why = why
                            .strip_prefix("failed to lookup address information: ")
                            .unwrap_or(&why)
                            .to_string();
                        Error::InvalidArgument(format!(
                            "address resolution failed for {host}:{port}: {why}"
                        ))
                    })?
                    .collect();
                let mut last = io::Error::from_raw_os_error(libc::ECONNREFUSED);
                for a in addrs {
                    match TcpStream::connect(a) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            return Ok(Sock::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(failed(last))
            }
        }
    }

    pub fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
        })
    }

    pub fn shutdown(&self) {
        let _ = match self {
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(buf),
            Sock::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    /// send(2) with MSG_NOSIGNAL: a server that went away is an EPIPE
    /// error for the request, not a SIGPIPE that kills the program (the
    /// tool restores SIGPIPE's default action for its output pipes).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let fd = match self {
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Tcp(s) => s.as_raw_fd(),
        };
        // SAFETY: `fd` is an open socket owned by `self`; the pointer and
        // length describe `buf`, which outlives the call.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
