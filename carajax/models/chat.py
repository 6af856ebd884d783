"""Chat templates: a checkpoint's Jinja template, rendered as `transformers` renders it.

    template = load_chat_template("/ckpt/llama-3-8b-instruct", tokenizer)   # or None
    text = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = tokenizer.encode(template.prompt_text(messages))      # what the engine is sent

Where the template comes from (as `transformers` looks for it): `chat_template.jinja` beside the
tokenizer, else `chat_template` in `tokenizer_config.json` (a string, or a list of named templates
of which "default" is used); in a GGUF file, `tokenizer.chat_template` in its metadata.
Checkpoints without one have no chat; the byte tokenizer of the built-in models gets
`BYTE_CHAT_TEMPLATE`.

Rendering matches `PreTrainedTokenizerBase.apply_chat_template(..., tokenize=False)`: the same
sandboxed Jinja environment (`ImmutableSandboxedEnvironment`, trim_blocks, lstrip_blocks,
loopcontrols; `raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape, `dict` and
an underscore-refusing `namespace`), the checkpoint's special tokens (`bos_token`, `eos_token`, ...)
as variables, and message keys whose value is None dropped. Chat templates are code from whoever
published the checkpoint; the sandbox is what keeps them from reaching Python internals.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The built-in models' prompt is `word=` after the byte tokenizer's STX (carajax/demo/tasks.py;
# models/ does not import the demo, tests/test_chat.py checks they agree). A chat maps to that
# prompt: the last user message, trimmed, then "=" as the generation prompt. One turn only: the
# demo model was never trained on conversations.
BYTE_CHAT_TEMPLATE = (
    "{%- set users = messages | selectattr('role', 'equalto', 'user') | list -%}"
    "{%- if not users %}{{ raise_exception('the conversation has no user message') }}{% endif -%}"
    "{{ users[-1]['content'] | trim }}"
    "{%- if add_generation_prompt %}={% endif -%}"
)
# tokenizer_config.json keys that `transformers` passes to templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its `raise_exception`) or failed to render."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special tokens it may read (`{{ bos_token }}`, ...)."""

    source: str
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Whether the engine's tokenizer puts BOS in front of every encoding itself (Llama's do; the
    # ChatML ones such as SmolLM2's do not, and their bos_token `<|im_start|>` is the template's
    # own first token, which must then stay in the text).
    tokenizer_adds_bos: bool = True

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, documents: list[dict] | None = None,
               **kwargs) -> str:
        """The conversation as text, exactly as `apply_chat_template(tokenize=False)` renders it;
        `kwargs` are extra template variables (vLLM's `chat_template_kwargs`)."""
        import jinja2

        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        try:
            return _compile(self.source).render(
                messages=chat, tools=tools, documents=documents,
                add_generation_prompt=add_generation_prompt, **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:  # raise_exception, syntax, sandbox violations
            raise ChatTemplateError(f"chat template: {e}") from None

    def prompt_text(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    **kwargs) -> str:
        """The rendered conversation as the engine's tokenizer should read it, so the ids come out
        as `apply_chat_template(tokenize=True)` makes them: without a leading BOS where the
        tokenizer adds BOS itself (as its post-processor says: one BOS, not two), as rendered
        where it does not."""
        text = self.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        bos = self.special_tokens.get("bos_token")
        strip = self.tokenizer_adds_bos and bos and text.startswith(bos)
        return text[len(bos):] if strip else text


def load_chat_template(path: str | os.PathLike | None, tokenizer=None) -> ChatTemplate | None:
    """The chat template of the checkpoint at `path` (see the module docstring); for a byte
    tokenizer without one, `BYTE_CHAT_TEMPLATE`; else None (the model has no chat)."""
    config: dict = {}
    source = None
    if path is not None and os.fspath(path).endswith(".gguf"):  # the template is metadata
        from carajax.models import gguf

        config = gguf.read(path).tokenizer_config
        source = config.get("chat_template")
    elif path is not None:
        folder = Path(path)
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        if (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        else:
            source = _pick(config.get("chat_template"))
    if source is None:
        from carajax.models.tokenizer import ByteTokenizer

        if not isinstance(tokenizer, ByteTokenizer):
            return None
        source = BYTE_CHAT_TEMPLATE
        config = {"bos_token": "\x02", "eos_token": "\x03"}  # STX, ETX: the byte tokenizer's
    special = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
    return ChatTemplate(source, special, tokenizer_adds_bos=_adds_bos(tokenizer))


def _adds_bos(tokenizer) -> bool:
    """Whether `tokenizer` starts every encoding with its BOS (no tokenizer: assume it does,
    as Llama's do)."""
    if tokenizer is None or getattr(tokenizer, "bos_id", None) is None:
        return tokenizer is None
    ids = tokenizer.encode("")
    return bool(ids) and ids[0] == tokenizer.bos_id


def _pick(templates) -> str | None:
    """`chat_template` as tokenizer_config.json stores it: a string or [{name, template}, ...]."""
    if templates is None or isinstance(templates, str):
        return templates
    named = {t["name"]: t["template"] for t in templates}
    if "default" not in named:
        raise ChatTemplateError(f"tokenizer_config.json has chat templates {sorted(named)} and no "
                                "'default'")
    return named["default"]


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: "<s>" or {"content": "<s>", ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """The template compiled in `transformers`' sandboxed environment (see the module docstring)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers): rendered as their body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """Refuses underscore attributes, as transformers' does: no reach into CPython internals."""

        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")

    class TemplateDict:
        """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the type."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, > and & for HTML; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, dict=TemplateDict(), namespace=Namespace,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse: {e}") from None
