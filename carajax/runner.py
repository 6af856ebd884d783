"""The model runner: the one place that touches the device.

It holds the model's parameters (split from the NNX module, so the hot path is plain `jax.jit`),
the KV cache and the device adapter slots, and runs the compiled forward passes. Shapes are
bucketed to powers of two so the number of compiled variants stays small; `compiled_variants`
counts them (each trace of a jitted function is one compilation).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from carajax.config import EngineConfig
from carajax.lora.hook import LoraWeights, SlotLora, resolve_lora_impl
from carajax.lora.slots import DeviceSlots
from carajax.models.llama import KVCache, Llama

# Incremented at trace time only: one count per compiled variant.
_TRACES: collections.Counter[str] = collections.Counter()


def bucket(n: int, minimum: int) -> int:
    """The padded size for n: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=("graphdef", "use_lora", "impl"))
def _score(graphdef, state, lora: LoraWeights, tokens, row_slots, row_lens, *, use_lora: bool,
           impl: str):
    """Full-sequence logits [B, T, V] of rows of tokens [B, T] from position 0, no KV cache kept."""
    _TRACES["score"] += 1
    model: Llama = nnx.merge(graphdef, state)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cache = KVCache.zeros(model.config, B, T, model.embed_tokens.value.dtype)
    hook = SlotLora(lora, row_slots, row_lens, impl) if use_lora else None
    logits, _ = model(tokens, positions, cache, jnp.arange(B, dtype=jnp.int32), hook)
    return logits


@functools.partial(jax.jit, static_argnames=("graphdef", "use_lora", "impl"),
                   donate_argnames=("cache",))
def _step(graphdef, state, lora: LoraWeights, cache: KVCache, tokens, positions, rows, row_slots,
          row_lens, logit_index, *, use_lora: bool, impl: str):
    """One prefill chunk or decode step: logits [B, V] at `logit_index`, and the updated cache."""
    _TRACES["step"] += 1
    model: Llama = nnx.merge(graphdef, state)
    hook = SlotLora(lora, row_slots, row_lens, impl) if use_lora else None
    return model(tokens, positions, cache, rows, hook, logit_index)


class ModelRunner:
    """Device state (params, KV cache, adapter slots) and the compiled forward passes."""

    def __init__(self, model: Llama, config: EngineConfig):
        self.model_config = model.config
        self.config = config
        self.graphdef, self.state = nnx.split(model)
        self.dtype = model.embed_tokens.value.dtype
        self.lora_impl = resolve_lora_impl(config.lora_impl)
        self.seq_len = config.seq_len(model.config)
        self.cache = KVCache.zeros(model.config, config.max_batch_size, self.seq_len, self.dtype)
        self.slots = DeviceSlots(model.config, num_slots=config.max_loras,
                                 r_max=config.max_lora_rank, dtype=self.dtype)

    @staticmethod
    def compiled_variants() -> dict[str, int]:
        """How many variants of each jitted function have been compiled in this process."""
        return dict(_TRACES)

    def score(self, token_ids: list[int], slot: int) -> np.ndarray:
        """float32 [T, vocab] logits of a whole sequence (slot -1: base model only)."""
        T = len(token_ids)
        Tp = bucket(T, self.config.min_prefill_bucket)
        tokens = np.zeros((1, Tp), np.int32)
        tokens[0, :T] = token_ids
        logits = _score(self.graphdef, self.state, self.slots.weights, tokens,
                        np.array([slot], np.int32), np.array([T], np.int32),
                        use_lora=slot >= 0, impl=self.lora_impl)
        return np.asarray(logits[0, :T])

    def prefill(self, row: int, token_ids: list[int], slot: int) -> jax.Array:
        """Prompt tokens into KV-cache row `row` from position 0; logits [1, V] of the last one."""
        T = len(token_ids)
        Tp = bucket(T, self.config.min_prefill_bucket)
        tokens = np.zeros((1, Tp), np.int32)
        tokens[0, :T] = token_ids
        positions = np.arange(Tp, dtype=np.int32)[None]
        return self._run(tokens, positions, [row], [slot], [T], [T - 1])

    def decode(self, rows: list[int], last_tokens: list[int], positions: list[int],
               slots: list[int]) -> jax.Array:
        """One token per row at its position; logits [B, V] (B padded to a power of two)."""
        B = bucket(len(rows), 1)
        pad = B - len(rows)
        # Padding rows point past the cache: their writes are dropped, their outputs ignored.
        rows_p = list(rows) + [self.config.max_batch_size] * pad
        tokens = np.array(list(last_tokens) + [0] * pad, np.int32)[:, None]
        pos = np.array(list(positions) + [0] * pad, np.int32)[:, None]
        return self._run(tokens, pos, rows_p, list(slots) + [-1] * pad,
                         [1] * len(rows) + [0] * pad, [0] * B)

    def _run(self, tokens, positions, rows, slots, lens, logit_index) -> jax.Array:
        slots = np.array(slots, np.int32)
        logits, self.cache = _step(
            self.graphdef, self.state, self.slots.weights, self.cache, tokens, positions,
            np.array(rows, np.int32), slots, np.array(lens, np.int32),
            np.array(logit_index, np.int32), use_lora=bool((slots >= 0).any()),
            impl=self.lora_impl)
        return logits
