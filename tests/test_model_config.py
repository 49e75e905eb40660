"""config.json fields that size an allocation or divide are range-checked before mlx-lm
builds anything: each bad value is one ``ModelError`` naming the file and the field, from
the library and as one line from golem-run."""

from __future__ import annotations

import json
import os
import time

import pytest

from golem.runtime.cli.run import main as golem_run
from golem.runtime.checkpoint import ModelError, open_checkpoint


def _variant(src, dst, change):
    """``src``'s files linked into ``dst``, with config.json rewritten by ``change``."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    text = change(config)
    (dst / "config.json").write_text(text if isinstance(text, str) else json.dumps(config))
    return dst


def _set(**fields):
    def change(config):
        config.update(fields)
    return change


CASES = [
    ("zero heads", _set(num_attention_heads=0), "'num_attention_heads' = 0 is out of range"),
    ("zero kv heads", _set(num_key_value_heads=0), "'num_key_value_heads' = 0 is out of range"),
    ("sparse step 0", _set(decoder_sparse_step=0), "'decoder_sparse_step' = 0 is out of range"),
    ("vocabulary 10^12", _set(vocab_size=10**12), "'vocab_size' = 1000000000000 is out of range"),
    ("100,000 layers", _set(num_hidden_layers=100_000), "'num_hidden_layers' = 100000 is out of range"),
    ("more layers than stored", _set(num_hidden_layers=40), "'num_hidden_layers' = 40, but the checkpoint stores"),
    ("vocabulary unlike the embedding", _set(vocab_size=999), "'vocab_size' = 999, but the checkpoint's embedding"),
    ("heads not a multiple of kv heads", _set(num_attention_heads=4, num_key_value_heads=3),
     "not a multiple of 'num_key_value_heads' = 3"),
    ("negative head_dim", _set(head_dim=-8), "'head_dim' = -8 is out of range"),
    ("fractional hidden size", _set(hidden_size=64.5), "'hidden_size' must be a whole number"),
    ("NaN rope theta", lambda c: json.dumps(c).replace('"rope_theta": ', '"rope_theta": NaN, "x": '),
     "'rope_theta' must be a finite number > 0"),
    ("top-k above the experts", _set(num_experts_per_tok=17), "17"),
    ("deeply nested JSON", lambda c: json.dumps(c)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "nested too deeply"),
    ("a 20 MB config.json", lambda c: json.dumps(c)[:-1] + ', "pad": "' + "x" * (20 << 20) + '"}',
     "more than 16 MiB"),
]


@pytest.mark.parametrize("name,change,message", CASES, ids=[c[0] for c in CASES])
def test_an_out_of_range_field_is_refused_before_the_model_is_built(checkpoints, tmp_path, name, change, message):
    folder = _variant(checkpoints("qwen3_moe"), tmp_path / "m", change)
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as err:
        open_checkpoint(folder)
    assert message in str(err.value) and "config.json" in str(err.value)
    assert "\n" not in str(err.value)
    assert time.perf_counter() - t0 < 30  # refused up front, not after building 100,000 layers


def test_golem_run_prints_one_line_for_a_bad_field(checkpoints, tmp_path, capsys):
    folder = _variant(checkpoints("qwen3_moe"), tmp_path / "m", _set(decoder_sparse_step=0))
    assert golem_run(["--model", str(folder), "-p", "hi", "-m", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decoder_sparse_step" in err[0] and "Traceback" not in err[0]


def test_the_limits_leave_every_generated_family_alone(checkpoints):
    for family in ("qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "qwen3_next", "gpt_oss", "minimax", "mixtral"):
        opened = open_checkpoint(checkpoints(family))
        assert opened.experts


def test_an_unreadable_config_is_one_line(checkpoints, tmp_path):
    folder = _variant(checkpoints("olmoe"), tmp_path / "m", _set())
    cfg = folder / "config.json"
    os.unlink(cfg)
    os.mkfifo(cfg)  # neither a file nor readable without a writer: refused, never waited on
    with pytest.raises(ModelError, match="no config.json"):
        open_checkpoint(folder)
