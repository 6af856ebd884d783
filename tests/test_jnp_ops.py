"""The engine's jnp LoRA ops (CPU path) against the reference the kernels are judged by.

`sgmv_dense`, `sgmv_pool` (decode steps) and `sgmv_blocked` (prefill chunks) must equal `sgmv_reference` on a
step's flattened batch: segments in token order (one per sequence; some empty, some without an
adapter, gaps of padding after the last), every rank from 1 to r_max, adapters in scattered pages
with garbage in the pages and table entries nobody owns.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carajax.lora.jnp_ops import sgmv_blocked, sgmv_dense, sgmv_pool
from carajax.lora.kernels import sgmv_reference
from tests.conftest import assert_close
from tests.test_kernels import loop_delta, make_inputs, paginate, seg_token_slots


def step_segments(rng, lengths, S):
    """Segments of the given lengths, back to back from token 0 (a flattened step), each with a
    random slot in [-1, S)."""
    lens = np.asarray(lengths, np.int32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    return starts, lens, rng.integers(-1, S, len(lens)).astype(np.int32)


def check(seed, lengths, T, S=6, r_max=64, pr=16, blocks=(1, 3, 16, 64)):
    rng = np.random.default_rng(seed)
    x, a, b, ranks, scales = make_inputs(seed, T, 48, 40, S, r_max)
    pa, pb, table = paginate(a, b, ranks, pr, seed)
    starts, lens, slots = step_segments(rng, lengths, S)
    want = loop_delta(x, a, b, seg_token_slots(starts, lens, slots, T), np.asarray(ranks),
                      np.asarray(scales))
    ref = sgmv_reference(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table)
    assert_close(ref, want)
    assert_close(sgmv_dense(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table), ref)
    assert_close(sgmv_pool(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table), ref)
    for tb in blocks:
        got = sgmv_blocked(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table,
                           token_block=tb)
        assert_close(got, ref)
    pad = np.arange(T) >= starts[-1] + lens[-1]
    assert not np.any(np.asarray(ref)[pad])  # padding tokens get no delta


def test_decode_step_one_token_per_sequence():
    # 8 sequences of one token (some without an adapter), then 8 padding tokens.
    check(0, [1] * 8, T=16)


def test_prefill_chunks_beside_decodes():
    # Two decodes, a 37-token chunk (not a multiple of any block), an empty segment, a 64-token
    # chunk, a decode; 6 padding tokens.
    check(1, [1, 1, 37, 0, 64, 1], T=110)


def test_every_rank_from_1_to_64_in_one_batch():
    rng = np.random.default_rng(2)
    T, S, r_max, pr = 70, 64, 64, 16
    x, a, b, ranks, scales = make_inputs(2, T, 32, 24, S, r_max, ranks=np.arange(1, 65))
    pa, pb, table = paginate(a, b, ranks, pr, 2)
    lens = np.ones(64, np.int32)
    lens[:3] = [3, 2, 2]  # 64 segments, 70 tokens
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    slots = rng.permutation(64).astype(np.int32)  # each rank once
    ref = sgmv_reference(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table)
    assert_close(sgmv_dense(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table), ref)
    assert_close(sgmv_pool(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table), ref)
    assert_close(sgmv_blocked(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table,
                              token_block=4), ref)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=6), st.integers(0, 2**16))
def test_drawn_segment_lengths(lengths, seed):
    T = 128  # fixed, so the ops compile once; the rest is padding
    check(seed, lengths, T, blocks=(1, 16))


def test_no_adapter_anywhere_is_exactly_zero():
    rng = np.random.default_rng(3)
    x, a, b, ranks, scales = make_inputs(3, 20, 16, 16, 4, 32)
    pa, pb, table = paginate(a, b, ranks, 16, 3)
    starts, lens, _ = step_segments(rng, [5, 5, 5], 4)
    none = np.full(3, -1, np.int32)
    for y in (sgmv_dense(x, pa, pb, starts, lens, none, ranks, scales, page_table=table),
              sgmv_pool(x, pa, pb, starts, lens, none, ranks, scales, page_table=table),
              sgmv_blocked(x, pa, pb, starts, lens, none, ranks, scales, page_table=table)):
        assert not np.any(np.asarray(y))


@pytest.mark.parametrize("tb", [1, 8])
def test_blocked_handles_more_segments_than_tokens_per_block(tb):
    check(4, [2] * 10, T=24, S=5, blocks=(tb,))


def test_pool_form_ignores_stale_rows_of_slots_no_segment_uses():
    """An evicted slot keeps its page-table row and ranks; its pages may now belong to another
    adapter. Only the slots the step uses claim pages, so the stale row changes nothing."""
    T, S, r_max, pr = 12, 4, 32, 16
    x, a, b, ranks, scales = make_inputs(5, T, 24, 20, S, r_max, ranks=np.array([32, 32, 16, 8]))
    pa, pb, table = paginate(a, b, ranks, pr, 5)
    starts, lens = np.array([0, 5], np.int32), np.array([5, 4], np.int32)
    slots = np.array([0, 2], np.int32)
    ref = sgmv_reference(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table)
    stale = table.copy()
    stale[1] = table[0]  # slot 1 (unused this step) points at slot 0's pages
    stale[3, 0] = table[2, 0]  # slot 3 at slot 2's page
    assert_close(sgmv_pool(x, pa, pb, starts, lens, slots, ranks, scales, page_table=stale), ref)
    assert np.any(np.asarray(ref))


def test_the_hook_picks_the_form_with_the_fewest_multiply_adds_and_the_pools_fixed_cost():
    from carajax.lora.hook import jnp_form
    # 8 decodes, rank-64 slots: gathering 8 x 64 rows beats a pool of 512 rows (same
    # multiply-adds, but the pool's slice is copied every layer) and loses to a pool of 128.
    assert jnp_form(8, 8, 512, 64) == "dense"
    assert jnp_form(8, 8, 128, 64) == "pool"
    assert jnp_form(16, 16, 512, 64) == "dense"  # 2x fewer rows is not enough (measured)
    assert jnp_form(16, 16, 2048, 64) == "dense"
    # 512 prefill tokens in 16 segments: 24 blocks of 64 x 64 rows beat 512 x 512 pool rows,
    # but not a pool of 8 pages (128 rows): the fixed cost is small beside 512 tokens.
    assert jnp_form(512, 16, 512, 64) == "blocked"
    assert jnp_form(512, 16, 128, 64) == "pool"
