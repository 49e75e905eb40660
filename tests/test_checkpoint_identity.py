"""A checkpoint changed under a running model: shards are opened once at load and read
through those handles; a shard rewritten in place, replaced under its name or cut short
stops the run with an error naming it, and never yields a token computed from other bytes."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from golem.io.index import SafetensorsIndex
from golem.io.ranges import ByteRange
from golem.io.file_handles import FileHandles, FileIdentity
from golem.io.positioned_reads import NOWAIT, read_cached_many, read_ranges
from golem.io.read_errors import FileChangedError, ReadError
from golem.runtime import load
from helpers import prompt_tokens


def _file(tmp_path, data=bytes(range(256)) * 64):
    path = tmp_path / "shard.bin"
    path.write_bytes(data)
    return str(path), FileIdentity.of(os.stat(path))


def _read(handles, path, offset=100, n=50):
    out = np.zeros(n, np.uint8)
    read_ranges([ByteRange(path, offset, n, 0, "t")], out, handles=handles)
    return out


def test_an_unchanged_pinned_file_reads_normally(tmp_path):
    path, ident = _file(tmp_path)
    with FileHandles(identities={path: ident}) as h:
        h.pin()
        assert bytes(_read(h, path)) == (bytes(range(256)) * 64)[100:150]


def test_a_file_rewritten_in_place_stops_the_next_read(tmp_path):
    path, ident = _file(tmp_path)
    with FileHandles(identities={path: ident}) as h:
        h.pin()
        _read(h, path)
        with open(path, "r+b") as f:  # same size, same inode, other bytes
            f.seek(120)
            f.write(b"\xff" * 8)
            os.utime(f.fileno(), ns=(ident.mtime_ns + 10**9, ident.mtime_ns + 10**9))
        with pytest.raises(FileChangedError, match=r"shard\.bin: the file changed on disk .*modified"):
            _read(h, path)


@pytest.mark.skipif(NOWAIT is None, reason="no RWF_NOWAIT reads on this platform")
def test_reads_from_the_page_cache_check_each_pinned_file_once_after_them_all(tmp_path, monkeypatch):
    """Several reads of one shard from the page cache: one check of it, after the last read; a
    shard found changed then fails them all, and the ordinary read names it."""
    path, ident = _file(tmp_path)
    outs = [np.zeros(50, np.uint8) for _ in range(3)]
    requests = [([ByteRange(path, 100 * i, 50, 0, f"t{i}")], out) for i, out in enumerate(outs)]
    with FileHandles(identities={path: ident}) as h:
        h.pin()
        checks = []
        check = h.check
        monkeypatch.setattr(h, "check", lambda p, fd: checks.append(p) or check(p, fd))
        assert read_cached_many(requests, handles=h) == [True] * 3
        assert checks == [path]
        assert [bytes(o) for o in outs] == [(bytes(range(256)) * 64)[100 * i:100 * i + 50] for i in range(3)]
        with open(path, "r+b") as f:  # rewritten in place
            f.write(b"\xff" * 8)
            os.utime(f.fileno(), ns=(ident.mtime_ns + 10**9, ident.mtime_ns + 10**9))
        assert read_cached_many(requests, handles=h) == [False] * 3
        with pytest.raises(FileChangedError, match=r"shard\.bin: the file changed on disk"):
            _read(h, path)


def test_a_file_cut_short_is_named_with_its_new_size(tmp_path):
    path, ident = _file(tmp_path)
    with FileHandles(identities={path: ident}) as h:
        h.pin()
        os.truncate(path, 1000)
        with pytest.raises(ReadError, match=rf"shard\.bin.*size {ident.size} -> 1000"):
            _read(h, path, offset=10)


def test_a_file_replaced_under_its_name_reads_the_old_bytes_until_the_path_check(tmp_path):
    path, ident = _file(tmp_path)
    with FileHandles(identities={path: ident}, check_interval_s=3600) as h:
        h.pin()
        _read(h, path)  # the path was checked now; the next check is an hour away
        new = tmp_path / "new.bin"
        new.write_bytes(b"\x00" * ident.size)
        os.replace(new, path)
        assert bytes(_read(h, path)) == (bytes(range(256)) * 64)[100:150]  # the held handle
        with pytest.raises(FileChangedError, match="replaced by another file"):
            h.check_all()
    with FileHandles(identities={path: ident}, check_interval_s=0) as h:
        with pytest.raises(FileChangedError, match="replaced by another file"):
            h.pin()  # opening the new file under the old name is refused at once


def test_unpinned_files_are_not_checked(tmp_path):
    path, _ = _file(tmp_path)
    with FileHandles() as h:
        _read(h, path)
        os.truncate(path, 5000)
        assert len(_read(h, path)) == 50


def test_the_index_records_each_shard_as_read(checkpoints):
    st = SafetensorsIndex(checkpoints("olmoe"))
    shards = {info.path for info in st.tensors.values()}
    assert set(st.identities) == shards
    for path, ident in st.identities.items():
        assert ident == FileIdentity.of(os.stat(path))


@pytest.fixture
def private_checkpoint(checkpoints, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(checkpoints("qwen3_moe"), dst)
    return dst


def _expert_shard(model):
    return sorted({t.info.path for parts in model.golem.index.layers.values() for t in parts})[0]


def _generate(model, tokenizer, n=6):
    from mlx_lm import stream_generate

    return [r.token for r in stream_generate(model, tokenizer, prompt_tokens(tokenizer), max_tokens=n)]


def test_a_shard_rewritten_in_place_mid_run_stops_generation_naming_it(private_checkpoint):
    with load(str(private_checkpoint), cache_sizes=4) as (model, tokenizer):
        first = _generate(model, tokenizer)
        assert len(first) == 6
        shard = _expert_shard(model)
        size = os.path.getsize(shard)
        with open(shard, "r+b") as f:  # what a re-save over the same file does: other bytes, same size
            f.seek(size // 2)
            f.write(os.urandom(4096))
        produced = []
        from mlx_lm import stream_generate

        with pytest.raises(FileChangedError) as err:
            for r in stream_generate(model, tokenizer, prompt_tokens(tokenizer), max_tokens=6):
                produced.append(r.token)
        assert shard in str(err.value) and "Load the model again" in str(err.value)
        assert produced == first[:len(produced)]  # never a token from the new bytes


def test_a_shard_replaced_mid_run_stops_generation_naming_it(private_checkpoint):
    with load(str(private_checkpoint), cache_sizes=4) as (model, tokenizer):
        first = _generate(model, tokenizer)
        shard = _expert_shard(model)
        model.golem.reader.handles.check_interval_s = 0  # check the path at every read
        tmp = shard + ".new"
        shutil.copyfile(shard, tmp)
        os.replace(tmp, shard)  # same bytes, a new file: still refused
        produced = []
        from mlx_lm import stream_generate

        with pytest.raises(FileChangedError, match="replaced by another file") as err:
            for r in stream_generate(model, tokenizer, prompt_tokens(tokenizer), max_tokens=6):
                produced.append(r.token)
        assert shard in str(err.value)
        assert produced == first[:len(produced)]
