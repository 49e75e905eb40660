"""What the I/O scheduler did: counters, latency samples and the device's busy time.

Owns ``SchedulerStatistics`` (the snapshot callers read) and the recorder the scheduler
updates under its lock. Knows nothing of threads, files or queues: it is told what
happened and when, by a clock it is given.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Optional, Sequence

import numpy as np

SAMPLES = 8192  # latency samples kept per kind (the most recent)


@dataclass
class SchedulerStatistics:
    """What the scheduler did since it started.

    ``requests`` counts submits by class (``"demand"``, ``"prefetch"``), ``by_depth`` by depth;
    ``reads`` counts batches (one or more coalesced requests), ``pieces`` their ``preadv`` calls;
    ``useful_nbytes`` were published or handed to a demand, ``cancelled_nbytes`` were read but
    not published (cancelled while running); ``cached_reads`` demand reads served on the
    submitting thread from the page cache (counted in ``requests``, ``bytes_read`` and
    ``useful_nbytes``, not in ``reads``). Latencies in seconds; ``gb_per_s`` is bytes read
    over the time at least one read was running. Hand-offs between threads, the host cost
    that does not show in a CPU profile of one thread: ``calls`` counts the caller's calls
    that took the scheduler's lock (submit, cancel, poll, release, pending), ``loop_wakes``
    the wake-ups of the event loop they asked for, ``reader_wakes`` the reader threads woken.
    """

    requests: Dict[str, int] = field(default_factory=dict)
    by_depth: Dict[int, int] = field(default_factory=dict)
    deduped: int = 0
    upgraded: int = 0
    cancelled: int = 0
    dropped: int = 0
    failed: int = 0
    reads: int = 0
    cached_reads: int = 0
    pieces: int = 0
    coalesced_reads: int = 0
    bytes_read: int = 0
    useful_nbytes: int = 0
    cancelled_nbytes: int = 0
    calls: int = 0
    loop_wakes: int = 0
    reader_wakes: int = 0
    queue_wait_p50_s: Dict[str, float] = field(default_factory=dict)
    queue_wait_p99_s: Dict[str, float] = field(default_factory=dict)
    read_latency_p50_s: float = 0.0
    read_latency_p99_s: float = 0.0
    demand_latency_p50_s: float = 0.0
    demand_latency_p99_s: float = 0.0
    demand_start_p50_s: float = 0.0  # a demand's submit to a reader taking its first piece
    demand_start_p99_s: float = 0.0
    busy_s: float = 0.0
    gb_per_s: float = 0.0
    queued: int = 0
    running: int = 0
    published: int = 0
    free_buffers: int = 0
    speculative_nbytes_in_flight: int = 0


def percentile(samples, q: float) -> float:
    return float(np.percentile(np.fromiter(samples, dtype=np.float64), q)) if samples else 0.0


class StatisticsRecorder:
    """The scheduler's running counters. Not thread-safe: call with the scheduler's lock held
    (``snapshot`` too; it returns a copy whose percentiles are computed by ``finish``).

    Args:
        clock: ``() -> seconds``, the scheduler's clock.
    """

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.counts = SchedulerStatistics()
        self.queue_waits: Dict[str, Deque[float]] = {"demand": deque(maxlen=SAMPLES),
                                                     "prefetch": deque(maxlen=SAMPLES)}
        self.read_latencies: Deque[float] = deque(maxlen=SAMPLES)
        self.demand_latencies: Deque[float] = deque(maxlen=SAMPLES)
        self.demand_starts: Deque[float] = deque(maxlen=SAMPLES)
        self._busy_since: Optional[float] = None

    def submitted(self, depths: Sequence[int]) -> None:
        """Requests submitted at ``depths`` (0: demand), counted by class and by depth."""
        requests, by_depth = self.counts.requests, self.counts.by_depth
        demands = 0
        for depth in depths:
            by_depth[depth] = by_depth.get(depth, 0) + 1
            demands += not depth
        if demands:
            requests["demand"] = requests.get("demand", 0) + demands
        if demands < len(depths):
            requests["prefetch"] = requests.get("prefetch", 0) + len(depths) - demands

    def piece_started(self) -> None:
        """A reader starts a piece: the device is busy from now if it was idle."""
        if self._busy_since is None:
            self._busy_since = self.clock()

    def pieces_returned(self, count: int, nbytes: int, running_after: int) -> None:
        counts = self.counts
        counts.pieces += count
        counts.bytes_read += nbytes
        if running_after == 0 and self._busy_since is not None:
            counts.busy_s += self.clock() - self._busy_since
            self._busy_since = None

    def throughput_bytes_per_s(self) -> Optional[float]:
        """Bytes per second of device busy time measured so far (None before any)."""
        busy = self.counts.busy_s
        return self.counts.bytes_read / busy if busy > 0 else None

    def snapshot(self) -> tuple:
        """A copy of the counters and samples (lock held): hand it to ``finish``."""
        s = SchedulerStatistics(**{k: (dict(v) if isinstance(v, dict) else v)
                                   for k, v in self.counts.__dict__.items()})
        busy = s.busy_s
        if self._busy_since is not None:
            busy += self.clock() - self._busy_since
        s.busy_s = busy
        waits = {cls: list(v) for cls, v in self.queue_waits.items()}
        return s, waits, list(self.read_latencies), list(self.demand_latencies), list(self.demand_starts)

    @staticmethod
    def finish(snapshot: tuple) -> SchedulerStatistics:
        """Rates and percentiles of a snapshot (no lock needed)."""
        s, waits, reads, demands, starts = snapshot
        s.gb_per_s = s.bytes_read / s.busy_s / 1e9 if s.busy_s > 0 else 0.0
        s.queue_wait_p50_s = {c: percentile(w, 50) for c, w in waits.items()}
        s.queue_wait_p99_s = {c: percentile(w, 99) for c, w in waits.items()}
        s.read_latency_p50_s = percentile(reads, 50)
        s.read_latency_p99_s = percentile(reads, 99)
        s.demand_latency_p50_s = percentile(demands, 50)
        s.demand_latency_p99_s = percentile(demands, 99)
        s.demand_start_p50_s = percentile(starts, 50)
        s.demand_start_p99_s = percentile(starts, 99)
        return s
