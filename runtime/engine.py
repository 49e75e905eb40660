"""The decode engine: maps each MoE layer's routed expert ids to resident slots.

Owns the per-layer slot pools, the synchronous demand reads on a miss, the prefill
streaming of experts group by group, and the counters. The model's router and its
combination of expert outputs are untouched: the engine only replaces what the experts
module computes with the same computation over the slot pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from golem.io.index import ExpertIndex
from golem.io.reads import FileHandles, aligned_empty, read_ranges

from .slots import LayerStats, SlotPool

ExpertReader = Callable[[int, int, np.ndarray], int]  # (layer, expert, out) -> nbytes


class DiskReader:
    """Synchronous expert reads: the index's byte ranges into a packed buffer.

    Args:
        index: the expert index.
        direct: bypass the page cache (O_DIRECT) where the OS allows it.
        throttle: optional storage emulator with ``acquire(nbytes)`` (a slower disk).
    """

    def __init__(self, index: ExpertIndex, *, direct: bool = False, throttle=None):
        self.index = index
        self.direct = direct
        self.throttle = throttle
        self.handles = FileHandles()

    def __call__(self, layer: int, expert: int, out: np.ndarray) -> int:
        ranges = self.index.ranges(layer, expert)
        if self.throttle is not None:
            self.throttle.acquire(sum(r.nbytes for r in ranges))
        return read_ranges(ranges, out, handles=self.handles, direct=self.direct, what=f"expert ({layer}, {expert})")

    def close(self) -> None:
        self.handles.close()


@dataclass
class EngineStats:
    """Totals over all layers, plus host syncs (reads of device values by the host)."""

    host_syncs: int = 0
    forward_calls: int = 0
    tokens: int = 0
    layers: Dict[int, LayerStats] = field(default_factory=dict)

    def total(self) -> LayerStats:
        t = LayerStats()
        for s in self.layers.values():
            t.capacity += s.capacity
            t.hits += s.hits
            t.misses += s.misses
            t.prefetch_hits += s.prefetch_hits
            t.bytes_read += s.bytes_read
            t.read_s += s.read_s
            t.evictions += s.evictions
        return t


class Engine:
    """Resolves expert ids to slots, loading what is missing.

    Args:
        index: per-expert byte ranges of every MoE layer.
        pools: the slot pool of every MoE layer.
        reader: ``(layer, expert, out) -> nbytes``; fills ``out`` with the packed expert.
        clock: time source for stall accounting.
    """

    def __init__(self, index: ExpertIndex, pools: Dict[int, SlotPool], reader: ExpertReader, *, clock=time.perf_counter):
        self.index = index
        self.pools = pools
        self.reader = reader
        self.clock = clock
        self.first_layer = min(pools)
        self.stats = EngineStats(layers={l: p.stats for l, p in pools.items()})
        self._staging: Dict[int, np.ndarray] = {}
        self.trace = None  # optional recorder with record(layer, ids, scores=None)

    # -- loading ---------------------------------------------------------------
    def _staging_for(self, layer: int) -> np.ndarray:
        nbytes = self.index.expert_nbytes(layer)
        buf = self._staging.get(nbytes)
        if buf is None:
            buf = self._staging[nbytes] = aligned_empty(nbytes)
        return buf

    def load(self, layer: int, expert: int, protected=()) -> None:
        """Synchronously read ``expert`` into a slot of ``layer`` (a demand read)."""
        pool = self.pools[layer]
        buf = self._staging_for(layer)
        t0 = self.clock()
        nbytes = self.reader(layer, expert, buf)
        pool.stats.read_s += self.clock() - t0
        pool.stats.bytes_read += nbytes
        slot = pool.claim(expert, protected)
        pool.install(expert, slot, buf)

    def preload(self, layer: int, experts) -> None:
        """Load ``experts`` into ``layer`` (warm start, pinned layers), in order."""
        pool = self.pools[layer]
        for e in experts:
            if pool.fully_resident or not pool.is_resident(int(e)):
                self.load(layer, int(e))
        pool.settle()

    def _ensure(self, pool: SlotPool, needed: np.ndarray) -> None:
        protected = set(int(e) for e in needed)
        hits = [e for e in protected if pool.is_resident(e)]
        pool.touch(hits)
        pool.stats.hits += len(hits)
        misses = [e for e in protected if not pool.is_resident(e)]
        pool.stats.misses += len(misses)
        for e in misses:
            self.load(pool.layer, e, protected)

    # -- the experts module's computation ----------------------------------------
    def forward(self, layer: int, glu: nn.Module, x: mx.array, indices: mx.array) -> mx.array:
        pool = self.pools[layer]
        if layer == self.first_layer:
            self.stats.forward_calls += 1
            self.stats.tokens += int(np.prod(indices.shape[:-1]))
            for p in self.pools.values():
                p.policy.tick()
        if pool.fully_resident and self.trace is None:
            return glu(x, indices)
        ids = np.array(indices)  # the one host sync of this layer
        self.stats.host_syncs += 1
        if self.trace is not None:
            self.trace.record(layer, ids)
        if pool.fully_resident:
            return glu(x, indices)
        needed = np.unique(ids)
        if len(needed) <= pool.capacity:
            self._ensure(pool, needed)
            return glu(x, mx.array(pool.slots(ids)))
        return self._streamed(pool, glu, x, ids, needed)

    def _streamed(self, pool: SlotPool, glu: nn.Module, x: mx.array, ids: np.ndarray, needed: np.ndarray) -> mx.array:
        """More distinct experts than slots (prefill): compute them group by group.

        Each group's result is evaluated before the next group overwrites slots, so a
        layer never holds two copies of its pool. The last group stays resident.
        """
        *lead, k = ids.shape
        flat = ids.reshape(-1)
        x2 = x.reshape(-1, x.shape[-1])
        resident = [int(e) for e in needed if pool.is_resident(int(e))]
        missing = [int(e) for e in needed if not pool.is_resident(int(e))]
        order = resident + missing
        cap = pool.capacity
        outputs, rows_all = [], []
        for start in range(0, len(order), cap):
            group = np.array(order[start : start + cap], dtype=flat.dtype)
            self._ensure(pool, group)
            rows = np.flatnonzero(np.isin(flat, group))
            xs = x2[mx.array(rows // k)]
            slots = mx.array(pool.slots(flat[rows]))[:, None]
            y = glu(xs, slots)[:, 0, :]
            mx.eval(y)
            self.stats.host_syncs += 1
            outputs.append(y)
            rows_all.append(rows)
        inverse = np.argsort(np.concatenate(rows_all))
        y = mx.concatenate(outputs, axis=0)[mx.array(inverse)]
        return y.reshape(*lead, k, y.shape[-1])


class OffloadedExperts(nn.Module):
    """Stands where the model's ``SwitchGLU`` stood; same call, experts from slots.

    Args:
        glu: the model's own experts module, whose stacked arrays are now slot pools.
        layer: the decoder layer number.
        engine: the engine that resolves ids to slots.
    """

    def __init__(self, glu: nn.Module, layer: int, engine: Engine):
        super().__init__()
        self.glu = glu
        self.layer = layer
        self.engine = engine

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return self.engine.forward(self.layer, self.glu, x, indices)
