"""`golem-trace simulate`: replay traces through a policy, a memory plan and a warm start.

Parses the same cache flags as golem-run (``-c``, ``--cache-size-override``, ``-f``,
``--memory-budget``, ``-W``, ``-R``, ``--policy``), builds the plan with
``golem.runtime.analysis.plan``, replays with ``golem.runtime.analysis.simulate`` and prints per-layer and
total hit rates beside Belady's bound. The replay itself lives in ``golem.runtime.analysis.simulate``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from golem.runtime.analysis.model_size import ModelMemory
from golem.runtime.analysis.plan import RoutingStats, plan_memory
from golem.runtime.analysis.profile import Profile, load_warm_source, random_warm_start
from golem.runtime.analysis.simulate import belady, simulate
from golem.runtime.cli.progress import progress_bar
from golem.runtime.config import check_cache_sizes
from golem.runtime.policies import DEFAULT_POLICY, policy_names
from golem.runtime.trace import load_traces, require_steps
from golem.runtime.units import parse_layer_ranges, parse_override, parse_size


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate",
        help="Replay traces through per-layer expert caches; report hit rates and Belady's bound.",
        description="Replay golem-trace/1 traces, in order, through one expert cache per MoE layer "
                    "(caches persist across sequences and traces). Reports hits, misses (demand reads) "
                    "and the offline optimum (Belady: evict the expert used farthest in the future).",
    )
    p.add_argument("traces", nargs="+", metavar="TRACE", help="Trace files or folders of traces, replayed in order.")
    p.add_argument("--policy", default=DEFAULT_POLICY,
                   help=f"Eviction policy: {', '.join(policy_names())}, with parameters as name:key=value "
                        f"(e.g. lfu-decay:decay=0.9). Default {DEFAULT_POLICY}, as golem-run.")
    p.add_argument("-c", "--capacity", "--cache-size", dest="cache_size", type=int, default=None,
                   help="Slots per MoE layer (default: half the experts, unless another sizing flag is given).")
    p.add_argument("--cache-size-override", nargs=2, action="append", default=[], metavar=("RANGES", "N"),
                   help="N slots for the layers in RANGES (e.g. 0-3,12 48); repeatable, later ones win.")
    p.add_argument("-f", "--pin-layers", default=None, metavar="RANGES",
                   help="Fully resident layers (no misses), e.g. 0-3,14-15: the model's layer numbers when the "
                        "trace records them (meta moe_layers, as golem-run -f), else the traced layers.")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="Plan slots within SIZE (e.g. 8GB) for non-expert bytes plus expert slots.")
    p.add_argument("--non-expert-bytes", default="0", metavar="SIZE",
                   help="Bytes of the always-resident weights the budget must hold (default 0).")
    p.add_argument("--expert-bytes", default=None, metavar="SIZE",
                   help="Bytes of one expert (default: the trace's meta expert_bytes).")
    p.add_argument("--plan-stats", default=None, metavar="PATH",
                   help="Routing statistics for --memory-budget: traces (miss curves of --policy) or a "
                        "profile (its curves of --policy, else LRU's). Default: the -W source if given, "
                        "else a uniform plan.")
    warm = p.add_mutually_exclusive_group()
    warm.add_argument("-W", "--warm-start", default=None, metavar="PATH",
                      help="Start with each layer's most used experts from a trace, a folder of traces or a profile.")
    warm.add_argument("-R", "--warm-random", type=int, default=None, metavar="SEED",
                      help="Start with random experts (seeded).")
    p.add_argument("--prefetch-recall", type=float, default=0.0,
                   help="Share of misses a prefetcher hides (each miss, with this probability). Default 0.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the prefetch draws.")
    p.add_argument("--include-prefill", action="store_true", help="Replay prefill steps too.")
    p.add_argument("--no-belady", action="store_true", help="Skip the Belady bound (it costs about one replay).")
    p.add_argument("--json", action="store_true", help="Print one JSON object as the last line.")
    p.set_defaults(func=run)
    return p


def _model(args, meta: dict) -> ModelMemory:
    if args.expert_bytes is not None:
        nbytes = parse_size(args.expert_bytes, what="--expert-bytes")
    else:
        nbytes = int(meta.get("expert_bytes") or 0)
    if nbytes <= 0:
        if args.memory_budget is not None:
            raise ValueError("--memory-budget: the trace records no expert_bytes; give --expert-bytes SIZE")
        nbytes = 1  # only shown, never used for sizing
    return ModelMemory(int(meta["num_layers"]), int(meta["num_experts"]), int(meta["top_k"]), nbytes,
                       parse_size(args.non_expert_bytes, what="--non-expert-bytes"),
                       layer_ids=meta.get("moe_layers"))  # -f and overrides name model layers, as golem-run


def _stats(args, warm_profile, policy: str):
    source = args.plan_stats or args.warm_start
    if args.memory_budget is None or source is None:
        return None
    path = Path(source)
    if path.suffix == ".npz" or (path.is_dir() and any(path.glob("*.npz"))):
        return RoutingStats.from_traces(load_traces([path], hidden=False, weights=False), policy=policy)
    profile = warm_profile if source == args.warm_start and warm_profile is not None else load_warm_source(path)
    return RoutingStats.from_profile(profile, policy=policy, source=str(source))


def run(args) -> int:
    """The simulation's steps: the traces and the model, the memory plan, the warm start, the
    replay (and Belady's bound), then the table and the JSON object."""
    traces = load_traces(args.traces, hidden=False, weights=False)
    steps = require_steps(traces, decode_only=not args.include_prefill)
    model = _model(args, traces[0].meta)
    warm_profile: Profile | None = None
    if args.warm_start is not None:
        warm_profile = load_warm_source(args.warm_start)
        warm_profile.check_shape(model.num_layers, model.num_experts, where=f"-W {args.warm_start}",
                                 other="the trace")
    plan = _memory_plan(args, model, warm_profile)
    sizes, pinned = plan.cache_sizes, plan.pinned_positions
    warm, warm_name = _warm_start(args, model, warm_profile, sizes, pinned)
    kw = dict(pinned=pinned, warm=warm, decode_only=not args.include_prefill)
    layers = model.num_layers
    with progress_bar(layers * (1 if args.no_belady else 2), "simulate", work=steps * layers) as bar:
        result = simulate(traces, policy=args.policy, cache_size=sizes, prefetch_recall=args.prefetch_recall,
                          seed=args.seed, progress=bar.update, **kw)
        bound = None if args.no_belady else belady(traces, sizes, progress=bar.update, **kw)
    if args.memory_budget is not None:
        print(plan.describe())
        print()
    print(f"{len(traces)} trace(s), {result.num_steps} steps; policy {args.policy}; warm start {warm_name}"
          + (f"; prefetch recall {args.prefetch_recall:g}" if args.prefetch_recall else ""))
    _print_table(args, model, result, bound, sizes, pinned)
    if args.json:
        print(json.dumps(_json_object(args, model, traces, plan, result, bound, warm_name)))
    return 0


def _memory_plan(args, model, warm_profile):
    """The cache size of each layer from the sizing flags (half the experts, at least top-k,
    when none is given)."""
    e, k = model.num_experts, model.top_k
    cache_size = args.cache_size
    overrides = [parse_override(v, num_layers=max(model.ids) + 1) for v in args.cache_size_override]
    check_cache_sizes(cache_size, overrides, e, whose="the trace's layers")
    sizing = (args.cache_size, args.memory_budget, args.pin_layers, args.cache_size_override)
    if all(x in (None, []) for x in sizing):
        cache_size = max(k, e // 2)
    return plan_memory(
        model,
        budget_nbytes=parse_size(args.memory_budget, "--memory-budget") if args.memory_budget is not None else None,
        cache_size=cache_size,
        overrides=overrides,
        pin_layers=[] if args.pin_layers is None else parse_layer_ranges(args.pin_layers, num_layers=max(model.ids) + 1),
        stats=_stats(args, warm_profile, args.policy),
    )


def _warm_start(args, model, warm_profile, sizes, pinned) -> tuple:
    """The slots' contents before the first step (``-W`` profile, ``--warm-random`` or empty) and its name."""
    if warm_profile is not None:
        return warm_profile.warm_start(sizes, pinned), str(args.warm_start)
    if args.warm_random is not None:
        return (random_warm_start(args.warm_random, model.num_layers, model.num_experts, sizes, pinned),
                f"random:{args.warm_random}")
    return None, "empty"


def _print_table(args, model, result, bound, sizes, pinned) -> None:
    """One row per layer (the checkpoint's layer numbers, as golem-run's table), then the total."""
    head = f"{'layer':>5}  {'slots':>7}  {'requests':>9}  {'hit':>7}  {'miss':>7}"
    head += f"  {'prefetched':>10}" if args.prefetch_recall else ""
    head += f"  {'belady miss':>11}" if bound is not None else ""
    print(head)

    def line(label, slots, req, hits, misses, pre, bmiss):
        req = max(req, 1)
        s = f"{label:>5}  {slots:>7}  {req:>9}  {100 * hits / req:>6.2f}%  {100 * misses / req:>6.2f}%"
        s += f"  {100 * pre / req:>9.2f}%" if args.prefetch_recall else ""
        s += f"  {100 * bmiss / req:>10.2f}%" if bound is not None else ""
        return s

    e = model.num_experts
    numbers = model.ids  # the checkpoint's layer numbers (trace meta moe_layers), as golem-run's table
    for position in range(result.num_layers):
        slots = "pinned" if position in pinned else f"{sizes[position]}/{e}"
        print(line(numbers[position], slots, int(result.requests[position]), int(result.hits[position]),
                   int(result.misses[position]), int(result.prefetched[position]),
                   int(bound.misses[position]) if bound is not None else 0))
    print(line("all", sum(sizes), result.total_requests, result.total_hits, result.total_misses,
               result.total_prefetched, bound.total_misses if bound is not None else 0))
    print(f"misses per token {result.total_misses / max(result.num_steps, 1):.2f}"
          + (f" (Belady {bound.total_misses / max(bound.num_steps, 1):.2f})" if bound is not None else ""))


def _json_object(args, model, traces, plan, result, bound, warm_name: str) -> dict:
    """``--json``'s object: the result per layer (checkpoint layer numbers), Belady's bound, the plan."""
    numbers = model.ids
    out = result.to_dict(per_layer=True)
    out["pinned_layers"] = [numbers[i] for i in out["pinned_layers"]]
    for row in out["per_layer"]:
        row["layer"] = numbers[row["layer"]]
    out.update({
        "traces": [t.path for t in traces],
        "warm_start": warm_name,
        "prefetch_recall": args.prefetch_recall,
        "belady_misses": bound.total_misses if bound is not None else None,
        "belady_miss_ratio": round(bound.miss_ratio, 6) if bound is not None else None,
    })
    if bound is not None:
        for row, b in zip(out["per_layer"], bound.misses):
            row["belady_misses"] = int(b)
    if args.memory_budget is not None:
        out["plan"] = plan.to_dict()
    return out
