"""Does the governor's early stop (``Governor(clear_loss=...)``) pay? bench_decode's governed
rows with a clear loss ending a window after two tokens, against full windows only.

Same checkpoint, prompts, cache and calibrated emulated storage as bench_decode; the two
settings alternate, ``--runs`` times, each run one load per row; every row's tokens must
equal depth 0's. Prints tok/s per row and setting (median), each governed row over the
same setting's depth 0, then one JSON line.

    python benchmarks/bench_governor.py [--shape qwen3-30b-a3b-host] [--runs 2] [--tokens 24]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_decode  # noqa: E402

ROWS = ("disk_depth0", "disk_governed2", "disk_default", "depth0", "depth2", "governed2", "default")
SETTINGS = {"full windows": None, "early stop": 2.0}


@contextlib.contextmanager
def clear_loss(value):
    """Governors made inside the block use ``clear_loss=value``."""
    from golem.runtime import governor

    original = governor.Governor.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("clear_loss", value)
        original(self, *args, **kwargs)

    governor.Governor.__init__ = init
    try:
        yield
    finally:
        governor.Governor.__init__ = original


def main() -> None:
    from golem.runtime.synthetic import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b-host", choices=tuple(bench_decode.SHAPES))
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--dir", type=Path, default=default_cache_dir())
    args = ap.parse_args()

    setup = bench_decode.Setup(args.shape, args.dir, args.tokens)
    full, _ = setup.run("full_cache", setup.rows(["full_cache"])["full_cache"], 1)
    setup.calibrate(1.0 / full["tps"])
    rows = setup.rows(ROWS)
    tps = {name: {row: [] for row in ROWS} for name in SETTINGS}
    identical = True
    for _ in range(args.runs):
        for name, value in SETTINGS.items():
            with clear_loss(value):
                for row in ROWS:
                    r, outs = setup.run(row, rows[row], 1)
                    tps[name][row].append(r["tps"])
                    identical = identical and outs == setup.truth_outputs
    med = {name: {row: statistics.median(v) for row, v in by_row.items()} for name, by_row in tps.items()}

    print(f"{setup.path.name}: {len(setup.prompts)} prompts x {args.tokens} tokens, median of {args.runs} "
          f"alternating runs; tok/s (x the same setting's depth 0 on the same storage)")
    print(f"{'row':<16}" + "".join(f"{name:>24}" for name in SETTINGS))
    out = {"shape": args.shape, "runs": args.runs, "identical": identical}
    for row in ROWS:
        base = "disk_depth0" if row.startswith("disk") else "depth0"
        cells = ""
        for name, key in zip(SETTINGS, ("full", "early")):
            v, ratio = med[name][row], med[name][row] / med[name][base]
            cells += f"{v:>15.2f} ({ratio:.2f}x)"
            out[f"{key}_{row}_tps"] = v
            out[f"{key}_{row}_x_depth0"] = ratio
        print(f"{row:<16}" + cells)
    print(f"identical tokens in every row: {identical}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
