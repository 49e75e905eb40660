"""Staging buffers: the fixed pool of byte arrays that reads land in, and who holds each.

Owns the allocation of the pool (from an injectable allocator, so that reads can land in
memory an upload wants), the free list, the buffers handed to the caller and their return.
Knows nothing of files, requests or threads: the scheduler calls it with its lock held.

The allocator contract (``allocate``):
    ``allocate(nbytes) -> numpy.ndarray``: a writable, C-contiguous, 1-D ``uint8`` array of
    at least ``nbytes`` bytes, the caller's memory. It is called ``count`` times, in the
    constructor, on the thread that builds the pool, and never again. The pool keeps a
    reference to every array for its lifetime; the caller must keep the memory valid (not
    freed, not moved) until the pool is garbage. Reads write a buffer only between taking
    it from the free list and handing it out; once the caller gives it back (``release``)
    it may be written at any moment, so the caller must have finished with it by then,
    including any asynchronous copy still reading it (an upload must be complete, not just
    queued). Memory that only a device can see is not allowed: ``preadv`` writes into it
    from the host. Host-page alignment (4096) lets direct reads skip a bounce copy; it is
    not required.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import numpy as np

from golem.io.file_handles import ALIGN, aligned_empty

Allocator = Callable[[int], np.ndarray]


def host_buffer(nbytes: int) -> np.ndarray:
    """The default allocator: page-aligned anonymous memory, its pages faulted in now (not
    during the first reads)."""
    buf = aligned_empty(nbytes)
    buf[::4096] = 0
    return buf


def physical_memory_nbytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


class StagingBuffers:
    """``count`` buffers of ``nbytes`` bytes; not thread-safe (callers hold their own lock).

    Args:
        nbytes: bytes of each buffer (the largest request plus any alignment slack).
        count: buffers in the pool.
        allocate: ``nbytes -> uint8 array`` (see the module docstring); None = ``host_buffer``.
    """

    def __init__(self, nbytes: int, count: int, *, allocate: Optional[Allocator] = None):
        if nbytes <= 0 or count < 1:
            raise ValueError(f"need buffer_nbytes > 0 and num_buffers >= 1, got "
                             f"{nbytes} and {count}")
        if allocate is None:
            memory = physical_memory_nbytes()
            if memory is not None and nbytes * count > memory:
                raise ValueError(f"staging buffers: {count} x {nbytes} bytes = "
                                 f"{nbytes * count / 1e9:.1f} GB, more than this machine's "
                                 f"{memory / 1e9:.1f} GB of memory")
            allocate = host_buffer
        self.nbytes = nbytes
        self.arrays: List[np.ndarray] = [_checked(allocate(nbytes), nbytes, allocate)
                                         for _ in range(count)]
        self.addresses = [int(a.ctypes.data) for a in self.arrays]
        self.free: List[int] = list(range(count - 1, -1, -1))
        self._handed: Dict[int, int] = {}  # address of a handed-out view -> buffer index

    def __len__(self) -> int:
        return len(self.arrays)

    def take(self) -> int:
        """A free buffer's index (the caller checked that ``free`` is not empty)."""
        return self.free.pop()

    def give_back(self, index: int) -> None:
        self.free.append(index)

    def shift_for(self, index: int, file_align: int) -> int:
        """Where a view must start in buffer ``index`` so that its address has the file's
        alignment ``file_align`` modulo ALIGN (direct reads then need no bounce copy)."""
        return (file_align - self.addresses[index]) % ALIGN

    def view(self, index: int, shift: int, nbytes: int) -> np.ndarray:
        return self.arrays[index][shift:shift + nbytes]

    def hand_out(self, index: int, shift: int) -> None:
        """The view of buffer ``index`` at ``shift`` is the caller's until ``take_back``."""
        self._handed[self.addresses[index] + shift] = index

    def take_back(self, buffer) -> int:
        """The index of a handed-out ``buffer``, no longer handed out; ValueError otherwise."""
        address = np.asarray(buffer).__array_interface__["data"][0]
        index = self._handed.pop(address, None)
        if index is None:
            if any(a <= address < a + len(b) for a, b in zip(self.addresses, self.arrays)):
                raise ValueError("release: staging buffer released twice (or never handed out)")
            raise ValueError("release: not a staging buffer of this scheduler")
        return index


def _checked(array, nbytes: int, allocate) -> np.ndarray:
    name = getattr(allocate, "__qualname__", repr(allocate))
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1:
        raise TypeError(f"allocator {name} must return a 1-D uint8 numpy array, got "
                        f"{type(array).__name__}"
                        f"{' ' + str(array.dtype) + str(list(array.shape)) if isinstance(array, np.ndarray) else ''}")
    if len(array) < nbytes:
        raise ValueError(f"allocator {name} returned {len(array)} bytes, asked for {nbytes}")
    if not array.flags.writeable or not array.flags.c_contiguous:
        raise ValueError(f"allocator {name} must return writable, contiguous memory")
    return array
