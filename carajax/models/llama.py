"""A Llama decoder in Flax NNX: RMSNorm, rotary embeddings, grouped-query attention over a KV
cache, SwiGLU, and a LoRA hook on every target projection.

The forward pass takes a padded batch of rows: row b holds `Tq` tokens of one request, at
positions `positions[b]`, whose keys and values go to KV-cache row `rows[b]`. A prefill chunk is
`Tq` tokens of each prefilling request; a decode step is `Tq = 1`. Padding tokens sit past the end
of a row's valid tokens: their cache writes land beyond the request's length (and are overwritten
before anything reads them) or are dropped, and their outputs are ignored by the caller.

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


class LoraHook(Protocol):
    """What the model asks of the LoRA side: the deltas to add to projections' outputs."""

    def __call__(self, layer: int, modules: tuple[str, ...], x: jax.Array
                 ) -> tuple[jax.Array | None, ...]:
        """x: [B, Tq, d_in], the input shared by `modules` (q/k/v, gate/up, or one of o/down)
        -> per module a delta [B, Tq, d_out] (or None: no LoRA on that projection)."""
        ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per layer, keys and values for `rows` requests of up to `seq` tokens each."""

    k: list[jax.Array]  # per layer [rows, seq, kv_heads, head_dim]
    v: list[jax.Array]  # per layer [rows, seq, kv_heads, head_dim]

    @classmethod
    def zeros(cls, config: ModelConfig, rows: int, seq: int, dtype) -> KVCache:
        shape = (rows, seq, config.num_kv_heads, config.head_dim)
        return cls(k=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
                   v=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)])

    @property
    def seq_len(self) -> int:
        return self.k[0].shape[1]


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
    """x: [B, T, heads, head_dim], positions: [B, T] -> x rotated (HF rotate-half convention)."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, head_dim // 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, head_dim]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Linear(nnx.Module):
    """y = x @ kernel, kernel [d_in, d_out] (HF stores the transpose); no bias, as in Llama."""

    def __init__(self, d_in: int, d_out: int, *, dtype, rngs: nnx.Rngs, std: float = 0.02):
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (d_in, d_out), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel.value


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight.value * x32.astype(x.dtype)


def _project(projs: tuple[Linear, ...], x: jax.Array, lora: LoraHook | None, layer: int,
             names: tuple[str, ...]) -> tuple[jax.Array, ...]:
    """The LoRA hook point of projections that read the same x: y = x W (+ s (x A) B for each
    row's adapter). Asked together, so a host callback can serve all of them in one call."""
    ys = tuple(p(x) for p in projs)
    deltas = (None,) * len(ys) if lora is None else lora(layer, names, x)
    return tuple(y if d is None else y + d.astype(y.dtype) for y, d in zip(ys, deltas))


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs, std: float):
        c = config
        self.layer, self.heads, self.kv_heads, self.head_dim = (
            layer, c.num_heads, c.num_kv_heads, c.head_dim)
        lin = functools.partial(Linear, dtype=dtype, rngs=rngs, std=std)
        self.q_proj = lin(c.hidden_size, c.num_heads * c.head_dim)
        self.k_proj = lin(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.v_proj = lin(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.o_proj = lin(c.num_heads * c.head_dim, c.hidden_size)

    def __call__(self, x, positions, rows, k_cache, v_cache, inv_freq, lora):
        B, T, _ = x.shape
        i = self.layer
        q, k, v = _project((self.q_proj, self.k_proj, self.v_proj), x, lora, i,
                           ("q_proj", "k_proj", "v_proj"))
        q = q.reshape(B, T, self.heads, self.head_dim)
        k = k.reshape(B, T, self.kv_heads, self.head_dim)
        v = v.reshape(B, T, self.kv_heads, self.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

        # Write this step's keys/values into the cache; out-of-range rows/positions are dropped.
        r = jnp.broadcast_to(rows[:, None], (B, T))
        k_cache = k_cache.at[r, positions].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[r, positions].set(v.astype(v_cache.dtype), mode="drop")
        keys = k_cache.at[rows].get(mode="fill", fill_value=0)  # [B, S, kv_heads, head_dim]
        values = v_cache.at[rows].get(mode="fill", fill_value=0)  # [B, S, kv_heads, head_dim]

        # Grouped-query attention: query head h reads kv head h // group.
        group = self.heads // self.kv_heads
        qg = q.reshape(B, T, self.kv_heads, group, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys.astype(q.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(self.head_dim)
        visible = jnp.arange(keys.shape[1])[None, None, :] <= positions[:, :, None]  # [B, T, S]
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(q.dtype))
        out = out.reshape(B, T, self.heads * self.head_dim)
        (out,) = _project((self.o_proj,), out, lora, i, ("o_proj",))
        return out, k_cache, v_cache


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs, std: float):
        d, f = config.hidden_size, config.intermediate_size
        self.layer = layer
        lin = functools.partial(Linear, dtype=dtype, rngs=rngs, std=std)
        self.gate_proj, self.up_proj, self.down_proj = lin(d, f), lin(d, f), lin(f, d)

    def __call__(self, x, lora):
        i = self.layer
        gate, up = _project((self.gate_proj, self.up_proj), x, lora, i, ("gate_proj", "up_proj"))
        (down,) = _project((self.down_proj,), jax.nn.silu(gate) * up, lora, i, ("down_proj",))
        return down


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs, std: float):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(config, layer, dtype=dtype, rngs=rngs, std=std)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                                dtype=dtype)
        self.mlp = MLP(config, layer, dtype=dtype, rngs=rngs, std=std)

    def __call__(self, x, positions, rows, k_cache, v_cache, inv_freq, lora):
        h, k_cache, v_cache = self.self_attn(self.input_layernorm(x), positions, rows,
                                             k_cache, v_cache, inv_freq, lora)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), lora)
        return x, k_cache, v_cache


class Llama(nnx.Module):
    """Llama for causal LM. Parameter names mirror HF's so checkpoints map one to one."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 init_std: float = 0.02):
        self.config = config
        self.embed_tokens = nnx.Param(init_std * jax.random.normal(
            rngs.params(), (config.vocab_size, config.hidden_size), dtype))
        self.layers = nnx.List([Block(config, i, dtype=dtype, rngs=rngs, std=init_std)
                                for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs,
                                  std=init_std)
        self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(config)))  # a constant, not a Param

    def __call__(
        self,
        tokens: jax.Array,  # int32 [B, Tq]
        positions: jax.Array,  # int32 [B, Tq]
        cache: KVCache,
        rows: jax.Array,  # int32 [B]: KV-cache row of each batch row (out of range: padding)
        lora: LoraHook | None = None,
        logit_index: jax.Array | None = None,  # int32 [B]: only this token's logits per row
    ) -> tuple[jax.Array, KVCache]:
        """Returns float32 logits [B, Tq, vocab] (or [B, vocab] with `logit_index`) and the cache."""
        x = self.embed_tokens.value[tokens]  # [B, Tq, d]
        inv_freq = self.inv_freq.value
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            x, k, v = block(x, positions, rows, cache.k[i], cache.v[i], inv_freq, lora)
            new_k.append(k)
            new_v.append(v)
        if logit_index is not None:
            x = x[jnp.arange(x.shape[0]), logit_index]  # [B, d]
        x = self.norm(x)
        if self.config.tie_word_embeddings:
            logits = x @ self.embed_tokens.value.T
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32), KVCache(k=new_k, v=new_v)
