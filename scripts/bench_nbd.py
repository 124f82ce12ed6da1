#!/usr/bin/env python3
"""The NBD side of `make bench`: QEMU's qemu-nbd (-f qcow2) against nbdkit
with our plugin, both serving the same kind of image over a Unix socket,
driven by the same client: `qemu-img bench -f raw nbd+unix:///?socket=...`
with the same arguments, alternating server by server, BENCH_REPS times;
medians and ratios. Two floors serve a raw file: qemu-nbd -f raw, and
nbdkit's file plugin (what nbdkit itself costs, so that ox/file is the
price of the plugin and the qcow2 engine alone).

Caching is the same on both sides: qemu-nbd's defaults (--cache=writeback,
--aio=threads, no detect-zeroes, discard ignored) and the plugin's handle,
opened with BDRV_O_CACHE_WB (write-back: data and metadata reach the disk
at a flush); nbdkit runs with its defaults (16 threads, PARALLEL thread
model). A client in writethrough mode (-t writethrough) sends every write
with FUA, which both servers turn into the write plus a flush of the image
(metadata written back, fdatasync): that is the "writethrough" workload.

Each run gets a fresh server: started in the foreground, ready once its pid
file and socket exist, stopped with SIGTERM and waited for (exit status 0
required), and its qcow2 image checked with `qemu-img check` afterwards.
Write workloads start from a fresh image per run; read workloads read one
image filled beforehand (the same file for both qcow2 servers, one raw
twin for the floor).

Run alone: python3 scripts/bench_nbd.py (BENCH_SCALE=small, BENCH_REPS=N).
"""

import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.environ.get(
    "OXQCOW_NBDKIT_PLUGIN",
    os.path.join(ROOT, "build", "lib", "nbdkit", "plugins", "nbdkit-oxqcow-plugin.so"),
)
DIR = os.path.join(os.environ.get("BENCH_DIR", os.path.join(ROOT, "build", "bench")), "nbd")
SMALL = os.environ.get("BENCH_SCALE") == "small"
REPS = int(os.environ.get("BENCH_REPS", "3"))
GiB = 1 << 30
SERVERS = ("qemu", "oxqcow", "raw", "file")


def run(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def path(name):
    return os.path.join(DIR, name)


class Server:
    """One NBD server process serving `img` on a Unix socket."""

    def __init__(self, kind, img):
        self.kind, self.img = kind, img
        self.sock, pidf = path("nbd.sock"), path("nbd.pid")
        for f in (self.sock, pidf):
            if os.path.exists(f):
                os.remove(f)
        if kind in ("oxqcow", "file"):
            plugin = PLUGIN if kind == "oxqcow" else "file"
            cmd = ["nbdkit", "-f", "-U", self.sock, "-P", pidf, plugin, img]
        else:
            fmt = "raw" if kind == "raw" else "qcow2"
            cmd = ["qemu-nbd", "-t", "-f", fmt, "--cache=writeback", "--aio=threads",
                   "-k", self.sock, f"--pid-file={pidf}", img]
        self.log = open(path(f"{kind}.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        t = time.monotonic()
        while not (os.path.exists(pidf) and os.path.exists(self.sock)):
            if self.proc.poll() is not None or time.monotonic() - t > 30:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"{cmd[0]} did not start: {open(self.log.name).read()}")
            time.sleep(0.01)

    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self):
        """SIGTERM, wait for a clean exit, then check the image."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"{self.kind} server did not stop on SIGTERM")
        self.log.close()
        if rc != 0:
            raise RuntimeError(f"{self.kind} server exited with {rc}: {open(self.log.name).read()}")
        if self.kind in ("qemu", "oxqcow"):
            r = subprocess.run(["qemu-img", "check", "-f", "qcow2", self.img],
                               capture_output=True, text=True)
            if r.returncode != 0 or "No errors were found" not in r.stdout:
                raise RuntimeError(f"qemu-img check {self.img} after {self.kind}: {r.stdout}{r.stderr}")


def bench_over_nbd(srv, args):
    out = run(["qemu-img", "bench", "-f", "raw"] + args + [srv.uri()]).stdout
    for line in out.splitlines():
        if line.startswith("Run completed in "):
            return float(line.split()[3])
    raise RuntimeError(f"qemu-img bench printed no timing: {out}")


def fresh(kind, size, opts):
    """A new image for one server kind: qcow2 (opts) or a sparse raw file."""
    if kind in ("raw", "file"):
        p = path("w.raw")
        with open(p, "wb") as f:
            f.truncate(size)
        return p
    p = path(f"w-{kind}.qcow2")
    if os.path.exists(p):
        os.remove(p)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, str(size)])
    return p


class Row:
    def __init__(self, name):
        self.name = name
        self.t = {k: [] for k in SERVERS}

    def med(self, k):
        return statistics.median(self.t[k]) if self.t[k] else None


def write_workload(name, args, size=4 * GiB, opts="lazy_refcounts=on"):
    row = Row(name)
    for _ in range(REPS):
        for kind in SERVERS:
            img = fresh(kind, size, opts)
            srv = Server(kind, img)
            try:
                row.t[kind].append(bench_over_nbd(srv, args))
            finally:
                srv.stop()
            os.remove(img)
    return row


def read_workload(name, args, images):
    row = Row(name)
    for _ in range(REPS):
        for kind in SERVERS:
            srv = Server(kind, images[kind])
            try:
                row.t[kind].append(bench_over_nbd(srv, args))
            finally:
                srv.stop()
    return row


def filled_images(size):
    """One qcow2 image (shared by both qcow2 servers, in turn) and one raw
    file, every byte written."""
    q = path("read.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", q, str(size)])
    r = path("read.raw")
    with open(r, "wb") as f:
        f.truncate(size)
    for img, fmt in ((q, "qcow2"), (r, "raw")):
        run(["qemu-img", "bench", "-q", "-w", "-t", "unsafe", "-c", str(size >> 20),
             "-s", "1M", "-S", "1M", "--pattern=0x5a", "-f", fmt, img])
    os.sync()  # no writeback of the fill inside a timed run
    return {"qemu": q, "oxqcow": q, "raw": r, "file": r}


def rows():
    os.makedirs(DIR, exist_ok=True)
    n_wt = 500 if SMALL else 4000
    seq = 1024 if SMALL else 16384          # x 64 KiB = 1 GiB
    n_rd = 2000 if SMALL else 20000
    read_size = (64 << 20) if SMALL else GiB
    out = []
    wt = ["-w", "-t", "writethrough", "-c", str(n_wt), "-s", "64k", "-S", "64k"]
    out.append(write_workload("N1 wt (FUA) alloc 64k, lazy on", wt + ["-d", "1"]))
    out.append(write_workload("N1 wt (FUA) alloc 64k, lazy off", wt + ["-d", "1"],
                              opts="lazy_refcounts=off"))
    wb = ["-w", "-t", "writeback", "-c", str(seq), "-s", "64k", "-S", "64k", "-d", "1"]
    out.append(write_workload("N2 wb seq write 1G", wb))
    images = filled_images(read_size)
    out.append(read_workload("N3 seq read 1G", ["-c", str(seq), "-s", "64k", "-S", "64k", "-d", "1"],
                             images))
    step = read_size // n_rd // 4096 * 4096
    rr = ["-c", str(n_rd), "-s", "4k", "-S", str(step)]
    out.append(read_workload("N4 4k reads, stride over 1G", rr + ["-d", "1"], images))
    out.append(write_workload("N5 wt (FUA) alloc 64k, depth 16", wt + ["-d", "16"]))
    out.append(read_workload("N5 4k reads, depth 16", rr + ["-d", "16"], images))
    for p in set(images.values()):
        os.remove(p)
    return out


def report(rs):
    print()
    print("NBD: qemu-img bench -f raw over a Unix socket; qemu-nbd -f qcow2 vs nbdkit + oxqcow plugin")
    print(f"{'workload':36} {'qemu-nbd':>9} {'nbdkit+ox':>9} {'raw':>7} {'file':>7}"
          f" {'ox/QEMU':>8} {'QEMU/raw':>9} {'ox/file':>8}")
    f = lambda x, w=9: f"{x:{w}.3f}" if x is not None else f"{'-':>{w}}"
    ratio = lambda a, b, w=8: f"{a / b:{w}.2f}" if a and b else f"{'-':>{w}}"
    for r in rs:
        q, o, w, k = (r.med(s) for s in SERVERS)
        print(f"{r.name:36} {f(q)} {f(o)} {f(w, 7)} {f(k, 7)} {ratio(o, q)} {ratio(q, w, 9)} {ratio(o, k)}")
    print(f"\nseconds, medians of {REPS} runs, alternating servers; raw = qemu-nbd -f raw and"
          " file = nbdkit file plugin, on a raw file;\nevery server stopped with SIGTERM (exit 0),"
          " every qcow2 image clean in qemu-img check after each run")


def main():
    if not os.path.exists(PLUGIN):
        sys.exit(f"{PLUGIN} is missing: make nbdkit-plugin")
    for prog in ("nbdkit", "qemu-nbd"):
        if subprocess.run(["which", prog], capture_output=True).returncode != 0:
            sys.exit(f"{prog} is not installed")
    report(rows())


if __name__ == "__main__":
    main()
