"""Cost models fitted where they run: a worker reports its own step-latency model in Stats and the
router prices that worker with it; a rank-blind model is refused for the rank-aware policies; the
worker's own model comes from a quick profile of its device, cached on disk."""

from __future__ import annotations

import dataclasses

import pytest

import carajax
from carajax.config import EngineConfig, ModelConfig
from carajax.models import weights
from carajax.sched import cost_model as cm
from carajax.sched import local_cost_model as lcm
from carajax.server.router import serve_router
from carajax.server.worker import serve


def _model(decode_rank_coef: float, name: str) -> cm.CostModel:
    # RichForm order: tokens, tokens*mean_rank, context, size, size*max_rank, sum_rank, one
    decode = cm.RichForm((1e-5, 0.0, 1e-7, 0.0, 0.0, decode_rank_coef, 2e-3))
    prefill = cm.RichForm((2e-5, 0.0, 1e-7, 0.0, 0.0, decode_rank_coef, 1e-3))
    return cm.CostModel(prefill=prefill, decode=decode, kernel="padded", model_name=name,
                        device="test device", step=decode)


def test_a_model_with_no_rank_terms_is_refused_for_rank_aware_policies():
    blind, aware = _model(0.0, "blind"), _model(1e-6, "aware")
    assert not blind.rank_aware and aware.rank_aware
    for policy in ("carajax", "caraserve"):
        with pytest.raises(cm.RankBlindModelError, match="every rank coefficient at 0"):
            cm.require_rank_terms(blind, policy)
        cm.require_rank_terms(aware, policy)
    cm.require_rank_terms(blind, "most_idle")  # a rank-blind policy does not care
    # The shipped CPU model measured rank terms (base rows skip LoRA; any adapter costs).
    assert cm.default_cost_model().rank_aware


@pytest.fixture(scope="module")
def worker_engine():
    model = weights.random_model(ModelConfig.from_name("llama-test"), seed=0)
    engine = carajax.Engine(model, None, EngineConfig(max_batch_size=2, cold_start="cached"))
    yield engine
    engine.close()


def test_the_router_prices_each_worker_with_the_model_it_reports(worker_engine):
    own, blind = _model(3e-6, "its-own"), _model(0.0, "blind")
    default = _model(1e-6, "router-default")
    a = serve(worker_engine, 0, host="127.0.0.1", name="a")
    b = serve(worker_engine, 0, host="127.0.0.1", name="b")
    c = serve(worker_engine, 0, host="127.0.0.1", name="c")
    a.servicer.cost_model_json = own.to_json()
    b.servicer.cost_model_json = blind.to_json()  # c reports none
    router = serve_router([a.address, b.address, c.address], 0, host="127.0.0.1",
                          policy="carajax", cost=default)
    try:
        links = {link.name: link for link in router.servicer.links}
        assert links["a"].state.cost.to_json() == own.to_json()
        assert links["a"].cost_source.startswith("its own: its-own")
        # b's model cannot price ranks: refused, b is priced with the router's own
        assert links["b"].state.cost is default and "router default" in links["b"].cost_source
        assert links["c"].state.cost is default
        metrics = router.servicer.registry.get_sample_value(
            "carajax_router_cost_model_info", {"worker": "a", "cost_model": links["a"].cost_source})
        assert metrics == 1.0
        # A worker that changes its model (a fresh profile) is re-read on the next poll.
        a.servicer.cost_model_json = _model(5e-6, "refitted").to_json()
        router.poll_now()
        assert links["a"].state.cost.model_name == "refitted"
    finally:
        router.stop(0)
        for w in (a, b, c):
            w.stop(0)


def test_the_router_refuses_a_rank_blind_default_for_a_rank_aware_policy(worker_engine):
    a = serve(worker_engine, 0, host="127.0.0.1", name="a")
    try:
        with pytest.raises(cm.RankBlindModelError):
            serve_router([a.address], 0, host="127.0.0.1", policy="caraserve",
                         cost=_model(0.0, "blind"))
        serve_router([a.address], 0, host="127.0.0.1", policy="most_idle",
                     cost=_model(0.0, "blind")).stop(0)
    finally:
        a.stop(0)


def test_a_workers_own_model_is_profiled_once_then_read_from_the_cache(worker_engine, tmp_path,
                                                                      monkeypatch):
    """Profiled on the worker's own engine (tests/test_worker_memory.py: in place, one copy of the
    weights), then read from the cache under a key of the engine's shapes."""
    monkeypatch.setenv("CARAJAX_HOME", str(tmp_path))
    calls = []
    real = lcm.profiler.profile_engine
    # 256-token prompts: the rank-64 LoRA work stands out of a busy machine's noise (16 tokens
    # once fitted every rank term to 0; so did 64, once q/k/v's LoRA ran as one GEMM: a
    # full-suite run, and 1 of 2 runs beside another pytest on the 2 cores; 256: 3 of 3).
    tiny = dataclasses.replace(lcm.QUICK, batch_sizes=(1, 2), prompt_tokens=(256,), contexts=(0,),
                               rank_mixes=("base", "uniform8", "uniform64"), repeats=3,
                               load_ranks=(8,), load_repeats=1)

    def counting(engine, *a, **k):
        calls.append(engine)
        return real(engine, *a, **k)

    monkeypatch.setattr(lcm.profiler, "profile_engine", counting)
    first, path, cached = lcm.local_cost_model(worker_engine, grid=tiny)
    assert not cached and path.exists() and path.parent == tmp_path / "cost_models"
    assert first.step is not None and first.rank_aware and "cpu" in first.device
    second, path2, cached2 = lcm.local_cost_model(worker_engine, grid=tiny)
    assert cached2 and path2 == path and second.to_json() == first.to_json()
    assert calls == [worker_engine]
    # Another dtype is another engine shape: its own file (the key needs no profile, nor compile).
    model = weights.random_model(ModelConfig.from_name("llama-test"), dtype="bfloat16", seed=0)
    with carajax.Engine(model, None, dataclasses.replace(worker_engine.config, dtype="bfloat16")) as bf16:
        assert lcm.cache_key(bf16, tiny) != path.stem
