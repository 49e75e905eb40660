"""Traces too big or inconsistent are refused before their arrays are read (declared sizes
in the archive, .npy headers, shapes against the meta), and routing that cannot be real
(an expert twice in a step, negative scores, more experts than top-k) is named."""

from __future__ import annotations

import io
import json
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

import golem.runtime.trace as trace_mod
from golem.runtime.analysis.simulate import belady, simulate
from golem.runtime.trace import Trace, TraceError, load_trace, save_trace

from trace_factory import random_trace


def _meta(layers=3, experts=12, k=3, **more):
    return json.dumps({"format": "golem-trace/1", "num_layers": layers, "num_experts": experts, "top_k": k,
                       "expert_bytes": 1000, **more})


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _zip(path, members: dict, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name + ".npy", data)
    return path


def _valid_members(n=20, layers=3, experts=12, k=3):
    t = random_trace(0, n=n, layers=layers, num_experts=experts, k=k)
    return {"experts": _npy(t.experts), "weights": _npy(np.abs(t.weights)),
            "seq_offsets": _npy(np.array([0, n], np.int64)), "meta": _npy(np.array(_meta(layers, experts, k)))}


def test_a_zip_bomb_is_refused_from_its_directory_without_expanding(tmp_path):
    n = 1 << 23  # 8 M steps x 1 x 4 int16 = 64 MiB of zeros, ~64 KiB compressed
    members = _valid_members()
    members["experts"] = _npy(np.zeros((n, 3, 4), np.int16)[:, :3, :3])
    path = _zip(tmp_path / "bomb.npz", members)
    tracemalloc.start()
    with pytest.raises(TraceError, match="more than routing data ever compresses"):
        load_trace(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20  # the 64 MiB member was never expanded


def test_the_expanded_size_is_capped(tmp_path, monkeypatch):
    path = tmp_path / "t.npz"
    save_trace(path, random_trace(0, n=2000))
    monkeypatch.setattr(trace_mod, "MAX_TRACE_NBYTES", 10_000)
    with pytest.raises(TraceError, match="expand to more than .* GOLEM_TRACE_MAX_BYTES"):
        load_trace(path)


def test_a_header_that_lies_about_its_shape_is_refused(tmp_path):
    members = _valid_members()
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i2", "fortran_order": False, "shape": (2000000, 3, 3)})
    members["experts"] = buf.getvalue() + np.zeros((20, 3, 3), np.int16).tobytes()  # 20 steps of data
    _zip(tmp_path / "lie.npz", members, zipfile.ZIP_STORED)
    with pytest.raises(TraceError, match=r"'experts' declares \(2000000, 3, 3\)"):
        load_trace(tmp_path / "lie.npz")


def test_shapes_are_checked_against_each_other_and_the_meta_before_reading(tmp_path):
    members = _valid_members()
    members["weights"] = _npy(np.ones((20, 3, 2), np.float32))
    _zip(tmp_path / "w.npz", members)
    with pytest.raises(TraceError, match=r"'weights' shape \(20, 3, 2\) != 'experts' shape \(20, 3, 3\)"):
        load_trace(tmp_path / "w.npz")
    members = _valid_members()
    members["meta"] = _npy(np.array(_meta(k=5, experts=12)))
    _zip(tmp_path / "k.npz", members)
    with pytest.raises(TraceError, match="meta top_k=5 but 'experts' holds only 3 experts per step"):
        load_trace(tmp_path / "k.npz")


def _trace(experts, weights=None, k=None, experts_n=12):
    experts = np.asarray(experts, np.int16)
    weights = np.ones(experts.shape, np.float32) if weights is None else np.asarray(weights, np.float32)
    meta = {"num_layers": experts.shape[1], "num_experts": experts_n, "top_k": k or experts.shape[2], "expert_bytes": 8}
    return Trace(experts, weights, np.array([0, len(experts)]), meta)


def test_an_expert_twice_in_one_step_is_named(tmp_path):
    t = _trace([[[1, 2, 3]], [[4, 5, 4]]])
    with pytest.raises(TraceError, match="step 1, layer 0 lists expert 4 twice"):
        t.validate()
    _trace([[[1, -1, -1]], [[4, 5, 6]]]).validate()  # absent slots (-1) may repeat


def test_negative_scores_and_more_experts_than_top_k_are_named():
    with pytest.raises(TraceError, match="negative router score at step 0, layer 0"):
        _trace([[[1, 2, 3]]], weights=[[[0.5, -0.1, 0.2]]]).validate()
    with pytest.raises(TraceError, match="routes to 3 experts, more than meta top_k=2"):
        _trace([[[1, 2, 3]]], k=2).validate()
    _trace([[[1, 2, -1]]], k=2).validate()


def test_a_saved_trace_with_bad_routing_is_refused_on_load_too(tmp_path):
    members = _valid_members()
    e = np.load(io.BytesIO(members["experts"]))
    e[5, 1, :] = 7
    members["experts"] = _npy(e)
    _zip(tmp_path / "dup.npz", members)
    with pytest.raises(TraceError, match="step 5, layer 1 lists expert 7 twice"):
        load_trace(tmp_path / "dup.npz")


def test_belady_on_a_long_trace_keeps_its_scratch_memory_per_layer():
    """Belady's next-use tables are built one layer at a time in int32: the peak is a small
    multiple of one layer's column, not of the whole trace (as the (N, L, K) int64 tables
    it replaced were)."""
    t = random_trace(3, n=60_000, layers=8, num_experts=32, k=4)
    trace_nbytes = t.experts.nbytes
    tracemalloc.start()
    result = belady(t, cache_size=8)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 6 * trace_nbytes + (32 << 20)
    lru = simulate(t, policy="lru", cache_size=8)
    assert result.total_misses <= lru.total_misses


def test_replays_check_the_weights_without_keeping_them(tmp_path):
    t = random_trace(1, n=300)
    path = tmp_path / "t.npz"
    save_trace(path, t)
    got = load_trace(path, weights=False, hidden=False)
    assert np.array_equal(got.experts, t.experts) and got.weights.shape == t.weights.shape
    assert not any(got.weights.strides)  # no memory behind them
    members = _valid_members()
    w = np.ones((20, 3, 3), np.float32)
    w[7, 2, 1] = np.nan
    members["weights"] = _npy(w)
    _zip(tmp_path / "nan.npz", members)
    with pytest.raises(TraceError, match="NaN"):
        load_trace(tmp_path / "nan.npz", weights=False)
    w[7, 2, 1] = -3
    members["weights"] = _npy(w)
    _zip(tmp_path / "neg.npz", members)
    with pytest.raises(TraceError, match="negative router score at step 7, layer 2"):
        load_trace(tmp_path / "neg.npz", weights=False)
