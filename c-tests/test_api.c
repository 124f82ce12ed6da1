/*
 * test_api: every entry point of block_int.h on its success path, checked
 * against what was written and against qemu-img / qemu-io reading the same
 * files: create, open, byte and sector I/O across cluster boundaries,
 * write_zeroes, discard, is_allocated, flush, truncate, getlength,
 * get_info, get_allocated_file_size, make_empty, change_backing_file,
 * reopen after close, raw images, the driver tables, option lists.
 */
#include "harness.h"
#include "qcow2hdr.h"

#define MiB (1024 * 1024)

static BlockDriverState *open_or_die(const char *img, int flags, BlockDriver *drv)
{
    BlockDriverState *bs = bdrv_new("api");
    int r = bdrv_open(bs, img, flags, drv);
    CHECK_INT(r, 0);
    return bs;
}

/* Writes through the ABI and into the model. */
static void model_pwrite(BlockDriverState *bs, unsigned char *model, int64_t off, int len, uint64_t seed)
{
    unsigned char *buf = malloc((size_t)len);
    h_fill(buf, (size_t)len, seed);
    CHECK_INT(bdrv_pwrite(bs, off, buf, len), len);
    memcpy(model + off, buf, (size_t)len);
    free(buf);
}

/* Reads [off, off+len) through the ABI and compares with the model. */
static void model_check(BlockDriverState *bs, const unsigned char *model, int64_t off, int len)
{
    unsigned char *buf = malloc((size_t)len);
    memset(buf, 0x5a, (size_t)len);
    CHECK_INT(bdrv_pread(bs, off, buf, len), len);
    CHECK_MEM(buf, model + off, (size_t)len);
    free(buf);
}

/* qemu-io's view of allocation: bytes allocated at `off` (its "alloc" command). */
static long long qemu_alloc(const char *img, long long off, long long len)
{
    char *out = h_capture("qemu-io -r -f qcow2 -c 'alloc %lld %lld' '%s' 2>&1", off, len, img);
    long long n = -1;
    if (out) {
        sscanf(out, "%lld/", &n);
    }
    free(out);
    return n;
}

static void test_qcow2_io(void)
{
    const char *img = h_path("api.qcow2");
    const size_t size = 8 * MiB;
    unsigned char *model = calloc(1, 16 * MiB);

    /* Lazy refcounts through the flag, 4 KiB clusters through the -o string. */
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "cluster_size=4k", size, BLOCK_FLAG_LAZY_REFCOUNTS), 0);
    /* The same image made by qemu-img is byte for byte the same. */
    const char *ref = h_path("api-qemu.qcow2");
    CHECK_INT(h_sh("qemu-img create -q -f qcow2 -o cluster_size=4k,lazy_refcounts=on '%s' 8M", ref), 0);
    CHECK_INT(h_sh("cmp -s '%s' '%s'", img, ref), 0);

    BlockDriverState *bs = open_or_die(img, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL);
    CHECK_STR(bdrv_get_device_name(bs), "api");
    CHECK_STR(bdrv_get_format_name(bs), "qcow2");
    CHECK_INT(bdrv_is_read_only(bs), 0);
    CHECK_INT(bdrv_getlength(bs), size);

    BlockDriverInfo bdi;
    memset(&bdi, 0xff, sizeof(bdi));
    CHECK_INT(bdrv_get_info(bs, &bdi), 0);
    CHECK_INT(bdi.cluster_size, 4096);
    CHECK_INT(bdi.flags & BLOCK_FLAG_LAZY_REFCOUNTS, BLOCK_FLAG_LAZY_REFCOUNTS);
    CHECK(!bdi.is_dirty);
    /* 4 KiB clusters: one L2 table maps 512 * 4 KiB = 2 MiB. */
    CHECK_INT(bdi.vm_state_offset, 8 * MiB);

    /* Byte I/O across cluster and L2-table boundaries. */
    model_pwrite(bs, model, 4096 - 100, 300, 1);
    model_pwrite(bs, model, 10000, 70000, 2);
    model_pwrite(bs, model, 2 * MiB - 5000, 10000, 3);
    model_pwrite(bs, model, 1, 1, 4);
    model_pwrite(bs, model, (int64_t)size - 777, 777, 5);
    model_pwrite(bs, model, 12000, 3000, 6); /* overwrite inside an allocated run */
    model_check(bs, model, 0, 200000);
    model_check(bs, model, 2 * MiB - 8192, 16384);
    model_check(bs, model, (int64_t)size - 4096, 4096);
    CHECK_INT(bdrv_pread(bs, 0, model, 0), 0); /* zero-length read */

    /* With lazy refcounts the first allocation marks the image dirty. */
    CHECK_INT(bdrv_get_info(bs, &bdi), 0);
    CHECK(bdi.is_dirty);

    /* Sector I/O. */
    unsigned char sec[3 * 512], back[3 * 512];
    h_fill(sec, sizeof(sec), 7);
    CHECK_INT(bdrv_write(bs, 300, sec, 3), 0);
    memcpy(model + 300 * 512, sec, sizeof(sec));
    CHECK_INT(bdrv_read(bs, 300, back, 3), 0);
    CHECK_MEM(back, sec, sizeof(sec));

    /* A known pattern for qemu-io to verify later. */
    memset(model + 3 * MiB, 0xab, 65536);
    CHECK_INT(bdrv_pwrite(bs, 3 * MiB, model + 3 * MiB, 65536), 65536);

    /* Allocation: written clusters are allocated, untouched ones are not. */
    int pnum = -1;
    CHECK_INT(bdrv_is_allocated(bs, 4 * MiB / 512, 2048, &pnum), 0);
    CHECK_INT(pnum, 2048);
    CHECK_INT(bdrv_is_allocated(bs, 3 * MiB / 512, 1024, &pnum), 1);
    CHECK_INT(pnum, 128); /* 64 KiB written */
    CHECK_INT(bdrv_is_allocated(bs, 3 * MiB / 512 + 128, 64, &pnum), 0);
    CHECK_INT(pnum, 64);

    /* write_zeroes: partial clusters, then whole clusters with unmap. */
    CHECK_INT(bdrv_pwrite_zeroes(bs, 20000, 50000, 0), 0);
    memset(model + 20000, 0, 50000);
    CHECK_INT(bdrv_write_zeroes(bs, (2 * MiB - 8192) / 512, 32, BDRV_REQ_MAY_UNMAP), 0);
    memset(model + 2 * MiB - 8192, 0, 16384);
    model_check(bs, model, 0, 200000);
    model_check(bs, model, 2 * MiB - 16384, 32768);
    /* Zero clusters belong to this layer: still "allocated". */
    CHECK_INT(bdrv_is_allocated(bs, (2 * MiB - 8192) / 512, 16, &pnum), 1);

    /* discard: whole clusters read as zeros afterwards (compat 1.1). */
    model_pwrite(bs, model, 5 * MiB, 256 * 1024, 8);
    CHECK_INT(bdrv_discard(bs, 5 * MiB / 512, 256 * 1024 / 512), 0);
    memset(model + 5 * MiB, 0, 256 * 1024);
    CHECK_INT(bdrv_pdiscard(bs, 5 * MiB + 4096, 4096), 0);
    model_check(bs, model, 5 * MiB - 4096, 256 * 1024 + 8192);

    CHECK_INT(bdrv_flush(bs), 0);
    CHECK(bdrv_get_allocated_file_size(bs) > 0);

    /* Grow, write in the new part, shrink. */
    CHECK_INT(bdrv_truncate(bs, 16 * MiB), 0);
    CHECK_INT(bdrv_getlength(bs), 16 * MiB);
    model_check(bs, model, (int64_t)size, 4096); /* new space reads zeros */
    model_pwrite(bs, model, 9 * MiB + 3, 5000, 9);
    model_pwrite(bs, model, 13 * MiB, 4096, 10);
    CHECK_INT(bdrv_truncate(bs, 12 * MiB), 0);
    CHECK_INT(bdrv_getlength(bs), 12 * MiB);
    memset(model + 12 * MiB, 0, 4 * MiB);
    model_check(bs, model, 9 * MiB, 3 * MiB);

    /* Whole image once more, then close and let qemu judge. */
    model_check(bs, model, 0, 12 * MiB);
    bdrv_close(bs);
    CHECK_INT(bdrv_getlength(bs), -ENOMEDIUM);

    /* Closed cleanly: the dirty bit is gone. */
    char *dump = h_dump(img);
    CHECK_STR(h_dump_text(dump, "incompatible_features"), "[]");
    CHECK_STR(h_dump_text(dump, "compatible_features"), "[0]");
    free(dump);
    h_verify_image(img, model, 12 * MiB);
    CHECK_INT(h_sh("qemu-io -r -f qcow2 -c 'read -P 0xab %d 65536' '%s' | grep -q 'read 65536/65536'", 3 * MiB, img), 0);
    CHECK(qemu_alloc(img, 3 * MiB, 65536) == 65536);
    CHECK(qemu_alloc(img, 4 * MiB, 65536) == 0);

    /* A closed handle opens again (read-only this time). */
    CHECK_INT(bdrv_open(bs, img, 0, &bdrv_qcow2), 0);
    CHECK_INT(bdrv_is_read_only(bs), 1);
    model_check(bs, model, 0, 1 * MiB);
    BlockDriverInfo bdi2;
    CHECK_INT(bdrv_get_info(bs, &bdi2), 0);
    CHECK(!bdi2.is_dirty);
    bdrv_close(bs);
    bdrv_close(bs); /* closing twice is harmless */

    /* Runtime options. */
    CHECK_INT(bdrv_open_with_options(bs, img, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL,
                                     "lazy-refcounts=off,l2-cache-size=64k,refcount-cache-size=64k"), 0);
    CHECK_INT(bdrv_get_info(bs, &bdi2), 0);
    CHECK_INT(bdi2.flags & BLOCK_FLAG_LAZY_REFCOUNTS, 0);
    model_pwrite(bs, model, 7 * MiB, 100000, 11);
    CHECK_INT(bdrv_get_info(bs, &bdi2), 0);
    CHECK(!bdi2.is_dirty);
    bdrv_close(bs);

    /* BDRV_O_NOCACHE: O_DIRECT, with unaligned requests bounced. */
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_NOCACHE | BDRV_O_CACHE_WB, NULL), 0);
    model_pwrite(bs, model, 6 * MiB + 1, 10000, 12);
    model_check(bs, model, 6 * MiB, 16384);
    bdrv_close(bs);
    bdrv_delete(bs);
    h_verify_image(img, model, 12 * MiB);
    free(model);
}

static void test_backing(void)
{
    const char *base = h_path("api-base.raw"), *base2 = h_path("api-base2.raw");
    const char *top = h_path("api-top.qcow2");
    const size_t size = 2 * MiB;
    unsigned char *b1 = malloc(size), *b2 = malloc(size), *buf = malloc(size), *model = malloc(size);
    h_fill(b1, size, 21);
    h_fill(b2, size, 22);

    /* Two raw bases written through the ABI; drv NULL probes them as raw. */
    CHECK_INT(bdrv_img_create(base, "raw", NULL, NULL, NULL, size, 0), 0);
    CHECK_INT(bdrv_img_create(base2, "raw", NULL, NULL, "size=2M", 0, 0), 0);
    const char *bases[2] = {base, base2};
    unsigned char *datas[2] = {b1, b2};
    for (int i = 0; i < 2; i++) {
        BlockDriverState *bs = open_or_die(bases[i], BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL);
        CHECK_STR(bdrv_get_format_name(bs), "raw");
        CHECK_INT(bdrv_getlength(bs), size);
        CHECK_INT(bdrv_pwrite(bs, 0, datas[i], (int)size), (int)size);
        CHECK_INT(bdrv_get_info(bs, &(BlockDriverInfo){0}), -ENOTSUP);
        CHECK_INT(bdrv_make_empty(bs), -ENOTSUP);
        int pnum = 0;
        CHECK_INT(bdrv_is_allocated(bs, 0, 8, &pnum), 1);
        bdrv_delete(bs);
    }

    /* Overlay; its size comes from the backing file ((uint64_t)-1). */
    CHECK_INT(bdrv_img_create(top, "qcow2", "api-base.raw", "raw", NULL, (uint64_t)-1, 0), 0);
    BlockDriverState *bs = open_or_die(top, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL);
    CHECK_INT(bdrv_getlength(bs), size);
    CHECK_INT(bdrv_pread(bs, 0, buf, (int)size), (int)size);
    CHECK_MEM(buf, b1, size);
    int pnum = 0;
    CHECK_INT(bdrv_is_allocated(bs, 0, 16, &pnum), 0); /* it is the base's */
    memcpy(model, b1, size);
    model_pwrite(bs, model, 100000, 300000, 23);
    CHECK_INT(bdrv_is_allocated(bs, 100000 / 512, 1, &pnum), 1);
    model_check(bs, model, 0, (int)size);

    /* make_empty: everything reads from the base again. */
    CHECK_INT(bdrv_make_empty(bs), 0);
    CHECK_INT(bdrv_pread(bs, 0, buf, (int)size), (int)size);
    CHECK_MEM(buf, b1, size);
    model_pwrite(bs, model, 0, 70000, 24);
    memcpy(model + 70000, b1 + 70000, size - 70000);
    model_check(bs, model, 0, (int)size);

    /* Point the overlay at the other base; it takes effect on reopen. */
    CHECK_INT(bdrv_change_backing_file(bs, "api-base2.raw", "raw"), 0);
    bdrv_close(bs);
    char *info = h_capture("qemu-img info '%s'", top);
    CHECK(info && strstr(info, "backing file: api-base2.raw"));
    CHECK(info && strstr(info, "backing file format: raw"));
    free(info);
    /* Clusters 0 and 1 (64 KiB each) are allocated in the overlay, the tail
     * of cluster 1 copied from the first base; the rest now reads base2. */
    memcpy(model + 131072, b2 + 131072, size - 131072);
    h_verify_image(top, model, size);

    CHECK_INT(bdrv_open(bs, top, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL), 0);
    model_check(bs, model, 0, (int)size);
    bdrv_close(bs);

    /* BDRV_O_NO_BACKING: unallocated parts read as zeros. */
    CHECK_INT(bdrv_open(bs, top, BDRV_O_NO_BACKING, NULL), 0);
    CHECK_INT(bdrv_pread(bs, 1 * MiB, buf, 4096), 4096);
    memset(b2, 0, 4096);
    CHECK_MEM(buf, b2, 4096);
    model_check(bs, model, 0, 70000);
    bdrv_delete(bs);

    free(b1);
    free(b2);
    free(buf);
    free(model);
}

static void test_driver_table(void)
{
    CHECK_STR(bdrv_qcow2.format_name, "qcow2");
    CHECK_STR(bdrv_raw.format_name, "raw");
    CHECK(bdrv_find_format("qcow2") == &bdrv_qcow2);
    CHECK(bdrv_find_format("raw") == &bdrv_raw);
    CHECK(bdrv_find_format("vmdk") == NULL);
    CHECK(bdrv_qcow2.instance_size > 0);
    CHECK(bdrv_version() != NULL && bdrv_version()[0] != 0);

    /* Every qcow2 member is set; raw leaves the qcow2-only ones NULL. */
    CHECK(bdrv_qcow2.bdrv_amend_options == bdrv_amend_options);
    CHECK(bdrv_qcow2.bdrv_snapshot_create == bdrv_snapshot_create &&
          bdrv_qcow2.bdrv_snapshot_goto == bdrv_snapshot_goto);
    CHECK(bdrv_qcow2.bdrv_snapshot_delete == bdrv_snapshot_delete &&
          bdrv_qcow2.bdrv_snapshot_list == bdrv_snapshot_list);
    CHECK(bdrv_qcow2.bdrv_write_compressed == bdrv_write_compressed);
    CHECK(bdrv_qcow2.bdrv_check == bdrv_check);
    CHECK(bdrv_qcow2.bdrv_snapshot_load_tmp == bdrv_snapshot_load_tmp);
    CHECK(bdrv_raw.bdrv_get_info == NULL && bdrv_raw.bdrv_make_empty == NULL);

    /* Probe. */
    unsigned char hdr[16] = {'Q', 'F', 'I', 0xfb, 0, 0, 0, 3};
    CHECK_INT(bdrv_qcow2.bdrv_probe(hdr, sizeof(hdr), "x"), 100);
    hdr[7] = 1;
    CHECK_INT(bdrv_qcow2.bdrv_probe(hdr, sizeof(hdr), "x"), 0);
    CHECK_INT(bdrv_qcow2.bdrv_probe(hdr, 4, "x"), 0);
    CHECK_INT(bdrv_qcow2.bdrv_probe(NULL, 0, "x"), 0);
    CHECK_INT(bdrv_raw.bdrv_probe(hdr, sizeof(hdr), "x"), 1);

    /* Options: copy the driver's list, parse a -o string into it, create. */
    QEMUOptionParameter *defaults = bdrv_qcow2.create_options;
    QEMUOptionParameter *cs = get_option_parameter(defaults, BLOCK_OPT_CLUSTER_SIZE);
    CHECK(cs != NULL && cs->type == OPT_SIZE && cs->value.n == 65536 && cs->help != NULL);
    CHECK(get_option_parameter(defaults, BLOCK_OPT_LAZY_REFCOUNTS) != NULL);
    CHECK(get_option_parameter(defaults, BLOCK_OPT_COMPAT_LEVEL)->type == OPT_STRING);
    CHECK(get_option_parameter(defaults, "nonsense") == NULL);

    QEMUOptionParameter *opts = parse_option_parameters("size=1M,compat=0.10,cluster_size=512,backing_fmt=a,,b",
                                                        defaults, NULL);
    CHECK(opts != NULL);
    if (opts) {
        CHECK_INT(get_option_parameter(opts, BLOCK_OPT_SIZE)->value.n, 1 * MiB);
        CHECK_STR(get_option_parameter(opts, BLOCK_OPT_COMPAT_LEVEL)->value.s, "0.10");
        CHECK_STR(get_option_parameter(opts, BLOCK_OPT_BACKING_FMT)->value.s, "a,b");
        CHECK_INT(set_option_parameter(opts, BLOCK_OPT_BACKING_FMT, NULL), -EINVAL);
        /* The driver's own list is untouched. */
        CHECK(get_option_parameter(defaults, BLOCK_OPT_COMPAT_LEVEL)->value.s == NULL);
        CHECK_INT(set_option_parameter_int(opts, BLOCK_OPT_SIZE, 2 * MiB), 0);
        CHECK_INT(set_option_parameter(opts, BLOCK_OPT_LAZY_REFCOUNTS, "off"), 0);
        CHECK_INT(set_option_parameter(opts, BLOCK_OPT_PREALLOC, "metadata"), 0);
        CHECK_INT(set_option_parameter(opts, BLOCK_OPT_PREALLOC, "off"), 0); /* replaces the string */
        QEMUOptionParameter *fmt = get_option_parameter(opts, BLOCK_OPT_BACKING_FMT);
        free(fmt->value.s); /* string values are malloc()ed */
        fmt->value.s = NULL;
        /* The same list parsed again in place. */
        CHECK(parse_option_parameters("refcount_bits=16", defaults, opts) == opts);

        const char *img = h_path("api-created.qcow2");
        CHECK_INT(bdrv_create(&bdrv_qcow2, img, opts), 0);
        free_option_parameters(opts);
        char *dump = h_dump(img);
        CHECK_INT(h_dump_field(dump, "version"), 2);
        CHECK_INT(h_dump_field(dump, "cluster_bits"), 9);
        CHECK_INT(h_dump_field(dump, "size"), 2 * MiB);
        free(dump);
        unsigned char *zeros = calloc(1, 2 * MiB);
        h_verify_image(img, zeros, 2 * MiB);
        free(zeros);

        /* The driver member does the same. */
        QEMUOptionParameter *o2 = parse_option_parameters("size=64k,lazy_refcounts", defaults, NULL);
        CHECK(o2 != NULL);
        const char *img2 = h_path("api-created2.qcow2");
        CHECK_INT(bdrv_qcow2.bdrv_create(img2, o2), 0);
        free_option_parameters(o2);
        dump = h_dump(img2);
        CHECK_INT(h_dump_field(dump, "version"), 3);
        CHECK_STR(h_dump_text(dump, "compatible_features"), "[0]");
        free(dump);
        CHECK_INT(h_qemu_check(img2), 0);

        /* Raw through its driver, and everything through the qcow2 table. */
        QEMUOptionParameter *o3 = parse_option_parameters("size=128k", bdrv_raw.create_options, NULL);
        const char *img3 = h_path("api-created3.raw");
        CHECK_INT(bdrv_raw.bdrv_create(img3, o3), 0);
        free_option_parameters(o3);
        struct stat st;
        CHECK(stat(img3, &st) == 0 && st.st_size == 128 * 1024);
        /* Raw preallocation and extent size hint, through both entry points
         * (QEMU's file driver options): the file is allocated as asked. */
        QEMUOptionParameter *o4 =
            parse_option_parameters("size=1M,preallocation=full", bdrv_raw.create_options, NULL);
        CHECK(o4 != NULL);
        const char *img4 = h_path("api-created4.raw");
        CHECK_INT(bdrv_raw.bdrv_create(img4, o4), 0);
        free_option_parameters(o4);
        CHECK(stat(img4, &st) == 0 && st.st_size == MiB && st.st_blocks * 512 >= MiB);
        const char *img5 = h_path("api-created5.raw");
        CHECK_INT(bdrv_img_create(img5, "raw", NULL, NULL, "preallocation=falloc,extent_size_hint=2M", MiB, 0), 0);
        CHECK(stat(img5, &st) == 0 && st.st_size == MiB && st.st_blocks * 512 >= MiB);
        CHECK_INT(bdrv_img_create(img5, "raw", NULL, NULL, "preallocation=metadata", MiB, 0), -EINVAL);
        CHECK_INT(bdrv_img_create(img5, "raw", NULL, NULL, "cluster_size=4k", MiB, 0), -EINVAL);
        unsigned char *zero1m = calloc(1, MiB);
        size_t got_n = 0;
        unsigned char *got4 = h_qemu_contents(img4, &got_n);
        CHECK(got4 != NULL && got_n == MiB && memcmp(got4, zero1m, MiB) == 0);
        free(got4);
        free(zero1m);

        BlockDriverState *bs = bdrv_new("tbl");
        CHECK_INT(bdrv_qcow2.bdrv_open(bs, img2, BDRV_O_RDWR | BDRV_O_CACHE_WB), 0);
        unsigned char w[1000], r[1000];
        h_fill(w, sizeof(w), 31);
        CHECK_INT(bdrv_qcow2.bdrv_pwrite(bs, 60000, w, 1000), 1000);
        CHECK_INT(bdrv_qcow2.bdrv_pread(bs, 60000, r, 1000), 1000);
        CHECK_MEM(r, w, sizeof(w));
        CHECK_INT(bdrv_qcow2.bdrv_getlength(bs), 65536);
        CHECK_INT(bdrv_qcow2.bdrv_flush(bs), 0);
        BdrvCheckResult res;
        memset(&res, 0xff, sizeof(res));
        CHECK_INT(bdrv_qcow2.bdrv_check(bs, &res, BDRV_FIX_LEAKS | BDRV_FIX_ERRORS), 0);
        CHECK_INT(res.corruptions + res.leaks + res.check_errors, 0);
        CHECK_INT(res.corruptions_fixed + res.leaks_fixed, 0);
        CHECK_INT(res.bfi.total_clusters, 1);
        CHECK_INT(res.bfi.allocated_clusters, 1);
        CHECK(res.image_end_offset > 0 && res.image_end_offset % 65536 == 0);
        bdrv_qcow2.bdrv_close(bs);
        /* The qcow2 driver refuses a raw file. */
        CHECK(bdrv_qcow2.bdrv_open(bs, img3, 0) < 0);
        CHECK_INT(bdrv_raw.bdrv_open(bs, img3, 0), 0);
        CHECK_STR(bdrv_get_format_name(bs), "raw");
        bdrv_delete(bs);
        CHECK_INT(h_qemu_check(img2), 0);
        size_t n;
        unsigned char *view = h_qemu_contents(img2, &n);
        CHECK(view && n == 65536 && memcmp(view + 60000, w, sizeof(w)) == 0);
        free(view);
    }
    printf("-- print_option_help(bdrv_qcow2.create_options):\n");
    print_option_help(defaults);
}

int main(void)
{
    h_start("test_api");
    test_qcow2_io();
    test_backing();
    test_driver_table();
    return h_finish();
}
