"""Errors of reading expert bytes: a read that failed after its retries (``ReadError``), and
a pinned file that changed on disk (``FileChangedError``).

Both name the file, offset, length and who wanted the bytes, survive pickling, and are
``OSError``s, so a caller that handles I/O errors handles them. Knows nothing of how reads
are made (``positioned_reads``) or how files are held (``file_handles``).
"""

from __future__ import annotations

import errno
from typing import Optional, Sequence


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


