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


def replay_row(path, prompts, tokens: int, *, table: bool = False, **options) -> dict:
    """One row of bench_decode decoded (recorded) and replayed: the replay's engine host time
    per partial layer (``us_per_layer``, wall; ``cpu_us_per_layer``), by phase (``phase_<name>``,
    ``phase_cpu_<name>``), and whether every output matched (``same``)."""
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
        return {"same": same, "us_per_layer": 1e6 * phases.engine_s() / layers,
                "cpu_us_per_layer": 1e6 * phases.engine_s(cpu=True) / layers,
                **{f"phase_{k}": wall[k] for k in PHASES}, **{f"phase_cpu_{k}": cpu[k] for k in PHASES}}
