"""The batch planner (host only): admits requests, plans each step, and applies its results.

A step is one forward over a flattened batch: one token for every decoding request (oldest
first), then prefill chunks, within the step's token budget (`max_step_tokens`) and the prefill
share (`max_prefill_tokens`, Sarathi's cap that keeps decodes' time per token). Decode and
prefill are the same thing here: a request owns the sequence prompt + generated tokens, of which
`num_computed` have keys and values in its KV pages; a step computes the next `length` of them,
and when it reaches the end it samples a token. So a preempted request simply recomputes its
sequence (prompt and what it generated so far) and carries on.

KV pages (`PageAllocator`): admission needs the pages of a request's first chunk (and leaves a
small watermark free); when a decoding request needs a page and none is free, the youngest
running request is preempted: its pages go back, it returns to the front of the queue, and the
batch goes on. Nothing fails for lack of memory.

It never touches device arrays. It reads adapter residency from the pool's bookkeeping to choose
each request's LoRA path for the step:
    "base"   no adapter;
    "device" its adapter is resident: the device kernels, via its slot;
    "cpu"    cold under `cpu_assist`: the base runs on the device and the LoRA delta comes from
             the CPU through host callbacks, until the copy lands (checked every step, so a
             request hands over mid-prefill at the next chunk);
    "load"   cold under `wait`: the step first loads the adapter synchronously (everyone in the
             batch waits), then runs it on the device.
Under `async` a cold request is not admitted: it stays queued while its copy runs (later requests
go ahead of it), and starts on the device once resident. Under `auto` each cold request is given
one of `cpu_assist` or `async` (`cold_start.choose`); an `async` one whose copy is about to land
(within `JOIN_LANDING_FRACTION` of a recent step) is admitted at once and the step waits for the
copy (`load`), as `wait` would: a short stall is cheaper than a whole step's delay for it. Both
start the copy when the request is submitted (`start_cold`), not when a step first considers it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable

import numpy as np

from carajax.config import EngineConfig
from carajax.engine import cold_start
from carajax.engine.kv_pages import KVLayout, PageAllocator
from carajax.engine.request import Phase, QueueFullError, Request, RequestOutput, now

# Under a time-per-token target, prompts still get this many tokens per step.
MIN_PREFILL_SHARE = 16
# `auto`: a queued cold request joins the step (which then waits for its copy) when the copy's
# predicted time left is under this fraction of a recent step. Planned while the step before
# runs (async scheduling), such a copy lands about when the step launches: little or no stall.
# Left queued, the request would join one or two steps later. Checked once a step, so a window
# of one step is the smallest that catches most landings (half a step caught about half).
JOIN_LANDING_FRACTION = 1.0


class StepTimes:
    """Recent steps' (tokens, seconds), fitted as seconds = a + b * tokens by least squares:
    what the planner asks when a time-per-token target caps the prefill share (Sarathi-Serve)."""

    def __init__(self, window: int = 128):
        self._points: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)

    def add(self, tokens: int, seconds: float) -> None:
        self._points.append((tokens, seconds))

    def fit(self) -> tuple[float, float] | None:
        """(a, b), or None until the steps seen span several token counts."""
        if len(self._points) < 8:
            return None
        t, s = np.array(self._points, np.float64).T
        if np.ptp(t) < 8:
            return None
        b, a = np.polyfit(t, s, 1)
        return float(a), float(max(b, 1e-9))

    def recent_seconds(self, n: int = 16) -> float | None:
        """Median seconds of the last `n` steps (None before any)."""
        if not self._points:
            return None
        return float(np.median([s for _, s in list(self._points)[-n:]]))

    def max_tokens(self, seconds: float) -> int | None:
        """The most tokens a step may hold to take at most `seconds` (None: no fit yet)."""
        fit = self.fit()
        if fit is None:
            return None
        a, b = fit
        return max(0, int((seconds - a) / b + 1e-6))  # 1e-6: float dust on an exact fit


@dataclasses.dataclass(frozen=True)
class SeqChunk:
    """Tokens [start, start + length) of one request's sequence, computed this step."""

    request: Request
    start: int
    length: int
    path: str  # "base" | "device" | "cpu" | "load"
    samples: bool  # the chunk reaches the sequence's end: the step draws the next token

    @property
    def is_decode(self) -> bool:
        return self.length == 1 and self.start >= len(self.request.prompt_ids)

    @property
    def prompt_tokens(self) -> int:
        """How many of the chunk's tokens are prompt tokens (the rest were generated)."""
        return max(0, min(self.start + self.length, len(self.request.prompt_ids)) - self.start)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One engine step: the chunks (decodes first) and the adapters to load first."""

    chunks: tuple[SeqChunk, ...]
    sync_loads: tuple[str, ...] = ()  # `wait` policy: load these before running (the batch waits)

    @property
    def empty(self) -> bool:
        return not self.chunks

    @property
    def requests(self) -> list[Request]:
        return [c.request for c in self.chunks]

    @property
    def decode(self) -> tuple[SeqChunk, ...]:
        return tuple(c for c in self.chunks if c.is_decode)

    @property
    def prefill(self) -> tuple[SeqChunk, ...]:
        return tuple(c for c in self.chunks if not c.is_decode)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class BatchPlanner:
    """Waiting queue (bounded), running set with KV pages, and the per-step plan."""

    def __init__(self, config: EngineConfig, layout: KVLayout, seq_len: int, pool, decode_text,
                 token_bucket: Callable[[int], int] | None = None,
                 host_path: Callable[[], cold_start.HostPath] | None = None):
        self.config = config
        self.layout = layout
        self.seq_len = seq_len  # longest context of one request (positions)
        self.pool = pool  # AdapterPool: host-side bookkeeping only (where/slot/prefetch/acquire)
        self.decode_text = decode_text
        self.pages = PageAllocator(layout.num_pages)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order: the last is the youngest
        self._order = itertools.count()
        # Free pages admission leaves for running requests to grow into (vLLM keeps ~1%).
        self.watermark = max(1, layout.num_pages // 100)
        self.preemptions = 0
        self.step_times = StepTimes()  # the engine adds every step; read under tpot_target_s
        self._preempted: list[Request] = []  # preempted during the step being planned
        # The padded token count the runner will compile a step with (mixed steps): a step
        # whose chunks fall short of it is topped up with more prompt tokens, which cost nothing.
        self.token_bucket = token_bucket
        self.host_path = host_path  # `auto`: the engine's measured view of the host path
        self.cold_paths: collections.Counter[str] = collections.Counter()  # cold requests per path
        self.joined_on_landing = 0  # `auto`'s async requests admitted as their copies landed
        # Output lengths of recently finished replies, and how many ever finished: what routers
        # learn the reply-length distribution from (sched.output_lengths).
        self.finished_outputs: collections.deque[int] = collections.deque(maxlen=256)
        self.finished_count = 0

    # -- queue -------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(f"waiting queue is full ({self.config.max_queue} requests)")
        self.waiting.append(request)
        if request.metrics.cold_path is not None:  # given at submit (`start_cold`)
            self.cold_paths[request.metrics.cold_path] += 1

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _path(self, req: Request) -> str:
        if req.adapter is None:
            return "base"
        if self.pool.slot(req.adapter) is not None:
            return "device"
        if req.metrics.cold_path == "cpu_assist":
            if self.pool.where(req.adapter) == "host":
                self.pool.prefetch(req.adapter)  # retry: the pool may have room now
            return "cpu"
        return "load"

    # -- planning ----------------------------------------------------------------------------
    def schedule(self) -> Schedule:
        """Decodes first, then prefill chunks of running requests, then admissions, each while
        the step's token budget, the prefill share and the KV pages allow."""
        self._preempted = []  # this step's; none of them comes back in it
        chunks = self._plan()
        while not chunks and len(stuck := [r for r in self.running
                                           if not self._ends_with_pending(r)]) > 1:
            # Every running request is stuck prefilling for lack of pages: free the youngest's
            # so the others can go on (it recomputes later).
            self._preempt(stuck[-1])
            chunks = self._plan()
        self._fill_bucket(chunks)
        loads = tuple(dict.fromkeys(c.request.adapter for c in chunks if c.path == "load"))
        return Schedule(tuple(chunks), loads)

    def _plan(self) -> list[SeqChunk]:
        cfg = self.config
        chunks: list[SeqChunk] = []
        budget, prefill_budget = cfg.max_step_tokens, cfg.max_prefill_tokens

        for req in [r for r in self.running if self._decoding(r)]:
            if req not in self.running or self._ends_with_pending(req):
                continue  # preempted by an older request this step, or finishes on its token
            while not self.pages.grow(req, self.layout.pages_for(req.num_computed + 1)):
                victim = self.running[-1]
                if victim is req and len(self.running) == 1:
                    # Alone and still out of pages: the whole cache is its context.
                    self._finish(req, "length", now())
                    break
                self._preempt(victim)
                if victim is req:
                    break
            if req in self.running:
                chunks.append(self._chunk(req, 1))
                budget -= 1
        prefill_budget = min(prefill_budget, self._prefill_cap(len(chunks)))

        for req in [r for r in self.running if not self._decoding(r)]:
            n = self._fit(req, min(cfg.prefill_chunk, budget, prefill_budget))
            if n > 0:
                chunks.append(self._chunk(req, n))
                budget, prefill_budget = budget - n, prefill_budget - n

        for req in list(self.waiting):
            if len(self.running) >= cfg.max_batch_size or budget <= 0:
                break
            if req in self._preempted:  # not back in the step that made room by preempting it
                break
            if self._waits_for_copy(req):
                continue  # async: queued while its copy runs; the requests behind it go ahead
            n = min(cfg.prefill_chunk, budget, prefill_budget, req.num_tokens)
            if n <= 0 or self.pages.num_free - self.layout.pages_for(n) < self.watermark:
                if self.running or chunks:
                    break
                # An empty engine admits whatever fits, watermark or not (it has the cache).
                if not self.pages.grow(req, self.layout.pages_for(max(n, 1))):
                    break
            self.waiting.remove(req)
            self._admit(req)
            n = self._fit(req, n)
            if n > 0:
                chunks.append(self._chunk(req, n))
                budget, prefill_budget = budget - n, prefill_budget - n
        return chunks

    def _fill_bucket(self, chunks: list[SeqChunk]) -> None:
        """Lengthen prefill chunks into the padding the step's token bucket would compute
        anyway (e.g. 271 tokens run as 512): more prompt tokens for the same step time."""
        if self.token_bucket is None or all(c.is_decode for c in chunks):
            return
        T = sum(c.length for c in chunks)
        room = min(self.token_bucket(T), self.config.max_step_tokens) - T
        for i, c in enumerate(chunks):
            if room <= 0:
                break
            if c.is_decode:
                continue
            n = max(c.length, self._fit(c.request, c.length + room, reserve=self.watermark))
            if n > c.length:
                room -= n - c.length
                chunks[i] = dataclasses.replace(
                    c, length=n, samples=c.start + n == c.request.num_tokens)

    def _prefill_cap(self, decodes: int) -> int:
        """Sarathi-Serve: with requests decoding and a time-per-token target, the prefill share
        is what keeps the step's predicted time under the target (at least one small chunk, so
        prompts still progress). Without either, no cap beyond max_prefill_tokens."""
        target = self.config.tpot_target_s
        if target is None or decodes == 0:
            return self.config.max_prefill_tokens
        most = self.step_times.max_tokens(target)
        if most is None:  # no fit yet: do not guess
            return self.config.max_prefill_tokens
        return max(MIN_PREFILL_SHARE, most - decodes)

    def _decoding(self, req: Request) -> bool:
        return req.generated > 0 and req.num_tokens - req.num_computed == 1

    def _ends_with_pending(self, req: Request) -> bool:
        """Its token still on the device will finish it whatever its id (max_tokens, or the
        context full): planning ahead of that token must not give it another step."""
        return bool(req.pending) and (req.generated >= req.sampling.max_tokens
                                      or req.last_position >= self.seq_len)

    def _fit(self, req: Request, n: int, reserve: int = 0) -> int:
        """Up to n of req's next tokens, as many as its pages (grown from the free ones, leaving
        `reserve` free) hold."""
        n = min(n, req.num_tokens - req.num_computed)
        if n <= 0:
            return 0
        ps = self.layout.page_size
        have = len(self.pages.table(req)) + max(0, self.pages.num_free - reserve)
        n = min(n, have * ps - req.num_computed)
        if n > 0 and not self.pages.grow(req, self.layout.pages_for(req.num_computed + n)):
            raise AssertionError("page allocator refused pages it reported free")
        return max(n, 0)

    def _chunk(self, req: Request, n: int) -> SeqChunk:
        start = req.num_computed
        return SeqChunk(req, start, n, self._path(req), samples=start + n == req.num_tokens)

    def start_cold(self, req: Request, *, submitter: bool = True) -> None:
        """Give a cold request its path (the policy's, or under `auto` the faster of CPU assist
        and waiting for the copy, by measured predictions, a disk read included) and, on the
        paths that copy while the request runs or waits (`async`, `cpu_assist`), start its copy
        now (after reading it, if it is only on disk); on the others, its read. Called on the
        submitting thread, before the request is queued: the copy then runs beside the step in
        flight instead of from the first step that considers the request. The adapter is
        `want`ed until admission, so other reads and copies do not evict it meanwhile. Touches
        only the request and the pool (whose bookkeeping is locked); `add` counts the path."""
        if (req.adapter is None or req.metrics.cold_path is not None
                or self.pool.slot(req.adapter) is not None):
            return
        policy = self.config.cold_start
        if policy == "auto":
            adapter = self.pool.adapter(req.adapter)
            choice = self.host_path().choose(adapter, len(req.prompt_ids),
                                             self.pool.copy_seconds(req.adapter),
                                             read_s=self.pool.read_seconds(req.adapter))
            req.metrics.cold_path = choice.path
            req.metrics.predicted_cpu_s = choice.cpu_s
            req.metrics.predicted_copy_s = choice.copy_s
        else:
            req.metrics.cold_path = "cpu_assist" if policy == "cpu_assist" else (
                "async" if policy == "async" else "wait")
        copies = req.metrics.cold_path in ("async", "cpu_assist")
        if copies or self.pool.where(req.adapter) == "disk":
            self.pool.want(req.adapter)
            req.wants_adapter = True
        if copies:
            # Staged on the submitter's thread, the engine's goes to the loader; False (the
            # pool is full now): retried at admission.
            self.pool.prefetch(req.adapter, here=submitter)
        else:
            self.pool.fetch(req.adapter)

    def forget(self, req: Request) -> None:
        """Undo `start_cold`'s claim for a request that was never queued (or has ended)."""
        if req.wants_adapter:
            self.pool.unwant(req.adapter)
            req.wants_adapter = False

    def _waits_for_copy(self, req: Request) -> bool:
        """Whether req stays queued for its adapter: for its read from disk on any path (or
        fails, if that read failed), for its copy under `async` (starting either if need be). A
        cold request not given its path at submit (warm then, evicted since) gets it now."""
        if req.adapter is None or self.pool.slot(req.adapter) is not None:
            return False
        if req.metrics.cold_path is None:
            self.start_cold(req, submitter=False)
            self.cold_paths[req.metrics.cold_path] += 1
        reading = self.pool.fetch(req.adapter)  # None: its weights are in host memory
        if reading is not None:
            if reading != "reading":  # the read failed: this request fails, the rest go on
                self._finish(req, "error", now(), error=reading)
            return True
        if req.metrics.cold_path != "async":
            return False
        self.pool.prefetch(req.adapter)  # no-op while loading; retried when the pool is full
        return not self._joins_on_landing(req)

    def _joins_on_landing(self, req: Request) -> bool:
        """`auto` only: whether a queued cold request's copy lands soon enough that the step
        should wait for it (see JOIN_LANDING_FRACTION)."""
        if self.config.cold_start != "auto" or self.pool.where(req.adapter) != "loading":
            return False
        step_s = self.step_times.recent_seconds()
        # Strictly under the window: a window of 0 never joins, even a copy predicted to have
        # landed that the pool has not yet seen land (its real copy may still be running).
        if step_s is None or self.pool.copy_seconds(req.adapter) >= JOIN_LANDING_FRACTION * step_s:
            return False
        self.joined_on_landing += 1
        return True

    def _admit(self, req: Request) -> None:
        if req.adapter is not None:
            if req.metrics.cold_path == "cpu_assist":
                # Start the copy now; the request begins on the CPU path either way.
                self.pool.prefetch(req.adapter)
            self.pool.acquire(req.adapter)
            self.forget(req)  # acquired: the claim at submit is no longer needed
        req.phase = Phase.PREFILL
        req.admitted = next(self._order)
        self.running.append(req)

    def _preempt(self, req: Request) -> None:
        """Take req's pages back; it returns to the front of the queue and recomputes later."""
        self.pages.free(req)
        self.running.remove(req)
        if req.adapter is not None:
            self.pool.release(req.adapter)
        req.num_computed = 0
        req.phase = Phase.WAITING
        req.metrics.preemptions += 1
        self.preemptions += 1
        self._preempted.append(req)
        self.waiting.appendleft(req)

    # -- results -----------------------------------------------------------------------------
    def commit(self, plan: Schedule) -> None:
        """The launched step's progress, known before its tokens are: every chunk's tokens are
        computed, and each sampling chunk's request has a token PENDING on the device. With
        async scheduling the next step is planned from this state while the device runs."""
        for chunk in plan.chunks:
            req = chunk.request
            if chunk.path == "cpu":
                req.metrics.cpu_prefill_tokens += chunk.prompt_tokens
                req.metrics.cpu_decode_tokens += chunk.length - chunk.prompt_tokens
            elif (chunk.path in ("device", "load") and req.metrics.cpu_prefill_tokens
                  and req.metrics.handover_token is None):
                req.metrics.handover_token = chunk.start
            req.num_computed += chunk.length
            if chunk.samples:
                req.pending += 1

    def postprocess(self, plan: Schedule, tokens: dict[Request, int], stalled_s: float,
                    failed: dict[Request, str]) -> None:
        """Apply a committed step's tokens: stream them, stop, finish, metrics. A request may
        have been preempted (it keeps its token and recomputes later) or finished (a stop
        token, a cancel) since the step was planned; then the token is dropped."""
        t = now()
        for chunk in plan.chunks:
            chunk.request.metrics.stalled_s += stalled_s
            if chunk.samples:
                chunk.request.pending -= 1
        for req, reason in failed.items():
            self._finish(req, "error", t, error=reason)
        for req, tok in tokens.items():
            if req.phase is Phase.FINISHED:
                continue
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = t
            req.output_ids.append(tok)
            if req.phase is Phase.PREFILL:
                req.phase = Phase.DECODE
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
        """Finish a queued or running request now ("cancelled"): its KV pages and adapter
        reference are free for the next step. False if no such request is in the engine."""
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
        self.forget(req)
        if req.phase is Phase.WAITING and req in self.waiting:  # preempted, its token pending
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
            self.pages.free(req)
            if req.adapter is not None:
                self.pool.release(req.adapter)
        req.phase, req.finish_reason, req.error = Phase.FINISHED, reason, error
        if reason in ("stop", "length"):  # a reply that ended on its own (not cancelled, not failed)
            self.finished_outputs.append(len(req.output_ids))
            self.finished_count += 1
        req.metrics.finish_time = t
        req.metrics.output_tokens = len(req.output_ids)
        req.handle._finish(RequestOutput(
            request_id=req.request_id, prompt_token_ids=req.prompt_ids,
            token_ids=list(req.output_ids), text=self.decode_text(req.output_ids),
            finish_reason=reason, adapter=req.adapter, metrics=req.metrics, error=error))
