"""API keys: HTTP wants `Authorization: Bearer KEY` on /v1 routes (401 in OpenAI's shape, which
the official client raises as AuthenticationError), gRPC wants it as call metadata
(UNAUTHENTICATED), health checks stay open, the router sends its workers their key, the key is
compared in constant time and shows up in no message. One test runs `carajax serve --http-port
--api-key` as a subprocess, key from $CARAJAX_API_KEY, to check the command line's wiring."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading

import grpc
import httpx
import openai
import pytest

from carajax import demo
from carajax.client import Client, ServerError
from carajax.config import EngineConfig
from carajax.server.auth import ApiKeyInterceptor, bearer_ok, resolve_api_key
from carajax.server.http import serve_http
from carajax.server.router import serve_router, wait_until_healthy
from carajax.server.worker import serve

KEY = "s3cret-key-for-tests"


def test_bearer_header_checks():
    assert bearer_ok(f"Bearer {KEY}", KEY) and bearer_ok(f"bearer  {KEY} ".encode(), KEY)
    for header in (None, "", KEY, f"Basic {KEY}", "Bearer", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}"):
        assert not bearer_ok(header, KEY), header
    assert resolve_api_key(None, env={"CARAJAX_API_KEY": KEY}) == KEY
    assert resolve_api_key("flag", env={"CARAJAX_API_KEY": KEY}) == "flag"  # the flag wins
    assert resolve_api_key(None, env={}) is None
    with pytest.raises(ValueError, match="empty"):
        resolve_api_key("  ", env={})
    assert KEY not in repr(ApiKeyInterceptor(KEY))


@pytest.fixture(scope="module")
def engine():
    eng = demo.engine(EngineConfig(cold_start="cached", max_batch_size=4))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def locked(engine):
    """A worker and its HTTP API, both keyed."""
    with serve(engine, 0, host="127.0.0.1", name="locked", api_key=KEY) as worker, \
            serve_http(worker, 0, host="127.0.0.1", api_key=KEY) as http:
        yield worker, http


def test_http_needs_the_key(locked):
    url = locked[1].url
    for key in ("wrong", KEY[:-1]):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            client.completions.create(model="reverse", prompt="hello=")
        assert e.value.status_code == 401 and key not in e.value.message and KEY not in e.value.message
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    r = httpx.post(f"{url}/v1/completions", json={"model": "reverse", "prompt": "hello="})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model="reverse", prompt="hello=", temperature=0
                                     ).choices[0].text == "olleh"
    # Probes and scrapers need no key.
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_grpc_needs_the_key_as_metadata(locked):
    worker, _ = locked
    for key in (None, "wrong"):
        with Client(worker.address, timeout=30, api_key=key) as client:
            with pytest.raises(ServerError) as e:
                client.generate("hello=", "reverse", temperature=0.0).result()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and KEY not in e.value.details
            with pytest.raises(ServerError) as e:
                client.list_adapters()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert client.health() == "SERVING"  # Kubernetes probes carry no secrets
    with Client(worker.address, timeout=30, api_key=KEY) as client:
        assert client.generate("hello=", "reverse", temperature=0.0).result().text == "olleh"
        assert len(client.list_adapters()) == 4


def test_the_router_forwards_its_key(locked):
    worker, _ = locked
    with serve_router([worker.address], 0, host="127.0.0.1", api_key=KEY, poll_interval=0.1) as router:
        wait_until_healthy(router, 1)
        with Client(router.address, timeout=30) as anonymous:
            with pytest.raises(ServerError) as e:
                anonymous.generate("hello=", "upper", temperature=0.0).result()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(router.address, timeout=30, api_key=KEY) as client:
            assert client.generate("hello=", "upper", temperature=0.0).result().text == "HELLO"
        with serve_http(router, 0, host="127.0.0.1", api_key=KEY) as http:
            client = openai.OpenAI(base_url=f"{http.url}/v1", api_key=KEY, max_retries=0)
            assert client.completions.create(model="upper", prompt="hello=", temperature=0
                                             ).choices[0].text == "HELLO"
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{http.url}/v1", api_key="x", max_retries=0).models.list()
    # A router holding the wrong key for its workers sees them refuse: nothing is routed there.
    with serve_router([worker.address], 0, host="127.0.0.1", worker_api_key="wrong") as router:
        link = router.servicer.links[0]
        assert not link.healthy and "UNAUTHENTICATED" in link.error and KEY not in link.error


def test_carajax_serve_with_an_api_key(tmp_path):
    """`carajax serve --http-port 0 --no-warmup`, key from the environment: the ready line says a
    key is required (never the key), wrong keys are refused on both protocols, SIGTERM exits 0."""
    env = {**os.environ, "CARAJAX_API_KEY": KEY, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # compiles about twice as fast
    proc = subprocess.Popen(
        [sys.executable, "-m", "carajax.cli", "serve", "--port", "0", "--http-port", "0",
         "--host", "127.0.0.1", "--no-warmup", "--cold-start", "cached", "--max-batch", "2",
         "--name", "keyed"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        seen = []
        while not (m := re.search(r"ready on (\S+) .*OpenAI HTTP on (http://\S+); API key required",
                                  seen[-1] if seen else "")):
            seen.append(lines.get(timeout=120))
        grpc_address, url = m.group(1), m.group(2)
        assert KEY not in "".join(seen)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        assert client.completions.create(model="upper", prompt="hello=", temperature=0
                                         ).choices[0].text == "HELLO"
        with Client(grpc_address, timeout=30) as c, pytest.raises(ServerError) as e:
            c.list_adapters()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
