"""What every HTTP entry point checks before its app reads or parses a request: the API key on
/v1 routes (401) and the body size (413 from Content-Length without reading; a chunked body is
read up to the limit, never past it).

    app.add_middleware(Guard, config=GuardConfig(api_key=KEY))      # settled when the app is built
    app.add_middleware(Guard, config=lambda: current_config())      # or looked up per request

One ASGI middleware for the worker's and router's HTTP server (carajax.server.http) and the Ray
Serve ingress (carajax.cluster.app), so both refuse alike. The ingress takes the callable form:
Ray freezes its FastAPI app when the module is imported, before any key is known, and each
ingress replica holds its own config. Routes outside /v1 (health checks, metrics) need no key:
see carajax.server.auth for why.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from carajax.server import openai_api as oa
from carajax.server.auth import REFUSAL, bearer_ok

__all__ = ["Guard", "GuardConfig"]


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """api_key None: no authentication. The key is left out of the repr (and so of any log)."""

    api_key: str | None = dataclasses.field(default=None, repr=False)
    max_body_bytes: int = oa.HttpLimits.max_body_bytes

    def __post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("GuardConfig.api_key is empty: it would look locked and accept anyone")
        if self.max_body_bytes < 1:
            raise ValueError("GuardConfig.max_body_bytes must be >= 1")


class Guard:
    """ASGI middleware: refuses before the app runs. `config`: a GuardConfig, or a callable
    returning the one in force (called once per request; if it fails, the request is refused
    with 503 rather than let through unchecked)."""

    def __init__(self, app, *, config: GuardConfig | Callable[[], GuardConfig]):
        self.app, self._config = app, config

    def __repr__(self) -> str:  # never the key
        return f"Guard({self.app!r})"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            config = self._config if isinstance(self._config, GuardConfig) else self._config()
        except Exception as e:  # fail closed: no config, no request
            return await send_error(send, oa.ApiError(
                503, f"the server is not ready to check requests ({type(e).__name__})",
                type="service_unavailable"))
        headers = dict(scope["headers"])
        if config.api_key is not None and scope["path"].startswith("/v1"):
            if not bearer_ok(headers.get(b"authorization"), config.api_key):
                return await send_error(send, oa.ApiError(
                    401, REFUSAL, type="authentication_error", code="invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")])
        limit = config.max_body_bytes
        too_large = oa.ApiError(413, f"request body over {limit} bytes", code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await send_error(send, too_large)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > limit:
                return await send_error(send, too_large)
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # disconnect notices
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


async def send_error(send, e: oa.ApiError, extra: list | None = None) -> None:
    """`e` as a whole JSON response (OpenAI's error shape), straight on the ASGI `send`."""
    data = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *(extra or ())]})
    await send({"type": "http.response.body", "body": data})
