"""golem-trace cache: lists what golem keeps on disk (generated checkpoints, profiles, locks)
and removes it, never what another process is building or writing, never files golem did
not make; a cache emptied of everything goes away whole."""

from __future__ import annotations

import json

import numpy as np
import pytest
from filelock import FileLock

from golem.runtime.analysis.profile import PROFILE_FILENAME, profile_dir_for, record_run
from golem.runtime.cli.trace import main as golem_trace
from golem.runtime.synthetic import build_checkpoint


@pytest.fixture
def cache(tmp_path, monkeypatch, checkpoints):
    root = tmp_path / "cache"
    monkeypatch.setenv("GOLEM_CACHE", str(root))
    demo = build_checkpoint("olmoe", root / "demo-olmoe")  # leaves demo-olmoe.lock beside it
    (root / "demo-olmoe.partial-x1").mkdir()  # a build that died
    model = checkpoints("olmoe")
    folder = profile_dir_for(model)
    for _ in range(2):
        record_run(folder, np.ones((3, 16)), top_k=4, num_steps=1, meta={"model": str(model)})
    (folder / f"{PROFILE_FILENAME}.damaged-20261202T000000").write_text("{")
    (folder / f"{PROFILE_FILENAME}.abc.tmp").write_text("{")
    (root / "mine.txt").write_text("a user's file")
    return root, demo, folder


def _cli(capsys, *argv):
    rc = golem_trace(["cache", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _kinds(entries) -> dict:
    return {e["path"]: e["kind"] for e in entries}


def test_lists_every_kind_by_path(cache, capsys):
    root, demo, folder = cache
    rc, out, err = _cli(capsys, "--json")
    assert rc == 0 and not err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["cache"] == str(root)
    prof = str((folder / PROFILE_FILENAME).relative_to(root))
    assert _kinds(got["entries"]) == {
        "demo-olmoe": "checkpoint",
        "demo-olmoe.partial-x1": "partial checkpoint",
        prof: "profile",
        prof + ".damaged-20261202T000000": "damaged profile",
        prof + ".abc.tmp": "temporary",
        "demo-olmoe.lock": "lock",
        prof + ".lock": "lock",
        "mine.txt": "other",
    }
    sizes = {e["path"]: e["nbytes"] for e in got["entries"]}
    assert sizes["demo-olmoe"] == sum(f.stat().st_size for f in demo.rglob("*") if f.is_file())
    assert "2 runs" in out and "generated olmoe model" in out
    assert got["nbytes"] == sum(sizes.values())


def test_removes_what_is_named_and_keeps_the_rest(cache, capsys):
    root, demo, folder = cache
    rc, out, _ = _cli(capsys, "--remove", "checkpoints", "--json")
    assert rc == 0
    got = json.loads(out.strip().splitlines()[-1])
    assert sorted(e["path"] for e in got["removed"]) == ["demo-olmoe", "demo-olmoe.partial-x1"]
    assert not demo.exists() and (folder / PROFILE_FILENAME).is_file() and (root / "demo-olmoe.lock").exists()
    assert got["freed_nbytes"] == sum(e["nbytes"] for e in got["removed"]) > 0

    rc, out, _ = _cli(capsys, "--remove", "all")
    assert rc == 0 and "removed 5 entries" in out
    assert sorted(p.name for p in root.rglob("*")) == ["mine.txt"]  # a user's file stays; empty folders go
    (root / "mine.txt").unlink()
    rc, out, _ = _cli(capsys)
    assert rc == 0 and "empty: nothing generated or saved yet" in out


def test_what_another_process_holds_is_kept(cache, capsys):
    root, demo, folder = cache
    profile_lock = FileLock(str(folder / (PROFILE_FILENAME + ".lock")))
    build_lock = FileLock(str(root / "demo-olmoe.lock"))
    with profile_lock, build_lock:  # a profile update and a build under way
        rc, out, _ = _cli(capsys, "--remove", "all", "--json")
        assert rc == 0
        got = json.loads(out.strip().splitlines()[-1])
        assert {e["kind"] for e in got["busy"]} == {
            "checkpoint", "partial checkpoint", "profile", "damaged profile", "temporary", "lock"}
        assert got["removed"] == [] and demo.is_dir() and (folder / PROFILE_FILENAME).is_file()
        assert "kept (in use by another process)" in out
    rc, out, _ = _cli(capsys, "--remove", "all")
    assert rc == 0 and not demo.exists() and not folder.exists()


def test_a_wrong_name_or_folder_is_one_line(cache, capsys, tmp_path):
    rc, out, err = _cli(capsys, "--remove", "checkpoint")
    assert rc == 2 and not out and err.count("\n") == 1
    assert "--remove: unknown 'checkpoint'" in err and "checkpoints, profiles, locks, all" in err
    (tmp_path / "file").write_text("")
    rc, _, err = _cli(capsys, "--dir", tmp_path / "file")
    assert rc == 2 and "is a file, not golem's cache folder" in err and err.count("\n") == 1
    rc, out, _ = _cli(capsys, "--dir", tmp_path / "absent")
    assert rc == 0 and "empty" in out and not (tmp_path / "absent").exists()
