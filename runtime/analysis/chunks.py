"""Chunk analysis of routing traces: how many experts a window of decode steps needs (U) and
how many of them are new against the window before (D), at several coverage thresholds.

Owns the statistic of the GLM-5 study that `golem-trace stats` prints and the speed estimator
(`golem.runtime.analysis.estimate`) consumes. Knows nothing of caches, bytes or machines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from golem.runtime.trace import Trace

DEFAULT_COVERAGES = (0.10, 0.25, 0.50, 0.80, 0.95, 0.99, 0.999, 1.0)


@dataclass
class ChunkStats:
    """U and D per chunk of decode steps, at each coverage threshold.

    Args:
        chunk: decode steps per chunk.
        coverages: fractions of a chunk's activations, ascending, in (0, 1].
        u: int64 (num_chunks, C): fewest (layer, expert) pairs, most used first, whose
            activations cover at least ``coverages[c]`` of the chunk's activations.
        d: int64 (num_chunks - 1, C): how many of those pairs were not used at all in the
            previous chunk (chunks 1.. only; chunk 0 has no previous chunk).
        activations: int64 (num_chunks,): (layer, expert) activations in each chunk.
        num_layers, num_experts, top_k: the trace's shape.
        across_sequences: whether chunks ran across sequence boundaries (see ``chunk_analysis``).
        dropped_steps: decode steps left out (the tail shorter than a chunk).
    """

    chunk: int
    coverages: tuple
    u: np.ndarray
    d: np.ndarray
    activations: np.ndarray
    num_layers: int
    num_experts: int
    top_k: int
    across_sequences: bool = True
    dropped_steps: int = 0

    @property
    def num_chunks(self) -> int:
        return int(self.u.shape[0])

    @property
    def total_experts(self) -> int:
        """All (layer, expert) pairs of the model."""
        return self.num_layers * self.num_experts

    @property
    def u_mean(self) -> np.ndarray:
        return self.u.mean(axis=0) if self.num_chunks else np.full(len(self.coverages), np.nan)

    @property
    def u_median(self) -> np.ndarray:
        return np.median(self.u, axis=0) if self.num_chunks else np.full(len(self.coverages), np.nan)

    @property
    def d_mean(self) -> np.ndarray:
        return self.d.mean(axis=0) if len(self.d) else np.full(len(self.coverages), np.nan)

    @property
    def d_median(self) -> np.ndarray:
        return np.median(self.d, axis=0) if len(self.d) else np.full(len(self.coverages), np.nan)

    def index(self, coverage: float) -> int:
        """Column of ``coverage`` in the arrays; a clear error if it was not analysed."""
        for i, c in enumerate(self.coverages):
            if abs(c - coverage) < 1e-9:
                return i
        raise ValueError(f"coverage {coverage} was not analysed (have {list(self.coverages)})")

    def at(self, coverage: float) -> tuple[float, float]:
        """``(mean U, mean D)`` per chunk at ``coverage``."""
        i = self.index(coverage)
        return float(self.u_mean[i]), float(self.d_mean[i])

    def to_dict(self, per_chunk: bool = False) -> dict:
        """JSON-ready summary; ``per_chunk`` adds the full U and D arrays."""

        def _list(a):
            return [None if not np.isfinite(x) else round(float(x), 3) for x in a]

        out = {
            "chunk": self.chunk,
            "num_chunks": self.num_chunks,
            "across_sequences": self.across_sequences,
            "dropped_steps": self.dropped_steps,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "total_experts": self.total_experts,
            "activations_mean": float(self.activations.mean()) if self.num_chunks else None,
            "coverages": list(self.coverages),
            "u_mean": _list(self.u_mean),
            "u_median": _list(self.u_median),
            "d_mean": _list(self.d_mean),
            "d_median": _list(self.d_median),
            "u_share_mean": _list(self.u_mean / self.total_experts),
        }
        if per_chunk:
            out["u"] = self.u.tolist()
            out["d"] = self.d.tolist()
        return out


def _decode_steps(traces: Sequence[Trace], across_sequences: bool, chunk: int) -> tuple[list, int]:
    """Windows of ``chunk`` decode steps as arrays (chunk, L, K), and the steps dropped."""
    windows: list[np.ndarray] = []
    dropped = 0
    if across_sequences:
        stream = [t.decode_only().experts for t in traces]
        experts = np.concatenate(stream, axis=0) if stream else np.zeros((0, 0, 0), np.int16)
        n = experts.shape[0] // chunk
        windows = [experts[i * chunk:(i + 1) * chunk] for i in range(n)]
        dropped = experts.shape[0] - n * chunk
        return windows, dropped
    for t in traces:
        t = t.decode_only()
        for start, stop in t.sequences():
            n = (stop - start) // chunk
            windows.extend(t.experts[start + i * chunk:start + (i + 1) * chunk] for i in range(n))
            dropped += (stop - start) - n * chunk
    return windows, dropped


def chunk_analysis(
    trace: Union[Trace, Sequence[Trace]],
    chunk: int = 128,
    coverages: Sequence[float] = DEFAULT_COVERAGES,
    *,
    across_sequences: bool = True,
) -> ChunkStats:
    """U and D over consecutive chunks of ``chunk`` decode steps.

    Prefill steps (``trace.prefill``) are excluded. Several traces are read in order as one
    stream. With ``across_sequences`` (the default) the decode steps of all sequences are
    concatenated, as a cache that persists across requests sees them, and chunks may span a
    sequence boundary; otherwise chunks restart at each sequence start. Either way a tail
    shorter than ``chunk`` is dropped (counted in ``dropped_steps``), and the previous chunk
    of a chunk is the one before it in the stream.

    Pairs with equal counts are taken in this order: those used in the previous chunk first
    (a cache already holds them), then by (layer, expert). U at coverage c is the smallest n
    with (activations of the n most used pairs) >= c x (activations of the chunk).
    """
    traces = [trace] if isinstance(trace, Trace) else list(trace)
    if not traces:
        raise ValueError("chunk analysis needs at least one trace")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 decode steps, got {chunk}")
    covs = tuple(float(c) for c in coverages)
    if not covs or any(not (0.0 < c <= 1.0) for c in covs):
        raise ValueError(f"coverages must lie in (0, 1], got {list(coverages)}")
    if list(covs) != sorted(covs):
        raise ValueError(f"coverages must be ascending, got {list(covs)}")
    first = traces[0]
    shape = (first.num_layers, first.num_experts, first.top_k)
    for t in traces[1:]:
        if (t.num_layers, t.num_experts, t.top_k) != shape:
            raise ValueError(
                f"{t.path or 'trace'}: shape (layers, experts, top_k)="
                f"{(t.num_layers, t.num_experts, t.top_k)} differs from {shape}"
            )
    num_layers, num_experts, top_k = shape
    total = num_layers * num_experts
    keys = np.arange(total, dtype=np.int64)
    layer_base = (np.arange(num_layers, dtype=np.int64) * num_experts)[None, :, None]

    windows, dropped = _decode_steps(traces, across_sequences, chunk)
    u = np.zeros((len(windows), len(covs)), dtype=np.int64)
    d = np.zeros((max(len(windows) - 1, 0), len(covs)), dtype=np.int64)
    activations = np.zeros(len(windows), dtype=np.int64)
    prev_used = np.zeros(total, dtype=bool)
    for i, w in enumerate(windows):
        ids = w.astype(np.int64)
        flat = (ids + layer_base)[ids >= 0]
        counts = np.bincount(flat, minlength=total)
        n_act = int(counts.sum())
        activations[i] = n_act
        # most used first; ties: used in the previous chunk first, then by key
        order = np.lexsort((keys, ~prev_used, -counts))
        cum = np.cumsum(counts[order])
        for j, c in enumerate(covs):
            # integer threshold avoids float round-off at c = 1.0
            need = int(np.ceil(c * n_act - 1e-9))
            n = int(np.searchsorted(cum, need, side="left")) + 1 if need > 0 else 0
            u[i, j] = n
            if i > 0:
                d[i - 1, j] = int(np.count_nonzero(~prev_used[order[:n]]))
        prev_used = counts > 0
    return ChunkStats(
        chunk=chunk,
        coverages=covs,
        u=u,
        d=d,
        activations=activations,
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        across_sequences=across_sequences,
        dropped_steps=dropped,
    )
