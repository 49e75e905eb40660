"""golem's runtime options as one frozen ``RuntimeConfig``, which ``golem.runtime.load`` takes
and the command lines build from their flags.

Its fields are the options declared in ``golem.runtime.options`` (one field per option,
named as its flag). Owns the checks that relate several options (prefetch given two ways, a
flag that needs another, -R against -W), the checks against a model's shape once its
headers are read (layer numbers, depth, slots per layer) and that every file the options
will write can be written, each failing with a ``ConfigError`` that names the option and
value. Knows nothing of argparse, files' contents or MLX; sizing lives in
``golem.runtime.sizing``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from inspect import Parameter, Signature
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from golem.runtime.options import (ALIASES, ConfigError, check_int, check_storage_emulation, declared, is_int,
                                   option, parse_nbytes)

__all__ = ["ConfigError", "RuntimeConfig", "make_config", "check_against_model", "check_output_paths",
           "check_cache_sizes", "check_given_cache_sizes", "resolved_layers", "parse_nbytes", "check_storage_emulation"]

Size = Union[str, int]
LayerRanges = Union[str, Sequence[int]]
PREFETCH_FIELDS = ("prefetch_depth", "threshold", "prefetch_cap_mb", "prefetch_cap_ms", "prefetch_governor")


def _declared_fields(cls):
    """Class decorator (before ``dataclass``): one annotated field per declared option, and
    the option list in the docstring's ``Args:``."""
    cls.__annotations__ = {o.name: o.annotation for o in declared()}
    lines = [f"        {o.name}: {'``' + o.label + '``: ' if o.flags else 'library only: '}"
             f"{o.help_text(choices=False)} Default: {o.default!r}." for o in declared()]
    cls.__doc__ = (cls.__doc__ or "") + "\n    Args:\n" + "\n".join(lines) + "\n"
    return cls


@dataclass(frozen=True, init=False)
@_declared_fields
class RuntimeConfig:
    """Every runtime option of golem; fields map 1:1 to golem-run's flags (``prefetch_depth``
    is ``--prefetch-depth``), and ``load(path, **fields)`` takes the same names.

    Sizing precedence: ``cache_sizes`` (library: slots per MoE layer, given outright) >
    ``pin_layers`` > ``cache_size_override`` > ``cache_size`` > ``memory_budget``. With none
    of them, golem sizes to the machine: everything resident when it fits the machine's
    memory (less a margin), otherwise a plan within it.

    The prefetch options may be given flat (``prefetch_depth=2, threshold=0.3``) or as one
    ``prefetch=PrefetchConfig(depth=2, threshold=0.3)``; either way both forms are filled in
    (``prefetch`` is None at depth 0). Options not given take the default declared in
    ``golem.runtime.options``; an unknown name, a wrong type or a value out of range is a
    ``ConfigError`` naming the option as its flag does.
    """

    def __init__(self, **options: Any):
        for name, value in _resolve(options).items():
            object.__setattr__(self, name, value)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def as_dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}

    def replace(self, **fields) -> "RuntimeConfig":
        """A copy with ``fields`` changed (unknown names are a ``ConfigError``). Changing a flat
        prefetch option keeps the tuning of a ``prefetch`` given before (its recall switch)."""
        fields = _canonical(fields)
        values = self.as_dict()
        flat = set(fields) & set(PREFETCH_FIELDS)
        if flat and "prefetch" not in fields:
            values["prefetch"] = None
        new = RuntimeConfig(**{**values, **fields})
        if flat and "prefetch" not in fields and self.prefetch is not None and new.prefetch is not None:
            kept = dataclasses.replace(self.prefetch, depth=new.prefetch.depth, threshold=new.prefetch.threshold,
                                       speculative_nbytes=new.prefetch.speculative_nbytes,
                                       speculative_ms=new.prefetch.speculative_ms)
            object.__setattr__(new, "prefetch", kept)
        return new

    @property
    def sizes_to_machine(self) -> bool:
        """No option sizes the caches: golem sizes them to the machine's memory."""
        return (self.cache_sizes is None and self.cache_size is None and self.memory_budget is None
                and not self.cache_size_override and self.pin_layers is None)

    @property
    def cache_size_overrides(self) -> Tuple:
        """The older name of ``cache_size_override``."""
        return self.cache_size_override

    @property
    def record_hidden(self) -> bool:
        """The older name of ``trace_hidden``."""
        return self.trace_hidden


def option_parameters() -> list:
    """``inspect.Parameter``s of every option (keyword-only, with its declared default), for
    the signatures of ``RuntimeConfig``, ``load()`` and ``plan()``."""
    return [Parameter(o.name, Parameter.KEYWORD_ONLY, default=o.default) for o in declared()]


RuntimeConfig.__init__.__signature__ = Signature(
    [Parameter("self", Parameter.POSITIONAL_OR_KEYWORD), *option_parameters()])


def _canonical(fields: Mapping[str, Any]) -> Dict[str, Any]:
    """``fields`` under their declared names; an unknown name, or one given twice (as itself
    and as an alias), is a ``ConfigError``."""
    names = {o.name for o in declared()}
    out: Dict[str, Any] = {}
    for name, value in fields.items():
        canonical = ALIASES.get(name, name)
        if canonical not in names:
            raise ConfigError(f"unknown runtime option {name!r} (options: {', '.join(sorted(names))})")
        if canonical in out:
            raise ConfigError(f"{name} is another name of {canonical}: give one of them")
        out[canonical] = value
    return out


def _resolve(options: Mapping[str, Any]) -> Dict[str, Any]:
    """Every option's value: given ones checked and normalised, the others their declared
    defaults; then the checks that relate several options."""
    given = _canonical(options)
    values = {}
    for o in declared():
        values[o.name] = o.check(given[o.name], o) if o.name in given else o.default
    _settle_prefetch(values, given)
    _check_combinations(values, given)
    return values


def _settle_prefetch(values: Dict[str, Any], given: Mapping[str, Any]) -> None:
    """Fill in both forms of the prefetch options from the one given."""
    from golem.runtime.prefetch import PrefetchConfig

    p = values["prefetch"]
    if p is not None:
        from_p = {"prefetch_depth": "auto" if p.auto else p.depth, "threshold": p.threshold,
                  "prefetch_cap_ms": p.speculative_ms, "prefetch_governor": p.governor,
                  "prefetch_cap_mb": None if p.speculative_nbytes is None else p.speculative_nbytes / 1e6}
        for name in PREFETCH_FIELDS:
            if name in given and values[name] != from_p[name]:
                raise ConfigError(f"{option(name).label} {values[name]} and prefetch={p} disagree: "
                                  "give the prefetch options one way")
        values.update(from_p)
        values["prefetch"] = p if p.depth > 0 else None
    elif values["prefetch_depth"] != 0:
        mb = values["prefetch_cap_mb"]
        fields = dict(threshold=values["threshold"], speculative_ms=values["prefetch_cap_ms"],
                      speculative_nbytes=None if mb is None else max(1, int(mb * 1e6)))
        if values["prefetch_depth"] == "auto":
            if not values["prefetch_governor"]:
                raise ConfigError("--no-prefetch-governor needs a fixed --prefetch-depth N")
            values["prefetch"] = PrefetchConfig.auto_depth(**fields)
        else:
            values["prefetch"] = PrefetchConfig(depth=values["prefetch_depth"], governor=values["prefetch_governor"],
                                                **fields)


def _check_combinations(values: Dict[str, Any], given: Mapping[str, Any]) -> None:
    """The checks that relate several options; normalises ``warm_start``'s seed and ``record``."""
    if is_int(values["warm_start"]):  # the library's older spelling of a random warm start
        if values["warm_random"] is not None:
            raise ConfigError("choose one of -R/--warm-random and -W/--warm-start")
        values["warm_random"], values["warm_start"] = check_int(values["warm_start"], "warm_start", low=0), None
    if values["warm_random"] is not None and values["warm_start"] is not None:
        raise ConfigError("choose one of -R/--warm-random and -W/--warm-start")
    if values["prefetch_depth"] == 0:
        # prefetch=PrefetchConfig(depth=0) says "no prefetch" outright (a sweep's baseline):
        # a predictor named with it is left unused, as before; traces to read still need a depth.
        from_prefetch = {*PREFETCH_FIELDS, "predictor"} if "prefetch" in given else set()
        for o in declared():
            if o.needs_depth and o.name not in from_prefetch and values[o.name] != o.default:
                raise ConfigError(f"{o.long_flag or o.name} needs a prefetch depth (--prefetch-depth N, N >= 1)")
    else:
        _check_predictor(values["predictor"], values["predictor_trace"], values["predictor_options"])
    if values["emulate_storage"] is not None and values["throttle"] is not None:
        raise ConfigError("give one of emulate_storage (--emulate-storage) and throttle")
    if values["trace_hidden"] and not (values["record"] or values["trace_out"] is not None):
        raise ConfigError("--trace-hidden needs --trace-out FILE")
    if values["trace_out"] is not None or values["save_profile"]:
        values["record"] = True


def make_config(config: Optional[RuntimeConfig] = None, **fields) -> RuntimeConfig:
    """``config`` with ``fields`` changed, or a new config of ``fields``; anything but a
    ``RuntimeConfig`` (or None) as ``config`` is a ``ConfigError``."""
    if config is not None and not isinstance(config, RuntimeConfig):
        shown = repr(config)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ConfigError(f"config: expected a golem.runtime.RuntimeConfig (or its fields as keywords, "
                          f"load(path, cache_size=8, ...)), got {type(config).__name__} {shown}")
    if config is None:
        return RuntimeConfig(**fields)
    return config.replace(**fields) if fields else config


def _check_predictor(name: str, truth, options) -> None:
    from golem.predictors.registry import predictor_names

    known = set(predictor_names())
    unknown = [p for p in name.split("+") if p not in known]
    if unknown:
        raise ConfigError(f"--predictor {name}: unknown predictor {unknown[0]!r} "
                          f"(choose from: {' '.join(predictor_names())})")
    needs_truth = [p for p in name.split("+") if p in ("oracle", "noisy-oracle")]
    if needs_truth and truth is None and not (options or {}).get("truth"):
        raise ConfigError(f"--predictor {name}: {needs_truth[0]} replays a trace; give --predictor-trace FILE")


# -- files the options will write ----------------------------------------------------------


def check_output_paths(config: RuntimeConfig, model_path) -> None:
    """Every file the options will write, checked writable before any work starts."""
    if config.trace_out is not None:
        out = Path(config.trace_out).expanduser()
        if out.is_dir():
            raise ConfigError(f"--trace-out {config.trace_out}: is a folder; give a file name (e.g. run.npz)")
        _check_folder(out.parent if str(out.parent) else Path("."), f"--trace-out {config.trace_out}", create=False)
    if config.save_profile:
        from golem.runtime.profiles import profile_dir_for

        _check_folder(profile_dir_for(model_path), "--save-profile", create=True)


def _check_folder(folder: Path, what: str, *, create: bool) -> None:
    """``folder`` can take a new file (``create``: or can be made, in its first existing parent)."""
    import tempfile

    probe = folder
    if create:
        while not probe.exists() and probe.parent != probe:
            if probe.is_symlink():
                break
            probe = probe.parent
    if not probe.exists():
        raise ConfigError(f"{what}: folder {probe} does not exist")
    if not probe.is_dir():
        raise ConfigError(f"{what}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".golem-write-check-")
    except OSError as e:
        raise ConfigError(f"{what}: cannot write in {probe} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


# -- checks against the model ------------------------------------------------------------


def _bounded(ranges: LayerRanges, flag: str, num_layers: int) -> list[int]:
    """Model layer numbers of ``ranges``, refused before expansion when they name a layer
    beyond the model's ``num_layers``."""
    from golem.runtime.units import parse_layer_ranges

    if isinstance(ranges, str):
        try:
            return parse_layer_ranges(ranges, num_layers=num_layers, what=flag)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    layers = sorted(set(int(x) for x in ranges))
    if layers and layers[-1] >= num_layers:
        raise ConfigError(f"{flag}: layer {layers[-1]} does not exist (the model has layers 0-{num_layers - 1})")
    return layers


def resolved_layers(config: RuntimeConfig, num_layers: int) -> tuple[list[int], list[tuple[list[int], int]]]:
    """``(pinned layers, overrides)`` of ``config`` as model layer numbers, bounded by the
    model's ``num_layers`` decoder layers."""
    pins = [] if config.pin_layers is None else _bounded(config.pin_layers, "-f/--pin-layers", num_layers)
    overrides = [(_bounded(r, "--cache-size-override", num_layers), n) for r, n in config.cache_size_override]
    return pins, overrides


def check_cache_sizes(cache_size: Optional[int], overrides: Sequence[Tuple[LayerRanges, int]], num_experts: int,
                      *, whose: str = "the model's MoE layers") -> None:
    """``-c`` and each ``--cache-size-override RANGES N`` hold at most ``num_experts`` slots
    (that many keeps every expert resident); golem-run, ``load()`` and golem-trace say so alike.

    Args:
        whose: what has ``num_experts`` experts, for the message ("the trace's layers").
    """
    if cache_size is not None and cache_size > num_experts:
        raise ConfigError(f"-c/--cache-size {cache_size}: {whose} have only {num_experts} experts "
                          f"(-c {num_experts} keeps every expert resident)")
    for ranges, slots in overrides:
        if slots > num_experts:
            text = ranges if isinstance(ranges, str) else _ranges_text(ranges)
            raise ConfigError(f"--cache-size-override {text} {slots}: {whose} have only {num_experts} experts "
                              f"(--cache-size-override {text} {num_experts} keeps every expert resident)")


def check_against_model(config: RuntimeConfig, *, moe_layers: Sequence[int], num_layers: int,
                        num_experts: int, top_k: int) -> None:
    """The checks that need the model's shape: slots per layer, depth, layer numbers.

    Args:
        moe_layers: the model's layer numbers of its MoE layers.
        num_layers: decoder layers of the model.
        num_experts: experts per MoE layer.
        top_k: experts per token.
    """
    resolved_layers(config, num_layers)
    if config.cache_size is not None and config.cache_size < top_k:
        raise ConfigError(f"--cache-size {config.cache_size} is smaller than the model's top-k ({top_k}): "
                          f"one token needs {top_k} experts resident")
    check_cache_sizes(config.cache_size, config.cache_size_override, num_experts)
    if config.cache_sizes is not None and not callable(config.cache_sizes):
        check_given_cache_sizes(config.cache_sizes, moe_layers=moe_layers, num_experts=num_experts, top_k=top_k)
    p = config.prefetch
    if p is not None and not p.auto and p.depth > len(moe_layers):
        raise ConfigError(f"--prefetch-depth {p.depth}: the model has only {len(moe_layers)} MoE layers to look ahead to")


def with_prefetch_depth(config: RuntimeConfig, depth: int) -> RuntimeConfig:
    """``config`` prefetching at most ``depth`` layers ahead (a model or a pipeline rank with
    fewer MoE layers), both forms of the prefetch options changed together."""
    import dataclasses

    p = dataclasses.replace(config.prefetch, depth=depth)
    return dataclasses.replace(config, prefetch=p, prefetch_depth="auto" if p.auto else depth)


def check_given_cache_sizes(cache_sizes, *, moe_layers: Sequence[int], num_experts: int, top_k: int) -> Dict[int, int]:
    """The ``cache_sizes`` option (an int or a mapping, or what its callable returned) as slots
    per MoE layer: every layer named is an MoE layer, and holds at least top-k and at most
    ``num_experts`` slots, as ``-c`` is checked. Layers not named keep every expert resident.

    Args:
        moe_layers: the model's layer numbers of its MoE layers.
        num_experts: experts per MoE layer.
        top_k: experts per token.
    """
    from golem.runtime.options import option

    sizes = option("cache_sizes").check(cache_sizes, option("cache_sizes"))
    if sizes is None or callable(sizes):
        raise ConfigError(f"cache_sizes: expected an int or a dict layer -> slots, got {cache_sizes!r}")
    low = min(top_k, num_experts)
    if is_int(sizes):
        if sizes < low:
            raise ConfigError(f"cache_sizes: {sizes} slots is smaller than top-k ({top_k})")
        if sizes > num_experts:
            raise ConfigError(f"cache_sizes {sizes}: the model's MoE layers have only {num_experts} experts "
                              f"(cache_sizes={num_experts} keeps every expert resident)")
        return {layer: sizes for layer in moe_layers}
    moe = set(moe_layers)
    for layer, slots in sizes.items():
        if layer not in moe:
            raise ConfigError(f"cache_sizes: layer {layer} is not an MoE layer of this model "
                              f"(MoE layers: {_ranges_text(moe_layers)})")
        if slots < low:
            raise ConfigError(f"cache_sizes: layer {layer}: cache of {slots} slots is smaller than top-k ({top_k})")
        if slots > num_experts:
            raise ConfigError(f"cache_sizes: layer {layer}: {slots} slots, but the model's MoE layers have only "
                              f"{num_experts} experts ({num_experts} keeps every expert resident)")
    return {layer: int(sizes.get(layer, num_experts)) for layer in moe_layers}


def _ranges_text(layers) -> str:
    from golem.runtime.units import format_layer_ranges

    return format_layer_ranges(layers)
