/*
 * test_031: port of qemu-iotests 031, "all qcow2 header extensions survive
 * a header rewrite" (../shared/qcow2-format.md section 5.1), for
 * compat=0.10 and compat=1.1, 64 KiB clusters:
 *
 *   A  create 64M, add the unknown extension 0x12345678 with qcow2tool;
 *      dump; qemu-img check
 *   B  rewrite the header without a backing file
 *      (bdrv_change_backing_file(bs, "", NULL)); dump; qemu-img check
 *   C  add a backing file and format
 *      (bdrv_change_backing_file(bs, "/some/backing/file/path", "host_device")); dump
 *
 * Expected values come from the formula of section 5.1, and every dump is
 * also compared line by line with a second image taken through the same
 * steps by qemu-img (create, rebase -u -b "", rebase -u -b ... -F ...).
 */
#include "harness.h"
#include "qcow2hdr.h"

static const char *EXT_TEXT = "This is a test header extension";

/* What section 5.1 says the dump must contain after a step. */
typedef struct {
    int header_length;
    uint64_t backing_file_offset, backing_file_size;
    int n_exts;
    uint32_t magic[4], length[4];
} Expect;

static void check_header(const char *img, const Expect *e, int version)
{
    QcowHeader h;
    CHECK_INT(qh_open(&h, img, "rb"), 0);
    CHECK_INT(h.v[QH_MAGIC], 0x514649fb);
    CHECK_INT(h.v[QH_VERSION], version);
    CHECK_INT(h.v[QH_BACKING_FILE_OFFSET], e->backing_file_offset);
    CHECK_INT(h.v[QH_BACKING_FILE_SIZE], e->backing_file_size);
    CHECK_INT(h.v[QH_CLUSTER_BITS], 16);
    CHECK_INT(h.v[QH_SIZE], 67108864);
    CHECK_INT(h.v[QH_CRYPT_METHOD], 0);
    CHECK_INT(h.v[QH_L1_SIZE], 1);
    CHECK_INT(h.v[QH_L1_TABLE_OFFSET], 0x30000);
    CHECK_INT(h.v[QH_REFCOUNT_TABLE_OFFSET], 0x10000);
    CHECK_INT(h.v[QH_REFCOUNT_TABLE_CLUSTERS], 1);
    CHECK_INT(h.v[QH_NB_SNAPSHOTS], 0);
    CHECK_INT(h.v[QH_SNAPSHOT_OFFSET], 0);
    CHECK_INT(h.v[QH_INCOMPATIBLE], 0);
    CHECK_INT(h.v[QH_COMPATIBLE], 0);
    CHECK_INT(h.v[QH_AUTOCLEAR], 0);
    CHECK_INT(h.v[QH_REFCOUNT_ORDER], 4);
    CHECK_INT(h.v[QH_HEADER_LENGTH], e->header_length);
    CHECK_INT(h.n_exts, e->n_exts);
    for (int i = 0; i < e->n_exts && i < h.n_exts; i++) {
        CHECK_INT(h.exts[i].magic, e->magic[i]);
        CHECK_INT(h.exts[i].length, e->length[i]);
        if (h.exts[i].magic == 0x12345678) {
            CHECK(h.exts[i].length == strlen(EXT_TEXT) && memcmp(h.exts[i].data, EXT_TEXT, strlen(EXT_TEXT)) == 0);
        }
        if (h.exts[i].magic == 0xe2792aca) {
            CHECK(h.exts[i].length == 11 && memcmp(h.exts[i].data, "host_device", 11) == 0);
        }
    }
    if (e->backing_file_offset) {
        CHECK(h.backing_file && memcmp(h.backing_file, "/some/backing/file/path", 23) == 0);
    }
    qh_free(&h);
}

/* The dumps of our image and of qemu-img's are the same text. */
static void compare_dumps(const char *ours, const char *ref, const char *step)
{
    char *a = h_dump(ours), *b = h_dump(ref);
    CHECK(a && b && *a);
    if (a && b && strcmp(a, b) != 0) {
        fprintf(stderr, "step %s: dump differs from qemu-img's image:\n--- ours\n%s--- qemu-img\n%s", step, a, b);
    }
    CHECK_STR(a, b);
    free(a);
    free(b);
}

static void change_backing(const char *img, const char *file, const char *fmt)
{
    BlockDriverState *bs = bdrv_new("t031");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_CACHE_WB, &bdrv_qcow2), 0);
    CHECK_INT(bdrv_change_backing_file(bs, file, fmt), 0);
    bdrv_delete(bs);
}

static void run(const char *compat)
{
    int v3 = strcmp(compat, "1.1") == 0;
    char opts[64];
    snprintf(opts, sizeof(opts), "compat=%s", compat);
    printf("===== Testing with -o %s =====\n", opts);
    const char *img = h_path("t031-%s.qcow2", compat);
    const char *ref = h_path("t031-%s-qemu.qcow2", compat);

    /* Section 5.1: QEMU 10 writes a 112-byte v3 header, and the 8-entry
     * feature table into v3 images with clusters above 4 KiB only. */
    const int header_length = v3 ? 112 : 72;
    const int ft_entries = v3 ? 8 : 0;
    const uint32_t ft_len = (uint32_t)ft_entries * 48;
    const int unknown_ext = 8 + ((31 + 7) & ~7);      /* 40 */
    const int fmt_ext = 8 + ((11 + 7) & ~7);          /* 24 */
    const int ft_ext = ft_entries ? 8 + (int)ft_len : 0; /* 392 or 0 */
    const uint64_t bfo = (uint64_t)(header_length + fmt_ext + ft_ext + unknown_ext + 8);
    CHECK_INT(ft_len, v3 ? 384 : 0);
    CHECK_INT(bfo, v3 ? 0x240 : 0x90);

    Expect ab = {header_length, 0, 0, 0, {0}, {0}};
    if (v3) {
        ab.magic[ab.n_exts] = 0x6803f857;
        ab.length[ab.n_exts++] = ft_len;
    }
    ab.magic[ab.n_exts] = 0x12345678;
    ab.length[ab.n_exts++] = 31;

    Expect c = {header_length, bfo, 0x17, 0, {0}, {0}};
    c.magic[c.n_exts] = 0xe2792aca;
    c.length[c.n_exts++] = 11;
    if (v3) {
        c.magic[c.n_exts] = 0x6803f857;
        c.length[c.n_exts++] = ft_len;
    }
    c.magic[c.n_exts] = 0x12345678;
    c.length[c.n_exts++] = 31;

    printf("=== Create image with unknown header extension ===\n");
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, opts, 64 << 20, 0), 0);
    CHECK_INT(h_sh("qemu-img create -q -f qcow2 -o %s '%s' 64M", opts, ref), 0);
    CHECK_INT(h_sh("'%s' '%s' add-header-ext 0x12345678 '%s'", h_tool(), img, EXT_TEXT), 0);
    CHECK_INT(h_sh("'%s' '%s' add-header-ext 0x12345678 '%s'", h_tool(), ref, EXT_TEXT), 0);
    check_header(img, &ab, v3 ? 3 : 2);
    compare_dumps(img, ref, "A");
    unsigned char *zeros = calloc(1, 64 << 20);
    h_verify_image(img, zeros, 64 << 20); /* qemu-img check, and all zeros */
    char *dump_a = h_dump(img);

    printf("=== Rewrite header with no backing file ===\n");
    change_backing(img, "", NULL);
    CHECK_INT(h_sh("qemu-img rebase -u -b '' '%s'", ref), 0);
    check_header(img, &ab, v3 ? 3 : 2);
    compare_dumps(img, ref, "B");
    char *dump_b = h_dump(img);
    CHECK_STR(dump_b, dump_a); /* with QEMU 10 the rewrite changes nothing visible */
    h_verify_image(img, zeros, 64 << 20);
    free(zeros);

    printf("=== Add a backing file and format ===\n");
    change_backing(img, "/some/backing/file/path", "host_device");
    CHECK_INT(h_sh("qemu-img rebase -u -b /some/backing/file/path -F host_device '%s' 2>/dev/null", ref), 0);
    check_header(img, &c, v3 ? 3 : 2);
    compare_dumps(img, ref, "C");
    char *dump_c = h_dump(img);
    printf("%s", dump_c ? dump_c : "");
    free(dump_a);
    free(dump_b);
    free(dump_c);
}

int main(void)
{
    h_start("test_031");
    run("0.10");
    run("1.1");
    return h_finish();
}
