"""Slot pools: the resident experts of one MoE layer.

A pool owns, for one layer, the arrays shaped like the stacked expert tensors with the
first axis = slots, the expert -> slot table, the eviction policy and the layer's counters.
It never reads files: bytes arrive as packed expert buffers (see ``golem.io.index``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Container, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from golem.io.index import StackedTensor

from golem.runtime.policies import DEFAULT_POLICY, Policy, make_policy
from golem.runtime.writers import SlotWriter, SlotWriters

MAX_READERS = 4  # registered computations a pool keeps before it evaluates the older ones
KEEP_READERS = 2  # the newest, never evaluated by the cap: a decode step registers at most two


@dataclass
class LayerStats:
    """Counters of one layer's pool (decode and prefill together unless split by the caller)."""

    cache_size: int = 0
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    bytes_read: int = 0
    read_s: float = 0.0
    evictions: int = 0

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 1.0


@dataclass
class PoolPart:
    """One stacked tensor of the layer: where its slots live in the model.

    Args:
        spec: the tensor as indexed (per-expert shape, bytes, offset in a packed buffer).
        owner: the module whose attribute holds the pool array.
        attr: that attribute's name ("weight", "scales", "biases", "bias").
    """

    spec: StackedTensor
    owner: object
    attr: str


class SlotPool:
    """The slots of one MoE layer.

    Slot safety: a slot is overwritten only when no computation that can read it is queued
    or running. The engine writes only at a layer's host sync, after ``mx.eval`` of the
    layer's routing, which in mlx-lm's loop depends on everything the previous steps built
    (so every kernel that read a pool before has finished). What the engine starts itself
    (a decode step's resident experts, computed while its misses load) and every decode
    step's result is registered with ``reading(out, slots)``; before a write, the pool
    evaluates those still registered that read the slot (any of them when the writer
    replaces whole arrays: ``exclusive``, where a computation holding the old array would
    also force a copy of the pool). After a host sync they are done already, so this costs
    nothing in a decode loop; it keeps a caller that holds several lazy decode steps right.
    A fully resident pool is written only while loading, before any reads.

    Args:
        layer: the decoder layer number of this MoE layer.
        num_experts: experts in the layer.
        cache_size: slots; ``cache_size == num_experts`` makes the layer fully resident
            (slot i holds expert i, no table, no eviction).
        parts: the layer's stacked tensors and the module attributes holding their pools.
        policy: eviction policy name.
        writers: makes this pool's ``SlotWriter`` (default: the backend's, see
            ``golem.runtime.writers.default_writer``).
    """

    def __init__(self, layer: int, num_experts: int, cache_size: int, parts: Sequence[PoolPart],
                 policy: str = DEFAULT_POLICY, writers: Optional[SlotWriters] = None):
        if cache_size < 1 or cache_size > num_experts:
            raise ValueError(f"layer {layer}: cache_size {cache_size} outside [1, {num_experts}]")
        self.layer = layer
        self.num_experts = num_experts
        self.cache_size = cache_size
        self.parts = list(parts)
        self.policy: Policy = make_policy(policy)
        self.slot_of = np.full(num_experts, -1, dtype=np.int32)  # expert -> slot
        self.expert_in = np.full(cache_size, -1, dtype=np.int32)  # slot -> expert
        self.stats = LayerStats(cache_size=cache_size)
        for p in self.parts:
            dtype = getattr(p.owner, p.attr).dtype
            setattr(p.owner, p.attr, mx.zeros((cache_size, *p.spec.expert_shape), dtype=dtype))
        mx.eval([getattr(p.owner, p.attr) for p in self.parts])
        self._identity = cache_size == num_experts  # slot i holds expert i: no table
        self._full = False  # no free slot: claims evict without looking for one
        self._expert_nbytes = sum(p.spec.expert_nbytes for p in self.parts)
        self.writer: SlotWriter = (writers or SlotWriters()).new(self.parts, cache_size)
        self._readers: List[Tuple[mx.array, frozenset]] = []  # computations that may still read slots
        self._table: Optional[Tuple[mx.array, np.ndarray]] = None  # device_table(), until a mapping changes
        self.recent_absent = 0.0  # decode steps' routed experts not resident at their sync (average)

    @property
    def fully_resident(self) -> bool:
        """Every expert in slot = expert id: no table, no eviction, no host sync."""
        return self._identity

    def use_table(self) -> None:
        """Run a pool that holds every expert through the slot table, as a partial layer
        (benchmarks: the hit path of a partial layer with every routed expert resident)."""
        if not self._identity:
            return
        self._identity = False
        self._table = None
        for e in range(self.num_experts):
            self.slot_of[e] = self.expert_in[e] = e
            self.policy.insert(e)

    @property
    def expert_nbytes(self) -> int:
        return self._expert_nbytes

    @property
    def nbytes(self) -> int:
        return self.cache_size * self.expert_nbytes

    def resident(self) -> List[int]:
        return [int(e) for e in self.expert_in if e >= 0]

    def is_resident(self, expert: int) -> bool:
        return self.slot_of[expert] >= 0

    def free_slot(self) -> Optional[int]:
        if self._full:
            return None
        free = np.flatnonzero(self.expert_in < 0)
        if not len(free):
            self._full = True  # until a slot is given up (unassign)
            return None
        return int(free[0])

    def claim(self, expert: int, protected: Iterable[int] = ()) -> Tuple[int, int]:
        """Pick the slot ``expert`` will occupy: a free one, else the policy's victim.

        Returns ``(slot, victim)`` (victim -1 when the slot was free). The victim is unmapped
        at once; the caller then installs the bytes. Experts in ``protected`` (those the
        current token uses) are never evicted; LookupError when every slot is protected.
        """
        if self._identity:
            return expert, -1
        slot = self.free_slot()
        if slot is None:  # (a claimed victim's slot is assigned at once by the caller)
            return self._evict(protected if isinstance(protected, (set, frozenset)) else set(protected))
        return slot, -1

    def _evict(self, protected: Container[int]) -> Tuple[int, int]:
        """Unmap the policy's victim (never one of ``protected``); ``(its slot, victim)``."""
        victim = self.policy.victim(protected=protected)
        slot = int(self.slot_of[victim])
        self.policy.evict(victim)
        self._table = None
        self.slot_of[victim] = -1
        self.expert_in[slot] = -1
        self.stats.evictions += 1
        return slot, victim

    def assign(self, expert: int, slot: int, *, cold: bool = False) -> None:
        """Map ``expert`` to ``slot`` (its bytes must be written before the next use).

        ``cold``: nobody has asked for it yet (a prefetch): the policy counts no use.
        """
        if not self._identity:
            self._table = None
            self.slot_of[expert] = slot
            self.expert_in[slot] = expert
            if cold:
                self.policy.insert_cold(expert)
            else:
                self.policy.insert(expert)

    def unassign(self, expert: int) -> None:
        """Undo ``assign`` for an expert whose bytes never arrived."""
        if not self.fully_resident and self.slot_of[expert] >= 0:
            self._table = None
            self.expert_in[self.slot_of[expert]] = -1
            self.slot_of[expert] = -1
            self.policy.evict(expert)
            self._full = False

    def reading(self, out: mx.array, slots: np.ndarray) -> None:
        """``out`` (lazy) reads ``slots``: no write may touch them before it is evaluated."""
        readers = self._readers
        if len(readers) >= MAX_READERS:
            # The older ones belong to earlier decode steps, which a decode loop has
            # evaluated long since (a no-op); the newest may be this step's, still being
            # built: evaluating those would wait for this layer's compute on the host.
            old = readers[:-KEEP_READERS]
            mx.eval([r for r, _ in old])
            del readers[:-KEEP_READERS]
        readers.append((out, frozenset(np.asarray(slots).reshape(-1).tolist())))

    def _before_write(self, slot: int) -> None:
        if not self._readers:
            return
        if self.writer.exclusive:
            pending, self._readers = self._readers, []
        else:
            pending = [r for r in self._readers if slot in r[1]]
            if pending:
                self._readers = [r for r in self._readers if slot not in r[1]]
        if pending:
            mx.eval([out for out, _ in pending])

    def write(self, slot: int, packed: np.ndarray) -> None:
        """Put one expert's packed bytes into ``slot`` (``flush`` before computing on it).

        Waits first for any registered computation that still reads the slot (see the
        class docstring); ``packed`` may be reused once this returns.
        """
        self._before_write(slot)
        self.writer.put(slot, packed)

    def flush(self) -> None:
        """Make the writes so far visible to computations built from now on."""
        self.writer.flush()

    def settle(self) -> None:
        """Evaluate pending slot writes (loading ends with every pool evaluated)."""
        self.writer.settle()

    def device_table(self) -> Tuple[mx.array, np.ndarray]:
        """``(table, snapshot)``: the expert -> slot table on the device, for a computation
        built before the host has read the step's ids, and the host copy it was made from.

        ``table[ids]`` indexes the pool directly. An expert missing from the pool (-1 in
        ``snapshot``) maps to slot 0, a valid slot: whatever is computed for it must be
        discarded, and it may read slot 0 while a write changes it. Made again only after a
        mapping changed (a claim, an assignment), so a step whose experts were all resident
        uploads nothing.
        """
        if self._table is None:
            snapshot = self.slot_of.copy()
            self._table = (mx.array(np.maximum(snapshot, 0)), snapshot)
        return self._table

    def slots(self, experts: np.ndarray) -> np.ndarray:
        """Slot of every expert id in ``experts`` (all must be resident)."""
        return experts if self._identity else self.slot_of[experts]

    def admit(self, needed: Sequence[int]) -> Tuple[List[int], List[Tuple[int, int]], List[int]]:
        """Admit one step's experts into this layer, by the policy's step protocol.

        ``needed``: the step's distinct expert ids (Python ints), ascending. A resident
        expert is a hit, a missing one claims a slot (evicting, never one of ``needed``)
        and is assigned to it at once. Returns ``(hits, [(expert, slot), ...] to read,
        evicted experts)``. When every expert is resident (the common case) this is one
        table lookup and the policy's hits.
        """
        policy = self.policy
        slots = self.slot_of[needed].tolist()
        if min(slots) >= 0:
            policy.hit_all(needed)
            return list(needed), [], []
        if self._identity:  # not run through a table: slot = expert
            return [], [(e, e) for e in needed], []
        # ``claim`` and ``assign`` for each miss, in one pass: the free slots lowest first,
        # then the policy's victims.
        protected = set(needed)
        hits, misses, evicted = [], [], []
        slot_of, expert_in = self.slot_of, self.expert_in
        free = [] if self._full else np.flatnonzero(expert_in < 0).tolist()
        for e, slot in zip(needed, slots):
            if slot >= 0:
                policy.hit(e)
                hits.append(e)
                continue
            if free:
                slot = free.pop(0)
            else:
                slot, victim = self._evict(protected)
                evicted.append(victim)
            slot_of[e] = slot
            expert_in[slot] = e
            policy.insert(e)
            misses.append((e, slot))
        self._full = not free
        self._table = None
        return hits, misses, evicted
