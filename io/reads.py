"""Positioned reads: byte ranges of files into caller-provided buffers, with retries.

Owns open file handles, ``os.preadv`` (releases the GIL), merging of adjacent ranges,
direct I/O (aligned ``O_DIRECT``, into the destination itself when alignment allows) and
page-cache eviction for benchmarks. A storage emulator (``storage.Throttle``) is attached
in one place, ``FileHandles(throttle=...)``: every read through those handles consults it.
Pinned files (``FileHandles(identities=...)``) are read only through the handles opened for
them, and every read checks that the file is still the one pinned (``FileIdentity``).
Knows nothing of experts beyond labels for errors; does not schedule or prioritise (see
``scheduler``)."""

from __future__ import annotations

import errno
import math
import mmap
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from golem.io.ranges import ByteRange

if TYPE_CHECKING:
    from golem.io.storage import Throttle

ALIGN = 4096  # direct-I/O alignment: a page, a multiple of every common logical block size
DIRECT_CHUNK_NBYTES = 8 << 20  # largest single direct read; bounds the bounce buffer per thread
RETRYABLE_ERRNOS = frozenset({errno.EIO, errno.EINTR, errno.EAGAIN})

try:
    _IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX"), 1024))
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16

# How a "direct" handle really behaves on this OS / file system.
MODE_BUFFERED = "buffered"  # page cache in the way
MODE_O_DIRECT = "o_direct"  # Linux and friends: the page cache is bypassed
MODE_NOCACHE = "nocache"  # macOS: F_NOCACHE, reads are not kept in the cache
MODE_FADVISE = "fadvise"  # O_DIRECT refused (tmpfs, some FUSE): buffered, dropped after each read


class ReadError(OSError):
    """A read that failed after its retries, or ran past the end of the file.

    Args:
        message: what went wrong (the strerror or "unexpected end of file").
        path: the file.
        offset: file offset of the failed read.
        nbytes: bytes that were still to be read there.
        what: who wanted the bytes (e.g. ``"expert (3, 17)"``).
        labels: the tensor labels of the ranges involved.
        err: the errno of the last failure, if any.
        attempts: how many attempts were made.
    """

    def __init__(self, message: str, *, path: str, offset: int, nbytes: int, what: str = "",
                 labels: Sequence[object] = (), err: Optional[int] = None, attempts: int = 1):
        self.path = path
        self.offset = offset
        self.nbytes = nbytes
        self.what = what
        self.labels = tuple(labels)
        self.attempts = attempts
        shown = ", ".join(str(label) for label in self.labels[:4] if label != "")
        if len(self.labels) > 4:
            shown += f", ... ({len(self.labels)} ranges)"
        who = " ".join(part for part in (what, f"[{shown}]" if shown else "") if part)
        text = (f"cannot read {path}: {nbytes} bytes at offset {offset}"
                f"{' for ' + who if who else ''}: {message}"
                f" (after {attempts} attempt{'s' if attempts != 1 else ''})")
        super().__init__(text)
        self.errno = err
        self.strerror = message
        self.filename = path

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return (_rebuild_read_error, (type(self), self.args[0], self.__dict__.copy()))


def _rebuild_read_error(cls, text, state):
    error = cls.__new__(cls)
    OSError.__init__(error, text)
    error.__dict__.update(state)
    return error


@dataclass(frozen=True)
class FileIdentity:
    """What says a file is still the one that was indexed: its device and inode (a file
    replaced under the same name has another), its size and its modification time (a file
    rewritten in place has another; the kernel sets it before the new bytes can be read).

    Args:
        dev: ``st_dev``.
        ino: ``st_ino``.
        size: ``st_size`` in bytes.
        mtime_ns: ``st_mtime_ns``.
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileIdentity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def differences(self, other: "FileIdentity") -> str:
        """What differs, in words ("" when nothing does)."""
        out = []
        if (self.dev, self.ino) != (other.dev, other.ino):
            out.append("replaced by another file")
        if self.size != other.size:
            out.append(f"size {self.size} -> {other.size} bytes")
        if self.mtime_ns != other.mtime_ns:
            out.append("modified")
        return ", ".join(out)


class FileChangedError(ReadError):
    """A pinned file that is no longer the one indexed: the run stops rather than read
    bytes other than the model's.

    Args:
        path: the file.
        change: what differs (``FileIdentity.differences``).
    """

    def __init__(self, path: str, change: str):
        text = (f"{path}: the file changed on disk while the model was in use ({change}); "
                "stopped rather than read other bytes. Load the model again.")
        OSError.__init__(self, text)
        self.path, self.offset, self.nbytes, self.what = path, 0, 0, ""
        self.labels, self.attempts = (), 0
        self.errno, self.strerror, self.filename = errno.ESTALE, text, path


class FileHandles:
    """A thread-safe cache of open file descriptors, one per ``(path, direct)``.

    ``opener`` and ``preadv`` are patch points (like aiofiles' ``sync_open``): tests inject
    faults or count calls through them; every read in this module goes through
    ``handles.preadv``, and, with a ``throttle``, books its bytes on the emulated device
    before the call and waits for the emulated time after it. Use as a context manager, or
    call ``close()``.

    Args:
        opener: ``os.open``-compatible ``(path, flags) -> fd``.
        preadv: ``os.preadv``-compatible ``(fd, buffers, offset) -> int``.
        throttle: emulate a slower device for every read (``golem.io.storage.Throttle``);
            one throttle may be shared by several handles (one device).
        identities: pinned files, ``{path: FileIdentity}`` as indexed. Opening one checks
            the new handle's identity; every read of one checks its handle afterwards
            (``fstat``, ~1 us, on the reading thread) and, at most once per
            ``check_interval_s`` per file, its path too (``stat``: a file replaced under
            the same name). A difference raises ``FileChangedError``.
        check_interval_s: least time between two checks of one pinned path.

    Pinned or not, a file is opened once per ``(path, direct)`` and kept open until
    ``close()``: a file replaced under its name still reads as the one opened.
    """

    def __init__(self, *, opener: Callable[..., int] = os.open,
                 preadv: Callable[[int, Sequence[memoryview], int], int] = os.preadv,
                 throttle: Optional["Throttle"] = None,
                 identities: Optional[Mapping[str, FileIdentity]] = None,
                 check_interval_s: float = 0.25):
        self.opener = opener
        self.preadv = preadv
        self.throttle = throttle
        self.identities: Dict[str, FileIdentity] = dict(identities or {})
        self.check_interval_s = check_interval_s
        self._path_checked: Dict[str, float] = {}  # path -> time.monotonic() of its last check
        self._fds: Dict[Tuple[str, bool], Tuple[int, str]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._bounce = threading.local()
        self._discard = threading.local()

    def open(self, path: str, direct: bool = False) -> Tuple[int, str]:
        """Return ``(fd, mode)`` for ``path``; mode is one of the ``MODE_*`` strings."""
        key = (path, bool(direct))
        with self._lock:
            if self._closed:
                raise ValueError("FileHandles is closed")
            found = self._fds.get(key)
            if found is not None:
                return found
            found = self._open(path, bool(direct))
            try:
                self._check_fd(path, found[0])
            except BaseException:
                os.close(found[0])
                raise
            self._fds[key] = found
            return found

    def _check_fd(self, path: str, fd: int) -> None:
        expected = self.identities.get(path)
        if expected is not None:
            change = expected.differences(FileIdentity.of(os.fstat(fd)))
            if change:
                raise FileChangedError(path, change)

    def check_runs(self, runs: Iterable["ReadRun"], direct: bool = False) -> None:
        """After ``runs`` were read: each pinned file among them checked once (``check``).
        A byte rewritten before it was read changed the file's mtime before the read
        returned, so a check after the reads catches every changed byte they delivered."""
        if not self.identities:
            return
        for path in dict.fromkeys(run.path for run in runs):
            found = self._fds.get((path, bool(direct)))
            if found is not None:
                self.check(path, found[0])

    def check(self, path: str, fd: int) -> None:
        """After a read of ``path`` through ``fd``: a pinned file must still be the one
        indexed (see ``identities``); others are not checked."""
        expected = self.identities.get(path)
        if expected is None:
            return
        st = os.fstat(fd)
        if st.st_size != expected.size or st.st_mtime_ns != expected.mtime_ns:
            raise FileChangedError(path, expected.differences(FileIdentity.of(st)))
        now = time.monotonic()
        if now - self._path_checked.get(path, -math.inf) >= self.check_interval_s:
            self._path_checked[path] = now
            self.check_path(path)

    def check_path(self, path: str) -> None:
        """The file now at ``path`` must be the pinned one (``FileChangedError`` if not); a
        file deleted (and not replaced) passes, its held handle reading on."""
        expected = self.identities.get(path)
        if expected is None:
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return  # deleted, not replaced: the held handle still reads the bytes indexed
        except OSError as e:
            raise FileChangedError(path, f"no longer readable: {e.strerror or e}") from None
        change = expected.differences(FileIdentity.of(st))
        if change:
            raise FileChangedError(path, change)

    def check_all(self) -> None:
        """Every pinned path and every open handle, now (e.g. once loading is done)."""
        for path in self.identities:
            self.check_path(path)
        with self._lock:
            held = list(self._fds.items())
        for (path, _), (fd, _) in held:
            self._check_fd(path, fd)

    def pin(self, direct: bool = False) -> None:
        """Open every pinned file now (``open``), so that later reads use these handles."""
        for path in self.identities:
            self.open(path, direct)

    def fd(self, path: str, direct: bool = False) -> int:
        return self.open(path, direct)[0]

    def mode(self, path: str, direct: bool = False) -> str:
        """How reads of ``path`` really go (e.g. ``"fadvise"`` when O_DIRECT was refused)."""
        return self.open(path, direct)[1]

    def _open(self, path: str, direct: bool) -> Tuple[int, str]:
        flags = os.O_RDONLY
        if not direct:
            return self.opener(path, flags), MODE_BUFFERED
        if hasattr(os, "O_DIRECT"):
            try:
                return self.opener(path, flags | os.O_DIRECT), MODE_O_DIRECT
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
        fd = self.opener(path, flags)
        if sys.platform == "darwin":
            import fcntl
            if hasattr(fcntl, "F_NOCACHE"):
                fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
                return fd, MODE_NOCACHE
        return fd, MODE_FADVISE

    def _downgrade(self, path: str) -> Tuple[int, str]:
        """O_DIRECT opened but reads are refused (EINVAL): reopen as the buffered fallback."""
        with self._lock:
            fd = self.opener(path, os.O_RDONLY)
            try:
                self._check_fd(path, fd)
            except BaseException:
                os.close(fd)
                raise
            old = self._fds.get((path, True))
            self._fds[(path, True)] = (fd, MODE_FADVISE)
        if old is not None and old[0] != fd:
            os.close(old[0])
        return fd, MODE_FADVISE

    def bounce(self, nbytes: int) -> memoryview:
        """A per-thread, ALIGN-aligned scratch buffer of at least ``nbytes``."""
        buf = getattr(self._bounce, "buf", None)
        if buf is None or len(buf) < nbytes:
            size = max(nbytes, 2 * len(buf) if buf is not None else 64 << 10)
            buf = aligned_empty(min(size, max(nbytes, DIRECT_CHUNK_NBYTES + 2 * ALIGN)))
            self._bounce.buf = buf
        return memoryview(buf)[:nbytes]

    def discard(self, nbytes: int, shift: int = 0) -> memoryview:
        """A per-thread scratch buffer of ``nbytes`` for the gaps of a span read (never
        read), starting ``shift`` bytes past an ALIGN boundary (a direct read's file
        alignment)."""
        buf = getattr(self._discard, "buf", None)
        if buf is None or len(buf) < nbytes + shift:
            buf = self._discard.buf = aligned_empty(max(nbytes + ALIGN, 64 << 10))
        return memoryview(buf)[shift:shift + nbytes]

    def close(self) -> None:
        with self._lock:
            fds, self._fds, self._closed = list(self._fds.values()), {}, True
        for fd, _ in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "FileHandles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """An uninitialised uint8 array of ``nbytes`` whose first byte is ``align``-aligned."""
    if align <= mmap.PAGESIZE and nbytes > 0:
        return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)  # mmap is page-aligned
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]


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
    plan = plan_reads([(ranges, i, what) for i, (ranges, _, what) in enumerate(requests)],
                      max_run_nbytes)
    nbytes = sum(read_run(run, views, handles=handles, direct=direct, retries=retries)
                 for run in plan)
    handles.check_runs(plan, direct)
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
            fd, mode = handles._downgrade(run.path)
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
                deadline = throttle.reserve(sum(len(b) for b in bufs))
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


def evict_from_page_cache(path: str) -> bool:
    """Drop ``path``'s clean pages from the page cache; False where the OS cannot.

    Pages still dirty are flushed first (``fsync``) so that the drop takes them too.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        if not hasattr(os, "posix_fadvise"):
            return False
        try:
            os.fsync(fd)
        except OSError:
            pass
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    finally:
        os.close(fd)


def cached_fraction(path: str) -> Optional[float]:
    """Fraction of ``path``'s pages resident in the page cache (``mincore``); None if unknown."""
    import ctypes
    import ctypes.util

    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "mincore"):
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return None
            return float(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1)) / pages
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
