"""The scheduler's dispatcher: which requests start, when, with which neighbours, and what a
finished read means.

Owns the state behind the scheduler's lock: the request queue (``requests``), the jobs
waiting for a reader (``read_jobs.PieceQueue``), the staging buffers, the statistics, the
pieces of every key (``prepared``), the published prefetches and the speculative bytes in
flight. It decides: a demand starts at once on the next free buffer; a prefetch only when a
reader would otherwise idle, a buffer beyond the reserve is free and the speculative caps
allow; queued neighbours in the file join a read. A request for a new key that nothing
queued outranks starts without entering the queue at all (``fresh``, ``start_fresh``): no
heap, no neighbour maps, for what would leave them at once. Not thread-safe: every method but
``prepare`` is called with the scheduler's lock held. Knows nothing of threads or how bytes
are read.
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from typing import Callable, Deque, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from golem.io.file_handles import ALIGN
from golem.io.ranges import ByteRange
from golem.io.read_jobs import DEMAND_LANES, Batch, PieceQueue, pieces_of_batch, pieces_of_request
from golem.io.requests import DONE, FRESH, PUBLISHED, QUEUED, RUNNING, Request, RequestQueue, describe, file_edges
from golem.io.settings import SchedulerSettings
from golem.io.staging import StagingBuffers
from golem.io.statistics import SchedulerStatistics, StatisticsRecorder


class Dispatcher:
    """Queue, buffers and caps of one scheduler; call with its lock held.

    Args:
        settings: the scheduler's settings.
        locate: ``key -> [ByteRange]``.
        nbytes_of: ``key -> int``, the size of the key's buffer.
        buffers: the staging buffers reads land in.
        clock: ``() -> seconds``.
        whole_batches: a replacement reader reads each batch whole, as one piece.
        on_publish: called (lock held) when prefetches wait to be polled.
    """

    def __init__(self, settings: SchedulerSettings,
                 locate: Callable[[Hashable], Sequence[ByteRange]],
                 nbytes_of: Callable[[Hashable], int], buffers: StagingBuffers,
                 clock: Callable[[], float], *, whole_batches: bool,
                 on_publish: Callable[[], None]):
        self.settings = settings
        self.locate = locate
        self.nbytes_of = nbytes_of
        self.buffers = buffers
        self.clock = clock
        self.whole_batches = whole_batches
        self.on_publish = on_publish
        self.recorder = StatisticsRecorder(clock)
        self.stats = self.recorder.counts
        self.queue = RequestQueue(settings.max_pending, self.stats)
        self.pieces = PieceQueue(clock)
        self.prepared: Dict[Hashable, tuple] = {}  # key -> (ranges, nbytes, pieces, align, edges)
        self.published: Deque[Request] = deque()
        self.spec_in_flight = 0

    # -- requests in ------------------------------------------------------------------------

    def prepare(self, key: Hashable) -> tuple:
        """No lock: ``(ranges, nbytes, pieces, align, edges)`` of a new key, kept; bad ranges
        raise ValueError. ``edges``: where its ranges start and end in the files (the keys
        coalescing looks neighbours up by)."""
        s = self.settings
        ranges = tuple(self.locate(key))
        nbytes = int(self.nbytes_of(key))
        if nbytes > s.buffer_nbytes:
            raise ValueError(f"{describe(key)} needs {nbytes} bytes, more than the "
                             f"{s.buffer_nbytes}-byte staging buffers")
        pieces = pieces_of_request(key, ranges, nbytes, s.piece_nbytes, s.min_job_nbytes,
                                   s.max_gap_nbytes)
        align = None
        if s.direct and ranges:  # the view starts at the file's alignment of the largest range
            big = max(ranges, key=lambda r: r.nbytes)
            align = (big.offset - big.dest) % ALIGN
        prepared = (ranges, nbytes, pieces, align, file_edges(ranges))
        self.prepared[key] = prepared
        return prepared

    def live(self, key: Hashable) -> Optional[Request]:
        """The key's request, unless a cut-short cancelled read makes it unrevivable."""
        req = self.queue.get(key)
        if req is not None and req.cancelled and req.batch is not None and req.batch.skipped:
            return None
        return req

    def submit(self, key: Hashable, depth: int, score: float, prepared: tuple, live: Optional[Request] = None,
               future: bool = True) -> Tuple[Request, List[concurrent.futures.Future]]:
        """Queue a new request, or re-rank the key's live one (``live``, when the caller has
        looked it up already); return it and the futures of the prefetches dropped past
        ``max_pending`` (to cancel outside the lock). The caller counts it (``recorder.submitted``), as
        ``fresh``'s. ``future``: the request has one once this returns (see ``Request``)."""
        req = live or self.live(key)
        if req is not None:
            self._resubmit(req, depth, score, future)
            return req, []
        req = Request(key, depth, score, *prepared, self.clock(), future)
        self.queue.add(req)
        return req, self.queue.trim()

    def fresh(self, key: Hashable, depth: int, score: float, prepared: tuple, future: bool = True
              ) -> Optional[Request]:
        """A request for a key nobody asked for, while nothing queued could outrank it (no
        demand waits for a buffer; for a prefetch, nothing waits at all): live but neither
        queued nor running (``start_fresh`` starts or queues it). None otherwise, or for a
        prefetch when the event loop activates prefetches (``activate_on_loop``): then
        ``submit`` queues it as any request."""
        queue = self.queue
        if (queue.queued if depth else queue.queued > queue.prefetch_queued) \
                or (key in queue.by_key and self.live(key) is not None) or (depth and self.settings.activate_on_loop):
            return None
        req = Request(key, depth, score, *prepared, self.clock(), future)
        req.state = FRESH
        queue.by_key[key] = req
        return req

    def start_fresh(self, fresh: List[Request]) -> List[concurrent.futures.Future]:
        """Start the requests of ``fresh`` that may start now, by priority, under the rules
        of ``activate_ready`` (a demand needs a free buffer; a prefetch, an idle reader, no
        demand under way with ``yield_to_demand``, and ``_can_start``); from the first that
        may not, they are queued. Those started never enter the queue, so nothing looks for
        their neighbours there: the ones adjacent in the file to one another are read
        together here (``coalesce``), as ``_grow`` joins queued ones. Returns the futures
        of prefetches dropped past ``max_pending`` (to cancel outside the lock)."""
        s, pieces = self.settings, self.pieces
        idle = s.parallelism - pieces.running - pieces.waiting
        demands, prefetches, waiting = [], [], []
        ranks = [(r.depth, -r.score) for r in fresh]  # sorted by index: no Python key call per request
        for req in [fresh[i] for i in sorted(range(len(fresh)), key=ranks.__getitem__)]:  # stable among equals
            if not waiting and req.demand and self.buffers.free:
                demands.append(req)
            elif not waiting and not req.demand and idle > 0 and self._can_start(req) \
                    and not (s.yield_to_demand and (demands or pieces.demand_batches)):
                prefetches.append(req)
                idle -= len(req.pieces[1])
            else:
                waiting.append(req)
                req.state = QUEUED
                self.queue.add(req)
                continue
            self._take_buffer(req)
        for started in (demands, prefetches):
            groups = self._adjacent(started) if s.coalesce and len(started) > 1 else [[r] for r in started]
            for batch in groups:
                self._start(batch)
        return self.queue.trim() if waiting else []

    def _adjacent(self, requests: List[Request]) -> List[List[Request]]:
        """``requests`` in groups whose ranges touch in the file (each at most
        ``max_batch_nbytes``), in the order of their first member."""
        owner = {edge: i for i, req in enumerate(requests) for edge in req.edges[0]}
        if owner.keys().isdisjoint(edge for req in requests for edge in req.edges[1]):
            return [[req] for req in requests]  # the common case: nothing touches
        links: Dict[int, List[int]] = {}
        for i, req in enumerate(requests):
            for edge in req.edges[1]:
                j = owner.get(edge)
                if j is not None and j != i:
                    links.setdefault(i, []).append(j)
                    links.setdefault(j, []).append(i)
        limit, taken, groups = self.settings.max_batch_nbytes, set(), []
        for i, req in enumerate(requests):
            if i in taken:
                continue
            taken.add(i)
            group, frontier, total = [req], [i], req.nbytes
            while frontier:
                for j in links.get(frontier.pop(), ()):
                    other = requests[j]
                    if j not in taken and total + other.nbytes <= limit:
                        taken.add(j)
                        group.append(other)
                        frontier.append(j)
                        total += other.nbytes
            groups.append(group)
        return groups

    def _resubmit(self, req: Request, depth: int, score: float, future: bool = True) -> None:
        self.stats.deduped += 1
        if req.state == RUNNING and req.cancelled:  # revive: the bytes are coming anyway
            req.cancelled = False
            req.future = None  # (cancelled: a new one if this submitter wants one)
        if (future or depth == 0) and req.future is None:
            self._give_future(req)
        if depth == 0 and not req.demand:
            self.stats.upgraded += 1
            req.upgraded = True
            if req.state == PUBLISHED:  # hand it over through the future (set at publication, or just now)
                self.published.remove(req)
                req.state = DONE
                self.queue.remove(req)
        if (depth, -score) < (req.depth, -req.score):
            was_demand = req.demand
            req.rank(depth, score)
            if req.state == QUEUED:
                if not was_demand and req.demand:
                    self.queue.prefetch_queued -= 1
                self.queue.push(req)
            elif req.state == RUNNING and req.demand and not was_demand:
                self.spec_in_flight -= req.nbytes
                if req.batch is not None:
                    self.pieces.promote(req.batch)

    def _give_future(self, req: Request) -> None:
        """A future for ``req``, which had none: a published one is resolved at once with its
        buffer, as at publication."""
        req.future = concurrent.futures.Future()
        if req.state == PUBLISHED:
            req.future.set_result(self.view(req))

    def cancel(self, key: Hashable) -> Optional[Request]:
        """Mark ``key``'s queued or running prefetch cancelled; the request, or None."""
        req = self.queue.get(key)
        if req is None or req.demand or req.cancelled or req.state not in (QUEUED, RUNNING):
            return None
        req.cancelled = True
        self.stats.cancelled += 1
        if req.state == QUEUED:
            self.queue.dequeue(req)
            self.queue.remove(req)
        return req

    # -- activation -------------------------------------------------------------------------

    def has_idle_reader(self) -> bool:
        """Could a reader start a queued request now? (Busy readers activate on their own.)
        A demand waiting for a buffer may also use the demand lanes."""
        queue = self.queue
        if not queue.has_queued():
            return False
        lanes = self.settings.parallelism + (DEMAND_LANES if queue.queued > queue.prefetch_queued else 0)
        return self.pieces.running + self.pieces.waiting < lanes

    def activate_ready(self) -> bool:
        """Activate the requests that priorities, buffers and caps allow.

        Demand requests are activated at once. A prefetch is activated only when a reader
        would otherwise be idle (its pieces plus those waiting fit the free readers), so
        few experts are in flight at once, each finishes as early as the device allows,
        and a request submitted later with a higher priority still goes first.
        """
        activated = False
        pieces, s = self.pieces, self.settings
        while True:
            top = self.queue.top()
            if top is None or not self.buffers.free:
                break
            if not top.demand:
                idle = s.parallelism - pieces.running - pieces.waiting
                if idle <= 0 or (s.yield_to_demand and pieces.demand_batches) \
                        or not self._can_start(top):
                    break
            self._activate(top)
            activated = True
        return activated

    def _can_start(self, req: Request) -> bool:
        free = len(self.buffers.free)
        if req.demand:
            return free > 0
        if free <= self.settings.reserved_for_demand:
            return False
        if self.spec_in_flight == 0:
            return True
        cap = self.speculative_cap()
        return cap is None or self.spec_in_flight + req.nbytes <= cap

    def speculative_cap(self) -> Optional[int]:
        """Prefetch bytes allowed in flight now: the tighter of the two caps."""
        cap = self.settings.speculative_nbytes
        rate = self.recorder.throughput_bytes_per_s()
        if self.settings.speculative_s is not None and rate is not None:
            timed = int(rate * self.settings.speculative_s)
            cap = timed if cap is None else min(cap, timed)
        return cap

    def _activate(self, req: Request) -> Batch:
        requests = [req]
        self._take(req)
        if self.settings.coalesce:
            self._grow(requests)
        return self._start(requests)

    def _start(self, requests: List[Request]) -> Batch:
        """Requests holding their buffers become one batch, its jobs waiting for readers."""
        batch = Batch(requests, requests[0].demand)
        if self.whole_batches:
            batch.runs, batch.jobs, batch.remaining = [None], [1], 1  # it reads the whole batch
        else:
            s = self.settings
            pieces_of_batch(batch, [memoryview(self.view(r)) for r in requests], s.piece_nbytes,
                            s.min_job_nbytes, s.max_gap_nbytes)
        self.pieces.add(batch)
        return batch

    def _take(self, req: Request) -> None:
        """A queued request starts: it leaves the queue and takes a buffer."""
        self.queue.dequeue(req)
        self._take_buffer(req)

    def _take_buffer(self, req: Request) -> None:
        req.state = RUNNING
        req.buffer = self.buffers.take()
        if req.align is not None:
            req.shift = self.buffers.shift_for(req.buffer, req.align)
        wait = self.clock() - req.queued_at
        if req.demand:
            self.recorder.queue_waits["demand"].append(wait)
        else:
            self.spec_in_flight += req.nbytes
            self.recorder.queue_waits["prefetch"].append(wait)

    def _grow(self, batch: List[Request]) -> None:
        """Add queued requests of the same class whose ranges touch the batch's in the file."""
        demand = batch[0].demand
        total = sum(r.nbytes for r in batch)
        frontier = list(batch)
        while frontier:
            for other in list(self.queue.neighbours(frontier.pop())):
                if other.state != QUEUED or other.demand != demand \
                        or total + other.nbytes > self.settings.max_batch_nbytes \
                        or other.gone() or not self._can_start(other):
                    continue
                self._take(other)
                batch.append(other)
                frontier.append(other)
                total += other.nbytes

    def view(self, req: Request) -> np.ndarray:
        return self.buffers.view(req.buffer, req.shift, req.nbytes)

    # -- jobs for readers, and their return -------------------------------------------------

    @property
    def jobs_waiting(self) -> int:
        return self.pieces.waiting

    def next_job(self) -> Tuple[Optional[Tuple[Batch, list]], bool]:
        """A job for a reader (demand first), activating requests if none waits (no hop to
        the loop), and whether it activated any; the reader counts as running the job."""
        job = self._next_job()
        activated = False
        if job is None and self.activate_ready():
            activated = True
            job = self._next_job()
        if job is not None:
            self.pieces.running += 1
            self.recorder.piece_started()
        return job, activated

    def _next_job(self):
        s = self.settings
        return self.pieces.next_job(s.parallelism, DEMAND_LANES, s.yield_to_demand, self.finish)

    def returned(self, batch: Batch, runs: list, nbytes: int,
                 error: Optional[BaseException]) -> list:
        """A reader is done with a job; the batch's last job publishes it. Returns the
        ``(future, buffer or error)`` pairs to resolve outside the lock."""
        pieces = self.pieces
        pieces.running -= 1
        self.recorder.pieces_returned(len(runs), nbytes, pieces.running)
        batch.remaining -= len(runs)
        if error is not None and batch.error is None:
            batch.error = error
            pieces.skip_rest(batch)
        return self.finish(batch) if batch.remaining == 0 else []

    def finish(self, batch: Batch) -> list:
        """Publish a batch whose pieces have all returned; return the futures to set."""
        finished = self.clock()
        self.pieces.finished(batch)
        self.recorder.read_latencies.append(finished - (batch.started or finished))
        self.stats.reads += 1
        self.stats.coalesced_reads += len(batch.requests) > 1
        resolve = []
        for req in batch.requests:
            if not req.demand:
                self.spec_in_flight -= req.nbytes
            self.queue.remove(req)
            outcome = self._outcome(req, batch, finished)
            if outcome is not None and req.future is not None:  # (none: taken from ``published``)
                resolve.append((req.future, outcome))
            req.batch = None  # the batch and its requests point at each other: freed now, not by the cyclic GC
        if self.published:
            self.on_publish()
        return resolve

    def _outcome(self, req: Request, batch: Batch, finished: float):
        """What ``req``'s future gets once its batch is read: its buffer, the batch's error,
        or nothing (cancelled: the buffer goes back)."""
        if batch.error is not None:
            self.stats.failed += 1
            self._free_buffer(req)
            req.state = DONE
            return None if req.cancelled else batch.error
        if req.cancelled or req.gone() or batch.skipped:
            self.stats.cancelled_nbytes += req.nbytes
            self._free_buffer(req)
            req.state = DONE
            return None
        self.stats.useful_nbytes += req.nbytes
        view = self.view(req)
        self.buffers.hand_out(req.buffer, req.shift)
        if req.demand:
            req.state = DONE
            self.recorder.demand_latencies.append(finished - req.submitted_at)
            started = finished if batch.started is None else batch.started
            self.recorder.demand_starts.append(max(0.0, started - req.submitted_at))
        else:
            req.state = PUBLISHED
            self.published.append(req)
            self.queue.by_key[req.key] = req
        return view

    def _free_buffer(self, req: Request) -> None:
        if req.buffer is not None:
            self.buffers.give_back(req.buffer)
            req.buffer = None

    # -- the caller's side ------------------------------------------------------------------

    def take_published(self) -> List[Tuple[Hashable, np.ndarray]]:
        """Every published prefetch as ``(key, buffer)``, now the caller's."""
        out = []
        while self.published:
            req = self.published.popleft()
            req.state = DONE
            self.queue.remove(req)
            out.append((req.key, self.view(req)))
        return out

    def release_all(self, buffers) -> None:
        """Each of ``buffers`` (handed out) back to the free pool."""
        buffers_, free = self.buffers, self.buffers.free
        for buffer in buffers:
            free.append(buffers_.take_back(buffer))

    def statistics(self) -> tuple:
        """A snapshot for ``StatisticsRecorder.finish`` (no lock needed there)."""
        snapshot = self.recorder.snapshot()
        s: SchedulerStatistics = snapshot[0]
        s.queued = self.queue.count(QUEUED)
        s.running = self.queue.count(RUNNING)
        s.published = len(self.published)
        s.free_buffers = len(self.buffers.free)
        s.speculative_nbytes_in_flight = self.spec_in_flight
        return snapshot
