"""Routing policies on hand-built worker states, priced by a fake cost model worked out by hand."""

from __future__ import annotations

import dataclasses

import pytest

from carajax.sched.router import (
    POLICIES,
    Batch,
    CarajaxPolicy,
    CaraServePolicy,
    FirstFitPolicy,
    MostIdlePolicy,
    NoWorkerError,
    RandomPolicy,
    RoundRobinPolicy,
    RouteRequest,
    WorkerState,
    make_policy,
)


@dataclasses.dataclass(frozen=True)
class FakeCost:
    """A JetStream-style linear step model, small enough to price by hand.

    R(ranks) = |S|·max_rank when `padded` (BGMV pads every request to the batch's largest rank),
               Σrank otherwise (MBGMV);
    prefill  = beta + a_tok·tokens + alpha·R
    decode   = beta + alpha·R            (context ignored, to keep the arithmetic short)
    load     = load_per_rank·rank
    Defaults: alpha = 1e-3 s per rank unit, beta = 0.01 s, a_tok = 1e-4 s per prompt token.
    """

    alpha: float = 1e-3
    beta: float = 0.01
    a_tok: float = 1e-4
    padded: bool = False
    load_per_rank: float = 1e-3

    def _r(self, ranks: tuple[int, ...]) -> float:
        if not ranks:
            return 0.0
        return len(ranks) * max(ranks) if self.padded else sum(ranks)

    def prefill_time(self, batch: Batch) -> float:
        return self.beta + self.a_tok * batch.tokens + self.alpha * self._r(batch.ranks)

    def decode_time(self, batch: Batch) -> float:
        return self.beta + self.alpha * self._r(batch.ranks)

    def load_seconds(self, rank: int) -> float:
        return self.load_per_rank * rank


def _w(name: str, cost: FakeCost, **kw) -> WorkerState:
    return WorkerState(name=name, cost=cost, **kw)


REQ8 = RouteRequest(adapter="x", rank=8, prompt_tokens=0, expected_output_tokens=100)


def _fig5(padded: bool) -> list[WorkerState]:
    cost = FakeCost(padded=padded, a_tok=0.0)
    return [
        _w("A", cost, batch=[(100, 64)], resident={"x"}),
        _w("B", cost, batch=[(100, 8), (100, 8), (100, 8)], resident={"x"}),
    ]


def test_fig5_padded_and_unpadded_kernels_prefer_opposite_workers():
    # Paper Fig. 5: A decodes ranks [64], B decodes [8, 8, 8]; a new rank-8 request, empty queues,
    # avg_output_len = 100, weight = n (A: 1, B: 3), SLO loose (no penalty).
    # Δprefill is the same on both: Pre([8]) − Pre(∅) = beta + 8α = 0.018 → /100 = 0.00018.
    # Padded:   ΔdecA = α(2·64 − 64) = 64α = 0.064 → (0.00018 + 0.064)·1 = 0.06418
    #           ΔdecB = α(4·8 − 3·8) =  8α = 0.008 → (0.00018 + 0.008)·3 = 0.02454  → B
    # Unpadded: ΔdecA = ΔdecB = 8α = 0.008 → A: 0.00818·1 = 0.00818, B: 0.00818·3 = 0.02454 → A
    pol = CaraServePolicy(slo_tpot=1.0, avg_output_len=100)
    padded = _fig5(True)
    assert pol.score(REQ8, padded[0]) == pytest.approx(0.06418)
    assert pol.score(REQ8, padded[1]) == pytest.approx(0.02454)
    assert pol.choose(REQ8, padded).name == "B"
    unpadded = _fig5(False)
    assert pol.score(REQ8, unpadded[0]) == pytest.approx(0.00818)
    assert pol.score(REQ8, unpadded[1]) == pytest.approx(0.02454)
    assert pol.choose(REQ8, unpadded).name == "A"


def test_caraserve_slo_penalty_overrides_the_cheaper_marginal():
    # Unpadded again, but slo_tpot = 0.05: Dec(A + r) = 0.01 + 72α = 0.082 > 0.05 → +10 penalty;
    # Dec(B + r) = 0.01 + 32α = 0.042 ≤ 0.05 → no penalty. A: (0.00818 + 10)·1, B: 0.02454 → B.
    pol = CaraServePolicy(slo_tpot=0.05, avg_output_len=100, slo_penalty=10.0)
    ws = _fig5(False)
    assert pol.score(REQ8, ws[0]) == pytest.approx(10.00818)
    assert pol.choose(REQ8, ws).name == "B"


def test_caraserve_literal_weight_makes_idle_workers_free():
    # weight="n" (the paper's, our default): an idle worker scores 0·cost = 0 whatever the rank;
    # n+1 keeps its real price.
    cost = FakeCost()
    idle = _w("idle", cost)
    assert CaraServePolicy().score(REQ8, idle) == 0.0
    # n+1: Δprefill = Pre([8]) = 0.01 + 0.008 = 0.018 → /128; Δdecode = Dec([8]) = 0.018.
    assert CaraServePolicy(weight="n_plus_1").score(REQ8, idle) == pytest.approx(0.018 / 128 + 0.018)
    with pytest.raises(ValueError):
        CaraServePolicy(weight="bogus")


def test_carajax_prefers_the_worker_holding_the_adapter_when_loads_are_expensive():
    # Two idle, identical workers; only B holds "x" (rank 64). load = 0.01·64 = 0.64 s.
    # caraserve ignores residency: both idle score 0, tie → lowest index (A).
    # carajax: the stall 0.64/100 inside the bracket is weighted by n = 0, but A's TTFT carries the
    # 0.64 s load ·(1/100): A − B = 0.0064 → B.
    cost = FakeCost(load_per_rank=0.01)
    req = RouteRequest("x", 64, 100, 100)
    ws = [_w("A", cost), _w("B", cost, resident={"x"})]
    assert CaraServePolicy(avg_output_len=100, slo_tpot=1.0).choose(req, ws).name == "A"
    pol = CarajaxPolicy(avg_output_len=100, slo_tpot=1.0)
    assert pol.score(req, ws[0]) - pol.score(req, ws[1]) == pytest.approx(0.0064)
    assert pol.choose(req, ws).name == "B"
    # Under CPU-assisted cold start there is no stall, only cpu_slowdown × Pre([64]) of TTFT:
    # Pre([64], 100 tokens) = 0.01 + 0.01 + 0.064 = 0.084 → 0.5·0.084/100 = 0.00042 more on A.
    cpu = CarajaxPolicy(avg_output_len=100, slo_tpot=1.0, cold_start="cpu_assist", cpu_slowdown=0.5)
    assert cpu.score(req, ws[0]) - cpu.score(req, ws[1]) == pytest.approx(0.00042)


def test_carajax_prices_the_cpu_assist_slowdown_as_a_stall_on_a_busy_worker():
    # Two workers with the same two decoders (n = 2); only B holds "x" (rank 64, 100-token prompt).
    # CPU-assisted prefill slows the step it runs in, so the decoders beside it wait too:
    # cold = 0.5·Pre([64], 100 tok) = 0.5·0.084 = 0.042, in the bracket as 0.042/100 weighted by n = 2
    # (0.00084) and in A's own TTFT term (0.042/100 = 0.00042): A − B = 0.00126.
    cost = FakeCost()
    req = RouteRequest("x", 64, 100, 100)
    batch = [(100, 8), (100, 8)]
    ws = [_w("A", cost, batch=batch), _w("B", cost, batch=batch, resident={"x"})]
    cpu = CarajaxPolicy(avg_output_len=100, slo_tpot=1.0, cold_start="cpu_assist", cpu_slowdown=0.5)
    assert cpu.score(req, ws[0]) - cpu.score(req, ws[1]) == pytest.approx(0.00126)
    assert cpu.choose(req, ws).name == "B"


def test_async_cold_starts_cost_the_request_its_copy_and_the_others_nothing():
    # Same busy workers as above (n = 2), only B holds "x" (rank 64, load 1e-3 x 64 = 0.064 s).
    # async: the request waits for the copy in the queue (A's TTFT + 0.064/100) while the decoders
    # beside it never wait: no stall in the bracket, A - B = 0.00064. wait: the step blocks on the
    # copy, so the two decoders pay it too: 0.064/100 x 2 more, A - B = 0.00192.
    cost = FakeCost()
    req = RouteRequest("x", 64, 100, 100)
    batch = [(100, 8), (100, 8)]
    ws = [_w("A", cost, batch=batch), _w("B", cost, batch=batch, resident={"x"})]
    a_sync = CarajaxPolicy(avg_output_len=100, slo_tpot=1.0, cold_start="async")
    wait = CarajaxPolicy(avg_output_len=100, slo_tpot=1.0, cold_start="wait")
    assert a_sync.score(req, ws[0]) - a_sync.score(req, ws[1]) == pytest.approx(0.00064)
    assert wait.score(req, ws[0]) - wait.score(req, ws[1]) == pytest.approx(0.00192)
    # auto: the faster of async (0.064 s) and CPU assist (0.5 x Pre = 0.042 s, which stalls the
    # decoders too): CPU assist here, as the cpu_assist test above prices it (0.00126).
    auto = CarajaxPolicy(avg_output_len=100, slo_tpot=1.0, cold_start="auto", cpu_slowdown=0.5)
    assert auto.score(req, ws[0]) - auto.score(req, ws[1]) == pytest.approx(0.00126)
    slow_cpu = CarajaxPolicy(avg_output_len=100, slo_tpot=1.0, cold_start="auto", cpu_slowdown=2.0)
    assert slow_cpu.score(req, ws[0]) - slow_cpu.score(req, ws[1]) == pytest.approx(0.00064)


def test_a_disk_read_adds_to_the_cold_requests_own_wait():
    # Same busy workers (n = 2); neither holds "x" on the device. A has it only on disk: a read of
    # 1e7 bytes at 1e9 B/s after 0.01 s = 0.02 s before its copy (0.064 s). B has it in host
    # memory. async: only the request waits, A - B = 0.02/100 = 0.0002; wait: the step blocks on
    # the copy only (the engine keeps the request queued for its read), so again 0.0002.
    cost = FakeCost()
    req = RouteRequest("x", 64, 100, 100)
    batch = [(100, 8), (100, 8)]
    disk = dict(in_host=set(), read_bytes_per_s=1e9, read_latency_s=0.01, adapter_bytes={"x": 10**7})
    ws = [_w("A", cost, batch=batch, **disk), _w("B", cost, batch=batch, **{**disk, "in_host": {"x"}})]
    assert ws[0].read_seconds("x", 64) == pytest.approx(0.02) and ws[1].read_seconds("x", 64) == 0
    assert _w("C", cost).read_seconds("x", 64) == 0  # no host tier reported: nothing to read
    for policy in ("async", "wait", "cpu_assist"):
        pol = CarajaxPolicy(avg_output_len=100, slo_tpot=1.0, cold_start=policy, cpu_slowdown=0.5)
        assert pol.score(req, ws[0]) - pol.score(req, ws[1]) == pytest.approx(0.0002), policy
        assert pol.choose(req, ws).name == "B"


def test_carajax_counts_the_prefill_queued_ahead():
    # Unpadded, avg_output_len = 100, new request: 100 prompt tokens, rank 8, resident on both.
    # A: queue [(4000, 8)], batch [(100, 8)] (n = 2);  B: queue [], batch [(100, 8), (100, 8)] (n = 2).
    # caraserve A: ΔPre = (0.01 + 0.41 + 0.016) − (0.01 + 0.40 + 0.008) = 0.018 → /100 = 0.00018,
    #              ΔDec = 8α = 0.008 → 0.00818·2 = 0.01636
    # caraserve B: ΔPre = Pre([8], 100 tok) = 0.01 + 0.01 + 0.008 = 0.028 → 0.00028, ΔDec = 0.008
    #              → 0.00828·2 = 0.01656  → caraserve picks A (batching with A's queue looks cheap).
    # carajax TTFT: A = Pre(q + r) + Dec(batch) = 0.436 + 0.018 = 0.454 → +0.00454 → 0.02090
    #               B = Pre([r]) + Dec(batch)  = 0.028 + 0.026 = 0.054 → +0.00054 → 0.01710 → B.
    cost = FakeCost()
    req = RouteRequest("x", 8, 100, 100)
    ws = [
        _w("A", cost, queue=[(4000, 8)], batch=[(100, 8)], resident={"x"}),
        _w("B", cost, batch=[(100, 8), (100, 8)], resident={"x"}),
    ]
    cs = CaraServePolicy(avg_output_len=100, slo_tpot=1.0)
    assert cs.score(req, ws[0]) == pytest.approx(0.01636)
    assert cs.score(req, ws[1]) == pytest.approx(0.01656)
    assert cs.choose(req, ws).name == "A"
    cj = CarajaxPolicy(avg_output_len=100, slo_tpot=1.0)
    assert cj.score(req, ws[0]) == pytest.approx(0.02090)
    assert cj.score(req, ws[1]) == pytest.approx(0.01710)
    assert cj.choose(req, ws).name == "B"


def test_carajax_avoids_workers_without_kv_rows():
    cost = FakeCost()
    ws = [_w("A", cost, kv_free_rows=0, resident={"x"}), _w("B", cost, batch=[(10, 8)] * 5)]
    assert CarajaxPolicy().choose(REQ8, ws).name == "B"
    # Still routes somewhere when every worker is full.
    full = [_w("A", cost, kv_free_rows=0), _w("B", cost, kv_free_rows=0)]
    assert CarajaxPolicy().choose(REQ8, full).name == "A"


@pytest.mark.parametrize("name", POLICIES)
def test_ineligible_workers_are_never_chosen(name):
    cost = FakeCost()
    req = RouteRequest("x", 64, 100, 100)  # 64 / page_rank 8 = 8 pages
    bad = [
        _w("sick", cost, healthy=False),
        _w("nobase", cost, hosts_base=False),
        _w("nomem", cost, pages_free=7),
    ]
    ok = _w("ok", cost, pages_free=0, resident={"x"}, batch=[(100, 64)] * 20)  # resident: needs no pages
    pol = make_policy(name, seed=3)
    for _ in range(10):
        assert pol.choose(req, [*bad, ok]).name == "ok"
    with pytest.raises(NoWorkerError):
        make_policy(name).choose(req, bad)


def test_round_robin_cycles_and_skips_ineligible():
    cost = FakeCost()
    ws = [_w(str(i), cost) for i in range(3)]
    rr = RoundRobinPolicy()
    assert [rr.choose(REQ8, ws).name for _ in range(4)] == ["0", "1", "2", "0"]
    ws[1].healthy = False
    rr = RoundRobinPolicy()
    assert [rr.choose(REQ8, ws).name for _ in range(4)] == ["0", "2", "0", "2"]


def test_most_idle_and_first_fit():
    cost = FakeCost()
    ws = [
        _w("0", cost, queue=[(1, 8)], batch=[(1, 8)] * 2, max_batch=3),  # 3 requests: full
        _w("1", cost, batch=[(1, 8)], max_batch=3),  # 1
        _w("2", cost, queue=[(1, 8)], max_batch=3),  # 1: ties with "1" → lowest index
    ]
    assert MostIdlePolicy().choose(REQ8, ws).name == "1"
    assert FirstFitPolicy().choose(REQ8, ws).name == "1"  # "0" is full
    ws[1].kv_free_rows = 0
    assert FirstFitPolicy().choose(REQ8, ws).name == "2"  # no KV rows on "1" either
    ws[2].batch = [(1, 8)] * 2
    assert FirstFitPolicy().choose(REQ8, ws).name == "0"  # nobody has room: the first candidate


def test_adapter_affinity_prefers_a_holder_then_the_least_loaded():
    cost = FakeCost()
    ws = [_w("idle", cost),
          _w("holds-busy", cost, resident={"x"}, batch=[(1, 8)] * 3),
          _w("holds", cost, resident={"x"}, batch=[(1, 8)] * 2)]
    pol = make_policy("adapter_affinity")
    assert pol.choose(RouteRequest("x", 8, 10, 10), ws).name == "holds"  # not the idle one
    assert pol.choose(RouteRequest("y", 8, 10, 10), ws).name == "idle"  # nobody holds y
    assert pol.choose(RouteRequest("", 0, 10, 10), ws).name == "idle"  # the base model
    ws[2].healthy = False
    assert pol.choose(RouteRequest("x", 8, 10, 10), ws).name == "holds-busy"


def test_random_is_seeded_and_uniform_over_candidates():
    cost = FakeCost()
    ws = [_w(str(i), cost) for i in range(4)]
    ws[3].healthy = False
    a = [RandomPolicy(seed=7).choose(REQ8, ws).name for _ in range(1)]
    pa, pb = RandomPolicy(seed=7), RandomPolicy(seed=7)
    seq_a = [pa.choose(REQ8, ws).name for _ in range(300)]
    seq_b = [pb.choose(REQ8, ws).name for _ in range(300)]
    assert seq_a == seq_b and seq_a[0] == a[0]
    counts = {n: seq_a.count(n) for n in "0123"}
    assert counts["3"] == 0
    assert all(70 <= counts[n] <= 130 for n in "012")  # 100 expected each, ~8 std


def test_worker_state_helpers():
    cost = FakeCost()
    w = _w("w", cost, queue=[(300, 8), (200, 16)], batch=[(50, 8), (70, 32)], page_rank=16)
    assert w.prefill_batch() == Batch(ranks=(8, 16), tokens=500, context=500)
    assert w.decode_batch((10, 64)) == Batch(ranks=(8, 32, 64), tokens=3, context=130)
    assert w.queued_prefill_seconds() == pytest.approx(0.01 + 0.05 + 0.024)
    assert w.decode_seconds() == pytest.approx(0.01 + 0.040)
    assert _w("e", cost).queued_prefill_seconds() == 0.0 and _w("e", cost).decode_seconds() == 0.0
    assert [w.pages_needed(r) for r in (0, 8, 16, 17, 64)] == [0, 1, 1, 2, 4]
    assert w.n_requests() == 4


def test_make_policy():
    assert set(POLICIES) == {"caraserve", "carajax", "random", "round_robin", "first_fit", "most_idle",
                             "adapter_affinity"}
    p = make_policy("caraserve", slo_tpot=0.2, seed=1, avg_output_len=50)  # seed: ignored extra
    assert isinstance(p, CaraServePolicy) and p.slo_tpot == 0.2 and p.avg_output_len == 50
    assert make_policy("carajax").ttft_weight == pytest.approx(1 / 128)
    with pytest.raises(ValueError):
        make_policy("nope")
