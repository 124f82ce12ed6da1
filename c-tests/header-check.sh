#!/bin/sh
# make header-check: include/block_int.h is what cbindgen generates from
# src/ffi now (build.rs writes to $OXQCOW_HEADER_OUT), is the committed
# version, compiles cleanly as C99 and as C++, and liboxqcow.so exports
# exactly the functions and globals the header declares, which are exactly
# those of the version script src/ffi/liboxqcow.map.
set -eu
: "${CARGO:=cargo}" "${CC:=cc}" "${CXX:=c++}" "${BUILD:=build}" "${TARGET:=target/release}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. Fresh generation (a separate target dir and `cargo check`: quick, and the
#    main build is not disturbed by the changing OXQCOW_HEADER_OUT).
OXQCOW_HEADER_OUT="$tmp/block_int.h" CARGO_TARGET_DIR="$BUILD/header-gen" \
    "$CARGO" check --lib --quiet
if ! diff -u include/block_int.h "$tmp/block_int.h"; then
    echo "header-check: include/block_int.h is stale; build and commit it" >&2
    exit 1
fi
if git rev-parse --is-inside-work-tree >/dev/null 2>&1 &&
    git ls-files --error-unmatch include/block_int.h >/dev/null 2>&1 &&
    ! git diff --quiet HEAD -- include/block_int.h; then
    echo "header-check: include/block_int.h differs from the committed version; commit it" >&2
    exit 1
fi

# 2. C99 and C++, pedantic, warnings as errors.
cat > "$tmp/use.c" <<'EOC'
#include "block_int.h"
#include "block_int.h" /* the include guard works */
int main(void)
{
    BlockDriverState *bs = bdrv_new("x");
    const char *opt = BLOCK_OPT_LAZY_REFCOUNTS;
    int flags = BDRV_O_RDWR | BDRV_O_NOCACHE | BDRV_O_CACHE_WB | BDRV_O_NO_FLUSH | BDRV_O_NO_BACKING | BDRV_O_CHECK;
    BlockDriverInfo bdi;
    BdrvCheckResult res;
    QEMUOptionParameter *l = bdrv_qcow2.create_options;
    QEMUSnapshotInfo sn;
    BdrvLogFunc log = 0;
    (void)opt; (void)flags; (void)bdi; (void)res; (void)l; (void)sn;
    bdrv_set_log_callback(log, 0);
    bdrv_delete(bs);
    return (int)BDRV_SECTOR_SIZE + BLOCK_FLAG_LAZY_REFCOUNTS + BDRV_FIX_LEAKS + OPT_STRING;
}
EOC
cp "$tmp/use.c" "$tmp/use.cc"
"$CC" -std=c99 -pedantic -Wall -Wextra -Werror -Iinclude -c "$tmp/use.c" -o "$tmp/use.o"
"$CXX" -std=c++11 -pedantic -Wall -Wextra -Werror -Iinclude -c "$tmp/use.cc" -o "$tmp/use_cc.o"

# 3. Exported symbols == header declarations == version script.
nm -D --defined-only "$TARGET/liboxqcow.so" | awk '{print $3}' | sed 's/@.*//' | sort -u > "$tmp/exported"
sed -n 's/^\([A-Za-z_][A-Za-z0-9_ *]*[ *]\)\([a-z_][a-z0-9_]*\)(.*/\2/p; s/^extern .* \([a-z_][a-z0-9_]*\);$/\1/p' \
    include/block_int.h | sort -u > "$tmp/declared"
sed -n 's/^ *\([a-z_][a-z0-9_]*\);$/\1/p' src/ffi/liboxqcow.map | sort -u > "$tmp/mapped"
ok=1
diff -u "$tmp/declared" "$tmp/exported" > "$tmp/d1" || { echo "header-check: exports differ from the header:" >&2; cat "$tmp/d1" >&2; ok=0; }
diff -u "$tmp/declared" "$tmp/mapped" > "$tmp/d2" || { echo "header-check: src/ffi/liboxqcow.map differs from the header:" >&2; cat "$tmp/d2" >&2; ok=0; }
[ "$ok" = 1 ]
soname=$(readelf -d "$TARGET/liboxqcow.so" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')
[ "$soname" = "liboxqcow.so.0" ] || { echo "header-check: soname is '$soname'" >&2; exit 1; }
echo "header-check: include/block_int.h is current, C99/C++ clean; $(wc -l < "$tmp/exported") symbols exported, soname $soname"
