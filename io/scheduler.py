"""The asyncio I/O scheduler: prioritised expert reads into a pool of staging buffers.

Owns an event loop on its own thread (uvloop when installed) that turns the engine's
submits, cancels and releases into started reads; a fixed pool of reader threads (the
bounded executor) that pull ``preadv`` pieces, demand first; the staging buffers; dedupe,
cancellation, caps and statistics. It knows nothing of models: keys are located by a
``locate(key) -> [ByteRange]`` callable; where the bytes go next is the engine's business.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from golem.io.ranges import ByteRange
from golem.io.reads import ALIGN, FileHandles, aligned_empty, plan_reads, read_into, read_run
from golem.io.storage import Throttle

# The hot path is os.preadv on reader threads of our own, not aiofiles. aiofiles has no
# positioned read: each range costs a seek and a read, two executor round trips, on a file
# object per task, and it cannot take O_DIRECT (unaligned seeks) nor scatter one read into
# several buffers. benchmarks/bench_io.py (2-core VM, virtio disk, page cache evicted,
# 4.2 MiB experts of 9 ranges, same keys): aiofiles 0.95 GB/s and 0.61 CPU s/GB against
# 1.10 GB/s and 0.55 CPU s/GB for these readers, buffered; with O_DIRECT they reach
# 1.46 GB/s, 0.91 of dd on the same file.
#
# Default parallelism (preadv calls in flight, the device's queue depth): bench_io's sweep
# on 1 MiB experts, O_DIRECT, five runs of the benchmark: 2 -> 0.87-1.06 GB/s, 4 -> 1.10-1.42,
# 8 -> 1.35-1.65, 16 -> 1.35-1.64, against dd at 1.50-1.68. 8 and 16 are within the
# noise here; 16 leaves room for the deeper queues of NVMe drives, and an idle reader
# costs only a thread.
DEFAULT_PARALLELISM = 16
DEFAULT_PIECE_NBYTES = 2 << 20
MIN_JOB_NBYTES = 256 << 10  # a reader takes small neighbouring pieces together
DEMAND_LANES = 1  # readers only demand reads may use: a miss never waits for a prefetch

QUEUED, RUNNING, PUBLISHED, DONE = "queued", "running", "published", "done"


class SchedulerClosed(RuntimeError):
    """The scheduler was closed before the request completed."""


def describe(key: Hashable) -> str:
    """``(3, 17)`` -> ``"expert (3, 17)"``: how errors name a request."""
    if isinstance(key, tuple) and len(key) == 2:
        return f"expert ({key[0]}, {key[1]})"
    return f"expert {key!r}"


class _Request:
    __slots__ = ("key", "depth", "score", "ranges", "nbytes", "future", "state", "cancelled",
                 "buffer", "token", "submitted_at", "queued_at", "upgraded", "batch", "plan",
                 "shift")

    def __init__(self, key, depth, score, ranges, nbytes, plan, shift, now):
        self.key = key
        self.depth = depth
        self.score = score
        self.ranges = ranges
        self.nbytes = nbytes
        self.plan = plan  # its pieces, planned at submit
        self.shift = shift  # where its view starts in its staging buffer
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.state = QUEUED
        self.cancelled = False
        self.buffer: Optional[int] = None
        self.token = 0
        self.submitted_at = now
        self.queued_at = now
        self.upgraded = False
        self.batch: Optional[_Batch] = None

    @property
    def demand(self) -> bool:
        return self.depth == 0


class _Batch:
    """Requests read together (coalesced), as pieces that run on several threads."""

    __slots__ = ("requests", "demand", "runs", "next", "remaining", "views", "error", "started",
                 "skipped")

    def __init__(self, requests: List[_Request], demand: bool):
        self.requests = requests
        self.demand = demand
        self.runs: list = []
        self.next = 0  # index of the next piece to start
        self.remaining = 0  # pieces not yet returned
        self.views: list = []
        self.error: Optional[BaseException] = None
        self.started: Optional[float] = None
        self.skipped = False  # pieces were dropped: the buffers are incomplete
        for req in requests:
            req.batch = self

    def all_cancelled(self) -> bool:
        return all(r.cancelled or r.future.cancelled() for r in self.requests)


@dataclass
class SchedulerStatistics:
    """What the scheduler did since it started.

    ``requests`` counts submits by class (``"demand"``, ``"prefetch"``), ``by_depth`` by depth;
    ``reads`` counts batches (one or more coalesced requests), ``pieces`` their ``preadv`` calls;
    ``useful_nbytes`` were published or handed to a demand, ``cancelled_nbytes`` were read but
    not published (cancelled while running). Latencies in seconds; ``gb_per_s`` is bytes read
    over the time at least one read was running.
    """

    requests: Dict[str, int] = field(default_factory=dict)
    by_depth: Dict[int, int] = field(default_factory=dict)
    deduped: int = 0
    upgraded: int = 0
    cancelled: int = 0
    dropped: int = 0
    failed: int = 0
    reads: int = 0
    pieces: int = 0
    coalesced_reads: int = 0
    bytes_read: int = 0
    useful_nbytes: int = 0
    cancelled_nbytes: int = 0
    queue_wait_p50_s: Dict[str, float] = field(default_factory=dict)
    queue_wait_p99_s: Dict[str, float] = field(default_factory=dict)
    read_latency_p50_s: float = 0.0
    read_latency_p99_s: float = 0.0
    demand_latency_p50_s: float = 0.0
    demand_latency_p99_s: float = 0.0
    busy_s: float = 0.0
    gb_per_s: float = 0.0
    queued: int = 0
    running: int = 0
    published: int = 0
    free_buffers: int = 0
    speculative_nbytes_in_flight: int = 0


def _percentile(samples, q: float) -> float:
    return float(np.percentile(np.fromiter(samples, dtype=np.float64), q)) if samples else 0.0


class IOScheduler:
    """Reads experts into staging buffers in priority order, on threads of its own.

    The engine thread calls ``submit`` (never blocks), ``cancel``, ``poll`` (completed
    prefetches as ``(key, buffer)``), and ``release(buffer)`` once it has copied a buffer out
    at a safe point. ``submit(key, depth=0)`` is a demand read: block on the returned future.
    A read that is already running cannot be stopped: cancelling it means its result is
    not published, its pieces not yet started are dropped, and its bytes count against the
    speculative cap until it returns.

    Threads: the loop thread activates requests after engine events; ``parallelism +
    DEMAND_LANES`` reader threads read pieces (runs of adjacent ranges, at most
    ``piece_nbytes``), those of demand reads first, and activate the next request themselves
    when they run dry. A demand read's futures resolve on the reader that finishes it.
    ``close`` (or leaving the ``with`` block, also on an exception) joins them all.

    Backpressure: reads need a free staging buffer. Prefetches leave ``reserved_for_demand``
    buffers free, and wait when the pool is empty and when ``speculative_nbytes`` are already
    in flight, or what the device reads in ``speculative_s`` at the throughput measured so
    far (a demand read queues behind the prefetch pieces the device already has: this
    bounds its wait, whatever the device's speed; one prefetch may always be in flight). A
    demand read takes the next free buffer first and has a reader of its own; while one is
    under way no prefetch piece starts (``yield_to_demand``). At most
    ``max_pending`` prefetches wait; past that the lowest priority is dropped (its future
    cancelled). Demand requests are never dropped.

    Args:
        locate: ``key -> [ByteRange]``; ``dest`` is where each range lands in the key's buffer.
        nbytes_of: ``key -> int``, the size of the key's buffer.
        buffer_nbytes: size of each staging buffer (the largest key).
        num_buffers: staging buffers in the pool.
        parallelism: pieces (``preadv`` calls) in flight at once, plus ``DEMAND_LANES``
            for demand reads: the device's queue depth, not the number of experts.
        speculative_nbytes: cap on prefetch bytes being read at once; None = no cap.
        speculative_s: cap on prefetch bytes being read at once, in seconds of the device's
            measured throughput (None: no such cap; before the first read completes only
            ``speculative_nbytes`` applies).
        max_pending: most prefetches waiting in the queue.
        reserved_for_demand: buffers a prefetch may never take.
        yield_to_demand: while a demand read is under way, start no prefetch piece.
        coalesce: merge requests whose ranges are adjacent in the file into one read.
        max_batch_nbytes: largest coalesced read.
        direct: read with O_DIRECT (see ``golem.io.reads``).
        retries: retries of a failed or short read before its future fails.
        handles: open-file cache to use (default: one of its own, closed on close).
        throttle: emulate a slower device (``golem.io.storage.Throttle``).
        piece_nbytes: largest single read; longer runs of a file are cut into pieces that
            several threads read at once.
        min_job_nbytes: a reader takes neighbouring pieces of a batch until it has this
            many bytes (small pieces cost more in bookkeeping than in reading).
        read: a reader replacing the built-in one (tests: gated fakes),
            ``read(requests, *, handles, direct, retries) -> int`` with requests
            ``[(ranges, out, what)]``; it reads a whole batch as one piece.
        use_uvloop: run the loop on uvloop when it is installed.
        clock: ``() -> seconds`` for latencies and the device's busy time (tests: a fake).
    """

    def __init__(self, locate: Callable[[Hashable], Sequence[ByteRange]],
                 nbytes_of: Callable[[Hashable], int], *, buffer_nbytes: int,
                 num_buffers: int = 16, parallelism: int = DEFAULT_PARALLELISM,
                 speculative_nbytes: Optional[int] = None, speculative_s: Optional[float] = None,
                 max_pending: int = 256,
                 reserved_for_demand: int = 1, yield_to_demand: bool = True,
                 coalesce: bool = True, max_batch_nbytes: int = 64 << 20,
                 piece_nbytes: int = DEFAULT_PIECE_NBYTES,
                 min_job_nbytes: int = MIN_JOB_NBYTES, direct: bool = False,
                 retries: int = 3, handles: Optional[FileHandles] = None,
                 throttle: Optional[Throttle] = None, read: Optional[Callable] = None,
                 use_uvloop: bool = True, clock: Callable[[], float] = time.perf_counter):
        if buffer_nbytes <= 0 or num_buffers < 1:
            raise ValueError(f"need buffer_nbytes > 0 and num_buffers >= 1, got "
                             f"{buffer_nbytes} and {num_buffers}")
        if parallelism < 1:
            raise ValueError(f"parallelism must be >= 1, got {parallelism}")
        if not 0 <= reserved_for_demand < num_buffers:
            raise ValueError(f"reserved_for_demand must be in [0, num_buffers), got "
                             f"{reserved_for_demand} with {num_buffers} buffers")
        self.locate = locate
        self._clock = clock
        self.nbytes_of = nbytes_of
        self.buffer_nbytes = buffer_nbytes
        self.parallelism = parallelism
        if speculative_s is not None and speculative_s <= 0:
            raise ValueError(f"speculative_s must be > 0, got {speculative_s}")
        self.speculative_nbytes = speculative_nbytes
        self.speculative_s = speculative_s
        self.max_pending = max_pending
        self.reserved_for_demand = reserved_for_demand
        self.yield_to_demand = yield_to_demand
        self.coalesce = coalesce
        self.max_batch_nbytes = max_batch_nbytes
        self.piece_nbytes = piece_nbytes
        self.min_job_nbytes = min_job_nbytes
        self.direct = direct
        self.retries = retries
        self._own_handles = handles is None
        if handles is None:
            handles = FileHandles(preadv=throttle.wrap(os.preadv) if throttle else os.preadv)
        elif throttle is not None:
            handles.preadv = throttle.wrap(handles.preadv)
        self.handles = handles
        self._read = read or read_into
        self._custom_read = read is not None
        self._use_uvloop = use_uvloop

        # ALIGN spare bytes: in direct mode a request's view starts at the file's alignment,
        # so the device writes the staging buffer itself (no bounce copy).
        self._buffers = [aligned_empty(buffer_nbytes + ALIGN) for _ in range(num_buffers)]
        for buf in self._buffers:
            buf[::4096] = 0  # fault the pages in now, not during the first reads
        self._free: List[int] = list(range(num_buffers - 1, -1, -1))
        self._handed: Dict[int, int] = {}  # address -> buffer, for views the engine holds
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # poll() waits here for publications
        self._idle = threading.Condition(self._lock)  # idle readers wait here for pieces
        self._requests: Dict[Hashable, _Request] = {}
        self._heap: List[tuple] = []
        self._seq = itertools.count()
        self._num_prefetch_queued = 0
        self._published: Deque[_Request] = deque()
        self._starts: Dict[Tuple[str, int], _Request] = {}
        self._ends: Dict[Tuple[str, int], _Request] = {}
        self._active: List[_Batch] = []  # batches with pieces not yet started
        self._waiting_pieces = 0  # pieces of active batches not yet started
        self._active_demand = 0  # demand batches not finished
        self._running_pieces = 0
        self._spec_in_flight = 0
        self._busy_since: Optional[float] = None
        self._stats = SchedulerStatistics()
        self._queue_waits = {"demand": deque(maxlen=8192), "prefetch": deque(maxlen=8192)}
        self._read_latencies: Deque[float] = deque(maxlen=8192)
        self._demand_latencies: Deque[float] = deque(maxlen=8192)

        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._workers: List[threading.Thread] = []
        self._closed = False
        self._started = False

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> "IOScheduler":
        """Start the loop thread and the readers (``with`` does this)."""
        if self._started:
            return self
        if self._closed:
            raise SchedulerClosed("scheduler is closed")
        self._loop = self._new_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(ready,),
                                        name="golem-io-loop", daemon=True)
        self._thread.start()
        ready.wait()
        self._started = True
        try:
            for i in range(self.parallelism + DEMAND_LANES):
                worker = threading.Thread(target=self._work, name=f"golem-io-read-{i}",
                                          daemon=True)
                worker.start()
                self._workers.append(worker)
        except BaseException:
            self.close()
            raise
        return self

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        if self._use_uvloop:
            try:
                import uvloop
                return uvloop.new_event_loop()
            except ImportError:
                pass
        return asyncio.new_event_loop()

    def _run_loop(self, ready: threading.Event) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)  # this thread only
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def close(self) -> None:
        """Cancel everything not yet published, wait for running reads, join every thread.

        Demand futures still pending fail with ``SchedulerClosed``; prefetch futures are
        cancelled. A read already inside ``preadv`` finishes first (it cannot be stopped).
        Published buffers stay valid until ``release`` or garbage collection. Safe to call
        twice, and after errors.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            resolve = []
            for req in list(self._requests.values()):
                if req.state in (QUEUED, RUNNING):
                    req.cancelled = True
                    resolve.append(req)
                    if req.state == QUEUED:
                        self._forget(req)
            self._heap.clear()
            self._num_prefetch_queued = 0
            self._cond.notify_all()
            self._idle.notify_all()
        for req in resolve:
            if req.demand:
                _set_exception(req.future, SchedulerClosed(
                    f"scheduler closed before the read of {describe(req.key)} completed"))
            else:
                _cancel(req.future)
        try:
            if self._thread is not None and self._thread.is_alive():
                try:
                    self._loop.call_soon_threadsafe(self._loop.stop)
                except RuntimeError:  # already closed
                    pass
                self._thread.join()
            for worker in self._workers:
                worker.join()
        finally:
            if self._own_handles:
                self.handles.close()

    def __enter__(self) -> "IOScheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def threads(self) -> List[threading.Thread]:
        """The loop thread and the reader threads (for tests that check joins)."""
        return ([self._thread] if self._thread is not None else []) + list(self._workers)

    # -- engine-facing API ------------------------------------------------------------------

    def submit(self, key: Hashable, depth: int = 0, score: float = 0.0
               ) -> concurrent.futures.Future:
        """Ask for ``key``'s bytes; depth 0 = demand (the engine waits), d >= 1 = prefetch.

        Never blocks. A key already queued or in flight is not read twice: its request is
        re-prioritised if this one ranks higher (a demand upgrades a prefetch) and its future
        is returned. The future's result is the staging buffer (a uint8 array of
        ``nbytes_of(key)`` bytes) that the caller must ``release``; for prefetches the same
        buffer is also handed out by ``poll``, which is how the engine should take them.
        """
        if depth < 0:
            raise ValueError(f"depth must be >= 0 (0 = demand), got {depth}")
        score = float(score)
        prepared = None
        while True:
            with self._lock:
                if self._closed or not self._started:
                    raise SchedulerClosed("scheduler is closed" if self._closed else
                                          "scheduler is not started (use it in a with block)")
                req = self._requests.get(key)
                stale = req is not None and req.cancelled and req.batch is not None \
                    and req.batch.skipped  # its read was cut short: it cannot be revived
                if (req is None or stale) and prepared is None:
                    pass  # locate the key outside the lock, then look again
                else:
                    cls = "demand" if depth == 0 else "prefetch"
                    self._stats.requests[cls] = self._stats.requests.get(cls, 0) + 1
                    self._stats.by_depth[depth] = self._stats.by_depth.get(depth, 0) + 1
                    dropped = []
                    if req is not None and not stale:
                        future = self._resubmit(req, depth, score)
                    else:
                        req = _Request(key, depth, score, *prepared, self._clock())
                        self._requests[key] = req
                        self._enqueue(req)
                        for r in req.ranges:
                            self._starts[(r.path, r.offset)] = req
                            self._ends[(r.path, r.end)] = req
                        future = req.future
                        dropped = self._trim_queue()
                    kick = req.demand or self._has_idle_reader()
                    break
            prepared = self._prepare(key)
        for other in dropped:
            _cancel(other)
        if kick:
            self._kick()
        return future

    def _prepare(self, key: Hashable) -> tuple:
        """``(ranges, nbytes, pieces, shift)`` of a new key; bad ranges raise ValueError."""
        ranges = list(self.locate(key))
        nbytes = int(self.nbytes_of(key))
        if nbytes > self.buffer_nbytes:
            raise ValueError(f"{describe(key)} needs {nbytes} bytes, more than the "
                             f"{self.buffer_nbytes}-byte staging buffers")
        plan = _plan(key, ranges, nbytes, self.piece_nbytes)
        shift = 0
        if self.direct and ranges:  # the view starts at the file's alignment of the largest range
            big = max(ranges, key=lambda r: r.nbytes)
            shift = (big.offset - big.dest) % ALIGN
        return ranges, nbytes, plan, shift

    def _resubmit(self, req: _Request, depth: int, score: float) -> concurrent.futures.Future:
        self._stats.deduped += 1
        if req.state == RUNNING and req.cancelled:  # revive: the bytes are coming anyway
            req.cancelled = False
            req.future = concurrent.futures.Future()
        if depth == 0 and not req.demand:
            self._stats.upgraded += 1
            req.upgraded = True
            if req.state == PUBLISHED:
                self._published.remove(req)
                self._deliver_published(req)
        if (depth, -score) < (req.depth, -req.score):
            was_demand = req.demand
            req.depth, req.score = depth, score
            if req.state == QUEUED:
                if not was_demand and req.demand:
                    self._num_prefetch_queued -= 1
                self._push(req)
            elif req.state == RUNNING and req.demand and not was_demand:
                self._spec_in_flight -= req.nbytes
                batch = req.batch
                if batch is not None and not batch.demand:  # its remaining pieces go first
                    batch.demand = True
                    self._active_demand += 1
                    self._active.sort(key=lambda b: not b.demand)
        return req.future

    def cancel(self, key: Hashable) -> bool:
        """Do not publish ``key``'s prefetch; True if there was one to cancel.

        A queued prefetch is dropped; a running one finishes (its bytes count until then)
        and its buffer goes back to the pool. Demand reads and prefetches already published
        (waiting in ``poll``) are not cancelled.
        """
        with self._lock:
            req = self._requests.get(key)
            if req is None or req.demand or req.cancelled or req.state not in (QUEUED, RUNNING):
                return False
            req.cancelled = True
            self._stats.cancelled += 1
            if req.state == QUEUED:
                self._forget(req)
                self._num_prefetch_queued -= 1
                del self._requests[key]
            kick = self._has_idle_reader()
        _cancel(req.future)
        if kick:
            self._kick()
        return True

    def poll(self, timeout: Optional[float] = 0.0) -> List[Tuple[Hashable, np.ndarray]]:
        """Completed prefetches as ``(key, buffer)``; the caller owns each buffer until ``release``.

        ``timeout=0`` returns at once; a positive timeout or None waits for at least one.
        """
        with self._cond:
            if timeout != 0 and not self._published:
                self._cond.wait_for(lambda: self._published or self._closed, timeout)
            out = []
            while self._published:
                req = self._published.popleft()
                req.state = DONE
                del self._requests[req.key]
                out.append((req.key, self._view(req)))
            return out

    def release(self, buffer: np.ndarray) -> None:
        """Give a staging buffer (from ``poll`` or a future) back to the pool."""
        address = np.asarray(buffer).ctypes.data
        with self._lock:
            index = self._handed.pop(address, None)
            if index is None:
                if any(b.ctypes.data <= address < b.ctypes.data + len(b) for b in self._buffers):
                    raise ValueError("release: staging buffer released twice "
                                     "(or never handed out)")
                raise ValueError("release: not a staging buffer of this scheduler")
            self._free.append(index)
            kick = self._has_idle_reader()
        if kick:
            self._kick()

    def pending(self, key: Hashable) -> Optional[str]:
        """``"queued"``, ``"running"``, ``"published"`` or None for a key nobody asked for."""
        with self._lock:
            req = self._requests.get(key)
            return None if req is None else req.state

    def statistics(self) -> SchedulerStatistics:
        """A snapshot of the counters and latency percentiles."""
        with self._lock:
            s = SchedulerStatistics(**{k: (dict(v) if isinstance(v, dict) else v)
                                       for k, v in self._stats.__dict__.items()})
            busy = s.busy_s
            if self._busy_since is not None:
                busy += self._clock() - self._busy_since
            waits = {cls: list(v) for cls, v in self._queue_waits.items()}
            reads = list(self._read_latencies)
            demands = list(self._demand_latencies)
            s.queued = sum(1 for r in self._requests.values() if r.state == QUEUED)
            s.running = sum(1 for r in self._requests.values() if r.state == RUNNING)
            s.published = len(self._published)
            s.free_buffers = len(self._free)
            s.speculative_nbytes_in_flight = self._spec_in_flight
        s.busy_s = busy
        s.gb_per_s = s.bytes_read / busy / 1e9 if busy > 0 else 0.0
        s.queue_wait_p50_s = {c: _percentile(w, 50) for c, w in waits.items()}
        s.queue_wait_p99_s = {c: _percentile(w, 99) for c, w in waits.items()}
        s.read_latency_p50_s = _percentile(reads, 50)
        s.read_latency_p99_s = _percentile(reads, 99)
        s.demand_latency_p50_s = _percentile(demands, 50)
        s.demand_latency_p99_s = _percentile(demands, 99)
        return s

    # -- queue (call with the lock held) ----------------------------------------------------

    def _enqueue(self, req: _Request) -> None:
        if not req.demand:
            self._num_prefetch_queued += 1
        self._push(req)

    def _push(self, req: _Request) -> None:
        req.token = next(self._seq)
        heapq.heappush(self._heap, (req.depth, -req.score, req.token, req))

    def _forget(self, req: _Request) -> None:
        """Remove a queued request from the adjacency maps (heap entries die lazily)."""
        req.token = -1
        for r in req.ranges:
            if self._starts.get((r.path, r.offset)) is req:
                del self._starts[(r.path, r.offset)]
            if self._ends.get((r.path, r.end)) is req:
                del self._ends[(r.path, r.end)]

    def _top(self) -> Optional[_Request]:
        heap = self._heap
        while heap:
            req = heap[0][3]
            if heap[0][2] == req.token and req.state == QUEUED:
                if not req.future.cancelled():
                    return req
                self._forget(req)  # the caller cancelled the future itself
                if not req.demand:
                    self._num_prefetch_queued -= 1
                req.state = DONE
                self._requests.pop(req.key, None)
                self._stats.cancelled += 1
            heapq.heappop(heap)
        return None

    def _trim_queue(self) -> List[concurrent.futures.Future]:
        """Drop the lowest-priority prefetches past ``max_pending``; return their futures."""
        if self._num_prefetch_queued <= self.max_pending:
            return []
        live = [e for e in self._heap if e[2] == e[3].token and e[3].state == QUEUED
                and not e[3].demand]
        live.sort()
        futures = []
        for entry in live[self.max_pending:]:
            req = entry[3]
            req.cancelled = True
            self._forget(req)
            self._num_prefetch_queued -= 1
            del self._requests[req.key]
            self._stats.dropped += 1
            futures.append(req.future)  # cancelled outside the lock: callbacks may call us
        return futures

    # -- dispatch (loop thread) -------------------------------------------------------------

    def _has_idle_reader(self) -> bool:
        """Lock held: could a reader start a prefetch now? (Busy readers activate on their own.)"""
        return bool(self._heap) and self._running_pieces + self._waiting_pieces < self.parallelism

    def _kick(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._pump)
            except RuntimeError:  # loop closed between the check and the call
                pass

    def _pump(self) -> None:
        """Loop thread, after engine events (submit, cancel, release): activate requests."""
        with self._lock:
            if not self._closed and self._activate_ready():
                self._idle.notify(self._waiting_pieces)

    def _activate_ready(self) -> bool:
        """Activate the requests that priorities, buffers and caps allow (lock held).

        Demand requests are activated at once. A prefetch is activated only when a reader
        would otherwise be idle (its pieces plus those waiting fit the free readers), so
        few experts are in flight at once, each finishes as early as the device allows,
        and a request submitted later with a higher priority still goes first.
        """
        activated = False
        while True:
            top = self._top()
            if top is None or not self._free:
                break
            if not top.demand:
                idle = self.parallelism - self._running_pieces - self._waiting_pieces
                if idle <= 0 or (self.yield_to_demand and self._active_demand) \
                        or not self._can_start(top):
                    break
            self._activate(top)
            activated = True
        return activated

    def _next_piece(self) -> Optional[Tuple["_Batch", object]]:
        """Reader thread (lock held): the next piece, demand batches first, or None."""
        threads = self._running_pieces
        for batch in self._active:
            if batch.demand:
                return self._take_piece(batch) \
                    if threads < self.parallelism + DEMAND_LANES else None
        if threads >= self.parallelism or (self.yield_to_demand and self._active_demand):
            return None
        while self._active:
            batch = self._active[0]
            if batch.all_cancelled():  # nobody wants the rest: do not read it
                self._skip_rest(batch)
                if batch.remaining == 0:
                    self._finish(batch)  # only cancelled requests: nothing to resolve
                continue
            return self._take_piece(batch)
        return None

    def _work(self) -> None:
        """Reader thread: take pieces and read them until the scheduler closes."""
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    job = self._next_piece()
                    if job is None and self._activate_ready():  # no hop to the loop
                        job = self._next_piece()
                    if job is not None:
                        break
                    self._idle.wait()
                self._running_pieces += 1
                if self._busy_since is None:
                    self._busy_since = self._clock()
                if self._waiting_pieces:
                    self._idle.notify(self._waiting_pieces)
            self._read_piece(*job)

    def _can_start(self, req: _Request) -> bool:
        if req.demand:
            return bool(self._free)
        if len(self._free) <= self.reserved_for_demand:
            return False
        in_flight = self._spec_in_flight
        if in_flight == 0:
            return True
        cap = self._speculative_cap()
        return cap is None or in_flight + req.nbytes <= cap

    def _speculative_cap(self) -> Optional[int]:
        """Prefetch bytes allowed in flight now (lock held): the tighter of the two caps."""
        cap = self.speculative_nbytes
        busy = self._stats.busy_s
        if self.speculative_s is not None and busy > 0:
            timed = int(self._stats.bytes_read / busy * self.speculative_s)
            cap = timed if cap is None else min(cap, timed)
        return cap

    def _activate(self, req: _Request) -> "_Batch":
        requests = [req]
        self._take(req)
        if self.coalesce:
            self._grow(requests)
        batch = _Batch(requests, req.demand)
        if self._custom_read:
            batch.runs = [None]  # a custom reader reads the whole batch as one piece
        else:
            batch.views = [memoryview(self._view(r)) for r in requests]
            if len(requests) == 1:
                batch.runs = req.plan  # planned at submit, buffer index 0
            else:
                try:
                    batch.runs = plan_reads([(r.ranges, i, describe(r.key))
                                             for i, r in enumerate(requests)], self.piece_nbytes)
                except ValueError:  # requests overlapping in the file: read them one by one
                    batch.runs = [run for i, r in enumerate(requests)
                                  for run in plan_reads([(r.ranges, i, describe(r.key))],
                                                        self.piece_nbytes)]
            batch.runs = batch.runs or [None]
        batch.remaining = len(batch.runs)
        self._waiting_pieces += len(batch.runs)
        self._active.append(batch)
        if batch.demand:
            self._active_demand += 1
            self._active.sort(key=lambda b: not b.demand)  # stable: demand batches first
        return batch

    def _take_piece(self, batch: "_Batch") -> Tuple["_Batch", list]:
        """The next pieces of ``batch`` for one reader: ``min_job_nbytes`` unless it ends."""
        runs = []
        nbytes = 0
        while batch.next < len(batch.runs) and (not runs or nbytes < self.min_job_nbytes):
            run = batch.runs[batch.next]
            runs.append(run)
            nbytes += run.nbytes if run is not None else 0
            batch.next += 1
        self._waiting_pieces -= len(runs)
        if batch.next == len(batch.runs):
            self._active.remove(batch)
        if batch.started is None:
            batch.started = self._clock()
        return batch, runs

    def _skip_rest(self, batch: "_Batch") -> None:
        """Drop the pieces of ``batch`` not yet started; finish it if none is running."""
        skipped = len(batch.runs) - batch.next
        batch.skipped = batch.skipped or skipped > 0
        batch.next = len(batch.runs)
        self._waiting_pieces -= skipped
        batch.remaining -= skipped
        if batch in self._active:
            self._active.remove(batch)

    def _take(self, req: _Request) -> None:
        self._forget(req)
        req.state = RUNNING
        req.buffer = self._free.pop()
        if req.demand:
            self._queue_waits["demand"].append(self._clock() - req.queued_at)
        else:
            self._num_prefetch_queued -= 1
            self._spec_in_flight += req.nbytes
            self._queue_waits["prefetch"].append(self._clock() - req.queued_at)

    def _grow(self, batch: List[_Request]) -> None:
        """Add queued requests of the same class whose ranges touch the batch's in the file."""
        demand = batch[0].demand
        total = sum(r.nbytes for r in batch)
        frontier = list(batch)
        while frontier:
            req = frontier.pop()
            for r in req.ranges:
                for other in (self._starts.get((r.path, r.end)),
                              self._ends.get((r.path, r.offset))):
                    if other is None or other.state != QUEUED or other.demand != demand \
                            or total + other.nbytes > self.max_batch_nbytes:
                        continue
                    if other.future.cancelled() or not self._can_start(other):
                        continue
                    self._take(other)
                    batch.append(other)
                    frontier.append(other)
                    total += other.nbytes

    def _view(self, req: _Request) -> np.ndarray:
        return self._buffers[req.buffer][req.shift:req.shift + req.nbytes]

    def _read_piece(self, batch: "_Batch", runs: list) -> None:
        """Reader thread: read some pieces of a batch; its last piece publishes it."""
        error: Optional[BaseException] = None
        nbytes = 0
        try:
            for run in runs:
                if self._custom_read:
                    nbytes += self._read([(r.ranges, self._view(r), describe(r.key))
                                          for r in batch.requests],
                                         handles=self.handles, direct=self.direct,
                                         retries=self.retries)
                elif run is not None:
                    nbytes += read_run(run, batch.views, handles=self.handles,
                                       direct=self.direct, retries=self.retries)
        except BaseException as exc:  # surfaces on the futures, never kills the reader
            error = exc
        with self._cond:
            self._running_pieces -= 1
            self._stats.pieces += len(runs)
            self._stats.bytes_read += nbytes
            if self._running_pieces == 0 and self._busy_since is not None:
                self._stats.busy_s += self._clock() - self._busy_since
                self._busy_since = None
            batch.remaining -= len(runs)
            if error is not None and batch.error is None:
                batch.error = error
                self._skip_rest(batch)
            resolve = self._finish(batch) if batch.remaining == 0 else []
            if self._waiting_pieces > 1:  # this thread takes one; a demand's end frees more
                self._idle.notify(self._waiting_pieces - 1)
        for future, outcome in resolve:
            if isinstance(outcome, BaseException):
                _set_exception(future, outcome)
            elif not future.done():
                future.set_result(outcome)

    def _finish(self, batch: "_Batch") -> list:
        """Publish a batch whose pieces have all returned (lock held); return futures to set."""
        finished = self._clock()
        error = batch.error
        if batch.demand:
            self._active_demand -= 1
        self._read_latencies.append(finished - (batch.started or finished))
        self._stats.reads += 1
        self._stats.coalesced_reads += len(batch.requests) > 1
        resolve = []
        for req in batch.requests:
            if not req.demand:
                self._spec_in_flight -= req.nbytes
            if self._requests.get(req.key) is req:  # a stale one may have been replaced
                del self._requests[req.key]
            if error is not None:
                self._stats.failed += 1
                self._free_buffer(req)
                req.state = DONE
                if not req.cancelled:
                    resolve.append((req.future, error))
            elif req.cancelled or req.future.cancelled() or batch.skipped:
                self._stats.cancelled_nbytes += req.nbytes
                self._free_buffer(req)
                req.state = DONE
            else:
                self._stats.useful_nbytes += req.nbytes
                view = self._view(req)
                self._handed[view.ctypes.data] = req.buffer
                if req.demand:
                    req.state = DONE
                    self._demand_latencies.append(finished - req.submitted_at)
                else:
                    req.state = PUBLISHED
                    self._published.append(req)
                    self._requests[req.key] = req
                resolve.append((req.future, view))
        if self._published:
            self._cond.notify_all()
        return resolve

    def _deliver_published(self, req: _Request) -> None:
        """A demand for a published prefetch: hand it over through the future (already set)."""
        req.state = DONE
        del self._requests[req.key]

    def _free_buffer(self, req: _Request) -> None:
        if req.buffer is not None:
            self._free.append(req.buffer)
            req.buffer = None


def _plan(key: Hashable, ranges: Sequence[ByteRange], nbytes: int, piece_nbytes: int) -> list:
    """The key's pieces; rejects, at submit, ranges that overlap or overflow its buffer."""
    for r in ranges:
        if r.nbytes < 0 or r.offset < 0 or r.dest < 0 or r.dest + r.nbytes > nbytes:
            raise ValueError(f"{describe(key)}: range {r.label!s} of {r.path} (offset "
                             f"{r.offset}, dest {r.dest}, {r.nbytes} bytes) does not fit its "
                             f"{nbytes}-byte buffer")
    try:
        return plan_reads([(ranges, 0, describe(key))], piece_nbytes)
    except ValueError as exc:
        raise ValueError(f"{describe(key)}: {exc}") from None


_notified: "weakref.WeakSet[concurrent.futures.Future]" = weakref.WeakSet()
_notified_lock = threading.Lock()


def _cancel(future: concurrent.futures.Future) -> None:
    """Cancel and wake ``concurrent.futures.wait``, which only learns of it this way.

    Safe for a future cancelled and notified before (a prefetch cancelled, then closed):
    notifying twice would make ``concurrent.futures`` log a critical error."""
    if not future.cancel():
        return
    with _notified_lock:
        if future in _notified:
            return
        _notified.add(future)
    try:
        future.set_running_or_notify_cancel()
    except RuntimeError:  # notified by someone else
        pass


def _set_exception(future: concurrent.futures.Future, error: BaseException) -> None:
    if not future.done():
        try:
            future.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass
