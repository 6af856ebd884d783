"""Tiny Llama GGUF files for the tests, written with `gguf`'s own GGUFWriter the way llama.cpp's
converter writes a real one: llama.* metadata, q/k rows permuted for its rope, weights quantized
(or, for the K types that `gguf` cannot quantize, random blocks with sane scales), and a tokenizer
(byte-level BPE, or SentencePiece-style with scores) trained here on a few sentences.

`write_llama` returns what carajax should read back: every tensor in HF layout and float32, as
`gguf.quants.dequantize` decodes the stored blocks, with the rope permutation undone by an index
inverse computed here (not by carajax's `_unpermute`).
"""

from __future__ import annotations

import functools
import json

import numpy as np

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Numbers like 2024, 3.14159 and 42 appear in text; so do emoji 🙂 and accents: café, naïve.",
    "def main():\n    print('hello world')\n\n",
    "  Leading spaces, tabs\tand\nnewlines matter to a tokenizer.",
    "Serving many LoRA adapters on one base model is what carajax does.",
] * 20
# Held out from training: what the tokenizer tests encode.
HELD_OUT = [
    "Hello world!", "The capital of Italy is Rome.", "  two leading spaces and 12345 digits",
    "unseen wörds: Zürich, Ångström, 東京", "<|im_start|>user\nHi<|im_end|>\n", "x\n\n\ny",
]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
# Rows of 256 elements: every matrix splits into whole blocks of every type (K types: 256).
SHAPE = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# Offsets of each K type's float16 super-block scales (d, dmin) in its block (gguf/quants.py),
# and the largest scale drawn: about 0.5 / (largest sub-block scale x largest quant), so that
# weights stay under ~0.5 (Q4_K: 5e-4 x 63 x 15).
K_SCALES = {"Q2_K": ((80, 82), 1e-2), "Q3_K": ((108,), 4e-3), "Q4_K": ((0, 2), 5e-4),
            "Q5_K": ((0, 2), 2.5e-4), "Q6_K": ((208,), 1.2e-4)}


@functools.cache
def byte_level_vocab() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tokens, merges) of a byte-level BPE trained on CORPUS; SPECIALS first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    tokens = tuple(sorted(model["vocab"], key=model["vocab"].get))
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in model["merges"])
    return tokens, merges


@functools.cache
def sentencepiece_vocab() -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(tokens, scores) laid out as Llama 2's: <unk> <s> </s>, 256 byte tokens, then pieces
    ("▁the") best first, scored as their rank (no merges: readers derive them from scores)."""
    from tokenizers import SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(CORPUS, vocab_size=300, show_progress=False)
    vocab = sp.get_vocab()
    pieces = [t for t in sorted(vocab, key=vocab.get)]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tuple(tokens), tuple(scores)


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): HF q/k rows -> GGUF."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute`, by indices: GGUF row i holds HF row `where[i]`."""
    where = permute(np.arange(w.shape[0])[:, None], heads)[:, 0]
    out = np.empty_like(w)
    out[where] = w
    return out


def encode(w: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """What a GGUF stores for `w` as `qtype`: gguf's own quantization, or (K types) random
    blocks of the right size whose float16 scales are set small, so values stay O(0.1)."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(w.astype(np.float32), t)
    block, size = gguf.GGML_QUANT_SIZES[t]
    blocks = rng.integers(0, 256, (w.size // block, size), dtype=np.uint8)
    offsets, largest = K_SCALES.get(qtype, ((), 0.0))
    for offset in offsets:
        scale = rng.uniform(0.3 * largest, largest, len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(w.shape[0], -1)


def write_llama(path, *, types: dict[str, str] | str = "F32", tokenizer: str = "gpt2",
                arch: str = "llama", tie: bool = True, seed: int = 0, metadata: dict | None = None,
                extra_tensors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write a tiny Llama GGUF; returns HF name -> the float32 tensor carajax should read.

    `types`: one type for every matrix, or per llama.cpp role ("token_embd", "attn_q", ...,
    "output"; unnamed roles F32); norms are F32 as llama.cpp writes them. `metadata`: extra or
    overriding llama.* / tokenizer.* keys ({key: value}, types inferred by gguf)."""
    import gguf

    rng = np.random.default_rng(seed)
    s = SHAPE
    head_dim = s["hidden"] // s["heads"]
    if tokenizer == "gpt2":
        tokens, merges = byte_level_vocab()
        scores, token_types = None, [3 if t in SPECIALS[:3] else 4 if t == "<think>" else 1
                                     for t in tokens]
        bos, eos = tokens.index("<|im_start|>"), tokens.index("<|im_end|>")
    else:
        (tokens, scores), merges = sentencepiece_vocab(), None
        token_types = [2] + [3] * 2 + [6] * 256 + [1] * (len(tokens) - 259)
        bos, eos = 1, 2
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(s["layers"])
    w.add_context_length(2048)
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["intermediate"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model(tokenizer)
    if tokenizer == "gpt2":
        w.add_tokenizer_pre("smollm")
        w.add_token_merges(list(merges))
        w.add_add_bos_token(False)
    else:
        w.add_token_scores(list(scores))
    w.add_token_list(list(tokens))
    w.add_token_types(token_types)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_chat_template(CHATML)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)

    shapes = {"token_embd": (vocab, s["hidden"]), "output": (vocab, s["hidden"]),
              "attn_q": (s["hidden"], s["hidden"]), "attn_k": (s["kv_heads"] * head_dim, s["hidden"]),
              "attn_v": (s["kv_heads"] * head_dim, s["hidden"]), "attn_output": (s["hidden"], s["hidden"]),
              "ffn_gate": (s["intermediate"], s["hidden"]), "ffn_up": (s["intermediate"], s["hidden"]),
              "ffn_down": (s["hidden"], s["intermediate"])}
    hf_names = {"token_embd": "model.embed_tokens", "output": "lm_head", "attn_q": "self_attn.q_proj",
                "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
                "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    expected: dict[str, np.ndarray] = {}

    def add(name: str, role: str, hf: str):
        qtype = types if isinstance(types, str) else types.get(role, "F32")
        hf_w = rng.normal(0, 0.05, shapes[role]).astype(np.float32)
        heads = {"attn_q": s["heads"], "attn_k": s["kv_heads"]}.get(role)
        stored = encode(permute(hf_w, heads) if heads else hf_w, qtype, rng)
        w.add_tensor(name, stored, raw_dtype=gguf.GGMLQuantizationType[qtype])
        with np.errstate(all="ignore"):  # random blocks of a type carajax refuses may hold NaNs
            back = np.asarray(gguf.quants.dequantize(stored, gguf.GGMLQuantizationType[qtype]), np.float32)
        expected[hf] = unpermute_rows(back, heads) if heads else back
        expected[hf + "#original"] = hf_w  # before quantization (not for K types' random blocks)

    def norm(name: str, hf: str):
        g = rng.uniform(0.5, 1.5, s["hidden"]).astype(np.float32)
        w.add_tensor(name, g)
        expected[hf] = g

    add("token_embd.weight", "token_embd", "model.embed_tokens.weight")
    for i in range(s["layers"]):
        norm(f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight")
        norm(f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight")
        for role in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            add(f"blk.{i}.{role}.weight", role, f"model.layers.{i}.{hf_names[role]}.weight")
    norm("output_norm.weight", "model.norm.weight")
    if not tie:
        add("output.weight", "output", "lm_head.weight")
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected
