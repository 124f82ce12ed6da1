#!/usr/bin/env python3
"""make bench: the same workloads through QEMU's qcow2 driver and oxqcow's,
alternating, in one run; prints medians and ratios (oxqcow / QEMU, and each
/ a raw file).

In process, `qemu-img bench` and `oxqcow bench` get the same arguments.
Then, over NBD (scripts/bench_nbd.py), qemu-nbd -f qcow2 against nbdkit
with our plugin, both driven by `qemu-img bench -f raw nbd+unix://...`;
BENCH_NBD=0 skips that section, BENCH_NBD=only runs it alone.
Everything runs in BENCH_DIR (default build/bench); sizes shrink with
BENCH_SCALE=small for a quick look. No result is asserted: machines are
shared and noisy, and the numbers are for people.
"""

import os
import re
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_nbd  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OXQCOW = os.path.join(ROOT, "target", "release", "oxqcow")
DIR = os.environ.get("BENCH_DIR", os.path.join(ROOT, "build", "bench"))
SMALL = os.environ.get("BENCH_SCALE") == "small"
REPS = int(os.environ.get("BENCH_REPS", "3"))
# The reads wait on the device, whose speed moves 10-30 % from run to run
# on a shared virtual disk: more runs for a steadier median.
IO_REPS = int(os.environ.get("BENCH_IO_REPS", str(max(REPS, 5))))
# BENCH_ONLY=REGEX runs the rows whose name matches (e.g. "seq read").
ONLY = re.compile(os.environ.get("BENCH_ONLY", ""))

GiB = 1 << 30


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def bench_seconds(tool, args):
    """Runs `<tool> bench ARGS` and returns the reported seconds."""
    exe = "qemu-img" if tool == "qemu" else OXQCOW
    out = run([exe, "bench"] + args).stdout
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise RuntimeError(f"{exe} bench printed no timing: {out}")
    return float(m.group(1))


def timed(cmd):
    t = time.monotonic()
    run(cmd)
    return time.monotonic() - t


def path(name):
    return os.path.join(DIR, name)


def fresh_qcow2(name, size, opts=""):
    p = path(name)
    if os.path.exists(p):
        os.remove(p)
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    run(args + [p, str(size)])
    return p


def fresh_raw(name, size):
    p = path(name)
    with open(p, "wb") as f:
        f.truncate(size)
    return p


class Row:
    def __init__(self, name):
        self.name = name
        self.t = {"qemu": [], "oxqcow": [], "raw": []}

    def runs(self):
        return len(self.t["oxqcow"])

    def med(self, k):
        return statistics.median(self.t[k]) if self.t[k] else None


def wanted(name):
    return ONLY.search(name) is not None


def workload_bench(name, bench_args, opts="", size=4 * GiB, setup=None, raw=True, fmt_args=None, reps=REPS):
    """A qemu-img bench workload on a fresh image per run (setup may fill
    it); a row not wanted is returned without runs."""
    row = Row(name)
    for _ in range(reps if wanted(name) else 0):
        for tool in ("qemu", "oxqcow"):
            img = fresh_qcow2(f"w-{tool}.qcow2", size, opts)
            if setup:
                setup(img)
            target = img if fmt_args is None else fmt_args(img)
            extra = ["-f", "qcow2"] if fmt_args is None else ["--image-opts"]
            row.t[tool].append(bench_seconds(tool, bench_args + extra + [target]))
            os.remove(img)
        if raw:
            r = fresh_raw("w.raw", size)
            if setup:
                setup(r, "raw")
            row.t["raw"].append(bench_seconds("qemu", bench_args + ["-f", "raw", r]))
            os.remove(r)
    return row


def fill(img, fmt="qcow2", count=None, size="64k"):
    n = count or (256 if SMALL else 16384)
    run(["qemu-img", "bench", "-q", "-w", "-t", "unsafe", "-c", str(n), "-s", size, "-S", size, "-f", fmt, img])
    # Written back before the timed run: an O_DIRECT read of dirty pages
    # would first wait for their writeback, and time that instead.
    os.sync()


def main():
    if not os.path.exists(OXQCOW):
        sys.exit("build first: make")
    shutil.rmtree(DIR, ignore_errors=True)
    os.makedirs(DIR)
    nbd = os.environ.get("BENCH_NBD", "1")
    if nbd == "only":
        bench_nbd.main()
        return
    n1 = 500 if SMALL else 4000
    seq = 1024 if SMALL else 16384  # x 64 KiB = 1 GiB
    rows = []
    wt = ["-w", "-t", "writethrough", "-c", str(n1), "-s", "64k", "-S", "64k"]
    rows.append(workload_bench("1 wt alloc 64k, lazy on", wt, "lazy_refcounts=on"))
    rows.append(workload_bench("1 wt alloc 64k, lazy off", wt, "lazy_refcounts=off"))
    wt4 = ["-w", "-t", "writethrough", "-c", str(n1), "-s", "4k", "-S", "64k"]
    rows.append(workload_bench("2 wt alloc 4k/cluster", wt4))
    wb = ["-w", "-t", "writeback", "-c", str(seq), "-s", "64k", "-S", "64k"]
    rows.append(workload_bench("3 wb seq write 1G", wb))
    rows.append(workload_bench("3 wb overwrite 1G", wb, setup=lambda i, f="qcow2": fill(i, f, seq)))
    rd = ["-t", "none", "-c", str(seq), "-s", "64k", "-S", "64k"]
    rows.append(workload_bench("4 seq read 1G", rd, setup=lambda i, f="qcow2": fill(i, f, seq), reps=IO_REPS))
    nrand = 2000 if SMALL else 20000
    step = (4 * GiB) // nrand // 4096 * 4096
    rr = ["-t", "none", "-c", str(nrand), "-s", "4k", "-S", str(step)]
    small_cache = lambda img: f"driver=qcow2,file.filename={img},l2-cache-size=262144"
    rows.append(
        workload_bench(
            "4 4k reads over 4G, small L2 cache",
            rr,
            setup=lambda i, f="qcow2": fill(i, f, 4 * GiB // (1 << 20), "1M"),
            fmt_args=small_cache,
            reps=IO_REPS,
        )
    )
    rows.append(workload_bench("5 wt alloc 64k, depth 16", wt + ["-d", "16"], "lazy_refcounts=on"))
    rows.append(
        workload_bench(
            "5 4k reads, depth 16",
            rr + ["-d", "16"],
            setup=lambda i, f="qcow2": fill(i, f, 4 * GiB // (1 << 20), "1M"),
            reps=IO_REPS,
        )
    )
    rows += chain_and_convert()
    rows += open_and_check()
    report([r for r in rows if r.runs()])
    if wanted("peak memory"):
        peak_memory()
    if nbd != "0":
        bench_nbd.main()


def chain_and_convert():
    rows = []
    if not any(wanted(n) for n in ("6 seq read, 3-deep chain", "6 convert zlib-compressed to raw", "6 convert zstd-compressed to raw")):
        return rows
    size = (64 << 20) if SMALL else GiB
    base = fresh_qcow2("base.qcow2", size)
    fill(base, count=size >> 16)
    mid = path("mid.qcow2")
    top = path("top.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid])
    run(["qemu-img", "bench", "-q", "-w", "-c", str(size >> 18), "-s", "64k", "-S", "256k", "-f", "qcow2", mid])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top])
    os.sync()
    row = Row("6 seq read, 3-deep chain")
    if wanted(row.name):
        # The floor: the same reads from one raw file of the same size.
        floor = fresh_raw("chain-floor.raw", size)
        fill(floor, "raw", size >> 16)
        args = ["-t", "none", "-c", str(size >> 16), "-s", "64k", "-S", "64k"]
        for _ in range(IO_REPS):
            for tool in ("qemu", "oxqcow"):
                row.t[tool].append(bench_seconds(tool, args + ["-f", "qcow2", top]))
            row.t["raw"].append(bench_seconds("qemu", args + ["-f", "raw", floor]))
        os.remove(floor)
    rows.append(row)
    # Compressible but real data: text-like runs mixed with random blocks.
    src = path("src.raw")
    csize = (32 << 20) if SMALL else (256 << 20)
    rnd = os.urandom(1 << 20)
    with open(src, "wb") as f:
        for i in range(csize >> 16):
            block = (b"oxqcow %08d " % i) * 3000
            f.write(block[:49152] + rnd[(i * 16384) % len(rnd):][:16384].ljust(16384, b"z"))
    for ctype in ("zlib", "zstd"):
        c = path(f"c-{ctype}.qcow2")
        run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", src, c])
        row = Row(f"6 convert {ctype}-compressed to raw")
        if not wanted(row.name):
            continue
        out = path("out.raw")
        for _ in range(REPS):
            for tool, exe in (("qemu", "qemu-img"), ("oxqcow", OXQCOW)):
                if os.path.exists(out):
                    os.remove(out)
                row.t[tool].append(timed([exe, "convert", "-O", "raw", c, out]))
        rows.append(row)
    return rows


def open_and_check():
    """A clean 1 TiB image holding 100,000 allocated clusters."""
    rows = []
    if not (wanted("7 open+close 1T/100k clusters") or wanted("7 check 1T/100k clusters")):
        return rows
    img = fresh_qcow2("big.qcow2", 1 << 40)
    n = 10000 if SMALL else 100000
    run(["qemu-img", "bench", "-q", "-w", "-t", "unsafe", "-c", str(n), "-s", "4k", "-S", str((1 << 40) // n // 65536 * 65536), "-f", "qcow2", img])
    row = Row("7 open+close 1T/100k clusters")
    for _ in range(REPS if wanted(row.name) else 0):
        row.t["qemu"].append(timed(["qemu-io", "-f", "qcow2", "-c", "length", img]))
        row.t["oxqcow"].append(timed([OXQCOW, "io", "-f", "qcow2", "-c", "length", img]))
    rows.append(row)
    row = Row("7 check 1T/100k clusters")
    for _ in range(REPS if wanted(row.name) else 0):
        row.t["qemu"].append(timed(["qemu-img", "check", img]))
        row.t["oxqcow"].append(timed([OXQCOW, "check", img]))
    rows.append(row)
    return rows


def peak_rss_mb(cmd):
    """Runs cmd and returns its peak resident set size in MB (wait4)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    if status != 0:
        raise RuntimeError(f"{cmd} failed: {p.stderr.read().decode()}")
    return ru.ru_maxrss / 1024


def peak_memory():
    """Peak memory against the caches: allocating writes 1 GiB apart over a
    16 TiB image, so that every write needs another L2 table and the
    cache's bound is what holds memory down."""
    size = 16 << 40
    n = 1024 if SMALL else 16384
    step = size // 16384  # 1 GiB: qemu-img bench takes steps below 2 GiB
    args = ["-w", "-t", "unsafe", "-c", str(n), "-s", "4k", "-S", str(step)]
    print(f"\npeak RSS, {n} allocating 4 KiB writes {step >> 30} GiB apart in a 16 TiB image (MB)")
    print(f"{'L2 cache, queue depth':28} {'QEMU':>8} {'oxqcow':>8}")
    for label, cache in (("default", None), ("l2-cache-size=1M", 1 << 20)):
        for depth in ("64", "1"):
            got = {}
            for tool in ("qemu", "oxqcow"):
                img = fresh_qcow2(f"mem-{tool}.qcow2", size)
                exe = "qemu-img" if tool == "qemu" else OXQCOW
                target = ["-f", "qcow2", img] if cache is None else [
                    "--image-opts", f"driver=qcow2,file.filename={img},l2-cache-size={cache}"]
                got[tool] = peak_rss_mb([exe, "bench", "-d", depth] + args + target)
                os.remove(img)
            print(f"{label + ', depth ' + depth:28} {got['qemu']:8.1f} {got['oxqcow']:8.1f}")


def report(rows):
    print()
    print(f"{'workload':40} {'QEMU s':>9} {'oxqcow s':>9} {'raw s':>8} {'ox/QEMU':>8} {'QEMU/raw':>9} {'ox/raw':>7}")
    for r in rows:
        q, o, w = r.med("qemu"), r.med("oxqcow"), r.med("raw")
        f = lambda x: f"{x:9.3f}" if x is not None else f"{'-':>9}"
        ratio = lambda a, b: f"{a / b:8.2f}" if a and b else f"{'-':>8}"
        print(f"{r.name:40} {f(q)} {f(o)} {f(w)[1:]} {ratio(o, q)} {ratio(q, w):>9} {ratio(o, w)[1:]:>7}")
    print(f"\nmedians of {REPS} runs ({IO_REPS} for the read rows), alternating QEMU and oxqcow; ratios below 1.00 mean oxqcow is faster")


if __name__ == "__main__":
    main()
