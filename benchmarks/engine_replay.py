"""The engine's host work with the model's compute taken out: record a decode's layer calls,
replay them into a fresh load.

On the CPU backend a layer's compute runs on the cores the engine thread runs on; after each
host sync the engine's next microseconds run several times slower than the same work on a
quiet thread (``bench_sync.py``, "host work after ..."), so profile_decode's host figures
there hold the machine's penalty as much as the engine's work. A replay takes the model out:
every call the model made into the engine (its MoE layers, prefill and decode, in order) is
recorded with its inputs evaluated (the hidden state, the router's ids, the predictor's
input), then made again, in the same order, into a fresh load of the same row. The engine
does all of its own work again on the same routing (the same hits, misses, evictions,
demand and prefetch reads, writes and expert graphs); what is gone is the attention, norms,
routers and sampling between its calls, so its host syncs wait for next to nothing. The
expert graphs it builds are evaluated at the end of each step, as the next token would be.

Each replayed step's output is checked against the recorded one (``same``): the replay did
the computation the decode did.

The experts' own compute stays: the engine launches it. On the CPU backend ``mx.async_eval``
waits while the backend's queue of work is full, so where an expert's compute takes
milliseconds (bench_decode's small shape) the replay's ``launch`` phase holds that compute;
the replay reads as the engine's host work where compute is small (the host shape, a GPU).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import sys
import threading

import mlx.core as mx


class Recording:
    """Wraps ``engine.forward`` to keep every call with its inputs and its output."""

    def __init__(self, engine):
        self.engine = engine
        self.calls = []  # (layer, x, indices, hidden, y)
        self._inner = engine.forward
        engine.forward = self._forward

    def _forward(self, layer, glu, x, indices):
        hidden = self.engine.hidden(layer, x)
        y = self._inner(layer, glu, x, indices)
        self.calls.append((layer, x, indices, hidden, y))
        return y

    def stop(self) -> None:
        """Restore the engine and evaluate what was kept (the outputs are the decode's own)."""
        self.engine.forward = self._inner
        mx.eval([a for call in self.calls for a in call[1:] if a is not None])


def replay(engine, glus, calls) -> bool:
    """Make ``calls`` (a ``Recording``'s) into ``engine``, a fresh load of the same row whose
    experts modules are ``glus`` (``{layer: module}``); True when every output equals the
    recorded one. A step's outputs are evaluated when
    the next step starts (its first layer is called again) and at the end."""
    first = calls[0][0] if calls else None
    pending, same = [], True

    def settle():
        nonlocal same
        if pending:
            mx.eval([y for y, _ in pending])
            same = same and all(mx.array_equal(y, want).item() for y, want in pending)
            pending.clear()

    hidden = {}
    engine.hidden = lambda layer, x: hidden[layer]
    for layer, x, indices, h, want in calls:
        if layer == first:
            settle()
        hidden[layer] = h
        pending.append((engine.forward(layer, glus[layer], x, indices), want))
    settle()
    return same


class CallCounter:
    """Counts the Python-level calls (functions and builtins) the engine thread makes during
    each phase of a partial decode layer: a measure of the engine's host work that is the
    same on every machine (microseconds are not: this VM runs host work after a wait
    several times slower than a quiet core, ``bench_sync.py``). Only the phases that meet
    the readers (a wait that times out and waits again, buffers handed back while a demand
    waits for one) move, by a call or so, with their timing.

    Installs a profile hook on the calling thread for the ``with`` block and wraps the
    engine's phase clock (its instance, not the class): the calls made since the last lap
    are charged to the phase the lap names. Calls made while the clock is off (a fully
    resident layer, prefill) are not counted. Python's profile hook slows every call, so a
    counted replay is never the timed one.
    """

    def __init__(self, engine):
        self.clock = engine._phase
        self.by_phase = collections.Counter()
        self.layers = 0
        self._n = 0

    def _hook(self, frame, event, arg) -> None:
        if event == "call" or event == "c_call":
            self._n += 1

    def _charge(self, phase: str) -> None:
        if self.clock.on:
            self.by_phase[phase] += self._n
        self._n = 0

    def __enter__(self) -> "CallCounter":
        clock, start, lap, stop = self.clock, self.clock.start, self.clock.lap, self.clock.stop

        def counted_start():
            start()
            self._n = 0

        def counted_lap(phase, read_s=0.0):
            self._charge(phase)
            lap(phase, read_s)

        def counted_stop(phase):
            self._charge(phase)
            stop(phase)

        clock.start, clock.lap, clock.stop = counted_start, counted_lap, counted_stop
        self._layers0 = clock.times.layers
        sys.setprofile(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(None)
        for name in ("start", "lap", "stop"):  # the class's methods again
            del vars(self.clock)[name]
        self.layers = self.clock.times.layers - self._layers0

    def per_layer(self) -> dict:
        """Calls per partial decode layer, by phase, and in all (``total``)."""
        n = max(self.layers, 1)
        out = {phase: count / n for phase, count in self.by_phase.items()}
        out["total"] = sum(self.by_phase.values()) / n
        return out


class IOThreadCalls:
    """Counts the Python calls the I/O scheduler's threads (named ``golem-io...``: its readers
    and its loop) make while ``counting``: work that holds the interpreter lock the engine's
    thread needs too, which ``CallCounter`` does not see. Its hook is installed for threads
    started inside ``installed`` (``threading.setprofile``): the scheduler's start there,
    with the load. A count, not a time: roughly the same on any machine (a reader that
    finds no job and sleeps again moves it by a few calls)."""

    def __init__(self):
        self.calls = 0
        self._on = False
        self._ticks = itertools.count()

    def _hook(self, frame, event, arg) -> None:
        if self._on and (event == "call" or event == "c_call"):
            next(self._ticks)  # one C call: atomic across the threads counted

    @contextlib.contextmanager
    def installed(self):
        threading.setprofile(self._hook)
        try:
            yield self
        finally:
            threading.setprofile(None)

    @contextlib.contextmanager
    def counting(self):
        counted = [t for t in threading.enumerate() if t.name.startswith("golem-io")]
        if not counted:
            raise RuntimeError("no golem-io thread runs: was the load started inside installed()?")
        start = next(self._ticks)
        self._on = True
        try:
            yield self
        finally:
            self._on = False
            self.calls += next(self._ticks) - start - 1


def replay_row(path, prompts, tokens: int, *, table: bool = False, calls: bool = False, **options) -> dict:
    """One row of bench_decode decoded (recorded) and replayed: the replay's engine host time
    per partial layer (``us_per_layer``, wall; ``cpu_us_per_layer``), by phase (``phase_<name>``,
    ``phase_cpu_<name>``), and whether every output matched (``same``). ``calls``: one more
    replay, into another fresh load, counts the engine's Python calls per partial layer by
    phase (``calls_<name>``, ``calls_total``; ``CallCounter``)."""
    from bench_decode import decode, engine_of

    from golem.runtime import load
    from golem.runtime.phases import PHASES

    with load(str(path), **options) as (model, _):
        recording = Recording(engine_of(model, table, cpu_time=True))
        decode(model, prompts, tokens)
        recording.stop()
    with load(str(path), **options) as (model, _):
        engine = engine_of(model, table, cpu_time=True)
        same = replay(engine, {em.layer: em.module for em in model.golem.experts}, recording.calls)
        phases = engine.stats.phases
        layers = max(phases.layers, 1)
        wall, cpu = phases.per_layer_us(), phases.per_layer_us(cpu=True)
        out = {"same": same, "us_per_layer": 1e6 * phases.engine_s() / layers,
               "cpu_us_per_layer": 1e6 * phases.engine_s(cpu=True) / layers,
               **{f"phase_{k}": wall[k] for k in PHASES}, **{f"phase_cpu_{k}": cpu[k] for k in PHASES}}
    if calls:
        io = IOThreadCalls()
        with io.installed(), load(str(path), **options) as (model, _):
            engine = engine_of(model, table, cpu_time=False)
            with CallCounter(engine) as counter, io.counting() if engine.scheduler is not None else contextlib.nullcontext():
                same = replay(engine, {em.layer: em.module for em in model.golem.experts}, recording.calls) and same
            out["same"] = same
            out.update({f"calls_{k}": v for k, v in counter.per_layer().items()})
            out["calls_io"] = io.calls / max(counter.layers, 1)  # the scheduler's threads, apart
    return out
