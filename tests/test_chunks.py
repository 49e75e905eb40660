"""Chunk analysis (U and D per 128-step chunk) against a few lines of reference code."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from golem.runtime.analysis.chunks import DEFAULT_COVERAGES, chunk_analysis
from golem.runtime.trace import Trace, load_trace

TRACES = Path(__file__).resolve().parents[1] / ".." / "shared" / "traces" / "olmoe-1b-7b"


def _reference(experts: np.ndarray, chunk: int, coverages) -> tuple[list, list]:
    """Plain-Python U and D: count pairs per chunk, sort, take until covered."""
    us, ds, prev = [], [], None
    for start in range(0, experts.shape[0] - chunk + 1, chunk):
        counts = Counter()
        for step in experts[start:start + chunk]:
            for position, row in enumerate(step):
                for e in row:
                    if e >= 0:
                        counts[(position, int(e))] += 1
        total = sum(counts.values())
        ranked = sorted(counts, key=lambda p: (-counts[p], prev is None or p not in prev, p))
        u_row, d_row = [], []
        for c in coverages:
            acc, n = 0, 0
            while acc < c * total - 1e-9:
                acc += counts[ranked[n]]
                n += 1
            u_row.append(n)
            d_row.append(sum(1 for p in ranked[:n] if p not in prev) if prev is not None else None)
        us.append(u_row)
        if prev is not None:
            ds.append(d_row)
        prev = set(counts)
    return us, ds


def _trace(experts, seq_offsets=None, prefill=None, num_experts=8):
    n, layers, k = experts.shape
    return Trace(
        experts=experts.astype(np.int16),
        weights=np.ones(experts.shape, np.float32),
        seq_offsets=np.array(seq_offsets if seq_offsets is not None else [0, n], np.int64),
        meta={"num_layers": layers, "num_experts": num_experts, "top_k": k, "expert_bytes": 1},
        prefill=prefill,
    )


def test_hand_made_chunks():
    # layer 0 only, 8 experts, top-2, chunk of 2 steps
    experts = np.array([[[0, 1]], [[0, 2]], [[0, 3]], [[4, 5]]])
    stats = chunk_analysis(_trace(experts), chunk=2, coverages=(0.5, 1.0))
    # chunk 0: counts {0:2, 1:1, 2:1} -> 50% needs expert 0 only; 100% needs 3
    # chunk 1: counts {0,3,4,5: 1 each}; ties put 0 (used before) first -> D(0.5) = 1 (one of 3,4)
    assert stats.u.tolist() == [[1, 3], [2, 4]]
    assert stats.d.tolist() == [[1, 3]]
    assert stats.at(1.0) == (3.5, 3.0)


def test_prefill_excluded_and_sequence_boundaries():
    rng = np.random.default_rng(0)
    experts = rng.integers(0, 8, size=(10, 2, 2))
    prefill = np.zeros(10, bool)
    prefill[:3] = True
    t = _trace(experts, seq_offsets=[0, 6, 10], prefill=prefill)
    across = chunk_analysis(t, chunk=2, coverages=(1.0,))
    ref_u, ref_d = _reference(experts[3:], 2, (1.0,))
    assert across.u.tolist() == ref_u and across.d.tolist() == ref_d
    assert across.num_chunks == 3 and across.dropped_steps == 1
    # per sequence: decode steps 3..5 (3 steps -> 1 chunk, 1 dropped) and 6..9 (2 chunks)
    split = chunk_analysis(t, chunk=2, coverages=(1.0,), across_sequences=False)
    windows = np.concatenate([experts[3:5], experts[6:10]])
    ref_u, ref_d = _reference(windows, 2, (1.0,))
    assert split.u.tolist() == ref_u and split.d.tolist() == ref_d
    assert split.dropped_steps == 1


def test_absent_experts_and_bad_input():
    experts = np.array([[[0, -1]], [[1, -1]], [[0, 1]], [[-1, -1]]])
    stats = chunk_analysis(_trace(experts), chunk=2, coverages=(1.0,))
    assert stats.activations.tolist() == [2, 2]
    assert stats.u.tolist() == [[2], [2]]
    with pytest.raises(ValueError, match="coverages"):
        chunk_analysis(_trace(experts), coverages=(0.0,))
    with pytest.raises(ValueError, match="chunk"):
        chunk_analysis(_trace(experts), chunk=0)
    with pytest.raises(ValueError, match="not analysed"):
        stats.at(0.5)


@pytest.mark.skipif(not (TRACES / "general.npz").is_file(), reason="OLMoE traces not present")
@pytest.mark.parametrize("name", ["general", "coding"])
def test_olmoe_traces_match_reference(name):
    trace = load_trace(TRACES / f"{name}.npz")
    covs = (0.5, 0.9, 1.0)
    stats = chunk_analysis(trace, chunk=128, coverages=covs)
    first = trace.experts[: 128 * 8]  # the reference is slow: the first 8 chunks
    ref_u, ref_d = _reference(first, 128, covs)
    assert stats.u[:8].tolist() == ref_u
    assert stats.d[:7].tolist() == ref_d
    assert stats.num_chunks == trace.num_steps // 128
    full = chunk_analysis(trace)
    assert full.coverages == DEFAULT_COVERAGES
    assert np.all(np.diff(full.u, axis=1) >= 0)  # more coverage, more experts
    assert np.all(full.d <= full.u[1:])
    assert np.all(full.u[:, -1] <= trace.num_layers * trace.num_experts)
    json.dumps(full.to_dict(per_chunk=True))
