"""A lost rank ends every rank: golem's own links between the ranks, watched by a thread."""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

from golem.runtime.pipeline.collectives import gather, lost_message, peer_errors
from golem.runtime.pipeline.split import Pipeline


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
