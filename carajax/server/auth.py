"""API keys: one shared secret per server, sent as `Authorization: Bearer KEY`.

    carajax serve --api-key KEY          (or CARAJAX_API_KEY=KEY carajax serve: keeps it out of `ps`)

HTTP (carajax.server.http) wants the header on every `/v1/...` route; gRPC wants the same text as
call metadata (`authorization: Bearer KEY`), checked by `ApiKeyInterceptor` before any handler
runs. Left open on purpose: the gRPC health service (`grpc.health.v1.Health`) and HTTP `/health`
and `/metrics`, so that Kubernetes probes and Prometheus scrapes need no secret (they reveal
whether the server is up and its counters, never a request or a completion).

Keys are compared with `hmac.compare_digest` (time independent of where they differ) and never
written to a log, an error message or a repr: a refusal says what was missing, not what was sent.
"""

from __future__ import annotations

import hmac
import os

import grpc

ENV_VAR = "CARAJAX_API_KEY"
# Health checks stay open: probes and load balancers carry no secrets (see the module docstring).
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/",)
REFUSAL = "missing or invalid API key: send the header 'Authorization: Bearer <key>'"


def resolve_api_key(flag: str | None, *, env: dict | None = None) -> str | None:
    """The key from `--api-key`, else from $CARAJAX_API_KEY; None means no authentication.
    An empty or blank key is refused: it would look locked and accept anyone."""
    key = flag if flag is not None else (os.environ if env is None else env).get(ENV_VAR)
    if key is None:
        return None
    if not key.strip():
        raise ValueError(f"the API key (--api-key or ${ENV_VAR}) is empty")
    return key


def bearer_ok(header: str | bytes | None, key: str) -> bool:
    """True if an Authorization value is `Bearer <key>` (scheme case-insensitive, as RFC 7235)."""
    if header is None:
        return False
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), key.encode())


def call_metadata(key: str | None) -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata a client sends with every call (None: no key)."""
    return None if key is None else (("authorization", f"Bearer {key}"),)


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Refuses every RPC but the health service's with UNAUTHENTICATED unless its metadata holds
    `authorization: Bearer <key>`. The handler is never entered, so a refused Generate touches no
    engine state and counts nowhere."""

    def __init__(self, key: str):
        if not key:
            raise ValueError("ApiKeyInterceptor needs a non-empty key")
        self._key = key

    def __repr__(self) -> str:  # never the key
        return "ApiKeyInterceptor(<key>)"

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(OPEN_GRPC_PREFIXES) or self._authorized(handler_call_details):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        return None if handler is None else _refusing(handler)

    def _authorized(self, details) -> bool:
        for k, v in details.invocation_metadata or ():
            if k == "authorization":
                return bearer_ok(v, self._key)
        return False


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary/stream) as `handler` that aborts UNAUTHENTICATED."""

    def refuse(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse, **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **kw)
    return grpc.stream_stream_rpc_method_handler(refuse, **kw)
