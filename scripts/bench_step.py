"""The engine step on the paged KV cache (issue 15 "Must show"): what a decode step costs, against
the real context, the matmul floor and the cache's capacity.

Model: the same random Llama as `scripts/bench_vs_hf.py` (4 layers, hidden 512, intermediate
1376, 8 heads / 8 KV heads, vocab 32,000, float32, max_position_embeddings 4096), 8 random PEFT
adapters (ranks 8, 16, 32, 64, 8, 16, 32, 64 on q/k/v/o; request i uses adapter i % 8),
cold_start="cached" (every adapter resident: no load is timed).

Three parts, each a markdown table on stdout and a section of the JSON (`--out`):

 1. decode_vs_context: the median time of a decode step of 16 sequences (every one decoding, none
    prefilling, nothing queued) against their real context, at a fixed capacity. Engine A has
    max_seq_len 4096 and KV room for 16 x 4160 positions; engine B has max_seq_len 128. Contexts
    100, 1000, 4000 on A; 100 on B. The engines run with background=False; each step() is timed
    with perf_counter. Steps that compiled a variant are left out (the decode variant is compiled
    beforehand with `runner.dry_step`). max_tokens is chosen so the context stays in one page
    bucket while decoding (the attention reads a power-of-two bucket of pages). The 16 prompts
    prefill in lock step (prefill_chunk 32, max_step_tokens 16 x 32) so all of them start
    decoding at the same step: staggered prefills would let the first requests run past 4096
    positions before the last one decodes. Goal: A@100 / B@100 <= 1.2.
 2. matmul_floor: the step's matmuls alone for 16 decode rows, jitted in this process
    (per layer q, k, v, o 512x512, gate and up 512x1376, down 1376x512, x 4 layers, plus the
    lm_head 512x32000), against the engine's decode step at context 100 on the capacity-128
    engine. Goal: engine / floor <= 1.3. Also the physical limit: weight bytes read per step over
    a measured memory bandwidth (a 256 MB `x + 1`), FLOPs over a measured matmul GFLOP/s.
 3. kv_capacity: with the KV bytes of the old fixed-row default (8 rows x 4096 positions), how
    many Azure-conversation requests run at once. Old: 8 (one row each). Paged: the first 200
    rows of the Azure LLM 2023 conversation trace (prompt clipped to 4000, output to 512, random
    token ids) submitted at once to an engine with max_batch_size 256; the engine is stepped
    while the queue is non-empty (at most --capacity-steps steps) and len(running) is sampled
    after each step. The page count is budget / (page_size x kv_bytes_per_token) = 8 x 4096 / 16
    = 2048 pages whatever the model, so by default a tiny model runs it (concurrency is the
    planner's doing; the big model's 256-sequence steps are slow on a CPU). Goal: paged / old >= 4.

    python scripts/bench_step.py [--parts 1,2,3] [--out results/bench_step.json]
    python scripts/bench_step.py --quick        # tiny sizes, a smoke test

Progress goes to stderr. CPU timings on a shared machine are noisy: the JSON records the load
average at the start and the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE = os.path.join(ROOT, "data", "traces", "azure_llm_2023", "azure2023_conv.jsonl")
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="1,2,3", help="comma-separated: 1 (decode vs context), "
                   "2 (matmul floor), 3 (KV capacity)")
    p.add_argument("--out", default=os.path.join("results", "bench_step.json"))
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    p.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("base model (random Llama, float32)")
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--hidden", type=int, default=512)
    m.add_argument("--intermediate", type=int, default=1376)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    m.add_argument("--vocab", type=int, default=32000)
    m.add_argument("--max-positions", type=int, default=4096)
    m.add_argument("--ranks", default="8,16,32,64,8,16,32,64",
                   help="one adapter per rank, on q/k/v/o; request i uses adapter i %% n")
    d = p.add_argument_group("part 1: decode step vs context")
    d.add_argument("--batch", type=int, default=16, help="sequences decoding at once")
    d.add_argument("--capacity-a", type=int, default=4096, help="engine A's max_seq_len")
    d.add_argument("--capacity-b", type=int, default=128, help="engine B's max_seq_len")
    d.add_argument("--contexts-a", default="100,1000,4000")
    d.add_argument("--contexts-b", default="100")
    d.add_argument("--kv-slack", type=int, default=64,
                   help="KV room per sequence beyond max_seq_len (positions)")
    d.add_argument("--decode-steps", type=int, default=25,
                   help="decode steps wanted per round (fewer if the context would run out)")
    d.add_argument("--min-decode-steps", type=int, default=20)
    d.add_argument("--prefill-chunk", type=int, default=32,
                   help="prefill tokens per request per step; max_step_tokens = batch x this")
    d.add_argument("--repeats", type=int, default=2,
                   help="rounds at the shared context (A@100, B@100 alternate); others once")
    f = p.add_argument_group("part 2: matmul floor")
    f.add_argument("--floor-runs", type=int, default=200)
    f.add_argument("--copy-mb", type=int, default=256, help="array size of the bandwidth test")
    f.add_argument("--gemm-n", type=int, default=2048, help="n of the n x n x n GFLOP/s test")
    c = p.add_argument_group("part 3: KV capacity")
    c.add_argument("--trace", default=TRACE)
    c.add_argument("--capacity-requests", type=int, default=200)
    c.add_argument("--capacity-steps", type=int, default=100)
    c.add_argument("--max-prompt", type=int, default=4000)
    c.add_argument("--max-output", type=int, default=512)
    c.add_argument("--old-rows", type=int, default=8, help="the old default's max_batch_size")
    c.add_argument("--old-seq-len", type=int, default=4096, help="the old default's row length")
    c.add_argument("--capacity-batch", type=int, default=256, help="paged engine max_batch_size")
    c.add_argument("--capacity-step-tokens", type=int, default=2048,
                   help="paged engine max_step_tokens and max_prefill_tokens")
    c.add_argument("--capacity-model", choices=("tiny", "full"), default="tiny",
                   help="tiny: 2 layers, hidden 64, 4 heads / 2 KV heads, vocab 1000 (same page "
                        "count); full: the base model above")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.heads = 2, 128, 344, 4
        args.vocab, args.max_positions = 1000, 512
        args.capacity_a, args.contexts_a = 512, "100,400"
        args.decode_steps, args.min_decode_steps, args.repeats = 6, 5, 1
        args.floor_runs, args.copy_mb, args.gemm_n = 20, 32, 512
        args.capacity_requests, args.capacity_steps, args.capacity_batch = 40, 15, 64
        args.capacity_step_tokens = 512
    args.kv_heads = args.kv_heads or args.heads
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.parts = sorted({int(x) for x in args.parts.split(",") if x.strip()})
    if not set(args.parts) <= {1, 2, 3}:
        p.error("--parts takes 1, 2 and 3")
    args.contexts_a = [int(x) for x in args.contexts_a.split(",") if x.strip()]
    args.contexts_b = [int(x) for x in args.contexts_b.split(",") if x.strip()]
    return args


# -- machine ----------------------------------------------------------------------------------
def machine_info() -> dict:
    import jax

    import carajax

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT,
                               capture_output=True, timeout=10).returncode == 1 if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(), "jax": jax.__version__,
        "jax_devices": [str(dev) for dev in jax.devices()], "numpy": np.__version__,
        "git_commit": commit, "git_dirty": dirty,
        "carajax_path": os.path.dirname(os.path.abspath(carajax.__file__)),
    }


def model_config(args, *, tiny: bool = False):
    from carajax.config import ModelConfig

    if tiny:
        return ModelConfig(name="bench-tiny", vocab_size=1000, hidden_size=64, intermediate_size=128,
                           num_layers=2, num_heads=4, num_kv_heads=2,
                           max_position_embeddings=max(4096, args.old_seq_len))
    return ModelConfig(name=f"bench-{args.layers}l-{args.hidden}", vocab_size=args.vocab,
                       hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       max_position_embeddings=args.max_positions)


def write_adapters(args, config, root: str) -> dict[str, str]:
    from carajax.config import ATTENTION_MODULES
    from carajax.testing import write_random_adapter

    out = {}
    for i, rank in enumerate(args.ranks):
        name = f"a{i}_r{rank}"
        out[name] = write_random_adapter(os.path.join(root, name), config, rank=rank,
                                         target_modules=ATTENTION_MODULES,
                                         seed=args.seed * 1000 + i + 1)
    return out


def trace_count() -> int:
    from carajax.engine.runner import ModelRunner

    return sum(ModelRunner.compiled_variants().values())


def med(xs):
    return statistics.median(xs) if xs else None


def fmt(x, nd=2):
    return "n/a" if x is None else f"{x:,.{nd}f}"


# -- part 1: decode step vs context -----------------------------------------------------------
def build_engine(args, model, adapters: dict[str, str], max_seq_len: int):
    import carajax

    kvb = model.config.kv_bytes_per_token(4)
    cfg = carajax.EngineConfig(
        dtype="float32", max_seq_len=max_seq_len, max_batch_size=args.batch,
        kv_cache_bytes=args.batch * (max_seq_len + args.kv_slack) * kvb,
        prefill_chunk=args.prefill_chunk, max_step_tokens=args.batch * args.prefill_chunk,
        max_prefill_tokens=args.batch * args.prefill_chunk, cold_start="cached",
        max_lora_rank=max(64, max(args.ranks)))
    engine = carajax.Engine(model, tokenizer=None, config=cfg, background=False)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def decode_round(args, engine, label: str, context: int, round_no: int) -> dict:
    """16 requests of `context` random prompt tokens; times every step in which all of them
    decode. Returns the round's measurements."""
    import carajax
    from carajax.models.attention import KV_CHUNK_PAGES

    runner, layout = engine.runner, engine.runner.layout
    ps = layout.page_size
    # The attention reads whole chunks of KV_CHUNK_PAGES pages up to the longest context.
    chunk = KV_CHUNK_PAGES * ps
    bucket_pages = -(-(context + 1) // chunk) * chunk // ps
    max_tokens = min(args.decode_steps + 1, runner.seq_len - context)
    if max_tokens < 2:
        raise ValueError(f"{label}: context {context} leaves no room to decode "
                         f"(max_seq_len {runner.seq_len})")
    runner.dry_step(args.batch, block=1)  # compile the decode variant
    rng = np.random.default_rng([args.seed, context, round_no + 1, 17])
    names = list(engine.adapters)
    sampling = carajax.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=())
    handles = [engine.submit(rng.integers(0, engine.model_config.vocab_size, context).tolist(),
                             adapter=names[i % len(names)] if names else None, sampling=sampling)
               for i in range(args.batch)]
    times, host, compiled, untimed = [], [], 0, 0
    t_submit = time.perf_counter()
    t_first_decode = None
    step_times = getattr(engine, "_step_times", None)  # (host s, total s) per step, if exposed
    while True:
        st = engine.stats()
        run = st["running"]
        all_decoding = (st["waiting"] == 0 and len(run) == args.batch
                        and all(r["output_tokens"] + r["pending"] >= 1
                                and r["computed"] == (r["prompt_tokens"] + r["output_tokens"]
                                                      + r["pending"] - 1)
                                for r in run))
        before = trace_count()
        t0 = time.perf_counter()
        if not engine.step():
            break
        dt = time.perf_counter() - t0
        if not all_decoding:
            untimed += 1
            continue
        if t_first_decode is None:
            t_first_decode = t0
        if trace_count() != before:  # compiled a variant: not a steady-state step
            compiled += 1
            continue
        times.append(dt)
        if step_times:
            host.append(step_times[-1][0])
    outs = [h.result(timeout=60) for h in handles]
    bad = [(o.finish_reason, o.error, len(o.token_ids)) for o in outs
           if o.error or len(o.token_ids) != max_tokens]
    if bad:
        raise RuntimeError(f"{label}@{context}: requests ended badly: {bad[:4]}")
    ms = med(times) * 1e3 if times else None
    res = {"engine": label, "context": context, "round": round_no, "max_tokens": max_tokens,
           "positions_read": bucket_pages * ps, "timed_steps": len(times),
           "compile_steps_excluded": compiled, "prefill_steps": untimed,
           "prefill_s": (t_first_decode - t_submit) if t_first_decode else None,
           "step_ms_median": ms, "step_ms_min": min(times) * 1e3 if times else None,
           "step_ms_all": [round(t * 1e3, 3) for t in times],
           "host_ms_median": med(host) * 1e3 if host else None,
           "tokens_per_s": args.batch / (ms / 1e3) if ms else None,
           "enough_steps": len(times) >= args.min_decode_steps}
    log(f"  {label}@{context} round {round_no}: {fmt(ms)} ms/step over {len(times)} decode steps "
        f"(attention reads {bucket_pages * ps} positions, {compiled} compile steps left out, prefill "
        f"{untimed} steps {fmt(res['prefill_s'], 1)} s)")
    return res


def part_decode(args, model, adapters) -> dict:
    layout = {}
    engines = {}
    for label, cap, ctxs in (("B", args.capacity_b, args.contexts_b),
                             ("A", args.capacity_a, args.contexts_a)):
        if not ctxs:
            continue
        log(f"part 1: engine {label} (max_seq_len {cap}) ...")
        e = build_engine(args, model, adapters, cap)
        engines[label] = e
        lay = e.runner.layout
        layout[label] = {"max_seq_len": e.runner.seq_len, "num_pages": lay.num_pages,
                         "page_size": lay.page_size, "max_pages_per_seq": lay.max_pages_per_seq,
                         "kv_cache_bytes": e.config.kv_cache_bytes,
                         "max_step_tokens": e.config.max_step_tokens,
                         "prefill_chunk": e.config.prefill_chunk}
    rounds = []
    shared = sorted(set(args.contexts_a) & set(args.contexts_b))
    # Warm-up round at the shared context on both engines (prefill variants compile here).
    for ctx in shared:
        for label in ("B", "A"):
            log(f"  warm-up round {label}@{ctx}")
            decode_round(args, engines[label], label, ctx, -1)
    for r in range(args.repeats):
        for ctx in shared:
            for label in ("B", "A"):
                rounds.append(decode_round(args, engines[label], label, ctx, r))
    for label, ctxs in (("A", args.contexts_a), ("B", args.contexts_b)):
        for ctx in ctxs:
            if ctx not in shared:
                rounds.append(decode_round(args, engines[label], label, ctx, 0))
    for e in engines.values():
        e.close()
    del engines
    rows = []
    for label, ctxs in (("A", args.contexts_a), ("B", args.contexts_b)):
        for ctx in ctxs:
            rs = [r for r in rounds if r["engine"] == label and r["context"] == ctx]
            pooled = [t for r in rs for t in r["step_ms_all"]]
            ms = med(pooled)
            rows.append({"engine": label, "capacity": layout[label]["max_seq_len"], "context": ctx,
                         "step_ms": ms, "tokens_per_s": args.batch / (ms / 1e3) if ms else None,
                         "timed_steps": len(pooled),
                         "host_ms": med([r["host_ms_median"] for r in rs
                                         if r["host_ms_median"] is not None]),
                         "positions_read": rs[0]["positions_read"],
                         "round_medians_ms": [r["step_ms_median"] for r in rs]})
    get = {(r["engine"], r["context"]): r["step_ms"] for r in rows}
    ratios = {}
    for ctx in shared:
        a, b = get.get(("A", ctx)), get.get(("B", ctx))
        if a and b:
            ratios[f"A@{ctx}/B@{ctx}"] = a / b
    return {"batch": args.batch, "engines": layout, "rows": rows, "ratios": ratios, "goal": 1.2,
            "rounds": rounds}


def print_decode(res: dict) -> None:
    print("\n## 1. Decode step vs real context at fixed capacity\n")
    print(f"{res['batch']} sequences decoding (adapters i % 8, cached), median of the timed "
          "decode steps (engine.step() wall time).\n")
    print("| engine | max_seq_len | KV pages | context | positions read | ms/step | host ms | "
          "tokens/s | steps |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        lay = res["engines"][r["engine"]]
        print(f"| {r['engine']} | {r['capacity']} | {lay['num_pages']} | {r['context']} | "
              f"{r['positions_read']} | {fmt(r['step_ms'])} | {fmt(r['host_ms'])} | "
              f"{fmt(r['tokens_per_s'], 0)} | {r['timed_steps']} |")
    for k, v in res["ratios"].items():
        verdict = "meets" if v <= res["goal"] else "misses"
        print(f"\nRatio {k}: **{v:.3f}** ({verdict} the goal <= {res['goal']}).")


# -- part 2: matmul floor ---------------------------------------------------------------------
def timeit(fn, runs: int, warm: int = 3) -> float:
    """Median seconds of fn() (which must block)."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def part_floor(args, config, engine_ms: float | None, engine_src: str) -> dict:
    import jax
    import jax.numpy as jnp

    T, d, f, V, L = args.batch, config.hidden_size, config.intermediate_size, config.vocab_size, \
        config.num_layers
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    key = jax.random.PRNGKey(args.seed)
    shapes = [(d, q_out), (d, kv_out), (d, kv_out), (q_out, d), (d, f), (d, f), (f, d)]
    layers = []
    for _ in range(L):
        ws = []
        for s in shapes:
            key, sub = jax.random.split(key)
            ws.append(0.02 * jax.random.normal(sub, s, jnp.float32))
        layers.append(tuple(ws))
    key, sub = jax.random.split(key)
    head = 0.02 * jax.random.normal(sub, (d, V), jnp.float32)
    x = jax.random.normal(key, (T, d), jnp.float32)

    @jax.jit
    def floor(x, layers, head):
        h = x
        for wq, wk, wv, wo, wg, wu, wd in layers:
            q, k, v = h @ wq, h @ wk, h @ wv
            a = (q + jnp.tile(k + v, (1, q_out // kv_out))) @ wo
            m = (h @ wg * (h @ wu)) @ wd
            h = h + a + m
        return h @ head

    log("part 2: matmul floor ...")
    t_floor = timeit(lambda: jax.block_until_ready(floor(x, layers, head)), args.floor_runs)
    weight_params = L * sum(a * b for a, b in shapes) + d * V
    flops = 2 * T * weight_params
    weight_bytes = 4 * weight_params

    n = args.copy_mb * (1 << 20) // 4
    big = jnp.ones((n,), jnp.float32)
    add = jax.jit(lambda a: a + 1.0)
    t_copy = timeit(lambda: jax.block_until_ready(add(big)), 10 if not args.quick else 5)
    bw = 2 * n * 4 / t_copy  # read + write
    g = args.gemm_n
    ka, kb = jax.random.split(key)
    A = jax.random.normal(ka, (g, g), jnp.float32)
    B = jax.random.normal(kb, (g, g), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    t_mm = timeit(lambda: jax.block_until_ready(mm(A, B)), 5)
    gflops = 2 * g ** 3 / t_mm / 1e9
    kv_bytes_100 = T * 128 * config.kv_bytes_per_token(4)  # the 128-position bucket of part 1
    res = {"tokens": T, "floor_ms": t_floor * 1e3, "floor_runs": args.floor_runs,
           "weight_bytes": weight_bytes, "flops": flops,
           "floor_gflops_effective": flops / t_floor / 1e9,
           "floor_gbps_effective": weight_bytes / t_floor / 1e9,
           "bandwidth_gbps": bw / 1e9, "bandwidth_test": f"jit(x + 1) on {args.copy_mb} MB f32, "
                                                         "read + write bytes",
           "gemm_gflops": gflops, "gemm_test": f"{g}x{g}x{g} float32",
           "limit_bandwidth_ms": weight_bytes / bw * 1e3, "limit_compute_ms": flops / gflops / 1e6,
           "kv_bytes_context_100": kv_bytes_100,
           "limit_bandwidth_with_kv_ms": (weight_bytes + kv_bytes_100) / bw * 1e3,
           "engine_step_ms": engine_ms, "engine_source": engine_src,
           "ratio_engine_over_floor": engine_ms / (t_floor * 1e3) if engine_ms else None,
           "goal": 1.3}
    res["limit_ms"] = max(res["limit_bandwidth_ms"], res["limit_compute_ms"])
    log(f"  floor {t_floor * 1e3:.2f} ms, {bw / 1e9:.1f} GB/s, {gflops:.1f} GFLOP/s")
    return res


def print_floor(res: dict) -> None:
    print("\n## 2. Matmul floor of a 16-row decode step\n")
    print("| what | ms | note |")
    print("|---|---:|---|")
    print(f"| engine decode step, context 100 | {fmt(res['engine_step_ms'])} | "
          f"{res['engine_source']} |")
    print(f"| matmul floor (jit, same process) | {fmt(res['floor_ms'])} | "
          f"{res['tokens']} rows; {res['weight_bytes'] / 1e6:.1f} MB of weights, "
          f"{res['flops'] / 1e9:.2f} GFLOP; runs at {res['floor_gbps_effective']:.1f} GB/s, "
          f"{res['floor_gflops_effective']:.1f} GFLOP/s |")
    print(f"| bandwidth limit (weights / measured GB/s) | {fmt(res['limit_bandwidth_ms'])} | "
          f"{res['bandwidth_gbps']:.1f} GB/s ({res['bandwidth_test']}) |")
    print(f"| bandwidth limit incl. KV (128 positions x 16) | "
          f"{fmt(res['limit_bandwidth_with_kv_ms'])} | + {res['kv_bytes_context_100'] / 1e6:.1f} MB "
          "of keys and values |")
    print(f"| compute limit (FLOPs / measured GFLOP/s) | {fmt(res['limit_compute_ms'])} | "
          f"{res['gemm_gflops']:.1f} GFLOP/s ({res['gemm_test']}) |")
    r = res["ratio_engine_over_floor"]
    if r is not None:
        verdict = "meets" if r <= res["goal"] else "misses"
        print(f"\nRatio engine / floor: **{r:.3f}** ({verdict} the goal <= {res['goal']}).")


# -- part 3: KV capacity ----------------------------------------------------------------------
def part_capacity(args, base_model) -> dict:
    import carajax
    from carajax.models.weights import random_model
    from carajax.trace import clip_lengths, read_trace

    tiny = args.capacity_model == "tiny"
    model = random_model(model_config(args, tiny=True), seed=args.seed) if tiny else base_model
    mc = model.config
    kvb = mc.kv_bytes_per_token(4)
    budget = args.old_rows * args.old_seq_len * kvb
    cfg = carajax.EngineConfig(
        dtype="float32", max_seq_len=args.old_seq_len, max_batch_size=args.capacity_batch,
        kv_cache_bytes=budget, max_step_tokens=max(args.capacity_step_tokens, args.capacity_batch),
        max_prefill_tokens=args.capacity_step_tokens, max_queue=max(1024, args.capacity_requests))
    engine = carajax.Engine(model, tokenizer=None, config=cfg, background=False)
    layout = engine.runner.layout
    rows = read_trace(args.trace).requests[:args.capacity_requests]
    rows, changed = clip_lengths(rows, context_len=args.old_seq_len, max_prompt=args.max_prompt,
                                 max_output=args.max_output)
    prompts = [r.prompt_tokens for r in rows]
    outputs = [r.output_tokens for r in rows]
    # Reference points: how many of the first requests' whole contexts (prompt + output) and
    # prompts alone fit the pool's tokens at once, in arrival order.
    pool_tokens = layout.num_pages * layout.page_size

    def fit(lengths):
        used, k = 0, 0
        for n in lengths:
            used += layout.pages_for(n) * layout.page_size
            if used > pool_tokens:
                break
            k += 1
        return k

    rng = np.random.default_rng([args.seed, 31])
    handles = [engine.submit(rng.integers(0, mc.vocab_size, p).tolist(),
                             sampling=carajax.SamplingParams(max_tokens=o, temperature=0.0,
                                                             stop_token_ids=()))
               for p, o in zip(prompts, outputs)]
    log(f"part 3: {len(handles)} requests, {layout.num_pages} pages of {layout.page_size} "
        f"({mc.name}, {kvb} KV bytes/token) ...")
    series = []
    t0 = time.perf_counter()
    full_at = None
    for step in range(args.capacity_steps):
        if engine.stats()["waiting"] == 0:
            break
        if not engine.step():
            break
        st = engine.stats()
        kv = st["kv_cache"]
        series.append({"step": step, "running": len(st["running"]), "waiting": st["waiting"],
                       "pages_free": kv["pages_free"], "preemptions": kv["preemptions"],
                       "decoding": sum(r["output_tokens"] >= 1 for r in st["running"])})
        if full_at is None and kv["pages_free"] < max(1, layout.num_pages // 100) + 16:
            full_at = step
        if step % 10 == 0:
            log(f"  step {step}: running {series[-1]['running']}, waiting {st['waiting']}, "
                f"pages free {kv['pages_free']}, preemptions {kv['preemptions']}")
    wall = time.perf_counter() - t0
    st = engine.stats()
    engine.close()
    queued = [s for s in series if s["waiting"] > 0]
    running = [s["running"] for s in queued]
    steady = [s["running"] for s in queued if full_at is not None and s["step"] >= full_at]
    old = args.old_rows
    res = {"model": mc.name, "kv_bytes_per_token": kvb, "kv_budget_bytes": budget,
           "budget_from": f"old default: {old} rows x {args.old_seq_len} positions",
           "num_pages": layout.num_pages, "page_size": layout.page_size,
           "pool_tokens": pool_tokens, "requests": len(rows), "clipped": changed,
           "prompt_mean": statistics.mean(prompts), "output_mean": statistics.mean(outputs),
           "engine": {"max_batch_size": cfg.max_batch_size, "max_step_tokens": cfg.max_step_tokens,
                      "max_prefill_tokens": cfg.max_prefill_tokens,
                      "prefill_chunk": cfg.prefill_chunk, "max_seq_len": engine.runner.seq_len},
           "steps": len(series), "steps_with_queue": len(queued), "wall_s": wall,
           "pool_full_at_step": full_at,
           "old_concurrent": old,
           "paged_max": max(running) if running else None,
           "paged_median": med(running),
           "paged_median_after_full": med(steady),
           "paged_decoding_median": med([s["decoding"] for s in queued]),
           "preemptions": st["kv_cache"]["preemptions"],
           "fit_whole_contexts": fit([p + o for p, o in zip(prompts, outputs)]),
           "fit_prompts": fit(prompts),
           "series": series, "goal": 4.0}
    res["ratio_median"] = res["paged_median"] / old if running else None
    res["ratio_max"] = res["paged_max"] / old if running else None
    res["ratio_median_after_full"] = (res["paged_median_after_full"] / old
                                      if res["paged_median_after_full"] else None)
    del handles
    return res


def print_capacity(res: dict) -> None:
    print("\n## 3. KV capacity at the old default's bytes\n")
    print(f"Budget {res['kv_budget_bytes'] / 2 ** 20:.1f} MiB ({res['budget_from']}) = "
          f"{res['num_pages']} pages x {res['page_size']} = {res['pool_tokens']} positions; model "
          f"{res['model']} ({res['kv_bytes_per_token']} KV bytes/token; the page count does not "
          f"depend on it). {res['requests']} Azure conversation requests (prompt mean "
          f"{res['prompt_mean']:.0f}, output mean {res['output_mean']:.0f} after clipping), "
          f"{res['steps_with_queue']} steps with a non-empty queue; pool full from step "
          f"{res['pool_full_at_step']}.\n")
    print("| cache | running (max) | running (median) | median once full | decoding (median) | "
          "preemptions | ratio (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    o = res["old_concurrent"]
    print(f"| old fixed rows | {o} | {o} | {o} | <= {o} | 0 | 1.00 |")
    print(f"| paged | {res['paged_max']} | {fmt(res['paged_median'], 1)} | "
          f"{fmt(res['paged_median_after_full'], 1)} | {fmt(res['paged_decoding_median'], 1)} | "
          f"{res['preemptions']} | {fmt(res['ratio_median'])} |")
    print(f"\nReference: the first {res['fit_whole_contexts']} requests' whole contexts (prompt + "
          f"output) fit the pool at once, the first {res['fit_prompts']} prompts alone.")
    r = res["ratio_median"]
    if r is not None:
        verdict = "meets" if r >= res["goal"] else "misses"
        print(f"Ratio paged / old (median): **{r:.2f}** ({verdict} the goal >= {res['goal']}); "
              f"max {fmt(res['ratio_max'])}, median once full "
              f"{fmt(res['ratio_median_after_full'])}.")


# -- main -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    from carajax.models.weights import random_model

    out = {"machine": machine_info(),
           "args": {k: v for k, v in vars(args).items()}}
    config = model_config(args)
    out["model"] = {"name": config.name, "layers": config.num_layers, "hidden": config.hidden_size,
                    "intermediate": config.intermediate_size, "heads": config.num_heads,
                    "kv_heads": config.num_kv_heads, "vocab": config.vocab_size,
                    "max_positions": config.max_position_embeddings, "dtype": "float32",
                    "kv_bytes_per_token": config.kv_bytes_per_token(4),
                    "ranks": args.ranks, "cold_start": "cached"}
    log(f"model {config.name}: {config.num_params() / 1e6:.1f}M parameters")
    model = random_model(config, seed=args.seed) if {1, 2} & set(args.parts) or \
        args.capacity_model == "full" else None
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        adapters = write_adapters(args, config, tmp) if {1, 2} & set(args.parts) else {}
        if 1 in args.parts:
            out["decode_vs_context"] = part_decode(args, model, adapters)
            print_decode(out["decode_vs_context"])
        if 2 in args.parts:
            engine_ms, src = None, ""
            if "decode_vs_context" in out:
                row = next((r for r in out["decode_vs_context"]["rows"]
                            if r["engine"] == "B" and r["context"] == 100), None)
                if row:
                    engine_ms, src = row["step_ms"], "part 1, engine B (capacity 128)"
            if engine_ms is None:
                sub = argparse.Namespace(**vars(args))
                sub.contexts_a, sub.contexts_b, sub.repeats = [], [100], 1
                log("part 2: measuring the engine's decode step at context 100 (capacity 128)")
                dec = part_decode(sub, model, adapters)
                engine_ms = dec["rows"][0]["step_ms"]
                src = "engine B (capacity 128), measured for part 2"
            out["matmul_floor"] = part_floor(args, config, engine_ms, src)
            print_floor(out["matmul_floor"])
    if 3 in args.parts:
        out["kv_capacity"] = part_capacity(args, model)
        print_capacity(out["kv_capacity"])
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    out["wall_s"] = time.perf_counter() - _T0
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        log(f"wrote {args.out}")
    print(f"\nLoad average start {out['machine']['loadavg_start']}, end "
          f"{out['machine']['loadavg_end']} on {out['machine']['cpu_count']} CPUs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
