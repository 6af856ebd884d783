"""Where a workload's time goes, step by step: bench_vs_hf's carajax run with each engine step
timed and sorted by kind (decode-only, prefill-only, mixed), before optimising anything.

    python scripts/profile_steps_by_kind.py [--workload trace|fixed] [bench_vs_hf model flags]
        [--out results/profile_steps_by_kind.json]

Same model, adapters and requests as `scripts/bench_vs_hf.py` (its flags pass through), one
untimed warm-up generate, then one timed generate. Each step's period is the engine's own
(`Engine._step_times`: from the previous step's results applied to this one's); the table sums
them per kind, and lists decode steps by batch rows and the first mixed steps with their chunks
(start, length) -- a mixed step costing more than its chunk alone plus a decode step says the
two parts do not share work as they should. This found the 2026-12-07 mixed-step attention and
prefill LoRA costs (BENCHMARKS.md, hot path).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import bench_vs_hf as B  # noqa: E402  (a sibling script: its model, adapters and workloads)


def record_steps(engine) -> list[dict]:
    """Wrap the engine's apply so every step leaves a row: its kind, tokens and period."""
    rows, apply = [], engine._apply

    def timed_apply(step):
        apply(step)
        plan = step.plan
        host_s, period_s, wait_s = engine._step_times[-1]
        rows.append({"tokens": plan.num_tokens, "decodes": len(plan.decode),
                     "prefill_tokens": sum(c.length for c in plan.prefill),
                     "chunks": [(c.start, c.length) for c in plan.prefill],
                     "host_s": host_s, "period_s": period_s, "wait_s": wait_s})

    engine._apply = timed_apply
    return rows


def kind(row: dict) -> str:
    if not row["prefill_tokens"]:
        return "decode"
    return "mixed" if row["decodes"] else "prefill"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("trace", "fixed"), default="trace")
    p.add_argument("--out", default="results/profile_steps_by_kind.json")
    p.add_argument("--show-mixed", type=int, default=20, help="mixed steps listed (default 20)")
    args, rest = p.parse_known_args(argv)
    bargs = B.parse_args(["--workloads", args.workload, *rest])
    root = tempfile.mkdtemp(prefix="carajax-steps-")
    ckpt = B.build_checkpoint(bargs, root)
    adapters = B.build_adapters(bargs, ckpt, root)
    wl = B.make_workloads(bargs, list(adapters))[args.workload]
    engine, _ = B.carajax_engine(bargs, ckpt, adapters, bargs.max_seq_len or bargs.max_positions)
    variants = engine.warmup()
    B.carajax_run(engine, wl, wl.prompts(-1))
    rows = record_steps(engine)
    _, wall = B.carajax_run(engine, wl, wl.prompts(0))
    engine.close()

    by_kind = collections.defaultdict(list)
    for r in rows:
        by_kind[kind(r)].append(r)
    print(f"{args.workload}: {len(rows)} steps, {wall:.2f} s wall ({variants} variants warmed up)")
    print("| kind | steps | tokens | period s | host s | device wait s | median period ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for k in ("decode", "prefill", "mixed"):
        rs = by_kind.get(k, [])
        if not rs:
            continue
        s = summary[k] = {"steps": len(rs), "tokens": sum(r["tokens"] for r in rs),
                          "period_s": sum(r["period_s"] for r in rs),
                          "host_s": sum(r["host_s"] for r in rs),
                          "wait_s": sum(r["wait_s"] for r in rs),
                          "median_period_ms": 1e3 * statistics.median(r["period_s"] for r in rs)}
        print(f"| {k} | {s['steps']} | {s['tokens']} | {s['period_s']:.2f} | {s['host_s']:.2f} | "
              f"{s['wait_s']:.2f} | {s['median_period_ms']:.1f} |")
    rows_ms = collections.defaultdict(list)
    for r in by_kind.get("decode", []):
        rows_ms[r["decodes"]].append(r["period_s"])
    decode_by_rows = {n: 1e3 * statistics.median(v) for n, v in sorted(rows_ms.items())}
    print("decode steps, median ms by rows:",
          ", ".join(f"{n}: {ms:.1f}" for n, ms in decode_by_rows.items()))
    print("first mixed / prefill steps (tokens, decodes, ms, prefill chunks as (start, length)):")
    for r in [r for r in rows if r["prefill_tokens"]][:args.show_mixed]:
        print(f"  {r['tokens']:4d} {r['decodes']:3d} {1e3 * r['period_s']:7.1f}  {r['chunks']}")
    out = {"workload": args.workload, "wall_s": wall, "summary": summary,
           "decode_median_ms_by_rows": decode_by_rows, "steps": rows,
           "machine": B.machine_info()}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
