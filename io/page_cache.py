"""The page cache around a file, for benchmarks that must read from the disk: dropping a
file's cached pages, and measuring how much of it is cached.

Knows nothing of the reads themselves (``positioned_reads``); Linux and macOS, with answers
of "cannot tell" (False / None) where the OS has no way.
"""

from __future__ import annotations

import mmap
import os
from typing import Optional

import numpy as np


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
