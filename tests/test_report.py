"""The expert statistics every command shows: ``model.golem.stats()`` equals the engine's
own counters (per layer and in total), ``reset_stats`` counts from zero without touching
them, the Prometheus text carries the same numbers, and ``golem-run --json`` prints one JSON
object whose figures are those of its ``--stats`` table."""

from __future__ import annotations

import json
import re

from golem.runtime import load
from golem.runtime.prefetch import PrefetchConfig
from golem.runtime.report import parse_prometheus, prometheus
from helpers import greedy_tokens, prompt_tokens, stock

N = 10


def _engine_figures(runtime) -> dict:
    """{layer: (hits, misses, bytes_read, read_s, issued, useful, wasted)} from the engine itself."""
    pf = runtime.engine.prefetcher
    out = {}
    for layer, s in runtime.engine.stats.layers.items():
        p = pf.stats[layer]
        out[layer] = (s.hits, s.misses, s.bytes_read, s.read_s, p.issued, p.useful, p.wasted)
    return out


def _report_figures(stats) -> dict:
    return {r.layer: (r.hits, r.misses, r.bytes_read, r.stall_s, r.prefetch_issued, r.prefetch_useful,
                      r.prefetch_wasted) for r in stats.layers}


def test_stats_equal_the_engine_counters_and_reset_counts_from_zero(checkpoints):
    path = checkpoints("qwen3_moe")
    _, tok = stock(path)
    tokens = prompt_tokens(tok)
    with load(str(path), cache_sizes=6, prefetch=PrefetchConfig(depth=1, threshold=0.1)) as (model, _):
        runtime = model.golem
        greedy_tokens(model, tokens, N)
        stats = runtime.stats()
        assert _report_figures(stats) == _engine_figures(runtime)
        total = runtime.engine.stats.total()
        assert (stats.total.hits, stats.total.misses, stats.total.bytes_read) == \
            (total.hits, total.misses, total.bytes_read)
        assert stats.total.prefetch_issued == runtime.engine.prefetcher.totals().issued
        assert stats.decode_steps == runtime.engine.stats.decode_steps > 0
        assert all(r.slots == 6 and r.resident == 6 for r in stats.layers)
        assert stats.total.slot_nbytes == sum(p.nbytes for p in runtime.engine.pools.values())
        json.dumps(stats.as_dict())  # plain types only

        before = _engine_figures(runtime)
        runtime.reset_stats()
        zero = runtime.stats()
        assert zero.total.requests == zero.total.bytes_read == zero.decode_steps == 0
        assert zero.total.resident == stats.total.resident  # levels are not reset
        assert _engine_figures(runtime) == before  # the engine's counters are untouched

        greedy_tokens(model, tokens, N)
        after = _engine_figures(runtime)
        since = _report_figures(runtime.stats())
        for layer, figures in since.items():
            want = tuple(a - b for a, b in zip(after[layer], before[layer]))
            assert figures[:3] == want[:3] and figures[4:] == want[4:]
            assert abs(figures[3] - want[3]) < 1e-9
        assert runtime.stats().total.requests > 0


def test_prometheus_text_carries_every_layer(checkpoints):
    path = checkpoints("qwen3_moe")
    _, tok = stock(path)
    with load(str(path), cache_sizes=6, prefetch=PrefetchConfig(depth=1, threshold=0.1)) as (model, _):
        greedy_tokens(model, prompt_tokens(tok), N)
        stats = model.golem.stats()
    text = prometheus(stats)
    metrics = parse_prometheus(text)
    for r in stats.layers:
        assert metrics[f'golem_layer_expert_hits_total{{layer="{r.layer}"}}'] == r.hits
        assert metrics[f'golem_layer_expert_misses_total{{layer="{r.layer}"}}'] == r.misses
        assert metrics[f'golem_layer_prefetch_issued_total{{layer="{r.layer}"}}'] == r.prefetch_issued
    assert metrics["golem_expert_hits_total"] == stats.total.hits
    assert metrics["golem_expert_read_bytes_total"] == stats.total.bytes_read
    assert metrics["golem_expert_resident_bytes"] == stats.total.resident_nbytes
    # Each family is declared once, before its samples.
    names = re.findall(r"^# TYPE (\S+) (counter|gauge)$", text, flags=re.M)
    assert len(names) == len({n for n, _ in names})


def test_golem_run_json_is_one_object_with_the_table_figures(checkpoints, capsys, monkeypatch):
    import sys

    from mlx_lm.generate import main as mlx_generate

    from golem.runtime.cli.run import main as golem_run

    argv = ["--model", str(checkpoints("olmoe")), "-p", "Once upon a time", "-m", "8"]
    monkeypatch.setattr(sys, "argv", ["mlx_lm.generate", *argv, "--verbose", "False"])
    mlx_generate()
    stock_text = capsys.readouterr().out
    assert golem_run([*argv, "-c", "4", "--prefetch-depth", "1", "--json", "--stats"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)  # stdout is the one object, nothing else
    assert report["text"] + "\n" == stock_text
    assert len(report["tokens"]) == report["generation_tokens"] == 8
    assert report["timings"]["generation_tps"] > 0
    rows = {}
    for line in err.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit():
            rows[int(cells[0])] = (int(cells[4]), int(cells[5]))  # layer, N, of, M, hits, misses
    layers = {r["layer"]: (r["hits"], r["misses"]) for r in report["experts"]["layers"]}
    assert rows == layers and sum(h + m for h, m in layers.values()) > 0
    assert report["experts"]["total"]["hits"] == sum(h for h, _ in layers.values())


def test_verbose_false_puts_the_statistics_on_stderr(checkpoints, capsys):
    from golem.runtime.cli.run import main as golem_run

    argv = ["--model", str(checkpoints("olmoe")), "-p", "Once upon a time", "-m", "4", "-c", "4",
            "--verbose", "False"]
    assert golem_run(argv) == 0
    out, err = capsys.readouterr()
    assert "Experts:" not in out and "Experts: hit rate" in err
