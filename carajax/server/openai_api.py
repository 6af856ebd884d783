"""The OpenAI wire format: request models (pydantic), response bodies, the error shape, and the
translation of a request into a carajax `GenerateRequest`.

What is honoured (everything else a request may carry is ignored, as OpenAI's own server ignores
fields it does not know): `model` (the base model's served name or an adapter's), `prompt` (one:
text or token ids), `messages` (rendered by the model's chat template), `max_tokens` /
`max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop` (strings), `stream`,
`stream_options.include_usage`; vLLM's extensions `top_k`, `stop_token_ids`, `ignore_eos` and
`chat_template_kwargs`. Refused with 400 rather than silently ignored, because the answer would
not be what was asked: `n` or `best_of` other than 1, `echo`, `logprobs`, `suffix`, `tools`,
`logit_bias`, and non-zero presence or frequency penalties.

Errors are `{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes; the
`openai` client raises its matching exception class (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, 5xx InternalServerError).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Literal

import grpc
from pydantic import BaseModel, Field

from carajax.engine.request import RequestError
from carajax.server import carajax_pb2 as pb
from carajax.server import codec

Code = grpc.StatusCode
# A gRPC status from the worker or router servicer -> (HTTP status, OpenAI error type).
HTTP_STATUS = {
    Code.INVALID_ARGUMENT: (400, "invalid_request_error"),
    Code.ALREADY_EXISTS: (400, "invalid_request_error"),  # vLLM: loading a loaded adapter is a 400
    Code.FAILED_PRECONDITION: (400, "invalid_request_error"),
    Code.OUT_OF_RANGE: (400, "invalid_request_error"),
    Code.UNAUTHENTICATED: (401, "authentication_error"),
    Code.PERMISSION_DENIED: (403, "permission_error"),
    Code.NOT_FOUND: (404, "not_found_error"),
    Code.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    Code.UNAVAILABLE: (503, "service_unavailable"),
    Code.DEADLINE_EXCEEDED: (504, "timeout"),
}
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}  # as vLLM names them


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, details: str) -> ApiError:
        status, kind = HTTP_STATUS.get(code, (500, "server_error"))
        return cls(status, details, type=kind, code=code.name.lower())

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HttpLimits:
    """What one HTTP request may ask for. Bodies over `max_body_bytes` are refused (413) before
    they are read whole or parsed; the rest are checked after parsing, before any tokenizing.
    Prompt and stop sizes are gRPC's (`codec.RequestLimits`), so both front ends refuse alike."""

    max_body_bytes: int = 2 << 20  # a max_prompt_bytes prompt, JSON-escaped, fits
    max_tokens: int = 4096  # the worker's EngineConfig.max_tokens_limit when serving one
    max_messages: int = 1024
    max_streams: int = 512  # generations in flight on this HTTP server; over it: 429
    request: codec.RequestLimits = codec.LIMITS

    def __post_init__(self):
        for f in ("max_body_bytes", "max_tokens", "max_messages", "max_streams"):
            if getattr(self, f) < 1:
                raise ValueError(f"HttpLimits.{f} must be >= 1")


# -- requests ---------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields common to /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = None  # vLLM extension; 0 or -1: off
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension: in addition to the model's EOS
    ignore_eos: bool = False  # vLLM extension
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    logit_bias: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise bad_request(f"n={self.n} is not supported: this server returns one choice per "
                              "request (n=1); send n requests instead", "n")
        if self.best_of not in (None, 1):
            raise bad_request(f"best_of={self.best_of} is not supported (only 1)", "best_of")
        if self.logprobs not in (None, False):
            raise bad_request("logprobs are not supported by this server", "logprobs")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server", "logit_bias")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported by this server (only 0)", name)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return [s for s in stops if s]  # an empty stop string would match before any text


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise bad_request("echo is not supported by this server", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported by this server", "suffix")

    def single_prompt(self) -> str | list[int]:
        """The one prompt: text or token ids (a list of one prompt is that prompt)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise bad_request(f"{len(p)} prompts in one request: this server takes one prompt "
                                  "per request; send them separately", "prompt")
            p = p[0]
        if not p:
            raise bad_request("the prompt is empty", "prompt")
        return p


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict] | None = None
    name: str | None = None

    def as_dict(self) -> dict:
        """The message as a chat template reads it; text parts joined into one string."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"unsupported content part {part.get('type')!r}: this server "
                                      "takes text only", "messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        return {"role": self.role, "content": content, "name": self.name}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise bad_request("tools are not supported by this server", "tools")
        if not self.messages:
            raise bad_request("messages is empty", "messages")


class LoadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=codec.MAX_REQUEST_ID)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)


# -- to carajax -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GenerateSpec:
    """One OpenAI request as the servicers take it, plus what only the HTTP layer applies."""

    request: pb.GenerateRequest
    stop: tuple[str, ...]  # stop strings (matched on the text here; the engine stops on ids)
    stop_ids: frozenset[int]  # the request's own stop token ids, left out of the text
    prompt_tokens: int | None  # when tokenized here; else the worker's count from the result


def generate_spec(req: _Sampling, prompt: str | list[int], *, adapter: str | None, request_id: str,
                  max_tokens: int | None, eos_token_ids: tuple[int, ...], limits: HttpLimits,
                  tokenizer=None, context: int | None = None) -> GenerateSpec:
    """Check `req` against `limits` and build the GenerateRequest (ids when `tokenizer` is given:
    the router then prices the exact prompt length). `max_tokens` None: as many as the context
    leaves (up to the server's limit). Where the prompt's length is known here and `context` is
    given, the engine's rule applies here too: prompt + max_tokens <= context, else 400."""
    stops = req.stop_strings()
    extra_ids = list(req.stop_token_ids or ())
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise bad_request(f"max_tokens {max_tokens} is over this server's limit {limits.max_tokens}",
                          "max_tokens")
    for check, param in ((lambda: codec.check_stops(extra_ids, stops, limits.request), "stop"),
                         (lambda: codec.check_prompt(prompt, limits.request), "prompt")):
        try:
            check()
        except RequestError as e:
            raise bad_request(str(e), param) from None
    if isinstance(prompt, str) and tokenizer is not None:
        prompt = tokenizer.encode(prompt)
    room = None if context is None or isinstance(prompt, str) else context - len(prompt)
    if max_tokens is None:
        max_tokens = limits.max_tokens if room is None else min(limits.max_tokens, room)
        if max_tokens < 1:
            raise bad_request(f"the prompt ({len(prompt)} tokens) fills the context length "
                              f"{context}", "messages")
    elif room is not None and max_tokens > room:
        raise bad_request(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) is over the "
                          f"context length {context}: ask for at most {max(room, 0)} tokens",
                          "max_tokens")
    # vLLM's stop_token_ids stop in addition to EOS; carajax's replace it, so EOS is added back.
    stop_ids = None
    if extra_ids or req.ignore_eos:
        stop_ids = extra_ids + ([] if req.ignore_eos else [t for t in eos_token_ids if t not in extra_ids])
    try:  # protobuf refuses ints outside int32 (a token id, top_k): a bad request, not a crash
        sampling = codec.sampling_message(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
            top_k=max(0, req.top_k or 0), seed=req.seed, stop_token_ids=stop_ids,
            ignore_eos=req.ignore_eos)
        msg = pb.GenerateRequest(adapter_id=adapter or "", request_id=request_id, sampling=sampling)
        if isinstance(prompt, str):
            msg.text = prompt
        else:
            msg.token_ids.ids.extend(int(t) for t in prompt)
    except ValueError as e:
        raise bad_request(f"a number is out of range: {e}") from None
    return GenerateSpec(msg, tuple(stops), frozenset(extra_ids) - frozenset(eos_token_ids),
                        None if isinstance(prompt, str) else len(prompt))


class StopStrings:
    """Cuts streamed text at the first stop string, holding back a tail that may be the start of
    one (so no client ever sees text that a later piece turns into a stop)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self._held = ""
        self.stopped = False

    def add(self, piece: str) -> str:
        """The text that is now safe to emit; sets `stopped` when a stop string completed."""
        if not self.stops or self.stopped:
            return "" if self.stopped else piece
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[:min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held-back tail once the stream ends without a stop."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


# -- responses --------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


Kind = Literal["completion", "chat"]


def response_body(kind: Kind, rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    """A whole (non-streamed) completion."""
    if kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use}


def chunk_body(kind: Kind, rid: str, model: str, created: int, text: str | None,
               finish: str | None = None, *, role: bool = False, use: dict | None = None) -> dict:
    """One SSE chunk; `text` None with `use`: the usage-only chunk (empty choices), as OpenAI's
    `stream_options.include_usage` sends last."""
    if text is None:
        choices = []
    elif kind == "completion":
        choices = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    else:
        delta: dict = {"role": "assistant", "content": text} if role else (
            {"content": text} if text or finish is None else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body = {"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion.chunk",
            "created": created, "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def model_card(name: str, *, parent: str | None, created: int, max_model_len: int | None = None) -> dict:
    """An entry of /v1/models; adapters carry `parent` = the base, as vLLM lists them."""
    card = {"id": name, "object": "model", "created": created, "owned_by": "carajax",
            "root": name, "parent": parent}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card
