/*
 * nbdkit-oxqcow-plugin: serves the guest view of a qcow2 image through
 * liboxqcow's public C ABI (block_int.h). Nothing here knows the library's
 * internals; the only format knowledge is the 8-byte header prefix (magic,
 * version) read with pread() to decide what fast zeroing can promise
 * (zero clusters need qcow2 v3).
 *
 *   nbdkit oxqcow FILE.qcow2 [readonly=true] [lazy-refcounts=on|off]
 *
 * One image handle serves every connection: it is opened in .get_ready
 * and closed in .cleanup/.unload (bdrv_close flushes and clears the dirty
 * bit). The ABI is thread safe, so the thread model is PARALLEL, and since
 * bdrv_flush makes every completed write of every connection durable,
 * multi-conn is advertised.
 */
#define NBDKIT_API_VERSION 2
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <nbdkit-plugin.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block_int.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

static char *filename;
static int readonly_opt;
static const char *lazy_opt; /* NULL, "on" or "off" */

static BlockDriverState *bs;
static bool writable;
static int cluster_size = 65536;
static int qcow2_version;     /* 2 or 3 (0 for raw images) */

static int fail(const char *what, int ret)
{
    nbdkit_error("%s: %s", what, bdrv_last_error());
    errno = -ret;
    nbdkit_set_error(-ret);
    return -1;
}

static int ox_config(const char *key, const char *value)
{
    if (strcmp(key, "file") == 0) {
        free(filename);
        filename = nbdkit_absolute_path(value);
        return filename ? 0 : -1;
    }
    if (strcmp(key, "readonly") == 0) {
        int r = nbdkit_parse_bool(value);
        if (r == -1) {
            return -1;
        }
        readonly_opt = r;
        return 0;
    }
    if (strcmp(key, "lazy-refcounts") == 0 || strcmp(key, "lazy_refcounts") == 0) {
        int r = nbdkit_parse_bool(value);
        if (r == -1) {
            return -1;
        }
        lazy_opt = r ? "on" : "off";
        return 0;
    }
    nbdkit_error("unknown parameter '%s'", key);
    return -1;
}

static int ox_config_complete(void)
{
    if (!filename) {
        nbdkit_error("you must supply the file=<FILE.qcow2> parameter");
        return -1;
    }
    return 0;
}

#define ox_config_help                                                                  \
    "[file=]<FILENAME>     (required) The qcow2 image to serve.\n"                      \
    "readonly=true         Open the image read-only.\n"                                 \
    "lazy-refcounts=on|off Override the image's lazy refcounts setting."

/* Magic and version from the image header. */
static void read_header_prefix(void)
{
    unsigned char h[8];
    qcow2_version = 0;
    int fd = open(filename, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return;
    }
    if (pread(fd, h, sizeof h, 0) == (ssize_t)sizeof h &&
        memcmp(h, "QFI\xfb", 4) == 0) {
        qcow2_version = (int)((uint32_t)h[4] << 24 | (uint32_t)h[5] << 16 |
                              (uint32_t)h[6] << 8 | h[7]);
    }
    close(fd);
}

static int ox_get_ready(void)
{
    char opts[64] = "";
    if (lazy_opt) {
        snprintf(opts, sizeof opts, "lazy-refcounts=%s", lazy_opt);
    }
    bs = bdrv_new("nbdkit");
    if (!bs) {
        nbdkit_error("bdrv_new: %s", bdrv_last_error());
        return -1;
    }
    int r = -EACCES;
    if (!readonly_opt) {
        r = bdrv_open_with_options(bs, filename, BDRV_O_RDWR | BDRV_O_CACHE_WB, &bdrv_qcow2,
                                   opts);
        writable = r == 0;
        if (r < 0 && r != -EACCES && r != -EROFS && r != -EPERM) {
            nbdkit_error("%s", bdrv_last_error());
            bdrv_delete(bs);
            bs = NULL;
            return -1;
        }
        if (r < 0) {
            nbdkit_debug("oxqcow: %s; serving read-only", bdrv_last_error());
        }
    }
    if (r < 0) {
        r = bdrv_open_with_options(bs, filename, BDRV_O_CACHE_WB, &bdrv_qcow2, opts);
        if (r < 0) {
            nbdkit_error("%s", bdrv_last_error());
            bdrv_delete(bs);
            bs = NULL;
            return -1;
        }
    }
    BlockDriverInfo bdi;
    if (bdrv_get_info(bs, &bdi) == 0 && bdi.cluster_size > 0) {
        cluster_size = bdi.cluster_size;
    }
    read_header_prefix();
    nbdkit_debug("oxqcow: opened %s (%s, v%d, cluster %d)", filename,
                 writable ? "read-write" : "read-only", qcow2_version, cluster_size);
    return 0;
}

static void ox_cleanup(void)
{
    if (bs) {
        bdrv_close(bs);
        const char *e = bdrv_last_error();
        if (e && *e) {
            nbdkit_debug("oxqcow: close: %s", e);
        }
        bdrv_delete(bs);
        bs = NULL;
    }
}

static void ox_unload(void)
{
    ox_cleanup();
    free(filename);
    filename = NULL;
}

static void ox_dump_plugin(void)
{
    printf("oxqcow_version=%s\n", bdrv_version());
}

static void *ox_open(int readonly)
{
    (void)readonly;
    return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t ox_get_size(void *h)
{
    (void)h;
    int64_t n = bdrv_getlength(bs);
    return n < 0 ? fail("getlength", (int)n) : n;
}

static int ox_block_size(void *h, uint32_t *minimum, uint32_t *preferred, uint32_t *maximum)
{
    (void)h;
    *minimum = 1;
    *preferred = cluster_size < 4096 ? 4096 : (uint32_t)cluster_size;
    *maximum = 0xffffffff;
    return 0;
}

static int ox_can_write(void *h)
{
    (void)h;
    return writable;
}

static int ox_can_flush(void *h)
{
    (void)h;
    return 1;
}

static int ox_is_rotational(void *h)
{
    (void)h;
    return 0;
}

static int ox_can_trim(void *h)
{
    (void)h;
    return writable;
}

static int ox_can_zero(void *h)
{
    (void)h;
    return writable;
}

static int ox_can_fast_zero(void *h)
{
    (void)h;
    return 1;
}

static int ox_can_fua(void *h)
{
    (void)h;
    return NBDKIT_FUA_NATIVE;
}

static int ox_can_multi_conn(void *h)
{
    (void)h;
    return 1;
}

static int ox_can_extents(void *h)
{
    (void)h;
    return 1;
}

static int ox_flush(void *h, uint32_t flags)
{
    (void)h;
    (void)flags;
    int r = bdrv_flush(bs);
    return r < 0 ? fail("flush", r) : 0;
}

static int fua(uint32_t flags)
{
    return (flags & NBDKIT_FLAG_FUA) ? ox_flush(NULL, 0) : 0;
}

static int ox_pread(void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
    (void)h;
    (void)flags;
    char *p = buf;
    while (count > 0) {
        int n = count > (1u << 30) ? (1 << 30) : (int)count;
        int r = bdrv_pread(bs, (int64_t)offset, p, n);
        if (r < 0) {
            return fail("pread", r);
        }
        p += n;
        offset += (uint64_t)n;
        count -= (uint32_t)n;
    }
    return 0;
}

static int ox_pwrite(void *h, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
    (void)h;
    const char *p = buf;
    while (count > 0) {
        int n = count > (1u << 30) ? (1 << 30) : (int)count;
        int r = bdrv_pwrite(bs, (int64_t)offset, p, n);
        if (r < 0) {
            return fail("pwrite", r);
        }
        p += n;
        offset += (uint64_t)n;
        count -= (uint32_t)n;
    }
    return fua(flags);
}

static int ox_trim(void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
    (void)h;
    int r = bdrv_pdiscard(bs, (int64_t)offset, count);
    if (r < 0) {
        return fail("trim", r);
    }
    return fua(flags);
}

/* 1 if [offset, offset+count) already reads as zeros (zero clusters, or
 * ranges no layer of the chain has), 0 if not, -errno. */
static int reads_as_zero(uint64_t offset, uint64_t count)
{
    uint64_t end = offset + count;
    while (offset < end) {
        int64_t pnum = 0;
        int r = bdrv_block_status(bs, (int64_t)offset, (int64_t)(end - offset), &pnum, NULL,
                                  NULL);
        if (r < 0) {
            return r;
        }
        if (!(r & BDRV_BLOCK_ZERO) || pnum <= 0) {
            return 0;
        }
        offset += (uint64_t)pnum;
    }
    return 1;
}

static int ox_zero(void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
    (void)h;
    uint64_t cs = (uint64_t)cluster_size;
    int64_t size = bdrv_getlength(bs);
    if (size < 0) {
        return fail("getlength", (int)size);
    }
    /* Partial clusters at either end that already read as zeros need no
     * work; whole clusters become zero clusters (metadata only) on v3. */
    uint64_t start = offset, end = offset + count;
    if (start % cs && start < end) {
        uint64_t head_end = (start / cs + 1) * cs;
        if (head_end > end) {
            head_end = end;
        }
        int z = reads_as_zero(start, head_end - start);
        if (z < 0) {
            return fail("zero", z);
        }
        if (z) {
            start = head_end;
        }
    }
    if (end % cs && end != (uint64_t)size && start < end) {
        uint64_t tail_start = end / cs * cs;
        if (tail_start < start) {
            tail_start = start;
        }
        int z = reads_as_zero(tail_start, end - tail_start);
        if (z < 0) {
            return fail("zero", z);
        }
        if (z) {
            end = tail_start;
        }
    }
    if (start >= end) {
        return fua(flags);
    }
    if (flags & NBDKIT_FLAG_FAST_ZERO) {
        bool aligned = start % cs == 0 && (end % cs == 0 || end == (uint64_t)size);
        int z = reads_as_zero(start, end - start);
        if (z < 0) {
            return fail("zero", z);
        }
        if (!z && !(aligned && qcow2_version >= 3)) {
            errno = ENOTSUP;
            nbdkit_set_error(ENOTSUP);
            return -1;
        }
    }
    int r = bdrv_pwrite_zeroes(bs, (int64_t)start, (int64_t)(end - start),
                               (flags & NBDKIT_FLAG_MAY_TRIM) ? BDRV_REQ_MAY_UNMAP : 0);
    if (r < 0) {
        return fail("zero", r);
    }
    return fua(flags);
}

/* Block status from bdrv_block_status, mapped as QEMU's NBD server maps
 * it: no BDRV_BLOCK_DATA → hole, BDRV_BLOCK_ZERO → zero. So data (also a
 * data cluster holding only zeros) is 0; zero clusters and ranges no layer
 * of the chain has are hole+zero; data of a backing file is data. */
static int ox_extents(void *h, uint32_t count, uint64_t offset, uint32_t flags,
                      struct nbdkit_extents *extents)
{
    (void)h;
    int64_t size = bdrv_getlength(bs);
    if (size < 0) {
        return fail("getlength", (int)size);
    }
    uint64_t end = offset + count;
    if (end > (uint64_t)size) {
        end = (uint64_t)size;
    }
    const bool req_one = flags & NBDKIT_FLAG_REQ_ONE;
    while (offset < end) {
        int64_t pnum = 0;
        int r = bdrv_block_status(bs, (int64_t)offset, (int64_t)(end - offset), &pnum, NULL,
                                  NULL);
        if (r < 0) {
            return fail("extents", r);
        }
        if (pnum <= 0) {
            break;
        }
        uint32_t type = ((r & BDRV_BLOCK_DATA) ? 0 : NBDKIT_EXTENT_HOLE) |
                        ((r & BDRV_BLOCK_ZERO) ? NBDKIT_EXTENT_ZERO : 0);
        if (nbdkit_add_extent(extents, offset, (uint64_t)pnum, type) < 0) {
            return -1;
        }
        offset += (uint64_t)pnum;
        if (req_one) {
            break;
        }
    }
    return 0;
}

static struct nbdkit_plugin plugin = {
    .name = "oxqcow",
    .longname = "oxqcow qcow2 plugin (liboxqcow)",
    .version = "0.1.0",
    .description = "Serves the guest view of a qcow2 image through liboxqcow",
    .magic_config_key = "file",
    .config = ox_config,
    .config_complete = ox_config_complete,
    .config_help = ox_config_help,
    .get_ready = ox_get_ready,
    .cleanup = ox_cleanup,
    .unload = ox_unload,
    .dump_plugin = ox_dump_plugin,
    .open = ox_open,
    .get_size = ox_get_size,
    .block_size = ox_block_size,
    .can_write = ox_can_write,
    .can_flush = ox_can_flush,
    .is_rotational = ox_is_rotational,
    .can_trim = ox_can_trim,
    .can_zero = ox_can_zero,
    .can_fast_zero = ox_can_fast_zero,
    .can_fua = ox_can_fua,
    .can_multi_conn = ox_can_multi_conn,
    .can_extents = ox_can_extents,
    .pread = ox_pread,
    .pwrite = ox_pwrite,
    .flush = ox_flush,
    .trim = ox_trim,
    .zero = ox_zero,
    .extents = ox_extents,
    .errno_is_preserved = 0,
};

NBDKIT_REGISTER_PLUGIN(plugin)
