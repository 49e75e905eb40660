"""golem-run feels like mlx_lm.generate: every one of its flags, its output conventions, its
text; sized to the machine by default; the demo explains itself."""

from __future__ import annotations

import argparse
import sys

import pytest

from golem.runtime.cli.demo import printable
from golem.runtime.cli.run import main as golem_run
from golem.runtime.cli.run import setup_arg_parser
from test_config import unwritable_folder

PROMPT = ["-p", "Once upon a time there was a small computer", "-m", "12"]


def _stock(argv, capsys, monkeypatch) -> str:
    from mlx_lm.generate import main as mlx_generate

    monkeypatch.setattr(sys, "argv", ["mlx_lm.generate", *argv])
    mlx_generate()
    return capsys.readouterr().out


def _golem(argv, capsys):
    code = golem_run(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, captured.err


def _value_for(action: argparse.Action) -> list:
    """Arguments that make ``action`` parse: one value of its type (several for nargs='+')."""
    if action.nargs == 0:
        return []
    kind = action.type
    if kind is int:
        value = "3"
    elif kind is float:
        value = "0.5"
    elif action.dest == "verbose":
        value = "False"
    elif action.choices:
        value = str(list(action.choices)[0])
    else:
        value = "x"
    return [value, value] if action.nargs in ("+", "*", 2) else [value]


def test_every_mlx_lm_generate_flag_is_accepted():
    from mlx_lm.generate import setup_arg_parser as mlx_lm_parser

    ours = setup_arg_parser()
    theirs = mlx_lm_parser()
    checked = 0
    for action in theirs._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        for option in action.option_strings:
            argv = [option, *_value_for(action)]
            expected = getattr(theirs.parse_args(argv), action.dest)
            assert getattr(ours.parse_args(argv), action.dest) == expected, option
            checked += 1
    assert checked >= 30  # mlx-lm 0.32 has about 35 option strings


@pytest.mark.parametrize("flags", [
    [],
    ["--top-k", "3", "--temp", "0.8", "--seed", "4"],
    ["--min-p", "0.1", "--temp", "0.7", "--seed", "1"],
    ["--max-kv-size", "16"],
    ["--system-prompt", "Be brief."],
    ["--prefill-response", "Sure"],
    ["--extra-eos-token", "you"],
    ["--ignore-chat-template"],
])
def test_mlx_lm_flags_give_mlx_lm_text(checkpoints, capsys, monkeypatch, flags):
    model = ["--model", str(checkpoints("qwen3_moe"))]
    stock = _stock([*model, *PROMPT, *flags], capsys, monkeypatch)
    out, _ = _golem([*model, *PROMPT, *flags, "-c", "5"], capsys)
    assert out.split("=" * 10)[1] == stock.split("=" * 10)[1]
    assert "Experts: hit rate" in out


def test_draft_model_gives_mlx_lm_text(checkpoints, capsys, monkeypatch):
    path = str(checkpoints("olmoe"))
    argv = ["--model", path, *PROMPT, "--draft-model", path, "--num-draft-tokens", "2"]
    stock = _stock(argv, capsys, monkeypatch)
    out, _ = _golem([*argv, "-c", "4"], capsys)
    assert out.split("=" * 10)[1] == stock.split("=" * 10)[1]


def test_verbose_false_prints_the_text_as_mlx_lm_does(checkpoints, capsys, monkeypatch):
    argv = ["--model", str(checkpoints("olmoe")), *PROMPT, "--verbose", "False"]
    stock = _stock(argv, capsys, monkeypatch)
    out, err = _golem([*argv, "-c", "4"], capsys)
    assert out == stock and out.strip()
    assert "Experts" not in out and "[golem]" not in err


def test_flags_golem_cannot_honour_are_clear_errors(checkpoints, capsys, tmp_path):
    path = str(checkpoints("olmoe"))
    for argv, words in [
        (["--quantize-activations"], ["--quantize-activations"]),
        (["--adapter-path", str(tmp_path / "none")], ["--adapter-path", "none"]),
        (["--chat-template-config", "{oops"], ["--chat-template-config"]),
        (["--chat-template-config", "[1]"], ["--chat-template-config", "JSON object"]),
        (["--draft-model", str(tmp_path / "no-draft")], ["--draft-model", "no-draft"]),
    ]:
        assert golem_run(["--model", path, "-c", "4", "-m", "2", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and all(w in err for w in words), (argv, err)


def test_a_plain_run_sizes_itself_to_the_machine(checkpoints, capsys, monkeypatch):
    """No -c and no --memory-budget: a model larger than the memory limit is offloaded."""
    from golem.runtime import plan

    monkeypatch.delenv("GOLEM_MEMORY_LIMIT", raising=False)
    path = str(checkpoints("qwen3_moe"))
    stock = _stock(["--model", path, *PROMPT], capsys, monkeypatch)
    everything = plan(path).plan.total_nbytes
    out, err = _golem(["--model", path, *PROMPT], capsys)
    assert "every expert resident" in err and "Experts: all resident" in out and "hit rate" not in out
    monkeypatch.setenv("GOLEM_MEMORY_LIMIT", str(int(everything * 0.95)))
    # depth 0: the staging buffers of the default governed prefetch would be a third of this tiny model
    out, err = _golem(["--model", path, *PROMPT, "--prefetch-depth", "0"], capsys)
    line = [l for l in err.splitlines() if "sized to this machine" in l]
    assert len(line) == 1 and "GOLEM_MEMORY_LIMIT" in line[0] and "does not fit" in line[0], err
    assert out.split("=" * 10)[1] == stock.split("=" * 10)[1]
    assert "Experts: hit rate" in out and int(out.split("Experts:")[1].split(" read (")[0].rsplit(" ", 1)[-1]) > 0
    assert golem_run(["--model", path, "--plan", "--prefetch-depth", "0"]) == 0
    printed = capsys.readouterr().out
    assert "sized to this machine" in printed and "non-expert bytes" in printed and "staging buffers" in printed
    monkeypatch.setenv("GOLEM_MEMORY_LIMIT", "1KB")
    assert golem_run(["--model", path, *PROMPT]) == 2
    err = capsys.readouterr().err
    assert "too small" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, words", [
    (["-f", "0-99999999999"], ["-f/--pin-layers", "99999999999"]),
    (["-f", ""], ["-f/--pin-layers", "empty"]),
    (["-f", "0-40"], ["-f/--pin-layers", "40", "does not exist"]),
    (["--cache-size-override", "1-99999999999", "8"], ["--cache-size-override", "99999999999"]),
    (["-c", "4", "--prefetch-depth", "20000"], ["--prefetch-depth 20000"]),
    (["-c", "4", "--io-parallelism", "100000"], ["--io-parallelism", "100000"]),
    (["-c", "4", "--emulate-storage", "nan"], ["--emulate-storage", "nan"]),
    (["-c", "4", "--prefetch-depth", "2", "--prefetch-cap-mb=-5"], ["--prefetch-cap-mb", "-5"]),
    (["-c", "4", "--prefetch-depth", "2", "--prefetch-cap-ms", "inf"], ["--prefetch-cap-ms", "inf"]),
    (["-c", "4", "--prefetch-depth", "0", "--threshold", "0.5"], ["--threshold", "--prefetch-depth"]),
    (["-c", "4", "--prefetch-depth", "0", "--predictor", "transition"], ["--predictor", "--prefetch-depth"]),
    (["-c", "4", "--no-prefetch-governor"], ["--no-prefetch-governor", "--prefetch-depth"]),
    (["-c", "4", "--prefetch-depth", "1", "--predictor", "nope"], ["--predictor", "nope"]),
    (["--memory-budget", "1e400B"], ["--memory-budget", "1e400B"]),
    (["--memory-budget", "48G", "-m", "0"], ["--max-tokens"]),
    (["-c", "4", "--seed", "-1"], ["--seed", "-1"]),
    (["-c", "4", "--prompt-cache-file", "/nonexistent/cache.safetensors"], ["--prompt-cache-file", "/nonexistent"]),
    (["-c", "1000"], ["-c/--cache-size 1000", "only 16 experts", "-c 16 keeps every expert resident"]),
    (["-c", "4", "--cache-size-override", "0-1", "17"], ["--cache-size-override 0-1 17", "only 16 experts"]),
])
def test_bad_flags_answer_at_once_in_one_line(checkpoints, capsys, argv, words):
    import time

    t0 = time.perf_counter()
    assert golem_run(["--model", str(checkpoints("mixtral")), "-m", "2", *argv]) == 2
    captured = capsys.readouterr()
    assert time.perf_counter() - t0 < 10
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1
    assert all(w in captured.err for w in words), captured.err
    assert "=" * 10 not in captured.out  # nothing was generated


@pytest.mark.parametrize("where", ["under-file", "folder", "missing", "unwritable"])
def test_output_paths_are_checked_before_generation(checkpoints, capsys, tmp_path, where):
    (tmp_path / "file").write_text("x")
    target = {"under-file": tmp_path / "file" / "t.npz", "folder": tmp_path,
              "missing": tmp_path / "no" / "t.npz", "unwritable": f"{unwritable_folder(tmp_path)}/t.npz"}[where]
    assert golem_run(["--model", str(checkpoints("olmoe")), "-c", "4", "-m", "2", "--trace-out", str(target)]) == 2
    captured = capsys.readouterr()
    assert "--trace-out" in captured.err and "Traceback" not in captured.err
    assert "=" * 10 not in captured.out
    assert not list(tmp_path.glob("*.tmp*"))


def test_save_profile_into_a_read_only_cache_fails_before_generation(checkpoints, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("GOLEM_CACHE", f"{unwritable_folder(tmp_path)}/golem-cache")
    assert golem_run(["--model", str(checkpoints("olmoe")), "-c", "4", "-m", "2", "--save-profile"]) == 2
    captured = capsys.readouterr()
    assert "--save-profile" in captured.err and "Traceback" not in captured.err and "=" * 10 not in captured.out


@pytest.mark.parametrize("change, words", [
    (lambda c: "{not json", ["config.json", "not valid JSON"]),
    (lambda c: [1, 2], ["config.json", "not a JSON object"]),
    (lambda c: {k: v for k, v in c.items() if k != "model_type"}, ["config.json", "'model_type'"]),
    (lambda c: {k: v for k, v in c.items() if k != "num_experts_per_tok"}, ["config.json", "'num_experts_per_tok'"]),
    (lambda c: {k: v for k, v in c.items() if k != "num_experts"}, ["config.json", "'num_experts'"]),
    (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, ["config.json", "'hidden_size'"]),
    (lambda c: {**c, "num_experts_per_tok": "4"}, ["config.json", "'num_experts_per_tok'", "whole number"]),
    (lambda c: {**c, "num_experts_per_tok": 99}, ["config.json", "top-k 99", "16 experts"]),
])
def test_config_json_mistakes_name_the_file_and_field(checkpoints, capsys, tmp_path, change, words):
    import json
    import shutil

    src = checkpoints("qwen3_moe")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    changed = change(json.loads((src / "config.json").read_text()))
    (dst / "config.json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    assert golem_run(["--model", str(dst), "-c", "4", "-m", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--cache-size" not in err and "missing from the checkpoint" not in err
    assert all(w in err for w in words), err


def test_image_without_pillow_names_the_vision_extra(checkpoints, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL -> ImportError, as without Pillow
    argv = ["--model", str(checkpoints("olmoe")), "-c", "4", "-m", "2", "--image", str(tmp_path / "cat.png")]
    assert golem_run(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert "--image" in lines[0] and 'pip install "golem-moe[vision]"' in lines[0]
    assert "=" * 10 not in captured.out


def test_a_garbled_tokenizer_names_the_model_folder_and_file(checkpoints, capsys, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(checkpoints("olmoe"), model)
    (model / "tokenizer.json").write_text("{garbage")
    assert golem_run(["--model", str(model), "-c", "4", "-m", "2"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{model / 'tokenizer.json'}:" in lines[0] and "tokenizer" in lines[0]


def test_printable_escapes_control_characters():
    assert printable("a\x07b\x08c\nd\x1b") == "a\\x07b\\x08c\nd\\x1b"
    assert printable("héllo ✓") == "héllo ✓"


def test_demo_explains_itself_and_matches_mlx_lm(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("GOLEM_CACHE", str(tmp_path / "cache"))
    out, err = _golem(["--demo", "-m", "24"], capsys)
    lines = out.splitlines()
    assert "RANDOM weights" in out
    assert all(c == "\n" or c.isprintable() for c in out)
    assert "8 of 32" in out and "Hit rate" in out and "Stall" in out
    assert lines[-1].startswith("Matches stock mlx-lm: yes")


def _adapters(path, out, keys, fine_tune_type="lora"):
    """A LoRA adapter folder for ``path`` on the modules ``keys`` of its last two layers,
    with non-zero weights (so it changes the text)."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm_load(str(path))
    model.freeze()
    params = {"rank": 4, "scale": 4.0, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, 2, params)
    mx.random.seed(0)
    weights = {k: mx.random.normal(v.shape) * 0.5 for k, v in tree_flatten(model.trainable_parameters())}
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": fine_tune_type, "num_layers": 2, "lora_parameters": params}))
    return out


def test_adapters_on_resident_weights_give_mlx_lm_text(checkpoints, capsys, monkeypatch, tmp_path):
    path = checkpoints("qwen3_moe")
    adapters = _adapters(path, tmp_path / "attn", ["self_attn.q_proj", "self_attn.v_proj"])
    argv = ["--model", str(path), *PROMPT]
    plain = _stock(argv, capsys, monkeypatch)
    stock = _stock([*argv, "--adapter-path", str(adapters)], capsys, monkeypatch)
    assert stock.split("=" * 10)[1] != plain.split("=" * 10)[1]  # the adapters matter
    out, _ = _golem([*argv, "-c", "5", "--adapter-path", str(adapters)], capsys)
    assert out.split("=" * 10)[1] == stock.split("=" * 10)[1]


def test_adapters_on_experts_are_refused(checkpoints, capsys, tmp_path):
    path = checkpoints("qwen3_moe")
    adapters = _adapters(path, tmp_path / "experts", ["mlp.switch_mlp.up_proj"])
    assert golem_run(["--model", str(path), *PROMPT, "-c", "5", "--adapter-path", str(adapters)]) == 2
    err = capsys.readouterr().err
    assert "--adapter-path" in err and "experts of layer" in err and "Traceback" not in err


def test_prompt_cache_file_gives_mlx_lm_text(checkpoints, capsys, monkeypatch, tmp_path):
    """A KV cache saved by mlx_lm.cache_prompt continues in golem as in mlx-lm."""
    from mlx_lm.cache_prompt import main as cache_prompt

    path = str(checkpoints("olmoe"))
    cache = tmp_path / "prompt.safetensors"
    monkeypatch.setattr(sys, "argv", ["mlx_lm.cache_prompt", "--model", path, "--prompt",
                                      "You are a terse assistant. Answer in five words.",
                                      "--prompt-cache-file", str(cache)])
    cache_prompt()
    capsys.readouterr()
    argv = ["--prompt-cache-file", str(cache), "-p", "Name a colour", "-m", "10"]
    stock = _stock(argv, capsys, monkeypatch)
    out, _ = _golem([*argv, "-c", "4"], capsys)
    assert out.split("=" * 10)[1] == stock.split("=" * 10)[1] and stock.split("=" * 10)[1].strip()
    assert "Prompt:" in out and "Experts: hit rate" in out
