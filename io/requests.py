"""The scheduler's requests: one per key (dedupe), queued by priority, found by file neighbour.

Owns ``Request`` (a key's ranges, priority, state and future), the priority heap of queued
requests, the bound on waiting prefetches, and the maps from file offsets to queued
requests that coalescing asks for neighbours. Not thread-safe: the scheduler calls it with
its lock held. Knows nothing of buffers, threads or how bytes are read.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
from typing import Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

from golem.io.ranges import ByteRange
from golem.io.statistics import SchedulerStatistics

QUEUED, RUNNING, PUBLISHED, DONE = "queued", "running", "published", "done"
FRESH = "fresh"  # just submitted, in no queue yet: started or queued before the lock is let go


def describe(key: Hashable) -> str:
    """``(3, 17)`` -> ``"expert (3, 17)"``: how errors name a request."""
    if isinstance(key, tuple) and len(key) == 2:
        return f"expert ({key[0]}, {key[1]})"
    return f"expert {key!r}"


def file_edges(ranges: Sequence[ByteRange]) -> Tuple[tuple, tuple]:
    """``(starts, ends)``: ``(path, offset)`` where a request can meet a neighbour in the
    file: in each file, where its first and its last range (in file order) start and end.

    Enough for the layouts experts come in, at two entries per file where every range would
    cost one: in stacked tensors each expert's ranges follow the tensors' order, so experts
    adjacent in one tensor are adjacent in the first (and the last); an expert stored whole
    ends where the next one's first range starts. Requests found adjacent are read together
    with all their ranges planned at once (``read_jobs.pieces_of_batch``), so a pair met
    only in a middle range is read apart: two reads, never a wrong one.
    """
    first, last = {}, {}
    for r in ranges:
        if r.nbytes:
            if r.path not in first or r.offset < first[r.path].offset:
                first[r.path] = r
            if r.path not in last or r.offset > last[r.path].offset:
                last[r.path] = r
    chosen = list(dict.fromkeys([*first.values(), *last.values()]))
    return tuple((r.path, r.offset) for r in chosen), tuple((r.path, r.offset + r.nbytes) for r in chosen)


class Request:
    """One key's read: ``depth`` 0 is a demand, >= 1 a prefetch (lower ``(depth, -score)``
    goes first). ``pieces`` holds its pieces and jobs (cut once per key), ``align`` the file
    alignment its view should have in a staging buffer, ``edges`` where its ranges start and
    end in the files (``file_edges``), ``buffer``/``shift`` where it lands. ``future`` is None
    while nobody waits on it: a prefetch that its submitter takes from ``poll`` needs none
    (a ``Future`` costs a condition and a lock to make, set and cancel); a later submit that
    wants one makes it (``Dispatcher._give_future``)."""

    __slots__ = ("key", "depth", "demand", "score", "ranges", "nbytes", "future", "state", "cancelled",
                 "buffer", "token", "submitted_at", "queued_at", "upgraded", "batch", "pieces",
                 "align", "shift", "edges")

    def __init__(self, key, depth, score, ranges, nbytes, pieces, align, edges, now, future: bool = True):
        self.key = key
        self.depth = depth
        self.demand = depth == 0  # kept with ``depth`` (``rank``): read on every hot path
        self.score = score
        self.ranges: Sequence[ByteRange] = ranges
        self.nbytes = nbytes
        self.pieces = pieces
        self.align = align
        self.edges = edges
        self.shift = 0
        self.future: Optional[concurrent.futures.Future] = concurrent.futures.Future() if future else None
        self.state = QUEUED
        self.cancelled = False
        self.buffer: Optional[int] = None
        self.token = 0
        self.submitted_at = now
        self.queued_at = now
        self.upgraded = False
        self.batch = None  # the readers.Batch reading it, once running

    def gone(self) -> bool:
        """Whether its submitter cancelled its future (a request without one: never)."""
        return self.future is not None and self.future.cancelled()

    def rank(self, depth: int, score: float) -> None:
        """A new priority (a demand upgrades a prefetch)."""
        self.depth, self.score, self.demand = depth, score, depth == 0


class RequestQueue:
    """Live requests by key, and the queued ones by priority and by file position.

    Args:
        max_pending: most prefetches waiting; past that ``trim`` drops the lowest.
        counts: the statistics counters (``cancelled``, ``dropped``) it updates.
    """

    def __init__(self, max_pending: int, counts: SchedulerStatistics):
        self.max_pending = max_pending
        self.counts = counts
        self.by_key: Dict[Hashable, Request] = {}
        self.prefetch_queued = 0
        self.queued = 0  # requests in the queue (the heap also holds dead entries)
        self._heap: List[tuple] = []
        self._seq = itertools.count()
        self._starts: Dict[Tuple[str, int], Request] = {}
        self._ends: Dict[Tuple[str, int], Request] = {}

    def get(self, key: Hashable) -> Optional[Request]:
        return self.by_key.get(key)

    def add(self, req: Request) -> None:
        """A new request: live, queued, and findable by its file neighbours."""
        self.by_key[req.key] = req
        self.queued += 1
        if not req.demand:
            self.prefetch_queued += 1
        self.push(req)
        starts, ends, at_start, at_end = *req.edges, self._starts, self._ends
        for edge in starts:  # an expert has one range or a few: item assignment, no calls
            at_start[edge] = req
        for edge in ends:
            at_end[edge] = req

    def push(self, req: Request) -> None:
        """(Re)queue at its current priority; older heap entries die lazily."""
        req.token = next(self._seq)
        heapq.heappush(self._heap, (req.depth, -req.score, req.token, req))

    def dequeue(self, req: Request) -> None:
        """A queued request leaves the queue (to be read, or dropped); it stays live."""
        self.forget(req)
        self.queued -= 1
        if not req.demand:
            self.prefetch_queued -= 1

    def forget(self, req: Request) -> None:
        """Remove a queued request from the adjacency maps (heap entries die lazily)."""
        req.token = -1
        for edges, at in zip(req.edges, (self._starts, self._ends)):
            for edge in edges:
                if at.get(edge) is req:
                    del at[edge]

    def remove(self, req: Request) -> None:
        """No longer live (if it is still the key's request: a stale one may be replaced)."""
        if self.by_key.get(req.key) is req:
            del self.by_key[req.key]

    def has_queued(self) -> bool:
        return self.queued > 0

    def top(self) -> Optional[Request]:
        """The queued request to read next; drops those whose caller cancelled the future."""
        heap = self._heap
        while heap:
            req = heap[0][3]
            if heap[0][2] == req.token and req.state == QUEUED:
                if not req.gone():
                    return req
                self.dequeue(req)  # the caller cancelled the future itself
                req.state = DONE
                self.by_key.pop(req.key, None)
                self.counts.cancelled += 1
            heapq.heappop(heap)
        return None

    def neighbours(self, req: Request) -> Iterator[Request]:
        """Queued requests whose ranges end where one of ``req``'s starts, or start where
        one ends (candidates to read in the same ``preadv``)."""
        starts, ends = req.edges
        for other in [*map(self._ends.get, starts), *map(self._starts.get, ends)]:
            if other is not None and other.state == QUEUED:
                yield other

    def trim(self) -> List[concurrent.futures.Future]:
        """Drop the lowest-priority prefetches past ``max_pending``; return their futures
        (the caller cancels them outside its lock: callbacks may call back in)."""
        if self.prefetch_queued <= self.max_pending:
            return []
        live = [e for e in self._heap if e[2] == e[3].token and e[3].state == QUEUED
                and not e[3].demand]
        live.sort()
        futures = []
        for entry in live[self.max_pending:]:
            req = entry[3]
            req.cancelled = True
            self.dequeue(req)
            del self.by_key[req.key]
            self.counts.dropped += 1
            if req.future is not None:
                futures.append(req.future)
        return futures

    def clear(self) -> List[Request]:
        """Close: every live request still queued or running, the queue emptied."""
        live = []
        for req in list(self.by_key.values()):
            if req.state in (QUEUED, RUNNING):
                req.cancelled = True
                live.append(req)
                if req.state == QUEUED:
                    self.forget(req)
        self._heap.clear()
        self.prefetch_queued = self.queued = 0
        return live

    def count(self, state: str) -> int:
        return sum(1 for r in self.by_key.values() if r.state == state)
