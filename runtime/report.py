"""Expert statistics of a loaded model, as one snapshot: what every command shows.

Owns reading the runtime's counters (the engine's ``EngineStats``, each slot pool's
``LayerStats``, the prefetcher's per-layer counters) into frozen ``ExpertStats``, the
"reset" (a baseline that later snapshots are taken against: the engine's counters are never
written here), and the plain renderings shared by golem-run, golem-chat and golem-server
(a dict for JSON, Prometheus text). Knows nothing of HTTP, prompts or printing.

A snapshot may be taken from any thread while another decodes: each counter is read once;
counters of different layers may then be a token apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, Iterable, List, Optional, Tuple

# Counters that only grow (a reset subtracts them); everything else is a level.
_LAYER_COUNTERS = ("hits", "misses", "bytes_read", "stall_s", "evictions", "prefetch_issued",
                   "prefetch_useful", "prefetch_wasted", "prefetch_late", "prefetch_useful_nbytes",
                   "prefetch_wasted_nbytes", "prefetch_true", "prefetch_predicted_true")
_ENGINE_COUNTERS = ("tokens", "forward_calls", "decode_steps", "host_syncs", "decode_host_syncs",
                    "decode_misses", "decode_stall_s")


@dataclass(frozen=True)
class LayerExpertStats:
    """One MoE layer's expert figures (or their sum over layers, ``layer`` None).

    Args:
        layer: the decoder layer number of the checkpoint (None for the total).
        slots: expert slots of the layer (every expert when fully resident).
        resident: experts in a slot now.
        resident_nbytes: bytes of those experts; ``slot_nbytes`` is what the slots hold
            allocated (``slots`` x one expert's bytes).
        hits, misses: routed experts found in a slot, and read on demand.
        bytes_read: expert bytes read from storage (demand reads and prefetches).
        stall_s: seconds the engine waited on reads of this layer.
        evictions: experts evicted from a slot.
        prefetch_issued, prefetch_useful, prefetch_wasted, prefetch_late: prefetch reads
            issued; used before eviction; evicted or dropped unused; landed too late
            (``prefetch_useful_nbytes``, ``prefetch_wasted_nbytes``: the bytes of the first two).
        prefetch_true, prefetch_predicted_true: experts the layer used, and how many of
            them the predictor had guessed (``recall`` is their ratio).
        prefetch_on: whether prefetch for this layer is on (it switches off when recall is poor).
    """

    layer: Optional[int]
    slots: int = 0
    resident: int = 0
    resident_nbytes: int = 0
    slot_nbytes: int = 0
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_useful: int = 0
    prefetch_wasted: int = 0
    prefetch_late: int = 0
    prefetch_useful_nbytes: int = 0
    prefetch_wasted_nbytes: int = 0
    prefetch_true: int = 0
    prefetch_predicted_true: int = 0
    prefetch_on: bool = False

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """Hits over requests (1.0 when nothing was requested, as ``LayerStats``)."""
        return self.hits / self.requests if self.requests else 1.0

    @property
    def recall(self) -> float:
        """Of the experts this layer used, the share the predictor had guessed."""
        return self.prefetch_predicted_true / self.prefetch_true if self.prefetch_true else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(requests=self.requests, hit_rate=self.hit_rate, recall=self.recall)
        return out


@dataclass(frozen=True)
class ExpertStats:
    """The expert figures of a loaded model since it loaded (or since ``reset_stats``).

    Args:
        layers: per MoE layer, in layer order.
        total: the sum over layers (``recall`` and ``hit_rate`` of the sums).
        tokens, forward_calls: tokens the engine ran (prompt and generated), and model calls.
        decode_steps: decode steps (one generated token each, per sequence batch).
        host_syncs, decode_host_syncs: host reads of device values, all and while decoding.
        decode_misses: demand reads while decoding.
        decode_stall_s: seconds decoding waited on reads.
        prefetch: whether speculative prefetch runs at all (``--prefetch-depth`` >= 1).
        all_resident: every expert of every layer is in memory (nothing is read while generating).
    """

    layers: Tuple[LayerExpertStats, ...]
    total: LayerExpertStats
    tokens: int = 0
    forward_calls: int = 0
    decode_steps: int = 0
    host_syncs: int = 0
    decode_host_syncs: int = 0
    decode_misses: int = 0
    decode_stall_s: float = 0.0
    prefetch: bool = False
    all_resident: bool = False

    def layer(self, layer: int) -> LayerExpertStats:
        for s in self.layers:
            if s.layer == layer:
                return s
        raise KeyError(f"layer {layer} is not an MoE layer of this model "
                       f"(MoE layers: {[s.layer for s in self.layers]})")

    @property
    def stall_ms_per_token(self) -> float:
        return 1000 * self.decode_stall_s / max(self.decode_steps, 1)

    @property
    def host_syncs_per_token(self) -> float:
        return self.decode_host_syncs / max(self.decode_steps, 1)

    def as_dict(self) -> dict:
        """Plain types only (``json.dumps`` takes it): the totals, then ``layers``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("layers", "total")}
        out.update(stall_ms_per_token=self.stall_ms_per_token, host_syncs_per_token=self.host_syncs_per_token)
        out["total"] = self.total.as_dict()
        out["layers"] = [s.as_dict() for s in self.layers]
        return out

    def minus(self, before: "ExpertStats") -> "ExpertStats":
        """The counters since ``before`` (an earlier snapshot of the same model); levels
        (slots, residency, prefetch on/off) are this snapshot's."""
        prior = {s.layer: s for s in before.layers}
        layers = tuple(_minus(s, prior.get(s.layer)) for s in self.layers)
        engine = {name: getattr(self, name) - getattr(before, name) for name in _ENGINE_COUNTERS}
        return replace(self, layers=layers, total=_sum(layers), **engine)


def _minus(now: LayerExpertStats, before: Optional[LayerExpertStats]) -> LayerExpertStats:
    if before is None:
        return now
    return replace(now, **{name: getattr(now, name) - getattr(before, name) for name in _LAYER_COUNTERS})


def _sum(layers: Iterable[LayerExpertStats]) -> LayerExpertStats:
    layers = list(layers)
    sums = {name: sum(getattr(s, name) for s in layers)
            for name in ("slots", "resident", "resident_nbytes", "slot_nbytes", *_LAYER_COUNTERS)}
    return LayerExpertStats(layer=None, prefetch_on=any(s.prefetch_on for s in layers), **sums)


def snapshot(runtime) -> ExpertStats:
    """The counters of ``runtime`` (an ``OffloadedModel``: ``model.golem``) since it loaded."""
    engine = runtime.engine
    prefetcher = engine.prefetcher
    layers: List[LayerExpertStats] = []
    for layer, pool in sorted(engine.pools.items()):
        s = engine.stats.layers.get(layer, pool.stats)
        expert_nbytes = pool.expert_nbytes
        resident = pool.cache_size if pool.fully_resident else int((pool.expert_in >= 0).sum())
        pf = {}
        p = prefetcher.stats.get(layer) if prefetcher is not None else None
        if p is not None:
            pf = dict(prefetch_issued=p.issued, prefetch_useful=p.useful, prefetch_wasted=p.wasted,
                      prefetch_late=p.late, prefetch_useful_nbytes=p.useful_nbytes,
                      prefetch_wasted_nbytes=p.wasted_nbytes, prefetch_true=p.true, prefetch_predicted_true=p.predicted_true,
                      prefetch_on=bool(p.enabled))
        layers.append(LayerExpertStats(
            layer=layer, slots=pool.cache_size, resident=resident, resident_nbytes=resident * expert_nbytes,
            slot_nbytes=pool.cache_size * expert_nbytes, hits=s.hits, misses=s.misses, bytes_read=s.bytes_read,
            stall_s=s.read_s, evictions=s.evictions, **pf))
    st = engine.stats
    return ExpertStats(
        layers=tuple(layers), total=_sum(layers), tokens=st.tokens, forward_calls=st.forward_calls,
        decode_steps=st.decode_steps, host_syncs=st.host_syncs, decode_host_syncs=st.decode_host_syncs,
        decode_misses=st.decode_misses, decode_stall_s=st.decode_read_s, prefetch=prefetcher is not None,
        all_resident=all(p.fully_resident for p in engine.pools.values()))


_BASELINE = "_golem_stats_baseline"


def stats(runtime) -> ExpertStats:
    """The expert figures of ``runtime`` since it loaded, or since the last ``reset_stats``."""
    now = snapshot(runtime)
    before = getattr(runtime, _BASELINE, None)
    return now if before is None else now.minus(before)


def reset_stats(runtime) -> None:
    """Count from zero again for ``stats`` (the engine's own counters keep running: the
    trace, the profile and the prefetcher's recall switch still see the whole run)."""
    setattr(runtime, _BASELINE, snapshot(runtime))


# -- renderings --------------------------------------------------------------------------

def summary(s: ExpertStats, num_experts: int) -> str:
    """golem-run's statistics lines (``Experts: ...``, and ``Prefetch: ...`` when it runs)."""
    if s.all_resident:
        return (f"Experts: all resident ({len(s.layers)} MoE layers x {num_experts} experts, "
                "read once at load), nothing read while generating")
    t = s.total
    gb = t.bytes_read / 1e9
    gbps = gb / t.stall_s if t.stall_s > 0 else 0.0
    line = (f"Experts: hit rate {100 * t.hit_rate:.1f}% of {t.requests} requests, "
            f"{t.misses} read ({gb:.3f} GB, {gbps:.2f} GB/s), "
            f"stall {s.stall_ms_per_token:.2f} ms/token, host syncs {s.host_syncs_per_token:.1f}/token")
    if s.prefetch:
        line += (f"\nPrefetch: recall {100 * t.recall:.1f}%, {t.prefetch_issued} issued, "
                 f"useful {t.prefetch_useful} ({t.prefetch_useful_nbytes / 1e9:.3f} GB), "
                 f"wasted {t.prefetch_wasted} ({t.prefetch_wasted_nbytes / 1e9:.3f} GB), late {t.prefetch_late}")
    return line


def layer_table(s: ExpertStats, num_experts: int) -> str:
    """One row per MoE layer: slots, hits, misses, hit rate, MB read (and prefetch columns)."""
    e = num_experts
    width = len(f"{e} of {e}")
    head = f"{'layer':>5} {'slots':>{width}} {'hits':>8} {'misses':>8} {'hit rate':>8} {'MB read':>9}"
    if s.prefetch:
        head += f" {'pf recall':>9} {'useful':>7} {'wasted':>7} {'late':>5} {'prefetch':>8}"
    rows = [head]
    for r in s.layers:
        rate = f"{100 * r.hit_rate:>7.1f}%" if r.requests else f"{'-':>8}"
        row = (f"{r.layer:>5} {f'{r.slots} of {e}':>{width}} {r.hits:>8} {r.misses:>8} {rate} "
               f"{r.bytes_read / 1e6:>9.2f}")
        if s.prefetch:
            row += (f" {100 * r.recall:>8.1f}% {r.prefetch_useful:>7} {r.prefetch_wasted:>7} "
                    f"{r.prefetch_late:>5} {'on' if r.prefetch_on else 'off':>8}")
        rows.append(row)
    return "\n".join(rows)


def one_line(s: ExpertStats) -> str:
    """The figures of a request or a chat turn on one line (the server's log)."""
    t = s.total
    line = (f"experts: {t.hits} hits, {t.misses} misses ({100 * t.hit_rate:.1f}% hit rate), "
            f"{t.bytes_read / 1e6:.2f} MB read, stall {t.stall_s:.3f} s")
    if s.prefetch:
        line += (f", prefetch {t.prefetch_issued} issued / {t.prefetch_useful} useful / "
                 f"{t.prefetch_wasted} wasted, recall {100 * t.recall:.1f}%")
    return line


# (metric name, help, LayerExpertStats attribute, type)
_PROM_LAYER = (
    ("expert_hits", "Routed experts found resident in a slot.", "hits", "counter"),
    ("expert_misses", "Routed experts read from storage on demand.", "misses", "counter"),
    ("expert_read_bytes", "Expert bytes read from storage (demand reads and prefetches).", "bytes_read", "counter"),
    ("expert_stall_seconds", "Seconds the engine waited on expert reads.", "stall_s", "counter"),
    ("expert_evictions", "Experts evicted from a slot.", "evictions", "counter"),
    ("prefetch_issued", "Speculative expert reads issued.", "prefetch_issued", "counter"),
    ("prefetch_useful", "Prefetched experts used before eviction.", "prefetch_useful", "counter"),
    ("prefetch_wasted", "Prefetched experts evicted or dropped unused.", "prefetch_wasted", "counter"),
    ("prefetch_late", "Prefetches that landed after the expert was needed.", "prefetch_late", "counter"),
    ("prefetch_recall", "Share of the routed experts the predictor had guessed.", "recall", "gauge"),
    ("expert_slots", "Expert slots.", "slots", "gauge"),
    ("expert_resident", "Experts resident in a slot.", "resident", "gauge"),
    ("expert_resident_bytes", "Bytes of the experts resident in a slot.", "resident_nbytes", "gauge"),
    ("expert_slot_bytes", "Bytes the expert slots hold allocated.", "slot_nbytes", "gauge"),
)
_PROM_ENGINE = (
    ("tokens", "Tokens run through the model (prompt and generated).", "tokens", "counter"),
    ("decode_steps", "Decode steps.", "decode_steps", "counter"),
    ("decode_stall_seconds", "Seconds decoding waited on expert reads.", "decode_stall_s", "counter"),
    ("host_syncs", "Host reads of device values by the engine.", "host_syncs", "counter"),
)


def _number(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def prometheus(s: ExpertStats, prefix: str = "golem_") -> str:
    """Prometheus text exposition (format 0.0.4) of ``s``: each figure as a total
    (``golem_expert_hits_total``) and per layer (``golem_layer_expert_hits_total{layer="3"}``,
    the checkpoint's decoder layer numbers). Prefetch figures only when prefetch runs."""
    lines: List[str] = []

    def family(name: str, help_: str, kind: str, samples: List[Tuple[str, object]]) -> None:
        full = f"{prefix}{name}_total" if kind == "counter" else f"{prefix}{name}"
        lines.append(f"# HELP {full} {help_}")
        lines.append(f"# TYPE {full} {kind}")
        lines.extend(f"{full}{labels} {_number(v)}" for labels, v in samples)

    for name, help_, attr, kind in _PROM_ENGINE:
        family(name, help_, kind, [("", getattr(s, attr))])
    for name, help_, attr, kind in _PROM_LAYER:
        if name.startswith("prefetch") and not s.prefetch:
            continue
        family(name, help_ + " All MoE layers.", kind, [("", getattr(s.total, attr))])
        family(f"layer_{name}", help_ + " Per MoE layer.", kind,
               [(f'{{layer="{r.layer}"}}', getattr(r, attr)) for r in s.layers])
    return "\n".join(lines) + "\n"


def parse_prometheus(text: str) -> Dict[str, float]:
    """``{"name{labels}": value}`` of Prometheus text (comments skipped); for tests and scripts."""
    out: Dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out
