"""Open-loop replay: send each request at its arrival time, never waiting for earlier ones.

Three targets: an in-process `Engine` (`replay_engine`), a gRPC worker or router
(`replay_grpc`, one asyncio task per request on one `AsyncClient` channel), and an OpenAI HTTP
server (`replay_http`: a worker's or router's --http-port, or the Ray Serve app; one asyncio task
per request, each a streamed /v1/completions on one httpx client). All return one row
(a dict) per request, in trace order. Times are measured from the request's *scheduled* arrival,
so a client that falls behind shows up as latency instead of silently lowering the load
(coordinated omission); `send_lag_s` says how late each request actually went out.

Prompts are synthesised to the trace's lengths (the traces carry no text): BOS then random token
ids from 4 up (below 4 are the byte tokenizer's control bytes), and each request asks for exactly
its trace output length with EOS ignored, so token counts match the trace.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from carajax.config import ModelConfig
from carajax.trace import TraceRequest

Row = dict
START_DELAY_S = 0.05  # time to set up before the first arrival


def synth_prompts(reqs: Sequence[TraceRequest], config: ModelConfig, seed: int = 0) -> list[list[int]]:
    """A token-id prompt of each request's length: BOS (if the model has one) then random ids in
    [4, vocab). Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    bos = [] if config.bos_token_id is None else [config.bos_token_id]
    lo = min(4, config.vocab_size - 1)
    out = []
    for r in reqs:
        n = max(1, r.prompt_tokens) - len(bos)
        out.append(bos + rng.integers(lo, config.vocab_size, max(0, n)).tolist())
    return out


def _row(i: int, r: TraceRequest, label: str) -> Row:
    return {"policy": label, "index": i, "arrival_s": r.arrival_s, "adapter": r.adapter or None,
            "rank": r.rank, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
            "tokens": 0, "send_lag_s": None, "ttft_s": None, "tpot_s": None, "latency_s": None,
            "finish_reason": None, "error": None, "cold_start": None, "cold_start_path": None,
            "cpu_prefill_tokens": 0, "stalled_s": 0.0, "worker": None, "server_ttft_s": None}


def _timing(row: Row, scheduled: float, first: float | None, last: float | None, end: float) -> None:
    """Client-side TTFT, TPOT (mean gap after the first token) and latency, from `scheduled`."""
    n = row["tokens"]
    row["ttft_s"] = None if first is None else first - scheduled
    row["latency_s"] = end - scheduled
    row["tpot_s"] = (last - first) / (n - 1) if first is not None and last is not None and n > 1 else None


class _Progress:
    """A tqdm bar over finished requests (or nothing), with the error count as its postfix."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.bar = None
        self.errors = 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"replay {label}", unit="req", dynamic_ncols=True,
                            leave=True)

    def done(self, error: bool = False) -> None:
        self.errors += error
        if self.bar is not None:
            self.bar.update(1)
            if error:
                self.bar.set_postfix(errors=self.errors)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- in-process engine --------------------------------------------------------------------------
def replay_engine(engine, reqs: Sequence[TraceRequest], prompts: Sequence[Sequence[int]], *,
                  label: str = "engine", progress: bool = False, timeout_s: float = 600.0,
                  clock: Callable[[], float] = time.monotonic) -> list[Row]:
    """Submit each request to `engine` (its loop thread running) at its arrival time; wait for
    all. Metrics come from the engine's own clock (`RequestMetrics`), re-based to the schedule."""
    from carajax.engine.request import QueueFullError, RequestError
    from carajax.engine.sampling import SamplingParams
    from carajax.server.codec import cold_start_path

    rows = [_row(i, r, label) for i, r in enumerate(reqs)]
    handles: list = [None] * len(reqs)
    bar = _Progress(len(reqs), label, progress)
    counted: set[int] = set()

    def tick() -> None:
        for i, h in enumerate(handles):
            if h is not None and i not in counted and h.done:
                counted.add(i)
                bar.done(h.result().finish_reason == "error")

    def send(i: int, r: TraceRequest) -> None:
        sampling = SamplingParams(max_tokens=r.output_tokens, temperature=0.0, stop_token_ids=())
        try:
            handles[i] = engine.submit(prompts[i], r.adapter or None, sampling, f"{label}-{i}")
        except (QueueFullError, RequestError, ValueError) as e:
            rows[i].update(error=f"{type(e).__name__}: {e}", finish_reason="error",
                           latency_s=clock() - (t0 + r.arrival_s))

    # `submit` waits for the engine lock, which a step holds (milliseconds; seconds while a step
    # compiles): submitting from a pool keeps one waiting submit from delaying the next arrival.
    with concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="replay-submit") as pool:
        t0 = clock() + START_DELAY_S
        sent = []
        for i, r in enumerate(reqs):
            while (wait := t0 + r.arrival_s - clock()) > 0:  # sleep in slices: the bar moves
                time.sleep(min(wait, 0.1))
                tick()
            rows[i]["send_lag_s"] = clock() - (t0 + r.arrival_s)
            sent.append(pool.submit(send, i, r))
        for f in sent:
            f.result()
    for i in range(len(reqs)):
        if rows[i]["error"] is not None and i not in counted:
            counted.add(i)
            bar.done(True)
    deadline = clock() + timeout_s
    while any(h is not None and not h.done for h in handles):
        if clock() > deadline:
            raise TimeoutError(f"replay {label}: requests still running after {timeout_s} s")
        time.sleep(0.05)
        tick()
    tick()
    bar.close()
    for i, h in enumerate(handles):
        if h is None:
            continue
        out, m = h.result(), h.result().metrics
        scheduled = t0 + reqs[i].arrival_s
        rows[i].update(tokens=len(out.token_ids), finish_reason=out.finish_reason, error=out.error,
                       cold_start=m.cold_start, cpu_prefill_tokens=m.cpu_prefill_tokens,
                       stalled_s=m.stalled_s, worker="engine", server_ttft_s=m.ttft_s,
                       cold_start_path=cold_start_path(out))
        # The engine stamps the last token's time as finish_time: TPOT runs to it.
        _timing(rows[i], scheduled, m.first_token_time, m.finish_time, m.finish_time or clock())
    return rows


# -- gRPC worker or router -------------------------------------------------------------------------
async def _open_loop(reqs: Sequence[TraceRequest], one) -> None:
    """Start `one(i, request, scheduled)` for each request at its arrival time (open loop: a
    slow reply never delays the next arrival); wait for all of them."""
    loop = asyncio.get_running_loop()
    tasks = []
    t0 = loop.time() + START_DELAY_S
    for i, r in enumerate(reqs):
        scheduled = t0 + r.arrival_s
        if (wait := scheduled - loop.time()) > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(i, r, scheduled)))
    await asyncio.gather(*tasks)


async def _replay_grpc(target: str, reqs: Sequence[TraceRequest], prompts, label: str, bar: _Progress,
                       timeout_s: float) -> list[Row]:
    from carajax.client import AsyncClient, ServerError

    rows = [_row(i, r, label) for i, r in enumerate(reqs)]
    loop = asyncio.get_running_loop()

    async def one(i: int, r: TraceRequest, scheduled: float) -> None:
        row = rows[i]
        row["send_lag_s"] = loop.time() - scheduled
        first = last = None
        stream = client.generate(prompts[i], r.adapter or None, max_tokens=r.output_tokens,
                                 temperature=0.0, ignore_eos=True, request_id=f"{label}-{i}",
                                 timeout=timeout_s)
        try:
            async for _ in stream:
                last = loop.time()
                first = first or last
                row["tokens"] += 1
            res = await stream.result()
        except ServerError as e:
            row.update(error=f"{e.code.name}: {e.details}", finish_reason="error")
            _timing(row, scheduled, first, last, loop.time())
            bar.done(True)
            return
        m = res.metrics
        row.update(finish_reason=res.finish_reason, cold_start=m.cold_start,
                   cold_start_path=m.cold_start_path, cpu_prefill_tokens=m.cpu_prefill_tokens,
                   stalled_s=m.stalled_s, worker=m.worker, server_ttft_s=m.ttft_s)
        _timing(row, scheduled, first, last, last or loop.time())
        bar.done(False)

    async with AsyncClient(target) as client:
        await _open_loop(reqs, one)
    return rows


def replay_grpc(target: str, reqs: Sequence[TraceRequest], prompts: Sequence[Sequence[int]], *,
                label: str = "grpc", progress: bool = False, timeout_s: float = 600.0) -> list[Row]:
    """Replay against a carajax gRPC worker or router at `target` ("host:port"). A request the
    server refuses or fails is a row with `error` set (its status code and message)."""
    bar = _Progress(len(reqs), label, progress)
    try:
        return asyncio.run(_replay_grpc(target, reqs, prompts, label, bar, timeout_s))
    finally:
        with contextlib.suppress(Exception):
            bar.close()


# -- OpenAI HTTP (a worker's or router's --http-port, or the Ray Serve app) -------------------------
def http_base(target: str) -> str:
    """`http://host:port[/v1]` -> `http://host:port` (the OpenAI paths are added here)."""
    base = target.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


def http_models(target: str, *, timeout_s: float = 60.0) -> tuple[str, set[str]]:
    """(the base model's served name, the adapters it lists) from `GET /v1/models`."""
    import httpx

    r = httpx.get(f"{http_base(target)}/v1/models", timeout=timeout_s)
    r.raise_for_status()
    cards = r.json()["data"]
    bases = [c["id"] for c in cards if not c.get("parent")]
    if not bases:
        raise ValueError(f"{target}/v1/models lists no base model (an entry without a parent)")
    return bases[0], {c["id"] for c in cards if c.get("parent")}


def http_register_adapters(target: str, paths: dict[str, str], names, *,
                           timeout_s: float = 120.0) -> list[str]:
    """Make sure the HTTP target serves every adapter in `names`: the ones it does not list are
    loaded with `POST /v1/load_lora_adapter` (paths on this machine: the target must share its
    disk and allow them, `--enable-lora-loading --adapter-root`). Returns the names it loaded.
    RuntimeError listing the missing adapters when the target cannot load them."""
    import httpx

    _, have = http_models(target, timeout_s=timeout_s)
    missing = sorted(set(n for n in names if n) - have)
    loaded = []
    for name in missing:
        r = httpx.post(f"{http_base(target)}/v1/load_lora_adapter",
                       json={"lora_name": name, "lora_path": paths[name]}, timeout=timeout_s)
        if r.status_code >= 400:
            try:
                why = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                why = r.text[:200]
            shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
            raise RuntimeError(
                f"{target} does not serve {len(missing)} adapter(s) of the trace: {shown}; loading "
                f"{name!r} through /v1/load_lora_adapter failed (HTTP {r.status_code}: {why}). Start "
                "the target with these adapters (e.g. `carajax ray --adapter-root DIR`, `carajax serve "
                "--adapters DIR`) or with --enable-lora-loading and an --adapter-root holding them")
        loaded.append(name)
    return loaded


async def _replay_http(target: str, reqs: Sequence[TraceRequest], prompts, label: str, bar: _Progress,
                       timeout_s: float, base_model: str) -> list[Row]:
    import json

    import httpx

    rows = [_row(i, r, label) for i, r in enumerate(reqs)]
    loop = asyncio.get_running_loop()
    url = f"{http_base(target)}/v1/completions"

    async def one(i: int, r: TraceRequest, scheduled: float) -> None:
        row = rows[i]
        row["send_lag_s"] = loop.time() - scheduled
        body = {"model": r.adapter or base_model, "prompt": list(prompts[i]), "max_tokens": r.output_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        first = last = None
        chunks = 0
        error = finish = None
        try:
            async with client.stream("POST", url, json=body) as resp:
                row["worker"] = resp.headers.get("x-carajax-replica")
                if resp.status_code != 200:
                    raw = await resp.aread()
                    try:
                        e = json.loads(raw)["error"]
                        error = f"HTTP {resp.status_code}: {e.get('code') or e.get('type')}: {e['message']}"
                    except (ValueError, KeyError, TypeError):
                        error = f"HTTP {resp.status_code}: {raw[:200].decode(errors='replace')}"
                else:
                    async for line in resp.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        msg = json.loads(data)
                        if "error" in msg:  # mid-stream errors are an event (as vLLM sends them)
                            e = msg["error"]
                            error = f"stream: {e.get('code') or e.get('type')}: {e.get('message')}"
                            break
                        if msg.get("usage"):
                            row["tokens"] = msg["usage"]["completion_tokens"]
                        for choice in msg.get("choices") or ():
                            now = loop.time()  # a chunk carries one or more tokens' text
                            last = now
                            first = first or now
                            chunks += 1
                            finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        if error is None and finish is None:
            error = "stream: ended without a finish_reason"
        if error is not None:
            row.update(error=error, finish_reason="error", tokens=row["tokens"] or chunks)
            _timing(row, scheduled, first, last, loop.time())
            bar.done(True)
            return
        if not row["tokens"]:  # no usage chunk: count the chunks
            row["tokens"] = chunks
        row["finish_reason"] = finish
        _timing(row, scheduled, first, last, last or loop.time())
        bar.done(False)

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits) as client:
        await _open_loop(reqs, one)
    return rows


def replay_http(target: str, reqs: Sequence[TraceRequest], prompts: Sequence[Sequence[int]], *,
                label: str = "http", progress: bool = False, timeout_s: float = 600.0,
                base_model: str | None = None) -> list[Row]:
    """Replay against an OpenAI-compatible HTTP server at `target` ("http://host:port"): a
    carajax worker or router started with --http-port, or the Ray Serve app (`carajax ray`).
    Each request is one streamed `/v1/completions` (the prompt as token ids, `model` the adapter or
    `base_model`, the base's served name, read from /v1/models when not given; EOS ignored).

    Measured by the client: TTFT is the first SSE chunk, TPOT the mean gap from the first chunk to
    the last (the finishing one) over the tokens after the first, tokens from the usage chunk.
    A chunk is sent once a token's text is non-empty, so a first token whose text is held back
    (part of a UTF-8 character) counts from the next one. HTTP carries no engine metrics:
    `cold_start`, `server_ttft_s` stay None; `worker` is Ray's `x-carajax-replica` header if sent.
    A refused or failed request is a row with `error` set ("HTTP <status>: <code>: <message>")."""
    if base_model is None:
        base_model, _ = http_models(target)
    bar = _Progress(len(reqs), label, progress)
    try:
        return asyncio.run(_replay_http(target, reqs, prompts, label, bar, timeout_s, base_model))
    finally:
        with contextlib.suppress(Exception):
            bar.close()
