"""benchmarks/bench_io.py's optional comparison: aiofiles (the ``bench`` extra) measured when
installed, skipped with a note naming the extra when not."""

from __future__ import annotations

import sys

import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench_io():
    return load_benchmark("bench_io")


def small_experts(bench_io, tmp_path):
    """A file of the benchmark's layout with 512 bytes per expert part (9 parts per expert)."""
    per = 512
    tensors, offset = {}, 0
    for layer in range(bench_io.LAYERS):
        for proj in bench_io.PROJECTIONS:
            for part, _, _ in bench_io.PARTS:
                nbytes = bench_io.EXPERTS * per
                tensors[f"model.layers.{layer}.mlp.switch_mlp.{proj}.{part}"] = (offset, offset + nbytes)
                offset += nbytes
    path = tmp_path / "experts.bin"
    path.write_bytes(bytes(range(256)) * (offset // 256 + 1))
    return path, bench_io.Experts(path, tensors, split=1)


def test_aiofiles_row_is_skipped_with_the_extra_named_when_missing(bench_io, tmp_path, monkeypatch, capsys):
    path, experts = small_experts(bench_io, tmp_path)
    monkeypatch.setitem(sys.modules, "aiofiles", None)  # import aiofiles -> ImportError
    got = bench_io.compare_aiofiles(experts, path, 20 * experts.nbytes, 2, 2, bench_io.FileHandles)
    assert got is None
    out = capsys.readouterr().out
    assert "aiofiles vs preadv: skipped" in out and 'pip install -e ".[bench]"' in out


def test_aiofiles_row_is_measured_when_installed(bench_io, tmp_path, capsys):
    pytest.importorskip("aiofiles")
    path, experts = small_experts(bench_io, tmp_path)
    got = bench_io.compare_aiofiles(experts, path, 20 * experts.nbytes, 2, 2, bench_io.FileHandles)
    assert set(got) == {"aiofiles_gb_per_s", "preadv_executor_gb_per_s", "aiofiles_cpu_s_per_gb",
                        "preadv_executor_cpu_s_per_gb"}
    assert got["aiofiles_gb_per_s"] > 0 and got["preadv_executor_gb_per_s"] > 0
    assert "aiofiles (seek+readinto, 2 tasks)" in capsys.readouterr().out
