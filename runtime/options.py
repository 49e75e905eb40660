"""Every runtime option of golem, declared once: name, default, help, flags and check.

Owns the declarations (``OPTIONS``), ``PrefetchConfig`` (the structured form of the prefetch
options, whose defaults are theirs) and the check of each single value, with the one message
that the flags, ``RuntimeConfig`` and ``golem.runtime.load`` all give. Everything else is
derived from them: the fields of ``golem.runtime.config.RuntimeConfig`` (and ``load()``'s
keyword arguments), the flags of golem-run, golem-chat and golem-server
(``golem.runtime.cli.flags``), and their ``--help``. Checks that relate several options live
in ``golem.runtime.config``; checks against a model's shape there too.

Knows nothing of argparse, models, files' contents or MLX (a check that needs a runtime
module imports it when it runs).

Adding an option is one ``Option(...)`` entry in ``OPTIONS`` (name, default, help, check, and
flags for the commands): ``RuntimeConfig`` gains the field, ``load()`` and ``plan()`` the
keyword, golem-run, golem-chat and golem-server the flag and its ``--help`` line; the runtime
reads ``config.<name>`` where the option acts. A check that relates it to other options goes
in ``golem.runtime.config._check_combinations``, one against the model's shape in
``check_against_model``, a size derived from it in ``golem.runtime.sizing``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from golem.runtime.policies import DEFAULT_POLICY


class ConfigError(ValueError):
    """A runtime option is wrong; the message names the option (and flag) and the value."""


@dataclass(frozen=True)
class Option:
    """One runtime option.

    Args:
        name: the ``RuntimeConfig`` field and ``load()`` keyword; the long flag is the same
            name with dashes (``prefetch_depth`` -> ``--prefetch-depth``).
        default: the value when the option is not given (read when a config is made, so
            changing it here changes every command's ``--help`` and ``load()``).
        help: one sentence for ``--help`` (``{default}`` and ``{choices}`` are filled in).
        check: ``(value, option) -> value``: the value as the runtime keeps it (sizes in
            bytes, tuples), or a ``ConfigError`` naming ``option.label``.
        annotation: the field's type, as text.
        flags: the command-line flags (empty: library only).
        group: the ``--help`` group of the flags.
        cli: argparse keywords other than the flags, dest, default and help
            (``type``, ``nargs``, ``action``, ``metavar``).
        choices: ``() -> names`` for ``{choices}`` in the help.
        needs_depth: meaningful only with a prefetch depth (given otherwise: an error).
        aliases: other keyword names ``RuntimeConfig`` and ``load()`` accept (older names).
        command_default: the command lines' default where it differs from the library's
            (None: the same); declared here with the other, shown in ``--help``.
    """

    name: str
    default: Any
    help: str
    check: Callable[[Any, "Option"], Any]
    annotation: str = "Any"
    flags: Tuple[str, ...] = ()
    group: str = ""
    cli: Mapping[str, Any] = field(default_factory=dict)
    choices: Optional[Callable[[], Sequence[str]]] = None
    needs_depth: bool = False
    aliases: Tuple[str, ...] = ()
    command_default: Any = None

    @property
    def label(self) -> str:
        """How messages name the option: its flags (``-c/--cache-size``) or its keyword."""
        return "/".join(self.flags) if self.flags else self.name

    @property
    def all_flags(self) -> Tuple[str, ...]:
        """``flags``, plus ``--no-...`` for a negatable one (``cli={"action": "negatable"}``)."""
        if self.cli.get("action") != "negatable":
            return self.flags
        return self.flags + tuple(f"--no-{f[2:]}" for f in self.flags if f.startswith("--"))

    @property
    def long_flag(self) -> Optional[str]:
        return next((f for f in self.flags if f.startswith("--")), None)

    def help_text(self, *, choices: bool = True) -> str:
        """``help`` with the declared default and the choices filled in (``choices=False``:
        without importing what lists them)."""
        names = ", ".join(self.choices()) if self.choices is not None and choices else "see --help"
        default = self.default if self.command_default is None else self.command_default
        return self.help.format(default=default, choices=names)


AUTO_DEPTH = 3  # the most ``prefetch_depth="auto"`` lets the governor use (fewer on a shallower model)


class _Declared:
    """A ``PrefetchConfig`` field left at this takes its option's declared default."""

    def __repr__(self) -> str:
        return "<declared default>"


DECLARED = _Declared()


@dataclass(frozen=True)
class PrefetchConfig:
    """How far ahead to look and how much to gamble: the structured form of the prefetch
    options of ``golem.runtime.options`` (whose defaults and checks these fields share).

    Args:
        depth: MoE layers ahead (0 = no prefetch): ``--prefetch-depth``.
        threshold: minimum predictor score (an estimated probability of use): ``--threshold``.
        max_experts_per_layer: most candidates per target layer (None: top-k; more than a
            layer uses can only be wasted).
        speculative_nbytes: cap on prefetch bytes being read at once (None: 2 x depth x
            top-k experts): ``--prefetch-cap-mb`` in bytes.
        speculative_ms: cap on prefetch bytes being read at once, in milliseconds of the
            storage's measured throughput: a miss's demand read waits behind at most about
            this much speculation (None: no such cap): ``--prefetch-cap-ms``.
        recall_off: switch a layer's prefetching off when its recall average drops below this.
        recall_on: switch it back on when the average recovers above this.
        recall_decay: weight of history in the recall average (per token).
        governor: let ``golem.runtime.governor.Governor`` choose the depth per token, up to
            ``depth`` (False: always ``depth``, to measure a fixed depth): ``--prefetch-governor``.
        auto: ``depth`` is ``--prefetch-depth auto``'s ceiling, not the user's: a model with
            fewer MoE layers gets less, not an error (``PrefetchConfig.auto_depth()``).
    """

    depth: int
    threshold: float = DECLARED  # type: ignore[assignment]
    max_experts_per_layer: Optional[int] = None
    speculative_nbytes: Optional[int] = None
    speculative_ms: Optional[float] = DECLARED  # type: ignore[assignment]
    recall_off: float = 0.25
    recall_on: float = 0.4
    recall_decay: float = 0.9
    governor: bool = True
    auto: bool = False

    @classmethod
    def auto_depth(cls, **fields) -> "PrefetchConfig":
        """``--prefetch-depth auto``: governed, up to ``AUTO_DEPTH`` layers ahead."""
        return cls(depth=AUTO_DEPTH, auto=True, **fields)

    def for_layers(self, moe_layers: int) -> "PrefetchConfig":
        """This config on a model with ``moe_layers`` MoE layers (auto's ceiling capped)."""
        if self.auto and self.depth > max(moe_layers - 1, 1):
            import dataclasses

            return dataclasses.replace(self, depth=max(moe_layers - 1, 1))
        return self

    def __post_init__(self) -> None:
        # Checked where every option is: golem.runtime.config.RuntimeConfig (prefetch=...).
        for name, declared_as in (("threshold", "threshold"), ("speculative_ms", "prefetch_cap_ms")):
            if getattr(self, name) is DECLARED:
                object.__setattr__(self, name, option(declared_as).default)


# -- checks of one value -------------------------------------------------------------------


def is_int(x) -> bool:
    import numpy as np

    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_int(value, what: str, low: Optional[int] = None, high: Optional[int] = None) -> Optional[int]:
    """``value`` as an int within ``[low, high]`` (None passes), or a ``ConfigError`` naming ``what``."""
    if value is None:
        return None
    if not is_int(value):
        raise ConfigError(f"{what}: expected a whole number, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{what} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{what} must be at most {high}, got {value}")
    return int(value)


def _positive_int(value, o: Option):
    return check_int(value, o.label, low=1)


def _count(value, o: Option):
    return check_int(value, o.label, low=0)


def prefetch_depth(text: str):
    """``--prefetch-depth``'s text: ``auto`` or a whole number (a ``ValueError`` otherwise)."""
    return "auto" if text.strip().lower() == "auto" else int(text)


def _depth(value, o: Option):
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str) or not is_int(value):
        raise ConfigError(f"{o.label}: expected 'auto' or a whole number, got {value!r}")
    return check_int(value, o.label, low=0)


def _bool(value, o: Option) -> bool:
    import numpy as np

    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{o.label}: expected True or False, got {value!r}")
    return bool(value)


def _name(value, o: Option):
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{o.label}: expected a name, got {value!r}")
    return value


def _path(value, o: Option):
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{o.label}: expected a file path, got {value!r}")
    if not str(value):
        raise ConfigError(f"{o.label}: empty path")
    return value


def _number(value, o: Option, *, low: float, high: float = math.inf, low_open: bool = False,
            none: bool = False):
    """A finite number in ``[low, high]`` (``(low, high]`` with ``low_open``; None with ``none``)."""
    if value is None and none:
        return None
    from numbers import Real

    if not isinstance(value, Real) or isinstance(value, bool):
        raise ConfigError(f"{o.label}: expected a number, got {value!r}")
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        if high < math.inf:
            raise ConfigError(f"{o.label} must be within [{low:g}, {high:g}], got {value}")
        if low_open and low == 0:
            raise ConfigError(f"{o.label} must be a finite number > 0, got {value}")
        raise ConfigError(f"{o.label} must be a finite number >= {low:g}, got {value}")
    return float(value)


def _threshold(value, o: Option):
    return _number(value, o, low=0.0, high=1.0)


def _positive_number(value, o: Option):
    return _number(value, o, low=0.0, low_open=True, none=True)


def parse_nbytes(value, what: str) -> int:
    """Bytes from a size option (``48GB``, ``48G``, ``4.8e10``, an int), or a ``ConfigError``."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) and not is_int(value):
        raise ConfigError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, float):
        value = repr(value)
    from golem.runtime.units import parse_size

    try:
        nbytes = parse_size(value, what=what)
    except (OverflowError, ValueError) as e:
        raise ConfigError(str(e) if what in str(e) else f"{what}: cannot read size {value!r}") from None
    if nbytes <= 0:
        raise ConfigError(f"{what}: size must be positive, got {value!r}")
    if nbytes > 2**62:
        raise ConfigError(f"{what}: {value!r} is more bytes than any machine holds")
    return nbytes


def _size(value, o: Option):
    return None if value is None else parse_nbytes(value, o.label)


def check_ranges(ranges, what: str):
    """Layer ranges: the text of ``-f`` (checked against the model later) or layer numbers."""
    if isinstance(ranges, str):
        from golem.runtime.units import parse_layer_ranges

        try:
            parse_layer_ranges(ranges, what=what)  # the syntax, and numbers below any model's bound
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return ranges
    try:
        items = list(ranges)
    except TypeError:
        raise ConfigError(f"{what}: expected layer ranges like '0-3,46-47' or a list of layers, got {ranges!r}") from None
    bad = [x for x in items if not is_int(x) or x < 0]
    if bad:
        raise ConfigError(f"{what}: {bad[0]!r} is not a layer number")
    return tuple(int(x) for x in items)


def _ranges(value, o: Option):
    return None if value is None else check_ranges(value, o.label)


def _overrides(value, o: Option):
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{o.label}: expected (RANGES, N) pairs, got {value!r}")
    out = []
    for pair in value:
        try:
            ranges, slots = pair
        except (TypeError, ValueError):
            raise ConfigError(f"{o.label}: expected (RANGES, N) pairs, got {pair!r}") from None
        ranges = check_ranges(ranges, o.label)
        if isinstance(slots, str):
            try:
                slots = int(slots)
            except ValueError:
                raise ConfigError(f"{o.label} {ranges} {slots}: N must be a whole number of slots") from None
        out.append((ranges, check_int(slots, f"{o.label} {ranges}", low=1)))
    return tuple(out)


def _cache_sizes(value, o: Option):
    """The cache size (slots) of each MoE layer: an int, a mapping layer -> slots, or a
    callable (its result is checked by ``check_given_cache_sizes`` once the model is open)."""
    if value is None or callable(value):
        return value
    if is_int(value):
        return check_int(value, "cache_sizes", low=1)
    if not isinstance(value, Mapping):
        raise ConfigError(f"cache_sizes: expected an int, a dict layer -> slots or a callable, got {value!r}")
    for layer, slots in value.items():
        if not is_int(layer):
            raise ConfigError(f"cache_sizes: layer {layer!r} is not a layer number (an int)")
        if not is_int(slots) or slots < 1:
            raise ConfigError(f"cache_sizes: layer {layer}: slots must be a whole number >= 1, got {slots!r}")
    return dict(value)


def _policy(value, o: Option):
    if not isinstance(value, str):
        raise ConfigError(f"{o.label}: expected a policy name, got {value!r}")
    from golem.runtime.policies import make_policy

    try:
        make_policy(value)  # a name or a spec with parameters ("lfu-decay:decay=0.9")
    except ValueError as e:
        raise ConfigError(f"{o.label} {value}: {e}") from None
    return value


def _warm_start(value, o: Option):
    if value is None:
        return None
    if is_int(value):  # a seed: the library's older spelling of warm_random
        return int(value)
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"warm_start ({o.label}): expected a path, 'saved' or a seed (int), got {value!r}")
    return _path(value, o)


def _seed(value, o: Option):
    return check_int(value, o.label, low=0)


def _prefetch(value, o: Option):
    """A ``PrefetchConfig``, its fields checked as the flat options they stand for."""
    if value is None:
        return None
    if not isinstance(value, PrefetchConfig):
        raise ConfigError(f"prefetch: expected a PrefetchConfig, got {type(value).__name__}")
    for field_name, name in (("depth", "prefetch_depth"), ("threshold", "threshold"),
                             ("speculative_ms", "prefetch_cap_ms")):
        BY_NAME[name].check(getattr(value, field_name), BY_NAME[name])
    nb = value.speculative_nbytes
    if nb is not None and (not is_int(nb) or nb <= 0):
        raise ConfigError(f"--prefetch-cap-mb must be a positive number, got {nb / 1e6 if is_int(nb) else nb!r}")
    check_int(value.max_experts_per_layer, "prefetch.max_experts_per_layer", low=1)
    for field_name in ("recall_off", "recall_on", "recall_decay"):
        _number(getattr(value, field_name), Option(f"prefetch.{field_name}", None, "", _number), low=0.0, high=1.0)
    return value


def _paths(value, o: Option):
    if isinstance(value, (str, os.PathLike)) or hasattr(value, "experts"):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ConfigError(f"{o.label}: expected trace files, folders or traces, got {value!r}") from None
    for item in items:
        if not hasattr(item, "experts"):
            _path(item, o)
    return items


def _trace_or_path(value, o: Option):
    return value if hasattr(value, "experts") else _path(value, o)


def _mapping(value, o: Option):
    if value is not None and not isinstance(value, Mapping):
        raise ConfigError(f"{o.name}: expected a dict, got {type(value).__name__}")
    return None if value is None else dict(value)


def _io_parallelism(value, o: Option):
    from golem.io.read_jobs import MAX_PARALLELISM

    return check_int(value, o.label, low=1, high=MAX_PARALLELISM)


def check_storage_emulation(spec, what: str = "--emulate-storage") -> str:
    """``--emulate-storage``: readable, with a finite positive bandwidth and a finite latency."""
    from golem.io.storage import parse_throttle

    if not isinstance(spec, str):
        raise ConfigError(f"{what}: expected 'GB_PER_S[,LATENCY]', got {spec!r}")
    try:
        t = parse_throttle(spec)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None
    numbers = [float(x) for x in re.findall(r"[-+]?(?:nan|inf(?:inity)?|[0-9.]+(?:e[-+]?\d+)?)", spec.lower())]
    gb = getattr(t, "gb_per_s", None)
    lat = getattr(t, "latency_s", 0.0)
    if (not numbers or any(not math.isfinite(x) or x < 0 for x in numbers)
            or gb is None or not math.isfinite(gb) or gb <= 0 or not math.isfinite(lat) or lat < 0):
        raise ConfigError(f"{what} {spec}: bandwidth and latency must be finite positive numbers, "
                          "e.g. '2.5' or '2.5,80us'")
    return spec


def _storage(value, o: Option):
    return None if value is None else check_storage_emulation(value, o.label)


def _throttle(value, o: Option):
    if value is None:
        return None
    from golem.io.storage import Throttle

    if not isinstance(value, Throttle):
        raise ConfigError(f"throttle: expected a golem.io.storage.Throttle, got {type(value).__name__}")
    return value


def _slot_writer(value, o: Option):
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{o.label}: expected one of {', '.join(_writer_names())}, got {value!r}")
    if value not in _writer_names():
        raise ConfigError(f"{o.label} {value!r}: expected one of {', '.join(_writer_names())}")
    return value


def _writer_names() -> list:
    from golem.runtime.writers import AUTO, WRITERS

    return [AUTO, *WRITERS]


def _policy_names() -> list:
    from golem.runtime.policies import policy_names

    return policy_names()


# -- the declarations ----------------------------------------------------------------------

CACHE, PREFETCH, STORAGE, TRACES = "expert cache (golem)", "prefetch (golem)", "storage (golem)", "traces (golem)"

OPTIONS: Tuple[Option, ...] = (
    Option("cache_size", None, "Expert slots per MoE layer (>= top-k; default: sized to the machine's memory).",
           _positive_int, "Optional[int]", ("-c", "--cache-size"), CACHE, {"type": int}),
    Option("cache_size_override", (), "Slots for some layers, e.g. '0-40,90-93 128' (repeatable; later ones win).",
           _overrides, "Tuple[Tuple[LayerRanges, int], ...]", ("--cache-size-override",), CACHE,
           {"nargs": 2, "action": "append", "metavar": ("RANGES", "N")}, aliases=("cache_size_overrides",)),
    Option("pin_layers", None, "Layers kept fully resident (no cache logic), e.g. '0-3,46-47'.",
           _ranges, "Optional[LayerRanges]", ("-f", "--pin-layers"), CACHE, {"metavar": "RANGES"}),
    Option("memory_budget", None, "Total memory for weights, expert slots and staging buffers, e.g. '48GB': golem "
           "picks pinned layers and slots (default: the machine's memory less a margin).",
           _size, "Optional[int]", ("--memory-budget",), CACHE, {"metavar": "SIZE"}),
    Option("memory_limit", None, "The machine memory to size to when nothing else sizes the caches (default: "
           "measured; the GOLEM_MEMORY_LIMIT environment variable overrides).", _size, "Optional[int]"),
    Option("cache_sizes", None, "The cache size (slots) of each MoE layer given outright: an int, a dict "
           "layer -> slots, or a callable (OpenedCheckpoint) -> dict; wins over every other sizing option.", _cache_sizes,
           "Union[None, int, Mapping[int, int], Callable]"),
    Option("warm_random", None, "Fill every cache with random experts before the first token.",
           _seed, "Optional[int]", ("-R", "--warm-random"), CACHE, {"type": int, "metavar": "SEED"}),
    Option("warm_start", None, "Fill caches with the most used experts of a trace, a folder of traces, a profile, "
           "or 'saved' (the profile --save-profile keeps); also steers --memory-budget.",
           _warm_start, "Union[None, str, os.PathLike, int]", ("-W", "--warm-start"), CACHE, {"metavar": "PATH"}),
    Option("save_profile", False, "After the run, merge its routing into the profile kept beside golem's cache.",
           _bool, "bool", ("--save-profile",), CACHE, {"action": "store_true"}),
    Option("policy", DEFAULT_POLICY, "Eviction policy: {choices} (default {default}, the best on the OLMoE traces; "
           "see benchmarks/bench_policies.py).", _policy, "str", ("--policy",), CACHE, choices=_policy_names),
    Option("prefetch_depth", 0, "MoE layers ahead to prefetch: 'auto' (golem-run's, golem-chat's and "
           f"golem-server's default: a governor picks 0 to {AUTO_DEPTH} per token from how fast decode steps are at "
           "each depth, wherever experts are offloaded), N (at most N, governed), 0 (none: the synchronous baseline; "
           "load()'s default, so that a library caller asks for speculation).", _depth, "Union[int, str]",
           ("--prefetch-depth",), PREFETCH, {"type": prefetch_depth}, command_default="auto"),
    Option("prefetch_governor", True, "Let the governor lower the depth when prefetching does not pay "
           "(--no-prefetch-governor: exactly --prefetch-depth layers ahead, to measure a fixed depth).",
           _bool, "bool", ("--prefetch-governor",), PREFETCH, {"action": "negatable"}, needs_depth=True),
    Option("threshold", 0.3, "Prefetch experts whose predicted probability of use is at least this "
           "(default {default}).", _threshold, "float", ("--threshold",),
           PREFETCH, {"type": float}, needs_depth=True),
    Option("predictor", "lookahead", "Who guesses the next experts (default {default}; golem-trace predict --list "
           "shows the names).", _name, "str", ("--predictor",), PREFETCH, needs_depth=True),
    Option("predictor_train", (), "Traces (or folders of them) the predictor learns from first (transition, "
           "frequency, probe).", _paths, "Tuple", ("--predictor-train",), PREFETCH,
           {"nargs": "+", "metavar": "TRACE"}, needs_depth=True),
    Option("predictor_trace", None, "Trace the oracle predictors replay (a golem-trace/1 file of this very run).",
           _trace_or_path, "Any", ("--predictor-trace",), PREFETCH, needs_depth=True),
    Option("prefetch_cap_mb", None, "Most speculative megabytes being read at once (default: 2 x depth x top-k "
           "experts).", _positive_number, "Optional[float]",
           ("--prefetch-cap-mb",), PREFETCH, {"type": float}, needs_depth=True),
    Option("prefetch_cap_ms", 3.0, "Most speculative reads at once, in milliseconds of the storage's measured "
           "throughput: a miss waits behind at most about this much (default: {default:g}).",
           _positive_number, "Optional[float]", ("--prefetch-cap-ms",), PREFETCH,
           {"type": float}, needs_depth=True),
    Option("prefetch", None, "The structured form of the prefetch options: a golem.runtime.prefetch.PrefetchConfig "
           "(depth, threshold, caps and the recall switch).", _prefetch, "Optional[PrefetchConfig]"),
    Option("predictor_options", None, "Fields of golem.predictors.registry.PredictorOptions.", _mapping,
           "Optional[Mapping[str, Any]]"),
    Option("direct_io", False, "Read experts with O_DIRECT, bypassing the page cache.", _bool, "bool",
           ("--direct-io",), STORAGE, {"action": "store_true"}),
    Option("packed_experts", True, "Read experts from the packed copy that golem-pack writes into the model "
           "folder, when there is one: one read per expert instead of one per tensor (--no-packed-experts: "
           "from the checkpoint's stacked tensors).", _bool, "bool", ("--packed-experts",), STORAGE,
           {"action": "negatable"}),
    Option("io_parallelism", None, "Expert reads in flight at once.", _io_parallelism, "Optional[int]",
           ("--io-parallelism",), STORAGE, {"type": int}),
    Option("emulate_storage", None, "Throttle reads to a slower SSD, e.g. '2.5,80us'.", _storage, "Optional[str]",
           ("--emulate-storage",), STORAGE, {"metavar": "GB_PER_S[,LATENCY]"}),
    Option("throttle", None, "A golem.io.storage.Throttle to read through instead of emulate_storage.", _throttle),
    Option("slot_writer", None, "How experts get into slots ({choices}): a host memcpy into the pool, or an upload "
           "and an in-place update on the device (default auto: host on CPU and Metal, device on CUDA).",
           _slot_writer, "Optional[str]", ("--slot-writer",), STORAGE, choices=_writer_names),
    Option("trace_out", None, "Record routing to this golem-trace/1 file.", _path,
           "Union[None, str, os.PathLike]", ("--trace-out",), TRACES),
    Option("trace_hidden", False, "With --trace-out: record each MoE layer's post-attention residual too.",
           _bool, "bool", ("--trace-hidden",), TRACES, {"action": "store_true"}, aliases=("record_hidden",)),
    Option("record", False, "Keep a TraceRecorder of the routing (engine.trace); on with trace_out or "
           "save_profile.", _bool, "bool"),
)

BY_NAME: Dict[str, Option] = {o.name: o for o in OPTIONS}  # what everything reads, in declaration order
ALIASES: Dict[str, str] = {a: o.name for o in OPTIONS for a in o.aliases}


def declared() -> Tuple[Option, ...]:
    """Every option, in declaration order (the order of ``--help`` and of the fields)."""
    return tuple(BY_NAME.values())


def option(name: str) -> Option:
    """The declaration of ``name`` (a field name or an alias)."""
    return BY_NAME[ALIASES.get(name, name)]


def default_of(name: str) -> Any:
    """The declared default of ``name``, as it is now."""
    return option(name).default
