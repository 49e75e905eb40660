"""Predictors by name: what ``--predictor NAME`` builds.

Owns the table of predictor names and their factories; ``a+b`` names a combination. Knows
nothing of files: the caller hands over the truth trace (oracles) or the model's MoE blocks
(lookahead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from .base import Predictor, RoutingShape
from .history import COMBINE_RULES, Combined, Frequency, Previous, Transition
from .lookahead import Lookahead, Probe
from .oracle import NoisyOracle, Oracle, RandomGuess
from .routers import MoEBlock


@dataclass(frozen=True)
class PredictorOptions:
    """Everything a predictor may be built with; each factory takes what it needs.

    Args:
        truth: the trace to be replayed (``oracle``, ``noisy-oracle``).
        blocks: the model's MoE blocks (``lookahead``).
        hidden_kind: ``post_attn`` or ``layer_input`` (``lookahead``, ``probe``).
        online: history predictors and lookahead calibration learn from observed routing.
        max_depth: deepest distance with its own table (``transition``, ``lookahead``, ``probe``).
        recall: requested recall (``noisy-oracle``).
        false_positive_rate: share of unused experts named (``noisy-oracle``).
        seed: random seed (``noisy-oracle``, ``random``).
        combine: how ``a+b`` merges scores: ``max``, ``mean`` or ``noisy-or``.
    """

    truth: Any = None
    blocks: Optional[Sequence[MoEBlock]] = None
    hidden_kind: str = "post_attn"
    online: bool = True
    max_depth: int = 3
    recall: float = 0.8
    false_positive_rate: float = 0.0
    seed: int = 0
    combine: str = "max"


def _need(value: Any, what: str, name: str) -> Any:
    if value is None:
        raise ValueError(f"predictor {name!r} needs {what}")
    return value


def _lookahead(shape: RoutingShape, o: PredictorOptions) -> Predictor:
    blocks = _need(o.blocks, "the model (its routers)", "lookahead")
    p = Lookahead(blocks, hidden_kind=o.hidden_kind, max_depth=o.max_depth, online=o.online)
    if (p.shape.num_layers, p.shape.num_experts) != (shape.num_layers, shape.num_experts):
        raise ValueError(
            f"the model has {p.shape.num_layers} MoE layers of {p.shape.num_experts} experts, "
            f"the trace {shape.num_layers} of {shape.num_experts}"
        )
    return p


_FACTORIES: Dict[str, Callable[[RoutingShape, PredictorOptions], Predictor]] = {
    "lookahead": _lookahead,
    "previous": lambda s, o: Previous(s, online=o.online),
    "frequency": lambda s, o: Frequency(s, online=o.online),
    "transition": lambda s, o: Transition(s, online=o.online, max_depth=o.max_depth),
    "oracle": lambda s, o: Oracle(_need(o.truth, "the trace it predicts", "oracle"), s),
    "noisy-oracle": lambda s, o: NoisyOracle(
        _need(o.truth, "the trace it predicts", "noisy-oracle"),
        o.recall,
        o.false_positive_rate,
        seed=o.seed,
        shape=s,
    ),
    "random": lambda s, o: RandomGuess(s, seed=o.seed),
    "probe": lambda s, o: Probe(s, hidden_kind=o.hidden_kind, max_depth=o.max_depth, online=o.online),
}

#: Combinations worth listing (any ``a+b`` of the names above works).
COMBINATIONS = ("transition+previous", "lookahead+previous")

#: Predictors that learn from ``--train`` traces (``probe`` needs their hidden states).
TRAINABLE = ("previous", "frequency", "transition", "probe")


def predictor_names() -> List[str]:
    """Every name ``make_predictor`` accepts (besides other ``a+b`` combinations)."""
    return [*_FACTORIES, *COMBINATIONS]


def make_predictor(name: str, shape: RoutingShape, options: PredictorOptions = PredictorOptions()) -> Predictor:
    """Build the predictor called ``name`` (``a+b`` combines a and b)."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in _FACTORIES]
    if unknown or not name:
        raise ValueError(f"unknown predictor {name!r}; choose from: {' '.join(predictor_names())}")
    if options.combine not in COMBINE_RULES:
        raise ValueError(f"unknown combine rule {options.combine!r}; choose one of {', '.join(COMBINE_RULES)}")
    members = [_FACTORIES[p](shape, options) for p in parts]
    return members[0] if len(members) == 1 else Combined(members, options.combine)
