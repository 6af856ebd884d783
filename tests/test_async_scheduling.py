"""Async scheduling: step N + 1 is planned and launched before step N's tokens reach the host.

Specification: it changes when the host waits, never what a request gets. Every request's
tokens, finish reason and length equal those of the engine that waits for every step, under
stop tokens (the step planned ahead wastes one token, dropped), max_tokens, seeded sampling
(each token's seed step counts the token still on the device), preemption and cancellation.
"""

from __future__ import annotations

import numpy as np
import pytest

import carajax
from carajax.config import EngineConfig, ModelConfig
from carajax.engine.engine import Engine
from carajax.models import weights

CFG = ModelConfig.from_name("llama-test")


def _engine(async_scheduling: bool, pages: int = 64, **kw) -> Engine:
    model = weights.random_model(CFG, seed=0, init_std=0.1)
    config = EngineConfig(max_batch_size=4, max_seq_len=64, prefill_chunk=8, max_step_tokens=32,
                          cold_start="cached", async_scheduling=async_scheduling,
                          kv_cache_bytes=pages * 16 * CFG.kv_bytes_per_token(4), **kw)
    return Engine(model, None, config, background=False)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[2, *rng.integers(4, 250, int(rng.integers(3, 24))).tolist()] for _ in range(n)]


def _run(async_scheduling: bool, prompts, sampling, pages: int = 64):
    with _engine(async_scheduling, pages) as e:
        outs = e.generate(prompts, sampling=sampling)
        e.planner.pages.check()
        assert e.planner.pages.num_free == e.runner.layout.num_pages  # every page back
        assert not e.planner.running and not e.planner.waiting
        stats = e.stats()
    return [(o.token_ids, o.finish_reason) for o in outs], stats


def test_greedy_tokens_and_stops_equal_the_waiting_engine():
    prompts = _prompts(7)
    plain = [carajax.SamplingParams(max_tokens=m, temperature=0.0, stop_token_ids=())
             for m in (1, 2, 5, 9, 12, 3, 7)]
    ref, _ = _run(False, prompts, plain)
    # Stop tokens the requests really produce mid-reply: after them the engine that planned
    # ahead has one wasted token per stopped request, which must not show.
    stops = [carajax.SamplingParams(max_tokens=12, temperature=0.0,
                                    stop_token_ids=(toks[len(toks) // 2],) if len(toks) > 2 else ())
             for toks, _ in ref]
    for sampling in (plain, stops):
        want, _ = _run(False, prompts, sampling)
        got, stats = _run(True, prompts, sampling)
        assert got == want
        assert stats["async_scheduling"] and stats["step_wait_ms"] is not None
    stopped, _ = _run(True, prompts, stops)
    assert sum(reason == "stop" for _, reason in stopped) >= 4  # the stops were exercised


def test_seeded_sampling_equals_the_waiting_engine():
    prompts = _prompts(5, seed=1)
    sampling = [carajax.SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=s)
                for s in range(5)]
    want, _ = _run(False, prompts, sampling)
    got, _ = _run(True, prompts, sampling)
    assert got == want
    assert len({tuple(t) for t, _ in got}) == 5  # really sampled, not one greedy path


def test_preemption_under_async_scheduling_gives_the_same_tokens():
    """Four requests of up to 23 + 30 positions on 8 pages: preemptions happen while a step is
    in flight (a preempted request keeps the token it had pending, recomputes later)."""
    prompts = _prompts(4, seed=2)
    greedy = carajax.SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=())
    want, _ = _run(False, prompts, greedy, pages=64)
    got, stats = _run(True, prompts, greedy, pages=8)
    assert stats["kv_cache"]["preemptions"] >= 1
    assert got == want


def test_cancel_while_a_step_is_in_flight_frees_everything():
    with _engine(True) as e:
        greedy = carajax.SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=())
        handles = [e.submit(p, sampling=greedy) for p in _prompts(3, seed=3)]
        for _ in range(4):
            e.step()
        assert e._inflight is not None  # a step is on the device right now
        assert handles[1].cancel()
        while e.step():
            pass
        outs = [h.result() for h in handles]
        assert [o.finish_reason for o in outs] == ["length", "cancelled", "length"]
        assert len(outs[0].token_ids) == 20 and len(outs[1].token_ids) < 20
        assert e.planner.pages.num_free == e.runner.layout.num_pages


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_stats_report_host_and_wait_times(async_scheduling):
    with _engine(async_scheduling) as e:
        e.generate(_prompts(3, seed=4), sampling=carajax.SamplingParams(max_tokens=6,
                                                                          temperature=0.0))
        s = e.stats()
    assert s["async_scheduling"] is async_scheduling
    # The wait for a step's tokens lies inside its period; host time is spent on both sides of
    # the launch, so it is only bounded by the steps' sum (a tiny model's device is fast).
    assert s["step_host_ms"] > 0 and s["step_ms"] > 0
    assert 0 <= s["step_wait_ms"] <= s["step_ms"]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_the_next_step_is_launched_before_the_last_ones_tokens_are_read(async_scheduling):
    """What async scheduling is for: the device gets step N + 1 before the host reads step N's
    tokens (launch, launch, wait, launch, wait, ...), where the waiting engine alternates launch
    and wait."""
    events = []
    with _engine(async_scheduling) as e:
        launch, wait = e.runner.launch, e.runner.wait

        def logged_launch(inputs):
            events.append("launch")
            return launch(inputs)

        def logged_wait(tokens):
            events.append("wait")
            return wait(tokens)

        e.runner.launch, e.runner.wait = logged_launch, logged_wait
        e.generate(_prompts(3, seed=4), sampling=carajax.SamplingParams(
            max_tokens=8, temperature=0.0, stop_token_ids=()))
    # Steps on the device when the host starts waiting for one: 2 = the next was launched first.
    in_flight, launched, waited = [], 0, 0
    for event in events:
        launched += event == "launch"
        waited += event == "wait"
        if event == "wait":
            in_flight.append(launched - waited + 1)
    assert len(in_flight) == launched >= 8
    if async_scheduling:
        assert in_flight.count(2) >= len(in_flight) - 3  # all but the last few steps
    else:
        assert set(in_flight) == {1}
