"""Generated checkpoints: small (or large) MoE models of every supported family, offline.

Builds a checkpoint folder that stock mlx-lm loads (config.json, safetensors shards with an
index, an offline byte-level BPE tokenizer with a chat template), using mlx-lm's own model
classes. Experts are 4-bit quantized, everything else float32. Expert weights are scaled up so
that which experts a token routes to changes the generated text (tests rely on that).
Used by the tests, the benchmarks and ``golem-run --demo``; never downloads anything.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

FAMILIES = (
    "qwen3_moe",
    "qwen3_next",
    "qwen3_5_moe",
    "glm4_moe",
    "deepseek_v3",
    "minimax",
    "mixtral",
    "olmoe",
    "gpt_oss",
)


@dataclass(frozen=True)
class Size:
    """Dimensions of a generated model.

    Args:
        hidden: model width.
        layers: decoder layers.
        experts: routed experts per MoE layer.
        top_k: experts per token.
        expert_hidden: intermediate width of one expert.
        vocab: tokenizer vocabulary size.
        group_size: quantization group of the experts.
    """

    hidden: int = 64
    layers: int = 4
    experts: int = 16
    top_k: int = 4
    expert_hidden: int = 64
    vocab: int = 384
    group_size: int = 32


TINY = Size()


def _common(size: Size) -> dict:
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


def _qwen3_moe(size: Size) -> dict:
    return {
        **_common(size),
        "model_type": "qwen3_moe",
        "num_experts": size.experts,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],  # one dense layer: dense layers must stay resident
        "moe_intermediate_size": size.expert_hidden,
        "norm_topk_prob": True,
    }


def _qwen3_next(size: Size) -> dict:
    return {
        **_common(size),
        "model_type": "qwen3_next",
        "num_experts": size.experts,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": size.expert_hidden,
        "shared_expert_intermediate_size": size.expert_hidden,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "partial_rotary_factor": 0.25,
        "full_attention_interval": 2,
        "norm_topk_prob": True,
    }


def _qwen3_5_moe(size: Size) -> dict:
    text = {
        **_common(size),
        "model_type": "qwen3_5_moe_text",
        "num_experts": size.experts,
        "moe_intermediate_size": size.expert_hidden,
        "shared_expert_intermediate_size": size.expert_hidden,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": 2,
        "norm_topk_prob": True,
    }
    return {"model_type": "qwen3_5_moe", "text_config": text, "tie_word_embeddings": False}


def _glm4_moe(size: Size) -> dict:
    return {
        **_common(size),
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


def _deepseek_v3(size: Size) -> dict:
    return {
        **_common(size),
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


def _minimax(size: Size) -> dict:
    return {
        **_common(size),
        "model_type": "minimax",
        "num_local_experts": size.experts,
        "shared_intermediate_size": 0,
        "rotary_dim": size.hidden // 8,
        "use_qk_norm": True,
    }


def _mixtral(size: Size) -> dict:
    c = _common(size)
    c.pop("head_dim")
    return {
        **c,
        "model_type": "mixtral",
        "num_local_experts": size.experts,
        "intermediate_size": size.expert_hidden,
    }


def _olmoe(size: Size) -> dict:
    return {
        **_common(size),
        "model_type": "olmoe",
        "num_experts": size.experts,
        "intermediate_size": size.expert_hidden,
        "norm_topk_prob": False,
    }


def _gpt_oss(size: Size) -> dict:
    return {
        **_common(size),
        "model_type": "gpt_oss",
        "num_local_experts": size.experts,
        "intermediate_size": size.expert_hidden,
        "sliding_window": 64,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(size.layers)],
        "rope_theta": 150000,
    }


_CONFIGS: Dict[str, Callable[[Size], dict]] = {
    "qwen3_moe": _qwen3_moe,
    "qwen3_next": _qwen3_next,
    "qwen3_5_moe": _qwen3_5_moe,
    "glm4_moe": _glm4_moe,
    "deepseek_v3": _deepseek_v3,
    "minimax": _minimax,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "gpt_oss": _gpt_oss,
}


def family_config(family: str, size: Size = TINY) -> dict:
    """The config.json of a generated model of ``family``."""
    if family not in _CONFIGS:
        raise ValueError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")
    return _CONFIGS[family](size)


def _is_expert_linear(path: str, module) -> bool:
    from mlx_lm.models.switch_layers import SwitchLinear

    return isinstance(module, SwitchLinear)


def _scale_experts(model: nn.Module, expert_scale: float, router_scale: float, residual_scale: float = 1.0) -> None:
    """Make routing matter: larger expert outputs, sharper and more varied routers.

    ``residual_scale`` < 1 shrinks what every block adds to the residual stream (attention
    and MLP output projections), so that it drifts slowly from layer to layer as in trained
    models, where a router applied a layer early already sees most of its input.
    """
    from mlx_lm.models.switch_layers import SwitchLinear

    if residual_scale != 1.0:
        for path, module in model.named_modules():
            leaf = path.rsplit(".", 1)[-1]
            if leaf in ("o_proj", "down_proj", "dense", "out_proj") and "weight" in module:
                module.weight = module.weight * residual_scale
    for path, module in model.named_modules():
        if isinstance(module, SwitchLinear):
            if path.endswith("down_proj"):
                module.weight = module.weight * expert_scale
            if "bias" in module:
                module.bias = mx.random.normal(module.bias.shape) * 0.1
        leaf = path.rsplit(".", 1)[-1]
        if leaf in ("gate", "router") and isinstance(module, nn.Linear):
            module.weight = module.weight * router_scale
        if hasattr(module, "e_score_correction_bias"):
            # Sigmoid routers (glm4_moe, deepseek_v3): a large weight saturates every score
            # and the correction bias alone would choose; keep the logits in sigmoid's slope.
            # (Their gate weights start as zeros in mlx-lm: draw them here.)
            if "weight" in module:
                fan_in = module.weight.shape[-1]
                module.weight = mx.random.normal(module.weight.shape) * (2.0 / fan_in**0.5)
            module.e_score_correction_bias = mx.random.normal(module.e_score_correction_bias.shape) * 0.01


_TOKENIZER_TEXT = """
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few
experts out of many; the rest of the weights stay idle. Memory is the bottleneck, so the experts
live on disk and stream in when a token needs them. def main(): print("hello world") return 0
Once upon a time there was a small computer that wanted to run a very large language model.
It read the weights from its disk, one expert at a time, and it was patient. 0123456789 + - * / = ( ) [ ] { }
Hello, how are you today? I am fine, thank you. What is the capital of France? Paris is the capital.
"""

_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_tokenizer(path: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer trained offline on a fixed text, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|end|>",
                "bos_token": None,
                "pad_token": "<|end|>",
                "chat_template": _CHAT_TEMPLATE,
                "model_max_length": 4096,
            },
            indent=1,
        )
    )


def _quantization(family: str, size: Size) -> dict:
    if family == "gpt_oss":
        return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    return {"group_size": size.group_size, "bits": 4, "mode": "affine"}


def build_checkpoint(
    family: str,
    path: str | os.PathLike,
    *,
    size: Size = TINY,
    seed: int = 0,
    expert_scale: float = 24.0,
    router_scale: float = 8.0,
    residual_scale: float = 1.0,
    layers_per_shard: Optional[int] = None,
    overwrite: bool = False,
) -> Path:
    """Generate a checkpoint of ``family`` in ``path`` and return the path.

    Args:
        family: one of ``FAMILIES``.
        path: output folder (created).
        size: model dimensions.
        seed: random seed of the weights.
        expert_scale: factor on the experts' down projections (routing must matter).
        router_scale: factor on router weights (sharper, more varied routing).
        residual_scale: factor on every block's output projection (how fast the residual
            stream drifts from layer to layer).
        layers_per_shard: decoder layers per safetensors shard (default: two shards).
        overwrite: replace an existing folder.
    """
    from mlx_lm.utils import _get_classes

    path = Path(path)
    if (path / "config.json").exists() and not overwrite:
        return path
    if path.exists():
        shutil.rmtree(path)
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    config = family_config(family, size)
    quant = _quantization(family, size)
    config["quantization"] = dict(quant)
    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(copy.deepcopy(config)))
    _scale_experts(model, expert_scale, router_scale, residual_scale)
    nn.quantize(
        model,
        group_size=quant["group_size"],
        bits=quant["bits"],
        mode=quant["mode"],
        class_predicate=_is_expert_linear,
    )
    weights = dict(tree_flatten(model.parameters()))

    def layer_of(name: str) -> int:
        parts = name.split(".")
        if "layers" in parts:
            return int(parts[parts.index("layers") + 1])
        return -1

    per = layers_per_shard or max(1, (size.layers + 1) // 2)
    shards: Dict[int, Dict[str, mx.array]] = {}
    for name, w in weights.items():
        shards.setdefault(max(layer_of(name), 0) // per, {})[name] = w
    count = len(shards)
    weight_map = {}
    total = 0
    for i, shard_id in enumerate(sorted(shards)):
        fname = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        tensors = shards[shard_id]
        mx.eval(tensors)
        mx.save_safetensors(str(tmp / fname), tensors, metadata={"format": "mlx"})
        for name, w in tensors.items():
            weight_map[name] = fname
            total += w.nbytes
        del tensors
        shards[shard_id] = {}
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1)
    )
    write_tokenizer(tmp, size.vocab)
    vocab = json.loads((tmp / "tokenizer.json").read_text())["model"]["vocab"]
    config["eos_token_id"] = vocab["<|end|>"]
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tmp.rename(path)
    return path


def default_cache_dir() -> Path:
    """Where generated checkpoints are kept between runs (``GOLEM_CACHE`` overrides)."""
    root = os.environ.get("GOLEM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "golem"
    )
    return Path(root)
