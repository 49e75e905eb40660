"""How read results reach their caller: futures set, failed and cancelled safely, and waited on
interruptibly.

Owns the one error a closed scheduler raises, the helpers that resolve a
``concurrent.futures.Future`` from any thread without racing its other resolvers, the future
born resolved (``ResolvedFuture``), and ``wait_result``, the wait a main thread uses so that
Ctrl-C still arrives. Knows nothing of files, buffers or queues.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import weakref
from typing import Optional

# The longest a waiting thread goes without running Python bytecode. CPython runs signal
# handlers (KeyboardInterrupt) only between bytecodes of the main thread, and a SIGINT may be
# delivered to a reader thread, which does not wake the main thread's lock wait: an untimed
# ``future.result()`` can therefore hold Ctrl-C back for as long as the read takes.
WAIT_SLICE_S = 0.1


class SchedulerClosed(RuntimeError):
    """The scheduler was closed before the request completed."""


class ResolvedFuture(concurrent.futures.Future):
    """A future born with its result: what a read the caller's own thread did returns where the
    others return futures. Nothing will ever change it, so it has no lock of its own (the
    ``threading.Condition`` a ``Future`` makes is most of its cost): ``result`` returns at
    once, ``cancel`` is False, a done-callback runs at once. The one ``Condition`` all of them
    share is there for ``concurrent.futures.wait``, which takes each future's."""

    _condition = threading.Condition()

    def __init__(self, value) -> None:  # no Future.__init__: no Condition
        self._state = concurrent.futures._base.FINISHED
        self._result = value
        self._exception = None
        self._waiters: list = []
        self._done_callbacks: list = []

    def result(self, timeout: Optional[float] = None):
        return self._result

    def exception(self, timeout: Optional[float] = None):
        return None

    def done(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def cancel(self) -> bool:
        return False


def wait_result(future: concurrent.futures.Future, timeout_s: Optional[float] = None, *,
                slice_s: float = WAIT_SLICE_S):
    """``future.result()``, waking every ``slice_s`` so that signals reach the caller.

    Same result, exceptions and cancellation as ``future.result(timeout_s)``
    (``concurrent.futures.TimeoutError`` after ``timeout_s``; None waits for ever), but a
    KeyboardInterrupt raised by Ctrl-C on the main thread surfaces within ``slice_s``
    whatever the storage does. Any thread may call it.
    """
    if not slice_s > 0:
        raise ValueError(f"slice_s must be > 0, got {slice_s}")
    if timeout_s is None:
        while True:
            try:
                return future.result(slice_s)
            except concurrent.futures.TimeoutError:
                continue
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            return future.result(min(slice_s, max(left, 0.0)))
        except concurrent.futures.TimeoutError:
            if left <= slice_s:
                raise


_notified: "weakref.WeakSet[concurrent.futures.Future]" = weakref.WeakSet()
_notified_lock = threading.Lock()


def cancel_future(future: concurrent.futures.Future) -> None:
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


def fail_future(future: concurrent.futures.Future, error: BaseException) -> None:
    """Set ``error`` unless the future is already resolved (by a cancel, or a close): setting
    a resolved future raises, under the future's own lock, so no check can race it."""
    try:
        future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


def resolve_future(future: concurrent.futures.Future, value) -> None:
    """Set ``value`` unless the future is already resolved (as ``fail_future``)."""
    try:
        future.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass
