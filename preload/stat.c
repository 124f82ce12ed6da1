/*
 * stat.c: the stat family of liboxqcow-preload.so. For a qcow2 image the
 * size is the guest size (from the open handle when this process has the
 * image open, else from the header's size field); everything else --
 * device, inode, mode, times, blocks used on the host -- is the file's.
 */
#include "preload.h"

/* The guest size of the image behind fd, or -1 if fd is no image. */
/* "" with AT_EMPTY_PATH means the descriptor itself. The headers declare
 * the path nonnull, so test it through a helper the compiler cannot see
 * through. */
static int empty_path(const char *path, int flags)
{
    const char *volatile p = path;
    return (flags & AT_EMPTY_PATH) && p && p[0] == 0;
}

static int64_t fd_guest_size(int fd)
{
    struct ox_fdent e;
    if (!ox_lookup(fd, &e)) {
        return -1;
    }
    int saved = errno;
    int64_t size = -1;
    if (ox_img_acquire(e.img, 0) == 0) {
        size = ox_img_size(e.img);
        ox_img_release(e.img);
    }
    errno = saved;
    return size;
}

/* The guest size of the image at path (dev/ino already known from the
 * real stat), or -1 if it is no image. */
static int64_t path_guest_size(int dirfd, const char *path, int nofollow, struct stat *st)
{
    struct ox_hdr h;
    if (!S_ISREG(st->st_mode)) {
        return -1;
    }
    struct ox_img *im = ox_img_find(st->st_dev, st->st_ino);
    if (im) {
        int saved = errno;
        int64_t size = -1;
        pthread_rwlock_rdlock(&im->lock);
        if (im->bs && im->gen == ox_fork_gen) {
            size = ox_img_size(im);
        }
        pthread_rwlock_unlock(&im->lock);
        errno = saved;
        if (size >= 0) {
            return size;
        }
    }
    if (!ox_probe_path(dirfd, path, nofollow, st, &h)) {
        return -1;
    }
    return (int64_t)h.size;
}

#define PATCH(st, size)                 \
    do {                                \
        if ((size) >= 0) {              \
            (st)->st_size = (off_t)(size); \
        }                               \
    } while (0)

static int do_fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
    int r = REAL(fstatat)(dirfd, path, st, flags);
    if (r < 0 || !OX_ACTIVE() || !S_ISREG(st->st_mode)) {
        return r;
    }
    int64_t size;
    if (empty_path(path, flags)) {
        size = fd_guest_size(dirfd);
    } else {
        size = path_guest_size(dirfd, path, (flags & AT_SYMLINK_NOFOLLOW) != 0, st);
    }
    PATCH(st, size);
    return r;
}

static int do_fstat(int fd, struct stat *st)
{
    int r = REAL(fstat)(fd, st);
    if (r == 0 && OX_ACTIVE() && S_ISREG(st->st_mode)) {
        PATCH(st, fd_guest_size(fd));
    }
    return r;
}

/* struct stat and struct stat64 have the same layout on LP64 Linux. */
_Static_assert(sizeof(struct stat) == sizeof(struct stat64), "stat64 layout");

OX_EXPORT int stat(const char *path, struct stat *st)
{
    return do_fstatat(AT_FDCWD, path, st, 0);
}

OX_EXPORT int stat64(const char *path, struct stat64 *st)
{
    return do_fstatat(AT_FDCWD, path, (struct stat *)st, 0);
}

OX_EXPORT int lstat(const char *path, struct stat *st)
{
    return do_fstatat(AT_FDCWD, path, st, AT_SYMLINK_NOFOLLOW);
}

OX_EXPORT int lstat64(const char *path, struct stat64 *st)
{
    return do_fstatat(AT_FDCWD, path, (struct stat *)st, AT_SYMLINK_NOFOLLOW);
}

OX_EXPORT int fstat(int fd, struct stat *st)
{
    return do_fstat(fd, st);
}

OX_EXPORT int fstat64(int fd, struct stat64 *st)
{
    return do_fstat(fd, (struct stat *)st);
}

OX_EXPORT int fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
    return do_fstatat(dirfd, path, st, flags);
}

OX_EXPORT int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags)
{
    return do_fstatat(dirfd, path, (struct stat *)st, flags);
}

/* glibc < 2.33 binaries call these; `ver` is _STAT_VER (1 on x86_64). */
OX_EXPORT int __xstat(int ver, const char *path, struct stat *st)
{
    (void)ver;
    return do_fstatat(AT_FDCWD, path, st, 0);
}

OX_EXPORT int __xstat64(int ver, const char *path, struct stat64 *st)
{
    (void)ver;
    return do_fstatat(AT_FDCWD, path, (struct stat *)st, 0);
}

OX_EXPORT int __lxstat(int ver, const char *path, struct stat *st)
{
    (void)ver;
    return do_fstatat(AT_FDCWD, path, st, AT_SYMLINK_NOFOLLOW);
}

OX_EXPORT int __lxstat64(int ver, const char *path, struct stat64 *st)
{
    (void)ver;
    return do_fstatat(AT_FDCWD, path, (struct stat *)st, AT_SYMLINK_NOFOLLOW);
}

OX_EXPORT int __fxstat(int ver, int fd, struct stat *st)
{
    (void)ver;
    return do_fstat(fd, st);
}

OX_EXPORT int __fxstat64(int ver, int fd, struct stat64 *st)
{
    (void)ver;
    return do_fstat(fd, (struct stat *)st);
}

OX_EXPORT int __fxstatat(int ver, int dirfd, const char *path, struct stat *st, int flags)
{
    (void)ver;
    return do_fstatat(dirfd, path, st, flags);
}

OX_EXPORT int __fxstatat64(int ver, int dirfd, const char *path, struct stat64 *st, int flags)
{
    (void)ver;
    return do_fstatat(dirfd, path, (struct stat *)st, flags);
}

OX_EXPORT int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *stx)
{
    int r = REAL(statx)(dirfd, path, flags, mask, stx);
    if (r < 0 || !OX_ACTIVE() || !(stx->stx_mask & STATX_TYPE) || !S_ISREG(stx->stx_mode)) {
        return r;
    }
    int64_t size;
    if (empty_path(path, flags)) {
        size = fd_guest_size(dirfd);
    } else {
        struct stat st;
        memset(&st, 0, sizeof st);
        st.st_mode = stx->stx_mode;
        st.st_size = (off_t)stx->stx_size;
        st.st_dev = makedev(stx->stx_dev_major, stx->stx_dev_minor);
        st.st_ino = (ino_t)stx->stx_ino;
        size = path_guest_size(dirfd, path, (flags & AT_SYMLINK_NOFOLLOW) != 0, &st);
    }
    if (size >= 0) {
        stx->stx_size = (uint64_t)size;
        stx->stx_mask |= STATX_SIZE;
    }
    return r;
}
