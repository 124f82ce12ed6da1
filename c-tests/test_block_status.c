/*
 * test_block_status: bdrv_block_status() against `qemu-img map
 * --output=json` on the same image. A two-layer chain with every kind of
 * range: data, a data cluster holding only zeros, zero clusters (plain and
 * allocated), a compressed cluster, data and a zero cluster in the backing
 * file, and ranges no layer has. For each of qemu-img's entries the
 * calls over its range must agree on data, zero, present (ALLOCATED),
 * depth and, for uncompressed data, the host offset. Then the argument
 * rules (pnum bound, NULL map/depth, end of image, errors) and raw images.
 */
#include "harness.h"

#define KiB 1024
#define MiB (1024 * 1024)

struct map_entry {
    long long start, length, depth, offset;
    int data, zero, present;
};

static int json_bool(const char *s, const char *key)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *p = strstr(s, pat);
    return p && strncmp(p + strlen(pat), "true", 4) == 0;
}

/* qemu-img map's entries, one JSON object per line. */
static int qemu_map(const char *img, struct map_entry *e, int max)
{
    char *out = h_capture("qemu-img map --output=json '%s'", img);
    int n = 0;
    for (char *line = out ? strtok(out, "\n") : NULL; line && n < max; line = strtok(NULL, "\n")) {
        if (!strstr(line, "\"start\"")) {
            continue;
        }
        e[n].start = h_json_int(line, "start");
        e[n].length = h_json_int(line, "length");
        e[n].depth = h_json_int(line, "depth");
        e[n].offset = h_json_int(line, "offset"); /* -1 when absent */
        e[n].data = json_bool(line, "data");
        e[n].zero = json_bool(line, "zero");
        e[n].present = json_bool(line, "present");
        n++;
    }
    free(out);
    return n;
}

/* Every bdrv_block_status() answer over each qemu-img map entry agrees with it. */
static void compare_with_qemu(const char *img)
{
    struct map_entry e[256];
    int n = qemu_map(img, e, 256);
    CHECK(n > 0);
    BlockDriverState *bs = bdrv_new("status");
    CHECK_INT(bdrv_open(bs, img, 0, &bdrv_qcow2), 0);
    int64_t size = bdrv_getlength(bs);
    long long covered = 0;
    int mismatches = 0;
    for (int i = 0; i < n; i++) {
        CHECK_INT(e[i].start, covered);
        int64_t pos = e[i].start, end = e[i].start + e[i].length;
        while (pos < end) {
            int64_t pnum = -1, map = -1;
            int depth = -1;
            int r = bdrv_block_status(bs, pos, end - pos, &pnum, &map, &depth);
            if (r < 0 || pnum <= 0 || pnum > end - pos) {
                CHECK(r >= 0 && pnum > 0 && pnum <= end - pos);
                break;
            }
            int ok = !!(r & BDRV_BLOCK_DATA) == e[i].data &&
                     !!(r & BDRV_BLOCK_ZERO) == e[i].zero &&
                     !!(r & BDRV_BLOCK_ALLOCATED) == e[i].present && depth == e[i].depth;
            if (e[i].data) {
                /* Uncompressed data has an offset in both; compressed in neither. */
                ok = ok && !!(r & BDRV_BLOCK_OFFSET_VALID) == (e[i].offset >= 0);
                if (e[i].offset >= 0) {
                    ok = ok && map == e[i].offset + (pos - e[i].start);
                }
            }
            if (!ok) {
                mismatches++;
                fprintf(stderr,
                        "FAIL %s: at %lld: flags 0x%x depth %d map %lld; qemu-img map "
                        "{start %lld length %lld depth %lld data %d zero %d present %d offset %lld}\n",
                        img, (long long)pos, r, depth, (long long)map, e[i].start, e[i].length,
                        e[i].depth, e[i].data, e[i].zero, e[i].present, e[i].offset);
            }
            pos += pnum;
        }
        covered = end;
    }
    CHECK_INT(mismatches, 0);
    CHECK_INT(covered, size);
    bdrv_delete(bs);
}

static void test_chain(void)
{
    const char *base = h_path("bs_base.qcow2");
    const char *top = h_path("bs_top.qcow2");
    CHECK_INT(h_sh("qemu-img create -q -f qcow2 '%s' 4M", base), 0);
    CHECK_INT(h_sh("qemu-io -f qcow2 -c 'write -P 5 2M 256k' -c 'write -z 3M 64k' "
                   "-c 'write -P 6 3584k 64k' '%s' >/dev/null",
                   base),
              0);
    CHECK_INT(h_sh("qemu-img create -q -f qcow2 -b '%s' -F qcow2 '%s'", base, top), 0);
    CHECK_INT(h_sh("qemu-io -f qcow2 -c 'write -P 1 0 128k' -c 'write -P 0 128k 64k' "
                   "-c 'write -z 256k 128k' -c 'write -P 7 512k 128k' -c 'write -z 512k 64k' "
                   "-c 'write -z -u 576k 64k' -c 'write -c -P 9 1M 64k' "
                   "-c 'write -P 3 2112k 64k' -c 'write -z 3584k 64k' '%s' >/dev/null",
                   top),
              0);
    compare_with_qemu(base);
    compare_with_qemu(top);

    /* The cases one by one. */
    BlockDriverState *bs = bdrv_new("status");
    CHECK_INT(bdrv_open(bs, top, 0, &bdrv_qcow2), 0);
    int64_t pnum = 0, map = 0;
    int depth = -1;
    /* A data cluster of zeros is data, with its host offset. */
    int r = bdrv_block_status(bs, 128 * KiB, 64 * KiB, &pnum, &map, &depth);
    CHECK_INT(r, BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_OFFSET_VALID);
    CHECK_INT(pnum, 64 * KiB);
    CHECK_INT(depth, 0);
    CHECK(map > 0 && map % (64 * KiB) == 0);
    /* A zero cluster of this layer. */
    CHECK_INT(bdrv_block_status(bs, 256 * KiB, 1 * MiB, &pnum, &map, &depth),
              BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED);
    CHECK_INT(pnum, 128 * KiB);
    CHECK_INT(depth, 0);
    /* Compressed: data without an offset. */
    CHECK_INT(bdrv_block_status(bs, 1 * MiB, 64 * KiB, &pnum, &map, &depth),
              BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED);
    /* Data of the backing file. */
    CHECK_INT(bdrv_block_status(bs, 2 * MiB, 64 * KiB, &pnum, &map, &depth),
              BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_OFFSET_VALID);
    CHECK_INT(depth, 1);
    /* A zero cluster of the backing file. */
    CHECK_INT(bdrv_block_status(bs, 3 * MiB, 64 * KiB, &pnum, &map, &depth),
              BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED);
    CHECK_INT(depth, 1);
    /* In no layer: reads as zeros, not allocated, depth of the last layer. */
    CHECK_INT(bdrv_block_status(bs, 1536 * KiB, 64 * KiB, &pnum, &map, &depth), BDRV_BLOCK_ZERO);
    CHECK_INT(depth, 1);
    /* *pnum never exceeds `bytes`; map and depth may be NULL. */
    CHECK_INT(bdrv_block_status(bs, 10, 100, &pnum, NULL, NULL),
              BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_OFFSET_VALID);
    CHECK_INT(pnum, 100);
    /* At and past the end, and 0 bytes: 0 with *pnum = 0. */
    pnum = 7;
    CHECK_INT(bdrv_block_status(bs, 4 * MiB, 4096, &pnum, NULL, NULL), 0);
    CHECK_INT(pnum, 0);
    pnum = 7;
    CHECK_INT(bdrv_block_status(bs, 0, 0, &pnum, NULL, NULL), 0);
    CHECK_INT(pnum, 0);
    /* A request reaching past the end is cut at the end. */
    CHECK(bdrv_block_status(bs, 4 * MiB - 4096, 1 * MiB, &pnum, NULL, NULL) >= 0);
    CHECK_INT(pnum, 4096);
    /* Errors. */
    CHECK_INT(bdrv_block_status(bs, 0, 4096, NULL, NULL, NULL), -EINVAL);
    CHECK(strstr(bdrv_last_error(), "pnum") != NULL);
    CHECK_INT(bdrv_block_status(bs, -1, 4096, &pnum, NULL, NULL), -EINVAL);
    CHECK_INT(bdrv_block_status(bs, 0, -1, &pnum, NULL, NULL), -EINVAL);
    CHECK(bdrv_block_status(NULL, 0, 4096, &pnum, NULL, NULL) < 0);
    bdrv_close(bs);
    CHECK(bdrv_block_status(bs, 0, 4096, &pnum, NULL, NULL) < 0);
    bdrv_delete(bs);
}

static void test_raw(void)
{
    const char *img = h_path("bs.raw");
    CHECK_INT(h_sh("truncate -s 1M '%s'", img), 0);
    BlockDriverState *bs = bdrv_new("status");
    CHECK_INT(bdrv_open(bs, img, 0, &bdrv_raw), 0);
    int64_t pnum = 0, map = 0;
    int depth = -1;
    CHECK_INT(bdrv_block_status(bs, 4096, 1 * MiB, &pnum, &map, &depth),
              BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_OFFSET_VALID);
    CHECK_INT(pnum, 1 * MiB - 4096);
    CHECK_INT(map, 4096);
    CHECK_INT(depth, 0);
    bdrv_delete(bs);
}

int main(void)
{
    h_start("test_block_status");
    test_chain();
    test_raw();
    return h_finish();
}
