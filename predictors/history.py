"""History predictors: the next layers' experts from routing already seen, no hidden state.

Owns ``previous``, ``frequency``, ``transition`` and combinations. Each keeps the current
sequence's routing history (forgotten at ``begin_sequence``) and statistics (from ``fit`` and,
when ``online``, from observed steps; kept across sequences). Knows nothing of files.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np

from .base import BinnedCalibration, Predictor, Proposal, RoutingShape, ranked_ids


def onehot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """bool (N, L, E) from int ids (N, L, K), -1 = absent."""
    e = np.asarray(experts).astype(np.int64)
    out = np.zeros((*e.shape[:-1], num_experts + 1), bool)
    np.put_along_axis(out, np.where(e < 0, num_experts, e), True, axis=-1)
    return out[..., :num_experts]


def ranked(experts: np.ndarray, weights: Optional[np.ndarray]) -> np.ndarray:
    """int64 (N, L, K) ids ordered by weight, highest first; absent (-1) last."""
    e = np.asarray(experts).astype(np.int64)
    if weights is None:
        return e
    w = np.where(e >= 0, np.asarray(weights, np.float64), -np.inf)
    return np.take_along_axis(e, np.argsort(-w, axis=-1, kind="stable"), axis=-1)


def sequences(trace: Any):
    """``(start, stop)`` step ranges of a trace's sequences."""
    so = np.asarray(trace.seq_offsets)
    for s in range(len(so) - 1):
        yield int(so[s]), int(so[s + 1])


class RoutingHistory:
    """Each MoE position's most recent routing (ids, best first) and the step it was seen at."""

    def __init__(self, num_layers: int):
        self.ids: List[Optional[np.ndarray]] = [None] * num_layers
        self.step_of = np.full(num_layers, -2, np.int64)

    def clear(self) -> None:
        self.ids = [None] * len(self.ids)
        self.step_of[:] = -2

    def record(self, position: int, ids: np.ndarray, step: int) -> None:
        self.ids[position] = ids
        self.step_of[position] = step

    def at(self, position: int, step: int) -> Optional[np.ndarray]:
        """The ids the MoE layer at ``position`` routed to at ``step``, if that was the last
        thing seen there."""
        return self.ids[position] if self.step_of[position] == step and step >= 0 else None


class HistoryPredictor(Predictor):
    """Shared plumbing of the history predictors.

    Args:
        shape: the model's routing shape.
        online: learn statistics from observed routing too (not only from ``fit``).
    """

    def __init__(self, shape: RoutingShape, *, online: bool = True):
        super().__init__(shape)
        self.online = online
        self.history = RoutingHistory(shape.num_layers)

    def begin_sequence(self) -> None:
        super().begin_sequence()
        self.history.clear()

    def observe(self, position: int, experts: Any, weights: Any = None) -> None:
        self.observe_ids(position, ranked_ids(experts, weights))

    def observe_ids(self, position: int, ids: np.ndarray) -> None:
        """``observe`` with the ids already distinct and ranked (``ranked_ids``)."""
        if self.online:
            self.learn(position, ids)
        self.history.record(position, ids, self.step)

    def learn(self, position: int, ids: np.ndarray) -> None:
        """Update statistics with the routing at ``position`` at this step (before it is recorded)."""


class Previous(HistoryPredictor):
    """The previous token's experts at the target layer.

    Score: how often an expert the layer used one token ago, at that rank by weight, is used
    again: ``(reused + prior * prior_weight) / (seen + prior_weight)`` per (position, rank),
    learned from traces and observed steps. Nothing is predicted at a sequence's first step.

    Args:
        shape: the model's routing shape.
        online: learn reuse rates from observed steps too.
        prior: reuse probability assumed before any data.
        prior_weight: how many observations the prior is worth.
    """

    name = "previous"

    def __init__(self, shape: RoutingShape, *, online: bool = True, prior: float = 0.5, prior_weight: float = 2.0):
        super().__init__(shape, online=online)
        self.reused = np.full((shape.num_layers, shape.top_k), prior * prior_weight)
        self.seen = np.full((shape.num_layers, shape.top_k), prior_weight)
        self._mask = np.zeros(shape.num_experts, bool)

    def fit(self, traces: Sequence[Any]) -> "Previous":
        for trace in traces:
            ids = ranked(trace.experts, trace.weights)[..., : self.shape.top_k]
            hot = onehot(trace.experts, self.shape.num_experts)
            for start, stop in sequences(trace):
                if stop - start < 2:
                    continue
                prev = ids[start : stop - 1]  # (n, L, K)
                nxt = hot[start + 1 : stop]  # (n, L, E)
                valid = prev >= 0
                hit = np.take_along_axis(nxt, np.where(valid, prev, 0), axis=-1) & valid
                self.reused += hit.sum(axis=0)
                self.seen += valid.sum(axis=0)
        return self

    def reuse_rate(self) -> np.ndarray:
        """(L, K) estimated probability of reuse by MoE position and rank."""
        return self.reused / self.seen

    def predict(self, position: int, targets: range) -> np.ndarray:
        out = self.zeros(targets)
        k = self.shape.top_k
        for row, t in enumerate(targets):
            ids = self.history.at(t, self.step - 1)
            if ids is not None and ids.size:
                ranks = _RANKS[: ids.size] if ids.size <= k else np.minimum(np.arange(ids.size), k - 1)
                out[row, ids] = self.reused[t, ranks] / self.seen[t, ranks]
        return out

    def learn(self, position: int, ids: np.ndarray) -> None:
        prev = self.history.at(position, self.step - 1)
        if prev is None or not prev.size:
            return
        self._mask[ids] = True
        reused = self._mask[prev]
        self._mask[ids] = False
        if prev.size <= self.shape.top_k:
            ranks = _RANKS[: prev.size]
            self.seen[position, ranks] += 1.0
            self.reused[position, ranks] += reused
        else:
            ranks = np.minimum(np.arange(prev.size), self.shape.top_k - 1)
            np.add.at(self.seen[position], ranks, 1.0)
            np.add.at(self.reused[position], ranks, reused.astype(np.float64))


_RANKS = np.arange(4096)


class Frequency(HistoryPredictor):
    """Each layer's hot set: how often each expert is used.

    Score: the share of steps in which the layer used the expert (learned from traces and
    observed steps). With ``online=False`` after ``fit`` it is a static hot set.

    Args:
        shape: the model's routing shape.
        online: count observed steps too.
    """

    name = "frequency"

    def __init__(self, shape: RoutingShape, *, online: bool = True):
        super().__init__(shape, online=online)
        self.counts = np.zeros((shape.num_layers, shape.num_experts))
        self.steps = np.zeros(shape.num_layers)

    def fit(self, traces: Sequence[Any]) -> "Frequency":
        for trace in traces:
            hot = onehot(trace.experts, self.shape.num_experts)
            self.counts += hot.sum(axis=0)
            self.steps += hot.shape[0]
        return self

    def predict(self, position: int, targets: range) -> np.ndarray:
        out = self.zeros(targets)
        for row, t in enumerate(targets):
            if self.steps[t] > 0:
                out[row] = self.counts[t] / self.steps[t]
        return out

    def learn(self, position: int, ids: np.ndarray) -> None:
        self.counts[position, ids] += 1.0
        self.steps[position] += 1.0


class Transition(HistoryPredictor):
    """Experts at layer L -> experts at layer L+d of the same token, learned from traces.

    Raw score of expert j at layer L+d given the experts S that layer L used: naive Bayes
    over the members of S, ``logit p = logit P(j) + sum_i (logit P(j | i) - logit P(j))``,
    with ``P(j | i)`` from co-occurrence counts (smoothed towards ``P(j)``). The raw value
    is overconfident (S's members are not independent), so the score is its calibration:
    the observed rate of use of experts with that raw value (``BinnedCalibration``, per d),
    fitted in-sample by ``fit`` and updated online. Tables for d = 1..max_depth:
    ``max_depth * L * E * E`` float32 counts and as many log-odds, rebuilt from the counts
    every ``refresh_steps`` learned steps.

    Args:
        shape: the model's routing shape.
        online: learn counts and calibration from observed steps too.
        max_depth: deepest d with a table; deeper targets get no prediction.
        smoothing: pseudo-observations pulling ``P(j | i)`` towards ``P(j)``.
        refresh_steps: learned steps between rebuilds of the log-odds tables.
    """

    name = "transition"

    def __init__(
        self,
        shape: RoutingShape,
        *,
        online: bool = True,
        max_depth: int = 3,
        smoothing: float = 10.0,
        refresh_steps: int = 16,
    ):
        super().__init__(shape, online=online)
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        self.max_depth = max_depth
        self.smoothing = smoothing
        self.refresh_steps = refresh_steps
        L, E = shape.num_layers, shape.num_experts
        self.pairs = np.zeros((max_depth, L, E, E), np.float32)
        self.counts = np.zeros((L, E))
        self.steps = np.zeros(L)
        self.calibration = BinnedCalibration(max_depth)
        self._tables: Optional[tuple] = None
        self._stale_steps = 0
        # bins of this step's predictions by (target position, d - 1), -1 = none yet
        self._pending = np.full((L, max_depth, E), -1, np.int64)
        self._used = np.zeros((L, E), bool)  # this step's true routing, for the calibration
        self._observed = np.zeros(L, bool)

    def begin_step(self) -> None:
        self._calibrate()
        super().begin_step()
        if self.online and self._stale_steps >= self.refresh_steps:
            self._tables = None

    def begin_sequence(self) -> None:
        self._calibrate()
        super().begin_sequence()

    def _calibrate(self) -> None:
        """Score the last step's predictions against its routing, all layers at once."""
        L, D, E = self._pending.shape
        made = (self._pending[:, :, 0] >= 0) & self._observed[:, None]  # (L, D)
        if made.any():
            groups = np.broadcast_to(np.arange(D)[None, :], (L, D))[made]
            used = np.broadcast_to(self._used[:, None, :], (L, D, E))[made]
            self.calibration.update(groups, self._pending[made], used)
        self._pending.fill(-1)
        self._used.fill(False)
        self._observed.fill(False)

    def _logodds(self) -> tuple:
        """(prior logits (L, E), evidence (D, L, E, E)) from the counts."""
        if self._tables is None:
            prior = (self.counts + 1.0) / (self.steps[:, None] + 2.0)
            base = _logit(prior)
            evidence = np.zeros_like(self.pairs)
            for d in range(1, self.max_depth + 1):
                tgt = prior[d:]  # (L - d, E): P(j) at the target layers
                cond = (self.pairs[d - 1, :-d] + self.smoothing * tgt[:, None, :]) / (
                    self.counts[:-d, :, None] + self.smoothing
                )
                evidence[d - 1, :-d] = _logit(cond) - base[d:, None, :]
            self._tables = (base, evidence)
            self._stale_steps = 0
        return self._tables

    def raw(self, position: int, src: np.ndarray, depths: np.ndarray) -> np.ndarray:
        """(len(depths), E) naive-Bayes probabilities for positions ``position + depths``."""
        base, evidence = self._logodds()
        z = base[position + depths] + evidence[(depths - 1)[:, None], position, src[None, :]].sum(axis=1)
        return 1.0 / (1.0 + np.exp(-z))

    def fit(self, traces: Sequence[Any]) -> "Transition":
        L = self.shape.num_layers
        hots = [onehot(t.experts, self.shape.num_experts).astype(np.float64) for t in traces]
        for hot in hots:
            self.counts += hot.sum(axis=0)
            self.steps += hot.shape[0]
            for d in range(1, self.max_depth + 1):
                for position in range(L - d):
                    self.pairs[d - 1, position] += hot[:, position].T @ hot[:, position + d]
        self._tables = None
        base, evidence = self._logodds()
        for hot in hots:  # in-sample calibration
            for d in range(1, self.max_depth + 1):
                for position in range(L - d):
                    z = base[position + d] + hot[:, position] @ evidence[d - 1, position]
                    bins = self.calibration.bin_of(1.0 / (1.0 + np.exp(-z)))
                    self.calibration.update(np.full(len(bins), d - 1), bins, hot[:, position + d])
        return self

    def predict(self, position: int, targets: range) -> np.ndarray:
        out = self.zeros(targets)
        src = self.history.at(position, self.step)
        if src is None or not src.size or not len(targets):
            return out
        depths = np.arange(targets.start, targets.stop) - position
        inside = depths <= self.max_depth
        depths = depths[inside]
        if not depths.size:
            return out
        bins = self.calibration.bin_of(self.raw(position, src, depths))
        out[: depths.size] = self.calibration.apply(depths - 1, bins)
        if self.online:
            self._pending[position + depths, depths - 1] = bins
        return out

    def learn(self, position: int, ids: np.ndarray) -> None:
        self.counts[position, ids] += 1.0
        self.steps[position] += 1.0
        if position == self.shape.num_layers - 1:
            self._stale_steps += 1
        for d in range(1, min(self.max_depth, position) + 1):
            src = self.history.at(position - d, self.step)
            if src is not None and src.size:
                self.pairs[d - 1, position - d, src[:, None], ids[None, :]] += 1.0
        self._used[position, ids] = True
        self._observed[position] = True


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1.0 - 1e-6)
    return np.log(p) - np.log1p(-p)


COMBINE_RULES = ("max", "mean", "noisy-or")


class Combined(Predictor):
    """Several predictors at once; their scores merged per expert.

    Rules: ``max`` (the most confident member), ``mean``, ``noisy-or`` (1 - prod(1 - s),
    members taken as independent evidence).

    Args:
        members: the predictors combined (all see every call).
        rule: one of ``COMBINE_RULES``.
    """

    def __init__(self, members: Sequence[Predictor], rule: str = "max"):
        if not members:
            raise ValueError("Combined needs at least one member")
        if rule not in COMBINE_RULES:
            raise ValueError(f"unknown combine rule {rule!r}; choose one of {', '.join(COMBINE_RULES)}")
        super().__init__(members[0].shape)
        self.members = list(members)
        self.rule = rule
        self.name = "+".join(m.name for m in self.members)
        self.needs_hidden = any(m.needs_hidden for m in self.members)
        self.hidden_kind = next((m.hidden_kind for m in self.members if m.hidden_kind), None)

    def fit(self, traces: Sequence[Any]) -> "Combined":
        for m in self.members:
            m.fit(traces)
        return self

    def begin_sequence(self) -> None:
        super().begin_sequence()
        for m in self.members:
            m.begin_sequence()

    def begin_step(self) -> None:
        super().begin_step()
        for m in self.members:
            m.begin_step()

    def propose(self, position: int, depth: int, hidden: Any = None, *, nearest: int = 1) -> Proposal:
        props = [m.propose(position, depth, hidden, nearest=nearest) for m in self.members]
        arrays = tuple(a for p in props for a in p.arrays)
        return Proposal(position, props[0].targets, arrays, props)

    def scores(self, proposal: Proposal) -> np.ndarray:
        parts = np.stack([m.scores(p) for m, p in zip(self.members, proposal.payload)])
        if self.rule == "max":
            return parts.max(axis=0)
        if self.rule == "mean":
            return parts.mean(axis=0).astype(np.float32)
        return (1.0 - np.prod(1.0 - parts, axis=0)).astype(np.float32)

    def observe(self, position: int, experts: Any, weights: Any = None) -> None:
        ids = ranked_ids(experts, weights)
        for m in self.members:
            if isinstance(m, HistoryPredictor):
                m.observe_ids(position, ids)
            else:
                m.observe(position, experts, weights)
