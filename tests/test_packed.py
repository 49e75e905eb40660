"""Packed experts (golem-pack): one read per expert, the same bytes and tokens, and a pack
that no longer matches its checkpoint refused with a clear error."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from golem.io.file_handles import FileHandles
from golem.io.index import CheckpointError
from golem.io.packed_experts import DATA_FILE, MANIFEST_FILE, open_packed, pack_experts
from golem.io.positioned_reads import read_ranges
from golem.runtime import load, pack
from golem.runtime.checkpoint import open_checkpoint
from golem.runtime.cli import pack as pack_cli
from golem.runtime.prefetch import PrefetchConfig
from helpers import greedy_tokens, prompt_tokens, stock

N = 12


@pytest.fixture(scope="module")
def expected(checkpoints):
    model, tok = stock(checkpoints("olmoe"))
    tokens = prompt_tokens(tok)
    return tokens, greedy_tokens(model, tokens, N)


@pytest.fixture
def model_dir(checkpoints, tmp_path):
    """A copy of the olmoe checkpoint (the shared one stays unpacked)."""
    return shutil.copytree(checkpoints("olmoe"), tmp_path / "olmoe")


def _packed(path):
    index = open_checkpoint(path).index
    pack_experts(index)
    return index


def test_each_packed_expert_is_one_range_holding_the_bytes_of_its_stacked_ranges(model_dir):
    index = _packed(model_dir)
    packed = open_packed(index)
    assert packed is not None and sorted(packed.layers) == sorted(index.layers)
    with FileHandles() as handles:
        for layer in index.layers:
            nbytes = index.expert_nbytes(layer)
            for expert in (0, 7, index.num_experts(layer) - 1):
                want, got = np.zeros(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
                read_ranges(index.ranges(layer, expert), want, handles=handles)
                (one,) = packed.ranges(layer, expert)
                assert one.nbytes == nbytes and one.offset % 4096 == 0
                read_ranges([one], got, handles=handles)
                assert np.array_equal(got, want), (layer, expert)


def test_a_packed_model_reads_one_piece_per_expert_and_decodes_stock_tokens(model_dir, expected):
    tokens, want = expected
    _packed(model_dir)
    seen = {}
    for packed in (False, True):
        with load(str(model_dir), cache_sizes=4, packed_experts=packed) as (model, _):
            assert greedy_tokens(model, tokens, N) == want
            st = model.golem.engine.scheduler.statistics()
            seen[packed] = st
            assert len(model.golem.index.ranges(min(model.golem.engine.pools), 0)) == (1 if packed else 9)
    assert seen[True].useful_nbytes == seen[False].useful_nbytes > 0  # the same experts, the same bytes
    assert seen[False].pieces == 9 * seen[False].reads
    assert seen[True].pieces <= seen[True].reads  # one preadv per read (neighbours coalesced: fewer)


def test_a_packed_model_prefetches_and_decodes_stock_tokens(model_dir, expected):
    tokens, want = expected
    _packed(model_dir)
    with load(str(model_dir), cache_sizes=4, prefetch=PrefetchConfig(depth=2, threshold=0.1)) as (model, _):
        assert greedy_tokens(model, tokens, N) == want
        assert model.golem.engine.prefetcher.totals().issued > 0


def test_a_pack_older_than_its_shard_is_refused_naming_the_shard(model_dir):
    _packed(model_dir)
    shard = next(p for p in sorted(model_dir.glob("model*.safetensors")))
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten since it was packed
    with pytest.raises(CheckpointError, match=f"{shard.name}: changed since its experts were packed.*golem-pack"):
        with load(str(model_dir), cache_sizes=4):
            pass
    with load(str(model_dir), cache_sizes=4, packed_experts=False) as (model, _):  # --no-packed-experts
        assert len(model.golem.index.ranges(min(model.golem.engine.pools), 0)) == 9


def test_a_truncated_pack_is_refused(model_dir):
    _packed(model_dir)
    data = model_dir / DATA_FILE
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) - 4096)
    with pytest.raises(CheckpointError, match=f"{DATA_FILE}: .* bytes, the manifest says .*truncated"):
        open_packed(open_checkpoint(model_dir).index)


def test_a_damaged_manifest_is_refused(model_dir):
    index = _packed(model_dir)
    manifest = model_dir / MANIFEST_FILE
    record = json.loads(manifest.read_text())
    layer = next(iter(record["layers"]))
    record["layers"][layer]["stride"] += 4096
    manifest.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=f"layer {layer}'s experts are packed in another layout"):
        open_packed(index)
    manifest.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable pack manifest"):
        open_packed(index)


def test_an_interrupted_pack_keeps_the_earlier_one(model_dir, monkeypatch):
    index = _packed(model_dir)
    before = (model_dir / DATA_FILE).read_bytes()
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return read_ranges(*args, **kwargs)

    monkeypatch.setattr("golem.io.packed_experts.read_ranges", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack_experts(index)
    assert sorted(p.name for p in model_dir.glob("golem-experts*")) == [DATA_FILE, MANIFEST_FILE]
    assert (model_dir / DATA_FILE).read_bytes() == before and open_packed(index) is not None


def test_golem_pack_packs_checks_and_names_a_bad_folder(model_dir, tmp_path, capsys):
    assert pack_cli.main(["--model", str(model_dir), "--check"]) == 1
    assert "no packed experts" in capsys.readouterr().out
    assert pack_cli.main(["--model", str(model_dir)]) == 0
    assert pack_cli.main(["--model", str(model_dir), "--check"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert pack_cli.main(["--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("golem-pack: error:") and "nowhere" in err[0]


def test_the_library_packs_and_checks_as_golem_pack_does(model_dir):
    assert pack(str(model_dir), check=True) is None
    seen = []
    manifest = pack(str(model_dir), progress=lambda done, total: seen.append((done, total)))
    assert manifest == model_dir.resolve() / MANIFEST_FILE and pack(str(model_dir), check=True) == manifest
    assert seen and seen[-1][0] == seen[-1][1] == os.path.getsize(model_dir / DATA_FILE)


def test_a_pipeline_rank_with_some_layers_reads_them_from_the_whole_pack(model_dir):
    from golem.io.index import ExpertIndex

    index = _packed(model_dir)
    whole = open_packed(index)
    later = sorted(index.layers)[1:]  # a rank that holds every MoE layer but the first
    names = {l: {t.part: t.info.name for t in index.parts(l)} for l in later}
    rank = ExpertIndex(index.index, names, {l: index.num_experts(l) for l in later})
    part = open_packed(rank)
    assert sorted(part.layers) == later
    assert all(part.ranges(l, 3) == whole.ranges(l, 3) for l in later)


def test_golem_run_reads_a_pack_with_direct_io_and_says_so(model_dir, capsys):
    from golem.runtime.cli.run import main as golem_run

    argv = ["--model", str(model_dir), "-p", "Once upon a time", "-m", "8", "-c", "4", "--direct-io"]
    assert golem_run(argv) == 0
    stacked = capsys.readouterr()
    _packed(model_dir)
    assert golem_run(argv) == 0
    packed = capsys.readouterr()
    assert packed.out.split("=" * 10)[1] == stacked.out.split("=" * 10)[1]  # the same text
    assert f"experts read from {(model_dir / DATA_FILE).resolve()}" in packed.err
    assert "experts read from" not in stacked.err


def test_a_folder_that_cannot_be_written_is_named(model_dir, tmp_path):
    from test_config import unwritable_folder

    folder = unwritable_folder(tmp_path)
    with pytest.raises(OSError, match=f"cannot write the packed experts in {folder}"):
        pack_experts(open_checkpoint(model_dir).index, folder)
    assert not list(model_dir.glob("golem-experts*"))


def test_a_pack_that_would_not_fit_on_the_disk_is_refused_before_writing(model_dir, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("golem.io.packed_experts.shutil.disk_usage", lambda path: usage(10**9, 10**9, 4096))
    with pytest.raises(OSError, match="cannot write the packed experts in .*GB needed, 0.00 GB free"):
        pack_experts(open_checkpoint(model_dir).index)
    assert not list(model_dir.glob("golem-experts*"))
