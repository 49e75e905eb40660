"""Decode-speed estimates for an MoE model on a machine, before buying either.

Owns the model arithmetic (parameters and bytes per tensor kind from a config.json), machine
descriptions (memory tiers), the placement of weights (non-expert weights and pinned layers in
the fastest tier, an expert cache in the next) and two estimators: the chunk formula of the
GLM-5 study (U and D per chunk) and a trace-driven one that replays routing traces through
``golem.runtime.analysis.simulate``. It does not run models, read weights or simulate caches itself.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from golem.runtime.analysis import catalog
from golem.runtime.analysis.chunks import ChunkStats
from golem.runtime.trace import Trace

GiB = 1024 ** 3
GB = 1000 ** 3

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": GB, "gb": GB, "t": 1000 ** 4, "tb": 1000 ** 4,
    "kib": 1024, "mib": 1024 ** 2, "gib": GiB, "tib": 1024 ** 4,
}


def parse_size(value: Union[str, int, float], what: str = "size") -> int:
    """Bytes from ``24GiB``, ``256GB``, ``1.5TB``, ``512MiB`` or a plain number of bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{what}: {value} is negative")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{what}: cannot read size {value!r} (e.g. 24GiB, 256GB, 512MiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


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

    @classmethod
    def from_config(cls, config: dict, name: str = "model") -> "ModelSpec":
        """Count parameters from Hugging Face config.json fields; unknown keys are ignored."""
        cfg = dict(config.get("text_config") or {}, **{k: v for k, v in config.items() if k != "text_config"})
        try:
            hidden = int(cfg["hidden_size"])
            layers = int(cfg["num_hidden_layers"])
            vocab = int(cfg["vocab_size"])
            heads = int(cfg["num_attention_heads"])
        except KeyError as e:
            raise ValueError(f"{name}: config lacks {e.args[0]!r}") from None
        experts = _first(cfg, "n_routed_experts", "num_experts", "num_local_experts")
        top_k = _first(cfg, "num_experts_per_tok", "num_experts_per_token", "moe_topk")
        if not experts or not top_k:
            raise ValueError(f"{name}: not a mixture-of-experts config (no expert count or top-k)")
        experts, top_k = int(experts), int(top_k)
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
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read config: {e}") from None
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


# --------------------------------------------------------------------------------- machines

TIER_KINDS = ("gpu", "unified", "ram", "ssd")


@dataclass(frozen=True)
class Tier:
    """One level of a machine's memory.

    Args:
        kind: ``gpu`` (device memory), ``unified`` (Apple silicon), ``ram`` (system memory,
            computed on by the CPU) or ``ssd`` (where experts stream from).
        nbytes: capacity.
        gb_per_s: sustained read bandwidth in 10^9 bytes/s.
        reserve_nbytes: capacity not available to weights (OS, KV cache, buffers).
        read_latency_s: fixed cost of one expert read (SSD only).
        tflops: optional compute ceiling of the processor using this tier (10^12 FLOP/s).
        count: devices pooled in this tier (informational).
    """

    kind: str
    nbytes: int
    gb_per_s: float
    reserve_nbytes: int = 0
    read_latency_s: float = 0.0
    tflops: Optional[float] = None
    count: int = 1

    @property
    def usable_nbytes(self) -> int:
        return max(0, self.nbytes - self.reserve_nbytes)

    def seconds(self, nbytes: float, flops: float = 0.0) -> float:
        t = nbytes / (self.gb_per_s * GB)
        if self.tflops:
            t = max(t, flops / (self.tflops * 1e12))
        return t

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "size": self.nbytes, "gb_per_s": self.gb_per_s}
        if self.reserve_nbytes:
            out["reserve"] = self.reserve_nbytes
        if self.read_latency_s:
            out["read_latency_s"] = self.read_latency_s
        if self.tflops:
            out["tflops"] = self.tflops
        if self.count != 1:
            out["count"] = self.count
        return out


@dataclass(frozen=True)
class MachineSpec:
    """A machine as memory tiers: at most one GPU or unified tier, at most one RAM tier, one SSD.

    Args:
        name: profile name.
        tiers: the tiers, any order.
        description: free text.
    """

    name: str
    tiers: tuple
    description: str = ""

    def _tier(self, *kinds) -> Optional[Tier]:
        return next((t for t in self.tiers if t.kind in kinds), None)

    @property
    def fast(self) -> Optional[Tier]:
        """The GPU or unified-memory tier, if any."""
        return self._tier("gpu", "unified")

    @property
    def ram(self) -> Optional[Tier]:
        return self._tier("ram")

    @property
    def ssd(self) -> Tier:
        return self._tier("ssd")

    @property
    def cache_tier(self) -> Optional[Tier]:
        """Where the expert cache lives: system RAM, or unified memory without it."""
        return self.ram or self._tier("unified")

    def with_memory(self, nbytes: int) -> "MachineSpec":
        """The same machine with ``nbytes`` of cache-tier memory (RAM, or unified memory)."""
        tier = self.cache_tier
        if tier is None:
            raise ValueError(f"machine {self.name!r} has no RAM or unified tier to resize")
        tiers = tuple(replace(t, nbytes=int(nbytes)) if t is tier else t for t in self.tiers)
        return replace(self, tiers=tiers)

    def with_ssd(self, gb_per_s: float) -> "MachineSpec":
        tiers = tuple(replace(t, gb_per_s=float(gb_per_s)) if t.kind == "ssd" else t for t in self.tiers)
        return replace(self, tiers=tiers)

    @classmethod
    def from_dict(cls, data: dict, name: str = "machine", where: str = "machine") -> "MachineSpec":
        if not isinstance(data, dict) or not isinstance(data.get("tiers"), list):
            raise ValueError(f"{where}: expected an object with a 'tiers' list")
        tiers = []
        for i, t in enumerate(data["tiers"]):
            at = f"{where}: tiers[{i}]"
            if not isinstance(t, dict):
                raise ValueError(f"{at}: expected an object")
            kind = str(t.get("kind", "")).lower()
            if kind not in TIER_KINDS:
                raise ValueError(f"{at}: kind {t.get('kind')!r} is not one of {', '.join(TIER_KINDS)}")
            if "gb_per_s" not in t:
                raise ValueError(f"{at}: lacks 'gb_per_s'")
            gbps = float(t["gb_per_s"])
            if gbps <= 0:
                raise ValueError(f"{at}: gb_per_s must be > 0")
            if kind != "ssd" and "size" not in t:
                raise ValueError(f"{at}: lacks 'size'")
            tiers.append(Tier(
                kind=kind,
                nbytes=parse_size(t.get("size", 0), f"{at}.size"),
                gb_per_s=gbps,
                reserve_nbytes=parse_size(t.get("reserve", 0), f"{at}.reserve"),
                read_latency_s=float(t.get("read_latency_s", 0.0)),
                tflops=float(t["tflops"]) if t.get("tflops") else None,
                count=int(t.get("count", 1)),
            ))
        kinds = [t.kind for t in tiers]
        if kinds.count("ssd") != 1:
            raise ValueError(f"{where}: needs exactly one 'ssd' tier")
        if kinds.count("gpu") + kinds.count("unified") > 1 or kinds.count("ram") > 1:
            raise ValueError(f"{where}: at most one gpu/unified tier and one ram tier")
        if "unified" in kinds and "ram" in kinds:
            raise ValueError(f"{where}: a unified-memory machine has no separate 'ram' tier")
        if "ram" not in kinds and "unified" not in kinds:
            raise ValueError(f"{where}: needs a 'ram' or 'unified' tier")
        return cls(name=str(data.get("name", name)), tiers=tuple(tiers),
                   description=str(data.get("description", "")))

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "tiers": [t.to_dict() for t in self.tiers]}


def load_machine(name_or_path: str) -> MachineSpec:
    """A built-in profile (``rtx3090-128g``, ``m3-max-128g``, ...) or a JSON file of the same shape.

    File format::

        {"name": "my-box", "description": "...",
         "tiers": [{"kind": "gpu", "size": "24GiB", "gb_per_s": 750, "reserve": "2GiB"},
                   {"kind": "ram", "size": "128GiB", "gb_per_s": 80, "reserve": "8GiB"},
                   {"kind": "ssd", "gb_per_s": 7.0, "read_latency_s": 6e-05}]}
    """
    key = str(name_or_path).lower()
    if key in catalog.MACHINES:
        return MachineSpec.from_dict(catalog.MACHINES[key], name=key, where=f"built-in machine {key}")
    path = Path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(catalog.MACHINES))
        raise ValueError(f"--machine: {name_or_path!r} is neither a built-in profile ({known}) nor a JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read machine profile: {e}") from None
    return MachineSpec.from_dict(data, name=path.stem, where=str(path))


# -------------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    """Where the weights live: non-expert weights, pinned MoE layers, and the expert cache.

    Layers are MoE-layer ordinals (0 = the first MoE layer), not decoder-layer indices.

    Args:
        non_expert_tier: kind of the tier holding the non-expert weights.
        fast_pinned: layers fully resident in the GPU/unified tier.
        cache_pinned: layers fully resident in the cache tier (RAM, or unified).
        slots: expert slots per MoE layer (``num_experts`` for pinned layers).
        expert_nbytes: bytes of one routed expert.
        num_experts: routed experts per layer.
        fast_kind, cache_kind: kinds of the two tiers (``None`` when absent).
        fast_free_nbytes, cache_free_nbytes: what is left unused in each.
    """

    non_expert_tier: str
    fast_pinned: tuple
    cache_pinned: tuple
    slots: tuple
    expert_nbytes: int
    num_experts: int
    fast_kind: Optional[str]
    cache_kind: Optional[str]
    fast_free_nbytes: int = 0
    cache_free_nbytes: int = 0

    @property
    def capacity_experts(self) -> int:
        return int(sum(self.slots))

    @property
    def cached_layers(self) -> tuple:
        pinned = set(self.fast_pinned) | set(self.cache_pinned)
        return tuple(i for i in range(len(self.slots)) if i not in pinned)

    def to_dict(self, model: Optional[ModelSpec] = None) -> dict:
        cached = self.cached_layers
        cache_slots = [self.slots[i] for i in cached]
        out = {
            "non_expert_tier": self.non_expert_tier,
            "expert_nbytes": self.expert_nbytes,
            "capacity_experts": self.capacity_experts,
            "fast_tier": self.fast_kind,
            "fast_pinned_layers": _ranges(self.fast_pinned),
            "fast_pinned_nbytes": len(self.fast_pinned) * self.num_experts * self.expert_nbytes,
            "cache_tier": self.cache_kind,
            "cache_pinned_layers": _ranges(self.cache_pinned),
            "cached_layers": _ranges(cached),
            "cache_slots_total": int(sum(cache_slots)),
            "cache_slots_per_layer": [min(cache_slots), max(cache_slots)] if cache_slots else [0, 0],
            "cache_nbytes": (len(self.cache_pinned) * self.num_experts + int(sum(cache_slots))) * self.expert_nbytes,
        }
        if model is not None:
            out["decoder_layers_of"] = {"fast_pinned": _ranges([model.moe_layers[i] for i in self.fast_pinned]),
                                        "cache_pinned": _ranges([model.moe_layers[i] for i in self.cache_pinned])}
        return out


def _ranges(items) -> str:
    """``0-4,7,9-10`` from a sequence of ints."""
    items = sorted(int(i) for i in items)
    parts, start = [], None
    for i, x in enumerate(items):
        if start is None:
            start = x
        if i + 1 == len(items) or items[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(parts)


def _waterfill(total: int, weights: Sequence[float], cap: int) -> list[int]:
    """Split ``total`` integer slots in proportion to ``weights``, none above ``cap``."""
    n = len(weights)
    out = [0] * n
    if n == 0 or total <= 0:
        return out
    if total >= n * cap:
        return [cap] * n
    w = np.maximum(np.asarray(weights, dtype=float), 1e-12)
    free = list(range(n))
    left = total
    while free:
        share = left * w[free] / w[free].sum()
        over = [j for j, s in zip(free, share) if s >= cap]
        if not over:
            base = np.floor(share).astype(int)
            for j, b in zip(free, base):
                out[j] = int(b)
            rest = left - int(base.sum())
            for j in sorted(free, key=lambda j: -(share[free.index(j)] - base[free.index(j)]))[:rest]:
                out[j] += 1
            break
        for j in over:
            out[j] = cap
            left -= cap
            free.remove(j)
    return out


def plan_placement(
    model: ModelSpec,
    quant: Quantization,
    machine: MachineSpec,
    *,
    pin_layers: int = 0,
    pin_order: Optional[Sequence[int]] = None,
    layer_weights: Optional[Sequence[float]] = None,
) -> Placement:
    """Place the weights, pinned layers first, as the GLM-5 study advises.

    Non-expert weights go to the GPU/unified tier when they fit there, else to RAM. Whole
    MoE layers are then pinned in the GPU tier while they fit (a GPU holds whole layers, no
    cache), in ``pin_order`` (default: first MoE layers first, as they route most uniformly
    and cache worst). The cache tier (RAM, or unified memory) pins ``pin_layers`` more layers
    and shares its remaining bytes as expert slots among the other layers: evenly, or in
    proportion to ``layer_weights`` (e.g. distinct experts per chunk), never above
    ``num_experts``; layers that get every slot count as pinned.
    """
    m, e = model.num_moe_layers, model.num_experts
    expert_nbytes = quant.expert_nbytes(model)
    layer_nbytes = e * expert_nbytes
    non_expert = quant.non_expert_nbytes(model)
    order = list(pin_order) if pin_order is not None else list(range(m))
    if sorted(order) != list(range(m)):
        raise ValueError(f"pin order must list each of the {m} MoE layers once")
    fast, cache = machine.fast, machine.cache_tier
    fast_free = fast.usable_nbytes if fast is not None else 0
    cache_free = cache.usable_nbytes if cache is not None else 0
    if fast is not None and non_expert <= fast_free:
        ne_tier, fast_free = fast.kind, fast_free - non_expert
        if fast is cache:
            cache_free = fast_free
    elif cache is not None and non_expert <= cache_free:
        ne_tier, cache_free = cache.kind, cache_free - non_expert
    else:
        tiers = [t for t in (fast, cache) if t is not None]
        if len(tiers) == 2 and tiers[0] is tiers[1]:
            tiers = tiers[:1]
        where = " or ".join(f"{t.kind} ({t.usable_nbytes / GiB:.1f} GiB usable)" for t in tiers)
        raise ValueError(f"{machine.name}: non-expert weights of {model.name} ({non_expert / GiB:.1f} GiB) "
                         f"do not fit in {where}")
    fast_pinned: list[int] = []
    if fast is not None and fast is not cache:
        while order and fast_free >= layer_nbytes:
            fast_pinned.append(order.pop(0))
            fast_free -= layer_nbytes
    cache_pinned: list[int] = []
    for _ in range(min(pin_layers, len(order))):
        if cache_free < layer_nbytes:
            raise ValueError(f"{machine.name}: cannot pin {pin_layers} more layers in "
                             f"{cache.kind if cache else 'memory'}: room for {len(cache_pinned)}")
        cache_pinned.append(order.pop(0))
        cache_free -= layer_nbytes
    slots = [0] * m
    for i in fast_pinned + cache_pinned:
        slots[i] = e
    rest = sorted(order)
    n_slots = cache_free // expert_nbytes if expert_nbytes else 0
    weights = [1.0] * len(rest) if layer_weights is None else [float(layer_weights[i]) for i in rest]
    for i, s in zip(rest, _waterfill(int(n_slots), weights, e)):
        slots[i] = s
    full = [i for i in rest if slots[i] >= e]
    cache_pinned += full
    cache_free -= sum(slots[i] for i in rest) * expert_nbytes
    return Placement(
        non_expert_tier=ne_tier,
        fast_pinned=tuple(fast_pinned),
        cache_pinned=tuple(cache_pinned),
        slots=tuple(slots),
        expert_nbytes=expert_nbytes,
        num_experts=e,
        fast_kind=fast.kind if fast is not None else None,
        cache_kind=cache.kind if cache is not None else None,
        fast_free_nbytes=int(fast_free) if fast is not cache else int(cache_free),
        cache_free_nbytes=int(cache_free),
    )


# ------------------------------------------------------------------------------- estimators


@dataclass
class Estimate:
    """Time per decoded token and its parts.

    Args:
        method: ``chunk`` (the study's formula) or ``trace`` (replayed through the simulator).
        compute_s: time on weights in the GPU or unified tier.
        memory_s: time on weights in system RAM (CPU, bandwidth-bound).
        ssd_s: time reading experts from SSD that does not overlap computing.
        ssd_nbytes: bytes read from SSD per token.
        experts_read: experts read from SSD per token.
        notes: how the routing statistics were obtained or mapped.
    """

    method: str
    compute_s: float
    memory_s: float
    ssd_s: float
    ssd_nbytes: float
    experts_read: float
    notes: list = field(default_factory=list)

    @property
    def time_s(self) -> float:
        return self.compute_s + self.memory_s + self.ssd_s

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.time_s if self.time_s > 0 else math.inf

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "tokens_per_s": round(self.tokens_per_s, 4),
            "time_s": self.time_s,
            "compute_s": self.compute_s,
            "memory_s": self.memory_s,
            "ssd_s": self.ssd_s,
            "ssd_nbytes_per_token": self.ssd_nbytes,
            "experts_read_per_token": self.experts_read,
            "notes": list(self.notes),
        }


def resident_time(model: ModelSpec, quant: Quantization, machine: MachineSpec,
                  placement: Placement) -> tuple[float, float]:
    """``(compute_s, memory_s)`` per token with every needed expert resident.

    Each tier's time is its bytes read per token over its bandwidth (or its FLOPs over its
    ``tflops`` when that is larger). Experts that come from SSD are computed from the cache
    tier too, so every non-pinned layer's active experts count there.
    """
    fast, cache = machine.fast, machine.cache_tier
    expert_active = model.top_k * placement.expert_nbytes
    expert_flops = 2 * model.top_k * model.expert_params
    ne_bytes = quant.active_non_expert_nbytes(model)
    ne_flops = 2 * model.active_non_expert_params
    nbytes = {"fast": 0.0, "cache": 0.0}
    flops = {"fast": 0.0, "cache": 0.0}
    ne_where = "fast" if fast is not None and placement.non_expert_tier == fast.kind and fast is not cache else "cache"
    nbytes[ne_where] += ne_bytes
    flops[ne_where] += ne_flops
    n_fast = len(placement.fast_pinned)
    nbytes["fast"] += n_fast * expert_active
    flops["fast"] += n_fast * expert_flops
    n_cache = model.num_moe_layers - n_fast
    nbytes["cache"] += n_cache * expert_active
    flops["cache"] += n_cache * expert_flops
    fast_s = fast.seconds(nbytes["fast"], flops["fast"]) if fast is not None and fast is not cache else 0.0
    cache_s = cache.seconds(nbytes["cache"], flops["cache"])
    if cache.kind == "unified":
        return cache_s + fast_s, 0.0
    return fast_s, cache_s


def _ssd_seconds(machine: MachineSpec, experts_read: float, expert_nbytes: int) -> float:
    ssd = machine.ssd
    return experts_read * expert_nbytes / (ssd.gb_per_s * GB) + experts_read * ssd.read_latency_s


@dataclass(frozen=True)
class ChunkRouting:
    """U and D per chunk, in the units of the model being estimated.

    Args:
        u: experts a chunk needs (at ``coverage``).
        d: how many of them were not used in the chunk before.
        chunk: tokens per chunk.
        coverage: the coverage threshold U and D were taken at.
        source: where the numbers come from.
    """

    u: float
    d: float
    chunk: int = 128
    coverage: float = 1.0
    source: str = "given"

    @classmethod
    def from_stats(cls, stats: ChunkStats, model: ModelSpec, coverage: float = 1.0) -> "ChunkRouting":
        """Take U and D from a chunk analysis; a trace of another model is mapped by share.

        When the trace's (layers, experts) differ from the model's, U and D are scaled by the
        share of all (layer, expert) pairs they are: U_model = U_trace / (L_t x E_t) x (L x E).
        This assumes the model routes with the locality of the traced one, which a model with
        a different top-k / experts ratio need not do.
        """
        u, d = stats.at(coverage)
        same = (stats.num_layers, stats.num_experts) == (model.num_moe_layers, model.num_experts)
        if same:
            return cls(u, d, stats.chunk, coverage, "trace")
        scale = model.total_experts / stats.total_experts
        return cls(u * scale, d * scale, stats.chunk, coverage,
                   f"trace of {stats.num_layers}x{stats.num_experts} experts mapped by share (x{scale:.2f})")


def chunk_estimate(model: ModelSpec, quant: Quantization, machine: MachineSpec,
                   placement: Placement, routing: ChunkRouting) -> Estimate:
    """The GLM-5 study's formula: with room for U experts a chunk pages in D; with a shortfall
    of S = U - capacity it pages in D + S; with room for every expert it pages in none.

    Known to be optimistic when memory is small (at 0 bytes every active expert loads every
    token, not D + U per chunk).
    """
    compute_s, memory_s = resident_time(model, quant, machine, placement)
    cap = placement.capacity_experts
    if cap >= model.total_experts:
        pages = 0.0
    else:
        pages = routing.d + max(0.0, routing.u - cap)
    experts_read = pages / routing.chunk
    ssd_s = _ssd_seconds(machine, experts_read, placement.expert_nbytes)
    notes = [f"U={routing.u:.1f}, D={routing.d:.1f} per {routing.chunk}-token chunk at coverage "
             f"{routing.coverage:g} ({routing.source}); capacity {cap} experts"]
    return Estimate("chunk", compute_s, memory_s, ssd_s, experts_read * placement.expert_nbytes,
                    experts_read, notes)


# ---------------------------------------------------------------------- trace-driven estimate

def _simulator():
    try:
        from golem.runtime.analysis import simulate as sim
    except ImportError as e:
        raise RuntimeError("the trace-driven estimate needs golem.runtime.analysis.simulate, which is not installed") from e
    return sim


def _distinct_per_step(experts: np.ndarray) -> np.ndarray:
    """int64 (N, L): distinct valid experts of each step and layer."""
    s = np.sort(experts.astype(np.int64), axis=2)
    new = s >= 0
    new[:, :, 1:] &= s[:, :, 1:] != s[:, :, :-1]
    return new.sum(axis=2)


class TraceReplay:
    """Expert reads per token for a placement, from routing traces replayed through
    ``golem.runtime.analysis.simulate`` (caches persist across sequences and traces).

    A trace of the estimated model itself (same MoE layers and experts) is replayed with the
    placement's per-layer slots and pinned layers. A trace of another model is mapped by share
    of a layer: MoE layer i of the model stands for traced layer floor(i x L_t / L) (same
    relative depth), and its s_i slots of E for s_i / E x E_t slots of the traced layer
    (interpolated between the two integer capacities around it); the traced layer's misses
    per request then apply to the model's top_k requests of layer i. This carries the traced
    model's locality over to a model whose top-k / experts ratio may differ. A layer with
    fewer slots than one step's experts reads every expert it uses (miss ratio 1).

    Args:
        traces: decode traces (prefill steps are dropped), replayed in order.
        policy: eviction policy spec for the simulator (``lru`` uses one stack-distance pass
            for every capacity; other policies one replay per capacity).
        prefetch_recall: fraction of misses a predictor would have read ahead in time.
        seed: seeds the simulator's prefetch draws.
        warm: traced layer -> experts resident before the first step, oldest first (e.g.
            what the prompt left behind); used when the trace is of the estimated model.
    """

    def __init__(self, traces: Sequence[Trace], *, policy: str = "lru", prefetch_recall: float = 0.0,
                 seed: int = 0, warm: Optional[dict] = None) -> None:
        if not traces:
            raise ValueError("trace-driven estimate needs at least one trace")
        if not 0.0 <= prefetch_recall <= 1.0:
            raise ValueError(f"--prefetch-recall must lie in [0, 1], got {prefetch_recall}")
        from golem.runtime.policies import make_policy
        make_policy(policy)  # a clear error for an unknown policy, before any replay
        self.traces = [t.decode_only() for t in traces]
        shapes = {(t.num_layers, t.num_experts) for t in self.traces}
        if len(shapes) != 1:
            raise ValueError(f"traces differ in (layers, experts): {sorted(shapes)}")
        self.num_layers, self.num_experts = shapes.pop()
        self.num_steps = sum(t.num_steps for t in self.traces)
        if self.num_steps == 0:
            raise ValueError("traces hold no decode steps")
        distinct = _distinct_per_step(np.concatenate([t.experts for t in self.traces], axis=0))
        self.requests = distinct.sum(axis=0)  # (L,)
        self.need = int(distinct.max())
        self.policy = policy
        self.prefetch_recall = float(prefetch_recall)
        self.seed = seed
        self.warm = warm
        self._sim = _simulator()
        self._lru: Optional[np.ndarray] = None
        self._reads: dict[int, np.ndarray] = {}

    def layer_reads(self, capacity: int) -> np.ndarray:
        """float (L,): expert reads (demand + prefetched) of each traced layer with
        ``capacity`` slots in every layer."""
        capacity = int(min(max(capacity, 0), self.num_experts))
        if capacity not in self._reads:
            if capacity >= self.num_experts:
                reads = np.zeros(self.num_layers)
            elif capacity < self.need:
                reads = self.requests.astype(float)
            elif self.policy == "lru":
                if self._lru is None:
                    self._lru = self._sim.lru_misses(self._sim.stack_distance_histogram(self.traces))
                reads = self._lru[:, capacity].astype(float)
            else:
                res = self._sim.simulate(self.traces, policy=self.policy, capacity=capacity, seed=self.seed)
                reads = (res.misses + res.prefetched).astype(float)
            self._reads[capacity] = reads
        return self._reads[capacity]

    def same_model(self, model: ModelSpec) -> bool:
        return (self.num_layers, self.num_experts) == (model.num_moe_layers, model.num_experts)

    def reads_per_token(self, model: ModelSpec, placement: Placement) -> tuple[float, float, str]:
        """``(demand reads, prefetched reads, note)`` per decoded token."""
        r = self.prefetch_recall
        pinned = set(placement.fast_pinned) | set(placement.cache_pinned)
        if self.same_model(model):
            cached = placement.cached_layers
            if not cached:
                return 0.0, 0.0, "every layer resident"
            caps = [max(int(s), self.need) for s in placement.slots]
            res = self._sim.simulate(self.traces, policy=self.policy, capacity=caps, pinned=sorted(pinned),
                                     prefetch_recall=r, seed=self.seed, warm=self.warm)
            demand = res.misses.astype(float)
            ahead = res.prefetched.astype(float)
            starved = [i for i in cached if placement.slots[i] < self.need]
            for i in starved:
                demand[i], ahead[i] = (1 - r) * self.requests[i], r * self.requests[i]
            note = f"replayed {self.num_steps} traced steps with the placement's slots per layer ({self.policy})"
            if starved:
                note += f"; {len(starved)} layers below {self.need} slots read every expert"
            return demand.sum() / self.num_steps, ahead.sum() / self.num_steps, note
        per_token = 0.0
        for i in placement.cached_layers:
            j = min(self.num_layers - 1, i * self.num_layers // model.num_moe_layers)
            x = placement.slots[i] / model.num_experts * self.num_experts
            lo = int(math.floor(x))
            frac = x - lo
            ratio = self.layer_reads(lo)[j]
            if frac > 1e-9:
                ratio = (1 - frac) * ratio + frac * self.layer_reads(lo + 1)[j]
            per_token += model.top_k * ratio / max(self.requests[j], 1)
        note = (f"{self.num_layers}x{self.num_experts}-expert trace ({self.num_steps} steps) mapped by share "
                f"of a layer onto {model.num_moe_layers}x{model.num_experts} ({self.policy})")
        return (1 - r) * per_token, r * per_token, note


def trace_estimate(model: ModelSpec, quant: Quantization, machine: MachineSpec,
                   placement: Placement, replay: TraceReplay) -> Estimate:
    """Expert reads per token from replaying traces; prefetched reads overlap computing.

    Demand reads stall the decoder; reads a predictor issued ahead (``prefetch_recall`` of
    them) run while the token computes and cost only what exceeds the compute time.
    """
    compute_s, memory_s = resident_time(model, quant, machine, placement)
    demand, ahead, how = replay.reads_per_token(model, placement)
    demand_s = _ssd_seconds(machine, demand, placement.expert_nbytes)
    ahead_s = _ssd_seconds(machine, ahead, placement.expert_nbytes)
    ssd_s = demand_s + max(0.0, ahead_s - (compute_s + memory_s))
    notes = [how]
    if ahead:
        notes.append(f"prefetch recall {replay.prefetch_recall:g}: {ahead_s * 1e3:.1f} ms of reads "
                     "overlap compute")
    reads = demand + ahead
    return Estimate("trace", compute_s, memory_s, ssd_s, reads * placement.expert_nbytes, reads, notes)


# ---------------------------------------------------------------------------- whole reports


@dataclass
class Report:
    """Both estimators for one model, quantization and machine."""

    model: ModelSpec
    quant: Quantization
    machine: MachineSpec
    placement: Placement
    chunk: Optional[Estimate]
    trace: Optional[Estimate]

    def to_dict(self) -> dict:
        m = self.model
        return {
            "model": {"name": m.name, "model_type": m.model_type, "moe_layers": m.num_moe_layers,
                      "experts": m.num_experts, "top_k": m.top_k, "total_params": m.total_params,
                      "active_params": m.active_params,
                      "expert_nbytes": self.placement.expert_nbytes,
                      "non_expert_nbytes": self.quant.non_expert_nbytes(m),
                      "all_experts_nbytes": m.total_experts * self.placement.expert_nbytes},
            "quantization": self.quant.to_dict(),
            "machine": self.machine.to_dict(),
            "placement": self.placement.to_dict(m),
            "chunk": self.chunk.to_dict() if self.chunk else None,
            "trace": self.trace.to_dict() if self.trace else None,
        }


def estimate(model: ModelSpec, quant: Quantization, machine: MachineSpec, *,
             routing: Optional[ChunkRouting] = None, replay: Optional[TraceReplay] = None,
             pin_layers: int = 0, plan: str = "uniform",
             layer_weights: Optional[Sequence[float]] = None) -> Report:
    """Place the weights and run whichever estimators have their routing statistics.

    ``plan`` is ``uniform`` (cache slots shared evenly) or ``weighted`` (in proportion to
    ``layer_weights``, e.g. from ``distinct_per_layer``).
    """
    if plan not in ("uniform", "weighted"):
        raise ValueError(f"--plan: {plan!r} is not 'uniform' or 'weighted'")
    if plan == "weighted" and layer_weights is None:
        raise ValueError("--plan weighted needs per-layer weights (give a trace)")
    placement = plan_placement(model, quant, machine, pin_layers=pin_layers,
                               layer_weights=layer_weights if plan == "weighted" else None)
    chunk = chunk_estimate(model, quant, machine, placement, routing) if routing else None
    trace = trace_estimate(model, quant, machine, placement, replay) if replay else None
    return Report(model, quant, machine, placement, chunk, trace)


def distinct_per_layer(stats_source: Sequence[Trace], model: ModelSpec, chunk: int = 128) -> list[float]:
    """Mean distinct experts per chunk of each MoE layer of ``model`` (traced layers mapped
    by relative depth, counts by share of a layer), for a weighted cache plan."""
    experts = np.concatenate([t.decode_only().experts for t in stats_source], axis=0)
    n = experts.shape[0] // chunk
    if n == 0:
        raise ValueError(f"traces hold fewer than {chunk} decode steps")
    lt, et = experts.shape[1], stats_source[0].num_experts
    per = np.zeros(lt)
    for c in range(n):
        w = experts[c * chunk:(c + 1) * chunk]
        for layer in range(lt):
            ids = w[:, layer].ravel()
            per[layer] += len(np.unique(ids[ids >= 0]))
    per /= n
    return [float(per[min(lt - 1, i * lt // model.num_moe_layers)] / et * model.num_experts)
            for i in range(model.num_moe_layers)]


def memory_sweep(model: ModelSpec, quant: Quantization, machine: MachineSpec, sizes_nbytes: Sequence[int],
                 **kwargs) -> list[tuple[int, Report]]:
    """``estimate`` at each cache-tier size; sizes too small for the non-expert weights are skipped."""
    out = []
    for size in sizes_nbytes:
        try:
            out.append((int(size), estimate(model, quant, machine.with_memory(size), **kwargs)))
        except ValueError as e:
            if "do not fit in" not in str(e):
                raise
    return out


def default_sweep_sizes(model: ModelSpec, quant: Quantization, machine: MachineSpec, points: int = 17) -> list[int]:
    """Cache-tier sizes from (almost) nothing to room for every expert, evenly spaced."""
    tier = machine.cache_tier
    need = model.total_experts * quant.expert_nbytes(model) + quant.non_expert_nbytes(model) + tier.reserve_nbytes
    top = max(need * 1.05, tier.nbytes)
    return [int(top * i / (points - 1)) for i in range(points)]


def plot_sweep(sweep: Sequence[tuple[int, Report]], path: Union[str, Path], title: str = "") -> Path:
    """PNG of tokens/s against cache-tier memory for both estimators; needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("the chart needs matplotlib: pip install matplotlib (or golem[plot])") from None
    xs = [s / GiB for s, _ in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for method, style in (("chunk", "o-"), ("trace", "s-")):
        ys = [getattr(r, method).tokens_per_s if getattr(r, method) else None for _, r in sweep]
        if any(y is not None for y in ys):
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            label = "chunk formula (U, D)" if method == "chunk" else "trace replay (simulator)"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, label=label)
    kind = sweep[0][1].machine.cache_tier.kind if sweep else "memory"
    ax.set_xlabel(f"{'RAM' if kind == 'ram' else 'unified memory'} (GiB)")
    ax.set_ylabel("tokens/s")
    ax.set_title(title or "decode speed against memory")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
