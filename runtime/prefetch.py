"""Speculative prefetch: turn a predictor's guesses into prefetch requests, and keep score.

Owns, for the decode engine: asking the predictor at each MoE layer, the selection step
(threshold, caps), which guesses become requests to the I/O scheduler, the per-layer recall
that switches prefetching off for a layer that predicts poorly (and back on), and the
useful / wasted accounting, and the life of every prefetch request: which reads to issue,
which to cancel when a layer's true routing (or a nearer layer's guess) makes them stale,
which arrivals to install and what an install must not evict. The engine speaks to it through
one contract (``begin``, ``propose``, ``arrivals_for``, ``step``, ``report``) and touches none
of its state. It never touches slots or files: the engine installs what the scheduler delivers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from golem.predictors.base import Predictor, Proposal, Selection
from golem.runtime.governor import Governor, TokenOutcome
from golem.runtime.options import AUTO_DEPTH, PrefetchConfig  # noqa: F401  (the structured form of the prefetch options)


@dataclass
class PrefetchLayerStats:
    """Prefetch counters of one target layer.

    ``predicted_true`` / ``true`` is the recall of the guesses made for this layer;
    ``issued`` requests went to the scheduler; ``useful`` prefetched experts were used
    before eviction, ``wasted`` were evicted or dropped unused.
    """

    true: int = 0
    predicted_true: int = 0
    issued: int = 0
    useful: int = 0
    wasted: int = 0
    late: int = 0
    useful_nbytes: int = 0
    wasted_nbytes: int = 0
    enabled: bool = True
    recall_ema: float = 1.0
    switched_off: int = 0

    @property
    def recall(self) -> float:
        return self.predicted_true / self.true if self.true else 0.0


@dataclass
class PrefetchOrders:
    """The prefetcher's orders to the engine at one MoE layer, after its host sync.

    Args:
        installs: prefetches read and not yet installed, ``(layer, expert, buffer)``; the
            engine owns each buffer until it hands it back to the scheduler.
        keep: ``keep(layer)`` -> experts an install into ``layer`` must not evict.
        issue: ``issue(resident)`` scores the guesses made for this layer, cancels the reads
            its routing made stale and submits the new ones; the engine calls it once, after
            queueing its demand reads and launching what it can compute
            (``resident(model_layer) -> bool (E,)`` marks experts needing no read). None at
            a prefill call.
    """

    installs: List[Tuple[int, int, np.ndarray]]
    keep: Callable[[int], Set[int]]
    issue: Optional[Callable[[Callable[[int], np.ndarray]], None]] = None


# What the engine reports at the end of a layer (``Prefetcher.report``): ``(kind, layer,
# expert, nbytes)`` in the order it happened (for USED, ``expert`` is the list of experts used).
INSTALLED, NOT_NEEDED, NO_SLOT, EVICTED, LATE, USED = "installed", "not_needed", "no_slot", "evicted", "late", "used"


class Prefetcher:
    """The predictor-to-scheduler half of the decode engine.

    The contract with the engine (engine thread only): ``begin(decoding, outcome)`` at
    every forward call (``outcome``: the last decode step's stall and prefetch host time,
    for the governor); per MoE layer ``propose`` before the layer's host sync (lazy arrays,
    evaluated in that sync), ``arrivals_for`` before a decode layer's early launch (what
    has landed for it), then ``step`` (the true routing in, one ``PrefetchOrders`` out),
    then ``report`` once, with everything that happened to prefetched experts and slots in
    that layer. The other public methods are its parts, for tests and tools.

    Args:
        predictor: any ``golem.predictors`` predictor.
        config: depth, threshold, caps and the recall switch.
        moe_layers: model layer numbers of the MoE layers, in order (the predictor's
            layer axis is the position in this list).
        top_k: experts per token.
        expert_nbytes: bytes of one expert (per MoE layer position).
        wanted: per MoE position, whether that layer's experts can be missing at all (a
            fully resident layer needs no prefetch).
    """

    def __init__(self, predictor: Predictor, config: PrefetchConfig, moe_layers: Sequence[int], top_k: int,
                 expert_nbytes: Sequence[int], wanted: Sequence[bool]):
        self.predictor = predictor
        self.config = config
        self.moe_layers = list(moe_layers)
        self.position = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.top_k = top_k
        self.expert_nbytes = list(expert_nbytes)
        self.wanted = list(wanted)
        cap = config.max_experts_per_layer or top_k
        self.selection = Selection(threshold=config.threshold, max_experts=cap * max(config.depth, 1))
        self.stats: Dict[int, PrefetchLayerStats] = {l: PrefetchLayerStats() for l in self.moe_layers}
        self._predicted: Dict[int, Set[int]] = {}  # position -> experts guessed for this token
        self._predicted_next: Dict[int, Set[int]] = {}  # the same, for the next token
        self.in_flight: Dict[Tuple[int, int], int] = {}  # (model layer, expert) -> position that last asked
        self.unused: Set[Tuple[int, int]] = set()  # prefetched, installed, not yet used
        self.scheduler = None
        self.wrap = True  # guess the next step's first layers at the last ones (off on a pipeline rank
        # whose first layers follow another rank's: ``propose_boundary`` guesses them)
        self.governor = Governor(config.depth) if config.governor and config.depth > 0 else None
        self.depth = config.depth  # this step's depth (the governor's choice)
        self._useful = self._wasted = 0  # running totals, for the governor's per-token deltas
        self._seen = (0, 0)
        self._prefilling = False  # a prompt arrives in one or more multi-token calls
        self._landed: List[Tuple[int, int, np.ndarray]] = []  # polled by ``arrivals_for``, for ``step``

    # -- the engine's contract ------------------------------------------------------------
    def begin(self, decoding: bool, outcome: Optional[TokenOutcome] = None) -> None:
        """A forward call starts: a decode step, or a prompt chunk (the first of a prompt
        starts a new sequence; later chunks continue it)."""
        if decoding:
            self.begin_step(outcome)
        elif not self._prefilling:
            self.begin_sequence()
        self._prefilling = not decoding

    def step(self, layer: int, ids: np.ndarray, scores: Optional[np.ndarray], proposals: Sequence[Proposal],
             decoding: bool) -> PrefetchOrders:
        """``layer``'s true routing ``ids`` (and router ``scores`` when known) after its host
        sync: what to install, and (decoding) what to issue. Scoring the guesses made for
        the layer waits for ``issue`` too: the engine calls it once the layer's computation
        is under way, and the layers it proposes for are other layers. A decode step held at
        depth 0 with nothing out has no issue: its routing is observed here, and that is all."""
        if decoding and self.depth == 0 and not self.in_flight:  # (nothing out: nothing landed)
            self.observe(layer, ids, scores)
            return PrefetchOrders([], self.keep)

        def issue(resident):
            self.observe(layer, ids, scores)
            self.issue(layer, ids, proposals, resident)

        installs, self._landed = self._landed + self.arrivals(), []
        return PrefetchOrders(installs, self.keep, issue if decoding else None)

    def arrivals_for(self, layer: int) -> PrefetchOrders:
        """Before ``layer``'s launch in a decode step: orders to install the prefetches read
        for ``layer`` itself, so that it is launched with them resident (no ``issue``). The
        scheduler is polled here and again in ``step`` (a read landing during the sync is then
        installed before the layer admits its experts, not taken over by a demand read); what
        arrived for other layers is in the orders ``step`` returns (installed after the sync,
        when nothing of this step still reads their pools)."""
        got = self.arrivals()
        self._landed += [a for a in got if a[0] != layer]
        return PrefetchOrders([a for a in got if a[0] == layer], self.keep)

    def report(self, events) -> Dict[int, int]:
        """What happened in the layer, ``[(kind, layer, expert, nbytes), ...]`` in order;
        returns, per layer, how many used experts came from prefetches."""
        used: Dict[int, int] = {}
        for kind, layer, expert, nbytes in events:
            if kind == USED:  # expert: the list of the layer's experts used
                n = self.used_all(layer, expert, nbytes)
                if n:
                    used[layer] = used.get(layer, 0) + n
            elif kind == EVICTED:
                self.evicted(layer, expert, nbytes)
            elif kind == INSTALLED:
                self.landed(layer, expert)
            elif kind == LATE:
                self.late(layer, expert)
            elif kind == NOT_NEEDED:
                self.not_needed(layer, expert)
            elif kind == NO_SLOT:
                self.dropped(layer, expert, nbytes)
            else:
                raise ValueError(f"unknown prefetch event {kind!r}")
        return used

    # -- its parts ---------------------------------------------------------------------------
    def attach(self, scheduler) -> None:
        """The I/O scheduler (``golem.io.scheduler.IOScheduler``) prefetches go through."""
        self.scheduler = scheduler

    def begin_sequence(self) -> None:
        self.predictor.begin_sequence()

    def begin_step(self, outcome: Optional[TokenOutcome] = None) -> None:
        """A decode step starts; ``outcome``: what the engine measured over the last one
        (the governor sets this step's depth from it)."""
        self._predicted, self._predicted_next = self._predicted_next, {}
        self.predictor.begin_step()
        if self.governor is not None and outcome is not None:
            useful, wasted = self._useful - self._seen[0], self._wasted - self._seen[1]
            self._seen = (self._useful, self._wasted)
            self.depth = self.governor.step(outcome, useful, wasted)

    def propose(self, layer: int, hidden) -> List[Proposal]:
        """The predictor's lazy proposals at ``layer``: for the layers ahead in this step and,
        when the depth runs past the last layer and the predictor can say, for the next
        step's first layers. Empty when nothing ahead needs a prefetch."""
        if self.depth == 0:
            return []
        pos, depth, n = self.position[layer], self.depth, len(self.moe_layers)
        out = []
        if any(self.wanted[p] for p in range(pos + 1, min(pos + depth, n - 1) + 1)):
            out.append(self.predictor.propose(pos, depth, hidden))
        if self.wrap and pos + depth >= n and any(self.wanted[p] for p in range(0, min(pos + depth - n + 1, n))):
            nxt = self.predictor.propose_next(pos, depth, hidden)
            if nxt is not None:
                out.append(nxt)
        return out

    def observe(self, layer: int, ids: np.ndarray, scores: Optional[np.ndarray]) -> None:
        """Layer ``layer``'s true routing for this token: score the guesses made for it."""
        pos = self.position[layer]
        self.predictor.observe(pos, ids, scores)
        guessed = self._predicted.get(pos)
        if guessed is None:
            return
        true = set(ids.reshape(-1).tolist())
        true.discard(-1)
        s = self.stats[layer]
        hit = len(true & guessed)
        s.true += len(true)
        s.predicted_true += hit
        recall = hit / len(true) if true else 1.0
        c = self.config
        s.recall_ema = c.recall_decay * s.recall_ema + (1 - c.recall_decay) * recall
        if s.enabled and s.recall_ema < c.recall_off:
            s.enabled = False
            s.switched_off += 1
        elif not s.enabled and s.recall_ema > c.recall_on:
            s.enabled = True

    def candidates(self, proposal: Proposal, resident) -> List[Tuple[int, int, float]]:
        """``(model layer, expert, score)`` to request, nearest layers and best scores first.

        ``resident(model_layer) -> bool (E,)`` marks experts that need no read. Targets past
        the last layer are the next step's first layers. Layers prefetch is not wanted for,
        or switched off in, are left out before the selection's caps count
        (``Selection.above``, then its caps).
        """
        scores = self.predictor.scores(proposal)
        n, selection, layers = len(self.moe_layers), self.selection, self.moe_layers
        targets = list(proposal.targets)
        above, limit = selection.above(scores), selection.limit
        guessed = [(self._predicted if t < n else self._predicted_next).setdefault(t % n, set()) for t in targets]
        for r, _, e in above[:limit]:
            guessed[r].add(e)
        open_rows = []  # per row: the target layer's resident mask, or None where nothing is read
        for t in targets:
            pos = t % n
            wanted = self.wanted[pos] and self.stats[layers[pos]].enabled
            open_rows.append(resident(layers[pos]) if wanted else None)
        picked = [(r, e, -negative) for r, negative, e in above
                  if open_rows[r] is not None and not open_rows[r][e]][:limit]
        return [(layers[targets[r] % n], e, score) for r, e, score in picked]

    # -- requests, asked for by the engine at a layer's sync point ------------------------
    def issue(self, layer: int, ids: np.ndarray, proposals: Sequence[Proposal],
              resident: Callable[[int], np.ndarray]) -> None:
        """After ``layer``'s host sync: cancel what its routing ``ids`` made stale, request the rest.

        Prefetches for ``layer`` that it uses and that are still out are late (the engine,
        which calls this once the layer's demand reads are queued, demanded them); those it
        does not use are cancelled (those still queued first, which lost no read); a nearer
        layer's guess supersedes a farther one's (queued reads it no longer names are
        dropped); then the candidates of ``proposals`` not yet
        ``resident(model_layer) -> bool (E,)`` are submitted, nearest layers and best scores
        first. Each of these is one call to the scheduler for all its keys (``cancel_many``,
        ``pending_many``, ``submit_many``), the stale cancels two when some are being read.
        """
        sched, here = self.scheduler, self.position[layer]
        used = set(ids.reshape(-1).tolist())
        mine = [k for k in self.in_flight if k[0] == layer]
        stale = [k for k in mine if k[1] not in used]
        for key in mine:
            if key[1] in used:  # not resident at the layer's admission: a demand read took it over
                self.late(*key)
        left = []  # stale ones being read: still in flight, or done with?
        queued = sched.cancel_many(stale, queued_only=True)  # never read: no bytes lost
        running = [key for key, cancelled in zip(stale, queued) if not cancelled]
        for key, cancelled in zip(stale, queued):
            if cancelled:
                self.dropped(key[0], key[1], 0)
        for key, cancelled in zip(running, sched.cancel_many(running)):
            if cancelled:
                self.dropped(key[0], key[1], self.expert_nbytes[here])
            else:
                left.append(key)
        for key, state in zip(left, sched.pending_many(left)):
            if state is None:
                self.in_flight.pop(key, None)
        n = len(self.moe_layers)
        requests = []  # submitted together: one hand-off to the scheduler per layer
        for proposal in proposals:
            wanted = self.candidates(proposal, resident)
            keep = {(l, e) for l, e, _ in wanted}
            targets = {self.moe_layers[t % n] for t in proposal.targets}
            superseded = [k for k, at in self.in_flight.items() if k[0] in targets and k not in keep and at != here]
            for key, cancelled in zip(superseded, sched.cancel_many(superseded, queued_only=True)):
                if cancelled:
                    self.dropped(key[0], key[1], 0)
            position = self.position
            for l, e, score in wanted:
                requests.append(((l, e), (position[l] - here) % n or n, score))  # MoE layers ahead, wrapping
                self.issued(l, e, here)  # now: a later proposal's cancels spare it
        if requests:
            sched.submit_many(requests, futures=False)  # taken from ``poll``: no future each

    def propose_boundary(self, hidden) -> List[Proposal]:
        """Guesses for this step's first ``depth`` MoE layers from ``hidden``, the residual at
        the previous pipeline rank's last MoE layer (lazy, like ``propose``): targets from
        position 0, their offsets counted from 0 (their own calibration row)."""
        depth = self.config.depth
        if depth == 0 or not any(self.wanted[:depth]):
            return []
        return [self.predictor.propose(0, depth - 1, hidden, nearest=0)]

    def issue_boundary(self, proposals: Sequence[Proposal], resident: Callable[[int], np.ndarray]) -> None:
        """Request the candidates of ``propose_boundary``'s proposals (evaluated), nearest first."""
        for proposal in proposals:
            for l, e, score in self.candidates(proposal, resident):
                self.scheduler.submit((l, e), depth=self.position[l] + 1, score=score)
                self.issued(l, e, -1)

    def arrivals(self) -> List[Tuple[int, int, np.ndarray]]:
        """Prefetches read and not yet installed, as ``(layer, expert, buffer)``.

        The caller owns each buffer until it hands it back to the scheduler (``release``),
        and reports each with ``landed``, ``not_needed`` or ``dropped``. With no prefetch
        out (``in_flight``: what is read and not yet installed stays there) nothing can
        arrive: no poll, which would take the scheduler's lock at every decode layer while
        the governor keeps prefetch off.
        """
        if not self.in_flight:
            return []
        return [(key[0], key[1], buf) for key, buf in self.scheduler.poll(0)]

    def keep(self, layer: int) -> Set[int]:
        """Experts of ``layer`` guessed for this step: installing a prefetch must not evict them."""
        return self._predicted.get(self.position[layer], set())

    # -- accounting, reported by the engine ------------------------------------------------
    def issued(self, layer: int, expert: int, at: int) -> None:
        """A prefetch of ``(layer, expert)`` was requested at MoE position ``at``."""
        if (layer, expert) not in self.in_flight:
            self.stats[layer].issued += 1
        self.in_flight[(layer, expert)] = at

    def landed(self, layer: int, expert: int) -> None:
        self.in_flight.pop((layer, expert), None)
        self.unused.add((layer, expert))

    def late(self, layer: int, expert: int) -> None:
        """A demand read took over ``(layer, expert)``; count it if a prefetch had asked for it."""
        if self.in_flight.pop((layer, expert), None) is not None:
            self.stats[layer].late += 1

    def not_needed(self, layer: int, expert: int) -> None:
        """A prefetch arrived for an expert already resident (a demand read was faster)."""
        self.in_flight.pop((layer, expert), None)

    def evicted(self, layer: int, expert: int, nbytes: int) -> None:
        """``(layer, expert)`` left its slot; a prefetch of it never used is wasted."""
        if (layer, expert) in self.unused:
            self.dropped(layer, expert, nbytes)

    def dropped(self, layer: int, expert: int, nbytes: int) -> None:
        """A prefetch cancelled, failed, or evicted before its first use; ``nbytes`` of it
        were read (0: cancelled while queued). The governor weighs only those read: a read
        and a slot given to nothing (one cancelled in the queue cost host time, counted
        apart)."""
        self.in_flight.pop((layer, expert), None)
        self.unused.discard((layer, expert))
        s = self.stats[layer]
        s.wasted += 1
        s.wasted_nbytes += nbytes
        self._wasted += nbytes > 0

    def used_all(self, layer: int, experts: Sequence[int], nbytes: int) -> int:
        """``experts`` of ``layer`` (resident) are used; how many came from prefetches not used
        before (useful)."""
        if not self.unused:
            return 0
        hits = self.unused.intersection([(layer, e) for e in experts])
        if hits:
            self.unused -= hits
            s = self.stats[layer]
            s.useful += len(hits)
            s.useful_nbytes += len(hits) * nbytes
            self._useful += len(hits)
        return len(hits)

    def totals(self) -> PrefetchLayerStats:
        t = PrefetchLayerStats()
        for s in self.stats.values():
            t.true += s.true
            t.predicted_true += s.predicted_true
            t.issued += s.issued
            t.useful += s.useful
            t.wasted += s.wasted
            t.late += s.late
            t.useful_nbytes += s.useful_nbytes
            t.wasted_nbytes += s.wasted_nbytes
            t.switched_off += s.switched_off
        return t
