"""config.json values that size an allocation or divide, range-checked before mlx-lm sees them.

Owns the limits of every config.json field a supported family uses to build its model
(layers, heads, vocabulary, expert counts, intervals it takes a remainder by), the
relations between them (heads divisible by key/value heads, top-k within the experts),
and the check of those sizes against the checkpoint's own tensors (layers stored, the
embedding's rows) so that a config.json that lies is refused before a layer is built.
Knows nothing of golem's own options (``runtime.config``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Tuple

MAX_CONFIG_NBYTES = 16 << 20  # a real config.json is a few KiB
MAX_LAYERS = 1024  # the largest models have ~100 decoder layers
MAX_EXPERTS = 32767  # expert ids are int16 in traces
MAX_VOCAB = 1 << 24  # 16.7 M token ids; the largest vocabularies are ~260 k
MAX_WIDTH = 1 << 20  # hidden / intermediate sizes
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 14
MAX_POSITIONS = 1 << 30

# field -> (least, most); None: no upper bound worth stating. Absent fields and nulls
# (e.g. q_lora_rank: null) are left to the model's defaults.
LIMITS: Dict[str, Tuple[int, Optional[int]]] = {
    "num_hidden_layers": (1, MAX_LAYERS),
    "hidden_size": (1, MAX_WIDTH),
    "intermediate_size": (1, MAX_WIDTH),
    "moe_intermediate_size": (1, MAX_WIDTH),
    "shared_expert_intermediate_size": (0, MAX_WIDTH),
    "shared_intermediate_size": (0, MAX_WIDTH),
    "vocab_size": (1, MAX_VOCAB),
    "num_attention_heads": (1, MAX_HEADS),
    "num_key_value_heads": (1, MAX_HEADS),
    "head_dim": (1, MAX_HEAD_DIM),
    "rotary_dim": (0, MAX_HEAD_DIM),
    "num_experts": (1, MAX_EXPERTS),
    "n_routed_experts": (1, MAX_EXPERTS),
    "num_local_experts": (1, MAX_EXPERTS),
    "num_experts_per_tok": (1, MAX_EXPERTS),
    "n_shared_experts": (0, MAX_EXPERTS),
    "n_group": (1, MAX_EXPERTS),
    "topk_group": (1, MAX_EXPERTS),
    "decoder_sparse_step": (1, MAX_LAYERS),
    "moe_layer_freq": (1, MAX_LAYERS),
    "full_attention_interval": (1, MAX_LAYERS),
    "first_k_dense_replace": (0, MAX_LAYERS),
    "kv_lora_rank": (1, MAX_WIDTH),
    "q_lora_rank": (1, MAX_WIDTH),
    "qk_rope_head_dim": (1, MAX_HEAD_DIM),
    "qk_nope_head_dim": (0, MAX_HEAD_DIM),
    "v_head_dim": (1, MAX_HEAD_DIM),
    "linear_num_value_heads": (1, MAX_HEADS),
    "linear_num_key_heads": (1, MAX_HEADS),
    "linear_key_head_dim": (1, MAX_HEAD_DIM),
    "linear_value_head_dim": (1, MAX_HEAD_DIM),
    "linear_conv_kernel_dim": (1, 1 << 10),
    "max_position_embeddings": (1, MAX_POSITIONS),
    "sliding_window": (1, MAX_POSITIONS),
}
POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")  # divided by, or a log taken of
FINITE_FLOATS = ("routed_scaling_factor", "partial_rotary_factor")
MAX_LIST_ITEMS = MAX_LAYERS * 4  # mlp_only_layers, layer_types


def sections(config: Mapping) -> Iterable[Tuple[str, Mapping]]:
    """The dicts holding model fields: the config itself and its ``text_config``."""
    yield "", config
    text = config.get("text_config")
    if isinstance(text, Mapping):
        yield "text_config.", text


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sizes(config: Mapping, file: Path, error=ValueError) -> None:
    """Every sizing field of ``config`` within its limits, and their relations; raises
    ``error`` (a one-line message naming ``file`` and the field) on the first failure."""
    for prefix, c in sections(config):
        for key, (lo, hi) in LIMITS.items():
            value = c.get(key)
            if value is None:
                continue
            if not _whole(value):
                raise error(f"{file}: field '{prefix}{key}' must be a whole number, got {value!r}")
            if value < lo or (hi is not None and value > hi):
                bound = f">= {lo}" if hi is None else f"within [{lo}, {hi}]"
                raise error(f"{file}: field '{prefix}{key}' = {value} is out of range (must be {bound})")
        for key in POSITIVE_FLOATS + FINITE_FLOATS:
            value = c.get(key)
            if value is None:
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (key in POSITIVE_FLOATS and value <= 0):
                want = "a finite number > 0" if key in POSITIVE_FLOATS else "a finite number"
                raise error(f"{file}: field '{prefix}{key}' must be {want}, got {value!r}")
        for key in ("mlp_only_layers", "layer_types"):
            value = c.get(key)
            if isinstance(value, list) and len(value) > MAX_LIST_ITEMS:
                raise error(f"{file}: field '{prefix}{key}' lists {len(value)} items, more than "
                            f"{MAX_LIST_ITEMS} (the layers a model can have)")
        _check_relations(c, prefix, file, error)


def _check_relations(c: Mapping, prefix: str, file: Path, error) -> None:
    def get(key):
        value = c.get(key)
        return value if _whole(value) else None

    heads, kv = get("num_attention_heads"), get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise error(f"{file}: field '{prefix}num_attention_heads' = {heads} is not a multiple of "
                    f"'{prefix}num_key_value_heads' = {kv}")
    hidden = get("hidden_size")
    if heads and hidden and c.get("head_dim") is None and hidden < heads:
        raise error(f"{file}: field '{prefix}hidden_size' = {hidden} is smaller than "
                    f"'{prefix}num_attention_heads' = {heads} (a head would have no width)")
    experts = next((get(k) for k in ("num_experts", "n_routed_experts", "num_local_experts") if get(k)), None)
    top_k = get("num_experts_per_tok")
    if experts and top_k and top_k > experts:
        raise error(f"{file}: field '{prefix}num_experts_per_tok': top-k {top_k} (experts per token) is more than "
                    f"the {experts} experts of each MoE layer")
    groups, top_groups = get("n_group"), get("topk_group")
    if groups and top_groups and top_groups > groups:
        raise error(f"{file}: field '{prefix}topk_group' = {top_groups} is more than "
                    f"'{prefix}n_group' = {groups}")
    if groups and experts and experts % groups:
        raise error(f"{file}: the {experts} routed experts do not split into '{prefix}n_group' = {groups} groups")


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_against_tensors(config: Mapping, tensors: Mapping, file: Path, error=ValueError) -> None:
    """The sizes ``config`` claims against the checkpoint's tensors (``name -> info`` with
    ``shape``): at least as many decoder layers stored as it says (a checkpoint may store
    more, e.g. multi-token-prediction layers mlx-lm drops), and an embedding with as many
    rows as its vocabulary."""
    stored = {int(m.group(1)) for name in tensors for m in [_LAYER.search(name)] if m}
    embeddings = [info for name, info in tensors.items() if name.endswith("embed_tokens.weight")]
    for prefix, c in sections(config):
        layers = c.get("num_hidden_layers")
        if _whole(layers) and stored and layers > max(stored) + 1:
            raise error(f"{file}: field '{prefix}num_hidden_layers' = {layers}, but the checkpoint stores "
                        f"{max(stored) + 1} layers")
        vocab = c.get("vocab_size")
        if _whole(vocab) and len(embeddings) == 1 and embeddings[0].shape and embeddings[0].shape[0] != vocab:
            raise error(f"{file}: field '{prefix}vocab_size' = {vocab}, but the checkpoint's embedding "
                        f"{embeddings[0].name!r} has {embeddings[0].shape[0]} rows")
