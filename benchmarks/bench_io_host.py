"""How many host microseconds does the I/O scheduler spend per expert read, beside the read?

Reads experts laid out like an mlx-lm checkpoint (stacked gate/up/down x weight/scales/
biases: 9 ranges per expert, far apart in the file) through a ``preadv`` that does nothing
and returns at once, so every microsecond measured is host work around the read: planning,
queueing, thread hand-offs, bookkeeping. Rows: demand reads one at a time (the miss path:
wall time from submit to result, and CPU time of all threads), a batch of prefetches
(submit, poll, release), and the baseline of a plain synchronous ``read_ranges`` of the
same ranges on the calling thread. Medians of --runs.

    python benchmarks/bench_io_host.py          # a few seconds; last line is JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from golem.io.ranges import ByteRange
from golem.io.reads import FileHandles, aligned_empty, read_ranges
from golem.io.scheduler import IOScheduler

LAYERS, EXPERTS, PARTS = 4, 64, 9
PATH = "/golem-bench/experts.safetensors"  # never opened: the opener below returns /dev/null


class Layout:
    """Expert ``(layer, e)``: part p is ``part_nbytes`` at slice e of stacked tensor p."""

    def __init__(self, expert_nbytes: int):
        self.part_nbytes = expert_nbytes // PARTS
        self.nbytes = self.part_nbytes * PARTS
        self.tensor_nbytes = EXPERTS * self.part_nbytes

    def locate(self, key):
        layer, expert = key
        base = layer * PARTS * self.tensor_nbytes
        return [ByteRange(PATH, base + p * self.tensor_nbytes + expert * self.part_nbytes,
                          self.part_nbytes, p * self.part_nbytes, p) for p in range(PARTS)]

    def nbytes_of(self, key) -> int:
        return self.nbytes


def no_read(fd, buffers, offset) -> int:
    return sum(len(b) for b in buffers)


def handles() -> FileHandles:
    return FileHandles(opener=lambda path, flags: os.open(os.devnull, os.O_RDONLY),
                       preadv=no_read)


def keys(count: int, seed: int):
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(LAYERS)), int(rng.integers(EXPERTS))) for _ in range(count)]


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_plain(layout: Layout, picks):
    out = aligned_empty(layout.nbytes)
    with handles() as h:
        def go():
            for key in picks:
                read_ranges(layout.locate(key), out, handles=h, what=str(key))
        return timed(go)


def run_demand(layout: Layout, picks, parallelism: int):
    with handles() as h, IOScheduler(layout.locate, layout.nbytes_of,
                                     buffer_nbytes=layout.nbytes, num_buffers=8,
                                     parallelism=parallelism, handles=h) as s:
        for key in picks[:8]:  # warm-up: threads started, code paths run once
            s.release(s.submit(key, depth=0).result())

        def go():
            for key in picks:
                s.release(s.submit(key, depth=0).result())
        return timed(go)


def run_prefetch(layout: Layout, picks, parallelism: int, batch: int = 8):
    with handles() as h, IOScheduler(layout.locate, layout.nbytes_of,
                                     buffer_nbytes=layout.nbytes, num_buffers=2 * batch + 2,
                                     parallelism=parallelism, handles=h,
                                     max_pending=len(picks)) as s:
        def go():
            for start in range(0, len(picks), batch):
                group = list(dict.fromkeys(picks[start:start + batch]))
                for i, key in enumerate(group):
                    s.submit(key, depth=1, score=-i)
                done = 0
                while done < len(group):
                    for _, buf in s.poll(timeout=None):
                        s.release(buf)
                        done += 1
        return timed(go)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="Runs per row (median).")
    p.add_argument("--reads", type=int, default=400, help="Expert reads per run.")
    p.add_argument("--expert-mib", type=float, default=2.0, help="Expert size in MiB.")
    p.add_argument("--parallelism", type=int, default=16, help="Scheduler parallelism.")
    return p


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    if args.runs < 1 or args.reads < 1 or args.expert_mib <= 0:
        sys.exit("bench_io_host: --runs and --reads must be >= 1, --expert-mib > 0")
    layout = Layout(int(args.expert_mib * 2**20))
    rows = {"plain read_ranges": [], "scheduler demand": [], "scheduler prefetch x8": []}
    for run in range(args.runs):
        picks = keys(args.reads, seed=run)
        rows["plain read_ranges"].append(run_plain(layout, picks))
        rows["scheduler demand"].append(run_demand(layout, picks, args.parallelism))
        rows["scheduler prefetch x8"].append(run_prefetch(layout, picks, args.parallelism))
    print(f"{layout.nbytes / 2**20:.2f} MiB experts of {PARTS} ranges, preadv returns at once, "
          f"parallelism {args.parallelism}, {args.reads} reads x {args.runs} runs, medians, "
          f"{os.cpu_count()} CPUs")
    print(f"{'row':<24} {'wall us/read':>13} {'cpu us/read':>12}")
    summary = {}
    for name, samples in rows.items():
        wall = statistics.median(w for w, _ in samples) / args.reads * 1e6
        cpu = statistics.median(c for _, c in samples) / args.reads * 1e6
        summary[name] = {"wall_us_per_read": round(wall, 1), "cpu_us_per_read": round(cpu, 1)}
        print(f"{name:<24} {wall:>13.1f} {cpu:>12.1f}")
    base = summary["plain read_ranges"]["cpu_us_per_read"]
    demand = summary["scheduler demand"]
    print(f"scheduler demand over plain: {demand['cpu_us_per_read'] - base:.1f} CPU us per read")
    print(json.dumps({"expert_nbytes": layout.nbytes, "ranges_per_expert": PARTS,
                      "parallelism": args.parallelism, "runs": args.runs, "reads": args.reads,
                      "rows": summary,
                      "demand_wall_us_per_read": demand["wall_us_per_read"],
                      "demand_cpu_us_per_read": demand["cpu_us_per_read"],
                      "demand_cpu_us_over_plain": round(demand["cpu_us_per_read"] - base, 1)}))


if __name__ == "__main__":
    main()
