"""Which eviction policy misses least on real routing, and how far is each from the optimum?

Replays two decode traces of one model (default: the OLMoE-1B-7B traces in
../shared/traces/olmoe-1b-7b, general and coding, 12,800 steps each, 16 layers, top-8 of 64)
through every policy of golem.runtime.policies at a quarter, half and three quarters of the
experts per layer (16, 32 and 48 of 64), caches persisting across the prompts of a trace. Policy
parameters (lfu-decay's decay, lru-k's k) are tuned on one trace (lowest mean miss ratio over
the three capacities) and reported on the other, both ways. Baselines measured in the same
run: plain LRU below, Belady (evict the expert used farthest in the future) as the bound.
"gap closed" = (LRU - policy) / (LRU - Belady). Also times a full-trace replay (median of
--repeats runs).

    python benchmarks/bench_policies.py [GENERAL.npz CODING.npz | --traces DIR] [--repeats 3]

Prints tables, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from trace_inputs import add_trace_arguments, load_two_traces

from golem.runtime.analysis.simulate import belady, simulate
from golem.runtime.cli.progress import progress_bar
from golem.runtime.policies import DEFAULT_POLICY

SHARES = (0.25, 0.5, 0.75)  # of the experts per layer: 16, 32, 48 of 64
CACHE_SIZES: tuple = ()
TUNABLE = {
    "lfu-decay": ("decay", (0.8, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)),
    "lru-k": ("k", (2, 3, 4, 6, 8)),
}
FIXED = ("lru", "lfu")


def miss_ratio(trace, spec: str, cache_size: int) -> float:
    return simulate(trace, policy=spec, cache_size=cache_size).miss_ratio


def tune(trace, name: str, progress=None) -> tuple[str, dict]:
    """The parameter value with the lowest mean miss ratio over CACHE_SIZES on ``trace``."""
    key, values = TUNABLE[name]
    scores = {}
    for v in values:
        scores[v] = statistics.fmean(miss_ratio(trace, f"{name}:{key}={v}", c) for c in CACHE_SIZES)
        if progress is not None:
            progress(len(CACHE_SIZES))
    best = min(scores, key=scores.get)
    return f"{name}:{key}={best}", {str(v): round(s, 5) for v, s in scores.items()}


def main() -> int:
    global CACHE_SIZES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_trace_arguments(ap)
    ap.add_argument("--repeats", type=int, default=3, help="Timed full-trace LRU replays (median reported).")
    args = ap.parse_args()
    traces = load_two_traces(args, "bench_policies")
    names = list(traces)
    first = traces[names[0]]
    CACHE_SIZES = tuple(sorted({max(first.top_k, round(s * first.num_experts)) for s in SHARES}))
    print(f"traces: {', '.join(f'{n} {t.num_steps} steps' for n, t in traces.items())}; "
          f"{first.num_layers} layers, top-{first.top_k} of {first.num_experts}")

    times = []
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        simulate(first, policy="lru", cache_size=32)
        times.append(time.perf_counter() - t0)
    replay_s = statistics.median(times)
    print(f"full-trace replay ({first.num_steps} steps x {first.num_layers} layers, lru, 32 slots): "
          f"median {replay_s:.2f} s of {len(times)}")

    results, tuned = {}, {}
    replays = 2 * len(CACHE_SIZES) * (sum(len(v) for _, v in TUNABLE.values()) + len(FIXED) + len(TUNABLE) + 1)
    bar = progress_bar(replays, "replays", work=replays * first.num_steps * first.num_layers)
    for tune_name, report_name in ((names[0], names[1]), (names[1], names[0])):
        tune_on, report_on = traces[tune_name], traces[report_name]
        specs = list(FIXED)
        tuned[report_name] = {"tuned_on": tune_name}
        for name in TUNABLE:
            spec, scores = tune(tune_on, name, bar.update)
            specs.append(spec)
            tuned[report_name][name] = {"chosen": spec, "mean_miss_ratio_on_tuning_trace": scores}
        print()
        print(f"reported on {report_name} (parameters tuned on {tune_name}): miss ratio, vs LRU, gap to Belady closed")
        print(f"{'policy':<22}" + "".join(f"{c:>28}" for c in CACHE_SIZES))
        rows = {}
        for c in CACHE_SIZES:
            rows.setdefault("belady", {})[c] = belady(report_on, c).miss_ratio
            for spec in specs:
                rows.setdefault(spec, {})[c] = miss_ratio(report_on, spec, c)
            bar.update(1 + len(specs))
        lru = rows["lru"]
        for spec in specs + ["belady"]:
            cells = []
            for c in CACHE_SIZES:
                r = rows[spec][c]
                rel = 100.0 * (r - lru[c]) / lru[c]
                closed = 100.0 * (lru[c] - r) / (lru[c] - rows["belady"][c]) if lru[c] > rows["belady"][c] else 0.0
                cells.append(f"{100 * r:7.2f}% {rel:+7.1f}% {closed:6.1f}%")
            print(f"{spec:<22}" + "".join(f"{cell:>28}" for cell in cells))
        results[report_name] = {spec: {str(c): round(v, 6) for c, v in per.items()} for spec, per in rows.items()}

    # the policy with the lowest mean miss ratio over both held-out traces and all capacities
    def family(spec: str) -> str:
        return spec.split(":")[0]

    bar.close()
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
        "capacities": list(CACHE_SIZES),
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
