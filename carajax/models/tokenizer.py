"""Tokenizers: HF `tokenizers` for real checkpoints, bytes for the built-in test model."""

from __future__ import annotations

import os
from typing import Protocol

from carajax.config import ModelConfig


class Tokenizer(Protocol):
    bos_id: int | None
    eos_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """One token per UTF-8 byte (vocab 256). Text starts with STX (2); ETX (3) ends it."""

    bos_id = 2
    eos_ids = (3,)

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i for i in ids if i not in (self.bos_id, *self.eos_ids))
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` loaded with HF `tokenizers` (adds BOS as its post-processor says), or
    a `tokenizers.Tokenizer` built already (a GGUF file's)."""

    def __init__(self, path_or_tokenizer, config: ModelConfig):
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = (path_or_tokenizer if isinstance(path_or_tokenizer, _Tokenizer)
                     else _Tokenizer.from_file(path_or_tokenizer))
        self.bos_id = config.bos_token_id
        self.eos_ids = config.eos_token_ids

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str | None, config: ModelConfig) -> Tokenizer | None:
    """The checkpoint's `tokenizer.json` if it has one (a GGUF file: the one its metadata
    describes); bytes for a 256-token vocab; else None."""
    if path is not None and os.fspath(path).endswith(".gguf"):
        from carajax.models import gguf

        tok = gguf.read(path).tokenizer()
        return None if tok is None else HFTokenizer(tok, config)
    if path is not None:
        file = os.path.join(path, "tokenizer.json")
        if os.path.exists(file):
            return HFTokenizer(file, config)
    if config.vocab_size == 256:
        return ByteTokenizer()
    return None
