"""Qwen3-Next (``qwen3_next``): softmax top-k router in ``mlp``, gated-delta linear attention
every other layer, a shared expert."""

from ._base import Dims, Family, common_config
from ._shared import SOFTMAX_TOPK_ROUTER, gated_delta_config


def generated_config(size: Dims) -> dict:
    return {
        **common_config(size),
        **gated_delta_config(size),
        "model_type": "qwen3_next",
        "num_experts": size.experts,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "partial_rotary_factor": 0.25,
        "norm_topk_prob": True,
    }


FAMILY = Family(model_type="qwen3_next", router=SOFTMAX_TOPK_ROUTER, generated_config=generated_config)
