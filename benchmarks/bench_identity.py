"""What does the checkpoint identity check cost per expert read?

Pinned shards (``FileHandles(identities=...)``) are checked after every read: an ``fstat``
of the held handle, and at most every ``check_interval_s`` a ``stat`` of the path. The check
runs only where bytes are read (a miss or a prefetch, on the reading thread), never on a
layer whose experts are resident. This measures it three ways, against unpinned handles
(the baseline) in the same run, alternating, medians of --runs:

  - host work alone: the same 9-range expert read with a ``preadv`` that returns at once
    (so the figure is planning + the check, not the copy);
  - real reads of a 9-range expert from the page cache (a file built under --dir);
  - the worst case, a path ``stat`` at every read (``check_interval_s=0``).

    python benchmarks/bench_identity.py          # a few seconds; last line is JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from golem.io.ranges import ByteRange
from golem.io.file_handles import FileHandles, FileIdentity
from golem.io.positioned_reads import read_ranges

EXPERTS, PARTS = 32, 9


def build(folder: str, part_nbytes: int) -> str:
    path = os.path.join(folder, "experts.safetensors")
    want = EXPERTS * PARTS * part_nbytes
    if not os.path.exists(path) or os.path.getsize(path) != want:
        rng = np.random.default_rng(0)
        with open(path + ".tmp", "wb") as f:
            f.write(rng.integers(0, 256, want, dtype=np.uint8).tobytes())
        os.replace(path + ".tmp", path)
    return path


def ranges(path: str, part_nbytes: int, expert: int):
    tensor = EXPERTS * part_nbytes
    return [ByteRange(path, p * tensor + expert * part_nbytes, part_nbytes, p * part_nbytes, p)
            for p in range(PARTS)]


def per_read_us(handles: FileHandles, path: str, part_nbytes: int, reads: int) -> float:
    out = np.empty(PARTS * part_nbytes, np.uint8)
    plans = [ranges(path, part_nbytes, e % EXPERTS) for e in range(reads)]
    t0 = time.perf_counter()
    for rs in plans:
        read_ranges(rs, out, handles=handles)
    return 1e6 * (time.perf_counter() - t0) / reads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "golem-bench-identity"))
    ap.add_argument("--part-kib", type=int, default=64, help="bytes of each of the 9 parts (KiB)")
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    part = args.part_kib << 10
    path = build(args.dir, part)
    ident = {path: FileIdentity.of(os.stat(path))}

    def no_copy(fd, bufs, offset):
        return sum(len(b) for b in bufs)

    setups = {
        "host: unpinned": dict(preadv=no_copy),
        "host: pinned": dict(preadv=no_copy, identities=ident),
        "host: pinned, stat every read": dict(preadv=no_copy, identities=ident, check_interval_s=0),
        "page cache: unpinned": {},
        "page cache: pinned": dict(identities=ident),
    }
    samples = {name: [] for name in setups}
    for _ in range(args.runs):
        for name, kw in setups.items():  # alternating: the machine's load hits every row alike
            with FileHandles(**kw) as h:
                per_read_us(h, path, part, 50)  # warm: open, page cache
                samples[name].append(per_read_us(h, path, part, args.reads))
    direct_us = []
    for _ in range(args.runs):  # the check alone, as a read calls it: fstat + a clock read
        with FileHandles(identities=ident) as h:
            fd = h.fd(path)
            t0 = time.perf_counter()
            for _ in range(args.reads * 10):
                h.check(path, fd)
            direct_us.append(1e6 * (time.perf_counter() - t0) / (args.reads * 10))
    med = {name: statistics.median(v) for name, v in samples.items()}
    expert_kib = PARTS * args.part_kib
    print(f"per expert read ({PARTS} ranges, {expert_kib} KiB), medians of {args.runs} runs x {args.reads} reads")
    print(f"{'setup':34s} {'us/read':>9s} {'vs unpinned':>12s}")
    for name, us in med.items():
        base = med["host: unpinned"] if name.startswith("host") else med["page cache: unpinned"]
        print(f"{name:34s} {us:9.2f} {us - base:+11.2f}")
    check_us = med["host: pinned"] - med["host: unpinned"]
    stat_us = med["host: pinned, stat every read"] - med["host: unpinned"]
    cache_pct = 100 * (med["page cache: pinned"] - med["page cache: unpinned"]) / med["page cache: unpinned"]
    alone_us = statistics.median(direct_us)
    print(f"\nFileHandles.check alone: {alone_us:.2f} us per call (one per file per read)")
    print(f"the check: {check_us:+.2f} us per read (fstat; a path stat at most every 0.25 s), "
          f"{stat_us:+.2f} us with a stat every read; {cache_pct:+.1f}% of a page-cache read of {expert_kib} KiB")
    print(json.dumps({"bench": "identity", "runs": args.runs, "reads": args.reads, "expert_kib": expert_kib,
                      "host_unpinned_us": round(med["host: unpinned"], 2), "host_pinned_us": round(med["host: pinned"], 2),
                      "host_stat_every_read_us": round(med["host: pinned, stat every read"], 2),
                      "check_us": round(check_us, 2), "check_alone_us": round(alone_us, 3), "stat_every_read_us": round(stat_us, 2),
                      "cache_unpinned_us": round(med["page cache: unpinned"], 2),
                      "cache_pinned_us": round(med["page cache: pinned"], 2),
                      "cache_overhead_pct": round(cache_pct, 2)}))


if __name__ == "__main__":
    main()
