"""The scheduler's read jobs: batches of requests cut into pieces and jobs, and reading them.

A job is what one reader thread (``reader_pool``) reads at a time; each of its pieces is one
positioned read (``positioned_reads``).

Owns ``Batch`` (requests read together, coalesced into runs adjacent in the file), the
pieces of a request and of a batch (``pieces_of_request``, ``pieces_of_batch``), their
grouping into jobs (neighbouring pieces up to ``min_job_nbytes``, one reader each), the
queue of jobs waiting for a reader (demand batches first), the reading of a job outside any
lock, and how many readers there are. Knows nothing of priorities, caps or futures: the
scheduler decides which requests become batches and what a finished batch means.
"""

from __future__ import annotations

import operator
import threading
from typing import Callable, Hashable, List, Optional, Sequence, Tuple

from golem.io.file_handles import FileHandles
from golem.io.ranges import ByteRange
from golem.io.positioned_reads import plan_reads, read_run
from golem.io.requests import Request, describe

# The hot path is os.preadv on reader threads of our own, not aiofiles. aiofiles has no
# positioned read: each range costs a seek and a read, two executor round trips, on a file
# object per task, and it cannot take O_DIRECT (unaligned seeks) nor scatter one read into
# several buffers. benchmarks/bench_io.py (2-core VM, virtio disk, page cache evicted,
# 4.2 MiB experts of 9 ranges, same keys): aiofiles 0.95 GB/s and 0.61 CPU s/GB against
# 1.10 GB/s and 0.55 CPU s/GB for these readers, buffered; with O_DIRECT they reach
# 1.46 GB/s, 0.91 of dd on the same file.
#
# Default parallelism (preadv calls in flight, the device's queue depth): bench_io's sweep
# on 1 MiB experts, O_DIRECT, five runs of the benchmark: 2 -> 0.87-1.06 GB/s, 4 -> 1.10-1.42,
# 8 -> 1.35-1.65, 16 -> 1.35-1.64, against dd at 1.50-1.68. 8 and 16 are within the
# noise here; 16 leaves room for the deeper queues of NVMe drives, and an idle reader
# costs only a thread.
DEFAULT_PARALLELISM = 16
# The most readers: NVMe drives stop gaining past a few dozen reads in flight (a queue of
# 256 is already more than one device uses well), while each reader is a thread, with a
# stack, and up to DIRECT_CHUNK_NBYTES of bounce buffer for unaligned direct reads.
MAX_PARALLELISM = 256
DEFAULT_PIECE_NBYTES = 2 << 20
# A reader takes small neighbouring pieces together, up to this many bytes. Spreading an
# expert over readers costs host time (bench_io_host, 2 MiB experts of 9 ranges, a preadv
# that returns at once: ~9 thread switches and ~0.3-0.4 ms of CPU per demand read, against
# ~3 and ~0.27 ms with one reader per expert) but it is what makes misses fast: real reads
# on this 2-core VM, 2 MiB experts, ms per miss, one miss / eight at once, O_DIRECT: 5.5 / 4.2
# spread against 8.5 / 6.0 with one reader per expert (two runs agree; from the page cache
# the load of the shared machine drowned the difference).
MIN_JOB_NBYTES = 256 << 10
DEMAND_LANES = 1  # readers only demand reads may use: a miss never waits for a prefetch


def check_parallelism(parallelism) -> int:
    """``parallelism`` as an int in ``[1, MAX_PARALLELISM]``, or a ValueError saying so."""
    try:
        value = None if isinstance(parallelism, bool) else operator.index(parallelism)
    except TypeError:
        value = None
    if value is None or not 1 <= value <= MAX_PARALLELISM:
        raise ValueError(f"I/O parallelism must be an integer from 1 to {MAX_PARALLELISM} "
                         f"(reads in flight at once), got {parallelism!r}")
    return value


class Batch:
    """Requests read together (coalesced), as pieces that run on several threads."""

    __slots__ = ("requests", "demand", "runs", "jobs", "next", "next_job", "remaining", "views",
                 "error", "started", "skipped")

    def __init__(self, requests: List[Request], demand: bool):
        self.requests = requests
        self.demand = demand
        self.runs: list = []
        self.jobs: List[int] = []  # where each job's pieces end in ``runs``
        self.next = 0  # index of the next piece to start
        self.next_job = 0  # index of the next job to start
        self.remaining = 0  # pieces not yet returned
        self.views: list = []
        self.error: Optional[BaseException] = None
        self.started: Optional[float] = None
        self.skipped = False  # pieces were dropped: the buffers are incomplete
        for req in requests:
            req.batch = self

    def all_cancelled(self) -> bool:
        for r in self.requests:  # (a loop, not all() over a generator: asked at every reader's turn)
            if not (r.cancelled or r.gone()):
                return False
        return True


def group_jobs(runs: list, min_job_nbytes: int) -> List[int]:
    """Cut ``runs`` into jobs of neighbouring pieces holding ``min_job_nbytes`` (the last may
    hold less); return where each job ends."""
    ends, nbytes = [], 0
    for i, run in enumerate(runs):
        nbytes += run.nbytes if run is not None else 0
        if nbytes >= min_job_nbytes or i == len(runs) - 1:
            ends.append(i + 1)
            nbytes = 0
    return ends


def pieces_of_request(key: Hashable, ranges: Sequence[ByteRange], nbytes: int, piece_nbytes: int,
                      min_job_nbytes: int, max_gap_nbytes: int = 0) -> Tuple[list, List[int]]:
    """The key's pieces and jobs; rejects ranges that overlap or overflow its buffer."""
    for r in ranges:
        if r.nbytes < 0 or r.offset < 0 or r.dest < 0 or r.dest + r.nbytes > nbytes:
            raise ValueError(f"{describe(key)}: range {r.label!s} of {r.path} (offset "
                             f"{r.offset}, dest {r.dest}, {r.nbytes} bytes) does not fit its "
                             f"{nbytes}-byte buffer")
    try:
        runs = plan_reads([(ranges, 0, describe(key))], piece_nbytes,
                          max_gap_nbytes=max_gap_nbytes) or [None]
    except ValueError as exc:
        raise ValueError(f"{describe(key)}: {exc}") from None
    return runs, group_jobs(runs, min_job_nbytes)


def pieces_of_batch(batch: Batch, views: list, piece_nbytes: int, min_job_nbytes: int,
                    max_gap_nbytes: int) -> None:
    """Give ``batch`` its views, pieces (runs) and jobs: one request keeps the pieces it got
    at submit; several are cut together, so that ranges adjacent across them share a
    ``preadv``."""
    requests = batch.requests
    batch.views = views
    if len(requests) == 1:
        batch.runs, batch.jobs = requests[0].pieces
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
        batch.jobs = group_jobs(batch.runs, min_job_nbytes)
    batch.remaining = len(batch.runs)


class PieceQueue:
    """Batches with jobs not yet started, demand batches first; counts of jobs waiting and
    running (one reader each). Not thread-safe: the scheduler calls it with its lock held.

    Args:
        clock: ``() -> seconds``, stamps a batch's first job.
    """

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.active: List[Batch] = []
        self.waiting = 0  # jobs of active batches not yet started
        self.running = 0  # jobs being read
        self.demand_batches = 0  # demand batches not finished

    def add(self, batch: Batch) -> None:
        self.waiting += len(batch.jobs)
        active = self.active
        if batch.demand:
            self.demand_batches += 1
            at = 0  # after the demand batches already waiting: demand first, in order
            while at < len(active) and active[at].demand:
                at += 1
            active.insert(at, batch)
        else:
            active.append(batch)

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
        """The next job of ``batch``: its pieces, for one reader."""
        stop = batch.jobs[batch.next_job]
        runs = batch.runs[batch.next:stop]
        batch.next = stop
        batch.next_job += 1
        self.waiting -= 1
        if batch.next_job == len(batch.jobs):
            self.active.remove(batch)
        if batch.started is None:
            batch.started = self.clock()
        return batch, runs

    def skip_rest(self, batch: Batch) -> None:
        """Drop the pieces of ``batch`` not yet started."""
        skipped = len(batch.runs) - batch.next
        batch.skipped = batch.skipped or skipped > 0
        batch.next = len(batch.runs)
        self.waiting -= len(batch.jobs) - batch.next_job
        batch.next_job = len(batch.jobs)
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
        if read is None:
            handles.check_runs([run for run in runs if run is not None], direct)  # pinned files unchanged
    except BaseException as exc:  # surfaces on the futures, never kills the reader
        return nbytes, exc
    return nbytes, None
