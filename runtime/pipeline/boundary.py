"""Prefetch across the boundary between two pipeline ranks (the engine's ``boundary``)."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from golem.runtime.pipeline.collectives import gather
from golem.runtime.pipeline.split import Pipeline


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
