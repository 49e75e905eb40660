"""The trace simulator against a few lines of reference LRU, Belady against brute force, and
the policies' contract (never evict a protected expert, never exceed the cache size)."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import pytest

from golem.runtime.policies import (
    DEFAULT_POLICY,
    SCAN_UP_TO,
    LRUPolicy,
    Policy,
    make_policy,
    parse_policy_spec,
    policy_names,
)
from golem.runtime.analysis.simulate import belady, lru_misses, simulate, stack_distance_histogram
from golem.runtime.trace import load_trace

from trace_factory import make_trace, random_trace


def reference_lru(experts: np.ndarray, cache_size: int) -> int:
    """Plain per-layer LRU, the step's distinct experts in ascending order, never evicting
    one of the step's own experts."""
    misses = 0
    for position in range(experts.shape[1]):
        cache = OrderedDict()
        for row in experts[:, position]:
            step = sorted({int(e) for e in row if e >= 0})
            for e in step:
                if e in cache:
                    cache.move_to_end(e)
                    continue
                misses += 1
                if len(cache) >= cache_size:
                    del cache[next(x for x in cache if x not in step)]
                cache[e] = None
    return misses


@pytest.fixture(scope="module")
def olmoe(olmoe_traces):
    """The first 1,500 steps of each OLMoE trace (fast, and still 12 sequences each)."""
    out = []
    for name in ("general", "coding"):
        t = load_trace(olmoe_traces / f"{name}.npz")
        out.append(make_trace(t.experts[:1500], t.num_experts, seq_offsets=np.arange(0, 1501, 125)))
    return out


@pytest.mark.parametrize("cache_size", [8, 16, 32, 48])
def test_lru_matches_reference_on_olmoe(olmoe, cache_size):
    both = np.concatenate([t.experts for t in olmoe])
    result = simulate(olmoe, policy="lru", cache_size=cache_size)
    assert result.total_misses == reference_lru(both, cache_size)
    assert result.total_requests == both.size
    assert result.total_hits + result.total_misses == result.total_requests


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lru_matches_reference_with_holes_and_repeats(seed):
    t = random_trace(seed, holes=True)
    for cache_size in (3, 5, 9):
        r = simulate(t, policy="lru", cache_size=cache_size)
        assert r.total_misses == reference_lru(t.experts, cache_size)
        distinct = sum(len({e for e in row if e >= 0}) for row in t.experts.reshape(-1, t.top_k))
        assert r.total_requests == distinct


def test_stack_distances_give_lru_at_every_capacity(olmoe):
    t = olmoe[0]
    curve = lru_misses(stack_distance_histogram(t))
    for cache_size in range(t.top_k, t.num_experts + 1, 4):
        per_layer = simulate(t, policy="lru", cache_size=cache_size).misses
        np.testing.assert_array_equal(curve[:, cache_size], per_layer)


def test_stack_distances_with_holes():
    t = random_trace(5, holes=True)
    curve = lru_misses(stack_distance_histogram(t))
    for cache_size in range(3, 13):
        np.testing.assert_array_equal(curve[:, cache_size], simulate(t, policy="lru", cache_size=cache_size).misses)


def _optimal_misses(experts: np.ndarray, cache_size: int) -> int:
    """Fewest misses of any eviction choice (exhaustive search), one layer."""
    steps = [frozenset(int(e) for e in row if e >= 0) for row in experts]

    @lru_cache(maxsize=None)
    def best(t: int, resident: frozenset) -> int:
        if t == len(steps):
            return 0
        step = steps[t]
        missing = step - resident
        over = len(resident) + len(missing) - cache_size
        if over <= 0:
            return len(missing) + best(t + 1, resident | step)
        choices = itertools.combinations(sorted(resident - step), over)
        return len(missing) + min(best(t + 1, (resident - set(c)) | step) for c in choices)

    return best(0, frozenset())


@pytest.mark.parametrize("seed", range(6))
def test_belady_is_the_optimum_on_tiny_traces(seed):
    rng = np.random.default_rng(seed)
    ex = np.stack([rng.choice(6, 2, replace=False) for _ in range(14)])[:, None, :]
    t = make_trace(ex, 6)
    for cache_size in (2, 3, 4):
        assert belady(t, cache_size).total_misses == _optimal_misses(ex[:, 0], cache_size)


@pytest.mark.parametrize("cache_size", [16, 32, 48])
def test_belady_bounds_every_policy(olmoe, cache_size):
    bound = belady(olmoe, cache_size).total_misses
    for name in policy_names():
        assert bound <= simulate(olmoe, policy=name, cache_size=cache_size).total_misses, name


def test_belady_bounds_with_warm_start_and_pinned_layers():
    t = random_trace(3, layers=4)
    warm = {0: [1, 2, 3], 2: [4, 5, 6, 7, 8]}
    for cache_size in (3, [4, 5, 6, 7]):
        kw = dict(cache_size=cache_size, pinned=[1], warm=warm)
        bound = belady(t, **kw)
        assert bound.misses[1] == 0
        for name in policy_names():
            r = simulate(t, policy=name, **kw)
            assert (bound.misses <= r.misses).all(), name


class SpyPolicy(LRUPolicy):
    """LRU that checks the owner's side of the protocol."""

    def __init__(self, cache_size):
        super().__init__()
        self.cache_size = cache_size
        self.victims = []

    def insert(self, expert):
        assert expert not in self._order
        super().insert(expert)
        assert len(self._order) <= self.cache_size

    def victim(self, protected=()):
        v = super().victim(protected)
        assert v not in protected
        self.victims.append((v, tuple(protected)))
        return v


def test_replay_never_evicts_the_steps_own_experts():
    t = random_trace(7, n=400, layers=1, num_experts=10, k=4)
    spies = []

    def factory():
        spies.append(SpyPolicy(4))
        return spies[-1]

    simulate(t, policy=factory, cache_size=4)
    assert spies[0].victims  # evictions happened, each checked
    for v, protected in spies[0].victims:
        assert len(protected) <= 4


@pytest.mark.parametrize("name", policy_names())
def test_every_policy_refuses_when_all_are_protected(name):
    p = make_policy(name)
    for e in (1, 2, 3):
        p.insert(e)
    p.tick()
    p.hit(2)
    assert p.victim(protected={1, 3}) == 2
    with pytest.raises(LookupError):
        p.victim(protected={1, 2, 3})


def test_prefetch_recall_moves_misses_to_prefetched():
    t = random_trace(1)
    base = simulate(t, policy="lru", cache_size=5)
    assert base.total_prefetched == 0
    full = simulate(t, policy="lru", cache_size=5, prefetch_recall=1.0)
    assert full.total_misses == 0 and full.total_prefetched == base.total_misses
    half = simulate(t, policy="lru", cache_size=5, prefetch_recall=0.5, seed=3)
    again = simulate(t, policy="lru", cache_size=5, prefetch_recall=0.5, seed=3)
    other = simulate(t, policy="lru", cache_size=5, prefetch_recall=0.5, seed=4)
    assert half.total_misses + half.total_prefetched == base.total_misses
    np.testing.assert_array_equal(half.step_misses, again.step_misses)
    assert not np.array_equal(half.step_misses, other.step_misses)
    assert 0.35 < half.total_prefetched / base.total_misses < 0.65
    np.testing.assert_array_equal(half.step_misses + half.step_prefetched, base.step_misses)


def test_step_misses_add_up():
    t = random_trace(2)
    r = simulate(t, policy="lfu-decay", cache_size=5)
    assert r.step_misses.shape == (t.num_steps, t.num_layers)
    np.testing.assert_array_equal(r.step_misses.sum(axis=0), r.misses)
    assert r.misses_per_step.sum() == r.total_misses
    assert r.to_dict()["misses"] == r.total_misses


def test_pinned_layers_never_miss_and_count_as_hits():
    t = random_trace(4)
    r = simulate(t, policy="lru", cache_size=3, pinned=[0, 2])
    assert r.misses[0] == r.misses[2] == 0 and r.misses[1] > 0
    assert r.hits[0] == r.requests[0]
    assert r.cache_sizes == (12, 3, 12)
    assert r.to_dict()["pinned_layers"] == [0, 2]


def test_warm_start_is_inserted_in_order_and_cut_to_capacity():
    t = make_trace(np.array([[[2, 3]], [[0, 1]], [[4, 5]]]), 8)
    assert simulate(t, policy="lru", cache_size=2).step_misses[:, 0].tolist() == [2, 2, 2]
    assert simulate(t, policy="lru", cache_size=2, warm={0: [2, 3]}).step_misses[:, 0].tolist() == [0, 2, 2]
    # only the last `cache_size` entries stay
    assert simulate(t, policy="lru", cache_size=2, warm={0: [0, 1, 2, 3]}).step_misses[:, 0].tolist() == [0, 2, 2]
    assert simulate(t, policy="lru", cache_size=2, warm={0: [2, 3, 0, 1]}).step_misses[:, 0].tolist() == [2, 2, 2]
    # the last inserted is the most recent: LRU keeps 4 only when it came last
    t = make_trace(np.array([[[2, 3]], [[4, 5]]]), 8)
    assert simulate(t, policy="lru", cache_size=3, warm={0: [4, 6, 7]}).step_misses[:, 0].tolist() == [2, 2]
    assert simulate(t, policy="lru", cache_size=3, warm={0: [6, 7, 4]}).step_misses[:, 0].tolist() == [2, 1]


def test_caches_persist_across_traces_and_sequences():
    a, b = random_trace(8), random_trace(9)
    both = make_trace(np.concatenate([a.experts, b.experts]), 12, seq_offsets=[0, 150, 300, 600])
    for name in policy_names():
        np.testing.assert_array_equal(
            simulate([a, b], policy=name, cache_size=4).step_misses,
            simulate(both, policy=name, cache_size=4).step_misses,
        )
    np.testing.assert_array_equal(belady([a, b], 4).step_misses, belady(both, 4).step_misses)


def test_decode_only_leaves_prefill_out():
    ex = np.array([[[0, 1]], [[2, 3]], [[0, 1]]])
    t = make_trace(ex, 4, prefill=[True, False, False])
    assert simulate(t, policy="lru", cache_size=2).total_requests == 4
    assert simulate(t, policy="lru", cache_size=2, decode_only=False).total_requests == 6


def test_per_layer_capacity():
    t = random_trace(6)
    r = simulate(t, policy="lru", cache_size=[3, 6, 12])
    for position, cache_size in enumerate((3, 6, 12)):
        alone = make_trace(t.experts[:, position:position + 1], 12)
        assert r.misses[position] == simulate(alone, policy="lru", cache_size=cache_size).total_misses
    assert r.cache_size == [3, 6, 12]
    assert simulate(t, policy="lru", cache_size=100).cache_sizes == (12, 12, 12)


def test_bad_arguments_are_named():
    t = random_trace(0)
    with pytest.raises(ValueError, match="cache_size 2 of layer 0 is below the 3"):
        simulate(t, policy="lru", cache_size=2)
    with pytest.raises(ValueError, match="2 per-layer values for 3 layers"):
        simulate(t, policy="lru", cache_size=[4, 4])
    with pytest.raises(ValueError, match="unknown policy 'mru'"):
        simulate(t, policy="mru")
    with pytest.raises(ValueError, match="expert 99"):
        simulate(t, policy="lru", cache_size=4, warm={0: [99]})
    with pytest.raises(ValueError, match="layer 7"):
        simulate(t, policy="lru", cache_size=4, warm={7: [1]})
    with pytest.raises(ValueError, match="prefetch_recall"):
        simulate(t, prefetch_recall=1.5)
    with pytest.raises(ValueError, match="pinned layers"):
        simulate(t, policy="lru", cache_size=4, pinned=[3])
    other = make_trace(np.zeros((4, 2, 3), np.int16) + np.arange(3), 12)
    with pytest.raises(ValueError, match="layers"):
        simulate([t, other], cache_size=4)


def test_policy_specs():
    assert parse_policy_spec("lfu-decay:decay=0.8") == ("lfu-decay", {"decay": 0.8})
    assert parse_policy_spec("lru-k:k=3") == ("lru-k", {"k": 3})
    assert make_policy("lfu-decay:decay=0.8").decay == 0.8
    assert make_policy("lru-k", k=3).k == 3
    assert DEFAULT_POLICY in policy_names()
    with pytest.raises(ValueError, match="does not take"):
        make_policy("lru:decay=0.5")
    with pytest.raises(ValueError, match="needs a number"):
        make_policy("lfu-decay:decay=high")
    with pytest.raises(ValueError, match="decay must be in"):
        make_policy("lfu-decay:decay=1.5")


@pytest.mark.parametrize("name", policy_names())
def test_a_landed_prefetch_goes_first_until_its_first_use(name):
    p = make_policy(name)
    for e in (1, 2, 3):
        p.insert(e)
    p.tick()
    p.insert_cold(4)  # a guess: no use yet, first in line
    assert p.victim() == 4
    assert p.victim(protected={4}) == 1
    p.hit(4)  # its first use: from now on an expert like any other
    assert p.victim() == 1


def test_lru_k_prefers_experts_used_twice():
    p = make_policy("lru-k:k=2")
    for e in (1, 2, 3):
        p.insert(e)
    p.hit(1)  # 1 has two uses; 2 and 3 one each: 2 is the oldest of those
    assert p.victim() == 2
    p.hit(2)
    p.hit(3)  # now all have two uses; 1's second-last use is the oldest
    assert p.victim() == 1


def test_lfu_decay_forgets():
    p = make_policy("lfu-decay:decay=0.5")
    p.insert(1)
    for _ in range(3):
        p.hit(1)  # 4 old uses of 1
    p.insert(2)
    assert p.victim() == 2
    for _ in range(6):
        p.tick()
    p.hit(2)  # one recent use outweighs four decayed by 0.5**6
    assert p.victim() == 1


def test_full_replay_is_fast(olmoe):
    """A sanity bound, loose on purpose: 3,000 steps x 16 layers well under a few seconds."""
    import time

    t0 = time.perf_counter()
    simulate(olmoe, policy="lru", cache_size=16)
    assert time.perf_counter() - t0 < 10.0


class _Base(Policy):
    pass


def test_base_policy_is_abstract():
    with pytest.raises(NotImplementedError):
        _Base().insert(1)


class _ScanLFU:
    """LFU (with decay when given) by brute force: recency is a list, oldest first, and the
    victim is the unprotected expert of the lowest (count, place in that list). The
    reference the heap-based policies must equal."""

    def __init__(self, decay=None):
        self.decay, self.scale, self.counts, self.order = decay, 1.0, {}, []

    def insert(self, e, cold=False):
        if e in self.order:
            self.order.remove(e)
        if cold:
            self.counts.setdefault(e, 0.0)
            self.order.insert(0, e)  # next in line
        else:
            self.hit(e)

    def hit(self, e):
        self.counts[e] = self.counts.get(e, 0.0) + self.scale
        if e in self.order:
            self.order.remove(e)
        self.order.append(e)

    def evict(self, e):
        self.order.remove(e)

    def tick(self):
        self.scale = self.scale / self.decay if self.decay else 1.0
        if self.scale > 1e12:
            self.counts = {e: c / self.scale for e, c in self.counts.items()}
            self.scale = 1.0

    def victim(self, protected):
        left = [e for e in self.order if e not in protected]
        if not left:
            raise LookupError
        return min(left, key=lambda e: (self.counts[e], self.order.index(e)))


@pytest.mark.parametrize("spec,decay", [("lfu", None), ("lfu-decay:decay=0.5", 0.5), ("lfu-decay", 0.95)])
@pytest.mark.parametrize("cache_size", [12, SCAN_UP_TO + 8])
def test_lfu_heap_chooses_the_victims_a_scan_does(spec, decay, cache_size):
    """lfu and lfu-decay evict exactly what a scan of the resident experts in recency order
    would, by their own scan and past ``SCAN_UP_TO`` experts by their heap, through the
    pool's protocol with cold inserts (prefetches, and guesses kept from eviction),
    re-inserts of evicted experts and, at decay 0.5, the counts' rescaling every 40 steps."""
    rng = np.random.default_rng(cache_size)
    policy, scan = make_policy(spec), _ScanLFU(decay)
    resident, experts, k = set(), cache_size + 12, 3
    victims = 0
    for step in range(600):
        policy.tick(), scan.tick()
        needed = sorted(rng.choice(experts, k, replace=False).tolist())
        for e in needed:
            if e in resident:
                policy.hit(e), scan.hit(e)
                continue
            if len(resident) == cache_size:
                v = policy.victim(set(needed))
                assert v == scan.victim(set(needed)), (step, e)
                policy.evict(v), scan.evict(v)
                resident.discard(v)
                victims += 1
            policy.insert(e), scan.insert(e)
            resident.add(e)
        for e in rng.choice(experts, 2, replace=False).tolist():  # prefetches landing, cold
            if e in resident:
                continue
            keep = set(rng.choice(experts, 4, replace=False).tolist())
            if len(resident) == cache_size:
                try:
                    v = policy.victim(keep)
                except LookupError:
                    with pytest.raises(LookupError):
                        scan.victim(keep)
                    continue
                assert v == scan.victim(keep), (step, e)
                policy.evict(v), scan.evict(v)
                resident.discard(v)
            policy.insert_cold(e), scan.insert(e, cold=True)
            resident.add(e)
    assert victims > 300


@pytest.mark.parametrize("name", policy_names())
@pytest.mark.parametrize("cache_size", [4, 7])
def test_a_live_pool_misses_what_the_simulator_misses(name, cache_size):
    """A slot pool admits each step's misses in one pass (``SlotPool.admit``); it must follow
    the step protocol the simulator replays: the same misses at every step, for every policy,
    and a table whose two directions agree."""
    from golem.runtime.slots import SlotPool

    rng = np.random.default_rng(cache_size)
    p = rng.dirichlet(np.full(16, 0.5))
    ex = np.stack([[rng.choice(16, 4, replace=False, p=p)] for _ in range(300)])
    want = simulate(make_trace(ex, 16), policy=name, cache_size=cache_size).step_misses[:, 0]
    pool = SlotPool(0, 16, cache_size, [], policy=name)
    got = []
    for step in ex[:, 0]:
        pool.policy.tick()
        needed = sorted(set(step.tolist()))
        hits, misses, evicted = pool.admit(needed)
        assert sorted(hits + [e for e, _ in misses]) == needed and not set(evicted) & set(needed)
        assert all(pool.slot_of[e] == slot and pool.expert_in[slot] == e for e, slot in misses)
        resident = pool.expert_in[pool.expert_in >= 0]
        assert len(set(resident.tolist())) == len(resident) and (pool.slot_of[resident] >= 0).all()
        got.append(len(misses))
    assert got == want.tolist()
    assert pool.stats.evictions == sum(got) - cache_size
