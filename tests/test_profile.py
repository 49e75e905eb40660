"""Warm-start profiles: counts match the traces, warm lists come in insertion order, files
round-trip, runs merge, and bad files get clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from golem.runtime.analysis.profile import (
    PROFILE_FILENAME,
    Profile,
    ProfileError,
    load_profile,
    load_warm_source,
    profile_from_counts,
    profile_from_traces,
    random_warm_start,
    record_profile,
    record_run,
    save_profile,
)
from golem.runtime.analysis.plan import RoutingStats
from golem.runtime.analysis.simulate import miss_curve, simulate
from golem.runtime.trace import load_trace, save_trace

from trace_factory import make_trace, random_trace


def test_counts_match_the_trace():
    t = random_trace(0, holes=True)
    p = profile_from_traces(t)
    for position in range(t.num_layers):
        col = t.experts[:, position].ravel()
        np.testing.assert_array_equal(p.counts[position], np.bincount(col[col >= 0], minlength=12))
    assert p.num_steps == t.num_steps and p.runs == 1 and p.stack_hist is not None


def test_prefill_steps_are_left_out():
    t = make_trace(np.array([[[0, 1]], [[2, 3]]]), 4, prefill=[True, False])
    assert profile_from_traces(t).counts[0].tolist() == [0, 0, 1, 1]
    assert profile_from_traces(t, decode_only=False).counts[0].tolist() == [1, 1, 1, 1]


def test_top_experts_and_warm_start_order():
    counts = np.array([[5, 0, 9, 5, 1], [0, 0, 0, 0, 2]], dtype=float)
    p = profile_from_counts(counts, top_k=1, num_steps=10)
    assert p.top_experts(0) == [2, 0, 3, 4]  # most used first, ties by id, unused left out
    assert p.top_experts(0, 2) == [2, 0]
    warm = p.warm_start(3)
    assert warm == {0: [3, 0, 2], 1: [4]}  # the most used is inserted last
    assert p.warm_start([2, 1], pinned=[1]) == {0: [0, 2]}


def test_profile_warm_start_beats_an_empty_cache():
    t = random_trace(2, n=400)
    p = profile_from_traces(t)
    cold = simulate(t, policy="lru", cache_size=5)
    warm = simulate(t, policy="lru", cache_size=5, warm=p.warm_start(5))
    assert warm.total_misses < cold.total_misses


def test_save_and_load_round_trip(tmp_path):
    p = profile_from_traces(random_trace(1))
    path = save_profile(p, tmp_path / "p.json")
    q = load_profile(path)
    np.testing.assert_array_equal(p.counts, q.counts)
    np.testing.assert_array_equal(p.stack_hist, q.stack_hist)
    assert (q.top_k, q.num_steps, q.runs) == (p.top_k, p.num_steps, p.runs)
    data = json.loads(path.read_text())
    assert data["format"] == "golem-profile/1"
    assert data["layers"][0]["experts"] == p.top_experts(0)
    assert not list(tmp_path.glob("*.tmp"))


def test_record_run_merges_into_the_profile_beside_the_cache(tmp_path):
    counts = np.array([[3, 1, 0], [0, 2, 2]])
    path = record_run(tmp_path / "cache", counts, top_k=1, num_steps=4, meta={"model": "m"})
    assert path == tmp_path / "cache" / PROFILE_FILENAME
    record_run(tmp_path / "cache", counts * 2, top_k=1, num_steps=4, meta={"model": "m"})
    p = load_profile(path)
    np.testing.assert_array_equal(p.counts, counts * 3)
    assert (p.runs, p.num_steps) == (2, 8)
    record_run(tmp_path / "cache", counts, top_k=1, num_steps=4, decay=0.5)
    np.testing.assert_allclose(load_profile(path).counts, counts * 1.5 + counts)
    with pytest.raises(ProfileError, match="made for 2 layers x 3 experts, this run has 3 x 3"):
        record_run(tmp_path / "cache", np.ones((3, 3)), top_k=1, num_steps=1)
    with pytest.raises(ProfileError, match="model 'm', this run is 'other'"):
        record_run(tmp_path / "cache", counts, top_k=1, num_steps=4, meta={"model": "other"})
    # the folder's profile is what -W FOLDER then finds
    np.testing.assert_allclose(load_warm_source(tmp_path / "cache").counts, counts * 2.5)


def test_warm_sources(tmp_path):
    a, b = random_trace(3), random_trace(4)
    save_trace(tmp_path / "a.npz", a)
    save_trace(tmp_path / "b.npz", b)
    one = load_warm_source(tmp_path / "a.npz")
    both = load_warm_source(tmp_path)
    np.testing.assert_array_equal(one.counts, profile_from_traces(a).counts)
    np.testing.assert_array_equal(both.counts, profile_from_traces([a, b]).counts)
    assert both.runs == 2
    save_profile(one, tmp_path / "saved.json")
    np.testing.assert_array_equal(load_warm_source(tmp_path / "saved.json").counts, one.counts)


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(ProfileError, match="no such trace, folder or profile"):
        load_warm_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileError, match="neither .npz traces nor golem-profile.json"):
        load_warm_source(tmp_path / "empty")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_warm_source(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ProfileError, match="not a golem-profile/1 file"):
        load_profile(bad)
    data = save_profile(profile_from_counts(np.ones((2, 3)), top_k=1, num_steps=1), tmp_path / "p.json")
    broken = json.loads(data.read_text())
    broken["layers"][1]["experts"] = [0, 1, 7]
    bad.write_text(json.dumps(broken))
    with pytest.raises(ProfileError, match="layer 1 names expert 7"):
        load_profile(bad)
    del broken["layers"][1]
    bad.write_text(json.dumps(broken))
    with pytest.raises(ProfileError, match="1 layer entries"):
        load_profile(bad)
    (tmp_path / "t.npz").write_bytes(b"not a zip")
    with pytest.raises(ProfileError, match="t.npz"):
        load_warm_source(tmp_path / "t.npz")


def test_check_shape():
    p = profile_from_counts(np.ones((2, 3)), top_k=1, num_steps=1)
    p.check_shape(2, 3)
    with pytest.raises(ProfileError, match="made for 2 layers x 3 experts, the model has 4 x 3"):
        p.check_shape(4, 3, "warm start")


def test_random_warm_start():
    a = random_warm_start(7, 4, 16, 5)
    assert a == random_warm_start(7, 4, 16, 5)
    assert a != random_warm_start(8, 4, 16, 5)
    for layer, experts in a.items():
        assert len(experts) == 5 and len(set(experts)) == 5 and all(0 <= e < 16 for e in experts)
    b = random_warm_start(7, 4, 16, [2, 3, 16, 20], pinned=[0])
    assert 0 not in b and len(b[2]) == 16 and len(b[3]) == 16
    assert a[1][:3] == b[1]  # each layer's draw does not depend on the others' sizes


def test_olmoe_profile_top_experts_cover_most_routing(olmoe_traces):
    t = load_trace(olmoe_traces / "coding.npz")
    p = profile_from_traces(t, stack=False)
    assert p.counts.sum() == t.experts.size
    top = p.top_experts(5, 32)
    share = p.counts[5, top].sum() / p.counts[5].sum()
    assert 0.5 < share < 1.0
    assert isinstance(p, Profile)


def test_policy_curves_travel_with_the_profile(tmp_path):
    t = random_trace(3, n=200, layers=3, num_experts=10, k=3)
    p = profile_from_traces(t, policies=["lfu-decay"])
    q = load_profile(save_profile(p, tmp_path / "p.json"))
    s = RoutingStats.from_profile(q, policy="lfu-decay")
    assert s.policy == "lfu-decay"
    np.testing.assert_allclose(s.curves, RoutingStats.from_traces(t, policy="lfu-decay").curves, atol=1e-4)
    assert RoutingStats.from_profile(q, policy="lru").policy == "lru"  # from the stack distances
    # a finished run's curves add up in the saved profile
    curve = miss_curve(t, "lfu-decay")
    for _ in range(2):
        record_run(tmp_path / "cache", profile_from_traces(t).counts, top_k=3, num_steps=t.num_steps,
                   curves={"lfu-decay": curve})
    saved = load_profile(tmp_path / "cache" / PROFILE_FILENAME)
    steps, misses = saved.curves["lfu-decay"]
    assert steps == 2 * t.num_steps
    np.testing.assert_allclose(misses, 2 * curve, atol=1e-2)
    with pytest.raises(ValueError, match="no miss curves or stack distances"):
        RoutingStats.from_profile(saved, policy="lru")
    # or the run's whole profile at once
    path = record_profile(tmp_path / "cache", profile_from_traces(t, policies=["lfu-decay"]))
    assert load_profile(path).curves["lfu-decay"][0] == 3 * t.num_steps
    assert load_profile(path).runs == 3


def test_stack_histogram_steps_survive_merges_with_runs_without_one(tmp_path):
    t = random_trace(5, n=100, layers=2, num_experts=8, k=2)
    with_hist = profile_from_traces(t)
    record_run(tmp_path, with_hist.counts, top_k=2, num_steps=100)  # no histogram
    path = record_run(tmp_path, with_hist.counts, top_k=2, num_steps=100, stack_hist=with_hist.stack_hist)
    p = load_profile(path)
    assert (p.num_steps, p.hist_steps) == (200, 100)
    np.testing.assert_allclose(RoutingStats.from_profile(p).curves, RoutingStats.from_traces(t).curves)
