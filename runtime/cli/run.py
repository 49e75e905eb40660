"""golem-run: generate text like ``mlx_lm.generate``, with the experts offloaded.

Owns argument parsing, the prompt (chat template, system prompt, stdin), printing in
mlx-lm's layout plus the expert statistics, and turning user mistakes into one clear line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from typing import Optional

from golem.runtime.policies import DEFAULT_POLICY, policy_names

DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 100


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="golem-run",
        description="Generate text with an MoE model whose experts stream from disk.",
    )
    parser.add_argument("--model", type=str, help="Model folder or Hugging Face repo id.")
    parser.add_argument("--demo", action="store_true",
                        help="Build a small generated checkpoint once (in the cache folder) and run it offloaded.")
    parser.add_argument("-p", "--prompt", default=DEFAULT_PROMPT, help="Message for the model ('-' reads stdin).")
    parser.add_argument("-m", "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="Maximum tokens to generate.")
    parser.add_argument("--temp", type=float, default=0.0, help="Sampling temperature.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Sampling top-p.")
    parser.add_argument("--seed", type=int, default=None, help="PRNG seed.")
    parser.add_argument("--system-prompt", default=None, help="System prompt for the chat template.")
    parser.add_argument("--ignore-chat-template", action="store_true", help="Use the raw prompt, no chat template.")
    parser.add_argument("--verbose", type=lambda s: s.lower() not in ("false", "f", "0"), default=True,
                        help="Print the text and the statistics (default: true).")
    g = parser.add_argument_group("expert cache")
    g.add_argument("-c", "--cache-size", type=int, default=None,
                   help="Expert slots per MoE layer (>= top-k; default: every expert).")
    g.add_argument("--cache-size-override", nargs=2, action="append", default=[], metavar=("RANGES", "N"),
                   help="Slots for some layers, e.g. '0-40,90-93 128' (repeatable; later ones win).")
    g.add_argument("-f", "--pin-layers", default=None, metavar="RANGES",
                   help="Layers kept fully resident (no cache logic), e.g. '0-3,46-47'.")
    g.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="Total memory for weights and expert slots, e.g. '48GB': golem picks pinned layers and slots.")
    g.add_argument("--plan", action="store_true", help="Print the chosen allocation (layers, slots, bytes) and exit.")
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
    g.add_argument("--direct-io", action="store_true", help="Read experts with O_DIRECT, bypassing the page cache.")
    g.add_argument("--stats", action="store_true", help="Print a per-layer table after generation.")
    g = parser.add_argument_group("prefetch")
    g.add_argument("--prefetch-depth", type=int, default=0,
                   help="MoE layers ahead to prefetch (0 = none: the synchronous baseline).")
    g.add_argument("--threshold", type=float, default=0.3,
                   help="Prefetch experts whose predicted probability of use is at least this.")
    g.add_argument("--predictor", default="lookahead",
                   help="Who guesses the next experts (golem-trace predict --list shows the names).")
    g.add_argument("--predictor-train", nargs="+", default=(), metavar="TRACE",
                   help="Traces (or folders of them) the predictor learns from first (transition, frequency, probe).")
    g.add_argument("--predictor-trace", default=None,
                   help="Trace the oracle predictors replay (a golem-trace/1 file of this very run).")
    g.add_argument("--prefetch-cap-mb", type=float, default=None,
                   help="Most speculative megabytes being read at once (default: 2 x depth x top-k experts).")
    g.add_argument("--prefetch-cap-ms", type=float, default=3.0,
                   help="Most speculative reads at once, in milliseconds of the storage's measured "
                        "throughput: a miss waits behind at most about this much (default: 3).")
    g = parser.add_argument_group("storage")
    g.add_argument("--io-parallelism", type=int, default=None, help="Expert reads in flight at once.")
    g.add_argument("--emulate-storage", default=None, metavar="GB_PER_S[,LATENCY]",
                   help="Throttle reads to a slower SSD, e.g. '2.5,80us'.")
    g = parser.add_argument_group("traces")
    g.add_argument("--trace-out", default=None, help="Record routing to this golem-trace/1 file.")
    g.add_argument("--trace-hidden", action="store_true",
                   help="With --trace-out: record each MoE layer's post-attention residual too.")
    return parser


def _demo_model() -> str:
    from golem.runtime.synthetic import Size, build_checkpoint, default_cache_dir

    path = default_cache_dir() / "demo-qwen3_moe"
    if not (path / "config.json").exists():
        print(f"[golem] building the demo checkpoint in {path} (once)", file=sys.stderr)
    size = Size(hidden=256, layers=8, experts=32, top_k=4, expert_hidden=256, vocab=384, group_size=64)
    return str(build_checkpoint("qwen3_moe", path, size=size))


def format_stats(runtime, generation_tokens: int) -> str:
    engine = runtime.engine
    stats = engine.stats
    t = stats.total()
    gb = t.bytes_read / 1e9
    gbps = gb / t.read_s if t.read_s > 0 else 0.0
    steps = max(stats.decode_steps, 1)
    line = (
        f"Experts: hit rate {100 * t.hit_rate:.1f}% of {t.requests} requests, "
        f"{t.misses} read ({gb:.3f} GB, {gbps:.2f} GB/s), "
        f"stall {1000 * stats.decode_read_s / steps:.2f} ms/token, "
        f"host syncs {stats.decode_host_syncs / steps:.1f}/token"
    )
    if engine.prefetcher is not None:
        p = engine.prefetcher.totals()
        line += (
            f"\nPrefetch: recall {100 * p.recall:.1f}%, {p.issued} issued, "
            f"useful {p.useful} ({p.useful_nbytes / 1e9:.3f} GB), wasted {p.wasted} ({p.wasted_nbytes / 1e9:.3f} GB), "
            f"late {p.late}"
        )
    return line


def format_layer_table(runtime) -> str:
    pf = runtime.engine.prefetcher
    head = f"{'layer':>5} {'slots':>5} {'hits':>8} {'misses':>8} {'hit rate':>8} {'MB read':>9}"
    if pf is not None:
        head += f" {'pf recall':>9} {'useful':>7} {'wasted':>7} {'late':>5} {'prefetch':>8}"
    rows = [head]
    for layer, s in sorted(runtime.engine.stats.layers.items()):
        row = f"{layer:>5} {s.capacity:>5} {s.hits:>8} {s.misses:>8} {100 * s.hit_rate:>7.1f}% {s.bytes_read / 1e6:>9.2f}"
        if pf is not None:
            p = pf.stats[layer]
            row += f" {100 * p.recall:>8.1f}% {p.useful:>7} {p.wasted:>7} {p.late:>5} {'on' if p.enabled else 'off':>8}"
        rows.append(row)
    return "\n".join(rows)


def run(args) -> int:
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from golem.runtime.api import load
    from golem.runtime.loader import top_k_of

    if args.seed is not None:
        mx.random.seed(args.seed)
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.demo:
        args.stats = True  # the demo shows where the experts came from, layer by layer
    model_path = _demo_model() if args.demo else args.model
    if model_path is None:
        raise ValueError("--model is required (or --demo for a generated one)")
    options = {"policy": args.policy, "direct_io": args.direct_io, "io_parallelism": args.io_parallelism}
    sizing = _Sizing(args, model_path)
    options["capacities"] = sizing.capacities
    if args.plan:
        from golem.runtime.loader import open_checkpoint

        sizing.capacities(open_checkpoint(model_path))
        print(sizing.plan.describe())
        return 0
    if args.prefetch_depth:
        from golem.runtime.prefetch import PrefetchConfig

        cap = None if args.prefetch_cap_mb is None else int(args.prefetch_cap_mb * 1e6)
        options["prefetch"] = PrefetchConfig(depth=args.prefetch_depth, threshold=args.threshold, speculative_nbytes=cap,
                                            speculative_ms=args.prefetch_cap_ms)
        options["predictor"] = args.predictor
        if args.predictor_trace:
            from golem.runtime.trace import load_trace

            options["predictor_options"] = {"truth": load_trace(args.predictor_trace).decode_only()}
        if args.predictor_train:
            from golem.runtime.trace import load_traces

            options["predictor_train"] = load_traces(args.predictor_train)
    if args.emulate_storage:
        from golem.io.storage import parse_throttle

        options["throttle"] = parse_throttle(args.emulate_storage)
    if args.trace_hidden and not args.trace_out:
        raise ValueError("--trace-hidden needs --trace-out FILE")
    if args.trace_out:
        options["record"] = True
        options["record_hidden"] = args.trace_hidden
    if args.trace_out or args.save_profile:
        options["record"] = True
    with load(model_path, **options) as (model, tokenizer):
        runtime = model.golem
        if sizing.warm:
            runtime.engine.warm(sizing.warm)
        prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
        prompt = sys.stdin.read() if prompt == "-" else prompt
        use_chat_template = not args.ignore_chat_template and tokenizer.has_chat_template
        if use_chat_template:
            messages = [] if args.system_prompt is None else [{"role": "system", "content": args.system_prompt}]
            messages.append({"role": "user", "content": prompt})
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tokens = tokenizer.encode(prompt, add_special_tokens=not use_chat_template)
        sampler = make_sampler(args.temp, args.top_p)
        response = None
        if args.verbose:
            print("=" * 10)
        for response in stream_generate(model, tokenizer, tokens, max_tokens=args.max_tokens, sampler=sampler):
            if args.verbose:
                print(response.text, end="", flush=True)
        if args.verbose:
            print()
            print("=" * 10)
            if response is None:
                print("No text generated for this prompt")
                return 0
            print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
            print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
            print(f"Peak memory: {response.peak_memory:.3f} GB")
            print(format_stats(runtime, response.generation_tokens))
            if args.stats:
                print(format_layer_table(runtime))
        if args.trace_out:
            runtime.engine.trace.save(args.trace_out)
            if args.verbose:
                print(f"Trace: {args.trace_out}")
        if args.save_profile:
            saved = sizing.save_profile(runtime)
            if args.verbose:
                print(f"Profile: {saved}")
    return 0


class _Sizing:
    """Turns the cache flags into per-layer slots and a warm start, once the model is indexed."""

    def __init__(self, args, model_path: str):
        from golem.runtime.units import parse_layer_ranges, parse_override, parse_size

        self.args = args
        self.model_path = model_path
        self.pins = parse_layer_ranges(args.pin_layers) if args.pin_layers else []
        self.overrides = [parse_override(v) for v in args.cache_size_override]
        self.budget = parse_size(args.memory_budget, "--memory-budget") if args.memory_budget is not None else None
        if args.cache_size is not None and args.cache_size < 1:
            raise ValueError(f"--cache-size must be at least 1, got {args.cache_size}")
        if args.warm_random is not None and args.warm_start is not None:
            raise ValueError("choose one of -R/--warm-random and -W/--warm-start")
        self.profile = None
        if args.warm_start is not None:
            from golem.runtime.analysis.profile import load_saved_profile, load_warm_source, profile_path

            if args.warm_start == "saved":
                self.profile = load_saved_profile(self.profile_dir())
                if self.profile is None:
                    path = profile_path(self.profile_dir())
                    raise ValueError(f"-W saved: no saved profile yet at {path} (run once with --save-profile)")
            else:
                self.profile = load_warm_source(args.warm_start)
        self.plan = None
        self.warm = None

    def profile_dir(self):
        from golem.runtime.analysis.profile import profile_dir_for

        return profile_dir_for(self.model_path)

    def capacities(self, opened):
        from golem.runtime.analysis.plan import RoutingStats, make_plan

        memory = opened.memory()
        cache_size = self.args.cache_size
        if cache_size is None and self.budget is None and not self.overrides and not self.pins:
            cache_size = 8 if self.args.demo else memory.num_experts
        if cache_size is not None and cache_size < memory.top_k:
            raise ValueError(f"--cache-size {cache_size} is smaller than the model's top-k ({memory.top_k}): "
                             f"one token needs {memory.top_k} experts resident")
        stats = None
        if self.profile is not None:
            self.profile.check_shape(memory.num_layers, memory.num_experts, where=str(self.args.warm_start))
            if self.budget is not None and (self.profile.stack_hist is not None or self.profile.curves):
                stats = RoutingStats.from_profile(self.profile, policy=self.args.policy, source=str(self.args.warm_start))
        # The scheduler's staging buffers come out of the budget too (see load_offloaded).
        depth = self.args.prefetch_depth
        reserve = max(4, 2 * memory.top_k * (depth + 1) + 2) * max(memory.nbytes_of(i) for i in range(memory.num_layers))
        self.plan = make_plan(memory, budget_nbytes=self.budget, cache_size=cache_size,
                              overrides=self.overrides, pin_layers=self.pins, stats=stats,
                              reserve_nbytes=reserve if self.budget is not None else 0)
        caps = {memory.ids[lp.layer]: lp.slots for lp in self.plan.layers}
        pinned = [lp.layer for lp in self.plan.layers if lp.pinned]
        by_pos = None
        if self.profile is not None:
            by_pos = self.profile.warm_start([lp.slots for lp in self.plan.layers], pinned)
        elif self.args.warm_random is not None:
            from golem.runtime.analysis.profile import random_warm_start

            by_pos = random_warm_start(self.args.warm_random, memory.num_layers, memory.num_experts,
                                       [lp.slots for lp in self.plan.layers], pinned)
        if by_pos is not None:
            self.warm = {memory.ids[pos]: experts for pos, experts in by_pos.items()}
        return caps

    def save_profile(self, runtime):
        from golem.runtime.analysis.profile import model_identity, profile_from_traces, record_profile

        policies = [self.args.policy] if self.args.policy != "lru" else []  # LRU's curve comes from the stack histogram
        run = profile_from_traces([runtime.engine.trace.trace()], policies=policies)  # decode steps only
        run.meta["model"] = model_identity(runtime.path)
        return record_profile(self.profile_dir(), run)


def main(argv: Optional[list] = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    from golem.io.index import CheckpointError
    from golem.io.reads import ReadError

    from golem.runtime.loader import ModelError

    try:
        return run(args)
    except (ModelError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"golem-run: error: {e}", file=sys.stderr)
        return 2
    except ReadError as e:
        print(f"golem-run: read failed: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        from golem.runtime.cli.trace import stdout_closed

        return stdout_closed()
    except KeyboardInterrupt:
        print("\ngolem-run: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
