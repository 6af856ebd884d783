"""The paged KV cache: page accounting, admission by free pages, preemption under pressure."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import carajax
from carajax.config import EngineConfig, ModelConfig
from carajax.engine.engine import Engine
from carajax.engine.kv_pages import KVLayout, PageAllocator
from carajax.models import weights

GREEDY = carajax.SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["grow", "free"]), st.integers(0, 5), st.integers(0, 9)),
                max_size=60))
def test_allocator_never_leaks_or_shares_a_page(ops):
    alloc = PageAllocator(12)
    for op, owner, n in ops:
        before = {o: list(alloc.table(o)) for o in alloc.owners()}
        free_before = alloc.num_free
        if op == "grow":
            ok = alloc.grow(owner, n)
            have = len(before.get(owner, []))
            # All or nothing: it fits exactly when the missing pages are free.
            assert ok == (max(n - have, 0) <= free_before)
            if ok:
                assert len(alloc.table(owner)) == max(n, have)
                assert alloc.table(owner)[:have] == before.get(owner, [])  # old pages keep order
            else:
                assert {o: alloc.table(o) for o in alloc.owners()} == before
        else:
            assert alloc.free(owner) == len(before.get(owner, []))
        alloc.check()  # every page free or owned by exactly one
    for owner in alloc.owners():
        alloc.free(owner)
    assert alloc.num_free == 12


def test_layout_follows_the_byte_budget():
    cfg = ModelConfig.from_name("llama-test")  # 2 layers, 2 KV heads of 16: 512 B per position
    per_token = cfg.kv_bytes_per_token(4)
    assert per_token == 2 * 2 * 2 * 16 * 4
    layout = KVLayout.for_engine(EngineConfig(kv_cache_bytes=10 * 16 * per_token, max_seq_len=100),
                                 cfg, 4)
    assert (layout.num_pages, layout.page_size, layout.max_pages_per_seq) == (10, 16, 7)
    # The default: the bytes of the old fixed rows, max_batch_size x max_seq_len positions.
    default = KVLayout.for_engine(EngineConfig(max_batch_size=8, max_seq_len=128), cfg, 4)
    assert default.num_pages * default.page_size == 8 * 128


def _engine(pages: int, **kw) -> Engine:
    cfg = ModelConfig.from_name("llama-test")
    model = weights.random_model(cfg, seed=0, init_std=0.1)
    config = EngineConfig(max_batch_size=4, max_seq_len=64, prefill_chunk=8, max_step_tokens=32,
                          cold_start="cached",
                          kv_cache_bytes=pages * 16 * cfg.kv_bytes_per_token(4), **kw)
    return Engine(model, None, config, background=False)


PROMPTS = [[2, *range(10 + i, 30 + i)] for i in range(3)]  # 21 tokens each; + 30 new = 51


@pytest.fixture(scope="module")
def unpressured():
    with _engine(pages=64) as e:
        outs = e.generate(PROMPTS, sampling=GREEDY)
        assert e.stats()["kv_cache"]["preemptions"] == 0
        return [o.token_ids for o in outs]


def test_preempted_requests_give_the_same_greedy_tokens(unpressured):
    """Three requests of 51 positions (4 pages each) on a cache of 8 pages: they start
    together, run out of pages mid-generation, and the youngest is preempted (recomputed later)
    until the others finish. Nothing fails; the tokens are those of a cache with room."""
    with _engine(pages=8) as e:
        outs = e.generate(PROMPTS, sampling=GREEDY)
        st = e.stats()["kv_cache"]
        assert st["preemptions"] >= 1 and st["pages_free"] == st["pages_total"] == 8
        e.planner.pages.check()
    assert [o.finish_reason for o in outs] == ["length"] * 3
    assert [o.token_ids for o in outs] == unpressured
    assert sum(o.metrics.preemptions for o in outs) == st["preemptions"]


def test_random_submit_cancel_and_steps_leak_no_page():
    """Random submissions and cancellations between steps on a cache that cannot hold them
    all: after every step each page is free or held by exactly one running request (holding
    exactly the pages its computed tokens need), and when all is done every page is free."""
    rng = np.random.default_rng(0)
    with _engine(pages=6) as e:
        handles = []
        for _ in range(40):
            if rng.random() < 0.5:
                n = int(rng.integers(1, 40))
                handles.append(e.submit([2, *rng.integers(4, 250, n - 1).tolist()], sampling=(
                    carajax.SamplingParams(max_tokens=int(rng.integers(1, 20)), temperature=0.0))))
            if handles and rng.random() < 0.15:
                handles[int(rng.integers(len(handles)))].cancel()
            e.step()
            pages = e.planner.pages
            pages.check()
            for req in e.planner.running:
                assert len(pages.table(req)) == e.runner.layout.pages_for(req.num_computed) or (
                    req.num_computed == 0)
            assert set(pages.owners()) <= set(e.planner.running)
        while e.step():
            pass
        assert all(h.done for h in handles)
        assert "error" not in {h.result().finish_reason for h in handles}  # none fails
        assert e.planner.pages.num_free == 6


def test_prompt_larger_than_the_whole_cache_is_refused_at_submit():
    with _engine(pages=2) as e:  # 32 positions
        with pytest.raises(carajax.RequestError, match="KV cache holds 32"):
            e.submit(list(range(2, 42)))  # 40 tokens
        assert e.submit(list(range(2, 30))).result  # 28 fit


def test_time_per_token_target_caps_the_prefill_share():
    """Sarathi-Serve: with steps measured at 10 ms + 1 ms per token and a 40 ms target, a step
    holds at most 30 tokens; beside 6 decoding requests a prompt gets 24 of them. Without
    decoders, or before any fit, only max_prefill_tokens applies."""
    with _engine(pages=64, tpot_target_s=0.040) as e:
        planner = e.planner
        assert planner._prefill_cap(6) == planner.config.max_prefill_tokens  # no fit yet
        for tokens in (4, 8, 16, 32, 4, 8, 16, 32):
            planner.step_times.add(tokens, 0.010 + 0.001 * tokens)
        a, b = planner.step_times.fit()
        assert a == pytest.approx(0.010) and b == pytest.approx(0.001)
        assert planner.step_times.max_tokens(0.040) == 30
        assert planner._prefill_cap(6) == 24
        assert planner._prefill_cap(0) == planner.config.max_prefill_tokens
        assert planner._prefill_cap(29) == 16  # prompts always progress a little


def test_prefill_chunks_fill_the_padding_of_their_token_bucket():
    """A step of one decode and an 8-token chunk (prefill_chunk) would run padded to 16 tokens:
    the chunk grows to 15, the rest of the bucket, instead of computing padding."""
    with _engine(pages=64) as e:
        e.submit([2, 5, 6], sampling=GREEDY)
        e.step()  # its prompt; it decodes from now on
        e.submit(list(range(2, 42)), sampling=dataclasses.replace(GREEDY, max_tokens=24))  # 40 + 24 = 64
        plan = e.planner.schedule()
        assert [(c.is_decode, c.length) for c in plan.chunks] == [(True, 1), (False, 15)]
        assert e.runner.token_bucket(plan.num_tokens, decode_only=False) == 16
