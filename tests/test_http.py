"""The OpenAI-compatible HTTP API, driven by the official `openai` client (a client we did not
write) against a live server on the built-in demo model, whose adapters answer checkably:
`hello=` is `olleh` under "reverse", `HELLO` under "upper", `hello` under the base.

In this process: a worker (gRPC + HTTP over one engine, as `carajax serve --http-port` runs it).
In a subprocess: `carajax route --http-port` in front of two in-process workers, so the router's
command line is what is tested. Also: the SSE wire format, stop strings and stop token ids, a
client disconnect cancelling its engine request, bad requests answered in OpenAI's error shape
while the server keeps serving, run-time adapter loading under the adapter root, /health through
warm-up and drain, /metrics.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import openai
import pytest

from carajax import demo
from carajax.config import EngineConfig
from carajax.server.adapter_paths import AdapterPathPolicy
from carajax.server.http import serve_http
from carajax.server.worker import serve

BASE = demo.MODEL_NAME  # "carajax-demo": the base model's served name
# hello= under each model: what carajax/demo/tasks.py trained it to answer.
ANSWERS = {"reverse": "olleh", "upper": "HELLO", "rot13": "uryyb", "vowels": "hll", BASE: "hello"}
PROMPT_TOKENS = 7  # STX + "hello=" (the byte tokenizer)


def _engine():
    return demo.engine(EngineConfig(cold_start="cached", max_batch_size=4, max_queue=16))


@pytest.fixture(scope="module")
def engine():
    eng = _engine()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    """A worker as `carajax serve --http-port 0 --adapter-root <demo adapters>
    --enable-lora-loading` runs it: gRPC and HTTP over one engine."""
    policy = AdapterPathPolicy(root=str(demo.ROOT / "adapters"))
    with serve(engine, 0, host="127.0.0.1", name="w0", adapter_paths=policy) as worker, \
            serve_http(worker, 0, host="127.0.0.1", enable_lora_loading=True) as http:
        yield worker, http


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[1].url}/v1", api_key="unused", max_retries=0, timeout=60)


def _stream_text(stream) -> tuple[str, str | None, object]:
    """(joined text, finish_reason, usage) of a streamed completion or chat completion."""
    text, finish, use = [], None, None
    for chunk in stream:
        use = chunk.usage or use
        for choice in chunk.choices:
            text.append(choice.text if hasattr(choice, "text") else (choice.delta.content or ""))
            finish = choice.finish_reason or finish
    return "".join(text), finish, use


def test_models_lists_the_base_and_its_four_adapters(client):
    cards = {m.id: m.model_dump() for m in client.models.list()}
    assert list(cards) == [BASE, "reverse", "rot13", "upper", "vowels"]
    assert cards[BASE]["parent"] is None and cards[BASE]["max_model_len"] == 1024
    assert all(cards[name]["parent"] == BASE for name in demo.TASKS)  # as vLLM lists LoRAs


@pytest.mark.parametrize("model", list(ANSWERS))
def test_each_adapter_answers_as_trained_streamed_or_not(client, model):
    want = ANSWERS[model]
    out = client.completions.create(model=model, prompt="hello=", temperature=0, max_tokens=16)
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    assert out.model == model and out.object == "text_completion"
    # The answer and ETX (which ends it and is not text).
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (PROMPT_TOKENS, len(want) + 1)
    stream = client.completions.create(model=model, prompt="hello=", temperature=0, max_tokens=16,
                                       stream=True, stream_options={"include_usage": True})
    text, finish, use = _stream_text(stream)
    assert (text, finish) == (want, "stop")
    assert (use.prompt_tokens, use.completion_tokens, use.total_tokens) == (7, len(want) + 1,
                                                                            7 + len(want) + 1)


def test_token_id_prompts_and_max_tokens(client):
    ids = [2, *b"carajax="]
    out = client.completions.create(model="upper", prompt=ids, temperature=0, max_tokens=3)
    assert out.choices[0].text == "CAR" and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 3)


def test_chat_maps_the_user_message_to_the_demo_prompt(client):
    messages = [{"role": "system", "content": "You reverse words."},
                {"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model="reverse", messages=messages, temperature=0)
    msg = out.choices[0].message
    assert (msg.role, msg.content, out.choices[0].finish_reason) == ("assistant", "olleh", "stop")
    assert out.usage.prompt_tokens == PROMPT_TOKENS  # the template rendered "hello="
    stream = client.chat.completions.create(model="upper", messages=messages, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "HELLO"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_sse_wire_format(server):
    body = {"model": "reverse", "prompt": "hello=", "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server[1].url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "olleh"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"


def test_stop_strings_and_stop_token_ids(client):
    # The base echoes "hello"; a stop string cuts it where it starts, and so does a stop token
    # (its own text left out, as vLLM does), streamed or not.
    for kw in ({"stop": ["ll", "xyz"]}, {"stop": "l"}, {"extra_body": {"stop_token_ids": [ord("l")]}}):
        out = client.completions.create(model=BASE, prompt="hello=", temperature=0, **kw)
        assert (out.choices[0].text, out.choices[0].finish_reason) == ("he", "stop"), kw
        stream = client.completions.create(model=BASE, prompt="hello=", temperature=0, stream=True, **kw)
        assert _stream_text(stream)[:2] == ("he", "stop"), kw
    out = client.completions.create(model=BASE, prompt="hello=", temperature=0, stop=["q"])
    assert out.choices[0].text == "hello"  # no match: the held-back tail is flushed


def test_seeded_sampling_repeats(client):
    kw = dict(model="rot13", prompt="hello=", temperature=1.0, top_p=0.9, seed=7, max_tokens=8)
    first = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == first


def test_unknown_model_is_not_found(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hello=")
    assert "nope" in e.value.message
    r = httpx.post(f"{server[1].url}/v1/chat/completions", timeout=30,
                   json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_bad_requests_are_refused_and_the_server_keeps_serving(client, server, engine):
    url = server[1].url
    # One long request runs through all of it and must come out right.
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        long = ex.submit(client.completions.create, model="reverse", prompt="hello=", temperature=0,
                         max_tokens=64, extra_body={"ignore_eos": True})
        bad = [dict(n=2), dict(prompt=""), dict(max_tokens=5000), dict(top_p=1.5),
               dict(prompt=["a=", "b="]), dict(logprobs=2), dict(seed=-1),
               dict(stop=[f"s{i}" for i in range(17)]), dict(prompt="x" * 5000)]
        for kw in bad:
            with pytest.raises(openai.BadRequestError) as e:
                client.completions.create(**{"model": "reverse", "prompt": "hello=", **kw})
            assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error", kw
        assert "n=2" in str(client_error(client, n=2))
        r = httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert r.json()["error"]["message"].startswith("the request body is not valid JSON: ")
        assert "(at character 1)" in r.json()["error"]["message"]
        # prompt + max_tokens over the context: refused with the room left, named max_tokens
        room = engine.runner.seq_len - len(engine.tokenizer.encode("hello="))
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="reverse", prompt="hello=", max_tokens=room + 1)
        assert f"at most {room} tokens" in e.value.body["message"]
        assert e.value.body["param"] == "max_tokens"
        r = httpx.post(f"{url}/v1/completions", timeout=30,
                       json={"model": "reverse", "prompt": "x" * (3 << 20)})  # over 2 MiB
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        out = long.result()
    assert out.choices[0].text.startswith("olleh") and out.usage.completion_tokens == 64
    assert client.completions.create(model="reverse", prompt="hello=", temperature=0
                                     ).choices[0].text == "olleh"
    assert not engine.stats()["running"]


def client_error(client, **kw) -> openai.APIStatusError:
    try:
        client.completions.create(**{"model": "reverse", "prompt": "hello=", **kw})
    except openai.APIStatusError as e:
        return e
    raise AssertionError(f"{kw} was accepted")


def _cancelled(worker) -> int:
    return worker.servicer.metrics.snapshot()["requests"].get("cancelled", 0)


def _wait_until(condition, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _idle(engine) -> bool:
    st = engine.stats()
    return not st["running"] and not st["waiting"]


def test_a_client_disconnect_cancels_its_request(server, engine):
    worker, http = server
    body = {"model": "upper", "prompt": "hello=", "max_tokens": 1000, "ignore_eos": True,
            "temperature": 0}
    before = _cancelled(worker)
    with httpx.stream("POST", f"{http.url}/v1/completions", json={**body, "stream": True},
                      timeout=60) as r:
        lines = r.iter_lines()  # held: dropping the iterator would close the response here
        first = next(line for line in lines if line)
        assert first.startswith("data: ") and engine.stats()["running"]
    # Gone long before its 1000 tokens (the worker counts it as its handler ends).
    _wait_until(lambda: _idle(engine) and _cancelled(worker) == before + 1)
    # Not streamed: the client hangs up while its request runs (no body has been sent yet).
    payload = json.dumps(body).encode()
    host, port = http.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
        _wait_until(lambda: engine.stats()["running"], timeout=30)
    _wait_until(lambda: _idle(engine) and _cancelled(worker) == before + 2)
    assert engine.stats()["kv_cache"]["pages_free"] == engine.stats()["kv_cache"]["pages_total"]


def test_load_and_unload_an_adapter_at_run_time(client, server):
    url = server[1].url
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "upper2", "lora_path": "upper"})
    assert r.status_code == 200 and "upper2" in r.text  # a path under the adapter root
    assert "upper2" in [m.id for m in client.models.list()]
    assert client.completions.create(model="upper2", prompt="hello=", temperature=0
                                     ).choices[0].text == "HELLO"
    for path in ("../model", "/etc", str(demo.ROOT / "model")):  # outside the root
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path})
        assert r.status_code == 403 and "outside the adapter root" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "upper2", "lora_path": "upper"})
    assert r.status_code == 400 and "already" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "upper2"})
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="upper2", prompt="hello=")
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "upper2"})
    assert r.status_code == 404


def test_health_and_metrics_through_warmup_and_drain(engine, server):
    r = httpx.get(f"{server[1].url}/metrics")
    assert r.status_code == 200 and 'carajax_requests_total{outcome="stop"}' in r.text
    # A second front end on the same engine, started NOT_SERVING as `carajax serve` warms up.
    worker = serve(engine, 0, host="127.0.0.1", name="w-warm", serving=False)
    with worker, serve_http(worker, 0, host="127.0.0.1") as http:
        client = openai.OpenAI(base_url=f"{http.url}/v1", api_key="x", max_retries=0)
        assert httpx.get(f"{http.url}/health").json() == {"status": "warming"}
        assert httpx.get(f"{http.url}/health").status_code == 503
        with pytest.raises(openai.InternalServerError) as e:  # 503
            client.completions.create(model="reverse", prompt="hello=")
        assert e.value.status_code == 503 and "warming" in e.value.message
        r = httpx.post(f"{http.url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "b"})
        assert r.status_code == 404 and "--enable-lora-loading" in r.json()["error"]["message"]
        worker.set_serving()
        assert httpx.get(f"{http.url}/health").status_code == 200
        assert client.completions.create(model="reverse", prompt="hello=", temperature=0
                                         ).choices[0].text == "olleh"
        worker.stop(grace=0)
        r = httpx.get(f"{http.url}/health")
        assert (r.status_code, r.json()) == (503, {"status": "draining"})


# -- the HTTP layer alone, over a fake servicer --------------------------------------------------
TEXT = "añ✓日本🙂!"  # 1- to 4-byte characters


ABORTS = {"full": (grpc.StatusCode.RESOURCE_EXHAUSTED, "waiting queue is full (8 requests)"),
          "gone": (grpc.StatusCode.UNAVAILABLE, "worker w0 is shutting down"),
          "bug": (grpc.StatusCode.INTERNAL, "engine step failed")}


class _FakeServicer:
    """Streams TEXT's UTF-8 bytes, one token each, through the worker's own IncrementalText (so a
    character split across tokens is held back until complete), then a result. Records what it
    was asked, so the translation of an OpenAI request can be read off."""

    serving = True

    def __init__(self):
        from prometheus_client import CollectorRegistry

        self.registry, self.requests = CollectorRegistry(), []

    def Generate(self, request, context):
        from carajax.models.tokenizer import ByteTokenizer
        from carajax.server import carajax_pb2 as pb
        from carajax.server.codec import IncrementalText

        self.requests.append(request)
        if request.adapter_id in ABORTS:
            context.abort(*ABORTS[request.adapter_id])
        text, ids = IncrementalText(ByteTokenizer().decode), list(TEXT.encode())
        for t in ids:
            yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[t], text=text.add(t)))
        yield pb.GenerateResponse(result=pb.GenerateResult(
            finish_reason="length", metrics=pb.RequestMetrics(prompt_tokens=5, output_tokens=len(ids))))


@pytest.fixture(scope="module")
def fake():
    import types

    from grpc_health.v1 import health

    from carajax.server.http import ServedModel

    servicer, checks = _FakeServicer(), health.HealthServicer()
    checks.set("", 1)  # SERVING
    server = types.SimpleNamespace(servicer=servicer, health=checks)
    with serve_http(server, 0, host="127.0.0.1", model=ServedModel("fake", eos_token_ids=(3,))) as http:
        yield servicer, openai.OpenAI(base_url=f"{http.url}/v1", api_key="x", max_retries=0)


def test_multibyte_characters_stream_whole(fake):
    _, client = fake
    stream = client.completions.create(model="fake", prompt="p", stream=True)
    pieces = [c.choices[0].text for c in stream if c.choices and c.choices[0].text]
    assert pieces == list(TEXT)  # each character once it is complete, never a U+FFFD
    out = client.completions.create(model="fake", prompt="p")
    assert out.choices[0].text == TEXT and out.usage.completion_tokens == len(TEXT.encode())
    # A stop string of multi-byte characters cuts at its start, streamed or not.
    out = client.completions.create(model="fake", prompt="p", stop=["日本"])
    assert (out.choices[0].text, out.choices[0].finish_reason) == ("añ✓", "stop")
    stream = client.completions.create(model="fake", prompt="p", stop=["本🙂"], stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "añ✓日"


def test_servicer_statuses_become_openai_errors(fake):
    _, client = fake
    for model, error, status in (("full", openai.RateLimitError, 429),
                                 ("gone", openai.InternalServerError, 503),
                                 ("bug", openai.InternalServerError, 500)):
        for stream in (False, True):  # refused before the first token: a status, not an event
            with pytest.raises(error) as e:
                list(client.completions.create(model=model, prompt="p", stream=stream) or ())
            assert e.value.status_code == status and ABORTS[model][1] in e.value.message


def test_openai_fields_become_sampling_params(fake):
    servicer, client = fake
    client.completions.create(model="fake", prompt="p", max_tokens=9, temperature=0.5, top_p=0.8,
                              seed=11, extra_body={"stop_token_ids": [7], "top_k": 4})
    client.completions.create(model="lora-x", prompt=[2, 9], extra_body={"ignore_eos": True})
    a, b = servicer.requests[-2:]
    assert (a.text, a.adapter_id, a.sampling.max_tokens, a.sampling.seed, a.sampling.top_k) == \
        ("p", "", 9, 11, 4)
    assert a.sampling.temperature == pytest.approx(0.5) and a.sampling.top_p == pytest.approx(0.8)
    assert list(a.sampling.stop_token_ids) == [7, 3]  # vLLM's: in addition to EOS
    assert (list(b.token_ids.ids), b.adapter_id, b.sampling.max_tokens) == ([2, 9], "lora-x", 16)
    assert b.sampling.ignore_eos and not b.sampling.stop_token_ids and not b.sampling.HasField("seed")


# -- `carajax route --http-port` in front of two workers -----------------------------------------
@pytest.fixture(scope="module")
def routed(server):
    """Two workers (this module's and one more engine) behind `carajax route --http-port 0`."""
    eng = _engine()
    w0, _ = server
    with serve(eng, 0, host="127.0.0.1", name="w1") as w1:
        proc = subprocess.Popen(
            [sys.executable, "-m", "carajax.cli", "route", "--workers", f"{w0.address},{w1.address}",
             "--policy", "round_robin", "--port", "0", "--http-port", "0", "--host", "127.0.0.1",
             "--poll-interval", "0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            # PYTHONFAULTHANDLER: SIGABRT dumps every thread's stack, should the drain ever hang.
            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONFAULTHANDLER": "1"})
        lines, reader = [], None
        try:
            for line in proc.stdout:  # the ready line, after any warnings
                lines.append(line)
                if m := re.search(r"OpenAI HTTP on (http://\S+)", line):
                    break
            else:
                pytest.fail("carajax route did not start:\n" + "".join(lines))
            # Keep reading its output: a full pipe would block the router's next write.
            reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
            reader.start()
            yield m.group(1), proc, (w0, w1)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGABRT)  # its threads' stacks, into `lines`
                proc.wait(timeout=10)
                if reader is not None:
                    reader.join(timeout=5)
                pytest.fail("carajax route did not exit within 30 s of SIGTERM:\n" + "".join(lines[-200:]))
            finally:
                if proc.poll() is None:
                    proc.kill()
    eng.close()


def test_the_openai_checks_through_the_router(routed):
    url, proc, workers = routed
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [BASE, "reverse", "rot13", "upper", "vowels"]
    before = [w.servicer.metrics.snapshot()["requests"].get("stop", 0) for w in workers]
    for model in ("reverse", "upper"):
        out = client.completions.create(model=model, prompt="hello=", temperature=0)
        assert (out.choices[0].text, out.usage.prompt_tokens) == (ANSWERS[model], PROMPT_TOKENS)
        stream = client.completions.create(model=model, prompt="hello=", temperature=0, stream=True)
        assert _stream_text(stream)[:2] == (ANSWERS[model], "stop")
    chat = client.chat.completions.create(model="reverse", temperature=0,
                                          messages=[{"role": "user", "content": "hello"}])
    assert chat.choices[0].message.content == "olleh"
    after = [w.servicer.metrics.snapshot()["requests"].get("stop", 0) for w in workers]
    assert all(a > b for a, b in zip(after, before))  # round robin: both workers served
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hello=")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="reverse", prompt="hello=", n=3)
    assert httpx.get(f"{url}/health").json() == {"status": "serving"}
    assert "carajax_router_requests_total" in httpx.get(f"{url}/metrics").text
    assert proc.poll() is None
