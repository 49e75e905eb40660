"""The memory planner: sizes and ranges parse with clear errors, a plan never exceeds its
budget, flags take precedence in order, and the allocation is the optimum of its estimate."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from golem.runtime.analysis.model_size import ModelMemory
from golem.runtime.analysis.plan import RoutingStats, distinct_per_window, plan_memory
from golem.runtime.units import format_layer_ranges, parse_layer_ranges, parse_override, parse_size
from golem.runtime.analysis.profile import profile_from_traces
from golem.runtime.analysis.simulate import simulate
from golem.runtime.trace import load_trace

from trace_factory import make_trace, random_trace

MB = 10**6


@pytest.mark.parametrize(
    "text, nbytes",
    [("48GB", 48 * 10**9), ("512MiB", 512 * 2**20), ("0.5GB", 5 * 10**8), ("1e9", 10**9),
     ("100", 100), (" 2 GiB ", 2 * 2**30), ("64kb", 64000), ("1.5TiB", int(1.5 * 2**40)), (4096, 4096)],
)
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["48 parsecs", "", "GB", "-1GB", "1.2.3GB", "12 G B"])
def test_parse_size_errors_name_the_flag_and_value(text):
    with pytest.raises(ValueError, match=r"--memory-budget: cannot read size"):
        parse_size(text, "--memory-budget")


def test_parse_layer_ranges():
    assert parse_layer_ranges("0-40,90-93") == list(range(41)) + [90, 91, 92, 93]
    assert parse_layer_ranges("3") == [3]
    assert parse_layer_ranges("5, 1-2 ,2") == [1, 2, 5]
    assert format_layer_ranges(parse_layer_ranges("0-40,90-93")) == "0-40,90-93"
    assert format_layer_ranges([7, 1, 2, 3]) == "1-3,7"
    for bad, msg in [("a-b", "cannot read"), ("5-3", "backwards"), ("", "empty"), ("0-", "cannot read"), ("1;2", "cannot read")]:
        with pytest.raises(ValueError, match=f"-f/--pin-layers: .*{msg}"):
            parse_layer_ranges(bad)


def test_parse_override():
    assert parse_override(["0-2,7", "128"]) == ([0, 1, 2, 7], 128)
    with pytest.raises(ValueError, match="N must be a whole number"):
        parse_override(["0-2", "many"])


OLMOE = ModelMemory(num_layers=16, num_experts=64, top_k=8, expert_nbytes=12 * MB, non_expert_nbytes=1000 * MB)


def test_uniform_plan_without_statistics():
    plan = plan_memory(OLMOE, budget_nbytes=1000 * MB + 16 * 20 * 12 * MB + 3 * 12 * MB + 5)
    assert plan.cache_sizes == [21, 21, 21] + [20] * 13  # leftover slots go to the first layers
    assert plan.total_nbytes <= plan.model.non_expert_nbytes + 16 * 20 * 12 * MB + 3 * 12 * MB + 5
    assert plan.pinned_positions == []
    assert all(lp.source == "budget (uniform)" for lp in plan.layers)


def test_budget_that_holds_everything_pins_everything():
    plan = plan_memory(OLMOE, budget_nbytes=parse_size("100GB"))
    assert plan.pinned_positions == list(range(16))
    assert plan.expert_nbytes_total == 16 * 64 * 12 * MB


def test_shortfall_is_named():
    need = 1000 * MB + 16 * 8 * 12 * MB
    with pytest.raises(ValueError, match=r"--memory-budget 2.54 GB is 1.00 KB short: the smallest plan needs 2.54 GB \(non-expert 1.00 GB \+ top-k \(8\) slots x 16 layers 1.54 GB\)"):
        plan_memory(OLMOE, budget_nbytes=need - 1000)
    assert plan_memory(OLMOE, budget_nbytes=need).cache_sizes == [8] * 16
    with pytest.raises(ValueError, match=r"layers set by flags"):
        plan_memory(OLMOE, budget_nbytes=need, pin_layers=[0])


def test_flag_precedence():
    plan = plan_memory(OLMOE, cache_size=16, overrides=[([0, 1, 2, 3], 32), ([3], 40)], pin_layers=[0])
    assert plan.cache_sizes[:5] == [64, 32, 32, 40, 16]
    assert [lp.source for lp in plan.layers[:5]] == ["-f", "override", "override", "override", "-c"]
    assert plan.pinned_positions == [0]
    # an override of all experts is a pinned layer
    assert plan_memory(OLMOE, cache_size=16, overrides=[([5], 100)]).pinned_positions == [5]


def test_flags_and_budget_together():
    budget = parse_size("6GB")
    plan = plan_memory(OLMOE, budget_nbytes=budget, pin_layers=[0, 1], overrides=[([15], 8)])
    assert plan.cache_sizes[0] == plan.cache_sizes[1] == 64 and plan.cache_sizes[15] == 8
    assert plan.total_nbytes <= budget
    assert {lp.source for lp in plan.layers[2:15]} == {"budget (uniform)"}
    with pytest.raises(ValueError, match="over|short"):
        plan_memory(OLMOE, budget_nbytes=parse_size("3GB"), cache_size=64)


def test_missing_size_and_bad_flags():
    with pytest.raises(ValueError, match="no cache size for MoE layers 2-15"):
        plan_memory(OLMOE, overrides=[([0, 1], 16)])
    with pytest.raises(ValueError, match=r"-c/--cache-size 4 is smaller than top-k \(8\)"):
        plan_memory(OLMOE, cache_size=4)
    with pytest.raises(ValueError, match=r"--cache-size-override 0-3 4: below top-k"):
        plan_memory(OLMOE, cache_size=16, overrides=[([0, 1, 2, 3], 4)])
    with pytest.raises(ValueError, match="layer 16 does not exist"):
        plan_memory(OLMOE, cache_size=16, pin_layers=[16])


def test_layer_ids_name_model_layers():
    model = ModelMemory(6, 16, 4, 1000, layer_ids=[3, 4, 5, 6, 7, 8])  # layers 0-2 dense
    plan = plan_memory(model, cache_size=8, pin_layers=parse_layer_ranges("0-4"))
    assert plan.pinned_positions == [0, 1]
    assert plan.to_dict()["pinned_layers"] == [3, 4]
    with pytest.raises(ValueError, match="0-2 names no MoE layer"):
        plan_memory(model, cache_size=8, pin_layers=[0, 1, 2])


def _random_stats(rng, layers, experts, k):
    # decreasing curves with random (sometimes non-convex) steps, 0 at all experts
    steps = rng.random((layers, experts)) ** rng.uniform(0.5, 3, size=(layers, 1))
    curves = np.concatenate([np.cumsum(steps[:, ::-1], axis=1)[:, ::-1], np.zeros((layers, 1))], axis=1)
    return RoutingStats(curves=curves, source="random")


@pytest.mark.parametrize("seed", range(40))
def test_plans_never_exceed_the_budget(seed):
    rng = np.random.default_rng(seed)
    layers, experts = int(rng.integers(1, 30)), int(rng.integers(4, 130))
    k = int(rng.integers(1, min(experts, 9) + 1))
    sizes = [int(x) for x in rng.integers(1000, 50_000, size=layers)] if seed % 2 else int(rng.integers(1000, 10**7))
    model = ModelMemory(layers, experts, k, sizes, non_expert_nbytes=int(rng.integers(0, 10**8)))
    smallest = model.non_expert_nbytes + sum(k * model.nbytes_of(i) for i in range(layers))
    budget = int(smallest + rng.random() * 1.1 * model.all_experts_nbytes)
    pins = [int(x) for x in rng.choice(layers, size=min(layers, 2), replace=False)] if seed % 3 == 0 else []
    stats = _random_stats(rng, layers, experts, k) if seed % 4 < 2 else None
    try:
        plan = plan_memory(model, budget_nbytes=budget, stats=stats, pin_layers=pins)
    except ValueError as e:
        assert pins and "short" in str(e)  # the pinned layers alone may not fit
        return
    assert plan.total_nbytes <= budget
    for lp in plan.layers:
        assert k <= lp.cache_size <= experts
        assert lp.pinned == (lp.cache_size == experts)
        assert lp.nbytes == lp.cache_size * model.nbytes_of(lp.position)
    assert set(pins) <= set(plan.pinned_positions)
    json.dumps(plan.to_dict())


@pytest.mark.parametrize("seed", range(8))
def test_allocation_is_the_optimum_of_its_estimate(seed):
    rng = np.random.default_rng(seed)
    layers, experts, k = 3, 7, 2
    sizes = [int(x) for x in rng.integers(1, 4, size=layers) * 100]
    model = ModelMemory(layers, experts, k, sizes)
    stats = _random_stats(rng, layers, experts, k)
    budget = int(rng.integers(k * sum(sizes), experts * sum(sizes) + 1))
    plan = plan_memory(model, budget_nbytes=budget, stats=stats)
    best = min(
        sum(stats.misses_per_step(i, c, pinned=c == experts) for i, c in enumerate(cache_sizes))
        for cache_sizes in itertools.product(range(k, experts + 1), repeat=layers)
        if sum(c * s for c, s in zip(cache_sizes, sizes)) <= budget
    )
    assert plan.estimated_misses_per_step() == pytest.approx(best, abs=1e-6)
    assert plan.estimated_misses_per_step() <= plan.estimated_misses_per_step(plan.uniform_cache_sizes) + 1e-9


def test_stats_give_room_to_the_layer_that_needs_it():
    # layer 0 routes uniformly over 16 experts, layer 1 always uses the same 4
    rng = np.random.default_rng(0)
    ex = np.stack([[rng.choice(16, 4, replace=False), np.arange(4)] for _ in range(400)])
    t = make_trace(ex, 16)
    model = ModelMemory(2, 16, 4, 100)
    stats = RoutingStats.from_traces(t)
    plan = plan_memory(model, budget_nbytes=100 * 20, stats=stats)
    assert plan.cache_sizes == [16, 4]
    assert plan.pinned_positions == [0]
    uniform = plan_memory(model, budget_nbytes=100 * 20)
    assert uniform.cache_sizes == [10, 10]
    assert simulate(t, policy="lru", cache_size=plan.cache_sizes, pinned=plan.pinned_positions).total_misses < \
        simulate(t, policy="lru", cache_size=uniform.cache_sizes).total_misses


def test_routing_stats_from_traces_and_profiles_agree():
    t = random_trace(3, n=200, layers=3, num_experts=10, k=3)
    a = RoutingStats.from_traces(t)
    b = RoutingStats.from_profile(profile_from_traces(t))
    np.testing.assert_allclose(a.curves, b.curves)
    for c in (3, 6, 10):
        np.testing.assert_allclose(a.curves[:, c] * t.num_steps, simulate(t, policy="lru", cache_size=c).misses)
    p = RoutingStats.from_traces(t, policy="lfu-decay", grid_step=2)
    for c in (3, 5, 7, 9, 10):
        np.testing.assert_allclose(p.curves[:, c] * t.num_steps, simulate(t, policy="lfu-decay", cache_size=c).misses)
    assert p.policy == "lfu-decay"


def test_distinct_per_window():
    ex = np.array([[[0, 1]], [[1, 2]], [[0, 1]], [[3, 4]]])
    assert distinct_per_window(make_trace(ex, 8), window=2).tolist() == [3.5]


def test_describe_groups_layers_and_shows_totals():
    plan = plan_memory(OLMOE, budget_nbytes=parse_size("6GB"), pin_layers=[0, 1])
    text = plan.describe()
    assert "0-1" in text and "64/64" in text and "pinned" in text and "-f" in text
    assert "of 6.00 GB budget" in text
    assert "non-expert bytes  1.00 GB" in text


def test_budget_plan_beats_uniform_on_olmoe_estimate(olmoe_traces):
    t = load_trace(olmoe_traces / "coding.npz")
    part = make_trace(t.experts[:2000], 64)
    model = ModelMemory.from_trace_meta(t.meta)
    stats = RoutingStats.from_traces(part)
    budget = 32 * 16 * model.expert_nbytes
    plan = plan_memory(model, budget_nbytes=budget, stats=stats)
    uniform = plan_memory(model, budget_nbytes=budget)
    assert plan.total_nbytes <= budget and uniform.cache_sizes == [32] * 16
    got = simulate(part, policy="lru", cache_size=plan.cache_sizes, pinned=plan.pinned_positions).total_misses
    assert got < simulate(part, policy="lru", cache_size=uniform.cache_sizes).total_misses
    assert "uniform plan of the same budget" in plan.describe()


def test_weighted_plans_follow_the_weights_within_the_budget():
    model = ModelMemory(4, 16, 2, 1000, non_expert_nbytes=500)
    plan = plan_memory(model, budget_nbytes=500 + 30 * 1000, weights=[4, 2, 1, 1])
    assert plan.cache_sizes == [15, 7, 4, 4] and plan.total_nbytes <= 500 + 30 * 1000
    assert {lp.source for lp in plan.layers} == {"budget (weighted)"}
    sized = ModelMemory(3, 16, 2, [1000, 2000, 3000])
    for budget in (12_000, 40_000, 70_000, 96_000):
        p = plan_memory(sized, budget_nbytes=budget, weights=[1, 3, 9])
        assert p.total_nbytes <= budget and all(2 <= s <= 16 for s in p.cache_sizes)
        assert p.cache_sizes[0] <= p.cache_sizes[2]
    with pytest.raises(ValueError, match="weights: 2 values for 4"):
        plan_memory(model, budget_nbytes=10**6, weights=[1, 2])


def test_min_slots_prices_budgets_below_top_k():
    model = ModelMemory(4, 16, 4, 1000)
    with pytest.raises(ValueError, match="short"):
        plan_memory(model, budget_nbytes=8 * 1000)
    plan = plan_memory(model, budget_nbytes=9 * 1000, min_cache_size=0)
    assert plan.cache_sizes == [3, 2, 2, 2]
    with pytest.raises(ValueError, match="min_cache_size"):
        plan_memory(model, budget_nbytes=9 * 1000, min_cache_size=5)
