"""The cluster simulator: conservation, hand-timed steps, adapter residency, determinism, SLOs, workloads,
chunked prefill and CPU-assisted cold starts."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest

from carajax.sched import cost_model as cm
from carajax.sched.a10_model import a10_first_principles
from carajax.sched.cost_model import Batch
from carajax.sched.simulator import (
    AnalyticCost,
    SimConfig,
    SimRequest,
    assign_adapters,
    compare,
    load_trace,
    poisson_workload,
    simulate,
    zipf_probabilities,
)

# The copy shipped in the repo (data/traces, CC-BY 4.0), so the tests run on a user's clone.
TRACE = str(Path(__file__).resolve().parents[1] / "data/traces/azure_llm_2023/azure2023_conv.jsonl")
COST_MODELS = Path(__file__).resolve().parents[1] / "data/cost_models"

# Every step costs exactly 10 ms and a load 0.5 s, whatever the batch: timings can be read off.
FLAT = AnalyticCost(
    beta=0.01, pre_tok=0.0, dec_tok=0.0, ctx=0.0, alpha=0.0, load_fixed=0.5, load_per_rank=0.0
)


def _mixed(n: int, rate: float, seed: int = 0) -> list[SimRequest]:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    return [
        SimRequest(
            float(t[i]),
            int(rng.integers(1, 400)),
            int(rng.integers(1, 60)),
            f"a{i % 7}",
            (8, 16, 64)[i % 7 % 3],
        )
        for i in range(n)
    ]


def test_one_request_timed_by_hand():
    # Step 1 (t = 0): load 0.5 + prefill 0.01 → first token at 0.51. Steps 2, 3: decode 0.01 each →
    # finish at 0.53. TTFT 0.51, TPOT (0.53 − 0.51)/2 = 0.01, latency 0.53.
    cfg = SimConfig(n_workers=1)
    r = simulate([SimRequest(0.0, 10, 3, "x", 8)], "round_robin", FLAT, cfg)
    assert r.ttft[0] == pytest.approx(0.51)
    assert r.tpot[0] == pytest.approx(0.01)
    assert r.latency[0] == pytest.approx(0.53)
    assert r.loads == 1
    cached = simulate(
        [SimRequest(0.0, 10, 3, "x", 8)], "round_robin", FLAT, SimConfig(n_workers=1, cold_start="cached")
    )
    assert cached.ttft[0] == pytest.approx(0.01)


@pytest.mark.parametrize("fused", [False, True])
def test_batching_and_a_late_joiner(fused):
    # A (out 4) arrives at 0; B (out 2) at 0.015, during A's first step [0, 0.51) (load + prefill).
    # Step 2 admits B (its adapter is resident: no load): prefill B + decode A.
    # Two forwards (FLAT charges one beta per forward, so prefill + decode = 0.02) → [0.51, 0.53):
    #   B's first token at 0.53, A has 2 tokens. Step 3 [0.53, 0.54): decode A and B → A 3 tokens,
    #   B done (2 tokens). Step 4 [0.54, 0.55): A done (4 tokens).
    # Fused (one forward, one beta) → [0.51, 0.52): B's first token at 0.52; B done at 0.53, A at 0.54.
    reqs = [SimRequest(0.0, 10, 4, "x", 8), SimRequest(0.015, 10, 2, "x", 8)]
    r = simulate(reqs, "round_robin", FLAT, SimConfig(n_workers=1, fused_step=fused))
    mixed = 0.01 if fused else 0.02
    assert r.ttft.tolist() == pytest.approx([0.51, 0.51 + mixed - 0.015])
    assert r.latency.tolist() == pytest.approx([0.53 + mixed, 0.52 + mixed - 0.015])
    assert r.loads == 1


def test_lru_eviction_counts_loads():
    # Requests one after another (each finishes before the next arrives), adapters x, y, x.
    reqs = [SimRequest(float(t), 10, 2, a, 8) for t, a in zip((0, 10, 20), "xyx")]
    # One page: y evicts x, so the second x loads again → 3 loads.
    assert simulate(reqs, "round_robin", FLAT, SimConfig(n_workers=1, adapter_pages=1)).loads == 3
    # Two pages: both stay → 2 loads.
    assert simulate(reqs, "round_robin", FLAT, SimConfig(n_workers=1, adapter_pages=2)).loads == 2


@pytest.mark.parametrize("host_adapters, ttft", [(0, [0.51] * 3), (1, [0.71] * 3),
                                                  (2, [0.71, 0.71, 0.51])])
def test_adapters_not_in_host_memory_are_read_first(host_adapters, ttft):
    # x, y, x one after another, one device page (each load evicts the other): every request
    # copies (0.5 s) then prefills (0.01 s). A host tier of one adapter reads each first (0.2 s
    # latency, FLAT prices no bytes); of two, the second x is still in host memory.
    reqs = [SimRequest(float(t), 10, 2, a, 8) for t, a in zip((0, 10, 20), "xyx")]
    cfg = SimConfig(n_workers=1, adapter_pages=1, cold_start="async", host_adapters=host_adapters,
                    disk_read_latency_ms=200.0)
    assert simulate(reqs, "round_robin", FLAT, cfg).ttft.tolist() == pytest.approx(ttft)


def test_pinned_adapters_are_not_evicted_and_requests_wait_for_pages():
    # One page, two concurrent requests on different adapters: y cannot load while x is in use,
    # so y waits for x's request to finish (no over-commit), and each adapter is loaded once.
    reqs = [SimRequest(0.0, 10, 5, "x", 8), SimRequest(0.0, 10, 5, "y", 8)]
    r = simulate(reqs, "round_robin", FLAT, SimConfig(n_workers=1, adapter_pages=1))
    assert r.loads == 2
    assert r.ttft[1] > r.latency[0]  # y's first token only after x finished


@pytest.mark.parametrize(
    "policy", ["caraserve", "carajax", "random", "round_robin", "first_fit", "most_idle"]
)
def test_conservation(policy):
    reqs = _mixed(400, rate=60.0)
    r = simulate(
        reqs, policy, AnalyticCost(), SimConfig(n_workers=3, max_batch=8, kv_rows=3000, adapter_pages=12)
    )
    out = np.array([q.output_tokens for q in reqs])
    arrival = np.array([q.arrival_s for q in reqs])
    assert np.all(np.isfinite(r.latency)) and np.all(np.isfinite(r.ttft))  # every request finished
    assert np.array_equal(r.tokens, out) and r.tokens.sum() == out.sum()
    assert np.all((r.worker >= 0) & (r.worker < 3))  # placed exactly once, on a real worker
    assert np.all(r.ttft > 0) and np.all(arrival + r.ttft <= arrival + r.latency + 1e-12)
    s = r.summary()
    json.dumps(s)  # JSON-able
    assert s["requests"] == 400


def test_deterministic_for_a_seed():
    reqs = poisson_workload(500, rate=40.0, n_adapters=50, seed=5)
    assert reqs == poisson_workload(500, rate=40.0, n_adapters=50, seed=5)
    cfg = SimConfig(n_workers=4, adapter_pages=16)
    for policy in ("random", "carajax"):
        a = simulate(reqs, policy, None, cfg, seed=11)
        b = simulate(reqs, policy, None, cfg, seed=11)
        assert np.array_equal(a.latency, b.latency) and np.array_equal(a.worker, b.worker)
        sa, sb = a.summary(), b.summary()
        sa.pop("wall_s"), sb.pop("wall_s")
        assert sa == sb


def test_slo_attainment_tiny_load_vs_overload():
    cfg = SimConfig(n_workers=2, slo_tpot=0.1, slo_ttft=2.0)
    # One request every 5 s, 256-token prompts, 64 outputs: ≈ 0.05 s prefill (+ ≤ 24 ms load),
    # 63 decode steps of ≈ 22 ms → ≈ 1.5 s per request, 0.024 s per token: far inside the SLO.
    tiny = [SimRequest(5.0 * i, 256, 64, f"a{i % 3}", 16) for i in range(20)]
    s = simulate(tiny, "caraserve", None, cfg).summary()
    assert s["slo_attainment"] == 1.0 and s["ttft_slo_attainment"] == 1.0
    # 600 req/s on two workers (each serves < 40 such requests per second): queues explode. The
    # batch is capped, so time per token stays bounded; time to first token is what fails.
    over = poisson_workload(3000, rate=600.0, n_adapters=20)
    s = simulate(over, "caraserve", None, cfg).summary()
    assert s["ttft_slo_attainment"] < 0.2 and s["ttft"]["mean"] > 10.0
    per_token = simulate(over, "caraserve", None,
                         dataclasses.replace(cfg, slo_metric="latency_per_token")).summary()
    assert per_token["slo_attainment"] < 0.2  # queueing counts against latency per token


def test_carajax_beats_caraserve_when_cold_starts_matter():
    # 400 adapters (Zipf 1.1), 24 pages per worker (3 rank-64 adapters), 50-180 ms loads, 30 req/s on
    # 8 workers: caraserve ignores residency, so it reloads more and its requests wait behind loads.
    # Measured when written: TTFT-SLO attainment 0.996 (carajax) vs 0.814 (caraserve), TPOT-SLO
    # 0.884 vs 0.853, loads 1388 vs 2077, mean TTFT 0.38 s vs 1.21 s.
    reqs = poisson_workload(
        3000, rate=30.0, prompt_tokens=256, output_tokens=32, n_adapters=400, exponent=1.1
    )
    cost = AnalyticCost(load_fixed=0.05, load_per_rank=2e-3)
    cfg = SimConfig(n_workers=8, adapter_pages=24, slo_tpot=0.05)
    res = compare(reqs, ["caraserve", "carajax"], cost, cfg)
    print({p: (s["slo_attainment"], s["adapter_loads"], round(s["ttft"]["mean"], 3)) for p, s in res.items()})
    assert res["carajax"]["adapter_loads"] < 0.8 * res["caraserve"]["adapter_loads"]
    assert res["carajax"]["ttft_slo_attainment"] > res["caraserve"]["ttft_slo_attainment"] + 0.1
    assert res["carajax"]["slo_attainment"] > res["caraserve"]["slo_attainment"]
    assert res["carajax"]["ttft"]["mean"] < 0.5 * res["caraserve"]["ttft"]["mean"]


def test_zipf_assignment_statistics():
    n_adapters, s = 1000, 1.8
    names, ranks = assign_adapters(50_000, n_adapters, exponent=s, ranks=(8, 64), seed=2)
    p0 = 1.0 / np.sum(np.arange(1, n_adapters + 1) ** -s)  # ≈ 0.533 (ζ(1.8) ≈ 1.88 less the tail)
    assert zipf_probabilities(n_adapters, s)[0] == pytest.approx(p0)
    share = names.count("a0") / len(names)
    assert abs(share - p0) < 0.01  # binomial std ≈ 0.0022
    assert names.count("a1") / len(names) == pytest.approx(p0 * 2**-s, abs=0.01)
    by_adapter: dict[str, set[int]] = {}
    for a, r in zip(names, ranks):
        by_adapter.setdefault(a, set()).add(r)
    assert all(len(v) == 1 for v in by_adapter.values())  # an adapter has one rank
    assert assign_adapters(100, 10, seed=3) == assign_adapters(100, 10, seed=3)


def test_load_trace_scaling_tiling_and_given_adapters(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = [
        {"arrival_s": 10.0, "prompt_tokens": 5, "output_tokens": 3},
        {"arrival_s": 12.0, "prompt_tokens": 6, "output_tokens": 0, "adapter": "mine", "rank": 32},
        {"arrival_s": 14.0, "prompt_tokens": 7, "output_tokens": 4},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reqs = load_trace(str(p), n_requests=5, rate_scale=2.0, n_adapters=4, seed=1)
    # Times start at 0 and are halved; the copy is shifted by span + mean gap = 4 + 2 = 6 s.
    assert [q.arrival_s for q in reqs] == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])
    assert reqs[1].adapter == "mine" and reqs[1].rank == 32 and reqs[1].output_tokens == 1
    assert reqs[0].adapter.startswith("a") and reqs[0].rank in (8, 16, 32, 64)
    assert load_trace(str(p), n_requests=5, rate_scale=2.0, n_adapters=4, seed=1) == reqs


def test_azure_trace_timing_60_workers_40k_adapters():
    # Not asserted: prints how fast the simulator routes a slice of the real trace at paper scale.
    reqs = load_trace(
        TRACE, n_requests=2000, rate_scale=12, n_adapters=40_000, max_prompt=4096, max_output=1024
    )
    cfg = SimConfig(n_workers=60, kv_rows=40_000, adapter_pages=64, slo_ttft=5.0)
    t = time.perf_counter()
    s = simulate(reqs, "caraserve", None, cfg).summary()
    print(
        f"2000 requests, 60 workers, 40k adapters: {time.perf_counter() - t:.2f} s; "
        f"attainment {s['slo_attainment']:.3f}"
    )
    assert s["requests"] == 2000


def test_a_worker_in_a_long_prefill_is_not_idle():
    # Request 0's 4096-token prefill takes ~0.4 s (AnalyticCost); request 1 arrives 50 ms in. The
    # router must see request 0 on worker 0 (it left the queue but is not decoding yet).
    reqs = [SimRequest(0.0, 4096, 8, "a", 8), SimRequest(0.05, 16, 8, "b", 8)]
    for policy in ("most_idle", "caraserve", "carajax"):
        res = simulate(reqs, policy, None, SimConfig(n_workers=2))
        assert res.worker.tolist() == [0, 1], policy


# -- chunked prefill and CPU-assisted cold starts --------------------------------------------------

# Steps priced by hand: prefill = 0.01 + 1e-4·tokens, decode = 0.01 (no rank, context or batch terms);
# loads 0.05 s. The hand-timed tests below use two forwards per step (fused_step=False: Pre + Dec),
# the pricing they were written for; the fused step has its own tests further down.
LINEAR = AnalyticCost(
    beta=0.01, pre_tok=1e-4, dec_tok=0.0, ctx=0.0, alpha=0.0, load_fixed=0.05, load_per_rank=0.0
)
TWO = {"fused_step": False}


@pytest.mark.parametrize("policy", ["caraserve", "carajax", "most_idle", "random"])
@pytest.mark.parametrize("cold_start", ["wait", "cpu_assist", "async", "auto"])
def test_conservation_with_chunked_prefill(policy, cold_start):
    # Chunks of 64, at most 96 prompt tokens per step: prompts of 1-399 tokens take up to 7 steps,
    # and the budget splits a step's chunks unevenly.
    reqs = _mixed(300, rate=60.0)
    cfg = SimConfig(n_workers=3, max_batch=8, kv_rows=3000, adapter_pages=12, cold_start=cold_start,
                    prefill_chunk=64, max_prefill_tokens=96)
    r = simulate(reqs, policy, AnalyticCost(), cfg)
    out = np.array([q.output_tokens for q in reqs])
    assert np.all(np.isfinite(r.latency)) and np.all(np.isfinite(r.ttft))  # every request finished
    assert np.array_equal(r.tokens, out)  # exactly its tokens, once
    assert np.all((r.worker >= 0) & (r.worker < 3))
    assert np.all(r.ttft > 0) and np.all(r.ttft <= r.latency)
    assert (r.cpu_prefill_tokens > 0) == (cold_start in ("cpu_assist", "auto"))
    # Determinism with chunking on.
    again = simulate(reqs, policy, AnalyticCost(), cfg)
    assert np.array_equal(again.latency, r.latency) and np.array_equal(again.worker, r.worker)


def test_chunked_prefill_bounds_the_stall_of_a_long_prompt():
    # A (10-token prompt, 2 tokens out) arrives at 0; B (1000-token prompt, 2 out) at 0.005, during
    # A's first step [0, 0.011) (prefill 0.01 + 10·1e-4). One worker, adapters cached.
    # Whole prompts: step 2 = Pre(B, 1000) 0.11 + Dec(A) 0.01 = 0.12 → A's 2nd token at 0.131: A's
    #   TPOT 0.12; B's first token at 0.131 (TTFT 0.126).
    # Chunks of 250: step 2 = Pre(250) 0.035 + Dec(A) 0.01 = 0.045 → A done at 0.056, TPOT 0.045.
    #   B's 3 more chunks run alone, 0.035 each: first token at 0.056 + 3·0.035 = 0.161 (TTFT
    #   0.156: its 3 extra fixed costs are what chunking costs it), then one decode step → 0.171.
    reqs = [SimRequest(0.0, 10, 2, "x", 8), SimRequest(0.005, 1000, 2, "x", 8)]
    cfg = SimConfig(n_workers=1, cold_start="cached", prefill_chunk=0, **TWO)
    whole = simulate(reqs, "round_robin", LINEAR, cfg)
    assert whole.tpot.tolist() == pytest.approx([0.12, 0.01])
    assert whole.ttft.tolist() == pytest.approx([0.011, 0.126])
    chunked = simulate(reqs, "round_robin", LINEAR, dataclasses.replace(cfg, prefill_chunk=250))
    assert chunked.tpot.tolist() == pytest.approx([0.045, 0.01])
    assert chunked.ttft.tolist() == pytest.approx([0.011, 0.156])
    assert chunked.latency[1] == pytest.approx(0.171 - 0.005)


def test_chunked_prefill_step_budget_in_admission_order():
    # A (10 tokens, 1 out) arrives at 0 and runs alone [0, 0.011); B (500-token prompt) and C (200)
    # queue behind it. Chunks of 250, 300 prompt tokens per step, 1 token out each.
    # Step 2 [0.011, 0.051): B 250, C 50 (the budget's rest) → Pre(300) = 0.04.
    # Step 3 [0.051, 0.091): B 250 (done), C 50 → B's token at 0.091 (TTFT 0.09).
    # Step 4: C's last 100 → Pre(100) = 0.02: C's token at 0.111 (TTFT 0.11).
    reqs = [SimRequest(0.0, 10, 1, "x", 8), SimRequest(0.001, 500, 1, "x", 8),
            SimRequest(0.001, 200, 1, "x", 8)]
    cfg = SimConfig(n_workers=1, cold_start="cached", prefill_chunk=250, max_prefill_tokens=300, **TWO)
    r = simulate(reqs, "round_robin", LINEAR, cfg)
    assert r.ttft.tolist() == pytest.approx([0.011, 0.09, 0.11])


def test_router_sees_the_prefill_left_after_a_chunk():
    # Request 0's 4096-token prompt is chunked (256 per step); request 1 arrives mid-prefill. The
    # worker must count both its admitted request and the prompt tokens still to prefill.
    seen = {}

    class Spy:
        name = "spy"

        def choose(self, request, workers):
            w = workers[0]
            if request.prompt_tokens == 16:
                seen.update(n=w.n_requests(), left=w.prefill_batch().tokens, pre=w.queued_prefill_seconds(),
                            dec=w.decode_batch().ranks)
            return w

    reqs = [SimRequest(0.0, 4096, 8, "a", 8), SimRequest(0.1, 16, 8, "b", 8)]
    simulate(reqs, Spy(), LINEAR, SimConfig(n_workers=1, cold_start="cached"))
    # Steps of Pre(256) = 0.0356: at 0.1 the third chunk is in flight, 4096 − 3·256 tokens are left.
    assert seen["n"] == 1 and seen["left"] == 4096 - 3 * 256 and seen["dec"] == ()
    assert seen["pre"] == pytest.approx(0.01 + 1e-4 * (4096 - 768))


def test_cpu_assist_starts_before_the_load_lands():
    # One cold request (1000-token prompt, 2 out), chunks of 250, its copy lands at 0.05.
    # wait:       the load stalls the first step: TTFT = 0.05 + 4·0.035 = 0.19.
    # cpu_assist: starts at 0 on the CPU path, (1 + 0.26)·0.035 = 0.0441 per chunk while the copy is in
    #             flight; chunks starting at 0 and 0.0441 (< 0.05) are CPU chunks, the two from 0.0882
    #             on run on the device: first token at 2·0.0441 + 2·0.035 = 0.1582; 500 CPU tokens.
    req = [SimRequest(0.0, 1000, 2, "x", 8)]
    wait = simulate(req, "round_robin", LINEAR, SimConfig(n_workers=1, cold_start="wait", prefill_chunk=250,
                                                          **TWO))
    assert wait.ttft[0] == pytest.approx(0.19) and wait.cpu_prefill_tokens == 0
    cfg = SimConfig(n_workers=1, cold_start="cpu_assist", prefill_chunk=250, cpu_slowdown=0.26, **TWO)
    cpu = simulate(req, "round_robin", LINEAR, cfg)
    assert cpu.ttft[0] == pytest.approx(2 * 0.0441 + 2 * 0.035)
    assert cpu.cpu_prefill_tokens == 500 and cpu.loads == 1
    assert cpu.latency[0] == pytest.approx(cpu.ttft[0] + 0.01)
    # Two cold adapters, 0.07 s loads: their copies share the worker's link. x arrives first and its
    # step starts at once, alone (copy lands at 0.07); y, arriving in the same instant, is admitted at
    # step 2 (0.0441) and its copy queues behind x's: lands at 0.14 (0.1141 on a link of its own).
    # Step 1 [0, 0.0441): x on the CPU. Step 2 [0.0441, 0.1197): both on the CPU: 1.26·Pre(500) =
    # 1.26·0.06. Step 3 [0.1197, 0.1888): x on the device, y still on the CPU (it would be on the
    # device with its own link): 0.06 + 0.26·Pre(250). Step 4 both on the device, 0.06: x's first token
    # at 0.2488. Step 5: y's last chunk 0.035 + Dec(x) 0.01 → 0.2938. CPU tokens: 2·250 + 2·250.
    slow = dataclasses.replace(LINEAR, load_fixed=0.07)
    two = [SimRequest(0.0, 1000, 2, "x", 8), SimRequest(0.0, 1000, 2, "y", 8)]
    r = simulate(two, "round_robin", slow, cfg)
    assert r.ttft.tolist() == pytest.approx([0.2488, 0.2938])
    assert r.cpu_prefill_tokens == 1000 and r.loads == 2
    # A later request on x, after its copy landed: the device path, no load, no slowdown.
    later = simulate([*req, SimRequest(1.0, 250, 2, "x", 8)], "round_robin", LINEAR, cfg)
    assert later.ttft[1] == pytest.approx(0.035) and later.loads == 1


def test_async_queues_a_cold_request_while_the_one_behind_it_runs():
    # FLAT: steps of 10 ms, loads of 0.5 s. y's first request waits for y's copy (0 -> 0.5), runs
    # [0.5, 0.52). At 1.0 a request on cold x arrives, then one on resident y. async: x's copy starts
    # at once and x stays queued; y goes ahead (TTFT 0.01); the idle worker wakes when x's copy
    # lands at 1.5 (TTFT 0.51). wait: x's step starts at once with its 0.5 s load; y, arriving in
    # the same instant, joins the step after it (Pre + Dec, two forwards): TTFT 0.53.
    reqs = [SimRequest(0.0, 10, 2, "y", 8), SimRequest(1.0, 10, 2, "x", 8),
            SimRequest(1.0, 10, 2, "y", 8)]
    a = simulate(reqs, "round_robin", FLAT, SimConfig(n_workers=1, cold_start="async", **TWO))
    assert a.ttft.tolist() == pytest.approx([0.51, 0.51, 0.01])
    assert a.latency.tolist() == pytest.approx([0.52, 0.52, 0.02])
    assert a.loads == 2 and a.cpu_prefill_tokens == 0
    w = simulate(reqs, "round_robin", FLAT, SimConfig(n_workers=1, cold_start="wait", **TWO))
    assert w.ttft.tolist() == pytest.approx([0.51, 0.51, 0.53])


@pytest.mark.parametrize("slowdown,same_as", [(0.0, "cpu_assist"), (1e6, "async")])
def test_auto_takes_the_cheaper_of_cpu_assist_and_async_per_request(slowdown, same_as):
    # Free CPU-side LoRA: every cold request is assisted, as under cpu_assist; ruinous CPU-side
    # LoRA: every one waits for its copy, as under async.
    reqs = _mixed(200, rate=40.0)
    cfg = SimConfig(n_workers=2, max_batch=8, kv_rows=3000, adapter_pages=12, cold_start="auto",
                    prefill_chunk=64, cpu_slowdown=slowdown)
    auto = simulate(reqs, "carajax", AnalyticCost(), cfg)
    same = simulate(reqs, "carajax", AnalyticCost(), dataclasses.replace(cfg, cold_start=same_as))
    np.testing.assert_array_equal(auto.ttft, same.ttft)
    np.testing.assert_array_equal(auto.worker, same.worker)
    assert auto.loads == same.loads


def test_whole_prompt_mode_matches_the_old_simulator_on_a_hand_case():
    # prefill_chunk=0 is the simulator before chunking: test_batching_and_a_late_joiner's timings.
    reqs = [SimRequest(0.0, 10, 4, "x", 8), SimRequest(0.015, 10, 2, "x", 8)]
    r = simulate(reqs, "round_robin", FLAT, SimConfig(n_workers=1, prefill_chunk=0, **TWO))
    assert r.ttft.tolist() == pytest.approx([0.51, 0.53 - 0.015])
    assert r.latency.tolist() == pytest.approx([0.55, 0.54 - 0.015])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("cold_start", ["wait", "cpu_assist", "async"])
def test_fast_forward_matches_stepping_every_decode_step(cold_start, fused):
    # Decode-only runs become one event up to the next completion, synced at each arrival and cut
    # when a request is routed to the worker; every request's timings and placement must be those
    # of the step-by-step simulation (to float rounding), with fused steps (a decode-only step is
    # then `step_time`) and with two forwards (`decode_time`).
    reqs = load_trace(TRACE, n_requests=400, rate_scale=8, n_adapters=200, max_prompt=4096,
                      max_output=1024, seed=3)
    base = SimConfig(n_workers=6, kv_rows=40_000, adapter_pages=16, slo_tpot=0.04, cold_start=cold_start,
                     fused_step=fused)
    # AnalyticCost's decode-only step equals its decode time; the A10 model's step model is its
    # decode form too, but the fit of a profile need not be: the measured llama-test model checks
    # that a run extrapolates the step model, not the decode one.
    cost = cm.load(COST_MODELS / "cpu_llama-test.json") if fused else None
    for policy in ("caraserve", "carajax"):
        fast = simulate(reqs, policy, cost, base)
        slow = simulate(reqs, policy, cost, dataclasses.replace(base, fast_forward=False))
        assert fast.worker.tolist() == slow.worker.tolist(), policy
        np.testing.assert_allclose(fast.ttft, slow.ttft, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(fast.latency, slow.latency, rtol=1e-9, atol=1e-12)
        assert fast.loads == slow.loads and fast.tokens.sum() == slow.tokens.sum()


# -- the fused step: one forward over every sequence of a step (the engine since issue 15) ----------

# prefill = 0.01 + 1e-4·tokens, decode = 0.01 + 1e-4·|S|, fused step = 0.01 + 1e-4·tokens: one beta.
PER_TOKEN = AnalyticCost(beta=0.01, pre_tok=1e-4, dec_tok=1e-4, ctx=0.0, alpha=0.0, load_fixed=0.05,
                         load_per_rank=0.0)


def test_a_fused_step_pays_one_fixed_cost():
    # test_chunked_prefill_bounds_the_stall_of_a_long_prompt with fused steps. A (10-token prompt,
    # 2 out) at 0, B (1000 tokens, 2 out) at 0.005, chunks of 250, adapters cached.
    # Step 1 [0, 0.011): A's prompt, 0.01 + 10e-4. Step 2: B's first chunk beside A's decode, one
    # forward of 251 tokens = 0.0351 (two forwards: Pre(250) 0.035 + Dec(1) 0.0101 = 0.0451) →
    # A done at 0.0461, TPOT 0.0351. Steps 3-5: B's chunks alone, 0.035 each → B's first token at
    # 0.1511 (TTFT 0.1461); step 6: B's decode 0.0101 → 0.1612.
    reqs = [SimRequest(0.0, 10, 2, "x", 8), SimRequest(0.005, 1000, 2, "x", 8)]
    cfg = SimConfig(n_workers=1, cold_start="cached", prefill_chunk=250)
    fused = simulate(reqs, "round_robin", PER_TOKEN, cfg)
    assert fused.tpot.tolist() == pytest.approx([0.0351, 0.0101])
    assert fused.ttft.tolist() == pytest.approx([0.011, 0.1461])
    assert fused.latency[1] == pytest.approx(0.1612 - 0.005)
    two = simulate(reqs, "round_robin", PER_TOKEN, dataclasses.replace(cfg, fused_step=False))
    assert two.tpot[0] == pytest.approx(0.0451)


def test_a_mixed_step_costs_the_step_model_of_the_merged_batch():
    # A (rank 16, 20-token prompt, 2 out) is alone in step 1; B (rank 64, 200-token prompt, 3 out)
    # arrives during it. Step 2 holds A's one decode and B's whole prompt: A's TPOT is that step's
    # duration. Fused: step_time of the merged batch (ranks (16, 64), 201 tokens, context
    # (20 + 1) + 200). Two forwards: Pre(B's chunk) + Dec(A). A10 model: the fused step reads the
    # weights once and skips the prefill's 5 ms intercept, so it is cheaper by about that (the
    # merged batch's padded LoRA read, 2 x 64 rank units, and its mean-rank compute term move it
    # by 0.03 ms: their features do not add up across the two batches).
    a10 = cm.load(COST_MODELS / "a10_paper.json")
    reqs = [SimRequest(0.0, 20, 2, "a", 16), SimRequest(0.001, 200, 3, "b", 64)]
    cfg = SimConfig(n_workers=1, cold_start="cached")
    fused = simulate(reqs, "round_robin", a10, cfg)
    two = simulate(reqs, "round_robin", a10, dataclasses.replace(cfg, fused_step=False))
    merged = Batch((16, 64), 1 + 200, 21 + 200)
    assert fused.tpot[0] == pytest.approx(a10.step_time(merged), rel=1e-12)
    pre_dec = a10.prefill_time(Batch((64,), 200, 200)) + a10.decode_time(Batch((16,), 1, 21))
    assert two.tpot[0] == pytest.approx(pre_dec, rel=1e-12)
    assert pre_dec - fused.tpot[0] == pytest.approx(5e-3, abs=1e-4)
    # A decode-only step is the step model of the decodes: B's last step decodes it alone.
    assert fused.latency[1] - fused.ttft[1] == pytest.approx(
        a10.step_time(Batch((64,), 1, 201)) + a10.step_time(Batch((64,), 1, 202)), rel=1e-12)


def test_two_forward_pricing_reproduces_the_simulator_before_the_fused_step():
    # Per-request sums of a small conv workload, computed with the simulator before `fused_step`
    # existed (commit e089908), under the A10 model (`wait`) and AnalyticCost (`cpu_assist`):
    # fused_step=False must give the very same floats.
    reqs = load_trace(TRACE, n_requests=200, rate_scale=1, n_adapters=50, max_prompt=4096,
                      max_output=512, seed=4)
    cfg = SimConfig(n_workers=8, kv_rows=40_000, adapter_pages=16, slo_tpot=0.04, fused_step=False)
    old = {"wait": (97.09254322620994, 1547.3264892128, 69, 0.995, 0),
           "cpu_assist": (108.21692003333676, 1288.4557778000035, 65, 1.0, 14807)}
    for cold, cost in (("wait", a10_first_principles("padded")), ("cpu_assist", AnalyticCost())):
        r = simulate(reqs, "carajax", cost, dataclasses.replace(cfg, cold_start=cold))
        s = r.summary()
        got = (float(r.ttft.sum()), float(r.latency.sum()), r.loads, s["slo_attainment"],
               s["cpu_prefill_tokens"])
        assert got == old[cold], cold
        fused = simulate(reqs, "carajax", cost, dataclasses.replace(cfg, cold_start=cold, fused_step=True))
        assert float(fused.latency.sum()) != old[cold][1]  # the default prices something else


def test_fused_steps_need_a_step_model():
    old = dataclasses.replace(a10_first_principles("padded"), step=None)  # a model fitted before
    reqs = [SimRequest(0.0, 10, 2, "x", 8)]
    with pytest.raises(ValueError, match=r"has none.*carajax profile --fit.*fused_step=False"):
        simulate(reqs, "round_robin", old, SimConfig(n_workers=1))
    r = simulate(reqs, "round_robin", old, SimConfig(n_workers=1, fused_step=False))
    assert r.tokens.tolist() == [2]
