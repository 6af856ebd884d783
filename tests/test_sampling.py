"""Token sampling: greedy, filters, per-request seeds, stop tokens and max_tokens."""

from __future__ import annotations

import numpy as np
import pytest

import carajax
from carajax.engine.sampling import SamplingParams, sample, sampling_arrays

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


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-1), dict(top_k=-1),
                                    dict(top_p=0.0), dict(top_p=1.5), dict(seed=-1), dict(seed=2**32)])
def test_invalid_parameters(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
