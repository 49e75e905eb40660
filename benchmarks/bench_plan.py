"""Does ``--memory-budget`` with routing statistics beat the uniform plan of the same bytes?

On the OLMoE-1B-7B decode traces (../shared/traces/olmoe-1b-7b; expert size from the traces'
meta expert_bytes, 12,582,912 bytes), for expert budgets equal to uniform 16, 24, 32, 40 and
48 slots per layer (of 64), compares the simulated miss ratio of
  uniform   make_plan without statistics (the same slots in every layer, leftover to the first)
  budget    make_plan with RoutingStats (per-layer miss curves of the policy that runs)
under each policy (plain LRU; golem's default policy), in three settings:
  held-out      statistics from the first 50 prompts of a trace, replay of the other 50
  cross-domain  statistics from the other trace, replay of the whole trace
  in-sample     statistics from the whole trace, replay of the same trace
and, for the default policy, "LRU curves": planned with plain LRU's curves (the fallback when
a profile carries only stack distances, no curves of the policy that runs). Both plans spend
the same bytes (checked); "change" = (budget - uniform) / uniform.

    python benchmarks/bench_plan.py [--traces DIR]

Prints tables, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from golem.runtime.analysis.plan import ModelMemory, RoutingStats, make_plan
from golem.runtime.policies import DEFAULT_POLICY
from golem.runtime.analysis.simulate import simulate
from golem.runtime.trace import Trace, load_trace

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "olmoe-1b-7b"
UNIFORM_SLOTS = (16, 24, 32, 40, 48)


def half(trace: Trace, first: bool) -> Trace:
    """The first or second half of a trace's sequences."""
    so = trace.seq_offsets
    mid = int(so[len(so) // 2])
    if first:
        return Trace(trace.experts[:mid], trace.weights[:mid], so[so <= mid], trace.meta, path=trace.path)
    return Trace(trace.experts[mid:], trace.weights[mid:], so[so >= mid] - mid, trace.meta, path=trace.path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default=str(TRACES), help="Folder holding general.npz and coding.npz.")
    args = ap.parse_args()
    folder = Path(args.traces)
    traces = {name: load_trace(folder / f"{name}.npz") for name in ("general", "coding")}
    model = ModelMemory.from_trace_meta(traces["general"].meta)
    policies = ("lru", DEFAULT_POLICY)

    # (trace replayed, statistics source) per setting
    settings = {}
    for name, t in traces.items():
        other = traces["coding" if name == "general" else "general"]
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
    for (setting, name), (replay, source) in settings.items():
        for policy, curves in variants:
            stats = stats_for(source, curves)
            label = policy if curves == policy else f"{policy}, LRU curves"
            for u in UNIFORM_SLOTS:
                budget = u * model.num_layers * model.nbytes_of(0)
                uniform = make_plan(model, budget_nbytes=budget)
                plan = make_plan(model, budget_nbytes=budget, stats=stats)
                assert plan.expert_nbytes_total <= budget and uniform.expert_nbytes_total == budget
                mu = simulate(replay, policy=policy, capacity=uniform.capacities).miss_ratio
                mb = simulate(replay, policy=policy, capacity=plan.capacities, pinned=plan.pinned_layers).miss_ratio
                rows.append({
                    "setting": setting, "trace": name, "policy": label, "uniform_slots": u,
                    "budget_nbytes": budget, "plan_nbytes": plan.expert_nbytes_total,
                    "uniform_miss_ratio": round(mu, 6), "budget_miss_ratio": round(mb, 6),
                    "change": round((mb - mu) / mu, 5),
                })

    labels = [p for p in policies] + [f"{DEFAULT_POLICY}, LRU curves"]
    summary = {}
    for setting in ("held-out", "cross-domain", "in-sample"):
        print()
        print(f"{setting}: miss ratio uniform -> budget (change)")
        for label in labels:
            print(f"  {label}")
            print(f"    {'trace':<9}" + "".join(f"{f'{u} slots':>27}" for u in UNIFORM_SLOTS))
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
        "uniform_slots": list(UNIFORM_SLOTS),
        "default_policy": DEFAULT_POLICY,
        "summary": summary,
        "rows": rows,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
