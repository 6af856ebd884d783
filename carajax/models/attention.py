"""Paged attention over a flattened ragged batch: the attention the model runs against a paged
KV cache, where one step mixes prefill chunks and decode tokens of many sequences.

Why paged: a dense cache reserves `max_seq` positions per row, so memory follows the longest
request the server might see; a page pool lets each sequence hold just the pages it fills, and
the gathers below read just those pages. Why ragged: a prefill chunk of 200 tokens and 30 single
decode tokens share one step without padding every sequence to the longest one.

Layout (S sequences, T query tokens, N pages of `page_size` positions):
    q             [T, heads, head_dim]                    the step's queries, sequence after sequence
    k_pages       [N, kv_heads, page_size, head_dim]      the key pool (this step's keys already in it)
    v_pages       [N, kv_heads, page_size, head_dim]      the value pool
    block_tables  int32 [S, P]                            context position p of sequence s lives in
                                                          page block_tables[s, p // page_size] at
                                                          offset p % page_size
    seq_lens      int32 [S]                               context length, this step's tokens included
    query_starts  int32 [S + 1]                           sequence s owns q[query_starts[s]:query_starts[s+1]]

`paged_attention` is the entry point and the single dispatch point between implementations: the
pure-jnp reference here (what CPUs run, and what a kernel is tested against) and the Pallas GPU
kernel behind the same signature (`paged_attention_pallas.py`, issue 17); the reference's dense
block pieces (products, online softmax, the step's own keys) are in `attention_blocks.py`.
`write_pages` puts a step's keys and values into the pools.

Why head-major pages (kv head before position, FlashInfer's "HND"): a page of one kv head is a
contiguous [page_size, head_dim] tile, so a gathered page is already in the order the score and
value products batch over (sequence, kv head); position-major pages needed a copy into that
order, or (decode) a product per (sequence, kv head) pair of one query row. Measured (2-core
CPU, float32, 16 sequences, 8 / 8 heads, head_dim 64, a decode step's attention per layer):
context 64 / 100 / 500 / 1000, 1.03 / 1.62 / 6.52 / 14.8 ms position-major -> 0.58 / 0.75 /
3.65 / 6.73 head-major. Writes stay cheap: 512 tokens, 0.11 -> 0.15 ms.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from carajax import autotune
from carajax.models.attention_blocks import (
    State,
    _chunk_attention,
    _merge,
    _normalise,
    _online_update,
    _scores,
)
from carajax.ragged import (  # noqa: F401  (re-exported: the layout is part of this API)
    MAX_DEFAULT_QUERY_BLOCK,
    checked_layout,
    default_query_block,
    num_query_blocks,
    plan_query_blocks,
)

IMPLS = ("auto", "reference", "pallas", "interpret")

# Keys are walked in chunks of this many pages (128 positions at page size 16): small enough
# that a chunk's gathered keys and values stay in cache, large enough to amortise the loop.
KV_CHUNK_PAGES = 8
# Decode steps (one query a block) walk chunks of about this many (page, kv head) tiles: one
# page when kv heads are many (a gathered page is already [kv_heads, page_size, head_dim]; a
# chunk of several needs a copy to put each kv head's positions side by side), more when they
# are few, so each step's products are not too small to pay for the loop. Measured (2-core CPU,
# float32, 16 sequences, head_dim 64, pages of 16), ms per layer for chunks of 1 / 2 / 4 pages:
# 8 / 8 heads at context 100: 0.91 / 0.74 / 0.76, at 500: 2.85 / 2.98 / 3.25; 9 / 3 heads at
# 300: 2.48 / 2.00 / 1.61, at 600: 4.58 / 3.46 / 3.02 (runs spread +-30%).
# Prefill blocks (64 queries) take KV_CHUNK_PAGES (fewer, larger products).
DECODE_CHUNK_TILES = 12


def decode_chunk_pages(kv_heads: int) -> int:
    """Pages per step of a decode walk: the power of two at or below DECODE_CHUNK_TILES /
    kv_heads (8 kv heads: 1, 3: 4, 1: 8)."""
    return 1 << (max(1, DECODE_CHUNK_TILES // kv_heads).bit_length() - 1)


def paged_attention(
    q: jax.Array,  # [T, heads, head_dim]
    k_pages: jax.Array,  # [N, kv_heads, page_size, head_dim]
    v_pages: jax.Array,  # [N, kv_heads, page_size, head_dim]
    block_tables: jax.Array,  # int32 [S, P]
    seq_lens: jax.Array,  # int32 [S]
    query_starts: jax.Array,  # int32 [S + 1]
    *,
    impl: str = "auto",
    query_block: int | None = None,
) -> jax.Array:  # [T, heads, head_dim], q's dtype
    """Causal grouped-query attention of each query token over its own sequence's paged context.

    Semantics, as a naive loop (scale = 1 / sqrt(head_dim), group = heads // kv_heads):

        out = zeros_like(q)
        for s in range(S):
            n = query_starts[s + 1] - query_starts[s]
            keys = the seq_lens[s] positions of sequence s, read through block_tables[s]
            for i in range(n):
                t = query_starts[s] + i
                pos = seq_lens[s] - n + i          # this token's context position
                for h in range(heads):
                    scores = keys[:pos + 1, h // group] @ q[t, h] * scale     # float32
                    out[t, h] = softmax(scores) @ values[:pos + 1, h // group]

    Rows of q past query_starts[S] are padding and come out as 0; padding sequences have
    seq_len 0 and no tokens. Entries of block_tables past a sequence's last page are never read
    unmasked (they must lie in [0, N), e.g. 0). Pool positions that are never read must be
    finite (a zero-initialised pool written by `write_pages` is): masked probabilities are 0, and
    0 * NaN is NaN.

    impl: "reference" (pure jnp, below); "pallas" (the Pallas kernel of
        `paged_attention_pallas`, compiled: NVIDIA GPUs, via Triton); "interpret" (the same kernel
        in Pallas interpret mode: CPU tests); "auto": what `carajax.autotune.attention_impl`
        says for a decode step (query block 1) or a prefill step, decided at trace time: on a
        GPU the shipped kernel table's choice, else the form an engine's warm-up measured fastest
        among those verified compiled on this device kind, else "reference" (never an untested
        kernel; on CPU interpreting a kernel is several times slower than the jnp reference);
        "pallas" only where the kernel takes the shapes (head_dim a power of two >= 16).
    query_block (static): Bq, the query tokens attended together; see
        `paged_attention_reference`. None: `default_query_block(T, S)`. The kernel may cut it
        to fit its tile; the result does not depend on it.
    """
    if impl == "auto":
        bq = default_query_block(q.shape[0], block_tables.shape[0]) if query_block is None \
            else query_block
        impl = autotune.attention_impl(decode=bq == 1)
        if impl == "pallas" and not _kernel_fits(q):
            impl = "reference"
    if impl == "reference":
        return paged_attention_reference(q, k_pages, v_pages, block_tables, seq_lens,
                                         query_starts, query_block=query_block)
    if impl in ("pallas", "interpret"):
        from carajax.models.paged_attention_pallas import paged_attention_pallas
        return paged_attention_pallas(q, k_pages, v_pages, block_tables, seq_lens, query_starts,
                                      query_block=query_block, interpret=impl == "interpret")
    raise ValueError(f"paged_attention: unknown impl {impl!r}, expected one of {IMPLS}")


def _kernel_fits(q) -> bool:
    """Whether the Pallas kernel takes these shapes: head dims its Triton tiles take."""
    head_dim = q.shape[-1]
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def paged_attention_reference(
    q: jax.Array,  # [T, heads, head_dim]
    k_pages: jax.Array,  # [N, kv_heads, page_size, head_dim]
    v_pages: jax.Array,  # [N, kv_heads, page_size, head_dim]
    block_tables: jax.Array,  # int32 [S, P]
    seq_lens: jax.Array,  # int32 [S]
    query_starts: jax.Array,  # int32 [S + 1]
    *,
    query_block: int | None = None,
) -> jax.Array:  # [T, heads, head_dim]
    """`paged_attention` in pure jnp, with static shapes, in two forms chosen by Bq.

    Bq = 1 (a decode-only step, one token per sequence): each sequence's one query walks its
    pages (`_paged_walk`) in chunks of `decode_chunk_pages` pages with an online softmax
    (running max, sum and weighted values, as flash attention does): one gather per sequence.

    Bq > 1 (a step with prefill chunks): the keys a query sees are split in two and the two
    softmaxes merged (`_merge`):
      * the step's own keys, those its sequence wrote this step (`attention_blocks.
        _chunk_attention`), causal in the flat order (each sequence's position order), in one of
        two exact forms picked per step by the work each would do: blocks of CHUNK_BLOCK rows of
        the flat step along the diagonals some sequence spans (16 prompts of 64 do little more
        than 16 blocks of 64 x 64), or blocks of ROW_BLOCK query rows each against every key
        before it in one product (a long prompt's causal triangle in a few large products).
        (Per-sequence query blocks through the pages cost up to S empty blocks and the full
        square: measured 2.5x slower on a 512-token chunk.)
      * the context written by earlier steps (positions below seq_len - n): the paged walk,
        with per-sequence query blocks of Bq tokens (`plan_query_blocks`). It costs nothing on a
        step with no earlier context (every chunk past the longest is skipped).

    Cost model: a chunk of keys is skipped (`lax.cond`: only the branch taken runs) once it lies
    past the batch's longest (earlier) context, so the work follows the longest sequence of the
    step, not the cache's capacity or the table's width.
    """
    seq_lens, query_starts, block_tables = checked_layout(q, k_pages, block_tables, seq_lens,
                                                         query_starts)
    T, heads, head_dim = q.shape
    S = block_tables.shape[0]
    bq = default_query_block(T, S) if query_block is None else query_block
    if bq < 1:
        raise ValueError(f"query_block must be >= 1, got {bq}")
    if T == 0:
        return jnp.zeros_like(q)
    # GPUs multiply float32 in TF32 by default; the reference keeps full float32 precision.
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    qs = q * jnp.asarray(1 / math.sqrt(head_dim), q.dtype)
    if bq == 1:
        state = _paged_walk(qs, k_pages, v_pages, block_tables, seq_lens, seq_lens,
                            query_starts, 1, causal=True, precision=precision)
        return _normalise(state, q.dtype)
    n = jnp.maximum(query_starts[1:] - query_starts[:-1], 0)  # [S] this step's tokens
    earlier = seq_lens - n  # [S] context written by earlier steps
    seg, k_own, v_own = _own_keys(k_pages, v_pages, block_tables, earlier, query_starts, T)
    own = _chunk_attention(qs, k_own, v_own, seg, precision)
    # The earlier context of the step's one-token sequences (decodes beside a prefill chunk)
    # in a walk of one query per sequence; in blocks of Bq they would each fill a block of
    # padding rows, and walk it over their whole context (measured: a 512-token step with 15
    # decodes at context ~400 cost 2x the same chunk alone).
    single = n == 1
    past_one = _paged_walk(qs, k_pages, v_pages, block_tables, seq_lens, earlier, query_starts,
                           1, causal=False, precision=precision, include=single,
                           num_tokens=min(T, S))
    past = _paged_walk(qs, k_pages, v_pages, block_tables, seq_lens, earlier, query_starts, bq,
                       causal=False, precision=precision, include=(n > 1) & (earlier > 0),
                       by_items=True)
    out = _normalise(_merge(_merge(own, past_one), past), q.dtype)
    return jnp.where((jnp.arange(T) < query_starts[S])[:, None, None], out, 0)  # padding rows: 0


def _own_keys(k_pages, v_pages, block_tables, earlier, query_starts, T):
    """Each query row's sequence (padding rows get distinct ids past S, so they see only
    themselves) and the keys and values this step wrote for it, read back from the pools."""
    S = block_tables.shape[0]
    page_size = k_pages.shape[2]
    t = jnp.arange(T, dtype=jnp.int32)
    s = jnp.clip(jnp.searchsorted(query_starts, t, side="right").astype(jnp.int32) - 1, 0, S - 1)
    used = t < query_starts[S]
    seg = jnp.where(used, s, S + t)  # [T], non-decreasing
    pos = earlier[s] + t - query_starts[s]  # [T] context position of row t
    page = jnp.take_along_axis(block_tables[s], (pos // page_size)[:, None], axis=1,
                               mode="clip")[:, 0]
    page, offset = jnp.where(used, page, 0), jnp.where(used, pos % page_size, 0)  # [T] each
    return seg, k_pages[page, :, offset], v_pages[page, :, offset]  # [T], [T, K, D] x 2


def _paged_walk(q, k_pages, v_pages, block_tables, seq_lens, limits, query_starts, bq, *,
                causal: bool, precision, include=None, num_tokens: int | None = None,
                by_items: bool = False) -> State:
    """Each query row's softmax state over its sequence's paged context positions below
    `limits[s]` [S] (and, if `causal`, at or below its own position), walked in chunks of pages
    per query block of `bq` rows of one sequence. `include` (bool [S]): only these sequences'
    rows (the others come out empty: max -inf, sum 0), `num_tokens` (static) bounding their
    tokens (default T). Returns [T, K, G], [T, K, G], [T, K, G, D].

    The walk: every block at once, chunk after chunk up to the longest limit of the step (a
    decode step's blocks are its sequences, their contexts alike), or, `by_items`, one (block,
    chunk) pair at a time over only the pairs that hold some of the block's keys (`_walk_items`:
    prompts continuing from earlier steps, whose blocks and contexts differ widely)."""
    T, heads, head_dim = q.shape
    _, kv_heads, page_size, _ = k_pages.shape
    S, P = block_tables.shape
    group = heads // kv_heads
    seq, row0, length, pos0 = plan_query_blocks(seq_lens, query_starts, num_tokens or T, bq,
                                                include)  # [NB] each
    nb = seq.shape[0]
    i = jnp.arange(bq, dtype=jnp.int32)
    rows = row0[:, None] + i  # [NB, Bq]
    valid = i < length[:, None]  # [NB, Bq]
    qpos = pos0[:, None] + i  # [NB, Bq]

    # Queries: rows past a block's length belong to the next sequence or to padding (any value,
    # NaN included). Their scores are masked anyway; zeroing them keeps NaN out of the products.
    qb = jnp.take(q, jnp.where(valid, rows, 0), axis=0)  # [NB, Bq, heads, D]
    qb = jnp.where(valid[:, :, None, None], qb, 0).reshape(nb, bq, kv_heads, group, head_dim)

    # Each block's pages, padded to whole chunks (padding entries point at page 0, masked).
    cp = min(decode_chunk_pages(kv_heads) if bq == 1 else KV_CHUNK_PAGES, P)
    chunks = -(-P // cp)
    tables = jnp.take(block_tables, seq, axis=0)  # [NB, P]
    tables = jnp.pad(tables, ((0, 0), (0, chunks * cp - P))).reshape(nb, chunks, cp)
    limit = limits[seq]  # [NB]
    C = cp * page_size  # positions per chunk
    init = (jnp.full((nb, kv_heads, group, bq), -jnp.inf, jnp.float32),
            jnp.zeros((nb, kv_heads, group, bq), jnp.float32),
            jnp.zeros((nb, kv_heads, group, bq, head_dim), jnp.float32))
    if by_items:
        m, total, acc = _walk_pairs(init, qb, k_pages, v_pages, tables, limit, length, valid,
                                    C, precision)
    else:
        m, total, acc = _walk_chunks(init, qb, k_pages, v_pages, tables, limit, length, valid,
                                     qpos if causal else None, C, precision)
    # Back to rows by a gather (XLA:CPU runs a scatter element by element: 6 ms for a 1024-row
    # step's values): row t is row (t - start) % bq of its sequence's block (t - start) // bq.
    t = jnp.arange(T, dtype=jnp.int32)
    s = jnp.clip(jnp.searchsorted(query_starts, t, side="right").astype(jnp.int32) - 1, 0, S - 1)
    n = jnp.maximum(query_starts[1:] - query_starts[:-1], 0)  # [S]
    if include is not None:
        n = jnp.where(include, n, 0)
    first_block = jnp.cumsum((n + bq - 1) // bq) - (n + bq - 1) // bq  # [S]
    src = (first_block[s] + (t - query_starts[s]) // bq) * bq + (t - query_starts[s]) % bq
    used = t < query_starts[S]  # [T]
    if include is not None:
        used &= include[s]
    src = jnp.where(used, src, 0)

    def to_rows(x, fill):  # [NB, K, G, Bq, ...] -> [T, K, G, ...]
        x = jnp.moveaxis(x, 3, 1).reshape((nb * bq,) + x.shape[1:3] + x.shape[4:])
        rows = jnp.take(x, src, axis=0)
        return jnp.where(used.reshape((T,) + (1,) * (rows.ndim - 1)), rows, fill)

    return to_rows(m, -jnp.inf), to_rows(total, 0.0), to_rows(acc, 0.0)


def _walk_chunks(state: State, qb, k_pages, v_pages, tables, limit, length, valid, qpos, C: int,
                 precision) -> State:
    """`_paged_walk`'s blocks walked together, chunk after chunk up to the longest limit of
    the step; `qpos` [NB, Bq] (or None): causal, each query sees keys up to its position. Shapes
    as in `_walk_items`."""
    nb, chunks, cp = tables.shape
    kv_heads, _, head_dim = k_pages.shape[1:]
    longest = jnp.max(jnp.where(length > 0, limit, 0))

    def attend(state, c):  # one chunk of keys into the running softmax
        pages = jnp.take(tables, c, axis=1)  # [NB, cp]
        kc, vc = (jnp.take(x, pages, axis=0, mode="clip")  # [NB, cp, K, page, D]
                  for x in (k_pages, v_pages))
        if cp > 1:  # each kv head's positions side by side (one page: already so)
            kc, vc = (x.transpose(0, 2, 1, 3, 4) for x in (kc, vc))
        kc, vc = (x.reshape(nb, kv_heads, C, head_dim) for x in (kc, vc))
        s = _scores(qb, kc.astype(qb.dtype), precision)  # [NB, K, G, Bq, C]
        kpos = c * C + jnp.arange(C, dtype=jnp.int32)
        visible = valid[:, :, None] & (kpos < limit[:, None, None])  # [NB, Bq, C]
        if qpos is not None:
            visible &= kpos <= qpos[:, :, None]
        s = jnp.where(visible[:, None, None], s, -jnp.inf)
        return _online_update(state, s, vc.astype(qb.dtype), precision)

    def step(state, c):
        # Chunks past the longest context of the batch cost nothing (only the taken branch runs).
        return jax.lax.cond(c * C < longest, attend, lambda state, c: state, state, c), None

    return jax.lax.scan(step, state, jnp.arange(chunks, dtype=jnp.int32))[0]


# `_walk_items` is a while_loop, which reverse-mode differentiation cannot go through; its
# gradient is the batched walk's (the same function): training through the serving forward
# (carajax.demo.train) differentiates the paged attention.
@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _walk_pairs(state: State, qb, k_pages, v_pages, tables, limit, length, valid, C: int,
                precision) -> State:
    return _walk_items(state, qb, k_pages, v_pages, tables, limit, length, valid, C, precision)


def _walk_pairs_fwd(state, qb, k_pages, v_pages, tables, limit, length, valid, C, precision):
    out = _walk_items(state, qb, k_pages, v_pages, tables, limit, length, valid, C, precision)
    return out, (state, qb, k_pages, v_pages, tables, limit, length, valid)


def _walk_pairs_bwd(C, precision, res, ct):
    state, qb, k_pages, v_pages, tables, limit, length, valid = res
    _, vjp = jax.vjp(lambda st, q, k, v: _walk_chunks(st, q, k, v, tables, limit, length, valid,
                                                     None, C, precision),
                     state, qb, k_pages, v_pages)
    return (*vjp(ct), None, None, None, None)


_walk_pairs.defvjp(_walk_pairs_fwd, _walk_pairs_bwd)


def _walk_items(state: State, qb, k_pages, v_pages, tables, limit, length, valid, C: int,
                precision) -> State:
    """`_paged_walk`'s blocks walked one (block, chunk) pair at a time, over only the chunks
    below each block's own limit: a `while_loop` of sum_b ceil(limit_b / C) iterations. The
    batched walk computes every block against every chunk up to the step's longest context: in
    a 512-token step with a 43-token prompt continuing at 469 and a 256-token one at 96, 32
    blocks x 4 chunks where 10 blocks need 16 pairs (measured: such steps cost ~2x a fresh
    512-token chunk). qb [NB, Bq, K, G, D], tables [NB, chunks, cp], limit / length [NB],
    valid [NB, Bq]."""
    nb = valid.shape[0]
    kv_heads, _, head_dim = k_pages.shape[1:]
    n_chunks = jnp.where(length > 0, (limit + C - 1) // C, 0)  # [NB]
    ends = jnp.cumsum(n_chunks)  # [NB]

    def body(carry):
        w, (m, total, acc) = carry
        b = jnp.minimum(jnp.searchsorted(ends, w, side="right"), nb - 1).astype(jnp.int32)
        c = w - (ends[b] - n_chunks[b])  # this block's chunk
        pages = tables[b, c]  # [cp]
        kc, vc = (jnp.take(x, pages, axis=0, mode="clip")  # [cp, K, page, D]
                  .transpose(1, 0, 2, 3).reshape(1, kv_heads, C, head_dim)
                  for x in (k_pages, v_pages))
        s = _scores(qb[b][None], kc.astype(qb.dtype), precision)  # [1, K, G, Bq, C]
        kpos = c * C + jnp.arange(C, dtype=jnp.int32)
        visible = valid[b][:, None] & (kpos < limit[b])[None, :]  # [Bq, C]
        s = jnp.where(visible, s, -jnp.inf)
        mb, tb, ab = _online_update((m[b][None], total[b][None], acc[b][None]), s,
                                    vc.astype(qb.dtype), precision)
        return w + 1, (m.at[b].set(mb[0]), total.at[b].set(tb[0]), acc.at[b].set(ab[0]))

    _, state = jax.lax.while_loop(lambda carry: carry[0] < ends[-1], body,
                                  (jnp.int32(0), state))
    return state


def write_pages(
    k_pages: jax.Array,  # [N, kv_heads, page_size, head_dim]
    v_pages: jax.Array,  # [N, kv_heads, page_size, head_dim]
    k: jax.Array,  # [T, kv_heads, head_dim]
    v: jax.Array,  # [T, kv_heads, head_dim]
    slots: jax.Array,  # int32 [T]: page * page_size + offset, or out of range to drop
) -> tuple[jax.Array, jax.Array]:  # the updated pools
    """Write token t's key and value at pool slot slots[t]. Slots outside [0, N * page_size)
    (e.g. -1 for padding tokens) are dropped. Slots of valid tokens must be distinct."""
    N, _, page_size, _ = k_pages.shape
    slots = jnp.asarray(slots, jnp.int32)
    # mode="drop" alone would wrap negative indices (-1 is the last slot): send them past the end.
    page = jnp.where(slots < 0, N, slots // page_size)
    offset = slots % page_size
    # Token t's kv head h goes to [page, h, offset]: the two index arrays, split by the head
    # slice, put the token axis first, so the update is [T, K, D] as given.
    k_pages = k_pages.at[page, :, offset].set(k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[page, :, offset].set(v.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages
