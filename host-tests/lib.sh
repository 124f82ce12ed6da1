# host-tests/lib.sh: helpers for the nbdkit plugin and LD_PRELOAD shim tests.
# Sourced by nbd.sh and preload.sh; they print "ok"/"FAIL" per check and
# "N passed, N failed" last (the format of c-tests/run.sh).

passed=0
failed=0
t_start=$EPOCHREALTIME

ok() {
    passed=$((passed + 1))
    [ -n "${VERBOSE:-}" ] && awk -v d="$1" -v a="$t_start" -v b="$EPOCHREALTIME" 'BEGIN { printf "ok   - %s (%.1fs)\n", d, b - a }'
    return 0
}
not_ok() { failed=$((failed + 1)); echo "FAIL - $1" >&2; return 1; }

# check DESC CMD...: passes when CMD exits 0 (its output is shown on failure).
check() {
    local desc=$1 out
    shift
    if out=$("$@" 2>&1); then
        ok "$desc"
    else
        not_ok "$desc"
        printf '%s\n' "$out" | tail -20 | sed 's/^/    /' >&2
        return 1
    fi
}

# check_eq DESC GOT EXPECTED
check_eq() {
    if [ "$2" = "$3" ]; then
        ok "$1"
    else
        not_ok "$1"
        echo "    got:      $2" >&2
        echo "    expected: $3" >&2
        return 1
    fi
}

# section NAME: prints a header with the time since the start.
section() {
    awk -v n="$1" -v a="$t_start" -v b="$EPOCHREALTIME" 'BEGIN { printf "== %-58s (%5.1fs)\n", n, b - a }'
}

# Commands below must see the real qcow2 file, never the shim's view.
qemu_img() { OXQCOW_PRELOAD_DISABLE=1 LD_PRELOAD= qemu-img "$@"; }
qemu_io() { OXQCOW_PRELOAD_DISABLE=1 LD_PRELOAD= qemu-io "$@"; }

# qemu-img check -q, showing the report when it is not clean.
img_clean() {
    if ! qemu_img check -q "$1" >/dev/null 2>&1; then
        qemu_img check "$1"
        return 1
    fi
}

# Incompatible feature bit 0 (dirty) of a qcow2 v3 header.
img_dirty() {
    local b
    b=$(od -An -tu1 -j79 -N1 "$1" | tr -d ' ')
    echo $((b & 1))
}

# Guest contents of an image as QEMU reads them.
img_raw() { qemu_img convert -O raw "$1" "$2"; }

finish() {
    section "done"
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}
