"""Faults and user mistakes: clear errors, no token from a failed read, nothing hangs."""

from __future__ import annotations

import errno
import json
import os

import mlx.core as mx
import pytest

from golem.io.read_errors import ReadError
from golem.runtime import load
from golem.runtime.cli.run import main as golem_run
from golem.runtime.checkpoint import ModelError
from helpers import prompt_tokens


def _stream(model, tokenizer, n=8):
    from mlx_lm import stream_generate

    return [r.token for r in stream_generate(model, tokenizer, prompt_tokens(tokenizer), max_tokens=n)]


def test_eio_mid_generation_raises_and_yields_no_token(checkpoints):
    with load(str(checkpoints("qwen3_moe")), cache_sizes=4) as (model, tokenizer):
        handles = model.golem.reader.handles
        real = handles.preadv
        calls = {"n": 0}

        def failing(fd, bufs, offset):
            calls["n"] += 1
            raise OSError(errno.EIO, "Input/output error")

        handles.preadv = failing
        produced = []
        from mlx_lm import stream_generate

        with pytest.raises(ReadError) as err:
            for r in stream_generate(model, tokenizer, prompt_tokens(tokenizer), max_tokens=8):
                produced.append(r.token)
        handles.preadv = real
    assert produced == []
    assert calls["n"] > 1  # retried before giving up
    msg = str(err.value)
    assert ".safetensors" in msg and "expert (" in msg and "Input/output error" in msg


def test_short_read_at_end_of_file_is_an_error(checkpoints):
    with load(str(checkpoints("olmoe")), cache_sizes=4) as (model, tokenizer):
        handles = model.golem.reader.handles

        def short(fd, bufs, offset):
            return 0  # the file ended early (truncated after the index was read)

        handles.preadv = short
        with pytest.raises(ReadError, match="end of file|short"):
            _stream(model, tokenizer)


def test_short_reads_that_continue_give_identical_tokens(checkpoints):
    from helpers import greedy_tokens, stock

    path = checkpoints("olmoe")
    ref_model, tok = stock(path)
    expected = greedy_tokens(ref_model, prompt_tokens(tok))
    with load(str(path), cache_sizes=4) as (model, tokenizer):
        handles = model.golem.reader.handles
        real = handles.preadv

        def dribble(fd, bufs, offset):  # at most 100 bytes per call
            first = bufs[0][: min(100, len(bufs[0]))]
            return real(fd, [first], offset)

        handles.preadv = dribble
        assert greedy_tokens(model, prompt_tokens(tokenizer)) == expected


def test_cache_smaller_than_top_k_is_a_clear_cli_error(checkpoints, capsys):
    assert golem_run(["--model", str(checkpoints("mixtral")), "-c", "3", "-m", "2"]) == 2
    err = capsys.readouterr().err
    assert "--cache-size 3" in err and "top-k (4)" in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value", [("--threshold", "1.5"), ("--prefetch-cap-ms", "0"),
                                         ("--prefetch-depth", "-1")])
def test_bad_prefetch_flags_are_clear_cli_errors(checkpoints, capsys, flag, value):
    argv = ["--model", str(checkpoints("mixtral")), "-c", "6", "--prefetch-depth", "2", flag, value, "-m", "2"]
    assert golem_run(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and value in err and "Traceback" not in err


def test_unknown_model_is_a_clear_cli_error(tmp_path, capsys):
    assert golem_run(["--model", str(tmp_path / "nope"), "-m", "2"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_model_without_moe_layers_says_so(tmp_path):
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from golem.runtime.synthetic import write_tokenizer

    cfg = {
        "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 384,
        "tie_word_embeddings": False,
    }
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(tmp_path, 384)
    with pytest.raises(ModelError, match="no MoE layers"):
        load(str(tmp_path))


def test_cli_prints_what_mlx_lm_prints(checkpoints, capsys, monkeypatch):
    """`golem-run ... -c K` and `mlx_lm.generate` print the same text between the ===== lines."""
    import sys

    from mlx_lm.generate import main as mlx_generate

    path = str(checkpoints("qwen3_moe"))
    argv = ["--model", path, "--temp", "0", "-m", "16", "-p", "Once upon a time"]
    monkeypatch.setattr(sys, "argv", ["mlx_lm.generate", *argv])
    mlx_generate()
    stock_out = capsys.readouterr().out
    assert golem_run([*argv, "-c", "4", "--stats"]) == 0
    golem_out = capsys.readouterr().out

    def text(out):
        return out.split("=" * 10)[1]

    assert text(golem_out) == text(stock_out)
    assert "Prompt:" in golem_out and "Generation:" in golem_out and "Peak memory:" in golem_out
    assert "Experts: hit rate" in golem_out and "hit rate" in golem_out.split("Experts:")[1]
