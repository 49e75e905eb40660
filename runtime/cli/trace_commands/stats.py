"""`golem-trace stats`: what the routing of traces looks like, layer by layer.

Prints per-layer distinct experts, routing entropy, distinct experts per window, the share
of requests the most used quarter of the experts takes, and the chunk analysis of the
GLM-5 study (U and D per 128-step chunk, from ``golem.runtime.analysis.chunks``). Computes no cache
replay; see ``golem-trace simulate`` for that.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from golem.runtime.analysis.chunks import DEFAULT_COVERAGES, chunk_analysis
from golem.runtime.analysis.plan import distinct_per_window
from golem.runtime.analysis.profile import profile_from_traces
from golem.runtime.trace import load_traces, require_steps


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "stats",
        help="Per-layer routing statistics and the chunk analysis (U, D) of traces.",
        description="Per-layer routing statistics of golem-trace/1 traces (decode steps; several "
                    "traces are read in order as one stream) and the chunk analysis of the GLM-5 study: "
                    "for each chunk of decode steps, U = the fewest (layer, expert) pairs covering a share "
                    "of its activations, D = how many of those the previous chunk did not use.",
    )
    p.add_argument("traces", nargs="+", metavar="TRACE", help="Trace files or folders of traces.")
    p.add_argument("--window", type=int, default=128, help="Steps per window for distinct experts per window (128).")
    p.add_argument("--chunk", type=int, default=128, help="Decode steps per chunk of the chunk analysis (128).")
    p.add_argument("--coverages", default=",".join(f"{c:g}" for c in DEFAULT_COVERAGES),
                   help="Comma-separated coverage thresholds in (0, 1] (default 0.1,...,1).")
    p.add_argument("--per-sequence", action="store_true",
                   help="Restart chunks at every sequence (default: chunks run across sequences).")
    p.add_argument("--json", action="store_true", help="Print one JSON object as the last line.")
    p.set_defaults(func=run)
    return p


def _coverages(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--coverages: cannot read {text!r}; write e.g. 0.5,0.8,0.95,1") from None


def layer_stats(traces, window: int) -> list[dict]:
    """Per-layer numbers of the decode steps: requests, distinct experts, entropy (bits),
    distinct experts per window, share of requests of the most used quarter of experts."""
    profile = profile_from_traces(traces, stack=False)
    per_window = distinct_per_window(traces, window)
    e = profile.num_experts
    quarter = max(1, e // 4)
    numbers = traces[0].layer_numbers
    out = []
    for position in range(profile.num_layers):
        c = profile.counts[position]
        total = c.sum()
        p = c[c > 0] / total if total else np.zeros(0)
        entropy = float(-(p * np.log2(p)).sum()) if len(p) else 0.0
        top = np.sort(c)[::-1][:quarter].sum() / total if total else 0.0
        out.append({
            "layer": numbers[position],
            "requests": int(total),
            "distinct": int((c > 0).sum()),
            "entropy_bits": round(entropy, 4),
            "entropy_ratio": round(entropy / np.log2(e), 4) if e > 1 else 1.0,
            "distinct_per_window": round(float(per_window[position]), 3),
            "top_quarter_share": round(float(top), 4),
        })
    return out


def run(args) -> int:
    if args.window < 1:
        raise ValueError(f"--window must be >= 1, got {args.window}")
    traces = load_traces(args.traces, hidden=False, weights=False)
    steps = require_steps(traces)
    first = traces[0]
    layers = layer_stats(traces, args.window)
    chunks = chunk_analysis(traces, chunk=args.chunk, coverages=_coverages(args.coverages),
                            across_sequences=not args.per_sequence)

    e = first.num_experts
    prefill = sum(int(t.prefill.sum()) if t.prefill is not None else 0 for t in traces)
    print(f"{len(traces)} trace(s): {steps} decode steps in {sum(t.num_sequences for t in traces)} sequences"
          + (f" (+{prefill} prefill steps left out)" if prefill else "")
          + f"; {first.num_layers} MoE layers x {e} experts, top-{first.top_k}")
    print()
    print(f"{'layer':>5}  {'distinct':>8}  {'entropy':>12}  {f'distinct/{args.window}':>14}  {'top 25% share':>13}")
    for row in layers:
        print(f"{row['layer']:>5}  {row['distinct']:>4}/{e:<3}  {row['entropy_bits']:>6.3f} bits  "
              f"{row['distinct_per_window']:>14.1f}  {100 * row['top_quarter_share']:>12.1f}%")
    mean_entropy = float(np.mean([r["entropy_ratio"] for r in layers]))
    print(f"{'all':>5}  entropy {100 * mean_entropy:.1f}% of uniform on average")
    print()
    total = chunks.total_experts
    print(f"chunk analysis: {chunks.num_chunks} chunks of {chunks.chunk} decode steps "
          f"({'across' if chunks.across_sequences else 'within'} sequences; {chunks.dropped_steps} tail steps left out); "
          f"{total} (layer, expert) pairs")
    print(f"{'coverage':>9}  {'U mean':>8}  {'U share':>8}  {'D mean':>8}  {'U median':>8}  {'D median':>8}")
    for i, c in enumerate(chunks.coverages):
        u, d = chunks.u_mean[i], chunks.d_mean[i]
        print(f"{100 * c:>8.1f}%  {u:>8.1f}  {100 * u / total:>7.1f}%  {d:>8.1f}  "
              f"{chunks.u_median[i]:>8.1f}  {chunks.d_median[i]:>8.1f}")
    if args.json:
        print(json.dumps({
            "traces": [t.path for t in traces],
            "steps": steps,
            "sequences": sum(t.num_sequences for t in traces),
            "prefill_steps_left_out": prefill,
            "num_layers": first.num_layers,
            "num_experts": e,
            "top_k": first.top_k,
            "window": args.window,
            "layers": layers,
            "chunks": chunks.to_dict(),
        }))
    return 0
