/*
 * test_errors: every error path of the ABI gives a defined negative errno
 * and a message in bdrv_last_error(): NULL pointers, negative counts, I/O
 * past the end, writes on read-only handles, use after close, bad flags,
 * bad option strings, unsupported creation flags, qcow2-only calls on raw
 * images (check, amend, snapshots, compressed writes). bdrv_last_error() is
 * per thread. Images touched here are checked with qemu-img afterwards.
 */
#include "harness.h"

#include <pthread.h>

#define MiB (1024 * 1024)

static int contains(const char *hay, const char *needle)
{
    return hay && strstr(hay, needle) != NULL;
}

#define CHECK_ERR(call, err, text)                                             \
    do {                                                                       \
        CHECK_INT((call), -(err));                                             \
        if (!contains(bdrv_last_error(), (text))) {                            \
            h_failed++;                                                        \
            fprintf(stderr, "FAIL %s:%d: message \"%s\" lacks \"%s\"\n",       \
                    __FILE__, __LINE__, bdrv_last_error(), (text));            \
        } else {                                                               \
            h_passed++;                                                        \
        }                                                                      \
    } while (0)

static void test_null_and_closed(void)
{
    unsigned char buf[4096];
    int pnum;
    BlockDriverInfo bdi;
    BdrvCheckResult res;

    CHECK_ERR(bdrv_pread(NULL, 0, buf, 1), EINVAL, "bdrv_pread: bs is NULL");
    CHECK_ERR(bdrv_pwrite(NULL, 0, buf, 1), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_read(NULL, 0, buf, 1), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_write(NULL, 0, buf, 1), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_flush(NULL), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_discard(NULL, 0, 1), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_write_zeroes(NULL, 0, 1, 0), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_is_allocated(NULL, 0, 1, &pnum), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_truncate(NULL, 0), EINVAL, "bs is NULL");
    CHECK_INT(bdrv_getlength(NULL), -EINVAL);
    CHECK_INT(bdrv_get_allocated_file_size(NULL), -EINVAL);
    CHECK_ERR(bdrv_get_info(NULL, &bdi), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_check(NULL, &res, 0), EINVAL, "bs is NULL");
    QEMUSnapshotInfo sn;
    QEMUSnapshotInfo *list = &sn;
    memset(&sn, 0, sizeof(sn));
    CHECK_ERR(bdrv_amend(NULL, ""), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_amend_options(NULL, NULL), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_snapshot_create(NULL, &sn), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_snapshot_goto(NULL, "1"), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_snapshot_delete(NULL, "1"), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_snapshot_list(NULL, &list), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_write_compressed(NULL, 0, buf, 128), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_make_empty(NULL), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_change_backing_file(NULL, "a", "raw"), EINVAL, "bs is NULL");
    CHECK_ERR(bdrv_open(NULL, "x", 0, NULL), EINVAL, "bs is NULL");
    CHECK_INT(bdrv_is_read_only(NULL), -EINVAL);
    CHECK(bdrv_get_format_name(NULL) == NULL);
    CHECK(bdrv_get_device_name(NULL) == NULL);
    bdrv_close(NULL);
    bdrv_delete(NULL);

    /* A handle with nothing open: "no medium". */
    BlockDriverState *bs = bdrv_new(NULL);
    CHECK(bs != NULL);
    CHECK_STR(bdrv_get_device_name(bs), "");
    CHECK_ERR(bdrv_pread(bs, 0, buf, 1), ENOMEDIUM, "no image is open");
    CHECK_ERR(bdrv_pwrite(bs, 0, buf, 1), ENOMEDIUM, "no image is open");
    CHECK_ERR(bdrv_flush(bs), ENOMEDIUM, "no image is open");
    CHECK_INT(bdrv_getlength(bs), -ENOMEDIUM);
    CHECK_ERR(bdrv_get_info(bs, &bdi), ENOMEDIUM, "no image is open");
    CHECK_ERR(bdrv_check(bs, &res, 0), ENOMEDIUM, "no image is open");
    CHECK_ERR(bdrv_amend(bs, "compat=1.1"), ENOMEDIUM, "no image is open");
    CHECK_ERR(bdrv_snapshot_create(bs, &sn), ENOMEDIUM, "no image is open");
    CHECK_ERR(bdrv_snapshot_goto(bs, "1"), ENOMEDIUM, "no image is open");
    CHECK_ERR(bdrv_snapshot_delete(bs, "1"), ENOMEDIUM, "no image is open");
    CHECK_ERR(bdrv_snapshot_list(bs, &list), ENOMEDIUM, "no image is open");
    CHECK(list == NULL);
    CHECK_ERR(bdrv_write_compressed(bs, 0, buf, 128), ENOMEDIUM, "no image is open");
    CHECK_ERR(bdrv_is_allocated(bs, 0, 1, &pnum), ENOMEDIUM, "no image is open");
    CHECK_INT(bdrv_is_read_only(bs), -ENOMEDIUM);
    CHECK(bdrv_get_format_name(bs) == NULL);

    /* NULL arguments other than bs. */
    CHECK_ERR(bdrv_open(bs, NULL, 0, NULL), EINVAL, "filename is NULL");
    CHECK_ERR(bdrv_img_create(NULL, "qcow2", NULL, NULL, NULL, MiB, 0), EINVAL, "filename is NULL");
    CHECK_ERR(bdrv_open(bs, h_path("does-not-exist.qcow2"), 0, NULL), ENOENT, "does-not-exist.qcow2");
    bdrv_delete(bs);
}

static void test_requests(void)
{
    const char *img = h_path("errors.qcow2");
    unsigned char buf[8192], zero[8192];
    memset(zero, 0, sizeof(zero));
    CHECK_INT(bdrv_img_create(img, NULL, NULL, NULL, "", MiB, 0), 0);
    BlockDriverState *bs = bdrv_new("err");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_CACHE_WB, &bdrv_qcow2), 0);
    CHECK_ERR(bdrv_open(bs, img, 0, NULL), EBUSY, "already has an image open");

    CHECK_ERR(bdrv_pread(bs, 0, buf, -1), EINVAL, "negative");
    CHECK_ERR(bdrv_pwrite(bs, 0, buf, -5), EINVAL, "negative");
    CHECK_ERR(bdrv_pread(bs, -512, buf, 512), EINVAL, "negative");
    CHECK_ERR(bdrv_read(bs, 0, buf, -1), EINVAL, "invalid sector request");
    CHECK_ERR(bdrv_read(bs, INT64_MAX, buf, 1), EINVAL, "invalid sector request");
    CHECK_ERR(bdrv_pread(bs, 0, NULL, 10), EINVAL, "buf is NULL");
    CHECK_ERR(bdrv_pwrite(bs, 0, NULL, 10), EINVAL, "buf is NULL");
    CHECK_ERR(bdrv_pdiscard(bs, 0, -1), EINVAL, "negative");
    CHECK_ERR(bdrv_pwrite_zeroes(bs, -1, 512, 0), EINVAL, "negative");
    CHECK_ERR(bdrv_pwrite_zeroes(bs, 0, 512, 0x100), EINVAL, "unsupported request flags");
    CHECK_ERR(bdrv_truncate(bs, -1), EINVAL, "negative size");

    /* Past the end: -EIO as in QEMU, nothing written. */
    CHECK_ERR(bdrv_pread(bs, MiB, buf, 1), EIO, "past the end");
    CHECK_ERR(bdrv_pread(bs, MiB - 100, buf, 200), EIO, "past the end");
    CHECK_ERR(bdrv_pwrite(bs, MiB - 100, buf, 200), EIO, "past the end");
    CHECK_ERR(bdrv_write(bs, MiB / 512, buf, 1), EIO, "past the end");
    CHECK_ERR(bdrv_discard(bs, MiB / 512 - 1, 2), EIO, "past the end");
    CHECK_ERR(bdrv_write_zeroes(bs, MiB / 512, 1, 0), EIO, "past the end");
    CHECK_ERR(bdrv_pwrite(bs, INT64_MAX, buf, 10), EIO, "past the end");
    CHECK_INT(bdrv_pread(bs, MiB, buf, 0), 0); /* empty request at the end */
    CHECK_INT(bdrv_pread(bs, MiB - 512, buf, 512), 512);

    int pnum = 7;
    CHECK_ERR(bdrv_is_allocated(bs, 0, 1, NULL), EINVAL, "pnum is NULL");
    CHECK_INT(bdrv_is_allocated(bs, MiB / 512, 1, &pnum), 0);
    CHECK_INT(pnum, 0);
    CHECK_INT(bdrv_is_allocated(bs, MiB / 512 - 1, 100, &pnum), 0);
    CHECK_INT(pnum, 1);
    CHECK_ERR(bdrv_get_info(bs, NULL), EINVAL, "bdi is NULL");
    CHECK_ERR(bdrv_check(bs, NULL, 0), EINVAL, "res is NULL");
    BdrvCheckResult res;
    CHECK_ERR(bdrv_check(bs, &res, 4), EINVAL, "invalid check mode");
    CHECK_INT(bdrv_check(bs, &res, BDRV_FIX_LEAKS), 0);
    CHECK_INT(res.leaks + res.corruptions + res.check_errors, 0);
    QEMUSnapshotInfo sn;
    memset(&sn, 0, sizeof(sn));
    CHECK_ERR(bdrv_snapshot_create(bs, NULL), EINVAL, "sn_info is NULL");
    CHECK_ERR(bdrv_snapshot_goto(bs, NULL), EINVAL, "snapshot_id is NULL");
    CHECK_ERR(bdrv_snapshot_goto(bs, "nope"), ENOENT, "Could not find snapshot 'nope'");
    CHECK_ERR(bdrv_snapshot_delete(bs, "nope"), ENOENT, "Could not find snapshot 'nope'");
    CHECK_ERR(bdrv_snapshot_list(bs, NULL), EINVAL, "psn_info is NULL");
    CHECK_ERR(bdrv_write_compressed(bs, 0, NULL, 128), EINVAL, "buf is NULL");
    CHECK_ERR(bdrv_write_compressed(bs, 0, buf, -1), EINVAL, "invalid sector request");
    CHECK_ERR(bdrv_write_compressed(bs, 1, buf, 1), EINVAL, "exactly one cluster");
    CHECK_ERR(bdrv_write_compressed(bs, MiB / 512, buf, 128), EIO, "past the end");
    CHECK_ERR(bdrv_amend(bs, "bogus=1"), EINVAL, "Invalid parameter 'bogus'");
    CHECK_ERR(bdrv_change_backing_file(bs, "b", "a-format-name-too-long"), EINVAL, "too long");

    /* The last error stays until the next failure. */
    CHECK_INT(bdrv_pread(bs, 0, buf, 10), 10);
    CHECK(contains(bdrv_last_error(), "too long"));
    bdrv_close(bs);

    /* Use after close. */
    CHECK_ERR(bdrv_pread(bs, 0, buf, 1), ENOMEDIUM, "no image is open on device 'err'");
    CHECK_ERR(bdrv_pwrite(bs, 0, buf, 1), ENOMEDIUM, "no image is open");
    CHECK_ERR(bdrv_truncate(bs, 0), ENOMEDIUM, "no image is open");
    CHECK_ERR(bdrv_make_empty(bs), ENOMEDIUM, "no image is open");

    /* Read-only handle: every write-like call is -EACCES, reads work. */
    CHECK_INT(bdrv_open(bs, img, 0, NULL), 0);
    CHECK_ERR(bdrv_pwrite(bs, 0, buf, 512), EACCES, "read-only");
    CHECK_ERR(bdrv_write(bs, 0, buf, 1), EACCES, "read-only");
    CHECK_ERR(bdrv_write_zeroes(bs, 0, 1, 0), EACCES, "read-only");
    CHECK_ERR(bdrv_discard(bs, 0, 128), EACCES, "read-only");
    CHECK_ERR(bdrv_truncate(bs, 2 * MiB), EACCES, "read-only");
    CHECK_ERR(bdrv_make_empty(bs), EACCES, "read-only");
    CHECK_ERR(bdrv_change_backing_file(bs, NULL, NULL), EACCES, "read-only");
    CHECK_ERR(bdrv_write_compressed(bs, 0, buf, 128), EACCES, "read-only");
    CHECK_ERR(bdrv_amend(bs, "lazy_refcounts=on"), EACCES, "read-only");
    CHECK_ERR(bdrv_check(bs, &res, BDRV_FIX_ERRORS), EACCES, "read-only");
    CHECK_INT(bdrv_check(bs, &res, 0), 0);
    memset(&sn, 0, sizeof(sn));
    CHECK_ERR(bdrv_snapshot_create(bs, &sn), EACCES, "read-only");
    CHECK_ERR(bdrv_snapshot_goto(bs, "1"), EACCES, "read-only");
    CHECK_ERR(bdrv_snapshot_delete(bs, "1"), EACCES, "read-only");
    QEMUSnapshotInfo *list = &sn;
    CHECK_INT(bdrv_snapshot_list(bs, &list), 0); /* listing works read-only */
    CHECK(list == NULL);
    CHECK_INT(bdrv_pread(bs, 0, buf, 8192), 8192);
    CHECK_MEM(buf, zero, 8192);
    CHECK_INT(bdrv_getlength(bs), MiB);
    CHECK_INT(bdrv_flush(bs), 0);
    bdrv_close(bs);

    /* qcow2-only calls on a raw image. */
    const char *raw = h_path("errors.raw");
    CHECK_INT(bdrv_img_create(raw, "raw", NULL, NULL, NULL, MiB, 0), 0);
    CHECK_INT(bdrv_open(bs, raw, BDRV_O_RDWR, NULL), 0);
    CHECK_ERR(bdrv_check(bs, &res, 0), ENOTSUP, "not supported for raw images");
    CHECK_ERR(bdrv_amend(bs, "size=2M"), ENOTSUP, "not supported for raw images");
    CHECK_ERR(bdrv_snapshot_create(bs, &sn), ENOTSUP, "not supported for raw images");
    CHECK_ERR(bdrv_snapshot_goto(bs, "1"), ENOTSUP, "not supported for raw images");
    CHECK_ERR(bdrv_snapshot_delete(bs, "1"), ENOTSUP, "not supported for raw images");
    CHECK_ERR(bdrv_snapshot_list(bs, &list), ENOTSUP, "not supported for raw images");
    CHECK_ERR(bdrv_write_compressed(bs, 0, buf, 128), ENOTSUP, "not supported for raw images");
    CHECK(bdrv_raw.bdrv_check == NULL && bdrv_raw.bdrv_write_compressed == NULL);
    CHECK(bdrv_raw.bdrv_snapshot_create == NULL && bdrv_raw.bdrv_snapshot_list == NULL);
    bdrv_close(bs);

    /* Unknown open flags and drivers. */
    CHECK_ERR(bdrv_open(bs, img, 0x0008 /* BDRV_O_SNAPSHOT */, NULL), EINVAL, "unsupported open flags 0x8");
    BlockDriver fake = bdrv_qcow2;
    fake.format_name = "vmdk";
    CHECK_ERR(bdrv_open(bs, img, 0, &fake), ENOTSUP, "unknown block driver 'vmdk'");
    CHECK_ERR(bdrv_open_with_options(bs, img, 0, NULL, "bogus=1"), EINVAL, "Invalid parameter 'bogus'");
    CHECK_ERR(bdrv_open_with_options(bs, img, 0, NULL, "lazy-refcounts=maybe"), EINVAL, "lazy-refcounts");
    CHECK(bdrv_get_format_name(bs) == NULL); /* none of those opened anything */
    bdrv_delete(bs);

    /* Nothing of the above changed the image. */
    CHECK_INT(h_qemu_check(img), 0);
    size_t n;
    unsigned char *view = h_qemu_contents(img, &n);
    CHECK(view && n == MiB);
    if (view) {
        unsigned char *z = calloc(1, MiB);
        CHECK_MEM(view, z, MiB);
        free(z);
    }
    free(view);
}

static void test_create_errors(void)
{
    const char *img = h_path("errors-create.qcow2");
    CHECK_ERR(bdrv_img_create(img, "qcow2", NULL, NULL, "bogus=1", MiB, 0), EINVAL, "Invalid parameter 'bogus'");
    CHECK_ERR(bdrv_img_create(img, "qcow2", NULL, NULL, "cluster_size=3000", MiB, 0), EINVAL,
              "Cluster size must be a power of two between 512 and 2048k");
    CHECK_ERR(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=0.42", MiB, 0), EINVAL, "0.42");
    CHECK_ERR(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=0.10,lazy_refcounts=on", MiB, 0), EINVAL,
              "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)");
    CHECK_ERR(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=0.10", MiB, BLOCK_FLAG_LAZY_REFCOUNTS), EINVAL,
              "Lazy refcounts only supported");
    CHECK_ERR(bdrv_img_create(img, "qcow2", NULL, NULL, "size=12Q", MiB, 0), EINVAL, "Invalid size '12Q'");
    CHECK_ERR(bdrv_img_create(img, "qcow2", NULL, NULL, NULL, MiB, BLOCK_FLAG_ENCRYPT), ENOTSUP, "BLOCK_FLAG_ENCRYPT");
    CHECK_ERR(bdrv_img_create(img, "qcow2", NULL, NULL, NULL, MiB, BLOCK_FLAG_COMPAT6), ENOTSUP, "BLOCK_FLAG_COMPAT6");
    CHECK_ERR(bdrv_img_create(img, "qcow2", NULL, NULL, NULL, MiB, 2), EINVAL, "unknown flags 0x2");
    CHECK_ERR(bdrv_img_create(img, "vmdk", NULL, NULL, NULL, MiB, 0), EINVAL, "Unknown file format 'vmdk'");
    CHECK_ERR(bdrv_img_create(img, "qcow2", NULL, NULL, "encryption=on", MiB, 0), ENOTSUP, "encryption");
    CHECK_ERR(bdrv_img_create(img, "qcow2", NULL, NULL, NULL, (uint64_t)-1, 0), EINVAL, "needs a size");
    CHECK_ERR(bdrv_img_create(img, "raw", "base", NULL, NULL, MiB, 0), ENOTSUP, "Backing file not supported");
    CHECK_ERR(bdrv_img_create(img, "raw", NULL, NULL, "cluster_size=4k", MiB, 0), EINVAL, "Invalid parameter");
    CHECK_ERR(bdrv_img_create(h_path("no-such-dir/x.qcow2"), "qcow2", NULL, NULL, NULL, MiB, 0), ENOENT,
              "Could not create");

    /* Option lists. */
    QEMUOptionParameter *l = parse_option_parameters("nonsense=1", bdrv_qcow2.create_options, NULL);
    CHECK(l == NULL);
    CHECK(contains(bdrv_last_error(), "Unknown option 'nonsense'"));
    CHECK(parse_option_parameters("size=12Q", bdrv_qcow2.create_options, NULL) == NULL);
    CHECK(parse_option_parameters("lazy_refcounts=maybe", bdrv_qcow2.create_options, NULL) == NULL);
    CHECK(parse_option_parameters("refcount_bits=x", bdrv_qcow2.create_options, NULL) == NULL);
    CHECK(parse_option_parameters("size=1M", NULL, NULL) == NULL);
    CHECK(parse_option_parameters(NULL, bdrv_qcow2.create_options, NULL) == NULL);
    l = parse_option_parameters("", bdrv_qcow2.create_options, NULL);
    CHECK(l != NULL);
    CHECK_ERR(set_option_parameter(l, "nonsense", "1"), EINVAL, "Unknown option");
    CHECK_ERR(set_option_parameter(NULL, "size", "1"), EINVAL, "list is NULL");
    CHECK_ERR(set_option_parameter_int(l, BLOCK_OPT_BACKING_FILE, 1), EINVAL, "not numeric");
    CHECK(get_option_parameter(NULL, "size") == NULL);
    CHECK(get_option_parameter(l, NULL) == NULL);
    /* Creating from a list without a size gives a 0-byte image, as QEMU. */
    CHECK_ERR(bdrv_create(NULL, img, l), EINVAL, "drv is NULL");
    free_option_parameters(l);
    free_option_parameters(NULL);
}

static void *thread_error(void *arg)
{
    (void)arg;
    CHECK_INT(bdrv_pread(NULL, 0, NULL, 0), -EINVAL);
    return strstr(bdrv_last_error(), "bdrv_pread") ? (void *)1 : NULL;
}

static void test_thread_local_error(void)
{
    BlockDriverState *bs = bdrv_new("tls");
    CHECK_INT(bdrv_flush(bs), -ENOMEDIUM);
    pthread_t t;
    void *ok = NULL;
    CHECK_INT(pthread_create(&t, NULL, thread_error, NULL), 0);
    pthread_join(t, &ok);
    CHECK(ok != NULL);
    /* This thread still sees its own message. */
    CHECK(contains(bdrv_last_error(), "bdrv_flush: no image is open on device 'tls'"));
    bdrv_delete(bs);
}

int main(void)
{
    h_start("test_errors");
    test_null_and_closed();
    test_requests();
    test_create_errors();
    test_thread_local_error();
    return h_finish();
}
