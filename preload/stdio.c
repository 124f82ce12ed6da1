/*
 * stdio.c: fopen, fopen64, fdopen, freopen and fileno for
 * liboxqcow-preload.so. glibc's FILE reads and writes with internal calls
 * the shim cannot see, so a stream on an image is a fopencookie() stream
 * whose callbacks go through the shim's descriptor operations; fileno()
 * on it returns the image descriptor. stdin, stdout and stderr are swapped
 * for such streams while descriptors 0-2 are images.
 */
#include "preload.h"

#include <stdio_ext.h>

struct cookie {
    struct cookie *next;
    FILE *fp;
    int fd; /* -1 once detached (a std stream whose descriptor changed) */
};

static pthread_mutex_t cookie_lock = PTHREAD_MUTEX_INITIALIZER;
static struct cookie *cookies;

/* libc's std streams while a cookie stream stands in for them. */
static FILE *orig_std[3];
static FILE *cookie_std[3];

static FILE **std_slot(int fd)
{
    return fd == 0 ? &stdin : fd == 1 ? &stdout : &stderr;
}

static ssize_t ck_read(void *c, char *buf, size_t size)
{
    struct cookie *ck = c;
    if (ck->fd < 0) {
        errno = EBADF;
        return -1;
    }
    return ox_read(ck->fd, buf, size);
}

static ssize_t ck_write(void *c, const char *buf, size_t size)
{
    struct cookie *ck = c;
    if (ck->fd < 0) {
        errno = EBADF;
        return 0;
    }
    size_t done = 0;
    while (done < size) {
        ssize_t r = ox_write(ck->fd, buf + done, size - done);
        if (r <= 0) {
            break;
        }
        done += (size_t)r;
    }
    return (ssize_t)done; /* short (0) on error, as glibc expects */
}

static int ck_seek(void *c, off64_t *pos, int whence)
{
    struct cookie *ck = c;
    if (ck->fd < 0) {
        errno = EBADF;
        return -1;
    }
    off64_t r = ox_lseek(ck->fd, *pos, whence);
    if (r < 0) {
        return -1;
    }
    *pos = r;
    return 0;
}

static int ck_close(void *c)
{
    struct cookie *ck = c;
    pthread_mutex_lock(&cookie_lock);
    for (struct cookie **p = &cookies; *p; p = &(*p)->next) {
        if (*p == ck) {
            *p = ck->next;
            break;
        }
    }
    pthread_mutex_unlock(&cookie_lock);
    for (int i = 0; i < 3; i++) {
        if (cookie_std[i] == ck->fp) {
            /* fclose(stdout) and the like: leave libc's (closed) stream. */
            *std_slot(i) = orig_std[i];
            cookie_std[i] = NULL;
        }
    }
    int r = ck->fd >= 0 ? ox_close(ck->fd) : 0;
    free(ck);
    return r;
}

OX_HIDDEN FILE *ox_cookie_stream(int fd, const char *mode)
{
    struct cookie *ck = calloc(1, sizeof *ck);
    if (!ck) {
        errno = ENOMEM;
        return NULL;
    }
    ck->fd = fd;
    cookie_io_functions_t io = {ck_read, ck_write, ck_seek, ck_close};
    FILE *fp = fopencookie(ck, mode, io);
    if (!fp) {
        free(ck);
        return NULL;
    }
    ck->fp = fp;
    pthread_mutex_lock(&cookie_lock);
    ck->next = cookies;
    cookies = ck;
    pthread_mutex_unlock(&cookie_lock);
    return fp;
}

static struct cookie *find_cookie(FILE *fp)
{
    if (!cookies || !fp) {
        return NULL;
    }
    pthread_mutex_lock(&cookie_lock);
    struct cookie *ck = cookies;
    while (ck && ck->fp != fp) {
        ck = ck->next;
    }
    pthread_mutex_unlock(&cookie_lock);
    return ck;
}

OX_EXPORT int fileno(FILE *fp)
{
    struct cookie *ck = find_cookie(fp);
    if (ck && ck->fd >= 0) {
        return ck->fd;
    }
    return REAL(fileno)(fp);
}

OX_EXPORT int fileno_unlocked(FILE *fp)
{
    struct cookie *ck = find_cookie(fp);
    if (ck && ck->fd >= 0) {
        return ck->fd;
    }
    return REAL(fileno_unlocked)(fp);
}

/* fopen's mode letters as open(2) flags; -1 for a mode we leave to libc. */
static int mode_flags(const char *mode)
{
    int f;
    switch (mode[0]) {
    case 'r':
        f = O_RDONLY;
        break;
    case 'w':
        f = O_WRONLY | O_CREAT | O_TRUNC;
        break;
    case 'a':
        f = O_WRONLY | O_CREAT | O_APPEND;
        break;
    default:
        return -1;
    }
    for (const char *p = mode + 1; *p; p++) {
        switch (*p) {
        case '+':
            f = (f & ~O_ACCMODE) | O_RDWR;
            break;
        case 'x':
            f |= O_EXCL;
            break;
        case 'e':
            f |= O_CLOEXEC;
            break;
        case ',':
            return -1; /* ",ccs=": wide streams stay with libc */
        default:
            break;
        }
    }
    return f;
}

static FILE *do_fopen(const char *path, const char *mode, __typeof__(fopen) *real)
{
    int flags;
    if (!OX_ACTIVE() || !path || !mode || (flags = mode_flags(mode)) < 0) {
        return real(path, mode);
    }
    int fd = ox_openat(AT_FDCWD, path, flags, 0666);
    if (fd < 0) {
        return NULL;
    }
    FILE *fp = ox_is_image_fd(fd) ? ox_cookie_stream(fd, mode) : REAL(fdopen)(fd, mode);
    if (!fp) {
        int e = errno;
        ox_close(fd);
        errno = e;
    }
    return fp;
}

OX_EXPORT FILE *fopen(const char *path, const char *mode)
{
    return do_fopen(path, mode, REAL(fopen));
}

OX_EXPORT FILE *fopen64(const char *path, const char *mode)
{
    return do_fopen(path, mode, REAL(fopen64));
}

OX_EXPORT FILE *fdopen(int fd, const char *mode)
{
    if (OX_ACTIVE() && ox_is_image_fd(fd)) {
        return ox_cookie_stream(fd, mode);
    }
    return REAL(fdopen)(fd, mode);
}

/* freopen onto an image: libc reopens the stream (keeping its descriptor
 * number), the descriptor becomes an image descriptor, and a std stream is
 * swapped for a cookie stream, which is returned. Another stream cannot be
 * turned into a cookie stream in place: the returned stream is a new one
 * (use freopen's return value). */
static FILE *do_freopen(const char *path, const char *mode, FILE *stream,
                        __typeof__(freopen) *real)
{
    if (!OX_ACTIVE() || !mode) {
        return real(path, mode, stream);
    }
    struct cookie *ck = find_cookie(stream);
    if (!path) {
        /* Mode change only: a cookie stream keeps its mode. */
        return ck ? stream : real(path, mode, stream);
    }
    struct stat st;
    struct ox_hdr h;
    int flags = mode_flags(mode);
    if (flags < 0 || REAL(stat)(path, &st) < 0 || !ox_probe_path(AT_FDCWD, path, 0, &st, &h)) {
        return real(path, mode, stream);
    }
    if (flags & O_TRUNC) {
        int tfd = ox_openat(AT_FDCWD, path, O_WRONLY | O_TRUNC | O_CLOEXEC, 0);
        if (tfd < 0) {
            return NULL;
        }
        ox_close(tfd);
    }
    const char *m = (flags & O_ACCMODE) == O_RDONLY ? "r" : "r+";
    int std = stream == stdin ? 0 : stream == stdout ? 1 : stream == stderr ? 2 : -1;
    if (ck) {
        fclose(stream);
        stream = NULL;
    }
    int fd = ox_openat(AT_FDCWD, path, flags & ~(O_TRUNC | O_CREAT | O_EXCL), 0);
    if (fd < 0) {
        return NULL;
    }
    if (std >= 0) {
        /* Keep the std descriptor number, as libc's freopen does. */
        if (fd != std) {
            dup2(fd, std);
            ox_close(fd);
            fd = std;
        }
        if (stream) {
            fflush(stream);
        }
        ox_std_streams_sync(std);
        return std == 0 ? stdin : std == 1 ? stdout : stderr;
    }
    if (stream) {
        real("/dev/null", m, stream); /* the old stream can no longer reach the image */
    }
    FILE *fp = ox_cookie_stream(fd, mode[0] == 'w' ? "r+" : mode);
    if (!fp) {
        ox_close(fd);
    }
    return fp;
}

OX_EXPORT FILE *freopen(const char *path, const char *mode, FILE *stream)
{
    return do_freopen(path, mode, stream, REAL(freopen));
}

OX_EXPORT FILE *freopen64(const char *path, const char *mode, FILE *stream)
{
    return do_freopen(path, mode, stream, REAL(freopen64));
}

/* ---- stdin, stdout, stderr ------------------------------------------------- */

OX_HIDDEN void ox_std_streams_sync(int fd)
{
    if (fd < 0 || fd > 2) {
        return;
    }
    FILE **slot = std_slot(fd);
    struct ox_fdent e;
    if (ox_lookup(fd, &e)) {
        if (cookie_std[fd] && *slot == cookie_std[fd]) {
            return;
        }
        const char *mode = fd == 0 ? (e.accmode == O_WRONLY ? "w" : "r")
                                   : (e.accmode == O_RDONLY ? "r" : "w");
        FILE *fp = ox_cookie_stream(fd, mode);
        if (!fp) {
            return;
        }
        /* Output libc's stream still buffers belongs to the descriptor as
         * it is now, the image: move it to the cookie stream, and drop it
         * from libc's stream, which would write it raw into the file. */
        FILE *old = *slot;
        if (old && old->_IO_write_base && old->_IO_write_ptr > old->_IO_write_base) {
            fwrite(old->_IO_write_base, 1, (size_t)(old->_IO_write_ptr - old->_IO_write_base), fp);
        }
        if (old) {
            __fpurge(old);
        }
        if (!cookie_std[fd]) {
            orig_std[fd] = *slot;
        }
        cookie_std[fd] = fp;
        *slot = fp;
        ox_log("%s is now a stream on the image", fd == 0 ? "stdin" : fd == 1 ? "stdout" : "stderr");
    } else if (cookie_std[fd] && *slot == cookie_std[fd]) {
        /* The descriptor is no image any more: back to libc's stream. */
        struct cookie *ck = find_cookie(cookie_std[fd]);
        fflush(cookie_std[fd]);
        if (ck) {
            ck->fd = -1;
        }
        *slot = orig_std[fd];
        cookie_std[fd] = NULL;
    }
}
