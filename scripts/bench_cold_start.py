"""Cold-start benchmark: auto, CPU-assisted prefill, async and blocking loads vs all cached.

The paper's synthetic setting (CaraServe section 7.2): Poisson arrivals, every request its own
adapter (so every request is a cold start unless cached), rank 64 (`--ranks 8 16 32 64` for the
mixed-rank variant), prompt and output lengths drawn from the Azure LLM 2023 conversation trace
(clipped to `--max-prompt` / `--max-output`). All policies run in one invocation on the same
request stream; each engine compiles all its shape variants first (`Engine.warmup`), so
compilation is not measured (the table's last column shows none happened during the run).

    python scripts/bench_cold_start.py [--model llama-test] [--requests 40] [--rate 4]
    python scripts/bench_cold_start.py --link-gbps 1 5 25     # one table per link speed
    python scripts/bench_cold_start.py --link-gbps 1 5 25 --repeats 3   # and the spread

On a machine without an accelerator the host->device link is emulated (`--link-gbps`,
`--link-latency-ms`): results are labelled "emulated". Prints mean / p50 / p99 of TTFT, time per
output token and latency, each policy's overhead against `cached`, and writes JSON (and a PNG
latency CDF when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import tempfile
import threading
import time

import jax
import numpy as np

import carajax
from carajax.config import ATTENTION_MODULES, TARGET_MODULES
from carajax.testing import write_random_adapter

TRACE = os.path.join(os.path.dirname(__file__), "..", "data", "traces", "azure_llm_2023",
                     "azure2023_conv.jsonl")


def make_stream(args, rng) -> list[dict]:
    """Requests: Poisson arrivals, trace lengths (clipped), one adapter each, ranks from --ranks."""
    with open(args.trace) as f:
        rows = [json.loads(line) for line in f]
    picks = rng.choice(len(rows), args.requests, replace=False)
    gaps = rng.exponential(1.0 / args.rate, args.requests)
    return [{"arrival_s": float(t), "prompt_tokens": min(rows[i]["prompt_tokens"], args.max_prompt),
             "output_tokens": max(1, min(rows[i]["output_tokens"], args.max_output)),
             "rank": int(rng.choice(args.ranks)), "adapter": f"req{k}"}
            for k, (i, t) in enumerate(zip(picks, np.cumsum(gaps) - gaps[0]))]


def run_stream(engine, stream, rng, vocab) -> list:
    """Open loop: submit each request at its arrival time; return the outputs in order."""
    handles, t0 = [], time.monotonic()
    for r in stream:
        delay = t0 + r["arrival_s"] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        prompt = [2, *rng.integers(4, vocab, r["prompt_tokens"] - 1).tolist()]
        sampling = carajax.SamplingParams(max_tokens=r["output_tokens"], temperature=0.0,
                                          stop_token_ids=())
        handles.append(engine.submit(prompt, adapter=r["adapter"], sampling=sampling))
    return [h.result() for h in handles]


def summarize(outs) -> dict:
    def stats(values):
        v = np.array([x for x in values if x is not None])
        return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)),
                "p99": float(np.percentile(v, 99))} if len(v) else None

    return {"ttft_s": stats([o.metrics.ttft_s for o in outs]),
            "tpot_s": stats([o.metrics.tpot_s for o in outs]),
            "latency_s": stats([o.metrics.latency_s for o in outs]),
            "cold_starts": sum(o.metrics.cold_start for o in outs),
            "cpu_prefill_tokens": sum(o.metrics.cpu_prefill_tokens for o in outs),
            "stalled_s": float(sum(o.metrics.stalled_s for o in outs)),
            "errors": sum(o.finish_reason == "error" for o in outs),
            "cold_paths": dict(collections.Counter(o.metrics.cold_path for o in outs
                                                   if o.metrics.cold_path)),
            # auto's predictions, per cold request it chose for (seconds)
            "predicted_cpu_s": stats([o.metrics.predicted_cpu_s for o in outs]),
            "predicted_copy_s": stats([o.metrics.predicted_copy_s for o in outs])}


def _all_pages_bytes(args, requests) -> int:
    """Device bytes for every adapter's pages (page = 16 rank rows of all seven projections)."""
    c = carajax.ModelConfig.from_name(args.model)
    page = 16 * c.num_layers * sum(sum(c.projection_shape(m)) for m in TARGET_MODULES)
    pages = sum(-(-r["rank"] // 16) for r in requests)
    return pages * page * np.dtype(args.dtype).itemsize


def bench_policy(policy, args, stream, warmup, adapter_dir, gbps: float) -> tuple[dict, list]:
    emulate = jax.default_backend() == "cpu" or args.emulate
    config = carajax.EngineConfig(
        cold_start=policy, max_batch_size=args.batch, prefill_chunk=args.chunk,
        min_prefill_bucket=args.chunk,  # one prefill length: fewer variants to compile
        max_lora_rank=max(args.ranks), max_loras=len(stream) + len(warmup),
        # `cached` holds every adapter (the ideal); the others get the default budget.
        device_lora_budget_bytes=_all_pages_bytes(args, [*warmup, *stream]) if policy == "cached" else None,
        emulated_link_gbps=gbps if emulate else None,
        emulated_link_latency_ms=args.link_latency_ms if emulate else 0.0)
    engine = carajax.Engine.from_pretrained(args.model, dtype=args.dtype, config=config)
    with engine:
        for r in [*warmup, *stream]:
            engine.add_adapter(r["adapter"], os.path.join(adapter_dir, f"{r['adapter']}-r{r['rank']}"))
        vocab = engine.model_config.vocab_size
        t0 = time.perf_counter()
        compiled = engine.warmup()
        print(f"  {policy}: compiled {compiled} variants in {time.perf_counter() - t0:.0f}s", flush=True)
        before = sum(engine.compiled_variants().values())
        outs = run_stream(engine, stream, np.random.default_rng(2), vocab)
        summary = summarize(outs)
        summary["compiled_during_run"] = sum(engine.compiled_variants().values()) - before
        pool = engine.pool.stats()
        summary["copies"] = {k: pool[k] for k in ("copies", "copy_predicted_ms_median",
                                                   "copy_real_ms_median")}
        return summary, outs


def print_table(args, stream, emulated: bool, gbps: float, results: dict) -> None:
    """One link speed's table: every policy against `cached`, and the cold requests' paths."""
    link = (f"emulated link {gbps} GB/s + {args.link_latency_ms} ms" if emulated
            else "real host->device copies")
    print(f"\n{args.model} {args.dtype} on {jax.devices()[0].platform}; {link}; "
          f"{len(stream)} requests, Poisson {args.rate}/s, ranks {args.ranks}, prompts <= "
          f"{args.max_prompt}, outputs <= {args.max_output} (Azure conv lengths, clipped)")
    print(f"{'policy':<11} {'TTFT mean/p50/p99 (ms)':>26} {'TPOT mean (ms)':>15} "
          f"{'latency mean/p99 (s)':>21} {'TTFT vs cached':>15} {'lat. vs cached':>15} "
          f"{'cpu tok':>8} {'stalled s':>10} {'compiles':>9}")
    base = results.get("cached")
    for policy, r in results.items():
        t, lat = r["ttft_s"], r["latency_s"]
        over_t = f"{100 * (t['mean'] / base['ttft_s']['mean'] - 1):+.0f}%" if base else "-"
        over_l = f"{100 * (lat['mean'] / base['latency_s']['mean'] - 1):+.0f}%" if base else "-"
        tpot = r["tpot_s"]["mean"] * 1e3 if r["tpot_s"] else float("nan")
        print(f"{policy:<11} {t['mean']*1e3:>8.1f}/{t['p50']*1e3:>7.1f}/{t['p99']*1e3:>8.1f} "
              f"{tpot:>15.2f} {lat['mean']:>10.3f}/{lat['p99']:>9.3f} {over_t:>15} {over_l:>15} "
              f"{r['cpu_prefill_tokens']:>8} {r['stalled_s']:>10.3f} {r['compiled_during_run']:>9}")
    for policy, r in results.items():
        if r["cold_paths"]:
            c = r["copies"]
            print(f"  {policy}: cold paths {r['cold_paths']}; copies predicted / real median "
                  f"{c['copy_predicted_ms_median'] or 0:.1f} / {c['copy_real_ms_median'] or 0:.1f} ms")


def print_repeats(args, gbps: float, results: dict) -> None:
    """Each policy's overhead against `cached` of the same repeat (paired: both ran within a
    minute of each other), median and range over the repeats; the table above is repeat 1."""
    base = results.get("cached")
    if base is None:
        return
    print(f"{args.repeats} repeats at {gbps} GB/s: overhead vs cached of the same repeat, "
          f"median (min..max)")
    print(f"{'policy':<11} {'TTFT mean':>22} {'TTFT p50':>22} {'latency mean':>22}")
    for policy, r in results.items():
        cols = [f"{np.median(o):+6.1f}% ({min(o):+.0f}..{max(o):+.0f})"
                for o in r["overhead_pct"].values()]
        print(f"{policy:<11} " + " ".join(f"{c:>22}" for c in cols))


def add_repeat_overheads(results: dict) -> None:
    """Each policy's `overhead_pct`: per repeat, % over `cached` of the same repeat (saved in
    the JSON, printed by `print_repeats`)."""
    base = results.get("cached")
    if base is None:
        return
    for r in results.values():
        r["overhead_pct"] = {
            key: [100 * (x[key] / c[key] - 1) for x, c in zip(r["repeats"], base["repeats"])]
            for key in ("ttft_mean_s", "ttft_p50_s", "latency_mean_s")}


def auto_verdict(results: dict) -> dict | None:
    """`auto` against the policies it chooses between (async, wait, cpu_assist): mean TTFT over
    the best of them and over `wait`, and whether every policy's tokens equal `cached`'s."""
    if "auto" not in results:
        return None
    ttft = {p: r["ttft_s"]["mean"] for p, r in results.items() if p in
            ("async", "wait", "cpu_assist", "auto")}
    others = {p: t for p, t in ttft.items() if p != "auto"}
    out = {"auto_ttft_mean_s": ttft["auto"]}
    text = [f"auto: mean TTFT {ttft['auto'] * 1e3:.1f} ms"]
    if others:
        best = min(others, key=others.get)
        out.update(best=best, over_best_pct=100 * (ttft["auto"] / others[best] - 1))
        text.append(f"{out['over_best_pct']:+.1f}% vs the best of the others ({best}, "
                    f"{others[best] * 1e3:.1f} ms)")
    if "wait" in ttft:
        out["over_wait_pct"] = 100 * (ttft["auto"] / ttft["wait"] - 1)
        text.append(f"{out['over_wait_pct']:+.1f}% vs wait")
    if "cached" in results:
        ref = results["cached"]["token_ids"]
        out["tokens_equal_cached"] = {p: r["token_ids"] == ref for p, r in results.items()
                                      if isinstance(r, dict) and "token_ids" in r}
        text.append("tokens equal cached's: " + ", ".join(
            f"{p} {'yes' if ok else 'NO'}" for p, ok in out["tokens_equal_cached"].items()))
    out["text"] = "; ".join(text)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-test")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--policies", nargs="+", default=["cached", "wait", "async", "cpu_assist", "auto"])
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    p.add_argument("--ranks", type=int, nargs="+", default=[64])
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-output", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--link-gbps", type=float, nargs="+", default=[25.0],
                   help="one run of every policy per link speed")
    p.add_argument("--link-latency-ms", type=float, default=0.0)
    p.add_argument("--emulate", action="store_true", help="emulate the link even on a GPU")
    p.add_argument("--trace", default=TRACE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="run every policy this many times (rotated order); prints the spread")
    p.add_argument("--modules", choices=["attention", "all"], default="attention",
                   help="the adapters' projections: q/k/v/o, or all seven (twice the bytes a copy "
                        "moves per rank at llama-test's shape)")
    p.add_argument("--out", default="results/bench_cold_start.json")
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    stream = make_stream(args, rng)
    warmup = []  # (Engine.warmup compiles every shape variant before the measured stream)
    model_config = carajax.ModelConfig.from_name(args.model)
    emulated = jax.default_backend() == "cpu" or args.emulate
    runs = {}
    modules = TARGET_MODULES if args.modules == "all" else ATTENTION_MODULES
    with tempfile.TemporaryDirectory() as adapter_dir:
        for k, r in enumerate([*warmup, *stream]):
            write_random_adapter(os.path.join(adapter_dir, f"{r['adapter']}-r{r['rank']}"),
                                 model_config, rank=r["rank"], seed=k, target_modules=modules)
        for gbps in args.link_gbps:
            results = runs[str(gbps)] = {}
            for rep in range(args.repeats):
                # Each repeat runs every policy once, in a rotated order, so that a slow spell of
                # the machine does not always land on the same policy.
                k = rep % len(args.policies)
                for policy in args.policies[k:] + args.policies[:k]:
                    print(f"running {policy} at {gbps} GB/s ({len(stream)} requests, "
                          f"{args.rate} req/s), repeat {rep + 1}/{args.repeats} ...", flush=True)
                    summary, outs = bench_policy(policy, args, stream, warmup, adapter_dir, gbps)
                    summary["token_ids"] = [list(o.token_ids) for o in outs]
                    if rep == 0:
                        results[policy] = summary | {"repeats": []}
                    results[policy]["repeats"].append(
                        {"ttft_mean_s": summary["ttft_s"]["mean"], "ttft_p50_s": summary["ttft_s"]["p50"],
                         "latency_mean_s": summary["latency_s"]["mean"],
                         "tpot_mean_s": summary["tpot_s"]["mean"] if summary["tpot_s"] else None})
    for gbps, results in runs.items():
        add_repeat_overheads(results)
        print_table(args, stream, emulated, float(gbps), results)
        if args.repeats > 1:
            print_repeats(args, float(gbps), results)
        verdict = auto_verdict(results)
        if verdict:
            results["auto_verdict"] = verdict
            print("  " + verdict["text"])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "device": str(jax.devices()[0]),
                   "cpu_count": os.cpu_count(), "jax": jax.__version__, "emulated": emulated,
                   "args": vars(args), "runs_by_link_gbps": runs}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    threading.excepthook = lambda a: print(f"thread error: {a.exc_value}")
    main()
