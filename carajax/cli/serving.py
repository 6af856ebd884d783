"""What the commands that run servers (`serve`, `route`) share: the OpenAI-compatible HTTP API
beside the gRPC server, its flags and API key, the ready line's tail, and draining both."""

from __future__ import annotations

import argparse

from carajax.errors import UsageError


def add_http_args(p: argparse.ArgumentParser, router: bool = False) -> None:
    p.add_argument("--http-port", type=int, default=None, metavar="PORT",
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, "
                        "/v1/chat/completions, /v1/models, /health, /metrics) on PORT (0: any free "
                        "port; default: no HTTP API)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on HTTP /v1 routes and as gRPC "
                        "metadata (health checks stay open); or set $CARAJAX_API_KEY, which keeps "
                        "the key out of the process list (default: no authentication)")
    p.add_argument("--enable-lora-loading", action="store_true",
                   help="enable HTTP /v1/load_lora_adapter and /v1/unload_lora_adapter (needs "
                        "--http-port)"
                        + ("; each worker checks the paths it is asked to load" if router else
                           "; paths as --adapter-root or --allow-any-adapter-path allow"))
    if router:
        p.add_argument("--worker-api-key", default=None, metavar="KEY",
                       help="the key the router sends its workers (default: --api-key)")
        p.add_argument("--tokenizer", default=None, metavar="MODEL",
                       help="checkpoint dir or preset whose tokenizer and chat template the HTTP "
                            "API uses (default: the model the workers report, if found here)")


def http_args(args: argparse.Namespace) -> str | None:
    """The API key (--api-key or $CARAJAX_API_KEY; None: no authentication), after checking the
    HTTP flags go together; `UsageError` otherwise. Never printed."""
    from carajax.server.auth import resolve_api_key

    if args.enable_lora_loading and args.http_port is None:
        raise UsageError("--enable-lora-loading needs --http-port (it enables HTTP endpoints)")
    try:
        return resolve_api_key(args.api_key)
    except ValueError as e:
        raise UsageError(str(e)) from None


def start_http(server, args: argparse.Namespace, api_key: str | None, *, engine=None):
    """The OpenAI-compatible HTTP server beside a started worker (`engine`) or router, or None
    without --http-port. A port that cannot be bound stops `server` and is a usage error."""
    if args.http_port is None:
        return None
    from carajax.server.http import ServedModel, serve_http

    try:
        model = (ServedModel.of_engine(engine, args.model) if engine is not None
                 else ServedModel.load(args.tokenizer) if args.tokenizer else None)
        return serve_http(server, args.http_port, host=args.host, model=model, api_key=api_key,
                          enable_lora_loading=args.enable_lora_loading)
    except (OSError, RuntimeError) as e:
        server.stop(grace=0)
        if engine is not None:
            engine.close()
        raise UsageError(f"--http-port {args.http_port}: {e}") from None


def http_note(http, api_key: str | None) -> str:
    """The ready line's tail: where the HTTP API is, and whether a key is needed (never the key)."""
    note = f"; OpenAI HTTP on {http.url}" if http is not None else ""
    return note + ("; API key required" if api_key is not None else "")


def stop_both(server, http, grace: float) -> None:
    """Drain the gRPC server and the HTTP server at once: each refuses new requests and gives
    its streams `grace` seconds."""
    import threading

    t = threading.Thread(target=http.stop, args=(grace,)) if http is not None else None
    if t is not None:
        t.start()
    server.stop(grace=grace)
    if t is not None:
        t.join()


__all__ = ["add_http_args", "http_args", "http_note", "start_http", "stop_both"]
