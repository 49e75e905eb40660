"""The prefetch governor: how deep speculation may go for the next tokens, from what it paid.

Owns one decision: the prefetch depth of each decode step, between 0 (off) and the most the
user allowed. It compares, over windows of tokens, the time of a decode step at a depth with
the time of one decoded off, measured a few tokens before (where steps are not timed, it
weighs a model instead: the stall avoided against the host time and the wasted reads that
speculation cost). A depth that loses steps down, down to off; while off it probes depth 1
now and then, less often after each probe that lost. Knows nothing of slots, files or
predictors: the prefetcher feeds it numbers once per token.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional


# A reference stays valid up to this many times ``reference_every`` tokens: once per
# ``STRETCH_PER_GAIN`` (a share of the step's time) that the last window gained over it.
REFERENCE_STRETCH = 8
STRETCH_PER_GAIN = 0.1
# Speculation saves at most what steps decoded off wait on reads: while that is under this share
# of their time (a page cache holding the experts, whose misses are copies), it stays off.
MIN_STALL_SHARE = 0.1


@dataclass(frozen=True)
class TokenOutcome:
    """What the engine measured over one decode step (seconds are wall time).

    Args:
        stall_s: waiting on demand reads.
        misses: demand reads.
        prefetch_host_s: host time spent on prefetch (predictor proposals and observation,
            issuing and cancelling reads, installing arrivals).
        span_s: the whole step, from its first MoE layer's call to its last one's end (0:
            not measured).
    """

    stall_s: float = 0.0
    misses: int = 0
    prefetch_host_s: float = 0.0
    span_s: float = 0.0


@dataclass
class GovernorStats:
    """What the governor saw and did: tokens per depth, steps down and up, probes, references."""

    tokens_at: Dict[int, int] = field(default_factory=dict)
    downs: int = 0
    ups: int = 0
    probes: int = 0
    references: int = 0
    holds: int = 0

    def describe(self) -> str:
        """One line: decode steps per depth, and the governor's moves."""
        at = ", ".join(f"{d}: {n}" for d, n in sorted(self.tokens_at.items()))
        held = f", held off {_count(self.holds, 'time')} (little stall to save)" if self.holds else ""
        return (f"steps at each depth {{{at}}}, {_count(self.downs, 'step')} down, {self.ups} up, "
                f"{_count(self.probes, 'probe')}, {_count(self.references, 'reference')} (steps off, timed){held}")


class Governor:
    """Chooses the prefetch depth per token from measured savings and costs.

    Two measures judge a window of ``window`` tokens at depth d > 0:

    - Where the engine times its steps (``TokenOutcome.span_s``), the steps' time alone:
      the window's median against the median over recent tokens decoded off (the reference).
      That holds every cost of speculation, the predictor's work inside the host syncs and
      the slot writes of prefetches too. A timed step at depth > 0 with no valid reference
      starts ``reference_tokens`` tokens off that take one, then a window at its depth
      again. A reference stays valid for ``reference_every`` tokens at depth > 0, longer
      (up to ``REFERENCE_STRETCH`` times) the more the last window gained over it: a
      reference costs what speculation saves on its tokens, and a large gain does not turn
      into a loss as the machine or the context drift. The first step after a change of
      depth is not timed: the reads the last depth started still land in it.
    - Otherwise a model: saved = (demand reads + useful prefetches) x the stall per demand
      read with prefetch off, less the window's stall (the stall avoided); cost = prefetch
      host time + wasted prefetches x ``waste_weight`` x that stall per read. The stall per
      read with prefetch off is a running average over the tokens decoded off (until there
      is one, over every token).

    A window that lost steps one layer shallower (at 0 prefetch is off), and so does a
    window cut short after ``min_window`` tokens that lost clearly: steps slower than the
    reference by over ``clear_slowdown``, or a modelled cost over ``clear_loss`` times what
    it saved. A window that paid steps one deeper, below ``max_depth``, while the deeper
    depth has not been judged since the last probe (or did better), and one shallower where
    the shallower depth did better. Off, it probes depth 1 after ``probe_tokens`` tokens,
    doubled after each probe that lost, up to ``max_probe_tokens``. Where steps are timed it
    leaves off (after a reference, or to probe) only while the steps decoded off wait on reads
    for at least ``min_stall_share`` of their time: speculation can save no more than that.

    Args:
        max_depth: the deepest it may go (the user's depth).
        window: tokens per decision.
        probe_tokens: tokens off before the first probe.
        max_probe_tokens: longest wait between probes.
        waste_weight: a wasted prefetch's cost in demand stalls (small: speculative reads
            start only on an idle reader, under a cap, and the demand reads they delay show
            up in the measured stall per miss already).
        start_depth: where it starts (default 1: the cheapest speculation to lose on, and
            deeper only once it pays; None: ``max_depth``).
        min_window: tokens before a clear loss may end a window early.
        clear_loss: modelled cost over saved that ends a window early (None: never early).
        clear_slowdown: steps slower than the reference by this share end a window early.
        reference_tokens: tokens off per reference (the first not timed); 0: judge by the
            model only.
        reference_every: tokens at depth > 0 a reference stays valid (at least).
        min_stall_share: least share of a step off spent waiting on reads for speculation to
            be tried (timed steps only).
    """

    def __init__(self, max_depth: int, *, window: int = 8, probe_tokens: int = 16, max_probe_tokens: int = 512,
                 waste_weight: float = 0.25, start_depth: Optional[int] = 1, min_window: int = 2,
                 clear_loss: Optional[float] = 2.0, clear_slowdown: float = 0.15, reference_tokens: int = 4,
                 reference_every: int = 128, min_stall_share: float = MIN_STALL_SHARE):
        if max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {max_depth}")
        self.max_depth = max_depth
        self.window = window
        self.probe_tokens = probe_tokens
        self.max_probe_tokens = max_probe_tokens
        self.waste_weight = waste_weight
        self.min_window = min_window
        self.clear_loss = clear_loss
        self.clear_slowdown = clear_slowdown
        self.reference_tokens = reference_tokens
        self.reference_every = reference_every
        self.min_stall_share = min_stall_share
        self.depth = max_depth if start_depth is None else min(start_depth, max_depth)
        self.stats = GovernorStats()
        self.stall_per_miss_s: Optional[float] = None  # running average, every token
        self.off_stall_per_miss_s: Optional[float] = None  # running average, tokens decoded at depth 0
        self._net: Dict[int, float] = {}  # net seconds saved per token, last window at each depth (since off)
        self._saved = self._cost = 0.0
        self._tokens = 0
        self._spans: List[float] = []  # this window's timed steps (seconds)
        self._off_spans: Deque[float] = deque(maxlen=2 * window)  # the reference: recent steps off, timed
        self._off_stalls: Deque[float] = deque(maxlen=2 * window)  # their waits on reads
        self._off_age = 0  # tokens since the last timed step off
        self._valid_for = reference_every  # tokens the reference stays valid
        self._timed = False  # the engine times its steps
        self._settling = False  # the first token after a change of depth
        self._back_to: Optional[int] = None  # in a reference: the depth it returns to
        self._off_for = 0
        self._backoff = probe_tokens
        self._probing = False  # at depth 1 on a probe that has not paid yet

    def step(self, outcome: TokenOutcome, useful: int, wasted: int) -> int:
        """One decoded token's outcome (``useful`` / ``wasted``: prefetches that turned out
        used or wasted during it); returns the depth for the next token."""
        self._measure(outcome)
        span = 0.0 if self._settling else outcome.span_s
        self._settling = False
        if self.depth == 0:
            if span > 0:
                self._off_spans.append(span)
                self._off_stalls.append(outcome.stall_s)
                self._off_age = 0
            return self._off_step()
        self._off_age += 1
        if span > 0 and self.reference_tokens > 0:
            self._timed = True
            if self._reference() is None:
                self._take_reference()
                return self.depth
            self._spans.append(span)
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

    def _set(self, depth: int) -> None:
        self._settling = self._settling or depth != self.depth
        self.depth = depth

    def _off_step(self) -> int:
        """A token decoded off: the end of a reference, or a probe of depth 1 once off long
        enough."""
        self._off_for += 1
        if self._back_to is not None:
            if self._off_for >= self.reference_tokens:
                if self._little_to_save():
                    self._off_for, self._backoff = 0, self.probe_tokens
                else:
                    self._set(self._back_to)
                    self._start_window()
                self._back_to = None
        elif self.max_depth > 0 and self._off_for >= self._backoff:
            if self._little_to_save():
                self._off_for = 0  # look again after as many steps
                return self.depth
            self._set(1)
            self._off_for = 0
            self.stats.probes += 1
            self._probing = True
            self._net.clear()  # what deeper depths did before going off is stale now
            self._start_window()
        return self.depth

    def _little_to_save(self) -> bool:
        """The recent timed steps off waited on reads for less than ``min_stall_share`` of
        their time (counted in ``stats.holds``); False where none was timed."""
        if not self._off_spans or _median(self._off_stalls) >= self.min_stall_share * _median(self._off_spans):
            return False
        self.stats.holds += 1
        return True

    def _take_reference(self) -> None:
        """Decode the next ``reference_tokens`` tokens off, then come back to this depth."""
        self._back_to, self._off_for = self.depth, 0
        self._off_spans.clear()
        self._off_stalls.clear()
        self.stats.references += 1
        self._set(0)
        self._start_window()

    def _reference(self) -> Optional[float]:
        """Median seconds of the recent steps decoded off (None: none, or too old)."""
        if not self._off_spans or self._off_age > self._valid_for:
            return None
        return _median(self._off_spans)

    def _account(self, saved: float, cost: float) -> int:
        """A token decoded at depth > 0 that saved and cost this (seconds): decide at the
        window's end, or earlier on a clear loss."""
        self._saved += saved
        self._cost += cost
        self._tokens += 1
        if self._tokens >= self.window or self._clear_loss():
            self._decide()
        return self.depth

    def _clear_loss(self) -> bool:
        ref = self._reference()
        if self._timed and ref is not None:
            return len(self._spans) >= self.min_window and _median(self._spans) > (1 + self.clear_slowdown) * ref
        return (self.clear_loss is not None and self._tokens >= self.min_window
                and self._cost > self.clear_loss * self._saved)

    def _start_window(self) -> None:
        self._saved = self._cost = 0.0
        self._tokens = 0
        self._spans = []

    def _decide(self) -> None:
        d, ref = self.depth, self._reference()
        if self._timed and self._spans and ref is not None:
            span = _median(self._spans)
            net = ref - span
            gain = net / span / STRETCH_PER_GAIN
            self._valid_for = int(self.reference_every * min(max(gain, 1.0), REFERENCE_STRETCH))
        else:
            net = (self._saved - self._cost) / self._tokens
        self._net[d] = net
        if net < 0:
            self._set(d - 1)
            self.stats.downs += 1
            if self.depth == 0:
                self._off_for = 0
                self._backoff = min(2 * self._backoff, self.max_probe_tokens) if self._probing else self.probe_tokens
            self._probing = False
            self._start_window()
            return
        self._probing = False
        if d < self.max_depth and self._net.get(d + 1, float("inf")) > net:
            self._set(d + 1)
            self.stats.ups += 1
        elif d > 1 and self._net.get(d - 1, float("-inf")) > net:
            self._set(d - 1)
            self.stats.downs += 1
        self._start_window()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _median(values) -> float:
    """The median: a step that waited on the machine (or a burst of reads) moves it little."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _average(mean: Optional[float], sample: float) -> float:
    """A running average weighing the newest sample 0.2."""
    return sample if mean is None else 0.8 * mean + 0.2 * sample
