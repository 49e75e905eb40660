"""Synchronous expert reads: one expert's byte ranges, from the index, into a packed buffer.

Owns the engine's reader for when there is no I/O scheduler: positioned reads on the calling
thread, through held, pinned file handles. Knows the index's layer and expert numbers and
nothing of slots or models.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from golem.io.file_handles import FileHandles
from golem.io.index import ExpertIndex
from golem.io.positioned_reads import read_ranges

ExpertReader = Callable[[int, int, np.ndarray], int]  # (layer, expert, out) -> nbytes


class DiskReader:
    """Synchronous expert reads: the index's byte ranges into a packed buffer.

    Args:
        index: the expert index.
        direct: bypass the page cache (O_DIRECT) where the OS allows it.
        throttle: optional storage emulator (``golem.io.storage.Throttle``), attached to
            this reader's ``FileHandles``: every read consults it.
        identities: the shards' ``FileIdentity`` as indexed (``SafetensorsIndex.identities``):
            they are pinned (``FileHandles``), so a shard changed on disk stops the run.
    """

    def __init__(self, index: ExpertIndex, *, direct: bool = False, throttle=None, identities=None):
        self.index = index
        self.direct = direct
        self.throttle = throttle
        self.handles = FileHandles(throttle=throttle, identities=identities)

    def __call__(self, layer: int, expert: int, out: np.ndarray) -> int:
        ranges = self.index.ranges(layer, expert)
        return read_ranges(ranges, out, handles=self.handles, direct=self.direct, what=f"expert ({layer}, {expert})")

    def close(self) -> None:
        self.handles.close()
