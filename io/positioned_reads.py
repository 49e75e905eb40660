"""Positioned reads: byte ranges of files into caller-provided buffers, with retries.

Owns ``os.preadv`` (releases the GIL) through held handles (``file_handles``), the planning
of ranges into runs adjacent in the file (merged, gaps read and dropped, cut at aligned
offsets), short-read resumption and retries, and direct I/O (aligned ``O_DIRECT``, into the
destination itself when alignment allows, else through a bounce buffer). Every read goes
through ``FileHandles.preadv`` and its throttle; pinned files are checked after their runs
are read. Knows nothing of experts beyond labels for errors; does not schedule or prioritise
(see ``scheduler``), and runs on the caller's thread.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from golem.io.file_handles import (ALIGN, DIRECT_CHUNK_NBYTES, MODE_BUFFERED, MODE_FADVISE,
                                   MODE_O_DIRECT, FileHandles)
from golem.io.ranges import ByteRange
from golem.io.read_errors import ReadError

RETRYABLE_ERRNOS = frozenset({errno.EIO, errno.EINTR, errno.EAGAIN})
# Linux: a read that fails with EAGAIN at once rather than wait for the device (None elsewhere).
NOWAIT = getattr(os, "RWF_NOWAIT", None)

try:
    _IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX"), 1024))
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16


def _byte_view(out) -> memoryview:
    view = memoryview(out)
    if view.readonly:
        raise ValueError("read destination buffer is read-only")
    if not view.c_contiguous:
        raise ValueError("read destination buffer must be contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class ReadRun:
    """Ranges adjacent in one file, read with one ``preadv`` scattering into their buffers.

    ``segments`` are ``[buffer index, dest, nbytes]`` in file order (buffer index
    ``GAP``: bytes between two ranges, read into a scratch buffer and dropped); ``labels``
    and ``whats`` name the tensors and requesters for errors.
    """

    __slots__ = ("path", "offset", "nbytes", "segments", "labels", "whats")

    def __init__(self, path: str, offset: int):
        self.path, self.offset, self.nbytes = path, offset, 0
        self.segments: List[List[int]] = []
        self.labels: List[object] = []
        self.whats: List[str] = []

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    def who(self) -> str:
        return ", ".join(dict.fromkeys(w for w in self.whats if w))


GAP = -1  # the buffer index of a segment that only skips bytes between two ranges


def plan_reads(requests: Sequence[Tuple[Sequence[ByteRange], int, str]],
               max_run_nbytes: Optional[int] = None, *, max_gap_nbytes: int = 0
               ) -> List[ReadRun]:
    """Group ranges into runs adjacent in the file, each one ``preadv``.

    ``requests`` holds ``(ranges, buffer index, what)``. Within a run, ranges that are also
    adjacent in the same buffer merge into one segment; a run never holds more than IOV_MAX
    segments, nor (with ``max_run_nbytes``) more bytes than that, cut at ALIGN boundaries
    of the file so that direct reads of neighbouring runs do not overlap. Ranges at most
    ``max_gap_nbytes`` apart join one run too: the gap is read into a scratch segment
    (buffer index ``GAP``) and dropped, one ``preadv`` instead of two.
    """
    items = sorted(((r, buf, what) for ranges, buf, what in requests for r in ranges
                    if r.nbytes), key=lambda item: (item[0].path, item[0].offset))
    runs: List[ReadRun] = []
    run: Optional[ReadRun] = None
    for rng, buf, what in items:
        if run is not None and rng.path == run.path and rng.offset < run.end:
            raise ValueError(f"overlapping ranges in {rng.path} at offset {rng.offset}: "
                             f"{run.labels[-1]!s} and {rng.label!s}")
        last = run.segments[-1] if run is not None else None
        merge = (last is not None and rng.path == run.path and rng.offset == run.end
                 and last[0] == buf and last[1] + last[2] == rng.dest)
        gap = rng.offset - run.end if run is not None and rng.path == run.path else -1
        if 0 < gap <= max_gap_nbytes and len(run.segments) < _IOV_MAX - 1:
            run.segments.append([GAP, 0, gap])
            run.nbytes += gap
        elif not merge and (run is None or gap != 0 or len(run.segments) >= _IOV_MAX):
            run = ReadRun(rng.path, rng.offset)
            runs.append(run)
        if merge:
            last[2] += rng.nbytes
        else:
            run.segments.append([buf, rng.dest, rng.nbytes])
        run.nbytes += rng.nbytes
        run.labels.append(rng.label)
        run.whats.append(what)
    if max_run_nbytes:
        runs = [piece for run in runs for piece in _split(run, max_run_nbytes)]
    return runs


def _split(run: ReadRun, limit: int) -> List[ReadRun]:
    if run.nbytes <= limit:
        return [run]
    out: List[ReadRun] = []
    cur: Optional[ReadRun] = None
    stop = 0
    pos = run.offset
    for buf, dest, n in run.segments:
        while n:
            if cur is None or pos >= stop:
                cur = ReadRun(run.path, pos)
                cur.labels, cur.whats = run.labels, run.whats
                out.append(cur)
                stop = (pos + limit) // ALIGN * ALIGN
                if stop <= pos:
                    stop = pos + limit
            take = min(n, stop - pos)
            cur.segments.append([buf, dest, take])
            cur.nbytes += take
            dest += take
            n -= take
            pos += take
    return out


def destination_views(requests: Sequence[Tuple[Sequence[ByteRange], object, str]]
                      ) -> List[memoryview]:
    """Byte views of each request's ``out``, after checking that every range fits it."""
    views = []
    for ranges, out, what in requests:
        view = _byte_view(out)
        for r in ranges:
            if r.nbytes < 0 or r.offset < 0 or r.dest < 0 or r.dest + r.nbytes > len(view):
                raise ValueError(f"range {r.label!s} of {r.path} (dest {r.dest}, {r.nbytes} "
                                 f"bytes) does not fit the {len(view)}-byte buffer"
                                 f"{' of ' + what if what else ''}")
        views.append(view)
    return views


def can_read_cached(handles: FileHandles) -> bool:
    """Whether ``read_cached_many`` may read through ``handles``: the platform has ``RWF_NOWAIT``, no
    device is emulated (``throttle``) and ``preadv`` is not replaced (faults injected, reads
    counted: the ordinary path must see them)."""
    return NOWAIT is not None and handles.throttle is None and handles.preadv is os.preadv


def read_cached_many(requests: Sequence[Tuple[Sequence[ByteRange], object]], *,
                     handles: FileHandles) -> List[bool]:
    """Read each ``(ranges, out)``, in order, into ``out`` at the ranges' ``dest`` only as far
    as the page cache already holds them (``RWF_NOWAIT``: nothing waits for the device); for
    each, True when every byte arrived.

    False, with ``out`` partly written, where ``can_read_cached`` says no, a file is not read
    through the page cache, or a byte was not cached or a read failed: the caller reads those
    the ordinary way, which retries and reports. Each pinned file read is checked once, after
    all of them (a byte rewritten before it was read changed the file before the check): all
    False when a check fails, so that the ordinary reads report it."""
    if not can_read_cached(handles):
        return [False] * len(requests)
    got, read = [], {}  # read: path -> fd, the files to check
    for ranges, out in requests:
        view = _byte_view(out)
        try:
            for r in ranges:
                fd, mode = handles.open(r.path)
                if mode != MODE_BUFFERED or os.preadv(fd, [view[r.dest:r.dest + r.nbytes]], r.offset,
                                                      NOWAIT) != r.nbytes:
                    break
                read[r.path] = fd
            else:
                got.append(True)
                continue
        except OSError:  # not cached (EAGAIN), a failed read: the ordinary read says
            pass
        got.append(False)
    try:
        for path, fd in read.items():
            handles.check(path, fd)
    except OSError:  # a changed file: the ordinary reads say
        return [False] * len(requests)
    return got


def read_ranges(ranges: Iterable[ByteRange], out, *, handles: FileHandles, direct: bool = False,
                retries: int = 3, what: str = "") -> int:
    """Read every range into ``out`` at its ``dest``; return the bytes delivered.

    Ranges adjacent both in the file and in ``out`` are merged into one read. Short reads
    continue where they stopped; EIO / EINTR / EAGAIN are retried ``retries`` times, then
    raised as ``ReadError`` naming the file, offset, length, ``what`` and the range labels.
    ``direct`` reads the disk, not the page cache (see ``FileHandles.mode``).

    Args:
        ranges: the byte ranges; ``dest + nbytes`` must fit in ``out``.
        out: a writable contiguous buffer (numpy uint8 array, bytearray, memoryview).
        handles: open-file cache (and the ``preadv`` patch point).
        direct: bypass the page cache (O_DIRECT with aligned bounce reads).
        retries: attempts after the first failure of one read.
        what: names the requester in errors (e.g. ``"expert (3, 17)"``).
    """
    return read_into([(list(ranges), out, what)], handles=handles, direct=direct,
                     retries=retries)


def read_into(requests: Sequence[Tuple[Sequence[ByteRange], object, str]], *,
              handles: FileHandles, direct: bool = False, retries: int = 3,
              max_run_nbytes: Optional[int] = None) -> int:
    """Read several ``(ranges, out, what)`` requests, coalescing across them.

    Ranges of different requests that are adjacent in the file (expert e and e+1 of one
    stacked tensor) become one ``preadv`` scattering into both buffers. Errors name every
    requester whose bytes were in the failed read. Returns the bytes delivered.
    """
    requests = [(list(ranges), out, what) for ranges, out, what in requests]
    views = destination_views(requests)
    runs = plan_reads([(ranges, i, what) for i, (ranges, _, what) in enumerate(requests)],
                      max_run_nbytes)
    nbytes = sum(read_run(run, views, handles=handles, direct=direct, retries=retries)
                 for run in runs)
    handles.check_runs(runs, direct)
    return nbytes


def read_run(run: ReadRun, views: Sequence[memoryview], *, handles: FileHandles,
             direct: bool = False, retries: int = 3,
             wake: Optional[threading.Event] = None) -> int:
    """Read one planned run into ``views`` (indexed by the run's buffer indices).

    ``wake``, once set, cuts short the throttle's wait (a closing scheduler). The caller
    checks pinned files once its runs are read (``FileHandles.check_runs``)."""
    bufs = []
    pos = run.offset
    for buf, dest, n in run.segments:
        bufs.append(views[buf][dest:dest + n] if buf != GAP else handles.discard(n, pos % ALIGN))
        pos += n
    fd, mode = handles.open(run.path, direct)
    if mode == MODE_O_DIRECT:
        try:
            _read_direct(handles, fd, run, bufs, retries, wake)
            return run.nbytes
        except _DirectRefused:
            fd, mode = handles.downgrade(run.path)
    _read_run(handles, fd, run, bufs, run.offset, run.nbytes, retries, wake=wake)
    if mode == MODE_FADVISE and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, run.offset, run.nbytes, os.POSIX_FADV_DONTNEED)
    return run.nbytes


class _DirectRefused(Exception):
    """O_DIRECT opened, but the file system refuses aligned direct reads (EINVAL)."""


def _read_run(handles: FileHandles, fd: int, run: ReadRun, bufs: List[memoryview], offset: int,
              nbytes: int, retries: int, *, eof_ok: bool = False,
              wake: Optional[threading.Event] = None) -> int:
    """``preadv`` until ``nbytes`` are in ``bufs``; resume short reads, retry transient errors.

    With ``handles.throttle``, each call books its bytes first and waits for the emulated
    device after (``wake`` ends that wait early)."""
    done = 0
    failures = 0
    last_err: Optional[OSError] = None
    throttle = handles.throttle
    while done < nbytes:
        try:
            if throttle is None:
                got = handles.preadv(fd, bufs, offset + done)
            else:
                deadline = throttle.reserve(nbytes - done)  # what ``bufs`` still hold
                got = handles.preadv(fd, bufs, offset + done)
                throttle.wait_until(deadline, wake=wake)
        except OSError as exc:
            if exc.errno == errno.EINVAL and eof_ok:
                raise _DirectRefused() from exc
            if exc.errno not in RETRYABLE_ERRNOS:
                raise ReadError(exc.strerror or str(exc), path=run.path, offset=offset + done,
                                nbytes=nbytes - done, what=run.who(), labels=run.labels,
                                err=exc.errno, attempts=failures + 1) from exc
            failures += 1
            last_err = exc
            if failures > retries:
                raise ReadError(exc.strerror or str(exc), path=run.path, offset=offset + done,
                                nbytes=nbytes - done, what=run.who(), labels=run.labels,
                                err=exc.errno, attempts=failures) from exc
            continue
        if got <= 0:
            if eof_ok:
                return done
            failures += 1
            if failures > retries:
                raise ReadError("unexpected end of file (short read)", path=run.path,
                                offset=offset + done, nbytes=nbytes - done, what=run.who(),
                                labels=run.labels, err=errno.EIO, attempts=failures) from last_err
            continue
        done += got
        if done < nbytes:  # a short read: go on from where it stopped
            bufs = _advance(bufs, got)
    return done


def _advance(bufs: List[memoryview], nbytes: int) -> List[memoryview]:
    """Drop the first ``nbytes`` from a list of buffers (after a short read)."""
    index = 0
    while index < len(bufs) and nbytes >= len(bufs[index]):
        nbytes -= len(bufs[index])
        index += 1
    rest = bufs[index:]
    if rest and nbytes:
        rest = [rest[0][nbytes:]] + rest[1:]
    return rest


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def _read_direct(handles: FileHandles, fd: int, run: ReadRun, bufs: List[memoryview],
                 retries: int, wake: Optional[threading.Event] = None) -> None:
    """Direct reads of a run: straight into the destinations where each one's address and
    its file offset share their alignment and the boundaries between them fall on aligned
    file offsets (the caller can arrange it, see ``IOScheduler``), else aligned superset
    reads into the per-thread bounce buffer, copied out to ``bufs``."""
    first = run.offset - run.offset % ALIGN  # the aligned blocks that cover the run
    last = -(-run.end // ALIGN) * ALIGN
    inner = -(-run.offset // ALIGN) * ALIGN, run.end - run.end % ALIGN  # whole blocks inside
    middle = _aligned_middle(run, bufs, inner) if inner[1] > inner[0] else None
    if middle is not None:
        # One read: partial edge blocks into the bounce buffer, whole blocks into the
        # destinations themselves (no copy of the bulk).
        bounce = handles.bounce(2 * ALIGN)
        head, tail = bounce[:ALIGN], bounce[ALIGN:]
        iov = ([head] if first < inner[0] else []) + middle \
            + ([tail] if inner[1] < last else [])
        got = _read_run(handles, fd, run, iov, first, last - first, retries, eof_ok=True,
                        wake=wake)
        if got < run.end - first:
            _eof(run, first + got)
        if first < inner[0]:
            bufs[0][:inner[0] - run.offset] = head[run.offset - first:]
        if inner[1] < last:
            bufs[-1][len(bufs[-1]) - (run.end - inner[1]):] = tail[:run.end - inner[1]]
        return
    _read_bounced(handles, fd, run, bufs, run.offset, run.nbytes, retries, wake)


def _aligned_middle(run: ReadRun, bufs: List[memoryview], inner: Tuple[int, int]
                    ) -> Optional[List[memoryview]]:
    """The parts of ``bufs`` covering the whole blocks ``inner`` of the run's file span, if
    the device may write them directly: every buffer has its file offset's alignment and
    every boundary between two buffers is an aligned file offset. None otherwise."""
    middle = []
    pos = run.offset
    for i, buf in enumerate(bufs):
        end = pos + len(buf)
        if _address(buf) % ALIGN != pos % ALIGN or (i < len(bufs) - 1 and end % ALIGN):
            return None
        lo, hi = max(pos, inner[0]), min(end, inner[1])
        if hi > lo:
            middle.append(buf[lo - pos:hi - pos])
        pos = end
    return middle


def _eof(run: ReadRun, offset: int) -> None:
    raise ReadError("unexpected end of file (short read)", path=run.path, offset=offset,
                    nbytes=run.end - offset, what=run.who(), labels=run.labels,
                    err=errno.EIO, attempts=1)


def _read_bounced(handles: FileHandles, fd: int, run: ReadRun, bufs: List[memoryview],
                  offset: int, nbytes: int, retries: int,
                  wake: Optional[threading.Event] = None) -> None:
    """``nbytes`` at ``offset`` through aligned superset reads of the bounce buffer."""
    pos = offset
    end = offset + nbytes
    targets = list(bufs)
    while pos < end:
        start = pos - pos % ALIGN
        stop = min(end, start + DIRECT_CHUNK_NBYTES)
        stop_aligned = -(-stop // ALIGN) * ALIGN
        bounce = handles.bounce(stop_aligned - start)
        got = _read_run(handles, fd, run, [bounce], start, stop_aligned - start, retries,
                        eof_ok=True, wake=wake)
        if got < stop - start:  # EOF inside the wanted bytes
            _eof(run, start + got)
        src = np.frombuffer(bounce, dtype=np.uint8)[pos - start:stop - start]
        while len(src):
            n = min(len(src), len(targets[0]))
            np.copyto(np.frombuffer(targets[0], dtype=np.uint8)[:n], src[:n])  # GIL released
            src = src[n:]
            targets = _advance(targets, n)
        pos = stop
