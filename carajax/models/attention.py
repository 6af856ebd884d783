"""Paged attention over a flattened ragged batch: the attention the model runs against a paged
KV cache, where one step mixes prefill chunks and decode tokens of many sequences.

Why paged: a dense cache reserves `max_seq` positions per row, so memory follows the longest
request the server might see; a page pool lets each sequence hold just the pages it fills, and
the gathers below read just those pages. Why ragged: a prefill chunk of 200 tokens and 30 single
decode tokens share one step without padding every sequence to the longest one.

Layout (S sequences, T query tokens, N pages of `page_size` positions):
    q             [T, heads, head_dim]                    the step's queries, sequence after sequence
    k_pages       [N, page_size, kv_heads, head_dim]      the key pool (this step's keys already in it)
    v_pages       [N, page_size, kv_heads, head_dim]      the value pool
    block_tables  int32 [S, P]                            context position p of sequence s lives in
                                                          page block_tables[s, p // page_size] at
                                                          offset p % page_size
    seq_lens      int32 [S]                               context length, this step's tokens included
    query_starts  int32 [S + 1]                           sequence s owns q[query_starts[s]:query_starts[s+1]]

`paged_attention` is the entry point and the single dispatch point between implementations: the
pure-jnp reference here (what CPUs run, and what a kernel is tested against) and the Pallas GPU
kernel behind the same signature (`paged_attention_pallas.py`, issue 17). `write_pages` puts a
step's keys and values into the pools.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from carajax import autotune
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
# Decode steps (one query a block) walk smaller chunks: less of the last chunk is masked
# padding. Measured (2-core CPU, XLA:CPU, float32, 16 sequences, 8 heads, head_dim 64, a
# 128-page table): context 80, chunks of 1 / 2 / 4 / 8 pages 1.9 / 1.35 / 2.0 / 2.8 ms;
# context 1000: 12.6 / 14.1 / 13.1 / 16.2 ms; 8 sequences of 9 / 3 heads at 300: 1.5 / 1.1 /
# 1.2 / 1.0 ms. Prefill blocks (64 queries) want 8: 1 sequence of 512, 32 / 21 / 17 / 16 ms.
KV_CHUNK_PAGES_DECODE = 2


def paged_attention(
    q: jax.Array,  # [T, heads, head_dim]
    k_pages: jax.Array,  # [N, page_size, kv_heads, head_dim]
    v_pages: jax.Array,  # [N, page_size, kv_heads, head_dim]
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
    k_pages: jax.Array,  # [N, page_size, kv_heads, head_dim]
    v_pages: jax.Array,  # [N, page_size, kv_heads, head_dim]
    block_tables: jax.Array,  # int32 [S, P]
    seq_lens: jax.Array,  # int32 [S]
    query_starts: jax.Array,  # int32 [S + 1]
    *,
    query_block: int | None = None,
) -> jax.Array:  # [T, heads, head_dim]
    """`paged_attention` in pure jnp, with static shapes, in two forms chosen by Bq.

    Bq = 1 (a decode-only step, one token per sequence): each sequence's one query walks its
    pages (`_paged_walk`) in chunks of KV_CHUNK_PAGES_DECODE pages with an online softmax
    (running max, sum and weighted values, as flash attention does): one gather per sequence.

    Bq > 1 (a step with prefill chunks): the keys a query sees are split in two and the two
    softmaxes merged (`_merge`):
      * the step's own keys, those its sequence wrote this step (`_chunk_attention`): the T
        tokens cut into blocks of CHUNK_BLOCK rows of the flat step, whatever their sequences,
        and each query block attends the key blocks at or before it (causal in the flat order,
        which is each sequence's position order) that share a sequence with it. A 512-token
        prompt does the causal half of 512 x 512, no padding rows; 16 prompts of 64 do little
        more than 16 blocks of 64 x 64. (The per-sequence blocks below cost up to S empty blocks
        and the full square: measured 2.5x slower on a 512-token chunk.)
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
                       causal=False, precision=precision, include=n > 1)
    out = _normalise(_merge(_merge(own, past_one), past), q.dtype)
    return jnp.where((jnp.arange(T) < query_starts[S])[:, None, None], out, 0)  # padding rows: 0


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


def _own_keys(k_pages, v_pages, block_tables, earlier, query_starts, T):
    """Each query row's sequence (padding rows get distinct ids past S, so they see only
    themselves) and the keys and values this step wrote for it, read back from the pools."""
    S = block_tables.shape[0]
    N, page_size, kv_heads, head_dim = k_pages.shape
    t = jnp.arange(T, dtype=jnp.int32)
    s = jnp.clip(jnp.searchsorted(query_starts, t, side="right").astype(jnp.int32) - 1, 0, S - 1)
    used = t < query_starts[S]
    seg = jnp.where(used, s, S + t)  # [T], non-decreasing
    pos = earlier[s] + t - query_starts[s]  # [T] context position of row t
    page = jnp.take_along_axis(block_tables[s], (pos // page_size)[:, None], axis=1,
                               mode="clip")[:, 0]
    slot = jnp.where(used, page * page_size + pos % page_size, 0)  # [T]
    flat = (N * page_size, kv_heads, head_dim)
    return seg, k_pages.reshape(flat)[slot], v_pages.reshape(flat)[slot]  # [T], [T, K, D] x 2


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
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    ms, totals, accs = [], [], []
    for i in range(q.shape[0] // R):
        L = (i + 1) * R
        s = jnp.einsum("qkgd,lkd->kgql", qg[i * R:L], k[:L], preferred_element_type=jnp.float32,
                       precision=precision)  # [K, G, R, L]
        rows, cols = i * R + jnp.arange(R), jnp.arange(L)
        visible = (seg[i * R:L, None] == seg[None, :L]) & (rows[:, None] >= cols[None, :])
        s = jnp.where(visible, s, -jnp.inf)  # every row sees itself: the max is finite
        m = jnp.max(s, axis=-1)  # [K, G, R]
        e = jnp.exp(s - m[..., None])
        totals.append(jnp.sum(e, axis=-1))
        accs.append(jnp.einsum("kgql,lkd->kgqd", e.astype(v.dtype), v[:L],
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
    kb, vb = k.reshape(nq, B, kv_heads, head_dim), v.reshape(nq, B, kv_heads, head_dim)
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
    """One block of scores s [..., Bq, L] and values vb [NB, L, K, D] into the running softmax."""
    m, total, acc = state
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    # A row with nothing visible yet keeps max -inf: shift by 0 so exp(-inf) = 0, not NaN.
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    e = jnp.exp(s - shift[..., None])
    scale = jnp.exp(jnp.where(jnp.isfinite(m), m - shift, -jnp.inf))  # old terms, rescaled
    total = total * scale + jnp.sum(e, axis=-1)
    acc = acc * scale[..., None] + _weighted_values(e.astype(vb.dtype), vb, precision)
    return m_new, total, acc


def _paged_walk(q, k_pages, v_pages, block_tables, seq_lens, limits, query_starts, bq, *,
                causal: bool, precision, include=None, num_tokens: int | None = None) -> State:
    """Each query row's softmax state over its sequence's paged context positions below
    `limits[s]` [S] (and, if `causal`, at or below its own position), walked in chunks of pages
    per query block of `bq` rows of one sequence. `include` (bool [S]): only these sequences'
    rows (the others come out empty: max -inf, sum 0), `num_tokens` (static) bounding their
    tokens (default T). Returns [T, K, G], [T, K, G], [T, K, G, D]."""
    T, heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
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
    cp = min(KV_CHUNK_PAGES_DECODE if bq == 1 else KV_CHUNK_PAGES, P)
    chunks = -(-P // cp)
    tables = jnp.take(block_tables, seq, axis=0)  # [NB, P]
    tables = jnp.pad(tables, ((0, 0), (0, chunks * cp - P))).reshape(nb, chunks, cp)
    limit = limits[seq]  # [NB]
    longest = jnp.max(jnp.where(length > 0, limit, 0))
    C = cp * page_size  # positions per chunk

    def attend(state, c):  # one chunk of keys into the running softmax
        pages = jnp.take(tables, c, axis=1)  # [NB, cp]
        kc = jnp.take(k_pages, pages, axis=0, mode="clip").reshape(nb, C, kv_heads, head_dim)
        vc = jnp.take(v_pages, pages, axis=0, mode="clip").reshape(nb, C, kv_heads, head_dim)
        s = _scores(qb, kc.astype(q.dtype), precision)  # [NB, K, G, Bq, C]
        kpos = c * C + jnp.arange(C, dtype=jnp.int32)
        visible = valid[:, :, None] & (kpos < limit[:, None, None])  # [NB, Bq, C]
        if causal:
            visible &= kpos <= qpos[:, :, None]
        s = jnp.where(visible[:, None, None], s, -jnp.inf)
        return _online_update(state, s, vc.astype(q.dtype), precision)

    def step(state, c):
        # Chunks past the longest context of the batch cost nothing (only the taken branch runs).
        return jax.lax.cond(c * C < longest, attend, lambda state, c: state, state, c), None

    init = (jnp.full((nb, kv_heads, group, bq), -jnp.inf, jnp.float32),
            jnp.zeros((nb, kv_heads, group, bq), jnp.float32),
            jnp.zeros((nb, kv_heads, group, bq, head_dim), jnp.float32))
    (m, total, acc), _ = jax.lax.scan(step, init, jnp.arange(chunks, dtype=jnp.int32))
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


def _block_diagonal(rows_per_kv_head: int) -> bool:
    """XLA:CPU runs a matmul batched over (block, kv head) as one small product per pair; with a
    single query row per kv head (decode, no GQA) that is a GEMV, and one GEMM per block against
    all kv heads side by side (block-diagonal queries, kv_heads x the multiply-adds) is faster
    (values of 16 blocks x 128 keys x 8 heads: 0.38 vs 0.63 ms); with 16 rows or more the
    einsum wins (2-4x). GPUs batch small GEMMs well and keep the einsum; so do several devices
    (tensor parallel shards the kv heads; a product over all of them would need collectives)."""
    return (rows_per_kv_head == 1 and jax.default_backend() == "cpu"
            and jax.device_count() == 1)


def _scores(qb, kb, precision):  # [NB, Bq, K, G, D], [NB, L, K, D] -> f32 [NB, K, G, Bq, L]
    if not _block_diagonal(qb.shape[1] * qb.shape[3]):
        return jnp.einsum("bqkgd,blkd->bkgql", qb, kb, preferred_element_type=jnp.float32,
                          precision=precision)
    nb, bq, kvh, group, d = qb.shape
    eye = jnp.eye(kvh, dtype=qb.dtype)
    # Query (q, k, g) sees only its own kv head's d columns of the [L, K * D] keys.
    qbd = (qb[:, :, :, :, None, :] * eye[:, None, :, None]).reshape(nb, bq * kvh * group, kvh * d)
    s = jnp.einsum("bhe,ble->bhl", qbd, kb.reshape(nb, kb.shape[1], kvh * d),
                   preferred_element_type=jnp.float32, precision=precision)  # [NB, Bq*K*G, L]
    return s.reshape(nb, bq, kvh, group, -1).transpose(0, 2, 3, 1, 4)


def _weighted_values(probs, vb, precision):  # [NB, K, G, Bq, L], [NB, L, K, D] -> [NB, K, G, Bq, D]
    if not _block_diagonal(probs.shape[2] * probs.shape[3]):
        return jnp.einsum("bkgql,blkd->bkgqd", probs, vb, preferred_element_type=jnp.float32,
                          precision=precision)
    nb, kvh, group, bq, L = probs.shape
    d = vb.shape[-1]
    p = probs.transpose(0, 3, 1, 2, 4).reshape(nb, bq * kvh * group, L)
    full = jnp.einsum("bhl,ble->bhe", p, vb.reshape(nb, L, kvh * d),
                      preferred_element_type=jnp.float32, precision=precision)
    full = full.reshape(nb, bq, kvh, group, kvh, d)  # every head against every kv head's values
    k = jnp.arange(kvh)
    own = full[:, :, k, :, k, :]  # [K, NB, Bq, G, D]: each head's own kv head
    return own.transpose(1, 0, 3, 2, 4)


def write_pages(
    k_pages: jax.Array,  # [N, page_size, kv_heads, head_dim]
    v_pages: jax.Array,  # [N, page_size, kv_heads, head_dim]
    k: jax.Array,  # [T, kv_heads, head_dim]
    v: jax.Array,  # [T, kv_heads, head_dim]
    slots: jax.Array,  # int32 [T]: page * page_size + offset, or out of range to drop
) -> tuple[jax.Array, jax.Array]:  # the updated pools
    """Write token t's key and value at pool slot slots[t]. Slots outside [0, N * page_size)
    (e.g. -1 for padding tokens) are dropped. Slots of valid tokens must be distinct."""
    shape = k_pages.shape
    n_slots = shape[0] * shape[1]
    # mode="drop" alone would wrap negative indices (-1 is the last slot): send them past the end.
    slots = jnp.asarray(slots, jnp.int32)
    slots = jnp.where(slots < 0, n_slots, slots)
    flat = (n_slots,) + shape[2:]  # a free reshape: pages are contiguous
    k_pages = k_pages.reshape(flat).at[slots].set(k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.reshape(flat).at[slots].set(v.astype(v_pages.dtype), mode="drop")
    return k_pages.reshape(shape), v_pages.reshape(shape)
