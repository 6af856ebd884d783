"""Segmented multi-adapter LoRA in plain jnp: what the engine runs where the Pallas kernels do
not (CPU). Two formulations of the same op, both with work and bytes that follow the ranks of
the adapters the step uses (never the pool's maximum rank):

- `sgmv_compact` (decode-like steps, few tokens per sequence): the step's distinct adapters'
  own pages gathered once, side by side, and two plain GEMMs over all tokens;
- `sgmv_blocked` (prefill chunks): blocks of `token_block` tokens of one segment each, every
  block's adapter gathered at the step's largest page count (not the pool's).

Static shapes meet dynamic ranks through `lax.switch`: each op is compiled at a few sizes (powers
of two of pages, or page counts 1..n) and runs the smallest that holds the step's real rows, so
one compiled variant serves every rank mix. XLA:CPU runs a batched matmul of small blocks as many
small GEMMs with per-call overhead (a [18, 16, 512] x [18, 512, 64] product reaches ~20 GFLOP/s
here, a plain GEMM ~75), and on a decode step the cost is the adapter bytes read: hence one GEMM
pair over the distinct adapters' rows for decodes, blocks for long chunks.

Same data arguments and semantics as `kernels.sgmv_reference` (a segment = one sequence of the
step's flattened batch, with its adapter slot):

    for g in range(G):
        s = seg_slots[g]
        if s < 0: continue
        for t in range(seg_starts[g], seg_starts[g] + seg_lens[g]):
            y[t] = scales[s] * (x[t] @ a[s, :ranks[s]].T) @ b[s, :, :ranks[s]].T

A page holds `page_rank` rank rows; slot s owns pages `page_table[s, :ceil(ranks[s] / page_rank)]`
(its pages past that, and rows past its rank inside its last page, may hold another adapter's
weights: masked on both sides).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from carajax.ragged import num_query_blocks, plan_query_blocks


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
    """The LoRA delta of a flattened batch in blocks of at most `token_block` tokens that each
    belong to one segment (the attention's query blocks, `plan_query_blocks`); each block gathers
    its slot's pages once and multiplies densely:

        NB = min(T, ceil(T / token_block) + G) blocks, work NB * token_block * r_b * (d_in + d_out),
        weights read NB * r_b * (d_in + d_out),

    with r_b the largest page-padded rank among the step's slots rounded up to a power of two
    of pages (a `lax.switch`). `token_block=1` is BGMV; 64 suits prefill chunks on CPU. Segments must be
    disjoint and in token order (sequence after sequence, as in `StepBatch`)."""
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
    # The step's largest page count: blocks gather that many pages, not the table's width.
    n = page_table.shape[1]
    need = jnp.max(jnp.where(live, -(-ranks[s] // pr), 0))  # pages of the largest live rank
    hi = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None  # no TF32 on GPU

    def gathered(m: int) -> jax.Array:  # the blocks' deltas with m pages each
        pages = page_table[s][:, :m]  # [NB, m]
        r = m * pr
        ab = jnp.take(a, pages, axis=0, mode="clip").reshape(nb, r, d_in)  # [NB, r, d_in]
        bb = jnp.take(b, pages, axis=0, mode="clip")  # [NB, m, d_out, pr]
        bb = jnp.swapaxes(bb, 1, 2).reshape(nb, d_out, r)  # [NB, d_out, r]
        keep = jnp.arange(r)[None, :] < ranks[s][:, None]  # [NB, r]
        bb = jnp.where(keep[:, None, :], bb, 0)
        xa = jnp.einsum("ntd,nrd->ntr", xb, ab.astype(x.dtype),
                        preferred_element_type=jnp.float32, precision=hi)  # [NB, bt, r]
        xa = jnp.where(keep[:, None, :], xa, 0) * scales[s][:, None, None]
        return jnp.einsum("ntr,nor->nto", xa, bb.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)  # [NB, bt, d_out]

    sizes = page_sizes(n, base=2)
    yb = jax.lax.switch(jnp.sum(jnp.asarray(sizes) < need),
                        [functools.partial(gathered, m) for m in sizes])
    y = jnp.zeros((T, d_out), jnp.float32)
    y = y.at[jnp.where(valid, rows, T)].set(yb, mode="drop")  # each token in at most one block
    return y.astype(x.dtype)


# The two forms' cost per unit of work, measured on the 2-core CPU box (one projection, d 512
# -> 512, T 512; `scripts/bench_lora_forms.py`): compact ~0.33 us per (token x gathered page),
# blocked ~0.85 us per (block row x page), so the compact form's plain GEMMs win unless it
# multiplies many more pages: 8 prompts of 64 tokens on 8 adapters of ranks 8-64, compact
# 2.3 ms vs blocked 5.6; a 497-token prompt beside 15 decodes on 16 adapters, 10.8 vs 4.5.
BLOCKED_UNIT_COST = 2.6  # blocked unit / compact unit


def prefill_compact_max_pages(T: int, G: int, n: int, token_block: int) -> int:
    """The most pages (rounded as `sgmv_compact` rounds them) with which the compact form can
    still win a prefill step of T tokens in G segments: beyond it, `prefill_uses_compact` says
    blocked whatever the ranks, so those branches need not be compiled (static)."""
    blocked_most = num_query_blocks(T, G, token_block) * token_block * page_sizes(n, 2)[-1]
    return max(1, int(BLOCKED_UNIT_COST * blocked_most / T))


def prefill_uses_compact(plan: CompactPlan, seg_lens, seg_slots, ranks, page_table,
                         page_rank: int, token_block: int) -> jax.Array:  # bool []
    """Whether a step with prefill chunks runs `sgmv_compact` rather than `sgmv_blocked`:
    the form with the smaller estimated work at the step's real adapters and ranks (the
    page counts each rounds up to: `page_sizes`). Never beyond `prefill_compact_max_pages`."""
    T = plan.tok_slot.shape[0]
    G = seg_slots.shape[0]
    S, n = page_table.shape
    live = (seg_slots >= 0) & (seg_lens > 0)
    need = jnp.max(jnp.where(live, -(-ranks[jnp.maximum(seg_slots, 0)] // page_rank), 0))

    def rounded(k, sizes):  # the branch a `lax.switch` over `sizes` runs for k pages
        sizes = jnp.asarray(sizes)
        return sizes[jnp.sum(sizes < k)]

    k = rounded(plan.count, page_sizes(min(S, G) * n))  # the compact form's pages
    blocked = num_query_blocks(T, G, token_block) * token_block * rounded(need, page_sizes(n, 2))
    return ((T * k < BLOCKED_UNIT_COST * blocked)
            & (k <= prefill_compact_max_pages(T, G, n, token_block)))


def token_slots(seg_starts: jax.Array, seg_lens: jax.Array, seg_slots: jax.Array,
                T: int) -> jax.Array:
    """int32 [T]: each token's adapter slot; -1 outside every segment (padding) or no LoRA."""
    G = seg_starts.shape[0]
    t = jnp.arange(T)
    tok_seg = jnp.sum(t[:, None] >= seg_starts[None, :] + seg_lens[None, :], axis=1)  # [T]
    g = jnp.minimum(tok_seg, G - 1)
    inside = (tok_seg < G) & (t >= seg_starts[g]) & (t < seg_starts[g] + seg_lens[g])
    return jnp.where(inside, seg_slots[g], -1)


def compact_pages(seg_slots: jax.Array, ranks: jax.Array, page_table: jax.Array, page_rank: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The pages a step's adapters need, compacted to the front (slot-major, page order within
    a slot): each distinct slot of `seg_slots` once, `ceil(ranks[s] / page_rank)` pages of it.
    Returns pages, owner slot and first rank row of each (int32 [S * n]; past `count`: page 0,
    owner -1), and `count`."""
    S, n = page_table.shape
    pr = page_rank
    used = jnp.zeros(S, bool).at[jnp.where(seg_slots >= 0, seg_slots, S)].set(True, mode="drop")
    j = jnp.arange(n, dtype=jnp.int32)
    need = (used[:, None] & (j[None, :] * pr < ranks[:, None])).reshape(-1)  # [S * n]
    pos = jnp.where(need, jnp.cumsum(need) - 1, S * n)  # out of range: dropped
    pages = jnp.zeros(S * n, jnp.int32).at[pos].set(page_table.reshape(-1), mode="drop")
    owner = jnp.full(S * n, -1, jnp.int32).at[pos].set(
        jnp.repeat(jnp.arange(S, dtype=jnp.int32), n), mode="drop")
    row0 = jnp.zeros(S * n, jnp.int32).at[pos].set(jnp.tile(j * pr, S), mode="drop")
    return pages, owner, row0, jnp.sum(need)


def page_sizes(max_pages: int, base: int = 4) -> tuple[int, ...]:
    """The page counts a `lax.switch` compiles an op at: powers of `base` below `max_pages`,
    then `max_pages` itself (the most a step can need). Each size is a branch compiled into
    every layer variant (~0.2 s each on the 2-core CPU box, 7 projections): powers of 4 keep
    the bytes read within 4x of the step's real rows at half the branches of powers of 2."""
    sizes, k = [], 1
    while k < max_pages:
        sizes.append(k)
        k *= base
    return (*sizes, max_pages)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CompactPlan:
    """What `sgmv_compact` needs beyond the weights, the same for every projection of a step:
    built once per step (`compact_plan`), not once per projection and layer."""

    pages: jax.Array  # int32 [S * n]: the step's adapters' pages, compacted (`compact_pages`)
    owner: jax.Array  # int32 [S * n]: each page's slot; -1 past `count`
    row0: jax.Array  # int32 [S * n]: each page's first rank row in its adapter
    count: jax.Array  # int32 []: pages in use
    tok_slot: jax.Array  # int32 [T]: each token's slot (`token_slots`)


def compact_plan(seg_starts, seg_lens, seg_slots, ranks, page_table, page_rank: int,
                 T: int) -> CompactPlan:
    """The step's `CompactPlan`; `ranks` [S]: each slot's largest rank over the projections
    and layers the plan will serve (its pages), masks per projection come from their ranks."""
    pages, owner, row0, count = compact_pages(seg_slots, ranks, page_table, page_rank)
    return CompactPlan(pages, owner, row0, count, token_slots(seg_starts, seg_lens, seg_slots, T))


def sgmv_compact(
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
    plan: CompactPlan | None = None,  # the step's, with `page_table`'s page ids; None: built here
    max_pages: int | None = None,  # static: compile no branch above it (see `prefill_compact_sizes`)
) -> jax.Array:  # [T, d_out]
    """The same op as `sgmv_blocked`, against the step's distinct adapters' own pages at once:

        rows = the pages of each distinct slot the step uses, up to its rank   [K * page_rank]
        xa   = (x @ A[rows]^T) kept where the row belongs to the token's slot  [T, K * page_rank]
        y    = xa @ B[rows]                                                     [T, d_out]

    K is the number of those pages rounded up to a power of 4 (`page_sizes`: a `lax.switch`),
    so the bytes read and the work follow the step's distinct adapters and their own ranks: 8
    rank-8 adapters read 8 pages, 8 rank-64 ones 32 (page_rank 16), two sequences on one
    adapter read it once. Every token meets every gathered row (work T * K * page_rank * d):
    the right trade for decode steps, where the bytes dominate, not for long prefill chunks.
    """
    return sgmv_compact_group(x, (a,), (b,), seg_starts, seg_lens, seg_slots, (ranks,), (scales,),
                              page_table=page_table, plan=plan, max_pages=max_pages)[0]


@functools.partial(jax.jit, static_argnames=("max_pages",))
def sgmv_compact_group(
    x: jax.Array,  # [T, d_in]
    a: tuple[jax.Array, ...],  # per projection, paged: [P, page_rank, d_in]
    b: tuple[jax.Array, ...],  # per projection, paged: [P, d_out_m, page_rank]
    seg_starts: jax.Array,  # int32 [G]
    seg_lens: jax.Array,  # int32 [G]
    seg_slots: jax.Array,  # int32 [G]; -1: no LoRA
    ranks: tuple[jax.Array, ...],  # per projection, int32 [S]
    scales: tuple[jax.Array, ...],  # per projection, float32 [S]
    *,
    page_table: jax.Array,  # int32 [S, r_max // page_rank], shared by the projections
    plan: CompactPlan | None = None,
    max_pages: int | None = None,
) -> tuple[jax.Array, ...]:  # per projection [T, d_out_m]
    """`sgmv_compact` of projections that read the same x (q/k/v, or gate/up): their gathered
    A rows side by side in ONE x @ A^T GEMM, then a B GEMM each. On a decode step these GEMMs
    are tiny ([16, 512] x [512, 256]) and XLA:CPU's cost per GEMM is mostly fixed (~0.15 ms
    here whether N is 256 or 512): one GEMM for three projections' A costs about 1.3x one."""
    T, d_in = x.shape
    pr = a[0].shape[1]
    S, n = page_table.shape
    if plan is None:
        plan = compact_plan(seg_starts, seg_lens, seg_slots, jnp.max(jnp.stack(ranks), axis=0),
                            page_table, pr, T)
    pages, owner, row0, tok_slot = plan.pages, plan.owner, plan.row0, plan.tok_slot
    hi = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None  # no TF32 on GPU

    def gathered(k: int) -> tuple[jax.Array, ...]:  # the deltas from the first k compacted pages
        A = jnp.concatenate([jnp.take(am, pages[:k], axis=0, mode="clip").reshape(k * pr, d_in)
                             for am in a])  # [M * k * pr, d_in]
        xa_all = jnp.dot(x, A.T.astype(x.dtype), preferred_element_type=jnp.float32,
                         precision=hi)  # [T, M * k * pr]
        col_owner = jnp.repeat(owner[:k], pr)  # [k * pr]
        col_rank = jnp.repeat(row0[:k], pr) + jnp.tile(jnp.arange(pr, dtype=jnp.int32), k)
        s_col = jnp.maximum(col_owner, 0)
        ys = []
        for i, (bm, rm, sm) in enumerate(zip(b, ranks, scales)):
            live = (col_owner >= 0) & (col_rank < rm[s_col])  # [k * pr]
            keep = (tok_slot[:, None] == col_owner[None, :]) & live[None, :]  # [T, k * pr]
            xa = jnp.where(keep, xa_all[:, i * k * pr:(i + 1) * k * pr] * sm[s_col][None, :], 0)
            B = jnp.take(bm, pages[:k], axis=0, mode="clip")  # [k, d_out, pr]
            B = jnp.swapaxes(B, 1, 2).reshape(k * pr, bm.shape[1])
            B = jnp.where(live[:, None], B.astype(jnp.float32), 0)  # rows past a rank: not ours
            ys.append(jnp.dot(xa, B, precision=jax.lax.Precision.HIGHEST))
        return tuple(ys)

    sizes = page_sizes(min(S, seg_slots.shape[0]) * n)  # at most G distinct slots
    if max_pages is not None:
        sizes = tuple(k for k in sizes if k <= max_pages) or sizes[:1]
    branch = jnp.sum(jnp.asarray(sizes) < plan.count)  # the smallest size that holds `count`
    ys = jax.lax.switch(branch, [functools.partial(gathered, k) for k in sizes])
    return tuple(y.astype(x.dtype) for y in ys)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefillPlan:
    """A step with prefill chunks, split in two (`sgmv_prefill_group`): its one-token segments
    (the decodes that run beside the chunks) as a compact batch of their own, and the chunks,
    whose form is chosen by their own adapters. Built once per step (`prefill_plan`)."""

    rows: jax.Array  # int32 [G]: segment g's decode row in the step; T where g is no decode
    decode_slots: jax.Array  # int32 [G]: segment g's slot where it is a decode, else -1
    decode: CompactPlan  # the decodes' adapters, over the G gathered rows (row g: segment g)
    prompt_slots: jax.Array  # int32 [G]: seg_slots with the decodes' set to -1
    prompt: CompactPlan  # the chunks' adapters, over the step's T rows


def prefill_plan(seg_starts, seg_lens, seg_slots, ranks, page_table, page_rank: int,
                 T: int) -> PrefillPlan:
    """The step's `PrefillPlan`; `ranks` [S] as in `compact_plan`."""
    G = seg_slots.shape[0]
    one = seg_lens == 1
    rows = jnp.where(one, seg_starts, T).astype(jnp.int32)
    decode_slots = jnp.where(one, seg_slots, -1)
    prompt_slots = jnp.where(one, -1, seg_slots)
    decode = compact_plan(jnp.arange(G, dtype=jnp.int32), one.astype(jnp.int32), decode_slots,
                          ranks, page_table, page_rank, G)
    prompt = compact_plan(seg_starts, seg_lens, prompt_slots, ranks, page_table, page_rank, T)
    return PrefillPlan(rows, decode_slots, decode, prompt_slots, prompt)


@functools.partial(jax.jit, static_argnames=("token_block",))
def sgmv_prefill_group(
    x: jax.Array,  # [T, d_in]
    a: tuple[jax.Array, ...],  # per projection, paged: [P, page_rank, d_in]
    b: tuple[jax.Array, ...],  # per projection, paged: [P, d_out_m, page_rank]
    seg_starts: jax.Array,  # int32 [G]
    seg_lens: jax.Array,  # int32 [G]
    seg_slots: jax.Array,  # int32 [G]; -1: no LoRA
    ranks: tuple[jax.Array, ...],  # per projection, int32 [S]
    scales: tuple[jax.Array, ...],  # per projection, float32 [S]
    *,
    page_table: jax.Array,  # int32 [S, r_max // page_rank]
    plan: PrefillPlan | None = None,  # the step's; None: built here
    token_block: int = 64,
) -> tuple[jax.Array, ...]:  # per projection [T, d_out_m]
    """The LoRA deltas of a step with prefill chunks, for projections that read the same x.
    Its decodes (one-token segments) are gathered into [G, d_in] and run the compact form over
    their own adapters (`sgmv_compact_group`: one A GEMM for all projections); the chunks run
    the cheaper of the compact and blocked forms for THEIR adapters (`prefill_uses_compact`).

    Why split: together, each decode took a whole block of the blocked form (15 decodes beside
    a 497-token chunk: 24 blocks of 64 rows at the step's largest rank, 15 of them one row
    each), or made the compact form multiply every chunk token by every decode's adapter."""
    T, d_in = x.shape
    G = seg_slots.shape[0]
    pr = a[0].shape[1]
    if plan is None:
        plan = prefill_plan(seg_starts, seg_lens, seg_slots, jnp.max(jnp.stack(ranks), axis=0),
                            page_table, pr, T)

    def live(slots, rm):  # whether some segment of `slots` has this projection
        return jnp.any((slots >= 0) & (rm[jnp.maximum(slots, 0)] > 0))

    xd = x.at[plan.rows].get(mode="fill", fill_value=0)  # [G, d_in]
    decodes = jax.lax.cond(
        jnp.any(jnp.stack([live(plan.decode_slots, rm) for rm in ranks])),
        lambda: sgmv_compact_group(xd, a, b, jnp.arange(G, dtype=jnp.int32),
                                   (plan.rows < T).astype(jnp.int32), plan.decode_slots, ranks,
                                   scales, page_table=page_table, plan=plan.decode),
        lambda: tuple(jnp.zeros((G, bm.shape[1]), x.dtype) for bm in b))
    most = prefill_compact_max_pages(T, G, page_table.shape[1], token_block)
    ys = []
    for am, bm, rm, sm, yd in zip(a, b, ranks, scales, decodes):
        args = (x, am, bm, seg_starts, seg_lens, plan.prompt_slots, rm, sm)

        def chunks(args=args, rm=rm):
            return jax.lax.cond(
                prefill_uses_compact(plan.prompt, seg_lens, plan.prompt_slots, rm, page_table, pr,
                                     token_block),
                lambda: sgmv_compact(*args, page_table=page_table, plan=plan.prompt,
                                     max_pages=most),
                lambda: sgmv_blocked(*args, page_table=page_table, token_block=token_block))

        yp = jax.lax.cond(live(plan.prompt_slots, rm), chunks,
                          lambda bm=bm: jnp.zeros((T, bm.shape[1]), x.dtype))
        ys.append(yp.at[plan.rows].add(yd, mode="drop"))
    return tuple(ys)
