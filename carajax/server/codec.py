"""Conversions between carajax.v1 messages and engine types, shared by the worker and the client.

Validation that the engine does not do itself lives here (prompt presence, seed range, request id
length, finite sampling numbers): everything the engine would accept and then fail on mid-step
must be refused at the RPC boundary, where it fails only its own request. So are requests larger
than any model serves (`RequestLimits`: prompt bytes, stop lists), before the worker tokenizes or
copies them; `max_tokens` is the engine's own limit (`EngineConfig.max_tokens_limit`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from carajax.engine.request import RequestError, RequestMetrics, RequestOutput
from carajax.engine.sampling import SamplingParams
from carajax.server import carajax_pb2 as pb

MAX_REQUEST_ID = 128
_RESIDENCY = {"host": pb.RESIDENCY_HOST, "loading": pb.RESIDENCY_LOADING,
              "device": pb.RESIDENCY_DEVICE, "disk": pb.RESIDENCY_DISK}
_PHASE = {"waiting": pb.PHASE_WAITING, "prefill": pb.PHASE_PREFILL, "decode": pb.PHASE_DECODE}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """Sizes a request may have at a server's boundary (gRPC here; the HTTP API checks the same).
    Far above what a model serves (a 128k-token context is ~0.5 MB of text), so they only stop a
    client from making the server tokenize, copy or scan an arbitrarily large request."""

    max_prompt_bytes: int = 1 << 20  # a text prompt, UTF-8
    max_prompt_tokens: int = 1 << 18  # a token-id prompt
    max_stop_token_ids: int = 64
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256  # each


LIMITS = RequestLimits()


def check_prompt(prompt: str | Sequence[int], limits: RequestLimits = LIMITS) -> None:
    """`RequestError` for an empty or oversized prompt (text or token ids)."""
    if not prompt:
        raise RequestError("empty prompt")
    if isinstance(prompt, str):
        too_long = len(prompt) > limits.max_prompt_bytes  # more characters: more bytes, no encode
        if too_long or len(prompt.encode("utf-8", "surrogatepass")) > limits.max_prompt_bytes:
            raise RequestError(f"prompt is over the limit of {limits.max_prompt_bytes} bytes")
    elif len(prompt) > limits.max_prompt_tokens:
        raise RequestError(f"prompt has {len(prompt)} token ids; at most {limits.max_prompt_tokens}")


def check_stops(token_ids: Sequence[int] = (), strings: Sequence[str] = (),
                limits: RequestLimits = LIMITS) -> None:
    """`RequestError` for too many stop token ids or stop strings, or too long a stop string."""
    if len(token_ids) > limits.max_stop_token_ids:
        raise RequestError(f"{len(token_ids)} stop token ids; at most {limits.max_stop_token_ids}")
    if len(strings) > limits.max_stop_strings:
        raise RequestError(f"{len(strings)} stop strings; at most {limits.max_stop_strings}")
    for stop in strings:
        if not stop:
            raise RequestError("empty stop string")
        if len(stop.encode("utf-8", "surrogatepass")) > limits.max_stop_string_bytes:
            raise RequestError(f"stop string of {len(stop.encode('utf-8', 'surrogatepass'))} bytes; "
                               f"at most {limits.max_stop_string_bytes}")


@dataclasses.dataclass(frozen=True)
class GenerateArgs:
    """A parsed GenerateRequest: what `Engine.submit` takes."""

    prompt: str | list[int]
    adapter: str | None
    sampling: SamplingParams
    request_id: str | None


# -- requests ---------------------------------------------------------------------------------
def sampling_message(*, max_tokens: int | None = None, temperature: float | None = None,
                     top_k: int = 0, top_p: float | None = None, seed: int | None = None,
                     stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                     ) -> pb.SamplingParams:
    """A SamplingParams message; None leaves a field unset (the worker's default)."""
    msg = pb.SamplingParams(top_k=top_k, ignore_eos=ignore_eos,
                            stop_token_ids=list(stop_token_ids or ()))
    for field, value in (("max_tokens", max_tokens), ("temperature", temperature),
                         ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(msg, field, value)
    return msg


def parse_sampling(msg: pb.SamplingParams, limits: RequestLimits = LIMITS) -> SamplingParams:
    """`RequestError` naming the field for anything the engine could not serve."""
    check_stops(msg.stop_token_ids, limits=limits)
    kw = {f: getattr(msg, f) for f in ("max_tokens", "temperature", "top_p", "seed") if msg.HasField(f)}
    for f in ("temperature", "top_p"):
        if f in kw and not math.isfinite(kw[f]):
            raise RequestError(f"sampling.{f} must be finite, got {kw[f]}")
    if "seed" in kw and not 0 <= kw["seed"] < 2**32:
        raise RequestError(f"sampling.seed must be in [0, 2^32), got {kw['seed']}")
    # stop_token_ids replace the model's EOS tokens; ignore_eos alone means "never stop early".
    stop = tuple(msg.stop_token_ids) if (msg.stop_token_ids or msg.ignore_eos) else None
    try:
        return SamplingParams(top_k=msg.top_k, stop_token_ids=stop, **kw)
    except ValueError as e:
        raise RequestError(f"invalid sampling: {e}") from None


def parse_generate(msg: pb.GenerateRequest, limits: RequestLimits = LIMITS) -> GenerateArgs:
    """A GenerateRequest -> engine arguments; `RequestError` if it is malformed or over `limits`."""
    kind = msg.WhichOneof("prompt")
    if kind is None:
        raise RequestError("missing prompt: set GenerateRequest.text or GenerateRequest.token_ids")
    raw = msg.text if kind == "text" else msg.token_ids.ids
    try:
        check_prompt(raw, limits)
    except RequestError as e:
        raise RequestError(f"{e} (GenerateRequest.{kind})") from None
    prompt: str | list[int] = raw if kind == "text" else list(raw)
    if len(msg.request_id) > MAX_REQUEST_ID:
        raise RequestError(f"request_id has {len(msg.request_id)} characters; at most {MAX_REQUEST_ID}")
    return GenerateArgs(prompt=prompt, adapter=msg.adapter_id or None,
                        sampling=parse_sampling(msg.sampling, limits), request_id=msg.request_id or None)


# -- responses --------------------------------------------------------------------------------
class IncrementalText:
    """Turns streamed token ids into printable text pieces.

    Decodes a short window (from the last emitted boundary) rather than the whole output, and
    holds text back while it ends in U+FFFD: a multi-byte character split across tokens is emitted
    once complete. The pieces concatenate to `decode(all ids)` for byte-level tokenizers.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # window start: context for tokenizers whose pieces depend on neighbours
        self._read = 0  # ids up to here have been emitted

    def add(self, token: int) -> str:
        self._ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end of the stream)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):]


def cold_start_path(out: RequestOutput) -> str:
    """How an adapter request's weights were served: "warm" (resident on arrival), "cpu_assist"
    (some of its tokens took the CPU path), "async" (cold on arrival, it waited in the queue while
    its copy ran) or "wait" (cold on arrival, no token on the CPU path: it waited for the copy in a
    step, or under cpu_assist its copy landed before its first step); "" for the base model."""
    if out.adapter is None:
        return ""
    m = out.metrics
    if not m.cold_start:
        return "warm"
    if m.cpu_prefill_tokens or m.cpu_decode_tokens:
        return "cpu_assist"
    return "async" if m.cold_path == "async" else "wait"


def metrics_message(m: RequestMetrics, *, worker: str, path: str) -> pb.RequestMetrics:
    msg = pb.RequestMetrics(prompt_tokens=m.prompt_tokens, output_tokens=m.output_tokens,
                            cpu_prefill_tokens=m.cpu_prefill_tokens,
                            cpu_decode_tokens=m.cpu_decode_tokens, cold_start=m.cold_start,
                            cold_start_path=path, stalled_s=m.stalled_s, worker=worker)
    for field in ("ttft_s", "tpot_s", "latency_s"):
        if (value := getattr(m, field)) is not None:
            setattr(msg, field, value)
    return msg


def result_message(out: RequestOutput, *, worker: str, path: str) -> pb.GenerateResult:
    return pb.GenerateResult(request_id=out.request_id, token_ids=out.token_ids, text=out.text,
                             finish_reason=out.finish_reason, adapter_id=out.adapter or "",
                             metrics=metrics_message(out.metrics, worker=worker, path=path))


# -- adapters and stats -----------------------------------------------------------------------
def adapter_infos(adapters: dict, where: dict[str, str], pool_stats: dict) -> list[pb.AdapterInfo]:
    """One AdapterInfo per adapter of `adapters` ({name: AdapterSpec}), sorted by id: `where`
    ({name: "device" | "loading" | "host"}, `AdapterPool.in_memory`; absent: on disk only),
    pins and uses from one `AdapterPool.stats()` snapshot."""
    pinned, in_use = set(pool_stats["pinned"]), pool_stats["in_use"]
    return [pb.AdapterInfo(adapter_id=name, rank=a.rank, bytes=a.nbytes,
                           where=_RESIDENCY[where.get(name, "disk")], pinned=name in pinned,
                           in_use=in_use.get(name, 0), path=a.path,
                           target_modules=list(a.target_modules))
            for name, a in sorted(adapters.items())]


def request_state(d: dict) -> pb.RequestState:
    """A running or queued request as `Engine.stats()["running"]` (or the worker) describes it."""
    return pb.RequestState(request_id=d["request_id"], adapter_id=d["adapter"] or "", rank=d["rank"],
                           phase=_PHASE.get(d["phase"], pb.PHASE_UNSPECIFIED),
                           prompt_tokens=d["prompt_tokens"], computed_tokens=d.get("computed", 0),
                           output_tokens=d.get("output_tokens", 0), max_tokens=d.get("max_tokens", 0))


def memory_message(pool_stats: dict, page_rank: int) -> pb.AdapterMemory:
    s = pool_stats
    return pb.AdapterMemory(
        device_budget_bytes=s["device_budget_bytes"], device_bytes_used=s["device_bytes_used"],
        page_bytes=s["page_bytes"], page_rank=page_rank, pages_total=s["pages_total"],
        pages_free=s["pages_free"], slots_total=s["slots_total"], slots_free=s["slots_free"],
        host_budget_bytes=s["host_budget_bytes"] or 0, host_bytes_used=s["host_bytes_used"],
        host_adapters=s["host_adapters"], disk_adapters=s["disk_only"],
        disk_read_bytes_per_s=s["read_bytes_per_s"], disk_read_latency_s=s["read_latency_ms"] / 1e3)
