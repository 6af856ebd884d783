"""Policy x load sweep of the cluster simulator on the Azure LLM 2023 traces (a10_paper cost model).

    python scripts/sim_results.py                                  # 60 workers, 40k adapters, 20k requests
    python scripts/sim_results.py --requests 3000 --workers 16 --adapters 2000 --scales 2 4 8   # quick
    python scripts/sim_results.py --prefill-chunk 0 ...            # whole-prompt prefill (the old simulator)
    python scripts/sim_results.py --steps fused two ...            # fused steps and the old two forwards
    python scripts/sim_results.py --step-noise data/profiles/cpu_llama-test.json ...  # oracle + measured

`--steps`: how a step is priced. "fused" (default): one forward over the step's decodes and prefill
chunks, `cost.step_time` of the merged batch (the engine since issue 15); "two": Pre(chunks) +
Dec(decoders), two forwards (the engine before; the older tables were priced so). With both, every
run is made under each on the same workloads; runs are keyed "trace" (one mode) or "trace/mode".

`--step-noise PROFILE`: each point is also run in the simulator's measured mode (`SimConfig.step_noise`,
`carajax/sched/step_noise.py`): the router still prices with the cost model, but every step takes its
price x a relative residual (measured / predicted of the step model fitted to PROFILE, on PROFILE's own
rows, every repeat, per step kind), so the router can be wrong. `--noise-variants raw centered`: the
residuals as measured, and/or divided by their mean per kind (the model's spread without its average
bias); `--noise-seeds`: one run per seed. Modes are keyed "oracle", "measured", "measured-centered"
(+ "@seed" with several seeds).

Prints Markdown tables of SLO attainment (the simulator's TPOT-SLO metric) per policy and load scale,
with, per policy, the highest load at which attainment >= the target (default 99%) and the ratio
carajax / caraserve of those loads (the paper-style "sustainable load" comparison; goal >= 1.2x);
then the attainment of both SLOs (TPOT and TTFT) and TTFT p99. `--render FILE...` reprints saved runs;
`--plot PNG` draws attainment vs load.
Writes everything to results/sim_results.json. The default cost model is derived from published numbers
(datasheet roofline + CaraServe's load times), NOT measured on an A10; `--cost-model` takes another
(e.g. a `carajax profile` fit, measured on the device it names).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from carajax.sched import cost_model as cm
from carajax.sched.simulator import SIM_COLD_STARTS, SimConfig, load_trace, simulate
from carajax.sched.step_noise import StepNoise

REPO = Path(__file__).resolve().parents[1]
TRACES = {
    "conv": REPO / "data" / "traces" / "azure_llm_2023" / "azure2023_conv.jsonl",
    "code": REPO / "data" / "traces" / "azure_llm_2023" / "azure2023_code.jsonl",
}
POLICIES = ("caraserve", "carajax", "most_idle", "random", "first_fit")
STEPS = {"fused": "one fused forward per step: cost.step_time(decodes + chunks merged)",
         "two": "two forwards per step: Pre(chunks) + Dec(decoders) (the engine before issue 15)"}


def max_sustained(table: dict[float, float], target: float) -> float | None:
    """The highest load scale whose attainment >= target (None if none)."""
    ok = [s for s, a in table.items() if a >= target]
    return max(ok) if ok else None


def crossing(table: dict[float, float], target: float) -> float | None:
    """The load where attainment first falls below target, linearly interpolated between the two
    scales around it: less coarse than `max_sustained`, whose answer moves a whole grid step when
    one point sits on the line (None if it never falls below, or starts below)."""
    pts = sorted(table.items())
    for (s0, a0), (s1, a1) in zip(pts, pts[1:]):
        if a0 >= target > a1:
            return s0 + (a0 - target) / (a0 - a1) * (s1 - s0)
    return None


def markdown(trace: str, att: dict[str, dict[float, float]], scales: list[float], target: float,
             what: str = "TPOT-SLO attainment", fmt: str = "{:.3f}", sustained: bool = True) -> str:
    head = "| policy | " + " | ".join(f"x{s:g}" for s in scales)
    lines = [f"**{trace}** — {what} by load scale (x trace rate)", "",
             head + (f" | max load @ >= {target:.0%} |" if sustained else " |"),
             "|---|" + "---:|" * (len(scales) + (1 if sustained else 0))]
    for p, row in att.items():
        cells = " | ".join(fmt.format(row[s]) for s in scales)
        if sustained:
            best = max_sustained(row, target)
            cells += f" | {'-' if best is None else f'x{best:g}'}"
        lines.append(f"| {p} | {cells} |")
    return "\n".join(lines)


def render(doc: dict) -> None:
    """Prints the tables of a saved run: TPOT-SLO attainment (the sustained-load comparison), both
    SLOs (TPOT and TTFT), and TTFT p99."""
    target = doc["target"]
    for trace, by_scale in doc["runs"].items():
        scales = sorted(float(s) for s in by_scale)
        policies = list(by_scale[f"{scales[0]:g}"])

        def table(get, by_scale=by_scale, scales=scales, policies=policies):
            return {p: {s: get(by_scale[f"{s:g}"][p]) for s in scales} for p in policies}

        att = table(lambda r: r["slo_attainment"])
        print(markdown(trace, att, scales, target))
        best = {p: max_sustained(att[p], target) for p in policies}
        cj, cs = best.get("carajax"), best.get("caraserve")
        print("\ncarajax / caraserve max sustained load: "
              + (f"{cj / cs:.2f}x (goal >= 1.2x)" if cj is not None and cs else
                 f"n/a (carajax {cj}, caraserve {cs}: a policy never reached the target)") + "\n")
        print(markdown(trace, table(lambda r: r["both_slo_attainment"]), scales, target,
                       what="attainment of both SLOs (TPOT and TTFT)"))
        print()
        print(markdown(trace, table(lambda r: r["ttft"]["p99"]), scales, target, what="TTFT p99 (s)",
                       fmt="{:.2f}", sustained=False))
        print()
    if len(doc["runs"]) > 1:
        print(sustained_table(doc))
        print()


def sustained_table(doc: dict) -> str:
    """One line per run key: each policy's max sustained load and carajax / caraserve."""
    target, runs = doc["target"], doc["runs"]
    policies = list(next(iter(next(iter(runs.values())).values())))
    lines = [f"max load sustained at >= {target:.0%} TPOT-SLO attainment (in brackets: where attainment "
             "crosses the target, interpolated between scales)", "",
             "| run | " + " | ".join(policies) + " | carajax / caraserve |",
             "|---|" + "---:|" * (len(policies) + 1)]

    def ratio(a, b):
        return f"{a / b:.2f}x" if a is not None and b else "n/a"

    for key, by_scale in runs.items():
        att = {p: {float(s): r[p]["slo_attainment"] for s, r in by_scale.items()} for p in policies}
        best = {p: max_sustained(att[p], target) for p in policies}
        cross = {p: crossing(att[p], target) for p in policies}
        cells = " | ".join(("-" if best[p] is None else f"x{best[p]:g}")
                           + ("" if cross[p] is None else f" ({cross[p]:.2f})") for p in policies)
        lines.append(f"| {key} | {cells} | {ratio(best.get('carajax'), best.get('caraserve'))} "
                     f"({ratio(cross.get('carajax'), cross.get('caraserve'))}) |")
    return "\n".join(lines)


def plot(docs: list[dict], path: str) -> None:
    """Attainment vs load, one panel per trace, one line per policy, the target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {t: (by, d["target"]) for d in docs for t, by in d["runs"].items()}
    cols = min(3, len(runs))
    rows = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    for ax, (trace, (by_scale, target)) in zip(axes.flat, runs.items()):
        scales = sorted(float(s) for s in by_scale)
        for p in by_scale[f"{scales[0]:g}"]:
            ax.plot(scales, [by_scale[f"{s:g}"][p]["slo_attainment"] for s in scales], marker="o",
                    label=p, lw=2.5 if p == "carajax" else 1.2)
        ax.axhline(target, ls="--", color="grey", lw=1)
        ax.set_ylim(0.5, 1.005)
        ax.set_xlabel("load (x the trace's arrival rate)")
        ax.set_ylabel("TPOT-SLO attainment")
        ax.set_title(f"Azure {trace}" if "/" in trace else f"Azure {trace} trace")
        ax.legend(loc="lower left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", nargs="+", default=["conv"], choices=sorted(TRACES))
    ap.add_argument("--scales", nargs="+", type=float, default=[4, 8, 12, 16, 20, 24])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--workers", type=int, default=60)
    ap.add_argument("--adapters", type=int, default=40_000)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--zipf", type=float, default=1.8)
    ap.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 32, 64])
    ap.add_argument("--slo-tpot-ms", type=float, default=40.0)
    ap.add_argument("--slo-ttft-s", type=float, default=5.0)
    ap.add_argument("--slo-metric", default="tpot", choices=["latency_per_token", "tpot"])
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--kv-rows", type=int, default=40_000)
    ap.add_argument("--adapter-pages", type=int, default=64)
    ap.add_argument("--prefill-chunk", type=int, default=256,
                    help="prompt tokens per request per step (the engine's default); 0 = whole prompts in "
                         "one step, the simulator before chunked prefill (reproduces the old table)")
    ap.add_argument("--max-prefill-tokens", type=int, default=2048, help="prompt tokens per step, in all")
    ap.add_argument("--cold-start", default="wait", choices=list(SIM_COLD_STARTS))
    ap.add_argument("--cpu-slowdown", type=float, default=SimConfig.cpu_slowdown,
                    help="cpu_assist: a CPU-path prefill chunk costs (1 + this) x its device time")
    ap.add_argument("--max-prompt", type=int, default=4096)
    ap.add_argument("--max-output", type=int, default=1024)
    ap.add_argument("--risk-weight", type=float, default=0.5,
                    help="carajax: cost of one expected SLO miss (0: the policy without its risk term)")
    ap.add_argument("--target", type=float, default=0.99, help="attainment needed to sustain a load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", nargs="+", default=["fused"], choices=sorted(STEPS),
                    help="step pricing: fused (the engine now) and/or two (two forwards, the engine "
                         "before issue 15); several: each on the same workloads, side by side")
    ap.add_argument("--cost-model", default=str(REPO / "data" / "cost_models" / "a10_paper.json"))
    ap.add_argument("--step-noise", metavar="PROFILE", default=None,
                    help="also run every point in measured mode: step time = price x a residual of the "
                         "step model fitted to this profile (carajax profile JSON), beside the oracle")
    ap.add_argument("--noise-form", default="rich", choices=sorted(cm.FORMS),
                    help="the form of the step model whose residuals are drawn")
    ap.add_argument("--noise-variants", nargs="+", default=["raw"], choices=["raw", "centered"],
                    help="raw: residuals as measured; centered: divided by their mean per step kind")
    ap.add_argument("--noise-seeds", nargs="+", type=int, default=[0], help="measured mode: one run per seed")
    ap.add_argument("--out", default=str(REPO / "results" / "sim_results.json"))
    ap.add_argument("--render", nargs="+", metavar="JSON", help="print the tables of saved runs and exit")
    ap.add_argument("--plot", metavar="PNG", help="also plot attainment vs load (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.render:
        docs = []
        for path in args.render:
            with open(path) as f:
                docs.append(json.load(f))
            render(docs[-1])
        if args.plot:
            plot(docs, args.plot)
        return docs[0] if len(docs) == 1 else {"docs": docs}

    cost = cm.load(args.cost_model)
    if cost.source.startswith("profiled"):
        cost_note = f"measured: {cost.source}, {cost.model_name} on {cost.device} ({cost.date})"
    else:
        cost_note = ("derived from published numbers (datasheet roofline + paper load times), "
                     "not measured")
    base = SimConfig(n_workers=args.workers, max_batch=args.max_batch, kv_rows=args.kv_rows,
                    adapter_pages=args.adapter_pages, slo_tpot=args.slo_tpot_ms / 1e3,
                    slo_ttft=args.slo_ttft_s, slo_metric=args.slo_metric, cold_start=args.cold_start,
                    cpu_slowdown=args.cpu_slowdown, prefill_chunk=args.prefill_chunk,
                    max_prefill_tokens=args.max_prefill_tokens)
    # Step timing: the oracle (time = price), and with --step-noise each measured variant and seed.
    timings: dict[str, tuple[StepNoise, int] | None] = {"oracle": None}
    noises = {}
    if args.step_noise:
        for variant in args.noise_variants:
            noise = StepNoise.from_profile(args.step_noise, form=args.noise_form,
                                           center=variant == "centered")
            noises[variant] = noise
            for seed in args.noise_seeds:
                label = "measured" + ("-centered" if variant == "centered" else "")
                timings[label + (f"@{seed}" if len(args.noise_seeds) > 1 else "")] = (noise, seed)
    cfgs = {}
    for m in args.steps:
        for label, timing in timings.items():
            key = "/".join(([m] if len(args.steps) > 1 else []) + ([label] if len(timings) > 1 else []))
            cfg = dataclasses.replace(base, fused_step=m == "fused")
            cfgs[key] = cfg if timing is None else dataclasses.replace(
                cfg, step_noise=timing[0], noise_seed=timing[1])
    keys = {(t, m): f"{t}/{m}" if m else t for t in args.traces for m in cfgs}
    jobs = [(t, s, p, m) for t in args.traces for s in args.scales for p in args.policies for m in cfgs]
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="simulate", unit="run")
    except ImportError:
        bar = None
    t0 = time.perf_counter()
    runs: dict[str, dict[str, dict[str, dict]]] = {}  # trace[/steps] -> scale -> policy -> summary
    for trace in args.traces:
        for key in dict.fromkeys(keys[trace, m] for m in cfgs):
            runs[key] = {}
        for scale in args.scales:
            reqs = load_trace(str(TRACES[trace]), n_requests=args.requests, rate_scale=scale,
                              n_adapters=args.adapters, exponent=args.zipf, ranks=args.ranks,
                              seed=args.seed, max_prompt=args.max_prompt, max_output=args.max_output)
            for mode, cfg in cfgs.items():
                by_policy = runs[keys[trace, mode]].setdefault(f"{scale:g}", {})
                for p in args.policies:
                    by_policy[p] = simulate(reqs, p, cost, cfg, risk_weight=args.risk_weight).summary()
                    if bar is not None:
                        bar.set_postfix_str(f"{trace} x{scale:g} {p} {mode}")
                        bar.update()
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0

    print(f"\n{args.workers} workers, {args.adapters} adapters (Zipf {args.zipf:g}, ranks {args.ranks}), "
          f"{args.requests} requests per run, SLO {args.slo_metric} <= {args.slo_tpot_ms:g} ms; "
          + (f"chunked prefill {args.prefill_chunk}/{args.max_prefill_tokens} tokens; " if args.prefill_chunk
             else "whole-prompt prefill; ")
          + f"cold start {args.cold_start}; steps priced {' and '.join(args.steps)}; "
          f"cost model {Path(args.cost_model).name} ({cost_note}); "
          + (f"step times: oracle and measured (residuals of {args.step_noise}, "
             f"{' and '.join(args.noise_variants)}, seeds {args.noise_seeds}); " if noises else "")
          + f"{wall:.0f} s\n")
    summary: dict[str, dict] = {}
    for key in runs:
        att = {p: {s: runs[key][f"{s:g}"][p]["slo_attainment"] for s in args.scales} for p in args.policies}
        best = {p: max_sustained(att[p], args.target) for p in args.policies}
        cj, cs = best.get("carajax"), best.get("caraserve")
        ratio = cj / cs if cj is not None and cs else None
        summary[key] = {"attainment": {p: {f"{s:g}": a for s, a in row.items()} for p, row in att.items()},
                        "max_sustained_scale": best, "carajax_over_caraserve": ratio}
    doc = {"args": vars(args), "wall_s": wall, "target": args.target,
           "steps": {m: STEPS[m] for m in args.steps},
           "step_noise": {v: n.summary() for v, n in noises.items()} or None,
           "cost_model_note": cost_note,
           "summary": summary, "runs": runs}
    render(doc)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {args.out}")
    if args.plot:
        plot([doc], args.plot)
    return doc


if __name__ == "__main__":
    main()
