"""The memory planner's offline side: routing statistics measured on traces, and distinct
experts per window, for golem-trace (``stats``, ``simulate``, ``estimate``).

The memory plan itself (``plan_memory``, ``MemoryPlan``, ``ModelMemory``, ``RoutingStats``
from a profile) lives in ``golem.runtime.memplan``, which loading a model uses; it is
re-exported here. Knows nothing of files, MLX or slot pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from golem.runtime.analysis.simulate import Traces, as_trace_list, miss_curve
from golem.runtime.memplan import (BudgetTooSmall, LayerMemory, MemoryPlan, ModelMemory,  # noqa: F401  (re-exported)
                                   plan_memory)
from golem.runtime.memplan import RoutingStats as _ProfileStats

__all__ = ["BudgetTooSmall", "LayerMemory", "MemoryPlan", "ModelMemory", "RoutingStats", "distinct_per_window",
           "plan_memory"]


@dataclass(frozen=True)
class RoutingStats(_ProfileStats):
    """``golem.runtime.memplan.RoutingStats``, which can also be measured on traces.

    Args:
        curves, policy, distinct_per_window, window, source: as ``golem.runtime.memplan.RoutingStats``.
    """

    @classmethod
    def from_traces(
        cls, traces: Traces, *, policy: str = "lru", grid_step: Optional[int] = None, window: int = 128,
        decode_only: bool = True,
    ) -> "RoutingStats":
        """Curves measured on traces (caches persisting across them, as ``simulate``) with
        ``golem.runtime.analysis.simulate.miss_curve``: exact for ``"lru"``, about 16 replays for
        any other policy."""
        trace_list = as_trace_list(traces)
        steps = sum((t.decode_only() if decode_only else t).num_steps for t in trace_list)
        if steps <= 0:
            raise ValueError("routing statistics: the traces hold no decode steps")
        names = ", ".join(Path(t.path).name for t in trace_list if t.path) or "traces"
        curves = miss_curve(trace_list, policy, grid_step=grid_step, decode_only=decode_only) / float(steps)
        return cls(curves, policy, distinct_per_window(trace_list, window, decode_only), window, names)


def distinct_per_window(traces: Traces, window: int = 128, decode_only: bool = True) -> np.ndarray:
    """Mean distinct experts per layer over consecutive windows of ``window`` decode steps
    (the traces read in order as one stream; a shorter tail is left out unless it is all)."""
    if window < 1:
        raise ValueError(f"window must be >= 1 steps, got {window}")
    trace_list = as_trace_list(traces)
    ex = np.concatenate([(t.decode_only() if decode_only else t).experts for t in trace_list])
    n, num_layers, _ = ex.shape
    e_count = trace_list[0].num_experts
    starts = list(range(0, max(n - window + 1, 1), window))
    out = np.zeros(num_layers)
    for s in starts:
        w = ex[s:s + window].astype(np.int64)
        seen = np.zeros((num_layers, e_count + 1), dtype=bool)
        seen[np.arange(num_layers)[None, :, None], np.where(w >= 0, w, e_count)] = True
        out += seen[:, :e_count].sum(axis=1)
    return out / len(starts)
