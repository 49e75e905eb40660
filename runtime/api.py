"""The library entry point: ``golem.runtime.load`` for other mlx apps.

Returns a model and tokenizer that mlx-lm's ``generate``, ``stream_generate`` and
``generate_step`` drive unchanged, and owns closing what the runtime started: on ``close()``,
or, with a ``ResourceWarning``, when the model is dropped without it. ``load()`` and ``plan()``
take every runtime option as a keyword (their signatures list the declared options).
"""

from __future__ import annotations

import warnings
import weakref
from inspect import Parameter, Signature
from pathlib import Path
from typing import Any, Optional

from golem.runtime.config import ConfigError, RuntimeConfig, make_config, option_parameters
from golem.runtime.checkpoint import ModelError
from golem.runtime.loader import load_offloaded
from golem.runtime.offloaded import OffloadedModel


class Loaded(tuple):
    """``(model, tokenizer)``, plus ``close()`` and context-manager use.

    Unpacks like mlx-lm's ``load``: ``model, tokenizer = golem.runtime.load(path)``.
    ``runtime`` is the ``OffloadedModel`` (engine, pools, statistics, plan).
    """

    runtime: OffloadedModel

    def __new__(cls, model, tokenizer, runtime: OffloadedModel):
        obj = super().__new__(cls, (model, tokenizer))
        obj.runtime = runtime
        return obj

    @property
    def model(self):
        return self[0]

    @property
    def tokenizer(self):
        return self[1]

    @property
    def plan(self):
        """The memory plan golem chose (``golem.runtime.memplan.MemoryPlan``)."""
        return self.runtime.plan

    def close(self) -> None:
        """Write what the options keep (``trace_out``, ``save_profile``), then release
        every thread, file and buffer of the runtime."""
        try:
            self.runtime.finish()
        finally:
            self.runtime.close()

    def __enter__(self) -> "Loaded":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # a failed run keeps nothing
            self.runtime.close(failed=True)


def load(path: str, config: Optional[RuntimeConfig] = None, *, tokenizer_config: Optional[dict] = None,
         model_config: Optional[dict] = None, adapter_path: Optional[str] = None,
         trust_remote_code: bool = False, progress=None, pipeline=None, group=None, **fields: Any) -> Loaded:
    """Load an MoE checkpoint with offloaded experts, sized and warmed as ``golem-run`` does.

    Args:
        path: local model folder or Hugging Face repo id.
        config: a ``golem.runtime.config.RuntimeConfig``; or give its fields as keywords,
            named as golem-run's flags (``memory_budget="48GB"``, ``pin_layers="0-3"``,
            ``prefetch_depth=2, threshold=0.3``, ``warm_start="saved"``, ``cache_sizes=4``,
            ``policy="lru"``, ...; ``help(RuntimeConfig)`` lists them all), which change
            ``config`` when both are given.
        tokenizer_config: passed to mlx-lm's tokenizer loader.
        model_config: fields that override config.json (as mlx-lm's ``load``).
        adapter_path: LoRA adapters for the resident weights (as mlx-lm's ``load``).
        trust_remote_code: let mlx-lm run model code shipped with the checkpoint.
        progress: ``progress(stage, done_nbytes, total_nbytes)``, called while the weights load
            and the warm start reads its experts (see ``golem.runtime.loader.load_offloaded``).
        pipeline: under ``mlx.launch``, run only this rank's layers (pipeline parallel, as
            mlx-lm's ``--pipeline``): ``True`` or ``"even"`` (mlx-lm's split: rank 0 the last
            layers), ``"bytes"`` (balance the layers' bytes), or layers per rank in rank order
            (``[10, 14]``), or a ``golem.runtime.pipeline.PipelineConfig`` (the split, and
            whether to prefetch across ranks). Every rank must then drive the model identically (same prompt,
            same calls); ``memory_budget="8GB,16GB"`` gives each rank its own budget.
            ``model.golem.pipeline`` says which layers this rank runs.
        group: the ``mx.distributed`` group (default: the one ``mlx.launch`` set up).

    Raises:
        ConfigError: an option is wrong (named in the message); checked before any work.
        golem.runtime.checkpoint.ModelError, golem.io.index.CheckpointError: the model cannot run
            (a tokenizer file it cannot read included).
    """
    if pipeline is not None and pipeline is not False:
        from golem.runtime import pipeline as stages

        group = group if group is not None else stages.init_group()
        if "memory_budget" in fields:
            fields["memory_budget"] = stages.per_rank(fields["memory_budget"], group.rank(), group.size(),
                                                      "--memory-budget")
    config = make_config(config, **fields)
    if group is not None and group.size() > 1:
        _check_pipeline_options(config)
    _check_path(path)
    _check_load_arguments(tokenizer_config, model_config, adapter_path, trust_remote_code)
    runtime = load_offloaded(path, config, model_config=model_config, adapter_path=adapter_path,
                             trust_remote_code=trust_remote_code, progress=progress, pipeline=pipeline, group=group)
    try:
        tokenizer = _load_tokenizer(runtime.path, tokenizer_config, runtime.config.get("eos_token_id", None))
    except BaseException:
        runtime.close()
        raise
    runtime.model.golem = runtime
    if runtime.pipeline is not None:
        from golem.runtime.pipeline import barrier, start_watchdog

        try:
            barrier(runtime.pipeline)  # a rank that failed to load stops the others here
            runtime.watchdog = start_watchdog(runtime.pipeline)
        except BaseException:
            runtime.close(failed=True)
            raise
    # The finalizer holds what it closes, never the model: the model's death is what it waits for.
    runtime.release_on_drop(weakref.finalize(runtime.model, _dropped, runtime.engine, runtime.reader, str(path),
                                             _unwritten(config)))
    return Loaded(runtime.model, tokenizer, runtime)


def _check_path(path) -> None:
    import os

    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"path: expected a model folder or Hugging Face repo id, got {path!r}")


def _check_load_arguments(tokenizer_config, model_config, adapter_path, trust_remote_code) -> None:
    """``load()``'s arguments that are mlx-lm's, by type."""
    import os

    for name, value in (("tokenizer_config", tokenizer_config), ("model_config", model_config)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a dict, got {type(value).__name__} {value!r:.60}")
    if adapter_path is not None and (not isinstance(adapter_path, (str, os.PathLike)) or not str(adapter_path)):
        raise ConfigError(f"adapter_path (--adapter-path): expected a folder, got {adapter_path!r:.60}")
    if not isinstance(trust_remote_code, bool):
        raise ConfigError(f"trust_remote_code (--trust-remote-code): expected True or False, got {trust_remote_code!r:.60}")


def _unwritten(config: RuntimeConfig) -> str:
    """What a model dropped without ``close()`` does not write, in words."""
    kept = [f"trace_out={str(config.trace_out)!r}" if config.trace_out is not None else "",
            "save_profile" if config.save_profile else ""]
    kept = [k for k in kept if k]
    return f"; {' and '.join(kept)} not written" if kept else ""


def _dropped(engine, reader, path: str, unwritten: str) -> None:
    """A loaded model was garbage-collected (or the interpreter exits) without ``close()``:
    stop its I/O threads and close its files, and say so."""
    warnings.warn(f"golem: the model loaded from {path} was dropped without close(): its I/O threads and "
                  f"files are released now{unwritten} (use `with golem.runtime.load(...)` or call close())",
                  ResourceWarning, stacklevel=1)
    try:
        engine.close()
    finally:
        reader.close()


def _check_pipeline_options(config: RuntimeConfig) -> None:
    """Options that speak of the whole model's routing, which no rank of a pipeline sees."""
    import os

    if config.trace_out is not None or config.save_profile:
        what = "--trace-out" if config.trace_out is not None else "--save-profile"
        raise ConfigError(f"{what} with --pipeline: each rank sees only its own layers' routing; "
                          "record traces and profiles on one machine")
    if isinstance(config.warm_start, (str, os.PathLike)):
        raise ConfigError(f"-W/--warm-start {config.warm_start} with --pipeline: traces and profiles describe the "
                          "whole model, not one rank's layers; use -R SEED or none")


def _load_tokenizer(path: Path, tokenizer_config: Optional[dict], eos_token_ids):
    """mlx-lm's tokenizer of the model folder ``path``; a file it cannot read is a ``ModelError``
    naming the folder and, where the message says which, the file."""
    from mlx_lm.utils import load_tokenizer

    try:
        return load_tokenizer(path, tokenizer_config or {}, eos_token_ids=eos_token_ids)
    except Exception as e:  # the tokenizer libraries raise many kinds for a damaged or missing file
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        names = sorted((f.name for f in path.iterdir() if f.name in detail), key=len, reverse=True)
        where = path / names[0] if names else path
        raise ModelError(f"{where}: cannot load the model's tokenizer ({detail})") from None


def plan(path: str, config: Optional[RuntimeConfig] = None, *, pipeline=None, group=None, **fields: Any):
    """The sizing ``load(path, config, **fields)`` would choose, reading only the checkpoint's
    headers: ``.plan`` (``MemoryPlan``; ``.describe()`` is golem-run's ``--plan`` table),
    ``.cache_sizes``, ``.warm``, ``.note``; with ``pipeline`` (as ``load``), this rank's."""
    from golem.runtime.loader import plan_offloaded

    config = make_config(config, **fields)
    _check_path(path)
    return plan_offloaded(path, config, pipeline=pipeline, group=group)


def pack(path: str, *, check: bool = False, trust_remote_code: bool = False, progress=None) -> Optional[Path]:
    """What golem-pack does: write the packed copy of the experts of the model at ``path``
    (a folder or a Hugging Face repo id) into its folder, after which every ``load`` of it
    reads a missing expert with one read (``golem.io.packed_experts``); returns the pack's
    manifest. ``check``: write nothing, return the manifest when the folder holds a pack
    ``load`` will use, else None (a pack that no longer matches is a ``CheckpointError``).
    ``progress(done, total)``: bytes packed, after each MoE layer."""
    from golem.io.packed_experts import MANIFEST_FILE, open_packed, pack_experts
    from golem.runtime.checkpoint import open_checkpoint

    _check_path(path)
    index = open_checkpoint(path, trust_remote_code=trust_remote_code).index
    if check:
        return None if open_packed(index) is None else Path(index.index.model_dir) / MANIFEST_FILE
    manifest = pack_experts(index, progress=progress)
    open_packed(index)  # what a load will check
    return manifest


def _with_options(function, leading) -> None:
    """``function``'s signature: ``leading`` parameters, then every declared option as a keyword."""
    function.__signature__ = Signature([*leading, *option_parameters()])


_PATH = Parameter("path", Parameter.POSITIONAL_OR_KEYWORD)
_CONFIG = Parameter("config", Parameter.POSITIONAL_OR_KEYWORD, default=None)
_DISTRIBUTED = [Parameter(name, Parameter.KEYWORD_ONLY, default=None) for name in ("pipeline", "group")]
_with_options(load, [_PATH, _CONFIG, *(Parameter(name, Parameter.KEYWORD_ONLY, default=default) for name, default in (
    ("tokenizer_config", None), ("model_config", None), ("adapter_path", None), ("trust_remote_code", False),
    ("progress", None))), *_DISTRIBUTED])
_with_options(plan, [_PATH, _CONFIG, *_DISTRIBUTED])


__all__ = ["ConfigError", "Loaded", "RuntimeConfig", "load", "pack", "plan"]
