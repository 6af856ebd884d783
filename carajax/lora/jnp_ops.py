"""Segmented multi-adapter LoRA in plain jnp: what the engine runs where the Pallas kernels do
not (CPU). Two formulations of the same op, for the two shapes of a step:

- `sgmv_blocked` (prefill chunks): work that follows the tokens, in blocks of one segment each;
- `sgmv_dense` (decode steps, few tokens): two plain GEMMs over every segment's adapter at once.

XLA:CPU runs a batched matmul of small blocks as many small GEMMs with per-call overhead (a
[18, 16, 512] x [18, 512, 64] product reaches ~20 GFLOP/s here, a plain GEMM ~75); so a decode
step of 16 tokens is cheaper doing 16x the multiply-adds in two big GEMMs, and a prefill step is
cheapest in blocks of 64 tokens.

Same data arguments and semantics as `kernels.sgmv_reference` (a segment = one sequence of the
step's flattened batch, with its adapter slot):

    for g in range(G):
        s = seg_slots[g]
        if s < 0: continue
        for t in range(seg_starts[g], seg_starts[g] + seg_lens[g]):
            y[t] = scales[s] * (x[t] @ a[s, :ranks[s]].T) @ b[s, :, :ranks[s]].T

`sgmv_reference` computes every segment over all T tokens (G * T * r * d work: fine as the oracle,
ruinous for a prefill step of many sequences). Here the tokens are cut into blocks of at most
`token_block` tokens that each belong to one segment (the attention's query blocks,
`plan_query_blocks`); each block gathers its slot's pages once and multiplies densely:

    NB = min(T, ceil(T / token_block) + G) blocks, work NB * token_block * r_max * (d_in + d_out),
    weights read NB * r_max * (d_in + d_out).

`token_block=1` is BGMV (one token per sequence, one weight gather per token); 64 suits prefill
chunks on CPU. Every slot runs at r_max (the page-padded rank), masked to its rank.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from carajax.models.attention import num_query_blocks, plan_query_blocks


@functools.partial(jax.jit, static_argnames=("token_block",))
def sgmv_blocked(
    x: jax.Array,  # [T, d_in]
    a: jax.Array,  # paged: [P, page_rank, d_in]
    b: jax.Array,  # paged: [P, d_out, page_rank]
    seg_starts: jax.Array,  # int32 [G]: first token of each segment, in increasing order
    seg_lens: jax.Array,  # int32 [G]: tokens in each segment (0 allowed)
    seg_slots: jax.Array,  # int32 [G]: slot of each segment; -1: no LoRA
    ranks: jax.Array,  # int32 [S]
    scales: jax.Array,  # float32 [S]
    *,
    page_table: jax.Array,  # int32 [S, r_max // page_rank]
    token_block: int = 16,
) -> jax.Array:  # [T, d_out]
    """The LoRA delta of a flattened batch; see the module docstring. Segments must be disjoint
    and in token order (sequence after sequence, as in `StepBatch`)."""
    T, d_in = x.shape
    G = seg_starts.shape[0]
    _, pr, _ = a.shape
    d_out = b.shape[1]
    bt = token_block
    # Blocks over segments: reuse the attention's planner with the segments as "sequences"
    # (seq_lens only feed its position output, unused here).
    query_starts = jnp.concatenate([seg_starts, seg_starts[-1:] + seg_lens[-1:]]).astype(jnp.int32)
    seg, row0, length, _ = plan_query_blocks(jnp.zeros(G, jnp.int32), query_starts, T, bt)
    nb = num_query_blocks(T, G, bt)
    slot = seg_slots[seg]  # [NB]
    live = (slot >= 0) & (length > 0)  # [NB]
    s = jnp.maximum(slot, 0)
    rows = row0[:, None] + jnp.arange(bt, dtype=jnp.int32)  # [NB, bt]
    valid = live[:, None] & (jnp.arange(bt)[None, :] < length[:, None])  # [NB, bt]
    xb = x.at[jnp.where(valid, rows, T)].get(mode="fill", fill_value=0)  # [NB, bt, d_in]
    # Each block's adapter: its slot's pages, concatenated in page-table order, masked to rank.
    pages = page_table[s]  # [NB, n]
    r_max = pages.shape[1] * pr
    ab = jnp.take(a, pages, axis=0, mode="clip").reshape(nb, r_max, d_in)  # [NB, r_max, d_in]
    bb = jnp.take(b, pages, axis=0, mode="clip")  # [NB, n, d_out, pr]
    bb = jnp.swapaxes(bb, 1, 2).reshape(nb, d_out, r_max)  # [NB, d_out, r_max]
    keep = jnp.arange(r_max)[None, :] < ranks[s][:, None]  # [NB, r_max]
    # Pages past a slot's rank may hold another adapter's rows: masked on both sides.
    bb = jnp.where(keep[:, None, :], bb, 0)
    hi = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None  # no TF32 on GPU
    xa = jnp.einsum("ntd,nrd->ntr", xb, ab.astype(x.dtype), preferred_element_type=jnp.float32,
                    precision=hi)  # [NB, bt, r_max]
    xa = jnp.where(keep[:, None, :], xa, 0) * scales[s][:, None, None]
    yb = jnp.einsum("ntr,nor->nto", xa, bb.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)  # [NB, bt, d_out]
    y = jnp.zeros((T, d_out), jnp.float32)
    y = y.at[jnp.where(valid, rows, T)].set(yb, mode="drop")  # each token in at most one block
    return y.astype(x.dtype)


@jax.jit
def sgmv_dense(
    x: jax.Array,  # [T, d_in]
    a: jax.Array,  # paged: [P, page_rank, d_in]
    b: jax.Array,  # paged: [P, d_out, page_rank]
    seg_starts: jax.Array,  # int32 [G]
    seg_lens: jax.Array,  # int32 [G]
    seg_slots: jax.Array,  # int32 [G]; -1: no LoRA
    ranks: jax.Array,  # int32 [S]
    scales: jax.Array,  # float32 [S]
    *,
    page_table: jax.Array,  # int32 [S, r_max // page_rank]
) -> jax.Array:  # [T, d_out]
    """The same op as `sgmv_blocked`, as two GEMMs against every segment's adapter side by side:

        A_all = [A of segment 0; ...; A of segment G-1]           [G * r_max, d_in]
        xa    = (x @ A_all^T) masked to each token's own segment  [T, G * r_max], and to its rank
        y     = xa @ B_all                                         [T, d_out]

    Work 2 * T * G * r_max * d (G times what the tokens need), weights read once: the right
    trade for a decode step (T ~ G small), the wrong one for long prefill chunks.
    """
    T, d_in = x.shape
    G = seg_starts.shape[0]
    s = jnp.maximum(seg_slots, 0)
    pages = page_table[s]  # [G, n]
    n, pr = pages.shape[1], a.shape[1]
    r_max = n * pr
    A = jnp.take(a, pages, axis=0, mode="clip").reshape(G * r_max, d_in)  # [G * r_max, d_in]
    B = jnp.take(b, pages, axis=0, mode="clip")  # [G, n, d_out, pr]
    B = jnp.swapaxes(B, 2, 3).reshape(G * r_max, -1)  # [G * r_max, d_out]
    col_seg = jnp.arange(G * r_max) // r_max  # [G * r_max]: the segment of each column
    col_rank = jnp.arange(G * r_max) % r_max
    t = jnp.arange(T)
    tok_seg = jnp.sum(t[:, None] >= seg_starts[None, :] + seg_lens[None, :], axis=1)  # [T]
    inside = t < seg_starts[jnp.minimum(tok_seg, G - 1)] + seg_lens[jnp.minimum(tok_seg, G - 1)]
    live = (seg_slots >= 0)[col_seg] & (col_rank < ranks[s][col_seg])  # [G * r_max]
    keep = (col_seg[None, :] == tok_seg[:, None]) & inside[:, None] & live[None, :]
    hi = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None  # no TF32 on GPU
    xa = jnp.dot(x, A.T.astype(x.dtype), preferred_element_type=jnp.float32, precision=hi)
    xa = jnp.where(keep, xa * scales[s][col_seg][None, :], 0)  # [T, G * r_max]
    # Pages past a slot's rank may hold another adapter's columns: zero them in B as well.
    B = jnp.where(live[:, None], B.astype(jnp.float32), 0)
    return jnp.dot(xa, B, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


@jax.jit
def sgmv_pool(
    x: jax.Array,  # [T, d_in]
    a: jax.Array,  # ONE layer's pages: [P, page_rank, d_in]
    b: jax.Array,  # ONE layer's pages: [P, d_out, page_rank]
    seg_starts: jax.Array,  # int32 [G]
    seg_lens: jax.Array,  # int32 [G]
    seg_slots: jax.Array,  # int32 [G]; -1: no LoRA
    ranks: jax.Array,  # int32 [S]
    scales: jax.Array,  # float32 [S]
    *,
    page_table: jax.Array,  # int32 [S, r_max // page_rank], pages of this layer
) -> jax.Array:  # [T, d_out]
    """The same op as `sgmv_dense`, against the layer's whole page pool instead of a gather:

        xa = x @ [every page's A rows]^T    [T, P * page_rank], kept where the page belongs
                                            to the token's own adapter, within its rank
        y  = xa @ [every page's B columns]  [T, d_out]

    Work 2 * T * P * page_rank * d and no gather at all: the pool's pages are read in place.
    It wins over `sgmv_dense` when the pool holds fewer rank rows than the step's segments would
    gather (P * page_rank <= G * r_max: a pool sized for a few adapters, and tight ranks: a rank-8
    adapter costs one page, not r_max rows). Only the slots the step's segments use claim pages,
    so stale page-table rows of evicted slots are never read.
    """
    T, d_in = x.shape
    G = seg_starts.shape[0]
    P, pr, _ = a.shape
    S, n = page_table.shape
    # Which slot owns each page, and where the page sits in its adapter's rank.
    used = jnp.zeros(S, bool).at[seg_slots].set(True, mode="drop")  # -1 dropped
    j = jnp.arange(n, dtype=jnp.int32)
    claims = used[:, None] & (j[None, :] * pr < ranks[:, None])  # [S, n]
    target = jnp.where(claims, page_table, P)  # unclaimed -> out of range, dropped
    owner = jnp.full(P, -1, jnp.int32).at[target].set(
        jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[:, None], (S, n)), mode="drop")
    first = jnp.zeros(P, jnp.int32).at[target].set(
        jnp.broadcast_to(j[None, :] * pr, (S, n)), mode="drop")
    col_owner = jnp.repeat(owner, pr)  # [P * pr]
    col_rank = jnp.repeat(first, pr) + jnp.tile(jnp.arange(pr, dtype=jnp.int32), P)
    s_col = jnp.maximum(col_owner, 0)
    live = (col_owner >= 0) & (col_rank < ranks[s_col])  # [P * pr]
    # Each token's slot (-1 outside every segment, i.e. padding).
    t = jnp.arange(T)
    tok_seg = jnp.sum(t[:, None] >= seg_starts[None, :] + seg_lens[None, :], axis=1)  # [T]
    g = jnp.minimum(tok_seg, G - 1)
    inside = (tok_seg < G) & (t >= seg_starts[g]) & (t < seg_starts[g] + seg_lens[g])
    tok_slot = jnp.where(inside, seg_slots[g], -1)  # [T]
    keep = (col_owner[None, :] == tok_slot[:, None]) & live[None, :] & (tok_slot >= 0)[:, None]
    hi = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None  # no TF32 on GPU
    A = a.reshape(P * pr, d_in)  # free: pages are rank rows already
    xa = jnp.dot(x, A.T.astype(x.dtype), preferred_element_type=jnp.float32, precision=hi)
    xa = jnp.where(keep, xa * scales[s_col][None, :], 0)  # [T, P * pr]
    y = jnp.einsum("tpr,por->to", xa.reshape(T, P, pr), b.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
