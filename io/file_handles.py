"""Held file handles: one open descriptor per ``(file, direct)``, the checkpoint-identity
check of pinned files, and the per-thread aligned scratch buffers of direct reads.

Owns opening (``O_DIRECT`` where the file system takes it, ``F_NOCACHE`` on macOS, else a
buffered handle whose pages are dropped after each read), the ``opener`` / ``preadv``
patch points, the storage emulator's attachment point (``FileHandles(throttle=...)``) and
``FileIdentity``: a pinned file is read only through the handle opened for it, and checked
to still be the file that was indexed. Knows nothing of byte ranges or experts (see
``positioned_reads``) and does not read.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np

from golem.io.read_errors import FileChangedError

if TYPE_CHECKING:
    from golem.io.storage import Throttle

ALIGN = 4096  # direct-I/O alignment: a page, a multiple of every common logical block size
DIRECT_CHUNK_NBYTES = 8 << 20  # largest single direct read; bounds the bounce buffer per thread

# How a "direct" handle really behaves on this OS / file system.
MODE_BUFFERED = "buffered"  # page cache in the way
MODE_O_DIRECT = "o_direct"  # Linux and friends: the page cache is bypassed
MODE_NOCACHE = "nocache"  # macOS: F_NOCACHE, reads are not kept in the cache
MODE_FADVISE = "fadvise"  # O_DIRECT refused (tmpfs, some FUSE): buffered, dropped after each read


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

    def check_runs(self, runs: Iterable, direct: bool = False) -> None:
        """After ``runs`` (``positioned_reads.ReadRun``) were read: each pinned file among
        them checked once (``check``). A byte rewritten before it was read changed the
        file's mtime before the read returned, so a check after the reads catches every
        changed byte they delivered."""
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

    def downgrade(self, path: str) -> Tuple[int, str]:
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


