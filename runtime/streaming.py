"""A layer call routed to more distinct experts than its pool holds: computed group by group.

Owns the one case where a call (a long prompt chunk over a small cache) needs more of a
layer's experts than it has slots: the experts go through the pool a slot-load at a time,
each group evaluated before the next overwrites slots, so a layer never holds two copies of
its pool. Knows the pool and the experts module; the loading of a group is the caller's.
"""

from __future__ import annotations

from typing import Callable, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from golem.runtime.slots import SlotPool


def stream_groups(pool: SlotPool, glu: nn.Module, x: mx.array, ids: np.ndarray, needed: list,
                  ensure: Callable[[SlotPool, list], None]) -> Tuple[mx.array, int]:
    """The experts module's output for routing ``ids`` (``needed``: its distinct experts,
    more than ``pool`` has slots), and the host syncs it took (one per group).

    The resident experts go first (no read), then the missing ones; ``ensure(pool, group)``
    makes a group resident. The last group stays resident.
    """
    *lead, k = ids.shape
    flat = ids.reshape(-1)
    x2 = x.reshape(-1, x.shape[-1])
    resident = [e for e in needed if pool.is_resident(e)]
    missing = [e for e in needed if not pool.is_resident(e)]
    order = resident + missing
    outputs, rows_all = [], []
    for start in range(0, len(order), pool.cache_size):
        group = sorted(order[start : start + pool.cache_size])
        ensure(pool, group)
        rows = np.flatnonzero(np.isin(flat, group))
        xs = x2[mx.array(rows // k)]
        slots = pool.slots(flat[rows])
        y = glu(xs, mx.array(slots)[:, None])[:, 0, :]
        mx.eval(y)
        outputs.append(y)
        rows_all.append(rows)
    inverse = np.argsort(np.concatenate(rows_all))
    y = mx.concatenate(outputs, axis=0)[mx.array(inverse)]
    return y.reshape(*lead, k, y.shape[-1]), len(outputs)
