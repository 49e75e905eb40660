"""The prefetch governor: it keeps a depth that pays, steps down to off when speculation costs
more than it saves, probes again later (less often after each losing probe), never exceeds the
user's depth, and a fixed depth stays fixed. Where the engine times its steps it judges by
their time against steps decoded off a few tokens before, whatever its model says."""

from __future__ import annotations

import numpy as np
import pytest

from golem.runtime.governor import Governor, TokenOutcome
from golem.runtime.prefetch import AUTO_DEPTH, PrefetchConfig, Prefetcher

SLOW_MISS = TokenOutcome(stall_s=0.010, misses=2, prefetch_host_s=0.001)  # 5 ms per demand read
CHEAP_MISS = TokenOutcome(stall_s=0.0002, misses=2, prefetch_host_s=0.002)  # 0.1 ms per demand read


def run(gov: Governor, outcome: TokenOutcome, tokens: int, useful: int = 3, wasted: int = 1):
    return [gov.step(outcome, useful if gov.depth else 0, wasted if gov.depth else 0) for _ in range(tokens)]


def test_speculation_that_pays_keeps_the_depth():
    gov = Governor(3, window=4, start_depth=None)
    assert gov.depth == 3
    assert run(gov, SLOW_MISS, 40) == [3] * 40  # saves 3 x 5 ms, costs 1 ms + 2.5 ms
    assert gov.stats.downs == 0 and gov.stats.tokens_at == {3: 40}


def test_speculation_that_costs_steps_down_to_off_then_probes_with_backoff():
    gov = Governor(2, window=4, probe_tokens=8, max_probe_tokens=32, clear_loss=None, start_depth=None)
    depths = run(gov, CHEAP_MISS, 8)
    assert depths == [2, 2, 2, 1, 1, 1, 1, 0]  # a window per step down
    # off: 8 tokens, then a probe at depth 1 for one window; it loses: 16 tokens off, then 32, then 32 again (the cap)
    depths = run(gov, CHEAP_MISS, 8 + 4 + 16 + 4 + 32 + 4 + 32)
    probes = [i for i in range(1, len(depths)) if depths[i] == 1 and depths[i - 1] == 0]
    assert gov.stats.probes == len(probes) == 4
    assert list(np.diff([-1] + probes)) == [8, 4 + 16, 4 + 32, 4 + 32]


def test_a_clear_loss_ends_its_window_early_a_marginal_one_does_not():
    gov = Governor(2, window=8, start_depth=None)  # CHEAP_MISS: 2 ms of host time per token against 0.3 ms saved
    assert run(gov, CHEAP_MISS, 5) == [2, 1, 1, 0, 0]  # two tokens per step down, not eight
    assert gov.stats.downs == 2
    marginal = TokenOutcome(stall_s=0.002, misses=2, prefetch_host_s=0.0035)  # saves 3 ms, costs 3.75 ms
    gov = Governor(2, window=8, start_depth=None)
    assert run(gov, marginal, 9) == [2] * 7 + [1, 1]  # a full window before it steps down
    gov = Governor(2, window=8, clear_loss=None, start_depth=None)
    assert run(gov, CHEAP_MISS, 8) == [2] * 7 + [1]


def test_a_probe_that_pays_climbs_back_up_to_the_ceiling():
    gov = Governor(2, window=4, probe_tokens=4, clear_loss=None, start_depth=None)
    run(gov, CHEAP_MISS, 8)
    assert gov.depth == 0
    run(gov, SLOW_MISS, 4)  # off 4 tokens, then probe (depth 1) ...
    assert gov.depth == 1
    run(gov, SLOW_MISS, 4)  # ... which pays: one deeper (depth 2 lost before going off: stale)
    assert gov.depth == 2 and gov.stats.ups == 1
    run(gov, SLOW_MISS, 20)
    assert gov.depth == 2  # never above the ceiling


def test_prefetches_in_flight_when_needed_count_for_the_stall_they_cut():
    gov = Governor(1, window=4, probe_tokens=4, clear_loss=None, start_depth=0)
    assert run(gov, SLOW_MISS, 4) == [0, 0, 0, 1]  # off: a demand read stalls 5 ms; then a probe
    started_early = TokenOutcome(stall_s=0.004, misses=2, prefetch_host_s=0.001)  # none landed in time,
    assert run(gov, started_early, 12, useful=0, wasted=0) == [1] * 12  # but each read had 3 ms done
    assert gov.stats.downs == 0
    in_the_way = TokenOutcome(stall_s=0.012, misses=2, prefetch_host_s=0.0)  # demand reads slowed down
    assert run(gov, in_the_way, 4, useful=0, wasted=0)[-1] == 0 and gov.stats.downs == 1


def test_depth_zero_is_never_raised():
    gov = Governor(0)
    assert run(gov, SLOW_MISS, 50) == [0] * 50 and gov.stats.probes == 0


class _Guesses:
    """A predictor that names nothing (the prefetcher's depth is all that is looked at)."""

    needs_hidden = False

    def begin_sequence(self):
        pass

    def begin_step(self):
        pass

    def propose(self, position, depth, hidden):
        from golem.predictors.base import Proposal

        return Proposal(position, range(position + 1, min(position + depth, 2) + 1))

    def propose_next(self, position, depth, hidden):
        return None

    def observe(self, position, ids, scores):
        pass


@pytest.mark.parametrize("governed", [True, False])
def test_the_prefetcher_proposes_at_the_governed_depth_or_the_fixed_one(governed):
    config = PrefetchConfig(depth=2, governor=governed)
    pf = Prefetcher(_Guesses(), config, [10, 20, 30], 2, [100] * 3, [True] * 3)
    assert (pf.governor is not None) == governed
    for _ in range(64):  # costly, useless speculation
        pf.begin_step(CHEAP_MISS)
    assert pf.depth == (0 if governed else 2)
    assert (pf.propose(10, None) == []) == governed


def test_auto_depth_is_governed_and_capped_by_the_model():
    auto = PrefetchConfig.auto_depth()
    assert auto.depth == AUTO_DEPTH and auto.governor and auto.auto
    assert auto.for_layers(2).depth == 1 and auto.for_layers(10).depth == AUTO_DEPTH
    assert PrefetchConfig(depth=3).for_layers(2).depth == 3  # an explicit depth is the user's (checked elsewhere)


def timed(gov: Governor, span_ms_at, tokens: int, first_after_change_ms=None):
    """``tokens`` steps whose time depends on the depth (``span_ms_at[depth]``); the model's
    numbers say speculation pays (SLOW_MISS). Returns the depth of each step."""
    depths = []
    for _ in range(tokens):
        d = gov.depth
        ms = span_ms_at[d]
        if first_after_change_ms is not None and depths and depths[-1] != d:
            ms = first_after_change_ms
        depths.append(d)
        gov.step(TokenOutcome(stall_s=0.010, misses=2, prefetch_host_s=0.001, span_s=ms / 1000), 3, 1)
    return depths


def test_timed_steps_slower_than_steps_off_turn_prefetch_off_where_the_model_says_it_pays():
    gov = Governor(2, window=4, probe_tokens=8)
    depths = timed(gov, {0: 10.0, 1: 12.0, 2: 13.0}, 16)
    # depth 1, then a reference (4 steps off), depth 1 again: the step after the change is
    # not timed, two timed steps 20% slower end the window early
    assert depths == [1] + [0] * 4 + [1] * 3 + [0] * 8
    assert gov.depth == 1 and gov.stats.references == 1 and gov.stats.downs == 1 and gov.stats.probes == 1
    assert timed(gov, {0: 10.0, 1: 12.0, 2: 13.0}, 3) == [1, 1, 1]  # the probe loses: off again, for longer
    assert gov.depth == 0
    gov = Governor(2, window=4, probe_tokens=8, reference_tokens=0)  # untimed: the model, which keeps depth 1
    assert timed(gov, {0: 10.0, 1: 12.0, 2: 13.0}, 16)[-1] >= 1


def test_timed_steps_faster_than_steps_off_climb():
    gov = Governor(2, window=4)
    depths = timed(gov, {0: 10.0, 1: 8.0, 2: 7.0}, 9 + 40, first_after_change_ms=50.0)
    assert depths[:9] == [1] + [0] * 4 + [1] * 4  # the slow first step after each change is not timed
    assert depths[9:] == [2] * 40  # depth 2 pays more than depth 1: it stays there
    assert gov.stats.references == 1 and gov.stats.downs == 0


def test_a_reference_is_taken_again_later_the_later_the_more_speculation_gained():
    for fast_ms, valid in ((9.5, 32), (5.0, 8 * 32)):  # 5% faster; twice as fast: the longest stretch
        gov = Governor(1, window=4, reference_every=32)
        depths = timed(gov, {0: 10.0, 1: fast_ms}, 5 + valid + 1 + 4 + 1)
        assert depths == [1] + [0] * 4 + [1] * (valid + 1) + [0] * 4 + [1], fast_ms
        assert gov.stats.references == 2


def test_timed_depth_that_pays_less_than_the_shallower_one_steps_back():
    gov = Governor(2, window=4)
    depths = timed(gov, {0: 10.0, 1: 8.0, 2: 9.0}, 9 + 4 + 12)
    assert depths == [1] + [0] * 4 + [1] * 4 + [2] * 4 + [1] * 12
    assert gov.stats.ups == 1 and gov.stats.downs == 1


def test_the_engine_times_every_decode_step_but_the_first_after_a_prompt(checkpoints, monkeypatch):
    from golem.runtime import load
    from helpers import greedy_tokens, prompt_tokens

    spans = []
    step = Governor.step

    def recording_step(self, outcome, useful, wasted):
        spans.append(outcome.span_s)
        return step(self, outcome, useful, wasted)

    monkeypatch.setattr(Governor, "step", recording_step)
    with load(str(checkpoints("olmoe")), cache_sizes=4, prefetch=PrefetchConfig(depth=2)) as (model, tok):
        tokens = prompt_tokens(tok)
        for n in (6, 5):
            before = len(spans)
            greedy_tokens(model, tokens, n)
            assert len(spans) - before >= n - 2
            first, *rest = spans[before:]
            assert first == 0.0 and all(s > 0 for s in rest)  # a step after a prefill call is not timed


def stalled(gov: Governor, stall_ms: float, tokens: int, span_ms: float = 10.0):
    """``tokens`` timed steps of ``span_ms`` that waited ``stall_ms`` on reads; their depths."""
    depths = []
    for _ in range(tokens):
        depths.append(gov.depth)
        gov.step(TokenOutcome(stall_s=stall_ms / 1000, misses=2, prefetch_host_s=0.001, span_s=span_ms / 1000), 3, 1)
    return depths


def test_steps_off_that_barely_wait_on_reads_keep_speculation_off_until_they_do():
    """Speculation saves at most the stall: with 0.5 ms of 10 ms spent on reads (a page cache
    holding the experts), the governor stays off after its reference and skips its probes;
    once the steps off wait on reads, the next probe goes ahead."""
    gov = Governor(2, window=4, probe_tokens=8)
    assert stalled(gov, 0.5, 40) == [1] + [0] * 39  # the reference (4 steps off), then off
    assert gov.stats.holds >= 4 and gov.stats.probes == 0 and gov.stats.references == 1
    assert "held off" in gov.stats.describe()
    depths = stalled(gov, 4.0, 16)  # reads now take 40% of a step off
    assert 1 in depths and gov.stats.probes == 1


def test_the_stall_share_is_not_judged_where_steps_are_not_timed():
    gov = Governor(2, window=4, probe_tokens=8, reference_tokens=0)
    run(gov, CHEAP_MISS, 30)  # the model says speculation loses here: off, and probes as before
    assert gov.stats.holds == 0 and gov.stats.probes >= 1
