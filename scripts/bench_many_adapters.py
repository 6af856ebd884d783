"""Many adapters on one engine: N registered under a host budget, served from disk, host and device.

On the demo model (`carajax-demo`), one process, one engine: N random PEFT adapters (ranks 8, 16,
32 and 64 on q/k/v/o; written once under the cache directory and reused by later runs) are
registered under `--host-budget-mb` of host memory, then `--requests` greedy requests whose
adapters follow Zipf(`--zipf`) over all N (in a random order of the registry, so the popular
ones are mostly on disk when the requests arrive) are served. Measured:

- registration: seconds per chunk of (up to) 1,000 adapters, the first chunk against the last;
- resident memory (VmRSS of /proc/self/status) from before the first registration to after the
  requests, against the host budget;
- `Engine.stats()`: its time and its JSON size at N adapters and at 100;
- the host's time per step (planning, inputs, results: `stats()["step_host_ms"]`, the median of
  the last steps) on the same workload (`--step-requests` requests over the first 100 adapters)
  with N adapters registered and with 100;
- the requests' greedy tokens against an engine that holds only their adapters (no host budget);
- TTFT p50 / p99 by the tier a request's adapter was in when it arrived (device, its copy in
  flight, host memory, disk only), `--tier-requests` open-loop Poisson arrivals right after
  registration, against the same requests on a `cached` engine (only their adapters, all resident).

    python scripts/bench_many_adapters.py                         # 10,000 adapters, 300 requests
    python scripts/bench_many_adapters.py --adapters 1000         # a quick check
    python scripts/bench_many_adapters.py --adapters 500 --requests 50 --out /tmp/smoke.json

Prints a table and writes JSON (default data/benchmarks/many_adapters_<date>.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import time

import numpy as np

import carajax
from carajax.config import TARGET_MODULES
from carajax.replay.adapters import default_cache, random_adapters
from carajax.sched.profiler import host_info
from carajax.trace import draw_adapters

RANKS = (8, 16, 32, 64)
MODEL = "carajax-demo"
LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz      "))


def routing_stats(engine) -> dict:
    """What a replica publishes for routers, its time and size: Ray's routing stats
    (`cluster.routing.replica_stats`) and the gRPC worker's Stats message."""
    from carajax.cluster import routing
    from carajax.server.worker import CaraServeServicer

    servicer = CaraServeServicer(engine, name="bench")
    ray_stats = routing.replica_stats(engine, servicer, name="bench")
    return {"ray_ms": timed(lambda: routing.replica_stats(engine, servicer, name="bench")),
            "ray_json_bytes": len(json.dumps(ray_stats)),
            "grpc_ms": timed(lambda: servicer.Stats(None, None)),
            "grpc_bytes": servicer.Stats(None, None).ByteSize()}


def rss_bytes() -> int:
    """Resident memory of this process (VmRSS), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def make_engine(host_budget: int | None, max_queue: int) -> carajax.Engine:
    config = carajax.EngineConfig(host_lora_budget_bytes=host_budget, max_queue=max_queue)
    return carajax.Engine.from_pretrained(MODEL, config=config)


def prompts(n: int, seed: int) -> list[str]:
    """Lower-case text of 8 to 40 characters (the demo model's byte vocabulary)."""
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(LETTERS, int(k))).strip() or "abc" for k in rng.integers(8, 41, n)]


def serve(engine: carajax.Engine, texts: list[str], adapters: list[str], max_tokens: int
          ) -> tuple[list, float, float | None]:
    """All requests at once: (outputs, wall seconds, median host ms per step over its steps)."""
    engine._step_times.clear()  # this workload's steps only (the engine keeps the last 256)
    sampling = carajax.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    outs = engine.generate(texts, adapters=adapters, sampling=sampling)
    return outs, time.perf_counter() - t0, engine.stats()["step_host_ms"]


TIERS = ("device", "loading", "host", "disk")  # where a request's adapter was when it arrived


def replay(engine: carajax.Engine, texts: list[str], adapters: list[str], rate: float,
           max_tokens: int, seed: int) -> tuple[list[str], list]:
    """Open loop: each request submitted at its Poisson arrival time (`rate` per second); returns
    the tier its adapter was in at that moment (`pool.where`: on the device, its copy in flight,
    in host memory, only on disk) and the outputs."""
    gaps = np.random.default_rng([seed, 3]).exponential(1.0 / rate, len(texts))
    sampling = carajax.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    tiers, handles, t0 = [], [], time.monotonic()
    for text, name, at in zip(texts, adapters, np.cumsum(gaps) - gaps[0]):
        if (delay := t0 + at - time.monotonic()) > 0:
            time.sleep(delay)
        tiers.append(engine.pool.where(name))
        handles.append(engine.submit(text, adapter=name, sampling=sampling))
    return tiers, [h.result() for h in handles]


def ttft_by_tier(tiers: list[str], outs: list, base: list | None = None) -> dict:
    """TTFT p50 / p99 (ms) per arrival tier, and (`base`: the same requests on the `cached`
    engine) the cached engine's p50 over the same requests."""
    out = {}
    for tier in TIERS:
        idx = [i for i, t in enumerate(tiers) if t == tier]
        if not idx:
            continue
        ms = np.array([outs[i].metrics.ttft_s for i in idx]) * 1e3
        row = {"requests": len(idx), "p50_ms": float(np.median(ms)),
               "p99_ms": float(np.percentile(ms, 99))}
        if base is not None:
            row["cached_p50_ms"] = float(np.median([base[i].metrics.ttft_s for i in idx]) * 1e3)
        out[tier] = row
    return out


def device_bytes(ranks: list[int], config, page_rank: int = 16) -> int:
    """Device bytes of the paged pool for adapters of `ranks` (float32): a page is `page_rank`
    rank rows of every projection in every layer, reserved whatever the adapter targets."""
    page = page_rank * config.num_layers * sum(sum(config.projection_shape(m))
                                               for m in TARGET_MODULES) * 4
    return sum(-(-r // page_rank) for r in ranks) * page


def warm(engine: carajax.Engine, paths: dict[str, str], ranks: dict[str, int],
         max_tokens: int) -> None:
    """Compile the engine's steps and one install per rank, and run them once (adapters
    registered, a batch served, then removed), so that neither the registrations nor the memory
    measured include compilation or the first runs' buffers (~65 MB on the CPU backend)."""
    names = [f"warm-{n}" for n in (next(n for n in paths if ranks[n] == r) for r in RANKS
                                   if r in ranks.values())]
    for n in names:
        engine.add_adapter(n, paths[n.removeprefix("warm-")])
    engine.warmup()
    adapters = [None, *names] * 8
    serve(engine, prompts(len(adapters), seed=-1 % 2**32), adapters, max_tokens)
    for n in names:
        engine.remove_adapter(n)


def timed(fn, repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--adapters", type=int, default=10_000, help="adapters to register")
    ap.add_argument("--requests", type=int, default=300, help="Zipf-popular requests over them")
    ap.add_argument("--zipf", type=float, default=1.8, help="Zipf exponent of adapter popularity")
    ap.add_argument("--host-budget-mb", type=float, default=256, help="host_lora_budget_bytes, MiB")
    ap.add_argument("--step-requests", type=int, default=200,
                    help="requests over the first 100 adapters timing the host's work per step")
    ap.add_argument("--max-tokens", type=int, default=12, help="tokens generated per request")
    ap.add_argument("--tier-requests", type=int, default=300,
                    help="open-loop Zipf requests for TTFT per tier (0: skip)")
    ap.add_argument("--rate", type=float, default=10.0, help="their Poisson arrivals per second")
    ap.add_argument("--cache", default=str(default_cache()), help="where the adapter files live")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default: data/benchmarks/"
                                                "many_adapters_<date>.json)")
    args = ap.parse_args()
    n, budget = args.adapters, int(args.host_budget_mb * (1 << 20))
    if n < 100:
        ap.error("--adapters must be at least 100 (the baseline engine holds 100)")

    # The adapters: ranks drawn once per name, files written once and reused.
    ids, rank_table = draw_adapters(args.requests, n, args.zipf, RANKS, seed=args.seed)
    names = [f"m{i:05d}" for i in range(n)]
    ranks = dict(zip(names, map(int, rank_table)))
    probe = carajax.Engine.from_pretrained(MODEL)
    config = probe.model_config
    probe.close()
    t0 = time.perf_counter()
    paths = random_adapters(ranks, config, cache=args.cache, seed=args.seed)
    file_bytes = sum(os.path.getsize(os.path.join(p, "adapter_model.safetensors"))
                     for p in paths.values())
    print(f"{n} adapter files ready under {args.cache} in {time.perf_counter() - t0:.1f} s "
          f"({file_bytes / 1e9:.2f} GB)")
    texts = prompts(args.requests, args.seed)
    # Popularity is unrelated to registration order: the popular adapters lie anywhere in the
    # registry, most of them past what the host budget took in at registration (on disk).
    order = np.random.default_rng([args.seed, 2]).permutation(n)
    wanted = [names[order[i]] for i in ids]
    step_ids, _ = draw_adapters(args.step_requests, 100, args.zipf, RANKS, seed=args.seed + 1)
    step_texts, step_adapters = prompts(args.step_requests, args.seed + 1), [names[i] for i in step_ids]
    max_queue = max(1024, args.requests, args.step_requests)

    # N adapters under the host budget.
    engine = make_engine(budget, max_queue)
    warm(engine, paths, ranks, args.max_tokens)
    rss0 = rss_bytes()
    chunk = min(1000, n // 5)
    chunks = []
    for start in range(0, n - n % chunk, chunk):
        t0 = time.perf_counter()
        for name in names[start:start + chunk]:
            engine.add_adapter(name, paths[name])
        chunks.append(time.perf_counter() - t0)
    for name in names[len(chunks) * chunk:]:
        engine.add_adapter(name, paths[name])
    rss_registered = rss_bytes()
    stats = engine.stats()
    stats_n = {"ms": timed(engine.stats), "json_bytes": len(json.dumps(stats, default=str))}
    routing_n = routing_stats(engine)
    # TTFT per tier, first: the registry as registration left it (the host budget's worth of
    # adapters in host memory, none on the device).
    tier_ids, _ = draw_adapters(args.tier_requests, n, args.zipf, RANKS, seed=args.seed + 2)
    tier_adapters = [names[order[i]] for i in tier_ids]
    tier_texts = prompts(args.tier_requests, args.seed + 2)
    tiers, tier_outs = (replay(engine, tier_texts, tier_adapters, args.rate, args.max_tokens,
                               args.seed) if args.tier_requests else ([], []))
    outs, wall, host_ms_zipf = serve(engine, texts, wanted, args.max_tokens)
    rss_served = rss_bytes()
    pool = engine.stats()["adapters"]
    serve(engine, step_texts, step_adapters, args.max_tokens)  # warm: reads, copies
    _, _, host_ms_n = serve(engine, step_texts, step_adapters, args.max_tokens)
    engine.close()

    # The same step workload with 100 adapters registered.
    small = make_engine(budget, max_queue)
    warm(small, paths, ranks, args.max_tokens)
    for name in names[:100]:
        small.add_adapter(name, paths[name])
    stats_100 = {"ms": timed(small.stats), "json_bytes": len(json.dumps(small.stats(), default=str))}
    routing_100 = routing_stats(small)
    serve(small, step_texts, step_adapters, args.max_tokens)
    _, _, host_ms_100 = serve(small, step_texts, step_adapters, args.max_tokens)
    small.close()

    # The reference: an engine holding only the requests' adapters, all in host memory.
    ref = make_engine(None, max_queue)
    for name in dict.fromkeys(wanted):
        ref.add_adapter(name, paths[name])
    ref_outs, _, _ = serve(ref, texts, wanted, args.max_tokens)
    ref.close()
    mismatched = [i for i, (a, b) in enumerate(zip(outs, ref_outs))
                  if a.token_ids != b.token_ids or a.finish_reason != b.finish_reason]

    # `cached`: the tier stream on an engine holding only its adapters, all on the device.
    by_tier = {}
    if args.tier_requests:
        distinct = list(dict.fromkeys(tier_adapters))
        cached = carajax.Engine.from_pretrained(MODEL, config=carajax.EngineConfig(
            cold_start="cached", max_queue=max_queue, max_loras=len(distinct) + 8,
            device_lora_budget_bytes=device_bytes([ranks[a] for a in distinct], config)))
        warm(cached, paths, ranks, args.max_tokens)
        for name in distinct:
            cached.add_adapter(name, paths[name])
        _, cached_outs = replay(cached, tier_texts, tier_adapters, args.rate, args.max_tokens,
                                args.seed)
        cached.close()
        by_tier = ttft_by_tier(tiers, tier_outs, cached_outs)
        by_tier["all, cached engine"] = ttft_by_tier(["device"] * len(cached_outs),
                                                     cached_outs)["device"]

    growth = max(rss_registered, rss_served) - rss0
    result = {
        "model": MODEL, "adapters": n, "adapter_file_bytes": file_bytes,
        "requests": args.requests, "zipf": args.zipf,
        "distinct_adapters_requested": len(set(wanted)), "host_budget_bytes": budget,
        "registration": {"chunk": chunk, "seconds": chunks, "first_s": chunks[0],
                         "last_s": chunks[-1], "last_over_first": chunks[-1] / chunks[0]},
        "rss": {"before_bytes": rss0, "registered_bytes": rss_registered,
                "served_bytes": rss_served, "growth_bytes": growth,
                "growth_over_budget": growth / budget},
        "stats": {"at_n": stats_n, "at_100": stats_100},
        "routing_stats": {"at_n": routing_n, "at_100": routing_100},
        "host_ms_per_step": {"at_n": host_ms_n, "at_100": host_ms_100,
                             "ratio": host_ms_n / host_ms_100 if host_ms_100 else None,
                             "zipf_run_at_n": host_ms_zipf},
        "serving": {"wall_s": wall, "errors": sum(o.finish_reason == "error" for o in outs),
                    "reads": pool["reads"], "read_failures": pool["read_failures"],
                    "read_bytes_per_s": pool["read_bytes_per_s"],
                    "read_latency_ms": pool["read_latency_ms"],
                    "host_bytes_used": pool["host_bytes_used"], "disk_only": pool["disk_only"]},
        "outputs_equal_to_reference": not mismatched, "mismatched_requests": mismatched,
        "ttft_by_tier": {"requests": args.tier_requests, "rate_per_s": args.rate,
                         "errors": sum(o.finish_reason == "error" for o in tier_outs),
                         "tiers": by_tier},
        "date": datetime.date.today().isoformat(), "host": host_info(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, cwd=os.path.dirname(__file__)).stdout.strip(),
        "command": "python scripts/bench_many_adapters.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
    }
    rows = [
        ("registration, first chunk", f"{chunks[0]:.2f} s / {chunk}"),
        ("registration, last chunk", f"{chunks[-1]:.2f} s / {chunk}  ({chunks[-1] / chunks[0]:.2f}x)"),
        ("RSS growth", f"{growth / 2**20:.0f} MiB = {growth / budget:.2f}x the "
                       f"{budget / 2**20:.0f} MiB budget"),
        ("stats() at N / at 100", f"{stats_n['ms']:.2f} ms, {stats_n['json_bytes']} B / "
                                  f"{stats_100['ms']:.2f} ms, {stats_100['json_bytes']} B"),
        ("routing stats at N / at 100 (Ray; gRPC Stats)",
         f"{routing_n['ray_ms']:.2f} ms, {routing_n['ray_json_bytes']} B; {routing_n['grpc_ms']:.2f} ms, "
         f"{routing_n['grpc_bytes']} B / {routing_100['ray_ms']:.2f} ms, "
         f"{routing_100['ray_json_bytes']} B; {routing_100['grpc_ms']:.2f} ms, "
         f"{routing_100['grpc_bytes']} B"),
        ("host ms per step at N / 100", f"{host_ms_n:.2f} / {host_ms_100:.2f} "
                                        f"({result['host_ms_per_step']['ratio']:.2f}x)"),
        (f"{args.requests} Zipf requests", f"{wall:.1f} s, {pool['reads']} disk reads, "
                                            f"{result['serving']['errors']} errors"),
        ("outputs = reference engine", f"{not mismatched} ({len(mismatched)} differ)"),
    ]
    print(f"\n{MODEL}: {n} adapters, host budget {budget / 2**20:.0f} MiB")
    for k, v in rows:
        print(f"  {k:<30} {v}")
    if by_tier:
        print(f"\n  TTFT by where the adapter was at arrival ({args.tier_requests} requests, "
              f"Poisson {args.rate}/s, Zipf {args.zipf}); ms")
        print(f"  {'tier':<20} {'requests':>8} {'p50':>8} {'p99':>8} {'cached p50':>11}")
        for tier, r in by_tier.items():
            print(f"  {tier:<20} {r['requests']:>8} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                  f"{r.get('cached_p50_ms', float('nan')):>11.1f}")
    out = args.out or os.path.join(os.path.dirname(__file__), "..", "data", "benchmarks",
                                   f"many_adapters_{result['date']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
