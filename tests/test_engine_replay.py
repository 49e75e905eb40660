"""benchmarks/engine_replay.py: a decode's calls into the engine, made again into a fresh load,
redo the same work (same hits and misses, same outputs), and a replay that computes something
else is caught."""

from __future__ import annotations

import sys

import mlx.core as mx
import pytest

from golem.runtime import load
from helpers import greedy_tokens, load_benchmark, prompt_tokens, stock

TOP_K = 4


@pytest.fixture(scope="module")
def engine_replay():
    return load_benchmark("engine_replay")


@pytest.fixture(scope="module")
def recorded(checkpoints, engine_replay):
    """A decode at depth 0 with misses, recorded: ``(path, calls, (misses, hits, decode steps))``."""
    path = checkpoints("qwen3_moe")
    _, tok = stock(path)
    with load(str(path), cache_sizes=TOP_K + 1) as (model, _):
        recording = engine_replay.Recording(model.golem.engine)
        greedy_tokens(model, prompt_tokens(tok), n=8)
        recording.stop()
        stats = model.golem.engine.stats
        counts = (stats.decode_misses, stats.total().hits, stats.decode_steps)
    assert counts[0] > 0 and counts[2] > 0
    return path, recording.calls, counts


def replayed(engine_replay, path, calls):
    with load(str(path), cache_sizes=TOP_K + 1) as (model, _):
        engine = model.golem.engine
        same = engine_replay.replay(engine, {em.layer: em.module for em in model.golem.experts}, calls)
        stats = engine.stats
        return same, (stats.decode_misses, stats.total().hits, stats.decode_steps)


def test_a_replay_redoes_the_decode(engine_replay, recorded):
    path, calls, counts = recorded
    same, got = replayed(engine_replay, path, calls)
    assert same
    assert got == counts  # the same misses, hits and decode steps


def test_a_replay_that_computes_otherwise_is_caught(engine_replay, recorded):
    path, calls, _ = recorded
    layer, x, indices, hidden, y = calls[-1]
    wrong = calls[:-1] + [(layer, x, indices, hidden, y + 1)]
    mx.eval(wrong[-1][4])
    same, _ = replayed(engine_replay, path, wrong)
    assert not same


def counted(engine_replay, path, calls):
    with load(str(path), cache_sizes=TOP_K + 1) as (model, _):
        engine = model.golem.engine
        with engine_replay.CallCounter(engine) as counter:
            same = engine_replay.replay(engine, {em.layer: em.module for em in model.golem.experts}, calls)
        assert same
        assert not {"start", "lap", "stop"} & set(vars(engine._phase))  # the clock is its own again
        assert sys.getprofile() is None
        return counter.per_layer(), counter.layers, engine.stats.phases.layers


def test_call_counts_are_the_same_in_every_replay(engine_replay, recorded):
    path, calls, (misses, _, _) = recorded
    first, layers, partial = counted(engine_replay, path, calls)
    second, _, _ = counted(engine_replay, path, calls)
    # A count, not a timing: the phases that touch no read do not vary at all (the request,
    # wait and write phases may, by a call or two, with the readers' timing).
    assert {k: first[k] for k in ("pool", "ids", "graph")} == {k: second[k] for k in ("pool", "ids", "graph")}
    assert layers == partial > 0
    # A layer with misses claims slots and asks for reads: both phases make calls.
    assert first["pool"] > 0 and first["request"] > 0


def test_the_io_threads_calls_are_counted_apart(engine_replay, recorded):
    """Reads on the scheduler's readers (emulated storage: none is read from the page cache on
    the engine's thread) make Python calls there, under the lock the engine's thread needs
    too: counted apart from the engine's, and the hook goes once loaded."""
    import threading

    from golem.io.storage import Throttle

    path, calls, _ = recorded
    io = engine_replay.IOThreadCalls()
    with io.installed(), load(str(path), cache_sizes=TOP_K + 1, throttle=Throttle(100.0)) as (model, _):
        engine = model.golem.engine
        with engine_replay.CallCounter(engine) as counter, io.counting():
            assert engine_replay.replay(engine, {em.layer: em.module for em in model.golem.experts}, calls)
    assert io.calls > 0
    assert counter.per_layer()["request"] > 0  # the engine's own count holds its side of the reads
    assert threading.getprofile() is None
