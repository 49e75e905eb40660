"""The scheduler's event loop thread: an asyncio loop (uvloop when installed) of its own.

Owns the thread, the loop's creation, its stop and its closing. Knows nothing of what runs
on it: the scheduler hands it callables (``call_soon``). A library must not choose its
host's loop, so this loop is private to the thread it runs on.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, Optional


class LoopThread:
    """An event loop running on a daemon thread until ``stop``.

    Threads: every method may be called from any thread.

    Args:
        use_uvloop: run uvloop's loop when uvloop is installed (else asyncio's).
        name: the thread's name.
    """

    def __init__(self, use_uvloop: bool = True, name: str = "golem-io-loop"):
        self.use_uvloop = use_uvloop
        self.name = name
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the thread; returns once the loop runs."""
        self.loop = self._new_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name=self.name,
                                       daemon=True)
        self.thread.start()
        ready.wait()

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        if self.use_uvloop:
            try:
                import uvloop
                return uvloop.new_event_loop()
            except ImportError:
                pass
        return asyncio.new_event_loop()

    def _run(self, ready: threading.Event) -> None:
        loop = self.loop
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

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop thread soon; nothing once the loop is closed."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(callback)
            except RuntimeError:  # closed between the check and the call
                pass

    def stop(self, timeout_s: float) -> None:
        """Stop the loop and wait up to ``timeout_s`` for its thread."""
        if self.thread is not None and self.thread.is_alive():
            self.call_soon(self.loop.stop)
            self.thread.join(max(0.0, timeout_s))
