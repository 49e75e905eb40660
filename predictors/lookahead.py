"""Router lookahead: apply the routers of layers L+1..L+k to layer L's hidden state.

Owns the design card's predictor. While layer L runs, the residual stream at L (its input,
or after its attention) goes through each target layer's own pre-MoE norm and router, with
the family's exact ranking rule; the result is lazy, for the engine to evaluate in the same
``mx.eval`` as layer L's routing. Ranks become probabilities through a calibration table
learned from observed routing. Knows nothing of files or caches.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np

from .base import Predictor, Proposal, RoutingShape, ranked_ids
from .routers import MoEBlock

HIDDEN_KINDS = ("post_attn", "layer_input")


class Lookahead(Predictor):
    """Router lookahead over a loaded model's MoE blocks.

    ``propose(layer, depth, hidden)`` takes layer ``layer``'s residual stream (kind
    ``hidden_kind``: ``"post_attn"``, the residual after attention and before the MoE, or
    ``"layer_input"``, the residual entering the decoder layer), shape (..., D) (the last
    token is used), as an mx or numpy array. Its proposal carries one lazy float32 array
    (len(targets), E): each target layer's ranking quantity (router probabilities, logits or
    biased sigmoid scores, as the family ranks) for that hidden state.

    Score: the expert's rank r under the target router (0 = first) at distance d becomes the
    observed rate at which rank r at distance d was among the layer's true experts,
    ``(hits + prior) / (seen + prior_weight)`` per (target layer, d, r), where the prior
    says "the top-k are used, the rest are not". ``observe`` updates it (``online``).

    Args:
        blocks: the model's MoE blocks (``find_moe_blocks``), one per MoE layer.
        hidden_kind: which residual ``propose`` is given.
        max_depth: deepest distance with its own calibration (deeper ones share it).
        online: learn the calibration from observed routing.
        prior_weight: how many observations the prior is worth.
    """

    name = "lookahead"
    needs_hidden = True

    def __init__(
        self,
        blocks: Sequence[MoEBlock],
        *,
        hidden_kind: str = "post_attn",
        max_depth: int = 3,
        online: bool = True,
        prior_weight: float = 2.0,
    ):
        if hidden_kind not in HIDDEN_KINDS:
            raise ValueError(f"hidden_kind must be one of {', '.join(HIDDEN_KINDS)}, got {hidden_kind!r}")
        if not blocks:
            raise ValueError("Lookahead needs the model's MoE blocks")
        shape = RoutingShape(len(blocks), blocks[0].num_experts, blocks[0].top_k)
        super().__init__(shape)
        self.blocks = list(blocks)
        self.hidden_kind = hidden_kind
        self.max_depth = max_depth
        self.online = online
        L, E, k = shape.num_layers, shape.num_experts, shape.top_k
        prior = np.zeros(E)
        prior[:k] = prior_weight
        self.hits = np.broadcast_to(prior, (L, max_depth + 1, E)).copy()
        self.seen = np.full((L, max_depth + 1), prior_weight)
        # ranks of this step's predictions by (target layer, distance), -1 = none yet
        self._pending = np.full((L, max_depth + 1, E), -1, np.int64)

    def begin_step(self) -> None:
        super().begin_step()
        self._pending.fill(-1)

    def begin_sequence(self) -> None:
        super().begin_sequence()
        self._pending.fill(-1)

    def propose(self, layer: int, depth: int, hidden: Any = None, *, nearest: int = 1) -> Proposal:
        targets = self.targets(layer, depth, nearest)
        if not len(targets):
            return Proposal(layer, targets)
        if hidden is None:
            raise ValueError(f"lookahead needs layer {layer}'s hidden state ({self.hidden_kind})")
        h = hidden if isinstance(hidden, mx.array) else mx.array(np.asarray(hidden))
        h = h.reshape(-1, h.shape[-1])[-1:]  # (1, D): the last token
        rows = []
        for t in targets:
            block = self.blocks[t]
            rows.append(block.selection_scores(block.pre_moe_norm(h)).astype(mx.float32))
        return Proposal(layer, targets, (mx.concatenate(rows, axis=0),))

    def raw_scores(self, proposal: Proposal) -> np.ndarray:
        """float32 (len(targets), E): the routers' own ranking quantities."""
        if not proposal.arrays:
            return self.zeros(proposal.targets)
        return np.array(proposal.arrays[0], dtype=np.float32)

    def calibration(self) -> np.ndarray:
        """(L, max_depth + 1, E): probability of use by target layer, distance and rank."""
        return self.hits / self.seen[..., None]

    def scores(self, proposal: Proposal) -> np.ndarray:
        raw = self.raw_scores(proposal)
        if not raw.size:
            return raw
        rows = np.arange(raw.shape[0])[:, None]
        rank = np.empty(raw.shape, np.int64)
        rank[rows, np.argsort(-raw, axis=1, kind="stable")] = np.arange(raw.shape[1])
        t = np.asarray(proposal.targets)
        d = np.minimum(np.asarray(proposal.offsets), self.max_depth)
        out = self.hits[t[:, None], d[:, None], rank] / self.seen[t, d][:, None]
        if self.online:
            self._pending[t, d] = rank
        return out.astype(np.float32)

    def observe(self, layer: int, experts: Any, weights: Any = None) -> None:
        pending = self._pending[layer]  # (max_depth + 1, E) ranks
        made = pending[:, 0] >= 0
        if not made.any():
            return
        ids = ranked_ids(experts)
        for d in np.flatnonzero(made):
            self.seen[layer, d] += 1.0
            self.hits[layer, d, pending[d, ids]] += 1.0
        pending.fill(-1)


def hidden_for(kind: str, layer_input: Optional[np.ndarray], post_attn: Optional[np.ndarray]) -> np.ndarray:
    """Pick the recorded residual of ``kind`` (for replays of traces with hidden states)."""
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"hidden kind must be one of {', '.join(HIDDEN_KINDS)}, got {kind!r}")
    arr = post_attn if kind == "post_attn" else layer_input
    if arr is None:
        raise ValueError(f"the trace records no {kind} hidden states")
    return arr
