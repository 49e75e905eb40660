"""How well do golem's predictors guess the experts of the next layers?

Two parts, in one run:
  1. Real routing (two decode traces of one model; default: the OLMoE-1B-7B traces in
     ../shared/traces/olmoe-1b-7b, general and coding): the history
     predictors (previous, frequency as a static hot set, transition frozen and learning
     online, transition+previous), trained on one domain and evaluated on the other
     (general -> coding and coding -> general, counts pooled), between the baselines measured
     alongside: random guessing (median of 3 seeds) below and the oracle above. Depths 1, 2,
     3; thresholds 0.1, 0.3, 0.5; recall and wasted bytes per useful byte.
  2. Generated checkpoints (golem.runtime.synthetic, random weights; median over seeds): router
     lookahead fed the post-attention residual and the layer input, recorded with
     golem.runtime.analysis.capture while stock mlx-lm decodes; a linear probe and the transition table
     trained on other prompts of the same model; the same baselines. Depths 1..3.
Both parts also report top-k recall (the k best-scored experts of layer l+d, as published
figures count it). A score is a predictor's estimated probability that the expert is used.

    python benchmarks/bench_predictors.py [GENERAL.npz CODING.npz | --traces DIR] [--seeds 3]
        [--steps-per-domain 3200]   (12800: both whole OLMoE traces)

Prints tables, then one JSON object keyed by part, predictor, depth and threshold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

from trace_inputs import add_trace_arguments, load_two_traces

from golem.predictors import PredictorOptions, RoutingShape, find_moe_blocks, make_predictor, merge_accuracies, replay
from golem.predictors.metrics import Accuracy
from golem.runtime.cli.progress import progress_bar
from golem.runtime.trace import Trace

DEPTHS = (1, 2, 3)
THRESHOLDS = (0.1, 0.3, 0.5)
HISTORY = ("frequency/frozen", "previous", "transition/frozen", "transition", "transition+previous")

# Published figures for router lookahead (real checkpoints), quoted for comparison.
REFERENCE = {
    "olmoe_1_ahead": 0.72,
    "glm5_1_ahead": 0.74,
    "qwen3_1_ahead": 0.70,
    "olmoe_2_ahead_trained_linear_probe": 0.82,
}

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main(): print('hello world') return 0",
    "Once upon a time there was a small computer",
    "What is the capital of France? Paris is",
    "Memory is the bottleneck, so the experts live on disk",
    "A mixture of experts routes every token to a few experts",
    "Hello, how are you today? I am fine,",
    "0123456789 + - * / = ( ) [ ] { }",
    "It read the weights from its disk, one expert at a time,",
    "The rest of the weights stay idle while",
    "def add(a, b): return a + b",
    "Paris is the capital. What is the capital of",
]


# ---------------------------------------------------------------- helpers


def head(trace: Trace, steps: int) -> Trace:
    """The first whole sequences of ``trace`` covering at most ``steps`` steps."""
    so = trace.seq_offsets
    keep = int(np.searchsorted(so, steps, side="right")) - 1
    keep = max(keep, 1)
    n = int(so[keep])
    return Trace(trace.experts[:n], trace.weights[:n], so[: keep + 1].copy(), dict(trace.meta), path=trace.path)


def summarize(rows: Sequence[Accuracy]) -> Dict[str, Dict[str, dict]]:
    out: Dict[str, Dict[str, dict]] = {}
    for r in rows:
        d = r.as_dict()
        out.setdefault(str(r.depth), {})[str(r.threshold)] = {
            k: d[k] for k in ("recall", "recall_covered", "precision", "predicted_per_layer", "wasted_per_useful")
        }
    return out


def median_rows(runs: List[List[Accuracy]]) -> List[dict]:
    """Per (depth, selection) the median of each metric over runs."""
    out = []
    for rows in zip(*runs):
        med = {"depth": rows[0].depth, "threshold": rows[0].threshold, "best": rows[0].best}
        for key in ("recall", "recall_covered", "precision", "predicted_per_layer", "wasted_per_useful"):
            med[key] = statistics.median(getattr(r, key) for r in rows)
        out.append(med)
    return out


def selection_key(r: dict) -> str:
    return f"top{r['best']}" if r.get("best") else str(r["threshold"])


def fmt_row(name: str, r: dict, extra: str = "") -> str:
    w = r["wasted_per_useful"]
    w = "inf" if w in (None, float("inf")) else f"{w:.2f}"
    return (f"{name:<24} {r['depth']:>5} {selection_key(r):>6} {r['recall']:>7.3f} {r['recall_covered']:>8.3f} "
            f"{r['precision']:>9.3f} {r['predicted_per_layer']:>10.2f} {w:>13}{extra}")


HEADER = (f"{'predictor':<24} {'depth':>5} {'thresh':>6} {'recall':>7} {'covered':>8} {'precision':>9} "
          f"{'pred/layer':>10} {'wasted/useful':>13}")


# ---------------------------------------------------------------- part 1: real routing


def real_routing(traces: Dict[str, Trace], steps: int) -> dict:
    (g_name, general), (c_name, coding) = ((n, head(t, steps)) for n, t in traces.items())
    shape = RoutingShape.of(general)
    directions = [(f"{g_name}->{c_name}", general, coding), (f"{c_name}->{g_name}", coding, general)]
    where = ", ".join(str(t.path) for t in traces.values())
    print(f"\n== Part 1: REAL ROUTING ({where}): {shape.num_layers} MoE layers, "
          f"top-{shape.top_k} of {shape.num_experts}; {general.num_steps} + {coding.num_steps} decode steps ==")
    print("history predictors trained on one domain, evaluated on the other, learning online as they go "
          "(/frozen: only what the other domain taught them); counts pooled over both directions; "
          f"top{shape.top_k}: the {shape.top_k} best-scored experts of each target layer")
    results: Dict[str, dict] = {}
    table: List[str] = []
    names = ("random", *HISTORY, "oracle")
    bar = progress_bar(len(names), "predictors",
                       work=len(names) * (general.num_steps + coding.num_steps) * shape.num_layers * max(DEPTHS))
    for name in names:
        bar.update(1)
        t0 = time.perf_counter()
        per_dir, pooled_runs = {}, []
        seeds = (0, 1, 2) if name == "random" else (0,)
        for seed in seeds:
            runs = []
            for label, train, test in directions:
                base, _, frozen = name.partition("/")
                p = make_predictor(base, shape, PredictorOptions(truth=test, seed=seed, online=not frozen))
                p.fit([train])
                rows = replay(test, p, depth=max(DEPTHS), thresholds=THRESHOLDS, best=shape.top_k)
                runs.append(rows)
                per_dir.setdefault(label, []).append(rows)
            pooled_runs.append(merge_accuracies(runs))
        elapsed = time.perf_counter() - t0
        pooled = median_rows(pooled_runs)
        by_dir = {label: median_rows(r) for label, r in per_dir.items()}
        results[name] = {}
        for i, r in enumerate(pooled):
            entry = {k: round(v, 4) for k, v in r.items() if k not in ("depth", "threshold", "best")}
            entry["recall_by_direction"] = {label: round(rows[i]["recall"], 4) for label, rows in by_dir.items()}
            results[name].setdefault(str(r["depth"]), {})[selection_key(r)] = entry
            table.append(fmt_row(name, r, "   " + "  ".join(f"{rows[i]['recall']:.3f}" for rows in by_dir.values())))
        steps_total = general.num_steps + coding.num_steps
        print(f"  replayed {name:<20} {elapsed:6.1f} s ({elapsed / (steps_total * len(seeds) * shape.num_layers) * 1e6:.0f} us per layer-step)",
              file=sys.stderr)
    bar.close()
    print(HEADER + f"   recall {' '.join(label for label, _, _ in directions)}")
    print("\n".join(table))

    return {"source": f"real routing: decode traces {where}", "steps": general.num_steps + coding.num_steps,
            "predictors": results}


# ---------------------------------------------------------------- part 2: generated checkpoints


def generated(family: str, seeds: Sequence[int], tokens: int) -> dict:
    from mlx_lm.utils import load

    from golem.runtime.analysis.capture import LAYER_INPUT_ARRAY, record_generation
    from golem.runtime.synthetic import Size, build_checkpoint, default_cache_dir

    size = Size(hidden=256, layers=10, experts=32, top_k=4, expert_hidden=128, vocab=384, group_size=32)
    print(f"\n== Part 2: GENERATED CHECKPOINTS (random weights, golem.runtime.synthetic {family}: "
          f"{size.layers} layers, top-{size.top_k} of {size.experts}, hidden {size.hidden}); "
          f"median over seeds {list(seeds)} ==")
    print(f"hidden states recorded while stock mlx-lm greedy-decodes {len(PROMPTS) // 2} prompts x {tokens} tokens; "
          f"probe and transition trained on {len(PROMPTS) - len(PROMPTS) // 2} other prompts of the same model")
    runs: Dict[str, List[List[Accuracy]]] = {}
    for seed in seeds:
        t0 = time.perf_counter()
        path = build_checkpoint(family, default_cache_dir() / f"bench-predictors-{family}-s{seed}", size=size, seed=seed)
        model, tokenizer = load(str(path))
        half = len(PROMPTS) // 2
        test, extras = record_generation(model, tokenizer, PROMPTS[:half], max_tokens=tokens)
        train, _ = record_generation(model, tokenizer, PROMPTS[half:], max_tokens=tokens)
        blocks = find_moe_blocks(model)
        shape = RoutingShape.of(test)
        hidden = {"post_attn": test.hidden, "layer_input": extras[LAYER_INPUT_ARRAY]}
        print(f"  seed {seed}: built and captured {test.num_steps + train.num_steps} steps in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        makers = {
            "random": (lambda: make_predictor("random", shape, PredictorOptions(seed=seed)), None),
            "lookahead/layer_input": (lambda: make_predictor(
                "lookahead", shape, PredictorOptions(blocks=blocks, hidden_kind="layer_input")), hidden["layer_input"]),
            "lookahead/post_attn": (lambda: make_predictor(
                "lookahead", shape, PredictorOptions(blocks=blocks, hidden_kind="post_attn")), hidden["post_attn"]),
            "transition": (lambda: make_predictor("transition", shape).fit([train]), None),
            "probe/post_attn": (lambda: make_predictor("probe", shape).fit([train]), hidden["post_attn"]),
            "oracle": (lambda: make_predictor("oracle", shape, PredictorOptions(truth=test)), None),
        }
        for name, (make, h) in makers.items():
            runs.setdefault(name, []).append(
                replay(test, make(), depth=max(DEPTHS), thresholds=THRESHOLDS, hidden=h, best=shape.top_k))
    results: Dict[str, dict] = {}
    print(HEADER)
    for name, r in runs.items():
        rows = median_rows(r)
        results[name] = {}
        for row in rows:
            print(fmt_row(name, row))
            results[name].setdefault(str(row["depth"]), {})[selection_key(row)] = {
                k: round(v, 4) for k, v in row.items() if k not in ("depth", "threshold", "best")
            }
    return {"source": f"generated checkpoints ({family}, random weights)", "seeds": list(seeds),
            "predictors": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_trace_arguments(ap)
    ap.add_argument("--steps-per-domain", type=int, default=3200,
                    help="Decode steps of each OLMoE domain replayed (whole sequences; 12800 = all).")
    ap.add_argument("--seeds", type=int, default=3, help="Generated checkpoints (seeds) for part 2.")
    ap.add_argument("--family", default="olmoe", help="Family of the generated checkpoints (default olmoe).")
    ap.add_argument("--tokens", type=int, default=40, help="Decode tokens per prompt in part 2.")
    args = ap.parse_args()
    traces = load_two_traces(args, "bench_predictors")
    t0 = time.perf_counter()
    real = real_routing(traces, args.steps_per_domain)
    gen = generated(args.family, range(args.seeds), args.tokens)
    print("\n== Summary: covered recall (layers >= depth), [real] = OLMoE routing, [generated] = random-weight "
          "checkpoints, [published] = others' figures on real checkpoints, not measured here ==")
    print(f"{'predictor':<34} {'depth':>5} {'top-k':>7} {'@0.3':>7} {'pred/layer@0.3':>15} {'wasted/useful@0.3':>18}")
    picks = [("real", real, n) for n in ("random", "previous", "transition/frozen", "transition", "transition+previous")]
    picks += [("generated", gen, n) for n in ("random", "lookahead/layer_input", "lookahead/post_attn", "probe/post_attn")]
    for tag, part, name in picks:
        for d in ("1", "2"):
            by = part["predictors"][name][d]
            topk = next(v for k, v in by.items() if k.startswith("top"))
            at = by["0.3"]
            w = at["wasted_per_useful"]
            print(f"{'[' + tag + '] ' + name:<34} {d:>5} {topk['recall_covered']:>7.3f} {at['recall_covered']:>7.3f} "
                  f"{at['predicted_per_layer']:>15.2f} {'inf' if w is None else f'{w:.2f}':>18}")
    print(f"{'[published] lookahead OLMoE':<34} {1:>5} {REFERENCE['olmoe_1_ahead']:>7.2f}")
    print(f"{'[published] lookahead GLM-5':<34} {1:>5} {REFERENCE['glm5_1_ahead']:>7.2f}")
    print(f"{'[published] lookahead Qwen3-class':<34} {1:>5} {REFERENCE['qwen3_1_ahead']:>7.2f}")
    print(f"{'[published] linear probe OLMoE':<34} {2:>5} {REFERENCE['olmoe_2_ahead_trained_linear_probe']:>7.2f}")
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(json.dumps({"real_routing": real, "generated": gen, "reference": REFERENCE,
                      "depths": list(DEPTHS), "thresholds": list(THRESHOLDS)}))


if __name__ == "__main__":
    main()
