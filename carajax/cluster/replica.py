"""CarajaxReplica: one carajax Engine as a Ray Serve replica (carajax.cluster.app deploys it).

The engine serves the demo model and its trained adapters by default, or every adapter dir under
`adapter_root`, where a request may also name an adapter added later (`adapter_root/<name>` is
registered on first use, as on `carajax serve --adapter-root`). Requests run through the worker's
own gRPC servicer and OpenAI layer in-process (carajax.server.openai_serving), so validation, stop
strings and errors are the HTTP server's. The replica prices itself with its own cost model
(`auto`: its engine profiled in place at start, once per device, model and engine shape, then
cached; or a fitted file) and publishes it with its routing stats (carajax.cluster.routing), so
each replica is priced for its own device.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ray import serve

from carajax.cluster import routing
from carajax.lora.adapter import AdapterError
from carajax.server import openai_api as oa
from carajax.server.adapter_paths import AdapterPathPolicy

DEFAULT_MODEL = "carajax-demo"
_log = logging.getLogger("carajax.cluster")


def _adapter_dirs(model: str, adapter_root: str | None) -> dict[str, str]:
    """Adapter name -> dir: every PEFT dir under `adapter_root`, else the demo's shipped ones."""
    if adapter_root:
        root = Path(adapter_root)
        return {d.name: str(d) for d in sorted(root.iterdir()) if (d / "adapter_config.json").exists()}
    from carajax import demo

    return demo.adapter_dirs() if demo.is_demo(model) else {}


class _InProcess:
    """What OpenAIServing needs of a started server: the servicer and a health servicer."""

    def __init__(self, servicer):
        from grpc_health.v1 import health

        self.servicer, self.health = servicer, health.HealthServicer()  # SERVING by default


class CarajaxReplica:
    """One carajax Engine as a Ray Serve replica (wrapped by `serve.deployment` in `build_app`)."""

    def __init__(self, model: str = DEFAULT_MODEL, adapter_root: str | None = None,
                 engine_config: dict | None = None, cost_model: str | None = None,
                 dtype: str = "float32", warmup: bool = True):
        from carajax.config import EngineConfig
        from carajax.engine.engine import Engine
        from carajax.server.openai_serving import OpenAIServing, ServedModel
        from carajax.server.worker import CaraServeServicer

        ctx = serve.get_replica_context()
        self.name = f"{ctx.deployment}#{ctx.replica_id.unique_id}" if ctx is not None else "replica"
        self.engine = Engine.from_pretrained(model, dtype=dtype, config=EngineConfig(**(engine_config or {})))
        for name, path in _adapter_dirs(model, adapter_root).items():
            try:
                self.engine.add_adapter(name, path)
            except AdapterError as e:  # one broken adapter in the store must not stop the replica
                if not adapter_root:
                    raise
                _log.warning("replica %s: not registering adapter %r: %s", self.name, name, e)
        if warmup:  # every step variant compiled before Serve marks the replica running, as
            self.engine.warmup()  # `carajax serve` does before SERVING: no request waits on one
        self.cost_json = self._own_cost_model(cost_model)
        paths = AdapterPathPolicy(root=adapter_root) if adapter_root else None
        self.servicer = CaraServeServicer(self.engine, name=self.name, adapter_paths=paths)
        self.serving = OpenAIServing(_InProcess(self.servicer), ServedModel.of_engine(self.engine, model),
                                     limits=oa.HttpLimits(max_tokens=self.engine.config.max_tokens_limit),
                                     enable_lora_loading=False, adapter_paths=None)

    def _own_cost_model(self, choice: str | None) -> str:
        """The JSON of the step-latency model this replica publishes: `auto` (the default, or
        $CARAJAX_COST_MODEL) profiles this replica's engine in place, before it takes requests
        (never a second engine: the weights stay held once), cached on disk per device, model
        and engine shape (carajax.sched.local_cost_model); `none`: nothing (the router prices it
        with its default); else a file from `carajax profile --fit`."""
        choice = choice or os.environ.get("CARAJAX_COST_MODEL", "auto")
        if choice == "none":
            return ""
        if choice == "auto":
            from carajax.sched.local_cost_model import local_cost_model

            model, path, cached = local_cost_model(self.engine)
            _log.info("replica %s: cost model %s %s (%s)", self.name,
                      "read from" if cached else "profiled in place, saved to", path, model.describe())
            return model.to_json()
        return Path(choice).read_text()

    def record_routing_stats(self) -> dict:
        """Ray Serve calls this every `request_routing_stats_period_s`; our router reads it."""
        return routing.replica_stats(self.engine, self.servicer, name=self.name,
                                     cost_model_json=self.cost_json, serving=self.servicer.serving)

    def models(self) -> dict:
        """{"base": served name, "max_model_len": ..., "adapters": {name: rank} registered,
        "available": [names under the adapter root a request may name]}."""
        store = self.servicer.adapter_store
        return {"base": self.serving.model.name, "max_model_len": self.serving.model.max_model_len,
                "adapters": {n: a.rank for n, a in self.engine.adapters.items()},
                "available": list(store.names()) if store is not None else []}

    def _request(self, body: dict, kind: str):
        cls = oa.ChatCompletionRequest if kind == "chat" else oa.CompletionRequest
        try:
            return cls.model_validate(body)
        except ValueError as e:
            raise oa.bad_request(f"invalid request: {e}") from None

    async def complete(self, body: dict, kind: str = "completion", route: dict | None = None) -> dict:
        """One whole completion: {"status", "body", "replica"} (an error's status and body too).
        `route` is read by the router only."""
        from carajax.server.openai_serving import CallContext

        try:
            req = self._request(body, kind)
            spec = self.serving.spec(req)
            texts, last = [], None
            events = self.serving.events(spec, CallContext())
            try:
                async for piece in events:
                    texts.append(piece.text)
                    if piece.finish:
                        last = piece
                        break
            finally:
                await events.aclose()
        except oa.ApiError as e:
            return {"status": e.status, "body": e.body(), "replica": self.name}
        out = oa.response_body(kind, spec.request.request_id, req.model, "".join(texts), last.finish,
                               last.usage)
        return {"status": 200, "body": out, "replica": self.name}

    async def stream(self, body: dict, kind: str = "completion", route: dict | None = None):
        """SSE lines. The first item is {"status", "body", "replica"}: 200 (lines follow) or the
        error (nothing follows), so a refused request keeps its own status code."""
        from carajax.server.http import _sse
        from carajax.server.openai_serving import CallContext

        try:
            req = self._request(body, kind)
            spec = self.serving.spec(req)
            events = self.serving.events(spec, CallContext())
            first = await anext(events)
        except oa.ApiError as e:
            yield {"status": e.status, "body": e.body(), "replica": self.name}
            return
        yield {"status": 200, "body": None, "replica": self.name}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        async for line in _sse(kind, spec.request.request_id, req.model, first, events, include_usage):
            yield line

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            self.serving.close()
            engine.close()


__all__ = ["DEFAULT_MODEL", "CarajaxReplica"]
