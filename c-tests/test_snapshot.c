/*
 * test_snapshot: internal snapshots through bdrv_snapshot_create / _goto /
 * _delete / _list, against QEMU both ways:
 *   - snapshots the library makes are listed by `qemu-img snapshot -l` and
 *     `qemu-img info --output=json` with the ID, name, date and VM clock
 *     given in QEMUSnapshotInfo, and `qemu-img snapshot -a` on a copy
 *     brings back exactly the contents they captured; our goto and
 *     QEMU's give the same contents and a clean image;
 *   - snapshots qemu-img makes are listed by bdrv_snapshot_list with
 *     QEMU's IDs, names and dates, applied by bdrv_snapshot_goto (by name
 *     and by ID) and deleted by bdrv_snapshot_delete, with the same
 *     contents as qemu-img's -a / -d on a copy and no leak in
 *     `qemu-img check`;
 *   - savevm / loadvm: VM state saved with bdrv_save_vmstate and kept by
 *     bdrv_snapshot_create (vm_state_size) is what qemu-io reads from the
 *     snapshot applied by qemu-img, comes back with bdrv_snapshot_goto +
 *     bdrv_load_vmstate, and leaves the current disk without it;
 *   - bdrv_snapshot_load_tmp shows a snapshot through a read-only handle:
 *     what `qemu-img convert -l` reads from the same snapshot, the file
 *     unchanged, the length the current disk's;
 * plus QEMU 1.x's rules: an empty id_str picks the next free number and is
 * written back, a used ID gives -EEXIST, names may repeat, a missing
 * snapshot gives -ENOENT, no snapshots lists 0 and NULL, load_tmp wants a
 * read-only handle (-EINVAL).
 */
#include "harness.h"

#include <time.h>

#define MiB (1024 * 1024)
#define KiB 1024
#define SIZE (4 * MiB)

static void model_write(BlockDriverState *bs, unsigned char *model, int64_t off, int len, uint64_t seed)
{
    unsigned char *buf = malloc((size_t)len);
    h_fill(buf, (size_t)len, seed);
    CHECK_INT(bdrv_pwrite(bs, off, buf, len), len);
    memcpy(model + off, buf, (size_t)len);
    free(buf);
}

static void read_compare(BlockDriverState *bs, const unsigned char *model)
{
    unsigned char *buf = malloc(SIZE);
    CHECK_INT(bdrv_pread(bs, 0, buf, SIZE), SIZE);
    CHECK_MEM(buf, model, SIZE);
    free(buf);
}

/* qemu-img's view of an image equals `model`, and qemu-img check is happy. */
static void qemu_sees(const char *img, const unsigned char *model)
{
    h_verify_image(img, model, SIZE);
}

/* The value of `key` in the snapshot object with ID `id` of
 * `qemu-img info --output=json` (a number, or -1). */
static long long snap_field(const char *json, const char *id, const char *key)
{
    char pat[256];
    snprintf(pat, sizeof(pat), "\"id\": \"%s\"", id);
    const char *p = json ? strstr(json, pat) : NULL;
    if (!p) {
        return -1;
    }
    const char *start = p, *end = strchr(p, '}');
    while (start > json && *start != '{') {
        start--;
    }
    snprintf(pat, sizeof(pat), "\"%s\": ", key);
    const char *k = strstr(start, pat);
    if (!k || (end && k > end)) {
        return -1;
    }
    return strtoll(k + strlen(pat), NULL, 0);
}

static void test_ours_read_by_qemu(void)
{
    printf("=== snapshots made by the library, read by qemu-img ===\n");
    char img[4096], qa[4096], qb[4096];
    snprintf(img, sizeof(img), "%s", h_path("snap-ours.qcow2"));
    snprintf(qa, sizeof(qa), "%s", h_path("snap-ours-a.qcow2"));
    snprintf(qb, sizeof(qb), "%s", h_path("snap-ours-b.qcow2"));
    unsigned char *m0 = calloc(1, SIZE), *m1 = malloc(SIZE), *m2 = malloc(SIZE), *m3 = malloc(SIZE);
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=1.1", SIZE, 0), 0);
    BlockDriverState *bs = bdrv_new("snap");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL), 0);

    QEMUSnapshotInfo *list = (QEMUSnapshotInfo *)1;
    CHECK_INT(bdrv_snapshot_list(bs, &list), 0); /* none yet: 0 and NULL */
    CHECK(list == NULL);

    model_write(bs, m0, 0, 1 * MiB, 1);
    memcpy(m1, m0, SIZE);
    QEMUSnapshotInfo sn;
    memset(&sn, 0, sizeof(sn));
    strcpy(sn.name, "first");
    sn.date_sec = 1234567890;
    sn.date_nsec = 123000;
    sn.vm_clock_nsec = 1500000000ull;
    CHECK_INT(bdrv_snapshot_create(bs, &sn), 0);
    CHECK_STR(sn.id_str, "1"); /* picked and written back */

    model_write(bs, m0, 512 * KiB, 1 * MiB, 2);
    memcpy(m2, m0, SIZE);
    memset(&sn, 0, sizeof(sn));
    strcpy(sn.id_str, "snapid7");
    strcpy(sn.name, "second");
    time_t before = time(NULL);
    CHECK_INT(bdrv_snapshot_create(bs, &sn), 0); /* date 0: now */
    CHECK(sn.date_sec >= (uint32_t)before - 1 && sn.date_sec <= (uint32_t)time(NULL) + 1);
    CHECK_STR(sn.id_str, "snapid7");
    CHECK_INT(bdrv_snapshot_create(bs, &sn), -EEXIST); /* the ID is taken */
    CHECK(strstr(bdrv_last_error(), "snapid7") != NULL);

    /* Names may repeat (qemu-img snapshot -c allows it); the ID is new. */
    memset(&sn, 0, sizeof(sn));
    strcpy(sn.name, "first");
    CHECK_INT(bdrv_snapshot_create(bs, &sn), 0);
    CHECK_STR(sn.id_str, "2");
    CHECK_INT(bdrv_snapshot_delete(bs, "2"), 0);

    model_write(bs, m0, 3 * MiB, 1 * MiB, 3);
    memcpy(m3, m0, SIZE);

    int n = bdrv_snapshot_list(bs, &list);
    CHECK_INT(n, 2);
    if (n == 2) {
        CHECK_STR(list[0].id_str, "1");
        CHECK_STR(list[0].name, "first");
        CHECK_INT(list[0].date_sec, 1234567890);
        CHECK_INT(list[0].date_nsec, 123000);
        CHECK_INT(list[0].vm_clock_nsec, 1500000000ll);
        CHECK_INT(list[0].vm_state_size, 0);
        CHECK_STR(list[1].id_str, "snapid7");
        CHECK_STR(list[1].name, "second");
    }
    bdrv_snapshot_list_free(list);
    bdrv_close(bs);
    qemu_sees(img, m3);

    /* qemu-img lists them with our ID, name, date and VM clock. */
    char *l = h_capture("TZ=UTC qemu-img snapshot -l '%s'", img);
    CHECK(l && strstr(l, "first") && strstr(l, "2009-02-13 23:31:30") && strstr(l, "0000:00:01.500"));
    CHECK(l && strstr(l, "snapid7") && strstr(l, "second"));
    free(l);
    char *json = h_capture("qemu-img info --output=json '%s'", img);
    CHECK_INT(snap_field(json, "1", "date-sec"), 1234567890);
    CHECK_INT(snap_field(json, "1", "date-nsec"), 123000);
    CHECK_INT(snap_field(json, "1", "vm-clock-sec"), 1);
    CHECK_INT(snap_field(json, "1", "vm-clock-nsec"), 500000000);
    CHECK_INT(snap_field(json, "1", "vm-state-size"), 0);
    CHECK(snap_field(json, "snapid7", "date-sec") >= (long long)before - 1);
    free(json);

    /* qemu-img snapshot -a on copies brings back what each captured. */
    CHECK_INT(h_copy(img, qa), 0);
    CHECK_INT(h_copy(img, qb), 0);
    CHECK_INT(h_sh("qemu-img snapshot -a first '%s'", qa), 0);
    CHECK_INT(h_sh("qemu-img snapshot -a snapid7 '%s'", qb), 0);
    qemu_sees(qa, m1);
    qemu_sees(qb, m2);

    /* Our goto gives the same: by name, then by ID. */
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    CHECK_INT(bdrv_snapshot_goto(bs, "first"), 0);
    read_compare(bs, m1);
    bdrv_close(bs);
    qemu_sees(img, m1);
    CHECK_INT(h_sh("qemu-img compare -q '%s' '%s'", img, qa), 0);
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    CHECK_INT(bdrv_snapshot_goto(bs, "snapid7"), 0);
    read_compare(bs, m2);
    /* Writes after a goto leave the snapshots alone. */
    memcpy(m0, m2, SIZE);
    model_write(bs, m0, 2 * MiB, 64 * KiB, 9);
    CHECK_INT(bdrv_snapshot_goto(bs, "1"), 0);
    read_compare(bs, m1);
    /* Delete by ID: the snapshot is gone for qemu-img too, no leak. */
    CHECK_INT(bdrv_snapshot_delete(bs, "1"), 0);
    CHECK_INT(bdrv_snapshot_goto(bs, "first"), -ENOENT);
    CHECK_INT(bdrv_snapshot_delete(bs, "1"), -ENOENT);
    bdrv_delete(bs);
    qemu_sees(img, m1);
    l = h_capture("qemu-img snapshot -l '%s'", img);
    CHECK(l && !strstr(l, "first") && strstr(l, "snapid7"));
    free(l);
    CHECK_INT(h_sh("qemu-img snapshot -a snapid7 '%s'", img), 0);
    qemu_sees(img, m2);
    free(m0);
    free(m1);
    free(m2);
    free(m3);
}

static void test_qemu_applied_by_us(void)
{
    printf("=== snapshots made by qemu-img, used through the library ===\n");
    char img[4096], qa[4096], qd[4096];
    snprintf(img, sizeof(img), "%s", h_path("snap-qemu.qcow2"));
    snprintf(qa, sizeof(qa), "%s", h_path("snap-qemu-a.qcow2"));
    snprintf(qd, sizeof(qd), "%s", h_path("snap-qemu-d.qcow2"));
    unsigned char *m1 = calloc(1, SIZE), *m2 = calloc(1, SIZE), *m3 = calloc(1, SIZE);
    CHECK_INT(h_sh("qemu-img create -q -f qcow2 '%s' 4M", img), 0);
    CHECK_INT(h_sh("qemu-io -c 'write -P 0x11 0 1M' '%s' >/dev/null", img), 0);
    memset(m1, 0x11, MiB);
    CHECK_INT(h_sh("qemu-img snapshot -c qsnap '%s'", img), 0);
    CHECK_INT(h_sh("qemu-io -c 'write -P 0x22 512k 1M' '%s' >/dev/null", img), 0);
    memcpy(m2, m1, SIZE);
    memset(m2 + 512 * KiB, 0x22, MiB);
    CHECK_INT(h_sh("qemu-img snapshot -c qsnap2 '%s'", img), 0);
    CHECK_INT(h_sh("qemu-io -c 'write -P 0x33 0 64k' '%s' >/dev/null", img), 0);
    memcpy(m3, m2, SIZE);
    memset(m3, 0x33, 64 * KiB);
    char *json = h_capture("qemu-img info --output=json '%s'", img);

    BlockDriverState *bs = bdrv_new("snap");
    CHECK_INT(bdrv_open(bs, img, 0, NULL), 0);
    QEMUSnapshotInfo *list = NULL;
    int n = bdrv_snapshot_list(bs, &list); /* read-only handles list too */
    CHECK_INT(n, 2);
    if (n == 2) {
        CHECK_STR(list[0].id_str, "1");
        CHECK_STR(list[0].name, "qsnap");
        CHECK_STR(list[1].id_str, "2");
        CHECK_STR(list[1].name, "qsnap2");
        CHECK_INT(list[0].date_sec, snap_field(json, "1", "date-sec"));
        CHECK_INT(list[0].date_nsec, snap_field(json, "1", "date-nsec"));
        CHECK_INT(list[1].date_sec, snap_field(json, "2", "date-sec"));
        CHECK_INT(list[1].vm_state_size, 0);
    }
    free(list); /* free() works as well as bdrv_snapshot_list_free() */
    free(json);
    read_compare(bs, m3);
    CHECK_INT(bdrv_snapshot_goto(bs, "qsnap"), -EACCES);
    bdrv_close(bs);

    CHECK_INT(h_copy(img, qa), 0);
    CHECK_INT(h_sh("qemu-img snapshot -a qsnap '%s'", qa), 0);

    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    CHECK_INT(bdrv_snapshot_goto(bs, "qsnap"), 0); /* by name */
    read_compare(bs, m1);
    bdrv_close(bs);
    qemu_sees(img, m1);
    CHECK_INT(h_sh("qemu-img compare -q '%s' '%s'", img, qa), 0);

    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    CHECK_INT(bdrv_snapshot_goto(bs, "2"), 0); /* by ID */
    read_compare(bs, m2);
    bdrv_close(bs);
    qemu_sees(img, m2);

    CHECK_INT(h_copy(img, qd), 0);
    CHECK_INT(h_sh("qemu-img snapshot -d qsnap '%s'", qd), 0);
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    CHECK_INT(bdrv_snapshot_delete(bs, "qsnap"), 0);
    CHECK_INT(bdrv_snapshot_list(bs, &list), 1);
    CHECK_STR(list ? list[0].name : NULL, "qsnap2");
    bdrv_snapshot_list_free(list);
    bdrv_delete(bs);
    qemu_sees(img, m2);
    CHECK_INT(h_sh("qemu-img compare -q '%s' '%s'", img, qd), 0);
    char *l = h_capture("qemu-img snapshot -l '%s'", img);
    CHECK(l && !strstr(l, "qsnap ") && strstr(l, "qsnap2"));
    free(l);
    /* The same freed clusters: the file ends where QEMU's copy ends. */
    char *a = h_capture("qemu-img check --output=json '%s'", img);
    char *b = h_capture("qemu-img check --output=json '%s'", qd);
    CHECK_INT(h_json_int(a, "image-end-offset"), h_json_int(b, "image-end-offset"));
    CHECK_INT(h_json_int(a, "leaks"), -1);
    free(a);
    free(b);

    /* The driver members are the entry points. */
    CHECK(bdrv_qcow2.bdrv_snapshot_list == bdrv_snapshot_list);
    free(m1);
    free(m2);
    free(m3);
}

#define VMS (300 * KiB + 123)

static void test_vmstate(void)
{
    printf("=== VM state: bdrv_save_vmstate, snapshot, goto, bdrv_load_vmstate ===\n");
    char img[4096], qa[4096];
    snprintf(img, sizeof(img), "%s", h_path("snap-vm.qcow2"));
    snprintf(qa, sizeof(qa), "%s", h_path("snap-vm-qemu.qcow2"));
    unsigned char *disk = calloc(1, SIZE), *state = malloc(VMS), *back = malloc(VMS);
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=1.1", SIZE, 0), 0);
    BlockDriverState *bs = bdrv_new("vm");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    model_write(bs, disk, 0, MiB, 51);
    memset(state, 0x5c, VMS);
    /* The stream written in pieces, as savevm writes it. */
    CHECK_INT(bdrv_save_vmstate(bs, state, 0, 100 * KiB), 100 * KiB);
    CHECK_INT(bdrv_save_vmstate(bs, state + 100 * KiB, 100 * KiB, VMS - 100 * KiB), VMS - 100 * KiB);
    CHECK_INT(bdrv_load_vmstate(bs, back, 0, VMS), VMS);
    CHECK_MEM(back, state, VMS);
    QEMUSnapshotInfo sn;
    memset(&sn, 0, sizeof(sn));
    strcpy(sn.name, "vm1");
    sn.vm_state_size = VMS;
    sn.vm_clock_nsec = 123456789;
    CHECK_INT(bdrv_snapshot_create(bs, &sn), 0);
    /* The current disk no longer holds the state (QEMU drops it too). */
    memset(back, 1, VMS);
    CHECK_INT(bdrv_load_vmstate(bs, back, 0, VMS), VMS);
    CHECK(back[0] == 0 && back[VMS - 1] == 0 && memcmp(back, back + 1, VMS - 1) == 0);
    model_write(bs, disk + 0, 0, 64 * KiB, 52); /* the disk moves on */
    QEMUSnapshotInfo *list = NULL;
    CHECK_INT(bdrv_snapshot_list(bs, &list), 1);
    CHECK_INT(list ? (long long)list[0].vm_state_size : -1, VMS);
    free(list);
    /* Errors. */
    CHECK_INT(bdrv_save_vmstate(bs, state, -1, 10), -EINVAL);
    CHECK_INT(bdrv_save_vmstate(bs, state, 0, -10), -EINVAL);
    CHECK_INT(bdrv_save_vmstate(bs, NULL, 0, 10), -EINVAL);
    CHECK_INT(bdrv_load_vmstate(bs, NULL, 0, 10), -EINVAL);
    CHECK_INT(bdrv_save_vmstate(NULL, state, 0, 10), -EINVAL);
    CHECK_INT(bdrv_save_vmstate(bs, state, 0, 0), 0);
    CHECK_INT(bdrv_save_vmstate(bs, state, INT64_MAX - 10, 100), -EINVAL);
    bdrv_close(bs);
    CHECK_INT(h_qemu_check(img), 0);
    char *json = h_capture("qemu-img info --output=json '%s'", img);
    CHECK_INT(snap_field(json, "1", "vm-state-size"), VMS);
    CHECK_INT(snap_field(json, "1", "vm-clock-nsec"), 123456789);
    free(json);

    /* QEMU applies the snapshot and reads the state we saved. */
    CHECK_INT(h_copy(img, qa), 0);
    CHECK_INT(h_sh("qemu-img snapshot -a vm1 '%s'", qa), 0);
    /* qemu-io reads whole sectors: the state's, then one past its end. */
    int whole = VMS / 512 * 512;
    CHECK_INT(h_sh("qemu-io -c 'read -b -P 0x5c 0 %d' -c 'read -b -P 0 %d 512' '%s' >'%s.out' && "
                   "! grep -q -e failed -e verification '%s.out' && test $(grep -c '^read ' '%s.out') = 2",
                   whole, whole + 512, qa, qa, qa, qa), 0);

    /* loadvm: goto, then the state; a read-only handle reads it too. */
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    CHECK_INT(bdrv_snapshot_goto(bs, "vm1"), 0);
    memset(back, 0, VMS);
    CHECK_INT(bdrv_load_vmstate(bs, back, 0, VMS), VMS);
    CHECK_MEM(back, state, VMS);
    bdrv_close(bs);
    CHECK_INT(bdrv_open(bs, img, 0, NULL), 0);
    memset(back, 0, VMS);
    CHECK_INT(bdrv_load_vmstate(bs, back + 1, 1, VMS - 1), VMS - 1);
    CHECK_MEM(back + 1, state + 1, VMS - 1);
    CHECK_INT(bdrv_save_vmstate(bs, state, 0, 10), -EACCES);
    bdrv_close(bs);
    CHECK_INT(h_qemu_check(img), 0);
    CHECK_INT(h_sh("qemu-img compare -q '%s' '%s'", img, qa), 0);

    /* Raw images have no VM state area. */
    char raw[4096];
    snprintf(raw, sizeof(raw), "%s", h_path("snap-vm.raw"));
    CHECK_INT(bdrv_img_create(raw, "raw", NULL, NULL, NULL, MiB, 0), 0);
    CHECK_INT(bdrv_open(bs, raw, BDRV_O_RDWR, NULL), 0);
    CHECK_INT(bdrv_save_vmstate(bs, state, 0, 10), -ENOTSUP);
    CHECK_INT(bdrv_load_vmstate(bs, back, 0, 10), -ENOTSUP);
    bdrv_delete(bs);
    free(disk);
    free(state);
    free(back);
}

static void test_load_tmp(void)
{
    printf("=== bdrv_snapshot_load_tmp: a snapshot through a read-only handle ===\n");
    char img[4096], view[4096];
    snprintf(img, sizeof(img), "%s", h_path("snap-tmp.qcow2"));
    snprintf(view, sizeof(view), "%s", h_path("snap-tmp-view.raw"));
    unsigned char *m1 = calloc(1, SIZE), *m2 = calloc(1, SIZE), *m3 = calloc(1, SIZE);
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=1.1", SIZE, 0), 0);
    BlockDriverState *bs = bdrv_new("tmp");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR, NULL), 0);
    model_write(bs, m1, 0, MiB, 41);
    model_write(bs, m1, 3 * MiB, 100 * KiB, 42);
    QEMUSnapshotInfo sn;
    memset(&sn, 0, sizeof(sn));
    strcpy(sn.name, "first");
    CHECK_INT(bdrv_snapshot_create(bs, &sn), 0);
    memcpy(m2, m1, SIZE);
    model_write(bs, m2, 512 * KiB, MiB, 43);
    CHECK_INT(bdrv_pwrite_zeroes(bs, 3 * MiB, 64 * KiB, 0), 0);
    memset(m2 + 3 * MiB, 0, 64 * KiB);
    strcpy(sn.name, "second");
    memset(sn.id_str, 0, sizeof(sn.id_str));
    CHECK_INT(bdrv_snapshot_create(bs, &sn), 0);
    memcpy(m3, m2, SIZE);
    model_write(bs, m3, 0, 64 * KiB, 44);
    CHECK_INT(bdrv_snapshot_load_tmp(bs, "first"), -EINVAL); /* read-write */
    CHECK_STR(bdrv_last_error(),
              "bdrv_snapshot_load_tmp: the image is open read-write (a snapshot loads on a read-only handle)");
    read_compare(bs, m3);
    bdrv_close(bs);
    size_t before_n = 0, after_n = 0;
    unsigned char *before = h_read_file(img, &before_n);

    CHECK_INT(bdrv_open(bs, img, 0, NULL), 0);
    read_compare(bs, m3);
    CHECK_INT(bdrv_snapshot_load_tmp(bs, "first"), 0); /* by name */
    read_compare(bs, m1);
    CHECK_INT(bdrv_getlength(bs), SIZE);
    CHECK_INT(bdrv_snapshot_load_tmp(bs, "2"), 0); /* by ID, replacing it */
    read_compare(bs, m2);
    CHECK_INT(bdrv_snapshot_load_tmp(bs, "third"), -ENOENT);
    read_compare(bs, m2); /* a failed load changes nothing */
    CHECK_INT(bdrv_pwrite(bs, 0, m1, 512), -EACCES);
    CHECK_INT(bdrv_snapshot_load_tmp(bs, NULL), -EINVAL);
    bdrv_close(bs);
    unsigned char *after = h_read_file(img, &after_n);
    CHECK(before && after && before_n == after_n && memcmp(before, after, before_n) == 0);
    free(before);
    free(after);

    /* The same bytes qemu-img reads from each snapshot. */
    const char *names[] = {"first", "second"};
    const unsigned char *models[] = {m1, m2};
    for (int i = 0; i < 2; i++) {
        CHECK_INT(h_sh("qemu-img convert -l snapshot.name=%s -O raw '%s' '%s'", names[i], img, view), 0);
        size_t vn = 0;
        unsigned char *v = h_read_file(view, &vn);
        CHECK(v && vn == SIZE && memcmp(v, models[i], SIZE) == 0);
        free(v);
    }
    CHECK_INT(h_qemu_check(img), 0);

    /* Raw images have no snapshots; the driver member is the entry point. */
    CHECK_INT(bdrv_open(bs, view, 0, &bdrv_raw), 0);
    CHECK_INT(bdrv_snapshot_load_tmp(bs, "first"), -ENOTSUP);
    bdrv_delete(bs);
    CHECK(bdrv_qcow2.bdrv_snapshot_load_tmp == bdrv_snapshot_load_tmp);
    CHECK(bdrv_raw.bdrv_snapshot_load_tmp == NULL);
    free(m1);
    free(m2);
    free(m3);
}

int main(void)
{
    h_start("test_snapshot");
    test_ours_read_by_qemu();
    test_qemu_applied_by_us();
    test_load_tmp();
    test_vmstate();
    return h_finish();
}
