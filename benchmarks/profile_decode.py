"""Where does the engine's host time go, per partial layer, in each row of bench_decode?

Runs bench_decode's rows (same checkpoint, prompts, cache and emulated storage; the storage
speed is calibrated on a full-cache run first) and prints, per row, the engine's host time
per decode layer that is not fully resident, split by phase (``golem.runtime.phases``), as
wall microseconds and as the engine thread's CPU microseconds (a busy machine inflates wall
time, not CPU time). "measured" is the whole time of those layer calls timed from outside
the engine: the phases must add up to it. "engine" is the host time the issue's budget is
about (every phase but the sync, the read waits and the slot writes), with its share per
miss. Median of --runs runs per row, then one JSON line.

Also counted per partial layer: the thread hand-offs around the I/O scheduler (the
engine's calls that take its lock, wake-ups of its event loop, reader threads woken), which
cost the engine thread on any backend and do not show in its own CPU time; and per demand
read, the wall time from its submit to a reader taking it (the scheduler's
``demand_start``): a reader woken for it must get a core and the interpreter lock first.
And the wall time from a partial layer's sync to the launch of its experts and to its first
demand read
(``PhaseTimes.after_sync_us``): on a device that computes apart from the host, the device
has nothing of the layer to do until the first, and the storage none of its misses to read
until the second (layers launched before their sync count 0).

``--replay`` adds a second phase table: each row's calls into the engine recorded and made
again into a fresh load with the model's compute taken out (``engine_replay.py``), so that
the host syncs wait for next to nothing; the engine's own work by phase, without the
attention, routers and sampling between its calls (outputs checked equal, ``same``).
``--calls`` (with ``--replay``) replays each row once more and counts the Python calls the
engine thread makes per partial layer, by phase (``engine_replay.CallCounter``): a figure of
its host work that does not move with the machine's load (JSON: ``<row>_calls_per_layer``
over the engine's phases, ``<row>_calls_phases``).

    python benchmarks/profile_decode.py [--shape small|qwen3-30b-a3b|qwen3-30b-a3b-host] [--runs 3] [--rows depth0,depth2,oracle] [--replay [--calls]]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_decode  # noqa: E402

DEFAULT_ROWS = ("warm_resident", "disk_depth0", "disk_depth2", "disk_default", "depth0", "depth2", "oracle", "default")


def main() -> None:
    from golem.runtime.phases import MOMENTS, PHASES
    from golem.runtime.synthetic import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small", choices=tuple(bench_decode.SHAPES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--capacity", type=int, default=None)
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="bench_decode rows, comma-separated")
    ap.add_argument("--dir", type=Path, default=default_cache_dir())
    ap.add_argument("--packed", action="store_true", help="read experts from the packed copy (golem-pack)")
    ap.add_argument("--replay", action="store_true",
                    help="also replay each row's engine calls with the model's compute taken out "
                         "(benchmarks/engine_replay.py) and print its phase table")
    ap.add_argument("--calls", action="store_true",
                    help="with --replay: also count the engine's Python calls per partial layer by phase in one "
                         "more replay of each row (the same on every machine, unlike microseconds)")
    args = ap.parse_args()
    names = [n.strip() for n in args.rows.split(",") if n.strip()]

    setup = bench_decode.Setup(args.shape, args.dir, args.tokens, args.capacity, cpu_time=True, packed=args.packed)
    rows = bench_decode.calibrated_rows(setup, names, "profile_decode.py")
    results = {}
    for name in names:
        results[name], outs = setup.run(name, rows[name], args.runs)
        results[name]["identical"] = outs == setup.truth_outputs
    results = {k: r for k, r in results.items() if "phase_sync" in r}

    print(f"{setup.path.name}: cache {setup.cache_size} slots/layer, {len(setup.prompts)} prompts x {args.tokens} tokens, "
          f"median of {args.runs} runs; compute {1e6 * setup.compute_s / (bench_decode.SHAPES[args.shape][0]['layers'] - 1):.0f} us "
          f"per MoE layer (full cache)")
    print("host microseconds per partial decode layer, wall / engine-thread CPU; * = left out of 'engine'")
    width = 15
    phase_table(results, width)
    line = lambda label, key: print(f"{label:<10}" + "".join(f"{r.get(key, float('nan')):>{width}.0f}" for r in results.values()))  # noqa: E731
    line("sum", "phase_sum_us")
    line("measured", "measured_us")
    engine_line(results)
    print(f"{'per miss':<10}" + "".join(
        f"{r.get('us_per_miss', float('nan')):>7.0f} /{r.get('cpu_us_per_miss', float('nan')):>6.0f}" for r in results.values()))
    print("thread hand-offs per partial layer (scheduler calls taking its lock / event-loop wakes / readers woken)")
    print(f"{'hand-offs':<10}" + "".join(
        f"{r['sched_calls_per_layer']:>5.1f}/{r['loop_wakes_per_layer']:>4.1f}/{r['reader_wakes_per_layer']:>4.1f}"
        for r in results.values()))
    print("demand reads: wall us from the submit to a reader taking the read, median / 99th percentile (the run's "
          "demands, prefill's too)")
    print(f"{'start':<10}" + "".join(f"{r.get('demand_start_p50_us', float('nan')):>7.0f} /"
                                     f"{r.get('demand_start_p99_us', float('nan')):>6.0f}" for r in results.values()))
    print("early launch: share of partial layers launched before their sync / experts computed again per layer")
    print(f"{'early':<10}" + "".join(f"{100 * r.get('early_share', 0):>8.0f}%/{r.get('early_redone_per_layer', 0):>5.2f}"
                                     for r in results.values()))
    print("after the sync: share of partial layers that launched their experts (0 us before the sync) / queued a "
          "demand read, and the wall us from the end of the sync to the first of each")
    for m in MOMENTS:
        print(f"{'to ' + m:<10}" + "".join(f"{100 * r[m + '_share']:>8.0f}%/{r['to_' + m + '_us']:>5.0f}"
                                           for r in results.values()))
    print(f"{'tok/s':<10}" + "".join(f"{r['tps']:>{width}.2f}" for r in results.values()))
    print(f"{'identical':<10}" + "".join(f"{str(r['identical']):>{width}}" for r in results.values()))
    worst = max(abs(r["phase_sum_us"] / r["measured_us"] - 1) for r in results.values())
    print(f"phases vs measured: worst gap {100 * worst:.1f}% (target <= 10%)")
    out = {"shape": args.shape, "runs": args.runs, "compute_us_per_moe_layer":
           1e6 * setup.compute_s / (bench_decode.SHAPES[args.shape][0]["layers"] - 1), "phase_gap": worst}
    for name, r in results.items():
        out[f"{name}_us_per_layer"] = r["us_per_layer"]
        out[f"{name}_cpu_us_per_layer"] = r["cpu_us_per_layer"]
        out[f"{name}_us_per_miss"] = r.get("us_per_miss")
        out[f"{name}_measured_us"] = r["measured_us"]
        out[f"{name}_identical"] = r["identical"]
        out[f"{name}_early_share"] = r.get("early_share")
        out[f"{name}_demand_start_p50_us"] = r.get("demand_start_p50_us")
        out.update({f"{name}_{k}": r[k] for m in MOMENTS for k in (f"{m}_share", f"to_{m}_us")})
        out[f"{name}_phases_us"] = {ph: round(r["phase_" + ph], 1) for ph in PHASES}
        out[f"{name}_handoffs_per_layer"] = {k: round(r[f"{k}_per_layer"], 2)
                                             for k in ("sched_calls", "loop_wakes", "reader_wakes")}
    if args.replay:
        replays = {name: replayed(setup, rows[name], args.runs, args.calls) for name in results}
        print("replayed: each row's calls into the engine made again in order, with the model's compute taken "
              f"out (benchmarks/engine_replay.py); median of {args.runs}; host microseconds per partial layer, "
              "wall / engine-thread CPU")
        phase_table(replays, width)
        engine_line(replays)
        if args.calls:
            calls_table(replays, width)
        print(f"{'same':<10}" + "".join(f"{str(r['same']):>{width}}" for r in replays.values()))
        for name, r in replays.items():
            out[f"{name}_replay_us_per_layer"] = r["us_per_layer"]
            out[f"{name}_replay_cpu_us_per_layer"] = r["cpu_us_per_layer"]
            out[f"{name}_replay_same"] = r["same"]
            out[f"{name}_replay_phases_us"] = {ph: round(r["phase_" + ph], 1) for ph in PHASES}
            if args.calls:
                out[f"{name}_calls_per_layer"] = round(engine_calls(r), 1)
                out[f"{name}_calls_phases"] = {ph: round(r.get("calls_" + ph, 0.0), 1) for ph in PHASES}
                out[f"{name}_io_calls_per_layer"] = round(r.get("calls_io", 0.0), 1)
    print(json.dumps(out))


def phase_table(results: dict, width: int) -> None:
    """Rows of phases, a column per bench_decode row: wall / CPU microseconds per partial layer."""
    from golem.runtime.phases import EXCLUDED, PHASES

    print(f"{'phase':<10}" + "".join(f"{n:>{width}}" for n in results))
    for ph in PHASES:
        cells = "".join(f"{r['phase_' + ph]:>7.0f} /{r['phase_cpu_' + ph]:>6.0f}" for r in results.values())
        print(f"{ph + ('*' if ph in EXCLUDED else ''):<10}" + cells)


def calls_table(results: dict, width: int) -> None:
    """Python calls per partial layer by phase (replayed), a column per row; ``engine`` leaves out
    the phases left out of its microseconds."""
    from golem.runtime.phases import EXCLUDED, PHASES

    print("Python calls the engine thread made per partial layer (one more replay, counted; the same on any machine but for a few calls with the reads' timing)")
    for ph in PHASES:
        print(f"{ph + ('*' if ph in EXCLUDED else ''):<10}" + "".join(f"{r.get('calls_' + ph, 0.0):>{width}.0f}"
                                                                      for r in results.values()))
    print(f"{'calls':<10}" + "".join(f"{engine_calls(r):>{width}.0f}" for r in results.values()))
    print("Python calls the I/O scheduler's threads made per partial layer in that replay (its readers and loop: "
          "work under the interpreter lock the engine's thread needs too)")
    print(f"{'io threads':<10}" + "".join(f"{r.get('calls_io', 0.0):>{width}.0f}" for r in results.values()))


def engine_calls(r: dict) -> float:
    """Calls per partial layer in the phases the engine's host time counts (not the sync, the
    waits nor the slot writes)."""
    from golem.runtime.phases import EXCLUDED, PHASES

    return sum(r.get("calls_" + ph, 0.0) for ph in PHASES if ph not in EXCLUDED)


def engine_line(results: dict) -> None:
    print(f"{'engine':<10}" + "".join(f"{r['us_per_layer']:>7.0f} /{r['cpu_us_per_layer']:>6.0f}"
                                      for r in results.values()))


def replayed(setup, options: dict, runs: int, calls: bool = False) -> dict:
    """Median of ``runs`` replays of one row (``engine_replay.replay_row``); ``same`` only if all were.
    ``calls``: the first run also counts the engine's Python calls (``calls_*``, one count: it
    does not vary)."""
    import statistics

    from engine_replay import replay_row

    got = [replay_row(setup.path, setup.prompts, setup.tokens, calls=calls and i == 0, **setup.load_options(options))
           for i in range(runs)]
    med = {k: statistics.median(r[k] for r in got) for k in got[0] if k != "same" and not k.startswith("calls_")}
    med.update({k: v for k, v in got[0].items() if k.startswith("calls_")})
    med["same"] = all(r["same"] for r in got)
    return med


if __name__ == "__main__":
    main()
