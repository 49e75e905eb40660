"""Machines as memory tiers: a GPU or unified memory, system RAM, and the SSD experts stream from.

Owns ``Tier``, ``MachineSpec`` (bandwidths, capacities, reserves) and ``load_machine`` (a
built-in profile from ``catalog`` or a JSON file). Knows nothing of models or placements.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from golem.runtime.analysis import catalog
from golem.runtime.units import GB, parse_size

TIER_KINDS = ("gpu", "unified", "ram", "ssd")


@dataclass(frozen=True)
class Tier:
    """One level of a machine's memory.

    Args:
        kind: ``gpu`` (device memory), ``unified`` (Apple silicon), ``ram`` (system memory,
            computed on by the CPU) or ``ssd`` (where experts stream from).
        nbytes: capacity.
        gb_per_s: sustained read bandwidth in 10^9 bytes/s.
        reserve_nbytes: capacity not available to weights (OS, KV cache, buffers).
        read_latency_s: fixed cost of one expert read (SSD only).
        tflops: optional compute ceiling of the processor using this tier (10^12 FLOP/s).
        count: devices pooled in this tier (informational).
    """

    kind: str
    nbytes: int
    gb_per_s: float
    reserve_nbytes: int = 0
    read_latency_s: float = 0.0
    tflops: Optional[float] = None
    count: int = 1

    @property
    def usable_nbytes(self) -> int:
        return max(0, self.nbytes - self.reserve_nbytes)

    def seconds(self, nbytes: float, flops: float = 0.0) -> float:
        t = nbytes / (self.gb_per_s * GB)
        if self.tflops:
            t = max(t, flops / (self.tflops * 1e12))
        return t

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "size": self.nbytes, "gb_per_s": self.gb_per_s}
        if self.reserve_nbytes:
            out["reserve"] = self.reserve_nbytes
        if self.read_latency_s:
            out["read_latency_s"] = self.read_latency_s
        if self.tflops:
            out["tflops"] = self.tflops
        if self.count != 1:
            out["count"] = self.count
        return out


@dataclass(frozen=True)
class MachineSpec:
    """A machine as memory tiers: at most one GPU or unified tier, at most one RAM tier, one SSD.

    Args:
        name: profile name.
        tiers: the tiers, any order.
        description: free text.
    """

    name: str
    tiers: tuple
    description: str = ""

    def _tier(self, *kinds) -> Optional[Tier]:
        return next((t for t in self.tiers if t.kind in kinds), None)

    @property
    def fast(self) -> Optional[Tier]:
        """The GPU or unified-memory tier, if any."""
        return self._tier("gpu", "unified")

    @property
    def ram(self) -> Optional[Tier]:
        return self._tier("ram")

    @property
    def ssd(self) -> Tier:
        return self._tier("ssd")

    @property
    def cache_tier(self) -> Optional[Tier]:
        """Where the expert cache lives: system RAM, or unified memory without it."""
        return self.ram or self._tier("unified")

    def with_memory(self, nbytes: int) -> "MachineSpec":
        """The same machine with ``nbytes`` of cache-tier memory (RAM, or unified memory)."""
        tier = self.cache_tier
        if tier is None:
            raise ValueError(f"machine {self.name!r} has no RAM or unified tier to resize")
        tiers = tuple(replace(t, nbytes=int(nbytes)) if t is tier else t for t in self.tiers)
        return replace(self, tiers=tiers)

    def with_ssd(self, gb_per_s: float) -> "MachineSpec":
        tiers = tuple(replace(t, gb_per_s=float(gb_per_s)) if t.kind == "ssd" else t for t in self.tiers)
        return replace(self, tiers=tiers)

    @classmethod
    def from_dict(cls, data: dict, name: str = "machine", where: str = "machine") -> "MachineSpec":
        if not isinstance(data, dict) or not isinstance(data.get("tiers"), list):
            raise ValueError(f"{where}: expected an object with a 'tiers' list")
        tiers = []
        for i, t in enumerate(data["tiers"]):
            at = f"{where}: tiers[{i}]"
            if not isinstance(t, dict):
                raise ValueError(f"{at}: expected an object")
            kind = str(t.get("kind", "")).lower()
            if kind not in TIER_KINDS:
                raise ValueError(f"{at}: kind {t.get('kind')!r} is not one of {', '.join(TIER_KINDS)}")
            if "gb_per_s" not in t:
                raise ValueError(f"{at}: lacks 'gb_per_s'")
            if kind != "ssd" and "size" not in t:
                raise ValueError(f"{at}: lacks 'size'")
            tiers.append(Tier(
                kind=kind,
                nbytes=parse_size(t.get("size", 0), f"{at}.size"),
                gb_per_s=_number(t, "gb_per_s", at, positive=True),
                reserve_nbytes=parse_size(t.get("reserve", 0), f"{at}.reserve"),
                read_latency_s=_number(t, "read_latency_s", at, default=0.0),
                tflops=_number(t, "tflops", at, positive=True) if t.get("tflops") else None,
                count=int(_number(t, "count", at, default=1, positive=True)),
            ))
        kinds = [t.kind for t in tiers]
        if kinds.count("ssd") != 1:
            raise ValueError(f"{where}: needs exactly one 'ssd' tier")
        if kinds.count("gpu") + kinds.count("unified") > 1 or kinds.count("ram") > 1:
            raise ValueError(f"{where}: at most one gpu/unified tier and one ram tier")
        if "unified" in kinds and "ram" in kinds:
            raise ValueError(f"{where}: a unified-memory machine has no separate 'ram' tier")
        if "ram" not in kinds and "unified" not in kinds:
            raise ValueError(f"{where}: needs a 'ram' or 'unified' tier")
        return cls(name=str(data.get("name", name)), tiers=tuple(tiers),
                   description=str(data.get("description", "")))

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "tiers": [t.to_dict() for t in self.tiers]}


def _number(t: dict, key: str, at: str, default: Optional[float] = None, positive: bool = False) -> float:
    value = t.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"{at}: {key} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def load_machine(name_or_path: str) -> MachineSpec:
    """A built-in profile (``rtx3090-128g``, ``m3-max-128g``, ...) or a JSON file of the same shape.

    File format::

        {"name": "my-box", "description": "...",
         "tiers": [{"kind": "gpu", "size": "24GiB", "gb_per_s": 750, "reserve": "2GiB"},
                   {"kind": "ram", "size": "128GiB", "gb_per_s": 80, "reserve": "8GiB"},
                   {"kind": "ssd", "gb_per_s": 7.0, "read_latency_s": 6e-05}]}
    """
    key = str(name_or_path).lower()
    if key in catalog.MACHINES:
        return MachineSpec.from_dict(catalog.MACHINES[key], name=key, where=f"built-in machine {key}")
    path = Path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(catalog.MACHINES))
        raise ValueError(f"--machine: {name_or_path!r} is neither a built-in profile ({known}) nor a JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read machine profile: {e}") from None
    return MachineSpec.from_dict(data, name=path.stem, where=str(path))
