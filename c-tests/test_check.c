/*
 * test_check: bdrv_check() against `qemu-img check` on the same damaged
 * images (section 4.3 of ../shared/qcow2-format.md).
 *
 * Each damage is made by poking the file (a refcount, an L2 entry, a
 * header bit) or by compressed and scattered writes. Then, on the image
 * and on a copy of it:
 *   - bdrv_check(fix = 0) on a read-only handle vs `qemu-img check
 *     --output=json`: the report lines (log callback vs qemu-img's stderr),
 *     every counter (corruptions, leaks, check_errors, image_end_offset,
 *     the bfi cluster statistics) and the exit status qemu-img derives
 *     from them (0, 1 check errors, 2 corruptions, 3 leaks);
 *   - bdrv_check(BDRV_FIX_LEAKS / | BDRV_FIX_ERRORS) on a BDRV_O_RDWR |
 *     BDRV_O_CHECK handle, then a second bdrv_check(0) (qemu-img's double
 *     check), vs `qemu-img check -r leaks|all --output=json` on the copy:
 *     the lines, the fixed counts, the counters after the repair, and then
 *     the same header dump, file size and contents.
 */
#include "harness.h"

#define MiB (1024 * 1024)
#define KiB 1024
#define CS 65536

static int n_img;

/* ---- poking the file ---------------------------------------------------------------------- */

static uint64_t peek(const char *img, long off, int size)
{
    unsigned char b[8] = {0};
    FILE *f = fopen(img, "rb");
    uint64_t v = 0;
    CHECK(f != NULL);
    if (f) {
        CHECK(fseek(f, off, SEEK_SET) == 0 && fread(b, 1, (size_t)size, f) == (size_t)size);
        fclose(f);
    }
    for (int i = 0; i < size; i++) {
        v = v << 8 | b[i];
    }
    return v;
}

static void poke(const char *img, long off, int size, uint64_t v)
{
    unsigned char b[8];
    for (int i = size - 1; i >= 0; i--, v >>= 8) {
        b[i] = (unsigned char)v;
    }
    FILE *f = fopen(img, "r+b");
    CHECK(f != NULL);
    if (f) {
        CHECK(fseek(f, off, SEEK_SET) == 0 && fwrite(b, 1, (size_t)size, f) == (size_t)size);
        fclose(f);
    }
}

/* Where the 16-bit refcount of host cluster `c` lives (first refcount block). */
static long refcount_at(const char *img, uint64_t c)
{
    uint64_t rt = peek(img, 48, 8);
    uint64_t rb = peek(img, (long)rt, 8) & 0x00fffffffffffe00ull;
    return (long)(rb + 2 * c);
}

/* Where the L2 entry of guest cluster `gc` (< 8192) lives. */
static long l2_entry_at(const char *img, uint64_t gc)
{
    uint64_t l1 = peek(img, 40, 8);
    uint64_t l2 = peek(img, (long)l1, 8) & 0x00fffffffffffe00ull;
    return (long)(l2 + 8 * gc);
}

/* A fresh 1 MiB compat=1.1 image with `n` clusters of data written from 0. */
static const char *image_with_data(int n)
{
    const char *img = h_path("check-%d.qcow2", ++n_img);
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=1.1", MiB, 0), 0);
    BlockDriverState *bs = bdrv_new("check");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL), 0);
    unsigned char *buf = malloc((size_t)n * CS);
    h_fill(buf, (size_t)n * CS, (uint64_t)n_img);
    if (n > 0) {
        CHECK_INT(bdrv_pwrite(bs, 0, buf, n * CS), n * CS);
    }
    free(buf);
    bdrv_delete(bs);
    return img;
}

/* ---- the comparison ---------------------------------------------------------------------- */

static long long json0(const char *json, const char *key)
{
    long long v = h_json_int(json, key);
    return v < 0 ? 0 : v; /* qemu-img leaves out counters that are 0 */
}

static int exit_status(const BdrvCheckResult *r)
{
    return r->check_errors ? 1 : r->corruptions ? 2 : r->leaks ? 3 : 0;
}

static void same_counters(const BdrvCheckResult *r, const char *json)
{
    CHECK(json != NULL && strstr(json, "\"image-end-offset\"") != NULL);
    CHECK_INT(r->corruptions, json0(json, "corruptions"));
    CHECK_INT(r->leaks, json0(json, "leaks"));
    CHECK_INT(r->check_errors, json0(json, "check-errors"));
    CHECK_INT(r->image_end_offset, h_json_int(json, "image-end-offset"));
    CHECK_INT(r->bfi.allocated_clusters, json0(json, "allocated-clusters"));
    CHECK_INT(r->bfi.total_clusters, h_json_int(json, "total-clusters"));
    CHECK_INT(r->bfi.fragmented_clusters, json0(json, "fragmented-clusters"));
    CHECK_INT(r->bfi.compressed_clusters, json0(json, "compressed-clusters"));
}

/* `qemu-img check ARGS --output=json img`: stdout in *json, stderr returned. */
static char *qemu_check_json(const char *img, const char *args, char **json, int *status)
{
    char *st = h_capture("qemu-img check %s --output=json '%s' >'%s.json' 2>'%s.err'; echo $?", args, img, img,
                         img);
    *status = st ? atoi(st) : -1;
    free(st);
    *json = h_capture("cat '%s.json'", img);
    return h_capture("cat '%s.err'", img);
}

/* bdrv_check(0) vs qemu-img check on `img`. Returns the result. */
static BdrvCheckResult compare_check(const char *img, const char *what)
{
    printf("-- check: %s\n", what);
    BlockDriverState *bs = bdrv_new("check");
    BdrvCheckResult r;
    memset(&r, 0, sizeof(r));
    CHECK_INT(bdrv_open(bs, img, BDRV_O_CHECK, NULL), 0);
    h_log_capture();
    CHECK_INT(bdrv_check(bs, &r, 0), 0);
    const char *lines = h_log_release();
    bdrv_delete(bs);
    char *json;
    int st;
    char *qlines = qemu_check_json(img, "", &json, &st);
    CHECK_STR(lines, qlines);
    same_counters(&r, json);
    CHECK_INT(exit_status(&r), st);
    CHECK_INT(r.corruptions_fixed + r.leaks_fixed, 0);
    free(json);
    free(qlines);
    return r;
}

/* bdrv_check(fix) + double check vs qemu-img check -r on a copy. */
static BdrvCheckResult compare_repair(const char *img, int fix, const char *what)
{
    const char *arg = fix == BDRV_FIX_LEAKS ? "-r leaks" : "-r all";
    printf("-- repair (%s): %s\n", arg, what);
    char copy[4200];
    snprintf(copy, sizeof(copy), "%s.qemu", img);
    CHECK_INT(h_copy(img, copy), 0);

    BlockDriverState *bs = bdrv_new("check");
    BdrvCheckResult r, r2;
    memset(&r, 0, sizeof(r));
    memset(&r2, 0, sizeof(r2));
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_CHECK, NULL), 0);
    h_log_capture();
    int ret = bdrv_check(bs, &r, fix);
    static char lines[1 << 16];
    snprintf(lines, sizeof(lines), "%s", h_log_release());
    char err[4096];
    snprintf(err, sizeof(err), "%s", bdrv_last_error());
    if (ret == 0) {
        CHECK_INT(bdrv_check(bs, &r2, 0), 0);
    }
    bdrv_delete(bs);

    char *json;
    int st;
    char *qlines = qemu_check_json(copy, arg, &json, &st);
    if (st == 1 && strstr(json, "image-end-offset") == NULL) {
        /* qemu-img: "Check failed": our check fails too (-EIO). */
        CHECK_INT(ret, -EIO);
        CHECK(strlen(err) > 0);
        CHECK(strncmp(qlines, lines, strlen(lines)) == 0); /* then its "qemu-img: Check failed" */
        CHECK(strstr(qlines, "Check failed") != NULL);
    } else {
        CHECK_INT(ret, 0);
        /* qemu-img prints the repair lines, then the double check's. */
        CHECK(strncmp(qlines, lines, strlen(lines)) == 0);
        CHECK_INT(r.leaks_fixed, json0(json, "leaks-fixed"));
        CHECK_INT(r.corruptions_fixed, json0(json, "corruptions-fixed"));
        same_counters(&r2, json);
        CHECK_INT(exit_status(&r2), st);
        /* One call's remaining counts are the double check's. */
        CHECK_INT(r.corruptions, r2.corruptions);
        CHECK_INT(r.leaks, r2.leaks);
    }
    free(json);
    free(qlines);
    char *d1 = h_dump(img), *d2 = h_dump(copy);
    CHECK_STR(d1, d2);
    free(d1);
    free(d2);
    struct stat s1, s2;
    CHECK(stat(img, &s1) == 0 && stat(copy, &s2) == 0 && s1.st_size == s2.st_size);
    CHECK_INT(h_sh("qemu-img compare -q '%s' '%s'", img, copy), 0);
    return r;
}

/* ---- the damages -------------------------------------------------------------------------- */

static void test_clean(void)
{
    const char *img = image_with_data(3);
    BdrvCheckResult r = compare_check(img, "clean image");
    CHECK_INT(r.bfi.allocated_clusters, 3);
    CHECK_INT(r.bfi.total_clusters, 16);
    r = compare_repair(img, BDRV_FIX_LEAKS | BDRV_FIX_ERRORS, "clean image");
    CHECK_INT(r.leaks_fixed + r.corruptions_fixed, 0);
}

static void test_leak(void)
{
    /* A cluster past the end of the used area with refcount 1: a leak. */
    const char *img = image_with_data(1);
    struct stat st;
    CHECK(stat(img, &st) == 0);
    uint64_t c = (uint64_t)st.st_size / CS;
    CHECK_INT(truncate(img, (off_t)(c + 1) * CS), 0);
    poke(img, refcount_at(img, c), 2, 1);
    BdrvCheckResult r = compare_check(img, "leaked cluster");
    CHECK_INT(r.leaks, 1);
    CHECK_INT(r.corruptions, 0);
    r = compare_repair(img, BDRV_FIX_LEAKS, "leaked cluster");
    CHECK_INT(r.leaks_fixed, 1);
    CHECK_INT(r.leaks, 0);
}

static void test_refcount_too_high(void)
{
    /* A data cluster with refcount 2: a leak and a wrong COPIED flag. */
    const char *img = image_with_data(2);
    uint64_t host = peek(img, l2_entry_at(img, 1), 8) & 0x00fffffffffffe00ull;
    poke(img, refcount_at(img, host / CS), 2, 2);
    BdrvCheckResult r = compare_check(img, "refcount 2 on a data cluster");
    CHECK_INT(r.leaks, 1);
    CHECK_INT(r.corruptions, 1);
    char again[4200];
    snprintf(again, sizeof(again), "%s.again", img);
    CHECK_INT(h_copy(img, again), 0);
    compare_repair(img, BDRV_FIX_LEAKS, "refcount 2 on a data cluster");
    r = compare_repair(again, BDRV_FIX_LEAKS | BDRV_FIX_ERRORS, "refcount 2 on a data cluster");
    CHECK_INT(r.leaks_fixed, 1);
    CHECK_INT(r.corruptions + r.leaks, 0);
}

static void test_refcount_too_low(void)
{
    /* A data cluster with refcount 0 on a clean image: corruptions. */
    const char *img = image_with_data(2);
    uint64_t host = peek(img, l2_entry_at(img, 0), 8) & 0x00fffffffffffe00ull;
    poke(img, refcount_at(img, host / CS), 2, 0);
    BdrvCheckResult r = compare_check(img, "refcount 0 on a data cluster");
    CHECK_INT(r.corruptions, 2); /* the refcount and the COPIED flag */
    char again[4200];
    snprintf(again, sizeof(again), "%s.again", img);
    CHECK_INT(h_copy(img, again), 0);
    /* -r leaks cannot rebuild the refcount structure: the check fails. */
    compare_repair(img, BDRV_FIX_LEAKS, "refcount 0 on a data cluster");
    r = compare_repair(again, BDRV_FIX_LEAKS | BDRV_FIX_ERRORS, "refcount 0 on a data cluster");
    CHECK(r.corruptions_fixed > 0);
    CHECK_INT(r.corruptions, 0);
}

static void test_copied_flag(void)
{
    /* The COPIED flag cleared on an L2 entry with refcount 1. */
    const char *img = image_with_data(2);
    long at = l2_entry_at(img, 1);
    poke(img, at, 8, peek(img, at, 8) & ~(1ull << 63));
    BdrvCheckResult r = compare_check(img, "COPIED flag missing");
    CHECK_INT(r.corruptions, 1);
    r = compare_repair(img, BDRV_FIX_LEAKS | BDRV_FIX_ERRORS, "COPIED flag missing");
    CHECK_INT(r.corruptions_fixed, 1);
}

static void test_past_eof(void)
{
    /* An L2 entry pointing far past the end of the file. QEMU counts the
     * reference as a corruption and also reports the entry's COPIED flag
     * (refcount 0); the engine counts a check error and stops there. */
    const char *img = image_with_data(2);
    poke(img, l2_entry_at(img, 1), 8, (1ull << 63) | 0x10000000ull);
    printf("-- check: data cluster past the end of the file\n");
    BlockDriverState *bs = bdrv_new("check");
    BdrvCheckResult r;
    CHECK_INT(bdrv_open(bs, img, BDRV_O_CHECK, NULL), 0);
    h_log_capture();
    CHECK_INT(bdrv_check(bs, &r, 0), 0);
    const char *lines = h_log_release();
    bdrv_delete(bs);
    char *json;
    int st;
    char *qlines = qemu_check_json(img, "", &json, &st);
    CHECK(exit_status(&r) != 0 && st != 0);
    CHECK(strstr(lines, "ERROR: counting reference for region exceeding the end of the file by one cluster "
                        "or more: offset 0x10000000 size 0x10000\n") == lines);
    CHECK_INT(r.leaks, json0(json, "leaks"));
    CHECK_INT(r.bfi.allocated_clusters, json0(json, "allocated-clusters"));
    /* A reference past the end of the file: a corruption, and its COPIED
     * flag checked, as QEMU counts them. */
    CHECK_STR(lines, qlines);
    CHECK_INT(r.corruptions, json0(json, "corruptions"));
    CHECK_INT(r.check_errors, json0(json, "check-errors"));
    CHECK_INT(exit_status(&r), st);
    free(json);
    free(qlines);
}

static void test_corrupt_bit(void)
{
    /* The corrupt bit on a consistent image: read-write opens are refused,
     * BDRV_O_CHECK opens it, a repair clears it (QEMU's mark_consistent). */
    const char *img = image_with_data(1);
    CHECK_INT(h_sh("'%s' '%s' set-feature-bit incompatible 1", h_tool(), img), 0);
    BlockDriverState *bs = bdrv_new("check");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), -EACCES);
    CHECK(strstr(bdrv_last_error(), "qcow2: Image is corrupt; cannot be opened read/write") != NULL);
    CHECK_INT(bdrv_open(bs, img, 0, NULL), 0); /* read-only works */
    bdrv_delete(bs);
    compare_check(img, "corrupt bit");
    compare_repair(img, BDRV_FIX_LEAKS | BDRV_FIX_ERRORS, "corrupt bit");
    char *dump = h_dump(img);
    CHECK_STR(h_dump_text(dump, "incompatible_features"), "[]");
    free(dump);
}

static void test_statistics(void)
{
    /* Fragmented and compressed clusters: the bfi counters. */
    const char *img = h_path("check-%d.qcow2", ++n_img);
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=1.1", 4 * MiB, 0), 0);
    BlockDriverState *bs = bdrv_new("check");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL), 0);
    unsigned char *buf = malloc(CS);
    for (int i = 0; i < 8; i++) {
        int gc = (i * 5) % 16; /* scattered order: fragments */
        h_fill(buf, CS, (uint64_t)gc);
        CHECK_INT(bdrv_pwrite(bs, (int64_t)gc * CS, buf, CS), CS);
    }
    memset(buf, 'z', CS);
    for (int gc = 40; gc < 44; gc++) {
        CHECK_INT(bdrv_write_compressed(bs, (int64_t)gc * (CS / 512), buf, CS / 512), 0);
    }
    free(buf);
    bdrv_delete(bs);
    BdrvCheckResult r = compare_check(img, "fragmented and compressed clusters");
    CHECK_INT(r.bfi.allocated_clusters, 12);
    CHECK_INT(r.bfi.compressed_clusters, 4);
    CHECK(r.bfi.fragmented_clusters > 0);
    CHECK_INT(r.bfi.total_clusters, 64);
}

int main(void)
{
    h_start("test_check");
    test_clean();
    test_leak();
    test_refcount_too_high();
    test_refcount_too_low();
    test_copied_flag();
    test_past_eof();
    test_corrupt_bit();
    test_statistics();
    return h_finish();
}
