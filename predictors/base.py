"""The predictor interface, what a score means, and the shared selection step.

Owns what every predictor looks like to its callers (the decode engine, ``golem-trace
predict``, the benchmarks) and how scores become prefetch candidates (threshold, order,
caps). Knows nothing of files, caches or the I/O scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class RoutingShape:
    """What a predictor needs to know about a model's routing.

    Args:
        num_layers: MoE layers; predictors number them by position, 0..num_layers-1 (the
            layer axis of a trace), never by decoder layer number.
        num_experts: routed experts per MoE layer.
        top_k: experts per token.
    """

    num_layers: int
    num_experts: int
    top_k: int

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"bad routing shape {self}")

    @classmethod
    def of(cls, trace: Any) -> "RoutingShape":
        """The shape of a golem-trace/1 trace (anything with ``meta`` or ``experts``)."""
        meta = getattr(trace, "meta", None) or {}
        if meta:
            return cls(int(meta["num_layers"]), int(meta["num_experts"]), int(meta["top_k"]))
        n, num_layers, k = trace.experts.shape
        return cls(num_layers, int(trace.experts.max()) + 1, k)


class Candidate(NamedTuple):
    """One expert worth prefetching: ``(position, expert)`` with the predictor's score
    (``position``: the target's MoE position; past the last one, the next step's)."""

    position: int
    expert: int
    score: float


@dataclass(frozen=True)
class Proposal:
    """Predictions made at MoE position ``position`` for the positions in ``targets``.

    Args:
        position: the MoE position the prediction is made at.
        targets: the MoE positions predicted, nearest first (``position + nearest`` ..
            ``position + depth``, cut at the last one); row i of ``Predictor.scores`` is
            ``targets[i]``.
        arrays: lazy mx arrays the caller must evaluate (with its own, in one ``mx.eval``)
            before asking for scores; empty for predictors that need no device work.
        payload: private to the predictor that made it.
    """

    position: int
    targets: range
    arrays: Tuple[Any, ...] = ()
    payload: Any = None

    @property
    def offsets(self) -> range:
        """Distance of each target from ``position`` (the depth of each row)."""
        return range(self.targets.start - self.position, self.targets.stop - self.position)


@dataclass(frozen=True)
class Selection:
    """The shared selection step: which scored experts become prefetch candidates.

    Keeps experts with ``score >= threshold`` (and score > 0), orders them nearer layers
    first, then higher scores first (ties: lower expert id), and keeps the first ones until a
    cap is reached. ``--prefetch-depth`` sets the proposal's depth; ``--threshold`` this.

    Args:
        threshold: minimum score (an estimated probability of use), 0..1.
        max_experts: at most this many candidates per proposal (None: no cap).
        max_nbytes: at most this many bytes per proposal (needs ``expert_nbytes``).
        expert_nbytes: bytes of one expert.
    """

    threshold: float = 0.3
    max_experts: Optional[int] = None
    max_nbytes: Optional[int] = None
    expert_nbytes: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        if self.max_experts is not None and self.max_experts < 0:
            raise ValueError(f"max_experts must be >= 0, got {self.max_experts}")
        if self.max_nbytes is not None and (self.max_nbytes < 0 or self.expert_nbytes <= 0):
            raise ValueError("max_nbytes needs a non-negative cap and expert_nbytes > 0")

    @property
    def limit(self) -> Optional[int]:
        """The count cap implied by ``max_experts`` and ``max_nbytes``."""
        caps = []
        if self.max_experts is not None:
            caps.append(self.max_experts)
        if self.max_nbytes is not None:
            caps.append(self.max_nbytes // self.expert_nbytes)
        return min(caps) if caps else None

    def mask(self, scores: np.ndarray, exclude: Optional[np.ndarray] = None) -> np.ndarray:
        """Bool (rows, E): the selected experts of a proposal's scores (rows nearest first).

        ``exclude`` (rows, E) bool marks experts not to propose (e.g. already resident);
        they do not count against the caps.
        """
        keep = (scores >= self.threshold) & (scores > 0)
        if exclude is not None:
            keep &= ~exclude
        limit = self.limit
        if limit is None or int(keep.sum()) <= limit:
            return keep
        out = np.zeros_like(keep)
        left = limit
        for r in range(scores.shape[0]):
            if left <= 0:
                break
            ids = np.flatnonzero(keep[r])
            if ids.size > left:
                order = np.lexsort((ids, -scores[r, ids]))
                ids = ids[order[:left]]
            out[r, ids] = True
            left -= ids.size
        return out

    def above(self, scores: np.ndarray) -> List[Tuple[int, float, int]]:
        """``(row, -score, expert)`` of every expert at or over the threshold, in prefetch
        order (``ordered`` over ``mask`` before the caps), as Python values: a proposal has
        few of them, and a caller that leaves some out counts the caps itself
        (``limit``) over what is left."""
        rows, ids = np.nonzero((scores >= self.threshold) & (scores > 0))
        return sorted(zip(rows.tolist(), (-scores[rows, ids]).tolist(), ids.tolist()))

    def ordered(self, scores: np.ndarray, keep: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(rows, experts)`` of the selected entries ``keep`` (a ``mask``), in prefetch
        order: nearer rows first, then higher scores, then lower expert ids."""
        rows, ids = np.nonzero(keep)
        order = np.lexsort((ids, -scores[rows, ids], rows))
        return rows[order], ids[order]

    def select(
        self, scores: np.ndarray, targets: Sequence[int], exclude: Optional[np.ndarray] = None
    ) -> List[Candidate]:
        """Candidates in prefetch order: nearer layers first, higher scores first."""
        rows, ids = self.ordered(scores, self.mask(scores, exclude))
        positions = np.asarray(targets)[rows].tolist()
        return [Candidate(p, e, s) for p, e, s in zip(positions, ids.tolist(), scores[rows, ids].tolist())]


def ranked_ids(experts: Any, weights: Any = None) -> np.ndarray:
    """The distinct routed ids (>= 0) of one layer's routing, highest weight first.

    ``experts`` may hold several tokens (any shape); without ``weights`` the ids keep their
    first-seen order. An expert chosen by several tokens keeps its highest weight.
    """
    ids = np.asarray(experts).reshape(-1).astype(np.int64)
    w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if ids.size and ids.min() < 0:
        present = ids >= 0
        ids = ids[present]
        w = None if w is None else w[present]
    if w is not None:
        ids = ids[np.argsort(-w, kind="stable")]
    if ids.size > 1:
        sorted_ids = np.sort(ids)
        if (sorted_ids[1:] == sorted_ids[:-1]).any():
            _, first = np.unique(ids, return_index=True)
            ids = ids[np.sort(first)]
    return ids


class BinnedCalibration:
    """Turns raw probabilities into observed ones: per group (e.g. depth) and bin of the
    raw value, the rate at which experts scored there were used.

    Args:
        groups: independent tables (e.g. one per depth).
        bins: equal-width bins over [0, 1].
        prior_weight: observations the prior (calibrated = raw) is worth per bin.
    """

    def __init__(self, groups: int, bins: int = 20, prior_weight: float = 2.0):
        self.bins = bins
        centers = (np.arange(bins) + 0.5) / bins
        self.hits = np.tile(centers * prior_weight, (groups, 1))
        self.seen = np.full((groups, bins), prior_weight)

    def bin_of(self, raw: np.ndarray) -> np.ndarray:
        return np.minimum((np.asarray(raw) * self.bins).astype(np.int64), self.bins - 1)

    def apply(self, groups: np.ndarray, bins: np.ndarray) -> np.ndarray:
        """Calibrated values of ``bins`` (rows, E) in ``groups`` (rows,)."""
        g = np.asarray(groups)[:, None]
        return self.hits[g, bins] / self.seen[g, bins]

    def update(self, groups: np.ndarray, bins: np.ndarray, used: np.ndarray) -> None:
        """Count outcomes: ``bins`` and ``used`` (rows, E) in ``groups`` (rows,); bins < 0 skip."""
        bins = np.asarray(bins)
        valid = bins >= 0
        flat = (np.asarray(groups)[:, None] * self.bins + bins)[valid]
        size = self.hits.size
        self.seen += np.bincount(flat, minlength=size).reshape(self.seen.shape)
        weights = np.broadcast_to(np.asarray(used, np.float64), bins.shape)[valid]
        self.hits += np.bincount(flat, weights=weights, minlength=size).reshape(self.hits.shape)


class Predictor:
    """Guesses the experts of MoE positions ``position + 1 .. position + depth`` while the
    MoE layer at ``position`` runs.

    A predictor numbers the MoE layers by position (0 = the first MoE layer), never by
    decoder layer number; the caller maps between the two. Calls, per decode step of one
    sequence (the decode engine and the trace replay both do exactly this)::

        predictor.begin_sequence()                   # once per sequence: history restarts
        for each decode step:
            predictor.begin_step()
            for position in range(num_layers):
                prop = predictor.propose(position, depth, hidden)   # lazy; no host sync
                mx.eval(layer_ids, layer_scores, *prop.arrays)      # the caller's one sync
                predictor.observe(position, layer_ids, layer_scores)
                cands = predictor.candidates(prop, selection)       # or .scores(prop)

    ``observe`` before ``scores``: predictors that work from routing history (previous,
    frequency, transition) read the layer's own routing there. ``fit`` trains the ones that
    learn from traces. Subclasses implement ``predict`` (numpy) or override
    ``propose``/``scores`` (device work: lazy mx arrays in ``Proposal.arrays``).

    A score is the predictor's estimate of the probability that the expert is among the
    experts the target layer routes the current token to, in [0, 1], so ``threshold=0.3``
    keeps the experts judged at least 30% likely to be used, whatever the predictor:

    - previous: the rate at which an expert of the previous token, at that rank, is reused;
    - frequency: the share of steps in which the layer used the expert;
    - transition: a naive-Bayes probability, calibrated against the outcomes seen;
    - lookahead: the rate at which the target router's rank r at distance d was used;
    - probe: the same, for a trained linear probe's rank;
    - oracle, noisy-oracle, random: 1.0 for every expert named.

    Args:
        shape: the model's routing shape.
    """

    name: ClassVar[str] = ""
    needs_hidden: ClassVar[bool] = False
    #: which residual ``propose`` wants as ``hidden``: "layer_input", "post_attn" or None.
    hidden_kind: Optional[str] = None

    def __init__(self, shape: RoutingShape):
        self.shape = shape
        self.step = -1

    # -- lifecycle
    def fit(self, traces: Sequence[Any]) -> "Predictor":
        """Learn from golem-trace/1 traces (anything with ``experts``, ``weights``,
        ``seq_offsets``). Predictors that learn nothing ignore it."""
        return self

    def begin_sequence(self) -> None:
        """A new sequence (prompt) starts: routing history is forgotten."""
        self.step = -1

    def begin_step(self) -> None:
        """A new decode step (token) starts."""
        self.step += 1

    # -- predicting
    def targets(self, position: int, depth: int, nearest: int = 1) -> range:
        """The MoE positions a proposal at ``position`` covers: ``position + nearest`` ..
        ``position + depth``, cut at the last one."""
        if not 0 <= position < self.shape.num_layers:
            raise ValueError(f"MoE position {position} outside 0..{self.shape.num_layers - 1}")
        if depth < nearest or nearest < 0:
            raise ValueError(f"depth {depth} must be >= nearest {nearest} >= 0")
        return range(position + nearest, min(position + depth, self.shape.num_layers - 1) + 1)

    def propose(self, position: int, depth: int, hidden: Any = None, *, nearest: int = 1) -> Proposal:
        """Start predicting positions ``position + nearest .. position + depth`` (lazily)."""
        return Proposal(position, self.targets(position, depth, nearest))

    def propose_next(self, position: int, depth: int, hidden: Any = None) -> Optional[Proposal]:
        """Guesses for the NEXT step's first MoE layers, when ``position + depth`` runs past
        the last one: targets numbered on (``num_layers + t`` is the next step's position
        ``t``). None when the predictor cannot see past the current step (the default)."""
        return None

    def scores(self, proposal: Proposal) -> np.ndarray:
        """float32 (len(targets), E) scores of a proposal, after its arrays are evaluated
        and after ``observe`` of its position."""
        return self.predict(proposal.position, proposal.targets)

    def predict(self, position: int, targets: range) -> np.ndarray:
        raise NotImplementedError

    def observe(self, position: int, experts: Any, weights: Any = None) -> None:
        """The true routing of the MoE layer at ``position`` at this step (ids; weights
        order them when given)."""

    def candidates(
        self, proposal: Proposal, selection: Selection, exclude: Optional[np.ndarray] = None
    ) -> List[Candidate]:
        """The proposal's scores through the shared selection step."""
        return selection.select(self.scores(proposal), proposal.targets, exclude)

    def zeros(self, targets: range) -> np.ndarray:
        return np.zeros((len(targets), self.shape.num_experts), np.float32)
