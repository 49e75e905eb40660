"""Replay routing traces through per-layer expert caches: what a policy, a cache-size plan and a
warm start would have hit and missed, with the offline optimum (Belady) as the bound.

Owns the replay (the step protocol of ``golem.runtime.policies.Policy``, as the slot pool
runs it), per-sequence replays, Belady's farthest-next-use replay, and miss curves over all
slot counts (plain LRU's in one pass by stack distances). Knows nothing of bytes or MLX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from golem.runtime.memplan import lru_misses  # noqa: F401  (re-exported: LRU at every cache size)
from golem.runtime.policies import DEFAULT_POLICY, Policy, make_policy
from golem.runtime.trace import Trace

Traces = Union[Trace, Sequence[Trace]]
CacheSizes = Union[int, Sequence[int]]


@dataclass
class SimResult:
    """Counts of one replay.

    Args:
        policy: the policy spec (``"belady"`` for the bound).
        cache_sizes: slots per layer (``num_experts`` for pinned layers).
        pinned: the fully resident layers (every request a hit, no cache logic).
        requests: int64 (L,), expert requests per layer (distinct experts per step).
        hits: int64 (L,), requests found resident.
        misses: int64 (L,), demand reads: requests neither resident nor prefetched.
        prefetched: int64 (L,), misses a prefetch with the given recall would have hidden.
        step_misses: int32 (N, L), demand misses per step and layer (N = all replayed steps).
        step_prefetched: int32 (N, L), prefetched misses per step and layer.
        num_experts: experts per layer.
    """

    policy: str
    cache_sizes: tuple
    pinned: tuple
    requests: np.ndarray
    hits: np.ndarray
    misses: np.ndarray
    prefetched: np.ndarray
    step_misses: np.ndarray
    step_prefetched: np.ndarray
    num_experts: int

    @property
    def num_layers(self) -> int:
        return len(self.cache_sizes)

    @property
    def num_steps(self) -> int:
        return int(self.step_misses.shape[0])

    @property
    def total_requests(self) -> int:
        return int(self.requests.sum())

    @property
    def total_hits(self) -> int:
        return int(self.hits.sum())

    @property
    def total_misses(self) -> int:
        return int(self.misses.sum())

    @property
    def total_prefetched(self) -> int:
        return int(self.prefetched.sum())

    @property
    def miss_ratio(self) -> float:
        """Demand misses per request."""
        return self.total_misses / self.total_requests if self.total_requests else 0.0

    @property
    def hit_ratio(self) -> float:
        return self.total_hits / self.total_requests if self.total_requests else 1.0

    @property
    def misses_per_step(self) -> np.ndarray:
        """int64 (N,): demand misses of each step over all layers (reads per token)."""
        return self.step_misses.sum(axis=1, dtype=np.int64)

    @property
    def layer_miss_ratio(self) -> np.ndarray:
        return self.misses / np.maximum(self.requests, 1)

    @property
    def cache_size(self) -> Union[int, list]:
        """One number when every layer has the same slots, else the per-layer list."""
        sizes = list(self.cache_sizes)
        return sizes[0] if sizes and all(c == sizes[0] for c in sizes) else sizes

    def per_layer(self) -> list[dict]:
        return [
            {
                "layer": position,
                "capacity": int(self.cache_sizes[position]),
                "pinned": position in self.pinned,
                "requests": int(self.requests[position]),
                "hits": int(self.hits[position]),
                "misses": int(self.misses[position]),
                "prefetched": int(self.prefetched[position]),
                "miss_ratio": round(float(self.layer_miss_ratio[position]), 6),
            }
            for position in range(self.num_layers)
        ]

    def to_dict(self, per_layer: bool = False) -> dict:
        out = {
            "policy": self.policy,
            "capacity": self.cache_size,
            "pinned_layers": list(self.pinned),
            "steps": self.num_steps,
            "requests": self.total_requests,
            "hits": self.total_hits,
            "misses": self.total_misses,
            "prefetched": self.total_prefetched,
            "miss_ratio": round(self.miss_ratio, 6),
            "hit_ratio": round(self.hit_ratio, 6),
            "misses_per_step": round(self.total_misses / self.num_steps, 4) if self.num_steps else 0.0,
        }
        if per_layer:
            out["per_layer"] = self.per_layer()
        return out


# -- inputs ---------------------------------------------------------------------------------


@dataclass
class _Stream:
    """The replayed steps: (N, L, K) int16, each step's distinct experts ascending, -1 last."""

    steps: np.ndarray
    num_experts: int
    max_step: int  # most distinct experts any step of any layer uses

    @property
    def num_layers(self) -> int:
        return int(self.steps.shape[1])

    def layer_rows(self, position: int, start: int = 0, stop: Optional[int] = None) -> list:
        col = self.steps[start:stop, position, :]
        rows = col.tolist()
        if (col < 0).any():
            rows = [[e for e in r if e >= 0] for r in rows]
        return rows


class _Rows:
    """One layer's steps as lists of expert ids, made a block of steps at a time (a
    million-step layer as one list of lists would take gigabytes)."""

    def __init__(self, stream: _Stream, position: int):
        self.stream, self.position = stream, position

    def __len__(self) -> int:
        return int(self.stream.steps.shape[0])

    def __iter__(self):
        for start in range(0, len(self), _ROWS_PER_BLOCK):
            yield from self.stream.layer_rows(self.position, start, start + _ROWS_PER_BLOCK)


def as_trace_list(traces: Traces) -> list[Trace]:
    out = [traces] if isinstance(traces, Trace) else list(traces)
    if not out:
        raise ValueError("no traces to replay")
    first = out[0]
    for t in out[1:]:
        if (t.num_layers, t.num_experts) != (first.num_layers, first.num_experts):
            raise ValueError(
                f"{t.path or 'trace'}: {t.num_layers} layers x {t.num_experts} experts, but "
                f"{first.path or 'the first trace'} has {first.num_layers} x {first.num_experts}"
            )
    return out


def _stream(traces: Traces, decode_only: bool) -> _Stream:
    trace_list = as_trace_list(traces)
    parts = [(t.decode_only() if decode_only else t).experts for t in trace_list]
    experts = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    steps = np.sort(experts.astype(np.int16), axis=2)
    if steps.shape[2] > 1:
        dup = np.zeros(steps.shape, dtype=bool)
        dup[:, :, 1:] = steps[:, :, 1:] == steps[:, :, :-1]
        if dup.any() or (steps < 0).any():
            steps = np.where(dup, -1, steps)
            # ascending with the -1 padding last
            steps = np.sort(np.where(steps < 0, np.iinfo(np.int16).max, steps), axis=2)
            steps = np.where(steps == np.iinfo(np.int16).max, -1, steps).astype(np.int16)
    max_step = int((steps >= 0).sum(axis=2).max()) if steps.size else 0
    return _Stream(steps=steps, num_experts=trace_list[0].num_experts, max_step=max_step)


def _cache_sizes(cache_size: CacheSizes, num_layers: int, num_experts: int, need: int, pinned) -> list[int]:
    if isinstance(cache_size, (int, np.integer)):
        sizes = [int(cache_size)] * num_layers
    else:
        sizes = [int(c) for c in cache_size]
        if len(sizes) != num_layers:
            raise ValueError(f"cache_size: {len(sizes)} per-layer values for {num_layers} layers")
    for position, c in enumerate(sizes):
        if position in pinned:
            continue
        if c < need:
            raise ValueError(
                f"cache_size {c} of layer {position} is below the {need} distinct experts one step uses: "
                "a token needs all of them resident"
            )
    return [num_experts if position in pinned else min(c, num_experts) for position, c in enumerate(sizes)]


def _pinned(pinned: Sequence[int], num_layers: int) -> tuple:
    out = tuple(sorted(set(int(p) for p in pinned)))
    bad = [p for p in out if not 0 <= p < num_layers]
    if bad:
        raise ValueError(f"pinned layers {bad} outside [0, {num_layers})")
    return out


def _warm(warm: Optional[Mapping[int, Sequence[int]]], num_layers: int, num_experts: int, sizes) -> Dict[int, list]:
    """Per-layer warm lists, insertion order, cut to the last ``cache_size`` entries."""
    out: Dict[int, list] = {}
    for position, experts in (warm or {}).items():
        position = int(position)
        if not 0 <= position < num_layers:
            raise ValueError(f"warm start names layer {position}, outside [0, {num_layers})")
        seen: Dict[int, None] = {}
        for e in experts:
            e = int(e)
            if not 0 <= e < num_experts:
                raise ValueError(f"warm start of layer {position} names expert {e}, outside [0, {num_experts})")
            seen.pop(e, None)
            seen[e] = None  # a repeated expert counts at its last position
        out[position] = list(seen)[-sizes[position]:] if sizes[position] else []
    return out


def _policy_factory(policy) -> tuple[str, Callable[[], Policy]]:
    if isinstance(policy, str):
        make_policy(policy)  # validate once, with a clear error
        return policy, lambda: make_policy(policy)
    if callable(policy):
        return str(getattr(policy, "name", None) or getattr(policy, "__name__", "custom")), policy
    raise ValueError(f"policy must be a name or a factory, got {policy!r}")


# -- replay ---------------------------------------------------------------------------------


def _replay_layer(rows, policy: Policy, cache_size: int, warm: list) -> np.ndarray:
    """Run the step protocol over one layer (``rows``: a list, or a ``_Rows``); returns int32
    (N,) misses per step."""
    resident = set()
    for e in warm:
        policy.insert(e)
        resident.add(e)
    hit, insert, evict, victim, tick = policy.hit, policy.insert, policy.evict, policy.victim, policy.tick
    step_miss = np.zeros(len(rows), dtype=np.int32)
    for t, step in enumerate(rows):
        tick()
        m = 0
        for e in step:
            if e in resident:
                hit(e)
            else:
                if len(resident) >= cache_size:
                    v = victim(step)
                    evict(v)
                    resident.discard(v)
                insert(e)
                resident.add(e)
                m += 1
        if m:
            step_miss[t] = m
    return step_miss


def _split_prefetched(step_miss: np.ndarray, recall: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Turn each miss into a prefetched hit with probability ``recall``, in step order."""
    if recall <= 0.0:
        return step_miss, np.zeros_like(step_miss)
    total = int(step_miss.sum())
    lucky = rng.random(total) < recall
    owner = np.repeat(np.arange(len(step_miss)), step_miss)
    prefetched = np.bincount(owner[lucky], minlength=len(step_miss)).astype(np.int32)
    return step_miss - prefetched, prefetched


def _result(name, stream, sizes, pinned, step_misses, step_prefetched) -> SimResult:
    requests = (stream.steps >= 0).sum(axis=(0, 2), dtype=np.int64)
    misses = step_misses.sum(axis=0, dtype=np.int64)
    prefetched = step_prefetched.sum(axis=0, dtype=np.int64)
    return SimResult(
        policy=name,
        cache_sizes=tuple(sizes),
        pinned=pinned,
        requests=requests,
        hits=requests - misses - prefetched,
        misses=misses,
        prefetched=prefetched,
        step_misses=step_misses,
        step_prefetched=step_prefetched,
        num_experts=stream.num_experts,
    )


def simulate(
    traces: Traces,
    *,
    policy: Union[str, Callable[[], Policy]] = DEFAULT_POLICY,
    cache_size: CacheSizes = 32,
    pinned: Sequence[int] = (),
    warm: Optional[Mapping[int, Sequence[int]]] = None,
    prefetch_recall: float = 0.0,
    seed: int = 0,
    decode_only: bool = True,
    progress: Optional[Callable[[int], None]] = None,
) -> SimResult:
    """Replay ``traces`` in order through one cache per MoE layer.

    Caches persist across sequences and across the traces. Each layer follows the step
    protocol of ``Policy`` (tick; the step's distinct experts in ascending order; a miss in
    a full layer evicts the policy's victim, never one of the step's own experts).

    Args:
        traces: one trace or several, replayed in order.
        policy: a policy spec (``"lru"``, ``"lfu-decay:decay=0.9"``) or a factory; default
            golem's (``DEFAULT_POLICY``), as the live slot pools.
        cache_size: slots of every layer, or one value per layer; at least the distinct
            experts of one step (top-k); values above ``num_experts`` mean all of them.
        pinned: the fully resident MoE positions (no cache logic, no misses).
        warm: MoE position -> experts inserted before the first step, in insertion order (the
            last is the most recent); only the last ``cache_size`` of each list stay.
        prefetch_recall: probability that a miss was prefetched in time; such misses are
            counted as ``prefetched`` (the cache state is the same as for a demand read).
        seed: seeds the prefetch draws (one generator per layer).
        decode_only: leave out prefill steps (``trace.prefill``).
        progress: called with 1 after each layer (e.g. a progress bar's ``update``).
    """
    if not 0.0 <= prefetch_recall <= 1.0:
        raise ValueError(f"prefetch_recall must be in [0, 1], got {prefetch_recall}")
    name, factory = _policy_factory(policy)
    stream = _stream(traces, decode_only)
    num_layers, num_experts = stream.num_layers, stream.num_experts
    pinned_t = _pinned(pinned, num_layers)
    sizes = _cache_sizes(cache_size, num_layers, num_experts, stream.max_step, pinned_t)
    warm_lists = _warm(warm, num_layers, num_experts, sizes)
    n = stream.steps.shape[0]
    step_misses = np.zeros((n, num_layers), dtype=np.int32)
    step_prefetched = np.zeros((n, num_layers), dtype=np.int32)
    for position in range(num_layers):
        if position not in pinned_t:
            miss = _replay_layer(_Rows(stream, position), factory(), sizes[position], warm_lists.get(position, []))
            rng = np.random.default_rng([seed, position])
            step_misses[:, position], step_prefetched[:, position] = _split_prefetched(miss, prefetch_recall, rng)
        if progress is not None:
            progress(1)
    return _result(name, stream, sizes, pinned_t, step_misses, step_prefetched)


def _next_use(steps: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """For one layer's steps (N, K): for every (step, slot) the next step using that expert
    (N if none), int32, and for every expert its first step (N if none). Scratch memory
    is a few times one layer's column, never the whole trace's."""
    n, k = steps.shape
    nxt = np.full(steps.shape, n, dtype=np.int32)
    first = np.full(num_experts, n, dtype=np.int32)
    flat = steps.reshape(-1)
    pos = np.flatnonzero(flat >= 0).astype(np.int64)  # step-major: t = pos // k
    if len(pos) == 0:
        return nxt, first
    order = pos[np.argsort(flat[pos], kind="stable")]  # by expert, then step
    key = flat[order]
    t = (order // k).astype(np.int32)
    same = key[1:] == key[:-1]
    out = np.full(len(order), n, dtype=np.int32)
    out[:-1][same] = t[1:][same]
    nxt.reshape(-1)[order] = out
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = ~same
    first[key[starts]] = t[starts]
    return nxt, first


_ROWS_PER_BLOCK = 1 << 16  # steps turned into Python lists at once


def belady(
    traces: Traces,
    cache_size: CacheSizes = 32,
    *,
    pinned: Sequence[int] = (),
    warm: Optional[Mapping[int, Sequence[int]]] = None,
    decode_only: bool = True,
    progress: Optional[Callable[[int], None]] = None,
) -> SimResult:
    """The offline optimum: on a miss in a full layer evict the resident expert whose next
    use is farthest (never one of the step's own experts). No policy, with the same
    cache sizes, pinned layers and warm start, misses less. Arguments as in ``simulate``."""
    stream = _stream(traces, decode_only)
    num_layers, num_experts = stream.num_layers, stream.num_experts
    pinned_t = _pinned(pinned, num_layers)
    sizes = _cache_sizes(cache_size, num_layers, num_experts, stream.max_step, pinned_t)
    warm_lists = _warm(warm, num_layers, num_experts, sizes)
    n = stream.steps.shape[0]
    step_misses = np.zeros((n, num_layers), dtype=np.int32)
    for position in range(num_layers):
        if progress is not None:
            progress(1)
        if position in pinned_t:
            continue
        layer_size = sizes[position]
        nxt, first = _next_use(stream.steps[:, position, :], num_experts)
        next_of: Dict[int, int] = {int(e): int(first[e]) for e in warm_lists.get(position, [])}
        for block in range(0, n, _ROWS_PER_BLOCK):
            stop = min(n, block + _ROWS_PER_BLOCK)
            _belady_block(stream.layer_rows(position, block, stop), nxt[block:stop].tolist(), next_of, layer_size,
                          step_misses[block:stop, position], block)
    return _result("belady", stream, sizes, pinned_t, step_misses, np.zeros_like(step_misses))


def _belady_block(rows: list, nrows: list, next_of: Dict[int, int], cache_size: int, col: np.ndarray, base: int) -> None:
    """Belady over one block of a layer's steps; ``next_of`` (resident expert -> next use)
    carries over from block to block."""
    for i, step in enumerate(rows):
        t = base + i
        m = 0
        for e in step:
            if e not in next_of:
                m += 1
                if len(next_of) >= cache_size:
                    victim, far = -1, -1
                    for r, nu in next_of.items():
                        if nu > far and r not in step:
                            victim, far = r, nu
                    del next_of[victim]
                next_of[e] = t  # placeholder until the step's next uses are written
        for e, nu in zip(step, nrows[i]):
            next_of[e] = nu
        if m:
            col[i] = m


def stack_distance_histogram(traces: Traces, *, decode_only: bool = True) -> np.ndarray:
    """Plain LRU at every cache size in one pass (Mattson's stack distances).

    Returns int64 (L, E+1): ``h[l, d]`` counts requests of layer l whose expert had exactly
    d other distinct experts used since its last use (at the start of the step), and
    ``h[l, E]`` first uses. Under the step protocol, LRU with cache size c (>= the experts of
    one step) hits exactly the requests with d < c; see ``lru_misses``.
    """
    stream = _stream(traces, decode_only)
    steps = stream.steps
    n, num_layers, _ = steps.shape
    e_count = stream.num_experts
    last = np.full((num_layers, e_count), -1, dtype=np.int64)  # recency key of the last use
    dist = np.full(steps.shape, e_count, dtype=np.int64)  # (N, L, K)
    rows = np.arange(num_layers)[:, None]
    valid = steps >= 0
    layer_of = np.broadcast_to(rows, steps.shape[1:])
    for t in range(n):
        ok = valid[t]
        ids = np.where(ok, steps[t], 0).astype(np.int64)  # (L, K)
        mine = last[rows, ids]  # (L, K)
        d = (last[:, None, :] > mine[:, :, None]).sum(axis=2)
        dist[t] = np.where(mine < 0, e_count, d)
        # ascending processing order: a larger id in the same step is more recent
        last[layer_of[ok], ids[ok]] = t * e_count + ids[ok]
    flat = (np.broadcast_to(rows[None], steps.shape) * (e_count + 1) + dist)[valid]
    hist = np.bincount(flat, minlength=num_layers * (e_count + 1)).reshape(num_layers, e_count + 1)
    return hist


def requests_per_step(traces: Traces, *, decode_only: bool = True) -> np.ndarray:
    """int32 (N, L): distinct experts each replayed step requests in each layer."""
    return (_stream(traces, decode_only).steps >= 0).sum(axis=2, dtype=np.int32)


def split_sequences(traces: Traces, *, decode_only: bool = True) -> list[Trace]:
    """Every sequence of the traces as a trace of its own, in order."""
    out = []
    for t in as_trace_list(traces):
        t = t.decode_only() if decode_only else t
        for start, stop in t.sequences():
            if stop > start:
                out.append(Trace(
                    experts=t.experts[start:stop],
                    weights=t.weights[start:stop],
                    seq_offsets=np.array([0, stop - start], dtype=np.int64),
                    meta=t.meta,
                    token_ids=None if t.token_ids is None else t.token_ids[start:stop],
                    prefill=None if t.prefill is None else t.prefill[start:stop],
                    path=t.path,
                ))
    return out


def simulate_sequences(
    traces: Traces,
    warm_for: Optional[Callable[[int, Trace], Optional[Mapping[int, Sequence[int]]]]] = None,
    **kwargs,
) -> SimResult:
    """Replay every sequence from fresh caches, as separate runs of golem would, and add up.

    ``warm_for(i, sequence)`` gives the warm start of the i-th sequence (None: empty). Other
    keyword arguments as in ``simulate``; ``seed`` is offset by the sequence index.
    """
    seqs = split_sequences(traces, decode_only=kwargs.pop("decode_only", True))
    if not seqs:
        raise ValueError("no sequences to replay")
    seed = kwargs.pop("seed", 0)
    parts = [
        simulate(s, warm=warm_for(i, s) if warm_for else None, seed=seed + i, decode_only=False, **kwargs)
        for i, s in enumerate(seqs)
    ]
    first = parts[0]
    return SimResult(
        policy=first.policy,
        cache_sizes=first.cache_sizes,
        pinned=first.pinned,
        requests=sum(p.requests for p in parts),
        hits=sum(p.hits for p in parts),
        misses=sum(p.misses for p in parts),
        prefetched=sum(p.prefetched for p in parts),
        step_misses=np.concatenate([p.step_misses for p in parts]),
        step_prefetched=np.concatenate([p.step_prefetched for p in parts]),
        num_experts=first.num_experts,
    )


def default_grid_step(num_experts: int, top_k: int) -> int:
    """About 16 replays from top-k to all experts (4 for 64 experts and top-8)."""
    return max(1, -(-(num_experts - top_k) // 15))


def miss_curve(
    traces: Traces, policy: str = "lru", *, grid_step: Optional[int] = None, decode_only: bool = True
) -> np.ndarray:
    """float (L, E+1): each layer's misses over the traces with 0..E slots under ``policy``.

    ``"lru"`` is exact at every slot count (stack distances, one pass). Any other policy is
    replayed at every ``grid_step``-th slot count from top-k to E (default
    ``default_grid_step``) and interpolated linearly in between; counts below top-k repeat
    the top-k value (a layer cannot run with fewer slots).
    """
    trace_list = as_trace_list(traces)
    if policy == "lru":
        return lru_misses(stack_distance_histogram(trace_list, decode_only=decode_only)).astype(np.float64)
    e = trace_list[0].num_experts
    k = _stream(trace_list, decode_only).max_step
    step = default_grid_step(e, k) if grid_step is None else int(grid_step)
    if step < 1:
        raise ValueError(f"grid_step must be >= 1, got {grid_step}")
    grid = sorted(set(list(range(k, e + 1, step)) + [e]))
    at = np.stack([simulate(trace_list, policy=policy, cache_size=c, decode_only=decode_only).misses for c in grid])
    x = np.arange(e + 1)
    curves = np.stack([np.interp(x, grid, at[:, position]) for position in range(at.shape[1])])
    curves[:, :k] = curves[:, [k]]
    return curves

