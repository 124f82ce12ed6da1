#!/bin/bash
# host-tests/nbd.sh PLUGIN: the nbdkit plugin driven by clients we did not
# write (qemu-io, qemu-img, nbdinfo, nbdcopy), with QEMU's own qcow2 driver
# as the oracle once the server has stopped. Flows run bare and under
# nbdkit's blocksize, log and error filters. Last line: "N passed, N failed".
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
PLUGIN=$(realpath "$1")
W=${OXQCOW_TEST_DIR:-/tmp/oxqcow-host-tests}/nbd
rm -rf "$W"
mkdir -p "$W"
cd "$W" || exit 1
SOCK=$W/nbd.sock
PIDF=$W/nbdkit.pid
URI="nbd+unix:///?socket=$SOCK"
H="python3 $HERE/helpers.py"

# start "FILTER OPTIONS" IMAGE [KEY=VALUE...]: nbdkit in the foreground as
# our child (so stop can reap it at once), ready once its pid file exists
# (written after the image is open and the socket bound).
NBDKIT_PID=
start() {
    local filters=$1
    shift
    rm -f "$SOCK" "$PIDF"
    # shellcheck disable=SC2086
    nbdkit -f -U "$SOCK" -P "$PIDF" $filters "$PLUGIN" "$@" >"$W/nbdkit.err" 2>&1 &
    NBDKIT_PID=$!
    while [ ! -s "$PIDF" ]; do
        if ! kill -0 "$NBDKIT_PID" 2>/dev/null; then
            wait "$NBDKIT_PID"
            NBDKIT_PID=
            cat "$W/nbdkit.err" >&2
            return 1
        fi
        sleep 0.01
    done
}

# stop: SIGTERM, then wait until nbdkit has unloaded the plugin (closed the image).
stop() {
    [ -n "$NBDKIT_PID" ] || return 0
    kill "$NBDKIT_PID" 2>/dev/null
    wait "$NBDKIT_PID"
    NBDKIT_PID=
    rm -f "$PIDF"
}
trap stop EXIT

new_img() { qemu_img create -q -f qcow2 -o "${3:-lazy_refcounts=on}" "$1" "$2"; }

# qemu-io over NBD, failing when any command failed or a pattern differed.
nbd_io() {
    local out
    out=$(qemu-io -f raw "$@" "$URI" 2>&1)
    if [ $? -ne 0 ] || grep -qiE 'fail|error|mismatch' <<<"$out"; then
        printf '%s\n' "$out" | grep -iE 'fail|error|mismatch' | head -5
        return 1
    fi
}

# The guest layout the pattern flow writes and then reads back.
PATTERN_WRITES=(
    -c "write -P 0x11 0 128k" -c "write -P 0x22 100000 70000" -c "write -P 0x33 65535 2"
    -c "write -z 1M 256k" -c "write -P 0x44 2M 1M" -c "write -z -u 2M 512k"
    -c "write -P 0x55 8M 192k" -c "discard 8M 64k" -c "write -f -P 0x66 40M 4k"
    -c "write -P 0x77 67043328 65536" -c "flush"
)
PATTERN_READS=(
    -c "read -P 0x11 0 65535" -c "read -P 0x33 65535 2" -c "read -P 0x11 65537 34463"
    -c "read -P 0x22 100000 70000" -c "read -P 0 170000 878576" -c "read -P 0 1M 256k"
    -c "read -P 0 2M 512k" -c "read -P 0x44 2621440 524288" -c "read -P 0 8M 64k"
    -c "read -P 0x55 8454144 131072" -c "read -P 0x66 40M 4k" -c "read -P 0 41M 1M"
    -c "read -P 0x77 67043328 65536"
)

flow_patterns() {
    local tag=$1 filters=$2 img=$W/pattern.qcow2
    shift 2
    new_img "$img" 64M
    start "$filters" "$img" "$@" || { not_ok "$tag: server starts"; return; }
    check "$tag: qemu-io pattern writes over nbd+unix" nbd_io "${PATTERN_WRITES[@]}"
    check "$tag: qemu-io pattern reads over nbd+unix" nbd_io "${PATTERN_READS[@]}"
    check_eq "$tag: dirty bit set while serving (lazy refcounts)" "$(img_dirty "$img")" 1
    stop
    check "$tag: qemu-img check clean after the server stops" img_clean "$img"
    check_eq "$tag: dirty bit cleared at unload" "$(img_dirty "$img")" 0
    check "$tag: QEMU's qcow2 driver reads the same patterns" \
        qemu_io -f qcow2 "${PATTERN_READS[@]}" "$img"
}

flow_random() {
    local tag=$1 filters=$2 img=$W/random.qcow2
    shift 2
    new_img "$img" 64M
    qemu_io -f qcow2 -c "write -P 0x5a 0 6M" -c "write -P 0xa5 30M 2M" "$img" >/dev/null
    $H randio "${#tag}" 300 $((64 << 20)) --zeros >random.cmds
    local args=()
    while read -r c; do args+=(-c "$c"); done <random.cmds
    start "$filters" "$img" "$@" || { not_ok "$tag: server starts"; return; }
    check "$tag: 300 random writes, zeroes and discards over nbd" nbd_io "${args[@]}"
    rm -f export.raw
    check "$tag: export read by qemu-img over nbd" \
        qemu-img convert -f raw -O raw "$URI" export.raw
    nbdinfo --map "$URI" >random.map 2>&1
    check "$tag: every extent reported as zero reads as zeros" $H zerocheck random.map export.raw
    stop
    check "$tag: qemu-img check clean" img_clean "$img"
    check "$tag: qemu-img compare qcow2 (QEMU's driver) with the export (ours)" \
        qemu_img compare -f qcow2 -F raw "$img" export.raw
}

# A layout with every kind of cluster: data, data holding only zeros
# (write -P 0, over an unallocated and over a data cluster), zero (allocated and plain),
# unmapped, discarded, unallocated; the map must match QEMU's map exactly.
flow_map() {
    local tag=$1 filters=$2 img=$W/map.qcow2
    shift 2
    new_img "$img" 64M
    start "$filters" "$img" "$@" || { not_ok "$tag: server starts"; return; }
    check "$tag: map layout written" nbd_io -c "write -P 1 0 1M" -c "write -z 256k 128k" \
        -c "write -P 0 2M 64k" -c "write -P 0 1M 64k" \
        -c "write -z -u 512k 192k" -c "discard 896k 64k" -c "write -P 2 3M 100" \
        -c "write -P 3 5M 2M" -c "write -z 6M 64k" -c "write -z 10M 1M" -c "write -P 4 63M 1M"
    nbdinfo --map "$URI" >map.nbd 2>&1
    stop
    qemu_img map --output=json "$img" >map.json
    check "$tag: nbdinfo --map equals qemu-img map" $H mapcmp map.nbd map.json
    check "$tag: map image clean" img_clean "$img"
}

flow_copy() {
    local tag=$1 filters=$2 size=$3 img=$W/copy.qcow2
    shift 3
    # Random data in every other 2 MiB stripe, the rest a sparse hole.
    if [ ! -f "src-$size.raw" ]; then
        truncate -s "$size" "src-$size.raw"
        local s
        for ((s = 0; s < size >> 20; s += 4)); do
            head -c 2M /dev/urandom | dd of="src-$size.raw" bs=1M seek=$s conv=notrunc status=none
        done
    fi
    new_img "$img" "$size"
    start "$filters" "$img" "$@" || { not_ok "$tag: server starts"; return; }
    check "$tag: nbdcopy $((size >> 20)) MiB into the export" nbdcopy "src-$size.raw" "$URI"
    rm -f copy-out.raw
    check "$tag: nbdcopy $((size >> 20)) MiB out of the export" nbdcopy "$URI" copy-out.raw
    check "$tag: copied out = copied in" cmp "src-$size.raw" copy-out.raw
    stop
    check "$tag: copy image clean" img_clean "$img"
    check "$tag: qemu-img compare source with the qcow2" \
        qemu_img compare -f raw -F qcow2 "src-$size.raw" "$img"
    rm -f copy-out.raw
}

# Random write errors injected before the plugin: qemu-io reports them, the
# writes that succeeded are in the image, and the image stays consistent.
flow_errors() {
    local tag=error img=$W/errors.qcow2
    new_img "$img" 64M
    qemu_io -f qcow2 -c "write -P 0x5a 0 6M" "$img" >/dev/null
    qemu_img convert -O raw "$img" errors-base.raw
    $H randio 7 200 $((64 << 20)) >errors.cmds
    local args=()
    while read -r c; do args+=(-c "$c"); done <errors.cmds
    rm -f "$W/read-errors"
    start "--filter=error" "$img" error-pwrite=EIO error-pwrite-rate=10% \
        error-pread=EIO error-pread-rate=100% error-pread-file="$W/read-errors" ||
        { not_ok "$tag: server starts"; return; }
    qemu-io -f raw "${args[@]}" "$URI" >errors.out 2>&1
    local counts
    counts=$($H model errors-base.raw errors.cmds errors.out errors-model.raw)
    check "$tag: some writes failed and qemu-io reported them ($counts done/failed)" \
        test "${counts#* }" -gt 0
    touch "$W/read-errors"
    check "$tag: an injected read error is reported" \
        grep -q 'read failed: Input/output error' <<<"$(qemu-io -f raw -c "read 0 64k" "$URI" 2>&1)"
    rm -f "$W/read-errors"
    check "$tag: reads work again once errors stop" nbd_io -c "read -P 0x5a 6M 0" -c "read 0 64M"
    stop
    check "$tag: qemu-img check clean after injected errors" img_clean "$img"
    check "$tag: image holds exactly the writes that succeeded" \
        qemu_img compare -f qcow2 -F raw "$img" errors-model.raw
    check_eq "$tag: dirty bit cleared" "$(img_dirty "$img")" 0
}

flow_features() {
    local img=$W/feat.qcow2 v2=$W/feat-v2.qcow2 info
    new_img "$img" 64M
    start "" "$img" || { not_ok "features: server starts"; return; }
    info=$(nbdinfo "$URI" 2>&1)
    check "nbdinfo: can_multi_conn, can_fua, can_fast_zero, can_trim, can_zero" \
        grep -qzE 'can_fast_zero: true.*can_fua: true.*can_multi_conn: true.*can_trim: true.*can_zero: true' <<<"$info"
    check "nbdinfo: block sizes 1 / cluster size / 4G-1" \
        grep -qzE 'block_size_minimum: 1.*block_size_preferred: 65536.*block_size_maximum: 4294967295' <<<"$info"
    # Two clients writing at once (multi-conn), each then reading the other's data.
    local p1 p2
    qemu-io -f raw -c "write -P 0x61 0 8M" -c flush "$URI" >/dev/null 2>&1 &
    p1=$!
    qemu-io -f raw -c "write -P 0x62 8M 8M" -c flush "$URI" >/dev/null 2>&1 &
    p2=$!
    wait "$p1" "$p2"
    check "two connections wrote concurrently" nbd_io -c "read -P 0x61 0 8M" -c "read -P 0x62 8M 8M"
    # FUA: a FUA write is on disk at once, as QEMU sees the file while we serve.
    check "FUA write" nbd_io -c "write -f -P 0x63 20M 64k"
    check "FUA write is durable: qemu-io -U reads it from the file while serving" \
        qemu_io -r -U -f qcow2 -c "read -P 0x63 20M 64k" "$img"
    # Fast zero: whole clusters of a v3 image are fast; a partial cluster of data is not.
    check "fast zero of whole clusters succeeds" nbd_io -c "write -z -n 0 1M" -c "read -P 0 0 1M"
    local out
    out=$(qemu-io -f raw -c "write -z -n 8M 4096" "$URI" 2>&1)
    check "fast zero of a partial data cluster fails with ENOTSUP" \
        grep -q 'Operation not supported' <<<"$out"
    check "...and leaves the data alone" nbd_io -c "read -P 0x62 8M 8M"
    check "slow zero of a partial cluster" nbd_io -c "write -z 8M 4096" -c "read -P 0 8M 4096"
    stop
    check "features image clean" img_clean "$img"

    # compat=0.10: no zero clusters, so fast zero only over holes.
    new_img "$v2" 16M compat=0.10
    qemu_io -f qcow2 -c "write -P 0x70 0 1M" "$v2" >/dev/null
    start "" "$v2" || { not_ok "v2: server starts"; return; }
    out=$(qemu-io -f raw -c "write -z -n 0 1M" "$URI" 2>&1)
    check "v2: fast zero over data fails with ENOTSUP" grep -q 'Operation not supported' <<<"$out"
    check "v2: fast zero over unallocated clusters succeeds" nbd_io -c "write -z -n 4M 1M"
    check "v2: zero and discard read back as zeros" \
        nbd_io -c "write -z 0 512k" -c "read -P 0 0 512k" -c "read -P 0x70 512k 512k"
    stop
    check "v2 image clean" img_clean "$v2"

    # readonly=true: nothing can be written, the file is untouched.
    local sum
    sum=$(sha256sum <"$img")
    start "" "$img" readonly=true || { not_ok "readonly: server starts"; return; }
    check "readonly=true: nbdinfo reports a read-only export" \
        grep -q 'is_read_only: true' <<<"$(nbdinfo "$URI" 2>&1)"
    out=$(qemu-io -f raw -c "write -P 1 0 4k" "$URI" 2>&1)
    check "readonly=true: writes are refused" grep -qiE 'fail|denied|read-only' <<<"$out"
    check "readonly=true: reads work" nbd_io -r -c "read -P 0x61 2M 64k"
    stop
    check_eq "readonly=true: the image file is unchanged" "$(sha256sum <"$img")" "$sum"

    # lazy-refcounts=off on an image that has them: no dirty bit while writing.
    start "" "$img" lazy-refcounts=off || { not_ok "lazy-refcounts=off: server starts"; return; }
    nbd_io -c "write -P 9 30M 1M"
    check_eq "lazy-refcounts=off: image not marked dirty while writing" "$(img_dirty "$img")" 0
    stop
    check "lazy-refcounts=off: image clean" img_clean "$img"

    # Errors from the plugin itself: a missing file, a non-qcow2 file.
    check "a missing image is refused at start-up" \
        bash -c "! nbdkit -U '$SOCK' '$PLUGIN' '$W/missing.qcow2' 2>/dev/null"
    head -c 1M /dev/zero >"$W/plain.raw"
    check "a raw file is refused at start-up" \
        bash -c "! nbdkit -U '$SOCK' '$PLUGIN' '$W/plain.raw' 2>/dev/null"
}

section "nbdkit plugin: $PLUGIN"
check "nbdkit --dump-plugin" bash -c "nbdkit '$PLUGIN' --dump-plugin | grep -q '^oxqcow_version='"

section "bare plugin"
flow_patterns plain ""
flow_random plain ""
flow_map plain ""
flow_copy plain "" $((256 << 20))
flow_features

section "blocksize filter (minblock=4096 maxdata=32k maxlen=1M)"
BS="--filter=blocksize"
flow_patterns blocksize "$BS" minblock=4096 maxdata=32k maxlen=1M
flow_random blocksize "$BS" minblock=4096 maxdata=32k maxlen=1M
flow_map blocksize "$BS" minblock=4096 maxdata=32k maxlen=1M
flow_copy blocksize "$BS" $((64 << 20)) minblock=4096 maxdata=32k maxlen=1M

section "log filter"
flow_patterns log "--filter=log" logfile="$W/log-patterns.txt"
check "log: FUA write logged and served" grep -q 'Write .*fua=1' "$W/log-patterns.txt"
flow_random log "--filter=log" logfile="$W/log-random.txt"
check "log: trims and zeroes reached the plugin" \
    bash -c "grep -q 'Trim ' '$W/log-random.txt' && grep -q 'Zero ' '$W/log-random.txt'"
flow_map log "--filter=log" logfile="$W/log-map.txt"
check "log: extents requests served" grep -q 'Extents .*return=0' "$W/log-map.txt"
flow_copy log "--filter=log" $((64 << 20)) logfile="$W/log-copy.txt"
check "log: no request failed" bash -c "! grep -h 'return=-1' '$W'/log-*.txt"

section "error filter"
flow_errors

# nbdkit/qemu-nbd-wrapper as common.rc runs it for `check -raw -nbd`.
flow_wrapper() {
    local wrap=$HERE/../nbdkit/qemu-nbd-wrapper raw=$W/iot.raw pidf=$W/iot.pid wpid i
    qemu_img create -q -f raw "$raw" 32M
    rm -f "$SOCK" "$pidf" "$W/iot.log"
    OXQCOW_NBDKIT_PLUGIN=$PLUGIN OXQCOW_NBD_CHECK_LOG=$W/iot.log \
        "$wrap" --pid-file="$pidf" -v -t -k "$SOCK" -f raw -e 42 -x '' "$raw" >/dev/null 2>&1 &
    wpid=$!
    for i in $(seq 500); do [ -s "$pidf" ] && [ -S "$SOCK" ] && break; sleep 0.01; done
    check "wrapper: serves a qcow2 sidecar of the raw file's size" \
        grep -q 'export-size: 33554432' <<<"$(nbdinfo "$URI" 2>&1)"
    check "wrapper: I/O through the sidecar" nbd_io -c "write -P 0x3c 1M 1M" -c "read -P 0x3c 1M 1M"
    kill "$(cat "$pidf")"
    wait "$wpid"
    check "wrapper: the sidecar was checked clean once the test stopped the server" \
        grep -q " ok $raw.qcow2" "$W/iot.log"
    check "wrapper: the sidecar holds the writes" qemu_io -f qcow2 -c "read -P 0x3c 1M 1M" "$raw.qcow2"
    check "wrapper: other invocations go to the real qemu-nbd" \
        bash -c "'$wrap' --version | grep -q qemu-nbd"
}
section "qemu-nbd-wrapper (qemu-iotests -nbd)"
flow_wrapper

finish
