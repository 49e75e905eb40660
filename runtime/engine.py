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

from golem.runtime.slots import LayerStats, SlotPool

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
    decode_steps: int = 0
    decode_host_syncs: int = 0
    decode_read_s: float = 0.0
    decode_misses: int = 0  # demand reads while decoding (prefill's are left out)
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
    """Resolves expert ids to slots, loading what is missing, prefetching what comes next.

    Host syncs: a fully resident layer costs none (its ids index the pool directly). Any
    other layer costs one: its ids, the predictor's lazy outputs and the trace's weights
    are read back together in one ``mx.eval``. That sync is also the safe point where
    completed prefetches are installed: nothing in flight can still read a pool then.

    Args:
        index: per-expert byte ranges of every MoE layer.
        pools: the slot pool of every MoE layer.
        reader: ``(layer, expert, out) -> nbytes``; fills ``out`` with the packed expert
            (used when there is no scheduler).
        scheduler: optional ``golem.io.scheduler.IOScheduler`` keyed by ``(layer, expert)``;
            demand reads then go through it too, overtaking its prefetch queue.
        prefetcher: optional ``Prefetcher`` (needs ``scheduler``).
        hidden: optional ``(layer, x) -> hidden`` giving the predictor its input at a layer.
        clock: time source for stall accounting.
    """

    def __init__(self, index: ExpertIndex, pools: Dict[int, SlotPool], reader: ExpertReader, *,
                 scheduler=None, prefetcher=None, hidden=None, clock=time.perf_counter):
        self.index = index
        self.pools = pools
        self.reader = reader
        self.scheduler = scheduler
        self.prefetcher = prefetcher
        self.hidden = hidden or (lambda layer, x: x)
        self.clock = clock
        self.first_layer = min(pools)
        self.stats = EngineStats(layers={l: p.stats for l, p in pools.items()})
        self._staging: Dict[int, np.ndarray] = {}
        self.trace = None  # optional recorder: weights(layer, x) -> lazy array; record(layer, ids, weights)
        self._decoding = False
        self._prefilling = False  # a prompt arrives in one or more multi-token calls

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    # -- loading ---------------------------------------------------------------
    def _staging_for(self, layer: int) -> np.ndarray:
        nbytes = self.index.expert_nbytes(layer)
        buf = self._staging.get(nbytes)
        if buf is None:
            buf = self._staging[nbytes] = aligned_empty(nbytes)
        return buf

    def _place(self, layer: int, expert: int, buf: np.ndarray, protected) -> bool:
        """Install ``buf`` as ``expert`` of ``layer``; False when every slot is protected."""
        pool = self.pools[layer]
        try:
            slot, victim = pool.claim(expert, protected)
        except LookupError:
            return False
        self._evicted(layer, victim)
        pool.install(expert, slot, buf, cold=True)
        return True

    def _evicted(self, layer: int, victim: int) -> None:
        if victim >= 0 and self.prefetcher is not None and (layer, victim) in self.prefetcher.unused:
            self.prefetcher.dropped(layer, victim, self.pools[layer].expert_nbytes)

    def load(self, layer: int, expert: int, protected=()) -> None:
        """Synchronously read ``expert`` into a slot of ``layer`` (a demand read)."""
        pool = self.pools[layer]
        slot, victim = pool.claim(expert, protected)
        self._evicted(layer, victim)
        pool.assign(expert, slot)
        self._fetch(layer, [(expert, slot)])

    def _fetch(self, layer: int, todo, meanwhile=None) -> None:
        """Read ``[(expert, slot), ...]`` (already assigned) and write them into their slots.

        ``meanwhile()`` runs after the demand reads are queued and before waiting on them
        (the engine issues its prefetches there, so they queue behind the demand reads).
        On failure every expert not written is unassigned again, so a slot never maps an
        expert whose bytes did not arrive.
        """
        pool = self.pools[layer]
        t0 = self.clock()
        pending = dict(todo)
        try:
            if self.scheduler is None:
                if meanwhile is not None:
                    meanwhile()
                buf = self._staging_for(layer)
                for e, slot in todo:
                    pool.stats.bytes_read += self.reader(layer, e, buf)
                    pool.write(slot, buf)
                    del pending[e]
            else:
                futures = [(e, slot, self.scheduler.submit((layer, e), depth=0)) for e, slot in todo]
                try:
                    if meanwhile is not None:
                        meanwhile()
                    for e, slot, future in futures:
                        buf = future.result()
                        try:
                            pool.stats.bytes_read += len(buf)
                            if self.prefetcher is not None:
                                self.prefetcher.late(layer, e)
                            pool.write(slot, buf)
                            del pending[e]
                        finally:
                            self.scheduler.release(buf)
                except BaseException:
                    for _, _, future in futures:  # the engine stops: hand back what still arrives
                        future.add_done_callback(self._release_result)
                    raise
        except BaseException:
            for e in pending:
                pool.unassign(e)
            raise
        finally:
            waited = self.clock() - t0
            pool.stats.read_s += waited
            if self._decoding:
                self.stats.decode_read_s += waited

    def _release_result(self, future) -> None:
        if not future.cancelled() and future.exception() is None:
            try:
                self.scheduler.release(future.result())
            except Exception:
                pass

    def preload(self, layer: int, experts) -> None:
        """Load ``experts`` into ``layer`` (warm start, pinned layers), in order."""
        pool = self.pools[layer]
        todo = []
        for e in experts:
            e = int(e)
            if pool.fully_resident:
                todo.append((e, e))
            elif not pool.is_resident(e):
                slot, victim = pool.claim(e)
                pool.assign(e, slot)
                todo.append((e, slot))
        self._fetch(layer, todo)
        pool.settle()

    def warm(self, experts_by_layer) -> None:
        """Warm start: load each layer's listed experts (the last listed ends most recent)."""
        for layer, experts in experts_by_layer.items():
            pool = self.pools.get(layer)
            if pool is not None and not pool.fully_resident:
                self.preload(layer, list(experts)[-pool.capacity:])

    def _ensure(self, pool: SlotPool, needed: np.ndarray, meanwhile=None) -> None:
        hits, todo, evicted = pool.plan(needed)
        for victim in evicted:
            self._evicted(pool.layer, victim)
        pool.stats.hits += len(hits)
        pool.stats.misses += len(todo)
        self.stats.decode_misses += len(todo) if self._decoding else 0
        if self.prefetcher is not None:
            for e in hits:
                if self.prefetcher.used(pool.layer, e, pool.expert_nbytes):
                    pool.stats.prefetch_hits += 1
        if todo:
            self._fetch(pool.layer, todo, meanwhile)
        elif meanwhile is not None:
            meanwhile()

    # -- prefetch, at a safe point -----------------------------------------------
    def _install_prefetched(self, layer: int, protected) -> None:
        for (l, e), buf in self.scheduler.poll(0):
            try:
                pool = self.pools[l]
                if pool.is_resident(e):
                    self.prefetcher.in_flight.pop((l, e), None)
                    continue
                keep = protected if l == layer else self.prefetcher._predicted.get(self.prefetcher.position[l], ())
                if self._place(l, e, buf, keep):
                    pool.stats.bytes_read += len(buf)
                    self.prefetcher.landed(l, e)
                else:
                    self.prefetcher.dropped(l, e, len(buf))
            finally:
                self.scheduler.release(buf)

    def _prefetch(self, layer: int, ids: np.ndarray, proposals) -> None:
        pf, sched = self.prefetcher, self.scheduler
        here = pf.position[layer]
        for (l, e) in [k for k in pf.in_flight if k[0] == layer]:
            if e not in ids and sched.cancel((l, e)):
                pf.dropped(l, e, self.pools[l].expert_nbytes)
            elif sched.pending((l, e)) is None:
                pf.in_flight.pop((l, e), None)
        resident = lambda l: self.pools[l].slot_of >= 0 if not self.pools[l].fully_resident else np.ones(self.pools[l].num_experts, bool)
        for proposal in proposals:
            wanted = pf.candidates(proposal, resident)
            # A nearer layer's guess supersedes a farther one's: drop queued reads it no longer names.
            keep = {(l, e) for l, e, _ in wanted}
            targets = {pf.moe_layers[t % len(pf.moe_layers)] for t in proposal.targets}
            for key in [k for k in pf.in_flight if k[0] in targets and k not in keep]:
                if pf.in_flight[key] != here and sched.pending(key) == "queued" and sched.cancel(key):
                    pf.dropped(key[0], key[1], 0)
            for l, e, score in wanted:
                sched.submit((l, e), depth=pf.distance(here, l), score=score)
                pf.issued(l, e, here)

    # -- the experts module's computation ----------------------------------------
    def forward(self, layer: int, glu: nn.Module, x: mx.array, indices: mx.array) -> mx.array:
        pool = self.pools[layer]
        tokens = int(np.prod(indices.shape[:-1]))
        pf = self.prefetcher
        if layer == self.first_layer:
            self.stats.forward_calls += 1
            self.stats.tokens += tokens
            for p in self.pools.values():
                p.policy.tick()
            self._decoding = tokens == 1
            self.stats.decode_steps += self._decoding
            if pf is not None:
                if self._decoding:
                    pf.begin_step()
                elif not self._prefilling:
                    pf.begin_sequence()  # a new prompt; its later prefill chunks continue it
            self._prefilling = not self._decoding
        proposals = pf.propose(layer, self.hidden(layer, x)) if pf is not None and self._decoding else []
        if pool.fully_resident and self.trace is None and not proposals:
            return glu(x, indices)
        extra = self.trace.weights(layer, x) if self.trace is not None else []
        weights = extra[:1] if self.trace is not None and self.trace.route is not None else None
        mx.eval([indices, *extra, *(a for p in proposals for a in p.arrays)])  # this layer's one host sync
        self.stats.host_syncs += 1
        self.stats.decode_host_syncs += self._decoding
        ids = np.array(indices)
        if self.trace is not None:
            self.trace.record(layer, ids, [np.array(a) for a in extra])
        prefetch = None
        if pf is not None:
            if self._decoding:
                pf.observe(layer, ids, weights[0] if weights else None)
                prefetch = lambda: self._prefetch(layer, ids, proposals)  # queued behind this layer's demand reads
            self._install_prefetched(layer, set(int(e) for e in ids.reshape(-1)))
        if pool.fully_resident:
            if prefetch is not None:
                prefetch()
            return glu(x, indices)
        needed = np.unique(ids)
        if len(needed) <= pool.capacity:
            self._ensure(pool, needed, prefetch)
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


class ResidualTap(nn.Module):
    """Stands where a decoder layer's pre-MoE norm stood; remembers its input (lazily).

    The residual stream after attention is what router lookahead feeds to the next
    layers' routers. Keeping a reference costs no evaluation and no host sync.

    Args:
        norm: the layer's own ``post_attention_layernorm``.
        store: dict the residual goes into, keyed by ``layer``.
        layer: the decoder layer number.
    """

    def __init__(self, norm: nn.Module, store: dict, layer: int):
        super().__init__()
        self.norm = norm
        self.layer = layer
        object.__setattr__(self, "_store", store)  # a plain dict, not a child of the module tree

    def __call__(self, x: mx.array) -> mx.array:
        self._store[self.layer] = x
        return self.norm(x)


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
