"""Forward-pass timings of the model on this device: compile time, 128-token prefill, decode step.

    python scripts/bench_forward.py [--models llama-test llama-100m] [--tokens 128] [--repeats 10]

For each model, with and without a LoRA adapter (rank 16 on all seven projections): the first
call's time (trace + compile + run), the median of `--repeats` steady-state calls, and how many
compiled variants one `generate` call triggers. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np

import carajax
from carajax.config import TARGET_MODULES
from carajax.testing import run_chunks, write_random_adapter


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of the following `repeats` calls in seconds)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bench_model(name: str, tokens: int, repeats: int, dtype: str, tmp: str) -> list[dict]:
    engine = carajax.Engine.from_pretrained(name, dtype=dtype)
    path = write_random_adapter(os.path.join(tmp, name), engine.model_config, rank=16,
                                target_modules=TARGET_MODULES)
    engine.add_adapter("r16", path)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, engine.model_config.vocab_size, tokens).tolist()
    rows = []
    for adapter in (None, "r16"):
        # One sequence through the engine's runner: its whole prompt as one prefill step, then
        # one decode step of its last token (as the engine would run them; both sync on logits).
        req = engine._make_request(ids, adapter, None, None)
        before = dict(engine.compiled_variants())
        first, med = _timed(lambda r=req: run_chunks(engine, [(r, 0, tokens - 1)]), repeats)
        d_first, d_med = _timed(lambda r=req: run_chunks(engine, [(r, tokens - 1, 1)]), repeats)
        engine.planner.pages.free(req)
        after = engine.compiled_variants()
        # A fresh generate with another prompt length in the same bucket compiles nothing new.
        engine.generate([ids[:-3]], adapters=[adapter],
                        sampling=carajax.SamplingParams(max_tokens=8, temperature=0.0))
        rows.append({
            "model": name, "params_m": engine.model_config.num_params() / 1e6, "dtype": dtype,
            "adapter": adapter or "-", "tokens": tokens,
            "prefill_first_s": first, "prefill_ms": med * 1e3,
            "decode_first_s": d_first, "decode_ms": d_med * 1e3,
            "variants_per_generate": sum(after.values()) - sum(before.values()),
            "new_variants_second_generate": sum(engine.compiled_variants().values())
            - sum(after.values()),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama-test", "llama-100m"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="results/bench_forward.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for m in args.models for r in bench_model(m, args.tokens, args.repeats,
                                                             args.dtype, tmp)]
    device = jax.devices()[0]
    header = (f"{'model':<11} {'params':>7} {'lora':>5} {'first prefill':>14} "
              f"{'prefill ms':>11} {'decode ms':>10} {'variants':>9}")
    print(f"device: {device.platform} ({device.device_kind}), {os.cpu_count()} cores, "
          f"jax {jax.__version__}; {args.tokens}-token prefill, median of {args.repeats}")
    print(header)
    for r in rows:
        print(f"{r['model']:<11} {r['params_m']:>6.1f}M {r['adapter']:>5} "
              f"{r['prefill_first_s']:>13.2f}s {r['prefill_ms']:>11.2f} {r['decode_ms']:>10.2f} "
              f"{r['variants_per_generate']:>9}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "device": str(device),
                   "device_kind": device.device_kind, "platform": platform.platform(),
                   "cpu_count": os.cpu_count(), "jax": jax.__version__, "rows": rows}, f,
                  indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
