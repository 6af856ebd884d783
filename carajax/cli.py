"""The `carajax` command line.

    carajax demo [--model llama-test] [--max-tokens 24]   generate with two adapters and the base
    carajax simulate [--workers 60] [--adapters 40000] [--scale 1.0] [--json OUT]
                                                          route a trace through the cluster simulator
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from carajax.config import ATTENTION_MODULES, TARGET_MODULES, EngineConfig
from carajax.engine import Engine
from carajax.sampling import SamplingParams
from carajax.testing import write_random_adapter


def demo(args: argparse.Namespace) -> None:
    """Load the model, register two PEFT adapters of different ranks, generate, print a table."""
    import jax

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, config=EngineConfig(
        cold_start=args.cold_start, emulated_link_gbps=args.link_gbps,
        emulated_link_latency_ms=args.link_latency_ms))
    root = args.adapter_dir or os.path.join(tempfile.gettempdir(), "carajax-demo-adapters")
    specs = {"attn-r8": dict(rank=8, target_modules=ATTENTION_MODULES, seed=1),
             "all-r32": dict(rank=32, target_modules=TARGET_MODULES, seed=2)}
    with engine:
        for name, spec in specs.items():
            engine.add_adapter(name, write_random_adapter(os.path.join(root, name),
                                                          engine.model_config, **spec))
        link = (f"emulated link {args.link_gbps} GB/s + {args.link_latency_ms} ms"
                if args.link_gbps else "no link emulation")
        print(f"model {args.model} ({engine.model_config.num_params() / 1e6:.2f}M params, "
              f"random weights) on {jax.devices()[0].platform}; cold starts: {args.cold_start} "
              f"({link}); ready in {time.perf_counter() - t0:.1f}s; adapters in {root}")
        prompts = ["The quick brown fox", "LoRA adapters are", "The quick brown fox"]
        adapters = ["attn-r8", "all-r32", None]
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop_token_ids=())
        t0 = time.perf_counter()
        outs = engine.generate(prompts, adapters=adapters, sampling=sampling)
        elapsed = time.perf_counter() - t0
    print(f"\n{'adapter':<10} {'prompt':<22} {'tokens':>6} {'TTFT ms':>8} {'CPU-LoRA tok':>12}  "
          "output (greedy)")
    for prompt, adapter, out in zip(prompts, adapters, outs):
        text = out.text if out.text else str(out.token_ids)
        print(f"{adapter or '(base)':<10} {prompt:<22} {len(out.token_ids):>6} "
              f"{out.metrics.ttft_s * 1e3:>8.1f} {out.metrics.cpu_prefill_tokens:>12}  {text!r}")
    total = sum(len(o.token_ids) for o in outs)
    print(f"\n{total} tokens in {elapsed:.2f}s in one continuous batch (includes compilation); "
          f"compiled variants: {Engine.compiled_variants()}")
    print("The built-in model has random weights, so its text is noise; each adapter changes it.")


REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = REPO / "data" / "traces" / "azure_llm_2023" / "azure2023_conv.jsonl"
DEFAULT_COST_MODEL = REPO / "data" / "cost_models" / "a10_paper.json"
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
                    slo_tpot=args.slo_tpot_ms / 1e3, slo_ttft=args.slo_ttft_s, slo_metric=args.slo_metric)
    span = (reqs[-1].arrival_s - reqs[0].arrival_s) if len(reqs) > 1 else 0.0
    derived = cost_path == str(DEFAULT_COST_MODEL) or "not measured" in cost.source.lower()
    print(f"trace {trace}: {len(reqs)} requests over {span:.0f} s (rate x{args.scale:g}, "
          f"{len(reqs) / max(span, 1e-9):.2f} req/s); {args.adapters} adapters, Zipf {args.zipf:g}, "
          f"ranks {list(ranks)}")
    print(f"cluster: {cfg.n_workers} workers, max batch {cfg.max_batch}, {cfg.kv_rows} KV rows, "
          f"{cfg.adapter_pages} adapter pages of rank {cfg.page_rank}, cold start {cfg.cold_start}; SLO "
          f"{cfg.slo_metric} <= {args.slo_tpot_ms:g} ms, TTFT <= {cfg.slo_ttft:g} s")
    print(f"cost model {cost_path} ({cost.kernel}, {cost.device or 'device unknown'})"
          + ("\n  NOTE: derived from published numbers (datasheet roofline + the paper's load times), "
             "NOT measured" if derived else ""))
    results: dict[str, dict] = {}
    for name in policies:
        results[name] = simulate(reqs, name, cost, cfg).summary()
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
                   f"{DEFAULT_COST_MODEL.relative_to(REPO)}: derived from published numbers, not measured)")
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
    p.add_argument("--slo-metric", default="latency_per_token", choices=["latency_per_token", "tpot"])
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--kv-rows", type=int, default=40_000, help="KV-cache token rows per worker")
    p.add_argument("--adapter-pages", type=int, default=64, help="adapter pages per worker")
    p.add_argument("--page-rank", type=int, default=8)
    p.add_argument("--cold-start", default="wait", choices=["wait", "cached"])
    p.add_argument("--max-prompt", type=int, default=4096, help="clip prompts (tokens)")
    p.add_argument("--max-output", type=int, default=1024, help="clip outputs (tokens)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the summaries as JSON")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="carajax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="generate with two adapters and the base model")
    p.add_argument("--model", default="llama-test", help="preset name or HF checkpoint dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--adapter-dir", default=None, help="where to write the demo adapters")
    p.add_argument("--cold-start", default="cpu_assist", choices=["cpu_assist", "wait", "cached"])
    p.add_argument("--link-gbps", type=float, default=None, help="emulate the host->device link")
    p.add_argument("--link-latency-ms", type=float, default=0.0)
    p.set_defaults(func=demo)
    p = sub.add_parser("simulate", help="route a trace through the cluster simulator under each policy")
    add_simulate_args(p)
    p.set_defaults(func=simulate_cmd)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
