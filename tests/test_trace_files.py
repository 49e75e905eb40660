"""golem-trace/1 files: a damaged or odd trace is refused with one line naming the file and
the array, by the library (``TraceError``) and by every golem-trace command (exit 2, no
traceback); a valid one loads unchanged."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from golem.runtime.cli.trace import main
from golem.runtime.trace import TraceError, load_trace, save_trace

from trace_factory import random_trace


def _arrays(n=40, layers=3, experts=12, k=3, **meta):
    t = random_trace(0, n=n, layers=layers, num_experts=experts, k=k)
    out = {
        "experts": t.experts.astype(np.int64),
        "weights": np.ones(t.experts.shape, np.float32),
        "seq_offsets": np.array([0, n], np.int64),
        "meta": np.array(json.dumps({"format": "golem-trace/1", "num_layers": layers, "num_experts": experts,
                                     "top_k": k, "expert_bytes": 1000, **meta})),
    }
    return out


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_a_valid_trace_loads_with_its_dtypes(tmp_path):
    path = _write(tmp_path / "ok.npz", **_arrays())
    t = load_trace(path)
    assert t.experts.dtype == np.int16 and t.weights.dtype == np.float32 and t.num_steps == 40


def _damaged(tmp_path):
    """(name, path, what the message must say)."""
    cases = []
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    cases.append(("empty", empty, "empty file"))
    good = _write(tmp_path / "good.npz", **_arrays(n=2000))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases.append(("truncated", truncated, "truncated or damaged"))
    text = tmp_path / "notes.npz"
    text.write_text("this is not a trace\n")
    cases.append(("text", text, "not a golem-trace/1 .npz"))
    npy = tmp_path / "one.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    cases.append(("npy", npy, "single .npy array"))
    a = _arrays()
    a["meta"] = np.array(json.dumps([1, 2, 3]))
    cases.append(("meta list", _write(tmp_path / "meta_list.npz", **a), "'meta' is not a JSON object"))
    a = _arrays()
    a["meta"] = np.array("{not json")
    cases.append(("meta text", _write(tmp_path / "meta_text.npz", **a), "not valid JSON"))
    cases.append(("huge experts", _write(tmp_path / "huge.npz", **_arrays(num_experts=10**12)), "num_experts"))
    a = _arrays()
    a["meta"] = np.array(json.dumps({"num_layers": 3, "num_experts": "12", "top_k": 3}))
    cases.append(("experts as text", _write(tmp_path / "str.npz", **a), "whole number"))
    a = _arrays()
    a["experts"][0, 0, 0] = 65541  # 65541 as int16 would be 5
    cases.append(("id beyond int16", _write(tmp_path / "wrap.npz", **a), "ids outside [-1, 12)"))
    a = _arrays()
    a["experts"] = a["experts"].astype(np.float32)
    cases.append(("float ids", _write(tmp_path / "float.npz", **a), "'experts' must hold integers"))
    a = _arrays()
    a["weights"][1, 1, 1] = np.nan
    cases.append(("nan weights", _write(tmp_path / "nan.npz", **a), "'weights' holds NaN"))
    cases.append(("negative bytes", _write(tmp_path / "neg.npz", **_arrays(expert_bytes=-5)), "expert_bytes=-5"))
    a = _arrays()
    a["weights"] = a["weights"][:, :, :2]
    cases.append(("shape", _write(tmp_path / "shape.npz", **a), "'weights' shape"))
    a = _arrays()
    a["experts"] = np.array([object()], dtype=object)
    np.savez(tmp_path / "pickled.npz", **a)
    cases.append(("pickled", tmp_path / "pickled.npz", "Python objects"))
    a = _arrays()
    del a["seq_offsets"]
    cases.append(("missing", _write(tmp_path / "missing.npz", **a), "missing ['seq_offsets']"))
    cases.append(("folder", tmp_path, "is a folder"))
    cases.append(("absent", tmp_path / "absent.npz", "golem-run --trace-out"))
    return cases


def test_damaged_traces_are_named_errors(tmp_path):
    for name, path, message in _damaged(tmp_path):
        with pytest.raises(TraceError) as info:
            load_trace(path)
        text = str(info.value)
        assert message in text, (name, text)
        assert str(path) in text, (name, text)
        assert "allow_pickle" not in text and "unsafely" not in text, (name, text)


@pytest.mark.parametrize("command", ["stats", "simulate", "predict", "estimate"])
def test_every_command_answers_a_damaged_trace_in_one_line(tmp_path, capsys, command):
    for name, path, message in _damaged(tmp_path):
        if name == "folder":  # a folder on the command line stands for the traces inside it
            continue
        argv = [command, str(path)]
        if command == "estimate":
            argv = ["estimate", "--model", "olmoe-1b-7b", "--machine", "ddr5-96g-cpu", "--trace", str(path)]
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (command, name)
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (command, name, err)


def test_a_zero_step_trace_has_no_steps_to_simulate(tmp_path, capsys):
    empty = _arrays(n=1)
    empty["experts"] = np.zeros((0, 3, 3), np.int16)
    empty["weights"] = np.zeros((0, 3, 3), np.float32)
    empty["seq_offsets"] = np.array([0], np.int64)
    path = _write(tmp_path / "zero.npz", **empty)
    assert load_trace(path).num_steps == 0
    for argv in (["simulate", path], ["stats", path], ["predict", path], ["plot", path, "--out", tmp_path / "c"],
                 ["estimate", "--model", "olmoe-1b-7b", "--machine", "ddr5-96g-cpu", "--trace", path]):
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert f"{path}: no decode steps to replay" in err and len(err.strip().splitlines()) == 1, err


def test_save_refuses_what_load_would_refuse(tmp_path):
    t = random_trace(0, n=10)
    t.weights[0, 0, 0] = np.nan
    with pytest.raises(TraceError, match="NaN"):
        save_trace(tmp_path / "x.npz", t)


def test_an_internal_error_keeps_its_traceback(tmp_path):
    """A bug is not a user mistake: golem-trace leaves Python's traceback in place."""
    path = tmp_path / "t.npz"
    save_trace(path, random_trace(0, n=50))
    code = (
        "import sys, golem.runtime.cli.trace_commands.stats as s\n"
        "def boom(*a, **k): raise KeyError('bug')\n"
        "s.layer_stats = boom\n"
        "from golem.runtime.cli.trace import main\n"
        f"sys.exit(main(['stats', {str(path)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError" in proc.stderr
