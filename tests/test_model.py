"""The Llama forward pass: KV-cache decoding, batched rows and rotary scaling."""

from __future__ import annotations

import numpy as np
import pytest

import carajax
from carajax.config import RopeScaling
from carajax.models.llama import rope_inv_freq
from carajax.testing import run_chunks, write_random_adapter
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


def _request(engine, tokens, adapter):
    """A request holding `tokens` as its prompt, with its adapter on the device."""
    if adapter is not None:
        engine.pool.load_now(adapter)
    return engine._make_request(tokens, adapter, carajax.SamplingParams(temperature=0.0), None)


def _step(engine, chunks) -> np.ndarray:
    return run_chunks(engine, chunks)


@pytest.mark.parametrize("adapter", [None, "r4", "r16"])
def test_paged_decode_equals_full_forward(engine, adapter):
    """Prefill a prefix, then decode the rest one token at a time over the paged cache (the
    sequence crosses a page boundary at 16): every step's logits equal the full-sequence
    forward's logits at that position."""
    full = engine.logits(SEQ, adapter=adapter)
    req = _request(engine, SEQ, adapter)
    prefix = 5
    assert_close(_step(engine, [(req, 0, prefix)])[0], full[prefix - 1])
    for pos in range(prefix, len(SEQ)):
        assert_close(_step(engine, [(req, pos, 1)])[0], full[pos])
    engine.planner.pages.free(req)


def test_mixed_step_rows_are_independent(engine):
    """One flattened step holds two decode tokens and two prefill chunks (one resuming mid-
    prompt, one fresh), with three adapters and the base: each sequence's logits equal its own
    full forward at its last token."""
    requests = [(SEQ[:7], None), (SEQ[3:15], "r4"), (SEQ[:11], "r16"), (SEQ[2:19], "r4")]
    full = [engine.logits(toks, adapter=a) for toks, a in requests]
    reqs = [_request(engine, toks, a) for toks, a in requests]
    # Earlier steps: the two decoders' contexts and the resumed prompt's first chunk.
    _step(engine, [(reqs[0], 0, 6), (reqs[1], 0, 11), (reqs[3], 0, 9)])
    logits = _step(engine, [(reqs[0], 6, 1), (reqs[1], 11, 1), (reqs[2], 0, 11),
                            (reqs[3], 9, 8)])
    for i, f in enumerate(full):
        assert_close(logits[i], f[-1])
    for r in reqs:
        engine.planner.pages.free(r)


def test_padding_does_not_leak_into_results(engine):
    """Prompt lengths on either side of a token bucket boundary give the same logits as scoring."""
    for n in (15, 16, 17):
        toks = (SEQ * 2)[:n]
        req = _request(engine, toks, None)
        assert_close(_step(engine, [(req, 0, n)])[0], engine.logits(toks)[-1])
        engine.planner.pages.free(req)


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
