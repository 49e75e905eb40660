"""Which eviction policy misses least on real routing, and how far is each from the optimum?

Replays the OLMoE-1B-7B decode traces (../shared/traces/olmoe-1b-7b: general and coding,
12,800 steps each, 16 layers, top-8 of 64) through every policy of golem.runtime.policies at
16, 32 and 48 slots per layer, caches persisting across the 100 prompts of a trace. Policy
parameters (lfu-decay's decay, lru-k's k) are tuned on one trace (lowest mean miss ratio over
the three capacities) and reported on the other, both ways. Baselines measured in the same
run: plain LRU below, Belady (evict the expert used farthest in the future) as the bound.
"gap closed" = (LRU - policy) / (LRU - Belady). Also times a full-trace replay (median of
--repeats runs).

    python benchmarks/bench_policies.py [--traces DIR] [--repeats 3]

Prints tables, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from golem.runtime.policies import DEFAULT_POLICY
from golem.runtime.analysis.simulate import belady, simulate
from golem.runtime.trace import load_trace

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "olmoe-1b-7b"
CAPACITIES = (16, 32, 48)
TUNABLE = {
    "lfu-decay": ("decay", (0.8, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)),
    "lru-k": ("k", (2, 3, 4, 6, 8)),
}
FIXED = ("lru", "lfu")


def miss_ratio(trace, spec: str, capacity: int) -> float:
    return simulate(trace, policy=spec, capacity=capacity).miss_ratio


def tune(trace, name: str) -> tuple[str, dict]:
    """The parameter value with the lowest mean miss ratio over CAPACITIES on ``trace``."""
    key, values = TUNABLE[name]
    scores = {}
    for v in values:
        scores[v] = statistics.fmean(miss_ratio(trace, f"{name}:{key}={v}", c) for c in CAPACITIES)
    best = min(scores, key=scores.get)
    return f"{name}:{key}={best}", {str(v): round(s, 5) for v, s in scores.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default=str(TRACES), help="Folder holding general.npz and coding.npz.")
    ap.add_argument("--repeats", type=int, default=3, help="Timed full-trace LRU replays (median reported).")
    args = ap.parse_args()
    folder = Path(args.traces)
    traces = {name: load_trace(folder / f"{name}.npz") for name in ("general", "coding")}
    first = traces["general"]
    print(f"OLMoE traces: {', '.join(f'{n} {t.num_steps} steps' for n, t in traces.items())}; "
          f"{first.num_layers} layers, top-{first.top_k} of {first.num_experts}")

    times = []
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        simulate(first, policy="lru", capacity=32)
        times.append(time.perf_counter() - t0)
    replay_s = statistics.median(times)
    print(f"full-trace replay ({first.num_steps} steps x {first.num_layers} layers, lru, 32 slots): "
          f"median {replay_s:.2f} s of {len(times)}")

    results, tuned = {}, {}
    for tune_name, report_name in (("general", "coding"), ("coding", "general")):
        tune_on, report_on = traces[tune_name], traces[report_name]
        specs = list(FIXED)
        tuned[report_name] = {"tuned_on": tune_name}
        for name in TUNABLE:
            spec, scores = tune(tune_on, name)
            specs.append(spec)
            tuned[report_name][name] = {"chosen": spec, "mean_miss_ratio_on_tuning_trace": scores}
        print()
        print(f"reported on {report_name} (parameters tuned on {tune_name}): miss ratio, vs LRU, gap to Belady closed")
        print(f"{'policy':<22}" + "".join(f"{c:>28}" for c in CAPACITIES))
        rows = {}
        for c in CAPACITIES:
            rows.setdefault("belady", {})[c] = belady(report_on, c).miss_ratio
            for spec in specs:
                rows.setdefault(spec, {})[c] = miss_ratio(report_on, spec, c)
        lru = rows["lru"]
        for spec in specs + ["belady"]:
            cells = []
            for c in CAPACITIES:
                r = rows[spec][c]
                rel = 100.0 * (r - lru[c]) / lru[c]
                closed = 100.0 * (lru[c] - r) / (lru[c] - rows["belady"][c]) if lru[c] > rows["belady"][c] else 0.0
                cells.append(f"{100 * r:7.2f}% {rel:+7.1f}% {closed:6.1f}%")
            print(f"{spec:<22}" + "".join(f"{cell:>28}" for cell in cells))
        results[report_name] = {spec: {str(c): round(v, 6) for c, v in per.items()} for spec, per in rows.items()}

    # the policy with the lowest mean miss ratio over both held-out traces and all capacities
    def family(spec: str) -> str:
        return spec.split(":")[0]

    means = {}
    for report_name, rows in results.items():
        for spec, per in rows.items():
            if spec != "belady":
                means.setdefault(family(spec), []).extend(per.values())
    means = {k: statistics.fmean(v) for k, v in means.items()}
    best = min(means, key=means.get)
    print()
    print("mean miss ratio over both held-out traces and all capacities: "
          + ", ".join(f"{k} {100 * v:.2f}%" for k, v in sorted(means.items(), key=lambda kv: kv[1])))
    print(f"best: {best}; golem's default policy: {DEFAULT_POLICY}")
    print(json.dumps({
        "capacities": list(CAPACITIES),
        "num_experts": first.num_experts,
        "miss_ratio": results,
        "tuned": tuned,
        "mean_miss_ratio": {k: round(v, 6) for k, v in means.items()},
        "best_policy": best,
        "default_policy": DEFAULT_POLICY,
        "default_is_best": best == DEFAULT_POLICY,
        "lru_full_replay_s_median": round(replay_s, 3),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
