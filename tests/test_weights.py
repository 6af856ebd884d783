"""Checkpoints: HF safetensors (single, sharded, bfloat16), our writer, orbax snapshots."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import carajax
from carajax.models import weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9]


def _hf_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=80,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.1, eos_token_id=None)
    return transformers.LlamaForCausalLM(cfg).eval()


def _hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def _leaves(model):
    return jax.tree_util.tree_leaves(nnx.to_pure_dict(nnx.state(model)))


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    with open(tmp_path / "sharded" / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1  # really sharded
    single = carajax.Engine.from_pretrained(str(tmp_path / "single"))
    sharded = carajax.Engine.from_pretrained(str(tmp_path / "sharded"))
    np.testing.assert_array_equal(single.logits(TOKENS), sharded.logits(TOKENS))
    np.testing.assert_allclose(single.logits(TOKENS), _hf_logits(hf), rtol=1e-4, atol=1e-5)


def test_bfloat16_checkpoint(tmp_path):
    hf = _hf_model()
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = weights.load_hf(tmp_path / "bf16", dtype=jnp.float32)
    # Every weight equals torch's bfloat16 value exactly (bfloat16 -> float32 is exact).
    want = hf.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.down_proj.kernel.value), want)


def test_missing_tensor_and_bad_shape_are_named(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "m")
    from carajax import _safetensors

    file = tmp_path / "m" / "model.safetensors"
    tensors = {k: np.array(v) for k, v in _safetensors.load(file).items()}
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    _safetensors.save(file, tensors)
    with pytest.raises(carajax.CheckpointError, match="model.layers.1.self_attn.k_proj.weight"):
        carajax.Engine.from_pretrained(str(tmp_path / "m"))
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((3, 32), np.float32)
    _safetensors.save(file, tensors)
    with pytest.raises(carajax.CheckpointError, match=r"shape \(32, 3\)"):
        carajax.Engine.from_pretrained(str(tmp_path / "m"))
    os.remove(file)
    with pytest.raises(carajax.CheckpointError, match="no model.safetensors"):
        carajax.Engine.from_pretrained(str(tmp_path / "m"))


def test_save_hf_round_trip_is_readable_by_transformers(tmp_path, tiny_config):
    """Our writer produces a checkpoint HF loads to the same logits."""
    ours = weights.random_model(tiny_config, seed=5)
    weights.save_hf(ours, tmp_path / "ck")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ck").eval()
    engine = carajax.Engine(weights.load_hf(tmp_path / "ck"))
    np.testing.assert_allclose(engine.logits(TOKENS), _hf_logits(hf), rtol=1e-4, atol=1e-5)
    for a, b in zip(_leaves(ours), _leaves(weights.load_hf(tmp_path / "ck"))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_orbax_round_trip_is_bit_identical(tmp_path, tiny_config, dtype):
    model = weights.random_model(tiny_config, dtype=dtype, seed=11)
    weights.save_orbax(model, tmp_path / "snap")
    restored = weights.restore_orbax(tmp_path / "snap", tiny_config, dtype=dtype)
    before, after = _leaves(model), _leaves(restored)
    assert len(before) == len(after) == len(jax.tree_util.tree_leaves(nnx.state(model)))
    for a, b in zip(before, after):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_random_init_is_deterministic_per_seed(tiny_config):
    a, b, c = (weights.random_model(tiny_config, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.embed_tokens.value, b.embed_tokens.value)
    assert not np.array_equal(a.embed_tokens.value, c.embed_tokens.value)
