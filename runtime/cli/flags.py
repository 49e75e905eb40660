"""golem's own command-line flags (expert cache, memory budget, prefetch, storage, traces),
shared by every golem command that runs a model.

``add_runtime_arguments(parser)`` adds them to an argparse parser; ``runtime_config(args)``
turns the parsed flags into a ``golem.runtime.config.RuntimeConfig`` (flags map 1:1 to its
fields). Knows nothing of prompts, generation or printing.
"""

from __future__ import annotations

import argparse

from golem.runtime.config import ConfigError, RuntimeConfig
from golem.runtime.policies import DEFAULT_POLICY, policy_names

DEFAULT_THRESHOLD = 0.3
DEFAULT_PREDICTOR = "lookahead"
DEFAULT_PREFETCH_CAP_MS = 3.0


def add_runtime_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add golem's runtime flags to ``parser`` in four groups; returns ``parser``."""
    g = parser.add_argument_group("expert cache (golem)")
    g.add_argument("-c", "--cache-size", type=int, default=None,
                   help="Expert slots per MoE layer (>= top-k; default: sized to the machine's memory).")
    g.add_argument("--cache-size-override", nargs=2, action="append", default=[], metavar=("RANGES", "N"),
                   help="Slots for some layers, e.g. '0-40,90-93 128' (repeatable; later ones win).")
    g.add_argument("-f", "--pin-layers", default=None, metavar="RANGES",
                   help="Layers kept fully resident (no cache logic), e.g. '0-3,46-47'.")
    g.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="Total memory for weights, expert slots and staging buffers, e.g. '48GB': "
                        "golem picks pinned layers and slots (default: the machine's memory less a margin).")
    g.add_argument("-R", "--warm-random", type=int, default=None, metavar="SEED",
                   help="Fill every cache with random experts before the first token.")
    g.add_argument("-W", "--warm-start", default=None, metavar="PATH",
                   help="Fill caches with the most used experts of a trace, a folder of traces, a profile, "
                        "or 'saved' (the profile --save-profile keeps); also steers --memory-budget.")
    g.add_argument("--save-profile", action="store_true",
                   help="After the run, merge its routing into the profile kept beside golem's cache.")
    g.add_argument("--policy", default=DEFAULT_POLICY,
                   help=f"Eviction policy: {', '.join(policy_names())} (default {DEFAULT_POLICY}, "
                        "the best on the OLMoE traces; see benchmarks/bench_policies.py).")
    g = parser.add_argument_group("prefetch (golem)")
    g.add_argument("--prefetch-depth", type=_prefetch_depth, default="auto",
                   help="MoE layers ahead to prefetch: 'auto' (the default: a governor picks 0 to 3 per token "
                        "from what prefetching saves and costs), N (at most N, governed), 0 (none: the synchronous "
                        "baseline).")
    g.add_argument("--no-prefetch-governor", action="store_true",
                   help="Prefetch exactly --prefetch-depth layers ahead, whatever it costs (to measure a fixed depth).")
    g.add_argument("--threshold", type=float, default=None,
                   help=f"Prefetch experts whose predicted probability of use is at least this "
                        f"(default {DEFAULT_THRESHOLD}).")
    g.add_argument("--predictor", default=None,
                   help=f"Who guesses the next experts (default {DEFAULT_PREDICTOR}; "
                        "golem-trace predict --list shows the names).")
    g.add_argument("--predictor-train", nargs="+", default=(), metavar="TRACE",
                   help="Traces (or folders of them) the predictor learns from first (transition, frequency, probe).")
    g.add_argument("--predictor-trace", default=None,
                   help="Trace the oracle predictors replay (a golem-trace/1 file of this very run).")
    g.add_argument("--prefetch-cap-mb", type=float, default=None,
                   help="Most speculative megabytes being read at once (default: 2 x depth x top-k experts).")
    g.add_argument("--prefetch-cap-ms", type=float, default=None,
                   help="Most speculative reads at once, in milliseconds of the storage's measured "
                        f"throughput: a miss waits behind at most about this much (default: {DEFAULT_PREFETCH_CAP_MS:g}).")
    g = parser.add_argument_group("storage (golem)")
    g.add_argument("--direct-io", action="store_true", help="Read experts with O_DIRECT, bypassing the page cache.")
    g.add_argument("--io-parallelism", type=int, default=None, help="Expert reads in flight at once.")
    g.add_argument("--emulate-storage", default=None, metavar="GB_PER_S[,LATENCY]",
                   help="Throttle reads to a slower SSD, e.g. '2.5,80us'.")
    g.add_argument("--slot-writer", default=None, choices=("auto", "host", "device", "device-load"),
                   help="How experts get into slots: a host memcpy into the pool, or an upload and an "
                        "in-place update on the device (default auto: host on CPU and Metal, device on CUDA).")
    g = parser.add_argument_group("traces (golem)")
    g.add_argument("--trace-out", default=None, help="Record routing to this golem-trace/1 file.")
    g.add_argument("--trace-hidden", action="store_true",
                   help="With --trace-out: record each MoE layer's post-attention residual too.")
    return parser


def _prefetch_depth(text: str):
    """``--prefetch-depth``: ``auto`` or a whole number (checked later, with the model)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number, got {text!r}") from None


def runtime_config(args: argparse.Namespace, **fields) -> RuntimeConfig:
    """The ``RuntimeConfig`` of parsed flags (``fields`` override); a flag given without
    what it needs, or a bad value, is a ``ConfigError`` naming the flag."""
    import math

    from golem.runtime.prefetch import PrefetchConfig

    if args.warm_random is not None and args.warm_start is not None:
        raise ConfigError("choose one of -R/--warm-random and -W/--warm-start")
    depth = args.prefetch_depth
    auto = depth == "auto"
    fixed = getattr(args, "no_prefetch_governor", False)
    if auto and fixed:
        raise ConfigError("--no-prefetch-governor needs a fixed --prefetch-depth N")
    if depth is not None and not auto and depth < 0:
        raise ConfigError(f"--prefetch-depth must be >= 0, got {depth}")
    if not depth:
        given = [flag for flag, value in (
            ("--threshold", args.threshold), ("--predictor", args.predictor),
            ("--prefetch-cap-mb", args.prefetch_cap_mb), ("--prefetch-cap-ms", args.prefetch_cap_ms),
            ("--predictor-train", args.predictor_train or None), ("--predictor-trace", args.predictor_trace),
            ("--no-prefetch-governor", fixed or None),
        ) if value is not None]
        if given:
            raise ConfigError(f"{given[0]} needs a prefetch depth (--prefetch-depth N, N >= 1)")
    prefetch = None
    if depth:
        threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
        cap_ms = DEFAULT_PREFETCH_CAP_MS if args.prefetch_cap_ms is None else args.prefetch_cap_ms
        for flag, value in (("--threshold", threshold), ("--prefetch-cap-ms", cap_ms),
                            ("--prefetch-cap-mb", args.prefetch_cap_mb)):
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{flag} must be a finite number, got {value}")
        cap = None
        if args.prefetch_cap_mb is not None:
            if args.prefetch_cap_mb <= 0:
                raise ConfigError(f"--prefetch-cap-mb must be a positive number, got {args.prefetch_cap_mb:g}")
            cap = max(1, int(args.prefetch_cap_mb * 1e6))
        try:
            opts = dict(threshold=threshold, speculative_nbytes=cap, speculative_ms=cap_ms)
            prefetch = (PrefetchConfig.auto_depth(**opts) if auto else
                        PrefetchConfig(depth=depth, governor=not fixed, **opts))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    warm = args.warm_random if args.warm_random is not None else args.warm_start
    options = dict(
        cache_size=args.cache_size,
        cache_size_overrides=tuple((r, n) for r, n in args.cache_size_override),
        pin_layers=args.pin_layers,
        memory_budget=args.memory_budget,
        policy=args.policy,
        warm_start=warm,
        save_profile=args.save_profile,
        prefetch=prefetch,
        predictor=args.predictor or DEFAULT_PREDICTOR,
        predictor_train=tuple(args.predictor_train),
        predictor_trace=args.predictor_trace,
        direct_io=args.direct_io,
        io_parallelism=args.io_parallelism,
        emulate_storage=args.emulate_storage,
        record_hidden=args.trace_hidden,
        trace_out=args.trace_out,
        slot_writer=args.slot_writer,
    )
    options.update(fields)
    if options["record_hidden"] and options["trace_out"] is None:
        raise ConfigError("--trace-hidden needs --trace-out FILE")
    return RuntimeConfig(**options)
