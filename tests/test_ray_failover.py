"""Failover at the Ray ingress, without a cluster (the ingress's FastAPI app under Starlette's
TestClient, its replicas fakes that die on cue): a request whose replica dies before anything
went back to the client is sent again and answered; one whose every try dies gets a 503; a
stream whose replica dies after it began ends with an error event and [DONE]; a replica's own
refusal (a 4xx) is an answer, never retried. /router counts each. The same on a real cluster,
with a replica killed mid-replay: tests/test_ray_serve.py."""

from __future__ import annotations

import types

import pytest

ray_serve = pytest.importorskip("ray.serve")

from ray.exceptions import ActorDiedError  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from carajax.cluster import app as ray_app  # noqa: E402
from tests.test_ray_ingress_guard import AUTH, _ingress  # noqa: E402

BODY = {"model": "upper", "prompt": "hello=", "max_tokens": 8}
DONE = {"id": "cmpl-1", "object": "text_completion", "choices": [{"text": "HELLO"}]}


class _Replicas:
    """`complete` and `options(stream=True).stream` of a deployment handle whose replica dies
    under the first `deaths` calls (before answering), and, with `cut`, mid-stream."""

    def __init__(self, deaths: int, cut: bool = False, status: int = 200):
        self.deaths, self.cut, self.status, self.calls = deaths, cut, status, 0

    def _call(self):
        self.calls += 1
        if self.calls <= self.deaths:
            raise ActorDiedError()
        return f"CarajaxReplica#r{self.calls}"

    @property
    def complete(self):
        async def answer(body, kind, route=None):
            replica = self._call()
            return {"status": self.status, "body": DONE if self.status == 200 else
                    {"error": {"message": "no such adapter"}}, "replica": replica}

        return types.SimpleNamespace(remote=lambda *a, **kw: answer(*a, **kw))

    def options(self, stream: bool):
        assert stream
        return types.SimpleNamespace(stream=types.SimpleNamespace(remote=self._stream))

    def _stream(self, body, kind, route=None):
        async def lines():
            replica = self._call()
            yield {"status": 200, "body": None, "replica": replica}
            yield 'data: {"choices": [{"text": "HEL"}]}\n\n'
            if self.cut:
                raise ActorDiedError()
            yield 'data: {"choices": [{"text": "LO"}]}\n\n'
            yield "data: [DONE]\n\n"

        return lines()


@pytest.fixture
def ingress(monkeypatch):
    ingress = _ingress()
    context = types.SimpleNamespace(servable_object=ingress)
    monkeypatch.setattr(ray_serve, "get_replica_context", lambda: context)

    async def no_wait(_):
        pass

    monkeypatch.setattr(ray_app.asyncio, "sleep", no_wait)  # the backoff between tries
    return ingress


def _serve(ingress, replicas):
    ingress.replicas = types.SimpleNamespace(models=ingress.replicas.models, complete=replicas.complete,
                                             options=replicas.options)
    return TestClient(ray_app.fastapi_app)


def _counts(client) -> dict:
    return client.get("/router").json()["failover"]


@pytest.mark.parametrize("deaths", [1, ray_app.REPLICA_RETRIES])
def test_a_request_whose_replica_dies_is_answered_by_another(ingress, deaths):
    replicas = _Replicas(deaths)
    client = _serve(ingress, replicas)
    r = client.post("/v1/completions", headers=AUTH, json=BODY)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "HELLO"
    assert r.headers["x-carajax-replica"] == f"CarajaxReplica#r{deaths + 1}"
    assert replicas.calls == deaths + 1
    assert _counts(client) == {"retried": deaths, "recovered": 1, "failed": 0, "streams_cut": 0}


def test_every_try_dying_is_a_503_after_the_last(ingress):
    replicas = _Replicas(deaths=99)
    client = _serve(ingress, replicas)
    for stream in (False, True):
        r = client.post("/v1/completions", headers=AUTH, json={**BODY, "stream": stream})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "service_unavailable"
        assert "ActorDiedError" in r.json()["error"]["message"]
    assert replicas.calls == 2 * (ray_app.REPLICA_RETRIES + 1)
    assert _counts(client) == {"retried": 2 * ray_app.REPLICA_RETRIES, "recovered": 0, "failed": 2,
                               "streams_cut": 0}


def test_a_stream_that_had_not_begun_is_retried_whole(ingress):
    replicas = _Replicas(deaths=1)
    client = _serve(ingress, replicas)
    r = client.post("/v1/completions", headers=AUTH, json={**BODY, "stream": True})
    assert r.status_code == 200 and r.headers["x-carajax-replica"] == "CarajaxReplica#r2"
    assert r.text.count("data: ") == 3 and r.text.endswith("data: [DONE]\n\n")
    assert '"LO"' in r.text and "error" not in r.text
    assert _counts(client) == {"retried": 1, "recovered": 1, "failed": 0, "streams_cut": 0}


def test_a_stream_cut_mid_way_ends_with_an_error_event_not_a_retry(ingress):
    replicas = _Replicas(deaths=0, cut=True)
    client = _serve(ingress, replicas)
    r = client.post("/v1/completions", headers=AUTH, json={**BODY, "stream": True})
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert events[0] == 'data: {"choices": [{"text": "HEL"}]}'  # what was sent stays sent
    assert "failed mid-stream" in events[1] and "service_unavailable" in events[1]
    assert events[2:] == ["data: [DONE]"]
    assert replicas.calls == 1
    assert _counts(client) == {"retried": 0, "recovered": 0, "failed": 0, "streams_cut": 1}


def test_a_replicas_refusal_is_an_answer_not_a_failure(ingress):
    replicas = _Replicas(deaths=0, status=404)
    client = _serve(ingress, replicas)
    r = client.post("/v1/completions", headers=AUTH, json=BODY)
    assert r.status_code == 404 and replicas.calls == 1
    assert _counts(client) == dict.fromkeys(ray_app.FAILOVER_COUNTS, 0)
