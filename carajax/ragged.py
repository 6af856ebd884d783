"""The ragged batch's layout: a step's query tokens flattened sequence after sequence, cut into
blocks of one sequence each. Shared by the attention (`models/attention.py` and its Pallas
kernel) and the LoRA forms (`lora/jnp_ops.py`), which group a step's rows the same way; it sits
below both so that neither imports the other.

Layout (S sequences, T query tokens): `query_starts` int32 [S + 1] (sequence s owns rows
query_starts[s]:query_starts[s+1]), `seq_lens` int32 [S] (context length, this step's tokens
included), `block_tables` int32 [S, P] (the pages of each sequence's context).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Cap of the default query block: past this a prefill chunk's blocks waste more on masked padding
# rows (up to Bq - 1 per sequence) than they save in KV gathers.
MAX_DEFAULT_QUERY_BLOCK = 64


def checked_layout(q, k_pages, block_tables, seq_lens, query_starts
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(seq_lens, query_starts, block_tables) as int32 arrays, after checking the shapes agree
    (every implementation takes the same layout: ValueError naming the mismatch)."""
    seq_lens = jnp.asarray(seq_lens, jnp.int32)
    query_starts = jnp.asarray(query_starts, jnp.int32)
    block_tables = jnp.asarray(block_tables, jnp.int32)
    heads, kv_heads, S = q.shape[1], k_pages.shape[1], block_tables.shape[0]
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
    include: jax.Array | None = None,  # bool [S]
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:  # 4 x int32 [NB]
    """Split each sequence's query tokens into blocks of at most `query_block` tokens.

    Returns per block (NB = `num_query_blocks`): its sequence, its first row of q, its number of
    valid tokens (0 for the unused blocks at the end, whose sequence is then S - 1), and the
    context position of its first token. Sequence s's blocks come after those of sequences < s.
    `include`: only these sequences get blocks (`num_tokens` then bounds their tokens only).
    """
    S = seq_lens.shape[0]
    bq = query_block
    nb = num_query_blocks(num_tokens, S, bq)
    n = jnp.maximum(query_starts[1:] - query_starts[:-1], 0)  # [S] tokens per sequence
    blocks = (jnp.where(include, n, 0) if include is not None else n) + bq - 1
    blocks = blocks // bq  # [S]
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
