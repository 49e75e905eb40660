"""What a model weighs: its shape and the bytes of its expert and non-expert weights.

Gives a ``ModelMemory`` (``golem.runtime.memplan``: the one description of sizes the planner,
golem-run and the estimator share) for models golem has not opened. Owns ``ModelSpec``
(parameter counts by tensor kind from a Hugging Face config.json) and ``Quantization`` (bits
per weight by tensor kind), which together give a ``ModelMemory`` for a model golem has not
downloaded (its config keys of top-k and expert count are its family's, from
``golem.predictors.families``). Knows nothing of files beyond config.json, of machines or of
MLX; a checkpoint's measured sizes come from ``golem.runtime.loader``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from golem.predictors.families import config_num_experts_keys, config_top_k_keys
from golem.runtime.analysis import catalog
from golem.runtime.memplan import ModelMemory  # noqa: F401  (re-exported: sizes the planner reads)


def parse_bpw(value: Union[str, float], what: str = "bits") -> float:
    """Bits per weight from a format name (``IQ4_XS``, ``Q8_0``, ``MLX4``, ...) or a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bpw = float(value)
    else:
        text = str(value).strip()
        if text.upper() in catalog.QUANT_BPW:
            return catalog.QUANT_BPW[text.upper()]
        try:
            bpw = float(text)
        except ValueError:
            known = ", ".join(sorted(catalog.QUANT_BPW))
            raise ValueError(f"{what}: unknown format {value!r}; use bits per weight or one of {known}") from None
    if not 0.5 <= bpw <= 32:
        raise ValueError(f"{what}: {bpw} bits per weight is out of range")
    return bpw



# ----------------------------------------------------------------------------------- models


def _first(config: dict, *keys, default=None):
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return default


@dataclass(frozen=True)
class ModelSpec:
    """Parameter counts of an MoE model by tensor kind (decode path only).

    Args:
        name: model name.
        model_type: the config's ``model_type``.
        num_layers: decoder layers.
        moe_layers: indices of the decoder layers with routed experts.
        num_experts: routed experts per MoE layer.
        top_k: experts per token per MoE layer.
        expert_matrix_params: weights of one expert matrix (hidden x expert intermediate);
            an expert has three (gate, up, down).
        attention_params, dense_mlp_params, shared_expert_params, router_params,
        embedding_params, lm_head_params: totals over the model.
    """

    name: str
    model_type: str
    num_layers: int
    moe_layers: tuple
    num_experts: int
    top_k: int
    expert_matrix_params: int
    attention_params: int
    dense_mlp_params: int
    shared_expert_params: int
    router_params: int
    embedding_params: int
    lm_head_params: int

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def total_experts(self) -> int:
        return self.num_moe_layers * self.num_experts

    @property
    def expert_params(self) -> int:
        return 3 * self.expert_matrix_params

    @property
    def non_expert_params(self) -> int:
        return (self.attention_params + self.dense_mlp_params + self.shared_expert_params
                + self.router_params + self.embedding_params + self.lm_head_params)

    @property
    def total_params(self) -> int:
        return self.non_expert_params + self.total_experts * self.expert_params

    @property
    def active_non_expert_params(self) -> int:
        """Non-expert weights one decode step reads (the embedding table only one row of)."""
        return self.non_expert_params - self.embedding_params

    @property
    def active_params(self) -> int:
        return self.active_non_expert_params + self.num_moe_layers * self.top_k * self.expert_params

    def memory(self, quant: "Quantization") -> ModelMemory:
        """The sizes the planner works with, at ``quant``'s bits per weight; layer numbers are
        the decoder layers' (as ``-f``/``--pin-layers`` name them)."""
        return ModelMemory(
            num_layers=self.num_moe_layers,
            num_experts=self.num_experts,
            top_k=self.top_k,
            expert_nbytes=quant.expert_nbytes(self),
            non_expert_nbytes=quant.non_expert_nbytes(self),
            layer_ids=self.moe_layers,
        )

    @classmethod
    def from_config(cls, config: dict, name: str = "model") -> "ModelSpec":
        """Count parameters from Hugging Face config.json fields; unknown keys are ignored.

        A field that is missing or not a positive whole number is a ``ValueError`` naming
        ``name`` and the field."""
        if not isinstance(config, dict):
            raise ValueError(f"{name}: config is not a JSON object")
        text = config.get("text_config") or {}
        if not isinstance(text, dict):
            raise ValueError(f"{name}: config field 'text_config' is not an object")
        cfg = dict(text, **{k: v for k, v in config.items() if k != "text_config"})
        try:
            return cls._from_fields(cfg, name)
        except (TypeError, ValueError) as e:
            if str(e).startswith(f"{name}:"):
                raise
            raise ValueError(f"{name}: config holds a field of the wrong type ({e})") from None

    @classmethod
    def _from_fields(cls, cfg: dict, name: str) -> "ModelSpec":
        def count(key, value=None):
            value = cfg.get(key) if value is None else value
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
                raise ValueError(f"{name}: config field {key!r} must be a positive whole number, got {value!r}")
            return int(value)

        for key in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads"):
            if key not in cfg:
                raise ValueError(f"{name}: config lacks {key!r}")
        hidden, layers = count("hidden_size"), count("num_hidden_layers")
        vocab, heads = count("vocab_size"), count("num_attention_heads")
        experts = _first(cfg, *config_num_experts_keys(cfg))
        top_k = _first(cfg, *config_top_k_keys(cfg))
        if not experts or not top_k:
            raise ValueError(f"{name}: not a mixture-of-experts config (no expert count or top-k)")
        experts, top_k = count("num_experts", experts), count("num_experts_per_tok", top_k)
        if top_k > experts:
            raise ValueError(f"{name}: config routes each token to {top_k} experts of only {experts}")
        inter = int(_first(cfg, "intermediate_size", default=4 * hidden))
        expert_inter = int(_first(cfg, "moe_intermediate_size", default=inter))

        if isinstance(cfg.get("mlp_layer_types"), list):
            moe = [i for i, t in enumerate(cfg["mlp_layer_types"]) if t != "dense"]
        elif "first_k_dense_replace" in cfg:
            k, freq = int(cfg["first_k_dense_replace"]), int(cfg.get("moe_layer_freq", 1) or 1)
            moe = [i for i in range(layers) if i >= k and i % freq == 0]
        else:
            step = int(cfg.get("decoder_sparse_step", 1) or 1)
            skip = set(cfg.get("mlp_only_layers") or [])
            moe = [i for i in range(layers) if i not in skip and (i + 1) % step == 0]
        if not moe:
            raise ValueError(f"{name}: config has no MoE layers")
        dense_layers = layers - len(moe)

        if cfg.get("kv_lora_rank"):
            q_lora = int(cfg.get("q_lora_rank") or 0)
            kv_lora = int(cfg["kv_lora_rank"])
            nope, rope = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
            v_dim = int(cfg.get("v_head_dim", nope))
            q = hidden * q_lora + q_lora * heads * (nope + rope) if q_lora else hidden * heads * (nope + rope)
            kv = hidden * (kv_lora + rope) + kv_lora * heads * (nope + v_dim)
            attn = q + kv + heads * v_dim * hidden
            if cfg.get("index_n_heads"):  # sparse-attention indexer (DeepSeek-V3.2, GLM-5)
                ih, idim = int(cfg["index_n_heads"]), int(cfg.get("index_head_dim", 128))
                attn += (q_lora or hidden) * ih * idim + hidden * idim + hidden * ih
        else:
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            attn = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
        shared_inter = int(cfg.get("n_shared_experts") or 0) * expert_inter
        shared_inter += int(cfg.get("shared_expert_intermediate_size") or 0)
        tie = bool(cfg.get("tie_word_embeddings", False))
        return cls(
            name=name,
            model_type=str(cfg.get("model_type", "unknown")),
            num_layers=layers,
            moe_layers=tuple(moe),
            num_experts=experts,
            top_k=top_k,
            expert_matrix_params=hidden * expert_inter,
            attention_params=layers * attn,
            dense_mlp_params=dense_layers * 3 * hidden * inter,
            shared_expert_params=len(moe) * 3 * hidden * shared_inter,
            router_params=len(moe) * hidden * experts,
            embedding_params=vocab * hidden,
            lm_head_params=0 if tie else vocab * hidden,
        )


def load_model_spec(name_or_path: str) -> ModelSpec:
    """A built-in model (``glm-5``, ``deepseek-v3``, ...), a config.json, or a folder holding one."""
    key = str(name_or_path).lower()
    if key in catalog.MODELS:
        return ModelSpec.from_config(catalog.MODELS[key], name=key)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        known = ", ".join(sorted(catalog.MODELS))
        raise ValueError(f"--model: {name_or_path!r} is neither a built-in model ({known}) nor a config.json")
    from golem.runtime.model_config import MAX_CONFIG_NBYTES, check_sizes

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_NBYTES + 1)
        if len(raw) > MAX_CONFIG_NBYTES:
            raise ValueError(f"{path}: more than {MAX_CONFIG_NBYTES >> 20} MiB, not a model's config.json")
        config = json.loads(raw.decode("utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read config: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read config: {e}") from None
    except RecursionError:
        raise ValueError(f"{path}: cannot read config: JSON nested too deeply") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object (got {type(config).__name__})")
    check_sizes(config, path)  # before any size is multiplied or divided by
    return ModelSpec.from_config(config, name=path.parent.name or str(path))


@dataclass(frozen=True)
class Quantization:
    """Bits per weight by tensor kind.

    Args:
        gate_bpw, up_bpw, down_bpw: the three matrices of a routed expert.
        non_expert_bpw: attention, dense and shared MLPs, routers, embeddings, output head.
    """

    gate_bpw: float = 4.25
    up_bpw: float = 4.25
    down_bpw: float = 4.25
    non_expert_bpw: float = 4.25

    @classmethod
    def parse(cls, bits: str = "IQ4_XS", expert_bits: Optional[str] = None,
              non_expert_bits: Optional[str] = None) -> "Quantization":
        """``bits`` for everything; ``expert_bits`` as one format or ``gate=IQ3_S,up=IQ3_S,down=IQ4_XS``."""
        base = parse_bpw(bits, "--bits")
        kinds = {"gate": base, "up": base, "down": base}
        if expert_bits:
            if "=" in expert_bits:
                for part in expert_bits.split(","):
                    kind, _, fmt = part.partition("=")
                    kind = kind.strip().lower()
                    if kind not in kinds:
                        raise ValueError(f"--expert-bits: unknown matrix {kind!r} (gate, up, down)")
                    kinds[kind] = parse_bpw(fmt, f"--expert-bits {kind}")
            else:
                kinds = dict.fromkeys(kinds, parse_bpw(expert_bits, "--expert-bits"))
        ne = parse_bpw(non_expert_bits, "--non-expert-bits") if non_expert_bits else base
        return cls(kinds["gate"], kinds["up"], kinds["down"], ne)

    def expert_nbytes(self, model: ModelSpec) -> int:
        return int(model.expert_matrix_params * (self.gate_bpw + self.up_bpw + self.down_bpw) / 8)

    def non_expert_nbytes(self, model: ModelSpec) -> int:
        return int(model.non_expert_params * self.non_expert_bpw / 8)

    def active_non_expert_nbytes(self, model: ModelSpec) -> int:
        return int(model.active_non_expert_params * self.non_expert_bpw / 8)

    def to_dict(self) -> dict:
        return {"gate_bpw": self.gate_bpw, "up_bpw": self.up_bpw, "down_bpw": self.down_bpw,
                "non_expert_bpw": self.non_expert_bpw}

