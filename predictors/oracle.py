"""Reference predictors: the true future (oracle), a dialled-in imperfect future (noisy
oracle) and blind guessing (random).

Owns the bounds that the real predictors are measured between. The oracles read the routing
they are to predict from a trace given up front and follow it with a cursor moved by
``begin_sequence`` / ``begin_step``, so the caller must replay exactly that trace's decode
steps (or generate exactly its tokens). Knows nothing of files.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .base import Predictor, Proposal, RoutingShape
from .history import onehot


class Oracle(Predictor):
    """Predicts exactly the experts each target layer will use. Score 1.0 for those.

    Args:
        truth: the trace to be replayed (``experts``, ``seq_offsets``).
        shape: routing shape (default: the trace's).
    """

    name = "oracle"

    def __init__(self, truth: Any, shape: Optional[RoutingShape] = None):
        super().__init__(shape or RoutingShape.of(truth))
        self.truth = onehot(truth.experts, self.shape.num_experts)
        if self.truth.shape[1] != self.shape.num_layers:
            raise ValueError(f"truth has {self.truth.shape[1]} layers, expected {self.shape.num_layers}")
        self.seq_offsets = np.asarray(truth.seq_offsets, np.int64)
        self.sequence = -1
        self.row = -1

    def begin_sequence(self) -> None:
        super().begin_sequence()
        self.sequence += 1
        if self.sequence >= len(self.seq_offsets) - 1:
            raise ValueError(f"{self.name}: its trace holds only {len(self.seq_offsets) - 1} sequences")
        self.row = int(self.seq_offsets[self.sequence]) - 1

    def begin_step(self) -> None:
        if self.sequence < 0:
            self.begin_sequence()
        super().begin_step()
        self.row += 1
        if self.row >= self.seq_offsets[self.sequence + 1]:
            raise ValueError(
                f"{self.name}: sequence {self.sequence} of its trace has only "
                f"{int(self.seq_offsets[self.sequence + 1] - self.seq_offsets[self.sequence])} steps"
            )

    def future(self, targets: range) -> np.ndarray:
        """bool (len(targets), E): what the target layers use at the current step (targets
        past the last position: the next step's first positions, see ``propose_next``)."""
        if self.row < 0:
            raise ValueError(f"{self.name}: begin_step() was not called")
        L = self.shape.num_layers
        if targets.start >= L:
            return self.truth[self.row + 1, targets.start - L : targets.stop - L]
        return self.truth[self.row, targets.start : targets.stop]

    def propose_next(self, position: int, depth: int, hidden: Any = None) -> Optional[Proposal]:
        L = self.shape.num_layers
        n = min(position + depth - (L - 1), L)
        if n <= 0 or self.row < 0 or self.row + 1 >= self.seq_offsets[self.sequence + 1]:
            return None  # the sequence ends here: there is no next step to know
        return Proposal(position, range(L, L + n))

    def predict(self, position: int, targets: range) -> np.ndarray:
        return self.future(targets).astype(np.float32)


class NoisyOracle(Oracle):
    """The truth, degraded: each target layer's experts are kept with probability ``recall``
    and each unused expert is added with probability ``false_positive_rate``. Score 1.0 for
    every expert it names (it claims certainty, so thresholds do not change it).

    Counts per layer are rounded stochastically (``floor(r * k)`` plus one with probability of
    the remainder), so the measured recall matches the requested one closely.

    Args:
        truth: the trace to be replayed.
        recall: share of the true experts predicted, 0..1.
        false_positive_rate: share of the unused experts predicted, 0..1.
        seed: random seed.
        shape: routing shape (default: the trace's).
    """

    name = "noisy-oracle"

    def __init__(
        self,
        truth: Any,
        recall: float = 0.8,
        false_positive_rate: float = 0.0,
        *,
        seed: int = 0,
        shape: Optional[RoutingShape] = None,
    ):
        super().__init__(truth, shape)
        for label, value in (("recall", recall), ("false_positive_rate", false_positive_rate)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{label} must be within [0, 1], got {value}")
        self.recall = recall
        self.false_positive_rate = false_positive_rate
        self.rng = np.random.default_rng(seed)

    def _pick(self, pool: np.ndarray, share: float) -> np.ndarray:
        want = share * pool.size
        n = int(np.floor(want)) + int(self.rng.random() < want - np.floor(want))
        return self.rng.choice(pool, size=n, replace=False) if n else pool[:0]

    def predict(self, position: int, targets: range) -> np.ndarray:
        out = np.zeros((len(targets), self.shape.num_experts), np.float32)
        for row, used in enumerate(self.future(targets)):
            out[row, self._pick(np.flatnonzero(used), self.recall)] = 1.0
            out[row, self._pick(np.flatnonzero(~used), self.false_positive_rate)] = 1.0
        return out


class RandomGuess(Predictor):
    """``top_k`` experts per target layer drawn uniformly at random, score 1.0: the floor
    any predictor must beat (expected recall top_k / E).

    Args:
        shape: the model's routing shape.
        seed: random seed.
    """

    name = "random"

    def __init__(self, shape: RoutingShape, *, seed: int = 0):
        super().__init__(shape)
        self.rng = np.random.default_rng(seed)

    def predict(self, position: int, targets: range) -> np.ndarray:
        out = self.zeros(targets)
        picks = np.argpartition(self.rng.random(out.shape), self.shape.top_k - 1, axis=1)[:, : self.shape.top_k]
        np.put_along_axis(out, picks, 1.0, axis=1)
        return out
