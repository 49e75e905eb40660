"""The I/O scheduler's settings: one frozen object, checked once, when it is made.

Owns ``SchedulerSettings`` (sizes, caps and switches of ``golem.io.scheduler.IOScheduler``)
and the checks of every value, each failing with a ValueError that names the setting. Holds
plain values only: the collaborators a scheduler is given (file handles, a storage emulator,
an allocator, a fake reader, a clock) are passed to the scheduler itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from golem.io.read_jobs import (DEFAULT_PARALLELISM, DEFAULT_PIECE_NBYTES, MIN_JOB_NBYTES,
                                check_parallelism)

DEFAULT_MAX_GAP_NBYTES = 0  # see IOScheduler's "Coalescing"
CLOSE_TIMEOUT_S = 1.0
# Bytes of a layer's misses read on the engine's own thread when the page cache holds them: a
# read of 36 KiB takes ~2 us there, a hand-off to a reader thread ~100 us of host time
# (``bench_io_host.py``); past this, readers copy the rest in parallel.
CACHED_READ_NBYTES = 4 << 20


@dataclass(frozen=True)
class SchedulerSettings:
    """What an ``IOScheduler`` reads with, checked at construction (a ValueError names the
    setting). ``replace(settings, name=value)`` (``dataclasses.replace``) checks again.

    Args:
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
        max_gap_nbytes: read ranges this close in the file as one span (see the
            scheduler's "Coalescing").
        piece_nbytes: largest single read; longer runs of a file are cut into pieces that
            several threads read at once.
        min_job_nbytes: a reader takes neighbouring pieces of a batch until it has this
            many bytes (small pieces cost more in bookkeeping than in reading).
        direct: read with O_DIRECT (see ``golem.io.file_handles``).
        retries: retries of a failed or short read before its future fails.
        use_uvloop: run the loop on uvloop when it is installed.
        activate_on_loop: after a caller's event (a prefetch submitted, a cancel, a
            release), have the event loop activate requests; False (the default): the
            caller's thread does, under the lock, as for a demand (see the scheduler's
            "Shape").
        close_timeout_s: longest ``close`` waits for reads already inside the kernel.
        cached_read_nbytes: a demand submit reads, on the submitting thread, up to this many
            bytes of its keys that the page cache already holds (``read_cached_many``: Linux,
            buffered reads, no emulated device), before any reader is woken for them; the
            rest go to the readers first. 0: never.
    """

    buffer_nbytes: int
    num_buffers: int = 16
    parallelism: int = DEFAULT_PARALLELISM
    speculative_nbytes: Optional[int] = None
    speculative_s: Optional[float] = None
    max_pending: int = 256
    reserved_for_demand: int = 1
    yield_to_demand: bool = True
    coalesce: bool = True
    max_batch_nbytes: int = 64 << 20
    max_gap_nbytes: int = DEFAULT_MAX_GAP_NBYTES
    piece_nbytes: int = DEFAULT_PIECE_NBYTES
    min_job_nbytes: int = MIN_JOB_NBYTES
    direct: bool = False
    retries: int = 3
    use_uvloop: bool = True
    activate_on_loop: bool = False
    close_timeout_s: float = CLOSE_TIMEOUT_S
    cached_read_nbytes: int = CACHED_READ_NBYTES

    def __post_init__(self):
        if not self.buffer_nbytes > 0 or not self.num_buffers >= 1:
            raise ValueError(f"need buffer_nbytes > 0 and num_buffers >= 1, got "
                             f"{self.buffer_nbytes} and {self.num_buffers}")
        object.__setattr__(self, "parallelism", check_parallelism(self.parallelism))
        if not 0 <= self.reserved_for_demand < self.num_buffers:
            raise ValueError(f"reserved_for_demand must be in [0, num_buffers), got "
                             f"{self.reserved_for_demand} with {self.num_buffers} buffers")
        spec_s = self.speculative_s
        if spec_s is not None and not (spec_s > 0 and math.isfinite(spec_s)):
            raise ValueError(f"speculative_s must be > 0 and finite, got {spec_s}")
        for name, least in (("speculative_nbytes", 0), ("max_pending", 0),
                            ("max_batch_nbytes", 1), ("max_gap_nbytes", 0),
                            ("piece_nbytes", 1), ("min_job_nbytes", 0), ("retries", 0),
                            ("cached_read_nbytes", 0)):
            value = getattr(self, name)
            if value is not None and not value >= least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        if not self.close_timeout_s >= 0:
            raise ValueError(f"close_timeout_s must be >= 0, got {self.close_timeout_s}")

    def but(self, **changes) -> "SchedulerSettings":
        """A copy with ``changes`` (checked again)."""
        return replace(self, **changes)
