"""The engine's contracts: it speaks to the prefetcher only through its contract (orders in,
one report out per layer), it counts its own host time, and Ctrl-C ends a run whose reads
have stalled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from golem.runtime import load
from golem.runtime.prefetch import PrefetchConfig
from helpers import greedy_tokens, prompt_tokens, stock

N = 12
INTERFACE = ("attach", "begin", "propose", "arrivals_for", "step", "report")  # the whole engine<->prefetcher contract


class InterfaceOnly:
    """Forwards the prefetcher's public interface; any other attribute is an error."""

    def __init__(self, inner):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "calls", set())

    def __getattr__(self, name):
        if name not in INTERFACE:
            raise AssertionError(f"the engine reached into the prefetcher: {name}")
        self.calls.add(name)
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        raise AssertionError(f"the engine set prefetcher state: {name}")


@pytest.fixture(scope="module")
def expected(checkpoints):
    model, tok = stock(checkpoints("olmoe"))
    tokens = prompt_tokens(tok)
    return tokens, greedy_tokens(model, tokens, N)


def test_engine_uses_only_the_prefetcher_interface(checkpoints, expected):
    tokens, want = expected
    with load(str(checkpoints("olmoe")), cache_sizes=4, prefetch=PrefetchConfig(depth=2, threshold=0.1)) as (model, _):
        engine = model.golem.engine
        inner = engine.prefetcher
        engine.prefetcher = proxy = InterfaceOnly(inner)
        assert greedy_tokens(model, tokens, N) == want
        totals = inner.totals()
    assert totals.issued > 0 and totals.useful + totals.wasted > 0
    assert set(INTERFACE) - {"attach"} <= proxy.calls


def test_host_time_is_counted_per_miss_and_per_layer(checkpoints, expected):
    tokens, want = expected
    with load(str(checkpoints("olmoe")), cache_sizes=4) as (model, _):
        engine = model.golem.engine
        assert greedy_tokens(model, tokens, N) == want
        phases = engine.stats.phases
        assert phases.engine_s() > 0 and phases.engine_s(cpu=True) == 0  # no CPU clock unless asked for
        engine.time_cpu()
        assert greedy_tokens(model, tokens, N) == want
        st = engine.stats
    assert st.decode_misses > 0 and st.decode_partial_layers == st.decode_host_syncs
    us = st.host_us()
    assert us["per_miss_us"] > 0 and us["per_layer_us"] > 0 and us["write_per_miss_us"] > 0
    assert us["cpu_per_layer_us"] > 0 and us["cpu_per_miss_us"] > 0
    # the parts never exceed the whole host time of those layers
    assert st.decode_miss_s <= st.decode_engine_s


def test_every_expert_resident_runs_no_engine_work_per_layer(checkpoints, expected):
    tokens, want = expected
    with load(str(checkpoints("olmoe"))) as (model, _):
        assert greedy_tokens(model, tokens, N) == want
        st = model.golem.engine.stats
    assert st.host_syncs == 0 and st.decode_partial_layers == 0 and st.decode_engine_s == 0.0


def _ready_for_sigint(pid: int, deadline_s: float = 30.0) -> None:
    """Until ``pid`` catches SIGINT, neither ignoring nor blocking it. MLX's CPU backend
    builds kernels through ``system()``, which ignores SIGINT in the caller while it runs: a
    Ctrl-C in that window is dropped by the OS, whatever the program does."""
    mask = 1 << (signal.SIGINT - 1)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        fields = dict(line.split(":\t") for line in open(f"/proc/{pid}/status").read().splitlines()
                      if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
        if int(fields["SigCgt"], 16) & mask and not (int(fields["SigIgn"], 16) | int(fields["SigBlk"], 16)) & mask:
            return
    pytest.fail("golem-run never became ready for SIGINT")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads signal state from /proc")
def test_a_layer_missing_more_experts_than_staging_buffers_reads_them_all(checkpoints, expected, monkeypatch):
    """Two staging buffers for up to four misses a layer: while a demand waits for a buffer,
    each one goes back as soon as its expert is written, so no read waits for ever."""
    import golem.runtime.engine as engine_module
    import golem.runtime.sizing as sizing
    from golem.io.futures import wait_result

    tokens, want = expected
    monkeypatch.setattr(sizing, "staging_buffers", lambda top_k, depth: 2)
    monkeypatch.setattr(engine_module, "wait_result", lambda future: wait_result(future, 60))  # a hang fails
    with load(str(checkpoints("olmoe")), cache_sizes=4) as (model, _):
        engine = model.golem.engine
        assert engine.scheduler.settings.num_buffers == 2
        assert greedy_tokens(model, tokens, N) == want
        assert engine.stats.decode_misses > engine.stats.decode_partial_layers * 2  # more than 2 a layer


def test_ctrl_c_ends_a_stalled_read_within_two_seconds(checkpoints):
    """SIGINT while a demand read crawls at 10 kB/s: exit 130 at once, no traceback."""
    # MLX_DISABLE_COMPILE: no kernel is built through system() (see _ready_for_sigint), so no
    # window opens after the check in which the OS drops the signal.
    env = dict(os.environ, PYTHONUNBUFFERED="1", MLX_DISABLE_COMPILE="1")
    cmd = [sys.executable, "-X", "faulthandler", "-m", "golem.runtime.cli.run", "--model", str(checkpoints("qwen3_moe")),
           "-c", "4", "-m", "32", "--emulate-storage", "1e-5", "-p", "hello there"]
    # as from a terminal: a shell that starts jobs in the background leaves SIGINT ignored
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                            preexec_fn=restore)
    try:
        for line in proc.stdout:  # mlx-lm prints this rule as generation starts
            if line.startswith("=========="):
                break
        else:
            pytest.fail(f"golem-run ended before generating: {proc.wait()} {proc.stderr.read()}")
        assert proc.poll() is None
        _ready_for_sigint(proc.pid)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # hung: have faulthandler show every thread's stack
            proc.send_signal(signal.SIGABRT)
            pytest.fail("golem-run still running 10 s after SIGINT:\n" + proc.communicate(timeout=10)[1][:3000])
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert "interrupted" in err
    assert took < 2.0, f"exit took {took:.2f} s after SIGINT"


def test_phase_clock_charges_each_stretch_to_the_phase_that_ends_it():
    from golem.runtime.phases import EXCLUDED, PHASES, PhaseClock, PhaseTimes

    wall, cpu = iter([0.0, 1.0, 3.0, 6.0, 10.0, 20.0, 21.0]), iter([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    times = PhaseTimes()
    clock = PhaseClock(times, clock=lambda: next(wall), cpu_clock=lambda: next(cpu))
    clock.lap("graph")  # off: nothing read, nothing charged
    clock.start()  # t = 0
    clock.lap("sync")  # 1
    clock.lap("pool")  # 2
    clock.lap("wait")  # 3
    clock.stop("graph")  # 4
    clock.lap("graph")  # off again
    assert (times.wall_s["sync"], times.wall_s["pool"], times.wall_s["wait"], times.wall_s["graph"]) == (1, 2, 3, 4)
    assert times.cpu_s["graph"] == 0.5 and times.layers == 1
    assert times.total_s() == 10 and times.engine_s() == 6 and set(EXCLUDED) <= set(PHASES)
    clock.start()  # t = 20
    clock.lap("ids")  # 1
    clock.discard()  # a layer that needed no host work is not counted
    assert times.layers == 1 and times.wall_s["ids"] == 1


def test_the_time_from_a_sync_to_each_moment_is_counted_once_per_layer():
    from golem.runtime.phases import PhaseClock, PhaseTimes

    now = [0.0]
    times = PhaseTimes()
    clock = PhaseClock(times, clock=lambda: now[0])
    clock.reached("launch")  # off: not a layer
    clock.start()
    now[0] = 2.0
    clock.lap("sync")
    now[0] = 2.25
    clock.reached("request")  # 0.25 s after the sync
    now[0] = 2.5
    clock.reached("launch")  # 0.5 s after it
    now[0] = 4.0
    clock.reached("launch")  # a second launch of the same layer: not counted
    clock.stop("graph")
    clock.start()
    clock.reached("launch")  # before its sync (an early launch): counted as 0
    now[0] = 9.0
    clock.lap("sync")
    now[0] = 10.0
    clock.reached("request")  # 1 s after the sync that followed the launch
    clock.stop("ids")
    clock.start()  # a layer that reached neither: not counted
    clock.stop("graph")
    assert times.layers == 3 and times.reached == {"launch": 2, "request": 2}
    assert times.after_sync_s == {"launch": 0.5, "request": 1.25}
    assert times.after_sync_us("launch") == 250_000 and times.after_sync_us("request") == 625_000
    assert PhaseTimes().after_sync_us("launch") != PhaseTimes().after_sync_us("launch")  # NaN: nothing reached


@pytest.mark.parametrize("options", [{}, {"prefetch": PrefetchConfig(depth=2, threshold=0.1, governor=False)},
                                     {"slot_writer": "device"}], ids=["depth0", "depth2", "device-writer"])
def test_launching_each_decode_layer_as_soon_as_built_gives_stock_tokens(checkpoints, expected, options):
    """``launch_first`` (on by default, on every backend): every partial decode layer is
    launched by the engine (early, or once its graph is built) and the tokens are stock's."""
    tokens, want = expected
    with load(str(checkpoints("olmoe")), cache_sizes=4, **options) as (model, _):
        engine = model.golem.engine
        assert engine.launch_first is True
        assert greedy_tokens(model, tokens, N) == want
        ph = engine.stats.phases
    assert ph.reached["launch"] == ph.layers > 0 and ph.after_sync_us("launch") >= 0


def test_fully_resident_layers_launch_before_they_issue_prefetches_for_a_partial_one(checkpoints, expected):
    """Only the last MoE layer is offloaded: the layers before it, every expert resident,
    propose for it; each is launched first, then issues its prefetches."""
    tokens, want = expected
    with load(str(checkpoints("olmoe")), cache_sizes=4) as (model, _):
        last = max(model.golem.engine.pools)
    prefetch = PrefetchConfig(depth=2, threshold=0.1, governor=False)
    with load(str(checkpoints("olmoe")), cache_sizes={last: 4}, prefetch=prefetch) as (model, _):
        engine = model.golem.engine
        assert greedy_tokens(model, tokens, N) == want
        ph, totals = engine.stats.phases, engine.prefetcher.totals()
        resident = [l for l, pool in engine.pools.items() if pool.fully_resident]
    assert len(resident) == len(engine.pools) - 1 and totals.issued > 0
    assert ph.reached["launch"] == ph.layers > engine.stats.decode_steps  # the resident layers that proposed too


@pytest.mark.parametrize("early", [None, 1.0], ids=["after-sync", "early"])
def test_other_layers_arrivals_install_after_the_demand_reads_and_before_the_issue(checkpoints, expected, early):
    """After a decode layer's sync the prefetches landed for it are installed before its
    demand reads are queued (each saves a read); those landed for other layers wait until
    the layer's demand reads are queued and its computation launched, and come before the
    new prefetches are submitted. Every prefetch is read before each layer's step here, so
    other layers' arrivals are there to install."""
    import concurrent.futures

    tokens, want = expected
    prefetch = PrefetchConfig(depth=2, threshold=0.1, governor=False)
    with load(str(checkpoints("olmoe")), cache_sizes=4, prefetch=prefetch) as (model, _):
        engine = model.golem.engine
        engine.early = early
        sched, pf, reads, log = engine.scheduler, engine.prefetcher, [], []
        submit_many, submit_demands, arrivals_for, step = sched.submit_many, sched.submit_demands, pf.arrivals_for, pf.step
        install, forward = engine._install, engine.forward

        def submitting(requests, futures=True):
            got = submit_many(requests)  # with futures, to wait on (the prefetcher asks for none)
            reads.extend(f for f, (_, depth, _) in zip(got, requests) if depth > 0)
            if requests[0][1] > 0:  # demands: through submit_demands (some read from the page cache there)
                log.append(("prefetches", engine._decoding))
            return got if futures else None

        def demanding(keys):
            log.append(("demands", engine._decoding))
            return submit_demands(keys)

        def landed_first(layer, *args):
            concurrent.futures.wait(reads)  # every prefetch read (or cancelled): no sleep
            return (arrivals_for if not args else step)(layer, *args)

        def installing(layer, protected, installs, keep):
            if installs:
                mine = {l for l, _, _ in installs} == {layer}
                log.append(("mine" if mine else "others", engine._decoding))
            return install(layer, protected, installs, keep)

        def layer(layer, glu, x, indices):
            log.append(("layer", None))
            return forward(layer, glu, x, indices)

        sched.submit_many, sched.submit_demands, pf.arrivals_for, pf.step = submitting, demanding, landed_first, landed_first
        engine._install, engine.forward = installing, layer
        assert greedy_tokens(model, tokens, N) == want
    segments, current = [], []
    for event, decoding in log:
        if event == "layer":
            segments.append(current)
            current = []
        elif decoding:
            current.append(event)
    segments.append(current)
    assert sum("others" in seg for seg in segments) > 0 and sum("mine" in seg for seg in segments) > 0
    for seg in segments:
        order = {event: i for i, event in reversed(list(enumerate(seg)))}  # first occurrence
        if "others" in order:
            assert "mine" not in seg[order["others"]:], seg
            assert order.get("demands", -1) < order["others"] < order.get("prefetches", len(seg)), seg
        if "mine" in order and "demands" in order:
            assert order["mine"] < order["demands"], seg


def test_a_decode_layers_demand_reads_are_queued_before_its_slots_are_claimed(checkpoints, expected):
    """The storage starts on a layer's misses before the pool's books: when the demand reads
    are queued, none of their experts has a slot yet."""
    tokens, want = expected
    with load(str(checkpoints("olmoe")), cache_sizes=4) as (model, _):
        engine = model.golem.engine
        sched, submits = engine.scheduler, []
        submit_demands = sched.submit_demands

        def submitting(keys):
            if engine._decoding:
                submits.append([engine.pools[l].is_resident(e) for l, e in keys])
            return submit_demands(keys)

        sched.submit_demands = submitting
        assert greedy_tokens(model, tokens, N) == want
        ph = engine.stats.phases
    assert submits and not any(any(resident) for resident in submits)
    assert ph.reached["request"] == len(submits) and ph.after_sync_us("request") >= 0


def test_a_failure_after_the_demand_reads_are_queued_hands_their_buffers_back(checkpoints, expected):
    """The pool's books fail once a decode layer's demand reads are queued: the error reaches
    the caller, every staging buffer comes back as the reads land, and the next run is exact."""
    import threading

    from golem.runtime.slots import SlotPool

    tokens, want = expected
    with load(str(checkpoints("olmoe")), cache_sizes=4) as (model, _):
        engine = model.golem.engine
        sched, futures = engine.scheduler, []
        submit_demands, admit = sched.submit_demands, SlotPool.admit
        free = sched.statistics().free_buffers

        def submitting(keys):
            out = submit_demands(keys)
            if engine._decoding:
                futures.extend(out)
            return out

        def failing(pool, needed):
            if futures:
                raise RuntimeError("books failed")
            return admit(pool, needed)

        sched.submit_demands = submitting
        SlotPool.admit = failing
        try:
            with pytest.raises(RuntimeError, match="books failed"):
                greedy_tokens(model, tokens, N)
        finally:
            SlotPool.admit = admit
            sched.submit_demands = submit_demands
        landed = [threading.Event() for _ in futures]
        for future, event in zip(futures, landed):  # runs after the engine's own callback
            future.add_done_callback(lambda _, event=event: event.set())
        assert futures and all(event.wait(10) for event in landed)
        assert sched.statistics().free_buffers == free
        assert greedy_tokens(model, tokens, N) == want


def test_phases_add_up_to_the_layer_calls_timed_from_outside(checkpoints, expected):
    from golem.runtime.phases import PHASES

    tokens, want = expected
    with load(str(checkpoints("olmoe")), cache_sizes=4, prefetch=PrefetchConfig(depth=2, threshold=0.1, governor=False)) as (model, _):
        engine = model.golem.engine
        inner, outside = engine.forward, []

        def forward(layer, glu, x, indices):
            before = engine.stats.phases.layers
            t0 = time.perf_counter()
            y = inner(layer, glu, x, indices)
            if engine.stats.phases.layers != before:
                outside.append(time.perf_counter() - t0)
            return y

        engine.forward = forward
        assert greedy_tokens(model, tokens, N) == want
        st = engine.stats
    ph = st.phases
    assert ph.layers == len(outside) == st.decode_host_syncs > 0
    assert all(ph.wall_s[k] >= 0 and ph.cpu_s[k] >= 0 for k in PHASES)
    assert all(ph.wall_s[k] > 0 for k in ("predict", "sync", "ids", "pool", "issue", "request", "graph", "wait", "write"))
    assert ph.total_s() <= sum(outside) <= ph.total_s() * 1.1 + 1e-3 * len(outside)
    assert st.decode_engine_s == ph.total_s() - ph.wall_s["sync"] - ph.wall_s["wait"] - ph.wall_s["write"]


@pytest.mark.parametrize("options", [{}, {"slot_writer": "device"}, {"record": True},
                                     {"prefetch": PrefetchConfig(depth=2, threshold=0.1, governor=False)}],
                         ids=["host-writer", "device-writer", "recording", "prefetch"])
def test_layers_launched_before_their_sync_give_stock_tokens(checkpoints, expected, options):
    """Every decode layer launched early (``early=1.0``): the experts missing at the launch,
    whether read on demand or installed from a prefetch meanwhile, are computed again; with
    an in-place writer and with one that replaces whole pool arrays, and with the routing
    recorded (its weights are synced with the ids)."""
    tokens, want = expected
    with load(str(checkpoints("olmoe")), cache_sizes=4, **options) as (model, _):
        engine = model.golem.engine
        engine.early = 1.0
        assert greedy_tokens(model, tokens, N) == want
        st = engine.stats
        if options.get("record"):
            assert engine.trace.num_steps == st.tokens  # every token, prefill and decode
    assert st.early_layers == st.decode_partial_layers > 0
    assert st.decode_misses > 0 and st.early_redone >= st.decode_misses


def test_prefetches_landed_for_a_layer_are_installed_before_its_launch(checkpoints, expected):
    """Every prefetch read before each layer's launch: an early launch then computes again
    only the experts read on demand, since those prefetched for it were installed first."""
    import concurrent.futures

    tokens, want = expected
    prefetch = PrefetchConfig(depth=2, threshold=0.1, governor=False)
    with load(str(checkpoints("olmoe")), cache_sizes=4, prefetch=prefetch) as (model, _):
        engine = model.golem.engine
        engine.early = 1.0
        sched, pf, reads = engine.scheduler, engine.prefetcher, []
        submit_many, arrivals_for = sched.submit_many, pf.arrivals_for

        def submitting(requests, futures=True):
            got = submit_many(requests)  # with futures, to wait on (the prefetcher asks for none)
            reads.extend(f for f, (_, depth, _) in zip(got, requests) if depth > 0)
            return got if futures else None

        def landed_first(layer):
            concurrent.futures.wait(reads)  # every prefetch read (or cancelled): no sleep
            return arrivals_for(layer)

        sched.submit_many, pf.arrivals_for = submitting, landed_first
        assert greedy_tokens(model, tokens, N) == want
        st, totals = engine.stats, pf.totals()
    assert st.early_layers == st.decode_partial_layers > 0 and totals.useful > 0
    assert st.early_redone == st.decode_misses > 0


def test_early_launch_follows_the_share_of_experts_missing(checkpoints, expected):
    """Off when most routed experts miss (each would be computed twice); on for a layer
    whose experts are all resident, which then computes nothing again."""
    tokens, want = expected
    with load(str(checkpoints("olmoe")), cache_sizes=4) as (model, _):
        engine = model.golem.engine
        assert greedy_tokens(model, tokens, N) == want
        st = engine.stats
        assert st.early_layers < st.decode_partial_layers / 2
    with load(str(checkpoints("olmoe"))) as (model, _):
        engine = model.golem.engine
        for pool in engine.pools.values():
            pool.use_table()
        assert greedy_tokens(model, tokens, N) == want
        st = engine.stats
    assert st.early_layers == st.decode_partial_layers > 0 and st.early_redone == 0 and st.decode_misses == 0


def test_the_device_table_is_made_again_only_after_a_mapping_changes(checkpoints):
    import numpy as np

    with load(str(checkpoints("olmoe")), cache_sizes=4) as (model, _):
        pool = next(iter(model.golem.engine.pools.values()))
        for e in range(4):
            pool.assign(e, pool.claim(e)[0])
        table, snapshot = pool.device_table()
        assert pool.device_table()[0] is table  # nothing changed: no upload
        assert np.array_equal(np.array(table), np.maximum(snapshot, 0))
        assert np.array_equal(snapshot, pool.slot_of) and sorted(snapshot[:4]) == [0, 1, 2, 3]
        assert (snapshot[4:] == -1).all()
        slot, victim = pool.claim(9)
        pool.assign(9, slot)
        table2, snapshot2 = pool.device_table()
        assert table2 is not table and snapshot2[9] == slot and snapshot2[victim] == -1
        assert snapshot[9] == -1 and snapshot[victim] == slot  # a copy: a launch keeps what it saw
