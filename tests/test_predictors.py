"""Predictors: selection, oracles, history predictors, router lookahead, capture, replay, CLI."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from test_routers import CONFIGS, _Probe, build_model

from golem.predictors import (
    Frequency,
    Lookahead,
    NoisyOracle,
    Oracle,
    Predictor,
    Previous,
    Probe,
    RoutingShape,
    Selection,
    Transition,
    find_moe_blocks,
    make_predictor,
    predictor_names,
    replay,
)
from golem.runtime.analysis.capture import LAYER_INPUT_ARRAY, RoutingCapture, save_capture
from golem.runtime.trace import Trace
from golem.runtime.cli.trace import main as trace_main


def make_trace(experts: np.ndarray, seq_offsets, num_experts: int, weights=None) -> Trace:
    n, layers, k = experts.shape
    if weights is None:
        weights = np.tile(np.linspace(1.0, 0.5, k, dtype=np.float32), (n, layers, 1))
    meta = {"num_layers": layers, "num_experts": num_experts, "top_k": k, "expert_bytes": 1000}
    return Trace(experts.astype(np.int16), weights.astype(np.float32), np.asarray(seq_offsets, np.int64), meta)


def random_trace(steps=400, layers=6, experts=16, k=4, seqs=4, seed=0) -> Trace:
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((steps, layers, experts)), axis=-1)[..., :k]
    return make_trace(ids, np.linspace(0, steps, seqs + 1).astype(int), experts)


# ---------------------------------------------------------------- selection


def test_selection_threshold_order_and_count_cap():
    scores = np.array([[0.2, 0.9, 0.0, 0.4], [0.95, 0.3, 0.3, 0.1]], np.float32)
    sel = Selection(threshold=0.3)
    assert sel.select(scores, [5, 6]) == [(5, 1, pytest.approx(0.9)), (5, 3, pytest.approx(0.4)),
                                          (6, 0, pytest.approx(0.95)), (6, 1, pytest.approx(0.3)),
                                          (6, 2, pytest.approx(0.3))]
    capped = Selection(threshold=0.3, max_experts=3).select(scores, [5, 6])
    # nearer position first even though position 6 holds the best score
    assert [(c.position, c.expert) for c in capped] == [(5, 1), (5, 3), (6, 0)]
    # a zero score is never a candidate, even at threshold 0
    assert not Selection(threshold=0.0).mask(scores)[0, 2]


def test_selection_byte_cap_and_exclude():
    scores = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    sel = Selection(threshold=0.1, max_nbytes=2500, expert_nbytes=1000)
    assert sel.limit == 2
    exclude = np.array([[True, False, False, False]])
    # the resident expert 0 is skipped and does not use up the cap
    assert [c.expert for c in sel.select(scores, [3], exclude)] == [1, 2]
    with pytest.raises(ValueError, match="threshold"):
        Selection(threshold=1.5)
    with pytest.raises(ValueError, match="expert_nbytes"):
        Selection(max_nbytes=10)


# ---------------------------------------------------------------- oracles and replay


def test_oracle_recall_is_one():
    trace = random_trace()
    L = trace.num_layers
    (row,) = replay(trace, Oracle(trace), depth=0, nearest=0, thresholds=[0.5])
    assert row.recall == 1.0 and row.precision == 1.0
    for r in replay(trace, Oracle(trace), depth=3, thresholds=[0.1, 0.9]):
        assert r.recall_covered == 1.0 and r.precision == 1.0
        # layers below the depth had nothing to predict from
        assert r.recall == pytest.approx((L - r.depth) / L)


@pytest.mark.parametrize("recall,fpr", [(0.7, 0.0), (0.35, 0.05)])
def test_noisy_oracle_hits_requested_recall(recall, fpr):
    trace = random_trace(steps=1200, layers=8, experts=32, k=6)
    rows = replay(trace, NoisyOracle(trace, recall, fpr, seed=3), depth=2, thresholds=[0.5])
    for r in rows:
        assert abs(r.recall_covered - recall) <= 0.01 * recall
        negatives = r.covered_layer_steps * (32 - 6)
        assert (r.predicted - r.hits) / negatives == pytest.approx(fpr, abs=0.005)


def test_oracle_reports_running_past_its_trace():
    trace = random_trace(steps=8, seqs=1)
    o = Oracle(trace)
    o.begin_sequence()
    for _ in range(8):
        o.begin_step()
    with pytest.raises(ValueError, match="has only 8 steps"):
        o.begin_step()


class _FixedGuess(Predictor):
    """Always predicts expert 0 with score 0.6 and expert 1 with 0.2."""

    name = "fixed"

    def predict(self, position, targets):
        out = self.zeros(targets)
        out[:, 0], out[:, 1] = 0.6, 0.2
        return out


def test_replay_counts_by_the_definition():
    # 3 steps x 3 layers, top-1 of 4; expert 0 used at (t0,l1), (t1,l2), (t2,l0), (t2,l1)
    experts = np.array([[[2], [0], [3]], [[1], [2], [0]], [[0], [0], [1]]])
    trace = make_trace(experts, [0, 3], 4)
    rows = replay(trace, _FixedGuess(RoutingShape(3, 4, 1)), depth=1, thresholds=[0.1, 0.5])
    low, high = rows
    # depth 1: targets are layers 1 and 2 of each step; true experts there: 6, expert 0 at 3 of them
    assert (high.hits, high.predicted, high.true_experts, high.covered_experts) == (3, 6, 9, 6)
    assert high.recall == pytest.approx(3 / 9) and high.recall_covered == pytest.approx(0.5)
    assert high.precision == pytest.approx(0.5) and high.wasted_per_useful == pytest.approx(1.0)
    # at 0.1 expert 1 counts too: used at (t2, l2)
    assert (low.hits, low.predicted) == (4, 12) and low.predicted_per_layer == pytest.approx(2.0)
    # the single best guess is expert 0
    *_, top1 = replay(trace, _FixedGuess(RoutingShape(3, 4, 1)), depth=1, thresholds=[0.5], best=1)
    assert (top1.best, top1.hits, top1.predicted) == (1, 3, 6)
    *_, topk = replay(trace, Oracle(trace), depth=1, thresholds=[0.5], best=1)
    assert topk.recall_covered == 1.0


# ---------------------------------------------------------------- history predictors


def test_previous_forgets_history_at_each_sequence():
    # every step of a sequence routes alike; sequences differ
    steps, seqs = 5, 3
    base = np.array([[0, 1], [2, 3], [4, 5]])
    experts = np.concatenate([np.tile((base + 6 * s)[None], (steps, 1, 1)) for s in range(seqs)])
    trace = make_trace(experts, [0, 5, 10, 15], 24)
    (row,) = replay(trace, Previous(RoutingShape.of(trace)), depth=1, thresholds=[0.3])
    # nothing at each sequence's first step, everything afterwards
    assert row.hits == seqs * (steps - 1) * 2 * 2
    assert row.precision == 1.0


def _replayed(predictor, trace):
    replay(trace, predictor, depth=3, thresholds=[0.5])
    return predictor


def test_fitting_equals_learning_online():
    trace = random_trace(steps=300, seed=4)
    shape = RoutingShape.of(trace)
    fitted = Previous(shape).fit([trace])
    online = _replayed(Previous(shape), trace)
    np.testing.assert_allclose(fitted.reused, online.reused)
    np.testing.assert_allclose(fitted.seen, online.seen)
    fitted = Frequency(shape).fit([trace])
    online = _replayed(Frequency(shape), trace)
    np.testing.assert_allclose(fitted.counts, online.counts)
    fitted = Transition(shape).fit([trace])
    online = _replayed(Transition(shape), trace)
    np.testing.assert_allclose(fitted.pairs, online.pairs)
    np.testing.assert_allclose(fitted.counts, online.counts)


def test_transition_learns_a_layer_to_layer_mapping():
    # layer l+1 uses perm[e] for each expert e of layer l: fully predictable from layer l
    rng = np.random.default_rng(1)
    E, L, k, n = 16, 5, 3, 600
    perm = rng.permutation(E)
    first = np.argsort(rng.random((n, E)), axis=-1)[:, :k]
    layers = [first]
    for _ in range(L - 1):
        layers.append(perm[layers[-1]])
    experts = np.stack(layers, axis=1)
    train, test = make_trace(experts[:400], [0, 400], E), make_trace(experts[400:], [0, 200], E)
    p = Transition(RoutingShape(L, E, k), online=False).fit([train])
    for r in replay(test, p, depth=2, thresholds=[0.5]):
        assert r.recall_covered > 0.99 and r.precision > 0.99
    # frequency knows nothing of the mapping: uniform experts, nothing above 0.5
    (r,) = replay(test, Frequency(RoutingShape(L, E, k)).fit([train]), depth=1, thresholds=[0.5])
    assert r.hits == 0


def test_combination_takes_the_best_member_score():
    trace = random_trace(steps=60, seqs=2)
    shape = RoutingShape.of(trace)
    combo = make_predictor("transition+previous", shape)
    parts = [Transition(shape), Previous(shape)]
    combo.begin_sequence()
    for p in parts:
        p.begin_sequence()
    for t in range(30):
        combo.begin_step()
        for p in parts:
            p.begin_step()
        for position in range(shape.num_layers):
            props = [p.propose(position, 2) for p in [combo, *parts]]
            for p in [combo, *parts]:
                p.observe(position, trace.experts[t, position], trace.weights[t, position])
            got = combo.scores(props[0])
            want = np.maximum(parts[0].scores(props[1]), parts[1].scores(props[2]))
            np.testing.assert_allclose(got, want)


def test_registry_names_and_errors():
    names = predictor_names()
    for name in ("lookahead", "previous", "frequency", "transition", "oracle", "noisy-oracle"):
        assert name in names
    shape = RoutingShape(4, 8, 2)
    with pytest.raises(ValueError, match="unknown predictor 'nope'"):
        make_predictor("nope", shape)
    with pytest.raises(ValueError, match="needs the trace"):
        make_predictor("oracle", shape)
    with pytest.raises(ValueError, match="needs the model"):
        make_predictor("lookahead", shape)


# ---------------------------------------------------------------- capture and lookahead


def _generate(model, capture, prompt_len=5, steps=6, seed=0):
    """Prefill a random prompt, then greedy-decode ``steps`` tokens, one call each."""
    rng = np.random.default_rng(seed)
    cache = make_prompt_cache(model)
    capture.begin_sequence()
    logits = model(mx.array(rng.integers(0, 64, (1, prompt_len))), cache=cache)
    for _ in range(steps):
        token = mx.argmax(logits[:, -1], axis=-1)[:, None]
        logits = model(token, cache=cache)
        mx.eval(logits)


def test_capture_records_the_models_own_routing():
    model = build_model("olmoe")
    blocks = find_moe_blocks(model)
    probes = []
    for b in blocks:
        probe = _Probe(32)
        setattr(b.block, b.experts_attr, probe)
        probes.append(probe)
    capture = RoutingCapture(model)
    with capture:
        _generate(model, capture, prompt_len=5, steps=4)
        _generate(model, capture, prompt_len=3, steps=3, seed=1)
    trace, extras = capture.trace(include_prefill=True)
    assert trace.num_steps == 5 + 4 + 3 + 3
    assert list(trace.seq_offsets) == [0, 9, 15]
    assert trace.prefill.tolist() == [True] * 5 + [False] * 4 + [True] * 3 + [False] * 3
    for b, probe in zip(blocks, probes):
        own = np.concatenate([np.array(i).reshape(-1, i.shape[-1]) for i in probe.seen])
        got = trace.experts[:, b.position]
        assert [set(r) for r in got.tolist()] == [set(r) for r in own.tolist()]
    assert trace.hidden.shape == (15, len(blocks), 32) and extras[LAYER_INPUT_ARRAY].shape == (15, len(blocks), 32)
    assert not np.allclose(trace.hidden, extras[LAYER_INPUT_ARRAY])
    decode, dextras = capture.trace()
    assert decode.num_steps == 7 and list(decode.seq_offsets) == [0, 4, 7]
    assert dextras[LAYER_INPUT_ARRAY].shape[0] == 7
    # detached: the model is stock again
    assert type(blocks[0].layer.post_attention_layernorm).__name__ == "RMSNorm"


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_lookahead_at_depth_zero_is_the_layers_own_routing(family):
    model = build_model(family)
    capture = RoutingCapture(model)
    with capture:
        _generate(model, capture, prompt_len=4, steps=8)
    trace, extras = capture.trace()
    blocks = find_moe_blocks(model)
    (row,) = replay(trace, Lookahead(blocks), depth=0, nearest=0, thresholds=[0.5], hidden=trace.hidden)
    assert row.recall == 1.0 and row.precision == 1.0
    # the layer input misses the layer's attention: not the same routing in general
    rows = replay(trace, Lookahead(blocks, hidden_kind="layer_input"), depth=0, nearest=0,
                  thresholds=[0.5], hidden=extras[LAYER_INPUT_ARRAY])
    assert 0.0 < rows[0].recall <= 1.0


def test_lookahead_proposal_is_lazy_and_applies_the_target_router():
    model = build_model("qwen3_moe")
    blocks = find_moe_blocks(model)
    p = Lookahead(blocks)
    p.begin_sequence()
    p.begin_step()
    h = mx.random.normal((1, 1, 32), key=mx.random.key(5))
    prop = p.propose(0, 2, h)
    assert list(prop.targets) == [1] and len(prop.arrays) == 2  # 2 MoE layers: one target
    assert all(isinstance(a, mx.array) for a in prop.arrays)  # the rows and their ranks, both lazy
    mx.eval(*prop.arrays)
    rows = np.array(prop.arrays[0])
    ranks = np.array(prop.arrays[1])  # ranked on the device, in the caller's one sync
    assert ranks[0].tolist() == np.argsort(np.argsort(-rows[0], kind="stable"), kind="stable").tolist()
    b = blocks[1]
    want = np.array(b.block.gate(b.layer.post_attention_layernorm(h[0])))  # the logits: a softmax keeps their order
    np.testing.assert_allclose(np.array(prop.arrays[0]), want, rtol=1e-5)
    scores = p.scores(prop)
    top = np.argsort(-want[0])[:4]
    # before any observation the calibration is the prior: top-k used, the rest not
    assert set(np.flatnonzero(scores[0] == 1.0)) == set(top) and scores[0].sum() == 4.0
    # observing that the lookahead was wrong lowers the score of those ranks
    p.observe(1, np.array([e for e in range(16) if e not in top][:4]))
    p.begin_step()
    prop = p.propose(0, 1, h)
    assert p.scores(prop)[0, top].max() < 1.0


def test_rank_calibration_counts_each_rank_per_target_and_distance():
    """A score is ``(hits + prior) / (seen + prior weight)`` of the expert's rank (ties: the
    lower id first) at its target and distance; a NaN row proposes nothing and learns nothing."""
    from golem.predictors.base import Proposal, RoutingShape
    from golem.predictors.lookahead import _RankCalibrated

    class Calibrated(_RankCalibrated):
        name = "calibrated"

    p = Calibrated(RoutingShape(3, 6, 2), hidden_kind="post_attn", max_depth=2, online=True, prior_weight=2.0)
    raw = np.array([[0.1, 0.9, 0.5, 0.5, 0.0, 0.3],  # ranks 4 0 1 2 5 3 (2 before 3: a tie)
                    [np.nan] * 6], np.float32)
    proposal = Proposal(0, range(1, 3), (mx.array(raw),))
    p.begin_step()
    first = p.scores(proposal)
    assert first[0].tolist() == [0, 1, 1, 0, 0, 0] and first[1].tolist() == [0] * 6  # the prior: top-2
    p.observe(1, np.array([[3, 0]]))  # ranks 2 and 4 were used at distance 1
    p.observe(2, np.array([[1, 2]]))  # nothing was proposed for it: nothing learned
    p.begin_step()
    second = p.scores(proposal)
    np.testing.assert_allclose(second[0], [1 / 3, 2 / 3, 2 / 3, 1 / 3, 0, 0], rtol=1e-6)
    assert second[1].tolist() == [0] * 6
    assert p.seen[1].tolist() == [2.0, 3.0, 2.0] and p.seen[2].tolist() == [2.0, 2.0, 2.0]


def test_ranks_made_on_the_device_equal_the_host_sort():
    """The ranks a proposal carries (computed in the engine's sync) are the ones the host's
    sort gives: ties to the lower id, NaN last, an all-NaN row marked -1; scores are the same
    with them or without."""
    from golem.predictors.base import Proposal, RoutingShape
    from golem.predictors.lookahead import _RankCalibrated, device_ranks, host_ranks

    rng = np.random.default_rng(3)
    for trial in range(40):
        raw = (rng.integers(0, 4, (3, 12)) if trial % 2 else rng.normal(size=(3, 12))).astype(np.float32)
        if trial % 3 == 0:
            raw[1] = np.nan
        if trial % 4 == 0:
            raw[2, rng.choice(12, 4, replace=False)] = np.nan
        np.testing.assert_array_equal(np.array(device_ranks(mx.array(raw))), host_ranks(raw))
        if not np.isnan(raw).any():  # a router's rows: the two sorts alone
            np.testing.assert_array_equal(np.array(device_ranks(mx.array(raw), nan_rows=False)), host_ranks(raw))
    assert host_ranks(np.array([[0.5, 0.9, 0.5, np.nan]], np.float32)).tolist() == [[1, 0, 2, 3]]

    class Calibrated(_RankCalibrated):
        name = "calibrated"

    made = [Calibrated(RoutingShape(3, 12, 2), hidden_kind="post_attn", max_depth=2, online=True,
                       prior_weight=2.0) for _ in range(2)]
    rows = mx.array(raw[:2])
    for p in made:
        p.begin_step()
    by_device = made[0].scores(Proposal(0, range(1, 3), (rows, device_ranks(rows))))
    by_host = made[1].scores(Proposal(0, range(1, 3), (rows,)))
    np.testing.assert_array_equal(by_device, by_host)
    np.testing.assert_array_equal(made[0]._pending, made[1]._pending)


def _linear_routing_trace(steps, hidden_seed, layers=4, experts=12, k=3, dim=24):
    """Routing of layer l+1 = top-k of a fixed linear map of layer l's hidden state."""
    maps = np.random.default_rng(0).normal(size=(layers, dim, experts))
    rng = np.random.default_rng(hidden_seed)
    hidden = rng.normal(size=(steps, layers, dim)).astype(np.float32)
    ids = np.zeros((steps, layers, k), np.int64)
    ids[:, 0] = np.argsort(-rng.random((steps, experts)), axis=-1)[:, :k]
    for position in range(1, layers):
        logits = np.einsum("nd,de->ne", hidden[:, position - 1], maps[position])
        ids[:, position] = np.argsort(-logits, axis=-1)[:, :k]
    trace = make_trace(ids, [0, steps], experts)
    trace.hidden = hidden
    trace.meta["hidden_kind"] = "post_attn"
    return trace


def test_probe_learns_a_linear_lookahead():
    train, test = _linear_routing_trace(1500, hidden_seed=1), _linear_routing_trace(300, hidden_seed=2)
    shape = RoutingShape.of(train)
    unfitted = replay(test, Probe(shape), depth=1, thresholds=[0.1], hidden=test.hidden)
    assert unfitted[0].predicted == 0
    fitted = Probe(shape).fit([train])
    *_, top = replay(test, fitted, depth=1, thresholds=[0.5], hidden=test.hidden, best=3)
    assert top.recall_covered > 0.85
    with pytest.raises(ValueError, match="probe needs layer_input hidden states"):
        Probe(shape, hidden_kind="layer_input").fit([train])


# ---------------------------------------------------------------- CLI


def test_cli_list_json_and_errors(tmp_path, capsys):
    assert trace_main(["predict", "--list"]) == 0
    assert capsys.readouterr().out.split() == predictor_names()

    train, test = random_trace(seed=1), random_trace(seed=2)
    save_capture(tmp_path / "train.npz", train)
    save_capture(tmp_path / "test.npz", test)
    rc = trace_main(["predict", str(tmp_path / "test.npz"), "--predictor", "transition", "--train",
                     str(tmp_path / "train.npz"), "--depth", "2", "--threshold", "0.3", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("predictor", "depth", "threshold", "recall", "precision", "predicted_per_layer", "wasted_per_useful"):
        assert key in out
    assert (out["predictor"], out["depth"], out["threshold"]) == ("transition", 2, 0.3)
    assert [(r["depth"], r["threshold"]) for r in out["rows"]] == [(1, 0.3), (2, 0.3)]

    rc = trace_main(["predict", str(tmp_path / "test.npz"), "--predictor", "oracle", "--depth", "0", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["recall"] == 1.0
    rc = trace_main(["predict", str(tmp_path / "test.npz"), "--predictor", "noisy-oracle", "--recall", "0.5",
                     "--depth", "1", "--best", "4", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and [r["best"] for r in out["rows"]] == [None, None, None, 4]

    assert trace_main(["predict", str(tmp_path / "test.npz"), "--predictor", "bogus"]) == 2
    assert "unknown predictor 'bogus'" in capsys.readouterr().err
    assert trace_main(["predict", str(tmp_path / "missing.npz")]) == 2
    assert "no such trace file" in capsys.readouterr().err
    assert trace_main(["predict", str(tmp_path / "test.npz"), "--threshold", "2"]) == 2
    assert "--threshold" in capsys.readouterr().err


def test_cli_lookahead_from_a_model_folder(tmp_path, capsys):
    model = build_model("mixtral")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIGS["mixtral"]))
    model.save_weights(str(folder / "model.safetensors"))
    for hidden in (True, False):
        capture = RoutingCapture(model, hidden=hidden)
        with capture:
            _generate(model, capture, steps=4)
        save_capture(tmp_path / f"h{hidden}.npz", *capture.trace())
    args = ["predict", "--predictor", "lookahead", "--model", str(folder), "--depth", "0", "--json"]
    assert trace_main(["predict", str(tmp_path / "hTrue.npz"), *args[1:]]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["recall"] == 1.0
    assert trace_main(["predict", str(tmp_path / "hTrue.npz"), *args[1:], "--hidden-kind", "layer_input"]) == 0
    capsys.readouterr()
    assert trace_main(["predict", str(tmp_path / "hFalse.npz"), *args[1:]]) == 2
    assert "does not record" in capsys.readouterr().err
    assert trace_main(["predict", str(tmp_path / "hTrue.npz"), "--predictor", "lookahead"]) == 2
    assert "needs --model DIR" in capsys.readouterr().err
