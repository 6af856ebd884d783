"""A Llama decoder in Flax NNX over a flattened ragged batch and a paged KV cache.

One forward takes every token the step schedules, prefill chunks and decode tokens together, as
one `[T]` array (sequence after sequence, the `StepBatch`), with a LoRA hook on every target
projection. Each layer is its own `Block` with its own arrays (`layers[i]`, named as HF's
`model.layers.{i}.*`), and the forward is an unrolled Python loop over them. Not a `lax.scan`
over stacked `[L, ...]` weights: on XLA:CPU the scan copies each layer's weight slice before its
matmuls (measured: a 4-layer decode step of 16 tokens, hidden 512, 21.6 ms scanned vs 15.0 ms
over per-layer arrays; 512 tokens 162 vs 90 ms; static slices of stacked arrays were worse
still, 49.8 ms). The price is compile time, which grows with depth.

Keys and values live in pages (`PagedKVCache`: `[L, pages, kv_heads, page_size, head_dim]`); a
sequence's block table names its pages. The forward sees the cache as one flat pool of
`L * pages` pages (a free reshape) and layer l's tables are offset by `l * pages`, so each layer
writes and reads only the pages the batch uses, in place.

Numerics follow Hugging Face `LlamaForCausalLM`: norms and softmax in float32, the rotate-half
rotary convention, llama3 frequency scaling.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from carajax.config import ModelConfig
from carajax.models.attention import paged_attention, write_pages


class LoraHook(Protocol):
    """What the model asks of the LoRA side: the deltas to add to projections' outputs."""

    def __call__(self, layer: int, modules: tuple[str, ...], x: jax.Array
                 ) -> tuple[jax.Array | None, ...]:
        """layer: the layer's index (a Python int, or a traced int32 scalar where one compiled
        layer serves every layer); x: [T, d_in], the input shared by
        `modules` (q/k/v, gate/up, or one of o/down) -> per module a delta [T, d_out] or None."""
        ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    """Keys and values of every layer in fixed-size pages; a page holds `page_size` positions
    of one sequence. Which pages a sequence owns is host bookkeeping (`carajax.engine.kv_pages`)."""

    k: jax.Array  # [L, num_pages, kv_heads, page_size, head_dim]: head-major (see attention.py)
    v: jax.Array  # [L, num_pages, kv_heads, page_size, head_dim]

    @classmethod
    def zeros(cls, config: ModelConfig, num_pages: int, page_size: int, dtype) -> PagedKVCache:
        shape = (config.num_layers, num_pages, config.num_kv_heads, page_size, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepBatch:
    """One step's flattened ragged batch (device arrays; the runner builds it on the host).

    Sequence s owns tokens `query_starts[s]:query_starts[s+1]`, at context positions ending at
    `seq_lens[s] - 1`. Tokens past `query_starts[S]` and sequences with `seq_lens` 0 are padding.
    """

    tokens: jax.Array  # int32 [T]
    positions: jax.Array  # int32 [T]
    slots: jax.Array  # int32 [T]: KV write slot page * page_size + offset; -1: padding (dropped)
    block_tables: jax.Array  # int32 [S, P]: pages of each sequence (P: the batch's max, bucketed)
    seq_lens: jax.Array  # int32 [S]: context length including this step's tokens
    query_starts: jax.Array  # int32 [S + 1]
    logit_rows: jax.Array  # int32 [R]: the tokens whose next-token logits the step needs


def dense_batch(num_seqs: int, seq_len: int, page_size: int) -> tuple[StepBatch, int]:
    """A StepBatch of `num_seqs` whole sequences of `seq_len` tokens from position 0, each in its
    own consecutive pages, with logits at every token; and the page count it needs. For scoring
    and training: `tokens` is left zero (fill it with `dataclasses.replace`)."""
    P = -(-seq_len // page_size)
    T = num_seqs * seq_len
    pos = np.tile(np.arange(seq_len, dtype=np.int32), num_seqs)  # [T]
    seq = np.repeat(np.arange(num_seqs, dtype=np.int32), seq_len)  # [T]
    batch = StepBatch(
        tokens=jnp.zeros(T, jnp.int32), positions=jnp.asarray(pos),
        slots=jnp.asarray(seq * P * page_size + pos),
        block_tables=jnp.asarray(np.arange(num_seqs * P, dtype=np.int32).reshape(num_seqs, P)),
        seq_lens=jnp.full(num_seqs, seq_len, jnp.int32),
        query_starts=jnp.asarray(np.arange(num_seqs + 1, dtype=np.int32) * seq_len),
        logit_rows=jnp.arange(T, dtype=jnp.int32))
    return batch, num_seqs * P


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies [head_dim // 2], with llama3 scaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq.astype(np.float32)
    # Llama 3: leave high frequencies alone, divide low ones by `factor`, interpolate between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [..., heads, head_dim], positions: [...] -> x rotated (HF rotate-half convention)."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [..., head_dim // 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]  # [..., 1, head_dim]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Linear(nnx.Module):
    """y = x @ kernel, kernel [d_in, d_out] (HF stores the transpose); no bias, as in Llama."""

    def __init__(self, d_in: int, d_out: int, *, dtype, rngs: nnx.Rngs, std: float = 0.02):
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (d_in, d_out), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel.value


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF's LlamaRMSNorm: normalised in float32, scaled in the input's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def output_logits(x: jax.Array, norm_weight: jax.Array, eps: float, out: jax.Array,
                  tied: bool) -> jax.Array:
    """The final norm and the LM head: x [R, d] -> float32 logits [R, vocab]. `out`: the
    embedding [vocab, d] when tied, else lm_head's kernel [d, vocab]."""
    x = rms_norm(x, norm_weight, eps)
    return (x @ out.T if tied else x @ out).astype(jnp.float32)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight.value, self.eps)


def _project(projs: tuple[Linear, ...], x: jax.Array, lora: LoraHook | None, layer: int,
             names: tuple[str, ...]) -> tuple[jax.Array, ...]:
    """The LoRA hook point of projections that read the same x: y = x W (+ s (x A) B for each
    token's adapter). Asked together, so a host callback can serve all of them in one call."""
    ys = tuple(p(x) for p in projs)
    deltas = (None,) * len(ys) if lora is None else lora(layer, names, x)
    return tuple(y if d is None else y + d.astype(y.dtype) for y, d in zip(ys, deltas))


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, std: float):
        c = config
        self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        lin = functools.partial(Linear, dtype=dtype, rngs=rngs, std=std)
        self.q_proj = lin(c.hidden_size, c.num_heads * c.head_dim)
        self.k_proj = lin(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.v_proj = lin(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.o_proj = lin(c.num_heads * c.head_dim, c.hidden_size)

    def __call__(self, x, layer, batch: StepBatch, k_flat, v_flat, pages_per_layer, inv_freq,
                 lora, query_block):
        T = x.shape[0]
        q, k, v = _project((self.q_proj, self.k_proj, self.v_proj), x, lora, layer,
                           ("q_proj", "k_proj", "v_proj"))
        q = apply_rope(q.reshape(T, self.heads, self.head_dim), batch.positions, inv_freq)
        k = apply_rope(k.reshape(T, self.kv_heads, self.head_dim), batch.positions, inv_freq)
        v = v.reshape(T, self.kv_heads, self.head_dim)
        # This layer's pages are [layer * N, (layer + 1) * N) of the flat pool.
        offset = layer * pages_per_layer
        page_size = k_flat.shape[2]
        slots = jnp.where(batch.slots >= 0, batch.slots + offset * page_size, -1)
        k_flat, v_flat = write_pages(k_flat, v_flat, k, v, slots)
        out = paged_attention(q, k_flat, v_flat, batch.block_tables + offset, batch.seq_lens,
                              batch.query_starts, query_block=query_block)  # [T, heads, head_dim]
        (out,) = _project((self.o_proj,), out.reshape(T, -1), lora, layer, ("o_proj",))
        return out, k_flat, v_flat


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, std: float):
        d, f = config.hidden_size, config.intermediate_size
        lin = functools.partial(Linear, dtype=dtype, rngs=rngs, std=std)
        self.gate_proj, self.up_proj, self.down_proj = lin(d, f), lin(d, f), lin(f, d)

    def __call__(self, x, layer, lora):
        gate, up = _project((self.gate_proj, self.up_proj), x, lora, layer,
                            ("gate_proj", "up_proj"))
        (down,) = _project((self.down_proj,), jax.nn.silu(gate) * up, lora, layer,
                           ("down_proj",))
        return down


class Block(nnx.Module):
    """One decoder layer (HF's `LlamaDecoderLayer`)."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, std: float):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs, std=std)
        self.post_attention_layernorm = RMSNorm(d, eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs, std=std)

    def __call__(self, x, layer, batch, k_flat, v_flat, pages_per_layer, inv_freq, lora,
                 query_block):
        """x [T, d] -> x after this layer, and the flat KV pools with its keys and values
        written. `layer`: a Python int (the model's unrolled loop) or a traced int32 scalar
        (the engine runs one compiled layer for every layer)."""
        h, k_flat, v_flat = self.self_attn(self.input_layernorm(x), layer, batch, k_flat, v_flat,
                                           pages_per_layer, inv_freq, lora, query_block)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), layer, lora)
        return x, k_flat, v_flat


class Llama(nnx.Module):
    """Llama for causal LM. Parameter names mirror HF's."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 init_std: float = 0.02):
        self.config = config
        self.embed_tokens = nnx.Param(init_std * jax.random.normal(
            rngs.params(), (config.vocab_size, config.hidden_size), dtype))
        self.layers = nnx.List([Block(config, dtype=dtype, rngs=rngs, std=init_std)
                                for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs,
                                  std=init_std)
        self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(config)))  # a constant, not a Param

    def __call__(self, batch: StepBatch, cache: PagedKVCache, lora: LoraHook | None = None, *,
                 query_block: int | None = None) -> tuple[jax.Array, PagedKVCache]:
        """float32 logits [R, vocab] of `batch.logit_rows`, and the cache with this step's keys
        and values written. `query_block`: the attention's static tuning knob."""
        x = self.embed_tokens.value[batch.tokens]  # [T, d]
        inv_freq = self.inv_freq.value
        L, N = cache.k.shape[:2]
        k_flat = cache.k.reshape(L * N, *cache.k.shape[2:])  # [L * N, kv_heads, page, head_dim]
        v_flat = cache.v.reshape(L * N, *cache.v.shape[2:])
        for layer, block in enumerate(self.layers):  # unrolled: see the module docstring
            x, k_flat, v_flat = block(x, layer, batch, k_flat, v_flat, N, inv_freq, lora,
                                      query_block)
        logits = output_logits(x[batch.logit_rows], self.norm.weight.value, self.norm.eps,
                               *self.output_weight())
        return logits, PagedKVCache(k=k_flat.reshape(cache.k.shape),
                                    v=v_flat.reshape(cache.v.shape))

    def output_weight(self) -> tuple[jax.Array, bool]:
        """The LM head's weight and whether it is the (tied) embedding: `output_logits`'s."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.value, True
        return self.lm_head.kernel.value, False
