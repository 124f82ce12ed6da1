/*
 * test_static: the same library linked statically (liboxqcow.a): create,
 * write, read back, close, and qemu-img checks the result.
 */
#include "harness.h"

int main(void)
{
    h_start("test_static");
    const char *img = h_path("static.qcow2");
    enum { SIZE = 4 * 1024 * 1024, LEN = 300000 };
    static unsigned char model[SIZE], back[LEN];
    CHECK_INT(bdrv_img_create(img, "qcow2", NULL, NULL, "compat=1.1,lazy_refcounts=on", SIZE, 0), 0);
    BlockDriverState *bs = bdrv_new("static");
    CHECK_INT(bdrv_open(bs, img, BDRV_O_RDWR | BDRV_O_CACHE_WB, &bdrv_qcow2), 0);
    h_fill(model + 12345, LEN, 99);
    CHECK_INT(bdrv_pwrite(bs, 12345, model + 12345, LEN), LEN);
    CHECK_INT(bdrv_pread(bs, 12345, back, LEN), LEN);
    CHECK_MEM(back, model + 12345, LEN);
    BlockDriverInfo bdi;
    CHECK_INT(bdrv_get_info(bs, &bdi), 0);
    CHECK_INT(bdi.flags, BLOCK_FLAG_LAZY_REFCOUNTS);
    CHECK_INT(bdrv_pread(bs, SIZE, back, 1), -EIO);
    bdrv_delete(bs);
    h_verify_image(img, model, SIZE);
    return h_finish();
}
