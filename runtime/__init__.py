"""golem.runtime: composes the expert index, the I/O scheduler and the predictors into an
offloaded MoE model that mlx-lm's own generation code drives unchanged.

``golem.runtime.load(path, config=None, **options)`` returns ``(model, tokenizer)`` for mlx-lm;
``plan(path, ...)`` says what ``load`` would keep resident; ``pack(path)`` writes the packed
copy of the experts that golem-pack writes (one read per expert); ``RuntimeConfig`` holds
the options (declared in ``golem.runtime.options``), ``PrefetchConfig`` is the structured
form of the prefetch ones, ``ConfigError`` says which one is wrong.
"""

__all__ = ["load", "plan", "pack", "Loaded", "RuntimeConfig", "PrefetchConfig", "ConfigError"]


def __getattr__(name):
    # Imported on first use: `golem-trace` and the trace tools need no MLX model code.
    if name in ("load", "plan", "pack", "Loaded"):
        from golem.runtime.backend import require_backend

        require_backend()  # Linux without mlx's backend extra: say which extras, not a loader error
        from golem.runtime import api

        return getattr(api, name)
    if name in ("RuntimeConfig", "ConfigError"):
        from golem.runtime import config

        return getattr(config, name)
    if name == "PrefetchConfig":
        from golem.runtime.options import PrefetchConfig

        return PrefetchConfig
    raise AttributeError(f"module 'golem.runtime' has no attribute {name!r}")
