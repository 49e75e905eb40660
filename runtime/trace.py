"""The golem-trace/1 file format: routing of decode (and prefill) steps per MoE layer.

Owns reading, validating and writing trace files; knows nothing of caches or predictors.
An ``.npz`` with ``experts`` int16 (N, L, K) (-1 = absent), ``weights`` float32 (N, L, K),
``seq_offsets`` int64 (S+1,), optional ``token_ids`` int32 (N,), optional ``hidden``
float (N, L, D) (each MoE layer's post-attention residual, meta ``hidden_kind: post_attn``),
optional ``hidden_layer_input`` (N, L, D) (the residual entering each MoE decoder layer),
optional ``prefill`` bool (N,) marking prompt steps, and ``meta`` (JSON).
"""

from __future__ import annotations

import json
import os
from numbers import Integral
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from golem.io.outputs import write_output

FORMAT = "golem-trace/1"


class TraceError(ValueError):
    """A trace file that is missing, malformed or not golem-trace/1."""


@dataclass
class Trace:
    """Routing of N steps over L MoE layers with top-K experts each.

    Args:
        experts: int16 (N, L, K), expert ids, -1 where absent.
        weights: float32 (N, L, K), router scores of those experts.
        seq_offsets: int64 (S+1,), the step where each sequence starts; last = N.
        meta: at least ``num_layers``, ``num_experts``, ``top_k``, ``expert_bytes``; optional
            ``moe_layers``, the model's layer number of each traced layer.
        token_ids: optional int32 (N,).
        hidden: optional (N, L, D) post-attention residual of each MoE layer.
        prefill: optional bool (N,), True for prompt-processing steps.
        hidden_layer_input: optional (N, L, D) residual entering each MoE decoder layer.
    """

    experts: np.ndarray
    weights: np.ndarray
    seq_offsets: np.ndarray
    meta: dict
    token_ids: Optional[np.ndarray] = None
    hidden: Optional[np.ndarray] = None
    prefill: Optional[np.ndarray] = None
    hidden_layer_input: Optional[np.ndarray] = None
    path: Optional[str] = field(default=None, compare=False)

    @property
    def num_steps(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def layer_numbers(self) -> list[int]:
        """The checkpoint's decoder layer number of each traced MoE layer (meta ``moe_layers``;
        0..L-1 for traces that do not record them). Every report names layers by these, as
        golem-run's table and ``-f/--pin-layers`` do."""
        ids = self.meta.get("moe_layers")
        return [int(i) for i in ids] if ids is not None else list(range(self.num_layers))

    @property
    def expert_bytes(self) -> int:
        return int(self.meta.get("expert_bytes", 0))

    @property
    def num_sequences(self) -> int:
        return len(self.seq_offsets) - 1

    def sequences(self) -> Iterator[tuple[int, int]]:
        """Yield ``(start, stop)`` step ranges, one per sequence."""
        for s in range(self.num_sequences):
            yield int(self.seq_offsets[s]), int(self.seq_offsets[s + 1])

    def decode_only(self) -> "Trace":
        """The trace without its prefill steps (sequence boundaries kept)."""
        if self.prefill is None or not self.prefill.any():
            return self
        keep = ~self.prefill
        new_index = np.cumsum(np.concatenate([[0], keep.astype(np.int64)]))
        unread = self.weights.ndim and not any(self.weights.strides)  # ``unread_weights``
        return Trace(
            experts=self.experts[keep],
            weights=unread_weights((int(keep.sum()), *self.weights.shape[1:])) if unread else self.weights[keep],
            seq_offsets=new_index[self.seq_offsets],
            meta=dict(self.meta),
            token_ids=None if self.token_ids is None else self.token_ids[keep],
            hidden=None if self.hidden is None else self.hidden[keep],
            prefill=None,
            hidden_layer_input=None if self.hidden_layer_input is None else self.hidden_layer_input[keep],
            path=self.path,
        )

    def validate(self) -> None:
        """Check meta, shapes, dtypes and ranges; ``TraceError`` names the file and the array."""
        where = self.path or "trace"
        check_meta(self.meta, where)
        if self.experts.ndim != 3:
            raise TraceError(f"{where}: 'experts' must be (N, L, K), got shape {self.experts.shape}")
        n, l, k = self.experts.shape
        if k < 1:
            raise TraceError(f"{where}: 'experts' has no expert columns (K = 0)")
        if self.weights.shape != self.experts.shape:
            raise TraceError(f"{where}: 'weights' shape {self.weights.shape} != 'experts' shape {self.experts.shape}")
        if l != self.num_layers:
            raise TraceError(f"{where}: meta num_layers={self.num_layers} but 'experts' has {l} layers")
        _check_kind(self.experts, "experts", "iu", where)
        _check_kind(self.weights, "weights", "fiu", where)
        _check_kind(self.seq_offsets, "seq_offsets", "iu", where)
        so = self.seq_offsets
        if so.ndim != 1 or len(so) < 1 or so[0] != 0 or so[-1] != n or np.any(np.diff(so) < 0):
            raise TraceError(f"{where}: 'seq_offsets' must rise from 0 to N={n}")
        if n and (self.experts.max() >= self.num_experts or self.experts.min() < -1):
            raise TraceError(
                f"{where}: 'experts' holds ids outside [-1, {self.num_experts}) "
                f"(min {int(self.experts.min())}, max {int(self.experts.max())})"
            )
        if n and not np.isfinite(self.weights).all():
            raise TraceError(f"{where}: 'weights' holds NaN or infinite values")
        if k < self.top_k:
            raise TraceError(f"{where}: meta top_k={self.top_k} but 'experts' holds only {k} experts per step")
        _check_steps(self.experts, self.weights, self.top_k, where)
        for name, kinds in (("token_ids", "iu"), ("prefill", "biu")):
            arr = getattr(self, name)
            if arr is None:
                continue
            _check_kind(arr, name, kinds, where)
            if arr.ndim != 1 or arr.shape[0] != n:
                raise TraceError(f"{where}: '{name}' has shape {arr.shape}, expected ({n},)")
        for name in ("hidden", "hidden_layer_input"):
            arr = getattr(self, name)
            if arr is None:
                continue
            _check_kind(arr, name, "f", where)
            if arr.ndim != 3 or arr.shape[:2] != (n, l):
                raise TraceError(f"{where}: '{name}' shape {arr.shape} is not ({n}, {l}, D)")


MAX_EXPERTS = int(np.iinfo(np.int16).max)  # expert ids are stored as int16
_CHECK_STEPS = 1 << 16  # steps checked at once: bounded scratch memory on long traces


def _check_steps(experts: np.ndarray, weights: np.ndarray, top_k: int, where: str) -> None:
    """Per step and layer: no expert twice, at most ``top_k`` experts, no negative weight
    on an expert present (router scores are probabilities). In blocks of steps, so the
    scratch arrays stay small on a million-step trace."""
    for start in range(0, experts.shape[0], _CHECK_STEPS):
        ids = experts[start:start + _CHECK_STEPS]
        present = ids >= 0
        w = weights[start:start + _CHECK_STEPS]
        bad = present & (w < 0)
        if bad.any():
            t, l, _ = (int(v[0]) for v in np.nonzero(bad))
            raise TraceError(f"{where}: 'weights' holds a negative router score at step {start + t}, layer {l} "
                             f"({float(w[bad][0])})")
        count = present.sum(axis=2)
        if count.max(initial=0) > top_k:
            t, l = (int(v[0]) for v in np.nonzero(count > top_k))
            raise TraceError(f"{where}: step {start + t}, layer {l} routes to {int(count[t, l])} experts, "
                             f"more than meta top_k={top_k}")
        if ids.shape[2] > 1:
            srt = np.sort(ids, axis=2)
            dup = (srt[:, :, 1:] == srt[:, :, :-1]) & (srt[:, :, 1:] >= 0)
            if dup.any():
                t, l, j = (int(v[0]) for v in np.nonzero(dup))
                raise TraceError(f"{where}: step {start + t}, layer {l} lists expert {int(srt[t, l, j + 1])} twice")


def check_meta(meta, where: str) -> None:
    """``meta`` is a JSON object whose shape fields are whole numbers in range."""
    if not isinstance(meta, dict):
        raise TraceError(f"{where}: 'meta' is not a JSON object (got {type(meta).__name__})")
    for key in ("num_layers", "num_experts", "top_k"):
        if key not in meta:
            raise TraceError(f"{where}: meta lacks '{key}'")
    limits = {"num_layers": (1, None), "num_experts": (1, MAX_EXPERTS), "top_k": (1, None), "expert_bytes": (0, None)}
    for key, (lo, hi) in limits.items():
        if key not in meta:
            continue
        value = meta[key]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
            raise TraceError(f"{where}: meta {key} must be a whole number, got {value!r}")
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"within [{lo}, {hi}]"
            raise TraceError(f"{where}: meta {key}={value} must be {bound}")
    if meta["top_k"] > meta["num_experts"]:
        raise TraceError(f"{where}: meta top_k={meta['top_k']} exceeds num_experts={meta['num_experts']}")
    ids = meta.get("moe_layers")
    if ids is not None:
        ok = isinstance(ids, list) and all(isinstance(i, Integral) and not isinstance(i, bool) and i >= 0 for i in ids)
        if not ok or len(ids) != meta["num_layers"] or any(b <= a for a, b in zip(ids, ids[1:])):
            raise TraceError(f"{where}: meta moe_layers must list {meta['num_layers']} rising layer numbers, "
                             f"got {str(ids)[:80]}")


def _check_kind(arr: np.ndarray, name: str, kinds: str, where: str) -> None:
    names = {"i": "integers", "u": "integers", "f": "floats", "b": "booleans"}
    if arr.dtype.kind not in kinds:
        want = " or ".join(dict.fromkeys(names[k] for k in kinds))
        raise TraceError(f"{where}: '{name}' must hold {want}, got dtype {arr.dtype}")


# Limits checked from the archive's directory and each array's .npy header, before any
# array is read: what each member declares it expands to, against a cap and against its
# compressed size (a zip bomb), and the arrays' shapes against each other and the meta.
MAX_TRACE_NBYTES = int(os.environ.get("GOLEM_TRACE_MAX_BYTES", 16 << 30))  # all arrays, expanded
MAX_TRACE_CELLS = 1 << 32  # steps x layers x K of 'experts'
# Routing ids and router scores compress 1-5x; a large member expanding 100x or more holds
# no routing (zeros, a zip bomb). Small members (seq_offsets, a prefill mask) may.
MAX_EXPANSION = 100
EXPANSION_FLOOR_NBYTES = 16 << 20


def _available_nbytes() -> int:
    """Memory the system can still give (MemAvailable), or all of it where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return MAX_TRACE_NBYTES
MAX_META_NBYTES = 1 << 20

_NPZ_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_ARRAYS = ("experts", "weights", "seq_offsets", "token_ids", "hidden", "prefill", "hidden_layer_input")
_HIDDEN = frozenset({"hidden", "hidden_layer_input"})  # the large arrays only predictors read


def _read_arrays(path: Path, skip: Optional[frozenset] = None) -> tuple[dict, dict]:
    """The arrays of an .npz, uncast, and its meta, with numpy's and zipfile's errors
    rephrased as ``TraceError`` naming the file and the array."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise TraceError(f"{path}: cannot read trace: {e.strerror or e}") from None
    if not head:
        raise TraceError(f"{path}: empty file, not a golem-trace/1 .npz")
    if head.startswith(_NPY_MAGIC):
        raise TraceError(f"{path}: a single .npy array, not a golem-trace/1 .npz")
    if not head.startswith(_NPZ_MAGIC):
        raise TraceError(f"{path}: not a golem-trace/1 .npz (not a zip archive; golem-run --trace-out FILE writes one)")
    headers = _check_archive(path)
    arrays: dict = {}
    name = None
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            missing = {"experts", "weights", "seq_offsets", "meta"} - files
            if missing:
                raise TraceError(f"{path}: not a golem-trace/1 file, missing {sorted(missing)}")
            name = "meta"
            meta = _parse_meta(path, z["meta"])
            check_meta(meta, str(path))
            _check_shapes(path, headers, meta)  # before any array is read
            for name in _ARRAYS:
                if name in files and (skip is None or name not in skip):
                    arrays[name] = z[name]
    except TraceError:
        raise
    except ValueError as e:
        if "pickle" in str(e):
            raise TraceError(f"{path}: array {name!r} holds Python objects, which a trace never does") from None
        raise TraceError(f"{path}: cannot read {'array ' + repr(name) if name else 'trace'}: {e}") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        what = f"array {name!r}" if name else "the archive"
        raise TraceError(f"{path}: truncated or damaged .npz, cannot read {what} ({type(e).__name__}: {e})") from None
    return arrays, meta


def _parse_meta(path: Path, raw_meta: np.ndarray) -> dict:
    if raw_meta.dtype.kind not in "US" or raw_meta.ndim != 0:
        raise TraceError(f"{path}: 'meta' must be one JSON string, got dtype {raw_meta.dtype} shape {raw_meta.shape}")
    try:
        return json.loads(str(raw_meta))
    except json.JSONDecodeError as e:
        raise TraceError(f"{path}: 'meta' is not valid JSON ({e})") from None
    except RecursionError:
        raise TraceError(f"{path}: 'meta' is not valid JSON (nested too deeply)") from None


def _check_archive(path: Path) -> dict:
    """Before any array is read: each member's declared size against the caps and its
    compressed size, and its .npy header (dtype, shape) against that size. Returns
    ``{array name: (shape, dtype)}``."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            total = 0
            cap = min(MAX_TRACE_NBYTES, _available_nbytes() // 2)
            for info in infos:
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                total += info.file_size
                if total > cap:
                    raise TraceError(f"{path}: its arrays expand to more than {cap / 2**30:.1f} GiB, over half "
                                     f"the memory available (or GOLEM_TRACE_MAX_BYTES); give a shorter trace")
                if (info.file_size > EXPANSION_FLOOR_NBYTES
                        and info.file_size > MAX_EXPANSION * max(info.compress_size, 1)):
                    raise TraceError(f"{path}: array {name!r} expands {info.compress_size} compressed bytes to "
                                     f"{info.file_size}, more than routing data ever compresses "
                                     "(a damaged or hostile archive)")
                if name == "meta" and info.file_size > MAX_META_NBYTES:
                    raise TraceError(f"{path}: 'meta' is {info.file_size} bytes, more than {MAX_META_NBYTES}")
            headers = {}
            for info in infos:
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if name not in _ARRAYS:
                    continue
                with zf.open(info) as f:
                    try:
                        major, _ = np.lib.format.read_magic(f)
                        read_header = (np.lib.format.read_array_header_1_0 if major == 1
                                       else np.lib.format.read_array_header_2_0)
                        shape, _, dtype = read_header(f, max_header_size=10000)
                    except (ValueError, SyntaxError, EOFError) as e:
                        raise TraceError(f"{path}: array {name!r} has a damaged .npy header ({e})") from None
                    header_nbytes = f.tell()
                if dtype.hasobject:
                    raise TraceError(f"{path}: array {name!r} holds Python objects, which a trace never does")
                if any(d < 0 for d in shape):
                    raise TraceError(f"{path}: array {name!r} has a negative dimension {shape}")
                data = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if header_nbytes + data != info.file_size:
                    raise TraceError(f"{path}: array {name!r} declares {shape} {dtype} ({data} bytes) but its "
                                     f"member holds {info.file_size - header_nbytes} (damaged archive)")
                headers[name] = (tuple(shape), dtype)
            return headers
    except TraceError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as e:
        raise TraceError(f"{path}: truncated or damaged .npz ({type(e).__name__}: {e})") from None


def _check_shapes(path: Path, headers: dict, meta: dict) -> None:
    """The arrays' declared shapes against each other and the meta, before reading them."""
    shape = headers.get("experts", ((),))[0]
    if len(shape) != 3:
        raise TraceError(f"{path}: 'experts' must be (N, L, K), got shape {shape}")
    n, l, k = shape
    if n * l * k > MAX_TRACE_CELLS:
        raise TraceError(f"{path}: {n} steps x {l} layers x {k} experts is more than {MAX_TRACE_CELLS} entries")
    if l != meta["num_layers"]:
        raise TraceError(f"{path}: meta num_layers={meta['num_layers']} but 'experts' has {l} layers")
    if k < meta["top_k"]:
        raise TraceError(f"{path}: meta top_k={meta['top_k']} but 'experts' holds only {k} experts per step")
    if "weights" in headers and headers["weights"][0] != shape:
        raise TraceError(f"{path}: 'weights' shape {headers['weights'][0]} != 'experts' shape {shape}")
    so = headers.get("seq_offsets", ((),))[0]
    if len(so) != 1 or not 1 <= so[0] <= n + 1:
        raise TraceError(f"{path}: 'seq_offsets' has shape {so}, expected (S+1,) with S <= {n} sequences")
    for name in ("token_ids", "prefill"):
        if name in headers and headers[name][0] != (n,):
            raise TraceError(f"{path}: '{name}' has shape {headers[name][0]}, expected ({n},)")
    for name in ("hidden", "hidden_layer_input"):
        if name in headers:
            hs = headers[name][0]
            if len(hs) != 3 or hs[:2] != (n, l):
                raise TraceError(f"{path}: '{name}' shape {hs} is not ({n}, {l}, D)")


def _scan_weights(path: Path, experts: np.ndarray) -> None:
    """Check the stored ``weights`` (finite, no negative score on an expert present) a block
    of steps at a time, straight from the archive, keeping none of it: for replays, which
    never read the scores, of traces whose weights would double their memory."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("weights.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f, max_header_size=10000)
            if fortran or dtype.kind not in "fiu" or tuple(shape) != experts.shape:
                raise TraceError(f"{path}: 'weights' must be floats shaped like 'experts' {experts.shape}, "
                                 f"got {dtype} {tuple(shape)}{' (Fortran order)' if fortran else ''}")
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            block = max(1, _CHECK_STEPS)
            for start in range(0, shape[0], block):
                steps = min(block, shape[0] - start)
                data = f.read(steps * row)
                if len(data) != steps * row:
                    raise TraceError(f"{path}: 'weights' is cut short (truncated archive)")
                w = np.frombuffer(data, dtype=dtype).reshape((steps, *shape[1:]))
                present = experts[start:start + steps] >= 0
                if not np.isfinite(w).all():
                    raise TraceError(f"{path}: 'weights' holds NaN or infinite values")
                bad = present & (w < 0)
                if bad.any():
                    t, l, _ = (int(v[0]) for v in np.nonzero(bad))
                    raise TraceError(f"{path}: 'weights' holds a negative router score at step {start + t}, "
                                     f"layer {l} ({float(w[bad][0])})")
    except TraceError:
        raise
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise TraceError(f"{path}: truncated or damaged .npz, cannot read array 'weights' "
                         f"({type(e).__name__}: {e})") from None


def unread_weights(shape) -> np.ndarray:
    """What a trace loaded with ``weights=False`` holds for its scores: ones, zero strides
    (no memory), read-only."""
    return np.broadcast_to(np.float32(1.0), tuple(shape))


def load_trace(path: str | Path, *, hidden: bool = True, weights: bool = True) -> Trace:
    """Read and validate one golem-trace/1 file.

    Raises ``TraceError`` naming the file (and the array) for anything that is not a valid
    trace: a missing, empty, truncated or non-npz file, a ``meta`` that is not a JSON object
    with whole-number shape fields, arrays of the wrong dtype or shape, expert ids outside
    [-1, num_experts) (checked before they are narrowed to int16), NaN weights.

    ``hidden=False`` leaves the hidden states unread; ``weights=False`` checks the router
    scores a block at a time and keeps ones in their place (``unread_weights``): replays
    (simulate, stats, plans) read only the expert ids.
    """
    path = Path(path)
    if path.is_dir():
        raise TraceError(f"{path}: is a folder, not a trace file")
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file (golem-run --trace-out FILE records one)")
    skip = (frozenset() if hidden else _HIDDEN) | (frozenset() if weights else {"weights"})
    arrays, meta = _read_arrays(path, skip or None)
    if not weights:
        _check_kind(arrays["experts"], "experts", "iu", str(path))
        _scan_weights(path, arrays["experts"])
        arrays["weights"] = unread_weights(arrays["experts"].shape)
    if meta.get("format", FORMAT) != FORMAT:
        raise TraceError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    raw = Trace(
        experts=arrays["experts"],
        weights=arrays["weights"],
        seq_offsets=arrays["seq_offsets"],
        meta=meta,
        token_ids=arrays.get("token_ids"),
        hidden=arrays.get("hidden"),
        prefill=arrays.get("prefill"),
        hidden_layer_input=arrays.get("hidden_layer_input"),
        path=str(path),
    )
    raw.validate()  # on the stored dtypes: an int64 id 65541 is refused, not wrapped to 5
    return Trace(
        experts=raw.experts.astype(np.int16, copy=False),
        weights=raw.weights.astype(np.float32, copy=False),
        seq_offsets=raw.seq_offsets.astype(np.int64, copy=False),
        meta=meta,
        token_ids=raw.token_ids,
        hidden=raw.hidden,
        prefill=None if raw.prefill is None else raw.prefill.astype(bool),
        hidden_layer_input=raw.hidden_layer_input,
        path=str(path),
    )


def load_traces(paths: Sequence[str | Path], *, hidden: bool = True, weights: bool = True) -> list[Trace]:
    """Load several traces; a folder stands for every ``*.npz`` inside it, sorted.
    ``hidden`` and ``weights`` as in ``load_trace`` (replays need only the routing)."""
    out: list[Trace] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(p.glob("*.npz"))
            if not files:
                raise TraceError(f"{p}: folder holds no .npz traces")
            out.extend(load_trace(f, hidden=hidden, weights=weights) for f in files)
        else:
            out.append(load_trace(p, hidden=hidden, weights=weights))
    return out


def require_steps(traces: Sequence[Trace], *, decode_only: bool = True) -> int:
    """The decode (or all) steps of ``traces``; a ``TraceError`` naming them when there are none."""
    steps = sum((t.decode_only() if decode_only else t).num_steps for t in traces)
    if steps == 0:
        names = ", ".join(str(t.path or "trace") for t in traces) or "no traces"
        total = sum(t.num_steps for t in traces)
        hint = f" (only {total} prefill steps)" if total else ""
        raise TraceError(f"{names}: no {'decode ' if decode_only else ''}steps to replay{hint}")
    return steps


def save_trace(path: str | Path, trace: Trace, *, what: str = "", protected: Sequence = (),
               extras: Optional[dict] = None) -> Path:
    """Write ``trace`` as golem-trace/1 (validated first), atomically (``golem.io.outputs``):
    ``what`` names the flag for errors, ``protected`` the folders never written into,
    ``extras`` more arrays for the same archive (one per step; a format array is refused)."""
    trace.validate()
    meta = dict(trace.meta)
    meta["format"] = FORMAT
    arrays = {
        "experts": trace.experts.astype(np.int16),
        "weights": trace.weights.astype(np.float32),
        "seq_offsets": trace.seq_offsets.astype(np.int64),
        "meta": np.array(json.dumps(meta)),
    }
    if trace.token_ids is not None:
        arrays["token_ids"] = trace.token_ids.astype(np.int32)
    if trace.hidden is not None:
        arrays["hidden"] = trace.hidden
    if trace.prefill is not None:
        arrays["prefill"] = trace.prefill.astype(bool)
    if trace.hidden_layer_input is not None:
        arrays["hidden_layer_input"] = trace.hidden_layer_input
    for name, arr in (extras or {}).items():
        if name in arrays:
            raise TraceError(f"{path}: extra array {name!r} would replace a golem-trace/1 array")
        if arr.shape[:1] != (trace.num_steps,):
            raise TraceError(f"{path}: extra array {name!r} has {arr.shape[:1]} steps, expected {trace.num_steps}")
        arrays[name] = arr
    return write_output(path, lambda f: np.savez_compressed(f, **arrays), what=what, protected=protected)
