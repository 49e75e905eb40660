"""DeepSeek-V3 (``deepseek_v3``): grouped sigmoid router with a correction bias, latent
attention (MLA), a shared expert, the first ``first_k_dense_replace`` layers dense."""

from ._base import Dims, Family, common_config
from ._shared import GROUPED_SIGMOID_ROUTER


def generated_config(size: Dims) -> dict:
    return {
        **common_config(size),
        "model_type": "deepseek_v3",
        "moe_intermediate_size": size.expert_hidden,
        "n_shared_experts": 1,
        "n_routed_experts": size.experts,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 32,
        "q_lora_rank": 48,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "qk_nope_head_dim": 16,
        "n_group": 2,
        "topk_group": 1,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 1,
    }


FAMILY = Family(
    model_type="deepseek_v3",
    aliases=("kimi_k2",),
    router=GROUPED_SIGMOID_ROUTER,
    num_experts_keys=("n_routed_experts",),
    generated_config=generated_config,
)
