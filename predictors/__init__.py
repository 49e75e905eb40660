"""golem.predictors: who guesses which experts come next, and how well.

Predictors are pure functions of what they are shown (a layer, its hidden state, the
routing history); they never touch files or the I/O scheduler. ``routers`` holds each
family's exact selection rule (shared with the runtime); ``metrics`` replays traces.
"""

from .base import Candidate, Predictor, Proposal, RoutingShape, Selection
from .history import Combined, Frequency, Previous, Transition
from .lookahead import HIDDEN_KINDS, Lookahead, Probe
from .metrics import Accuracy, merge_accuracies, replay
from .oracle import NoisyOracle, Oracle, RandomGuess
from .registry import PredictorOptions, make_predictor, predictor_names
from .routers import MoEBlock, RouterAdapter, find_moe_blocks, register_router, router_for

__all__ = [
    "Accuracy",
    "Candidate",
    "Combined",
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
    "find_moe_blocks",
    "make_predictor",
    "merge_accuracies",
    "predictor_names",
    "register_router",
    "replay",
    "router_for",
]
