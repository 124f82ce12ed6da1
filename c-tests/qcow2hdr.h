/*
 * qcow2hdr.h: read, print and rewrite a qcow2 header (cluster 0) the way
 * QEMU's iotests header tool (tests/qemu-iotests/qcow2.py) does, for the C
 * test suite (c-tests/qcow2tool.c) and the demo host. Header-only; written
 * from the format description in ../shared/qcow2-format.md sections 1, 2
 * and 6, not from QEMU's code.
 *
 * Reading: the 104-byte version 3 header is read even for version 2, whose
 * feature words then count as 0, refcount_order as 4 and header_length as
 * 72. Extensions are read from header_length until an end marker (magic 0)
 * or the end of the area (the backing file name, or the end of cluster 0).
 *
 * Writing: every extension (old and new, each padded to 8 bytes) from
 * header_length, an 8-byte end marker, then the backing file name; the
 * fixed header fields last (72 bytes for version 2, 104 for version 3, so
 * bytes 104.. of a longer v3 header are left alone). Bytes between the new
 * end of the area and the old one are zeroed.
 */
#ifndef OXQCOW_QCOW2HDR_H
#define OXQCOW_QCOW2HDR_H

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { QH_DEC, QH_HEX, QH_MASK };

/* The 18 fields qcow2.py prints, in order, with their place in the file. */
static const struct {
    const char *name;
    int offset, size, fmt;
} qh_fields[] = {
    {"magic", 0, 4, QH_HEX},
    {"version", 4, 4, QH_DEC},
    {"backing_file_offset", 8, 8, QH_HEX},
    {"backing_file_size", 16, 4, QH_HEX},
    {"cluster_bits", 20, 4, QH_DEC},
    {"size", 24, 8, QH_DEC},
    {"crypt_method", 32, 4, QH_DEC},
    {"l1_size", 36, 4, QH_DEC},
    {"l1_table_offset", 40, 8, QH_HEX},
    {"refcount_table_offset", 48, 8, QH_HEX},
    {"refcount_table_clusters", 56, 4, QH_DEC},
    {"nb_snapshots", 60, 4, QH_DEC},
    {"snapshot_offset", 64, 8, QH_HEX},
    {"incompatible_features", 72, 8, QH_MASK},
    {"compatible_features", 80, 8, QH_MASK},
    {"autoclear_features", 88, 8, QH_MASK},
    {"refcount_order", 96, 4, QH_DEC},
    {"header_length", 100, 4, QH_DEC},
};
#define QH_NFIELDS ((int)(sizeof(qh_fields) / sizeof(qh_fields[0])))

/* Indices into QcowHeader.v. */
enum {
    QH_MAGIC, QH_VERSION, QH_BACKING_FILE_OFFSET, QH_BACKING_FILE_SIZE,
    QH_CLUSTER_BITS, QH_SIZE, QH_CRYPT_METHOD, QH_L1_SIZE, QH_L1_TABLE_OFFSET,
    QH_REFCOUNT_TABLE_OFFSET, QH_REFCOUNT_TABLE_CLUSTERS, QH_NB_SNAPSHOTS,
    QH_SNAPSHOT_OFFSET, QH_INCOMPATIBLE, QH_COMPATIBLE, QH_AUTOCLEAR,
    QH_REFCOUNT_ORDER, QH_HEADER_LENGTH
};

#define QH_MAX_EXTS 256

/* One header extension; data holds length bytes padded with zeros to 8. */
typedef struct {
    uint32_t magic;
    uint32_t length;
    unsigned char *data;
} QcowHeaderExt;

typedef struct {
    FILE *f;
    uint64_t v[18];
    uint64_t cluster_size;
    int n_exts;
    QcowHeaderExt exts[QH_MAX_EXTS];
    unsigned char *backing_file; /* NULL when there is none */
    uint64_t backing_file_len;
    uint64_t old_end; /* end of the extension area and backing name as read */
} QcowHeader;

static inline uint64_t qh_be(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++) {
        v = (v << 8) | p[i];
    }
    return v;
}

static inline void qh_put_be(unsigned char *p, int n, uint64_t v)
{
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

/* Reads n bytes at off; bytes past the end of the file read as zeros. */
static inline int qh_pread(FILE *f, unsigned char *buf, uint64_t n, uint64_t off)
{
    memset(buf, 0, n);
    if (fseeko(f, (off_t)off, SEEK_SET) != 0) {
        return -1;
    }
    (void)fread(buf, 1, n, f);
    return ferror(f) ? -1 : 0;
}

static inline int qh_pwrite(FILE *f, const unsigned char *buf, uint64_t n, uint64_t off)
{
    if (fseeko(f, (off_t)off, SEEK_SET) != 0 || fwrite(buf, 1, n, f) != n) {
        return -1;
    }
    return 0;
}

static inline void qh_free(QcowHeader *h)
{
    for (int i = 0; i < h->n_exts; i++) {
        free(h->exts[i].data);
    }
    h->n_exts = 0;
    free(h->backing_file);
    h->backing_file = NULL;
    if (h->f) {
        fclose(h->f);
        h->f = NULL;
    }
}

/* Opens and parses `path` ("rb" or "r+b"); prints why and returns -1 on failure. */
static inline int qh_open(QcowHeader *h, const char *path, const char *mode)
{
    unsigned char buf[104];
    memset(h, 0, sizeof(*h));
    h->f = fopen(path, mode);
    if (!h->f) {
        perror(path);
        return -1;
    }
    if (qh_pread(h->f, buf, sizeof(buf), 0) < 0) {
        perror(path);
        qh_free(h);
        return -1;
    }
    for (int i = 0; i < QH_NFIELDS; i++) {
        h->v[i] = qh_be(buf + qh_fields[i].offset, qh_fields[i].size);
    }
    if (h->v[QH_VERSION] == 2) {
        h->v[QH_INCOMPATIBLE] = h->v[QH_COMPATIBLE] = h->v[QH_AUTOCLEAR] = 0;
        h->v[QH_REFCOUNT_ORDER] = 4;
        h->v[QH_HEADER_LENGTH] = 72;
    }
    if (h->v[QH_CLUSTER_BITS] < 9 || h->v[QH_CLUSTER_BITS] > 21) {
        fprintf(stderr, "%s: cluster_bits %" PRIu64 " out of range\n", path, h->v[QH_CLUSTER_BITS]);
        qh_free(h);
        return -1;
    }
    h->cluster_size = (uint64_t)1 << h->v[QH_CLUSTER_BITS];

    uint64_t bfo = h->v[QH_BACKING_FILE_OFFSET];
    uint64_t end = bfo ? (bfo < h->cluster_size ? bfo : h->cluster_size) : h->cluster_size;
    uint64_t pos = h->v[QH_HEADER_LENGTH];
    while (pos < end) {
        unsigned char eh[8];
        if (qh_pread(h->f, eh, 8, pos) < 0) {
            break;
        }
        uint32_t magic = (uint32_t)qh_be(eh, 4), len = (uint32_t)qh_be(eh + 4, 4);
        pos += 8;
        if (magic == 0) {
            break;
        }
        uint64_t padded = ((uint64_t)len + 7) & ~(uint64_t)7;
        if (padded > h->cluster_size || h->n_exts == QH_MAX_EXTS) {
            fprintf(stderr, "%s: header extension %#x is too large\n", path, magic);
            qh_free(h);
            return -1;
        }
        QcowHeaderExt *e = &h->exts[h->n_exts++];
        e->magic = magic;
        e->length = len;
        e->data = calloc(1, padded + 1);
        if (!e->data || qh_pread(h->f, e->data, padded, pos) < 0) {
            qh_free(h);
            return -1;
        }
        pos += padded;
    }
    h->old_end = pos;
    if (bfo) {
        h->backing_file_len = h->v[QH_BACKING_FILE_SIZE];
        if (h->backing_file_len > h->cluster_size) {
            h->backing_file_len = h->cluster_size;
        }
        h->backing_file = calloc(1, h->backing_file_len + 1);
        if (!h->backing_file || qh_pread(h->f, h->backing_file, h->backing_file_len, bfo) < 0) {
            qh_free(h);
            return -1;
        }
        if (bfo + h->backing_file_len > h->old_end) {
            h->old_end = bfo + h->backing_file_len;
        }
    }
    return 0;
}

/* Appends an extension (data copied and padded to 8 bytes). */
static inline int qh_add_ext(QcowHeader *h, uint32_t magic, const void *data, uint32_t len)
{
    if (h->n_exts == QH_MAX_EXTS) {
        return -1;
    }
    uint64_t padded = ((uint64_t)len + 7) & ~(uint64_t)7;
    QcowHeaderExt *e = &h->exts[h->n_exts];
    e->data = calloc(1, padded + 1);
    if (!e->data) {
        return -1;
    }
    memcpy(e->data, data, len);
    e->magic = magic;
    e->length = len;
    h->n_exts++;
    return 0;
}

/* Removes every extension with this magic; returns how many. */
static inline int qh_del_ext(QcowHeader *h, uint32_t magic)
{
    int n = 0, j = 0;
    for (int i = 0; i < h->n_exts; i++) {
        if (h->exts[i].magic == magic) {
            free(h->exts[i].data);
            n++;
        } else {
            h->exts[j++] = h->exts[i];
        }
    }
    h->n_exts = j;
    return n;
}

/* Writes extensions, end marker, backing name and the fixed fields back. */
static inline int qh_write(QcowHeader *h)
{
    uint64_t pos = h->v[QH_HEADER_LENGTH];
    uint64_t need = pos + 8 + h->backing_file_len;
    for (int i = 0; i < h->n_exts; i++) {
        need += 8 + (((uint64_t)h->exts[i].length + 7) & ~(uint64_t)7);
    }
    if (need > h->cluster_size) {
        fprintf(stderr, "header extensions do not fit in cluster 0 (%" PRIu64 " > %" PRIu64 " bytes)\n",
                need, h->cluster_size);
        return -1;
    }
    unsigned char *area = calloc(1, need);
    if (!area) {
        return -1;
    }
    uint64_t p = 0;
    for (int i = 0; i < h->n_exts; i++) {
        uint64_t padded = ((uint64_t)h->exts[i].length + 7) & ~(uint64_t)7;
        qh_put_be(area + p, 4, h->exts[i].magic);
        qh_put_be(area + p + 4, 4, h->exts[i].length);
        memcpy(area + p + 8, h->exts[i].data, padded);
        p += 8 + padded;
    }
    p += 8; /* end marker: already zero */
    if (h->backing_file) {
        h->v[QH_BACKING_FILE_OFFSET] = pos + p;
        memcpy(area + p, h->backing_file, h->backing_file_len);
        p += h->backing_file_len;
    }
    int r = qh_pwrite(h->f, area, p, pos);
    free(area);
    if (r == 0 && h->old_end > pos + p) {
        uint64_t n = h->old_end - (pos + p);
        unsigned char *z = calloc(1, n);
        r = z ? qh_pwrite(h->f, z, n, pos + p) : -1;
        free(z);
    }
    if (r == 0) {
        unsigned char hb[104];
        int n = h->v[QH_VERSION] == 2 ? 72 : 104;
        memset(hb, 0, sizeof(hb));
        for (int i = 0; i < QH_NFIELDS; i++) {
            if (qh_fields[i].offset < n) {
                qh_put_be(hb + qh_fields[i].offset, qh_fields[i].size, h->v[i]);
            }
        }
        r = qh_pwrite(h->f, hb, (uint64_t)n, 0);
    }
    if (r == 0 && fflush(h->f) != 0) {
        r = -1;
    }
    if (r < 0) {
        perror("write header");
    }
    return r;
}

/* Prints one header field value the way qcow2.py formats it. */
static inline void qh_format_value(char *out, size_t n, int fmt, uint64_t v)
{
    if (fmt == QH_HEX) {
        snprintf(out, n, "0x%" PRIx64, v);
    } else if (fmt == QH_DEC) {
        snprintf(out, n, "%" PRIu64, v);
    } else {
        size_t used = (size_t)snprintf(out, n, "[");
        int first = 1;
        for (int bit = 0; bit < 64; bit++) {
            if (v & ((uint64_t)1 << bit)) {
                used += (size_t)snprintf(out + used, n > used ? n - used : 0, "%s%d", first ? "" : ", ", bit);
                first = 0;
            }
        }
        snprintf(out + used, n > used ? n - used : 0, "]");
    }
}

static inline const char *qh_ext_name(uint32_t magic)
{
    switch (magic) {
    case 0xe2792aca: return "Backing format";
    case 0x6803f857: return "Feature table";
    case 0x0537be77: return "Crypto header";
    case 0x23852875: return "Bitmaps";
    case 0x44415441: return "Data file";
    default: return "<unknown>";
    }
}

/* Python's string.printable: digits, letters, punctuation and whitespace. */
static inline int qh_printable(unsigned char c)
{
    return (c >= 0x20 && c <= 0x7e) || c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c;
}

static inline void qh_dump_exts(const QcowHeader *h, FILE *out)
{
    for (int i = 0; i < h->n_exts; i++) {
        const QcowHeaderExt *e = &h->exts[i];
        fprintf(out, "Header extension:\n");
        fprintf(out, "%-25s %#x (%s)\n", "magic", e->magic, qh_ext_name(e->magic));
        fprintf(out, "%-25s %u\n", "length", e->length);
        if (e->magic == 0x23852875 && e->length >= 24) {
            /* The bitmaps extension is decoded field by field (the bitmap
             * directory itself is not printed by this port). */
            fprintf(out, "%-25s %" PRIu64 "\n", "nb_bitmaps", qh_be(e->data, 4));
            fprintf(out, "%-25s %" PRIu64 "\n", "reserved32", qh_be(e->data + 4, 4));
            fprintf(out, "%-25s 0x%" PRIx64 "\n", "bitmap_directory_size", qh_be(e->data + 8, 8));
            fprintf(out, "%-25s 0x%" PRIx64 "\n", "bitmap_directory_offset", qh_be(e->data + 16, 8));
        } else {
            int text = 1;
            for (uint32_t j = 0; j < e->length; j++) {
                text &= qh_printable(e->data[j]);
            }
            if (text) {
                fprintf(out, "%-25s '", "data");
                fwrite(e->data, 1, e->length, out);
                fprintf(out, "'\n");
            } else {
                fprintf(out, "%-25s <binary>\n", "data");
            }
        }
        fprintf(out, "\n");
    }
}

/* dump-header: the 18 fields, an empty line, then every extension. */
static inline void qh_dump(const QcowHeader *h, FILE *out)
{
    char val[512];
    for (int i = 0; i < QH_NFIELDS; i++) {
        qh_format_value(val, sizeof(val), qh_fields[i].fmt, h->v[i]);
        fprintf(out, "%-25s %s\n", qh_fields[i].name, val);
    }
    fprintf(out, "\n");
    qh_dump_exts(h, out);
}

#endif /* OXQCOW_QCOW2HDR_H */
