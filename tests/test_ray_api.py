"""Ray's request-router API as carajax.cluster.ray_router uses it.

The router imports only `ray.serve.request_router` (public) and relies on a few hooks and
attributes of it. These tests fail first when a Ray release moves or renames one of them, before
a cluster test times out on it; pyproject.toml pins `ray[serve]` below the next major version.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import types
from pathlib import Path

import pytest

request_router = pytest.importorskip("ray.serve.request_router")

from carajax.cluster import ray_router  # noqa: E402


def _ray_imports() -> list[tuple[str, str]]:
    tree = ast.parse(Path(ray_router.__file__).read_text())
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray"
            for alias in node.names]


def test_the_router_imports_only_public_ray_names():
    imports = _ray_imports()
    assert imports, "the router imports nothing from Ray?"
    for module, name in imports:
        assert not any(part.startswith("_") for part in module.split(".")), module
        assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone"
    assert "_private" not in Path(ray_router.__file__).read_text()


def test_the_hooks_it_overrides_keep_their_signatures():
    RR = request_router.RequestRouter
    expected = {"choose_replicas": ["self", "candidate_replicas", "pending_request"],
                "on_request_routed": ["self", "pending_request", "replica_id", "result"],
                "on_request_completed": ["self", "replica_id", "internal_request_id"]}
    for hook, params in expected.items():
        assert list(inspect.signature(getattr(RR, hook)).parameters) == params, hook
        assert list(inspect.signature(getattr(ray_router.CarajaxRequestRouter, hook)).parameters) == params
    # Ray passes request_router_kwargs to initialize_state as keywords.
    assert inspect.signature(RR.initialize_state).parameters["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    for mixin, method in ((request_router.LocalityMixin, "apply_locality_routing"),
                          (request_router.MultiplexMixin, "apply_multiplex_routing")):
        assert list(inspect.signature(getattr(mixin, method)).parameters) == ["self", "pending_request"]


def test_the_request_and_replica_attributes_it_reads_exist():
    pending = {f.name for f in dataclasses.fields(request_router.PendingRequest)}
    assert {"kwargs", "metadata"} <= pending
    metadata = inspect.signature(request_router.PendingRequest).parameters["metadata"].annotation
    fields = {f.name for f in dataclasses.fields(_resolve(metadata))}
    assert {"internal_request_id", "multiplexed_model_id"} <= fields
    assert {"unique_id"} <= {f.name for f in dataclasses.fields(request_router.ReplicaID)}
    for attr in ("replica_id", "routing_stats"):
        assert isinstance(getattr(request_router.RunningReplica, attr), property), attr


def _resolve(annotation):
    if isinstance(annotation, str):  # postponed annotations: look the class up in its module
        module = inspect.getmodule(request_router.PendingRequest)
        return getattr(module, annotation)
    return annotation


def _replica(uid):
    return types.SimpleNamespace(replica_id=uid, routing_stats={})


@pytest.mark.parametrize("model_id", ["", "lora-7"])
def test_the_fallback_draws_two_of_the_replicas_ray_prefers(model_id, monkeypatch):
    """Ray's default rule: the preferred replicas (holding the multiplexed model, else
    co-located), two drawn at random in one rank (Ray probes both and takes the shorter
    queue); every candidate when none is preferred."""
    router = ray_router.CarajaxRequestRouter.__new__(ray_router.CarajaxRequestRouter)
    reps = [_replica(f"r{i}") for i in range(5)]
    asked = []
    monkeypatch.setattr(router, "apply_multiplex_routing",
                        lambda pending_request: asked.append("multiplex") or {"r1", "r3", "r4"},
                        raising=False)
    monkeypatch.setattr(router, "apply_locality_routing",
                        lambda pending_request: asked.append("locality") or {"r1", "r3", "r4"},
                        raising=False)
    pending = types.SimpleNamespace(metadata=types.SimpleNamespace(multiplexed_model_id=model_id))
    seen = set()
    for _ in range(60):
        (rank,) = router.power_of_two(reps, pending)
        assert len(rank) == 2 and len({r.replica_id for r in rank}) == 2
        seen |= {r.replica_id for r in rank}
    assert seen == {"r1", "r3", "r4"}
    assert set(asked) == {"multiplex" if model_id else "locality"}
    monkeypatch.setattr(router, "apply_locality_routing", lambda pending_request: set(), raising=False)
    assert len(router.power_of_two(reps, None)[0]) == 2  # none preferred: any two candidates
    assert router.power_of_two(reps[:1], None) == [[reps[0]]]
    assert router.power_of_two([], None) == []
