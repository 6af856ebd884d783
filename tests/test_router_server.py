"""The router service over loopback: 32 concurrent mixed-adapter streams across two workers equal
single-request outputs; only workers holding an adapter get it; worker errors pass through with
their codes; a worker killed mid-stream fails only its own streams and the router serves on."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

import carajax
from carajax.client import Client, ServerError
from carajax.config import TARGET_MODULES, EngineConfig
from carajax.models import weights
from carajax.models.tokenizer import ByteTokenizer
from carajax.server.router import serve_router, wait_until_healthy
from carajax.server.worker import serve
from carajax.testing import write_random_adapter

Code = grpc.StatusCode
RANKS = {"r8": 8, "r16": 16, "r32": 32}
GREEDY = dict(max_tokens=8, temperature=0.0, ignore_eos=True)


def _prompt(i: int) -> list[int]:
    rng = np.random.default_rng(300 + i)
    return [2, *rng.integers(4, 256, 3 + i % 12).tolist()]


# 32 requests over three adapters, the base model, and one adapter only worker B holds.
ADAPTERS = [None, "r8", "r16", "r32", "onlyB"]
REQUESTS = [(_prompt(i), a) for i, a in zip(range(32), itertools.cycle(ADAPTERS))]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("router-adapters")
    ranks = {**RANKS, "onlyB": 16}
    return {name: write_random_adapter(root / name, tiny_config, rank=r, seed=10 + i,
                                       target_modules=TARGET_MODULES)
            for i, (name, r) in enumerate(ranks.items())}


def _engine(adapter_dirs, names) -> carajax.Engine:
    model = weights.random_model(carajax.ModelConfig.from_name("llama-test"), seed=0, init_std=0.1)
    eng = carajax.Engine(model, ByteTokenizer(), EngineConfig(
        max_batch_size=4, max_queue=64, prefill_chunk=16, cold_start="cached"))
    for name in names:
        eng.add_adapter(name, adapter_dirs[name])
    return eng


@pytest.fixture(scope="module")
def engines(adapter_dirs):
    a = _engine(adapter_dirs, RANKS)
    b = _engine(adapter_dirs, [*RANKS, "onlyB"])
    yield a, b
    a.close()
    b.close()


@pytest.fixture(scope="module")
def alone(engines):
    """Each request served alone by worker B's engine (B holds every adapter) before serving."""
    sampling = carajax.SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=())
    return [engines[1].generate([p], adapters=[a], sampling=sampling)[0].token_ids
            for p, a in REQUESTS]


@pytest.fixture(scope="module")
def cluster(engines, alone):
    with serve(engines[0], 0, host="127.0.0.1", name="A") as wa, \
            serve(engines[1], 0, host="127.0.0.1", name="B") as wb, \
            serve_router([wa.address, wb.address], 0, policy="carajax", poll_interval=0.1) as router:
        wait_until_healthy(router, 2)
        yield router, wa, wb


def test_concurrent_streams_across_workers_equal_single_request_outputs(cluster, alone):
    router, _, _ = cluster
    client = Client(router.address, timeout=120)

    def one(i):
        prompt, adapter = REQUESTS[i]
        stream = client.generate(prompt, adapter, request_id=f"req-{i}", **GREEDY)
        streamed = list(stream)
        return streamed, stream.result()

    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        results = list(ex.map(one, range(len(REQUESTS))))
    for i, (streamed, res) in enumerate(results):
        assert streamed == res.token_ids == alone[i], i
        assert res.request_id == f"req-{i}" and res.finish_reason == "length"
    workers = [res.metrics.worker for _, res in results]
    assert set(workers) == {"A", "B"}  # both served
    # Requests for "onlyB" can only have gone to B.
    assert all(w == "B" for w, (_, a) in zip(workers, REQUESTS) if a == "onlyB")
    # Every request counted exactly once, by the router and by the workers together.
    counted = {(s.labels["worker"], s.labels["outcome"]): s.value
               for m in router.servicer.registry.collect() for s in m.samples
               if s.name == "carajax_router_requests_total"}
    assert sum(counted.values()) == len(REQUESTS)
    # The carajax policy learned every finished reply's length (8 tokens each) for its SLO risk.
    assert router.servicer.policy.outputs.counts().get(8, 0) >= len(REQUESTS)
    stats = client.stats()
    assert stats.counters.requests["length"] >= len(REQUESTS) and not stats.running


def test_errors_pass_through_and_the_router_serves_on(cluster, alone):
    router, _, _ = cluster
    client = Client(router.address, timeout=60)
    with pytest.raises(ServerError) as e:
        client.generate([2, 5], "nope", **GREEDY).result()
    assert e.value.code == Code.NOT_FOUND and "nope" in e.value.details
    with pytest.raises(ServerError) as e:
        client.generate([2, 5], "r8", max_tokens=8, top_p=1.5).result()
    assert e.value.code == Code.INVALID_ARGUMENT and "top_p" in e.value.details
    with pytest.raises(ServerError) as e:
        client.generate([5] * 5000, "r8", **GREEDY).result()
    assert e.value.code == Code.INVALID_ARGUMENT and "context" in e.value.details
    prompt, adapter = REQUESTS[3]
    assert client.generate(prompt, adapter, **GREEDY).result().token_ids == alone[3]


def test_list_adapters_is_the_union_of_the_workers(cluster):
    router, _, _ = cluster
    listed = {a.adapter_id: a for a in Client(router.address, timeout=30).list_adapters()}
    assert set(listed) == {*RANKS, "onlyB"}
    assert listed["r32"].rank == 32


def _start_worker(adapter_root) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "carajax.cli", "serve", "--model", "llama-test", "--port", "0",
         "--host", "127.0.0.1", "--name", "C", "--adapters", str(adapter_root), "--no-warmup",
         "--cold-start", "cached", "--max-batch", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if m := re.search(r"ready on (\S+)", line):
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("worker C did not start")


def test_a_killed_worker_fails_only_its_own_streams(cluster, adapter_dirs):
    _, wa, _ = cluster
    proc, address = _start_worker(os.path.dirname(adapter_dirs["r8"]))
    try:
        with serve_router([wa.address, address], 0, policy="round_robin", poll_interval=0.1) as router:
            wait_until_healthy(router, 2)
            client = Client(router.address, timeout=120)
            # Round robin: streams alternate A, C, A, C. Each runs long enough to be killed mid-way.
            streams = [client.generate(_prompt(i), "r8", max_tokens=400, temperature=0.0,
                                       ignore_eos=True) for i in range(4)]
            firsts = [next(iter(s)) for s in streams]  # every stream has started
            assert len(firsts) == 4
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            outcomes = []
            for s in streams:
                try:
                    outcomes.append(("ok", s.result().metrics.worker))
                except ServerError as e:
                    outcomes.append((e.code, e.details))
            ok = [o for o in outcomes if o[0] == "ok"]
            failed = [o for o in outcomes if o[0] != "ok"]
            assert ok == [("ok", "A"), ("ok", "A")], outcomes
            assert len(failed) == 2 and all(code == Code.UNAVAILABLE and "worker C" in msg
                                            for code, msg in failed), failed
            # The router keeps serving, now only on A.
            res = client.generate(_prompt(9), "r8", **GREEDY).result()
            assert res.metrics.worker == "A" and len(res.token_ids) == 8
    finally:
        if proc.poll() is None:
            proc.kill()


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return f"fake {self._code.name}"


def test_a_slow_worker_is_not_a_dead_worker(cluster, monkeypatch):
    """Stats can time out while a worker compiles a step variant; its health service still answers,
    so the router keeps it. Only a worker that does not answer at all is marked down."""
    router, wa, _ = cluster
    link = next(w for w in router.servicer.links if w.address == wa.address)
    real = link.stub.Stats

    def fail_with(code):
        def stats(*a, **kw):
            raise _FakeRpcError(code)
        return stats

    try:
        monkeypatch.setattr(link.stub, "Stats", fail_with(Code.DEADLINE_EXCEEDED))
        assert link.poll() and link.healthy and link.state.healthy
        monkeypatch.setattr(link.stub, "Stats", fail_with(Code.UNAVAILABLE))
        assert not link.poll() and not link.healthy and "UNAVAILABLE" in link.error
    finally:
        monkeypatch.setattr(link.stub, "Stats", real)
    assert link.poll() and link.healthy  # answers again: back in rotation
