"""Every cache option of golem-run keeps the output identical to stock mlx-lm; budgets hold."""

from __future__ import annotations

import sys

import pytest

from golem.runtime.cli.run import main as golem_run

PROMPT = ["-p", "Once upon a time there was a small computer", "--temp", "0", "-m", "16"]


@pytest.fixture(scope="module")
def stock_text(checkpoints):
    cache = {}

    def get(family, capsys, monkeypatch):
        if family not in cache:
            from mlx_lm.generate import main as mlx_generate

            monkeypatch.setattr(sys, "argv", ["mlx_lm.generate", "--model", str(checkpoints(family)), *PROMPT])
            mlx_generate()
            cache[family] = capsys.readouterr().out.split("=" * 10)[1]
        return cache[family]

    return get


def golem_text(argv, capsys):
    assert golem_run(argv) == 0
    out = capsys.readouterr().out
    return out.split("=" * 10)[1], out


@pytest.mark.parametrize("options", [
    ["-c", "5"],
    ["-c", "4", "--cache-size-override", "1-2", "8", "--cache-size-override", "2", "12"],
    ["-c", "4", "-f", "0,3"],
    ["--memory-budget", "1.05MB", "--prefetch-depth", "0"],  # (auto's staging buffers would not fit beside it)
    ["-c", "6", "-R", "7"],
    ["-c", "4", "--policy", "lfu"],
    ["-c", "4", "--policy", "lfu-decay"],
    ["-c", "4", "--policy", "lru-k"],
    ["-c", "4", "--prefetch-depth", "2", "--threshold", "0.3", "--policy", "lfu"],
])
def test_options_keep_output_identical(checkpoints, stock_text, capsys, monkeypatch, options):
    expected = stock_text("qwen3_next", capsys, monkeypatch)
    text, out = golem_text(["--model", str(checkpoints("qwen3_next")), *PROMPT, *options, "--stats"], capsys)
    assert text == expected


def test_warm_start_from_trace_and_saved_profile(checkpoints, stock_text, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("GOLEM_CACHE", str(tmp_path / "cache"))
    expected = stock_text("olmoe", capsys, monkeypatch)
    model = str(checkpoints("olmoe"))
    trace = tmp_path / "run.npz"
    text, _ = golem_text(["--model", model, *PROMPT, "-c", "6", "--trace-out", str(trace), "--save-profile"], capsys)
    assert text == expected
    assert (tmp_path / "cache" / "profiles" / "olmoe" / "golem-profile.json").is_file()
    for source in (str(trace), "saved"):
        text, out = golem_text(["--model", model, *PROMPT, "-c", "6", "-W", source, "--stats"], capsys)
        assert text == expected
    # the warm start pays: fewer misses than a cold start with the same cache
    cold = golem_text(["--model", model, *PROMPT, "-c", "6"], capsys)[1]
    warm = golem_text(["--model", model, *PROMPT, "-c", "6", "-W", "saved"], capsys)[1]

    def misses(out):
        return int(out.split("Experts:")[1].split(" read (")[0].rsplit(" ", 1)[-1])

    assert misses(warm) < misses(cold)


def test_budget_is_never_exceeded(checkpoints, capsys):
    from golem.runtime import load
    from golem.runtime.units import parse_size

    model = str(checkpoints("deepseek_v3"))
    for budget in ("0.96MB", "1.1MB", "1.5MB", "3MB"):
        with load(model, memory_budget=budget) as (m, _):
            runtime = m.golem
            scheduler = runtime.engine.scheduler
            settings = None if scheduler is None else scheduler.settings
            staging = 0 if settings is None else settings.num_buffers * settings.buffer_nbytes
            used = runtime.non_expert_nbytes + sum(p.nbytes for p in runtime.engine.pools.values()) + staging
            plan = runtime.plan
        assert used <= parse_size(budget), (budget, used)
        assert plan.total_nbytes <= parse_size(budget)


def test_bad_cache_flags_are_clear_errors(checkpoints, capsys):
    model = str(checkpoints("mixtral"))
    for argv, words in [
        (["--memory-budget", "10KB"], ["--memory-budget", "short"]),
        (["--memory-budget", "lots"], ["--memory-budget", "lots"]),
        (["-f", "3-1"], ["-f"]),
        (["-c", "4", "--policy", "fifo"], ["fifo"]),
        (["-R", "1", "-W", "x.npz"], ["-R/--warm-random", "-W/--warm-start"]),
        (["-W", "/nonexistent/trace.npz"], ["/nonexistent/trace.npz"]),
    ]:
        assert golem_run(["--model", model, "-m", "2", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and all(w in err for w in words), (argv, err)
