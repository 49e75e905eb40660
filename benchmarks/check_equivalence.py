"""Does `golem-run -c K` print exactly what `mlx_lm.generate` prints, for every family and K?

Builds checkpoints the test suite never sees (another seed, other sizes), then, for every
family and every cache size K from top-k to E, runs both command lines as separate
processes (greedy, 32 tokens) and compares the generated text. Table first, one JSON line last.

    python benchmarks/check_equivalence.py [--tokens 32] [--families qwen3_moe,olmoe]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = "Write a story about a computer that reads its thoughts from a disk."


def generated_text(cmd) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    parts = out.stdout.split("=" * 10)
    if len(parts) < 3:
        raise SystemExit(f"{' '.join(cmd)}: no text between ========== lines:\n{out.stdout[-2000:]}")
    return parts[1]


def main() -> None:
    from golem.runtime.synthetic import FAMILIES, Size, build_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="golem-equiv-"))
    size = Size(hidden=96, layers=5, experts=12, top_k=3, expert_hidden=96, vocab=400, group_size=32)
    rows, failures = [], []
    for family in args.families.split(","):
        path = build_checkpoint(family, root / family, size=size, seed=1234)
        common = ["--model", str(path), "--temp", "0", "-m", str(args.tokens), "-p", PROMPT]
        expected = generated_text([sys.executable, "-m", "mlx_lm", "generate", *common])
        for k in range(size.top_k, size.experts + 1):
            got = generated_text([sys.executable, "-m", "golem.runtime.cli.run", *common, "-c", str(k)])
            same = got == expected
            rows.append((family, k, same))
            if not same:
                failures.append(f"{family} -c {k}")
        print(f"{family:<12} K={size.top_k}..{size.experts}: "
              f"{sum(r[2] for r in rows if r[0] == family)}/{size.experts - size.top_k + 1} identical", flush=True)
    print(json.dumps({"checked": len(rows), "identical": sum(r[2] for r in rows), "failures": failures,
                      "tokens": args.tokens, "families": args.families.split(",")}))


if __name__ == "__main__":
    main()
