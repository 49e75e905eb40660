"""What does a request cost the thread that submits it, with new keys started at once against
every request queued first?

The engine thread pays for each read it asks for: a layer's misses go in one ``submit_many``
(demands), its prefetches in another. A request for a key the scheduler holds nothing for,
which nothing queued outranks, starts without entering the queue (``Dispatcher.fresh``); the
earlier shape queued it (heap, file-neighbour maps), then took it straight back out. This
measures the submitting thread's CPU time per request for both shapes in one process, the
two alternating batch by batch so that the drifts of a shared machine fall on both, over the
no-op ``preadv`` of ``bench_io_host`` (every microsecond is host work around the read), at
two expert sizes: 36 KiB (``--shape qwen3-30b-a3b-host``) and 2 MiB (its real widths).
Prints medians and the median paired ratio, then one JSON line.

    python benchmarks/bench_submit.py [--rounds 30] [--batches 40]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io_host import Layout, handles, keys, make_scheduler  # noqa: E402
from golem.io.dispatcher import Dispatcher  # noqa: E402
from golem.io.futures import wait_result  # noqa: E402

SIZES = {"36KiB": 36 << 10, "2MiB": 2 << 20}


@contextlib.contextmanager
def queued(on: bool):
    """``on``: every request queued first, the earlier shape (``Dispatcher.fresh`` declines)."""
    original = Dispatcher.fresh
    if on:
        Dispatcher.fresh = lambda self, key, depth, score, prepared, future=True: None
    try:
        yield
    finally:
        Dispatcher.fresh = original


def demands(s, batch) -> float:
    """A layer's misses: one submit, wait for each, hand the buffers back; submit CPU s."""
    c = time.thread_time()
    futures = s.submit_demands(batch)
    c = time.thread_time() - c
    s.release_all([wait_result(f) for f in futures])
    return c


def prefetches(s, batch) -> float:
    """A layer's prefetches (depths 1 and 2): one submit, then poll until all are read; submit CPU s."""
    c = time.thread_time()
    s.submit_many([(key, 1 + i % 2, 0.5) for i, key in enumerate(batch)], futures=False)  # as the prefetcher
    c = time.thread_time() - c
    got = 0
    while got < len(batch):
        bufs = [buf for _, buf in s.poll(timeout=1.0)]
        got += len(bufs)
        s.release_all(bufs)
        st = s.statistics()
        if not st.queued and not st.running and not st.published:
            break
    return c


def measure(nbytes: int, kind, per_batch: int, rounds: int, batches: int) -> dict:
    layout = Layout(nbytes)
    picks = keys(per_batch * batches * rounds * 2 + 64, 7)
    groups = [list(dict.fromkeys(picks[i:i + per_batch])) for i in range(0, len(picks), per_batch)]
    us = {False: [], True: []}
    with handles() as h, make_scheduler(layout, h, num_buffers=16, parallelism=16) as s:
        for g in groups[:8]:  # warm-up: threads started, keys' pieces planned
            kind(s, g)
        at = 8
        for r in range(rounds):
            for old in ((False, True) if r % 2 else (True, False)):
                cpu, n = 0.0, 0
                with queued(old):
                    for g in groups[at:at + batches]:
                        cpu += kind(s, g)
                        n += len(g)
                at += batches
                us[old].append(1e6 * cpu / n)
    return {"queued_us": statistics.median(us[True]), "at_once_us": statistics.median(us[False]),
            "ratio": statistics.median(a / b for a, b in zip(us[False], us[True]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30, help="alternations of the two shapes")
    ap.add_argument("--batches", type=int, default=40, help="submits per shape and round")
    args = ap.parse_args()
    out = {"rounds": args.rounds, "batches": args.batches}
    print(f"submitting thread's CPU us per request, medians of {args.rounds} alternating rounds of "
          f"{args.batches} submits; no-op reads")
    print(f"{'requests':<28}{'queued first':>14}{'at once':>10}{'at once / queued':>19}")
    for label, kind, per_batch in (("demands, 5 a submit", demands, 5), ("prefetches, 6 a submit", prefetches, 6)):
        for size, nbytes in SIZES.items():
            r = measure(nbytes, kind, per_batch, args.rounds, args.batches)
            name = f"{label.split(',')[0]}_{size}"
            print(f"{label + ', ' + size:<28}{r['queued_us']:>14.1f}{r['at_once_us']:>10.1f}{r['ratio']:>18.3f}x")
            out.update({f"{name}_queued_us": r["queued_us"], f"{name}_at_once_us": r["at_once_us"],
                        f"{name}_ratio": r["ratio"]})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
