"""Sampling parameters and the batched, jit-compiled token sampler.

Each request draws from its own key, `fold_in(key(seed), step)`, so its tokens do not depend on
which other requests share its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature 0 is greedy. top_k 0 and top_p 1.0 disable those filters. `stop_token_ids`:
    None stops at the model's EOS tokens; a tuple replaces them (() never stops early).
    The stop token is kept in `token_ids` and left out of `text`. seed None draws one.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        # The sampler keys requests by a uint32 seed; a larger one would overflow mid-step and
        # fail the whole batch, so it is refused here, with the request alone.
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2^32), got {self.seed}")
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@jax.jit
def sample(
    logits: jax.Array,  # float32 [B, V]
    temperature: jax.Array,  # float32 [B]; 0 = greedy
    top_k: jax.Array,  # int32 [B]; 0 = off
    top_p: jax.Array,  # float32 [B]; 1 = off
    seeds: jax.Array,  # uint32 [B]
    steps: jax.Array,  # int32 [B]: index of the token being drawn
) -> jax.Array:  # int32 [B]
    """One token per row: greedy, or temperature + top-k + top-p (nucleus) sampling."""
    V = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)  # [B, V] descending
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    # Nucleus: keep a token if the mass strictly before it is below top_p (the first always stays).
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    filtered = jnp.where(keep, sorted_logits, -jnp.inf)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)
    choice = jax.vmap(jax.random.categorical)(keys, filtered)  # index into the sorted order
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def sampling_arrays(params: list[SamplingParams], seeds: list[int], steps: list[int]):
    """Host arrays for `sample` from per-request parameters."""
    return (np.array([p.temperature for p in params], np.float32),
            np.array([p.top_k for p in params], np.int32),
            np.array([p.top_p for p in params], np.float32),
            np.array(seeds, np.uint32), np.array(steps, np.int32))
