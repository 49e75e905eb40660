"""The I/O layer's limits and lifecycle: interruptible waits, a close that never hangs, inputs
checked at the door, staging buffers from the caller's allocator, span reads across gaps.

Gated with events and fake clocks; nothing sleeps."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import threading

import numpy as np
import pytest

from golem.io.futures import wait_result
from golem.io.ranges import ByteRange
from golem.io.file_handles import FileHandles
from golem.io.positioned_reads import GAP, plan_reads, read_into
from golem.io.scheduler import (MAX_PARALLELISM, IOScheduler, SchedulerClosed, SchedulerSettings,
                                check_parallelism)
from golem.io.storage import FakeClock, Throttle, parse_throttle

WAIT_S = 10  # a safety net against hangs on failure, never a sleep
EXPERT_NBYTES = 256
NUM_EXPERTS = 16


@pytest.fixture()
def expert_file(tmp_path):
    """Expert e: 4 ranges of 64 bytes, 64 bytes apart (a gap between each), then e+1."""
    data = np.random.default_rng(1).integers(0, 256, 2 * NUM_EXPERTS * EXPERT_NBYTES,
                                             dtype=np.uint8)
    path = str(tmp_path / "experts.bin")
    data.tofile(path)

    def locate(key):
        base = key[1] * 2 * EXPERT_NBYTES
        return [ByteRange(path, base + i * 128, 64, i * 64, f"part{i}") for i in range(4)]

    return locate, data


def expected(data, ranges):
    out = np.zeros(EXPERT_NBYTES, np.uint8)
    for r in ranges:
        out[r.dest:r.dest + r.nbytes] = data[r.offset:r.end]
    return out


class StallingClock(FakeClock):
    """A fake clock whose sleeps never end on their own: only a wake-up ends them."""

    def __init__(self):
        super().__init__()
        self.stalled = threading.Event()

    def sleep(self, seconds, wake=None):
        self.stalled.set()
        assert wake is not None, "a throttled read must be wakeable"
        assert wake.wait(WAIT_S), "nobody woke the throttle"


# -- close never hangs ----------------------------------------------------------------------

def test_close_wakes_a_reader_stalled_on_the_throttle(expert_file):
    locate, _ = expert_file
    clock = StallingClock()
    throttle = Throttle(1e-5, clock=clock.now, sleep=clock.sleep)  # 10 kB/s
    s = IOScheduler(locate, lambda k: EXPERT_NBYTES,
                    SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, parallelism=2),
                    throttle=throttle).start()
    demand = s.submit((0, 1), depth=0)
    prefetch = s.submit((0, 3), depth=1)
    assert clock.stalled.wait(WAIT_S)
    threads = s.threads
    s.close()
    assert not any(t.is_alive() for t in threads)
    assert isinstance(demand.exception(timeout=0), SchedulerClosed)
    assert prefetch.cancelled() or isinstance(prefetch.exception(timeout=0), SchedulerClosed)


class StuckPreadv:
    """A ``preadv`` that does not return until the test lets it (a hung device)."""

    def __init__(self):
        self.entered = threading.Event()
        self.go = threading.Event()

    def __call__(self, fd, bufs, offset):
        self.entered.set()
        assert self.go.wait(WAIT_S)
        return os.preadv(fd, bufs, offset)


def test_close_gives_up_on_a_read_stuck_in_the_kernel(expert_file):
    locate, _ = expert_file
    preadv = StuckPreadv()
    with FileHandles(preadv=preadv) as handles:
        s = IOScheduler(locate, lambda k: EXPERT_NBYTES,
                        SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, parallelism=1,
                                          close_timeout_s=0),
                        handles=handles).start()
        demand = s.submit((0, 2), depth=0)
        assert preadv.entered.wait(WAIT_S)
        s.close()  # returns although a reader is still inside preadv
        assert isinstance(demand.exception(timeout=0), SchedulerClosed)
        stuck = [t for t in s.threads if t.is_alive()]  # (others may still be on their way out)
        assert stuck and all(t.daemon for t in stuck)  # they cannot keep the process alive
        preadv.go.set()
        for t in stuck:
            t.join(WAIT_S)
        assert not any(t.is_alive() for t in stuck)


def test_close_leaves_its_own_handles_open_while_a_reader_is_stuck(expert_file):
    locate, _ = expert_file
    preadv = StuckPreadv()
    s = IOScheduler(locate, lambda k: EXPERT_NBYTES,
                    SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, parallelism=1,
                                      close_timeout_s=0))
    s.handles.preadv = preadv
    s.start()
    s.submit((0, 2), depth=0)
    assert preadv.entered.wait(WAIT_S)
    s.close()
    assert s.handles.fd(locate((0, 2))[0].path) >= 0  # not closed under the stuck reader
    preadv.go.set()
    for t in s.threads:
        t.join(WAIT_S)
    s.handles.close()


def test_poll_without_timeout_returns_when_closed(expert_file):
    locate, _ = expert_file
    s = IOScheduler(locate, lambda k: EXPERT_NBYTES,
                    SchedulerSettings(buffer_nbytes=EXPERT_NBYTES)).start()
    got = []
    waiter = threading.Thread(target=lambda: got.append(s.poll(timeout=None)))
    waiter.start()
    s.close()
    waiter.join(WAIT_S)
    assert got == [[]]


# -- interruptible waits ----------------------------------------------------------------------

class CountingFuture(concurrent.futures.Future):
    """Records the timeout of every ``result`` call; times out ``misses`` times first."""

    def __init__(self, misses):
        super().__init__()
        self.misses = misses
        self.timeouts = []
        self.waiting = threading.Event()

    def result(self, timeout=None):
        self.timeouts.append(timeout)
        self.waiting.set()
        if self.misses > 0:
            self.misses -= 1
            raise concurrent.futures.TimeoutError()
        return super().result(timeout)


def test_wait_result_waits_in_short_slices_and_returns_the_result():
    future = CountingFuture(misses=5)
    future.set_result("bytes")
    assert wait_result(future) == "bytes"
    assert len(future.timeouts) == 6 and all(t is not None and t <= 0.1 for t in future.timeouts)
    failed = concurrent.futures.Future()
    failed.set_exception(OSError("disk"))
    with pytest.raises(OSError, match="disk"):
        wait_result(failed)
    cancelled = concurrent.futures.Future()
    cancelled.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        wait_result(cancelled)


def test_wait_result_times_out():
    future = CountingFuture(misses=3)
    with pytest.raises(concurrent.futures.TimeoutError):
        wait_result(future, timeout_s=0)
    with pytest.raises(ValueError, match="slice_s"):
        wait_result(future, slice_s=0)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread()
                    or not hasattr(signal, "pthread_kill"), reason="needs the main thread")
def test_ctrl_c_delivered_to_another_thread_interrupts_wait_result():
    """SIGINT that lands on a reader thread: the main thread's wait still raises
    KeyboardInterrupt, because it wakes to run the handler within a slice."""
    future = CountingFuture(misses=0)
    helper_ready = threading.Event()

    def deliver():
        assert future.waiting.wait(WAIT_S)
        helper_ready.set()
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # to this thread, not main

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        helper = threading.Thread(target=deliver)
        helper.start()
        with pytest.raises(KeyboardInterrupt):
            wait_result(future, timeout_s=WAIT_S)
        helper.join(WAIT_S)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert helper_ready.is_set()


# -- inputs checked at the door ---------------------------------------------------------------

def test_parallelism_is_bounded_at_once(expert_file):
    locate, _ = expert_file
    for bad in (0, -3, MAX_PARALLELISM + 1, 100000, 2.5, "8", True):
        with pytest.raises(ValueError, match=f"I/O parallelism must be an integer from 1 to "
                                             f"{MAX_PARALLELISM}"):
            IOScheduler(locate, lambda k: EXPERT_NBYTES,
                        SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, parallelism=bad))
    assert check_parallelism(np.int64(8)) == 8 and check_parallelism(MAX_PARALLELISM) == 256


@pytest.mark.parametrize("option, value", [("speculative_nbytes", -5), ("max_pending", -1),
                                           ("piece_nbytes", 0), ("min_job_nbytes", -1),
                                           ("retries", -1), ("max_gap_nbytes", -1),
                                           ("speculative_s", float("nan")),
                                           ("speculative_s", float("inf")),
                                           ("close_timeout_s", float("nan"))])
def test_caps_and_options_refuse_nonsense(expert_file, option, value):
    locate, _ = expert_file
    with pytest.raises(ValueError, match=option):
        IOScheduler(locate, lambda k: EXPERT_NBYTES,
                    SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, **{option: value}))


@pytest.mark.parametrize("changes, words", [
    ({"buffer_nbytes": 0}, "buffer_nbytes > 0"), ({"num_buffers": 0}, "num_buffers >= 1"),
    ({"reserved_for_demand": 4}, "reserved_for_demand must be in [0, num_buffers), got 4 "
                                 "with 4 buffers"),
    ({"reserved_for_demand": -1}, "reserved_for_demand"),
    ({"max_batch_nbytes": 0}, "max_batch_nbytes must be >= 1, got 0"),
    ({"speculative_s": 0.0}, "speculative_s must be > 0 and finite, got 0.0"),
    ({"close_timeout_s": -1}, "close_timeout_s must be >= 0, got -1")])
def test_settings_are_checked_when_made_with_one_line_naming_the_setting(changes, words):
    with pytest.raises(ValueError) as info:
        SchedulerSettings(**{"buffer_nbytes": EXPERT_NBYTES, "num_buffers": 4, **changes})
    assert words in str(info.value) and "\n" not in str(info.value)


def test_settings_are_frozen_and_a_changed_copy_is_checked_again():
    settings = SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, parallelism=np.int64(8))
    assert settings.parallelism == 8 and type(settings.parallelism) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.num_buffers = 2
    assert settings.but(num_buffers=2).num_buffers == 2 and settings.num_buffers == 16
    with pytest.raises(ValueError, match="num_buffers"):
        settings.but(num_buffers=0)
    assert settings == SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, parallelism=8)


def test_scheduler_refuses_anything_but_settings(expert_file):
    locate, _ = expert_file
    with pytest.raises(TypeError, match="SchedulerSettings"):
        IOScheduler(locate, lambda k: EXPERT_NBYTES, {"buffer_nbytes": EXPERT_NBYTES})


def test_staging_memory_beyond_the_machine_is_refused_before_allocation(expert_file):
    locate, _ = expert_file
    with pytest.raises(ValueError, match="staging buffers: .* more than this machine's"):
        IOScheduler(locate, lambda k: EXPERT_NBYTES,
                    SchedulerSettings(buffer_nbytes=1 << 40, num_buffers=1000))


@pytest.mark.parametrize("spec", ["nan", "inf", "-inf", "NaN,1ms", "-1", "0", "1e400",
                                  "2.5,1e400s", "2.5,nan"])
def test_storage_emulation_refuses_nan_inf_and_negative(spec):
    with pytest.raises(ValueError, match=f"bad storage emulation {spec!r}"):
        parse_throttle(spec)


def test_storage_emulation_accepts_slow_but_valid_devices():
    assert parse_throttle("1e-5").gb_per_s == 1e-5
    assert parse_throttle("0.001,2ms").latency_s == pytest.approx(2e-3)
    for bad in (dict(gb_per_s=float("nan")), dict(gb_per_s=float("inf")),
                dict(gb_per_s=1.0, latency_s=float("nan")), dict(gb_per_s=1.0, burst_nbytes=-1)):
        with pytest.raises(ValueError, match="throttle"):
            Throttle(**bad)


def test_a_throttle_wait_is_cut_short_by_its_wake_event():
    clock = StallingClock()
    throttle = Throttle(1e-6, clock=clock.now, sleep=clock.sleep)
    wake = threading.Event()
    deadline = throttle.reserve(10**6)  # a million seconds at 1 kB/s
    waiter = threading.Thread(target=throttle.wait_until, args=(deadline, wake))
    waiter.start()
    assert clock.stalled.wait(WAIT_S)
    wake.set()
    waiter.join(WAIT_S)
    assert not waiter.is_alive()


def test_throttle_attached_to_handles_paces_every_read(expert_file):
    locate, data = expert_file
    clock = FakeClock()
    throttle = Throttle(1e-3, latency_s=0.25, clock=clock.now, sleep=clock.sleep)  # 1 MB/s
    out = np.zeros(EXPERT_NBYTES, np.uint8)
    with FileHandles(throttle=throttle) as handles:
        read_into([(locate((0, 4)), out, "expert (0, 4)")], handles=handles)
    np.testing.assert_array_equal(out, expected(data, locate((0, 4))))
    assert throttle.reads == 4 and throttle.nbytes == EXPERT_NBYTES
    assert clock.now() == pytest.approx(4 * 0.25 + EXPERT_NBYTES / 1e6)
    assert max(clock.sleeps) <= 0.1  # sliced: the waiting thread sees signals


def test_scheduler_refuses_a_second_throttle_beside_handles(expert_file):
    locate, _ = expert_file
    with FileHandles() as handles, pytest.raises(ValueError, match="FileHandles"):
        IOScheduler(locate, lambda k: EXPERT_NBYTES,
                    SchedulerSettings(buffer_nbytes=EXPERT_NBYTES), handles=handles,
                    throttle=Throttle(1.0))


# -- staging buffers from the caller's allocator ------------------------------------------------

@pytest.mark.parametrize("direct", [False, True])
def test_reads_land_in_the_callers_memory(expert_file, direct):
    locate, data = expert_file
    arena = np.zeros(4 * 8192 + 7, np.uint8)  # one block of the caller's memory, unaligned
    asked = []

    def allocate(nbytes):
        start = 7 + len(asked) * 8192
        asked.append(nbytes)
        return arena[start:start + nbytes]

    with IOScheduler(locate, lambda k: EXPERT_NBYTES,
                     SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, num_buffers=4, direct=direct),
                     allocate=allocate) as s:
        assert asked == [EXPERT_NBYTES + (4096 if direct else 0)] * 4
        demand = wait_result(s.submit((0, 5), depth=0))
        assert np.shares_memory(demand, arena)
        np.testing.assert_array_equal(demand, expected(data, locate((0, 5))))
        prefetch = wait_result(s.submit((0, 6), depth=1))
        np.testing.assert_array_equal(prefetch, expected(data, locate((0, 6))))
        s.release(demand)
        assert [k for k, _ in s.poll()] == [(0, 6)]
        s.release(prefetch)
    assert len(asked) == 4  # never called again


@pytest.mark.parametrize("bad, error", [
    (lambda n: np.zeros(n, np.float32), "1-D uint8"),
    (lambda n: bytearray(n), "1-D uint8"),
    (lambda n: np.zeros(n - 1, np.uint8), "returned"),
    (lambda n: np.broadcast_to(np.zeros(1, np.uint8), (n,)), "writable"),
])
def test_a_bad_allocator_is_named(expert_file, bad, error):
    locate, _ = expert_file
    with pytest.raises((TypeError, ValueError), match=f"allocator .*{error}"):
        IOScheduler(locate, lambda k: EXPERT_NBYTES,
                    SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, num_buffers=2), allocate=bad)


# -- span reads across small gaps -------------------------------------------------------------

def test_plan_reads_spans_small_gaps_with_a_scratch_segment(expert_file):
    locate, _ = expert_file
    ranges = locate((0, 3))
    assert len(plan_reads([(ranges, 0, "e")])) == 4
    assert len(plan_reads([(ranges, 0, "e")], max_gap_nbytes=63)) == 4
    (run,) = plan_reads([(ranges, 0, "e")], max_gap_nbytes=64)
    assert run.offset == ranges[0].offset and run.nbytes == 4 * 64 + 3 * 64
    assert [seg[0] for seg in run.segments] == [0, GAP, 0, GAP, 0, GAP, 0]


@pytest.mark.parametrize("direct", [False, True])
def test_scheduler_reads_an_expert_across_gaps_in_one_preadv(expert_file, direct):
    locate, data = expert_file
    calls = []

    def preadv(fd, bufs, offset):
        calls.append(offset)
        return os.preadv(fd, bufs, offset)

    with FileHandles(preadv=preadv) as handles, \
            IOScheduler(locate, lambda k: EXPERT_NBYTES,
                        SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, max_gap_nbytes=4096,
                                          direct=direct),
                        handles=handles) as s:
        for e in (2, 9):
            buf = wait_result(s.submit((0, e), depth=0))
            np.testing.assert_array_equal(buf, expected(data, locate((0, e))))
            s.release(buf)
    assert len(calls) == 2  # direct: one aligned superset read through the bounce buffer


CHILD = """
import sys
from golem.io.ranges import ByteRange
from golem.io.scheduler import IOScheduler, SchedulerSettings, wait_result
from golem.io.storage import Throttle

path = sys.argv[1]
with IOScheduler(lambda key: [ByteRange(path, 0, 1 << 20, 0, "w")], lambda key: 1 << 20,
                 SchedulerSettings(buffer_nbytes=1 << 20), throttle=Throttle(1e-5)) as s:  # 100 s per read
    future = s.submit((0, 0), depth=0)
    print("waiting", flush=True)
    wait_result(future)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="POSIX signals")
def test_ctrl_c_during_a_stalled_read_ends_the_process_within_two_seconds(tmp_path):
    import subprocess
    import sys
    import time

    path = tmp_path / "slow.bin"
    path.write_bytes(bytes(1 << 20))
    # as from a terminal: a runner that starts jobs in the background leaves SIGINT ignored
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert child.stdout.readline().strip() == "waiting"
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        child.wait(WAIT_S)
        elapsed = time.monotonic() - sent
    finally:
        child.kill()
        child.wait()
    assert child.returncode != 0 and "KeyboardInterrupt" in child.stderr.read()
    assert elapsed < 2.0
