"""The speed estimator: model arithmetic, the GLM-5 study's numbers, placement, trace replay, CLI."""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from golem.runtime.analysis import catalog
from golem.runtime.analysis.chunks import chunk_analysis
from golem.runtime.analysis.estimate import ChunkRouting, TraceReplay, estimate, memory_sweep, plot_sweep
from golem.runtime.analysis.machines import MachineSpec, load_machine
from golem.runtime.analysis.model_size import ModelSpec, Quantization, load_model_spec, parse_bpw
from golem.runtime.analysis.placement import plan_placement
from golem.runtime.units import GB, GiB, parse_size
from golem.runtime.trace import Trace, save_trace
from golem.runtime.cli.trace import main as trace_main

TRACES = Path(__file__).resolve().parents[1] / ".." / "shared" / "traces" / "olmoe-1b-7b"
MiB = 2 ** 20
STUDY = ChunkRouting(u=13_190, d=2_412, chunk=128, source="GLM-5 study")
MIXED = Quantization.parse("IQ4_XS", "gate=IQ3_S,up=IQ3_S,down=IQ4_XS")


def _synthetic_trace(steps=768, layers=4, experts=16, top_k=2, seed=0) -> Trace:
    """Routing with locality: each layer draws from a slowly drifting favourite set."""
    rng = np.random.default_rng(seed)
    out = np.zeros((steps, layers, top_k), np.int16)
    for position in range(layers):
        fav = rng.permutation(experts)
        for t in range(steps):
            if t % 64 == 0:
                fav = np.roll(fav, 1)
            p = 0.6 ** np.arange(experts)
            p /= p.sum()
            out[t, position] = fav[rng.choice(experts, size=top_k, replace=False, p=p)]
    return Trace(experts=out, weights=np.ones(out.shape, np.float32),
                 seq_offsets=np.array([0, steps // 2, steps], np.int64),
                 meta={"num_layers": layers, "num_experts": experts, "top_k": top_k, "expert_bytes": 1024})


def _model(layers=4, experts=16, top_k=2, hidden=64, expert_hidden=64) -> ModelSpec:
    return ModelSpec.from_config({
        "model_type": "qwen3_moe", "hidden_size": hidden, "num_hidden_layers": layers,
        "moe_intermediate_size": expert_hidden, "num_experts": experts, "num_experts_per_tok": top_k,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    }, name=f"tiny-{layers}x{experts}")


def _cpu_machine(ram_nbytes, ssd_gb_per_s=1.0) -> MachineSpec:
    return MachineSpec.from_dict({"tiers": [
        {"kind": "ram", "size": int(ram_nbytes), "gb_per_s": 10.0},
        {"kind": "ssd", "gb_per_s": ssd_gb_per_s},
    ]}, name="cpu")


def _lru_reads(experts: np.ndarray, cache_size: int) -> int:
    """Plain per-layer LRU, a few lines: misses over all steps and layers."""
    misses = 0
    for position in range(experts.shape[1]):
        cache: OrderedDict = OrderedDict()
        for step in experts[:, position]:
            for e in sorted(int(x) for x in step if x >= 0):
                if e in cache:
                    cache.move_to_end(e)
                    continue
                misses += 1
                if len(cache) >= cache_size:
                    victim = next(v for v in cache if v not in step)
                    del cache[victim]
                cache[e] = None
    return misses


# ------------------------------------------------------------------------ model arithmetic


@pytest.mark.parametrize("name", sorted(catalog.MODELS))
def test_builtin_models_match_published_sizes(name):
    m = load_model_spec(name)
    assert m.total_params / 1e9 == pytest.approx(catalog.PUBLISHED_PARAMS_B[name], rel=0.02)
    assert m.active_params < m.total_params


def test_glm5_expert_sizes_of_the_study():
    m = load_model_spec("glm-5")
    assert (m.num_moe_layers, m.num_experts, m.top_k) == (75, 256, 8)
    q = Quantization.parse("IQ4_XS")
    assert q.expert_nbytes(m) == int(19.125 * MiB)
    assert STUDY.u * q.expert_nbytes(m) / GiB == pytest.approx(246, abs=0.5)
    assert STUDY.d * q.expert_nbytes(m) / GiB == pytest.approx(45, abs=0.1)
    assert MIXED.expert_nbytes(m) < q.expert_nbytes(m)


def test_parsers_reject_bad_values():
    assert parse_size("24GiB") == 24 * GiB and parse_size("256GB") == 256 * GB and parse_size(100) == 100
    assert parse_bpw("iq4_xs") == 4.25 and parse_bpw("5") == 5.0
    with pytest.raises(ValueError, match="--ram"):
        parse_size("lots", "--ram")
    with pytest.raises(ValueError, match="unknown format"):
        parse_bpw("Q9_Z")
    with pytest.raises(ValueError, match="unknown matrix"):
        Quantization.parse("IQ4_XS", "gate=IQ3_S,middle=Q4_K")
    with pytest.raises(ValueError, match="not a mixture-of-experts"):
        ModelSpec.from_config({"hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 8, "num_attention_heads": 2})


# ------------------------------------------------------------------ the GLM-5 study's numbers


def test_study_ssd_cost_with_256_gb_of_ram():
    """U fits, so each 128-token chunk pages in D experts: 45 GiB / (128 x 7 GB/s) ~ 50 ms."""
    m, q = load_model_spec("glm-5"), Quantization.parse("IQ4_XS")
    machine = load_machine("rtx3090-128g").with_memory(256 * GiB)
    rep = estimate(m, q, machine, routing=STUDY)
    assert rep.placement.capacity_experts >= STUDY.u
    assert rep.chunk.experts_read == pytest.approx(STUDY.d / 128)
    ssd = machine.ssd
    expected = STUDY.d * q.expert_nbytes(m) / (128 * 7 * GB) + STUDY.d / 128 * ssd.read_latency_s
    assert rep.chunk.ssd_s == pytest.approx(expected)
    assert rep.chunk.ssd_s == pytest.approx(0.050, abs=0.006)


def test_study_rtx3090_128g_about_3_5_tokens_per_s():
    m = load_model_spec("glm-5")
    rep = estimate(m, MIXED, load_machine("rtx3090-128g"), routing=STUDY)
    assert rep.chunk.tokens_per_s == pytest.approx(3.5, rel=0.1)
    # a shortfall: it pages in D + S per chunk
    shortfall = STUDY.u - rep.placement.capacity_experts
    assert shortfall > 0
    assert rep.chunk.experts_read == pytest.approx((STUDY.d + shortfall) / 128)
    fast = estimate(m, MIXED, load_machine("rtx3090-128g").with_ssd(28), routing=STUDY)
    assert fast.chunk.tokens_per_s > 6


def test_study_p40_machine_just_under_3_tokens_per_s():
    rep = estimate(load_model_spec("glm-5"), Quantization.parse("IQ4_XS"), load_machine("p40x3-288g"),
                   routing=STUDY)
    assert 2.5 < rep.chunk.tokens_per_s < 3.0
    assert rep.placement.fast_pinned[0] == 0  # pinned layers first, from the first MoE layer


# ------------------------------------------------------------------------------- placement


@pytest.mark.parametrize("machine", ["rtx3090-128g", "p40x3-288g", "m3-max-128g", "ddr5-96g-cpu"])
def test_placement_fits_every_tier(machine):
    m, q = load_model_spec("qwen3-235b-a22b"), Quantization.parse("Q4_K")
    base = load_machine(machine)
    for size in base.cache_tier.reserve_nbytes + np.linspace(8 * GiB, 200 * GiB, 9):
        mach = base.with_memory(int(size))
        pl = plan_placement(m, q, mach)
        ne = q.non_expert_nbytes(m)
        fast_bytes = len(pl.fast_pinned) * m.num_experts * pl.expert_nbytes
        cache_bytes = sum(pl.slots[i] for i in range(m.num_moe_layers) if i not in pl.fast_pinned) * pl.expert_nbytes
        if mach.fast is not None and mach.fast is not mach.cache_tier:
            fast_bytes += ne if pl.non_expert_tier == mach.fast.kind else 0
            assert fast_bytes <= mach.fast.usable_nbytes
            cache_bytes += ne if pl.non_expert_tier == "ram" else 0
        else:
            cache_bytes += ne
        assert cache_bytes <= mach.cache_tier.usable_nbytes
        assert all(0 <= s <= m.num_experts for s in pl.slots)


def test_chunk_formula_needs_no_reads_when_everything_fits():
    m, q = load_model_spec("qwen3-30b-a3b"), Quantization.parse("Q4_K")
    rep = estimate(m, q, load_machine("m3-max-128g"), routing=ChunkRouting(3000, 300))
    assert rep.placement.capacity_experts == m.total_experts
    assert rep.chunk.experts_read == 0 and rep.chunk.ssd_s == 0


def test_weighted_plan_follows_weights_and_keeps_the_total():
    m, q = _model(layers=4, experts=16), Quantization.parse("F16")
    e = q.expert_nbytes(m)
    mach = _cpu_machine(q.non_expert_nbytes(m) + 30 * e)
    uniform = plan_placement(m, q, mach)
    weighted = plan_placement(m, q, mach, layer_weights=[4, 2, 1, 1])
    assert sum(uniform.slots) == sum(weighted.slots) == 30
    assert weighted.slots[0] == 15 and weighted.slots[0] > weighted.slots[2]


# ------------------------------------------------------------------------------ trace replay


def test_trace_replay_matches_plain_lru_on_its_own_model():
    trace = _synthetic_trace()
    m, q = _model(), Quantization.parse("F16")
    e = q.expert_nbytes(m)
    for slots in (2, 5, 9, 16):
        mach = _cpu_machine(q.non_expert_nbytes(m) + 4 * slots * e)
        rep = estimate(m, q, mach, replay=TraceReplay([trace], policy="lru"))
        assert rep.placement.slots == (slots,) * 4
        assert rep.trace.experts_read == pytest.approx(_lru_reads(trace.experts, slots) / trace.num_steps) \
            if slots < 16 else rep.trace.experts_read == 0


def test_trace_replay_maps_a_small_model_by_share_of_a_layer():
    trace = _synthetic_trace()
    small, big = _model(layers=4, experts=16), _model(layers=8, experts=64, top_k=4)
    q = Quantization.parse("F16")
    replay = TraceReplay([trace], policy="lru")
    for slots in (16, 36):  # 16/64 and 36/64 of a layer -> 4 and 9 of 16 traced slots
        mach = _cpu_machine(q.non_expert_nbytes(big) + 8 * slots * q.expert_nbytes(big))
        rep = estimate(big, q, mach, replay=replay)
        assert rep.placement.slots == (slots,) * 8
        x = slots * 16 // 64
        per_request = _lru_reads(trace.experts, x) / (trace.num_steps * 4 * 2)
        assert rep.trace.experts_read == pytest.approx(8 * 4 * per_request)
    # between integer cache sizes the traced miss ratio is interpolated
    mach = _cpu_machine(q.non_expert_nbytes(big) + 8 * 38 * q.expert_nbytes(big))  # 9.5 traced slots
    mid = estimate(big, q, mach, replay=replay).trace.experts_read
    lo, hi = (_lru_reads(trace.experts, c) / (trace.num_steps * 8) * 32 for c in (9, 10))
    assert mid == pytest.approx((lo + hi) / 2)
    assert small.num_experts == 16


def test_trace_replay_with_no_memory_reads_every_active_expert():
    m, q = load_model_spec("glm-5"), MIXED
    machine = load_machine("rtx3090-128g").with_memory(0)
    rep = estimate(m, q, machine, routing=STUDY, replay=TraceReplay([_synthetic_trace(layers=4, experts=16)], policy="lru"))
    cached = m.num_moe_layers - len(rep.placement.fast_pinned)
    assert rep.trace.experts_read == pytest.approx(cached * m.top_k)
    assert rep.chunk.experts_read < rep.trace.experts_read  # the formula's optimism at 0 GB


def test_prefetch_overlaps_reads_with_compute():
    trace = _synthetic_trace()
    m, q = _model(), Quantization.parse("F16")
    mach = _cpu_machine(q.non_expert_nbytes(m) + 4 * 4 * q.expert_nbytes(m), ssd_gb_per_s=0.001)
    cold = estimate(m, q, mach, replay=TraceReplay([trace], policy="lru")).trace
    warm = estimate(m, q, mach, replay=TraceReplay([trace], policy="lru", prefetch_recall=0.8)).trace
    assert warm.experts_read == pytest.approx(cold.experts_read, rel=0.05)
    assert warm.time_s < cold.time_s
    with pytest.raises(ValueError, match="prefetch-recall"):
        TraceReplay([trace], policy="lru", prefetch_recall=1.5)


@pytest.mark.skipif(not (TRACES / "general.npz").is_file(), reason="OLMoE traces not present")
def test_olmoe_traces_drive_a_glm5_sweep():
    from golem.runtime.trace import load_trace

    traces = [load_trace(TRACES / "general.npz")]
    m = load_model_spec("glm-5")
    stats = chunk_analysis(traces, coverages=(1.0,))
    routing = ChunkRouting.from_stats(stats, m)
    assert routing.u == pytest.approx(stats.u_mean[0] * m.total_experts / (16 * 64))
    replay = TraceReplay(traces, policy="lru")
    machine = load_machine("rtx3090-128g")
    sweep = memory_sweep(m, MIXED, machine, [16 * GiB, 64 * GiB, 128 * GiB, 256 * GiB, 400 * GiB],
                         routing=routing, replay=replay)
    speeds = [r.trace.tokens_per_s for _, r in sweep]
    assert speeds == sorted(speeds) and speeds[-1] > speeds[0]
    assert sweep[-1][1].trace.experts_read == 0 == sweep[-1][1].chunk.experts_read
    # the chunk formula is the more optimistic one when memory is small
    assert sweep[0][1].chunk.tokens_per_s > sweep[0][1].trace.tokens_per_s


# ------------------------------------------------------------------------------------- CLI


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_cli_one_command_from_trace_to_estimate(tmp_path, capsys):
    path = tmp_path / "t.npz"
    save_trace(path, _synthetic_trace())
    rc = trace_main(["estimate", "--model", "glm-5", "--machine", "rtx3090-128g", "--trace", str(path),
                     "--expert-bits", "gate=IQ3_S,up=IQ3_S,down=IQ4_XS", "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and "chunk formula" in out and "trace replay" in out
    data = _last_json(out)
    assert data["chunk"]["tokens_per_s"] > 0 and data["trace"]["tokens_per_s"] > 0
    assert data["chunk_stats"]["chunk"] == 128 and data["placement"]["fast_pinned_layers"].startswith("0-")


def test_cli_machine_file_config_json_and_sweep(tmp_path, capsys):
    machine = tmp_path / "box.json"
    machine.write_text(json.dumps({"name": "box", "tiers": [
        {"kind": "ram", "size": "64GiB", "gb_per_s": 50, "reserve": "4GiB"},
        {"kind": "ssd", "gb_per_s": 3}]}))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(catalog.MODELS["qwen3-30b-a3b"]))
    rc = trace_main(["estimate", "--model", str(model_dir), "--machine", str(machine), "--bits", "Q4_K",
                     "--u", "3000", "--d", "300", "--ram", "8GiB", "--sweep", "--points", "5", "--json"])
    data = _last_json(capsys.readouterr().out)
    assert rc == 0 and data["machine"]["name"] == "box" and len(data["sweep"]) >= 4
    assert data["sweep"][-1]["chunk_reads_per_token"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--machine", "nope", "--u", "1", "--d", "1"], "--machine"),
    (["--machine", "rtx3090-128g"], "routing statistics"),
    (["--machine", "rtx3090-128g", "--u", "5", "--d", "9"], "D <= U"),
    (["--machine", "rtx3090-128g", "--u", "5", "--d", "1", "--ram", "many"], "--ram"),
    (["--machine", "rtx3090-128g", "--trace", "/nonexistent.npz"], "no such trace"),
])
def test_cli_bad_input_gets_a_clear_error(argv, message, capsys):
    rc = trace_main(["estimate", "--model", "glm-5", *argv])
    assert rc == 2 and message in capsys.readouterr().err


def test_bad_machine_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tiers": [{"kind": "ram", "size": "8GiB", "gb_per_s": 10}]}))
    with pytest.raises(ValueError, match="exactly one 'ssd'"):
        load_machine(str(bad))
    bad.write_text(json.dumps({"tiers": [{"kind": "tape", "gb_per_s": 1}]}))
    with pytest.raises(ValueError, match="tape"):
        load_machine(str(bad))


def test_plot_writes_png_or_says_matplotlib_is_missing(tmp_path, monkeypatch):
    m = load_model_spec("qwen3-30b-a3b")
    sweep = memory_sweep(m, Quantization.parse("Q4_K"), load_machine("ddr5-96g-cpu"),
                         [8 * GiB, 16 * GiB], routing=ChunkRouting(3000, 300))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install matplotlib"):
            plot_sweep(sweep, tmp_path / "x.png")
    else:
        path = plot_sweep(sweep, tmp_path / "x.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match=r'pip install "golem-moe\[plot\]" \(or pip install matplotlib\)'):
        plot_sweep(sweep, tmp_path / "y.png")


# -------------------------------------------------------------- one sizing model, one planner


def test_placement_is_the_planners_plan_for_the_same_budget():
    """The estimator places experts exactly as golem-run --memory-budget would."""
    from golem.runtime.analysis.plan import plan_memory
    from golem.runtime.analysis.placement import routing_stats_for

    m, q = load_model_spec("qwen3-30b-a3b"), Quantization.parse("Q4_K")
    memory = m.memory(q)
    assert memory.layer_ids == m.moe_layers and memory.nbytes_of(0) == q.expert_nbytes(m)
    assert memory.non_expert_nbytes == q.non_expert_nbytes(m)
    trace = _synthetic_trace(layers=m.num_moe_layers, experts=m.num_experts, top_k=m.top_k, steps=300)
    stats = routing_stats_for(m, [trace])
    for budget in (int(10.5 * GiB), 14 * GiB, 30 * GiB):
        mach = MachineSpec.from_dict({"tiers": [
            {"kind": "ram", "size": budget + 2 * GiB, "reserve": 2 * GiB, "gb_per_s": 50},
            {"kind": "ssd", "gb_per_s": 5}]})
        for pins in ([], [0, 1, 2], [40, 47]):
            planned = plan_memory(memory, budget_nbytes=budget, pin_layers=pins)
            placed = plan_placement(m, q, mach, pin_layers=pins)
            assert list(placed.slots) == planned.cache_sizes
            assert placed.plan.cache_sizes == planned.cache_sizes
            assert set(placed.cache_pinned) == set(planned.pinned_positions)
            by_curves = plan_placement(m, q, mach, pin_layers=pins, stats=stats)
            assert list(by_curves.slots) == plan_memory(memory, budget_nbytes=budget, pin_layers=pins,
                                                        stats=stats).cache_sizes


def test_pinned_ranges_name_decoder_layers():
    m, q = load_model_spec("deepseek-v3"), Quantization.parse("Q4_K")  # layers 0-2 are dense
    mach = load_machine("ddr5-96g-cpu").with_memory(400 * GiB)
    pl = plan_placement(m, q, mach, pin_layers=[3, 4])
    assert pl.cache_pinned[:2] == (0, 1) and pl.slots[0] == m.num_experts
    with pytest.raises(ValueError, match="not an MoE layer"):
        plan_placement(m, q, mach, pin_layers=[1])


def test_below_top_k_budgets_are_marked():
    m, q = _model(layers=4, experts=16, top_k=4), Quantization.parse("F16")
    mach = _cpu_machine(q.non_expert_nbytes(m) + 4 * 2 * q.expert_nbytes(m))
    pl = plan_placement(m, q, mach)
    assert pl.below_top_k and pl.slots == (2,) * 4
    assert not plan_placement(m, q, _cpu_machine(q.non_expert_nbytes(m) + 4 * 4 * q.expert_nbytes(m))).below_top_k


def test_curves_of_another_model_are_mapped_by_share():
    from golem.runtime.analysis.placement import routing_stats_for

    trace = _synthetic_trace()  # 4 layers x 16 experts, top-2
    big = _model(layers=8, experts=64, top_k=4)
    stats = routing_stats_for(big, [trace])
    assert stats.curves.shape == (8, 65)
    # 36 of 64 slots stand for 9 of 16 traced slots; the traced miss ratio scales to top-4 requests
    per_request = _lru_reads(trace.experts[:, :1], 9) / (trace.num_steps * 2)
    assert stats.curves[0, 36] == pytest.approx(4 * per_request)
    cold = _lru_reads(trace.experts[:, :1], 16) / (trace.num_steps * 2)  # first uses only
    assert stats.curves[0, 64] == pytest.approx(4 * cold)


def test_cli_curves_plan_and_pin_ranges(tmp_path, capsys):
    path = tmp_path / "t.npz"
    save_trace(path, _synthetic_trace())
    rc = trace_main(["estimate", "--model", "olmoe-1b-7b", "--machine", "ddr5-96g-cpu", "--trace", str(path),
                     "--ram", "8GiB", "--plan", "curves", "-f", "0-1", "--json"])
    data = _last_json(capsys.readouterr().out)
    assert rc == 0 and data["placement"]["cache_pinned_layers"].startswith("0-1")
    assert data["traces"] == [str(path)]


def test_cli_plot_without_matplotlib_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = trace_main(["estimate", "--model", "glm-5", "--machine", "rtx3090-128g", "--u", "5", "--d", "1",
                     "--plot", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and 'needs matplotlib: pip install "golem-moe[plot]"' in err


def test_pin_layers_is_never_a_count():
    m, q = load_model_spec("glm-5"), MIXED
    with pytest.raises(ValueError, match="not 4"):
        estimate(m, q, load_machine("rtx3090-128g"), routing=STUDY, pin_layers=4)
