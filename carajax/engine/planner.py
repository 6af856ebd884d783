"""The batch planner (host only): admits requests, plans each step, and applies its results.

It never touches device arrays. It reads adapter residency from the pool's bookkeeping to choose
each request's LoRA path for the step:
    "base"   no adapter;
    "device" its adapter is resident: the device kernels, via its slot;
    "cpu"    cold under `cpu_assist`: the base runs on the device and the LoRA delta comes from
             the CPU through host callbacks, until the copy lands (checked every step, so a
             request hands over mid-prefill at the next chunk);
    "load"   cold under `wait`: the step first loads the adapter synchronously (everyone in the
             batch waits), then runs it on the device.
"""

from __future__ import annotations

import collections
import dataclasses

from carajax.config import EngineConfig
from carajax.engine.request import Phase, QueueFullError, Request, RequestOutput, now


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    request: Request
    start: int  # first prompt position of the chunk
    length: int
    path: str  # "base" | "device" | "cpu" | "load"

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == len(self.request.prompt_ids)


@dataclasses.dataclass(frozen=True)
class DecodeItem:
    request: Request
    path: str


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One engine step: prefill chunks and decode tokens, and the adapters to load first."""

    prefill: tuple[PrefillChunk, ...]
    decode: tuple[DecodeItem, ...]
    sync_loads: tuple[str, ...]  # `wait` policy: load these before running (the batch waits)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def requests(self) -> list[Request]:
        return [c.request for c in self.prefill] + [d.request for d in self.decode]


class BatchPlanner:
    """Waiting queue (bounded), running set with KV-cache rows, and the per-step plan."""

    def __init__(self, config: EngineConfig, seq_len: int, pool, decode_text):
        self.config = config
        self.seq_len = seq_len  # KV-cache length per row
        self.pool = pool  # AdapterPool: host-side bookkeeping only (where/slot/prefetch/acquire)
        self.decode_text = decode_text
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.free_rows = list(range(config.max_batch_size))

    # -- queue -------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(f"waiting queue is full ({self.config.max_queue} requests)")
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and self.free_rows:
            req = self.waiting[0]
            if req.adapter is not None and self.config.cold_start == "cpu_assist":
                # Start the copy now; the request begins on the CPU path either way.
                self.pool.prefetch(req.adapter)
            self.waiting.popleft()
            req.row = self.free_rows.pop(0)
            req.phase = Phase.PREFILL
            if req.adapter is not None:
                self.pool.acquire(req.adapter)
            self.running.append(req)

    def _path(self, req: Request) -> str:
        if req.adapter is None:
            return "base"
        if self.pool.slot(req.adapter) is not None:
            return "device"
        if self.config.cold_start == "cpu_assist":
            if self.pool.where(req.adapter) == "host":
                self.pool.prefetch(req.adapter)  # retry: the pool may have room now
            return "cpu"
        return "load"

    # -- planning ----------------------------------------------------------------------------
    def schedule(self) -> Schedule:
        """Admit what fits, then give every running request its share of this step."""
        self._admit()
        prefill, decode = [], []
        budget = self.config.max_prefill_tokens
        for req in self.running:
            path = self._path(req)
            if req.phase is Phase.PREFILL:
                n = min(self.config.prefill_chunk, len(req.prompt_ids) - req.num_computed, budget)
                if n > 0:
                    prefill.append(PrefillChunk(req, req.num_computed, n, path))
                    budget -= n
            elif req.phase is Phase.DECODE:
                decode.append(DecodeItem(req, path))
        loads = tuple(dict.fromkeys(x.request.adapter for x in (*prefill, *decode)
                                    if x.path == "load"))
        return Schedule(tuple(prefill), tuple(decode), loads)

    # -- results -----------------------------------------------------------------------------
    def postprocess(self, plan: Schedule, tokens: dict[Request, int], stalled_s: float,
                    failed: dict[Request, str]) -> None:
        """Advance every planned request: prompt progress, new tokens, stops, metrics."""
        t = now()
        for req in plan.requests:
            req.metrics.stalled_s += stalled_s
        for chunk in plan.prefill:
            req = chunk.request
            if chunk.path == "cpu":
                req.metrics.cpu_prefill_tokens += chunk.length
            elif (chunk.path in ("device", "load") and req.metrics.cpu_prefill_tokens
                  and req.metrics.handover_token is None):
                req.metrics.handover_token = chunk.start
            req.num_computed += chunk.length
            if chunk.completes_prompt:
                req.phase = Phase.DECODE
        for item in plan.decode:
            if item.path == "cpu":
                item.request.metrics.cpu_decode_tokens += 1
        for req, reason in failed.items():
            self._finish(req, "error", t, error=reason)
        for req, tok in tokens.items():
            if req.phase is Phase.FINISHED:
                continue
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = t
            req.output_ids.append(tok)
            req.handle._push(tok)
            if tok in req.stop_ids:
                self._finish(req, "stop", t)
            elif (len(req.output_ids) >= req.sampling.max_tokens
                  or req.last_position >= self.seq_len):
                self._finish(req, "length", t)

    def fail_waiting(self, predicate, reason: str) -> None:
        """Finish queued requests matching `predicate` with an error (e.g. adapter removed)."""
        t = now()
        for req in [r for r in self.waiting if predicate(r)]:
            self.waiting.remove(req)
            self._finish(req, "error", t, error=reason)

    def cancel(self, request_id: str) -> bool:
        """Finish a queued or running request now ("cancelled"): its KV row and adapter reference
        are free for the next step. False if no such request is in the engine."""
        for req in [*self.waiting, *self.running]:
            if req.request_id == request_id:
                if req in self.waiting:
                    self.waiting.remove(req)
                self._finish(req, "cancelled", now())
                return True
        return False

    def fail_all(self, reason: str) -> None:
        """Finish every queued and running request with an error."""
        t = now()
        for req in [*self.waiting, *self.running]:
            self._finish(req, "error", t, error=reason)
        self.waiting.clear()

    def _finish(self, req: Request, reason: str, t: float, error: str | None = None) -> None:
        if req.phase is Phase.FINISHED:
            return
        if req in self.running:
            self.running.remove(req)
            self.free_rows.append(req.row)
            self.free_rows.sort()
            if req.adapter is not None:
                self.pool.release(req.adapter)
        req.phase, req.finish_reason, req.error = Phase.FINISHED, reason, error
        req.metrics.finish_time = t
        req.metrics.output_tokens = len(req.output_ids)
        req.handle._finish(RequestOutput(
            request_id=req.request_id, prompt_token_ids=req.prompt_ids,
            token_ids=list(req.output_ids), text=self.decode_text(req.output_ids),
            finish_reason=reason, adapter=req.adapter, metrics=req.metrics, error=error))
