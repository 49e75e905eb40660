"""How close does speculative prefetch bring offloaded decoding to the speed of a model that fits?

One generated qwen3_moe checkpoint (float32, 4-bit experts), the same prompts and the same
expert cache for every row, in one run:
  stock mlx-lm with everything resident; golem with every expert resident (cache = E);
  golem with every expert resident but every layer run through its slot table, as a layer
  that is not fully resident is (the hit path: one host sync per layer, no reads);
  golem at depth 0 (demand reads only) and depth 2 with router lookahead, on the real disk;
  then with the storage emulator set so that depth 0 spends about half of each token
  waiting on reads: depth 0, depth 1/2/3 with router lookahead, a noisy oracle (each look
  names a true expert with the probability published for lookahead, 0.72, and names no
  wrong one; at depth 2 a layer gets two looks), and the oracle (the true future).
It first prints a static card (compute-only time per token, expert bytes per token, storage
GB/s and the ideal time per token they imply), then the table (median of --runs runs), then
one JSON line.

Host syncs per token: mlx-lm's decode loop reads each token back once (1 per token); the
engine adds its own reads of routed ids (0 when every expert is resident, one per MoE layer
whose experts may be missing). The table reports 1 + the engine's count.
useful / wasted / late: prefetched experts per token that were used, that were evicted or
dropped unused, and that were still being read when their layer needed them.
us/miss, us/layer: the engine's own host microseconds per decode miss (requests, bookkeeping,
buffers; not the read, not the upload) and per decode layer with a host sync (not the sync,
the reads nor the uploads); upl us: microseconds per miss putting it into its slot.

    python benchmarks/bench_decode.py [--runs 3] [--tokens 24] [--capacity 12] [--slot-writer auto]
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


def build(cache_dir: Path, experts: int) -> Path:
    from golem.runtime.synthetic import Size, build_checkpoint

    size = Size(hidden=1024, layers=8, experts=experts, top_k=4, expert_hidden=1024, vocab=384, group_size=64)
    path = cache_dir / f"bench-decode-qwen3_moe-{experts}-drift"
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


def run_golem(path, prompts, tokens, runs, *, table: bool = False, **options):
    """Median figures of ``runs`` loads; ``table``: run every full layer through its slot table."""
    from golem.runtime import load

    rows, outs = [], None
    for _ in range(runs):
        with load(str(path), **options) as (model, _):
            e = model.golem.engine
            if table:
                for pool in e.pools.values():
                    pool.use_table()
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
            if st.decode_partial_layers:
                row.update(us_per_layer=us["per_layer_us"], sync_us_per_layer=us["sync_per_layer_us"])
            if e.prefetcher is not None:
                p = e.prefetcher.totals()
                row.update(recall=p.recall, useful=p.useful / steps, wasted=p.wasted / steps, late=p.late / steps)
            rows.append(row)
    med = {k: (statistics.median(r[k] for r in rows) if k != "writer" else rows[0][k]) for k in rows[0]}
    depth = options["prefetch"].depth if options.get("prefetch") else 0
    print(f"  row done: cache {options.get('capacities', 'all')}, depth {depth} {options.get('predictor', '')}"
          f"{', slot tables' if table else ''}: {med['tps']:.2f} tok/s", file=sys.stderr)
    return med, outs


def main() -> None:
    from golem.io.storage import Throttle
    from golem.runtime.prefetch import PrefetchConfig
    from golem.runtime.synthetic import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--capacity", type=int, default=12)
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--dir", type=Path, default=default_cache_dir())
    ap.add_argument("--slot-writer", default=None, choices=("auto", "host", "device", "device-load"),
                    help="how golem puts experts into slots (default: the backend's)")
    args = ap.parse_args()
    path = build(args.dir, args.experts)
    from mlx_lm.utils import load_tokenizer

    prompts = prompt_ids(load_tokenizer(path))
    cap = args.capacity
    R, N = args.runs, args.tokens
    results, outputs = {}, {}

    results["stock"], outputs["stock"] = run_stock(path, prompts, N, R)
    W = {"slot_writer": args.slot_writer}
    results["full_cache"], outputs["full_cache"] = run_golem(path, prompts, N, R, **W)
    results["warm_resident"], outputs["warm_resident"] = run_golem(path, prompts, N, R, table=True, **W)
    # The truth for the oracles: this very run's routing at depth 0 (same tokens, same steps).
    from golem.runtime import load

    with load(str(path), capacities=cap, record=True, **W) as (model, _):
        _, _, outs = decode(model, prompts, N)
        truth = model.golem.engine.trace.trace().decode_only()
        expert_nbytes = model.golem.index.expert_nbytes(model.golem.experts[0].layer)
    results["depth0_disk"], outputs["depth0_disk"] = run_golem(path, prompts, N, R, capacities=cap, **W)
    results["depth2_disk"], outputs["depth2_disk"] = run_golem(
        path, prompts, N, R, capacities=cap, prefetch=PrefetchConfig(depth=2, threshold=args.threshold), **W)

    compute_s = 1.0 / results["full_cache"]["tps"]
    bytes_per_token = results["depth0_disk"]["misses_per_token"] * expert_nbytes
    gb_per_s = bytes_per_token / compute_s / 1e9  # I/O time per token = compute time per token
    ideal_s = max(compute_s, bytes_per_token / (gb_per_s * 1e9))

    def emulated(**options):
        return run_golem(path, prompts, N, R, capacities=cap, throttle=Throttle(gb_per_s), **W, **options)

    results["depth0"], outputs["depth0"] = emulated()
    for d in (1, 2, 3):
        results[f"depth{d}"], outputs[f"depth{d}"] = emulated(prefetch=PrefetchConfig(depth=d, threshold=args.threshold))
    results["noisy_oracle"], outputs["noisy_oracle"] = emulated(
        prefetch=PrefetchConfig(depth=2, threshold=args.threshold), predictor="noisy-oracle",
        predictor_options={"truth": truth, "recall": 0.72})
    results["oracle"], outputs["oracle"] = emulated(
        prefetch=PrefetchConfig(depth=2, threshold=args.threshold), predictor="oracle", predictor_options={"truth": truth})

    identical = all(o == outputs["stock"] for o in outputs.values())
    print(f"checkpoint {path.name}: {args.experts} experts/layer, top-4, cache {cap} slots/layer, "
          f"{len(prompts)} prompts x {N} tokens, median of {R} runs")
    print(f"backend {mx.default_device()}, mlx {mx.__version__}, slot writer {results['full_cache']['writer']}")
    print("static card")
    print(f"  compute-only time per token (every expert resident): {1000 * compute_s:8.2f} ms")
    print(f"  expert bytes read per decoded token at depth 0:      {bytes_per_token / 1e6:8.2f} MB")
    print(f"  emulated storage:                                    {gb_per_s:8.3f} GB/s")
    print(f"  ideal time per token max(compute, I/O):              {1000 * ideal_s:8.2f} ms = {1 / ideal_s:.2f} tokens/s")
    print(f"{'row':<14} {'storage':<9} {'tok/s':>7} {'x ideal':>8} {'stall ms':>9} {'syncs/tok':>9} "
          f"{'hit rate':>8} {'GB read':>8} {'recall':>7} {'useful':>6} {'wasted':>6} {'late':>5} "
          f"{'us/miss':>7} {'upl us':>7} {'us/layer':>8}")
    storage = {"stock": "-", "full_cache": "-", "warm_resident": "-", "depth0_disk": "disk", "depth2_disk": "disk"}
    for name, r in results.items():
        rec = f"{100 * r['recall']:.0f}%" if "recall" in r else "-"
        pf = " ".join(f"{r[k]:{w}.1f}" if k in r else f"{'-':>{w}}" for k, w in (("useful", 6), ("wasted", 6), ("late", 5)))
        host = " ".join(f"{r[k]:{w}.0f}" if k in r else f"{'-':>{w}}"
                        for k, w in (("us_per_miss", 7), ("upload_us_per_miss", 7), ("us_per_layer", 8)))
        print(f"{name:<14} {storage.get(name, 'emulated'):<9} {r['tps']:7.2f} {r['tps'] * ideal_s:8.2f} "
              f"{r['stall_ms']:9.2f} {r['syncs']:9.1f} {100 * r['hit_rate']:7.1f}% {r['gb_read']:8.3f} {rec:>7} {pf} {host}")
    print(f"identical tokens in every row: {identical}")
    full_x = results["full_cache"]["tps"] / results["stock"]["tps"]
    warm_x = results["warm_resident"]["tps"] / results["stock"]["tps"]
    disk_x = results["depth2_disk"]["tps"] / results["depth0_disk"]["tps"]
    d2_x = results["depth2"]["tps"] / results["depth0"]["tps"]
    print(f"full cache / stock: {full_x:.3f} (target >= 0.95 on a CPU, >= 0.97 on a GPU); "
          f"warm, every routed expert resident, / stock: {warm_x:.3f}; "
          f"oracle / ideal: {results['oracle']['tps'] * ideal_s:.3f} (target >= 0.85); "
          f"depth 0 emulated / ideal: {results['depth0']['tps'] * ideal_s:.3f} (GPU target >= 0.45)")
    print(f"depth 2 / depth 0, page cache: {disk_x:.3f} (target >= 1); emulated: {d2_x:.3f} (GPU target >= 1.3)")
    print(json.dumps({
        "resident_tps": results["stock"]["tps"],
        "full_cache_tps": results["full_cache"]["tps"],
        "warm_resident_tps": results["warm_resident"]["tps"],
        "warm_resident_syncs_per_token": results["warm_resident"]["syncs"],
        "warm_resident_us_per_layer": results["warm_resident"].get("us_per_layer"),
        "warm_resident_sync_us_per_layer": results["warm_resident"].get("sync_us_per_layer"),
        "depth0_us_per_miss": results["depth0_disk"].get("us_per_miss"),
        "depth0_upload_us_per_miss": results["depth0_disk"].get("upload_us_per_miss"),
        "depth0_us_per_layer": results["depth0_disk"].get("us_per_layer"),
        "slot_writer": results["full_cache"]["writer"],
        "backend": str(mx.default_device()),
        "depth0_tps": results["depth0"]["tps"],
        "depth1_tps": results["depth1"]["tps"],
        "depth2_tps": results["depth2"]["tps"],
        "depth3_tps": results["depth3"]["tps"],
        "noisy_oracle_tps": results["noisy_oracle"]["tps"],
        "oracle_tps": results["oracle"]["tps"],
        "ideal_tps": 1 / ideal_s,
        "disk_depth0_tps": results["depth0_disk"]["tps"],
        "disk_depth2_tps": results["depth2_disk"]["tps"],
        "resident_syncs_per_token": results["stock"]["syncs"],
        "full_cache_syncs_per_token": results["full_cache"]["syncs"],
        "depth2_syncs_per_token": results["depth2"]["syncs"],
        "depth2_recall": results["depth2"].get("recall"),
        "storage_gb_per_s": gb_per_s,
        "compute_ms_per_token": 1000 * compute_s,
        "expert_bytes_per_token": bytes_per_token,
        "identical": identical,
        "runs": R,
    }))


if __name__ == "__main__":
    main()
