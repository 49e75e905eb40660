"""How many host microseconds does the I/O scheduler spend per expert read, beside the read?

Reads experts laid out like an mlx-lm checkpoint (stacked gate/up/down x weight/scales/
biases: 9 ranges per expert, far apart in the file) through a ``preadv`` that does nothing
and returns at once, so every microsecond measured is host work around the read: planning,
queueing, thread hand-offs, bookkeeping. Rows: demand reads one at a time (the miss path:
wall time from submit to result, and CPU time of all threads), a batch of prefetches
(submit, poll, release), and the baseline of a plain synchronous ``read_ranges`` of the
same ranges on the calling thread. Voluntary context switches per read count the thread
hand-offs, a figure that, unlike time, does not move with the load of a shared machine.

Then real reads of a 256 MiB file (built once under --dir), O_DIRECT and from the page cache,
one miss at a time and eight at once (a layer's misses): the stacked layout with each
expert's pieces spread over readers (``min_job_nbytes`` 256 KiB) against one reader per
expert; experts packed into one range each (``golem-pack``); and experts whose 9 ranges lie
4 KiB or 64 KiB apart, read as 9 ``preadv`` against one span read (``max_gap_nbytes``).
Medians of --runs. The no-op rows have "scheduler demand, packed" too: the same demand reads
of experts packed into one range each.

The row "loop-scheduled demand" (with no-op reads, and again on page-cache reads of 36 KiB
experts) is the other shape a scheduler could have: each request a task on an asyncio loop
that awaits its read in an executor thread (``LoopShape``, the least such a scheduler does).
"scheduler demand, 1 reader" is the scheduler with each expert on one reader too
(``min_job_nbytes`` past the expert), the fair comparison: both do the same reads and differ
in the thread hand-offs around them.

    python benchmarks/bench_io_host.py          # under a minute; last line is JSON
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from golem.io.ranges import ByteRange
from golem.io.file_handles import FileHandles, aligned_empty
from golem.io.positioned_reads import read_ranges
from golem.io.scheduler import IOScheduler, SchedulerSettings

LAYERS, EXPERTS, PARTS = 4, 64, 9
PACKED = "packed"  # FileLayout's gap for experts of one range each (golem-pack)
PATH = "/golem-bench/experts.safetensors"  # never opened: the opener below returns /dev/null


class Layout:
    """Expert ``(layer, e)``: part p is ``part_nbytes`` at slice e of stacked tensor p; or,
    ``packed`` (``golem-pack``), the expert's parts one range at slice e of its layer."""

    def __init__(self, expert_nbytes: int, packed: bool = False):
        self.part_nbytes = expert_nbytes // PARTS
        self.nbytes = self.part_nbytes * PARTS
        self.tensor_nbytes = EXPERTS * self.part_nbytes
        self.packed = packed

    def locate(self, key):
        layer, expert = key
        base = layer * PARTS * self.tensor_nbytes
        if self.packed:
            return [ByteRange(PATH, base + expert * self.nbytes, self.nbytes, 0, 0)]
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
    """(wall s, CPU s of every thread, voluntary context switches: thread hand-offs)."""
    switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall, time.process_time() - cpu,
            resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - switches)


def run_plain(layout, picks, make_handles=handles):
    out = aligned_empty(layout.nbytes)
    with make_handles() as h:
        def go():
            for key in picks:
                read_ranges(layout.locate(key), out, handles=h, what=str(key))
        return timed(go)


def make_scheduler(layout, handles: FileHandles, **settings) -> IOScheduler:
    return IOScheduler(layout.locate, layout.nbytes_of,
                       SchedulerSettings(buffer_nbytes=layout.nbytes, **settings), handles=handles)


def run_demand(layout, picks, parallelism: int, make_handles=handles, **settings):
    """Demand reads one at a time through the scheduler: submit -> result -> release."""
    with make_handles() as h, make_scheduler(layout, h, num_buffers=8, parallelism=parallelism,
                                             **settings) as s:
        for key in picks[:8]:  # warm-up: threads started, code paths run once
            s.release(s.submit(key, depth=0).result())

        def go():
            for key in picks:
                s.release(s.submit(key, depth=0).result())
        return timed(go)


def run_prefetch(layout: Layout, picks, parallelism: int, batch: int = 8):
    with handles() as h, make_scheduler(layout, h, num_buffers=2 * batch + 2,
                                        parallelism=parallelism, max_pending=len(picks)) as s:
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


class LoopShape:
    """The least a scheduler whose event loop makes every decision would do per request: a
    task on the loop (uvloop when installed) that awaits the read in an executor thread.
    No queue, no priorities, no locks: a lower bound on that shape's host cost.

    Args:
        layout: where each key's ranges are.
        handles: open files (and the ``preadv`` patch point).
        threads: executor threads.
    """

    def __init__(self, layout, handles: FileHandles, threads: int):
        self.layout, self.handles = layout, handles
        try:
            import uvloop
            self.loop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.out = aligned_empty(layout.nbytes)

    async def _read(self, key):
        read = functools.partial(read_ranges, self.layout.locate(key), self.out,
                                 handles=self.handles, what=str(key))
        await self.loop.run_in_executor(self.pool, read)
        return self.out

    def submit(self, key) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self._read(key), self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()
        self.pool.shutdown()


def run_loop_shape(layout, picks, parallelism: int, make_handles=handles):
    """Demand reads one at a time through ``LoopShape``: submit -> result."""
    with make_handles() as h:
        shape = LoopShape(layout, h, parallelism)
        try:
            for key in picks[:8]:
                shape.submit(key).result()
            return timed(lambda: [shape.submit(key).result() for key in picks])
        finally:
            shape.close()


FILE_NBYTES = 256 << 20


def build_file(folder: Path) -> Path:
    path = folder / "experts-256MiB.bin"
    if path.exists() and path.stat().st_size == FILE_NBYTES:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    rng = np.random.default_rng(0)
    with open(tmp, "wb") as f:
        for _ in range(FILE_NBYTES // (32 << 20)):
            f.write(rng.bytes(32 << 20))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class FileLayout:
    """Experts of 9 ranges in a real file: ``gap_nbytes`` None = stacked (far apart, like
    mlx-lm's switch_mlp tensors), ``PACKED`` = one range each (``golem-pack``), else
    expert-major with that many bytes between ranges."""

    def __init__(self, path: Path, expert_nbytes: int, gap_nbytes=None):
        self.path = str(path)
        self.part_nbytes = expert_nbytes // PARTS // 4096 * 4096
        self.nbytes = self.part_nbytes * PARTS
        self.gap = gap_nbytes
        stride = PARTS * (self.part_nbytes + (gap_nbytes if gap_nbytes not in (None, PACKED) else 0))
        self.num_experts = FILE_NBYTES // (stride if gap_nbytes is not None else self.nbytes)

    def locate(self, key):
        e = key[1]
        if self.gap == PACKED:
            return [ByteRange(self.path, e * self.nbytes, self.nbytes, 0, 0)]
        if self.gap is None:
            tensor = self.num_experts * self.part_nbytes
            return [ByteRange(self.path, p * tensor + e * self.part_nbytes, self.part_nbytes,
                              p * self.part_nbytes, p) for p in range(PARTS)]
        base = e * PARTS * (self.part_nbytes + self.gap)
        return [ByteRange(self.path, base + p * (self.part_nbytes + self.gap), self.part_nbytes,
                          p * self.part_nbytes, p) for p in range(PARTS)]

    def nbytes_of(self, key) -> int:
        return self.nbytes


def run_real(layout: FileLayout, direct: bool, at_once: int, seed: int, **options) -> tuple:
    """(ms per miss, CPU ms per miss): groups of ``at_once`` demand reads, each group waited
    for before the next, like a layer's misses."""
    from golem.io.futures import wait_result

    rng = np.random.default_rng(seed)
    picks = [(0, int(e)) for e in rng.permutation(layout.num_experts)][:32 // at_once * at_once]
    with FileHandles() as h, make_scheduler(layout, h, num_buffers=at_once + 2, direct=direct,
                                            **options) as s:
        def go():
            for start in range(0, len(picks), at_once):
                futures = [s.submit(key, depth=0) for key in picks[start:start + at_once]]
                for future in futures:
                    s.release(wait_result(future))
        wall, cpu, _ = timed(go)
    return wall / len(picks) * 1e3, cpu / len(picks) * 1e3


REAL_ROWS = {  # name -> (gap_nbytes, scheduler options)
    "stacked, pieces spread": (None, {"min_job_nbytes": 256 << 10}),
    "packed (golem-pack)": (PACKED, {}),
    "stacked, one reader/expert": (None, {"min_job_nbytes": 64 << 20}),
    "gaps 4K, 9 preadv": (4096, {"max_gap_nbytes": 0}),
    "gaps 4K, one span": (4096, {"max_gap_nbytes": 4096}),
    "gaps 64K, 9 preadv": (65536, {"max_gap_nbytes": 0}),
    "gaps 64K, one span": (65536, {"max_gap_nbytes": 65536}),
}


def real_reads(folder: Path, expert_nbytes: int, runs: int) -> dict:
    path = build_file(folder)
    out = {}
    for direct in (True, False):
        if not direct:
            with open(path, "rb") as f:  # into the page cache
                while f.read(64 << 20):
                    pass
        for at_once in (1, 8):
            samples = {name: [] for name in REAL_ROWS}
            for run in range(runs):
                for name, (gap, options) in REAL_ROWS.items():  # interleaved: they share drift
                    layout = FileLayout(path, expert_nbytes, gap)
                    samples[name].append(run_real(layout, direct, at_once, seed=run, **options))
            for name, values in samples.items():
                out[(direct, at_once, name)] = (statistics.median(v[0] for v in values),
                                                statistics.median(v[1] for v in values))
    return out


SMALL_EXPERT_NBYTES = PARTS * 4096
ONE_READER = 64 << 20  # min_job_nbytes: each expert read by one reader, as LoopShape does


def page_cache_requests(folder: Path, runs: int, reads: int, parallelism: int) -> dict:
    """Host cost per request on page-cache reads of small experts (9 ranges of 4 KiB,
    stacked): demand reads one at a time, submit -> result, plain reads as the baseline."""
    path = build_file(folder)
    with open(path, "rb") as f:  # into the page cache
        while f.read(64 << 20):
            pass
    layout = FileLayout(path, SMALL_EXPERT_NBYTES)
    rows = {"plain read_ranges": [], "scheduler demand": [], "scheduler demand, 1 reader": [],
            "loop-scheduled demand": []}
    for run in range(runs):
        rng = np.random.default_rng(run)
        picks = [(0, int(e)) for e in rng.integers(layout.num_experts, size=reads)]
        rows["plain read_ranges"].append(run_plain(layout, picks, FileHandles))
        rows["scheduler demand"].append(run_demand(layout, picks, parallelism, FileHandles))
        rows["scheduler demand, 1 reader"].append(
            run_demand(layout, picks, parallelism, FileHandles, min_job_nbytes=ONE_READER))
        rows["loop-scheduled demand"].append(run_loop_shape(layout, picks, parallelism,
                                                            FileHandles))
    return rows


def summarise(rows: dict, reads: int) -> dict:
    """Print the medians of each row (per read) and return them."""
    print(f"{'row':<28} {'wall us/read':>13} {'cpu us/read':>12} {'switches/read':>14}")
    summary = {}
    for name, samples in rows.items():
        wall = statistics.median(w for w, _, _ in samples) / reads * 1e6
        cpu = statistics.median(c for _, c, _ in samples) / reads * 1e6
        switches = statistics.median(n for _, _, n in samples) / reads
        summary[name] = {"wall_us_per_read": round(wall, 1), "cpu_us_per_read": round(cpu, 1),
                         "switches_per_read": round(switches, 2)}
        print(f"{name:<28} {wall:>13.1f} {cpu:>12.1f} {switches:>14.2f}")
    return summary


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="Runs per row (median).")
    p.add_argument("--reads", type=int, default=400, help="Expert reads per run.")
    p.add_argument("--expert-mib", type=float, default=2.0, help="Expert size in MiB.")
    p.add_argument("--parallelism", type=int, default=16, help="Scheduler parallelism.")
    p.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "golem" / "bench_io_host",
                   help="Folder for the 256 MiB file of the real-read rows (reused).")
    p.add_argument("--no-real", action="store_true", help="Skip the real-read rows.")
    return p


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    if args.runs < 1 or args.reads < 1 or args.expert_mib <= 0:
        sys.exit("bench_io_host: --runs and --reads must be >= 1, --expert-mib > 0")
    layout = Layout(int(args.expert_mib * 2**20))
    rows = {"plain read_ranges": [], "scheduler demand": [], "scheduler demand, 1 reader": [],
            "loop-scheduled demand": [], "scheduler prefetch x8": [], "scheduler demand, packed": []}
    packed = Layout(layout.nbytes, packed=True)
    for run in range(args.runs):  # interleaved: the rows share the machine's drift
        picks = keys(args.reads, seed=run)
        rows["plain read_ranges"].append(run_plain(layout, picks))
        rows["scheduler demand"].append(run_demand(layout, picks, args.parallelism))
        rows["scheduler demand, packed"].append(run_demand(packed, picks, args.parallelism))
        rows["scheduler demand, 1 reader"].append(run_demand(layout, picks, args.parallelism,
                                                             min_job_nbytes=ONE_READER))
        rows["loop-scheduled demand"].append(run_loop_shape(layout, picks, args.parallelism))
        rows["scheduler prefetch x8"].append(run_prefetch(layout, picks, args.parallelism))
    print(f"{layout.nbytes / 2**20:.2f} MiB experts of {PARTS} ranges, preadv returns at once, "
          f"parallelism {args.parallelism}, {args.reads} reads x {args.runs} runs, medians, "
          f"{os.cpu_count()} CPUs")
    summary = summarise(rows, args.reads)
    base = summary["plain read_ranges"]["cpu_us_per_read"]
    demand = summary["scheduler demand"]
    print(f"scheduler demand over plain: {demand['cpu_us_per_read'] - base:.1f} CPU us per read")
    cached = {}
    if not args.no_real:
        print(f"\npage-cache reads, {SMALL_EXPERT_NBYTES // 1024} KiB experts of {PARTS} ranges, "
              f"one demand at a time, submit -> result, medians")
        cached = summarise(page_cache_requests(args.dir, args.runs, args.reads,
                                               args.parallelism), args.reads)
    real = {}
    if not args.no_real:
        found = real_reads(args.dir, layout.nbytes, args.runs)
        print(f"\nreal reads, {FileLayout(Path('x'), layout.nbytes).nbytes / 2**20:.2f} MiB "
              f"experts of {PARTS} ranges, scheduler defaults otherwise, medians")
        print(f"{'row':<28} {'mode':>10} {'misses':>7} {'ms/miss':>9} {'cpu ms/miss':>12}")
        for (direct, at_once, name), (ms, cpu_ms) in found.items():
            mode = "o_direct" if direct else "cached"
            print(f"{name:<28} {mode:>10} {at_once:>7} {ms:>9.3f} {cpu_ms:>12.3f}")
            real[f"{name} | {mode} | {at_once}"] = {"ms_per_miss": round(ms, 4),
                                                    "cpu_ms_per_miss": round(cpu_ms, 4)}
    print(json.dumps({"expert_nbytes": layout.nbytes, "ranges_per_expert": PARTS,
                      "parallelism": args.parallelism, "runs": args.runs, "reads": args.reads,
                      "rows": summary, "page_cache": cached, "real": real,
                      "demand_wall_us_per_read": demand["wall_us_per_read"],
                      "demand_cpu_us_per_read": demand["cpu_us_per_read"],
                      "demand_cpu_us_over_plain": round(demand["cpu_us_per_read"] - base, 1),
                      "page_cache_demand_wall_us_per_read":
                          cached.get("scheduler demand", {}).get("wall_us_per_read")}))


if __name__ == "__main__":
    main()
