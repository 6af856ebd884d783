"""Closed-loop load test of a carajax gRPC endpoint (router or worker).

    python scripts/load_test.py                          # starts 2 workers + a router on loopback
    python scripts/load_test.py --target 127.0.0.1:50050 --clients 32 --duration 60

N client threads each send one request at a time (random prompt, random adapter from the target's
ListAdapters or the base model) for `--duration` seconds. Prints throughput, TTFT / time-per-token
/ latency percentiles measured at the client, and error counts by status code; saves JSON.
Without --target it builds the cluster in this process: two llama-test workers (random weights,
`--adapters` random PEFT adapters of mixed ranks each) behind the router, all on loopback.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def start_cluster(n_workers: int, n_adapters: int, policy: str, cold_start: str, max_batch: int):
    """In-process workers + router; returns (router address, closer)."""
    from carajax import Engine, EngineConfig, ModelConfig
    from carajax.config import TARGET_MODULES
    from carajax.server.router import serve_router, wait_until_healthy
    from carajax.server.worker import serve
    from carajax.testing import write_random_adapter

    root = Path(tempfile.mkdtemp(prefix="carajax-load-"))
    cfg = ModelConfig.from_name("llama-test")
    ranks = [8, 16, 32, 64]
    dirs = {f"a{i}": write_random_adapter(root / f"a{i}", cfg, rank=ranks[i % 4], seed=i,
                                          target_modules=TARGET_MODULES) for i in range(n_adapters)}
    engines, workers = [], []
    for w in range(n_workers):
        eng = Engine.from_pretrained("llama-test", config=EngineConfig(
            cold_start=cold_start, max_batch_size=max_batch, prefill_chunk=64,
            emulated_link_gbps=16.0, emulated_link_latency_ms=5.0))
        for name, d in dirs.items():
            eng.add_adapter(name, d)
        eng.warmup()
        engines.append(eng)
        workers.append(serve(eng, 0, host="127.0.0.1", name=f"w{w}"))
    router = serve_router([w.address for w in workers], 0, policy=policy, poll_interval=0.2)
    wait_until_healthy(router, n_workers)

    def close():
        router.stop(grace=0)
        for w in workers:
            w.stop(grace=0)
        for e in engines:
            e.close()

    return router.address, close


def run(target: str, clients: int, duration: float, max_tokens: int, seed: int) -> dict:
    from carajax.client import Client, ServerError

    client = Client(target, timeout=120)
    adapters = [None, *[a.adapter_id for a in client.list_adapters()]]
    lock = threading.Lock()
    rows: list[dict] = []
    errors: collections.Counter[str] = collections.Counter()
    stop_at = time.monotonic() + duration

    def loop(i: int) -> None:
        rng = np.random.default_rng(seed + i)
        while time.monotonic() < stop_at:
            prompt = [2, *rng.integers(4, 256, int(rng.integers(8, 120))).tolist()]
            adapter = adapters[int(rng.integers(len(adapters)))]
            t0 = time.monotonic()
            first = None
            try:
                stream = client.generate(prompt, adapter, max_tokens=max_tokens, temperature=0.0,
                                         ignore_eos=True)
                n = 0
                for _ in stream:
                    n += 1
                    first = first or time.monotonic()
                res = stream.result()
            except ServerError as e:
                with lock:
                    errors[e.code.name] += 1
                continue
            t1 = time.monotonic()
            with lock:
                rows.append({"ttft_s": first - t0, "latency_s": t1 - t0, "tokens": n,
                             "tpot_s": (t1 - first) / max(1, n - 1), "worker": res.metrics.worker,
                             "cold_start": res.metrics.cold_start})

    t0 = time.monotonic()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        from tqdm import tqdm

        with tqdm(total=int(duration), desc="load", unit="s") as bar:
            while any(t.is_alive() for t in threads):
                time.sleep(1.0)
                bar.n = min(int(duration), int(time.monotonic() - t0))
                bar.set_postfix(done=len(rows), errors=sum(errors.values()))
                bar.refresh()
    finally:
        for t in threads:
            t.join()
    wall = time.monotonic() - t0
    pct = lambda key: {f"p{q}": float(np.percentile([r[key] for r in rows], q)) for q in (50, 90, 99)}  # noqa: E731
    return {"target": target, "clients": clients, "duration_s": duration, "wall_s": wall,
            "requests": len(rows), "errors": dict(errors),
            "throughput_rps": len(rows) / wall, "tokens_per_s": sum(r["tokens"] for r in rows) / wall,
            "ttft_s": pct("ttft_s") if rows else {}, "tpot_s": pct("tpot_s") if rows else {},
            "latency_s": pct("latency_s") if rows else {},
            "per_worker": dict(collections.Counter(r["worker"] for r in rows)),
            "cold_starts": sum(r["cold_start"] for r in rows)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="host:port of a router or worker (default: "
                    "start 2 workers + a router in this process)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="(own cluster) workers")
    ap.add_argument("--adapters", type=int, default=16, help="(own cluster) adapters per worker")
    ap.add_argument("--policy", default="carajax", help="(own cluster) routing policy")
    ap.add_argument("--cold-start", default="cpu_assist", help="(own cluster) engine policy")
    ap.add_argument("--max-batch", type=int, default=8, help="(own cluster) KV rows per worker")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "results" / "load_test.json"))
    args = ap.parse_args(argv)
    close = None
    target = args.target
    if target is None:
        print(f"starting {args.workers} llama-test workers ({args.adapters} adapters each, "
              f"cold start {args.cold_start}, emulated 16 GB/s link) and a {args.policy} router...")
        target, close = start_cluster(args.workers, args.adapters, args.policy, args.cold_start,
                                      args.max_batch)
    try:
        doc = run(target, args.clients, args.duration, args.max_tokens, args.seed)
    finally:
        if close is not None:
            close()
    ms = lambda d: " / ".join(f"{v * 1e3:.1f}" for v in d.values()) or "-"  # noqa: E731
    print(f"\n{doc['clients']} clients for {doc['wall_s']:.0f} s against {target}")
    print("| requests | errors | req/s | tokens/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | "
          "latency p50/p90/p99 ms | per worker |")
    print("|---:|---|---:|---:|---|---|---|---|")
    print(f"| {doc['requests']} | {doc['errors'] or 0} | {doc['throughput_rps']:.1f} | "
          f"{doc['tokens_per_s']:.0f} | {ms(doc['ttft_s'])} | {ms(doc['tpot_s'])} | "
          f"{ms(doc['latency_s'])} | {doc['per_worker']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
