"""The scheduler's reader pool: a fixed set of threads that take jobs and read them.

Owns the reader threads, their sleeping and waking (each idle reader blocks on a lock of
its own, released by whoever wakes it: two C calls, where a ``threading.Condition`` runs a
dozen Python ones on each side; woken no more often than there are jobs; a caller wakes one,
each reader the next ones), the reading of each job outside the lock and the resolving of
the futures a finished read settles. Knows nothing of priorities, caps or files: the
dispatcher says which job is next and what a returned one means; the ``read`` callable it is
given does the reading (``read_jobs.read_job``).
"""

from __future__ import annotations

import threading
from typing import Callable, List, Optional, Tuple

from golem.io.dispatcher import Dispatcher
from golem.io.futures import fail_future, resolve_future
from golem.io.read_jobs import Batch

ReadJob = Callable[[Batch, list], Tuple[int, Optional[BaseException]]]


class ReaderPool:
    """``count`` reader threads serving ``dispatcher``'s jobs.

    Threads: ``start`` and ``join`` from any thread; ``wake`` and ``stop`` with ``lock``
    held. A reader runs each job's read with the lock released and resolves futures after
    releasing it (their callbacks may call back into the scheduler).

    Args:
        lock: the scheduler's lock, which guards ``dispatcher``.
        dispatcher: hands out jobs and accounts for returned ones.
        read: ``(batch, runs) -> (bytes read, error or None)``; never raises.
        count: reader threads.
    """

    def __init__(self, lock: threading.Lock, dispatcher: Dispatcher, read: ReadJob, count: int):
        self.dispatcher = dispatcher
        self.read = read
        self.count = count
        self.threads: List[threading.Thread] = []
        self._lock = lock
        self._sleepers: List[threading.Lock] = []  # idle readers' gates, held: each blocks on its own
        self._waking = 0  # readers whose gate was let go, not yet running
        self._stopped = False

    def start(self) -> None:
        for i in range(self.count):
            thread = threading.Thread(target=self._work, name=f"golem-io-read-{i}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def wake(self, jobs: int) -> None:
        """Lock held: wake enough sleeping readers for ``jobs`` waiting jobs, counting those
        already woken and on their way: each wake-up costs a thread switch or two, and a
        reader woken for nothing costs as much as one that reads."""
        sleepers = self._sleepers
        wanted = min(jobs, len(sleepers) + self._waking) - self._waking
        if wanted > 0:
            self._waking += wanted
            self.dispatcher.stats.reader_wakes += wanted
            for _ in range(wanted):
                sleepers.pop().release()

    def wake_first(self, jobs: int) -> None:
        """Lock held, on a caller's thread (a submit, a release): wake one reader for
        ``jobs`` waiting jobs, unless one is on its way already; each reader that takes a job
        wakes those the jobs still waiting need (``_next``). A wake is a system call that can
        cost the caller its core: a layer's misses then cost the engine one, not one each."""
        if jobs > 0 and not self._waking:
            self.wake(1)

    def stop(self) -> None:
        """Lock held: every reader leaves once its current read returns."""
        self._stopped = True
        self._waking += len(self._sleepers)
        for gate in self._sleepers:
            gate.release()
        self._sleepers.clear()

    def join(self, timeout_s: float) -> None:
        for thread in self.threads:
            thread.join(max(0.0, timeout_s))

    def _work(self) -> None:
        """Reader thread: take jobs and read them until the pool stops."""
        gate = threading.Lock()  # unlocked while the reader runs; held while it sleeps
        while True:
            with self._lock:
                job = self._next(gate)
                if job is None:
                    return
            batch, runs = job
            nbytes, error = self.read(batch, runs)
            self._returned(batch, runs, nbytes, error)

    def _next(self, gate: threading.Lock) -> Optional[Tuple[Batch, list]]:
        """Lock held: the next job, sleeping on ``gate`` (the reader's own) until there is
        one; None once stopped. A waker lets the gate go under the lock, after this reader
        filed it and before or while it blocks: no wake is lost."""
        dispatcher = self.dispatcher
        activated = False
        while True:
            if self._stopped:
                return None
            job, activated_now = dispatcher.next_job()
            activated = activated or activated_now
            if job is not None:
                break
            gate.acquire()  # free while running: taken at once, so the next acquire blocks
            self._sleepers.append(gate)
            self._lock.release()
            try:
                gate.acquire()  # until ``wake`` or ``stop`` lets it go
                gate.release()
            finally:
                self._lock.acquire()
            self._waking -= 1
        waiting = dispatcher.jobs_waiting
        if waiting:  # the rest: what this thread activated, or a caller queued
            self.wake(waiting)
        return job

    def _returned(self, batch: Batch, runs: list, nbytes: int,
                  error: Optional[BaseException]) -> None:
        with self._lock:
            resolve = self.dispatcher.returned(batch, runs, nbytes, error)
            waiting = self.dispatcher.jobs_waiting
            if waiting > 1:  # this thread takes one; a demand's end frees more
                self.wake(waiting - 1)
        for future, outcome in resolve:
            if isinstance(outcome, BaseException):
                fail_future(future, outcome)
            else:
                resolve_future(future, outcome)
