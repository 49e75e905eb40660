"""The collectives golem adds to mlx-lm's in a pipeline, and a lost rank as one error.

Owns the group (``init_group``), waiting for generation's queued work before a collective of
golem's (``settle``), the barrier after loading, the common seed, gathering whole numbers
from every rank, rank 0's standard output alone, and MLX's connection errors turned into
one line. Every rank must make the same collective calls in the same order.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional, Sequence

import mlx.core as mx

from golem.runtime.pipeline.split import Pipeline


class PeerLostError(RuntimeError):
    """Another rank of the pipeline failed or was killed; this rank stops too."""


def init_group(backend: str = "any"):
    """The ``mx.distributed`` group of this process (a group of one when not launched by
    ``mlx.launch``)."""
    return mx.distributed.init(backend=backend)


def settle() -> None:
    """Wait for the work already queued on the streams that generation uses: a decode loop
    leaves the next step's collectives in flight (``mx.async_eval``), and a collective of
    golem's must not overtake them (the ranks would pair different messages)."""
    mx.synchronize()
    try:
        from mlx_lm.generate import generation_stream
    except ImportError:
        return
    mx.synchronize(generation_stream)


def barrier(pipeline: Pipeline) -> None:
    """Every rank reaches this point (after loading: a rank that failed to load ends the rest)."""
    with peer_errors(pipeline):
        settle()
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=pipeline.group, stream=mx.cpu))


def common_seed(pipeline: Pipeline, seed: Optional[int]) -> int:
    """Rank 0's seed (``seed``, or a random one), on every rank: sampling must draw the same
    tokens everywhere, since every rank computes the same logits and feeds its token back."""
    import numpy as np

    mine = (seed if seed is not None else int.from_bytes(os.urandom(4), "little")) if pipeline.rank == 0 else 0
    with peer_errors(pipeline):
        settle()
        total = mx.distributed.all_sum(mx.array(np.array([mine], np.int64)), group=pipeline.group, stream=mx.cpu)
        return int(total.item())  # once per run, before generating


def gather(pipeline: Pipeline, values: Sequence[int]):
    """Whole numbers ``values`` of every rank, as a ``(size, len(values))`` int64 numpy array
    (one collective; every rank must call it with as many values). Integers: MLX holds no
    float64 on every backend, and byte counts outgrow float32."""
    import numpy as np

    row = mx.array(np.asarray(values, np.int64)[None, :])
    with peer_errors(pipeline):
        settle()
        return np.array(mx.distributed.all_gather(row, group=pipeline.group, stream=mx.cpu))


def is_peer_loss(exc: BaseException) -> bool:
    """Whether ``exc`` is MLX's report that a connection to another rank broke."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "[ring]" in text or "peer" in text or "[jaccl]" in text or "[nccl]" in text or "[mpi]" in text)


@contextlib.contextmanager
def peer_errors(pipeline: Optional[Pipeline]) -> Iterator[None]:
    """MLX's connection errors as one ``PeerLostError`` naming this rank."""
    try:
        yield
    except RuntimeError as e:
        if pipeline is None or not is_peer_loss(e) or isinstance(e, PeerLostError):
            raise
        raise PeerLostError(lost_message(pipeline.rank, pipeline.size, e)) from None


def lost_message(rank: int, size: int, exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"rank {rank} of {size}: lost the connection to another rank, which failed or "
            f"was killed ({detail}); every rank stops")


@contextlib.contextmanager
def rank_zero_stdout(pipeline: Optional[Pipeline]) -> Iterator[None]:
    """Standard output of ranks other than 0 goes nowhere (errors still reach stderr)."""
    if pipeline is None or pipeline.rank == 0:
        yield
        return
    saved = sys.stdout
    with open(os.devnull, "w") as null:
        sys.stdout = null
        try:
            yield
        finally:
            sys.stdout = saved


def peer_lost_line(exc: BaseException) -> str:
    """The one line a command prints when MLX reports a lost rank (``is_peer_loss``)."""
    if isinstance(exc, PeerLostError):
        return str(exc)
    group = init_group()
    return lost_message(group.rank(), group.size(), exc)
