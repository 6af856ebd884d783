"""Fused multi-rank SGMV in Pallas: shrink and expand in ONE `pallas_call` (issue 17, item 2).

`sgmv_fused` has `kernels.sgmv`'s signature and semantics (`kernels.sgmv_reference` is its
reference), over the same slot or paged weight layout (see `carajax.lora.kernels`' docstring).
Where `kernels.sgmv` writes `xa = x @ A^T` [T, r_max] to memory in one kernel and reads it back in
a second, here each program keeps its xa in registers:

    program i = one tile of up to block_t tokens of ONE segment g (slot s, rank r):
        xa[rb] = x[tile] @ A[s, rank block rb]^T     for each rank block rb < nrb(g),
                                                     one pass over d_in (x read once)
        for each output tile j of block_o columns:
            y[tile, j] = scale[s] * sum_rb xa[rb] @ B[s, j, rank block rb]^T

Rank blocks past the segment's own rank are skipped (unpadded, cost ~ sum of ranks) or run up to
the batch's max rank (`pad_to_max_rank=True`, cost ~ tiles x max rank, uniform programs); rows and
columns past the true rank are masked either way. The grid is static: ceil(T / block_t) + G
programs bound the tiles of G segments; programs past the last tile, and rows outside every
segment, leave the output as the zeros it is aliased to. Segments never share a tile, so a
decode step (G segments of one token) runs G programs of one live row each (`kernels.sgmv`
instead runs every token tile over all the segments that overlap it). Each program does its whole
d_out, so a segment's shrink is done once; the price is fewer programs than the two-call form.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.triton as plgpu
import jax.numpy as jnp

from carajax.lora.kernels import (
    _a_block,
    _b_block,
    _dot_t,
    _layout,
    _precision,
    _rank_blocks,
    _split_page_table,
    default_blocks,
)


def _fused_kernel(seg_ref, start_ref, end_ref, slot_ref, rank_ref, nrb_ref, scale_ref, x_ref,
                  a_ref, b_ref, *refs, d_in, d_out, n_rb, bt, br, bd, bo):
    *pt, _zeros_ref, y_ref = refs  # the zeros y is aliased to come in before the output
    pt_ref, _ = _split_page_table((*pt, y_ref))
    i = pl.program_id(0)
    g = seg_ref[i]  # -1: an idle program (past the last tile)

    @pl.when(g >= 0)
    def _():
        gg = jnp.maximum(g, 0)
        slot, rank, nrb = slot_ref[gg], rank_ref[gg], nrb_ref[gg]
        lo, end = start_ref[i], end_ref[gg]
        rows = lo + jnp.arange(bt)
        row_ok = (rows < end)[:, None]
        prec = _precision(x_ref.dtype)

        def shrink(k, xa):
            dcols = k * bd + jnp.arange(bd)
            d_ok = (dcols < d_in)[None, :]
            xt = plgpu.load(x_ref.at[pl.ds(lo, bt), pl.ds(k * bd, bd)],
                            mask=row_ok & d_ok, other=0)  # [bt, bd]
            out = []
            for rb in range(n_rb):  # static: xa stays a tuple of register blocks
                rcols = rb * br + jnp.arange(br)

                def block(acc, rb=rb, rcols=rcols):
                    at = plgpu.load(_a_block(a_ref, pt_ref, slot, rb, br, pl.ds(k * bd, bd)),
                                    mask=(rcols < rank)[:, None] & d_ok, other=0)  # [br, bd]
                    return acc + _dot_t(xt, at.astype(xt.dtype), prec)

                out.append(jax.lax.cond(rb < nrb, block, lambda acc: acc, xa[rb]))
            return tuple(out)

        xa = jax.lax.fori_loop(0, pl.cdiv(d_in, bd), shrink,
                               tuple(jnp.zeros((bt, br), jnp.float32) for _ in range(n_rb)))
        scale = scale_ref[gg]
        bprec = _precision(b_ref.dtype)

        def expand(j, _):
            ocols = j * bo + jnp.arange(bo)
            o_ok = (ocols < d_out)[:, None]
            acc = jnp.zeros((bt, bo), jnp.float32)
            for rb in range(n_rb):
                rcols = rb * br + jnp.arange(br)

                def block(acc, rb=rb, rcols=rcols):
                    bt_ = plgpu.load(_b_block(b_ref, pt_ref, slot, rb, br, pl.ds(j * bo, bo)),
                                     mask=o_ok & (rcols < rank)[None, :], other=0)  # [bo, br]
                    return acc + _dot_t(xa[rb].astype(bt_.dtype), bt_, bprec)

                acc = jax.lax.cond(rb < nrb, block, lambda acc: acc, acc)
            plgpu.store(y_ref.at[pl.ds(lo, bt), pl.ds(j * bo, bo)],
                        (acc * scale).astype(y_ref.dtype), mask=row_ok & (ocols < d_out)[None, :])

        jax.lax.fori_loop(0, pl.cdiv(d_out, bo), expand, None)


@functools.partial(jax.jit, static_argnames=(
    "pad_to_max_rank", "interpret", "block_t", "block_r", "block_d", "block_o"))
def sgmv_fused(
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
    """Segmented multi-adapter LoRA, shrink and expand fused; same semantics as `sgmv_reference`:

        for g in range(G):  for t in segment g (slot s = seg_slots[g] >= 0, r = ranks[s]):
            y[t] = scales[s] * (x[t] @ a[s, :r].T) @ b[s, :, :r].T     (0 elsewhere)

    Segments must be disjoint (as in `sgmv`). With `page_table` (paged layout) `block_r` must be
    None or `page_rank`.
    """
    blocks = default_blocks()
    bt = block_t or blocks["block_t"]
    bd, bo = block_d or blocks["block_d"], block_o or blocks["block_o"]
    T, d_in = x.shape
    r_max, br = _layout(a, page_table, block_r, blocks["block_r"])
    d_out = b.shape[1]
    G = seg_slots.shape[0]
    pt = () if page_table is None else (page_table.astype(jnp.int32),)

    # Each live segment (tokens and a slot) gets ceil(len / bt) tiles, in the given order; the
    # rest get none. Program i runs tile i - first_tile[g] of the segment g whose tiles hold i.
    starts = jnp.clip(seg_starts.astype(jnp.int32), 0, T)
    ends = jnp.clip(starts + seg_lens.astype(jnp.int32), starts, T)
    lens = ends - starts  # tokens inside [0, T): what the static bound on tiles counts
    live = (lens > 0) & (seg_slots >= 0)
    slots = jnp.where(live, seg_slots, 0).astype(jnp.int32)
    seg_rank = jnp.where(live, ranks[slots], 0).astype(jnp.int32)
    nrb = _rank_blocks(seg_rank, jnp.max(seg_rank, initial=0), br, pad_to_max_rank)
    nrb = jnp.where(live, nrb, 0)
    n_tiles = jnp.where(live, pl.cdiv(lens, bt), 0)
    first_tile = jnp.cumsum(n_tiles) - n_tiles  # [G]
    n_prog = pl.cdiv(T, bt) + G  # static bound on sum(n_tiles)
    prog = jnp.arange(n_prog, dtype=jnp.int32)
    seg = jnp.searchsorted(jnp.cumsum(n_tiles), prog, side="right").astype(jnp.int32)  # [n_prog]
    seg = jnp.where(seg < G, seg, -1)
    sg = jnp.maximum(seg, 0)
    tile_start = (starts[sg] + (prog - first_tile[sg]) * bt).astype(jnp.int32)
    meta = (seg, tile_start, ends, slots, seg_rank, nrb, scales[slots].astype(jnp.float32))

    kernel = functools.partial(_fused_kernel, d_in=d_in, d_out=d_out, n_rb=r_max // br,
                               bt=bt, br=br, bd=bd, bo=bo)
    args = (*meta, x, a, b, *pt, jnp.zeros((T, d_out), x.dtype))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((T, d_out), x.dtype), grid=(n_prog,),
        in_specs=[pl.no_block_spec] * len(args), out_specs=pl.no_block_spec,
        input_output_aliases={len(args) - 1: 0}, interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2),
    )(*args)
