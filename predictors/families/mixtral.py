"""Mixtral (``mixtral``): top-k of the router logits in ``block_sparse_moe``, then a softmax
over the chosen k."""

from typing import Tuple

import mlx.core as mx
import mlx.nn as nn

from ._base import Dims, Family, RouterAdapter, common_config
from ._shared import gate_logits


def _route(block: nn.Module, x: mx.array) -> Tuple[mx.array, mx.array]:
    gates = block.gate(x)
    k = block.num_experts_per_tok
    inds = mx.stop_gradient(mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k])
    scores = mx.softmax(mx.take_along_axis(gates, inds, axis=-1), axis=-1, precise=True)
    return inds, scores


def generated_config(size: Dims) -> dict:
    c = common_config(size)
    c.pop("head_dim")
    return {
        **c,
        "model_type": "mixtral",
        "num_local_experts": size.experts,
        "intermediate_size": size.expert_hidden,
    }


FAMILY = Family(
    model_type="mixtral",
    router=RouterAdapter(
        block_attr="block_sparse_moe",
        experts_attr="switch_mlp",
        route=_route,
        selection_scores=gate_logits,
        num_experts=lambda b: int(b.num_experts),
        top_k=lambda b: int(b.num_experts_per_tok),
    ),
    num_experts_keys=("num_local_experts",),
    generated_config=generated_config,
)
