"""How users write sizes and layer numbers, for every command and the library.

Owns ``parse_size`` / ``format_nbytes`` (``48G``, ``48GB``, ``48GiB``, ``4.8e10``, ``48 GB``)
and the layer-range syntax ``0-3,46-47`` (``parse_layer_ranges``, ``format_layer_ranges``,
``parse_override``). Ranges are bounded before they are expanded, so a typo such as
``0-99999999999`` is answered at once. Knows nothing of models, files or MLX.
"""

from __future__ import annotations

import math
import re
from numbers import Integral, Real
from typing import Iterable, Optional, Sequence, Union

GB = 1000 ** 3
GiB = 1024 ** 3

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
MAX_NBYTES = 2**63 - 1  # what an int64 byte count holds; no machine comes near it
MAX_LAYERS = 1 << 16  # the bound on a layer number when the model is not known yet


def parse_size(text: Union[str, int, float], what: str = "size") -> int:
    """Bytes from ``48G``, ``48GB``, ``48 gb``, ``48GiB``, ``512MiB``, ``0.5GB``, ``4.8e10``
    or a number of bytes (K/M/G/T and KB..TB are powers of 10, KiB..TiB powers of 2).

    Raises ``ValueError`` naming ``what`` and the text for anything else, including
    negative, NaN, infinite and overflowing sizes (``1e400B``).
    """
    if isinstance(text, bool):
        raise ValueError(f"{what}: cannot read size {text!r}")
    if isinstance(text, Integral):
        if int(text) < 0:
            raise ValueError(f"{what}: size must not be negative, got {text}")
        if int(text) > MAX_NBYTES:
            raise ValueError(f"{what}: size {text} is too large")
        return int(text)
    if isinstance(text, Real):
        value = float(text)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{what}: size must be a finite number >= 0, got {text!r}")
        if value > MAX_NBYTES:
            raise ValueError(f"{what}: size {text!r} is too large")
        return int(value)
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(
            f"{what}: cannot read size {text!r}; write a number and a unit, e.g. 48GB, 48G, 512MiB, 4.8e10 "
            f"(units: B, K/KB, M/MB, G/GB, T/TB = powers of 10; KiB, MiB, GiB, TiB = powers of 2)"
        )
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value > MAX_NBYTES:
        raise ValueError(f"{what}: size {str(text).strip()!r} is too large")
    return int(value)


def format_nbytes(nbytes: float) -> str:
    """``12.58 MB``, ``48.00 GB`` (decimal units, as ``parse_size`` reads them)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def parse_layer_ranges(
    text: str, *, num_layers: Optional[int] = None, what: str = "-f/--pin-layers"
) -> list[int]:
    """``"0-40,90-93"`` -> ``[0, 1, ..., 40, 90, 91, 92, 93]`` (sorted, without repeats).

    Every number is checked against ``num_layers`` (the layers a range may name,
    ``0..num_layers-1``; ``MAX_LAYERS`` when the model is not known yet) before any range
    is expanded. An empty text is refused.
    """
    bound = MAX_LAYERS if num_layers is None else int(num_layers)
    items = [s.strip() for s in str(text).split(",")]
    if not any(items):
        raise ValueError(f"{what}: empty layer range {text!r}; write e.g. 0-40,90-93")
    spans = []
    for item in items:
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", item)
        if not m:
            raise ValueError(f"{what}: cannot read layer range {item!r} in {text!r}; write e.g. 0-40,90-93")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"{what}: range {item!r} runs backwards")
        if hi >= bound:
            if num_layers is None:
                raise ValueError(f"{what}: layer {hi} is beyond any model (in {text!r}; layers count from 0)")
            raise ValueError(f"{what}: layer {hi} does not exist (in {text!r}; the layers are 0-{bound - 1})")
        spans.append((lo, hi))
    out: set[int] = set()
    for lo, hi in spans:
        out.update(range(lo, hi + 1))
    return sorted(out)


def format_layer_ranges(layers: Iterable[int]) -> str:
    """The inverse of ``parse_layer_ranges``: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    layers = sorted(set(int(x) for x in layers))
    parts, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(parts)


def parse_override(values: Sequence[str], *, num_layers: Optional[int] = None) -> tuple[list[int], int]:
    """One ``--cache-size-override RANGES N`` (argparse ``nargs=2``) -> (layers, slots)."""
    if len(values) != 2:
        raise ValueError(f"--cache-size-override takes RANGES N, got {list(values)}")
    layers = parse_layer_ranges(values[0], num_layers=num_layers, what="--cache-size-override")
    try:
        slots = int(values[1])
    except ValueError:
        raise ValueError(f"--cache-size-override {values[0]} {values[1]}: N must be a whole number of slots") from None
    if slots < 0:
        raise ValueError(f"--cache-size-override {values[0]} {values[1]}: N must not be negative")
    return layers, slots
