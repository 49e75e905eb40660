"""Packed experts: every expert's bytes in one place, so that a miss is one read.

A checkpoint converted by mlx-lm stores each MoE layer's experts stacked: gate, up and down
projections, each with its weights, scales and biases, one tensor apiece with the expert
axis first. One expert is then nine ranges far apart in the file, nine ``preadv`` calls,
nine returns of a reader thread to the interpreter. ``pack_experts`` writes a copy of the
expert tensors beside the checkpoint in which each expert is its packed buffer exactly as a
slot receives it (``ExpertIndex``'s layout), at a page-aligned offset: one range, one read.

Owns the two files (``golem-experts.bin``, the bytes, and ``golem-experts.json``, the
manifest, written last, so that a pack is complete once it exists) and the check that a
pack still matches its checkpoint: the shards it was copied from unchanged (size and
modification time) and the same layout of every layer. Knows nothing of models: it packs
what an ``ExpertIndex`` describes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .file_handles import ALIGN, FileHandles, FileIdentity, aligned_empty
from .index import CheckpointError, ExpertIndex
from .positioned_reads import read_ranges
from .read_errors import ReadError
from .ranges import ByteRange

DATA_FILE = "golem-experts.bin"
MANIFEST_FILE = "golem-experts.json"
FORMAT = "golem-experts/1"


def _round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def _layout(index: ExpertIndex) -> Dict[str, dict]:
    """Every layer's place in the data file and the parts of its experts' packed buffers."""
    layers, offset = {}, 0
    for layer in sorted(index.layers):
        stride = _round_up(index.expert_nbytes(layer))
        experts = index.num_experts(layer)
        layers[str(layer)] = {
            "offset": offset, "stride": stride, "experts": experts,
            "expert_nbytes": index.expert_nbytes(layer),
            "parts": [[t.info.name, t.expert_nbytes, t.dest] for t in index.parts(layer)],
        }
        offset += stride * experts
    return layers


def _sources(index: ExpertIndex) -> Dict[str, dict]:
    """The shards holding expert tensors, by name in the model folder, as indexed."""
    out = {}
    for layer in index.layers:
        for t in index.parts(layer):
            ident = index.index.identities[t.info.path]
            out[os.path.relpath(t.info.path, index.index.model_dir)] = {"size": ident.size, "mtime_ns": ident.mtime_ns}
    return dict(sorted(out.items()))


def pack_experts(index: ExpertIndex, folder: Optional[os.PathLike] = None, *,
                 progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Write the packed copy of ``index``'s experts into ``folder`` (default: the model's);
    return the manifest's path. ``progress(done, total)`` after each layer, in bytes.

    The data file is written under a temporary name and renamed, then the manifest: a pack
    cut short leaves no manifest, and is not used; an earlier pack stays as it was until the
    new data file is complete, then is replaced."""
    folder = Path(folder if folder is not None else index.index.model_dir)
    layout = _layout(index)
    total = sum(l["stride"] * l["experts"] for l in layout.values())
    manifest, data = folder / MANIFEST_FILE, folder / DATA_FILE
    partial = folder / (DATA_FILE + ".partial")
    try:
        free = shutil.disk_usage(folder).free
        if free < total:  # said before hours of copying, not after
            raise OSError(errno.ENOSPC, f"{total / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free")
        done = 0
        with FileHandles(identities=index.index.identities) as handles, open(partial, "wb") as out:
            for layer, spec in layout.items():
                buf = aligned_empty(spec["stride"])
                for expert in range(spec["experts"]):
                    buf[:] = 0
                    read_ranges(index.stacked_ranges(int(layer), expert), buf, handles=handles,
                                what=f"expert ({layer}, {expert})")
                    out.write(buf)
                done += spec["stride"] * spec["experts"]
                if progress is not None:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        manifest.unlink(missing_ok=True)  # an earlier pack stays whole until this one is
        os.replace(partial, data)
        record = {"format": FORMAT, "data": DATA_FILE, "nbytes": total,
                  "sources": _sources(index), "layers": layout}
        tmp = folder / (MANIFEST_FILE + ".partial")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, manifest)
    except ReadError:  # the checkpoint's side: the error names the shard and tensor
        partial.unlink(missing_ok=True)
        raise
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write the packed experts in {folder}: {e.strerror or e}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return manifest


@dataclass(frozen=True)
class PackedExperts:
    """A pack found valid for an index: where each expert's packed buffer lies.

    Args:
        path: the data file.
        identity: the data file as checked (pinned: a file replaced or rewritten under a
            running model fails its next read, never feeds it other bytes).
        layers: ``{layer: (offset, stride, expert_nbytes)}``.
    """

    path: str
    identity: FileIdentity
    layers: Dict[int, tuple]

    def ranges(self, layer: int, expert: int) -> List[ByteRange]:
        offset, stride, nbytes = self.layers[layer]
        return [ByteRange(self.path, offset + expert * stride, nbytes, 0, f"packed expert ({layer}, {expert})")]


def open_packed(index: ExpertIndex, folder: Optional[os.PathLike] = None) -> Optional[PackedExperts]:
    """The pack in ``folder`` (default: the model's) checked against ``index``; None when
    there is none. CheckpointError, naming the file and what differs, when it is damaged or
    no longer matches the checkpoint (rerun ``golem-pack``, or remove both files)."""
    folder = Path(folder if folder is not None else index.index.model_dir)
    manifest = folder / MANIFEST_FILE
    if not manifest.exists():
        return None
    fix = f"run golem-pack --model {index.index.model_dir} again, or remove {MANIFEST_FILE} and {DATA_FILE}"
    try:
        record = json.loads(manifest.read_text())
        fmt, layers, sources, nbytes = record["format"], record["layers"], record["sources"], int(record["nbytes"])
        data = folder / record["data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest}: not a readable pack manifest ({e}); {fix}") from None
    if not isinstance(layers, dict) or not isinstance(sources, dict):
        raise CheckpointError(f"{manifest}: not a pack manifest (layers, sources); {fix}")
    if fmt != FORMAT:
        raise CheckpointError(f"{manifest}: format {fmt!r}, this golem reads {FORMAT!r}; {fix}")
    if data.parent != folder or data.name != DATA_FILE:
        raise CheckpointError(f"{manifest}: data file {record['data']!r} is not {DATA_FILE} in its folder; {fix}")
    for name, cur in _sources(index).items():  # a pipeline rank's index holds some layers only
        was = sources.get(name)
        if was is None:
            raise CheckpointError(f"{manifest}: shard {name!r} holds expert tensors but was not packed; {fix}")
        if cur != was:
            what = "size" if not isinstance(was, dict) or cur["size"] != was.get("size") else "modification time"
            raise CheckpointError(f"{folder / name}: changed since its experts were packed ({what}); {fix}")
    found = {}
    for layer, spec in _layout(index).items():
        packed = layers.get(layer)
        if not isinstance(packed, dict) or any(packed.get(k) != v for k, v in spec.items() if k != "offset"):
            raise CheckpointError(f"{manifest}: layer {layer}'s experts are packed in another layout than the "
                                  f"checkpoint's, or not at all; {fix}")
        offset = packed.get("offset")
        if not isinstance(offset, int) or offset < 0 or offset % ALIGN or offset + spec["stride"] * spec["experts"] > nbytes:
            raise CheckpointError(f"{manifest}: layer {layer}'s place in {DATA_FILE} ({offset!r}) is not inside it; {fix}")
        found[int(layer)] = (offset, spec["stride"], spec["expert_nbytes"])
    try:
        identity = FileIdentity.of(os.stat(data))
    except OSError as e:
        raise CheckpointError(f"{data}: cannot read the packed experts ({e.strerror or e}); {fix}") from None
    if identity.size != nbytes:
        raise CheckpointError(f"{data}: {identity.size} bytes, the manifest says {nbytes} (truncated?); {fix}")
    return PackedExperts(str(data.resolve()), identity, found)
