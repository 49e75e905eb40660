"""Generated checkpoints under concurrency and faults: concurrent first builds of one folder
build it once and all get it whole; a builder killed mid-way leaves no half folder."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from golem.io.index import SafetensorsIndex

# Builds a tiny checkpoint into argv[1], saying "building" when it starts writing one (the
# folder was not there yet) and "done" when build_checkpoint returns.
BUILDER = textwrap.dedent(
    """
    import sys
    import golem.runtime.synthetic as synthetic
    real = synthetic._write_checkpoint
    def announced(*args):
        print("building", flush=True)
        real(*args)
    synthetic._write_checkpoint = announced
    print(synthetic.build_checkpoint("olmoe", sys.argv[1]), flush=True)
    print("done", flush=True)
    """
)


def _builder(path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_concurrent_first_builds_build_once_and_all_get_the_same_folder(tmp_path):
    path = tmp_path / "cache" / "olmoe"
    procs = [_builder(path) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err
        assert out.endswith(f"{path}\ndone\n")
    assert sum(out.count("building") for out, _ in outs) == 1  # the others used the winner's
    assert sorted(q.name for q in path.parent.iterdir()) == ["olmoe", "olmoe.lock"]  # no partial left
    SafetensorsIndex(path)  # every header whole
    from golem.runtime.synthetic import build_checkpoint

    alone = build_checkpoint("olmoe", tmp_path / "alone")
    assert _files(path) == _files(alone)


def test_a_builder_killed_mid_way_leaves_no_half_folder(tmp_path):
    path = tmp_path / "cache" / "olmoe"
    p = _builder(path)
    assert p.stdout.readline() == "building\n"  # gated on the builder, not on time
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert not path.exists()
    partial = [q.name for q in path.parent.iterdir() if q.name.startswith("olmoe.partial-")]
    assert len(partial) <= 1
    q = _builder(path)  # the next build clears what the dead one left and succeeds
    out, err = q.communicate(timeout=300)
    assert q.returncode == 0, err
    assert sorted(x.name for x in path.parent.iterdir()) == ["olmoe", "olmoe.lock"]
    SafetensorsIndex(path)
