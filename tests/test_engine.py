"""The continuous-batching engine: same greedy tokens under every batch mix and cold-start policy,
CPU-assisted prefill that hands over mid-prompt, eviction, and bad input that fails alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import carajax
from carajax.config import ATTENTION_MODULES, TARGET_MODULES, EngineConfig
from carajax.engine.runner import ModelRunner
from carajax.lora.adapter import LoraAdapter, LoraModule
from carajax.models import weights
from carajax.models.tokenizer import ByteTokenizer
from carajax.testing import write_random_adapter

RANKS = [8, 16, 32, 64, 8, 16, 32, 64]
NAMES = [f"a{i}" for i in range(len(RANKS))]
GREEDY = carajax.SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=())
# A request that runs until the test cancels it: 900 tokens (prompt and all fit llama-test's
# 1024-position context), and the tests that use it step the engine themselves
# (background=False), far fewer times than that.
LONG = dataclasses.replace(GREEDY, max_tokens=900)


def run_until(engine: carajax.Engine, done, max_steps: int = 2000) -> None:
    """Drive an engine built with background=False until `done()`: no clock in the test."""
    for _ in range(max_steps):
        if done():
            return
        assert engine.step(), "the engine went idle first"
    raise AssertionError(f"not done after {max_steps} steps")


def tokens_so_far(engine: carajax.Engine, handle) -> int:
    return next((r["output_tokens"] for r in engine.stats()["running"]
                 if r["request_id"] == handle.request_id), 0)


def _prompt(i: int, n: int) -> list[int]:
    rng = np.random.default_rng(100 + i)
    return [2, *rng.integers(4, 256, n - 1).tolist()]


# Ten requests: 8 adapters of mixed ranks, the base model, one adapter twice; prompt lengths
# from 5 to 96 tokens (several chunks of 16).
REQUESTS = [(_prompt(i, n), a) for i, (n, a) in enumerate(zip(
    [96, 5, 40, 17, 64, 33, 9, 80, 21, 50], [*NAMES, None, "a3"]))]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("engine-adapters")
    return {name: write_random_adapter(root / name, tiny_config, rank=r, seed=i,
                                       target_modules=TARGET_MODULES if i % 2 else ATTENTION_MODULES)
            for i, (name, r) in enumerate(zip(NAMES, RANKS))}


def make_engine(adapter_dirs=None, background: bool = True, **config) -> carajax.Engine:
    # init_std 0.1: peaked logits, so greedy choices are far from ties.
    model = weights.random_model(carajax.ModelConfig.from_name("llama-test"), seed=0, init_std=0.1)
    engine = carajax.Engine(model, ByteTokenizer(),
                            EngineConfig(**{"max_batch_size": 8, "prefill_chunk": 16, **config}),
                            background=background)
    for name, path in (adapter_dirs or {}).items():
        engine.add_adapter(name, path)
    return engine


@pytest.fixture(scope="module")
def alone(adapter_dirs):
    """Each request served alone with its adapter cached: the reference tokens."""
    with make_engine(adapter_dirs, cold_start="cached") as engine:
        return [engine.generate([p], adapters=[a], sampling=GREEDY)[0].token_ids
                for p, a in REQUESTS]


@pytest.mark.parametrize("policy", ["cached", "wait", "cpu_assist"])
def test_mixed_batch_gives_the_same_tokens_under_every_policy(adapter_dirs, alone, policy):
    # A link slow enough (20 ms per copy) that cold prefills start on the CPU.
    link = {} if policy == "cached" else dict(emulated_link_gbps=1.0, emulated_link_latency_ms=20)
    with make_engine(adapter_dirs, cold_start=policy, **link) as engine:
        outs = engine.generate([p for p, _ in REQUESTS], adapters=[a for _, a in REQUESTS],
                               sampling=GREEDY)
        stats = engine.stats()
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason == "length" and len(o.token_ids) == 10 for o in outs)
    assert stats["running"] == [] and stats["waiting"] == 0
    cpu_tokens = [o.metrics.cpu_prefill_tokens for o in outs]
    if policy != "cpu_assist":
        assert cpu_tokens == [0] * len(outs)
        return
    # Every cold adapter's first chunk ran on the CPU; at least one long prompt handed over to
    # the device mid-prefill, exactly where its CPU tokens end.
    assert all(cpu_tokens[i] >= min(16, len(p)) for i, (p, a) in enumerate(REQUESTS[:8]))
    handed = [o for o, (p, _) in zip(outs, REQUESTS)
              if o.metrics.handover_token is not None and o.metrics.handover_token < len(p)]
    assert handed, cpu_tokens
    assert all(o.metrics.handover_token == o.metrics.cpu_prefill_tokens for o in handed)
    assert outs[8].metrics.cpu_prefill_tokens == 0  # the base-model request


def test_warmup_stops_at_the_largest_step_the_batch_can_fill(adapter_dirs, alone):
    # 4 sequences of 16-token chunks: no step holds more than 64 tokens (a chunk lengthens only
    # into its bucket's padding), so warm-up compiles no 128- to 512-token variant, and mixed
    # traffic afterwards compiles nothing.
    assert EngineConfig(max_batch_size=4, prefill_chunk=16).step_token_limit == 64
    assert EngineConfig(max_batch_size=8, prefill_chunk=256).step_token_limit == 512  # the default
    with make_engine(adapter_dirs, cold_start="cached", max_batch_size=4) as engine:
        engine.warmup()
        before = ModelRunner.compiled_variants()
        outs = engine.generate([p for p, _ in REQUESTS], adapters=[a for _, a in REQUESTS],
                               sampling=GREEDY)
        assert ModelRunner.compiled_variants() == before
    assert [o.token_ids for o in outs] == alone


def test_streaming_handle_and_metrics(adapter_dirs, alone):
    with make_engine(adapter_dirs, cold_start="cached") as engine:
        prompt, adapter = REQUESTS[2]
        handle = engine.submit(prompt, adapter=adapter, sampling=GREEDY)
        streamed = list(handle)
        out = handle.result()
    assert streamed == out.token_ids == alone[2]
    m = out.metrics
    assert m.prompt_tokens == len(prompt) and m.output_tokens == 10
    assert 0 < m.ttft_s <= m.latency_s
    assert m.tpot_s == pytest.approx((m.finish_time - m.first_token_time) / 9)


def test_async_streaming(adapter_dirs, alone):
    import asyncio

    async def run(engine):
        prompt, adapter = REQUESTS[4]
        handle = engine.submit(prompt, adapter=adapter, sampling=GREEDY)
        return [t async for t in handle], await handle.aresult()

    with make_engine(adapter_dirs, cold_start="cached") as engine:
        streamed, out = asyncio.run(run(engine))
    assert streamed == out.token_ids == alone[4]


def test_cpu_assist_lowers_cold_ttft_and_stalls_nobody(adapter_dirs):
    """A warm request is decoding when a cold one arrives over a slow emulated link (1 s per
    copy). `wait` blocks the whole batch for the copy; `cpu_assist` starts the cold prefill on the
    CPU at once. Asserted from the requests' metrics."""
    results = {}
    for policy in ("wait", "cpu_assist"):
        # One chunk holds the cold prompt (17 tokens), so its whole prefill is the step planned
        # while the copy is in flight, however long that step takes to compile.
        with make_engine(cold_start=policy, emulated_link_gbps=1.0, background=False,
                         emulated_link_latency_ms=1000, prefill_chunk=32) as engine:
            for name in ("warm", "cold", "warmup"):
                engine.add_adapter(name, adapter_dirs[{"warm": "a0", "cold": "a1",
                                                       "warmup": "a2"}[name]])
            engine.pin_adapter("warm")
            # Compile the step variants this scenario uses, so timings are not compile times.
            engine.generate([REQUESTS[0][0]], adapters=["warmup"], sampling=GREEDY)
            warm = engine.submit(REQUESTS[1][0], adapter="warm", sampling=LONG)
            run_until(engine, lambda w=warm: tokens_so_far(engine, w) >= 2)  # warm is decoding
            cold = engine.submit(REQUESTS[3][0], adapter="cold", sampling=GREEDY)
            during_copy = 0  # warm tokens from steps that ran while the cold copy was in flight
            while not cold.done:
                loading, before = engine.pool.where("cold") == "loading", tokens_so_far(engine, warm)
                engine.step()
                during_copy += (tokens_so_far(engine, warm) - before) if loading else 0
            assert warm.cancel()  # still running: it shared every step with the cold one
            results[policy] = (warm.result(), cold.result(), during_copy)
    (w_warm, w_cold, _), (c_warm, c_cold, c_during) = results["wait"], results["cpu_assist"]
    assert w_cold.metrics.cold_start and c_cold.metrics.cold_start
    assert c_cold.metrics.ttft_s < w_cold.metrics.ttft_s
    assert w_cold.metrics.ttft_s >= 0.9  # it waited for its own copy ...
    assert w_warm.metrics.stalled_s >= 0.9  # ... and so did the request already running
    # cpu_assist: nobody waited; the warm request decoded on while the 1 s copy was in flight
    # (several steps' worth, each well under the copy's second).
    assert c_during >= 2
    assert c_warm.metrics.stalled_s == 0.0 and c_cold.metrics.stalled_s == 0.0
    assert c_cold.metrics.cpu_prefill_tokens == len(REQUESTS[3][0])
    assert w_cold.metrics.cpu_prefill_tokens == 0
    assert c_cold.token_ids == w_cold.token_ids


def test_eviction_respects_lru_pins_and_running_requests(adapter_dirs, alone, tiny_config):
    """A device budget of 3 pages holds three rank-16-or-less adapters (one page each; a rank-32
    adapter takes two). a0 is pinned; a1 runs a long request while others come and go."""
    page_bytes = 16 * tiny_config.num_layers * sum(
        sum(tiny_config.projection_shape(m)) for m in TARGET_MODULES) * 4
    small = {n: adapter_dirs[n] for n in ("a0", "a1", "a4", "a5")}  # ranks 8, 16, 8, 16
    with make_engine(small, cold_start="wait", device_lora_budget_bytes=3 * page_bytes,
                     background=False) as engine:
        pool = engine.pool
        assert pool.stats()["pages_total"] == 3
        engine.pin_adapter("a0")
        long = engine.submit(REQUESTS[1][0], adapter="a1", sampling=LONG)
        run_until(engine, lambda: tokens_so_far(engine, long) >= 10)  # a1 in use until cancelled
        for name in ("a4", "a5", "a4"):  # each needs the third page: evicts the other one
            idx = NAMES.index(name)
            out = engine.generate([REQUESTS[idx][0]], adapters=[name], sampling=GREEDY)[0]
            assert out.token_ids == alone[idx]
            on_device = set(pool.stats()["on_device"])
            assert {"a0", "a1", name} == on_device
        assert long.cancel()  # a1 was in use throughout
        assert long.result().token_ids[:10] == alone[1]


def test_bad_requests_fail_alone(adapter_dirs, alone, tmp_path, tiny_config):
    with make_engine({n: adapter_dirs[n] for n in ("a0", "a2")}, cold_start="cpu_assist",
                     max_queue=3, max_batch_size=1, max_tokens_limit=4000, background=False) as engine:
        # One KV row: this request holds it until cancelled while the others queue.
        first = engine.submit(REQUESTS[2][0], adapter="a2", sampling=LONG)
        run_until(engine, lambda: tokens_so_far(engine, first) >= 10)
        queued = [engine.submit(REQUESTS[0][0], adapter="a0", sampling=GREEDY)
                  for _ in range(3)]
        with pytest.raises(carajax.QueueFullError, match="3 requests"):
            engine.submit(REQUESTS[0][0], adapter="a0", sampling=GREEDY)
        assert not first.done  # the queue was full because the row was taken
        with pytest.raises(carajax.AdapterError, match="unknown adapter 'nope'"):
            engine.submit([2, 3], adapter="nope")
        with pytest.raises(carajax.RequestError, match="context length"):
            engine.submit([5] * engine.runner.seq_len)
        # Prompt + max_tokens must fit the context: refused at once, not cut short later.
        n = engine.runner.seq_len - 4
        with pytest.raises(carajax.RequestError, match=r"over the context length .* at most 4"):
            engine.submit([5] * n, sampling=carajax.SamplingParams(max_tokens=5))
        with pytest.raises(carajax.RequestError, match="max_tokens 4001 is over the limit"):
            engine.submit([2, 3], sampling=carajax.SamplingParams(max_tokens=4001))
        big = write_random_adapter(tmp_path / "big", tiny_config, rank=128)
        with pytest.raises(carajax.AdapterError, match="max_lora_rank=64"):
            engine.add_adapter("big", big)
        assert "big" not in engine.adapters
        assert first.cancel()
        assert first.result().token_ids[:10] == alone[2]  # (cancelled after >= 10 tokens)
        run_until(engine, lambda: all(h.done for h in queued))
        assert all(h.result().token_ids == alone[0] for h in queued)


def test_cancel_frees_the_row_at_once_and_nobody_else_notices(adapter_dirs, alone):
    with make_engine({n: adapter_dirs[n] for n in ("a0", "a2")}, cold_start="cached",
                     max_batch_size=1, background=False) as engine:
        running = engine.submit(REQUESTS[2][0], adapter="a2", sampling=LONG)
        run_until(engine, lambda: tokens_so_far(engine, running) >= 10)
        queued = engine.submit(REQUESTS[0][0], adapter="a0", sampling=GREEDY)
        doomed = engine.submit(REQUESTS[8][0], sampling=GREEDY)
        assert engine.stats()["waiting"] == 2
        assert doomed.cancel()  # still queued: leaves the queue without running
        assert running.cancel()  # holds the only row: frees it for `queued`
        out = running.result(timeout=0)  # finished at once, without a step
        assert out.finish_reason == "cancelled" and 10 <= len(out.token_ids) < 4000
        assert out.token_ids[:10] == alone[2]
        run_until(engine, lambda: queued.done)
        assert queued.result().token_ids == alone[0]
        gone = doomed.result(timeout=0)
        assert gone.finish_reason == "cancelled" and gone.token_ids == []
        assert not running.cancel() and not engine.cancel("no-such-request")
        stats = engine.stats()
        assert stats["running"] == [] and stats["waiting"] == 0
        assert engine.pool.stats()["in_use"] == {}  # no adapter reference left behind


def test_cpu_worker_exception_fails_only_its_request(adapter_dirs, alone, tiny_config):
    with make_engine({"a0": adapter_dirs["a0"]}, cold_start="cpu_assist",
                     emulated_link_gbps=1.0, emulated_link_latency_ms=5000) as engine:
        # A host copy of "bad" whose q_proj A has the wrong width: the CPU LoRA raises inside
        # the host callback. (The device copy never lands within the test: 5 s link.)
        good_weights = carajax.load_adapter(adapter_dirs["a1"], tiny_config, max_rank=64)
        engine.add_adapter("bad", adapter_dirs["a1"])
        broken = dict(good_weights.modules)
        m = broken[(0, "q_proj")]
        broken[(0, "q_proj")] = LoraModule(a=np.ones((m.rank, 7), np.float32), b=m.b, scale=1.0)
        engine._forget_cpu_id("bad")  # (none yet: the bridge sees an adapter at its first CPU step)
        engine._cpu_ids["bad"] = engine.bridge.register(LoraAdapter("bad", "", broken))
        outs = engine.generate([REQUESTS[1][0], REQUESTS[0][0], REQUESTS[8][0]],
                               adapters=["bad", "a0", None], sampling=GREEDY)
        assert outs[0].finish_reason == "error" and "CPU LoRA" in outs[0].error
        assert outs[1].token_ids == alone[0] and outs[2].token_ids == alone[8]
        # The engine keeps serving.
        again = engine.generate([REQUESTS[8][0]], sampling=GREEDY)[0]
        assert again.token_ids == alone[8]


def test_cached_policy_refuses_adapters_that_do_not_fit(adapter_dirs, alone, tiny_config):
    page_bytes = 16 * tiny_config.num_layers * sum(
        sum(tiny_config.projection_shape(m)) for m in TARGET_MODULES) * 4
    # 3 pages: a0 (rank 8, 1 page) fits, a2 (rank 32, 2 pages) fits, a1 (rank 16) does not.
    with make_engine({"a0": adapter_dirs["a0"], "a2": adapter_dirs["a2"]}, cold_start="cached",
                     device_lora_budget_bytes=3 * page_bytes) as engine:
        with pytest.raises(carajax.AdapterError, match="needs 1 pages .* 0 of 3 pages"):
            engine.add_adapter("a1", adapter_dirs["a1"])
        assert "a1" not in engine.adapters
        assert set(engine.pool.stats()["on_device"]) == {"a0", "a2"}  # nothing was evicted
        outs = engine.generate([REQUESTS[0][0], REQUESTS[2][0]], adapters=["a0", "a2"],
                               sampling=GREEDY)
        assert [o.token_ids for o in outs] == [alone[0], alone[2]]
