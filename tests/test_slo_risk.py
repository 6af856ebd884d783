"""carajax's SLO-risk term: learned output lengths, and the misses a placement is expected to cause.

Hand-built worker states are priced with test_router's FakeCost (prefill = 0.01 + 1e-4·tokens +
1e-3·Σrank, decode = 0.01 + 1e-3·Σrank) so every number below can be checked on paper.
"""

from __future__ import annotations

import math

import pytest

from carajax.sched.output_lengths import OutputLengths
from carajax.sched.router import CarajaxPolicy, CaraServePolicy, RouteRequest, WorkerState
from carajax.sched.simulator import AnalyticCost, SimConfig, SimRequest, simulate
from tests.test_router import FakeCost


def _bimodal(short: int, long: int = 1000, each: int = 50) -> OutputLengths:
    d = OutputLengths(prior_mean=100)
    for _ in range(each):
        d.observe(short)
        d.observe(long)
    return d


def test_output_lengths_prior_is_geometric_then_empirical():
    d = OutputLengths(prior_mean=4, min_observations=3)
    # Geometric with mean 4 on {1, 2, ...}: P(L <= k) = 1 - 0.75^k.
    assert d.below(1) == 0.0
    assert d.below(2) == pytest.approx(0.25)
    assert d.below(3.5) == pytest.approx(1 - 0.75**3)
    assert d.mean() == 4
    for n in (2, 2, 8):
        d.observe(n)
    assert d.n == 3 and d.mean() == pytest.approx(4.0)
    assert d.below(2) == 0.0  # nothing ended before 2 tokens
    assert d.below(3) == pytest.approx(2 / 3)  # L < 3: the two 2-token replies
    assert d.below(9) == 1.0
    # A request that already produced 2 tokens is one of the 8-token ones: it cannot stop before 8.
    assert d.stop_before(8, produced=2) == 0.0
    assert d.stop_before(9, produced=2) == 1.0
    assert d.stop_before(3, produced=1) == pytest.approx(2 / 3)
    d.observe(5000)  # grows past its initial table
    assert d.below(5001) == 1.0 and d.below(5000) == pytest.approx(3 / 4)


def test_a_long_prefill_goes_beside_an_old_decoder_not_a_young_one():
    # Both workers decode one rank-8 request: Dec = 0.018 s; with ours, 0.026 s; SLO 0.05 s.
    # Our 2000-token prompt stalls the decoder for Δprefill = Pre([8], 2000) = 0.218 s, so it misses
    # iff it ends before 1 + 0.218 / (0.05 − 0.026) = 10.08 tokens. Half of all replies end at 10
    # tokens (the rest at 1000): A's decoder (2 tokens so far) misses with probability 0.5; B's (500
    # so far) is a long one and cannot. caraserve sees two identical workers and takes A.
    cost = FakeCost()
    req = RouteRequest("x", 8, 2000, 100)
    ws = [
        WorkerState("A", cost, batch=[(100, 8)], decode_ages=[2], resident={"x"}),
        WorkerState("B", cost, batch=[(100, 8)], decode_ages=[500], resident={"x"}),
    ]
    pol = CarajaxPolicy(slo_tpot=0.05, avg_output_len=100, risk_weight=0.5)
    pol.outputs = _bimodal(10)
    d_pre, dec_with, dec_now = 0.218, 0.026, 0.018
    assert pol.slo_misses(req, ws[0], d_pre, dec_with, dec_now) == pytest.approx(0.5)
    assert pol.slo_misses(req, ws[1], d_pre, dec_with, dec_now) == 0.0
    assert pol.score(req, ws[0]) - pol.score(req, ws[1]) == pytest.approx(0.25)
    assert pol.choose(req, ws).name == "B"
    assert CaraServePolicy(slo_tpot=0.05, avg_output_len=100).choose(req, ws).name == "A"
    # If replies were never that short, there would be nothing to avoid.
    pol.outputs = _bimodal(30)
    assert pol.slo_misses(req, ws[0], d_pre, dec_with, dec_now) == 0.0
    # Unknown ages count as 1: the cautious reading.
    assert WorkerState("C", cost, batch=[(1, 8), (1, 8)]).young_decode_ages(5) == [1, 1]


def test_a_long_prompt_joins_a_long_prefill_rather_than_outlasting_a_short_one():
    # No decoders anywhere; our prompt has 3000 tokens (rank 8); SLO 0.05 s, Dec([8]) = 0.018 s.
    # A is prefilling a 100-token prompt: it finishes first and then decodes beside our last 2900
    # tokens: Δprefill on A = Pre([8, 8], 3100) − Pre([8], 100) = 0.336 − 0.028 = 0.308 s for
    # 3000 tokens, so 2900 of them stall it 0.2977 s: it misses iff it ends before
    # 1 + 0.2977 / 0.032 = 10.3 tokens, probability 0.5 (replies end at 5 or 1000 tokens).
    # B is prefilling 3000 tokens: the two prompts finish together, nobody decodes beside a prefill.
    # Without the risk term carajax takes A, whose shorter queue gives the earlier first token.
    cost = FakeCost()
    req = RouteRequest("x", 8, 3000, 100)
    ws = [
        WorkerState("A", cost, queue=[(100, 8)], resident={"x"}),
        WorkerState("B", cost, queue=[(3000, 8)], resident={"x"}),
    ]
    pol = CarajaxPolicy(slo_tpot=0.05, avg_output_len=100, risk_weight=0.5)
    pol.outputs = _bimodal(5)
    assert pol.slo_misses(req, ws[0], 0.308, 0.018, 0.0) == pytest.approx(0.5)
    assert pol.slo_misses(req, ws[1], 0.308, 0.018, 0.0) == 0.0
    assert pol.choose(req, ws).name == "B"
    assert CarajaxPolicy(slo_tpot=0.05, avg_output_len=100, risk_weight=0.0).choose(req, ws).name == "A"
    # Symmetrically, a short prompt does not join a long prefill: it would decode beside the rest.
    short = RouteRequest("x", 8, 100, 100)
    assert pol.slo_misses(short, ws[1], 0.028, 0.018, 0.0) == pytest.approx(0.5)
    assert pol.slo_misses(short, ws[0], 0.028, 0.018, 0.0) == 0.0


def test_joining_a_batch_that_already_misses_is_a_miss():
    cost = FakeCost()
    slow = WorkerState("S", cost, batch=[(1, 64)])  # Dec = 0.074 s > 0.05 s
    pol = CarajaxPolicy(slo_tpot=0.05, avg_output_len=100)
    assert pol.slo_misses(RouteRequest("x", 8, 10, 100), slow, 0.02, 0.082, 0.074) == 1.0
    with pytest.raises(ValueError):
        CarajaxPolicy(risk_weight=-1)


class _Recording(CarajaxPolicy):
    """carajax, remembering the decode ages and queued prompts the router saw at each arrival."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: list[list[tuple[list[int], list[int]]]] = []

    def choose(self, request, workers):
        self.seen.append([(w.young_decode_ages(math.inf), w.queued_prompts()) for w in workers])
        return super().choose(request, workers)


def test_the_simulator_shows_the_router_decode_ages_and_teaches_it_output_lengths():
    # w0 serves A (2 tokens, done in ~0.05 s) then C (arrives at 3.0 s); w1 serves B from 0.001 s.
    # At D's arrival (3.1 s, a 4000-token prompt) C has decoded for ~0.1 s and B for ~3 s: both
    # workers hold one decoder, caraserve sees them as equal (it takes w0), carajax knows that
    # C is young and that replies here are short, and puts D beside the old one on w1.
    reqs = [
        SimRequest(0.0, 16, 2, "a", 8),
        SimRequest(0.001, 16, 1000, "a", 8),
        SimRequest(3.0, 16, 1000, "a", 8),
        SimRequest(3.1, 4000, 1000, "a", 8),
    ]
    cfg = SimConfig(n_workers=2, slo_tpot=0.05)
    pol = _Recording(slo_tpot=0.05, avg_output_len=5.0)  # prior: replies are short
    res = simulate(reqs, pol, AnalyticCost(), cfg)
    assert res.worker.tolist()[:3] == [0, 1, 0]
    (ages0, queued0), (ages1, queued1) = pol.seen[3]
    assert len(ages0) == 1 and 1 <= ages0[0] <= 10  # C: a few steps old
    assert len(ages1) == 1 and ages1[0] >= 100  # B: over a hundred tokens
    assert queued0 == queued1 == []
    assert res.worker[3] == 1
    assert simulate(reqs, "caraserve", AnalyticCost(), cfg).worker[3] == 0
    # Every finished reply was observed once, with its length.
    assert pol.outputs.counts() == {2: 1, 1000: 3}


def test_branch_and_bound_choice_equals_scoring_every_worker():
    # carajax.choose skips the risk term on workers that cannot win; on random cluster states it
    # must pick exactly the worker with the lowest full score (ties: lowest index).
    import random

    rng = random.Random(7)
    cost = FakeCost()
    pol = CarajaxPolicy(slo_tpot=0.05, avg_output_len=20, risk_weight=0.5)
    pol.outputs = _bimodal(5, 200)
    for _ in range(300):
        ws = []
        for i in range(rng.randint(1, 8)):
            batch = [(rng.randint(1, 3000), rng.choice([8, 16])) for _ in range(rng.randint(0, 3))]
            ws.append(WorkerState(
                f"w{i}", cost, batch=batch, decode_ages=[rng.randint(1, 300) for _ in batch],
                queue=[(rng.randint(1, 3000), 8) for _ in range(rng.randint(0, 2))],
                resident={"x"} if rng.random() < 0.5 else set()))
        req = RouteRequest("x", rng.choice([8, 16]), rng.randint(1, 4000), 20)
        scores = [pol.score(req, w) for w in ws]
        assert pol.choose(req, ws) is ws[scores.index(min(scores))]
