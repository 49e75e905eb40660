"""Eviction policies: which resident expert of one layer gives up its slot.

One small interface shared by the slot pool (live decoding) and the trace simulator, so
that a policy measured on traces is exactly the policy that runs. A policy tracks the
experts resident in one layer; it never sees bytes, slots or files.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Container, Dict, Iterable


class Policy:
    """Base class. Subclasses keep their own order over the resident experts.

    The owner calls ``insert`` when an expert becomes resident, ``hit`` when a resident
    expert is used, ``evict`` when it leaves, ``victim`` to ask which resident expert to
    drop (never one in ``protected``), and ``tick`` once per step (token).
    """

    name = "base"

    def insert(self, expert: int) -> None:
        raise NotImplementedError

    def hit(self, expert: int) -> None:
        raise NotImplementedError

    def evict(self, expert: int) -> None:
        raise NotImplementedError

    def victim(self, protected: Container[int] = ()) -> int:
        raise NotImplementedError

    def tick(self) -> None:
        pass


class LRUPolicy(Policy):
    """Least recently used: evict the expert whose last use is oldest."""

    name = "lru"

    def __init__(self) -> None:
        self._order: "OrderedDict[int, None]" = OrderedDict()

    def insert(self, expert: int) -> None:
        self._order[expert] = None
        self._order.move_to_end(expert)

    def hit(self, expert: int) -> None:
        self._order.move_to_end(expert)

    def evict(self, expert: int) -> None:
        del self._order[expert]

    def victim(self, protected: Container[int] = ()) -> int:
        for e in self._order:
            if e not in protected:
                return e
        raise LookupError("every resident expert is protected")


class LFUPolicy(Policy):
    """Least frequently used; counts survive eviction; ties go to the least recent."""

    name = "lfu"

    def __init__(self) -> None:
        self.counts: Dict[int, float] = {}
        self._recency = LRUPolicy()

    def _bump(self, expert: int) -> None:
        self.counts[expert] = self.counts.get(expert, 0.0) + 1.0

    def insert(self, expert: int) -> None:
        self._bump(expert)
        self._recency.insert(expert)

    def hit(self, expert: int) -> None:
        self._bump(expert)
        self._recency.hit(expert)

    def evict(self, expert: int) -> None:
        self._recency.evict(expert)

    def victim(self, protected: Container[int] = ()) -> int:
        best, best_count = None, None
        for e in self._recency._order:  # oldest first: strict < keeps the oldest on ties
            if e in protected:
                continue
            c = self.counts.get(e, 0.0)
            if best_count is None or c < best_count:
                best, best_count = e, c
        if best is None:
            raise LookupError("every resident expert is protected")
        return best


class LFUDecayPolicy(LFUPolicy):
    """LFU whose counts decay by ``decay`` every step: frequency over a recent window."""

    name = "lfu-decay"

    def __init__(self, decay: float = 0.9) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"lfu-decay: decay must be in (0, 1), got {decay}")
        self.decay = decay
        self._scale = 1.0  # counts are stored divided by the running scale

    def _bump(self, expert: int) -> None:
        self.counts[expert] = self.counts.get(expert, 0.0) + self._scale

    def tick(self) -> None:
        self._scale /= self.decay
        if self._scale > 1e12:  # renormalise before floats lose precision
            self.counts = {e: c / self._scale for e, c in self.counts.items()}
            self._scale = 1.0


POLICIES: Dict[str, Callable[[], Policy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "lfu-decay": LFUDecayPolicy,
}


def policy_names() -> list[str]:
    return list(POLICIES)


def make_policy(name: str) -> Policy:
    """A fresh policy by name; a clear error lists the known names."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}") from None


def warm(policy: Policy, experts: Iterable[int]) -> None:
    """Insert ``experts`` in order (the last one ends most recent)."""
    for e in experts:
        policy.insert(e)
