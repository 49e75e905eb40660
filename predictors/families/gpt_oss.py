"""gpt-oss (``gpt_oss``): ``mlp.router`` logits, top-k then softmax; experts with biases in
``mlp.experts``, mxfp4 in released checkpoints."""

from typing import Tuple

import mlx.core as mx
import mlx.nn as nn

from ._base import Dims, Family, RouterAdapter, common_config


def _route(block: nn.Module, x: mx.array) -> Tuple[mx.array, mx.array]:
    g = block.router(x)
    k = block.num_experts_per_tok
    inds = mx.stop_gradient(mx.argpartition(g, kth=-k, axis=-1)[..., -k:])
    scores = mx.softmax(mx.take_along_axis(g, inds, axis=-1), axis=-1, precise=True)
    return inds, scores


def _router_logits(block: nn.Module, x: mx.array) -> mx.array:
    return block.router(x)


def generated_config(size: Dims) -> dict:
    return {
        **common_config(size),
        "model_type": "gpt_oss",
        "num_local_experts": size.experts,
        "intermediate_size": size.expert_hidden,
        "sliding_window": 64,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(size.layers)],
        "rope_theta": 150000,
    }


def generated_quantization(size: Dims) -> dict:
    # mxfp4, as released; its group size is fixed at 32.
    return {"group_size": 32, "bits": 4, "mode": "mxfp4"}


FAMILY = Family(
    model_type="gpt_oss",
    router=RouterAdapter(
        block_attr="mlp",
        experts_attr="experts",
        route=_route,
        selection_scores=_router_logits,
        num_experts=lambda b: int(b.num_local_experts),
        top_k=lambda b: int(b.num_experts_per_tok),
    ),
    top_k_keys=("num_experts_per_tok", "experts_per_token"),  # the latter: OpenAI's own config name
    num_experts_keys=("num_local_experts",),
    generated_config=generated_config,
    generated_quantization=generated_quantization,
)
