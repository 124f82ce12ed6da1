/*
 * preload_calls: runs under LD_PRELOAD=liboxqcow-preload.so and makes the
 * same calls on a qcow2 image and on a raw file holding the same guest
 * contents (which the shim passes through), checking both give the same
 * results. A plain POSIX program: it knows nothing of liboxqcow.
 *
 *   preload_calls IMAGE.qcow2 TWIN.raw SCRATCH_DIR
 *
 * Afterwards the caller compares `qemu-img convert -O raw IMAGE` with TWIN.
 * Prints "RESULT preload_calls <passed> <failed>".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

int __fxstat(int ver, int fd, struct stat *st);
int __xstat(int ver, const char *path, struct stat *st);

static int passed, failed;

#define CHECK(c)                                                                       \
    do {                                                                               \
        if (c) {                                                                       \
            passed++;                                                                  \
        } else {                                                                       \
            failed++;                                                                  \
            fprintf(stderr, "FAIL %s:%d: %s (errno %d %s)\n", __FILE__, __LINE__, #c, \
                    errno, strerror(errno));                                           \
        }                                                                              \
    } while (0)

#define CHECK_EQ(a, b)                                                                        \
    do {                                                                                      \
        long long a_ = (long long)(a), b_ = (long long)(b);                                   \
        if (a_ == b_) {                                                                       \
            passed++;                                                                         \
        } else {                                                                              \
            failed++;                                                                         \
            fprintf(stderr, "FAIL %s:%d: %s = %lld, %s = %lld (errno %d)\n", __FILE__,        \
                    __LINE__, #a, a_, #b, b_, errno);                                         \
        }                                                                                     \
    } while (0)

static const char *img_path, *raw_path, *dir;

static void fill(unsigned char *b, size_t n, unsigned seed)
{
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        b[i] = (unsigned char)x;
    }
}

static off_t fsize(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 ? st.st_size : -1;
}

/* Reads both files whole (through the shim) and compares them. */
static void compare_all(int a, int b, const char *when)
{
    off_t na = fsize(a), nb = fsize(b);
    CHECK_EQ(na, nb);
    if (na != nb || na <= 0) {
        return;
    }
    unsigned char *ba = malloc((size_t)na), *bb = malloc((size_t)nb);
    ssize_t ra = pread(a, ba, (size_t)na, 0), rb = pread(b, bb, (size_t)nb, 0);
    CHECK_EQ(ra, na);
    CHECK_EQ(rb, nb);
    int same = ra == rb && memcmp(ba, bb, (size_t)na) == 0;
    if (!same) {
        fprintf(stderr, "contents differ %s\n", when);
    }
    CHECK(same);
    free(ba);
    free(bb);
}

/* The same read through both descriptors gives the same bytes and count. */
#define SAME_READ(call_a, call_b, buf_a, buf_b, n)                          \
    do {                                                                    \
        memset(buf_a, 0x55, n);                                             \
        memset(buf_b, 0x55, n);                                             \
        ssize_t ra_ = (call_a), rb_ = (call_b);                             \
        CHECK_EQ(ra_, rb_);                                                 \
        CHECK(ra_ < 0 || memcmp(buf_a, buf_b, (size_t)ra_) == 0);           \
    } while (0)

static void test_stat(int fi, int fr)
{
    struct stat si, sr, sp;
    CHECK(fstat(fi, &si) == 0 && fstat(fr, &sr) == 0);
    CHECK_EQ(si.st_size, sr.st_size);
    CHECK(stat(img_path, &sp) == 0);
    CHECK_EQ(sp.st_size, sr.st_size);
    CHECK_EQ(sp.st_ino, si.st_ino); /* real descriptor of the image file */
    CHECK(lstat(img_path, &sp) == 0);
    CHECK_EQ(sp.st_size, sr.st_size);
    CHECK(fstatat(AT_FDCWD, img_path, &sp, 0) == 0);
    CHECK_EQ(sp.st_size, sr.st_size);
    CHECK(fstatat(fi, "", &sp, AT_EMPTY_PATH) == 0);
    CHECK_EQ(sp.st_size, sr.st_size);
    struct stat64 s64;
    CHECK(fstat64(fi, &s64) == 0);
    CHECK_EQ(s64.st_size, sr.st_size);
    CHECK(stat64(img_path, &s64) == 0);
    CHECK_EQ(s64.st_size, sr.st_size);
    CHECK(__fxstat(1, fi, &sp) == 0);
    CHECK_EQ(sp.st_size, sr.st_size);
    CHECK(__xstat(1, img_path, &sp) == 0);
    CHECK_EQ(sp.st_size, sr.st_size);
    struct statx sx;
    CHECK(statx(AT_FDCWD, img_path, 0, STATX_SIZE, &sx) == 0);
    CHECK_EQ(sx.stx_size, sr.st_size);
    CHECK(statx(fi, "", AT_EMPTY_PATH, STATX_SIZE, &sx) == 0);
    CHECK_EQ(sx.stx_size, sr.st_size);
    /* A symlink to the image: stat follows it, lstat describes the link. */
    char link[4096];
    snprintf(link, sizeof link, "%s/link.qcow2", dir);
    unlink(link);
    CHECK(symlink(img_path, link) == 0);
    CHECK(stat(link, &sp) == 0);
    CHECK_EQ(sp.st_size, sr.st_size);
    CHECK(lstat(link, &sp) == 0 && S_ISLNK(sp.st_mode));
    unlink(link);
}

static void test_read_family(int fi, int fr)
{
    enum { N = 300000 };
    unsigned char *a = malloc(N), *b = malloc(N);
    off_t size = fsize(fr);

    CHECK_EQ(lseek(fi, 12345, SEEK_SET), lseek(fr, 12345, SEEK_SET));
    SAME_READ(read(fi, a, 70000), read(fr, b, 70000), a, b, 70000);
    CHECK_EQ(lseek(fi, 0, SEEK_CUR), lseek(fr, 0, SEEK_CUR));
    SAME_READ(pread(fi, a, N, 65536 - 7), pread(fr, b, N, 65536 - 7), a, b, N);
    SAME_READ(pread64(fi, a, 4096, size - 100), pread64(fr, b, 4096, size - 100), a, b, 4096);
    SAME_READ(pread(fi, a, 4096, size + 5), pread(fr, b, 4096, size + 5), a, b, 4096);
    CHECK_EQ(lseek(fi, 0, SEEK_CUR), lseek(fr, 0, SEEK_CUR)); /* pread leaves it */

    struct iovec va[3] = {{a, 1000}, {a + 1000, 0}, {a + 1000, 50000}};
    struct iovec vb[3] = {{b, 1000}, {b + 1000, 0}, {b + 1000, 50000}};
    SAME_READ(readv(fi, va, 3), readv(fr, vb, 3), a, b, 51000);
    SAME_READ(preadv(fi, va, 3, 1 << 20), preadv(fr, vb, 3, 1 << 20), a, b, 51000);
    SAME_READ(preadv2(fi, va, 3, 4097, 0), preadv2(fr, vb, 3, 4097, 0), a, b, 51000);
    SAME_READ(preadv2(fi, va, 3, -1, 0), preadv2(fr, vb, 3, -1, 0), a, b, 51000);
    CHECK_EQ(lseek(fi, 0, SEEK_CUR), lseek(fr, 0, SEEK_CUR));

    CHECK_EQ(lseek(fi, -10, SEEK_END), lseek(fr, -10, SEEK_END));
    SAME_READ(read(fi, a, 100), read(fr, b, 100), a, b, 100);
    SAME_READ(read(fi, a, 100), read(fr, b, 100), a, b, 100); /* EOF: 0 */
    CHECK(lseek(fi, -1, SEEK_SET) == -1 && errno == EINVAL);
    free(a);
    free(b);
}

static void test_write_family(int fi, int fr)
{
    enum { N = 200000 };
    unsigned char *w = malloc(N);
    fill(w, N, 1);
    CHECK_EQ(lseek(fi, 3000, SEEK_SET), lseek(fr, 3000, SEEK_SET));
    CHECK_EQ(write(fi, w, 5000), write(fr, w, 5000));
    CHECK_EQ(lseek(fi, 0, SEEK_CUR), lseek(fr, 0, SEEK_CUR));
    fill(w, N, 2);
    CHECK_EQ(pwrite(fi, w, N, 65536 * 5 - 1), pwrite(fr, w, N, 65536 * 5 - 1));
    fill(w, N, 3);
    CHECK_EQ(pwrite64(fi, w, 512, 7 << 20), pwrite64(fr, w, 512, 7 << 20));
    fill(w, N, 4);
    struct iovec v[3] = {{w, 100}, {w + 100, 0}, {w + 100, 70000}};
    CHECK_EQ(writev(fi, v, 3), writev(fr, v, 3));
    CHECK_EQ(pwritev(fi, v, 3, 2 << 20), pwritev(fr, v, 3, 2 << 20));
    CHECK_EQ(pwritev2(fi, v, 3, 3 << 20, 0), pwritev2(fr, v, 3, 3 << 20, 0));
    CHECK_EQ(pwritev2(fi, v, 3, -1, 0), pwritev2(fr, v, 3, -1, 0));
    CHECK_EQ(lseek(fi, 0, SEEK_CUR), lseek(fr, 0, SEEK_CUR));
    CHECK_EQ(fsync(fi), 0);
    CHECK_EQ(fdatasync(fi), 0);
    compare_all(fi, fr, "after writes");

    /* A read-only descriptor refuses writes, a write-only one reads. */
    int ro = open(img_path, O_RDONLY);
    CHECK(ro >= 0);
    CHECK(write(ro, w, 10) == -1 && errno == EBADF);
    close(ro);
    int wo = open(img_path, O_WRONLY);
    CHECK(wo >= 0);
    CHECK(read(wo, w, 10) == -1 && errno == EBADF);
    close(wo);

    /* O_APPEND writes at the guest end (and grows the guest). */
    int ai = open(img_path, O_WRONLY | O_APPEND), ar = open(raw_path, O_WRONLY | O_APPEND);
    CHECK(ai >= 0 && ar >= 0);
    fill(w, N, 5);
    CHECK_EQ(write(ai, w, 1024), write(ar, w, 1024));
    close(ai);
    close(ar);
    CHECK_EQ(fsize(fi), fsize(fr));
    free(w);
}

static void test_dup(int fi, int fr)
{
    unsigned char a[4096], b[4096];
    int di = dup(fi), dr = dup(fr);
    CHECK(di >= 0 && dr >= 0);
    CHECK_EQ(lseek(fi, 777, SEEK_SET), lseek(fr, 777, SEEK_SET));
    SAME_READ(read(di, a, 4096), read(dr, b, 4096), a, b, 4096); /* shared position */
    CHECK_EQ(lseek(fi, 0, SEEK_CUR), 777 + 4096);
    int d2 = dup2(fi, 100);
    CHECK_EQ(d2, 100);
    int d3 = dup3(fi, 101, O_CLOEXEC);
    CHECK_EQ(d3, 101);
    int d4 = fcntl(fi, F_DUPFD, 200), d5 = fcntl(fi, F_DUPFD_CLOEXEC, 300);
    CHECK(d4 >= 200 && d5 >= 300);
    SAME_READ(pread(d4, a, 4096, 9999), pread(fr, b, 4096, 9999), a, b, 4096);
    SAME_READ(pread(d5, a, 4096, 19999), pread(fr, b, 4096, 19999), a, b, 4096);
    SAME_READ(pread(100, a, 4096, 29999), pread(fr, b, 4096, 29999), a, b, 4096);
    SAME_READ(pread(101, a, 4096, 39999), pread(fr, b, 4096, 39999), a, b, 4096);
    /* dup2 of a plain file over an image descriptor makes it plain again. */
    CHECK_EQ(dup2(fr, 100), 100);
    SAME_READ(pread(100, a, 4096, 0), pread(fr, b, 4096, 0), a, b, 4096);
    struct stat st;
    CHECK(fstat(100, &st) == 0 && st.st_size == fsize(fr));
    close(di);
    close(dr);
    close(100);
    close(101);
    close(d4);
    close(d5);
    /* The original still works after its copies are closed. */
    SAME_READ(pread(fi, a, 4096, 50000), pread(fr, b, 4096, 50000), a, b, 4096);
}

static void test_seek_data(int fi)
{
    off_t size = fsize(fi);
    /* Guest layout set up by the caller: data at [0, 1M), holes after
     * except where the tests above wrote. Walk the map both ways. */
    off_t d = lseek(fi, 0, SEEK_DATA);
    CHECK_EQ(d, 0);
    off_t h = lseek(fi, 0, SEEK_HOLE);
    CHECK(h > 0 && h <= size);
    CHECK_EQ(lseek(fi, 0, SEEK_CUR), h);
    off_t nd = lseek(fi, h, SEEK_DATA);
    CHECK(nd == -1 ? errno == ENXIO : nd > h);
    CHECK(lseek(fi, size, SEEK_DATA) == -1 && errno == ENXIO);
    CHECK(lseek(fi, size, SEEK_HOLE) == -1 && errno == ENXIO);
    /* Every byte in a reported hole reads as zero. */
    unsigned char buf[65536];
    off_t pos = 0;
    int holes_zero = 1, rounds = 0;
    while (pos < size && rounds++ < 64) {
        off_t hs = lseek(fi, pos, SEEK_HOLE);
        if (hs < 0 || hs >= size) {
            break;
        }
        off_t he = lseek(fi, hs, SEEK_DATA);
        if (he < 0) {
            he = size;
        }
        for (off_t o = hs; o < he; o += (off_t)sizeof buf) {
            size_t n = (size_t)(he - o < (off_t)sizeof buf ? he - o : (off_t)sizeof buf);
            if (pread(fi, buf, n, o) != (ssize_t)n) {
                holes_zero = 0;
                break;
            }
            for (size_t i = 0; i < n; i++) {
                holes_zero &= buf[i] == 0;
            }
        }
        pos = he;
    }
    CHECK(holes_zero);
}

static void test_size_changes(int fi, int fr)
{
    off_t size = fsize(fr);
    CHECK_EQ(ftruncate(fi, size + (1 << 20)), ftruncate(fr, size + (1 << 20)));
    CHECK_EQ(fsize(fi), fsize(fr));
    CHECK_EQ(ftruncate64(fi, size), ftruncate64(fr, size));
    CHECK_EQ(fsize(fi), size);
    /* Punch a hole across cluster boundaries: reads as zeros afterwards. */
    CHECK_EQ(fallocate(fi, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 60000, 200000),
             fallocate(fr, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 60000, 200000));
    CHECK_EQ(fallocate(fi, FALLOC_FL_ZERO_RANGE, 3 << 20, 5000),
             fallocate(fr, FALLOC_FL_ZERO_RANGE, 3 << 20, 5000));
    /* Allocation past the end grows the guest, KEEP_SIZE does not. */
    CHECK_EQ(fallocate(fi, 0, size, 65536), fallocate(fr, 0, size, 65536));
    CHECK_EQ(fsize(fi), fsize(fr));
    CHECK_EQ(fallocate(fi, FALLOC_FL_KEEP_SIZE, fsize(fi), 65536), 0);
    CHECK_EQ(posix_fallocate(fi, 0, fsize(fi) + 512), posix_fallocate(fr, 0, fsize(fr) + 512));
    CHECK_EQ(fsize(fi), fsize(fr));
    CHECK(fallocate(fi, FALLOC_FL_COLLAPSE_RANGE, 0, 65536) == -1 && errno == EOPNOTSUPP);
    compare_all(fi, fr, "after size changes");
    /* Path truncate. */
    CHECK_EQ(truncate(img_path, size), truncate(raw_path, size));
    CHECK_EQ(fsize(fi), size);
}

static void test_stdio(int fr)
{
    unsigned char a[70000], b[70000];
    FILE *f = fopen(img_path, "rb");
    CHECK(f != NULL);
    if (!f) {
        return;
    }
    CHECK(fileno(f) >= 0);
    struct stat st;
    CHECK(fstat(fileno(f), &st) == 0 && st.st_size == fsize(fr));
    CHECK(fseeko(f, 100000, SEEK_SET) == 0);
    CHECK_EQ(fread(a, 1, sizeof a, f), sizeof a);
    CHECK_EQ(pread(fr, b, sizeof b, 100000), (ssize_t)sizeof b);
    CHECK(memcmp(a, b, sizeof a) == 0);
    CHECK_EQ(ftello(f), 100000 + (off_t)sizeof a);
    CHECK(fseeko(f, 0, SEEK_END) == 0 && ftello(f) == fsize(fr));
    fclose(f);

    /* Write through a stream, read back through another. */
    FILE *w = fopen64(img_path, "r+");
    FILE *wr = fopen(raw_path, "r+");
    CHECK(w && wr);
    if (w && wr) {
        fill(a, sizeof a, 9);
        fseek(w, 4444, SEEK_SET);
        fseek(wr, 4444, SEEK_SET);
        CHECK_EQ(fwrite(a, 1, sizeof a, w), fwrite(a, 1, sizeof a, wr));
        CHECK_EQ(fprintf(w, "hello %d", 42), fprintf(wr, "hello %d", 42));
        CHECK(fclose(w) == 0);
        CHECK(fclose(wr) == 0);
    }
    int fd = open(img_path, O_RDONLY);
    FILE *d = fdopen(fd, "r");
    CHECK(d != NULL);
    if (d) {
        CHECK(fseek(d, 4444, SEEK_SET) == 0);
        CHECK_EQ(fread(b, 1, sizeof a, d), sizeof a);
        CHECK(memcmp(a, b, sizeof a) == 0);
        char s[16] = {0};
        CHECK(fread(s, 1, 8, d) == 8 && strcmp(s, "hello 42") == 0);
        CHECK_EQ(fileno(d), fd);
        fclose(d);
    }
    /* freopen onto stdin: stdin reads the guest; so does descriptor 0. */
    FILE *in = freopen(img_path, "r", stdin);
    CHECK(in != NULL);
    if (in) {
        CHECK_EQ(fileno(stdin), 0);
        CHECK(fseek(stdin, 4444, SEEK_SET) == 0);
        CHECK_EQ(fread(b, 1, 1000, stdin), 1000);
        CHECK(memcmp(a, b, 1000) == 0);
        CHECK_EQ(pread(0, b, 1000, 4444), 1000);
        CHECK(memcmp(a, b, 1000) == 0);
        fclose(stdin);
    }
    /* A file that is not an image still opens as a plain stream. */
    char p[4096];
    snprintf(p, sizeof p, "%s/plain.txt", dir);
    FILE *pl = fopen(p, "w");
    CHECK(pl && fprintf(pl, "plain\n") == 6 && fclose(pl) == 0);
    pl = fopen(p, "r");
    char line[16] = {0};
    CHECK(pl && fgets(line, sizeof line, pl) && strcmp(line, "plain\n") == 0);
    if (pl) {
        fclose(pl);
    }
}

static void test_copy(int fi, int fr)
{
    char p[4096], q[4096];
    snprintf(p, sizeof p, "%s/copy-out.raw", dir);
    snprintf(q, sizeof q, "%s/copy-ref.raw", dir);
    int o = open(p, O_RDWR | O_CREAT | O_TRUNC, 0644);
    int r = open(q, O_RDWR | O_CREAT | O_TRUNC, 0644);
    CHECK(o >= 0 && r >= 0);
    /* copy_file_range out of the image (with and without offsets). */
    off64_t in_off = 1000, out_off = 0;
    ssize_t n = copy_file_range(fi, &in_off, o, &out_off, 300000, 0);
    CHECK_EQ(n, 300000);
    CHECK_EQ(in_off, 301000);
    CHECK_EQ(lseek(fi, 0, SEEK_SET), 0);
    ssize_t m = copy_file_range(fi, NULL, o, NULL, 100000, 0);
    CHECK_EQ(m, 100000);
    CHECK_EQ(lseek(fi, 0, SEEK_CUR), 100000);
    off64_t rin = 1000, rout = 0;
    CHECK_EQ(copy_file_range(fr, &rin, r, &rout, 300000, 0), 300000);
    lseek(fr, 0, SEEK_SET);
    CHECK_EQ(copy_file_range(fr, NULL, r, NULL, 100000, 0), 100000);
    compare_all(o, r, "copy_file_range out");
    /* sendfile out of the image. */
    off_t so = 5 << 20;
    CHECK_EQ(sendfile(o, fi, &so, 65536 * 3), 65536 * 3);
    off_t sr = 5 << 20;
    CHECK_EQ(sendfile(r, fr, &sr, 65536 * 3), 65536 * 3);
    compare_all(o, r, "sendfile out");
    /* copy_file_range into the image. */
    off64_t a = 0, b = 6 << 20;
    CHECK_EQ(copy_file_range(o, &a, fi, &b, 150000, 0), 150000);
    a = 0;
    b = 6 << 20;
    CHECK_EQ(copy_file_range(o, &a, fr, &b, 150000, 0), 150000);
    compare_all(fi, fr, "copy_file_range in");
    /* splice from the image into a pipe and from a pipe into a plain file. */
    int pp[2];
    CHECK(pipe(pp) == 0);
    off64_t si = 2 << 20;
    ssize_t sn = splice(fi, &si, pp[1], NULL, 60000, 0);
    CHECK_EQ(sn, 60000);
    CHECK_EQ(si, (2 << 20) + 60000);
    unsigned char sa[60000], sb[60000];
    CHECK_EQ(read(pp[0], sa, sizeof sa), 60000);
    CHECK_EQ(pread(fr, sb, sizeof sb, 2 << 20), 60000);
    CHECK(memcmp(sa, sb, sizeof sa) == 0);
    CHECK_EQ(write(pp[1], sa, 1000), 1000);
    off64_t so2 = 8 << 20;
    CHECK_EQ(splice(pp[0], NULL, fi, &so2, 1000, 0), 1000);
    CHECK_EQ(pwrite(fr, sa, 1000, 8 << 20), 1000);
    close(pp[0]);
    close(pp[1]);
    compare_all(fi, fr, "splice");
    /* Reflinks of the qcow2 bytes are refused, so cp falls back to copying. */
    CHECK(ioctl(o, FICLONE, fi) == -1 && errno == EOPNOTSUPP);
    close(o);
    close(r);
}

static void test_mmap(int fi)
{
    errno = 0;
    void *p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fi, 0);
    CHECK(p == MAP_FAILED && errno == ENODEV);
    void *q = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(q != MAP_FAILED);
    munmap(q, 4096);
}

static void test_fork(int fi, int fr)
{
    CHECK_EQ(lseek(fi, 123456, SEEK_SET), 123456);
    pid_t pid = fork();
    if (pid == 0) {
        /* The child reads through the inherited descriptor, position
         * shared with the parent. */
        unsigned char a[8192], b[8192];
        int ok = read(fi, a, sizeof a) == (ssize_t)sizeof a &&
                 pread(fr, b, sizeof b, 123456) == (ssize_t)sizeof b &&
                 memcmp(a, b, sizeof a) == 0;
        struct stat st;
        ok = ok && fstat(fi, &st) == 0 && st.st_size == fsize(fr);
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK_EQ(lseek(fi, 0, SEEK_CUR), 123456 + 8192);
    /* The parent keeps working after the fork. */
    unsigned char a[4096], b[4096];
    SAME_READ(pread(fi, a, 4096, 3000), pread(fr, b, 4096, 3000), a, b, 4096);

    /* fork + exec: a program started on an inherited image descriptor
     * (as stdin) reads the guest from the shared position. */
    char out[2048], cmd[8192];
    snprintf(out, sizeof out, "%s/exec-out.raw", dir);
    lseek(fi, 65536, SEEK_SET);
    pid = fork();
    if (pid == 0) {
        dup2(fi, 0);
        int o = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(o, 1);
        execlp("head", "head", "-c", "100000", (char *)NULL);
        _exit(127);
    }
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    snprintf(cmd, sizeof cmd,
             "OXQCOW_PRELOAD_DISABLE=1 cmp -s -n 100000 -i 0:65536 '%s' '%s'", out, raw_path);
    CHECK_EQ(system(cmd), 0);
}

/* Threads sharing one image descriptor: positioned writes to interleaved
 * slices of the same clusters, then reads, all at once. */
struct thr {
    int fd, idx;
    int ok;
};

static void *thread_body(void *p)
{
    struct thr *t = p;
    unsigned char w[3000], r[3000];
    t->ok = 1;
    for (int round = 0; round < 40; round++) {
        off_t off = (off_t)(16 << 20) + (off_t)round * 4 * 3000 + t->idx * 3000;
        fill(w, sizeof w, (unsigned)(t->idx * 100 + round));
        if (pwrite(t->fd, w, sizeof w, off) != (ssize_t)sizeof w ||
            pread(t->fd, r, sizeof r, off) != (ssize_t)sizeof r || memcmp(w, r, sizeof w) != 0) {
            t->ok = 0;
        }
    }
    return NULL;
}

static void test_threads(int fi, int fr)
{
    pthread_t th[4];
    struct thr t[4];
    for (int i = 0; i < 4; i++) {
        t[i].fd = fi;
        t[i].idx = i;
        CHECK(pthread_create(&th[i], NULL, thread_body, &t[i]) == 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK(t[i].ok);
    }
    for (int i = 0; i < 4; i++) {
        t[i].fd = fr;
        thread_body(&t[i]);
    }
    compare_all(fi, fr, "after threads");
}

/* A child redirects its stdout onto the file with dup2 while stdio still
 * buffers output, then writes more: all of it lands in the guest (at the
 * descriptor's position) exactly as it lands in the raw file. */
static int stdout_child(const char *path)
{
    pid_t pid = fork();
    if (pid == 0) {
        static char buf[8192];
        setvbuf(stdout, buf, _IOFBF, sizeof buf);
        printf("buffered before dup2;");
        int fd = open(path, O_WRONLY);
        lseek(fd, 777777, SEEK_SET);
        dup2(fd, 1);
        close(fd);
        printf("after dup2 %d;", 42);
        fflush(stdout);
        fwrite("tail", 1, 4, stdout);
        exit(0);
    }
    int status = 0;
    return pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) ? WEXITSTATUS(status)
                                                                            : -1;
}

static void test_stdout_redirect(int fi, int fr)
{
    fflush(stdout);
    CHECK_EQ(stdout_child(img_path), 0);
    CHECK_EQ(stdout_child(raw_path), 0);
    compare_all(fi, fr, "after redirecting stdout");
    char b[64] = {0};
    CHECK(pread(fi, b, 39, 777777) == 39 && memcmp(b, "buffered before dup2;after dup2 42;tail", 39) == 0);
}

static void test_trunc_open(void)
{
    /* O_TRUNC on an image empties the guest, not the file; writes grow it. */
    char p[2048], cmd[8192];
    snprintf(p, sizeof p, "%s/trunc.qcow2", dir);
    snprintf(cmd, sizeof cmd, "OXQCOW_PRELOAD_DISABLE=1 qemu-img create -q -f qcow2 '%s' 4M", p);
    CHECK_EQ(system(cmd), 0);
    int fd = open(p, O_RDWR | O_TRUNC);
    CHECK(fd >= 0);
    CHECK_EQ(fsize(fd), 0);
    CHECK_EQ(write(fd, "grown", 5), 5);
    CHECK_EQ(fsize(fd), 512); /* qcow2 sizes are whole sectors */
    close(fd);
    int c = creat(p, 0644);
    CHECK(c >= 0);
    CHECK_EQ(fsize(c), 0);
    close(c);
    snprintf(cmd, sizeof cmd,
             "OXQCOW_PRELOAD_DISABLE=1 qemu-img check -q '%s' && "
             "OXQCOW_PRELOAD_DISABLE=1 qemu-img info '%s' | grep -q '^virtual size: 0 B'",
             p, p);
    CHECK_EQ(system(cmd), 0);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s IMAGE TWIN SCRATCH_DIR\n", argv[0]);
        return 2;
    }
    img_path = argv[1];
    raw_path = argv[2];
    dir = argv[3];
    setvbuf(stdout, NULL, _IOLBF, 0);
    int fi = open(img_path, O_RDWR);
    int fr = open(raw_path, O_RDWR);
    CHECK(fi >= 0 && fr >= 0);
    if (fi < 0 || fr < 0) {
        printf("RESULT preload_calls %d %d\n", passed, failed);
        return 1;
    }
    test_stat(fi, fr);
    test_read_family(fi, fr);
    test_seek_data(fi);
    test_write_family(fi, fr);
    test_dup(fi, fr);
    test_size_changes(fi, fr);
    test_copy(fi, fr);
    test_mmap(fi);
    test_threads(fi, fr);
    test_fork(fi, fr);
    test_stdio(fr);
    test_stdout_redirect(fi, fr);
    test_trunc_open();
    compare_all(fi, fr, "at the end");
    CHECK_EQ(close(fi), 0);
    CHECK_EQ(close(fr), 0);
    printf("RESULT preload_calls %d %d\n", passed, failed);
    return failed ? 1 : 0;
}
