"""One layer numbering everywhere: golem-run's table, its trace, and every golem-trace report
name MoE layers by the checkpoint's decoder layer numbers (qwen3_moe's layer 0 is dense, so
its MoE layers are 1..L-1, not 0..L-2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from golem.runtime.cli.run import main as golem_run
from golem.runtime.cli.trace import main as golem_trace
from golem.runtime.trace import load_trace


def _table_layers(out: str) -> list[int]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "slots"])
    rows = []
    for line in lines[start + 1:]:
        first = line.split()[0] if line.split() else ""
        if not first.isdigit():
            break
        rows.append(int(first))
    return rows


def test_run_table_trace_and_reports_share_the_checkpoints_layer_numbers(checkpoints, capsys, tmp_path):
    model = checkpoints("qwen3_moe")
    config = json.loads((model / "config.json").read_text())
    dense = set(config["mlp_only_layers"])
    expected = [i for i in range(config["num_hidden_layers"]) if i not in dense]
    assert expected[0] > 0  # a dense first layer: numbering by position would differ

    trace_path = tmp_path / "t.npz"
    assert golem_run(["--model", str(model), "-c", "4", "-m", "6", "-p", "hello there", "--stats",
                      "--trace-out", str(trace_path)]) == 0
    out = capsys.readouterr().out
    assert _table_layers(out) == expected
    trace = load_trace(trace_path)
    assert trace.layer_numbers == expected == trace.meta["moe_layers"]

    assert golem_trace(["stats", str(trace_path), "--json"]) == 0
    out = capsys.readouterr().out
    stats = json.loads(out.strip().splitlines()[-1])
    assert [row["layer"] for row in stats["layers"]] == expected
    printed = [int(line.split()[0]) for line in out.splitlines() if line.split() and line.split()[0].isdigit()
               and "bits" in line]
    assert printed == expected

    assert golem_trace(["simulate", str(trace_path), "-c", "4", "-f", str(expected[1]), "--json"]) == 0
    out = capsys.readouterr().out
    sim = json.loads(out.strip().splitlines()[-1])
    assert [row["layer"] for row in sim["per_layer"]] == expected
    assert sim["pinned_layers"] == [expected[1]]  # -f names the layer golem-run's -f would
    assert _table_layers(out) == expected
    pinned_row = next(line for line in out.splitlines() if line.split()[:1] == [str(expected[1])])
    assert "pinned" in pinned_row


def test_traces_without_recorded_numbers_count_from_zero():
    from trace_factory import make_trace

    t = make_trace(np.zeros((2, 3, 1), dtype=np.int16), num_experts=4)
    assert t.layer_numbers == [0, 1, 2]


def test_chart_axes_are_labelled_with_layer_numbers():
    pytest.importorskip("matplotlib")
    from golem.runtime.cli.trace_commands.plot import _figure, _layer_ticks

    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(3), [1, 2, 3])
    _layer_ticks(ax.xaxis, [1, 5, 9])
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()] == ["1", "5", "9"]
