"""mlx-lm's own command lines (``mlx_lm.chat``, ``mlx_lm.server``) running golem models.

``GolemLoads`` answers mlx-lm's ``load`` with golem models built from one ``RuntimeConfig``
and closes them at the end; ``run_stock_main`` runs a stock module's ``main()`` with that
loader and with golem's runtime flags on its parser. Prompts, sampling, prompt caches,
streaming and HTTP stay mlx-lm's. Knows nothing of the chat or server protocols.
"""

from __future__ import annotations

import argparse
import sys
import types
from typing import Callable, Iterable, List, Optional

from golem.runtime.cli.about import add_version_flag
from golem.runtime.cli.flags import add_runtime_arguments, runtime_config
from golem.runtime.config import ConfigError, RuntimeConfig


class GolemLoads:
    """A stand-in for ``mlx_lm.utils.load`` (same arguments, same results) that loads with
    ``golem.runtime.load``. mlx-lm's mains hold one model at a time: loading another closes
    the one before. ``dense`` paths (a speculative-decoding draft model) load with stock
    mlx-lm, as they have no experts to offload."""

    def __init__(self, config: RuntimeConfig, dense: Iterable[str] = ()):
        self.config = config
        self.dense = {str(p) for p in dense if p}
        self.loaded: List = []

    def __call__(self, path_or_hf_repo, tokenizer_config=None, model_config=None, adapter_path=None,
                 lazy=False, return_config=False, revision=None, trust_remote_code=False, pipeline=None,
                 group=None):
        if str(path_or_hf_repo) in self.dense:
            from mlx_lm.utils import load

            return load(path_or_hf_repo, tokenizer_config=tokenizer_config, model_config=model_config,
                        adapter_path=adapter_path, lazy=lazy, return_config=return_config,
                        revision=revision, trust_remote_code=trust_remote_code)
        if revision is not None:
            raise ConfigError(f"{path_or_hf_repo}: golem loads a model's default revision only, "
                              f"not {revision!r}")
        import golem.runtime

        self.close()
        from golem.runtime.cli.progress import StageProgress

        with StageProgress() as progress:  # on a terminal a live line, else one summary line
            loaded = golem.runtime.load(str(path_or_hf_repo), self.config, tokenizer_config=tokenizer_config,
                                        model_config=model_config, adapter_path=adapter_path, progress=progress,
                                        pipeline=pipeline, group=group)
        self.loaded.append(loaded)
        model, tokenizer = loaded
        return (model, tokenizer, loaded.runtime.config) if return_config else (model, tokenizer)

    def close(self) -> None:
        """Close every golem model loaded (writing a ``--trace-out`` or ``--save-profile``); a
        model that ran no token (a server stopped before its first request) writes nothing,
        so a file already at that path stays as it was."""
        from golem.runtime.report import snapshot

        while self.loaded:
            loaded = self.loaded.pop()
            if snapshot(loaded.runtime).tokens == 0:
                loaded.runtime.close()
            else:
                loaded.close()


def run_stock_main(module: types.ModuleType, prog: str, description: str,
                   on_args: Callable[[argparse.Namespace, RuntimeConfig], GolemLoads],
                   argv: Optional[list] = None, replace: Optional[dict] = None) -> None:
    """Run ``module.main()`` (mlx_lm.chat or mlx_lm.server) as ``prog`` on golem models.

    The stock parser gains golem's runtime flags (one ``--help``, one set of errors); once
    it has parsed them, ``on_args(args, config)`` checks them against the model and returns
    the loader the stock main then calls instead of mlx-lm's ``load``. The loader's models
    are closed when ``main()`` ends, however it ends. ``replace`` maps more module-level
    names of ``module`` to golem's versions for the run (golem-server's ``run`` and
    ``ModelProvider``). Parse errors are one line (``prog: error: ...``), as golem-run's.
    """
    # The one place golem relies on mlx-lm internals: its chat and server mains take no
    # loader and no extra flags, but build their parser through the module-level name
    # ``argparse`` and load through the module-level name ``load``. Both names are swapped
    # for the length of the run and restored after.
    loads: List[GolemLoads] = []

    class Parser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "prog": prog, "description": description})
            self.golem_flags = False

        def error(self, message):
            self.exit(2, f"{self.prog}: error: {message.splitlines()[0] if message else 'bad arguments'}\n")

        def parse_known_args(self, args=None, namespace=None):
            if not self.golem_flags:  # after the stock flags, so --help lists those first
                add_version_flag(self, prog)
                add_runtime_arguments(self)
                self.golem_flags = True
            parsed, rest = super().parse_known_args(args, namespace)
            try:
                distributed_flags(parsed)
                loads.append(on_args(parsed, runtime_config(parsed)))
            except ValueError as e:  # ConfigError, ModelError, CheckpointError: one line
                self.error(str(e).splitlines()[0] if str(e) else type(e).__name__)
            return parsed, rest

    def load(*args, **kwargs):
        if not loads:
            raise RuntimeError(f"{module.__name__}.main loaded a model without parsing golem's flags: "
                               "this mlx-lm is not one golem supports")
        return loads[-1](*args, **kwargs)

    def sharded_load(repo, pipeline_group=None, tensor_group=None, return_config=False, *, tokenizer_config=None,
                     trust_remote_code=False):
        """mlx-lm's distributed load (under mlx.launch): golem's pipeline; tensor parallel is refused."""
        if tensor_group is not None or pipeline_group is None:
            raise ConfigError(f"{prog} across several ranks needs --pipeline (golem splits the layers; "
                              "tensor parallelism is not supported)")
        return load(repo, tokenizer_config=tokenizer_config, return_config=return_config,
                    trust_remote_code=trust_remote_code, pipeline=True, group=pipeline_group)

    replace = dict(replace or {})
    missing = [name for name in ("argparse", "load", "main", *replace) if not hasattr(module, name)]
    if missing:
        raise RuntimeError(f"{module.__name__} has no {', '.join(missing)}: this mlx-lm is not one "
                           "golem supports")

    golem_argparse = types.ModuleType("argparse")
    golem_argparse.__dict__.update(argparse.__dict__)
    golem_argparse.ArgumentParser = Parser
    replace.update(argparse=golem_argparse, load=load)
    if hasattr(module, "sharded_load"):
        replace["sharded_load"] = sharded_load
    saved = {name: getattr(module, name) for name in replace}
    saved_argv = sys.argv
    for name, value in replace.items():
        setattr(module, name, value)
    if argv is not None:
        sys.argv = [prog, *argv]
    try:
        module.main()
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
        sys.argv = saved_argv
        for loader in loads:
            loader.close()


def distributed_flags(args: argparse.Namespace) -> None:
    """Under mlx.launch (more than one rank): ``--pipeline`` is required (mlx-lm's chat and
    server would otherwise split tensors, which golem does not), and per-rank values
    (``--memory-budget A,B``) become this rank's."""
    import mlx.core as mx

    group = mx.distributed.init()
    if group.size() == 1:
        return
    if not getattr(args, "pipeline", False):
        raise ConfigError("under mlx.launch, give --pipeline: golem splits the model's layers across the ranks "
                          "(tensor parallelism is not supported)")
    from golem.runtime.pipeline import per_rank

    args.memory_budget = per_rank(args.memory_budget, group.rank(), group.size(), "--memory-budget")


def check_model(args: argparse.Namespace, config: RuntimeConfig) -> None:
    """Check the runtime flags against ``args.model`` before any work (reads only its
    headers): a bad flag or model fails here, as one line, rather than mid-run. Under
    mlx.launch with ``--pipeline``, this rank's share is checked."""
    if getattr(args, "model", None):
        import mlx.core as mx

        import golem.runtime

        group = mx.distributed.init()
        distributed = group.size() > 1 and getattr(args, "pipeline", False)
        golem.runtime.plan(args.model, config, pipeline=True if distributed else None,
                           group=group if distributed else None)
