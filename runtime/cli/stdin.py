"""Text read from standard input by the command lines: UTF-8 text or a one-line error.

Owns the check that a prompt piped in is text (valid UTF-8, no NUL byte) before it reaches
a tokenizer, for golem-run's ``-p -`` (read whole) and golem-chat's prompts (line by
line). Knows nothing of models or prompts' meaning.
"""

from __future__ import annotations

import io
import sys


def decode_text(data: bytes, what: str) -> str:
    """``data`` as UTF-8 text; a ``ValueError`` naming ``what`` and the first bad byte if not."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "give the prompt as text") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise ValueError(f"{what}: not text (a NUL byte at offset {len(text[:nul].encode())}); "
                         "give the prompt as text")
    return text


def read_stdin_text(what: str = "-p -: standard input") -> str:
    """All of standard input, checked by ``decode_text``."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # replaced by a text-only object (tests, embedding hosts)
        return sys.stdin.read()
    return decode_text(stream.read(), what)


class TextLines(io.TextIOBase):
    """Standard input for ``input()``, one line at a time, each checked by ``decode_text``.

    Args:
        raw: the binary stream (``sys.stdin.buffer``).
        what: names the stream in errors.
    """

    def __init__(self, raw, what: str = "standard input"):
        self.raw, self.what, self.offset = raw, what, 0

    def readable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def readline(self, size: int = -1) -> str:
        line = self.raw.readline() if size is None or size < 0 else self.raw.readline(size)
        try:
            return decode_text(line, self.what)
        except ValueError as e:
            raise ValueError(f"{e} (in the line at byte {self.offset})") from None
        finally:
            self.offset += len(line)

    def read(self, size: int = -1) -> str:
        return decode_text(self.raw.read() if size is None or size < 0 else self.raw.read(size), self.what)
