"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) beside a worker's or a router's gRPC.

    worker = serve(engine, 50051)                          # carajax.server.worker
    http = serve_http(worker, 8000, api_key=KEY)           # same engine, same process
    router = serve_router([...], 50050)                    # or in front of workers:
    http = serve_http(router, 8000)                        # the router's policy picks the worker
    ...
    http.stop(grace=30)

Routes:
    POST /v1/completions, /v1/chat/completions   SSE chunks ending `data: [DONE]` when `stream`
    GET  /v1/models                              the base model and every adapter (parent = base)
    POST /v1/load_lora_adapter {lora_name, lora_path}, /v1/unload_lora_adapter {lora_name}
                                                 only with enable_lora_loading; a worker's paths
                                                 must pass its AdapterPathPolicy
    GET  /health                                 200 serving; 503 warming up or draining
    GET  /metrics                                the server's Prometheus registry
With an API key every /v1 route needs `Authorization: Bearer KEY` (401 otherwise); /health and
/metrics stay open for probes and scrapers (carajax.server.auth). A body over the size limit is
refused with 413 before it is parsed (both checks: carajax.server.guard, shared with the Ray
ingress). How requests reach the engine: carajax.server.openai_serving.

uvicorn runs on a thread of its own with its own event loop, so the gRPC server, the engine and
this share one process; the socket is bound before `serve_http` returns (port 0: any free port).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from carajax.server import openai_api as oa
from carajax.server.adapter_paths import AdapterPathPolicy
from carajax.server.guard import Guard, GuardConfig
from carajax.server.openai_serving import CallContext, OpenAIServing, ServedModel

__all__ = ["HttpServer", "ServedModel", "create_app", "serve_http"]


def create_app(serving: OpenAIServing, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app over `serving` (see the module docstring for the routes)."""
    app = FastAPI(title="carajax", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, config=GuardConfig(api_key, serving.limits.max_body_bytes))

    @app.exception_handler(oa.ApiError)
    async def api_error(request: Request, e: oa.ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        if errors and errors[0]["type"] == "json_invalid":  # its loc is a character offset
            reason = errors[0].get("ctx", {}).get("error", "JSON decode error")
            return JSONResponse(oa.bad_request(
                f"the request body is not valid JSON: {reason} (at character "
                f"{errors[0]['loc'][-1]})").body(), status_code=400)
        where = ".".join(str(x) for x in errors[0]["loc"] if x != "body") if errors else ""
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return JSONResponse(oa.bad_request(f"{where}: {errors[0]['msg']}{more}" if errors else
                                           "invalid request", where or None).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown route, wrong method
        return JSONResponse(oa.ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.get("/health")
    async def health():
        state = serving.state()
        return JSONResponse({"status": state}, status_code=200 if state == "serving" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(serving.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return await serving.models()

    @app.post("/v1/completions")
    async def completions(body: oa.CompletionRequest, request: Request):
        return await _generate(serving, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: oa.ChatCompletionRequest, request: Request):
        return await _generate(serving, body, request)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: oa.LoadLoraRequest):
        return PlainTextResponse(await serving.load_lora(body))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: oa.UnloadLoraRequest):
        return PlainTextResponse(await serving.unload_lora(body))

    return app


async def _generate(serving: OpenAIServing, req, request: Request) -> Response:
    """One completion: the whole body, or an SSE stream once the first piece is there (so that a
    refused request still gets its own status code, not a 200 with an error inside)."""
    spec = serving.spec(req)
    kind = "chat" if isinstance(req, oa.ChatCompletionRequest) else "completion"
    events = serving.events(spec, CallContext())
    rid = spec.request.request_id
    if not req.stream:
        async def collect():
            texts = []
            try:
                async for piece in events:
                    texts.append(piece.text)
                    if piece.finish:
                        return "".join(texts), piece
            finally:
                await events.aclose()

        got = await _unless_disconnected(request, collect())
        if got is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        text, last = got
        return JSONResponse(oa.response_body(kind, rid, req.model, text, last.finish, last.usage))
    first = await _unless_disconnected(request, anext(events))
    if first is None:
        await events.aclose()
        return Response(status_code=499)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _EventStream(_sse(kind, rid, req.model, first, events, include_usage),
                        media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _sse(kind, rid: str, model: str, first, events, include_usage: bool):
    created = int(time.time())
    try:
        if kind == "chat":
            yield _data(oa.chunk_body(kind, rid, model, created, "", role=True))
        piece = first
        while True:
            if piece.text or piece.finish:
                yield _data(oa.chunk_body(kind, rid, model, created, piece.text, piece.finish))
            if piece.finish:
                break
            piece = await anext(events)
        if include_usage:
            yield _data(oa.chunk_body(kind, rid, model, created, None, use=piece.usage))
    except oa.ApiError as e:  # mid-stream the status is sent: the error is an event (as vLLM does)
        yield _data(e.body())
    finally:
        await events.aclose()  # also when the client went away: cancels the request
    yield "data: [DONE]\n\n"


def _data(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """Closes its generator however the response ends, so a disconnect cancels at once rather
    than when the generator is garbage collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _unless_disconnected(request: Request, awaitable):
    """`awaitable`'s result, or None once the client disconnects; it is then cancelled, which
    ends its generation and frees the batch slot."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(awaitable), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            if not task.done():
                task.cancel()
                # Until it has unwound: the generation's generator is closed once this returns.
                await asyncio.wait({task})
    if work.cancelled():
        return None
    return work.result()


class HttpServer:
    """uvicorn serving `app` on a daemon thread; the socket is bound in the constructor."""

    def __init__(self, app, host: str, port: int, serving: OpenAIServing | None = None):
        self.host, self.serving = host, serving
        bind = host.strip("[]")
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too
        try:
            self._sock.bind((bind, port))
        except OSError:
            self._sock.close()
            raise
        self._sock.listen(2048)
        self.port = self._sock.getsockname()[1]
        # log_config None: leave the process's logging alone; no access log (not even paths).
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=10)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="carajax-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server on {host}:{self.port} did not start")
            time.sleep(0.01)

    @property
    def address(self) -> str:
        """host:port to connect to (the loopback address when bound to all interfaces)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "[::]", "::") else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stop(self, grace: float | None = 10.0) -> None:
        """Stop accepting; give responses in flight `grace` seconds (None: forever), then cancel
        them (which cancels their requests)."""
        if not self._thread.is_alive():
            return
        # uvicorn treats 0 as "time out at once" and logs an error even with nothing in flight.
        self._server.config.timeout_graceful_shutdown = None if grace is None else max(grace, 0.05)
        self._server.should_exit = True
        self._thread.join()
        if self.serving is not None:
            self.serving.close()

    def __enter__(self) -> HttpServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)


def serve_http(server, port: int = 8000, *, host: str = "[::]", model: ServedModel | None = None,
               api_key: str | None = None, limits: oa.HttpLimits | None = None,
               enable_lora_loading: bool = False,
               adapter_paths: AdapterPathPolicy | None = None) -> HttpServer:
    """Serve the OpenAI API over a started `WorkerServer` or `RouterServer`.

    model: the base model's served name, tokenizer and chat template (default: a worker's engine
    without a chat template from its checkpoint, or the model the router's workers report).
    adapter_paths: where a worker may load adapters from at run time (default: the policy its
    gRPC servicer was given, so both front ends agree; nowhere without one); a router passes
    paths on and its workers check them.
    limits: default HttpLimits, max_tokens from the worker's EngineConfig.max_tokens_limit.
    """
    engine = getattr(server.servicer, "engine", None)
    if engine is not None:  # a worker
        model = model or ServedModel.of_engine(engine)
        limits = limits or oa.HttpLimits(max_tokens=engine.config.max_tokens_limit)
        adapter_paths = (adapter_paths or getattr(server.servicer, "adapter_paths", None)
                         or AdapterPathPolicy())
    else:  # a router: the model its workers report
        if model is None:
            names = [w.last_stats.model for w in server.servicer.links if w.last_stats is not None]
            if not names:
                raise RuntimeError("no worker has answered Stats: cannot tell which model they serve")
            model = ServedModel.load(names[0])
        limits = limits or oa.HttpLimits()
        adapter_paths = None
    serving = OpenAIServing(server, model, limits=limits, enable_lora_loading=enable_lora_loading,
                            adapter_paths=adapter_paths)
    return HttpServer(create_app(serving, api_key=api_key), host, port, serving)
