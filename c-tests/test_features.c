/*
 * test_features: the header and feature-bit parts of qemu-iotests 039,
 * 061 and 080 that the library can do today (section 8 of
 * ../shared/qcow2-format.md).
 *
 * 039 (lazy refcounts): the dirty bit is set on disk while an image with
 *     lazy refcounts has unflushed allocations, and cleared by a clean
 *     close; a process that dies without closing leaves it set; a
 *     read-only open of such an image works, reads the data and keeps the
 *     bit; `qemu-img check -r all` repairs it; without lazy refcounts the
 *     bit is never set.
 * 061 (create-time part): lazy refcounts need compat=1.1.
 * 080 (hostile headers): each damaged field is refused with QEMU's
 *     message, the same text `qemu-img info` prints.
 */
#include "harness.h"
#include "qcow2hdr.h"

#define MiB (1024 * 1024)

static void write_pattern(BlockDriverState *bs, unsigned char *buf, size_t n)
{
    memset(buf, 0xa5, n);
    CHECK_INT(bdrv_pwrite(bs, 0, buf, (int)n), (int)n);
}

/* Opens `img` read-write, writes 512 bytes of 0x5a at 1 MiB (a cluster not
 * allocated yet), flushes, and exits the process without closing (what SIGKILL does
 * to QEMU in 039). */
static void crash_after_write(const char *img)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        BlockDriverState *bs = bdrv_new("crash");
        unsigned char buf[512];
        if (bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL) < 0) {
            _exit(2);
        }
        memset(buf, 0x5a, sizeof(buf));
        /* Flushed, so the data must survive; the dirty bit stays set. */
        _exit(bdrv_pwrite(bs, MiB, buf, 512) == 512 && bdrv_flush(bs) == 0 ? 0 : 3);
    }
    int status = -1;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

static void test_039(void)
{
    const char *img = h_path("t039.qcow2");
    unsigned char buf[512], back[512];
    printf("=== 039: lazy refcounts and the dirty bit ===\n");

    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=1.1,lazy_refcounts=on", 64 * MiB, 0), 0);
    BlockDriverState *bs = bdrv_new("t039");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL), 0);
    write_pattern(bs, buf, sizeof(buf));
    char *dump = h_dump(img);
    CHECK_STR(h_dump_text(dump, "incompatible_features"), "[0]"); /* dirty while open */
    free(dump);
    bdrv_close(bs);
    dump = h_dump(img);
    CHECK_STR(h_dump_text(dump, "incompatible_features"), "[]"); /* clean after close */
    free(dump);
    CHECK_INT(h_qemu_check(img), 0);

    /* Crash: the bit stays. */
    crash_after_write(img);
    dump = h_dump(img);
    CHECK_STR(h_dump_text(dump, "incompatible_features"), "[0]");
    free(dump);

    /* Read-only access works and keeps the bit. */
    CHECK_INT(bdrv_open(bs, img, 0, NULL), 0);
    BlockDriverInfo bdi;
    CHECK_INT(bdrv_get_info(bs, &bdi), 0);
    CHECK(bdi.is_dirty);
    CHECK_INT(bdrv_pread(bs, 0, back, sizeof(back)), (int)sizeof(back));
    CHECK_MEM(back, buf, sizeof(back));
    unsigned char crashed[512];
    memset(crashed, 0x5a, sizeof(crashed));
    CHECK_INT(bdrv_pread(bs, MiB, back, sizeof(back)), (int)sizeof(back));
    CHECK_MEM(back, crashed, sizeof(back));
    bdrv_close(bs);
    dump = h_dump(img);
    CHECK_STR(h_dump_text(dump, "incompatible_features"), "[0]");
    free(dump);

    /* A read-write open either repairs the image (bit clear after close)
     * or refuses with -ENOTSUP until the repair code lands. */
    const char *copy = h_path("t039-copy.qcow2");
    CHECK_INT(h_sh("cp '%s' '%s'", img, copy), 0);
    int r = bdrv_open(bs, copy, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL);
    CHECK(r == 0 || r == -ENOTSUP);
    if (r == 0) {
        bdrv_close(bs);
        dump = h_dump(copy);
        CHECK_STR(h_dump_text(dump, "incompatible_features"), "[]");
        free(dump);
        CHECK_INT(h_qemu_check(copy), 0);
    } else {
        CHECK(strstr(bdrv_last_error(), "dirty") != NULL);
    }

    /* qemu-img check -r all repairs and clears the bit. */
    CHECK(h_sh("qemu-img check -q -r all '%s' >/dev/null 2>&1", img) != 1);
    dump = h_dump(img);
    CHECK_STR(h_dump_text(dump, "incompatible_features"), "[]");
    free(dump);
    CHECK_INT(h_qemu_check(img), 0);
    size_t n;
    unsigned char *view = h_qemu_contents(img, &n);
    CHECK(view && n == 64 * MiB && memcmp(view, buf, sizeof(buf)) == 0 &&
          memcmp(view + MiB, crashed, sizeof(crashed)) == 0);
    free(view);

    /* Without lazy refcounts a crash never leaves the bit set. */
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=1.1,lazy_refcounts=off", 64 * MiB, 0), 0);
    crash_after_write(img);
    dump = h_dump(img);
    CHECK_STR(h_dump_text(dump, "incompatible_features"), "[]");
    CHECK_STR(h_dump_text(dump, "compatible_features"), "[]");
    free(dump);
    CHECK_INT(h_qemu_check(img), 0);
    bdrv_delete(bs);
}

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
    test_039();
    test_061();
    test_080();
    return h_finish();
}
