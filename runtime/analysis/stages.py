"""Decode-speed estimates for a model split across several machines (pipeline parallel).

Owns the estimate of ``golem-run --pipeline`` on N machines joined by a link: each stage (a
run of decoder layers on one machine, rank 0 the last as in mlx-lm) is estimated as a model
of its own layers on its machine (``golem.runtime.analysis.estimate``: its placement, its
compute and its SSD reads), plus what crosses the link per token, and the split of the
layers that minimises the time per token. It runs nothing and reads no weights.

Per decoded token (one sequence) the stages run one after the other, so the time is the sum
of the stages' times, with the final norm and head counted once (every rank computes them,
at the same time), plus the link: one hidden state per boundary (N - 1 hops) and the
closing ``all_gather`` (N - 1 more), each ``latency + bytes / bandwidth``. The residual that
boundary prefetch sends travels while the sending stage still computes and is left out.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from golem.runtime.analysis.estimate import ChunkRouting, Estimate, Report, TraceReplay, estimate
from golem.runtime.analysis.machines import MachineSpec
from golem.runtime.analysis.model_size import ModelSpec, Quantization
from golem.runtime.analysis.placement import DoesNotFit
from golem.runtime.units import GB


@dataclass(frozen=True)
class Link:
    """The network between two neighbouring machines.

    Args:
        gb_per_s: bandwidth, GB/s.
        latency_s: one message's latency, seconds.
        activation_bytes: bytes per element of a hidden state on the wire (2: bfloat16).
    """

    gb_per_s: float
    latency_s: float = 50e-6
    activation_bytes: int = 2

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / (self.gb_per_s * GB)


def parse_link(spec: str) -> Link:
    """``"GB_PER_S[,LATENCY]"``: ``"5"``, ``"1.25,200us"``, ``"10,0.05ms"`` (a plain latency is seconds)."""
    parts = [p.strip() for p in str(spec).split(",")]
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"--link {spec}: expected GB_PER_S[,LATENCY], e.g. 5,50us")
    try:
        gbps = float(parts[0])
    except ValueError:
        raise ValueError(f"--link {spec}: bandwidth {parts[0]!r} is not a number of GB/s") from None
    if not (gbps > 0 and math.isfinite(gbps)):
        raise ValueError(f"--link {spec}: bandwidth must be a number > 0 GB/s")
    latency = 50e-6
    if len(parts) == 2:
        m = re.fullmatch(r"([0-9.eE+-]+)\s*(us|ms|s)?", parts[1])
        try:
            value = float(m.group(1)) if m else float("nan")
        except ValueError:
            value = float("nan")
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"--link {spec}: latency {parts[1]!r} is not a time (e.g. 50us, 0.2ms)")
        latency = value * {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}[m.group(2)]
    return Link(gbps, latency)


def hidden_size(model: ModelSpec) -> int:
    """The model's width (its routers are hidden x experts per MoE layer)."""
    return model.router_params // max(model.num_moe_layers * model.num_experts, 1)


def stage_model(model: ModelSpec, layers: range) -> ModelSpec:
    """The part of ``model`` one stage holds: its layers' weights (attention and dense MLPs
    in proportion to its layers, routers and shared experts to its MoE layers) plus the
    embeddings and head every stage keeps."""
    moe = tuple(l for l in model.moe_layers if l in layers)
    dense_total = model.num_layers - model.num_moe_layers
    dense_here = len(layers) - len(moe)
    share_moe = len(moe) / max(model.num_moe_layers, 1)
    return dataclasses.replace(
        model,
        name=f"{model.name} layers {layers.start}-{layers.stop - 1}",
        num_layers=len(layers),
        moe_layers=moe,
        attention_params=round(model.attention_params * len(layers) / model.num_layers),
        dense_mlp_params=round(model.dense_mlp_params * dense_here / dense_total) if dense_total else 0,
        shared_expert_params=round(model.shared_expert_params * share_moe),
        router_params=round(model.router_params * share_moe),
    )


@dataclass
class Stage:
    """One machine's share: its layers and their estimate (``report``: placement and both
    estimators; None when its layers hold no MoE layer, then ``time_s`` is its dense work)."""

    rank: int
    layers: range
    report: Optional[Report]
    time_s: float
    method: str


@dataclass
class PipelineEstimate:
    """Time per token of a model over several machines, by stage.

    Args:
        stages: by rank (rank 0 runs the last layers).
        split: layers per rank, in rank order.
        head_s: the final norm and head, counted once (every stage's estimate holds it).
        link_s: the hidden states between the stages and the closing all_gather.
        link: the link.
        notes: how the split was chosen.
    """

    stages: List[Stage]
    split: Tuple[int, ...]
    head_s: float
    link_s: float
    link: Link
    notes: list = field(default_factory=list)

    @property
    def time_s(self) -> float:
        return sum(s.time_s for s in self.stages) - (len(self.stages) - 1) * self.head_s + self.link_s

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.time_s if self.time_s > 0 else math.inf

    def describe(self) -> str:
        """The split and each stage's time, first layers first."""
        lines = [f"{'rank':>4} {'layers':>9} {'MoE':>4} {'slots':>8} {'compute ms':>10} {'memory ms':>9} "
                 f"{'SSD ms':>8} {'stage ms':>9}"]
        for s in sorted(self.stages, key=lambda s: s.layers.start):
            est = _best(s.report)
            slots = sum(s.report.placement.slots) if s.report is not None else 0
            lines.append(f"{s.rank:>4} {s.layers.start:>4}-{s.layers.stop - 1:<4} "
                         f"{len(s.report.model.moe_layers) if s.report else 0:>4} {slots:>8} "
                         f"{1e3 * est.compute_s if est else 0:>10.2f} {1e3 * est.memory_s if est else 0:>9.2f} "
                         f"{1e3 * est.ssd_s if est else 0:>8.2f} {1e3 * s.time_s:>9.2f}")
        lines.append(f"link: {len(self.stages) - 1} hops and an all_gather of the hidden state, "
                     f"{1e3 * self.link_s:.3f} ms/token ({self.link.gb_per_s:g} GB/s, "
                     f"{1e6 * self.link.latency_s:g} us); head counted once ({1e3 * self.head_s:.2f} ms)")
        lines.append(f"split (layers per rank, rank 0 first): {','.join(map(str, self.split))}; "
                     f"{1e3 * self.time_s:.2f} ms/token = {self.tokens_per_s:.2f} tokens/s")
        return "\n".join(lines + self.notes)

    def to_dict(self) -> dict:
        return {
            "machines": len(self.stages), "split": list(self.split), "time_s": self.time_s,
            "tokens_per_s": round(self.tokens_per_s, 4), "link_s": self.link_s, "head_s": self.head_s,
            "link": {"gb_per_s": self.link.gb_per_s, "latency_s": self.link.latency_s},
            "stages": [{"rank": s.rank, "layers": [s.layers.start, s.layers.stop - 1], "time_s": s.time_s,
                        "method": s.method,
                        "placement": s.report.placement.to_dict(s.report.model) if s.report else None}
                       for s in self.stages],
            "notes": list(self.notes),
        }


def _best(report: Optional[Report]) -> Optional[Estimate]:
    if report is None:
        return None
    return report.trace or report.chunk


def _head_seconds(model: ModelSpec, quant: Quantization, machine: MachineSpec) -> float:
    head = dataclasses.replace(model, attention_params=0, dense_mlp_params=0, shared_expert_params=0,
                               router_params=0, embedding_params=0)
    params = head.lm_head_params or model.embedding_params  # tied: the embedding table is the head
    nbytes = params * quant.non_expert_bpw / 8
    return machine.cache_tier.seconds(nbytes, 2 * params)


def link_seconds(model: ModelSpec, link: Link, machines: int) -> float:
    """Per token: N - 1 hops of the hidden state and a ring all_gather (N - 1 steps)."""
    nbytes = hidden_size(model) * link.activation_bytes
    return 2 * (machines - 1) * link.seconds(nbytes)


def estimate_split(model: ModelSpec, quant: Quantization, machines: Sequence[MachineSpec], split: Sequence[int],
                   link: Link, *, routing: Optional[ChunkRouting] = None, replay: Optional[TraceReplay] = None,
                   plan: str = "uniform", _cache: Optional[dict] = None) -> PipelineEstimate:
    """The estimate of one split (layers per rank, rank order) on ``machines`` (by rank)."""
    if len(split) != len(machines) or sum(split) != model.num_layers or min(split) < 1:
        raise ValueError(f"split {','.join(map(str, split))}: {len(machines)} ranks must share "
                         f"{model.num_layers} layers, each at least one")
    stages = []
    for rank in range(len(split)):
        start = sum(split[rank + 1:])
        layers = range(start, start + split[rank])
        key = (rank, layers.start, layers.stop)
        if _cache is not None and key in _cache:
            stages.append(_cache[key])
            continue
        stages.append(_stage(model, quant, machines[rank], rank, layers, routing, replay, plan))
        if _cache is not None:
            _cache[key] = stages[-1]
    head_s = _head_seconds(model, quant, machines[0])
    return PipelineEstimate(stages, tuple(split), head_s, link_seconds(model, link, len(split)), link)


def _stage(model, quant, machine, rank, layers, routing, replay, plan) -> Stage:
    sub = stage_model(model, layers)
    if not sub.moe_layers:  # dense layers only: resident, their weights over the tier's bandwidth
        nbytes = quant.active_non_expert_nbytes(sub)
        return Stage(rank, layers, None, machine.cache_tier.seconds(nbytes, 2 * sub.active_non_expert_params),
                     "dense")
    share = len(sub.moe_layers) / model.num_moe_layers
    stage_routing = dataclasses.replace(routing, u=routing.u * share, d=routing.d * share) if routing else None
    try:
        report = estimate(sub, quant, machine, routing=stage_routing, replay=replay, plan=plan)
    except DoesNotFit:
        return Stage(rank, layers, None, math.inf, "does not fit")
    est = _best(report)
    if est is None:
        raise ValueError("a pipeline estimate needs routing statistics: a trace, or --u and --d")
    return Stage(rank, layers, report, est.time_s, est.method)


def even_split(num_layers: int, machines: int) -> Tuple[int, ...]:
    """mlx-lm's split: the low ranks get the extra layers."""
    base, extra = divmod(num_layers, machines)
    return tuple(base + (1 if r < extra else 0) for r in range(machines))


def best_split(model: ModelSpec, quant: Quantization, machines: Sequence[MachineSpec], link: Link, *,
               routing: Optional[ChunkRouting] = None, replay: Optional[TraceReplay] = None,
               plan: str = "uniform", max_step: int = 8) -> PipelineEstimate:
    """The split with the least time per token found by moving the boundaries of mlx-lm's
    even split one at a time (steps of ``max_step`` layers down to 1) while the time falls:
    a local search, each stage estimated once per layer range."""
    cache: dict = {}
    n = len(machines)
    current = estimate_split(model, quant, machines, even_split(model.num_layers, n), link, routing=routing,
                             replay=replay, plan=plan, _cache=cache)
    even_s = current.time_s
    step = max_step
    while step >= 1:
        improved = False
        for b in range(n - 1):  # the boundary between ranks b and b + 1
            for delta in (step, -step):
                split = list(current.split)
                split[b] += delta
                split[b + 1] -= delta
                if min(split) < 1:
                    continue
                cand = estimate_split(model, quant, machines, split, link, routing=routing, replay=replay, plan=plan,
                                      _cache=cache)
                if cand.time_s < current.time_s - 1e-12:
                    current, improved = cand, True
        if not improved:
            step //= 2
    if math.isinf(current.time_s):
        raise DoesNotFit(f"{model.name} does not fit {n} machines at any split tried "
                         "(each needs room for the embeddings, the head and its layers' resident weights)")
    current.notes.append(f"best split found: {1e3 * current.time_s:.2f} ms/token; mlx-lm's even split "
                         f"{','.join(map(str, even_split(model.num_layers, n)))}: "
                         + (f"{1e3 * even_s:.2f} ms/token" if math.isfinite(even_s) else "does not fit"))
    return current
