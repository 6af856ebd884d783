"""Planning and running the replays of one `carajax replay` invocation.

`plan` reads and prepares the trace, makes the adapters, and writes down everything that was
scaled, clipped or emulated (the notes the output starts with). `execute_all` starts the workers
of every cluster first (all compile before any replay, see `cluster.start_workers`), then replays
each policy on its own fresh workers, so no policy inherits another's resident adapters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from carajax.config import ATTENTION_MODULES, DEMO_MODEL, TARGET_MODULES, EngineConfig, ModelConfig
from carajax.data import CONV_TRACE
from carajax.errors import UsageError
from carajax.replay import adapters as adapter_store
from carajax.replay.driver import replay_engine, replay_grpc, synth_prompts
from carajax.trace import TraceOptions, TraceRequest, prepare, read_trace, zipf_probabilities

REPO = Path(__file__).resolve().parents[2]  # the clone, when run from one (git commit in results)
DEFAULT_TRACE = CONV_TRACE  # shipped in the package (a copy of data/traces/azure_llm_2023's)
PAGE_RANK = 16  # EngineConfig.lora_page_rank's default: the pool's page granularity


def _ints(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(",") if x.strip())


def _names(v: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in v.split(",") if x.strip())


def page_bytes(config: ModelConfig, itemsize: int = 4, page_rank: int = PAGE_RANK,
               modules: tuple[str, ...] = TARGET_MODULES) -> int:
    """Bytes of one adapter-pool page: `page_rank` rank rows of `modules` (all seven: what the
    pool reserves), all layers (float32, the replay's engines' dtype)."""
    return config.num_layers * page_rank * itemsize * sum(sum(config.projection_shape(m))
                                                           for m in modules)


def copy_ms(rank: int, config: ModelConfig, gbps: float, latency_ms: float) -> float:
    """The emulated link's time for one of the replay's adapters of `rank` (q/k/v/o, as
    `adapters.py` writes them): whole pages of the projections it targets move."""
    pages = -(-rank // PAGE_RANK)
    return latency_ms + pages * page_bytes(config, modules=ATTENTION_MODULES) / (gbps * 1e9) * 1e3


def engine_fields(args, cold_start: str, ranks: dict[str, int], context: int, cfg: ModelConfig) -> dict:
    """EngineConfig fields for one policy. The device pool holds every adapter (`cached` keeps them
    all there; `wait` / `cpu_assist` start empty and load on first use) unless `--lora-pages`
    limits it for those two, which then evict (LRU) and reload. Equal pool shapes let every
    policy's workers reuse one set of compiled step variants; a limited pool compiles its own."""
    every = sum(-(-r // PAGE_RANK) for r in ranks.values())
    limited = cold_start != "cached" and args.lora_pages > 0
    top = -(-max(ranks.values()) // PAGE_RANK) * PAGE_RANK
    extra = json.loads(args.engine_config) if getattr(args, "engine_config", None) else {}
    return {"prefill_chunk": args.prefill_chunk, "min_prefill_bucket": args.prefill_chunk,
            "max_seq_len": context, "max_lora_rank": max(64, top),
            "max_loras": 64 if limited else max(64, len(ranks)),
            "device_lora_budget_bytes": (args.lora_pages if limited else every) * page_bytes(cfg), **extra}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every run of one invocation shares."""

    requests: tuple[TraceRequest, ...]
    prompts: tuple[list[int], ...]
    adapter_paths: dict[str, str]
    adapter_ranks: dict[str, int]
    model_config: ModelConfig
    context: int
    link: tuple[float, float] | None  # (GB/s, latency ms) when emulated
    emulated: bool
    notes: list[str]
    caveats: list[str]  # the short list of what was scaled, clipped, synthesised or emulated
    subtitle: str
    setup: dict
    runs: list[tuple[str, dict]]
    adapters_dir: str  # symlinks named after the adapters, for `carajax serve --adapters`


def _model_config(model: str) -> ModelConfig:
    from carajax.models import hub

    return hub.model_config(model)


def _device() -> str:
    import jax

    return jax.devices()[0].platform


def _adapters(args, prepared, cfg: ModelConfig
              ) -> tuple[list[TraceRequest], dict[str, str], dict[str, int], str]:
    """(requests with their final adapter names, name -> directory, name -> rank, where from)."""
    reqs = list(prepared.requests)
    if args.adapter_dir:  # a{k} -> the k-th adapter of the directory, sorted by name
        found = adapter_store.scan_adapter_dir(args.adapter_dir)
        names = list(found)
        rename = {f"a{k}": n for k, n in enumerate(names)}
        reqs = [dataclasses.replace(r, adapter=rename[r.adapter], rank=found[rename[r.adapter]][1])
                if r.adapter in rename else r for r in reqs]
        missing = sorted({r.adapter for r in reqs} - set(found))
        if missing:
            raise UsageError(f"--adapter-dir {args.adapter_dir}: the trace names adapters not in "
                             f"it: {missing[:10]}")
        return reqs, {n: p for n, (p, _) in found.items()}, {n: r for n, (_, r) in found.items()}, \
            f"from {args.adapter_dir}"
    cache = args.adapter_cache or adapter_store.default_cache()
    paths = adapter_store.random_adapters(prepared.adapters, cfg, cache=cache, seed=args.seed)
    return reqs, paths, dict(prepared.adapters), f"random PEFT adapters (q/k/v/o), cached in {cache}"


def plan(args) -> Plan:
    """Read and prepare the trace, make the adapters, and list the runs."""
    trace_path = args.trace or str(DEFAULT_TRACE)
    trace = read_trace(trace_path, skip_bad=args.skip_bad)
    cfg = _model_config(args.model)
    context = EngineConfig().seq_len(cfg)
    ranks = _ints(args.ranks)
    n_adapters = len(adapter_store.scan_adapter_dir(args.adapter_dir)) if args.adapter_dir else args.adapters
    weights = tuple(float(w) for w in args.rank_weights.split(",")) if args.rank_weights else None
    options = TraceOptions(start_s=args.start, duration_s=args.duration, max_requests=args.max_requests,
                           rate_scale=args.scale, context_len=context, max_prompt=args.max_prompt,
                           max_output=args.max_output, n_adapters=n_adapters, zipf_exponent=args.zipf,
                           ranks=ranks, rank_weights=weights, seed=args.seed)
    prepared = prepare(trace.requests, options)
    if not prepared.requests:
        raise UsageError(f"no requests in the window [{args.start}, "
                         f"{args.start + args.duration}) s of {trace_path}")
    reqs, paths, adapter_ranks, where = _adapters(args, prepared, cfg)
    prompts = tuple(synth_prompts(reqs, cfg, args.seed))
    device = _device() if args.target is None else "remote"
    emulated = device == "cpu" and not args.real_link and args.target is None
    link = (args.link_gbps, args.link_latency_ms) if emulated else None
    adapters_dir = adapter_store.link_dir(paths, tempfile.mkdtemp(prefix="carajax-replay-adapters-"))

    n = len(reqs)
    span = reqs[-1].arrival_s if n > 1 else 0.0
    used = Counter(r.adapter for r in reqs)
    rank_mix = Counter(adapter_ranks.values())
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    skipped = f", {trace.skipped} malformed lines skipped" if trace.skipped else ""
    notes = [
        f"trace: {trace_path} ({len(trace.requests)} requests{skipped}); window [{args.start:g}, "
        f"{args.start + args.duration:g}) s of trace time -> {n} requests"
        + (f" (cut from {prepared.source_requests})" if prepared.source_requests != n else ""),
        f"time: arrivals SCALED x{args.scale:g} (the trace's {args.duration:g} s replay in "
        f"{args.duration / args.scale:.1f} s; {n / max(span, 1e-9):.2f} req/s)",
        f"lengths: CLIPPED to prompt <= {args.max_prompt}, output <= {args.max_output} tokens, prompt + "
        f"output <= {context} (the model's context): {prepared.clipped} of {n} requests clipped; mean "
        f"prompt {mean([r.prompt_tokens for r in reqs]):.0f}, mean output "
        f"{mean([r.output_tokens for r in reqs]):.0f} tokens",
        "prompts: SYNTHESISED random token ids of the trace's lengths (the trace has no text); every "
        "request generates exactly its output length (EOS ignored)",
        f"model: {args.model} ({cfg.num_params() / 1e6:.2f}M params"
        + ("" if os.path.isdir(args.model) else ", trained (carajax.demo)" if args.model == DEMO_MODEL
           else ", RANDOM weights") + f") on {device}",
        f"adapters: {len(adapter_ranks)} {where}; ranks "
        + ", ".join(f"{r}: {c}" for r, c in sorted(rank_mix.items()))
        + f"; Zipf {args.zipf:g} popularity (top adapter "
        f"{zipf_probabilities(n_adapters, args.zipf)[0]:.0%} of requests); {len(used)} distinct in this "
        "slice",
    ]
    if link:
        pb = page_bytes(cfg)
        costs = ", ".join(f"r{r} {copy_ms(r, cfg, *link):.1f} ms" for r in sorted(set(ranks)))
        notes.append(f"link: EMULATED host->device copies (no accelerator here): {link[1]:g} ms + bytes / "
                     f"{link[0]:g} GB/s, one copy at a time; a page ({PAGE_RANK} ranks, all layers and "
                     f"projections) is {pb / 1024:.0f} KiB: {costs}. Scaled to the tiny model: a copy moves "
                     "pages of all seven projections, and on an A10 such a rank-64 Llama-2-7B adapter "
                     "takes about two ~30 ms decode steps (CaraServe measured 20.6 ms for q/k/v alone); "
                     "here a rank-64 copy is meant to cost a few of this setup's decode steps (the "
                     "link check below gives the measured ratio)")
    elif args.target is None:
        notes.append(f"link: REAL host->device copies on {device}")
    runs: list[tuple[str, dict]] = []
    if args.target:
        if is_http_target(args.target):
            runs.append(("target", {"kind": "target", "protocol": "http",
                                    "describe": f"OpenAI HTTP target {args.target}"}))
            notes.append(f"target: {args.target} over OpenAI HTTP (streamed /v1/completions; its own "
                         "router, policies and link; adapters of the trace it lacks are loaded through "
                         "/v1/load_lora_adapter with paths on this machine, or the replay stops naming "
                         "them; no engine metrics over HTTP: cold starts are not counted)")
        else:
            runs.append(("target", {"kind": "target", "protocol": "grpc",
                                    "describe": f"gRPC target {args.target}"}))
            notes.append(f"target: {args.target} (its own policies and link; adapters of the trace it "
                         "lacks are registered through LoadAdapter, with paths on this machine)")
    else:
        policies = _names(args.router_policies) if args.mode == "cluster" else ("",)
        for cs in _names(args.cold_starts):
            for rp in policies:
                label = cs if len(policies) == 1 else f"{cs}/{rp}"
                fields = engine_fields(args, cs, adapter_ranks, context, cfg)
                what = (f"{args.workers} workers (cold start {cs}) behind the {rp} router"
                        if args.mode == "cluster" else f"in-process engine (cold start {cs})")
                runs.append((label, {"kind": args.mode, "cold_start": cs, "router_policy": rp or None,
                                     "engine_config": fields, "describe": what}))
        pages = args.lora_pages
        avg_pages = mean([-(-r // PAGE_RANK) for r in adapter_ranks.values()])
        pool = (f"device adapter pool: {pages} pages (~{pages / avg_pages:.0f} adapters) for wait/"
                f"cpu_assist, which evict LRU and reload; cached keeps all {len(adapter_ranks)}"
                if pages > 0 else
                f"device adapter pool: room for all {len(adapter_ranks)} adapters; cached loads them "
                "before the replay, wait/cpu_assist start with none on the device and load each on "
                "first use (a cold start), so cold starts are first uses on each worker")
        if args.mode == "cluster":
            notes.append(f"cluster: {args.workers} `carajax serve` worker processes behind a router in this "
                         f"process, over loopback gRPC; workers, router and client share this machine's "
                         f"{os.cpu_count()} CPU cores. Each worker: max batch {args.max_batch}, prefill "
                         f"chunk {args.prefill_chunk}; {pool}")
        else:
            notes.append(f"engine: in-process, max batch {args.max_batch}, prefill chunk "
                         f"{args.prefill_chunk}; {pool}")
    caveats = [f"trace time SCALED x{args.scale:g}: {args.duration:g} s of the trace replay in "
               f"{args.duration / args.scale:.0f} s",
               f"lengths CLIPPED to prompt <= {args.max_prompt}, output <= {args.max_output} tokens "
               f"({prepared.clipped} of {n} requests)",
               "prompts SYNTHESISED (random tokens of the trace's lengths); outputs run to the trace's "
               "length"]
    if args.model == DEMO_MODEL:
        caveats.append(f"{args.model} is the built-in trained model, but the replay's adapters have "
                       "RANDOM weights and the prompts are random tokens (the text is noise, the "
                       "timings are not)")
    elif not os.path.isdir(args.model):
        caveats.append(f"{args.model} and the adapters have RANDOM weights (the text is noise, the "
                       "timings are not)")
    if link:
        caveats.append(f"host->device link EMULATED: {link[1]:g} ms + bytes / {link[0]:g} GB/s (rank 64: "
                       f"{copy_ms(64, cfg, *link):.1f} ms)")
    if device == "cpu" and ("cpu_assist" in args.cold_starts or "auto" in args.cold_starts) \
            and not args.target:
        caveats.append("no accelerator: the \"device\" is the CPU, so cpu_assist's CPU LoRA competes with "
                       "the forward pass for the same cores instead of overlapping with a GPU")
    if args.mode == "cluster" and not args.target:
        caveats.append(f"{args.workers} workers, the router and the client share this machine's "
                       f"{os.cpu_count()} CPU cores")
    subtitle = (f"{args.model}, {n} requests of {Path(trace_path).name} ({args.duration:g} s from "
                f"{args.start:g} s at {args.scale:g}x speed), {len(adapter_ranks)} adapters (Zipf "
                f"{args.zipf:g})" + (", emulated link" if link else ""))
    setup = {"trace": trace_path, "trace_format": trace.format, "trace_skipped": trace.skipped,
             "options": dataclasses.asdict(options), "requests": n, "clipped": prepared.clipped,
             "model": args.model, "params": cfg.num_params(), "context": context, "device": device,
             "adapters": len(adapter_ranks), "adapter_source": where, "link": link,
             "mode": "target" if args.target else args.mode, "workers": args.workers,
             "max_batch": args.max_batch, "prefill_chunk": args.prefill_chunk, "lora_pages": args.lora_pages}
    return Plan(tuple(reqs), prompts, paths, adapter_ranks, cfg, context, link, emulated, notes, caveats,
                subtitle, setup, runs, adapters_dir)


def is_http_target(target: str | None) -> bool:
    """`--target http://HOST:PORT` (OpenAI HTTP) rather than HOST:PORT (gRPC)."""
    return bool(target) and target.lower().startswith(("http://", "https://"))


def _cluster_spec(plan: Plan, spec: dict, args):
    from carajax.replay.cluster import ClusterSpec

    gbps, lat = plan.link if plan.link else (None, 0.0)
    return ClusterSpec(model=args.model, workers=args.workers, cold_start=spec["cold_start"],
                       router_policy=spec["router_policy"], max_batch=args.max_batch, link_gbps=gbps,
                       link_latency_ms=lat, engine_config=tuple(sorted(spec["engine_config"].items())),
                       slo_tpot_s=args.slo_tpot_ms / 1e3,
                       avg_output_len=sum(r.output_tokens for r in plan.requests) / len(plan.requests))


def execute_all(plan: Plan, args, log=print) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Every run of the plan, one after the other; ({label: rows}, {label: run info})."""
    from carajax.replay.cluster import start_workers

    clusters = [(label, spec) for label, spec in plan.runs if spec["kind"] == "cluster"]
    workers: dict = {}
    results, info = {}, {}
    if clusters:
        n = len(clusters) * args.workers
        log(f"\nstarting {n} workers ({args.workers} per run) and waiting until all have compiled their "
            "step variants (the first start on a machine compiles for a minute or two; later starts "
            "reuse JAX's persistent cache)")
        t0 = time.monotonic()
        workers = start_workers([(label, _cluster_spec(plan, spec, args)) for label, spec in clusters],
                                plan.adapters_dir, Path(args.out) / "logs", log)
        log(f"   all {n} workers ready in {time.monotonic() - t0:.0f} s (logs in {Path(args.out) / 'logs'})")
    try:
        for label, spec in plan.runs:
            log(f"\n== {label}: {spec['describe']}")
            results[label], info[label] = execute(plan, label, spec, args, workers.get(label))
            # Other processes on the machine shift whole runs; the load average shows when they did.
            info[label]["load_avg_after"] = os.getloadavg()
            log(f"   replayed in {info[label]['replay_s']:.0f} s; 1-minute load average of the machine "
                f"{info[label]['load_avg_after'][0]:.1f} (this replay's own processes: about "
                f"{args.workers + 1 if spec['kind'] == 'cluster' else 1})")
    finally:
        for ws in workers.values():
            for w in ws:
                w.stop()
        shutil.rmtree(plan.adapters_dir, ignore_errors=True)  # symlinks only; the cache stays
    return results, info


def execute(plan: Plan, label: str, spec: dict, args, workers=None) -> tuple[list[dict], dict]:
    """One replay on its own cluster (`workers`, ready) or a fresh engine; (rows, timings)."""
    t0 = time.monotonic()
    info: dict = {k: v for k, v in spec.items() if k != "describe"}
    if spec["kind"] == "target" and spec.get("protocol") == "http":
        from carajax.replay.driver import http_models, http_register_adapters, replay_http

        try:
            loaded = http_register_adapters(args.target, plan.adapter_paths,
                                            {r.adapter for r in plan.requests if r.adapter})
        except RuntimeError as e:
            raise UsageError(f"--target {e}") from None
        base, _ = http_models(args.target)
        info.update(registered_adapters=len(loaded), base_model=base)
        t0 = time.monotonic()
        rows = replay_http(args.target, plan.requests, plan.prompts, label=label, progress=args.progress,
                           base_model=base)
        info.update(setup_s=0.0, replay_s=time.monotonic() - t0)
        return rows, info
    if spec["kind"] == "target":
        from carajax.client import Client

        with Client(args.target, timeout=120) as client:  # register what the target lacks
            have = {a.adapter_id for a in client.list_adapters()}
            missing = sorted({r.adapter for r in plan.requests if r.adapter} - have)
            for name in missing:  # paths on this machine: the target must share its disk
                client.load_adapter(name, plan.adapter_paths[name])
        info["registered_adapters"] = len(missing)
        t0 = time.monotonic()
        rows = replay_grpc(args.target, plan.requests, plan.prompts, label=label, progress=args.progress)
        info.update(setup_s=0.0, replay_s=time.monotonic() - t0)
        return rows, info
    if spec["kind"] == "cluster":
        from carajax.replay.cluster import serve_cluster

        with serve_cluster(_cluster_spec(plan, spec, args), workers) as cluster:
            t1 = time.monotonic()
            rows = replay_grpc(cluster.address, plan.requests, plan.prompts, label=label,
                               progress=args.progress)
        info.update(setup_s=t1 - t0, replay_s=time.monotonic() - t1,
                    worker_logs=[str(w.log) for w in workers])
        return rows, info
    from carajax.engine.engine import Engine

    gbps, lat = plan.link if plan.link else (None, 0.0)
    config = EngineConfig(cold_start=spec["cold_start"], max_batch_size=args.max_batch,
                          emulated_link_gbps=gbps, emulated_link_latency_ms=lat, **spec["engine_config"])
    with Engine.from_pretrained(args.model, config=config, seed=0) as engine:
        for name, path in plan.adapter_paths.items():
            engine.add_adapter(name, path)
        if args.warmup:
            engine.warmup()
        t1 = time.monotonic()
        rows = replay_engine(engine, plan.requests, plan.prompts, label=label, progress=args.progress)
    info.update(setup_s=t1 - t0, replay_s=time.monotonic() - t1)
    return rows, info
