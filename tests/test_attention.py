"""Paged attention (carajax.models.attention) against a dense float64 loop written here, on mixed
ragged batches: prefill chunks and decode tokens together, shuffled pages, GQA, padding; then the
Pallas kernel (carajax.models.paged_attention_pallas) against both, interpreted here and compiled
on a GPU."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carajax.models.attention import (
    num_query_blocks,
    paged_attention,
    paged_attention_reference,
    plan_query_blocks,
    write_pages,
)
from carajax.models.paged_attention_pallas import kernel_query_block, paged_attention_pallas
from tests.conftest import rel_error

# One attention in float32 against float64: a few roundings per score and a sum over at most a
# few dozen keys, so ~1e-7 in practice; 1e-5 still catches any wrong key or position (O(1)).
F32_TOL = 1e-5
# bfloat16 (8-bit mantissa, 2^-9 ~ 2e-3 per rounding): the reference starts from the same
# bf16-rounded inputs, so what remains is the probabilities rounded to bf16 before the value
# product and the output rounded to bf16, ~4e-3 together at worst.
BF16_TOL = 1e-2

# Pool positions no sequence may read hold this large garbage, so any leak shows up as O(1).
GARBAGE = 50.0


class Case(NamedTuple):
    q: np.ndarray  # [T, heads, D]; rows past query_starts[S] are NaN
    k_pages: np.ndarray  # [N, kv_heads, page_size, D]
    v_pages: np.ndarray  # [N, kv_heads, page_size, D]
    block_tables: np.ndarray  # int32 [S, P]
    seq_lens: np.ndarray  # int32 [S]
    query_starts: np.ndarray  # int32 [S + 1]
    ctx_k: list[np.ndarray]  # per sequence [seq_len, kv_heads, D] float64: what the pool holds
    ctx_v: list[np.ndarray]

    def args(self):
        return (self.q, self.k_pages, self.v_pages, self.block_tables, self.seq_lens,
                self.query_starts)


def make_case(rng, specs, *, page_size, heads, kv_heads, head_dim=16, dtype=np.float32,
              num_tokens=None, num_cols=None, num_pages=None) -> Case:
    """specs: (seq_len, n_tokens) per sequence; the n_tokens queries are the last positions of
    the context. Pages are handed out in a shuffled order; unused block-table entries and pool
    positions hold garbage. num_tokens/num_cols/num_pages pad T, P and N (defaults: tight)."""
    seq_lens = np.array([s for s, _ in specs], np.int32)
    ns = np.array([n for _, n in specs], np.int32)
    assert (ns <= seq_lens).all()
    pages_of = [-(-s // page_size) for s in seq_lens]
    used_pages = sum(pages_of)
    N = num_pages or used_pages + 3
    P = num_cols or max(max(pages_of), 1)
    T = num_tokens or int(ns.sum()) + 2
    assert N >= used_pages and P >= max(pages_of) and T >= ns.sum()

    perm = rng.permutation(N)  # sequence pages neither contiguous nor in order
    block_tables = rng.integers(0, N, size=(len(specs), P)).astype(np.int32)  # garbage entries
    k_pages = np.full((N, kv_heads, page_size, head_dim), GARBAGE)
    v_pages = np.full((N, kv_heads, page_size, head_dim), -GARBAGE)
    ctx_k, ctx_v, next_page = [], [], 0
    for s, (seq_len, _) in enumerate(specs):
        block_tables[s, :pages_of[s]] = perm[next_page:next_page + pages_of[s]]
        next_page += pages_of[s]
        k = rng.standard_normal((seq_len, kv_heads, head_dim))
        v = rng.standard_normal((seq_len, kv_heads, head_dim))
        for p in range(seq_len):
            k_pages[block_tables[s, p // page_size], :, p % page_size] = k[p]
            v_pages[block_tables[s, p // page_size], :, p % page_size] = v[p]
        ctx_k.append(k)
        ctx_v.append(v)

    query_starts = np.concatenate([[0], np.cumsum(ns)]).astype(np.int32)
    q = rng.standard_normal((T, heads, head_dim))
    q[query_starts[-1]:] = np.nan  # padding rows: any value, even NaN
    # Round to the compute dtype; the reference reads the rounded values.
    cast = lambda x: x.astype(dtype)
    back = lambda x: x.astype(dtype).astype(np.float64)
    return Case(cast(q), cast(k_pages), cast(v_pages), block_tables, seq_lens, query_starts,
                [back(k) for k in ctx_k], [back(v) for v in ctx_v])


def naive_attention(case: Case) -> np.ndarray:
    """The definition, in float64: each query token of sequence s attends causally to s's context."""
    q = case.q.astype(np.float64)
    T, heads, D = q.shape
    group = heads // case.ctx_k[0].shape[1] if case.ctx_k else 1
    out = np.zeros((T, heads, D))
    for s, seq_len in enumerate(case.seq_lens):
        start, end = case.query_starts[s], case.query_starts[s + 1]
        n = end - start
        for i in range(n):
            pos = seq_len - n + i
            for h in range(heads):
                keys = case.ctx_k[s][:pos + 1, h // group]  # [pos + 1, D]
                values = case.ctx_v[s][:pos + 1, h // group]
                scores = keys @ q[start + i, h] / math.sqrt(D)
                p = np.exp(scores - scores.max())
                out[start + i, h] = (p / p.sum()) @ values
    return out


@functools.cache
def jitted(query_block=None, impl="auto"):
    """Jitted with the knobs static: one compile per shape, where eager mode compiles each op."""
    return jax.jit(functools.partial(paged_attention, query_block=query_block, impl=impl))


def run(case: Case, **knobs) -> np.ndarray:
    return np.asarray(jitted(**knobs)(*case.args()).astype(jnp.float32), np.float64)


# A step of a continuous-batching server, with page_size 8:
MIXED = [
    (37, 5),  # a prefill chunk resuming mid-context: positions 32..36, 5 pages, the last partial
    (0, 0),  # a padding sequence
    (16, 1),  # a decode token, context exactly 2 full pages
    (9, 9),  # a fresh prompt, whole (9 tokens: not a multiple of 4 or 16)
    (50, 1),  # a decode token over 7 pages
    (24, 0),  # a sequence with context but no token this step
    (0, 0),  # trailing padding sequence
]


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("query_block", [1, 4, 16, None])
def test_mixed_batch_matches_dense_loop(heads, kv_heads, query_block):
    case = make_case(np.random.default_rng(0), MIXED, page_size=8, heads=heads, kv_heads=kv_heads,
                     num_tokens=19, num_cols=8)
    out = run(case, query_block=query_block)
    n_valid = case.query_starts[-1]
    assert rel_error(out[:n_valid], naive_attention(case)[:n_valid]) <= F32_TOL
    # Padding rows (NaN queries) come out as exact zeros.
    np.testing.assert_array_equal(out[n_valid:], 0)


@pytest.mark.parametrize("form", ["diagonals", "rows"])
@pytest.mark.parametrize("chunk_block", [5, 8])
def test_prefill_blocks_of_the_flat_step_match_dense_loop(monkeypatch, chunk_block, form):
    """A step with prefill chunks attends its own keys in blocks of the flat step, across
    sequence boundaries, in either form (diagonals: query block i against key block i - d,
    diagonals no sequence spans skipped; rows: each query block against every key before it),
    and the earlier context through the pages; small blocks make every part run: several
    diagonals, skipped ones, a sequence spanning blocks, a padded last block (5)."""
    from carajax.models import attention_blocks

    monkeypatch.setattr(attention_blocks, "CHUNK_BLOCK", chunk_block)
    monkeypatch.setattr(attention_blocks, "ROW_BLOCK", 2 * chunk_block)
    # The choice forced through its cost: the rows form free, or never worth it.
    monkeypatch.setattr(attention_blocks, "ROWS_UNIT_COST", 0.0 if form == "rows" else 1e9)
    specs = MIXED + [(20, 20), (30, 11)]  # a long fresh prompt; a second chunk of a prompt
    case = make_case(np.random.default_rng(4), specs, page_size=8, heads=8, kv_heads=2,
                     num_tokens=48, num_cols=8, num_pages=64)
    fn = jax.jit(functools.partial(paged_attention, query_block=4, impl="reference"))
    out = np.asarray(fn(*case.args()), np.float64)
    n_valid = case.query_starts[-1]
    assert rel_error(out[:n_valid], naive_attention(case)[:n_valid]) <= F32_TOL
    np.testing.assert_array_equal(out[n_valid:], 0)


def test_own_keys_form_follows_the_block_pairs_each_would_compute():
    """The rows form (every key before each 128-row block: the causal triangle) where the
    diagonals form would compute more 64 x 64 block pairs than 0.4 x the triangle's: long
    prompts take rows, many short ones diagonals, steps over 512 tokens always diagonals."""
    from carajax.models.attention_blocks import chunk_uses_rows

    def takes_rows(prompts, T=None):
        seg = np.repeat(np.arange(len(prompts)), prompts).astype(np.int32)
        T = T or len(seg)
        seg = np.concatenate([seg, len(prompts) + np.arange(T - len(seg), dtype=np.int32)])
        return bool(chunk_uses_rows(jnp.asarray(seg), T))

    assert takes_rows([512])  # 36 pairs > 0.4 x 40 (4 row blocks: 10 x 4 units)
    assert takes_rows([256, 256])  # 8 + 7 + 6 + 5 = 26 pairs
    assert takes_rows([448, 64]) and takes_rows([384, 128])
    assert not takes_rows([128] * 4)  # 8 + 7 = 15 pairs <= 16
    assert not takes_rows([64] * 8) and not takes_rows([32] * 16)
    assert takes_rows([300], T=512)  # padding rows (their own sequences) count as short ones
    assert not takes_rows([1024]) and not takes_rows([512, 512])  # over ROWS_MAX_TOKENS


@pytest.mark.parametrize("query_block", [2, 8])
def test_prompts_continuing_from_earlier_steps_beside_decodes(query_block):
    """Prompts resuming mid-context walk their earlier context in query blocks, the step's
    decodes one query each, beside a fresh prompt."""
    specs = [(40, 7), (1, 1), (33, 9), (25, 6), (12, 1), (50, 5), (16, 16), (70, 1)]
    case = make_case(np.random.default_rng(5), specs, page_size=8, heads=8, kv_heads=2,
                     num_tokens=64, num_cols=10, num_pages=64)
    out = run(case, query_block=query_block, impl="reference")
    n_valid = case.query_starts[-1]
    assert rel_error(out[:n_valid], naive_attention(case)[:n_valid]) <= F32_TOL
    np.testing.assert_array_equal(out[n_valid:], 0)


def test_gradients_through_continuing_prompts_match_a_dense_formulation():
    """Training differentiates the paged attention (carajax.demo.train): the gradients w.r.t.
    the queries and both pools, on a step whose prompts continue from earlier steps (their
    earlier context walked one (block, chunk) pair at a time, a while_loop, whose reverse mode
    is the batched walk's), equal those of a dense jnp formulation of the definition."""
    specs = [(40, 7), (1, 1), (33, 9), (12, 1), (16, 16)]
    case = make_case(np.random.default_rng(7), specs, page_size=8, heads=4, kv_heads=2,
                     num_tokens=40, num_cols=6, num_pages=24)
    n_valid = int(case.query_starts[-1])
    q = np.where(np.isnan(case.q), 0, case.q)
    w = np.random.default_rng(8).standard_normal(q[:n_valid].shape).astype(np.float32)

    def paged(q, k_pages, v_pages):
        out = paged_attention(q, k_pages, v_pages, *case.args()[3:], impl="reference",
                              query_block=8)
        return jnp.sum(out[:n_valid] * w)

    def dense(q, k_pages, v_pages):  # each sequence's context gathered by its (static) pages
        total, group = 0.0, q.shape[1] // k_pages.shape[1]
        for s, seq_len in enumerate(case.seq_lens):
            start, end = int(case.query_starts[s]), int(case.query_starts[s + 1])
            pages = case.block_tables[s, :-(-int(seq_len) // 8)]
            k = k_pages[pages].transpose(0, 2, 1, 3).reshape(-1, k_pages.shape[1], 16)[:seq_len]
            v = v_pages[pages].transpose(0, 2, 1, 3).reshape(-1, k_pages.shape[1], 16)[:seq_len]
            k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
            qs = q[start:end]
            scores = jnp.einsum("thd,lhd->htl", qs, k) / 4.0  # sqrt(head_dim 16)
            pos = seq_len - (end - start) + jnp.arange(end - start)
            scores = jnp.where(jnp.arange(seq_len)[None, None, :] <= pos[None, :, None], scores,
                               -jnp.inf)
            out = jnp.einsum("htl,lhd->thd", jax.nn.softmax(scores, axis=-1), v)
            total += jnp.sum(out * w[start:end])
        return total

    args = (q, case.k_pages, case.v_pages)
    got = jax.jit(jax.grad(paged, argnums=(0, 1, 2)))(*args)
    want = jax.jit(jax.grad(dense, argnums=(0, 1, 2)))(*args)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(want[1]).max()) > 0.1  # the pools' gradients are not trivially zero


def test_query_block_does_not_change_the_result():
    # The shapes of the GQA case above, so that most compiles are reused.
    case = make_case(np.random.default_rng(1), MIXED, page_size=8, heads=8, kv_heads=2,
                     num_tokens=19, num_cols=8)
    outs = [run(case, query_block=bq) for bq in (1, 3, 4, 16, None)]
    for out in outs[1:]:
        # The same dot products in the same order per row: equal up to float32 reassociation.
        assert rel_error(out, outs[0]) <= 1e-6


def test_bfloat16():
    case = make_case(np.random.default_rng(2), MIXED, page_size=8, heads=8, kv_heads=2,
                     dtype=ml_dtypes.bfloat16)
    out = jitted(query_block=4)(*case.args())
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32), np.float64)
    n_valid = case.query_starts[-1]
    assert rel_error(out[:n_valid], naive_attention(case)[:n_valid]) <= BF16_TOL
    np.testing.assert_array_equal(out[n_valid:], 0)


def test_only_padding_gives_zeros():
    case = make_case(np.random.default_rng(3), [(0, 0), (0, 0)], page_size=4, heads=4,
                     kv_heads=2, num_tokens=3)
    np.testing.assert_array_equal(run(case, query_block=2), 0)


# Fixed padded shapes, so that the jitted function compiles once per static combination.
T_PAD, S_PAD, MAX_CTX = 32, 5, 24


# Few static combinations (each compiles once, ~0.5 s here); the data vary freely.
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_drawn_batches_match_dense_loop(data):
    page_size = data.draw(st.sampled_from([1, 4]), "page_size")  # 1: every position a page
    query_block = data.draw(st.sampled_from([1, 3, None]), "query_block")
    heads, kv_heads = 4, 2
    specs = []
    for _ in range(S_PAD):
        n = data.draw(st.integers(0, 6))  # zero-token sequences, n not a multiple of Bq
        # Context before this step's tokens; seq_len 0 with n 0 is a padding sequence.
        prefix = data.draw(st.integers(0, MAX_CTX - n))
        specs.append((prefix + n, n))
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    case = make_case(np.random.default_rng(seed), specs, page_size=page_size, heads=heads,
                     kv_heads=kv_heads, head_dim=8, num_tokens=T_PAD,
                     num_cols=MAX_CTX // page_size, num_pages=S_PAD * MAX_CTX // page_size + 1)
    out = np.asarray(jitted(query_block)(*case.args()), np.float64)
    n_valid = case.query_starts[-1]
    assert np.isfinite(out).all()
    assert rel_error(out[:n_valid], naive_attention(case)[:n_valid]) <= F32_TOL
    np.testing.assert_array_equal(out[n_valid:], 0)


def test_plan_query_blocks_by_hand():
    # Sequences of 5, 0 and 3 tokens in T = 10 rows (2 of padding), Bq = 2:
    #   seq 0 (seq_len 7, tokens at positions 2..6): blocks rows 0-1, 2-3, 4
    #   seq 1: no blocks; seq 2 (seq_len 3, positions 0..2): rows 5-6, 7
    # NB = min(10, ceil(10 / 2) + 3) = 8, so 3 unused blocks (length 0) at the end.
    seq, row0, length, pos0 = plan_query_blocks(jnp.array([7, 0, 3]), jnp.array([0, 5, 5, 8]),
                                                num_tokens=10, query_block=2)
    assert num_query_blocks(10, 3, 2) == 8
    np.testing.assert_array_equal(seq[:5], [0, 0, 0, 2, 2])
    np.testing.assert_array_equal(row0[:5], [0, 2, 4, 5, 7])
    np.testing.assert_array_equal(length, [2, 2, 1, 2, 1, 0, 0, 0])
    np.testing.assert_array_equal(pos0[:5], [2, 4, 6, 0, 2])
    # Pure decode with Bq = 1: one block per token, no spare blocks.
    assert num_query_blocks(16, 16, 1) == 16
    # Only sequence 2 included (a mixed step's decodes walk apart from its prompts): its blocks
    # come first, sequence 0 gets none.
    seq, row0, length, pos0 = plan_query_blocks(jnp.array([7, 0, 3]), jnp.array([0, 5, 5, 8]),
                                                num_tokens=10, query_block=2,
                                                include=jnp.array([False, True, True]))
    np.testing.assert_array_equal(seq[:2], [2, 2])
    np.testing.assert_array_equal(row0[:2], [5, 7])
    np.testing.assert_array_equal(length, [2, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(pos0[:2], [0, 2])


def test_write_pages_follows_block_tables_and_drops_out_of_range():
    N, page_size, kv_heads, D = 5, 4, 2, 3
    block_tables = np.array([[3, 0], [4, 1]], np.int32)
    # Sequence 0 writes positions 0..5 (pages 3, then 0); sequence 1 positions 5..6 (page 1).
    tokens = [(0, p) for p in range(6)] + [(1, 5), (1, 6)]
    slots = [block_tables[s, p // page_size] * page_size + p % page_size for s, p in tokens]
    slots += [-1, N * page_size, 1000]  # padding tokens
    T = len(slots)
    rng = np.random.default_rng(4)
    k = rng.standard_normal((T, kv_heads, D)).astype(np.float32)
    v = rng.standard_normal((T, kv_heads, D)).astype(np.float32)
    zeros = jnp.zeros((N, kv_heads, page_size, D))
    k_pages, v_pages = jax.jit(write_pages)(zeros, zeros, k, v, np.array(slots, np.int32))
    k_pages, v_pages = np.asarray(k_pages), np.asarray(v_pages)

    expected_k, expected_v = np.zeros_like(k_pages), np.zeros_like(v_pages)
    for t, (s, p) in enumerate(tokens):
        page, offset = block_tables[s, p // page_size], p % page_size
        np.testing.assert_array_equal(k_pages[page, :, offset], k[t])
        np.testing.assert_array_equal(v_pages[page, :, offset], v[t])
        expected_k[page, :, offset], expected_v[page, :, offset] = k[t], v[t]
    # Nothing else was written: in particular slot -1 did not wrap to the pool's last slot.
    np.testing.assert_array_equal(k_pages, expected_k)
    np.testing.assert_array_equal(v_pages, expected_v)


def test_write_then_attend_in_a_jitted_layer_scan():
    """The engine's use: per layer, write the step's keys/values, then attend, inside lax.scan."""
    layers, page_size, heads, kv_heads, D = 2, 4, 4, 2, 8
    specs = [(10, 3), (0, 0), (6, 1)]
    rng = np.random.default_rng(5)
    case = make_case(rng, specs, page_size=page_size, heads=heads, kv_heads=kv_heads, head_dim=D,
                     num_tokens=6)  # its block tables serve every layer
    T = case.q.shape[0]
    # The step's tokens: sequence s's last n_s positions; padding rows get slot -1.
    slots = np.full(T, -1, np.int32)
    for s, (seq_len, n) in enumerate(specs):
        for i in range(n):
            p = seq_len - n + i
            slots[case.query_starts[s] + i] = (case.block_tables[s, p // page_size] * page_size
                                               + p % page_size)
    # Per layer: fresh contexts; the pool holds them except at this step's slots (stale garbage).
    qs, kps, vps, ks, vs, refs = [], [], [], [], [], []
    for _ in range(layers):
        c = make_case(rng, specs, page_size=page_size, heads=heads, kv_heads=kv_heads,
                      head_dim=D, num_tokens=T)
        c = c._replace(block_tables=case.block_tables)
        kp, vp = np.full_like(case.k_pages, GARBAGE), np.full_like(case.v_pages, GARBAGE)
        k_new, v_new = np.zeros((T, kv_heads, D), np.float32), np.zeros((T, kv_heads, D), np.float32)
        for s, (seq_len, n) in enumerate(specs):
            for p in range(seq_len):
                page, off = case.block_tables[s, p // page_size], p % page_size
                if p >= seq_len - n:  # this step's token: arrives through write_pages
                    t = case.query_starts[s] + p - (seq_len - n)
                    k_new[t], v_new[t] = c.ctx_k[s][p], c.ctx_v[s][p]
                else:
                    kp[page, :, off], vp[page, :, off] = c.ctx_k[s][p], c.ctx_v[s][p]
        qs.append(c.q)
        kps.append(kp)
        vps.append(vp)
        ks.append(k_new)
        vs.append(v_new)
        refs.append(naive_attention(c))

    @jax.jit
    def step(qs, kps, vps, ks, vs):
        def layer(_, xs):
            q, kp, vp, k, v = xs
            kp, vp = write_pages(kp, vp, k, v, slots)
            out = paged_attention(q, kp, vp, case.block_tables, case.seq_lens, case.query_starts,
                                  query_block=2)
            return None, out
        return jax.lax.scan(layer, None, (qs, kps, vps, ks, vs))[1]

    outs = np.asarray(step(*map(np.stack, (qs, kps, vps, ks, vs))), np.float64)
    n_valid = case.query_starts[-1]
    for out, ref in zip(outs, refs):
        assert rel_error(out[:n_valid], ref[:n_valid]) <= F32_TOL
        np.testing.assert_array_equal(out[n_valid:], 0)


def test_dispatch():
    case = make_case(np.random.default_rng(6), [(5, 2)], page_size=4, heads=2, kv_heads=1,
                     head_dim=16)
    # On CPU, auto is the reference (interpreting the kernel would be several times slower).
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(run(case, impl="auto"), run(case, impl="reference"))
    assert rel_error(run(case, impl="interpret"), run(case, impl="reference")) <= 1e-6
    with pytest.raises(ValueError, match="unknown impl"):
        paged_attention(*case.args(), impl="flash")
    for impl in ("reference", "interpret"):
        with pytest.raises(ValueError, match="query_block"):
            paged_attention(*case.args(), impl=impl, query_block=0)
    # The kernel's tiles need a power-of-two head_dim; auto never picks it for others.
    odd = make_case(np.random.default_rng(6), [(5, 2)], page_size=4, heads=2, kv_heads=1,
                    head_dim=12)
    with pytest.raises(ValueError, match="power of two"):
        paged_attention(*odd.args(), impl="interpret")
    assert rel_error(run(odd, impl="auto"), naive_attention(odd)) <= F32_TOL


# ---------------------------------------------------------------------------------------------
# The Pallas kernel: one suite, compiled on a GPU, interpreted everywhere
# ---------------------------------------------------------------------------------------------
@functools.cache
def kernel(interpret: bool, query_block=None, block_k=None):
    return jax.jit(functools.partial(paged_attention_pallas, interpret=interpret,
                                     query_block=query_block, block_k=block_k))


# Contexts over several key chunks (block_k 16 at page_size 4: 4 pages a chunk), decode tokens
# and prefill chunks whose query blocks end before their sequence's context does.
LONG = [
    (70, 1),  # decode over 18 pages (5 chunks), the last page holding 2 of 4 positions
    (0, 0),  # padding sequence
    (45, 13),  # a prefill chunk resuming at position 32: blocks end at 36, 40, 44, 45
    (64, 1),  # decode, the context exactly 16 full pages
    (3, 3),  # a fresh prompt shorter than one page
    (0, 0),
]


class PagedAttentionKernelSuite:
    INTERPRET = False

    def check(self, case, out, tol):
        """Against the float64 loop and the jnp reference; padding rows exactly zero."""
        out = np.asarray(out.astype(jnp.float32), np.float64)
        n_valid = case.query_starts[-1]
        assert rel_error(out[:n_valid], naive_attention(case)[:n_valid]) <= tol
        ref = paged_attention_reference(*case.args(), query_block=4)
        ref = np.asarray(ref.astype(jnp.float32), np.float64)
        assert rel_error(out, ref) <= tol
        np.testing.assert_array_equal(out[n_valid:], 0)

    @pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
    @pytest.mark.parametrize("query_block", [1, None])
    def test_mixed_batch(self, heads, kv_heads, query_block):
        case = make_case(np.random.default_rng(10), MIXED, page_size=8, heads=heads,
                         kv_heads=kv_heads, num_tokens=19, num_cols=8)
        out = kernel(self.INTERPRET, query_block)(*case.args())
        assert out.dtype == jnp.float32 and out.shape == case.q.shape
        self.check(case, out, F32_TOL)

    @pytest.mark.parametrize("query_block", [4, 16])
    def test_contexts_over_several_chunks(self, query_block):
        # GQA 8 / 2 with query_block 16: a 64-row tile holding 16 tokens x 4 heads.
        case = make_case(np.random.default_rng(11), LONG, page_size=4, heads=8, kv_heads=2,
                         num_tokens=20, num_cols=20)
        self.check(case, kernel(self.INTERPRET, query_block, 16)(*case.args()), F32_TOL)

    def test_decode_only_batch(self):
        # The engine's decode step: one token per sequence, Bq = 1, ragged contexts.
        specs = [(1, 1), (17, 1), (33, 1), (0, 0), (100, 1), (48, 1)]
        case = make_case(np.random.default_rng(12), specs, page_size=16, heads=4, kv_heads=2,
                         num_tokens=8, num_cols=8)
        self.check(case, kernel(self.INTERPRET, 1, 32)(*case.args()), F32_TOL)

    def test_bfloat16(self):
        case = make_case(np.random.default_rng(13), LONG, page_size=4, heads=8, kv_heads=2,
                         dtype=ml_dtypes.bfloat16, num_tokens=20, num_cols=20)
        out = kernel(self.INTERPRET, 4, 16)(*case.args())
        assert out.dtype == jnp.bfloat16
        self.check(case, out, BF16_TOL)

    def test_through_paged_attention(self):
        """The public entry point reaches the kernel: `interpret` here, `pallas` on a GPU (and
        `auto`, whichever it picks there: see carajax.autotune)."""
        case = make_case(np.random.default_rng(14), MIXED, page_size=8, heads=8, kv_heads=2,
                         num_tokens=19, num_cols=8)
        impls = ["interpret"] if self.INTERPRET else ["pallas", "auto"]
        for impl in impls:
            self.check(case, jitted(impl=impl)(*case.args()), F32_TOL)

    # differing_executors: the GPU suite and its interpret subclass share this method.
    @settings(max_examples=8, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
    @given(data=st.data())
    def test_drawn_batches(self, data):
        """Drawn ragged batches at fixed shapes (one compile): zero-token and padding sequences,
        odd page fills, token counts not a multiple of Bq, GQA 4 / 2."""
        page_size = data.draw(st.sampled_from([4, 16]), "page_size")
        specs = []
        for _ in range(S_PAD):
            n = data.draw(st.integers(0, 6))
            specs.append((data.draw(st.integers(0, MAX_CTX - n)) + n, n))
        seed = data.draw(st.integers(0, 2**32 - 1), "seed")
        case = make_case(np.random.default_rng(seed), specs, page_size=page_size, heads=4,
                         kv_heads=2, num_tokens=T_PAD, num_cols=-(-MAX_CTX // page_size),
                         num_pages=S_PAD * -(-MAX_CTX // page_size) + 1)
        out = kernel(self.INTERPRET, 3, 16)(*case.args())
        assert np.isfinite(np.asarray(out)).all()
        self.check(case, out, F32_TOL)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled Pallas)")
class TestPagedAttentionKernelGPU(PagedAttentionKernelSuite):
    INTERPRET = False


class TestPagedAttentionKernelInterpret(PagedAttentionKernelSuite):
    INTERPRET = True


def test_kernel_query_block_fits_the_tile():
    assert kernel_query_block(64, 1) == 64  # Llama-2-7B (MHA): 64 rows
    assert kernel_query_block(64, 4) == 32  # Llama-3-8B (GQA 4): 32 tokens x 4 heads = 128 rows
    assert kernel_query_block(1, 8) == 1
    assert kernel_query_block(4, 256) == 1  # never below one token


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_lowers_to_triton_for_nvidia(dtype):
    """Without a GPU, lowering for CUDA still runs Pallas' Triton lowering and its checks (tile
    shapes, gathers, dots) on Llama-2-7B decode (32 heads, MHA) and a GQA prefill step."""
    sds = jax.ShapeDtypeStruct
    N, page_size, D, P = 1024, 16, 128, 128
    for T, S, heads, kv_heads, bq in ((32, 32, 32, 32, 1), (512, 8, 32, 8, 64)):
        args = (sds((T, heads, D), dtype), sds((N, kv_heads, page_size, D), dtype),
                sds((N, kv_heads, page_size, D), dtype), sds((S, P), jnp.int32),
                sds((S,), jnp.int32), sds((S + 1,), jnp.int32))
        fn = functools.partial(paged_attention_pallas, query_block=bq)
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text.lower()


def test_model_forward_with_the_kernel(monkeypatch, tiny_config):
    """The kernel where the engine runs it: inside the model's layer scan, on the flat pool of
    all layers (block tables offset per layer), after write_pages. Two whole sequences of 10 and
    an interpret-mode forward give the reference forward's logits."""
    from carajax.models import llama, weights

    model = weights.random_model(tiny_config, seed=3)
    batch, pages = llama.dense_batch(2, 10, page_size=4)
    batch.tokens = jnp.asarray(np.random.default_rng(7).integers(0, tiny_config.vocab_size, 20),
                               jnp.int32)

    def forward():
        cache = llama.PagedKVCache.zeros(tiny_config, pages + 1, 4, jnp.float32)
        return np.asarray(model(batch, cache, None, query_block=4)[0], np.float64)

    want = forward()
    monkeypatch.setattr(llama, "paged_attention",
                        functools.partial(paged_attention, impl="interpret"))
    assert rel_error(forward(), want) <= F32_TOL
