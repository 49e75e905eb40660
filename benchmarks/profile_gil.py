"""Where does the engine thread let the interpreter lock go, per partial decode layer, and what
do the interpreter's cyclic collections cost a decode?

The engine owns every MLX call on one thread; the I/O scheduler's readers are Python threads
too. Each time the engine thread lets the interpreter lock go (an ``mx.eval``, a wait on a
read, a numpy sort or a large numpy copy), a reader that was waiting for it takes it and runs
its own Python until its next system call, and only then can the engine go on: on a busy
machine that wait costs far more than the call itself. The sync, the launch and the read
waits must let it go; anything else on the per-token path need not.

How it counts: a probe thread asks for the lock in a loop and gives it back at once
(``time.sleep(0)``), with the interpreter's switch interval raised so that no thread is ever
made to give it up. The probe then runs only when a thread lets the lock go of its own
accord, and each time it notes the engine thread's innermost frames; each lap of the
engine's phase clock notes whether the probe ran during that phase. A release the probe
does not get to see (the engine takes the lock back first) is not counted, so the counts
are lower bounds; the sites are exact. Rows and storage as bench_decode (``--rows``), one decode of the prompts per row
after a warm-up.

Also per row: the cyclic garbage collector's passes during the decode, by generation, their
pauses (every thread stops) and the objects they freed. Objects freed by reference counting
never reach it; objects in reference cycles (a request and the batch reading it, say) wait
for it, and its passes over a loaded model's objects take tens of milliseconds.

Prints, per row, the share of each phase's laps during which the engine let the lock go,
then the sites outside the sync, the launch and the read waits (those that need not let it
go), most seen first, then the collector's passes; then one JSON line.

    python benchmarks/profile_gil.py [--shape qwen3-30b-a3b-host] [--rows disk_depth0,disk_depth2] [--tokens 16]
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import linecache
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_decode  # noqa: E402

MUST_RELEASE = ("sync", "launch", "wait")  # phases whose work is to wait for the device or the storage
SWITCH_INTERVAL_S = 5.0  # no thread is made to give the lock up during a decode


class Probe:
    """Runs only while some thread has let the interpreter lock go; notes the engine's
    innermost frames each time, and counts the engine's laps per phase and those during
    which it let the lock go."""

    def __init__(self, engine_thread: int):
        self.engine_thread = engine_thread
        self.steps = 0
        self.sites = collections.Counter()
        self.laps = collections.Counter()
        self.released = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="golem-gil-probe", daemon=True)
        self._seen = 0  # probe steps at the engine's last lap

    def _run(self) -> None:
        frames = sys._current_frames
        while not self._stop.is_set():
            frame = frames().get(self.engine_thread)
            if frame is not None:
                self.steps += 1
                self.sites[_site(frame)] += 1
            time.sleep(0)  # gives the lock back

    def lap(self, phase: str) -> None:
        """Engine thread, at the end of ``phase``: did the probe run since the last lap?"""
        self.laps[phase] += 1
        if self.steps != self._seen:
            self.released[phase] += 1
            self._seen = self.steps

    def mark(self) -> None:
        self._seen = self.steps

    def __enter__(self):
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        sys.setswitchinterval(self._interval)
        self._thread.join()


class Collections:
    """The cyclic collector's passes while the block runs: ``(seconds, objects freed)`` by
    generation."""

    def __init__(self):
        self.passes = collections.defaultdict(list)
        self._started = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.passes[info["generation"]].append((time.perf_counter() - self._started, info["collected"]))

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def report(self, name: str, seconds: float, tokens: int, out: dict) -> None:
        total = sum(s for passes in self.passes.values() for s, _ in passes)
        print(f"  cyclic collections over {tokens} tokens ({seconds * 1e3:.0f} ms): {1e3 * total:.1f} ms paused "
              f"({total / seconds:.1%})")
        for generation in range(3):
            passes = self.passes.get(generation, [])
            longest = max((s for s, _ in passes), default=0.0)
            freed = sum(n for _, n in passes)
            print(f"    generation {generation}: {len(passes)} passes, {1e3 * sum(s for s, _ in passes):.1f} ms, "
                  f"longest {1e3 * longest:.1f} ms, {freed} objects freed")
            out[f"{name}_gc{generation}_passes"] = len(passes)
            out[f"{name}_gc{generation}_freed"] = freed
        out[f"{name}_gc_pause_share"] = total / seconds


def _site(frame, depth: int = 3) -> tuple:
    """``((path, line) of the innermost frame, its innermost frames as text)``."""
    where = (frame.f_code.co_filename, frame.f_lineno)
    out = []
    while frame is not None and len(out) < depth:
        code = frame.f_code
        out.append(f"{Path(code.co_filename).name}:{code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return where, " <- ".join(out)


def watch(clock, probe: Probe):
    """Patch the engine's phase clock so that each lap reports to ``probe``; returns the undo."""
    from golem.runtime.phases import PhaseClock

    lap, start = PhaseClock.lap, PhaseClock.start

    def probed_lap(self, phase, read_s=0.0):
        if self is clock:
            probe.lap(phase)
        return lap(self, phase, read_s)

    def probed_start(self):
        if self is clock:
            probe.mark()
        return start(self)

    PhaseClock.lap, PhaseClock.start = probed_lap, probed_start

    def undo():
        PhaseClock.lap, PhaseClock.start = lap, start
    return undo


def main() -> None:
    from golem.runtime import load
    from golem.runtime.synthetic import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b-host", choices=tuple(bench_decode.SHAPES))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rows", default="disk_depth0,disk_depth2,depth2", help="bench_decode rows, comma-separated")
    ap.add_argument("--sites", type=int, default=12, help="sites to print per row")
    ap.add_argument("--dir", type=Path, default=default_cache_dir())
    args = ap.parse_args()
    names = [n.strip() for n in args.rows.split(",") if n.strip()]

    setup = bench_decode.Setup(args.shape, args.dir, args.tokens)
    rows = bench_decode.calibrated_rows(setup, names, "profile_gil.py")
    out = {"shape": args.shape, "tokens": args.tokens}
    identical = True
    for name in names:
        options = setup.load_options(rows[name])
        table = options.pop("table", False)
        with load(str(setup.path), **options) as (model, _):
            engine = bench_decode.engine_of(model, table)
            bench_decode.decode(model, setup.prompts[:1], 4)  # warm-up
            layers = engine.stats.phases.layers
            probe = Probe(threading.get_ident())
            undo = watch(engine._phase, probe)
            try:
                with probe, Collections() as passes:
                    seconds, tokens, outs = bench_decode.decode(model, setup.prompts, args.tokens)
            finally:
                undo()
            layers = engine.stats.phases.layers - layers
        identical = identical and outs == setup.truth_outputs
        report(name, probe, layers, args.sites, out)
        passes.report(name, seconds, tokens, out)
    out["identical"] = identical
    print(f"identical tokens in every row: {identical}")
    print(json.dumps(out))


def report(name: str, probe: Probe, layers: int, sites: int, out: dict) -> None:
    print(f"{name}: {layers} partial decode layers; per phase: laps, laps during which the engine let the lock go")
    for phase, n in sorted(probe.laps.items(), key=lambda kv: -kv[1]):
        released = probe.released[phase]
        note = "" if phase in MUST_RELEASE else "  <- need not"
        print(f"  {phase:<10}{n:>8}{released:>8}  ({released / n:.0%}){note}")
        out[f"{name}_{phase}_released_share"] = released / n
    avoidable = {site: n for site, n in probe.sites.items() if not _waits(site)}
    per_layer = sum(avoidable.values()) / max(layers, 1)
    print(f"  probe steps per partial layer at sites that need not let it go: {per_layer:.2f}; most seen:")
    for site, n in sorted(avoidable.items(), key=lambda kv: -kv[1])[:sites]:
        print(f"  {n:>7}  {site[1]}")
    out[f"{name}_avoidable_steps_per_layer"] = per_layer


WAIT_CALLS = ("mx.eval(", "mx.async_eval(", "wait_result(", ".result(", ".wait(", "waiter.acquire(")


def _waits(site: tuple) -> bool:
    """A site whose work is to wait: its innermost line evaluates MLX arrays (the host sync, a
    launch, a computation still reading a slot before its write) or waits on a read or a
    condition."""
    path, line = site[0]
    return any(call in linecache.getline(path, line) for call in WAIT_CALLS)

if __name__ == "__main__":
    main()
