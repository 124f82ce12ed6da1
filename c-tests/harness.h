/*
 * harness.h: the C test suite's tiny harness. Header-only.
 *
 * CHECK* macros count passes and failures (a failure prints file, line and
 * what differed, and the test goes on). h_finish() prints
 * "RESULT <name> <passed> <failed>" for c-tests/run.sh, which adds the
 * results of every program up. Helpers run qemu-img / qemu-io and the
 * header tool, build paths in the test directory ($OXQCOW_TEST_DIR),
 * collect the library's log lines, read numbers from qemu-img's JSON and
 * crash a writer process with SIGKILL.
 */
#ifndef OXQCOW_HARNESS_H
#define OXQCOW_HARNESS_H

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "block_int.h"

static int h_passed, h_failed, h_known;
static const char *h_name = "test";

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (cond) {                                                                   \
            h_passed++;                                                               \
        } else {                                                                      \
            h_failed++;                                                               \
            fprintf(stderr, "FAIL %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, \
                    #cond, bdrv_last_error());                                        \
        }                                                                             \
    } while (0)

/* A check of QEMU's exact behaviour that the engine does not meet yet: a
 * failure prints a KNOWN line (and is not counted as failed), a pass counts
 * as passed. h_finish() says how many there were. */
#define CHECK_KNOWN(cond, why)                                                        \
    do {                                                                          \
        if (cond) {                                                               \
            h_passed++;                                                           \
        } else {                                                                  \
            h_known++;                                                            \
            printf("KNOWN %s:%d: %s\n    (%s)\n", __FILE__, __LINE__, why, #cond); \
        }                                                                         \
    } while (0)

#define CHECK_INT(a, b)                                                                   \
    do {                                                                                  \
        long long h_a_ = (long long)(a), h_b_ = (long long)(b);                           \
        if (h_a_ == h_b_) {                                                               \
            h_passed++;                                                                   \
        } else {                                                                          \
            h_failed++;                                                                   \
            fprintf(stderr, "FAIL %s:%d: %s == %lld, expected %s == %lld (last error: %s)\n", \
                    __FILE__, __LINE__, #a, h_a_, #b, h_b_, bdrv_last_error());           \
        }                                                                                 \
    } while (0)

#define CHECK_STR(a, b)                                                              \
    do {                                                                             \
        const char *h_a_ = (a), *h_b_ = (b);                                         \
        if (h_a_ && h_b_ && strcmp(h_a_, h_b_) == 0) {                               \
            h_passed++;                                                              \
        } else {                                                                     \
            h_failed++;                                                              \
            fprintf(stderr, "FAIL %s:%d: %s\n    got:      \"%s\"\n    expected: \"%s\"\n", \
                    __FILE__, __LINE__, #a, h_a_ ? h_a_ : "(null)", h_b_ ? h_b_ : "(null)"); \
        }                                                                            \
    } while (0)

#define CHECK_MEM(a, b, n)                                                            \
    do {                                                                              \
        if (memcmp((a), (b), (n)) == 0) {                                             \
            h_passed++;                                                               \
        } else {                                                                      \
            h_failed++;                                                               \
            fprintf(stderr, "FAIL %s:%d: %s differs from %s\n", __FILE__, __LINE__, #a, #b); \
        }                                                                             \
    } while (0)

static inline void h_start(const char *name)
{
    h_name = name;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("== %s\n", name);
}

static inline int h_finish(void)
{
    if (h_known) {
        printf("-- %s: %d known difference(s) from QEMU (KNOWN lines above)\n", h_name, h_known);
    }
    printf("RESULT %s %d %d\n", h_name, h_passed, h_failed);
    return h_failed ? 1 : 0;
}

/* A path in the test directory, in one of 8 rotating static buffers. */
static inline const char *h_path(const char *fmt, ...)
{
    static char bufs[8][4096];
    static int next;
    char name[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof(name), fmt, ap);
    va_end(ap);
    const char *dir = getenv("OXQCOW_TEST_DIR");
    char *b = bufs[next++ % 8];
    snprintf(b, sizeof(bufs[0]), "%s/%s", dir && *dir ? dir : "/tmp", name);
    return b;
}

/* Runs a shell command; returns its exit status (or -1). */
static inline int h_sh(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    int r = system(cmd);
    if (r == -1 || !WIFEXITED(r)) {
        return -1;
    }
    return WEXITSTATUS(r);
}

/* Runs a shell command and returns its stdout (malloc()ed, NUL-terminated). */
static inline char *h_capture(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    FILE *p = popen(cmd, "r");
    if (!p) {
        return NULL;
    }
    size_t cap = 65536, len = 0, n;
    char *buf = malloc(cap);
    while (buf && (n = fread(buf + len, 1, cap - len - 1, p)) > 0) {
        len += n;
        if (len + 1 == cap) {
            char *nb = realloc(buf, cap *= 2);
            if (!nb) {
                free(buf);
                buf = NULL;
            }
            buf = nb;
        }
    }
    pclose(p);
    if (buf) {
        buf[len] = 0;
    }
    return buf;
}

/* The header tool (c-tests/qcow2tool), from $QCOW2TOOL. */
static inline const char *h_tool(void)
{
    const char *t = getenv("QCOW2TOOL");
    return t && *t ? t : "qcow2tool";
}

/* `qcow2tool <img> dump-header` output (malloc()ed). */
static inline char *h_dump(const char *img)
{
    return h_capture("'%s' '%s' dump-header", h_tool(), img);
}

/* 0 when `qemu-img check` finds the image clean; prints its output if not. */
static inline int h_qemu_check(const char *img)
{
    int r = h_sh("qemu-img check -q '%s' >/dev/null 2>&1", img);
    if (r != 0) {
        fprintf(stderr, "qemu-img check '%s' exited %d:\n", img, r);
        h_sh("qemu-img check '%s' >&2", img);
    }
    return r;
}

/* Reads the whole guest view of an image through qemu-img (converted to
 * raw) into a malloc()ed buffer of *len bytes. */
/* Reads a whole file (NULL if it cannot); its length goes to *len. */
static inline unsigned char *h_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static inline unsigned char *h_qemu_contents(const char *img, size_t *len)
{
    const char *raw = h_path("qemu-view-%d.raw", (int)getpid());
    if (h_sh("qemu-img convert -O raw '%s' '%s'", img, raw) != 0) {
        return NULL;
    }
    unsigned char *buf = h_read_file(raw, len);
    unlink(raw);
    return buf;
}

/* Checks an image with qemu-img and compares its guest contents, as qemu-img
 * reads them, with `model` (`len` bytes). */
static inline void h_verify_image(const char *img, const unsigned char *model, size_t len)
{
    CHECK_INT(h_qemu_check(img), 0);
    size_t n = 0;
    unsigned char *got = h_qemu_contents(img, &n);
    CHECK(got != NULL);
    if (got) {
        CHECK_INT(n, len);
        if (n == len) {
            CHECK_MEM(got, model, len);
        }
    }
    free(got);
}

/* Deterministic bytes for offset-dependent patterns. */
static inline void h_fill(unsigned char *buf, size_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = (unsigned char)x;
    }
}

/* The value of field `name` in a dump-header text, or -1. */
static inline long long h_dump_field(const char *dump, const char *name)
{
    size_t nl = strlen(name);
    for (const char *p = dump; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, name, nl) == 0 && p[nl] == ' ') {
            const char *v = p + nl;
            while (*v == ' ') {
                v++;
            }
            return strtoll(v, NULL, 0);
        }
    }
    return -1;
}

/* The text after the field name in a dump-header line (static buffer). */
static inline const char *h_dump_text(const char *dump, const char *name)
{
    static char out[256];
    size_t nl = strlen(name);
    for (const char *p = dump; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, name, nl) == 0 && p[nl] == ' ') {
            const char *v = p + nl;
            while (*v == ' ') {
                v++;
            }
            size_t n = strcspn(v, "\n");
            if (n >= sizeof(out)) {
                n = sizeof(out) - 1;
            }
            memcpy(out, v, n);
            out[n] = 0;
            return out;
        }
    }
    return "";
}

/* ---- the library's log lines (bdrv_set_log_callback) ---------------------------------- */

static char h_log_buf[1 << 16];
static size_t h_log_len;

static inline void h_log_cb(const char *msg, void *opaque)
{
    size_t n = strlen(msg);
    (void)opaque;
    if (h_log_len + n + 2 < sizeof(h_log_buf)) {
        memcpy(h_log_buf + h_log_len, msg, n);
        h_log_len += n;
        h_log_buf[h_log_len++] = '\n';
        h_log_buf[h_log_len] = 0;
    }
}

/* From now on the library's report lines collect in a buffer (one line
 * each, '\n'-terminated) instead of going to stderr. */
static inline void h_log_capture(void)
{
    h_log_len = 0;
    h_log_buf[0] = 0;
    bdrv_set_log_callback(h_log_cb, NULL);
}

/* The lines collected since h_log_capture(); stderr gets them again. */
static inline const char *h_log_release(void)
{
    bdrv_set_log_callback(NULL, NULL);
    return h_log_buf;
}

/* ---- qemu-img --output=json -------------------------------------------------------------- */

/* The number after the first `"key": ` in a JSON text, or -1. */
static inline long long h_json_int(const char *json, const char *key)
{
    char pat[256];
    snprintf(pat, sizeof(pat), "\"%s\": ", key);
    const char *p = json ? strstr(json, pat) : NULL;
    return p ? strtoll(p + strlen(pat), NULL, 0) : -1;
}

/* ---- crashing a writer ------------------------------------------------------------------ */

/* What 039 does with qemu-io's "sigraise 9": a child process opens `img`
 * read-write (BDRV_O_RDWR | `flags`; runtime options `opts`, NULL for
 * none), writes `len` bytes of `pattern` at `off`, tells the parent, and
 * the parent kills it with SIGKILL while the image is still open. Returns
 * 0 when the write succeeded and the child died of SIGKILL. */
static inline int h_crash_write(const char *img, const char *opts, int flags, int64_t off, int len,
                                int pattern)
{
    int fds[2];
    if (pipe(fds) != 0) {
        return -1;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        return -1;
    }
    if (pid == 0) {
        close(fds[0]);
        BlockDriverState *bs = bdrv_new("crash");
        unsigned char *buf = malloc((size_t)len);
        char ok = 'n';
        if (buf) {
            memset(buf, pattern, (size_t)len);
            if (bdrv_open_with_options(bs, img, BDRV_O_RDWR | flags, NULL, opts) == 0 &&
                bdrv_pwrite(bs, off, buf, len) == len) {
                ok = 'y';
            }
        }
        if (write(fds[1], &ok, 1) != 1) {
            _exit(3);
        }
        for (;;) {
            pause();
        }
    }
    close(fds[1]);
    char c = 0;
    ssize_t n = read(fds[0], &c, 1);
    close(fds[0]);
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    return n == 1 && c == 'y' && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL ? 0 : -1;
}

/* Copies a file (cp); 0 on success. */
static inline int h_copy(const char *from, const char *to)
{
    return h_sh("cp '%s' '%s'", from, to);
}

#endif /* OXQCOW_HARNESS_H */
