"""Ranks of a ring on this machine, started as ``mlx.launch --backend ring -n N`` does
(tests and benchmarks)."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence


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
