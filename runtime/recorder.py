"""Recording routing while golem generates: ``golem-run --trace-out FILE [--trace-hidden]``.

Owns turning the engine's per-layer ids (and router weights, and optionally the residual
streams) into golem-trace/1 rows: one row per token, prefill rows marked, a new sequence at
each prompt. The engine hands it what it already read back; it adds no host sync of its own.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np

from golem.runtime.trace import Trace, save_trace


class TraceRecorder:
    """Collects routing rows; ``trace()`` / ``save(path)`` write golem-trace/1.

    Args:
        moe_layers: model layer numbers of the MoE layers (the trace's layer axis, in order).
        num_experts: routed experts per layer.
        top_k: experts per token.
        expert_bytes: bytes of one expert (for the meta).
        route: ``(layer, x) -> lazy weights (..., K)`` matching the routed ids' order; or None.
        residual: ``(layer) -> lazy residual (..., D)`` to record as ``hidden``; or None.
        meta: extra meta entries (model type, path).
    """

    def __init__(self, moe_layers: Sequence[int], num_experts: int, top_k: int, expert_bytes: int, *,
                 route=None, residual=None, meta: Optional[dict] = None):
        self.moe_layers = list(moe_layers)
        self.position = {l: i for i, l in enumerate(self.moe_layers)}
        self.num_experts = num_experts
        self.top_k = top_k
        self.expert_bytes = expert_bytes
        self.route = route
        self.residual = residual
        self.meta = dict(meta or {})
        self._experts: List[np.ndarray] = []  # per call: (T, L, K)
        self._weights: List[np.ndarray] = []
        self._hidden: List[np.ndarray] = []
        self._prefill: List[np.ndarray] = []
        self._seq_starts: List[int] = []
        self._rows = 0

    @property
    def num_steps(self) -> int:
        """Steps (tokens, prompt ones included) recorded so far."""
        return self._rows

    def weights(self, layer: int, x: mx.array):
        """Lazy arrays to read back with the layer's ids: (weights, residual) as recorded."""
        parts = []
        if self.route is not None:
            parts.append(self.route(layer, x).astype(mx.float32))
        if self.residual is not None:
            parts.append(self.residual(layer).astype(mx.float32))
        return parts

    def record(self, layer: int, ids: np.ndarray, extra: Sequence[np.ndarray]) -> None:
        pos = self.position[layer]
        flat = ids.reshape(-1, ids.shape[-1])  # (T, K)
        t = flat.shape[0]
        if pos == 0:
            if t > 1 or not self._seq_starts:
                self._seq_starts.append(self._rows)
            L, K = len(self.moe_layers), self.top_k
            self._experts.append(np.full((t, L, K), -1, np.int16))
            self._weights.append(np.zeros((t, L, K), np.float32))
            self._prefill.append(np.full(t, t > 1))
            if self.residual is not None:
                self._hidden.append(None)
            self._rows += t
        if not self._experts:
            return  # recording started mid-forward
        k = min(flat.shape[1], self.top_k)
        self._experts[-1][:, pos, :k] = flat[:, :k]
        i = 0
        if self.route is not None:
            w = extra[i].reshape(-1, extra[i].shape[-1])
            self._weights[-1][:, pos, :k] = w[:, :k]
            i += 1
        if self.residual is not None:
            h = extra[i].reshape(-1, extra[i].shape[-1])
            if self._hidden[-1] is None:
                self._hidden[-1] = np.zeros((t, len(self.moe_layers), h.shape[-1]), np.float32)
            self._hidden[-1][:, pos] = h[-t:]

    @property
    def num_rows(self) -> int:
        """Rows recorded so far (prefill and decode tokens); 0 before the first token."""
        return self._rows

    def trace(self, *, include_prefill: bool = True) -> Trace:
        if not self._experts:
            raise ValueError("nothing was recorded")
        experts = np.concatenate(self._experts)
        weights = np.concatenate(self._weights)
        prefill = np.concatenate(self._prefill)
        hidden = np.concatenate(self._hidden) if self._hidden and all(h is not None for h in self._hidden) else None
        offsets = np.array(self._seq_starts + [self._rows], np.int64)
        meta = {
            "num_layers": len(self.moe_layers),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "expert_bytes": self.expert_bytes,
            "moe_layers": self.moe_layers,
            **self.meta,
        }
        if hidden is not None:
            meta["hidden_kind"] = "post_attn"
        trace = Trace(experts, weights, offsets, meta, hidden=hidden, prefill=prefill if prefill.any() else None)
        return trace if include_prefill else trace.decode_only()

    def save(self, path, *, what: str = "", protected=()) -> None:
        """Write the trace recorded so far (``golem.runtime.trace.save_trace``)."""
        save_trace(path, self.trace(), what=what, protected=protected)
