"""Sizes and layer ranges: one parser for every command, bounded before it expands."""

from __future__ import annotations

import time

import pytest

from golem.runtime.cli.trace import main as trace_main
from golem.runtime.units import GB, GiB, parse_layer_ranges, parse_override, parse_size


@pytest.mark.parametrize("text, nbytes", [
    ("48G", 48 * GB), ("48GB", 48 * GB), ("48gb", 48 * GB), ("48 GB", 48 * GB), ("48GiB", 48 * GiB),
    ("48gib", 48 * GiB), ("4.8e10", 48 * GB), ("4.8E+10B", 48 * GB), ("512M", 512 * 10**6), ("1.5T", 1.5e12),
    (".5GB", GB // 2), ("0", 0), (48 * GB, 48 * GB), (4.8e10, 48 * GB),
])
def test_every_spelling_of_a_size(text, nbytes):
    assert parse_size(text, "--memory-budget") == nbytes


@pytest.mark.parametrize("text, message", [
    ("nan", "cannot read size 'nan'"), ("inf", "cannot read size 'inf'"), ("-5GB", "cannot read size '-5GB'"),
    ("1e400B", "size '1e400B' is too large"), ("1e30", "too large"), ("", "cannot read size ''"),
    (float("nan"), "finite number"), (float("inf"), "finite number"), (-1, "must not be negative"),
    (True, "cannot read size"), ("48 parsecs", "cannot read size"),
])
def test_bad_sizes_name_the_flag_and_the_text(text, message):
    with pytest.raises(ValueError, match="--ram: ") as info:
        parse_size(text, "--ram")
    assert message in str(info.value)


def test_huge_layer_ranges_are_answered_at_once():
    start = time.perf_counter()
    for text in ("0-99999999999", "1-99999999999", "5,0-999999999999999999999"):
        with pytest.raises(ValueError, match="beyond any model"):
            parse_layer_ranges(text)
        with pytest.raises(ValueError, match="layer .* does not exist .* 0-47"):
            parse_layer_ranges(text, num_layers=48)
        with pytest.raises(ValueError, match="--cache-size-override: layer"):
            parse_override([text, "8"])
    assert time.perf_counter() - start < 0.5


def test_layer_ranges_syntax():
    assert parse_layer_ranges("0-3,46-47", num_layers=48) == [0, 1, 2, 3, 46, 47]
    for bad, message in [("", "empty layer range"), (" , ", "empty layer range"), ("3-1", "backwards"),
                         ("1;2", "cannot read"), ("-1", "cannot read")]:
        with pytest.raises(ValueError, match=message):
            parse_layer_ranges(bad, num_layers=48)
    with pytest.raises(ValueError, match="must not be negative"):
        parse_override(["0-2", "-5"])


@pytest.mark.parametrize("argv, message", [
    (["simulate", "{t}", "-f", "0-99999999999"], "-f/--pin-layers: layer 99999999999 does not exist"),
    (["simulate", "{t}", "--cache-size-override", "1-99999999999", "8"], "--cache-size-override: layer"),
    (["simulate", "{t}", "-f", ""], "empty layer range"),
    (["simulate", "{t}", "--memory-budget", "1e400B"], "--memory-budget: size '1e400B' is too large"),
    (["simulate", "{t}", "--memory-budget", ""], "--memory-budget: cannot read size ''"),
    (["estimate", "--model", "glm-5", "--machine", "rtx3090-128g", "--u", "1", "--d", "1",
      "--pin-layers", "0-99999999999"], "--pin-layers: layer 99999999999 does not exist"),
    (["estimate", "--model", "glm-5", "--machine", "rtx3090-128g", "--u", "1", "--d", "1",
      "--pin-layers", "4"], "write 3-6 for the first 4 MoE layers"),
    (["estimate", "--model", "glm-5", "--machine", "rtx3090-128g", "--u", "1", "--d", "1",
      "--ram", "nan"], "--ram: cannot read size 'nan'"),
    (["predict", "{t}", "--max-bytes=-1GB"], "--max-bytes: cannot read size"),
    (["simulate", "{t}", "-c", "1000"], "-c/--cache-size 1000: the trace's layers have only 12 experts"),
    (["simulate", "{t}", "--cache-size-override", "0-1", "13"],
     "--cache-size-override 0-1 13: the trace's layers have only 12 experts"),
    (["plot", "{t}", "-c", "1000", "--out", "{t}.charts"], "-c/--capacity 1000: give 3 (top-k) to 12"),
    (["predict", "{t}", "--depth", "100000"], "--depth 100000: the traces have 3 MoE layers"),
    (["estimate", "--model", "glm-5", "--machine", "rtx3090-128g", "--u", "1", "--d", "1", "--sweep",
      "--points", "1000000000"], "--points must lie in [2, 1000]"),
])
def test_commands_share_the_parsers_and_bound_their_work(tmp_path, capsys, argv, message):
    from golem.runtime.trace import save_trace
    from trace_factory import random_trace

    path = tmp_path / "t.npz"
    save_trace(path, random_trace(0, n=50))
    start = time.perf_counter()
    rc = trace_main([a.format(t=path) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert time.perf_counter() - start < 5
