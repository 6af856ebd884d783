"""Pricing every worker at once (`carajax.sched.pricing`): the simulator's table of running totals
must give the very floats that asking each worker gives, so routing by either is the same."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from carajax.sched import cost_model as cm
from carajax.sched.pricing import Prices, price_each
from carajax.sched.router import CarajaxPolicy, RouteRequest, WorkerState, make_policy
from carajax.sched.simulator import SimConfig, SimRequest, simulate
from tests.test_router import FakeCost

FIELDS = [f.name for f in dataclasses.fields(Prices) if f.name != "costs"]


def _a10() -> cm.CostModel:
    return cm.load(Path(__file__).resolve().parents[1] / "data/cost_models/a10_paper.json")


def _paper_forms() -> cm.CostModel:
    # The paper's two-coefficient forms (prefill padded, decode unpadded), with a load table; the
    # fused step (what the simulator charges, not what the router prices) in the decode's form.
    return cm.CostModel(prefill=cm.PaddedForm((2e-5, 0.03)), decode=cm.UnpaddedForm((4e-5, 0.02)),
                        kernel="padded", load_time=((8, 0.004), (64, 0.03)),
                        step=cm.UnpaddedForm((4e-5, 0.02)))


@pytest.mark.parametrize("form", sorted(cm.FORMS))
def test_array_predictions_are_the_scalar_floats(form):
    rng = np.random.default_rng(0)
    model = cm.FORMS[form](tuple(rng.uniform(1e-6, 1e-2, len(cm.FORMS[form].feature_names))))
    n = rng.integers(0, 40, 500)
    n[:20] = 0  # an empty batch: mean rank 0, no division
    sum_rank = np.where(n > 0, n * rng.integers(1, 65, 500), 0)
    max_rank = np.where(n > 0, rng.integers(1, 65, 500), 0)
    tokens, context = rng.integers(0, 9000, 500), rng.integers(0, 200_000, 500)
    got = model.predict_arrays(*(x.astype(np.float64) for x in (n, sum_rank, max_rank, tokens, context)))
    totals = zip(n, sum_rank, max_rank, tokens, context, strict=True)
    want = [model.predict_stats(*map(int, t)) for t in totals]
    assert got.tolist() == want  # bit for bit, not approximately


class _CheckTable:
    """Routes with `inner`, after checking that the worker table's prices equal asking each worker."""

    name = "check"

    def __init__(self, inner):
        self.inner, self.checked, self.ignoring_memory = inner, 0, 0

    def observe_output(self, tokens: int) -> None:
        getattr(self.inner, "observe_output", lambda t: None)(tokens)

    def choose(self, request, workers):
        assert workers.cost is not None  # the table path is the one under test
        table, each = workers.prices(request), price_each(request, workers)
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(table, f), getattr(each, f), err_msg=f)
        assert table.costs == each.costs
        self.checked += 1
        self.ignoring_memory += workers.ignore_memory
        return self.inner.choose(request, workers)


class _PlainList:
    """Routes with `inner` over a plain list of the workers: every price asked of each worker."""

    name = "plain"

    def __init__(self, inner):
        self.inner = inner

    def observe_output(self, tokens: int) -> None:
        getattr(self.inner, "observe_output", lambda t: None)(tokens)

    def choose(self, request, workers):
        return self.inner.choose(request, list(workers))


def _busy_workload(n: int, seed: int = 0) -> list[SimRequest]:
    # Long prompts, many adapters and few pages: queues, decode runs, evictions and arrivals that
    # find every page pinned (routed with memory ignored).
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(0.02, n))
    return [SimRequest(float(t[i]), int(rng.integers(1, 3000)), int(rng.integers(1, 200)),
                       f"a{rng.integers(0, 60)}", int(rng.choice([8, 16, 32, 64]))) for i in range(n)]


@pytest.mark.parametrize("cold_start", ["wait", "cpu_assist"])
@pytest.mark.parametrize("cost", [_a10, _paper_forms], ids=["rich", "paper_forms"])
def test_the_table_prices_every_arrival_as_each_worker_would(cold_start, cost):
    reqs = _busy_workload(600)
    cfg = SimConfig(n_workers=5, max_batch=8, kv_rows=12_000, adapter_pages=16, slo_tpot=0.04,
                    cold_start=cold_start)
    model = cost()
    for name in ("carajax", "caraserve"):
        kw = dict(slo_tpot=cfg.slo_tpot, avg_output_len=100.0, cold_start=cold_start)
        check = _CheckTable(make_policy(name, **kw))
        res = simulate(reqs, check, model, cfg)
        assert check.checked >= len(reqs) and res.tokens.sum() == sum(r.output_tokens for r in reqs)
        assert res.memory_fallbacks > 0 and check.ignoring_memory == res.memory_fallbacks
        # And so routing over the table or over a plain list of the workers is the same.
        plain = simulate(reqs, _PlainList(make_policy(name, **kw)), model, cfg)
        assert plain.worker.tolist() == res.worker.tolist()
        np.testing.assert_array_equal(plain.latency, res.latency)


def test_each_worker_is_priced_with_its_own_cost_model():
    # Two cost models that differ only in load time: carajax's cold start is priced per worker.
    slow = dataclasses.replace(_paper_forms(), load_time=((8, 0.4), (64, 3.0)))
    fast = _paper_forms()
    ws = [WorkerState("slow", slow), WorkerState("fast", fast), WorkerState("slow2", slow)]
    req = RouteRequest("x", 8, 100, 50)
    p = price_each(req, ws)
    assert p.costs == (slow, fast) and p.cost_index.tolist() == [0, 1, 0]
    assert p.per_cost(lambda c: c.load_seconds(8)).tolist() == [0.4, 0.004, 0.4]
    pol = CarajaxPolicy(slo_tpot=0.1, avg_output_len=50, risk_weight=0.0)
    # Idle workers: the score is ttft_weight × (Pre([8], 100) + load) = (0.03016 + load) / 50,
    # with Pre = 0.03 + 2e-5·8 (padded form).
    assert pol.score(req, ws[0]) == pytest.approx((0.03016 + 0.4) / 50)
    assert pol.score(req, ws[1]) == pytest.approx((0.03016 + 0.004) / 50)
    assert pol.choose(req, ws).name == "fast"
    ws[0].resident.add("x")  # the slow loader already holds the adapter: nothing to load there
    assert pol.choose(req, ws).name == "slow"


def test_prices_of_hand_built_workers():
    # test_router's FakeCost: prefill = 0.01 + 1e-4·tokens + 1e-3·Σrank, decode = 0.01 + 1e-3·Σrank.
    cost = FakeCost()
    ws = [WorkerState("a", cost, queue=[(100, 8)], batch=[(50, 16)], resident={"x"}, kv_free_rows=0),
          WorkerState("b", cost, pages_free=0), WorkerState("c", cost, healthy=False)]
    p = price_each(RouteRequest("x", 8, 200, 10), ws)
    assert p.eligible.tolist() == [True, False, False]  # b: no pages for a cold adapter; c: down
    assert p.resident.tolist() == [True, False, False]
    assert p.pre_with.tolist() == pytest.approx([0.01 + 0.03 + 0.016, 0.01 + 0.02 + 0.008, 0.038])
    assert p.pre_now.tolist() == pytest.approx([0.01 + 0.01 + 0.008, 0.0, 0.0])
    assert p.dec_with.tolist() == pytest.approx([0.01 + 0.024, 0.018, 0.018])
    assert p.dec_now.tolist() == pytest.approx([0.026, 0.0, 0.0])
    assert p.n.tolist() == [2, 0, 0] and p.kv_free[0] == 0
