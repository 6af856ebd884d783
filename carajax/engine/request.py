"""Requests as the engine sees them, their metrics, results, and the handle a caller streams from."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

from carajax.engine.sampling import SamplingParams


class RequestError(ValueError):
    """A request that cannot be served as given (empty or too long prompt, bad token ids, ...)."""


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its bound; retry later or send the request elsewhere."""


class Phase(enum.Enum):
    WAITING = "waiting"  # queued (or preempted), no KV pages
    PREFILL = "prefill"  # running; prompt (or, after a preemption, earlier) tokens to compute
    DECODE = "decode"  # generating one token per step
    FINISHED = "finished"


@dataclasses.dataclass
class RequestMetrics:
    """Times are `time.monotonic()` seconds; durations in seconds."""

    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    cpu_prefill_tokens: int = 0  # prompt tokens whose LoRA delta came from the CPU
    cpu_decode_tokens: int = 0  # generated tokens computed with CPU LoRA (copy still in flight)
    cold_start: bool = False  # its adapter was not on the device when it arrived
    handover_token: int | None = None  # prompt position where the device took over from the CPU
    stalled_s: float = 0.0  # time its steps spent blocked on synchronous adapter loads
    preemptions: int = 0  # times its KV pages were taken back (it recomputed them later)
    # A cold request's path ("cpu_assist" | "async" | "wait"; None: warm or no adapter) and, under
    # `auto`, the two predictions it was chosen by (seconds; see carajax/engine/cold_start.py).
    cold_path: str | None = None
    predicted_cpu_s: float | None = None
    predicted_copy_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency_s(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.finish_time is None or self.first_token_time is None or self.output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.output_tokens - 1)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(ttft_s=self.ttft_s, tpot_s=self.tpot_s, latency_s=self.latency_s)
        return d


@dataclasses.dataclass
class RequestOutput:
    """The result of one request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens (a stop token, if hit, is the last)
    text: str  # generated text, special tokens left out ("" without a tokenizer)
    finish_reason: str  # "stop", "length" (max_tokens or context full), "cancelled" or "error"
    adapter: str | None
    metrics: RequestMetrics
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """Engine-side state of one request (owned by the scheduler)."""

    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    sampling: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    metrics: RequestMetrics
    handle: RequestHandle
    phase: Phase = Phase.WAITING
    num_computed: int = 0  # tokens (prompt, then generated) whose keys/values are in the cache
    output_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    admitted: int = -1  # admission order while running: the youngest is preempted first
    # Tokens sampled for it still on the device (async scheduling: step N + 1 is planned and
    # launched before N's tokens are read, so 1 while planning, 2 for a moment after); their ids
    # are PENDING on the host until read.
    pending: int = 0
    wants_adapter: bool = False  # holds a `want` on its adapter (queued, copy started at submit)

    @property
    def generated(self) -> int:
        """Tokens generated so far, the one still on the device included."""
        return len(self.output_ids) + self.pending

    @property
    def num_tokens(self) -> int:
        """Tokens of its sequence so far: the prompt and what it generated."""
        return len(self.prompt_ids) + self.generated

    @property
    def last_position(self) -> int:
        """Cache position of the newest token (the next decode input)."""
        return self.num_tokens - 1

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of the sequence (prompt, then generated; PENDING for the token
        still on the device)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        ids = self.prompt_ids[start:] + self.output_ids[max(start - n, 0):end - n]
        return ids + [PENDING] * (end - start - len(ids))


# The host's id for a token sampled on the device and not read yet (never a vocabulary id): the
# runner feeds the step's input from the previous step's device output instead.
PENDING = -1
_DONE = object()


class RequestHandle:
    """Streams a request's tokens as they are produced; `result()` waits for the whole output.

    Iterate it (`for tok in handle`) or, in asyncio, `async for tok in handle`.
    """

    def __init__(self, request_id: str, on_cancel: Callable[[str], bool] | None = None):
        self.request_id = request_id
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._output: RequestOutput | None = None
        self._on_cancel = on_cancel

    # -- engine side ----------------------------------------------------------------------
    def _push(self, token: int) -> None:
        self._tokens.put(token)

    def _finish(self, output: RequestOutput) -> None:
        self._output = output
        self._done.set()
        self._tokens.put(_DONE)

    # -- caller side ----------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> bool:
        """Stop the request: it finishes with reason "cancelled" and its KV-cache row is freed
        before the engine's next step. False if it had already finished."""
        return not self.done and self._on_cancel is not None and self._on_cancel(self.request_id)

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish in {timeout}s")
        assert self._output is not None
        return self._output

    def __iter__(self) -> Iterator[int]:
        while (item := self._tokens.get()) is not _DONE:
            yield item

    async def __aiter__(self) -> AsyncIterator[int]:
        loop = asyncio.get_running_loop()
        while (item := await loop.run_in_executor(None, self._tokens.get)) is not _DONE:
            yield item

    async def aresult(self) -> RequestOutput:
        return await asyncio.get_running_loop().run_in_executor(None, self.result)


def now() -> float:
    return time.monotonic()
