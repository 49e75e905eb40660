"""What golem knows of each model family: one module per ``model_type``, found by name.

``families/<model_type>.py`` defines ``FAMILY``, a ``Family``: its router adapter (how the
MoE block picks experts, where a decoder layer keeps the block and its experts), the norms
golem taps, the config keys of top-k and expert count, and the config of a generated
checkpoint. ``family(model_type)`` imports that module, as mlx-lm finds its model files, so
a new family is one new file. Modules named ``_*`` hold code several families share.
Knows nothing of files, caches or the runtime.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import List, Mapping, Optional, Tuple

from ._base import ANY_NUM_EXPERTS_KEYS, ANY_TOP_K_KEYS, NORM_KINDS, Dims, Family, RouterAdapter, first_value


class UnknownFamily(ValueError):
    """No family module serves this model type."""


def model_types() -> List[str]:
    """Every ``model_type`` with a family module (aliases included), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def family_names() -> List[str]:
    """The families themselves (aliases left out), sorted: one generated checkpoint each."""
    return [name for name in model_types() if family(name).model_type == name]


def find_family(model_type: str) -> Optional[Family]:
    """The family serving ``model_type``, or None when no module does."""
    if not isinstance(model_type, str) or not model_type.isidentifier() or model_type.startswith("_"):
        return None
    name = f"{__name__}.{model_type}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:  # the module exists but an import inside it failed
            raise
        return None
    found = getattr(module, "FAMILY", None)
    if not isinstance(found, Family) or model_type not in found.model_types:
        raise TypeError(f"{name} must define FAMILY, a Family serving model type {model_type!r}")
    return found


def family(model_type: str) -> Family:
    """The family serving ``model_type``; a clear error naming the supported ones."""
    found = find_family(model_type)
    if found is None:
        raise UnknownFamily(
            f"golem does not know model type {model_type!r} (no module {__name__}.{model_type}); "
            f"supported: {', '.join(model_types())}"
        )
    return found


def _keys(config: Mapping, attr: str, fallback) -> Tuple[str, ...]:
    found = find_family(str(config.get("model_type", "")))
    return getattr(found, attr) if found is not None else fallback


def config_top_k_keys(config: Mapping) -> Tuple[str, ...]:
    """The keys a config.json states its experts per token under, in the order they are tried:
    its family's (any family's for a model type golem does not know)."""
    return _keys(config, "top_k_keys", ANY_TOP_K_KEYS)


def config_num_experts_keys(config: Mapping) -> Tuple[str, ...]:
    """The keys a config.json states its routed experts per MoE layer under, like ``config_top_k_keys``."""
    return _keys(config, "num_experts_keys", ANY_NUM_EXPERTS_KEYS)


def config_top_k(config: Mapping) -> Optional[int]:
    """Experts per token that a config.json states (``text_config`` first); None when it states none."""
    return first_value(config, config_top_k_keys(config))


def config_num_experts(config: Mapping) -> Optional[int]:
    """Routed experts per MoE layer that a config.json states (``text_config`` first); None when none."""
    return first_value(config, config_num_experts_keys(config))


__all__ = [
    "Dims",
    "Family",
    "NORM_KINDS",
    "RouterAdapter",
    "UnknownFamily",
    "config_num_experts",
    "config_num_experts_keys",
    "config_top_k",
    "config_top_k_keys",
    "family",
    "family_names",
    "find_family",
    "model_types",
]
