"""EngineConfig.lora_kernel: "padded" reaches the Pallas kernels as pad_to_max_rank=True and gives
the same tokens as "unpadded"; the references ignore it; bad values are refused."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import carajax
from carajax.config import TARGET_MODULES, EngineConfig
from carajax.lora import hook, kernels
from carajax.models import weights
from carajax.models.tokenizer import ByteTokenizer
from carajax.testing import write_random_adapter

GREEDY = carajax.SamplingParams(max_tokens=3, temperature=0.0, stop_token_ids=())


def test_lora_kernel_validated():
    assert EngineConfig().lora_kernel == "unpadded"
    assert EngineConfig(lora_kernel="padded").lora_kernel == "padded"
    with pytest.raises(ValueError, match="lora_kernel"):
        EngineConfig(lora_kernel="bgmv")


@pytest.mark.parametrize("pad", [False, True])
def test_flag_reaches_the_pallas_kernels(monkeypatch, pad):
    """Call the hook eagerly with spies in place of the kernels: the flag arrives as given."""
    seen = []

    def spy(real):
        def call(*args, **kw):
            seen.append(kw["pad_to_max_rank"])
            return real(*args, **kw)
        return call

    monkeypatch.setattr(kernels, "sgmv", spy(kernels.sgmv))
    monkeypatch.setattr(kernels, "bgmv", spy(kernels.bgmv))
    P, pr, d = 3, 16, 8
    rng = np.random.default_rng(0)
    w = carajax.lora.pool.PagedLoraWeights(
        a={"q_proj": jnp.asarray(rng.standard_normal((1, P, pr, d)), jnp.float32)},
        b={"q_proj": jnp.asarray(rng.standard_normal((1, P, d, pr)), jnp.float32)},
        page_table=jnp.array([[0, 1], [2, 0]], jnp.int32),
        ranks={"q_proj": jnp.array([[32, 8]], jnp.int32)},
        scales={"q_proj": jnp.ones((1, 2), jnp.float32)})
    def lora(impl, T):  # two sequences of T tokens each, slots 0 and 1, flattened
        return hook.BatchLora(w, jnp.array([0, T], jnp.int32), jnp.array([T, T], jnp.int32),
                              jnp.array([0, 1], jnp.int32), impl, pad_to_max_rank=pad)

    x = jnp.asarray(rng.standard_normal((2, 4, d)), jnp.float32)
    (prefill,) = lora("interpret", 4)(0, ("q_proj",), x.reshape(8, d))  # chunks of 4 tokens
    (decode,) = lora("interpret", 1)(0, ("q_proj",), x[:, 0])  # one token each
    assert seen == [pad, pad]  # one sgmv per call: prefill chunks and decodes alike
    # Padding only adds masked rank blocks: the result is the reference's either way.
    (want,) = lora("reference", 4)(0, ("q_proj",), x.reshape(8, d))
    np.testing.assert_allclose(prefill, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(decode, want.reshape(2, 4, d)[:, 0], rtol=1e-5, atol=1e-5)
    # The references take no such flag at all: the setting cannot change what they compute.
    assert hook._ops("reference", True) == (kernels.sgmv_reference, kernels.bgmv_reference)


@pytest.mark.slow  # ~40 s: four interpret-mode compiles
def test_padded_engine_matches_unpadded_tokens(tmp_path, tiny_config):
    """Interpret mode is slow: one tiny mixed-rank batch, three greedy tokens each."""
    ranks = {"r8": 8, "r32": 32}
    dirs = {n: write_random_adapter(tmp_path / n, tiny_config, rank=r, seed=r, std=0.2,
                                    target_modules=TARGET_MODULES) for n, r in ranks.items()}
    prompts = [[2, 70, 71, 72, 73], [2, 80, 81], [2, 90, 91, 92]]
    adapters = ["r8", "r32", None]
    outs = {}
    for kernel in ("unpadded", "padded"):
        model = weights.random_model(tiny_config, seed=0, init_std=0.1)
        cfg = EngineConfig(lora_impl="interpret", lora_kernel=kernel, cold_start="cached",
                           max_batch_size=4, prefill_chunk=16)
        with carajax.Engine(model, ByteTokenizer(), cfg) as engine:
            assert engine.runner.pad is (kernel == "padded")
            for name, path in dirs.items():
                engine.add_adapter(name, path)
            outs[kernel] = [o.token_ids for o in engine.generate(prompts, adapters, GREEDY)]
    assert outs["padded"] == outs["unpadded"]
    assert all(len(t) == 3 for t in outs["padded"])
