"""The gRPC worker over loopback: streamed tokens equal the engine's, concurrent mixed-adapter
streams, every error status, cancellation and deadlines freeing slots, health, reflection,
/metrics, and a SIGTERM drain of `carajax serve` in a subprocess."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import carajax
from carajax.client import AsyncClient, Client, GenerateStream, ServerError
from carajax.config import TARGET_MODULES, EngineConfig
from carajax.models import weights
from carajax.models.tokenizer import ByteTokenizer
from carajax.server import carajax_pb2 as pb
from carajax.server.adapter_paths import AdapterPathPolicy
from carajax.server.codec import IncrementalText
from carajax.server.worker import serve
from carajax.testing import write_random_adapter

RANKS = {"r8": 8, "r16": 16, "r32": 32}
MAX_BATCH, MAX_QUEUE = 2, 32  # few batch buckets: each compiled variant costs seconds
GREEDY = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
# Runs until the test stops it: 4000 decode steps (the model's context is widened to 4096 below),
# many seconds even on a fast idle box, so a test can fill the queue behind two of these.
LONG = dict(max_tokens=4000, temperature=0.0, ignore_eos=True)
Code = grpc.StatusCode


def _prompt(i: int) -> list[int]:
    rng = np.random.default_rng(200 + i)
    return [2, *rng.integers(4, 256, 3 + i % 10).tolist()]  # <= 13 tokens: one prefill chunk


# 18 requests over the three adapters and the base model.
REQUESTS = [(_prompt(i), a) for i, a in zip(range(18), itertools.cycle([None, *RANKS]))]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("server-adapters")
    return {name: write_random_adapter(root / name, tiny_config, rank=r, seed=i,
                                       target_modules=TARGET_MODULES)
            for i, (name, r) in enumerate(RANKS.items())}


@pytest.fixture(scope="module")
def model():
    config = dataclasses.replace(carajax.ModelConfig.from_name("llama-test"), max_position_embeddings=4096)
    return weights.random_model(config, seed=0, init_std=0.1)


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    """The same weights as an HF checkpoint: `carajax serve` loads it without random init."""
    path = tmp_path_factory.mktemp("server-model")
    weights.save_hf(model, path)
    return path


@pytest.fixture(scope="module")
def engine(model, adapter_dirs):
    # `cached`: no CPU-assist variants to compile; the engine tests cover the cold-start paths.
    eng = carajax.Engine(model, ByteTokenizer(), EngineConfig(
        max_batch_size=MAX_BATCH, max_queue=MAX_QUEUE, prefill_chunk=16, cold_start="cached"))
    for name, path in adapter_dirs.items():
        eng.add_adapter(name, path)
    # Compile every step variant now: a compile mid-test holds the engine lock for seconds.
    # (The runner's part of Engine.warmup: the pool's installs were compiled by registration.)
    eng.runner.warmup(cpu=False)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def alone(engine):
    """Each request served alone by the same engine before it is served over gRPC."""
    sampling = carajax.SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=())
    return [engine.generate([p], adapters=[a], sampling=sampling)[0].token_ids for p, a in REQUESTS]


@pytest.fixture(scope="module")
def worker(engine, alone):
    # Any path: the adapter-root rules have their own tests (test_adapter_security.py).
    with serve(engine, 0, host="127.0.0.1", name="test-worker", metrics_port=0,
               adapter_paths=AdapterPathPolicy(allow_any=True)) as w:
        yield w


@pytest.fixture(scope="module")
def client(worker):
    with Client(worker.address, timeout=60) as c:
        yield c


def wait_idle(client: Client, timeout: float = 10.0) -> pb.StatsResponse:
    """Stats once nothing runs or waits (cancellation is asynchronous to the client)."""
    deadline = time.monotonic() + timeout
    while True:
        st = client.stats()
        if (not st.running and st.waiting == 0) or time.monotonic() > deadline:
            return st
        time.sleep(0.02)


def wait_counted(client: Client, outcome: str, at_least: int, timeout: float = 10.0) -> int:
    """The worker's count of `outcome`, once it reaches `at_least` (a stream's handler counts it
    just after the engine lets it go, so Stats may lag the client by a moment)."""
    deadline = time.monotonic() + timeout
    while (n := client.stats().counters.requests[outcome]) < at_least and time.monotonic() < deadline:
        time.sleep(0.02)
    return n


def check_serves(client: Client, alone, i: int = 1) -> None:
    prompt, adapter = REQUESTS[i]
    assert client.generate(prompt, adapter, **GREEDY).result().token_ids == alone[i]


def test_stream_equals_engine_output(client, alone):
    prompt, adapter = REQUESTS[3]
    stream = client.generate(prompt, adapter, request_id="mine-1", **GREEDY)
    tokens = list(stream)
    result = stream.result()
    assert tokens == result.token_ids == alone[3]
    assert result.finish_reason == "length" and result.request_id == "mine-1"
    assert result.adapter == adapter
    # Text pieces concatenate to the decoded output (the byte tokenizer splits UTF-8 characters).
    assert stream.text == result.text == ByteTokenizer().decode(alone[3])
    m = result.metrics
    assert (m.worker, m.prompt_tokens, m.output_tokens) == ("test-worker", len(prompt), 8)
    assert m.ttft_s > 0 and m.latency_s >= m.ttft_s and m.tpot_s > 0
    assert m.cold_start_path == "warm"


def test_text_prompt_and_async_client(worker, engine):
    sampling = carajax.SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=())
    want = engine.generate("Hello, world", adapters="r16", sampling=sampling)[0]

    async def run():
        async with AsyncClient(worker.address, timeout=60) as c:
            stream = c.generate("Hello, world", "r16", max_tokens=6, temperature=0.0, ignore_eos=True)
            tokens = [t async for t in stream]
            return tokens, await stream.result(), await c.list_adapters(), await c.health()

    tokens, result, adapters, health = asyncio.run(run())
    assert tokens == result.token_ids == want.token_ids and result.text == want.text
    assert [(a.adapter_id, a.rank) for a in adapters] == sorted(RANKS.items())
    assert health == "SERVING"


def test_concurrent_mixed_adapter_streams(client, alone):
    with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
        outs = list(pool.map(lambda pa: client.generate(pa[0], pa[1], **GREEDY).result(), REQUESTS))
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason == "length" for o in outs)
    st = wait_idle(client)
    assert not st.running and st.waiting == 0 and not st.queued


def _raw_generate(client: Client, request: pb.GenerateRequest):
    return GenerateStream(client.stub.Generate(request, timeout=30)).result()


ERRORS = {
    "unknown adapter": (lambda c, d: c.generate([2, 65], "nope").result(), Code.NOT_FOUND, "'nope'"),
    "missing prompt": (lambda c, d: _raw_generate(c, pb.GenerateRequest()), Code.INVALID_ARGUMENT,
                       "missing prompt"),
    "empty prompt": (lambda c, d: c.generate([]).result(), Code.INVALID_ARGUMENT, "empty prompt"),
    "token outside vocab": (lambda c, d: c.generate([2, 999]).result(), Code.INVALID_ARGUMENT,
                            "outside the vocabulary"),
    "prompt too long": (lambda c, d: c.generate([65] * 5000).result(), Code.INVALID_ARGUMENT,
                        "context length"),
    "max_tokens over limit": (lambda c, d: c.generate([2], max_tokens=10**6).result(),
                              Code.INVALID_ARGUMENT, "max_tokens"),
    "max_tokens zero": (lambda c, d: c.generate([2], max_tokens=0).result(), Code.INVALID_ARGUMENT,
                        "max_tokens"),
    "negative temperature": (lambda c, d: c.generate([2], temperature=-1.0).result(),
                             Code.INVALID_ARGUMENT, "temperature"),
    "top_p zero": (lambda c, d: c.generate([2], top_p=0.0).result(), Code.INVALID_ARGUMENT, "top_p"),
    "seed out of range": (lambda c, d: c.generate([2], seed=2**40).result(), Code.INVALID_ARGUMENT,
                          "seed"),
    "request id too long": (lambda c, d: c.generate([2], request_id="x" * 200).result(),
                            Code.INVALID_ARGUMENT, "request_id"),
    "adapter dir missing": (lambda c, d: c.load_adapter("new", str(d / "nowhere")),
                            Code.INVALID_ARGUMENT, "nowhere"),
    "adapter dir empty": (lambda c, d: c.load_adapter("new", str(d)), Code.INVALID_ARGUMENT,
                          "adapter_config.json"),
    "adapter id taken": (lambda c, d: c.load_adapter("r8", str(d)), Code.ALREADY_EXISTS, "'r8'"),
    "unload unknown": (lambda c, d: c.unload_adapter("nope"), Code.NOT_FOUND, "'nope'"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_status_then_next_request_is_served(client, alone, tmp_path, case):
    call, code, needle = ERRORS[case]
    with pytest.raises(ServerError) as info:
        call(client, tmp_path)
    assert info.value.code == code, info.value
    assert needle in info.value.details
    check_serves(client, alone)


def test_queue_full_is_resource_exhausted_and_stats_show_the_queue(client, alone):
    def start(i):
        return client.generate([2, 70 + i], "r32" if i % 2 else None, **LONG)

    # The batch first, then the queue: sent in one burst, all 34 could reach the queue before the
    # engine admits any, and the last two would be refused.
    streams = [start(i) for i in range(MAX_BATCH)]
    try:
        for s in streams:
            next(iter(s))  # running: it has a token
        streams += [start(i) for i in range(MAX_BATCH, MAX_BATCH + MAX_QUEUE)]
        _queue_full_checks(client, streams)
    finally:  # never leave 34 long streams running into the next test's counters
        for s in streams:
            s.cancel()
    st = wait_idle(client)
    assert not st.running and st.waiting == 0
    check_serves(client, alone)


def _queue_full_checks(client, streams):
    # Generous: on a loaded 2-core box each submit can wait a whole engine step for the lock.
    deadline = time.monotonic() + 90
    while (st := client.stats()).waiting < MAX_QUEUE and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(st.running) == MAX_BATCH and st.waiting == MAX_QUEUE
    assert len(st.queued) == MAX_QUEUE and {q.rank for q in st.queued} == {0, 32}
    assert all(q.phase == pb.PHASE_WAITING and q.max_tokens == LONG["max_tokens"] for q in st.queued)
    assert {r.phase for r in st.running} <= {pb.PHASE_PREFILL, pb.PHASE_DECODE}
    assert {(r.adapter_id, r.rank) for r in st.running} <= {("", 0), ("r32", 32)}
    assert st.memory.pages_total > 0 and st.memory.device_bytes_used > 0
    assert {a.adapter_id: a.where for a in st.adapters} == dict.fromkeys(RANKS, pb.RESIDENCY_DEVICE)
    with pytest.raises(ServerError) as info:
        client.generate([2, 65], **GREEDY).result()
    assert info.value.code == Code.RESOURCE_EXHAUSTED and "queue is full" in info.value.details


def test_cancel_mid_stream_frees_the_slot(client, alone):
    before = client.stats().counters
    long = client.generate([2, 66, 67], "r8", **LONG)
    others = [client.generate(p, a, **GREEDY) for p, a in REQUESTS[:3]]
    it = iter(long)
    assert len([next(it) for _ in range(3)]) == 3
    long.cancel()
    with pytest.raises(ServerError) as info:
        long.result()
    assert info.value.code == Code.CANCELLED
    assert [o.result().token_ids for o in others] == alone[:3]
    st = wait_idle(client)
    assert not st.running and st.waiting == 0
    # It stopped early: the worker finished it as cancelled, well short of its 4000 tokens (and of 1000).
    cancelled = before.requests["cancelled"] + 1
    assert wait_counted(client, "cancelled", cancelled) == cancelled
    assert client.stats().counters.output_tokens - before.output_tokens < 1000


def test_duplicate_request_id_in_flight_is_already_exists(client, alone):
    first = client.generate([2, 69], request_id="dup", **LONG)
    next(iter(first))
    with pytest.raises(ServerError) as info:
        client.generate([2, 65], request_id="dup", **GREEDY).result()
    assert info.value.code == Code.ALREADY_EXISTS and "'dup'" in info.value.details
    first.cancel()
    wait_idle(client)
    check_serves(client, alone)


def test_incremental_text_holds_split_characters():
    tok = ByteTokenizer()
    ids = tok.encode("héllo € \U0001F600!")[1:]  # one token per UTF-8 byte
    text = IncrementalText(tok.decode)
    pieces = [text.add(t) for t in ids] + [text.flush()]
    assert "".join(pieces) == tok.decode(ids) and not any("\ufffd" in p for p in pieces)
    assert pieces[:2] == ["h", ""]  # the first byte of "é" waits for the second
    text = IncrementalText(tok.decode)  # an invalid byte comes out once the next one arrives
    assert [text.add(0xE2), text.add(65), text.flush()] == ["", "\ufffdA", ""]


def test_deadline_cancels_the_request(client, alone):
    stream = client.generate([2, 68], "r16", **LONG, timeout=0.5)
    with pytest.raises(ServerError) as info:
        stream.result()
    assert info.value.code == Code.DEADLINE_EXCEEDED
    assert 0 < len(stream.token_ids) < 1000
    assert not wait_idle(client).running
    assert wait_counted(client, "DEADLINE_EXCEEDED", 1) >= 1
    check_serves(client, alone)


def test_load_pin_generate_unload(client, tmp_path, tiny_config):
    path = write_random_adapter(tmp_path / "extra", tiny_config, rank=8, seed=9)
    info = client.load_adapter("extra", path, pin=True)
    assert (info.adapter_id, info.rank, info.where, info.pinned) == ("extra", 8, "device", True)
    result = client.generate([2, 65, 66], "extra", **GREEDY).result()
    assert result.finish_reason == "length" and result.adapter == "extra"
    client.unload_adapter("extra")
    assert [a.adapter_id for a in client.list_adapters()] == sorted(RANKS)


def test_health_and_reflection(worker):
    with grpc.insecure_channel(worker.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", "carajax.v1.CaraServe"):
            status = check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                  reflection_pb2.ServerReflectionRequest(file_containing_symbol="carajax.v1.CaraServe")]),
            timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"carajax.v1.CaraServe", "grpc.health.v1.Health"} <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto  # the descriptor is served


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_scrape_counts_what_was_sent(worker, client, alone):
    before = _scrape(worker.metrics_port)
    for i in (0, 1):
        check_serves(client, alone, i)
    with pytest.raises(ServerError):
        client.generate([2], "nope").result()
    after = _scrape(worker.metrics_port)
    delta = lambda name, **labels: (after.get((name, tuple(sorted(labels.items()))), 0)  # noqa: E731
                                    - before.get((name, tuple(sorted(labels.items()))), 0))
    assert delta("carajax_requests_total", outcome="length") == 2
    assert delta("carajax_requests_total", outcome="NOT_FOUND") == 1
    assert delta("carajax_time_to_first_token_seconds_count") == 2
    assert delta("carajax_e2e_request_latency_seconds_count") == 2
    assert delta("carajax_generation_tokens_total") == 16
    assert delta("carajax_cold_starts_total", path="warm") == 1  # REQUESTS[0] is the base model
    assert after[("carajax_num_requests_running", ())] == 0
    assert sum(after[("carajax_adapters", (("residency", r),))] for r in ("host", "loading", "device")) == 3
    info = [k for k in after if k[0] == "carajax_lora_requests_info"]
    assert info and dict(info[0][1])["max_lora"] == "64"


# -- SIGTERM drain of `carajax serve` -----------------------------------------------------------
class ServeProcess:
    """`carajax serve` in a subprocess; `wait_ready()` returns its address from the ready line."""

    def __init__(self, model_dir, adapter_root: str, log_path):
        self.log = open(log_path, "w+")
        # Unoptimised XLA code compiles about twice as fast.
        env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "carajax.cli", "serve", "--model", str(model_dir),
             "--adapters", adapter_root, "--host", "127.0.0.1", "--port", "0", "--cold-start", "wait",
             "--max-batch", "1", "--no-warmup", "--name", "drain-test", "--grace", "30"],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_ready(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"carajax serve printed nothing in {timeout} s:\n{self.stderr()}")
        assert "ready on 127.0.0.1:" in line and "3 adapters" in line, line + self.stderr()
        return line.split(" ready on ")[1].split()[0]

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def serve_process(model_dir, adapter_dirs, tmp_path):
    p = ServeProcess(model_dir, os.path.dirname(adapter_dirs["r8"]), tmp_path / "stderr")
    yield p
    p.close()


def test_sigterm_drains_in_flight_streams(serve_process, engine):
    p = serve_process
    sampling = carajax.SamplingParams(max_tokens=150, temperature=0.0, stop_token_ids=())
    want = engine.generate([[2, 65, 66]], adapters="r8", sampling=sampling)[0].token_ids
    address = p.wait_ready(timeout=90)
    with Client(address, timeout=90) as c, Client(address, timeout=10) as probe:
        # 150 decode steps take about a second here: the drain starts while this stream runs.
        stream = c.generate([2, 65, 66], "r8", max_tokens=150, temperature=0.0, ignore_eos=True)
        first = next(iter(stream))  # compiled and running
        p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if probe.health() != "SERVING":
                    break
            except ServerError:  # already refusing new RPCs
                break
            time.sleep(0.02)
        with pytest.raises(ServerError) as info:  # new work is refused while draining
            probe.generate([2, 65], max_tokens=2).result()
        assert info.value.code == Code.UNAVAILABLE
        result = stream.result()
    assert result.finish_reason == "length" and result.token_ids[0] == first
    assert result.token_ids == want  # same weights and adapter: the same greedy tokens
    assert p.proc.wait(timeout=30) == 0, p.stderr()
    assert "draining" in p.lines.get(timeout=5)


def test_sigterm_while_the_worker_compiles_exits_cleanly():
    """A worker stopped while it compiles (an orchestrator scaling down, a user's Ctrl-C) stops
    the start-up: compiles in flight finish, the rest are dropped, exit 0 with a line saying so,
    no traceback (it used to die by the signal, -15)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "carajax.cli", "serve", "--model", "carajax-demo", "--host",
         "127.0.0.1", "--port", "0", "--warmup", "--cold-start", "async", "--cost-model", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "NOT_SERVING while the engine compiles" in line, line + proc.stderr.read()[-2000:]
        time.sleep(1.0)  # into the compiles
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by a signal while starting" in out
    assert "Traceback" not in err
