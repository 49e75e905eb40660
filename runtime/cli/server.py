"""golem-server: ``mlx_lm.server`` (the same OpenAI-compatible HTTP API, streaming, batching
and prompt cache, with the same flags) serving a golem model, plus golem's runtime flags
(expert cache, memory budget, prefetch, storage, traces).

mlx-lm's main runs with golem's loader, its ``ModelProvider`` held to the one model given
(``golem.runtime.cli.serving``), and its ``run`` replaced by ``serve``: the port is bound
before the model loads, and the HTTP side is golem's handler (``/metrics``, checked request
bodies, clients that leave stop their generation). The draft model (``--draft-model``) is
dense and small, so it loads with stock mlx-lm. SIGTERM and SIGHUP stop the server as
Ctrl-C does, so the model is closed (and ``--trace-out`` written) either way, and the
process then exits at once (see ``_end_process``).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Callable, Optional

PROG = "golem-server"
DESCRIPTION = ("Serve an MoE model whose experts stream from disk over mlx_lm.server's "
               "OpenAI-compatible HTTP API (every mlx_lm.server flag works; golem's own flags follow). "
               "GET /metrics gives the expert cache's figures in the Prometheus text format.")
STOP_SIGNALS = ("SIGTERM", "SIGHUP")


class _Stopping:
    """The first SIGTERM or SIGHUP ends serving (as Ctrl-C); later ones are ignored while
    the model closes and writes what it keeps."""

    def __init__(self):
        self.signalled = False

    def __call__(self, signum, frame):
        if not self.signalled:
            self.signalled = True
            raise KeyboardInterrupt


class GolemServer:
    """One golem-server run: the listening socket (bound at ``listen``, before the model
    loads), then ``serve`` for mlx-lm's main.

    Args:
        on_ready: called with this object once it serves (tests).
    """

    def __init__(self, on_ready: Optional[Callable[["GolemServer"], None]] = None):
        self.on_ready = on_ready
        self.httpd = None
        self.state = None
        self.loads = None
        self.response_generator = None
        self.load_failed: Optional[str] = None

    def listen(self, host: str, port: int, max_handlers: int) -> None:
        from golem.runtime.cli.serving import GolemHTTPServer

        if not 0 <= port <= 65535:
            raise ValueError(f"--port {port}: a port is a number in [0, 65535]")
        try:
            self.httpd = GolemHTTPServer((host, port), max_handlers=max_handlers)
        except OSError as e:  # busy port, unknown host, no permission (socket.gaierror included)
            raise ValueError(f"--host {host} --port {port}: cannot listen there "
                             f"({e.strerror or e})") from None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def serve(self, host: str, port: int, model_provider) -> None:
        """mlx_lm.server's ``run`` (same arguments), on the socket ``listen`` bound."""
        from mlx_lm import server

        from golem.runtime.cli.serving import make_handler, make_response_generator

        prompt_cache = server.LRUPromptCache(model_provider.cli_args.prompt_cache_size)
        generator = make_response_generator(server.ResponseGenerator, self.state)
        self.response_generator = rg = generator(model_provider, prompt_cache)
        if self.httpd is None:  # a pipeline rank other than 0: it follows rank 0's generation
            rg.join()
            return
        handler = make_handler(server.APIHandler, self.state)
        fingerprint = server.get_system_fingerprint()
        self.httpd.handler_factory = lambda *args, **kwargs: handler(rg, *args, system_fingerprint=fingerprint,
                                                                     **kwargs)
        logging.info(f"Starting httpd at {host} on port {self.port}...")
        try:
            if self.on_ready is not None:
                self.on_ready(self)
            self.httpd.serve_forever(poll_interval=0.1)
        except KeyboardInterrupt:
            pass
        finally:
            self.httpd.server_close()
            rg.stop_and_join()

    def stop(self) -> None:
        """End ``serve`` from another thread (tests; signals end it in the main thread)."""
        self.httpd.shutdown()


def main(argv: Optional[list] = None) -> int:
    _end_process(serve_main(argv))


def serve_main(argv: Optional[list] = None, on_ready=None) -> int:
    """golem-server without the process exit: returns its exit status (tests run it in a
    thread, with ``on_ready`` receiving the ``GolemServer``)."""
    import mlx.core as mx
    from mlx_lm import server

    from golem.io.read_errors import ReadError
    from golem.runtime.cli.serving import ServerState, make_model_provider
    from golem.runtime.cli.stock import GolemLoads, check_model, run_stock_main

    run = GolemServer(on_ready)
    stock_provider = server.ModelProvider

    def on_args(args, config):
        if mx.distributed.init().rank() == 0:  # under mlx.launch --pipeline, rank 0 serves
            run.listen(args.host, args.port, max_handlers=max(64, 2 * args.decode_concurrency))
        check_model(args, config)
        run.state = ServerState(args.model, args.adapter_path, args.draft_model)
        run.loads = GolemLoads(config, dense=[args.draft_model])
        return run.loads

    def provider(cli_args):
        cls = make_model_provider(stock_provider, run.state)

        class Loading(cls):
            def load_default(self):
                try:
                    super().load_default()
                except Exception as e:  # a model that passed check_model and still fails to load
                    run.load_failed = str(e).splitlines()[0] if str(e) else type(e).__name__
                    logging.error(f"{PROG}: cannot load {cli_args.model}: {run.load_failed}")
                    import _thread

                    _thread.interrupt_main()  # serving a model that is not there helps no one

        return Loading(cli_args)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        stopping = _Stopping()
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                handlers[name] = signal.signal(getattr(signal, name), stopping)
    try:
        run_stock_main(server, PROG, DESCRIPTION, on_args, argv,
                       replace={"run": run.serve, "ModelProvider": provider})
        code = 1 if run.load_failed else 0
    except (ValueError, FileNotFoundError) as e:  # ModelError, CheckpointError, ConfigError
        print(f"{PROG}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        code = 2
    except ReadError as e:
        print(f"{PROG}: read failed: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # before serving began
        code = 1 if run.load_failed else 130
    finally:
        for name, previous in handlers.items():
            signal.signal(getattr(signal, name), previous)
        if run.httpd is not None:
            run.httpd.server_close()
    return code


def _end_process(code: int) -> None:
    """Exit now, skipping the interpreter's teardown: after mlx_lm.server has stopped, MLX's
    C++ teardown can abort ("terminate called without an active exception"; stock
    mlx_lm.server does so on most Ctrl-Cs). golem's model is closed by then (trace and
    profile written); only output buffers are left to flush."""
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
