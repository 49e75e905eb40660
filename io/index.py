"""The safetensors index: every tensor of a checkpoint as (file, offset, nbytes), validated.

Reads each shard's header once (and ``model.safetensors.index.json`` when present), checks
it before anything runs, and slices stacked expert tensors into per-expert byte ranges.
Knows nothing of models: the caller says which stacked tensors belong to which layer.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Tuple

from .file_handles import FileIdentity
from .ranges import ByteRange

# Bytes per element of every safetensors dtype.
DTYPE_NBYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
MAX_HEADER_NBYTES = 100 * 1024 * 1024
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that is malformed, truncated or unsafe; the message names file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a shard.

    Args:
        name: tensor name in the checkpoint.
        path: absolute path of its shard.
        dtype: safetensors dtype string ("F32", "U32", ...).
        shape: full shape.
        offset: absolute file offset of its first byte.
        nbytes: its length in bytes.
    """

    name: str
    path: str
    dtype: str
    shape: Tuple[int, ...]
    offset: int
    nbytes: int


def _read_header(path: Path) -> Tuple[Dict[str, TensorInfo], FileIdentity]:
    try:
        return _parse_header(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the shard ({e.strerror or e})") from None


def _parse_header(path: Path) -> Tuple[Dict[str, TensorInfo], FileIdentity]:
    with open(path, "rb") as f:
        identity = FileIdentity.of(os.fstat(f.fileno()))  # what the offsets below are valid for
        size = identity.size
        if size < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header (truncated?)")
        (header_nbytes,) = struct.unpack("<Q", f.read(8))
        if header_nbytes <= 0 or header_nbytes > MAX_HEADER_NBYTES:
            raise CheckpointError(f"{path}: header size {header_nbytes} is not sane (corrupted file?)")
        if 8 + header_nbytes > size:
            raise CheckpointError(
                f"{path}: header of {header_nbytes} bytes runs past the end of the {size}-byte file (truncated?)"
            )
        raw = f.read(header_nbytes)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_start = 8 + header_nbytes
    tensors: Dict[str, TensorInfo] = {}
    spans: List[Tuple[int, int, str]] = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = spec["dtype"]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(v) for v in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry: {spec!r}") from None
        if dtype not in DTYPE_NBYTES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if any(d < 0 for d in shape) or begin < 0 or end < begin:
            raise CheckpointError(f"{path}: tensor {name!r} has negative shape or offsets {shape} {[begin, end]}")
        expected = prod(shape) * DTYPE_NBYTES[dtype]
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r}: {dtype} x {list(shape)} is {expected} bytes but its range holds {end - begin}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {data_start + end}, past the end of the {size}-byte file (truncated?)"
            )
        tensors[name] = TensorInfo(name, str(path), dtype, shape, data_start + begin, end - begin)
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap (bytes {b1}..{e0})")
    return tensors, identity


def _inside(root: Path, name: str) -> Path:
    """The shard ``name`` of the index, judged by its name: a relative path that stays inside
    the model folder. The file itself may be a symlink to anywhere (a Hugging Face cache
    snapshot links every file to ``../../blobs/<sha>``), as a shard found without an index may."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{root / INDEX_FILE}: shard path {name!r} points outside the model folder")
    return root / name


class SafetensorsIndex:
    """All tensors of a model folder, from headers only.

    Args:
        model_dir: the checkpoint folder (``model*.safetensors``, optionally an index JSON).
            Shards are named relative to it; symlinked shards are followed wherever they
            point, with or without an index, as mlx-lm does.

    ``identities`` holds each shard's ``FileIdentity`` when its header was read: the
    offsets are valid for that file only (pin it with ``FileHandles(identities=...)``).
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir).resolve()
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{model_dir}: not a folder")
        self.tensors: Dict[str, TensorInfo] = {}
        self.identities: Dict[str, FileIdentity] = {}  # each shard as its header was read
        for shard in self._shards():
            tensors, self.identities[str(shard)] = _read_header(shard)
            for name, info in tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"{shard}: tensor {name!r} also appears in {self.tensors[name].path}")
                self.tensors[name] = info
        self._check_index_map()

    def _shards(self) -> List[Path]:
        index_file = self.model_dir / INDEX_FILE
        if index_file.exists():
            try:
                self._weight_map = json.loads(index_file.read_text())["weight_map"]
                if not isinstance(self._weight_map, dict):
                    raise TypeError("weight_map is not an object")
                if not all(isinstance(v, str) for v in self._weight_map.values()):
                    raise TypeError("weight_map names a shard that is not a string")
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
                raise CheckpointError(f"{index_file}: not a valid safetensors index ({e})") from None
            except OSError as e:
                raise CheckpointError(f"{index_file}: cannot read the index ({e.strerror or e})") from None
            names = sorted(set(self._weight_map.values()))
            shards = [_inside(self.model_dir, n) for n in names]
            for s in shards:
                if not s.is_file():
                    broken = " (a broken link)" if s.is_symlink() else ""
                    raise CheckpointError(f"{index_file}: shard {s.name!r} is missing{broken}")
            return shards
        self._weight_map = None
        shards = sorted(self.model_dir.glob("model*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.model_dir}: no model*.safetensors files")
        return shards

    def _check_index_map(self) -> None:
        if self._weight_map is None:
            return
        for name, shard in self._weight_map.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.model_dir / INDEX_FILE}: tensor {name!r} is listed in {shard!r} but absent from it")
            if Path(info.path) != _inside(self.model_dir, shard):
                raise CheckpointError(f"{self.model_dir / INDEX_FILE}: tensor {name!r} is listed in {shard!r} but lives in {Path(info.path).name}")

    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} is not in the checkpoint") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        names = self.tensors if names is None else names
        return sum(self.tensors[n].nbytes for n in names)


@dataclass(frozen=True)
class StackedTensor:
    """A tensor whose first axis is the expert axis, and where one expert's slice lands.

    Args:
        part: short name inside the layer, e.g. "gate_proj.scales".
        info: the tensor as stored.
        expert_shape: shape of one expert's slice.
        expert_nbytes: bytes of one expert's slice.
        dest: byte offset of this part in an expert's packed buffer.
    """

    part: str
    info: TensorInfo
    expert_shape: Tuple[int, ...]
    expert_nbytes: int
    dest: int


ALIGN = 64


class ExpertIndex:
    """Per-expert byte ranges of stacked expert tensors, layer by layer.

    Args:
        index: the checkpoint's ``SafetensorsIndex``.
        layers: for each MoE layer, ``{part: tensor name}`` of its stacked expert tensors.
        num_experts: experts per layer (the first axis of every stacked tensor).
    """

    def __init__(self, index: SafetensorsIndex, layers: Mapping[int, Mapping[str, str]], num_experts: Mapping[int, int]):
        self.index = index
        self.layers: Dict[int, List[StackedTensor]] = {}
        self._expert_nbytes: Dict[int, int] = {}
        for layer, parts in layers.items():
            n = num_experts[layer]
            stacked, dest = [], 0
            for part in sorted(parts):
                info = index[parts[part]]
                if not info.shape or info.shape[0] != n:
                    raise CheckpointError(
                        f"{info.path}: tensor {info.name!r} has shape {list(info.shape)}, expected {n} experts on its first axis"
                    )
                per = info.nbytes // n
                stacked.append(StackedTensor(part, info, info.shape[1:], per, dest))
                dest += -(-per // ALIGN) * ALIGN
            self.layers[layer] = stacked
            self._expert_nbytes[layer] = dest
        self._num_experts = {layer: num_experts[layer] for layer in layers}
        self.packed = None  # a golem.io.packed_experts.PackedExperts: each expert one range there

    def use_packed(self, packed) -> None:
        """Read experts from ``packed`` (``golem.io.packed_experts.open_packed``): one range each."""
        self.packed = packed

    def num_experts(self, layer: int) -> int:
        return self._num_experts[layer]

    def expert_nbytes(self, layer: int) -> int:
        """Size of one expert's packed buffer (parts aligned to 64 bytes)."""
        return self._expert_nbytes[layer]

    def parts(self, layer: int) -> List[StackedTensor]:
        return self.layers[layer]

    def ranges(self, layer: int, expert: int) -> List[ByteRange]:
        """The byte ranges of one expert, ``dest`` pointing into its packed buffer: one range in
        the packed copy once ``use_packed``, else ``stacked_ranges``."""
        n = self._num_experts[layer]
        if not 0 <= expert < n:
            raise IndexError(f"layer {layer}: expert {expert} outside [0, {n})")
        if self.packed is not None:
            return self.packed.ranges(layer, expert)
        return self.stacked_ranges(layer, expert)

    def stacked_ranges(self, layer: int, expert: int) -> List[ByteRange]:
        """The expert's byte ranges in the checkpoint's stacked tensors, one per part."""
        return [
            ByteRange(t.info.path, t.info.offset + expert * t.expert_nbytes, t.expert_nbytes, t.dest, t.info.name)
            for t in self.layers[layer]
        ]

    def total_nbytes(self) -> int:
        """Bytes of every expert of every indexed layer, as stored."""
        return sum(t.info.nbytes for parts in self.layers.values() for t in parts)

    def tensor_names(self) -> List[str]:
        return [t.info.name for parts in self.layers.values() for t in parts]
