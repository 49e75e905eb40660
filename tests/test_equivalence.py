"""golem's greedy tokens == stock mlx-lm's, for every family and cache size; experts matter."""

from __future__ import annotations

import mlx.core as mx
import pytest

from golem.runtime import load
from golem.runtime.synthetic import FAMILIES
from helpers import greedy_tokens, prompt_tokens, stock

TOP_K, E = 4, 16


@pytest.fixture(scope="module")
def references(checkpoints):
    cache = {}

    def get(family):
        if family not in cache:
            model, tok = stock(checkpoints(family))
            tokens = prompt_tokens(tok)
            cache[family] = (tokens, greedy_tokens(model, tokens))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache_size", [TOP_K, E // 2, E])
def test_greedy_tokens_identical(checkpoints, references, family, cache_size):
    tokens, expected = references(family)
    with load(str(checkpoints(family)), cache_sizes=cache_size) as (model, _):
        got = greedy_tokens(model, tokens)
        stats = model.golem.engine.stats.total()
    assert got == expected
    if cache_size < E:
        assert stats.misses > 0  # the cache really was too small to hold every expert


@pytest.mark.parametrize("family", FAMILIES)
def test_swapping_two_experts_changes_the_text(checkpoints, references, family):
    """The checkpoints give the equivalence tests power: the experts decide the tokens."""
    tokens, expected = references(family)
    model, _ = stock(checkpoints(family))
    from golem.runtime.checkpoint import find_experts_modules

    changed = False
    for em in find_experts_modules(model)[:2]:
        for proj in ("down_proj", "fc2"):
            if proj not in em.module:
                continue
            lin = em.module[proj]
            order = mx.array([1, 0] + list(range(2, lin.weight.shape[0])))
            for name in ("weight", "scales", "biases", "bias"):
                if name in lin and lin[name] is not None:
                    lin[name] = lin[name][order]
        changed = changed or greedy_tokens(model, tokens) != expected
    assert changed


def test_prefill_streams_more_experts_than_slots(checkpoints):
    """A long prompt routes to more distinct experts than a layer has slots."""
    path = checkpoints("qwen3_moe")
    model, tok = stock(path)
    tokens = prompt_tokens(tok, " ".join(["the quick brown fox jumps over the lazy dog"] * 8))
    expected = greedy_tokens(model, tokens, n=8)
    with load(str(path), cache_sizes=TOP_K) as (model, _):
        got = greedy_tokens(model, tokens, n=8)
        pools = model.golem.engine.pools
        assert all(len(p.resident()) <= p.cache_size for p in pools.values())
    assert got == expected


@pytest.mark.parametrize("writer", ["host", "device", "device-load"])
@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_every_slot_writer_identical(checkpoints, references, family, writer):
    """Slots filled through a host view of the pool's memory, or by uploads and MLX slice updates."""
    tokens, expected = references(family)
    with load(str(checkpoints(family)), cache_sizes=TOP_K, slot_writer=writer) as (model, _):
        got = greedy_tokens(model, tokens)
        pools = list(model.golem.engine.pools.values())
        misses = model.golem.engine.stats.total().misses
    assert got == expected
    assert misses > 0
    assert all(p.writer.name == writer for p in pools)


@pytest.mark.parametrize("direct", [True, False])
def test_both_slot_write_paths_identical(checkpoints, references, monkeypatch, direct):
    """The backend's default writer: a host view where the backend gives one, else uploads."""
    import golem.runtime.writers as writers

    if not direct:
        monkeypatch.setattr(writers, "host_view", lambda arr: None)
    tokens, expected = references("gpt_oss")
    with load(str(checkpoints("gpt_oss")), cache_sizes=TOP_K) as (model, _):
        got = greedy_tokens(model, tokens)
        pools = list(model.golem.engine.pools.values())
    assert got == expected
    if not direct:
        assert all(p.writer.name == "device" for p in pools)
    elif mx.default_device() == mx.cpu:
        assert all(p.writer.name == "host" for p in pools)  # the CPU backend shares host memory


@pytest.mark.parametrize("overlap,share,min_nbytes", [(True, 0.0, 0), (True, 0.5, 0), (False, 0.0, 0),
                                                       (True, 0.0, 1 << 30)])
@pytest.mark.parametrize("writer", ["host", "device"])
def test_resident_experts_computed_while_misses_load_identical(checkpoints, references, overlap, share,
                                                               min_nbytes, writer):
    """Splitting a decode step's experts into resident and missing ones changes no token;
    a step splits only when at least ``overlap_share`` of its experts is resident, holding at
    least ``overlap_min_nbytes`` (this checkpoint's experts are a few KiB: none at 1 GiB)."""
    tokens, expected = references("mixtral")
    with load(str(checkpoints("mixtral")), cache_sizes=TOP_K + 1, slot_writer=writer) as (model, _):
        engine = model.golem.engine
        engine.overlap, engine.overlap_share, engine.overlap_min_nbytes = overlap, share, min_nbytes
        fetch, split = engine._fetch, []

        def fetching(layer, todo, meanwhile=None, futures=None):
            if engine._decoding:  # the split's reads run its resident experts meanwhile
                split.append((getattr(meanwhile, "__name__", None) == "meanwhile", len(todo)))
            return fetch(layer, todo, meanwhile, futures)

        engine._fetch = fetching
        got = greedy_tokens(model, tokens)
        stats = engine.stats.total()
    assert got == expected
    assert stats.misses > 0 and stats.hits > 0
    assert any(s for s, _ in split) == (overlap and not min_nbytes)
    assert all(TOP_K - misses >= share * TOP_K for s, misses in split if s)
