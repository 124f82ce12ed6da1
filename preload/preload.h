/*
 * preload.h: internals shared by the files of liboxqcow-preload.so, an
 * LD_PRELOAD shim that shows programs the guest contents of the qcow2
 * images they open, through liboxqcow's public C ABI (block_int.h).
 *
 * Model: an image descriptor is a real descriptor of the image file; the
 * shim keeps a table fd -> image and answers I/O on it from the image
 * handle (one BlockDriverState per image file, found by device and inode,
 * shared by every descriptor of that file). The guest file position is
 * kept in the real descriptor's file offset, which the library never uses
 * (it does positioned I/O on its own descriptor), so dup()ed and inherited
 * descriptors share their position exactly as the kernel shares it.
 *
 * Calls the library makes itself (open, pread, fstat, close, ...) land in
 * the shim's wrappers too; a per-thread guard (ox_in_lib) sends them
 * straight to libc.
 */
#ifndef OXQCOW_PRELOAD_H
#define OXQCOW_PRELOAD_H

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "block_int.h"

#define OX_HIDDEN __attribute__((visibility("hidden")))
#define OX_EXPORT __attribute__((visibility("default")))

/* glibc's pre-2.33 stat entry points (no longer declared by the headers). */
int __xstat(int ver, const char *path, struct stat *st);
int __lxstat(int ver, const char *path, struct stat *st);
int __fxstat(int ver, int fd, struct stat *st);
int __fxstatat(int ver, int dirfd, const char *path, struct stat *st, int flags);
int __xstat64(int ver, const char *path, struct stat64 *st);
int __lxstat64(int ver, const char *path, struct stat64 *st);
int __fxstat64(int ver, int fd, struct stat64 *st);
int __fxstatat64(int ver, int dirfd, const char *path, struct stat64 *st, int flags);
/* Fortified variants. */
int __open_2(const char *path, int flags);
int __open64_2(const char *path, int flags);
int __openat_2(int dirfd, const char *path, int flags);
int __openat64_2(int dirfd, const char *path, int flags);
ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen);
ssize_t __pread_chk(int fd, void *buf, size_t n, off_t off, size_t buflen);
ssize_t __pread64_chk(int fd, void *buf, size_t n, off64_t off, size_t buflen);
int fcntl64(int fd, int cmd, ...);

/* The libc functions the shim wraps, resolved with dlsym(RTLD_NEXT). */
#define OX_REAL_FUNCS(X)                                                                 \
    X(open) X(open64) X(openat) X(openat64) X(__open_2) X(__open64_2) X(__openat_2)      \
    X(__openat64_2) X(creat) X(creat64) X(close) X(close_range) X(closefrom)             \
    X(read) X(__read_chk) X(pread) X(pread64) X(__pread_chk) X(__pread64_chk) X(readv)   \
    X(preadv) X(preadv64) X(preadv2) X(preadv64v2) X(write) X(pwrite) X(pwrite64)        \
    X(writev) X(pwritev) X(pwritev64) X(pwritev2) X(pwritev64v2) X(lseek) X(lseek64)     \
    X(stat) X(stat64) X(lstat) X(lstat64) X(fstat) X(fstat64) X(fstatat) X(fstatat64)    \
    X(statx) X(__xstat) X(__lxstat) X(__fxstat) X(__fxstatat) X(__xstat64)               \
    X(__lxstat64) X(__fxstat64) X(__fxstatat64) X(fsync) X(fdatasync)                    \
    X(sync_file_range) X(syncfs) X(sync) X(ftruncate) X(ftruncate64) X(truncate)         \
    X(truncate64) X(fallocate) X(fallocate64) X(posix_fallocate) X(posix_fallocate64)    \
    X(dup) X(dup2) X(dup3) X(fcntl) X(fcntl64) X(ioctl) X(mmap) X(mmap64)                \
    X(copy_file_range) X(sendfile) X(sendfile64) X(splice) X(fopen) X(fopen64) X(fdopen)           \
    X(freopen) X(freopen64) X(fileno) X(fileno_unlocked) X(execve) X(execv) X(execvp)    \
    X(execvpe) X(fexecve) X(posix_spawn) X(posix_spawnp) X(system) X(popen)

#define OX_DECLARE_REAL(fn) extern OX_HIDDEN __typeof__(fn) *real_##fn;
OX_REAL_FUNCS(OX_DECLARE_REAL)
#undef OX_DECLARE_REAL

OX_HIDDEN void *ox_dlsym(const char *name);
/* REAL(fn): the next definition of fn (libc's). */
#define REAL(fn)                                                   \
    (__extension__({                                               \
        if (!real_##fn) {                                          \
            real_##fn = (__typeof__(real_##fn))ox_dlsym(#fn);      \
        }                                                          \
        real_##fn;                                                 \
    }))

/* Set while the shim itself calls into liboxqcow (or libc for its own
 * bookkeeping): every wrapper then passes straight through. */
extern OX_HIDDEN __thread int ox_in_lib __attribute__((tls_model("initial-exec")));
#define LIB_BEGIN() (ox_in_lib++)
#define LIB_END() (ox_in_lib--)

/* One qcow2 image file open in this process. Never freed (kept for reuse
 * by device and inode), so a pointer stays valid. */
struct ox_img {
    struct ox_img *next;
    dev_t dev;
    ino_t ino;
    char *path;               /* for (re)opening */
    BlockDriverState *bs;     /* NULL while no descriptor is open */
    int rw;                   /* bs is open read-write */
    int has_backing;          /* unallocated ranges read from a backing file */
    unsigned gen;             /* ox_fork_gen when bs was opened */
    int refs;                 /* descriptors in the table (table lock) */
    int unflushed;            /* written since the last flush */
    pthread_rwlock_t lock;    /* rd: I/O on bs; wr: open/close/reopen */
    pthread_mutex_t pos_lock; /* read()/write()/lseek() position updates */
};

/* What the table knows about one image descriptor. */
struct ox_fdent {
    struct ox_img *img;
    int accmode; /* O_RDONLY, O_WRONLY or O_RDWR */
};

extern OX_HIDDEN int ox_enabled;
extern OX_HIDDEN int ox_debug;
extern OX_HIDDEN volatile int ox_nfds; /* image descriptors in the table */
extern OX_HIDDEN unsigned ox_fork_gen;

OX_HIDDEN void ox_init(void);
OX_HIDDEN void ox_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
OX_HIDDEN void ox_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Passes through when the shim is off, re-entered, or no image is open. */
#define OX_ACTIVE() (ox_in_lib == 0 && (ox_init(), ox_enabled))

/* The table. ox_lookup copies the entry; returns 0 if fd is no image. */
OX_HIDDEN int ox_lookup(int fd, struct ox_fdent *out);
OX_HIDDEN int ox_is_image_fd(int fd);
/* Adds fd -> img (img->refs++). */
OX_HIDDEN void ox_register(int fd, struct ox_img *img, int accmode);
/* Removes fd if it is an image descriptor (closing the image after the
 * last one). */
OX_HIDDEN void ox_unregister(int fd);
OX_HIDDEN void ox_unregister_range(unsigned first, unsigned last);

/* Header facts read from a file: 1 if it is a qcow2 image (v2/v3). */
struct ox_hdr {
    int version;
    uint64_t backing_offset;
    uint64_t size;
};
OX_HIDDEN int ox_probe_fd(int fd, int accmode, const struct stat *st, struct ox_hdr *h);
OX_HIDDEN int ox_probe_path(int dirfd, const char *path, int nofollow, struct stat *st,
                            struct ox_hdr *h);

/* Finds or creates the image for (dev, ino) and makes sure it is open;
 * returns NULL with errno set on failure. */
OX_HIDDEN struct ox_img *ox_img_get(int fd, const struct stat *st, const struct ox_hdr *h,
                                    int want_rw);
OX_HIDDEN struct ox_img *ox_img_find(dev_t dev, ino_t ino);

/* Takes the image for I/O (read lock), (re)opening it read-write when
 * want_rw; 0 or -1 with errno. Pair with ox_img_release. */
OX_HIDDEN int ox_img_acquire(struct ox_img *im, int want_rw);
OX_HIDDEN void ox_img_release(struct ox_img *im);

/* Image I/O under ox_img_acquire. Return bytes or -1 with errno. */
OX_HIDDEN int64_t ox_img_size(struct ox_img *im);
OX_HIDDEN ssize_t ox_img_pread(struct ox_img *im, void *buf, size_t n, int64_t off);
OX_HIDDEN ssize_t ox_img_pwrite(struct ox_img *im, const void *buf, size_t n, int64_t off);
OX_HIDDEN int ox_img_flush(struct ox_img *im);
OX_HIDDEN int ox_img_truncate(struct ox_img *im, int64_t size);
OX_HIDDEN int ox_img_zero(struct ox_img *im, int64_t off, int64_t len, int unmap);
/* SEEK_DATA / SEEK_HOLE answer for off (< size): next data or hole. */
OX_HIDDEN int64_t ox_img_seek_data(struct ox_img *im, int64_t off, int hole);

/* Flushes every image written since its last flush (before fork/exec/spawn). */
OX_HIDDEN void ox_flush_all(void);

/* Descriptor-level operations shared by the wrappers and stdio cookies. */
OX_HIDDEN ssize_t ox_read(int fd, void *buf, size_t n);
OX_HIDDEN ssize_t ox_write(int fd, const void *buf, size_t n);
OX_HIDDEN off64_t ox_lseek(int fd, off64_t off, int whence);
OX_HIDDEN int ox_close(int fd);
OX_HIDDEN int ox_openat(int dirfd, const char *path, int flags, mode_t mode);

/* stdio: replaces stdin/stdout/stderr with cookie streams when their
 * descriptor is an image (after adoption or dup2 onto 0-2). */
OX_HIDDEN void ox_std_streams_sync(int fd);
OX_HIDDEN FILE *ox_cookie_stream(int fd, const char *mode);

#endif /* OXQCOW_PRELOAD_H */
