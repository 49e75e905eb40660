"""The scheduler's reader pool: a fixed set of threads that take jobs and read them.

Owns the reader threads, their sleeping and waking (one condition on the scheduler's
lock, woken no more often than there are jobs; a caller wakes one, each reader the next
ones), the reading of each job outside the lock and the resolving of the futures a finished
read settles. Knows nothing of priorities, caps or files: the dispatcher says which job is
next and what a returned one means; the ``read`` callable it is given does the reading
(``read_jobs.read_job``).
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
        self._idle = threading.Condition(lock)  # idle readers wait here for jobs
        self._sleeping = 0  # readers waiting on _idle
        self._waking = 0  # of those, notified and not yet running
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
        wanted = min(jobs, self._sleeping) - self._waking
        if wanted > 0:
            self._waking += wanted
            self.dispatcher.stats.reader_wakes += wanted
            self._idle.notify(wanted)

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
        self._idle.notify_all()

    def join(self, timeout_s: float) -> None:
        for thread in self.threads:
            thread.join(max(0.0, timeout_s))

    def _work(self) -> None:
        """Reader thread: take jobs and read them until the pool stops."""
        while True:
            with self._lock:
                job = self._next()
                if job is None:
                    return
            batch, runs = job
            nbytes, error = self.read(batch, runs)
            self._returned(batch, runs, nbytes, error)

    def _next(self) -> Optional[Tuple[Batch, list]]:
        """Lock held: the next job, sleeping until there is one; None once stopped."""
        dispatcher = self.dispatcher
        activated = False
        while True:
            if self._stopped:
                return None
            job, activated_now = dispatcher.next_job()
            activated = activated or activated_now
            if job is not None:
                break
            self._sleeping += 1
            self._idle.wait()
            self._sleeping -= 1
            if self._waking:
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
