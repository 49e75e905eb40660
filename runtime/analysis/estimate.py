"""Decode-speed estimates for an MoE model on a machine, before buying either.

Owns the two estimators: the chunk formula of the GLM-5 study (U and D per chunk) and a
trace-driven one that replays routing traces through ``golem.runtime.analysis.simulate``,
over a ``Placement`` (``golem.runtime.analysis.placement``: the memory planner's plan for the
machine), plus memory sweeps and their chart. Model sizes live in ``model_size``, machines
in ``machines``. It does not run models, read weights or simulate caches itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from golem.runtime.analysis import simulate as sim
from golem.runtime.analysis.chunks import ChunkStats
from golem.runtime.analysis.machines import MachineSpec
from golem.runtime.analysis.model_size import ModelSpec, Quantization
from golem.runtime.analysis.placement import DoesNotFit, Placement, plan_placement
from golem.runtime.analysis.plan import RoutingStats
from golem.runtime.policies import DEFAULT_POLICY
from golem.runtime.trace import Trace
from golem.runtime.units import GB, GiB

PLANS = ("uniform", "weighted", "curves")


# ------------------------------------------------------------------------------- estimators


@dataclass
class Estimate:
    """Time per decoded token and its parts.

    Args:
        method: ``chunk`` (the study's formula) or ``trace`` (replayed through the simulator).
        compute_s: time on weights in the GPU or unified tier.
        memory_s: time on weights in system RAM (CPU, bandwidth-bound).
        ssd_s: time reading experts from SSD that does not overlap computing.
        ssd_nbytes: bytes read from SSD per token.
        experts_read: experts read from SSD per token.
        notes: how the routing statistics were obtained or mapped.
    """

    method: str
    compute_s: float
    memory_s: float
    ssd_s: float
    ssd_nbytes: float
    experts_read: float
    notes: list = field(default_factory=list)

    @property
    def time_s(self) -> float:
        return self.compute_s + self.memory_s + self.ssd_s

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.time_s if self.time_s > 0 else math.inf

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "tokens_per_s": round(self.tokens_per_s, 4),
            "time_s": self.time_s,
            "compute_s": self.compute_s,
            "memory_s": self.memory_s,
            "ssd_s": self.ssd_s,
            "ssd_nbytes_per_token": self.ssd_nbytes,
            "experts_read_per_token": self.experts_read,
            "notes": list(self.notes),
        }


def resident_time(model: ModelSpec, quant: Quantization, machine: MachineSpec,
                  placement: Placement) -> tuple[float, float]:
    """``(compute_s, memory_s)`` per token with every needed expert resident.

    Each tier's time is its bytes read per token over its bandwidth (or its FLOPs over its
    ``tflops`` when that is larger). Experts that come from SSD are computed from the cache
    tier too, so every non-pinned layer's active experts count there.
    """
    fast, cache = machine.fast, machine.cache_tier
    expert_active = model.top_k * placement.expert_nbytes
    expert_flops = 2 * model.top_k * model.expert_params
    ne_bytes = quant.active_non_expert_nbytes(model)
    ne_flops = 2 * model.active_non_expert_params
    nbytes = {"fast": 0.0, "cache": 0.0}
    flops = {"fast": 0.0, "cache": 0.0}
    ne_where = "fast" if fast is not None and placement.non_expert_tier == fast.kind and fast is not cache else "cache"
    nbytes[ne_where] += ne_bytes
    flops[ne_where] += ne_flops
    n_fast = len(placement.fast_pinned)
    nbytes["fast"] += n_fast * expert_active
    flops["fast"] += n_fast * expert_flops
    n_cache = model.num_moe_layers - n_fast
    nbytes["cache"] += n_cache * expert_active
    flops["cache"] += n_cache * expert_flops
    fast_s = fast.seconds(nbytes["fast"], flops["fast"]) if fast is not None and fast is not cache else 0.0
    cache_s = cache.seconds(nbytes["cache"], flops["cache"])
    if cache.kind == "unified":
        return cache_s + fast_s, 0.0
    return fast_s, cache_s


def _ssd_seconds(machine: MachineSpec, experts_read: float, expert_nbytes: int) -> float:
    ssd = machine.ssd
    return experts_read * expert_nbytes / (ssd.gb_per_s * GB) + experts_read * ssd.read_latency_s


@dataclass(frozen=True)
class ChunkRouting:
    """U and D per chunk, in the units of the model being estimated.

    Args:
        u: experts a chunk needs (at ``coverage``).
        d: how many of them were not used in the chunk before.
        chunk: tokens per chunk.
        coverage: the coverage threshold U and D were taken at.
        source: where the numbers come from.
    """

    u: float
    d: float
    chunk: int = 128
    coverage: float = 1.0
    source: str = "given"

    @classmethod
    def from_stats(cls, stats: ChunkStats, model: ModelSpec, coverage: float = 1.0) -> "ChunkRouting":
        """Take U and D from a chunk analysis; a trace of another model is mapped by share.

        When the trace's (layers, experts) differ from the model's, U and D are scaled by the
        share of all (layer, expert) pairs they are: U_model = U_trace / (L_t x E_t) x (L x E).
        This assumes the model routes with the locality of the traced one, which a model with
        a different top-k / experts ratio need not do.
        """
        u, d = stats.at(coverage)
        same = (stats.num_layers, stats.num_experts) == (model.num_moe_layers, model.num_experts)
        if same:
            return cls(u, d, stats.chunk, coverage, "trace")
        scale = model.total_experts / stats.total_experts
        return cls(u * scale, d * scale, stats.chunk, coverage,
                   f"trace of {stats.num_layers}x{stats.num_experts} experts mapped by share (x{scale:.2f})")


def chunk_estimate(model: ModelSpec, quant: Quantization, machine: MachineSpec,
                   placement: Placement, routing: ChunkRouting) -> Estimate:
    """The GLM-5 study's formula: with room for U experts a chunk pages in D; with a shortfall
    of S = U - capacity it pages in D + S; with room for every expert it pages in none.

    Known to be optimistic when memory is small (at 0 bytes every active expert loads every
    token, not D + U per chunk).
    """
    compute_s, memory_s = resident_time(model, quant, machine, placement)
    cap = placement.capacity_experts
    if cap >= model.total_experts:
        pages = 0.0
    else:
        pages = routing.d + max(0.0, routing.u - cap)
    experts_read = pages / routing.chunk
    ssd_s = _ssd_seconds(machine, experts_read, placement.expert_nbytes)
    notes = [f"U={routing.u:.1f}, D={routing.d:.1f} per {routing.chunk}-token chunk at coverage "
             f"{routing.coverage:g} ({routing.source}); capacity {cap} experts"]
    return Estimate("chunk", compute_s, memory_s, ssd_s, experts_read * placement.expert_nbytes,
                    experts_read, notes)


# ---------------------------------------------------------------------- trace-driven estimate

def _distinct_per_step(experts: np.ndarray) -> np.ndarray:
    """int64 (N, L): distinct valid experts of each step and layer."""
    s = np.sort(experts.astype(np.int64), axis=2)
    new = s >= 0
    new[:, :, 1:] &= s[:, :, 1:] != s[:, :, :-1]
    return new.sum(axis=2)


class TraceReplay:
    """Expert reads per token for a placement, from routing traces replayed through
    ``golem.runtime.analysis.simulate`` (caches persist across sequences and traces).

    A trace of the estimated model itself (same MoE layers and experts) is replayed with the
    placement's per-layer slots and pinned layers. A trace of another model is mapped by share
    of a layer: MoE layer i of the model stands for traced layer floor(i x L_t / L) (same
    relative depth), and its s_i slots of E for s_i / E x E_t slots of the traced layer
    (interpolated between the two integer cache sizes around it); the traced layer's misses
    per request then apply to the model's top_k requests of layer i. This carries the traced
    model's locality over to a model whose top-k / experts ratio may differ. A layer with
    fewer slots than one step's experts reads every expert it uses (miss ratio 1).

    Args:
        traces: decode traces (prefill steps are dropped), replayed in order.
        policy: eviction policy spec for the simulator (default golem's, ``DEFAULT_POLICY``;
            ``lru`` uses one stack-distance pass for every cache size, other policies one
            replay per cache size).
        prefetch_recall: fraction of misses a predictor would have read ahead in time.
        seed: seeds the simulator's prefetch draws.
        warm: traced layer -> experts resident before the first step, oldest first (e.g.
            what the prompt left behind); used when the trace is of the estimated model.
        progress: called with 1 after each layer a replay finishes (a progress bar's ``update``).
    """

    def __init__(self, traces: Sequence[Trace], *, policy: str = DEFAULT_POLICY, prefetch_recall: float = 0.0,
                 seed: int = 0, warm: Optional[dict] = None,
                 progress: Optional[Callable[[int], None]] = None) -> None:
        if not traces:
            raise ValueError("trace-driven estimate needs at least one trace")
        if not 0.0 <= prefetch_recall <= 1.0:
            raise ValueError(f"--prefetch-recall must lie in [0, 1], got {prefetch_recall}")
        from golem.runtime.policies import make_policy
        make_policy(policy)  # a clear error for an unknown policy, before any replay
        self.traces = [t.decode_only() for t in traces]
        shapes = {(t.num_layers, t.num_experts) for t in self.traces}
        if len(shapes) != 1:
            raise ValueError(f"traces differ in (layers, experts): {sorted(shapes)}")
        self.num_layers, self.num_experts = shapes.pop()
        self.num_steps = sum(t.num_steps for t in self.traces)
        if self.num_steps == 0:
            raise ValueError("traces hold no decode steps")
        distinct = _distinct_per_step(np.concatenate([t.experts for t in self.traces], axis=0))
        self.requests = distinct.sum(axis=0)  # (L,)
        self.need = int(distinct.max())
        self.policy = policy
        self.prefetch_recall = float(prefetch_recall)
        self.seed = seed
        self.warm = warm
        self.progress = progress
        self._lru: Optional[np.ndarray] = None
        self._reads: dict[int, np.ndarray] = {}

    def layer_reads(self, cache_size: int) -> np.ndarray:
        """float (L,): expert reads (demand + prefetched) of each traced layer with
        ``cache_size`` slots in every layer."""
        cache_size = int(min(max(cache_size, 0), self.num_experts))
        if cache_size not in self._reads:
            if cache_size >= self.num_experts:
                reads = np.zeros(self.num_layers)
            elif cache_size < self.need:
                reads = self.requests.astype(float)
            elif self.policy == "lru":
                if self._lru is None:
                    self._lru = sim.lru_misses(sim.stack_distance_histogram(self.traces))
                reads = self._lru[:, cache_size].astype(float)
            else:
                res = sim.simulate(self.traces, policy=self.policy, cache_size=cache_size, seed=self.seed,
                                   progress=self.progress)
                reads = (res.misses + res.prefetched).astype(float)
            self._reads[cache_size] = reads
        return self._reads[cache_size]

    def same_model(self, model: ModelSpec) -> bool:
        return (self.num_layers, self.num_experts) == (model.num_moe_layers, model.num_experts)

    def reads_per_token(self, model: ModelSpec, placement: Placement) -> tuple[float, float, str]:
        """``(demand reads, prefetched reads, note)`` per decoded token."""
        r = self.prefetch_recall
        pinned = set(placement.fast_pinned) | set(placement.cache_pinned)
        if self.same_model(model):
            cached = placement.cached_layers
            if not cached:
                return 0.0, 0.0, "every layer resident"
            sizes = [max(int(s), self.need) for s in placement.slots]
            res = sim.simulate(self.traces, policy=self.policy, cache_size=sizes, pinned=sorted(pinned),
                               prefetch_recall=r, seed=self.seed, warm=self.warm, progress=self.progress)
            demand = res.misses.astype(float)
            ahead = res.prefetched.astype(float)
            starved = [i for i in cached if placement.slots[i] < self.need]
            for i in starved:
                demand[i], ahead[i] = (1 - r) * self.requests[i], r * self.requests[i]
            note = f"replayed {self.num_steps} traced steps with the placement's slots per layer ({self.policy})"
            if starved:
                note += f"; {len(starved)} layers below {self.need} slots read every expert"
            return demand.sum() / self.num_steps, ahead.sum() / self.num_steps, note
        per_token = 0.0
        for i in placement.cached_layers:
            j = min(self.num_layers - 1, i * self.num_layers // model.num_moe_layers)
            x = placement.slots[i] / model.num_experts * self.num_experts
            lo = int(math.floor(x))
            frac = x - lo
            ratio = self.layer_reads(lo)[j]
            if frac > 1e-9:
                ratio = (1 - frac) * ratio + frac * self.layer_reads(lo + 1)[j]
            per_token += model.top_k * ratio / max(self.requests[j], 1)
        note = (f"{self.num_layers}x{self.num_experts}-expert trace ({self.num_steps} steps) mapped by share "
                f"of a layer onto {model.num_moe_layers}x{model.num_experts} ({self.policy})")
        return (1 - r) * per_token, r * per_token, note


def trace_estimate(model: ModelSpec, quant: Quantization, machine: MachineSpec,
                   placement: Placement, replay: TraceReplay) -> Estimate:
    """Expert reads per token from replaying traces; prefetched reads overlap computing.

    Demand reads stall the decoder; reads a predictor issued ahead (``prefetch_recall`` of
    them) run while the token computes and cost only what exceeds the compute time.
    """
    compute_s, memory_s = resident_time(model, quant, machine, placement)
    demand, ahead, how = replay.reads_per_token(model, placement)
    demand_s = _ssd_seconds(machine, demand, placement.expert_nbytes)
    ahead_s = _ssd_seconds(machine, ahead, placement.expert_nbytes)
    ssd_s = demand_s + max(0.0, ahead_s - (compute_s + memory_s))
    notes = [how]
    if ahead:
        notes.append(f"prefetch recall {replay.prefetch_recall:g}: {ahead_s * 1e3:.1f} ms of reads "
                     "overlap compute")
    reads = demand + ahead
    return Estimate("trace", compute_s, memory_s, ssd_s, reads * placement.expert_nbytes, reads, notes)


# ---------------------------------------------------------------------------- whole reports


@dataclass
class Report:
    """Both estimators for one model, quantization and machine."""

    model: ModelSpec
    quant: Quantization
    machine: MachineSpec
    placement: Placement
    chunk: Optional[Estimate]
    trace: Optional[Estimate]

    def to_dict(self) -> dict:
        m = self.model
        return {
            "model": {"name": m.name, "model_type": m.model_type, "moe_layers": m.num_moe_layers,
                      "experts": m.num_experts, "top_k": m.top_k, "total_params": m.total_params,
                      "active_params": m.active_params,
                      "expert_nbytes": self.placement.expert_nbytes,
                      "non_expert_nbytes": self.quant.non_expert_nbytes(m),
                      "all_experts_nbytes": m.total_experts * self.placement.expert_nbytes},
            "quantization": self.quant.to_dict(),
            "machine": self.machine.to_dict(),
            "placement": self.placement.to_dict(m),
            "chunk": self.chunk.to_dict() if self.chunk else None,
            "trace": self.trace.to_dict() if self.trace else None,
        }


def estimate(model: ModelSpec, quant: Quantization, machine: MachineSpec, *,
             routing: Optional[ChunkRouting] = None, replay: Optional[TraceReplay] = None,
             pin_layers: Sequence[int] = (), plan: str = "uniform",
             layer_weights: Optional[Sequence[float]] = None,
             stats: Optional[RoutingStats] = None) -> Report:
    """Place the weights (``plan_placement``: the memory planner's plan for the machine) and
    run whichever estimators have their routing statistics.

    ``plan`` is ``uniform`` (cache slots shared evenly, as golem-run --memory-budget without
    statistics), ``weighted`` (in proportion to ``layer_weights``, e.g. from
    ``distinct_per_layer``) or ``curves`` (the slots that minimise ``stats``' estimated
    misses, as golem-run --memory-budget with a warm-start profile; see
    ``placement.routing_stats_for``). ``pin_layers`` are decoder layer numbers (``-f``).
    """
    if plan not in PLANS:
        raise ValueError(f"--plan: {plan!r} is not one of {', '.join(PLANS)}")
    if plan == "weighted" and layer_weights is None:
        raise ValueError("--plan weighted needs per-layer weights (give a trace)")
    if plan == "curves" and stats is None:
        raise ValueError("--plan curves needs miss curves (give a trace)")
    placement = plan_placement(model, quant, machine, pin_layers=pin_layers,
                               layer_weights=layer_weights if plan == "weighted" else None,
                               stats=stats if plan == "curves" else None)
    chunk = chunk_estimate(model, quant, machine, placement, routing) if routing else None
    trace = trace_estimate(model, quant, machine, placement, replay) if replay else None
    return Report(model, quant, machine, placement, chunk, trace)


def distinct_per_layer(stats_source: Sequence[Trace], model: ModelSpec, chunk: int = 128) -> list[float]:
    """Mean distinct experts per chunk of each MoE layer of ``model`` (traced layers mapped
    by relative depth, counts by share of a layer), for a weighted cache plan."""
    experts = np.concatenate([t.decode_only().experts for t in stats_source], axis=0)
    n = experts.shape[0] // chunk
    if n == 0:
        raise ValueError(f"traces hold fewer than {chunk} decode steps")
    lt, et = experts.shape[1], stats_source[0].num_experts
    per = np.zeros(lt)
    for c in range(n):
        w = experts[c * chunk:(c + 1) * chunk]
        for position in range(lt):
            ids = w[:, position].ravel()
            per[position] += len(np.unique(ids[ids >= 0]))
    per /= n
    return [float(per[min(lt - 1, i * lt // model.num_moe_layers)] / et * model.num_experts)
            for i in range(model.num_moe_layers)]


def memory_sweep(model: ModelSpec, quant: Quantization, machine: MachineSpec, sizes_nbytes: Sequence[int],
                 progress: Optional[Callable[[int], None]] = None, **kwargs) -> list[tuple[int, Report]]:
    """``estimate`` at each cache-tier size; sizes too small for the non-expert weights are
    skipped. ``progress(1)`` is called after each size."""
    out = []
    for size in sizes_nbytes:
        try:
            out.append((int(size), estimate(model, quant, machine.with_memory(size), **kwargs)))
        except DoesNotFit:
            pass
        if progress is not None:
            progress(1)
    return out


def default_sweep_sizes(model: ModelSpec, quant: Quantization, machine: MachineSpec, points: int = 17) -> list[int]:
    """Cache-tier sizes from (almost) nothing to room for every expert, evenly spaced."""
    tier = machine.cache_tier
    need = model.total_experts * quant.expert_nbytes(model) + quant.non_expert_nbytes(model) + tier.reserve_nbytes
    top = max(need * 1.05, tier.nbytes)
    return [int(top * i / (points - 1)) for i in range(points)]


def plot_sweep(sweep: Sequence[tuple[int, Report]], path: Union[str, Path], title: str = "") -> Path:
    """PNG of tokens/s against cache-tier memory for both estimators; needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError('the chart needs matplotlib: pip install "golem-moe[plot]" (or pip install matplotlib)') from None
    xs = [s / GiB for s, _ in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for method, style in (("chunk", "o-"), ("trace", "s-")):
        ys = [getattr(r, method).tokens_per_s if getattr(r, method) else None for _, r in sweep]
        if any(y is not None for y in ys):
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            label = "chunk formula (U, D)" if method == "chunk" else "trace replay (simulator)"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, label=label)
    kind = sweep[0][1].machine.cache_tier.kind if sweep else "memory"
    ax.set_xlabel(f"{'RAM' if kind == 'ram' else 'unified memory'} (GiB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title or "decode speed against memory")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from golem.io.outputs import write_output

    try:
        path = write_output(path, lambda f: fig.savefig(f, format="png"), what="--plot")
    finally:
        plt.close(fig)
    return path
