/*
 * test_compressed: bdrv_write_compressed() (QEMU's one-cluster compressed
 * write, what `qemu-img convert -c` does), for zlib and zstd images:
 *   - qemu-img reads back exactly what was written (`qemu-img compare`
 *     against a raw file of the same bytes) and `qemu-img check` is clean;
 *   - `qemu-img map --output=json` shows the compressible clusters as
 *     compressed, an incompressible one as plain data, and the last,
 *     partial cluster of the image compressed too;
 *   - bdrv_check's compressed_clusters equals qemu-img check's;
 *   - the file is as large as the one `qemu-img convert -c` makes from the
 *     same bytes (the same byte-wise packing);
 *   - overwriting part of a compressed cluster with bdrv_pwrite (copy on
 *     write out of the compressed cluster) keeps the rest;
 *   - QEMU's rules: sector_num must start a cluster, nb_sectors must be one
 *     cluster (or reach the end of the image), 0 sectors does nothing.
 */
#include "harness.h"

#define KiB 1024
#define CS (64 * KiB)
#define NCL 16
#define TAIL (8 * KiB)
#define SIZE (NCL * CS + TAIL) /* the last cluster is partial */
#define SPC (CS / 512)         /* sectors per cluster */

/* Compressible but not trivial: text with the cluster number in it. */
static void fill_text(unsigned char *buf, size_t n, int cl)
{
    char line[80];
    size_t pos = 0;
    for (int i = 0; pos < n; i++) {
        int k = snprintf(line, sizeof(line), "cluster %d line %d: the quick brown fox jumps over\n", cl, i);
        size_t take = (size_t)k < n - pos ? (size_t)k : n - pos;
        memcpy(buf + pos, line, take);
        pos += take;
    }
}

/* Whether qemu-img map reports the byte at `off` as compressed (1), as
 * uncompressed data (0), or something else (-1). */
static int map_compressed(const char *map, long long off)
{
    for (const char *p = map ? strstr(map, "{ \"start\": ") : NULL; p; p = strstr(p + 1, "{ \"start\": ")) {
        long long start = strtoll(p + 11, NULL, 10);
        const char *l = strstr(p, "\"length\": ");
        long long len = l ? strtoll(l + 10, NULL, 10) : 0;
        if (off >= start && off < start + len) {
            const char *end = strchr(p, '}');
            const char *c = strstr(p, "\"compressed\": true");
            const char *d = strstr(p, "\"data\": true");
            if (c && c < end) {
                return 1;
            }
            return d && d < end ? 0 : -1;
        }
    }
    return -1;
}

static void run(const char *type)
{
    printf("=== compressed writes, compression_type=%s ===\n", type);
    char img[4096], raw[4096], conv[4096], opts[256];
    snprintf(img, sizeof(img), "%s", h_path("compressed-%s.qcow2", type));
    snprintf(raw, sizeof(raw), "%s", h_path("compressed-%s.raw", type));
    snprintf(conv, sizeof(conv), "%s", h_path("compressed-%s-qemu.qcow2", type));
    snprintf(opts, sizeof(opts), "compat=1.1,compression_type=%s", type);
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, opts, SIZE, 0), 0);

    unsigned char *model = calloc(1, SIZE);
    for (int cl = 0; cl < NCL; cl++) {
        fill_text(model + (size_t)cl * CS, CS, cl);
    }
    h_fill(model + 3 * CS, CS, 77); /* cluster 3 does not compress */
    fill_text(model + (size_t)NCL * CS, TAIL, NCL);

    BlockDriverState *bs = bdrv_new("compressed");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL), 0);
    for (int cl = 0; cl < NCL; cl++) {
        CHECK_INT(bdrv_write_compressed(bs, (int64_t)cl * SPC, model + (size_t)cl * CS, SPC), 0);
    }
    /* The last, partial cluster: only up to the end of the image. */
    CHECK_INT(bdrv_write_compressed(bs, (int64_t)NCL * SPC, model + (size_t)NCL * CS, SPC), -EIO);
    CHECK_INT(bdrv_write_compressed(bs, (int64_t)NCL * SPC, model + (size_t)NCL * CS, TAIL / 512), 0);
    /* QEMU's rules. */
    CHECK_INT(bdrv_write_compressed(bs, 1, model, SPC), -EINVAL);      /* not at a cluster start */
    CHECK_INT(bdrv_write_compressed(bs, 0, model, SPC / 2), -EINVAL);  /* not one cluster */
    CHECK_INT(bdrv_write_compressed(bs, 0, model, 2 * SPC), -EINVAL);  /* two clusters */
    CHECK_INT(bdrv_write_compressed(bs, 5 * SPC, model, 0), 0);        /* nothing */
    CHECK_INT(bdrv_qcow2.bdrv_write_compressed(bs, 5 * SPC, model + 5 * CS, SPC), 0); /* the member */

    unsigned char *back = malloc(SIZE);
    CHECK_INT(bdrv_pread(bs, 0, back, SIZE), SIZE);
    CHECK_MEM(back, model, SIZE);
    bdrv_close(bs);

    FILE *f = fopen(raw, "wb");
    CHECK(f && fwrite(model, 1, SIZE, f) == SIZE);
    if (f) {
        fclose(f);
    }
    CHECK_INT(h_sh("qemu-img compare -q -f raw -F qcow2 '%s' '%s'", raw, img), 0);
    CHECK_INT(h_qemu_check(img), 0);

    char *map = h_capture("qemu-img map --output=json '%s'", img);
    for (int cl = 0; cl <= NCL; cl++) {
        int want = cl == 3 ? 0 : 1;
        if (map_compressed(map, (long long)cl * CS) != want) {
            printf("cluster %d: map says %d, expected %d\n", cl, map_compressed(map, (long long)cl * CS), want);
        }
        CHECK_INT(map_compressed(map, (long long)cl * CS), want);
    }
    free(map);

    /* Counters: bdrv_check and qemu-img check agree. */
    CHECK_INT(bdrv_open(bs, img, 0, NULL), 0);
    BdrvCheckResult r;
    CHECK_INT(bdrv_check(bs, &r, 0), 0);
    bdrv_close(bs);
    char *json = h_capture("qemu-img check --output=json '%s'", img);
    CHECK_INT(r.bfi.compressed_clusters, NCL); /* 15 full and the tail */
    CHECK_INT(r.bfi.compressed_clusters, h_json_int(json, "compressed-clusters"));
    CHECK_INT(r.bfi.allocated_clusters, h_json_int(json, "allocated-clusters"));
    CHECK_INT(r.image_end_offset, h_json_int(json, "image-end-offset"));
    free(json);

    /* qemu-img convert -c packs the same bytes into a file as large. */
    CHECK_INT(h_sh("qemu-img convert -c -f raw -O qcow2 -o '%s' '%s' '%s'", opts, raw, conv), 0);
    struct stat s1, s2;
    CHECK(stat(img, &s1) == 0 && stat(conv, &s2) == 0);
    CHECK_INT(s1.st_size, s2.st_size);
    CHECK_INT(h_sh("qemu-img compare -q '%s' '%s'", img, conv), 0);

    /* Copy on write out of a compressed cluster. */
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    unsigned char patch[3000];
    memset(patch, 0xee, sizeof(patch));
    CHECK_INT(bdrv_pwrite(bs, 7 * CS + 1000, patch, sizeof(patch)), (int)sizeof(patch));
    memcpy(model + 7 * CS + 1000, patch, sizeof(patch));
    bdrv_delete(bs);
    h_verify_image(img, model, SIZE);
    map = h_capture("qemu-img map --output=json '%s'", img);
    CHECK_INT(map_compressed(map, 7LL * CS), 0);
    CHECK_INT(map_compressed(map, 8LL * CS), 1);
    free(map);
    free(back);
    free(model);
}

int main(void)
{
    h_start("test_compressed");
    run("zlib");
    run("zstd");
    return h_finish();
}
