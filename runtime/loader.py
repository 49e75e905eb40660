"""Loading an mlx-lm checkpoint with its experts offloaded.

Owns the path from a model folder (or Hugging Face repo id) to a ready model: mlx-lm's own
lazy load, finding every experts module, checking the checkpoint's expert tensors against
it, replacing the stacked arrays with slot pools, and evaluating only the non-expert weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from golem.io.index import CheckpointError, ExpertIndex, SafetensorsIndex

from golem.runtime.engine import DiskReader, Engine, OffloadedExperts
from golem.runtime.policies import DEFAULT_POLICY
from golem.runtime.prefetch import PrefetchConfig
from golem.runtime.slots import PoolPart, SlotPool


class ModelError(ValueError):
    """The model cannot be run offloaded (not found, not MoE, unsupported layout)."""


@dataclass(frozen=True)
class ExpertsModule:
    """One experts module of a loaded model.

    Args:
        layer: decoder layer number.
        path: dotted module path in the model (e.g. "model.layers.3.mlp.switch_mlp").
        module: the ``SwitchGLU`` / ``SwitchMLP`` instance.
    """

    layer: int
    path: str
    module: nn.Module


def find_experts_modules(model: nn.Module) -> List[ExpertsModule]:
    """Every stacked-experts module of ``model`` with its decoder layer number."""
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    found = []
    for path, module in model.named_modules():
        if isinstance(module, (SwitchGLU, SwitchMLP)):
            parts = path.split(".")
            if "layers" not in parts:
                raise ModelError(f"experts module {path!r} is not inside a 'layers' list")
            layer = int(parts[parts.index("layers") + 1])
            found.append(ExpertsModule(layer, path, module))
    found.sort(key=lambda m: m.layer)
    return found


def resolve_model_path(model: str) -> Path:
    """A local folder as is; otherwise a Hugging Face repo id, fetched the way mlx-lm does."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {model}: not a folder")
        return path
    try:
        from mlx_lm.utils import _download

        return Path(_download(model))
    except Exception as e:  # the hub client raises many kinds when offline or unknown
        raise ModelError(
            f"--model {model}: not a local folder, and fetching it from the Hugging Face hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
        ) from None


def _module_at(root: nn.Module, dotted: str):
    obj = root
    for name in dotted.split("."):
        obj = obj[int(name)] if isinstance(obj, list) else getattr(obj, name)
    return obj


def _replace_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_path, _, leaf = dotted.rpartition(".")
    parent = _module_at(root, parent_path) if parent_path else root
    setattr(parent, leaf, new)


@dataclass
class OffloadedModel:
    """What ``load_offloaded`` builds: the model, its engine, and where memory went."""

    model: nn.Module
    config: dict
    path: Path
    engine: Engine
    index: ExpertIndex
    experts: List[ExpertsModule]
    reader: DiskReader
    non_expert_nbytes: int = 0

    @property
    def num_experts(self) -> int:
        return self.index.num_experts(self.experts[0].layer)

    @property
    def top_k(self) -> int:
        return top_k_of(self.config)

    def close(self) -> None:
        self.engine.close()
        self.reader.close()


def top_k_of(config: dict) -> int:
    c = config.get("text_config", config)
    for key in ("num_experts_per_tok", "moe_topk", "top_k"):
        if key in c:
            return int(c[key])
    raise ModelError("config.json does not say how many experts a token uses (num_experts_per_tok)")


@dataclass
class OpenedCheckpoint:
    """A model loaded lazily (nothing read but headers) and its expert index."""

    model: nn.Module
    config: dict
    path: Path
    experts: List[ExpertsModule]
    index: ExpertIndex
    layers: Dict[int, Dict[str, str]]
    num_experts: Dict[int, int]

    def memory(self):
        """What the memory planner needs: shapes and byte sizes, measured from the headers."""
        from golem.runtime.analysis.plan import ModelMemory

        moe = sorted(self.layers)
        expert_names = set(self.index.tensor_names())
        st = self.index.index
        return ModelMemory(
            num_layers=len(moe),
            num_experts=self.num_experts[moe[0]],
            top_k=top_k_of(self.config),
            expert_nbytes=[sum(t.expert_nbytes for t in self.index.parts(l)) for l in moe],
            non_expert_nbytes=st.nbytes(n for n in st.tensors if n not in expert_names),
            layer_ids=moe,
        )


def open_checkpoint(model_path: str | os.PathLike) -> OpenedCheckpoint:
    """Validate the checkpoint's headers, load the model lazily, index its experts."""
    from mlx_lm.utils import load_model

    path = resolve_model_path(str(model_path))
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (is this an mlx-lm model folder?)")
    st_index = SafetensorsIndex(path)  # validates every header before anything runs
    try:
        model, config = load_model(path, lazy=True)
    except ValueError as e:
        raise ModelError(f"{path}: mlx-lm cannot load this model: {e}") from None
    except KeyError as e:  # mlx-lm's quantization inference looks tensors up by name
        raise CheckpointError(f"{path}: tensor {e.args[0]!r} is missing from the checkpoint") from None
    experts = find_experts_modules(model)
    if not experts:
        raise ModelError(
            f"{path}: model type {config.get('model_type')!r} has no MoE layers with stacked experts "
            "(SwitchGLU); nothing to offload, run it with mlx_lm.generate"
        )
    layers: Dict[int, Dict[str, str]] = {}
    num_experts: Dict[int, int] = {}
    params: Dict[int, Dict[str, mx.array]] = {}
    for em in experts:
        flat = dict(tree_flatten(em.module.parameters()))
        layers[em.layer] = {part: f"{em.path}.{part}" for part in flat}
        params[em.layer] = flat
        num_experts[em.layer] = next(iter(flat.values())).shape[0]
    for layer, parts in layers.items():
        for part, name in parts.items():
            if name not in st_index:
                raise CheckpointError(
                    f"{path}: expert tensor {name!r} is not stored stacked in the checkpoint "
                    "(convert it with mlx_lm.convert so each layer's experts are one tensor)"
                )
            arr, info = params[layer][part], st_index[name]
            if tuple(arr.shape) != info.shape or arr.nbytes != info.nbytes:
                raise CheckpointError(
                    f"{info.path}: tensor {name!r} is {info.dtype} {list(info.shape)}, "
                    f"but the model expects {arr.dtype} {list(arr.shape)}"
                )
    index = ExpertIndex(st_index, layers, num_experts)
    return OpenedCheckpoint(model, config, path, experts, index, layers, num_experts)


def load_offloaded(
    model_path: str | os.PathLike,
    *,
    capacities=None,
    policy: str = DEFAULT_POLICY,
    direct_io: bool = False,
    throttle=None,
    prefetch: Optional[PrefetchConfig] = None,
    predictor: str = "lookahead",
    predictor_options: Optional[dict] = None,
    predictor_train: Sequence = (),
    io_parallelism: Optional[int] = None,
    record: bool = False,
    record_hidden: bool = False,
) -> OffloadedModel:
    """Load ``model_path`` with every MoE layer's experts in a slot pool.

    Args:
        model_path: local checkpoint folder or Hugging Face repo id.
        capacities: slots per MoE layer: an int for every layer, a dict layer -> slots,
            or a callable ``(OpenedCheckpoint) -> dict``; None = all experts.
        policy: eviction policy name.
        direct_io: read experts with O_DIRECT (the disk, not the page cache).
        throttle: optional storage emulator (``golem.io.storage.Throttle``) for every read.
        prefetch: depth, threshold and caps of speculative prefetch (None or depth 0: none).
        predictor: predictor name (``golem.predictors.registry``), e.g. "lookahead".
        predictor_options: fields of ``PredictorOptions`` (e.g. ``truth`` for the oracle,
            ``hidden_kind`` for lookahead).
        predictor_train: traces the predictor learns from before the first token.
        io_parallelism: reads in flight at once (default: the scheduler's).
        record: keep a ``TraceRecorder`` of the routing (``runtime.engine.trace``).
        record_hidden: also record the post-attention residual of every MoE layer.
    """
    opened = open_checkpoint(model_path)
    model, config, path, experts, index = opened.model, opened.config, opened.path, opened.experts, opened.index
    st_index, layers, num_experts = index.index, opened.layers, opened.num_experts

    if capacities is None:
        caps = dict(num_experts)
    elif callable(capacities):
        caps = capacities(opened)
    elif isinstance(capacities, int):
        caps = {l: capacities for l in layers}
    else:
        caps = dict(capacities)
    k = top_k_of(config)
    for layer, cap in caps.items():
        if layer in num_experts and cap < min(k, num_experts[layer]):
            raise ValueError(f"layer {layer}: cache of {cap} slots is smaller than top-k ({k})")
    reader = DiskReader(index, direct=direct_io)
    if throttle is not None:
        reader.handles.preadv = throttle.wrap(reader.handles.preadv)
    pools: Dict[int, SlotPool] = {}
    for em in experts:
        parts = []
        for st in index.parts(em.layer):
            owner_path, _, attr = st.part.rpartition(".")
            owner = _module_at(em.module, owner_path) if owner_path else em.module
            parts.append(PoolPart(st, owner, attr))
        cap = min(int(caps.get(em.layer, num_experts[em.layer])), num_experts[em.layer])
        pools[em.layer] = SlotPool(em.layer, num_experts[em.layer], cap, parts, policy=policy)

    scheduler = None
    if any(not p.fully_resident for p in pools.values()):
        from golem.io.scheduler import IOScheduler

        depth = prefetch.depth if prefetch is not None else 0
        biggest = max(index.expert_nbytes(l) for l in layers)
        opts = {} if io_parallelism is None else {"parallelism": io_parallelism}
        spec = spec_s = None
        if prefetch is not None and depth > 0:
            spec = prefetch.speculative_nbytes or 2 * depth * k * biggest
            spec_s = None if prefetch.speculative_ms is None else prefetch.speculative_ms / 1000
        scheduler = IOScheduler(
            lambda key: index.ranges(*key),
            lambda key: index.expert_nbytes(key[0]),
            buffer_nbytes=biggest,
            num_buffers=max(4, 2 * k * (depth + 1) + 2),
            speculative_nbytes=spec,
            speculative_s=spec_s,
            handles=reader.handles,
            direct=direct_io,
            **opts,
        ).start()

    residuals: Dict[int, mx.array] = {}
    prefetcher = None
    blocks = None
    if (prefetch is not None and prefetch.depth > 0) or record:
        from golem.predictors.routers import find_moe_blocks

        from golem.runtime.engine import ResidualTap

        blocks = find_moe_blocks(model)
        layer_input = (predictor_options or {}).get("hidden_kind") == "layer_input"
        for b in blocks:
            if layer_input:  # the residual entering the decoder layer, for lookahead on it
                b.layer.input_layernorm = ResidualTap(b.layer.input_layernorm, residuals, b.model_layer)
            else:
                b.layer.post_attention_layernorm = ResidualTap(b.layer.post_attention_layernorm, residuals, b.model_layer)
    moe_layers = sorted(layers)
    if prefetch is not None and prefetch.depth > 0 and scheduler is not None:
        from golem.predictors.base import RoutingShape
        from golem.predictors.registry import PredictorOptions, make_predictor

        from golem.runtime.prefetch import Prefetcher

        shape = RoutingShape(len(moe_layers), num_experts[moe_layers[0]], k)
        popts = PredictorOptions(blocks=blocks, **(predictor_options or {}))
        pred = make_predictor(predictor, shape, popts)
        if predictor_train:
            pred.fit(list(predictor_train))
        prefetcher = Prefetcher(
            pred, prefetch, moe_layers, k, [index.expert_nbytes(l) for l in moe_layers],
            [not pools[l].fully_resident for l in moe_layers],
        )
    engine = Engine(index, pools, reader, scheduler=scheduler, prefetcher=prefetcher,
                    hidden=lambda layer, x: residuals.get(layer))
    for em in experts:
        _replace_module(model, em.path, OffloadedExperts(em.module, em.layer, engine))
    if record:
        from golem.runtime.recorder import TraceRecorder

        by_layer = {b.model_layer: b for b in blocks}
        engine.trace = TraceRecorder(
            moe_layers, num_experts[moe_layers[0]], k, index.expert_nbytes(moe_layers[0]),
            route=lambda layer, x: by_layer[layer].route(x)[1],
            residual=(lambda layer: residuals[layer]) if record_hidden else None,
            meta={"model_type": config.get("model_type"), "model": str(path)},
        )
    expert_names = set(index.tensor_names())
    try:
        mx.eval(model.parameters())  # reads the non-expert bytes only: pools are zeros
        non_expert_nbytes = st_index.nbytes(n for n in st_index.tensors if n not in expert_names)
        for layer, pool in pools.items():
            if pool.fully_resident:
                engine.preload(layer, range(pool.num_experts))
    except BaseException:
        engine.close()
        reader.close()
        raise
    return OffloadedModel(model, config, path, engine, index, experts, reader, non_expert_nbytes)
