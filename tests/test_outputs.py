"""Every file golem writes goes through ``golem.io.outputs``: atomic beside its target, never
over a link, a device, a folder or a file of the model, a failed write leaves the old
file whole, and concurrent writers all finish with one of their files in place."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from golem.io.outputs import OutputError, check_output, write_bytes_output, write_output
from golem.runtime.trace import load_trace, save_trace

from trace_factory import random_trace


def test_a_new_file_is_written_with_the_usual_permissions(tmp_path):
    out = write_bytes_output(tmp_path / "a.bin", b"hello")
    assert out.read_bytes() == b"hello"
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["a.bin"]


def test_an_existing_file_is_replaced_and_keeps_its_mode(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    path.chmod(0o640)
    write_bytes_output(path, b"new")
    assert path.read_bytes() == b"new" and (path.stat().st_mode & 0o777) == 0o640


def test_a_symlink_is_refused_and_left_with_its_target(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    with pytest.raises(OutputError, match=r"--trace-out .*link\.npz: is a symbolic link"):
        write_bytes_output(link, b"x", what="--trace-out")
    assert link.is_symlink() and target.read_text() == "keep me"


def test_a_device_a_folder_and_a_missing_folder_are_refused(tmp_path):
    with pytest.raises(OutputError, match="not a regular file"):
        check_output("/dev/null", what="--trace-out")
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path, what="--trace-out")
    with pytest.raises(OutputError, match="does not exist"):
        check_output(tmp_path / "nope" / "a.npz", what="--trace-out")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="not a regular file"):
        write_bytes_output(fifo, b"x")


def test_files_of_the_model_folder_are_refused_by_every_spelling(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    shard = model / "model.safetensors"
    shard.write_bytes(b"weights")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "into-model").symlink_to(model)
    os.link(shard, elsewhere / "hardlink.safetensors")
    spellings = [shard, model / "new.npz", elsewhere / "into-model" / "model.safetensors",
                 elsewhere / "into-model" / "fresh.npz", elsewhere / "hardlink.safetensors",
                 elsewhere / ".." / "model" / "x.npz"]
    for path in spellings:
        with pytest.raises(OutputError, match="model folder"):
            write_bytes_output(path, b"x", what="--trace-out", protected=[model])
    assert shard.read_bytes() == b"weights"
    assert sorted(os.listdir(model)) == ["model.safetensors"]


def test_a_hub_blob_behind_a_snapshot_link_is_a_file_of_the_model(tmp_path):
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    (blobs / "abc").write_bytes(b"weights")
    (snap / "model.safetensors").symlink_to(os.path.relpath(blobs / "abc", snap))
    with pytest.raises(OutputError, match="model folder"):
        write_bytes_output(blobs / "abc", b"x", protected=[snap])
    assert (blobs / "abc").read_bytes() == b"weights"


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "t.npz"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"t\.npz: cannot write \(No space left on device\); the old file is left"):
        write_output(path, fail, what="--trace-out")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["t.npz"]

    def interrupted(f):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_output(path, interrupted)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["t.npz"]


def test_a_file_size_limit_is_a_one_line_error_and_the_old_trace_survives(tmp_path):
    """A real write failure from the kernel (RLIMIT_FSIZE: EFBIG), in a child process."""
    path = tmp_path / "t.npz"
    save_trace(path, random_trace(0, n=20))
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from trace_factory import random_trace
        from golem.io.outputs import OutputError
        from golem.runtime.trace import save_trace
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            save_trace({str(path)!r}, random_trace(1, n=4000), what="--trace-out")
        except OutputError as e:
            print(e)
            sys.exit(2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cannot write (File too large); the old file is left as it was" in proc.stdout
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["t.npz"]


def test_concurrent_writers_all_finish_and_the_file_is_one_of_theirs(tmp_path):
    path = tmp_path / "t.npz"
    traces = [random_trace(seed, n=200) for seed in range(8)]
    errors = []
    start = threading.Barrier(len(traces))

    def write(t):
        start.wait()
        try:
            save_trace(path, t)
        except Exception as e:  # noqa: BLE001 - the test reports any failure
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t,)) for t in traces]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors and not any(th.is_alive() for th in threads)
    got = load_trace(path)
    assert any(np.array_equal(got.experts, t.experts) for t in traces)
    assert os.listdir(tmp_path) == ["t.npz"]
