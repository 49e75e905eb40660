"""Byte ranges: where one expert's tensors live on disk and where they land in its buffer.

A ``ByteRange`` is plain data; the index produces them, the readers consume them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Tuple

ExpertKey = Tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class ByteRange:
    """``nbytes`` bytes of ``path`` at file offset ``offset``, destined for byte ``dest`` of a buffer.

    Args:
        path: absolute path of the file.
        offset: byte offset in the file.
        nbytes: length in bytes.
        dest: byte offset in the destination buffer (the expert's packed buffer).
        label: what the bytes are (tensor name), for error messages.
    """

    path: str
    offset: int
    nbytes: int
    dest: int = 0
    label: Hashable = ""

    @property
    def end(self) -> int:
        return self.offset + self.nbytes
