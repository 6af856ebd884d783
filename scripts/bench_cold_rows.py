"""What cold rows cost the step that carries them (issue 16 item 2), through the real runner.

Four steps of the same shape under `cold_start="cpu_assist"`: B warm decode rows, plus one prefill
chunk of C tokens whose adapter is

    none      (no chunk: the decodes alone)
    no-lora   the same rows with no adapter at all (the base model's step: LoRA's share is the rest)
    warm      on the device (the callback-free step variant)
    cold      still on the host: only the chunk's C rows cross to the CPU (gathered on the
              device, one grouped host callback per projection group and layer, deltas scattered
              back); the warm rows' LoRA stays on the device
    all-cold  every row cold (B + 1 adapters on the host): the old behaviour's worst case, where
              every row of the step crosses

and reports each step's median wall time, and (cold - warm) / layers: what one layer pays for
carrying cold rows, the price the B warm rows beside them wait out. Steps without cold rows run
the callback-free variant, so they pay nothing (the `warm` row is that variant).

    python scripts/bench_cold_rows.py [--model llama-test] [--batch 8] [--chunk 64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np

import carajax
from carajax.config import ATTENTION_MODULES, TARGET_MODULES
from carajax.engine.planner import Schedule, SeqChunk
from carajax.testing import write_random_adapter


def time_step(engine, chunks, repeats: int) -> float:
    """Median seconds of prepare + launch + collect for one hand-made step."""
    runner, planner = engine.runner, engine.planner
    for req, start, n, _ in chunks:
        if not planner.pages.grow(req, runner.layout.pages_for(start + n)):
            raise RuntimeError("the KV cache is too small for this step (raise kv_cache_bytes)")
    plan = Schedule(tuple(SeqChunk(req, start, n, path, samples=start + n == req.num_tokens)
                          for req, start, n, path in chunks))
    cpu_ids = {req.adapter: engine._cpu_id(req.adapter) for req, _, _, path in chunks
               if path == "cpu"}  # CPU assist's views of their host copies
    times = []
    for _ in range(repeats + 2):  # two untimed: caches, threads, the CPU worker's weights
        t0 = time.perf_counter()
        inputs = runner.prepare(plan, planner.pages.table, cpu_ids)
        tokens = runner.launch(inputs)[0]
        _, failed = runner.collect(plan, inputs, tokens, cpu_ids)
        times.append(time.perf_counter() - t0)
        if failed:
            raise RuntimeError(f"CPU LoRA failed: {failed}")
    for req, *_ in chunks:
        planner.pages.free(req)
    return statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-test")
    p.add_argument("--batch", type=int, default=8, help="warm decode rows")
    p.add_argument("--chunk", type=int, default=64, help="prefill chunk tokens")
    p.add_argument("--context", type=int, default=100, help="decode rows' context")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="results/bench_cold_rows.json")
    args = p.parse_args()

    mc = carajax.ModelConfig.from_name(args.model)
    B, C = args.batch, args.chunk
    config = carajax.EngineConfig(
        cold_start="cpu_assist", max_batch_size=B + 1, prefill_chunk=C, min_prefill_bucket=C,
        max_step_tokens=B + C, max_prefill_tokens=C, max_lora_rank=args.rank, max_loras=2 * B + 4,
        max_seq_len=max(args.context + 2, C + 1) * 2,
        # room for the B + 1 warm adapters (the cold ones never load)
        device_lora_budget_bytes=(B + 2) * args.rank * mc.num_layers * 4 * sum(
            sum(mc.projection_shape(m)) for m in TARGET_MODULES))
    engine = carajax.Engine.from_pretrained(args.model, dtype="float32", config=config)
    rng = np.random.default_rng(0)
    names = [f"warm{i}" for i in range(B + 1)] + [f"cold{i}" for i in range(B + 1)]
    with tempfile.TemporaryDirectory() as d, engine:
        for k, name in enumerate(names):
            engine.add_adapter(name, write_random_adapter(os.path.join(d, name), mc, rank=args.rank,
                                                          seed=k, target_modules=ATTENTION_MODULES))
        print(f"compiling ({args.model}) ...", flush=True)
        engine.warmup()
        for i in range(B + 1):
            engine.pool.load_now(f"warm{i}")
        sp = carajax.SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=())

        def req(adapter: str, n: int):
            return engine._make_request(rng.integers(4, mc.vocab_size, n).tolist(), adapter, sp, None)

        decoders = [req(f"warm{i}", args.context + 1) for i in range(B)]
        cold_decoders = [req(f"cold{i}", args.context + 1) for i in range(B)]
        chunk_warm, chunk_cold = req(f"warm{B}", C), req(f"cold{B}", C)
        dec = [(r, args.context, 1, "device") for r in decoders]
        base = [req(None, args.context + 1) for _ in range(B)] + [req(None, C)]
        cases = {
            "none": dec,
            "no-lora": [(r, args.context, 1, "base") for r in base[:B]] + [(base[B], 0, C, "base")],
            "warm": dec + [(chunk_warm, 0, C, "device")],
            "cold": dec + [(chunk_cold, 0, C, "cpu")],
            "all-cold": [(r, args.context, 1, "cpu") for r in cold_decoders] + [(chunk_cold, 0, C, "cpu")],
        }
        results = {}
        for name, chunks in cases.items():
            results[name] = time_step(engine, chunks, args.repeats)
            print(f"  {name:<9} {1e3 * results[name]:8.2f} ms", flush=True)
    L = mc.num_layers
    per_layer = {k: (results[k] - results["warm"]) / L for k in ("cold", "all-cold")}
    print(f"\n{args.model} ({L} layers), {B} warm decode rows (context {args.context}) + one "
          f"{C}-token prefill chunk, rank {args.rank}, {os.cpu_count()} CPUs, median of {args.repeats}")
    print(f"{'step':<10} {'ms':>8} {'vs warm':>9} {'per layer (ms)':>15}")
    for k, v in results.items():
        extra = per_layer.get(k)
        print(f"{k:<10} {1e3 * v:8.2f} {v / results['warm']:8.2f}x "
              f"{'' if extra is None else f'{1e3 * extra:15.3f}'}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "device": str(jax.devices()[0]),
                   "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg()),
                   "jax": jax.__version__, "args": vars(args), "step_s": results,
                   "extra_per_layer_s": per_layer}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
