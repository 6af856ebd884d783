"""GGUF files (llama.cpp's format) as carajax checkpoints: config, weights, tokenizer, chat template.

    ckpt = gguf.read("SmolLM2-135M-Instruct.Q4_1.gguf")  # metadata; tensors stay on disk (mmap)
    model = gguf.load_model(ckpt, dtype=jnp.float32)       # dequantized into the engine's dtype
    tok = ckpt.tokenizer()                                 # a HF `tokenizers` Tokenizer
    ckpt.tokenizer_config["chat_template"]                 # what tokenizer_config.json would hold
    gguf.write_hf(ckpt, "out/")                            # a Hugging Face checkpoint directory

Only the `llama` architecture is read. The `gguf` package (llama.cpp's own) parses the file and
dequantizes blocks; this module maps llama.cpp's names, metadata and layout onto Hugging Face's,
which is what the rest of carajax reads, and reads a file the way `transformers` does
(`from_pretrained(..., gguf_file=...)`), which the tests hold it to:

- llama.cpp's converter permutes the rows of q_proj and k_proj so that each head's rotary pairs
  are adjacent (GPT-J style rope); HF rotates the two halves of a head. `_unpermute` undoes it.
- A GGUF has no tokenizer.json: the vocabulary, merges, token types and pre-tokenizer name are
  metadata. `_build_tokenizer` turns them into a `tokenizers` pipeline (byte-level BPE, or
  SentencePiece-style BPE with byte fallback).
- No `output.weight` tensor means the head is tied to the embedding.

Anything else (another architecture, a mixture of experts, a tensor type outside
`SUPPORTED_TYPES`, a truncated file) is one `GGUFError` line, raised before weights are read.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from carajax import _safetensors
from carajax.config import ModelConfig
from carajax.models.weights import CheckpointError, from_tensors


class GGUFError(CheckpointError):
    """A GGUF file carajax cannot serve: unreadable, another architecture, an unsupported type."""


# Tensor types dequantized here (through `gguf.quants.dequantize`), each checked against it.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# llama.cpp tensor name -> Hugging Face Llama name ({i}: the layer).
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# Llama 3.1-style rope: per-frequency divisors of the rotary inverse frequencies (llama.cpp
# precomputes them instead of storing rope-scaling parameters).
ROPE_FREQS = "rope_freqs.weight"


def hf_name(name: str) -> str:
    """llama.cpp's tensor name -> HF's: "blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_TENSOR.fullmatch(name)
    if m is None or m[2] not in _LAYER_NAMES:
        raise KeyError(name)
    return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.weight"


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rope permutation of q_proj / k_proj rows ([heads * head_dim, d_in]).

    llama.cpp stores a head's rows interleaved, (0, d/2, 1, d/2 + 1, ...): its row 2j + half is
    HF's row half * d/2 + j. Viewing the head's rows as [d/2, 2] and swapping the two axes gives
    HF's [2, d/2]."""
    return w.reshape(heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFCheckpoint:
    """A parsed GGUF file: its config and tokenizer metadata now, tensors when asked for."""

    path: str
    config: ModelConfig
    metadata: dict[str, Any]  # scalars and strings; token arrays are read by `tokenizer()`
    tensors: dict[str, Any]  # HF name -> gguf ReaderTensor (memory-mapped)
    rope_freqs: np.ndarray | None  # ROPE_FREQS, if the file has it
    tokenizer_config: dict[str, Any]  # what tokenizer_config.json would hold (chat template, ...)
    _reader: Any = dataclasses.field(repr=False)

    def tensor(self, name: str) -> np.ndarray:
        """One tensor by HF name, dequantized to float32 in HF layout."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, self.config.num_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, self.config.num_kv_heads)
        return w

    def types(self) -> dict[str, int]:
        """Tensor type -> count, e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}."""
        return dict(collections.Counter(t.tensor_type.name for t in self.tensors.values()))

    def tokenizer(self):
        """The tokenizer the metadata describes, as a HF `tokenizers.Tokenizer` (None: the
        file has no vocabulary)."""
        return _build_tokenizer(self._field_contents, self.metadata, self.path)

    def _field_contents(self, key: str):
        field = self._reader.fields.get(key)
        return None if field is None else field.contents()


def read(path: str | os.PathLike) -> GGUFCheckpoint:
    """Parse a GGUF file's header (tensors stay memory-mapped). `GGUFError` if carajax cannot
    serve it. Cached per file version: the server reads tokenizer and template separately."""
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
    except OSError as e:
        raise GGUFError(f"{path}: {e.strerror}") from None
    return _read(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _read(path: str, _mtime_ns: int, _size: int) -> GGUFCheckpoint:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader's errors are ValueErrors with internal wording
        with open(path, "rb") as f:
            magic = f.read(4)
        what = "truncated or corrupt GGUF file" if magic == b"GGUF" else "not a GGUF file"
        if "GGMLQuantizationType" in str(e):
            what = "a tensor has an unknown type"
        raise GGUFError(f"{path}: {what} ({type(e).__name__}: {e})") from None
    meta = {k: f.contents() for k, f in reader.fields.items()
            if not (f.types and f.types[0] == gguf.GGUFValueType.ARRAY
                    and k.startswith("tokenizer.ggml."))}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; carajax reads 'llama'")
    tensors, rope_freqs = {}, None
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise GGUFError(f"{path}: tensor {t.name} has type {t.tensor_type.name}; carajax "
                            f"reads {', '.join(SUPPORTED_TYPES)}")
        if t.name == ROPE_FREQS:
            rope_freqs = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
            continue
        try:
            tensors[hf_name(t.name)] = t
        except KeyError:
            raise GGUFError(f"{path}: tensor {t.name} is not part of a Llama") from None
    config = _config(meta, tensors, reader, path)
    _check_tokenizer(meta, path)
    return GGUFCheckpoint(path=path, config=config, metadata=meta, tensors=tensors,
                          rope_freqs=rope_freqs, tokenizer_config=_tokenizer_config(meta, reader),
                          _reader=reader)


def _config(meta: dict, tensors: dict, reader, path: str) -> ModelConfig:
    """ModelConfig from llama.* metadata (the keys transformers maps to LlamaConfig's)."""
    def key(name, default=None):
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise GGUFError(f"{path}: metadata has no llama.{name}")
        if isinstance(value, list):  # per-layer values (llama.cpp allows them): one for all
            if len(set(value)) != 1:
                raise GGUFError(f"{path}: llama.{name} differs between layers; not supported")
            value = value[0]
        return value

    if key("expert_count", 0):
        raise GGUFError(f"{path}: a mixture of experts (llama.expert_count="
                        f"{key('expert_count')}); carajax serves dense Llamas")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" and key("rope.scaling.factor", 1.0) != 1.0:
        raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported")
    heads = key("attention.head_count")
    hidden = key("embedding_length")
    head_dim = meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count"))
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{path}: partial rotary embeddings (rope.dimension_count "
                        f"{meta['llama.rope.dimension_count']} of head size {head_dim})")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = meta.get("llama.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        vocab = int(tensors["model.embed_tokens.weight"].shape[-1])
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    try:
        return ModelConfig(
            name=Path(path).stem, vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=key("feed_forward_length"), num_layers=key("block_count"),
            num_heads=heads, num_kv_heads=key("attention.head_count_kv", heads),
            head_dim=None if head_dim is None else int(head_dim),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            tie_word_embeddings="lm_head.weight" not in tensors,
            max_position_embeddings=key("context_length"),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)))
    except ValueError as e:
        raise GGUFError(f"{path}: {e}") from None


def _tokenizer_config(meta: dict, reader) -> dict[str, Any]:
    """tokenizer_config.json's content: special tokens by text, BOS/EOS flags, chat template."""
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    model = meta.get("tokenizer.ggml.model")
    config: dict[str, Any] = {
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama")),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get("llama.context_length"),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                      ("pad_token", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and tokens is not None and token_id < len(tokens.data):
            config[name] = tokens.contents(token_id)
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def load_model(ckpt: GGUFCheckpoint | str | os.PathLike, *, dtype=np.float32):
    """The Llama in `ckpt` with weights dequantized and cast to dtype."""
    import jax.numpy as jnp

    ckpt = ckpt if isinstance(ckpt, GGUFCheckpoint) else read(ckpt)
    model = from_tensors(ckpt.tensor, ckpt.tensors, ckpt.config, dtype=dtype, where=ckpt.path)
    if ckpt.rope_freqs is not None:  # llama.cpp divides each rotary frequency by its factor
        if ckpt.rope_freqs.shape != model.inv_freq.value.shape:
            raise GGUFError(f"{ckpt.path}: {ROPE_FREQS} has shape {ckpt.rope_freqs.shape}, "
                            f"expected {model.inv_freq.value.shape}")
        model.inv_freq.value = model.inv_freq.value / jnp.asarray(ckpt.rope_freqs)
    return model


def write_hf(ckpt: GGUFCheckpoint, out: str | os.PathLike, *, progress: bool = False) -> None:
    """Write `ckpt` as a HF checkpoint directory: config.json, model.safetensors (float32, so the
    dequantized values are kept exactly), tokenizer.json, tokenizer_config.json."""
    from tqdm.auto import tqdm

    if ckpt.rope_freqs is not None:
        raise GGUFError(f"{ckpt.path}: {ROPE_FREQS} has no config.json form; load the GGUF itself")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: ckpt.tensor(name) for name in tqdm(
        ckpt.tensors, desc="dequantizing", unit="tensor", disable=not progress)}
    _safetensors.save(str(out / "model.safetensors"), tensors, {"format": "pt"})
    hf = ckpt.config.to_hf_dict()
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    tokenizer = ckpt.tokenizer()
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(ckpt.tokenizer_config, indent=2))


# -- the tokenizer ---------------------------------------------------------------------------
# llama.cpp token types (tokenizer.ggml.token_type).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
# Pre-tokenizer splits by llama.cpp's `tokenizer.ggml.pre` name, for byte-level vocabularies.
# None: GPT-2's own regex (inside ByteLevel).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {"default": None, "gpt2": None, "smollm": None,
               "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT}


def _check_tokenizer(meta: dict, path: str) -> None:
    """Refuse a tokenizer `_build_tokenizer` cannot build, before any weight is read."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in (None, "gpt2", "llama"):
        raise GGUFError(f"{path}: tokenizer model {kind!r} is not supported (carajax reads "
                        "'gpt2' byte-level BPE and 'llama' SentencePiece BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if kind == "gpt2" and pre not in _PRE_SPLITS:
        raise GGUFError(f"{path}: pre-tokenizer {pre!r} is not supported (carajax reads "
                        f"{', '.join(sorted(_PRE_SPLITS))})")


def _build_tokenizer(contents: Callable[[str], Any], meta: dict, path: str):
    """A `tokenizers.Tokenizer` from tokenizer.ggml.* metadata (tokens, merges, types, pre);
    None for a file without a vocabulary (the engine then takes token ids)."""
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = contents("tokenizer.ggml.tokens")
    if tokens is None or kind is None:
        return None
    types = contents("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = contents("tokenizer.ggml.merges")
    if kind == "gpt2":
        tok, spelled = _byte_level(tokens, merges, meta, path)
    else:
        tok, spelled = _sentencepiece(tokens, merges, contents("tokenizer.ggml.scores"), types), None
    vocab = tok.get_vocab()
    # Control and unknown tokens (<|im_start|>, <s>, <unk>) match whole and are skipped when
    # decoding; a byte-level "control" token spelled outside the byte alphabet is a mislabel and
    # is left out, as transformers does. User-defined tokens (<think>) match whole but are text.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types)
                            if ty in (_UNKNOWN, _CONTROL) and (spelled is None or set(t) <= spelled)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = ["$A:0"]
    special = []
    if add_bos:
        single.insert(0, f"{tokens[bos]}:0")
        special.append((tokens[bos], bos))
    if add_eos:
        single.append(f"{tokens[eos]}:0")
        special.append((tokens[eos], eos))
    pair = single + [s.replace("$A", "$B").replace(":0", ":1") for s in single]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=list(dict.fromkeys(special)))
    return tok


def _byte_level(tokens: list[str], merges: list[str] | None, meta: dict, path: str):
    """GPT-2-style byte-level BPE: tokens spelled in GPT-2's byte alphabet, merges in the file."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if merges is None:
        raise GGUFError(f"{path}: a byte-level BPE tokenizer without merges (tokenizer.ggml.merges)")
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    # A token outside the alphabet (a mislabelled added token) is spelled by its UTF-8 bytes.
    vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                               fuse_unk=False, byte_fallback=False))
    split = _PRE_SPLITS[meta.get("tokenizer.ggml.pre", "default")]
    if split is None:
        # GPT-2's regex. SmolLM's llama.cpp name ("smollm") adds single-digit splits, which
        # change nothing here: its vocabulary has no token of two digits or a digit and more.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, spelled


def _sentencepiece(tokens: list[str], merges: list[str] | None, scores: list[float] | None,
                   types: list[int]):
    """SentencePiece BPE (Llama 2, Mistral, TinyLlama): "▁" for spaces, a leading "▁", bytes
    <0xNN> for what the vocabulary lacks. Merges from the file, else from the scores: the pieces
    that spell a token, best-scoring token first (as sentencepiece's BPE orders them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = scores or [0.0] * len(tokens)
        found = []
        for token, score in zip(tokens, scores):
            local = [(token[:k], token[k:]) for k in range(1, len(token))
                     if token[:k] in vocab and token[k:] in vocab]
            found += [(a, b, score) for a, b in sorted(local, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
        found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
        pairs = [(a, b) for a, b, _ in found]
    unk = next((t for t, ty in zip(tokens, types) if ty == 2), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    return tok


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes that print stand for themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
