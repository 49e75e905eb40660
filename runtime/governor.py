"""The prefetch governor: how deep speculation may go for the next tokens, from what it paid.

Owns one decision: the prefetch depth of each decode step, between 0 (off) and the most the
user allowed. It weighs, over windows of tokens, what speculation saved (the stall avoided:
the step's demand reads and used prefetches at the stall a demand read costs with prefetch
off, less the stall the step had, so that a prefetch still in flight when its expert was
needed counts for the part of its read it had done) against what it cost (the engine's host
time proposing, issuing and installing prefetches, and prefetches wasted, each a read and a
slot given to nothing). Below zero it steps down,
down to off; while off it probes depth 1 now and then, less often after each probe that lost.
Knows nothing of slots, files or predictors: the prefetcher feeds it numbers once per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional


@dataclass(frozen=True)
class TokenOutcome:
    """What the engine measured over one decode step (seconds are wall time).

    Args:
        stall_s: waiting on demand reads.
        misses: demand reads.
        prefetch_host_s: host time spent on prefetch (predictor proposals and observation,
            issuing and cancelling reads, installing arrivals).
    """

    stall_s: float = 0.0
    misses: int = 0
    prefetch_host_s: float = 0.0


@dataclass
class GovernorStats:
    """What the governor saw and did: tokens per depth, steps down and up, probes."""

    tokens_at: Dict[int, int] = field(default_factory=dict)
    downs: int = 0
    ups: int = 0
    probes: int = 0

    def describe(self) -> str:
        """One line: decode steps per depth, and the governor's moves."""
        at = ", ".join(f"{d}: {n}" for d, n in sorted(self.tokens_at.items()))
        return f"steps at each depth {{{at}}}, {self.downs} steps down, {self.ups} up, {self.probes} probes"


class Governor:
    """Chooses the prefetch depth per token from measured savings and costs.

    Per window of ``window`` tokens at depth d > 0: saved = (demand reads + useful
    prefetches) x the stall per demand read with prefetch off, less the window's stall (the
    stall avoided); cost = prefetch host time + wasted prefetches x ``waste_weight`` x that
    stall per read. The stall per read with prefetch off is a running average over the
    tokens decoded off (until there is one, over every token). A window
    with saved < cost steps one layer shallower (at 0 prefetch is off), and so does a window
    cut short after ``min_window`` tokens whose cost is already over ``clear_loss`` times what
    it saved (where reads are cheap, host time alone outweighs the stalls a prefetch can
    avoid by far, and every token at that depth is lost); a window that paid,
    at a depth below ``max_depth`` whose deeper neighbour has not been measured since the
    last probe (or did worse), steps one deeper. Off, it probes depth 1 after ``probe_tokens``
    tokens, doubled after each probe that lost, up to ``max_probe_tokens``.

    Args:
        max_depth: the deepest it may go (the user's depth).
        window: tokens per decision.
        probe_tokens: tokens off before the first probe.
        max_probe_tokens: longest wait between probes.
        waste_weight: a wasted prefetch's cost in demand stalls (small: speculative reads
            start only on an idle reader, under a cap, and the demand reads they delay show
            up in the measured stall per miss already).
        start_depth: where it starts (default ``max_depth``).
        min_window: tokens before a clear loss may end a window early.
        clear_loss: cost over saved that ends a window early (None: never early).
    """

    def __init__(self, max_depth: int, *, window: int = 8, probe_tokens: int = 16, max_probe_tokens: int = 512,
                 waste_weight: float = 0.25, start_depth: Optional[int] = None, min_window: int = 2,
                 clear_loss: Optional[float] = 2.0):
        if max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {max_depth}")
        self.max_depth = max_depth
        self.window = window
        self.probe_tokens = probe_tokens
        self.max_probe_tokens = max_probe_tokens
        self.waste_weight = waste_weight
        self.min_window = min_window
        self.clear_loss = clear_loss
        self.depth = max_depth if start_depth is None else min(start_depth, max_depth)
        self.stats = GovernorStats()
        self.stall_per_miss_s: Optional[float] = None  # running average, every token
        self.off_stall_per_miss_s: Optional[float] = None  # running average, tokens decoded at depth 0
        self._net: Dict[int, float] = {}  # net seconds saved per token, last window at each depth (since off)
        self._saved = self._cost = 0.0
        self._tokens = 0
        self._off_for = 0
        self._backoff = probe_tokens
        self._probing = False  # at depth 1 on a probe that has not paid yet

    def step(self, outcome: TokenOutcome, useful: int, wasted: int) -> int:
        """One decoded token's outcome (``useful`` / ``wasted``: prefetches that turned out
        used or wasted during it); returns the depth for the next token."""
        self._measure(outcome)
        if self.depth == 0:
            return self._off_step()
        stall = self.off_stall_per_miss_s if self.off_stall_per_miss_s is not None else self.stall_per_miss_s or 0.0
        return self._account((outcome.misses + useful) * stall - outcome.stall_s,
                             outcome.prefetch_host_s + wasted * self.waste_weight * stall)

    def _measure(self, outcome: TokenOutcome) -> None:
        """The stall per demand read (over every token, and over those decoded off), and the
        tokens at each depth."""
        if outcome.misses:
            per = outcome.stall_s / outcome.misses
            self.stall_per_miss_s = _average(self.stall_per_miss_s, per)
            if self.depth == 0:
                self.off_stall_per_miss_s = _average(self.off_stall_per_miss_s, per)
        self.stats.tokens_at[self.depth] = self.stats.tokens_at.get(self.depth, 0) + 1

    def _off_step(self) -> int:
        """A token decoded off: probe depth 1 once off long enough."""
        self._off_for += 1
        if self.max_depth > 0 and self._off_for >= self._backoff:
            self.depth, self._off_for = 1, 0
            self.stats.probes += 1
            self._probing = True
            self._net.clear()  # what deeper depths did before going off is stale now
            self._start_window()
        return self.depth

    def _account(self, saved: float, cost: float) -> int:
        """A token decoded at depth > 0 that saved and cost this (seconds): decide at the
        window's end, or earlier on a clear loss."""
        self._saved += saved
        self._cost += cost
        self._tokens += 1
        if self._tokens >= self.window or (self.clear_loss is not None and self._tokens >= self.min_window
                                           and self._cost > self.clear_loss * self._saved):
            self._decide()
        return self.depth

    def _start_window(self) -> None:
        self._saved = self._cost = 0.0
        self._tokens = 0

    def _decide(self) -> None:
        d = self.depth
        net = (self._saved - self._cost) / self._tokens
        self._net[d] = net
        if net < 0:
            self.depth = d - 1
            self.stats.downs += 1
            if self.depth == 0:
                self._off_for = 0
                self._backoff = min(2 * self._backoff, self.max_probe_tokens) if self._probing else self.probe_tokens
            self._probing = False
            self._start_window()
            return
        self._probing = False
        if d < self.max_depth and self._net.get(d + 1, float("inf")) > net:
            self.depth = d + 1
            self.stats.ups += 1
        self._start_window()


def _average(mean: Optional[float], sample: float) -> float:
    """A running average weighing the newest sample 0.2."""
    return sample if mean is None else 0.8 * mean + 0.2 * sample
