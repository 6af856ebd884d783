"""The router server: the CaraServe service in front of several workers, routing each Generate by a
policy from `carajax.sched.router` (the same code the simulator runs).

    router = serve_router(["127.0.0.1:50051", "127.0.0.1:50052"], port=50050, policy="carajax")
    ...
    router.stop(grace=30)

What the router knows about a worker (`WorkerLink`):
  * from its own dispatches, at once: the requests it sent there and whether each has produced a
    token yet (queued vs decoding), with prompt length and adapter rank: the policy's `queue` and
    `batch`;
  * from the worker's `Stats`, polled every `poll_interval` seconds: health (a worker that stops
    answering is marked down and gets nothing until it answers again), the adapters it has
    registered (a request goes only to workers that hold its adapter) and which are resident on
    its device (the cold-start price), adapter pages free or evictable, KV rows free.

With an adapter root (`adapter_root`, `carajax route --adapter-root DIR`: the store the workers
were started with too), a request naming an adapter no live worker has registered but that exists
as `DIR/<name>` goes to any live worker, priced as a cold start of the rank its
adapter_config.json gives; the worker registers it on first use. Such a name, once some workers
hold it, may still go to the others (priced cold there), so a popular adapter spreads. A malformed
name is INVALID_ARGUMENT here, before any worker is asked.

Failures: a worker that dies mid-stream fails only the streams it was serving, with UNAVAILABLE
naming the worker; before the first token a refused request (worker down, queue full) is retried
once on each remaining candidate. The worker's own status codes (NOT_FOUND, INVALID_ARGUMENT, ...)
pass through unchanged. A client's cancel or deadline cancels the upstream call.

With an API key, clients must send it and the router sends its workers theirs (the same key by
default) on every call, polls included (carajax.server.auth).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily

from carajax.sched import router as policies
from carajax.sched.cost_model import (
    RANK_AWARE_POLICIES,
    CostModel,
    RankBlindModelError,
    require_rank_terms,
)
from carajax.server import auth
from carajax.server import carajax_pb2 as pb
from carajax.server import carajax_pb2_grpc as pb_grpc
from carajax.server.adapter_paths import (
    AdapterNameError,
    AdapterPathError,
    AdapterPathPolicy,
    AdapterStore,
)
from carajax.server.worker import SERVICE_NAME, start_server

Code = grpc.StatusCode
# Codes after which the same request may go to another worker (nothing was generated yet).
_RETRYABLE = (Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED)


@dataclasses.dataclass
class _Dispatch:
    prompt_tokens: int
    rank: int
    decoding: bool = False  # produced its first token
    tokens: int = 0  # tokens streamed back so far (the policy's decode age)


_log = logging.getLogger("carajax.router")


class _CostModelInfo:
    """`carajax_router_cost_model_info{worker, cost_model}`: what each worker is priced with."""

    def __init__(self, links):
        self.links = links

    def collect(self):
        info = GaugeMetricFamily("carajax_router_cost_model_info",
                                 "The cost model each worker is priced with", labels=["worker", "cost_model"])
        for link in self.links:
            info.add_metric([link.name, link.cost_source], 1.0)
        yield info


class WorkerLink:
    """One upstream worker: its channel, what the router dispatched there, its last Stats."""

    def __init__(self, address: str, cost: CostModel, stats_timeout: float,
                 api_key: str | None = None, rank_aware: bool = False):
        self.address = address
        self.metadata = auth.call_metadata(api_key)  # sent with every call to this worker
        self.name = address  # replaced by the worker's own name after the first Stats
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.CaraServeStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.stats_timeout = stats_timeout
        self.healthy = False  # until the first Stats answers
        self.error = "not polled yet"
        self.adapters: dict[str, int] = {}  # registered adapter id -> rank
        self.adapter_bytes: dict[str, int] = {}  # registered adapter id -> bytes of its weights
        self._adapters_version: int | None = None  # the worker's, when `adapters` was listed
        self.state = policies.WorkerState(name=address, cost=cost, healthy=False)
        # What this worker is priced with: its own model from Stats when it reports one (fitted on
        # its device), else the router's. A rank-aware policy refuses a rank-blind model.
        self.default_cost, self.rank_aware = cost, rank_aware
        self.cost_source = f"router default: {cost.describe()}"
        self._cost_json = ""
        self.inflight: dict[str, _Dispatch] = {}
        self.last_stats: pb.StatsResponse | None = None

    def poll(self) -> bool:
        """One Stats call; updates health, adapters, residency and memory. True if it answered."""
        try:
            st = self.stub.Stats(pb.StatsRequest(), timeout=self.stats_timeout,
                                 metadata=self.metadata)
            if st.adapters_version != self._adapters_version:  # registered or removed since
                listed = self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=self.stats_timeout,
                                                metadata=self.metadata).adapters
                self.adapters = {a.adapter_id: a.rank for a in listed}
                self.adapter_bytes = {a.adapter_id: a.bytes for a in listed}
                self._adapters_version = st.adapters_version
        except grpc.RpcError as e:
            # A worker compiling a step variant (seconds on a CPU) answers Stats late: that is
            # slow, not down. Liveness comes from the health service, which never waits on the
            # engine; the last known state is kept until Stats answers again.
            if e.code() == Code.DEADLINE_EXCEEDED and self.last_stats is not None and self.alive():
                self.error = "Stats slow (worker busy)"
                return True
            self.mark_down(f"{e.code().name}: {e.details()}")
            return False
        self.last_stats = st
        self.name = st.worker or self.address
        if st.cost_model != self._cost_json:
            self._cost_json = st.cost_model
            self._use_cost_model(st.cost_model)
        self.healthy = st.serving
        self.error = "" if st.serving else "draining"
        mem = st.memory
        page_rank = max(1, mem.page_rank)
        # Pages a new adapter can take: free ones plus those of idle, unpinned residents (LRU).
        evictable = sum(-(-a.rank // page_rank) for a in st.adapters
                        if a.where == pb.RESIDENCY_DEVICE and not a.pinned and a.in_use == 0)
        s = self.state
        s.name, s.healthy, s.page_rank = self.name, self.healthy, page_rank
        s.resident = {a.adapter_id for a in st.adapters if a.where == pb.RESIDENCY_DEVICE}
        # Stats lists the adapters in host memory or on the device; the others are read first.
        s.in_host = {a.adapter_id for a in st.adapters}
        s.read_bytes_per_s, s.read_latency_s = mem.disk_read_bytes_per_s, mem.disk_read_latency_s
        s.adapter_bytes = self.adapter_bytes
        s.pages_free = mem.pages_free + evictable
        s.max_batch = st.max_batch_size
        s.kv_free_rows = max(0, st.max_batch_size - len(st.running)) * st.max_seq_len
        return True

    def _use_cost_model(self, text: str) -> None:
        """Price this worker with the model it reports (its own device's), unless it is none,
        unreadable, or rank-blind under a rank-aware policy: then the router's, said in the log."""
        cost, why = self.default_cost, ""
        if text:
            try:
                cost = CostModel.from_json(text)
                require_rank_terms(cost, "carajax" if self.rank_aware else "", f" (worker {self.name})")
            except RankBlindModelError as e:
                cost, why = self.default_cost, f"refused its own model: {e}"
            except (ValueError, KeyError) as e:
                cost, why = self.default_cost, f"unreadable cost model in its Stats: {e}"
        self.state.cost = cost
        self.cost_source = (f"its own: {cost.describe()}" if cost is not self.default_cost
                            else f"router default: {cost.describe()}")
        (_log.warning if why else _log.info)(
            "worker %s priced with %s%s", self.name, self.cost_source, f" ({why})" if why else "")

    def alive(self) -> bool:
        """True if the worker's health service answers SERVING."""
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                      timeout=self.stats_timeout, metadata=self.metadata)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def mark_down(self, why: str) -> None:
        self.healthy = self.state.healthy = False
        self.error = why

    def refresh_state(self) -> policies.WorkerState:
        """The policy's view: this router's in-flight requests as queue (no token yet) and batch."""
        s = self.state
        s.queue = [(d.prompt_tokens, d.rank) for d in self.inflight.values() if not d.decoding]
        decoding = [d for d in self.inflight.values() if d.decoding]
        s.batch = [(d.prompt_tokens + d.tokens, d.rank) for d in decoding]
        s.decode_ages = [max(1, d.tokens) for d in decoding]
        return s

    def close(self) -> None:
        self.channel.close()


class RouterServicer(pb_grpc.CaraServeServicer):
    """CaraServe over a set of workers: Generate is routed, adapter calls fan out to all."""

    def __init__(self, links: Sequence[WorkerLink], policy: policies.Policy, *,
                 avg_output_len: float = 128.0, registry: CollectorRegistry | None = None,
                 adapter_store: AdapterStore | None = None):
        self.links = list(links)
        self.adapter_store = adapter_store  # the workers' shared adapter root, if given
        self.policy = policy
        self.avg_output_len = avg_output_len
        self.serving = True
        self._lock = threading.Lock()  # policy state and the links' in-flight tables
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("carajax_router_requests", "Generate calls by worker and outcome",
                                ["worker", "outcome"], registry=self.registry)
        self.up = Gauge("carajax_router_workers_up", "Workers answering Stats",
                        registry=self.registry)
        self.up.set_function(lambda: sum(link.healthy for link in self.links))
        self.registry.register(_CostModelInfo(self.links))

    # -- routing ----------------------------------------------------------------------------
    def _route_request(self, request: pb.GenerateRequest, rank: int) -> policies.RouteRequest:
        if request.WhichOneof("prompt") == "token_ids":
            prompt = len(request.token_ids.ids)
        else:  # the router has no tokenizer: UTF-8 bytes + BOS (exact for the byte tokenizer)
            prompt = len(request.text.encode()) + 1
        out = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 16
        return policies.RouteRequest(request.adapter_id, rank, prompt,
                                     min(out, int(self.avg_output_len)))

    def _choose(self, request: pb.GenerateRequest, rid: str, exclude: set[str]) -> WorkerLink:
        """Pick a worker and record the dispatch; raises (code, message) as `_NoRoute`."""
        adapter = request.adapter_id
        live = [w for w in self.links if w.healthy and w.address not in exclude]
        if not live:
            down = ", ".join(f"{w.name} ({w.error})" for w in self.links)
            raise _NoRoute(Code.UNAVAILABLE, f"no worker available: {down}")
        holders = [w for w in live if not adapter or adapter in w.adapters]
        rank = holders[0].adapters.get(adapter, 0) if adapter and holders else 0
        if adapter and self.adapter_store is not None:
            found = self._root_rank(adapter, held=bool(holders))
            if found is not None:  # every worker finds DIR/<name>: cold where it is not held
                rank, holders = rank if holders else found, live
        if not holders:
            where = " nor is it under the adapter root" if self.adapter_store is not None else ""
            raise _NoRoute(Code.NOT_FOUND, f"unknown adapter {adapter!r}: no live worker has it "
                                           f"registered{where}")
        route = self._route_request(request, rank)
        with self._lock:
            states = [w.refresh_state() for w in holders]
            try:
                chosen = self.policy.choose(route, states)
            except policies.NoWorkerError as e:
                raise _NoRoute(Code.RESOURCE_EXHAUSTED, str(e)) from None
            link = holders[states.index(chosen)]
            link.inflight[rid] = _Dispatch(route.prompt_tokens, rank)
        return link

    def _root_rank(self, adapter: str, held: bool) -> int | None:
        """The rank of `DIR/<adapter>` under the adapter root (None: not there). A name that
        cannot be there is refused, unless some worker has it registered (by LoadAdapter)."""
        try:
            return self.adapter_store.rank(adapter)
        except AdapterNameError as e:
            if held:
                return None
            raise _NoRoute(Code.INVALID_ARGUMENT, str(e)) from None
        except AdapterPathError as e:
            if held:
                return None
            raise _NoRoute(Code.PERMISSION_DENIED, f"cannot load adapter {adapter!r}: {e}") from None

    def _done(self, link: WorkerLink, rid: str, outcome: str) -> None:
        with self._lock:
            link.inflight.pop(rid, None)
        self.requests.labels(link.name, outcome).inc()

    # -- Generate ---------------------------------------------------------------------------
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        if not self.serving:
            context.abort(Code.UNAVAILABLE, "router is shutting down")
        if not request.request_id:  # one id for every attempt, so a retry cannot run twice
            request.request_id = f"r-{uuid.uuid4().hex[:16]}"
        rid = request.request_id
        tried: set[str] = set()
        while True:
            try:
                link = self._choose(request, rid, tried)
            except _NoRoute as e:
                context.abort(e.code, str(e))
            tried.add(link.address)
            remaining = context.time_remaining()
            call = link.stub.Generate(request, timeout=remaining, metadata=link.metadata)
            context.add_callback(call.cancel)  # client gone or deadline: stop the worker's work
            started, outcome, recorded = False, "error", False
            try:
                for msg in call:
                    kind = msg.WhichOneof("kind")
                    with self._lock:
                        if (d := link.inflight.get(rid)) is not None:
                            d.decoding = True
                            if kind == "chunk":
                                d.tokens += len(msg.chunk.token_ids)
                    started = True
                    if kind == "result":
                        # Counted before the client sees the end: after it, the client may close
                        # the call and this generator may never run again.
                        self._done(link, rid, msg.result.finish_reason)
                        if msg.result.finish_reason != "cancelled" and (
                                observe := getattr(self.policy, "observe_output", None)):
                            with self._lock:
                                observe(len(msg.result.token_ids))
                        recorded = True
                    yield msg
                return
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
                outcome = code.name
                if recorded or (code == Code.CANCELLED and not context.is_active()):
                    return  # done already, or our own client went away: nothing to report
                if code == Code.UNAVAILABLE or (code in (Code.UNKNOWN, Code.INTERNAL)
                                                and not link.poll()):
                    link.mark_down(f"{code.name}: {details}")
                    code = Code.UNAVAILABLE
                if not started and code in _RETRYABLE and len(tried) < len(self.links):
                    continue  # nothing streamed yet: try the next best worker
                where = f"worker {link.name}" + (" failed mid-stream" if started else "")
                context.abort(code, f"{where}: {details}")
            finally:
                if not recorded:
                    self._done(link, rid, outcome)

    # -- adapters and stats fan out ---------------------------------------------------------
    def _fan_out(self, method: str, request, context, *, only=None, refresh: bool = True):
        """Call `method` on every live worker (or those `only` selects); [(link, reply or error)].
        `refresh`: poll their Stats afterwards (adapters changed: routing must see it now)."""
        links = [w for w in self.links if w.healthy and (only is None or only(w))]
        if not links:
            context.abort(Code.UNAVAILABLE, "no worker available")
        timeout = context.time_remaining()
        out = []
        for link in links:
            try:
                out.append((link, getattr(link.stub, method)(request, timeout=timeout,
                                                             metadata=link.metadata)))
            except grpc.RpcError as e:
                out.append((link, e))
        for link, _ in out if refresh else ():
            link.poll()
        return out

    @staticmethod
    def _first_ok_or_abort(results, context, what: str):
        oks = [r for _, r in results if not isinstance(r, grpc.RpcError)]
        if oks:
            return oks[0]
        link, err = results[0]
        context.abort(err.code(), f"{what} failed on worker {link.name}: {err.details()}")

    def LoadAdapter(self, request, context) -> pb.LoadAdapterResponse:
        """Registers the adapter on every live worker (the path must exist on each one's disk)."""
        return self._first_ok_or_abort(self._fan_out("LoadAdapter", request, context), context,
                                       f"LoadAdapter {request.adapter_id!r}")

    def UnloadAdapter(self, request, context) -> pb.UnloadAdapterResponse:
        name = request.adapter_id
        results = self._fan_out("UnloadAdapter", request, context, only=lambda w: name in w.adapters)
        if not results:
            context.abort(Code.NOT_FOUND, f"unknown adapter {name!r} on every worker")
        return self._first_ok_or_abort(results, context, f"UnloadAdapter {name!r}")

    def ListAdapters(self, request, context) -> pb.ListAdaptersResponse:
        """The union over live workers; an adapter resident anywhere is reported as on the device."""
        seen: dict[str, pb.AdapterInfo] = {}
        for _, reply in self._fan_out("ListAdapters", request, context, refresh=False):
            if isinstance(reply, grpc.RpcError):
                continue
            for a in reply.adapters:
                if a.adapter_id not in seen or a.where > seen[a.adapter_id].where:
                    seen[a.adapter_id] = a
        return pb.ListAdaptersResponse(adapters=sorted(seen.values(), key=lambda a: a.adapter_id))

    def Stats(self, request, context) -> pb.StatsResponse:
        """The cluster as one: running and queued requests of all live workers, summed counters."""
        out = pb.StatsResponse(worker="router", serving=self.serving)
        for _, st in self._fan_out("Stats", request, context, refresh=False):
            if isinstance(st, grpc.RpcError):
                continue
            out.model = out.model or st.model
            out.cold_start_policy = out.cold_start_policy or st.cold_start_policy
            out.max_batch_size += st.max_batch_size
            out.max_queue += st.max_queue
            out.waiting += st.waiting
            out.running.extend(st.running)
            out.queued.extend(st.queued)
            out.counters.steps += st.counters.steps
            for k, v in st.counters.requests.items():
                out.counters.requests[k] += v
            for k, v in st.counters.cold_starts.items():
                out.counters.cold_starts[k] += v
            out.counters.prompt_tokens += st.counters.prompt_tokens
            out.counters.output_tokens += st.counters.output_tokens
            out.counters.cpu_prefill_tokens += st.counters.cpu_prefill_tokens
        return out


class _NoRoute(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class RouterServer:
    """A started router: gRPC server, its Stats poller thread, and optional /metrics."""

    def __init__(self, server, servicer: RouterServicer, health_servicer, port: int,
                 poll_interval: float, metrics_port: int | None):
        self.server, self.servicer, self.health = server, servicer, health_servicer
        self.port, self.metrics_port = port, metrics_port
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="carajax-router-poll", daemon=True)
        self._poller.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def poll_now(self) -> None:
        """Refresh every worker's Stats (the poller does this every `poll_interval`)."""
        for link in self.servicer.links:
            link.poll()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self.poll_now()

    def stop(self, grace: float | None = 10.0) -> None:
        """Drain: NOT_SERVING, refuse new calls, let streams finish within `grace` seconds."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.servicer.serving = False
        self.server.stop(grace).wait()
        self._poller.join(timeout=10)  # it polls through the channels closed next
        for link in self.servicer.links:
            link.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)

    def __enter__(self) -> RouterServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)


def serve_router(workers: Sequence[str], port: int = 50050, *, policy: str = "carajax",
                 cost: CostModel | None = None, slo_tpot: float = 0.1, avg_output_len: float = 128.0,
                 host: str = "[::]", poll_interval: float = 0.5, stats_timeout: float = 2.0,
                 metrics_port: int | None = None, max_workers: int = 256, seed: int = 0,
                 api_key: str | None = None, worker_api_key: str | None = None,
                 adapter_root: str | None = None) -> RouterServer:
    """Start a router over `workers` ("host:port" each), routing by `policy` (a name in
    `carajax.sched.router.POLICIES`) priced with `cost` (default: the shipped CPU-fitted model).

    api_key: clients must send it (`authorization: Bearer KEY` metadata; carajax.server.auth).
    worker_api_key: what the router sends its workers (default: `api_key`, one key for the whole
    cluster). adapter_root: the workers' shared adapter store (see the module docstring).
    Polls every worker once before returning, so routing starts with real state."""
    if not workers:
        raise ValueError("a router needs at least one worker")
    if cost is None:
        from carajax.sched.cost_model import default_cost_model
        cost = default_cost_model()
    require_rank_terms(cost, policy, " (the router's)")
    store = AdapterStore(AdapterPathPolicy(root=adapter_root)) if adapter_root is not None else None
    worker_key = worker_api_key if worker_api_key is not None else api_key
    rank_aware = policy in RANK_AWARE_POLICIES
    links = [WorkerLink(a, cost, stats_timeout, worker_key, rank_aware) for a in workers]
    with concurrent.futures.ThreadPoolExecutor(len(links)) as ex:
        list(ex.map(WorkerLink.poll, links))
    cold = next((w.last_stats.cold_start_policy for w in links if w.last_stats), "wait")
    chosen = policies.make_policy(policy, slo_tpot=slo_tpot, avg_output_len=avg_output_len,
                                  cold_start=cold, seed=seed)
    servicer = RouterServicer(links, chosen, avg_output_len=avg_output_len, adapter_store=store)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="router"),
                         maximum_concurrent_rpcs=max_workers, options=[("grpc.so_reuseport", 0)],
                         interceptors=[auth.ApiKeyInterceptor(api_key)] if api_key is not None else None)
    health_servicer, bound = start_server(server, servicer, host, port)
    if metrics_port is not None:
        http, _ = start_http_server(metrics_port, registry=servicer.registry)
        metrics_port = http.server_port
    return RouterServer(server, servicer, health_servicer, bound, poll_interval, metrics_port)


def wait_until_healthy(router: RouterServer, n: int, timeout: float = 30.0) -> None:
    """Block until `n` workers answer Stats (or raise TimeoutError)."""
    deadline = time.monotonic() + timeout
    while sum(w.healthy for w in router.servicer.links) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n} workers healthy after {timeout}s")
        router.poll_now()
        time.sleep(0.05)
