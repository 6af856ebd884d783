"""CPU-assisted LoRA on this machine: host-callback overhead, CPU LoRA throughput, profiled c.

    python scripts/bench_cpu_lora.py [--tokens 256] [--ranks 8 16 32 64] [--max-threads N]
                                     [--budgets-ms 1 4] [--repeats 5] [--models llama2-7b llama-test]

(a) What a `jax.pure_callback` costs inside a jitted function: a trivial callback against none,
    one call and one layer's worth (7 callbacks, one per target projection); and the bridge's
    callback when the batch has no cold row (what a cold-capable step pays for nothing).
(b) CPU LoRA time of one projection (`CpuLoraWorker.delta`, JAX CPU backend) for each model's
    q_proj and down_proj shapes and each rank, with 1..max threads: tokens/s and microseconds per
    token per core (time x threads / tokens; flat across threads means perfect scaling).
(c) `CpuLoraWorker.profile`: tokens one core handles within each budget (c in CaraServe).
Prints tables and writes JSON.
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

from carajax.config import ModelConfig
from carajax.lora.adapter import LoraAdapter, LoraModule
from carajax.lora.cpu_assist import CpuAssistBridge, CpuLoraWorker


def _median_s(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _callback_rows(preset: str, tokens: int, repeats: int) -> list[dict]:
    config = ModelConfig.from_name(preset)
    shape = (1, tokens, config.hidden_size)
    x = jnp.ones(shape, jnp.float32)
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    worker = CpuLoraWorker(max_threads=1)
    bridge = CpuAssistBridge(worker, config)
    ids, lens = jnp.full((1,), -1, jnp.int32), jnp.full((1,), tokens, jnp.int32)

    def chain(x, n, bridged=False):  # n dependent callbacks (each feeds the next)
        for _ in range(n):
            x = x + (bridge.delta(0, "q_proj", x, ids, lens) if bridged else
                     jax.pure_callback(np.zeros_like, out, x, vmap_method="broadcast_all"))
        return x * 2

    def fused_qkv(x):
        dq, dk, dv = bridge.deltas(0, ("q_proj", "k_proj", "v_proj"), x, ids, lens)
        return (x + dq + jnp.pad(dk + dv, ((0, 0), (0, 0), (0, x.shape[-1] - dk.shape[-1])))) * 2

    variants = {"none": (0, jax.jit(lambda x: chain(x, 0))),
                "1 callback": (1, jax.jit(lambda x: chain(x, 1))),
                "7 callbacks (a layer)": (7, jax.jit(lambda x: chain(x, 7))),
                # The bridge's own callback with no cold row (ids -1): early exit on the host.
                "bridge, no cold row": (1, jax.jit(lambda x: chain(x, 1, True))),
                "bridge x7, no cold row": (7, jax.jit(lambda x: chain(x, 7, True))),
                # q, k, v from one callback (`deltas`): the fixed cost once for three outputs.
                "bridge q|k|v, no cold row": (1, jax.jit(lambda x: fused_qkv(x)))}
    times = {k: _median_s(lambda f=f: f(x).block_until_ready(), repeats)
             for k, (_, f) in variants.items()}
    worker.close()
    rows = []
    for k, (n, _) in variants.items():
        overhead = times[k] - times["none"]
        rows.append({"x": "x".join(map(str, shape)), "variant": k, "callbacks": n,
                     "call_us": times[k] * 1e6, "overhead_us": overhead * 1e6,
                     "per_callback_us": overhead * 1e6 / n if n else 0.0})
    return rows


def bench_callback(repeats: int) -> list[dict]:
    """(a) Per-call cost of host callbacks in a jitted function, for a tiny and a 7B-like x."""
    return _callback_rows("llama-test", 16, repeats) + _callback_rows("llama2-7b", 128, repeats)


def bench_throughput(models: list[str], ranks: list[int], tokens: int, max_threads: int,
                     repeats: int) -> list[dict]:
    """(b) One projection's CPU LoRA delta, per model shape, rank and thread count."""
    rows = []
    rng = np.random.default_rng(0)
    for name in models:
        config = ModelConfig.from_name(name)
        for module in ("q_proj", "down_proj"):
            d_in, d_out = config.projection_shape(module)
            x = rng.standard_normal((tokens, d_in), np.float32)
            for rank in ranks:
                m = LoraModule(a=rng.standard_normal((rank, d_in), np.float32),
                               b=rng.standard_normal((d_out, rank), np.float32), scale=1.0)
                for threads in range(1, max_threads + 1):
                    with CpuLoraWorker(max_threads=threads) as w:  # unprofiled: all threads
                        t = _median_s(lambda w=w, m=m, x=x: w.delta(x, m), repeats)
                    rows.append({"model": name, "module": module, "d_in": d_in, "d_out": d_out,
                                 "rank": rank, "tokens": tokens, "threads": threads,
                                 "ms": t * 1e3, "tokens_per_s": tokens / t,
                                 "us_per_token_core": t * threads / tokens * 1e6})
    return rows


def bench_profile(models: list[str], ranks: list[int], budgets_ms: list[float],
                  repeats: int) -> list[dict]:
    """(c) c = tokens per core within a budget, for each model's q_proj shape."""
    rows = []
    with CpuLoraWorker(max_threads=1) as w:
        for name in models:
            d_in, d_out = ModelConfig.from_name(name).projection_shape("q_proj")
            for rank in ranks:
                for budget in budgets_ms:
                    c = w.profile(d_in, d_out, rank, budget * 1e-3, repeats=repeats)
                    rows.append({"model": name, "module": "q_proj", "rank": rank,
                                 "budget_ms": budget, "tokens_per_core": c})
    return rows


def _cold_step_example(repeats: int) -> dict:
    """One cold 128-token row through the bridge at a 7B q_proj shape (rank 16), per call."""
    config = ModelConfig.from_name("llama2-7b")
    d_in, d_out = config.projection_shape("q_proj")
    rng = np.random.default_rng(1)
    adapter = LoraAdapter(name="r16", path="<memory>", modules={(0, "q_proj"): LoraModule(
        a=rng.standard_normal((16, d_in), np.float32),
        b=rng.standard_normal((d_out, 16), np.float32), scale=1.0)})
    with CpuLoraWorker() as worker:
        bridge = CpuAssistBridge(worker, config)
        cid = bridge.register(adapter)
        x = jnp.asarray(rng.standard_normal((1, 128, d_in), np.float32))
        f = jax.jit(lambda x: bridge.delta(0, "q_proj", x, jnp.array([cid], jnp.int32),
                                           jnp.array([128], jnp.int32)))
        t = _median_s(lambda: f(x).block_until_ready(), repeats)
        host = statistics.median(bridge.stats().recent_call_s)
    return {"call_ms": t * 1e3, "host_ms": host * 1e3, "threads": worker.max_threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama2-7b", "llama-test"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--max-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--budgets-ms", nargs="+", type=float, default=[1.0, 4.0])
    parser.add_argument("--profile-ranks", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--callback-repeats", type=int, default=200)
    parser.add_argument("--out", default="results/bench_cpu_lora.json")
    args = parser.parse_args()

    cpu = jax.devices("cpu")[0]
    print(f"default device: {jax.devices()[0]}; CPU worker on {cpu} ({os.cpu_count()} cores), "
          f"jax {jax.__version__}; load average {os.getloadavg()[0]:.2f}")

    callback = bench_callback(args.callback_repeats)
    print(f"\n(a) host-callback cost per jitted call (median of {args.callback_repeats})")
    print(f"{'x':<11} {'variant':<26} {'call us':>9} {'overhead us':>12} {'per callback us':>16}")
    for r in callback:
        print(f"{r['x']:<11} {r['variant']:<26} {r['call_us']:>9.1f} {r['overhead_us']:>12.1f} "
              f"{r['per_callback_us']:>16.1f}")

    cold = _cold_step_example(args.repeats)
    print(f"\n    one cold 128-token row, llama2-7b q_proj rank 16, {cold['threads']} threads: "
          f"{cold['call_ms']:.2f} ms per jitted call, {cold['host_ms']:.2f} ms of it on the host")

    throughput = bench_throughput(args.models, args.ranks, args.tokens, args.max_threads,
                                  args.repeats)
    print(f"\n(b) CPU LoRA delta of one projection, {args.tokens} tokens (median of {args.repeats})")
    print(f"{'model':<10} {'module':<9} {'d_in->d_out':>11} {'rank':>4} {'thr':>3} {'ms':>8} "
          f"{'tokens/s':>10} {'us/token/core':>14}")
    for r in throughput:
        print(f"{r['model']:<10} {r['module']:<9} {str(r['d_in']) + '->' + str(r['d_out']):>11} "
              f"{r['rank']:>4} {r['threads']:>3} {r['ms']:>8.3f} {r['tokens_per_s']:>10.0f} "
              f"{r['us_per_token_core']:>14.2f}")

    profiled = bench_profile(args.models, args.profile_ranks, args.budgets_ms, args.repeats)
    print("\n(c) profiled tokens per core (c) for q_proj within each budget")
    print(f"{'model':<10} {'rank':>4} {'budget ms':>9} {'tokens/core':>12}")
    for r in profiled:
        print(f"{r['model']:<10} {r['rank']:>4} {r['budget_ms']:>9.2f} {r['tokens_per_core']:>12.1f}")

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "device": str(jax.devices()[0]), "platform": platform.platform(),
                   "processor": platform.processor(), "cpu_count": os.cpu_count(),
                   "load_average": os.getloadavg()[0], "jax": jax.__version__,
                   "args": vars(args), "callback": callback, "cold_step": cold,
                   "throughput": throughput, "profile": profiled}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
