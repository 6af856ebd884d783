"""What a Ray replica publishes for our router, without Ray: finished reply lengths reach the
policy once each (the SLO-risk term learns the reply-length distribution from every replica)."""

from __future__ import annotations

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
