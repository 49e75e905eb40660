"""Every runtime option is declared once (golem.runtime.options): the flags of golem-run,
golem-chat and golem-server, the fields of RuntimeConfig and the keywords of load() and
plan() are derived from the declarations; the library checks its arguments as the flags do;
a model dropped without close() releases what it started; close() never raises."""

from __future__ import annotations

import dataclasses
import gc
import inspect
import os
import re
import threading
import warnings

import pytest

from golem.runtime import ConfigError, RuntimeConfig, load, plan
from golem.runtime import options as declarations
from golem.runtime.prefetch import PrefetchConfig
from helpers import greedy_tokens, prompt_tokens, stock

COMMANDS = ("golem-run", "golem-chat", "golem-server")


def _help(command: str, capsys) -> str:
    from golem.runtime.cli import chat, run, server

    main = {"golem-run": run.main, "golem-chat": chat.main, "golem-server": server.main}[command]
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def _golem_sections(help_text: str) -> str:
    """The part of ``--help`` listing golem's runtime flags (the groups named '... (golem)')."""
    sections = re.split(r"\n(?=\S[^\n]*:\n)", help_text)
    return "\n".join(s for s in sections if s.split("\n", 1)[0].endswith("(golem):"))


def _flags_listed(section: str) -> list:
    """Every flag that starts an entry of an argparse help section, in order."""
    flags = []
    for line in section.splitlines():
        if line.startswith("  -"):
            invocation = line.strip().split("  ")[0]  # "-c CACHE_SIZE, --cache-size CACHE_SIZE"
            flags.extend(part.split()[0] for part in invocation.split(", "))
    return flags


def _fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))


def test_every_option_is_declared_once():
    options = declarations.declared()
    names = [o.name for o in options]
    flags = [f for o in options for f in o.flags]
    aliases = [a for o in options for a in o.aliases]
    assert len(set(names)) == len(names)
    assert len(set(flags)) == len(flags)
    assert not set(aliases) & set(names) and len(set(aliases)) == len(aliases)
    for o in options:  # each field is named as its flag
        if o.flags:
            assert o.long_flag == "--" + o.name.replace("_", "-"), o
            assert o.group.endswith("(golem)")


def test_flags_fields_and_keywords_derive_from_the_declarations(capsys):
    from golem.runtime.cli.run import setup_arg_parser

    options = declarations.declared()
    with_flags = [o for o in options if o.flags]
    # golem-run's parser: one action per declared option, its flags, and no default of its own
    parser = setup_arg_parser()
    golem_actions = [a for g in parser._action_groups if g.title and g.title.endswith("(golem)")
                     for a in g._group_actions]
    assert [a.dest for a in golem_actions] == [o.name for o in with_flags]
    for action, o in zip(golem_actions, with_flags):
        assert tuple(action.option_strings) == o.all_flags
        assert action.default is None, f"{o.name}: argparse default {action.default!r}; the declaration's is the one"
    # every command's --help lists each declared flag once, and no golem flag besides
    for command in COMMANDS:
        listed = _flags_listed(_golem_sections(_help(command, capsys)))
        assert listed == [f for o in with_flags for f in o.all_flags], command
    # RuntimeConfig's fields and load()/plan()'s keywords: the declared names and defaults
    assert RuntimeConfig.field_names() == [o.name for o in options]
    for function in (load, plan, RuntimeConfig):
        params = inspect.signature(function).parameters
        for o in options:
            assert params[o.name].kind is inspect.Parameter.KEYWORD_ONLY
            assert params[o.name].default == o.default, (function, o.name)
    defaults = RuntimeConfig()
    assert all(getattr(defaults, o.name) == o.default for o in options)
    # the structured prefetch form takes its defaults from the same declarations
    assert PrefetchConfig(depth=1).threshold == declarations.default_of("threshold")
    assert PrefetchConfig(depth=1).speculative_ms == declarations.default_of("prefetch_cap_ms")


def test_changing_a_declared_default_changes_help_and_load(checkpoints, capsys, monkeypatch):
    for name, value in (("threshold", 0.55), ("policy", "lru"), ("prefetch_cap_ms", 7.5)):
        monkeypatch.setitem(declarations.BY_NAME, name, dataclasses.replace(declarations.option(name), default=value))
    for command in COMMANDS:
        text = " ".join(_golem_sections(_help(command, capsys)).split())
        assert "(default 0.55)" in text and "(default lru," in text and "(default: 7.5)" in text, command
    with load(str(checkpoints("olmoe")), cache_sizes=6, prefetch_depth=1) as loaded:
        runtime = loaded.runtime
        assert runtime.options.threshold == 0.55 and runtime.options.prefetch.threshold == 0.55
        assert runtime.engine.prefetcher.selection.threshold == 0.55
        assert runtime.engine.scheduler.settings.speculative_s == pytest.approx(0.0075)
        assert {type(p.policy).__name__ for p in runtime.engine.pools.values()} == {"LRUPolicy"}
    assert RuntimeConfig().policy == "lru"


def test_prefetch_options_flat_or_structured(checkpoints):
    flat = RuntimeConfig(prefetch_depth=2, threshold=0.2, prefetch_cap_mb=1.5)
    structured = RuntimeConfig(prefetch=PrefetchConfig(depth=2, threshold=0.2, speculative_nbytes=1_500_000))
    assert flat == structured
    assert flat.prefetch == PrefetchConfig(depth=2, threshold=0.2, speculative_nbytes=1_500_000)
    assert RuntimeConfig(prefetch=PrefetchConfig(depth=0)) == RuntimeConfig()
    with pytest.raises(ConfigError, match="--prefetch-depth 3 and prefetch=.*disagree"):
        RuntimeConfig(prefetch=PrefetchConfig(depth=2), prefetch_depth=3)
    tuned = RuntimeConfig(prefetch=PrefetchConfig(depth=2, recall_off=0.1))
    deeper = tuned.replace(prefetch_depth=3)
    assert (deeper.prefetch.depth, deeper.prefetch.recall_off, deeper.prefetch_depth) == (3, 0.1, 3)
    assert tuned.replace(prefetch_depth=0).prefetch is None
    # older keyword names still work, under the name of the flag
    assert RuntimeConfig(cache_size_overrides=[("1", 8)]).cache_size_override == (("1", 8),)
    with pytest.raises(ConfigError, match="another name of cache_size_override"):
        RuntimeConfig(cache_size_overrides=[("1", 8)], cache_size_override=[("1", 8)])


def test_load_takes_flat_prefetch_options_and_keeps_tokens(checkpoints):
    path = checkpoints("qwen3_moe")
    model, tok = stock(path)
    tokens = prompt_tokens(tok)
    expected = greedy_tokens(model, tokens, 8)
    with load(str(path), cache_size=4, prefetch_depth=2, threshold=0.1) as (golem_model, _):
        assert golem_model.golem.engine.prefetcher is not None
        assert greedy_tokens(golem_model, tokens, 8) == expected


@pytest.mark.parametrize("fields, argv", [
    ({"threshold": 1.5, "prefetch_depth": 1}, ["--threshold", "1.5", "--prefetch-depth", "1"]),
    ({"prefetch_depth": -1}, ["--prefetch-depth", "-1"]),
    ({"prefetch_cap_ms": 0.0, "prefetch_depth": 1}, ["--prefetch-cap-ms", "0", "--prefetch-depth", "1"]),
    ({"prefetch_cap_mb": -2.0, "prefetch_depth": 1}, ["--prefetch-cap-mb", "-2", "--prefetch-depth", "1"]),
    ({"threshold": 0.5, "prefetch_depth": 0}, ["--threshold", "0.5", "--prefetch-depth", "0"]),
    ({"warm_random": 1, "warm_start": "x.npz"}, ["-R", "1", "-W", "x.npz"]),
    ({"warm_random": -3}, ["-R", "-3"]),
    ({"io_parallelism": 0}, ["--io-parallelism", "0"]),
    ({"slot_writer": "gpu"}, ["--slot-writer", "gpu"]),
    ({"policy": "fifo"}, ["--policy", "fifo"]),
    ({"cache_size": 0}, ["-c", "0"]),
    ({"trace_hidden": True}, ["--trace-hidden"]),
    ({"emulate_storage": "fast"}, ["--emulate-storage", "fast"]),
])
def test_library_and_flags_give_the_same_message(checkpoints, capsys, fields, argv):
    from golem.runtime.cli.run import main as golem_run

    with pytest.raises(ConfigError) as err:
        load(str(checkpoints("olmoe")), **fields)
    assert golem_run(["--model", str(checkpoints("olmoe")), "-m", "1", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"golem-run: error: {err.value}"


@pytest.mark.parametrize("fields, words", [
    ({"config": "cache_size=4"}, ["config:", "RuntimeConfig", "got str"]),
    ({"config": {"cache_size": 4}}, ["config:", "got dict", "as keywords"]),
    ({"direct_io": "no"}, ["--direct-io", "True or False", "'no'"]),
    ({"save_profile": "no"}, ["--save-profile", "True or False", "'no'"]),
    ({"trace_hidden": 1}, ["--trace-hidden", "True or False"]),
    ({"record": "yes"}, ["record", "True or False"]),
    ({"prefetch_depth": "2"}, ["--prefetch-depth", "whole number", "'2'"]),
    ({"prefetch_depth": 2.0}, ["--prefetch-depth", "whole number"]),
    ({"threshold": float("nan"), "prefetch_depth": 1}, ["--threshold", "nan"]),
    ({"threshold": "0.3", "prefetch_depth": 1}, ["--threshold", "'0.3'"]),
    ({"prefetch": {"depth": 2}}, ["prefetch", "PrefetchConfig", "dict"]),
    ({"prefetch": PrefetchConfig(depth=-1)}, ["--prefetch-depth", "-1"]),
    ({"prefetch": PrefetchConfig(depth=1, threshold=2.0)}, ["--threshold", "2.0"]),
    ({"prefetch": PrefetchConfig(depth=1, recall_off=-1.0)}, ["recall_off", "-1.0"]),
    ({"throttle": "2.5"}, ["throttle", "Throttle", "str"]),
    ({"predictor_options": [("truth", 1)]}, ["predictor_options", "dict", "list"]),
    ({"memory_limit": "lots"}, ["memory_limit", "lots"]),
    ({"trace_out": 5}, ["--trace-out", "file path", "5"]),
    ({"warm_start": 2.5}, ["warm_start", "2.5"]),
    ({"predictor_train": 7, "prefetch_depth": 1}, ["--predictor-train", "7"]),
    ({"cache_size_override": "0-1 8"}, ["--cache-size-override", "pairs"]),
    ({"pin_layers": 3}, ["-f/--pin-layers", "3"]),
    ({"cache_sizes": "4"}, ["cache_sizes", "'4'"]),
    ({"model_config": "num_experts_per_tok=2"}, ["model_config", "dict", "str"]),
    ({"tokenizer_config": ["x"]}, ["tokenizer_config", "dict", "list"]),
    ({"adapter_path": 3}, ["adapter_path", "3"]),
    ({"trust_remote_code": "yes"}, ["trust_remote_code", "True or False", "'yes'"]),
])
def test_library_arguments_are_checked_by_type_and_range(checkpoints, fields, words):
    threads = threading.active_count()
    with pytest.raises(ConfigError) as err:
        load(str(checkpoints("olmoe")), **fields)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert threading.active_count() == threads
    if not {"config", "model_config", "tokenizer_config", "adapter_path", "trust_remote_code"} & set(fields):
        with pytest.raises(ConfigError, match=re.escape(message)):
            plan(str(checkpoints("olmoe")), **fields)


@pytest.mark.parametrize("cache_sizes, words", [
    ({1: 17}, ["cache_sizes: layer 1: 17 slots", "only 16 experts"]),
    (lambda opened: {1: 40}, ["cache_sizes: layer 1: 40 slots", "only 16 experts"]),
    (lambda opened: 17, ["cache_sizes 17", "only 16 experts", "cache_sizes=16"]),
    (17, ["cache_sizes 17", "only 16 experts"]),
    (lambda opened: "many", ["cache_sizes", "'many'"]),
    (lambda opened: {99: 4}, ["layer 99", "not an MoE layer"]),
    (lambda opened: {1: 2}, ["layer 1", "top-k (4)"]),
])
def test_cache_sizes_beyond_the_expert_count_are_refused(checkpoints, cache_sizes, words):
    path = str(checkpoints("olmoe"))
    with pytest.raises(ConfigError):
        load(path, cache_sizes=cache_sizes)  # the first call imports what later ones reuse
    threads, fds = threading.active_count(), _fds()
    with pytest.raises(ConfigError) as err:
        load(path, cache_sizes=cache_sizes)
    message = str(err.value)
    del err
    assert all(w in message for w in words), message
    assert (threading.active_count(), _fds()) == (threads, fds)


def test_a_full_capacity_is_accepted(checkpoints):
    path = str(checkpoints("olmoe"))
    with load(path, cache_sizes=lambda opened: {l: 16 for l in opened.layers}) as loaded:
        assert all(p.fully_resident for p in loaded.runtime.engine.pools.values())


def test_a_dropped_model_releases_its_threads_and_files(checkpoints):
    path = str(checkpoints("olmoe"))
    with load(path, cache_sizes=4, prefetch_depth=1):
        pass  # imports and builds what later loads reuse
    threads, fds = threading.active_count(), _fds()
    with pytest.warns(ResourceWarning, match="dropped without close"):
        for _ in range(4):
            model, tokenizer = load(path, cache_sizes=4, prefetch_depth=1)
            assert threading.active_count() > threads  # its I/O threads run while it is held
            del model, tokenizer
            gc.collect()
    assert threading.active_count() == threads
    assert _fds() == fds
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a closed model warns of nothing when collected
        loaded = load(path, cache_sizes=4, prefetch_depth=1)
        loaded.close()
        del loaded
        gc.collect()


def test_close_never_raises_when_nothing_was_generated(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("GOLEM_CACHE", str(tmp_path / "cache"))
    path = str(checkpoints("olmoe"))
    out = tmp_path / "run.npz"
    out.write_bytes(b"an older trace")
    with pytest.warns(RuntimeWarning, match="nothing was generated, so trace_out and save_profile wrote nothing"):
        with load(path, cache_sizes=4, trace_out=str(out), save_profile=True):
            pass
    assert out.read_bytes() == b"an older trace"
    assert not (tmp_path / "cache" / "profiles").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(path, cache_sizes=4).close()  # nothing asked to be kept: nothing to say
        loaded = load(path, cache_sizes=4, record=True)
        loaded.close()
        loaded.close()  # twice is harmless


@pytest.mark.parametrize("path", [None, 42, ""])
def test_a_path_that_is_no_path_is_refused(path):
    for function in (load, plan):
        with pytest.raises(ConfigError, match="path: expected a model folder"):
            function(path)
