"""Prefetching never changes the output: every family, depths 0..3, thresholds 0.1..0.9,
the oracle, a noisy oracle and deliberately wrong predictors; mlx-lm's loops drive it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from golem.runtime import load
from golem.runtime.prefetch import PrefetchConfig
from golem.runtime.synthetic import FAMILIES
from helpers import greedy_tokens, prompt_tokens, stock

N = 16


@pytest.fixture(scope="module")
def reference(checkpoints):
    cache = {}

    def get(family):
        if family not in cache:
            model, tok = stock(checkpoints(family))
            tokens = prompt_tokens(tok)
            expected = greedy_tokens(model, tokens, N)
            with load(str(checkpoints(family)), cache_sizes=4, record=True) as (m, _):
                assert greedy_tokens(m, tokens, N) == expected
                truth = m.golem.engine.trace.trace().decode_only()
            cache[family] = (tokens, expected, truth)
        return cache[family]

    return get


def run(path, tokens, depth, threshold, predictor="lookahead", governor=True, **options):
    with load(str(path), cache_sizes=4, prefetch=PrefetchConfig(depth=depth, threshold=threshold, governor=governor),
              predictor=predictor, predictor_options=options) as (model, _):
        out = greedy_tokens(model, tokens, N)
        engine = model.golem.engine
        return out, engine


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_lookahead_identical_for_every_family_and_depth(checkpoints, reference, family, depth):
    tokens, expected, _ = reference(family)
    out, engine = run(checkpoints(family), tokens, depth, 0.3)
    assert out == expected
    assert engine.prefetcher.totals().issued > 0  # it really prefetched


@pytest.mark.parametrize("predictor, options", [
    ("lookahead", {"hidden_kind": "layer_input"}),
    ("transition", {}),
])
def test_layer_input_lookahead_and_trained_transition(checkpoints, reference, predictor, options):
    tokens, expected, truth = reference("glm4_moe")
    cfg = PrefetchConfig(depth=2, threshold=0.1)
    with load(str(checkpoints("glm4_moe")), cache_sizes=4, prefetch=cfg, predictor=predictor,
              predictor_options=options, predictor_train=[truth] if predictor == "transition" else ()) as (model, _):
        assert greedy_tokens(model, tokens, N) == expected
        assert model.golem.engine.prefetcher.totals().true > 0


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("predictor", ["lookahead", "oracle", "noisy-oracle", "random", "previous+transition"])
def test_depths_thresholds_predictors_identical(checkpoints, reference, depth, threshold, predictor):
    family = "qwen3_next"  # four MoE layers of hybrid attention: the deepest tiny model
    tokens, expected, truth = reference(family)
    options = {"truth": truth, "recall": 0.6, "false_positive_rate": 0.2} if "oracle" in predictor else {}
    out, engine = run(checkpoints(family), tokens, depth, threshold, predictor, **options)
    assert out == expected


def test_oracle_prefetch_turns_misses_into_prefetch_hits(checkpoints, reference):
    tokens, expected, truth = reference("olmoe")
    _, base = run(checkpoints("olmoe"), tokens, 0, 0.3)
    # a fixed depth: the governor, which may switch off a prefetch that costs more host time
    # than its reads (on a loaded machine, before the first prefetch lands), is tested apart
    out, engine = run(checkpoints("olmoe"), tokens, 1, 0.5, "oracle", governor=False, truth=truth)
    assert out == expected
    p = engine.prefetcher.totals()
    assert p.recall == 1.0 and p.wasted == 0
    assert engine.stats.total().misses < base.stats.total().misses
    assert engine.stats.total().prefetch_hits == p.useful > 0
    assert p.useful + p.late + p.wasted <= p.issued  # each prefetch ends once: one used is not late too


def test_wrong_predictor_is_switched_off_per_layer(checkpoints, reference):
    """A predictor that is always wrong loses its prefetch rights layer by layer."""
    from golem.predictors.oracle import RandomGuess

    tokens, expected, truth = reference("mixtral")
    # the governor off: it would turn a losing depth off as a whole before recall does, per layer
    cfg = PrefetchConfig(depth=1, threshold=0.0, recall_off=0.5, recall_on=0.9, recall_decay=0.5, governor=False)
    with load(str(checkpoints("mixtral")), cache_sizes=4, prefetch=cfg, predictor="random") as (model, _):
        pf = model.golem.engine.prefetcher

        class AlwaysWrong(RandomGuess):
            def predict(self, position, targets):
                # an expert the current token does not use at the target layer
                out = self.zeros(targets)
                for r, t in enumerate(targets):
                    used = set(truth.experts[self.step, t].tolist())
                    out[r, min(set(range(self.shape.num_experts)) - used)] = 1.0
                return out

        pf.predictor = AlwaysWrong(pf.predictor.shape)
        assert greedy_tokens(model, tokens, N) == expected
        stats = [pf.stats[l] for l in pf.moe_layers[1:]]
    assert all(s.switched_off >= 1 and not s.enabled for s in stats)
    assert all(s.issued < N for s in stats)  # it stopped asking


def test_stream_generate_on_the_runtime(checkpoints, reference):
    """`golem.runtime.load` gives what mlx_lm.stream_generate drives unchanged, prefetch included."""
    from mlx_lm import stream_generate

    tokens, expected, _ = reference("gpt_oss")
    loaded = load(str(checkpoints("gpt_oss")), cache_sizes=4, prefetch=PrefetchConfig(depth=2, threshold=0.3))
    with loaded as (model, tokenizer):
        got = [r.token for r in stream_generate(model, tokenizer, tokens, max_tokens=N,
                                                 sampler=lambda x: mx.argmax(x, axis=-1))]
        scheduler = model.golem.engine.scheduler
    assert got == expected
    assert all(not t.is_alive() for t in scheduler.threads)  # close() joined the I/O threads


def test_every_expert_resident_needs_no_engine_sync(checkpoints, reference):
    tokens, expected, _ = reference("qwen3_moe")
    with load(str(checkpoints("qwen3_moe"))) as (model, _):
        assert greedy_tokens(model, tokens, N) == expected
        stats = model.golem.engine.stats
    assert stats.host_syncs == 0 and stats.decode_steps >= N  # (mlx-lm builds one step ahead)


def test_partial_cache_needs_one_sync_per_moe_layer(checkpoints, reference):
    tokens, expected, _ = reference("qwen3_moe")
    out, engine = run(checkpoints("qwen3_moe"), tokens, 2, 0.3)
    assert out == expected
    layers = len(engine.pools)
    assert engine.stats.decode_host_syncs == layers * engine.stats.decode_steps


def test_trace_out_records_the_routing(checkpoints, reference, tmp_path):
    from golem.runtime.cli.run import main as golem_run
    from golem.runtime.trace import load_trace

    out = tmp_path / "t.npz"
    path = str(checkpoints("olmoe"))
    assert golem_run(["--model", path, "-c", "4", "-m", "8", "--temp", "0", "--trace-out", str(out),
                      "--trace-hidden", "--verbose", "false"]) == 0
    t = load_trace(out)
    assert t.prefill is not None and t.prefill.sum() > 1
    dec = t.decode_only()
    assert dec.num_steps in (8, 9) and dec.experts.shape[1:] == (t.num_layers, 4)
    assert (dec.experts >= 0).all() and (dec.weights > 0).all()
    assert t.hidden is not None and t.hidden.shape[:2] == (t.num_steps, t.num_layers)


class _Guesses:
    """A predictor whose scores are set by the test: ``table[target] = {expert: score}``."""

    def __init__(self, num_layers, num_experts):
        from golem.predictors.base import Predictor, RoutingShape

        self.table = {}
        outer = self

        class Fixed(Predictor):
            def predict(self, position, targets):
                out = np.zeros((len(targets), num_experts), np.float32)
                for r, t in enumerate(targets):
                    for e, s in outer.table.get(t, {}).items():
                        out[r, e] = s
                return out

        self.predictor = Fixed(RoutingShape(num_layers, num_experts, 2))


class _FakeScheduler:
    """Records submits and cancels; ``state[key]`` is what ``pending`` answers."""

    def __init__(self):
        self.state, self.submits, self.cancels, self.published = {}, [], [], []

    def submit(self, key, depth=0, score=0.0):
        self.submits.append((key, depth))
        self.state.setdefault(key, "queued")

    def submit_many(self, requests, futures=True):
        for key, depth, score in requests:
            self.submit(key, depth, score)

    def cancel(self, key):
        if self.state.get(key) in ("queued", "running"):
            self.cancels.append(key)
            del self.state[key]
            return True
        return False

    def cancel_many(self, keys, queued_only=False):
        return [(not queued_only or self.state.get(key) == "queued") and self.cancel(key) for key in keys]

    def pending_many(self, keys):
        return [self.state.get(key) for key in keys]

    def poll(self, timeout=0):
        out, self.published = self.published, []
        return out


def _three_layers():
    """A prefetcher over model layers 10, 20, 30 (depth 2, threshold 0.3, top-2 of 8 experts,
    100 bytes each), its predictor's scores set by the test, a ``_FakeScheduler`` attached."""
    from golem.runtime.prefetch import Prefetcher

    guesses = _Guesses(3, 8)
    pf = Prefetcher(guesses.predictor, PrefetchConfig(depth=2, threshold=0.3), [10, 20, 30], 2,
                    [100, 100, 100], [True, True, True])
    sched = _FakeScheduler()
    pf.attach(sched)
    return guesses, pf, sched


def _nothing(layer):
    """No expert resident: every guess is a candidate."""
    return np.zeros(8, bool)


@pytest.mark.parametrize("cap", [None, 1, 3])
def test_candidates_are_the_selection_of_the_scores_less_the_resident_experts(cap):
    """``candidates`` selects as ``Selection.mask`` and ``Selection.ordered`` do: threshold,
    nearest rows first, higher scores, lower ids on ties, the caps counted after resident
    experts and unwanted layers are left out; every row's guesses (before those are left
    out, within the caps) are what installs must keep."""
    from golem.predictors.base import Selection
    from golem.runtime.prefetch import Prefetcher

    rng = np.random.default_rng(5)
    for trial in range(40):
        guesses = _Guesses(4, 8)
        pf = Prefetcher(guesses.predictor, PrefetchConfig(depth=3, threshold=0.3, max_experts_per_layer=cap),
                        [10, 20, 30, 40], 2, [100] * 4, [True, True, trial % 3 != 0, True])
        pf.attach(_FakeScheduler())
        pf.begin(True)
        values = np.round(rng.random((3, 8)), 1).astype(np.float32)  # ties on purpose
        guesses.table = {t: {e: float(values[t - 1, e]) for e in range(8)} for t in (1, 2, 3)}
        resident = {l: rng.random(8) < 0.3 for l in (10, 20, 30, 40)}
        got = pf.candidates(pf.propose(10, None)[0], resident.__getitem__)
        selection = Selection(threshold=0.3, max_experts=(cap or 2) * 3)
        exclude = np.stack([resident[l] if trial % 3 != 0 or l != 30 else np.ones(8, bool) for l in (20, 30, 40)])
        rows, experts = selection.ordered(values, selection.mask(values, exclude))
        want = [((20, 30, 40)[r], e, float(values[r, e])) for r, e in zip(rows.tolist(), experts.tolist())]
        assert got == want
        guessed = selection.mask(values, None)
        assert [pf.keep(l) for l in (20, 30, 40)] == [set(np.flatnonzero(guessed[r]).tolist()) for r in range(3)]


def test_a_layers_guesses_are_scored_when_its_issue_runs_not_at_its_step():
    """``step`` right after the sync only hands out orders; the recall of the guesses made
    for the layer is counted when the engine runs the issue, after its own launch."""
    guesses, pf, _ = _three_layers()
    pf.begin(True)
    guesses.table = {1: {3: 0.9, 4: 0.5}}
    pf.step(10, np.array([[1, 2]]), None, pf.propose(10, None), True).issue(_nothing)
    orders = pf.step(20, np.array([[3, 5]]), None, [], True)
    assert pf.stats[20].true == 0  # not scored yet
    orders.issue(_nothing)
    assert (pf.stats[20].true, pf.stats[20].predicted_true) == (2, 1)
    assert pf.step(30, np.array([[1, 2]]), None, [], False).issue is None  # a prompt chunk: nothing to issue


def test_prefetcher_owns_issue_cancel_supersede_and_accounting():
    """Model layers 10, 20, 30 (positions 0..2); depth 2; top-2 of 8 experts."""
    guesses, pf, sched = _three_layers()

    pf.begin_sequence()
    pf.begin_step()
    guesses.table = {1: {3: 0.9, 4: 0.5}, 2: {6: 0.8, 7: 0.1}}
    at10 = pf.propose(10, None)
    pf.observe(10, np.array([[1, 2]]), None)
    pf.issue(10, np.array([[1, 2]]), at10, _nothing)
    assert sched.submits == [((20, 3), 1), ((20, 4), 1), ((30, 6), 2)]  # nearest first, by score
    assert pf.keep(20) == {3, 4} and pf.keep(30) == {6}

    # Layer 20 routes to 3 and 5: the prefetch of 4 is stale and cancelled (wasted); a nearer
    # guess for layer 30 names 7, not 6: the queued read of 6, asked for further back, is dropped.
    sched.state[(20, 3)] = "running"
    guesses.table = {2: {7: 0.9}}
    at20 = pf.propose(20, None)
    pf.observe(20, np.array([[3, 5]]), None)
    pf.issue(20, np.array([[3, 5]]), at20, _nothing)
    assert set(sched.cancels) == {(20, 4), (30, 6)}
    assert sched.submits[-1] == ((30, 7), 1)
    assert pf.stats[20].wasted == 1 and pf.stats[30].wasted == 1
    assert pf.stats[20].recall == 0.5  # of 3 and 5, it guessed 3

    # The read of (20, 3) lands, is installed, then used: useful; one evicted unused: wasted.
    buf = np.zeros(100, np.uint8)
    sched.published = [((20, 3), buf), ((30, 7), buf)]
    assert [(l, e) for l, e, _ in pf.arrivals()] == [(20, 3), (30, 7)]
    pf.landed(20, 3)
    pf.landed(30, 7)
    assert pf.used_all(20, [3, 5], 100) == 1 and pf.stats[20].useful == 1
    pf.evicted(30, 7, 100)
    pf.evicted(30, 7, 100)  # evicted again (after a demand read): no second count
    assert pf.stats[30].wasted == 2 and pf.stats[30].wasted_nbytes == 100
    totals = pf.totals()
    assert totals.issued == 4 and totals.useful == 1 and totals.wasted == 3


def test_the_governor_weighs_only_wasted_prefetches_that_were_read():
    """A stale prefetch cancelled while queued lost no read: it counts as wasted in the
    statistics, without bytes, and the governor is not charged for it; one cancelled while
    being read, or evicted unused, is charged."""
    from golem.runtime.governor import TokenOutcome

    class Ledger:
        def __init__(self):
            self.wasted = []

        def step(self, outcome, useful, wasted):
            self.wasted.append(wasted)
            return 2

    guesses, pf, sched = _three_layers()
    pf.governor = Ledger()
    pf.begin(True, TokenOutcome())
    guesses.table = {1: {3: 0.9, 4: 0.8, 5: 0.7}}
    pf.issue(10, np.array([[1, 2]]), pf.propose(10, None), _nothing)
    sched.state[(20, 4)] = "running"  # (20, 5) is still queued
    pf.issue(20, np.array([[3, 6]]), [], _nothing)  # neither 4 nor 5 is used: both cancelled
    assert set(sched.cancels) == {(20, 4), (20, 5)}
    assert pf.stats[20].wasted == 2 and pf.stats[20].wasted_nbytes == 100
    pf.begin(True, TokenOutcome())
    assert pf.governor.wasted == [0, 1]  # the first step saw nothing yet


def test_with_no_prefetch_out_nothing_is_polled():
    """The scheduler is polled for arrivals only while a prefetch is out: a poll takes its
    lock, at every decode layer. What was read and not installed is still out."""
    guesses, pf, sched = _three_layers()
    polls = []
    poll = sched.poll
    sched.poll = lambda timeout=0: polls.append(timeout) or poll(timeout)
    pf.begin(True)
    assert pf.arrivals_for(10).installs == [] and polls == []
    guesses.table = {1: {3: 0.9}}
    pf.step(10, np.array([[1, 2]]), None, pf.propose(10, None), True).issue(_nothing)
    assert sched.submits == [((20, 3), 1)]
    sched.published = [((20, 3), np.zeros(100, np.uint8))]
    assert [(l, e) for l, e, _ in pf.arrivals_for(20).installs] == [(20, 3)] and len(polls) == 1
    pf.landed(20, 3)  # installed: nothing is out any more
    assert pf.arrivals() == [] and len(polls) == 1


def test_a_read_landing_during_the_sync_is_installed_before_the_layer_admits():
    """``arrivals_for`` polls before the layer's launch and ``step`` polls again after its
    sync: a read that lands in between is installed then, not taken over by a demand read."""
    guesses, pf, sched = _three_layers()
    pf.begin(True)
    guesses.table = {1: {3: 0.9}, 2: {6: 0.9}}
    pf.step(10, np.array([[1, 2]]), None, pf.propose(10, None), True).issue(_nothing)
    sched.published = [((30, 6), np.zeros(100, np.uint8))]
    assert pf.arrivals_for(20).installs == []  # (20, 3) is still being read
    sched.published = [((20, 3), np.zeros(100, np.uint8))]  # it lands during layer 20's sync
    assert [(l, e) for l, e, _ in pf.step(20, np.array([[3, 5]]), None, [], True).installs] == [(30, 6), (20, 3)]


def test_a_used_prefetch_still_in_flight_at_the_layers_issue_is_late():
    """The engine runs a layer's issue once its demand reads are queued and what landed for it
    is reported: a prefetch of an expert it uses that is still out was taken over by a demand
    read (late, counted once); one installed first is no longer out, so not late."""
    guesses, pf, sched = _three_layers()
    pf.begin(True)
    guesses.table = {1: {3: 0.9, 4: 0.8}}
    pf.step(10, np.array([[1, 2]]), None, pf.propose(10, None), True).issue(_nothing)
    sched.state[(20, 4)] = "running"
    pf.landed(20, 3)  # installed after layer 20's sync
    pf.step(20, np.array([[3, 4]]), None, [], True).issue(_nothing)
    assert pf.stats[20].late == 1 and pf.in_flight == {}
    pf.late(20, 4)  # the engine's report of the demand read, after its wait
    assert pf.stats[20].late == 1 and sched.cancels == []
    assert pf.used_all(20, [3, 4], 100) == 1 and pf.stats[20].useful == 1


def test_a_step_held_at_depth_0_with_nothing_out_has_no_issue():
    """While the governor holds prefetch off and no read is out, a decode layer has no issue to
    run later (no poll, no cancels, no scheduler call): its step observes the routing at once,
    for a predictor that learns from it. A read still out keeps the issue, which cancels it
    when the layer's routing makes it stale."""
    guesses, pf, sched = _three_layers()
    observed = []
    observe = pf.predictor.observe
    pf.predictor.observe = lambda position, ids, scores=None: observed.append(position) or observe(position, ids, scores)
    pf.begin(True)
    guesses.table = {1: {3: 0.9}}
    pf.step(10, np.array([[1, 2]]), None, pf.propose(10, None), True).issue(_nothing)
    pf.depth = 0  # the governor's choice for the rest of the step
    orders = pf.step(20, np.array([[4, 5]]), None, pf.propose(20, None), True)
    assert orders.issue is not None and observed == [0]  # (20, 3) is out
    orders.issue(_nothing)
    assert sched.cancels == [(20, 3)] and pf.in_flight == {} and observed == [0, 1]
    orders = pf.step(30, np.array([[1, 2]]), None, pf.propose(30, None), True)
    assert orders.issue is None and orders.installs == [] and observed == [0, 1, 2]
