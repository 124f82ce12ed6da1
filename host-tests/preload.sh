#!/bin/bash
# host-tests/preload.sh SHIM CALLS_PROGRAM: everyday programs run unmodified
# under LD_PRELOAD=liboxqcow-preload.so on qcow2 images; every result is
# compared with the same program on the raw view (`qemu-img convert -O raw`),
# and every image written is checked by qemu-img afterwards.
# Last line: "N passed, N failed".
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
SHIM=$(realpath "$1")
CALLS=$(realpath "$2")
W=${OXQCOW_TEST_DIR:-/tmp/oxqcow-host-tests}/preload
rm -rf "$W"
mkdir -p "$W"
cd "$W" || exit 1

# pre CMD...: CMD with the shim.
pre() { LD_PRELOAD=$SHIM "$@"; }

# The test image: data, unaligned data, zero clusters, a discarded range,
# unallocated space, the last cluster; lazy refcounts.
make_img() {
    qemu_img create -q -f qcow2 -o lazy_refcounts=on "$1" 64M
    qemu_io -f qcow2 -c "write -P 0x41 0 1M" -c "write -P 0x42 1234567 100000" \
        -c "write -z 256k 128k" -c "discard 512k 64k" -c "write -P 0x43 5M 3M" \
        -c "write -P 0x44 67043328 65536" "$1" >/dev/null
}

# same DESC "CMD ON {}": CMD with {} the image (under the shim) and with {}
# the raw view (without) print the same thing (file names replaced by X).
same() {
    local desc=$1 cmd=$2 a b
    a=$(LD_PRELOAD=$SHIM bash -c "${cmd//\{\}/img.qcow2}" 2>&1 | sed 's/img\.qcow2/X/g')
    b=$(bash -c "${cmd//\{\}/img.raw}" 2>&1 | sed 's/img\.raw/X/g')
    if [ "$a" = "$b" ]; then
        ok "$desc"
    else
        not_ok "$desc"
        diff <(echo "$b") <(echo "$a") | head -6 | sed 's/^/    /' >&2
    fi
}

# Image and raw twin still hold the same guest contents; the image is clean.
in_sync() {
    local img=$1 raw=$2
    img_clean "$img" || return 1
    rm -f sync.raw
    img_raw "$img" sync.raw && cmp sync.raw "$raw"
}

section "LD_PRELOAD shim: $SHIM"
head -c 300000 /dev/urandom >rand.bin
make_img img.qcow2
img_raw img.qcow2 img.raw
SIZE=$((64 << 20))

section "reading with everyday tools"
same "cat" "cat {} | sha256sum"
same "cat from stdin (a descriptor the shell opened)" "cat < {} | sha256sum"
same "dd if= bs=1M" "dd if={} bs=1M status=none | sha256sum"
same "dd if= skip= count= (4k blocks)" "dd if={} bs=4k skip=301 count=700 status=none | sha256sum"
same "cmp with the raw view" "cmp {} $W/img.raw && echo same"
same "cmp finds the first difference" "cmp {} $W/rand.bin; echo \$?"
same "sha256sum" "sha256sum {}"
same "od -A d -t x1" "od -A d -t x1 {} | sha256sum"
same "od -j -N (skip into the image)" "od -A x -t x2 -j 1234560 -N 64 {}"
same "wc -c" "wc -c {}"
same "wc -c from stdin" "wc -c < {}"
same "stat -c %s" "stat -c %s {}"
same "stat -L through a symlink" "ln -sf {} link.qcow2; stat -L -c %s link.qcow2; rm -f link.qcow2"
same "tail -c (lseek from the end)" "tail -c 70000 {} | sha256sum"
same "head -c" "head -c 1300000 {} | sha256sum"
same "python3 reads" "python3 -c 'import hashlib,os,sys; d=open(sys.argv[1],\"rb\").read(); print(len(d), os.path.getsize(sys.argv[1]), hashlib.sha256(d).hexdigest())' {}"
same "tar cf (extracted again)" "tar cf - {} | tar xOf - | sha256sum"
same "tar --sparse (SEEK_HOLE)" "tar --sparse -cf - {} | tar xOf - | sha256sum"
same "gzip -c" "gzip -1 -c {} | gunzip | sha256sum"
same "bash read builtin on a redirection" "read -r -N 300 x < {}; echo \"\$x\" | sha256sum"
same "perl sysseek, sysread, -s" "perl -e 'open(F, \"<\", \$ARGV[0]); sysseek(F, 1234560, 0); sysread(F, \$b, 4096); print unpack(\"H*\", \$b), \" \", -s \$ARGV[0], \"\\n\"' {} | sha256sum"
rm -f cp.raw
check "cp out of the image" pre cp img.qcow2 cp.raw
check "cp copy equals the raw view" cmp cp.raw img.raw
rm -f cp-sparse.raw
check "cp --sparse=always (SEEK_DATA/SEEK_HOLE)" pre cp --sparse=always img.qcow2 cp-sparse.raw
check "sparse copy equals the raw view" cmp cp-sparse.raw img.raw
check "sparse copy has holes" test "$(du -k cp-sparse.raw | cut -f1)" -lt 20000
check "the shim leaves plain files alone" bash -c "[ \"\$(LD_PRELOAD=$SHIM sha256sum img.raw)\" = \"\$(sha256sum img.raw)\" ]"
check "OXQCOW_PRELOAD_DISABLE=1 shows the qcow2 file itself" \
    bash -c "OXQCOW_PRELOAD_DISABLE=1 LD_PRELOAD=$SHIM cat img.qcow2 | cmp - img.qcow2"
check "a read-only pass leaves the image file untouched" \
    bash -c "s=\$(sha256sum < img.qcow2); LD_PRELOAD=$SHIM cat img.qcow2 >/dev/null; [ \"\$s\" = \"\$(sha256sum < img.qcow2)\" ]"

section "other images: compressed clusters, a backing chain"
qemu_img convert -c -O qcow2 img.qcow2 comp.qcow2
check "cat of a compressed image" bash -c "LD_PRELOAD=$SHIM cat comp.qcow2 | cmp - img.raw"
qemu_img create -q -f qcow2 -b img.qcow2 -F qcow2 over.qcow2
qemu_io -f qcow2 -c "write -P 0x77 600k 200k" over.qcow2 >/dev/null
img_raw over.qcow2 over.raw
check "cat of an overlay reads through its backing file" \
    bash -c "LD_PRELOAD=$SHIM cat over.qcow2 | cmp - over.raw"
rm -f over-cp.raw
check "cp of an overlay (no holes claimed over backing data)" \
    bash -c "LD_PRELOAD=$SHIM cp --sparse=always over.qcow2 over-cp.raw && cmp over-cp.raw over.raw"

section "writing with everyday tools"
cp img.raw twin.raw
check "dd of= conv=notrunc (image)" pre dd if=rand.bin of=img.qcow2 bs=4k seek=77 conv=notrunc status=none
dd if=rand.bin of=twin.raw bs=4k seek=77 conv=notrunc status=none
check "dd of= conv=notrunc: image and twin agree" in_sync img.qcow2 twin.raw
check "dd of= unaligned bs, oflag=seek_bytes" pre dd if=rand.bin of=img.qcow2 bs=1000 count=123 \
    seek=3333333 oflag=seek_bytes conv=notrunc status=none
dd if=rand.bin of=twin.raw bs=1000 count=123 seek=3333333 oflag=seek_bytes conv=notrunc status=none
check "dd unaligned: image and twin agree" in_sync img.qcow2 twin.raw
check "dd of= conv=notrunc,fdatasync" pre dd if=rand.bin of=img.qcow2 bs=64k seek=200 \
    conv=notrunc,fdatasync status=none
dd if=rand.bin of=twin.raw bs=64k seek=200 conv=notrunc,fdatasync status=none
check "dd fdatasync: image and twin agree" in_sync img.qcow2 twin.raw
check_eq "dirty bit cleared after the writer exits" "$(img_dirty img.qcow2)" 0

cat >pyw.py <<'EOF'
import os, sys
p = sys.argv[1]
with open(p, "r+b") as f:
    for off, n, v in [(0, 10, 1), (65530, 20, 2), (2 << 20, 300000, 3), (9999999, 4097, 4)]:
        f.seek(off)
        f.write(bytes([v]) * n)
    f.seek(100)
    head = f.read(4)
    f.flush()
    os.fsync(f.fileno())
fd = os.open(p, os.O_RDWR)
os.pwrite(fd, b"pwrite!" * 1000, 40 << 20)
os.lseek(fd, -7, os.SEEK_END)
os.write(fd, b"the end")
print(head.hex(), os.pread(fd, 7, 40 << 20), os.fstat(fd).st_size, os.lseek(fd, 0, os.SEEK_CUR))
os.close(fd)
EOF
same "python3 writes (r+b, seek, write, pwrite, fsync)" "python3 pyw.py {}"
python3 pyw.py twin.raw >/dev/null
check "python3 writes: image and twin agree" in_sync img.qcow2 twin.raw

check "printf with stdout opened on the image by the shell (1<>)" \
    bash -c "LD_PRELOAD=$SHIM /usr/bin/printf 'stdout into the guest %d' 42 1<>img.qcow2"
/usr/bin/printf 'stdout into the guest %d' 42 1<>twin.raw
check "printf 1<>: image and twin agree" in_sync img.qcow2 twin.raw

section "cp and truncate onto an existing image"
qemu_img create -q -f qcow2 dst.qcow2 1M
check "cp raw onto an image (O_TRUNC empties the guest, the copy grows it)" pre cp twin.raw dst.qcow2
check "the image holds the copy" in_sync dst.qcow2 twin.raw
check "truncate -s 32M on the image" pre truncate -s 32M dst.qcow2
truncate -s 32M twin32.raw
dd if=twin.raw of=twin32.raw bs=1M count=32 conv=notrunc status=none
check "truncated image holds the first 32 MiB" in_sync dst.qcow2 twin32.raw
check_eq "stat -c %s after truncate" "$(pre stat -c %s dst.qcow2)" $((32 << 20))

section "mkfs.ext4 on an image"
qemu_img create -q -f qcow2 -o lazy_refcounts=on fs.qcow2 64M
mkdir -p tree/sub
echo "hello from the guest" >tree/hello.txt
cp rand.bin tree/sub/rand.bin
check "mkfs.ext4 -F -d (populated) on the image" pre mkfs.ext4 -q -F -d tree -E nodiscard fs.qcow2
check "qemu-img check clean after mkfs" img_clean fs.qcow2
check_eq "dirty bit cleared after mkfs" "$(img_dirty fs.qcow2)" 0
check "QEMU reads the ext4 magic 0xEF53 at 1024+56" \
    bash -c "OXQCOW_PRELOAD_DISABLE=1 qemu-io -f qcow2 -c 'read -P 0x53 1080 1' -c 'read -P 0xef 1081 1' fs.qcow2 | grep -vq 'fail'"
rm -f fs.raw
img_raw fs.qcow2 fs.raw
check "dumpe2fs on the raw conversion" bash -c "dumpe2fs -h fs.raw 2>/dev/null | grep -q 'magic number: *0xEF53'"
check "e2fsck -fn on the raw conversion" e2fsck -fn fs.raw
check "debugfs reads the populated file back" \
    bash -c "[ \"\$(debugfs -R 'cat /hello.txt' fs.raw 2>/dev/null)\" = 'hello from the guest' ]"
check "debugfs: a 300 KB file survived" bash -c "debugfs -R 'cat /sub/rand.bin' fs.raw 2>/dev/null | cmp - rand.bin"
qemu_img create -q -f qcow2 fs2.qcow2 64M
check "mkfs.ext4 with discard (fallocate punch hole) on the image" pre mkfs.ext4 -q -F fs2.qcow2
check "qemu-img check clean after mkfs with discard" img_clean fs2.qcow2
rm -f fs2.raw
img_raw fs2.qcow2 fs2.raw
check "e2fsck -fn after mkfs with discard" e2fsck -fn fs2.raw
check "dumpe2fs through the shim reads the image directly" \
    bash -c "LD_PRELOAD=$SHIM dumpe2fs -h fs2.qcow2 2>/dev/null | grep -q 'magic number: *0xEF53'"

section "every intercepted call (preload_calls)"
make_img calls.qcow2
img_raw calls.qcow2 calls.raw
mkdir -p scratch
out=$(pre "$CALLS" "$W/calls.qcow2" "$W/calls.raw" "$W/scratch" 2>&1)
res=$(grep '^RESULT ' <<<"$out" | tail -1)
read -r _ _ cp cf <<<"$res"
if [ -n "$res" ] && [ "$cf" -eq 0 ]; then
    passed=$((passed + cp))
    ok "preload_calls: $cp checks"
else
    failed=$((failed + ${cf:-1}))
    passed=$((passed + ${cp:-0}))
    not_ok "preload_calls"
    grep -v '^RESULT' <<<"$out" | head -20 | sed 's/^/    /' >&2
fi
check "after preload_calls: image and twin agree" in_sync calls.qcow2 calls.raw

finish
