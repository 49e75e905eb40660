"""RuntimeConfig and golem.runtime.load: one options object; every option checked at the
door with a typed error naming it; load() sizes, plans and warms as golem-run does; a
failed load leaves no thread or file behind."""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest

from golem.runtime import ConfigError, RuntimeConfig, load
from golem.runtime.sizing import staging_buffers
from golem.runtime.prefetch import PrefetchConfig
from golem.runtime.sizing import MACHINE_MARGIN, reserve_nbytes
from helpers import greedy_tokens, prompt_tokens, stock


def _open_fds() -> int:
    gc.collect()  # lazily loaded arrays of a failed load close their files when collected
    return len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))


def unwritable_folder(tmp_path) -> str:
    """A folder no file can be created in: a read-only one, or (as root, who may write
    anywhere) one on /proc."""
    if os.geteuid() != 0 or not os.path.isdir("/proc"):
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return str(folder)
    return "/proc"


@pytest.mark.parametrize("fields, words", [
    ({"cache_size": 0}, ["--cache-size", "0"]),
    ({"cache_size": "8"}, ["--cache-size", "'8'"]),
    ({"pin_layers": ""}, ["-f/--pin-layers", "empty"]),
    ({"pin_layers": "3-1"}, ["-f/--pin-layers", "backwards"]),
    ({"cache_size_overrides": [("0-2", "x")]}, ["--cache-size-override", "x"]),
    ({"memory_budget": "1e400B"}, ["--memory-budget", "1e400B"]),
    ({"memory_budget": "lots"}, ["--memory-budget", "lots"]),
    ({"memory_budget": 0}, ["--memory-budget"]),
    ({"policy": "fifo"}, ["--policy", "fifo"]),
    ({"policy": "lfu-decay:decay=nan"}, ["--policy", "decay", "nan"]),
    ({"io_parallelism": 100000}, ["--io-parallelism", "100000"]),
    ({"io_parallelism": 0}, ["--io-parallelism", "0"]),
    ({"emulate_storage": "nan"}, ["--emulate-storage", "nan"]),
    ({"emulate_storage": "inf,80us"}, ["--emulate-storage", "inf"]),
    ({"emulate_storage": "2.5,nanus"}, ["--emulate-storage"]),
    ({"prefetch": PrefetchConfig(depth=2, speculative_nbytes=-5)}, ["--prefetch-cap-mb", "-5"]),
    ({"prefetch": PrefetchConfig(depth=2, speculative_ms=float("nan"))}, ["--prefetch-cap-ms", "nan"]),
    ({"prefetch": PrefetchConfig(depth=2), "predictor": "nope"}, ["--predictor", "nope"]),
    ({"prefetch": PrefetchConfig(depth=2), "predictor": "oracle"}, ["oracle", "--predictor-trace"]),
    ({"predictor_train": ["t.npz"]}, ["--predictor-train", "--prefetch-depth"]),
    ({"warm_start": 1.5}, ["warm_start", "1.5"]),
    ({"cache_sizes": {"1": 2}}, ["cache_sizes", "'1'"]),
    ({"cache_sizes": {1: 0}}, ["cache_sizes", "layer 1"]),
    ({"record_hidden": True}, ["--trace-hidden", "--trace-out"]),
])
def test_bad_options_are_typed_errors_naming_the_option(fields, words):
    with pytest.raises(ConfigError) as err:
        RuntimeConfig(**fields)
    assert isinstance(err.value, ValueError)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_huge_layer_range_is_refused_at_once():
    t0 = time.perf_counter()
    for fields in ({"pin_layers": "0-99999999999"}, {"cache_size_overrides": [("1-99999999999", 8)]}):
        with pytest.raises(ConfigError, match="99999999999"):
            RuntimeConfig(**fields)
    assert time.perf_counter() - t0 < 1.0


def test_policy_specs_with_parameters_are_accepted():
    assert RuntimeConfig(policy="lfu-decay:decay=0.8").policy == "lfu-decay:decay=0.8"


def test_sizes_read_every_way():
    for text in ("48G", "48GB", "4.8e10", 48_000_000_000):
        assert RuntimeConfig(memory_budget=text).memory_budget == 48_000_000_000
    assert RuntimeConfig(memory_budget="48GiB").memory_budget == 48 * 2**30


def test_unknown_option_is_refused_by_load(checkpoints):
    with pytest.raises(ConfigError, match="unknown runtime option 'cache_sise'"):
        load(str(checkpoints("olmoe")), cache_sise=4)


@pytest.mark.parametrize("cache_sizes, words", [
    ({999: 8}, ["layer 999", "MoE layers"]),
    ({0: 8}, ["layer 0", "not an MoE layer"]),  # qwen3_moe's layer 0 is dense
    ({1: 2}, ["layer 1", "top-k (4)"]),
])
def test_cache_sizes_naming_no_moe_layer_are_refused(checkpoints, cache_sizes, words):
    path = str(checkpoints("qwen3_moe"))
    with pytest.raises(ConfigError):
        load(path, cache_sizes=cache_sizes)  # the first call imports what later ones reuse
    threads, fds = threading.active_count(), _open_fds()
    with pytest.raises(ConfigError) as err:
        load(path, cache_sizes=cache_sizes)
    message = str(err.value)
    del err
    assert all(w in message for w in words), message
    assert (threading.active_count(), _open_fds()) == (threads, fds)


@pytest.mark.parametrize("fields, words", [
    ({"pin_layers": "0-99"}, ["-f/--pin-layers", "99", "does not exist"]),
    ({"cache_size": 4, "prefetch": PrefetchConfig(depth=20000)}, ["--prefetch-depth 20000", "MoE layers"]),
    ({"cache_size": 3}, ["--cache-size 3", "top-k (4)"]),
    ({"cache_size": 1000}, ["-c/--cache-size 1000", "only 16 experts", "-c 16 keeps every expert resident"]),
    ({"cache_size": 4, "cache_size_overrides": [("0-1", 17)]}, ["--cache-size-override 0-1 17", "only 16 experts"]),
    ({"cache_size_overrides": [([2, 3], 1000)]}, ["--cache-size-override 2-3 1000", "only 16 experts"]),
])
def test_options_checked_against_the_model(checkpoints, fields, words):
    with pytest.raises(ConfigError) as err:
        load(str(checkpoints("mixtral")), **fields)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_failed_load_closes_its_threads_and_files(checkpoints, monkeypatch):
    """A load that fails after its I/O threads started leaves nothing running or open."""
    import golem.predictors.registry as registry

    path = str(checkpoints("olmoe"))
    with load(path, cache_sizes=4, prefetch=PrefetchConfig(depth=1)):
        pass  # the first load imports and builds what later loads reuse
    threads, fds = threading.active_count(), _open_fds()

    def broken(*args, **kwargs):
        raise RuntimeError("predictor construction failed")

    monkeypatch.setattr(registry, "make_predictor", broken)
    for _ in range(3):
        try:
            load(path, cache_sizes=4, prefetch=PrefetchConfig(depth=1))
        except RuntimeError as e:
            assert "predictor construction failed" in str(e)
        else:
            raise AssertionError("the load did not fail")
    assert threading.active_count() == threads
    assert _open_fds() == fds


def _fds_now() -> int:
    """Open file handles, counted without collecting garbage first."""
    return len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))


@pytest.mark.parametrize("case", ["not a profile", "profile of another shape", "another shape, planned",
                                  "predictor fails after I/O started", "top-k above the experts"])
def test_failed_loads_close_their_files_while_the_caller_keeps_the_errors(checkpoints, tmp_path, monkeypatch, case):
    """Lazily loaded arrays keep the checkpoint's files open: a failed load frees them itself,
    though the kept exceptions hold its frames and the collector does not run."""
    import numpy as np

    import golem.predictors.registry as registry
    from golem.runtime import plan
    from golem.runtime.analysis.profile import profile_from_counts, save_profile

    path = str(checkpoints("olmoe"))
    other = save_profile(profile_from_counts(np.ones((2, 3)), top_k=1, num_steps=1), tmp_path / "other.json")
    depth = PrefetchConfig(depth=1)
    attempt = {
        "not a profile": lambda: load(path, cache_sizes=4, prefetch=depth, warm_start=path + "/config.json"),
        "profile of another shape": lambda: load(path, cache_sizes=4, prefetch=depth, warm_start=str(other)),
        "another shape, planned": lambda: plan(path, memory_budget="30MB", warm_start=str(other)),
        "predictor fails after I/O started": lambda: load(path, cache_sizes=4, prefetch=depth),
        "top-k above the experts": lambda: load(path, cache_sizes=4, model_config={"num_experts_per_tok": 99}),
    }[case]
    if case.startswith("predictor"):
        def broken(*args, **kwargs):
            raise RuntimeError("predictor construction failed")

        monkeypatch.setattr(registry, "make_predictor", broken)
    with pytest.raises((ValueError, RuntimeError)):
        attempt()  # the first call imports what later ones reuse
    kept = []
    gc.disable()
    try:
        threads, fds = threading.active_count(), _fds_now()
        for _ in range(3):
            with pytest.raises((ValueError, RuntimeError)) as err:
                attempt()
            kept.append(err.value)
        after = (threading.active_count(), _fds_now())
    finally:
        gc.enable()
    assert after == (threads, fds), f"{after[1] - fds} files, {after[0] - threads} threads left open"
    if "shape" in case:
        assert "made for 2 layers x 3 experts" in str(kept[0]), str(kept[0])


def test_saved_profile_names_the_model_by_its_identity(checkpoints, tmp_path, monkeypatch):
    import shutil

    from golem.runtime.analysis.profile import load_profile, model_identity

    monkeypatch.setenv("GOLEM_CACHE", str(tmp_path / "cache"))
    shutil.copytree(checkpoints("olmoe"), tmp_path / "olmoe")
    monkeypatch.chdir(tmp_path)
    with load("olmoe", cache_sizes=4, save_profile=True) as (model, tok):  # a relative path
        greedy_tokens(model, prompt_tokens(tok), 2)
    saved = load_profile(tmp_path / "cache" / "profiles" / "olmoe" / "golem-profile.json")
    assert saved.meta["model"] == model_identity("olmoe") == str((tmp_path / "olmoe").resolve())


def test_a_garbled_tokenizer_is_a_model_error_naming_the_file(checkpoints, tmp_path):
    import shutil

    from golem.runtime.checkpoint import ModelError

    model = tmp_path / "m"
    shutil.copytree(checkpoints("olmoe"), model)
    (model / "tokenizer.json").write_text("{garbage")
    threads = threading.active_count()
    with pytest.raises(ModelError) as err:
        load(str(model), cache_sizes=4)
    assert str(err.value).startswith(f"{model / 'tokenizer.json'}: cannot load the model's tokenizer"), str(err.value)
    del err
    assert threading.active_count() == threads


def test_config_object_and_keywords_are_one_thing(checkpoints):
    path = str(checkpoints("olmoe"))
    config = RuntimeConfig(cache_size=4, policy="lru")
    with load(path, config) as a, load(path, config, cache_size=6) as b:
        assert {p.cache_size for p in a.runtime.engine.pools.values()} == {4}
        assert {p.cache_size for p in b.runtime.engine.pools.values()} == {6}
        assert a.runtime.options == config and b.runtime.options.policy == "lru"


def test_staging_buffers_follow_depth_and_top_k(checkpoints):
    path = str(checkpoints("olmoe"))
    for depth in (0, 2):
        prefetch = PrefetchConfig(depth=depth) if depth else None
        with load(path, cache_sizes=4, prefetch=prefetch) as (model, _):
            assert model.golem.engine.scheduler.settings.num_buffers == staging_buffers(4, depth) == max(4, 2 * 4 * (depth + 1) + 2)


def test_load_with_a_budget_picks_the_plan_golem_run_prints(checkpoints, capsys, tmp_path, monkeypatch):
    from golem.runtime.cli.run import main as golem_run

    monkeypatch.setenv("GOLEM_CACHE", str(tmp_path / "cache"))
    path = str(checkpoints("deepseek_v3"))
    for options, argv in [
        ({"memory_budget": "1.5MB"}, ["--memory-budget", "1.5MB"]),
        ({"memory_budget": "1.5MB", "pin_layers": "1"}, ["--memory-budget", "1.5MB", "-f", "1"]),
        ({"memory_budget": "1.5MB", "warm_start": 7}, ["--memory-budget", "1.5MB", "-R", "7"]),
        ({"cache_size": 5, "cache_size_overrides": [("2", 8)]}, ["-c", "5", "--cache-size-override", "2", "8"]),
    ]:
        with load(path, **options) as loaded:
            plan = loaded.plan
            sizes = {l: p.cache_size for l, p in loaded.runtime.engine.pools.items()}
        assert golem_run(["--model", path, *argv, "--plan"]) == 0
        printed = capsys.readouterr().out
        assert plan.describe() in printed, (options, printed)
        assert sizes == {lp.layer_id: lp.cache_size for lp in plan.layers}


def test_warm_start_fills_the_caches_before_the_first_token(checkpoints):
    path = str(checkpoints("olmoe"))
    with load(path, cache_sizes=6, warm_start=3) as (model, _):
        resident = {l: len(p.resident()) for l, p in model.golem.engine.pools.items()}
    assert set(resident.values()) == {6}


def test_sized_to_the_machine_when_nothing_sizes_it(checkpoints, monkeypatch):
    """No cache option: everything resident when it fits the machine, a plan when it does not."""
    monkeypatch.delenv("GOLEM_MEMORY_LIMIT", raising=False)
    path = checkpoints("qwen3_moe")
    tokens_model, tok = stock(path)
    tokens = prompt_tokens(tok)
    expected = greedy_tokens(tokens_model, tokens, 8)
    with load(str(path)) as (model, _):
        runtime = model.golem
        assert all(p.fully_resident for p in runtime.engine.pools.values())
        assert "fits: every expert resident" in runtime.sizing_note
        everything = runtime.plan.total_nbytes
        memory = runtime.plan.model
    smallest = (memory.non_expert_nbytes + reserve_nbytes(memory, 0)
                + sum(memory.top_k * memory.nbytes_of(i) for i in range(memory.num_layers)))
    limit = int((smallest + everything) / 2 / (1 - MACHINE_MARGIN))  # between the smallest plan and all
    with load(str(path), memory_limit=limit) as (model, _):
        runtime = model.golem
        assert not all(p.fully_resident for p in runtime.engine.pools.values())
        assert "does not fit" in runtime.sizing_note and "GOLEM" not in runtime.sizing_note
        assert runtime.plan.total_nbytes <= limit * (1 - MACHINE_MARGIN)
        assert greedy_tokens(model, tokens, 8) == expected
    with pytest.raises(ConfigError, match="too small"):
        load(str(path), memory_limit=1000)


def test_close_writes_the_trace_and_profile(checkpoints, tmp_path, monkeypatch):
    from golem.runtime.trace import load_trace

    monkeypatch.setenv("GOLEM_CACHE", str(tmp_path / "cache"))
    path = checkpoints("olmoe")
    out = tmp_path / "run.npz"
    loaded = load(str(path), cache_sizes=4, trace_out=str(out), save_profile=True)
    with loaded as (model, tok):
        greedy_tokens(model, prompt_tokens(tok), 4)
        assert not out.exists()  # written when the run is over
    assert load_trace(out).num_steps > 0
    assert (tmp_path / "cache" / "profiles" / "olmoe" / "golem-profile.json").is_file()
    with load(str(path), cache_sizes=4, warm_start="saved") as (model, _):
        assert all(len(p.resident()) == 4 for p in model.golem.engine.pools.values())


@pytest.mark.parametrize("target, words", [
    ("file/x.npz", ["--trace-out", "is a file, not a folder"]),
    ("folder", ["--trace-out", "is a folder"]),
    ("missing/x.npz", ["--trace-out", "does not exist"]),
    ("read-only", ["--trace-out", "cannot write"]),
])
def test_output_paths_are_checked_before_loading(checkpoints, tmp_path, target, words):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    trace_out = (f"{unwritable_folder(tmp_path)}/t.npz" if target == "read-only" else str(tmp_path / target))
    threads = threading.active_count()
    with pytest.raises(ConfigError) as err:
        load(str(checkpoints("olmoe")), cache_sizes=4, trace_out=trace_out)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert threading.active_count() == threads
    assert not list((tmp_path / "folder").iterdir())


def test_save_profile_into_an_unwritable_cache_is_refused_first(checkpoints, monkeypatch, tmp_path):
    monkeypatch.setenv("GOLEM_CACHE", f"{unwritable_folder(tmp_path)}/golem-cache")
    with pytest.raises(ConfigError, match="--save-profile.*cannot write"):
        load(str(checkpoints("olmoe")), cache_sizes=4, save_profile=True)


def test_machine_memory_sources(monkeypatch):
    from golem.runtime.sizing import machine_memory

    monkeypatch.delenv("GOLEM_MEMORY_LIMIT", raising=False)
    measured = machine_memory()
    assert measured.nbytes > 0 and measured.source
    assert measured.budget_nbytes == int(measured.nbytes * (1 - MACHINE_MARGIN))
    monkeypatch.setenv("GOLEM_MEMORY_LIMIT", "3GiB")
    assert machine_memory() == type(measured)(3 * 2**30, "GOLEM_MEMORY_LIMIT")
    assert machine_memory(5_000).nbytes == 5_000  # the library option wins
    monkeypatch.setenv("GOLEM_MEMORY_LIMIT", "lots")
    with pytest.raises(ConfigError, match="GOLEM_MEMORY_LIMIT"):
        machine_memory()
