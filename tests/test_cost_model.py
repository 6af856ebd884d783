"""Cost models: fits recover known coefficients, the paper's padded-vs-unpadded ranking, JSON, a10_paper."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from carajax.sched import cost_model as cm
from carajax.sched.a10_model import a10_first_principles
from carajax.sched.cost_model import Batch, CostModel, PaddedForm, RichForm, UnpaddedForm

A10_PATH = os.path.join(os.path.dirname(__file__), "..", "data", "cost_models", "a10_paper.json")
RANKS = (0, 8, 16, 32, 64, 128)


def _random_batches(rng: np.random.Generator, n: int, phase: str = "decode") -> list[Batch]:
    out = []
    for _ in range(n):
        size = int(rng.integers(1, 33))
        ranks = tuple(int(r) for r in rng.choice(RANKS, size=size))
        tokens = size if phase == "decode" else int(rng.integers(size, 2048))
        out.append(Batch(ranks, tokens, int(rng.integers(0, 512 * size))))
    return out


def _noisy(rng: np.random.Generator, clean: np.ndarray, rel: float = 0.02) -> np.ndarray:
    return clean * (1.0 + rel * rng.standard_normal(clean.shape))


@pytest.mark.parametrize(
    ("form", "true"),
    [(PaddedForm, (2e-5, 3e-3)), (UnpaddedForm, (3e-5, 5e-3))],
)
def test_fit_recovers_paper_forms(form, true):
    rng = np.random.default_rng(0)
    batches = _random_batches(rng, 400)
    seconds = _noisy(rng, form(true).predict_many(batches))
    tr, te = cm.train_test_split(len(batches), 0.8, seed=1)
    model = cm.fit(form.name, [batches[i] for i in tr], seconds[tr])
    assert isinstance(model, form)
    np.testing.assert_allclose(model.coef, true, rtol=0.05)
    metrics = cm.evaluate(model, [batches[i] for i in te], seconds[te])
    assert metrics["r2"] > 0.95
    assert metrics["mape"] < 0.03  # 2% Gaussian noise -> E|err| ~ 1.6%


def test_fit_recovers_rich_form():
    rng = np.random.default_rng(2)
    # Decode makes tokens == |S| and tokens*mean_rank == sum(rank) (collinear), so recover from prefill.
    batches = _random_batches(rng, 600, phase="prefill")
    true = RichForm((1.5e-4, 2e-8, 8e-7, 0.0, 3e-6, 0.0, 5e-3))
    seconds = _noisy(rng, true.predict_many(batches), rel=0.01)
    model = cm.fit("rich", batches, seconds)
    # The large terms (tokens, context, padded reads, fixed) come back within 5%; zeros stay near zero.
    for i in (0, 2, 4, 6):
        assert model.coef[i] == pytest.approx(true.coef[i], rel=0.05), RichForm.feature_names[i]
    assert model.coef[3] < 0.05 * 1e-3 and model.coef[5] < 0.05 * 3e-6
    assert cm.evaluate(model, batches, seconds)["r2"] > 0.99


def test_rich_coefficients_nonnegative_and_monotone_in_tokens():
    rng = np.random.default_rng(3)
    batches = _random_batches(rng, 300, phase="prefill")
    # A truth with a *negative* per-request term: unconstrained least squares would return it and
    # predictions could fall as batches grow; NNLS must clip it to >= 0.
    feats = RichForm.feature_matrix(batches)
    seconds = feats @ np.array([1e-4, 1e-8, 1e-6, -2e-4, 2e-6, 1e-6, 1e-2])
    assert np.all(seconds > 0)
    model = cm.fit("rich", batches, _noisy(rng, seconds))
    assert all(c >= 0 for c in model.coef)
    ranks = (8, 64, 16)
    preds = model.predict_many([Batch(ranks, t, 1000) for t in range(3, 4096, 97)])
    assert np.all(np.diff(preds) >= 0)
    assert preds[-1] > preds[0]


def test_nnls_matches_known_solution():
    # min ||a x - b|| with x >= 0: the unconstrained optimum has x2 < 0; the constrained one sets
    # x2 = 0 and then x1 = <a1, b> / <a1, a1> = (1*1 + 1*0 + 1*2) / 3 = 1.
    a = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 0.0]])
    b = np.array([1.0, 0.0, 2.0])
    x = cm.nnls(a, b)
    unconstrained = np.linalg.lstsq(a, b, rcond=None)[0]
    assert unconstrained[1] < 0
    np.testing.assert_allclose(x, [1.0, 0.0], atol=1e-12)


def test_padded_and_unpadded_rank_placements_in_opposite_orders():
    """Fig. 5's point: which worker is cheaper depends on the kernel's cost form.

    Worker A runs one rank-64 request; worker B runs six rank-8 requests. A rank-64 request arrives.
    The router prices each worker's decode step *after* placement, Dec(batch + r) (the SLO check):
      padded   (alpha * |S| * max_rank): A -> 2 * 64 = 128 alpha;  B -> 7 * 64 = 448 alpha => A is cheaper
      unpadded (alpha * sum(rank)):      A -> 64 + 64 = 128 alpha;  B -> 6*8 + 64 = 112 alpha => B is cheaper
    Padding drags B's six small requests up to rank 64; without padding B's small ranks are cheap."""
    alpha, beta = 2e-5, 3e-3
    padded, unpadded = PaddedForm((alpha, beta)), UnpaddedForm((alpha, beta))
    a, b = Batch((64,), 1), Batch((8,) * 6, 6)
    a_new, b_new = a.add(64), b.add(64)
    assert padded.predict(a_new) == pytest.approx(128 * alpha + beta)
    assert padded.predict(b_new) == pytest.approx(448 * alpha + beta)
    assert unpadded.predict(a_new) == pytest.approx(128 * alpha + beta)
    assert unpadded.predict(b_new) == pytest.approx(112 * alpha + beta)
    assert padded.predict(a_new) < padded.predict(b_new)
    assert unpadded.predict(b_new) < unpadded.predict(a_new)
    # The marginal cost Dec(batch + r) - Dec(batch) also differs: padded 64 vs 400 alpha, unpadded 64 vs 64.
    assert padded.predict(b_new) - padded.predict(b) == pytest.approx(400 * alpha)
    assert unpadded.predict(b_new) - unpadded.predict(b) == pytest.approx(64 * alpha)


def _measurements(rng, kernel, n=300):
    true = {"prefill": PaddedForm((1e-6, 4e-3)), "decode": PaddedForm((2e-5, 2e-2))}
    rows = []
    for phase in cm.PHASES:
        for b in _random_batches(rng, n, phase):
            t = float(true[phase].predict(b) * (1 + 0.02 * rng.standard_normal()))
            rows.append(
                {
                    "phase": phase,
                    "ranks": list(b.ranks),
                    "tokens": b.tokens,
                    "context": b.context,
                    "kernel": kernel,
                    "seconds": t,
                }
            )
    return rows


def test_fit_cost_model_and_report_from_measurements():
    rng = np.random.default_rng(4)
    rows = _measurements(rng, "padded")
    report = cm.fit_report(rows, form="padded", seed=0)
    for phase in cm.PHASES:
        assert report[phase]["n_train"] == 240 and report[phase]["n_test"] == 60
        assert report[phase]["r2"] > 0.95 and report[phase]["mape"] < 0.03
    model = cm.fit_cost_model(rows, form="padded", device="cpu", source="synthetic")
    assert model.kernel == "padded" and model.device == "cpu"
    assert model.decode.coef == pytest.approx((2e-5, 2e-2), rel=0.05)
    with pytest.raises(ValueError, match="mix kernels"):
        cm.fit_cost_model(rows + _measurements(rng, "unpadded", 5))
    # Rich form fits the same data at least as well on held-out rows (it contains the padded features).
    rich = cm.fit_report(rows, form="rich", seed=0)
    assert rich["decode"]["r2"] > 0.95


def test_json_round_trip_identical_predictions(tmp_path):
    rng = np.random.default_rng(5)
    model = cm.fit_cost_model(
        _measurements(rng, "unpadded", 100),
        form="rich",
        source="synthetic",
        date="today",
        load_time=((16, 0.01), (64, 0.03)),
        load_bytes_per_rank=1000.0,
    )
    path = tmp_path / "m.json"
    model.save(path)
    back = cm.load(path)
    assert back == model
    batches = _random_batches(rng, 50)
    np.testing.assert_array_equal(back.decode.predict_many(batches), model.decode.predict_many(batches))
    np.testing.assert_array_equal(back.prefill.predict_many(batches), model.prefill.predict_many(batches))
    assert back.load_seconds(40) == model.load_seconds(40) == pytest.approx(0.02)
    d = json.loads(path.read_text())
    d["decode"]["feature_names"] = d["decode"]["feature_names"][::-1]
    with pytest.raises(ValueError, match="feature names"):
        CostModel.from_json(json.dumps(d))


def test_a10_paper_model_is_plausible():
    model = cm.load(A10_PATH)
    assert model == a10_first_principles("padded")  # the file is exactly what the derivation writes
    assert "2401.11240" in model.source and "not measured" in model.source
    # Batch 8 at rank 64, 512 tokens of context each: ~22.5 ms weights + 1.4 ms compute + 3.6 ms KV
    # + 8*64 * 3.5 us LoRA reads = ~29 ms.
    t = model.decode_time(Batch((64,) * 8, 8, 8 * 512))
    assert 15e-3 < t < 60e-3
    assert model.decode_time(Batch((), 0)) == pytest.approx(13.48e9 / 600e9, rel=0.01)
    # 512-token prefill: 512 * 0.18 ms compute dominates -> ~100 ms.
    assert 50e-3 < model.prefill_time(Batch((64,), 512)) < 200e-3
    # Cold-start table: the paper's measured points, linear in between.
    assert model.load_seconds(64) == pytest.approx(20.6e-3)
    assert model.load_seconds(8) == pytest.approx(4.9e-3)
    assert model.load_seconds(96) == pytest.approx((20.6e-3 + 50.7e-3) / 2)
    assert model.load_seconds(256) > model.load_seconds(128) > model.load_seconds(64)
    # A rank-64 q,k,v adapter in bytes (3 modules * 32 layers * 2 * 4096 * 64 * 2 B) prices like rank 64.
    assert model.load_seconds(0, nbytes=3 * 32 * 2 * 4096 * 64 * 2) == pytest.approx(20.6e-3)
    unpadded = a10_first_principles("unpadded")
    b = Batch((8, 8, 8, 64), 4)
    assert unpadded.decode_time(b) < model.decode_time(b)  # padding to 64 costs 4*64 vs 88 rank units


def test_train_test_split_and_plot():
    tr, te = cm.train_test_split(10, 0.8, seed=0)
    assert len(tr) == 8 and len(te) == 2 and set(tr) | set(te) == set(range(10)) and not set(tr) & set(te)
    assert np.array_equal(cm.train_test_split(10, 0.8, seed=0)[0], tr)
    model = PaddedForm((1e-5, 1e-3))
    batches = [Batch((8,), 1), Batch((64, 8), 2)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert cm.plot_predicted_vs_measured(model, batches, [1e-3, 2e-3], "/nonexistent/x.png") is False


# -- the fused step (one forward over every sequence of a step) ----------------------------------------


def _step_rows(rng, true: RichForm, n: int = 120) -> list[dict]:
    """Profiler-shaped rows of all three kinds, timed by `true` with 1% noise: prefill (B chunks of
    T at offset c), decode (B tokens at context c) and mixed (B decodes + one chunk of T)."""
    rows = []
    for phase in cm.STEP_PHASES:
        for _ in range(n):
            b, t, c = int(rng.integers(1, 17)), int(rng.choice([16, 64, 256])), int(rng.integers(0, 1024))
            ranks = tuple(int(r) for r in rng.choice(RANKS, size=b + (phase == "mixed")))
            tokens, context = {"prefill": (b * t, b * (c + t)), "decode": (b, b * (c + 1)),
                               "mixed": (b + t, b * (c + 1) + c + t)}[phase]
            seconds = true.predict(Batch(ranks, tokens, context)) * (1 + 0.01 * rng.standard_normal())
            rows.append({"phase": phase, "kernel": "padded", "ranks": list(ranks), "tokens": tokens,
                         "context": context, "seconds": seconds})
    return rows


def test_fit_recovers_the_step_form_from_every_kind_of_row():
    rng = np.random.default_rng(6)
    true = RichForm((2e-4, 3e-8, 1e-6, 0.0, 4e-6, 0.0, 0.02))
    rows = _step_rows(rng, true)
    model = cm.fit_cost_model(rows, form="rich")
    # tokens, context, |S|*max_rank and the fixed cost come back within 5%; the zeros stay small
    # (under a tenth of their neighbours: decode rows make |S| collinear with tokens, and Σrank
    # overlaps |S|*max_rank).
    for i in (0, 2, 4, 6):
        assert model.step.coef[i] == pytest.approx(true.coef[i], rel=0.05), RichForm.feature_names[i]
    assert model.step.coef[3] < 0.1 * 2e-4 and model.step.coef[5] < 0.1 * 4e-6
    rep = cm.fit_report(rows, form="rich")
    assert rep["step"]["n_train"] + rep["step"]["n_test"] == len(rows) == 360
    assert rep["step"]["r2"] > 0.99 and rep["step"]["mape"] < 0.02  # 1% noise -> E|err| ~ 0.8%
    # Prefill and decode keep their own rows (120 each), as the router prices with them.
    assert rep["prefill"]["n_train"] + rep["prefill"]["n_test"] == 120
    # A profile without mixed rows (the engine before the fused step) gets no step model.
    old = [r for r in rows if r["phase"] != "mixed"]
    assert cm.fit_cost_model(old).step is None and "step" not in cm.fit_report(old)


def test_step_model_json_round_trip_and_files_without_one(tmp_path):
    rng = np.random.default_rng(7)
    model = cm.fit_cost_model(_step_rows(rng, RichForm((2e-4, 0, 1e-6, 0, 4e-6, 0, 0.02)), 40))
    model.save(tmp_path / "m.json")
    back = cm.load(tmp_path / "m.json")
    assert back == model and back.step == model.step
    b = Batch((8, 64, 16), 259, 3000)
    assert back.step_time(b) == model.step.predict(b) > 0
    # A file written before the step model existed: no "step" key -> step None, and asking for it
    # says how to get one.
    d = json.loads((tmp_path / "m.json").read_text())
    del d["step"]
    old = CostModel.from_json(json.dumps(d))
    assert old.step is None and old.decode == model.decode
    assert "step" not in json.loads(old.to_json())  # and it writes back as it was
    with pytest.raises(ValueError, match="carajax profile --fit"):
        old.step_time(b)


def test_a10_step_is_the_decode_form_and_a_mixed_step_costs_less_than_two_forwards():
    model = a10_first_principles("padded")
    assert model.step == model.decode
    # 8 decodes at 512 cached tokens beside one 256-token chunk, all rank 16. Two forwards pay both
    # intercepts; the fused step reads the weights once, so it saves the prefill's 5 ms exactly
    # (every other term adds up across the two batches when the ranks are equal).
    dec = Batch((16,) * 8, 8, 8 * 513)
    pre = Batch((16,), 256, 256)
    merged = Batch(dec.ranks + pre.ranks, dec.tokens + pre.tokens, dec.context + pre.context)
    two = model.prefill_time(pre) + model.decode_time(dec)
    assert model.step_time(merged) == pytest.approx(two - 5e-3, rel=1e-9)
    assert "upper bound" in model.notes and "step" in json.loads(model.to_json())


# -- ShapedForm: what a step's static shape decides (the engine's jnp LoRA forms on CPU) ----------------


def _shaped_truth() -> cm.ShapedForm:
    """Rich terms, a chunk's attention over its own context, a fixed cost for chunk-bearing steps,
    and a per-rank cost above 64 tokens (the CPU engine's blocked LoRA form of a 17-slot engine)."""
    stairs = {k: (8e-5 if k == 64 else 0.0) for k in cm.SHAPE_STEPS}
    return cm.ShapedForm((5e-6, 0.0, 5e-7, 4e-5, 0.0, 2e-6, 2e-3, 4e-8, 2e-3, *stairs.values()))


def test_shaped_features_and_pure_python_prices_agree():
    form = cm.ShapedForm(tuple(float(i + 1) * 1e-6 for i in range(len(cm.ShapedForm.feature_names))))
    assert cm.ShapedForm.feature_names[:7] == RichForm.feature_names  # rich's, then the shape's
    pre, dec = Batch((8, 64), 256, 2 * (256 + 128)), Batch((8, 64, 16), 3, 900)
    f = dict(zip(cm.ShapedForm.feature_names, cm.ShapedForm.features(pre)))
    assert f["tokens_x_context_per_seq"] == 256 * 384  # each chunk token over its sequence's reads
    assert f["has_chunk"] == 1.0
    assert [f[f"max_rank_x_tokens_gt_{k}"] for k in cm.SHAPE_STEPS] == [64.0] * 4 + [0.0] * 3
    g = dict(zip(cm.ShapedForm.feature_names, cm.ShapedForm.features(dec)))
    assert g["has_chunk"] == 0.0 and g["tokens_x_context_per_seq"] == 900  # decode: = context
    assert not any(g[f"max_rank_x_tokens_gt_{k}"] for k in cm.SHAPE_STEPS)
    rng = np.random.default_rng(9)
    for b in [*_random_batches(rng, 50), *_random_batches(rng, 50, "prefill"), Batch((), 0, 0)]:
        assert form.predict(b) == pytest.approx(form.predict_numpy(b), rel=1e-12)
        assert form.py_features(b) == pytest.approx(tuple(form.features(b)), rel=1e-15)
    assert cm.ShapedForm in cm.FORMS.values() and cm.model_from_dict(form.to_dict()) == form


def test_fit_recovers_the_shaped_step_form_where_rich_cannot():
    rng = np.random.default_rng(10)
    true = _shaped_truth()
    rows = _step_rows(rng, true)
    shaped, rich = cm.fit_report(rows, form="shaped")["step"], cm.fit_report(rows, form="rich")["step"]
    assert shaped["r2"] > 0.99 and shaped["mape"] < 0.02
    assert rich["mape"] > 3 * shaped["mape"]  # no rich feature turns a cost on above 64 tokens
    model = cm.fit("shaped", *cm.parse_rows(rows, "step", "padded"))
    stairs = dict(zip(cm.SHAPE_STEPS, model.coef[9:]))
    assert stairs[64] == pytest.approx(8e-5, rel=0.1)  # the step the engine takes, found
    assert sum(stairs.values()) == pytest.approx(8e-5, rel=0.1)


def test_step_form_fits_only_the_step_model_and_round_trips(tmp_path):
    rng = np.random.default_rng(11)
    rows = _step_rows(rng, _shaped_truth(), 40)
    model = cm.fit_cost_model(rows, form="rich", step_form="shaped", model_name="m")
    # The router's views keep the monotone rich form; the simulator's step model is shaped.
    assert isinstance(model.prefill, RichForm) and isinstance(model.decode, RichForm)
    assert isinstance(model.step, cm.ShapedForm) and model.rank_aware
    assert cm.fit_cost_model(rows, form="rich").step.name == "rich"  # default: the same form
    model.save(tmp_path / "m.json")
    back = cm.load(tmp_path / "m.json")
    assert back == model and back.to_json() == model.to_json()
    b = Batch((8, 64, 16), 259, 3000)
    assert back.step_time(b) == model.step.predict(b) > 0
    # Files of the other forms (the committed A10 model: rich) load as before.
    assert isinstance(cm.load(A10_PATH).step, RichForm)
