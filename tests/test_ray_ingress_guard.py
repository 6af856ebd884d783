"""The Ray Serve ingress holds to the worker's HTTP standard, without a Ray cluster: its FastAPI
app (the one `serve.ingress` wraps) is driven by Starlette's TestClient, with Serve's replica
context pointed at an ingress built by hand whose replicas are fakes. The API key (401 in the
worker's exact body), the 2 MiB body limit (413, nothing read whole), the size limits on prompts
(400 before tokenizing) and a bounded tokenizing for the route estimate; the key appears in no
repr, no refusal. The same app on a real cluster: tests/test_ray_serve.py."""

from __future__ import annotations

import types

import pytest

ray_serve = pytest.importorskip("ray.serve")

from fastapi import FastAPI  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from carajax.cluster import app as ray_app  # noqa: E402
from carajax.server import openai_api as oa  # noqa: E402
from carajax.server.auth import REFUSAL  # noqa: E402
from carajax.server.guard import Guard, GuardConfig  # noqa: E402

KEY = "ingress-s3cret-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
MIB = 1 << 20
INFO = {"base": "carajax-demo", "max_model_len": 2048, "adapters": {"upper": 8}}


class _Method:
    """`handle.method.remote(...)`, awaited, as a Serve DeploymentHandle's; records its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def remote(self, *args, **kwargs):
        self.calls.append((args, kwargs))

        async def result():
            return self.fn(*args, **kwargs)

        return result()


class _Tokenizer:
    """One token per character; remembers what it was asked to encode."""

    def __init__(self):
        self.seen: list[int] = []

    def encode(self, text: str) -> list[int]:
        self.seen.append(len(text))
        return [0] * len(text)


class _HandBuilt(ray_app.OpenAIIngress):
    """The ingress without Serve's replica machinery (its async __init__ and __del__)."""

    async def __init__(self):
        raise AssertionError("built with __new__")

    def __del__(self):
        pass


def _ingress(key: str | None = KEY):
    ingress = _HandBuilt.__new__(_HandBuilt)
    ingress.limits = oa.HttpLimits()
    ingress.guard = GuardConfig(api_key=key)
    ingress.avg_output_len, ingress.info = 128.0, None
    ingress.failover = dict.fromkeys(ray_app.FAILOVER_COUNTS, 0)
    ingress.model = types.SimpleNamespace(tokenizer=_Tokenizer())
    done = {"id": "cmpl-1", "object": "text_completion", "choices": [{"text": "HELLO"}]}
    ingress.replicas = types.SimpleNamespace(
        models=_Method(lambda: INFO),
        complete=_Method(lambda body, kind, route=None: {"status": 200, "body": done,
                                                         "replica": "CarajaxReplica#r0"}))
    return ingress


@pytest.fixture
def served(monkeypatch):
    """(TestClient on the ingress's app, the ingress serving it)."""
    ingress = _ingress()
    context = types.SimpleNamespace(servable_object=ingress)
    monkeypatch.setattr(ray_serve, "get_replica_context", lambda: context)
    return TestClient(ray_app.fastapi_app), ingress


def _worker_app(key: str | None = KEY) -> TestClient:
    """The guard as the worker's HTTP server installs it, in front of one route."""
    app = FastAPI()
    app.add_middleware(Guard, config=GuardConfig(api_key=key))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": []}

    return TestClient(app)


def test_every_v1_route_wants_the_key_and_refuses_as_the_worker_does(served):
    client, ingress = served
    worker = _worker_app().get("/v1/models")
    assert worker.status_code == 401
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions")):
        for headers in ({}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            r = client.request(method, path, headers=headers,
                               json={"model": "upper", "prompt": "hello="})
            assert r.status_code == 401, (path, headers)
            assert r.json() == worker.json()  # the worker's body, byte for byte
            assert r.json()["error"]["message"] == REFUSAL
            assert r.headers["www-authenticate"] == "Bearer"
            assert KEY not in r.text
    assert ingress.replicas.complete.calls == [] and ingress.replicas.models.calls == []
    r = client.get("/v1/models", headers=AUTH)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["carajax-demo", "upper"]
    r = client.post("/v1/completions", headers=AUTH,
                    json={"model": "upper", "prompt": "hello=", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "HELLO"
    assert r.headers["x-carajax-replica"] == "CarajaxReplica#r0"


def test_health_and_router_stay_open(served):
    client, _ = served
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "serving"}
    r = client.get("/router")
    assert r.status_code == 200 and "routers" in r.json()


def test_no_key_configured_lets_requests_through(served):
    client, ingress = served
    ingress.guard = GuardConfig()
    assert client.get("/v1/models").status_code == 200


def test_a_body_over_2_mib_is_refused_before_it_is_read(served):
    client, ingress = served
    big = b'{"model": "upper", "prompt": "' + b"x" * (3 * MIB) + b'"}'
    r = client.post("/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                    content=big)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"
    assert str(2 * MIB) in r.json()["error"]["message"]

    def chunks(size=64 << 10):  # no Content-Length: read up to the limit, then refused
        for i in range(0, len(big), size):
            yield big[i:i + size]

    r = client.post("/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                    content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = client.post("/v1/completions", headers={**AUTH, "Content-Length": "12abc"}, content=b"{}")
    assert r.status_code == 413
    assert ingress.replicas.complete.calls == [] and ingress.model.tokenizer.seen == []


def test_prompts_over_the_size_limits_are_refused_before_tokenizing(served):
    client, ingress = served
    limits = ingress.limits
    too_many = [{"role": "user", "content": "hi"}] * (limits.max_messages + 1)
    r = client.post("/v1/chat/completions", headers=AUTH, json={"model": "upper", "messages": too_many})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"
    assert f"at most {limits.max_messages}" in r.json()["error"]["message"]
    half = "y" * (limits.request.max_prompt_bytes // 2 + 1)  # two of them: over, body under 2 MiB
    parts = [{"role": "user", "content": half},
             {"role": "user", "content": [{"type": "text", "text": half}]}]
    r = client.post("/v1/chat/completions", headers=AUTH, json={"model": "upper", "messages": parts})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.post("/v1/completions", headers=AUTH,
                    json={"model": "upper", "prompt": "z" * (limits.request.max_prompt_bytes + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "over the limit" in r.json()["error"]["message"]
    r = client.post("/v1/completions", headers=AUTH,
                    json={"model": "upper", "prompt": [[1] * (limits.request.max_prompt_tokens + 1)]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert ingress.model.tokenizer.seen == []  # nothing was tokenized
    assert ingress.replicas.complete.calls == [] and ingress.replicas.models.calls == []


def test_the_route_estimate_tokenizes_a_bounded_prefix(served):
    client, ingress = served
    n = 600_000  # within the limits, far over the sample
    r = client.post("/v1/completions", headers=AUTH,
                    json={"model": "upper", "prompt": "h" * n, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert ingress.model.tokenizer.seen == [ray_app.ROUTE_SAMPLE_CHARS]
    (_, kwargs), = ingress.replicas.complete.calls
    assert kwargs["route"] == {"adapter": "upper", "rank": 8, "prompt_tokens": n,
                               "expected_output_tokens": 4}
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json={"model": "carajax-demo", "messages": [{"role": "user", "content": "abc"}]})
    assert r.status_code == 200
    assert ingress.replicas.complete.calls[-1][1]["route"]["prompt_tokens"] == 3
    assert ingress.replicas.complete.calls[-1][1]["route"]["adapter"] == ""
    # A malformed field is the replica's to name: routed by Ray's default, not refused here.
    r = client.post("/v1/chat/completions", headers=AUTH, json={"model": "upper", "messages": "hi"})
    assert r.status_code == 200 and ingress.replicas.complete.calls[-1][1]["route"]["prompt_tokens"] == 0


def test_the_guard_fails_closed_without_a_replica_context(monkeypatch):
    def missing():
        raise RuntimeError("no replica")

    monkeypatch.setattr(ray_serve, "get_replica_context", missing)
    r = TestClient(ray_app.fastapi_app).get("/v1/models", headers=AUTH)
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"


def test_the_key_is_in_no_repr_and_an_empty_key_is_refused(monkeypatch):
    guard = GuardConfig(api_key=KEY)
    assert KEY not in repr(guard) and KEY not in repr(Guard(None, config=guard))
    assert KEY not in (ray_app.OpenAIIngress.__doc__ or "")
    for blank in ("", "  "):
        with pytest.raises(ValueError, match="empty"):
            GuardConfig(api_key=blank)
        with pytest.raises(ValueError, match="empty"):
            ray_app.build_app(api_key=blank)
    bound = ray_app.build_app(api_key=KEY)._bound_deployment  # the ingress and its init kwargs
    assert bound.init_kwargs["guard"].api_key == KEY and KEY not in repr(bound.init_kwargs)


def test_app_builder_takes_the_key_from_the_environment_only(monkeypatch):
    monkeypatch.delenv("CARAJAX_API_KEY", raising=False)
    with pytest.raises(ValueError, match="plain text"):
        ray_app.app_builder({"api_key": KEY})
    with pytest.raises(ValueError, match="CARAJAX_API_KEY is not set"):
        ray_app.app_builder({"require_api_key": True})
    open_app = ray_app.app_builder({})  # no key asked for: open (bound to 127.0.0.1 by default)
    assert open_app._bound_deployment.init_kwargs["guard"].api_key is None
    monkeypatch.setenv("CARAJAX_API_KEY", KEY)
    app = ray_app.app_builder({"require_api_key": "true", "replicas": "1"})
    assert app._bound_deployment.init_kwargs["guard"].api_key == KEY


def test_carajax_ray_refuses_an_empty_key_before_starting_ray(monkeypatch, capsys):
    from carajax.cli import UsageError, main

    monkeypatch.setenv("CARAJAX_API_KEY", " ")
    with pytest.raises(UsageError):
        main(["ray"])
    assert "empty" in capsys.readouterr().err
