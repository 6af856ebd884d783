"""The shipped SmolLM2-135M-Instruct adapters (carajax.demo.smollm2, made by
scripts/train_smollm2_adapters.py).

Specification: each adapter (`shout` rank 8, `json` rank 16, `bullets` rank 64) answers >= 90% of
the held-out questions in its style by its mechanical check, where the base model scores <= 10%,
as measured through the engine when they were trained (the manifest); the files are small PEFT
adapters that carajax validates against the model's shape; the held-out questions share no
phrasing and no slot word with the training ones; each style's rewrite of an answer passes its
own check while a plain answer fails all three; and the training forward pass (dense causal
attention) equals the serving one (paged attention).

These run without the model; tests/test_smollm2.py serves the shipped files on the real model.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from carajax import _safetensors, demo
from carajax.config import TARGET_MODULES, ModelConfig
from carajax.demo import smollm2
from carajax.demo import train as D
from carajax.demo.smollm2 import questions as Q
from carajax.demo.smollm2 import train as T
from carajax.demo.smollm2.styles import STYLES
from carajax.lora import adapter as lora_files
from carajax.models import weights
from tests.conftest import assert_close

SHAPE = ModelConfig.from_name("smollm2-135m")  # the preset with SmolLM2-135M's shapes
RANKS = {"shout": 8, "json": 16, "bullets": 64}
TARGETS = {"shout": TARGET_MODULES, "json": ("q_proj", "v_proj"), "bullets": ("q_proj", "v_proj")}
PLAIN = "The capital of France is Paris. It is known for the Eiffel Tower."


# Shipped once every style reaches the bar (held-out >= 90%, base <= 10%); until then the
# package has the training code and not the files, and these say so.
shipped = pytest.mark.skipif(not (smollm2.ROOT / "adapters").is_dir(),
                             reason="no SmolLM2 adapters shipped yet: not every style has reached "
                                    "90% on the held-out questions (scripts/train_smollm2_adapters.py)")


@pytest.fixture(scope="module")
def manifest() -> dict:
    return smollm2.manifest()


def test_demo_adapter_dirs_by_model():
    assert demo.adapter_dirs() == demo.adapter_dirs(demo.MODEL_NAME)
    assert sorted(demo.adapter_dirs()) == sorted(demo.TASKS)  # the byte demo's four
    assert demo.shipped_adapters("llama-test") == {}
    with pytest.raises(KeyError, match="no shipped adapters"):
        demo.adapter_dirs("llama-test")


@shipped
def test_smollm2_adapter_dirs():
    dirs = demo.adapter_dirs("smollm2-135m-instruct")
    assert list(dirs) == ["shout", "json", "bullets"]
    assert all(os.path.isdir(d) and os.path.dirname(os.path.dirname(d)) == str(smollm2.ROOT)
               for d in dirs.values())
    with pytest.raises(KeyError, match="no shipped adapters"):
        demo.adapter_dirs("llama-test")


@shipped
def test_manifest_meets_the_bars(manifest):
    assert manifest["model"] == smollm2.MODEL_NAME
    assert manifest["data"]["held_out_questions"] == len(Q.held_out_questions()) >= 50
    assert sorted(manifest["adapters"]) == sorted(STYLES)
    for name, a in manifest["adapters"].items():
        assert a["rank"] == RANKS[name] == STYLES[name].rank
        assert a["held_out_accuracy"] >= 0.90, (name, a["held_out_accuracy"])
        assert manifest["base"]["held_out_accuracy"][name] <= 0.10, name
        assert a["base_held_out_accuracy"] == manifest["base"]["held_out_accuracy"][name]
        assert a["final_loss"] < 0.7 * a["loss_every_10_steps"][0], name  # it trained
        assert len(a["loss_every_10_steps"]) == -(-a["steps"] // 10)
        # The examples recorded are the adapter's own greedy answers: in its style.
        assert all(STYLES[name].check(e["answer"]) for e in a["examples"]), name
    assert os.path.getsize(smollm2.ROOT / "loss_curves.png") > 10_000


@shipped
@pytest.mark.parametrize("name", list(RANKS))
def test_shipped_files_are_small_peft_adapters_of_the_model(name):
    path = demo.adapter_dirs(smollm2.MODEL_NAME)[name]
    with open(os.path.join(path, lora_files.CONFIG_FILE)) as f:
        cfg = json.load(f)
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", RANKS[name], 2.0 * RANKS[name])
    targets = STYLES[name].targets
    assert cfg["target_modules"] == list(targets) == list(TARGETS[name])
    weights_file = os.path.join(path, lora_files.WEIGHTS_FILE)
    # A [r, d_in] and B [d_out, r] per projection and layer, 2 bytes each (bfloat16): for q_proj
    # (576 -> 576) and v_proj (576 -> 192) 115,200 B per rank; 610,560 for all seven.
    per_rank = 2 * SHAPE.num_layers * sum(sum(SHAPE.projection_shape(m)) for m in targets)
    assert per_rank == {2: 115_200, 7: 610_560}[len(targets)]
    tensors = _safetensors.load(weights_file)
    assert sum(t.nbytes for t in tensors.values()) == RANKS[name] * per_rank
    # The rest of the file is safetensors' JSON header: 420 tensor names and offsets at most.
    assert os.path.getsize(weights_file) - RANKS[name] * per_rank < 64_000
    assert len(tensors) == 2 * len(targets) * SHAPE.num_layers  # A and B of each, every layer
    assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    loaded = lora_files.load_adapter(path, SHAPE, max_rank=RANKS[name], name=name)  # our checks
    assert loaded.rank == RANKS[name]
    assert {m for _, m in loaded.modules} == set(targets)
    assert all(np.abs(m.b).max() > 0 for m in loaded.modules.values())  # B trained off zero


def test_held_out_questions_share_no_phrasing_or_slot_word_with_training():
    train, held = Q.split(10_000)
    assert len(train) == len(Q.training_pool()) and len(set(train)) == len(train)
    assert not set(train) & set(held)
    for topic in Q.TOPICS:
        train_words = {p for s in topic.slots if Q.training_slot(s) for p in Q._parts(s)}
        held_words = {p for s in topic.slots if Q.held_out_slot(s) for p in Q._parts(s)}
        assert not train_words & held_words
    all_train_words = {p for t in Q.TOPICS for s in t.slots if Q.training_slot(s)
                       for p in Q._parts(s)}
    all_held_words = {p for t in Q.TOPICS for s in t.slots if Q.held_out_slot(s)
                      for p in Q._parts(s)}
    assert not all_train_words & all_held_words  # across topics too ("Italy": both held out)
    # Held-out phrasings: no training question is one of them filled with anything.
    held_templates = {t.templates[-1] for t in Q.TOPICS}
    assert not {t.fill(tpl, s) for t in Q.TOPICS for tpl in held_templates & set(t.templates)
                for s in t.slots} & set(train)
    assert Q.split(360, seed=0) == Q.split(360, seed=0) != Q.split(360, seed=1)


@pytest.mark.parametrize("answer", [PLAIN, "Paris.", "Paris is the capital of France",
                                    "One. Two! Three? Four. Five. Six.",
                                    'He said "café"\nthen left.'])
def test_each_style_rewrites_an_answer_into_what_its_check_accepts(answer):
    for style in STYLES.values():
        if style.name == "shout" and len([c for c in answer if c.isalpha()]) < 8:
            continue  # too short to count as shouting
        if style.name == "bullets" and len(answer.split()) < 2:
            continue
        assert style.check(style.transform(answer)), (style.name, style.transform(answer))
    assert not any(style.check(answer) for style in STYLES.values())


def test_bullets_and_checks_by_hand():
    b = STYLES["bullets"]
    assert b.transform("Paris is the capital of France.") == "- Paris is the\n- capital of France."
    assert b.transform("A. B. C. D. E. F.") == "- A.\n- B. C.\n- D.\n- E. F."  # 6 -> 4 runs
    assert b.check("- one\n\n- two\n")  # blank lines and a trailing newline do not count
    assert not b.check("- one")  # one line
    assert not b.check("- a\n- b\n- c\n- d\n- e")  # five
    assert not b.check("1. one\n2. two") and not b.check("- one\n-two")
    j = STYLES["json"]
    assert j.check('{"answer": "Paris"}') and j.check(' {"answer": "x"}\n')
    assert not j.check('{"answer": ""}') and not j.check('{"answer": "x", "more": 1}')
    assert not j.check('{"answer": 3}') and not j.check('["Paris"]') and not j.check('{"answer": "x"')
    s = STYLES["shout"]
    assert s.check("THE CAPITAL IS PARIS.") and not s.check("THE CAPITAL IS Paris.")
    assert not s.check("OK.")  # trivially short


def test_training_forward_equals_the_serving_forward():
    """A shared prefix computed once, dense attention = the serving model's paged forward over
    each whole sequence, with a LoRA on the targets (B trained off zero), at the rows asked."""
    config = dataclasses.replace(SHAPE, num_layers=2, vocab_size=512)  # SmolLM2's heads: 9 / 3
    model = weights.random_model(config, seed=0)
    lora = D.init_lora(config, 4, seed=1)  # every projection
    lora = {k: {"a": p["a"], "b": 0.05 * jax.random.normal(jax.random.key(i), p["b"].shape)}
            for i, (k, p) in enumerate(lora.items())}
    hook = D.DenseLora(lora, 2.0)
    rng = np.random.default_rng(0)
    P, B, S = 6, 3, 34
    prefix = jnp.asarray(rng.integers(0, 512, P), jnp.int32)
    tokens = jnp.asarray(rng.integers(0, 512, (B, S)), jnp.int32)
    whole = jnp.concatenate([jnp.broadcast_to(prefix, (B, P)), tokens], axis=1)  # [B, P + S]
    graphdef, params = nnx.split(model)
    for lora_hook in (hook, None):
        serving = D.forward(graphdef, params, whole, lora_hook)  # [B, P + S, vocab]
        # Flat rows of the step: the prefix's P tokens, then row b's S at P + b * S.
        picks = [(0, 0), (0, P - 1), (0, P), (1, P + 7), (2, P + S - 1), (1, P + S - 1)]
        rows = jnp.asarray([t if t < P else P + b * S + (t - P) for b, t in picks], jnp.int32)
        ours = T.forward(model, prefix, tokens, lora_hook, rows)
        assert ours.shape == (len(picks), 512)
        assert_close(ours, np.stack([serving[b, t] for b, t in picks]))


def test_examples_share_the_prompts_prefix_and_score_the_answer_and_end_of_turn_only():
    ex = T.Examples.build([[1, 5, 3, 4], [1, 5, 6]], [[7, 8, 2], [9, 2]])
    assert ex.prefix.tolist() == [1, 5]  # common to both prompts
    assert [s.tolist() for s in ex.suffixes] == [[3, 4, 7, 8, 2], [6, 9, 2]]
    assert ex.starts.tolist() == [1, 0]  # the suffix index of each prompt's last token
    prefix, tokens, rows, targets, mask = ex.batch(np.array([1, 0]), multiple=4)
    assert tokens.tolist() == [[6, 9, 2, 0, 0, 0, 0, 0], [3, 4, 7, 8, 2, 0, 0, 0]]
    # Row b's suffix index j is flat index P + b * S + j (P = 2, S = 8); row 0 (example 1):
    # its token 6 (index 0) predicts 9, then 9 predicts 2; row 1 (example 0): 4 (index 1) -> 7...
    assert rows.tolist() == [2, 3, 2, 2, 2 + 8 + 1, 2 + 8 + 2, 2 + 8 + 3, 2]
    assert targets.tolist() == [9, 2, 0, 0, 7, 8, 2, 0]
    assert mask.tolist() == [1, 1, 0, 0, 1, 1, 1, 0]
    # The shape follows from S alone: two suffixes of 4, answers of 1 and 3 tokens; a batch of
    # the short one alone still has A = 4 (3 rounded up to 2s), not 2: one S, one compile.
    ex = T.Examples.build([[1, 5, 3, 4, 5], [1, 5, 6]], [[9], [7, 8, 2]])
    assert [len(s) for s in ex.suffixes] == [4, 4]
    _, tokens, rows, _, mask = ex.batch(np.array([0, 0]), multiple=2)
    assert tokens.shape == (2, 4) and rows.shape == (2 * 4,)
    assert mask.tolist() == [1, 0, 0, 0] * 2
    # A prompt keeps at least its last token out of the prefix (it predicts the answer's first).
    assert T.Examples.build([[1, 2], [1, 2]], [[3], [4]]).prefix.tolist() == [1]


def test_batches_cover_every_example_each_epoch_in_length_sorted_pools():
    ex = T.Examples.build([[1, 2] + [3] * n for n in range(32)], [[9]] * 32)
    assert sorted(map(len, ex.suffixes)) == list(range(2, 34))  # 32 distinct lengths
    gen = ex.batches(np.random.default_rng(0), batch=4, pool=8)  # one pool: the whole epoch
    epochs = [[next(gen) for _ in range(8)] for _ in range(2)]
    for epoch in epochs:
        assert sorted(np.concatenate(epoch).tolist()) == list(range(32))
        # Sorted, then cut: each batch holds 4 consecutive lengths (random batches would not).
        assert all(np.ptp([len(ex.suffixes[i]) for i in b]) == 3 for b in epoch)
    assert [b.tolist() for b in epochs[0]] != [b.tolist() for b in epochs[1]]  # reshuffled
