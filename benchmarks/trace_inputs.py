"""Trace inputs of the benchmarks that replay real routing: two decode traces of one MoE model
(two domains, e.g. general text and code), named on the command line. The OLMoE-1B-7B traces in
``../shared/traces/olmoe-1b-7b`` are the default only where they exist; a missing trace ends the
benchmark with one line saying how to record one (``golem-run --trace-out FILE``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from golem.runtime.trace import Trace, TraceError, load_trace

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "olmoe-1b-7b"
ROLES = ("general", "coding")


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "traces", nargs="*", metavar="TRACE",
        help="Two decode traces of one MoE model, e.g. general.npz coding.npz (record one with golem-run "
             f"--model M --prompt ... --trace-out FILE); default: {SHARED}/{{general,coding}}.npz where present.")
    parser.add_argument("--traces", dest="trace_folder", default=None, metavar="DIR",
                        help="A folder holding general.npz and coding.npz (instead of two TRACE paths).")


def how_to_record(prog: str) -> str:
    return (f"record two decode traces of one MoE model with golem-run --model MODEL --prompt TEXT --max-tokens 2000 "
            f"--trace-out FILE (e.g. general.npz from prose, coding.npz from code) and run "
            f"python benchmarks/{prog}.py general.npz coding.npz")


def trace_paths(args: argparse.Namespace, prog: str) -> list[Path]:
    if args.traces and args.trace_folder:
        sys.exit(f"{prog}: give two TRACE paths or --traces DIR, not both")
    if args.traces:
        if len(args.traces) != 2:
            sys.exit(f"{prog}: needs two traces (one per domain), got {len(args.traces)}")
        paths = [Path(p) for p in args.traces]
    else:
        folder = Path(args.trace_folder) if args.trace_folder else SHARED
        paths = [folder / f"{role}.npz" for role in ROLES]
    for path in paths:
        if not path.is_file():
            sys.exit(f"{prog}: no trace at {path}: {how_to_record(prog)}")
    return paths


def load_two_traces(args: argparse.Namespace, prog: str) -> dict[str, Trace]:
    """The two traces by name (the file names without ``.npz``; ``general``/``coding`` for the
    default ones), in the order given."""
    paths = trace_paths(args, prog)
    names = [p.stem for p in paths]
    if names[0] == names[1]:
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    out = {}
    for name, path in zip(names, paths):
        try:
            out[name] = load_trace(path)
        except TraceError as e:
            sys.exit(f"{prog}: {e}")
    a, b = out.values()
    if (a.num_layers, a.num_experts) != (b.num_layers, b.num_experts):
        sys.exit(f"{prog}: {paths[0]} and {paths[1]} describe different models "
                 f"({a.num_layers}x{a.num_experts} vs {b.num_layers}x{b.num_experts} experts)")
    return out
