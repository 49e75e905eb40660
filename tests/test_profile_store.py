"""The profile store beside golem's cache: concurrent writers (some killed mid-way) lose no
update and never leave a file that does not parse; a damaged file is set aside, not fatal;
one model is one profile whatever path names it."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from golem.runtime.analysis.profile import (
    PROFILE_FILENAME,
    ProfileDamaged,
    ProfileError,
    load_profile,
    load_saved_profile,
    model_identity,
    profile_dir_for,
    profile_from_counts,
    record_run,
    same_model,
    save_profile,
)

NUM_EXPERTS = 8

# Worker w records `n` runs whose counts are one use of expert w in layer 0, printing "ok"
# after each record returns: the file's count of expert w is what landed of worker w.
WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from golem.runtime.analysis.profile import record_run
    folder, w, n, num_experts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    counts = np.zeros((2, num_experts))
    counts[0, w] = 1
    for _ in range(n):
        record_run(folder, counts, top_k=1, num_steps=1, meta={"model": "m"})
        print("ok", flush=True)
    """
)


def _spawn(folder: Path, worker: int, n: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(folder), str(worker), str(n), str(NUM_EXPERTS)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_concurrent_writers_some_killed_lose_no_update(tmp_path):
    folder = tmp_path / "store"
    n, workers, killed = 25, 4, {1: 5, 3: 12}  # worker -> records seen before SIGKILL
    # the workers to be killed would go on for long: the kill always lands mid-way
    procs = {w: _spawn(folder, w, 100_000 if w in killed else n) for w in range(workers)}
    oks = {w: 0 for w in procs}
    reads = 0
    for w, at in killed.items():
        while oks[w] < at:  # gated on the worker's own output, not on time
            line = procs[w].stdout.readline()
            assert line == "ok\n", procs[w].stderr.read()
            oks[w] += 1
            if (folder / PROFILE_FILENAME).exists():
                load_profile(folder / PROFILE_FILENAME)  # parses at every moment
                reads += 1
        procs[w].send_signal(signal.SIGKILL)
    for w, p in procs.items():
        out, err = p.stdout.read(), p.stderr.read()  # through the readers' buffers
        p.wait(timeout=120)
        oks[w] += out.count("ok\n")
        if w in killed:
            assert p.returncode == -signal.SIGKILL
        else:
            assert p.returncode == 0, err
            assert "Traceback" not in err and oks[w] == n
    assert reads > 0
    profile = load_profile(folder / PROFILE_FILENAME)
    landed = profile.counts[0, :workers]
    for w in procs:
        # a worker killed between its rename and its "ok" landed one record more than it said
        assert oks[w] <= landed[w] <= oks[w] + (w in killed), (w, oks[w], landed[w])
    assert profile.runs == profile.num_steps == int(landed.sum())
    assert len(list(folder.glob("*.tmp"))) <= len(killed)
    # the next writer clears what the killed ones left behind
    record_run(folder, np.zeros((2, NUM_EXPERTS)), top_k=1, num_steps=1, meta={"model": "m"})
    assert not list(folder.glob("*.tmp"))
    assert load_profile(folder / PROFILE_FILENAME).runs == profile.runs + 1


def test_writers_in_threads_lose_no_update(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    counts = np.zeros((2, NUM_EXPERTS))
    counts[1, 2] = 1

    def one(_):
        record_run(tmp_path, counts, top_k=1, num_steps=1)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(40)))
    profile = load_profile(tmp_path / PROFILE_FILENAME)
    assert profile.runs == 40 and profile.counts[1, 2] == 40


@pytest.mark.parametrize("garbage", [b"", b'{"format": "golem-profile/1", "num_la', b"\x00" * 64, b"[1, 2]",
                                     b'{"format": "golem-profile/1", "num_layers": 2}'])
def test_a_damaged_profile_is_set_aside_and_the_next_record_works(tmp_path, caplog, garbage):
    path = tmp_path / PROFILE_FILENAME
    path.write_bytes(garbage)
    with pytest.raises(ProfileDamaged):
        load_profile(path)
    counts = np.ones((2, NUM_EXPERTS))
    with caplog.at_level(logging.WARNING, logger="golem.runtime.profiles"):
        assert record_run(tmp_path, counts, top_k=1, num_steps=3) == path
    aside = list(tmp_path.glob(PROFILE_FILENAME + ".damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    assert any(aside[0].name in r.getMessage() for r in caplog.records)
    profile = load_profile(path)
    assert profile.runs == 1 and profile.num_steps == 3
    np.testing.assert_array_equal(profile.counts, counts)


def test_reading_a_damaged_saved_profile_sets_it_aside(tmp_path, caplog):
    assert load_saved_profile(tmp_path) is None  # none yet
    (tmp_path / PROFILE_FILENAME).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="golem.runtime.profiles"):
        assert load_saved_profile(tmp_path) is None
    assert not (tmp_path / PROFILE_FILENAME).exists()
    assert len(list(tmp_path.glob(PROFILE_FILENAME + ".damaged-*"))) == 1
    assert "set aside" in caplog.text
    record_run(tmp_path, np.ones((2, 3)), top_k=1, num_steps=1)
    assert load_saved_profile(tmp_path).runs == 1


def test_a_profile_of_a_newer_format_is_not_thrown_away(tmp_path):
    path = tmp_path / PROFILE_FILENAME
    path.write_text(json.dumps({"format": "golem-profile/9", "layers": []}))
    with pytest.raises(ProfileError, match="not a golem-profile/1 file") as err:
        record_run(tmp_path, np.ones((2, 3)), top_k=1, num_steps=1)
    assert not isinstance(err.value, ProfileDamaged)
    assert path.exists() and not list(tmp_path.glob("*.damaged-*"))


def test_save_leaves_no_temporary_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    save_profile(profile_from_counts(np.ones((2, 3)), top_k=1, num_steps=1), path)
    before = path.read_bytes()

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(ProfileError, match=r"p.json: cannot write \(No space left on device\); the old file is left as it was"):
        save_profile(profile_from_counts(np.ones((2, 3)) * 2, top_k=1, num_steps=1), path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("kind", ["folder", "broken link"])
def test_something_else_in_the_profiles_place_is_set_aside(tmp_path, kind):
    path = tmp_path / PROFILE_FILENAME
    if kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "gone")
    assert load_saved_profile(tmp_path) is None
    record_run(tmp_path, np.ones((2, 3)), top_k=1, num_steps=1)
    assert load_profile(path).runs == 1
    assert len(list(tmp_path.glob(PROFILE_FILENAME + ".damaged-*"))) == 1


def test_a_folder_that_cannot_be_created_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ProfileError, match="cannot create the profile folder"):
        record_run(tmp_path / "file" / "store", np.ones((2, 3)), top_k=1, num_steps=1)


def test_one_model_by_any_path_is_one_profile(tmp_path, monkeypatch):
    model = tmp_path / "models" / "olmoe"
    model.mkdir(parents=True)
    (tmp_path / "link").symlink_to(model)
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    spellings = ["models/olmoe", str(model), "./models/../models/olmoe", "link"]
    assert {model_identity(s) for s in spellings} == {str(model.resolve())}
    assert {profile_dir_for(s, cache) for s in spellings} == {cache / "profiles" / "olmoe"}
    for s in spellings:  # what golem-run records: the identity of the path it was given
        record_run(profile_dir_for(s, cache), np.ones((2, 3)), top_k=1, num_steps=1, meta={"model": model_identity(s)})
    assert load_profile(cache / "profiles" / "olmoe" / PROFILE_FILENAME).runs == 4
    # profiles recorded with an unresolved path are the same model too
    assert same_model("models/olmoe", str(model)) and not same_model("models/olmoe", "other")


def test_another_model_of_the_same_name_gets_its_own_profile(tmp_path):
    cache = tmp_path / "cache"
    a, b = tmp_path / "a" / "olmoe", tmp_path / "b" / "olmoe"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    record_run(profile_dir_for(a, cache), np.ones((2, 3)), top_k=1, num_steps=1, meta={"model": model_identity(a)})
    dir_b = profile_dir_for(b, cache)
    assert dir_b != profile_dir_for(a, cache) and dir_b.name.startswith("olmoe-")
    record_run(dir_b, np.ones((4, 5)), top_k=1, num_steps=1, meta={"model": model_identity(b)})
    assert profile_dir_for(b, cache) == dir_b and profile_dir_for(a, cache) == cache / "profiles" / "olmoe"
    assert load_profile(dir_b / PROFILE_FILENAME).num_layers == 4


def test_hub_snapshots_and_repo_ids_share_a_profile(tmp_path):
    snap = tmp_path / "hub" / "models--org--tiny-moe" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    assert model_identity(snap) == "org/tiny-moe" == model_identity("org/tiny-moe")
    assert profile_dir_for(snap, tmp_path) == profile_dir_for("org/tiny-moe", tmp_path) == tmp_path / "profiles" / "org--tiny-moe"


def test_a_first_run_with_the_saved_warm_start_starts_cold_and_saves_one(checkpoints, tmp_path, monkeypatch,
                                                                           caplog):
    import mlx.core as mx
    from mlx_lm import generate

    import golem.runtime

    monkeypatch.setenv("GOLEM_CACHE", str(tmp_path / "cache"))
    model_path = checkpoints("qwen3_moe")
    profile_file = profile_dir_for(model_path) / PROFILE_FILENAME
    caplog.set_level(logging.WARNING, logger="golem.runtime.sizing")
    options = dict(cache_size=4, warm_start="saved", save_profile=True)
    golem.runtime.plan(model_path, **options)  # golem-chat and golem-server plan, then load
    with golem.runtime.load(model_path, **options) as (model, tokenizer):
        assert all(not p.resident() for p in model.golem.engine.pools.values())  # cold
        mx.random.seed(0)
        generate(model, tokenizer, "hello", max_tokens=4)
    notes = [r.getMessage() for r in caplog.records if r.name == "golem.runtime.sizing"]
    assert len(notes) == 1 and "no profile saved for this model yet" in notes[0]
    assert str(profile_file) in notes[0] and "this run saves one" in notes[0]
    assert profile_file.is_file()
    caplog.clear()
    with golem.runtime.load(model_path, **options) as (model, _):  # the second run starts warm
        assert all(len(p.resident()) == 4 for p in model.golem.engine.pools.values())
    assert not [r for r in caplog.records if r.name == "golem.runtime.sizing"]
