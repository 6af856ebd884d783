"""Sampling parameters and the batched token sampler, without sorting the vocabulary.

`sample_tokens` (jitted as `sample`) picks one token per row of a [B, V] logits batch:

* Greedy rows (temperature 0) take the argmax (lowest index on ties, as `jnp.argmax`). When no
  row samples, a `lax.cond` skips the whole sampling branch: an all-greedy batch costs one argmax.
* Sampling rows keep the tokens whose scaled logit is at least a per-row threshold, the larger of
  the top-k and the top-p thresholds, and draw among them. The thresholds come without a sort:
  - `lax.top_k` gives the best `CANDIDATES` logits of each row, in order. The top-k threshold is
    the k-th of them, and the nucleus usually ends among them too: there the documented rule
    (keep a token if the mass strictly before it, in descending order, is below top_p) is applied
    to the candidates as written.
  - A row whose top_k exceeds the candidates, or whose nucleus reaches past them (a flat
    distribution with top_p near 1), finds its threshold by bisection instead: the largest
    float t with count(x >= t) >= top_k, or mass(x >= t) >= top_p, bisected over the 2^32
    order-preserving integer keys of float32, so 32 steps land exactly on a logit of the row.
    These bisections run only when some sampling row needs them (`lax.cond` again).
  Both ways yield the same threshold. Ties at the threshold are all kept: top_k 2 over logits
  (3, 1, 1, 0) keeps three tokens, and likewise the nucleus keeps every token tied with its last.
* The draw is inverse-CDF sampling in vocabulary order, in two levels so that it needs no [B, V]
  cumsum and keeps float32 resolution for small probabilities: one uniform picks a block of
  `BLOCK` tokens by block mass, a second picks a token inside it.

top_k 0 (or >= V) and top_p 1 switch those filters off; top-k applies first, then the nucleus over
the renormalised top-k. Each request draws from its own key, `fold_in(key(seed), step)`, and
every choice above is made per row, so its tokens do not depend on which other requests share
its batch or where it sits in it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Logits per row fetched by `lax.top_k`: enough for common top_k values and peaked nuclei, small
# enough to cost about an argmax on CPU.
CANDIDATES = 64
# Tokens per block of the two-level draw; about sqrt(V) for a 32k vocabulary.
BLOCK = 128


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


def sample_tokens(
    logits: jax.Array,  # float [B, V]
    temperature: jax.Array,  # float32 [B]; 0 = greedy
    top_k: jax.Array,  # int32 [B]; 0 = off
    top_p: jax.Array,  # float32 [B]; 1 = off
    seeds: jax.Array,  # uint32 [B]
    steps: jax.Array,  # int32 [B]: index of the token being drawn
) -> jax.Array:  # int32 [B]
    """One token per row: greedy, or temperature + top-k + top-p (nucleus) sampling.

    Pure and traceable, for use inside a caller's jitted step; `sample` is its jitted form.
    """
    # On CPU and GPU only the taken branch runs: an all-greedy batch never pays for sampling.
    return jax.lax.cond(jnp.any(temperature > 0), _sample_rows, lambda x, *_: _argmax(x),
                        logits, temperature, top_k, top_p, seeds, steps)


sample = jax.jit(sample_tokens)


@jax.jit
def kept_mask(logits, temperature, top_k, top_p):  # -> bool [B, V]
    """Which tokens each row may draw under its temperature / top-k / top-p (for tests and
    inspection; greedy rows are treated as temperature 1)."""
    active = temperature > 0  # [B]
    scaled = logits.astype(jnp.float32) / jnp.where(active, temperature, 1.0)[:, None]  # [B, V]
    threshold, _ = _threshold(scaled, top_k, top_p, jnp.ones_like(active))
    return scaled >= threshold[:, None]


def _argmax(x):  # [B, V] -> int32 [B]
    """jnp.argmax over the last axis (first index of the max; a NaN counts as the max), as two plain
    reductions: XLA:CPU runs them ~2.5x faster than argmax's (value, index) reduction."""
    top = x.max(axis=-1, keepdims=True)  # [B, 1]; NaN if the row has one
    hit = (x == top) | jnp.isnan(x)  # [B, V]
    V = x.shape[-1]
    return jnp.min(jnp.where(hit, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def _sample_rows(logits, temperature, top_k, top_p, seeds, steps):  # -> int32 [B]
    active = temperature > 0  # [B]
    # Greedy rows divide by 1 (exactly: their argmax is unchanged), not by ~0.
    scaled = logits.astype(jnp.float32) / jnp.where(active, temperature, 1.0)[:, None]  # [B, V]
    greedy = _argmax(scaled)  # [B]
    threshold, weights = _threshold(scaled, top_k, top_p, active)  # [B], [B, V]
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)
    u = jax.vmap(lambda k: jax.random.uniform(k, (2,)))(keys)  # [B, 2] in [0, 1)
    kept = jnp.where(scaled >= threshold[:, None], weights, 0.0)  # [B, V]
    return jnp.where(active, _draw(kept, u), greedy)


def _threshold(scaled, top_k, top_p, active):
    """Per-row logit threshold of the kept set, and exp(scaled - max) zeroed outside the top-k.

    scaled [B, V] float32, top_k int32 [B], top_p float32 [B], active bool [B] (rows that sample;
    only they may trigger a bisection). Returns (threshold [B], weights [B, V]).
    """
    B, V = scaled.shape
    C = min(CANDIDATES, V)
    k_on = (top_k > 0) & (top_k < V)  # [B]
    p_on = top_p < 1.0  # [B]

    def best_logits():  # [B, C] descending
        cand, _ = jax.lax.top_k(scaled, C)
        # XLA expands top_k into a full sort and turns it back into a partial top-k only when the
        # sort is followed by a plain slice; fusing the cumsum below into that slice defeats the
        # match (CPU: ~80 ms instead of ~1 ms). The barrier keeps the result opaque to fusion.
        return jax.lax.optimization_barrier(cand)

    # Plain temperature sampling (the SamplingParams default) needs only the row max.
    cand = jax.lax.cond(jnp.any(active & (k_on | p_on)), best_logits,
                        lambda: jnp.broadcast_to(scaled.max(axis=-1, keepdims=True), (B, C)))

    # Top-k: the k-th best logit, from the candidates when k <= C, else by bisection on the count.
    k_far = active & k_on & (top_k > C)  # [B]
    kth = jnp.take_along_axis(cand, jnp.clip(top_k - 1, 0, C - 1)[:, None], axis=-1)[:, 0]  # [B]
    thr_k = jnp.where(k_on, kth, -jnp.inf)  # [B]
    thr_k = _rowwise_threshold(k_far, scaled, None, top_k, thr_k)

    # Probabilities over the top-k, unnormalised (the max weighs 1): what the draw and top-p use.
    m = cand[:, :1]  # [B, 1] row max
    weights = jnp.where(scaled >= thr_k[:, None], jnp.exp(scaled - m), 0.0)  # [B, V]
    target = top_p * weights.sum(axis=-1)  # [B]: the nucleus mass, unnormalised

    # Top-p on the candidates, as documented: keep a token if the mass strictly before it is below
    # top_p. The shifted (exclusive) cumsum is monotone, unlike cumsum - w after rounding, so the
    # kept ones are a prefix of n >= 1 tokens (before[:, 0] = 0 < target).
    w_cand = jnp.where(cand >= thr_k[:, None], jnp.exp(cand - m), 0.0)  # [B, C]
    before = jnp.pad(jnp.cumsum(w_cand, axis=-1)[:, :-1], ((0, 0), (1, 0)))  # [B, C]
    n = jnp.sum(before < target[:, None], axis=-1)  # [B]
    last = jnp.take_along_axis(cand, jnp.maximum(n - 1, 0)[:, None], axis=-1)[:, 0]  # [B]
    thr_p = jnp.where(p_on, last, -jnp.inf)  # [B]
    # n == C: the nucleus may go on past the candidates (unless they are the whole vocabulary).
    p_far = active & p_on & (n >= C) & (C < V)  # [B]
    thr_p = _rowwise_threshold(p_far, scaled, weights, target, thr_p)
    return jnp.maximum(thr_k, thr_p), weights


def _rowwise_threshold(need, x, weights, target, default):  # -> float32 [B]
    """`_largest_threshold` for the rows in `need` (bool [B]), `default` [B] for the others.

    One row at a time: a row's 128-256 KB stays in cache through the 32 passes, where a [B, V]
    batch does not (CPU, 16 x 32k: ~3 ms against ~11 ms), and rows that need nothing cost nothing.
    x [B, V]; weights [B, V] or None (count); target [B].
    """
    def row(args):
        need_i, x_i, w_i, target_i, default_i = args
        return jax.lax.cond(need_i, _largest_threshold, lambda *_: default_i, x_i, w_i, target_i)

    return jax.lax.cond(jnp.any(need), lambda: jax.lax.map(row, (need, x, weights, target, default)),
                        lambda: default)


def _largest_threshold(x, weights, target):  # -> float32 []
    """The largest float t with sum(weights[x >= t]) >= target (count of x >= t if weights is None).

    x, weights [V]; target > 0 and at most the total. Exact, and t is a value of x: the sum only
    changes at values of x. Bisects the uint32 keys that order float32 like the floats, keeping
    sum(lo) >= target > sum(hi); from key(-inf) to key(+inf) + 1, 32 halvings reach hi = lo + 1.
    """
    def step(_, bounds):
        lo, hi = bounds  # uint32 []
        mid = lo + (hi - lo) // 2  # no overflow: lo <= hi
        above = x >= _from_order_key(mid)  # [V]
        mass = jnp.sum(above) if weights is None else jnp.sum(jnp.where(above, weights, 0))
        ok = mass >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, step, (_order_key(jnp.float32(-jnp.inf)),
                                             _order_key(jnp.float32(jnp.inf)) + 1))
    return _from_order_key(lo)


def _order_key(x):  # float32 [...] -> uint32 [...]
    """uint32 keys that sort like the floats: flip all bits of negatives, the sign bit of others."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_order_key(key):  # uint32 [...] -> float32 [...]
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _draw(weights, u):  # weights float32 [B, V] >= 0, not all 0; u [B, 2] in [0, 1) -> int32 [B]
    """Inverse-CDF draw in vocabulary order, two-level: a block by u[:, 0], a token in it by u[:, 1].

    Only [B, V / BLOCK] and [B, BLOCK] cumsums: cheaper than one over [B, V], and each level keeps
    float32 resolution relative to its own total. The first cumsum entry above u * total has
    non-zero weight, so a token outside the kept set is never drawn.
    """
    B, V = weights.shape
    nb = -(-V // BLOCK)
    blocks = jnp.pad(weights, ((0, 0), (0, nb * BLOCK - V))).reshape(B, nb, BLOCK)  # [B, nb, BLOCK]
    c_blocks = jnp.cumsum(blocks.sum(axis=-1), axis=-1)  # [B, nb]
    b = jnp.argmax(c_blocks > u[:, :1] * c_blocks[:, -1:], axis=-1)  # [B]
    inner = jnp.take_along_axis(blocks, b[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
    c_inner = jnp.cumsum(inner, axis=-1)  # [B, BLOCK]
    j = jnp.argmax(c_inner > u[:, 1:] * c_inner[:, -1:], axis=-1)  # [B]
    return (b * BLOCK + j).astype(jnp.int32)


def sampling_arrays(params: list[SamplingParams], seeds: list[int], steps: list[int]):
    """Host arrays for `sample` from per-request parameters."""
    return (np.array([p.temperature for p in params], np.float32),
            np.array([p.top_k for p in params], np.int32),
            np.array([p.top_p for p in params], np.float32),
            np.array(seeds, np.uint32), np.array(steps, np.int32))
