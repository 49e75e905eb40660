"""Loading an mlx-lm checkpoint with its experts offloaded.

Owns the path from a model folder (or Hugging Face repo id) to a ready model: mlx-lm's own
lazy load, finding every experts module, checking the checkpoint's expert tensors against
it, replacing the stacked arrays with slot pools, and evaluating only the non-expert weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from golem.io.index import CheckpointError, ExpertIndex, SafetensorsIndex
from golem.io.outputs import check_output, check_outside

from golem.runtime.config import (ConfigError, RuntimeConfig, check_against_model, check_output_paths, make_config,
                                  with_prefetch_depth)
from golem.runtime.engine import DiskReader, Engine, OffloadedExperts
from golem.runtime.slots import PoolPart, SlotPool
from golem.runtime.writers import SlotWriters


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


def _hub_allow_patterns() -> list:
    """The files mlx-lm fetches of a hub model (public as a list since mlx-lm 0.32)."""
    try:
        from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

        return list(DEFAULT_ALLOW_PATTERNS)
    except ImportError:  # older mlx-lm: the same list, inside its loader
        return ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken",
                "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]


def resolve_model_path(model: str) -> Path:
    """A local folder as is; otherwise a Hugging Face repo id, fetched the way mlx-lm does."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {model}: not a folder")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=_hub_allow_patterns()))
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


def release_arrays(modules) -> None:
    """Replace every array of ``modules`` (and their children) by an unread placeholder of the
    same shape. mlx-lm's lazily loaded arrays keep the checkpoint's files open until they are
    freed or evaluated; a failed load frees them here instead of leaving it to the collector."""
    from mlx.utils import tree_map

    for module in modules:
        module.update(tree_map(lambda a: mx.zeros(a.shape, a.dtype), module.parameters()))


class FreedOnFailure:
    """A block that frees what it loaded when it fails: the arrays of the modules it was
    given (``add``), and the locals of the frames the exception holds (a caller that keeps
    the exception would otherwise keep the lazily loaded model, and its open files, alive).
    The exception itself, its message and its traceback's lines, are unchanged."""

    def __init__(self):
        self.modules: list = []

    def add(self, *modules: nn.Module) -> None:
        self.modules.extend(modules)

    def __enter__(self) -> "FreedOnFailure":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        modules, self.modules = self.modules, []
        if exc is not None:
            release_arrays(modules)
            _clear_frames(exc)
        return False


def _clear_frames(exc: Optional[BaseException], seen: Optional[set] = None) -> None:
    """Clear the finished frames of ``exc``'s traceback and of the exceptions it was raised
    from or while handling (``traceback.clear_frames`` leaves frames still running alone)."""
    import traceback

    seen = set() if seen is None else seen
    if exc is None or id(exc) in seen:
        return
    seen.add(id(exc))
    traceback.clear_frames(exc.__traceback__)
    _clear_frames(exc.__cause__, seen)
    _clear_frames(exc.__context__, seen)


@dataclass
class OffloadedModel:
    """What ``load_offloaded`` builds: the model, its engine, and where memory went.

    ``options`` is the ``RuntimeConfig`` it was loaded with, ``plan`` the memory plan (None
    when slots were given outright) and ``sizing_note`` one line saying how it was sized.
    """

    model: nn.Module
    config: dict
    path: Path
    engine: Engine
    index: ExpertIndex
    experts: List[ExpertsModule]
    reader: DiskReader
    non_expert_nbytes: int = 0
    options: Optional[RuntimeConfig] = None
    plan: object = None
    sizing_note: Optional[str] = None
    model_path: Optional[str] = None
    pipeline: object = None  # golem.runtime.pipeline.Pipeline when this process is one stage
    watchdog: object = None  # golem.runtime.pipeline.Watchdog: a lost rank ends this one
    _closed: bool = field(default=False, repr=False)
    _finished: bool = field(default=False, repr=False)
    _finalizer: object = field(default=None, repr=False)

    @property
    def num_experts(self) -> int:
        return self.index.num_experts(self.experts[0].layer)

    @property
    def top_k(self) -> int:
        return top_k_of(self.config)

    def stats(self):
        """The expert figures since load (or ``reset_stats``): ``golem.runtime.report.ExpertStats``
        (hits, misses, bytes read, stall, prefetch, residency; per layer and in total)."""
        from golem.runtime.report import stats

        return stats(self)

    def reset_stats(self) -> None:
        """Count ``stats()`` from zero again (the engine's counters keep running)."""
        from golem.runtime.report import reset_stats

        reset_stats(self)

    def save_trace(self, path=None) -> Optional[Path]:
        """Write the recorded routing to ``path`` (default: the ``trace_out`` option)."""
        path = path if path is not None else (self.options.trace_out if self.options else None)
        if path is None:
            return None
        if self.engine.trace is None:
            raise ConfigError("no trace recorded: load with record=True or trace_out=PATH")
        self.engine.trace.save(path, what="--trace-out", protected=[self.path])
        return Path(path)

    def save_profile(self) -> Path:
        """Merge this run's routing (decode steps) into the model's saved profile."""
        from golem.runtime.profiles import model_identity, profile_from_traces, record_profile

        from golem.runtime.sizing import profile_dir

        if self.engine.trace is None:
            raise ConfigError("no routing recorded to profile: load with save_profile=True or record=True")
        policy = self.options.policy if self.options else "lru"
        policies = [policy] if policy != "lru" else []  # LRU's curve comes from the stack histogram
        run = profile_from_traces([self.engine.trace.trace()], policies=policies)
        run.meta["model"] = model_identity(self.path)
        return record_profile(profile_dir(self.model_path or self.path), run)

    def finish(self) -> dict:
        """Write what the options asked to keep (``trace_out``, ``save_profile``); returns
        ``{"trace": path, "profile": path}`` for what was written."""
        out = {}
        if self.options is not None and not self._closed and not self._finished:
            self._finished = True
            wanted = [what for what, on in (("trace_out", self.options.trace_out is not None),
                                            ("save_profile", self.options.save_profile)) if on]
            if wanted and (self.engine.trace is None or self.engine.trace.num_rows == 0):
                import warnings

                # A model that generated nothing is valid: there is nothing to keep, and no file is touched.
                warnings.warn(f"golem: nothing was generated, so {' and '.join(wanted)} wrote nothing",
                              RuntimeWarning, stacklevel=3)
                return out
            if self.options.trace_out is not None:
                out["trace"] = self.save_trace()
            recorded = self.engine.trace is None or self.engine.trace.num_steps > 0
            if self.options.save_profile and recorded:  # loaded, nothing generated: nothing to merge
                out["profile"] = self.save_profile()
        return out

    def release_on_drop(self, finalizer) -> None:
        """``finalizer`` (a ``weakref.finalize``) releases the runtime if the model is dropped
        unclosed; ``close`` detaches it."""
        self._finalizer = finalizer

    def close(self, *, failed: bool = False) -> None:
        """Stop the I/O threads and close the files; with a pipeline, also tell the other
        ranks this one finished (unless ``failed``: its silence then ends them)."""
        if self._closed:
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        if self.watchdog is not None:
            self.watchdog.close(failed=failed)
        self.engine.close()
        self.reader.close()


def top_k_of(config: dict) -> int:
    from golem.predictors.families import config_top_k

    top_k = config_top_k(config)
    if top_k is not None:
        return top_k
    raise ModelError("config.json does not say how many experts a token uses (num_experts_per_tok)")


def read_model_config(path: Path, *, trust_remote_code: bool = False) -> dict:
    """``path/config.json``, checked before mlx-lm builds the model: readable, a JSON object,
    a ``model_type`` mlx-lm knows, every field its ``ModelArgs`` requires, whole numbers where
    it expects them, and a whole top-k. Each failure is a ``ModelError`` naming the file and field."""
    import dataclasses
    import importlib
    import json

    from golem.runtime.model_config import MAX_CONFIG_NBYTES, check_sizes

    file = path / "config.json"
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_CONFIG_NBYTES + 1)
    except OSError as e:
        raise ModelError(f"{file}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_NBYTES:
        raise ModelError(f"{file}: more than {MAX_CONFIG_NBYTES >> 20} MiB, not a model's config.json")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{file}: not valid JSON ({e})") from None
    except RecursionError:
        raise ModelError(f"{file}: not valid JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise ModelError(f"{file}: not a JSON object (got {type(config).__name__})")
    if "model_type" not in config:
        raise ModelError(f"{file}: no 'model_type' field (which architecture is this model?)")
    model_type = config["model_type"]
    if not isinstance(model_type, str):
        raise ModelError(f"{file}: field 'model_type' must be a string, got {model_type!r}")
    import mlx_lm.utils

    remap = getattr(mlx_lm.utils, "MODEL_REMAPPING", {})
    try:
        arch = importlib.import_module(f"mlx_lm.models.{remap.get(model_type, model_type)}")
    except ImportError:
        if not trust_remote_code:  # with it, the model's own code may define the type
            raise ModelError(f"{file}: model_type {model_type!r} is not a model mlx-lm supports") from None
        arch = None
    args_class = getattr(arch, "ModelArgs", None)
    if args_class is not None and dataclasses.is_dataclass(args_class):
        for f in dataclasses.fields(args_class):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in config:
                raise ModelError(f"{file}: field {f.name!r} is missing (model_type {model_type!r} needs it)")
            value = config.get(f.name)
            if f.name in config and f.type in (int, "int") and (not isinstance(value, int) or isinstance(value, bool)):
                raise ModelError(f"{file}: field {f.name!r} must be a whole number, got {value!r}")
    check_sizes(config, file, ModelError)  # before anything is sized or divided by them
    from golem.predictors.families import config_top_k_keys

    c = config.get("text_config", config)
    if isinstance(c, dict):
        for key in config_top_k_keys(config):
            if key in c:
                value = c[key]
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ModelError(f"{file}: field {key!r} (experts per token) must be a whole number >= 1, "
                                     f"got {value!r}")
                break
    return config


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
    pipeline: object = None  # golem.runtime.pipeline.Pipeline: this rank's layers only

    def non_expert_nbytes(self) -> int:
        """Bytes of the resident (non-expert) tensors this process loads: with a pipeline,
        its own layers' and the ones every rank keeps (embeddings, final norm, head)."""
        expert_names = set(self.index.tensor_names())
        st = self.index.index
        owns = self.pipeline.owns_tensor if self.pipeline is not None else (lambda name: True)
        return st.nbytes(n for n in st.tensors if n not in expert_names and owns(n))

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model (what layer ranges may name)."""
        c = self.config.get("text_config", self.config)
        n = c.get("num_hidden_layers") if isinstance(c, dict) else None
        layers = getattr(getattr(self.model, "model", self.model), "layers", None)
        counted = len(layers) if isinstance(layers, list) else 0
        return max(int(n) if isinstance(n, int) else 0, counted, max(self.layers) + 1)

    def memory(self):
        """What the memory planner needs: shapes and byte sizes, measured from the headers."""
        from golem.runtime.memplan import ModelMemory

        moe = sorted(self.layers)
        return ModelMemory(
            num_layers=len(moe),
            num_experts=self.num_experts[moe[0]],
            top_k=top_k_of(self.config),
            expert_nbytes=[sum(t.expert_nbytes for t in self.index.parts(l)) for l in moe],
            non_expert_nbytes=self.non_expert_nbytes(),
            layer_ids=moe,
        )


def open_checkpoint(model_path: str | os.PathLike, *, model_config: Optional[dict] = None,
                    adapter_path: Optional[str] = None, trust_remote_code: bool = False,
                    pipeline=None, group=None) -> OpenedCheckpoint:
    """Validate the checkpoint's config and headers, load the model lazily, index its experts.

    Args:
        model_path: local model folder or Hugging Face repo id.
        model_config: fields that override config.json (as mlx-lm's ``load``).
        adapter_path: LoRA adapters (as mlx-lm's ``load``); they must leave the experts alone.
        trust_remote_code: let mlx-lm run model code shipped with the checkpoint.
        pipeline: split the layers across the ranks of ``group`` (see
            ``golem.runtime.pipeline.parse_split``); this process keeps only its layers.
        group: the ``mx.distributed`` group (default: the one ``mlx.launch`` set up).
    """
    path = resolve_model_path(str(model_path))
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (is this an mlx-lm model folder?)")
    config = read_model_config(path, trust_remote_code=trust_remote_code)
    st_index = SafetensorsIndex(path)  # validates every header before anything runs
    from golem.runtime.model_config import check_against_tensors

    check_against_tensors(config, st_index.tensors, path / "config.json", ModelError)
    with FreedOnFailure() as freed:
        return _open_lazily(path, st_index, freed, model_config=model_config, adapter_path=adapter_path,
                            trust_remote_code=trust_remote_code, pipeline=pipeline, group=group)


def _open_lazily(path: Path, st_index: SafetensorsIndex, freed: FreedOnFailure, *, model_config: Optional[dict],
                 adapter_path: Optional[str], trust_remote_code: bool, pipeline=None,
                 group=None) -> OpenedCheckpoint:
    """``open_checkpoint`` from mlx-lm's lazy load on; what it loads is handed to ``freed``."""
    from mlx_lm.utils import load_model

    try:
        remote = {"trust_remote_code": True} if trust_remote_code else {}
        model, config = load_model(path, lazy=True, model_config=model_config or {}, **remote)
    except ValueError as e:
        raise ModelError(f"{path}: mlx-lm cannot load this model: {e}") from None
    except KeyError as e:  # mlx-lm's quantization inference looks tensors up by name
        raise CheckpointError(f"{path}: tensor {e.args[0]!r} is missing from the checkpoint") from None
    except TypeError as e:  # a config value of the wrong kind reaching the model's constructor
        raise ModelError(f"{path / 'config.json'}: mlx-lm cannot build the model from it ({e})") from None
    freed.add(model)
    if adapter_path is not None:
        model = _with_adapters(model, adapter_path)
        freed.add(model)
    stage = None
    if pipeline is not None and pipeline is not False:
        from golem.runtime.pipeline import PipelineError, apply

        try:
            stage = apply(model, pipeline, group=group, tensors=st_index.tensors, model_type=config.get("model_type"))
        except PipelineError as e:
            raise ModelError(str(e)) from None
    experts = find_experts_modules(model)
    if not experts and stage is not None:
        raise ModelError(
            f"{path}: --pipeline: rank {stage.rank} runs layers {stage.describe_rank()}, which hold no MoE "
            f"experts ({stage.describe()}); give every rank an MoE layer with an explicit split "
            "(--pipeline N0,N1,...: layers per rank, rank 0 the last ones)"
        )
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
    k = top_k_of(config)
    e = num_experts[experts[0].layer]
    if k > e:
        raise ModelError(f"{path / 'config.json'}: top-k {k} (experts per token) is more than the "
                         f"{e} experts of each MoE layer")
    index = ExpertIndex(st_index, layers, num_experts)
    return OpenedCheckpoint(model, config, path, experts, index, layers, num_experts, pipeline=stage)


def _with_adapters(model: nn.Module, adapter_path: str) -> nn.Module:
    """mlx-lm's adapters (LoRA, DoRA or full) on the resident weights; adapters that touch
    experts are refused (golem streams the checkpoint's expert bytes as they are)."""
    from mlx_lm.utils import load_adapters

    def expert_arrays():
        return {(em.layer, name): id(arr) for em in find_experts_modules(model)
                for name, arr in tree_flatten(em.module.parameters())}

    before = expert_arrays()
    try:
        model = load_adapters(model, adapter_path)
    except FileNotFoundError as e:
        raise ConfigError(f"--adapter-path {adapter_path}: {e.strerror or e}"
                          f"{': ' + str(e.filename) if getattr(e, 'filename', None) else ''}") from None
    model.eval()
    after = expert_arrays()
    if after != before:
        layer = min(l for l, _ in {k for k in {*after, *before} if after.get(k) != before.get(k)})
        raise ConfigError(f"--adapter-path {adapter_path}: the adapters change the experts of layer {layer}, "
                          "which golem streams from disk as stored; use adapters that leave the experts "
                          "(switch_mlp) alone, or fuse them into the checkpoint with mlx_lm.fuse")
    return model


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
    whole = dataclasses.replace(local, capacities=None)
    if config.prefetch is not None:  # the depth is checked against the whole model's layers
        whole = with_prefetch_depth(whole, config.prefetch.depth)
    check_against_model(whole, moe_layers=range(opened.num_layers), num_layers=opened.num_layers, num_experts=e,
                        top_k=k)
    check_against_model(local, moe_layers=moe_layers, num_layers=opened.num_layers, num_experts=e, top_k=k)
    return local


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
        **fields: ``RuntimeConfig`` fields, changing ``config`` (e.g. ``capacities=4``).
    """
    from golem.runtime.sizing import load_warm_profile

    config = make_config(config, **fields)
    if config.save_profile and os.path.isdir(model_path):  # before its folder is made
        from golem.runtime.sizing import profile_dir

        check_outside(profile_dir(model_path), what="--save-profile (golem's cache)", protected=[model_path])
    check_output_paths(config, model_path)  # before a repo id is fetched
    path = resolve_model_path(str(model_path))
    if config.trace_out is not None:  # never a file of the model, nor a link, device or folder
        check_output(config.trace_out, what="--trace-out", protected=[path])
    # Every file the options name is read before any of the model's: a bad one fails with nothing open.
    profile = load_warm_profile(config, model_path)
    truth = config.predictor_trace
    if truth is not None and not hasattr(truth, "experts"):
        from golem.runtime.trace import load_trace

        truth = load_trace(truth).decode_only()
    train = _traces(config.predictor_train)
    with FreedOnFailure() as freed:
        return _assemble(path, config, freed, profile=profile, truth=truth, train=train, model_path=str(model_path),
                         model_config=model_config, adapter_path=adapter_path, trust_remote_code=trust_remote_code,
                         progress=progress, pipeline=pipeline, group=group)


def _assemble(path: Path, config: RuntimeConfig, freed: FreedOnFailure, *, profile, truth, train: list,
              model_path: str, model_config: Optional[dict], adapter_path: Optional[str],
              trust_remote_code: bool, progress: Optional[Progress] = None, pipeline=None,
              group=None) -> OffloadedModel:
    """``load_offloaded`` from opening the checkpoint on: the lazily loaded model is handed to
    ``freed``, and every thread and file started here is closed if a later step fails."""
    from golem.runtime.sizing import size_model

    opened = open_checkpoint(path, model_config=model_config, adapter_path=adapter_path,
                             trust_remote_code=trust_remote_code, pipeline=pipeline, group=group)
    freed.add(opened.model, *(em.module for em in opened.experts))
    model, mconfig, experts, index = opened.model, opened.config, opened.experts, opened.index
    st_index, layers, num_experts = index.index, opened.layers, opened.num_experts
    moe_layers = sorted(layers)
    k = top_k_of(mconfig)
    config = _checked_against(config, opened)
    sizing = size_model(config, opened, profile=profile)
    throttle = config.throttle
    if config.emulate_storage is not None:
        from golem.io.storage import parse_throttle

        throttle = parse_throttle(config.emulate_storage)
    prefetch = config.prefetch
    if prefetch is not None and prefetch.auto and all(c >= num_experts[l] for l, c in sizing.capacities.items()):
        prefetch = None  # every expert resident: nothing to prefetch

    started: list = []  # what to close, last first, if anything below fails
    try:
        reader = DiskReader(index, direct=config.direct_io, throttle=throttle, identities=st_index.identities)
        started.append(reader)
        reader.handles.pin(config.direct_io)  # every shard opened once, as indexed; read only through these
        pools: Dict[int, SlotPool] = {}
        writers = SlotWriters(config.slot_writer)
        for em in experts:
            parts = []
            for st in index.parts(em.layer):
                owner_path, _, attr = st.part.rpartition(".")
                owner = _module_at(em.module, owner_path) if owner_path else em.module
                parts.append(PoolPart(st, owner, attr))
            pools[em.layer] = SlotPool(em.layer, num_experts[em.layer], sizing.capacities[em.layer], parts,
                                       policy=config.policy, writers=writers)

        scheduler = None
        if any(not p.fully_resident for p in pools.values()):
            from golem.io.scheduler import IOScheduler, SchedulerSettings

            staging = sizing.staging
            opts = {} if config.io_parallelism is None else {"parallelism": config.io_parallelism}
            settings = SchedulerSettings(
                buffer_nbytes=staging.buffer_nbytes,
                num_buffers=staging.num_buffers,
                speculative_nbytes=staging.speculative_nbytes,
                speculative_s=staging.speculative_s,
                direct=config.direct_io,
                **opts,
            )
            scheduler = IOScheduler(lambda key: index.ranges(*key),
                                    lambda key: index.expert_nbytes(key[0]), settings,
                                    handles=reader.handles)
            started.append(scheduler)
            scheduler.start()

        residuals: Dict[int, mx.array] = {}
        prefetcher = None
        blocks = None
        predictor_options = dict(config.predictor_options or {})
        if truth is not None:
            predictor_options["truth"] = truth
        if prefetch is not None or config.record:
            from golem.predictors.routers import find_moe_blocks

            from golem.runtime.engine import ResidualTap

            blocks = find_moe_blocks(model)
            layer_input = predictor_options.get("hidden_kind") == "layer_input"
            for b in blocks:  # layer_input: the residual entering the decoder layer, for lookahead on it
                attr = b.norm_attr("layer_input" if layer_input else "post_attn")
                setattr(b.layer, attr, ResidualTap(getattr(b.layer, attr), residuals, b.model_layer))
        if prefetch is not None and scheduler is not None:
            from golem.predictors.base import RoutingShape
            from golem.predictors.registry import PredictorOptions, make_predictor

            from golem.runtime.prefetch import Prefetcher

            shape = RoutingShape(len(moe_layers), num_experts[moe_layers[0]], k)
            popts = PredictorOptions(blocks=blocks, **predictor_options)
            pred = make_predictor(config.predictor, shape, popts)
            if train:
                pred.fit(train)
            prefetcher = Prefetcher(
                pred, prefetch, moe_layers, k, [index.expert_nbytes(l) for l in moe_layers],
                [not pools[l].fully_resident for l in moe_layers],
            )
        engine = Engine(index, pools, reader, scheduler=scheduler, prefetcher=prefetcher,
                        hidden=lambda layer, x: residuals.get(layer))
        started.append(engine)
        if opened.pipeline is not None and prefetch is not None:
            from golem.runtime.pipeline import connect_boundaries

            connect_boundaries(opened.pipeline, engine, can_send=blocks is not None)
        for em in experts:
            _replace_module(model, em.path, OffloadedExperts(em.module, em.layer, engine))
        if config.record:
            from golem.runtime.recorder import TraceRecorder

            by_layer = {b.model_layer: b for b in blocks}
            engine.trace = TraceRecorder(
                moe_layers, num_experts[moe_layers[0]], k, index.expert_nbytes(moe_layers[0]),
                route=lambda layer, x: by_layer[layer].route(x)[1],
                residual=(lambda layer: residuals[layer]) if config.trace_hidden else None,
                meta={"model_type": mconfig.get("model_type"), "model": str(path)},
            )
        non_expert_nbytes = opened.non_expert_nbytes()  # this rank's, with a pipeline
        _load_resident(model, engine, pools, progress)  # the pools are zeros until filled
        if sizing.warm:
            _warm_start(engine, pools, sizing.warm, progress)
        reader.handles.check_all()  # mlx-lm read the resident weights by path: still the files indexed?
    except BaseException:
        for thing in reversed(started):
            try:
                thing.close()
            except Exception:  # closing after a failure: the first error is the one to report
                pass
        raise
    return OffloadedModel(model, mconfig, path, engine, index, experts, reader, non_expert_nbytes,
                          options=config, plan=sizing.plan, sizing_note=sizing.note, model_path=model_path,
                          pipeline=opened.pipeline)


Progress = Callable[[str, int, int], None]  # (stage, done_nbytes, total_nbytes)
EVAL_CHUNK_NBYTES = 64 << 20  # resident weights evaluated in groups of this size when progress is drawn


def _load_resident(model, engine, pools, progress: Optional[Progress]) -> None:
    """Read the resident weights (the non-expert ones: the pools are zeros until filled) and
    the experts of fully resident layers; with ``progress``, in groups, reporting bytes."""
    if progress is None:
        mx.eval(model.parameters())
        for layer, pool in pools.items():
            if pool.fully_resident:
                engine.preload(layer, range(pool.num_experts))
        return
    arrays = [a for _, a in tree_flatten(model.parameters())]
    full = [l for l, p in pools.items() if p.fully_resident]
    total = sum(a.nbytes for a in arrays) + sum(pools[l].expert_nbytes * pools[l].num_experts for l in full)
    done = 0
    progress("loading", 0, total)
    batch, size = [], 0
    for a in arrays + [None]:
        if a is not None:
            batch.append(a)
            size += a.nbytes
        if batch and (a is None or size >= EVAL_CHUNK_NBYTES):
            mx.eval(batch)  # one sync per 64 MB at load time, none per token
            done += size
            progress("loading", done, total)
            batch, size = [], 0
    for layer in full:
        pool = pools[layer]
        engine.preload(layer, range(pool.num_experts))
        done += pool.expert_nbytes * pool.num_experts
        progress("loading", done, total)


def _warm_start(engine, pools, warm: dict, progress: Optional[Progress]) -> None:
    """``engine.warm(warm)``, a layer at a time when ``progress`` reports its bytes."""
    if progress is None:
        engine.warm(warm)
        return
    sizes = {l: pools[l].expert_nbytes * min(len(e), pools[l].capacity) for l, e in warm.items()
             if l in pools and not pools[l].fully_resident}
    total, done = sum(sizes.values()), 0
    progress("warm start", 0, total)
    for layer, experts in warm.items():
        engine.warm({layer: experts})
        done += sizes.get(layer, 0)
        progress("warm start", done, total)


def _traces(sources) -> list:
    """Trace objects as they are; paths (files or folders of them) loaded."""
    from golem.runtime.trace import load_traces

    out = []
    for source in sources:
        out.extend([source] if hasattr(source, "experts") else load_traces([source]))
    return out
