"""The Llama forward pass: KV-cache decoding, batched rows and rotary scaling."""

from __future__ import annotations

import numpy as np
import pytest

import carajax
from carajax.config import RopeScaling
from carajax.models.llama import rope_inv_freq
from carajax.testing import write_random_adapter
from tests.conftest import assert_close

SEQ = [2, 5, 71, 200, 13, 13, 99, 1, 0, 255, 42, 17, 8, 64, 128, 3, 77, 21, 90]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_config):
    engine = carajax.Engine.from_pretrained("llama-test", seed=7)
    root = tmp_path_factory.mktemp("adapters")
    engine.add_adapter("r4", write_random_adapter(root / "r4", tiny_config, rank=4, seed=1))
    engine.add_adapter("r16", write_random_adapter(
        root / "r16", tiny_config, rank=16, seed=2,
        target_modules=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")))
    return engine


def _slot(engine, adapter):
    if adapter is None:
        return -1
    engine.pool.load_now(adapter)
    return engine.pool.slot(adapter)


@pytest.mark.parametrize("adapter", [None, "r4", "r16"])
def test_kv_cache_decode_equals_full_forward(engine, adapter):
    """Prefill a prefix, then decode the rest one token at a time: every step's logits equal the
    full-sequence forward's logits at that position."""
    full = engine.logits(SEQ, adapter=adapter)
    slot = _slot(engine, adapter)
    prefix = 5
    logits = engine.runner.prefill(2, SEQ[:prefix], slot)
    assert_close(np.asarray(logits[0]), full[prefix - 1])
    for pos in range(prefix, len(SEQ)):
        logits = engine.runner.decode([2], [SEQ[pos]], [pos], [slot])
        assert_close(np.asarray(logits[0]), full[pos])


def test_batched_decode_rows_are_independent(engine):
    """Three requests with different adapters and lengths decode in one batch (padded to 4 rows):
    each row's logits equal that request's own full forward."""
    requests = [(SEQ[:7], None), (SEQ[3:15], "r4"), (SEQ[:11], "r16")]
    full = [engine.logits(toks, adapter=a) for toks, a in requests]
    rows, slots = [0, 1, 2], [_slot(engine, a) for _, a in requests]
    for row, (toks, _), slot in zip(rows, requests, slots):
        engine.runner.prefill(row, toks[:-1], slot)
    logits = engine.runner.decode(rows, [t[-1] for t, _ in requests],
                                  [len(t) - 1 for t, _ in requests], slots)
    assert logits.shape[0] == 4  # bucketed batch
    for i, f in enumerate(full):
        assert_close(np.asarray(logits[i]), f[-1])


def test_padding_does_not_leak_into_results(engine):
    """Prompt lengths on either side of a bucket boundary give the same logits as scoring."""
    for n in (15, 16, 17):
        toks = (SEQ * 2)[:n]
        logits = engine.runner.prefill(0, toks, -1)
        assert_close(np.asarray(logits[0]), engine.logits(toks)[-1])


def test_llama3_rope_scaling_frequencies():
    """Hand-checked llama3 scaling (head_dim 8, theta 10000, factor 8, low 1, high 4, ctx 32):
    inv_freq = 10000^(-i/4) = [1, 0.1, 0.01, 0.001]; wavelengths 2*pi/f = [6.28, 62.8, 628, 6283];
    high-frequency cutoff 32/4 = 8, low 32/1 = 32. f=1 is kept (6.28 < 8), 0.01 and 0.001 are
    divided by 8 (wavelength > 32); none lies in [8, 32]; 0.1 (62.8 > 32) is divided too."""
    cfg = carajax.ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_layers=1,
                              num_heads=2, num_kv_heads=1,
                              rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0,
                                                       original_max_position_embeddings=32))
    np.testing.assert_allclose(rope_inv_freq(cfg), [1.0, 0.1 / 8, 0.01 / 8, 0.001 / 8], rtol=1e-6)
    # A medium wavelength is interpolated. With ctx 2000 the cutoffs are 500 and 2000, so
    # f = 0.01 (wavelength 628.3) is medium: smooth = (2000 / 628.32 - 1) / 3 = 0.7277 and
    # f' = (1 - smooth) * 0.01 / 8 + smooth * 0.01 = 0.0076172.
    cfg2 = carajax.ModelConfig(**{**cfg.__dict__, "rope_scaling": RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=2000)})
    np.testing.assert_allclose(rope_inv_freq(cfg2)[2], 0.0076172, rtol=1e-4)


def test_context_length_is_enforced(engine):
    too_long = [5] * (engine.runner.seq_len)
    with pytest.raises(carajax.RequestError, match="context length"):
        engine.generate([too_long], sampling=carajax.SamplingParams(max_tokens=2))
    with pytest.raises(carajax.RequestError, match="outside the vocabulary"):
        engine.logits([1, 256])
    with pytest.raises(carajax.RequestError, match="empty"):
        engine.logits([])
