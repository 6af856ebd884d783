"""Python clients of a carajax worker (the carajax.v1.CaraServe gRPC service).

    with Client("127.0.0.1:50051") as client:
        stream = client.generate("Hello", adapter="legal", max_tokens=32, temperature=0.0)
        for token in stream:          # token ids as the worker produces them
            ...
        result = stream.result()      # GenerateResult: token_ids, text, finish_reason, metrics

    async with AsyncClient("127.0.0.1:50051") as client:   # grpc.aio; create it inside the loop
        stream = client.generate("Hello", max_tokens=32)
        async for token in stream: ...
        result = await stream.result()

Errors: every failed RPC raises `ServerError`, whose `code` is the `grpc.StatusCode` and `details`
the worker's message naming the problem (NOT_FOUND for an unknown adapter, INVALID_ARGUMENT for
a bad request, RESOURCE_EXHAUSTED for a full queue, DEADLINE_EXCEEDED when `timeout` passes,
UNAVAILABLE when the worker is down or draining; see carajax.proto). The original
`grpc.RpcError` is its `__cause__`. A stream fails at the point it is iterated, so tokens received
before the error stay available (`stream.token_ids`).

`timeout` (seconds) is a deadline for the whole call, stream included; the worker cancels a
request whose deadline passes, freeing its batch slot. `api_key`: for a server started with
`--api-key`, sent as `authorization: Bearer KEY` metadata on every call (UNAUTHENTICATED
without it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from carajax.server import auth, codec
from carajax.server import carajax_pb2 as pb
from carajax.server import carajax_pb2_grpc as pb_grpc

__all__ = ["AdapterInfo", "AsyncClient", "Client", "GenerateResult", "RequestMetrics", "ServerError"]

_WHERE = {pb.RESIDENCY_HOST: "host", pb.RESIDENCY_LOADING: "loading", pb.RESIDENCY_DEVICE: "device",
          pb.RESIDENCY_DISK: "disk"}


class ServerError(RuntimeError):
    """A failed RPC: `code` (grpc.StatusCode) and `details` (the worker's message)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> ServerError:
        code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
        details = e.details() if callable(getattr(e, "details", None)) else str(e)
        return cls(code, details or "")


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    """Per-request metrics as the worker measured them (seconds)."""

    ttft_s: float | None
    tpot_s: float | None
    latency_s: float | None
    prompt_tokens: int
    output_tokens: int
    cpu_prefill_tokens: int
    cpu_decode_tokens: int
    cold_start: bool
    cold_start_path: str  # "warm", "cpu_assist", "async", "wait" or "" (base model)
    stalled_s: float
    worker: str

    @classmethod
    def from_proto(cls, m: pb.RequestMetrics) -> RequestMetrics:
        opt = lambda f: getattr(m, f) if m.HasField(f) else None  # noqa: E731
        return cls(ttft_s=opt("ttft_s"), tpot_s=opt("tpot_s"), latency_s=opt("latency_s"),
                   prompt_tokens=m.prompt_tokens, output_tokens=m.output_tokens,
                   cpu_prefill_tokens=m.cpu_prefill_tokens, cpu_decode_tokens=m.cpu_decode_tokens,
                   cold_start=m.cold_start, cold_start_path=m.cold_start_path, stalled_s=m.stalled_s,
                   worker=m.worker)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """The whole output of one request."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop", "length" or "cancelled"
    adapter: str | None
    metrics: RequestMetrics

    @classmethod
    def from_proto(cls, r: pb.GenerateResult) -> GenerateResult:
        return cls(request_id=r.request_id, token_ids=list(r.token_ids), text=r.text,
                   finish_reason=r.finish_reason, adapter=r.adapter_id or None,
                   metrics=RequestMetrics.from_proto(r.metrics))


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    rank: int
    bytes: int
    where: str  # "disk", "host", "loading" or "device"
    pinned: bool
    in_use: int
    path: str
    target_modules: tuple[str, ...]

    @classmethod
    def from_proto(cls, a: pb.AdapterInfo) -> AdapterInfo:
        return cls(adapter_id=a.adapter_id, rank=a.rank, bytes=a.bytes, where=_WHERE.get(a.where, ""),
                   pinned=a.pinned, in_use=a.in_use, path=a.path, target_modules=tuple(a.target_modules))


def generate_request(prompt: str | Sequence[int], adapter: str | None = None, *,
                     request_id: str | None = None, **sampling) -> pb.GenerateRequest:
    """A GenerateRequest: text or token ids; `sampling` as `codec.sampling_message` takes it."""
    req = pb.GenerateRequest(adapter_id=adapter or "", request_id=request_id or "",
                             sampling=codec.sampling_message(**sampling))
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.SetInParent()  # an empty list is still a (refused) token-id prompt
        req.token_ids.ids.extend(int(t) for t in prompt)
    return req


class _StreamState:
    """What a stream has received so far (shared by the sync and async streams)."""

    def __init__(self, call):
        self.call = call
        self.token_ids: list[int] = []
        self.pieces: list[str] = []
        self.final: GenerateResult | None = None

    def take(self, msg: pb.GenerateResponse) -> pb.TokenChunk | None:
        if msg.WhichOneof("kind") == "result":
            self.final = GenerateResult.from_proto(msg.result)
            return None
        self.token_ids.extend(msg.chunk.token_ids)
        self.pieces.append(msg.chunk.text)
        return msg.chunk

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def result(self) -> GenerateResult:
        if self.final is None:
            raise ServerError(grpc.StatusCode.INTERNAL, "the stream ended without a result")
        return self.final


class GenerateStream(_StreamState):
    """A running Generate call: iterate for token ids, `result()` for the whole output.

    `token_ids` and `text` hold what has arrived so far; `text_pieces()` iterates text instead.
    """

    def _chunks(self) -> Iterator[pb.TokenChunk]:
        while self.final is None:
            try:
                msg = next(self.call)
            except StopIteration:
                return
            except grpc.RpcError as e:
                raise ServerError.from_rpc(e) from e
            if (chunk := self.take(msg)) is not None:
                yield chunk

    def __iter__(self) -> Iterator[int]:
        for chunk in self._chunks():
            yield from chunk.token_ids

    def text_pieces(self) -> Iterator[str]:
        for chunk in self._chunks():
            if chunk.text:
                yield chunk.text

    def result(self) -> GenerateResult:
        """Wait for the rest of the stream; `ServerError` if the call failed."""
        for _ in self._chunks():
            pass
        return super().result()

    def cancel(self) -> None:
        """Cancel the call; the worker frees the request's slot at once."""
        self.call.cancel()


class AsyncGenerateStream(_StreamState):
    """`GenerateStream` for asyncio: `async for token in stream`, `await stream.result()`."""

    async def _chunks(self) -> AsyncIterator[pb.TokenChunk]:
        while self.final is None:
            try:
                msg = await self.call.read()
            except grpc.RpcError as e:
                raise ServerError.from_rpc(e) from e
            if msg is grpc.aio.EOF:
                return
            if (chunk := self.take(msg)) is not None:
                yield chunk

    async def __aiter__(self) -> AsyncIterator[int]:
        async for chunk in self._chunks():
            for token in chunk.token_ids:
                yield token

    async def result(self) -> GenerateResult:
        async for _ in self._chunks():
            pass
        return super().result()

    def cancel(self) -> None:
        self.call.cancel()


class Client:
    """A blocking client of one worker. `timeout`: default deadline (seconds) of every call;
    `api_key`: the server's key, if it has one."""

    def __init__(self, target: str, *, timeout: float | None = None, channel: grpc.Channel | None = None,
                 api_key: str | None = None):
        self.target, self.timeout = target, timeout
        self._metadata = auth.call_metadata(api_key)
        self.channel = channel or grpc.insecure_channel(target)
        self.stub = pb_grpc.CaraServeStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout,
                          metadata=self._metadata)
        except grpc.RpcError as e:
            raise ServerError.from_rpc(e) from e

    def generate(self, prompt: str | Sequence[int], adapter: str | None = None, *,
                 max_tokens: int | None = None, temperature: float | None = None, top_k: int = 0,
                 top_p: float | None = None, seed: int | None = None,
                 stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                 request_id: str | None = None, timeout: float | None = None) -> GenerateStream:
        """Start a request (text or token ids; adapter None: the base model). None leaves a
        sampling field at the worker's default (max_tokens 16, temperature 1.0, top_p 1.0)."""
        req = generate_request(prompt, adapter, request_id=request_id, max_tokens=max_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
        return GenerateStream(self.stub.Generate(req, timeout=timeout if timeout is not None
                                                 else self.timeout, metadata=self._metadata))

    def load_adapter(self, adapter_id: str, path: str, *, pin: bool = False,
                     timeout: float | None = None) -> AdapterInfo:
        """Register the PEFT adapter directory `path` (on the worker's disk) as `adapter_id`."""
        req = pb.LoadAdapterRequest(adapter_id=adapter_id, path=str(path), pin=pin)
        return AdapterInfo.from_proto(self._call(self.stub.LoadAdapter, req, timeout).adapter)

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        self._call(self.stub.UnloadAdapter, pb.UnloadAdapterRequest(adapter_id=adapter_id), timeout)

    def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        resp = self._call(self.stub.ListAdapters, pb.ListAdaptersRequest(), timeout)
        return [AdapterInfo.from_proto(a) for a in resp.adapters]

    def stats(self, *, timeout: float | None = None) -> pb.StatsResponse:
        """The worker's StatsResponse message (`google.protobuf.json_format.MessageToDict` for a
        dict): queue, running batch with ranks and phases, adapter residency, memory, counters."""
        return self._call(self.stub.Stats, pb.StatsRequest(), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status name: "SERVING", "NOT_SERVING", ..."""
        resp = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """`Client` for asyncio (grpc.aio): the same methods, awaitable; `generate` returns an
    `AsyncGenerateStream` at once (not awaitable itself)."""

    def __init__(self, target: str, *, timeout: float | None = None,
                 channel: grpc.aio.Channel | None = None, api_key: str | None = None):
        self.target, self.timeout = target, timeout
        self._metadata = auth.call_metadata(api_key)
        self.channel = channel or grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.CaraServeStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def _call(self, method, request, timeout):
        try:
            return await method(request, timeout=timeout if timeout is not None else self.timeout,
                                metadata=self._metadata)
        except grpc.RpcError as e:
            raise ServerError.from_rpc(e) from e

    def generate(self, prompt: str | Sequence[int], adapter: str | None = None, *,
                 max_tokens: int | None = None, temperature: float | None = None, top_k: int = 0,
                 top_p: float | None = None, seed: int | None = None,
                 stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                 request_id: str | None = None, timeout: float | None = None) -> AsyncGenerateStream:
        req = generate_request(prompt, adapter, request_id=request_id, max_tokens=max_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
        return AsyncGenerateStream(self.stub.Generate(req, timeout=timeout if timeout is not None
                                                      else self.timeout, metadata=self._metadata))

    async def load_adapter(self, adapter_id: str, path: str, *, pin: bool = False,
                           timeout: float | None = None) -> AdapterInfo:
        req = pb.LoadAdapterRequest(adapter_id=adapter_id, path=str(path), pin=pin)
        return AdapterInfo.from_proto((await self._call(self.stub.LoadAdapter, req, timeout)).adapter)

    async def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        await self._call(self.stub.UnloadAdapter, pb.UnloadAdapterRequest(adapter_id=adapter_id), timeout)

    async def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        resp = await self._call(self.stub.ListAdapters, pb.ListAdaptersRequest(), timeout)
        return [AdapterInfo.from_proto(a) for a in resp.adapters]

    async def stats(self, *, timeout: float | None = None) -> pb.StatsResponse:
        return await self._call(self.stub.Stats, pb.StatsRequest(), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        req = health_pb2.HealthCheckRequest(service=service)
        resp = await self._call(self._health.Check, req, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
