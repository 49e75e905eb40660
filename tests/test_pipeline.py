"""Pipeline-parallel offload over mx.distributed: the split, the errors, and 2 and 3 local
ranks of the ring backend giving stock mlx-lm's greedy tokens; a killed rank ends every rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from golem.runtime.pipeline import (Pipeline, PipelineError, balanced_partition, launch_local, parse_split,
                                    per_rank, plan_split)
from golem.runtime.synthetic import Size, build_checkpoint

from helpers import prompt_tokens, stock

HERE = Path(__file__).resolve().parent
WORKER = HERE / "pipeline_worker.py"
FAMILIES = ("qwen3_moe", "deepseek_v3", "glm4_moe", "qwen3_next")  # mlx-lm's families with `pipeline`
SIX = Size(layers=6)  # 3 ranks of 2 layers: every rank holds an MoE layer (layer 0 is dense)
TIMEOUT_S = 300

ring = pytest.mark.skipif(not mx.distributed.is_available("ring"), reason="MLX's ring backend is unavailable")


class _Group:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


# -- the split --------------------------------------------------------------------------
def test_even_split_is_mlx_lms():
    assert plan_split(True, 4, 3) == (2, 1, 1)
    assert plan_split("even", 6, 3) == (2, 2, 2)
    p = Pipeline(_Group(0, 3), (2, 1, 1), 4)
    assert [p.layers_of(r) for r in range(3)] == [range(2, 4), range(1, 2), range(0, 1)]


def test_explicit_and_byte_splits():
    assert plan_split("1,3", 4, 2) == (1, 3)
    assert plan_split([3, 1], 4, 2) == (3, 1)
    # The heavy last layer gets a rank of its own (rank 0 runs the last layers).
    assert plan_split("bytes", 5, 2, [1, 1, 1, 1, 10]) == (1, 4)
    assert balanced_partition([1, 2, 3, 4, 5], 3) == [3, 1, 1]
    assert balanced_partition([5, 1, 1, 1, 1, 1], 2) == [1, 5]


@pytest.mark.parametrize("spec, n, size, message", [
    ("1,2", 4, 2, "add up to 3, the model has 4"),
    ("4", 4, 2, "1 entries for 2 ranks"),
    ("0,4", 4, 2, "whole number >= 1"),
    ("fast", 4, 2, "expected 'even', 'bytes'"),
    (True, 2, 3, "3 ranks for a model of 2 layers"),
])
def test_bad_splits_are_one_line_errors(spec, n, size, message):
    with pytest.raises(PipelineError, match=message):
        plan_split(spec, n, size, [1] * n)


def test_per_rank_values_and_tensor_ownership():
    assert per_rank("8GB,16GB", 1, 2, "--memory-budget") == "16GB"
    assert per_rank("8GB", 1, 2, "--memory-budget") == "8GB"
    with pytest.raises(PipelineError, match="--memory-budget 1GB,2GB,3GB: 3 values for 2 ranks"):
        per_rank("1GB,2GB,3GB", 0, 2, "--memory-budget")
    p = Pipeline(_Group(1, 2), (2, 2), 4)
    assert p.owns_tensor("model.layers.1.mlp.switch_mlp.gate_proj.weight")
    assert not p.owns_tensor("model.layers.2.self_attn.q_proj.weight")
    assert p.owns_tensor("model.embed_tokens.weight") and p.owns_tensor("lm_head.weight")
    assert parse_split(None) == "even"


# -- one process: a group of one ----------------------------------------------------------
def test_family_without_pipeline_is_a_clear_error(checkpoints):
    import golem.runtime
    from golem.runtime.checkpoint import ModelError

    with pytest.raises(ModelError, match=r"model_type 'mixtral' has no pipeline split in mlx-lm \(families with "
                                         r"one: deepseek_v3, glm4_moe, qwen3_moe, qwen3_next\)"):
        golem.runtime.load(checkpoints("mixtral"), cache_size=4, pipeline=True)


def test_group_of_one_is_the_whole_model(checkpoints):
    """Outside mlx.launch, ``pipeline=True`` is a one-stage pipeline: every layer, stock's tokens."""
    import golem.runtime
    from helpers import greedy_tokens

    path = checkpoints("qwen3_moe")
    model, tokenizer = stock(path)
    want = greedy_tokens(model, prompt_tokens(tokenizer), 12)
    with golem.runtime.load(path, cache_size=4, pipeline=True) as (m, tok):
        assert m.golem.pipeline.split == (4,)
        assert greedy_tokens(m, prompt_tokens(tok), 12) == want


# -- several ranks over localhost ------------------------------------------------------------
@pytest.fixture(scope="module")
def six_layer(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return {f: build_checkpoint(f, root / f, size=SIX) for f in FAMILIES}


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return env


def _ranks(n: int, specs: list, tmp_path: Path, timeout_s: float = TIMEOUT_S):
    """Run the worker as ``n`` ranks; every rank's JSON lines, by rank."""
    procs = launch_local(n, [sys.executable, str(WORKER), json.dumps(specs)], hostfile_dir=tmp_path, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            assert p.returncode == 0, err[-3000:]
            outs.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


_SINGLE: dict = {}


def _single(path: Path, depth: int, n: int = 20, prefill: int = 8):
    """Stock mlx-lm's and single-process golem's greedy tokens, and golem's reads (once per
    checkpoint and depth)."""
    key = (str(path), depth, n, prefill)
    if key not in _SINGLE:
        _SINGLE[key] = _single_run(path, depth, n, prefill)
    return _SINGLE[key]


def _single_run(path: Path, depth: int, n: int, prefill: int):
    from mlx_lm.generate import generate_step

    import golem.runtime
    from golem.runtime.prefetch import PrefetchConfig

    def greedy(model, tokenizer):
        prompt = mx.array(prompt_tokens(tokenizer, "Once upon a time " * 3))
        return [int(t) for t, _ in generate_step(prompt, model, max_tokens=n, prefill_step_size=prefill,
                                                 sampler=lambda x: mx.argmax(x, axis=-1))]

    want = greedy(*stock(path))
    options = {"prefetch": PrefetchConfig(depth=depth, threshold=0.1, governor=False)} if depth else {}  # as the ranks
    with golem.runtime.load(path, cache_size=4, **options) as (model, tokenizer):
        got = greedy(model, tokenizer)
        t = model.golem.engine.stats.total()
        pf = model.golem.engine.prefetcher
        recall = {l: (s.true, s.predicted_true) for l, s in pf.stats.items()} if pf is not None else {}
        return want, got, t.misses, t.bytes_read, recall


@ring
@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_give_stock_tokens(six_layer, tmp_path, ranks):
    """Every family with a pipeline split, a cache of 4 of 16 experts, depth 0 and 2, prefill
    in chunks of 8: each rank's tokens are stock mlx-lm's and single-process golem's; at
    depth 0 the ranks' reads add up to the single process's."""
    specs = [dict(path=str(six_layer[f]), depth=d, cache=4, tokens=20, prefill=8) for f in FAMILIES for d in (0, 2)]
    outs = _ranks(ranks, specs, tmp_path)
    assert all(len(o) == len(specs) for o in outs)
    for i, spec in enumerate(specs):
        want, single, misses, nbytes, recall = _single(Path(spec["path"]), spec["depth"])
        assert single == want
        runs = [o[i] for o in outs]
        for run in runs:
            assert run["tokens"] == want, (spec, run["rank"])
        layers = sorted(l for run in runs for l in run["layers"])
        assert len(layers) == len(set(layers))  # each MoE layer on one rank
        assert runs[0]["rows"] == runs[-1]["rows"]  # one gathered table on every rank
        assert [r["misses"] for r in runs[0]["rows"]] == [run["misses"] for run in runs]
        if spec["depth"] == 0:
            assert sum(run["misses"] for run in runs) == misses
            assert sum(run["bytes_read"] for run in runs) == nbytes
        else:  # boundary prefetch: a rank's first MoE layer is guessed as well as on one machine
            for row in runs[0]["rows"][:-1]:
                first = min(l for run in runs if run["rank"] == runs[0]["rows"].index(row) for l in run["layers"])
                true, hit = recall[first]
                assert row["first_true"] > 0
                assert row["first_predicted"] / row["first_true"] >= hit / true - 0.05


@ring
def test_killed_rank_ends_every_rank(six_layer, tmp_path):
    """SIGKILL of rank 1 while decoding: rank 0 (and rank 2) stop within 10 s, rank 0 with
    one clear line."""
    spec = [dict(path=str(six_layer["qwen3_moe"]), forever=True, storage="0.05")]  # reads slowed: decoding lasts
    procs = launch_local(3, [sys.executable, str(WORKER), json.dumps(spec)], hostfile_dir=tmp_path, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = procs[0].stdout.readline()  # blocks until rank 0 decodes (or dies: empty)
        assert json.loads(line) == {"decoding": 0}
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        for r in (0, 2):
            procs[r].wait(timeout=10)
        elapsed = time.monotonic() - t0
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert elapsed < 10
    assert procs[0].returncode == 1 and procs[2].returncode == 1
    # one line of ours; MLX's ring backend writes its own to the same stderr, now and then glued
    # to the front of it, so the line is counted in the whole text
    assert err.count("error: rank") == 1, err[-2000:]
    assert err.count("error: rank 0 of 3: lost the connection to another rank") == 1, err[-2000:]
    assert "Traceback" not in err


@ring
def test_golem_run_pipeline_prints_on_rank_zero_only(six_layer, tmp_path):
    """``golem-run --pipeline`` as 2 ranks: rank 0 prints single-process golem-run's text,
    rank 1 prints nothing; with --verbose, one table with a column per rank."""
    path = str(six_layer["qwen3_moe"])
    argv = [sys.executable, "-m", "golem.runtime.cli.run", "--model", path, "-c", "4", "-m", "16",
            "-p", "the quick brown fox", "--prefill-step-size", "4", "--verbose", "False"]
    single = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env())
    assert single.returncode == 0, single.stderr
    procs = launch_local(2, argv + ["--pipeline"], hostfile_dir=tmp_path, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert outs[0][0] == single.stdout and single.stdout.strip()
    assert outs[1][0] == ""
    procs = launch_local(2, argv[:-2] + ["--pipeline", "--verbose", "True"], hostfile_dir=tmp_path, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert outs[1][0] == ""
    text = outs[0][0]
    assert "Pipeline: 2 ranks (ring): rank 1 layers 0-2, rank 0 layers 3-5" in text
    head = next(l for l in text.splitlines() if "rank 0" in l and "rank 1" in l and "all" in l)
    assert head.split() == ["rank", "0", "rank", "1", "all"]


def test_golem_run_pipeline_errors(checkpoints, capsys):
    from golem.runtime.cli.run import main

    assert main(["--model", str(checkpoints("mixtral")), "-c", "4", "--pipeline", "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("golem-run: error: ") and "model_type 'mixtral' has no pipeline split" in err
    assert main(["--model", str(checkpoints("qwen3_moe")), "--pipeline", "1,x", "-p", "hi"]) == 2
    assert "--pipeline 1,x: expected 'even', 'bytes' or layers per rank" in capsys.readouterr().err
    assert main(["--model", str(checkpoints("qwen3_moe")), "--pipeline", "3,3", "-c", "4", "-p", "hi"]) == 2
    assert "2 entries for 1 ranks" in capsys.readouterr().err


@ring
def test_each_rank_holds_its_layers_within_its_budget(six_layer, tmp_path):
    """``memory_budget="1MB,0.7MB"``: rank 0 fits its layers' experts, rank 1 streams; each
    rank holds only its layers' weights and its resident bytes stay within its own budget."""
    path = six_layer["qwen3_moe"]
    outs = _ranks(2, [dict(path=str(path), budget="1MB,0.7MB", tokens=20, prefill=8)], tmp_path)
    want, *_ = _single(path, 0)
    rows = outs[0][0]["rows"]
    for rank, (run,) in enumerate(outs):
        assert run["tokens"] == want
        assert run["held"] == list(range(3 * (1 - rank), 3 * (1 - rank) + 3))  # rank 0: layers 3-5
        assert rows[rank]["resident_nbytes"] <= rows[rank]["budget_nbytes"] == [1_000_000, 700_000][rank]
    assert rows[0]["misses"] == 0 and rows[1]["misses"] > 0


# -- golem-trace estimate --machines N ---------------------------------------------------------
def test_stage_models_add_up_to_the_model():
    from golem.runtime.analysis.model_size import load_model_spec
    from golem.runtime.analysis.stages import stage_model

    model = load_model_spec("glm-4.6")
    parts = [stage_model(model, r) for r in (range(0, 30), range(30, 61), range(61, model.num_layers))]
    assert sum(p.num_moe_layers for p in parts) == model.num_moe_layers
    shared = model.embedding_params + model.lm_head_params  # every stage keeps them
    total = sum(p.total_params for p in parts) - 2 * shared
    assert abs(total - model.total_params) / model.total_params < 1e-6


def test_link_and_split_estimates():
    from golem.runtime.analysis.estimate import ChunkRouting
    from golem.runtime.analysis.machines import load_machine
    from golem.runtime.analysis.model_size import Quantization, load_model_spec
    from golem.runtime.analysis.stages import (Link, best_split, estimate_split, even_split, hidden_size,
                                               link_seconds, parse_link)

    assert parse_link("5,100us").latency_s == pytest.approx(100e-6) and parse_link("5,1ms").gb_per_s == 5.0
    assert parse_link("2.5") == Link(2.5, 50e-6)
    with pytest.raises(ValueError, match=r"--link 5,fast: latency 'fast' is not a time"):
        parse_link("5,fast")
    model = load_model_spec("glm-5")
    assert hidden_size(model) == 6144
    link = Link(10.0, 50e-6)
    assert link_seconds(model, link, 3) == pytest.approx(4 * (50e-6 + 6144 * 2 / 10e9))
    quant = Quantization.parse("IQ4_XS", None, None)
    machines = [load_machine("m3-max-128g").with_memory(96 * 2**30)] * 3
    routing = ChunkRouting(4000, 600)
    even = estimate_split(model, quant, machines, even_split(model.num_layers, 3), link, routing=routing)
    parts = sum(s.time_s for s in even.stages) - 2 * even.head_s + even.link_s
    assert even.time_s == pytest.approx(parts)
    best = best_split(model, quant, machines, link, routing=routing)
    assert sum(best.split) == model.num_layers and best.time_s <= even.time_s
    with pytest.raises(ValueError, match="3 ranks must share 78 layers"):
        estimate_split(model, quant, machines, (10, 10, 10), link, routing=routing)


def test_golem_trace_estimate_machines(capsys):
    from golem.runtime.cli.trace import main

    assert main(["estimate", "--model", "qwen3-235b-a22b", "--machine", "m3-max-128g", "--u", "2000", "--d", "300",
                 "--machines", "2", "--link", "5,100us", "--split", "40,54", "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out.strip().splitlines()[-1])
    assert data["split"] == [40, 54] and data["machines"] == 2
    assert [s["layers"] for s in data["stages"]] == [[54, 93], [0, 53]]
    assert "split (layers per rank, rank 0 first): 40,54" in out
    assert main(["estimate", "--model", "qwen3-235b-a22b", "--machine", "m3-max-128g", "--u", "2000", "--d", "300",
                 "--machines", "2", "--split", "40,50"]) == 2
    assert "split 40,50: 2 ranks must share 94 layers" in capsys.readouterr().err


# -- golem-server --pipeline: rank 0 serves --------------------------------------------------
def _post(port: int, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _wait_health(port: int, procs, deadline_s: float = 120) -> None:
    import urllib.error
    import urllib.request

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, f"a server rank exited with {dead[0].returncode}"
        time.sleep(0.05)  # a poll interval, not a wait for readiness
    raise AssertionError("golem-server not ready")


@ring
def test_golem_server_pipeline_answers_from_rank_zero(six_layer, tmp_path):
    """2 ranks of ``golem-server --pipeline``: rank 0 answers over HTTP with the text
    single-process golem-server gives (greedy)."""
    from golem.runtime.pipeline import free_ports

    path = str(six_layer["qwen3_moe"])
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    texts = []
    for ranks in (1, 2):
        port = free_ports(1)[0]
        argv = [sys.executable, "-m", "golem.runtime.cli.server", "--model", path, "-c", "4", "--port", str(port),
                "--max-tokens", "12"]
        log = open(tmp_path / f"server{ranks}.log", "w")
        if ranks == 1:
            procs = [subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env())]
        else:
            procs = launch_local(2, argv + ["--pipeline"], hostfile_dir=tmp_path, env=_env(), stdout=log,
                                 stderr=subprocess.STDOUT)
        try:
            _wait_health(port, procs)
            texts.append(_post(port, body)["choices"][0]["text"])
        finally:
            for p in procs:
                p.kill()
                p.wait()
            log.close()
    assert texts[0] and texts[1] == texts[0]



@ring
@pytest.mark.parametrize("flags, message", [
    (["--pipeline", "--trace-out", "t.npz"], "--trace-out with --pipeline: each rank sees only its own layers"),
    ([], "under mlx.launch, give --pipeline"),
])
def test_options_of_the_whole_model_are_refused_on_ranks(six_layer, tmp_path, flags, message):
    """Under 2 ranks, ``--trace-out`` (or no ``--pipeline``): one clear line on every rank,
    exit 2, no rank hangs."""
    argv = [sys.executable, "-m", "golem.runtime.cli.run", "--model", str(six_layer["qwen3_moe"]), "-c", "4",
            "-m", "4", "-p", "hi", *[str(tmp_path / f) if f.endswith(".npz") else f for f in flags]]
    procs = launch_local(2, argv, hostfile_dir=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2
        assert err.strip().splitlines()[-1].startswith(f"golem-run: error: {message}")
