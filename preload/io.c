/*
 * io.c: the descriptor wrappers of liboxqcow-preload.so: open family,
 * read/write family, lseek, sync, truncate, fallocate, dup/fcntl, close,
 * ioctl, mmap, copy_file_range/sendfile, exec and spawn.
 */
#include "preload.h"

#include <linux/falloc.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <sys/ioctl.h>

/* ---- open ----------------------------------------------------------------- */

/* fd was just opened by the program: make it an image descriptor if it
 * refers to a qcow2 image. */
static int adopt_new(int fd, int flags, int trunc)
{
    int acc = flags & O_ACCMODE;
    struct stat st;
    struct ox_hdr h;
    if (REAL(fstat)(fd, &st) < 0 || !ox_probe_fd(fd, acc, &st, &h)) {
        if (trunc) {
            REAL(ftruncate)(fd, 0); /* it stopped being an image meanwhile */
        }
        return fd;
    }
    struct ox_img *im = ox_img_get(fd, &st, &h, trunc);
    if (!im) {
        int e = errno;
        REAL(close)(fd);
        errno = e;
        return -1;
    }
    ox_register(fd, im, acc);
    ox_log("descriptor %d is image %s", fd, im->path);
    if (trunc) {
        /* O_TRUNC on an image empties the guest, not the qcow2 file. */
        int r = ox_img_acquire(im, 1);
        if (r == 0) {
            r = ox_img_truncate(im, 0);
            ox_img_release(im);
        }
        if (r < 0) {
            int e = errno;
            ox_close(fd);
            errno = e;
            return -1;
        }
    }
    if (fd <= 2) {
        ox_std_streams_sync(fd);
    }
    return fd;
}

OX_HIDDEN int ox_openat(int dirfd, const char *path, int flags, mode_t mode)
{
    if (!OX_ACTIVE() || (flags & O_PATH) || (flags & O_DIRECTORY) ||
        (flags & O_TMPFILE) == O_TMPFILE) {
        return REAL(openat)(dirfd, path, flags, mode);
    }
    int trunc = 0;
    if ((flags & O_TRUNC) && path) {
        struct stat st;
        struct ox_hdr h;
        int nofollow = (flags & O_NOFOLLOW) ? AT_SYMLINK_NOFOLLOW : 0;
        if (REAL(fstatat)(dirfd, path, &st, nofollow) == 0 &&
            ox_probe_path(dirfd, path, nofollow != 0, &st, &h)) {
            trunc = 1;
            flags &= ~O_TRUNC;
        }
    }
    int fd = REAL(openat)(dirfd, path, flags, mode);
    if (fd < 0) {
        return fd;
    }
    /* A descriptor closed behind our back (syscall(SYS_close), libc's
     * internal close) may still be in the table: the number is new now. */
    ox_unregister(fd);
    return adopt_new(fd, flags, trunc);
}

static mode_t va_mode(int flags, va_list ap)
{
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? (mode_t)va_arg(ap, int) : 0;
}

OX_EXPORT int open(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = va_mode(flags, ap);
    va_end(ap);
    return ox_openat(AT_FDCWD, path, flags, mode);
}

OX_EXPORT int open64(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = va_mode(flags, ap);
    va_end(ap);
    return ox_openat(AT_FDCWD, path, flags, mode);
}

OX_EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = va_mode(flags, ap);
    va_end(ap);
    return ox_openat(dirfd, path, flags, mode);
}

OX_EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = va_mode(flags, ap);
    va_end(ap);
    return ox_openat(dirfd, path, flags, mode);
}

/* The fortified entry points (_FORTIFY_SOURCE) take no mode. */
OX_EXPORT int __open_2(const char *path, int flags)
{
    return ox_openat(AT_FDCWD, path, flags, 0);
}

OX_EXPORT int __open64_2(const char *path, int flags)
{
    return ox_openat(AT_FDCWD, path, flags, 0);
}

OX_EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
    return ox_openat(dirfd, path, flags, 0);
}

OX_EXPORT int __openat64_2(int dirfd, const char *path, int flags)
{
    return ox_openat(dirfd, path, flags, 0);
}

OX_EXPORT int creat(const char *path, mode_t mode)
{
    return ox_openat(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode);
}

OX_EXPORT int creat64(const char *path, mode_t mode)
{
    return ox_openat(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode);
}

/* ---- close and dup -------------------------------------------------------- */

OX_HIDDEN int ox_close(int fd)
{
    if (OX_ACTIVE() && ox_is_image_fd(fd)) {
        ox_unregister(fd);
    }
    return REAL(close)(fd);
}

OX_EXPORT int close(int fd)
{
    return ox_close(fd);
}

OX_EXPORT int close_range(unsigned first, unsigned last, int flags)
{
    if (OX_ACTIVE() && ox_nfds > 0 && !(flags & CLOSE_RANGE_CLOEXEC)) {
        ox_unregister_range(first, last);
    }
    return REAL(close_range)(first, last, flags);
}

OX_EXPORT void closefrom(int lowfd)
{
    if (OX_ACTIVE() && ox_nfds > 0) {
        ox_unregister_range(lowfd < 0 ? 0 : (unsigned)lowfd, ~0u);
    }
    REAL(closefrom)(lowfd);
}

/* After newfd became a copy of oldfd (r >= 0): mirror it in the table. */
static int after_dup(int oldfd, int newfd)
{
    if (newfd < 0 || oldfd == newfd) {
        return newfd;
    }
    struct ox_fdent e;
    if (ox_lookup(oldfd, &e)) {
        ox_register(newfd, e.img, e.accmode);
    } else {
        ox_unregister(newfd);
    }
    if (newfd <= 2) {
        ox_std_streams_sync(newfd);
    }
    return newfd;
}

OX_EXPORT int dup(int fd)
{
    int r = REAL(dup)(fd);
    if (r >= 0 && OX_ACTIVE()) {
        after_dup(fd, r);
    }
    return r;
}

OX_EXPORT int dup2(int oldfd, int newfd)
{
    int r = REAL(dup2)(oldfd, newfd);
    if (r >= 0 && OX_ACTIVE()) {
        after_dup(oldfd, r);
    }
    return r;
}

OX_EXPORT int dup3(int oldfd, int newfd, int flags)
{
    int r = REAL(dup3)(oldfd, newfd, flags);
    if (r >= 0 && OX_ACTIVE()) {
        after_dup(oldfd, r);
    }
    return r;
}

static int do_fcntl(__typeof__(fcntl) *fn, int fd, int cmd, void *arg)
{
    int r = fn(fd, cmd, arg);
    if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) && OX_ACTIVE()) {
        after_dup(fd, r);
    }
    return r;
}

OX_EXPORT int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return do_fcntl(REAL(fcntl), fd, cmd, arg);
}

OX_EXPORT int fcntl64(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return do_fcntl(REAL(fcntl64), fd, cmd, arg);
}

/* ---- read and write ------------------------------------------------------- */

/* Vector read or write through the image, one element after another; stops
 * at the first short transfer and reports what was done before an error. */
static ssize_t img_iov(struct ox_img *im, const struct iovec *iov, int cnt, int64_t off,
                       int write)
{
    ssize_t total = 0;
    for (int i = 0; i < cnt; i++) {
        if (iov[i].iov_len == 0) {
            continue;
        }
        ssize_t r = write ? ox_img_pwrite(im, iov[i].iov_base, iov[i].iov_len, off + total)
                          : ox_img_pread(im, iov[i].iov_base, iov[i].iov_len, off + total);
        if (r < 0) {
            return total > 0 ? total : -1;
        }
        total += r;
        if ((size_t)r < iov[i].iov_len) {
            break;
        }
    }
    return total;
}

static int bad_iov(const struct iovec *iov, int cnt)
{
    if (cnt < 0 || cnt > IOV_MAX) {
        errno = EINVAL;
        return 1;
    }
    size_t sum = 0;
    for (int i = 0; i < cnt; i++) {
        if (iov[i].iov_len > (size_t)SSIZE_MAX - sum) {
            errno = EINVAL;
            return 1;
        }
        sum += iov[i].iov_len;
    }
    return 0;
}

/* Vector read at off, or at the file position when off == -1. */
static ssize_t fd_readv(const struct ox_fdent *e, int fd, const struct iovec *iov, int cnt,
                        int64_t off)
{
    if (e->accmode == O_WRONLY) {
        errno = EBADF;
        return -1;
    }
    if (bad_iov(iov, cnt)) {
        return -1;
    }
    struct ox_img *im = e->img;
    int positional = off == -1;
    if (positional) {
        pthread_mutex_lock(&im->pos_lock);
        off = REAL(lseek64)(fd, 0, SEEK_CUR);
    } else if (off < 0) {
        errno = EINVAL;
        return -1;
    }
    ssize_t r = -1;
    if (off >= 0 && ox_img_acquire(im, 0) == 0) {
        r = img_iov(im, iov, cnt, off, 0);
        ox_img_release(im);
    }
    if (positional) {
        int err = errno;
        if (r > 0) {
            REAL(lseek64)(fd, off + r, SEEK_SET);
        }
        pthread_mutex_unlock(&im->pos_lock);
        errno = err;
    }
    return r;
}

#ifndef RWF_DSYNC
#define RWF_DSYNC 0x2
#define RWF_SYNC 0x4
#define RWF_APPEND 0x10
#endif

static ssize_t fd_writev(const struct ox_fdent *e, int fd, const struct iovec *iov, int cnt,
                         int64_t off, int rwf)
{
    if (e->accmode == O_RDONLY) {
        errno = EBADF;
        return -1;
    }
    if (bad_iov(iov, cnt)) {
        return -1;
    }
    struct ox_img *im = e->img;
    int fl = REAL(fcntl)(fd, F_GETFL);
    int append = (fl >= 0 && (fl & O_APPEND)) || (rwf & RWF_APPEND);
    int sync = (fl >= 0 && (fl & O_DSYNC)) || (rwf & (RWF_DSYNC | RWF_SYNC));
    int positional = off == -1;
    if (!positional && off < 0) {
        errno = EINVAL;
        return -1;
    }
    if (positional) {
        pthread_mutex_lock(&im->pos_lock);
    }
    ssize_t r = -1;
    if (ox_img_acquire(im, 1) == 0) {
        if (append) {
            off = ox_img_size(im);
        } else if (positional) {
            off = REAL(lseek64)(fd, 0, SEEK_CUR);
        }
        if (off >= 0) {
            r = img_iov(im, iov, cnt, off, 1);
            if (r > 0 && sync && ox_img_flush(im) < 0) {
                r = -1;
            }
        }
        ox_img_release(im);
    }
    if (positional) {
        int err = errno;
        if (r > 0) {
            REAL(lseek64)(fd, off + r, SEEK_SET);
        }
        pthread_mutex_unlock(&im->pos_lock);
        errno = err;
    }
    return r;
}

#define LOOKUP_OR(fd, e, passthrough)              \
    struct ox_fdent e;                             \
    if (!OX_ACTIVE() || !ox_lookup((fd), &e)) {    \
        return passthrough;                        \
    }

OX_HIDDEN ssize_t ox_read(int fd, void *buf, size_t n)
{
    LOOKUP_OR(fd, e, REAL(read)(fd, buf, n));
    struct iovec v = {buf, n};
    return fd_readv(&e, fd, &v, 1, -1);
}

OX_HIDDEN ssize_t ox_write(int fd, const void *buf, size_t n)
{
    LOOKUP_OR(fd, e, REAL(write)(fd, buf, n));
    struct iovec v = {(void *)buf, n};
    return fd_writev(&e, fd, &v, 1, -1, 0);
}

static ssize_t ox_pread(int fd, void *buf, size_t n, off64_t off)
{
    LOOKUP_OR(fd, e, REAL(pread64)(fd, buf, n, off));
    if (off < 0) {
        errno = EINVAL;
        return -1;
    }
    struct iovec v = {buf, n};
    return fd_readv(&e, fd, &v, 1, off);
}

static ssize_t ox_pwrite(int fd, const void *buf, size_t n, off64_t off)
{
    LOOKUP_OR(fd, e, REAL(pwrite64)(fd, buf, n, off));
    if (off < 0) {
        errno = EINVAL;
        return -1;
    }
    struct iovec v = {(void *)buf, n};
    return fd_writev(&e, fd, &v, 1, off, 0);
}

OX_EXPORT ssize_t read(int fd, void *buf, size_t n)
{
    return ox_read(fd, buf, n);
}

OX_EXPORT ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
    if (n > buflen || !OX_ACTIVE() || !ox_is_image_fd(fd)) {
        return REAL(__read_chk)(fd, buf, n, buflen);
    }
    return ox_read(fd, buf, n);
}

OX_EXPORT ssize_t write(int fd, const void *buf, size_t n)
{
    return ox_write(fd, buf, n);
}

OX_EXPORT ssize_t pread(int fd, void *buf, size_t n, off_t off)
{
    return ox_pread(fd, buf, n, off);
}

OX_EXPORT ssize_t pread64(int fd, void *buf, size_t n, off64_t off)
{
    return ox_pread(fd, buf, n, off);
}

OX_EXPORT ssize_t __pread_chk(int fd, void *buf, size_t n, off_t off, size_t buflen)
{
    if (n > buflen || !OX_ACTIVE() || !ox_is_image_fd(fd)) {
        return REAL(__pread_chk)(fd, buf, n, off, buflen);
    }
    return ox_pread(fd, buf, n, off);
}

OX_EXPORT ssize_t __pread64_chk(int fd, void *buf, size_t n, off64_t off, size_t buflen)
{
    if (n > buflen || !OX_ACTIVE() || !ox_is_image_fd(fd)) {
        return REAL(__pread64_chk)(fd, buf, n, off, buflen);
    }
    return ox_pread(fd, buf, n, off);
}

OX_EXPORT ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    return ox_pwrite(fd, buf, n, off);
}

OX_EXPORT ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off)
{
    return ox_pwrite(fd, buf, n, off);
}

OX_EXPORT ssize_t readv(int fd, const struct iovec *iov, int cnt)
{
    LOOKUP_OR(fd, e, REAL(readv)(fd, iov, cnt));
    return fd_readv(&e, fd, iov, cnt, -1);
}

OX_EXPORT ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
    LOOKUP_OR(fd, e, REAL(writev)(fd, iov, cnt));
    return fd_writev(&e, fd, iov, cnt, -1, 0);
}

static ssize_t ox_preadv(int fd, const struct iovec *iov, int cnt, off64_t off)
{
    if (off < 0) {
        errno = EINVAL;
        return -1;
    }
    LOOKUP_OR(fd, e, REAL(preadv64)(fd, iov, cnt, off));
    return fd_readv(&e, fd, iov, cnt, off);
}

static ssize_t ox_pwritev(int fd, const struct iovec *iov, int cnt, off64_t off)
{
    if (off < 0) {
        errno = EINVAL;
        return -1;
    }
    LOOKUP_OR(fd, e, REAL(pwritev64)(fd, iov, cnt, off));
    return fd_writev(&e, fd, iov, cnt, off, 0);
}

OX_EXPORT ssize_t preadv(int fd, const struct iovec *iov, int cnt, off_t off)
{
    return ox_preadv(fd, iov, cnt, off);
}

OX_EXPORT ssize_t preadv64(int fd, const struct iovec *iov, int cnt, off64_t off)
{
    return ox_preadv(fd, iov, cnt, off);
}

OX_EXPORT ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
    return ox_pwritev(fd, iov, cnt, off);
}

OX_EXPORT ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off64_t off)
{
    return ox_pwritev(fd, iov, cnt, off);
}

/* preadv2/pwritev2: offset -1 means the file position. */
static ssize_t ox_preadv2(int fd, const struct iovec *iov, int cnt, off64_t off, int flags)
{
    LOOKUP_OR(fd, e, REAL(preadv64v2)(fd, iov, cnt, off, flags));
    if (off < -1) {
        errno = EINVAL;
        return -1;
    }
    return fd_readv(&e, fd, iov, cnt, off);
}

static ssize_t ox_pwritev2(int fd, const struct iovec *iov, int cnt, off64_t off, int flags)
{
    LOOKUP_OR(fd, e, REAL(pwritev64v2)(fd, iov, cnt, off, flags));
    if (off < -1) {
        errno = EINVAL;
        return -1;
    }
    return fd_writev(&e, fd, iov, cnt, off, flags);
}

OX_EXPORT ssize_t preadv2(int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
    return ox_preadv2(fd, iov, cnt, off, flags);
}

OX_EXPORT ssize_t preadv64v2(int fd, const struct iovec *iov, int cnt, off64_t off, int flags)
{
    return ox_preadv2(fd, iov, cnt, off, flags);
}

OX_EXPORT ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
    return ox_pwritev2(fd, iov, cnt, off, flags);
}

OX_EXPORT ssize_t pwritev64v2(int fd, const struct iovec *iov, int cnt, off64_t off, int flags)
{
    return ox_pwritev2(fd, iov, cnt, off, flags);
}

/* ---- lseek ---------------------------------------------------------------- */

OX_HIDDEN off64_t ox_lseek(int fd, off64_t off, int whence)
{
    LOOKUP_OR(fd, e, REAL(lseek64)(fd, off, whence));
    struct ox_img *im = e.img;
    if (whence == SEEK_SET || whence == SEEK_CUR) {
        pthread_mutex_lock(&im->pos_lock);
        off64_t r = REAL(lseek64)(fd, off, whence);
        pthread_mutex_unlock(&im->pos_lock);
        return r;
    }
    if (whence != SEEK_END && whence != SEEK_DATA && whence != SEEK_HOLE) {
        errno = EINVAL;
        return -1;
    }
    pthread_mutex_lock(&im->pos_lock);
    off64_t r = -1;
    if (ox_img_acquire(im, 0) == 0) {
        if (whence == SEEK_END) {
            int64_t size = ox_img_size(im);
            if (size >= 0) {
                r = size + off;
                if (r < 0) {
                    errno = EINVAL;
                    r = -1;
                }
            }
        } else {
            r = ox_img_seek_data(im, off, whence == SEEK_HOLE);
        }
        ox_img_release(im);
    }
    if (r >= 0) {
        r = REAL(lseek64)(fd, r, SEEK_SET);
    }
    int err = errno;
    pthread_mutex_unlock(&im->pos_lock);
    errno = err;
    return r;
}

OX_EXPORT off_t lseek(int fd, off_t off, int whence)
{
    return ox_lseek(fd, off, whence);
}

OX_EXPORT off64_t lseek64(int fd, off64_t off, int whence)
{
    return ox_lseek(fd, off, whence);
}

/* ---- sync ----------------------------------------------------------------- */

static int fd_flush(const struct ox_fdent *e)
{
    if (ox_img_acquire(e->img, 0) < 0) {
        return -1;
    }
    int r = ox_img_flush(e->img);
    ox_img_release(e->img);
    return r;
}

OX_EXPORT int fsync(int fd)
{
    LOOKUP_OR(fd, e, REAL(fsync)(fd));
    return fd_flush(&e);
}

OX_EXPORT int fdatasync(int fd)
{
    LOOKUP_OR(fd, e, REAL(fdatasync)(fd));
    return fd_flush(&e);
}

OX_EXPORT int sync_file_range(int fd, off64_t off, off64_t n, unsigned int flags)
{
    LOOKUP_OR(fd, e, REAL(sync_file_range)(fd, off, n, flags));
    return fd_flush(&e);
}

OX_EXPORT int syncfs(int fd)
{
    if (OX_ACTIVE()) {
        ox_flush_all();
    }
    return REAL(syncfs)(fd);
}

OX_EXPORT void sync(void)
{
    if (OX_ACTIVE()) {
        ox_flush_all();
    }
    REAL(sync)();
}

/* ---- size changes --------------------------------------------------------- */

static int fd_truncate(const struct ox_fdent *e, off64_t len)
{
    if (len < 0 || e->accmode == O_RDONLY) {
        errno = EINVAL;
        return -1;
    }
    if (ox_img_acquire(e->img, 1) < 0) {
        return -1;
    }
    int r = ox_img_truncate(e->img, len);
    ox_img_release(e->img);
    return r;
}

OX_EXPORT int ftruncate(int fd, off_t len)
{
    LOOKUP_OR(fd, e, REAL(ftruncate)(fd, len));
    return fd_truncate(&e, len);
}

OX_EXPORT int ftruncate64(int fd, off64_t len)
{
    LOOKUP_OR(fd, e, REAL(ftruncate64)(fd, len));
    return fd_truncate(&e, len);
}

static int path_truncate(const char *path, off64_t len)
{
    struct stat st;
    struct ox_hdr h;
    if (!OX_ACTIVE() || REAL(stat)(path, &st) < 0 || !ox_probe_path(AT_FDCWD, path, 0, &st, &h)) {
        return REAL(truncate64)(path, len);
    }
    int fd = ox_openat(AT_FDCWD, path, O_WRONLY | O_CLOEXEC, 0);
    if (fd < 0) {
        return -1;
    }
    struct ox_fdent e;
    int r = ox_lookup(fd, &e) ? fd_truncate(&e, len) : REAL(ftruncate64)(fd, len);
    int err = errno;
    ox_close(fd);
    errno = err;
    return r;
}

OX_EXPORT int truncate(const char *path, off_t len)
{
    return path_truncate(path, len);
}

OX_EXPORT int truncate64(const char *path, off64_t len)
{
    return path_truncate(path, len);
}

/* fallocate on an image: allocation only grows the guest (unless
 * FALLOC_FL_KEEP_SIZE); PUNCH_HOLE discards (zeros with unmap, so the
 * range reads as zeros afterwards as the call promises); ZERO_RANGE writes
 * zeros. COLLAPSE/INSERT/UNSHARE are not supported. */
static int fd_fallocate(const struct ox_fdent *e, int mode, off64_t off, off64_t len)
{
    if (off < 0 || len <= 0) {
        errno = EINVAL;
        return -1;
    }
    if (e->accmode == O_RDONLY) {
        errno = EBADF;
        return -1;
    }
    const int known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
    if ((mode & ~known) || ((mode & FALLOC_FL_PUNCH_HOLE) && !(mode & FALLOC_FL_KEEP_SIZE)) ||
        ((mode & FALLOC_FL_PUNCH_HOLE) && (mode & FALLOC_FL_ZERO_RANGE))) {
        errno = EOPNOTSUPP;
        return -1;
    }
    struct ox_img *im = e->img;
    if (ox_img_acquire(im, 1) < 0) {
        return -1;
    }
    int r = 0;
    int64_t size = ox_img_size(im);
    int64_t end = off + len;
    if (size < 0) {
        r = -1;
    } else if (mode & FALLOC_FL_PUNCH_HOLE) {
        if (end > size) {
            end = size;
        }
        if (off < end) {
            r = ox_img_zero(im, off, end - off, 1);
        }
    } else {
        if (!(mode & FALLOC_FL_KEEP_SIZE) && end > size) {
            r = ox_img_truncate(im, end);
            size = r == 0 ? ox_img_size(im) : size;
        }
        if (r == 0 && (mode & FALLOC_FL_ZERO_RANGE)) {
            if (end > size) {
                end = size;
            }
            if (off < end) {
                r = ox_img_zero(im, off, end - off, 0);
            }
        }
    }
    ox_img_release(im);
    return r;
}

OX_EXPORT int fallocate(int fd, int mode, off_t off, off_t len)
{
    LOOKUP_OR(fd, e, REAL(fallocate)(fd, mode, off, len));
    return fd_fallocate(&e, mode, off, len);
}

OX_EXPORT int fallocate64(int fd, int mode, off64_t off, off64_t len)
{
    LOOKUP_OR(fd, e, REAL(fallocate64)(fd, mode, off, len));
    return fd_fallocate(&e, mode, off, len);
}

static int ox_posix_fallocate(int fd, off64_t off, off64_t len)
{
    LOOKUP_OR(fd, e, REAL(posix_fallocate64)(fd, off, len));
    int saved = errno;
    int r = fd_fallocate(&e, 0, off, len) == 0 ? 0 : errno;
    errno = saved;
    return r;
}

OX_EXPORT int posix_fallocate(int fd, off_t off, off_t len)
{
    return ox_posix_fallocate(fd, off, len);
}

OX_EXPORT int posix_fallocate64(int fd, off64_t off, off64_t len)
{
    return ox_posix_fallocate(fd, off, len);
}

/* ---- ioctl and mmap ------------------------------------------------------- */

OX_EXPORT int ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (!OX_ACTIVE() || ox_nfds == 0) {
        return REAL(ioctl)(fd, req, arg);
    }
    /* Reflinks and extent maps would expose the qcow2 file's bytes. */
    int img = ox_is_image_fd(fd);
    if (req == FICLONE && (img || ox_is_image_fd((int)(intptr_t)arg))) {
        errno = EOPNOTSUPP;
        return -1;
    }
    if (req == FICLONERANGE &&
        (img || (arg && ox_is_image_fd((int)((struct file_clone_range *)arg)->src_fd)))) {
        errno = EOPNOTSUPP;
        return -1;
    }
    if (img && (req == FIDEDUPERANGE || req == FS_IOC_FIEMAP)) {
        errno = EOPNOTSUPP;
        return -1;
    }
    if (img && req == FIONREAD && arg) {
        struct ox_fdent e;
        if (ox_lookup(fd, &e) && ox_img_acquire(e.img, 0) == 0) {
            int64_t size = ox_img_size(e.img);
            ox_img_release(e.img);
            off64_t pos = REAL(lseek64)(fd, 0, SEEK_CUR);
            if (size >= 0 && pos >= 0) {
                int64_t left = size > pos ? size - pos : 0;
                *(int *)arg = left > INT32_MAX ? INT32_MAX : (int)left;
                return 0;
            }
        }
        return -1;
    }
    return REAL(ioctl)(fd, req, arg);
}

static void *fail_mmap(int fd)
{
    struct ox_fdent e;
    if (ox_lookup(fd, &e)) {
        ox_warn("mmap() of qcow2 image %s is not supported: its guest contents have no "
                "host mapping (ENODEV); read it instead",
                e.img->path);
    }
    errno = ENODEV;
    return MAP_FAILED;
}

OX_EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    if (!(flags & MAP_ANONYMOUS) && OX_ACTIVE() && ox_is_image_fd(fd)) {
        return fail_mmap(fd);
    }
    return REAL(mmap)(addr, len, prot, flags, fd, off);
}

OX_EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off)
{
    if (!(flags & MAP_ANONYMOUS) && OX_ACTIVE() && ox_is_image_fd(fd)) {
        return fail_mmap(fd);
    }
    return REAL(mmap64)(addr, len, prot, flags, fd, off);
}

/* ---- copy_file_range and sendfile: read + write ---------------------------- */

#define COPY_BUF (1 << 20)
#define COPY_MAX (16 << 20) /* per call; callers loop on short counts */

static ssize_t copy_fallback(int in, off64_t *in_off, int out, off64_t *out_off, size_t len)
{
    if (len > COPY_MAX) {
        len = COPY_MAX;
    }
    size_t bsz = len < COPY_BUF ? len : COPY_BUF;
    if (bsz == 0) {
        return 0;
    }
    char *buf = malloc(bsz);
    if (!buf) {
        errno = ENOMEM;
        return -1;
    }
    size_t total = 0;
    int err = 0;
    while (total < len) {
        size_t want = len - total < bsz ? len - total : bsz;
        ssize_t r = in_off ? ox_pread(in, buf, want, *in_off) : ox_read(in, buf, want);
        if (r <= 0) {
            err = r < 0 ? errno : 0;
            break;
        }
        size_t done = 0;
        while (done < (size_t)r) {
            ssize_t w = out_off ? ox_pwrite(out, buf + done, (size_t)r - done, *out_off)
                                : ox_write(out, buf + done, (size_t)r - done);
            if (w <= 0) {
                err = w < 0 ? errno : EIO;
                break;
            }
            done += (size_t)w;
            if (out_off) {
                *out_off += w;
            }
        }
        if (in_off) {
            *in_off += (off64_t)done;
        } else if (done < (size_t)r) {
            ox_lseek(in, -(off64_t)((size_t)r - done), SEEK_CUR); /* unread the rest */
        }
        total += done;
        if (err) {
            break;
        }
        if ((size_t)r < want) {
            break;
        }
    }
    free(buf);
    if (total == 0 && err) {
        errno = err;
        return -1;
    }
    return (ssize_t)total;
}

OX_EXPORT ssize_t copy_file_range(int in, off64_t *in_off, int out, off64_t *out_off,
                                  size_t len, unsigned int flags)
{
    if (!OX_ACTIVE() || (!ox_is_image_fd(in) && !ox_is_image_fd(out))) {
        return REAL(copy_file_range)(in, in_off, out, out_off, len, flags);
    }
    if (flags != 0) {
        errno = EINVAL;
        return -1;
    }
    return copy_fallback(in, in_off, out, out_off, len);
}

static ssize_t ox_sendfile(int out, int in, off64_t *off, size_t count)
{
    if (!OX_ACTIVE() || (!ox_is_image_fd(in) && !ox_is_image_fd(out))) {
        return REAL(sendfile64)(out, in, off, count);
    }
    return copy_fallback(in, off, out, NULL, count);
}

OX_EXPORT ssize_t sendfile(int out, int in, off_t *off, size_t count)
{
    return ox_sendfile(out, in, (off64_t *)off, count);
}

OX_EXPORT ssize_t sendfile64(int out, int in, off64_t *off, size_t count)
{
    return ox_sendfile(out, in, off, count);
}

/* splice: one end is a pipe; with an image at the other, read + write. */
OX_EXPORT ssize_t splice(int in, off64_t *in_off, int out, off64_t *out_off, size_t len,
                         unsigned int flags)
{
    if (!OX_ACTIVE() || (!ox_is_image_fd(in) && !ox_is_image_fd(out))) {
        return REAL(splice)(in, in_off, out, out_off, len, flags);
    }
    /* A pipe takes at most its capacity at once: copy one page-sized
     * chunk per call, as a blocking splice may return short. */
    return copy_fallback(in, in_off, out, out_off, len < 65536 ? len : 65536);
}

/* ---- exec and spawn: the new program opens the images afresh ------------- */

static void before_exec(void)
{
    if (OX_ACTIVE()) {
        ox_flush_all();
    }
}

OX_EXPORT int execve(const char *path, char *const argv[], char *const envp[])
{
    before_exec();
    return REAL(execve)(path, argv, envp);
}

OX_EXPORT int execv(const char *path, char *const argv[])
{
    before_exec();
    return REAL(execv)(path, argv);
}

OX_EXPORT int execvp(const char *file, char *const argv[])
{
    before_exec();
    return REAL(execvp)(file, argv);
}

OX_EXPORT int execvpe(const char *file, char *const argv[], char *const envp[])
{
    before_exec();
    return REAL(execvpe)(file, argv, envp);
}

OX_EXPORT int fexecve(int fd, char *const argv[], char *const envp[])
{
    before_exec();
    return REAL(fexecve)(fd, argv, envp);
}

/* execl, execlp, execle: glibc calls its internal execve, so build argv here. */
#define COLLECT_ARGS(arg0, ap, argv, envp_out)                       \
    size_t n_ = 1;                                                   \
    va_list cp_;                                                     \
    va_copy(cp_, ap);                                                \
    while (va_arg(cp_, char *) != NULL) {                            \
        n_++;                                                        \
    }                                                                \
    va_end(cp_);                                                     \
    char **argv = alloca((n_ + 1) * sizeof(char *));                 \
    argv[0] = (char *)(arg0);                                        \
    for (size_t i_ = 1; i_ <= n_; i_++) {                            \
        argv[i_] = va_arg(ap, char *);                               \
    }                                                                \
    envp_out;

OX_EXPORT int execl(const char *path, const char *arg, ...)
{
    va_list ap;
    va_start(ap, arg);
    COLLECT_ARGS(arg, ap, argv, (void)0)
    va_end(ap);
    before_exec();
    return REAL(execv)(path, argv);
}

OX_EXPORT int execlp(const char *file, const char *arg, ...)
{
    va_list ap;
    va_start(ap, arg);
    COLLECT_ARGS(arg, ap, argv, (void)0)
    va_end(ap);
    before_exec();
    return REAL(execvp)(file, argv);
}

OX_EXPORT int execle(const char *path, const char *arg, ...)
{
    va_list ap;
    va_start(ap, arg);
    COLLECT_ARGS(arg, ap, argv, char *const *envp = va_arg(ap, char *const *))
    va_end(ap);
    before_exec();
    return REAL(execve)(path, argv, envp);
}

OX_EXPORT int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                          const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
    before_exec();
    return REAL(posix_spawn)(pid, path, fa, attr, argv, envp);
}

OX_EXPORT int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *fa,
                           const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
    before_exec();
    return REAL(posix_spawnp)(pid, file, fa, attr, argv, envp);
}

OX_EXPORT int system(const char *cmd)
{
    before_exec();
    return REAL(system)(cmd);
}

OX_EXPORT FILE *popen(const char *cmd, const char *type)
{
    before_exec();
    return REAL(popen)(cmd, type);
}
