"""A prompt on stdin that is not text is a one-line error in golem-run (before the model
loads) and in golem-chat; UTF-8 text passes unchanged."""

from __future__ import annotations

import io
import sys

import pytest

from golem.runtime.cli.run import main as golem_run
from golem.runtime.cli.stdin import TextLines, decode_text


def test_decode_text_names_the_first_bad_byte():
    assert decode_text("Grüße ☃".encode(), "stdin") == "Grüße ☃"
    with pytest.raises(ValueError, match=r"stdin: not UTF-8 text \(byte 0xff at offset 3\)"):
        decode_text(b"abc\xff", "stdin")
    with pytest.raises(ValueError, match=r"not text \(a NUL byte at offset 4\)"):
        decode_text("é¿\x00".encode().replace(b"\xc2\xbf", b"ab"), "stdin")


def test_text_lines_check_each_line_and_count_bytes():
    lines = TextLines(io.BytesIO(b"hello\n\xfe\xff\n"))
    assert lines.readline() == "hello\n"
    with pytest.raises(ValueError, match="byte 0xfe at offset 0.*in the line at byte 6"):
        lines.readline()


def _stdin(monkeypatch, data: bytes):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_golem_run_refuses_binary_stdin_before_loading(monkeypatch, capsys, tmp_path):
    _stdin(monkeypatch, b"\x89PNG\r\n\x1a\n\x00\x00")
    # a model path that does not exist: the stdin check must come first
    assert golem_run(["--model", str(tmp_path / "nope"), "-p", "-", "-m", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not UTF-8 text (byte 0x89 at offset 0)" in err[0]


def test_golem_run_reads_utf8_stdin(monkeypatch, capsys, checkpoints):
    _stdin(monkeypatch, "Grüße".encode())
    assert golem_run(["--model", str(checkpoints("olmoe")), "-p", "-", "-m", "2", "-c", "4"]) == 0
    assert "==========" in capsys.readouterr().out
