"""Slot writers put exact bytes into exact slots, upload in place, and never race a reader."""

from __future__ import annotations

import gc
import sys
import threading
import time
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from golem.io.index import StackedTensor
from golem.runtime.slots import PoolPart, SlotPool
from golem.runtime.writers import (MAX_BATCH_ROWS, WRITERS, DeviceWriter, HostBatch, SlotWriters,
                                   default_writer, resolve_writer)

CACHE_SIZE, EXPERTS = 6, 64


def make_pool(writer: str, cache_size: int = CACHE_SIZE, writers=None, rows: int = 8):
    """A pool of three parts shaped like a quantized projection (uint32, float32, float32)."""
    owner = SimpleNamespace()
    parts, dest = [], 0
    for attr, dtype, shape in (("weight", mx.uint32, (rows, 16)), ("scales", mx.float32, (rows, 2)),
                               ("biases", mx.float32, (rows, 2))):
        setattr(owner, attr, mx.zeros((EXPERTS, *shape), dtype=dtype))
        nbytes = int(np.prod(shape)) * 4
        parts.append(PoolPart(StackedTensor(attr, None, shape, nbytes, dest), owner, attr))
        dest += nbytes
    pool = SlotPool(0, EXPERTS, cache_size, parts, writers=writers or SlotWriters(writer))
    return pool, owner, dest


def slot_bytes(pool, slot: int) -> bytes:
    return b"".join(np.array(getattr(p.owner, p.attr)[slot]).tobytes() for p in pool.parts)


def packed(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


@pytest.mark.parametrize("writer", WRITERS)
def test_each_writer_puts_exact_bytes_into_exact_slots(writer):
    pool, _, nbytes = make_pool(writer)
    assert pool.writer.name == writer
    data = {slot: packed(nbytes, slot) for slot in (4, 1, 5)}
    for slot, buf in data.items():
        pool.write(slot, buf)
        buf[:] = 0  # the staging buffer is reused as soon as write returns
    pool.flush()
    pool.settle()
    for slot in range(CACHE_SIZE):
        want = packed(nbytes, slot).tobytes() if slot in data else bytes(nbytes)
        assert slot_bytes(pool, slot) == want


@pytest.mark.parametrize("writer", ["device", "device-load"])
def test_device_batches_last_write_wins_and_full_batches_flush(writer):
    writers = SlotWriters(writer)
    a, _, nbytes = make_pool(writer, cache_size=MAX_BATCH_ROWS + 4, writers=writers)
    b, _, _ = make_pool(writer, cache_size=3, writers=writers)
    assert a.writer.batch is b.writer.batch  # one host batch per model
    a.write(2, packed(nbytes, 100))
    a.write(2, packed(nbytes, 2))  # the same slot again before the flush: the last bytes count
    b.write(1, packed(nbytes, 51))  # another pool takes the batch: a's rows are uploaded first
    for slot in range(3, MAX_BATCH_ROWS + 4):  # more rows than one batch holds
        a.write(slot, packed(nbytes, slot))
    a.flush()
    b.flush()
    assert slot_bytes(a, 2) == packed(nbytes, 2).tobytes()
    assert slot_bytes(b, 1) == packed(nbytes, 51).tobytes()
    for slot in range(3, MAX_BATCH_ROWS + 4):
        assert slot_bytes(a, slot) == packed(nbytes, slot).tobytes()


def test_device_write_updates_the_pool_in_place():
    """No whole-pool copy: peak memory grows by the upload, not by another pool."""
    pool, owner, nbytes = make_pool("device", cache_size=64, rows=256)
    pool_nbytes = sum(getattr(owner, a).nbytes for a in ("weight", "scales", "biases"))
    assert pool_nbytes == 64 * nbytes
    bufs = [packed(nbytes, s) for s in range(4)]
    for n in (1, 4):  # one expert (slice update), a batch (scatter)
        gc.collect()
        mx.eval(owner.weight)
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        for slot in range(n):
            pool.write(10 + slot, bufs[slot])
        pool.settle()
        grown = mx.get_peak_memory() - before
        assert grown < pool_nbytes / 2, (n, grown, pool_nbytes)
        assert slot_bytes(pool, 10 + n - 1) == bufs[n - 1].tobytes()


@pytest.mark.parametrize("writer", ["host", "device"])
def test_a_pending_computation_is_evaluated_before_its_slot_is_overwritten(writer):
    """A lazy result over a slot keeps the bytes it was built with, whoever writes next."""
    pool, owner, nbytes = make_pool(writer)
    pool.write(3, packed(nbytes, 1))
    pool.settle()
    expected = np.array(owner.scales[3] * 2)
    lazy = owner.scales[mx.array([3])] * 2  # built, not evaluated
    pool.reading(lazy, np.array([3], dtype=np.int32))
    pool.write(3, packed(nbytes, 2))  # overwrite the slot while the result is pending
    pool.flush()
    assert np.array(lazy)[0].tobytes() == expected.tobytes()
    assert slot_bytes(pool, 3) == packed(nbytes, 2).tobytes()


def test_without_the_guard_a_host_write_races_the_pending_computation(monkeypatch):
    """The guard above is what keeps the host writer right: disabled, the result changes."""
    pool, owner, nbytes = make_pool("host")
    pool.write(3, packed(nbytes, 1))
    expected = np.array(owner.scales[3] * 2)
    lazy = owner.scales[mx.array([3])] * 2
    pool.reading(lazy, np.array([3], dtype=np.int32))
    monkeypatch.setattr(pool, "_before_write", lambda slot: None)
    pool.write(3, packed(nbytes, 2))
    assert np.array(lazy)[0].tobytes() != expected.tobytes()


def test_writes_to_other_slots_do_not_wait_for_a_reader():
    """The host writer writes only the slot's bytes: a reader of other slots is left running."""
    pool, owner, nbytes = make_pool("host")
    lazy = owner.scales[mx.array([0, 1])] * 2
    pool.reading(lazy, np.array([0, 1], dtype=np.int32))
    pool.write(4, packed(nbytes, 4))
    assert len(pool._readers) == 1  # not evaluated, still registered
    pool.write(1, packed(nbytes, 1))
    assert pool._readers == []


def test_two_lazy_forward_passes_match_stock(checkpoints):
    """A caller holding two unevaluated forward passes over a small cache gets stock's logits."""
    from golem.runtime import load
    from helpers import stock

    path = checkpoints("qwen3_moe")
    model, _ = stock(path)
    inputs = [mx.array([[t]]) for t in (11, 57, 203)]
    expected = [np.array(model(x)) for x in inputs]
    for writer in ("host", "device"):
        with load(str(path), cache_sizes=4, slot_writer=writer) as (m, _):
            lazy = [m(x) for x in inputs]  # every MoE layer misses; nothing evaluated in between
            got = [np.array(y) for y in lazy]
            assert m.golem.engine.stats.total().evictions > 0
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_default_writer_and_names():
    if mx.default_device() == mx.cpu:
        assert default_writer() == "host"
    assert resolve_writer(None) == resolve_writer("auto") == default_writer()
    assert resolve_writer("device-load") == "device-load"
    with pytest.raises(ValueError, match="--slot-writer 'gpu'"):
        resolve_writer("gpu")


def test_host_batch_grows_to_the_largest_expert():
    batch = HostBatch(max_rows=2)
    assert batch.rows(10).shape == (2, 10)
    assert batch.rows(100).shape == (2, 100)
    assert batch.rows(10).shape == (2, 10) and batch.buffer.size == 200
    assert isinstance(make_pool("device")[0].writer, DeviceWriter)


class LockProbe:
    """A thread that counts its turns with the interpreter lock and gives it back at once; with
    the switch interval raised, it gets a turn only when another thread lets the lock go."""

    def __init__(self):
        self.turns = 0
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self._started.set()
        while not self._stop.is_set():
            self.turns += 1
            time.sleep(0)

    def __enter__(self):
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(5.0)
        self._thread.start()
        self._started.wait()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        sys.setswitchinterval(self._interval)
        self._thread.join()


@pytest.mark.parametrize("writer", WRITERS)
def test_a_slot_write_keeps_the_interpreter_lock(writer):
    """A write lets no reader thread take the lock (the engine would then wait to get it back),
    and the probe does see a call that lets it go."""
    pool, _, nbytes = make_pool(writer, rows=1 << 14)  # 256 KiB experts: numpy would let the lock go
    buf = packed(nbytes, 7)
    with LockProbe() as probe:
        deadline = time.monotonic() + 10
        while probe.turns == 0 and time.monotonic() < deadline:
            time.sleep(0.001)  # lets the lock go: the probe runs
        before = probe.turns
        assert before > 0
        for slot in range(CACHE_SIZE):
            pool.writer.put(slot, buf)
        assert probe.turns == before
    pool.flush()
    pool.settle()
    assert slot_bytes(pool, CACHE_SIZE - 1) == buf.tobytes()
