"""Configuration: presets with their real shapes, HF config.json parsing, validation."""

from __future__ import annotations

import json

import pytest

import carajax
from carajax import EngineConfig, ModelConfig


@pytest.mark.parametrize("name,params_b", [
    # Published parameter counts (billions) of the real models.
    ("llama2-7b", 6.74), ("llama2-13b", 13.0), ("llama2-70b", 69.0), ("llama3-8b", 8.03),
])
def test_presets_have_the_real_shapes(name, params_b):
    assert ModelConfig.from_name(name).num_params() / 1e9 == pytest.approx(params_b, rel=0.01)


def test_test_presets():
    tiny = ModelConfig.from_name("llama-test")
    assert (tiny.vocab_size, tiny.num_layers, tiny.hidden_size, tiny.num_heads,
            tiny.num_kv_heads, tiny.head_dim) == (256, 2, 64, 4, 2, 16)
    assert ModelConfig.from_name("llama-100m").num_params() / 1e6 == pytest.approx(100, rel=0.05)
    assert ModelConfig.from_name("llama3.1-8b").rope_scaling.factor == 8.0


def test_projection_shapes_of_gqa():
    c = ModelConfig.from_name("llama2-70b")  # 64 heads of 128, 8 KV heads
    assert c.projection_shape("q_proj") == (8192, 8192)
    assert c.projection_shape("k_proj") == (8192, 1024)
    assert c.projection_shape("down_proj") == (28672, 8192)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="llama-test"):
        ModelConfig.from_name("gpt-2")


def test_from_hf_reads_llama3_config(tmp_path):
    # The fields of meta-llama/Llama-3.1-8B's config.json that carajax reads.
    hf = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
          "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
          "max_position_embeddings": 131072, "tie_word_embeddings": False,
          "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    c = ModelConfig.from_hf(tmp_path)
    assert c == ModelConfig(**{**ModelConfig.from_name("llama3.1-8b").__dict__, "name": c.name})
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == ModelConfig(**{**c.__dict__,
                                                                        "name": "custom"})


@pytest.mark.parametrize("change,words", [
    ({"model_type": "mistral"}, "model_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
])
def test_from_hf_rejects_what_it_cannot_serve(change, words):
    hf = {**ModelConfig.from_name("llama-test").to_hf_dict(), **change}
    with pytest.raises(ValueError, match=words):
        ModelConfig.from_hf_dict(hf)


def test_configs_are_frozen_and_validated():
    c = ModelConfig.from_name("llama-test")
    with pytest.raises(AttributeError):
        c.hidden_size = 3
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int8")
    with pytest.raises(ValueError, match="max_lora_rank"):
        EngineConfig(max_lora_rank=0)
    assert EngineConfig(max_seq_len=100000).seq_len(c) == c.max_position_embeddings
    assert carajax.EngineConfig().seq_len(c) == 1024
