/*
 * test_threads: one handle used by 8 threads at once. Every thread writes
 * its own slices of the same clusters (so writers of one cluster race on
 * its allocation and copy-on-write) and random unaligned runs in a private
 * region, reading each write back at once; then all threads read the whole
 * image concurrently. Finally qemu-img checks the image and its contents
 * are compared with the model.
 */
#include "harness.h"

#include <pthread.h>

#define MiB (1024 * 1024)
#define NTHREADS 8
#define SIZE (48 * MiB)
#define SHARED_CLUSTERS 64 /* clusters 0..63: 8 KiB slice per thread */
#define PRIVATE_BASE (8 * MiB)
#define PRIVATE_SIZE (4 * MiB)

static BlockDriverState *bs;
static unsigned char *model;
static int errors[NTHREADS];

static void *writer(void *arg)
{
    int t = (int)(intptr_t)arg;
    unsigned char *buf = malloc(256 * 1024), *back = malloc(256 * 1024);
    uint64_t rnd = 0x12345678u + (uint64_t)t * 7919;
    for (int c = 0; c < SHARED_CLUSTERS; c++) {
        int64_t off = (int64_t)c * 65536 + t * 8192 + (c % 7) * 13;
        int len = 5000 + (t * 97 + c * 31) % 3000;
        h_fill(buf, (size_t)len, (uint64_t)(t * 1000 + c));
        if (bdrv_pwrite(bs, off, buf, len) != len) {
            errors[t]++;
        }
        memcpy(model + off, buf, (size_t)len);
    }
    for (int i = 0; i < 200; i++) {
        rnd ^= rnd << 13;
        rnd ^= rnd >> 7;
        rnd ^= rnd << 17;
        int len = 1 + (int)(rnd % (200 * 1024));
        int64_t off = PRIVATE_BASE + (int64_t)t * PRIVATE_SIZE + (int64_t)((rnd >> 20) % (PRIVATE_SIZE - (uint64_t)len));
        h_fill(buf, (size_t)len, rnd);
        if (bdrv_pwrite(bs, off, buf, len) != len) {
            errors[t]++;
        }
        memcpy(model + off, buf, (size_t)len);
        if (bdrv_pread(bs, off, back, len) != len || memcmp(back, buf, (size_t)len) != 0) {
            errors[t]++;
        }
        if (i % 50 == 0 && bdrv_flush(bs) != 0) {
            errors[t]++;
        }
    }
    free(buf);
    free(back);
    return NULL;
}

static void *reader(void *arg)
{
    int t = (int)(intptr_t)arg;
    const int chunk = 1 * MiB;
    unsigned char *buf = malloc((size_t)chunk);
    /* Each thread starts at a different place and walks the whole image. */
    for (int i = 0; i < SIZE / chunk; i++) {
        int64_t off = ((int64_t)(i + t * 5) % (SIZE / chunk)) * chunk;
        if (bdrv_pread(bs, off, buf, chunk) != chunk || memcmp(buf, model + off, (size_t)chunk) != 0) {
            errors[t]++;
        }
    }
    free(buf);
    return NULL;
}

static void run_all(void *(*fn)(void *))
{
    pthread_t th[NTHREADS];
    for (int t = 0; t < NTHREADS; t++) {
        CHECK_INT(pthread_create(&th[t], NULL, fn, (void *)(intptr_t)t), 0);
    }
    for (int t = 0; t < NTHREADS; t++) {
        pthread_join(th[t], NULL);
    }
    for (int t = 0; t < NTHREADS; t++) {
        CHECK_INT(errors[t], 0);
        errors[t] = 0;
    }
}

int main(void)
{
    h_start("test_threads");
    const char *img = h_path("threads.qcow2");
    model = calloc(1, SIZE);
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "lazy_refcounts=on", SIZE, 0), 0);
    bs = bdrv_new("threads");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL), 0);
    run_all(writer);
    run_all(reader);
    bdrv_delete(bs);
    h_verify_image(img, model, SIZE);

    /* Same again on a compat=0.10 image with writethrough (no CACHE_WB). */
    const char *img2 = h_path("threads-v2.qcow2");
    memset(model, 0, SIZE);
    CHECK_INT(bdrv_img_create(img2, "qcow2", NULL, NULL, "compat=0.10,cluster_size=16k", SIZE, 0), 0);
    bs = bdrv_new("threads2");
    CHECK_INT(bdrv_open(bs, img2, BDRV_O_RDWR, NULL), 0);
    run_all(writer);
    run_all(reader);
    bdrv_delete(bs);
    h_verify_image(img2, model, SIZE);
    free(model);
    return h_finish();
}
