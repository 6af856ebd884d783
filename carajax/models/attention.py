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

IMPLS = ("auto", "reference", "pallas", "interpret")

# Cap of the default query block: past this a prefill chunk's blocks waste more on masked padding
# rows (up to Bq - 1 per sequence) than they save in KV gathers.
MAX_DEFAULT_QUERY_BLOCK = 64
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


def checked_layout(q, k_pages, block_tables, seq_lens, query_starts
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(seq_lens, query_starts, block_tables) as int32 arrays, after checking the shapes agree
    (every implementation takes the same layout: ValueError naming the mismatch)."""
    seq_lens = jnp.asarray(seq_lens, jnp.int32)
    query_starts = jnp.asarray(query_starts, jnp.int32)
    block_tables = jnp.asarray(block_tables, jnp.int32)
    heads, kv_heads, S = q.shape[1], k_pages.shape[2], block_tables.shape[0]
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if query_starts.shape != (S + 1,) or seq_lens.shape != (S,):
        raise ValueError(f"seq_lens {seq_lens.shape} and query_starts {query_starts.shape} must be "
                         f"[S] and [S + 1] for block_tables {block_tables.shape}")
    return seq_lens, query_starts, block_tables


def default_query_block(num_tokens: int, num_seqs: int) -> int:
    """The power of two at or below the mean tokens per sequence, in [1, MAX_DEFAULT_QUERY_BLOCK]:
    1 for a decode-only step (one gather per sequence), larger when prefill chunks dominate.
    Both counts are static shapes, so this costs nothing at run time; the caller, which knows the
    real mix, may do better (padding sequences in S make the mean an underestimate)."""
    mean = max(num_tokens // max(num_seqs, 1), 1)
    return min(MAX_DEFAULT_QUERY_BLOCK, 1 << (mean.bit_length() - 1))


def num_query_blocks(num_tokens: int, num_seqs: int, query_block: int) -> int:
    """A static bound on the query blocks of T tokens in S sequences: sum_s ceil(n_s / Bq) is at
    most sum_s (n_s / Bq + 1) <= ceil(T / Bq) + S (only a sequence's last block may be partial),
    and at most T (no block is empty)."""
    return min(num_tokens, -(-num_tokens // query_block) + num_seqs)


def plan_query_blocks(
    seq_lens: jax.Array,  # int32 [S]
    query_starts: jax.Array,  # int32 [S + 1]
    num_tokens: int,
    query_block: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:  # 4 x int32 [NB]
    """Split each sequence's query tokens into blocks of at most `query_block` tokens.

    Returns per block (NB = `num_query_blocks`): its sequence, its first row of q, its number of
    valid tokens (0 for the unused blocks at the end, whose sequence is then S - 1), and the
    context position of its first token. Sequence s's blocks come after those of sequences < s.
    """
    S = seq_lens.shape[0]
    bq = query_block
    nb = num_query_blocks(num_tokens, S, bq)
    n = jnp.maximum(query_starts[1:] - query_starts[:-1], 0)  # [S] tokens per sequence
    blocks = (n + bq - 1) // bq  # [S]
    ends = jnp.cumsum(blocks)  # [S] one past sequence s's last block
    b = jnp.arange(nb, dtype=jnp.int32)  # [NB]
    # Block b belongs to the first sequence whose blocks end after b (skipping empty sequences).
    seq = jnp.searchsorted(ends, b, side="right").astype(jnp.int32)  # [NB] in [0, S]
    used = seq < S
    seq = jnp.minimum(seq, S - 1)
    j = b - (ends[seq] - blocks[seq])  # [NB] index of the block within its sequence
    row0 = query_starts[seq] + j * bq  # [NB]
    length = jnp.where(used, jnp.clip(query_starts[seq + 1] - row0, 0, bq), 0)  # [NB]
    pos0 = seq_lens[seq] - n[seq] + j * bq  # [NB]
    return seq, row0, length, pos0


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
    """`paged_attention` in pure jnp, with static shapes.

    The T query tokens are cut into NB = min(T, ceil(T / Bq) + S) blocks of at most Bq tokens of
    one sequence each (`plan_query_blocks`). The keys are walked in chunks of KV_CHUNK_PAGES
    pages of each block's sequence (through its row of block_tables) with an online softmax
    (running max, sum and weighted values, as flash attention does), masking keys past seq_len
    or past each query's position; the valid rows are scattered back.

    Cost model: a chunk is skipped (`lax.cond`: only the branch taken runs) once it lies past the
    batch's longest context, so the work follows the longest sequence of the step, not the
    cache's capacity or the table's width: NB * max(seq_lens) keys and as many values gathered,
    in chunks small enough to stay in cache, and NB * Bq * heads * max(seq_lens) * head_dim
    multiply-adds each way. Bq = 1 on a decode-only step (one token per sequence) makes it one
    gather per sequence; with prefill chunks a larger Bq shares a gather among Bq tokens, at the
    price of up to Bq - 1 masked rows per sequence.
    """
    seq_lens, query_starts, block_tables = checked_layout(q, k_pages, block_tables, seq_lens,
                                                         query_starts)
    T, heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    S, P = block_tables.shape
    bq = default_query_block(T, S) if query_block is None else query_block
    if bq < 1:
        raise ValueError(f"query_block must be >= 1, got {bq}")
    if T == 0:
        return jnp.zeros_like(q)
    group = heads // kv_heads

    seq, row0, length, pos0 = plan_query_blocks(seq_lens, query_starts, T, bq)  # [NB] each
    nb = seq.shape[0]
    i = jnp.arange(bq, dtype=jnp.int32)
    rows = row0[:, None] + i  # [NB, Bq]
    valid = i < length[:, None]  # [NB, Bq]
    qpos = pos0[:, None] + i  # [NB, Bq]

    # Queries: rows past a block's length belong to the next sequence or to padding (any value,
    # NaN included). Their scores are masked anyway; zeroing them keeps NaN out of the products.
    qb = jnp.take(q, jnp.where(valid, rows, 0), axis=0)  # [NB, Bq, heads, D]
    qb = jnp.where(valid[:, :, None, None], qb, 0).reshape(nb, bq, kv_heads, group, head_dim)
    qb = qb * jnp.asarray(1 / math.sqrt(head_dim), qb.dtype)

    # Each block's pages, padded to whole chunks (padding entries point at page 0, masked).
    cp = min(KV_CHUNK_PAGES_DECODE if bq == 1 else KV_CHUNK_PAGES, P)
    chunks = -(-P // cp)
    tables = jnp.take(block_tables, seq, axis=0)  # [NB, P]
    tables = jnp.pad(tables, ((0, 0), (0, chunks * cp - P))).reshape(nb, chunks, cp)
    limit = seq_lens[seq]  # [NB] context length of each block's sequence
    longest = jnp.max(jnp.where(length > 0, limit, 0))
    C = cp * page_size  # positions per chunk

    # GPUs multiply float32 in TF32 by default; the reference keeps full float32 precision.
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def attend(carry, c):  # one chunk of keys into the running softmax
        m, total, acc = carry  # [NB, K, G, Bq], [NB, K, G, Bq], [NB, K, G, Bq, D] (float32)
        pages = jnp.take(tables, c, axis=1)  # [NB, cp]
        kc = jnp.take(k_pages, pages, axis=0, mode="clip").reshape(nb, C, kv_heads, head_dim)
        vc = jnp.take(v_pages, pages, axis=0, mode="clip").reshape(nb, C, kv_heads, head_dim)
        s = _scores(qb, kc.astype(q.dtype), precision)  # [NB, K, G, Bq, C]
        kpos = c * C + jnp.arange(C, dtype=jnp.int32)
        visible = (valid[:, :, None] & (kpos <= qpos[:, :, None])
                   & (kpos < limit[:, None, None]))  # [NB, Bq, C]
        s = jnp.where(visible[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        # A row with nothing visible yet keeps max -inf: shift by 0 so exp(-inf) = 0, not NaN.
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        e = jnp.exp(s - shift[..., None])  # [NB, K, G, Bq, C]
        scale = jnp.exp(jnp.where(jnp.isfinite(m), m - shift, -jnp.inf))  # old terms, rescaled
        total = total * scale + jnp.sum(e, axis=-1)
        acc = acc * scale[..., None] + _weighted_values(e.astype(vc.dtype), vc.astype(q.dtype),
                                                        precision)
        return m_new, total, acc

    def step(carry, c):
        # Chunks past the longest context of the batch cost nothing (only the taken branch runs).
        return jax.lax.cond(c * C < longest, attend, lambda carry, c: carry, carry, c), None

    init = (jnp.full((nb, kv_heads, group, bq), -jnp.inf, jnp.float32),
            jnp.zeros((nb, kv_heads, group, bq), jnp.float32),
            jnp.zeros((nb, kv_heads, group, bq, head_dim), jnp.float32))
    (_, total, acc), _ = jax.lax.scan(step, init, jnp.arange(chunks, dtype=jnp.int32))
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # a padding row (sum 0) gives zeros
    out = out.transpose(0, 3, 1, 2, 4).reshape(nb, bq, heads, head_dim).astype(q.dtype)
    # Each valid row of q is in exactly one block. Invalid rows must aim past the end (dropped):
    # left at `rows` they would race with the next sequence's block for the same row of out.
    dest = jnp.where(valid, rows, T)  # [NB, Bq]
    return jnp.zeros_like(q).at[dest].set(out, mode="drop")


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
