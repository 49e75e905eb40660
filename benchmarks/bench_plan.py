"""Does ``--memory-budget`` with routing statistics beat the uniform plan of the same bytes?

On two decode traces of one model (default: the OLMoE-1B-7B traces in
../shared/traces/olmoe-1b-7b, general and coding; expert size from the traces' meta
expert_bytes, 12,582,912 bytes), for expert budgets equal to uniform 1/4, 3/8, 1/2, 5/8 and
3/4 of the experts per layer (16, 24, 32, 40 and 48 slots of 64), compares the simulated miss ratio of
  uniform   plan_memory without statistics (the same slots in every layer, leftover to the first)
  budget    plan_memory with RoutingStats (per-layer miss curves of the policy that runs)
under each policy (plain LRU; golem's default policy), in three settings:
  held-out      statistics from the first 50 prompts of a trace, replay of the other 50
  cross-domain  statistics from the other trace, replay of the whole trace
  in-sample     statistics from the whole trace, replay of the same trace
and, for the default policy, "LRU curves": planned with plain LRU's curves (the fallback when
a profile carries only stack distances, no curves of the policy that runs). Both plans spend
the same bytes (checked); "change" = (budget - uniform) / uniform.

    python benchmarks/bench_plan.py [GENERAL.npz CODING.npz | --traces DIR]

Prints tables, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from trace_inputs import add_trace_arguments, load_two_traces

from golem.runtime.analysis.model_size import ModelMemory
from golem.runtime.analysis.plan import RoutingStats, plan_memory
from golem.runtime.analysis.simulate import simulate
from golem.runtime.cli.progress import progress_bar
from golem.runtime.policies import DEFAULT_POLICY
from golem.runtime.trace import Trace

SHARES = (2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8)  # of the experts per layer: 16, 24, 32, 40, 48 of 64


def half(trace: Trace, first: bool) -> Trace:
    """The first or second half of a trace's sequences."""
    so = trace.seq_offsets
    mid = int(so[len(so) // 2])
    if first:
        return Trace(trace.experts[:mid], trace.weights[:mid], so[so <= mid], trace.meta, path=trace.path)
    return Trace(trace.experts[mid:], trace.weights[mid:], so[so >= mid] - mid, trace.meta, path=trace.path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_trace_arguments(ap)
    args = ap.parse_args()
    traces = load_two_traces(args, "bench_plan")
    names = list(traces)
    try:
        model = ModelMemory.from_trace_meta(traces[names[0]].meta)
    except ValueError as e:
        raise SystemExit(f"bench_plan: {traces[names[0]].path}: {e}") from None
    uniform_slots = tuple(sorted({max(model.top_k, round(s * model.num_experts)) for s in SHARES}))
    policies = ("lru", DEFAULT_POLICY)

    # (trace replayed, statistics source) per setting
    settings = {}
    for name, t in traces.items():
        other = traces[names[1] if name == names[0] else names[0]]
        settings[("held-out", name)] = (half(t, False), half(t, True))
        settings[("cross-domain", name)] = (t, other)
        settings[("in-sample", name)] = (t, t)

    stats_cache: dict = {}

    def stats_for(source: Trace, policy: str) -> RoutingStats:
        key = (id(source), policy)
        if key not in stats_cache:
            stats_cache[key] = RoutingStats.from_traces(source, policy=policy)
        return stats_cache[key]

    rows = []
    variants = [(p, p) for p in policies] + [(DEFAULT_POLICY, "lru")]  # (replayed policy, curves policy)
    t0 = traces[names[0]]
    bar = progress_bar(len(settings) * len(variants), "plans",
                       work=len(settings) * len(variants) * 2 * len(uniform_slots) * t0.num_steps * t0.num_layers)
    for (setting, name), (replay, source) in settings.items():
        for policy, curves in variants:
            bar.update(1)
            stats = stats_for(source, curves)
            label = policy if curves == policy else f"{policy}, LRU curves"
            for u in uniform_slots:
                budget = u * model.num_layers * model.nbytes_of(0)
                uniform = plan_memory(model, budget_nbytes=budget)
                plan = plan_memory(model, budget_nbytes=budget, stats=stats)
                assert plan.expert_nbytes_total <= budget and uniform.expert_nbytes_total == budget
                mu = simulate(replay, policy=policy, cache_size=uniform.cache_sizes).miss_ratio
                mb = simulate(replay, policy=policy, cache_size=plan.cache_sizes, pinned=plan.pinned_positions).miss_ratio
                rows.append({
                    "setting": setting, "trace": name, "policy": label, "uniform_slots": u,
                    "budget_nbytes": budget, "plan_nbytes": plan.expert_nbytes_total,
                    "uniform_miss_ratio": round(mu, 6), "budget_miss_ratio": round(mb, 6),
                    "change": round((mb - mu) / mu, 5),
                })

    bar.close()
    labels = [p for p in policies] + [f"{DEFAULT_POLICY}, LRU curves"]
    summary = {}
    for setting in ("held-out", "cross-domain", "in-sample"):
        print()
        print(f"{setting}: miss ratio uniform -> budget (change)")
        for label in labels:
            print(f"  {label}")
            print(f"    {'trace':<9}" + "".join(f"{f'{u} slots':>27}" for u in uniform_slots))
            for name in traces:
                cells = [r for r in rows if (r["setting"], r["trace"], r["policy"]) == (setting, name, label)]
                print(f"    {name:<9}" + "".join(
                    f"{100 * r['uniform_miss_ratio']:>8.2f}% ->{100 * r['budget_miss_ratio']:>6.2f}% ({100 * r['change']:+5.1f}%)"
                    for r in cells))
            cells = [r for r in rows if (r["setting"], r["policy"]) == (setting, label)]
            wins = sum(r["budget_miss_ratio"] < r["uniform_miss_ratio"] for r in cells)
            ties = sum(r["budget_miss_ratio"] == r["uniform_miss_ratio"] for r in cells)
            mean_change = float(np.mean([r["change"] for r in cells]))
            summary[f"{setting}/{label}"] = {"wins": wins, "ties": ties, "cells": len(cells),
                                             "mean_change": round(mean_change, 5)}
            print(f"    budget plan lower in {wins} of {len(cells)} cells ({ties} equal), mean change {100 * mean_change:+.2f}%")

    head = summary[f"held-out/{DEFAULT_POLICY}"]
    print()
    print(f"held-out, {DEFAULT_POLICY} (golem's default): budget plan lower in {head['wins']} of {head['cells']} "
          f"cells, mean change {100 * head['mean_change']:+.2f}%")
    print(json.dumps({
        "expert_nbytes": model.nbytes_of(0),
        "uniform_slots": list(uniform_slots),
        "default_policy": DEFAULT_POLICY,
        "summary": summary,
        "rows": rows,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
