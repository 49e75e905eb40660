"""Loading what stays resident, with progress: the non-expert weights (mlx-lm's lazily
loaded arrays, evaluated), the experts of fully resident layers, and the warm start's experts.

Owns the grouping of those reads for a progress callback (``Progress``), which is called on
the loading thread. Knows nothing of how pools are sized or built.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

Progress = Callable[[str, int, int], None]  # (stage, done_nbytes, total_nbytes)
EVAL_CHUNK_NBYTES = 64 << 20  # resident weights evaluated in groups of this size when progress is drawn


def load_resident(model, engine, pools, progress: Optional[Progress]) -> None:
    """Read the resident weights (the non-expert ones: the pools are zeros until filled) and
    the experts of fully resident layers; with ``progress``, in groups, reporting bytes."""
    if progress is None:
        mx.eval(model.parameters())
        for layer, pool in pools.items():
            if pool.fully_resident:
                engine.preload(layer, range(pool.num_experts))
        return
    arrays = [a for _, a in tree_flatten(model.parameters())]
    full = [l for l, p in pools.items() if p.fully_resident]
    total = sum(a.nbytes for a in arrays) + sum(pools[l].expert_nbytes * pools[l].num_experts for l in full)
    done = 0
    progress("loading", 0, total)
    batch, size = [], 0
    for a in arrays + [None]:
        if a is not None:
            batch.append(a)
            size += a.nbytes
        if batch and (a is None or size >= EVAL_CHUNK_NBYTES):
            mx.eval(batch)  # one sync per 64 MB at load time, none per token
            done += size
            progress("loading", done, total)
            batch, size = [], 0
    for layer in full:
        pool = pools[layer]
        engine.preload(layer, range(pool.num_experts))
        done += pool.expert_nbytes * pool.num_experts
        progress("loading", done, total)


def warm_start(engine, pools, warm: dict, progress: Optional[Progress]) -> None:
    """``engine.warm(warm)``, a layer at a time when ``progress`` reports its bytes."""
    if progress is None:
        engine.warm(warm)
        return
    sizes = {l: pools[l].expert_nbytes * min(len(e), pools[l].cache_size) for l, e in warm.items()
             if l in pools and not pools[l].fully_resident}
    total, done = sum(sizes.values()), 0
    progress("warm start", 0, total)
    for layer, experts in warm.items():
        engine.warm({layer: experts})
        done += sizes.get(layer, 0)
        progress("warm start", done, total)
