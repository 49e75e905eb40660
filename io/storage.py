"""Storage emulator: make a fast disk (or the page cache) behave like a slower SSD.

Owns a token bucket (bandwidth in GB/s, a fixed latency per read) that readers consult
around each read, so benchmarks on a fast machine reproduce the ratio of compute to I/O of
a slower device, and the parsing of its command-line spelling. It reads nothing itself and
knows nothing of experts or schedulers; it is attached one way, ``FileHandles(throttle=...)``
(``IOScheduler`` and the engine's ``DiskReader`` pass ``throttle=`` on to their handles).
Its waits are cut into slices of at most ``WAIT_SLICE_S`` (``WAKE_SLICE_S`` with a ``wake``
event) and end within one slice once the reader's ``wake`` event is set, so a closing scheduler
never waits for an emulated slow device.
"""

from __future__ import annotations

import math
import re
import threading
import time
from typing import Callable, Optional

WAIT_SLICE_S = 0.1  # longest single sleep: signals and wake-ups are seen at least this often
# With a wake event, a sleep lasts at most this long and the event is checked around it: a
# ``time.sleep`` and a flag where ``Event.wait`` runs a dozen Python calls on the reader (under
# the interpreter lock the engine's thread needs), once per emulated read.
WAKE_SLICE_S = 0.01


def _sleep(seconds: float, wake: Optional[threading.Event]) -> None:
    if wake is None:
        time.sleep(seconds)
    elif not wake.is_set():
        time.sleep(min(seconds, WAKE_SLICE_S))


class FakeClock:
    """A clock for tests: ``sleep`` advances ``now`` instantly (thread-safe); it has the
    ``(seconds, wake=None)`` signature ``Throttle`` calls.

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

    def sleep(self, seconds: float, wake: Optional[threading.Event] = None) -> None:
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
    reader waits until ``max(real read time, emulated time)``. Any thread may call every
    method; one throttle shared by several ``FileHandles`` is one device.

    Args:
        gb_per_s: emulated bandwidth in GB/s (1e9 bytes); None or 0 = unlimited.
        latency_s: emulated latency added to every read.
        burst_nbytes: bytes an idle device may deliver at once.
        clock: ``() -> seconds``, monotonic (``FakeClock.now`` in tests).
        sleep: ``(seconds, wake) -> None``; returns after ``seconds`` or as soon as the
            ``threading.Event`` ``wake`` (may be None) is set (``FakeClock.sleep`` in tests).
    """

    def __init__(self, gb_per_s: Optional[float], latency_s: float = 0.0, *,
                 burst_nbytes: int = 0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float, Optional[threading.Event]], None] = _sleep):
        if gb_per_s is not None and not (math.isfinite(gb_per_s) and gb_per_s >= 0):
            raise ValueError(f"throttle bandwidth must be a finite number of GB/s >= 0, "
                             f"got {gb_per_s}")
        if not (math.isfinite(latency_s) and latency_s >= 0):
            raise ValueError(f"throttle latency must be a finite number of seconds >= 0, "
                             f"got {latency_s}")
        if burst_nbytes < 0:
            raise ValueError(f"throttle burst must be >= 0 bytes, got {burst_nbytes}")
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

    def wait_until(self, deadline: float, wake: Optional[threading.Event] = None) -> float:
        """Sleep until ``deadline`` (clock time), in slices of at most ``WAIT_SLICE_S``, or
        until ``wake`` is set; return the seconds slept."""
        start = self.clock()
        if deadline <= start:
            return 0.0
        now = start
        while now < deadline and not (wake is not None and wake.is_set()):
            self.sleep(min(deadline - now, WAIT_SLICE_S), wake)
            now = self.clock()
        slept = min(now, deadline) - start
        with self._lock:
            self.waited_s += slept
        return slept

    def acquire(self, nbytes: int, wake: Optional[threading.Event] = None) -> float:
        """Reserve and wait in one call (for readers that have nothing to overlap)."""
        return self.wait_until(self.reserve(nbytes), wake)

    def __repr__(self) -> str:
        bandwidth = f"{self.gb_per_s:g} GB/s" if self.gb_per_s else "unlimited"
        return f"Throttle({bandwidth}, latency {self.latency_s * 1e6:g} us)"


_LATENCY = re.compile(r"^\s*([0-9.]+(?:e-?[0-9]+)?)\s*(s|ms|us|µs)?\s*$")


def parse_throttle(spec: str) -> Throttle:
    """``"GB_PER_S[,LATENCY]"`` -> Throttle, e.g. ``"2.5"``, ``"2.5,80us"``, ``"0.5,1ms"``.

    The bandwidth must be a finite number > 0 (``1e-5``, 10 kB/s, is valid but slow), the
    latency finite; anything else is a ValueError naming the spec."""
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
        if not (math.isfinite(gb_per_s) and gb_per_s > 0 and math.isfinite(latency_s)):
            raise ValueError
    except ValueError:
        raise ValueError(f"bad storage emulation {spec!r}: expected GB_PER_S[,LATENCY] with a "
                         f"finite bandwidth > 0 and a finite latency, e.g. '2.5' or "
                         f"'2.5,80us'") from None
    return Throttle(gb_per_s, latency_s)
