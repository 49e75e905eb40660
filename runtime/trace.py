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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

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
        meta: at least ``num_layers``, ``num_experts``, ``top_k``, ``expert_bytes``.
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
        return Trace(
            experts=self.experts[keep],
            weights=self.weights[keep],
            seq_offsets=new_index[self.seq_offsets],
            meta=dict(self.meta),
            token_ids=None if self.token_ids is None else self.token_ids[keep],
            hidden=None if self.hidden is None else self.hidden[keep],
            prefill=None,
            hidden_layer_input=None if self.hidden_layer_input is None else self.hidden_layer_input[keep],
            path=self.path,
        )

    def validate(self) -> None:
        where = self.path or "trace"
        if self.experts.ndim != 3:
            raise TraceError(f"{where}: 'experts' must be (N, L, K), got shape {self.experts.shape}")
        n, l, k = self.experts.shape
        if self.weights.shape != self.experts.shape:
            raise TraceError(f"{where}: 'weights' shape {self.weights.shape} != 'experts' shape {self.experts.shape}")
        for key in ("num_layers", "num_experts", "top_k"):
            if key not in self.meta:
                raise TraceError(f"{where}: meta lacks '{key}'")
        if l != self.num_layers:
            raise TraceError(f"{where}: meta num_layers={self.num_layers} but 'experts' has {l} layers")
        so = self.seq_offsets
        if so.ndim != 1 or len(so) < 1 or so[0] != 0 or so[-1] != n or np.any(np.diff(so) < 0):
            raise TraceError(f"{where}: 'seq_offsets' must rise from 0 to N={n}")
        if n and (self.experts.max() >= self.num_experts or self.experts.min() < -1):
            raise TraceError(f"{where}: expert ids outside [-1, {self.num_experts})")
        for name in ("token_ids", "prefill"):
            arr = getattr(self, name)
            if arr is not None and arr.shape[0] != n:
                raise TraceError(f"{where}: '{name}' has {arr.shape[0]} steps, expected {n}")
        for name in ("hidden", "hidden_layer_input"):
            arr = getattr(self, name)
            if arr is not None and arr.shape[:2] != (n, l):
                raise TraceError(f"{where}: '{name}' shape {arr.shape} does not start with ({n}, {l})")


def load_trace(path: str | Path) -> Trace:
    """Read and validate one golem-trace/1 file."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            missing = {"experts", "weights", "seq_offsets", "meta"} - files
            if missing:
                raise TraceError(f"{path}: not a golem-trace/1 file, missing {sorted(missing)}")
            meta = json.loads(str(z["meta"]))
            trace = Trace(
                experts=z["experts"].astype(np.int16, copy=False),
                weights=z["weights"].astype(np.float32, copy=False),
                seq_offsets=z["seq_offsets"].astype(np.int64, copy=False),
                meta=meta,
                token_ids=z["token_ids"] if "token_ids" in files else None,
                hidden=z["hidden"] if "hidden" in files else None,
                prefill=z["prefill"].astype(bool) if "prefill" in files else None,
                hidden_layer_input=z["hidden_layer_input"] if "hidden_layer_input" in files else None,
                path=str(path),
            )
    except TraceError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise TraceError(f"{path}: cannot read trace: {e}") from e
    if meta.get("format", FORMAT) != FORMAT:
        raise TraceError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    trace.validate()
    return trace


def load_traces(paths: Sequence[str | Path]) -> list[Trace]:
    """Load several traces; a folder stands for every ``*.npz`` inside it, sorted."""
    out: list[Trace] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(p.glob("*.npz"))
            if not files:
                raise TraceError(f"{p}: folder holds no .npz traces")
            out.extend(load_trace(f) for f in files)
        else:
            out.append(load_trace(p))
    return out


def save_trace(path: str | Path, trace: Trace) -> None:
    """Write ``trace`` as golem-trace/1 (validated first)."""
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
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
