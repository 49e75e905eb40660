"""What one host sync and one launch cost on this backend, apart from the work they wait for.

The engine syncs once per decode layer that is not fully resident and launches one or two
expert graphs per layer; this prints what those calls cost on the calling thread when the
work itself is next to nothing, so that a phase table (``profile_decode.py``) can be read
against it. Cases, each timed on the calling thread (wall; CPU time too), interleaved over
``--rounds`` rounds of ``--calls`` calls each, medians:

- ``eval, 1 op`` / ``eval, 10 ops``: ``mx.eval`` of one add, of a chain of ten.
- ``eval, router``: a (1, D) x (D, E) matmul, the shape of one router (``--hidden``,
  ``--experts``).
- ``eval, router + 2 sorts``: the same and the two argsorts of the lookahead's ranks.
- ``eval + read back ids``: the router's top-k ids evaluated and read into numpy, as the
  engine reads a layer's ids.
- ``async_eval, 1 op``: the launch alone, then the wait for it (``mx.eval`` of the launched
  array) counted apart.

Then what the host's own work costs right after a wait, against the same work on a quiet
thread: a fixed piece of Python of the kind the engine does per layer (a dict of counters, a
small numpy selection read into a list; ``host_work``) timed alone, back to back
(``quiet``); right after a 1 ms sleep (``after a sleep``: the thread's core went idle); and
right after an ``mx.eval`` of a layer-sized chain of matmuls (``after an eval``: the core
waited for the device, and on the CPU backend the device's work ran on these cores). The
ratios say how much of a phase table's host time is the machine's penalty for having waited
rather than the engine's work (on the 2-core VM here the work after an eval ran several
times slower than alone).

    python benchmarks/bench_sync.py [--rounds 7] [--calls 200] [--hidden 2048] [--experts 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
import numpy as np


def cases(hidden: int, experts: int, top_k: int):
    """``{name: call}``: each call builds its lazy arrays and evaluates (or launches) them."""
    x = mx.random.normal((1, hidden))
    w = mx.random.normal((hidden, experts)) / hidden ** 0.5
    one = mx.ones((1, 8))
    mx.eval(x, w, one)

    def chain(n):
        y = one
        for _ in range(n):
            y = y + 1
        return y

    def top_ids():
        logits = x @ w
        return mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., :top_k]

    return {
        "eval, 1 op": lambda: mx.eval(chain(1)),
        "eval, 10 ops": lambda: mx.eval(chain(10)),
        "eval, router": lambda: mx.eval(x @ w),
        "eval, router + 2 sorts": lambda: mx.eval(mx.argsort(mx.argsort(-(x @ w), axis=-1), axis=-1)),
        "eval + read back ids": lambda: np.array(top_ids()),
        "async_eval, 1 op": lambda: _launched(chain(1)),
    }


def _launched(y: mx.array) -> mx.array:
    mx.async_eval(y)
    return y


def time_case(fn, calls: int):
    """Median wall and CPU microseconds of one call of ``fn`` (an ``async_eval`` case returns
    its array, waited for after the clock stops, so that launches do not pile up)."""
    wall, cpu = [], []
    for _ in range(calls):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        if out is not None and not isinstance(out, np.ndarray):
            mx.eval(out)
    return 1e6 * statistics.median(wall), 1e6 * statistics.median(cpu)


def host_work(state: dict) -> int:
    """A fixed piece of host work of the engine's kind: counters in a dict, a small numpy
    selection read back into a list."""
    for i in range(64):
        state[i] = state.get(i, 0) + 1
    picked = np.arange(16)
    picked = picked[picked % 3 == 0].tolist()
    return len(picked) + sum(state.values())


def layer_graph(hidden: int, chain: int = 16):
    """``() -> lazy array``: a chain of (1, H) x (H, H) matmuls, a layer's worth of waiting."""
    x = mx.random.normal((1, hidden))
    ws = [mx.random.normal((hidden, hidden)) / hidden ** 0.5 for _ in range(chain)]
    mx.eval(x, ws)

    def build():
        y = x
        for w in ws:
            y = y @ w
        return y
    return build


def time_after(before, calls: int):
    """Median wall and CPU microseconds of ``host_work`` run right after ``before()``."""
    state: dict = {}
    wall, cpu = [], []
    for _ in range(calls):
        before()
        t0, c0 = time.perf_counter(), time.thread_time()
        host_work(state)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return 1e6 * statistics.median(wall), 1e6 * statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    args = ap.parse_args()
    table = cases(args.hidden, args.experts, args.top_k)
    for fn in table.values():  # first use: kernels built, buffers allocated
        time_case(fn, 5)
    build = layer_graph(min(args.hidden, 1024))
    after = {"host work, quiet": lambda: None,
             "host work after a sleep": lambda: time.sleep(0.001),
             "host work after an eval": lambda: mx.eval(build())}
    seen = {name: [] for name in [*table, *after]}
    for _ in range(args.rounds):
        for name, fn in table.items():
            seen[name].append(time_case(fn, args.calls))
        for name, before in after.items():
            seen[name].append(time_after(before, args.calls))
    print(f"backend {mx.default_device()}, mlx {mx.__version__}: one call on the calling thread, "
          f"medians of {args.rounds} rounds x {args.calls} calls (router: {args.hidden} x {args.experts}, top-{args.top_k})")
    print(f"{'case':<26}{'wall us':>10}{'cpu us':>10}")
    out = {"backend": str(mx.default_device()), "mlx": mx.__version__, "rounds": args.rounds, "calls": args.calls}
    for name, runs in seen.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"{name:<26}{wall:>10.1f}{cpu:>10.1f}")
        key = name.replace(", ", "_").replace(" + ", "_").replace(" ", "_")
        out[f"{key}_us"], out[f"{key}_cpu_us"] = wall, cpu
    quiet = out["host_work_quiet_us"]
    for case in ("sleep", "eval"):
        out[f"after_{case}_over_quiet"] = out[f"host_work_after_a{'n' if case == 'eval' else ''}_{case}_us"] / quiet
    print(f"host work after a sleep / quiet: {out['after_sleep_over_quiet']:.2f}x; "
          f"after an eval / quiet: {out['after_eval_over_quiet']:.2f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
