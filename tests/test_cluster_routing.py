"""What a Ray replica publishes for our router, without Ray: finished reply lengths reach the
policy once each (the SLO-risk term learns the reply-length distribution from every replica);
the host tier, summarised, prices disk reads."""

from __future__ import annotations

import os

import pytest

import carajax
from carajax.cluster import routing
from carajax.config import EngineConfig, ModelConfig
from carajax.models import weights
from carajax.sched.router import make_policy
from carajax.server.worker import CaraServeServicer


def test_new_outputs_reports_each_finished_reply_once():
    first = {"finished_count": 3, "recent_outputs": [5, 7, 9]}
    assert routing.new_outputs(first, 0) == ([5, 7, 9], 3)
    assert routing.new_outputs(first, 3) == ([], 3)  # the same snapshot again: nothing new
    later = {"finished_count": 5, "recent_outputs": [5, 7, 9, 11, 13]}
    assert routing.new_outputs(later, 3) == ([11, 13], 5)
    # Polled too rarely: only the recent ones the replica kept.
    far = {"finished_count": 900, "recent_outputs": [1, 2]}
    assert routing.new_outputs(far, 5) == ([1, 2], 900)


def test_a_replicas_stats_carry_its_finished_replies_to_the_policy():
    model = weights.random_model(ModelConfig.from_name("llama-test"), seed=0)
    with carajax.Engine(model, None, EngineConfig(max_batch_size=2, cold_start="cached"),
                        background=False) as engine:
        lengths = [3, 6, 4]
        engine.generate([[2, 10 + i, 20] for i in range(3)], sampling=[
            carajax.SamplingParams(max_tokens=n, temperature=0.0, stop_token_ids=()) for n in lengths])
        stats = routing.replica_stats(engine, CaraServeServicer(engine, name="r0"), name="r0")
    assert stats["finished_count"] == 3 and sorted(stats["recent_outputs"]) == sorted(lengths)
    policy = make_policy("carajax", avg_output_len=100.0)
    new, seen = routing.new_outputs(stats, 0)
    for n in new:
        policy.observe_output(n)
    assert seen == 3 and policy.outputs.counts() == {3: 1, 4: 1, 6: 1}


def test_a_replicas_stats_carry_its_host_tier_not_its_registry(tmp_path, tiny_config):
    """Forty adapters registered under a host budget that holds about one: the snapshot counts
    them and names only those in host memory (its size does not grow with the registry); the
    router's view prices a disk read for the others, at the replica's own read speed, and none
    for the one in memory."""
    from carajax.testing import write_random_adapter
    from tests.test_host_tier import R16_HOST_BYTES

    path = write_random_adapter(tmp_path / "a", tiny_config, rank=16, seed=1)
    model = weights.random_model(tiny_config, seed=0)
    config = EngineConfig(max_batch_size=2, cold_start="async", host_lora_budget_bytes=R16_HOST_BYTES)
    with carajax.Engine(model, None, config, background=False) as engine:
        for i in range(40):
            engine.add_adapter(f"a{i}", path)
        engine.generate([[2, 10, 20]], adapters=["a7"], sampling=[
            carajax.SamplingParams(max_tokens=2, temperature=0.0, stop_token_ids=())])
        stats = routing.replica_stats(engine, CaraServeServicer(engine, name="r0"), name="r0")
    assert stats["registered"] == 40 and stats["in_host"] == ["a7"] and "adapters" not in stats
    assert stats["read_bytes_per_s"] > 0 and stats["read_bytes_per_rank"] > 0
    view = routing.worker_state(stats, cost=None)
    assert view.read_seconds("a7", 16) == 0.0
    cold = view.read_seconds("a8", 16)
    file_bytes = os.path.getsize(os.path.join(path, "adapter_model.safetensors"))
    assert cold == pytest.approx(stats["read_latency_s"] + file_bytes / stats["read_bytes_per_s"],
                                 rel=0.05)
