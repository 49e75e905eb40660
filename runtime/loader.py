"""Loading an mlx-lm checkpoint with its experts offloaded: the load path, read straight through.

``load_offloaded`` checks the options and reads every file they name, then opens the checkpoint
(``golem.runtime.checkpoint``), sizes it (``golem.runtime.sizing``), starts the reader, builds
the slot pools, starts the I/O scheduler, installs the residual taps, builds the prefetcher and
the trace recorder, builds the engine complete with them, puts the offloaded experts into the
model and loads what stays resident (``golem.runtime.resident``). Each step is one function. A
failure after the checkpoint is opened closes every thread and file started
(``FreedOnFailure``). ``plan_offloaded`` stops after sizing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn

from golem.io.index import ExpertIndex
from golem.io.outputs import check_output, check_outside

from golem.runtime.checkpoint import (FreedOnFailure, OpenedCheckpoint, open_checkpoint, resolve_model_path,
                                      top_k_of)
from golem.runtime.config import RuntimeConfig, check_against_model, check_output_paths, make_config, with_prefetch_depth
from golem.runtime.disk_reader import DiskReader
from golem.runtime.engine import Engine
from golem.runtime.modules import OffloadedExperts
from golem.runtime.offloaded import OffloadedModel
from golem.runtime.resident import Progress, load_resident, warm_start
from golem.runtime.slots import PoolPart, SlotPool
from golem.runtime.writers import SlotWriters


def load_offloaded(model_path: str | os.PathLike, config: Optional[RuntimeConfig] = None, *,
                   model_config: Optional[dict] = None, adapter_path: Optional[str] = None,
                   trust_remote_code: bool = False, progress: Optional[Progress] = None,
                   pipeline=None, group=None, **fields) -> OffloadedModel:
    """Load ``model_path`` with every MoE layer's experts in a slot pool.

    Every option is checked before any work starts (the config's own checks, files it will
    write, the warm start and predictor traces it reads, then the model's shape once its
    headers are read); a failure after the model is opened closes every thread and file it
    opened, explicitly, even while the caller keeps the exception.

    Args:
        model_path: local checkpoint folder or Hugging Face repo id.
        config: a ``RuntimeConfig`` (default: its defaults).
        model_config: fields that override config.json (as mlx-lm's ``load``).
        adapter_path: LoRA adapters for the resident weights (as mlx-lm's ``load``).
        trust_remote_code: let mlx-lm run model code shipped with the checkpoint.
        progress: called as ``progress(stage, done_nbytes, total_nbytes)`` while the weights
            load (stage ``"loading"``: the resident weights and fully resident layers' experts)
            and while the warm start reads its experts (``"warm start"``), first with 0 done;
            on the loading thread (``golem.runtime.cli.progress.StageProgress`` draws it).
        pipeline: run only this rank's layers of a pipeline over ``group`` (``True`` or
            ``"even"``: mlx-lm's split; ``"bytes"``; layers per rank in rank order; or a
            ``golem.runtime.pipeline.PipelineConfig``).
        group: the ``mx.distributed`` group (default: the one ``mlx.launch`` set up).
        **fields: ``RuntimeConfig`` fields, changing ``config`` (e.g. ``cache_sizes=4``).
    """
    from golem.runtime.sizing import size_model

    config = make_config(config, **fields)
    path = _resolve_checked(config, model_path)
    inputs = _read_inputs(config, model_path)  # a bad file fails with none of the model's open
    with FreedOnFailure() as freed:
        opened = open_checkpoint(path, model_config=model_config, adapter_path=adapter_path,
                                 trust_remote_code=trust_remote_code, pipeline=pipeline, group=group)
        freed.add(opened.model, *(em.module for em in opened.experts))
        config = _checked_against(config, opened)
        sizing = size_model(config, opened, profile=inputs.profile)
        return _build(opened, config, sizing, inputs, freed, progress=progress, model_path=str(model_path))


@dataclass(frozen=True)
class LoadInputs:
    """What the options name and loading reads before any of the model's files.

    Args:
        profile: the warm start's profile (``golem.runtime.sizing.load_warm_profile``), or None.
        truth: the oracle predictors' trace (decode steps only), or None.
        train: the traces the predictor learns from.
    """

    profile: object
    truth: object
    train: list


def _resolve_checked(config: RuntimeConfig, model_path) -> Path:
    """The model's folder (a repo id fetched), once the files the options write are checked:
    none may be golem's cache inside the model, a file of the model, a link or a device."""
    if config.save_profile and os.path.isdir(model_path):  # before its folder is made
        from golem.runtime.sizing import profile_dir

        check_outside(profile_dir(model_path), what="--save-profile (golem's cache)", protected=[model_path])
    check_output_paths(config, model_path)  # before a repo id is fetched
    path = resolve_model_path(str(model_path))
    if config.trace_out is not None:  # never a file of the model, nor a link, device or folder
        check_output(config.trace_out, what="--trace-out", protected=[path])
    return path


def _read_inputs(config: RuntimeConfig, model_path) -> LoadInputs:
    """The warm start's profile and the predictor's traces, read and checked."""
    from golem.runtime.sizing import load_warm_profile

    profile = load_warm_profile(config, model_path)
    truth = config.predictor_trace
    if truth is not None and not hasattr(truth, "experts"):
        from golem.runtime.trace import load_trace

        truth = load_trace(truth).decode_only()
    return LoadInputs(profile, truth, _traces(config.predictor_train))


def _build(opened: OpenedCheckpoint, config: RuntimeConfig, sizing, inputs: LoadInputs,
           freed: FreedOnFailure, *, progress: Optional[Progress], model_path: str) -> OffloadedModel:
    """The runtime around an opened, sized checkpoint; what it starts is handed to ``freed``."""
    reader = start_reader(opened.index, config, freed)
    pools = build_pools(opened, sizing.cache_sizes, config)
    scheduler = start_scheduler(opened.index, pools, sizing.staging, config, reader, freed)
    prefetch = live_prefetch(config, sizing.cache_sizes, opened.num_experts)
    residuals: Dict[int, mx.array] = {}  # layer -> its hidden state this step, left by the taps
    blocks = install_taps(opened.model, residuals, config) if prefetch is not None or config.record else None
    prefetcher = None
    if prefetch is not None and scheduler is not None:
        prefetcher = build_prefetcher(opened, pools, prefetch, blocks, config, inputs)
    recorder = build_recorder(opened, blocks, residuals, config) if config.record else None
    engine = freed.close_on_failure(Engine(opened.index, pools, reader, scheduler=scheduler,
                                           prefetcher=prefetcher, trace=recorder,
                                           hidden=lambda layer, x: residuals.get(layer)))
    if opened.pipeline is not None and prefetch is not None:
        from golem.runtime.pipeline import connect_boundaries

        connect_boundaries(opened.pipeline, engine, can_send=blocks is not None)
    install_offloaded_experts(opened, engine)
    load_resident(opened.model, engine, pools, progress)  # the pools are zeros until filled
    if sizing.warm:
        warm_start(engine, pools, sizing.warm, progress)
    reader.handles.check_all()  # mlx-lm read the resident weights by path: still the files indexed?
    return OffloadedModel(opened.model, opened.config, opened.path, engine, opened.index, opened.experts,
                          reader, opened.non_expert_nbytes(), options=config, plan=sizing.plan,
                          sizing_note=sizing.note, model_path=model_path, pipeline=opened.pipeline)


def start_reader(index: ExpertIndex, config: RuntimeConfig, freed: FreedOnFailure) -> DiskReader:
    """The reader of expert bytes, with every shard opened once, as indexed (read only
    through these handles), on the storage the options emulate; from the packed copy of the
    experts when the model folder holds a valid one (``packed_experts``)."""
    from golem.io.packed_experts import open_packed

    identities = dict(index.index.identities)
    packed = open_packed(index) if config.packed_experts else None
    if packed is not None:
        index.use_packed(packed)
        identities[packed.path] = packed.identity
    throttle = config.throttle
    if config.emulate_storage is not None:
        from golem.io.storage import parse_throttle

        throttle = parse_throttle(config.emulate_storage)
    reader = freed.close_on_failure(DiskReader(index, direct=config.direct_io, throttle=throttle,
                                               identities=identities))
    reader.handles.pin(config.direct_io)
    return reader


def build_pools(opened: OpenedCheckpoint, cache_sizes: Dict[int, int],
                config: RuntimeConfig) -> Dict[int, SlotPool]:
    """A slot pool of ``cache_sizes[layer]`` slots for every MoE layer, over the arrays of its
    experts module (zeros until filled)."""
    writers = SlotWriters(config.slot_writer)
    pools: Dict[int, SlotPool] = {}
    for em in opened.experts:
        parts = []
        for st in opened.index.parts(em.layer):
            owner_path, _, attr = st.part.rpartition(".")
            owner = _module_at(em.module, owner_path) if owner_path else em.module
            parts.append(PoolPart(st, owner, attr))
        pools[em.layer] = SlotPool(em.layer, opened.num_experts[em.layer], cache_sizes[em.layer], parts,
                                   policy=config.policy, writers=writers)
    return pools


def start_scheduler(index: ExpertIndex, pools: Dict[int, SlotPool], staging, config: RuntimeConfig,
                    reader: DiskReader, freed: FreedOnFailure):
    """The I/O scheduler (``golem.io.scheduler.IOScheduler``), started, with the staging
    buffers sizing chose; None when every layer is fully resident."""
    if all(p.fully_resident for p in pools.values()):
        return None
    from golem.io.scheduler import IOScheduler, SchedulerSettings

    opts = {} if config.io_parallelism is None else {"parallelism": config.io_parallelism}
    settings = SchedulerSettings(
        buffer_nbytes=staging.buffer_nbytes,
        num_buffers=staging.num_buffers,
        speculative_nbytes=staging.speculative_nbytes,
        speculative_s=staging.speculative_s,
        direct=config.direct_io,
        **opts,
    )
    scheduler = IOScheduler(lambda key: index.ranges(*key), lambda key: index.expert_nbytes(key[0]), settings,
                            handles=reader.handles)
    freed.close_on_failure(scheduler).start()
    return scheduler


def live_prefetch(config: RuntimeConfig, cache_sizes: Dict[int, int], num_experts: Dict[int, int]):
    """The prefetch settings the run uses (``config.prefetch``): None under ``auto`` when
    every expert is resident, as there is nothing to prefetch."""
    prefetch = config.prefetch
    if prefetch is not None and prefetch.auto and all(c >= num_experts[l] for l, c in cache_sizes.items()):
        return None
    return prefetch


def install_taps(model: nn.Module, residuals: Dict[int, mx.array], config: RuntimeConfig) -> list:
    """A ``ResidualTap`` in every MoE block, leaving the block's hidden state in
    ``residuals[layer]`` (lazily) for the predictor and the recorder: the residual after
    attention, or with ``hidden_kind="layer_input"`` the one entering the decoder layer (for
    lookahead on it). Returns the blocks (``golem.predictors.routers.find_moe_blocks``)."""
    from golem.predictors.routers import find_moe_blocks

    from golem.runtime.modules import ResidualTap

    blocks = find_moe_blocks(model)
    layer_input = (config.predictor_options or {}).get("hidden_kind") == "layer_input"
    for b in blocks:
        attr = b.norm_attr("layer_input" if layer_input else "post_attn")
        setattr(b.layer, attr, ResidualTap(getattr(b.layer, attr), residuals, b.model_layer))
    return blocks


def build_prefetcher(opened: OpenedCheckpoint, pools: Dict[int, SlotPool], prefetch, blocks: list,
                     config: RuntimeConfig, inputs: LoadInputs):
    """The ``Prefetcher`` around the predictor the options name (fitted to the training
    traces, given the oracle's trace), for the layers not fully resident."""
    from golem.predictors.base import RoutingShape
    from golem.predictors.registry import PredictorOptions, make_predictor

    from golem.runtime.prefetch import Prefetcher

    moe_layers, k = sorted(opened.layers), top_k_of(opened.config)
    predictor_options = dict(config.predictor_options or {})
    if inputs.truth is not None:
        predictor_options["truth"] = inputs.truth
    shape = RoutingShape(len(moe_layers), opened.num_experts[moe_layers[0]], k)
    predictor = make_predictor(config.predictor, shape, PredictorOptions(blocks=blocks, **predictor_options))
    if inputs.train:
        predictor.fit(inputs.train)
    return Prefetcher(
        predictor, prefetch, moe_layers, k, [opened.index.expert_nbytes(l) for l in moe_layers],
        [not pools[l].fully_resident for l in moe_layers],
    )


def build_recorder(opened: OpenedCheckpoint, blocks: list, residuals: Dict[int, mx.array],
                   config: RuntimeConfig):
    """The ``TraceRecorder`` of the routing (and, with ``trace_hidden``, the hidden states)."""
    from golem.runtime.recorder import TraceRecorder

    moe_layers = sorted(opened.layers)
    first = moe_layers[0]
    by_layer = {b.model_layer: b for b in blocks}
    return TraceRecorder(
        moe_layers, opened.num_experts[first], top_k_of(opened.config), opened.index.expert_nbytes(first),
        route=lambda layer, x: by_layer[layer].route(x)[1],
        residual=(lambda layer: residuals[layer]) if config.trace_hidden else None,
        meta={"model_type": opened.config.get("model_type"), "model": str(opened.path)},
    )


def install_offloaded_experts(opened: OpenedCheckpoint, engine: Engine) -> None:
    """Each experts module of the model replaced by an ``OffloadedExperts`` over ``engine``."""
    for em in opened.experts:
        _replace_module(opened.model, em.path, OffloadedExperts(em.module, em.layer, engine))


def _module_at(root: nn.Module, dotted: str):
    obj = root
    for name in dotted.split("."):
        obj = obj[int(name)] if isinstance(obj, list) else getattr(obj, name)
    return obj


def _replace_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_path, _, leaf = dotted.rpartition(".")
    parent = _module_at(root, parent_path) if parent_path else root
    setattr(parent, leaf, new)


def plan_offloaded(model_path: str | os.PathLike, config: Optional[RuntimeConfig] = None, *, pipeline=None,
                   group=None, **fields):
    """What ``load_offloaded`` would choose, with every check it makes, reading only headers:
    a ``golem.runtime.sizing.Sizing`` (slots per layer, plan, warm start, the sizing line);
    with ``pipeline``, this rank's."""
    from golem.runtime.sizing import load_warm_profile, size_model

    config = make_config(config, **fields)
    check_output_paths(config, model_path)  # before a repo id is fetched
    path = resolve_model_path(str(model_path))
    profile = load_warm_profile(config, model_path)  # before any of the model's files is opened
    with FreedOnFailure() as freed:
        opened = open_checkpoint(path, pipeline=pipeline, group=group)
        freed.add(opened.model)
        config = _checked_against(config, opened)
        return size_model(config, opened, profile=profile)


def _checked_against(config: RuntimeConfig, opened: OpenedCheckpoint) -> RuntimeConfig:
    """``config`` checked against the model's shape; with a pipeline, the depth and layer
    numbers against the whole model, then narrowed to this rank's layers
    (``golem.runtime.pipeline.local_config``)."""
    import dataclasses

    moe_layers = sorted(opened.layers)
    k, e = top_k_of(opened.config), opened.num_experts[moe_layers[0]]
    if config.prefetch is not None and config.prefetch.auto:  # auto's ceiling, within the model's layers
        config = with_prefetch_depth(config, config.prefetch.for_layers(len(moe_layers)).depth)
    if opened.pipeline is None:
        check_against_model(config, moe_layers=moe_layers, num_layers=opened.num_layers, num_experts=e, top_k=k)
        return config
    from golem.runtime.pipeline import local_config

    local = local_config(config, opened.pipeline, moe_layers)
    whole = dataclasses.replace(local, cache_sizes=None)
    if config.prefetch is not None:  # the depth is checked against the whole model's layers
        whole = with_prefetch_depth(whole, config.prefetch.depth)
    check_against_model(whole, moe_layers=range(opened.num_layers), num_layers=opened.num_layers, num_experts=e,
                        top_k=k)
    check_against_model(local, moe_layers=moe_layers, num_layers=opened.num_layers, num_experts=e, top_k=k)
    return local


def _traces(sources) -> list:
    """Trace objects as they are; paths (files or folders of them) loaded."""
    from golem.runtime.trace import load_traces

    out = []
    for source in sources:
        out.extend([source] if hasattr(source, "experts") else load_traces([source]))
    return out
