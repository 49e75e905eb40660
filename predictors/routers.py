"""Router adapters at work: the MoE blocks of a loaded model and their exact expert selection.

Owns the question "where does a loaded model keep its MoE blocks, and given a block and its
input, which experts does it pick, with which weights". Each family's rule lives in its
module under ``predictors/families``; this module finds the family by the model's
``model_type``. It builds lazy mx graphs only (no evaluation, no host reads) and knows
nothing of files or caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from .families import Family, RouterAdapter, UnknownFamily, family, model_types


def router_types() -> List[str]:
    """Model types that have a router adapter, sorted."""
    return model_types()


def _routed_family(model_type: str) -> Family:
    try:
        return family(model_type)
    except UnknownFamily:
        raise ValueError(
            f"no router adapter for model type {model_type!r}; known: {', '.join(router_types())}"
        ) from None


def router_for(model_type: str) -> RouterAdapter:
    """The adapter of ``model_type``; a clear error for a family golem does not route."""
    return _routed_family(model_type).router


def model_type_of(model: nn.Module) -> str:
    """The ``model_type`` of a loaded mlx-lm model."""
    model_type = getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)
    if not model_type:
        raise ValueError(f"{type(model).__name__} has no model_type; is it an mlx-lm model?")
    return str(model_type)


# ---------------------------------------------------------------- blocks of a model


@dataclass(frozen=True)
class MoEBlock:
    """One MoE layer of a loaded model, with what it takes to route it.

    Args:
        position: index among the model's MoE layers (0 = the first): the layer axis of a
            trace and the ``position`` that predictors speak of.
        model_layer: index in ``model.layers`` (checkpoint keys ``...layers.{model_layer}...``).
        layer: the decoder layer module.
        block: the MoE block module (``getattr(layer, block_attr)``).
        block_attr: ``mlp`` or ``block_sparse_moe``.
        experts_attr: ``switch_mlp`` or ``experts``: the block attribute holding the routed experts.
        router: the family's adapter.
        family: what golem knows of the model's family (norm names, config keys, ...).
    """

    position: int
    model_layer: int
    layer: nn.Module
    block: nn.Module
    block_attr: str
    experts_attr: str
    router: RouterAdapter
    family: Family

    @property
    def num_experts(self) -> int:
        return self.router.num_experts(self.block)

    @property
    def top_k(self) -> int:
        return self.router.top_k(self.block)

    def norm_attr(self, kind: str) -> str:
        """The decoder-layer attribute of the norm whose input is the residual of ``kind``
        (``layer_input`` or ``post_attn``): where a tap on that stream goes."""
        return self.family.norm_attr(kind)

    def pre_moe_norm(self, residual: mx.array) -> mx.array:
        """The layer's own norm between attention and MoE, applied to a residual stream."""
        return getattr(self.layer, self.family.pre_moe_norm)(residual)

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
    fam = _routed_family(model_type_of(model))
    adapter = fam.router
    layers: Sequence[nn.Module] = model.layers
    # A pipeline stage's ``model.layers`` are its own layers only (mlx-lm's ``pipeline``):
    # number them as the decoder layers they are.
    first = getattr(getattr(model, "model", None), "start_idx", 0) or 0
    blocks: List[MoEBlock] = []
    for i, layer in enumerate(layers, start=first):
        block = getattr(layer, adapter.block_attr, None)
        if block is None or not isinstance(block, nn.Module) or adapter.experts_attr not in block:
            continue
        blocks.append(
            MoEBlock(
                position=len(blocks),
                model_layer=i,
                layer=layer,
                block=block,
                block_attr=adapter.block_attr,
                experts_attr=adapter.experts_attr,
                router=adapter,
                family=fam,
            )
        )
    if not blocks:
        raise ValueError(f"{model_type_of(model)} model has no MoE layers")
    return blocks
