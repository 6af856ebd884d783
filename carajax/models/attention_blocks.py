"""Softmax attention over dense blocks of queries and keys, the pieces `attention.py`'s paged
reference is built from: the score and value products, the running (online) softmax state and
its merge, and the causal attention of a step's rows over the keys the step itself wrote, in two
exact forms chosen per step.

A softmax state is (running max [.., R], sum [.., R], weighted values [.., R, D]), float32: two
states over disjoint key sets merge exactly (`_merge`), so the paged reference computes the own
keys here and the earlier context through the pages, and merges them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Rows of the flat step attended together by `_chunk_attention`'s diagonals form (capped by T).
# Measured (2-core CPU, 9 / 3 heads, head_dim 64): one 512-token prompt 64 / 128 / 256 rows: see
# BENCHMARKS.md.
CHUNK_BLOCK = 64
# Query rows per block of its rows form (capped by T): each block against every key before it,
# in one product per block. 8 heads x 64: one 512-token prompt 4.7 / 3.2 / 4.1 ms at 64 / 128 / 256.
ROW_BLOCK = 128
# The rows form's cost per 64 x 64 query-key block pair, in units of the diagonals form's (one
# big product per query block against a few small ones per diagonal and an online softmax
# update each). Measured with scripts/bench_prefill_attention.py (BENCHMARKS.md).
ROWS_UNIT_COST = 0.4
# Steps of more tokens never take the rows form: at 1024 its [heads, 128, 1024] score blocks fall
# out of cache (one 1024-token prompt: rows 25 ms, no faster than diagonals; 4 x 256: 22 vs 10).
ROWS_MAX_TOKENS = 512

State = tuple[jax.Array, jax.Array, jax.Array]  # running max, sum, weighted values (float32)


def _chunk_attention(q, k, v, seg, precision, form: str = "auto") -> State:  # q [T, H, D], k, v [T, K, D]
    """Causal attention of the step's rows over the step's own keys (`seg` [T]: each row's
    sequence, non-decreasing), in one of two exact forms, chosen per step by
    `chunk_uses_rows` (form="auto") or forced ("diagonals", "rows"):
      * diagonals: blocks of CHUNK_BLOCK rows of the flat order, query block i against key block
        i - d for every diagonal d that any block pair shares a sequence on (a `lax.cond` skips
        the others): little work when the step holds many short prompts;
      * rows: blocks of ROW_BLOCK query rows, each against every key before it in one product
        and one softmax: the whole causal triangle, in fewer, larger products (a long prompt).
    Returns the softmax state per row, [T, K, G], [T, K, G], [T, K, G, D]."""
    if form not in ("auto", "diagonals", "rows"):
        raise ValueError(f"form must be auto, diagonals or rows, got {form!r}")
    if form == "rows":
        return _row_blocks(q, k, v, seg, precision)
    if form == "diagonals" or q.shape[0] > ROWS_MAX_TOKENS:
        return _diagonal_blocks(q, k, v, seg, precision)
    return jax.lax.cond(chunk_uses_rows(seg, q.shape[0]),
                        lambda *a: _row_blocks(*a, precision),
                        lambda *a: _diagonal_blocks(*a, precision), q, k, v, seg)


def _padded(q, k, v, seg, B):
    """Padding rows up to a multiple of B (T is a power of two in the engine; other callers get
    padding rows of sequence -1, sliced off at the end)."""
    T = q.shape[0]
    pad = -(-T // B) * B - T
    if pad:
        q = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
        k, v = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))) for x in (k, v))
        seg = jnp.concatenate([seg, jnp.full((pad,), -1, jnp.int32)])
    return q, k, v, seg


def _diagonal_pairs(sb) -> list[jax.Array]:
    """Per diagonal d of the [nq, B] block-sequence ids: whether any query block i shares a
    sequence with key block i - d (d = 0 always; sequences are contiguous and ids
    non-decreasing, so it is enough that a key block ends at or after its query block's first
    sequence; padding rows: -1 / > S)."""
    nq = sb.shape[0]
    return [jnp.bool_(True)] + [jnp.any((sb[:nq - d, -1] >= sb[d:, 0]) & (sb[d:, 0] >= 0))
                                for d in range(1, nq)]


def chunk_uses_rows(seg: jax.Array, T: int) -> jax.Array:
    """Whether `_chunk_attention` takes its rows form for a step whose rows have sequences `seg`
    [T]: the block pairs the diagonals form would compute (64 x 64 units: query blocks times
    each diagonal it needs), against the rows form's fixed causal triangle of ROW_BLOCK blocks
    at ROWS_UNIT_COST. One 512-token prompt: 36 pairs against 0.4 x 40 (rows); 8 prompts of
    64: 8 (diagonals). Steps over ROWS_MAX_TOKENS never take the rows form."""
    if T > ROWS_MAX_TOKENS:
        return jnp.bool_(False)
    B = min(CHUNK_BLOCK, T)
    nq = -(-T // B)
    sb = jnp.pad(seg, (0, nq * B - T), constant_values=-1).reshape(nq, B)
    needed = jnp.stack(_diagonal_pairs(sb)).astype(jnp.float32)  # [nq]
    diagonals = jnp.sum(needed * (nq - jnp.arange(nq)) * (B / 64) ** 2)
    R = min(ROW_BLOCK, T)
    nr = -(-T // R)
    rows = nr * (nr + 1) / 2 * (R / 64) ** 2
    return ROWS_UNIT_COST * rows < diagonals


def _row_blocks(q, k, v, seg, precision) -> State:
    """The rows form of `_chunk_attention`: query block i (ROW_BLOCK rows) against keys
    [0, (i + 1) ROW_BLOCK), masked to its rows' own sequences and causal, in one product and one
    softmax each (static shapes: block i's key length is static)."""
    T, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    R = min(ROW_BLOCK, T)
    q, k, v, seg = _padded(q, k, v, seg, R)
    qg = q.reshape(q.shape[0], kv_heads, group, head_dim)
    k, v = (x.astype(q.dtype).transpose(1, 0, 2) for x in (k, v))  # [K, T', D]: head-major
    ms, totals, accs = [], [], []
    for i in range(q.shape[0] // R):
        L = (i + 1) * R
        s = jnp.einsum("qkgd,kld->kgql", qg[i * R:L], k[:, :L], preferred_element_type=jnp.float32,
                       precision=precision)  # [K, G, R, L]
        rows, cols = i * R + jnp.arange(R), jnp.arange(L)
        visible = (seg[i * R:L, None] == seg[None, :L]) & (rows[:, None] >= cols[None, :])
        s = jnp.where(visible, s, -jnp.inf)  # every row sees itself: the max is finite
        m = jnp.max(s, axis=-1)  # [K, G, R]
        e = jnp.exp(s - m[..., None])
        totals.append(jnp.sum(e, axis=-1))
        accs.append(jnp.einsum("kgql,kld->kgqd", e.astype(v.dtype), v[:, :L],
                               preferred_element_type=jnp.float32, precision=precision))
        ms.append(m)
    m, total, acc = (jnp.concatenate(x, axis=2) for x in (ms, totals, accs))  # [K, G, T', ...]
    m, total = (x.transpose(2, 0, 1)[:T] for x in (m, total))
    return m, total, acc.transpose(2, 0, 1, 3)[:T]


def _diagonal_blocks(q, k, v, seg, precision) -> State:
    """The diagonals form of `_chunk_attention`."""
    T, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    B = min(CHUNK_BLOCK, T)
    q, k, v, seg = _padded(q, k, v, seg, B)
    nq = q.shape[0] // B
    qb = q.reshape(nq, B, kv_heads, group, head_dim)
    kb, vb = (x.reshape(nq, B, kv_heads, head_dim).transpose(0, 2, 1, 3) for x in (k, v))  # [nq, K, B, D]
    sb = seg.reshape(nq, B)
    needed = _diagonal_pairs(sb)
    row = jnp.arange(B)
    state = (jnp.full((nq, kv_heads, group, B), -jnp.inf, jnp.float32),
             jnp.zeros((nq, kv_heads, group, B), jnp.float32),
             jnp.zeros((nq, kv_heads, group, B, head_dim), jnp.float32))
    for d in range(nq):  # static: the blocks of a diagonal are static slices
        def attend(state, d=d):
            same = sb[d:, :, None] == sb[:nq - d, None, :]  # [nq - d, B, B]
            if d == 0:
                same &= row[:, None] >= row[None, :]  # the diagonal block: causal within it
            s = _scores(qb[d:], kb[:nq - d].astype(q.dtype), precision)  # [nq - d, K, G, B, B]
            s = jnp.where(same[:, None, None], s, -jnp.inf)
            upd = _online_update(tuple(x[d:] for x in state), s, vb[:nq - d].astype(q.dtype),
                                 precision)
            return tuple(x.at[d:].set(u) for x, u in zip(state, upd))
        if d == 0:
            state = attend(state)
        else:
            state = jax.lax.cond(needed[d], attend, lambda s: s, state)
    m, total, acc = (x.transpose(0, 3, 1, 2, *range(4, x.ndim)) for x in state)
    m, total = (x.reshape(nq * B, kv_heads, group)[:T] for x in (m, total))
    return m, total, acc.reshape(nq * B, kv_heads, group, head_dim)[:T]


def _online_update(state: State, s, vb, precision) -> State:
    """One block of scores s [..., Bq, L] and values vb [NB, K, L, D] into the running softmax."""
    m, total, acc = state
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    # A row with nothing visible yet keeps max -inf: shift by 0 so exp(-inf) = 0, not NaN.
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    e = jnp.exp(s - shift[..., None])
    scale = jnp.exp(jnp.where(jnp.isfinite(m), m - shift, -jnp.inf))  # old terms, rescaled
    total = total * scale + jnp.sum(e, axis=-1)
    acc = acc * scale[..., None] + _weighted_values(e.astype(vb.dtype), vb, precision)
    return m_new, total, acc


def _merge(a: State, b: State) -> State:
    """Two softmax states over disjoint key sets -> the state over their union."""
    m = jnp.maximum(a[0], b[0])
    shift = jnp.where(jnp.isfinite(m), m, 0.0)
    wa, wb = (jnp.exp(jnp.where(jnp.isfinite(x[0]), x[0] - shift, -jnp.inf)) for x in (a, b))
    return m, a[1] * wa + b[1] * wb, a[2] * wa[..., None] + b[2] * wb[..., None]


def _normalise(state: State, dtype) -> jax.Array:  # [T, K, G, D] -> [T, heads, head_dim]
    _, total, acc = state
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # a padding row (sum 0) gives zeros
    return out.reshape(out.shape[0], -1, out.shape[-1]).astype(dtype)


def _scores(qb, kb, precision):  # [NB, Bq, K, G, D], [NB, K, L, D] -> f32 [NB, K, G, Bq, L]
    """Keys head-major (the pools' layout): the product is batched over (block, kv head), both
    leading in kb, so XLA:CPU runs it without first copying the keys into that order."""
    return jnp.einsum("bqkgd,bkld->bkgql", qb, kb, preferred_element_type=jnp.float32,
                      precision=precision)


def _weighted_values(probs, vb, precision):  # [NB, K, G, Bq, L], [NB, K, L, D] -> [NB, K, G, Bq, D]
    return jnp.einsum("bkgql,bkld->bkgqd", probs, vb, preferred_element_type=jnp.float32,
                      precision=precision)
