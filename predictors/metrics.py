"""Predictor accuracy: replay a routing trace through a predictor and count what it got right.

Owns the definitions behind ``golem-trace predict`` and the benchmarks. Recall at depth d
counts, over every decode step and MoE layer, the true experts of layer l that were among the
candidates selected at layer l - d of the same step, divided by all true experts (layers
below d, where nothing was predicted, count as misses; ``recall_covered`` leaves them out).
Works on in-memory trace-like objects; reading files is the caller's business.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .base import Predictor, Selection
from .history import onehot, sequences


@dataclass(frozen=True)
class Accuracy:
    """What a predictor got right at one depth and threshold.

    Args:
        predictor: its name.
        depth: distance in MoE layers between where a prediction is made and its target.
        threshold: the selection threshold.
        steps: decode steps replayed.
        true_experts: experts the trace routed to, all layers.
        covered_experts: of those, the ones at MoE positions >= depth (that could be predicted).
        predicted: candidates selected.
        hits: selected candidates the target layer did use.
        covered_layer_steps: steps x MoE positions >= depth.
        expert_nbytes: bytes of one expert (0 when unknown).
        best: when set, the selection was "the ``best`` highest-scored experts of each target
            layer" (score > 0) instead of the threshold (then reported as 0).
    """

    predictor: str
    depth: int
    threshold: float
    steps: int
    true_experts: int
    covered_experts: int
    predicted: int
    hits: int
    covered_layer_steps: int
    expert_nbytes: int = 0
    best: Optional[int] = None

    @property
    def recall(self) -> float:
        return self.hits / self.true_experts if self.true_experts else 0.0

    @property
    def recall_covered(self) -> float:
        return self.hits / self.covered_experts if self.covered_experts else 0.0

    @property
    def precision(self) -> float:
        return self.hits / self.predicted if self.predicted else 0.0

    @property
    def predicted_per_layer(self) -> float:
        """Candidates per layer and step, over the layers that get predictions."""
        return self.predicted / self.covered_layer_steps if self.covered_layer_steps else 0.0

    @property
    def wasted_per_useful(self) -> float:
        """Bytes a prefetcher would read in vain per byte it reads usefully (no cache)."""
        wasted = self.predicted - self.hits
        if not self.hits:
            return float("inf") if wasted else 0.0
        return wasted / self.hits

    @property
    def wasted_nbytes_per_step(self) -> float:
        return (self.predicted - self.hits) * self.expert_nbytes / self.steps if self.steps else 0.0

    def as_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        for key in ("recall", "recall_covered", "precision", "predicted_per_layer", "wasted_per_useful", "wasted_nbytes_per_step"):
            value = getattr(self, key)
            out[key] = None if value == float("inf") else round(float(value), 6)
        return out


def replay(
    trace: Any,
    predictor: Predictor,
    *,
    depth: int,
    thresholds: Sequence[float] = (0.1, 0.3, 0.5),
    nearest: int = 1,
    hidden: Optional[np.ndarray] = None,
    max_experts: Optional[int] = None,
    max_nbytes: Optional[int] = None,
    expert_nbytes: Optional[int] = None,
    best: Optional[int] = None,
) -> List[Accuracy]:
    """Replay ``trace`` (its decode steps, sequence by sequence) through ``predictor``.

    Calls the predictor exactly as the decode engine does (see ``Predictor``); ``hidden``
    (N, L, D) feeds predictors that need hidden states. Returns one ``Accuracy`` per depth
    ``nearest..depth`` and threshold, depth-major; with ``best=k`` each depth also gets a
    row for "the k best-scored experts of the target layer" (how published recall figures
    count), after the threshold rows.
    """
    N, L, _ = trace.experts.shape
    E = predictor.shape.num_experts
    _check_replay(trace, predictor, depth=depth, nearest=nearest, hidden=hidden, best=best)
    nbytes = int(expert_nbytes if expert_nbytes is not None else (getattr(trace, "meta", None) or {}).get("expert_bytes", 0))
    selections = [
        Selection(float(th), max_experts, max_nbytes, nbytes if max_nbytes is not None else 0) for th in thresholds
    ]
    R, T = depth - nearest + 1, len(selections) + (best is not None)
    hot = onehot(trace.experts, E)
    experts = np.asarray(trace.experts)
    weights = None if getattr(trace, "weights", None) is None else np.asarray(trace.weights)
    hits = np.zeros((T, R), np.int64)
    predicted = np.zeros((T, R), np.int64)
    for start, stop in sequences(trace):
        predictor.begin_sequence()
        for t in range(start, stop):
            predictor.begin_step()
            rows = [(experts[t, position], None if weights is None else weights[t, position],
                     hidden[t, position] if predictor.needs_hidden else None) for position in range(L)]
            masks = _step_masks(predictor, rows, depth=depth, nearest=nearest, selections=selections, best=best)
            hits += (masks & hot[t][None, None]).sum(axis=(2, 3))
            predicted += masks.sum(axis=(2, 3))
    return _accuracies(predictor.name, hot, hits, predicted, selections, nearest=nearest, best=best,
                       expert_nbytes=nbytes)


def _check_replay(trace: Any, predictor: Predictor, *, depth: int, nearest: int,
                  hidden: Optional[np.ndarray], best: Optional[int]) -> None:
    """The trace's shape against the predictor's, hidden states where it needs them, depth and best in range."""
    N, L, _ = trace.experts.shape
    E = predictor.shape.num_experts
    if L != predictor.shape.num_layers:
        raise ValueError(f"trace has {L} layers, predictor expects {predictor.shape.num_layers}")
    if predictor.needs_hidden:
        if hidden is None:
            raise ValueError(
                f"predictor {predictor.name!r} needs hidden states; this trace has none "
                "(record them with golem-run --trace-out FILE --trace-hidden)"
            )
        if hidden.shape[:2] != (N, L):
            raise ValueError(f"hidden states shape {hidden.shape} does not match the trace's ({N}, {L}, D)")
    if depth < nearest or nearest < 0:
        raise ValueError(f"depth must be >= {max(nearest, 0)}, got {depth}")
    if best is not None and not 1 <= best <= E:
        raise ValueError(f"best must be within 1..{E}, got {best}")


def _step_masks(predictor: Predictor, rows: Sequence[tuple], *, depth: int, nearest: int,
                selections: Sequence[Selection], best: Optional[int]) -> np.ndarray:
    """One decode step through ``predictor``, MoE position by position as the engine calls it
    (``rows``: each position's experts, weights and hidden state); returns which experts each
    selection (then the ``best`` row) predicts, (T, R, L, E) by selection, depth and target
    position."""
    L, E = len(rows), predictor.shape.num_experts
    R, T = depth - nearest + 1, len(selections) + (best is not None)
    capped = any(s.limit is not None for s in selections)
    buf = np.zeros((R, L, E), np.float32)  # scores by depth and target position
    masks = np.zeros((T, R, L, E), bool)
    for position, (chosen, weights, h) in enumerate(rows):
        prop = predictor.propose(position, depth, h, nearest=nearest)
        predictor.observe(position, chosen, weights)
        if not len(prop.targets):
            continue
        scores = predictor.scores(prop)
        n, first = len(prop.targets), prop.targets.start
        rr, cols = _ARANGE[:n] + (first - position - nearest), _ARANGE[:n] + first
        buf[rr, cols] = scores
        if capped:
            for i, sel in enumerate(selections):
                masks[i, rr, cols] = sel.mask(scores)
    if not capped:
        thr = np.asarray([s.threshold for s in selections], np.float32)[:, None, None, None]
        masks[: len(selections)] = (buf[None] >= thr) & (buf[None] > 0)
    if best is not None:
        top = np.argpartition(-buf, best - 1, axis=-1)[..., :best]
        np.put_along_axis(masks[-1], top, True, axis=-1)
        masks[-1] &= buf > 0
    return masks


def _accuracies(name: str, hot: np.ndarray, hits: np.ndarray, predicted: np.ndarray,
                selections: Sequence[Selection], *, nearest: int, best: Optional[int],
                expert_nbytes: int) -> List[Accuracy]:
    """One ``Accuracy`` per depth and selection, depth-major, from the replay's counts ((T, R) each)."""
    N, L, _ = hot.shape
    T, R = hits.shape
    true_total = int(hot.sum())
    out = []
    for r in range(R):
        d = nearest + r
        covered = int(hot[:, d:].sum())
        for i in range(T):
            is_best = i == len(selections)
            out.append(
                Accuracy(
                    predictor=name,
                    depth=d,
                    threshold=0.0 if is_best else selections[i].threshold,
                    steps=N,
                    true_experts=true_total,
                    covered_experts=covered,
                    predicted=int(predicted[i, r]),
                    hits=int(hits[i, r]),
                    covered_layer_steps=N * (L - d),
                    expert_nbytes=expert_nbytes,
                    best=best if is_best else None,
                )
            )
    return out


_ARANGE = np.arange(1024)


def merge_accuracies(results: Sequence[Sequence[Accuracy]]) -> List[Accuracy]:
    """Pool the counts of several replays (same depths and thresholds, in the same order)."""
    if not results:
        return []
    out = []
    for rows in zip(*results):
        first = rows[0]
        if any((r.depth, r.threshold, r.best) != (first.depth, first.threshold, first.best) for r in rows):
            raise ValueError("replays to merge must report the same depths and thresholds")
        out.append(
            Accuracy(
                predictor=first.predictor,
                depth=first.depth,
                threshold=first.threshold,
                steps=sum(r.steps for r in rows),
                true_experts=sum(r.true_experts for r in rows),
                covered_experts=sum(r.covered_experts for r in rows),
                predicted=sum(r.predicted for r in rows),
                hits=sum(r.hits for r in rows),
                covered_layer_steps=sum(r.covered_layer_steps for r in rows),
                expert_nbytes=first.expert_nbytes,
                best=first.best,
            )
        )
    return out
