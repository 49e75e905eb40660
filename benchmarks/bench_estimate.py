"""Calibration of the speed estimator: does the trace-driven estimate predict golem's speed?

Measures this machine's profile on a generated checkpoint (compute time per token with every
needed expert resident, read GB/s, the cost of one demand read through golem's engine),
writes it as a machine file, records one routing trace, then compares the trace-driven
estimate (``golem-trace estimate``'s trace replay) with the decode speed golem measures at
several cache sizes. Baseline in the same run: every expert resident. Medians over rounds.

    python benchmarks/bench_estimate.py [--rounds 5] [--tokens 96] [--capacities 24,16,8,4]

Last line: one JSON object with ``max_abs_error_ratio`` (target <= 0.25).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "Tell me a story about the sea"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="qwen3_moe", help="Generated model family.")
    p.add_argument("--hidden", type=int, default=256, help="Model width and expert width.")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=96, help="Tokens generated per run.")
    p.add_argument("--rounds", type=int, default=5, help="Rounds over every cache size (medians).")
    p.add_argument("--capacities", default="24,16,8,4",
                   help="Cache sizes (slots per layer) to compare; E-1 slots is the calibration point.")
    p.add_argument("--direct-io", action="store_true", help="Read experts with O_DIRECT (the disk, not the page cache).")
    p.add_argument("--emulate-storage", default=None, metavar="GB_PER_S[,LATENCY]",
                   help="Throttle every read to an emulated device, e.g. '1.0,100us'.")
    p.add_argument("--profile-out", default=None, help="Write the measured machine profile (JSON) here.")
    p.add_argument("--checkpoint", default=None, help="Folder for the generated checkpoint (default: golem's cache).")
    return p.parse_args(argv)


def build(args) -> Path:
    from golem.runtime.synthetic import Size, build_checkpoint, default_cache_dir

    size = Size(hidden=args.hidden, layers=args.layers, experts=args.experts, top_k=args.top_k,
                expert_hidden=args.hidden, vocab=384, group_size=64)
    name = f"bench-estimate-{args.family}-{args.hidden}x{args.layers}x{args.experts}k{args.top_k}"
    path = Path(args.checkpoint) if args.checkpoint else default_cache_dir() / name
    return build_checkpoint(args.family, path, size=size)


def _options(args, cache_size, record=False) -> dict:
    opts = {"cache_sizes": cache_size, "direct_io": args.direct_io, "record": record}
    if args.emulate_storage:
        from golem.io.storage import parse_throttle

        opts["throttle"] = parse_throttle(args.emulate_storage)
    return opts


def decode_run(path: Path, args, cache_size, record_to=None) -> dict:
    """One golem run (golem.runtime.load + mlx-lm's stream_generate, as golem-run does):
    mean seconds per token after the first, and demand misses and read stall over them."""
    from mlx_lm.generate import stream_generate

    from golem.runtime.api import load

    with load(str(path), **_options(args, cache_size, record=record_to is not None)) as (model, tok):
        engine = model.golem.engine
        messages = [{"role": "user", "content": PROMPT}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tokens = tok.encode(prompt, add_special_tokens=False)
        t_first = cpu_first = misses_first = stall_first = None
        n = 0
        for _ in stream_generate(model, tok, tokens, max_tokens=args.tokens):
            n += 1
            if n == 1:
                t_first = time.perf_counter()
                cpu_first = time.process_time()
                misses_first = engine.stats.total().misses
                stall_first = engine.stats.decode_read_s
        t_end = time.perf_counter()
        cpu_end = time.process_time()
        steps = n - 1
        out = {
            "tokens": n,
            "s_per_token": (t_end - t_first) / steps,
            "cpu_s_per_token": (cpu_end - cpu_first) / steps,
            "misses_per_token": (engine.stats.total().misses - misses_first) / steps,
            "stall_s_per_token": (engine.stats.decode_read_s - stall_first) / steps,
        }
        if record_to is not None:
            engine.trace.save(str(record_to))
    return out


def measure_read_gb_per_s(path: Path, args, repeats: int = 3) -> float:
    """Sequential 8 MiB reads over every shard, through golem.io's positioned reads (and the
    emulated device, when one is given)."""
    from golem.io.ranges import ByteRange
    from golem.io.file_handles import FileHandles, aligned_empty
    from golem.io.positioned_reads import read_ranges

    chunk = 8 << 20
    shards = sorted(path.glob("*.safetensors"))
    buf = aligned_empty(chunk)
    rates = []
    with FileHandles(throttle=_options(args, 0).get("throttle")) as handles:
        for _ in range(repeats):
            total, t0 = 0, time.perf_counter()
            for shard in shards:
                size = shard.stat().st_size
                for off in range(0, size, chunk):
                    n = min(chunk, size - off)
                    total += read_ranges([ByteRange(str(shard), off, n, 0, "bench")], buf, handles=handles,
                                         direct=args.direct_io)
            rates.append(total / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def measure_demand_read_s(path: Path, args, reads: int = 400, seed: int = 0) -> tuple[float, int]:
    """Mean seconds of one demand read through golem's engine: read, then install into a
    slot (evaluated, as the next step's compute would)."""
    from golem.runtime.api import load

    rng = np.random.default_rng(seed)
    with load(str(path), **_options(args, args.top_k)) as (model, _):
        engine = model.golem.engine
        layers = sorted(engine.pools)
        times = []
        for i in range(reads):
            layer = layers[i % len(layers)]
            pool = engine.pools[layer]
            candidates = [e for e in range(pool.num_experts) if not pool.is_resident(e)]
            e = int(rng.choice(candidates))
            t0 = time.perf_counter()
            engine.load(layer, e)
            pool.settle()  # slot writes are lazy: count the install too
            times.append(time.perf_counter() - t0)
        nbytes = engine.pools[layers[0]].expert_nbytes
    return float(np.mean(times[len(layers):])), nbytes


def prefill_warm(trace) -> dict:
    """What the prompt leaves in each layer's cache: its experts, oldest use first."""
    warm = {}
    if trace.prefill is None:
        return warm
    pre = trace.experts[trace.prefill]
    for position in range(trace.num_layers):
        order: dict = {}
        for row in pre[:, position]:
            for e in sorted(int(x) for x in row if x >= 0):
                order.pop(e, None)
                order[e] = None
        warm[position] = list(order)
    return warm


def machine_profile(model, quant, compute_s: float, gb_per_s: float, latency_s: float, name: str) -> dict:
    """This machine in the estimator's file format: a RAM tier whose bandwidth makes the
    model's bytes per token take the measured compute time, and the storage as measured."""
    from golem.runtime.analysis.estimate import resident_time
    from golem.runtime.analysis.machines import MachineSpec
    from golem.runtime.analysis.placement import plan_placement

    unit = MachineSpec.from_dict({"tiers": [{"kind": "ram", "size": 1 << 40, "gb_per_s": 1.0},
                                            {"kind": "ssd", "gb_per_s": 1.0}]})
    bytes_per_token = resident_time(model, quant, unit, plan_placement(model, quant, unit))[1] * 1e9
    return {
        "name": "this-machine",
        "description": f"measured by bench_estimate.py on {name}",
        "tiers": [
            {"kind": "ram", "size": 1 << 40, "gb_per_s": bytes_per_token / compute_s / 1e9},
            {"kind": "ssd", "gb_per_s": gb_per_s, "read_latency_s": latency_s},
        ],
    }


def estimate_at(model, quant, profile: dict, cache_size: int, expert_nbytes: int, routing, replay):
    """Both estimates with a cache tier sized for exactly ``cache_size`` slots per layer."""
    from golem.runtime.analysis.estimate import estimate
    from golem.runtime.analysis.machines import MachineSpec

    size = quant.non_expert_nbytes(model) + model.num_moe_layers * cache_size * expert_nbytes + expert_nbytes // 2
    ram, ssd = profile["tiers"]
    machine = MachineSpec.from_dict(dict(profile, tiers=[dict(ram, size=size), ssd]))
    rep = estimate(model, quant, machine, routing=routing, replay=replay)
    assert rep.placement.slots == (cache_size,) * model.num_moe_layers, rep.placement.slots
    return rep


def main(argv=None) -> int:
    args = parse_args(argv)
    from golem.runtime.analysis.chunks import chunk_analysis
    from golem.runtime.analysis.estimate import ChunkRouting, TraceReplay
    from golem.runtime.analysis.model_size import Quantization, load_model_spec
    from golem.runtime.cli.progress import LONG_WORK, progress_bar
    from golem.runtime.trace import load_trace

    sizes = [int(c) for c in args.capacities.split(",")]
    if any(not args.top_k <= c < args.experts - 1 for c in sizes):
        raise SystemExit(f"--capacities must lie in [{args.top_k}, {args.experts - 1})")
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    path = build(args)
    model = load_model_spec(str(path))
    e_full = model.num_experts
    calib = e_full - 1

    # routing: one recorded run (greedy output, hence routing, is the same at every cache size)
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "trace.npz"
        warmup = decode_run(path, args, e_full, record_to=trace_path)  # also pays for compilation
        trace = load_trace(trace_path)
    replay = TraceReplay([trace], warm=prefill_warm(trace))
    expert_nbytes = int(trace.meta["expert_bytes"])
    expert_bpw = expert_nbytes * 8 / model.expert_params
    quant = Quantization(expert_bpw, expert_bpw, expert_bpw, 32.0)  # float32 checkpoints, 4-bit experts
    decode = trace.decode_only()
    chunk = max(8, min(32, decode.num_steps // 4))
    routing = ChunkRouting.from_stats(chunk_analysis(decode, chunk=chunk, coverages=(1.0,)), model)
    gb_per_s = measure_read_gb_per_s(path, args)

    # rounds: each measures the profile (compute time from the E-1 run less its read stall,
    # the cost of one demand read) and every cache size, in a rotated order, and compares
    # each size with the estimate from the same round's profile
    keys = ["all", calib, *sizes]
    runs: dict = {k: [] for k in keys}
    est: dict = {c: [] for c in [calib, *sizes]}
    chunk_est: dict = {c: [] for c in [calib, *sizes]}
    errors: dict = {c: [] for c in [calib, *sizes]}
    profiles = []
    bar = progress_bar(args.rounds * len(keys), "decode runs", work=LONG_WORK)  # minutes: always shown
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        here = {}
        for k in order:
            here[k] = decode_run(path, args, e_full if k == "all" else k)
            bar.update(1)
        read_s, nbytes = measure_demand_read_s(path, args, seed=r)
        assert nbytes == expert_nbytes, (nbytes, expert_nbytes)
        compute_s = here[calib]["s_per_token"] - here[calib]["stall_s_per_token"]
        latency_s = max(0.0, read_s - expert_nbytes / (gb_per_s * 1e9))
        profile = machine_profile(model, quant, compute_s, gb_per_s, latency_s, path.name)
        profiles.append({"compute_s": compute_s, "read_s": read_s, "latency_s": latency_s, "profile": profile})
        for k in keys:
            runs[k].append(here[k])
        for c in [calib, *sizes]:
            rep = estimate_at(model, quant, profile, c, expert_nbytes, routing, replay)
            measured = 1.0 / here[c]["s_per_token"]
            est[c].append(rep.trace.tokens_per_s)
            chunk_est[c].append(rep.chunk.tokens_per_s)
            errors[c].append(rep.trace.tokens_per_s / measured - 1.0)

    bar.close()
    med = {k: {f: statistics.median(x[f] for x in rs) for f in rs[0]} for k, rs in runs.items()}
    compute_s = statistics.median(p["compute_s"] for p in profiles)
    read_s = statistics.median(p["read_s"] for p in profiles)
    latency_s = statistics.median(p["latency_s"] for p in profiles)
    profile = machine_profile(model, quant, compute_s, gb_per_s, latency_s, path.name)
    if args.profile_out:
        Path(args.profile_out).write_text(json.dumps(profile, indent=1))

    rows = []
    for c in [calib, *sizes]:
        rep = estimate_at(model, quant, profile, c, expert_nbytes, routing, replay)
        rows.append({
            "capacity": c,
            "measured_tokens_per_s": round(1.0 / med[c]["s_per_token"], 3),
            "trace_estimate_tokens_per_s": round(statistics.median(est[c]), 3),
            "error_ratio": round(statistics.median(errors[c]), 4),
            "error_ratio_per_round": [round(e, 4) for e in errors[c]],
            "chunk_estimate_tokens_per_s": round(statistics.median(chunk_est[c]), 3),
            "live_misses_per_token": round(med[c]["misses_per_token"], 3),
            "simulated_misses_per_token": round(rep.trace.experts_read, 3),
            "live_stall_s_per_miss": med[c]["stall_s_per_token"] / max(med[c]["misses_per_token"], 1e-9),
            "calibration_point": c == calib,
        })

    print(f"checkpoint {path} ({model.num_moe_layers} MoE layers x {e_full} experts, top-{model.top_k}, "
          f"{expert_nbytes} bytes per expert); {args.tokens} tokens per run, medians of {args.rounds} rounds")
    print(f"profile: compute {compute_s * 1e3:.2f} ms/token with needed experts resident (cache path), "
          f"{med['all']['s_per_token'] * 1e3:.2f} ms/token with every expert resident (baseline); "
          f"reads {gb_per_s:.2f} GB/s, one demand read {read_s * 1e6:.0f} us "
          f"(latency {latency_s * 1e6:.0f} us + transfer)")
    print(f"{'slots':>5}{'measured tok/s':>16}{'trace est':>11}{'error':>8}{'chunk est':>11}"
          f"{'live miss/tok':>15}{'sim miss/tok':>14}{'stall/miss us':>15}")
    for r in rows:
        mark = "  (calibration point)" if r["calibration_point"] else ""
        print(f"{r['capacity']:>5}{r['measured_tokens_per_s']:>16.2f}{r['trace_estimate_tokens_per_s']:>11.2f}"
              f"{100 * r['error_ratio']:>7.1f}%{r['chunk_estimate_tokens_per_s']:>11.2f}"
              f"{r['live_misses_per_token']:>15.2f}{r['simulated_misses_per_token']:>14.2f}"
              f"{r['live_stall_s_per_miss'] * 1e6:>15.0f}{mark}")
    print("error: median over rounds of (estimate from the round's profile) / (measured) - 1")
    checked = [r for r in rows if not r["calibration_point"]]
    result = {
        "bench": "estimate",
        "max_abs_error_ratio": round(max(abs(r["error_ratio"]) for r in checked), 4),
        "target": 0.25,
        "baseline_all_resident_tokens_per_s": round(1.0 / med["all"]["s_per_token"], 3),
        "warmup_tokens_per_s": round(1.0 / warmup["s_per_token"], 3),
        "compute_s_per_token": compute_s,
        "read_gb_per_s": round(gb_per_s, 3),
        "demand_read_s": read_s,
        "rounds": args.rounds,
        "tokens": args.tokens,
        "rows": rows,
        "profile": profile,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
