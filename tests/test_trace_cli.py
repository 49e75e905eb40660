"""`golem-trace stats|simulate|plot`: JSON last line, the numbers of the library API, and
clear errors (exit code 2, no traceback) for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from golem.runtime.units import parse_size
from golem.runtime.analysis.profile import profile_from_traces, save_profile
from golem.runtime.analysis.simulate import belady, simulate
from golem.runtime.trace import load_trace, save_trace
from golem.runtime.cli.trace import main

from test_simulate import reference_lru
from trace_factory import make_trace, random_trace


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def traces(tmp_path):
    a, b = random_trace(0, n=200, layers=3, num_experts=12, k=3), random_trace(1, n=200, layers=3, num_experts=12, k=3)
    save_trace(tmp_path / "a.npz", a)
    save_trace(tmp_path / "b.npz", b)
    return tmp_path / "a.npz", tmp_path / "b.npz"


def test_simulate_json_matches_the_api(capsys, traces):
    a, b = traces
    rc, out, _ = run_cli(capsys, "simulate", a, b, "--policy", "lru", "--capacity", 5, "--json")
    assert rc == 0
    got = last_json(out)
    ts = [load_trace(a), load_trace(b)]
    want = simulate(ts, policy="lru", cache_size=5)
    assert {"policy", "capacity", "requests", "misses", "miss_ratio", "belady_miss_ratio"} <= set(got)
    assert (got["policy"], got["capacity"]) == ("lru", 5)
    assert (got["requests"], got["misses"]) == (want.total_requests, want.total_misses)
    assert got["belady_misses"] == belady(ts, 5).total_misses
    assert got["belady_miss_ratio"] <= got["miss_ratio"]
    assert [r["misses"] for r in got["per_layer"]] == want.misses.tolist()


def test_simulate_olmoe_slices_match_reference_lru(capsys, tmp_path, olmoe_traces):
    paths, parts = [], []
    for name in ("general", "coding"):
        t = load_trace(olmoe_traces / f"{name}.npz")
        part = make_trace(t.experts[:1000], 64, seq_offsets=np.arange(0, 1001, 125))
        part.meta = dict(t.meta)
        save_trace(tmp_path / f"{name}.npz", part)
        paths.append(tmp_path / f"{name}.npz")
        parts.append(part.experts)
    rc, out, _ = run_cli(capsys, "simulate", *paths, "--policy", "lru", "--capacity", 32, "--json")
    got = last_json(out)
    assert rc == 0 and got["misses"] == reference_lru(np.concatenate(parts), 32)
    assert got["requests"] == 2 * 1000 * 16 * 8


def test_simulate_with_budget_warm_start_and_flags(capsys, tmp_path, traces):
    a, b = traces
    save_profile(profile_from_traces(load_trace(b)), tmp_path / "p.json")
    rc, out, _ = run_cli(capsys, "simulate", a, "--memory-budget", "30KB", "--plan-stats", b,
                         "-W", tmp_path / "p.json", "--policy", "lfu-decay", "--prefetch-recall", 0.5, "--json")
    assert rc == 0
    got = last_json(out)
    assert got["plan"]["total_nbytes"] <= parse_size("30KB")
    assert sum(got["plan"]["slots"]) * 1000 <= 30_000
    assert got["warm_start"].endswith("p.json") and got["prefetched"] > 0
    assert "of 30.00 KB budget" in out
    rc, out, _ = run_cli(capsys, "simulate", a, "-c", 4, "-f", "1", "--cache-size-override", "2", "6",
                         "-R", 3, "--no-belady", "--json")
    got = last_json(out)
    assert rc == 0 and got["capacity"] == [4, 12, 6] and got["pinned_layers"] == [1]
    assert got["per_layer"][1]["misses"] == 0 and got["belady_miss_ratio"] is None
    assert got["warm_start"] == "random:3"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "missing.npz"], "missing.npz: no such trace file"),
        (["simulate", "{a}", "-c", "2"], "smaller than top-k (3)"),
        (["simulate", "{a}", "--memory-budget", "lots"], "--memory-budget: cannot read size 'lots'"),
        (["simulate", "{a}", "--memory-budget", "5KB"], "short"),
        (["simulate", "{a}", "-W", "nowhere.json"], "nowhere.json: no such trace, folder or profile"),
        (["simulate", "{a}", "--policy", "mru"], "unknown policy 'mru'"),
        (["simulate", "{a}", "-f", "7"], "-f/--pin-layers: layer 7 does not exist"),
        (["stats", "{a}", "--coverages", "0.5,x"], "--coverages: cannot read"),
        (["stats", "{a}", "--coverages", "0.9,0.5"], "ascending"),
    ],
)
def test_bad_input_is_a_clear_error(capsys, traces, argv, message):
    argv = [x.format(a=traces[0]) for x in argv]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert message in err and "Traceback" not in err


def test_stats(capsys, traces):
    a, b = traces
    rc, out, _ = run_cli(capsys, "stats", a, b, "--window", 50, "--chunk", 40, "--json")
    assert rc == 0
    got = last_json(out)
    assert got["steps"] == 400 and got["num_layers"] == 3
    ta, tb = load_trace(a), load_trace(b)
    both = np.concatenate([ta.experts, tb.experts])
    for row in got["layers"]:
        col = both[:, row["layer"]].ravel()
        assert row["distinct"] == len(np.unique(col))
        counts = np.bincount(col, minlength=12) / col.size
        counts = counts[counts > 0]
        assert row["entropy_bits"] == pytest.approx(-(counts * np.log2(counts)).sum(), abs=1e-3)
    assert got["chunks"]["chunk"] == 40 and got["chunks"]["num_chunks"] == 10
    assert "chunk analysis" in out and "U mean" in out


def test_output_into_a_closed_pipe_is_no_error(traces):
    """``golem-trace stats ... | head -0``: the reader is gone before the first line."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, "-m", "golem.runtime.cli.trace", "stats", str(traces[0])],
                          stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr


def test_plot_draws_pngs(capsys, tmp_path, traces):
    pytest.importorskip("matplotlib")
    a, b = traces
    rc, out, _ = run_cli(capsys, "plot", a, b, "--out", tmp_path / "charts", "-c", 5, "--window", 20, "--json")
    assert rc == 0
    got = last_json(out)
    assert [c["chart"] for c in got["charts"]] == ["hit-rate", "warm-start", "overlap"]
    for c in got["charts"]:
        with open(c["path"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rc, out, err = run_cli(capsys, "plot", a, "--charts", "overlap", "--out", tmp_path / "x")
    assert rc == 2 and "needs two traces" in err


def test_plot_without_matplotlib_says_how_to_get_it(capsys, monkeypatch, traces):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    rc, out, err = run_cli(capsys, "plot", traces[0])
    assert rc == 2
    assert 'needs matplotlib: pip install "golem-moe[plot]"' in err and "Traceback" not in err


def test_plot_numbers_without_matplotlib(traces):
    from golem.runtime.cli.trace_commands.plot import expert_overlap, hit_rate_over_time, warm_start_hit_rates

    ta = load_trace(traces[0])
    rates = hit_rate_over_time([ta], policy="lru", cache_size=5, window=50)
    assert rates.shape == (3, 4)
    assert rates.mean() * 1.0 == pytest.approx(simulate(ta, policy="lru", cache_size=5).hit_ratio, abs=1e-9)
    by_start = warm_start_hit_rates([ta], policy="lru", cache_size=5, seed=0)
    assert set(by_start) == {"empty", "random (seed 0)", "profile"}
    ov = expert_overlap(ta, ta, 5)
    assert ov["top_overlap"].tolist() == [1.0] * 3
    np.testing.assert_allclose(ov["distribution_overlap"], 1.0)


def test_plot_defaults_to_golem_runs_policy_and_labels_every_chart(capsys, monkeypatch, tmp_path, traces):
    pytest.importorskip("matplotlib")
    from golem.runtime.cli.trace_commands import plot
    from golem.runtime.policies import DEFAULT_POLICY

    figures = []
    draw = plot._figure
    monkeypatch.setattr(plot, "_figure", lambda *a, **k: figures.append(draw(*a, **k)) or figures[-1])
    rc, out, _ = run_cli(capsys, "plot", *traces, "--out", tmp_path / "charts", "-c", 5, "--json")
    assert rc == 0 and last_json(out)["policy"] == DEFAULT_POLICY
    assert len(figures) == 3
    for fig in figures:
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel()
        assert "a.npz" in ax.get_title() and "b.npz" in ax.get_title()


def test_long_work_shows_progress_on_stderr_and_keeps_json_clean(capsys, monkeypatch, traces):
    from golem.runtime.cli import progress

    monkeypatch.setattr(progress, "LONG_WORK", 0)  # every replay counts as long
    rc, out, err = run_cli(capsys, "simulate", *traces, "--capacity", 5, "--json")
    assert rc == 0 and "simulate" in err and "/6" in err  # 3 layers replayed, then Belady's 3
    got = last_json(out)
    assert got["capacity"] == 5 and "simulate" not in out


def test_short_work_off_a_terminal_stays_silent(capsys, traces):
    rc, out, err = run_cli(capsys, "simulate", *traces, "--capacity", 5, "--json")
    assert rc == 0 and err == ""


def test_a_terminal_gets_a_bar():
    import io

    from golem.runtime.cli.progress import progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    with progress_bar(4, "replays", stream=term) as bar:
        for _ in range(4):
            bar.update(1)
    assert "replays" in term.getvalue()
    quiet = io.StringIO()
    with progress_bar(4, "replays", stream=quiet) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""


def test_simulate_pins_the_models_layer_numbers_when_the_trace_records_them(capsys, tmp_path):
    t = random_trace(0, n=100, layers=3, num_experts=12, k=3)
    t.meta = {**t.meta, "moe_layers": [1, 2, 3]}  # decoder layer 0 is dense
    save_trace(tmp_path / "t.npz", t)
    rc, out, _ = run_cli(capsys, "simulate", tmp_path / "t.npz", "-f", "2-3", "-c", 4, "--json")
    got = last_json(out)  # reported by the numbers -f takes, as golem-run's table
    assert rc == 0 and got["pinned_layers"] == [2, 3]
    assert [(r["layer"], r["pinned"]) for r in got["per_layer"]] == [(1, False), (2, True), (3, True)]
    rc, _, err = run_cli(capsys, "simulate", tmp_path / "t.npz", "-f", "0", "-c", 4)
    assert rc == 2 and "names no MoE layer" in err
    rc, _, err = run_cli(capsys, "simulate", tmp_path / "t.npz", "-f", "4", "-c", 4)
    assert rc == 2 and "layer 4 does not exist" in err
    t.meta["moe_layers"] = [3, 2, 1]
    with pytest.raises(ValueError, match="moe_layers must list 3 rising"):
        save_trace(tmp_path / "bad.npz", t)


@pytest.mark.parametrize("bench", ["bench_plan", "bench_policies", "bench_warmup", "bench_predictors"])
def test_trace_benchmarks_say_how_to_record_a_missing_trace(tmp_path, bench):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{bench}.py"
    missing = tmp_path / "general.npz"
    proc = subprocess.run([sys.executable, str(script), str(missing), str(tmp_path / "coding.npz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"no trace at {missing}" in proc.stderr and "golem-run --model MODEL" in proc.stderr
    assert "--trace-out FILE" in proc.stderr


def test_errors_are_one_line_in_the_commands_form(capsys, tmp_path):
    from golem.runtime.cli import error_line

    assert error_line("golem-run", ValueError("first\nsecond")) == "golem-run: error: first"
    assert error_line("golem-trace stats", OSError()) == "golem-trace stats: error: OSError"
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    rc, out, err = run_cli(capsys, "stats", bad)
    assert rc == 2 and not out and err.startswith("golem-trace stats: error: ") and err.count("\n") == 1
