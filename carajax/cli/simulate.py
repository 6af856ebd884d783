"""Route a trace through the discrete-event cluster simulator under each policy and compare them.

Each step of a simulated worker is priced by a cost model (fitted by `carajax profile --fit`);
no model runs. Prints one row per policy: SLO attainment, TTFT, time per output token, latency,
adapter loads and memory fallbacks; --json writes the summaries.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from carajax import data as packaged
from carajax.cli.args import cost_model_arg, existing_file, int_list
from carajax.errors import UsageError

HELP = "route a trace through the cluster simulator under each policy"
DEFAULT_TRACE = packaged.CONV_TRACE
# Fitted on a CPU for llama-test by `carajax profile` (what this machine runs); the derived A10 model
# (data/cost_models/a10_paper.json) is the GPU-like setting scripts/sim_results.py uses.
DEFAULT_COST_MODEL = packaged.COST_MODELS / "cpu_llama-test.json"
DEFAULT_POLICIES = "caraserve,carajax,most_idle,random,first_fit"


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    from carajax.sched.simulator import SIM_COLD_STARTS

    p.add_argument("--trace", default=None, help=f"JSONL or Azure CSV trace (default: the Azure LLM 2023 "
                   f"conversation trace shipped with carajax, {DEFAULT_TRACE.name})")
    p.add_argument("--cost-model", default=None, help=f"cost model JSON that prices each step (default: "
                   f"{DEFAULT_COST_MODEL.name}, shipped, fitted on a CPU for llama-test; "
                   "data/cost_models/a10_paper.json: an A10 derived from published numbers)")
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help="comma-separated routing policies, each simulated in turn (default: %(default)s)")
    p.add_argument("--workers", type=int, default=60, help="simulated workers (default: %(default)s)")
    p.add_argument("--adapters", type=int, default=40_000,
                   help="distinct adapters the trace's requests are spread over with Zipf popularity "
                        "(requests that name none; default: %(default)s)")
    p.add_argument("--zipf", type=float, default=1.8,
                   help="Zipf exponent of adapter popularity (default: %(default)s)")
    p.add_argument("--ranks", default="8,16,32,64",
                   help="comma-separated adapter ranks, one drawn per adapter (default: %(default)s)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the trace's arrival rate (2: twice as fast; default: %(default)s)")
    p.add_argument("--requests", type=int, default=None, metavar="N",
                   help="cut the trace to N requests, or repeat it back to back up to N (default: "
                        "the whole trace once)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of each request's adapter and rank (default: %(default)s)")
    p.add_argument("--slo-tpot-ms", type=float, default=40.0,
                   help="time-per-token SLO in milliseconds: what the caraserve and carajax policies "
                        "price and the TPOT-SLO column counts (see --slo-metric; default: %(default)s)")
    p.add_argument("--slo-ttft-s", type=float, default=5.0,
                   help="time-to-first-token SLO in seconds (the TTFT-SLO column; default: %(default)s)")
    p.add_argument("--slo-metric", default="tpot", choices=["latency_per_token", "tpot"],
                   help="what --slo-tpot-ms bounds: tpot, the decode time per token after the first; "
                        "latency_per_token, the whole latency over the output tokens, prompt "
                        "included (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="requests running at once per worker (default: %(default)s)")
    p.add_argument("--kv-rows", type=int, default=40_000,
                   help="KV-cache token rows per worker (default: %(default)s)")
    p.add_argument("--adapter-pages", type=int, default=64,
                   help="device adapter pages per worker (default: %(default)s)")
    p.add_argument("--page-rank", type=int, default=8,
                   help="rank of one adapter page: an adapter of rank r takes ceil(r / this) pages "
                        "(default: %(default)s)")
    p.add_argument("--cold-start", default="wait", choices=list(SIM_COLD_STARTS),
                   help="what a request does whose adapter is not on its worker, as `carajax serve "
                        "--cold-start`: wait blocks the step on the load; cpu_assist starts at once, "
                        "its prefill chunks --cpu-slowdown slower until the load lands; async waits in "
                        "the queue while it loads; auto picks cpu_assist or async per request, "
                        "whichever the cost model says is sooner; cached makes every load free "
                        "(default: %(default)s)")
    p.add_argument("--cpu-slowdown", type=float, default=0.26,
                   help="cpu_assist / auto: a CPU-path prefill chunk costs (1 + this) x its device time "
                        "(default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per request per step "
                   "(chunked prefill, as the engine); 0: each prompt whole in the step that admits it, "
                   "with no per-step budget (default: %(default)s)")
    p.add_argument("--max-prefill-tokens", type=int, default=2048,
                   help="prompt tokens per step over all requests (default: %(default)s)")
    p.add_argument("--step", default="fused", choices=["fused", "two"], help="step pricing: fused, one "
                   "forward over the decodes and the prompt chunks, as the engine runs it (needs the "
                   "cost model's step model); two, Pre(chunks) + Dec(decoders), a prefill forward and "
                   "a decode forward per step (default: %(default)s)")
    p.add_argument("--step-noise", default=None, metavar="PROFILE", help="measured mode: each step "
                   "takes its price x a residual (measured / predicted) of the step model fitted to this "
                   "`carajax profile` JSON, so the router can mispredict, e.g. "
                   "data/profiles/cpu_llama-test.json (default: the oracle, time = price)")
    p.add_argument("--noise-seed", type=int, default=0,
                   help="seed of the --step-noise draws (default: %(default)s)")
    p.add_argument("--max-prompt", type=int, default=4096,
                   help="clip prompts to this many tokens (default: %(default)s)")
    p.add_argument("--max-output", type=int, default=1024,
                   help="clip outputs to this many tokens (default: %(default)s)")
    p.add_argument("--risk-weight", type=float, default=0.5, help="carajax policy: what one expected "
                   "time-per-token SLO miss costs in its score (0: no SLO-risk term; default: %(default)s)")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write the setup and each policy's summary as JSON to OUT")


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


__all__ = ["DEFAULT_COST_MODEL", "DEFAULT_POLICIES", "DEFAULT_TRACE", "HELP", "add_simulate_args",
           "format_table", "simulate_cmd"]
