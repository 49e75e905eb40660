"""golem-chat against stock mlx_lm.chat on the same generated checkpoint: the same turns on
stdin (two questions, a reset, a third, then 'q') print the same conversation, while golem
streams experts from disk; bad flags are one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

TURNS = "Hello there\nHow are the experts today?\nr\nTell me about disks.\nq\n"
TIMING = re.compile(r"tok/s")  # the per-turn speed line differs run to run


def conversation(stdout: str) -> list:
    """stdout without the per-turn speed lines and golem's line of help (its ``s`` command)."""
    from golem.runtime.cli.chat import STATS_HELP

    return [line for line in stdout.splitlines() if not TIMING.search(line) and line != STATS_HELP]


def test_chat_equals_stock(checkpoints, tmp_path):
    from golem.runtime.trace import load_trace

    model = str(checkpoints("qwen3_moe"))
    trace = tmp_path / "chat.npz"
    common = ["--model", model, "--max-tokens", "10"]
    env = {**os.environ, "COLUMNS": "100"}
    golem = subprocess.Popen(
        [sys.executable, "-m", "golem.runtime.cli.chat", *common, "-c", "6", "--prefetch-depth", "1",
         "--trace-out", str(trace)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stock = subprocess.Popen(
        [sys.executable, "-c", "from mlx_lm.chat import main; main()", *common],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        golem_out, golem_err = golem.communicate(TURNS, timeout=120)
        stock_out, stock_err = stock.communicate(TURNS, timeout=120)
    finally:
        for p in (golem, stock):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert stock.returncode == 0, stock_err
    assert golem.returncode == 0, golem_err
    assert "Traceback" not in golem_err
    assert conversation(golem_out) == conversation(stock_out)
    # The three answers came through golem's engine, and 'q' closed the model (the trace is
    # written): one sequence per answer, each of at least 9 decode steps after its prompt.
    recorded = load_trace(trace)
    assert len(recorded.seq_offsets) - 1 == 3
    assert int((~recorded.prefill).sum()) >= 3 * 9


def test_model_is_required(capsys):
    from golem.runtime.cli.chat import main

    with pytest.raises(SystemExit) as exit_:
        main(["--max-tokens", "4"])  # mlx_lm.chat's default model is dense
    assert exit_.value.code == 2
    assert "golem-chat: error: --model is required" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["-c", "2"], "top-k"),  # fewer slots than the model's top-k (4)
    (["--prefetch-depth", "0", "--threshold", "0.5"], "--threshold needs a prefetch depth"),
])
def test_bad_flag_is_one_line(checkpoints, capsys, flags, message):
    from golem.runtime.cli.chat import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(checkpoints("qwen3_moe")), *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "golem-chat: error:" in err and message in err and "Traceback" not in err


def test_stats_command_and_exit_print_the_expert_figures(checkpoints):
    done = subprocess.run(
        [sys.executable, "-m", "golem.runtime.cli.chat", "--model", str(checkpoints("qwen3_moe")), "-m", "6",
         "-c", "6", "--prefetch-depth", "1"],
        input="Hello there\ns\nq\n", capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    # On the command: the totals and one row per MoE layer, on stdout.
    shown = [line for line in done.stdout.splitlines() if line.startswith(("Experts:", "Prefetch:"))]
    assert len(shown) == 2 and "hit rate" in shown[0] and "recall" in shown[1]
    rows = [line.split() for line in done.stdout.splitlines() if re.match(r"^\s+\d+\s+6 of 16\s", line)]
    assert rows and sum(int(r[4]) + int(r[5]) for r in rows) == int(shown[0].split(" of ")[1].split()[0])
    # At exit, on stderr: the same figures (nothing ran after the command).
    at_exit = [line for line in done.stderr.splitlines() if line.startswith(("Experts:", "Prefetch:"))]
    assert at_exit == shown


def test_a_prompt_that_is_not_text_is_one_line(checkpoints):
    done = subprocess.run(
        [sys.executable, "-m", "golem.runtime.cli.chat", "--model", str(checkpoints("qwen3_moe")), "-m", "4",
         "-c", "6"], input=b"\xff\xfe\x00abc\nq\n", capture_output=True, timeout=120)
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 2 and "Traceback" not in err
    *progress, last = err.strip().splitlines()  # the load's summary line comes first when piped
    assert last.startswith("golem-chat: error: standard input: not UTF-8 text (byte 0xff at offset 0)")
    assert all(line.startswith("[golem] ") for line in progress)
