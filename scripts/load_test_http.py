"""Closed-loop load test of the OpenAI-compatible HTTP API with the official `openai` client.

    python scripts/load_test_http.py                            # starts a carajax-demo worker here
    python scripts/load_test_http.py --clients 8 --duration 30
    python scripts/load_test_http.py --target http://127.0.0.1:8000 --api-key KEY

N client threads each send one streamed completion at a time for `--duration` seconds: a random
word's demo prompt (`word=`) to a random model (the base or one of its adapters), greedy. The
demo model's answers are checkable (carajax/demo/tasks.py), so every reply is verified, not just
counted: a request is *lost* if it neither answered nor failed, *duplicated* if two replies share
an id or the server counted more requests than the clients sent, *wrong* if its text is not the
task's answer. Prints a table (throughput, TTFT / latency percentiles at the client) and saves JSON.
Without --target it starts a worker in this process: the demo engine (`cached` adapters, warmed
up) behind gRPC and the HTTP API on loopback, and also checks the worker's own request counters.
"""

from __future__ import annotations

import argparse
import collections
import json
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def start_worker(max_batch: int):
    """The demo engine behind gRPC + HTTP in this process; returns (url, worker, closer)."""
    from carajax import demo
    from carajax.config import EngineConfig
    from carajax.server.http import serve_http
    from carajax.server.worker import serve

    engine = demo.engine(EngineConfig(cold_start="cached", max_batch_size=max_batch))
    engine.warmup()
    worker = serve(engine, 0, host="127.0.0.1", name="w0")
    http = serve_http(worker, 0, host="127.0.0.1")

    def close():
        http.stop(grace=0)
        worker.stop(grace=0)
        engine.close()

    return http.url, worker, close


def run(url: str, clients: int, duration: float, seed: int, api_key: str | None) -> dict:
    import openai

    from carajax import demo

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", max_retries=0,
                           timeout=120)
    models = [m.id for m in client.models.list()]
    tasks = {name: demo.TASKS.get(name, demo.ECHO) for name in models}
    lock = threading.Lock()
    rows: list[dict] = []
    errors: collections.Counter[str] = collections.Counter()
    sent = [0]
    stop_at = time.monotonic() + duration

    def loop(i: int) -> None:
        rng = np.random.default_rng(seed + i)
        words = demo.random_words(512, seed + 1000 * i)
        while time.monotonic() < stop_at:
            word, model = words[int(rng.integers(len(words)))], models[int(rng.integers(len(models)))]
            with lock:
                sent[0] += 1
            t0 = time.monotonic()
            first, pieces, rid, finish, tokens = None, [], None, None, 0
            try:
                stream = client.completions.create(
                    model=model, prompt=demo.prompt(word), temperature=0, max_tokens=16,
                    stream=True, stream_options={"include_usage": True})
                for chunk in stream:
                    rid = rid or chunk.id
                    for choice in chunk.choices:
                        if choice.text:
                            first = first or time.monotonic()
                            pieces.append(choice.text)
                        finish = choice.finish_reason or finish
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
            except openai.APIError as e:
                with lock:
                    errors[type(e).__name__] += 1
                continue
            t1 = time.monotonic()
            text = "".join(pieces)
            with lock:
                rows.append({"id": rid, "model": model, "word": word, "text": text,
                             "ok": text == tasks[model].fn(word),
                             "finish": finish, "tokens": tokens, "latency_s": t1 - t0,
                             "ttft_s": (first or t1) - t0})

    t0 = time.monotonic()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    pct = lambda key: {f"p{q}": float(np.percentile([r[key] for r in rows], q))  # noqa: E731
                       for q in (50, 90, 99)} if rows else {}
    ids = [r["id"] for r in rows]
    return {"target": url, "clients": clients, "duration_s": duration, "wall_s": wall,
            "sent": sent[0], "answered": len(rows), "errors": dict(errors),
            "lost": sent[0] - len(rows) - sum(errors.values()),
            "duplicate_ids": len(ids) - len(set(ids)),
            "wrong": sum(not r["ok"] for r in rows),  # the model's own errors, not the server's
            "wrong_examples": [{k: r[k] for k in ("model", "word", "text")} for r in rows
                               if not r["ok"]][:20],
            "finish_reasons": dict(collections.Counter(r["finish"] for r in rows)),
            "per_model": dict(collections.Counter(r["model"] for r in rows)),
            "throughput_rps": len(rows) / wall, "tokens_per_s": sum(r["tokens"] for r in rows) / wall,
            "ttft_s": pct("ttft_s"), "latency_s": pct("latency_s")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="base URL of a running server (default: start "
                    "a carajax-demo worker in this process)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--max-batch", type=int, default=8, help="(own worker) KV rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "results" / "load_test_http.json"))
    args = ap.parse_args(argv)
    url, worker, close = args.target, None, None
    if url is None:
        print(f"starting a carajax-demo worker (cached adapters, max batch {args.max_batch}) and "
              "warming it up...", flush=True)
        url, worker, close = start_worker(args.max_batch)
        before = worker.servicer.metrics.snapshot()["requests"]
    try:
        doc = run(url, args.clients, args.duration, args.seed, args.api_key)
        if worker is not None:  # the server's own count of what it finished, by outcome
            after = worker.servicer.metrics.snapshot()["requests"]
            doc["server_counted"] = {k: v - before.get(k, 0) for k, v in after.items()
                                     if v - before.get(k, 0)}
    finally:
        if close is not None:
            close()
    ms = lambda d: " / ".join(f"{v * 1e3:.0f}" for v in d.values()) or "-"  # noqa: E731
    print(f"\n{doc['clients']} clients for {doc['wall_s']:.0f} s against {url}")
    print("| sent | answered | errors | lost | duplicated ids | wrong answers | req/s | tokens/s | "
          "TTFT p50/p90/p99 ms | latency p50/p90/p99 ms |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---|---|")
    print(f"| {doc['sent']} | {doc['answered']} | {doc['errors'] or 0} | {doc['lost']} | "
          f"{doc['duplicate_ids']} | {doc['wrong']} | {doc['throughput_rps']:.1f} | "
          f"{doc['tokens_per_s']:.0f} | {ms(doc['ttft_s'])} | {ms(doc['latency_s'])} |")
    print(f"per model: {doc['per_model']}; finish reasons: {doc['finish_reasons']}")
    if doc["wrong_examples"]:
        print("wrong answers (model, word -> text): " + ", ".join(
            f"{w['model']} {w['word']} -> {w['text']!r}" for w in doc["wrong_examples"]))
    if "server_counted" in doc:
        print(f"the worker counted: {doc['server_counted']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
