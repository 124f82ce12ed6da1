/*
 * core.c: start-up, the descriptor table, images and their handles, fork
 * and exit handling for liboxqcow-preload.so (see preload.h).
 */
#include "preload.h"

#include <limits.h>
#include <sys/ioctl.h>

#define OX_DEFINE_REAL(fn) OX_HIDDEN __typeof__(fn) *real_##fn;
OX_REAL_FUNCS(OX_DEFINE_REAL)
#undef OX_DEFINE_REAL

OX_HIDDEN __thread int ox_in_lib __attribute__((tls_model("initial-exec")));
OX_HIDDEN int ox_enabled = 1;
OX_HIDDEN int ox_debug;
OX_HIDDEN volatile int ox_nfds;
OX_HIDDEN unsigned ox_fork_gen;

static int cache_flags = BDRV_O_CACHE_WB;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static volatile int init_done;

/* Table: fd -> entry, grown on demand; images: a list, never freed. */
static pthread_rwlock_t tab_lock = PTHREAD_RWLOCK_INITIALIZER;
static struct ox_fdent *tab;
static int tab_cap;
static pthread_mutex_t img_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ox_img *imgs;

OX_HIDDEN void *ox_dlsym(const char *name)
{
    void *p = dlsym(RTLD_NEXT, name);
    if (!p) {
        /* A libc without this entry point: calls to it fail with ENOSYS. */
        static const char msg[] = "oxqcow-preload: missing libc symbol\n";
        (void)!write(2, msg, sizeof msg - 1);
    }
    return p;
}

static void vmsg(const char *fmt, va_list ap)
{
    char buf[1024];
    int n = snprintf(buf, sizeof buf, "oxqcow-preload: ");
    n += vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
    if (n >= (int)sizeof buf - 1) {
        n = (int)sizeof buf - 2;
    }
    buf[n++] = '\n';
    LIB_BEGIN();
    (void)!REAL(write)(2, buf, (size_t)n);
    LIB_END();
}

OX_HIDDEN void ox_log(const char *fmt, ...)
{
    if (!ox_debug) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vmsg(fmt, ap);
    va_end(ap);
}

OX_HIDDEN void ox_warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vmsg(fmt, ap);
    va_end(ap);
}

/* ---- the table ------------------------------------------------------------ */

OX_HIDDEN int ox_lookup(int fd, struct ox_fdent *out)
{
    if (ox_nfds == 0 || fd < 0) {
        return 0;
    }
    int found = 0;
    pthread_rwlock_rdlock(&tab_lock);
    if (fd < tab_cap && tab[fd].img) {
        *out = tab[fd];
        found = 1;
    }
    pthread_rwlock_unlock(&tab_lock);
    return found;
}

OX_HIDDEN int ox_is_image_fd(int fd)
{
    struct ox_fdent e;
    return ox_lookup(fd, &e);
}

static void img_close_if_unused(struct ox_img *im)
{
    pthread_rwlock_wrlock(&im->lock);
    pthread_rwlock_rdlock(&tab_lock);
    int refs = im->refs;
    pthread_rwlock_unlock(&tab_lock);
    if (refs == 0 && im->bs) {
        if (im->gen == ox_fork_gen) {
            LIB_BEGIN();
            bdrv_close(im->bs);
            bdrv_delete(im->bs);
            LIB_END();
            ox_log("closed %s", im->path);
        }
        /* else: the parent's handle, inherited by fork; the parent still
         * owns the image's state, so it is left alone (leaked). */
        im->bs = NULL;
        im->rw = 0;
        im->unflushed = 0;
    }
    pthread_rwlock_unlock(&im->lock);
}

OX_HIDDEN void ox_register(int fd, struct ox_img *img, int accmode)
{
    struct ox_img *old = NULL;
    pthread_rwlock_wrlock(&tab_lock);
    if (fd >= tab_cap) {
        int cap = tab_cap ? tab_cap : 64;
        while (cap <= fd) {
            cap *= 2;
        }
        LIB_BEGIN();
        struct ox_fdent *n = realloc(tab, (size_t)cap * sizeof *n);
        LIB_END();
        if (!n) {
            pthread_rwlock_unlock(&tab_lock);
            ox_warn("out of memory for descriptor %d", fd);
            return;
        }
        memset(n + tab_cap, 0, (size_t)(cap - tab_cap) * sizeof *n);
        tab = n;
        tab_cap = cap;
    }
    if (tab[fd].img) {
        old = tab[fd].img;
        old->refs--;
        ox_nfds--;
    }
    tab[fd].img = img;
    tab[fd].accmode = accmode;
    img->refs++;
    ox_nfds++;
    pthread_rwlock_unlock(&tab_lock);
    if (old && old->refs == 0) {
        img_close_if_unused(old);
    }
}

OX_HIDDEN void ox_unregister(int fd)
{
    if (ox_nfds == 0 || fd < 0) {
        return;
    }
    struct ox_img *im = NULL;
    pthread_rwlock_wrlock(&tab_lock);
    if (fd < tab_cap && tab[fd].img) {
        im = tab[fd].img;
        tab[fd].img = NULL;
        im->refs--;
        ox_nfds--;
    }
    int last = im && im->refs == 0;
    pthread_rwlock_unlock(&tab_lock);
    if (last) {
        img_close_if_unused(im);
    }
}

OX_HIDDEN void ox_unregister_range(unsigned first, unsigned last)
{
    pthread_rwlock_rdlock(&tab_lock);
    unsigned cap = (unsigned)tab_cap;
    pthread_rwlock_unlock(&tab_lock);
    for (unsigned fd = first; fd <= last && fd < cap && ox_nfds > 0; fd++) {
        ox_unregister((int)fd);
    }
}

/* ---- probing -------------------------------------------------------------- */

static uint64_t be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) {
        v = v << 8 | p[i];
    }
    return v;
}

static int parse_hdr(const unsigned char *b, ssize_t n, struct ox_hdr *h)
{
    if (n < 32 || memcmp(b, "QFI\xfb", 4) != 0) {
        return 0;
    }
    uint32_t version = (uint32_t)b[4] << 24 | (uint32_t)b[5] << 16 | (uint32_t)b[6] << 8 | b[7];
    if (version != 2 && version != 3) {
        return 0;
    }
    h->version = (int)version;
    h->backing_offset = be64(b + 8);
    h->size = be64(b + 24);
    return 1;
}

/* qcow2 headers are at least 72 bytes (version 2). */
#define MIN_IMAGE_SIZE 72

OX_HIDDEN int ox_probe_fd(int fd, int accmode, const struct stat *st, struct ox_hdr *h)
{
    if (!S_ISREG(st->st_mode) || st->st_size < MIN_IMAGE_SIZE) {
        return 0;
    }
    unsigned char b[32];
    ssize_t n;
    LIB_BEGIN();
    if (accmode != O_WRONLY) {
        n = REAL(pread64)(fd, b, sizeof b, 0);
    } else {
        char p[64];
        snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
        int rfd = REAL(open)(p, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        n = rfd < 0 ? -1 : REAL(pread64)(rfd, b, sizeof b, 0);
        if (rfd >= 0) {
            REAL(close)(rfd);
        }
    }
    LIB_END();
    return parse_hdr(b, n, h);
}

OX_HIDDEN int ox_probe_path(int dirfd, const char *path, int nofollow, struct stat *st,
                            struct ox_hdr *h)
{
    if (!S_ISREG(st->st_mode) || st->st_size < MIN_IMAGE_SIZE) {
        return 0;
    }
    int saved = errno;
    LIB_BEGIN();
    int fd = REAL(openat)(dirfd, path,
                          O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK | (nofollow ? O_NOFOLLOW : 0));
    unsigned char b[32];
    ssize_t n = -1;
    if (fd >= 0) {
        struct stat st2;
        if (REAL(fstat)(fd, &st2) == 0 && st2.st_dev == st->st_dev && st2.st_ino == st->st_ino) {
            n = REAL(pread64)(fd, b, sizeof b, 0);
        }
        REAL(close)(fd);
    }
    LIB_END();
    errno = saved;
    return parse_hdr(b, n, h);
}

/* ---- images --------------------------------------------------------------- */

OX_HIDDEN struct ox_img *ox_img_find(dev_t dev, ino_t ino)
{
    pthread_mutex_lock(&img_lock);
    struct ox_img *im = imgs;
    while (im && !(im->dev == dev && im->ino == ino)) {
        im = im->next;
    }
    pthread_mutex_unlock(&img_lock);
    return im;
}

static char *fd_path(int fd)
{
    char p[64], buf[PATH_MAX];
    snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(p, buf, sizeof buf - 1);
    if (n <= 0 || buf[0] != '/') {
        return strdup(p);
    }
    buf[n] = 0;
    if (n > 10 && strcmp(buf + n - 10, " (deleted)") == 0) {
        return strdup(p);
    }
    return strdup(buf);
}

/* Opens or reopens im->bs; caller holds im->lock for writing. */
static int img_open_locked(struct ox_img *im, int want_rw)
{
    if (im->bs && im->gen != ox_fork_gen) {
        /* Inherited from the parent by fork: open our own handle (read-only
         * first, so a dirty image the parent is writing is not repaired
         * under it) and leave the parent's state alone. */
        im->bs = NULL;
        im->rw = 0;
        im->unflushed = 0;
    }
    if (im->bs && (im->rw || !want_rw)) {
        return 0;
    }
    int flags = cache_flags | (want_rw ? BDRV_O_RDWR : 0);
    int r;
    LIB_BEGIN();
    if (!im->bs) {
        BlockDriverState *bs = bdrv_new("oxqcow-preload");
        r = bs ? bdrv_open(bs, im->path, flags, &bdrv_qcow2) : -ENOMEM;
        if (r == 0) {
            im->bs = bs;
        } else if (bs) {
            ox_warn("cannot open %s: %s", im->path, bdrv_last_error());
            bdrv_delete(bs);
        }
    } else {
        /* Upgrade to read-write: close and open again. */
        bdrv_close(im->bs);
        r = bdrv_open(im->bs, im->path, flags, &bdrv_qcow2);
        if (r < 0) {
            ox_warn("cannot open %s read-write: %s", im->path, bdrv_last_error());
            if (bdrv_open(im->bs, im->path, cache_flags, &bdrv_qcow2) < 0) {
                bdrv_delete(im->bs);
                im->bs = NULL;
            }
        }
    }
    LIB_END();
    if (r == 0) {
        im->rw = want_rw;
        im->gen = ox_fork_gen;
        ox_log("opened %s %s", im->path, want_rw ? "read-write" : "read-only");
    }
    return r;
}

OX_HIDDEN struct ox_img *ox_img_get(int fd, const struct stat *st, const struct ox_hdr *h,
                                    int want_rw)
{
    pthread_mutex_lock(&img_lock);
    struct ox_img *im = imgs;
    while (im && !(im->dev == st->st_dev && im->ino == st->st_ino)) {
        im = im->next;
    }
    if (!im) {
        LIB_BEGIN();
        im = calloc(1, sizeof *im);
        char *path = im ? fd_path(fd) : NULL;
        LIB_END();
        if (!im || !path) {
            free(im);
            pthread_mutex_unlock(&img_lock);
            errno = ENOMEM;
            return NULL;
        }
        im->dev = st->st_dev;
        im->ino = st->st_ino;
        im->path = path;
        pthread_rwlock_init(&im->lock, NULL);
        pthread_mutex_init(&im->pos_lock, NULL);
        im->next = imgs;
        imgs = im;
    }
    pthread_mutex_unlock(&img_lock);

    pthread_rwlock_wrlock(&im->lock);
    if (!im->bs) {
        /* The file may have been renamed since we last saw it. */
        LIB_BEGIN();
        char *path = fd_path(fd);
        LIB_END();
        if (path) {
            free(im->path);
            im->path = path;
        }
    }
    im->has_backing = h->backing_offset != 0;
    int r = img_open_locked(im, want_rw || im->rw);
    pthread_rwlock_unlock(&im->lock);
    if (r < 0) {
        errno = -r;
        return NULL;
    }
    return im;
}

OX_HIDDEN int ox_img_acquire(struct ox_img *im, int want_rw)
{
    for (;;) {
        pthread_rwlock_rdlock(&im->lock);
        if (im->bs && im->gen == ox_fork_gen && (im->rw || !want_rw)) {
            return 0;
        }
        pthread_rwlock_unlock(&im->lock);
        pthread_rwlock_wrlock(&im->lock);
        int r = img_open_locked(im, want_rw || (im->rw && im->gen == ox_fork_gen));
        pthread_rwlock_unlock(&im->lock);
        if (r < 0) {
            errno = -r;
            return -1;
        }
    }
}

OX_HIDDEN void ox_img_release(struct ox_img *im)
{
    pthread_rwlock_unlock(&im->lock);
}

static int fail(int r)
{
    errno = r == -ENOMEDIUM ? EBADF : -r;
    return -1;
}

OX_HIDDEN int64_t ox_img_size(struct ox_img *im)
{
    LIB_BEGIN();
    int64_t n = bdrv_getlength(im->bs);
    LIB_END();
    return n < 0 ? fail((int)n) : n;
}

#define IO_CHUNK (64 << 20)

OX_HIDDEN ssize_t ox_img_pread(struct ox_img *im, void *buf, size_t n, int64_t off)
{
    if (off < 0) {
        errno = EINVAL;
        return -1;
    }
    int64_t size = ox_img_size(im);
    if (size < 0) {
        return -1;
    }
    if (off >= size || n == 0) {
        return 0;
    }
    if ((uint64_t)n > (uint64_t)(size - off)) {
        n = (size_t)(size - off);
    }
    size_t done = 0;
    LIB_BEGIN();
    while (done < n) {
        int c = n - done > IO_CHUNK ? IO_CHUNK : (int)(n - done);
        int r = bdrv_pread(im->bs, off + (int64_t)done, (char *)buf + done, c);
        if (r < 0) {
            LIB_END();
            if (done > 0) {
                return (ssize_t)done;
            }
            return fail(r);
        }
        done += (size_t)c;
    }
    LIB_END();
    return (ssize_t)done;
}

OX_HIDDEN int ox_img_truncate(struct ox_img *im, int64_t size)
{
    /* QEMU keeps qcow2 virtual sizes in whole 512-byte sectors. */
    int64_t aligned = (size + BDRV_SECTOR_SIZE - 1) & ~(int64_t)(BDRV_SECTOR_SIZE - 1);
    LIB_BEGIN();
    int r = bdrv_truncate(im->bs, aligned);
    if (r < 0) {
        ox_warn("%s: resize to %lld: %s", im->path, (long long)aligned, bdrv_last_error());
    }
    LIB_END();
    if (r < 0) {
        return fail(r);
    }
    im->unflushed = 1;
    return 0;
}

OX_HIDDEN ssize_t ox_img_pwrite(struct ox_img *im, const void *buf, size_t n, int64_t off)
{
    if (off < 0) {
        errno = EINVAL;
        return -1;
    }
    if (n == 0) {
        return 0;
    }
    int64_t size = ox_img_size(im);
    if (size < 0) {
        return -1;
    }
    if ((uint64_t)off + n > (uint64_t)size && ox_img_truncate(im, off + (int64_t)n) < 0) {
        return -1;
    }
    size_t done = 0;
    LIB_BEGIN();
    while (done < n) {
        int c = n - done > IO_CHUNK ? IO_CHUNK : (int)(n - done);
        int r = bdrv_pwrite(im->bs, off + (int64_t)done, (const char *)buf + done, c);
        if (r < 0) {
            LIB_END();
            if (done > 0) {
                return (ssize_t)done;
            }
            return fail(r);
        }
        done += (size_t)c;
        im->unflushed = 1;
    }
    LIB_END();
    return (ssize_t)done;
}

OX_HIDDEN int ox_img_flush(struct ox_img *im)
{
    if (!im->rw) {
        return 0;
    }
    LIB_BEGIN();
    int r = bdrv_flush(im->bs);
    LIB_END();
    if (r < 0) {
        return fail(r);
    }
    im->unflushed = 0;
    return 0;
}

OX_HIDDEN int ox_img_zero(struct ox_img *im, int64_t off, int64_t len, int unmap)
{
    if (len <= 0) {
        return 0;
    }
    LIB_BEGIN();
    int r = bdrv_pwrite_zeroes(im->bs, off, len, unmap ? BDRV_REQ_MAY_UNMAP : 0);
    LIB_END();
    if (r < 0) {
        return fail(r);
    }
    im->unflushed = 1;
    return 0;
}

/* Unallocated ranges are holes (they read as zeros) unless a backing file
 * supplies them; allocated ranges, zero clusters included, are data. */
OX_HIDDEN int64_t ox_img_seek_data(struct ox_img *im, int64_t off, int hole)
{
    int64_t size = ox_img_size(im);
    if (size < 0) {
        return -1;
    }
    if (off < 0 || off >= size) {
        errno = ENXIO;
        return -1;
    }
    if (im->has_backing) {
        return hole ? size : off;
    }
    int64_t sector = off >> BDRV_SECTOR_BITS;
    int64_t end = (size + BDRV_SECTOR_SIZE - 1) >> BDRV_SECTOR_BITS;
    while (sector < end) {
        int pnum = 0;
        int64_t want = end - sector;
        LIB_BEGIN();
        int r = bdrv_is_allocated(im->bs, sector, want > INT_MAX ? INT_MAX : (int)want, &pnum);
        LIB_END();
        if (r < 0) {
            return fail(r);
        }
        if (pnum <= 0) {
            break;
        }
        if ((r == 1) != (hole != 0)) {
            int64_t at = sector << BDRV_SECTOR_BITS;
            return at > off ? at : off;
        }
        sector += pnum;
    }
    if (hole) {
        return size;
    }
    errno = ENXIO;
    return -1;
}

OX_HIDDEN void ox_flush_all(void)
{
    if (!init_done) {
        return;
    }
    pthread_mutex_lock(&img_lock);
    for (struct ox_img *im = imgs; im; im = im->next) {
        pthread_rwlock_wrlock(&im->lock);
        if (im->bs && im->rw && im->unflushed && im->gen == ox_fork_gen) {
            ox_img_flush(im);
        }
        pthread_rwlock_unlock(&im->lock);
    }
    pthread_mutex_unlock(&img_lock);
}

/* ---- fork ----------------------------------------------------------------- */

static void atfork_prepare(void)
{
    pthread_mutex_lock(&img_lock);
    for (struct ox_img *im = imgs; im; im = im->next) {
        /* Lock order everywhere: img_lock, pos_lock, lock, tab_lock. */
        pthread_mutex_lock(&im->pos_lock);
        pthread_rwlock_wrlock(&im->lock);
        if (im->bs && im->rw && im->unflushed && im->gen == ox_fork_gen) {
            ox_img_flush(im);
        }
    }
    pthread_rwlock_wrlock(&tab_lock);
}

static void atfork_parent(void)
{
    pthread_rwlock_unlock(&tab_lock);
    for (struct ox_img *im = imgs; im; im = im->next) {
        pthread_rwlock_unlock(&im->lock);
        pthread_mutex_unlock(&im->pos_lock);
    }
    pthread_mutex_unlock(&img_lock);
}

static void atfork_child(void)
{
    /* The child starts with one thread: fresh locks, and a new generation
     * so each image is reopened by the child on first use. */
    pthread_rwlock_init(&tab_lock, NULL);
    for (struct ox_img *im = imgs; im; im = im->next) {
        pthread_mutex_init(&im->pos_lock, NULL);
        pthread_rwlock_init(&im->lock, NULL);
    }
    pthread_mutex_init(&img_lock, NULL);
    ox_fork_gen++;
}

/* ---- start and exit ------------------------------------------------------- */

static int env_true(const char *name)
{
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0 && strcmp(v, "no") != 0 && strcmp(v, "off") != 0;
}

/* Descriptors inherited from the parent (shell redirections, exec after
 * fork) that refer to qcow2 images become image descriptors too; their
 * file offset is already the guest position. */
static void adopt_inherited(void)
{
    LIB_BEGIN();
    DIR *d = opendir("/proc/self/fd");
    LIB_END();
    if (!d) {
        return;
    }
    int dfd = dirfd(d);
    int fds[256], nfd = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL && nfd < 256) {
        char *end;
        long fd = strtol(de->d_name, &end, 10);
        if (*end == 0 && end != de->d_name && fd != dfd) {
            fds[nfd++] = (int)fd;
        }
    }
    LIB_BEGIN();
    closedir(d);
    LIB_END();
    for (int i = 0; i < nfd; i++) {
        int fd = fds[i];
        struct stat st;
        struct ox_hdr h;
        LIB_BEGIN();
        int fl = REAL(fcntl)(fd, F_GETFL);
        int ok = fl >= 0 && !(fl & O_PATH) && REAL(fstat)(fd, &st) == 0;
        LIB_END();
        if (!ok || !ox_probe_fd(fd, fl & O_ACCMODE, &st, &h)) {
            continue;
        }
        struct ox_img *im = ox_img_get(fd, &st, &h, 0);
        if (im) {
            ox_register(fd, im, fl & O_ACCMODE);
            ox_log("adopted inherited descriptor %d (%s)", fd, im->path);
        }
    }
    for (int fd = 0; fd <= 2; fd++) {
        ox_std_streams_sync(fd);
    }
}

static void do_init(void)
{
    if (env_true("OXQCOW_PRELOAD_DISABLE")) {
        ox_enabled = 0;
    }
    ox_debug = env_true("OXQCOW_PRELOAD_DEBUG");
    const char *cache = getenv("OXQCOW_PRELOAD_CACHE");
    if (cache && strcmp(cache, "writethrough") == 0) {
        cache_flags = 0;
    }
    init_done = 1;
    if (!ox_enabled) {
        return;
    }
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
    adopt_inherited();
}

OX_HIDDEN void ox_init(void)
{
    if (!init_done) {
        /* Our own calls during start-up pass through (ox_in_lib). */
        LIB_BEGIN();
        pthread_once(&init_once, do_init);
        LIB_END();
    }
}

__attribute__((constructor)) static void ox_constructor(void)
{
    ox_init();
}

/* At exit: flush stdio (cookie streams write through us), then close every
 * image so its metadata is written and the dirty bit cleared. */
__attribute__((destructor)) static void ox_destructor(void)
{
    if (!init_done || !ox_enabled) {
        return;
    }
    fflush(NULL);
    pthread_mutex_lock(&img_lock);
    for (struct ox_img *im = imgs; im; im = im->next) {
        pthread_rwlock_wrlock(&im->lock);
        if (im->bs && im->gen == ox_fork_gen) {
            LIB_BEGIN();
            bdrv_close(im->bs);
            bdrv_delete(im->bs);
            LIB_END();
            ox_log("closed %s at exit", im->path);
        }
        im->bs = NULL;
        im->rw = 0;
        pthread_rwlock_unlock(&im->lock);
    }
    pthread_mutex_unlock(&img_lock);
}
