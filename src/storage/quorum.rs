//! QEMU's `quorum` node as a storage: several children that should hold
//! the same bytes. A read asks every child and returns the version that
//! most of them agree on, provided at least `threshold` do (otherwise
//! EIO; when the children disagree each 512-byte sector is voted on by
//! itself); with the `fifo` read pattern it takes the first child that
//! answers. A write goes to every child and succeeds when at least
//! `threshold` of them took it. The children must all have one length.
//! Images on a quorum node have no directory of their own, so relative
//! backing file names cannot be resolved (the opener refuses them, as
//! QEMU does).

use super::{DebugEvent, Storage};
use std::io;
use std::sync::Arc;

pub struct QuorumStorage {
    children: Vec<Arc<dyn Storage>>,
    threshold: usize,
    /// `read-pattern=fifo`: read from the first child that succeeds.
    fifo: bool,
}

const SECTOR: usize = 512;

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl QuorumStorage {
    /// `threshold` must be between 1 and the number of children.
    pub fn new(children: Vec<Arc<dyn Storage>>, threshold: usize, fifo: bool) -> QuorumStorage {
        assert!(threshold >= 1 && threshold <= children.len());
        QuorumStorage {
            children,
            threshold,
            fifo,
        }
    }

    /// Runs `f` on every child; Ok when at least `threshold` succeeded,
    /// else the first error.
    fn all(&self, f: impl Fn(&dyn Storage) -> io::Result<()>) -> io::Result<()> {
        let mut ok = 0;
        let mut first_err = None;
        for c in &self.children {
            match f(c.as_ref()) {
                Ok(()) => ok += 1,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if ok >= self.threshold {
            Ok(())
        } else {
            Err(first_err.unwrap_or_else(eio))
        }
    }
}

impl Storage for QuorumStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.fifo {
            let mut last = eio();
            for c in &self.children {
                match c.read_at(buf, offset) {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e,
                }
            }
            return Err(last);
        }
        let mut reads = Vec::new();
        let mut first_err = None;
        for c in &self.children {
            let mut b = vec![0u8; buf.len()];
            match c.read_at(&mut b, offset) {
                Ok(()) => reads.push(b),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if reads.len() < self.threshold {
            return Err(first_err.unwrap_or_else(eio));
        }
        if reads.iter().all(|r| *r == reads[0]) {
            buf.copy_from_slice(&reads[0]);
            return Ok(());
        }
        // The children disagree: each sector is voted on by itself (an
        // engine request may span what QEMU reads in several requests).
        for (i, out) in buf.chunks_mut(SECTOR).enumerate() {
            let at = i * SECTOR..i * SECTOR + out.len();
            let mut versions: Vec<(&[u8], usize)> = Vec::new();
            for r in &reads {
                let v = &r[at.clone()];
                match versions.iter_mut().find(|(x, _)| *x == v) {
                    Some((_, n)) => *n += 1,
                    None => versions.push((v, 1)),
                }
            }
            match versions.into_iter().max_by_key(|(_, n)| *n) {
                Some((v, n)) if n >= self.threshold => out.copy_from_slice(v),
                _ => return Err(eio()),
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.all(|c| c.write_at(buf, offset))
    }
    fn sync(&self) -> io::Result<()> {
        self.all(|c| c.sync())
    }
    fn len(&self) -> io::Result<u64> {
        let first = self.children[0].len()?;
        for c in &self.children[1..] {
            if c.len()? != first {
                return Err(eio());
            }
        }
        Ok(first)
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        // QEMU's quorum driver cannot be truncated.
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.all(|c| c.punch_hole(offset, len))
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.all(|c| c.allocate(offset, len))
    }
    fn allocated_size(&self) -> io::Result<u64> {
        let mut sum = 0;
        for c in &self.children {
            sum += c.allocated_size()?;
        }
        Ok(sum)
    }
    fn debug_event(&self, ev: DebugEvent) {
        for c in &self.children {
            c.debug_event(ev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn mem(bytes: &[u8]) -> Arc<dyn Storage> {
        let m = MemStorage::new();
        m.write_at(bytes, 0).unwrap();
        Arc::new(m)
    }

    #[test]
    fn reads_the_majority_version() {
        let q = QuorumStorage::new(vec![mem(b"aaaa"), mem(b"bbbb"), mem(b"aaaa")], 2, false);
        let mut b = [0u8; 4];
        q.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"aaaa");
        // No version reaches the threshold: EIO.
        let q = QuorumStorage::new(vec![mem(b"aaaa"), mem(b"bbbb"), mem(b"cccc")], 2, false);
        assert_eq!(
            q.read_at(&mut b, 0).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        // fifo: the first child.
        let q = QuorumStorage::new(vec![mem(b"cccc"), mem(b"aaaa")], 2, true);
        q.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"cccc");
    }

    #[test]
    fn writes_reach_every_child_and_lengths_must_agree() {
        let (a, b) = (mem(b"xxxx"), mem(b"yyyy"));
        let q = QuorumStorage::new(vec![a.clone(), b.clone()], 1, false);
        q.write_at(b"zz", 1).unwrap();
        let mut got = [0u8; 4];
        a.read_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"xzzx");
        b.read_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"yzzy");
        assert_eq!(q.len().unwrap(), 4);
        let q = QuorumStorage::new(vec![mem(b"xxxx"), mem(b"yy")], 1, false);
        assert!(q.len().is_err());
    }
}
