"""The memory plan: which MoE layers stay fully resident (pinned) and how many expert slots
(each layer's cache size) every other layer gets, within ``--memory-budget``, ``-c``,
``--cache-size-override`` and ``-f``.

Owns ``ModelMemory`` (the sizes a plan is made over: MoE layers, experts, top-k, bytes per
expert, non-expert bytes), routing statistics read from a profile (``RoutingStats``; measured
on traces by the offline tools in ``golem.runtime.analysis.plan``), the allocation (exact
dynamic programming over estimated per-layer miss curves when routing statistics are given,
proportional to per-layer weights, uniform otherwise) and the ``golem-run --plan`` table
(``MemoryPlan``, one ``LayerMemory`` per MoE layer, made by ``plan_memory``).
golem-run, the library and the speed estimator (``golem.runtime.analysis.placement``) all plan
here. Loading a model uses this module, so it imports nothing of ``golem.runtime.analysis``.
Sizes and layer ranges are parsed by ``golem.runtime.units``. Knows nothing of files, MLX or
slot pools; the runtime measures the byte sizes and hands them in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

from golem.runtime.units import format_layer_ranges, format_nbytes


@dataclass(frozen=True)
class ModelMemory:
    """What the planner needs to know of a model.

    Args:
        num_layers: MoE layers.
        num_experts: experts per MoE layer.
        top_k: experts per token (the fewest slots a layer can run with).
        expert_nbytes: bytes of one expert, for all layers or one value per MoE layer.
        non_expert_nbytes: bytes of everything always resident (attention, embeddings, ...).
        layer_ids: the model's layer number of each MoE layer (what layer ranges on the
            command line name); default 0..num_layers-1.
    """

    num_layers: int
    num_experts: int
    top_k: int
    expert_nbytes: Union[int, Sequence[int]]
    non_expert_nbytes: int = 0
    layer_ids: Optional[Sequence[int]] = None

    def nbytes_of(self, position: int) -> int:
        """Bytes of one expert of the MoE layer at ``position`` (0..num_layers-1)."""
        if isinstance(self.expert_nbytes, (int, np.integer)):
            return int(self.expert_nbytes)
        return int(self.expert_nbytes[position])

    @property
    def ids(self) -> list[int]:
        return list(range(self.num_layers)) if self.layer_ids is None else [int(i) for i in self.layer_ids]

    @property
    def all_experts_nbytes(self) -> int:
        return sum(self.num_experts * self.nbytes_of(i) for i in range(self.num_layers))

    def validate(self) -> None:
        if self.num_layers < 1 or self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"model shape: {self.num_layers} layers, {self.num_experts} experts, top-k {self.top_k}"
            )
        if not isinstance(self.expert_nbytes, (int, np.integer)) and len(self.expert_nbytes) != self.num_layers:
            raise ValueError(f"expert_nbytes: {len(self.expert_nbytes)} values for {self.num_layers} layers")
        if any(self.nbytes_of(i) <= 0 for i in range(self.num_layers)):
            raise ValueError("expert_nbytes must be positive")
        if self.layer_ids is not None and len(self.layer_ids) != self.num_layers:
            raise ValueError(f"layer_ids: {len(self.layer_ids)} ids for {self.num_layers} MoE layers")

    @classmethod
    def from_trace_meta(cls, meta: dict, non_expert_nbytes: int = 0) -> "ModelMemory":
        """The shape a golem-trace/1 ``meta`` records (``expert_bytes`` as the expert size)."""
        nbytes = int(meta.get("expert_bytes") or 0)
        if nbytes <= 0:
            raise ValueError("trace meta has no expert_bytes; give the expert size explicitly")
        return cls(int(meta["num_layers"]), int(meta["num_experts"]), int(meta["top_k"]), nbytes, non_expert_nbytes)


def lru_misses(hist: np.ndarray) -> np.ndarray:
    """Misses of plain LRU per layer at every cache size 0..E from a stack-distance histogram
    (``golem.runtime.analysis.simulate.stack_distance_histogram``): int64 (L, E+1).
    Meaningful for cache sizes >= the experts of one step."""
    requests = hist.sum(axis=1, keepdims=True)
    hits = np.concatenate([np.zeros((hist.shape[0], 1), dtype=np.int64), np.cumsum(hist[:, :-1], axis=1)], axis=1)
    return requests - hits

class BudgetTooSmall(ValueError):
    """The budget cannot hold the non-expert weights, the reserve, the layers flags fix and
    the fewest slots of every other layer; the message names the shortfall."""


@dataclass(frozen=True)
class RoutingStats:
    """Per-layer routing statistics that steer the planner: each layer's estimated misses
    per decode step at every slot count (measured on traces by
    ``golem.runtime.analysis.plan.RoutingStats.from_traces``).

    Args:
        curves: float (L, E+1), misses per decode step of each layer with 0..E slots under
            ``policy`` (a pinned layer has none).
        policy: the policy the curves describe (``"lru"``: exact, from stack distances).
        distinct_per_window: optional float (L,), mean distinct experts per window.
        window: steps per window of ``distinct_per_window``.
        source: where the numbers came from (shown by ``describe``).
    """

    curves: np.ndarray
    policy: str = "lru"
    distinct_per_window: Optional[np.ndarray] = None
    window: int = 128
    source: str = ""

    @property
    def num_layers(self) -> int:
        return int(self.curves.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.curves.shape[1]) - 1

    def misses_per_step(self, position: int, cache_size: int, pinned: bool = False) -> float:
        """Estimated misses per step of the MoE layer at ``position`` with ``cache_size`` slots."""
        return 0.0 if pinned else float(self.curves[position, min(cache_size, self.num_experts)])

    @classmethod
    def from_histogram(cls, hist: np.ndarray, num_steps: int, source: str = "") -> "RoutingStats":
        """Plain LRU's curves from a stack-distance histogram over ``num_steps`` steps."""
        if num_steps <= 0:
            raise ValueError(f"{source or 'routing statistics'}: no decode steps counted")
        return cls(curves=lru_misses(np.asarray(hist)) / float(num_steps), policy="lru", source=source)

    @classmethod
    def from_profile(cls, profile, policy: str = "lru", source: str = "profile") -> "RoutingStats":
        """From a ``golem.runtime.profiles.Profile``: its curves for ``policy`` when it holds
        them, else plain LRU's from its stack-distance histogram."""
        if policy in profile.curves:
            steps, misses = profile.curves[policy]
            if steps <= 0:
                raise ValueError(f"{source}: the profile's {policy} curves count no steps")
            return cls(curves=np.asarray(misses, dtype=np.float64) / float(steps), policy=policy, source=source)
        if profile.stack_hist is None:
            raise ValueError(f"{source}: the profile holds no miss curves or stack distances to plan with")
        return cls.from_histogram(profile.stack_hist, profile.hist_steps, source=source)


@dataclass(frozen=True)
class LayerMemory:
    """One MoE layer of a memory plan.

    Args:
        position: position among the model's MoE layers (0..L-1).
        layer_id: the model's (decoder) layer number.
        cache_size: expert slots (``num_experts`` when pinned).
        pinned: fully resident, no cache logic.
        nbytes: bytes of its slots.
        source: which flag set it: ``-f``, ``override``, ``-c``, ``budget`` or ``budget (uniform)``.
    """

    position: int
    layer_id: int
    cache_size: int
    pinned: bool
    nbytes: int
    source: str


@dataclass(frozen=True)
class MemoryPlan:
    """Where the memory goes: each MoE layer's cache size and the bytes it takes.

    Args:
        layers: one ``LayerMemory`` per MoE layer.
        model: the model's shape and sizes.
        budget_nbytes: the budget, when one was given.
        reserve_nbytes: bytes set aside for other things (staging buffers, KV cache).
        stats: the routing statistics used, if any.
        uniform_cache_sizes: cache size of each layer in the uniform plan for the same budget
            (what ``describe`` compares the estimate with), when the budget chose slots.
    """

    layers: tuple
    model: ModelMemory
    budget_nbytes: Optional[int] = None
    reserve_nbytes: int = 0
    stats: Optional[RoutingStats] = field(default=None, compare=False)
    uniform_cache_sizes: Optional[tuple] = None

    @property
    def cache_sizes(self) -> list[int]:
        """Cache size of each MoE layer, as ``simulate(cache_size=...)`` and the slot pools take them."""
        return [lp.cache_size for lp in self.layers]

    @property
    def pinned_positions(self) -> list[int]:
        """Positions (0..L-1) of the MoE layers that are fully resident."""
        return [lp.position for lp in self.layers if lp.pinned]

    @property
    def expert_nbytes_total(self) -> int:
        return sum(lp.nbytes for lp in self.layers)

    @property
    def total_nbytes(self) -> int:
        return self.model.non_expert_nbytes + self.reserve_nbytes + self.expert_nbytes_total

    def estimated_misses_per_step(self, cache_sizes: Optional[Sequence[int]] = None) -> Optional[float]:
        """Misses per token the routing statistics predict for this plan (or for other
        per-layer ``cache_sizes``)."""
        if self.stats is None:
            return None
        sizes = self.cache_sizes if cache_sizes is None else list(cache_sizes)
        e = self.model.num_experts
        return sum(self.stats.misses_per_step(i, c, pinned=c >= e) for i, c in enumerate(sizes))

    def to_dict(self) -> dict:
        out = {
            "budget_nbytes": self.budget_nbytes,
            "total_nbytes": self.total_nbytes,
            "non_expert_nbytes": self.model.non_expert_nbytes,
            "reserve_nbytes": self.reserve_nbytes,
            "expert_nbytes": self.expert_nbytes_total,
            "pinned_layers": [lp.layer_id for lp in self.layers if lp.pinned],
            "slots": self.cache_sizes,
            "layers": [lp.__dict__ for lp in self.layers],
        }
        est = self.estimated_misses_per_step()
        if est is not None:
            out["estimated_misses_per_step"] = round(est, 4)
        return out

    def describe(self) -> str:
        """The table ``golem-run --plan`` prints: layers (grouped), slots, bytes, totals."""
        e = self.model.num_experts
        rows = [("layers", "slots", "resident", "bytes/layer", "bytes", "set by")]
        groups: list[list[LayerMemory]] = []

        def same(x: LayerMemory) -> tuple:
            return x.cache_size, x.pinned, x.nbytes, x.source

        for lp in self.layers:
            g = groups[-1] if groups else None
            if g and same(lp) == same(g[-1]):
                g.append(lp)
            else:
                groups.append([lp])
        for g in groups:
            lp = g[0]
            rows.append((
                format_layer_ranges(x.layer_id for x in g),
                f"{lp.cache_size}/{e}",
                "pinned" if lp.pinned else "cache",
                format_nbytes(lp.nbytes),
                format_nbytes(lp.nbytes * len(g)),
                lp.source,
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        pinned = self.pinned_positions
        slots = sum(lp.cache_size for lp in self.layers)
        lines.append("")
        lines.append(f"expert slots      {slots} of {self.model.num_layers * e} "
                     f"({len(pinned)} layers pinned)  {format_nbytes(self.expert_nbytes_total)}")
        lines.append(f"non-expert bytes  {format_nbytes(self.model.non_expert_nbytes)}")
        if self.reserve_nbytes:
            lines.append(f"reserved          {format_nbytes(self.reserve_nbytes)}")
        total = f"total             {format_nbytes(self.total_nbytes)}"
        if self.budget_nbytes:
            total += f" of {format_nbytes(self.budget_nbytes)} budget ({100.0 * self.total_nbytes / self.budget_nbytes:.1f}%)"
        lines.append(total)
        est = self.estimated_misses_per_step()
        if est is not None:
            line = f"estimated misses  {est:.2f} per token ({self.stats.policy} on {self.stats.source})"
            if self.uniform_cache_sizes is not None and list(self.uniform_cache_sizes) != self.cache_sizes:
                uni = self.estimated_misses_per_step(self.uniform_cache_sizes)
                line += f"; uniform plan of the same budget: {uni:.2f}"
            lines.append(line)
        return "\n".join(lines)


def _select(model: ModelMemory, layers: Sequence[int], what: str) -> list[int]:
    """Positions of the MoE layers named by model layer numbers (non-MoE layers in a range are skipped)."""
    ids = model.ids
    index = {lid: i for i, lid in enumerate(ids)}
    beyond = [x for x in layers if x > max(ids)]
    if beyond:
        raise ValueError(f"{what}: layer {beyond[0]} does not exist (MoE layers: {format_layer_ranges(ids)})")
    chosen = [index[x] for x in layers if x in index]
    if layers and not chosen:
        raise ValueError(f"{what}: {format_layer_ranges(layers)} names no MoE layer (MoE layers: {format_layer_ranges(ids)})")
    return chosen


def plan_memory(
    model: ModelMemory,
    *,
    budget_nbytes: Optional[int] = None,
    cache_size: Optional[int] = None,
    overrides: Sequence[tuple] = (),
    pin_layers: Sequence[int] = (),
    stats: Optional[RoutingStats] = None,
    reserve_nbytes: int = 0,
    weights: Optional[Sequence[float]] = None,
    min_cache_size: Optional[int] = None,
) -> MemoryPlan:
    """Choose pinned layers and the cache size of every other layer.

    Precedence: ``pin_layers`` (``-f``) > ``overrides`` (``--cache-size-override``, later
    ones win) > ``cache_size`` (``-c``) > the budget. Layers no flag sets share what the
    budget leaves: with ``stats``, the allocation that minimises the estimated misses per
    token (exact dynamic programming; a layer at ``num_experts`` slots is pinned); with
    ``weights``, slots in proportion to them; otherwise the most uniform slots that fit,
    leftover slots to the earliest layers (they route most uniformly). The plan never
    exceeds ``budget_nbytes``; when even top-k slots per layer do not fit, the error names
    the shortfall.

    Args:
        model: shape and byte sizes.
        budget_nbytes: total bytes for non-expert weights, reserve and expert slots.
        cache_size: cache size (slots) of every layer no other flag sets.
        overrides: ``(model layer numbers, slots)`` pairs.
        pin_layers: model layer numbers kept fully resident.
        stats: routing statistics (from traces or a warm-start profile).
        reserve_nbytes: bytes the budget must leave for other things.
        weights: per-layer weights (e.g. distinct experts per window) for a proportional
            allocation when no ``stats`` are given.
        min_cache_size: the fewest slots the budget may give a layer (default top-k, what one
            token needs; the speed estimator asks for fewer to price machines golem cannot
            run on, where every missing expert is read per token).
    """
    floor = _check_inputs(model, stats, weights, min_cache_size)
    e = model.num_experts
    fixed = _fixed_by_flags(model, cache_size, overrides, pin_layers)
    free = [i for i in range(model.num_layers) if i not in fixed]
    fixed_nbytes = sum(s * model.nbytes_of(i) for i, (s, _) in fixed.items())
    base = model.non_expert_nbytes + reserve_nbytes + fixed_nbytes
    sizes = {i: s for i, (s, _) in fixed.items()}
    sources = {i: src for i, (_, src) in fixed.items()}
    uniform = None
    if budget_nbytes is not None:
        need = base + sum(floor * model.nbytes_of(i) for i in free)
        if need > budget_nbytes:
            raise _too_small(model, budget_nbytes, need, base, reserve_nbytes, fixed_nbytes, len(free), floor)
        if free:
            avail = budget_nbytes - base
            uniform = _uniform(model, free, avail, floor)
            if stats is not None:
                chosen, tag = _by_stats(model, free, avail, stats, floor), "budget"
            elif weights is not None:
                chosen, tag = _weighted(model, free, avail, [float(weights[i]) for i in free], floor), "budget (weighted)"
            else:
                chosen, tag = uniform, "budget (uniform)"
            sizes.update(chosen)
            sources.update({i: tag for i in free})
    elif free:
        raise ValueError(
            f"no cache size for MoE layers {format_layer_ranges(model.ids[i] for i in free)}: "
            "give -c/--cache-size or --memory-budget"
        )
    ids = model.ids
    layers = tuple(
        LayerMemory(i, ids[i], sizes[i], sizes[i] >= e, sizes[i] * model.nbytes_of(i), sources[i])
        for i in range(model.num_layers)
    )
    uniform_sizes = None
    if uniform is not None:
        uniform_sizes = tuple(uniform.get(i, sizes[i]) for i in range(model.num_layers))
    plan = MemoryPlan(layers, model, budget_nbytes, reserve_nbytes, stats, uniform_cache_sizes=uniform_sizes)
    if budget_nbytes is not None and plan.total_nbytes > budget_nbytes:
        raise AssertionError(f"planner bug: {plan.total_nbytes} bytes over a {budget_nbytes} budget")
    return plan


def _check_inputs(model: ModelMemory, stats: Optional[RoutingStats], weights,
                  min_cache_size: Optional[int]) -> int:
    """``plan_memory``'s inputs agree with the model; returns the fewest slots a layer may get."""
    model.validate()
    e, k = model.num_experts, model.top_k
    floor = k if min_cache_size is None else int(min_cache_size)
    if not 0 <= floor <= k:
        raise ValueError(f"min_cache_size must lie in [0, top-k={k}], got {min_cache_size}")
    if weights is not None and len(weights) != model.num_layers:
        raise ValueError(f"weights: {len(weights)} values for {model.num_layers} MoE layers")
    if stats is not None and (stats.num_layers, stats.num_experts) != (model.num_layers, e):
        raise ValueError(
            f"routing statistics ({stats.source or 'given'}) describe {stats.num_layers} layers x "
            f"{stats.num_experts} experts, the model has {model.num_layers} x {e}"
        )
    return floor


def _fixed_by_flags(model: ModelMemory, cache_size: Optional[int], overrides: Sequence[tuple],
                    pin_layers: Sequence[int]) -> dict[int, tuple[int, str]]:
    """Position -> (cache size, which flag set it), for the MoE layers the flags set."""
    e, k = model.num_experts, model.top_k
    fixed: dict[int, tuple[int, str]] = {}
    if cache_size is not None:
        if cache_size < k:
            raise ValueError(f"-c/--cache-size {cache_size} is smaller than top-k ({k}): one token needs {k} experts resident")
        for i in range(model.num_layers):
            fixed[i] = (min(cache_size, e), "-c")
    for layers, size in overrides:
        if size < k:
            raise ValueError(
                f"--cache-size-override {format_layer_ranges(layers)} {size}: below top-k ({k}); "
                f"one token needs {k} experts resident"
            )
        for i in _select(model, layers, "--cache-size-override"):
            fixed[i] = (min(size, e), "override")
    for i in _select(model, pin_layers, "-f/--pin-layers"):
        fixed[i] = (e, "-f")
    return fixed


def _too_small(model: ModelMemory, budget_nbytes: int, need: int, base: int, reserve_nbytes: int,
               fixed_nbytes: int, num_free: int, floor: int) -> BudgetTooSmall:
    """The error of a budget below the smallest plan, naming what the plan needs."""
    parts = [f"non-expert {format_nbytes(model.non_expert_nbytes)}"]
    if reserve_nbytes:
        parts.append(f"reserve {format_nbytes(reserve_nbytes)}")
    if fixed_nbytes:
        parts.append(f"layers set by flags {format_nbytes(fixed_nbytes)}")
    if num_free:
        what = f"top-k ({model.top_k})" if floor == model.top_k else f"{floor}"
        parts.append(f"{what} slots x {num_free} layers {format_nbytes(need - base)}")
    return BudgetTooSmall(
        f"--memory-budget {format_nbytes(budget_nbytes)} is {format_nbytes(need - budget_nbytes)} short: "
        f"the smallest plan needs {format_nbytes(need)} ({' + '.join(parts)})"
    )


def _uniform(model: ModelMemory, free: list[int], avail: int, k: int) -> dict[int, int]:
    """The largest equal slot count (at least ``k``) that fits, then one more slot per layer
    from the first layer on while bytes remain."""
    e = model.num_experts
    per_slot = sum(model.nbytes_of(i) for i in free)
    c = max(k, min(e, avail // per_slot))
    alloc = {i: c for i in free}
    left = avail - c * per_slot
    for i in free:
        if alloc[i] < e and model.nbytes_of(i) <= left:
            alloc[i] += 1
            left -= model.nbytes_of(i)
    return alloc


_MAX_UNITS = 40_000


def _weighted(model: ModelMemory, free: list[int], avail: int, weights: list[float], k: int) -> dict[int, int]:
    """Slots in proportion to ``weights`` (bytes shared as lambda x weight x expert size),
    each within [k, num_experts]; the fractional remainders go, largest first, to the layers
    whose next slot still fits."""
    e = model.num_experts
    sizes = [model.nbytes_of(i) for i in free]
    w = np.maximum(np.asarray(weights, dtype=float), 1e-12)
    if not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite")

    def spent(lam: float) -> float:
        return float(sum(np.clip(lam * w, k, e) * sizes))

    lo, hi = 0.0, 1.0
    while spent(hi) < avail and hi < 1e300 and np.any(hi * w < e):
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) <= avail else (lo, mid)
    share = np.clip(lo * w, k, e)
    alloc = {i: int(math.floor(s + 1e-9)) for i, s in zip(free, share)}
    left = avail - sum(alloc[i] * b for i, b in zip(free, sizes))
    for j in sorted(range(len(free)), key=lambda j: (-(share[j] - math.floor(share[j] + 1e-9)), j)):
        i = free[j]
        if alloc[i] < e and sizes[j] <= left:
            alloc[i] += 1
            left -= sizes[j]
    return alloc


def _by_stats(model: ModelMemory, free: list[int], avail: int, stats: RoutingStats, k: int) -> dict[int, int]:
    """Slots per free layer minimising the estimated misses per step within ``avail`` bytes.

    A knapsack over byte units (the gcd of the layers' expert sizes, coarser when that gives
    too many units; costs are rounded up so the result always fits). Ties go to more slots.
    """
    e = model.num_experts
    sizes = [model.nbytes_of(i) for i in free]
    unit = 0
    for s in sizes:
        unit = math.gcd(unit, s)
    budget_units = avail // unit
    most = sum(e * s for s in sizes) // unit
    if min(budget_units, most) > _MAX_UNITS:
        unit = math.ceil(min(avail, sum(e * s for s in sizes)) / _MAX_UNITS)
        budget_units = avail // unit
    budget_units = int(min(budget_units, sum(math.ceil(e * s / unit) for s in sizes)))
    choices = np.arange(k, e + 1)
    best = np.zeros(budget_units + 1)
    picks = []
    for i, s in zip(free, sizes):
        w = np.array([math.ceil(c * s / unit) for c in choices])
        cost = np.array([stats.misses_per_step(i, int(c), pinned=c >= e) for c in choices])
        cost = cost - 1e-9 * choices  # ties: more slots
        new = np.full(budget_units + 1, np.inf)
        pick = np.zeros(budget_units + 1, dtype=np.int32)
        for j in range(len(choices)):
            if w[j] > budget_units:
                break
            cand = np.full(budget_units + 1, np.inf)
            cand[w[j]:] = best[: budget_units + 1 - w[j]] + cost[j]
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        best = new
        picks.append((pick, w))
    alloc: dict[int, int] = {}
    b = budget_units
    for i, (pick, w) in zip(reversed(free), reversed(picks)):
        j = int(pick[b])
        alloc[i] = int(choices[j])
        b -= int(w[j])
    return alloc
