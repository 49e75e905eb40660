"""What does the prefetcher's host work cost per decode layer on a quiet core?

On this CPU a layer's host work runs beside the layer's own computation on the same cores,
which inflates every host microsecond several times over (profile_decode's CPU column); on
a GPU the host core is quiet while the device computes. This replays, on a quiet thread,
the prefetcher's parts of a real decode at fixed depth 2 (bench_decode's checkpoint and
prompts): the proposals the engine made are captured, then each part is timed alone over
them, many times, alternating with its earlier shapes: the predictor's rank-calibrated scores
(ranks sorted on the device in the layer's sync and only looked up here, against Python's
sort of each row on the engine's thread, against two numpy argsorts and a lookup per row,
which let the interpreter lock go, and against ranks scattered and every row looked up in
one fancy index)
and the selection of candidates (``Prefetcher.candidates``, against ``Selection.mask`` and ``Selection.ordered``
over the whole score array).
Medians over --rounds, then one JSON line.

    python benchmarks/bench_prefetch_host.py [--shape qwen3-30b-a3b-host] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_decode  # noqa: E402
from bench_switches import _numpy_scores  # noqa: E402


def mask_then_order(pf, proposal, resident):
    """The earlier selection: numpy masks over every (target, expert), then one lexsort."""
    scores = pf.predictor.scores(proposal)
    n, selection, layers = len(pf.moe_layers), pf.selection, pf.moe_layers
    targets = list(proposal.targets)
    guessed = selection.mask(scores, None)
    for r, t in enumerate(targets):
        (pf._predicted if t < n else pf._predicted_next).setdefault(t % n, set()).update(
            np.flatnonzero(guessed[r]).tolist())
    exclude = np.ones(scores.shape, dtype=bool)
    for r, t in enumerate(targets):
        pos = t % n
        if pf.wanted[pos] and pf.stats[layers[pos]].enabled:
            exclude[r] = resident(layers[pos])
    keep = guessed & ~exclude if selection.limit is None else selection.mask(scores, exclude)
    if not keep.any():
        return []
    rows, experts = selection.ordered(scores, keep)
    return [(layers[targets[r] % n], e, sc) for r, e, sc in zip(rows.tolist(), experts.tolist(),
                                                                 scores[rows, experts].tolist())]


def fancy_index_scores(predictor, proposal):
    """The earlier rank calibration: ranks scattered, every row looked up in one fancy index."""
    raw = predictor.raw_scores(proposal)
    rows = np.arange(raw.shape[0])[:, None]
    rank = np.empty(raw.shape, np.int64)
    rank[rows, np.argsort(-raw, axis=1, kind="stable")] = np.arange(raw.shape[1])
    t = np.asarray(proposal.targets)
    d = np.minimum(np.asarray(proposal.offsets), predictor.max_depth)
    out = predictor.hits[t[:, None], d[:, None], rank] / predictor.seen[t, d][:, None]
    made = ~np.isnan(raw).all(axis=1)
    out[~made] = 0.0
    if predictor.online:
        predictor._pending[t[made], d[made]] = rank[made]
    return out.astype(np.float32)


def per_call_us(fn, items, repeat: int) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        for item in items:
            fn(item)
    return 1e6 * (time.perf_counter() - t) / (repeat * len(items))


def main() -> None:
    from golem.predictors.base import Proposal
    from golem.runtime import load
    from golem.runtime.prefetch import PrefetchConfig
    from golem.runtime.synthetic import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b-host", choices=tuple(bench_decode.SHAPES))
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=20, help="passes over the captured calls per round")
    ap.add_argument("--dir", type=Path, default=default_cache_dir())
    args = ap.parse_args()

    setup = bench_decode.Setup(args.shape, args.dir, args.tokens, None)
    prefetch = PrefetchConfig(depth=2, threshold=setup.threshold, governor=False)
    proposals = []
    with load(str(setup.path), cache_sizes=setup.cache_size, prefetch=prefetch) as (model, _):
        engine, pf = model.golem.engine, model.golem.engine.prefetcher
        candidates = pf.candidates

        def capturing(proposal, resident):
            proposals.append(proposal)
            return candidates(proposal, resident)

        pf.candidates = capturing
        _, _, outs = bench_decode.decode(model, setup.prompts, args.tokens)
        pf.candidates = candidates
        proposals = [p for p in proposals if p.arrays]
        resident = engine._resident
        same = all(pf.candidates(p, resident) == mask_then_order(pf, p, resident) for p in proposals)
        same = same and all(np.array_equal(pf.predictor.scores(p), fancy_index_scores(pf.predictor, p))
                            and np.array_equal(pf.predictor.scores(p), _numpy_scores(pf.predictor, p)) for p in proposals)
        unranked = [Proposal(p.position, p.targets, p.arrays[:1]) for p in proposals]  # raw rows only
        same = same and all(np.array_equal(pf.predictor.scores(p), pf.predictor.scores(u))
                            for p, u in zip(proposals, unranked))
        parts = {
            "scores": (lambda p: pf.predictor.scores(p), proposals),
            "scores, Python sort": (lambda p: pf.predictor.scores(p), unranked),
            "scores, numpy argsorts": (lambda p: _numpy_scores(pf.predictor, p), proposals),
            "scores, one fancy index": (lambda p: fancy_index_scores(pf.predictor, p), proposals),
            "candidates": (lambda p: pf.candidates(p, resident), proposals),
            "candidates, mask then order": (lambda p: mask_then_order(pf, p, resident), proposals),
        }
        times = {name: [] for name in parts}
        for r in range(args.rounds):
            for name in (parts if r % 2 == 0 else reversed(list(parts))):
                fn, items = parts[name]
                times[name].append(per_call_us(fn, items, args.repeat))
    med = {name: statistics.median(v) for name, v in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times["candidates"], times["candidates, mask then order"]))
    scores_ratio = statistics.median(a / b for a, b in zip(times["scores"], times["scores, one fancy index"]))
    argsort_ratio = statistics.median(a / b for a, b in zip(times["scores"], times["scores, numpy argsorts"]))
    sort_ratio = statistics.median(a / b for a, b in zip(times["scores"], times["scores, Python sort"]))
    print(f"{setup.path.name}: prefetcher host work on a quiet thread, depth 2, {len(proposals)} proposals "
          f"captured from {len(setup.prompts)} prompts x {args.tokens} tokens; us per call, medians of {args.rounds} rounds")
    print(f"{'part':<30}{'us per call':>12}")
    for name, us in med.items():
        print(f"{name:<30}{us:>12.1f}")
    print(f"candidates / mask then order: {ratio:.3f}x, scores / one fancy index: {scores_ratio:.3f}x, scores / "
          f"numpy argsorts: {argsort_ratio:.3f}x, scores / Python sort: {sort_ratio:.3f}x (paired by round); same results: {same}; tokens as stock: "
          f"{outs == setup.truth_outputs}")
    out = {"shape": args.shape, "rounds": args.rounds, "proposals": len(proposals), "same_results": same,
           "candidates_over_mask_then_order": ratio, "scores_over_one_fancy_index": scores_ratio,
           "scores_over_numpy_argsorts": argsort_ratio, "scores_over_python_sort": sort_ratio}
    out.update({name.replace(", ", "_").replace(" ", "_") + "_us": us for name, us in med.items()})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
