"""How much does a warm start save, and which one?

Replays two decode traces of one model (default: the OLMoE-1B-7B traces in
../shared/traces/olmoe-1b-7b, general and coding, 100 prompts of 128 decode steps each) prompt by prompt, each from a fresh cache of C slots per
layer, as separate golem runs would start, with these warm starts (rows):

  empty          the cache starts empty (the baseline, measured in the same run)
  random         C experts per layer drawn at random (golem's -R SEED, seed = s*1000 + prompt);
                 median over --seeds seeds s (min and max in the JSON)
  same prompt    the C most used experts per layer of this very prompt's own routing: the
                 profile a previous run of the same prompt would have saved (an upper bound)
  other prompt   the C most used experts of one other prompt of the same trace (the next one)
  aggregated     the C most used experts over the other 99 prompts of the same trace (a
                 profile of earlier runs of the same kind of work, this prompt left out)
  aggregated, other domain
                 the C most used experts over all prompts of the other trace

Warm lists are inserted least used first, so the most used ends most recent (what
``Profile.warm_start`` does). Miss ratio = demand misses / expert requests over all prompts,
for C = a quarter, half and three quarters of the experts (16, 32, 48 of 64), with plain LRU (the study's cache) and golem's default policy.

    python benchmarks/bench_warmup.py [GENERAL.npz CODING.npz | --traces DIR] [--seeds 3]

Prints tables, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
from trace_inputs import add_trace_arguments, load_two_traces

from golem.runtime.analysis.profile import profile_from_counts, random_warm_start
from golem.runtime.analysis.simulate import simulate_sequences, split_sequences
from golem.runtime.cli.progress import progress_bar
from golem.runtime.policies import DEFAULT_POLICY

SHARES = (0.25, 0.5, 0.75)  # of the experts per layer: 16, 32, 48 of 64
ROWS = ("empty", "random", "same prompt", "other prompt", "aggregated", "aggregated, other domain")


def routing_counts(trace) -> np.ndarray:
    """float (L, E): uses of each expert in the trace's decode steps."""
    ex = trace.experts.astype(np.int64)
    num_layers, e = trace.num_layers, trace.num_experts
    flat = (np.arange(num_layers)[None, :, None] * e + ex)[ex >= 0]
    return np.bincount(flat, minlength=num_layers * e).reshape(num_layers, e).astype(np.float64)


def warm_from(counts: np.ndarray, top_k: int, cache_size: int) -> dict:
    return profile_from_counts(counts, top_k=top_k, num_steps=1).warm_start(cache_size)


def table_for(trace, other, policy: str, cache_size: int, seeds: int) -> dict:
    seqs = split_sequences(trace)
    per_seq = np.stack([routing_counts(s) for s in seqs])  # (S, L, E)
    total = per_seq.sum(axis=0)
    other_total = routing_counts(other.decode_only())
    k, num_layers, e = trace.top_k, trace.num_layers, trace.num_experts
    starts = {
        "empty": lambda i, s: None,
        "same prompt": lambda i, s: warm_from(per_seq[i], k, cache_size),
        "other prompt": lambda i, s: warm_from(per_seq[(i + 1) % len(seqs)], k, cache_size),
        "aggregated": lambda i, s: warm_from(total - per_seq[i], k, cache_size),
        "aggregated, other domain": lambda i, s: warm_from(other_total, k, cache_size),
    }
    out = {}
    for row, warm_for in starts.items():
        out[row] = simulate_sequences(seqs, warm_for, policy=policy, cache_size=cache_size).miss_ratio
    draws = []
    for s in range(seeds):
        def warm_for(i, seq, s=s):
            return random_warm_start(s * 1000 + i, num_layers, e, cache_size)
        draws.append(simulate_sequences(seqs, warm_for, policy=policy, cache_size=cache_size).miss_ratio)
    out["random"] = statistics.median(draws)
    out["random_min"], out["random_max"] = min(draws), max(draws)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_trace_arguments(ap)
    ap.add_argument("--seeds", type=int, default=3, help="Random warm starts per cell (median reported).")
    args = ap.parse_args()
    traces = load_two_traces(args, "bench_warmup")
    names = list(traces)
    first = traces[names[0]]
    cache_sizes = tuple(sorted({max(first.top_k, round(s * first.num_experts)) for s in SHARES}))
    print(f"each prompt from a fresh cache; {first.num_layers} layers, top-{first.top_k} of {first.num_experts}; "
          f"random = median of {args.seeds} seeds")
    results = {}
    bar = progress_bar(2 * 2 * len(cache_sizes), "cells",
                       work=4 * len(cache_sizes) * (args.seeds + 5) * first.num_steps * first.num_layers)
    for policy in ("lru", DEFAULT_POLICY):
        results[policy] = {}
        for name, trace in traces.items():
            other = traces[names[1] if name == names[0] else names[0]]
            cells = {}
            for c in cache_sizes:
                cells[c] = table_for(trace.decode_only(), other, policy, c, args.seeds)
                bar.update(1)
            results[policy][name] = {row: {str(c): round(cells[c][row], 6) for c in cache_sizes} for row in ROWS}
            results[policy][name]["random_range"] = {
                str(c): [round(cells[c]["random_min"], 6), round(cells[c]["random_max"], 6)] for c in cache_sizes
            }
            print()
            print(f"{name}, {policy}: miss ratio (change against empty)")
            print(f"{'warm start':<26}" + "".join(f"{f'{c} slots':>20}" for c in cache_sizes))
            for row in ROWS:
                line = f"{row:<26}"
                for c in cache_sizes:
                    r, base = cells[c][row], cells[c]["empty"]
                    line += f"{100 * r:>10.2f}% {100 * (r - base) / base:>+7.1f}%"
                print(line)

    bar.close()
    # the best warm start one can have without having seen the prompt: mean over all cells
    usable = [r for r in ROWS if r != "same prompt"]
    means = {
        row: statistics.fmean(
            results[p][t][row][str(c)] for p in results for t in traces for c in cache_sizes
        )
        for row in ROWS
    }
    best = min(usable, key=means.get)
    print()
    print("mean over traces, policies and capacities: " + ", ".join(f"{r} {100 * means[r]:.2f}%" for r in ROWS))
    print(f"best warm start without knowing the prompt: {best}")
    print(json.dumps({
        "capacities": list(cache_sizes),
        "num_experts": first.num_experts,
        "rows": list(ROWS),
        "random_seeds": args.seeds,
        "miss_ratio": results,
        "mean_miss_ratio": {r: round(v, 6) for r, v in means.items()},
        "best_without_the_prompt": best,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
