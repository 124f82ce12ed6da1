/*
 * test_features: the create-time part of qemu-iotests 061 and the hostile
 * headers of 080 (section 8 of ../shared/qcow2-format.md). 039 and the
 * amend cases of 061 have their own programs (test_039, test_061).
 *
 * 061 (create-time part): lazy refcounts need compat=1.1.
 * 080 (hostile headers): each damaged field is refused with QEMU's
 *     message, the same text `qemu-img info` prints.
 */
#include "harness.h"
#include "qcow2hdr.h"

#define MiB (1024 * 1024)

static void test_061(void)
{
    const char *img = h_path("t061.qcow2");
    printf("=== 061: lazy refcounts need compat=1.1 ===\n");
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=0.10,lazy_refcounts=on", 64 * MiB, 0), -EINVAL);
    const char *want = "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)";
    const char *err = bdrv_last_error();
    CHECK(strlen(err) >= strlen(want) && strcmp(err + strlen(err) - strlen(want), want) == 0);
    char *q = h_capture("qemu-img create -f qcow2 -o compat=0.10,lazy_refcounts=on '%s' 64M 2>&1", h_path("t061-q.qcow2"));
    CHECK(q && strstr(q, want) != NULL);
    free(q);

    /* compat=1.1 with the flag: the compatible bit is set, nothing else. */
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=1.1", 64 * MiB, BLOCK_FLAG_LAZY_REFCOUNTS), 0);
    char *dump = h_dump(img);
    CHECK_STR(h_dump_text(dump, "compatible_features"), "[0]");
    CHECK_STR(h_dump_text(dump, "incompatible_features"), "[]");
    free(dump);
    unsigned char *zeros = calloc(1, 64 * MiB);
    h_verify_image(img, zeros, 64 * MiB);
    free(zeros);
}

/* Writes a big-endian value of `size` bytes at `off` (080's poke_file). */
static void poke(const char *img, long off, int size, uint64_t v)
{
    unsigned char b[8];
    for (int i = size - 1; i >= 0; i--, v >>= 8) {
        b[i] = (unsigned char)v;
    }
    FILE *f = fopen(img, "r+b");
    CHECK(f != NULL);
    if (f) {
        CHECK(fseek(f, off, SEEK_SET) == 0 && fwrite(b, 1, (size_t)size, f) == (size_t)size);
        fclose(f);
    }
}

/* 080: one damaged header field at a time. */
static void hostile(long off, int size, uint64_t value, const char *msg)
{
    const char *img = h_path("t080.qcow2");
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=1.1", 64 * MiB, 0), 0);
    poke(img, off, size, value);
    char want[4096];
    snprintf(want, sizeof(want), "Could not open '%s': %s", img, msg);
    BlockDriverState *bs = bdrv_new("t080");
    int r = bdrv_open(bs, img, 0, NULL);
    CHECK(r < 0);
    if (r < 0) {
        CHECK_STR(bdrv_last_error(), want);
    }
    bdrv_delete(bs);
    char *q = h_capture("qemu-img info '%s' 2>&1 >/dev/null", img);
    if (q) {
        q[strcspn(q, "\n")] = 0;
    }
    char qwant[4200];
    snprintf(qwant, sizeof(qwant), "qemu-img: %s", want);
    CHECK_STR(q, qwant);
    free(q);
}

static void test_080(void)
{
    printf("=== 080: hostile headers ===\n");
    /* field offsets: section 1.1/1.2 of ../shared/qcow2-format.md */
    hostile(100, 4, 0x20000, "qcow2 header exceeds cluster size");     /* header_length */
    hostile(100, 4, 100, "qcow2 header too short");                   /* header_length */
    hostile(56, 4, 0xffffff, "Reference count table too large");      /* refcount_table_clusters */
    hostile(48, 8, 0x12345, "Reference count table offset invalid");  /* refcount_table_offset */
    hostile(56, 4, 0, "Image does not contain a reference count table");
    hostile(36, 4, 0x10000000, "Active L1 table too large");          /* l1_size */
    hostile(40, 8, 0x12345, "Active L1 table offset invalid");        /* l1_table_offset */
    hostile(36, 4, 0, "L1 table is too small");                       /* l1_size */
    hostile(60, 4, 0xffffffff, "Snapshot table too large");           /* nb_snapshots */
    hostile(20, 4, 22, "Unsupported cluster size: 2^22");              /* cluster_bits */
    hostile(4, 4, 4, "Unsupported qcow2 version 4");                  /* version */
    hostile(8, 8, 0x20000, "Invalid backing file offset");            /* backing_file_offset */
}

int main(void)
{
    h_start("test_features");
    test_061();
    test_080();
    return h_finish();
}
