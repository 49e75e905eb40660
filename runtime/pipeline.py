"""Pipeline parallelism on ``mx.distributed``: which decoder layers each rank runs.

Owns the split of a model's layers between the ranks of a group (mlx-lm's even split, an
explicit one, or one balancing the layers' bytes), applying it to a lazily loaded model
through the family's own ``pipeline`` (so each rank reads only its layers' tensors), which
checkpoint tensors a rank owns, per-rank values (``--memory-budget 8GB,16GB``), the
collectives golem adds to mlx-lm's (a common seed, a barrier, gathered statistics), and
turning a lost peer into one clear error. Knows nothing of slots, reads or the engine.

As in mlx-lm, rank 0 runs the LAST layers and the highest rank the first; every rank keeps
the embeddings, the final norm and the head, and every rank must drive the same calls
(prompt, prefill chunks, tokens) in the same order, or the run deadlocks.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

LAYER_OF_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.")
SPLIT_MODES = ("even", "bytes")


class PipelineError(ValueError):
    """A pipeline option or model that cannot be split; the message names the flag or model."""


class PeerLostError(RuntimeError):
    """Another rank of the pipeline failed or was killed; this rank stops too."""


@dataclass(frozen=True)
class PipelineConfig:
    """How to split a model across ranks; ``load(..., pipeline=...)`` takes one (or its
    ``split`` alone).

    Args:
        split: ``"even"`` (mlx-lm's split: rank 0 the last layers), ``"bytes"`` (balance the
            layers' bytes), or layers per rank in rank order (``(10, 14)``).
        boundary_prefetch: send each rank's last residual to the next rank, which guesses
            and reads its first layers' experts early (with a prefetch depth).
    """

    split: Union[str, Tuple[int, ...]] = "even"
    boundary_prefetch: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "split", parse_split(self.split))


def pipeline_config(spec) -> PipelineConfig:
    """``spec`` as a ``PipelineConfig`` (``True``, a split, or one already)."""
    return spec if isinstance(spec, PipelineConfig) else PipelineConfig(split=parse_split(spec))


@dataclass(frozen=True)
class Pipeline:
    """This process's place in a pipeline-parallel run.

    Args:
        group: the ``mx.distributed`` group (one rank per stage).
        split: decoder layers of each rank, in rank order (rank 0 runs the last ones).
        num_layers: decoder layers of the whole model.
        backend: the distributed backend's name, for messages.
    """

    group: Any
    split: Tuple[int, ...]
    num_layers: int
    backend: str = "ring"
    config: PipelineConfig = field(default_factory=lambda: PipelineConfig())

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    def layers_of(self, rank: int) -> range:
        """Decoder layers rank ``rank`` runs."""
        start = sum(self.split[rank + 1:])
        return range(start, start + self.split[rank])

    @property
    def layers(self) -> range:
        return self.layers_of(self.rank)

    def owns_layer(self, layer: int) -> bool:
        return layer in self.layers

    def owns_tensor(self, name: str) -> bool:
        """Whether this rank loads checkpoint tensor ``name``: its layers' tensors and every
        tensor outside the layers (embeddings, final norm, head)."""
        m = LAYER_OF_TENSOR.search(name)
        return m is None or self.owns_layer(int(m.group(1)))

    def describe_rank(self, rank: Optional[int] = None) -> str:
        """This rank's (or ``rank``'s) layers as ``"0-1"``."""
        return _range_text(self.layers_of(self.rank if rank is None else rank))

    def describe(self) -> str:
        """``"2 ranks (ring): rank 1 layers 0-1, rank 0 layers 2-3"``, first layers first."""
        parts = [f"rank {r} layers {_range_text(self.layers_of(r))}" for r in reversed(range(self.size))]
        return f"{self.size} ranks ({self.backend}): " + ", ".join(parts)


def _range_text(r: range) -> str:
    return f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start)


def parse_split(spec) -> Union[str, Tuple[int, ...]]:
    """``--pipeline``'s value: ``True``/``"even"`` (mlx-lm's split), ``"bytes"`` (balance the
    layers' bytes), or layers per rank in rank order (``"10,14"``, ``[10, 14]``)."""
    if isinstance(spec, PipelineConfig):
        return spec.split
    if spec is True or spec is None or spec == "" or spec == "even":
        return "even"
    if isinstance(spec, str):
        if spec in SPLIT_MODES:
            return spec
        try:
            spec = [int(s) for s in spec.split(",")]
        except ValueError:
            raise PipelineError(f"--pipeline {spec}: expected 'even', 'bytes' or layers per rank in rank order "
                                "(e.g. 10,14: rank 0 runs the last 10 layers)") from None
    try:
        split = tuple(int(s) for s in spec)
    except (TypeError, ValueError):
        raise PipelineError(f"--pipeline {spec!r}: expected 'even', 'bytes' or a list of layers per rank") from None
    if any(s < 1 for s in split) or any(int(s) != s for s in spec):
        raise PipelineError(f"--pipeline {','.join(map(str, spec))}: every rank needs a whole number >= 1 of layers")
    return split


def plan_split(spec, num_layers: int, size: int, layer_nbytes: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
    """Layers per rank (rank order) for ``size`` ranks.

    Args:
        spec: what ``parse_split`` takes.
        num_layers: decoder layers of the model.
        size: ranks in the group.
        layer_nbytes: bytes of each decoder layer (needed by ``"bytes"``).
    """
    mode = parse_split(spec)
    if size > num_layers:
        raise PipelineError(f"--pipeline: {size} ranks for a model of {num_layers} layers; "
                            "every rank needs at least one layer")
    if mode == "even":  # mlx-lm's own split: the low ranks get the extra layers
        base, extra = divmod(num_layers, size)
        return tuple(base + (1 if r < extra else 0) for r in range(size))
    if mode == "bytes":
        if layer_nbytes is None or len(layer_nbytes) != num_layers:
            raise PipelineError("--pipeline bytes: the checkpoint's layer sizes are unknown")
        parts = balanced_partition(layer_nbytes, size)  # first layers first
        return tuple(reversed(parts))
    if len(mode) != size:
        raise PipelineError(f"--pipeline {','.join(map(str, mode))}: {len(mode)} entries for {size} ranks")
    if sum(mode) != num_layers:
        raise PipelineError(f"--pipeline {','.join(map(str, mode))}: the layers add up to {sum(mode)}, "
                            f"the model has {num_layers}")
    return mode


def balanced_partition(weights: Sequence[float], parts: int) -> List[int]:
    """Sizes of ``parts`` contiguous, non-empty runs of ``weights`` whose largest sum is the
    smallest possible (ties: the earliest runs longest). Exact, O(parts * n^2)."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    inf = float("inf")
    # best[p][i]: the smallest largest-sum splitting weights[:i] into p runs; cut[p][i]: where the last begins.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n - (parts - p) + 1):
            for j in range(p - 1, i):
                cost = max(best[p - 1][j], prefix[i] - prefix[j])
                if cost < best[p][i]:
                    best[p][i], cut[p][i] = cost, j
    sizes, i = [], n
    for p in range(parts, 0, -1):
        j = cut[p][i]
        sizes.append(i - j)
        i = j
    return list(reversed(sizes))


def layer_nbytes(tensors: Any, num_layers: int) -> List[int]:
    """Bytes of each decoder layer, from ``{name: info with .nbytes}`` (a ``SafetensorsIndex``'s
    ``tensors``); tensors outside the layers are left out (every rank holds them)."""
    out = [0] * num_layers
    for name, info in tensors.items():
        m = LAYER_OF_TENSOR.search(name)
        if m is not None and int(m.group(1)) < num_layers:
            out[int(m.group(1))] += info.nbytes
    return out


def supports_pipeline(model) -> bool:
    return hasattr(getattr(model, "model", None), "pipeline")


def init_group(backend: str = "any"):
    """The ``mx.distributed`` group of this process (a group of one when not launched by
    ``mlx.launch``)."""
    return mx.distributed.init(backend=backend)


def apply(model, spec, *, group=None, tensors=None, model_type: Optional[str] = None) -> Pipeline:
    """Split ``model`` (loaded lazily, nothing evaluated) across ``group``'s ranks with the
    family's own ``model.model.pipeline``: this rank keeps only its layers.

    Args:
        model: an mlx-lm model loaded with ``lazy=True``.
        spec: the split (see ``parse_split``).
        group: the distributed group (default: ``init_group()``).
        tensors: ``{name: info}`` of the checkpoint, for a split by bytes.
        model_type: for messages.
    """
    options = pipeline_config(spec)
    mode = options.split
    if not supports_pipeline(model):
        from golem.runtime.synthetic import FAMILIES

        families = [f for f in FAMILIES if _family_has_pipeline(f)]
        raise PipelineError(f"--pipeline: model_type {model_type!r} has no pipeline split in mlx-lm "
                            f"(families with one: {', '.join(families)}); run it on one machine")
    group = group if group is not None else init_group()
    inner = model.model
    num_layers = len(inner.layers)
    sizes = layer_nbytes(tensors, num_layers) if mode == "bytes" and tensors is not None else None
    split = plan_split(mode, num_layers, group.size(), sizes)
    inner.pipeline(group, list(split))
    return Pipeline(group, split, num_layers, backend=_backend_name(), config=options)


def _family_has_pipeline(family: str) -> bool:
    """Whether mlx-lm's module of ``family`` builds its layers with ``PipelineMixin``."""
    import importlib

    import mlx_lm.utils

    name = getattr(mlx_lm.utils, "MODEL_REMAPPING", {}).get(family, family)
    try:
        return hasattr(importlib.import_module(f"mlx_lm.models.{name}"), "PipelineMixin")
    except ImportError:
        return False


def _backend_name() -> str:
    """The backend ``mlx.launch`` set up, from the environment it leaves."""
    env = os.environ
    if "MLX_JACCL_COORDINATOR" in env or "MLX_IBV_DEVICES" in env:
        return "jaccl"
    if "MLX_HOSTFILE" in env:
        return "ring"
    if "MLX_WORLD_SIZE" in env:
        return "nccl"
    if any(k.startswith("OMPI_") for k in env):
        return "mpi"
    return "distributed"


def per_rank(value, rank: int, size: int, flag: str):
    """A per-rank option: ``"8GB,16GB"`` gives rank 0 ``8GB`` and rank 1 ``16GB``; a single
    value is every rank's."""
    if not isinstance(value, str) or "," not in value:
        return value
    items = [v.strip() for v in value.split(",")]
    if len(items) != size:
        raise PipelineError(f"{flag} {value}: {len(items)} values for {size} ranks (give one, or one per rank)")
    return items[rank]


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


def local_config(config, pipeline: Pipeline, moe_layers: Sequence[int]):
    """``config`` as this rank applies it: layer options (pins, cache-size overrides, slots
    by layer) keep this rank's layers, and the prefetch depth stops at its last MoE layer
    (the next rank's layers are the next rank's to prefetch). Options naming no layer of
    this rank are dropped here, after the whole model was checked against them."""
    import dataclasses
    from collections.abc import Mapping

    from golem.runtime.config import resolved_layers

    pins, overrides = resolved_layers(config, pipeline.num_layers)
    mine = set(moe_layers)
    changes = {}
    if config.pin_layers is not None:
        changes["pin_layers"] = [l for l in pins if l in mine] or None
    if config.cache_size_overrides:
        changes["cache_size_overrides"] = tuple((kept, n) for layers, n in overrides
                                                if (kept := [l for l in layers if l in mine]))
    if isinstance(config.capacities, Mapping):
        changes["capacities"] = {l: n for l, n in config.capacities.items() if l in mine}
    if config.prefetch is not None and config.prefetch.depth > len(moe_layers):
        changes["prefetch"] = dataclasses.replace(config.prefetch, depth=len(moe_layers))
    return dataclasses.replace(config, **changes) if changes else config


# -- statistics of every rank, gathered on every rank --------------------------------------
RANK_FIELDS = ("first_layer", "last_layer", "moe_layers", "slots", "hits", "misses", "bytes_read", "decode_steps",
               "stall_us", "resident_nbytes", "budget_nbytes", "pf_true", "pf_predicted", "pf_issued", "pf_useful",
               "pf_wasted", "first_true", "first_predicted")


def rank_statistics(runtime) -> dict:
    """This rank's counters (``RANK_FIELDS``) from an ``OffloadedModel``."""
    engine, pipeline = runtime.engine, runtime.pipeline
    stats, t = engine.stats, engine.stats.total()
    layers = pipeline.layers if pipeline is not None else range(0, max(engine.pools) + 1)
    resident = runtime.non_expert_nbytes + sum(p.capacity * runtime.index.expert_nbytes(l)
                                              for l, p in engine.pools.items())
    budget = runtime.options.memory_budget if runtime.options is not None else None
    row = dict(first_layer=layers.start, last_layer=layers.stop - 1, moe_layers=len(engine.pools), slots=t.capacity,
               hits=t.hits, misses=t.misses, bytes_read=t.bytes_read, decode_steps=stats.decode_steps,
               stall_us=round(1e6 * stats.decode_read_s), resident_nbytes=resident, budget_nbytes=budget or 0)
    pf = engine.prefetcher
    p = pf.totals() if pf is not None else None
    first = pf.stats[min(engine.pools)] if pf is not None else None
    row.update(pf_true=p.true if p else 0, pf_predicted=p.predicted_true if p else 0, pf_issued=p.issued if p else 0,
               pf_useful=p.useful if p else 0, pf_wasted=p.wasted if p else 0,
               first_true=first.true if first else 0, first_predicted=first.predicted_true if first else 0)
    return row


def gather_statistics(runtime) -> List[dict]:
    """Every rank's ``rank_statistics``, by rank (a collective: every rank calls it, once,
    after generating). Without a pipeline: this process's alone."""
    row = rank_statistics(runtime)
    if runtime.pipeline is None or runtime.pipeline.size == 1:
        return [row]
    table = gather(runtime.pipeline, [row[f] for f in RANK_FIELDS])
    return [{f: int(v) for f, v in zip(RANK_FIELDS, r)} for r in table]


def format_rank_table(rows: Sequence[dict]) -> str:
    """The gathered statistics, a column per rank and a total."""
    def recall(t, p):
        return f"{100 * p / t:.1f}%" if t else "-"

    def col(r):
        steps = max(r["decode_steps"], 1)
        req = r["hits"] + r["misses"]
        return [
            f"{r['first_layer']}-{r['last_layer']}" if r["last_layer"] > r["first_layer"] else str(r["first_layer"]),
            str(r["moe_layers"]), str(r["slots"]),
            f"{100 * r['hits'] / req:.1f}%" if req else "-", str(r["misses"]), f"{r['bytes_read'] / 1e6:.2f}",
            f"{r['stall_us'] / 1000 / steps:.2f}", f"{r['resident_nbytes'] / 1e6:.2f}",
            f"{r['budget_nbytes'] / 1e6:.2f}" if r["budget_nbytes"] else "-",
            recall(r["pf_true"], r["pf_predicted"]), recall(r["first_true"], r["first_predicted"]),
            str(r["pf_issued"]), str(r["pf_useful"]), str(r["pf_wasted"]),
        ]

    names = ["layers", "MoE layers", "slots", "hit rate", "misses", "MB read", "stall ms/token", "resident MB",
             "budget MB", "pf recall", "pf recall, 1st layer", "pf issued", "pf useful", "pf wasted"]
    total = {f: sum(r[f] for r in rows) for f in RANK_FIELDS}
    total.update(first_layer=min(r["first_layer"] for r in rows), last_layer=max(r["last_layer"] for r in rows),
                 decode_steps=max(r["decode_steps"] for r in rows))
    cols = [col(r) for r in rows] + [col(total)]
    cols[-1][10] = "-"  # the first layer of a rank has no total
    heads = [f"rank {i}" for i in range(len(rows))] + ["all"]
    w0 = max(len(n) for n in names)
    widths = [max(len(h), *(len(c) for c in cc)) for h, cc in zip(heads, cols)]
    lines = [f"{'':<{w0}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths))]
    for i, n in enumerate(names):
        lines.append(f"{n:<{w0}}  " + "  ".join(f"{c[i]:>{w}}" for c, w in zip(cols, widths)))
    return "\n".join(lines)


def peer_lost_line(exc: BaseException) -> str:
    """The one line a command prints when MLX reports a lost rank (``is_peer_loss``)."""
    if isinstance(exc, PeerLostError):
        return str(exc)
    group = init_group()
    return lost_message(group.rank(), group.size(), exc)


# -- ranks on this machine (tests, benchmarks) ----------------------------------------------
def free_ports(n: int) -> List[int]:
    """``n`` TCP ports of localhost nobody listens on now (as ``mlx.launch --starting-port``
    would use them, but not necessarily consecutive)."""
    import socket

    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def launch_local(n: int, argv: Sequence[str], *, hostfile_dir, env: Optional[dict] = None, **popen):
    """Start ``argv`` as ``n`` ranks of a ring over localhost, as ``mlx.launch --backend ring
    -n N`` does (one process per rank; ``MLX_RANK`` and ``MLX_HOSTFILE`` set); returns the
    ``subprocess.Popen`` of each rank, by rank. The caller waits for them (with a timeout).

    Args:
        n: ranks.
        argv: the command, its interpreter named (``[sys.executable, "script.py"]``).
        hostfile_dir: folder for the hostfile.
        env: the ranks' environment (default: this process's).
        **popen: passed to ``subprocess.Popen`` (``stdout=subprocess.PIPE`` ...).
    """
    import json
    import subprocess
    from pathlib import Path

    hostfile = Path(hostfile_dir) / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    base = dict(os.environ if env is None else env)
    procs = []
    try:
        for rank in range(n):
            procs.append(subprocess.Popen(list(argv), env={**base, "MLX_RANK": str(rank),
                                                           "MLX_HOSTFILE": str(hostfile)}, **popen))
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return procs


# -- prefetch across the boundary between two ranks -----------------------------------------
class Boundary:
    """Prefetch across pipeline ranks: the rank before sends the residual its last MoE layer
    saw, the rank after guesses its first layers' experts from it and reads them while the
    rank before is still computing.

    Decode steps only (both ranks tell them apart alike: one token per call). The sending
    rank adds one ``send`` of the last token's residual (float32, ``(1, D)``) to the host
    sync its last MoE layer already makes; the receiving rank, when its step starts (before
    its own layers can run, since they wait for the hidden state), receives it, evaluates
    the predictor's guesses (one host sync, which waits only for that early message) and
    issues the reads. The residual travels before the hidden state on the same link, and
    both ranks evaluate the two in that order, so the messages pair up.

    Args:
        pipeline: this rank's place.
        send_to: the rank after this one (that runs the next layers) when it wants the
            residual, else None.
        recv_from: the rank before this one when it sends, else None.
        last_layer: this rank's last MoE layer (where the residual is sent from).
    """

    def __init__(self, pipeline: Pipeline, *, send_to: Optional[int], recv_from: Optional[int], last_layer: int):
        self.pipeline = pipeline
        self.send_to = send_to
        self.recv_from = recv_from
        self.last_layer = last_layer
        self.received = 0
        self.sent = 0

    def outgoing(self, engine, layer: int, x: mx.array) -> list:
        """Arrays the layer's host sync evaluates: the send, at this rank's last MoE layer."""
        if self.send_to is None or layer != self.last_layer:
            return []
        h = engine.hidden(layer, x)
        row = h.reshape(-1, h.shape[-1])[-1:].astype(mx.float32)
        self.sent += 1
        return [mx.distributed.send(row, self.send_to, group=self.pipeline.group)]

    def incoming(self, engine, x: mx.array) -> None:
        """At this rank's first MoE layer of a decode step: receive, guess, request reads."""
        if self.recv_from is None:
            return
        h = mx.distributed.recv((1, x.shape[-1]), mx.float32, self.recv_from, group=self.pipeline.group)
        pf = engine.prefetcher
        proposals = pf.propose_boundary(h) if pf is not None else []
        # The one extra host sync of a receiving rank's step: it waits for the residual alone
        # (sent at the previous rank's last MoE layer), not for this rank's layers.
        mx.eval([h, *(a for p in proposals for a in p.arrays)])
        engine.stats.host_syncs += 1
        engine.stats.decode_host_syncs += 1
        self.received += 1
        if proposals:
            pf.issue_boundary(proposals, engine._resident)


def connect_boundaries(pipeline: Pipeline, engine, *, can_send: bool) -> Optional[Boundary]:
    """Agree with the neighbours which boundaries carry a residual (a collective: every rank
    calls it once, after building its engine) and attach a ``Boundary`` to ``engine``.

    A rank receives when it has a previous rank and a prefetcher with work for its first
    layers; a rank sends when it can (``can_send``: its residual is tapped) and the next
    rank receives.
    """
    if pipeline.size == 1 or not pipeline.config.boundary_prefetch:
        return None  # every rank has the same options: none exchanges a residual
    pf = engine.prefetcher
    wants = int(pf is not None and pf.config.depth > 0 and pipeline.rank < pipeline.size - 1
                and any(pf.wanted[:pf.config.depth]))
    flags = gather(pipeline, [wants, int(can_send)])
    r = pipeline.rank
    send_to = r - 1 if r > 0 and flags[r - 1][0] and can_send else None
    recv_from = r + 1 if wants and flags[r + 1][1] else None
    if send_to is None and recv_from is None:
        return None
    boundary = Boundary(pipeline, send_to=send_to, recv_from=recv_from, last_layer=max(engine.pools))
    engine.boundary = boundary
    if recv_from is not None:
        pf.wrap = False
    return boundary


# -- a lost rank ends every rank -------------------------------------------------------------
GOODBYE = b"done"


class Watchdog:
    """Ends this process when another rank's process ends without saying goodbye.

    MLX reports a lost peer only to a rank that is talking to it at that moment; a rank
    blocked on another link (or in a send the ring backend never fails) can wait forever.
    So every rank also holds one TCP connection of its own to every other rank (addresses
    from the ring's hostfile, ports exchanged through the group) and a thread that waits
    on them: when one closes (a process that dies, killed or failed, has its sockets closed
    by the operating system) it prints one line naming the lost rank and exits with status
    1 at once (``os._exit``: the main thread may be blocked inside MLX). A rank that ends
    normally sends a goodbye first, and the others let it go. TCP keepalive (a few seconds)
    covers a machine that vanishes without closing anything.

    Args:
        pipeline: this rank's place.
        hosts: the IP address of every rank, by rank.
        prog: the program name that starts the line printed (``golem-run``).
    """

    def __init__(self, pipeline: Pipeline, hosts: Sequence[str], prog: str):
        import socket
        import threading

        self.pipeline, self.prog = pipeline, prog
        rank, size = pipeline.rank, pipeline.size
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((hosts[rank], 0))
        listener.listen(size)
        ports = gather(pipeline, [listener.getsockname()[1]])[:, 0]
        self.peers = {}
        try:
            for r in range(rank + 1, size):  # connect up, accept from below
                s = socket.create_connection((hosts[r], int(ports[r])), timeout=30)
                s.sendall(rank.to_bytes(4, "little"))
                self.peers[r] = s
            listener.settimeout(30)
            while len(self.peers) < size - 1:
                s, _ = listener.accept()
                s.settimeout(30)
                self.peers[int.from_bytes(_recv_exactly(s, 4), "little")] = s
        finally:
            listener.close()
        for s in self.peers.values():
            s.settimeout(None)
            _keepalive(s)
        self.finished = set()
        self._closing = False
        self._thread = threading.Thread(target=self._watch, name="golem-pipeline-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import select

        live = dict(self.peers)
        while live and not self._closing:
            ready, _, _ = select.select(list(live.values()), [], [], 0.5)
            for s in ready:
                r = next(k for k, v in live.items() if v is s)
                try:
                    data = s.recv(16)
                except OSError:
                    data = b""
                if data.startswith(GOODBYE):
                    self.finished.add(r)
                    del live[r]
                    continue
                if self._closing:
                    return
                self._lost(r)

    def _lost(self, r: int) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed stdout: the line below still goes to stderr
                pass
        line = lost_message(self.pipeline.rank, self.pipeline.size, f"rank {r} ended without finishing")
        os.write(2, f"{self.prog}: error: {line}\n".encode())
        os._exit(1)

    def close(self, *, failed: bool = False) -> None:
        """Stop watching; unless ``failed``, tell the other ranks this one finished normally
        (a failed rank's silence ends the others)."""
        self._closing = True
        for s in self.peers.values():
            try:
                if not failed:
                    s.sendall(GOODBYE)
            except OSError:
                pass
        if failed:
            for s in self.peers.values():
                s.close()


def _recv_exactly(s, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("a rank closed its connection while the pipeline started")
        data += chunk
    return data


def _keepalive(s) -> None:
    import socket

    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            s.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def ring_hosts() -> Optional[List[str]]:
    """Every rank's IP address from the ring backend's hostfile (``MLX_HOSTFILE``), or None."""
    import json

    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return None
    try:
        with open(path) as f:
            hosts = json.load(f)
        return [h[0].rsplit(":", 1)[0] for h in hosts]
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError):
        return None


def start_watchdog(pipeline: Pipeline, prog: Optional[str] = None) -> Optional[Watchdog]:
    """A ``Watchdog`` for this rank (a collective), or None with one rank or without a ring
    hostfile to find the others by."""
    if pipeline.size == 1:
        return None
    hosts = ring_hosts()
    if hosts is None or len(hosts) != pipeline.size:
        return None
    with peer_errors(pipeline):
        return Watchdog(pipeline, hosts, prog or os.path.basename(sys.argv[0]) or "golem")
