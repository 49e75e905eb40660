"""Qwen3.5 MoE (``qwen3_5_moe``): the Qwen3-Next decoder inside a multimodal config; the
language model's settings live in ``text_config`` (model type ``qwen3_5_moe_text``)."""

from ._base import Dims, Family, common_config
from ._shared import SOFTMAX_TOPK_ROUTER, gated_delta_config


def generated_config(size: Dims) -> dict:
    text = {
        **common_config(size),
        **gated_delta_config(size),
        "model_type": "qwen3_5_moe_text",
        "num_experts": size.experts,
        "norm_topk_prob": True,
    }
    return {"model_type": "qwen3_5_moe", "text_config": text, "tie_word_embeddings": False}


FAMILY = Family(
    model_type="qwen3_5_moe",
    aliases=("qwen3_5_moe_text",),
    router=SOFTMAX_TOPK_ROUTER,
    generated_config=generated_config,
)
