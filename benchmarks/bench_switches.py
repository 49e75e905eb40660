"""Does a switch of the decode path pay? bench_decode's rows with it off and on, alternating.

Switches:
- ``early-stop``: the prefetch governor ends a window after two tokens when its cost is
  already over twice what it saved (``Governor(clear_loss=2.0)``), against full windows.
- ``early-launch``: the engine launches a decode layer's experts before its host sync,
  through the pool's device table, while the layer's recent steps found nearly all their
  experts resident (``Engine(early=0.25)``), against launching them only after the sync
  (``early=None``).
- ``caller-activation``: the I/O scheduler activates requests on the caller's thread after a
  prefetch submit, cancel or release, against a wake-up of its event loop
  (``SchedulerSettings.activate_on_loop``).
- ``requests-at-once``: the I/O scheduler starts a read for a key it holds no request for at
  once when nothing queued outranks it and the rules allow (``Dispatcher.fresh``), never
  queueing it, against queueing it like any request and taking it from the queue (the
  earlier shape).
- ``install-before-launch``: before a decode layer's launch, the engine installs the
  prefetches that have landed for it (``Engine._arrive``), so that an early launch finds them
  resident, against installing every arrival after the layer's sync (the earlier shape).
- ``prefetch-after-launch``: after a decode layer's sync the engine installs only the
  prefetches landed for that layer, and leaves scoring the layer's guesses, installing the
  other layers' arrivals and issuing new reads until its demand reads are queued and its
  computation launched (``Engine._deferred``), against all of that before the layer's own
  work (the earlier shape).
- ``reads-before-books``: a decode layer queues the demand reads of its experts not resident
  before the pool's books claim their slots (``Engine._admit(request=True)``), against
  queueing them once the books are kept (the earlier shape).
- ``overlap``: a decode layer with misses computes its resident experts while the misses
  load, then the missing ones (two expert graphs and a reorder: ``Engine(overlap=True)``),
  against one graph over all of them once the reads have landed.
- ``overlap-share``: a decode layer with misses computes its resident experts while the
  misses load only when at least half its routed experts are resident
  (``Engine(overlap_share=0.5)``), against whenever one is (the earlier shape, ``0.0``).
- ``overlap-size``: on the CPU backend, a decode layer with misses computes its resident
  experts apart only when they hold at least ``OVERLAP_MIN_NBYTES`` (256 KiB)
  (``Engine(overlap_min_nbytes=)``), against whatever their size (the earlier shape, 0).
- ``launch-first``: the engine starts each decode layer's finished expert graph at once
  (``Engine(launch_first=True)``: ``mx.async_eval``), before the prefetcher's issue and the
  model's next steps are built, against leaving it for the next layer's sync to start.
- ``held-copies``: the host slot writer copies an expert into its slot with memoryview copies,
  which keep the interpreter lock (``golem.runtime.writers.copy_bytes``), against numpy slice
  assignments, which let it go for each of the expert's tensors (the earlier shape).
- ``held-lock-ranking``: the router lookahead ranks each target row with Python's sort and
  keeps its calibration with scalar updates (``predictors/lookahead.py``), against numpy's
  sorts, fancy indexing and fills, which let the interpreter lock go (the earlier shape).
- ``packed-experts``: experts read from the checkpoint's packed copy (``golem-pack``, made
  first when missing), one ``preadv`` each, against its stacked tensors, nine apart in the
  file (``open_packed`` finding nothing: the earlier shape). Set when a model loads.
- ``stall-avoided``: the prefetch governor credits a window with the stall it avoided (the
  step's demand reads and used prefetches at the stall per read measured with prefetch off,
  less the step's stall: a prefetch still in flight when needed counts for the part of its
  read it had done), against crediting only the prefetches that landed in time, at the
  stall per read averaged over every token (the earlier shape).
- ``one-wake``: a submit (or a release that lets a read start) wakes one reader thread, and
  each reader that takes a job wakes those the jobs still waiting need
  (``ReaderPool.wake_first``), against the submitting thread waking one reader per job (the
  earlier shape).
- ``device-ranks``: the router lookahead's proposals carry each target row's ranks, sorted
  on the device in the layer's host sync (``predictors.lookahead.device_ranks``), so the
  engine's thread only looks them up, against ranking each row with Python's sort on the
  engine's thread (the earlier shape).
- ``read-waste``: the prefetch governor is charged only for wasted prefetches that were read
  (cancelled while being read, evicted unused, or landed with no slot), against every one
  dropped, a read cancelled while still queued too (the earlier shape).
- ``timed-governor``: the prefetch governor judges a depth by the decode steps' time against
  that of steps decoded off a few tokens before, and starts at depth 1
  (``Governor(reference_tokens=4, start_depth=1)``), against judging it by its model of the
  stall avoided and the host time spent, starting at the deepest (the earlier shape:
  ``reference_tokens=0, start_depth=None``). Interleaved, each decode starts with a new
  governor.
- ``poll-when-out``: the prefetcher polls the scheduler for arrivals only while a prefetch is
  out (``Prefetcher.arrivals``), against a poll at every decode layer (the earlier shape).

Same checkpoint, prompts, cache and calibrated emulated storage as bench_decode; the two
settings alternate, ``--runs`` times, each run one load per row; every row's tokens must
equal depth 0's. ``--interleave`` (every switch but ``early-stop``, ``caller-activation`` and ``packed-experts``,
which are set when a model loads): one load per row, the two settings alternating between its decodes of all the prompts,
``--runs`` pairs, so that the slow drifts of a shared machine fall on both alike; it adds
the median of the pairs' ratios (on / off). Prints tok/s (and engine wall us per partial layer) per row and setting
(medians), each row over the same setting's depth 0 (rows without reads: over the full cache), then one JSON line.

    python benchmarks/bench_switches.py --switch early-launch|early-stop|caller-activation [--shape qwen3-30b-a3b-host] [--runs 3] [--rows depth2,default]
    python benchmarks/bench_switches.py --switch early-launch --interleave --runs 12 [--rows warm_resident,depth0]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_decode  # noqa: E402
from golem.runtime.engine import OVERLAP_MIN_NBYTES, OVERLAP_SHARE  # noqa: E402

ROWS = {
    "early-stop": ("disk_depth0", "disk_governed2", "disk_default", "depth0", "depth2", "governed2", "default"),
    "early-launch": ("full_cache", "warm_resident", "disk_depth0", "disk_depth2", "depth0", "depth2", "oracle"),
    "caller-activation": ("disk_depth0", "disk_depth2", "disk_default", "depth0", "depth2", "oracle", "default"),
    "requests-at-once": ("disk_depth0", "disk_depth2", "depth0", "depth2"),
    "install-before-launch": ("disk_depth0", "disk_depth2", "disk_default", "depth0", "depth2"),
    "prefetch-after-launch": ("disk_depth2", "disk_default", "depth2", "default"),
    "reads-before-books": ("disk_depth0", "disk_depth2", "depth0", "depth2"),
    "overlap": ("disk_depth0", "disk_depth2", "depth0", "depth2"),
    "overlap-share": ("disk_depth0", "disk_depth2", "depth0", "depth2", "default"),
    "overlap-size": ("disk_depth0", "disk_depth2", "depth0", "depth2", "default"),
    "launch-first": ("warm_resident", "disk_depth0", "disk_depth2", "depth0", "depth2"),
    "held-copies": ("disk_depth0", "disk_depth2", "depth0", "depth2"),
    "held-lock-ranking": ("disk_depth2", "depth2"),
    "poll-when-out": ("disk_depth0", "disk_default", "default"),
    "packed-experts": ("disk_depth0", "disk_depth2", "disk_default", "depth0", "depth2", "default"),
    "one-wake": ("disk_depth0", "disk_depth2", "depth0", "depth2"),
    "device-ranks": ("disk_depth2", "disk_default", "depth2", "default"),
    "read-waste": ("disk_depth0", "disk_governed2", "disk_default", "depth0", "governed2", "default"),
    "stall-avoided": ("disk_depth0", "disk_governed2", "disk_default", "depth0", "depth1", "governed2", "default"),
    "timed-governor": ("disk_depth0", "disk_governed2", "disk_default", "depth0", "depth1", "depth2", "governed2",
                       "default"),
}
INTERLEAVED = ("early-launch", "requests-at-once", "install-before-launch", "prefetch-after-launch",
               "reads-before-books", "overlap", "launch-first", "held-copies",
               "held-lock-ranking", "poll-when-out", "stall-avoided", "one-wake", "device-ranks",
               "overlap-share", "overlap-size", "read-waste", "timed-governor")  # a loaded engine can flip these
EARLIER_GOVERNOR = {"reference_tokens": 0, "start_depth": None}  # timed-governor, off


def _prefetch_before_launch():
    """The earlier shape of ``prefetch-after-launch``: the layer's guesses scored in
    ``Prefetcher.step``, every arrival installed right after the sync, only the issue left
    for later."""
    from golem.runtime.engine import Engine
    from golem.runtime.prefetch import PrefetchOrders, Prefetcher

    step = Prefetcher.step

    def prefetcher_step(self, layer, ids, scores, proposals, decoding):
        orders = step(self, layer, ids, scores, proposals, decoding)
        if not decoding:
            return orders
        self.observe(layer, ids, scores)
        return PrefetchOrders(orders.installs, orders.keep,
                              lambda resident: self.issue(layer, ids, proposals, resident))

    def engine_deferred(self, layer, ids, orders):
        installs, self._later = self._later + orders.installs, []
        self._install(layer, set(ids.reshape(-1).tolist()), installs, orders.keep)
        if orders.issue is None:
            return None

        def issue():
            orders.issue(self._resident)
            self._phase.lap("issue")
        return issue

    return [(Prefetcher, "step", prefetcher_step), (Engine, "_deferred", engine_deferred)]


def _earlier_shape(name: str):
    """``[(class, method, stand-in), ...]``: what a switch's off setting puts back, or None."""
    from golem.runtime.engine import Engine
    from golem.runtime.writers import HostViewWriter

    if name == "requests-at-once":
        from golem.io.dispatcher import Dispatcher

        return [(Dispatcher, "fresh", lambda self, key, depth, score, prepared, future=True: None)]  # every request queued
    if name == "install-before-launch":
        return [(Engine, "_arrive", lambda self, pool: None)]  # arrivals wait for the sync
    if name == "prefetch-after-launch":
        return _prefetch_before_launch()
    if name == "reads-before-books":
        admit = Engine._admit
        return [(Engine, "_admit", lambda self, pool, needed, request=False: admit(self, pool, needed))]
    if name == "held-copies":
        return [(HostViewWriter, "put", _numpy_put)]
    if name == "packed-experts":
        import golem.io.packed_experts as packed_experts

        return [(packed_experts, "open_packed", lambda index, folder=None: None)]  # no pack found
    if name == "one-wake":
        from golem.io.reader_pool import ReaderPool

        return [(ReaderPool, "wake_first", ReaderPool.wake)]  # a reader per job, from the caller
    if name == "stall-avoided":
        from golem.runtime.governor import Governor

        return [(Governor, "step", _useful_only_step)]
    if name == "poll-when-out":
        from golem.runtime.prefetch import Prefetcher

        return [(Prefetcher, "arrivals", lambda self: [(k[0], k[1], buf) for k, buf in self.scheduler.poll(0)])]
    if name == "read-waste":
        from golem.runtime.prefetch import Prefetcher

        return [(Prefetcher, "dropped", _every_drop_charged(Prefetcher.dropped))]
    if name == "device-ranks":
        from golem.predictors.lookahead import _RankCalibrated

        return [(_RankCalibrated, "propose", _raw_rows_only(_RankCalibrated.propose))]
    if name == "held-lock-ranking":
        from golem.predictors.lookahead import _RankCalibrated

        return [(_RankCalibrated, "scores", _numpy_scores), (_RankCalibrated, "observe", _numpy_observe),
                (_RankCalibrated, "begin_step", _numpy_begin_step)]
    return None


def _every_drop_charged(dropped):
    """The earlier ``Prefetcher.dropped``: the governor charged for a read cancelled while queued too."""
    def every_drop(self, layer, expert, nbytes):
        dropped(self, layer, expert, nbytes)
        self._wasted += nbytes == 0
    return every_drop


def _raw_rows_only(propose):
    """The earlier ``_RankCalibrated.propose``: the raw rows only, ranked on the host by ``scores``."""
    def raw_rows_only(self, position, depth, hidden=None, *, nearest=1):
        proposal = propose(self, position, depth, hidden, nearest=nearest)
        return dataclasses.replace(proposal, arrays=proposal.arrays[:1])
    return raw_rows_only


def _numpy_scores(self, proposal):
    """The earlier ``_RankCalibrated.scores``: ranks by two numpy argsorts, one fancy index per row."""
    import numpy as np

    if not proposal.arrays:
        return self.zeros(proposal.targets)
    raw = self.raw_scores(proposal)
    rank = np.argsort(np.argsort(-raw, axis=1, kind="stable"), axis=1)
    made = (~np.isnan(raw).all(axis=1)).tolist()
    out = np.zeros(raw.shape, np.float32)
    for r, (t, d) in enumerate(zip(proposal.targets, proposal.offsets)):
        if made[r]:
            d = min(d, self.max_depth)
            out[r] = self.hits[t, d][rank[r]] / self.seen[t, d]
            if self.online:
                self._pending[t, d] = rank[r]
    return out


def _numpy_observe(self, position, experts, weights=None):
    """The earlier ``_RankCalibrated.observe``: numpy fancy-index updates and a fill."""
    import numpy as np
    from golem.predictors.base import ranked_ids

    pending = self._pending[position]
    made = np.flatnonzero(pending[:, 0] >= 0)
    if not len(made):
        return
    ids = ranked_ids(experts)
    self.seen[position, made] += 1.0
    self.hits[position, made[:, None], pending[made][:, ids]] += 1.0
    pending.fill(-1)


def _numpy_begin_step(self):
    """The earlier ``_RankCalibrated.begin_step``: every pending rank reset (a fill)."""
    from golem.predictors.base import Predictor

    Predictor.begin_step(self)
    self._pending.fill(-1)


def _useful_only_step(self, outcome, useful, wasted):
    """The earlier ``Governor.step``: a window saved only its prefetches that landed in time,
    each at the stall per read averaged over every token."""
    self._measure(outcome)
    if self.depth == 0:
        return self._off_step()
    stall = self.stall_per_miss_s or 0.0
    return self._account(useful * stall, outcome.prefetch_host_s + wasted * self.waste_weight * stall)


def _numpy_put(self, slot, packed):
    """The earlier ``HostViewWriter.put``: a numpy slice assignment per pool array (numpy lets
    the interpreter lock go while it copies more than a few hundred bytes)."""
    import numpy as np

    views = self.__dict__.get("_numpy_views")
    if views is None:
        views = self._numpy_views = [(np.frombuffer(pool, np.uint8).reshape(-1, n), begin, end)
                                     for pool, n, begin, end in self._cuts]
    for view, begin, end in views:
        view[slot] = packed[begin:end]


@contextlib.contextmanager
def method_switch(name: str, on: bool):
    """Off: the switch's methods replaced by the earlier shape (nothing, for other switches)."""
    patches = None if on else _earlier_shape(name)
    if patches is None:
        yield
        return
    originals = [(cls, method, getattr(cls, method)) for cls, method, _ in patches]
    for cls, method, stand_in in patches:
        setattr(cls, method, stand_in)
    try:
        yield
    finally:
        for cls, method, original in originals:
            setattr(cls, method, original)


@contextlib.contextmanager
def patched(cls, **defaults):
    """Instances of ``cls`` made inside the block take ``defaults`` for keywords not given."""
    original = cls.__init__

    def init(self, *args, **kwargs):
        for k, v in defaults.items():
            kwargs.setdefault(k, v)
        original(self, *args, **kwargs)

    cls.__init__ = init
    try:
        yield
    finally:
        cls.__init__ = original


@contextlib.contextmanager
def switch(name: str, on: bool, share: float):
    from golem.io.scheduler import IOScheduler
    from golem.runtime.engine import Engine
    from golem.runtime.governor import Governor

    if name == "early-launch":
        with patched(Engine, early=share if on else None):
            yield
        return
    if name in ("launch-first", "overlap"):
        with patched(Engine, **{name.replace("-", "_"): on}):
            yield
        return
    if name == "overlap-share":
        with patched(Engine, overlap_share=OVERLAP_SHARE if on else 0.0):
            yield
        return
    if name == "overlap-size":
        with patched(Engine, overlap_min_nbytes=OVERLAP_MIN_NBYTES if on else 0):
            yield
        return
    if name == "early-stop":
        with patched(Governor, clear_loss=2.0 if on else None):
            yield
        return
    if name == "timed-governor":
        with patched(Governor, **({} if on else EARLIER_GOVERNOR)):
            yield
        return
    if _earlier_shape(name) is not None:
        with method_switch(name, on):
            yield
        return
    original = IOScheduler.__init__

    def init(self, locate, nbytes_of, settings, **kwargs):
        original(self, locate, nbytes_of, dataclasses.replace(settings, activate_on_loop=not on), **kwargs)

    IOScheduler.__init__ = init
    try:
        yield
    finally:
        IOScheduler.__init__ = original


def _base(row: str) -> str:
    """The row a row's ratio is taken against: depth 0 on the same storage; every expert
    resident for the rows without reads."""
    if row in ("full_cache", "warm_resident"):
        return "full_cache"
    return "disk_depth0" if row.startswith("disk") else "depth0"


def main() -> None:
    from golem.runtime.engine import EARLY_ABSENT
    from golem.runtime.synthetic import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switch", required=True, choices=tuple(ROWS))
    ap.add_argument("--shape", default="qwen3-30b-a3b-host", choices=tuple(bench_decode.SHAPES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rows", default=None, help="bench_decode rows, comma-separated (default: the switch's; "
                    "each storage's depth 0 row is added)")
    ap.add_argument("--dir", type=Path, default=default_cache_dir())
    ap.add_argument("--packed", action="store_true",
                    help="read experts from the checkpoint's packed copy (golem-pack) in both settings")
    ap.add_argument("--interleave", action="store_true",
                    help=f"{' and '.join(INTERLEAVED)} only: alternate the setting within one load per row")
    ap.add_argument("--early", type=float, default=None,
                    help="early-launch: the share of missing experts up to which a layer is launched early "
                         "when on (default: the engine's, 0.25; 1.0: every decode layer)")
    args = ap.parse_args()
    if args.interleave and args.switch not in INTERLEAVED:
        ap.error(f"--interleave works with --switch {' or '.join(INTERLEAVED)} only (what a loaded engine can change)")
    if args.early is not None and (args.switch != "early-launch" or not 0.0 <= args.early <= 1.0):
        ap.error("--early takes a share from 0 to 1, with --switch early-launch")
    names = ROWS[args.switch] if args.rows is None else [n.strip() for n in args.rows.split(",") if n.strip()]
    if args.interleave:  # the oracle rows' truth holds one pass of the prompts
        names = [n for n in names if n not in ("oracle", "noisy_oracle")] if args.rows is None else names
        if {"oracle", "noisy_oracle"} & set(names):
            ap.error("--interleave decodes the prompts many times in one load; the oracle rows' truth holds "
                     "them once: leave oracle and noisy_oracle out")
    share = args.early if args.early is not None else EARLY_ABSENT  # early-launch, when on

    setup = bench_decode.Setup(args.shape, args.dir, args.tokens, packed=args.packed or args.switch == "packed-experts")
    full, _ = setup.run("full_cache", setup.rows(["full_cache"])["full_cache"], 1)
    setup.calibrate(1.0 / full["tps"])
    for base in ("disk_depth0", "depth0", "full_cache"):  # the rows each ratio is taken against
        if base not in names and any(_base(n) == base for n in names):
            names = [base, *names]
    rows = setup.rows(names)
    if args.interleave:
        return interleaved(setup, rows, args, share)
    seen = {on: {row: [] for row in names} for on in (False, True)}
    identical = True
    for _ in range(args.runs):
        for on in (False, True):
            with switch(args.switch, on, share):
                for row in names:
                    r, outs = setup.run(row, rows[row], 1)
                    seen[on][row].append((r["tps"], r.get("us_per_layer", float("nan"))))
                    identical = identical and outs == setup.truth_outputs
    med = {on: {row: [statistics.median(v[i] for v in runs) for i in (0, 1)] for row, runs in by_row.items()}
           for on, by_row in seen.items()}

    print(f"{setup.path.name}: switch {args.switch}, {len(setup.prompts)} prompts x {args.tokens} tokens, median "
          f"of {args.runs} alternating runs; tok/s (x the same setting's depth 0 on the same storage), us/layer")
    print(f"{'row':<16}{'off':>32}{'on':>32}")
    out = {"switch": args.switch, "shape": args.shape, "runs": args.runs, "identical": identical}
    for row in names:
        base = _base(row)
        cells = ""
        for on in (False, True):
            tps, us = med[on][row]
            ratio = tps / med[on][base][0]
            cells += f"{tps:>12.2f} ({ratio:.2f}x) {us:>9.0f} us"
            key = "on" if on else "off"
            out[f"{key}_{row}_tps"], out[f"{key}_{row}_x_depth0"], out[f"{key}_{row}_us_per_layer"] = tps, ratio, us
        print(f"{row:<16}" + cells)
    print("(full_cache and warm_resident: x full_cache; disk_*: x disk_depth0; the rest: x depth0)")
    print(f"identical tokens in every row: {identical}")
    print(json.dumps(out))


def _shares(counts: dict) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{d}: {counts[d] / total:.0%}" for d in sorted(counts))


def _fresh_governor(engine, on: bool) -> None:
    """timed-governor, interleaved: each decode starts with a new governor of the setting's
    kind (what it learnt in the other setting's decode is not carried over)."""
    from golem.runtime.governor import Governor

    pf = engine.prefetcher
    if pf is not None and pf.governor is not None:
        pf.governor = Governor(pf.config.depth, **({} if on else EARLIER_GOVERNOR))
        pf.depth = pf.governor.depth


def _host(engine) -> list:
    """The engine's running totals: host CPU s, demand-read CPU s, partial layers, misses,
    layers launched early, experts computed again, layers launched and their wall s from the
    sync, the same for the first demand read, host wall s, slot-write wall s."""
    st = engine.stats
    return [st.phases.engine_s(cpu=True), st.phases.cpu_s["request"], st.phases.layers, st.decode_misses,
            st.early_layers, st.early_redone, st.phases.reached["launch"], st.phases.after_sync_s["launch"],
            st.phases.reached["request"], st.phases.after_sync_s["request"], st.phases.engine_s(),
            st.phases.wall_s["write"]]


def _per_setting(host: list) -> dict:
    """Per partial layer and per miss, from ``_host`` differences summed over a setting's decodes."""
    cpu_s, request_s, layers, misses, early, redone, launched, to_launch_s, requested, to_request_s, wall_s, \
        write_s = host
    per = lambda v, n: v / n if n else float("nan")
    return {"cpu_us_per_layer": per(1e6 * cpu_s, layers), "cpu_us_per_miss": per(1e6 * request_s, misses),
            "us_per_layer": per(1e6 * wall_s, layers), "write_us_per_layer": per(1e6 * write_s, layers),
            "early_share": per(early, layers), "redone_per_layer": per(redone, layers),
            "to_launch_us": per(1e6 * to_launch_s, launched), "to_request_us": per(1e6 * to_request_s, requested)}


def interleaved(setup, rows: dict, args, share: float) -> None:
    """The switch off and on within one load per row, alternating (ABBA) ``--runs`` pairs."""
    from golem.runtime import load

    print(f"{setup.path.name}: switch {args.switch} (share {share}), interleaved in one load per row, {len(setup.prompts)} prompts x "
          f"{args.tokens} tokens per decode, {args.runs} pairs; tok/s medians, paired on/off ratio; the rest off / on")
    print(f"{'row':<16}{'off':>8}{'on':>8}{'on/off':>8}{'early':>12}{'redone':>12}{'us/layer':>14}{'cpu us/layer':>14}"
          f"{'cpu us/miss':>12}{'write us':>14}{'to launch us':>14}{'to request us':>15}")
    out = {"switch": args.switch, "shape": args.shape, "runs": args.runs, "interleaved": True, "early": share}
    identical = True
    for row, options in rows.items():
        options = setup.load_options(options)
        table = options.pop("table", False)
        tps, host = {False: [], True: []}, {False: [0] * 12, True: [0] * 12}
        steps_at = {False: {}, True: {}}  # timed-governor: decode steps at each depth, per setting
        with load(str(setup.path), **options) as (model, _):
            engine = bench_decode.engine_of(model, table, cpu_time=True)
            bench_decode.decode(model, setup.prompts[:1], 4)  # warm-up
            for i in range(args.runs):
                for on in ((False, True) if i % 2 == 0 else (True, False)):
                    if args.switch == "early-launch":
                        engine.early = share if on else None
                    if args.switch in ("launch-first", "overlap"):
                        setattr(engine, args.switch.replace("-", "_"), on)
                    if args.switch == "overlap-share":
                        engine.overlap_share = OVERLAP_SHARE if on else 0.0
                    if args.switch == "overlap-size":
                        engine.overlap_min_nbytes = OVERLAP_MIN_NBYTES if on else 0
                    if args.switch == "timed-governor":
                        _fresh_governor(engine, on)
                    before = _host(engine)
                    with method_switch(args.switch, on):
                        s, n, outs = bench_decode.decode(model, setup.prompts, args.tokens)
                    host[on] = [a + b - c for a, b, c in zip(host[on], _host(engine), before)]
                    tps[on].append(n / s)
                    identical = identical and outs == setup.truth_outputs
                    governor = engine.prefetcher.governor if engine.prefetcher is not None else None
                    if args.switch == "timed-governor" and governor is not None:
                        for d, k in governor.stats.tokens_at.items():
                            steps_at[on][d] = steps_at[on].get(d, 0) + k
        ratio = statistics.median(b / a for a, b in zip(tps[False], tps[True]))
        off, on = statistics.median(tps[False]), statistics.median(tps[True])
        f = {k: _per_setting(h) for k, h in host.items()}
        pair = lambda key, fmt: f"{format(f[False][key], fmt)} / {format(f[True][key], fmt)}"
        print(f"{row:<16}{off:>8.2f}{on:>8.2f}{ratio:>7.3f}x{pair('early_share', '.0%'):>12}"
              f"{pair('redone_per_layer', '.2f'):>12}{pair('us_per_layer', '.0f'):>14}{pair('cpu_us_per_layer', '.0f'):>14}"
              f"{pair('cpu_us_per_miss', '.0f'):>12}{pair('write_us_per_layer', '.0f'):>14}"
              f"{pair('to_launch_us', '.0f'):>14}{pair('to_request_us', '.0f'):>15}")
        out.update({f"off_{row}_tps": off, f"on_{row}_tps": on, f"{row}_on_over_off": ratio})
        if steps_at[True]:
            print(f"{'':<16}decode steps at each depth, off: {_shares(steps_at[False])}; on: {_shares(steps_at[True])}")
            out.update({f"{k}_{row}_steps_at": v for k, v in (("off", steps_at[False]), ("on", steps_at[True]))})
        out.update({f"{k}_{row}_{name}": v for k, on_ in (("off", False), ("on", True)) for name, v in f[on_].items()})
    out["identical"] = identical
    print("early: share of the row's partial layers launched before their sync; redone: experts computed again per "
          "partial layer; us/layer, cpu us: the engine thread's host time per partial layer, wall and CPU (sync, read "
          "waits and writes left out), and its demand-read CPU time per miss (phase 'request'), over all the "
          "setting's decodes; write us: wall us per partial layer writing experts into slots; to launch / to "
          "request: wall us from a partial layer's sync to its experts' launch / its first demand read queued, over "
          "the layers that had one")
    print(f"identical tokens in every row: {identical}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
