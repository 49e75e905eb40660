"""MiniMax-M2 (``minimax``): sigmoid router in ``block_sparse_moe``; a correction bias that
chooses but does not weigh."""

from typing import Tuple

import mlx.core as mx
import mlx.nn as nn

from ._base import Dims, Family, RouterAdapter, common_config


def _route(block: nn.Module, x: mx.array) -> Tuple[mx.array, mx.array]:
    # Sigmoid, correction bias for the choice only, renormalised original scores.
    orig = mx.sigmoid(block.gate(x.astype(mx.float32)))
    biased = orig + block.e_score_correction_bias
    k = block.num_experts_per_tok
    inds = mx.stop_gradient(mx.argpartition(-biased, kth=k - 1, axis=-1)[..., :k])
    scores = mx.take_along_axis(orig, inds, axis=-1)
    scores = scores / (mx.sum(scores, axis=-1, keepdims=True) + 1e-20)
    return inds, scores.astype(x.dtype)


def _scores(block: nn.Module, x: mx.array) -> mx.array:
    return mx.sigmoid(block.gate(x.astype(mx.float32))) + block.e_score_correction_bias


def generated_config(size: Dims) -> dict:
    return {
        **common_config(size),
        "model_type": "minimax",
        "num_local_experts": size.experts,
        "shared_intermediate_size": 0,
        "rotary_dim": size.hidden // 8,
        "use_qk_norm": True,
    }


FAMILY = Family(
    model_type="minimax",
    aliases=("minimax_m2",),
    router=RouterAdapter(
        block_attr="block_sparse_moe",
        experts_attr="switch_mlp",
        route=_route,
        selection_scores=_scores,
        num_experts=lambda b: int(b.e_score_correction_bias.shape[0]),
        top_k=lambda b: int(b.num_experts_per_tok),
    ),
    num_experts_keys=("num_local_experts",),
    generated_config=generated_config,
)
