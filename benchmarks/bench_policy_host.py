"""What does the eviction policy cost the engine's thread per decode step, by cache size?

The slot pool asks its policy, for every step of a layer, for a ``hit`` per resident expert
and a ``victim`` per missing one (``Policy``'s step protocol). This drives golem's default
policy (``lfu-decay``) and ``lfu`` through that protocol on one layer of 256 experts, top-8,
with skewed routing that drifts (a Zipf-like popularity over a slowly rotating order), at
caches of 16 to 224 slots, against their earlier shape: the victim found by a scan of every
resident expert in recency order (now: a heap of ``(count, recency)`` keys). The two
alternate round by round on one quiet thread; checks that both evict the same experts.
Prints microseconds per step and per miss (medians of --rounds), then one JSON line.

    python benchmarks/bench_policy_host.py [--rounds 15] [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import OrderedDict

import numpy as np

from golem.runtime.policies import make_policy

EXPERTS, TOP_K = 256, 8
CACHE_SIZES = (16, 32, 48, 96, 160, 224)


class ScanLFU:
    """The earlier ``LFUPolicy`` / ``LFUDecayPolicy``: counts in a dict, recency in an
    ordered dict, the victim by a scan of every resident expert, oldest first."""

    def __init__(self, decay=None):
        self.decay, self._scale, self.counts, self._order = decay, 1.0, {}, OrderedDict()

    def _bump(self, e):
        self.counts[e] = self.counts.get(e, 0.0) + self._scale

    def insert(self, e):
        self._bump(e)
        self._order[e] = None
        self._order.move_to_end(e)

    def hit(self, e):
        self._bump(e)
        self._order.move_to_end(e)

    def evict(self, e):
        del self._order[e]

    def tick(self):
        if self.decay is not None:
            self._scale /= self.decay
            if self._scale > 1e12:
                self.counts = {e: c / self._scale for e, c in self.counts.items()}
                self._scale = 1.0

    def victim(self, protected=()):
        best, best_count = None, None
        counts = self.counts
        for e in self._order:
            if e in protected:
                continue
            c = counts[e]
            if best_count is None or c < best_count:
                best, best_count = e, c
        if best is None:
            raise LookupError("every resident expert is protected")
        return best


def routing(steps: int, seed: int = 0) -> list:
    """Each step's distinct experts, ascending: Zipf-like popularity over an order that
    swaps two neighbours every step (the popular set drifts)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, EXPERTS + 1) ** 0.8
    weights /= weights.sum()
    order = rng.permutation(EXPERTS)
    out = []
    for _ in range(steps):
        i = int(rng.integers(EXPERTS - 1))
        order[i], order[i + 1] = order[i + 1], order[i]
        out.append(sorted(order[rng.choice(EXPERTS, TOP_K, replace=False, p=weights)].tolist()))
    return out


def replay(policy, steps: list, cache_size: int):
    """The pool's step protocol over ``steps``; ``(seconds, misses, victims)``."""
    resident, victims, misses = set(), [], 0
    t = time.perf_counter()
    for needed in steps:
        policy.tick()
        protected = set(needed)
        for e in needed:
            if e in resident:
                policy.hit(e)
                continue
            misses += 1
            if len(resident) >= cache_size:
                v = policy.victim(protected)
                policy.evict(v)
                resident.discard(v)
                victims.append(v)
            policy.insert(e)
            resident.add(e)
    return time.perf_counter() - t, misses, victims


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    steps = routing(args.steps)
    out = {"experts": EXPERTS, "top_k": TOP_K, "steps": args.steps, "rounds": args.rounds}
    same = True
    print(f"one layer of {EXPERTS} experts, top-{TOP_K}, {args.steps} steps of drifting skewed routing; "
          f"host us per step and per miss, medians of {args.rounds} alternating rounds")
    print(f"{'policy':<10}{'slots':>6}{'misses/step':>12}{'heap us/step':>13}{'scan us/step':>13}"
          f"{'heap us/miss':>13}{'scan us/miss':>13}{'heap/scan':>10}")
    for name, decay in (("lfu-decay", 0.95), ("lfu", None)):
        for cache_size in CACHE_SIZES:
            times = {"heap": [], "scan": []}
            for r in range(args.rounds):
                for kind in (("heap", "scan") if r % 2 == 0 else ("scan", "heap")):
                    policy = make_policy(name) if kind == "heap" else ScanLFU(decay)
                    seconds, misses, _ = replay(policy, steps, cache_size)
                    times[kind].append(seconds)
            heap_v = replay(make_policy(name), steps, cache_size)[2]
            scan_v = replay(ScanLFU(decay), steps, cache_size)[2]
            same = same and heap_v == scan_v
            heap, scan = (statistics.median(times[k]) for k in ("heap", "scan"))
            ratio = statistics.median(a / b for a, b in zip(times["heap"], times["scan"]))
            n = args.steps
            print(f"{name:<10}{cache_size:>6}{misses / n:>12.2f}{1e6 * heap / n:>13.1f}{1e6 * scan / n:>13.1f}"
                  f"{1e6 * heap / max(misses, 1):>13.2f}{1e6 * scan / max(misses, 1):>13.2f}{ratio:>9.3f}x")
            key = f"{name}_{cache_size}"
            out[f"{key}_misses_per_step"] = misses / n
            out[f"{key}_heap_us_per_step"] = 1e6 * heap / n
            out[f"{key}_scan_us_per_step"] = 1e6 * scan / n
            out[f"{key}_heap_over_scan"] = ratio
    out["same_victims"] = same
    print(f"same victims in every case: {same}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
