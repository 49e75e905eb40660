"""golem.runtime: composes the expert index, the I/O scheduler and the predictors into an
offloaded MoE model that mlx-lm's own generation code drives unchanged.

``golem.runtime.load(path, **options)`` returns ``(model, tokenizer)`` for mlx-lm.
"""

__all__ = ["load", "Loaded"]


def __getattr__(name):
    # Imported on first use: `golem-trace` and the trace tools need no MLX model code.
    if name in __all__:
        from golem.runtime import api

        return getattr(api, name)
    raise AttributeError(f"module 'golem.runtime' has no attribute {name!r}")
