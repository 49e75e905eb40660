"""The shape of a family module: ``Family``, ``RouterAdapter`` and the defaults most families share.

Every ``families/<model_type>.py`` builds one ``Family`` from these. Holds no family's
specifics; knows nothing of files, caches or the runtime.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Protocol, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

RouteFn = Callable[[nn.Module, mx.array], Tuple[mx.array, mx.array]]
ScoreFn = Callable[[nn.Module, mx.array], mx.array]

#: Which residual stream each norm golem taps sees (the hidden kinds of ``predictors.lookahead``).
NORM_KINDS = ("layer_input", "post_attn")

#: Config keys tried for a model type without a family module (the estimator sizes such models).
ANY_TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_topk", "top_k")
ANY_NUM_EXPERTS_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")


@dataclass(frozen=True)
class RouterAdapter:
    """How one family's MoE block routes.

    Args:
        block_attr: attribute of a decoder layer holding the MoE block (``mlp``, ``block_sparse_moe``).
        experts_attr: attribute of the block holding the routed experts (``switch_mlp``, ``experts``).
        route: ``route(block, x) -> (inds, scores)``, the block's own selection for its input
            ``x`` (..., D) (already through the layer's pre-MoE norm): ids (..., k) and the
            weights the block multiplies the experts' outputs with (..., k). Lazy.
        selection_scores: ``selection_scores(block, x) -> (..., E)``, the per-expert quantity
            the block ranks experts by; its top-k is ``route``'s ids (ties aside). Lazy.
        num_experts: routed experts of a block.
        top_k: experts per token of a block.
    """

    block_attr: str
    experts_attr: str
    route: RouteFn
    selection_scores: ScoreFn
    num_experts: Callable[[nn.Module], int]
    top_k: Callable[[nn.Module], int]


class Dims(Protocol):
    """Dimensions of a generated model (``golem.runtime.synthetic.Size`` has these fields)."""

    hidden: int
    layers: int
    experts: int
    top_k: int
    expert_hidden: int
    vocab: int
    group_size: int


def common_config(size: Dims) -> dict:
    """config.json fields every generated family starts from (mlx-lm's usual names)."""
    return {
        "hidden_size": size.hidden,
        "num_hidden_layers": size.layers,
        "intermediate_size": 2 * size.hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": size.hidden // 4,
        "rms_norm_eps": 1e-6,
        "vocab_size": size.vocab,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "num_experts_per_tok": size.top_k,
    }


def affine_quantization(size: Dims) -> dict:
    """4-bit affine experts in groups of ``size.group_size``."""
    return {"group_size": size.group_size, "bits": 4, "mode": "affine"}


@dataclass(frozen=True)
class Family:
    """What golem knows of one model family.

    Args:
        model_type: config.json's ``model_type``; also the family module's name and, unless
            ``mlx_lm_module`` says otherwise, the mlx-lm model module's name.
        router: how the family's MoE blocks route and where a decoder layer keeps them.
        generated_config: ``generated_config(size) -> dict``, the config.json of a small
            generated checkpoint (``size`` has the fields of ``Dims``).
        aliases: other ``model_type`` values served by this family (a text model inside a
            multimodal one, a name mlx-lm remaps); each has a one-line module of its own.
        top_k_keys: config keys holding the experts per token, first present wins.
        num_experts_keys: config keys holding the routed experts per MoE layer.
        input_norm: decoder-layer attribute of the norm at the layer's input.
        pre_moe_norm: decoder-layer attribute of the norm between attention and the MoE block.
        generated_quantization: ``generated_quantization(size) -> dict``, how a generated
            checkpoint quantizes its experts (mlx-lm's ``quantization`` config entry).
        mlx_lm_module: name of the mlx-lm model module (``mlx_lm.models.<name>``).
    """

    model_type: str
    router: RouterAdapter
    generated_config: Callable[[Dims], dict]
    aliases: Tuple[str, ...] = ()
    top_k_keys: Tuple[str, ...] = ("num_experts_per_tok",)
    num_experts_keys: Tuple[str, ...] = ("num_experts",)
    input_norm: str = "input_layernorm"
    pre_moe_norm: str = "post_attention_layernorm"
    generated_quantization: Callable[[Dims], dict] = affine_quantization
    mlx_lm_module: Optional[str] = None

    @property
    def model_types(self) -> Tuple[str, ...]:
        """Every ``model_type`` this family serves."""
        return (self.model_type, *self.aliases)

    def norm_attr(self, kind: str) -> str:
        """The decoder-layer attribute of the norm whose input is the residual of ``kind``
        (``layer_input`` or ``post_attn``)."""
        if kind == "layer_input":
            return self.input_norm
        if kind == "post_attn":
            return self.pre_moe_norm
        raise ValueError(f"norm kind must be one of {', '.join(NORM_KINDS)}, got {kind!r}")

    def model_classes(self):
        """``(Model, ModelArgs)`` of mlx-lm's model module for this family."""
        module = importlib.import_module(f"mlx_lm.models.{self.mlx_lm_module or self.model_type}")
        return module.Model, module.ModelArgs


def first_value(config: Mapping, keys: Sequence[str]) -> Optional[int]:
    """The first of ``keys`` that ``config`` sets (the language model's ``text_config`` first)."""
    for where in (config.get("text_config") or {}, config):
        for key in keys:
            if where.get(key) is not None:
                return int(where[key])
    return None
