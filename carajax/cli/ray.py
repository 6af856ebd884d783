"""Start (or join) a Ray cluster, deploy the carajax Serve app, serve until SIGTERM or SIGINT.

The app is --replicas replicas, each one engine, behind an OpenAI-compatible HTTP entry point;
each request goes to the replica the routing policy picks (--router carajax). Needs the `.[ray]`
extra. When it serves it prints "carajax on Ray Serve ready at URL ...". The HTTP entry point
checks an API key (--api-key or $CARAJAX_API_KEY) and body sizes as `carajax serve --http-port`
does; serving every interface (--http-host 0.0.0.0) without a key prints a warning.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from carajax.cli.args import (
    ADAPTER_ROOT_HELP,
    UsageError,
    adapter_root_arg,
    add_host_budget_arg,
    cost_model_arg,
    model_config_arg,
)
from carajax.config import DEMO_MODEL

HELP = "deploy replicas + our router on Ray Serve (needs .[ray]) until SIGTERM"


def add_ray_args(p: argparse.ArgumentParser) -> None:
    from carajax.sched.router import POLICIES

    p.add_argument("--replicas", type=int, default=2,
                   help="replicas, each one engine (default: %(default)s)")
    p.add_argument("--policy", default="carajax", choices=POLICIES,
                   help="the routing policy of --router carajax (default: %(default)s)")
    p.add_argument("--router", default="carajax", choices=("carajax", "ray"),
                   help="carajax: our router asking --policy; ray: Ray Serve's default (power of two "
                        "choices; default: %(default)s)")
    p.add_argument("--http-host", default="127.0.0.1",
                   help="host Serve's HTTP proxy binds (0.0.0.0: all interfaces; default: %(default)s)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="port of Serve's HTTP proxy, where the OpenAI API answers under /v1 "
                        "(default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every /v1 route (/health and "
                        "/router stay open); or set $CARAJAX_API_KEY, which keeps the key out of "
                        "the process list (default: no authentication)")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster ('auto': the local one `ray start --head` began; "
                        "default: start a local Ray in this process)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per replica (default: %(default)s)")
    p.add_argument("--num-gpus", type=float, default=0,
                   help="GPUs per replica (1 on GPU nodes; default: %(default)s)")
    p.add_argument("--model", default=DEMO_MODEL,
                   help="the model every replica serves: the built-in trained model, a preset name "
                        "(random weights), an HF checkpoint dir, a GGUF file or a model carajax pulls "
                        "by name (default: %(default)s)")
    p.add_argument("--adapter-root", default=None, metavar="DIR",
                   help="every replica registers the PEFT adapter dirs under DIR at start, and "
                        "the replica a request is routed to finds later ones by name: "
                        + ADAPTER_ROOT_HELP + " (DIR must be the same store on every node; "
                        f"default: the trained adapters of {DEMO_MODEL}, none for other models)")
    p.add_argument("--engine-config", default=None, metavar="JSON",
                   help="EngineConfig fields of every replica's engine as JSON, e.g. "
                        "'{\"max_batch_size\": 16}'")
    add_host_budget_arg(p)
    p.add_argument("--cost-model", default=os.environ.get("CARAJAX_COST_MODEL", "auto"),
                   metavar="auto|none|FILE",
                   help="the step-latency model each replica reports and the router prices it with: "
                        "auto profiles each replica's own engine in place at start (about a minute "
                        "on a CPU, once per device, model and engine shape, then cached under "
                        "$CARAJAX_HOME); none (the router prices every replica with the model "
                        "shipped with carajax); or a JSON file from `carajax profile --fit` "
                        "(default: %(default)s; $CARAJAX_COST_MODEL sets it)")
    p.add_argument("--slo-tpot-ms", type=float, default=100.0,
                   help="time-per-token SLO in milliseconds that the caraserve and carajax policies "
                        "price (default: %(default)s)")


def ray_cmd(args: argparse.Namespace) -> None:
    """Every argument is checked before Ray starts (one-line errors, as the other commands)."""
    from carajax.config import EngineConfig
    from carajax.sched.cost_model import require_rank_terms
    from carajax.server.auth import resolve_api_key

    if args.replicas < 1:
        raise UsageError(f"--replicas {args.replicas}: must be >= 1")
    try:
        api_key = resolve_api_key(args.api_key)
    except ValueError as e:
        raise UsageError(str(e)) from None
    model_config_arg(args.model)
    if args.adapter_root:
        adapter_root_arg(args.adapter_root)
    try:
        engine_config = json.loads(args.engine_config or "{}")
        if args.host_lora_budget is not None:  # as `serve`: --engine-config's fields win
            engine_config = {"host_lora_budget_bytes": args.host_lora_budget, **engine_config}
        EngineConfig(**engine_config)
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad --engine-config: {e}") from None
    if args.cost_model not in ("auto", "none"):
        try:
            require_rank_terms(cost_model_arg(args.cost_model), args.policy, f" ({args.cost_model})")
        except ValueError as e:
            raise UsageError(f"--cost-model: {e}") from None
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UsageError("Ray is not installed: pip install 'carajax[ray]'") from None
    from carajax.cluster.app import build_app

    try:
        app = build_app(replicas=args.replicas, policy=args.policy, router=args.router, model=args.model,
                        adapter_root=args.adapter_root, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                        engine_config=engine_config, cost_model=args.cost_model,
                        slo_tpot=args.slo_tpot_ms / 1e3, api_key=api_key)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    # The replicas of a Ray this process starts inherit its environment: one persistent
    # compilation cache, so a second replica, a restarted one and the next start load their
    # step variants instead of compiling them (a cluster joined with --address keeps its own).
    from carajax import paths

    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(paths.home() / "jax"))
    ray.init(address=args.address, configure_logging=False)
    serve.start(http_options={"host": args.http_host, "port": args.http_port})
    serve.run(app, name="carajax", route_prefix="/")
    everywhere = args.http_host in ("0.0.0.0", "::", "[::]")
    host = "127.0.0.1" if everywhere else args.http_host
    router = f"policy {args.policy}" if args.router == "carajax" else "Ray's default router"
    if everywhere and api_key is None:
        print(f"carajax ray: warning: serving on every interface ({args.http_host}) without an API "
              "key; set --api-key or $CARAJAX_API_KEY", file=sys.stderr, flush=True)
    print(f"carajax on Ray Serve ready at http://{host}:{args.http_port}/v1 ({args.replicas} replicas, "
          f"{router}{'; API key required' if api_key is not None else ''})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.1):
        pass
    print("carajax ray: shutting down", flush=True)
    serve.delete("carajax")
    if args.address is None:  # our own local Ray; a joined cluster keeps running
        serve.shutdown()
        ray.shutdown()


__all__ = ["HELP", "add_ray_args", "ray_cmd"]
