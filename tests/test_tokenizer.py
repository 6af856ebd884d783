"""Tokenizers: bytes for the test model, HF tokenizer.json for checkpoints that have one."""

from __future__ import annotations

import pytest

import carajax
from carajax.models.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids == [2, 104, 195, 169, 108, 108, 111]  # STX, then the UTF-8 bytes
    assert tok.decode(ids + [3]) == "héllo"  # STX and ETX are left out of text


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<s>", "</s>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    cfg = carajax.ModelConfig(vocab_size=5, hidden_size=8, intermediate_size=8, num_layers=1,
                              num_heads=1, num_kv_heads=1, bos_token_id=0, eos_token_ids=(1,))
    tok = load_tokenizer(str(tmp_path), cfg)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world") == [2, 3]
    assert tok.decode([2, 1, 3]) == "hello world"  # special tokens skipped


def test_no_tokenizer_for_unknown_vocab():
    cfg = carajax.ModelConfig.from_name("llama2-7b")
    assert load_tokenizer(None, cfg) is None
