"""How much of a model stays resident: from the sizing options (or the machine's memory) to a
memory plan, the cache size of each MoE layer, the I/O scheduler's staging buffers and a warm
start.

Owns measuring the machine's memory (Metal's recommended working set, free CUDA device memory,
available RAM) less a stated margin, every derived size (the cache size (slots) of each MoE
layer, the staging buffers and the speculative-read cap, computed here once), the memory plan
itself (``golem.runtime.memplan.plan_memory``), the warm start (random, from traces or a
profile, or the saved profile) and the one line that says what was chosen. Knows nothing of
slot pools, I/O or generation; ``golem.runtime.loader`` applies what it returns.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from golem.runtime.config import ConfigError, RuntimeConfig, check_given_cache_sizes, parse_nbytes, resolved_layers

log = logging.getLogger(__name__)
_NOTED_NO_PROFILE: set = set()  # profile files whose absence was noted (one warning each)

MACHINE_MARGIN = 0.10  # of the machine's memory, left for the KV cache, activations and everything else
MEMORY_LIMIT_ENV = "GOLEM_MEMORY_LIMIT"


@dataclass(frozen=True)
class MachineMemory:
    """Memory golem may size to: ``nbytes`` measured from ``source``."""

    nbytes: int
    source: str

    @property
    def budget_nbytes(self) -> int:
        return int(self.nbytes * (1.0 - MACHINE_MARGIN))


def machine_memory(limit: Optional[int] = None) -> MachineMemory:
    """The memory of the device MLX runs on: ``limit`` when given, else the
    ``GOLEM_MEMORY_LIMIT`` environment variable, else Metal's recommended working set, free
    CUDA device memory (total when MLX does not say), or the available RAM."""
    if limit is not None:
        return MachineMemory(int(limit), "memory_limit")
    env = os.environ.get(MEMORY_LIMIT_ENV)
    if env:
        return MachineMemory(parse_nbytes(env, MEMORY_LIMIT_ENV), MEMORY_LIMIT_ENV)
    import mlx.core as mx

    try:
        info = dict(mx.device_info())
    except Exception:  # older MLX, or a backend without device information
        info = {}
    if mx.metal.is_available():
        if not info and hasattr(mx.metal, "device_info"):  # MLX before mx.device_info
            info = dict(mx.metal.device_info())
        n = info.get("max_recommended_working_set_size") or info.get("memory_size")
        if n:
            return MachineMemory(int(n), "Metal recommended working set")
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        if info.get("free_memory"):
            return MachineMemory(int(info["free_memory"]), "free CUDA device memory")
        n = info.get("total_memory") or info.get("memory_size")
        if n:
            return MachineMemory(int(n), "CUDA device memory")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return MachineMemory(int(line.split()[1]) * 1024, "available RAM")
    except OSError:
        pass
    try:
        return MachineMemory(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available RAM")
    except (ValueError, OSError, AttributeError):
        return MachineMemory(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical RAM")


@dataclass(frozen=True)
class Staging:
    """The I/O scheduler's staging buffers and speculative-read caps, sized once.

    Args:
        num_buffers: staging buffers (see ``staging_buffers``).
        buffer_nbytes: bytes of each: the biggest expert of any MoE layer.
        speculative_nbytes: most prefetch bytes being read at once (None: no prefetch).
        speculative_s: the same cap in seconds of measured throughput (None: none).
    """

    num_buffers: int
    buffer_nbytes: int
    speculative_nbytes: Optional[int] = None
    speculative_s: Optional[float] = None

    @property
    def nbytes(self) -> int:
        return self.num_buffers * self.buffer_nbytes


@dataclass
class Sizing:
    """What the sizing options chose for one model.

    Args:
        cache_sizes: the cache size (slots) of each MoE layer's pool, by the model's layer
            number, at most the layer's expert count.
        staging: the I/O scheduler's staging buffers and speculative caps.
        plan: the memory plan (``golem.runtime.memplan.MemoryPlan``; None when ``cache_sizes``
            were given outright).
        warm: experts to load before the first token, by layer number (None: none).
        note: one line saying what was chosen and why (None when flags fixed every layer).
    """

    cache_sizes: Dict[int, int]
    staging: Staging
    plan: object = None
    warm: Optional[Dict[int, list]] = None
    note: Optional[str] = None


def profile_dir(model_path) -> Path:
    """Where ``save_profile`` keeps ``model_path``'s profile (and ``warm_start='saved'`` finds it)."""
    from golem.runtime.profiles import profile_dir_for

    return profile_dir_for(model_path)


def load_warm_profile(config: RuntimeConfig, model_path):
    """The profile ``config.warm_start`` names (None for none or a random seed).

    ``"saved"`` before any profile was saved for the model (a first run) is no error: the
    caches start empty and one warning says so, once per process and profile (``plan`` and
    then ``load`` of one model, as golem-chat and golem-server do, note it once)."""
    ws = config.warm_start
    if ws is None or not isinstance(ws, (str, os.PathLike)):
        return None
    from golem.runtime.profiles import load_saved_profile, load_warm_source, profile_path

    if str(ws) == "saved":
        folder = profile_dir(model_path)
        profile = load_saved_profile(folder)
        if profile is None and (where := profile_path(folder)) not in _NOTED_NO_PROFILE:
            _NOTED_NO_PROFILE.add(where)
            hint = ("this run saves one" if config.save_profile else
                    "save_profile=True (golem-run --save-profile) saves one")
            log.warning("warm start 'saved': no profile saved for this model yet (%s), so the expert "
                        "caches start empty; %s", where, hint)
        return profile
    return load_warm_source(ws)


def staging_buffers(top_k: int, depth: int) -> int:
    """Staging buffers of the I/O scheduler: room for a token's demand reads and ``depth``
    layers of prefetch, twice over (one set landing while the other is installed)."""
    return max(4, 2 * top_k * (depth + 1) + 2)


def staging_for(config: RuntimeConfig, memory) -> Staging:
    """The staging buffers and speculative caps of ``config`` on a model of ``memory``
    (``golem.runtime.memplan.ModelMemory``)."""
    depth = config.prefetch.depth if config.prefetch is not None else 0
    biggest = max(memory.nbytes_of(i) for i in range(memory.num_layers))
    spec = spec_s = None
    if config.prefetch is not None:
        spec = config.prefetch.speculative_nbytes or 2 * depth * memory.top_k * biggest
        ms = config.prefetch.speculative_ms
        spec_s = None if ms is None else ms / 1000
    return Staging(staging_buffers(memory.top_k, depth), biggest, spec, spec_s)


def reserve_nbytes(memory, depth: int) -> int:
    """Bytes of the I/O scheduler's staging buffers (see ``staging_buffers``)."""
    return staging_buffers(memory.top_k, depth) * max(memory.nbytes_of(i) for i in range(memory.num_layers))


def size_model(config: RuntimeConfig, opened, *, profile=None) -> Sizing:
    """The cache size of each MoE layer, the memory plan and the warm start for ``opened``
    (a ``golem.runtime.checkpoint.OpenedCheckpoint``) under ``config``."""
    memory = opened.memory()
    moe = memory.ids
    e = memory.num_experts
    if profile is not None:
        profile.check_shape(memory.num_layers, e, where=str(config.warm_start))
    staging = staging_for(config, memory)
    if config.cache_sizes is not None:
        given = config.cache_sizes(opened) if callable(config.cache_sizes) else config.cache_sizes
        cache_sizes = check_given_cache_sizes(given, moe_layers=moe, num_experts=e, top_k=memory.top_k)
        return Sizing(cache_sizes, staging, None, _warm(config, profile, memory, [cache_sizes[l] for l in moe], [
            i for i, l in enumerate(moe) if cache_sizes[l] >= e]), None)

    from golem.runtime.memplan import RoutingStats, plan_memory
    from golem.runtime.units import format_nbytes

    pins, overrides = resolved_layers(config, opened.num_layers)
    budget = config.memory_budget
    machine = None
    if config.sizes_to_machine:
        machine = machine_memory(config.memory_limit)
        budget = machine.budget_nbytes
    stats = None
    if profile is not None:
        if budget is not None and (profile.stack_hist is not None or profile.curves):
            stats = RoutingStats.from_profile(profile, policy=config.policy, source=str(config.warm_start))
    options = dict(cache_size=config.cache_size, overrides=overrides, pin_layers=pins, stats=stats)
    try:
        plan = plan_memory(memory, budget_nbytes=budget, **options)
        if budget is not None and not all(lp.pinned for lp in plan.layers):
            # Experts will stream: the scheduler's staging buffers come out of the budget too.
            plan = plan_memory(memory, budget_nbytes=budget, reserve_nbytes=staging.nbytes,
                             **options)
    except ValueError as err:
        if machine is None:
            raise ConfigError(str(err)) from None
        raise ConfigError(
            f"this machine's memory ({format_nbytes(machine.nbytes)} {machine.source}, "
            f"{format_nbytes(budget)} after a {MACHINE_MARGIN:.0%} margin) is too small: "
            f"{str(err).split(': ', 1)[-1]}; give -c/--cache-size or --memory-budget to run anyway"
        ) from None
    cache_sizes = {lp.layer_id: min(lp.cache_size, e) for lp in plan.layers}
    pinned = plan.pinned_positions
    note = None
    if budget is not None:
        where = (f"sized to this machine: {format_nbytes(machine.nbytes)} {machine.source} less a "
                 f"{MACHINE_MARGIN:.0%} margin = {format_nbytes(budget)}" if machine is not None
                 else f"--memory-budget {format_nbytes(budget)}")
        everything = memory.non_expert_nbytes + memory.all_experts_nbytes
        if len(pinned) == memory.num_layers:
            what = f"the model ({format_nbytes(everything)}) fits: every expert resident"
        else:
            what = (f"the model ({format_nbytes(everything)}) does not fit: {plan_summary(plan)}, "
                    "the other experts stream from disk")
        note = f"{where}; {what}"
    return Sizing(cache_sizes, staging, plan, _warm(config, profile, memory, plan.cache_sizes, pinned), note)


def plan_summary(plan) -> str:
    """``"2 of 8 MoE layers pinned, 96 of 256 expert slots (1.23 GB in all)"``."""
    from golem.runtime.units import format_nbytes

    m = plan.model
    slots = sum(plan.cache_sizes)
    return (f"{len(plan.pinned_positions)} of {m.num_layers} MoE layers pinned, {slots} of "
            f"{m.num_layers * m.num_experts} expert slots ({format_nbytes(plan.total_nbytes)} in all)")


def _warm(config: RuntimeConfig, profile, memory, cache_sizes: List[int], pinned: List[int]):
    """Experts to load first, by the model's layer number (``cache_sizes`` and ``pinned``
    speak of MoE layer positions)."""
    by_pos = None
    if profile is not None:
        by_pos = profile.warm_start(list(cache_sizes), pinned)
    elif config.warm_random is not None:
        from golem.runtime.profiles import random_warm_start

        by_pos = random_warm_start(config.warm_random, memory.num_layers, memory.num_experts,
                                   list(cache_sizes), pinned)
    if by_pos is None:
        return None
    return {memory.ids[pos]: experts for pos, experts in by_pos.items()}
