"""Positioned reads: exact bytes, merging, short reads, retries, direct I/O."""

from __future__ import annotations

import errno
import os
import pickle

import numpy as np
import pytest

from golem.io import file_handles, positioned_reads
from golem.io.file_handles import FileHandles
from golem.io.page_cache import cached_fraction, evict_from_page_cache
from golem.io.positioned_reads import read_into, read_ranges
from golem.io.ranges import ByteRange
from golem.io.read_errors import ReadError


@pytest.fixture()
def data_file(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=1_000_003, dtype=np.uint8)
    path = str(tmp_path / "experts.bin")
    data.tofile(path)
    return path, data


class CountingPreadv:
    """Wraps ``os.preadv``: counts calls and iovecs; can cap the bytes per call or fail."""

    def __init__(self, max_nbytes=None, failures=0, err=errno.EIO):
        self.calls = []
        self.max_nbytes = max_nbytes
        self.failures = failures
        self.err = err

    def __call__(self, fd, bufs, offset):
        self.calls.append((offset, [len(b) for b in bufs]))
        if self.failures:
            self.failures -= 1
            raise OSError(self.err, os.strerror(self.err))
        if self.max_nbytes is not None:
            bufs = positioned_reads._advance(list(bufs), 0)
            limited, left = [], self.max_nbytes
            for b in bufs:
                if left <= 0:
                    break
                limited.append(b[:left])
                left -= len(limited[-1])
            bufs = limited
        return os.preadv(fd, bufs, offset)


def test_exact_bytes_random_ranges(data_file):
    path, data = data_file
    rng = np.random.default_rng(1)
    ranges, dest = [], 0
    for i in range(40):
        offset = int(rng.integers(0, len(data) - 5000))
        nbytes = int(rng.integers(1, 5000))
        ranges.append(ByteRange(path, offset, nbytes, dest, f"t{i}"))
        dest += nbytes
    # sorted non-overlapping file ranges are required only within a run; keep them disjoint
    ranges = [r for i, r in enumerate(ranges)
              if all(r.end <= o.offset or o.end <= r.offset for o in ranges[:i])]
    out = np.zeros(dest, dtype=np.uint8)
    with FileHandles() as handles:
        nbytes = read_ranges(ranges, out, handles=handles)
    assert nbytes == sum(r.nbytes for r in ranges)
    for r in ranges:
        np.testing.assert_array_equal(out[r.dest:r.dest + r.nbytes], data[r.offset:r.end])


def test_adjacent_in_file_and_buffer_is_one_read_of_one_buffer(data_file):
    path, data = data_file
    counting = CountingPreadv()
    ranges = [ByteRange(path, 100 + 10 * i, 10, 10 * i, f"t{i}") for i in range(5)]
    ranges.append(ByteRange(path, 5000, 30, 50, "far"))
    out = bytearray(80)
    with FileHandles(preadv=counting) as handles:
        read_ranges(list(reversed(ranges)), out, handles=handles)
    assert counting.calls == [(100, [50]), (5000, [30])]
    assert bytes(out[:50]) == data[100:150].tobytes()
    assert bytes(out[50:]) == data[5000:5030].tobytes()


def test_adjacent_in_file_only_is_one_scattered_read(data_file):
    path, data = data_file
    counting = CountingPreadv()
    ranges = [ByteRange(path, 0, 10, 20, "a"), ByteRange(path, 10, 10, 0, "b")]
    out = np.zeros(30, dtype=np.uint8)
    with FileHandles(preadv=counting) as handles:
        read_ranges(ranges, out, handles=handles)
    assert counting.calls == [(0, [10, 10])]
    np.testing.assert_array_equal(out[20:30], data[0:10])
    np.testing.assert_array_equal(out[0:10], data[10:20])


def test_read_into_coalesces_across_buffers(data_file):
    path, data = data_file
    counting = CountingPreadv()
    first, second = np.zeros(64, np.uint8), np.zeros(64, np.uint8)
    with FileHandles(preadv=counting) as handles:
        total = read_into([([ByteRange(path, 1000, 64)], first, "expert (0, 1)"),
                           ([ByteRange(path, 1064, 64)], second, "expert (0, 2)")],
                          handles=handles)
    assert total == 128
    assert counting.calls == [(1000, [64, 64])]
    np.testing.assert_array_equal(first, data[1000:1064])
    np.testing.assert_array_equal(second, data[1064:1128])


def test_short_reads_resume(data_file):
    path, data = data_file
    counting = CountingPreadv(max_nbytes=7)
    ranges = [ByteRange(path, 3, 20, 0, "a"), ByteRange(path, 23, 20, 30, "b")]
    out = np.zeros(50, np.uint8)
    with FileHandles(preadv=counting) as handles:
        assert read_ranges(ranges, out, handles=handles) == 40
    assert len(counting.calls) == 6  # ceil(40 / 7)
    np.testing.assert_array_equal(out[:20], data[3:23])
    np.testing.assert_array_equal(out[30:50], data[23:43])


def test_eio_is_retried_then_succeeds(data_file):
    path, data = data_file
    counting = CountingPreadv(failures=3)
    out = np.zeros(100, np.uint8)
    with FileHandles(preadv=counting) as handles:
        read_ranges([ByteRange(path, 0, 100)], out, handles=handles, retries=3)
    assert len(counting.calls) == 4
    np.testing.assert_array_equal(out, data[:100])


def test_eio_past_retries_names_file_offset_and_expert(data_file):
    path, _ = data_file
    counting = CountingPreadv(failures=100)
    out = np.zeros(100, np.uint8)
    with FileHandles(preadv=counting) as handles, pytest.raises(ReadError) as info:
        read_ranges([ByteRange(path, 4096, 100, 0, "layers.3.mlp.up_proj.weight")], out,
                    handles=handles, retries=2, what="expert (3, 17)")
    error = info.value
    assert len(counting.calls) == 3
    assert isinstance(error, OSError) and error.errno == errno.EIO
    text = str(error)
    for part in (path, "4096", "100 bytes", "expert (3, 17)", "layers.3.mlp.up_proj.weight"):
        assert part in text
    assert error.attempts == 3
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == text and clone.path == path


def test_non_transient_error_is_not_retried(data_file):
    path, _ = data_file
    counting = CountingPreadv(failures=100, err=errno.EBADF)
    with FileHandles(preadv=counting) as handles, pytest.raises(ReadError, match="expert"):
        read_ranges([ByteRange(path, 0, 10)], bytearray(10), handles=handles, what="expert (0, 0)")
    assert len(counting.calls) == 1


def test_truncated_file_is_a_read_error(data_file):
    path, data = data_file
    with FileHandles() as handles, pytest.raises(ReadError, match="end of file"):
        read_ranges([ByteRange(path, len(data) - 10, 20, 0, "tail")], bytearray(20),
                    handles=handles, what="expert (1, 1)")


def test_range_outside_buffer_is_rejected(data_file):
    path, _ = data_file
    with FileHandles() as handles, pytest.raises(ValueError, match="does not fit"):
        read_ranges([ByteRange(path, 0, 20, 5, "w")], bytearray(20), handles=handles)


def test_handles_cached_and_closed(data_file):
    path, _ = data_file
    opened = []

    def opener(p, flags):
        fd = os.open(p, flags)
        opened.append(fd)
        return fd

    handles = FileHandles(opener=opener)
    with handles:
        for _ in range(3):
            read_ranges([ByteRange(path, 0, 10)], bytearray(10), handles=handles)
    assert len(opened) == 1
    with pytest.raises(OSError):
        os.fstat(opened[0])
    with pytest.raises(ValueError, match="closed"):
        handles.fd(path)


def _unaligned_ranges(path, size):
    return [ByteRange(path, 1, 4095, 0, "a"), ByteRange(path, 4096 * 3 + 17, 10_000, 4095, "b"),
            ByteRange(path, 4096 * 3 + 17 + 10_000, 3, 14_095, "c"),
            ByteRange(path, 300_001, positioned_reads.DIRECT_CHUNK_NBYTES // 16 + 5, 14_098, "d"),
            ByteRange(path, size - 7, 7, 14_098 + positioned_reads.DIRECT_CHUNK_NBYTES // 16 + 5, "tail")]


def _check(out, ranges, data):
    for r in ranges:
        np.testing.assert_array_equal(out[r.dest:r.dest + r.nbytes], data[r.offset:r.end])


def test_direct_mode_unaligned_ranges(data_file, monkeypatch):
    path, data = data_file
    for module in (file_handles, positioned_reads):  # several chunks per run
        monkeypatch.setattr(module, "DIRECT_CHUNK_NBYTES", 64 * 1024)
    ranges = _unaligned_ranges(path, len(data))
    out = np.zeros(max(r.dest + r.nbytes for r in ranges), np.uint8)
    with FileHandles() as handles:
        if handles.mode(path, direct=True) != file_handles.MODE_O_DIRECT:
            pytest.skip("O_DIRECT refused by this file system")
        read_ranges(ranges, out, handles=handles, direct=True)
    _check(out, ranges, data)


def test_direct_mode_falls_back_when_o_direct_is_refused(data_file):
    path, data = data_file

    def opener(p, flags):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return os.open(p, flags)

    ranges = _unaligned_ranges(path, len(data))
    out = np.zeros(max(r.dest + r.nbytes for r in ranges), np.uint8)
    with FileHandles(opener=opener) as handles:
        read_ranges(ranges, out, handles=handles, direct=True)
        assert handles.mode(path, direct=True) in (file_handles.MODE_FADVISE, file_handles.MODE_NOCACHE)
    _check(out, ranges, data)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this OS")
def test_direct_read_refused_at_read_time_downgrades(data_file):
    path, data = data_file

    def preadv(fd, bufs, offset):
        if os.get_blocking(fd) and fcntl_flags(fd) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return os.preadv(fd, bufs, offset)

    ranges = _unaligned_ranges(path, len(data))
    out = np.zeros(max(r.dest + r.nbytes for r in ranges), np.uint8)
    with FileHandles(preadv=preadv) as handles:
        read_ranges(ranges, out, handles=handles, direct=True)
        assert handles.mode(path, direct=True) == file_handles.MODE_FADVISE
    _check(out, ranges, data)


def fcntl_flags(fd):
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_evict_from_page_cache(data_file):
    path, _ = data_file
    with open(path, "rb") as f:
        f.read()
    if not evict_from_page_cache(path):
        pytest.skip("no posix_fadvise on this OS")
    fraction = cached_fraction(path)
    if fraction is None:
        pytest.skip("mincore unavailable")
    assert fraction < 0.5


def test_direct_mode_reads_straight_into_a_buffer_with_the_file_alignment(data_file):
    path, data = data_file
    offset, nbytes = 5 * 4096 + 123, 3 * file_handles.ALIGN + 1000
    raw = file_handles.aligned_empty(nbytes + file_handles.ALIGN)
    out = raw[offset % file_handles.ALIGN:offset % file_handles.ALIGN + nbytes]  # same alignment as the file
    seen, calls = [], []

    def preadv(fd, bufs, at):
        calls.append(at)
        seen.extend(np.frombuffer(b, np.uint8).ctypes.data for b in bufs)
        return os.preadv(fd, bufs, at)

    with FileHandles(preadv=preadv) as handles:
        if handles.mode(path, direct=True) != file_handles.MODE_O_DIRECT:
            pytest.skip("O_DIRECT refused by this file system")
        read_ranges([ByteRange(path, offset, nbytes, 0, "w")], out, handles=handles, direct=True)
    np.testing.assert_array_equal(out, data[offset:offset + nbytes])
    start = out.ctypes.data
    assert any(start <= a < start + nbytes for a in seen)  # the device wrote `out` itself
    assert calls == [offset - offset % file_handles.ALIGN]  # one read: head block, middle, tail block


def test_long_runs_are_cut_at_aligned_file_offsets(data_file):
    path, data = data_file
    ranges = [ByteRange(path, 100, 6000, 0, "a"), ByteRange(path, 6100, 4000, 6000, "b")]
    runs = positioned_reads.plan_reads([(ranges, 0, "expert (0, 0)")], max_run_nbytes=4096)
    assert [(r.offset, r.nbytes) for r in runs] == [(100, 3996), (4096, 4096), (8192, 1908)]
    assert all(r.whats == ["expert (0, 0)", "expert (0, 0)"] for r in runs)
    out = np.zeros(10_000, np.uint8)
    with FileHandles() as handles:
        assert read_into([(ranges, out, "x")], handles=handles, max_run_nbytes=4096) == 10_000
    np.testing.assert_array_equal(out, data[100:10_100])


def test_direct_mode_scatters_straight_into_several_buffers(data_file):
    """Two ranges adjacent at an aligned file offset, each into a buffer of its own with the
    file's alignment: one read, and the device writes both buffers itself."""
    path, data = data_file
    a = ByteRange(path, 5 * 4096 + 123, 3 * 4096 - 123, 0, "a")
    b = ByteRange(path, 8 * 4096, 2 * 4096 + 500, 0, "b")
    raw_a, raw_b = file_handles.aligned_empty(4 * 4096), file_handles.aligned_empty(4 * 4096)
    out_a, out_b = raw_a[123:123 + a.nbytes], raw_b[:b.nbytes]
    seen, calls = [], []

    def preadv(fd, bufs, at):
        calls.append(at)
        seen.extend(np.frombuffer(buf, np.uint8).ctypes.data for buf in bufs)
        return os.preadv(fd, bufs, at)

    with FileHandles(preadv=preadv) as handles:
        if handles.mode(path, direct=True) != file_handles.MODE_O_DIRECT:
            pytest.skip("O_DIRECT refused by this file system")
        assert read_into([([a], out_a, "a"), ([b], out_b, "b")], handles=handles,
                         direct=True) == a.nbytes + b.nbytes
    np.testing.assert_array_equal(out_a, data[a.offset:a.end])
    np.testing.assert_array_equal(out_b, data[b.offset:b.end])
    assert calls == [5 * 4096]
    for out in (out_a, out_b):
        assert any(out.ctypes.data <= s < out.ctypes.data + len(out) for s in seen)


def test_direct_mode_with_a_misaligned_boundary_still_reads_exact_bytes(data_file):
    path, data = data_file
    a = ByteRange(path, 4096 + 10, 5000, 0, "a")  # ends mid-block: the bounce path
    b = ByteRange(path, a.end, 9000, 0, "b")
    out_a, out_b = np.zeros(a.nbytes, np.uint8), np.zeros(b.nbytes, np.uint8)
    with FileHandles() as handles:
        read_into([([a], out_a, "a"), ([b], out_b, "b")], handles=handles, direct=True)
    np.testing.assert_array_equal(out_a, data[a.offset:a.end])
    np.testing.assert_array_equal(out_b, data[b.offset:b.end])


def test_span_read_across_gaps_direct_and_buffered(data_file):
    path, data = data_file
    ranges = [ByteRange(path, 3 * 4096 + 100 + i * 6000, 4000, i * 4000, i) for i in range(5)]
    for direct in (False, True):
        out = np.zeros(5 * 4000, np.uint8)
        with FileHandles() as handles:
            runs = positioned_reads.plan_reads([(ranges, 0, "x")], max_gap_nbytes=2000)
            assert len(runs) == 1
            positioned_reads.read_run(runs[0], [memoryview(out)], handles=handles, direct=direct)
        _check(out, ranges, data)
