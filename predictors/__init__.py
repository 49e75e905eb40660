"""golem.predictors: who guesses which experts come next, and how well.

Predictors are pure functions of what they are shown (an MoE position, its hidden state, the
routing history); they never touch files or the I/O scheduler. ``families`` holds what golem
knows of each model family (one module per ``model_type``), ``routers`` finds a loaded
model's MoE blocks and routes them by their family's exact rule (shared with the runtime);
``metrics`` replays traces.
"""

from .base import Candidate, Predictor, Proposal, RoutingShape, Selection
from .history import Combined, Frequency, Previous, Transition
from .lookahead import HIDDEN_KINDS, Lookahead, Probe
from .metrics import Accuracy, merge_accuracies, replay
from .oracle import NoisyOracle, Oracle, RandomGuess
from .registry import PredictorOptions, make_predictor, predictor_names
from .families import Family, family
from .routers import MoEBlock, RouterAdapter, find_moe_blocks, router_for

__all__ = [
    "Accuracy",
    "Candidate",
    "Combined",
    "Family",
    "Frequency",
    "HIDDEN_KINDS",
    "Lookahead",
    "MoEBlock",
    "NoisyOracle",
    "Oracle",
    "Predictor",
    "PredictorOptions",
    "Proposal",
    "RandomGuess",
    "RouterAdapter",
    "RoutingShape",
    "Selection",
    "Previous",
    "Probe",
    "Transition",
    "family",
    "find_moe_blocks",
    "make_predictor",
    "merge_accuracies",
    "predictor_names",
    "replay",
    "router_for",
]
