"""The decode engine: maps each MoE layer's routed expert ids to resident slots.

Owns the per-layer slot pools, the synchronous demand reads on a miss, the prefill
streaming of experts group by group, and the counters. The model's router and its
combination of expert outputs are untouched: the engine only replaces what the experts
module computes with the same computation over the slot pool.
"""

from __future__ import annotations

import math
import time
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from golem.io.file_handles import aligned_empty
from golem.io.futures import wait_result
from golem.io.index import ExpertIndex
from golem.runtime.disk_reader import ExpertReader
from golem.runtime.governor import TokenOutcome
from golem.runtime.prefetch import EVICTED, INSTALLED, LATE, NO_SLOT, NOT_NEEDED, USED
from golem.runtime.phases import PhaseClock
from golem.runtime.engine_stats import EngineStats
from golem.runtime.slots import SlotPool
from golem.runtime.streaming import stream_groups

# A decode layer's experts are launched before its host sync (``Engine(early=)``) while, on
# average over its recent steps, at most this share of its routed experts was not resident:
# each of those is computed twice (once on slot 0, discarded).
EARLY_ABSENT = 0.25
ABSENT_DECAY = 0.25  # weight of the newest step in ``SlotPool.recent_absent``
# A decode layer with misses computes its resident experts apart, while the misses load, from
# this share of them resident: below, the split's host work outweighs their compute on a fast
# device (``bench_switches.py --switch overlap-share``); the CPU backend splits from any...
OVERLAP_SHARE = 0.5
# ... holding this many bytes: a split costs the host ~200 us here, to overlap experts taking tens
# of us each at tens of KiB, ms at real sizes (``bench_switches.py --switch overlap-size``).
OVERLAP_MIN_NBYTES = 256 << 10


class Engine:
    """Resolves expert ids to slots, loading what is missing, prefetching what comes next.

    Host syncs: a fully resident layer costs none (its ids index the pool directly). Any other
    layer costs one: its ids, the predictor's lazy outputs and the trace's weights are read
    back together in one ``mx.eval``. After that sync completed prefetches are installed:
    nothing in flight can still read another layer's pool then (each pool checks it, see
    ``SlotPool``). A decode layer installs those landed for itself first (before its early
    launch, or else right after its sync: a miss they save is a read saved), those for other
    layers once its own reads are queued and its computation launched (``_deferred``).

    A decode layer whose recent steps found nearly all their experts resident (``early``)
    is launched before its sync, through the pool's device table: the device computes it
    while the host reads the ids and keeps its books; experts that were missing then are
    computed again once read. Another decode layer with misses first queues its demand
    reads, then (``overlap``, from ``overlap_share`` of its experts resident, holding
    ``overlap_min_nbytes``) builds and starts its resident experts' computation, then does
    the prefetcher's part (other layers' installs, scoring, new reads), then waits for the
    reads, writes them into their slots and computes the missing experts; the two results
    are put back in routing order, so the output is the one computation would give. A writer
    replacing whole pool arrays (``device``) first waits for the resident experts' computation
    (the pool is updated in place, not copied): a wait for work under way, not a read-back.

    Args:
        index: per-expert byte ranges of every MoE layer.
        pools: the slot pool of every MoE layer.
        reader: ``(layer, expert, out) -> nbytes``; fills ``out`` with the packed expert
            (used when there is no scheduler).
        scheduler: optional ``golem.io.scheduler.IOScheduler`` keyed by ``(layer, expert)``;
            demand reads then go through it too, overtaking its prefetch queue (those the page
            cache holds copied on this thread: ``IOScheduler.submit_demands``).
        prefetcher: optional ``Prefetcher`` (needs ``scheduler``).
        hidden: optional ``(layer, x) -> hidden`` giving the predictor its input at a layer.
        trace: optional recorder of the routing (``golem.runtime.recorder.TraceRecorder``):
            ``weights(layer, x)`` -> lazy array; ``record(layer, ids, weights)``.
        clock: wall-clock time source for stall and host-time accounting.
        cpu_clock: the engine thread's CPU clock, to count its CPU time by phase too (see
            ``time_cpu``); None: wall time only.
        overlap: compute a decode step's resident experts while its misses load.
        overlap_share: ... from this share of its experts resident; None: ``OVERLAP_SHARE``,
            or 0 (any) on the CPU; ``overlap_min_nbytes``: ... holding this many bytes (None:
            ``OVERLAP_MIN_NBYTES`` on the CPU, else 0).
        early: launch a decode layer's experts before its host sync while, on average over its
            recent steps, at most this share of its routed experts was missing at the sync
            (each such expert is computed twice); None: never.
        launch_first: start each decode layer's expert graph as soon as it is built (the
            prefetcher's issue comes after); on the CPU backend too (``--switch launch-first``).

    ``boundary`` (a ``golem.runtime.pipeline.Boundary``, set on a pipeline rank) adds, in a decode
    step, one ``send`` to the last MoE layer's host sync and, before the first MoE layer's, one
    host sync that waits only for the previous rank's residual.
    """

    def __init__(self, index: ExpertIndex, pools: Dict[int, SlotPool], reader: ExpertReader, *,
                 scheduler=None, prefetcher=None, hidden=None, trace=None, clock=time.perf_counter,
                 cpu_clock=None, overlap: bool = True, overlap_share: Optional[float] = None,
                 overlap_min_nbytes: Optional[int] = None, early: Optional[float] = EARLY_ABSENT,
                 launch_first: bool = True):
        self.index = index
        self.pools = pools
        self.reader = reader
        self.scheduler = scheduler
        self.prefetcher = prefetcher
        if prefetcher is not None:
            prefetcher.attach(scheduler)
        self.hidden = hidden or (lambda layer, x: x)
        self.clock = clock
        self.overlap = overlap
        on_cpu = mx.default_device() == mx.cpu
        self.overlap_share = (0.0 if on_cpu else OVERLAP_SHARE) if overlap_share is None else overlap_share
        self.overlap_min_nbytes = overlap_min_nbytes if overlap_min_nbytes is not None else OVERLAP_MIN_NBYTES * on_cpu
        self.early = early
        self.launch_first = launch_first
        self.first_layer = min(pools)
        self.stats = EngineStats(layers={l: p.stats for l, p in pools.items()})
        self._phase = PhaseClock(self.stats.phases, clock, cpu_clock)
        self._last_outcome = (0.0, 0, 0.0)
        self._span = [0.0, 0.0]  # the last decode step's first MoE layer call and its last one's end
        self._staging: Dict[int, np.ndarray] = {}
        self.trace = trace
        self.boundary = None  # optional golem.runtime.pipeline.Boundary: prefetch across pipeline ranks
        self._decoding = False
        self._events: list = []  # what happened to prefetched experts in this layer, for the prefetcher
        self._later: list = []  # prefetches landed for other layers, installed once this one is launched

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    def time_cpu(self, on: bool = True) -> None:
        """Count the engine thread's CPU time by phase too (``stats.phases.cpu_s``): profiling."""
        self._phase.cpu_clock = time.thread_time if on else None

    # -- loading ---------------------------------------------------------------
    def _staging_for(self, layer: int) -> np.ndarray:
        nbytes = self.index.expert_nbytes(layer)
        if nbytes not in self._staging:
            self._staging[nbytes] = aligned_empty(nbytes)
        return self._staging[nbytes]

    def _write(self, pool: SlotPool, slot: int, buf: np.ndarray) -> None:
        pool.write(slot, buf)
        self._phase.lap("write")

    def _flush(self, pool: SlotPool) -> None:
        pool.flush()
        self._phase.lap("write")

    def _evicted(self, layer: int, victim: int) -> None:
        if victim >= 0 and self.prefetcher is not None:
            self._events.append((EVICTED, layer, victim, self.pools[layer].expert_nbytes))

    def _report(self) -> None:
        """Tell the prefetcher, once, what happened to prefetched experts and slots."""
        if self._events:
            events, self._events = self._events, []
            for layer, n in self.prefetcher.report(events).items():
                self.pools[layer].stats.prefetch_hits += n

    def load(self, layer: int, expert: int, protected=()) -> None:
        """Synchronously read ``expert`` into a slot of ``layer`` (a demand read)."""
        pool = self.pools[layer]
        slot, victim = pool.claim(expert, protected)
        self._evicted(layer, victim)
        pool.assign(expert, slot)
        try:
            self._fetch(layer, [(expert, slot)])
        finally:
            if self.prefetcher is not None:
                self._report()

    def _fetch(self, layer: int, todo, meanwhile=None, futures=None) -> None:
        """Read ``[(expert, slot), ...]`` (already assigned), write them into their slots, flush.

        ``meanwhile()`` runs after the demand reads are queued and before waiting on them (the
        engine issues its prefetches and starts computing resident experts there). The layer's
        demand reads are submitted in one call (unless ``futures`` holds them, queued already,
        in ``todo``'s order). Each expert is written as it arrives; the staging buffers go back
        together once every read of the layer has landed, or at once while a demand waits for a
        buffer. The writer uploads the layer's batch at the flush. Waits wake often enough
        (``wait_result``) that Ctrl-C ends a stalled read. On failure or interrupt every expert
        not written is unassigned again (a slot never maps an expert whose bytes did not arrive)
        and buffers still to come are handed back as they land.
        """
        pool, ph, clock = self.pools[layer], self._phase, self.clock
        waited = 0.0  # seconds waiting on reads
        pending = dict(todo)
        try:
            if self.scheduler is None:
                if meanwhile is not None:
                    meanwhile()
                buf = self._staging_for(layer)
                for e, slot in todo:
                    t = clock()
                    pool.stats.bytes_read += self.reader(layer, e, buf)
                    waited += clock() - t
                    ph.lap("wait")
                    self._write(pool, slot, buf)
                    del pending[e]
            else:
                sched, pf = self.scheduler, self.prefetcher
                if futures is None:
                    futures = self._demands(pool, [e for e, _ in todo])
                taken, written = 0, []  # buffers written from and not yet handed back
                try:
                    if meanwhile is not None:
                        meanwhile()
                    for (e, slot), future in zip(todo, futures):
                        t = clock()
                        buf = wait_result(future)
                        waited += clock() - t
                        taken += 1
                        written.append(buf)
                        ph.lap("wait")
                        pool.stats.bytes_read += len(buf)
                        if pf is not None:
                            self._events.append((LATE, layer, e, 0))
                        self._write(pool, slot, buf)
                        del pending[e]
                        if sched.demands_waiting():  # a read still to come needs one
                            sched.release_all(written)
                            written = []
                        ph.lap("request")
                except BaseException:
                    sched.abandon(futures[taken:])  # the engine stops
                    raise
                finally:
                    sched.release_all(written)
                    ph.lap("request")
            self._flush(pool)
        except BaseException:
            for e in pending:
                pool.unassign(e)
            raise
        finally:
            pool.stats.read_s += waited

    def _demands(self, pool: SlotPool, experts) -> list:
        """Queue ``pool``'s demand reads of ``experts`` (futures in order); the copies the
        scheduler made from the page cache meanwhile are read time (``wait``, the layer's stall)."""
        self._phase.reached("request")
        futures = self.scheduler.submit_demands([(pool.layer, e) for e in experts])
        read_s = self.scheduler.take_cached_read_s()
        pool.stats.read_s += read_s
        self._phase.lap("request", read_s=read_s)
        return futures

    def preload(self, layer: int, experts) -> None:
        """Load ``experts`` into ``layer`` (warm start, pinned layers), in order."""
        pool = self.pools[layer]
        todo = []
        for e in experts:
            e = int(e)
            if pool.fully_resident:
                todo.append((e, e))
            elif not pool.is_resident(e):
                slot, victim = pool.claim(e)
                pool.assign(e, slot)
                todo.append((e, slot))
        self._fetch(layer, todo)
        pool.settle()

    def warm(self, experts_by_layer) -> None:
        """Warm start: load each layer's listed experts (the last listed ends most recent)."""
        for layer, experts in experts_by_layer.items():
            pool = self.pools.get(layer)
            if pool is not None and not pool.fully_resident:
                self.preload(layer, list(experts)[-pool.cache_size:])

    def _admit(self, pool: SlotPool, needed: list, request: bool = False):
        """The pool's step protocol for ``needed``, with the counters; ``(hits, todo, futures)``.

        ``request`` (with a scheduler): the demand reads of the experts not resident are
        queued first, before the books claim their slots, so the storage starts sooner;
        ``futures`` are theirs, in ``todo``'s order (None when none were queued)."""
        futures = None
        if request and self.scheduler is not None:
            missing = [e for e, slot in zip(needed, pool.slot_of[needed].tolist()) if slot < 0]
            if missing:
                futures = self._demands(pool, missing)
        try:
            hits, todo, evicted = pool.admit(needed)
        except BaseException:
            if futures:
                self.scheduler.abandon(futures)
            raise
        for victim in evicted:
            self._evicted(pool.layer, victim)
        pool.stats.hits += len(hits)
        pool.stats.misses += len(todo)
        if self._decoding:
            self.stats.decode_misses += len(todo)
        if self.prefetcher is not None and hits:
            self._events.append((USED, pool.layer, hits, pool.expert_nbytes))
        return hits, todo, futures

    def _ensure(self, pool: SlotPool, needed: list, meanwhile=None) -> None:
        _, todo, _ = self._admit(pool, needed)
        if todo:
            self._fetch(pool.layer, todo, meanwhile)
        elif meanwhile is not None:
            meanwhile()

    # -- prefetch, at a safe point -----------------------------------------------
    def _resident(self, layer: int) -> np.ndarray:
        pool = self.pools[layer]
        return np.ones(pool.num_experts, bool) if pool.fully_resident else pool.slot_of >= 0

    def _install(self, layer: int, protected: set, installs, keep) -> None:
        """Install the prefetches that have landed, never evicting an expert of ``layer`` in
        ``protected`` (nor, in another layer, one the prefetcher guessed for it: ``keep``)."""
        if not installs:
            return
        ph, touched, events, pools = self._phase, set(), self._events, self.pools
        try:
            for l, e, buf in installs:
                pool = pools[l]
                if pool.is_resident(e):
                    events.append((NOT_NEEDED, l, e, 0))
                    continue
                try:
                    slot, victim = pool.claim(e, protected if l == layer else keep(l))
                except LookupError:  # every slot holds an expert in use or guessed
                    events.append((NO_SLOT, l, e, len(buf)))
                    continue
                self._evicted(l, victim)
                ph.lap("install")
                self._write(pool, slot, buf)
                pool.assign(e, slot, cold=True)
                touched.add(pool)
                pool.stats.bytes_read += len(buf)
                events.append((INSTALLED, l, e, 0))
        finally:  # every buffer back, written or not, in one call
            self.scheduler.release_all([buf for _, _, buf in installs])
        ph.lap("install")
        for pool in touched:
            self._flush(pool)

    def _deferred(self, layer: int, ids: np.ndarray, orders):
        """After ``layer``'s sync: install what landed for it now (a miss it saves is a read saved);
        return what can wait until its demand reads are queued and its computation launched
        (``issue``, or None where the orders hold none: all installed now): the installs into other
        layers' pools (``_later``: left to the next layer if this one raises), then the issue."""
        installs, self._later = self._later + orders.installs, []
        if orders.issue is None and not installs:
            return None
        used = set(ids.reshape(-1).tolist())
        if orders.issue is None:
            self._install(layer, used, installs, orders.keep)
            return None
        self._install(layer, used, [a for a in installs if a[0] == layer], orders.keep)
        self._later = [a for a in installs if a[0] != layer]

        def issue():
            later, self._later = self._later, []
            self._install(layer, used, later, orders.keep)
            self._report()  # what was installed and used so far: a used key still in flight is late
            orders.issue(self._resident)
            self._phase.lap("issue")
        return issue

    def _arrive(self, pool: SlotPool) -> None:
        """Before a decode layer's launch: install the prefetches read for it (an early launch then
        finds them resident), evicting no expert guessed for it: its routing is not known yet."""
        orders = self.prefetcher.arrivals_for(pool.layer)
        if orders.installs:
            self._install(pool.layer, orders.keep(pool.layer), orders.installs, orders.keep)
        self._phase.lap("install")

    # -- the experts module's computation ----------------------------------------
    def _begin_call(self, indices: mx.array) -> None:
        tokens = math.prod(indices.shape[:-1])
        st, pf = self.stats, self.prefetcher
        st.forward_calls, st.tokens = st.forward_calls + 1, st.tokens + tokens
        self._phase.on = False  # a layer that raised left it running
        for pool in self.pools.values():
            if not pool.fully_resident:
                pool.policy.tick()
        after_decode, self._decoding = self._decoding, tokens == 1
        st.decode_steps += self._decoding
        if pf is not None:
            pf.begin(self._decoding, self._outcome(after_decode) if self._decoding else None)

    def _outcome(self, after_decode: bool) -> TokenOutcome:
        """What the last decode step cost in stalls and prefetch host time, and how long it
        took from its first MoE layer's call to its last one's end (for the governor)."""
        wall, st = self.stats.phases.wall_s, self.stats
        now = (wall["wait"], st.decode_misses, wall["predict"] + wall["issue"] + wall["install"])
        last, self._last_outcome = self._last_outcome, now
        return TokenOutcome(stall_s=now[0] - last[0], misses=now[1] - last[1], prefetch_host_s=now[2] - last[2],
                            span_s=self._span[1] - self._span[0] if after_decode else 0.0)

    def forward(self, layer: int, glu: nn.Module, x: mx.array, indices: mx.array) -> mx.array:
        y = self._forward(layer, glu, x, indices)
        self._span[1] = self.clock()
        return y

    def _forward(self, layer: int, glu: nn.Module, x: mx.array, indices: mx.array) -> mx.array:
        if layer == self.first_layer:
            self._begin_call(indices)
            if self.boundary is not None and self._decoding:
                self.boundary.incoming(self, x)  # the previous rank's residual: reads before compute
            self._span[0] = self.clock()  # this rank's step starts (a wait for the previous rank's is not its own)
        pool, pf, trace, ph = self.pools[layer], self.prefetcher, self.trace, self._phase
        if pool.fully_resident and pf is None and trace is None and self.boundary is None:
            return glu(x, indices)  # nothing for the host to do: no clock, no sync
        if self._decoding:
            ph.start()
        proposals = pf.propose(layer, self.hidden(layer, x)) if pf is not None and self._decoding else ()
        outgoing = self.boundary.outgoing(self, layer, x) if self.boundary is not None and self._decoding else ()
        if pool.fully_resident and trace is None and not proposals and not outgoing:
            ph.discard()
            return glu(x, indices)
        ph.lap("predict")
        if pf is not None and self._decoding and self.early is not None and not pool.fully_resident:
            self._arrive(pool)
        extra = trace.weights(layer, x) if trace is not None else []
        synced = [indices, *extra, *(a for p in proposals for a in p.arrays), *outgoing]
        early = self._launch_early(pool, glu, x, indices, synced)
        mx.eval(synced)  # this layer's one host sync
        ph.lap("sync")
        self.stats.host_syncs += 1
        self.stats.decode_host_syncs += self._decoding
        ids = np.array(indices)
        if trace is not None:
            trace.record(layer, ids, [np.array(a) for a in extra])
        absent = self._absent(pool, ids, early) if early is not None else None
        ph.lap("ids")
        issue = None
        if pf is not None:
            if self._events:  # a layer that raised left them
                self._report()
            scores = extra[0] if trace is not None and trace.route is not None else None
            orders = pf.step(layer, ids, scores, proposals, self._decoding)
            ph.lap("predict")
            issue = self._deferred(layer, ids, orders)
        if pool.fully_resident:
            y = glu(x, indices)
            if issue is not None:
                self._launch(y)
                issue()
        else:
            flat = ids.reshape(-1).tolist()
            needed = sorted(set(flat))
            ph.lap("ids")
            if len(needed) > pool.cache_size:
                y, syncs = stream_groups(pool, glu, x, ids, needed, self._ensure)
                self.stats.host_syncs += syncs
            elif early is not None:
                y = self._complete_early(pool, glu, x, ids, needed, issue, early[0], absent)
            else:
                y = self._compute(pool, glu, x, ids, flat, needed, issue)
        if pf is not None:
            ph.lap("graph")
            self._report()
            ph.stop("predict")
        else:
            ph.stop("graph")
        return y

    # -- launching a decode layer's experts before its sync ------------------------------
    def _launch_early(self, pool: SlotPool, glu: nn.Module, x: mx.array, indices: mx.array, synced: list):
        """Start the layer's experts before its host sync, through the pool's device table, when
        its recent steps found (nearly) all their experts resident; ``(y, snapshot)`` or None.

        The device then computes the experts while the host reads the ids back and does its
        bookkeeping, and a layer whose experts were all resident needs no host work after
        its sync but the policy's hits. What ``synced`` holds is launched first, apart (and
        charged to the sync, whose work it is): an array evaluated inside a launch is waited
        for only with all of that launch (MLX), and the device starts on the layer's
        attention and router while the host builds the experts' graph.
        """
        if self.early is None or not self._decoding or pool.fully_resident \
                or pool.recent_absent > self.early * indices.shape[-1]:
            return None
        ph = self._phase
        ph.reached("launch")  # before its sync: the device never waits for this layer's host work
        mx.async_eval(synced)  # the layer's pending work starts now, as the sync would start it
        ph.lap("sync")
        table, snapshot = pool.device_table()
        y = glu(x, table[indices])
        ph.lap("graph")
        mx.async_eval(y)
        ph.lap("launch")
        self.stats.early_layers += 1
        return y, snapshot

    def _launch(self, y: mx.array) -> mx.array:
        """With ``launch_first``, start a decode layer's finished expert graph ``y`` now (the device
        computes it while the host ends the layer and builds the next), not at the next sync."""
        if self.launch_first:
            self._phase.reached("launch")
            mx.async_eval(y)
            self._phase.lap("launch")
        return y

    def _absent(self, pool: SlotPool, ids: np.ndarray, early):
        """After an early-launched decode layer's sync, before any install: the positions of ``ids``
        (one token's) whose experts its launch computed on slot 0, registering it with the pool."""
        y, snapshot = early
        slots = snapshot[ids.reshape(-1)]
        absent = np.flatnonzero(slots < 0)
        pool.reading(y, slots[slots >= 0])
        self._note_absent(pool, len(absent))
        return absent

    def _note_absent(self, pool: SlotPool, n: int) -> None:
        """A decode step of ``pool`` found ``n`` routed experts missing at its launch (or admission):
        the running average that decides the next early launch (``recent_absent``)."""
        pool.recent_absent += ABSENT_DECAY * (n - pool.recent_absent)

    def _complete_early(self, pool: SlotPool, glu: nn.Module, x: mx.array, ids: np.ndarray,
                        needed: list, issue, y: mx.array, absent: np.ndarray) -> mx.array:
        """The early launch ``y``, with the experts it computed on slot 0 (``absent``
        positions) computed again from their slots once read; each (token, expert) pair is
        computed on its own, so the values are the ones one computation would give."""
        ph = self._phase
        _, todo, futures = self._admit(pool, needed, request=True)
        ph.lap("pool")
        if todo:
            self._fetch(pool.layer, todo, issue, futures)
        elif issue is not None:
            issue()
        if not len(absent):
            return y
        self.stats.early_redone += len(absent)
        *lead, k = ids.shape
        slots = pool.slots(ids.reshape(-1)[absent])  # resident now: read, installed or prefetched
        again = glu(x, mx.array(slots).reshape(*lead, -1))
        ph.lap("graph")
        pool.reading(again, slots)
        ph.lap("pool")
        order = np.arange(k)
        order[absent] = k + np.arange(len(absent))
        return self._launch(mx.take(mx.concatenate([y, again], axis=-2), mx.array(order), axis=-2))

    def _compute(self, pool: SlotPool, glu: nn.Module, x: mx.array, ids: np.ndarray, flat: list,
                 needed: list, issue) -> mx.array:
        """The layer's experts over its slots: hits at once, misses once read.

        ``flat``: ``ids`` as a flat list; ``needed``: its distinct values, ascending. A decode
        step's results are registered with the pool (``SlotPool.reading``). Those of a
        multi-token call are not: the caller either evaluates them before its next call (the
        last prefill step) or drops them unevaluated (mlx-lm's earlier prefill chunks, whose
        last layer only the logits need): evaluating them would compute what nobody reads.
        """
        ph = self._phase
        hits, todo, futures = self._admit(pool, needed, request=self._decoding)
        if self._decoding:
            self._note_absent(pool, len(todo))  # one token: its experts are distinct
        slots = pool.slots(ids)  # misses are assigned their slots already
        ph.lap("pool")
        if not (todo and self.overlap and self._decoding and hits
                and len(hits) >= self.overlap_share * len(needed)
                and len(hits) * pool.expert_nbytes >= self.overlap_min_nbytes):
            if todo:
                self._fetch(pool.layer, todo, issue, futures)
            y = glu(x, mx.array(slots))
            ph.lap("graph")
            if self._decoding:
                pool.reading(y, slots)
                ph.lap("pool")
                self._launch(y)
            if issue is not None and not todo:
                issue()
            return y
        # Decode: compute the resident experts while the misses load (their reads are queued
        # already, see ``_admit``), then the missing ones; each (token, expert) pair is
        # computed on its own, so splitting them changes no value.
        missing = {e for e, _ in todo}
        first = [i for i, e in enumerate(flat) if e not in missing]
        second = [i for i, e in enumerate(flat) if e in missing]
        lead = ids.shape[:-1]
        flat_slots = slots.reshape(-1)
        hit_slots = flat_slots[first]
        y_hit = glu(x, mx.array(hit_slots).reshape(*lead, -1))
        ph.lap("graph")
        pool.reading(y_hit, hit_slots)
        ph.lap("pool")

        def meanwhile():
            ph.reached("launch")
            mx.async_eval(y_hit)
            ph.lap("launch")
            if issue is not None:
                issue()

        self._fetch(pool.layer, todo, meanwhile, futures)
        miss_slots = flat_slots[second]
        y_miss = glu(x, mx.array(miss_slots).reshape(*lead, -1))
        ph.lap("graph")
        pool.reading(y_miss, miss_slots)
        ph.lap("pool")
        order = [0] * len(flat)
        for pos, i in enumerate(first + second):
            order[i] = pos
        return self._launch(mx.take(mx.concatenate([y_hit, y_miss], axis=-2), mx.array(order), axis=-2))
