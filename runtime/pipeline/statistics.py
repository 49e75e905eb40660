"""Every rank's counters, gathered into one table with a column per rank."""

from __future__ import annotations

from typing import List, Sequence

from golem.runtime.pipeline.collectives import gather


RANK_FIELDS = ("first_layer", "last_layer", "moe_layers", "slots", "hits", "misses", "bytes_read", "decode_steps",
               "stall_us", "resident_nbytes", "budget_nbytes", "pf_true", "pf_predicted", "pf_issued", "pf_useful",
               "pf_wasted", "first_true", "first_predicted")


def rank_statistics(runtime) -> dict:
    """This rank's counters (``RANK_FIELDS``) from an ``OffloadedModel``."""
    engine, pipeline = runtime.engine, runtime.pipeline
    stats, t = engine.stats, engine.stats.total()
    layers = pipeline.layers if pipeline is not None else range(0, max(engine.pools) + 1)
    resident = runtime.non_expert_nbytes + sum(p.cache_size * runtime.index.expert_nbytes(l)
                                              for l, p in engine.pools.items())
    budget = runtime.options.memory_budget if runtime.options is not None else None
    row = dict(first_layer=layers.start, last_layer=layers.stop - 1, moe_layers=len(engine.pools), slots=t.cache_size,
               hits=t.hits, misses=t.misses, bytes_read=t.bytes_read, decode_steps=stats.decode_steps,
               stall_us=round(1e6 * stats.decode_read_s), resident_nbytes=resident, budget_nbytes=budget or 0)
    pf = engine.prefetcher
    p = pf.totals() if pf is not None else None
    first = pf.stats[min(engine.pools)] if pf is not None else None
    row.update(pf_true=p.true if p else 0, pf_predicted=p.predicted_true if p else 0, pf_issued=p.issued if p else 0,
               pf_useful=p.useful if p else 0, pf_wasted=p.wasted if p else 0,
               first_true=first.true if first else 0, first_predicted=first.predicted_true if first else 0)
    return row


def gather_statistics(runtime) -> List[dict]:
    """Every rank's ``rank_statistics``, by rank (a collective: every rank calls it, once,
    after generating). Without a pipeline: this process's alone."""
    row = rank_statistics(runtime)
    if runtime.pipeline is None or runtime.pipeline.size == 1:
        return [row]
    table = gather(runtime.pipeline, [row[f] for f in RANK_FIELDS])
    return [{f: int(v) for f, v in zip(RANK_FIELDS, r)} for r in table]


def format_rank_table(rows: Sequence[dict]) -> str:
    """The gathered statistics, a column per rank and a total."""
    def recall(t, p):
        return f"{100 * p / t:.1f}%" if t else "-"

    def col(r):
        steps = max(r["decode_steps"], 1)
        req = r["hits"] + r["misses"]
        return [
            f"{r['first_layer']}-{r['last_layer']}" if r["last_layer"] > r["first_layer"] else str(r["first_layer"]),
            str(r["moe_layers"]), str(r["slots"]),
            f"{100 * r['hits'] / req:.1f}%" if req else "-", str(r["misses"]), f"{r['bytes_read'] / 1e6:.2f}",
            f"{r['stall_us'] / 1000 / steps:.2f}", f"{r['resident_nbytes'] / 1e6:.2f}",
            f"{r['budget_nbytes'] / 1e6:.2f}" if r["budget_nbytes"] else "-",
            recall(r["pf_true"], r["pf_predicted"]), recall(r["first_true"], r["first_predicted"]),
            str(r["pf_issued"]), str(r["pf_useful"]), str(r["pf_wasted"]),
        ]

    names = ["layers", "MoE layers", "slots", "hit rate", "misses", "MB read", "stall ms/token", "resident MB",
             "budget MB", "pf recall", "pf recall, 1st layer", "pf issued", "pf useful", "pf wasted"]
    total = {f: sum(r[f] for r in rows) for f in RANK_FIELDS}
    total.update(first_layer=min(r["first_layer"] for r in rows), last_layer=max(r["last_layer"] for r in rows),
                 decode_steps=max(r["decode_steps"] for r in rows))
    cols = [col(r) for r in rows] + [col(total)]
    cols[-1][10] = "-"  # the first layer of a rank has no total
    heads = [f"rank {i}" for i in range(len(rows))] + ["all"]
    w0 = max(len(n) for n in names)
    widths = [max(len(h), *(len(c) for c in cc)) for h, cc in zip(heads, cols)]
    lines = [f"{'':<{w0}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths))]
    for i, n in enumerate(names):
        lines.append(f"{n:<{w0}}  " + "  ".join(f"{c[i]:>{w}}" for c, w in zip(cols, widths)))
    return "\n".join(lines)
