"""golem's runtime options: one frozen ``RuntimeConfig`` that ``golem.runtime.load`` takes and
the command lines build from their flags.

Owns the option fields, their checks that need no model (types, signs, NaN, combinations)
and the checks against a model's shape once its headers are read (layer numbers, depth,
per-layer slots) and that every file the options will write can be written, each failing
with a ``ConfigError`` that names the option and value. Knows nothing of argparse, files'
contents or MLX; sizing lives in ``golem.runtime.sizing``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

from golem.runtime.policies import DEFAULT_POLICY
from golem.runtime.prefetch import PrefetchConfig



class ConfigError(ValueError):
    """A runtime option is wrong; the message names the option (and flag) and the value."""


Size = Union[str, int]
LayerRanges = Union[str, Sequence[int]]


@dataclass(frozen=True)
class RuntimeConfig:
    """Every runtime option of golem; fields map 1:1 to golem-run's flags.

    Sizing precedence: ``capacities`` (library: slots per MoE layer, given outright) >
    ``pin_layers`` > ``cache_size_overrides`` > ``cache_size`` > ``memory_budget``. With none
    of them, golem sizes to the machine: everything resident when it fits the machine's
    memory (less a margin), otherwise a plan within it.

    Args:
        cache_size: ``-c``: expert slots of every MoE layer no other option sets.
        cache_size_overrides: ``--cache-size-override``: ``(ranges, slots)`` pairs, later win.
        pin_layers: ``-f``: layer ranges kept fully resident ("0-3,46-47" or a list).
        memory_budget: ``--memory-budget``: bytes for weights, slots and staging ("48GB").
        memory_limit: the machine memory to size to when nothing else sizes the caches
            (default: measured; the ``GOLEM_MEMORY_LIMIT`` environment variable overrides).
        capacities: library only: slots per MoE layer as an int, a dict layer -> slots, or
            a callable ``(OpenedCheckpoint) -> dict``.
        policy: ``--policy``: eviction policy name.
        warm_start: ``-R SEED`` (an int: random experts), ``-W PATH`` (a trace, folder of
            traces or profile) or ``"saved"`` (the profile ``save_profile`` keeps).
        save_profile: ``--save-profile``: merge this run's routing into the saved profile
            when the model is closed (or by ``OffloadedModel.save_profile``).
        prefetch: depth, threshold and caps of speculative prefetch (None: none).
        predictor: ``--predictor``: who guesses the next experts (with a prefetch depth).
        predictor_options: fields of ``golem.predictors.registry.PredictorOptions``.
        predictor_train: ``--predictor-train``: traces (or paths, folders) to learn from.
        predictor_trace: ``--predictor-trace``: the trace the oracle predictors replay.
        direct_io: ``--direct-io``: read experts with O_DIRECT.
        io_parallelism: ``--io-parallelism``: expert reads in flight at once.
        emulate_storage: ``--emulate-storage``: throttle reads, "GB_PER_S[,LATENCY]".
        throttle: library only: a ``golem.io.storage.Throttle`` object instead.
        record: keep a ``TraceRecorder`` of the routing (``engine.trace``).
        record_hidden: ``--trace-hidden``: also record each MoE layer's residual.
        trace_out: ``--trace-out``: write the recorded trace here when the model is closed.
        slot_writer: ``--slot-writer``: how experts get into slots ("host", "device",
            "device-load"; None or "auto": the backend's default, see ``golem.runtime.writers``).
    """

    cache_size: Optional[int] = None
    cache_size_overrides: Tuple[Tuple[LayerRanges, int], ...] = ()
    pin_layers: Optional[LayerRanges] = None
    memory_budget: Optional[Size] = None
    memory_limit: Optional[Size] = None
    capacities: Union[None, int, Mapping[int, int], Callable] = None
    policy: str = DEFAULT_POLICY
    warm_start: Union[None, int, str, os.PathLike] = None
    save_profile: bool = False
    prefetch: Optional[PrefetchConfig] = None
    predictor: str = "lookahead"
    predictor_options: Optional[Mapping[str, Any]] = None
    predictor_train: Sequence = ()
    predictor_trace: Any = None
    direct_io: bool = False
    io_parallelism: Optional[int] = None
    emulate_storage: Optional[str] = None
    throttle: Any = None
    record: bool = False
    record_hidden: bool = False
    trace_out: Union[None, str, os.PathLike] = None
    slot_writer: Optional[str] = None

    def __post_init__(self) -> None:
        _check_int(self.cache_size, "cache_size", "-c/--cache-size", low=1)
        object.__setattr__(self, "cache_size_overrides", tuple(_override(o) for o in self.cache_size_overrides))
        if self.pin_layers is not None:
            _check_ranges(self.pin_layers, "-f/--pin-layers")
        for name, flag in (("memory_budget", "--memory-budget"), ("memory_limit", "memory_limit")):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, parse_nbytes(getattr(self, name), flag))
        _check_capacities(self.capacities)
        if not isinstance(self.policy, str):
            raise ConfigError(f"--policy: expected a policy name, got {self.policy!r}")
        from golem.runtime.policies import make_policy

        try:
            make_policy(self.policy)  # a name or a spec with parameters ("lfu-decay:decay=0.9")
        except ValueError as e:
            raise ConfigError(f"--policy {self.policy}: {e}") from None
        ws = self.warm_start
        if ws is not None and not isinstance(ws, (str, os.PathLike)) and not _is_int(ws):
            raise ConfigError(f"warm_start: expected a seed (int), a path or 'saved', got {ws!r}")
        if isinstance(ws, str) and not ws:
            raise ConfigError("-W/--warm-start: empty path")
        _check_prefetch(self.prefetch)
        depth = self.prefetch.depth if self.prefetch is not None else 0
        if not isinstance(self.predictor, str) or not self.predictor:
            raise ConfigError(f"--predictor: expected a predictor name, got {self.predictor!r}")
        if depth > 0:
            _check_predictor(self.predictor, self.predictor_trace, self.predictor_options)
        if isinstance(self.predictor_train, (str, os.PathLike)):
            object.__setattr__(self, "predictor_train", (self.predictor_train,))
        object.__setattr__(self, "predictor_train", tuple(self.predictor_train))
        if depth == 0 and (self.predictor_train or self.predictor_trace is not None):
            what = "--predictor-train" if self.predictor_train else "--predictor-trace"
            raise ConfigError(f"{what} needs a prefetch depth (--prefetch-depth N, N >= 1)")
        if self.predictor_options is not None and not isinstance(self.predictor_options, Mapping):
            raise ConfigError(f"predictor_options: expected a dict, got {type(self.predictor_options).__name__}")
        if self.io_parallelism is not None:
            from golem.io.readers import MAX_PARALLELISM

            _check_int(self.io_parallelism, "io_parallelism", "--io-parallelism", low=1, high=MAX_PARALLELISM)
        if self.slot_writer is not None:
            from golem.runtime.writers import resolve_writer

            try:
                resolve_writer(self.slot_writer)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.emulate_storage is not None and self.throttle is not None:
            raise ConfigError("give one of emulate_storage (--emulate-storage) and throttle")
        if self.emulate_storage is not None:
            check_storage_emulation(self.emulate_storage)
        if self.record_hidden and not (self.record or self.trace_out is not None):
            raise ConfigError("--trace-hidden needs --trace-out FILE")
        if self.trace_out is not None:
            if not str(self.trace_out):
                raise ConfigError("--trace-out: empty path")
            object.__setattr__(self, "record", True)
        if self.save_profile:
            object.__setattr__(self, "record", True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **fields) -> "RuntimeConfig":
        """A copy with ``fields`` changed (unknown names are a ``ConfigError``)."""
        unknown = sorted(set(fields) - set(self.field_names()))
        if unknown:
            raise ConfigError(f"unknown runtime option {unknown[0]!r} (options: {', '.join(self.field_names())})")
        return dataclasses.replace(self, **fields)

    @property
    def prefetch_depth(self) -> int:
        return self.prefetch.depth if self.prefetch is not None else 0

    @property
    def sizes_to_machine(self) -> bool:
        """No option sizes the caches: golem sizes them to the machine's memory."""
        return (self.capacities is None and self.cache_size is None and self.memory_budget is None
                and not self.cache_size_overrides and self.pin_layers is None)


def make_config(config: Optional[RuntimeConfig] = None, **fields) -> RuntimeConfig:
    """``config`` with ``fields`` changed, or a new config of ``fields``."""
    return (config or RuntimeConfig()).replace(**fields) if fields or config is None else config


def staging_buffers(top_k: int, depth: int) -> int:
    """Staging buffers of the I/O scheduler: room for a token's demand reads and ``depth``
    layers of prefetch, twice over (one set landing while the other is installed)."""
    return max(4, 2 * top_k * (depth + 1) + 2)


def parse_nbytes(value: Size, what: str) -> int:
    """Bytes from a size option (``48GB``, ``48G``, ``4.8e10``, an int), or a ``ConfigError``."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, float):
        value = repr(value)
    from golem.runtime.units import parse_size

    try:
        nbytes = parse_size(value, what=what)
    except (OverflowError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e) if what in str(e) else f"{what}: cannot read size {value!r}") from None
    if nbytes <= 0:
        raise ConfigError(f"{what}: size must be positive, got {value!r}")
    if nbytes > 2**62:
        raise ConfigError(f"{what}: {value!r} is more bytes than any machine holds")
    return nbytes


def check_storage_emulation(spec) -> None:
    """``--emulate-storage``: readable, with a finite positive bandwidth and a finite latency."""
    from golem.io.storage import parse_throttle

    if not isinstance(spec, str):
        raise ConfigError(f"--emulate-storage: expected 'GB_PER_S[,LATENCY]', got {spec!r}")
    try:
        t = parse_throttle(spec)
    except ValueError as e:
        raise ConfigError(f"--emulate-storage: {e}") from None
    numbers = [float(x) for x in re.findall(r"[-+]?(?:nan|inf(?:inity)?|[0-9.]+(?:e[-+]?\d+)?)", spec.lower())]
    gb = getattr(t, "gb_per_s", None)
    lat = getattr(t, "latency_s", 0.0)
    if (not numbers or any(not math.isfinite(x) or x < 0 for x in numbers)
            or gb is None or not math.isfinite(gb) or gb <= 0 or not math.isfinite(lat) or lat < 0):
        raise ConfigError(f"--emulate-storage {spec}: bandwidth and latency must be finite positive numbers, "
                          "e.g. '2.5' or '2.5,80us'")


def _is_int(x) -> bool:
    import numpy as np

    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_int(value, name: str, flag: str, low: Optional[int] = None, high: Optional[int] = None) -> None:
    if value is None:
        return
    if not _is_int(value):
        raise ConfigError(f"{flag}: expected a whole number, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{flag} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{flag} must be at most {high}, got {value}")


def _check_ranges(ranges: LayerRanges, flag: str) -> None:
    """Layer ranges: the text of ``-f`` (checked against the model later) or layer numbers."""
    if isinstance(ranges, str):
        from golem.runtime.units import parse_layer_ranges

        try:
            parse_layer_ranges(ranges, what=flag)  # the syntax, and numbers below any model's bound
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return
    try:
        items = list(ranges)
    except TypeError:
        raise ConfigError(f"{flag}: expected layer ranges like '0-3,46-47' or a list of layers, got {ranges!r}") from None
    bad = [x for x in items if not _is_int(x) or x < 0]
    if bad:
        raise ConfigError(f"{flag}: {bad[0]!r} is not a layer number")


def _override(pair) -> Tuple[LayerRanges, int]:
    try:
        ranges, slots = pair
    except (TypeError, ValueError):
        raise ConfigError(f"--cache-size-override: expected (RANGES, N) pairs, got {pair!r}") from None
    _check_ranges(ranges, "--cache-size-override")
    if isinstance(slots, str):
        try:
            slots = int(slots)
        except ValueError:
            raise ConfigError(f"--cache-size-override {ranges} {slots}: N must be a whole number of slots") from None
    _check_int(slots, "cache_size_overrides", f"--cache-size-override {ranges}", low=1)
    return (ranges if isinstance(ranges, str) else tuple(int(x) for x in ranges), int(slots))


def _check_capacities(capacities) -> None:
    if capacities is None or callable(capacities):
        return
    if _is_int(capacities):
        if capacities < 1:
            raise ConfigError(f"capacities: slots must be at least 1, got {capacities}")
        return
    if not isinstance(capacities, Mapping):
        raise ConfigError(f"capacities: expected an int, a dict layer -> slots or a callable, got {capacities!r}")
    for layer, slots in capacities.items():
        if not _is_int(layer):
            raise ConfigError(f"capacities: layer {layer!r} is not a layer number (an int)")
        if not _is_int(slots) or slots < 1:
            raise ConfigError(f"capacities: layer {layer}: slots must be a whole number >= 1, got {slots!r}")


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


def _check_prefetch(prefetch) -> None:
    if prefetch is None:
        return
    if not isinstance(prefetch, PrefetchConfig):
        raise ConfigError(f"prefetch: expected a PrefetchConfig, got {type(prefetch).__name__}")
    _check_int(prefetch.depth, "prefetch.depth", "--prefetch-depth", low=0)
    if not isinstance(prefetch.threshold, (int, float)) or not math.isfinite(prefetch.threshold):
        raise ConfigError(f"--threshold must be within [0, 1], got {prefetch.threshold}")
    nb = prefetch.speculative_nbytes
    if nb is not None and (not _is_int(nb) or nb <= 0):
        raise ConfigError(f"--prefetch-cap-mb must be a positive number, got {nb / 1e6 if _is_int(nb) else nb}")
    ms = prefetch.speculative_ms
    if ms is not None and (not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms <= 0):
        raise ConfigError(f"--prefetch-cap-ms must be a finite number > 0, got {ms}")


# -- files the options will write ----------------------------------------------------------


def check_output_paths(config: RuntimeConfig, model_path) -> None:
    """Every file the options will write, checked writable before any work starts."""
    if config.trace_out is not None:
        out = Path(config.trace_out).expanduser()
        if out.is_dir():
            raise ConfigError(f"--trace-out {config.trace_out}: is a folder; give a file name (e.g. run.npz)")
        _check_folder(out.parent if str(out.parent) else Path("."), f"--trace-out {config.trace_out}", create=False)
    if config.save_profile:
        from golem.runtime.sizing import profile_dir

        _check_folder(profile_dir(model_path), "--save-profile", create=True)


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
    overrides = [(_bounded(r, "--cache-size-override", num_layers), n) for r, n in config.cache_size_overrides]
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
    moe = set(moe_layers)
    if config.cache_size is not None and config.cache_size < top_k:
        raise ConfigError(f"--cache-size {config.cache_size} is smaller than the model's top-k ({top_k}): "
                          f"one token needs {top_k} experts resident")
    check_cache_sizes(config.cache_size, config.cache_size_overrides, num_experts)
    caps = config.capacities
    if _is_int(caps) and caps < min(top_k, num_experts):
        raise ConfigError(f"capacities: {caps} slots is smaller than top-k ({top_k})")
    if isinstance(caps, Mapping):
        for layer, slots in caps.items():
            if layer not in moe:
                raise ConfigError(f"capacities: layer {layer} is not an MoE layer of this model "
                                  f"(MoE layers: {_ranges_text(moe_layers)})")
            if slots < min(top_k, num_experts):
                raise ConfigError(f"capacities: layer {layer}: cache of {slots} slots is smaller than top-k ({top_k})")
    depth = config.prefetch_depth
    if depth > len(moe_layers) and not config.prefetch.auto:
        raise ConfigError(f"--prefetch-depth {depth}: the model has only {len(moe_layers)} MoE layers to look ahead to")


def _ranges_text(layers) -> str:
    from golem.runtime.units import format_layer_ranges

    return format_layer_ranges(layers)
