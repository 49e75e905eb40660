"""How close does the I/O scheduler come to the disk's ceiling, and does prefetch delay a miss?

Builds (once, cached) a safetensors file of a few GB holding stacked, 4-bit-shaped expert
tensors (weight + scales + biases of gate/up/down: 9 ranges per expert), then reads the
same decode-like sets of experts (top-8 of each layer per step, in random order) with
golem's scheduler, with a plain sequential ``os.preadv`` loop, and measures a large
sequential read of the file (``dd`` and Python, the ceiling). Reads bypass the page cache
(O_DIRECT; ``--buffered`` evicts with posix_fadvise(DONTNEED) instead). Medians of --runs.
Also: scheduler parallelism sweep, aiofiles vs os.preadv (skipped, with a note, without the
``bench`` extra), demand latency idle vs loaded.

    python benchmarks/bench_io.py            # about two minutes; last line is JSON
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from golem.io.ranges import ByteRange
from golem.io.file_handles import FileHandles, aligned_empty
from golem.io.page_cache import evict_from_page_cache
from golem.io.positioned_reads import read_ranges
from golem.io.scheduler import DEFAULT_PARALLELISM, IOScheduler, SchedulerSettings
from golem.io.storage import parse_throttle

LAYERS, EXPERTS, TOP_K = 3, 64, 8
ROWS, WEIGHT_COLS, SCALE_COLS = 1024, 1152, 144  # weight U32 [E, 1024, 1152]: 4.5 MiB per expert
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PARTS = (("weight", "U32", WEIGHT_COLS), ("scales", "F32", SCALE_COLS), ("biases", "F32", SCALE_COLS))
SPLITS = (16, 4, 1)  # each stored expert read as 16, 4 or 1 experts: ~1, ~4 and ~17 MiB


def build_checkpoint(folder: Path) -> Path:
    """Write the stacked-expert safetensors file (about 3.2 GB) unless a valid one is there."""
    path = folder / f"experts-L{LAYERS}-E{EXPERTS}.safetensors"
    header, offset = {}, 0
    for layer in range(LAYERS):
        for proj in PROJECTIONS:
            for part, dtype, cols in PARTS:
                nbytes = EXPERTS * ROWS * cols * 4
                name = f"model.layers.{layer}.mlp.switch_mlp.{proj}.{part}"
                header[name] = {"dtype": dtype, "shape": [EXPERTS, ROWS, cols],
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)
    total = 8 + len(blob) + offset
    if path.exists() and path.stat().st_size == total:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < total + (1 << 30):
        sys.exit(f"bench_io: {folder} has {free / 1e9:.1f} GB free; the file needs {total / 1e9:.1f} GB")
    print(f"building {path} ({total / 1e9:.2f} GB) ...", flush=True)
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        left = offset
        while left:
            n = min(left, 64 << 20)
            f.write(rng.bytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_index(path: Path):
    """(tensor name -> (file begin, file end)) from the safetensors header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    base = 8 + n
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


class Experts:
    """Experts of one size class: stored expert e split into ``split`` virtual experts."""

    def __init__(self, path: Path, tensors, split: int):
        self.path, self.split = str(path), split
        self.num_experts = EXPERTS * split
        self.parts = {layer: [tensors[f"model.layers.{layer}.mlp.switch_mlp.{proj}.{part}"]
                              for proj in PROJECTIONS for part, _, _ in PARTS]
                      for layer in range(LAYERS)}
        self.nbytes = sum((end - begin) // self.num_experts for begin, end in self.parts[0])

    def locate(self, key):
        layer, expert = key
        out, dest = [], 0
        for i, (begin, end) in enumerate(self.parts[layer]):
            per = (end - begin) // self.num_experts
            out.append(ByteRange(self.path, begin + expert * per, per, dest, i))
            dest += per
        return out

    def nbytes_of(self, key) -> int:
        return self.nbytes

    def workload(self, target_nbytes: int, seed: int):
        """Decode-like keys: per step, per layer, top-8 distinct experts in random order."""
        rng = np.random.default_rng(seed)
        keys, seen = [], set()
        while len(keys) * self.nbytes < target_nbytes:
            for layer in range(LAYERS):
                for e in rng.choice(self.num_experts, TOP_K, replace=False):
                    if (layer, int(e)) not in seen:  # one read per key per run, like a cache would
                        seen.add((layer, int(e)))
                        keys.append((layer, int(e)))
        return keys


def evict(path) -> None:
    evict_from_page_cache(str(path))


def run_plain(experts: Experts, keys, direct, handles) -> float:
    buf = aligned_empty(experts.nbytes)
    t0 = time.perf_counter()
    for key in keys:
        read_ranges(experts.locate(key), buf, handles=handles, direct=direct, what=str(key))
    return len(keys) * experts.nbytes / (time.perf_counter() - t0) / 1e9


def run_scheduler(experts: Experts, keys, direct, handles, parallelism, num_buffers=16) -> float:
    window = 2 * num_buffers
    with IOScheduler(experts.locate, experts.nbytes_of,
                     SchedulerSettings(buffer_nbytes=experts.nbytes, num_buffers=num_buffers,
                                       parallelism=parallelism, direct=direct),
                     handles=handles) as s:
        t0 = time.perf_counter()
        submitted = done = 0
        while done < len(keys):
            while submitted < len(keys) and submitted - done < window:
                s.submit(keys[submitted], depth=1, score=-submitted)
                submitted += 1
            for _, buf in s.poll(timeout=None):
                s.release(buf)
                done += 1
        elapsed = time.perf_counter() - t0
    return len(keys) * experts.nbytes / elapsed / 1e9


def run_sequential(path: Path, nbytes: int, direct: bool, handles: FileHandles,
                   streams: int = 1) -> float:
    """Read ``nbytes`` from the start of the experts in 16 MiB pieces, ``streams`` at a time."""
    chunk = 16 << 20
    start = read_index(path)["model.layers.0.mlp.switch_mlp.gate_proj.weight"][0]
    offsets = list(range(0, nbytes // chunk * chunk, chunk))

    def stream(i):
        buf = aligned_empty(chunk)
        for offset in offsets[i::streams]:
            read_ranges([ByteRange(str(path), start + offset, chunk, 0, "sequential")], buf,
                        handles=handles, direct=direct)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(stream, range(streams)))
    return len(offsets) * chunk / (time.perf_counter() - t0) / 1e9


def cpu_s(since) -> float:
    now = os.times()
    return (now.user - since.user) + (now.system - since.system)


def run_dd(path: Path, nbytes: int, direct: bool):
    if not shutil.which("dd"):
        return None
    count = nbytes // (16 << 20)
    cmd = ["dd", f"if={path}", "of=/dev/null", "bs=16M", f"count={count}"]
    if direct:
        cmd.append("iflag=direct")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True)
    if done.returncode != 0:
        return None
    return count * (16 << 20) / (time.perf_counter() - t0) / 1e9


def run_aiofiles(experts: Experts, keys, parallelism: int) -> float:
    """aiofiles: a file object per task, seek + readinto per range (buffered, evicted)."""
    import aiofiles

    async def main():
        queue = list(reversed(keys))

        async def worker():
            buf = bytearray(experts.nbytes)
            view = memoryview(buf)
            async with aiofiles.open(experts.path, "rb", buffering=0) as f:
                while queue:
                    for r in experts.locate(queue.pop()):
                        await f.seek(r.offset)
                        got = 0
                        while got < r.nbytes:
                            got += await f.readinto(view[r.dest + got:r.dest + r.nbytes])

        await asyncio.gather(*(worker() for _ in range(parallelism)))

    t0 = time.perf_counter()
    asyncio.run(main())
    return len(keys) * experts.nbytes / (time.perf_counter() - t0) / 1e9


AIOFILES_MISSING = 'aiofiles is not installed: pip install -e ".[bench]"'


def compare_aiofiles(experts: Experts, path, target_nbytes: int, parallelism: int, runs: int, handles):
    """aiofiles vs the scheduler's preadv readers on the same keys, buffered with the page cache
    evicted: medians of GB/s and CPU s per GB, printed and returned, or None (after a note) when
    aiofiles (the ``bench`` extra) is not installed."""
    try:
        import aiofiles  # noqa: F401
    except ImportError:
        print(f"\naiofiles vs preadv: skipped, {AIOFILES_MISSING}")
        return None
    aio, pre, aio_cpu, pre_cpu = [], [], [], []
    for run in range(max(2, runs // 2)):
        keys = experts.workload(target_nbytes, seed=2000 + run)
        gb = len(keys) * experts.nbytes / 1e9
        evict(path)
        t0 = os.times()
        aio.append(run_aiofiles(experts, keys, parallelism))
        aio_cpu.append(cpu_s(t0) / gb)
        evict(path)
        t0 = os.times()
        with handles() as h:
            pre.append(run_scheduler(experts, keys, False, h, parallelism))
        pre_cpu.append(cpu_s(t0) / gb)
    out = {"aiofiles_gb_per_s": statistics.median(aio), "preadv_executor_gb_per_s": statistics.median(pre),
           "aiofiles_cpu_s_per_gb": statistics.median(aio_cpu), "preadv_executor_cpu_s_per_gb": statistics.median(pre_cpu)}
    print(f"\naiofiles (seek+readinto, {parallelism} tasks) {out['aiofiles_gb_per_s']:.2f} GB/s,"
          f" {out['aiofiles_cpu_s_per_gb']:.2f} CPU s/GB vs the scheduler's preadv readers "
          f"{out['preadv_executor_gb_per_s']:.2f} GB/s, {out['preadv_executor_cpu_s_per_gb']:.2f} CPU s/GB"
          f" ({experts.nbytes / 2**20:.1f} MiB experts, buffered, cache evicted)")
    return {k: round(v, 3) for k, v in out.items()}


def verify(experts: Experts, direct: bool, parallelism: int, count: int = 32) -> None:
    """The oracle: the scheduler's buffers equal plain buffered reads of the same ranges."""
    keys = experts.workload(count * experts.nbytes, seed=99)[:count]
    want = aligned_empty(experts.nbytes)
    with FileHandles() as plain, FileHandles() as h, \
            IOScheduler(experts.locate, experts.nbytes_of,
                        SchedulerSettings(buffer_nbytes=experts.nbytes, parallelism=parallelism,
                                          direct=direct),
                        handles=h) as s:
        demand = s.submit(keys[0], depth=0).result()
        check(experts, keys[0], demand, want, plain)
        s.release(demand)
        for i, key in enumerate(keys[1:]):
            s.submit(key, depth=1 + i % 3, score=-i)
        done = 0
        while done < len(keys) - 1:
            for key, buf in s.poll(timeout=None):
                check(experts, key, buf, want, plain)
                s.release(buf)
                done += 1


def check(experts: Experts, key, got, want, handles) -> None:
    read_ranges(experts.locate(key), want, handles=handles)
    if not np.array_equal(got, want):
        sys.exit(f"bench_io: wrong bytes for expert {key} ({experts.nbytes} bytes)")


def demand_latency(experts: Experts, direct, handles, parallelism, samples, queued, seed):
    """Median seconds from submit to buffer of a demand read, with ``queued`` prefetches ahead."""
    rng = np.random.default_rng(seed)
    out = []
    with IOScheduler(experts.locate, experts.nbytes_of,
                     SchedulerSettings(buffer_nbytes=experts.nbytes, num_buffers=16,
                                       parallelism=parallelism, direct=direct,
                                       max_pending=max(256, queued)),
                     handles=handles) as s:
        for _ in range(samples):
            picks = rng.choice(LAYERS * experts.num_experts, queued + 1, replace=False)
            keys = [(int(p) // experts.num_experts, int(p) % experts.num_experts) for p in picks]
            for i, key in enumerate(keys[1:]):
                s.submit(key, depth=1 + i % 3, score=1.0 - i / len(keys))
            t0 = time.perf_counter()
            buf = s.submit(keys[0], depth=0).result()
            out.append(time.perf_counter() - t0)
            s.release(buf)
            for key in keys[1:]:
                s.cancel(key)
            while True:  # let reads already running finish before the next sample
                for _, b in s.poll(timeout=0.002):
                    s.release(b)
                st = s.statistics()
                if st.running == 0 and st.queued == 0 and st.published == 0:
                    break
    return statistics.median(out)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "golem" / "bench_io",
                   help="Folder for the generated checkpoint (reused across runs).")
    p.add_argument("--runs", type=int, default=5, help="Runs per measurement (median).")
    p.add_argument("--gb", type=float, default=1.0, help="GB read per run.")
    p.add_argument("--buffered", action="store_true",
                   help="Buffered reads with the page cache evicted, instead of O_DIRECT.")
    p.add_argument("--parallelism", type=int, default=None,
                   help="Scheduler parallelism (default: the best of the sweep).")
    p.add_argument("--throttle", default=None,
                   help="Emulate a slower device for every read, e.g. '1.5,100us'.")
    return p


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    if args.runs < 1 or args.gb <= 0:
        sys.exit("bench_io: --runs must be >= 1 and --gb > 0")
    try:
        throttle = parse_throttle(args.throttle) if args.throttle else None
    except ValueError as exc:
        sys.exit(f"bench_io: --throttle: {exc}")
    direct = not args.buffered
    path = build_checkpoint(args.dir)
    tensors = read_index(path)
    target = int(args.gb * 1e9)

    def handles():
        return FileHandles(throttle=throttle)

    with handles() as h:
        mode = h.mode(str(path), direct)
    cpus = os.cpu_count()
    print(f"file {path} ({path.stat().st_size / 1e9:.2f} GB), reads: {mode}"
          f"{', throttled ' + repr(throttle) if throttle else ''}, {cpus} CPUs, "
          f"{args.runs} runs of {args.gb} GB, medians")

    # The ceiling: large sequential reads of the same file (one stream, four streams, dd).
    seq, seq4, dd = [], [], []
    for run in range(max(2, args.runs // 2)):
        evict(path)
        with handles() as h:
            seq.append(run_sequential(path, target, direct, h))
        evict(path)
        with handles() as h:
            seq4.append(run_sequential(path, target, direct, h, streams=4))
        if throttle is None:
            evict(path)
            dd_gb = run_dd(path, target, direct)
            if dd_gb is not None:
                dd.append(dd_gb)
    seq_gb, seq4_gb = statistics.median(seq), statistics.median(seq4)
    dd_gb = statistics.median(dd) if dd else None
    fastest = max([("1 stream", seq_gb), ("4 streams", seq4_gb)]
                  + ([("dd", dd_gb)] if dd_gb else []), key=lambda item: item[1])[0]
    print(f"\nceiling: sequential 16 MiB reads, 1 stream {seq_gb:.2f} GB/s, 4 streams "
          f"{seq4_gb:.2f} GB/s{f', dd bs=16M {dd_gb:.2f} GB/s' if dd_gb else ''}"
          f" -> {fastest}, measured again beside every run below")

    def ceiling_run() -> float:
        if fastest == "dd":
            return run_dd(path, target, direct)
        with handles() as h:
            return run_sequential(path, target, direct, h, streams=4 if "4" in fastest else 1)

    # Parallelism sweep on the smallest (hardest) experts.
    mid = Experts(path, tensors, 4)
    small = Experts(path, tensors, SPLITS[0])
    sweep = {}
    candidates = [args.parallelism] if args.parallelism else [2, 4, 8, 16]
    for run in range(max(2, args.runs // 2) if len(candidates) > 1 else 0):
        keys = small.workload(target // 2, seed=1000 + run)
        for p in candidates:
            evict(path)
            with handles() as h:
                sweep.setdefault(p, []).append(run_scheduler(small, keys, direct, h, p))
    if sweep:
        print(f"\nscheduler parallelism sweep ({small.nbytes / 2**20:.2f} MiB experts): " +
              ", ".join(f"{p}: {statistics.median(v):.2f} GB/s" for p, v in sweep.items()))
    parallelism = args.parallelism or max(sweep, key=lambda p: statistics.median(sweep[p]))
    print(f"parallelism used: {parallelism} (library default {DEFAULT_PARALLELISM})")

    rows = {}
    for split in SPLITS:
        verify(Experts(path, tensors, split), direct, parallelism)
    print(f"\n{'expert MiB':>10} {'scheduler':>10} {'plain':>10} {'ceiling':>10} "
          f"{'sched/ceil':>10} {'sched/plain':>11}   (GB/s; ratio: median of per-run ratios)")
    ceilings = []
    for split in SPLITS:
        experts = Experts(path, tensors, split)
        sched, plain, ceil = [], [], []
        for run in range(args.runs):
            keys = experts.workload(target, seed=run)
            order = "spc"[run % 3:] + "spc"[:run % 3]  # rotate: the three share the drift
            for which in order:
                evict(path)
                with handles() as h:
                    if which == "s":
                        sched.append(run_scheduler(experts, keys, direct, h, parallelism))
                    elif which == "p":
                        plain.append(run_plain(experts, keys, direct, h))
                    else:
                        ceil.append(ceiling_run())
        s_gb, p_gb, c_gb = (statistics.median(v) for v in (sched, plain, ceil))
        ratio = statistics.median(a / b for a, b in zip(sched, ceil))  # paired by run
        ceilings += ceil
        mib = experts.nbytes / 2**20
        rows[round(mib, 2)] = {"scheduler_gb_per_s": s_gb, "plain_gb_per_s": p_gb,
                               "ceiling_gb_per_s": c_gb, "ratio": ratio}
        print(f"{mib:>10.2f} {s_gb:>10.2f} {p_gb:>10.2f} {c_gb:>10.2f} "
              f"{ratio:>10.2f} {s_gb / p_gb:>11.2f}")
    ceiling = statistics.median(ceilings)

    aio = compare_aiofiles(mid, path, target // 3, parallelism, args.runs, handles) if throttle is None else None

    # Demand latency: idle scheduler vs 64 prefetches queued ahead of it.
    samples = 10 * args.runs
    evict(path)
    with handles() as h:
        idle = demand_latency(small, direct, h, parallelism, samples, 0, seed=7)
    evict(path)
    with handles() as h:
        loaded = demand_latency(small, direct, h, parallelism, samples, 64, seed=8)
    print(f"\ndemand read of {small.nbytes / 2**20:.2f} MiB: idle {idle * 1e3:.2f} ms, "
          f"with 64 prefetches queued {loaded * 1e3:.2f} ms ({loaded / idle:.2f}x; target <= 1.5x)")

    first = rows[min(rows)]
    summary = {
        "expert_mib": min(rows),
        "scheduler_gb_per_s": round(first["scheduler_gb_per_s"], 3),
        "plain_gb_per_s": round(first["plain_gb_per_s"], 3),
        "ceiling_gb_per_s": round(first["ceiling_gb_per_s"], 3),
        "ceiling_all_gb_per_s": round(ceiling, 3),
        "ratio": round(first["ratio"], 3),
        "min_ratio": round(min(r["ratio"] for r in rows.values()), 3),
        "by_expert_mib": {str(k): {kk: round(vv, 3) for kk, vv in v.items()}
                          for k, v in rows.items()},
        "demand_latency_idle_s": round(idle, 6),
        "demand_latency_loaded_s": round(loaded, 6),
        "demand_latency_ratio": round(loaded / idle, 3),
        "parallelism": parallelism,
        "parallelism_sweep_gb_per_s": {str(p): round(statistics.median(v), 3)
                                       for p, v in sweep.items()},
        **(aio or dict.fromkeys(("aiofiles_gb_per_s", "preadv_executor_gb_per_s", "aiofiles_cpu_s_per_gb",
                                 "preadv_executor_cpu_s_per_gb"))),
        "read_mode": mode,
        "throttle": args.throttle,
        "runs": args.runs,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
