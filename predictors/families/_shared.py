"""Behaviour that several families share: one copy each, imported by their modules.

The softmax top-k router (qwen3_moe, qwen3_next, qwen3_5_moe), the grouped sigmoid router
with a correction bias (glm4_moe, deepseek_v3) and the gated-delta linear attention of a
generated Qwen3-Next / Qwen3.5 config. Builds lazy mx graphs only; knows nothing of files.
"""

from __future__ import annotations

from typing import Tuple

import mlx.core as mx
import mlx.nn as nn

from ._base import Dims, RouterAdapter

# Experts of groups that glm4_moe / deepseek_v3 mask out rank below every kept expert.
_MASKED_GROUP_OFFSET = 1.0e4


def gate_logits(block: nn.Module, x: mx.array) -> mx.array:
    """The router's logits: what a softmax router ranks by (a softmax keeps their order, and
    ranking them costs one op less, with no ties where the softmax underflows)."""
    return block.gate(x)


def _softmax_topk(block: nn.Module, x: mx.array) -> Tuple[mx.array, mx.array]:
    # Softmax over all experts, top-k, optional renormalisation.
    gates = mx.softmax(block.gate(x), axis=-1, precise=True)
    k = block.top_k
    inds = mx.stop_gradient(mx.argpartition(gates, kth=-k, axis=-1)[..., -k:])
    scores = mx.take_along_axis(gates, inds, axis=-1)
    if block.norm_topk_prob:
        scores = scores / mx.sum(scores, axis=-1, keepdims=True)
    return inds, scores


SOFTMAX_TOPK_ROUTER = RouterAdapter(
    block_attr="mlp",
    experts_attr="switch_mlp",
    route=_softmax_topk,
    selection_scores=gate_logits,
    num_experts=lambda b: int(b.num_experts),
    top_k=lambda b: int(b.top_k),
)


def _grouped_route(block: nn.Module, x: mx.array) -> Tuple[mx.array, mx.array]:
    # The block's own MoEGate (sigmoid, correction bias, group limit).
    return block.gate(x)


def _grouped_scores(block: nn.Module, x: mx.array) -> mx.array:
    # The biased sigmoid the gate ranks by. The gate sets masked groups to 0; here they sit
    # below every kept expert but keep their own order, so ranks past top-k mean something.
    # Same top-k as the gate whenever the k-th kept score is positive.
    gate = block.gate
    scores = mx.sigmoid((x @ gate.weight.T).astype(mx.float32)) + gate.e_score_correction_bias
    if gate.n_group <= 1:
        return scores
    grouped = mx.unflatten(scores, axis=-1, shape=(gate.n_group, -1))
    group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1, keepdims=True)
    k = gate.n_group - gate.topk_group
    dropped = mx.argpartition(group_scores, kth=k - 1, axis=-2)[..., :k, :]
    offset = mx.put_along_axis(
        mx.zeros_like(group_scores), dropped, mx.array(_MASKED_GROUP_OFFSET, dtype=scores.dtype), axis=-2
    )
    return mx.flatten(grouped - offset, -2, -1)


GROUPED_SIGMOID_ROUTER = RouterAdapter(
    block_attr="mlp",
    experts_attr="switch_mlp",
    route=_grouped_route,
    selection_scores=_grouped_scores,
    num_experts=lambda b: int(b.gate.n_routed_experts),
    top_k=lambda b: int(b.gate.top_k),
)


def gated_delta_config(size: Dims) -> dict:
    """Linear-attention fields of a generated Qwen3-Next / Qwen3.5 model."""
    return {
        "moe_intermediate_size": size.expert_hidden,
        "shared_expert_intermediate_size": size.expert_hidden,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": 2,
    }
