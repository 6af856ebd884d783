"""Token sampling: greedy, filters, per-request seeds, stop tokens and max_tokens."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import carajax
from carajax.engine.sampling import (
    CANDIDATES,
    SamplingParams,
    kept_mask,
    sample,
    sample_tokens,
    sampling_arrays,
)

# Row logits with a clear order: token 3 > 1 > 0 > 2 (softmax at T=1: 0.64, 0.24, 0.09, 0.03).
LOGITS = np.log(np.array([[0.09, 0.24, 0.03, 0.64]], np.float32))


def _draws(params: SamplingParams, n=400):
    logits = np.repeat(LOGITS, n, axis=0)
    arrays = sampling_arrays([params] * n, list(range(n)), [0] * n)
    return np.asarray(sample(logits, *arrays))


def test_greedy_is_argmax():
    assert set(_draws(SamplingParams(temperature=0.0), 8)) == {3}


def test_top_k_1_and_tiny_top_p_are_greedy():
    assert set(_draws(SamplingParams(temperature=1.0, top_k=1))) == {3}
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.5))) == {3}


def test_top_k_2_keeps_the_two_best():
    draws = _draws(SamplingParams(temperature=1.0, top_k=2))
    assert set(draws) == {1, 3}
    # Renormalised: P(3) = 0.64 / 0.88 = 0.727.
    assert np.mean(draws == 3) == pytest.approx(0.727, abs=0.07)


def test_top_p_keeps_the_nucleus():
    # Sorted masses 0.64, 0.24, 0.09, 0.03: p = 0.8 needs {3, 1} (0.64 < 0.8, 0.88 >= 0.8).
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.8))) == {1, 3}


def test_temperature_one_follows_the_distribution():
    draws = _draws(SamplingParams(temperature=1.0), 2000)
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.09, 0.24, 0.03, 0.64], atol=0.04)


def test_same_seed_same_tokens_other_seed_other_tokens():
    engine = carajax.Engine.from_pretrained("llama-test", seed=3)
    s = dict(max_tokens=24, temperature=1.0, stop_token_ids=())
    a = engine.generate("Hello", sampling=SamplingParams(seed=1, **s))[0]
    b = engine.generate("Hello", sampling=SamplingParams(seed=1, **s))[0]
    c = engine.generate("Hello", sampling=SamplingParams(seed=2, **s))[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 24
    assert a.token_ids != c.token_ids


def test_stop_tokens_and_max_tokens():
    engine = carajax.Engine.from_pretrained("llama-test", seed=3)
    greedy = engine.generate([2, 9, 9], sampling=SamplingParams(
        max_tokens=10, temperature=0.0, stop_token_ids=()))[0]
    assert len(greedy.token_ids) == 10 and greedy.finish_reason == "length"
    stop_at = greedy.token_ids[4]
    first = greedy.token_ids.index(stop_at)
    stopped = engine.generate([2, 9, 9], sampling=SamplingParams(
        max_tokens=10, temperature=0.0, stop_token_ids=(stop_at,)))[0]
    assert stopped.token_ids == greedy.token_ids[:first + 1]
    assert stopped.finish_reason == "stop"


def _reference_kept(logits, temperature, top_k, top_p) -> np.ndarray:
    """bool [V]: the documented filters by a full sort, in float64 (the old implementation)."""
    x = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.ones(len(x), bool) if top_k == 0 else np.arange(len(x)) < top_k
    probs = np.where(keep, np.exp(x[order] - x[order[0]]), 0.0)
    probs /= probs.sum()
    keep &= np.cumsum(probs) - probs < top_p  # mass strictly before each token, first always kept
    mask = np.zeros(len(x), bool)
    mask[order[keep]] = True
    return mask


def _reference_probs(logits, temperature, top_k, top_p) -> np.ndarray:
    """float64 [V]: the distribution a row draws from, renormalised over the kept tokens."""
    x = np.asarray(logits, np.float64) / temperature
    p = np.where(_reference_kept(logits, temperature, top_k, top_p), np.exp(x - x.max()), 0.0)
    return p / p.sum()


def _arrays(rows, seeds=None, steps=None):
    """sample()'s arrays from (temperature, top_k, top_p) triples."""
    n = len(rows)
    return (np.array([r[0] for r in rows], np.float32), np.array([r[1] for r in rows], np.int32),
            np.array([r[2] for r in rows], np.float32),
            np.array(range(n) if seeds is None else seeds, np.uint32),
            np.zeros(n, np.int32) if steps is None else np.array(steps, np.int32))


def test_greedy_equals_numpy_argmax_on_a_vocabulary_batch():
    logits = np.random.default_rng(0).normal(size=(16, 32000)).astype(np.float32)
    logits[3, [100, 5000]] = 9.0  # a tie: the lowest index wins, as np.argmax
    logits[4] = -np.inf
    logits[5, [7, 9]] = np.nan  # a NaN counts as the max, as in np.argmax
    for rows in ([(0.0, 0, 1.0)] * 16, [(0.0, 0, 1.0)] * 15 + [(1.0, 0, 1.0)]):  # with a sampling row
        out = np.asarray(sample(logits, *_arrays(rows)))
        greedy = [i for i, r in enumerate(rows) if r[0] == 0]
        np.testing.assert_array_equal(out[greedy], np.argmax(logits, axis=-1)[greedy])
        assert out[3] == 100 and out[4] == 0 and out[5] == 7 and out.dtype == np.int32


# (temperature, top_k, top_p, logit scale): each resolved from the top-`CANDIDATES` logits, or by
# bisection over the whole row when the kept set is larger (kept counts are checked below).
FILTERS = [
    (1.0, 50, 1.0, 1.0),  # top-k from the candidates
    (0.7, 500, 1.0, 1.0),  # top-k past the candidates: bisection on the count
    (1.0, 0, 0.9, 5.0),  # peaked: the nucleus ends among the candidates
    (1.0, 0, 0.9, 1.0),  # flat: the nucleus runs past them, bisection on the mass
    (1.3, 0, 0.3, 1.0),
    (1.0, 40, 0.5, 2.0),  # top-k, then the nucleus of the renormalised top 40
    (0.8, 2000, 0.8, 1.0),  # both past the candidates
    (1.0, 3000, 0.999, 3.0),
    (2.0, 32000, 1.0, 1.0),  # top_k >= V is off: everything kept
    (1.0, 0, 1.0, 1.0),
]


def test_kept_set_equals_the_sort_reference():
    rng = np.random.default_rng(1)
    logits = np.stack([s * rng.normal(size=32000) for *_, s in FILTERS]).astype(np.float32)
    rows = [f[:3] for f in FILTERS]
    mask = np.asarray(kept_mask(logits, *_arrays(rows)[:3]))
    counts = []
    for i, (t, k, p) in enumerate(rows):
        ref = _reference_kept(logits[i], t, k, p)
        assert np.array_equal(mask[i], ref), f"row {i} {rows[i]}: {mask[i].sum()} kept, reference {ref.sum()}"
        counts.append(int(ref.sum()))
    # Both ways are exercised: kept sets inside the candidates and far beyond them.
    assert counts[0] == 50 and counts[1] == 500 and counts[2] < CANDIDATES < counts[3]
    assert counts[8] == counts[9] == 32000


def test_thresholds_are_exact_to_the_last_bit():
    # Adjacent float32 values: a threshold one ulp off keeps or drops a token.
    row = (np.float32(1.0).view(np.uint32) + np.arange(4000, dtype=np.uint32)).view(np.float32)
    logits = np.random.default_rng(6).permutation(row)[None]
    for k in (1000, 3999):  # past the candidates: bisection on the count
        mask = np.asarray(kept_mask(logits, *_arrays([(1.0, k, 1.0)])[:3]))[0]
        assert mask.sum() == k and logits[0][mask].min() == np.sort(row)[-k]


def test_ties_at_the_threshold_are_all_kept():
    logits = np.log(np.array([[0.4, 0.2, 0.2, 0.1, 0.1]], np.float32))
    assert kept_mask(logits, *_arrays([(1.0, 2, 1.0)])[:3])[0].tolist() == [1, 1, 1, 0, 0]
    # Nucleus 0.5: 0.4 alone is short, so the next 0.2 stays, and the 0.2 tied with it too.
    assert kept_mask(logits, *_arrays([(1.0, 0, 0.5)])[:3])[0].tolist() == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.7, 0, 1.0),  # the whole vocabulary (V = 1000: 8 blocks, the last one padded)
    (1.0, 0, 0.8),  # a nucleus past the candidates
    (1.0, 8, 1.0),
    (1.5, 200, 0.95),
])
def test_draws_follow_the_reference_distribution(temperature, top_k, top_p):
    n = 8000
    row = (3 * np.random.default_rng(2).normal(size=1000)).astype(np.float32)
    draws = np.asarray(sample(np.tile(row, (n, 1)), *_arrays([(temperature, top_k, top_p)] * n)))
    probs = _reference_probs(row, temperature, top_k, top_p)
    assert probs[draws].min() > 0, "drew a token outside the kept set"
    freq = np.bincount(draws, minlength=len(row)) / n
    # Kolmogorov-Smirnov bound at ~1e-4 (1.95 / sqrt(n) is the 99.9% quantile), in vocabulary
    # order and in order of probability.
    for order in (np.arange(len(row)), np.argsort(-probs)):
        gap = np.abs(np.cumsum(freq[order]) - np.cumsum(probs[order])).max()
        assert gap < 2.2 / np.sqrt(n), gap


@pytest.mark.parametrize("params", [(0.8, 0, 1.0), (1.0, 20, 1.0), (1.0, 0, 0.9), (0.9, 300, 0.95)])
def test_a_row_draws_the_same_token_in_any_batch_and_position(params):
    rng = np.random.default_rng(3)
    V = 32000
    row = rng.normal(size=V).astype(np.float32)
    others = rng.normal(size=(15, V)).astype(np.float32)
    # Batchmates of every kind: greedy, candidate filters, bisections on the count and the mass.
    mates = [(0.0, 0, 1.0), (1.0, 5, 1.0), (1.0, 1000, 1.0), (1.2, 0, 0.99), (0.5, 0, 1.0)] * 3
    for seed, step in [(7, 0), (7, 3), (123456789, 11)]:
        alone = int(sample(row[None], *_arrays([params], [seed], [step]))[0])
        for pos, B in [(0, 16), (9, 16), (3, 4)]:
            batch = np.insert(others[:B - 1], pos, row, axis=0)
            rows = mates[:B - 1]
            rows.insert(pos, params)
            seeds = list(range(100, 100 + B))
            seeds[pos] = seed
            steps = [5] * B
            steps[pos] = step
            assert int(sample(batch, *_arrays(rows, seeds, steps))[pos]) == alone
    # The draw does depend on seed and step.
    draws = {int(sample(row[None], *_arrays([params], [s], [i]))[0]) for s in range(4) for i in range(4)}
    assert len(draws) > 1


def test_mixed_batch_greedy_rows_beside_sampling_rows():
    logits = (2 * np.random.default_rng(4).normal(size=(16, 32000))).astype(np.float32)
    rows = [(0.0, 0, 1.0) if i % 2 == 0 else (1.0, 0, 0.9) if i % 4 == 1 else (0.8, 30, 1.0)
            for i in range(16)]
    out = np.asarray(sample(logits, *_arrays(rows)))
    for i, (t, k, p) in enumerate(rows):
        if t == 0:
            assert out[i] == np.argmax(logits[i])
        else:
            assert _reference_kept(logits[i], t, k, p)[out[i]], i
    assert len(set(out[1::2].tolist())) > 1  # the sampling rows do sample


def test_sample_tokens_runs_inside_a_callers_jit():
    logits = np.random.default_rng(5).normal(size=(4, 100)).astype(np.float32)
    arrays = _arrays([(0.0, 0, 1.0), (1.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.5)])
    step = jax.jit(lambda x, *a: sample_tokens(2 * x, *a) + 1)
    np.testing.assert_array_equal(np.asarray(step(logits, *arrays)),
                                  np.asarray(sample(2 * logits, *arrays)) + 1)
    # The sampling branch sits behind a conditional, skipped when every row is greedy.
    assert "cond" in str(jax.make_jaxpr(sample_tokens)(logits, *arrays))


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-1), dict(top_k=-1),
                                    dict(top_p=0.0), dict(top_p=1.5), dict(seed=-1), dict(seed=2**32)])
def test_invalid_parameters(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
