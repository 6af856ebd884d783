"""Paged attention as a Pallas GPU kernel (Triton backend): `paged_attention(..., impl="pallas")`.

The semantics are `carajax.models.attention.paged_attention`'s (its docstring has the naive loop,
`paged_attention_reference` the jnp form this kernel is tested against); this module is only
the kernel and its launch. On CPU it runs in Pallas interpret mode (`interpret=True`), which is
what CI tests; compiled, it lowers through Triton for NVIDIA GPUs.

Work split (as the reference's, so both share `plan_query_blocks`):
    grid = (NB query blocks, kv_heads)
A query block is up to Bq tokens of one sequence. One program takes one block and one kv head,
and with it all `group = heads // kv_heads` query heads that share that kv head: its query tile
is Bq * group rows [token, head] of q, so each key and value is read once per block for the
whole group (GQA pays once, not `group` times). The program walks its sequence's context in
chunks of `block_k` positions through the block table with an online softmax (running max `m`,
sum `total`, weighted values `acc`, all float32), and stops at the block's last query position + 1:
keys past it are invisible to every row (causal), so pages past the block's context are never
read. Decode tokens (Bq = 1) read exactly their context; a prefill chunk's blocks read up to
their own end, not the sequence's.

Memory access: the pools are viewed as flat row matrices (free reshapes of contiguous arrays),
    q        [T * heads, D]                        row t * heads + head
    k, v     [N * kv_heads * page_size, D]         row (page * kv_heads + kv head) * page_size + offset
    tables   [S * P]                               entry s * P + p // page_size
so every load is one gather of whole D-wide rows, `ref[rows, :]`, which Triton lowers to a
pointer tensor: a chunk of keys is `block_k` rows picked through the block table, wherever their
pages lie. Per key it costs one int32 table read (cached: neighbours share a page) and D
contiguous elements.

Padding and masks: a program's rows past its block's length (the next sequence's tokens, or
padding rows of q, which may hold NaN) and keys past its context are masked loads (read as 0,
so NaN never enters a product) and masked scores; a masked score is a large finite negative
rather than -inf, so a row that has seen nothing yet keeps finite arithmetic (its max is taken
from chunk 0, which always holds position 0, visible to every valid row). The output starts as
zeros (aliased into the call) and each valid row of q is written by exactly one program, so
padding rows come out as exact zeros.

Triton constraints: the row tile (Bq * group, rounded up), `block_k` and D are powers of two and
at least 16 (tl.dot's minimum); `head_dim` must itself be one (64 and 128 in every Llama).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.triton as plgpu
import jax.numpy as jnp
import numpy as np

from carajax.ragged import checked_layout, default_query_block, plan_query_blocks

# A masked score: finite, so that max/exp arithmetic on a fully masked row stays NaN-free.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)
# Keys per inner iteration on a GPU: 64 bf16 keys of D = 128 are 16 KiB per operand, which two
# pipeline stages keep in shared memory; fewer iterations would need larger register tiles.
GPU_BLOCK_K = 64
# Interpret mode runs each iteration as XLA ops: larger chunks are fewer of them.
CPU_BLOCK_K = 64
# Cap on a program's query rows (Bq * group): the float32 accumulator is rows x D registers,
# 128 x 128 across 4 warps is 128 per thread. A larger caller's Bq is cut to fit: the result
# does not depend on Bq (each row's softmax is its own).
MAX_ROWS = 128
MIN_TILE = 16  # tl.dot needs every dimension >= 16


def _pow2_at_least(n: int, floor: int = MIN_TILE) -> int:
    return max(floor, 1 << max(n - 1, 0).bit_length())


def kernel_query_block(query_block: int, group: int) -> int:
    """The kernel's Bq: the caller's, cut so that a program's Bq * group rows fit MAX_ROWS."""
    return max(1, min(query_block, MAX_ROWS // group))


def _dot_t(a, b, precision):
    """a [m, k] @ b[n, k]^T -> float32 [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _dot(a, b, precision):
    """a [m, k] @ b[k, n] -> float32 [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _rows(rows, width: int):
    """The index of whole rows `rows` of a [n, width] ref: two [len(rows), width] int arrays.
    Both axes as arrays (not `ref[rows, :]`): interpret mode gathers only all-array indices,
    and Triton lowers either to the same pointer tensor."""
    shape = (rows.shape[0], width)
    return (jnp.broadcast_to(rows[:, None], shape),
            jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None, :], shape))


def _kernel(seq_ref, row0_ref, len_ref, pos0_ref, seq_lens_ref, tables_ref, q_ref, k_ref, v_ref,
            _zeros_ref, o_ref, *, heads, kv_heads, page_size, table_width, bq, rows, block_k,
            head_dim, sm_scale):
    b, h = pl.program_id(0), pl.program_id(1)
    group = heads // kv_heads
    s, row0, n, pos0 = seq_ref[b], row0_ref[b], len_ref[b], pos0_ref[b]
    i = jnp.arange(rows, dtype=jnp.int32)
    tok = i // group  # [R] token of the block each tile row belongs to (row = token, then head)
    valid = (i < bq * group) & (tok < n)  # [R]
    # Rows of q; a masked row aims past the end, so that no masked store can touch a valid row.
    qrow = jnp.where(valid, (row0 + tok) * heads + h * group + i % group, q_ref.shape[0])  # [R]
    qpos = pos0 + tok  # [R] context position of each row's token
    q_at = _rows(qrow, head_dim)
    precision = jax.lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
    q = plgpu.load(q_ref.at[q_at], mask=valid[:, None], other=0)  # [R, D]
    # The block sees positions < its last token's + 1 (causal); an unused block (n = 0) nothing.
    end = jnp.where(n > 0, jnp.minimum(seq_lens_ref[s], pos0 + n), 0)

    def chunk(c, carry):
        m, total, acc = carry  # [R], [R], [R, D] float32
        kpos = c * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [BK]
        k_ok = kpos < end
        entry = jnp.where(k_ok, s * table_width + kpos // page_size, 0)
        page = plgpu.load(tables_ref.at[entry], mask=k_ok, other=0)  # [BK] int32
        krow = (page * kv_heads + h) * page_size + kpos % page_size  # [BK] rows of the pools
        kv_at = _rows(krow, head_dim)
        k = plgpu.load(k_ref.at[kv_at], mask=k_ok[:, None], other=0)  # [BK, D]
        v = plgpu.load(v_ref.at[kv_at], mask=k_ok[:, None], other=0)  # [BK, D]
        # Scores in base 2: softmax(x) = 2^(x log2 e - max) / sum, one multiply folded in.
        sc = _dot_t(q, k.astype(q.dtype), precision) * (sm_scale * LOG2E)  # [R, BK]
        visible = valid[:, None] & k_ok[None, :] & (kpos[None, :] <= qpos[:, None])
        sc = jnp.where(visible, sc, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        correction = jnp.exp2(m - m_new)  # old terms, rescaled to the new max
        p = jnp.exp2(sc - m_new[:, None])  # [R, BK]; masked keys of valid rows: exactly 0
        total = total * correction + jnp.sum(p, axis=1)
        acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v.astype(q.dtype), precision)
        return m_new, total, acc

    init = (jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, pl.cdiv(end, block_k), chunk, init)
    # Valid rows have total >= 1 (position 0 is always visible); others are not stored.
    out = acc / jnp.where(valid, total, 1.0)[:, None]
    plgpu.store(o_ref.at[q_at], out.astype(o_ref.dtype), mask=valid[:, None])


@functools.partial(jax.jit, static_argnames=("query_block", "block_k", "interpret", "num_warps",
                                             "num_stages"))
def paged_attention_pallas(
    q: jax.Array,  # [T, heads, head_dim]
    k_pages: jax.Array,  # [N, kv_heads, page_size, head_dim]
    v_pages: jax.Array,  # [N, kv_heads, page_size, head_dim]
    block_tables: jax.Array,  # int32 [S, P]
    seq_lens: jax.Array,  # int32 [S]
    query_starts: jax.Array,  # int32 [S + 1]
    *,
    query_block: int | None = None,
    block_k: int | None = None,
    interpret: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:  # [T, heads, head_dim], q's dtype
    """`attention.paged_attention` as one `pallas_call` over (query block, kv head).

    query_block: the caller's Bq (None: `default_query_block(T, S)`), cut by `kernel_query_block`
        so that a program's rows fit MAX_ROWS. block_k: context positions per inner iteration
        (None: GPU_BLOCK_K compiled, CPU_BLOCK_K interpreted). interpret: Pallas interpret mode
        (CPU). num_warps / num_stages: Triton's, compiled only.
    """
    seq_lens, query_starts, block_tables = checked_layout(q, k_pages, block_tables, seq_lens,
                                                         query_starts)
    T, heads, head_dim = q.shape
    N, kv_heads, page_size, _ = k_pages.shape
    S, P = block_tables.shape
    if head_dim != _pow2_at_least(head_dim):
        raise ValueError(f"the Pallas paged attention needs head_dim a power of two >= {MIN_TILE}, "
                         f"got {head_dim}; use impl='reference'")
    bq = default_query_block(T, S) if query_block is None else query_block
    if bq < 1:
        raise ValueError(f"query_block must be >= 1, got {bq}")
    if T == 0:
        return jnp.zeros_like(q)
    group = heads // kv_heads
    bq = kernel_query_block(bq, group)
    bk = block_k or (CPU_BLOCK_K if interpret else GPU_BLOCK_K)
    if bk != _pow2_at_least(bk):
        raise ValueError(f"block_k must be a power of two >= {MIN_TILE}, got {bk}")

    seq, row0, length, pos0 = plan_query_blocks(seq_lens, query_starts, T, bq)  # [NB] each
    nb = seq.shape[0]
    kernel = functools.partial(
        _kernel, heads=heads, kv_heads=kv_heads, page_size=page_size, table_width=P, bq=bq,
        rows=_pow2_at_least(bq * group), block_k=bk, head_dim=head_dim,
        sm_scale=1 / math.sqrt(head_dim))
    args = (seq, row0, length, pos0, seq_lens, block_tables.reshape(S * P),
            q.reshape(T * heads, head_dim),
            k_pages.reshape(N * kv_heads * page_size, head_dim),
            v_pages.reshape(N * kv_heads * page_size, head_dim),
            jnp.zeros((T * heads, head_dim), q.dtype))  # the output's initial value
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((T * heads, head_dim), q.dtype), grid=(nb, kv_heads),
        in_specs=[pl.no_block_spec] * len(args), out_specs=pl.no_block_spec,
        input_output_aliases={len(args) - 1: 0}, interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps,
                                                                    num_stages=num_stages),
    )(*args)
    return out.reshape(T, heads, head_dim)
