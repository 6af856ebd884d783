"""The jnp LoRA forms on steps with prefill chunks, side by side in one process: `sgmv_blocked`,
`sgmv_compact`, and the engine's run-time choice between them (`prefill_uses_compact`).

    python scripts/bench_lora_forms.py [--d 512] [--repeats 30] [--out results/bench_lora_forms.json]

One projection (d -> d), a pool of 16 slots of rank 64 (page_rank 16), the engine's 16 segments
a step and blocks of 64 tokens. Each form runs jitted on the same device arrays (median of
--repeats after warm calls); the outputs are compared with the blocked form's. The "chosen"
column is what the engine runs: both forms compiled, one taken per step by a `lax.cond`.

Floor: the useful multiply-adds (each token times its own adapter's rank, in and out) over the
measured float32 matmul peak of this process (a 512 x 2048 x 2048 `jnp.dot`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# The machine record is bench_step's (this script's directory is on sys.path when it runs).
from bench_step import machine_info

from carajax.lora import jnp_ops

SLOTS, PAGES_PER_SLOT, PAGE_RANK, SEGMENTS, TOKEN_BLOCK = 16, 4, 16, 16, 64
# (name, T, tokens per segment, rank of each segment's adapter: one distinct adapter each)
CASES = [
    ("8 prompts x 64, ranks 8/16/32/64 x 2", 512, [64] * 8, [8, 16, 32, 64] * 2),
    ("8 prompts x 64, 8 rank-16 adapters", 512, [64] * 8, [16] * 8),
    ("1 prompt x 512, rank 16", 512, [512], [16]),
    ("15 decodes + a 497-token prompt, ranks 8-64", 512, [1] * 15 + [497], [8, 16, 32, 64] * 4),
    ("4 decodes + chunks of 2, 256, 250, ranks 8-64", 512, [1] * 4 + [2, 256, 250],
     [8, 16, 32, 64, 8, 16, 32]),
    ("13 decodes + chunks of 43, 256, 200, ranks 8-64", 512, [1] * 13 + [43, 256, 200],
     [8, 16, 32, 64] * 4),
    ("16 prompts x 32, rank 64", 512, [32] * 16, [64] * 16),
    ("16 prompts x 64, ranks 8-64 (T 1024)", 1024, [64] * 16, [8, 16, 32, 64] * 4),
]


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def matmul_peak_gflops(repeats: int) -> float:
    x, w = jnp.ones((512, 2048), jnp.float32), jnp.ones((2048, 2048), jnp.float32)
    ms = timed(lambda: jnp.dot(x, w), repeats)
    return 2 * 512 * 2048 * 2048 / ms / 1e6


def run_case(name, T, lens, seg_ranks, *, d, repeats, rng, peak):
    P = SLOTS * PAGES_PER_SLOT
    a = jnp.asarray(rng.standard_normal((P, PAGE_RANK, d), np.float32) * 0.05)
    b = jnp.asarray(rng.standard_normal((P, d, PAGE_RANK), np.float32) * 0.05)
    table = jnp.arange(P, dtype=jnp.int32).reshape(SLOTS, PAGES_PER_SLOT)
    lens = list(lens) + [0] * (SEGMENTS - len(lens))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    slots = np.array([i if n else -1 for i, n in enumerate(lens)], np.int32)
    ranks = np.zeros(SLOTS, np.int32)
    ranks[:len(seg_ranks)] = seg_ranks
    x = jnp.asarray(rng.standard_normal((T, d), np.float32))
    args = (x, a, b, jnp.asarray(starts), jnp.asarray(lens, jnp.int32), jnp.asarray(slots),
            jnp.asarray(ranks), jnp.ones(SLOTS, jnp.float32))

    @jax.jit
    def blocked(*args):
        return jnp_ops.sgmv_blocked(*args, page_table=table, token_block=TOKEN_BLOCK)

    @jax.jit
    def compact(*args):
        return jnp_ops.sgmv_compact(*args, page_table=table)

    @jax.jit
    def chosen(*args):  # what the engine runs: decodes split off, the chunks' form chosen
        x, a, b, starts, lens, slots, ranks, scales = args
        plan = jnp_ops.prefill_plan(starts, lens, slots, ranks, table, PAGE_RANK, T)
        (y,) = jnp_ops.sgmv_prefill_group(x, (a,), (b,), starts, lens, slots, (ranks,), (scales,),
                                          page_table=table, plan=plan, token_block=TOKEN_BLOCK)
        use = jnp_ops.prefill_uses_compact(plan.prompt, lens, plan.prompt_slots, ranks, table,
                                           PAGE_RANK, TOKEN_BLOCK)
        return y, use

    @jax.jit
    def unsplit(*args):  # the choice before 2026-12-08: decodes and chunks in one form
        x, a, b, starts, lens, slots, ranks, scales = args
        plan = jnp_ops.compact_plan(starts, lens, slots, ranks, table, PAGE_RANK, T)
        use = jnp_ops.prefill_uses_compact(plan, lens, slots, ranks, table, PAGE_RANK,
                                           TOKEN_BLOCK)
        most = jnp_ops.prefill_compact_max_pages(T, SEGMENTS, PAGES_PER_SLOT, TOKEN_BLOCK)
        return jax.lax.cond(use, lambda: jnp_ops.sgmv_compact(*args, page_table=table, plan=plan,
                                                              max_pages=most),
                            lambda: blocked(*args)), use

    want = np.asarray(blocked(*args))
    err = max(float(np.max(np.abs(np.asarray(f(*args)[0] if f is not compact else f(*args))
                                  - want))) for f in (compact, chosen, unsplit))
    macs = sum(n * r * 2 * d for n, r in zip(lens, seg_ranks))
    row = {"case": name, "T": T, "max_abs_diff": err,
           "blocked_ms": timed(lambda: blocked(*args), repeats),
           "compact_ms": timed(lambda: compact(*args), repeats),
           "unsplit_ms": timed(lambda: unsplit(*args), repeats),
           "chosen_ms": timed(lambda: chosen(*args), repeats),
           "chosen_form": "compact" if bool(chosen(*args)[1]) else "blocked",
           "floor_ms": 2 * macs / peak / 1e6}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=512, help="projection width in and out")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="results/bench_lora_forms.json")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    peak = matmul_peak_gflops(10)
    rows = [run_case(*case, d=args.d, repeats=args.repeats, rng=rng, peak=peak) for case in CASES]
    print(f"one projection {args.d} -> {args.d}, float32, {jax.devices()[0].device_kind}; "
          f"matmul peak {peak:.0f} GFLOP/s; ms, median of {args.repeats}")
    print("| step | blocked | compact | unsplit choice | chosen: decodes split off (chunks' form) "
          "| floor | max diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['blocked_ms']:.2f} | {r['compact_ms']:.2f} | "
              f"{r['unsplit_ms']:.2f} | {r['chosen_ms']:.2f} ({r['chosen_form']}) | "
              f"{r['floor_ms']:.3f} | "
              f"{r['max_abs_diff']:.1e} |")
    out = {"machine": machine_info(), "matmul_peak_gflops": peak, "d": args.d,
           "repeats": args.repeats, "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
