#!/usr/bin/env python3
"""Helpers for host-tests/nbd.sh (no third-party modules).

  helpers.py randio SEED COUNT SIZE [--zeros]
      qemu-io commands: COUNT random pattern writes (and, with --zeros,
      write -z / write -z -u / discard) inside SIZE bytes, one per line.
  helpers.py model BASE.raw CMDS QEMU_IO_OUTPUT OUT.raw
      Applies the commands of CMDS that qemu-io reports as done (its output,
      in order) to a copy of BASE; prints "<done> <failed>".
  helpers.py mapcmp NBDINFO_MAP QEMU_MAP_JSON
      nbdinfo --map of the export against qemu-img map --output=json of the
      image: both reduced to data / zero runs, which must be equal.
  helpers.py zerocheck NBDINFO_MAP RAW
      Every range the export reports as zero reads as zeros in RAW.
"""
import json
import random
import sys


def randio(seed, count, size, zeros):
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        # Half the requests fall in the first 4 MiB, so they overlap.
        span = 4 << 20 if rnd.random() < 0.5 else size
        length = rnd.choice([rnd.randint(1, 4096), rnd.randint(1, 200000), 65536, 131072])
        off = rnd.randint(0, span - 1)
        if rnd.random() < 0.3:
            off -= off % 65536
        length = min(length, size - off)
        kind = rnd.random()
        if zeros and kind < 0.08:
            out.append("write -z %d %d" % (off, length))
        elif zeros and kind < 0.14:
            off -= off % 65536
            length = min(((length + 65535) // 65536) * 65536, size - off)
            out.append("write -z -u %d %d" % (off, length))
        elif zeros and kind < 0.18:
            out.append("discard %d %d" % (off - off % 65536, 65536))
        else:
            out.append("write -P %d %d %d" % (rnd.randint(1, 255), off, length))
    print("\n".join(out))


def model(base, cmds_file, output_file, out):
    data = bytearray(open(base, "rb").read())
    cmds = [c.split() for c in open(cmds_file).read().splitlines() if c.strip()]
    results = []
    for line in open(output_file).read().splitlines():
        if line.startswith(("wrote ", "discard ")) or line.startswith("discarded "):
            results.append(True)
        elif "failed" in line:
            results.append(False)
    done = failed = 0
    for cmd, okay in zip(cmds, results):
        if not okay:
            failed += 1
            continue
        done += 1
        off, length = int(cmd[-2]), int(cmd[-1])
        if cmd[0] == "write" and cmd[1] == "-P":
            data[off:off + length] = bytes([int(cmd[2])]) * length
        elif cmd[0] == "write":
            data[off:off + length] = bytes(length)
        else:
            raise SystemExit("model: unsupported command %r" % cmd)
    if len(results) != len(cmds):
        raise SystemExit("model: %d commands, %d results" % (len(cmds), len(results)))
    open(out, "wb").write(data)
    print(done, failed)


def runs(items):
    merged = []
    for start, length, kind in items:
        if length == 0:
            continue
        if merged and merged[-1][2] == kind and merged[-1][0] + merged[-1][1] == start:
            merged[-1][1] += length
        else:
            merged.append([start, length, kind])
    return merged


def nbd_map(path):
    items = []
    for line in open(path):
        f = line.split()
        if len(f) < 3:
            continue
        flags = int(f[2])
        items.append((int(f[0]), int(f[1]), "zero" if flags & 2 else "data"))
    return items


def mapcmp(nbd_file, qemu_file):
    ours = runs(nbd_map(nbd_file))
    theirs = runs([(e["start"], e["length"], "data" if e["data"] else "zero")
                   for e in json.load(open(qemu_file))])
    if ours != theirs:
        print("export map:", ours)
        print("qemu map:  ", theirs)
        raise SystemExit(1)
    print("%d runs equal" % len(ours))


def zerocheck(nbd_file, raw):
    data = open(raw, "rb").read()
    bad = [(s, n) for s, n, k in nbd_map(nbd_file) if k == "zero" and any(data[s:s + n])]
    if bad:
        print("ranges reported zero but not zero:", bad[:10])
        raise SystemExit(1)


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "randio":
        randio(int(a[1]), int(a[2]), int(a[3]), "--zeros" in a)
    elif a[0] == "model":
        model(a[1], a[2], a[3], a[4])
    elif a[0] == "mapcmp":
        mapcmp(a[1], a[2])
    elif a[0] == "zerocheck":
        zerocheck(a[1], a[2])
    else:
        raise SystemExit(__doc__)
