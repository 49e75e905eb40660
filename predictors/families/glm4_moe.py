"""GLM-4.5 / 4.6 MoE (``glm4_moe``): grouped sigmoid router with a correction bias, a shared
expert, the first ``first_k_dense_replace`` layers dense."""

from ._base import Dims, Family, common_config
from ._shared import GROUPED_SIGMOID_ROUTER


def generated_config(size: Dims) -> dict:
    return {
        **common_config(size),
        "model_type": "glm4_moe",
        "moe_intermediate_size": size.expert_hidden,
        "norm_topk_prob": True,
        "n_group": 2,
        "topk_group": 1,
        "n_shared_experts": 1,
        "n_routed_experts": size.experts,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "rope_scaling": None,
        "use_qk_norm": True,
        "attention_bias": False,
        "partial_rotary_factor": 0.5,
    }


FAMILY = Family(
    model_type="glm4_moe",
    router=GROUPED_SIGMOID_ROUTER,
    num_experts_keys=("n_routed_experts",),
    generated_config=generated_config,
)
