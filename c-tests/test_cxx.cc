// test_cxx: block_int.h compiles as C++ (-Wall -Wextra -Werror) and the
// library works from C++: the BLOCK_OPT_* strings, the driver table, and a
// create / write / read / close round trip checked with qemu-img.
#include "block_int.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static int passed, failed;
#define CHECK(c)                                                              \
    do {                                                                      \
        if (c) {                                                              \
            passed++;                                                         \
        } else {                                                              \
            failed++;                                                         \
            std::fprintf(stderr, "FAIL %s:%d: %s (%s)\n", __FILE__, __LINE__, \
                         #c, bdrv_last_error());                              \
        }                                                                     \
    } while (0)

int main()
{
    std::printf("== test_cxx\n");
    const char *dir = std::getenv("OXQCOW_TEST_DIR");
    std::string img = std::string(dir ? dir : "/tmp") + "/cxx.qcow2";
    CHECK(std::string(BLOCK_OPT_LAZY_REFCOUNTS) == "lazy_refcounts");
    CHECK(std::string(BLOCK_OPT_COMPAT_LEVEL) == "compat");
    CHECK(BDRV_SECTOR_SIZE == 512);
    CHECK(std::string(bdrv_qcow2.format_name) == "qcow2");
    CHECK(bdrv_qcow2.bdrv_amend_options == bdrv_amend_options);
    CHECK(bdrv_qcow2.bdrv_snapshot_load_tmp == bdrv_snapshot_load_tmp);

    CHECK(bdrv_img_create(img.c_str(), "qcow2", nullptr, nullptr, "compat=1.1", 1 << 20,
                          BLOCK_FLAG_LAZY_REFCOUNTS) == 0);
    BlockDriverState *bs = bdrv_new("cxx");
    CHECK(bdrv_open(bs, img.c_str(), BDRV_O_RDWR | BDRV_O_CACHE_WB, &bdrv_qcow2) == 0);
    std::vector<unsigned char> w(70000), r(70000);
    for (size_t i = 0; i < w.size(); i++) {
        w[i] = static_cast<unsigned char>(i * 7);
    }
    CHECK(bdrv_pwrite(bs, 1000, w.data(), static_cast<int>(w.size())) == 70000);
    CHECK(bdrv_pread(bs, 1000, r.data(), static_cast<int>(r.size())) == 70000);
    CHECK(w == r);
    BdrvCheckResult res;
    CHECK(bdrv_check(bs, &res, BDRV_FIX_LEAKS | BDRV_FIX_ERRORS) == 0);
    CHECK(res.corruptions == 0 && res.leaks == 0 && res.bfi.allocated_clusters == 2);
    QEMUSnapshotInfo sn = QEMUSnapshotInfo();
    std::snprintf(sn.name, sizeof(sn.name), "cxx");
    CHECK(bdrv_snapshot_create(bs, &sn) == 0 && std::string(sn.id_str) == "1");
    QEMUSnapshotInfo *list = nullptr;
    CHECK(bdrv_snapshot_list(bs, &list) == 1 && std::string(list[0].name) == "cxx");
    bdrv_snapshot_list_free(list);
    QEMUOptionParameter *opts = parse_option_parameters("size=1M", bdrv_qcow2.create_options, nullptr);
    CHECK(opts != nullptr && get_option_parameter(opts, BLOCK_OPT_SIZE)->value.n == (1u << 20));
    free_option_parameters(opts);
    bdrv_delete(bs);
    CHECK(std::system(("qemu-img check -q '" + img + "'").c_str()) == 0);
    std::printf("RESULT test_cxx %d %d\n", passed, failed);
    return failed ? 1 : 0;
}
