"""The simulator's measured mode: step times = price x a residual drawn from a profile. With every
residual 1 it is the oracle mode to the bit; residuals move step times by their mean, per step
kind, deterministically for a seed, and the same whether decode steps are fast-forwarded or not."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from carajax.sched import cost_model as cm
from carajax.sched import profiler
from carajax.sched.simulator import AnalyticCost, SimConfig, SimRequest, load_trace, simulate
from carajax.sched.step_noise import KINDS, StepNoise

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "data/profiles/cpu_llama-test.json"
TRACE = str(ROOT / "data/traces/azure_llm_2023/azure2023_conv.jsonl")
# Every forward costs exactly 10 ms and a load 0.5 s, whatever the batch.
FLAT = AnalyticCost(beta=0.01, pre_tok=0.0, dec_tok=0.0, ctx=0.0, alpha=0.0, load_fixed=0.5,
                    load_per_rank=0.0)


def _workload(n: int = 300):
    return load_trace(TRACE, n_requests=n, rate_scale=8, n_adapters=100, max_prompt=4096,
                      max_output=512, seed=2)


def _same(a, b) -> bool:
    sa, sb = a.summary(), b.summary()
    sa.pop("wall_s"), sb.pop("wall_s")
    return (sa == sb and np.array_equal(a.ttft, b.ttft) and np.array_equal(a.latency, b.latency)
            and np.array_equal(a.worker, b.worker))


@pytest.mark.parametrize("cold_start, fused", [("wait", True), ("cpu_assist", True), ("wait", False)])
def test_all_ones_reproduces_the_oracle_to_the_bit(cold_start, fused):
    # Chunked prefill, decode runs (fast_forward), loads, CPU-path chunks, both pricings: residual 1
    # multiplies every term by 1.0, so every float is the oracle's.
    reqs = _workload()
    cfg = SimConfig(n_workers=4, kv_rows=40_000, adapter_pages=16, slo_tpot=0.04,
                    cold_start=cold_start, fused_step=fused)
    cost = cm.load(ROOT / "data/cost_models/a10_paper.json")
    for policy in ("carajax", "caraserve"):
        oracle = simulate(reqs, policy, cost, cfg)
        ones = simulate(reqs, policy, cost, dataclasses.replace(cfg, step_noise=StepNoise.ones()))
        assert _same(oracle, ones), policy


def test_a_constant_residual_scales_every_forward_but_not_the_load():
    # Residual 2 everywhere. One request (10-token prompt, 3 out), adapter cold under `wait`:
    # step 1 = load 0.5 (a copy: not scaled) + prefill 2 x 0.01 → first token at 0.52; two decode
    # steps of 2 x 0.01 → finish at 0.56. Oracle: 0.51 and 0.53.
    req = [SimRequest(0.0, 10, 3, "x", 8)]
    cfg = SimConfig(n_workers=1, step_noise=StepNoise.pooled([2.0]))
    r = simulate(req, "round_robin", FLAT, cfg)
    assert r.ttft[0] == pytest.approx(0.52)
    assert r.tpot[0] == pytest.approx(0.02)
    assert r.latency[0] == pytest.approx(0.56)


def test_residuals_are_drawn_per_step_kind_and_shift_the_mean_by_theirs():
    # One request alone, adapter cached: one prefill-only step, then 2000 decode-only steps (one
    # decode run). Prefill residuals are all 1, so TTFT is exactly the 10 ms price; decode residuals
    # are 0.5 or 2 with equal odds (mean 1.25), so TPOT ≈ 1.25 x 10 ms: the std of a mean of 2000
    # draws is 0.75 / sqrt(2000) = 0.017, so 1.25 ± 0.05 holds by 3 sigma (and the draw is seeded).
    req = [SimRequest(0.0, 10, 2001, "x", 8)]
    noise = StepNoise(prefill=(1.0,), decode=(0.5, 2.0), mixed=(1.0,))
    cfg = SimConfig(n_workers=1, cold_start="cached", step_noise=noise)
    r = simulate(req, "round_robin", FLAT, cfg)
    assert r.ttft[0] == 0.01
    assert r.tpot[0] / 0.01 == pytest.approx(1.25, abs=0.05)
    assert r.tpot[0] != pytest.approx(0.0125, rel=1e-6)  # drawn, not the mean itself
    # The draws are the stream's: the run's steps are the first 2000 decode residuals of worker 0.
    draws = noise.stream(cfg.noise_seed, 0).take_many("decode", 2000)
    assert r.latency[0] == pytest.approx(0.01 + 0.01 * draws.sum(), rel=1e-12)


def test_residuals_change_step_times_deterministically_for_a_seed():
    reqs = _workload()
    cost = cm.load(ROOT / "data/cost_models/a10_paper.json")
    noise = StepNoise.pooled([0.6, 1.0, 1.4])
    cfg = SimConfig(n_workers=4, kv_rows=40_000, adapter_pages=16, slo_tpot=0.04, step_noise=noise)
    a = simulate(reqs, "carajax", cost, cfg)
    b = simulate(reqs, "carajax", cost, cfg)
    other = simulate(reqs, "carajax", cost, dataclasses.replace(cfg, noise_seed=1))
    oracle = simulate(reqs, "carajax", cost, dataclasses.replace(cfg, step_noise=None))
    assert _same(a, b)
    assert not np.array_equal(a.latency, other.latency)
    assert not np.array_equal(a.latency, oracle.latency)
    # Mean residual 1: the measured cluster is no slower on average, only less predictable.
    assert a.latency.mean() == pytest.approx(oracle.latency.mean(), rel=0.1)
    json.dumps(a.summary())


@pytest.mark.parametrize("fused", [True, False])
def test_fast_forward_draws_what_stepping_draws(fused):
    # A decode run takes its steps' residuals from the worker's decode stream in order, as single
    # steps would: the same timings and placements, to float rounding.
    reqs = _workload(400)
    noise = StepNoise.from_profile(PROFILE)
    cost = cm.load(ROOT / "data/cost_models/cpu_llama-test.json") if fused else None
    base = SimConfig(n_workers=6, kv_rows=40_000, adapter_pages=16, slo_tpot=0.04, fused_step=fused,
                     step_noise=noise, noise_seed=3)
    fast = simulate(reqs, "carajax", cost, base)
    slow = simulate(reqs, "carajax", cost, dataclasses.replace(base, fast_forward=False))
    assert fast.worker.tolist() == slow.worker.tolist()
    np.testing.assert_allclose(fast.ttft, slow.ttft, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fast.latency, slow.latency, rtol=1e-9, atol=1e-12)


def test_from_profile_is_measured_over_predicted_of_every_repeat():
    doc = profiler.load_profile(PROFILE)
    model = profiler.fit_profile(doc, form="rich")
    noise = StepNoise.from_profile(PROFILE, form="rich")
    rows = {k: [r for r in doc["measurements"] if r["phase"] == k] for k in KINDS}
    for kind in KINDS:  # 160 prefill, 40 decode and 160 mixed rows, 7 repeats each
        assert len(getattr(noise, kind)) == 7 * len(rows[kind])
        row = rows[kind][0]
        predicted = model.step_time(cm.Batch(tuple(row["ranks"]), row["tokens"], row["context"]))
        assert getattr(noise, kind)[:7] == pytest.approx([t / predicted for t in row["repeats"]],
                                                         rel=1e-12)
    # Fitted by relative least squares, the model predicts low on average, and differently per kind.
    assert noise.mean("mixed") > noise.mean("decode") and noise.mean("mixed") > 1
    centered = StepNoise.from_profile(PROFILE, center=True)
    assert [centered.mean(k) for k in KINDS] == pytest.approx([1.0, 1.0, 1.0], rel=1e-12)
    pooled = StepNoise.from_profile(PROFILE, by_kind=False)
    assert pooled.prefill == pooled.decode == pooled.mixed and len(pooled.mixed) == 7 * 360
    assert "cpu_llama-test.json" in pooled.source and "pooled" in pooled.source
    assert "2520" not in repr(noise) and "samples" in repr(noise)  # not thousands of floats


def test_draws_are_seeded_and_come_from_the_samples():
    noise = StepNoise.pooled([0.5, 1.0, 4.0])
    a = noise.draw("mixed", 5000, seed=7)
    assert np.array_equal(a, noise.draw("mixed", 5000, seed=7))
    assert not np.array_equal(a, noise.draw("mixed", 5000, seed=8))
    assert set(np.unique(a)) == {0.5, 1.0, 4.0}
    assert a.mean() == pytest.approx((0.5 + 1.0 + 4.0) / 3, rel=0.05)
    # A stream read one by one or by peek/skip gives the same sequence.
    s1, s2 = noise.stream(0, 2), noise.stream(0, 2)
    one_by_one = [s1.take("decode") for _ in range(3000)]
    assert s2.peek("decode", 1500) + s2.peek("decode", 3000)[1500:] == one_by_one
    s2.skip("decode", 3000)
    assert s2.take("decode") == s1.take("decode")


def test_bad_noise_is_refused():
    with pytest.raises(ValueError, match="positive residuals"):
        StepNoise.pooled([1.0, 0.0])
    with pytest.raises(ValueError, match="positive residuals"):
        StepNoise(prefill=(), decode=(1.0,), mixed=(1.0,))
    with pytest.raises(ValueError, match="StepNoise or None"):
        SimConfig(step_noise=[1.0, 1.1])
    hash(SimConfig(step_noise=StepNoise.ones()))  # still a hashable frozen config


def test_cli_simulate_step_noise(tmp_path, capsys):
    # `carajax simulate --step-noise PROFILE` runs the measured mode and says so, in print and JSON;
    # a file that is not a profile is a usage error naming the flag.
    from carajax.cli import main

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(f'{{"arrival_s": {0.05 * i}, "prompt_tokens": 300, "output_tokens": 20}}\n'
                             for i in range(40)))
    args = ["simulate", "--trace", str(trace), "--workers", "2", "--adapters", "4", "--policies",
            "carajax", "--cost-model", str(ROOT / "data/cost_models/a10_paper.json")]
    main(args + ["--json", str(tmp_path / "oracle.json")])
    assert "oracle: the router never mispredicts" in capsys.readouterr().out
    main(args + ["--step-noise", str(PROFILE), "--noise-seed", "4", "--json", str(tmp_path / "m.json")])
    assert "measured: price x a residual of" in capsys.readouterr().out
    oracle, measured = (json.loads((tmp_path / f).read_text()) for f in ("oracle.json", "m.json"))
    assert oracle["step_noise"] is None and measured["config"]["noise_seed"] == 4
    assert measured["step_noise"]["decode"]["n"] == 280  # 40 decode rows x 7 repeats
    assert (measured["results"]["carajax"]["latency"]["mean"]
            != oracle["results"]["carajax"]["latency"]["mean"])
    with pytest.raises(SystemExit, match="--step-noise .*not a usable profile"):
        main(args + ["--step-noise", str(trace)])
