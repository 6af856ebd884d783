"""Adapters resolved by name under the adapter root (`--adapter-root DIR`): a request naming an
adapter that is not registered gets `DIR/<name>`, registered once on first use; malformed names
are 400 before any disk access, missing ones 404, broken adapters a clear 400 that leaves the
worker serving; /v1/models lists the names under the root. Also the router in front (`carajax
route --adapter-root`), and how a Ray replica's cold start is priced (its own copy cost).

One in-process worker (gRPC + HTTP) over a tiny random llama-test engine. The same adapter files
are registered up front as "ref" (from outside the root), so a by-name load must give the same
greedy tokens.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import threading
import time

import grpc
import httpx
import pytest

import carajax
from carajax.client import Client, ServerError
from carajax.cluster import routing
from carajax.config import EngineConfig
from carajax.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from carajax.models import weights
from carajax.models.tokenizer import ByteTokenizer
from carajax.sched import cost_model as cm
from carajax.sched.router import RouteRequest, make_policy
from carajax.server import carajax_pb2 as pb
from carajax.server.adapter_paths import (
    AdapterNameError,
    AdapterPathPolicy,
    AdapterStore,
    check_adapter_name,
)
from carajax.server.http import serve_http
from carajax.server.router import serve_router, wait_until_healthy
from carajax.server.worker import serve
from carajax.testing import write_random_adapter

Code = grpc.StatusCode
PROMPT = [2, 104, 105, 33]
GREEDY = dict(max_tokens=6, temperature=0.0, ignore_eos=True)
BODY = {"prompt": "hi!", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
GOOD = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")  # the same weights (seed 1), rank 8


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_config):
    base = tmp_path_factory.mktemp("adapter-root").resolve()
    root, outside = base / "root", base / "outside"
    write_random_adapter(outside / "ref", tiny_config, rank=8, seed=1)
    write_random_adapter(outside / "secret", tiny_config, rank=8, seed=2)
    for name in GOOD:
        shutil.copytree(outside / "ref", root / name)
    write_random_adapter(root / ".hidden", tiny_config, rank=8, seed=1)  # valid, but never read
    write_random_adapter(root / "bad-config", tiny_config, rank=8)
    (root / "bad-config" / CONFIG_FILE).write_text('{"r": 8, "lora_alpha":')
    write_random_adapter(root / "truncated", tiny_config, rank=8)
    weights_file = root / "truncated" / WEIGHTS_FILE
    os.truncate(weights_file, os.path.getsize(weights_file) - 100)
    write_random_adapter(root / "rank-128", tiny_config, rank=128)  # over max_lora_rank 64
    deeper = dataclasses.replace(tiny_config, num_layers=tiny_config.num_layers + 2)
    write_random_adapter(root / "other-model", deeper, rank=8)  # layers the base does not have
    (root / "not-an-adapter").mkdir()
    (root / "link-out").symlink_to(outside / "secret", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def engine(tiny_config, root):
    model = weights.random_model(tiny_config, seed=0, init_std=0.1)
    eng = carajax.Engine(model, ByteTokenizer(), EngineConfig(max_batch_size=4, prefill_chunk=16,
                                                              cold_start="cached"))
    eng.add_adapter("ref", root.parent / "outside" / "ref")  # registered up front
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def worker(engine, root):
    """`carajax serve --adapter-root ROOT --http-port 0`, in this process."""
    with serve(engine, 0, host="127.0.0.1", name="w0",
               adapter_paths=AdapterPathPolicy(root=str(root))) as w, \
            serve_http(w, 0, host="127.0.0.1") as http, Client(w.address, timeout=60) as client:
        yield w, http, client


def _post(http, model: str, **kw) -> httpx.Response:
    return httpx.post(f"{http.url}/v1/completions", json={**BODY, "model": model, **kw}, timeout=60)


def test_names_that_are_not_one_plain_directory_name_are_refused_without_the_disk():
    for name in ("alpha", "team-a_v2", "x.y", "日本"):
        assert check_adapter_name(name) == name
    for name, why in (("", "empty"), ("..", "leading '.'"), (".", "leading '.'"),
                      (".hidden", "leading '.'"), ("a/b", "path separator"), ("/etc", "separator"),
                      ("a\\b", "path separator"), ("a\0b", "control character"),
                      ("x" * 256, "over 255 characters")):
        with pytest.raises(AdapterNameError, match=why):
            check_adapter_name(name)


def test_a_first_request_registers_the_adapter_once_and_serves_it(engine, worker):
    w, http, client = worker
    ref = client.generate(PROMPT, "ref", **GREEDY).result().token_ids
    base = client.generate(PROMPT, **GREEDY).result().token_ids
    assert len(ref) == 6 and ref != base  # the adapter changes the output: the test can fail
    assert engine.get_adapter("alpha") is None
    version = engine.adapters_version
    assert client.generate(PROMPT, "alpha", **GREEDY).result().token_ids == ref  # gRPC
    assert engine.get_adapter("alpha").path == str(w.servicer.adapter_store.root / "alpha")
    assert engine.adapters_version == version + 1
    assert client.generate(PROMPT, "alpha", **GREEDY).result().token_ids == ref
    r = _post(http, "beta")  # HTTP: the `model` field
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == _post(http, "ref").json()["choices"][0]["text"]
    assert _post(http, "beta").status_code == 200
    assert engine.adapters_version == version + 2  # alpha and beta, once each


def test_concurrent_first_requests_register_it_once(engine, worker, monkeypatch):
    _, http, _ = worker
    calls, real = [], engine.add_adapter

    def slow_add(name, path, **kw):  # widen the race a missing lock would lose
        calls.append(name)
        time.sleep(0.3)
        return real(name, path, **kw)

    monkeypatch.setattr(engine, "add_adapter", slow_add)
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda _: _post(http, "gamma"), range(4)))
    assert [r.status_code for r in got] == [200] * 4, [r.text for r in got]
    assert len({r.json()["choices"][0]["text"] for r in got}) == 1
    assert calls == ["gamma"]


def test_bad_names_are_400_missing_ones_404_links_out_403(engine, worker, root):
    _, http, client = worker
    for name in ("..", "../outside/ref", "a/b", ".hidden", "a\\b", "./alpha"):
        r = _post(http, name)
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert "not a plain directory name" in err["message"] and err["param"] == "model", name
        with pytest.raises(ServerError) as e:
            client.generate(PROMPT, name, **GREEDY).result()
        assert e.value.code == Code.INVALID_ARGUMENT, name
    r = _post(http, "nope")
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "model_not_found"
    assert "nor under its adapter root" in r.json()["error"]["message"]
    r = _post(http, "link-out")  # inside the root, pointing out of it
    assert r.status_code == 403 and "outside the adapter root" in r.json()["error"]["message"]
    assert not {".hidden", "link-out", "nope"} & set(engine.adapters)


BROKEN = {"bad-config": "corrupt JSON", "truncated": "is truncated",
          "rank-128": "exceeds the limit max_lora_rank=64", "other-model": "layers",
          "not-an-adapter": "missing adapter_config.json"}


def test_a_broken_adapter_is_a_clear_400_and_the_worker_keeps_serving(engine, worker, root):
    _, http, client = worker
    ref = client.generate(PROMPT, "ref", **GREEDY).result().token_ids
    for name, needle in BROKEN.items():
        r = _post(http, name)
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert err["message"].startswith(f"adapter {name!r} under the adapter root cannot be "
                                         "served: "), err
        assert needle in err["message"], (name, err["message"])
        assert str(root) not in err["message"] and err["param"] == "model"
        with pytest.raises(ServerError) as e:
            client.generate(PROMPT, name, **GREEDY).result()
        assert e.value.code == Code.INVALID_ARGUMENT and needle in e.value.details
        assert name not in engine.adapters
        assert client.generate(PROMPT, "ref", **GREEDY).result().token_ids == ref, name
        assert _post(http, "alpha").status_code == 200


def test_models_lists_the_names_under_the_root(engine, worker, root, tiny_config):
    w, http, client = worker
    ids = [m["id"] for m in httpx.get(f"{http.url}/v1/models", timeout=30).json()["data"]]
    assert set(GOOD) | {"ref", "bad-config", "truncated", "rank-128", "other-model"} <= set(ids)
    assert not {".hidden", "not-an-adapter", "link-out"} & set(ids)
    assert len(ids) == len(set(ids))  # registered ones once
    # An adapter copied in after start-up: listed once the listing is refreshed, served by name.
    write_random_adapter(root / "late", tiny_config, rank=8, seed=1)
    w.servicer.adapter_store.listing_ttl_s = 0.0
    try:
        ids = [m["id"] for m in httpx.get(f"{http.url}/v1/models", timeout=30).json()["data"]]
        assert "late" in ids
        assert (client.generate(PROMPT, "late", **GREEDY).result().token_ids
                == client.generate(PROMPT, "ref", **GREEDY).result().token_ids)
    finally:
        w.servicer.adapter_store.listing_ttl_s = 5.0


def test_the_router_sends_names_under_the_root_to_a_worker(engine, worker, root):
    w, _, _ = worker
    with serve_router([w.address], 0, host="127.0.0.1", policy="carajax",
                      adapter_root=str(root)) as router, \
            serve_router([w.address], 0, host="127.0.0.1") as closed, \
            Client(router.address, timeout=60) as client, Client(closed.address, timeout=60) as plain:
        wait_until_healthy(router, 1)
        wait_until_healthy(closed, 1)
        # A name no worker holds is priced as a cold start of its config's rank.
        link = router.servicer._choose(pb.GenerateRequest(adapter_id="delta", text="hi"), "r1", set())
        assert link.inflight["r1"].rank == 8
        router.servicer._done(link, "r1", "test")
        with pytest.raises(ServerError) as e:  # without a root the router knows only registrations
            plain.generate(PROMPT, "delta", **GREEDY).result()
        assert e.value.code == Code.NOT_FOUND
        ref = client.generate(PROMPT, "ref", **GREEDY).result().token_ids
        assert client.generate(PROMPT, "delta", **GREEDY).result().token_ids == ref
        assert engine.get_adapter("delta") is not None
        for name, code in (("../x", Code.INVALID_ARGUMENT), ("nope", Code.NOT_FOUND),
                           ("truncated", Code.INVALID_ARGUMENT), ("link-out", Code.PERMISSION_DENIED)):
            with pytest.raises(ServerError) as e:
                client.generate(PROMPT, name, **GREEDY).result()
            assert e.value.code == code, (name, e.value)
        assert client.generate(PROMPT, "delta", **GREEDY).result().token_ids == ref


def test_the_store_reads_ranks_from_configs_and_lists_cheaply(root, tiny_config):
    store = AdapterStore(AdapterPathPolicy(root=str(root)))
    assert store.rank("alpha") == 8 and store.rank("rank-128") == 128
    assert store.rank("nope") is None and store.rank("bad-config") == 0
    with pytest.raises(AdapterNameError):
        store.rank("../outside/ref")
    cfg = json.loads((root / "alpha" / CONFIG_FILE).read_text())
    write_random_adapter(root / "patterned", tiny_config, rank=4,
                         extra_config={"rank_pattern": {"q_proj": 16}})
    assert json.loads((root / "patterned" / CONFIG_FILE).read_text())["rank_pattern"] == {"q_proj": 16}
    assert store.rank("patterned") == 16 and cfg["r"] == 8
    listed = store.names()
    assert "patterned" in listed and store.names() is listed  # kept: no second scandir
    shutil.rmtree(root / "patterned")
    assert "patterned" in store.names()  # until the listing is refreshed
    store.listing_ttl_s = 0.0
    assert "patterned" not in store.names()


def _replica_stats(name, cost_json="", resident=()):
    return {"name": name, "time": 100.0, "serving": True, "queue": [], "batch": [],
            "decode_ages": [], "adapters": {}, "resident": list(resident), "loading": [],
            "pages_free": 64, "page_rank": 8, "kv_pages_free": 256, "kv_page_size": 16,
            "max_batch": 32, "max_seq_len": 2048, "cost_model": cost_json}


def test_ray_routing_prefers_a_holder_and_prices_a_cold_load_with_the_replicas_copy_cost():
    """What our Ray router asks the policy (carajax.cluster.routing): a replica holding the
    adapter wins among idle ones; where none holds it, each replica's cold load is priced with its
    own cost model's copy time."""
    default = cm.default_cost_model()
    slow = dataclasses.replace(default, load_time=((8, 2.0), (64, 8.0))).to_json()
    fast = dataclasses.replace(default, load_time=((8, 0.001), (64, 0.004))).to_json()
    costs, policy = routing.CostModels(default, "carajax"), make_policy("carajax", slo_tpot=0.1)
    route = RouteRequest("alpha", 8, 40, 16)

    def choice(*stats):
        states = [routing.worker_state(s, costs.of(s)) for s in stats]
        return stats[routing.rank_replicas(policy, route, states)[0]]["name"]

    assert choice(_replica_stats("r0"), _replica_stats("r1", resident=["alpha"])) == "r1"
    assert choice(_replica_stats("r0", slow), _replica_stats("r1", fast)) == "r1"
    assert choice(_replica_stats("r0", fast), _replica_stats("r1", slow)) == "r0"
    # A route without the rank (rank 0, what the ingress sent for an adapter no replica had
    # registered before it read the root's config) prices no cold start: no preference.
    states = [routing.worker_state(s, costs.of(s)) for s in
              (_replica_stats("r0", slow), _replica_stats("r1", fast))]
    assert policy.choose(RouteRequest("alpha", 0, 40, 16), states).name == "r0"


def test_a_slow_first_load_holds_up_no_other_name(engine, worker, monkeypatch):
    """The lock is per name: while one adapter's registration is slow, another's goes through."""
    _, http, _ = worker
    gate, real = threading.Event(), engine.add_adapter

    def add(name, path, **kw):
        if name == "epsilon":
            assert gate.wait(30)
        return real(name, path, **kw)

    monkeypatch.setattr(engine, "add_adapter", add)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        slow = ex.submit(_post, http, "epsilon")
        time.sleep(0.2)
        assert _post(http, "zeta").status_code == 200 and not slow.done()
        gate.set()
        assert slow.result().status_code == 200
