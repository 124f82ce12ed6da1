/*
 * qcow2tool: a C port of the header tool QEMU's iotests use (qcow2.py),
 * for the C test suite. Same commands, arguments, output format and
 * messages (see ../shared/qcow2-format.md section 6):
 *
 *   qcow2tool <image> dump-header
 *   qcow2tool <image> dump-header-exts
 *   qcow2tool <image> set-header <field> <value>
 *   qcow2tool <image> add-header-ext <magic> <data>
 *   qcow2tool <image> add-header-ext-stdio <magic>     (data from stdin)
 *   qcow2tool <image> del-header-ext <magic>
 *   qcow2tool <image> set-feature-bit <incompatible|compatible|autoclear> <bit>
 *
 * Numbers take C/Python prefixes (0x..). New extensions are padded to 8
 * bytes. It edits bytes directly and never goes through liboxqcow.
 */
#include "qcow2hdr.h"

#include <errno.h>

static int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    if (!*s || *s == '-') {
        return -1;
    }
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end) {
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_magic(const char *s, uint32_t *magic)
{
    uint64_t v;
    if (parse_u64(s, &v) < 0 || v > 0xffffffffu) {
        printf("'%s' is not a valid magic number\n", s);
        return -1;
    }
    *magic = (uint32_t)v;
    return 0;
}

static int cmd_set_header(QcowHeader *h, const char *name, const char *value)
{
    uint64_t v;
    if (parse_u64(value, &v) < 0) {
        printf("'%s' is not a valid number\n", value);
        return 1;
    }
    for (int i = 0; i < QH_NFIELDS; i++) {
        if (strcmp(qh_fields[i].name, name) == 0) {
            h->v[i] = v;
            return qh_write(h) ? 1 : 0;
        }
    }
    printf("'%s' is not a known header field\n", name);
    return 1;
}

static int cmd_add_ext(QcowHeader *h, const char *magic_s, const void *data, size_t len)
{
    uint32_t magic;
    if (parse_magic(magic_s, &magic) < 0) {
        return 1;
    }
    if (len > UINT32_MAX || qh_add_ext(h, magic, data, (uint32_t)len) < 0) {
        fprintf(stderr, "cannot add header extension\n");
        return 1;
    }
    return qh_write(h) ? 1 : 0;
}

static int cmd_add_ext_stdio(QcowHeader *h, const char *magic_s)
{
    size_t cap = 4096, len = 0, n;
    unsigned char *buf = malloc(cap);
    while (buf && (n = fread(buf + len, 1, cap - len, stdin)) > 0) {
        len += n;
        if (len == cap) {
            unsigned char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    if (!buf) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    int r = cmd_add_ext(h, magic_s, buf, len);
    free(buf);
    return r;
}

static int cmd_del_ext(QcowHeader *h, const char *magic_s)
{
    uint32_t magic;
    if (parse_magic(magic_s, &magic) < 0) {
        return 1;
    }
    if (qh_del_ext(h, magic) == 0) {
        printf("No such header extension\n");
        return 0;
    }
    return qh_write(h) ? 1 : 0;
}

static int cmd_set_feature_bit(QcowHeader *h, const char *group, const char *bit_s)
{
    uint64_t bit;
    if (parse_u64(bit_s, &bit) < 0 || bit >= 64) {
        printf("'%s' is not a valid bit number in range [0, 64)\n", bit_s);
        return 1;
    }
    int idx;
    if (strcmp(group, "incompatible") == 0) {
        idx = QH_INCOMPATIBLE;
    } else if (strcmp(group, "compatible") == 0) {
        idx = QH_COMPATIBLE;
    } else if (strcmp(group, "autoclear") == 0) {
        idx = QH_AUTOCLEAR;
    } else {
        printf("'%s' is not a valid group, try 'incompatible', 'compatible', or 'autoclear'\n", group);
        return 1;
    }
    h->v[idx] |= (uint64_t)1 << bit;
    return qh_write(h) ? 1 : 0;
}

static const struct {
    const char *name;
    int nargs;
    const char *args, *help;
} commands[] = {
    {"dump-header", 0, "", "Dump image header and header extensions"},
    {"dump-header-exts", 0, "", "Dump image header extensions"},
    {"set-header", 2, " <field> <value>", "Set a field in the header"},
    {"add-header-ext", 2, " <magic> <data>", "Add a header extension"},
    {"add-header-ext-stdio", 1, " <magic>", "Add a header extension, data from stdin"},
    {"del-header-ext", 1, " <magic>", "Delete a header extension"},
    {"set-feature-bit", 2, " <group> <bit>", "Set a feature bit"},
};
#define NCOMMANDS ((int)(sizeof(commands) / sizeof(commands[0])))

static void usage(const char *prog)
{
    printf("Usage: %s <file> <cmd> [<arg>, ...]\n\nSupported commands:\n", prog);
    for (int i = 0; i < NCOMMANDS; i++) {
        char left[64];
        snprintf(left, sizeof(left), "%s%s", commands[i].name, commands[i].args);
        printf("    %-34s %s\n", left, commands[i].help);
    }
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        usage(argv[0]);
        return 1;
    }
    const char *cmd = argv[2];
    int found = -1;
    for (int i = 0; i < NCOMMANDS; i++) {
        if (strcmp(commands[i].name, cmd) == 0) {
            found = i;
        }
    }
    if (found < 0) {
        printf("Unknown command '%s'\n", cmd);
        return 1;
    }
    if (argc - 3 != commands[found].nargs) {
        usage(argv[0]);
        return 1;
    }
    int readonly = strncmp(cmd, "dump-", 5) == 0;
    QcowHeader h;
    if (qh_open(&h, argv[1], readonly ? "rb" : "r+b") < 0) {
        return 1;
    }
    int r = 0;
    if (strcmp(cmd, "dump-header") == 0) {
        qh_dump(&h, stdout);
    } else if (strcmp(cmd, "dump-header-exts") == 0) {
        qh_dump_exts(&h, stdout);
    } else if (strcmp(cmd, "set-header") == 0) {
        r = cmd_set_header(&h, argv[3], argv[4]);
    } else if (strcmp(cmd, "add-header-ext") == 0) {
        r = cmd_add_ext(&h, argv[3], argv[4], strlen(argv[4]));
    } else if (strcmp(cmd, "add-header-ext-stdio") == 0) {
        r = cmd_add_ext_stdio(&h, argv[3]);
    } else if (strcmp(cmd, "del-header-ext") == 0) {
        r = cmd_del_ext(&h, argv[3]);
    } else {
        r = cmd_set_feature_bit(&h, argv[3], argv[4]);
    }
    qh_free(&h);
    return r;
}
