"""golem-server in this process, over real HTTP on a port the OS picks: /metrics equals the
engine's own counters; every malformed request is a 400 with a message and the server keeps
serving the same tokens; a client that leaves stops its generation; a burst of 32 clients
is answered in full, with the tokens of a sequential run, and leaves no thread or file
behind; a second server on a busy port is one line, exit 2, before any model loads."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from golem.runtime.report import parse_prometheus

MAX_TOKENS = 8
DEADLINE_S = 120


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory, monkeypatch_module):
    from golem.runtime.cli.server import serve_main

    # No Hugging Face cache folder at all: /v1/models must still answer.
    monkeypatch_module.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf") / "absent"))
    ready = threading.Event()
    box = {}

    def on_ready(server):
        box["server"] = server
        ready.set()

    argv = ["--model", str(checkpoints("qwen3_moe")), "-c", "6", "--prefetch-depth", "1", "--port", "0",
            "--max-tokens", str(MAX_TOKENS), "--log-level", "WARNING"]
    thread = threading.Thread(target=lambda: box.setdefault("code", serve_main(argv, on_ready=on_ready)))
    thread.start()
    assert ready.wait(DEADLINE_S), "golem-server did not start"
    server = box["server"]
    try:
        yield server
    finally:
        server.stop()
        thread.join(DEADLINE_S)
        assert not thread.is_alive()
        assert box["code"] == 0


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def request(server, method: str, path: str, body=None, headers=None, raw: bytes = None):
    """(status, parsed JSON or text) of one request on its own connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE_S)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
        r = conn.getresponse()
        text = r.read().decode()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text
    finally:
        conn.close()


def chat(server, content: str, **extra):
    status, answer = request(server, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS, "temperature": 0.0,
        "logprobs": True, **extra})
    assert status == 200, answer
    choice = answer["choices"][0]
    return [e["id"] for e in choice["logprobs"]["content"]], choice["message"]["content"]


def metrics(server) -> dict:
    status, text = request(server, "GET", "/metrics")
    assert status == 200
    return parse_prometheus(text)


def wait_idle(server) -> None:
    """Until no completion request is being answered (a poll with a deadline)."""
    deadline = time.monotonic() + DEADLINE_S
    while server.state.in_flight:
        assert time.monotonic() < deadline, "requests still running"
        time.sleep(0.02)  # a poll interval, not a wait for an event


def test_metrics_equal_the_engine_counters_after_two_chats(served):
    chat(served, "Hello there")
    chat(served, "How are the experts today?")
    wait_idle(served)
    m = metrics(served)
    engine = served.state.runtime.engine
    assert engine.stats.layers
    for layer, s in engine.stats.layers.items():
        assert m[f'golem_layer_expert_hits_total{{layer="{layer}"}}'] == s.hits
        assert m[f'golem_layer_expert_misses_total{{layer="{layer}"}}'] == s.misses
        assert m[f'golem_layer_expert_read_bytes_total{{layer="{layer}"}}'] == s.bytes_read
        p = engine.prefetcher.stats[layer]
        assert m[f'golem_layer_prefetch_issued_total{{layer="{layer}"}}'] == p.issued
        assert m[f'golem_layer_prefetch_useful_total{{layer="{layer}"}}'] == p.useful
    total = engine.stats.total()
    assert m["golem_expert_hits_total"] == total.hits and m["golem_expert_misses_total"] == total.misses
    assert total.hits + total.misses > 0
    assert m['golem_http_requests_total{path="/v1/chat/completions",code="200"}'] >= 2
    assert m["golem_completion_tokens_total"] >= 2 * MAX_TOKENS
    assert m["golem_requests_in_flight"] == 0


def test_models_answers_without_a_hub_cache_folder(served):
    status, answer = request(served, "GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in answer["data"]] == [served.state.model_id]
    status, answer = request(served, "GET", "/v1/models/someone/else")
    assert status == 200 and answer == {"object": "list", "data": []}


BAD_BODIES = [
    ({"stop": 5}, "stop"), ({"stop": [1, 2]}, "stop"), ({"stop": ""}, "stop"), ({"stop": ["x"] * 100}, "stop"),
    ({"seed": -1}, "seed"), ({"seed": 2 ** 64}, "seed"), ({"seed": "7"}, "seed"), ({"seed": 1.5}, "seed"),
    ({"logit_bias": {"999999999": 5}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"), ({"logit_bias": {"3": "high"}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"temperature": -1}, "temperature"), ({"top_p": 2}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": "9"}, "max_tokens"), ({"top_k": -3}, "top_k"),
    ({"stream": "yes"}, "stream"), ({"stream": True, "stream_options": 5}, "stream_options"),
    ({"messages": "hello"}, "messages"), ({"messages": []}, "messages"), ({"messages": [7]}, "messages"),
    ({"messages": [{"role": "user", "content": {"a": 1}}]}, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "text"),
    ({"messages": [{"content": "no role"}]}, "role"), ({"tools": "all"}, "tools"),
    ({"role_mapping": {"user": 5}}, "role_mapping"), ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ({"adapters": 3}, "adapters"), ({"model": 5}, "model"),
]
BAD_RAW = [
    (b"\xff\xfe\x00\x01binary", {}, "UTF-8"),
    (b"{not json", {}, "JSON"),
    (b"[1, 2, 3]", {}, "object"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', {}, "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', {}, "top_p"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}", {}, "JSON"),
    (b"{}", {"Content-Length": "-5"}, "Content-Length"),
    (b"{}", {"Content-Length": "many"}, "Content-Length"),
]


def test_malformed_requests_are_400s_and_the_server_keeps_serving(served):
    before = chat(served, "Tell me about disks.")
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for fields, word in BAD_BODIES:
        status, answer = request(served, "POST", "/v1/chat/completions", {**base, **fields})
        assert status == 400, (fields, answer)
        assert word in answer["error"], (fields, answer)
    for raw, headers, word in BAD_RAW:
        status, answer = request(served, "POST", "/v1/chat/completions", raw=raw,
                                 headers={"Content-Type": "application/json", **headers})
        assert status == 400, (raw[:40], answer)
        assert word in answer["error"], (raw[:40], answer)
    status, answer = request(served, "POST", "/v1/completions", {"prompt": [1, 2, 3]})
    assert status == 400 and "prompt" in answer["error"]
    status, answer = request(served, "POST", "/v1/chat/completions", {**base, "model": "someone/else"})
    assert status == 404 and "not served here" in answer["error"]
    status, answer = request(served, "GET", "/health")
    assert status == 200 and answer == {"status": "ok"}
    assert served.response_generator.generation_available()
    assert chat(served, "Tell me about disks.") == before


def test_a_client_that_leaves_stops_its_generation(served):
    state = served.state
    wait_idle(served)
    tokens_before = state.completion_tokens
    gone_before = state.disconnects
    steps = served.state.runtime.engine.stats
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 100_000, "temperature": 0.0}).encode()
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=DEADLINE_S)
    start = steps.decode_steps
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + DEADLINE_S
    while steps.decode_steps < start + 3:  # generating
        assert time.monotonic() < deadline
        time.sleep(0.01)  # a poll interval
    sock.close()
    wait_idle(served)
    assert state.disconnects == gone_before + 1
    assert state.completion_tokens - tokens_before < 1000
    chat(served, "Hello there")  # the next request is served
    # mlx-lm's batch loop drops a stopped request after its current time slice (<= 0.5 s):
    # a few dozen steps at most, not the 100,000 asked for.
    assert steps.decode_steps - start < 300


def _threads_files_rss():
    """Threads, open files and RSS once the server's request handlers have ended (each
    ends, with its socket, a little after its answer is sent)."""
    deadline = time.monotonic() + DEADLINE_S
    while any("process_request" in t.name for t in threading.enumerate()):
        assert time.monotonic() < deadline, threading.enumerate()
        time.sleep(0.02)  # a poll interval, not a wait for an event
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return threading.active_count(), fds, rss


def _settled(baseline_threads: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while threading.active_count() > baseline_threads:
        assert time.monotonic() < deadline, threading.enumerate()
        time.sleep(0.02)  # handler threads end once their answer is sent


def test_a_burst_of_32_clients_is_answered_as_a_sequential_run(served):
    prompts = [f"Client {i} asks about slot {i % 7} and disk {i % 5}" for i in range(32)]
    sequential = [chat(served, p) for p in prompts]
    wait_idle(served)
    threads, fds, rss = _threads_files_rss()
    barrier = threading.Barrier(len(prompts))
    answers, errors = [None] * len(prompts), []

    def ask(i):
        try:
            barrier.wait(timeout=DEADLINE_S)
            answers[i] = chat(served, prompts[i])
        except Exception as e:  # reported in the test's thread
            errors.append(repr(e))

    workers = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in workers:
        t.start()
    for t in workers:
        t.join(DEADLINE_S)
    assert not errors, errors
    assert answers == sequential
    wait_idle(served)
    _settled(threads)
    after = _threads_files_rss()
    assert after[0] == threads and after[1] == fds, (threads, fds, after)
    assert after[2] < rss + 128e6, (rss, after[2])


def test_a_busy_port_is_one_line_before_the_model_loads(tmp_path):
    # The model named does not even exist: the port is what the one line is about, so it was
    # checked before the model was looked at.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "golem.runtime.cli.server", "--model",
                               str(tmp_path / "no-model"), "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--port {port}" in lines[0] and "golem-server: error:" in lines[0], done.stderr
    assert "in use" in lines[0]
    assert elapsed < 20  # mlx-lm's imports, then the bind (1.6 s on an idle 2-core machine)


def test_parse_errors_are_one_line(capsys):
    from golem.runtime.cli.server import serve_main

    with pytest.raises(SystemExit) as exit_:
        serve_main(["--port", "eighty"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("golem-server: error:") and "--port" in err[0]


def test_deeply_nested_and_infinite_values_are_400s(served):
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer = request(served, "POST", "/v1/chat/completions", raw=deep)
    assert status == 400 and "nested" in answer["error"]
    status, answer = request(served, "POST", "/v1/chat/completions",
                             raw=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e309}')
    assert status == 400 and "temperature" in answer["error"]


def test_the_generation_thread_survives_a_failure(served, monkeypatch):
    """A fault injected in the generation thread (where mlx-lm's thread would die and every
    later request fail): the request it hit gets a 500, the next ones are served."""
    generator = served.response_generator
    want = chat(served, "Tell me about disks.")
    failures = served.state.restarts
    real = generator._make_state_machine
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(generator, "_make_state_machine", fail_once)
    status, answer = request(served, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Tell me about disks."}], "max_tokens": MAX_TOKENS})
    assert status == 500 and "injected fault" in answer["error"]
    assert served.state.restarts == failures + 1
    assert generator.generation_available()
    assert chat(served, "Tell me about disks.") == want
    assert metrics(served)["golem_generation_failures_total"] == failures + 1
