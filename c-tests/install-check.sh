#!/bin/sh
# make install-check: install into a temporary prefix, then build and run a
# tiny host with `cc host.c $(pkg-config --cflags --libs oxqcow)`, using
# only what was installed (PKG_CONFIG_PATH, LD_LIBRARY_PATH).
set -eu
: "${MAKE:=make}" "${CC:=cc}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
prefix="$tmp/prefix"
"$MAKE" --no-print-directory -s install PREFIX="$prefix" >/dev/null
for f in include/block_int.h lib/liboxqcow.a lib/liboxqcow.so lib/liboxqcow.so.0 lib/pkgconfig/oxqcow.pc; do
    [ -e "$prefix/$f" ] || { echo "install-check: $f not installed" >&2; exit 1; }
done
cat > "$tmp/host.c" <<'EOC'
#include <block_int.h>
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv)
{
    char w[4096], r[4096];
    if (argc != 2 || bdrv_img_create(argv[1], "qcow2", NULL, NULL, "lazy_refcounts=on", 1 << 20, 0) < 0) {
        fprintf(stderr, "create: %s\n", bdrv_last_error());
        return 1;
    }
    BlockDriverState *bs = bdrv_new("host");
    memset(w, 'x', sizeof(w));
    if (bdrv_open(bs, argv[1], BDRV_O_RDWR | BDRV_O_CACHE_WB, NULL) < 0 ||
        bdrv_pwrite(bs, 512, w, sizeof(w)) != (int)sizeof(w) ||
        bdrv_pread(bs, 512, r, sizeof(r)) != (int)sizeof(r) || memcmp(w, r, sizeof(w)) != 0) {
        fprintf(stderr, "io: %s\n", bdrv_last_error());
        return 1;
    }
    bdrv_delete(bs);
    printf("liboxqcow %s: ok\n", bdrv_version());
    return 0;
}
EOC
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
# shellcheck disable=SC2046
"$CC" -Wall -Wextra -Werror -o "$tmp/host" "$tmp/host.c" $(pkg-config --cflags --libs oxqcow)
LD_LIBRARY_PATH="$prefix/lib" "$tmp/host" "$tmp/img.qcow2"
needed=$(readelf -d "$tmp/host" | sed -n 's/.*Shared library: \[\(liboxqcow[^]]*\)\]/\1/p')
[ "$needed" = "liboxqcow.so.0" ] || { echo "install-check: host needs '$needed'" >&2; exit 1; }
qemu-img check -q "$tmp/img.qcow2"
echo "install-check: pkg-config build against $prefix works (needs $needed)"
