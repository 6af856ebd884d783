"""The engine's decode step on a GPU against its bandwidth roofline, with and without LoRA (issue 17).

Model: a preset (default `llama2-7b`) with random weights in bfloat16. For every batch size B
(default 1, 8, 32) and context C (default 512, 2048) it times the engine's jitted step (the
runner's `_step` + the sampler, exactly what `ModelRunner.launch` dispatches) on a decode-only
batch: B sequences of C cached positions each decoding one token, the KV pages written straight
into the cache (no prefill is run: a decode step's cost does not depend on what the cache
holds). Two variants per shape:
  - base: no adapter registered (the engine's base-only variant);
  - lora: 32 adapters of ranks evenly spread over 8..64 on q, k, v, o, resident in the device
    pool (`cold_start="cached"`); sequence i uses adapter i % 32, so a batch of 32 has 32
    distinct adapters (a batch of 1 or 8 has 1 or 8).

Per shape it reports the step time (`step_ms`: k back-to-back steps over k, the device-bound
rate; `step_ms_synced`: the median of single steps each waited for, launch latency included)
and the roofline: the bytes a decode step must read (every weight matrix except the embedding
table, of which only B rows; the B x C cached keys and values; the used adapters' pages) over
the copy bandwidth measured in the same process (a jitted `x + 1` over a large array: 2 bytes
moved per byte). `lora_over_base` = lora step / base step - 1 (the issue's goal: <= 0.15 with
32 distinct adapters).

It also times the paged attention alone on one layer's shapes (`paged_attention`, impl "pallas"
and "reference" on a GPU; "interpret" and "reference" with --cpu) against the same roofline of
its KV bytes.

    python3 scripts/bench_gpu_decode.py --out $OUT/gpu_check.json        # on a GPU (H200)
    python scripts/bench_gpu_decode.py --cpu --out /tmp/gpu_check.json   # CPU smoke test

The JSON is rewritten after every measurement, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The progress log is bench_step's (this script's directory is on sys.path when it runs).
from bench_step import log  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true",
                   help="smoke test on CPU: llama-test, float32, batches 1 2, contexts 16 40")
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--ranks", default="8,64", help="lo,hi: adapter ranks evenly spread over it")
    p.add_argument("--steps", type=int, default=20, help="back-to-back steps per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--copy-mb", type=int, default=2048, help="array size of the bandwidth test")
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--out", default=os.path.join("results", "gpu_check.json"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cpu:
        args.model, args.dtype = "llama-test", "float32"
        args.batches, args.contexts, args.adapters = "1,2", "16,40", 4
        args.steps, args.repeats, args.copy_mb = 3, 2, 64
    args.batches = [int(x) for x in args.batches.split(",")]
    args.contexts = [int(x) for x in args.contexts.split(",")]
    lo, hi = (int(x) for x in args.ranks.split(","))
    args.rank_list = [int(round(r)) for r in np.linspace(lo, hi, args.adapters)]
    return args


def commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT,
                               capture_output=True, timeout=10).returncode == 1
        return (out + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    return getattr(d, "device_kind", None) or str(d)


def copy_bandwidth(mb: int) -> float:
    """Bytes/s of a jitted `x + 1` over an `mb` MiB array (read + write), best of 5."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((mb << 20) // 4, jnp.float32)
    f = jax.jit(lambda x: x + 1)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best


def random_adapter(name: str, config, rank: int, base: dict):
    """An in-memory adapter of `rank` on q/k/v/o: slices of shared random arrays (the timing
    needs distinct pool pages, not distinct numbers; writing 32 7B adapters to disk would not
    fit the GPU session's minutes)."""
    from carajax.lora.adapter import LoraAdapter, LoraModule

    modules = {(layer, m): LoraModule(a=base[m][0][:rank], b=base[m][1][:, :rank], scale=2.0)
               for layer in range(config.num_layers) for m in base}
    return LoraAdapter(name=name, path=f"<random {name}>", modules=modules)


def build_engine(args, model, with_lora: bool):
    import carajax
    from carajax.config import ATTENTION_MODULES, TARGET_MODULES

    config = model.config
    itemsize = np.dtype(args.dtype if args.dtype != "bfloat16" else np.float16).itemsize
    max_ctx = max(args.contexts) + 1
    page = 16
    seq_room = -(-max_ctx // page) * page
    pages_needed = sum(-(-r // page) for r in args.rank_list) if with_lora else 1
    per_rank = sum(sum(config.projection_shape(m)) for m in TARGET_MODULES) * config.num_layers
    cfg = carajax.EngineConfig(
        dtype=args.dtype, max_seq_len=seq_room, max_batch_size=max(args.batches),
        kv_cache_bytes=max(args.batches) * seq_room * config.kv_bytes_per_token(itemsize),
        cold_start="cached", max_lora_rank=max(64, max(args.rank_list)), lora_page_rank=page,
        kv_page_size=page, max_loras=max(64, args.adapters),
        device_lora_budget_bytes=(pages_needed + 1) * page * per_rank * itemsize)
    engine = carajax.Engine(model, tokenizer=None, config=cfg, background=False)
    names = []
    if with_lora:
        rng = np.random.default_rng(args.seed)
        r_max = max(args.rank_list)
        base = {m: ((rng.standard_normal((r_max, config.projection_shape(m)[0])) * 0.02
                     ).astype(np.float32),
                    (rng.standard_normal((config.projection_shape(m)[1], r_max)) * 0.02
                     ).astype(np.float32))
                for m in ATTENTION_MODULES}
        for i, rank in enumerate(args.rank_list):
            name = f"a{i}_r{rank}"
            adapter = random_adapter(name, config, rank, base)
            engine.pool.register(adapter)
            engine.pool.load_now(name)
            names.append(name)
    return engine, names


def decode_inputs(engine, names, batch: int, context: int):
    """The runner's step arguments for `batch` sequences of `context` cached positions, each
    decoding one token (positions `context`), in distinct pages; sequence i uses names[i % n]."""
    from carajax.models.llama import StepBatch

    runner = engine.runner
    S = runner.config.max_batch_size
    T = runner.token_bucket(batch, decode_only=True)
    ps, P = runner.layout.page_size, runner.table_width
    seq_pages = -(-(context + 1) // ps)
    assert batch * seq_pages <= runner.layout.num_pages, "KV cache too small"
    tables = np.zeros((S, P), np.int32)
    for s in range(batch):
        tables[s, :seq_pages] = np.arange(s * seq_pages, (s + 1) * seq_pages)
    slots = np.full(T, -1, np.int32)
    slots[:batch] = tables[:batch, context // ps] * ps + context % ps
    qs = np.full(S + 1, batch, np.int32)
    qs[:batch + 1] = np.arange(batch + 1)
    seq_lens = np.zeros(S, np.int32)
    seq_lens[:batch] = context + 1
    positions = np.zeros(T, np.int32)
    positions[:batch] = context
    R = min(T, S)
    step_batch = StepBatch(tokens=np.arange(T, dtype=np.int32) % 100, positions=positions,
                           slots=slots, block_tables=tables, seq_lens=seq_lens, query_starts=qs,
                           logit_rows=np.minimum(np.arange(R, dtype=np.int32), max(batch - 1, 0)))
    seg_slots = np.full(S, -1, np.int32)
    for s in range(batch):
        if names:
            seg_slots[s] = engine.pool.slot(names[s % len(names)])
    args, kwargs = runner._dry_args(T, 1, None)  # the runner's own argument order and knobs
    args = list(args)
    args[4], args[5] = step_batch, seg_slots
    return args, kwargs, R, sorted({names[s % len(names)] for s in range(batch)}) if names else []


def time_steps(engine, args, kwargs, R: int, steps: int, repeats: int) -> tuple[float, float]:
    """(ms per step back to back, median ms of a single waited-for step)."""
    import jax

    from carajax.engine import runner as runner_mod

    S = engine.runner.config.max_batch_size
    sampling = runner_mod._greedy(R)

    def one(args):
        logits, cache = runner_mod._step(*args, **kwargs)
        args[3] = cache
        return runner_mod._sample(logits, sampling, S)

    jax.block_until_ready(one(args))  # compile
    jax.block_until_ready(one(args))
    rates, singles = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            out = one(args)
        jax.block_until_ready(out)
        rates.append((time.perf_counter() - t) / steps)
        t = time.perf_counter()
        jax.block_until_ready(one(args))
        singles.append(time.perf_counter() - t)
    return statistics.median(rates) * 1e3, statistics.median(singles) * 1e3


def weight_bytes(engine, batch: int) -> int:
    """Bytes of the base weights a decode step reads: all but the embedding table (B rows)."""
    import jax

    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(engine.runner.state)
                if hasattr(x, "nbytes"))
    c = engine.model_config
    row = c.hidden_size * np.dtype(engine.runner.dtype).itemsize
    return total - c.vocab_size * row + batch * row


def lora_bytes(config, ranks: list[int], itemsize: int) -> int:
    """Bytes of the used adapters' pages on q/k/v/o (pages of 16 rank rows, A and B)."""
    from carajax.config import ATTENTION_MODULES

    per_row = sum(sum(config.projection_shape(m)) for m in ATTENTION_MODULES) * config.num_layers
    return sum(-(-r // 16) * 16 for r in ranks) * per_row * itemsize


def attention_bench(args, config, bw: float, res: dict, save) -> None:
    """One layer's paged attention at each (batch, context), per impl, against its KV bytes."""
    import functools

    import jax
    import jax.numpy as jnp

    from carajax.models.attention import paged_attention

    impls = ("interpret", "reference") if args.cpu else ("pallas", "reference")
    dtype = jnp.dtype(args.dtype)
    ps, kvh, hd, H = 16, config.num_kv_heads, config.head_dim, config.num_heads
    rows = res.setdefault("attention", [])
    for batch in args.batches:
        for context in args.contexts:
            L = context + 1
            sp = -(-L // ps)
            N = batch * sp + 1
            P = -(-(max(args.contexts) + 1) // ps)
            key = jax.random.key(1)
            k = jax.random.normal(key, (N, kvh, ps, hd), dtype)
            v = jax.random.normal(jax.random.fold_in(key, 1), (N, kvh, ps, hd), dtype)
            T = max(batch, 8)
            q = jax.random.normal(jax.random.fold_in(key, 2), (T, H, hd), dtype)
            tables = np.zeros((batch, P), np.int32)
            tables[:, :sp] = np.arange(batch * sp).reshape(batch, sp)
            seq_lens = np.full(batch, L, np.int32)
            qs = np.arange(batch + 1, dtype=np.int32)
            kv_bytes = 2 * batch * L * kvh * hd * dtype.itemsize
            row = {"batch": batch, "context": context, "kv_bytes": kv_bytes,
                   "roofline_ms": kv_bytes / bw * 1e3}
            outs = {}
            for impl in impls:
                f = jax.jit(functools.partial(paged_attention, impl=impl, query_block=1))
                try:
                    outs[impl] = f(q, k, v, tables, seq_lens, qs).block_until_ready()
                    ts = []
                    for _ in range(args.repeats):
                        t = time.perf_counter()
                        for _ in range(args.steps):
                            o = f(q, k, v, tables, seq_lens, qs)
                        o.block_until_ready()
                        ts.append((time.perf_counter() - t) / args.steps)
                    row[f"{impl}_ms"] = statistics.median(ts) * 1e3
                except Exception as e:  # noqa: BLE001 - one impl failing must not lose the rest
                    row[f"{impl}_error"] = f"{type(e).__name__}: {e}"[:500]
            if len(outs) == 2:
                a, b = (np.asarray(o.astype(jnp.float32), np.float64) for o in outs.values())
                row["max_rel_diff"] = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
            kernel_ms = row.get(f"{impls[0]}_ms")
            row["kernel_over_roofline"] = kernel_ms / row["roofline_ms"] if kernel_ms else None
            rows.append(row)
            log(f"attention b{batch} c{context}: " + ", ".join(
                f"{i} {row.get(f'{i}_ms', float('nan')):.3f} ms" for i in impls)
                + f", roofline {row['roofline_ms']:.3f} ms")
            save()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu:  # before JAX starts: the smoke test runs on the CPU even where a GPU is
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp

    from carajax.config import ModelConfig
    from carajax.models import weights

    res = {"device": device_name(), "backend": jax.default_backend(), "jax": jax.__version__,
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "commit": commit(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "script": os.environ.get("GPU_CHECK_COMMAND"),
           "model": args.model, "dtype": args.dtype, "batches": args.batches,
           "contexts": args.contexts, "adapter_ranks": args.rank_list,
           "definitions": {
               "decode_step_ms": "base model, no adapters: k back-to-back steps / k",
               "decode_step_ms_lora": "the same with adapters on q/k/v/o, sequence i using "
                                      "adapter i % n (n distinct adapters at batch >= n)",
               "roofline_ms": "(weight bytes except the embedding table + B x context KV bytes) "
                              "/ copy bandwidth; the lora roofline adds the used adapters' bytes",
               "lora_over_base": "decode_step_ms_lora / decode_step_ms - 1"},
           "decode": [], "decode_step_ms": {}, "decode_step_ms_lora": {}, "roofline_ms": {},
           "roofline_ms_lora": {}, "lora_over_base": {}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    log(f"device {res['device']} ({res['backend']}), jax {jax.__version__}")
    bw = copy_bandwidth(args.copy_mb)
    res["copy_bandwidth_gbps"] = bw / 1e9
    log(f"copy bandwidth {bw / 1e9:.1f} GB/s")
    save()
    config = ModelConfig.from_name(args.model)
    if not args.skip_attention:
        attention_bench(args, config, bw, res, save)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    itemsize = jnp.dtype(dtype).itemsize
    t = time.perf_counter()
    model = weights.random_model(config, dtype=dtype, seed=args.seed)
    log(f"random {args.model} ({args.dtype}) in {time.perf_counter() - t:.1f} s")
    for with_lora in (False, True):
        tag = "lora" if with_lora else "base"
        t = time.perf_counter()
        engine, names = build_engine(args, model, with_lora)
        log(f"engine {tag}: {len(names)} adapters resident in {time.perf_counter() - t:.1f} s, "
            f"attention impl 'auto' -> {'pallas' if jax.default_backend() == 'gpu' else 'reference'}"
            f", LoRA impl {engine.runner.lora_impl}")
        for batch in args.batches:
            for context in args.contexts:
                step_args, kwargs, R, used = decode_inputs(engine, names, batch, context)
                t = time.perf_counter()
                ms, ms_synced = time_steps(engine, step_args, kwargs, R, args.steps, args.repeats)
                engine.runner.cache = step_args[3]  # the donated cache lives on in the args
                kv = batch * (context + 1) * config.kv_bytes_per_token(itemsize)
                wb = weight_bytes(engine, batch)
                lb = lora_bytes(config, [args.rank_list[names.index(n)] for n in used],
                                itemsize) if used else 0
                roof = (wb + kv + lb) / bw * 1e3
                key = f"b{batch}_c{context}"
                res["decode"].append({"variant": tag, "batch": batch, "context": context,
                                      "adapters": len(used), "step_ms": ms,
                                      "step_ms_synced": ms_synced, "weight_bytes": wb,
                                      "kv_bytes": kv, "lora_bytes": lb, "roofline_ms": roof,
                                      "step_over_roofline": ms / roof,
                                      "seconds_with_compile": time.perf_counter() - t})
                if with_lora:
                    res["decode_step_ms_lora"][key] = ms
                    res["roofline_ms_lora"][key] = roof
                    base = res["decode_step_ms"].get(key)
                    if base:
                        res["lora_over_base"][key] = ms / base - 1
                else:
                    res["decode_step_ms"][key] = ms
                    res["roofline_ms"][key] = roof
                log(f"{tag} b{batch} c{context}: {ms:.3f} ms/step (single {ms_synced:.3f}), "
                    f"roofline {roof:.3f} ms ({ms / roof:.2f}x)"
                    + (f", lora/base - 1 = {res['lora_over_base'][key]:+.3f}"
                       if with_lora and key in res["lora_over_base"] else ""))
                save()
        engine.close()
        # Drop the last step's arguments too: they hold the KV cache (tens of GB on a 7B), which
        # must be freed before the next engine allocates its own.
        del engine, step_args
    print(json.dumps({k: res[k] for k in ("device", "copy_bandwidth_gbps", "decode_step_ms",
                                          "roofline_ms", "lora_over_base")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
