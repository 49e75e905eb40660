"""Does golem keep resident memory to non-expert bytes + cache + a little, on a big model?

Builds (once, in the cache folder) a float32 / 4-bit-expert qwen3_moe checkpoint with at
least 4 GB of experts, then generates with a 0.5 GB expert cache in a fresh process per run
and reads that process's peak resident set (VmHWM). Stock mlx-lm, with every expert
resident, runs in the same way as the baseline. Table first, one JSON line last.

    python benchmarks/bench_memory.py [--runs 3] [--tokens 32] [--cache-gb 0.5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import mlx.core as mx
mode, path, slots, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from mlx_lm.generate import generate_step
def vm_hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
if mode == "golem":
    from golem.runtime import load
    loaded = load(path, cache_sizes=slots)
    model, tok = loaded
    extra = {"cache_bytes": sum(p.nbytes for p in model.golem.engine.pools.values()),
             "non_expert_bytes": model.golem.non_expert_nbytes,
             "expert_bytes_total": model.golem.index.total_nbytes()}
else:
    from mlx_lm import load
    model, tok = load(path)
    extra = {}
prompt = tok.apply_chat_template([{"role": "user", "content": "Once upon a time"}], add_generation_prompt=True)
start = None
n = 0
t0 = time.perf_counter()
for i, (token, _) in enumerate(generate_step(mx.array(prompt), model, max_tokens=tokens, sampler=lambda x: mx.argmax(x, -1))):
    if i == 0:
        start = time.perf_counter()
    n += 1
tps = (n - 1) / (time.perf_counter() - start) if n > 1 else 0.0
extra.update(tokens_per_s=tps, peak_rss_bytes=vm_hwm())
if mode == "golem":
    t = model.golem.engine.stats.total()
    extra.update(hit_rate=t.hit_rate, bytes_read=t.bytes_read)
print(json.dumps(extra))
"""


def build(cache_dir: Path) -> Path:
    from golem.runtime.synthetic import Size, build_checkpoint

    size = Size(hidden=1024, layers=24, experts=64, top_k=4, expert_hidden=1536, vocab=384, group_size=64)
    path = cache_dir / "bench-memory-qwen3_moe"
    if not (path / "config.json").exists():
        print(f"building {path} (once; a few minutes)...", file=sys.stderr)
        t0 = time.perf_counter()
        build_checkpoint("qwen3_moe", path, size=size, layers_per_shard=2)
        print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def child(mode: str, path: Path, slots: int, tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(slots), str(tokens)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from golem.io.index import SafetensorsIndex
    from golem.runtime.synthetic import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--cache-gb", type=float, default=0.5)
    ap.add_argument("--dir", type=Path, default=default_cache_dir())
    args = ap.parse_args()
    path = build(args.dir)
    cfg = json.loads((path / "config.json").read_text())
    st = SafetensorsIndex(path)
    expert_total = sum(t.nbytes for n, t in st.tensors.items() if ".switch_mlp." in n)
    moe_layers = cfg["num_hidden_layers"] - len(cfg.get("mlp_only_layers", []))
    per_expert = expert_total / (moe_layers * cfg["num_experts"])
    slots = max(cfg["num_experts_per_tok"], int(args.cache_gb * 1e9 // (per_expert * moe_layers)))

    rows = {"stock": [], "golem": []}
    for _ in range(args.runs):
        rows["golem"].append(child("golem", path, slots, args.tokens))
        rows["stock"].append(child("stock", path, slots, args.tokens))
    g = rows["golem"][0]
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "peak_rss_bytes")} for m, rs in rows.items()}
    limit = g["non_expert_bytes"] + g["cache_bytes"] + 0.5e9
    print(f"checkpoint: {path}")
    print(f"experts: {expert_total / 1e9:.2f} GB in {moe_layers} layers x {cfg['num_experts']}; "
          f"non-expert {g['non_expert_bytes'] / 1e9:.2f} GB; cache {slots} slots/layer = {g['cache_bytes'] / 1e9:.2f} GB")
    print(f"{'run':<8} {'tokens/s':>9} {'peak RSS GB':>12}   (median of {args.runs})")
    for m in ("stock", "golem"):
        print(f"{m:<8} {med[m]['tokens_per_s']:>9.2f} {med[m]['peak_rss_bytes'] / 1e9:>12.2f}")
    print(f"limit (non-expert + cache + 0.5 GB): {limit / 1e9:.2f} GB -> "
          f"{'within' if med['golem']['peak_rss_bytes'] < limit else 'OVER'}; golem hit rate {100 * g['hit_rate']:.1f}%")
    print(json.dumps({
        "expert_bytes_total": expert_total,
        "non_expert_bytes": g["non_expert_bytes"],
        "cache_bytes": g["cache_bytes"],
        "slots_per_layer": slots,
        "peak_rss_bytes": med["golem"]["peak_rss_bytes"],
        "limit_bytes": limit,
        "within_limit": med["golem"]["peak_rss_bytes"] < limit,
        "tokens_per_s": med["golem"]["tokens_per_s"],
        "stock_peak_rss_bytes": med["stock"]["peak_rss_bytes"],
        "stock_tokens_per_s": med["stock"]["tokens_per_s"],
        "runs": args.runs,
    }))


if __name__ == "__main__":
    main()
