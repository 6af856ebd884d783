"""bfloat16 matmuls on this CPU: JAX/XLA:CPU against torch, and whether any XLA flag closes the gap.

On a CPU with AMX tiles torch's bf16 matmuls use them through oneDNN, XLA:CPU's (as far as
measured before) do not; on one without AMX or AVX512-BF16 (the AMD EPYC of 2026-12-07) torch's
bf16 falls back to slow code. The script records the CPU's bf16 flags. Measured here, one
process per XLA flag set (flags are read at backend start), each timing the same products:

  * a 512 x 2048 @ 2048 x 2048 matmul (the issue's yardstick) and a decode-shaped one
    (16 x 576 @ 576 x 1536, SmolLM2's MLP);
  * float32, bfloat16 (bf16 in, bf16 out) and bfloat16 in with float32 accumulation
    (`preferred_element_type`);
  * torch at 1 thread and at all cores (the same shapes and dtypes).

Flag sets that this jaxlib does not know are reported as such (XLA refuses unknown flags).
Median of `--repeats` calls after warm-up; prints a table, writes JSON.

    python scripts/bench_bf16.py [--repeats 20] [--out results/bench_bf16.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {"512x2048x2048": (512, 2048, 2048), "decode 16x576x1536": (16, 576, 1536)}
FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_thunks": "--xla_cpu_use_thunk_runtime=false",
}


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (compile, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def jax_child(repeats: int) -> dict:
    """Runs in a subprocess under one XLA_FLAGS: the JAX timings."""
    import jax
    import jax.numpy as jnp

    out = {}
    for name, (m, k, n) in SHAPES.items():
        kx, kw = jax.random.split(jax.random.PRNGKey(0))
        for label, dt, acc in (("f32", jnp.float32, None), ("bf16", jnp.bfloat16, None),
                               ("bf16->f32", jnp.bfloat16, jnp.float32)):
            x = jax.random.normal(kx, (m, k), dt)
            w = jax.random.normal(kw, (k, n), dt)
            f = jax.jit(lambda x, w, acc=acc: jnp.dot(x, w, preferred_element_type=acc))
            ms = _median_ms(lambda f=f, x=x, w=w: f(x, w).block_until_ready(), repeats)
            out[f"{name} {label}"] = {"ms": ms, "gflops": 2 * m * k * n / ms / 1e6}
    return out


def torch_times(repeats: int) -> dict:
    import torch

    out = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for name, (m, k, n) in SHAPES.items():
            for label, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
                x, w = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
                ms = _median_ms(lambda x=x, w=w: x @ w, repeats)
                out[f"{name} {label} ({threads} thr)"] = {"ms": ms,
                                                          "gflops": 2 * m * k * n / ms / 1e6}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=os.path.join("results", "bench_bf16.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(jax_child(args.repeats)))
        return 0
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    results = {"cpu_bf16_flags": sorted({f for f in flags if "amx" in f or f == "avx512_bf16"}),
               "jax": {}, "torch": torch_times(args.repeats), "loadavg": list(os.getloadavg())}
    for label, flags in FLAG_SETS.items():
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                               "--repeats", str(args.repeats)], env=env, capture_output=True,
                              text=True, timeout=600)
        if proc.returncode:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            results["jax"][label] = {"flags": flags, "error": tail[0][:200]}
        else:
            results["jax"][label] = {"flags": flags, **json.loads(proc.stdout.strip().splitlines()[-1])}
        print(f"jax {label}: {'error' if proc.returncode else 'ok'}", file=sys.stderr)
    print(f"CPU bf16 flags: {results['cpu_bf16_flags'] or 'none (no AMX, no AVX512-BF16)'}")
    print("| system | flags | product | ms | GFLOP/s |")
    print("|---|---|---|---:|---:|")
    for key, r in results["torch"].items():
        print(f"| torch | - | {key} | {r['ms']:.2f} | {r['gflops']:.0f} |")
    for r in results["jax"].values():
        if "error" in r:
            print(f"| jax | `{r['flags']}` | (refused: {r['error']}) | | |")
            continue
        for key, v in r.items():
            if key != "flags":
                print(f"| jax | `{r['flags'] or 'default'}` | {key} | {v['ms']:.2f} | {v['gflops']:.0f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
