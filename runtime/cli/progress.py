"""Progress for the command lines and benchmarks, on stderr, never on stdout.

``progress_bar``: a tqdm bar when stderr is a terminal; into a file or pipe only when the work
is long (then a line every ``LOG_INTERVAL_S`` seconds), so short runs and JSON on stdout stay
clean. ``StageProgress``: the few byte-sized stages before the first token (building the demo
checkpoint, loading, the warm start): on a terminal one line rewritten in place, then one
summary line; into a file or pipe only the summary line. Library code takes a plain callable
(units done, or ``(stage, done, total)``) and knows nothing of either.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Dict, List, Optional, TextIO

LONG_WORK = 20_000_000  # (steps x layers) above which a run counts as long
LOG_INTERVAL_S = 15.0


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(total: Optional[int], desc: str, *, work: int = 0, stream: Optional[TextIO] = None):
    """A context manager with ``update(n)``: a tqdm bar of ``total`` units (None: a counter)
    on ``stream`` (stderr), or a silent stand-in when stderr is not a terminal and ``work`` (about
    steps x layers) is below ``LONG_WORK``."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty and work < LONG_WORK:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with mlx-lm; without it, no bar
        return _Silent()
    return tqdm(total=total, desc=desc, file=stream, leave=False, dynamic_ncols=True,
                mininterval=0.2 if tty else LOG_INTERVAL_S)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class StageProgress:
    """A callable ``(stage, done_nbytes, total_nbytes)`` for the library's ``progress``
    arguments (``golem.runtime.load``, ``build_checkpoint``), drawn as golem's ``[golem]`` lines.

    On a terminal, one line rewritten in place (at most every ``interval_s``) says the stage
    and how far it is; ``close()`` replaces it with the summary line. Into a file or pipe,
    nothing until ``close()``, then the summary line alone:
    ``[golem] loading 1.23 GB in 2.10 s; warm start 0.35 GB in 0.40 s``.

    Args:
        stream: where to write (default: stderr).
        clock: a monotonic time source in seconds (tests give a fake one).
        interval_s: the least time between two redraws on a terminal.
        finished: how the summary names a stage once done (default: the stage's own name),
            e.g. ``{"building the demo checkpoint": "built the demo checkpoint:"}``.
    """

    def __init__(self, stream: Optional[TextIO] = None, *, clock: Callable[[], float] = time.monotonic,
                 interval_s: float = 0.1, finished: Optional[Dict[str, str]] = None) -> None:
        self.finished = dict(finished or {})
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.interval_s = interval_s
        self.tty = _is_terminal(self.stream)
        self.stages: Dict[str, List[float]] = {}  # stage -> [start, end, done, total]
        self._drawn = 0.0
        self._line = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        record = self.stages.setdefault(stage, [now, now, 0, 0])
        record[1:] = [now, done, total]
        if self.tty and (done >= total or now - self._drawn >= self.interval_s):
            self._drawn = now
            share = f" ({100 * done / total:.0f}%)" if total else ""
            self._write(f"\r\x1b[K[golem] {stage}: {_nbytes(done)} of {_nbytes(total)}{share}")
            self._line = True

    def summary(self) -> Optional[str]:
        """``[golem] loading 1.23 GB in 2.10 s; ...``, or None before any stage began."""
        if not self.stages:
            return None
        parts = [f"{self.finished.get(stage, stage)} {_nbytes(done)} in {end - start:.2f} s"
                 for stage, (start, end, done, _) in self.stages.items()]
        return "[golem] " + "; ".join(parts)

    def close(self) -> None:
        """Clear the live line (terminal) and write the summary line."""
        if self._line:
            self._write("\r\x1b[K")
            self._line = False
        line = self.summary()
        if line:
            self._write(line + "\n")
        self.stages.clear()

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed: progress is not worth failing over
            pass

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self._line:  # a failure: leave no half line before the error
            self._write("\r\x1b[K")
            self._line = False


def _nbytes(n: float) -> str:
    from golem.runtime.units import format_nbytes

    return format_nbytes(n)


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record comes (not the stream of
    the moment it was made), so a replaced stderr never receives a stale write."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_library_warnings() -> None:
    """Show the library's warnings (logger ``golem``: a first run's missing profile, a damaged
    profile set aside) as ``[golem] ...`` lines on stderr, like the command's own notes. For
    golem-run and golem-trace, which configure no logging of their own; a no-op when the
    ``golem`` logger already has a handler. Records still reach the root logger's handlers."""
    logger = logging.getLogger("golem")
    if logger.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[golem] %(message)s"))
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
