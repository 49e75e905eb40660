"""Storage emulator: make a fast disk (or the page cache) behave like a slower SSD.

Owns a token bucket (bandwidth in GB/s, a fixed latency per read) that readers consult
before each read, so benchmarks on a fast machine reproduce the ratio of compute to I/O of
a slower device. It reads nothing itself and knows nothing of experts or schedulers; plug
it in with ``Throttle.wrap`` (a ``preadv`` for ``FileHandles``) or call ``acquire``.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Callable, Optional, Sequence


class FakeClock:
    """A clock for tests: ``sleep`` advances ``now`` instantly (thread-safe).

    Args:
        start_s: initial time.
    """

    def __init__(self, start_s: float = 0.0):
        self._now = start_s
        self._lock = threading.Lock()
        self.sleeps: list = []

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            if seconds > 0:
                self._now += seconds

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


class Throttle:
    """Token bucket shared by every reader of one emulated device.

    A read of ``nbytes`` reserves ``nbytes / bandwidth`` of the device's transfer time
    after the reads already reserved (so concurrent readers share the bandwidth), then ends
    ``latency_s`` later (latency overlaps across concurrent reads, as on an SSD with a deep
    queue). After an idle period up to ``burst_nbytes`` may pass without waiting. The
    reader waits until ``max(real read time, emulated time)``.

    Args:
        gb_per_s: emulated bandwidth in GB/s (1e9 bytes); None or 0 = unlimited.
        latency_s: emulated latency added to every read.
        burst_nbytes: bytes an idle device may deliver at once.
        clock: ``() -> seconds``, monotonic (``FakeClock.now`` in tests).
        sleep: ``(seconds) -> None`` (``FakeClock.sleep`` in tests).
    """

    def __init__(self, gb_per_s: Optional[float], latency_s: float = 0.0, *,
                 burst_nbytes: int = 0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if gb_per_s is not None and gb_per_s < 0:
            raise ValueError(f"throttle bandwidth must be positive, got {gb_per_s} GB/s")
        if latency_s < 0:
            raise ValueError(f"throttle latency must be >= 0, got {latency_s} s")
        self.gb_per_s = gb_per_s or None
        self.latency_s = latency_s
        self.burst_nbytes = burst_nbytes
        self.clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()
        self._free_at = clock()
        self.reads = 0
        self.nbytes = 0
        self.waited_s = 0.0

    def reserve(self, nbytes: int) -> float:
        """Book ``nbytes`` on the device; return the clock time at which the read may end."""
        with self._lock:
            now = self.clock()
            self.reads += 1
            self.nbytes += nbytes
            if self.gb_per_s is None:
                return now + self.latency_s
            rate = self.gb_per_s * 1e9
            start = max(self._free_at, now - self.burst_nbytes / rate)
            self._free_at = start + nbytes / rate
            return max(now, self._free_at) + self.latency_s

    def wait_until(self, deadline: float) -> float:
        """Sleep until ``deadline`` (clock time); return the seconds slept."""
        delay = deadline - self.clock()
        if delay <= 0:
            return 0.0
        self.sleep(delay)
        with self._lock:
            self.waited_s += delay
        return delay

    def acquire(self, nbytes: int) -> float:
        """Reserve and wait in one call (for readers that have nothing to overlap)."""
        return self.wait_until(self.reserve(nbytes))

    def wrap(self, preadv: Callable[[int, Sequence[memoryview], int], int]):
        """An ``os.preadv``-compatible function throttled by this bucket (for ``FileHandles``)."""

        def throttled_preadv(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
            deadline = self.reserve(sum(len(b) for b in buffers))
            got = preadv(fd, buffers, offset)
            self.wait_until(deadline)
            return got

        throttled_preadv.throttle = self
        return throttled_preadv

    def __repr__(self) -> str:
        bandwidth = f"{self.gb_per_s:g} GB/s" if self.gb_per_s else "unlimited"
        return f"Throttle({bandwidth}, latency {self.latency_s * 1e6:g} us)"


_LATENCY = re.compile(r"^\s*([0-9.]+(?:e-?[0-9]+)?)\s*(s|ms|us|µs)?\s*$")


def parse_throttle(spec: str) -> Throttle:
    """``"GB_PER_S[,LATENCY]"`` -> Throttle, e.g. ``"2.5"``, ``"2.5,80us"``, ``"0.5,1ms"``."""
    parts = [p.strip() for p in spec.split(",")]
    try:
        if len(parts) > 2:
            raise ValueError
        gb_per_s = float(parts[0].lower().removesuffix("gb/s").strip())
        latency_s = 0.0
        if len(parts) == 2:
            match = _LATENCY.match(parts[1])
            if not match:
                raise ValueError
            scale = {"s": 1.0, None: 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}[match.group(2)]
            latency_s = float(match.group(1)) * scale
        if gb_per_s <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"bad storage emulation {spec!r}: expected GB_PER_S[,LATENCY], "
                         f"e.g. '2.5' or '2.5,80us'") from None
    return Throttle(gb_per_s, latency_s)
