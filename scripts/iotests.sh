#!/usr/bin/env bash
# QEMU's own qemu-iotests against oxqcow.
#
#   scripts/iotests.sh              baseline (QEMU's qemu-io), then ours (oxqcow io as qemu-io)
#   IOTESTS_IMG=oxqcow scripts/iotests.sh
#                                   oxqcow as qemu-img too: nothing of QEMU's driver runs
#                                   (except in the tests that start qemu-nbd)
#   IOTESTS_SUBSET=1 scripts/iotests.sh
#                                   only the fixed fast subset (scripts/iotests-subset.txt), ours only
#   scripts/iotests.sh 001 025      only these tests
#   IOTESTS_NBD=1 scripts/iotests.sh
#                                   `check -raw -nbd -g quick` with QEMU_NBD_PROG=nbdkit/qemu-nbd-wrapper:
#                                   each NBD test image is a fresh qcow2 sidecar, served by
#                                   qemu-nbd -f qcow2 (baseline, nbd-baseline/) then by nbdkit and
#                                   our plugin (ours, nbd-oxqcow/), checked with qemu-img check after
#                                   each server stops (<run>/check.log). Fails if a test passing in
#                                   the baseline does not pass with ours, or if our check log has a
#                                   line other than `ok`. Needs `make nbdkit-plugin`.
#
# The qemu-iotests tree of the installed QEMU comes from Debian's source
# package (apt-get source, with a private sources list that adds deb-src
# lines for the system's mirrors; no other network). It is cached under
# build/iotests/src and never committed. The tests are the qcow2 tests of
# the quick group that use only qemu-img and qemu-io (scripts/iotests-list.txt,
# checked against the fetched tree). QEMU_PROG is a stub that only answers
# `-machine help`; no VM ever starts.
#
# Results: build/iotests/<run>/results.txt (test status), failure diffs in
# build/iotests/<run>/diffs/, the tests' scratch files in build/iotests/<run>/scratch.
# The last line is "N passed, N failed, N not run" for the oxqcow run.
#
# Environment: IOTESTS_JOBS (parallel tests, default: CPUs), IOTESTS_REUSE_BASELINE=1
# (reuse a baseline of the same QEMU version from an earlier run), IOTESTS_CACHE=MODE
# (check -c MODE: qemu-io's cache mode, e.g. none for O_DIRECT; the runs go to
# baseline-cache-MODE/ and oxqcow-io-cache-MODE/ or all-oxqcow-cache-MODE/).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
B=$ROOT/build/iotests
OXQCOW=${OXQCOW:-$ROOT/target/release/oxqcow}
JOBS=${IOTESTS_JOBS:-$(nproc 2>/dev/null || echo 2)}
MODE=${IOTESTS_IMG:-qemu}
SUBSET=${IOTESTS_SUBSET:-0}
NBD=${IOTESTS_NBD:-0}
CACHE=${IOTESTS_CACHE:-}
SUF=${CACHE:+-cache-$CACHE}
WRAPPER=$ROOT/nbdkit/qemu-nbd-wrapper
PLUGIN=${OXQCOW_NBDKIT_PLUGIN:-$ROOT/build/lib/nbdkit/plugins/nbdkit-oxqcow-plugin.so}
FMT=qcow2 PROTO=file
[ "$NBD" = 1 ] && FMT=raw PROTO=nbd
LIST=$ROOT/scripts/iotests-list.txt

die() { echo "iotests: $*" >&2; exit 1; }

[ -x "$OXQCOW" ] || die "$OXQCOW is missing: run 'make' first"
for p in qemu-img qemu-io qemu-nbd python3; do
    command -v $p >/dev/null || die "$p is not installed"
done
if [ "$NBD" = 1 ]; then
    command -v nbdkit >/dev/null || die "nbdkit is not installed"
    [ -f "$PLUGIN" ] || die "$PLUGIN is missing: run 'make nbdkit-plugin' first"
fi

# ---- 1. The QEMU version and its source package ------------------------------------------

DEB_VERSION=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) ||
    die "qemu-utils is not installed from a Debian package"
SRC_PKG=$(dpkg-query -W -f='${source:Package}' qemu-utils)
UPSTREAM=${DEB_VERSION#*:}          # drop the epoch
UPSTREAM=${UPSTREAM%-*}             # drop the Debian revision: 10.0.2+ds
PLAIN=${UPSTREAM%%+*}               # 10.0.2
SRC=$B/src/$SRC_PKG-$UPSTREAM
IOT=$SRC/qemu-$PLAIN/tests/qemu-iotests

fetch() {
    local w=$B/apt tarball=${SRC_PKG}_${UPSTREAM}.orig.tar.xz
    mkdir -p "$w/lists/partial" "$w/cache/archives/partial" "$w/dl"
    if [ ! -f "$w/dl/$tarball" ]; then
        echo "iotests: fetching the $SRC_PKG $DEB_VERSION source package with apt-get source"
        # deb-src lines for every Debian mirror and suite the system uses, and
        # the backports suite (where newer QEMU builds for stable come from).
        local codename
        codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
        python3 - "$codename" > "$w/sources.list" <<'PY'
import glob, sys
codename = sys.argv[1]
seen = []
keys = {}
def add(uri, suite, comps, key=None):
    if key:
        keys[uri] = key
    key = keys.get(uri)
    if (uri, suite) not in seen:
        seen.append((uri, suite))
        opt = f"[signed-by={key}] " if key else ""
        print(f"deb-src {opt}{uri} {suite} {comps}")
for f in glob.glob('/etc/apt/sources.list.d/*.sources'):
    for stanza in open(f).read().split('\n\n'):
        d = {}
        for line in stanza.splitlines():
            if ':' in line and not line.startswith((' ', '#')):
                k, v = line.split(':', 1)
                d[k.strip()] = v.strip()
        if 'deb' not in d.get('Types', '').split() or 'debian' not in d.get('URIs', ''):
            continue
        for uri in d.get('URIs', '').split():
            for suite in d.get('Suites', '').split():
                add(uri, suite, d.get('Components', 'main'), d.get('Signed-By'))
for f in ['/etc/apt/sources.list'] + glob.glob('/etc/apt/sources.list.d/*.list'):
    try:
        lines = open(f).read().splitlines()
    except OSError:
        continue
    for line in lines:
        w = line.split('#')[0].split()
        if len(w) >= 4 and w[0] == 'deb' and not w[1].startswith('['):
            if 'debian' in w[1]:
                add(w[1], w[2], ' '.join(w[3:]))
if codename and any('security' not in u for u, _ in seen):
    main = next(u for u, s in seen if 'security' not in u)
    add(main, codename + '-backports', 'main')
PY
        [ -s "$w/sources.list" ] || die "no Debian mirror found in /etc/apt (needed for apt-get source)"
        local A=(-o "Dir::Etc::SourceList=$w/sources.list" -o Dir::Etc::SourceParts=/nonexistent
                 -o "Dir::State::Lists=$w/lists" -o "Dir::Cache=$w/cache"
                 -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
        apt-get "${A[@]}" update -qq >"$w/update.log" 2>&1 ||
            { cat "$w/update.log" >&2; die "apt-get update (deb-src) failed"; }
        # Only the upstream tarball matters; the .dsc or Debian diff may be
        # missing from the mirror, which apt reports as an error.
        (cd "$w/dl" && apt-get "${A[@]}" source --download-only "$SRC_PKG=$DEB_VERSION" \
            >"$w/source.log" 2>&1) || true
        [ -f "$w/dl/$tarball" ] ||
            { cat "$w/source.log" >&2; die "apt-get source did not fetch $tarball"; }
    fi
    echo "iotests: unpacking tests/qemu-iotests and python/ from $tarball"
    rm -rf "$SRC" && mkdir -p "$SRC"
    tar -C "$SRC" -xJf "$w/dl/$tarball" "qemu-$PLAIN/tests/qemu-iotests" "qemu-$PLAIN/python"
}

[ -f "$IOT/check" ] || fetch
[ -f "$IOT/check" ] || die "no qemu-iotests tree at $IOT"

# ---- 2. The test list, checked against the tree ----------------------------------------------

mapfile -t LISTED < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$LIST")
if [ "$SUBSET" = 1 ]; then
    mapfile -t LISTED < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$ROOT/scripts/iotests-subset.txt")
fi
QUICK=" $(cd "$IOT" && python3 ./check -n -$FMT -$PROTO -g quick 2>/dev/null | tr '\n' ' ') "
if [ "$NBD" = 1 ]; then
    # The whole quick group; check skips the tests not suitable for raw/nbd.
    read -r -a LISTED <<<"$QUICK"
fi
if [ $# -gt 0 ]; then
    LISTED=("$@")
fi
TESTS=()
for t in "${LISTED[@]}"; do
    if [ ! -f "$IOT/$t" ] && [ ! -f "$IOT/tests/$t" ]; then
        echo "iotests: $t is not in this qemu-iotests tree; skipped" >&2
        continue
    fi
    case "$QUICK" in *" $t "*) ;; *) echo "iotests: note: $t is not in the quick group" >&2 ;; esac
    TESTS+=("$t")
done
[ ${#TESTS[@]} -gt 0 ] || die "no tests to run"

# ---- 3. Wrappers -------------------------------------------------------------------------------

mkdir -p "$B/bin"
cat > "$B/bin/qemu-io" <<EOF
#!/usr/bin/env bash
# qemu-io for the iotests: oxqcow io, named qemu-io in its messages and prompt.
exec -a qemu-io "$OXQCOW" io "\$@"
EOF
cat > "$B/bin/qemu-img" <<EOF
#!/usr/bin/env bash
# qemu-img for the iotests: oxqcow.
exec -a qemu-img "$OXQCOW" "\$@"
EOF
cat > "$B/bin/qemu-system" <<'EOF'
#!/bin/sh
# QEMU_PROG for the iotests: answers the `-machine help` probe; starts no VM.
if [ "$1" = "-machine" ] && [ "$2" = "help" ]; then
    echo "Supported machines are:"
    echo "pc                   Standard PC (default)"
    exit 0
fi
echo "qemu-system stub: the oxqcow iotests runs start no VM" >&2
exit 1
EOF
chmod +x "$B/bin/qemu-io" "$B/bin/qemu-img" "$B/bin/qemu-system"

# ---- 4. Runs ---------------------------------------------------------------------------------

# run NAME QEMU_IMG QEMU_IO [NBD_SERVER]: runs the tests, writes NAME/results.txt
# ("test status") and NAME/diffs/; prints a summary line. With NBD_SERVER
# (qemu-nbd or nbdkit) the run is `-raw -nbd` through nbdkit/qemu-nbd-wrapper,
# whose qemu-img check results go to NAME/check.log.
run() {
    local name=$1 img=$2 io=$3 server=${4:-} d=$B/$1
    local nbd_prog
    nbd_prog=$(command -v qemu-nbd)
    [ -n "$server" ] && nbd_prog=$WRAPPER
    rm -rf "$d" && mkdir -p "$d/scratch" "$d/sock" "$d/diffs"
    local sock
    sock=$(mktemp -d /tmp/oxqcow-iotests-sock.XXXXXX)   # sockets need short paths
    echo "iotests: $name: ${#TESTS[@]} tests, -$FMT -$PROTO, qemu-img=$img qemu-io=$io${server:+ nbd server=$server}"
    local t0=$SECONDS
    : > "$d/check.log"
    (cd "$IOT" && env QEMU_PROG="$B/bin/qemu-system" QEMU_IMG_PROG="$img" QEMU_IO_PROG="$io" \
        QEMU_NBD_PROG="$nbd_prog" QSD_PROG="$(command -v qemu-storage-daemon || echo /nonexistent)" \
        OXQCOW_NBD_SERVER="${server:-qemu-nbd}" OXQCOW_NBD_CHECK_LOG="$d/check.log" \
        OXQCOW_NBDKIT_PLUGIN="$PLUGIN" REAL_QEMU_NBD="$(command -v qemu-nbd)" \
        TEST_DIR="$d/scratch" SOCK_DIR="$sock" \
        python3 ./check -tap -$FMT -$PROTO ${CACHE:+-c "$CACHE"} -j "$JOBS" "${TESTS[@]}" > "$d/check.tap" 2>&1) || true
    rm -rf "$sock"
    : > "$d/results.txt"
    local t st line
    for t in "${TESTS[@]}"; do
        line=$(grep -E "^(not )?ok $FMT $t( |\$)" "$d/check.tap" | tail -1 || true)
        case "$line" in
            "ok $FMT $t # SKIP"*) st="not-run" ;;
            "ok $FMT $t"*) st="pass" ;;
            "not ok $FMT $t"*) st="fail" ;;
            *) st="fail" ;;
        esac
        echo "$t $st" >> "$d/results.txt"
        if [ "$st" = fail ]; then
            local ref bad="$d/scratch/$FMT-$PROTO-$t/$t.out.bad"
            for ref in "$IOT/$t.out.$FMT" "$IOT/$t.out.$PROTO" "$IOT/$t.out" \
                       "$IOT/tests/$t.out.$FMT" "$IOT/tests/$t.out.$PROTO" "$IOT/tests/$t.out"; do
                [ -f "$ref" ] && break
            done
            if [ -f "$bad" ]; then
                diff -u "$ref" "$bad" > "$d/diffs/$t.diff" || true
            else
                grep -A40 -E "^not ok $FMT $t( |\$)" "$d/check.tap" > "$d/diffs/$t.diff" || true
            fi
        fi
    done
    echo "iotests: $name: $(grep -c ' pass$' "$d/results.txt") passed," \
        "$(grep -c ' fail$' "$d/results.txt") failed, $(grep -c ' not-run$' "$d/results.txt") not run" \
        "($((SECONDS - t0)) s)"
}

QIMG=$(command -v qemu-img)
QIO=$(command -v qemu-io)
START=$SECONDS

if [ "$NBD" = 1 ]; then
    # Same qemu-img and qemu-io in both runs; only the NBD server differs.
    run nbd-baseline "$QIMG" "$QIO" qemu-nbd
    run nbd-oxqcow "$QIMG" "$QIO" nbdkit
    echo
    printf '%-30s %-9s %s\n' test baseline ours
    unexpected=()
    while read -r t st; do
        b=$(awk -v t="$t" '$1 == t { print $2 }' "$B/nbd-baseline/results.txt")
        [ "$b" = not-run ] && [ "$st" = not-run ] && continue
        printf '%-30s %-9s %s\n' "$t" "$b" "$st"
        if [ "$b" = pass ] && [ "$st" != pass ]; then unexpected+=("$t"); fi
    done < "$B/nbd-oxqcow/results.txt"
    echo
    ok=0
    if [ ${#unexpected[@]} -gt 0 ]; then
        echo "iotests: nbd: pass in the baseline, not with ours (diffs in $B/nbd-oxqcow/diffs/): ${unexpected[*]}"
        ok=1
    fi
    log=$B/nbd-oxqcow/check.log
    checked=$(grep -c '^[0-9:]* ok ' "$log" || true)
    if grep -qv '^[0-9:]* ok ' "$log"; then
        echo "iotests: nbd: qemu-img check found problems in our sidecars ($log):"
        grep -v '^[0-9:]* ok ' "$log" | head -40
        ok=1
    elif [ "$checked" -eq 0 ] && grep -q ' pass$' "$B/nbd-oxqcow/results.txt"; then
        echo "iotests: nbd: no sidecar was checked ($log is empty): the wrapper did not serve"
        ok=1
    fi
    echo "iotests: nbd: $checked sidecars ok in $log, $(grep -cv '^[0-9:]* ok ' "$log" || true) other lines"
    echo "iotests: total time $((SECONDS - START)) s"
    p=$(grep -c ' pass$' "$B/nbd-oxqcow/results.txt" || true)
    f=$(grep -c ' fail$' "$B/nbd-oxqcow/results.txt" || true)
    n=$(grep -c ' not-run$' "$B/nbd-oxqcow/results.txt" || true)
    echo "nbd: $p passed, $f failed, $n not run"
    exit $ok
fi

if [ "$SUBSET" != 1 ]; then
    stamp="$B/baseline$SUF/version"
    if [ "${IOTESTS_REUSE_BASELINE:-0}" = 1 ] && [ -f "$stamp" ] &&
        [ "$(cat "$stamp")" = "$DEB_VERSION ${TESTS[*]}" ]; then
        echo "iotests: baseline: reusing $B/baseline$SUF/results.txt"
    else
        run "baseline$SUF" "$QIMG" "$QIO"
        echo "$DEB_VERSION ${TESTS[*]}" > "$stamp"
    fi
fi

if [ "$MODE" = oxqcow ]; then
    OURS=all-oxqcow$SUF
    run "$OURS" "$B/bin/qemu-img" "$B/bin/qemu-io"
else
    OURS=oxqcow-io$SUF
    run "$OURS" "$QIMG" "$B/bin/qemu-io"
fi

# ---- 5. Report ---------------------------------------------------------------------------------

# One list of expected failures per mode, each line test<TAB>reason.
KNOWN=$ROOT/scripts/iotests-known-failures.txt
[ "$OURS" = "all-oxqcow$SUF" ] && KNOWN=$ROOT/scripts/iotests-known-failures-all-oxqcow.txt
reason_of() {
    awk -F'\t' -v t="$1" '$1 == t { print $2 }' "$KNOWN"
}
base_of() {
    [ -f "$B/baseline$SUF/results.txt" ] || { echo "-"; return; }
    awk -v t="$1" '$1 == t { print $2; found = 1 } END { if (!found) print "-" }' "$B/baseline$SUF/results.txt"
}
echo
printf '%-30s %-9s %-9s %s\n' test baseline ours reason
unexpected=() fixed=()
while read -r t st; do
    b=$(base_of "$t")
    r=$(reason_of "$t")
    printf '%-30s %-9s %-9s %s\n' "$t" "$b" "$st" "$r"
    if [ "$st" = fail ] && [ "$b" != fail ] && [ -z "$r" ]; then unexpected+=("$t"); fi
    if [ "$st" = pass ] && [ -n "$r" ]; then fixed+=("$t"); fi
done < "$B/$OURS/results.txt"
echo
[ ${#fixed[@]} -eq 0 ] ||
    echo "iotests: now passing, remove from $(basename "$KNOWN"): ${fixed[*]}"
[ ${#unexpected[@]} -eq 0 ] ||
    echo "iotests: UNEXPECTED failures (diffs in $B/$OURS/diffs/): ${unexpected[*]}"
echo "iotests: total time $((SECONDS - START)) s"
p=$(grep -c ' pass$' "$B/$OURS/results.txt" || true)
f=$(grep -c ' fail$' "$B/$OURS/results.txt" || true)
n=$(grep -c ' not-run$' "$B/$OURS/results.txt" || true)
echo "$p passed, $f failed, $n not run"
# Fails on a failure its mode's list does not explain, and on a listed test
# that now passes (the list must stay true).
[ ${#unexpected[@]} -eq 0 ] && [ ${#fixed[@]} -eq 0 ]
