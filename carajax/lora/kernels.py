"""Multi-adapter, multi-rank LoRA in Pallas: SGMV for prefill segments, BGMV for decode tokens.

Both ops compute `y = scale * (x @ A^T) @ B^T` per token with that token's adapter slot, in two
kernels: *shrink* (x [T, d_in] -> xa [T, r_max], float32) and *expand* (xa -> y [T, d_out]).
Each kernel has a pure-`jnp` reference with the same data arguments (`sgmv_reference`,
`bgmv_reference`, below): they define the semantics the tests hold the kernels to, and they are
what the model's LoRA hook runs on CPU, where Pallas only interprets (several times slower).

Shared argument shapes (S device slots, each padded to r_max):
    x       [T, d_in]             activations
    a       [S, r_max, d_in]      LoRA A per slot (rows >= the slot's rank are ignored)
    b       [S, d_out, r_max]     LoRA B per slot (columns >= the slot's rank are ignored)
    ranks   int32 [S]             true rank per slot
    scales  float32 [S]           alpha / r (or alpha / sqrt(r) with rsLoRA)
Both return the LoRA delta [T, d_out] in x's dtype; the caller adds it to x @ W.

Paged layout (keyword `page_table`, on all four ops): the adapter pool (`carajax.lora.pool`) keeps
rank rows in pages of `page_rank` rows, so a slot costs what its rank weighs instead of r_max:
    a           [P, page_rank, d_in]              P pages of A rows
    b           [P, d_out, page_rank]             P pages of B columns
    page_table  int32 [S, r_max // page_rank]     rank rows [k * page_rank, (k + 1) * page_rank)
                                                  of slot s live in page page_table[s, k]
r_max is then page_table.shape[1] * page_rank. Entries for rank blocks past a slot's rank never
contribute (they may hold anything, even out-of-range pages); the kernels run one rank block per
page (`block_r == page_rank`).

Two ways to handle mixed ranks, as in the CaraServe paper's Fig. 5:
- default (MBGMV-like, S-LoRA): each token/segment does ceil(rank / block_r) rank blocks of its
  own slot: cost ~ sum of ranks;
- `pad_to_max_rank=True` (BGMV-like, Punica): every token/segment does the rank blocks of the
  batch's largest rank: cost ~ |batch| * max rank, with uniform work per program.
Columns between a slot's rank and the end of its last rank block are masked, so the padding of
A and B never leaks into the result (whatever it holds).

Lowering: on NVIDIA GPUs the kernels lower through Pallas' Triton backend (selected by
`plgpu.CompilerParams`): every block dimension must then be a power of two and >= 16 where it
feeds a matrix product (in the paged layout that includes page_rank, the rank block), and r_max
must be a multiple of block_r. On CPU they run with `interpret=True`. Inputs are whole-array refs
indexed with masked dynamic slices, so T, d_in and d_out need not be multiples of any block size.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.triton as plgpu
import jax.numpy as jnp

# Tuning defaults per backend (all keyword-only, static).
#   block_t: tokens per sgmv program; block_r: rank block; block_d: d_in chunk of the shrink
#   reduction; block_o: d_out columns per expand program.
GPU_BLOCKS = dict(block_t=16, block_r=16, block_d=128, block_o=128)
# Interpret mode runs every grid point as a loop iteration: bigger blocks mean fewer of them.
CPU_BLOCKS = dict(block_t=32, block_r=16, block_d=256, block_o=256)


# ----------------------------------------------------------------------------------------------
# References (pure jnp)
# ----------------------------------------------------------------------------------------------
def _masked(a, b, ranks):
    """Zero A's rows and B's columns at or beyond each slot's rank."""
    r = jnp.arange(a.shape[1])
    keep = r[None, :] < ranks[:, None]  # [S, r_max]
    return jnp.where(keep[:, :, None], a, 0), jnp.where(keep[:, None, :], b, 0)


def gather_pages(
    a: jax.Array,  # [P, page_rank, d_in]
    b: jax.Array,  # [P, d_out, page_rank]
    page_table: jax.Array,  # int32 [S, n]
) -> tuple[jax.Array, jax.Array]:  # [S, n * page_rank, d_in], [S, d_out, n * page_rank]
    """The slot layout of a paged pool: each slot's pages concatenated in page-table order."""
    page_table = jnp.asarray(page_table, jnp.int32)
    S, n = page_table.shape
    _, pr, d_in = a.shape
    # mode="clip": entries past a slot's rank may hold anything; `_masked` zeroes what they fetch.
    a = jnp.take(jnp.asarray(a), page_table, axis=0, mode="clip")  # [S, n, pr, d_in]
    b = jnp.take(jnp.asarray(b), page_table, axis=0, mode="clip")  # [S, n, d_out, pr]
    a = a.reshape(S, n * pr, d_in)
    b = jnp.transpose(b, (0, 2, 1, 3)).reshape(S, b.shape[2], n * pr)
    return a, b


def bgmv_reference(
    x: jax.Array,  # [T, d_in]
    a: jax.Array,  # [S, r_max, d_in]; paged: [P, page_rank, d_in]
    b: jax.Array,  # [S, d_out, r_max]; paged: [P, d_out, page_rank]
    token_slots: jax.Array,  # int32 [T]; -1: no LoRA for that token
    ranks: jax.Array,  # int32 [S]
    scales: jax.Array,  # float32 [S]
    *,
    page_table: jax.Array | None = None,  # int32 [S, r_max // page_rank]
) -> jax.Array:  # [T, d_out]
    """Per-token LoRA (decode: one slot per token), as a naive loop:

        for t in range(T):
            s = token_slots[t]
            if s < 0: y[t] = 0; continue
            r = ranks[s]
            y[t] = scales[s] * (x[t] @ a[s, :r].T) @ b[s, :, :r].T

    With `page_table`, `a` and `b` are pages, gathered into the slot layout first (`gather_pages`).
    """
    x, token_slots = jnp.asarray(x), jnp.asarray(token_slots, jnp.int32)
    if page_table is not None:
        a, b = gather_pages(a, b, page_table)
    a, b = _masked(jnp.asarray(a), jnp.asarray(b), jnp.asarray(ranks))
    scales = jnp.asarray(scales)
    valid = token_slots >= 0
    s = jnp.where(valid, token_slots, 0)
    hi = _precision(x.dtype)  # no TF32 on GPU: the reference is what kernels are judged by
    xa = jnp.einsum("td,trd->tr", x, a[s].astype(x.dtype), preferred_element_type=jnp.float32,
                    precision=hi)
    y = jnp.einsum("tr,tor->to", xa, b[s].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    y = y * jnp.where(valid, scales[s], 0.0)[:, None]
    return y.astype(x.dtype)


def segment_token_slots(seg_starts, seg_lens, seg_slots, num_tokens: int) -> jax.Array:
    """int32 [T]: the slot of the segment covering each token, -1 where none does."""
    t = jnp.arange(num_tokens)[None, :]
    inside = (t >= seg_starts[:, None]) & (t < (seg_starts + seg_lens)[:, None])  # [G, T]
    return jnp.max(jnp.where(inside, seg_slots[:, None], -1), axis=0, initial=-1).astype(jnp.int32)


def sgmv_reference(
    x: jax.Array,  # [T, d_in]
    a: jax.Array,  # [S, r_max, d_in]; paged: [P, page_rank, d_in]
    b: jax.Array,  # [S, d_out, r_max]; paged: [P, d_out, page_rank]
    seg_starts: jax.Array,  # int32 [G]: first token of each segment
    seg_lens: jax.Array,  # int32 [G]: tokens in each segment (0 allowed)
    seg_slots: jax.Array,  # int32 [G]: slot of each segment; -1: no LoRA
    ranks: jax.Array,  # int32 [S]
    scales: jax.Array,  # float32 [S]
    *,
    page_table: jax.Array | None = None,  # int32 [S, r_max // page_rank]
) -> jax.Array:  # [T, d_out]
    """Segmented LoRA (prefill: G disjoint segments of contiguous tokens, one slot each):

        y = zeros([T, d_out])
        for g in range(G):
            s = seg_slots[g]
            if s < 0: continue
            r = ranks[s]
            for t in range(seg_starts[g], seg_starts[g] + seg_lens[g]):
                y[t] = scales[s] * (x[t] @ a[s, :r].T) @ b[s, :, :r].T

    Tokens outside every segment get 0. Computed segment by segment over all tokens with a mask,
    so memory stays O(T * d) whatever G is (work is G * T * r * d: fine for the few segments of
    a prefill batch; the kernel does T * r * d). With `page_table`, `a` and `b` are pages,
    gathered into the slot layout first (`gather_pages`).
    """
    x, seg = jnp.asarray(x), tuple(jnp.asarray(v, jnp.int32) for v in (seg_starts, seg_lens, seg_slots))
    if page_table is not None:
        a, b = gather_pages(a, b, page_table)
    a, b = _masked(jnp.asarray(a), jnp.asarray(b), jnp.asarray(ranks))
    scales = jnp.asarray(scales)
    t = jnp.arange(x.shape[0])

    def one_segment(y, seg):
        start, length, slot = seg
        s = jnp.maximum(slot, 0)
        inside = (t >= start) & (t < start + length) & (slot >= 0)
        xa = jnp.dot(x, a[s].astype(x.dtype).T, preferred_element_type=jnp.float32,
                     precision=_precision(x.dtype))  # [T, r]
        ys = jnp.dot(xa, b[s].astype(jnp.float32).T,
                     precision=jax.lax.Precision.HIGHEST) * scales[s]  # [T, d_out]
        return y + jnp.where(inside[:, None], ys, 0.0), None

    y0 = jnp.zeros((x.shape[0], b.shape[1]), jnp.float32)
    y, _ = jax.lax.scan(one_segment, y0, seg)
    return y.astype(x.dtype)


def default_blocks() -> dict[str, int]:
    return GPU_BLOCKS if jax.default_backend() == "gpu" else CPU_BLOCKS


def _dot_t(p, q, precision):
    """p [m, k] @ q[n, k]^T -> float32 [m, n]."""
    return jax.lax.dot_general(p, q, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _precision(dtype):
    # float32 inputs: full precision (no TF32), so results match the float32 reference.
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _rank_blocks(rank, batch_max_rank, block_r: int, pad_to_max_rank: bool):
    """Rank blocks a token/segment of this rank runs: its own (MBGMV) or the batch's (BGMV)."""
    own = pl.cdiv(rank, block_r)
    padded = jnp.where(rank > 0, pl.cdiv(batch_max_rank, block_r), 0)
    return (padded if pad_to_max_rank else own).astype(jnp.int32)


def _layout(a, page_table, block_r: int | None, default_r: int) -> tuple[int, int]:
    """(r_max, block_r) of the slot layout or of the paged one, checked."""
    if page_table is None:
        r_max = a.shape[1]
        br = min(block_r or default_r, r_max)
        if r_max % br:
            raise ValueError(f"r_max={r_max} must be a multiple of block_r={br}")
        return r_max, br
    page_rank = a.shape[1]
    if block_r is not None and block_r != page_rank:
        raise ValueError(f"paged LoRA weights need block_r == page_rank ({page_rank}), got "
                         f"block_r={block_r}: a rank block is one page")
    if page_table.ndim != 2:
        raise ValueError(f"page_table must be [S, r_max // page_rank], got shape {page_table.shape}")
    return page_table.shape[1] * page_rank, page_rank


def _page(pt_ref, slot, rb, num_pages):
    # Clamped: with pad_to_max_rank a slot runs rank blocks past its own rank (fully masked),
    # whose page-table entries may hold anything; the clamp keeps even masked addresses in bounds.
    return jnp.clip(pt_ref[slot, rb], 0, num_pages - 1)


def _a_block(a_ref, pt_ref, slot, rb, br: int, cols):
    """A's rank rows [rb * br, (rb + 1) * br) of `slot`, columns `cols`: a [br, cols] view.
    `pt_ref` None: slot layout; else the rows are page `page_table[slot, rb]` (br == page_rank)."""
    if pt_ref is None:
        return a_ref.at[slot, pl.ds(rb * br, br), cols]
    return a_ref.at[_page(pt_ref, slot, rb, a_ref.shape[0]), :, cols]


def _b_block(b_ref, pt_ref, slot, rb, br: int, rows):
    """B's rank columns [rb * br, (rb + 1) * br) of `slot`, rows `rows`: a [rows, br] view."""
    if pt_ref is None:
        return b_ref.at[slot, rows, pl.ds(rb * br, br)]
    return b_ref.at[_page(pt_ref, slot, rb, b_ref.shape[0]), rows, :]


def _split_page_table(refs):
    """Kernel refs after the weights are `(page_table?, out)`: the page table is only passed
    in the paged layout, so the one kernel body serves both layouts."""
    *pt, out_ref = refs
    return (pt[0] if pt else None), out_ref


def _call(kernel, out_shape, grid, interpret, *args):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid,
        in_specs=[pl.no_block_spec] * len(args), out_specs=pl.no_block_spec,
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2),
    )(*args)


# ----------------------------------------------------------------------------------------------
# SGMV: segments of contiguous tokens (prefill)
# ----------------------------------------------------------------------------------------------
def _sgmv_shrink_kernel(lo_ref, hi_ref, start_ref, end_ref, slot_ref, rank_ref, nrb_ref,
                        x_ref, a_ref, *refs, T, d_in, r_max, bt, br, bd):
    pt_ref, xa_ref = _split_page_table(refs)
    i = pl.program_id(0)
    rows = i * bt + jnp.arange(bt)
    row_ok = (rows < T)[:, None]
    for rb in range(r_max // br):  # rows outside every segment read as 0
        plgpu.store(xa_ref.at[pl.ds(i * bt, bt), pl.ds(rb * br, br)],
                    jnp.zeros((bt, br), jnp.float32), mask=row_ok)
    prec = _precision(x_ref.dtype)

    def segment(g, _):
        slot, rank = slot_ref[g], rank_ref[g]
        inside = ((rows >= start_ref[g]) & (rows < end_ref[g]))[:, None]

        def rank_block(rb, _):
            rcols = rb * br + jnp.arange(br)

            def reduce(k, acc):
                dcols = k * bd + jnp.arange(bd)
                d_ok = (dcols < d_in)[None, :]
                xt = plgpu.load(x_ref.at[pl.ds(i * bt, bt), pl.ds(k * bd, bd)],
                                mask=row_ok & d_ok, other=0)  # [bt, bd]
                at = plgpu.load(_a_block(a_ref, pt_ref, slot, rb, br, pl.ds(k * bd, bd)),
                                mask=(rcols < rank)[:, None] & d_ok, other=0)  # [br, bd]
                return acc + _dot_t(xt, at.astype(xt.dtype), prec)

            acc = jax.lax.fori_loop(0, pl.cdiv(d_in, bd), reduce, jnp.zeros((bt, br), jnp.float32))
            ref = xa_ref.at[pl.ds(i * bt, bt), pl.ds(rb * br, br)]
            cur = plgpu.load(ref, mask=row_ok, other=0)
            plgpu.store(ref, jnp.where(inside, acc, cur), mask=row_ok)

        jax.lax.fori_loop(0, nrb_ref[g], rank_block, None)

    jax.lax.fori_loop(lo_ref[i], hi_ref[i], segment, None)


def _sgmv_expand_kernel(lo_ref, hi_ref, start_ref, end_ref, slot_ref, rank_ref, nrb_ref,
                        scale_ref, xa_ref, b_ref, *refs, T, d_out, bt, br, bo):
    pt_ref, y_ref = _split_page_table(refs)
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * bt + jnp.arange(bt)
    row_ok = (rows < T)[:, None]
    ocols = j * bo + jnp.arange(bo)
    o_ok = (ocols < d_out)[:, None]
    prec = _precision(b_ref.dtype)

    def segment(g, acc):
        slot, rank = slot_ref[g], rank_ref[g]
        inside = ((rows >= start_ref[g]) & (rows < end_ref[g]))[:, None]

        def rank_block(rb, part):
            rcols = rb * br + jnp.arange(br)
            xt = plgpu.load(xa_ref.at[pl.ds(i * bt, bt), pl.ds(rb * br, br)],
                            mask=row_ok, other=0)  # [bt, br] float32
            bt_ = plgpu.load(_b_block(b_ref, pt_ref, slot, rb, br, pl.ds(j * bo, bo)),
                             mask=o_ok & (rcols < rank)[None, :], other=0)  # [bo, br]
            return part + _dot_t(xt.astype(bt_.dtype), bt_, prec)

        part = jax.lax.fori_loop(0, nrb_ref[g], rank_block, jnp.zeros((bt, bo), jnp.float32))
        return acc + jnp.where(inside, part * scale_ref[g], 0.0)

    acc = jax.lax.fori_loop(lo_ref[i], hi_ref[i], segment, jnp.zeros((bt, bo), jnp.float32))
    plgpu.store(y_ref.at[pl.ds(i * bt, bt), pl.ds(j * bo, bo)], acc.astype(y_ref.dtype),
                mask=row_ok & (ocols < d_out)[None, :])


@functools.partial(jax.jit, static_argnames=(
    "pad_to_max_rank", "interpret", "block_t", "block_r", "block_d", "block_o"))
def sgmv(
    x: jax.Array,  # [T, d_in]
    a: jax.Array,  # [S, r_max, d_in]; paged: [P, page_rank, d_in]
    b: jax.Array,  # [S, d_out, r_max]; paged: [P, d_out, page_rank]
    seg_starts: jax.Array,  # int32 [G]
    seg_lens: jax.Array,  # int32 [G]
    seg_slots: jax.Array,  # int32 [G]; -1: no LoRA
    ranks: jax.Array,  # int32 [S]
    scales: jax.Array,  # float32 [S]
    *,
    page_table: jax.Array | None = None,  # int32 [S, r_max // page_rank]
    pad_to_max_rank: bool = False,
    interpret: bool = False,
    block_t: int | None = None,
    block_r: int | None = None,
    block_d: int | None = None,
    block_o: int | None = None,
) -> jax.Array:  # [T, d_out]
    """Segmented multi-adapter LoRA for prefill; same semantics as `sgmv_reference`:

        for g in range(G):  for t in segment g (slot s = seg_slots[g] >= 0, r = ranks[s]):
            y[t] = scales[s] * (x[t] @ a[s, :r].T) @ b[s, :, :r].T     (0 elsewhere)

    Token tiles of `block_t` rows are the programs; each loops over the (sorted) segments that
    overlap it, so work is ~ (T / block_t + G) * block_t * rank * d. With `page_table` (paged
    layout, see the module docstring) `block_r` must be None or `page_rank`.
    """
    blocks = default_blocks()
    bt = block_t or blocks["block_t"]
    bd, bo = block_d or blocks["block_d"], block_o or blocks["block_o"]
    T, d_in = x.shape
    r_max, br = _layout(a, page_table, block_r, blocks["block_r"])
    d_out = b.shape[1]
    pt = () if page_table is None else (page_table.astype(jnp.int32),)

    # Normalise segments: empty or LoRA-less ones move past the end; sort by start so each token
    # tile's overlapping segments form one contiguous range [lo, hi).
    lens = jnp.maximum(seg_lens.astype(jnp.int32), 0)
    live = (lens > 0) & (seg_slots >= 0)
    starts = jnp.where(live, seg_starts.astype(jnp.int32), T)
    ends = jnp.where(live, starts + lens, T)
    order = jnp.argsort(starts)
    starts, ends = starts[order], ends[order]
    slots = jnp.where(live, seg_slots, 0)[order].astype(jnp.int32)
    seg_rank = jnp.where(live, ranks[jnp.maximum(seg_slots, 0)], 0)[order].astype(jnp.int32)
    seg_scale = scales[slots].astype(jnp.float32)
    nrb = _rank_blocks(seg_rank, jnp.max(seg_rank, initial=0), br, pad_to_max_rank)
    n_tiles = pl.cdiv(T, bt)
    tile_start = jnp.arange(n_tiles, dtype=jnp.int32) * bt
    lo = jnp.searchsorted(ends, tile_start, side="right").astype(jnp.int32)
    hi = jnp.searchsorted(starts, tile_start + bt, side="left").astype(jnp.int32)
    meta = (lo, hi, starts, ends, slots, seg_rank, nrb)

    xa = _call(functools.partial(_sgmv_shrink_kernel, T=T, d_in=d_in, r_max=r_max, bt=bt,
                                 br=br, bd=bd),
               jax.ShapeDtypeStruct((T, r_max), jnp.float32), (n_tiles,), interpret,
               *meta, x, a, *pt)
    return _call(functools.partial(_sgmv_expand_kernel, T=T, d_out=d_out, bt=bt, br=br, bo=bo),
                 jax.ShapeDtypeStruct((T, d_out), x.dtype), (n_tiles, pl.cdiv(d_out, bo)),
                 interpret, *meta, seg_scale, xa, b, *pt)


# ----------------------------------------------------------------------------------------------
# BGMV: one slot per token (decode)
# ----------------------------------------------------------------------------------------------
def _bgmv_shrink_kernel(slot_ref, rank_ref, nrb_ref, x_ref, a_ref, *refs, d_in, br, bd):
    pt_ref, xa_ref = _split_page_table(refs)
    t, rb = pl.program_id(0), pl.program_id(1)
    out = xa_ref.at[pl.ds(t, 1), pl.ds(rb * br, br)]

    @pl.when(rb < nrb_ref[t])
    def _():
        slot, rank = slot_ref[t], rank_ref[t]
        rcols = rb * br + jnp.arange(br)

        def reduce(k, acc):
            dcols = k * bd + jnp.arange(bd)
            d_ok = (dcols < d_in)[None, :]
            xt = plgpu.load(x_ref.at[pl.ds(t, 1), pl.ds(k * bd, bd)], mask=d_ok, other=0)
            at = plgpu.load(_a_block(a_ref, pt_ref, slot, rb, br, pl.ds(k * bd, bd)),
                            mask=(rcols < rank)[:, None] & d_ok, other=0)  # [br, bd]
            # One token: a matrix-vector product, as a broadcast multiply and row sum.
            prod = at.astype(jnp.float32) * xt.astype(jnp.float32)  # [br, bd]
            return acc + jnp.sum(prod, axis=1)[None, :]

        out[...] = jax.lax.fori_loop(0, pl.cdiv(d_in, bd), reduce, jnp.zeros((1, br), jnp.float32))

    @pl.when(rb >= nrb_ref[t])
    def _():
        out[...] = jnp.zeros((1, br), jnp.float32)


def _bgmv_expand_kernel(slot_ref, rank_ref, nrb_ref, scale_ref, xa_ref, b_ref, *refs,
                        d_out, br, bo):
    pt_ref, y_ref = _split_page_table(refs)
    t, j = pl.program_id(0), pl.program_id(1)
    slot, rank = slot_ref[t], rank_ref[t]
    ocols = j * bo + jnp.arange(bo)
    o_ok = (ocols < d_out)[:, None]

    def rank_block(rb, acc):
        rcols = rb * br + jnp.arange(br)
        xt = xa_ref[pl.ds(t, 1), pl.ds(rb * br, br)]  # [1, br] float32
        bt_ = plgpu.load(_b_block(b_ref, pt_ref, slot, rb, br, pl.ds(j * bo, bo)),
                         mask=o_ok & (rcols < rank)[None, :], other=0)  # [bo, br]
        return acc + jnp.sum(bt_.astype(jnp.float32) * xt, axis=1)[None, :]

    acc = jax.lax.fori_loop(0, nrb_ref[t], rank_block, jnp.zeros((1, bo), jnp.float32))
    plgpu.store(y_ref.at[pl.ds(t, 1), pl.ds(j * bo, bo)],
                (acc * scale_ref[t]).astype(y_ref.dtype), mask=(ocols < d_out)[None, :])


@functools.partial(jax.jit, static_argnames=(
    "pad_to_max_rank", "interpret", "block_r", "block_d", "block_o"))
def bgmv(
    x: jax.Array,  # [T, d_in]
    a: jax.Array,  # [S, r_max, d_in]; paged: [P, page_rank, d_in]
    b: jax.Array,  # [S, d_out, r_max]; paged: [P, d_out, page_rank]
    token_slots: jax.Array,  # int32 [T]; -1: no LoRA
    ranks: jax.Array,  # int32 [S]
    scales: jax.Array,  # float32 [S]
    *,
    page_table: jax.Array | None = None,  # int32 [S, r_max // page_rank]
    pad_to_max_rank: bool = False,
    interpret: bool = False,
    block_r: int | None = None,
    block_d: int | None = None,
    block_o: int | None = None,
) -> jax.Array:  # [T, d_out]
    """Per-token multi-adapter LoRA for decode; same semantics as `bgmv_reference`:

        for t in range(T):  (slot s = token_slots[t] >= 0, r = ranks[s]; else y[t] = 0)
            y[t] = scales[s] * (x[t] @ a[s, :r].T) @ b[s, :, :r].T

    Programs are (token, rank block) for shrink and (token, d_out block) for expand; a token's
    rank blocks past its own rank (or past the batch's max rank when padded) do nothing. With
    `page_table` (paged layout, see the module docstring) `block_r` must be None or `page_rank`.
    """
    blocks = default_blocks()
    bd, bo = block_d or blocks["block_d"], block_o or blocks["block_o"]
    T, d_in = x.shape
    r_max, br = _layout(a, page_table, block_r, blocks["block_r"])
    d_out = b.shape[1]
    pt = () if page_table is None else (page_table.astype(jnp.int32),)
    valid = token_slots >= 0
    slots = jnp.where(valid, token_slots, 0).astype(jnp.int32)
    tok_rank = jnp.where(valid, ranks[slots], 0).astype(jnp.int32)
    nrb = _rank_blocks(tok_rank, jnp.max(tok_rank, initial=0), br, pad_to_max_rank)
    tok_scale = jnp.where(valid, scales[slots], 0.0).astype(jnp.float32)
    xa = _call(functools.partial(_bgmv_shrink_kernel, d_in=d_in, br=br, bd=bd),
               jax.ShapeDtypeStruct((T, r_max), jnp.float32), (T, r_max // br), interpret,
               slots, tok_rank, nrb, x, a, *pt)
    return _call(functools.partial(_bgmv_expand_kernel, d_out=d_out, br=br, bo=bo),
                 jax.ShapeDtypeStruct((T, d_out), x.dtype), (T, pl.cdiv(d_out, bo)), interpret,
                 slots, tok_rank, nrb, tok_scale, xa, b, *pt)
