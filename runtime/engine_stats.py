"""The decode engine's counters: host syncs, calls, misses, early launches, and host time by phase.

Owns ``EngineStats``, the totals the engine keeps while it runs and what they mean per decode
miss and per partial layer. Knows nothing of how they are gathered (``golem.runtime.engine``)
nor how they are shown (``golem.runtime.report``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from golem.runtime.phases import PhaseTimes
from golem.runtime.slots import LayerStats


@dataclass
class EngineStats:
    """Totals over all layers, plus host syncs (reads of device values by the host).

    Host time of the engine while decoding, in layers that are not fully resident, is split
    by phase in ``phases`` (wall and thread CPU seconds, see ``golem.runtime.phases``). The
    ``decode_*_s`` properties are its wall-time sums: ``decode_sync_s`` in the host syncs,
    ``decode_read_s`` waiting on reads, ``decode_write_s`` putting experts into slots (the
    upload), ``decode_engine_s`` everything else (of which ``decode_miss_s`` handling the
    demand reads of misses: requests, results, buffers).
    """

    host_syncs: int = 0
    forward_calls: int = 0
    tokens: int = 0
    decode_steps: int = 0
    decode_host_syncs: int = 0
    decode_misses: int = 0  # demand reads while decoding (prefill's are left out)
    early_layers: int = 0  # decode layers whose experts were launched before their host sync
    early_redone: int = 0  # routed experts those layers computed again (not resident at launch)
    phases: PhaseTimes = field(default_factory=PhaseTimes)
    layers: Dict[int, LayerStats] = field(default_factory=dict)

    @property
    def decode_partial_layers(self) -> int:
        """Layer calls with a host sync while decoding."""
        return self.phases.layers

    @property
    def decode_read_s(self) -> float:
        return self.phases.wall_s["wait"]

    @property
    def decode_write_s(self) -> float:
        return self.phases.wall_s["write"]

    @property
    def decode_sync_s(self) -> float:
        return self.phases.wall_s["sync"]

    @property
    def decode_engine_s(self) -> float:
        return self.phases.engine_s()

    @property
    def decode_miss_s(self) -> float:
        return self.phases.wall_s["request"]

    def total(self) -> LayerStats:
        t = LayerStats()
        for s in self.layers.values():
            t.cache_size += s.cache_size
            t.hits += s.hits
            t.misses += s.misses
            t.prefetch_hits += s.prefetch_hits
            t.bytes_read += s.bytes_read
            t.read_s += s.read_s
            t.evictions += s.evictions
        return t

    def host_us(self) -> Dict[str, float]:
        """Engine host microseconds per decode miss and per decode layer with a host sync
        (wall time; ``cpu_per_layer_us``: the engine thread's CPU time)."""
        layers = max(self.decode_partial_layers, 1)
        misses = max(self.decode_misses, 1)
        return {
            "per_miss_us": 1e6 * self.decode_miss_s / misses,
            "per_layer_us": 1e6 * self.decode_engine_s / layers,
            "cpu_per_layer_us": 1e6 * self.phases.engine_s(cpu=True) / layers,
            "cpu_per_miss_us": 1e6 * self.phases.cpu_s["request"] / misses,
            "sync_per_layer_us": 1e6 * self.decode_sync_s / layers,
            "write_per_miss_us": 1e6 * self.decode_write_s / misses,
        }
