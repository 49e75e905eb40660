"""How close does speculative prefetch bring offloaded decoding to the speed of a model that fits?

One generated qwen3_moe checkpoint (float32, 4-bit experts), the same prompts and the same
expert cache for every row, in one run:
  stock mlx-lm with everything resident; golem with every expert resident (cache = E);
  golem with every expert resident but every layer run through its slot table, as a layer
  that is not fully resident is (the hit path: one host sync per layer, no reads);
  golem at depth 0 (demand reads only), fixed depth 2 (governor off), governed depth 2 and
  the default (``--prefetch-depth auto``) with router lookahead, on the real disk (page cache);
  then with the storage emulator set so that depth 0 spends about half of each token
  waiting on reads: depth 0, fixed depth 1/2/3 with router lookahead, a noisy oracle (each look
  names a true expert with the probability published for lookahead, 0.72, and names no
  wrong one; at depth 2 a layer gets two looks), the oracle (the true future), governed
  depth 2 and the default. Row names are the JSON keys' prefixes (``disk_`` = page cache).
--shape qwen3-30b-a3b runs the same rows on a slice of a Qwen3-30B-A3B-shaped model.
It first prints a static card (compute-only time per token, expert bytes per token, storage
GB/s and the ideal time per token they imply), then the table, then one JSON line.

Rows run in rounds: each of --runs rounds loads and decodes every row once (stock mlx-lm too),
in an order reversed every other round, so that a shared machine whose speed drifts during
the run drifts on every row alike. The table gives each row's median over the rounds; each
ratio the issue sets a target for (full cache / stock, oracle / ideal, depth 0 / the
no-overlap bound, depth 2 / depth 0, governed and default against depth 0 and the best
fixed depth) is the median over the rounds of the ratio within a round, and is in the JSON
line (``full_over_stock``, ...). "x ideal" uses each round's own full-cache time as the
compute time (the emulated storage keeps the speed it was calibrated to).

Host syncs per token: mlx-lm's decode loop reads each token back once (1 per token); the
engine adds its own reads of routed ids (0 when every expert is resident, one per MoE layer
whose experts may be missing). The table reports 1 + the engine's count.
useful / wasted / late: prefetched experts per token that were used, that were evicted or
dropped unused, and that were still being read when their layer needed them.
named: of the reads the decode needed (prefetches used, plus demand reads), the share a prefetch
had asked for, in time or late. Recall counts every routed expert, most of them resident
already; this counts only those that had to be read, the ones speculation is for.
us/miss, us/layer: the engine's own host microseconds (wall) per decode miss (requests,
results, buffers; not the read, not the upload) and per decode layer with a host sync (not the
sync, the reads nor the uploads); cpu us/l: the same per layer in the engine thread's CPU
time; upl us: microseconds per miss putting it into its slot. profile_decode.py splits them
by phase.

    python benchmarks/bench_decode.py [--shape small|qwen3-30b-a3b] [--runs 3] [--tokens 24] [--capacity N]
                                      [--slot-writer auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

PROMPTS = [
    "Once upon a time there was a small computer that wanted to run a very large language model.",
    "def main(): print('hello world') return 0",
]


# Shapes: (model dimensions, slots per MoE layer, folder name). "qwen3-30b-a3b" is a slice
# of a Qwen3-30B-A3B-shaped model: its MoE dimensions (hidden 2048, 128 experts top-8,
# expert width 768, 4-bit) over one dense layer and 4 MoE layers; attention stays small.
SHAPES = {
    "small": (dict(hidden=1024, layers=8, experts=32, top_k=4, expert_hidden=1024, vocab=384, group_size=64),
              12, "bench-decode-qwen3_moe-32-drift"),
    "qwen3-30b-a3b": (dict(hidden=2048, layers=5, experts=128, top_k=8, expert_hidden=768, vocab=384, group_size=64),
                      48, "bench-decode-qwen3-30b-a3b-slice"),
    # Qwen3-30B-A3B's routing (128 experts, top-8, 48 slots) at widths where compute is
    # negligible: the engine's host work as a fast device would leave it exposed, without
    # a CPU backend's compute sharing the cores and caches with the engine thread.
    "qwen3-30b-a3b-host": (dict(hidden=128, layers=5, experts=128, top_k=8, expert_hidden=128, vocab=384,
                                group_size=64), 48, "bench-decode-qwen3-30b-a3b-host"),
}


def build(cache_dir: Path, shape: str = "small") -> Path:
    from golem.runtime.synthetic import Size, build_checkpoint

    dims, _, name = SHAPES[shape]
    size = Size(**dims)
    path = cache_dir / name
    if not (path / "config.json").exists():
        print(f"building {path} (once)...", file=sys.stderr)
        # A residual stream that drifts slowly from layer to layer, as in trained models:
        # router lookahead then reaches about the recall published for real ones (~70% one
        # layer ahead); the table prints the recall it measured.
        build_checkpoint("qwen3_moe", path, size=size, layers_per_shard=2, expert_scale=4.0, residual_scale=0.08)
    return path


def prompt_ids(tokenizer):
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]


def decode(model, prompts, tokens: int):
    """Greedy-decode every prompt with mlx-lm's loop; returns (decode seconds, tokens, outputs)."""
    from mlx_lm.generate import generate_step

    total_s, total_n, outs = 0.0, 0, []
    for p in prompts:
        out, start = [], None
        for i, (tok, _) in enumerate(generate_step(mx.array(p), model, max_tokens=tokens,
                                                   sampler=lambda x: mx.argmax(x, axis=-1))):
            if i == 0:
                start = time.perf_counter()  # decode time: after the first token (prefill excluded)
            out.append(int(tok))
        total_s += time.perf_counter() - start
        total_n += len(out) - 1
        outs.append(out)
    return total_s, total_n, outs


def run_stock(path, prompts, tokens, runs):
    from mlx_lm import load

    model, _ = load(str(path))
    decode(model, prompts[:1], 4)  # warm-up
    tps, outs = [], None
    for _ in range(runs):
        s, n, outs = decode(model, prompts, tokens)
        tps.append(n / s)
    return {"tps": statistics.median(tps), "syncs": 1.0, "stall_ms": 0.0, "hit_rate": 1.0, "gb_read": 0.0}, outs


def engine_of(model, table: bool = False, cpu_time: bool = False):
    """The loaded model's engine, ``table``: every full layer run through its slot table (the
    hit path of a partial layer); ``cpu_time``: its CPU time counted by phase."""
    engine = model.golem.engine
    if table:
        for pool in engine.pools.values():
            pool.use_table()
    engine.time_cpu(cpu_time)
    return engine


def run_golem(path, prompts, tokens, runs, *, table: bool = False, cpu_time: bool = False, label: str = "",
              **options):
    """Median figures of ``runs`` loads; ``table``: run every full layer through its slot table.

    Each row also carries the engine's host time by phase (``phase_<name>``: wall
    microseconds per partial layer; with ``cpu_time``, ``phase_cpu_<name>``: the engine
    thread's CPU time, whose clock costs a system call per lap) and ``measured_us``, the
    whole time of those layer calls timed from outside the engine.
    """
    from golem.runtime import load
    from golem.runtime.phases import MOMENTS, PHASES

    rows, outs = [], None
    for _ in range(runs):
        with load(str(path), **options) as (model, _):
            e = engine_of(model, table, cpu_time)
            outer = _time_partial_layers(e)
            s, n, outs = decode(model, prompts, tokens)
            st, t = e.stats, e.stats.total()
            steps = max(st.decode_steps, 1)
            row = {
                "tps": n / s,
                "syncs": 1.0 + st.decode_host_syncs / steps,
                "stall_ms": 1000 * st.decode_read_s / steps,
                "hit_rate": t.hit_rate,
                "gb_read": t.bytes_read / 1e9,
                "misses_per_token": st.decode_misses / steps,
                "writer": next(iter(e.pools.values())).writer.name,
            }
            us = st.host_us()
            if st.decode_misses:
                row.update(us_per_miss=us["per_miss_us"], upload_us_per_miss=us["write_per_miss_us"])
                if cpu_time:
                    row.update(cpu_us_per_miss=us["cpu_per_miss_us"])
            if st.decode_partial_layers:
                if cpu_time:
                    row.update(cpu_us_per_layer=us["cpu_per_layer_us"])
                row.update(us_per_layer=us["per_layer_us"], sync_us_per_layer=us["sync_per_layer_us"],
                           measured_us=1e6 * outer["s"] / max(outer["layers"], 1),
                           **{f"{k}_per_layer": v / max(outer["layers"], 1)
                              for k, v in zip(("sched_calls", "loop_wakes", "reader_wakes"), outer["handoffs"])},
                           phase_sum_us=1e6 * st.phases.total_s() / st.phases.layers,
                           early_share=st.early_layers / st.decode_partial_layers,
                           early_redone_per_layer=st.early_redone / st.decode_partial_layers,
                           **{f"to_{m}_us": st.phases.after_sync_us(m) for m in MOMENTS},
                           **{f"{m}_share": st.phases.reached[m] / st.decode_partial_layers for m in MOMENTS})
                wall, cpu = st.phases.per_layer_us(), st.phases.per_layer_us(cpu=True)
                row.update({f"phase_{k}": wall[k] for k in PHASES})
                if cpu_time:
                    row.update({f"phase_cpu_{k}": cpu[k] for k in PHASES})
            if e.scheduler is not None and st.decode_misses:
                sched = e.scheduler.statistics()
                row.update(demand_start_p50_us=1e6 * sched.demand_start_p50_s,
                           demand_start_p99_us=1e6 * sched.demand_start_p99_s)
            if e.prefetcher is not None:
                p = e.prefetcher.totals()
                row.update(recall=p.recall, useful=p.useful / steps, wasted=p.wasted / steps, late=p.late / steps,
                           named=(p.useful + p.late) / max(p.useful + st.decode_misses, 1))
            rows.append(row)
    med = {k: (statistics.median(r[k] for r in rows) if k != "writer" else rows[0][k]) for k in rows[0]}
    print(f"  row done: {label}: {med['tps']:.2f} tok/s", file=sys.stderr)
    return med, outs


def _time_partial_layers(engine):
    """Wrap ``engine.forward`` to time, from outside, the decode calls the engine counts as
    partial layers (the check that its phases miss nothing)."""
    inner, acc = engine.forward, {"s": 0.0, "layers": 0, "handoffs": [0, 0, 0]}
    sched = engine.scheduler
    handoffs = sched.handoffs if sched is not None else (lambda: (0, 0, 0))

    def forward(layer, glu, x, indices):
        before = engine.stats.phases.layers
        h0 = handoffs()
        t0 = time.perf_counter()
        y = inner(layer, glu, x, indices)
        if engine.stats.phases.layers != before:
            acc["s"] += time.perf_counter() - t0
            acc["layers"] += 1
            acc["handoffs"] = [a + b - c for a, b, c in zip(acc["handoffs"], handoffs(), h0)]
        return y

    engine.forward = forward
    return acc


def ensure_packed(path: Path) -> None:
    """The checkpoint at ``path`` with a valid packed copy of its experts (``golem-pack``)."""
    from golem.io.index import CheckpointError
    from golem.runtime import pack

    try:
        if pack(str(path), check=True) is not None:
            return
    except CheckpointError:  # stale: the checkpoint was rebuilt since
        pass
    pack(str(path))


class Setup:
    """One shape's checkpoint, prompts, depth-0 truth and emulated storage speed, and the
    options of every row (``rows()``), shared by this benchmark and profile_decode.py.

    Args:
        shape: a key of ``SHAPES``.
        cache_dir: where checkpoints are built.
        tokens: decoded tokens per prompt.
        cache_size: slots per MoE layer (None: the shape's).
        threshold: prefetch threshold of the explicit-depth rows.
        slot_writer: how experts reach their slots (None: the backend's).
        cpu_time: also count the engine thread's CPU time by phase (``Engine.time_cpu``).
        packed: read experts from the checkpoint's packed copy (``golem-pack``; made here when
            missing or stale), one read each; False: from its stacked tensors, nine reads each.
    """

    def __init__(self, shape: str, cache_dir: Path, tokens: int, cache_size=None, threshold: float = 0.3,
                 slot_writer=None, cpu_time: bool = False, packed: bool = False):
        from mlx_lm.utils import load_tokenizer

        from golem.runtime import load

        self.shape = shape
        self.path = build(cache_dir, shape)
        self.prompts = prompt_ids(load_tokenizer(self.path))
        self.tokens = tokens
        self.cache_size = cache_size or SHAPES[shape][1]
        self.threshold = threshold
        self.cpu_time = cpu_time
        if packed:
            ensure_packed(self.path)
        self.packed = packed
        self.W = {"slot_writer": slot_writer, "packed_experts": packed}
        # The truth for the oracles: this very run's routing at depth 0 (same tokens, same steps).
        with load(str(self.path), cache_sizes=self.cache_size, record=True, **self.W) as (model, _):
            _, _, self.truth_outputs = decode(model, self.prompts, tokens)
            self.truth = model.golem.engine.trace.trace().decode_only()
            self.expert_nbytes = model.golem.index.expert_nbytes(model.golem.experts[0].layer)
            steps = max(model.golem.engine.stats.decode_steps, 1)
            self.misses_per_token = model.golem.engine.stats.decode_misses / steps
        self.gb_per_s = None

    def calibrate(self, compute_s: float) -> None:
        """Emulated storage: I/O time per token at depth 0 = compute time per token."""
        self.compute_s = compute_s
        self.bytes_per_token = self.misses_per_token * self.expert_nbytes
        self.gb_per_s = self.bytes_per_token / compute_s / 1e9
        self.ideal_s = max(compute_s, self.bytes_per_token / (self.gb_per_s * 1e9))

    def rows(self, names=None):
        """``{row: options for run_golem}``, in the table's order (``names``: only those)."""
        from golem.runtime.prefetch import PrefetchConfig

        cache_size, th, W = self.cache_size, self.threshold, self.W
        fixed = lambda d: PrefetchConfig(depth=d, threshold=th, governor=False)  # noqa: E731
        governed = PrefetchConfig(depth=2, threshold=th)
        auto = PrefetchConfig.auto_depth(threshold=th)  # golem-run's default with experts offloaded
        out = {
            "full_cache": dict(W),
            "warm_resident": dict(W, table=True),
            "disk_depth0": dict(W, cache_sizes=cache_size),
            "disk_depth2": dict(W, cache_sizes=cache_size, prefetch=fixed(2)),
            "disk_governed2": dict(W, cache_sizes=cache_size, prefetch=governed),
            "disk_default": dict(W, cache_sizes=cache_size, prefetch=auto),
        }
        if self.gb_per_s is not None:
            emu = dict(W, cache_sizes=cache_size, throttle_gb_per_s=self.gb_per_s)
            out["depth0"] = dict(emu)
            for d in (1, 2, 3):
                out[f"depth{d}"] = dict(emu, prefetch=fixed(d))
            out["noisy_oracle"] = dict(emu, prefetch=fixed(2), predictor="noisy-oracle",
                                       predictor_options={"truth": self.truth, "recall": 0.72})
            out["oracle"] = dict(emu, prefetch=fixed(2), predictor="oracle", predictor_options={"truth": self.truth})
            out["governed2"] = dict(emu, prefetch=governed)
            out["default"] = dict(emu, prefetch=auto)
        return {k: v for k, v in out.items() if names is None or k in names}

    def load_options(self, options: dict) -> dict:
        """A row's options as ``load`` takes them (the emulated storage made), plus ``table``."""
        from golem.io.storage import Throttle

        options = dict(options)
        gb = options.pop("throttle_gb_per_s", None)
        if gb is not None:
            options["throttle"] = Throttle(gb)
        return options

    def run(self, name: str, options: dict, runs: int):
        return run_golem(self.path, self.prompts, self.tokens, runs, label=name, cpu_time=self.cpu_time,
                         **self.load_options(options))


STORAGE = {"stock": "-", "full_cache": "-", "warm_resident": "-"}


def calibrated_rows(setup: Setup, names, script: str) -> dict:
    """``setup``'s rows, its emulated storage calibrated on a full-cache run first; exits
    naming ``script`` when one of ``names`` is not a row."""
    full, _ = setup.run("full_cache", setup.rows(["full_cache"])["full_cache"], 1)
    setup.calibrate(1.0 / full["tps"])
    rows = setup.rows()
    unknown = [n for n in names if n not in rows]
    if unknown:
        sys.exit(f"{script}: unknown row(s) {', '.join(unknown)}; choose from {', '.join(rows)}")
    return rows


def run_rounds(setup: Setup, rows: dict, rounds: int):
    """Every row (and stock mlx-lm) once per round, one load each, the order reversed every
    other round (a machine that drifts during the run drifts on every row alike); the rows
    of each round (``[{row: figures}]``) and whether every run's tokens were stock's."""
    order = ["stock", *rows]
    got, identical = [], True
    for r in range(rounds):
        this = {}
        for name in (order if r % 2 == 0 else order[::-1]):
            if name == "stock":
                this[name], outs = run_stock(setup.path, setup.prompts, setup.tokens, 1)
                stock_outs = outs
            else:
                this[name], outs = setup.run(name, rows[name], 1)
            this[name]["outputs"] = outs
        identical = identical and all(row.pop("outputs") == stock_outs for row in this.values())
        got.append({name: this[name] for name in order})
    return got, identical


def emulated_io_s(setup: Setup) -> float:
    """Seconds per token the emulated storage takes to read depth 0's misses."""
    return setup.bytes_per_token / (setup.gb_per_s * 1e9)


def ideal_s(setup: Setup, got: dict) -> float:
    """One round's ideal time per token: max(its full-cache compute, the emulated I/O)."""
    return max(1.0 / got["full_cache"]["tps"], emulated_io_s(setup))


def criteria(setup: Setup, rounds) -> dict:
    """The issue's ratios, each the median over rounds of the ratio within a round."""
    med = lambda f: statistics.median(f(got) for got in rounds)  # noqa: E731
    tps = lambda got, name: got[name]["tps"]  # noqa: E731
    io_s = emulated_io_s(setup)
    best = lambda got: max(tps(got, f"depth{d}") for d in (0, 1, 2, 3))  # noqa: E731
    return {
        "full_over_stock": med(lambda g: tps(g, "full_cache") / tps(g, "stock")),
        "warm_over_stock": med(lambda g: tps(g, "warm_resident") / tps(g, "stock")),
        "oracle_over_ideal": med(lambda g: tps(g, "oracle") * ideal_s(setup, g)),
        "depth0_over_no_overlap": med(lambda g: tps(g, "depth0") * (1.0 / tps(g, "full_cache") + io_s)),
        "depth2_over_depth0_disk": med(lambda g: tps(g, "disk_depth2") / tps(g, "disk_depth0")),
        "depth2_over_depth0": med(lambda g: tps(g, "depth2") / tps(g, "depth0")),
        "governed2_over_depth0_disk": med(lambda g: tps(g, "disk_governed2") / tps(g, "disk_depth0")),
        "default_over_depth0_disk": med(lambda g: tps(g, "disk_default") / tps(g, "disk_depth0")),
        "governed2_over_best": med(lambda g: tps(g, "governed2") / best(g)),
        "default_over_best": med(lambda g: tps(g, "default") / best(g)),
    }


def main() -> None:
    from golem.runtime.synthetic import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small", choices=tuple(SHAPES),
                    help="the model: small (8 layers, 32 experts top-4) or a Qwen3-30B-A3B-shaped slice")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--capacity", type=int, default=None, help="slots per MoE layer (default: the shape's)")
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--dir", type=Path, default=default_cache_dir())
    ap.add_argument("--slot-writer", default=None, choices=("auto", "host", "device", "device-load"),
                    help="how golem puts experts into slots (default: the backend's)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="also count the engine thread's CPU time per partial layer (a system call per "
                         "phase lap, on the per-token path: off by default, as in golem's own use)")
    ap.add_argument("--packed", action="store_true",
                    help="read experts from the checkpoint's packed copy (golem-pack; one read each), made if "
                         "missing; default: from its stacked tensors (nine reads each)")
    args = ap.parse_args()
    setup = Setup(args.shape, args.dir, args.tokens, args.capacity, args.threshold, args.slot_writer,
                  args.cpu_time, packed=args.packed)
    R, N = args.runs, args.tokens
    rows = calibrated_rows(setup, list(setup.rows()), "bench_decode.py")
    rounds, identical = run_rounds(setup, rows, R)
    results = {name: {k: (statistics.median(r[name][k] for r in rounds) if k != "writer" else rounds[0][name][k])
                      for k in rounds[0][name]} for name in rounds[0]}
    crit = criteria(setup, rounds)
    for name, r in results.items():
        r["x_ideal"] = statistics.median(got[name]["tps"] * ideal_s(setup, got) for got in rounds)

    cache_size = setup.cache_size
    dims = SHAPES[args.shape][0]
    print(f"checkpoint {setup.path.name}: hidden {dims['hidden']}, {dims['experts']} experts/layer, top-{dims['top_k']}, "
          f"expert width {dims['expert_hidden']}, cache {cache_size} slots/layer, "
          f"{len(setup.prompts)} prompts x {N} tokens, {R} rounds of every row (median; ratios paired by round)")
    print(f"backend {mx.default_device()}, mlx {mx.__version__}, slot writer {results['full_cache']['writer']}, "
          f"experts {'packed (one read each)' if setup.packed else 'stacked (one read per tensor)'}")
    print("static card")
    print(f"  compute-only time per token (every expert resident): {1000 * setup.compute_s:8.2f} ms")
    print(f"  compute per MoE layer (token time / MoE layers):     {1e6 * setup.compute_s / (dims['layers'] - 1):8.0f} us")
    print(f"  expert bytes read per decoded token at depth 0:      {setup.bytes_per_token / 1e6:8.2f} MB")
    print(f"  emulated storage:                                    {setup.gb_per_s:8.3f} GB/s")
    print(f"  ideal time per token max(compute, I/O):              {1000 * setup.ideal_s:8.2f} ms = "
          f"{1 / setup.ideal_s:.2f} tokens/s")
    print(f"{'row':<14} {'storage':<9} {'tok/s':>7} {'x ideal':>8} {'stall ms':>9} {'syncs/tok':>9} "
          f"{'hit rate':>8} {'GB read':>8} {'recall':>7} {'named':>6} {'useful':>6} {'wasted':>6} {'late':>5} "
          f"{'us/miss':>7} {'upl us':>7} {'us/layer':>8} {'cpu us/l':>8}")
    for name, r in results.items():
        rec = f"{100 * r['recall']:.0f}%" if "recall" in r else "-"
        named = f"{100 * r['named']:.0f}%" if "named" in r else "-"
        pf = " ".join(f"{r[k]:{w}.1f}" if k in r else f"{'-':>{w}}" for k, w in (("useful", 6), ("wasted", 6), ("late", 5)))
        host = " ".join(f"{r[k]:{w}.0f}" if k in r else f"{'-':>{w}}"
                        for k, w in (("us_per_miss", 7), ("upload_us_per_miss", 7), ("us_per_layer", 8),
                                     ("cpu_us_per_layer", 8)))
        storage = STORAGE.get(name, "disk" if name.startswith("disk_") else "emulated")
        print(f"{name:<14} {storage:<9} {r['tps']:7.2f} {r['x_ideal']:8.2f} "
              f"{r['stall_ms']:9.2f} {r['syncs']:9.1f} {100 * r['hit_rate']:7.1f}% {r['gb_read']:8.3f} {rec:>7} {named:>6} {pf} {host}")
    print(f"identical tokens in every row of every round: {identical}")
    print(f"full cache / stock: {crit['full_over_stock']:.3f} (target >= 0.97); "
          f"warm, every routed expert resident, / stock: {crit['warm_over_stock']:.3f}; "
          f"oracle / ideal: {crit['oracle_over_ideal']:.3f} (target >= 0.92); "
          f"depth 0 emulated / no-overlap bound: {crit['depth0_over_no_overlap']:.3f} (target >= 0.9)")
    print(f"fixed depth 2 / depth 0, page cache: {crit['depth2_over_depth0_disk']:.3f}; "
          f"emulated: {crit['depth2_over_depth0']:.3f} (target >= 1.3)")
    print(f"page cache, / depth 0: governed depth 2 {crit['governed2_over_depth0_disk']:.3f}, "
          f"default {crit['default_over_depth0_disk']:.3f} (target >= 1.0); "
          f"emulated, / best fixed depth: governed depth 2 {crit['governed2_over_best']:.3f}, "
          f"default {crit['default_over_best']:.3f} (target >= 0.95)")
    summary = {
        "shape": args.shape,
        "resident_tps": results["stock"]["tps"],
        "warm_resident_syncs_per_token": results["warm_resident"]["syncs"],
        "warm_resident_sync_us_per_layer": results["warm_resident"].get("sync_us_per_layer"),
        "depth0_upload_us_per_miss": results["disk_depth0"].get("upload_us_per_miss"),
        "slot_writer": results["full_cache"]["writer"],
        "packed": setup.packed,
        "backend": str(mx.default_device()),
        "ideal_tps": 1 / setup.ideal_s,
        "resident_syncs_per_token": results["stock"]["syncs"],
        "full_cache_syncs_per_token": results["full_cache"]["syncs"],
        "depth2_syncs_per_token": results["depth2"]["syncs"],
        "depth2_recall": results["depth2"].get("recall"),
        "storage_gb_per_s": setup.gb_per_s,
        "compute_ms_per_token": 1000 * setup.compute_s,
        "compute_us_per_moe_layer": 1e6 * setup.compute_s / (dims["layers"] - 1),
        "expert_bytes_per_token": setup.bytes_per_token,
        "identical": identical,
        "runs": R,
        **crit,
    }
    for name, r in results.items():
        summary[f"{name}_tps"] = r["tps"]
        summary[f"{name}_us_per_layer"] = r.get("us_per_layer")
        summary[f"{name}_cpu_us_per_layer"] = r.get("cpu_us_per_layer")
        summary[f"{name}_us_per_miss"] = r.get("us_per_miss")
        if "named" in r:
            summary[f"{name}_named"] = r["named"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
