"""Token sampler timings: `carajax.engine.sampling.sample` against the old full-argsort sampler.

    python scripts/bench_sampling.py [--batch 16] [--vocab 32000] [--repeats 20] [--out PATH]

Both jitted, on the same random logits (normal, scale `--scale`; 1.0 is a flat distribution, so
top-p 0.9 keeps most of the vocabulary, the worst case of the new sampler; a larger scale is more
peaked, like a trained model's). Each case runs once to compile, once to warm up, then `--repeats`
times: the median in ms, and old / new. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from carajax.engine.sampling import sample


# BASELINE: the sampler this repository had before (issue 15 item 6), kept verbatim for comparison.
# It argsorts the whole vocabulary of every row, greedy or not.
@jax.jit
def old_sample(
    logits: jax.Array,  # float32 [B, V]
    temperature: jax.Array,  # float32 [B]; 0 = greedy
    top_k: jax.Array,  # int32 [B]; 0 = off
    top_p: jax.Array,  # float32 [B]; 1 = off
    seeds: jax.Array,  # uint32 [B]
    steps: jax.Array,  # int32 [B]: index of the token being drawn
) -> jax.Array:  # int32 [B]
    """One token per row: greedy, or temperature + top-k + top-p (nucleus) sampling."""
    V = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)  # [B, V] descending
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    # Nucleus: keep a token if the mass strictly before it is below top_p (the first always stays).
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    filtered = jnp.where(keep, sorted_logits, -jnp.inf)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)
    choice = jax.vmap(jax.random.categorical)(keys, filtered)  # index into the sorted order
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


# name, temperature, top_k, top_p (the same for every row)
CASES = [
    ("greedy", 0.0, 0, 1.0),
    ("temperature 1.0", 1.0, 0, 1.0),
    ("top-k 50", 1.0, 50, 1.0),
    ("top-p 0.9", 1.0, 0, 0.9),
    ("top-k 50 + top-p 0.9", 1.0, 50, 0.9),
]


def _median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--scale", type=float, nargs="+", default=[1.0, 4.0],
                        help="logit standard deviations to run (1.0 flat, 4.0 peaked)")
    parser.add_argument("--out", default="results/bench_sampling.json")
    args = parser.parse_args()

    B, V = args.batch, args.vocab
    rng = np.random.default_rng(0)
    seeds = jnp.asarray(np.arange(B, dtype=np.uint32))
    steps = jnp.zeros(B, jnp.int32)
    rows = []
    for scale in args.scale:
        logits = jnp.asarray((scale * rng.normal(size=(B, V))).astype(np.float32))  # [B, V]
        for name, t, k, p in CASES:
            arrays = (logits, jnp.full(B, t, jnp.float32), jnp.full(B, k, jnp.int32),
                      jnp.full(B, p, jnp.float32), seeds, steps)
            old = _median_ms(old_sample, arrays, args.repeats)
            new = _median_ms(sample, arrays, args.repeats)
            rows.append({"case": name, "scale": scale, "temperature": t, "top_k": k, "top_p": p,
                         "old_ms": old, "new_ms": new, "speedup": old / new})

    print(f"sampling B={B} V={V}, median of {args.repeats} on {jax.devices()[0].platform}")
    print(f"{'case':<22} {'scale':>5} {'old ms':>9} {'new ms':>9} {'old/new':>8}")
    for r in rows:
        print(f"{r['case']:<22} {r['scale']:>5.1f} {r['old_ms']:>9.2f} {r['new_ms']:>9.2f} "
              f"{r['speedup']:>7.1f}x")

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": str(jax.devices()[0]), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "batch": B, "vocab": V, "repeats": args.repeats, "rows": rows,
        }, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
