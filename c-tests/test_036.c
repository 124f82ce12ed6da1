/*
 * test_036: port of today's qemu-iotests 036, "Test qcow2 feature bits"
 * (../shared/qcow2-format.md section 5.3), compat=1.1, 64 KiB clusters.
 *
 * Unknown incompatible bits, with no feature table, with the 14-byte
 * partial table, and with tables naming some of the bits: bdrv_open()
 * fails with -ENOTSUP and bdrv_last_error() gives exactly QEMU's message,
 * which is also compared with what `qemu-img info` prints for the same
 * file. Then an unknown autoclear bit: a read-write open clears it (a
 * read-only one does not) and the feature table keeps its size.
 */
#include "harness.h"
#include "qcow2hdr.h"

static const char *img;

/* Adds an extension whose data is `len` bytes from `data`, via stdin. */
static void add_ext_stdio(uint32_t magic, const void *data, size_t len)
{
    char cmd[4200];
    snprintf(cmd, sizeof(cmd), "'%s' '%s' add-header-ext-stdio %#x", h_tool(), img, magic);
    FILE *p = popen(cmd, "w");
    CHECK(p != NULL);
    if (p) {
        fwrite(data, 1, len, p);
        CHECK_INT(pclose(p), 0);
    }
}

/* One 48-byte feature table entry: type, bit, name padded as 036 does
 * (NUL then spaces). */
static void entry(unsigned char *out, int type, int bit, const char *name)
{
    memset(out, ' ', 48);
    out[0] = (unsigned char)type;
    out[1] = (unsigned char)bit;
    size_t n = strlen(name);
    memcpy(out + 2, name, n);
    out[2 + n] = 0;
}

/* Opens read-only through the ABI expecting failure; checks errno and the
 * message, and that qemu-img says the same. */
static void expect_unsupported(const char *what)
{
    char want[4096];
    snprintf(want, sizeof(want), "Could not open '%s': Unsupported qcow2 feature(s): %s", img, what);
    BlockDriverState *bs = bdrv_new("t036");
    CHECK_INT(bdrv_open(bs, img, 0, NULL), -ENOTSUP);
    CHECK_STR(bdrv_last_error(), want);
    /* A read-write open fails the same way. */
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, &bdrv_qcow2), -ENOTSUP);
    CHECK_STR(bdrv_last_error(), want);
    bdrv_delete(bs);

    char *q = h_capture("qemu-img info '%s' 2>&1 >/dev/null", img);
    if (q) {
        q[strcspn(q, "\n")] = 0;
    }
    char qwant[4200];
    snprintf(qwant, sizeof(qwant), "qemu-img: %s", want);
    CHECK_STR(q, qwant);
    free(q);
    printf("%s\n", want);
}

static void new_image_with_bits(const int *bits, int n)
{
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=1.1", 64 << 20, 0), 0);
    for (int i = 0; i < n; i++) {
        CHECK_INT(h_sh("'%s' '%s' set-feature-bit incompatible %d", h_tool(), img, bits[i]), 0);
    }
    CHECK_INT(h_sh("'%s' '%s' del-header-ext 0x6803f857", h_tool(), img), 0);
}

static void replace_table(const unsigned char *data, size_t len)
{
    CHECK_INT(h_sh("'%s' '%s' del-header-ext 0x6803f857 >/dev/null", h_tool(), img), 0);
    add_ext_stdio(0x6803f857, data, len);
}

int main(void)
{
    h_start("test_036");
    img = h_path("t036.qcow2");
    unsigned char t[4 * 48];

    printf("=== Image with unknown incompatible feature bit ===\n");
    new_image_with_bits((const int[]){63}, 1);
    char *dump = h_dump(img);
    CHECK_STR(h_dump_text(dump, "incompatible_features"), "[63]");
    CHECK_STR(h_dump_text(dump, "compatible_features"), "[]");
    CHECK_STR(h_dump_text(dump, "autoclear_features"), "[]");
    CHECK_INT(h_dump_field(dump, "header_length"), 112);
    CHECK(strstr(dump, "Header extension:") == NULL);
    free(dump);
    expect_unsupported("Unknown incompatible feature: 8000000000000000");

    /* The 14-byte partial table of 036: type 0, bit 63, "Test feature". */
    add_ext_stdio(0x6803f857, "\x00\x3f" "Test feature", 14);
    dump = h_dump(img);
    CHECK(strstr(dump, "length                    14\n") != NULL);
    free(dump);
    expect_unsupported("Test feature");

    printf("=== Image with multiple incompatible feature bits ===\n");
    new_image_with_bits((const int[]){61, 62, 63}, 3);
    expect_unsupported("Unknown incompatible feature: e000000000000000");

    replace_table((const unsigned char *)"\x00\x3f" "Test feature", 14);
    expect_unsupported("Test feature, Unknown incompatible feature: 6000000000000000");

    replace_table((const unsigned char *)"\x00\x3d" "Test feature", 14);
    expect_unsupported("Test feature, Unknown incompatible feature: c000000000000000");

    entry(t, 0, 61, "test1");
    entry(t + 48, 0, 62, "test2");
    replace_table(t, 96);
    expect_unsupported("test1, test2, Unknown incompatible feature: 8000000000000000");

    entry(t + 96, 0, 63, "test3");
    replace_table(t, 144);
    expect_unsupported("test1, test2, test3");

    /* Only incompatible entries count; bit 60 is named but not set. */
    entry(t, 1, 61, "test1");
    entry(t + 48, 0, 62, "test2");
    entry(t + 96, 2, 63, "test3");
    entry(t + 144, 0, 60, "test4");
    replace_table(t, 192);
    expect_unsupported("test2, Unknown incompatible feature: a000000000000000");

    printf("=== Create image with unknown autoclear feature bit ===\n");
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=1.1", 64 << 20, 0), 0);
    CHECK_INT(h_sh("'%s' '%s' set-feature-bit autoclear 63", h_tool(), img), 0);
    dump = h_dump(img);
    CHECK_STR(h_dump_text(dump, "autoclear_features"), "[63]");
    CHECK(strstr(dump, "magic                     0x6803f857 (Feature table)\nlength                    384\n") != NULL);
    printf("%s", dump);
    char *before = dump;

    /* A read-only open leaves the bit alone... */
    BlockDriverState *bs = bdrv_new("t036");
    CHECK_INT(bdrv_open(bs, img, 0, NULL), 0);
    bdrv_close(bs);
    dump = h_dump(img);
    CHECK_STR(dump, before);
    free(dump);

    printf("=== Repair image ===\n");
    /* ...a read-write open clears it, and nothing else changes. */
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL), 0);
    bdrv_delete(bs);
    CHECK_INT(h_qemu_check(img), 0);
    dump = h_dump(img);
    CHECK_STR(h_dump_text(dump, "autoclear_features"), "[]");
    CHECK(strstr(dump, "magic                     0x6803f857 (Feature table)\nlength                    384\n") != NULL);
    /* Apart from the autoclear line the dump is unchanged. */
    char *p1 = strstr(before, "autoclear_features"), *p2 = strstr(dump, "autoclear_features");
    CHECK(p1 && p2 && strcmp(strchr(p1, '\n'), strchr(p2, '\n')) == 0);
    printf("%s", dump);
    free(dump);
    free(before);
    return h_finish();
}
