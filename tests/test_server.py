"""golem-server against stock mlx_lm.server on the same generated checkpoint, over real HTTP
on localhost: a completion, a streamed chat completion and two concurrent requests answer
with the same tokens and text (greedy), while golem streams experts from disk."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

MAX_TOKENS = 12
REPO_ID = "golem-tests/tiny-moe"
READY_DEADLINE_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list, log, env: dict):
        self.name = name
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen([*cmd, "--port", str(self.port), "--max-tokens", str(MAX_TOKENS)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, deadline: float) -> None:
        """Poll /health until it answers, the process dies, or the deadline passes."""
        while True:
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready in {READY_DEADLINE_S} s:\n{self.output()}")
            time.sleep(0.05)  # a poll interval, not a wait for readiness

    def post(self, path: str, body: dict) -> str:
        req = urllib.request.Request(self.url(path), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
            return r.read().decode()

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    """golem-server (6 of 16 experts per layer, prefetch depth 1, a trace out) and stock
    mlx_lm.server on one checkpoint, started together, both given its hub repo id."""
    from golem.runtime.synthetic import as_hub_snapshot

    tmp = tmp_path_factory.mktemp("server")
    # Served by repo id from the Hugging Face cache, offline, as a user runs a hub model.
    as_hub_snapshot(checkpoints("qwen3_moe"), tmp / "hub", REPO_ID)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp / "hub"), "HF_HUB_OFFLINE": "1"}
    trace = tmp / "served.npz"
    golem_cmd = [sys.executable, "-m", "golem.runtime.cli.server", "--model", REPO_ID, "-c", "6",
                 "--prefetch-depth", "1", "--trace-out", str(trace)]
    stock_cmd = [sys.executable, "-c", "from mlx_lm.server import main; main()", "--model", REPO_ID]
    logs = [open(tmp / "golem.log", "w+"), open(tmp / "stock.log", "w+")]
    started = [Server("golem-server", golem_cmd, logs[0], env), Server("mlx_lm.server", stock_cmd, logs[1], env)]
    try:
        deadline = time.monotonic() + READY_DEADLINE_S
        for s in started:
            s.wait_ready(deadline)
        yield {"golem": started[0], "stock": started[1], "trace": trace}
    finally:
        for s in started:
            s.stop()
        for log in logs:
            log.close()


def completion_text(server: Server, prompt: str) -> tuple:
    """(token ids, text, finish reason, completion tokens) of a greedy text completion."""
    answer = json.loads(server.post("/v1/completions", {
        "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "logprobs": True}))
    choice = answer["choices"][0]
    ids = [entry["id"] for entry in choice["logprobs"]["content"]]
    return ids, choice["text"], choice["finish_reason"], answer["usage"]["completion_tokens"]


def streamed_chat(server: Server, content: str) -> list:
    """The text of each streamed chunk of a chat completion (server-sent events)."""
    raw = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": True})
    pieces, done = [], False
    for line in raw.splitlines():
        if not line.startswith("data: "):
            continue  # blank separators and ": keepalive" comments
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            break
        for choice in json.loads(data)["choices"]:
            pieces.append(choice.get("delta", {}).get("content") or "")
    assert done, raw[-500:]
    return pieces


def concurrent_completions(server: Server, prompts: list) -> list:
    """Send every prompt at once from its own thread; the answers in prompt order."""
    barrier = threading.Barrier(len(prompts))
    answers = [None] * len(prompts)
    errors = []

    def ask(i):
        try:
            barrier.wait(timeout=30)
            answers[i] = completion_text(server, prompts[i])
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return answers


def test_completion_equals_stock(servers):
    golem = completion_text(servers["golem"], "Once upon a time")
    stock = completion_text(servers["stock"], "Once upon a time")
    assert golem == stock
    assert len(golem[0]) == golem[3] == MAX_TOKENS and golem[2] == "length"


def test_streamed_chat_equals_stock(servers):
    golem = streamed_chat(servers["golem"], "Tell me about disks.")
    stock = streamed_chat(servers["stock"], "Tell me about disks.")
    assert golem == stock
    assert len("".join(golem)) > 0


def test_two_concurrent_requests_equal_stock(servers):
    prompts = ["The disk was slow and", "Experts live in slots that"]
    golem = concurrent_completions(servers["golem"], prompts)
    stock = concurrent_completions(servers["stock"], prompts)
    assert golem == stock
    assert golem[0] != golem[1]


def test_openai_client_gets_the_answers_of_stock(servers):
    openai = pytest.importorskip("openai")

    def ask(server):
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="none", timeout=120, max_retries=0)
        chat = client.chat.completions.create(
            model=REPO_ID, messages=[{"role": "user", "content": "Tell me about disks."}],
            max_tokens=MAX_TOKENS, temperature=0.0)
        text = client.completions.create(model=REPO_ID, prompt="Once upon a time", max_tokens=MAX_TOKENS,
                                         temperature=0.0)
        stream = client.chat.completions.create(
            model=REPO_ID, messages=[{"role": "user", "content": "Hello there"}], max_tokens=MAX_TOKENS,
            temperature=0.0, stream=True)
        pieces = [c.choices[0].delta.content for c in stream if c.choices]
        return (chat.choices[0].message.content, chat.choices[0].finish_reason, chat.usage.completion_tokens,
                chat.usage.prompt_tokens, chat.object, text.choices[0].text, text.object, pieces)

    assert ask(servers["golem"]) == ask(servers["stock"])


def test_unknown_model_is_refused_and_keeps_the_model(servers):
    golem = servers["golem"]
    req = urllib.request.Request(golem.url("/v1/chat/completions"), data=json.dumps({
        "model": "someone/other-model", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=60)
    assert refused.value.code == 404 and "not served here" in refused.value.read().decode()
    # The model was not unloaded: the next answer is still the stock one.
    assert completion_text(golem, "Once upon a time") == completion_text(servers["stock"], "Once upon a time")


def test_sigterm_closes_the_model_and_writes_its_trace(servers):
    from golem.runtime.trace import load_trace

    golem = servers["golem"]
    golem.proc.send_signal(signal.SIGTERM)
    assert golem.proc.wait(timeout=60) == 0, golem.output()
    assert "Traceback" not in golem.output()
    trace = load_trace(servers["trace"])
    # Every generated token of the tests above went through golem's engine, and the request
    # for another model replaced none of them.
    assert trace.num_steps >= 9 * MAX_TOKENS
    assert "Traceback" not in golem.output()


def test_sighup_writes_the_trace_of_what_ran(checkpoints, tmp_path):
    from golem.runtime.trace import load_trace

    trace = tmp_path / "hup.npz"
    with open(tmp_path / "hup.log", "w+") as log:
        server = Server("golem-server", [sys.executable, "-m", "golem.runtime.cli.server", "--model",
                                         str(checkpoints("qwen3_moe")), "-c", "6", "--trace-out", str(trace)],
                        log, dict(os.environ))
        try:
            server.wait_ready(time.monotonic() + READY_DEADLINE_S)
            completion_text(server, "Once upon a time")
            server.proc.send_signal(signal.SIGHUP)
            assert server.proc.wait(timeout=60) == 0, server.output()
        finally:
            server.stop()
        assert "Traceback" not in server.output()
    assert load_trace(trace).num_steps >= MAX_TOKENS


@pytest.mark.parametrize("flags, message", [
    (["-c", "2"], "top-k"),  # fewer slots than the model's top-k (4)
    (["--prefetch-depth", "-1"], "--prefetch-depth"),
])
def test_bad_flag_is_one_line_before_serving(checkpoints, capsys, flags, message):
    from golem.runtime.cli.server import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(checkpoints("qwen3_moe")), *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "golem-server: error:" in err and message in err and "Traceback" not in err


def test_missing_model_is_one_line(tmp_path, capsys):
    from golem.runtime.cli.server import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tmp_path / "no-such-model")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "golem-server: error:" in err and "no-such-model" in err
