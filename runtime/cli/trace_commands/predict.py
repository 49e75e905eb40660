"""`golem-trace predict`: replay traces through a predictor and report how well it guesses.

Parses flags, loads the test and training traces (and, for router lookahead, the model's
routers and the trace's recorded hidden states), replays every test trace's decode steps
through a fresh predictor and prints recall, precision, predicted experts per layer and
wasted bytes per useful byte, per depth and threshold. Predictors and metrics live in
``golem.predictors``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import numpy as np

from golem.predictors.base import RoutingShape
from golem.predictors.history import COMBINE_RULES
from golem.predictors.lookahead import HIDDEN_KINDS
from golem.predictors.metrics import Accuracy, merge_accuracies, replay
from golem.predictors.registry import TRAINABLE, PredictorOptions, make_predictor, predictor_names

from golem.runtime.analysis.capture import LAYER_INPUT_ARRAY, load_extras
from golem.runtime.cli.progress import progress_bar
from golem.runtime.trace import Trace, load_traces, require_steps


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict",
        help="Measure how well a predictor guesses the next layers' experts.",
        description="Replay golem-trace/1 traces through a predictor. Recall at depth d: the share of "
                    "the true experts of layer l that were predicted at layer l-d of the same step.",
    )
    p.add_argument("traces", nargs="*", metavar="TRACE", help="Traces (files or folders) to replay.")
    p.add_argument("--list", action="store_true", help="Print the predictor names, space-separated, and exit.")
    p.add_argument("--predictor", default="transition", help="Predictor name, or a+b for a combination (see --list).")
    p.add_argument("--train", nargs="+", default=None, metavar="TRACE",
                   help=f"Traces that trained predictors ({', '.join(TRAINABLE)}) learn from first.")
    p.add_argument("--depth", type=int, default=2,
                   help="Report depths 1..DEPTH (0: the layer's own routing, a sanity check). Default 2.")
    p.add_argument("--threshold", type=float, nargs="+", default=[0.1, 0.3, 0.5],
                   help="Minimum score(s) (estimated probability of use). Default 0.1 0.3 0.5.")
    p.add_argument("--best", type=int, default=None, metavar="K",
                   help="Also report recall when the K best-scored experts of each target layer are taken "
                        "(how published figures count; e.g. the model's top-k).")
    p.add_argument("--max-experts", type=int, default=None, help="Cap on candidates per prediction (count).")
    p.add_argument("--max-bytes", default=None, help="Cap on candidate bytes per prediction, e.g. 256MiB.")
    p.add_argument("--model", default=None, help="Model folder whose routers lookahead applies (lookahead only).")
    p.add_argument("--hidden-kind", choices=HIDDEN_KINDS, default="post_attn",
                   help="Residual fed to lookahead: after attention (post_attn) or entering the layer.")
    p.add_argument("--frozen", action="store_true",
                   help="Do not learn from the replayed trace (trained tables and calibration stay as fitted).")
    p.add_argument("--combine", choices=COMBINE_RULES, default="max", help="How a+b merges scores (default max).")
    p.add_argument("--recall", type=float, default=0.8, help="noisy-oracle: requested recall (default 0.8).")
    p.add_argument("--false-positive-rate", type=float, default=0.0,
                   help="noisy-oracle: share of unused experts named (default 0).")
    p.add_argument("--seed", type=int, default=0, help="Random seed (noisy-oracle, random).")
    p.add_argument("--json", action="store_true", help="Print one JSON object as the last line.")
    p.set_defaults(func=run)
    return p


def _load_blocks(model_dir: Optional[str]):
    if model_dir is None:
        raise ValueError("--predictor lookahead needs --model DIR (the model whose routers to apply)")
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {model_dir}: no config.json there")
    from mlx_lm.utils import load_model

    from golem.predictors.routers import find_moe_blocks

    model, _ = load_model(path, lazy=True)  # only norms and routers are ever evaluated
    return find_moe_blocks(model)


def _hidden(trace: Trace, kind: str, predictor: str) -> np.ndarray:
    recorded = trace.meta.get("hidden_kind", "post_attn")
    if trace.hidden is not None and recorded == kind:
        arr = trace.hidden
    else:
        name = LAYER_INPUT_ARRAY if kind == "layer_input" else "hidden"
        extras = load_extras(trace.path, (name,)) if trace.path else {}
        if name not in extras:
            raise ValueError(
                f"{trace.path}: predictor {predictor!r} needs {kind} hidden states, which this trace does not "
                "record (golem-run --trace-out FILE --trace-hidden, or golem.runtime.analysis.capture)"
            )
        arr = extras[name]
    if trace.prefill is not None and trace.prefill.any():
        arr = arr[~trace.prefill]
    return arr


def _for_training(trace: Trace, kind: str, with_hidden: bool) -> Trace:
    """Decode steps of a training trace; with its ``kind`` hidden states as ``hidden``."""
    decode = trace.decode_only()
    if not with_hidden:
        return decode
    return replace(decode, hidden=_hidden(trace, kind, "probe"), meta={**decode.meta, "hidden_kind": kind})


def _fmt(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.3f}"


def run(args) -> int:
    if args.list:
        print(" ".join(predictor_names()))
        return 0
    if not args.traces:
        raise ValueError("give at least one TRACE to replay (or --list)")
    if args.depth < 0:
        raise ValueError(f"--depth must be >= 0, got {args.depth}")
    for th in args.threshold:
        if not 0.0 <= th <= 1.0:
            raise ValueError(f"--threshold must be within [0, 1], got {th}")
    parts = args.predictor.split("+")
    known = set(predictor_names())
    if not all(p in known for p in parts):
        raise ValueError(f"unknown predictor {args.predictor!r}; choose from: {' '.join(predictor_names())}")
    max_nbytes = None
    if args.max_bytes is not None:
        from golem.runtime.units import parse_size

        max_nbytes = parse_size(args.max_bytes, "--max-bytes")

    tests = load_traces(args.traces, hidden=any(p in ("lookahead", "probe") for p in parts))
    require_steps(tests)
    train = [_for_training(t, args.hidden_kind, "probe" in parts) for t in load_traces(args.train)] if args.train else []
    blocks = _load_blocks(args.model) if "lookahead" in parts else None
    shape = RoutingShape.of(tests[0])
    if args.depth >= shape.num_layers:
        raise ValueError(f"--depth {args.depth}: the traces have {shape.num_layers} MoE layers, "
                         f"so a prediction reaches at most {shape.num_layers - 1} layers ahead")
    for t in [*tests[1:], *train]:
        if RoutingShape.of(t) != shape:
            raise ValueError(f"{t.path}: routing shape {RoutingShape.of(t)} differs from {tests[0].path}'s {shape}")
    nbytes = tests[0].expert_bytes
    if max_nbytes is not None and nbytes <= 0:
        raise ValueError(f"{tests[0].path}: meta has no expert_bytes, so --max-bytes cannot apply")

    depth, nearest = (0, 0) if args.depth == 0 else (args.depth, 1)
    results: List[List[Accuracy]] = []
    work = sum(t.num_steps for t in tests) * shape.num_layers * max(1, args.depth)
    bar = progress_bar(len(tests), "predict", work=work)
    for test in tests:
        decode = test.decode_only()
        options = PredictorOptions(
            truth=decode, blocks=blocks, hidden_kind=args.hidden_kind, online=not args.frozen,
            recall=args.recall, false_positive_rate=args.false_positive_rate, seed=args.seed, combine=args.combine,
        )
        predictor = make_predictor(args.predictor, shape, options)
        if train:
            predictor.fit(train)
        hidden = _hidden(test, args.hidden_kind, args.predictor) if predictor.needs_hidden else None
        results.append(
            replay(decode, predictor, depth=depth, nearest=nearest, thresholds=args.threshold, hidden=hidden,
                   max_experts=args.max_experts, max_nbytes=max_nbytes, expert_nbytes=nbytes, best=args.best)
        )
        bar.update(1)
    bar.close()
    rows = merge_accuracies(results)

    steps = rows[0].steps
    learned = [] if not train else [f"trained on {', '.join(Path(t.path or '?').name for t in train)}"]
    learned.append("frozen" if args.frozen else "learning online")
    print(f"predictor {args.predictor} ({'; '.join(learned)}); {len(tests)} trace(s), {steps} decode steps, "
          f"{shape.num_layers} MoE layers, top-{shape.top_k} of {shape.num_experts}"
          + (f", {nbytes / 2**20:.2f} MiB per expert" if nbytes else ""))
    print(f"{'depth':>5} {'thresh':>6} {'recall':>7} {'covered':>7} {'precision':>9} {'pred/layer':>10} "
          f"{'wasted/useful':>13} {'wasted MiB/token':>16}")
    for r in rows:
        sel = f"top{r.best}" if r.best else f"{r.threshold:.2f}"
        print(f"{r.depth:>5} {sel:>6} {r.recall:>7.3f} {r.recall_covered:>7.3f} {r.precision:>9.3f} "
              f"{r.predicted_per_layer:>10.2f} {_fmt(r.wasted_per_useful):>13} {r.wasted_nbytes_per_step / 2**20:>16.2f}")
    print("recall: true experts predicted at layer l-depth of the same step / all true experts; "
          "covered: the same over layers >= depth")
    if args.json:
        head = next(r for r in rows if r.depth == args.depth and r.best is None
                    and r.threshold == float(args.threshold[0]))
        out = {**head.as_dict(), "predictor": args.predictor, "traces": [t.path for t in tests],
               "train": [t.path for t in train], "online": not args.frozen,
               "rows": [r.as_dict() for r in rows]}
        print(json.dumps(out))
    return 0
