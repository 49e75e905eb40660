"""Which decoder layers each rank of a pipeline runs, and which tensors it loads.

Owns the split (mlx-lm's even one, an explicit one, or one balancing the layers' bytes),
applying it to a lazily loaded model through the family's own ``pipeline`` (so a rank reads
only its layers' tensors), per-rank option values and a rank's view of the runtime options.
Knows nothing of collectives, slots or the engine. As in mlx-lm, rank 0 runs the LAST
layers and the highest rank the first; every rank keeps the embeddings, norm and head.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

LAYER_OF_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.")
SPLIT_MODES = ("even", "bytes")


class PipelineError(ValueError):
    """A pipeline option or model that cannot be split; the message names the flag or model."""


@dataclass(frozen=True)
class PipelineConfig:
    """How to split a model across ranks; ``load(..., pipeline=...)`` takes one (or its
    ``split`` alone).

    Args:
        split: ``"even"`` (mlx-lm's split: rank 0 the last layers), ``"bytes"`` (balance the
            layers' bytes), or layers per rank in rank order (``(10, 14)``).
        boundary_prefetch: send each rank's last residual to the next rank, which guesses
            and reads its first layers' experts early (with a prefetch depth).
    """

    split: Union[str, Tuple[int, ...]] = "even"
    boundary_prefetch: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "split", parse_split(self.split))


def pipeline_config(spec) -> PipelineConfig:
    """``spec`` as a ``PipelineConfig`` (``True``, a split, or one already)."""
    return spec if isinstance(spec, PipelineConfig) else PipelineConfig(split=parse_split(spec))


@dataclass(frozen=True)
class Pipeline:
    """This process's place in a pipeline-parallel run.

    Args:
        group: the ``mx.distributed`` group (one rank per stage).
        split: decoder layers of each rank, in rank order (rank 0 runs the last ones).
        num_layers: decoder layers of the whole model.
        backend: the distributed backend's name, for messages.
    """

    group: Any
    split: Tuple[int, ...]
    num_layers: int
    backend: str = "ring"
    config: PipelineConfig = field(default_factory=lambda: PipelineConfig())

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    def layers_of(self, rank: int) -> range:
        """Decoder layers rank ``rank`` runs."""
        start = sum(self.split[rank + 1:])
        return range(start, start + self.split[rank])

    @property
    def layers(self) -> range:
        return self.layers_of(self.rank)

    def owns_layer(self, layer: int) -> bool:
        return layer in self.layers

    def owns_tensor(self, name: str) -> bool:
        """Whether this rank loads checkpoint tensor ``name``: its layers' tensors and every
        tensor outside the layers (embeddings, final norm, head)."""
        m = LAYER_OF_TENSOR.search(name)
        return m is None or self.owns_layer(int(m.group(1)))

    def describe_rank(self, rank: Optional[int] = None) -> str:
        """This rank's (or ``rank``'s) layers as ``"0-1"``."""
        return _range_text(self.layers_of(self.rank if rank is None else rank))

    def describe(self) -> str:
        """``"2 ranks (ring): rank 1 layers 0-1, rank 0 layers 2-3"``, first layers first."""
        parts = [f"rank {r} layers {_range_text(self.layers_of(r))}" for r in reversed(range(self.size))]
        return f"{self.size} ranks ({self.backend}): " + ", ".join(parts)


def _range_text(r: range) -> str:
    return f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start)


def parse_split(spec) -> Union[str, Tuple[int, ...]]:
    """``--pipeline``'s value: ``True``/``"even"`` (mlx-lm's split), ``"bytes"`` (balance the
    layers' bytes), or layers per rank in rank order (``"10,14"``, ``[10, 14]``)."""
    if isinstance(spec, PipelineConfig):
        return spec.split
    if spec is True or spec is None or spec == "" or spec == "even":
        return "even"
    if isinstance(spec, str):
        if spec in SPLIT_MODES:
            return spec
        try:
            spec = [int(s) for s in spec.split(",")]
        except ValueError:
            raise PipelineError(f"--pipeline {spec}: expected 'even', 'bytes' or layers per rank in rank order "
                                "(e.g. 10,14: rank 0 runs the last 10 layers)") from None
    try:
        split = tuple(int(s) for s in spec)
    except (TypeError, ValueError):
        raise PipelineError(f"--pipeline {spec!r}: expected 'even', 'bytes' or a list of layers per rank") from None
    if any(s < 1 for s in split) or any(int(s) != s for s in spec):
        raise PipelineError(f"--pipeline {','.join(map(str, spec))}: every rank needs a whole number >= 1 of layers")
    return split


def plan_split(spec, num_layers: int, size: int, layer_nbytes: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
    """Layers per rank (rank order) for ``size`` ranks.

    Args:
        spec: what ``parse_split`` takes.
        num_layers: decoder layers of the model.
        size: ranks in the group.
        layer_nbytes: bytes of each decoder layer (needed by ``"bytes"``).
    """
    mode = parse_split(spec)
    if size > num_layers:
        raise PipelineError(f"--pipeline: {size} ranks for a model of {num_layers} layers; "
                            "every rank needs at least one layer")
    if mode == "even":  # mlx-lm's own split: the low ranks get the extra layers
        base, extra = divmod(num_layers, size)
        return tuple(base + (1 if r < extra else 0) for r in range(size))
    if mode == "bytes":
        if layer_nbytes is None or len(layer_nbytes) != num_layers:
            raise PipelineError("--pipeline bytes: the checkpoint's layer sizes are unknown")
        parts = balanced_partition(layer_nbytes, size)  # first layers first
        return tuple(reversed(parts))
    if len(mode) != size:
        raise PipelineError(f"--pipeline {','.join(map(str, mode))}: {len(mode)} entries for {size} ranks")
    if sum(mode) != num_layers:
        raise PipelineError(f"--pipeline {','.join(map(str, mode))}: the layers add up to {sum(mode)}, "
                            f"the model has {num_layers}")
    return mode


def balanced_partition(weights: Sequence[float], parts: int) -> List[int]:
    """Sizes of ``parts`` contiguous, non-empty runs of ``weights`` whose largest sum is the
    smallest possible (ties: the earliest runs longest). Exact, O(parts * n^2)."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    inf = float("inf")
    # best[p][i]: the smallest largest-sum splitting weights[:i] into p runs; cut[p][i]: where the last begins.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n - (parts - p) + 1):
            for j in range(p - 1, i):
                cost = max(best[p - 1][j], prefix[i] - prefix[j])
                if cost < best[p][i]:
                    best[p][i], cut[p][i] = cost, j
    sizes, i = [], n
    for p in range(parts, 0, -1):
        j = cut[p][i]
        sizes.append(i - j)
        i = j
    return list(reversed(sizes))


def layer_nbytes(tensors: Any, num_layers: int) -> List[int]:
    """Bytes of each decoder layer, from ``{name: info with .nbytes}`` (a ``SafetensorsIndex``'s
    ``tensors``); tensors outside the layers are left out (every rank holds them)."""
    out = [0] * num_layers
    for name, info in tensors.items():
        m = LAYER_OF_TENSOR.search(name)
        if m is not None and int(m.group(1)) < num_layers:
            out[int(m.group(1))] += info.nbytes
    return out


def supports_pipeline(model) -> bool:
    return hasattr(getattr(model, "model", None), "pipeline")


def apply(model, spec, *, group=None, tensors=None, model_type: Optional[str] = None) -> Pipeline:
    """Split ``model`` (loaded lazily, nothing evaluated) across ``group``'s ranks with the
    family's own ``model.model.pipeline``: this rank keeps only its layers.

    Args:
        model: an mlx-lm model loaded with ``lazy=True``.
        spec: the split (see ``parse_split``).
        group: the distributed group (default: ``init_group()``).
        tensors: ``{name: info}`` of the checkpoint, for a split by bytes.
        model_type: for messages.
    """
    options = pipeline_config(spec)
    mode = options.split
    if not supports_pipeline(model):
        from golem.runtime.synthetic import FAMILIES

        families = [f for f in FAMILIES if _family_has_pipeline(f)]
        raise PipelineError(f"--pipeline: model_type {model_type!r} has no pipeline split in mlx-lm "
                            f"(families with one: {', '.join(families)}); run it on one machine")
    if group is None:
        import mlx.core as mx

        group = mx.distributed.init()  # the group mlx.launch set up (one process otherwise)
    inner = model.model
    num_layers = len(inner.layers)
    sizes = layer_nbytes(tensors, num_layers) if mode == "bytes" and tensors is not None else None
    split = plan_split(mode, num_layers, group.size(), sizes)
    inner.pipeline(group, list(split))
    return Pipeline(group, split, num_layers, backend=_backend_name(), config=options)


def _family_has_pipeline(family: str) -> bool:
    """Whether mlx-lm's module of ``family`` builds its layers with ``PipelineMixin``."""
    import importlib

    import mlx_lm.utils

    name = getattr(mlx_lm.utils, "MODEL_REMAPPING", {}).get(family, family)
    try:
        return hasattr(importlib.import_module(f"mlx_lm.models.{name}"), "PipelineMixin")
    except ImportError:
        return False


def _backend_name() -> str:
    """The backend ``mlx.launch`` set up, from the environment it leaves."""
    env = os.environ
    if "MLX_JACCL_COORDINATOR" in env or "MLX_IBV_DEVICES" in env:
        return "jaccl"
    if "MLX_HOSTFILE" in env:
        return "ring"
    if "MLX_WORLD_SIZE" in env:
        return "nccl"
    if any(k.startswith("OMPI_") for k in env):
        return "mpi"
    return "distributed"


def per_rank(value, rank: int, size: int, flag: str):
    """A per-rank option: ``"8GB,16GB"`` gives rank 0 ``8GB`` and rank 1 ``16GB``; a single
    value is every rank's."""
    if not isinstance(value, str) or "," not in value:
        return value
    items = [v.strip() for v in value.split(",")]
    if len(items) != size:
        raise PipelineError(f"{flag} {value}: {len(items)} values for {size} ranks (give one, or one per rank)")
    return items[rank]


def local_config(config, pipeline: Pipeline, moe_layers: Sequence[int]):
    """``config`` as this rank applies it: layer options (pins, cache-size overrides, slots
    by layer) keep this rank's layers, and the prefetch depth stops at its last MoE layer
    (the next rank's layers are the next rank's to prefetch). Options naming no layer of
    this rank are dropped here, after the whole model was checked against them."""
    import dataclasses
    from collections.abc import Mapping

    from golem.runtime.config import resolved_layers, with_prefetch_depth

    pins, overrides = resolved_layers(config, pipeline.num_layers)
    mine = set(moe_layers)
    changes = {}
    if config.pin_layers is not None:
        changes["pin_layers"] = [l for l in pins if l in mine] or None
    if config.cache_size_override:
        changes["cache_size_override"] = tuple((kept, n) for layers, n in overrides
                                                if (kept := [l for l in layers if l in mine]))
    if isinstance(config.cache_sizes, Mapping):
        changes["cache_sizes"] = {l: n for l, n in config.cache_sizes.items() if l in mine}
    config = dataclasses.replace(config, **changes) if changes else config
    if config.prefetch is not None and config.prefetch.depth > len(moe_layers):
        config = with_prefetch_depth(config, len(moe_layers))
    return config
