"""The I/O scheduler, driven by gated fake readers: no sleeps, every ordering forced."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import gc
import os
import threading

import numpy as np
import pytest

from golem.io.ranges import ByteRange
from golem.io.file_handles import FileHandles
from golem.io.positioned_reads import NOWAIT
from golem.io.read_errors import ReadError
from golem.io.scheduler import IOScheduler, SchedulerClosed, SchedulerSettings, describe
from golem.io.storage import FakeClock, Throttle, parse_throttle

EXPERT_NBYTES = 256
NUM_EXPERTS = 64
WAIT_S = 10  # a safety net against hangs on failure, never a sleep


def locate(key):
    """Expert e of layer l: two stacked tensors, so experts e and e+1 are adjacent in both."""
    layer, expert = key
    half = EXPERT_NBYTES // 2
    base = layer * NUM_EXPERTS * EXPERT_NBYTES
    return [ByteRange("experts.bin", base + expert * half, half, 0, "gate"),
            ByteRange("experts.bin", base + NUM_EXPERTS * half + expert * half, half, half, "up")]


def sparse_locate(key):
    """Like ``locate``, but no two experts touch, so nothing coalesces."""
    layer, expert = key
    return [ByteRange("experts.bin", (layer * NUM_EXPERTS + expert) * 2 * EXPERT_NBYTES,
                      EXPERT_NBYTES, 0, "w")]


def pattern(what: str) -> int:
    return sum(what.encode()) % 251


class GatedReader:
    """A reader that records each call, then blocks until the test grants a permit."""

    def __init__(self, fail=None):
        self.cond = threading.Condition()
        self.calls = []
        self.permits = 0
        self.allowed = set()
        self.fail = fail or {}

    def __call__(self, requests, *, handles, direct, retries):
        whats = tuple(what for _, _, what in requests)
        with self.cond:
            self.calls.append(whats)
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: self.permits > 0 or whats[0] in self.allowed,
                                      WAIT_S), "reader never released"
            if whats[0] in self.allowed:
                self.allowed.discard(whats[0])
            else:
                self.permits -= 1
        for what in whats:
            if what in self.fail:
                raise self.fail[what]
        total = 0
        for ranges, out, what in requests:
            out[:] = pattern(what)
            total += sum(r.nbytes for r in ranges)
        return total

    def allow(self, n: int = 1) -> None:
        with self.cond:
            self.permits += n
            self.cond.notify_all()

    def allow_key(self, key) -> None:
        """Let the read that starts with ``key`` (and only it) finish."""
        with self.cond:
            self.allowed.add(describe(key))
            self.cond.notify_all()

    def wait_calls(self, n: int) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.calls) >= n, WAIT_S), \
                f"expected {n} reads, saw {self.calls}"
            return list(self.calls)

    def keys(self):
        return [what for call in self.calls for what in call]


def scheduler(reader, *, locate=sparse_locate, clock=None, **settings):
    settings.setdefault("buffer_nbytes", EXPERT_NBYTES)
    settings.setdefault("num_buffers", 8)
    extra = {} if clock is None else {"clock": clock}
    return IOScheduler(locate, lambda key: EXPERT_NBYTES, SchedulerSettings(**settings),
                       read=reader, **extra)


def result(future):
    return future.result(timeout=WAIT_S)


def test_demand_first_then_depth_then_score():
    reader = GatedReader()
    with scheduler(reader, parallelism=1) as s:
        blocker = s.submit((0, 0), depth=1)
        reader.wait_calls(1)
        futures = [s.submit((1, 1), depth=2, score=0.9), s.submit((1, 2), depth=1, score=0.1),
                   s.submit((1, 3), depth=1, score=0.8), s.submit((1, 4), depth=3, score=1.0)]
        demand = s.submit((2, 5), depth=0)
        assert reader.wait_calls(2)[1] == (describe((2, 5)),)  # its own lane, at once
        second_demand = s.submit((2, 6), depth=0)
        reader.allow(100)
        buffer = result(demand)
        assert len(buffer) == EXPERT_NBYTES and (buffer == pattern("expert (2, 5)")).all()
        s.release(buffer)
        s.release(result(second_demand))
        for future in [blocker] + futures:
            result(future)
        assert reader.keys() == [describe(k) for k in
                                 [(0, 0), (2, 5), (2, 6), (1, 3), (1, 2), (1, 1), (1, 4)]]
        keys = {key for key, buf in s.poll()}
        assert keys == {(0, 0), (1, 1), (1, 2), (1, 3), (1, 4)}  # demands are not polled
        stats = s.statistics()
        assert stats.requests == {"prefetch": 5, "demand": 2}
        assert stats.by_depth == {0: 2, 1: 3, 2: 1, 3: 1}


def test_submit_many_hands_a_batch_of_prefetches_to_the_loop_once(monkeypatch):
    reader = GatedReader()
    with scheduler(reader, parallelism=2, activate_on_loop=True) as s:
        kicks = []
        original = s._loop_thread.call_soon
        monkeypatch.setattr(s._loop_thread, "call_soon", lambda f: (kicks.append(f), original(f)))
        futures = s.submit_many([((1, e), 1, 0.5) for e in range(4)])
        assert len(kicks) == 1  # one hand-off for the batch; submit() would make one per key here
        reader.allow(100)
        for future in futures:
            s.release(result(future))


def test_prefetches_start_on_the_callers_thread_without_waking_the_loop(monkeypatch):
    reader = GatedReader()
    with scheduler(reader, parallelism=2) as s:
        woken = []
        original = s._loop_thread.call_soon
        monkeypatch.setattr(s._loop_thread, "call_soon", lambda f: (woken.append(f), original(f)))
        futures = s.submit_many([((1, e), 1, 0.5) for e in range(4)])
        assert len(reader.wait_calls(2)) == 2  # both readers busy at once, activated by this thread
        reader.allow(100)
        for future in futures:
            s.release(result(future))  # each release lets the next queued prefetch start here too
        stats = s.statistics()
        assert stats.reads == 4 and stats.loop_wakes == 0 and stats.calls == 5 and woken == []


def test_submit_many_orders_as_single_submits():
    reader = GatedReader()
    with scheduler(reader, parallelism=1) as s:
        blocker = s.submit((0, 0), depth=1)
        reader.wait_calls(1)
        futures = s.submit_many([((1, 1), 2, 0.9), ((1, 2), 1, 0.1), ((1, 3), 1, 0.8), ((1, 4), 3, 1.0)])
        assert s.submit_many([((1, 3), 2, 0.0)])[0] is futures[2]  # deduped like submit
        demands = s.submit_demands([(2, 5), (2, 6)])
        assert reader.wait_calls(2)[1] == (describe((2, 5)),)  # demands start at once, in order
        reader.allow(100)
        for demand, key in zip(demands, [(2, 5), (2, 6)]):
            buffer = result(demand)
            assert (buffer == pattern(describe(key))).all()
            s.release(buffer)
        for future in [blocker] + futures:
            result(future)
        assert reader.keys() == [describe(k) for k in
                                 [(0, 0), (2, 5), (2, 6), (1, 3), (1, 2), (1, 1), (1, 4)]]
        stats = s.statistics()
        assert stats.requests == {"prefetch": 6, "demand": 2} and stats.deduped == 1


def test_demands_waiting_for_buffers_start_in_turn_on_the_demand_lane():
    reader = GatedReader()
    with scheduler(reader, num_buffers=3, reserved_for_demand=0, parallelism=2) as s:
        futures = s.submit_demands([(0, e) for e in range(4)])
        assert sorted(reader.wait_calls(3)) == [(describe((0, e)),) for e in range(3)]
        assert s.pending((0, 3)) == "queued"  # no buffer left
        later = s.submit_demands([(0, 4)])[0]
        assert s.pending((0, 4)) == "queued"  # behind the demand already waiting
        reader.allow_key((0, 0))
        s.release(result(futures[0]))  # its reader is free, (0, 3) gets the buffer
        assert reader.wait_calls(4)[3] == (describe((0, 3)),)
        reader.allow_key((0, 1))
        s.release(result(futures[1]))  # two reads run: a reader takes it on the demand lane
        assert reader.wait_calls(5)[4] == (describe((0, 4)),)
        reader.allow(3)
        for future in futures[2:] + [later]:
            s.release(result(future))
        stats = s.statistics()
        assert stats.requests == {"demand": 5} and stats.reads == 5 and stats.free_buffers == 3


def test_adjacent_demands_submitted_together_are_one_read():
    reader = GatedReader()
    with scheduler(reader, locate=locate, parallelism=2) as s:
        futures = s.submit_demands([(0, 7), (0, 3), (0, 6), (0, 2), (0, 9)])
        reader.allow(3)
        for future in futures:
            s.release(result(future))
        assert sorted(reader.calls) == sorted([(describe((0, 7)), describe((0, 6))),
                                               (describe((0, 3)), describe((0, 2))),
                                               (describe((0, 9)),)])
        assert s.statistics().coalesced_reads == 2


def test_new_prefetches_start_at_once_only_as_far_as_buffers_readers_and_reserve_allow():
    reader = GatedReader()
    with scheduler(reader, num_buffers=3, reserved_for_demand=1, parallelism=4) as s:
        futures = s.submit_many([((0, 1), 2, 0.9), ((0, 2), 1, 0.1), ((0, 3), 1, 0.8)])
        assert sorted(reader.wait_calls(2)) == [(describe((0, 2)),), (describe((0, 3)),)]  # nearest first
        assert s.pending_many([(0, 3), (0, 2), (0, 1)]) == ["running", "running", "queued"]  # the reserve
        reader.allow(3)
        for _ in futures:
            for _, buffer in s.poll(timeout=WAIT_S):
                s.release(buffer)
        assert reader.wait_calls(3)[2] == (describe((0, 1)),)
        assert s.statistics().requests == {"prefetch": 3}


def test_a_key_twice_in_one_call_is_one_request_at_the_better_priority():
    reader = GatedReader()
    with scheduler(reader) as s:
        prefetch, demand = s.submit_many([((0, 1), 2, 0.1), ((0, 1), 0, 0.0)])
        assert prefetch is demand
        reader.allow()
        s.release(result(demand))
        stats = s.statistics()
        assert stats.reads == 1 and stats.upgraded == 1 and stats.deduped == 1 and s.poll() == []


def test_prefetches_without_futures_are_polled_and_a_demand_gets_one_at_any_stage():
    """The prefetcher takes its reads from ``poll`` and asks for no futures (each costs a
    condition to make, set and cancel); a demand for such a key, published, running or
    queued, still gets a future holding that very read's buffer, and no key is read twice."""
    reader = GatedReader()
    a, b, c = (0, 1), (0, 2), (0, 3)
    with scheduler(reader, parallelism=1) as s:
        assert s.submit_many([(a, 1, 0.9), (b, 1, 0.5), (c, 1, 0.1)], futures=False) is None
        reader.wait_calls(1)
        reader.allow()  # a lands and is published; b starts; c waits in the queue
        reader.wait_calls(2)
        assert s.pending_many([a, b, c]) == ["published", "running", "queued"]
        fa, fb, fc = s.submit_demands([a, b, c])
        assert fa.done()  # published: handed over at once
        reader.allow(2)
        buffers = [result(f) for f in (fa, fb, fc)]
        for key, buffer in zip((a, b, c), buffers):
            assert (buffer == pattern(describe(key))).all()
        assert s.poll() == []  # each went to its demand, not to poll
        s.release_all(buffers)
        stats = s.statistics()
    assert reader.keys() == [describe(a), describe(b), describe(c)]
    assert stats.reads == 3 and stats.upgraded == 3


def test_prefetches_without_futures_are_cancelled_and_closed_cleanly():
    reader = GatedReader()
    a, b = (0, 1), (0, 2)
    with scheduler(reader, parallelism=1) as s:
        s.submit_many([(a, 1, 0.9), (b, 1, 0.5)], futures=False)
        reader.wait_calls(1)
        assert s.cancel_many([b], queued_only=True) == [True]  # queued: dropped, never read
        assert s.pending_many([b]) == [None]
        reader.allow()
        [(key, buffer)] = s.poll(timeout=WAIT_S)
        assert key == a and (buffer == pattern(describe(a))).all()
        s.release(buffer)
        s.submit_many([(b, 1, 0.5)], futures=False)  # asked again, then closed while out
        reader.wait_calls(2)
        reader.allow()
    assert reader.keys() == [describe(a), describe(b)]


def test_a_waiting_poll_wakes_as_a_prefetch_lands():
    """A publication notifies only while a thread waits in ``poll`` (the engine polls without
    waiting); one that waits is woken as the read lands, long before its timeout."""
    reader = GatedReader()
    waiting, got = threading.Event(), []
    with scheduler(reader) as s:
        s.submit_many([((0, 1), 1, 0.5)], futures=False)
        reader.wait_calls(1)
        wait_for = s._cond.wait_for

        def entered(predicate, timeout=None):
            waiting.set()  # the lock goes once it waits: the read can only land after that
            return wait_for(predicate, timeout)

        s._cond.wait_for = entered
        poller = threading.Thread(target=lambda: got.append(s.poll(timeout=10 * WAIT_S)))
        poller.start()
        assert waiting.wait(WAIT_S)
        reader.allow()
        poller.join(WAIT_S)
        assert not poller.is_alive(), "poll slept through the publication"
        [[(key, buffer)]] = got
        assert key == (0, 1)
        s.release(buffer)


def test_submit_many_rejects_a_negative_depth_before_queueing_anything():
    with scheduler(GatedReader()) as s:
        with pytest.raises(ValueError, match="depth must be >= 0"):
            s.submit_many([((0, 1), 1, 0.0), ((0, 2), -1, 0.0)])
        assert s.pending((0, 1)) is None


def test_demand_takes_next_free_buffer_before_waiting_prefetches():
    reader = GatedReader()
    with scheduler(reader, num_buffers=2, reserved_for_demand=0, parallelism=4) as s:
        s.submit((0, 0), depth=1)
        s.submit((0, 1), depth=1)
        reader.allow(2)
        held = [buf for _, buf in s.poll(timeout=WAIT_S)]
        while len(held) < 2:
            held += [buf for _, buf in s.poll(timeout=WAIT_S)]
        waiting = s.submit((0, 2), depth=1, score=1.0)
        demand = s.submit((0, 3), depth=0)
        assert s.statistics().free_buffers == 0 and len(reader.calls) == 2
        s.release(held.pop())
        reader.wait_calls(3)
        assert reader.calls[2] == (describe((0, 3)),)
        reader.allow(2)
        result(demand)
        s.release(held.pop())
        result(waiting)


def test_abandoned_demands_hand_their_buffers_back_as_they_land():
    reader = GatedReader()
    with scheduler(reader, num_buffers=4) as s:
        futures = s.submit_demands([(0, 1), (0, 2)])
        reader.allow_key((0, 1))
        result(futures[0])
        reader.wait_calls(2)
        assert s.statistics().free_buffers == 2
        s.abandon(futures)  # one landed, one still being read
        assert s.statistics().free_buffers == 3
        done = threading.Event()
        futures[1].add_done_callback(lambda _: done.set())  # runs after the scheduler's own
        reader.allow_key((0, 2))
        assert done.wait(WAIT_S)
        assert s.statistics().free_buffers == 4


def test_dedupe_and_upgrade_of_running_prefetch():
    reader = GatedReader()
    with scheduler(reader) as s:
        first = s.submit((3, 7), depth=2, score=0.5)
        reader.wait_calls(1)
        assert s.submit((3, 7), depth=1, score=0.9) is first
        demand = s.submit((3, 7), depth=0)
        assert demand is first
        reader.allow()
        buffer = result(demand)
        assert (buffer == pattern("expert (3, 7)")).all()
        assert s.poll() == []  # delivered through the future, not published twice
        stats = s.statistics()
        assert stats.reads == 1 and stats.upgraded == 1 and stats.deduped == 2
        s.release(buffer)
        assert s.statistics().free_buffers == 8


def test_upgrade_of_queued_prefetch_jumps_the_queue():
    reader = GatedReader()
    with scheduler(reader, parallelism=1) as s:
        s.submit((0, 0), depth=1)
        reader.wait_calls(1)
        s.submit((0, 1), depth=1, score=0.9)
        s.submit((0, 2), depth=3, score=0.1)
        demand = s.submit((0, 2), depth=0)
        reader.allow(3)
        result(demand)
        assert reader.wait_calls(3)[1] == (describe((0, 2)),)


def test_demand_for_published_prefetch_is_handed_over():
    reader = GatedReader()
    with scheduler(reader) as s:
        prefetch = s.submit((1, 1), depth=1)
        reader.allow()
        result(prefetch)
        demand = s.submit((1, 1), depth=0)
        assert demand.done() and s.poll() == []
        assert s.pending((1, 1)) is None
        s.release(demand.result())
        assert s.statistics().reads == 1


def test_cancel_queued_and_running_prefetches():
    reader = GatedReader()
    with scheduler(reader, parallelism=1) as s:
        running = s.submit((0, 0), depth=1)
        reader.wait_calls(1)
        queued = s.submit((0, 1), depth=1)
        assert s.cancel((0, 1)) and queued.cancelled()
        assert s.cancel((0, 0)) and running.cancelled()
        assert not s.cancel((0, 0)) and not s.cancel((9, 9))
        assert s.statistics().speculative_nbytes_in_flight == EXPERT_NBYTES  # still counts
        after = s.submit((0, 2), depth=1)
        reader.allow(2)
        result(after)
        assert reader.keys() == [describe((0, 0)), describe((0, 2))]
        assert [key for key, _ in s.poll()] == [(0, 2)]
        stats = s.statistics()
        assert stats.cancelled == 2 and stats.cancelled_nbytes == EXPERT_NBYTES
        assert stats.useful_nbytes == EXPERT_NBYTES and stats.free_buffers == 7


def test_cancel_never_touches_demand_and_resubmit_revives_running_read():
    reader = GatedReader()
    with scheduler(reader, yield_to_demand=False) as s:
        demand = s.submit((0, 0), depth=0)
        prefetch = s.submit((0, 1), depth=1)
        reader.wait_calls(2)
        assert not s.cancel((0, 0))
        assert s.cancel((0, 1)) and prefetch.cancelled()
        revived = s.submit((0, 1), depth=1)
        assert revived is not prefetch and not revived.done()
        reader.allow(2)
        s.release(result(demand))
        result(revived)
        assert s.statistics().reads == 2 and [k for k, _ in s.poll()] == [(0, 1)]


def test_cancel_many_and_pending_many_take_the_lock_once():
    reader = GatedReader()
    with scheduler(reader, parallelism=1) as s:
        running = s.submit((0, 1), depth=1)
        reader.wait_calls(1)
        queued = s.submit_many([((0, 2), 1, 0.5), ((0, 3), 2, 0.5)])
        demand = s.submit((0, 4), depth=0)
        reader.wait_calls(2)
        calls = s.statistics().calls
        assert s.pending_many([(0, 1), (0, 2), (0, 4), (0, 9)]) == ["running", "queued", "running", None]
        # queued_only spares the running prefetch; a demand and an unknown key are never cancelled
        assert s.cancel_many([(0, 1), (0, 2), (0, 4), (0, 9)], queued_only=True) == [False, True, False, False]
        assert s.cancel_many([(0, 1), (0, 3)]) == [True, True]
        assert s.cancel_many([]) == [] and s.pending_many([]) == []
        assert s.statistics().calls - calls == 3  # one per call with keys
        assert running.cancelled() and all(f.cancelled() for f in queued) and not demand.cancelled()
        reader.allow(2)
        s.release(result(demand))


def test_future_cancelled_by_caller_is_not_read():
    reader = GatedReader()
    with scheduler(reader, parallelism=1) as s:
        s.submit((0, 0), depth=1)
        reader.wait_calls(1)
        assert s.submit((0, 1), depth=1).cancel()
        last = s.submit((0, 2), depth=2)
        reader.allow(2)
        result(last)
        assert reader.keys() == [describe((0, 0)), describe((0, 2))]


def test_buffer_pool_backpressure():
    reader = GatedReader()
    with scheduler(reader, num_buffers=3, reserved_for_demand=1, parallelism=4) as s:
        futures = [s.submit((0, e), depth=1, score=-e) for e in range(5)]
        reader.wait_calls(2)
        assert s.statistics().queued == 3 and s.statistics().free_buffers == 1
        reader.allow(2)
        result(futures[0]), result(futures[1])
        polled = s.poll()
        assert sorted(k for k, _ in polled) == [(0, 0), (0, 1)]
        assert len(reader.calls) == 2  # nothing starts until a buffer comes back
        demand = s.submit((1, 0), depth=0)  # takes the reserved buffer
        reader.wait_calls(3)
        reader.allow()
        s.release(result(demand))
        assert len(reader.calls) == 3
        s.release(polled[0][1])
        reader.wait_calls(4)
        assert reader.calls[3] == (describe((0, 2)),)
        with pytest.raises(ValueError, match="twice"):
            s.release(polled[0][1])
        with pytest.raises(ValueError, match="not a staging buffer"):
            s.release(np.zeros(EXPERT_NBYTES, np.uint8))
        reader.allow(10)
        s.release(polled[1][1])
        seen = []
        while len(seen) < 3:  # the engine must keep releasing for the rest to get buffers
            for key, buf in s.poll(timeout=WAIT_S):
                seen.append(key)
                s.release(buf)
        assert sorted(seen) == [(0, 2), (0, 3), (0, 4)]


def test_speculative_byte_cap_counts_cancelled_reads_until_they_return():
    reader = GatedReader()
    with scheduler(reader, parallelism=4, speculative_nbytes=2 * EXPERT_NBYTES) as s:
        futures = [s.submit((0, e), depth=1, score=-e) for e in range(4)]
        reader.wait_calls(2)
        assert s.statistics().speculative_nbytes_in_flight == 2 * EXPERT_NBYTES
        s.cancel((0, 0))
        demand = s.submit((5, 5), depth=0)  # demand ignores the cap
        reader.wait_calls(3)
        assert len(reader.calls) == 3 and s.statistics().queued == 2
        reader.allow_key((5, 5))
        s.release(result(demand))
        assert len(reader.calls) == 3  # the cancelled read still counts
        reader.allow_key((0, 0))
        reader.wait_calls(4)
        assert reader.calls[3] == (describe((0, 2)),)
        reader.allow(10)
        for future in futures[1:]:
            result(future)
        assert s.statistics().speculative_nbytes_in_flight == 0


def test_speculative_time_cap_follows_measured_throughput():
    """A demand read waits behind at most ``speculative_s`` of prefetch reads, at the
    throughput the device has shown: here one expert per (fake) second."""
    from golem.io.storage import FakeClock

    clock, reader = FakeClock(), GatedReader()
    with scheduler(reader, parallelism=8, speculative_s=2.5, clock=clock.now) as s:
        s.submit((0, 0), depth=1)
        reader.wait_calls(1)
        clock.advance(1.0)  # the device takes one second for one expert
        reader.allow(1)
        for _, buf in s.poll(WAIT_S):
            s.release(buf)
        assert s.statistics().gb_per_s == EXPERT_NBYTES / 1e9
        futures = [s.submit((1, e), depth=1, score=-e) for e in range(5)]
        reader.wait_calls(3)  # 2.5 seconds' worth: two experts in flight, not eight
        demand = s.submit((5, 5), depth=0)
        reader.wait_calls(4)
        assert reader.calls[3] == (describe((5, 5)),)
        assert s.statistics().queued == 3
        assert s.statistics().speculative_nbytes_in_flight == 2 * EXPERT_NBYTES
        reader.allow(10)
        s.release(result(demand))
        for future in futures:
            result(future)


def test_speculative_time_cap_must_be_positive():
    with pytest.raises(ValueError, match="speculative_s"):
        scheduler(GatedReader(), speculative_s=0)


def test_pending_queue_is_bounded():
    reader = GatedReader()
    with scheduler(reader, parallelism=1, max_pending=2) as s:
        s.submit((0, 0), depth=1)
        reader.wait_calls(1)
        low = s.submit((0, 1), depth=2, score=0.1)
        high = s.submit((0, 2), depth=1, score=0.5)
        higher = s.submit((0, 3), depth=1, score=0.6)
        assert low.cancelled() and not high.done() and not higher.done()
        assert s.statistics().dropped == 1
        lowest = s.submit((0, 4), depth=3)
        assert lowest.cancelled()
        demand = s.submit((0, 5), depth=0)  # never dropped
        reader.allow(10)
        s.release(result(demand))
        result(high), result(higher)


def test_adjacent_prefetches_coalesce_into_one_read_but_not_into_a_demand():
    reader = GatedReader()
    with scheduler(reader, parallelism=1, locate=locate) as s:
        s.submit((0, 10), depth=1)
        reader.wait_calls(1)
        a = s.submit((0, 2), depth=1, score=0.9)
        b = s.submit((0, 3), depth=2, score=0.1)
        c = s.submit((0, 4), depth=0)
        far = s.submit((0, 20), depth=1, score=0.95)
        reader.allow(10)
        for future in (a, b, far):
            result(future)
        s.release(result(c))
        calls = reader.wait_calls(4)
        assert calls[1] == (describe((0, 4)),)
        assert calls[2] == (describe((0, 20)),)
        assert sorted(calls[3]) == [describe((0, 2)), describe((0, 3))]
        published = dict(s.poll())
        assert (published[(0, 3)] == pattern("expert (0, 3)")).all()
        assert s.statistics().coalesced_reads == 1


def whole_locate(key):
    """Each expert stored whole, in three ranges listed out of file order: expert e ends
    where expert e + 1 begins."""
    layer, expert = key
    third = EXPERT_NBYTES // 4
    base = (layer * NUM_EXPERTS + expert) * 3 * third
    return [ByteRange("experts.bin", base + 2 * third, third, 2 * third, "down"),
            ByteRange("experts.bin", base, third, 0, "gate"),
            ByteRange("experts.bin", base + third, third, third, "up")]


@pytest.mark.parametrize("where", [locate, whole_locate], ids=["stacked", "whole"])
def test_queued_neighbours_are_found_in_either_layout(where):
    reader = GatedReader()
    with scheduler(reader, parallelism=1, locate=where) as s:
        s.submit((0, 10), depth=1)
        reader.wait_calls(1)
        futures = s.submit_many([((0, 3), 1, 0.9), ((0, 7), 1, 0.8), ((0, 4), 1, 0.1), ((0, 2), 1, 0.05)])
        reader.allow(10)
        for future in futures:
            result(future)
        calls = reader.wait_calls(3)
        assert sorted(calls[1]) == [describe((0, e)) for e in (2, 3, 4)]  # 3 met 4 and 2
        assert calls[2] == (describe((0, 7)),)
        assert s.statistics().coalesced_reads == 1


@pytest.fixture()
def expert_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 2 * NUM_EXPERTS * EXPERT_NBYTES,
                                             dtype=np.uint8)
    path = str(tmp_path / "experts.bin")
    data.tofile(path)

    def real_locate(key):
        return [ByteRange(path, r.offset, r.nbytes, r.dest, r.label) for r in locate(key)]

    return real_locate, data


def expected_bytes(data, ranges):
    out = np.zeros(EXPERT_NBYTES, np.uint8)
    for r in ranges:
        out[r.dest:r.dest + r.nbytes] = data[r.offset:r.end]
    return out


class FlakyPreadv:
    def __init__(self, failures, short=False):
        self.failures = failures
        self.short = short
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, fd, bufs, offset):
        with self.lock:
            self.calls += 1
            fail = self.failures > 0
            self.failures -= fail
        if fail:
            raise OSError(errno.EIO, "Input/output error")
        if self.short:
            return os.preadv(fd, [bufs[0][:3]], offset)
        return os.preadv(fd, bufs, offset)


class GatedPreadv:
    """``os.preadv`` that records each offset and waits until the test allows it."""

    def __init__(self):
        self.cond = threading.Condition()
        self.offsets = []
        self.allowed = set()

    def __call__(self, fd, bufs, offset):
        with self.cond:
            self.offsets.append(offset)
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: offset in self.allowed, WAIT_S)
        return os.preadv(fd, bufs, offset)

    def allow(self, offset):
        with self.cond:
            self.allowed.add(offset)
            self.cond.notify_all()

    def wait(self, n):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.offsets) >= n, WAIT_S), self.offsets
            return list(self.offsets)


def settle(s):
    """Let the loop thread run what is already scheduled (a few turns of the loop)."""
    async def turns():
        for _ in range(10):
            await asyncio.sleep(0)
    asyncio.run_coroutine_threadsafe(turns(), s._loop).result(WAIT_S)


def test_pieces_of_a_demand_read_go_first_and_prefetch_pieces_wait(expert_file):
    real_locate, data = expert_file
    preadv = GatedPreadv()
    # 64-byte pieces: each expert is 4 pieces, 2 per range
    a1, a2, a3, a4 = (r.offset + d for r in real_locate((0, 0)) for d in (0, 64))
    d1, d2, d3, d4 = (r.offset + d for r in real_locate((0, 5)) for d in (0, 64))
    with FileHandles(preadv=preadv) as handles, \
            IOScheduler(real_locate, lambda k: EXPERT_NBYTES,
                        SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, parallelism=2,
                                          piece_nbytes=64, min_job_nbytes=0),
                        handles=handles) as s:
        prefetch = s.submit((0, 0), depth=1)
        assert sorted(preadv.wait(2)) == [a1, a2]
        demand = s.submit((0, 5), depth=0)
        assert preadv.wait(3)[2] == d1  # the demand lane
        preadv.allow(a1)
        assert preadv.wait(4)[3] == d2  # a freed thread takes a demand piece, not a3
        preadv.allow(a2)
        assert preadv.wait(5)[4] == d3
        preadv.allow(d1)
        assert preadv.wait(6)[5] == d4
        preadv.allow(d2)
        preadv.allow(d3)
        settle(s)
        assert len(preadv.offsets) == 6  # threads are free, but the demand is under way
        preadv.allow(d4)
        np.testing.assert_array_equal(result(demand), expected_bytes(data, real_locate((0, 5))))
        assert sorted(preadv.wait(8)[6:]) == [a3, a4]
        preadv.allow(a3)
        preadv.allow(a4)
        np.testing.assert_array_equal(result(prefetch),
                                      expected_bytes(data, real_locate((0, 0))))
        assert s.statistics().pieces == 8 and s.statistics().reads == 2


def test_cancelled_read_stops_early_and_a_new_request_reads_it_whole(expert_file):
    real_locate, data = expert_file
    preadv = GatedPreadv()
    a1, a2, a3, a4 = (r.offset + d for r in real_locate((0, 0)) for d in (0, 64))
    c1 = real_locate((0, 9))[0].offset
    with FileHandles(preadv=preadv) as handles, \
            IOScheduler(real_locate, lambda k: EXPERT_NBYTES,
                        SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, parallelism=2,
                                          piece_nbytes=64, min_job_nbytes=0),
                        handles=handles) as s:
        first = s.submit((0, 0), depth=1)
        assert sorted(preadv.wait(2)) == [a1, a2]
        later = s.submit((0, 9), depth=2)
        assert s.cancel((0, 0)) and first.cancelled()
        preadv.allow(a1)
        assert preadv.wait(3)[2] == c1  # a3 and a4 were never read
        again = s.submit((0, 0), depth=1)  # a2 still running, but the read is cut short
        assert again is not first
        preadv.allow(a2)
        preadv.wait(4)  # the reader that read a2 has finished that batch and moved on
        for offset in range(0, len(data), 64):
            preadv.allow(offset)
        np.testing.assert_array_equal(result(again), expected_bytes(data, real_locate((0, 0))))
        np.testing.assert_array_equal(result(later), expected_bytes(data, real_locate((0, 9))))
        assert preadv.offsets.count(a1) == 2 and a3 in preadv.offsets
        stats = s.statistics()
        assert stats.cancelled_nbytes == EXPERT_NBYTES and stats.reads == 3


def test_large_runs_are_cut_into_pieces_read_in_parallel(expert_file):
    real_locate, data = expert_file

    def one_range(key):
        return [ByteRange(real_locate(key)[0].path, 0, EXPERT_NBYTES, 0, "all")]

    preadv = GatedPreadv()
    with FileHandles(preadv=preadv) as handles, \
            IOScheduler(one_range, lambda k: EXPERT_NBYTES,
                        SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, parallelism=4,
                                          piece_nbytes=64, min_job_nbytes=0),
                        handles=handles) as s:
        demand = s.submit((0, 0), depth=0)
        assert sorted(preadv.wait(4)) == [0, 64, 128, 192]
        for offset in (0, 64, 128, 192):
            preadv.allow(offset)
        np.testing.assert_array_equal(result(demand), data[:EXPERT_NBYTES])


def test_real_reads_retry_short_reads_and_transient_errors(expert_file):
    real_locate, data = expert_file
    preadv = FlakyPreadv(failures=2, short=True)
    with FileHandles(preadv=preadv) as handles, \
            IOScheduler(real_locate, lambda k: EXPERT_NBYTES,
                        SchedulerSettings(buffer_nbytes=EXPERT_NBYTES,
                                          retries=3), handles=handles) as s:
        demand = s.submit((1, 5), depth=0)
        np.testing.assert_array_equal(result(demand), expected_bytes(data, real_locate((1, 5))))
        assert preadv.calls == 2 + 2 * -(-(EXPERT_NBYTES // 2) // 3)  # two failures, 3-byte reads


def test_statistics_of_real_reads(expert_file):
    real_locate, data = expert_file
    with IOScheduler(real_locate, lambda k: EXPERT_NBYTES,
                     SchedulerSettings(buffer_nbytes=EXPERT_NBYTES)) as s:
        s.release(result(s.submit((0, 1), depth=0)))
        for e in (4, 6):
            result(s.submit((0, e), depth=1))
        for _, buf in s.poll():
            s.release(buf)
        stats = s.statistics()
    assert stats.requests == {"demand": 1, "prefetch": 2} and stats.reads == 3
    assert stats.bytes_read == stats.useful_nbytes == 3 * EXPERT_NBYTES
    assert stats.gb_per_s > 0 and stats.busy_s > 0
    assert 0 < stats.read_latency_p50_s <= stats.read_latency_p99_s
    assert 0 < stats.demand_latency_p50_s and set(stats.queue_wait_p50_s) == {"demand", "prefetch"}
    assert stats.free_buffers == 16 and stats.published == 0


def test_read_error_fails_the_future_naming_file_and_expert(expert_file):
    real_locate, data = expert_file
    preadv = FlakyPreadv(failures=10**6)
    with FileHandles(preadv=preadv) as handles, \
            IOScheduler(real_locate, lambda k: EXPERT_NBYTES,
                        SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, num_buffers=2, retries=2,
                                          min_job_nbytes=0),
                        handles=handles) as s:
        demand = s.submit((1, 17), depth=0)
        error = demand.exception(timeout=WAIT_S)
        assert isinstance(error, ReadError)
        assert real_locate((1, 17))[0].path in str(error) and "expert (1, 17)" in str(error)
        # three attempts per piece; the second piece is skipped if the first failed before it began
        assert preadv.calls in (3, 2 * 3)
        prefetch = s.submit((1, 18), depth=1)
        assert isinstance(prefetch.exception(timeout=WAIT_S), ReadError)
        stats = s.statistics()
        assert stats.failed == 2 and stats.free_buffers == 2 and s.poll() == []
        preadv.failures = 0  # the device recovers: the same key reads fine
        np.testing.assert_array_equal(result(s.submit((1, 17), depth=0)),
                                      expected_bytes(data, real_locate((1, 17))))


def test_reader_exception_of_any_kind_reaches_the_future():
    reader = GatedReader(fail={describe((0, 1)): RuntimeError("boom")})
    with scheduler(reader) as s:
        future = s.submit((0, 1), depth=0)
        reader.allow()
        with pytest.raises(RuntimeError, match="boom"):
            result(future)
        ok = s.submit((0, 2), depth=0)
        reader.allow()
        s.release(result(ok))


def io_threads():
    """Every live scheduler thread: the loop and the readers."""
    return [t for t in threading.enumerate() if t.name.startswith("golem-io")]


def test_close_with_reads_blocked_cancels_and_joins_every_thread():
    reader = GatedReader()
    s = scheduler(reader, parallelism=3, yield_to_demand=False).start()
    running = [s.submit((0, e), depth=1) for e in range(2)]
    demand = s.submit((1, 1), depth=0)
    queued = s.submit((2, 2), depth=1)
    reader.wait_calls(3)
    threads = io_threads()
    assert len(threads) == 1 + 3 + 1 and set(threads) == set(s.threads)  # loop + readers
    opener = threading.Thread(
        target=lambda: (concurrent.futures.wait(running + [demand, queued]), reader.allow(10)))
    opener.start()
    s.close()
    opener.join()
    assert all(f.cancelled() for f in running + [queued])
    assert isinstance(demand.exception(timeout=0), SchedulerClosed)
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(SchedulerClosed):
        s.submit((0, 0))
    s.close()  # twice is fine


def test_keyboard_interrupt_in_the_engine_still_joins_threads():
    reader = GatedReader()
    threads = []
    with pytest.raises(KeyboardInterrupt):
        with scheduler(reader) as s:
            future = s.submit((0, 0), depth=1)
            reader.wait_calls(1)
            threads = io_threads()
            threading.Thread(target=lambda: (concurrent.futures.wait([future]),
                                             reader.allow())).start()
            raise KeyboardInterrupt
    assert threads and not any(t.is_alive() for t in threads)


def test_submit_rejects_bad_input():
    with scheduler(GatedReader(), buffer_nbytes=EXPERT_NBYTES // 2) as s:
        with pytest.raises(ValueError, match=r"expert \(0, 1\) needs 256 bytes"):
            s.submit((0, 1))
        with pytest.raises(ValueError, match="depth"):
            s.submit((0, 1), depth=-1)
    with pytest.raises(SchedulerClosed, match="not started"):
        scheduler(GatedReader()).submit((0, 0))


# -- storage emulator ---------------------------------------------------------------------

def test_throttle_shares_bandwidth_and_overlaps_latency():
    clock = FakeClock()
    throttle = Throttle(1.0, latency_s=1e-4, clock=clock.now, sleep=clock.sleep)
    first = throttle.reserve(10**6)  # 1 ms at 1 GB/s
    second = throttle.reserve(10**6)  # queued behind the first
    assert first == pytest.approx(1e-3 + 1e-4) and second == pytest.approx(2e-3 + 1e-4)
    assert throttle.wait_until(second) == pytest.approx(2.1e-3)
    assert clock.now() == pytest.approx(2.1e-3)
    clock.advance(1.0)  # idle: no debt carried over, and no burst by default
    assert throttle.acquire(5 * 10**5) == pytest.approx(6e-4)


def test_throttle_burst_and_parse():
    clock = FakeClock()
    throttle = Throttle(2.0, burst_nbytes=4 * 10**6, clock=clock.now, sleep=clock.sleep)
    clock.advance(10.0)
    assert throttle.acquire(4 * 10**6) == 0.0
    assert throttle.acquire(2 * 10**6) == pytest.approx(1e-3)
    parsed = parse_throttle("2.5,80us")
    assert parsed.gb_per_s == 2.5 and parsed.latency_s == pytest.approx(8e-5)
    assert parse_throttle("0.5GB/s, 1ms").latency_s == pytest.approx(1e-3)
    for bad in ("fast", "-1", "1,2,3", "1,soon"):
        with pytest.raises(ValueError, match="storage emulation"):
            parse_throttle(bad)


def test_scheduler_reads_through_an_injected_throttle(expert_file):
    real_locate, data = expert_file
    clock = FakeClock()
    throttle = Throttle(1e-3, latency_s=0.5, clock=clock.now, sleep=clock.sleep)  # 1 MB/s
    with IOScheduler(real_locate, lambda k: EXPERT_NBYTES,
                     SchedulerSettings(buffer_nbytes=EXPERT_NBYTES, parallelism=1),
                     throttle=throttle) as s:
        buffer = result(s.submit((0, 3), depth=1))  # one piece at a time: latencies add up
        np.testing.assert_array_equal(buffer, expected_bytes(data, real_locate((0, 3))))
    assert throttle.reads == 2 and throttle.nbytes == EXPERT_NBYTES
    assert clock.now() == pytest.approx(2 * 0.5 + EXPERT_NBYTES / 1e6)


def test_close_after_a_cancelled_prefetch_was_notified(caplog):
    """A prefetch cancelled (and its waiters notified) is cancelled again by close: no error,
    nothing logged."""
    from golem.io.scheduler import _cancel

    future = concurrent.futures.Future()
    waiter = threading.Thread(target=concurrent.futures.wait, args=([future],))
    waiter.start()
    with caplog.at_level("DEBUG", logger="concurrent.futures"):
        _cancel(future)
        _cancel(future)
    waiter.join(WAIT_S)
    assert future.cancelled() and not waiter.is_alive()
    assert caplog.records == []


def test_finished_reads_leave_nothing_for_the_cyclic_collector():
    """A read's batch and requests are freed with their last reference: were they a cycle, they
    would wait for the cyclic collector, whose full passes stall a decode for a tenth of a
    second with a model loaded."""
    reader = GatedReader()
    with scheduler(reader, locate=locate, parallelism=2) as s:
        reader.allow(1000)
        s.release(result(s.submit((0, 0))))  # warm: the scheduler's own lasting objects
        gc.collect()
        gc.disable()
        try:
            for i in range(1, 21):
                demands = s.submit_demands([(1, 2 * i), (1, 2 * i + 1)])  # one read: adjacent in the file
                s.submit((2, i), depth=1)
                s.release_all([result(f) for f in demands])
                got = []
                while not got:
                    got = s.poll(timeout=WAIT_S)
                s.release_all([buf for _, buf in got])
            assert gc.collect() == 0
        finally:
            gc.enable()
        assert s.statistics().coalesced_reads == 20


def test_a_demands_start_lag_is_its_wait_for_a_reader_to_take_it():
    """``demand_start``: from a demand's submit to a reader taking its first piece; the read
    itself counts in the demand's latency only. A demand waiting for a staging buffer starts
    when one comes back."""
    from golem.io.storage import FakeClock

    clock, reader = FakeClock(), GatedReader()
    with scheduler(reader, num_buffers=1, reserved_for_demand=0, clock=clock.now) as s:
        first = s.submit((0, 1))
        reader.wait_calls(1)  # taken at once: started at 0
        clock.advance(1.0)  # the read takes one second
        reader.allow(1)
        held = result(first)
        second = s.submit((0, 2))  # no buffer free: it waits
        clock.advance(2.0)
        s.release(held)  # the buffer comes back: the second starts now
        reader.wait_calls(2)
        reader.allow(1)
        s.release(result(second))
        stats = s.statistics()
    assert stats.demand_start_p50_s == pytest.approx(1.0)  # median of 0 and 2
    assert stats.demand_start_p99_s == pytest.approx(1.98)
    assert stats.demand_latency_p50_s == pytest.approx(1.5)  # 1 (read) and 2 (buffer wait)


def test_a_submit_wakes_one_reader_and_the_readers_wake_the_rest(monkeypatch):
    """A layer's misses cost the submitting thread one reader wake-up (a system call that can
    cost it its core), not one per miss; the readers wake each other, and every read still
    runs at once."""
    from golem.io.reader_pool import ReaderPool

    woken = []  # (on the submitting thread?, readers woken)
    wake = ReaderPool.wake

    def counted(self, jobs):
        before = self._waking
        wake(self, jobs)
        woken.append((threading.current_thread() is threading.main_thread(), self._waking - before))

    monkeypatch.setattr(ReaderPool, "wake", counted)
    reader = GatedReader()
    with scheduler(reader, num_buffers=8, parallelism=8) as s:
        keys = [(0, e) for e in range(0, 10, 2)]
        futures = s.submit_demands(keys)
        assert len(reader.wait_calls(5)) == 5  # five reads under way at once
        reader.allow(5)
        s.release_all([result(f) for f in futures])
    assert sum(n for caller, n in woken if caller) <= 1


def real_scheduler(real_locate, handles=None, **settings):
    settings.setdefault("buffer_nbytes", EXPERT_NBYTES)
    settings.setdefault("num_buffers", 8)
    return IOScheduler(real_locate, lambda key: EXPERT_NBYTES, SchedulerSettings(**settings), handles=handles)


@pytest.mark.skipif(NOWAIT is None, reason="no RWF_NOWAIT reads on this platform")
def test_demands_the_page_cache_holds_are_read_on_the_calling_thread(expert_file):
    real_locate, data = expert_file
    keys = [(0, e) for e in (5, 1, 9, 2)]
    with real_scheduler(real_locate) as s:
        futures = s.submit_demands(keys)
        assert all(f.done() for f in futures)  # no reader involved: resolved on return
        for key, future in zip(keys, futures):
            np.testing.assert_array_equal(result(future), expected_bytes(data, real_locate(key)))
            s.release(result(future))
        stats = s.statistics()
    assert stats.cached_reads == 4 and stats.reads == 0 and stats.reader_wakes == 0
    assert stats.requests == {"demand": 4} and stats.useful_nbytes == 4 * EXPERT_NBYTES
    assert stats.free_buffers == 8


@pytest.mark.skipif(NOWAIT is None, reason="no RWF_NOWAIT reads on this platform")
def test_cached_demands_taken_in_order_never_wait_on_buffers_they_hold(expert_file):
    """The first keys hold every buffer; the rest wait for one. A caller that takes results
    in order and hands each buffer back gets them all."""
    real_locate, data = expert_file
    keys = [(0, e) for e in range(7)]
    with real_scheduler(real_locate, num_buffers=3, reserved_for_demand=0) as s:
        futures = s.submit_demands(keys)
        assert [f.done() for f in futures[:3]] == [True] * 3
        for key, future in zip(keys, futures):
            np.testing.assert_array_equal(result(future), expected_bytes(data, real_locate(key)))
            s.release(result(future))
        stats = s.statistics()
    assert stats.cached_reads >= 3 and stats.cached_reads + stats.reads == 7


@pytest.mark.skipif(NOWAIT is None, reason="no RWF_NOWAIT reads on this platform")
def test_demands_the_page_cache_does_not_hold_go_to_the_readers(expert_file, monkeypatch):
    """A read that would wait for the device (``read_cached_many`` False, as on EAGAIN) hands its
    buffer back and goes to the readers, in order with the rest."""
    import golem.io.scheduler as scheduler_module

    real_locate, data = expert_file
    tried = []
    monkeypatch.setattr(scheduler_module, "read_cached_many",
                        lambda requests, *, handles: [tried.append(r[0].offset) or False for r, _ in requests])
    keys = [(0, e) for e in (3, 10, 20)]  # not adjacent in the file: three reads
    with real_scheduler(real_locate, num_buffers=2, reserved_for_demand=0) as s:
        futures = s.submit_demands(keys)
        for key, future in zip(keys, futures):
            np.testing.assert_array_equal(result(future), expected_bytes(data, real_locate(key)))
            s.release(result(future))
        stats = s.statistics()
    assert len(tried) == 2  # as many as there were buffers
    assert stats.cached_reads == 0 and stats.reads == 3 and stats.free_buffers == 2


def test_cached_reads_stay_off_through_a_replaced_preadv_an_emulated_device_or_when_set_off(expert_file):
    """Reads counted or failed through a replaced preadv, and an emulated device's timing,
    must see every demand: none is served from the page cache then."""
    real_locate, _ = expert_file
    keys = [(0, 1), (0, 2)]
    cases = [dict(handles=FileHandles(preadv=FlakyPreadv(0))),
             dict(handles=FileHandles(throttle=Throttle(100.0))),
             dict(cached_read_nbytes=0)]
    for case in cases:
        with real_scheduler(real_locate, **case) as s:
            for future in s.submit_demands(keys):
                s.release(result(future))
            assert s.statistics().cached_reads == 0
        if case.get("handles") is not None:
            case["handles"].close()
