"""Memory stays where the cache says: with E/8 slots, below half of stock mlx-lm's peak."""

from __future__ import annotations

import gc

import mlx.core as mx
import pytest

from golem.runtime import load
from golem.runtime.synthetic import Size, build_checkpoint
from helpers import greedy_tokens, prompt_tokens, stock


@pytest.fixture(scope="module")
def expert_heavy(tmp_path_factory):
    size = Size(hidden=128, layers=4, experts=32, top_k=4, expert_hidden=512, vocab=384, group_size=64)
    return build_checkpoint("qwen3_moe", tmp_path_factory.mktemp("heavy") / "m", size=size)


def _peak_bytes(fn):
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    result = fn()
    return mx.get_peak_memory(), result


def test_peak_memory_with_an_eighth_of_the_experts(expert_heavy):
    def run_stock():
        model, tok = stock(expert_heavy)
        return greedy_tokens(model, prompt_tokens(tok), n=8)

    def run_golem():
        with load(str(expert_heavy), cache_sizes=4) as (model, tok):
            runtime = model.golem
            out = greedy_tokens(model, prompt_tokens(tok), n=8)
            return out, runtime.index.total_nbytes(), sum(p.nbytes for p in runtime.engine.pools.values())

    stock_peak, expected = _peak_bytes(run_stock)
    golem_peak, (got, expert_nbytes, cache_nbytes) = _peak_bytes(run_golem)
    assert got == expected
    assert cache_nbytes * 8 == expert_nbytes
    assert golem_peak < stock_peak / 2, (golem_peak, stock_peak)
