"""Does the engine's LoRA work follow the ranks of the adapters a batch uses? (issue 24)

One engine (the `bench_vs_hf` model: 4 layers, hidden 512, intermediate 1376, 8 heads, vocab
32,000, float32; `cold_start="cached"`, pool sized for rank 64), the same 16 requests x
`--prompt-len` prompt tokens x `--new-tokens` greedy tokens, run under adapter sets:

  none        no adapter (the base step)
  one         one rank-16 adapter for all 16 requests
  rank8       8 distinct rank-8 adapters (request i uses adapter i % 8)
  rank64      8 distinct rank-64 adapters
  mixed       ranks 8, 16, 32, 64 x 2 (8 distinct adapters)

every adapter on q/k/v/o (`--modules attention`, as `bench_vs_hf`'s adapters) or on all seven
projections (`--modules all`). Each set is timed `--repeats` times in rotated order
(the machine's drift spreads over all sets), the best run kept. LoRA time = set - none.
Goals (issue 24): rank8 LoRA <= 0.35 x rank64 LoRA; mixed <= +15% of none; one <= +5%.
The bytes each set's adapters add to a decode step (their own rows, read once per step) are
printed beside: the floor the LoRA work could reach.

    python scripts/bench_lora_rank.py [--repeats 3] [--out results/bench_lora_rank.json]
    python scripts/bench_lora_rank.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from bench_step import log, machine_info

SETS = {"none": [], "one": [16], "rank8": [8] * 8, "rank64": [64] * 8,
        "mixed": [8, 16, 32, 64] * 2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per set (best kept)")
    p.add_argument("--out", default=os.path.join("results", "bench_lora_rank.json"))
    p.add_argument("--quick", action="store_true", help="tiny model, 4 requests (smoke test)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--modules", default="attention", choices=["attention", "all"],
                   help="the adapters' target projections: q/k/v/o, or all seven")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.heads, args.vocab = 2, 128, 344, 4, 1000
        args.requests, args.new_tokens, args.repeats = 4, 8, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import carajax
    from carajax.config import ATTENTION_MODULES, TARGET_MODULES, ModelConfig
    from carajax.models import weights
    from carajax.testing import write_random_adapter

    machine = machine_info()
    config = ModelConfig(name="bench", vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_layers=args.layers,
                         num_heads=args.heads, num_kv_heads=args.heads,
                         max_position_embeddings=1024)
    ecfg = carajax.EngineConfig(max_batch_size=args.requests, cold_start="cached",
                                max_lora_rank=64, max_seq_len=256)  # pool: 8 rank-64 adapters
    engine = carajax.Engine(weights.random_model(config), config=ecfg)
    root = tempfile.mkdtemp(prefix="bench_lora_rank_")
    names = {}
    targets = ATTENTION_MODULES if args.modules == "attention" else TARGET_MODULES
    for set_name, ranks in SETS.items():
        names[set_name] = []
        for i, r in enumerate(ranks):
            name = f"{set_name}_{i}_r{r}"
            write_random_adapter(os.path.join(root, name), config, rank=r,
                                 target_modules=targets, seed=i + 1000 * len(names), std=0.05)
            names[set_name].append((name, r))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, args.vocab, args.prompt_len).tolist() for _ in range(args.requests)]
    greedy = carajax.SamplingParams(max_tokens=args.new_tokens, temperature=0.0, stop_token_ids=())
    log("warming up (compiling every step variant)")
    t0 = time.perf_counter()
    engine.warmup()
    log(f"warm-up {time.perf_counter() - t0:.1f} s")

    def run(set_name: str) -> float:
        """Register the set's adapters (resident: cached), time one generate, remove them."""
        for name, _ in names[set_name]:
            engine.add_adapter(name, os.path.join(root, name))
        adapters = [names[set_name][i % len(names[set_name])][0] if names[set_name] else None
                    for i in range(args.requests)]
        t0 = time.perf_counter()
        outs = engine.generate(prompts, adapters=adapters, sampling=greedy)
        wall = time.perf_counter() - t0
        assert all(len(o.token_ids) == args.new_tokens for o in outs), "short output"
        for name, _ in names[set_name]:
            engine.remove_adapter(name)
        return wall

    # Untimed: each set once (compiles nothing new; touches every code path).
    for s in SETS:
        run(s)
    times: dict[str, list[float]] = {s: [] for s in SETS}
    order = list(SETS)
    for rep in range(args.repeats):
        for s in order[rep % len(order):] + order[:rep % len(order)]:
            times[s].append(run(s))
            log(f"repeat {rep + 1}/{args.repeats} {s:7s} {times[s][-1] * 1e3:8.1f} ms")
    best = {s: min(t) for s, t in times.items()}
    lora = {s: best[s] - best["none"] for s in SETS}
    d, f, L = args.hidden, args.intermediate, args.layers
    row_bytes = 4 * L * (4 * 2 * d + (0 if args.modules == "attention" else 2 * (d + f) + (f + d)))
    base_bytes = 4 * (L * (4 * d * d + 3 * d * f) + d * args.vocab)  # layers + lm_head
    rows = []
    for s, ranks in SETS.items():
        ad_bytes = row_bytes * sum(ranks[:args.requests])  # the adapters the requests use
        rows.append({"set": s, "ranks": ranks, "best_ms": best[s] * 1e3,
                     "runs_ms": [t * 1e3 for t in times[s]], "lora_ms": lora[s] * 1e3,
                     "over_base": lora[s] / best["none"], "adapter_mb": ad_bytes / 1e6,
                     "adapter_bytes_over_base": ad_bytes / base_bytes})
    ratio = lora["rank8"] / lora["rank64"] if lora["rank64"] > 0 else float("nan")
    print(f"\n{args.requests} requests x {args.prompt_len} prompt -> {args.new_tokens} new tokens, "
          f"best of {args.repeats}; {machine['cpu_count']} CPUs, load {machine['loadavg_start']}")
    print("| set | ranks | best ms | LoRA ms | LoRA / base | adapter MB | adapter bytes / base |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['set']} | {','.join(map(str, r['ranks'])) or '-'} | {r['best_ms']:.1f} | "
              f"{r['lora_ms']:.1f} | {100 * r['over_base']:+.1f}% | {r['adapter_mb']:.2f} | "
              f"{100 * r['adapter_bytes_over_base']:.1f}% |")
    mixed, one = lora["mixed"] / best["none"], lora["one"] / best["none"]
    print(f"\nrank-8 LoRA / rank-64 LoRA: {ratio:.2f} (goal <= 0.35); mixed {100 * mixed:+.1f}% "
          f"(goal <= +15%); one {100 * one:+.1f}% (goal <= +5%)")
    machine["loadavg_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": machine, "args": vars(args), "rows": rows,
                   "rank8_over_rank64": ratio}, fh, indent=2)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
