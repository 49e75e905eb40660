"""`golem-trace plot`: PNG charts of traces: hit rate over time per layer, per-layer hit rate
by warm-start strategy, and the expert overlap between two traces.

The numbers come from plain functions here (``hit_rate_over_time``, ``warm_start_hit_rates``,
``expert_overlap``) that need only numpy; drawing needs matplotlib, an optional extra
(``pip install "golem-moe[plot]"``), imported only when a chart is drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from golem.runtime.cli.about import PLOT_EXTRA_HINT
from golem.runtime.policies import DEFAULT_POLICY, policy_names
from golem.runtime.analysis.profile import profile_from_traces, random_warm_start
from golem.runtime.analysis.simulate import requests_per_step, simulate, simulate_sequences
from golem.runtime.trace import load_traces, require_steps

CHARTS = ("hit-rate", "warm-start", "overlap")
MISSING_MATPLOTLIB = f"drawing charts needs matplotlib: {PLOT_EXTRA_HINT}"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plot",
        help="PNG charts: hit rate over time, hit rate by warm start, expert overlap of two traces.",
        description="Draw PNG charts of golem-trace/1 traces (needs matplotlib). hit-rate: each layer's "
                    "hit rate per window of steps, caches persisting across the traces. warm-start: each "
                    "layer's hit rate when every sequence starts from a fresh cache that is empty, random, "
                    "or holds the most used experts of --warm-start (default: of the traces themselves). "
                    "overlap: per layer, the share of the top-CAPACITY experts two traces have in common.",
    )
    p.add_argument("traces", nargs="+", metavar="TRACE", help="Trace files or folders of traces.")
    p.add_argument("--out", default="golem-plots", help="Folder for the PNG files (created; default golem-plots).")
    p.add_argument("--charts", default=",".join(CHARTS),
                   help=f"Comma-separated charts to draw: {', '.join(CHARTS)} (default all; overlap needs 2 traces).")
    p.add_argument("--policy", default=DEFAULT_POLICY,
                   help=f"Eviction policy ({', '.join(policy_names())}; default {DEFAULT_POLICY}, as golem-run).")
    p.add_argument("-c", "--capacity", dest="cache_size", type=int, default=None, help="Slots per layer (default: half the experts).")
    p.add_argument("--window", type=int, default=128, help="Steps per point of the hit-rate chart (128).")
    p.add_argument("-W", "--warm-start", default=None, metavar="PATH",
                   help="Profile source for the warm-start chart (trace, folder or profile).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random warm start (0).")
    p.add_argument("--json", action="store_true", help="Print one JSON object as the last line.")
    p.set_defaults(func=run)
    return p


def hit_rate_over_time(traces, *, policy: str, cache_size: int, window: int) -> np.ndarray:
    """float (L, W): each layer's hit rate over consecutive windows of ``window`` steps."""
    result = simulate(traces, policy=policy, cache_size=cache_size)
    req = requests_per_step(traces)
    n = (req.shape[0] + window - 1) // window
    edges = np.arange(n) * window
    r = np.add.reduceat(req, edges, axis=0).astype(np.float64)
    m = np.add.reduceat(result.step_misses, edges, axis=0)
    return (1.0 - m / np.maximum(r, 1)).T


def warm_start_hit_rates(traces, *, policy: str, cache_size: int, seed: int, profile=None) -> dict:
    """Strategy -> float (L,) hit rate, every sequence replayed from a fresh cache."""
    first = traces[0]
    profile = profile if profile is not None else profile_from_traces(traces, stack=False)
    starts = {
        "empty": None,
        f"random (seed {seed})": lambda i, s: random_warm_start(seed + i, first.num_layers, first.num_experts, cache_size),
        "profile": lambda i, s: profile.warm_start(cache_size),
    }
    out = {}
    for name, warm_for in starts.items():
        r = simulate_sequences(traces, warm_for, policy=policy, cache_size=cache_size)
        out[name] = r.hits / np.maximum(r.requests, 1)
    return out


def expert_overlap(a, b, cache_size: int) -> dict:
    """Per layer: the share of each trace's top-``cache_size`` experts the other's also has, and
    the histogram intersection of their routing distributions (1 = identical)."""
    pa, pb = profile_from_traces(a, stack=False), profile_from_traces(b, stack=False)
    top, inter = [], []
    for position in range(pa.num_layers):
        ta, tb = set(pa.top_experts(position, cache_size)), set(pb.top_experts(position, cache_size))
        top.append(len(ta & tb) / max(min(len(ta), len(tb)), 1))
        fa = pa.counts[position] / max(pa.counts[position].sum(), 1)
        fb = pb.counts[position] / max(pb.counts[position].sum(), 1)
        inter.append(float(np.minimum(fa, fb).sum()))
    return {"top_overlap": np.array(top), "distribution_overlap": np.array(inter)}


def _figure(width=9.0, height=4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _layer_ticks(axis, numbers) -> None:
    """Ticks at whole positions, labelled with the checkpoint's layer numbers (as golem-run's
    table and the other golem-trace reports), at most about 16 of them."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    axis.set_major_formatter(FuncFormatter(
        lambda x, _: str(numbers[int(x)]) if float(x).is_integer() and 0 <= x < len(numbers) else ""))


def run(args) -> int:
    """The plot's steps: the charts and the traces checked, then each chart drawn and written."""
    charts = _charts(args)
    if args.window < 1:
        raise ValueError(f"--window must be >= 1, got {args.window}")
    traces = load_traces(args.traces, hidden=False, weights=False)
    require_steps(traces)
    cache_size = _cache_size(traces[0], args)
    if "overlap" in charts and len(traces) < 2:
        if args.charts != ",".join(CHARTS):
            raise ValueError("--charts overlap needs two traces")
        charts.remove("overlap")
        print("overlap: skipped (needs two traces)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"golem-trace plot: error: {MISSING_MATPLOTLIB}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [Path(t.path).name if t.path else f"trace {i}" for i, t in enumerate(traces)]
    draw = {"hit-rate": _hit_rate_chart, "warm-start": _warm_start_chart, "overlap": _overlap_chart}
    written = [draw[chart](traces, names, cache_size, out_dir, args) for chart in CHARTS if chart in charts]
    if args.json:
        print(json.dumps({"out": str(out_dir), "traces": [t.path for t in traces], "capacity": cache_size,
                          "policy": args.policy, "charts": written}))
    return 0


def _charts(args) -> list[str]:
    """The charts ``--charts`` names, each a known one."""
    charts = [c.strip() for c in args.charts.split(",") if c.strip()]
    unknown = [c for c in charts if c not in CHARTS]
    if unknown or not charts:
        raise ValueError(f"--charts: unknown chart(s) {unknown}; choose from {', '.join(CHARTS)}")
    return charts


def _cache_size(first, args) -> int:
    """Slots per layer: ``-c/--capacity``, else half the experts (at least top-k)."""
    cache_size = args.cache_size if args.cache_size is not None else max(first.top_k, first.num_experts // 2)
    if not first.top_k <= cache_size <= first.num_experts:
        raise ValueError(f"-c/--capacity {cache_size}: give {first.top_k} (top-k) to {first.num_experts} "
                         "(every expert) slots per layer")
    return cache_size


def _source(names: list[str]) -> str:
    """The traces' names for a chart's title (the first two and a count past three)."""
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:2])} and {len(names) - 2} more"


def _hit_rate_chart(traces, names, cache_size: int, out_dir: Path, args) -> dict:
    """hit_rate_over_time.png: the hit rate of each layer per window of decode steps."""
    first = traces[0]
    rates = hit_rate_over_time(traces, policy=args.policy, cache_size=cache_size, window=args.window)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(rates, aspect="auto", origin="lower", vmin=0.0, vmax=1.0, cmap="viridis",
                   extent=(0, rates.shape[1] * args.window, -0.5, first.num_layers - 0.5))
    fig.colorbar(im, ax=ax, label="hit rate")
    ax.set_xlabel("decode step")
    ax.set_ylabel("MoE layer (decoder layer number)")
    _layer_ticks(ax.yaxis, first.layer_numbers)
    ax.set_title(f"{_source(names)}: hit rate per {args.window} steps, {args.policy}, "
                 f"{cache_size}/{first.num_experts} slots")
    path = out_dir / "hit_rate_over_time.png"
    _save(fig, path)
    print(f"hit-rate: {path} (mean hit rate {100 * rates.mean():.1f}%)")
    return {"chart": "hit-rate", "path": str(path), "mean_hit_rate": round(float(rates.mean()), 4)}


def _warm_start_chart(traces, names, cache_size: int, out_dir: Path, args) -> dict:
    """warm_start_by_layer.png: each layer's hit rate from each warm start (``-W`` a profile's)."""
    from golem.runtime.analysis.profile import load_warm_source

    first = traces[0]
    positions = np.arange(first.num_layers)  # bar positions; labelled with first.layer_numbers
    profile = load_warm_source(args.warm_start) if args.warm_start else None
    if profile is not None:
        profile.check_shape(first.num_layers, first.num_experts, where=f"-W {args.warm_start}", other="the trace")
    rates = warm_start_hit_rates(traces, policy=args.policy, cache_size=cache_size, seed=args.seed, profile=profile)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(rates)
    for i, (name, r) in enumerate(rates.items()):
        label = name if name != "profile" else f"profile ({args.warm_start or 'these traces'})"
        ax.bar(positions + (i - (len(rates) - 1) / 2) * width, r, width, label=label)
    ax.set_xlabel("MoE layer (decoder layer number)")
    _layer_ticks(ax.xaxis, first.layer_numbers)
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.15)
    ax.set_title(f"{_source(names)}: hit rate by warm start (fresh cache per sequence), {args.policy}, "
                 f"{cache_size}/{first.num_experts} slots", fontsize="medium")
    ax.legend(loc="upper center", ncol=len(rates), fontsize="small")
    path = out_dir / "warm_start_by_layer.png"
    _save(fig, path)
    summary = {name: round(float(r.mean()), 4) for name, r in rates.items()}
    print(f"warm-start: {path} ({', '.join(f'{k} {100 * v:.1f}%' for k, v in summary.items())})")
    return {"chart": "warm-start", "path": str(path), "mean_hit_rate": summary}


def _overlap_chart(traces, names, cache_size: int, out_dir: Path, args) -> dict:
    """expert_overlap.png: the first two traces' experts in common, layer by layer."""
    first = traces[0]
    positions = np.arange(first.num_layers)
    ov = expert_overlap(traces[0], traces[1], cache_size)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(positions - 0.2, ov["top_overlap"], 0.4, label=f"top-{cache_size} experts in common")
    ax.bar(positions + 0.2, ov["distribution_overlap"], 0.4, label="routing distribution overlap")
    ax.set_xlabel("MoE layer (decoder layer number)")
    _layer_ticks(ax.xaxis, first.layer_numbers)
    ax.set_ylabel("share in common (1 = identical)")
    ax.set_ylim(0, 1.15)
    ax.set_title(f"expert overlap: {names[0]} vs {names[1]}")
    ax.legend(loc="upper center", ncol=2, fontsize="small")
    path = out_dir / "expert_overlap.png"
    _save(fig, path)
    print(f"overlap: {path} (top-{cache_size} in common {100 * ov['top_overlap'].mean():.1f}%)")
    return {"chart": "overlap", "path": str(path),
            "mean_top_overlap": round(float(ov["top_overlap"].mean()), 4),
            "mean_distribution_overlap": round(float(ov["distribution_overlap"].mean()), 4)}


def _save(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written atomically (``golem.io.outputs``)."""
    from golem.io.outputs import write_output

    write_output(path, lambda f: fig.savefig(f, format="png"), what="--out")
