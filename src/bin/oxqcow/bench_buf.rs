//! The request buffers of `oxqcow bench`. qemu-img bench (QEMU 10.0) sends
//! every request, however many are in flight, from one buffer: `strace -e
//! raw=pread64,pwrite64` shows a single address for all of them. Which
//! memory a request lands in is part of the workload — on a virtual disk
//! the host walks the guest pages of every request, and 16 pages used over
//! and over cost less than 64 × 16 different ones — so this module gives
//! each worker a view of the same pages. It owns only that memory; it knows
//! nothing of images or requests.
//!
//! Writers only read their buffer, so they share one slice. Readers each
//! need a `&mut [u8]`, and two of those over one allocation would be
//! aliasing: each reader gets its own mapping of one memfd instead, distinct
//! memory to Rust and the same pages to the kernel and the device (as
//! memory shared with another process is). Where memfd is not available
//! the readers fall back to a slot each, which the run then says.

use std::ptr::NonNull;

/// The pages the workers send their requests from.
pub enum BenchBuffers {
    /// One buffer all writers read from.
    Shared(AlignedBuf, usize),
    /// One mapping per reader, all of the same memfd pages.
    Mapped(Vec<Mapping>),
    /// One buffer per reader (memfd unavailable).
    Slots(Vec<AlignedBuf>),
}

impl BenchBuffers {
    /// Buffers for `workers` threads sending `len`-byte requests filled
    /// with `pattern`.
    pub fn new(write: bool, workers: usize, len: usize, pattern: u8) -> Self {
        if write {
            return Self::Shared(AlignedBuf::new(len, pattern), workers);
        }
        match map_shared(workers, len, pattern) {
            Ok(maps) => Self::Mapped(maps),
            Err(e) => {
                eprintln!("oxqcow bench: one buffer per request ({e}); qemu-img bench shares one");
                Self::Slots(
                    (0..workers)
                        .map(|_| AlignedBuf::new(len, pattern))
                        .collect(),
                )
            }
        }
    }

    /// One view per worker: mutable for readers, shared for writers.
    pub fn views(&mut self) -> Vec<View<'_>> {
        match self {
            Self::Shared(b, workers) => (0..*workers).map(|_| View::Write(b.as_slice())).collect(),
            Self::Mapped(maps) => maps
                .iter_mut()
                .map(|m| View::Read(m.as_mut_slice()))
                .collect(),
            Self::Slots(bufs) => bufs
                .iter_mut()
                .map(|b| View::Read(b.as_mut_slice()))
                .collect(),
        }
    }
}

/// A worker's buffer.
pub enum View<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// A page-aligned heap buffer (O_DIRECT needs aligned memory).
pub struct AlignedBuf {
    mem: Vec<u8>,
    skew: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, pattern: u8) -> Self {
        let mem = vec![pattern; len + 4096];
        let skew = mem.as_ptr().align_offset(4096);
        AlignedBuf { mem, skew, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.mem[self.skew..self.skew + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.mem[self.skew..self.skew + self.len]
    }
}

/// One `MAP_SHARED` mapping of the memfd; unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    map_len: usize,
}

// SAFETY: a mapping is plain memory owned by this value; moving it to
// another thread moves that ownership.
unsafe impl Send for Mapping {}

impl Mapping {
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `map_len >= len` bytes, readable and
        // writable, lives as long as `self`, and no other Rust reference
        // points into this mapping (the other mappings are other memory
        // to Rust).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`map_len` are exactly what mmap returned.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

fn map_shared(workers: usize, len: usize, pattern: u8) -> std::io::Result<Vec<Mapping>> {
    let page = 4096;
    let map_len = len.max(1).div_ceil(page) * page;
    // SAFETY: a NUL-terminated name and valid flags; the fd is closed below.
    let fd = unsafe { libc::memfd_create(c"oxqcow-bench".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let result = (|| {
        // SAFETY: fd is the memfd just created.
        if unsafe { libc::ftruncate(fd, map_len as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut maps = Vec::with_capacity(workers);
        for _ in 0..workers {
            // SAFETY: a fresh shared mapping of the memfd's first map_len
            // bytes, which ftruncate made exist.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    map_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            let ptr = NonNull::new(p.cast::<u8>())
                .ok_or_else(|| std::io::Error::other("mmap returned NULL"))?;
            maps.push(Mapping { ptr, len, map_len });
        }
        if let Some(m) = maps.first_mut() {
            m.as_mut_slice().fill(pattern);
        }
        Ok(maps)
    })();
    // SAFETY: the mappings keep the pages alive without the fd.
    unsafe { libc::close(fd) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_the_same_pages_through_distinct_views() {
        let mut b = BenchBuffers::new(false, 3, 8192 + 100, 7);
        assert!(
            matches!(b, BenchBuffers::Mapped(_)),
            "memfd is available on Linux"
        );
        let mut views = b.views();
        assert_eq!(views.len(), 3);
        let mut addrs = Vec::new();
        for v in &views {
            let View::Read(s) = v else {
                panic!("readers get mutable views")
            };
            assert_eq!(s.len(), 8292);
            assert!(s.iter().all(|&x| x == 7), "filled with the pattern");
            assert_eq!(s.as_ptr() as usize % 4096, 0, "aligned for O_DIRECT");
            addrs.push(s.as_ptr() as usize);
        }
        addrs.dedup();
        assert_eq!(addrs.len(), 3, "three mappings, no aliasing references");
        if let View::Read(s) = &mut views[0] {
            s[4100] = 0xab;
        }
        let View::Read(s) = &views[2] else {
            unreachable!()
        };
        assert_eq!(s[4100], 0xab, "one set of pages under every view");
    }

    #[test]
    fn writers_share_one_buffer() {
        let mut b = BenchBuffers::new(true, 4, 4096, 9);
        let views = b.views();
        assert_eq!(views.len(), 4);
        let addrs: Vec<usize> = views
            .iter()
            .map(|v| match v {
                View::Write(s) => {
                    assert!(s.len() == 4096 && s.iter().all(|&x| x == 9));
                    s.as_ptr() as usize
                }
                View::Read(_) => panic!("writers get shared views"),
            })
            .collect();
        assert!(addrs.iter().all(|&a| a == addrs[0] && a % 4096 == 0));
    }
}
