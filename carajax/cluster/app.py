"""The Ray Serve application: carajax replicas behind an OpenAI-compatible ingress.

    app = build_app(replicas=2, policy="carajax")     # or app_builder({...}) from a Serve YAML
    serve.run(app, name="carajax", route_prefix="/")   # POST /v1/completions on Serve's HTTP port

CarajaxReplica   one Engine, its own cost model published with its routing stats every
                 `stats_period_s` (carajax.cluster.replica).
OpenAIIngress    the FastAPI app on Serve's HTTP proxy: /v1/completions, /v1/chat/completions
                 (SSE with `stream`), /v1/models, /health, /router (our router's counters). It
                 estimates the prompt's length in tokens, looks up the adapter's rank (from
                 its adapter_config.json under `adapter_root` for one no replica has registered
                 yet, so a cold start is priced), and
                 passes both to the replica call as `route=...`, which our router
                 (carajax.cluster.ray_router) prices. The served replica's name comes back in the
                 `x-carajax-replica` header.

The ingress holds to the worker's HTTP standard (carajax.server.http): with an API key
(`build_app(api_key=...)`, `carajax ray --api-key` or $CARAJAX_API_KEY) every /v1 route needs
`Authorization: Bearer KEY` (401 otherwise), bodies over 2 MiB are refused with 413 before they
are read (both: carajax.server.guard), and prompts over the workers' size limits with 400 before
anything is tokenized. /health and /router stay open: they reveal whether the app is up and the
router's counts, never a request or a completion.

Failover: a replica that dies (or becomes unreachable) before a request's first byte went back
to the client costs nothing but time: the ingress sends the request again, to whichever replica
the router picks now (up to REPLICA_RETRIES more times). A stream already under way ends with an
error event and [DONE] (its tokens cannot be taken back). /router counts both.

`router="ray"` keeps Ray's default router (power of two choices) for comparison.
"""

# No `from __future__ import annotations`: serve.ingress hands FastAPI the methods, whose
# `request: Request` must be a real class, not a string, for FastAPI to inject the request.
import asyncio
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig

from carajax.cluster import routing
from carajax.cluster.replica import DEFAULT_MODEL, CarajaxReplica
from carajax.engine.request import RequestError
from carajax.lora.adapter import AdapterError
from carajax.server import codec
from carajax.server import openai_api as oa
from carajax.server.adapter_paths import AdapterPathPolicy, AdapterStore
from carajax.server.auth import resolve_api_key
from carajax.server.guard import Guard, GuardConfig

# A replica's process died or cannot be reached: nothing it was serving comes back.
_REPLICA_GONE = (RayActorError, ActorUnavailableError)
REPLICA_RETRIES = 2  # tries on other replicas after the first, for a request not yet answered
FAILOVER_COUNTS = ("retried", "recovered", "failed", "streams_cut")  # see OpenAIIngress.failover
INGRESS_MAX_ONGOING = 4096  # requests the ingress holds at once (each replica has its own limit)


async def _guarded(gen, replica: str, counts: dict):
    """The replica's SSE lines; if the replica dies (or fails) mid-stream, an error event and
    [DONE] end the stream, so a client never waits on a stream nobody will finish."""
    try:
        async for line in gen:
            yield line
    except Exception as e:  # RayActorError when the replica's process died
        counts["streams_cut"] += 1
        err = oa.ApiError(503, f"replica {replica} failed mid-stream: {type(e).__name__}: {e}",
                          type="service_unavailable")
        yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"


# The ingress tokenizes only to estimate a prompt's length for the router, on the one event loop
# that every request of the application passes through. So: requests over the workers' own size
# limits are refused here with the workers' messages, before any tokenizing (a replica would
# refuse them one hop later); within the limits only the first ROUTE_SAMPLE_CHARS characters are
# tokenized and the count scaled to the whole length. A 1 MiB prompt would otherwise hold the
# loop (and every stream on it) for a good part of a second, while the router needs the length to
# a few percent, not exactly; the replica still tokenizes the whole prompt to serve it.
ROUTE_SAMPLE_CHARS = 16384


def _route_text(body: dict, kind: str, limits: oa.HttpLimits) -> str | list | None:
    """The prompt (text or token ids) whose length the route estimates, after the size checks
    the replica makes (the same limits, the same 400s); None where the shape is wrong (the replica
    says how)."""
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        if len(messages) > limits.max_messages:
            raise oa.bad_request(f"{len(messages)} messages; at most {limits.max_messages}",
                                 "messages")
        texts = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # text parts
                content = "\n".join(p["text"] for p in content
                                    if isinstance(p, dict) and isinstance(p.get("text"), str))
            if isinstance(content, str):
                texts.append(content)
        chars = sum(map(len, texts))
        if chars > limits.request.max_prompt_bytes:
            raise oa.bad_request(f"the messages have {chars} characters; at most "
                                 f"{limits.request.max_prompt_bytes}", "messages")
        return "".join(texts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a list of one prompt is that prompt
    if not prompt or not isinstance(prompt, (str, list)):
        return None
    try:
        codec.check_prompt(prompt, limits.request)
    except RequestError as e:
        raise oa.bad_request(str(e), "prompt") from None
    return prompt


def _serving_guard() -> GuardConfig:
    """The guard of the ingress replica this request reached: serve.ingress freezes the FastAPI
    app (middleware included) at import, before any key is known, so the middleware asks the
    replica per request, as Serve's own class-based routes find their instance."""
    return serve.get_replica_context().servable_object.guard


fastapi_app = FastAPI(title="carajax on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)
fastapi_app.add_middleware(Guard, config=_serving_guard)  # before serve.ingress copies the app


@serve.ingress(fastapi_app)
class OpenAIIngress:
    """The OpenAI HTTP entry point; each generation goes to a replica with its route.
    guard: the API key and body limit every request passes first (default: no key, 2 MiB)."""

    def __init__(self, replicas, model: str = DEFAULT_MODEL, avg_output_len: float = 128.0,
                 guard: GuardConfig | None = None, adapter_root: str | None = None):
        from carajax.server.openai_serving import ServedModel

        self.limits = oa.HttpLimits()
        self.guard = guard or GuardConfig(max_body_bytes=self.limits.max_body_bytes)
        self.replicas = replicas
        self.model = ServedModel.load(model)  # tokenizer and chat template, no weights
        self.avg_output_len = avg_output_len
        self.info: dict | None = None  # a replica's models(): base name, adapters and ranks
        # The replicas' adapter root, read here for the rank of an adapter none has registered
        # yet (its config only); None where this node does not see it.
        self.store = (AdapterStore(AdapterPathPolicy(root=adapter_root))
                      if adapter_root and Path(adapter_root).is_dir() else None)
        # Failover: retried (a try on another replica after one died under the request),
        # recovered (answered after a retry), failed (every try's replica died: a 503),
        # streams_cut (a replica died mid-stream: the stream ended with an error event).
        self.failover = dict.fromkeys(FAILOVER_COUNTS, 0)

    async def _on_a_replica(self, call):
        """`await call()` (one request to a replica, nothing sent to the client yet), again on
        another replica if the one it reached dies first. The router re-prices the request
        each try; Ray drops a dead replica from its candidates within a second or so, so the
        tries back off a little."""
        for attempt in range(REPLICA_RETRIES + 1):
            try:
                out = await call()
            except _REPLICA_GONE:
                if attempt == REPLICA_RETRIES:
                    self.failover["failed"] += 1
                    raise
                self.failover["retried"] += 1
                await asyncio.sleep(0.25 * (attempt + 1))
                continue
            self.failover["recovered"] += attempt > 0
            return out

    async def _info(self, refresh: bool = False) -> dict:
        if self.info is None or refresh:
            self.info = await self.replicas.models.remote()
        return self.info

    async def _route(self, body: dict, kind: str) -> dict:
        """What our router prices; oa.ApiError (400) for a prompt over the size limits."""
        text = _route_text(body, kind, self.limits)  # first: nothing over the limits goes further
        info = await self._info()
        adapter, rank = body.get("model"), 0
        if adapter == info["base"]:
            adapter = None
        elif adapter in info["adapters"]:
            rank = info["adapters"][adapter]
        elif (found := self._root_rank(adapter)) is not None:
            rank = found  # under the root: the replica chosen registers it on first use
        else:  # loaded since? else the replica says 404
            info = await self._info(refresh=True)
            rank = info["adapters"].get(adapter, 0)
        n = self._prompt_tokens(text)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        return routing.request_route(adapter, rank, n, max_tokens, self.avg_output_len)

    def _root_rank(self, adapter) -> int | None:
        """The rank of `adapter_root/<adapter>` (None: not there); 0 for a name that cannot be
        there (the replica refuses it with the reason)."""
        if self.store is None or not isinstance(adapter, str):
            return None
        try:
            return self.store.rank(adapter)
        except AdapterError:  # a malformed name, or a link out of the root
            return 0

    def _prompt_tokens(self, text: str | list | None) -> int:
        """The prompt's length in tokens, from a bounded prefix (see ROUTE_SAMPLE_CHARS)."""
        if not isinstance(text, str):
            return len(text or [])
        tok = self.model.tokenizer
        if tok is None:
            return len(text.encode()) + 1
        sample = text[:ROUTE_SAMPLE_CHARS]
        n = len(tok.encode(sample))
        return n if len(sample) == len(text) else round(n * len(text) / len(sample))

    async def _generate(self, request: Request, kind: str) -> Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return JSONResponse(oa.bad_request("the body is not JSON").body(), status_code=400)
        if not isinstance(body, dict):
            return JSONResponse(oa.bad_request("the body must be a JSON object").body(), status_code=400)
        try:
            route = await self._route(body, kind)
        except oa.ApiError as e:  # over a size limit: refused before tokenizing
            return JSONResponse(e.body(), status_code=e.status)
        except (TypeError, ValueError, AttributeError):  # a malformed field: the replica says which
            route = None  # Ray's default router takes it
        async def answer():  # a whole completion, or a stream's status item: nothing has gone
            if not body.get("stream"):  # to the client yet, so a dead replica's try is retried
                return None, await self.replicas.complete.remote(body, kind, route=route)
            gen = self.replicas.options(stream=True).stream.remote(body, kind, route=route)
            return gen, await gen.__anext__()

        try:
            gen, head = await self._on_a_replica(answer)
        except Exception as e:  # every replica tried died under it, or a bug
            err = oa.ApiError(503, f"the replica failed: {type(e).__name__}: {e}",
                              type="service_unavailable")
            return JSONResponse(err.body(), status_code=503)
        if gen is None or head["status"] != 200:  # the completion, or the stream's refusal
            return JSONResponse(head["body"], status_code=head["status"],
                                headers={"x-carajax-replica": head["replica"]})
        return StreamingResponse(_guarded(gen, head["replica"], self.failover),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "x-carajax-replica": head["replica"]})

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    @fastapi_app.get("/v1/models")
    async def list_models(self) -> dict:
        info = await self._info(refresh=True)
        card = lambda name, parent: oa.model_card(name, parent=parent, created=0,  # noqa: E731
                                                  max_model_len=info["max_model_len"])
        names = list(info["adapters"])
        names += [a for a in info.get("available", ()) if a not in info["adapters"]]
        return {"object": "list", "data": [card(info["base"], None)] +
                [card(a, info["base"]) for a in names]}

    @fastapi_app.get("/router")
    async def router(self) -> dict:
        """Our routers in this process: policy, requests it routed, fallbacks to Ray's default
        (calls without a route, e.g. /v1/models'), dispatches in flight (empty under
        router="ray"); and the failover counts. Open without the API key, like /health: counts
        only, no request content."""
        return {"routers": [r.summary() for r in list(routing.LIVE_ROUTERS)],
                "failover": dict(self.failover)}

    @fastapi_app.get("/health")
    async def health(self) -> dict:
        return {"status": "serving"}


def build_app(*, replicas: int = 2, policy: str = "carajax", model: str = DEFAULT_MODEL,
              adapter_root: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
              engine_config: dict | None = None, cost_model: str | None = None,
              slo_tpot: float = 0.1, stats_period_s: float = 0.5, router: str = "carajax",
              max_ongoing_requests: int | None = None, autoscaling: dict | None = None,
              api_key: str | None = None, warmup: bool = True):
    """The Serve application. router="carajax": our CarajaxRequestRouter asking `policy`;
    "ray": Ray's default router. autoscaling: Serve's autoscaling_config (min_replicas,
    max_replicas, target_ongoing_requests, ...) in place of a fixed `replicas`. api_key: the
    key every /v1 route wants as `Authorization: Bearer KEY` (None: no authentication).
    warmup: each replica compiles its step variants before it takes requests (False: on first
    use, so the first requests wait on compiles)."""
    from carajax.cluster.ray_router import CarajaxRequestRouter
    from carajax.config import EngineConfig

    cfg = EngineConfig(**(engine_config or {}))  # checked here, before any replica starts
    guard = GuardConfig(api_key=api_key)  # an empty key is refused here too
    opts: dict = {"ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
                  "max_ongoing_requests": max_ongoing_requests or cfg.max_batch_size + cfg.max_queue}
    if autoscaling:
        opts["autoscaling_config"] = autoscaling
    else:
        opts["num_replicas"] = replicas
    kw: dict = {"request_routing_stats_period_s": stats_period_s,
                "request_routing_stats_timeout_s": max(1.0, 2 * stats_period_s)}
    if router == "carajax":
        default = cost_model if cost_model not in (None, "auto", "none") else None  # a file
        kw.update(request_router_class=CarajaxRequestRouter,
                  request_router_kwargs={"policy": policy, "cost_model": default, "slo_tpot": slo_tpot})
    elif router != "ray":
        raise ValueError(f"router must be 'carajax' or 'ray', got {router!r}")
    opts["request_router_config"] = RequestRouterConfig(**kw)
    replica = serve.deployment(CarajaxReplica, name="CarajaxReplica", **opts).bind(
        model=model, adapter_root=adapter_root, engine_config=engine_config, cost_model=cost_model,
        warmup=warmup)
    # The ingress only forwards (async): Serve's default of 5 ongoing requests per replica would
    # cap the whole application at 5 requests in flight, and queue /health behind them.
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=INGRESS_MAX_ONGOING)
    return ingress.bind(replica, model=model, guard=guard, adapter_root=adapter_root)


def app_builder(args: dict):
    """For `serve run deploy/carajax_serve.yaml`: build_app's keywords from the YAML's `args`
    (engine_config and autoscaling may be given as JSON strings). The API key comes from
    $CARAJAX_API_KEY in the environment the app is built in (the Ray cluster's), never from
    `args`: Serve keeps and shows its config in plain text. `require_api_key: true` makes a
    missing key an error instead of an open app."""
    kw = dict(args)
    if "api_key" in kw:
        raise ValueError("api_key in the Serve config would be stored and shown in plain text: set "
                         "CARAJAX_API_KEY in the Ray cluster's environment instead")
    require = kw.pop("require_api_key", False)
    if isinstance(require, str):
        require = require.strip().lower() in ("1", "true", "yes", "on")
    kw["api_key"] = resolve_api_key(None)
    if require and kw["api_key"] is None:
        raise ValueError("require_api_key is set but CARAJAX_API_KEY is not set in the environment "
                         "the app is built in (the Ray cluster's): refusing to serve without a key")
    for key in ("engine_config", "autoscaling"):
        if isinstance(kw.get(key), str):
            kw[key] = json.loads(kw[key])
    for key, typ in (("replicas", int), ("num_cpus", float), ("num_gpus", float), ("slo_tpot", float),
                     ("stats_period_s", float)):
        if key in kw:
            kw[key] = typ(kw[key])
    return build_app(**kw)


__all__ = ["CarajaxReplica", "OpenAIIngress", "app_builder", "build_app"]

