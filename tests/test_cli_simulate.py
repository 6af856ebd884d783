"""`carajax simulate` end to end on a tiny trace, and the cost model's pure-Python predict path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from carajax.cli import main
from carajax.sched.a10_model import a10_first_principles
from carajax.sched.cost_model import Batch, PaddedForm, RichForm, UnpaddedForm


def _random_batches(n: int, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)
    out = [Batch((), 0, 0), Batch((0,), 1, 0), Batch((64,), 4096, 0)]
    for _ in range(n):
        size = int(rng.integers(1, 40))
        ranks = tuple(int(r) for r in rng.choice([0, 8, 16, 32, 64, 128], size=size))
        out.append(Batch(ranks, int(rng.integers(0, 8192)), int(rng.integers(0, 200_000))))
    return out


@pytest.mark.parametrize("form", [PaddedForm, UnpaddedForm, RichForm])
def test_fast_predict_equals_numpy(form):
    rng = np.random.default_rng(1)
    models = [form(tuple(rng.uniform(0, 1e-3, len(form.feature_names)))) for _ in range(3)]
    a10 = a10_first_principles("padded")
    if form is RichForm:
        models += [a10.prefill, a10.decode, a10_first_principles("unpadded").decode]
    batches = _random_batches(300)
    for m in models:
        many = m.predict_many(batches)
        for b, ref in zip(batches, many):
            fast, slow = m.predict(b), m.predict_numpy(b)
            assert isinstance(fast, float)
            assert fast == pytest.approx(slow, rel=1e-12, abs=0)
            assert fast == pytest.approx(float(ref), rel=1e-12, abs=0)


def test_cli_simulate_tiny_trace(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 200
    t = np.cumsum(rng.exponential(0.05, size=n))
    trace = tmp_path / "trace.jsonl"
    with open(trace, "w") as f:
        for i in range(n):
            row = {"arrival_s": float(t[i]), "prompt_tokens": int(rng.integers(16, 512)),
                   "output_tokens": int(rng.integers(1, 64))}
            f.write(json.dumps(row) + "\n")
    cost_path = tmp_path / "cost.json"
    a10_first_principles("padded").save(cost_path)
    out = tmp_path / "out" / "sim.json"
    policies = ["caraserve", "carajax", "most_idle", "random", "first_fit"]
    main(["simulate", "--trace", str(trace), "--workers", "4", "--adapters", "50", "--zipf", "1.8",
          "--ranks", "8,16,32,64", "--slo-tpot-ms", "40", "--cost-model", str(cost_path),
          "--policies", ",".join(policies), "--scale", "1.0", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["requests"] == n
    assert list(doc["results"]) == policies
    for p in policies:
        s = doc["results"][p]
        assert s["requests"] == n
        assert 0.0 <= s["slo_attainment"] <= 1.0 and 0.0 <= s["ttft_slo_attainment"] <= 1.0
        assert s["workers_used"] <= 4
    printed = capsys.readouterr().out
    assert "caraserve" in printed and "first_fit" in printed and "TPOT-SLO" in printed


def test_cli_simulate_rejects_unknown_policy(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival_s": 0.0, "prompt_tokens": 8, "output_tokens": 2}\n')
    with pytest.raises(SystemExit):
        main(["simulate", "--trace", str(trace), "--workers", "1", "--policies", "nope"])


def test_cli_simulate_step_pricing(tmp_path):
    # --step two prices the old two forwards (and says so in the JSON); the default fused pricing
    # refuses a cost model without a step model, naming the way out.
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(f'{{"arrival_s": {0.1 * i}, "prompt_tokens": 300, "output_tokens": 4}}\n'
                             for i in range(20)))
    old = tmp_path / "old.json"
    d = json.loads(a10_first_principles("padded").to_json())
    del d["step"]
    old.write_text(json.dumps(d))
    args = ["simulate", "--trace", str(trace), "--workers", "2", "--adapters", "4", "--cost-model", str(old),
            "--policies", "caraserve"]
    with pytest.raises(SystemExit, match="no step model.*--step two"):
        main(args)
    main(args + ["--step", "two", "--json", str(tmp_path / "o.json")])
    doc = json.loads((tmp_path / "o.json").read_text())
    assert doc["config"]["fused_step"] is False and doc["results"]["caraserve"]["requests"] == 20
