"""The readers' side of the scheduler: batches of requests cut into pieces, and reading them.

Owns ``Batch`` (requests read together, coalesced into runs adjacent in the file), the
planning of a request's pieces and of a batch's, the queue of pieces waiting for a reader
(demand batches first, ``min_job_nbytes`` per job) and the reading of a job, outside any
lock. Knows nothing of priorities, caps or futures: the scheduler decides which requests
become batches and what a finished batch means.
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable, List, Optional, Sequence, Tuple

from golem.io.ranges import ByteRange
from golem.io.reads import FileHandles, plan_reads, read_run
from golem.io.requests import Request, describe


class Batch:
    """Requests read together (coalesced), as pieces that run on several threads."""

    __slots__ = ("requests", "demand", "runs", "next", "remaining", "views", "error", "started",
                 "skipped")

    def __init__(self, requests: List[Request], demand: bool):
        self.requests = requests
        self.demand = demand
        self.runs: list = []
        self.next = 0  # index of the next piece to start
        self.remaining = 0  # pieces not yet returned
        self.views: list = []
        self.error: Optional[BaseException] = None
        self.started: Optional[float] = None
        self.skipped = False  # pieces were dropped: the buffers are incomplete
        for req in requests:
            req.batch = self

    def all_cancelled(self) -> bool:
        return all(r.cancelled or r.future.cancelled() for r in self.requests)


def plan_request(key: Hashable, ranges: Sequence[ByteRange], nbytes: int, piece_nbytes: int,
                 max_gap_nbytes: int = 0) -> list:
    """The key's pieces; rejects ranges that overlap or overflow its buffer (at submit)."""
    for r in ranges:
        if r.nbytes < 0 or r.offset < 0 or r.dest < 0 or r.dest + r.nbytes > nbytes:
            raise ValueError(f"{describe(key)}: range {r.label!s} of {r.path} (offset "
                             f"{r.offset}, dest {r.dest}, {r.nbytes} bytes) does not fit its "
                             f"{nbytes}-byte buffer")
    try:
        return plan_reads([(ranges, 0, describe(key))], piece_nbytes,
                          max_gap_nbytes=max_gap_nbytes)
    except ValueError as exc:
        raise ValueError(f"{describe(key)}: {exc}") from None


def plan_batch(batch: Batch, views: list, piece_nbytes: int, max_gap_nbytes: int) -> None:
    """Give ``batch`` its views and runs: one request keeps the plan it got at submit;
    several are planned together, so that ranges adjacent across them share a ``preadv``."""
    requests = batch.requests
    batch.views = views
    if len(requests) == 1:
        batch.runs = requests[0].plan
    else:
        try:
            batch.runs = plan_reads([(r.ranges, i, describe(r.key))
                                     for i, r in enumerate(requests)], piece_nbytes,
                                    max_gap_nbytes=max_gap_nbytes)
        except ValueError:  # requests overlapping in the file: read them one by one
            batch.runs = [run for i, r in enumerate(requests)
                          for run in plan_reads([(r.ranges, i, describe(r.key))], piece_nbytes,
                                                max_gap_nbytes=max_gap_nbytes)]
    batch.runs = batch.runs or [None]
    batch.remaining = len(batch.runs)


class PieceQueue:
    """Batches with pieces not yet started, demand batches first; counts of pieces waiting
    and running. Not thread-safe: the scheduler calls it with its lock held.

    Args:
        min_job_nbytes: a reader takes neighbouring pieces of a batch until it has this many
            bytes (small pieces cost more in bookkeeping than in reading).
        clock: ``() -> seconds``, stamps a batch's first piece.
    """

    def __init__(self, min_job_nbytes: int, clock: Callable[[], float]):
        self.min_job_nbytes = min_job_nbytes
        self.clock = clock
        self.active: List[Batch] = []
        self.waiting = 0  # pieces of active batches not yet started
        self.running = 0  # pieces being read
        self.demand_batches = 0  # demand batches not finished

    def add(self, batch: Batch) -> None:
        self.waiting += len(batch.runs)
        self.active.append(batch)
        if batch.demand:
            self.demand_batches += 1
            self.active.sort(key=lambda b: not b.demand)  # stable: demand batches first

    def promote(self, batch: Batch) -> None:
        """A running prefetch became a demand: its remaining pieces go first."""
        if not batch.demand:
            batch.demand = True
            self.demand_batches += 1
            self.active.sort(key=lambda b: not b.demand)

    def finished(self, batch: Batch) -> None:
        if batch.demand:
            self.demand_batches -= 1

    def next_job(self, parallelism: int, demand_lanes: int, yield_to_demand: bool,
                 finish: Callable[[Batch], list]) -> Optional[Tuple[Batch, list]]:
        """The next job for a reader, demand batches first, or None. A batch nobody wants
        any more loses its waiting pieces; ``finish`` is called if none of its pieces runs."""
        for batch in self.active:
            if batch.demand:
                return self.take(batch) if self.running < parallelism + demand_lanes else None
        if self.running >= parallelism or (yield_to_demand and self.demand_batches):
            return None
        while self.active:
            batch = self.active[0]
            if batch.all_cancelled():  # nobody wants the rest: do not read it
                self.skip_rest(batch)
                if batch.remaining == 0:
                    finish(batch)  # only cancelled requests: nothing to resolve
                continue
            return self.take(batch)
        return None

    def take(self, batch: Batch) -> Tuple[Batch, list]:
        """The next pieces of ``batch`` for one reader: ``min_job_nbytes`` unless it ends."""
        runs = []
        nbytes = 0
        while batch.next < len(batch.runs) and (not runs or nbytes < self.min_job_nbytes):
            run = batch.runs[batch.next]
            runs.append(run)
            nbytes += run.nbytes if run is not None else 0
            batch.next += 1
        self.waiting -= len(runs)
        if batch.next == len(batch.runs):
            self.active.remove(batch)
        if batch.started is None:
            batch.started = self.clock()
        return batch, runs

    def skip_rest(self, batch: Batch) -> None:
        """Drop the pieces of ``batch`` not yet started."""
        skipped = len(batch.runs) - batch.next
        batch.skipped = batch.skipped or skipped > 0
        batch.next = len(batch.runs)
        self.waiting -= skipped
        batch.remaining -= skipped
        if batch in self.active:
            self.active.remove(batch)


def read_job(batch: Batch, runs: list, *, read: Optional[Callable], handles: FileHandles,
             direct: bool, retries: int, view_of: Callable[[Request], object],
             wake: Optional[threading.Event] = None) -> Tuple[int, Optional[BaseException]]:
    """Read a job's pieces (no lock held); return ``(bytes read, error or None)``.

    ``read`` replaces the built-in reader (it reads the whole batch as one piece); ``wake``
    cuts short a storage emulator's wait (the scheduler is closing)."""
    nbytes = 0
    try:
        for run in runs:
            if read is not None:
                nbytes += read([(r.ranges, view_of(r), describe(r.key)) for r in batch.requests],
                               handles=handles, direct=direct, retries=retries)
            elif run is not None:
                nbytes += read_run(run, batch.views, handles=handles, direct=direct,
                                   retries=retries, wake=wake)
    except BaseException as exc:  # surfaces on the futures, never kills the reader
        return nbytes, exc
    return nbytes, None
