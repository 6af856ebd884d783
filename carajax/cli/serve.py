"""Run one gRPC worker (one engine) until SIGTERM or SIGINT, then drain it.

When it serves it prints one line: "carajax worker NAME ready on HOST:PORT ...". While it compiles
and profiles its engine its health check answers NOT_SERVING. On a signal it refuses new requests
and gives the streams in flight --grace seconds to finish.
"""

from __future__ import annotations

import argparse
import os
import sys

from carajax.cli.args import (
    ADAPTER_ROOT_HELP,
    UsageError,
    adapter_dirs_arg,
    adapter_root_arg,
    add_cold_start_arg,
    add_dtype_arg,
    add_host_budget_arg,
    add_link_args,
    add_tp_arg,
    check_tp,
    cost_model_arg,
)
from carajax.cli.serving import add_http_args, http_args, http_note, start_http, stop_both
from carajax.config import DEMO_MODEL

HELP = "run a gRPC worker (one engine) until SIGTERM"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEMO_MODEL,
                   help="HF checkpoint dir, GGUF file, a model carajax pulls by name "
                        "(smollm2-135m-instruct), preset name (random weights), or the built-in "
                        f"{DEMO_MODEL} (trained); the adapters shipped for the built-in model and for "
                        "smollm2-135m-instruct are registered unless --adapters is given "
                        "(default: %(default)s)")
    add_dtype_arg(p)
    p.add_argument("--adapters", default=None, metavar="DIR",
                   help="register every PEFT adapter directory under DIR by its folder name")
    p.add_argument("--adapter-root", default=None, metavar="DIR",
                   help=ADAPTER_ROOT_HELP + "; adapters loaded at run time (LoadAdapter) must "
                        "resolve, symlinks followed, inside DIR, relative paths taken under it "
                        "(default: none: run-time loading off unless --allow-any-adapter-path)")
    p.add_argument("--allow-any-adapter-path", action="store_true",
                   help="allow run-time loading from any path this process can read (trusted "
                        "clients only)")
    p.add_argument("--host", default="[::]",
                   help="address the gRPC and HTTP servers bind (default: %(default)s, every interface)")
    p.add_argument("--port", type=int, default=50051,
                   help="gRPC port (0: any free port; default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus /metrics on PORT (default: none)")
    p.add_argument("--name", default=None, help="worker name in metrics and stats (default: hostname)")
    add_cold_start_arg(p)
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests running at once, each holding KV-cache pages (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="requests waiting beyond the batch; one more is refused with RESOURCE_EXHAUSTED "
                        "(default: %(default)s)")
    add_tp_arg(p)
    add_link_args(p)
    add_host_budget_arg(p)
    p.add_argument("--engine-config", default=None, metavar="JSON",
                   help='more EngineConfig fields, e.g. \'{"prefill_chunk": 64, "max_loras": 128}\'')
    p.add_argument("--cost-model", default=os.environ.get("CARAJAX_COST_MODEL", "auto"),
                   metavar="auto|none|FILE", help="the step-latency model this worker reports for "
                   "routers to price it with: auto profiles the serving engine itself once (about a "
                   "minute on a CPU, while health is NOT_SERVING) and caches the fit under "
                   "$CARAJAX_HOME (default ~/.cache/carajax); none; or a JSON file from `carajax profile "
                   "--fit` (default: %(default)s; $CARAJAX_COST_MODEL sets it)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile every step variant before serving, with health NOT_SERVING meanwhile "
                        "(default: %(default)s)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds the streams in flight get to finish after SIGTERM or SIGINT "
                        "(default: %(default)s)")
    add_http_args(p)


def serve_cmd(args: argparse.Namespace) -> None:
    """Run one gRPC worker until SIGTERM/SIGINT, then drain: refuse new requests, let streams in
    flight finish within --grace seconds, exit 0. A signal while it loads, compiles or profiles
    stops the start-up (compiles in flight finish, the rest are dropped) and exits 0 too."""
    import signal
    import threading

    stop = threading.Event()
    started = threading.Event()  # serving: a signal now drains instead of aborting the start

    def on_signal(*_) -> None:
        stop.set()
        if not started.is_set():
            raise _StartStopped()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    held: dict = {}  # what the start-up built so far, to close if a signal stops it
    try:
        engine, worker, http = _start_worker(args, started, held)
    except _StartStopped:
        print("carajax worker: stopped by a signal while starting; exiting", flush=True)
        if "worker" in held:
            stop_both(held["worker"], held.get("http"), 0)
        if "engine" in held:
            held["engine"].close()
        sys.stdout.flush()
        os._exit(0)  # compile threads may still run: no interpreter teardown under them (SIGSEGV)
    while not stop.wait(0.1):  # a timed wait, so the signal handler gets to run promptly
        pass
    print(f"carajax worker {worker.name}: draining (grace {args.grace:g} s)", flush=True)
    stop_both(worker, http, args.grace)
    engine.close()


class _StartStopped(Exception):
    """SIGTERM / SIGINT while a worker starts (raised by its signal handler)."""


def _start_worker(args: argparse.Namespace, started, held: dict):
    """Build, warm up and profile the worker's engine, start its servers; returns (engine,
    worker, http), each also put in `held` as soon as it exists. `started` is set once it
    serves."""
    import json

    from carajax import demo as builtin
    from carajax.config import EngineConfig
    from carajax.engine.engine import Engine
    from carajax.lora.adapter import AdapterError
    from carajax.server.worker import serve

    fields = dict(cold_start=args.cold_start, max_batch_size=args.max_batch, max_queue=args.max_queue,
                  emulated_link_gbps=args.link_gbps, emulated_link_latency_ms=args.link_latency_ms,
                  tp=args.tp, host_lora_budget_bytes=args.host_lora_budget)
    try:  # --engine-config: any other EngineConfig field (the replay sizes pools and chunks so)
        config = EngineConfig(**{**fields, **json.loads(args.engine_config or "{}")})
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad --engine-config: {e}") from None
    check_tp(args.model, config.tp)
    cost = None
    if args.cost_model not in ("auto", "none"):
        cost = cost_model_arg(args.cost_model)
    dirs = adapter_dirs_arg(args.adapters) if args.adapters else []
    adapter_paths = adapter_path_policy(args)
    api_key = http_args(args)
    engine = held["engine"] = Engine.from_pretrained(args.model, dtype=args.dtype, config=config)
    for d in dirs:
        try:
            engine.add_adapter(d.name, d)
        except AdapterError as e:
            engine.close()
            raise UsageError(f"--adapters: cannot register adapter {d.name!r}: {e}") from None
    if not args.adapters:  # a model shipped with trained adapters comes with them
        for name, path in builtin.shipped_adapters(args.model).items():
            engine.add_adapter(name, path)
    # Bind at once and answer health NOT_SERVING while compiling and profiling, so orchestrators
    # see a live process that is not ready yet (the Kubernetes convention), then SERVING.
    profile = args.cost_model == "auto"
    worker = serve(engine, args.port, host=args.host, name=args.name, metrics_port=args.metrics_port,
                   serving=not (args.warmup or profile), adapter_paths=adapter_paths, api_key=api_key)
    held["worker"] = worker
    http = held["http"] = start_http(worker, args, api_key, engine=engine)  # None: no --http-port
    if args.warmup:
        from tqdm import tqdm

        print(f"carajax worker {worker.name} listening on {worker.address}; health NOT_SERVING "
              "while the engine compiles", flush=True)
        with tqdm(desc="compiling step variants", unit="variant", file=sys.stderr,
                  mininterval=1.0) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            engine.warmup(progress=progress)
    if profile:  # the serving engine itself, before SERVING (never a second copy of the weights)
        if not args.warmup:
            print(f"carajax worker {worker.name} listening on {worker.address}; health "
                  "NOT_SERVING while it profiles its engine", flush=True)
        cost = own_cost_model(engine)
    if cost is not None:
        worker.servicer.cost_model_json = cost.to_json()
    if args.warmup or profile:
        worker.set_serving()
    metrics = f"; metrics on :{worker.metrics_port}/metrics" if worker.metrics_port is not None else ""
    print(f"carajax worker {worker.name} ready on {worker.address} ({len(engine.adapters)} adapters, "
          f"cold start {args.cold_start}; {adapter_paths.describe()}){metrics}"
          f"{http_note(http, api_key)}", flush=True)
    started.set()
    return engine, worker, http


def own_cost_model(engine):
    """`--cost-model auto`: this worker's serving engine, profiled once in place and cached."""
    from carajax.sched.local_cost_model import local_cost_model

    model, path, cached = local_cost_model(engine, progress=True)
    how = "read from" if cached else "profiled on this worker's engine, saved to"
    print(f"carajax worker: cost model {how} {path} ({model.describe()})", flush=True)
    return model


def adapter_path_policy(args: argparse.Namespace):
    """Where LoadAdapter (and the HTTP load endpoint) may read adapters from at run time; with a
    root, also where requests find adapters by name."""
    from carajax.server.adapter_paths import AdapterPathPolicy

    if args.adapter_root is not None and args.allow_any_adapter_path:
        raise UsageError("--adapter-root and --allow-any-adapter-path exclude each other")
    if args.adapter_root is not None:
        adapter_root_arg(args.adapter_root)
    return AdapterPathPolicy(root=args.adapter_root, allow_any=args.allow_any_adapter_path)


__all__ = ["HELP", "add_serve_args", "adapter_path_policy", "own_cost_model", "serve_cmd"]
