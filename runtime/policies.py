"""Eviction policies: which resident expert of one layer gives up its slot.

One small interface shared by the slot pool (live decoding) and the trace simulator
(``golem.runtime.analysis.simulate``), so that a policy measured on traces is exactly the policy that
runs. A policy tracks the experts resident in one layer; it never sees bytes, slots or files.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Callable, Container, Dict, Iterable, List, Tuple

# Measured by benchmarks/bench_policies.py on the OLMoE traces (decay tuned on one trace,
# reported on the other): lfu-decay had the lowest miss ratio at 16, 32 and 48 of 64 slots.
DEFAULT_POLICY = "lfu-decay"

# Resident experts up to which LFU finds its victim by a scan; past this, through a heap
# (benchmarks/bench_policy_host.py: the scan is cheaper at 16 and 32 slots, the heap from 48).
SCAN_UP_TO = 40


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

    def hit_all(self, experts: Iterable[int]) -> None:
        """``hit`` each of ``experts``, in order (a step that found all of them resident)."""
        for e in experts:
            self.hit(e)

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

    def hit_all(self, experts: Iterable[int]) -> None:
        move = self._order.move_to_end
        for e in experts:
            move(e)

    def evict(self, expert: int) -> None:
        del self._order[expert]

    def victim(self, protected: Container[int] = ()) -> int:
        for e in self._order:
            if e not in protected:
                return e
        raise LookupError("every resident expert is protected")


class LFUPolicy(Policy):
    """Least frequently used; counts survive eviction; ties go to the least recent.

    The victim is the resident expert with the lowest ``(count, recency)``. Up to
    ``SCAN_UP_TO`` resident experts it is found by a scan; past that, in a heap where each
    resident expert is filed once, under the key it had when filed. A use only raises the
    expert's key, so a filed key is a lower bound of the current one: the victim search
    refiles an expert found at the top under an outdated key and takes the first one found
    current. A hit touches no heap; a miss costs a few heap operations instead of a scan of
    every resident expert (``benchmarks/bench_policy_host.py``).
    """

    name = "lfu"

    def __init__(self) -> None:
        self.counts: Dict[int, float] = {}
        self._recency: Dict[int, int] = {}  # resident expert -> when last used (cold inserts: below all)
        self._clock = 0  # the last use's recency
        self._cold = 0  # the last cold insert's recency: each one goes before every other expert
        self._heap: List[Tuple[float, int, int]] = []  # (count, recency, expert) as filed
        self._filed: Dict[int, Tuple[float, int]] = {}  # resident expert -> the key its live entry holds
        self._scale = 1.0  # what a use adds to a count (LFU-decay raises it every step)

    def _file(self, expert: int) -> None:
        if len(self._recency) <= SCAN_UP_TO:  # victims by a scan: no heap
            if self._filed:
                self._heap, self._filed = [], {}
            return
        if len(self._filed) < len(self._recency) - 1:  # grown past the scan's size: file everyone
            self._rebuild()
            return
        key = self._filed[expert] = (self.counts[expert], self._recency[expert])
        heapq.heappush(self._heap, (*key, expert))
        if len(self._heap) > 2 * len(self._filed) + 64:  # entries of evicted experts pile up
            self._rebuild()

    def _rebuild(self) -> None:
        """Every resident expert filed anew under its current key (counts rescaled, or too
        many dead entries)."""
        counts = self.counts
        self._filed = {e: (counts[e], r) for e, r in self._recency.items()}
        self._heap = [(*key, e) for e, key in self._filed.items()]
        heapq.heapify(self._heap)

    def insert(self, expert: int) -> None:
        counts = self.counts
        counts[expert] = counts.get(expert, 0.0) + self._scale
        self._clock += 1
        self._recency[expert] = self._clock
        self._file(expert)

    def insert_cold(self, expert: int) -> None:
        self.counts.setdefault(expert, 0.0)  # a returning expert keeps its record
        self._cold -= 1
        self._recency[expert] = self._cold  # next in line among its count
        self._file(expert)

    def hit(self, expert: int) -> None:
        self.hit_all((expert,))

    def hit_all(self, experts: Iterable[int]) -> None:
        recency, counts, scale, clock = self._recency, self.counts, self._scale, self._clock
        try:
            for e in experts:
                if e not in recency:
                    raise KeyError(e)
                counts[e] = counts[e] + scale
                clock += 1
                recency[e] = clock
        finally:
            self._clock = clock

    def evict(self, expert: int) -> None:
        del self._recency[expert]
        self._filed.pop(expert, None)

    def victim(self, protected: Container[int] = ()) -> int:
        heap, counts, recency, filed = self._heap, self.counts, self._recency, self._filed
        if len(recency) <= SCAN_UP_TO or len(filed) < len(recency):
            return self._scan(protected)
        aside = []  # protected experts' entries, filed again once the victim is found
        try:
            while heap:
                count, when, e = heap[0]
                if e not in filed or filed[e] != (count, when):  # (no dict.get: a call per entry)
                    heapq.heappop(heap)  # dead: evicted, or filed again since
                    continue
                key = (counts[e], recency[e])
                if key != (count, when):  # used since it was filed: file it under its key now
                    filed[e] = key
                    heapq.heapreplace(heap, (*key, e))
                elif e in protected:
                    aside.append(heapq.heappop(heap))
                else:
                    return e
        finally:
            for entry in aside:
                heapq.heappush(heap, entry)
        raise LookupError("every resident expert is protected")

    def _scan(self, protected: Container[int]) -> int:
        best, best_count, best_when = None, None, None
        counts = self.counts
        for e, when in self._recency.items():
            if e in protected:
                continue
            c = counts[e]
            if best is None or c < best_count or (c == best_count and when < best_when):
                best, best_count, best_when = e, c, when
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
        self.decay = decay  # counts are stored divided by the running scale (``_scale``)

    def tick(self) -> None:
        self._scale /= self.decay
        if self._scale > 1e12:  # renormalise before floats lose precision
            self.counts = {e: c / self._scale for e, c in self.counts.items()}
            self._scale = 1.0
            if self._filed:  # victims from the heap: file everyone under the rescaled counts
                self._rebuild()


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
