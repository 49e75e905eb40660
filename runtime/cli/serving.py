"""golem-server's HTTP side, over mlx-lm's: the listening socket, the request handler and
the one model it serves.

Owns what golem adds to ``mlx_lm.server``: the socket bound before the model loads (a busy
port is one line, not a loaded model and a hang), a deep listen backlog and a bounded pool
of handler threads (a burst of clients waits in the backlog instead of being refused),
request bodies checked before they reach the generation thread
(``golem.runtime.cli.server_requests``), a generation that stops when its client goes, the
``/metrics`` endpoint (Prometheus text of ``golem.runtime.report``), ``/v1/models`` without a
Hugging Face cache folder, and one log line per request with its expert figures. Prompts,
sampling, batching, streaming and response shapes stay mlx-lm's.
"""

from __future__ import annotations

import io
import json
import logging
import select
import socket
import sys
import threading
import time
import weakref
from collections import Counter
from queue import Empty, Queue
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

from golem.runtime.cli.server_requests import BadRequest, check_request

BACKLOG = 1024  # connections the kernel queues while every handler thread is busy
MAX_BODY_BYTES = 64 << 20
IO_TIMEOUT_S = 300.0  # one socket read or write of a handler (not the generation, which has no limit)
POST_PATHS = ("/v1/completions", "/v1/chat/completions", "/chat/completions")
DEFAULT_MODEL = "default_model"  # mlx_lm.server's name for the model given by --model
MAX_RESTARTS = 5  # generation thread failures within RESTART_WINDOW_S before giving up
RESTART_WINDOW_S = 60.0


class ClientGone(ConnectionError):
    """The client closed its connection while its request was running."""


class UnknownModel(ValueError):
    """A request named a model this server does not serve."""


class GenerationFailed(RuntimeError):
    """The generation thread failed while this request was queued or running (it restarts)."""


class _Answered(BaseException):
    """The handler has answered already; passes through mlx-lm's ``except Exception``."""


class ServerState:
    """What the handlers share: the served model's names, its runtime once loaded, and the
    request counters of ``/metrics``. Thread-safe.

    Args:
        model: ``--model`` as given (a folder or a Hugging Face repo id).
        adapter_path: ``--adapter-path`` as given.
        draft_model: ``--draft-model`` as given.
    """

    def __init__(self, model: Optional[str], adapter_path: Optional[str] = None,
                 draft_model: Optional[str] = None):
        self.model = model
        self.adapter_path = adapter_path
        self.draft_model = draft_model
        self.runtime = None  # the OffloadedModel, once loaded
        self.vocab_size: Optional[int] = None
        self.loaded = threading.Event()
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (path, status code) -> requests
        self.in_flight = 0
        self.disconnects = 0
        self.restarts = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    @property
    def model_id(self) -> Optional[str]:
        """The id ``/v1/models`` lists: a local folder's resolved path, else the repo id."""
        if self.model is None:
            return None
        path = Path(self.model)
        return str(path.resolve()) if path.exists() else self.model

    def serves(self, name: Optional[str]) -> bool:
        return name is None or name in (DEFAULT_MODEL, self.model, self.model_id)

    def check_model(self, model: Optional[str], adapter: Optional[str] = None, draft: Optional[str] = None) -> None:
        if not self.serves(model):
            raise UnknownModel(f"model {model!r} is not served here: this golem-server serves {self.model_id!r}")
        if adapter is not None and adapter != self.adapter_path:
            raise UnknownModel(f"adapters {adapter!r}: this golem-server serves its model with "
                               f"{'no adapter' if self.adapter_path is None else repr(self.adapter_path)}")
        if draft not in (None, DEFAULT_MODEL, self.draft_model):
            raise UnknownModel(f"draft_model {draft!r}: this golem-server drafts with "
                               f"{'no draft model' if self.draft_model is None else repr(self.draft_model)}")

    def model_loaded(self, runtime, vocab_size: Optional[int]) -> None:
        self.runtime = runtime
        self.vocab_size = vocab_size
        self.loaded.set()

    def begin(self) -> None:
        with self._lock:
            self.in_flight += 1

    def end(self, path: str, status: int, prompt_tokens: int, completion_tokens: int, gone: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            self.requests[(path, status)] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.disconnects += gone

    def restarted(self) -> None:
        with self._lock:
            self.restarts += 1

    def count(self, path: str, status: int) -> None:
        """Count a request that is not a completion (a GET); unknown paths count as ``other``."""
        known = path in ("/metrics", "/health") or path.startswith("/v1/models")
        with self._lock:
            self.requests[(path if known else "other", status)] += 1

    def metrics(self) -> str:
        """``/metrics``: the request counters, then the expert figures of the model."""
        from golem.runtime.report import prometheus, stats

        with self._lock:
            requests = sorted(self.requests.items())
            lines = [
                "# HELP golem_http_requests_total HTTP requests answered, by path and status code.",
                "# TYPE golem_http_requests_total counter",
                *(f'golem_http_requests_total{{path="{p}",code="{c}"}} {n}' for (p, c), n in requests),
                "# HELP golem_requests_in_flight Completion requests being answered now.",
                "# TYPE golem_requests_in_flight gauge",
                f"golem_requests_in_flight {self.in_flight}",
                "# HELP golem_client_disconnects_total Requests whose client left before the answer; "
                "their generation was stopped.",
                "# TYPE golem_client_disconnects_total counter",
                f"golem_client_disconnects_total {self.disconnects}",
                "# HELP golem_generation_failures_total Failures of the generation thread (each failed the "
                "requests then queued or running; the thread started over).",
                "# TYPE golem_generation_failures_total counter",
                f"golem_generation_failures_total {self.restarts}",
                "# HELP golem_prompt_tokens_total Prompt tokens of answered completion requests.",
                "# TYPE golem_prompt_tokens_total counter",
                f"golem_prompt_tokens_total {self.prompt_tokens}",
                "# HELP golem_completion_tokens_total Tokens generated for completion requests.",
                "# TYPE golem_completion_tokens_total counter",
                f"golem_completion_tokens_total {self.completion_tokens}",
            ]
        lines.append("# HELP golem_model_loaded Whether the served model is loaded.")
        lines.append("# TYPE golem_model_loaded gauge")
        lines.append(f"golem_model_loaded {int(self.runtime is not None)}")
        text = "\n".join(lines) + "\n"
        if self.runtime is not None:
            text += prometheus(stats(self.runtime))
        return text


def make_model_provider(base: type, state: ServerState) -> type:
    """A subclass of mlx-lm's ``ModelProvider`` that serves ``state``'s model only: a request
    naming another model, adapter or draft model is refused without unloading the one
    served (so its expert caches, trace and profile stay whole)."""

    class GolemModelProvider(base):
        def load(self, model_path, adapter_path=None, draft_model_path=None):
            state.check_model(model_path, adapter_path, draft_model_path)
            return super().load(DEFAULT_MODEL, None, DEFAULT_MODEL)

        def _load(self, *args, **kwargs):
            super()._load(*args, **kwargs)
            runtime = getattr(self.model, "golem", None)
            model_args = getattr(self.model, "args", None)
            vocab = getattr(model_args, "vocab_size", None) or getattr(self.tokenizer, "vocab_size", None)
            state.model_loaded(runtime, vocab)

    return GolemModelProvider


class GolemHTTPServer(ThreadingHTTPServer):
    """mlx-lm's threading HTTP server with a deep backlog and at most ``max_handlers``
    connections handled at once (the rest wait in the backlog, accepted in turn). Handler
    threads are daemons: stopping the server does not wait for a client that is still reading.

    Args:
        address: ``(host, port)`` (the address family is chosen from the host, as mlx-lm does).
        max_handlers: connections handled at once.
    """

    request_queue_size = BACKLOG
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, max_handlers: int = 128):
        infos = socket.getaddrinfo(*address, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = next(iter(infos))
        self.address_family = family
        self.handler_factory: Optional[Callable] = None
        self._slots = threading.BoundedSemaphore(max_handlers)
        self._closing = False
        super().__init__(sockaddr, self._make_handler)

    def _make_handler(self, *args, **kwargs):
        return self.handler_factory(*args, **kwargs)

    def process_request(self, request, client_address):
        while not self._slots.acquire(timeout=0.5):  # every handler busy: wait, the backlog holds the rest
            if self._closing:
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        kind, error = sys.exc_info()[:2]
        if isinstance(error, (ConnectionError, TimeoutError)):
            logging.info(f"{client_address[0]}: connection closed ({kind.__name__})")
        else:
            logging.error(f"{client_address[0]}: request failed: {kind.__name__}: {error}")
            logging.debug("traceback", exc_info=True)

    def server_close(self):
        self._closing = True
        super().server_close()


class _TrackedQueue(Queue):
    """mlx-lm's request queue, remembering the response queue of every request put on it
    (weakly: a finished handler's queue goes with it)."""

    def __init__(self):
        super().__init__()
        self.waiting = weakref.WeakSet()

    def put(self, item, block=True, timeout=None):
        self.waiting.add(item[0])
        super().put(item, block, timeout)


def make_response_generator(base: type, state: ServerState, max_restarts: int = MAX_RESTARTS) -> type:
    """A subclass of mlx-lm's ``ResponseGenerator`` whose generation thread survives a
    failure: the requests queued or running then get an error (answered 500), the thread
    starts over (the model stays loaded) and serving goes on. After ``max_restarts`` within
    ``RESTART_WINDOW_S`` it gives up as mlx-lm does (``/health`` says 503)."""

    class GolemResponseGenerator(base):
        def __init__(self, *args, **kwargs):
            self._failures: list = []
            super().__init__(*args, **kwargs)
            self.requests = _TrackedQueue()  # the thread reads the attribute on each get

        def _run_generate(self):
            while True:
                try:
                    self._generate()
                    return
                except Exception as e:
                    now = time.monotonic()
                    self._failures = [t for t in self._failures if now - t < RESTART_WINDOW_S] + [now]
                    giving_up = self._stop or len(self._failures) > max_restarts
                    logging.error(f"generation failed: {type(e).__name__}: {e}; the requests queued or running "
                                  f"get an error{'' if giving_up else ', serving goes on'}")
                    logging.debug("traceback", exc_info=True)
                    self._fail_waiting(GenerationFailed(f"generation failed ({type(e).__name__}: {e})"))
                    del e
                    state.restarted()
                    if giving_up:
                        self._generation_failed = True
                        return

        def _fail_waiting(self, error: Exception) -> None:
            while True:
                try:
                    self.requests.get_nowait()
                except Empty:
                    break
            for queue in list(getattr(self.requests, "waiting", ())):
                queue.put(error)

    return GolemResponseGenerator


def make_handler(base: type, state: ServerState) -> type:
    """A subclass of mlx-lm's ``APIHandler`` with golem's checks, endpoints and log line."""
    return type("GolemHandler", (_GolemHandling, base), {"server_state": state})


class _GolemHandling:
    """What golem's handler adds to mlx-lm's ``APIHandler`` (the class after it in the MRO):
    the body checked before mlx-lm reads it, ``/metrics``, ``/v1/models``, the client watched,
    one log line per request. ``server_state`` is the ``ServerState`` of the one model served."""

    server_state: ServerState
    timeout = IO_TIMEOUT_S  # a client that stalls a read or a write this long is gone

    def __init__(self, response_generator, *args, **kwargs):
        self._status = None
        self._tokens = 0
        self._gone = False
        super().__init__(_Watched(response_generator, self), *args, **kwargs)

    # -- bookkeeping --------------------------------------------------------
    def send_response(self, code, message=None):
        self._status = code
        super().send_response(code, message)

    def log_message(self, format, *args):  # mlx-lm's access line, through logging
        logging.info(f"{self.address_string()} {format % args}")

    def client_gone(self) -> bool:
        """The client closed its end (a read would return nothing). No data is consumed."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _answer(self, status: int, payload) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; version=0.0.4" if isinstance(payload, bytes)
                         else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self._set_cors_headers()
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    # -- GET ----------------------------------------------------------------
    def do_GET(self):
        if self.path.split("?", 1)[0] == "/metrics":
            self._answer(200, self.server_state.metrics().encode())
        elif self.path.startswith("/v1/models"):
            self.handle_models_request()
        else:
            super().do_GET()
        self.server_state.count(self.path.split("?", 1)[0], self._status or 0)

    def handle_models_request(self):
        """The served model only (this server loads no other), with no Hugging Face
        cache folder needed; mlx-lm's response shape."""
        wanted = self.path[len("/v1/models"):].strip("/") or None
        models = [{"id": self.server_state.model_id, "object": "model", "created": self.created}]
        if self.server_state.model is None or (wanted is not None and not self.server_state.serves(wanted)):
            models = []
        self._answer(200, {"object": "list", "data": models})

    # -- POST ---------------------------------------------------------------
    def do_POST(self):
        path = self.path
        if path not in POST_PATHS:
            return super().do_POST()  # mlx-lm's 404
        self._status, self._tokens, self._gone = None, 0, False
        self.server_state.begin()
        started = time.perf_counter()
        before = _stats(self.server_state)
        prompt_tokens = 0
        try:
            body = self._read_body()
            if body is None:
                return
            try:
                if not isinstance(body, dict):
                    raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
                check_request(body, path, self._vocab_size(body))
                self.server_state.check_model(body.get("model"), body.get("adapters"), body.get("draft_model"))
            except UnknownModel as e:
                return self._answer(404, {"error": str(e)})
            except BadRequest as e:
                return self._answer(400, {"error": str(e)})
            raw = json.dumps(body).encode()
            self.headers.replace_header("Content-Length", str(len(raw)))
            self.rfile = io.BytesIO(raw)
            super().do_POST()
            prompt_tokens = self.response_generator.prompt_tokens
        except _Answered:
            pass
        except ClientGone:
            self._gone = True
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self._gone = True
            self.close_connection = True
        except Exception as e:  # a fault of the server, not of the request: answer it, keep serving
            logging.error(f"{path}: {type(e).__name__}: {e}")
            logging.debug("traceback", exc_info=True)
            self.close_connection = True
            if self._status is None or getattr(self, "_headers_buffer", None):
                self._headers_buffer = []  # a non-streamed answer's headers, not sent yet
                self._answer(500, {"error": f"{type(e).__name__}: {e}"})
        finally:
            self.server_state.end(path, self._status or 0, prompt_tokens, self._tokens, self._gone)
            self._log_request(path, time.perf_counter() - started, before)

    def _read_body(self) -> Optional[dict]:
        """The request's JSON body, or None once an error is answered."""
        length = self.headers.get("Content-Length")
        if length is None:
            self._answer(411, {"error": "Content-Length header is required"})
            return None
        try:
            nbytes = int(length)
            if nbytes < 0:
                raise ValueError
        except ValueError:
            self._answer(400, {"error": f"Invalid Content-Length header: {length!r:.40}"})
            return None
        if nbytes > MAX_BODY_BYTES:
            self.close_connection = True
            self._answer(413, {"error": f"request body of {nbytes} bytes: at most {MAX_BODY_BYTES}"})
            return None
        raw = self.rfile.read(nbytes)
        if len(raw) < nbytes:
            raise ClientGone("the request body ended early")
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            self._answer(400, {"error": f"the request body is not UTF-8 text (byte {e.start})"})
        except ValueError as e:  # json.JSONDecodeError; also a number too long to convert
            self._answer(400, {"error": f"Invalid JSON in request body: {e}"})
        except RecursionError:
            self._answer(400, {"error": "Invalid JSON in request body: nested too deeply"})
        return None

    def _vocab_size(self, body: dict) -> Optional[int]:
        if body.get("logit_bias") is None:
            return self.server_state.vocab_size
        # The range of a logit bias is the model's vocabulary: wait for the model to load.
        while not self.server_state.loaded.wait(timeout=0.5):
            if not self.response_generator.generation_available():
                raise BadRequest("the model failed to load")
        return self.server_state.vocab_size

    def _log_request(self, path: str, seconds: float, before) -> None:
        line = f"{path} {self._status or '-'}: {self._tokens} tokens in {seconds:.2f} s"
        if self._gone:
            line += ", client gone (generation stopped)"
        after = _stats(self.server_state)
        if after is not None and before is not None and self._tokens:
            line += f"; {_one_line(after.minus(before))}"
            if self.server_state.in_flight:
                line += f" (shared with {self.server_state.in_flight} requests running)"
        logging.info(line)


def _stats(state: ServerState):
    if state.runtime is None:
        return None
    from golem.runtime.report import stats

    return stats(state.runtime)


def _one_line(s) -> str:
    from golem.runtime.report import one_line

    return one_line(s)


class _Watched:
    """mlx-lm's ``ResponseGenerator`` as one handler sees it: its tokens are counted, and
    between tokens (and progress reports) the client's connection is looked at; when the
    client has gone, the generation is told to stop and ``ClientGone`` ends the handler."""

    def __init__(self, inner, handler):
        self._inner = inner
        self._handler = handler
        self.prompt_tokens = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def generate(self, request, args, progress_callback=None):
        handler = self._handler

        def progress(processed, total):
            if handler.client_gone():
                raise ClientGone("client gone during prompt processing")
            if progress_callback is not None:
                progress_callback(processed, total)

        try:
            ctx, responses = self._inner.generate(request, args, progress_callback=progress)
        except GenerationFailed as e:
            handler._answer(500, {"error": str(e)})
            raise _Answered from None
        except UnknownModel as e:
            handler._answer(404, {"error": str(e)})
            raise _Answered from None
        except Exception as e:  # the request could not be prepared (chat template, images, tool calls)
            if not self._inner.generation_available():
                handler._answer(503, {"error": f"generation unavailable: {e}"})
            else:
                handler._answer(400, {"error": f"{type(e).__name__}: {e}" if not str(e) else str(e)})
            raise _Answered from None
        self.prompt_tokens = len(getattr(ctx, "prompt", ()) or ())

        def watched():
            try:
                for response in responses:
                    handler._tokens += 1
                    if response.finish_reason is None and handler.client_gone():
                        raise ClientGone("client gone during generation")
                    yield response
            finally:
                ctx.stop()

        return ctx, watched()
