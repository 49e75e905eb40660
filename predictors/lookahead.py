"""Predictors from hidden states: router lookahead (the design card's) and linear probes.

Owns applying layer L+d's own pre-MoE norm and router (or a trained probe) to layer L's
residual stream, lazily, for the engine's one ``mx.eval`` per layer, and turning ranks into
probabilities with a calibration table. Knows nothing of files or caches.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np

from .base import Predictor, Proposal, RoutingShape
from .routers import MoEBlock

HIDDEN_KINDS = ("post_attn", "layer_input")


def device_ranks(rows: mx.array, nan_rows: bool = True) -> mx.array:
    """Lazy integer (T, E): each entry's rank in its row of ``rows`` (0 = highest, NaN as the
    lowest), a row of -1 where ``rows`` is all NaN (nothing to go on). Two sorts of a few
    rows, evaluated with the layer's host sync. Ties go to the lower index where the
    backend's sort is stable (the CPU's is, as ``host_ranks``); elsewhere only experts of
    equal scores may trade ranks. ``nan_rows=False``: ``rows`` hold no NaN, and the two
    sorts are all (each op costs the CPU backend tens of microseconds)."""
    if not nan_rows:
        return mx.argsort(mx.argsort(-rows, axis=-1), axis=-1)
    nan = mx.isnan(rows)
    order = mx.argsort(-mx.where(nan, -mx.inf, rows), axis=-1)  # stable: ties keep the lower index
    ranks = mx.argsort(order, axis=-1).astype(mx.int32)
    return mx.where(mx.all(nan, axis=-1, keepdims=True), -1, ranks)


def host_ranks(raw: np.ndarray) -> np.ndarray:
    """``device_ranks`` of evaluated rows, on the host: Python's sort of each row (numpy's
    sorts let the interpreter lock go), NaN last."""
    nan = np.isnan(raw)
    partial = nan.any(axis=1).tolist()
    made = (~nan.all(axis=1)).tolist()
    ranks = np.full(raw.shape, -1, np.int64)
    for r in range(raw.shape[0]):
        if not made[r]:
            continue
        if partial[r]:
            order = np.argsort(-raw[r], kind="stable").tolist()  # NaN last
        else:
            row = raw[r].tolist()
            order = sorted(range(len(row)), key=row.__getitem__, reverse=True)  # stable
        rank = [0] * len(order)
        for i, e in enumerate(order):
            rank[e] = i
        ranks[r] = rank
    return ranks


class _RankCalibrated(Predictor):
    """Predictors that rank every expert of a target layer from a hidden state, on the
    device, and turn ranks into probabilities with a calibration table.

    Score: the expert's rank r (0 = first) at distance d becomes the observed rate at which
    rank r at distance d was among the target layer's true experts, ``(hits + prior) /
    (seen + prior_weight)`` per (target position, d, r); the prior says "the top-k are used, the
    rest are not". ``observe`` updates it when ``online``.
    """

    needs_hidden = True
    nan_rows = True  # ``rank_rows`` may hold NaN (rows with nothing to go on)

    def __init__(self, shape: RoutingShape, *, hidden_kind: str, max_depth: int, online: bool, prior_weight: float):
        if hidden_kind not in HIDDEN_KINDS:
            raise ValueError(f"hidden_kind must be one of {', '.join(HIDDEN_KINDS)}, got {hidden_kind!r}")
        super().__init__(shape)
        self.hidden_kind = hidden_kind
        self.max_depth = max_depth
        self.online = online
        L, E, k = shape.num_layers, shape.num_experts, shape.top_k
        prior = np.zeros(E)
        prior[:k] = prior_weight
        self.hits = np.broadcast_to(prior, (L, max_depth + 1, E)).copy()
        self.seen = np.full((L, max_depth + 1), prior_weight)
        # ranks of this step's predictions by (target position, distance); a row whose first
        # entry is -1 holds none (only that entry is reset: scores writes whole rows)
        self._pending = np.full((L, max_depth + 1, E), -1, np.int64)

    def begin_step(self) -> None:
        super().begin_step()
        self._pending[:, :, 0] = -1

    def begin_sequence(self) -> None:
        super().begin_sequence()
        self._pending[:, :, 0] = -1

    def rank_rows(self, position: int, targets: range, h: mx.array) -> Optional[mx.array]:
        """Lazy float32 (len(targets), E), higher first; a NaN row or None: nothing to go on."""
        raise NotImplementedError

    def propose(self, position: int, depth: int, hidden: Any = None, *, nearest: int = 1) -> Proposal:
        targets = self.targets(position, depth, nearest)
        if not len(targets):
            return Proposal(position, targets)
        if hidden is None:
            raise ValueError(f"{self.name} needs MoE position {position}'s hidden state ({self.hidden_kind})")
        h = hidden if isinstance(hidden, mx.array) else mx.array(np.asarray(hidden))
        h = h.reshape(-1, h.shape[-1])[-1:]  # (1, D): the last token
        rows = self.rank_rows(position, targets, h)
        return Proposal(position, targets, () if rows is None else (rows, device_ranks(rows, self.nan_rows)))

    def raw_scores(self, proposal: Proposal) -> np.ndarray:
        """float32 (len(targets), E): the ranking quantities, as evaluated."""
        if not proposal.arrays:
            return self.zeros(proposal.targets)
        return np.array(proposal.arrays[0], dtype=np.float32)

    def calibration(self) -> np.ndarray:
        """(L, max_depth + 1, E): probability of use by target position, distance and rank."""
        return self.hits / self.seen[..., None]

    def scores(self, proposal: Proposal) -> np.ndarray:
        """Per target row: each expert's rank (0 = highest raw value, ties to the lower id, NaN
        last) looked up in the calibration. The ranks come with the proposal, computed on the
        device in the engine's host sync (``device_ranks``): the engine's thread, which calls
        this between its reads, only looks them up (a gather per row, which keeps the
        interpreter lock: ``benchmarks/profile_gil.py``). A proposal without them (one made
        by hand, with its raw rows only) is ranked here by Python's sort of each row."""
        if not proposal.arrays:
            return self.zeros(proposal.targets)
        if len(proposal.arrays) > 1:
            ranks = np.array(proposal.arrays[1], dtype=np.int64)
        else:
            ranks = host_ranks(self.raw_scores(proposal))
        made = (ranks[:, 0] >= 0).tolist()
        out = np.zeros(ranks.shape, np.float32)
        for r, (t, d) in enumerate(zip(proposal.targets, proposal.offsets)):
            if not made[r]:
                continue
            d = min(d, self.max_depth)
            rank = ranks[r]
            out[r] = self.hits[t, d][rank] / self.seen[t, d]  # a gather: keeps the lock
            if self.online:
                self._pending[t, d] = rank
        return out

    def observe(self, position: int, experts: Any, weights: Any = None) -> None:
        """One hit per (distance, rank) of each distinct routed expert, one sighting per
        distance predicted; a fancy index per distance (keeps the interpreter lock, as
        ``scores``'s gathers)."""
        pending = self._pending[position]  # (max_depth + 1, E) ranks
        made = [d for d, first in enumerate(pending[:, 0].tolist()) if first >= 0]
        if not made:
            return
        ids = [e for e in set(np.asarray(experts).reshape(-1).tolist()) if e >= 0]
        seen, hits = self.seen[position], self.hits[position]
        for d in made:
            seen[d] += 1.0
            hits[d, pending[d, ids]] += 1.0  # distinct experts, distinct ranks: one gather and scatter
            pending[d, 0] = -1


class Lookahead(_RankCalibrated):
    """Router lookahead over a loaded model's MoE blocks.

    ``propose(position, depth, hidden)`` takes the residual stream of the MoE layer at
    ``position`` (kind ``hidden_kind``: ``"post_attn"``, the residual after attention and
    before the MoE, or ``"layer_input"``, the residual entering the decoder layer), shape
    (..., D) (the last token is used), as an mx or numpy array. Its proposal carries a lazy float32 array
    (len(targets), E), each target layer's own pre-MoE norm and ranking quantity (router
    logits or biased sigmoid scores, as the family ranks) applied to it, and its ranks
    (``device_ranks``).
    Scores are rank-calibrated (see ``_RankCalibrated``).

    Args:
        blocks: the model's MoE blocks (``find_moe_blocks``), one per MoE layer.
        hidden_kind: which residual ``propose`` is given.
        max_depth: deepest distance with its own calibration (deeper ones share it).
        online: learn the calibration from observed routing.
        prior_weight: how many observations the prior is worth.
    """

    name = "lookahead"
    nan_rows = False  # a router's scores: finite

    def __init__(
        self,
        blocks: Sequence[MoEBlock],
        *,
        hidden_kind: str = "post_attn",
        max_depth: int = 3,
        online: bool = True,
        prior_weight: float = 2.0,
    ):
        if not blocks:
            raise ValueError("Lookahead needs the model's MoE blocks")
        shape = RoutingShape(len(blocks), blocks[0].num_experts, blocks[0].top_k)
        super().__init__(shape, hidden_kind=hidden_kind, max_depth=max_depth, online=online, prior_weight=prior_weight)
        self.blocks = list(blocks)

    def rank_rows(self, position: int, targets: range, h: mx.array) -> mx.array:
        rows = []
        for t in targets:
            block = self.blocks[t]
            rows.append(block.selection_scores(block.pre_moe_norm(h)).astype(mx.float32))
        return mx.concatenate(rows, axis=0)


class Probe(_RankCalibrated):
    """Trained linear probes: layer L's residual stream -> the experts of layer L+d.

    For each layer L and distance d a ridge regression from the RMS-normalised residual
    (plus a bias) to the multi-hot routing of layer L+d, fitted on traces that recorded
    hidden states of kind ``hidden_kind`` (``fit``). Router lookahead is the special case
    "the target layer's own router"; a probe can learn what the layers in between do.
    Unfitted, it predicts nothing. Scores are rank-calibrated (see ``_RankCalibrated``).
    Weights: ``max_depth * L * (D + 1) * E`` float32 on the device.

    Args:
        shape: the model's routing shape.
        hidden_kind: which residual ``fit`` and ``propose`` are given.
        max_depth: deepest distance with a probe.
        ridge: regularisation, relative to the mean squared input feature.
        online: learn the calibration from observed routing.
        prior_weight: how many observations the calibration prior is worth.
    """

    name = "probe"

    def __init__(
        self,
        shape: RoutingShape,
        *,
        hidden_kind: str = "post_attn",
        max_depth: int = 3,
        ridge: float = 1.0,
        online: bool = True,
        prior_weight: float = 2.0,
    ):
        super().__init__(shape, hidden_kind=hidden_kind, max_depth=max_depth, online=online, prior_weight=prior_weight)
        self.ridge = ridge
        self.weights: Optional[mx.array] = None  # (max_depth, L, D + 1, E)

    @staticmethod
    def _features(h: np.ndarray) -> np.ndarray:
        h = np.asarray(h, np.float64)
        h = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + 1e-6)
        return np.concatenate([h, np.ones((*h.shape[:-1], 1))], axis=-1)

    def fit(self, traces: Sequence[Any]) -> "Probe":
        """Fit on traces whose ``hidden`` (N, L, D) holds residuals of ``hidden_kind``."""
        from .history import onehot

        usable = []
        for t in traces:
            kind = (getattr(t, "meta", None) or {}).get("hidden_kind", "post_attn")
            if getattr(t, "hidden", None) is None or kind != self.hidden_kind:
                raise ValueError(
                    f"{getattr(t, 'path', None) or 'trace'}: probe needs {self.hidden_kind} hidden states to learn from"
                )
            usable.append(t)
        if not usable:
            return self
        X = np.concatenate([self._features(t.hidden) for t in usable])  # (N, L, D + 1)
        Y = np.concatenate([onehot(t.experts, self.shape.num_experts) for t in usable]).astype(np.float64)
        L, E = self.shape.num_layers, self.shape.num_experts
        W = np.zeros((self.max_depth, L, X.shape[-1], E), np.float32)
        for position in range(L):
            x = X[:, position]
            gram = x.T @ x
            reg = self.ridge * np.trace(gram) / gram.shape[0] * np.eye(gram.shape[0])
            reg[-1, -1] = 0.0  # the bias is not shrunk
            inv = np.linalg.pinv(gram + reg)
            for d in range(1, min(self.max_depth, L - 1 - position) + 1):
                W[d - 1, position] = inv @ (x.T @ Y[:, position + d])
        self.weights = mx.array(W)
        return self

    def rank_rows(self, position: int, targets: range, h: mx.array) -> Optional[mx.array]:
        if self.weights is None:
            return None
        h = h.astype(mx.float32)
        x = h * mx.rsqrt(mx.mean(h * h, axis=-1, keepdims=True) + 1e-6)
        x = mx.concatenate([x, mx.ones((1, 1))], axis=-1)  # (1, D + 1)
        nothing = mx.full((1, self.shape.num_experts), float("nan"))
        rows = [x @ self.weights[t - position - 1, position] if 1 <= t - position <= self.max_depth
                else nothing for t in targets]
        return mx.concatenate(rows, axis=0)
