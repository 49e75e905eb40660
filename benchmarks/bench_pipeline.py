"""What does splitting an offloaded model across ranks cost, and does boundary prefetch keep
the guesses for each rank's first layers as good as on one machine?

One generated qwen3_moe checkpoint (float32, 4-bit experts, a residual stream that drifts
slowly, so router lookahead reaches about the recall of trained models), the same prompt,
expert cache, prefetch depth and (emulated) storage for every row; 1, 2 and 3 ranks over
localhost on the ring backend (each rank a process, as ``mlx.launch --backend ring -n N``
starts them), with boundary prefetch on and off. The 1-rank row is single-process golem:
the baseline. Every row's greedy tokens are checked against the baseline's.

Columns (median of --runs launches): decode tok/s (rank 0's clock; over localhost on a
shared CPU this says little, the counters do), MB read (all ranks), stall ms/token (time
the ranks waited on reads, summed), recall (all MoE layers), first-layer recall (the first
MoE layer of every rank that has a previous one; 0 when nothing guessed them; "same, 1
machine": the baseline's recall on the same layers), misses (all ranks), and whether the
tokens equal the baseline's. Ends with one JSON line.

    python benchmarks/bench_pipeline.py [--runs 3] [--tokens 32] [--ranks 1,2,3] [--storage 1.0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Once upon a time there was a small computer that wanted to run a very large language model."


def build(cache_dir: Path) -> Path:
    from golem.runtime.synthetic import Size, build_checkpoint

    size = Size(hidden=512, layers=7, experts=32, top_k=4, expert_hidden=512, vocab=384, group_size=64)
    path = cache_dir / "bench-pipeline-qwen3_moe"
    if not (path / "config.json").exists():
        print(f"building {path} (once)...", file=sys.stderr)
        build_checkpoint("qwen3_moe", path, size=size, layers_per_shard=2, expert_scale=4.0, residual_scale=0.08)
    return path


# -- one rank (this script started with --worker) ---------------------------------------------
def worker(spec: dict) -> int:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    import golem.runtime
    from golem.runtime.pipeline import PipelineConfig, gather_statistics
    from golem.runtime.prefetch import PrefetchConfig

    pipeline = PipelineConfig(boundary_prefetch=spec["boundary"])
    with golem.runtime.load(spec["path"], pipeline=pipeline, cache_size=spec["cache"],
                            prefetch=PrefetchConfig(depth=spec["depth"]), emulate_storage=spec["storage"]) as (
            model, tokenizer):
        runtime = model.golem
        prompt = mx.array(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                        add_generation_prompt=True))
        tokens, t_first = [], None
        for token, _ in generate_step(prompt, model, max_tokens=spec["tokens"],
                                      sampler=lambda x: mx.argmax(x, axis=-1)):
            tokens.append(int(token))  # the loop's own read-back of each token
            if t_first is None:
                t_first = time.perf_counter()
        decode_s = time.perf_counter() - t_first
        rows = gather_statistics(runtime)
        pf = runtime.engine.prefetcher
        per_layer = {l: [s.true, s.predicted_true] for l, s in pf.stats.items()} if pf is not None else {}
        if runtime.pipeline.rank == 0:
            print(json.dumps(dict(tokens=tokens, decode_s=decode_s, rows=rows, per_layer=per_layer)), flush=True)
    return 0


# -- the driver ----------------------------------------------------------------------------
def launch(n: int, spec: dict, timeout_s: float) -> dict:
    from golem.runtime.pipeline import launch_local

    argv = [sys.executable, __file__, "--worker", json.dumps(spec)]
    with tempfile.TemporaryDirectory() as tmp:
        if n == 1:  # a group of one: single-process golem
            procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
        else:
            procs = launch_local(n, argv, hostfile_dir=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            outs = [p.communicate(timeout=timeout_s) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"bench_pipeline: a rank of {n} failed:\n{err[-3000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def summarise(result: dict) -> dict:
    rows = result["rows"]
    steps = max(r["decode_steps"] for r in rows)
    true = sum(r["pf_true"] for r in rows)
    hit = sum(r["pf_predicted"] for r in rows)
    first_true = sum(r["first_true"] for r in rows[:-1]) if len(rows) > 1 else 0
    first_hit = sum(r["first_predicted"] for r in rows[:-1]) if len(rows) > 1 else 0
    return dict(
        tok_s=(len(result["tokens"]) - 1) / result["decode_s"] if result["decode_s"] > 0 else 0.0,
        mb_read=sum(r["bytes_read"] for r in rows) / 1e6,
        stall_ms=sum(r["stall_us"] for r in rows) / 1000 / max(steps, 1),
        misses=sum(r["misses"] for r in rows),
        recall=hit / true if true else 0.0,
        # No guess reached a rank's first layer (boundary prefetch off): recall 0.
        first_recall=first_hit / first_true if first_true else (0.0 if len(rows) > 1 else None),
        first_layers=[r["first_layer"] for r in rows[:-1]],
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="launches per row (median)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--ranks", default="1,2,3")
    ap.add_argument("--cache", type=int, default=8, help="expert slots per MoE layer (of 32)")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--storage", default="1.0", help="emulated storage, GB/s[,latency]")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    from golem.runtime.synthetic import default_cache_dir

    path = build(default_cache_dir())
    base = dict(path=str(path), tokens=args.tokens, cache=args.cache, depth=args.depth, storage=args.storage)
    configs = []
    for n in (int(x) for x in args.ranks.split(",")):
        configs += [(n, True)] if n == 1 else [(n, True), (n, False)]
    results = {}
    for n, boundary in configs:
        runs = [launch(n, {**base, "boundary": boundary}, args.timeout) for _ in range(args.runs)]
        results[(n, boundary)] = runs
        print(f"  {n} rank(s), boundary prefetch {'on' if boundary else 'off'}: done", file=sys.stderr)

    baseline = results[(1, True)] if (1, True) in results else None
    want = baseline[0]["tokens"] if baseline else None
    table, out = [], []
    for (n, boundary), runs in results.items():
        s = [summarise(r) for r in runs]
        med = {k: statistics.median(x[k] for x in s) for k in ("tok_s", "mb_read", "stall_ms", "misses", "recall")}
        firsts = s[0]["first_layers"]
        if n > 1:
            med["first_recall"] = statistics.median(x["first_recall"] for x in s)
        elif firsts == [] and baseline is not None:
            med["first_recall"] = None
        same = want is None or all(r["tokens"] == want for r in runs)
        row = dict(ranks=n, boundary=boundary, same_tokens=same, first_layers=firsts, **med)
        if n > 1 and baseline is not None:  # the baseline's recall on the same layers
            t = [sum(r["per_layer"][str(l)][0] for l in firsts) for r in baseline]
            h = [sum(r["per_layer"][str(l)][1] for l in firsts) for r in baseline]
            row["first_recall_one_machine"] = statistics.median(b / a for a, b in zip(t, h) if a)
        table.append(row)
        out.append(row)

    print(f"model {path.name}: 7 layers (1 dense), 32 experts, top-4, cache {args.cache}, depth {args.depth}, "
          f"storage {args.storage} GB/s, {args.tokens} tokens, median of {args.runs} launches")
    head = (f"{'ranks':>5} {'boundary':>8} {'tok/s':>7} {'MB read':>8} {'stall ms/tok':>12} {'misses':>7} "
            f"{'recall':>7} {'1st-layer recall':>16} {'same, 1 machine':>15} {'tokens':>7}")
    print(head)
    for r in table:
        fr = f"{100 * r['first_recall']:.1f}%" if r.get("first_recall") is not None else "-"
        one = f"{100 * r['first_recall_one_machine']:.1f}%" if "first_recall_one_machine" in r else "-"
        print(f"{r['ranks']:>5} {'on' if r['boundary'] else 'off':>8} {r['tok_s']:>7.1f} {r['mb_read']:>8.2f} "
              f"{r['stall_ms']:>12.2f} {r['misses']:>7.0f} {100 * r['recall']:>6.1f}% {fr:>16} {one:>15} "
              f"{'same' if r['same_tokens'] else 'DIFFER':>7}")
    print(json.dumps({"bench": "pipeline", "rows": out}))
    return 0 if all(r["same_tokens"] for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
