"""OLMoE (``olmoe``): softmax over all experts in ``mlp``, top-k on the flattened tokens."""

from typing import Tuple

import mlx.core as mx
import mlx.nn as nn

from ._base import Dims, Family, RouterAdapter, common_config
from ._shared import gate_logits


def _route(block: nn.Module, x: mx.array) -> Tuple[mx.array, mx.array]:
    lead = x.shape[:-1]
    x_flat = x.reshape(-1, x.shape[-1])
    weights = mx.softmax(block.gate(x_flat), axis=1, precise=True)
    k = block.top_k
    inds = mx.stop_gradient(mx.argpartition(-weights, kth=k - 1, axis=-1)[..., :k])
    scores = mx.take_along_axis(weights, inds, axis=-1)
    if block.norm_topk_prob:
        scores = scores / scores.sum(axis=-1, keepdims=True)
    return inds.reshape(*lead, k), scores.reshape(*lead, k)


def generated_config(size: Dims) -> dict:
    return {
        **common_config(size),
        "model_type": "olmoe",
        "num_experts": size.experts,
        "intermediate_size": size.expert_hidden,
        "norm_topk_prob": False,
    }


FAMILY = Family(
    model_type="olmoe",
    router=RouterAdapter(
        block_attr="mlp",
        experts_attr="switch_mlp",
        route=_route,
        selection_scores=gate_logits,
        num_experts=lambda b: int(b.num_experts),
        top_k=lambda b: int(b.top_k),
    ),
    generated_config=generated_config,
)
