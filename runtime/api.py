"""The library entry point: ``golem.runtime.load`` for other mlx apps.

Returns a model and tokenizer that mlx-lm's ``generate``, ``stream_generate`` and
``generate_step`` drive unchanged, and owns closing what the runtime started.
"""

from __future__ import annotations

from typing import Any, Tuple

from golem.runtime.loader import OffloadedModel, load_offloaded


class Loaded(tuple):
    """``(model, tokenizer)``, plus ``close()`` and context-manager use.

    Unpacks like mlx-lm's ``load``: ``model, tokenizer = golem.runtime.load(path)``.
    ``runtime`` is the ``OffloadedModel`` (engine, pools, statistics).
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

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> "Loaded":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str, *, tokenizer_config: dict | None = None, **options: Any) -> Loaded:
    """Load an MoE checkpoint with offloaded experts.

    Args:
        path: local model folder or Hugging Face repo id.
        tokenizer_config: passed to mlx-lm's tokenizer loader.
        **options: runtime options (see ``load_offloaded``): ``capacities``,
            ``policy``, ``direct_io``, ...
    """
    from mlx_lm.utils import load_tokenizer

    runtime = load_offloaded(path, **options)
    try:
        tokenizer = load_tokenizer(runtime.path, tokenizer_config or {})
    except BaseException:
        runtime.close()
        raise
    runtime.model.golem = runtime
    return Loaded(runtime.model, tokenizer, runtime)
