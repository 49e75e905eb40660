"""Host time of the decode engine, split by phase: wall time and the engine thread's CPU time.

Owns the phase names and the lap clock that charges the time since its last lap to one
phase, so the phases of a layer add up to the layer's whole host time by construction.
Knows nothing of pools, reads or models: the engine says where a phase ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Set

# In the order a layer with misses meets them.
PHASES = (
    "predict",   # the predictor's lazy proposals and its observation of the true routing
    "sync",      # the layer's one host sync (mx.eval of ids and lazy predictor outputs; with an
                 # early launch, also the launch of those arrays that precedes it)
    "ids",       # reading the ids back, the trace, the miss check
    "pool",      # slot table and eviction policy: hits, claims, assignments, readers
    "install",   # installing prefetches that have landed (claims; their writes are "write")
    "issue",     # choosing, cancelling and submitting prefetch reads
    "request",   # demand reads: submitting, taking results, handing buffers back
    "graph",     # building the expert computation (ids to slots, gather, reorder)
    "launch",    # starting the experts' computation: before the sync (early launch), or the
                 # resident ones' while misses load
    "wait",      # blocked on reads, or reading from the page cache on the engine's thread
    "write",     # putting experts into slots (the upload)
)
# What "engine host time" leaves out: device work and I/O the engine only waits for.
EXCLUDED = ("sync", "wait", "write")
# Moments of a layer after its sync that the host holds back, counted apart from the phases:
# the first launch of its experts (until then a device that computes apart from the host has
# nothing of the layer to do; a launch before the sync counts 0) and its first demand read
# queued (until then the storage has none of the layer's misses to read).
MOMENTS = ("launch", "request")


@dataclass
class PhaseTimes:
    """Seconds per phase (``PHASES``) while decoding, in layers that are not fully resident.

    ``wall_s`` is elapsed time, ``cpu_s`` the engine thread's CPU time
    (``time.thread_time``): on a busy machine, wall time also holds time the thread spent
    descheduled, CPU time does not. ``layers`` counts the layers timed; ``reached`` and
    ``after_sync_s``, how many of them reached each of ``MOMENTS`` and how long after their
    sync (part of the phases' time, counted apart).
    """

    wall_s: Dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    cpu_s: Dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    layers: int = 0
    reached: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(MOMENTS, 0))  # layers, per moment
    after_sync_s: Dict[str, float] = field(default_factory=lambda: dict.fromkeys(MOMENTS, 0.0))

    def after_sync_us(self, moment: str) -> float:
        """Mean wall microseconds from a partial layer's sync to ``moment`` (``MOMENTS``),
        over the layers that reached it (NaN: none did)."""
        n = self.reached[moment]
        return 1e6 * self.after_sync_s[moment] / n if n else float("nan")

    def engine_s(self, cpu: bool = False) -> float:
        """Engine host seconds: every phase but the sync, the read waits and the writes."""
        src = self.cpu_s if cpu else self.wall_s
        return sum(v for k, v in src.items() if k not in EXCLUDED)

    def total_s(self, cpu: bool = False) -> float:
        return sum((self.cpu_s if cpu else self.wall_s).values())

    def per_layer_us(self, cpu: bool = False) -> Dict[str, float]:
        src = self.cpu_s if cpu else self.wall_s
        n = max(self.layers, 1)
        return {k: 1e6 * v / n for k, v in src.items()}


class PhaseClock:
    """Charges elapsed time to phases: ``start()``, then ``lap(phase)`` at each phase's end.

    Off (every call a no-op) until ``start``; ``stop(phase)`` charges the last stretch and
    turns it off. Engine thread only.

    A lap costs what its clocks cost, on the per-token path, dozens of times per layer: the
    wall clock is cheap (~0.25 us here), the thread's CPU clock is a system call (~0.6 us,
    more after a layer's compute has run on the same cores), so it is read only when asked
    for (profiling); without it ``cpu_s`` stays zero.

    Args:
        times: where the seconds go.
        clock: wall clock.
        cpu_clock: the calling thread's CPU clock, or None: wall time only.
    """

    def __init__(self, times: PhaseTimes, clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Optional[Callable[[], float]] = None):
        self.times = times
        self.clock = clock
        self.cpu_clock = cpu_clock
        self.on = False
        self._t = self._c = 0.0
        self._synced: Optional[float] = None  # when the layer's sync ended
        self._seen: Set[str] = set()  # the layer's moments reached

    def start(self) -> None:
        self.on = True
        self.times.layers += 1
        self._synced, self._seen = None, set()
        self._t = self.clock()
        if self.cpu_clock is not None:
            self._c = self.cpu_clock()

    def lap(self, phase: str, read_s: float = 0.0) -> None:
        """Charge the time since the last lap to ``phase``; ``read_s`` of it, reads this
        thread made itself (from the page cache), to ``wait``."""
        if not self.on:
            return
        t = self.clock()
        if read_s:  # (most laps have none: one call less on the per-layer path)
            read_s = min(read_s, t - self._t)
            self.times.wall_s["wait"] += read_s
        self.times.wall_s[phase] += t - self._t - read_s
        self._t = t
        if phase == "sync":
            self._synced = t
        if self.cpu_clock is not None:
            c = self.cpu_clock()
            read_cpu = min(read_s, c - self._c)  # a copy from the page cache: CPU-bound
            self.times.cpu_s[phase] += c - self._c - read_cpu
            self.times.cpu_s["wait"] += read_cpu
            self._c = c

    def reached(self, moment: str) -> None:
        """The layer reached ``moment`` (``MOMENTS``): its first time in a layer charges the
        time since the end of the layer's sync (0 before it) to ``after_sync_s``."""
        if not self.on or moment in self._seen:
            return
        self._seen.add(moment)
        self.times.reached[moment] += 1
        if self._synced is not None:
            self.times.after_sync_s[moment] += self.clock() - self._synced

    def discard(self) -> None:
        """Forget the layer started: it needed no host work after all."""
        if self.on:
            self.on = False
            self.times.layers -= 1

    def stop(self, phase: str) -> None:
        self.lap(phase)
        self.on = False
