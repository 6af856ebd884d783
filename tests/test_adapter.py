"""PEFT adapter parsing: what is accepted, what is rejected and why, and that nothing leaks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import carajax
from carajax import _safetensors
from carajax.testing import write_random_adapter

SAMPLING = carajax.SamplingParams(max_tokens=6, temperature=0.0)
PROMPT = [2, 10, 20, 30, 40]


@pytest.fixture(scope="module")
def engine():
    # cpu_assist: cold requests are admitted in arrival order (under async / auto they may wait
    # for their copies while later ones go ahead), so which adapters stay resident is fixed.
    return carajax.Engine.from_pretrained(
        "llama-test", config=carajax.EngineConfig(max_lora_rank=16, max_loras=4,
                                                  cold_start="cpu_assist"))


@pytest.fixture
def good(tmp_path, tiny_config):
    return write_random_adapter(tmp_path / "good", tiny_config, rank=8, seed=3)


def _edit_config(path, **changes):
    file = os.path.join(path, "adapter_config.json")
    with open(file) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(file, "w") as f:
        json.dump(cfg, f)


def _edit_tensors(path, edit):
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = {k: np.array(v) for k, v in _safetensors.load(file).items()}
    edit(tensors)
    _safetensors.save(file, tensors)


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


REJECTIONS = {
    # case -> (how to break a good adapter, words the error must contain)
    "dora": (lambda p: _edit_config(p, use_dora=True), "use_dora"),
    "modules_to_save": (lambda p: _edit_config(p, modules_to_save=["lm_head"]), "modules_to_save"),
    "bias": (lambda p: _edit_config(p, bias="lora_only"), "bias"),
    "lora_bias": (lambda p: _edit_config(p, lora_bias=True), "lora_bias"),
    "not_lora": (lambda p: _edit_config(p, peft_type="IA3"), "peft_type"),
    "bad_r": (lambda p: _edit_config(p, r=0), "r must be"),
    "lm_head": (lambda p: _edit_tensors(p, _set("base_model.model.lm_head.lora_A.weight",
                                                np.ones((8, 64), np.float32))), "lm_head"),
    "embeddings": (lambda p: _edit_tensors(p, _set(
        "base_model.model.model.embed_tokens.lora_embedding_A", np.ones((8, 256), np.float32))),
        "embeddings"),
    "rank_over_limit": (lambda p: write_random_adapter(
        p, carajax.ModelConfig.from_name("llama-test"), rank=32), "max_lora_rank=16"),
    "wrong_shape": (lambda p: _edit_tensors(p, _set(Q_A, np.ones((8, 65), np.float32))),
                    "lora_A [r, 64]"),
    "rank_mismatch_with_config": (lambda p: _edit_config(p, r=4), "rank 8"),
    "missing_pair": (lambda p: _edit_tensors(p, lambda t: t.pop(Q_B)), "not its pair"),
    "int_dtype": (lambda p: _edit_tensors(p, _set(Q_A, np.ones((8, 64), np.int32))), "dtype"),
    "nan": (lambda p: _edit_tensors(p, _set(Q_A, np.full((8, 64), np.nan, np.float32))),
            "non-finite"),
    "layer_out_of_range": (lambda p: _edit_tensors(p, lambda t: t.update({
        k.replace("layers.0.", "layers.7."): v for k, v in list(t.items())})), "layer 7"),
    "untargeted_module": (lambda p: _edit_config(p, target_modules=["v_proj"]),
                          "not in target_modules"),
    "missing_weights": (lambda p: os.remove(os.path.join(p, "adapter_model.safetensors")),
                        "missing adapter_model.safetensors"),
    "missing_config": (lambda p: os.remove(os.path.join(p, "adapter_config.json")),
                       "missing adapter_config.json"),
    "corrupt_config": (lambda p: open(os.path.join(p, "adapter_config.json"), "w").write("{r: 8"),
                       "corrupt JSON"),
    "corrupt_weights": (lambda p: open(os.path.join(p, "adapter_model.safetensors"), "wb").write(
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"), "corrupt"),
    "truncated_weights": (lambda p: os.truncate(os.path.join(p, "adapter_model.safetensors"), 200),
                          "corrupt"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_rejected_with_a_clear_error_and_engine_keeps_serving(engine, good, case):
    before = engine.generate([PROMPT], adapters=[None], sampling=SAMPLING)[0].token_ids
    breaker, words = REJECTIONS[case]
    breaker(good)
    with pytest.raises(carajax.AdapterError, match=None) as err:
        engine.add_adapter(f"bad-{case}", good)
    assert words in str(err.value), str(err.value)
    assert f"bad-{case}" not in engine.adapters  # nothing half-registered
    with pytest.raises(carajax.AdapterError, match="unknown adapter"):
        engine.generate([PROMPT], adapters=[f"bad-{case}"], sampling=SAMPLING)
    assert engine.generate([PROMPT], adapters=[None], sampling=SAMPLING)[0].token_ids == before


def test_adapter_error_is_a_value_error():
    assert issubclass(carajax.AdapterError, ValueError)


def test_good_adapter_registers_and_changes_output(engine, good, tiny_config):
    adapter = engine.add_adapter("good", good)
    try:
        assert adapter.rank == 8 and adapter.target_modules == ("q_proj", "k_proj", "v_proj",
                                                                  "o_proj")
        assert len(adapter.modules) == tiny_config.num_layers * 4
        assert adapter.modules[(1, "k_proj")].scale == 16 / 8  # alpha 2r / r
        base = engine.logits(PROMPT)
        with_lora = engine.logits(PROMPT, adapter="good")
        assert np.abs(base - with_lora).max() > 1e-3
        with pytest.raises(carajax.AdapterError, match="already registered"):
            engine.add_adapter("good", good)
    finally:
        engine.remove_adapter("good")
    assert "good" not in engine.adapters


def test_key_names_with_adapter_name_segment(tmp_path, tiny_config, engine):
    """Older PEFT and some tools keep the adapter name: `...q_proj.lora_A.default.weight`."""
    plain = write_random_adapter(tmp_path / "plain", tiny_config, rank=4, seed=9)
    named = write_random_adapter(tmp_path / "named", tiny_config, rank=4, seed=9)
    _edit_tensors(named, lambda t: t.update(
        {k.replace(".weight", "").replace("lora_A", "lora_A.default").replace(
            "lora_B", "lora_B.default") + ".weight": t.pop(k) for k in list(t)}))
    assert all(".default." in k for k in _safetensors.load(
        os.path.join(named, "adapter_model.safetensors")))
    a = carajax.load_adapter(plain, tiny_config, max_rank=64)
    b = carajax.load_adapter(named, tiny_config, max_rank=64)
    assert a.modules.keys() == b.modules.keys()
    for key in a.modules:
        np.testing.assert_array_equal(a.modules[key].a, b.modules[key].a)
        np.testing.assert_array_equal(a.modules[key].b, b.modules[key].b)


def test_bfloat16_adapter_weights_load(tmp_path, tiny_config):
    import ml_dtypes

    path = write_random_adapter(tmp_path / "bf16", tiny_config, rank=2, seed=1)
    _edit_tensors(path, lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))
    adapter = carajax.load_adapter(path, tiny_config, max_rank=8)
    m = adapter.modules[(0, "q_proj")]
    assert m.a.dtype == np.float32 and np.abs(m.a).sum() > 0


def test_more_adapters_than_slots_all_serve_correctly(engine, tmp_path, tiny_config):
    """With 4 device slots, 6 adapters still each give their own output (LRU slot reuse)."""
    names = [f"lru{i}" for i in range(6)]
    for i, name in enumerate(names):
        engine.add_adapter(name, write_random_adapter(tmp_path / name, tiny_config,
                                                      rank=1 + 2 * i, seed=100 + i))
    try:
        alone = {n: engine.logits(PROMPT, adapter=n) for n in names}
        mixed = engine.generate([PROMPT] * 12, adapters=names * 2, sampling=SAMPLING)
        for name, out in zip(names * 2, mixed):
            first = int(np.argmax(alone[name][-1]))
            assert out.token_ids[0] == first
        # 4 device slots: the 4 most recently used adapters stay.
        assert set(engine.pool.stats()["on_device"]) == set(names[2:])
        # Logits recomputed after all the slot churn equal the first ones.
        for name in names:
            np.testing.assert_allclose(engine.logits(PROMPT, adapter=name), alone[name],
                                       rtol=1e-6, atol=1e-6)
    finally:
        for name in names:
            engine.remove_adapter(name)
