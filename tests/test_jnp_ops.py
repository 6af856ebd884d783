"""The engine's jnp LoRA ops (CPU path) against the reference the kernels are judged by.

`sgmv_compact` (decode steps) and `sgmv_blocked` (prefill chunks) must equal `sgmv_reference` on a
step's flattened batch: segments in token order (one per sequence; some empty, some without an
adapter, gaps of padding after the last), every rank from 1 to r_max, adapters in scattered pages
with garbage in the pages and table entries nobody owns.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carajax.lora.jnp_ops import (
    compact_pages,
    compact_plan,
    page_sizes,
    prefill_plan,
    prefill_uses_compact,
    sgmv_blocked,
    sgmv_compact,
    sgmv_compact_group,
    sgmv_prefill_group,
)
from carajax.lora.kernels import sgmv_reference
from tests.conftest import assert_close
from tests.test_kernels import loop_delta, make_inputs, paginate, seg_token_slots


def step_segments(rng, lengths, S):
    """Segments of the given lengths, back to back from token 0 (a flattened step), each with a
    random slot in [-1, S)."""
    lens = np.asarray(lengths, np.int32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    return starts, lens, rng.integers(-1, S, len(lens)).astype(np.int32)


def check(seed, lengths, T, S=6, r_max=64, pr=16, blocks=(1, 3, 16, 64), fixed_pages=False):
    """fixed_pages: as many pages whatever the drawn ranks (the pool's real case), so the ops
    compile once across drawn examples."""
    rng = np.random.default_rng(seed)
    x, a, b, ranks, scales = make_inputs(seed, T, 48, 40, S, r_max)
    used = int((-(-np.asarray(ranks) // pr)).sum())
    pa, pb, table = paginate(a, b, ranks, pr, seed,
                             spare_pages=S * (r_max // pr) + 3 - used if fixed_pages else 3)
    starts, lens, slots = step_segments(rng, lengths, S)
    want = loop_delta(x, a, b, seg_token_slots(starts, lens, slots, T), np.asarray(ranks),
                      np.asarray(scales))
    ref = sgmv_reference(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table)
    assert_close(ref, want)
    assert_close(sgmv_compact(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table), ref)
    for tb in blocks:
        got = sgmv_blocked(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table,
                           token_block=tb)
        assert_close(got, ref)
        (got,) = sgmv_prefill_group(x, (pa,), (pb,), starts, lens, slots, (ranks,), (scales,),
                                    page_table=table, token_block=tb)
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
    assert_close(sgmv_compact(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table), ref)
    assert_close(sgmv_blocked(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table,
                              token_block=4), ref)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=6), st.integers(0, 2**16))
def test_drawn_segment_lengths(lengths, seed):
    # T and the segment count fixed (empty segments after the drawn ones, as a step with fewer
    # sequences than the batch has), so the ops compile once; the rest of T is padding.
    T = 128
    check(seed, lengths + [0] * (6 - len(lengths)), T, blocks=(1, 16), fixed_pages=True)


def test_no_adapter_anywhere_is_exactly_zero():
    rng = np.random.default_rng(3)
    x, a, b, ranks, scales = make_inputs(3, 20, 16, 16, 4, 32)
    pa, pb, table = paginate(a, b, ranks, 16, 3)
    starts, lens, _ = step_segments(rng, [5, 5, 5], 4)
    none = np.full(3, -1, np.int32)
    for y in (sgmv_compact(x, pa, pb, starts, lens, none, ranks, scales, page_table=table),
              sgmv_blocked(x, pa, pb, starts, lens, none, ranks, scales, page_table=table)):
        assert not np.any(np.asarray(y))


@pytest.mark.parametrize("tb", [1, 8])
def test_blocked_handles_more_segments_than_tokens_per_block(tb):
    check(4, [2] * 10, T=24, S=5, blocks=(tb,))


def test_compact_form_ignores_stale_rows_of_slots_no_segment_uses():
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
    stale[3, 0] = table[2, 0]  # slot 3 (the last: where a wrapped -1 would land) at slot 2's page
    slots_none = np.array([0, -1, 2], np.int32)  # and a sequence without an adapter
    starts3, lens3 = np.array([0, 5, 9], np.int32), np.array([5, 4, 3], np.int32)
    ref3 = sgmv_reference(x, pa, pb, starts3, lens3, slots_none, ranks, scales, page_table=table)
    for st_, ln, sl, want in ((starts, lens, slots, ref), (starts3, lens3, slots_none, ref3)):
        assert_close(sgmv_compact(x, pa, pb, st_, ln, sl, ranks, scales, page_table=stale), want)
    assert np.any(np.asarray(ref))


@pytest.mark.parametrize("seed", [6, 7])
def test_projections_sharing_x_in_one_group_equal_each_alone(seed):
    """q/k/v (or gate/up) as one `sgmv_compact_group`: the same pages (one table), their own
    ranks (rank 0 for some slots: no delta), scales and output widths (GQA's k/v are narrower
    than q), each equal to the reference of that projection alone."""
    rng = np.random.default_rng(seed)
    T, S, r_max, pr, d_in = 16, 6, 64, 16, 40
    x, a, b, ranks, scales = make_inputs(seed, T, d_in, 48, S, r_max)
    pa, pb, table = paginate(a, b, ranks, pr, seed)  # the slot's pages, shared by the group
    owned = [(s, k, table[s, k]) for s in range(S) for k in range(-(-int(ranks[s]) // pr))]
    starts, lens, slots = step_segments(rng, [1] * 10, S)
    pages_a, pages_b, mod_ranks, mod_scales, refs = [pa], [pb], [ranks], [scales], []
    for d_out, cut in ((16, 2), (16, 3)):  # two narrower projections, ranks below the slot's
        _, a2, b2, _, sc2 = make_inputs(seed + d_out + cut, T, d_in, d_out, S, r_max)
        r2 = np.asarray(ranks) // cut  # some slots 0: no delta from this projection
        pa2 = rng.standard_normal(pa.shape).astype(np.float32) * 100  # garbage where unowned
        pb2 = rng.standard_normal((pb.shape[0], d_out, pr)).astype(np.float32) * 100
        for s, k, page in owned:
            rows = slice(k * pr, (k + 1) * pr)
            pa2[page], pb2[page] = np.asarray(a2)[s, rows], np.asarray(b2)[s, :, rows]
        pages_a.append(pa2), pages_b.append(pb2), mod_ranks.append(r2), mod_scales.append(sc2)
    for pa_m, pb_m, r_m, sc_m in zip(pages_a, pages_b, mod_ranks, mod_scales):
        refs.append(sgmv_reference(x, pa_m, pb_m, starts, lens, slots, r_m, sc_m,
                                   page_table=table))
    got = sgmv_compact_group(x, tuple(pages_a), tuple(pages_b), starts, lens, slots,
                             tuple(map(np.asarray, mod_ranks)), tuple(mod_scales),
                             page_table=table)
    assert [y.shape for y in got] == [(T, 48), (T, 16), (T, 16)]
    for y, ref in zip(got, refs):
        assert_close(y, ref)
        assert np.any(np.asarray(ref))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decodes_beside_prefill_chunks_split_off_equal_the_reference(seed):
    """A step with prefill chunks and decodes (`sgmv_prefill_group`): the decodes gathered and
    run apart, the chunks in their own form, for q/k/v-like projections of their own ranks (some
    0) and widths: each equals `sgmv_reference` of the whole step, in every row."""
    rng = np.random.default_rng(seed)
    T, S, r_max, pr, d_in = 160, 8, 64, 16, 40
    lengths = [1, 1, 37, 1, 70, 1, 1, 2]  # decodes, chunks and a 2-token chunk, in any order
    x, a, b, ranks, scales = make_inputs(seed, T, d_in, 48, S, r_max)
    pa, pb, table = paginate(a, b, ranks, pr, seed)
    owned = [(s, k, table[s, k]) for s in range(S) for k in range(-(-int(ranks[s]) // pr))]
    starts, lens, slots = step_segments(rng, lengths, S)
    slots[:2] = [0, 3]  # at least one decode and one chunk with an adapter
    slots[4] = 5
    pages_a, pages_b, mod_ranks, mod_scales = [pa], [pb], [np.asarray(ranks)], [scales]
    for d_out, cut in ((16, 2), (24, 3)):
        _, a2, b2, _, sc2 = make_inputs(seed + d_out, T, d_in, d_out, S, r_max)
        pa2 = rng.standard_normal(pa.shape).astype(np.float32) * 100  # garbage where unowned
        pb2 = rng.standard_normal((pb.shape[0], d_out, pr)).astype(np.float32) * 100
        for s, k, page in owned:
            rows = slice(k * pr, (k + 1) * pr)
            pa2[page], pb2[page] = np.asarray(a2)[s, rows], np.asarray(b2)[s, :, rows]
        pages_a.append(pa2), pages_b.append(pb2), mod_scales.append(sc2)
        mod_ranks.append(np.asarray(ranks) // cut)
    got = sgmv_prefill_group(x, tuple(pages_a), tuple(pages_b), starts, lens, slots,
                             tuple(mod_ranks), tuple(mod_scales), page_table=table, token_block=16)
    for y, pa_m, pb_m, r_m, sc_m in zip(got, pages_a, pages_b, mod_ranks, mod_scales):
        ref = sgmv_reference(x, pa_m, pb_m, starts, lens, slots, r_m, sc_m, page_table=table)
        assert np.any(np.asarray(ref)[starts[np.asarray(lens) == 1]])  # the decodes get deltas
        assert_close(y, ref)


def test_the_chunks_form_is_chosen_by_the_chunks_adapters_alone():
    """15 decodes on 15 adapters beside one 497-token chunk on a rank-64 adapter: together they
    need 64 pages (blocked wins); split, the chunk's 4 pages make the compact form the cheaper,
    and the decodes' 28 pages go to their own 16-row batch."""
    S, pr, r_max, T, G = 16, 16, 64, 512, 16
    ranks = np.array([8, 16, 32, 64] * 4, np.int32)
    lens = np.array([1] * 15 + [497], np.int32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    slots = np.arange(G, dtype=np.int32)
    table = np.arange(S * r_max // pr, dtype=np.int32).reshape(S, r_max // pr)
    plan = prefill_plan(starts, lens, slots, ranks, table, pr, T)
    assert (int(plan.prompt.count), int(plan.decode.count)) == (4, 28)
    assert np.asarray(plan.rows).tolist() == list(range(15)) + [T]
    assert bool(prefill_uses_compact(plan.prompt, lens, plan.prompt_slots, ranks, table, pr, 64))
    whole = compact_plan(starts, lens, slots, ranks, table, pr, T)
    assert not bool(prefill_uses_compact(whole, lens, slots, ranks, table, pr, 64))


def test_the_hook_picks_compact_for_decodes_and_blocks_for_prefill_chunks():
    from carajax.lora.hook import jnp_form
    assert jnp_form(8, 8) == "compact"  # 8 decodes
    assert jnp_form(16, 16) == "compact"
    assert jnp_form(64, 16) == "compact"  # 4 tokens a sequence
    assert jnp_form(512, 16) == "blocked"  # prefill chunks
    assert jnp_form(128, 16) == "blocked"


@pytest.mark.parametrize("lens, seg_ranks, want", [
    # 8 prompts of 64 on ranks 8-64: compact gathers 16 pages for 512 tokens (8,192 units),
    # blocked 24 blocks x 64 rows x 4 pages (6,144 units at 2.6x the cost each): compact.
    ([64] * 8, [8, 16, 32, 64] * 2, True),
    ([512], [16], True),  # one small adapter: one page against 24 mostly empty blocks
    ([64] * 8, [16] * 8, False),  # 8 distinct rank-16 adapters: 16 pages x 512 tokens
    ([1] * 15 + [497], [8, 16, 32, 64] * 4, False),  # 16 adapters, 64 pages
])
def test_prefill_steps_take_the_form_with_less_work(lens, seg_ranks, want):
    """Which form a step with prefill chunks runs is decided per step, from its real adapters
    (16 slots of up to rank 64, page_rank 16, 16 segments, blocks of 64, T = 512); both give
    the reference's result."""
    S, pr, r_max, T, G = 16, 16, 64, 512, 16
    ranks = np.zeros(S, np.int32)
    ranks[:len(seg_ranks)] = seg_ranks
    lens = np.array(lens + [0] * (G - len(lens)), np.int32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    slots = np.where(lens > 0, np.arange(G), -1).astype(np.int32)
    table = np.arange(S * r_max // pr, dtype=np.int32).reshape(S, r_max // pr)
    plan = compact_plan(starts, lens, slots, ranks, table, pr, T)
    assert bool(prefill_uses_compact(plan, lens, slots, ranks, table, pr, 64)) is want


@pytest.mark.parametrize("ranks_used, want_pages", [([8] * 8, 16), ([64] * 8, 32),
                                                    ([8, 16, 32, 64] * 2, 16), ([64], 4),
                                                    ([16], 1)])
def test_compact_work_follows_the_distinct_adapters_ranks(ranks_used, want_pages):
    """The compact form gathers the step's distinct adapters' own pages (page_rank 16), each
    adapter once, rounded up to a power of 4 (at most the table's 32 pages): never G x r_max.
    16 decode tokens, two per adapter: 8 rank-8 adapters need 8 pages (read 16), 8 rank-64
    ones 32, ranks 8/16/32/64 x 2 need 16; one rank-16 adapter 1."""
    S, pr, r_max, T = 8, 16, 64, 16
    all_ranks = np.array(ranks_used + [64] * (S - len(ranks_used)), np.int32)  # unused: rank 64
    x, a, b, ranks, scales = make_inputs(7, T, 24, 20, S, r_max, ranks=all_ranks)
    pa, pb, table = paginate(a, b, ranks, pr, 7)
    starts, lens = np.arange(T, dtype=np.int32), np.ones(T, np.int32)
    slots = (np.arange(T) % len(ranks_used)).astype(np.int32)
    pages, owner, _, count = compact_pages(slots, ranks, table, pr)
    assert int(count) == sum(-(-r // pr) for r in ranks_used)
    want = [int(table[s, j]) for s in sorted(set(slots.tolist())) for j in range(-(-int(ranks[s]) // pr))]
    assert np.asarray(pages)[:int(count)].tolist() == want
    assert (np.asarray(owner)[int(count):] == -1).all()
    assert min(k for k in page_sizes(min(S, T) * (r_max // pr)) if k >= int(count)) == want_pages
    ref = sgmv_reference(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table)
    assert_close(sgmv_compact(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table), ref)


def test_page_sizes_are_powers_of_two_up_to_the_tables_pages():
    assert page_sizes(1) == (1,)
    assert page_sizes(64) == (1, 4, 16, 64)
    assert page_sizes(32) == (1, 4, 16, 32)
    assert page_sizes(4, base=2) == (1, 2, 4)
    assert page_sizes(3, base=2) == (1, 2, 3)
