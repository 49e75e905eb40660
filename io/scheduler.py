"""The I/O scheduler: prioritised expert reads into a pool of staging buffers.

Owns the engine-facing API (submit, cancel, poll, release, statistics) and the lifetime of
what serves it. Each job has a module: ``settings`` (the checked options), ``dispatcher``
(which queued requests start, when, with which neighbours, under the speculative caps;
what a finished read means), ``reader_pool`` (the threads that read), ``loop_thread`` (the
event loop), ``requests`` (queue and dedupe), ``read_jobs`` (batches, pieces, reading),
``staging`` (buffers, the allocator contract), ``statistics``, ``futures`` (results and
interruptible waits). It knows nothing of models: keys are located by a
``locate(key) -> [ByteRange]`` callable; where the bytes go next is the engine's business.

Shape: the dispatcher's decisions run under one lock, on whichever thread an event
happens: a demand is activated on the submitting thread and handed straight to a reader;
a reader that runs dry activates the next request itself; after the other events of a
caller (a prefetch submitted, a cancel, a release) its own thread activates what may start
too. Handing that to the event loop instead (``activate_on_loop``, the earlier shape) kept
a few dictionary operations off the engine thread at the price of a wake-up of the loop
thread per event, which then competes with the engine for the interpreter: at depth 2 on
``--shape qwen3-30b-a3b-host``, 0.9 loop wake-ups per partial layer against none here
(benchmarks/profile_decode.py counts them). In time, benchmarks/bench_switches.py
``--switch caller-activation`` (2-core shared VM, 3 alternating runs, medians) is within
this machine's noise: engine wall time per partial layer on the loop against the caller,
fixed depth 2 on the page cache 4,043 against 3,076 us in a 16-token run and 2,474 against
2,662 in a 24-token one; depth 2 on emulated storage 4,576 against 4,313 and 4,253 against
3,204 (the depth-0 row, the same code either way, moved 35% between the settings). The
count of hand-offs decided it. The event loop thread stays, for the loop-activated shape and
whatever needs to await there; nothing on the read path waits for it. A
scheduler whose event loop made every decision (a task per request, awaiting a read in an
executor) would put two more thread hand-offs on every miss: engine -> loop -> reader ->
loop -> engine, against engine -> reader -> engine here. Measured with
benchmarks/bench_io_host.py (2-core shared VM, medians of 4 runs of 5 x 400 reads,
interleaved), against ``LoopShape``, the least such a loop does (a task per request, no
queue, no locks): page-cache reads of 36 KiB experts, submit -> result, 389 us wall and 287
CPU us per read with 3.2 voluntary thread switches here, against 421 us, 338 CPU us and 7.8
switches; no-op reads with each expert on one reader, 307 us, 250 CPU us and 3.25
switches, against 356 us, 305 CPU us and 8.1. Switches do not move with the machine's
load and each costs CPU the engine's thread competes for on the per-token path: the
loop stays off the miss path. Priorities, cancellation and the caps live in the
dispatcher, one lock, not in tasks: a decision is a few dictionary and heap operations,
cheaper under a lock than a hop to another thread.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from golem.io.dispatcher import Dispatcher
from golem.io.file_handles import ALIGN, FileHandles
from golem.io.futures import ResolvedFuture, SchedulerClosed, cancel_future, fail_future, wait_result
from golem.io.loop_thread import LoopThread
from golem.io.positioned_reads import can_read_cached, read_cached_many
from golem.io.ranges import ByteRange
from golem.io.read_jobs import (DEFAULT_PARALLELISM, DEMAND_LANES, MAX_PARALLELISM,
                                check_parallelism, read_job)
from golem.io.reader_pool import ReaderPool
from golem.io.requests import QUEUED, describe
from golem.io.settings import CLOSE_TIMEOUT_S, DEFAULT_MAX_GAP_NBYTES, SchedulerSettings
from golem.io.staging import Allocator, StagingBuffers
from golem.io.statistics import SchedulerStatistics, StatisticsRecorder
from golem.io.storage import Throttle

__all__ = ["IOScheduler", "SchedulerSettings", "SchedulerClosed", "SchedulerStatistics",
           "describe", "wait_result", "check_parallelism", "DEFAULT_PARALLELISM",
           "MAX_PARALLELISM", "DEFAULT_MAX_GAP_NBYTES", "CLOSE_TIMEOUT_S"]


class IOScheduler:
    """Reads experts into staging buffers in priority order, on threads of its own.

    The engine thread calls ``submit`` (never blocks; ``submit_many`` for a layer's reads
    at once, one lock and one hand-off), ``cancel``, ``poll`` (completed prefetches as
    ``(key, buffer)``), and ``release(buffer)`` (``release_all``) once it is done with a buffer.
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

    Staging buffers: ``settings.num_buffers`` buffers of ``buffer_nbytes`` (plus ALIGN bytes of
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
            Called once per key (its pieces are kept), on the thread of the first ``submit``.
        nbytes_of: ``key -> int``, the size of the key's buffer (also called once per key).
        settings: sizes, caps and switches (``golem.io.settings.SchedulerSettings``,
            checked when made).
        handles: open-file cache to use (default: one of its own, closed on close).
        throttle: emulate a slower device (``golem.io.storage.Throttle``); it is attached to
            the handles this scheduler opens. With ``handles``, attach it there instead
            (``FileHandles(throttle=...)``); passing a different one here is an error.
        allocate: ``nbytes -> uint8 array`` for the staging buffers (None: page-aligned
            host memory); see ``golem.io.staging``.
        read: a reader replacing the built-in one (tests: gated fakes),
            ``read(requests, *, handles, direct, retries) -> int`` with requests
            ``[(ranges, out, what)]``; it reads a whole batch as one piece.
        clock: ``() -> seconds`` for latencies and the device's busy time (tests: a fake).
    """

    def __init__(self, locate: Callable[[Hashable], Sequence[ByteRange]],
                 nbytes_of: Callable[[Hashable], int], settings: SchedulerSettings, *,
                 handles: Optional[FileHandles] = None, throttle: Optional[Throttle] = None,
                 allocate: Optional[Allocator] = None, read: Optional[Callable] = None,
                 clock: Callable[[], float] = time.perf_counter):
        if not isinstance(settings, SchedulerSettings):
            raise TypeError(f"IOScheduler needs a SchedulerSettings (golem.io.settings), got "
                            f"{type(settings).__name__}")
        if handles is not None and throttle is not None and handles.throttle is not throttle:
            raise ValueError("give the throttle to the FileHandles passed as handles "
                             "(FileHandles(throttle=...)), not to the scheduler")
        self.settings = settings
        self._own_handles = handles is None
        self.handles = handles if handles is not None else FileHandles(throttle=throttle)
        # ALIGN spare bytes in direct mode: a request's view starts at the file's alignment,
        # so the device writes the staging buffer itself (no bounce copy).
        buffers = StagingBuffers(settings.buffer_nbytes + (ALIGN if settings.direct else 0),
                                 settings.num_buffers, allocate=allocate)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # poll() waits here for publications
        self._polling = 0  # threads waiting in poll()
        self._dispatcher = Dispatcher(settings, locate, nbytes_of, buffers, clock,
                                      whole_batches=read is not None,
                                      on_publish=self._published)
        self._closing = threading.Event()  # set by close: wakes throttled readers
        reader = functools.partial(read_job, read=read, handles=self.handles,
                                   direct=settings.direct, retries=settings.retries,
                                   view_of=self._dispatcher.view, wake=self._closing)
        self._readers = ReaderPool(self._lock, self._dispatcher, reader,
                                   settings.parallelism + DEMAND_LANES)
        self._loop_thread = LoopThread(settings.use_uvloop)
        # demand reads from the page cache on the submitting thread: not through a replaced
        # reader (tests), nor for direct reads
        self._cached_read_s = 0.0
        self._cached_reads = (settings.cached_read_nbytes > 0 and read is None and not settings.direct
                              and can_read_cached(self.handles))
        self._closed = False
        self._started = False

    @property
    def max_pending(self) -> int:
        return self.settings.max_pending

    @property
    def _loop(self):
        """The event loop (tests run coroutines on it to let it settle)."""
        return self._loop_thread.loop

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> "IOScheduler":
        """Start the loop thread and the readers (``with`` does this)."""
        if self._started:
            return self
        if self._closed:
            raise SchedulerClosed("scheduler is closed")
        self._loop_thread.start()
        self._started = True
        try:
            self._readers.start()
        except BaseException:
            self.close()
            raise
        return self

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
            resolve = self._dispatcher.queue.clear()
            self._cond.notify_all()
            self._readers.stop()
        for req in resolve:
            if req.future is None:  # nobody waits on it
                continue
            if req.demand:
                fail_future(req.future, SchedulerClosed(
                    f"scheduler closed before the read of {describe(req.key)} completed"))
            else:
                cancel_future(req.future)
        deadline = time.monotonic() + self.settings.close_timeout_s
        stuck = False
        try:
            self._loop_thread.stop(deadline - time.monotonic())
            self._readers.join(deadline - time.monotonic())
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
        loop = self._loop_thread.thread
        return ([loop] if loop is not None else []) + list(self._readers.threads)

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
        return self.submit_many([(key, depth, score)])[0]

    def submit_many(self, requests: Sequence[Tuple[Hashable, int, float]], *, futures: bool = True
                    ) -> Optional[List[concurrent.futures.Future]]:
        """``submit(key, depth, score)`` for each ``(key, depth, score)``, in order, under
        one lock, with one activation: a layer's misses or its prefetches cost one hand-off,
        not one per expert (``submit`` is this with one request). A bad depth or score
        raises before anything is queued. ``futures=False`` (prefetches taken from ``poll``
        only): returns None, and a request nobody else asked a future of gets none (no
        condition made, set or cancelled for it); its read failing is then known only as a
        read not published."""
        dispatcher = self._dispatcher
        prepared = {}
        for key, depth, _ in requests:  # locate new keys outside the lock
            if depth < 0:
                raise ValueError(f"depth must be >= 0 (0 = demand), got {depth}")
            if key not in dispatcher.prepared:
                prepared[key] = dispatcher.prepare(key)
        scores = [float(score) for _, _, score in requests]
        want, futures, dropped, demand, fresh = futures, [], [], False, []
        with self._lock:
            self._check_open()
            dispatcher.stats.calls += 1
            by_key = dispatcher.queue.by_key
            for (key, depth, _), score in zip(requests, scores):
                known = prepared.get(key) or dispatcher.prepared[key]
                live = dispatcher.live(key) if key in by_key else None
                req = dispatcher.fresh(key, depth, score, known, want) if live is None else None
                if req is not None:
                    fresh.append(req)
                else:
                    req, gone = dispatcher.submit(key, depth, score, known, live, want)
                    dropped += gone
                futures.append(req.future)
                demand = demand or req.demand
            dispatcher.recorder.submitted([depth for _, depth, _ in requests])
            if fresh:
                dropped += dispatcher.start_fresh(fresh)
            kick = bool(requests) and self._after_submit(demand, bool(fresh))
        for other in dropped:
            cancel_future(other)
        self._activate_after(kick)
        return futures if want else None

    def submit_demands(self, keys: Sequence[Hashable]) -> List[concurrent.futures.Future]:
        """Demand reads of ``keys`` (``submit_many`` at depth 0). The first keys, up to
        ``settings.cached_read_nbytes``, are read on this thread when the page cache holds
        them (``read_cached_many``): their futures come back resolved, and the rest are submitted
        after them, in order (a caller taking results in order never waits on a read that
        waits for a buffer it holds)."""
        done = self._read_cached(self._pick_cached(keys)) if self._cached_reads else {}
        rest = [key for key in keys if key not in done]
        futures = dict(zip(rest, self.submit_many([(key, 0, 0.0) for key in rest]))) if rest else {}
        return [done[key] if key in done else futures[key] for key in keys]

    def take_cached_read_s(self) -> float:
        """Seconds this scheduler's callers spent reading from the page cache themselves since
        the last call (``submit_demands``): read time, not host bookkeeping."""
        seconds, self._cached_read_s = self._cached_read_s, 0.0
        return seconds

    def _pick_cached(self, keys: Sequence[Hashable]) -> list:
        """The first keys (none with a live request, ``cached_read_nbytes`` in all), each
        holding a buffer to try the page cache for: ``(key, buffer, shift, prepared)``."""
        dispatcher = self._dispatcher
        prepared = {key: dispatcher.prepared.get(key) or dispatcher.prepare(key) for key in keys}
        left, picked = self.settings.cached_read_nbytes, []
        with self._lock:
            self._check_open()
            dispatcher.stats.calls += 1
            buffers, by_key = dispatcher.buffers, dispatcher.queue.by_key
            for key in dict.fromkeys(keys):
                known = prepared[key]
                if known[1] > left or not buffers.free or (key in by_key and dispatcher.live(key) is not None):
                    break
                index = buffers.take()
                shift = buffers.shift_for(index, known[3]) if known[3] is not None else 0
                picked.append((key, index, shift, known))
                left -= known[1]
        return picked

    def _read_cached(self, picked: list) -> Dict[Hashable, concurrent.futures.Future]:
        """Read ``picked`` from the page cache (no lock held): a resolved future for each key
        read in full; the others' buffers go back."""
        if not picked:
            return {}
        dispatcher, done, missed = self._dispatcher, [], []
        start = time.perf_counter()
        views = [dispatcher.buffers.view(index, shift, known[1]) for _, index, shift, known in picked]
        got = read_cached_many([(known[0], view) for (_, _, _, known), view in zip(picked, views)],
                               handles=self.handles)
        for (key, index, shift, _), view, ok in zip(picked, views, got):
            (done if ok else missed).append((key, index, shift, view))
        self._cached_read_s += time.perf_counter() - start
        with self._lock:
            stats = dispatcher.stats
            stats.calls += 1
            dispatcher.recorder.submitted([0] * len(done))
            for key, index, shift, view in done:
                dispatcher.buffers.hand_out(index, shift)
                stats.cached_reads += 1
                stats.bytes_read += len(view)
                stats.useful_nbytes += len(view)
            for _, index, _, _ in missed:
                dispatcher.buffers.give_back(index)
        return {key: ResolvedFuture(view) for key, _, _, view in done}

    def _check_open(self) -> None:
        if self._closed or not self._started:
            raise SchedulerClosed("scheduler is closed" if self._closed else
                                  "scheduler is not started (use it in a with block)")

    def _after_submit(self, demand: bool, started: bool) -> bool:
        """Lock held: start a demand from here (no hop through the loop thread), waking
        readers for it and for the requests ``start_fresh`` started; for prefetches only,
        whether requests should be activated next (``_activate_after``)."""
        dispatcher = self._dispatcher
        if demand and dispatcher.activate_ready():
            started = True
        if started:
            self._readers.wake_first(dispatcher.jobs_waiting)
        return not demand and dispatcher.has_idle_reader()

    def cancel(self, key: Hashable) -> bool:
        """Do not publish ``key``'s prefetch; True if there was one to cancel.

        A queued prefetch is dropped; a running one finishes (its bytes count until then)
        and its buffer goes back to the pool. Demand reads and prefetches already published
        (waiting in ``poll``) are not cancelled.
        """
        return self.cancel_many([key])[0]

    def cancel_many(self, keys: Sequence[Hashable], *, queued_only: bool = False) -> List[bool]:
        """``cancel`` each of ``keys`` under one lock (``queued_only``: only the prefetches
        still queued, none already being read); whether each was cancelled. No keys: no call."""
        if not keys:
            return []
        dispatcher, cancelled, futures = self._dispatcher, [], []
        with self._lock:
            dispatcher.stats.calls += 1
            for key in keys:
                req = dispatcher.queue.get(key)
                if req is not None and (not queued_only or req.state == QUEUED):
                    req = dispatcher.cancel(key)
                else:
                    req = None
                cancelled.append(req is not None)
                if req is not None and req.future is not None:
                    futures.append(req.future)
            kick = any(cancelled) and dispatcher.has_idle_reader()
        for future in futures:
            cancel_future(future)
        self._activate_after(kick)
        return cancelled

    def poll(self, timeout: Optional[float] = 0.0) -> List[Tuple[Hashable, np.ndarray]]:
        """Completed prefetches as ``(key, buffer)``; the caller owns each buffer until ``release``.

        ``timeout=0`` returns at once; a positive timeout or None waits for at least one
        (None: in slices of 0.1 s, so that Ctrl-C reaches a waiting main thread).
        """
        dispatcher = self._dispatcher
        with self._lock:  # (``_cond``'s: a plain lock's context, no Python call)
            dispatcher.stats.calls += 1
            if timeout != 0 and not dispatcher.published:
                ready = lambda: dispatcher.published or self._closed
                self._polling += 1
                try:
                    if timeout is None:
                        while not self._cond.wait_for(ready, 0.1):
                            pass
                    else:
                        self._cond.wait_for(ready, timeout)
                finally:
                    self._polling -= 1
            return dispatcher.take_published()

    def _published(self) -> None:
        """Lock held: a prefetch was published; wake the threads waiting in ``poll``, if any
        (the engine polls without waiting: a notification costs a reader a dozen calls)."""
        if self._polling:
            self._cond.notify_all()

    def release(self, buffer: np.ndarray) -> None:
        """Give a staging buffer (from ``poll`` or a future) back to the pool; the caller
        must be done with it, including any asynchronous copy still reading it."""
        self.release_all([buffer])

    def release_all(self, buffers: Sequence[np.ndarray]) -> None:
        """``release`` each of ``buffers`` under one lock, with at most one wake of the loop."""
        if not buffers:
            return
        with self._lock:
            self._dispatcher.stats.calls += 1
            self._dispatcher.release_all(buffers)
            kick = self._dispatcher.has_idle_reader()
        self._activate_after(kick)

    def abandon(self, futures: Sequence[concurrent.futures.Future]) -> None:
        """Nobody will take these demands' results: hand each buffer back as it arrives."""
        for future in futures:
            future.add_done_callback(self._release_result)

    def _release_result(self, future: concurrent.futures.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            try:
                self.release(future.result())
            except Exception:  # closed meanwhile: the pool goes with it
                pass

    def pending(self, key: Hashable) -> Optional[str]:
        """``"queued"``, ``"running"``, ``"published"`` or None for a key nobody asked for."""
        return self.pending_many([key])[0]

    def pending_many(self, keys: Sequence[Hashable]) -> List[Optional[str]]:
        """``pending`` of each of ``keys``, under one lock. No keys: no call."""
        if not keys:
            return []
        with self._lock:
            self._dispatcher.stats.calls += 1
            get = self._dispatcher.queue.get
            return [None if req is None else req.state for req in map(get, keys)]

    def demands_waiting(self) -> bool:
        """Whether a demand read waits for a staging buffer. Read without the lock: for the
        thread that submits demands, once its own are queued this only turns False."""
        queue = self._dispatcher.queue
        return queue.queued > queue.prefetch_queued

    def handoffs(self) -> Tuple[int, int, int]:
        """``(calls, loop_wakes, reader_wakes)`` so far (see ``SchedulerStatistics``), read
        without the lock: cheap enough to take around every layer."""
        stats = self._dispatcher.stats
        return stats.calls, stats.loop_wakes, stats.reader_wakes

    def statistics(self) -> SchedulerStatistics:
        """A snapshot of the counters and latency percentiles."""
        with self._lock:
            snapshot = self._dispatcher.statistics()
        return StatisticsRecorder.finish(snapshot)

    def _activate_after(self, kick: bool) -> None:
        """Outside the lock, after a caller's event that may let a prefetch start: activate
        requests here, or (``activate_on_loop``) have the loop do it (a hand-off, counted)."""
        if not kick:
            return
        if self.settings.activate_on_loop:
            self._dispatcher.stats.loop_wakes += 1
            self._loop_thread.call_soon(self._pump)
        else:
            self._pump()

    def _pump(self) -> None:
        """After a caller's event (submit, cancel, release), on its thread or the loop's:
        activate requests."""
        with self._lock:
            if not self._closed and self._dispatcher.activate_ready():
                self._readers.wake_first(self._dispatcher.jobs_waiting)


# Older names, kept for callers and tests that import them from here.
_cancel = cancel_future
_set_exception = fail_future
