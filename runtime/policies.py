"""Eviction policies: which resident expert of one layer gives up its slot.

One small interface shared by the slot pool (live decoding) and the trace simulator
(``golem.runtime.analysis.simulate``), so that a policy measured on traces is exactly the policy that
runs. A policy tracks the experts resident in one layer; it never sees bytes, slots or files.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Container, Dict, Iterable, Tuple

# Measured by benchmarks/bench_policies.py on the OLMoE traces (decay tuned on one trace,
# reported on the other): lfu-decay had the lowest miss ratio at 16, 32 and 48 of 64 slots.
DEFAULT_POLICY = "lfu-decay"


class Policy:
    """Base class. Subclasses keep their own order over the resident experts.

    The owner calls ``insert`` when an expert becomes resident, ``hit`` when a resident
    expert is used, ``evict`` when it leaves, ``victim`` to ask which resident expert to
    drop (never one in ``protected``; ``LookupError`` when all are), and ``tick`` once per
    step (token).

    The step protocol (the slot pool and the simulator follow it alike, so that both see
    the same evictions): at the start of every step call ``tick()`` once; then, for each
    MoE layer, walk the step's distinct experts in ascending id order: a resident one gets
    ``hit(e)``; a missing one, when the layer is full, first ``v = victim(protected)`` and
    ``evict(v)`` with ``protected`` = all of the step's experts in that layer, then
    ``insert(e)``.

    ``insert_cold`` is ``insert`` for an expert nobody has used yet (a prefetch that has
    landed): it counts as no use, so a guess that turns out wrong is the first to go and
    never pushes out an expert the layer really uses. Its first ``hit`` is its first use.
    """

    name = "base"

    def insert(self, expert: int) -> None:
        raise NotImplementedError

    def insert_cold(self, expert: int) -> None:
        self.insert(expert)

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

    def insert_cold(self, expert: int) -> None:
        self._order[expert] = None
        self._order.move_to_end(expert, last=False)  # next in line

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

    def insert_cold(self, expert: int) -> None:
        self.counts.setdefault(expert, 0.0)  # a returning expert keeps its record
        self._recency.insert_cold(expert)

    def hit(self, expert: int) -> None:
        self._bump(expert)
        self._recency.hit(expert)

    def evict(self, expert: int) -> None:
        self._recency.evict(expert)

    def victim(self, protected: Container[int] = ()) -> int:
        best, best_count = None, None
        counts = self.counts
        for e in self._recency._order:  # oldest first: strict < keeps the oldest on ties
            if e in protected:
                continue
            c = counts[e]
            if best_count is None or c < best_count:
                best, best_count = e, c
        if best is None:
            raise LookupError("every resident expert is protected")
        return best


class LFUDecayPolicy(LFUPolicy):
    """LFU whose counts decay by ``decay`` every step: frequency over a recent window.

    A frequency-recency blend (LRFU): a use ``s`` steps ago weighs ``decay ** s``. Near 0
    it orders like LRU; near 1 like LFU. The window is about ``1 / (1 - decay)`` steps.

    Args:
        decay: factor applied to every count at each ``tick``, in (0, 1).
    """

    name = "lfu-decay"

    def __init__(self, decay: float = 0.95) -> None:
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


class LRUKPolicy(Policy):
    """LRU-K: evict the expert whose K-th most recent use is oldest.

    Experts with fewer than K uses go first (their K-th use is "infinitely" old), oldest
    last use first among them; ties on the K-th use go to the older last use. Use history
    survives eviction (a layer has few experts), so a returning expert keeps its record.

    Args:
        k: how many past uses count, >= 1 (k = 1 is plain LRU).
    """

    name = "lru-k"

    def __init__(self, k: int = 2) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"lru-k: k must be an integer >= 1, got {k}")
        self.k = int(k)
        self._clock = 0
        self._history: Dict[int, Tuple[int, ...]] = {}  # last k use times, oldest first
        self._resident: Dict[int, None] = {}

    def _use(self, expert: int) -> None:
        self._clock += 1
        h = self._history.get(expert, ()) + (self._clock,)
        self._history[expert] = h[-self.k:]

    def insert(self, expert: int) -> None:
        self._resident[expert] = None
        self._use(expert)

    def insert_cold(self, expert: int) -> None:
        self._resident[expert] = None
        self._history.setdefault(expert, ())

    def hit(self, expert: int) -> None:
        self._use(expert)

    def evict(self, expert: int) -> None:
        del self._resident[expert]

    def victim(self, protected: Container[int] = ()) -> int:
        best, best_key = None, None
        k, history = self.k, self._history
        for e in self._resident:
            if e in protected:
                continue
            h = history[e]
            key = (h[0] if len(h) == k else 0, h[-1] if h else 0)
            if best_key is None or key < best_key:
                best, best_key = e, key
        if best is None:
            raise LookupError("every resident expert is protected")
        return best


POLICIES: Dict[str, Callable[..., Policy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "lfu-decay": LFUDecayPolicy,
    "lru-k": LRUKPolicy,
}


def policy_names() -> list[str]:
    return list(POLICIES)


def parse_policy_spec(spec: str) -> Tuple[str, Dict[str, float]]:
    """Split ``"name"`` or ``"name:key=value,key=value"`` into the name and its parameters.

    Values are numbers (``"lfu-decay:decay=0.9"``, ``"lru-k:k=3"``).
    """
    name, _, rest = spec.strip().partition(":")
    params: Dict[str, float] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"policy {spec!r}: parameters are key=value, got {item!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"policy {spec!r}: parameter {key.strip()!r} needs a number, got {value!r}") from None
        params[key.strip()] = int(number) if number.is_integer() and "." not in value else number
    return name.strip(), params


def make_policy(spec: str, **params) -> Policy:
    """A fresh policy from a name or spec (``"lfu-decay:decay=0.9"``); clear errors.

    Keyword ``params`` override those in the spec.
    """
    name, parsed = parse_policy_spec(spec)
    parsed.update(params)
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}") from None
    try:
        return factory(**parsed)
    except TypeError:
        raise ValueError(f"policy {name!r} does not take parameters {sorted(parsed)}") from None


def warm(policy: Policy, experts: Iterable[int]) -> None:
    """Insert ``experts`` in order (the last one ends most recent)."""
    for e in experts:
        policy.insert(e)
