/*
 * demo_host: a small C host of liboxqcow (`make demo` builds and runs it).
 *
 * It creates a qcow2 image with lazy refcounts through the C ABI, writes
 * data across cluster boundaries and reads it back, prints the header dump
 * (in the format of QEMU's iotests tool, via c-tests/qcow2hdr.h) while the
 * image is open and dirty, closes it and shows the header is clean again.
 * `make demo` then runs `qemu-img check` on the result.
 *
 * Build by hand: cc demo_host.c -Ic-tests $(pkg-config --cflags --libs oxqcow)
 */
#include <block_int.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2hdr.h"

#define SIZE (64 * 1024 * 1024)

static int fail(const char *what)
{
    fprintf(stderr, "demo_host: %s: %s\n", what, bdrv_last_error());
    return 1;
}

static void dump(const char *path)
{
    QcowHeader h;
    if (qh_open(&h, path, "rb") == 0) {
        qh_dump(&h, stdout);
        qh_free(&h);
    }
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "host.qcow2";
    printf("liboxqcow %s\n", bdrv_version());

    if (bdrv_img_create(path, "qcow2", NULL, NULL, "compat=1.1", SIZE, BLOCK_FLAG_LAZY_REFCOUNTS) < 0) {
        return fail("bdrv_img_create");
    }
    printf("created %s: 64 MiB, compat=1.1, lazy refcounts\n", path);

    BlockDriverState *bs = bdrv_new("demo");
    if (bdrv_open(bs, path, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL) < 0) {
        return fail("bdrv_open");
    }

    /* 1 MiB of text-like data starting 1000 bytes before a cluster boundary. */
    const int len = 1 << 20;
    const int64_t off = 65536 - 1000;
    char *w = malloc(len), *r = malloc(len);
    for (int i = 0; i < len; i++) {
        w[i] = (char)('a' + (i * 7 + i / 4096) % 26);
    }
    if (bdrv_pwrite(bs, off, w, len) != len) {
        return fail("bdrv_pwrite");
    }
    if (bdrv_pread(bs, off, r, len) != len) {
        return fail("bdrv_pread");
    }
    printf("wrote and read back %d bytes at offset %lld: %s\n", len, (long long)off,
           memcmp(w, r, len) == 0 ? "identical" : "DIFFERENT");

    BlockDriverInfo bdi;
    if (bdrv_get_info(bs, &bdi) < 0) {
        return fail("bdrv_get_info");
    }
    printf("cluster_size %d, lazy refcounts %s, dirty %s\n", bdi.cluster_size,
           (bdi.flags & BLOCK_FLAG_LAZY_REFCOUNTS) ? "on" : "off", bdi.is_dirty ? "yes" : "no");
    if (bdrv_flush(bs) < 0) {
        return fail("bdrv_flush");
    }

    printf("\n--- header while open (the dirty bit is incompatible feature 0):\n");
    dump(path);

    bdrv_close(bs);
    bdrv_delete(bs);
    QcowHeader h;
    if (qh_open(&h, path, "rb") == 0) {
        printf("--- after bdrv_close: incompatible_features %s\n",
               h.v[QH_INCOMPATIBLE] == 0 ? "[] (clean)" : "still dirty");
        qh_free(&h);
    }
    int same = memcmp(w, r, len) == 0;
    free(w);
    free(r);
    return same ? 0 : 1;
}
