"""Router adapters reproduce each family's own routing exactly, on models built in memory."""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from golem.predictors import families
from golem.predictors.routers import find_moe_blocks, router_for, router_types

HIDDEN, LAYERS, EXPERTS, TOP_K = 32, 3, 16, 4


def _common() -> dict:
    return {
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "intermediate_size": 2 * HIDDEN,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": HIDDEN // 4,
        "rms_norm_eps": 1e-6,
        "vocab_size": 64,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "num_experts_per_tok": TOP_K,
    }


_LINEAR = {
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 2,
}

CONFIGS = {
    "qwen3_moe": {
        **_common(), "model_type": "qwen3_moe", "num_experts": EXPERTS, "decoder_sparse_step": 1,
        "mlp_only_layers": [0], "moe_intermediate_size": 16, "norm_topk_prob": True,
    },
    "qwen3_next": {
        **_common(), **_LINEAR, "model_type": "qwen3_next", "num_experts": EXPERTS, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
        "partial_rotary_factor": 0.25, "norm_topk_prob": False,
    },
    "qwen3_5_moe": {
        "model_type": "qwen3_5_moe", "tie_word_embeddings": False,
        "text_config": {
            **_common(), **_LINEAR, "model_type": "qwen3_5_moe_text", "num_experts": EXPERTS,
            "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "norm_topk_prob": True,
        },
    },
    "glm4_moe": {
        **_common(), "model_type": "glm4_moe", "moe_intermediate_size": 16, "norm_topk_prob": True,
        "n_group": 4, "topk_group": 2, "n_shared_experts": 1, "n_routed_experts": EXPERTS,
        "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "rope_scaling": None, "use_qk_norm": True,
        "attention_bias": False, "partial_rotary_factor": 0.5,
    },
    "deepseek_v3": {
        **_common(), "model_type": "deepseek_v3", "moe_intermediate_size": 16, "n_shared_experts": 1,
        "n_routed_experts": EXPERTS, "routed_scaling_factor": 2.5, "kv_lora_rank": 16, "q_lora_rank": 24,
        "qk_rope_head_dim": 8, "v_head_dim": 8, "qk_nope_head_dim": 8, "n_group": 4, "topk_group": 2,
        "moe_layer_freq": 1, "first_k_dense_replace": 1,
    },
    "minimax": {
        **_common(), "model_type": "minimax", "num_local_experts": EXPERTS, "shared_intermediate_size": 0,
        "rotary_dim": HIDDEN // 8, "use_qk_norm": True,
    },
    "mixtral": {
        **{k: v for k, v in _common().items() if k != "head_dim"}, "model_type": "mixtral",
        "num_local_experts": EXPERTS, "intermediate_size": 16,
    },
    "olmoe": {
        **_common(), "model_type": "olmoe", "num_experts": EXPERTS, "intermediate_size": 16,
        "norm_topk_prob": False,
    },
    "gpt_oss": {
        **_common(), "model_type": "gpt_oss", "num_local_experts": EXPERTS, "intermediate_size": 16,
        "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "rope_theta": 150000,
    },
}

# Decoder layers that are dense in each config above.
DENSE = {"qwen3_moe": [0], "glm4_moe": [0], "deepseek_v3": [0]}


def build_model(family: str, seed: int = 0) -> nn.Module:
    """A tiny model of ``family`` with sharp, varied routers (and correction biases)."""
    config = copy.deepcopy(CONFIGS[family])
    model_cls, args_cls = families.family(config["model_type"]).model_classes()
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if leaf in ("gate", "router") and "weight" in module:
            module.weight = mx.random.normal(module.weight.shape) * 0.5
        if "e_score_correction_bias" in module:
            module.e_score_correction_bias = mx.random.normal(module.e_score_correction_bias.shape) * 0.3
    mx.eval(model.parameters())
    return model


class _Probe(nn.Module):
    """Stands in for a block's experts: records the ids and returns basis vectors, so the
    block's output row j is the weight the block gave its j-th chosen expert."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.seen = []

    def __call__(self, x, indices):
        self.seen.append(indices)
        k = indices.shape[-1]
        basis = mx.eye(k, self.width, dtype=mx.float32)
        return mx.broadcast_to(basis, (*indices.shape, self.width))


def _silence_shared_experts(block: nn.Module) -> None:
    for name in ("shared_experts", "shared_expert"):
        if name in block:
            shared = block[name]
            shared.down_proj.weight = mx.zeros_like(shared.down_proj.weight)


def _own_routing(moe, x):
    """Run the block itself with probed experts: its own ids and weights."""
    block = moe.block
    original = block[moe.experts_attr]
    probe = _Probe(x.shape[-1])
    setattr(block, moe.experts_attr, probe)
    try:
        y = block(x)
        inds = probe.seen[-1]
        k = inds.shape[-1]
        weights = y[..., :k]
        mx.eval(inds, weights)
        return np.array(inds).reshape(-1, k), np.array(weights.astype(mx.float32)).reshape(-1, k)
    finally:
        setattr(block, moe.experts_attr, original)


def test_every_family_has_an_adapter():
    assert set(CONFIGS) <= set(router_types())
    with pytest.raises(ValueError, match="no router adapter for model type 'llama'"):
        router_for("llama")


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_adapter_reproduces_block_routing(family):
    model = build_model(family)
    blocks = find_moe_blocks(model)
    dense = DENSE.get(family, [])
    assert [b.model_layer for b in blocks] == [i for i in range(LAYERS) if i not in dense]
    assert [b.position for b in blocks] == list(range(len(blocks)))
    for b in blocks:
        assert b.num_experts == EXPERTS and b.top_k == TOP_K
        _silence_shared_experts(b.block)
        x = mx.random.normal((1, 48, HIDDEN), key=mx.random.key(b.model_layer + 7))
        own_ids, own_w = _own_routing(b, x)
        inds, scores = b.route(x)
        assert inds.shape == (1, 48, TOP_K) and scores.shape == (1, 48, TOP_K)
        ids = np.array(inds).reshape(-1, TOP_K)
        w = np.array(scores.astype(mx.float32)).reshape(-1, TOP_K)
        distinct = 0
        for t in range(ids.shape[0]):
            assert set(ids[t]) == set(own_ids[t]), f"{family} layer {b.model_layer} token {t}"
            mine = dict(zip(ids[t].tolist(), w[t].tolist()))
            theirs = dict(zip(own_ids[t].tolist(), own_w[t].tolist()))
            for e in mine:
                assert mine[e] == pytest.approx(theirs[e], rel=1e-5, abs=1e-6)
            distinct += len(set(ids[t]))
        # routing is not trivial: tokens go to different experts
        assert len(np.unique(ids)) > TOP_K
        # the ranking quantity's top-k is the routed set
        sel = np.array(b.selection_scores(x).astype(mx.float32)).reshape(-1, EXPERTS)
        top = np.argsort(-sel, axis=-1, kind="stable")[:, :TOP_K]
        for t in range(ids.shape[0]):
            assert set(top[t]) == set(ids[t])


def test_grouped_routers_use_groups_and_bias():
    """glm4_moe / deepseek_v3 fixtures really exercise group limits and the correction bias."""
    for family in ("glm4_moe", "deepseek_v3"):
        model = build_model(family)
        b = find_moe_blocks(model)[0]
        gate = b.block.gate
        assert gate.n_group == 4 and gate.topk_group == 2
        assert float(mx.abs(gate.e_score_correction_bias).sum()) > 0
        x = mx.random.normal((1, 64, HIDDEN), key=mx.random.key(3))
        ids = np.array(b.route(x)[0]).reshape(-1, TOP_K)
        group = EXPERTS // 4
        # at most topk_group groups per token, and some token's choice differs from a plain
        # top-k of the biased sigmoid (the group limit mattered)
        assert all(len({e // group for e in row}) <= 2 for row in ids)
        logits = np.array(x.reshape(-1, HIDDEN) @ gate.weight.T)
        plain = 1 / (1 + np.exp(-logits)) + np.array(gate.e_score_correction_bias)
        plain_top = np.argsort(-plain, axis=-1)[:, :TOP_K]
        assert any(set(plain_top[t]) != set(ids[t]) for t in range(ids.shape[0]))


def test_find_moe_blocks_sees_replaced_experts_and_rejects_dense_models():
    model = build_model("olmoe")
    blocks = find_moe_blocks(model)
    blocks[0].block.switch_mlp = _Probe(HIDDEN)
    assert len(find_moe_blocks(model)) == len(blocks)

    class Dense(nn.Module):
        model_type = "olmoe"

        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(2, 2)]

    with pytest.raises(ValueError, match="no MoE layers"):
        find_moe_blocks(Dense())
