"""Router adapters: each mlx-lm MoE family's exact expert selection, found by model type.

Owns the question "given an MoE block and its input, which experts does it pick, with which
weights" for every supported family, and where a loaded model keeps its MoE blocks. It builds
lazy mx graphs only (no evaluation, no host reads) and knows nothing of files or caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

RouteFn = Callable[[nn.Module, mx.array], Tuple[mx.array, mx.array]]
ScoreFn = Callable[[nn.Module, mx.array], mx.array]

# Experts of groups that glm4_moe / deepseek_v3 mask out rank below every kept expert.
_MASKED_GROUP_OFFSET = 1.0e4


@dataclass(frozen=True)
class RouterAdapter:
    """How one family's MoE block routes.

    Args:
        model_types: the ``model_type`` values (config.json) this adapter serves.
        block_attr: attribute of a decoder layer holding the MoE block (``mlp``, ``block_sparse_moe``).
        experts_attr: attribute of the block holding the routed experts (``switch_mlp``, ``experts``).
        route: ``route(block, x) -> (inds, scores)``, the block's own selection for its input
            ``x`` (..., D) (already through the layer's pre-MoE norm): ids (..., k) and the
            weights the block multiplies the experts' outputs with (..., k).
        selection_scores: ``selection_scores(block, x) -> (..., E)``, the per-expert quantity
            the block ranks experts by; its top-k is ``route``'s ids (ties aside).
        num_experts: routed experts of a block.
        top_k: experts per token of a block.
    """

    model_types: Tuple[str, ...]
    block_attr: str
    experts_attr: str
    route: RouteFn
    selection_scores: ScoreFn
    num_experts: Callable[[nn.Module], int]
    top_k: Callable[[nn.Module], int]


_ROUTERS: Dict[str, RouterAdapter] = {}


def register_router(adapter: RouterAdapter) -> RouterAdapter:
    """Make ``adapter`` the router of each of its model types."""
    for model_type in adapter.model_types:
        _ROUTERS[model_type] = adapter
    return adapter


def router_types() -> List[str]:
    """Model types that have a router adapter, sorted."""
    return sorted(_ROUTERS)


def router_for(model_type: str) -> RouterAdapter:
    """The adapter of ``model_type``; a clear error for a family golem does not route."""
    try:
        return _ROUTERS[model_type]
    except KeyError:
        raise ValueError(
            f"no router adapter for model type {model_type!r}; known: {', '.join(router_types())}"
        ) from None


def model_type_of(model: nn.Module) -> str:
    """The ``model_type`` of a loaded mlx-lm model."""
    model_type = getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)
    if not model_type:
        raise ValueError(f"{type(model).__name__} has no model_type; is it an mlx-lm model?")
    return str(model_type)


# ---------------------------------------------------------------- selection rules


def _softmax_topk(block: nn.Module, x: mx.array) -> Tuple[mx.array, mx.array]:
    # qwen3_moe, qwen3_next, qwen3_5_moe: softmax over all experts, top-k, optional renorm.
    gates = mx.softmax(block.gate(x), axis=-1, precise=True)
    k = block.top_k
    inds = mx.stop_gradient(mx.argpartition(gates, kth=-k, axis=-1)[..., -k:])
    scores = mx.take_along_axis(gates, inds, axis=-1)
    if block.norm_topk_prob:
        scores = scores / mx.sum(scores, axis=-1, keepdims=True)
    return inds, scores


def _softmax_scores(block: nn.Module, x: mx.array) -> mx.array:
    return mx.softmax(block.gate(x), axis=-1, precise=True)


def _olmoe_route(block: nn.Module, x: mx.array) -> Tuple[mx.array, mx.array]:
    lead = x.shape[:-1]
    x_flat = x.reshape(-1, x.shape[-1])
    weights = mx.softmax(block.gate(x_flat), axis=1, precise=True)
    k = block.top_k
    inds = mx.stop_gradient(mx.argpartition(-weights, kth=k - 1, axis=-1)[..., :k])
    scores = mx.take_along_axis(weights, inds, axis=-1)
    if block.norm_topk_prob:
        scores = scores / scores.sum(axis=-1, keepdims=True)
    return inds.reshape(*lead, k), scores.reshape(*lead, k)


def _mixtral_route(block: nn.Module, x: mx.array) -> Tuple[mx.array, mx.array]:
    # Top-k of the logits, then softmax over the chosen k.
    gates = block.gate(x)
    k = block.num_experts_per_tok
    inds = mx.stop_gradient(mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k])
    scores = mx.softmax(mx.take_along_axis(gates, inds, axis=-1), axis=-1, precise=True)
    return inds, scores


def _gpt_oss_route(block: nn.Module, x: mx.array) -> Tuple[mx.array, mx.array]:
    g = block.router(x)
    k = block.num_experts_per_tok
    inds = mx.stop_gradient(mx.argpartition(g, kth=-k, axis=-1)[..., -k:])
    scores = mx.softmax(mx.take_along_axis(g, inds, axis=-1), axis=-1, precise=True)
    return inds, scores


def _minimax_route(block: nn.Module, x: mx.array) -> Tuple[mx.array, mx.array]:
    # Sigmoid, correction bias for the choice only, renormalised original scores.
    orig = mx.sigmoid(block.gate(x.astype(mx.float32)))
    biased = orig + block.e_score_correction_bias
    k = block.num_experts_per_tok
    inds = mx.stop_gradient(mx.argpartition(-biased, kth=k - 1, axis=-1)[..., :k])
    scores = mx.take_along_axis(orig, inds, axis=-1)
    scores = scores / (mx.sum(scores, axis=-1, keepdims=True) + 1e-20)
    return inds, scores.astype(x.dtype)


def _minimax_scores(block: nn.Module, x: mx.array) -> mx.array:
    return mx.sigmoid(block.gate(x.astype(mx.float32))) + block.e_score_correction_bias


def _grouped_route(block: nn.Module, x: mx.array) -> Tuple[mx.array, mx.array]:
    # glm4_moe / deepseek_v3: the block's own MoEGate (sigmoid, correction bias, group limit).
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


def _gate_logits(block: nn.Module, x: mx.array) -> mx.array:
    return block.gate(x)


def _router_logits(block: nn.Module, x: mx.array) -> mx.array:
    return block.router(x)


register_router(
    RouterAdapter(
        model_types=("qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text"),
        block_attr="mlp",
        experts_attr="switch_mlp",
        route=_softmax_topk,
        selection_scores=_softmax_scores,
        num_experts=lambda b: int(b.num_experts),
        top_k=lambda b: int(b.top_k),
    )
)
register_router(
    RouterAdapter(
        model_types=("olmoe",),
        block_attr="mlp",
        experts_attr="switch_mlp",
        route=_olmoe_route,
        selection_scores=_softmax_scores,
        num_experts=lambda b: int(b.num_experts),
        top_k=lambda b: int(b.top_k),
    )
)
register_router(
    RouterAdapter(
        model_types=("glm4_moe", "deepseek_v3"),
        block_attr="mlp",
        experts_attr="switch_mlp",
        route=_grouped_route,
        selection_scores=_grouped_scores,
        num_experts=lambda b: int(b.gate.n_routed_experts),
        top_k=lambda b: int(b.gate.top_k),
    )
)
register_router(
    RouterAdapter(
        model_types=("minimax",),
        block_attr="block_sparse_moe",
        experts_attr="switch_mlp",
        route=_minimax_route,
        selection_scores=_minimax_scores,
        num_experts=lambda b: int(b.e_score_correction_bias.shape[0]),
        top_k=lambda b: int(b.num_experts_per_tok),
    )
)
register_router(
    RouterAdapter(
        model_types=("mixtral",),
        block_attr="block_sparse_moe",
        experts_attr="switch_mlp",
        route=_mixtral_route,
        selection_scores=_gate_logits,
        num_experts=lambda b: int(b.num_experts),
        top_k=lambda b: int(b.num_experts_per_tok),
    )
)
register_router(
    RouterAdapter(
        model_types=("gpt_oss",),
        block_attr="mlp",
        experts_attr="experts",
        route=_gpt_oss_route,
        selection_scores=_router_logits,
        num_experts=lambda b: int(b.num_local_experts),
        top_k=lambda b: int(b.num_experts_per_tok),
    )
)


# ---------------------------------------------------------------- blocks of a model


@dataclass(frozen=True)
class MoEBlock:
    """One MoE layer of a loaded model, with what it takes to route it.

    Args:
        moe_layer: position among the model's MoE layers: the layer axis of a trace and the
            ``layer`` that predictors speak of.
        model_layer: index in ``model.layers`` (checkpoint keys ``...layers.{model_layer}...``).
        layer: the decoder layer module.
        block: the MoE block module (``getattr(layer, block_attr)``).
        block_attr: ``mlp`` or ``block_sparse_moe``.
        experts_attr: ``switch_mlp`` or ``experts``: the block attribute holding the routed experts.
        router: the family's adapter.
    """

    moe_layer: int
    model_layer: int
    layer: nn.Module
    block: nn.Module
    block_attr: str
    experts_attr: str
    router: RouterAdapter

    @property
    def num_experts(self) -> int:
        return self.router.num_experts(self.block)

    @property
    def top_k(self) -> int:
        return self.router.top_k(self.block)

    def pre_moe_norm(self, residual: mx.array) -> mx.array:
        """The layer's own norm between attention and MoE, applied to a residual stream."""
        return self.layer.post_attention_layernorm(residual)

    def route(self, x: mx.array) -> Tuple[mx.array, mx.array]:
        """``(inds, scores)`` of the block for its (normed) input ``x``; lazy."""
        return self.router.route(self.block, x)

    def selection_scores(self, x: mx.array) -> mx.array:
        """(..., E) ranking quantity of the block for its (normed) input ``x``; lazy."""
        return self.router.selection_scores(self.block, x)


def find_moe_blocks(model: nn.Module) -> List[MoEBlock]:
    """The MoE layers of a loaded mlx-lm model, in order (dense layers skipped).

    A block counts when its decoder layer has the family's block attribute and that block has
    the family's experts attribute, whatever module sits there (stock ``SwitchGLU`` or a
    replacement), so the runtime can call it before and after swapping the experts.
    """
    adapter = router_for(model_type_of(model))
    layers: Sequence[nn.Module] = model.layers
    blocks: List[MoEBlock] = []
    for i, layer in enumerate(layers):
        block = getattr(layer, adapter.block_attr, None)
        if block is None or not isinstance(block, nn.Module) or adapter.experts_attr not in block:
            continue
        blocks.append(
            MoEBlock(
                moe_layer=len(blocks),
                model_layer=i,
                layer=layer,
                block=block,
                block_attr=adapter.block_attr,
                experts_attr=adapter.experts_attr,
                router=adapter,
            )
        )
    if not blocks:
        raise ValueError(f"{model_type_of(model)} model has no MoE layers")
    return blocks
