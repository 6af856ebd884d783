"""The serving engine: one base model, many LoRA adapters, continuous batching on one device.

    engine = Engine.from_pretrained("llama-test", config=EngineConfig(cold_start="cpu_assist"))
    engine.add_adapter("legal", "/path/to/peft_adapter")
    handle = engine.submit("Hello", adapter="legal", sampling=SamplingParams(max_tokens=16))
    for token in handle: ...                      # streams; `async for` works too
    out = handle.result()                         # RequestOutput with .metrics

A loop thread runs `step()` while there is work. Each step reads top to bottom:
    poll the adapter pool (non-blocking) -> plan (host only) -> load synchronously if the policy
    is `wait` -> launch one forward over every scheduled token and its sampling on the device ->
    read the tokens of the step before (async scheduling) or of this one -> stream and retire.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import statistics
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from carajax.config import TARGET_MODULES, EngineConfig, ModelConfig
from carajax.engine.cold_start import HostPath, measure_host_path
from carajax.engine.planner import BatchPlanner, Schedule
from carajax.engine.request import (
    QueueFullError,
    Request,
    RequestError,
    RequestHandle,
    RequestMetrics,
    RequestOutput,
    now,
)
from carajax.engine.runner import ModelRunner, StepInputs
from carajax.engine.sampling import SamplingParams
from carajax.lora.adapter import AdapterError, load_adapter
from carajax.lora.cpu_assist import CpuAssistBridge, CpuLoraWorker
from carajax.lora.pool import AdapterPool
from carajax.lora.spec import AdapterSpec, read_spec
from carajax.models import hub
from carajax.models.llama import Llama
from carajax.models.tokenizer import Tokenizer

Prompt = str | Sequence[int]
# How long an engine with nothing to run but requests waiting for adapter copies sleeps between
# polls (outside its lock, so submissions and cancels go through).
COPY_POLL_S = 0.5e-3
log = logging.getLogger(__name__)
_CPU_PROFILES: dict[tuple, object] = {}  # see Engine._profile_cpu_assist and _measure_host_path
__all__ = ["Engine", "QueueFullError", "RequestError", "RequestOutput"]


@dataclasses.dataclass
class _Launched:
    """A step dispatched to the device whose tokens have not been read."""

    plan: Schedule
    inputs: StepInputs
    cpu_ids: dict[str, int]  # the bridge ids of its CPU-assisted adapters
    tokens: jax.Array  # int32 [max_batch_size] on the device
    stalled: float  # seconds its synchronous adapter loads took
    t0: float  # perf_counter when its planning began
    host_s: float  # host seconds planning and preparing it (loads excluded)


def _median_ms(times: list[tuple[float, ...]], i: int) -> float | None:
    return 1e3 * statistics.median(t[i] for t in times) if times else None


class Engine:
    """One base model with many LoRA adapters on one device."""

    def __init__(self, model: Llama, tokenizer: Tokenizer | None = None,
                 config: EngineConfig | None = None, *, background: bool = True):
        """`background=False`: no loop thread; the caller drives the engine with `step()` (and
        `generate` steps until its requests finish). Deterministic, for tests and simulations."""
        self.config = config = config or EngineConfig()
        self.background = background
        self.model_config: ModelConfig = model.config
        self.tokenizer = tokenizer
        dtype = model.embed_tokens.value.dtype
        self.pool = AdapterPool(
            model.config, dtype=dtype, max_lora_rank=config.max_lora_rank,
            device_budget_bytes=config.lora_budget_bytes(model.config, np.dtype(dtype).itemsize),
            host_budget_bytes=config.host_lora_budget_bytes, max_slots=config.max_loras,
            page_rank=config.lora_page_rank, emulated_link_gbps=config.emulated_link_gbps,
            emulated_link_latency_ms=config.emulated_link_latency_ms,
            on_host_evict=self._forget_cpu_id)
        self.bridge = CpuAssistBridge(CpuLoraWorker(max_threads=config.cpu_threads), model.config)
        self.runner = ModelRunner(model, config, self.pool, self.bridge)
        self.planner = BatchPlanner(config, self.runner.layout, self.runner.seq_len, self.pool,
                                    self._decode_text,
                                    lambda n: self.runner.token_bucket(n, decode_only=False),
                                    host_path=self._host_path)
        # Per step: (seconds on the host: planning, building inputs, applying results; seconds
        # in all). Host time is what a faster device cannot remove.
        # Per step: (host seconds: planning, building inputs, applying results; the step's
        # period; seconds waiting for its tokens). Host time is what a faster device cannot
        # remove, unless async scheduling hides it under the device's work.
        self._step_times: collections.deque[tuple[float, float, float]] = collections.deque(
            maxlen=256)
        self._inflight: _Launched | None = None  # async scheduling: the step on the device
        self._last_applied = 0.0
        self._adapters: dict[str, AdapterSpec] = {}  # the registry: specs, never weights
        self.adapters_version = 0  # changes with every registration and removal
        self._cpu_ids: dict[str, int] = {}  # bridge ids of adapters CPU assist has read
        self._rng = np.random.default_rng()
        self._ids = itertools.count()
        # Engine state (planner, pool, runner): held for host bookkeeping only, never across the
        # wait for a step's tokens, so submit, cancel and stats go through while the device works.
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)
        # One step at a time (the loop thread, or step()'s caller), held across the device wait;
        # taken before `_lock`, never while holding it.
        self._stepping = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._warmed = False  # `warmup` has run: later adapters' installs compile as they come
        self.steps = 0
        # Where the device is this host's CPU, `auto` never picks CPU assist (the host's LoRA
        # would compete for the step's own cores): nothing to measure, no variants to compile.
        host_only = (self.runner.device_platform == "cpu"
                     and not config.auto_cpu_assist_on_host)
        self.host_path = HostPath(None, host_only=host_only)  # read by `auto` only
        if config.cold_start == "cpu_assist" or (config.cold_start == "auto" and not host_only):
            self._profile_cpu_assist()
        if config.cold_start == "auto":
            if host_only:
                log.info("cold_start=auto on a host-only device (%s): cold requests wait for "
                         "their copy (async); CPU assist would run on the step's own cores",
                         self.runner.device_platform)
            else:  # measured now, not in the step of the first cold request
                self.host_path.cost = self._measure_host_path()
        self._bridge_seen = self.bridge.stats()  # live CPU-assisted steps refine host_path

    def _profile_cpu_assist(self) -> None:
        """CaraServe's profiling-guided CPU parallelism: c = tokens one core handles within the
        device's time for one projection of a prefill chunk; a cold request of L tokens then gets
        ceil(L / c) threads. Measured once per model shape, dtype and chunk in a process."""
        c = self.model_config
        key = (c, str(self.runner.dtype), self.config.prefill_chunk, self.config.max_lora_rank)
        if key not in _CPU_PROFILES:
            n = min(self.config.prefill_chunk, self.config.max_step_tokens, self.runner.seq_len)
            self.runner.dry_step(n)  # compile
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                self.runner.dry_step(n)
                times.append(time.perf_counter() - t0)
            budget = statistics.median(times) / (c.num_layers * len(TARGET_MODULES))
            _CPU_PROFILES[key] = self.bridge.worker.profile(
                c.hidden_size, c.hidden_size, self.config.max_lora_rank, budget, repeats=3)
        self.bridge.worker.tokens_per_core = _CPU_PROFILES[key]

    def _measure_host_path(self):
        """`auto`'s host-path costs, timed on this engine's own CPU-assisted step at the prefill
        chunk's size (ranks 8 and max_lora_rank); once per model shape, dtype and chunk in a
        process."""
        c, cfg = self.model_config, self.config
        chunk = min(cfg.prefill_chunk, cfg.max_step_tokens, self.runner.seq_len)
        key = ("host_path", c, str(self.runner.dtype), chunk, cfg.max_lora_rank)
        if key not in _CPU_PROFILES:
            def step(cold_id):
                bridge = None if cold_id is None else self.bridge
                self.runner.dry_step(chunk, bridge=bridge, cold_id=-1 if cold_id is None
                                     else cold_id)
            _CPU_PROFILES[key] = measure_host_path(
                step, self.bridge.register, self.bridge.unregister, c, self.runner.token_bucket(
                    chunk, decode_only=False), (min(8, cfg.max_lora_rank), cfg.max_lora_rank))
        return _CPU_PROFILES[key]

    def _host_path(self) -> HostPath:
        return self.host_path

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: str = "float32",
                        config: EngineConfig | None = None, seed: int = 0) -> Engine:
        """A local HF checkpoint directory or GGUF file, the built-in trained "carajax-demo"
        model (`carajax.demo`), a model carajax pulls by name ("smollm2-135m-instruct", once,
        see `carajax.models.hub`), or a preset name (random weights from `seed`)."""
        config = dataclasses.replace(config or EngineConfig(), dtype=dtype)
        model, tokenizer = hub.load(name_or_path, dtype=jnp.dtype(dtype), seed=seed)
        return cls(model, tokenizer, config)

    @staticmethod
    def compiled_variants() -> dict[str, int]:
        """Compiled variants of each jitted forward in this process ("score", "step")."""
        return ModelRunner.compiled_variants()

    def warmup(self, progress=None) -> int:
        """Compile every bucketed step variant now, so that serving never pauses to compile;
        returns how many were compiled. `progress(done, total)` is called as variants finish."""
        with self._lock:
            self._warmed = True
            self.pool.warmup()  # adapter installs: one variant per (projections, page count)
            return self.runner.warmup(cpu=self.uses_cpu_assist, progress=progress)

    @property
    def uses_cpu_assist(self) -> bool:
        """Whether cold requests may take CPU assist here (its step variants are compiled)."""
        return self.config.cold_start == "cpu_assist" or (
            self.config.cold_start == "auto" and not self.host_path.host_only)

    # -- adapters ---------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str | os.PathLike, *, pin: bool = False) -> AdapterSpec:
        """Register a PEFT adapter directory under `name`; returns its spec (shapes, ranks).

        Its config and safetensors header are checked against the base model; its weights are
        read now only if the host tier has room for them (then checked too: finite values), else
        when a request first needs them. Raises `AdapterError` (and registers nothing) if it is
        malformed, unsupported, does not fit the base model, has a rank over `max_lora_rank`, the
        name is taken, or (`cached` policy) it does not fit on the device.
        """
        if not name:
            raise AdapterError("adapter name must be a non-empty string")
        spec = read_spec(path, self.model_config, max_rank=self.config.max_lora_rank, name=name)
        if name in self._adapters:
            raise AdapterError(f"adapter {name!r} is already registered; remove it first")
        staged = None
        if self.pool.host_room(spec):  # host work, outside the lock
            adapter = load_adapter(path, self.model_config, max_rank=self.config.max_lora_rank,
                                   name=name)
            staged = self.pool.stage_host(adapter)
            del adapter  # the host tier keeps one copy, in the layout a copy moves
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"adapter {name!r} is already registered; remove it first")
            self.pool.register_spec(spec, staged=staged)
            try:
                if self.config.cold_start == "cached":
                    self._check_fits_cached(spec)
                    self.pool.load_now(name)
                if pin:
                    self.pool.pin(name)
                if self._warmed:  # served engines compile a new adapter's install now, not mid-step
                    self.pool.warmup([name])
            except Exception:
                self.pool.unregister(name)
                raise
            self._adapters[name] = spec
            self.adapters_version += 1
        return spec

    def _check_fits_cached(self, adapter: AdapterSpec) -> None:
        """`cached` keeps every adapter on the device: one that does not fit in the free pages
        is refused (never by evicting another)."""
        st = self.pool.stats()
        need = -(-adapter.rank // self.config.lora_page_rank)
        if st["pages_free"] < need or st["slots_free"] < 1:
            raise AdapterError(
                f"cold_start='cached' keeps every adapter on the device, but {adapter.name!r} "
                f"needs {need} pages ({need * st['page_bytes']} bytes) and {st['pages_free']} of "
                f"{st['pages_total']} pages ({st['slots_free']} slots) are free; raise "
                f"device_lora_budget_bytes ({st['device_budget_bytes']}) or use another policy")

    def remove_adapter(self, name: str) -> None:
        """Unregister an adapter; raises `AdapterError` while running requests use it."""
        with self._lock:
            self._adapter(name)
            self.pool.unregister(name)  # raises if in use
            self.planner.fail_waiting(lambda r: r.adapter == name,
                                        f"adapter {name!r} was removed")
            self._forget_cpu_id(name)
            del self._adapters[name]
            self.adapters_version += 1

    def pin_adapter(self, name: str) -> None:
        """Keep an adapter on the device (loaded now if needed); never evicted until unpinned."""
        with self._lock:
            self._adapter(name)
            self.pool.load_now(name)
            self.pool.pin(name)

    def unpin_adapter(self, name: str) -> None:
        with self._lock:
            self.pool.unpin(self._adapter(name).name)

    @property
    def adapters(self) -> dict[str, AdapterSpec]:
        """A snapshot of the registry, {name: spec}: a copy of every entry, for listings. To look
        one up, `get_adapter` (constant time however many are registered)."""
        return dict(self._adapters)  # (one C-level copy: atomic under the GIL)

    def get_adapter(self, name: str) -> AdapterSpec | None:
        """The registered adapter's spec, or None."""
        return self._adapters.get(name)

    @property
    def num_adapters(self) -> int:
        return len(self._adapters)

    def _adapter(self, name: str) -> AdapterSpec:
        spec = self._adapters.get(name)
        if spec is None:
            raise AdapterError(f"unknown adapter {name!r} ({len(self._adapters)} registered)")
        return spec

    def _cpu_id(self, name: str) -> int:
        """The bridge id of an adapter a step runs on the CPU: registered with views of its host
        copy (held there while a request runs with it) the first time, until that copy goes."""
        cid = self._cpu_ids.get(name)
        if cid is None:
            cid = self._cpu_ids[name] = self.bridge.register(self.pool.host_view(name))
        return cid

    def _forget_cpu_id(self, name: str) -> None:
        """The adapter's host copy went (evicted, or unregistered): so does its bridge id."""
        cid = self._cpu_ids.pop(name, None)
        if cid is not None:
            self.bridge.unregister(cid)

    # -- requests ---------------------------------------------------------------------------
    def _token_ids(self, prompt: Prompt, limit: int) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:  # "" still encodes to [BOS]: a prompt of nothing, not a request
                raise RequestError("empty prompt")
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("empty prompt")
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary "
                               f"[0, {self.model_config.vocab_size})")
        if len(ids) > limit:
            raise RequestError(f"prompt has {len(ids)} tokens; the context length is {limit}")
        return ids

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def logits(self, token_ids: Prompt, adapter: str | None = None) -> np.ndarray:
        """float32 [len(token_ids), vocab]: next-token logits at every position of the sequence."""
        ids = self._token_ids(token_ids, self.model_config.max_position_embeddings)
        with self._lock:
            slot = -1
            if adapter is not None:
                self._adapter(adapter)
                self.pool.load_now(adapter)
                slot = self.pool.slot(adapter)
            return self.runner.score(ids, slot)

    def _make_request(self, prompt: Prompt, adapter: str | None, sampling: SamplingParams | None,
                      request_id: str | None) -> Request:
        arrival = now()
        sampling = sampling or SamplingParams()
        ids = self._token_ids(prompt, self.runner.seq_len - 1)
        layout = self.runner.layout
        if layout.pages_for(len(ids)) > layout.num_pages:
            raise RequestError(f"prompt has {len(ids)} tokens; the whole KV cache holds "
                               f"{layout.num_pages * layout.page_size} (raise kv_cache_bytes)")
        if sampling.max_tokens > self.config.max_tokens_limit:
            raise RequestError(f"max_tokens {sampling.max_tokens} is over the limit "
                               f"{self.config.max_tokens_limit}")
        # One rule everywhere (as vLLM's): the prompt and every token asked for fit the context.
        if len(ids) + sampling.max_tokens > self.runner.seq_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({sampling.max_tokens}) "
                               f"is over the context length {self.runner.seq_len}: ask for at "
                               f"most {self.runner.seq_len - len(ids)} tokens")
        if adapter is not None:
            self._adapter(adapter)
        seed = sampling.seed if sampling.seed is not None else int(self._rng.integers(2**31))
        stop = (sampling.stop_token_ids if sampling.stop_token_ids is not None
                else self.model_config.eos_token_ids)
        rid = request_id or f"req-{next(self._ids)}"
        cold = adapter is not None and self.pool.slot(adapter) is None
        return Request(request_id=rid, prompt_ids=ids, adapter=adapter, sampling=sampling,
                       seed=seed, stop_ids=frozenset(stop),
                       metrics=RequestMetrics(arrival_time=arrival, prompt_tokens=len(ids),
                                              cold_start=cold),
                       handle=RequestHandle(rid, on_cancel=self.cancel))

    def submit(self, prompt: Prompt, adapter: str | None = None,
               sampling: SamplingParams | None = None, request_id: str | None = None,
               ) -> RequestHandle:
        """Queue one request; returns a handle that streams its tokens.

        Raises `RequestError` / `AdapterError` for a bad request and `QueueFullError` when the
        waiting queue is at `max_queue`; nothing else is affected.
        """
        return self._submit_all([self._make_request(prompt, adapter, sampling, request_id)])[0]

    def _submit_all(self, requests: list[Request]) -> list[RequestHandle]:
        if self._closed:  # (again under the lock below; this spares a closed pool a copy)
            raise RuntimeError("engine is closed")
        try:
            # Cold adapters' copies start here, outside the engine lock, while a step may still
            # hold it: by the time the step ends, the copy has run beside it.
            for r in requests:
                self.planner.start_cold(r)
            with self._lock:
                if self._closed:
                    raise RuntimeError("engine is closed")
                if len(self.planner.waiting) + len(requests) > self.config.max_queue:
                    raise QueueFullError(f"waiting queue is full ({self.config.max_queue} requests)")
                for r in requests:
                    self.planner.add(r)
                self._ensure_loop()
                self._work.notify()
        except BaseException:
            for r in requests:
                self.planner.forget(r)
            raise
        return [r.handle for r in requests]

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request (e.g. its client went away): it finishes with
        reason "cancelled" and frees its KV-cache row at once; the others do not notice.
        Returns False if the engine holds no such request (unknown or already finished)."""
        with self._lock:
            return self.planner.cancel(request_id)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 adapters: str | None | Sequence[str | None] = None,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Generate a completion for each prompt with its adapter (None: the base model).

        All requests are validated first (a bad one raises before any work) and enter the
        engine together, so they share batches.
        """
        if isinstance(prompts, str) or (prompts and all(isinstance(t, (int, np.integer))
                                                        for t in prompts)):
            prompts = [prompts]
        n = len(prompts)
        adapters = [adapters] * n if adapters is None or isinstance(adapters, str) else list(adapters)
        sampling = ([sampling or SamplingParams()] * n if not isinstance(sampling, Sequence)
                    else list(sampling))
        if len(adapters) != n or len(sampling) != n:
            raise RequestError(f"{n} prompts but {len(adapters)} adapters and "
                               f"{len(sampling)} sampling params")
        reqs = [self._make_request(p, a, s, None) for p, a, s in zip(prompts, adapters, sampling)]
        handles = self._submit_all(reqs)
        if not self.background:
            while not all(h.done for h in handles) and self.step():
                pass
        return [h.result() for h in handles]

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one engine iteration; returns False when there was nothing to do.

        With `async_scheduling` an iteration plans and launches step N + 1 while step N still
        runs on the device, then waits for N's tokens and applies them: the host's planning
        hides under the device's work (vLLM's async scheduling). Step N + 1 was planned with
        N's tokens PENDING, so a request that N's token stops runs one wasted token in N + 1,
        dropped; a request that N's token brings to max_tokens is never planned again.

        The engine lock is held while planning and launching, and while applying tokens, but
        not while waiting for them: submit, cancel and stats never wait for the device. A
        request cancelled meanwhile is finished already when its token arrives (dropped)."""
        with self._stepping:
            with self._lock:
                self.pool.poll()  # install finished copies; never blocks
                t0 = time.perf_counter()
                prev, self._inflight = self._inflight, None
                plan = self.planner.schedule()
                idle = plan.empty and prev is None
                if idle and not self.planner.waiting:
                    return False
                ready = [] if idle else self._launch(plan, prev, t0)
            if idle:
                # Only requests waiting for their adapters' copies (async): let the copies land,
                # outside the lock so that submits and cancels go on.
                time.sleep(COPY_POLL_S)
            for launched in ready:
                self._apply(launched)
            return True

    def _launch(self, plan: Schedule, prev: _Launched | None, t0: float) -> list[_Launched]:
        """Launch `plan` (if any); returns the steps whose tokens to apply now, in order: the
        step before it, this one, or both (see `step`). Under the engine lock."""
        launched = None
        if not plan.empty:
            stalled = sum(self.pool.load_now(name) for name in plan.sync_loads)
            cpu_ids = {c.request.adapter: self._cpu_id(c.request.adapter)
                       for c in plan.chunks if c.path == "cpu"}
            inputs = self.runner.prepare(plan, self.planner.pages.table, cpu_ids)
            tokens = self.runner.launch(inputs)[0]
            self.planner.commit(plan)
            launched = _Launched(plan, inputs, cpu_ids, tokens, stalled, t0,
                                 time.perf_counter() - t0 - stalled)
        # Steps with CPU-assisted tokens are applied at once: their host callbacks' errors
        # must be read against the step that made them.
        if (launched is not None and self.config.async_scheduling
                and not any(c.path == "cpu" for c in plan.chunks)):
            self._inflight = launched
            launched = None
        return [s for s in (prev, launched) if s is not None]

    def _apply(self, step: _Launched) -> None:
        """Wait for a launched step's tokens (without the engine lock), then apply them under
        it; record its times. Called by the stepping thread only."""
        t_sync = time.perf_counter()
        sampled = self.runner.wait(step.tokens)  # the device wait: the lock is free
        t_got = time.perf_counter()
        with self._lock:
            tokens, failed = self.runner.collect(step.plan, step.inputs, sampled, step.cpu_ids)
            self.planner.postprocess(step.plan, tokens, step.stalled, failed)
            t_end = time.perf_counter()
            # The step's period: since the previous step's results were applied (or since this
            # one was planned, after an idle spell). Host: its planning and inputs, and its
            # results.
            period = t_end - max(self._last_applied, step.t0) - step.stalled
            self._last_applied = t_end
            self._step_times.append((step.host_s + (t_end - t_got), period, t_got - t_sync))
            self.planner.step_times.add(step.plan.num_tokens, period)
            self.steps += 1
            if step.inputs.cpu_rows.size and self.host_path.cost is not None:
                seen, self._bridge_seen = self._bridge_seen, self.bridge.stats()
                self.host_path.observe(self._bridge_seen.cold_host_s - seen.cold_host_s,
                                       self._bridge_seen.macs - seen.macs)

    def _ensure_loop(self) -> None:
        if not self.background:
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="carajax-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._work:
                while not self._closed and not self.planner.has_work:
                    self._work.wait()
                if self._closed:
                    return
            try:
                self.step()  # outside the lock: the step takes it around its host work only
            except Exception as e:  # a bug must not hang callers: fail what was running
                with self._lock:
                    self._inflight = None
                    self.planner.fail_all(f"engine step failed: {type(e).__name__}: {e}")

    def stats(self) -> dict:
        """Queue, running batch (with ranks), adapter residency, bytes used, counters."""
        with self._lock:
            running = [{"request_id": r.request_id, "adapter": r.adapter,
                        "rank": self._adapters[r.adapter].rank if r.adapter else 0,
                        "phase": r.phase.value, "prompt_tokens": len(r.prompt_ids),
                        "computed": r.num_computed, "output_tokens": len(r.output_ids),
                        "pending": r.pending}
                       for r in self.planner.running]
            layout, pages = self.runner.layout, self.planner.pages
            times = list(self._step_times)
            return {"waiting": len(self.planner.waiting), "running": running,
                    "cold_start": self.config.cold_start,
                    "emulated_link": self.config.emulated_link_gbps is not None,
                    "steps": self.steps, "compiled_variants": self.compiled_variants(),
                    "kv_cache": {"pages_total": layout.num_pages, "pages_free": pages.num_free,
                                 "page_size": layout.page_size,
                                 "preemptions": self.planner.preemptions},
                    # Medians over the last steps: host time (planning, inputs, results), the
                    # step's period, and the wait for its tokens (the device's share the host
                    # did not hide).
                    "step_host_ms": _median_ms(times, 0), "step_ms": _median_ms(times, 1),
                    "step_wait_ms": _median_ms(times, 2),
                    "async_scheduling": self.config.async_scheduling,
                    "cold_paths": dict(self.planner.cold_paths),
                    **({"auto_host_path": self.host_path.stats(),
                        # async requests the step waited for as their copies landed
                        "auto_joined_on_landing": self.planner.joined_on_landing}
                       if self.config.cold_start == "auto" else {}),
                    "finished": {"count": self.planner.finished_count,
                                 "recent_output_tokens": list(self.planner.finished_outputs)},
                    "adapters": self.pool.stats(), "adapters_version": self.adapters_version,
                    "cpu_assist": self.bridge.stats()}

    def close(self) -> None:
        """Stop the loop thread (queued requests fail) and the pool's loader."""
        with self._work:
            self._closed = True
            self.planner.fail_all("engine closed")
            self._work.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.pool.close()
        self.bridge.worker.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
