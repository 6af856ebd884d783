"""carajax's Llama + LoRA against Hugging Face `transformers` + `peft` on random models."""

from __future__ import annotations

import jax
import numpy as np

# The reference stack is a test dependency (pyproject's `test` extra): missing, this module fails
# at import (an error in CI), never a silent skip.
import peft  # noqa: F401
import pytest

import carajax
from carajax.testing import run_chunks
from tests.conftest import assert_close, rel_error
from tests.hf_reference import ADAPTERS, MODELS, NEW_TOKENS, build_case


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request, tmp_path_factory):
    return build_case(request.param, str(tmp_path_factory.mktemp("hf")))


@pytest.fixture(scope="module")
def engine(case):
    engine = carajax.Engine.from_pretrained(case.model_dir, dtype="float32")
    for name, path in case.adapter_dirs.items():
        engine.add_adapter(name, path)
    return engine


def test_config_read_from_hf(case, engine):
    hf = MODELS[case.name]
    c = engine.model_config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size) == (
        hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
        hf["num_key_value_heads"], hf["vocab_size"])
    assert c.tie_word_embeddings == hf.get("tie_word_embeddings", False)
    assert (c.rope_scaling is not None) == ("rope_scaling" in hf)


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_logits_match_hf(case, engine, adapter):
    ours = engine.logits(case.tokens.tolist(), adapter=adapter)
    assert ours.shape == case.logits[adapter].shape
    assert_close(ours, case.logits[adapter], "float32")


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_greedy_generate_matches_hf(case, engine, adapter):
    sampling = carajax.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    (out,) = engine.generate([case.tokens.tolist()], adapters=[adapter], sampling=sampling)
    assert out.token_ids == case.greedy[adapter]
    assert out.finish_reason == "length"


def test_mixed_prefill_and_decode_step_matches_hf(case, engine):
    """One flattened step: a decode token and a prefill chunk resuming mid-prompt and a fresh
    prompt, each with another adapter (and the base): every sequence's logits at its last token
    equal HF PEFT's at that position."""
    toks, names = case.tokens.tolist(), [None, *ADAPTERS]
    reqs = [engine._make_request(toks, n, None, None) for n in names]
    T = len(toks)
    # Before: request 0 holds T - 1 tokens (it decodes the last), request 1 holds 3.
    run_chunks(engine, [(reqs[0], 0, T - 1), (reqs[1], 0, 3)])
    plan = [(reqs[0], T - 1, 1), (reqs[1], 3, T - 3)] + [(r, 0, T) for r in reqs[2:]]
    logits = run_chunks(engine, plan)
    for row, name in zip(logits, names):
        assert_close(row, case.logits[name][-1], "float32")
    for r in reqs:
        engine.planner.pages.free(r)


def test_mixed_adapters_in_one_generate_call(case, engine):
    """Each request keeps its own adapter when several are served by one engine."""
    names = [None, *ADAPTERS]
    sampling = carajax.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    outs = engine.generate([case.tokens.tolist()] * len(names), adapters=names, sampling=sampling)
    assert [o.token_ids for o in outs] == [case.greedy[n] for n in names]


def test_adapter_scaling_follows_peft(case, engine):
    """rsLoRA scales by alpha/sqrt(r); patterns override r and alpha per module."""
    rs = engine.adapters["rslora_r1"]
    assert {(layer, m) for layer, m in rs.modules} == {(0, "q_proj"), (0, "v_proj"),
                                                       (0, "gate_proj")}
    assert rs.modules[(0, "q_proj")].scale == pytest.approx(4 / np.sqrt(1))
    pat = engine.adapters["all_r16_patterns"]
    assert pat.modules[(0, "q_proj")].rank == 1 and pat.modules[(0, "q_proj")].scale == 32.0
    assert pat.modules[(0, "down_proj")].rank == 4
    assert pat.modules[(0, "down_proj")].scale == pytest.approx(32 / 4)
    assert pat.modules[(0, "v_proj")].scale == pytest.approx(8 / 16)
    assert pat.modules[(0, "up_proj")].scale == pytest.approx(32 / 16)


# One model each: the float32 tests above cover every config; these two re-run a whole engine
# for what does not depend on it (bfloat16 rounding, the kernels' wiring).
@pytest.mark.parametrize("case", ["llama3_rope"], indirect=True)
def test_bfloat16_within_tolerance(case):
    engine = carajax.Engine.from_pretrained(case.model_dir, dtype="bfloat16")
    engine.add_adapter("attn_r8", case.adapter_dirs["attn_r8"])
    for adapter in (None, "attn_r8"):
        ours = engine.logits(case.tokens.tolist(), adapter=adapter)
        assert ours.dtype == np.float32
        assert_close(ours, case.logits[adapter], "bfloat16")
        # ... and bfloat16 is really in use: it is not float32-exact.
        assert rel_error(ours, case.logits[adapter]) > 1e-5


@pytest.mark.parametrize("case", ["gqa"], indirect=True)
def test_pallas_kernels_wired_into_the_model_match_hf(case):
    """The same checks with the Pallas kernels in the LoRA hook (interpret mode here; compiled
    on a GPU, where "auto" picks them): prefill goes through sgmv, decode through bgmv."""
    impl = "pallas" if jax.default_backend() == "gpu" else "interpret"
    engine = carajax.Engine.from_pretrained(case.model_dir,
                                            config=carajax.EngineConfig(lora_impl=impl))
    engine.add_adapter("all_r16_patterns", case.adapter_dirs["all_r16_patterns"])
    assert engine.runner.lora_impl == impl
    assert_close(engine.logits(case.tokens.tolist(), adapter="all_r16_patterns"),
                 case.logits["all_r16_patterns"], "float32")
    sampling = carajax.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    (out,) = engine.generate([case.tokens.tolist()], adapters=["all_r16_patterns"],
                             sampling=sampling)
    assert out.token_ids == case.greedy["all_r16_patterns"]
