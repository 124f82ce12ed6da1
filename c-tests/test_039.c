/*
 * test_039: port of qemu-iotests 039 (lazy refcounts and the dirty bit;
 * sections 4.1-4.3 and 8 of ../shared/qcow2-format.md) through the C ABI.
 *
 * A "crash" is a writer process that opens the image read-write
 * (writethrough, as 039 runs qemu-io), writes 512 bytes of 0x5a at offset
 * 0 and is killed with SIGKILL while the image is open (039's
 * `sigraise 9`). Two writers crash images here: a child of this program
 * using the library (fork + kill), and qemu-io itself. QEMU's crashed
 * image has exactly 039.out's damage: the dirty bit set and
 *     ERROR cluster 5 refcount=0 reference=1
 *     ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0
 * ("2 errors were found on the image.", exit 2); its repair prints
 * "ERROR cluster 5 ...", "Rebuilding refcount structure", "Repairing
 * cluster 1 refcount=1 reference=0", "Repairing cluster 2 refcount=1
 * reference=0" and counts 1 corruption fixed, 0 leaks.
 *
 * For every crashed image, ours and QEMU's: bdrv_check's lines (through
 * the log callback) and counters equal `qemu-img check`'s on the same
 * image (lines on stderr, counters from --output=json); the repair by
 * bdrv_check(BDRV_FIX_ERRORS | BDRV_FIX_LEAKS), and by a read-write
 * bdrv_open(), prints what `qemu-img check -r all` / qemu-io print on a
 * copy and leaves the same header and contents. On QEMU's crashed image
 * the lines and counters are also 039.out's exactly. Our own writer's
 * crash is held to 039.out with CHECK_KNOWN: an engine that allocates the
 * data cluster before its L2 table, or leaves a new L2 table's refcount
 * unwritten with lazy refcounts (QEMU's l2_allocate allocates the table
 * first and flushes the refcount cache), shows clusters 4 and 5 with 4
 * errors there, reported as KNOWN lines rather than failures.
 *
 * Sections, in 039's order: clean after a normal close; dirty after a
 * crash; read-only access works and keeps the bit; repair; data readable
 * after the repair; a read-write open repairs; lazy_refcounts=off never
 * sets the bit; the runtime option lazy-refcounts=on|off
 * (bdrv_open_with_options) overrides the image either way. (039's "commit
 * to a backing file" needs bdrv_commit, which this ABI does not have.)
 */
#include "harness.h"

#define MiB (1024 * 1024)
#define SIZE (128 * MiB)

static const char *ERR_LINES =
    "ERROR cluster 5 refcount=0 reference=1\n"
    "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0\n";

static const char *REPAIR_LINES =
    "ERROR cluster 5 refcount=0 reference=1\n"
    "Rebuilding refcount structure\n"
    "Repairing cluster 1 refcount=1 reference=0\n"
    "Repairing cluster 2 refcount=1 reference=0\n";

static const char *WHY =
    "the engine allocates the data cluster before its L2 table and leaves a "
    "lazy L2 table's refcount unwritten (QEMU: L2 first, refcounts flushed)";

static void create(const char *img, const char *opts)
{
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, opts, SIZE, 0), 0);
}

/* 039's crash done by QEMU: qemu-io writes and raises SIGKILL. */
static void qemu_crash(const char *img, const char *runtime)
{
    if (runtime) {
        h_sh("qemu-io -t writethrough -c 'write -P 0x5a 0 512' -c 'sigraise 9' "
             "--image-opts driver=qcow2,file.filename=%s,%s >/dev/null 2>&1",
             img, runtime);
    } else {
        h_sh("qemu-io -t writethrough -c 'write -P 0x5a 0 512' -c 'sigraise 9' '%s' >/dev/null 2>&1", img);
    }
}

static const char *incompat(const char *img)
{
    static char out[64];
    char *dump = h_dump(img);
    snprintf(out, sizeof(out), "%s", h_dump_text(dump, "incompatible_features"));
    free(dump);
    return out;
}

/* `qemu-img check ARGS img`: its output without the statistics lines that
 * iotests filter out, and its exit status. */
static char *qemu_check(const char *img, const char *args, int *status)
{
    char *out = h_capture("qemu-img check %s '%s' > '%s.out' 2>&1; echo $?", args, img, img);
    *status = out ? atoi(out) : -1;
    free(out);
    return h_capture("grep -v -e ' allocated, ' -e '^Image end offset: ' '%s.out'", img);
}

/* What `qemu-img check` prints on stderr (its finding and repair lines). */
static char *qemu_check_lines(const char *img, const char *args)
{
    return h_capture("qemu-img check %s '%s' 2>&1 >/dev/null", args, img);
}

static long long json0(const char *json, const char *key)
{
    long long v = h_json_int(json, key);
    return v < 0 ? 0 : v; /* qemu-img leaves out counters that are 0 */
}

/* bdrv_check's counters equal qemu-img check --output=json's. */
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

static void read_pattern(BlockDriverState *bs, int pattern)
{
    unsigned char buf[512], want[512];
    memset(want, pattern, sizeof(want));
    CHECK_INT(bdrv_pread(bs, 0, buf, sizeof(buf)), (int)sizeof(buf));
    CHECK_MEM(buf, want, sizeof(buf));
}

static void same_image(const char *a, const char *b)
{
    char *d1 = h_dump(a), *d2 = h_dump(b);
    CHECK_STR(d1, d2);
    free(d1);
    free(d2);
    struct stat s1, s2;
    CHECK(stat(a, &s1) == 0 && stat(b, &s2) == 0 && s1.st_size == s2.st_size);
    CHECK_INT(h_sh("qemu-img compare -q '%s' '%s'", a, b), 0);
}

static void test_clean_on_shutdown(void)
{
    const char *img = h_path("t039.qcow2");
    printf("== Checking that image is clean on shutdown ==\n");
    create(img, "compat=1.1,lazy_refcounts=on");
    BlockDriverState *bs = bdrv_new("t039");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    unsigned char buf[512];
    memset(buf, 0x5a, sizeof(buf));
    CHECK_INT(bdrv_pwrite(bs, 0, buf, sizeof(buf)), (int)sizeof(buf));
    BlockDriverInfo bdi;
    CHECK_INT(bdrv_get_info(bs, &bdi), 0);
    CHECK(bdi.is_dirty && bdi.flags == BLOCK_FLAG_LAZY_REFCOUNTS);
    CHECK_STR(incompat(img), "[0]"); /* dirty while open */
    bdrv_close(bs);
    CHECK_STR(incompat(img), "[]"); /* 039.out: incompatible_features 0x0 */
    int st;
    char *out = qemu_check(img, "", &st);
    CHECK_STR(out, "No errors were found on the image.\n");
    CHECK_INT(st, 0);
    free(out);
    /* bdrv_check agrees, and prints nothing. */
    CHECK_INT(bdrv_open(bs, img, 0, NULL), 0);
    BdrvCheckResult r;
    h_log_capture();
    CHECK_INT(bdrv_check(bs, &r, 0), 0);
    CHECK_STR(h_log_release(), "");
    char *json = h_capture("qemu-img check --output=json '%s'", img);
    same_counters(&r, json);
    free(json);
    CHECK_INT(r.corruptions + r.leaks + r.check_errors, 0);
    CHECK_INT(r.bfi.allocated_clusters, 1);
    CHECK_INT(r.bfi.total_clusters, SIZE / 65536);
    bdrv_delete(bs);
}

/* The dirty, read-only, repair and data sections on one crashed image.
 * `exact`: QEMU made the crash, so 039.out's values must hold exactly. */
static void dirty_repair(const char *img, int exact, const char *tag)
{
    const char *qcopy = h_path("t039-%s-qemu.qcow2", tag);
    int st;
    static char want[1 << 17];
    printf("== Creating a dirty image file (%s) ==\n", tag);
    CHECK_STR(incompat(img), "[0]"); /* 039.out: 0x1 */
    char *out = qemu_check(img, "", &st);
    CHECK_INT(st, 2);
    snprintf(want, sizeof(want),
             "%s\n2 errors were found on the image.\n"
             "Data may be corrupted, or further writes to the image may corrupt it.\n",
             ERR_LINES);
    if (exact) {
        CHECK_STR(out, want);
    } else {
        CHECK(out && strstr(out, "errors were found on the image.") != NULL);
        CHECK_KNOWN(out && strcmp(out, want) == 0, WHY);
    }
    free(out);

    /* bdrv_check, read-only: qemu-img check's lines and counters. */
    BlockDriverState *bs = bdrv_new("t039");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_CHECK, NULL), 0);
    BdrvCheckResult r;
    h_log_capture();
    CHECK_INT(bdrv_check(bs, &r, 0), 0);
    const char *lines = h_log_release();
    char *qlines = qemu_check_lines(img, "");
    CHECK_STR(lines, qlines);
    free(qlines);
    char *json = h_capture("qemu-img check --output=json '%s' 2>/dev/null", img);
    same_counters(&r, json);
    free(json);
    CHECK(r.corruptions > 0);
    CHECK_INT(r.leaks + r.check_errors + r.corruptions_fixed + r.leaks_fixed, 0);
    if (exact) {
        CHECK_STR(lines, ERR_LINES);
        CHECK_INT(r.corruptions, 2);
    } else {
        CHECK_KNOWN(strcmp(lines, ERR_LINES) == 0 && r.corruptions == 2, WHY);
    }
    /* Repairing needs a writable handle. */
    CHECK_INT(bdrv_check(bs, &r, BDRV_FIX_ERRORS | BDRV_FIX_LEAKS), -EACCES);
    bdrv_close(bs);

    printf("== Read-only access must still work (%s) ==\n", tag);
    CHECK_INT(bdrv_open(bs, img, 0, NULL), 0);
    read_pattern(bs, 0x5a);
    BlockDriverInfo bdi;
    CHECK_INT(bdrv_get_info(bs, &bdi), 0);
    CHECK(bdi.is_dirty);
    CHECK_INT(bdrv_pwrite(bs, 0, "x", 1), -EACCES);
    bdrv_close(bs);
    CHECK_STR(incompat(img), "[0]");

    printf("== Repairing the image file must succeed (%s) ==\n", tag);
    CHECK_INT(h_copy(img, qcopy), 0);
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_CHECK, NULL), 0);
    CHECK_INT(bdrv_get_info(bs, &bdi), 0);
    CHECK(bdi.is_dirty); /* BDRV_O_CHECK: opened as it is */
    h_log_capture();
    CHECK_INT(bdrv_check(bs, &r, BDRV_FIX_ERRORS | BDRV_FIX_LEAKS), 0);
    lines = h_log_release();
    CHECK_INT(r.leaks_fixed, 0);
    CHECK_INT(r.corruptions + r.leaks + r.check_errors, 0);
    if (exact) {
        CHECK_STR(lines, REPAIR_LINES);
        CHECK_INT(r.corruptions_fixed, 1); /* 039.out: "1 corruptions" */
    } else {
        CHECK(r.corruptions_fixed > 0);
        CHECK_KNOWN(strcmp(lines, REPAIR_LINES) == 0 && r.corruptions_fixed == 1, WHY);
    }
    /* qemu-img check -r all on the copy: the same lines and counts. */
    out = qemu_check(qcopy, "-r all", &st);
    CHECK_INT(st, 0);
    snprintf(want, sizeof(want),
             "%sThe following inconsistencies were found and repaired:\n\n"
             "    %d leaked clusters\n    %d corruptions\n\n"
             "Double checking the fixed image now...\nNo errors were found on the image.\n",
             lines, r.leaks_fixed, r.corruptions_fixed);
    CHECK_STR(out, want);
    free(out);
    /* "Double checking the fixed image now..." */
    BdrvCheckResult r2;
    h_log_capture();
    CHECK_INT(bdrv_check(bs, &r2, 0), 0);
    CHECK_STR(h_log_release(), "");
    CHECK_INT(r2.corruptions + r2.leaks + r2.check_errors, 0);
    CHECK_INT(bdrv_get_info(bs, &bdi), 0);
    CHECK(!bdi.is_dirty);
    CHECK_STR(incompat(img), "[]"); /* cleared by the repair, as QEMU does */
    bdrv_close(bs);
    CHECK_STR(incompat(img), "[]"); /* 039.out: 0x0 */
    json = h_capture("qemu-img check --output=json '%s'", qcopy);
    same_counters(&r2, json);
    free(json);
    same_image(img, qcopy);

    printf("== Data should still be accessible after repair (%s) ==\n", tag);
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    read_pattern(bs, 0x5a);
    bdrv_close(bs);
    unsigned char *model = calloc(1, SIZE);
    memset(model, 0x5a, 512);
    h_verify_image(img, model, SIZE);
    free(model);
    bdrv_delete(bs);
}

static void test_dirty_and_repair(void)
{
    const char *ours = h_path("t039-ours.qcow2");
    const char *theirs = h_path("t039-theirs.qcow2");
    create(ours, "compat=1.1,lazy_refcounts=on");
    CHECK_INT(h_crash_write(ours, NULL, 0, 0, 512, 0x5a), 0);
    dirty_repair(ours, 0, "library writer");
    create(theirs, "compat=1.1,lazy_refcounts=on");
    qemu_crash(theirs, NULL);
    dirty_repair(theirs, 1, "qemu-io writer");
}

/* A read-write open repairs; the same as qemu-io does on a copy. */
static void rw_open_repairs(const char *img, int exact, const char *tag)
{
    const char *qcopy = h_path("t039-open-%s-qemu.qcow2", tag);
    printf("== Opening a dirty image read/write should repair it (%s) ==\n", tag);
    CHECK_STR(incompat(img), "[0]");
    CHECK_INT(h_copy(img, qcopy), 0);

    BlockDriverState *bs = bdrv_new("t039");
    h_log_capture();
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    const char *lines = h_log_release();
    if (exact) {
        CHECK_STR(lines, REPAIR_LINES);
    } else {
        CHECK(strstr(lines, "Rebuilding refcount structure\n") != NULL);
        CHECK_KNOWN(strcmp(lines, REPAIR_LINES) == 0, WHY);
    }
    BlockDriverInfo bdi;
    CHECK_INT(bdrv_get_info(bs, &bdi), 0);
    CHECK(!bdi.is_dirty);
    CHECK_STR(incompat(img), "[]"); /* clean right after the repair */
    read_pattern(bs, 0x5a);
    unsigned char buf[512];
    memset(buf, 0xcd, sizeof(buf)); /* qemu-io's default write pattern */
    CHECK_INT(bdrv_pwrite(bs, 0, buf, sizeof(buf)), (int)sizeof(buf));
    bdrv_close(bs);
    bdrv_delete(bs);
    CHECK_STR(incompat(img), "[]");

    char *out = h_capture("qemu-io -c 'write 0 512' '%s' 2>&1 >/dev/null", qcopy);
    CHECK_STR(out, lines);
    free(out);
    same_image(img, qcopy);
    unsigned char *model = calloc(1, SIZE);
    memset(model, 0xcd, 512);
    h_verify_image(img, model, SIZE);
    free(model);
}

static void test_rw_open_repairs(void)
{
    const char *ours = h_path("t039-ours.qcow2");
    const char *theirs = h_path("t039-theirs.qcow2");
    create(ours, "compat=1.1,lazy_refcounts=on");
    CHECK_INT(h_crash_write(ours, NULL, 0, 0, 512, 0x5a), 0);
    rw_open_repairs(ours, 0, "library writer");
    create(theirs, "compat=1.1,lazy_refcounts=on");
    qemu_crash(theirs, NULL);
    rw_open_repairs(theirs, 1, "qemu-io writer");
}

static void test_lazy_off(void)
{
    const char *img = h_path("t039.qcow2");
    int st;
    printf("== Creating an image file with lazy_refcounts=off ==\n");
    create(img, "compat=1.1,lazy_refcounts=off");
    CHECK_INT(h_crash_write(img, NULL, 0, 0, 512, 0x5a), 0);
    CHECK_STR(incompat(img), "[]"); /* 039.out: 0x0 */
    char *out = qemu_check(img, "", &st);
    CHECK_STR(out, "No errors were found on the image.\n");
    CHECK_INT(st, 0);
    free(out);
    BlockDriverState *bs = bdrv_new("t039");
    CHECK_INT(bdrv_open(bs, img, 0, NULL), 0);
    read_pattern(bs, 0x5a);
    bdrv_delete(bs);
}

static void test_runtime_option(void)
{
    const char *img = h_path("t039.qcow2");
    const char *theirs = h_path("t039-theirs.qcow2");
    int st;
    char want[1024];
    printf("== Changing lazy_refcounts setting at runtime ==\n");
    snprintf(want, sizeof(want),
             "%s\n2 errors were found on the image.\n"
             "Data may be corrupted, or further writes to the image may corrupt it.\n",
             ERR_LINES);
    create(img, "compat=1.1,lazy_refcounts=off");
    CHECK_INT(h_crash_write(img, "lazy-refcounts=on", 0, 0, 512, 0x5a), 0);
    CHECK_STR(incompat(img), "[0]"); /* 039.out: 0x1 */
    char *out = qemu_check(img, "", &st);
    CHECK_INT(st, 2);
    CHECK_KNOWN(out && strcmp(out, want) == 0, WHY);
    free(out);
    char *dump = h_dump(img); /* the override leaves the compatible bit alone */
    CHECK_STR(h_dump_text(dump, "compatible_features"), "[]");
    free(dump);
    /* QEMU's crash with the same option: 039.out exactly, and our check agrees. */
    create(theirs, "compat=1.1,lazy_refcounts=off");
    qemu_crash(theirs, "lazy-refcounts=on");
    CHECK_STR(incompat(theirs), "[0]");
    out = qemu_check(theirs, "", &st);
    CHECK_STR(out, want);
    CHECK_INT(st, 2);
    free(out);
    BlockDriverState *bs = bdrv_new("t039");
    BdrvCheckResult r;
    CHECK_INT(bdrv_open(bs, theirs, 0, NULL), 0);
    h_log_capture();
    CHECK_INT(bdrv_check(bs, &r, 0), 0);
    CHECK_STR(h_log_release(), ERR_LINES);
    CHECK_INT(r.corruptions, 2);
    bdrv_close(bs);

    create(img, "compat=1.1,lazy_refcounts=on");
    CHECK_INT(h_crash_write(img, "lazy-refcounts=off", 0, 0, 512, 0x5a), 0);
    CHECK_STR(incompat(img), "[]"); /* 039.out: 0x0 */
    out = qemu_check(img, "", &st);
    CHECK_STR(out, "No errors were found on the image.\n");
    CHECK_INT(st, 0);
    free(out);

    /* get_info reports what is in effect. */
    BlockDriverInfo bdi;
    CHECK_INT(bdrv_open_with_options(bs, img, BDRV_O_RDWR, NULL, "lazy-refcounts=off"), 0);
    CHECK_INT(bdrv_get_info(bs, &bdi), 0);
    CHECK_INT(bdi.flags, 0);
    bdrv_close(bs);
    CHECK_INT(bdrv_open(bs, img, 0, NULL), 0);
    CHECK_INT(bdrv_get_info(bs, &bdi), 0);
    CHECK_INT(bdi.flags, BLOCK_FLAG_LAZY_REFCOUNTS);
    bdrv_close(bs);

    /* The override needs compat=1.1, as in QEMU (same message as qemu-io). */
    const char *v2 = h_path("t039-v2.qcow2");
    CHECK_INT(bdrv_img_create(v2, "qcow2", NULL, NULL, "compat=0.10", SIZE, 0), 0);
    CHECK_INT(bdrv_open_with_options(bs, v2, BDRV_O_RDWR, NULL, "lazy-refcounts=on"), -EINVAL);
    char msg[4096];
    snprintf(msg, sizeof(msg),
             "Could not open '%s': Lazy refcounts require a qcow2 image with at least qemu 1.1 "
             "compatibility level",
             v2);
    CHECK_STR(bdrv_last_error(), msg);
    out = h_capture("qemu-io -c 'read 0 512' --image-opts driver=qcow2,file.filename=%s,lazy-refcounts=on 2>&1",
                    v2);
    CHECK_STR(out, "qemu-io: can't open: Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                   "compatibility level\n");
    free(out);
    CHECK_INT(bdrv_open_with_options(bs, v2, BDRV_O_RDWR, NULL, "lazy-refcounts=off"), 0);
    bdrv_close(bs);
    CHECK_INT(bdrv_open_with_options(bs, v2, BDRV_O_RDWR, NULL, "lazy-refcounts=maybe"), -EINVAL);
    bdrv_delete(bs);
}

int main(void)
{
    h_start("test_039");
    test_clean_on_shutdown();
    test_dirty_and_repair();
    test_rw_open_repairs();
    test_lazy_off();
    test_runtime_option();
    return h_finish();
}
