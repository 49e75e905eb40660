"""Qwen3 MoE (``qwen3_moe``): softmax top-k router in ``mlp``, dense layers listed in
``mlp_only_layers``."""

from ._base import Dims, Family, common_config
from ._shared import SOFTMAX_TOPK_ROUTER


def generated_config(size: Dims) -> dict:
    return {
        **common_config(size),
        "model_type": "qwen3_moe",
        "num_experts": size.experts,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],  # one dense layer: dense layers must stay resident
        "moe_intermediate_size": size.expert_hidden,
        "norm_topk_prob": True,
    }


FAMILY = Family(model_type="qwen3_moe", router=SOFTMAX_TOPK_ROUTER, generated_config=generated_config)
