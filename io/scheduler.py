"""The I/O scheduler: prioritised expert reads into a pool of staging buffers.

Owns the engine-facing API (submit, cancel, poll, release, statistics), the lifetime of its
threads (an event loop on a thread of its own, uvloop when installed, and a fixed pool of
reader threads), and dispatch: which queued requests start, when, and together with which
neighbours, under the speculative caps. The jobs it delegates each have a module:
``requests`` (queue and dedupe), ``readers`` (batches, pieces, reading), ``staging``
(buffers, the allocator contract), ``statistics``, ``futures`` (results and interruptible
waits). It knows nothing of models: keys are located by a ``locate(key) -> [ByteRange]``
callable; where the bytes go next is the engine's business.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from golem.io.futures import (SchedulerClosed, cancel_future, fail_future, resolve_future,
                              wait_result)
from golem.io.ranges import ByteRange
from golem.io.readers import (DEFAULT_PARALLELISM, DEFAULT_PIECE_NBYTES, DEMAND_LANES,
                              MAX_PARALLELISM, MIN_JOB_NBYTES, Batch, PieceQueue,
                              check_parallelism, plan_batch, plan_request, read_job)
from golem.io.reads import ALIGN, FileHandles
from golem.io.requests import (DONE, PUBLISHED, QUEUED, RUNNING, Request, RequestQueue,
                               describe)
from golem.io.staging import Allocator, StagingBuffers
from golem.io.statistics import SchedulerStatistics, StatisticsRecorder
from golem.io.storage import Throttle

__all__ = ["IOScheduler", "SchedulerClosed", "SchedulerStatistics", "describe", "wait_result",
           "check_parallelism", "DEFAULT_PARALLELISM", "MAX_PARALLELISM"]

DEFAULT_MAX_GAP_NBYTES = 0  # see IOScheduler's "Coalescing"
CLOSE_TIMEOUT_S = 1.0


class IOScheduler:
    """Reads experts into staging buffers in priority order, on threads of its own.

    The engine thread calls ``submit`` (never blocks), ``cancel``, ``poll`` (completed
    prefetches as ``(key, buffer)``), and ``release(buffer)`` once it is done with a buffer.
    ``submit(key, depth=0)`` is a demand read: wait on the returned future with
    ``wait_result(future)`` (golem.io.futures), which lets Ctrl-C through within 0.1 s;
    a bare ``future.result()`` can hold it back for as long as the read takes.
    A read that is already running cannot be stopped: cancelling it means its result is
    not published, its pieces not yet started are dropped, and its bytes count against the
    speculative cap until it returns.

    Threads: ``submit``, ``cancel``, ``poll``, ``release``, ``pending`` and ``statistics``
    may be called from any thread, ``close`` too. The loop thread activates prefetches
    after engine events; a demand is activated on the submitting thread itself.
    ``parallelism + DEMAND_LANES`` reader threads read pieces (runs of adjacent ranges, at
    most ``piece_nbytes``), those of demand reads first, and activate the next request
    themselves when they run dry. A read's future resolves on the reader that finishes it.
    ``close`` (or leaving the ``with`` block, also on an exception) stops them all.

    Staging buffers: ``num_buffers`` buffers of ``buffer_nbytes`` (plus ALIGN bytes of
    slack with ``direct``) come from ``allocate`` (see ``golem.io.staging`` for the
    contract), all in the constructor. A buffer handed out (a demand's future, ``poll``)
    is the caller's until ``release``; after ``release`` a reader may write it at any
    moment, so any asynchronous use of it (an upload) must have completed.

    Backpressure: reads need a free staging buffer. Prefetches leave ``reserved_for_demand``
    buffers free, and wait when the pool is empty and when ``speculative_nbytes`` are already
    in flight, or what the device reads in ``speculative_s`` at the throughput measured so
    far (a demand read queues behind the prefetch pieces the device already has: this
    bounds its wait, whatever the device's speed; one prefetch may always be in flight). A
    demand read takes the next free buffer first and has a reader of its own; while one is
    under way no prefetch piece starts (``yield_to_demand``). At most
    ``max_pending`` prefetches wait; past that the lowest priority is dropped (its future
    cancelled). Demand requests are never dropped.

    Coalescing: the ranges of one expert that are adjacent in the file are one ``preadv``
    scattering into the expert's buffer; queued prefetches adjacent in the file join one
    read (``coalesce``). Ranges at most ``max_gap_nbytes`` apart are read as one span, the
    gap into a scratch buffer (no copies; with O_DIRECT none either when the boundaries are
    block-aligned). Default 0, from measurement: bench_io_host on this 2-core VM (2 MiB
    experts, 9 ranges 4 KiB apart, one miss at a time) read them with O_DIRECT in 6.6 ms
    per miss as nine reads spread over readers against 7.2 ms as one span (less CPU, 1.3
    against 1.8 ms, but one reader instead of several); from the page cache the shared
    machine's load drowned the difference (0.6 to 3 ms either way). The layouts mlx-lm
    writes stack each projection over the experts, so an expert's ranges are far apart
    there anyway; ranges adjacent in the file are always one ``preadv``.

    Closing: ``close`` cancels what is queued, wakes readers waiting on a storage emulator,
    and waits up to ``close_timeout_s`` for reads already inside the kernel; a reader still
    stuck after that (a hung device) is left behind, a daemon thread that does not keep the
    process alive, and the file handles it may still use stay open.

    Args:
        locate: ``key -> [ByteRange]``; ``dest`` is where each range lands in the key's buffer.
            Called once per key (the plan is kept), on the thread of the first ``submit``.
        nbytes_of: ``key -> int``, the size of the key's buffer (also called once per key).
        buffer_nbytes: size of each staging buffer (the largest key).
        num_buffers: staging buffers in the pool.
        parallelism: pieces (``preadv`` calls) in flight at once, plus ``DEMAND_LANES``
            for demand reads: the device's queue depth, not the number of experts; at most
            ``MAX_PARALLELISM``.
        speculative_nbytes: cap on prefetch bytes being read at once; None = no cap.
        speculative_s: cap on prefetch bytes being read at once, in seconds of the device's
            measured throughput (None: no such cap; before the first read completes only
            ``speculative_nbytes`` applies).
        max_pending: most prefetches waiting in the queue.
        reserved_for_demand: buffers a prefetch may never take.
        yield_to_demand: while a demand read is under way, start no prefetch piece.
        coalesce: merge requests whose ranges are adjacent in the file into one read.
        max_batch_nbytes: largest coalesced read.
        max_gap_nbytes: read ranges this close in the file as one span (see Coalescing).
        direct: read with O_DIRECT (see ``golem.io.reads``).
        retries: retries of a failed or short read before its future fails.
        handles: open-file cache to use (default: one of its own, closed on close).
        throttle: emulate a slower device (``golem.io.storage.Throttle``); it is attached to
            the handles this scheduler opens. With ``handles``, attach it there instead
            (``FileHandles(throttle=...)``); passing a different one here is an error.
        piece_nbytes: largest single read; longer runs of a file are cut into pieces that
            several threads read at once.
        min_job_nbytes: a reader takes neighbouring pieces of a batch until it has this
            many bytes (small pieces cost more in bookkeeping than in reading).
        allocate: ``nbytes -> uint8 array`` for the staging buffers (None: page-aligned
            host memory); see ``golem.io.staging``.
        read: a reader replacing the built-in one (tests: gated fakes),
            ``read(requests, *, handles, direct, retries) -> int`` with requests
            ``[(ranges, out, what)]``; it reads a whole batch as one piece.
        use_uvloop: run the loop on uvloop when it is installed.
        clock: ``() -> seconds`` for latencies and the device's busy time (tests: a fake).
        close_timeout_s: longest ``close`` waits for reads already inside the kernel.
    """

    def __init__(self, locate: Callable[[Hashable], Sequence[ByteRange]],
                 nbytes_of: Callable[[Hashable], int], *, buffer_nbytes: int,
                 num_buffers: int = 16, parallelism: int = DEFAULT_PARALLELISM,
                 speculative_nbytes: Optional[int] = None, speculative_s: Optional[float] = None,
                 max_pending: int = 256,
                 reserved_for_demand: int = 1, yield_to_demand: bool = True,
                 coalesce: bool = True, max_batch_nbytes: int = 64 << 20,
                 max_gap_nbytes: int = DEFAULT_MAX_GAP_NBYTES,
                 piece_nbytes: int = DEFAULT_PIECE_NBYTES,
                 min_job_nbytes: int = MIN_JOB_NBYTES, direct: bool = False,
                 retries: int = 3, handles: Optional[FileHandles] = None,
                 throttle: Optional[Throttle] = None, allocate: Optional[Allocator] = None,
                 read: Optional[Callable] = None, use_uvloop: bool = True,
                 clock: Callable[[], float] = time.perf_counter,
                 close_timeout_s: float = CLOSE_TIMEOUT_S):
        if buffer_nbytes <= 0 or num_buffers < 1:
            raise ValueError(f"need buffer_nbytes > 0 and num_buffers >= 1, got "
                             f"{buffer_nbytes} and {num_buffers}")
        parallelism = check_parallelism(parallelism)
        if not 0 <= reserved_for_demand < num_buffers:
            raise ValueError(f"reserved_for_demand must be in [0, num_buffers), got "
                             f"{reserved_for_demand} with {num_buffers} buffers")
        if speculative_s is not None and not (speculative_s > 0 and math.isfinite(speculative_s)):
            raise ValueError(f"speculative_s must be > 0 and finite, got {speculative_s}")
        for name, value, least in (("speculative_nbytes", speculative_nbytes, 0),
                                   ("max_pending", max_pending, 0),
                                   ("max_batch_nbytes", max_batch_nbytes, 1),
                                   ("max_gap_nbytes", max_gap_nbytes, 0),
                                   ("piece_nbytes", piece_nbytes, 1),
                                   ("min_job_nbytes", min_job_nbytes, 0),
                                   ("retries", retries, 0)):
            if value is not None and not value >= least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        if not close_timeout_s >= 0:
            raise ValueError(f"close_timeout_s must be >= 0, got {close_timeout_s}")
        if handles is not None and throttle is not None and handles.throttle is not throttle:
            raise ValueError("give the throttle to the FileHandles passed as handles "
                             "(FileHandles(throttle=...)), not to the scheduler")
        self.locate = locate
        self.nbytes_of = nbytes_of
        self.buffer_nbytes = buffer_nbytes
        self.parallelism = parallelism
        self.speculative_nbytes = speculative_nbytes
        self.speculative_s = speculative_s
        self.reserved_for_demand = reserved_for_demand
        self.yield_to_demand = yield_to_demand
        self.coalesce = coalesce
        self.max_batch_nbytes = max_batch_nbytes
        self.max_gap_nbytes = max_gap_nbytes
        self.piece_nbytes = piece_nbytes
        self.direct = direct
        self.retries = retries
        self.close_timeout_s = close_timeout_s
        self._clock = clock
        self._own_handles = handles is None
        self.handles = handles if handles is not None else FileHandles(throttle=throttle)
        self._read = read  # None: the built-in reader
        self._use_uvloop = use_uvloop

        # ALIGN spare bytes in direct mode: a request's view starts at the file's alignment,
        # so the device writes the staging buffer itself (no bounce copy).
        self._buffers = StagingBuffers(buffer_nbytes + (ALIGN if direct else 0), num_buffers,
                                       allocate=allocate)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # poll() waits here for publications
        self._idle = threading.Condition(self._lock)  # idle readers wait here for jobs
        self._sleeping = 0  # readers waiting on _idle
        self._waking = 0  # of those, notified and not yet running
        self._recorder = StatisticsRecorder(clock)
        self._stats = self._recorder.counts
        self._queue = RequestQueue(max_pending, self._stats)
        self.min_job_nbytes = min_job_nbytes
        self._pieces = PieceQueue(clock)
        self._plans: Dict[Hashable, tuple] = {}  # key -> (ranges, nbytes, plan, align)
        self._published: Deque[Request] = deque()
        self._spec_in_flight = 0
        self._closing = threading.Event()  # set by close: wakes throttled readers

        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._workers: List[threading.Thread] = []
        self._closed = False
        self._started = False

    @property
    def max_pending(self) -> int:
        return self._queue.max_pending

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
        """Cancel everything not yet published, stop every thread; never hangs.

        Demand futures still pending fail with ``SchedulerClosed``; prefetch futures are
        cancelled. Readers waiting on a storage emulator are woken; a read already inside
        ``preadv`` finishes first (it cannot be stopped), for at most ``close_timeout_s``
        in all. Published buffers stay valid until ``release`` or garbage collection. Safe
        to call twice, from any thread, and after errors.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing.set()
            resolve = self._queue.clear()
            self._cond.notify_all()
            self._idle.notify_all()
        for req in resolve:
            if req.demand:
                fail_future(req.future, SchedulerClosed(
                    f"scheduler closed before the read of {describe(req.key)} completed"))
            else:
                cancel_future(req.future)
        deadline = time.monotonic() + self.close_timeout_s
        stuck = False
        try:
            if self._thread is not None and self._thread.is_alive():
                try:
                    self._loop.call_soon_threadsafe(self._loop.stop)
                except RuntimeError:  # already closed
                    pass
                self._thread.join(max(0.0, deadline - time.monotonic()))
            for worker in self._workers:
                worker.join(max(0.0, deadline - time.monotonic()))
            stuck = any(t.is_alive() for t in self.threads)
        finally:
            if self._own_handles and not stuck:
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

        Never blocks on I/O. A key already queued or in flight is not read twice: its
        request is re-prioritised if this one ranks higher (a demand upgrades a prefetch)
        and its future is returned. The future's result is the staging buffer (a uint8
        array of ``nbytes_of(key)`` bytes) that the caller must ``release``; for prefetches
        the same buffer is also handed out by ``poll``, which is how the engine should
        take them. Wait on a demand's future with ``wait_result``.
        """
        if depth < 0:
            raise ValueError(f"depth must be >= 0 (0 = demand), got {depth}")
        score = float(score)
        prepared = self._plans.get(key)
        while True:
            with self._lock:
                if self._closed or not self._started:
                    raise SchedulerClosed("scheduler is closed" if self._closed else
                                          "scheduler is not started (use it in a with block)")
                req = self._queue.get(key)
                stale = req is not None and req.cancelled and req.batch is not None \
                    and req.batch.skipped  # its read was cut short: it cannot be revived
                if (req is None or stale) and prepared is None:
                    pass  # locate the key outside the lock, then look again
                else:
                    self._recorder.submitted(depth)
                    dropped = []
                    if req is not None and not stale:
                        future = self._resubmit(req, depth, score)
                    else:
                        req = Request(key, depth, score, *prepared, self._clock())
                        self._queue.add(req)
                        future = req.future
                        dropped = self._queue.trim()
                    if req.demand:  # start it from here: no hop through the loop thread
                        kick = False
                        if self._activate_ready():
                            self._wake_readers(self._pieces.waiting)
                    else:
                        kick = self._has_idle_reader()
                    break
            prepared = self._prepare(key)
        for other in dropped:
            cancel_future(other)
        if kick:
            self._kick()
        return future

    def _prepare(self, key: Hashable) -> tuple:
        """``(ranges, nbytes, pieces, align)`` of a new key, kept; bad ranges raise ValueError."""
        ranges = tuple(self.locate(key))
        nbytes = int(self.nbytes_of(key))
        if nbytes > self.buffer_nbytes:
            raise ValueError(f"{describe(key)} needs {nbytes} bytes, more than the "
                             f"{self.buffer_nbytes}-byte staging buffers")
        plan = plan_request(key, ranges, nbytes, self.piece_nbytes, self.min_job_nbytes,
                            self.max_gap_nbytes)
        align = None
        if self.direct and ranges:  # the view starts at the file's alignment of the largest range
            big = max(ranges, key=lambda r: r.nbytes)
            align = (big.offset - big.dest) % ALIGN
        prepared = (ranges, nbytes, plan, align)
        self._plans[key] = prepared
        return prepared

    def _resubmit(self, req: Request, depth: int, score: float) -> concurrent.futures.Future:
        self._stats.deduped += 1
        if req.state == RUNNING and req.cancelled:  # revive: the bytes are coming anyway
            req.cancelled = False
            req.future = concurrent.futures.Future()
        if depth == 0 and not req.demand:
            self._stats.upgraded += 1
            req.upgraded = True
            if req.state == PUBLISHED:  # hand it over through the future (already set)
                self._published.remove(req)
                req.state = DONE
                self._queue.remove(req)
        if (depth, -score) < (req.depth, -req.score):
            was_demand = req.demand
            req.depth, req.score = depth, score
            if req.state == QUEUED:
                if not was_demand and req.demand:
                    self._queue.prefetch_queued -= 1
                self._queue.push(req)
            elif req.state == RUNNING and req.demand and not was_demand:
                self._spec_in_flight -= req.nbytes
                if req.batch is not None:
                    self._pieces.promote(req.batch)
        return req.future

    def cancel(self, key: Hashable) -> bool:
        """Do not publish ``key``'s prefetch; True if there was one to cancel.

        A queued prefetch is dropped; a running one finishes (its bytes count until then)
        and its buffer goes back to the pool. Demand reads and prefetches already published
        (waiting in ``poll``) are not cancelled.
        """
        with self._lock:
            req = self._queue.get(key)
            if req is None or req.demand or req.cancelled or req.state not in (QUEUED, RUNNING):
                return False
            req.cancelled = True
            self._stats.cancelled += 1
            if req.state == QUEUED:
                self._queue.dequeue(req)
                self._queue.remove(req)
            kick = self._has_idle_reader()
        cancel_future(req.future)
        if kick:
            self._kick()
        return True

    def poll(self, timeout: Optional[float] = 0.0) -> List[Tuple[Hashable, np.ndarray]]:
        """Completed prefetches as ``(key, buffer)``; the caller owns each buffer until ``release``.

        ``timeout=0`` returns at once; a positive timeout or None waits for at least one
        (None: in slices of 0.1 s, so that Ctrl-C reaches a waiting main thread).
        """
        with self._cond:
            if timeout != 0 and not self._published:
                ready = lambda: self._published or self._closed
                if timeout is None:
                    while not self._cond.wait_for(ready, 0.1):
                        pass
                else:
                    self._cond.wait_for(ready, timeout)
            out = []
            while self._published:
                req = self._published.popleft()
                req.state = DONE
                self._queue.remove(req)
                out.append((req.key, self._view(req)))
            return out

    def release(self, buffer: np.ndarray) -> None:
        """Give a staging buffer (from ``poll`` or a future) back to the pool; the caller
        must be done with it, including any asynchronous copy still reading it."""
        with self._lock:
            self._buffers.give_back(self._buffers.take_back(buffer))
            kick = self._has_idle_reader()
        if kick:
            self._kick()

    def pending(self, key: Hashable) -> Optional[str]:
        """``"queued"``, ``"running"``, ``"published"`` or None for a key nobody asked for."""
        with self._lock:
            req = self._queue.get(key)
            return None if req is None else req.state

    def statistics(self) -> SchedulerStatistics:
        """A snapshot of the counters and latency percentiles."""
        with self._lock:
            snapshot = self._recorder.snapshot()
            s = snapshot[0]
            s.queued = self._queue.count(QUEUED)
            s.running = self._queue.count(RUNNING)
            s.published = len(self._published)
            s.free_buffers = len(self._buffers.free)
            s.speculative_nbytes_in_flight = self._spec_in_flight
        return StatisticsRecorder.finish(snapshot)

    # -- dispatch (lock held unless said otherwise) -----------------------------------------

    def _has_idle_reader(self) -> bool:
        """Could a reader start a prefetch now? (Busy readers activate on their own.)"""
        return self._queue.has_queued() \
            and self._pieces.running + self._pieces.waiting < self.parallelism

    def _wake_readers(self, jobs: int) -> None:
        """Wake enough sleeping readers for ``jobs`` waiting jobs, counting those already
        woken and on their way: each wake-up costs a thread switch or two, and a reader
        woken for nothing costs as much as one that reads."""
        wanted = min(jobs, self._sleeping) - self._waking
        if wanted > 0:
            self._waking += wanted
            self._idle.notify(wanted)

    def _kick(self) -> None:
        """No lock: have the loop thread activate requests soon."""
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
                self._wake_readers(self._pieces.waiting)

    def _activate_ready(self) -> bool:
        """Activate the requests that priorities, buffers and caps allow.

        Demand requests are activated at once. A prefetch is activated only when a reader
        would otherwise be idle (its pieces plus those waiting fit the free readers), so
        few experts are in flight at once, each finishes as early as the device allows,
        and a request submitted later with a higher priority still goes first.
        """
        activated = False
        pieces = self._pieces
        while True:
            top = self._queue.top()
            if top is None or not self._buffers.free:
                break
            if not top.demand:
                idle = self.parallelism - pieces.running - pieces.waiting
                if idle <= 0 or (self.yield_to_demand and pieces.demand_batches) \
                        or not self._can_start(top):
                    break
            self._activate(top)
            activated = True
        return activated

    def _can_start(self, req: Request) -> bool:
        free = len(self._buffers.free)
        if req.demand:
            return free > 0
        if free <= self.reserved_for_demand:
            return False
        in_flight = self._spec_in_flight
        if in_flight == 0:
            return True
        cap = self._speculative_cap()
        return cap is None or in_flight + req.nbytes <= cap

    def _speculative_cap(self) -> Optional[int]:
        """Prefetch bytes allowed in flight now: the tighter of the two caps."""
        cap = self.speculative_nbytes
        rate = self._recorder.throughput_bytes_per_s()
        if self.speculative_s is not None and rate is not None:
            timed = int(rate * self.speculative_s)
            cap = timed if cap is None else min(cap, timed)
        return cap

    def _activate(self, req: Request) -> Batch:
        requests = [req]
        self._take(req)
        if self.coalesce:
            self._grow(requests)
        batch = Batch(requests, req.demand)
        if self._read is not None:
            batch.runs, batch.jobs, batch.remaining = [None], [1], 1  # it reads the whole batch
        else:
            plan_batch(batch, [memoryview(self._view(r)) for r in requests], self.piece_nbytes,
                       self.min_job_nbytes, self.max_gap_nbytes)
        self._pieces.add(batch)
        return batch

    def _take(self, req: Request) -> None:
        """A queued request starts: it leaves the queue and takes a buffer."""
        self._queue.dequeue(req)
        req.state = RUNNING
        req.buffer = self._buffers.take()
        if req.align is not None:
            req.shift = self._buffers.shift_for(req.buffer, req.align)
        wait = self._clock() - req.queued_at
        if req.demand:
            self._recorder.queue_waits["demand"].append(wait)
        else:
            self._spec_in_flight += req.nbytes
            self._recorder.queue_waits["prefetch"].append(wait)

    def _grow(self, batch: List[Request]) -> None:
        """Add queued requests of the same class whose ranges touch the batch's in the file."""
        demand = batch[0].demand
        total = sum(r.nbytes for r in batch)
        frontier = list(batch)
        while frontier:
            for other in list(self._queue.neighbours(frontier.pop())):
                if other.state != QUEUED or other.demand != demand \
                        or total + other.nbytes > self.max_batch_nbytes \
                        or other.future.cancelled() or not self._can_start(other):
                    continue
                self._take(other)
                batch.append(other)
                frontier.append(other)
                total += other.nbytes

    def _view(self, req: Request) -> np.ndarray:
        return self._buffers.view(req.buffer, req.shift, req.nbytes)

    def _work(self) -> None:
        """Reader thread (no lock): take jobs and read them until the scheduler closes."""
        pieces = self._pieces
        while True:
            with self._cond:
                activated = False
                while True:
                    if self._closed:
                        return
                    job = self._next_job()
                    if job is None and self._activate_ready():  # no hop to the loop
                        activated = True
                        job = self._next_job()
                    if job is not None:
                        break
                    self._sleeping += 1
                    self._idle.wait()
                    self._sleeping -= 1
                    if self._waking:
                        self._waking -= 1
                pieces.running += 1
                self._recorder.piece_started()
                if activated and pieces.waiting:  # the rest of what this thread activated
                    self._wake_readers(pieces.waiting)
            batch, runs = job
            nbytes, error = read_job(batch, runs, read=self._read, handles=self.handles,
                                     direct=self.direct, retries=self.retries,
                                     view_of=self._view, wake=self._closing)
            self._returned(batch, runs, nbytes, error)

    def _next_job(self):
        return self._pieces.next_job(self.parallelism, DEMAND_LANES, self.yield_to_demand,
                                     self._finish)

    def _returned(self, batch: Batch, runs: list, nbytes: int,
                  error: Optional[BaseException]) -> None:
        """Reader thread (no lock): account for a job; the batch's last job publishes it."""
        pieces = self._pieces
        with self._cond:
            pieces.running -= 1
            self._recorder.pieces_returned(len(runs), nbytes, pieces.running)
            batch.remaining -= len(runs)
            if error is not None and batch.error is None:
                batch.error = error
                pieces.skip_rest(batch)
            resolve = self._finish(batch) if batch.remaining == 0 else []
            if pieces.waiting > 1:  # this thread takes one; a demand's end frees more
                self._wake_readers(pieces.waiting - 1)
        for future, outcome in resolve:
            if isinstance(outcome, BaseException):
                fail_future(future, outcome)
            else:
                resolve_future(future, outcome)

    def _finish(self, batch: Batch) -> list:
        """Publish a batch whose pieces have all returned; return the futures to set."""
        finished = self._clock()
        error = batch.error
        self._pieces.finished(batch)
        self._recorder.read_latencies.append(finished - (batch.started or finished))
        self._stats.reads += 1
        self._stats.coalesced_reads += len(batch.requests) > 1
        resolve = []
        for req in batch.requests:
            if not req.demand:
                self._spec_in_flight -= req.nbytes
            self._queue.remove(req)
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
                self._buffers.hand_out(req.buffer, req.shift)
                if req.demand:
                    req.state = DONE
                    self._recorder.demand_latencies.append(finished - req.submitted_at)
                else:
                    req.state = PUBLISHED
                    self._published.append(req)
                    self._queue.by_key[req.key] = req
                resolve.append((req.future, view))
        if self._published:
            self._cond.notify_all()
        return resolve

    def _free_buffer(self, req: Request) -> None:
        if req.buffer is not None:
            self._buffers.give_back(req.buffer)
            req.buffer = None


# Older names, kept for callers and tests that import them from here.
_cancel = cancel_future
_set_exception = fail_future
