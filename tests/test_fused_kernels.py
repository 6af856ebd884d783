"""The fused SGMV kernel (shrink + expand in one pallas_call) against `sgmv_reference` on fresh
random inputs: compiled on a GPU, interpreted everywhere (one suite, two modes)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carajax.lora.fused_kernels import sgmv_fused
from carajax.lora.kernels import sgmv_reference
from tests.conftest import TOLERANCE, rel_error
from tests.test_kernels import make_inputs, paginate, random_segments, seg_token_slots

SHAPES = [  # (T, d_in, d_out, S, r_max): T and d not multiples of any block size included
    (1, 64, 64, 2, 16),
    (45, 70, 90, 5, 32),
    (130, 300, 260, 8, 64),
]


def mixed_batch(rng, S, decode: int, prefill_lens, gap: int = 2):
    """A step as the engine flattens it: `decode` segments of 1 token, then prefill chunks of
    `prefill_lens` tokens, `gap` uncovered tokens between groups; every third segment has no
    LoRA (slot -1), the order is shuffled. Returns (T, starts, lens, slots)."""
    lens = [1] * decode + list(prefill_lens)
    starts, t = [], 0
    for n in lens:
        starts.append(t)
        t += n + (gap if n > 1 else 0)
    slots = rng.integers(0, S, len(lens))
    slots[::3] = -1
    order = rng.permutation(len(lens))
    as_i32 = functools.partial(np.asarray, dtype=np.int32)
    return t + gap, as_i32(starts)[order], as_i32(lens)[order], as_i32(slots)[order]


class FusedSuite:
    INTERPRET = False
    BLOCKS: dict = {}

    def check(self, got, want, dtype):
        err = rel_error(np.asarray(got, np.float32), np.asarray(want, np.float32))
        assert err <= TOLERANCE[np.dtype(dtype).name], err

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
    @pytest.mark.parametrize("pad", [False, True])
    def test_sgmv_fused(self, shape, dtype, pad):
        """Slot layout, random segments (empty ones, slot -1, gaps), ranks drawn in 1..r_max."""
        T, d_in, d_out, S, r_max = shape
        x, a, b, ranks, scales = make_inputs(T * 5 + S, T, d_in, d_out, S, r_max, dtype)
        starts, lens, slots = random_segments(np.random.default_rng(T + 1), T, S, G=min(6, T + 1))
        got = sgmv_fused(x, a, b, starts, lens, slots, ranks, scales, interpret=self.INTERPRET,
                         pad_to_max_rank=pad, **self.BLOCKS)
        assert got.dtype == x.dtype
        self.check(got, sgmv_reference(x, a, b, starts, lens, slots, ranks, scales), dtype)
        uncovered = seg_token_slots(starts, lens, slots, T) < 0
        assert np.all(np.asarray(got)[uncovered] == 0)  # exactly zero, not merely small

    @pytest.mark.parametrize("pad", [False, True])
    def test_paged_mixed_step(self, pad):
        """Paged weights in shuffled pages of 16 rank rows, ranks 1 to 64 in one batch (odd page
        fills: 1, 10, 19, ... rows of the last page used), decode segments of one token beside
        prefill chunks longer than a token tile, slot -1 segments and uncovered tokens."""
        rng = np.random.default_rng(17 + pad)
        S, r_max, pr, d_in, d_out = 8, 64, 16, 96, 80
        T, starts, lens, slots = mixed_batch(rng, S, decode=7, prefill_lens=(40, 5, 70))
        ranks = np.linspace(1, r_max, S).astype(np.int32)  # 1, 10, 19, ..., 64
        x, a, b, ranks, scales = make_inputs(int(rng.integers(1 << 30)), T, d_in, d_out, S, r_max,
                                             ranks=ranks)
        pa, pb, table = paginate(a, b, ranks, pr, seed=T)
        blocks = {**self.BLOCKS, "block_r": pr}
        got = sgmv_fused(x, pa, pb, starts, lens, slots, ranks, scales, page_table=table,
                         interpret=self.INTERPRET, pad_to_max_rank=pad, **blocks)
        self.check(got, sgmv_reference(x, pa, pb, starts, lens, slots, ranks, scales,
                                       page_table=table), np.float32)
        # Same blocks, same order of operations: the slot layout gives bit-for-bit the same.
        np.testing.assert_array_equal(got, sgmv_fused(
            x, a, b, starts, lens, slots, ranks, scales, interpret=self.INTERPRET,
            pad_to_max_rank=pad, **blocks))
        uncovered = seg_token_slots(starts, lens, slots, T) < 0
        assert uncovered.sum() > 0 and np.all(np.asarray(got)[uncovered] == 0)

    def test_decode_only(self):
        """A pure decode step: every token its own segment (the engine's shape), no gaps."""
        rng = np.random.default_rng(3)
        T, S, r_max = 24, 6, 64
        x, a, b, ranks, scales = make_inputs(5, T, 64, 48, S, r_max,
                                             ranks=[1, 8, 16, 33, 64, 2])
        starts, lens = np.arange(T, dtype=np.int32), np.ones(T, np.int32)
        slots = rng.integers(-1, S, T).astype(np.int32)
        got = sgmv_fused(x, a, b, starts, lens, slots, ranks, scales, interpret=self.INTERPRET,
                         **self.BLOCKS)
        self.check(got, sgmv_reference(x, a, b, starts, lens, slots, ranks, scales), np.float32)
        assert np.all(np.asarray(got)[slots < 0] == 0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled Pallas)")
class TestFusedGPU(FusedSuite):
    INTERPRET = False


class TestFusedInterpret(FusedSuite):
    INTERPRET = True
    BLOCKS = dict(block_t=16, block_r=16, block_d=64, block_o=64)  # several blocks per dimension


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_lowers_to_triton_for_nvidia(dtype):
    """Without a GPU, lowering for CUDA still runs Pallas' Triton lowering and its checks on
    Llama-2-7B q_proj shapes, slot and paged layouts, unpadded and padded."""
    T, d, S, r_max, P, pr = 64, 4096, 8, 64, 40, 16
    sds = jax.ShapeDtypeStruct
    i32 = lambda *n: sds(n, jnp.int32)  # noqa: E731
    x = sds((T, d), dtype)
    layouts = {"slot": (sds((S, r_max, d), dtype), sds((S, d, r_max), dtype), {}),
               "paged": (sds((P, pr, d), dtype), sds((P, d, pr), dtype),
                         {"page_table": i32(S, r_max // pr)})}
    for a, b, table in layouts.values():
        for pad in (False, True):
            fn = functools.partial(sgmv_fused, pad_to_max_rank=pad)
            traced = jax.jit(fn).trace(x, a, b, i32(4), i32(4), i32(4), i32(S),
                                       sds((S,), jnp.float32), **table)
            assert "triton" in traced.lower(lowering_platforms=("cuda",)).as_text().lower()
