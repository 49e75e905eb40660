"""The expert index rejects bad checkpoints before anything runs, naming file and tensor."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from golem.io.index import INDEX_FILE, CheckpointError, ExpertIndex, SafetensorsIndex


def write_shard(path: Path, header: dict, data_nbytes: int, *, raw_header: bytes | None = None) -> None:
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(data_nbytes))


def good_header():
    return {
        "a.weight": {"dtype": "F32", "shape": [4, 2, 3], "data_offsets": [0, 96]},
        "a.scales": {"dtype": "F32", "shape": [4, 2], "data_offsets": [96, 128]},
    }


def test_good_checkpoint_gives_exact_expert_ranges(tmp_path):
    write_shard(tmp_path / "model.safetensors", good_header(), 128)
    st = SafetensorsIndex(tmp_path)
    idx = ExpertIndex(st, {3: {"weight": "a.weight", "scales": "a.scales"}}, {3: 4})
    header_end = 8 + len(json.dumps(good_header()).encode())
    ranges = idx.ranges(3, 2)
    by_label = {r.label: r for r in ranges}
    assert by_label["a.weight"].offset == header_end + 2 * 24 and by_label["a.weight"].nbytes == 24
    assert by_label["a.scales"].offset == header_end + 96 + 2 * 8 and by_label["a.scales"].nbytes == 8
    assert idx.expert_nbytes(3) == 64 + 64  # parts aligned to 64 bytes in the packed buffer


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h: h["a.weight"].update(data_offsets=[0, 200]), "is 96 bytes but its range holds 200"),
        (lambda h: h["a.scales"].update(data_offsets=[64, 96]), "overlap"),
        (lambda h: h["a.scales"].update(data_offsets=[1000, 1032]), "past the end"),
        (lambda h: h["a.weight"].update(dtype="Q9"), "unknown dtype"),
        (lambda h: h["a.weight"].pop("shape"), "malformed"),
    ],
)
def test_bad_headers_are_named(tmp_path, mutate, message):
    header = good_header()
    mutate(header)
    write_shard(tmp_path / "model.safetensors", header, 128)
    with pytest.raises(CheckpointError, match=message) as err:
        SafetensorsIndex(tmp_path)
    assert "model.safetensors" in str(err.value)


def test_truncated_file(tmp_path):
    write_shard(tmp_path / "model.safetensors", good_header(), 100)  # 28 bytes short
    with pytest.raises(CheckpointError, match="past the end.*truncated"):
        SafetensorsIndex(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        SafetensorsIndex(tmp_path)


def test_bad_json_and_insane_header_size(tmp_path):
    write_shard(tmp_path / "model.safetensors", {}, 0, raw_header=b"{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SafetensorsIndex(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="not sane"):
        SafetensorsIndex(tmp_path)


def test_index_json_path_escape_is_rejected(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    write_shard(tmp_path / "outside.safetensors", good_header(), 128)
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "../outside.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="outside the model folder"):
        SafetensorsIndex(model)


def test_index_json_bad_or_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        SafetensorsIndex(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard 'model-1.safetensors' is missing"):
        SafetensorsIndex(tmp_path)


def test_missing_expert_tensor_and_wrong_expert_axis(tmp_path):
    write_shard(tmp_path / "model.safetensors", good_header(), 128)
    st = SafetensorsIndex(tmp_path)
    with pytest.raises(CheckpointError, match="'a.biases' is not in the checkpoint"):
        ExpertIndex(st, {0: {"biases": "a.biases"}}, {0: 4})
    with pytest.raises(CheckpointError, match="expected 8 experts"):
        ExpertIndex(st, {0: {"weight": "a.weight"}}, {0: 8})


def test_generated_checkpoint_missing_an_expert_tensor(tmp_path, checkpoints):
    """Dropping one layer's stacked tensor from a real checkpoint: clear error at load."""
    import shutil

    import mlx.core as mx

    from golem.runtime import load

    src = checkpoints("olmoe")
    dst = tmp_path / "olmoe"
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    name = next(n for n in index["weight_map"] if n.endswith("switch_mlp.up_proj.weight"))
    shard = dst / index["weight_map"].pop(name)
    tensors = mx.load(str(shard))
    tensors.pop(name)
    mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")) as err:
        load(str(dst), cache_sizes=4)
    assert str(dst) in str(err.value)


def _hub_layout(root: Path, files: dict) -> Path:
    """Files as the Hugging Face cache keeps them: blobs, and a snapshot of symlinks to them."""
    blobs, snap = root / "models--org--m" / "blobs", root / "models--org--m" / "snapshots" / "rev1"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, (name, write) in enumerate(files.items()):
        write(blobs / f"sha{i}")
        (snap / name).symlink_to(f"../../blobs/sha{i}")
    return snap


@pytest.mark.parametrize("with_index", [True, False])
def test_hub_cache_snapshot_of_symlinks_is_accepted(tmp_path, with_index):
    files = {"model.safetensors": lambda p: write_shard(p, good_header(), 128)}
    if with_index:
        weight_map = {"a.weight": "model.safetensors", "a.scales": "model.safetensors"}
        files[INDEX_FILE] = lambda p: p.write_text(json.dumps({"weight_map": weight_map}))
    snap = _hub_layout(tmp_path, files)
    st = SafetensorsIndex(snap)
    assert st["a.weight"].path == str(snap / "model.safetensors")  # named where the user put it
    header_end = 8 + len(json.dumps(good_header()).encode())
    assert st["a.scales"].offset == header_end + 96


def test_symlinked_shards_are_judged_alike_with_and_without_an_index(tmp_path):
    """A shard linked from outside the folder loads either way; only an index *name* leaving
    the folder is refused."""
    outside = tmp_path / "elsewhere.safetensors"
    write_shard(outside, good_header(), 128)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").symlink_to(outside)
    without = SafetensorsIndex(model)
    (model / INDEX_FILE).write_text(json.dumps({"weight_map": {"a.weight": "model.safetensors"}}))
    with_index = SafetensorsIndex(model)
    assert without.tensors == with_index.tensors


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors", "/tmp/outside.safetensors"])
def test_index_names_leaving_the_folder_are_refused_even_in_a_snapshot(tmp_path, name):
    snap = _hub_layout(tmp_path, {
        "model.safetensors": lambda p: write_shard(p, good_header(), 128),
        INDEX_FILE: lambda p: p.write_text(json.dumps({"weight_map": {"a.weight": name}})),
    })
    with pytest.raises(CheckpointError, match="points outside the model folder") as err:
        SafetensorsIndex(snap)
    assert INDEX_FILE in str(err.value) and repr(name) in str(err.value)


def test_broken_link_and_unreadable_files_are_named(tmp_path):
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "gone")
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a.weight": "model.safetensors"}}))
    with pytest.raises(CheckpointError, match="'model.safetensors' is missing \\(a broken link\\)"):
        SafetensorsIndex(tmp_path)
    (tmp_path / INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read the shard"):
        SafetensorsIndex(tmp_path)
    (tmp_path / INDEX_FILE).mkdir()
    with pytest.raises(CheckpointError, match="cannot read the index"):
        SafetensorsIndex(tmp_path)


def test_hub_snapshot_of_a_generated_checkpoint_runs_like_mlx_lm(tmp_path, checkpoints):
    """The Hugging Face cache layout: golem and stock mlx-lm give the same greedy tokens."""
    from golem.runtime import load
    from golem.runtime.synthetic import as_hub_snapshot
    from helpers import greedy_tokens, prompt_tokens, stock

    snap = as_hub_snapshot(checkpoints("qwen3_moe"), tmp_path / "hub", "org/tiny-moe")
    shard = next(snap.glob("model-*.safetensors"))
    assert shard.is_symlink() and os.readlink(shard).startswith("../../blobs/")
    model, tok = stock(snap)
    tokens = prompt_tokens(tok)
    expected = greedy_tokens(model, tokens)
    with load(str(snap), cache_sizes=4) as (model, _):
        assert greedy_tokens(model, tokens) == expected
        assert model.golem.engine.stats.total().misses > 0
