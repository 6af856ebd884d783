"""The profiler: real engine steps over a tiny grid give well-formed, plausible rows; fits round-trip;
the CLI writes its three files."""

from __future__ import annotations

import dataclasses
import datetime
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from carajax import cli
from carajax.sched import cost_model as cm
from carajax.sched import profiler
from carajax.sched.profiler import ProfileGrid, mix_ranks

# Compilation dominates on CPU (seconds per step variant), so as few variants as give a 32x
# spread in tokens: prefill chunks of 16 and 512, decode, and mixed steps with a 16-token chunk
# only (a 512-token one would compile a 1024-token variant).
TINY = ProfileGrid(batch_sizes=(1,), prompt_tokens=(16, 512), contexts=(0,),
                   rank_mixes=("base", "uniform8", "mixed 8..32"), kernels=("unpadded", "padded"),
                   warmup=1, repeats=3, load_ranks=(8, 32), load_repeats=2, mixed_prompt_tokens=(16,))


@pytest.fixture(scope="module")
def doc():
    return profiler.profile("llama-test", TINY, progress=False)


def test_mix_ranks():
    assert mix_ranks("base", 3) == (0, 0, 0)
    assert mix_ranks("uniform16", 2) == (16, 16)
    assert mix_ranks("mixed 8..64", 6) == (64, 32, 16, 8, 64, 32)
    assert mix_ranks("mixed8..8", 2) == (8, 8)
    for bad in ("uniform", "mixed 9..15", "zipf"):
        with pytest.raises(ValueError):
            mix_ranks(bad, 2)
    with pytest.raises(ValueError):
        ProfileGrid(rank_mixes=("nope",))
    with pytest.raises(ValueError):
        ProfileGrid(warmup=0)  # the first run compiles: it must never be timed
    with pytest.raises(ValueError):
        ProfileGrid(kernels=("bgmv",))
    with pytest.raises(ValueError):
        ProfileGrid(seq_len=100, contexts=(64,), prompt_tokens=(64,))
    with pytest.raises(ValueError):  # the mixed points' chunk must fit too
        ProfileGrid(seq_len=100, contexts=(32,), prompt_tokens=(16,), mixed_prompt_tokens=(96,))
    with pytest.raises(ValueError):
        ProfileGrid(mixed_prompt_tokens=(0,))
    grid = ProfileGrid(batch_sizes=(1, 2), prompt_tokens=(16, 64), contexts=(0,), rank_mixes=("base",))
    assert [p for p in grid.points() if p[0] == "mixed"] == [
        ("mixed", "base", b, t, 0) for b in (1, 2) for t in (16, 64)]
    assert not any(p[0] == "mixed" for p in dataclasses.replace(grid, mixed_prompt_tokens=()).points())
    assert ProfileGrid(rank_mixes=("uniform8", "mixed 8..128"), load_ranks=(8,)).max_rank == 128


def test_time_interleaved_counts_and_blocks():
    import time

    calls = []

    def fn(i, sleep):
        def call():
            calls.append(i)
            time.sleep(sleep)
            return np.zeros(1)
        return call

    ticks = []
    times = profiler.time_interleaved([fn(0, 0.0), fn(1, 0.02)], warmup=2, repeats=3,
                                      tick=lambda: ticks.append(1))
    assert calls[:4] == [0, 0, 1, 1] and sorted(calls[4:]) == [0, 0, 0, 1, 1, 1]
    assert len(ticks) == 10 and [len(t) for t in times] == [3, 3]
    assert min(times[1]) >= 0.02 > max(times[0])


def test_every_grid_point_measured_once(doc):
    rows = doc["measurements"]
    # On CPU the references ignore the kernel mode: one mode is profiled, and said to be.
    assert doc["metadata"]["lora_impl"] == "reference"
    assert doc["metadata"]["kernels_profiled"] == ["padded"]
    assert any("ignores lora_kernel" in n for n in doc["metadata"]["notes"])
    got = sorted((r["phase"], r["mix"], r["batch_size"], r["chunk"], r["context_per_request"])
                 for r in rows)
    assert got == sorted(TINY.points())
    assert {r["phase"] for r in rows} == {"prefill", "decode", "mixed"}
    for r in rows:
        assert r["kernel"] == "padded" and r["impl"] == "reference"
        assert len(r["repeats"]) == TINY.repeats and all(t > 0 for t in r["repeats"])
        assert r["seconds"] == statistics.median(r["repeats"])
        b, t, c = r["batch_size"], r["chunk"], r["context_per_request"]
        if r["phase"] == "mixed":  # b decodes and one more request's chunk, the mix's next rank
            assert tuple(r["ranks"]) == mix_ranks(r["mix"], b + 1)
            assert r["tokens"] == b + t and r["context"] == b * max(c + 1, 2) + c + t
        else:
            assert tuple(r["ranks"]) == mix_ranks(r["mix"], b)
            assert r["tokens"] == b * t
            per_row = c + (t if r["phase"] == "prefill" else 1)
            assert r["context"] == b * max(per_row, 2 if r["phase"] == "decode" else 0)


def test_base_rows_run_the_lora_variant():
    """As in serving with adapters registered: the profiler's engine is never LoRA-free."""
    from carajax.config import ModelConfig
    from carajax.engine.engine import Engine
    from carajax.models import weights

    model = weights.random_model(ModelConfig.from_name("llama-test"))
    cfg = profiler.engine_config(TINY, model.config, "float32", "reference", "padded")
    with Engine(model, None, cfg) as engine:
        profiler._Session(engine, {}, seed=0)
        assert engine.runner._use_lora(np.full(4, -1, np.int32))  # an all-base batch


def test_mixed_rows_describe_the_schedule_that_ran(monkeypatch):
    """A mixed point is one Schedule: B decodes first, then one prefill chunk; its row's tokens,
    context and ranks are the chunks' lengths, Σ(start + length) and the adapters' ranks."""
    from carajax.config import ModelConfig
    from carajax.engine.engine import Engine
    from carajax.models import weights

    grid = dataclasses.replace(TINY, batch_sizes=(3,), contexts=(40,))
    model = weights.random_model(ModelConfig.from_name("llama-test"))
    cfg = profiler.engine_config(grid, model.config, "float32", "reference", "padded")
    assert cfg.max_batch_size == 4  # 3 decodes + the chunk's request
    with Engine(model, None, cfg) as engine:
        session = profiler._Session(engine, {}, seed=0)
        ran = []
        monkeypatch.setattr(engine.runner, "run", lambda plan, table, cpu: ran.append((plan, table)))
        ranks = mix_ranks("mixed 8..32", 4)  # (32, 16, 8, 32): the chunk's request has rank 32
        session.step("mixed", ranks, 16, 40)()
        (plan, table), = ran
        chunks = plan.chunks
        assert [c.is_decode for c in chunks] == [True, True, True, False]
        assert [(c.start, c.length) for c in chunks] == [(40, 1)] * 3 + [(40, 16)]
        assert sum(c.length for c in chunks) == 3 + 16  # the row's tokens
        assert sum(c.start + c.length for c in chunks) == 3 * 41 + 56  # the row's context
        assert [session.cache[c.request.adapter].rank for c in chunks] == list(ranks)
        assert all(engine.pool.slot(c.request.adapter) >= 0 for c in chunks)  # resident, on the device
        pages = [table(c.request) for c in chunks]  # each request its own KV pages
        assert len({p for ps in pages for p in ps}) == sum(len(ps) for ps in pages)


def test_metadata(doc):
    meta = doc["metadata"]
    assert doc["format"] == profiler.FORMAT
    assert meta["device"]["platform"] == "cpu" and meta["device"]["device_kind"]
    assert meta["host"]["cpu_count"] >= 1 and len(meta["host"]["loadavg_1_5_15_before"]) == 3
    assert datetime.datetime.fromisoformat(meta["date"]).tzinfo is not None
    assert meta["jax_version"] and meta["model_name"] == "llama-test"
    assert meta["model_config"]["hidden_size"] == 64 and meta["dtype"] == "float32"
    assert json.loads(json.dumps(meta["grid"])) == json.loads(json.dumps(dataclasses.asdict(TINY)))
    assert meta["seq_len"] == 1024  # the serving default for llama-test, not a profiling shortcut


def test_load_table(doc):
    loads = doc["load_time"]
    assert [row["rank"] for row in loads] == [8, 32]
    assert all(row["seconds"] > 0 and len(row["repeats"]) == TINY.load_repeats for row in loads)
    assert loads[0]["pages"] == 1 and loads[1]["pages"] == 2
    assert loads[1]["bytes"] == 2 * loads[0]["bytes"]


def test_bigger_steps_measure_slower(doc):
    """32x the prompt tokens (512 vs 16): several times slower on any box (6.5x here); asking only for 2x
    leaves a wide margin for noise. A profiler that timed the asynchronous dispatch instead of
    the work would see about the same time for both."""
    def median(phase, tokens):
        return statistics.median(r["seconds"] for r in doc["measurements"]
                                 if r["phase"] == phase and r["tokens"] == tokens)
    assert median("prefill", 512) > 2 * median("prefill", 16)
    assert median("prefill", 512) > 2 * median("decode", 1)


def test_fit_round_trips(doc, tmp_path):
    path = tmp_path / "profile.json"
    profiler.save_profile(doc, path)
    assert profiler.load_profile(path) == json.loads(json.dumps(doc))
    model = profiler.fit_profile(doc, form="rich")
    assert model.kernel == "padded" and model.source == "profiled by carajax profile"
    assert "cpu" in model.device and model.model_name == "llama-test"
    assert model.date == doc["metadata"]["date"]
    assert [r for r, _ in model.load_time] == [8, 32]
    assert model.load_bytes_per_rank == doc["load_time"][0]["bytes"] / 16  # one 16-rank page
    model.save(tmp_path / "cm.json")
    back = cm.load(tmp_path / "cm.json")
    assert back == model and back.to_json() == model.to_json()
    batch = cm.Batch((8, 8), 256, 256)
    assert back.prefill_time(batch) == model.prefill_time(batch) > 0
    # The fused step model, fitted on every row (mixed ones included).
    assert model.step is not None and back.step_time(batch) == model.step_time(batch) > 0
    rep = profiler.report(doc)
    assert set(rep["padded"]) == set(cm.FORMS)
    assert set(rep["padded"]["rich"]) == {"prefill", "decode", "step"}
    assert rep["padded"]["rich"]["step"]["n_train"] + rep["padded"]["rich"]["step"]["n_test"] == len(
        doc["measurements"])
    assert "rich" in profiler.format_report(rep) and "step" in profiler.format_report(rep)


def test_cli_writes_profile_fit_and_plot(doc, tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_profile(model, grid, **kw):
        seen.update(model=model, grid=grid, **kw)
        return doc

    monkeypatch.setattr(profiler, "profile", fake_profile)
    out, fit, png = tmp_path / "p.json", tmp_path / "c" / "cm.json", tmp_path / "plot.png"
    cli.main(["profile", "--grid", "quick", "--batch-sizes", "1,8", "--mixes", "base, mixed 8..32",
              "--repeats", "2", "--seq-len", "512", "--out", str(out), "--fit", str(fit), "--plot", str(png),
              "--form", "unpadded", "--no-progress"])
    assert seen["grid"] == dataclasses.replace(profiler.GRIDS["quick"], batch_sizes=(1, 8),
                                               rank_mixes=("base", "mixed 8..32"), repeats=2,
                                               seq_len=512)
    assert seen["progress"] is False and seen["model"] == "llama-test"
    assert profiler.load_profile(out)["measurements"] == doc["measurements"]
    model = cm.load(fit)
    assert isinstance(model.prefill, cm.UnpaddedForm) and model.source == "profiled by carajax profile"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "R2" in text and "MAPE" in text and "rich" in text and "unpadded" in text
    assert "shaped" in text  # every form's held-out fit is printed
    np.testing.assert_allclose(model.load_time[0][1], doc["load_time"][0]["seconds"])
    # --step-form: the step model in another form than the router's views.
    cli.main(["profile", "--out", str(out), "--fit", str(fit), "--step-form", "shaped",
              "--no-progress"])
    model = cm.load(fit)
    assert isinstance(model.prefill, cm.RichForm) and isinstance(model.step, cm.ShapedForm)
    assert "step model shaped form" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["llama-test", "llama-100m"])
def test_committed_cost_models_are_fits_of_committed_profiles(model):
    """data/cost_models/cpu_<model>.json is exactly `fit_profile` of data/profiles/cpu_<model>.json
    (in the forms the file names: the router's views and the step model may differ)."""
    root = Path(__file__).resolve().parents[1] / "data"
    doc = profiler.load_profile(root / "profiles" / f"cpu_{model}.json")
    assert doc["metadata"]["model_name"] == model and doc["metadata"]["device"]["platform"] == "cpu"
    committed = json.loads((root / "cost_models" / f"cpu_{model}.json").read_text())
    form, step_form = committed["prefill"]["form"], committed["step"]["form"]
    assert committed["decode"]["form"] == form
    refit = json.loads(profiler.fit_profile(doc, form, step_form=step_form).to_json())
    # Both were profiled on the fused-step engine: mixed rows, so a step model.
    assert "step" in committed and any(r["phase"] == "mixed" for r in doc["measurements"])
    # Same document; the floats of the least-squares fit to 1e-9 (the last digit moves with the
    # numpy/LAPACK build: numpy 2.4 changed one in the 11th significant digit).
    assert _close_tree(committed, refit, 1e-9)


def _close_tree(a, b, rtol: float) -> bool:
    """Equal JSON trees, numbers within `rtol` of each other."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _close_tree(a[k], b[k], rtol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(
            _close_tree(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(b, (int, float)) and abs(a - b) <= rtol * max(abs(a), abs(b), 1e-300)
    return a == b
