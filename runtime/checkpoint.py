"""The opened checkpoint: a model folder (or Hugging Face repo id) loaded lazily by mlx-lm,
with its config checked, every experts module found and its expert index built.

Owns resolving the model path, reading and checking ``config.json``, mlx-lm's lazy load
(adapters, a pipeline rank's layers), checking the checkpoint's expert tensors against the
model, and freeing what a failed load holds (``FreedOnFailure``). Reads nothing but headers
and the config: no weights, no slots, no I/O threads (``golem.runtime.loader`` builds those).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from golem.io.index import CheckpointError, ExpertIndex, SafetensorsIndex

from golem.runtime.config import ConfigError


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



def release_arrays(modules) -> None:
    """Replace every array of ``modules`` (and their children) by an unread placeholder of the
    same shape. mlx-lm's lazily loaded arrays keep the checkpoint's files open until they are
    freed or evaluated; a failed load frees them here instead of leaving it to the collector."""
    from mlx.utils import tree_map

    for module in modules:
        module.update(tree_map(lambda a: mx.zeros(a.shape, a.dtype), module.parameters()))


class FreedOnFailure:
    """A block that frees what it loaded when it fails: first what it was given to close
    (``close_on_failure``: the I/O threads and files started, last first), then the arrays
    of the modules it was given (``add``), and the locals of the frames the exception holds
    (a caller that keeps the exception would otherwise keep the lazily loaded model, and its
    open files, alive). The exception itself, its message and its traceback's lines, are
    unchanged; an error while closing after it is not reported over it."""

    def __init__(self):
        self.modules: list = []
        self.started: list = []

    def add(self, *modules: nn.Module) -> None:
        self.modules.extend(modules)

    def close_on_failure(self, thing):
        """``thing.close()`` if the block fails; returns ``thing``."""
        self.started.append(thing)
        return thing

    def __enter__(self) -> "FreedOnFailure":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        modules, self.modules = self.modules, []
        started, self.started = self.started, []
        if exc is not None:
            for thing in reversed(started):
                try:
                    thing.close()
                except Exception:  # closing after a failure: the first error is the one to report
                    pass
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
    layers, num_experts = _expert_tensors(path, st_index, experts)
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


def _expert_tensors(path: Path, st_index: SafetensorsIndex, experts: List[ExpertsModule]
                    ) -> Tuple[Dict[int, Dict[str, str]], Dict[int, int]]:
    """Every experts module's tensors checked against the checkpoint (stored stacked, with
    the shape and size the model expects): ``({layer: {part: tensor name}}, {layer: experts})``."""
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
    return layers, num_experts
