"""Progress bars for the command lines and benchmarks: tqdm on stderr, never on stdout.

A bar is drawn when stderr is a terminal; into a file or pipe only when the work is long
(then a line every ``LOG_INTERVAL_S`` seconds), so short runs and JSON on stdout stay clean.
Library code takes a plain ``progress`` callable (units done) and knows nothing of tqdm.
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

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
