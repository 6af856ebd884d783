"""Prefill attention, the form the engine runs against the form it replaced, in one process;
then the two forms of its own-keys part and the choice between them.

    python scripts/bench_prefill_attention.py [--heads 9 --kv-heads 3 --head-dim 64] [--repeats 30]
        [--out results/bench_prefill_attention.json]

`paged_attention_reference` on a step with prefill chunks attends the step's own keys in blocks
of the flat step (causal diagonals, `_chunk_attention`) and the earlier context through the pages
(`_paged_walk`, causal=False), merging the two softmaxes. The baseline is the earlier form: the
whole context through the pages in per-sequence query blocks of Bq rows (`_paged_walk`,
causal=True, up to S empty blocks and the full square of a prompt). Both run jitted on the same
device arrays (median of --repeats after 8 warm calls); the outputs are compared.

Second table: `_chunk_attention` (the causal attention over the step's own keys) in its diagonals
form, its rows form and `auto` (`chunk_uses_rows`, the form it picks), on the same steps and on
more prompt mixes (OWN_CASES); `auto` should be within noise of the faster of the two.

Floor: the step's causal multiply-adds (QK^T and PV, 4 FLOPs per query-key pair per head dim)
over the measured float32 matmul peak of this process (a 512 x 2048 x 2048 `jnp.dot`).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from carajax.models import attention as A
from carajax.models import attention_blocks as AB

# (name, per-sequence context length, per-sequence context written by earlier steps, Bq)
CASES = [
    ("1 prompt x 512", [512], [0], 64),
    ("1 prompt x 256", [256], [0], 64),
    ("4 prompts x 128", [128] * 4, [0] * 4, 32),
    ("16 prompts x 64", [64] * 16, [0] * 16, 64),
    ("2nd 256-chunk of 512", [512], [256], 64),
    ("128-token prompt + 15 decodes at 300", [128] + [300] * 15, [0] + [299] * 15, 16),
]
# More prompt mixes for the own-keys forms only (name, prompt lengths): the choice's boundary.
OWN_CASES = [
    ("2 prompts x 256", [256] * 2), ("8 prompts x 64", [64] * 8), ("448 + 64", [448, 64]),
    ("384 + 128", [384, 128]), ("16 prompts x 32", [32] * 16), ("1 prompt x 1024", [1024]),
    ("2 prompts x 512", [512] * 2), ("4 prompts x 256", [256] * 4),
]


def make_step(lens, earlier, *, heads, kv_heads, head_dim, page_size=16, S=16, seed=0):
    rng = np.random.default_rng(seed)
    n = [a - b for a, b in zip(lens, earlier)]
    T = 1 << (max(sum(n), 16) - 1).bit_length()  # the engine's power-of-two token bucket
    P = -(-max(lens) // page_size) + 1
    N = S * P + 1
    q = rng.standard_normal((T, heads, head_dim), np.float32)
    k_pages = rng.standard_normal((N, kv_heads, page_size, head_dim), np.float32)
    v_pages = rng.standard_normal((N, kv_heads, page_size, head_dim), np.float32)
    tables = np.zeros((S, P), np.int32)
    for s in range(len(lens)):
        tables[s] = 1 + s * P + rng.permutation(P)
    seq_lens = np.zeros(S, np.int32)
    seq_lens[:len(lens)] = lens
    starts = np.full(S + 1, sum(n), np.int32)
    starts[:len(n) + 1] = np.concatenate([[0], np.cumsum(n)])
    causal_pairs = sum(m * (e + (m + 1) / 2) for m, e in zip(n, earlier))
    return tuple(map(jnp.asarray, (q, k_pages, v_pages, tables, seq_lens, starts))), causal_pairs


def per_sequence_blocks(q, k_pages, v_pages, tables, seq_lens, starts, *, query_block):
    """The replaced form: every context position through the pages, per-sequence query blocks."""
    qs = q * (1 / math.sqrt(q.shape[-1]))
    state = A._paged_walk(qs, k_pages, v_pages, tables, seq_lens, seq_lens, starts, query_block,
                          causal=True, precision=jax.lax.Precision.HIGHEST)
    return AB._normalise(state, q.dtype)


def median_ms(fn, args, repeats):
    for _ in range(8):
        fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def matmul_peak_gflops(repeats=10):
    a = jnp.ones((512, 2048), jnp.float32)
    b = jnp.ones((2048, 2048), jnp.float32)
    ms = median_ms(jax.jit(jnp.dot), (a, b), repeats)
    return 2 * 512 * 2048 * 2048 / ms / 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    p.add_argument("--kv-heads", type=int, default=3, help="key/value heads (SmolLM2-135M: 3)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per form (median)")
    p.add_argument("--out", default="results/bench_prefill_attention.json", help="JSON output")
    args = p.parse_args(argv)

    peak = matmul_peak_gflops()
    shape = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    rows = []
    print(f"float32 matmul peak {peak:.0f} GFLOP/s; heads {args.heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}")
    print(f"{'step':38s} {'per-seq blocks ms':>18s} {'flat blocks ms':>15s} {'speed-up':>9s} "
          f"{'floor ms':>9s} {'rel err':>8s}")
    for name, lens, earlier, bq in CASES:
        step, pairs = make_step(lens, earlier, **shape)
        new = jax.jit(functools.partial(A.paged_attention_reference, query_block=bq))
        old = jax.jit(functools.partial(per_sequence_blocks, query_block=bq))
        t_old, t_new = median_ms(old, step, args.repeats), median_ms(new, step, args.repeats)
        a, b = np.asarray(new(*step)), np.asarray(old(*step))
        err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        floor = 4 * pairs * args.heads * args.head_dim / peak / 1e6
        rows.append(dict(step=name, lens=lens, earlier=earlier, query_block=bq,
                         per_sequence_blocks_ms=t_old, flat_blocks_ms=t_new,
                         speedup=t_old / t_new, floor_ms=floor, rel_error=err))
        print(f"{name:38s} {t_old:18.2f} {t_new:15.2f} {t_old / t_new:8.2f}x {floor:9.2f} "
              f"{err:8.1e}", flush=True)
    own_rows = own_keys_forms(args, shape, peak)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                       machine=platform.processor() or platform.machine(),
                       cpus=os.cpu_count(), jax=jax.__version__, backend=jax.default_backend(),
                       load_average=os.getloadavg(), matmul_peak_gflops=peak, **shape,
                       chunk_block=AB.CHUNK_BLOCK, row_block=AB.ROW_BLOCK,
                       rows_unit_cost=AB.ROWS_UNIT_COST, rows=rows, own_keys=own_rows), f, indent=1)
    print(f"wrote {args.out}")
    return 0 if all(r["rel_error"] < 1e-5 for r in rows + own_rows) else 1


def own_keys_forms(args, shape, peak) -> list[dict]:
    """`_chunk_attention` on each step's own keys: diagonals, rows, auto (and which auto took)."""
    print(f"\n{'own keys of the step':38s} {'diagonals ms':>13s} {'rows ms':>8s} {'auto ms':>8s} "
          f"{'auto took':>10s} {'floor ms':>9s} {'rel err':>8s}")
    precision = jax.lax.Precision.HIGHEST
    out = []
    cases = [(n, lens) for n, lens, earlier, _ in CASES if not any(earlier)] + OWN_CASES
    for name, lens in cases:
        (q, k_pages, v_pages, tables, seq_lens, starts), pairs = make_step(lens, [0] * len(lens), **shape)
        T = q.shape[0]
        seg, k, v = A._own_keys(k_pages, v_pages, tables, seq_lens * 0, starts, T)
        qs = q * (1 / math.sqrt(q.shape[-1]))
        step = (qs, k, v, seg)
        times, outs = {}, {}
        for form in ("diagonals", "rows", "auto"):
            fn = jax.jit(lambda q, k, v, seg, form=form: AB._normalise(
                AB._chunk_attention(q, k, v, seg, precision, form), q.dtype))
            times[form] = median_ms(fn, step, args.repeats)
            outs[form] = np.asarray(fn(*step))
        took = "rows" if bool(AB.chunk_uses_rows(seg, T)) else "diagonals"
        err = max(float(np.linalg.norm(outs[f] - outs["diagonals"]) / np.linalg.norm(outs["diagonals"]))
                  for f in ("rows", "auto"))
        floor = 4 * pairs * args.heads * args.head_dim / peak / 1e6
        out.append(dict(step=name, lens=lens, tokens=T, diagonals_ms=times["diagonals"],
                        rows_ms=times["rows"], auto_ms=times["auto"], auto_took=took,
                        faster=min(("diagonals", "rows"), key=times.get), floor_ms=floor, rel_error=err))
        print(f"{name:38s} {times['diagonals']:13.2f} {times['rows']:8.2f} {times['auto']:8.2f} "
              f"{took:>10s} {floor:9.2f} {err:8.1e}", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
