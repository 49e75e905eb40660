"""Slot writers: how a packed expert gets from a staging buffer into a slot of a pool.

Owns the copy from host memory (where reads land) into the pool arrays of one MoE layer,
one implementation per kind of backend memory, chosen at start-up:

- ``host``: one memcpy per pool array through a host view of the pool's own memory. On the
  CPU and on Metal (shared memory) that view is the array itself: no upload at all.
- ``device``: never takes a host view of a pool. The layer's pending experts are gathered
  in one host batch, uploaded as one ``mx.array``, and written with in-place slice updates
  (``pool[a:b] = x``, one per run of adjacent slots: a scatter would copy the pool) that
  MLX orders after every computation built before them.
- ``device-load``: as ``device``, but the batch is uploaded by ``mx.load`` from an
  in-memory ``.npy`` stream (on CUDA one host-to-device copy into device memory, where an
  ``mx.array`` lands in managed memory).

Knows nothing of files, policies or which expert goes where: the pool names the slot, and
the pool (not the writer) makes sure no computation still reads a slot being overwritten.
Every method is called from the engine's thread only.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

WRITERS = ("host", "device", "device-load")
AUTO = "auto"
MAX_BATCH_ROWS = 8  # a device batch is uploaded once it holds this many experts (a decode step misses at most top-k per layer)


def default_writer() -> str:
    """The writer this backend runs best with.

    CPU: ``host`` (one memcpy; ``benchmarks/bench_upload.py`` measures it fastest there).
    Metal: ``host`` (unified memory: the view is the array, zero copy).
    CUDA: ``device``, pending a measurement on a GPU (``benchmarks/gpu_check.sh``): a host
    view moves a pool into managed memory for good and each host write then faults its
    pages back and forth (about 1 ms per 2 MB expert measured on an H200), which only a
    path that never views a pool avoids.
    """
    if mx.default_device() == mx.cpu:
        return "host"
    if mx.metal.is_available():
        return "host"
    return "device"


def resolve_writer(name: Optional[str]) -> str:
    """``None`` / ``"auto"`` -> this backend's default; anything else is checked."""
    if name is None or name == AUTO:
        return default_writer()
    if name not in WRITERS:
        raise ValueError(f"--slot-writer {name!r}: expected one of {', '.join((AUTO,) + WRITERS)}")
    return name


def copy_bytes(dst: memoryview, at: int, src: memoryview) -> None:
    """``dst[at:at + len(src)] = src``: one memcpy that keeps the interpreter lock.

    A numpy copy of more than a few hundred elements lets the lock go for the memcpy; the
    engine thread then waits to take it back from whichever reader thread took it, once per
    copy (nine per expert of a stacked checkpoint). A memoryview copy never lets it go, and
    costs less CPU than a numpy slice assignment. Measured in a decode:
    ``benchmarks/bench_switches.py --switch held-copies --interleave``; where the engine
    thread lets the lock go: ``benchmarks/profile_gil.py``.
    """
    dst[at:at + len(src)] = src


def host_view(arr: mx.array) -> Optional[np.ndarray]:
    """A writable uint8 view of an evaluated array's own memory, or None.

    None where the buffer protocol gives no such view, or where a canary written through it
    does not read back through MLX (a backend whose arrays live apart from host memory).
    """
    try:
        view = np.frombuffer(memoryview(arr).cast("B"), dtype=np.uint8)
    except (TypeError, ValueError, BufferError):
        return None
    if view.size != arr.nbytes or not view.flags.writeable or view.size == 0:
        return None
    old = (int(view[0]), int(view[-1]))
    view[0], view[-1] = 0xA5, 0x5A
    flat = arr.reshape(-1)
    seen = np.array(mx.concatenate([flat[:1], flat[-1:]]).view(mx.uint8))
    view[0], view[-1] = old
    return view if seen[0] == 0xA5 and seen[-1] == 0x5A else None


class SlotWriter:
    """Writes packed experts into the slots of one layer's pool arrays.

    ``put(slot, packed)`` may keep nothing of ``packed`` once it returns (the staging buffer
    goes back to the I/O scheduler); ``flush()`` makes every put visible to computations
    built after it; ``settle()`` also evaluates them.

    ``exclusive``: True when a write replaces a whole pool array (an MLX slice update), so
    no computation may still hold the array; False when it writes only the slot's bytes.

    Args:
        parts: the layer's ``PoolPart`` list (spec, owner, attribute).
        cache_size: slots in the pool.
    """

    name = ""
    exclusive = False

    def __init__(self, parts: Sequence, cache_size: int):
        self.parts = list(parts)
        self.cache_size = cache_size
        self.nbytes = sum(p.spec.expert_nbytes for p in self.parts)

    def arrays(self) -> List[mx.array]:
        return [getattr(p.owner, p.attr) for p in self.parts]

    def put(self, slot: int, packed: np.ndarray) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def settle(self) -> None:
        self.flush()
        mx.eval(self.arrays())


class HostViewWriter(SlotWriter):
    """One memcpy per pool array, through a host view of the pool's memory.

    Raises ValueError where the backend gives no host view that reads back through MLX.
    """

    name = "host"

    def __init__(self, parts: Sequence, cache_size: int):
        super().__init__(parts, cache_size)
        cuts = []
        for p in self.parts:
            view = host_view(getattr(p.owner, p.attr))
            if view is None:
                raise ValueError("slot writer 'host' needs pools the host can write in place; "
                                 "this backend gives no such view (use 'device')")
            n = p.spec.expert_nbytes
            cuts.append((memoryview(view), n, p.spec.dest, p.spec.dest + n))
        self._cuts = cuts

    def put(self, slot: int, packed: np.ndarray) -> None:
        src = memoryview(packed)
        for pool, n, begin, end in self._cuts:
            at = slot * n
            pool[at:at + n] = src[begin:end]  # ``copy_bytes`` written out: no call per tensor


class _NpyStream:
    """A read-only file object: an ``.npy`` header, then a host buffer's bytes (for ``mx.load``)."""

    closed = False

    def __init__(self, data: np.ndarray):
        self._data = memoryview(data.reshape(-1)).cast("B")
        header = "{'descr': '|u1', 'fortran_order': False, 'shape': (%d,), }" % len(self._data)
        header += " " * (63 - (10 + len(header)) % 64) + "\n"
        self._head = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
        self._pos = 0
        self._end = len(self._head) + len(self._data)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else self._end + offset
        return self._pos

    def readinto(self, out) -> int:
        out = memoryview(out).cast("B")
        done, head = 0, len(self._head)
        while done < len(out) and self._pos < self._end:
            if self._pos < head:
                n = min(len(out) - done, head - self._pos)
                out[done:done + n] = self._head[self._pos:self._pos + n]
            else:
                at = self._pos - head
                n = min(len(out) - done, len(self._data) - at)
                out[done:done + n] = self._data[at:at + n]
            done += n
            self._pos += n
        return done

    def read(self, n: int = -1) -> bytes:
        out = bytearray(max(0, min(self._end - self._pos, n if n >= 0 else self._end)))
        self.readinto(out)
        return bytes(out)


class HostBatch:
    """One host buffer, shared by the device writers of a model, that batches uploads.

    At most one writer holds rows at a time: a put from another writer first flushes the
    holder. Grows to ``max_rows`` rows of the largest expert seen.
    """

    def __init__(self, max_rows: int = MAX_BATCH_ROWS):
        self.max_rows = max_rows
        self.buffer = np.empty(0, dtype=np.uint8)
        self.holder: Optional["DeviceWriter"] = None

    def rows(self, nbytes: int) -> np.ndarray:
        if self.buffer.size < self.max_rows * nbytes:
            self.buffer = np.empty(self.max_rows * nbytes, dtype=np.uint8)
        return self.buffer[: self.max_rows * nbytes].reshape(self.max_rows, nbytes)


class DeviceWriter(SlotWriter):
    """Batched upload, then one in-place slice update per pool array; no host view of a pool.

    The update is built lazily and evaluated with the next computation over the pool (or by
    ``settle``); it stays in place (the pool's buffer is donated) when nothing else holds
    the pool then, which the pool guarantees before each put.

    Args:
        parts: the layer's ``PoolPart`` list.
        cache_size: slots in the pool.
        batch: the host batch shared with the model's other device writers.
        upload: ``"array"`` (``mx.array`` of the batch) or ``"load"`` (``mx.load`` of it).
    """

    exclusive = True

    def __init__(self, parts: Sequence, cache_size: int, batch: Optional[HostBatch] = None,
                 upload: str = "array"):
        super().__init__(parts, cache_size)
        self.batch = batch or HostBatch()
        self.upload = upload
        self.name = "device" if upload == "array" else "device-load"
        self._rows: Dict[int, int] = {}  # slot -> row of the host batch
        self._cuts = []
        for p in self.parts:
            dtype = getattr(p.owner, p.attr).dtype
            self._cuts.append((p.owner, p.attr, p.spec.dest, p.spec.dest + p.spec.expert_nbytes,
                               dtype, tuple(p.spec.expert_shape)))

    def put(self, slot: int, packed: np.ndarray) -> None:
        batch = self.batch
        if batch.holder is not self:
            if batch.holder is not None:
                batch.holder.flush()
            batch.holder = self
        rows = batch.rows(self.nbytes)
        row = self._rows.get(slot)
        if row is None:
            if len(self._rows) == batch.max_rows:
                self.flush()
                batch.holder = self
                rows = batch.rows(self.nbytes)
            row = self._rows[slot] = len(self._rows)
        copy_bytes(memoryview(rows[row]), 0, memoryview(packed)[: self.nbytes])

    def flush(self) -> None:
        if not self._rows:
            return
        slots = list(self._rows)
        n = len(slots)
        host = self.batch.rows(self.nbytes)[:n]
        if self.upload == "load":
            raw = mx.load(_NpyStream(host), format="npy").reshape(n, self.nbytes)
        else:
            raw = mx.array(host)
        self._rows.clear()
        self.batch.holder = None
        runs = _runs(slots)  # slice updates over runs of adjacent slots stay in place (a scatter copies)
        for owner, attr, begin, end, dtype, shape in self._cuts:
            pool = getattr(owner, attr)
            x = raw[:, begin:end].view(dtype).reshape(n, *shape)
            for row, slot, count in runs:
                pool[slot:slot + count] = x[row:row + count]


def _runs(slots: Sequence[int]) -> List[tuple]:
    """``[(first row, first slot, count)]``: rows whose slots follow one another."""
    runs: List[list] = []
    for row, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            runs[-1][2] += 1
        else:
            runs.append([row, slot, 1])
    return [tuple(r) for r in runs]


class SlotWriters:
    """Makes the slot writer of each pool of one model (they share a host batch).

    Args:
        name: ``"host"``, ``"device"``, ``"device-load"``, or ``"auto"``/None for the
            backend's default (``default_writer``). Under ``"auto"`` a backend that turns
            out to give no host view gets ``device``.
    """

    def __init__(self, name: Optional[str] = AUTO):
        self.auto = name is None or name == AUTO
        self.name = resolve_writer(name)
        self.batch = HostBatch()

    def new(self, parts: Sequence, cache_size: int) -> SlotWriter:
        if self.name == "host":
            try:
                return HostViewWriter(parts, cache_size)
            except ValueError:
                if not self.auto:
                    raise
        upload = "load" if self.name == "device-load" else "array"
        return DeviceWriter(parts, cache_size, self.batch, upload=upload)
