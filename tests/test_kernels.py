"""LoRA ops: references against hand-worked cases, a per-adapter loop and `ragged_dot`; the Pallas
kernels against the references on drawn inputs, in interpret mode here and compiled on a GPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carajax.lora.kernels import bgmv, bgmv_reference, gather_pages, sgmv, sgmv_reference
from tests.conftest import TOLERANCE, rel_error

# ---------------------------------------------------------------------------------------------
# References: hand-worked cases
# ---------------------------------------------------------------------------------------------
# Two slots, r_max 2, d_in 2, d_out 2.
#   slot 0: rank 1, A = [[1, 2], [9, 9]] (row 1 is padding), B = [[1, 9], [3, 9]] (column 1 is
#           padding), scale 2.
#   slot 1: rank 2, A = I, B = [[1, 2], [3, 4]], scale 0.5.
A = np.array([[[1, 2], [9, 9]], [[1, 0], [0, 1]]], np.float32)
B = np.array([[[1, 9], [3, 9]], [[1, 2], [3, 4]]], np.float32)
RANKS = np.array([1, 2], np.int32)
SCALES = np.array([2.0, 0.5], np.float32)
X = np.array([[1, 1], [2, 0], [0, 1]], np.float32)


def test_bgmv_reference_by_hand():
    # token 0 -> slot 0: x A0[:1]^T = [1*1 + 1*2] = [3]; times B0[:, :1]^T = [3*1, 3*3] = [3, 9];
    #                    times scale 2 -> [6, 18]. The 9s in the padding never count.
    # token 1 -> slot 1: x A1^T = [2, 0]; times B1^T = [2*1 + 0*2, 2*3 + 0*4] = [2, 6]; * 0.5 = [1, 3]
    # token 2 -> -1:     [0, 0]
    y = bgmv_reference(X, A, B, np.array([0, 1, -1], np.int32), RANKS, SCALES)
    np.testing.assert_array_equal(np.asarray(y), [[6, 18], [1, 3], [0, 0]])


def test_sgmv_reference_by_hand():
    # Segment 0 = tokens [0, 2) with slot 1; segment 1 is empty; token 2 is in no segment.
    # token 0: x A1^T = [1, 1]; B1 [1, 1] = [1 + 2, 3 + 4] = [3, 7]; * 0.5 = [1.5, 3.5]
    # token 1: as in the bgmv case = [1, 3]
    y = sgmv_reference(X, A, B, np.array([0, 2], np.int32), np.array([2, 0], np.int32),
                       np.array([1, 0], np.int32), RANKS, SCALES)
    np.testing.assert_array_equal(np.asarray(y), [[1.5, 3.5], [1, 3], [0, 0]])


def test_paged_references_by_hand():
    # The same two slots in pages of one rank row (page_rank 1), scattered over 5 pages:
    #   slot 0 (rank 1): row 0 in page 3; its table entry for row 1 is garbage (-7, never used).
    #   slot 1 (rank 2): row 0 in page 4, row 1 in page 0.
    # Pages 1 and 2 belong to nobody and hold 100s that must never leak.
    pa = np.full((5, 1, 2), 100, np.float32)
    pb = np.full((5, 2, 1), 100, np.float32)
    pa[3, 0], pb[3, :, 0] = A[0, 0], B[0, :, 0]
    pa[4, 0], pb[4, :, 0] = A[1, 0], B[1, :, 0]
    pa[0, 0], pb[0, :, 0] = A[1, 1], B[1, :, 1]
    table = np.array([[3, -7], [4, 0]], np.int32)
    y = bgmv_reference(X, pa, pb, np.array([0, 1, -1], np.int32), RANKS, SCALES, page_table=table)
    np.testing.assert_array_equal(np.asarray(y), [[6, 18], [1, 3], [0, 0]])  # as by hand above
    y = sgmv_reference(X, pa, pb, np.array([0, 2], np.int32), np.array([2, 0], np.int32),
                       np.array([1, 0], np.int32), RANKS, SCALES, page_table=table)
    np.testing.assert_array_equal(np.asarray(y), [[1.5, 3.5], [1, 3], [0, 0]])


# ---------------------------------------------------------------------------------------------
# Random inputs (never zeros; the padding beyond each rank holds garbage the ops must ignore)
# ---------------------------------------------------------------------------------------------
def make_inputs(seed, T, d_in, d_out, S, r_max, dtype=np.float32, ranks=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d_in)).astype(np.float32)
    a = (rng.standard_normal((S, r_max, d_in)) * 0.1).astype(np.float32)
    b = (rng.standard_normal((S, d_out, r_max)) * 0.1).astype(np.float32)
    ranks = np.asarray(ranks if ranks is not None else rng.integers(1, r_max + 1, S), np.int32)
    scales = rng.uniform(0.25, 2.0, S).astype(np.float32)
    cast = functools.partial(jnp.asarray, dtype=dtype)
    return cast(x), cast(a), cast(b), jnp.asarray(ranks), jnp.asarray(scales)


def loop_delta(x, a, b, token_slots, ranks, scales):
    """The naive loop of the docstrings, in float64 numpy: an independent oracle."""
    x, a, b = (np.asarray(v, np.float64) for v in (x, a, b))
    y = np.zeros((x.shape[0], b.shape[1]))
    for t, s in enumerate(np.asarray(token_slots)):
        if s >= 0:
            r = ranks[s]
            y[t] = scales[s] * (x[t] @ a[s, :r].T) @ b[s, :, :r].T
    return y


def random_segments(rng, T, S, G):
    """G disjoint segments in random order (some empty, some slot -1), gaps between them."""
    cuts = np.sort(rng.choice(np.arange(T + 1), size=2 * G, replace=True))
    starts, ends = cuts[0::2], cuts[1::2]
    slots = rng.integers(-1, S, G)
    order = rng.permutation(G)
    return (starts[order].astype(np.int32), (ends - starts)[order].astype(np.int32),
            slots[order].astype(np.int32))


def seg_token_slots(starts, lens, slots, T):
    out = np.full(T, -1, np.int32)
    for s0, n, sl in zip(starts, lens, slots):
        out[s0:s0 + n] = sl
    return out


def paginate(a, b, ranks, page_rank: int, seed: int, spare_pages: int = 3):
    """The slot layout (a [S, r_max, d_in], b [S, d_out, r_max]) as pages: each slot's
    ceil(rank / page_rank) pages are drawn at random from the page array, so one slot's pages are
    neither contiguous nor in order. Pages nobody owns hold large garbage, and so do the
    page-table entries past each slot's rank (out-of-range page numbers included).

    Returns pages a [P, page_rank, d_in], b [P, d_out, page_rank] (a's dtype) and the table
    int32 [S, r_max // page_rank]."""
    rng = np.random.default_rng(seed)
    a, b, ranks = np.asarray(a, np.float32), np.asarray(b, np.float32), np.asarray(ranks)
    S, r_max, d_in = a.shape
    needed = -(-ranks // page_rank)  # pages per slot
    P = int(needed.sum()) + spare_pages
    pa = rng.standard_normal((P, page_rank, d_in)).astype(np.float32) * 100
    pb = rng.standard_normal((P, b.shape[1], page_rank)).astype(np.float32) * 100
    table = rng.integers(-3, P + 3, (S, r_max // page_rank)).astype(np.int32)
    free = iter(rng.permutation(P))
    for s in range(S):
        for k in range(needed[s]):
            page = next(free)
            table[s, k] = page
            rows = slice(k * page_rank, (k + 1) * page_rank)
            pa[page], pb[page] = a[s, rows], b[s, :, rows]
    cast = functools.partial(jnp.asarray, dtype=jnp.asarray(a).dtype)
    return cast(pa), cast(pb), table


def is_scattered(table, ranks, page_rank) -> bool:
    """Some slot's pages are not consecutive ascending page numbers."""
    return any(np.any(np.diff(table[s, :-(-r // page_rank)]) != 1) for s, r in enumerate(ranks))


@pytest.mark.parametrize("seed", range(3))
def test_paged_references_equal_slot_layout(seed):
    rng = np.random.default_rng(seed)
    T, S, r_max, pr = 37, 5, 64, 16
    x, a, b, ranks, scales = make_inputs(seed, T, 24, 40, S, r_max)
    pa, pb, table = paginate(a, b, ranks, pr, seed)
    assert is_scattered(table, np.asarray(ranks), pr)
    token_slots = rng.integers(-1, S, T).astype(np.int32)
    np.testing.assert_array_equal(
        bgmv_reference(x, pa, pb, token_slots, ranks, scales, page_table=table),
        bgmv_reference(x, a, b, token_slots, ranks, scales))
    starts, lens, slots = random_segments(rng, T, S, G=4)
    np.testing.assert_array_equal(
        sgmv_reference(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table),
        sgmv_reference(x, a, b, starts, lens, slots, ranks, scales))
    # The gather itself: every slot's rows below its rank come back where the slot layout has them.
    ga, gb = gather_pages(pa, pb, table)
    for s, r in enumerate(np.asarray(ranks)):
        np.testing.assert_array_equal(ga[s, :r], a[s, :r])
        np.testing.assert_array_equal(gb[s, :, :r], b[s, :, :r])


def test_paged_kernels_need_block_r_equal_page_rank():
    x, a, b, ranks, scales = make_inputs(0, 4, 16, 16, 2, 32)
    pa, pb, table = paginate(a, b, ranks, 16, 0)
    with pytest.raises(ValueError, match="block_r == page_rank"):
        bgmv(x, pa, pb, np.zeros(4, np.int32), ranks, scales, page_table=table, interpret=True,
             block_r=32)
    with pytest.raises(ValueError, match="block_r == page_rank"):
        sgmv(x, pa, pb, np.zeros(1, np.int32), np.ones(1, np.int32), np.zeros(1, np.int32), ranks,
             scales, page_table=table, interpret=True, block_r=8)


@pytest.mark.parametrize("seed", range(3))
def test_references_equal_a_per_adapter_loop(seed):
    rng = np.random.default_rng(seed)
    T, S = 37, 5
    x, a, b, ranks, scales = make_inputs(seed, T, 24, 40, S, 16)
    token_slots = rng.integers(-1, S, T).astype(np.int32)
    want = loop_delta(x, a, b, token_slots, np.asarray(ranks), np.asarray(scales))
    assert rel_error(bgmv_reference(x, a, b, token_slots, ranks, scales), want) < 1e-5
    starts, lens, slots = random_segments(rng, T, S, G=4)
    want = loop_delta(x, a, b, seg_token_slots(starts, lens, slots, T), np.asarray(ranks),
                      np.asarray(scales))
    got = sgmv_reference(x, a, b, starts, lens, slots, ranks, scales)
    assert rel_error(got, want) < 1e-5


def test_sgmv_reference_equals_ragged_dot():
    """Segments covering [0, T) in order, all ranks = r_max: two `ragged_dot`s give the answer."""
    T, S, r = 50, 4, 8
    x, a, b, ranks, scales = make_inputs(0, T, 32, 24, S, r, ranks=[r] * S)
    lens = np.array([10, 0, 25, 15], np.int32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    slots = np.array([2, 0, 3, 1], np.int32)
    hi = jax.lax.Precision.HIGHEST  # GPUs default float32 matmuls to TF32
    xa = jax.lax.ragged_dot(x, jnp.transpose(a[slots], (0, 2, 1)), lens, precision=hi)  # [T, r]
    y = jax.lax.ragged_dot(xa, jnp.transpose(b[slots], (0, 2, 1)), lens, precision=hi)  # [T, d_out]
    y = y * jnp.repeat(scales[slots], lens, total_repeat_length=T)[:, None]
    got = sgmv_reference(x, a, b, starts, lens, slots, ranks, scales)
    assert rel_error(got, y) < 1e-5


# ---------------------------------------------------------------------------------------------
# Kernels against references: one suite, compiled on GPU, interpreted everywhere
# ---------------------------------------------------------------------------------------------
SHAPES = [  # (T, d_in, d_out, S, r_max): T and d not multiples of any block size included
    (1, 64, 64, 2, 16),
    (45, 70, 90, 5, 32),
    (130, 300, 260, 8, 64),
]


class KernelSuite:
    INTERPRET = False
    BLOCKS: dict = {}

    def check(self, got, want, dtype):
        err = rel_error(np.asarray(got, np.float32), np.asarray(want, np.float32))
        assert err <= TOLERANCE[np.dtype(dtype).name], err

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
    @pytest.mark.parametrize("pad", [False, True])
    def test_bgmv(self, shape, dtype, pad):
        T, d_in, d_out, S, r_max = shape
        x, a, b, ranks, scales = make_inputs(T + S, T, d_in, d_out, S, r_max, dtype)
        # Every rank from 1 to r_max over the slots, and -1 tokens.
        ranks = jnp.asarray(np.linspace(1, r_max, S).astype(np.int32))
        slots = np.random.default_rng(1).integers(-1, S, T).astype(np.int32)
        got = bgmv(x, a, b, slots, ranks, scales, interpret=self.INTERPRET, pad_to_max_rank=pad,
                   **self.BLOCKS)
        assert got.dtype == x.dtype
        self.check(got, bgmv_reference(x, a, b, slots, ranks, scales), dtype)
        assert np.all(np.asarray(got)[slots < 0] == 0)  # exactly zero, not merely small

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
    @pytest.mark.parametrize("pad", [False, True])
    def test_sgmv(self, shape, dtype, pad):
        T, d_in, d_out, S, r_max = shape
        x, a, b, ranks, scales = make_inputs(T * 3, T, d_in, d_out, S, r_max, dtype)
        starts, lens, slots = random_segments(np.random.default_rng(T), T, S, G=min(6, T + 1))
        got = sgmv(x, a, b, starts, lens, slots, ranks, scales, interpret=self.INTERPRET,
                   pad_to_max_rank=pad, **self.BLOCKS)
        self.check(got, sgmv_reference(x, a, b, starts, lens, slots, ranks, scales), dtype)
        uncovered = seg_token_slots(starts, lens, slots, T) < 0
        assert np.all(np.asarray(got)[uncovered] == 0)

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("pad", [False, True])
    def test_paged_equals_slot_layout(self, shape, pad):
        """Shuffled pages, mixed ranks (one is r_max), slot -1 tokens/segments: the paged kernels
        give bit-for-bit the slot layout's result (same blocks, same order of operations)."""
        T, d_in, d_out, S, r_max = shape
        pr = 16
        ranks = np.random.default_rng(S).integers(1, r_max + 1, S).astype(np.int32)
        ranks[-1] = r_max
        x, a, b, ranks, scales = make_inputs(T + 1, T, d_in, d_out, S, r_max, ranks=ranks)
        pa, pb, table = paginate(a, b, ranks, pr, seed=T)
        blocks = {**self.BLOCKS, "block_r": pr}
        rng = np.random.default_rng(T + 2)
        tok = rng.integers(-1, S, T).astype(np.int32)
        got = bgmv(x, pa, pb, tok, ranks, scales, page_table=table, interpret=self.INTERPRET,
                   pad_to_max_rank=pad, **blocks)
        np.testing.assert_array_equal(got, bgmv(x, a, b, tok, ranks, scales,
                                                interpret=self.INTERPRET, pad_to_max_rank=pad,
                                                **blocks))
        self.check(got, bgmv_reference(x, a, b, tok, ranks, scales), np.float32)
        seg = random_segments(rng, T, S, G=min(6, T + 1))
        got = sgmv(x, pa, pb, *seg, ranks, scales, page_table=table, interpret=self.INTERPRET,
                   pad_to_max_rank=pad, **blocks)
        np.testing.assert_array_equal(got, sgmv(x, a, b, *seg, ranks, scales,
                                                interpret=self.INTERPRET, pad_to_max_rank=pad,
                                                **blocks))
        self.check(got, sgmv_reference(x, a, b, *seg, ranks, scales), np.float32)

    # differing_executors: the GPU suite and its interpret subclass share this method; each draws
    # its own examples, so replaying one under the other is harmless.
    @settings(max_examples=15, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
    @given(data=st.data())
    def test_sgmv_drawn_segments(self, data):
        """Drawn segment layouts at a fixed shape: empty segments, slot -1, adjacent segments,
        a tile holding several segments, every rank from 1 to r_max."""
        T, S, r_max = 40, 6, 32
        lens = data.draw(st.lists(st.integers(0, 12), min_size=1, max_size=6))
        lens = np.array(lens[:], np.int32)
        lens = np.minimum(lens, np.maximum(T - np.concatenate([[0], np.cumsum(lens)[:-1]]), 0))
        gaps = data.draw(st.lists(st.integers(0, 3), min_size=len(lens), max_size=len(lens)))
        starts = np.minimum(np.cumsum(np.array(gaps) + np.concatenate([[0], lens[:-1]])), T)
        lens = np.minimum(lens, T - starts).astype(np.int32)
        slots = np.array(data.draw(st.lists(st.integers(-1, S - 1), min_size=len(lens),
                                            max_size=len(lens))), np.int32)
        ranks = data.draw(st.lists(st.integers(1, r_max), min_size=S, max_size=S))
        pad = data.draw(st.booleans())
        x, a, b, ranks, scales = make_inputs(7, T, 48, 40, S, r_max, ranks=ranks)
        got = sgmv(x, a, b, starts.astype(np.int32), lens, slots, ranks, scales,
                   interpret=self.INTERPRET, pad_to_max_rank=pad, **self.BLOCKS)
        want = loop_delta(x, a, b, seg_token_slots(starts, lens, slots, T), np.asarray(ranks),
                          np.asarray(scales))
        assert rel_error(got, want) <= TOLERANCE["float32"]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled Pallas)")
class TestKernelsGPU(KernelSuite):
    INTERPRET = False


class TestKernelsInterpret(KernelSuite):
    INTERPRET = True
    BLOCKS = dict(block_r=16, block_d=64, block_o=64)  # small blocks: several per dimension


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_triton_for_nvidia(dtype):
    """Without a GPU, lowering for CUDA still runs Pallas' Triton lowering and its checks (block
    shapes, supported ops) on Llama-2-7B q_proj shapes, in the slot layout and the paged one
    (40 pages of rank 16)."""
    T, d, S, r_max, P, pr = 64, 4096, 8, 64, 40, 16
    sds = jax.ShapeDtypeStruct
    i32 = lambda *n: sds(n, jnp.int32)  # noqa: E731
    x = sds((T, d), dtype)
    layouts = {"slot": (sds((S, r_max, d), dtype), sds((S, d, r_max), dtype), {}),
               "paged": (sds((P, pr, d), dtype), sds((P, d, pr), dtype),
                         {"page_table": i32(S, r_max // pr)})}
    for a, b, table in layouts.values():
        for pad in (False, True):
            for fn, args in ((functools.partial(sgmv, pad_to_max_rank=pad),
                              (x, a, b, i32(4), i32(4), i32(4), i32(S), sds((S,), jnp.float32))),
                             (functools.partial(bgmv, pad_to_max_rank=pad),
                              (x, a, b, i32(T), i32(S), sds((S,), jnp.float32)))):
                traced = jax.jit(fn).trace(*args, **table)
                text = traced.lower(lowering_platforms=("cuda",)).as_text()
                assert "triton" in text.lower()
