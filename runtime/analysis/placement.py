"""Where a model's weights live on a machine: the memory planner's plan, spread over tiers.

Owns ``Placement`` and ``plan_placement``: non-expert weights go to the fastest tier they fit
in, a discrete GPU holds whole MoE layers, and the cache tier (RAM, or unified memory) gets
exactly the plan ``golem.runtime.analysis.plan.plan_memory`` makes for a ``--memory-budget``
of that tier's usable bytes (its size less its reserve), so the estimated placement is the one golem-run
would run. Also maps routing statistics of a traced model onto another
(``routing_stats_for``). Knows nothing of time, files or MLX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from golem.runtime.analysis.machines import MachineSpec
from golem.runtime.analysis.model_size import ModelMemory, ModelSpec, Quantization
from golem.runtime.analysis.plan import BudgetTooSmall, MemoryPlan, RoutingStats, plan_memory
from golem.runtime.trace import Trace
from golem.runtime.units import GiB, format_layer_ranges


class DoesNotFit(ValueError):
    """A machine whose tiers cannot hold the model's non-expert weights."""


@dataclass(frozen=True)
class Placement:
    """Where the weights live: non-expert weights, pinned MoE layers, and the expert cache.

    Layers are MoE-layer ordinals (0 = the first MoE layer), not decoder-layer indices.

    Args:
        non_expert_tier: kind of the tier holding the non-expert weights.
        fast_pinned: layers fully resident in the GPU/unified tier.
        cache_pinned: layers fully resident in the cache tier (RAM, or unified).
        slots: expert slots per MoE layer (``num_experts`` for pinned layers).
        expert_nbytes: bytes of one routed expert.
        num_experts: routed experts per layer.
        fast_kind, cache_kind: kinds of the two tiers (``None`` when absent).
        fast_free_nbytes, cache_free_nbytes: what is left unused in each.
        plan: the planner's plan for the cache tier's layers (``None`` when a GPU holds them all).
        below_top_k: the cache tier cannot hold top-k slots per layer, so the layers have
            fewer (every expert they miss is read for each token); golem-run refuses such a budget.
    """

    non_expert_tier: str
    fast_pinned: tuple
    cache_pinned: tuple
    slots: tuple
    expert_nbytes: int
    num_experts: int
    fast_kind: Optional[str]
    cache_kind: Optional[str]
    fast_free_nbytes: int = 0
    cache_free_nbytes: int = 0
    plan: Optional[MemoryPlan] = None
    below_top_k: bool = False

    @property
    def capacity_experts(self) -> int:
        return int(sum(self.slots))

    @property
    def cached_layers(self) -> tuple:
        pinned = set(self.fast_pinned) | set(self.cache_pinned)
        return tuple(i for i in range(len(self.slots)) if i not in pinned)

    def to_dict(self, model: Optional[ModelSpec] = None) -> dict:
        cached = self.cached_layers
        cache_slots = [self.slots[i] for i in cached]
        out = {
            "non_expert_tier": self.non_expert_tier,
            "expert_nbytes": self.expert_nbytes,
            "capacity_experts": self.capacity_experts,
            "fast_tier": self.fast_kind,
            "fast_pinned_layers": format_layer_ranges(self.fast_pinned),
            "fast_pinned_nbytes": len(self.fast_pinned) * self.num_experts * self.expert_nbytes,
            "cache_tier": self.cache_kind,
            "cache_pinned_layers": format_layer_ranges(self.cache_pinned),
            "cached_layers": format_layer_ranges(cached),
            "cache_slots_total": int(sum(cache_slots)),
            "cache_slots_per_layer": [min(cache_slots), max(cache_slots)] if cache_slots else [0, 0],
            "cache_nbytes": (len(self.cache_pinned) * self.num_experts + int(sum(cache_slots))) * self.expert_nbytes,
            "below_top_k": self.below_top_k,
            "slots": list(self.slots),
        }
        if model is not None:
            out["decoder_layers_of"] = {
                "fast_pinned": format_layer_ranges(model.moe_layers[i] for i in self.fast_pinned),
                "cache_pinned": format_layer_ranges(model.moe_layers[i] for i in self.cache_pinned),
            }
        return out


def _sub_model(memory: ModelMemory, positions: Sequence[int], non_expert_nbytes: int) -> ModelMemory:
    return ModelMemory(len(positions), memory.num_experts, memory.top_k, memory.nbytes_of(0),
                       non_expert_nbytes, layer_ids=[memory.ids[i] for i in positions])


def plan_placement(
    model: ModelSpec,
    quant: Quantization,
    machine: MachineSpec,
    *,
    pin_layers: Sequence[int] = (),
    pin_order: Optional[Sequence[int]] = None,
    stats: Optional[RoutingStats] = None,
    layer_weights: Optional[Sequence[float]] = None,
) -> Placement:
    """Place the weights, pinned layers first, as the GLM-5 study advises.

    Non-expert weights go to the GPU/unified tier when they fit there, else to RAM. Whole
    MoE layers are then pinned in a discrete GPU while they fit (a GPU holds whole layers,
    no cache), in ``pin_order`` (default: first MoE layers first, as they route most
    uniformly and cache worst). The other layers get ``plan_memory``'s plan for a budget of
    the cache tier's usable bytes (RAM, or unified memory, less its reserve): ``pin_layers``
    (decoder layer numbers, as ``-f``) fully resident, the rest uniform slots, or slots by
    ``stats`` (miss curves, as golem-run with a warm-start profile) or in proportion to
    ``layer_weights``. A tier too small for top-k slots per layer gets fewer (uniform),
    marked ``below_top_k``. Raises ``DoesNotFit`` when no tier holds the non-expert weights.
    """
    if isinstance(pin_layers, (int, str)):
        raise ValueError(f"pin_layers takes decoder layer numbers (e.g. [3, 4, 5]; parse_layer_ranges reads "
                         f"'3-5'), not {pin_layers!r}")
    memory = model.memory(quant)
    m, e = memory.num_layers, memory.num_experts
    _check_pin_layers(pin_layers, memory, model)
    expert_nbytes = memory.nbytes_of(0)
    layer_nbytes = e * expert_nbytes
    non_expert = memory.non_expert_nbytes
    order = list(pin_order) if pin_order is not None else list(range(m))
    if sorted(order) != list(range(m)):
        raise ValueError(f"pin order must list each of the {m} MoE layers once")
    fast, cache = machine.fast, machine.cache_tier
    ne_tier, fast_free = _non_expert_tier(model, machine, non_expert)
    fast_pinned: list[int] = []
    if fast is not None and fast is not cache:
        while order and fast_free >= layer_nbytes:
            fast_pinned.append(order.pop(0))
            fast_free -= layer_nbytes
    rest = sorted(order)
    slots = [0] * m
    for i in fast_pinned:
        slots[i] = e
    cache_ne = non_expert if ne_tier == cache.kind else 0
    plan, below = _cache_plan(memory, machine, rest, cache_ne, pin_layers=pin_layers, stats=stats,
                              layer_weights=layer_weights)
    cache_free = cache.usable_nbytes - cache_ne
    if plan is not None:
        for lp in plan.layers:
            slots[rest[lp.position]] = lp.cache_size
        cache_free -= plan.expert_nbytes_total
    cache_pinned = [i for i in rest if slots[i] >= e]
    return Placement(
        non_expert_tier=ne_tier,
        fast_pinned=tuple(fast_pinned),
        cache_pinned=tuple(cache_pinned),
        slots=tuple(slots),
        expert_nbytes=expert_nbytes,
        num_experts=e,
        fast_kind=fast.kind if fast is not None else None,
        cache_kind=cache.kind if cache is not None else None,
        fast_free_nbytes=int(fast_free) if fast is not cache else int(cache_free),
        cache_free_nbytes=int(cache_free),
        plan=plan,
        below_top_k=below,
    )


def _check_pin_layers(pin_layers, memory: ModelMemory, model: ModelSpec) -> None:
    """Each of ``pin_layers`` the decoder layer number of one of the model's MoE layers."""
    unknown = [x for x in pin_layers if x not in set(memory.ids)]
    if unknown:
        raise ValueError(f"--pin-layers: layer {unknown[0]} is not an MoE layer of {model.name} "
                         f"(MoE layers: {format_layer_ranges(memory.ids)})")


def _non_expert_tier(model: ModelSpec, machine: MachineSpec, non_expert: int) -> tuple:
    """The tier kind holding the non-expert weights (the fast one when they fit) and the fast
    tier's bytes left; ``DoesNotFit`` when neither holds them."""
    fast, cache = machine.fast, machine.cache_tier
    fast_free = fast.usable_nbytes if fast is not None else 0
    if fast is not None and non_expert <= fast_free:
        return fast.kind, fast_free - non_expert
    if cache is not None and non_expert <= cache.usable_nbytes:
        return cache.kind, fast_free
    tiers = [t for t in (fast, cache) if t is not None]
    if len(tiers) == 2 and tiers[0] is tiers[1]:
        tiers = tiers[:1]
    where = " or ".join(f"{t.kind} ({t.usable_nbytes / GiB:.1f} GiB usable)" for t in tiers)
    raise DoesNotFit(f"{machine.name}: non-expert weights of {model.name} ({non_expert / GiB:.1f} GiB) "
                     f"do not fit in {where}")


def _cache_plan(memory: ModelMemory, machine: MachineSpec, rest: list[int], cache_ne: int, *,
                pin_layers: Sequence[int], stats: Optional[RoutingStats],
                layer_weights: Optional[Sequence[float]]) -> tuple:
    """``plan_memory``'s cache sizes for the MoE layers ``rest`` in the cache tier (``cache_ne``
    bytes of it holding non-expert weights), and whether a tier too small for top-k gave fewer
    (uniform); (None, False) when no layer is left."""
    if not rest:
        return None, False
    cache = machine.cache_tier
    sub = _sub_model(memory, rest, cache_ne)
    ids = set(sub.ids)
    kwargs = dict(
        budget_nbytes=cache.usable_nbytes,
        pin_layers=[x for x in pin_layers if x in ids],
        stats=None if stats is None else _rows(stats, rest),
        weights=None if layer_weights is None else [float(layer_weights[i]) for i in rest],
    )
    try:
        return plan_memory(sub, **kwargs), False
    except BudgetTooSmall as err:
        try:
            plan = plan_memory(sub, **{**kwargs, "stats": None, "weights": None}, min_cache_size=0)
        except BudgetTooSmall:
            raise BudgetTooSmall(f"{machine.name}: {cache.kind}: {err}") from None
        return plan, any(lp.cache_size < memory.top_k for lp in plan.layers)


def _rows(stats: RoutingStats, positions: Sequence[int]) -> RoutingStats:
    per_window = None if stats.distinct_per_window is None else stats.distinct_per_window[list(positions)]
    return RoutingStats(stats.curves[list(positions)], stats.policy, per_window, stats.window, stats.source)


def routing_stats_for(model: ModelSpec, traces: Sequence[Trace], policy: str = "lru") -> RoutingStats:
    """Miss curves of ``model``'s MoE layers for the planner, from decode traces.

    Traces of the model itself give their own curves (``RoutingStats.from_traces``). Traces
    of another model are mapped by share of a layer, as ``TraceReplay`` maps them: MoE layer
    i stands for traced layer floor(i x L_t / L), its s slots of E for s / E x E_t traced
    slots (interpolated), and the traced miss ratio applies to its top-k requests per token.
    """
    from golem.runtime.analysis.simulate import as_trace_list, miss_curve, requests_per_step

    trace_list = [t.decode_only() for t in as_trace_list(traces)]
    first = trace_list[0]
    if (first.num_layers, first.num_experts) == (model.num_moe_layers, model.num_experts):
        return RoutingStats.from_traces(trace_list, policy=policy)
    steps = sum(t.num_steps for t in trace_list)
    if steps == 0:
        raise ValueError("routing statistics: the traces hold no decode steps")
    traced = miss_curve(trace_list, policy)  # (L_t, E_t + 1)
    requests = requests_per_step(trace_list).sum(axis=0).astype(np.float64)  # (L_t,)
    lt, et = traced.shape[0], traced.shape[1] - 1
    x = np.arange(model.num_experts + 1) / model.num_experts * et
    curves = np.zeros((model.num_moe_layers, model.num_experts + 1))
    for i in range(model.num_moe_layers):
        j = min(lt - 1, i * lt // model.num_moe_layers)
        ratio = traced[j] / max(requests[j], 1.0)
        curves[i] = model.top_k * np.interp(x, np.arange(et + 1), ratio)
    names = ", ".join(str(t.path).rsplit("/", 1)[-1] for t in trace_list if t.path) or "traces"
    return RoutingStats(curves, policy, source=f"{names}, mapped by share of a layer")

