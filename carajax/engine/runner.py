"""The model runner: the one place that touches the device.

It holds the model's parameters (split from the NNX module, so the hot path is plain `jax.jit`)
and the KV cache, reads the adapter pool's device weights, and runs a `Schedule`: one forward for
the step's prefill chunks and one for its decode tokens, then sampling. Shapes are bucketed to
powers of two so compiled variants stay few; `compiled_variants` counts them (each trace of a
jitted function is one compilation). Steps without CPU-assisted rows use variants without the
host callbacks, so warm steps pay nothing for them; engines with no adapter registered use
variants without LoRA.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from carajax import parallel
from carajax.config import EngineConfig
from carajax.engine.planner import Schedule
from carajax.engine.request import Request
from carajax.engine.sampling import SamplingParams, sample, sampling_arrays
from carajax.lora.hook import BatchLora, resolve_lora_impl
from carajax.models.llama import KVCache, Llama

# Incremented at trace time only: one count per compiled variant.
_TRACES: collections.Counter[str] = collections.Counter()


def bucket(n: int, minimum: int) -> int:
    """The padded size for n: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def _hook(lora, row_slots, cpu_ids, row_lens, use_lora, impl, bridge, pad=False):
    if not use_lora and bridge is None:
        return None
    return BatchLora(lora if use_lora else None, row_slots, row_lens, impl,
                     cpu=(bridge, cpu_ids) if bridge is not None else None, pad_to_max_rank=pad)


@functools.partial(jax.jit, static_argnames=("graphdef", "use_lora", "impl", "pad"))
def _score(graphdef, state, lora, tokens, row_slots, row_lens, *, use_lora: bool, impl: str,
           pad: bool = False):
    """Full-sequence logits [B, T, V] of rows of tokens [B, T] from position 0, no KV cache kept."""
    _TRACES["score"] += 1
    model: Llama = nnx.merge(graphdef, state)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cache = KVCache.zeros(model.config, B, T, model.embed_tokens.value.dtype)
    hook = _hook(lora, row_slots, None, row_lens, use_lora, impl, None, pad)
    logits, _ = model(tokens, positions, cache, jnp.arange(B, dtype=jnp.int32), hook)
    return logits


@functools.partial(jax.jit, static_argnames=("graphdef", "use_lora", "impl", "bridge", "pad"),
                   donate_argnames=("cache",))
def _step(graphdef, state, lora, cache: KVCache, tokens, positions, rows, row_slots, cpu_ids,
          row_lens, logit_index, *, use_lora: bool, impl: str, bridge, pad: bool = False):
    """One prefill chunk or decode step: logits [B, V] at `logit_index`, and the updated cache.
    `pad`: the Pallas kernels pad every row to the batch's max rank (EngineConfig.lora_kernel)."""
    _TRACES["step"] += 1
    model: Llama = nnx.merge(graphdef, state)
    hook = _hook(lora, row_slots, cpu_ids, row_lens, use_lora, impl, bridge, pad)
    return model(tokens, positions, cache, rows, hook, logit_index)


class ModelRunner:
    """Device state (params, KV cache) and the compiled forward passes."""

    def __init__(self, model: Llama, config: EngineConfig, pool, bridge):
        self.model_config = model.config
        self.config = config
        self.pool = pool  # AdapterPool: its `weights` are the device LoRA pages
        self.bridge = bridge  # CpuAssistBridge: host side of the CPU-assist callbacks
        self.graphdef, self.state = nnx.split(model)
        self.dtype = model.embed_tokens.value.dtype
        self.lora_impl = resolve_lora_impl(config.lora_impl)
        # Static per engine (one compiled variant set); the jnp references ignore it.
        self.pad = config.lora_kernel == "padded"
        self.seq_len = config.seq_len(model.config)
        self.cache = KVCache.zeros(model.config, config.max_batch_size, self.seq_len, self.dtype)
        self.mesh = None
        if config.tp > 1:  # shard once; GSPMD propagates these shardings through the plain jits
            parallel.check_tp(model.config, config.tp)
            self.mesh = parallel.make_mesh(config.tp)
            self.state = parallel.shard_params(self.state, self.mesh)
            self.cache = parallel.shard_cache(self.cache, self.mesh)
            pool.shard(parallel.lora_shardings(pool.weights, self.mesh))

    @staticmethod
    def compiled_variants() -> dict[str, int]:
        """How many variants of each jitted function have been compiled in this process."""
        return dict(_TRACES)

    def score(self, token_ids: list[int], slot: int) -> np.ndarray:
        """float32 [T, vocab] logits of a whole sequence (slot -1: base model only)."""
        T = len(token_ids)
        tokens = np.zeros((1, bucket(T, self.config.min_prefill_bucket)), np.int32)
        tokens[0, :T] = token_ids
        logits = _score(self.graphdef, self.state, self.pool.weights, tokens,
                        np.array([slot], np.int32), np.array([T], np.int32),
                        use_lora=slot >= 0, impl=self.lora_impl, pad=self.pad)
        return np.asarray(logits[0, :T])

    def prefill(self, row: int, token_ids: list[int], slot: int, start: int = 0) -> jax.Array:
        """Prompt tokens into KV-cache row `row` from position `start`, with device LoRA slot
        `slot` (-1: none); logits [1, V] of the last token. (The profiler and tests use this.)"""
        T = len(token_ids)
        Tq = bucket(T, self.config.min_prefill_bucket)
        ids = np.zeros((1, Tq), np.int32)
        ids[0, :T] = token_ids
        return self._forward(ids, start + np.arange(Tq, dtype=np.int32)[None], [row], [slot],
                             [-1], [T])

    def decode(self, rows: list[int], last_tokens: list[int], positions: list[int],
               slots: list[int]) -> jax.Array:
        """One token per row at its position; logits [B, V] (B padded to a power of two)."""
        return self._forward(np.array(last_tokens, np.int32)[:, None],
                             np.array(positions, np.int32)[:, None], rows, slots,
                             [-1] * len(rows), [1] * len(rows))

    def run(self, plan: Schedule, cpu_ids: dict[str, int]
            ) -> tuple[dict[Request, int], dict[Request, str]]:
        """Run a step: sampled tokens of the requests that produce one, and failed requests."""

        def lora_args(pairs):  # (request, path) -> (rows, device slots, cpu ids)
            return ([r.row for r, _ in pairs],
                    [self.pool.slot(r.adapter) if p in ("device", "load") else -1 for r, p in pairs],
                    [cpu_ids[r.adapter] if p == "cpu" else -1 for r, p in pairs])

        tokens: dict[Request, int] = {}
        if plan.prefill:
            chunks = plan.prefill
            Tq = bucket(max(c.length for c in chunks), self.config.min_prefill_bucket)
            ids = np.zeros((len(chunks), Tq), np.int32)
            for i, c in enumerate(chunks):
                ids[i, :c.length] = c.request.prompt_ids[c.start:c.start + c.length]
            starts = np.array([c.start for c in chunks], np.int32)
            logits = self._forward(ids, starts[:, None] + np.arange(Tq, dtype=np.int32),
                                   *lora_args([(c.request, c.path) for c in chunks]),
                                   [c.length for c in chunks])
            done = [i for i, c in enumerate(chunks) if c.completes_prompt]
            tokens.update(self._sample(logits, [chunks[i].request for i in done], done))
        if plan.decode:
            items = plan.decode
            ids = np.array([[d.request.output_ids[-1]] for d in items], np.int32)
            pos = np.array([[d.request.last_position] for d in items], np.int32)
            logits = self._forward(ids, pos, *lora_args([(d.request, d.path) for d in items]),
                                   [1] * len(items))
            tokens.update(self._sample(logits, [d.request for d in items], range(len(items))))
        failed = {}
        errors = self.bridge.take_errors()
        for x in (*plan.prefill, *plan.decode):  # CPU-LoRA failures fail only their requests
            cid = cpu_ids.get(x.request.adapter)
            if x.path == "cpu" and cid in errors:
                err = errors[cid]
                failed[x.request] = (f"CPU LoRA for adapter {x.request.adapter!r} failed: "
                                     f"{type(err).__name__}: {err}")
        return {r: t for r, t in tokens.items() if r not in failed}, failed

    def _forward(self, ids, positions, rows, slots, cpu, lens) -> jax.Array:
        """Pad the batch to a power of two of rows and run the step; logits [B, V]."""
        n, Tq = ids.shape
        pad = bucket(n, 1) - n
        # Padding rows point past the cache: their writes are dropped, their outputs ignored.
        rows = np.array(list(rows) + [self.config.max_batch_size] * pad, np.int32)
        slots = np.array(list(slots) + [-1] * pad, np.int32)
        cpu = np.array(list(cpu) + [-1] * pad, np.int32)
        lens = np.array(list(lens) + [0] * pad, np.int32)
        ids = np.concatenate([ids, np.zeros((pad, Tq), np.int32)])
        positions = np.concatenate([positions, np.zeros((pad, Tq), np.int32)])
        use_cpu = bool((cpu >= 0).any())
        logits, self.cache = _step(
            self.graphdef, self.state, self.pool.weights, self.cache, ids, positions, rows,
            slots, cpu, lens, np.maximum(lens - 1, 0),
            use_lora=self._use_lora(slots), impl=self.lora_impl, pad=self.pad,
            bridge=self.bridge if use_cpu else None)
        return logits

    def _use_lora(self, slots: np.ndarray) -> bool:
        # With adapters registered, every step takes the LoRA variant (rows without a device
        # adapter pass slot -1 and cost ~nothing: the kernels skip their rank blocks). One
        # variant instead of two per shape halves compilation; base-only engines never pay.
        return bool((slots >= 0).any()) or len(self.pool) > 0

    def warmup(self, cpu: bool) -> int:
        """Compile every step variant the bucketing allows (batch rows and prefill lengths are
        powers of two; with and without CPU assist; with LoRA if adapters are registered, see
        `_use_lora`: call it after registering them), plus the sampler, by
        running each once on padding rows (their cache writes are dropped). Returns how many
        variants this compiled. Serving then never stops to compile."""
        before = sum(_TRACES.values())
        top = bucket(self.config.max_batch_size, 1)
        batches = [1 << i for i in range(top.bit_length())]
        lengths = [1] + [1 << i for i in range(self.config.min_prefill_bucket.bit_length() - 1,
                                                bucket(self.config.prefill_chunk, 1).bit_length())]
        for use_lora in (len(self.pool) > 0,):  # as `_use_lora` will choose
            for bridge in ((None, self.bridge) if cpu else (None,)):
                for B in batches:
                    for Tq in sorted(set(lengths)):
                        none = np.full(B, -1, np.int32)
                        _, self.cache = _step(
                            self.graphdef, self.state, self.pool.weights, self.cache,
                            np.zeros((B, Tq), np.int32), np.zeros((B, Tq), np.int32),
                            np.full(B, self.config.max_batch_size, np.int32), none, none,
                            np.ones(B, np.int32), np.zeros(B, np.int32), use_lora=use_lora,
                            impl=self.lora_impl, pad=self.pad, bridge=bridge)
        for B in batches:
            params = [SamplingParams()] * B
            sample(jnp.zeros((B, self.model_config.vocab_size)),
                   *sampling_arrays(params, [0] * B, [0] * B))
        jax.block_until_ready(self.cache.k[0])
        return sum(_TRACES.values()) - before

    def _sample(self, logits: jax.Array, reqs: list[Request], rows) -> dict[Request, int]:
        if not reqs:
            return {}
        rows = list(rows)
        picked = logits[np.array(rows)] if len(rows) != logits.shape[0] else logits
        B = bucket(len(reqs), 1)  # bucket the sampler's batch too
        picked = jnp.concatenate([picked, jnp.zeros((B - len(reqs), picked.shape[1]),
                                                    picked.dtype)])
        params = [r.sampling for r in reqs] + [reqs[0].sampling] * (B - len(reqs))
        seeds = [r.seed for r in reqs] + [0] * (B - len(reqs))
        steps = [len(r.output_ids) for r in reqs] + [0] * (B - len(reqs))
        out = np.asarray(sample(picked, *sampling_arrays(params, seeds, steps)))
        return {r: int(t) for r, t in zip(reqs, out)}
