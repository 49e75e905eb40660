"""Capture routing and residual streams from a stock mlx-lm model while it generates.

Owns recording, per token and MoE layer, the true routing (ids, weights) and optionally the
post-attention residual (trace array ``hidden``) and the layer input (``hidden_layer_input``),
by wrapping the layers' norms while attached. Knows nothing of offloading or predictors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from golem.predictors.routers import MoEBlock, find_moe_blocks, model_type_of

from golem.runtime.trace import Trace, save_trace

#: Name of the extra npz array holding the residual entering each MoE decoder layer.
LAYER_INPUT_ARRAY = "hidden_layer_input"


class _Tap(nn.Module):
    """Stands where a norm stood: hands its input (and output) to a callback, then returns
    the norm's output unchanged."""

    def __init__(self, inner: nn.Module, callback):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_callback", callback)  # not part of the module tree

    def __call__(self, x: mx.array) -> mx.array:
        y = self.inner(x)
        self._callback(x, y)
        return y


@dataclass
class _Forward:
    """What one model call recorded, still lazy until flushed."""

    arrays: Dict[Tuple[int, str], mx.array] = field(default_factory=dict)
    tokens: int = 0


class RoutingCapture:
    """Records routing (and residual streams) per token of a loaded mlx-lm MoE model.

    Use as a context manager around generation (``mlx_lm.generate``, ``stream_generate`` or
    plain model calls, batch size 1); then ``trace()``. A model call with several tokens is
    prefill (rows marked ``prefill``), and the first such call after decode steps starts a
    new sequence; ``begin_sequence()`` starts one explicitly. Recording adds one
    ``mx.async_eval`` per model call, on arrays of the call before; no blocking read-back
    until ``trace()``, except for calls two behind (already finished).

    Args:
        model: a loaded mlx-lm MoE model (stock modules).
        hidden: record both residual streams too (float32, (N, L, D) each).
        meta: extra meta entries for the trace (model path, prompt set, ...).
    """

    def __init__(self, model: nn.Module, *, hidden: bool = True, meta: Optional[dict] = None):
        self.model = model
        self.blocks: List[MoEBlock] = find_moe_blocks(model)
        self.record_hidden = hidden
        self.meta = dict(meta or {})
        self._attached: List[Tuple[nn.Module, str, nn.Module]] = []
        self._current: Optional[_Forward] = None
        self._queued: List[_Forward] = []
        self._rows: Dict[str, List[np.ndarray]] = {"experts": [], "weights": [], "post_attn": [], "layer_input": []}
        self._prefill: List[np.ndarray] = []
        self._seq_starts: List[int] = []
        self._num_rows = 0
        self._last_was_prefill = False
        self._want_new_sequence = True

    # -- attaching
    def attach(self) -> "RoutingCapture":
        if self._attached:
            return self
        for b in self.blocks:
            for kind in ("layer_input", "post_attn"):
                attr = b.norm_attr(kind)
                norm = getattr(b.layer, attr)
                setattr(b.layer, attr, _Tap(norm, self._callback(b, kind)))
                self._attached.append((b.layer, attr, norm))
        return self

    def detach(self) -> None:
        for layer, attr, norm in reversed(self._attached):
            setattr(layer, attr, norm)
        self._attached.clear()

    def __enter__(self) -> "RoutingCapture":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def begin_sequence(self) -> None:
        """The next model call starts a new sequence (prompt)."""
        self._want_new_sequence = True

    # -- recording
    def _callback(self, block: MoEBlock, kind: str):
        first = block.position == 0

        def record(x: mx.array, y: mx.array) -> None:
            if x.ndim != 3 or x.shape[0] != 1:
                raise ValueError(f"routing capture records batch size 1, got input of shape {x.shape}")
            if kind == "layer_input":
                if first:
                    self._start_forward(x.shape[1])
                if self.record_hidden and self._current is not None:
                    self._current.arrays[(block.position, "layer_input")] = x[0]
                return
            if self._current is None:
                return  # attached mid-forward
            inds, scores = block.route(y)
            fwd = self._current.arrays
            fwd[(block.position, "inds")] = inds.reshape(-1, inds.shape[-1])
            fwd[(block.position, "scores")] = scores.reshape(-1, scores.shape[-1]).astype(mx.float32)
            if self.record_hidden:
                fwd[(block.position, "post_attn")] = x[0]

        return record

    def _start_forward(self, tokens: int) -> None:
        if self._current is not None and self._current.arrays:
            mx.async_eval(list(self._current.arrays.values()))
            self._queued.append(self._current)
        while len(self._queued) > 1:  # two calls back: long finished
            self._flush(self._queued.pop(0))
        prefill = tokens > 1
        if self._want_new_sequence or (prefill and not self._last_was_prefill):
            self._seq_starts.append(self._num_rows + sum(f.tokens for f in self._queued))
            self._want_new_sequence = False
        self._last_was_prefill = prefill
        self._current = _Forward(tokens=tokens)

    def _flush(self, fwd: _Forward) -> None:
        L, T = len(self.blocks), fwd.tokens
        k = self.blocks[0].top_k
        experts = np.full((T, L, k), -1, np.int16)
        weights = np.zeros((T, L, k), np.float32)
        hidden = {kind: None for kind in ("post_attn", "layer_input")}
        for (position, what), arr in fwd.arrays.items():
            a = np.array(arr)
            if what == "inds":
                experts[:, position] = a
            elif what == "scores":
                weights[:, position] = a
            else:
                if hidden[what] is None:
                    hidden[what] = np.zeros((T, L, a.shape[-1]), np.float32)
                hidden[what][:, position] = a
        self._rows["experts"].append(experts)
        self._rows["weights"].append(weights)
        for kind, h in hidden.items():
            if self.record_hidden:
                self._rows[kind].append(h)
        self._prefill.append(np.full(T, T > 1))
        self._num_rows += T

    def flush(self) -> None:
        """Finish recording the calls made so far (blocks until they are evaluated)."""
        if self._current is not None and self._current.arrays:
            self._queued.append(self._current)
        self._current = None
        for fwd in self._queued:
            self._flush(fwd)
        self._queued.clear()

    # -- results
    def expert_nbytes(self) -> int:
        """Bytes of one expert of the first MoE layer, as stored in memory."""
        b = self.blocks[0]
        params = tree_flatten(getattr(b.block, b.experts_attr).parameters())
        return int(sum(v.nbytes for _, v in params) // b.num_experts)

    def trace(self, *, include_prefill: bool = False) -> Tuple[Trace, Dict[str, np.ndarray]]:
        """``(trace, extras)``: the recorded golem-trace/1 and the extra arrays
        (``hidden_layer_input`` when hidden states were recorded)."""
        self.flush()
        if not self._num_rows:
            raise ValueError("routing capture recorded nothing: run the model while it is attached")
        experts = np.concatenate(self._rows["experts"])
        weights = np.concatenate(self._rows["weights"])
        prefill = np.concatenate(self._prefill)
        starts = sorted(set(self._seq_starts)) or [0]
        offsets = np.array([s for s in starts if s < self._num_rows] + [self._num_rows], np.int64)
        b = self.blocks[0]
        meta = {
            "num_layers": len(self.blocks),
            "num_experts": b.num_experts,
            "top_k": b.top_k,
            "expert_bytes": self.expert_nbytes(),
            "moe_layers": [blk.model_layer for blk in self.blocks],
            "model_type": model_type_of(self.model),
            "phase": "decode" if not include_prefill else "prefill+decode",
            **self.meta,
        }
        extras: Dict[str, np.ndarray] = {}
        hidden = None
        if self.record_hidden and all(h is not None for h in self._rows["post_attn"]):
            hidden = np.concatenate(self._rows["post_attn"])
            extras[LAYER_INPUT_ARRAY] = np.concatenate(self._rows["layer_input"])
            meta["hidden_kind"] = "post_attn"
            meta["hidden_kinds"] = {"hidden": "post_attn", LAYER_INPUT_ARRAY: "layer_input"}
        trace = Trace(experts, weights, offsets, meta, hidden=hidden, prefill=prefill if prefill.any() else None)
        if include_prefill or trace.prefill is None:
            return trace, extras
        keep = ~trace.prefill
        return trace.decode_only(), {name: arr[keep] for name, arr in extras.items()}


def record_generation(
    model: nn.Module,
    tokenizer: Any,
    prompts: Iterable[str],
    *,
    max_tokens: int = 64,
    hidden: bool = True,
    chat_template: bool = False,
    meta: Optional[dict] = None,
) -> Tuple[Trace, Dict[str, np.ndarray]]:
    """Greedy-generate each prompt with stock ``mlx_lm.stream_generate`` and capture it.

    Returns the decode steps only (prefill dropped), one sequence per prompt.
    """
    from mlx_lm.generate import stream_generate

    capture = RoutingCapture(model, hidden=hidden, meta=meta)
    with capture:
        for prompt in prompts:
            text = prompt
            if chat_template and getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
            capture.begin_sequence()
            for _ in stream_generate(model, tokenizer, text, max_tokens=max_tokens):
                pass
    return capture.trace(include_prefill=False)


def save_capture(path: str | Path, trace: Trace, extras: Optional[Dict[str, np.ndarray]] = None) -> None:
    """Write ``trace`` as golem-trace/1 plus the ``extras`` arrays in the same ``.npz``
    (one atomic write, ``golem.io.outputs``)."""
    save_trace(path, trace, extras=extras)


def load_extras(path: str | Path, names: Sequence[str] = (LAYER_INPUT_ARRAY,)) -> Dict[str, np.ndarray]:
    """The extra arrays among ``names`` that a trace file holds (missing ones left out)."""
    with np.load(Path(path), allow_pickle=False) as z:
        return {name: z[name] for name in names if name in z.files}
