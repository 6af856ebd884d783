"""The worker server: one `Engine` behind the carajax.v1.CaraServe gRPC service.

    worker = serve(engine, 50051, name="w0", metrics_port=9100)   # started; returns at once
    ...
    worker.stop(grace=30)        # health NOT_SERVING, refuse new RPCs, let streams finish

The engine's loop thread does all device work; RPC handlers run on the server's thread pool and
only submit, stream from the `RequestHandle`, and read stats, so a slow client never stalls a
step. A stream whose client cancels or whose deadline passes cancels its request at once, so its
KV-cache row is free for the next step. Error statuses are listed in carajax.proto.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import socket
import threading
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from carajax.engine.engine import Engine
from carajax.engine.request import QueueFullError, RequestError, RequestHandle
from carajax.lora.adapter import AdapterError
from carajax.lora.pool import PoolFullError
from carajax.server import carajax_pb2 as pb
from carajax.server import carajax_pb2_grpc as pb_grpc
from carajax.server import codec
from carajax.server.adapter_paths import (
    AdapterNameError,
    AdapterPathError,
    AdapterPathPolicy,
    AdapterStore,
)
from carajax.server.auth import ApiKeyInterceptor
from carajax.server.metrics import ServerMetrics

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CaraServe"].full_name  # "carajax.v1.CaraServe"
Code = grpc.StatusCode


class _Refused(Exception):
    """A request answered with a non-OK status before (or instead of) reaching the engine."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class _Active:
    """A Generate stream this server holds (the engine's stats do not list queued requests)."""

    adapter: str | None
    rank: int
    prompt_tokens: int
    max_tokens: int
    handle: RequestHandle | None = None


class CaraServeServicer(pb_grpc.CaraServeServicer):
    """The CaraServe service over one engine; `drain()` makes it refuse new requests.
    `adapter_paths`: where run-time loads may read from (default: nowhere); other front ends of
    the same engine (HTTP) check their loads against this same object. With a root, a request
    naming an adapter that is not registered gets `root/<name>`, registered on first use
    (`adapter_store`)."""

    def __init__(self, engine: Engine, *, name: str, metrics: ServerMetrics | None = None,
                 adapter_paths: AdapterPathPolicy | None = None, cost_model=None):
        self.engine = engine
        self.name = name
        # The worker's own step-latency model (`carajax serve --cost-model`), sent in Stats for
        # routers to price this worker with; None: routers use theirs.
        self.cost_model_json = cost_model.to_json() if cost_model is not None else ""
        self.adapter_paths = adapter_paths or AdapterPathPolicy()
        self.adapter_store = (AdapterStore(self.adapter_paths) if self.adapter_paths.root is not None
                              else None)
        self.metrics = metrics or ServerMetrics(engine, self.queued_adapters)
        self.serving = True
        self._active: dict[str, _Active] = {}  # insertion order = submission order
        self._lock = threading.Lock()
        # Cancels take the engine lock (up to one step): run them off gRPC's polling thread.
        self._cancels = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="carajax-cancel")
        self._started = time.monotonic()
        decode = engine.tokenizer.decode if engine.tokenizer is not None else None
        self._decode = decode or (lambda ids: "")

    def drain(self) -> None:
        """Refuse new Generate calls (UNAVAILABLE); streams in flight continue."""
        self.serving = False

    def close(self) -> None:
        self._cancels.shutdown(wait=True)

    # -- Generate ---------------------------------------------------------------------------
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        try:
            rid, handle = self._submit(request, context)
        except _Refused as e:
            self.metrics.refused(e.code.name)
            context.abort(e.code, str(e))
            return
        # Fires when the RPC ends for any reason: client cancel, deadline, server stop, or done
        # (then `cancel` is a no-op). False: the RPC already ended before we got here.
        if not context.add_callback(lambda: self._cancel_soon(handle)):
            handle.cancel()
        recorded = False
        try:
            text = codec.IncrementalText(self._decode)
            for token in handle:
                yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[token], text=text.add(token)))
            out = handle.result()
            # Counted before the last message, so a client that has its result sees it counted.
            recorded = self._record(out, context)
            if out.finish_reason == "error":
                context.abort(self._error_code(), f"request {rid} failed on worker {self.name}: {out.error}")
            if tail := text.flush():
                yield pb.GenerateResponse(chunk=pb.TokenChunk(text=tail))
            yield pb.GenerateResponse(result=codec.result_message(
                out, worker=self.name, path=codec.cold_start_path(out)))
        finally:  # also when gRPC closes this generator because the client went away
            with self._lock:
                self._active.pop(rid, None)
            if not recorded:
                handle.cancel()
                if handle.done:
                    self._record(handle.result(), context)

    def _cancel_soon(self, handle: RequestHandle) -> None:
        """Cancel off gRPC's polling thread: a cancel waits for the engine lock (up to a step)."""
        if handle.done:
            return
        try:
            self._cancels.submit(handle.cancel)
        except RuntimeError:  # the executor is shut down: the server has stopped
            handle.cancel()

    def _record(self, out, context) -> bool:
        self.metrics.finished(out, codec.cold_start_path(out), self._outcome(out, context))
        return True

    def _error_code(self) -> grpc.StatusCode:
        """A request the engine failed: INTERNAL, or UNAVAILABLE if it failed because we stop."""
        return Code.INTERNAL if self.serving else Code.UNAVAILABLE

    def _outcome(self, out, context) -> str:
        """The metrics label: the finish reason, or the status code the client saw instead."""
        if out.finish_reason == "error":
            return self._error_code().name
        remaining = context.time_remaining()
        # gRPC does not say why a call ended; a cancel at its deadline is the deadline (with
        # slack: the core's timer and time.time() disagree by a little).
        if out.finish_reason == "cancelled" and remaining is not None and remaining < 0.05:
            return Code.DEADLINE_EXCEEDED.name
        return out.finish_reason

    def _submit(self, request: pb.GenerateRequest, context) -> tuple[str, RequestHandle]:
        try:
            args = codec.parse_generate(request)
        except RequestError as e:
            raise _Refused(Code.INVALID_ARGUMENT, str(e)) from None
        if not self.serving:
            raise _Refused(Code.UNAVAILABLE, f"worker {self.name} is shutting down")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise _Refused(Code.DEADLINE_EXCEEDED, "deadline passed before the request was queued")
        adapter = self._adapter(args.adapter) if args.adapter else None
        prompt = args.prompt
        if isinstance(prompt, str) and self.engine.tokenizer is not None:
            prompt = self.engine.tokenizer.encode(prompt)  # as submit would; Stats needs the count
        rid = args.request_id or f"{self.name}-{uuid.uuid4().hex[:16]}"
        entry = _Active(args.adapter, adapter.rank if adapter else 0, len(prompt), args.sampling.max_tokens)
        with self._lock:
            if rid in self._active:
                raise _Refused(Code.ALREADY_EXISTS, f"request id {rid!r} is already in flight")
            self._active[rid] = entry  # reserved before submit: ids stay unique
        try:
            entry.handle = self.engine.submit(prompt, args.adapter, args.sampling, rid)
        except Exception as e:
            with self._lock:
                self._active.pop(rid, None)
            raise _Refused(*_status_of(e)) from None
        return rid, entry.handle

    # -- adapters ---------------------------------------------------------------------------
    def _adapter(self, name: str):
        """The spec of the adapter a request names: registered, or (with an adapter root) found
        as `root/<name>` and registered now; `_Refused` saying why not."""
        spec = self.engine.get_adapter(name)
        if spec is None and self.adapter_store is not None:
            try:
                spec = self.adapter_store.register(self.engine, name)
            except AdapterNameError as e:
                raise _Refused(Code.INVALID_ARGUMENT, str(e)) from None
            except AdapterPathError as e:
                raise _Refused(Code.PERMISSION_DENIED, f"cannot load adapter {name!r} on worker "
                                                       f"{self.name}: {e}") from None
            except AdapterError as e:  # broken: its message names the adapter and the fault
                raise _Refused(Code.INVALID_ARGUMENT, str(e)) from None
            except PoolFullError as e:
                raise _Refused(Code.RESOURCE_EXHAUSTED, f"cannot load adapter {name!r}: {e}") from None
        if spec is None:
            where = " (nor under its adapter root)" if self.adapter_store is not None else ""
            raise _Refused(Code.NOT_FOUND, f"unknown adapter {name!r} on worker {self.name}{where}")
        return spec

    def LoadAdapter(self, request: pb.LoadAdapterRequest, context) -> pb.LoadAdapterResponse:
        name, path = request.adapter_id, request.path
        if not name or not path:
            context.abort(Code.INVALID_ARGUMENT, "LoadAdapter needs adapter_id and path")
        if self.engine.get_adapter(name) is not None:
            context.abort(Code.ALREADY_EXISTS, f"adapter {name!r} is already registered on worker "
                                               f"{self.name}; unload it first")
        try:  # the client names a path on our disk: only where the operator allows
            real = self.adapter_paths.resolve(path)
        except AdapterPathError as e:
            context.abort(Code.PERMISSION_DENIED, f"cannot load adapter {name!r} on worker "
                                                  f"{self.name}: {e}")
        try:
            self.engine.add_adapter(name, real)
        except AdapterError as e:  # its message names the file
            context.abort(Code.INVALID_ARGUMENT, f"cannot load adapter {name!r}: {e}")
        except PoolFullError as e:
            context.abort(Code.RESOURCE_EXHAUSTED, f"cannot load adapter {name!r}: {e}")
        if request.pin:
            try:
                self.engine.pin_adapter(name)  # loads it onto the device now
            except (AdapterError, PoolFullError) as e:
                self.engine.remove_adapter(name)
                context.abort(Code.RESOURCE_EXHAUSTED, f"cannot pin adapter {name!r}: {e}")
        return pb.LoadAdapterResponse(adapter=self._adapter_infos([name])[0])

    def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context) -> pb.UnloadAdapterResponse:
        name = request.adapter_id
        if self.engine.get_adapter(name) is None:
            context.abort(Code.NOT_FOUND, f"unknown adapter {name!r} on worker {self.name}")
        try:
            self.engine.remove_adapter(name)
        except AdapterError as e:  # in use by running requests
            context.abort(Code.FAILED_PRECONDITION, f"cannot unload adapter {name!r}: {e}")
        return pb.UnloadAdapterResponse()

    def ListAdapters(self, request, context) -> pb.ListAdaptersResponse:
        return pb.ListAdaptersResponse(adapters=self._adapter_infos())

    def _adapter_infos(self, names: list[str] | None = None, *, where: dict[str, str] | None = None,
                       pool_stats: dict | None = None) -> list[pb.AdapterInfo]:
        """Every registered adapter (a listing), or those of `names` that are registered."""
        engine = self.engine
        where = engine.pool.in_memory() if where is None else where
        if names is None:
            adapters = engine.adapters
        else:
            adapters = {n: a for n in names if (a := engine.get_adapter(n)) is not None}
        return codec.adapter_infos(adapters, where, pool_stats or engine.pool.stats())

    # -- stats ------------------------------------------------------------------------------
    def queued_adapters(self, running: list[dict]) -> list[str]:
        """Adapters of this server's requests not in `running` (`Engine.stats()["running"]`)."""
        return [a.adapter or "" for _, a in self._queued(running)]

    def _queued(self, running: list[dict]) -> list[tuple[str, _Active]]:
        """This server's requests not yet running, oldest first."""
        ids = {r["request_id"] for r in running}
        with self._lock:
            return [(rid, a) for rid, a in self._active.items()
                    if rid not in ids and a.handle is not None and not a.handle.done]

    def Stats(self, request, context) -> pb.StatsResponse:
        st = self.engine.stats()  # one snapshot under the engine lock
        cfg, pool, where = self.engine.config, st["adapters"], self.engine.pool.in_memory()
        queued = self._queued(st["running"])
        running = []
        for r in st["running"]:
            entry = self._active.get(r["request_id"])
            running.append(codec.request_state({**r, "max_tokens": entry.max_tokens if entry else 0}))
        counters = self.metrics.snapshot()
        return pb.StatsResponse(
            worker=self.name, model=self.engine.model_config.name, cold_start_policy=st["cold_start"],
            emulated_link=st["emulated_link"], serving=self.serving,
            max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue,
            max_lora_rank=cfg.max_lora_rank, max_seq_len=self.engine.runner.seq_len,
            waiting=st["waiting"], running=running,
            queued=[codec.request_state({"request_id": rid, "adapter": a.adapter, "rank": a.rank,
                                         "phase": "waiting", "prompt_tokens": a.prompt_tokens,
                                         "max_tokens": a.max_tokens}) for rid, a in queued],
            memory=codec.memory_message(pool, cfg.lora_page_rank),
            # Those in host memory or on the device: bounded by the budgets, not the registry.
            adapters=self._adapter_infos(list(where), where=where, pool_stats=pool),
            adapters_registered=pool["adapters"], adapters_version=st["adapters_version"],
            counters=pb.Counters(steps=st["steps"], **counters),
            uptime_s=time.monotonic() - self._started, cost_model=self.cost_model_json)


def _status_of(e: Exception) -> tuple[grpc.StatusCode, str]:
    """The status for an exception `Engine.submit` raised."""
    if isinstance(e, AdapterError):  # submit's only AdapterError: unknown (e.g. just unloaded)
        return Code.NOT_FOUND, str(e)
    if isinstance(e, QueueFullError):
        return Code.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, (RequestError, ValueError)):
        return Code.INVALID_ARGUMENT, str(e)
    if isinstance(e, RuntimeError):  # the engine is closed
        return Code.UNAVAILABLE, str(e)
    return Code.INTERNAL, f"{type(e).__name__}: {e}"


class WorkerServer:
    """A started worker: the gRPC server (with health and reflection) and its metrics endpoint."""

    def __init__(self, server: grpc.Server, servicer: CaraServeServicer,
                 health_servicer: health.HealthServicer, port: int, host: str,
                 metrics_port: int | None):
        self.server, self.servicer, self.health = server, servicer, health_servicer
        self.port, self.host, self.metrics_port = port, host, metrics_port
        self._stopped = threading.Event()

    @property
    def name(self) -> str:
        return self.servicer.name

    @property
    def address(self) -> str:
        """host:port to connect to (the loopback address when bound to all interfaces)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "[::]", "::") else self.host
        return f"{host}:{self.port}"

    def set_serving(self) -> None:
        """Health SERVING (after a warm-up that started NOT_SERVING)."""
        if not self._stopped.is_set():
            set_serving(self.health, True)

    def stop(self, grace: float | None = 10.0) -> None:
        """Drain: health NOT_SERVING, refuse new RPCs, give streams in flight `grace` seconds
        (None: forever), then cancel the rest. The engine stays open (its owner closes it)."""
        if self._stopped.is_set():
            return
        self.health.enter_graceful_shutdown()  # every service NOT_SERVING, and stays so
        self.servicer.drain()
        self.server.stop(grace).wait()
        self.servicer.close()
        self.servicer.metrics.close()
        self._stopped.set()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)

    def __enter__(self) -> WorkerServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)


def start_server(server: grpc.Server, servicer: pb_grpc.CaraServeServicer, host: str, port: int,
                 serving: bool = True) -> tuple[health.HealthServicer, int]:
    """Add CaraServe, grpc.health.v1 (SERVING, or NOT_SERVING until `set_serving` while the
    engine warms up) and reflection to `server`, bind, start. Shared by the worker and the
    router, so stock tools see both the same way."""
    pb_grpc.add_CaraServeServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    set_serving(health_servicer, serving)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    return health_servicer, bound


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    """grpc.health.v1 status of the server and of CaraServe: SERVING or NOT_SERVING."""
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, status)


def serve(engine: Engine, port: int = 50051, *, host: str = "[::]", name: str | None = None,
          metrics_port: int | None = None, max_workers: int | None = None,
          serving: bool = True, adapter_paths: AdapterPathPolicy | None = None,
          api_key: str | None = None) -> WorkerServer:
    """Start a CaraServe server over `engine` (plus grpc.health.v1 and reflection).

    serving=False: bind now but report NOT_SERVING (the Kubernetes convention while the engine
    compiles; load balancers and the router send nothing yet) until `WorkerServer.set_serving()`.

    adapter_paths: where LoadAdapter may read adapters (default: nowhere, LoadAdapter is refused
    with PERMISSION_DENIED); `AdapterPathPolicy(root=DIR)` or `AdapterPathPolicy(allow_any=True)`.
    With a root, a Generate naming an adapter that is not registered registers `DIR/<name>` on
    first use (a malformed name is INVALID_ARGUMENT, no such directory NOT_FOUND, a broken
    adapter INVALID_ARGUMENT).

    api_key: every RPC but the health service's needs `authorization: Bearer KEY` metadata
    (UNAUTHENTICATED otherwise; carajax.server.auth).

    port 0 binds any free port (read `.port`). metrics_port: None serves no /metrics, 0 any free
    port. Every Generate stream holds a thread while it runs, so the pool defaults to room for a
    full batch, a full queue and some unary calls; RPCs beyond it get RESOURCE_EXHAUSTED.
    """
    name = name or socket.gethostname()
    cfg = engine.config
    max_workers = max_workers or cfg.max_batch_size + cfg.max_queue + 32
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="carajax-rpc"),
        maximum_concurrent_rpcs=max_workers,
        options=[("grpc.so_reuseport", 0)],  # a taken port is an error, not a silent share
        interceptors=[ApiKeyInterceptor(api_key)] if api_key is not None else None)
    servicer = CaraServeServicer(engine, name=name, adapter_paths=adapter_paths)
    health_servicer, bound = start_server(server, servicer, host, port, serving)
    if metrics_port is not None:
        try:
            metrics_port = servicer.metrics.start_http(metrics_port)
        except OSError:  # e.g. the port is taken: do not leave the gRPC server running
            server.stop(None)
            raise
    return WorkerServer(server, servicer, health_servicer, bound, host, metrics_port)
