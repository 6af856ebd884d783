"""Run the router in front of running workers until SIGTERM or SIGINT, then drain it.

Each request goes to the worker the routing policy picks from the router's own dispatches and the
workers' polled stats, priced with each worker's own cost model when it reports one, else with
--cost-model. When it serves it prints "carajax router ready on HOST:PORT ...".
"""

from __future__ import annotations

import argparse

from carajax.cli.args import UsageError, adapter_root_arg, cost_model_arg
from carajax.cli.serving import add_http_args, http_args, http_note, start_http, stop_both

HELP = "run the router service in front of workers until SIGTERM"


def add_route_args(p: argparse.ArgumentParser) -> None:
    from carajax.sched.router import POLICIES

    p.add_argument("--workers", required=True, metavar="HOST:PORT,...",
                   help="comma-separated gRPC addresses of the workers (`carajax serve`)")
    p.add_argument("--policy", default="carajax", choices=POLICIES,
                   help="the routing policy that picks each request's worker (default: %(default)s)")
    p.add_argument("--host", default="[::]",
                   help="address the gRPC and HTTP servers bind (default: %(default)s, every interface)")
    p.add_argument("--port", type=int, default=50050,
                   help="gRPC port (0: any free port; default: %(default)s)")
    p.add_argument("--cost-model", default=None, metavar="FILE",
                   help="cost model JSON that prices the workers that report none of their own "
                        "(default: the one shipped with carajax)")
    p.add_argument("--slo-tpot-ms", type=float, default=100.0,
                   help="time-per-token SLO in milliseconds that the caraserve and carajax policies "
                        "price (default: %(default)s)")
    p.add_argument("--poll-interval", type=float, default=0.5,
                   help="seconds between polls of each worker's stats (default: %(default)s)")
    p.add_argument("--adapter-root", default=None, metavar="DIR",
                   help="the adapter store the workers were started with (their --adapter-root, "
                        "the same files): a request naming an adapter no worker has registered but "
                        "that exists as DIR/<name> goes to a worker, priced as a cold start of the "
                        "rank in its adapter_config.json, and that worker registers it; a name "
                        "with a path separator or a leading '.' is refused (400) here (default: "
                        "none: only adapters some worker has registered are routed)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus /metrics on PORT (default: none)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds the streams in flight get to finish after SIGTERM or SIGINT "
                        "(default: %(default)s)")
    add_http_args(p, router=True)


def route_cmd(args: argparse.Namespace) -> None:
    """Run the router until SIGTERM/SIGINT, then drain like a worker does."""
    import signal
    import threading

    from carajax.sched import cost_model as cm
    from carajax.server.router import serve_router

    cost = cost_model_arg(args.cost_model) if args.cost_model else cm.default_cost_model()
    workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    bad = [w for w in workers if not w.rpartition(":")[2].isdigit()]
    if bad or not workers:
        raise UsageError(f"--workers {args.workers!r}: expected comma-separated HOST:PORT addresses")
    api_key = http_args(args)
    if args.adapter_root is not None:
        adapter_root_arg(args.adapter_root)
    try:
        cm.require_rank_terms(cost, args.policy, f" ({args.cost_model or 'the shipped default'})")
    except ValueError as e:
        raise UsageError(f"--cost-model: {e}") from None
    router = serve_router(workers, args.port, policy=args.policy, cost=cost,
                          slo_tpot=args.slo_tpot_ms / 1e3, host=args.host,
                          poll_interval=args.poll_interval, metrics_port=args.metrics_port,
                          api_key=api_key, worker_api_key=args.worker_api_key,
                          adapter_root=args.adapter_root)
    http = start_http(router, args, api_key)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    up = sum(w.healthy for w in router.servicer.links)
    print(f"carajax router ready on {router.address} (policy {args.policy}, {up}/"
          f"{len(router.servicer.links)} workers up, cost model {cost.model_name or '?'} on "
          f"{cost.device or '?'}){http_note(http, api_key)}", flush=True)
    for link in router.servicer.links:  # each worker is priced with its own model when it has one
        print(f"  worker {link.name}: priced with {link.cost_source}", flush=True)
    while not stop.wait(0.1):
        pass
    stop_both(router, http, args.grace)


__all__ = ["HELP", "add_route_args", "route_cmd"]
