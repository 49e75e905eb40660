"""Feedback before the first token: building the demo checkpoint, loading and the warm start
report their bytes; golem's commands draw them as one live line on a terminal and as one
summary line elsewhere (a file, a pipe), never on stdout."""

from __future__ import annotations

import io

import mlx.core as mx
import pytest

from golem.runtime.cli.progress import StageProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _feed(progress: StageProgress, clock: Clock) -> None:
    progress("loading", 0, 2000)
    clock.now += 0.05
    progress("loading", 500, 2000)  # within interval_s of the last draw: not redrawn
    clock.now += 0.2
    progress("loading", 1000, 2000)
    clock.now += 1.25
    progress("loading", 2000, 2000)  # the end is always drawn
    progress("warm start", 0, 300)
    clock.now += 0.5
    progress("warm start", 300, 300)


SUMMARY = "[golem] loading 2.00 KB in 1.50 s; warm start 300 B in 0.50 s\n"


def test_a_terminal_gets_a_live_line_then_the_summary():
    clock, term = Clock(), Terminal()
    with StageProgress(term, clock=clock) as progress:
        _feed(progress, clock)
    out = term.getvalue()
    draws = out.split("\r\x1b[K")
    assert draws[1:] == ["[golem] loading: 0 B of 2.00 KB (0%)", "[golem] loading: 1.00 KB of 2.00 KB (50%)",
                         "[golem] loading: 2.00 KB of 2.00 KB (100%)", "[golem] warm start: 300 B of 300 B (100%)",
                         SUMMARY]


def test_a_file_or_pipe_gets_one_summary_line():
    clock, pipe = Clock(), io.StringIO()
    with StageProgress(pipe, clock=clock) as progress:
        _feed(progress, clock)
        assert pipe.getvalue() == ""
    assert pipe.getvalue() == SUMMARY


def test_a_failure_leaves_no_half_line_and_no_summary():
    clock, term = Clock(), Terminal()
    with pytest.raises(KeyboardInterrupt):
        with StageProgress(term, clock=clock) as progress:
            progress("loading", 10, 20)
            raise KeyboardInterrupt
    assert term.getvalue().endswith("\r\x1b[K") and "\n" not in term.getvalue()


def _calls(record):
    by_stage = {}
    for stage, done, total in record:
        by_stage.setdefault(stage, []).append((done, total))
    return by_stage


def test_load_reports_loading_and_the_warm_start_and_changes_no_token(checkpoints):
    from mlx_lm import generate

    import golem.runtime

    path = checkpoints("qwen3_moe")
    record = []
    texts = []
    for progress in (None, lambda *a: record.append(a)):
        with golem.runtime.load(path, cache_size=4, warm_start=7, progress=progress) as (model, tokenizer):
            pools = model.golem.engine.pools
            mx.random.seed(0)
            texts.append(generate(model, tokenizer, "the same prompt", max_tokens=8))
    assert texts[0] == texts[1]
    stages = _calls(record)
    assert list(stages) == ["loading", "warm start"]
    for calls in stages.values():
        dones = [d for d, _ in calls]
        assert dones[0] == 0 and dones == sorted(dones) and dones[-1] == calls[0][1]
        assert len({t for _, t in calls}) == 1
    warm_total = stages["warm start"][0][1]
    assert warm_total == sum(4 * p.expert_nbytes for p in pools.values())


def test_the_demo_build_reports_its_bytes(tmp_path):
    from golem.runtime.synthetic import TINY, build_checkpoint

    record = []
    path = build_checkpoint("olmoe", tmp_path / "m", size=TINY, progress=lambda d, t: record.append((d, t)))
    dones = [d for d, _ in record]
    total = record[0][1]
    assert dones[0] == 0 and dones == sorted(dones) and dones[-1] == total
    on_disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert total <= on_disk < total + 64 * 1024  # the tensors, plus headers
    record.clear()
    build_checkpoint("olmoe", tmp_path / "m", size=TINY, progress=lambda d, t: record.append((d, t)))
    assert record == []  # already built: nothing to report


def test_golem_run_writes_one_summary_line_when_not_on_a_terminal(checkpoints, capsys):
    from golem.runtime.cli.run import main as golem_run

    assert golem_run(["--model", str(checkpoints("qwen3_moe")), "-c", "4", "-R", "1", "-m", "4",
                      "-p", "hello"]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("[golem] loading")]
    assert len(lines) == 1 and "; warm start " in lines[0] and "\r" not in err
    assert "[golem]" not in out
