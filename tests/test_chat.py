"""Chat templates render exactly as `transformers.AutoTokenizer.apply_chat_template` renders them
(the oracle), from both places a checkpoint keeps its template; the sandbox holds; the byte
tokenizer's template maps a chat to the demo model's prompt."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from carajax import demo
from carajax.models.chat import BYTE_CHAT_TEMPLATE, ChatTemplateError, load_chat_template
from carajax.models.tokenizer import ByteTokenizer

# Shipped with the test: the features real templates use. bos_token, a system message taken
# apart, raise_exception on a bad role order, loop controls, namespace, tojson on non-ASCII and
# HTML characters (transformers' tojson does not escape them), {% generation %} markers, a
# template variable passed through (`reasoning`), and add_generation_prompt.
TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(system='', turns=0) -%}
{%- if messages[0]['role'] == 'system' -%}
  {%- set ns.system = messages[0]['content'] -%}
  {%- set messages = messages[1:] -%}
{%- endif -%}
{%- if ns.system %}<<SYS>>{{ ns.system | trim }}<</SYS>>
{% endif -%}
{%- for message in messages -%}
  {%- if message['role'] == 'tool' %}{% continue %}{% endif -%}
  {%- if (message['role'] == 'user') != (ns.turns % 2 == 0) -%}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- endif -%}
  {%- set ns.turns = ns.turns + 1 -%}
  {%- if message['role'] == 'user' -%}
[INST] {{ message['content'] | trim }}{% if message.name is defined %} ({{ message.name }}){% endif %} [/INST]
  {%- else %} {% generation %}{{ message['content'] | trim }}{% endgeneration %} {{ eos_token }}
  {% endif -%}
{%- endfor -%}
{%- if reasoning is defined and reasoning %}{{ {'mode': 'think', 'note': 'é<&>'} | tojson }}{% endif -%}
{%- if add_generation_prompt %} [ASSISTANT]{% endif -%}"""

CHATS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi", "name": "ana"},
     {"role": "assistant", "content": "Hello!"}, {"role": "tool", "content": "ignored"},
     {"role": "user", "content": "Ça va? <b>&</b>", "name": None}],  # a None key is dropped
]


def _checkpoint(tmp_path, style: str):
    """A tokenizer directory keeping TEMPLATE where `style` says: inline in tokenizer_config.json
    (older checkpoints; special tokens as AddedToken dicts) or in chat_template.jinja (newer)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "Hello": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
              "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True, "lstrip": False,
                            "rstrip": False, "normalized": False, "single_word": False},
              "eos_token": "</s>"}
    if style == "inline":
        config["chat_template"] = TEMPLATE
    else:
        (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("style", ["inline", "jinja_file"])
def test_renders_as_transformers_does(tmp_path, style):
    from transformers import AutoTokenizer

    path = _checkpoint(tmp_path, style)
    ours, theirs = load_chat_template(path), AutoTokenizer.from_pretrained(str(path))
    assert ours.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    for chat in CHATS:
        for gen in (True, False):
            for extra in ({}, {"reasoning": True}):
                want = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen,
                                                  **extra)
                assert ours.render(chat, add_generation_prompt=gen, **extra) == want
    # Spot-check the oracle did what the template says (so equality is not vacuous).
    text = ours.render(CHATS[1], add_generation_prompt=True, reasoning=True)
    assert text.startswith("<s><<SYS>>Be brief.<</SYS>>\n[INST] Hi (ana) [/INST] Hello! </s>")
    assert '"é<&>"' in text and text.endswith(" [ASSISTANT]") and "ignored" not in text
    # The engine's tokenizer adds BOS itself: the prompt text leaves the template's out.
    assert ours.prompt_text(CHATS[0]) == "[INST] Hello there [/INST] [ASSISTANT]"


def test_template_errors_are_chat_template_errors(tmp_path):
    template = load_chat_template(_checkpoint(tmp_path, "inline"))
    with pytest.raises(ChatTemplateError, match="must alternate"):
        template.render([{"role": "assistant", "content": "first?"}])
    # The sandbox: no way from a template to Python internals.
    evil = type(template)("{{ messages.__class__.__mro__[1].__subclasses__() }}", {})
    with pytest.raises(ChatTemplateError):
        evil.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        type(template)("{% set ns = namespace() %}{% set ns._x = 1 %}", {}).render([])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        type(template)("{% if %}", {}).render([])


def test_named_templates_use_the_default(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]}))
    assert load_chat_template(tmp_path).render([]) == "plain"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}]}))
    with pytest.raises(ChatTemplateError, match="no 'default'"):
        load_chat_template(tmp_path)


def test_no_template_means_no_chat(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert load_chat_template(tmp_path, tokenizer=object()) is None
    assert load_chat_template(None, tokenizer=None) is None


@pytest.mark.parametrize("word", ["hello", "carajax", "serving"])
def test_byte_template_maps_a_chat_to_the_demo_prompt(word):
    template = load_chat_template(None, ByteTokenizer())  # the demo checkpoint has no template
    assert template.source == BYTE_CHAT_TEMPLATE
    chat = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "x"}, {"role": "user", "content": f" {word}\n"}]
    assert template.prompt_text(chat) == demo.prompt(word)  # "hello=": the last user message
    assert ByteTokenizer().encode(template.prompt_text(chat)) == ByteTokenizer().encode(demo.prompt(word))
    with pytest.raises(ChatTemplateError, match="no user message"):
        template.render([{"role": "system", "content": "only"}])


class _Tokenizer:
    """Characters as ids, after a BOS (id 1) only where `adds_bos`: what a tokenizer's
    post-processor decides (Llama's adds one; SmolLM2's ChatML one does not)."""

    bos_id = 1

    def __init__(self, adds_bos: bool):
        self.adds_bos = adds_bos

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] * self.adds_bos + [ord(c) for c in text]


@pytest.mark.parametrize("adds_bos", [True, False])
def test_a_bos_the_tokenizer_does_not_add_stays_in_the_prompt(tmp_path, adds_bos):
    # SmolLM2's bos_token is "<|im_start|>", the template's own first token: cut from the text,
    # it would be lost from the prompt, since its tokenizer adds no BOS back.
    chatml = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "chat_template": chatml}))
    template = load_chat_template(tmp_path, _Tokenizer(adds_bos))
    rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert template.render([{"role": "user", "content": "Hi"}]) == rendered
    text = template.prompt_text([{"role": "user", "content": "Hi"}])
    assert text == (rendered.removeprefix("<|im_start|>") if adds_bos else rendered)
    # Either way the ids start with exactly one "<|im_start|>" (as BOS or as text), then "user".
    ids = _Tokenizer(adds_bos).encode(text)
    start = [1] if adds_bos else [ord(c) for c in "<|im_start|>"]
    assert ids[:len(start)] == start
    assert ids[len(start):len(start) + 5] == [ord(c) for c in "user\n"]
