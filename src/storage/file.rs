//! [`Storage`] over a real file, with pread/pwrite, fdatasync and fallocate.
//!
//! With O_DIRECT (cache=none, BDRV_O_NOCACHE) every transfer must be
//! aligned in offset, length and memory: unaligned requests go through an
//! aligned bounce buffer, and unaligned writes are read-modify-write under a
//! lock so that two of them never race on the same block — except one
//! that reaches past the end of the file, which goes through a second
//! descriptor without O_DIRECT so that the file ends where it does.
//!
//! `sync` skips the fdatasync when every change made through this storage
//! before the call is covered by a finished fdatasync that began after
//! it: a writethrough write syncs, and the caller's flush after it (QEMU's
//! FUA emulation) then costs nothing. A new
//! storage counts as changed, so its first sync also makes durable what an
//! earlier process left in the page cache (the engine's open relies on it).

use super::Storage;
use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Alignment for O_DIRECT transfers (the largest logical block size in use).
const DIRECT_ALIGN: usize = 4096;

pub struct FileStorage {
    file: File,
    /// Present when the file was opened with O_DIRECT.
    direct: Option<Mutex<()>>,
    /// cache=unsafe: `sync` does nothing.
    no_flush: bool,
    /// With O_DIRECT and write access: the same file without O_DIRECT, for
    /// an unaligned write at the end of the file, which padded to whole
    /// blocks would leave the file longer than what was written.
    buffered: Option<File>,
    /// Counts changes, each once it has returned (a new storage starts at
    /// one: the earlier process's).
    changes: AtomicU64,
    /// The count of changes a finished fdatasync covers: the one it read
    /// before it began. Syncs never wait for each other, so concurrent
    /// writethrough writers still share the file system's commits.
    synced: AtomicU64,
}

/// A zeroed heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points at `len` initialised bytes we own exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len.max(DIRECT_ALIGN), DIRECT_ALIGN).unwrap();
        // SAFETY: allocated in `new` with this same layout.
        unsafe { alloc::dealloc(self.ptr, layout) }
    }
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Linux's `struct fsxattr` (FS_IOC_FSGETXATTR / FS_IOC_FSSETXATTR).
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
const FS_XFLAG_EXTSIZE: u32 = 0x800;

/// Gives a (new, empty) file an extent size hint, as QEMU's file driver
/// does when it creates an image: file systems that honour it (XFS)
/// allocate in extents of `bytes`, so that an image growing one cluster at
/// a time does not fragment; others accept it and ignore it, or refuse it.
pub fn set_extent_size_hint(file: &File, bytes: u32) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let mut attr = FsXattr::default();
    // SAFETY: both ioctls take a pointer to a `struct fsxattr`, which
    // FsXattr lays out exactly; the descriptor is open for the call.
    unsafe {
        if libc::ioctl(fd, FS_IOC_FSGETXATTR as _, &mut attr as *mut FsXattr) < 0 {
            return Err(io::Error::last_os_error());
        }
        attr.xflags |= FS_XFLAG_EXTSIZE;
        attr.extsize = bytes;
        if libc::ioctl(fd, FS_IOC_FSSETXATTR as _, &attr as *const FsXattr) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl FileStorage {
    /// The open file, for what the [`Storage`] calls do not cover (file
    /// attributes): a change of contents made through it would escape the
    /// tracking that lets `sync` skip.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Opens an existing file; `direct` asks for O_DIRECT (cache=none).
    pub fn open(path: &Path, writable: bool, direct: bool) -> io::Result<FileStorage> {
        let mut o = OpenOptions::new();
        o.read(true).write(writable);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let buffered = match direct && writable {
            true => Some(OpenOptions::new().read(true).write(true).open(path)?),
            false => None,
        };
        Ok(FileStorage {
            file: o.open(path)?,
            direct: direct.then(|| Mutex::new(())),
            no_flush: false,
            buffered,
            changes: AtomicU64::new(1),
            synced: AtomicU64::new(0),
        })
    }

    /// With `no_flush` (cache=unsafe), `sync` returns at once: nothing
    /// written through this storage is ever made durable on purpose.
    pub fn without_flush(mut self, no_flush: bool) -> FileStorage {
        self.no_flush = no_flush;
        self
    }

    /// Creates (or truncates) a file.
    pub fn create(path: &Path) -> io::Result<FileStorage> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(FileStorage {
            file,
            direct: None,
            no_flush: false,
            buffered: None,
            changes: AtomicU64::new(1),
            synced: AtomicU64::new(0),
        })
    }

    /// Marks the file changed once a change has returned, failed or not
    /// (a failed write may have written part).
    fn changed<T>(&self, r: io::Result<T>) -> io::Result<T> {
        self.changes.fetch_add(1, Ordering::AcqRel);
        r
    }

    /// The aligned span covering [offset, offset+len).
    fn span(offset: u64, len: usize) -> (u64, usize) {
        let a = DIRECT_ALIGN as u64;
        let lo = offset / a * a;
        let hi = (offset + len as u64).div_ceil(a) * a;
        (lo, (hi - lo) as usize)
    }

    fn direct_read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (lo, n) = Self::span(offset, buf.len());
        if lo == offset && n == buf.len() && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
            // Already aligned in memory and on disk: no bounce buffer.
            return read_full(&self.file, buf, offset);
        }
        let mut b = AlignedBuf::new(n);
        read_full(&self.file, b.as_mut(), lo)?;
        let s = (offset - lo) as usize;
        buf.copy_from_slice(&b.as_mut()[s..s + buf.len()]);
        Ok(())
    }

    fn direct_write(&self, lock: &Mutex<()>, buf: &[u8], offset: u64) -> io::Result<()> {
        let (lo, n) = Self::span(offset, buf.len());
        let aligned = lo == offset && n == buf.len();
        if aligned && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
            return self.file.write_all_at(buf, offset);
        }
        let mut b = AlignedBuf::new(n);
        let _g = if aligned {
            None
        } else {
            Some(lock.lock().unwrap_or_else(|e| e.into_inner()))
        };
        if !aligned {
            if let Some(f) = &self.buffered {
                if lo + n as u64 > self.file.metadata()?.len() {
                    // Through the page cache, exactly as long as asked; a
                    // later O_DIRECT access of the range writes it back
                    // first, and sync covers it (one inode).
                    return f.write_all_at(buf, offset);
                }
            }
            read_full(&self.file, b.as_mut(), lo)?;
        }
        let s = (offset - lo) as usize;
        b.as_mut()[s..s + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(b.as_mut(), lo)
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.direct.is_some() {
            return self.direct_read(buf, offset);
        }
        read_full(&self.file, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = match &self.direct {
            Some(lock) => self.direct_write(lock, buf, offset),
            None => self.file.write_all_at(buf, offset),
        };
        self.changed(r)
    }
    fn sync(&self) -> io::Result<()> {
        if self.no_flush {
            return Ok(());
        }
        let target = self.changes.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        self.file.sync_data()?;
        self.synced.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.changed(self.file.set_len(len))
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on a descriptor we own, with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return self.changed(Ok(()));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64);
                self.write_at(&zeros[..n as usize], offset + done)?;
                done += n;
            }
            return Ok(());
        }
        Err(err)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: posix_fallocate on a descriptor we own.
        let r = unsafe {
            libc::posix_fallocate(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        self.changed(match r {
            0 => Ok(()),
            _ => Err(io::Error::from_raw_os_error(r)),
        })
    }
    fn allocated_size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unaligned reads and writes work with O_DIRECT, where the file
    /// system supports it (tmpfs does not; then the test has nothing to do).
    #[test]
    fn direct_io_handles_unaligned_requests() {
        let dir = std::env::temp_dir().join(format!("oxqcow-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, vec![7u8; 10000]).unwrap();
        let f = match FileStorage::open(&p, true, true) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("{e}"),
        };
        f.write_at(b"hello", 4093).unwrap();
        f.write_at(&[1u8; 8192], 8192).unwrap();
        let mut b = [0u8; 7];
        f.read_at(&mut b, 4092).unwrap();
        assert_eq!(&b, b"\x07hello\x07");
        let mut tail = vec![0u8; 100];
        f.read_at(&mut tail, 16384 - 50).unwrap();
        assert_eq!(&tail[..50], &[1u8; 50][..]);
        assert_eq!(&tail[50..], &[0u8; 50][..]);
        // An unaligned write past the end: the file ends where it ends,
        // not at the next block boundary.
        f.write_at(b"end", 16384 + 100).unwrap();
        assert_eq!(f.len().unwrap(), 16384 + 103);
        let mut e = [9u8; 6];
        f.read_at(&mut e, 16384 + 98).unwrap();
        assert_eq!(&e, b"\0\0end\0");
        f.write_at(&[5u8; 4096], 16384).unwrap();
        f.sync().unwrap();
        assert_eq!(f.len().unwrap(), 20480);
        let mut back = vec![0u8; 103];
        f.read_at(&mut back, 16384).unwrap();
        assert_eq!(back, vec![5u8; 103]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A sync with nothing changed since the last is skipped; any change,
    /// the first sync of a new storage and a failed sync are not.
    #[test]
    fn sync_skips_only_when_nothing_changed() {
        let dir = std::env::temp_dir().join(format!("oxqcow-sync-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let f = FileStorage::open(&p, true, false).unwrap();
        let pending =
            |f: &FileStorage| f.synced.load(Ordering::Acquire) < f.changes.load(Ordering::Acquire);
        assert!(pending(&f), "a new storage may cover another's writes");
        f.sync().unwrap();
        assert!(!pending(&f));
        f.sync().unwrap();
        f.write_at(b"x", 7).unwrap();
        assert!(pending(&f));
        f.sync().unwrap();
        assert!(!pending(&f));
        f.set_len(4096).unwrap();
        assert!(pending(&f));
        f.sync().unwrap();
        f.allocate(0, 8192).unwrap();
        assert!(pending(&f));
        f.sync().unwrap();
        f.punch_hole(0, 4096).unwrap();
        assert!(pending(&f));
        f.sync().unwrap();
        assert!(f.write_at(b"x", u64::MAX - 1).is_err());
        assert!(pending(&f), "a failed write may have written part");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn extent_size_hint_is_set_or_refused_cleanly() {
        let dir = std::env::temp_dir().join(format!("oxqcow-hint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = File::create(dir.join("f")).unwrap();
        match set_extent_size_hint(&f, 1 << 20) {
            // XFS keeps the hint; ext4 takes the call and keeps nothing.
            Ok(()) => {
                let mut attr = FsXattr::default();
                // SAFETY: as in set_extent_size_hint.
                let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FSGETXATTR as _, &mut attr) };
                assert_eq!(r, 0);
                if attr.xflags & FS_XFLAG_EXTSIZE != 0 {
                    assert_eq!(attr.extsize, 1 << 20);
                }
            }
            Err(e) => assert!(
                [libc::ENOTTY, libc::EOPNOTSUPP, libc::EINVAL]
                    .contains(&e.raw_os_error().unwrap_or(0)),
                "{e}"
            ),
        }
        // Not a file the ioctl applies to: an error, not a crash.
        let null = File::open("/dev/null").unwrap();
        assert!(set_extent_size_hint(&null, 1 << 20).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
