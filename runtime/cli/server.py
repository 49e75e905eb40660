"""golem-server: ``mlx_lm.server`` (the same OpenAI-compatible HTTP API, streaming, batching
and prompt cache, with the same flags) serving a golem model, plus golem's runtime flags
(expert cache, memory budget, prefetch, storage, traces).

Knows nothing of HTTP: mlx-lm's main runs unchanged with golem's loader. The draft model
(``--draft-model``) is dense and small, so it loads with stock mlx-lm. SIGTERM stops the
server as Ctrl-C does, so the model is closed (and ``--trace-out`` written) either way, and
the process then exits at once (see ``_end_process``).
"""

from __future__ import annotations

import signal
import sys
from typing import Optional

PROG = "golem-server"
DESCRIPTION = ("Serve an MoE model whose experts stream from disk over mlx_lm.server's "
               "OpenAI-compatible HTTP API (every mlx_lm.server flag works; golem's own flags follow).")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[list] = None) -> int:
    from mlx_lm import server

    from golem.runtime.cli.stock import GolemLoads, check_model, run_stock_main

    def on_args(args, config):
        check_model(args, config)
        return GolemLoads(config, dense=[args.draft_model])

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_stock_main(server, PROG, DESCRIPTION, on_args, argv)
        code = 0
    except (ValueError, FileNotFoundError) as e:  # ModelError, CheckpointError, ConfigError
        print(f"{PROG}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before serving began
        code = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    _end_process(code)


def _end_process(code: int) -> None:
    """Exit now, skipping the interpreter's teardown: after mlx_lm.server has stopped, MLX's
    C++ teardown can abort ("terminate called without an active exception"; stock
    mlx_lm.server does so on most Ctrl-Cs). golem's model is closed by then (trace and
    profile written); only output buffers are left to flush."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
