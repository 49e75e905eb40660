"""How fast does each slot writer put experts into a pool on this backend, and does it copy the pool?

For expert-sized buffers (1, 4 and 16 MB, laid out as a 4-bit quantized expert: three
projections of weight, scales and biases) and batches of 1 and 8 experts, each writer of
``golem.runtime.writers`` writes the batch into a pool of ``--slots`` slots, flushes and
evaluates it; the time from the first put to the evaluated pool is one run. Beside it, in the
same run, a plain host memcpy of the same bytes (numpy ``copyto``) is the baseline.

Columns: GB/s (median of --runs), that as a fraction of the memcpy, and "pool copied": whether
peak memory grew during the write by half a pool or more beyond the upload itself (the batch
and the parts cut from it; an MLX slice update that cannot update in place copies the whole
pool), with the active memory before and after. Then one JSON line.

    python benchmarks/bench_upload.py [--runs 7] [--sizes-mb 1 4 16] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from types import SimpleNamespace

import mlx.core as mx
import numpy as np

GROUP = 64
COLS = 1024


def make_pool(writer: str, expert_nbytes: int, slots: int, writers=None):
    """A SlotPool of ``slots`` experts of about ``expert_nbytes`` bytes (4-bit, group 64)."""
    from golem.io.index import StackedTensor
    from golem.runtime.slots import PoolPart, SlotPool
    from golem.runtime.writers import SlotWriters

    rows = max(1, round(expert_nbytes / (3 * COLS * (0.5 + 8 / GROUP))))
    parts, dest = [], 0
    for proj in ("gate_proj", "up_proj", "down_proj"):
        owner = SimpleNamespace()
        for attr, dtype, shape in (("weight", mx.uint32, (rows, COLS // 8)),
                                   ("scales", mx.float32, (rows, COLS // GROUP)),
                                   ("biases", mx.float32, (rows, COLS // GROUP))):
            setattr(owner, attr, mx.zeros((slots, *shape), dtype=dtype))
            nbytes = int(np.prod(shape)) * 4
            parts.append(PoolPart(StackedTensor(f"{proj}.{attr}", None, shape, nbytes, dest), owner, attr))
            dest += nbytes
    pool = SlotPool(0, slots, slots, parts, writers=writers or SlotWriters(writer))
    return pool, dest


def time_writes(pool, bufs, first_slot: int):
    """Seconds from the first put to the evaluated pool; (seconds, peak growth, active before, after)."""
    gc.collect()
    mx.eval([getattr(p.owner, p.attr) for p in pool.parts])
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    t0 = time.perf_counter()
    for i, buf in enumerate(bufs):
        pool.write((first_slot + i) % pool.cache_size, buf)
    pool.flush()
    pool.settle()
    seconds = time.perf_counter() - t0
    return seconds, max(0, mx.get_peak_memory() - before), before, mx.get_active_memory()


def time_memcpy(bufs, out: np.ndarray) -> float:
    t0 = time.perf_counter()
    for i, buf in enumerate(bufs):
        np.copyto(out[i], buf)
    return time.perf_counter() - t0


def measure(writer: str, size_mb: float, batch: int, slots: int, runs: int) -> dict:
    pool, nbytes = make_pool(writer, int(size_mb * 1e6), slots)
    pool_nbytes = pool.nbytes
    rng = np.random.default_rng(0)
    bufs = [rng.integers(0, 256, nbytes, dtype=np.uint8) for _ in range(batch)]
    host = np.empty((batch, nbytes), dtype=np.uint8)
    time_writes(pool, bufs, 0)  # warm-up (allocations, first-use costs)
    time_memcpy(bufs, host)
    secs, copies, grows, befores, afters = [], [], [], [], []
    for r in range(runs):
        s, grown, before, after = time_writes(pool, bufs, (r * batch) % slots)
        secs.append(s)
        grows.append(grown)
        befores.append(before)
        afters.append(after)
        copies.append(time_memcpy(bufs, host))
    last = (runs - 1) * batch % slots
    got = b"".join(np.array(getattr(p.owner, p.attr)[last]).tobytes() for p in pool.parts)
    if got != bufs[0].tobytes():
        raise SystemExit(f"bench_upload: writer {writer} wrote wrong bytes")
    total = batch * nbytes
    upload_nbytes = 2 * total  # the uploaded batch, and its parts cut out of it
    med, med_copy = statistics.median(secs), statistics.median(copies)
    return {
        "writer": pool.writer.name, "expert_mb": nbytes / 1e6, "batch": batch,
        "gb_per_s": total / med / 1e9, "memcpy_gb_per_s": total / med_copy / 1e9,
        "us_per_expert": 1e6 * med / batch,
        "pool_copied": max(grows) >= upload_nbytes + pool_nbytes / 2, "peak_growth_mb": max(grows) / 1e6,
        "active_before_mb": statistics.median(befores) / 1e6, "active_after_mb": statistics.median(afters) / 1e6,
        "pool_mb": pool_nbytes / 1e6,
    }


def main() -> None:
    from golem.runtime.writers import WRITERS, default_writer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 4, 16])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--slots", type=int, default=32, help="slots of the pool written into")
    ap.add_argument("--writers", nargs="+", default=list(WRITERS), choices=WRITERS)
    args = ap.parse_args()
    if args.runs < 1 or args.slots < max(args.batches):
        raise SystemExit("bench_upload: need --runs >= 1 and --slots >= the largest batch")

    rows = [measure(w, mb, b, args.slots, args.runs)
            for mb in args.sizes_mb for b in args.batches for w in args.writers]
    device = mx.default_device()
    print(f"backend: {device}, mlx {mx.__version__}, default writer here: {default_writer()}; "
          f"pool of {args.slots} slots; median of {args.runs} runs")
    print(f"{'writer':<12} {'expert MB':>9} {'batch':>5} {'GB/s':>7} {'memcpy GB/s':>11} {'x memcpy':>8} "
          f"{'us/expert':>9} {'pool copied':>11} {'peak +MB':>8} {'active MB before/after':>22}")
    for r in rows:
        print(f"{r['writer']:<12} {r['expert_mb']:9.2f} {r['batch']:5d} {r['gb_per_s']:7.2f} "
              f"{r['memcpy_gb_per_s']:11.2f} {r['gb_per_s'] / r['memcpy_gb_per_s']:8.2f} {r['us_per_expert']:9.1f} "
              f"{'YES' if r['pool_copied'] else 'no':>11} {r['peak_growth_mb']:8.1f} "
              f"{r['active_before_mb']:10.1f} / {r['active_after_mb']:9.1f}")
    fastest = {}
    for r in rows:
        key = (round(r["expert_mb"], 2), r["batch"])
        if key not in fastest or r["gb_per_s"] > fastest[key]["gb_per_s"]:
            fastest[key] = r
    print("fastest per size and batch: " + ", ".join(f"{mb:g} MB x{b}: {r['writer']}" for (mb, b), r in fastest.items()))
    print(json.dumps({"backend": str(device), "mlx": mx.__version__, "default_writer": default_writer(),
                      "runs": args.runs, "slots": args.slots, "rows": rows,
                      "any_pool_copied": any(r["pool_copied"] for r in rows)}))


if __name__ == "__main__":
    sys.exit(main())
