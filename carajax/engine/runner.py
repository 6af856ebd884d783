"""The model runner: the one place that touches the device.

It holds the model's parameters (split from the NNX module, so the hot path is plain `jax.jit`),
the paged KV cache, and reads the adapter pool's device weights. `run` turns a `Schedule` into one
flattened batch (`StepBatch`: every token of the step, sequence after sequence) and runs ONE
jitted step: the forward over all of them and the sampling of the sequences that reach their
end, so only the sampled token ids come back to the host.

Compiled variants: the token count is bucketed to powers of two (decode-only steps from
min(8, max_batch_size), mixed steps from `min_prefill_bucket`), and nothing else: the sequence
axis is fixed at `max_batch_size` and the block tables at the longest context's pages (the
attention skips the pages past the step's longest context, so its cost follows the real contexts,
not the cache's capacity). Steps with CPU-assisted
tokens use variants with the host callbacks (their token count bucketed too); engines with no
adapter registered use variants without LoRA. `compiled_variants` counts traces.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from carajax import parallel
from carajax.config import EngineConfig
from carajax.engine import kernel_timing
from carajax.engine.kv_pages import KVLayout
from carajax.engine.planner import Schedule
from carajax.engine.request import Request
from carajax.engine.sampling import sample_tokens
from carajax.engine.step_shapes import PREFILL_BLOCK, bucket
from carajax.engine.step_shapes import query_block as step_query_block
from carajax.lora.hook import BatchLora, resolve_lora_impl, step_compact_plan
from carajax.models.llama import Llama, PagedKVCache, StepBatch, dense_batch, output_logits

# Incremented at trace time only: one count per compiled variant.
_TRACES: collections.Counter[str] = collections.Counter()
CPU_ROWS_SMALL = 8  # see ModelRunner.cpu_rows_bucket
CPU_ROWS_GROWTH = 4  # ditto


class Static:
    """A static jit argument hashed by identity. The layer's nnx graph definition hashes by
    walking its whole structure (~0.3 ms a call here), and the step passes it once per layer."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other) -> bool:
        return self is other


@jax.jit
def _to_device(tree):
    """Host arrays to the device in one call (cheaper here than `jax.device_put` of a tree)."""
    return tree


def _hook(lora, batch: StepBatch, seg_slots, cpu, use_lora, impl, pad, compact=None):
    if not use_lora and cpu is None:
        return None
    starts = batch.query_starts[:-1]
    lens = batch.query_starts[1:] - starts
    return BatchLora(lora if use_lora else None, starts, lens, seg_slots, impl, cpu=cpu,
                     pad_to_max_rank=pad, compact=compact)


@functools.partial(jax.jit, static_argnames=("graphdef", "use_lora", "impl", "pad"))
def _score(graphdef, state, lora, batch: StepBatch, cache: PagedKVCache, seg_slots, *,
           use_lora: bool, impl: str, pad: bool = False):
    """Logits [T, V] of whole sequences from position 0 (a scratch cache, not kept), the whole
    model as one program: what tests/tp_check.py reads the collectives of (`score` below runs
    the step's per-layer pieces instead)."""
    _TRACES["score"] += 1
    model: Llama = nnx.merge(graphdef, state)
    hook = _hook(lora, batch, seg_slots, None, use_lora, impl, pad)
    logits, _ = model(batch, cache, hook, query_block=PREFILL_BLOCK)
    return logits


# One engine step is three compiled pieces: the embedding, ONE decoder layer that every layer
# runs (its weights and index are arguments), and the output head; the runner dispatches them
# layer after layer (asynchronously: the host does not wait between them). Not one program
# over all layers: a `lax.scan` over stacked weights makes XLA:CPU copy every layer's weight
# slice (~half of a decode step), and an unrolled program compiles in time that grows with
# depth (SmolLM2's 30 layers: 84 s for the 8 variants of a base-only engine, without LoRA).
# A layer compiled once serves every depth; the price is one dispatch per layer (~20-40 us).
@jax.jit
def _embed(embedding, tokens, prev_tokens, from_prev):
    """x [T, d] of the step's tokens. Tokens with `from_prev` >= 0 are the previous step's
    sampled tokens (`prev_tokens` [S], still on the device: the host planned this step
    without them)."""
    _TRACES["embed"] += 1
    tokens = jnp.where(from_prev >= 0, prev_tokens[jnp.maximum(from_prev, 0)], tokens)
    return embedding[tokens]


@functools.partial(jax.jit, static_argnames=("graphdef", "use_lora", "impl", "bridge", "pad",
                                             "block"), donate_argnames=("cache",))
def _layer(graphdef, state, layer, x, cache: PagedKVCache, batch: StepBatch, inv_freq, lora,
           seg_slots, cpu_rows, cpu_ids, compact, *, use_lora: bool, impl: str, bridge,
           pad: bool, block: int):
    """Decoder layer `layer` (int32 scalar: traced, so one compile serves every layer) over
    the step's flattened batch: x [T, d] -> x, and the cache with its keys and values written
    (donated: in place)."""
    _TRACES["step"] += 1
    blk = nnx.merge(graphdef.value, state)
    L, N = cache.k.shape[:2]
    k_flat = cache.k.reshape(L * N, *cache.k.shape[2:])  # [L * N, kv_heads, page, head_dim]
    v_flat = cache.v.reshape(L * N, *cache.v.shape[2:])
    cpu = (bridge, cpu_rows, cpu_ids) if bridge is not None else None
    hook = _hook(lora, batch, seg_slots, cpu, use_lora, impl, pad, compact)
    x, k_flat, v_flat = blk(x, layer, batch, k_flat, v_flat, N, inv_freq, hook, block)
    return x, PagedKVCache(k=k_flat.reshape(cache.k.shape), v=v_flat.reshape(cache.v.shape))


@functools.partial(jax.jit, static_argnames=("eps", "tied"))
def _head(x, logit_rows, norm_weight, out, *, eps: float, tied: bool):
    """float32 logits [R, V] at the step's `logit_rows`."""
    _TRACES["head"] += 1
    return output_logits(x[logit_rows], norm_weight, eps, out, tied)


@jax.jit
def _compact_plan(lora, batch: StepBatch, seg_slots):
    """The step's plan for the compact LoRA form (`jnp_ops.CompactPlan`), once for all layers."""
    _TRACES["lora_plan"] += 1
    starts = batch.query_starts[:-1]
    return step_compact_plan(lora, starts, batch.query_starts[1:] - starts, seg_slots,
                             batch.tokens.shape[0])


@functools.partial(jax.jit, static_argnames=("size",))
def _sample(logits, sampling, size: int):
    """The step's tokens, int32 [size] (the first R are the logit rows'; size = max_batch_size,
    so the next step's forward reads them with one shape). Its own jit (dispatched right after
    the forward, no sync between): its variants follow R alone, so the forward's many token
    buckets do not each compile the sampler again (~1 s each on CPU)."""
    _TRACES["sample"] += 1
    tokens = sample_tokens(logits, *sampling)
    return jnp.pad(tokens, (0, size - tokens.shape[0]))


def _greedy(R: int) -> tuple:
    """Sampling arrays of R greedy rows (temperature, top_k, top_p, seeds, steps)."""
    return (np.zeros(R, np.float32), np.zeros(R, np.int32), np.ones(R, np.float32),
            np.zeros(R, np.uint32), np.zeros(R, np.int32))


@dataclasses.dataclass
class StepInputs:
    """Host arrays of one step (numpy), before they go to the device."""

    batch: StepBatch
    seg_slots: np.ndarray  # int32 [S]
    cpu_rows: np.ndarray  # int32 [C]: token rows whose LoRA comes from the CPU; T: padding
    cpu_ids: np.ndarray  # int32 [C]
    sampling: tuple  # temperature, top_k, top_p, seeds, steps: [R] each
    block: int  # query / token block: 1 for a decode-only step
    samplers: list[tuple[int, Request]]  # (logit row, request) of the chunks that sample
    from_prev: np.ndarray  # int32 [T]: row of the previous step's tokens to read; -1: `tokens`


class ModelRunner:
    """Device state (params, KV pages) and the compiled step."""

    def __init__(self, model: Llama, config: EngineConfig, pool, bridge):
        self.model_config = model.config
        self.config = config
        self.pool = pool  # AdapterPool: its `weights` are the device LoRA pages
        self.bridge = bridge  # CpuAssistBridge: host side of the CPU-assist callbacks
        self.graphdef, self.state = nnx.split(model)
        self.dtype = model.embed_tokens.value.dtype
        # `auto`'s kernels on this device (GPU only; returns at once on CPU). Before anything is
        # traced (the attention reads the choice at trace time).
        self.kernel_choices = kernel_timing.warm_up(model.config, config, self.dtype)
        self.lora_impl = resolve_lora_impl(config.lora_impl)
        # Static per engine (one compiled variant set); the jnp path ignores it.
        self.pad = config.lora_kernel == "padded"
        self.seq_len = config.seq_len(model.config)
        self.layout = KVLayout.for_engine(config, model.config, np.dtype(self.dtype).itemsize)
        self.cache = PagedKVCache.zeros(model.config, self.layout.num_pages,
                                        self.layout.page_size, self.dtype)
        self.mesh = None
        if config.tp > 1:  # shard once; GSPMD propagates these shardings through the plain jits
            parallel.check_tp(model.config, config.tp)
            self.mesh = parallel.make_mesh(config.tp)
            self.state = parallel.shard_params(self.state, self.mesh)
            self.cache = parallel.shard_cache(self.cache, self.mesh)
            pool.shard(parallel.lora_shardings(pool.weights, self.mesh))
        self._split_layers()
        # The last launched step's sampled tokens (device, [S]) and each sampling request's row
        # in them: what a step planned before reading them feeds its PENDING tokens from.
        self._prev_tokens = jnp.zeros(config.max_batch_size, jnp.int32)
        self._prev_rows: dict[Request, int] = {}

    def _split_layers(self) -> None:
        """Per-layer views of `state` for the compiled layer (the same arrays, no copy): one
        graph definition (every layer has the same structure), each layer's state, its index
        as a device scalar; and the embedding and head weights."""
        model = nnx.merge(self.graphdef, self.state)
        self.layer_graphdef = Static(nnx.graphdef(model.layers[0]))
        self.layer_states = [nnx.state(block) for block in model.layers]
        self.layer_ids = [jnp.asarray(i, jnp.int32) for i in range(len(model.layers))]
        self.embedding = model.embed_tokens.value
        self.inv_freq = model.inv_freq.value
        self.norm_weight, self.norm_eps = model.norm.weight.value, model.norm.eps
        self.out_weight, self.tied = model.output_weight()

    @staticmethod
    def compiled_variants() -> dict[str, int]:
        """How many variants of each jitted function have been compiled in this process."""
        return dict(_TRACES)

    def score(self, token_ids: list[int], slot: int) -> np.ndarray:
        """float32 [T, vocab] logits of a whole sequence (slot -1: base model only)."""
        T = len(token_ids)
        Tb = bucket(T, self.config.min_prefill_bucket)
        batch, pages = dense_batch(1, Tb, self.layout.page_size)
        tokens = np.zeros(Tb, np.int32)
        tokens[:T] = token_ids
        batch = dataclasses.replace(batch, tokens=jnp.asarray(tokens))
        scratch = PagedKVCache.zeros(self.model_config, pages, self.layout.page_size, self.dtype)
        # The serving step's pieces (embedding, the one compiled layer, head at every row), not
        # the whole model as one program (`_score`), whose compile grows with depth: SmolLM2's 30
        # layers with LoRA took ~40 s to compile, one layer a few.
        seg_slots, none = np.array([slot], np.int32), np.zeros(0, np.int32)  # no CPU-assisted rows
        logits, _ = self._forward(batch, seg_slots, none, none, np.full(Tb, -1, np.int32), scratch,
                                  use_lora=slot >= 0, bridge=None, block=self.query_block(Tb, False))
        return np.asarray(logits[:T])

    # -- the step ------------------------------------------------------------------------------
    def token_bucket(self, T: int, decode_only: bool) -> int:
        """Padded token count: powers of two, from min(8, max_batch_size) for decode-only steps
        and from `min_prefill_bucket` for steps with prefill chunks."""
        lo = min(8, self.config.max_batch_size) if decode_only else self.config.min_prefill_bucket
        return bucket(T, lo)

    @staticmethod
    def cpu_rows_bucket(n: int, T: int) -> int:
        """Rows a CPU-assist step gathers for the host, for n cold rows in a step of T: 8, 32,
        128, ... (at most 4x the cold rows, never the whole step for a few more than 8), capped
        at T; a few variants per token bucket, all warmed up."""
        c = CPU_ROWS_SMALL
        while c < n:
            c *= CPU_ROWS_GROWTH
        return min(T, c)

    def cpu_rows_buckets(self, T: int) -> list[int]:
        """Every `cpu_rows_bucket` a step of T tokens can take."""
        return sorted({self.cpu_rows_bucket(n, T) for n in range(1, T + 1)})

    def query_block(self, T: int, decode_only: bool) -> int:
        """The attention's query block for a step of T (bucketed) tokens; static per variant."""
        return step_query_block(T, self.config.max_batch_size, decode_only)

    @property
    def device_platform(self) -> str:
        """Where the step runs: "cpu", "gpu" or "tpu" (the platform holding the weights)."""
        return next(iter(self.embedding.devices())).platform

    @property
    def table_width(self) -> int:
        """Block-table width: always the longest context's pages. The attention walks the pages
        in chunks and skips those past the step's longest context, so the width costs nothing
        and is no compiled-variant axis."""
        return self.layout.max_pages_per_seq

    def prepare(self, plan: Schedule, table: Callable[[Request], list[int]],
                cpu_ids: dict[str, int]) -> StepInputs:
        """The step's host arrays: tokens, positions, KV write slots, block tables, LoRA
        segments and the sampling parameters of the sequences that reach their end."""
        cfg, ps = self.config, self.layout.page_size
        chunks = plan.chunks
        S = cfg.max_batch_size
        T = sum(c.length for c in chunks)
        decode_only = all(c.length == 1 for c in chunks)
        Tb = self.token_bucket(T, decode_only)
        tables = [table(c.request) for c in chunks]
        Pb = self.table_width
        R = min(Tb, S)
        tokens = np.zeros(Tb, np.int32)
        positions = np.zeros(Tb, np.int32)
        slots = np.full(Tb, -1, np.int32)
        block_tables = np.zeros((S, Pb), np.int32)
        seq_lens = np.zeros(S, np.int32)
        query_starts = np.full(S + 1, T, np.int32)
        logit_rows = np.zeros(R, np.int32)
        from_prev = np.full(Tb, -1, np.int32)
        seg_slots = np.full(S, -1, np.int32)
        temperature, top_k, top_p, seeds, steps = _greedy(R)  # rows that do not sample: greedy
        cpu_rows, cpu_owner, samplers = [], [], []
        o = 0
        for i, (c, tab) in enumerate(zip(chunks, tables)):
            req, n = c.request, c.length
            end = o + n
            pos = np.arange(c.start, c.start + n, dtype=np.int32)
            tokens[o:end] = req.token_ids(c.start, c.start + n)
            if req.pending and c.start + n == req.num_tokens:  # its last token is PENDING
                from_prev[end - 1] = self._prev_rows[req]
                tokens[end - 1] = 0
            positions[o:end] = pos
            tab = np.asarray(tab, np.int32)
            slots[o:end] = tab[pos // ps] * ps + pos % ps
            block_tables[i, :len(tab)] = tab
            seq_lens[i] = c.start + n
            query_starts[i] = o
            logit_rows[i] = end - 1
            if c.path in ("device", "load"):
                seg_slots[i] = self.pool.slot(req.adapter)
            elif c.path == "cpu":
                cpu_rows.extend(range(o, end))
                cpu_owner.extend([cpu_ids[req.adapter]] * n)
            if c.samples:
                p = req.sampling
                temperature[i], top_k[i], top_p[i] = p.temperature, p.top_k, p.top_p
                seeds[i], steps[i] = req.seed, req.generated
                samplers.append((i, req))
            o = end
        query_starts[len(chunks):] = T
        C = self.cpu_rows_bucket(len(cpu_rows), Tb) if cpu_rows else 0
        rows = np.full(C, Tb, np.int32)
        rows[:len(cpu_rows)] = cpu_rows
        owners = np.full(C, -1, np.int32)
        owners[:len(cpu_owner)] = cpu_owner
        batch = StepBatch(tokens=tokens, positions=positions, slots=slots,
                          block_tables=block_tables, seq_lens=seq_lens, query_starts=query_starts,
                          logit_rows=logit_rows)
        return StepInputs(batch, seg_slots, rows, owners,
                          (temperature, top_k, top_p, seeds, steps),
                          self.query_block(Tb, decode_only), samplers, from_prev)

    def launch(self, inputs: StepInputs) -> tuple[jax.Array, jax.Array]:
        """Dispatch the step (asynchronously); returns (tokens [R], logits [R, V]) on the device
        and keeps the updated cache."""
        use_cpu = inputs.cpu_rows.size > 0
        logits, self.cache = self._forward(
            inputs.batch, inputs.seg_slots, inputs.cpu_rows, inputs.cpu_ids, inputs.from_prev,
            self.cache, use_lora=self._use_lora(inputs.seg_slots),
            bridge=self.bridge if use_cpu else None, block=inputs.block)
        tokens = _sample(logits, inputs.sampling, self.config.max_batch_size)
        self._prev_tokens, self._prev_rows = tokens, {req: i for i, req in inputs.samplers}
        return tokens, logits

    def _forward(self, batch: StepBatch, seg_slots, cpu_rows, cpu_ids, from_prev, cache, *,
                 use_lora: bool, bridge, block: int) -> tuple[jax.Array, PagedKVCache]:
        """One step's forward: embedding, every layer, head; float32 logits [R, V] at
        `logit_rows`, and `cache` with the step's keys and values written (donated). Host arrays
        go to the device once, not once per layer."""
        batch, seg_slots, cpu_rows, cpu_ids, from_prev = _to_device(
            (batch, seg_slots, cpu_rows, cpu_ids, from_prev))
        x = _embed(self.embedding, batch.tokens, self._prev_tokens, from_prev)
        compact = self._compact(batch, seg_slots, use_lora)
        static = dict(use_lora=use_lora, impl=self.lora_impl, pad=self.pad, bridge=bridge,
                      block=block)
        for state, layer in zip(self.layer_states, self.layer_ids):
            x, cache = _layer(self.layer_graphdef, state, layer, x, cache, batch, self.inv_freq,
                              self.pool.weights, seg_slots, cpu_rows, cpu_ids, compact, **static)
        return _head(x, batch.logit_rows, self.norm_weight, self.out_weight, eps=self.norm_eps,
                     tied=self.tied), cache

    def _compact(self, batch: StepBatch, seg_slots, use_lora: bool):
        """The step's compact-form LoRA plan, built once per step rather than in every layer,
        where the jnp forms run (decode shapes run the compact form, prefill shapes may: see
        `jnp_ops.prefill_uses_compact`); else None."""
        if not use_lora or self.lora_impl != "reference":
            return None
        return _compact_plan(self.pool.weights, batch, seg_slots)

    def run(self, plan: Schedule, table: Callable[[Request], list[int]], cpu_ids: dict[str, int]
            ) -> tuple[dict[Request, int], dict[Request, str]]:
        """Run a step: sampled tokens of the requests that produce one, and failed requests."""
        inputs = self.prepare(plan, table, cpu_ids)
        return self.collect(plan, inputs, self.launch(inputs)[0], cpu_ids)

    @staticmethod
    def wait(tokens: jax.Array) -> np.ndarray:
        """Block until a launched step's sampled tokens reach the host: the one sync of a step.
        It reads nothing but `tokens`, so the engine calls it without its lock."""
        return np.asarray(tokens)

    def collect(self, plan: Schedule, inputs: StepInputs, tokens: jax.Array | np.ndarray,
                cpu_ids: dict[str, int]) -> tuple[dict[Request, int], dict[Request, str]]:
        """A launched step's results: {request: token} of the sampling chunks, and the requests
        whose CPU LoRA failed. `tokens` already on the host (`wait`) makes this host work only."""
        sampled = np.asarray(tokens)  # no-op on `wait`'s host array; a device array waits here
        out = {req: int(sampled[i]) for i, req in inputs.samplers}
        failed = {}
        # Only a step with CPU chunks takes the bridge's errors: under async scheduling the
        # step launched after this one may be a CPU step whose callbacks already failed, and
        # its errors must be left for its own collect.
        cpu = any(c.path == "cpu" for c in plan.chunks)
        errors = self.bridge.take_errors() if cpu else {}
        for c in plan.chunks:  # CPU-LoRA failures fail only their requests
            cid = cpu_ids.get(c.request.adapter)
            if c.path == "cpu" and cid in errors:
                err = errors[cid]
                failed[c.request] = (f"CPU LoRA for adapter {c.request.adapter!r} failed: "
                                     f"{type(err).__name__}: {err}")
        return {r: t for r, t in out.items() if r not in failed}, failed

    def _use_lora(self, slots: np.ndarray) -> bool:
        # With adapters registered, every step takes the LoRA variant (sequences without a device
        # adapter pass slot -1 and cost ~nothing). One variant instead of two per shape halves
        # compilation; base-only engines never pay.
        return bool((slots >= 0).any()) or len(self.pool) > 0

    def warmup(self, cpu: bool, progress: Callable[[int, int], None] | None = None) -> int:
        """Compile the step variants serving will use: every token bucket (decode-only and
        mixed, to the bucket of `step_token_limit`), with CPU assist if asked, and the sampler per logit-row
        count. Variants are traced here and
        compiled on a thread per core (XLA compiles outside the GIL; the ahead-of-time compiles
        fill the same cache the step dispatches from). `progress(done, total)` after each.
        Returns how many variants this compiled."""
        cfg = self.config
        decode = sorted({self.token_bucket(1 << i, True)
                         for i in range(bucket(cfg.max_batch_size, 1).bit_length())})
        mixed = sorted({self.token_bucket(1 << i, False)
                        for i in range(bucket(cfg.step_token_limit, 1).bit_length())})
        shapes = ([(T, self.query_block(T, True)) for T in decode]
                  + [(T, self.query_block(T, False)) for T in mixed])
        before = sum(_TRACES.values())
        lowered = []
        for bridge in ((None, self.bridge) if cpu else (None,)):
            for T, block in shapes:
                for C in (self.cpu_rows_buckets(T) if bridge else (0,)):
                    lowered += self._lowered(T, block, bridge, C, embed_and_head=bridge is None)
        for R in sorted({min(T, cfg.max_batch_size) for T, _ in shapes}):
            logits = jax.ShapeDtypeStruct((R, self.model_config.vocab_size), jnp.float32)
            lowered.append(_sample.lower(logits, _greedy(R), cfg.max_batch_size))
        done = 0
        pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1)
        try:
            for _ in concurrent.futures.as_completed([pool.submit(lw.compile) for lw in lowered]):
                done += 1
                if progress is not None:
                    progress(done, len(lowered))
        finally:  # interrupted (a signal stops a starting worker): drop the compiles not begun
            pool.shutdown(wait=True, cancel_futures=True)
        return sum(_TRACES.values()) - before

    def _dry_inputs(self, T: int, bridge, C: int | None = None, cold_id: int = -1):
        """Host arrays of a step of T padding tokens (every KV write dropped, no sequence
        attends): batch, seg_slots, cpu_rows, cpu_ids, from_prev. `cold_id` >= 0: the first C
        rows are cold rows of that bridge id (the host computes their LoRA for real)."""
        S = self.config.max_batch_size
        R = min(T, S)
        batch = StepBatch(tokens=np.zeros(T, np.int32), positions=np.zeros(T, np.int32),
                          slots=np.full(T, -1, np.int32),
                          block_tables=np.zeros((S, self.table_width), np.int32),
                          seq_lens=np.zeros(S, np.int32), query_starts=np.zeros(S + 1, np.int32),
                          logit_rows=np.zeros(R, np.int32))
        if C is None:
            C = self.cpu_rows_bucket(1, T) if bridge is not None else 0
        rows, ids = np.full(C, T, np.int32), np.full(C, -1, np.int32)
        if cold_id >= 0:
            rows[:], ids[:] = np.arange(C), cold_id
        return batch, np.full(S, -1, np.int32), rows, ids, np.full(T, -1, np.int32)

    def _lowered(self, T: int, block: int, bridge, C: int, embed_and_head: bool = True) -> list:
        """The step's compiled pieces for T tokens, lowered (not compiled): the layer, and
        the embedding, LoRA plan and head (which do not depend on CPU assist)."""
        batch, seg_slots, cpu_rows, cpu_ids, from_prev = self._dry_inputs(T, bridge, C)
        use_lora = len(self.pool) > 0
        compact = self._compact(batch, seg_slots, use_lora)  # traces the plan: small
        x = jax.ShapeDtypeStruct((T, self.model_config.hidden_size), self.dtype)
        out = [_layer.lower(self.layer_graphdef, self.layer_states[0], self.layer_ids[0], x,
                            self.cache, batch, self.inv_freq, self.pool.weights, seg_slots,
                            cpu_rows, cpu_ids, compact, use_lora=use_lora, impl=self.lora_impl,
                            pad=self.pad, bridge=bridge, block=block)]
        if embed_and_head:
            out.append(_embed.lower(self.embedding, batch.tokens, self._prev_tokens, from_prev))
            out.append(_head.lower(x, batch.logit_rows, self.norm_weight, self.out_weight,
                                   eps=self.norm_eps, tied=self.tied))
        return out

    def dry_step(self, T: int, block: int | None = None, bridge=None, cold_id: int = -1) -> None:
        """A step of T padding tokens, to time the projections of T tokens; waits for it. With a
        bridge and `cold_id`: every row cold under that bridge id, as a CPU-assisted prefill
        chunk of T tokens runs."""
        T = bucket(T, 1)
        block = self.query_block(T, False) if block is None else block
        C = None if cold_id < 0 else self.cpu_rows_bucket(T, T)
        batch, seg_slots, cpu_rows, cpu_ids, from_prev = self._dry_inputs(T, bridge, C, cold_id)
        logits, self.cache = self._forward(batch, seg_slots, cpu_rows, cpu_ids, from_prev,
                                           self.cache, use_lora=len(self.pool) > 0,
                                           bridge=bridge, block=block)
        jax.block_until_ready(_sample(logits, _greedy(logits.shape[0]), self.config.max_batch_size))
