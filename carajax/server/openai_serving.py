"""OpenAI requests run on a worker's or a router's CaraServe servicer (the HTTP routes are in
carajax.server.http; the wire format in carajax.server.openai_api).

The HTTP layer serves nothing itself: a request runs the gRPC servicer's own handler
(`CaraServeServicer.Generate` on a worker, `RouterServicer.Generate` on a router) with
`CallContext` standing in for grpc's context. So validation, routing, retries, metrics and the
worker's Stats see HTTP requests exactly as gRPC ones, and cancelling the context (the client
went away, or a stop string matched) cancels the engine request or the upstream call, freeing its
batch slot at once. Each generation runs on a thread of its own (the handlers block), feeding the
event loop through a queue; the loop never waits on the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from carajax.lora.adapter import AdapterError
from carajax.models.chat import ChatTemplate, ChatTemplateError, load_chat_template
from carajax.server import carajax_pb2 as pb
from carajax.server import openai_api as oa
from carajax.server.adapter_paths import AdapterPathPolicy

_END = object()


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """What the HTTP layer knows of the base model: its served name (the `model` that means "no
    adapter"), tokenizer (prompts are tokenized here when there is one), chat template, EOS ids."""

    name: str
    tokenizer: Any = None
    chat_template: ChatTemplate | None = None
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int | None = None

    @classmethod
    def of_engine(cls, engine, checkpoint: str | None = None, *, name: str | None = None) -> ServedModel:
        """A worker's engine; `checkpoint` (what `Engine.from_pretrained` was given) holds the
        chat template."""
        return cls(name or engine.model_config.name, engine.tokenizer,
                   load_chat_template(_checkpoint_dir(checkpoint), engine.tokenizer),
                   engine.model_config.eos_token_ids, engine.runner.seq_len)

    @classmethod
    def load(cls, name_or_path: str, *, name: str | None = None) -> ServedModel:
        """Tokenizer and template of a checkpoint dir or preset, without weights (a router's).
        A name this process cannot find gives a model with neither: completions still work
        (the workers tokenize), chat does not."""
        from carajax.config import PRESET_CHECKPOINTS, ModelConfig
        from carajax.models import hub
        from carajax.models.tokenizer import load_tokenizer

        path = _checkpoint_dir(name_or_path)
        try:
            config = hub.model_config(path) if path else ModelConfig.from_name(name_or_path)
        except (KeyError, ValueError, OSError):
            return cls(name or name_or_path)
        served = name or (name_or_path if name_or_path in PRESET_CHECKPOINTS or not path else config.name)
        tokenizer = load_tokenizer(path, config)
        # The checkpoint's context: a worker started with a shorter max_seq_len refuses a
        # request over its own, with the room it has.
        return cls(served, tokenizer, load_chat_template(path, tokenizer), config.eos_token_ids,
                   config.max_position_embeddings)


def _checkpoint_dir(name_or_path: str | None) -> str | None:
    """The checkpoint directory or GGUF file a model name stands for, if it is here (a model
    carajax pulls and has pulled, too; nothing is pulled here)."""
    from carajax.models import hub

    if name_or_path is None:
        return None
    path = hub.resolve(name_or_path, pull_missing=False)
    return path if Path(path).is_dir() or hub.is_gguf(path) else None


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class CallContext:
    """The part of `grpc.ServicerContext` the servicers use. `cancel()` ends the call as a client
    cancel would: callbacks run (the worker cancels its engine request, the router its upstream
    call) and `is_active()` turns False."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active = True
        self._callbacks: list[Callable[[], None]] = []

    def abort(self, code: grpc.StatusCode, details: str):
        raise _Aborted(code, details)

    def time_remaining(self) -> float | None:
        return None  # HTTP has no deadline; a client that gives up disconnects

    def is_active(self) -> bool:
        return self._active

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._active:
                self._callbacks.append(callback)
            return self._active

    def invocation_metadata(self):
        return ()

    def cancel(self) -> None:
        with self._lock:
            callbacks, self._callbacks, self._active = self._callbacks, [], False
        for callback in callbacks:
            callback()


@dataclasses.dataclass
class _Piece:
    text: str
    finish: str | None = None
    usage: dict | None = None


class OpenAIServing:
    """The endpoints over one started worker or router (`server.servicer`, `server.health`)."""

    def __init__(self, server, model: ServedModel, *, limits: oa.HttpLimits,
                 enable_lora_loading: bool, adapter_paths: AdapterPathPolicy | None):
        self.servicer, self.health = server.servicer, server.health
        self.model, self.limits = model, limits
        self.enable_lora_loading, self.adapter_paths = enable_lora_loading, adapter_paths
        metrics = getattr(self.servicer, "metrics", None)  # a worker's; a router has its own registry
        self.registry = metrics.registry if metrics is not None else self.servicer.registry
        self._streams = 0  # generations in flight (touched on the event loop only)
        self._threads = concurrent.futures.ThreadPoolExecutor(limits.max_streams,
                                                              thread_name_prefix="carajax-http")
        self._unary = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="carajax-http-unary")
        self._created = int(time.time())
        self._models: tuple[int | None, list[dict]] | None = None  # (registry version, cards)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._unary.shutdown(wait=False, cancel_futures=True)

    # -- state ------------------------------------------------------------------------------
    def state(self) -> str:
        """"serving", "warming" (health NOT_SERVING before the first SERVING) or "draining"."""
        if not self.servicer.serving:
            return "draining"
        reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        return "serving" if reply.status == health_pb2.HealthCheckResponse.SERVING else "warming"

    def _check_serving(self) -> None:
        if (state := self.state()) != "serving":
            raise oa.ApiError(503, f"the server is {state}; retry later", type="service_unavailable")

    async def _call(self, method, request):
        """A unary servicer method on a thread; its abort as an ApiError."""
        def run():
            try:
                return method(request, CallContext())
            except _Aborted as e:
                raise oa.ApiError.from_grpc(e.code, e.details) from None
        return await asyncio.get_running_loop().run_in_executor(self._unary, run)

    # -- models and adapters ----------------------------------------------------------------
    async def models(self) -> dict:
        """The base model, every adapter registered, then those a request may name under the
        adapter root (`--adapter-root`; a listing kept a few seconds, no file read). On a worker
        the list is built again only when its registry or that listing changed
        (`Engine.adapters_version`), not at every call."""
        version = getattr(getattr(self.servicer, "engine", None), "adapters_version", None)
        store = getattr(self.servicer, "adapter_store", None)
        under_root = ()  # a scandir at most every few seconds, off the event loop
        if store is not None:
            under_root = await asyncio.get_running_loop().run_in_executor(self._unary, store.names)
        if version is None or self._models is None or self._models[:2] != (version, under_root):
            listed = await self._call(self.servicer.ListAdapters, pb.ListAdaptersRequest())
            base = self.model.name
            names = [a.adapter_id for a in listed.adapters]
            known = set(names)
            names += [n for n in under_root if n not in known]
            data = [oa.model_card(base, parent=None, created=self._created,
                                  max_model_len=self.model.max_model_len)]
            data += [oa.model_card(n, parent=base, created=self._created,
                                   max_model_len=self.model.max_model_len) for n in names]
            self._models = (version, under_root, data)
        return {"object": "list", "data": list(self._models[2])}

    async def load_lora(self, body: oa.LoadLoraRequest) -> str:
        self._check_lora_loading()
        path = body.lora_path
        if self.adapter_paths is not None:  # a worker; a router's workers check their own paths
            try:  # the servicer checks again with its own policy (the same object from the CLI)
                path = str(self.adapter_paths.resolve(path))
            except AdapterError as e:  # AdapterPathError: outside the root, or loading is off
                raise oa.ApiError(403, str(e), type="permission_error", param="lora_path") from None
        await self._call(self.servicer.LoadAdapter,
                         pb.LoadAdapterRequest(adapter_id=body.lora_name, path=path))
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    async def unload_lora(self, body: oa.UnloadLoraRequest) -> str:
        self._check_lora_loading()
        await self._call(self.servicer.UnloadAdapter, pb.UnloadAdapterRequest(adapter_id=body.lora_name))
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    def _check_lora_loading(self) -> None:
        if not self.enable_lora_loading:
            raise oa.ApiError(404, "loading adapters at run time is off on this server (start it "
                              "with --enable-lora-loading)", type="not_found_error")

    # -- generation -------------------------------------------------------------------------
    def spec(self, req: oa.CompletionRequest | oa.ChatCompletionRequest) -> oa.GenerateSpec:
        """Validate a request and translate it (everything that can fail before the engine)."""
        req.check_supported()
        self._check_serving()
        chat = isinstance(req, oa.ChatCompletionRequest)
        prompt = self._chat_prompt(req) if chat else req.single_prompt()
        # Not given: chat as many as the context leaves (up to the limit), as OpenAI's; legacy
        # completions 16, as OpenAI's.
        max_tokens = req.max_tokens or (req.max_completion_tokens if chat else None) or (
            None if chat else 16)
        return oa.generate_spec(
            req, prompt, adapter=None if req.model == self.model.name else req.model,
            request_id=oa.new_id("chatcmpl" if chat else "cmpl"), max_tokens=max_tokens,
            eos_token_ids=self.model.eos_token_ids, limits=self.limits, tokenizer=self.model.tokenizer,
            context=self.model.max_model_len)

    def _chat_prompt(self, req: oa.ChatCompletionRequest) -> str:
        template = self.model.chat_template
        if template is None:
            raise oa.bad_request(f"model {self.model.name!r} has no chat template here (none in its "
                                 "tokenizer_config.json, or a router started without --tokenizer "
                                 "DIR); use /v1/completions")
        if len(req.messages) > self.limits.max_messages:
            raise oa.bad_request(f"{len(req.messages)} messages; at most {self.limits.max_messages}",
                                 "messages")
        messages = [m.as_dict() for m in req.messages]
        chars = sum(len(m["content"] or "") for m in messages)  # the template's cost grows with it
        if chars > self.limits.request.max_prompt_bytes:
            raise oa.bad_request(f"the messages have {chars} characters; at most "
                                 f"{self.limits.request.max_prompt_bytes}", "messages")
        try:
            return template.prompt_text(messages, add_generation_prompt=req.add_generation_prompt,
                                        **(req.chat_template_kwargs or {}))
        except ChatTemplateError as e:
            raise oa.bad_request(str(e), "messages") from None

    async def events(self, spec: oa.GenerateSpec, ctx: CallContext) -> AsyncIterator[_Piece]:
        """Text pieces of one generation; the last has `finish` and `usage`. Runs the servicer's
        Generate on a thread; leaving this generator early (client gone) cancels the request."""
        if self._streams >= self.limits.max_streams:
            raise oa.ApiError(429, f"{self._streams} generations in flight on this HTTP server (its "
                              "limit); retry later", type="rate_limit_error")
        self._streams += 1
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: the server stopped
                pass

        def pump() -> None:
            stream = self.servicer.Generate(spec.request, ctx)
            try:
                for msg in stream:
                    put(msg)
                    if not ctx.is_active():
                        break
            except _Aborted as e:
                put(e)
            except Exception as e:  # a bug must not hang the client
                put(_Aborted(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))
            finally:
                stream.close()  # the servicer's cleanup (cancel, bookkeeping) runs here
                put(_END)

        stops = oa.StopStrings(spec.stop)
        tokens, last_id, held = 0, None, ""
        try:
            self._threads.submit(pump)
            while (msg := await queue.get()) is not _END:
                if isinstance(msg, _Aborted):
                    raise self._error(msg, spec)
                if msg.WhichOneof("kind") == "chunk":
                    ids, piece = msg.chunk.token_ids, msg.chunk.text
                    tokens += len(ids)
                    if spec.stop_ids:  # one piece late, so a stop token's own text can be dropped
                        piece, held = (held, piece) if ids else ("", held + piece)
                        last_id = ids[-1] if ids else last_id
                    text = stops.add(piece)
                    if stops.stopped:
                        ctx.cancel()  # frees the slot now; the rest is never generated
                        yield _Piece(text, "stop", oa.usage(spec.prompt_tokens or 0, tokens))
                        return
                    if text:
                        yield _Piece(text)
                    continue
                r = msg.result
                if spec.stop_ids and r.finish_reason == "stop" and last_id in spec.stop_ids:
                    held = ""
                text = stops.add(held)
                finish = "stop" if stops.stopped else oa.FINISH_REASONS.get(r.finish_reason,
                                                                             r.finish_reason)
                prompt_tokens = r.metrics.prompt_tokens or spec.prompt_tokens or 0
                yield _Piece(text + stops.flush(), finish, oa.usage(prompt_tokens, r.metrics.output_tokens))
                return
            raise oa.ApiError(500, "the generation ended without a result", type="server_error")
        finally:
            ctx.cancel()  # no-op after a result; else the client left or an error ended it
            self._streams -= 1

    def _error(self, e: _Aborted, spec: oa.GenerateSpec) -> oa.ApiError:
        err = oa.ApiError.from_grpc(e.code, e.details)
        if e.code == grpc.StatusCode.NOT_FOUND and spec.request.adapter_id:
            err.message = (f"The model '{spec.request.adapter_id}' does not exist: it is neither the "
                           f"base model '{self.model.name}' nor a registered adapter ({e.details})")
            err.code, err.param = "model_not_found", "model"
        elif spec.request.adapter_id and e.code in (
                grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED) and (
                "adapter name " in e.details
                or f"adapter {spec.request.adapter_id!r}" in e.details):
            err.param = "model"  # the adapter it names: malformed, broken, or outside the root
        return err
