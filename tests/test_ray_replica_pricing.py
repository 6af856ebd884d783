"""Each Ray replica is priced by its own cost model, without a cluster: a replica (built
in-process) profiles its own engine in place at start (`auto`, cached per device, model and
engine shape, so a second replica of the same shape reads the file), or loads the file it is
given, or reports none; it publishes the model in its routing stats, and the router prices it
with that model and says so in its summary (/router)."""

from __future__ import annotations

import dataclasses
import json

import pytest

ray_serve = pytest.importorskip("ray.serve")

from carajax.cluster.ray_router import CarajaxRequestRouter  # noqa: E402
from carajax.cluster.replica import CarajaxReplica  # noqa: E402
from carajax.sched import cost_model as cm  # noqa: E402
from carajax.sched import local_cost_model as lcm  # noqa: E402
from tests.test_worker_cost_models import _model  # noqa: E402

ENGINE = {"max_batch_size": 2, "cold_start": "cached"}


@pytest.fixture
def replicas(monkeypatch, tmp_path):
    """CarajaxReplica(**kw) outside Serve (no replica context), under an empty CARAJAX_HOME,
    with a small profiling grid; closed at the end. Yields (make, profiles run)."""
    monkeypatch.setenv("CARAJAX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(ray_serve, "get_replica_context", lambda: None)
    tiny = dataclasses.replace(lcm.QUICK, batch_sizes=(1, 2), prompt_tokens=(64,), contexts=(0,),
                               rank_mixes=("base", "uniform8", "uniform64"), repeats=3,
                               load_ranks=(8,), load_repeats=1)
    monkeypatch.setattr(lcm, "QUICK", tiny)
    monkeypatch.setattr(lcm.local_cost_model, "__defaults__", None)  # grid: keyword-only below
    monkeypatch.setattr(lcm.local_cost_model, "__kwdefaults__", {"grid": tiny, "progress": False})
    profiles = []
    real = lcm.profiler.profile_engine
    monkeypatch.setattr(lcm.profiler, "profile_engine",
                        lambda engine, grid, **kw: profiles.append(engine) or real(engine, grid, **kw))
    made = []

    def make(**kw):
        made.append(CarajaxReplica(engine_config=ENGINE, warmup=False, **kw))
        return made[-1]

    yield make, profiles
    for r in made:
        r.serving.close()
        r.engine.close()


def test_a_replica_profiles_its_own_engine_once_and_publishes_the_model(replicas, monkeypatch):
    make, profiles = replicas
    first = make(cost_model="auto")
    assert profiles == [first.engine]  # in place: the serving engine itself, not a second one
    published = cm.CostModel.from_json(first.record_routing_stats()["cost_model"])
    # Fitted here, on this engine (whether its rank terms come out above 0 on a tiny model is up to
    # the timings: a busy 2-core CI box fitted them to 0 once; the router then prices the replica
    # with its default, tested below).
    assert published.model_name == "carajax-demo" and "cpu" in published.device.lower()
    assert published.source.startswith("--cost-model auto") and max(published.prefill.coef) > 0
    monkeypatch.delenv("CARAJAX_COST_MODEL", raising=False)
    second = make(cost_model=None)  # the default is auto
    assert len(profiles) == 1  # same device, model and engine shape: read from the cache
    assert second.record_routing_stats()["cost_model"] == first.cost_json


def test_a_replica_given_a_file_or_none(replicas, tmp_path):
    make, profiles = replicas
    path = tmp_path / "fitted.json"
    given = _model(2e-6, "fitted-elsewhere")
    given.save(path)
    assert json.loads(make(cost_model=str(path)).cost_json) == json.loads(given.to_json())
    assert make(cost_model="none").cost_json == ""
    assert profiles == []


def test_the_router_prices_each_replica_with_its_own_and_says_so(replicas):
    from tests.test_ray_serve import _replica, _stats

    own, blind = _model(3e-6, "its-own"), _model(0.0, "blind")
    router = CarajaxRequestRouter.__new__(CarajaxRequestRouter)
    router.initialize_state(policy="carajax")
    stats = {n: _stats(n) for n in ("a", "b", "c")}
    stats["a"]["cost_model"], stats["b"]["cost_model"] = own.to_json(), blind.to_json()
    states = router.states([_replica(n, s) for n, s in stats.items()])
    assert states[0].cost.to_json() == own.to_json()
    default = cm.default_cost_model()
    assert states[1].cost.to_json() == states[2].cost.to_json() == default.to_json()
    pricing = router.summary()["pricing"]
    assert pricing["a"].startswith("its own: its-own")
    assert pricing["b"].startswith("router default, its own unusable for carajax")  # rank-blind
    assert pricing["c"].startswith("router default, the replica reports none")
