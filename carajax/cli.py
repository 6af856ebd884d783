"""The `carajax` command line.

    carajax demo [--words hello,carajax]                  the base and every trained adapter, one batch
    carajax simulate [--workers 60] [--adapters 40000] [--scale 1.0] [--json OUT]
                                                          route a trace through the cluster simulator
    carajax serve [--model carajax-demo] [--adapters DIR] [--port 50051] [--metrics-port 9100]
                                                          a gRPC worker; prints one line when ready:
                                                          "carajax worker NAME ready on HOST:PORT ..."
    carajax profile [--model llama-test] [--grid quick] [--out P.json] [--fit C.json] [--plot F.png]
                                                          time real engine steps, fit cost models
    carajax route --workers HOST:PORT,HOST:PORT [--policy carajax] [--port 50050]
                                                          the router in front of workers; prints
                                                          "carajax router ready on HOST:PORT ..."
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

from carajax import demo as builtin
from carajax.config import ATTENTION_MODULES, DEMO_MODEL, TARGET_MODULES, EngineConfig
from carajax.engine.engine import Engine
from carajax.engine.sampling import SamplingParams
from carajax.testing import write_random_adapter


def demo(args: argparse.Namespace) -> None:
    """Serve a few words with every adapter and the base in one continuous batch, print a table.

    With the built-in model (the default) the adapters are the trained ones (`carajax.demo`), so
    every answer can be checked; with any other model two random adapters are written instead.
    """
    import jax

    t0 = time.perf_counter()
    check_tp("demo", args.model, args.tp)
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


REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = REPO / "data" / "traces" / "azure_llm_2023" / "azure2023_conv.jsonl"
# Fitted on a CPU for llama-test by `carajax profile` (what this machine runs); the derived A10 model
# (data/cost_models/a10_paper.json) is the GPU-like setting scripts/sim_results.py uses.
DEFAULT_COST_MODEL = REPO / "data" / "cost_models" / "cpu_llama-test.json"
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

    from carajax.sched import cost_model as cm
    from carajax.sched.router import POLICIES
    from carajax.sched.simulator import SimConfig, load_trace, simulate

    trace = args.trace or (str(DEFAULT_TRACE) if DEFAULT_TRACE.exists() else None)
    if trace is None:
        raise SystemExit(f"carajax simulate: no default trace at {DEFAULT_TRACE}; pass --trace FILE")
    cost_path = args.cost_model or str(DEFAULT_COST_MODEL)
    cost = cm.load(cost_path)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"carajax simulate: unknown policies {unknown}; choose from {list(POLICIES)}")
    ranks = tuple(int(r) for r in args.ranks.split(","))
    reqs = load_trace(trace, n_requests=args.requests, rate_scale=args.scale, n_adapters=args.adapters,
                      exponent=args.zipf, ranks=ranks, seed=args.seed, max_prompt=args.max_prompt,
                      max_output=args.max_output)
    cfg = SimConfig(n_workers=args.workers, max_batch=args.max_batch, kv_rows=args.kv_rows,
                    adapter_pages=args.adapter_pages, page_rank=args.page_rank, cold_start=args.cold_start,
                    slo_tpot=args.slo_tpot_ms / 1e3, slo_ttft=args.slo_ttft_s, slo_metric=args.slo_metric,
                    cpu_slowdown=args.cpu_slowdown, prefill_chunk=args.prefill_chunk,
                    max_prefill_tokens=args.max_prefill_tokens, fused_step=args.step == "fused")
    if cfg.fused_step and getattr(cost, "step", None) is None:
        raise SystemExit(f"carajax simulate: {cost_path} has no step model (fitted before the engine "
                         "fused its steps): refit it (carajax profile --fit) or pass --step two")
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
        "config": {f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
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
    p.add_argument("--trace", default=None, help=f"JSONL trace (default {DEFAULT_TRACE.relative_to(REPO)})")
    p.add_argument("--cost-model", default=None, help=f"cost model JSON (default "
                   f"{DEFAULT_COST_MODEL.relative_to(REPO)}: fitted on a CPU for llama-test; "
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
    p.add_argument("--cold-start", default="wait", choices=["wait", "cpu_assist", "cached"])
    p.add_argument("--cpu-slowdown", type=float, default=0.26,
                   help="cpu_assist: a CPU-path prefill chunk costs (1 + this) x its device time")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per request per "
                   "step (chunked prefill, as the engine); 0: whole prompts (the older simulator)")
    p.add_argument("--max-prefill-tokens", type=int, default=2048, help="prompt tokens per step")
    p.add_argument("--step", default="fused", choices=["fused", "two"], help="step pricing: fused (one "
                   "forward over decodes and chunks, the engine now; needs the cost model's step model) "
                   "or two (Pre(chunks) + Dec(decoders), the engine before issue 15)")
    p.add_argument("--max-prompt", type=int, default=4096, help="clip prompts (tokens)")
    p.add_argument("--max-output", type=int, default=1024, help="clip outputs (tokens)")
    p.add_argument("--risk-weight", type=float, default=0.5, help="carajax: what one expected "
                   "time-per-token SLO miss costs in its score (0: no SLO-risk term)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the summaries as JSON")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_tp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=positive_int, default=1, metavar="N",
                   help="tensor parallelism: shard the model over N local devices (must divide the "
                        "attention heads, KV heads and MLP width)")


def check_tp(command: str, model: str, tp: int) -> None:
    """Exit with a message (not a traceback) if `tp` does not fit this machine's devices or the
    model's heads; checked before any weights are built or read."""
    from carajax import parallel
    from carajax.config import ModelConfig

    config = ModelConfig.from_hf(model) if os.path.isdir(model) else ModelConfig.from_name(model)
    try:
        parallel.check_tp(config, tp)
        parallel.check_devices(tp)
    except ValueError as e:
        raise SystemExit(f"carajax {command}: --tp {tp}: {e}") from None


def serve_cmd(args: argparse.Namespace) -> None:
    """Run one gRPC worker until SIGTERM/SIGINT, then drain: refuse new requests, let streams in
    flight finish within --grace seconds, exit 0."""
    import json
    import signal
    import threading

    from carajax.lora.adapter import AdapterError
    from carajax.server.worker import serve

    fields = dict(cold_start=args.cold_start, max_batch_size=args.max_batch, max_queue=args.max_queue,
                  emulated_link_gbps=args.link_gbps, emulated_link_latency_ms=args.link_latency_ms,
                  tp=args.tp)
    try:  # --engine-config: any other EngineConfig field (the replay sizes pools and chunks so)
        config = EngineConfig(**{**fields, **json.loads(args.engine_config or "{}")})
    except (TypeError, ValueError) as e:
        raise SystemExit(f"carajax serve: bad --engine-config: {e}") from None
    check_tp("serve", args.model, config.tp)
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, config=config)
    if args.adapters:
        dirs = sorted(d for d in Path(args.adapters).iterdir() if (d / "adapter_config.json").is_file())
        for d in dirs:
            try:
                engine.add_adapter(d.name, d)
            except AdapterError as e:
                engine.close()
                raise SystemExit(f"carajax serve: cannot register adapter {d.name!r}: {e}") from None
    elif builtin.is_demo(args.model):  # the built-in model comes with its trained adapters
        for name, path in builtin.adapter_dirs().items():
            engine.add_adapter(name, path)
    # Bind at once and answer health NOT_SERVING while compiling, so orchestrators see a live
    # process that is not ready yet (the Kubernetes convention), then SERVING.
    worker = serve(engine, args.port, host=args.host, name=args.name, metrics_port=args.metrics_port,
                   serving=not args.warmup)
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
        worker.set_serving()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics = f"; metrics on :{worker.metrics_port}/metrics" if worker.metrics_port is not None else ""
    print(f"carajax worker {worker.name} ready on {worker.address} ({len(engine.adapters)} adapters, "
          f"cold start {args.cold_start}){metrics}", flush=True)
    while not stop.wait(0.1):  # a timed wait, so the signal handler gets to run promptly
        pass
    print(f"carajax worker {worker.name}: draining (grace {args.grace:g} s)", flush=True)
    worker.stop(grace=args.grace)
    engine.close()


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEMO_MODEL,
                   help="HF checkpoint dir, preset name (random weights), or the built-in "
                        f"{DEMO_MODEL} (trained; its adapters are registered unless --adapters)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--adapters", default=None, metavar="DIR",
                   help="register every PEFT adapter directory under DIR by its folder name")
    p.add_argument("--host", default="[::]", help="address to bind")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics here")
    p.add_argument("--name", default=None, help="worker name in metrics and stats (default: hostname)")
    p.add_argument("--cold-start", default="cpu_assist", choices=["cpu_assist", "wait", "cached"])
    p.add_argument("--max-batch", type=int, default=8, help="KV-cache rows (requests running at once)")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting requests before RESOURCE_EXHAUSTED")
    add_tp_arg(p)
    p.add_argument("--link-gbps", type=float, default=None, help="emulate the host->device link")
    p.add_argument("--link-latency-ms", type=float, default=0.0)
    p.add_argument("--engine-config", default=None, metavar="JSON",
                   help='more EngineConfig fields, e.g. \'{"prefill_chunk": 64, "max_loras": 128}\'')
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile every step variant before serving")
    p.add_argument("--grace", type=float, default=30.0, help="seconds streams get to finish on SIGTERM")


def profile_cmd(args: argparse.Namespace) -> dict:
    """Profile real engine steps, print held-out R^2/MAPE per form and phase, save the raw
    measurements, the fitted CostModel (`--form`) and a predicted-vs-measured plot."""
    import dataclasses

    from carajax.sched import profiler

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
    model = profiler.fit_profile(doc, form=args.form, kernel=args.kernel)
    if args.fit:
        Path(args.fit).parent.mkdir(parents=True, exist_ok=True)
        model.save(args.fit)
        print(f"\nwrote {args.fit} ({args.form} form, kernel {model.kernel}, fitted on all points)")
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

    cost = cm.load(args.cost_model) if args.cost_model else cm.default_cost_model()
    router = serve_router(args.workers.split(","), args.port, policy=args.policy, cost=cost,
                          slo_tpot=args.slo_tpot_ms / 1e3, host=args.host,
                          poll_interval=args.poll_interval, metrics_port=args.metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    up = sum(w.healthy for w in router.servicer.links)
    print(f"carajax router ready on {router.address} (policy {args.policy}, {up}/"
          f"{len(router.servicer.links)} workers up, cost model {cost.model_name or '?'} on "
          f"{cost.device or '?'})", flush=True)
    while not stop.wait(0.1):
        pass
    router.stop(grace=args.grace)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="carajax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="send words to the base and every adapter in one batch")
    p.add_argument("--model", default=DEMO_MODEL,
                   help=f"{DEMO_MODEL} (built in, trained adapters), a preset name or HF checkpoint "
                        "dir (random adapters)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--words", default="hello,carajax,serving",
                   help="comma-separated lowercase words (built-in model)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--adapter-dir", default=None, help="where to write random adapters (other models)")
    p.add_argument("--cold-start", default="cpu_assist", choices=["cpu_assist", "wait", "cached"])
    p.add_argument("--link-gbps", type=float, default=None, help="emulate the host->device link")
    p.add_argument("--link-latency-ms", type=float, default=0.0)
    add_tp_arg(p)
    p.set_defaults(func=demo)
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
    from carajax.replay.command import add_replay_args, replay_cmd

    p = sub.add_parser("replay", help="replay a trace open-loop against workers behind a router (the "
                       "main job), an engine or a gRPC target; compare policies")
    add_replay_args(p)
    p.set_defaults(func=replay_cmd)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
