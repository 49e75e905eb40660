"""Small generated golem-trace/1 traces for the cache, planner, profile and CLI tests."""

from __future__ import annotations

import numpy as np

from golem.runtime.trace import Trace


def make_trace(experts, num_experts, seq_offsets=None, prefill=None) -> Trace:
    experts = np.asarray(experts, dtype=np.int16)
    n, layers, k = experts.shape
    return Trace(
        experts=experts,
        weights=np.ones(experts.shape, np.float32),
        seq_offsets=np.asarray(seq_offsets if seq_offsets is not None else [0, n], np.int64),
        meta={"num_layers": layers, "num_experts": num_experts, "top_k": k, "expert_bytes": 1000},
        prefill=None if prefill is None else np.asarray(prefill, bool),
    )


def random_trace(seed, n=300, layers=3, num_experts=12, k=3, holes=False) -> Trace:
    rng = np.random.default_rng(seed)
    # skewed popularity, so that caches have something to find
    p = rng.dirichlet(np.full(num_experts, 0.5), size=layers)
    ex = np.stack([[rng.choice(num_experts, k, replace=False, p=p[l]) for l in range(layers)] for _ in range(n)])
    if holes:  # absent slots and repeated ids must be tolerated
        ex[rng.random(ex.shape) < 0.1] = -1
        ex[::7, :, 0] = ex[::7, :, 1]
    return make_trace(ex, num_experts)
