"""`golem-trace estimate`: decode speed of a model on a machine, from routing statistics.

Parses flags, loads the model, machine and traces, prints the placement and both estimators
(chunk formula, trace replay), optionally a sweep over memory sizes and its PNG chart. The
arithmetic lives in ``golem.runtime.analysis.estimate``.
"""

from __future__ import annotations

import argparse
import json
import sys

import re
from pathlib import Path
from typing import NamedTuple, Optional

from golem.runtime.analysis.chunks import chunk_analysis
from golem.runtime.analysis.estimate import (
    PLANS,
    ChunkRouting,
    Report,
    TraceReplay,
    default_sweep_sizes,
    distinct_per_layer,
    estimate,
    memory_sweep,
    plot_sweep,
)
from golem.runtime.analysis.machines import load_machine
from golem.runtime.analysis.model_size import ModelSpec, Quantization, load_model_spec
from golem.runtime.analysis.placement import routing_stats_for
from golem.runtime.cli.progress import progress_bar
from golem.runtime.cli.about import PLOT_EXTRA_HINT
from golem.runtime.policies import DEFAULT_POLICY, policy_names
from golem.runtime.trace import load_traces, require_steps
from golem.runtime.units import GiB, format_layer_ranges, parse_layer_ranges, parse_size


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "estimate",
        help="Estimate decode tokens/s of a model on a machine.",
        description="Estimate decode speed: where the experts live, time per token (compute, memory, "
                    "SSD) by the chunk formula (U, D) and by replaying traces through the cache simulator.",
    )
    p.add_argument("--model", required=True,
                   help="Built-in model (glm-5, glm-4.6, deepseek-v3, qwen3-235b-a22b, qwen3-30b-a3b, "
                        "minimax-m2, olmoe-1b-7b), a config.json, or a folder holding one.")
    p.add_argument("--machine", required=True,
                   help="Built-in profile (rtx3090-128g, p40x3-288g, m3-max-128g, ...) or a machine JSON file.")
    p.add_argument("--bits", default="IQ4_XS", help="Format or bits per weight of every tensor (default IQ4_XS).")
    p.add_argument("--expert-bits", default=None,
                   help="Routed experts: one format, or per matrix, e.g. gate=IQ3_S,up=IQ3_S,down=IQ4_XS.")
    p.add_argument("--non-expert-bits", default=None, help="Attention, dense and shared MLPs, embeddings, head.")
    p.add_argument("--trace", nargs="+", default=None, metavar="TRACE",
                   help="golem-trace/1 files or folders: U and D for the chunk formula, and the trace replay.")
    p.add_argument("--u", type=float, default=None, help="Experts a chunk needs (instead of a trace).")
    p.add_argument("--d", type=float, default=None, help="Experts of a chunk new against the previous chunk.")
    p.add_argument("--chunk", type=int, default=128, help="Tokens per chunk (default 128).")
    p.add_argument("--coverage", type=float, default=1.0, help="Coverage threshold of U and D (default 1.0).")
    p.add_argument("--ram", default=None, help="Override the cache tier's size (RAM, or unified memory), e.g. 256GiB.")
    p.add_argument("--ssd-gb-per-s", type=float, default=None, help="Override the SSD read rate (GB/s).")
    p.add_argument("-f", "--pin-layers", default=None, metavar="RANGES",
                   help="Decoder layers kept fully resident in the cache tier, as golem-run -f (e.g. 3-6,60).")
    p.add_argument("--plan", choices=PLANS, default="uniform",
                   help="Cache slots per layer: evenly (golem-run --memory-budget), weighted by distinct experts "
                        "per chunk, or by the traces' miss curves (golem-run --memory-budget -W TRACE); the last "
                        "two need a trace.")
    p.add_argument("--policy", default=DEFAULT_POLICY,
                   help=f"Eviction policy for the trace replay and --plan curves ({', '.join(policy_names())}; "
                        f"default {DEFAULT_POLICY}, as golem-run; lru replays fastest).")
    p.add_argument("--prefetch-recall", type=float, default=0.0,
                   help="Fraction of misses a predictor reads ahead in time (trace replay).")
    p.add_argument("--sweep", action="store_true", help="Also estimate over memory sizes from 0 to all experts.")
    p.add_argument("--points", type=int, default=17, help="Memory sizes in the sweep (default 17).")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="Write the sweep as a PNG chart (implies --sweep; needs matplotlib).")
    p.add_argument("--machines", type=int, default=1, metavar="N",
                   help="Split the model across N such machines (golem-run --pipeline): the time of each stage, "
                        "the link, and the split with the least time per token.")
    p.add_argument("--link", default="10,50us", metavar="GB_PER_S[,LATENCY]",
                   help="The network between the machines (default 10,50us: 10 GB/s, 50 us a message).")
    p.add_argument("--split", default="best", metavar="SPLIT",
                   help="With --machines: 'best' (default: search for the fastest), 'even' (mlx-lm's), or layers "
                        "per rank in rank order (rank 0 runs the last layers), e.g. 40,52.")
    p.add_argument("--json", action="store_true", help="Print one JSON object as the last line.")
    p.set_defaults(func=run)
    return p


def _gib(n: float) -> str:
    if n >= GiB or n == 0:
        return f"{n / GiB:.1f} GiB"
    return f"{n / 2**20:.1f} MiB"


def _params(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _print_report(rep: Report) -> None:
    m, q, mach, pl = rep.model, rep.quant, rep.machine, rep.placement
    print(f"model {m.name} ({m.model_type}): {m.num_moe_layers} MoE layers x {m.num_experts} experts, "
          f"top-{m.top_k}; {_params(m.total_params)} parameters, {_params(m.active_params)} active")
    print(f"bits: expert gate/up/down {q.gate_bpw:g}/{q.up_bpw:g}/{q.down_bpw:g} -> "
          f"{pl.expert_nbytes / 2**20:.3f} MiB per expert, {_gib(m.total_experts * pl.expert_nbytes)} in all; "
          f"non-expert {q.non_expert_bpw:g} bpw -> {_gib(q.non_expert_nbytes(m))}")
    tiers = "; ".join(
        f"{t.kind} {_gib(t.nbytes)} (reserve {_gib(t.reserve_nbytes)}) @ {t.gb_per_s:g} GB/s" if t.kind != "ssd"
        else f"ssd @ {t.gb_per_s:g} GB/s" for t in mach.tiers)
    print(f"machine {mach.name}: {tiers}")
    d = pl.to_dict(m)
    print(f"placement: non-expert weights in {pl.non_expert_tier}", end="")
    if pl.fast_pinned and pl.fast_kind != pl.cache_kind:
        print(f"; {pl.fast_kind} pins MoE layers {d['fast_pinned_layers']} "
              f"(decoder layers {d['decoder_layers_of']['fast_pinned']}), {_gib(d['fast_pinned_nbytes'])}", end="")
    if pl.cache_pinned:
        print(f"; {pl.cache_kind} pins MoE layers {d['cache_pinned_layers']}", end="")
    if pl.cached_layers:
        lo, hi = d["cache_slots_per_layer"]
        slots = f"{lo}" if lo == hi else f"{lo}-{hi}"
        print(f"; {pl.cache_kind} caches layers {d['cached_layers']} with {slots} slots each", end="")
    print(f"; {pl.capacity_experts} of {m.total_experts} experts resident "
          f"({100 * pl.capacity_experts / m.total_experts:.1f}%), cache tier {_gib(d['cache_nbytes'])} of experts")
    if pl.below_top_k:
        print(f"note: {pl.cache_kind} holds fewer than top-{m.top_k} slots per cached layer: golem-run refuses "
              "such a budget; the estimate reads every missing expert for each token")
    print(f"{'estimator':<16}{'tokens/s':>9}{'ms/token':>10}{'compute':>9}{'memory':>9}{'ssd':>9}{'reads/token':>13}")
    for est in (rep.chunk, rep.trace):
        if est is None:
            continue
        name = "chunk formula" if est.method == "chunk" else "trace replay"
        print(f"{name:<16}{est.tokens_per_s:>9.2f}{est.time_s * 1e3:>10.1f}{est.compute_s * 1e3:>9.1f}"
              f"{est.memory_s * 1e3:>9.1f}{est.ssd_s * 1e3:>9.1f}{est.experts_read:>13.1f}")
    for est in (rep.chunk, rep.trace):
        for note in est.notes if est else ():
            print(f"  {est.method}: {note}")


MAX_POINTS = 1000


def _pin_layers(text, model: ModelSpec) -> list[int]:
    if text is None:
        return []
    if re.fullmatch(r"\s*\d+\s*", str(text)):
        n = int(text)
        first = format_layer_ranges(model.moe_layers[:n]) or "none"
        raise ValueError(
            f"--pin-layers {text.strip()}: a bare number is ambiguous; --pin-layers takes decoder layer ranges "
            f"as golem-run -f does (it no longer counts layers): write {first} for the first {n} MoE layers of "
            f"{model.name}, or {n}-{n} for layer {n} alone"
        )
    return parse_layer_ranges(text, num_layers=model.num_layers, what="--pin-layers")


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"--plot needs matplotlib: {PLOT_EXTRA_HINT}") from None


class _Inputs(NamedTuple):
    """What the estimators take from the traces or from --u/--d."""

    routing: Optional[ChunkRouting]
    replay: Optional[TraceReplay]
    weights: Optional[list]  # --plan weighted: distinct experts per chunk, per layer
    curves: Optional[object]  # --plan curves: the traces' routing statistics
    stats: Optional[object]  # the chunk analysis behind ``routing``, when the traces gave it
    traces: list


def run(args) -> int:
    """The estimate's steps: model, formats and machine, the flags checked, the routing
    statistics, then the split over machines, or the estimate and its sweep."""
    model = load_model_spec(args.model)
    quant = Quantization.parse(args.bits, args.expert_bits, args.non_expert_bits)
    machine = load_machine(args.machine)
    pins = _pin_layers(args.pin_layers, model)
    if args.plot:
        _check_matplotlib()
        from golem.io.outputs import check_output

        check_output(args.plot, what="--plot")  # before the sweep runs
    machine = _override_machine(machine, args)
    _check_flags(args)
    link = _link(args, model, pins)
    inputs = _routing_inputs(args, model)
    if link is not None:
        return _run_pipeline(args, model, quant, machine, link, inputs.routing, inputs.replay, inputs.traces)
    kwargs = dict(routing=inputs.routing, replay=inputs.replay, pin_layers=pins, plan=args.plan,
                  layer_weights=inputs.weights, stats=inputs.curves)
    replay = inputs.replay
    work = replay.num_steps * replay.num_layers if replay is not None else 0
    with progress_bar(None, "layers replayed", work=work) as bar:
        if replay is not None:
            replay.progress = bar.update
        report = estimate(model, quant, machine, **kwargs)
    _print_report(report)
    out = report.to_dict()
    out["traces"] = [t.path for t in inputs.traces]
    if inputs.stats is not None:
        out["chunk_stats"] = inputs.stats.to_dict()
    if args.sweep or args.plot:
        out.update(_sweep(args, model, quant, machine, kwargs, work, inputs))
    if args.json:
        print(json.dumps(out))
    return 0


def _override_machine(machine, args):
    """The machine with ``--ram`` and ``--ssd-gb-per-s`` applied."""
    if args.ram is not None:
        machine = machine.with_memory(parse_size(args.ram, "--ram"))
    if args.ssd_gb_per_s is not None:
        if not args.ssd_gb_per_s > 0 or args.ssd_gb_per_s == float("inf"):
            raise ValueError(f"--ssd-gb-per-s must be a finite number > 0, got {args.ssd_gb_per_s}")
        machine = machine.with_ssd(args.ssd_gb_per_s)
    return machine


def _check_flags(args) -> None:
    """The numeric flags in range and the routing statistics given one way."""
    if args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
    if not 2 <= args.points <= MAX_POINTS:
        raise ValueError(f"--points must lie in [2, {MAX_POINTS}], got {args.points}")
    if not 0.0 < args.coverage <= 1.0:
        raise ValueError(f"--coverage must lie in (0, 1], got {args.coverage}")
    if (args.u is None) != (args.d is None):
        raise ValueError("--u and --d go together")
    if args.u is not None and not (0 <= args.d <= args.u < float("inf")):
        raise ValueError(f"--u/--d: need 0 <= D <= U, got U={args.u}, D={args.d}")
    if args.trace is None and args.u is None:
        raise ValueError("give routing statistics: --trace FILE... or --u U --d D")
    if args.plan != "uniform" and not args.trace:
        raise ValueError(f"--plan {args.plan} needs --trace")


def _link(args, model: ModelSpec, pins: list[int]):
    """``--machines N``: the network between them (the flags that estimate one machine refused); else None."""
    if args.machines == 1:
        return None
    from golem.runtime.analysis.stages import parse_link

    if not 2 <= args.machines <= model.num_layers:
        raise ValueError(f"--machines must lie in [1, {model.num_layers}] (one layer each at least), "
                         f"got {args.machines}")
    if pins:
        raise ValueError("--pin-layers with --machines: each machine plans its own layers; run without -f")
    if args.sweep or args.plot:
        raise ValueError("--sweep/--plot estimate one machine: run them without --machines")
    return parse_link(args.link)


def _routing_inputs(args, model: ModelSpec) -> _Inputs:
    """U and D (given, or from the traces' chunks), the trace replay and what --plan needs."""
    routing = replay = weights = curves = stats = None
    traces = []
    if args.u is not None:
        routing = ChunkRouting(args.u, args.d, args.chunk, args.coverage, "given")
    if args.trace:
        traces = load_traces(args.trace, hidden=False, weights=False)
        require_steps(traces)
        if routing is None:
            stats = chunk_analysis(traces, chunk=args.chunk, coverages=(args.coverage,))
            if stats.num_chunks >= 2:
                routing = ChunkRouting.from_stats(stats, model, args.coverage)
            else:
                print(f"note: the traces hold fewer than 2 chunks of {args.chunk} decode steps: no chunk "
                      "formula (a smaller --chunk gives one)", file=sys.stderr)
                stats = None
        replay = TraceReplay(traces, policy=args.policy, prefetch_recall=args.prefetch_recall)
        if args.plan == "weighted":
            weights = distinct_per_layer(traces, model, args.chunk)
        elif args.plan == "curves":
            curves = routing_stats_for(model, traces, args.policy)
    return _Inputs(routing, replay, weights, curves, stats, traces)


def _sweep(args, model: ModelSpec, quant, machine, kwargs: dict, work: int, inputs: _Inputs) -> dict:
    """``--sweep``/``--plot``: the estimate over memory sizes, printed as a table (and charted);
    returns what the JSON object gains."""
    sizes = default_sweep_sizes(model, quant, machine, args.points)
    with progress_bar(len(sizes), "memory sizes", work=work * len(sizes)) as bar:
        if inputs.replay is not None:
            inputs.replay.progress = None
        sweep = memory_sweep(model, quant, machine, sizes, progress=bar.update, **kwargs)
    kind = machine.cache_tier.kind
    print(f"\n{kind + ' GiB':>10}{'chunk tok/s':>13}{'trace tok/s':>13}{'chunk reads':>13}{'trace reads':>13}")
    rows = []
    for size, rep in sweep:
        c, t = rep.chunk, rep.trace
        below = rep.placement.below_top_k
        print(f"{size / GiB:>10.1f}{c.tokens_per_s if c else float('nan'):>13.2f}"
              f"{t.tokens_per_s if t else float('nan'):>13.2f}{c.experts_read if c else float('nan'):>13.1f}"
              f"{t.experts_read if t else float('nan'):>13.1f}" + ("  *" if below else ""))
        rows.append({"memory_nbytes": size, "below_top_k": below,
                     "chunk_tokens_per_s": round(c.tokens_per_s, 4) if c else None,
                     "trace_tokens_per_s": round(t.tokens_per_s, 4) if t else None,
                     "chunk_reads_per_token": c.experts_read if c else None,
                     "trace_reads_per_token": t.experts_read if t else None})
    out = {"sweep": rows}
    if any(r["below_top_k"] for r in rows):
        print(f"* fewer than top-{model.top_k} slots per cached layer: golem-run refuses such a budget")
    if args.plot:
        names = [Path(t.path).name for t in inputs.traces if t.path]
        title = f"{model.name} on {machine.name}" + (f" (traces: {', '.join(names)})" if names else "")
        path = plot_sweep(sweep, args.plot, title=title)
        print(f"chart written to {path}")
        out["plot"] = str(path)
    return out


def _run_pipeline(args, model, quant, machine, link, routing, replay, traces) -> int:
    """``--machines N``: the stages, the link and the split (found, mlx-lm's or given)."""
    from golem.runtime.analysis.stages import best_split, estimate_split, even_split
    from golem.runtime.pipeline import parse_split

    if args.plan not in ("uniform", "weighted"):
        raise ValueError(f"--plan {args.plan} with --machines: each machine plans its slots uniformly; "
                         "use --plan uniform")
    machines = [machine] * args.machines
    kwargs = dict(routing=routing, replay=replay, plan="uniform")
    if args.split == "best":
        result = best_split(model, quant, machines, link, **kwargs)
    else:
        split = parse_split(args.split)
        split = even_split(model.num_layers, args.machines) if split == "even" else split
        if split == "bytes":
            raise ValueError("--split bytes is golem-run's; here use best, even or layers per rank")
        result = estimate_split(model, quant, machines, split, link, **kwargs)
    print(f"{model.name} on {args.machines} x {machine.name}, link {link.gb_per_s:g} GB/s, "
          f"{1e6 * link.latency_s:g} us ({quant.describe() if hasattr(quant, 'describe') else args.bits})")
    print(result.describe())
    if args.json:
        out = result.to_dict()
        out["traces"] = [t.path for t in traces]
        print(json.dumps(out))
    return 0
