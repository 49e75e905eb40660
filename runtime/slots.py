"""Slot pools: the resident experts of one MoE layer.

A pool owns, for one layer, the arrays shaped like the stacked expert tensors with the
first axis = slots, the expert -> slot table, the eviction policy and the layer's counters.
It never reads files: bytes arrive as packed expert buffers (see ``golem.io.index``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from golem.io.index import StackedTensor

from golem.runtime.policies import DEFAULT_POLICY, Policy, make_policy


@dataclass
class LayerStats:
    """Counters of one layer's pool (decode and prefill together unless split by the caller)."""

    capacity: int = 0
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


class SlotPool:
    """The slots of one MoE layer.

    Args:
        layer: MoE layer index (the decoder layer number).
        num_experts: experts in the layer.
        capacity: slots; ``capacity == num_experts`` makes the layer fully resident
            (slot i holds expert i, no table, no eviction).
        parts: the layer's stacked tensors and the module attributes holding their pools.
        policy: eviction policy name.
    """

    def __init__(self, layer: int, num_experts: int, capacity: int, parts: Sequence[PoolPart], policy: str = DEFAULT_POLICY):
        if capacity < 1 or capacity > num_experts:
            raise ValueError(f"layer {layer}: capacity {capacity} outside [1, {num_experts}]")
        self.layer = layer
        self.num_experts = num_experts
        self.capacity = capacity
        self.parts = list(parts)
        self.policy: Policy = make_policy(policy)
        self.slot_of = np.full(num_experts, -1, dtype=np.int32)  # expert -> slot
        self.expert_in = np.full(capacity, -1, dtype=np.int32)  # slot -> expert
        self.stats = LayerStats(capacity=capacity)
        for p in self.parts:
            dtype = getattr(p.owner, p.attr).dtype
            setattr(p.owner, p.attr, mx.zeros((capacity, *p.spec.expert_shape), dtype=dtype))
        pools = [getattr(p.owner, p.attr) for p in self.parts]
        mx.eval(pools)
        views = [host_view(a) for a in pools]
        # Where the backend lets the host write an array's own memory (CPU, unified memory),
        # slots are filled with one memcpy at a safe point; elsewhere by MLX slice updates.
        self._views = [v.reshape(capacity, -1) for v in views] if all(v is not None for v in views) else None

    @property
    def fully_resident(self) -> bool:
        return self.capacity == self.num_experts

    @property
    def expert_nbytes(self) -> int:
        return sum(p.spec.expert_nbytes for p in self.parts)

    @property
    def nbytes(self) -> int:
        return self.capacity * self.expert_nbytes

    def resident(self) -> List[int]:
        return [int(e) for e in self.expert_in if e >= 0]

    def is_resident(self, expert: int) -> bool:
        return self.slot_of[expert] >= 0

    def free_slot(self) -> Optional[int]:
        free = np.flatnonzero(self.expert_in < 0)
        return int(free[0]) if len(free) else None

    def claim(self, expert: int, protected: Iterable[int] = ()) -> Tuple[int, int]:
        """Pick the slot ``expert`` will occupy: a free one, else the policy's victim.

        Returns ``(slot, victim)`` (victim -1 when the slot was free). The victim is unmapped
        at once; the caller then installs the bytes. Experts in ``protected`` (those the
        current token uses) are never evicted; LookupError when every slot is protected.
        """
        if self.fully_resident:
            return expert, -1
        slot = self.free_slot()
        victim = -1
        if slot is None:
            victim = self.policy.victim(protected=set(protected))
            slot = int(self.slot_of[victim])
            self.policy.evict(victim)
            self.slot_of[victim] = -1
            self.expert_in[slot] = -1
            self.stats.evictions += 1
        return slot, victim

    def assign(self, expert: int, slot: int, *, cold: bool = False) -> None:
        """Map ``expert`` to ``slot`` (its bytes must be written before the next use).

        ``cold``: nobody has asked for it yet (a prefetch): the policy counts no use.
        """
        if not self.fully_resident:
            self.slot_of[expert] = slot
            self.expert_in[slot] = expert
            if cold:
                self.policy.insert_cold(expert)
            else:
                self.policy.insert(expert)

    def unassign(self, expert: int) -> None:
        """Undo ``assign`` for an expert whose bytes never arrived."""
        if not self.fully_resident and self.slot_of[expert] >= 0:
            self.expert_in[self.slot_of[expert]] = -1
            self.slot_of[expert] = -1
            self.policy.evict(expert)

    def write(self, slot: int, packed: np.ndarray) -> None:
        """Copy one expert's packed bytes into ``slot``.

        Only call at a safe point: no graph that can still read this layer's pool may be
        in flight or pending (the engine writes right after a layer's host sync, when
        everything built before has been evaluated).
        """
        if self._views is not None:
            for p, view in zip(self.parts, self._views):
                s = p.spec
                view[slot] = packed[s.dest : s.dest + s.expert_nbytes]
            return
        raw = mx.array(packed)
        for p in self.parts:
            pool = getattr(p.owner, p.attr)
            s = p.spec
            pool[slot] = raw[s.dest : s.dest + s.expert_nbytes].view(pool.dtype).reshape(s.expert_shape)

    def install(self, expert: int, slot: int, packed: np.ndarray, *, cold: bool = False) -> None:
        self.write(slot, packed)
        self.assign(expert, slot, cold=cold)

    def settle(self) -> None:
        """Evaluate pending slot writes (so the next writes stay in place)."""
        mx.eval([getattr(p.owner, p.attr) for p in self.parts])

    def slots(self, experts: np.ndarray) -> np.ndarray:
        """Slot of every expert id in ``experts`` (all must be resident)."""
        if self.fully_resident:
            return experts
        return self.slot_of[experts]

    def touch(self, experts: Iterable[int]) -> None:
        for e in experts:
            self.policy.hit(int(e))

    def plan(self, needed: Sequence[int]) -> Tuple[List[int], List[Tuple[int, int]], List[int]]:
        """One step's use of this layer, by the policy's step protocol.

        Walks ``needed`` in ascending id order: a resident expert is a hit, a missing one
        claims a slot (evicting, never one of ``needed``) and is assigned to it at once.
        Returns ``(hits, [(expert, slot), ...] to read, evicted experts)``.
        """
        protected = set(int(e) for e in needed)
        hits, misses, evicted = [], [], []
        for e in sorted(protected):
            if self.is_resident(e):
                self.policy.hit(e)
                hits.append(e)
            else:
                slot, victim = self.claim(e, protected)
                self.assign(e, slot)
                misses.append((e, slot))
                if victim >= 0:
                    evicted.append(victim)
        return hits, misses, evicted
