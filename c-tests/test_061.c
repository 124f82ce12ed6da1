/*
 * test_061: port of the amend cases of qemu-iotests 061 (section 4.5 and
 * 8 of ../shared/qcow2-format.md) through bdrv_amend() and
 * bdrv_amend_options().
 *
 * Every case runs twice on the same starting image: once through the
 * library (bdrv_open read-write, bdrv_amend) and once on a copy with
 * `qemu-img amend -o`. Then the header dumps (c-tests/qcow2tool, all
 * fields and extensions) must be equal, `qemu-img compare` must find the
 * same contents, `qemu-img check` no error, and the lines printed (the
 * repair of a dirty image) must be equal. A refused option must fail with
 * the message qemu-img prints (without its "qemu-img: " prefix) and leave
 * the image as qemu-img leaves it.
 *
 * Cases, in 061's order: v3 -> v2 with zero-cluster expansion (plain and
 * preallocated zero clusters); dirty downgrade (crashed by our writer and
 * by qemu-io, opened normally and with BDRV_O_CHECK); unknown compatible
 * and autoclear bits cleared on downgrade; upgrade with lazy refcounts and
 * resize; lazy_refcounts=off on a dirty image; the backing file (same name
 * accepted, another refused); invalid configurations (lazy refcounts on
 * v2, compat=0.42, an unknown option, cluster_size, encryption,
 * preallocation, refcount widths); an unset value; then the option-list
 * form (QEMU 1.7's bdrv_amend_options and the driver member) and the
 * errors of the ABI itself.
 */
#include "harness.h"

#define MiB (1024 * 1024)
#define KiB 1024

static int case_no;

static const char *next_img(void)
{
    return h_path("t061-%d.qcow2", ++case_no);
}

static void create(const char *img, const char *opts, uint64_t size)
{
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, opts, size, 0), 0);
}

static void same_image(const char *a, const char *b)
{
    char *d1 = h_dump(a), *d2 = h_dump(b);
    CHECK_STR(d1, d2);
    free(d1);
    free(d2);
    CHECK_INT(h_sh("qemu-img compare -q '%s' '%s'", a, b), 0);
}

/* Amends `img` through the library (opened BDRV_O_RDWR | `flags`) and a
 * copy with qemu-img. `want`: 0, or the negative errno and `msg` the
 * message (qemu-img's, without the prefix) of a refusal. */
static void amend_both(const char *img, const char *opts, int flags, int want, const char *msg)
{
    char copy[4200];
    snprintf(copy, sizeof(copy), "%s.qemu", img);
    CHECK_INT(h_copy(img, copy), 0);

    BlockDriverState *bs = bdrv_new("t061");
    h_log_capture();
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | flags, NULL), 0);
    int r = bdrv_amend(bs, opts);
    char err[4096];
    snprintf(err, sizeof(err), "%s", bdrv_last_error());
    bdrv_delete(bs);
    static char lines[1 << 16];
    snprintf(lines, sizeof(lines), "%s", h_log_release());

    char *q = h_capture("qemu-img amend -o '%s' '%s' 2>&1; echo \"exit $?\"", opts, copy);
    char *e = q ? strstr(q, "exit ") : NULL;
    int qst = e ? atoi(e + 5) : -1;
    if (e) {
        *e = 0;
    }
    CHECK_INT(r, want);
    if (want == 0) {
        CHECK_INT(qst, 0);
        CHECK_STR(lines, q); /* repair lines, if any */
        CHECK_INT(h_qemu_check(img), 0);
    } else {
        char qwant[4200];
        snprintf(qwant, sizeof(qwant), "qemu-img: %s\n", msg);
        CHECK_INT(qst, 1);
        CHECK_STR(q, qwant);
        CHECK_STR(err, msg);
    }
    free(q);
    same_image(img, copy);
}

static void read_check(const char *img, int64_t off, int len, int pattern)
{
    BlockDriverState *bs = bdrv_new("t061");
    CHECK_INT(bdrv_open(bs, img, 0, NULL), 0);
    unsigned char *buf = malloc((size_t)len), *want = malloc((size_t)len);
    memset(want, pattern, (size_t)len);
    CHECK_INT(bdrv_pread(bs, off, buf, len), len);
    CHECK_MEM(buf, want, (size_t)len);
    free(buf);
    free(want);
    bdrv_delete(bs);
}

static const char *field(const char *img, const char *name)
{
    static char out[256];
    char *dump = h_dump(img);
    snprintf(out, sizeof(out), "%s", h_dump_text(dump, name));
    free(dump);
    return out;
}

static void test_downgrade_zero_expansion(void)
{
    printf("=== Testing version downgrade with zero expansion ===\n");
    const char *img = next_img();
    create(img, "compat=1.1,lazy_refcounts=on", 64 * MiB);
    BlockDriverState *bs = bdrv_new("t061");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    CHECK_INT(bdrv_pwrite_zeroes(bs, 0, 128 * KiB, 0), 0); /* qemu-io write -z 0 128k */
    bdrv_delete(bs);
    CHECK_STR(field(img, "version"), "3");
    CHECK_STR(field(img, "compatible_features"), "[0]");
    amend_both(img, "compat=0.10", 0, 0, NULL);
    CHECK_STR(field(img, "version"), "2");
    CHECK_STR(field(img, "header_length"), "72");
    CHECK_STR(field(img, "compatible_features"), "[]");
    read_check(img, 0, 128 * KiB, 0);

    /* "preallocated zero expansion": zero clusters that keep their host
     * cluster become data clusters of zeros. */
    img = next_img();
    create(img, "compat=1.1", 4 * MiB);
    bs = bdrv_new("t061");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL), 0);
    unsigned char *buf = malloc(4 * MiB);
    memset(buf, 0x2a, 4 * MiB);
    CHECK_INT(bdrv_pwrite(bs, 0, buf, 4 * MiB), 4 * MiB);
    CHECK_INT(bdrv_pwrite_zeroes(bs, 0, 4 * MiB, 0), 0);
    bdrv_delete(bs);
    free(buf);
    amend_both(img, "compat=0.10", 0, 0, NULL);
    read_check(img, 0, 4 * MiB, 0);
}

static void test_dirty_downgrade(void)
{
    printf("=== Testing dirty version downgrade ===\n");
    const char *img = next_img();
    create(img, "compat=1.1,lazy_refcounts=on", 64 * MiB);
    CHECK_INT(h_crash_write(img, NULL, 0, 0, 128 * KiB, 0x2a), 0); /* writethrough: flushed */
    CHECK_STR(field(img, "incompatible_features"), "[0]");
    char again[4200];
    snprintf(again, sizeof(again), "%s.again", img);
    CHECK_INT(h_copy(img, again), 0);
    amend_both(img, "compat=0.10", 0, 0, NULL);
    CHECK_STR(field(img, "version"), "2");
    CHECK_STR(field(img, "incompatible_features"), "[]");
    read_check(img, 0, 128 * KiB, 0x2a);
    /* Opened with BDRV_O_CHECK (no repair at open): amend repairs first. */
    amend_both(again, "compat=0.10", BDRV_O_CHECK, 0, NULL);
    read_check(again, 0, 128 * KiB, 0x2a);

    /* 061's own crash: qemu-io writes, flushes and aborts. */
    img = next_img();
    create(img, "compat=1.1,lazy_refcounts=on", 64 * MiB);
    h_sh("qemu-io -c 'write -P 0x2a 0 128k' -c flush -c abort '%s' >/dev/null 2>&1", img);
    CHECK_STR(field(img, "incompatible_features"), "[0]");
    amend_both(img, "compat=0.10", 0, 0, NULL);
    CHECK_STR(field(img, "incompatible_features"), "[]");
    read_check(img, 0, 128 * KiB, 0x2a);
}

static void test_unknown_bits(void)
{
    printf("=== Testing version downgrade with unknown compat/autoclear flags ===\n");
    const char *img = next_img();
    create(img, "compat=1.1", 64 * MiB);
    CHECK_INT(h_sh("'%s' '%s' set-feature-bit compatible 42", h_tool(), img), 0);
    CHECK_INT(h_sh("'%s' '%s' set-feature-bit autoclear 42", h_tool(), img), 0);
    CHECK_STR(field(img, "compatible_features"), "[42]");
    CHECK_STR(field(img, "autoclear_features"), "[42]");
    amend_both(img, "compat=0.10", 0, 0, NULL);
    CHECK_STR(field(img, "version"), "2");
    CHECK_STR(field(img, "compatible_features"), "[]");
    CHECK_STR(field(img, "autoclear_features"), "[]");
}

static void test_upgrade_resize(void)
{
    printf("=== Testing version upgrade and resize ===\n");
    const char *img = next_img();
    create(img, "compat=0.10", 64 * MiB);
    BlockDriverState *bs = bdrv_new("t061");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    unsigned char buf[64 * KiB];
    memset(buf, 0x2a, sizeof(buf));
    CHECK_INT(bdrv_pwrite(bs, 42 * MiB, buf, sizeof(buf)), (int)sizeof(buf));
    bdrv_delete(bs);
    CHECK_STR(field(img, "version"), "2");
    amend_both(img, "compat=1.1,lazy_refcounts=on,size=128M", 0, 0, NULL);
    CHECK_STR(field(img, "version"), "3");
    CHECK_STR(field(img, "size"), "134217728");
    CHECK_STR(field(img, "compatible_features"), "[0]");
    CHECK_STR(field(img, "header_length"), "112");
    read_check(img, 42 * MiB, 64 * KiB, 0x2a);
}

static void test_dirty_lazy_off(void)
{
    printf("=== Testing dirty lazy_refcounts=off ===\n");
    const char *img = next_img();
    create(img, "compat=1.1,lazy_refcounts=on", 64 * MiB);
    h_sh("qemu-io -c 'write -P 0x2a 0 128k' -c flush -c abort '%s' >/dev/null 2>&1", img);
    CHECK_STR(field(img, "incompatible_features"), "[0]");
    char again[4200];
    snprintf(again, sizeof(again), "%s.again", img);
    CHECK_INT(h_copy(img, again), 0);
    amend_both(img, "lazy_refcounts=off", 0, 0, NULL);
    CHECK_STR(field(img, "version"), "3");
    CHECK_STR(field(img, "incompatible_features"), "[]");
    CHECK_STR(field(img, "compatible_features"), "[]");
    read_check(img, 0, 128 * KiB, 0x2a);
    amend_both(again, "lazy_refcounts=off", BDRV_O_CHECK, 0, NULL);

    /* Our writer's crash too. */
    img = next_img();
    create(img, "compat=1.1,lazy_refcounts=on", 64 * MiB);
    CHECK_INT(h_crash_write(img, NULL, 0, 0, 128 * KiB, 0x2a), 0);
    amend_both(img, "lazy_refcounts=off", BDRV_O_CHECK, 0, NULL);
    read_check(img, 0, 128 * KiB, 0x2a);
}

static void test_backing_file(void)
{
    printf("=== Testing backing file ===\n");
    const char *base = next_img();
    const char *img = next_img();
    create(base, "compat=1.1", 64 * MiB);
    CHECK_INT(bdrv_img_create(img, "qcow2", base, "qcow2", "compat=1.1", 64 * MiB, 0), 0);
    char opts[4200];
    snprintf(opts, sizeof(opts), "backing_file=%s,backing_fmt=qcow2", base);
    amend_both(img, opts, 0, 0, NULL); /* unchanged: accepted */
    amend_both(img, "backing_file=/some/other/file", 0, -EINVAL,
               "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.");
}

static void test_invalid(void)
{
    printf("=== Testing invalid configurations ===\n");
    const char *img = next_img();
    create(img, "compat=0.10", 64 * MiB);
    const char *lazy = "Lazy refcounts only supported with compatibility level 1.1 and above "
                       "(use compat=1.1 or greater)";
    amend_both(img, "lazy_refcounts=on", 0, -EINVAL, lazy);
    amend_both(img, "compat=0.10,lazy_refcounts=on", 0, -EINVAL, lazy);
    amend_both(img, "compat=0.42", 0, -EINVAL, "Unknown compatibility level 0.42");
    amend_both(img, "foo=bar", 0, -EINVAL, "Invalid parameter 'foo'");
    amend_both(img, "cluster_size=1k", 0, -EINVAL,
               "Invalid parameter 'cluster_size'\nThis option is only supported for image creation");
    amend_both(img, "encryption=on", 0, -EINVAL,
               "Invalid parameter 'encryption'\nThis option is only supported for image creation");
    amend_both(img, "preallocation=on", 0, -EINVAL,
               "Invalid parameter 'preallocation'\nThis option is only supported for image creation");
    amend_both(img, "lazy_refcounts=maybe", 0, -EINVAL, "Parameter 'lazy_refcounts' expects 'on' or 'off'");
    amend_both(img, "compat=0.10,refcount_bits=8", 0, -EINVAL,
               "Refcount widths other than 16 bits require compatibility level 1.1 or above "
               "(use compat=1.1 or greater)");
    amend_both(img, "compat=1.1", 0, 0, NULL); /* actually valid */
    amend_both(img, "refcount_bits=3", 0, -EINVAL,
               "Refcount width must be a power of two and may not exceed 64 bits");
    CHECK_STR(field(img, "version"), "3");
}

static void test_unset_value(void)
{
    printf("=== Testing correct handling of unset value ===\n");
    const char *img = next_img();
    create(img, "compat=1.1,cluster_size=1k", 64 * MiB);
    amend_both(img, "lazy_refcounts=on", 0, 0, NULL); /* Should work */
    amend_both(img, "cluster_size=64k", 0, -EINVAL,   /* Should not work */
               "Invalid parameter 'cluster_size'\nThis option is only supported for image creation");
}

static void test_snapshot_downgrade(void)
{
    printf("=== Testing zero expansion on inactive clusters ===\n");
    const char *img = next_img();
    create(img, "compat=1.1", 64 * MiB);
    BlockDriverState *bs = bdrv_new("t061");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    CHECK_INT(bdrv_pwrite_zeroes(bs, 0, 128 * KiB, 0), 0);
    QEMUSnapshotInfo sn;
    memset(&sn, 0, sizeof(sn));
    strcpy(sn.name, "foo");
    CHECK_INT(bdrv_snapshot_create(bs, &sn), 0);
    unsigned char buf[128 * KiB];
    memset(buf, 0x2a, sizeof(buf));
    CHECK_INT(bdrv_pwrite(bs, 0, buf, sizeof(buf)), (int)sizeof(buf));
    bdrv_close(bs);
    char copy[4200];
    snprintf(copy, sizeof(copy), "%s.qemu", img);
    CHECK_INT(h_copy(img, copy), 0);
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    int r = bdrv_amend(bs, "compat=0.10");
    bdrv_delete(bs);
    int q = h_sh("qemu-img amend -o compat=0.10 '%s' >/dev/null 2>&1", copy);
    CHECK_INT(q, 0);
    /* As QEMU 10: snapshots whose disk size matches do not prevent it,
     * and the zero clusters of the snapshot's tree are expanded too. */
    CHECK_INT(r, 0);
    CHECK_STR(field(img, "version"), "2");
    CHECK_STR(field(copy, "version"), "2");
    CHECK_INT(h_qemu_check(img), 0);
    CHECK_INT(h_sh("qemu-img compare -q '%s' '%s'", img, copy), 0);
    CHECK_INT(h_sh("qemu-img snapshot -a foo '%s' && qemu-img snapshot -a foo '%s' && "
                   "qemu-img compare -q '%s' '%s'", img, copy, img, copy), 0);
}

static void test_option_lists(void)
{
    printf("=== bdrv_amend_options: QEMU 1.7's option-list form ===\n");
    const char *img = next_img();
    create(img, "compat=1.1,lazy_refcounts=on", 64 * MiB);
    BlockDriverState *bs = bdrv_new("t061");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);

    /* A copy of the driver's list with nothing assigned changes nothing,
     * although its defaults (cluster_size 65536, refcount_bits 16) are set. */
    QEMUOptionParameter *l = append_option_parameters(NULL, bdrv_qcow2.create_options);
    CHECK(l != NULL);
    CHECK(!get_option_parameter(l, BLOCK_OPT_CLUSTER_SIZE)->assigned);
    CHECK_INT(bdrv_amend_options(bs, l), 0);
    BlockDriverInfo bdi;
    CHECK_INT(bdrv_get_info(bs, &bdi), 0);
    CHECK_INT(bdi.flags, BLOCK_FLAG_LAZY_REFCOUNTS);

    /* An assigned flag set to off is a change. */
    CHECK_INT(set_option_parameter(l, BLOCK_OPT_LAZY_REFCOUNTS, "off"), 0);
    CHECK(get_option_parameter(l, BLOCK_OPT_LAZY_REFCOUNTS)->assigned);
    CHECK_INT(bdrv_amend_options(bs, l), 0);
    CHECK_INT(bdrv_get_info(bs, &bdi), 0);
    CHECK_INT(bdi.flags, 0);
    /* Assigning a creation-only option is refused as in bdrv_amend(). */
    CHECK_INT(set_option_parameter_int(l, BLOCK_OPT_CLUSTER_SIZE, 4096), 0);
    CHECK_INT(bdrv_amend_options(bs, l), -EINVAL);
    CHECK_STR(bdrv_last_error(), "Invalid parameter 'cluster_size'\nThis option is only supported for image creation");
    free_option_parameters(l);

    /* parse_option_parameters marks what it parsed; the driver member does the same. */
    l = parse_option_parameters("compat=0.10,size=32M", bdrv_qcow2.create_options, NULL);
    CHECK(l != NULL && get_option_parameter(l, BLOCK_OPT_COMPAT_LEVEL)->assigned);
    CHECK(!get_option_parameter(l, BLOCK_OPT_PREALLOC)->assigned);
    CHECK_INT(bdrv_qcow2.bdrv_amend_options(bs, l), 0);
    free_option_parameters(l);
    CHECK_INT(bdrv_getlength(bs), 32 * MiB);
    bdrv_delete(bs);
    CHECK_STR(field(img, "version"), "2");
    CHECK_STR(field(img, "size"), "33554432");
    CHECK_INT(h_qemu_check(img), 0);

    /* A string option assigned NULL keeps the current value. */
    bs = bdrv_new("t061");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    l = append_option_parameters(NULL, bdrv_qcow2.create_options);
    get_option_parameter(l, BLOCK_OPT_COMPAT_LEVEL)->assigned = true; /* value.s NULL */
    CHECK_INT(bdrv_amend_options(bs, l), 0);
    /* A value with a comma cannot become a -o string. */
    CHECK_INT(set_option_parameter(l, BLOCK_OPT_BACKING_FILE, "a,b"), 0);
    CHECK_INT(bdrv_amend_options(bs, l), -EINVAL);
    CHECK(strstr(bdrv_last_error(), "contains ','") != NULL);
    free_option_parameters(l);
    bdrv_delete(bs);
    CHECK_STR(field(img, "version"), "2");
}

static void test_abi_errors(void)
{
    printf("=== bdrv_amend: ABI errors ===\n");
    const char *img = next_img();
    create(img, "compat=1.1", 1 * MiB);
    BlockDriverState *bs = bdrv_new("t061");
    CHECK_INT(bdrv_amend(NULL, "compat=0.10"), -EINVAL);
    CHECK_INT(bdrv_amend(bs, "compat=0.10"), -ENOMEDIUM);
    CHECK_INT(bdrv_open(bs, img, 0, NULL), 0);
    CHECK_INT(bdrv_amend(bs, "compat=0.10"), -EACCES);
    CHECK_INT(bdrv_amend_options(bs, NULL), -EACCES);
    bdrv_close(bs);
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    CHECK_INT(bdrv_amend(bs, NULL), 0); /* nothing to change */
    CHECK_INT(bdrv_amend(bs, ""), 0);
    CHECK_INT(bdrv_amend_options(bs, NULL), 0);
    bdrv_close(bs);
    const char *raw = h_path("t061.raw");
    CHECK_INT(bdrv_img_create(raw, "raw", NULL, NULL, NULL, 1 * MiB, 0), 0);
    CHECK_INT(bdrv_open(bs, raw, BDRV_O_RDWR, NULL), 0);
    CHECK_INT(bdrv_amend(bs, "size=2M"), -ENOTSUP);
    CHECK(bdrv_raw.bdrv_amend_options == NULL);
    bdrv_delete(bs);
    CHECK(bdrv_qcow2.bdrv_amend_options == bdrv_amend_options);
    CHECK_STR(field(img, "version"), "3");
}

int main(void)
{
    h_start("test_061");
    test_downgrade_zero_expansion();
    test_dirty_downgrade();
    test_unknown_bits();
    test_upgrade_resize();
    test_dirty_lazy_off();
    test_backing_file();
    test_invalid();
    test_unset_value();
    test_snapshot_downgrade();
    test_option_lists();
    test_abi_errors();
    return h_finish();
}
