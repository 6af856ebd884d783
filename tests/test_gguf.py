"""GGUF files as checkpoints (carajax/models/gguf.py), on tiny Llamas written with gguf's own
writer (tests/gguf_files.py): every supported tensor type read as `gguf` dequantizes it,
llama.cpp's rope permutation of q/k undone, config, tokenizer, chat template and logits as
`transformers` reads the same file, and bad files refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

import carajax
from carajax.models import gguf
from carajax.models.chat import load_chat_template
from carajax.models.tokenizer import load_tokenizer
from carajax.models.weights import load_hf
from tests import gguf_files as files
from tests.conftest import assert_close, rel_error

# Like a llama.cpp Q4_K_M file: embeddings Q8_0, K types in the layers, norms F32.
MIXED = {"token_embd": "Q8_0", "attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K",
         "attn_output": "Q5_K", "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}
# Relative error of a quantized weight against the float it was made from: how coarse each type
# is (a 4-bit type keeps ~1/16 of the range per step; random K blocks have no original).
QUANT_ERROR = {"F32": 0.0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 1e-2, "Q5_0": 6e-2, "Q5_1": 6e-2,
               "Q4_0": 0.12, "Q4_1": 0.12}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(path, expected tensors) of a tiny byte-level-BPE Llama with MIXED types."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, files.write_llama(path, types=MIXED)


def test_unpermute_restores_hf_row_order():
    # One head of dim 4: HF rows r0 r1 | r2 r3 are the two rotary halves; llama.cpp interleaves
    # them as r0 r2 r1 r3 (each rotary pair adjacent). Undoing it gives HF's order back.
    hf = np.arange(4.0)[:, None] * np.ones((1, 3))
    assert files.permute(hf, 1)[:, 0].tolist() == [0, 2, 1, 3]
    assert gguf._unpermute(files.permute(hf, 1), 1)[:, 0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("qtype", gguf.SUPPORTED_TYPES)
def test_every_type_reads_as_gguf_dequantizes_it(tmp_path, qtype):
    """Every matrix stored as `qtype` reads back exactly as gguf's dequantize decodes its blocks
    (q and k unpermuted to HF rows), and, where gguf can quantize the type, within the type's
    coarseness of the weights it was made from."""
    expected = files.write_llama(tmp_path / f"{qtype}.gguf", types=qtype)
    ckpt = gguf.read(tmp_path / f"{qtype}.gguf")
    # 2 layers x 7 projections + the embedding; 2 x 2 layer norms + the final norm in F32
    assert ckpt.types() == ({"F32": 20} if qtype == "F32" else {qtype: 15, "F32": 5})
    for name in ckpt.tensors:
        ours = ckpt.tensor(name)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, expected[name], err_msg=name)
        if qtype in QUANT_ERROR and "norm" not in name:
            assert rel_error(ours, expected[name + "#original"]) <= QUANT_ERROR[qtype], name


def test_config_from_metadata(mixed):
    path, _ = mixed
    c = gguf.read(path).config
    s = files.SHAPE
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.head_dim) == (s["hidden"], s["intermediate"], s["layers"], s["heads"],
                            s["kv_heads"], s["hidden"] // s["heads"])
    tokens, _ = files.byte_level_vocab()
    assert c.vocab_size == len(tokens)
    assert (c.rope_theta, c.max_position_embeddings) == (10000.0, 2048)
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.tie_word_embeddings  # no output.weight
    assert (c.bos_token_id, c.eos_token_ids) == (tokens.index("<|im_start|>"),
                                                 (tokens.index("<|im_end|>"),))
    assert c.name == "tiny"


def test_untied_head_and_end_of_turn_token(tmp_path):
    """An output.weight is lm_head (untied); tokenizer.ggml.eot_token_id also ends generation."""
    expected = files.write_llama(tmp_path / "untied.gguf", tie=False,
                                 metadata={"tokenizer.ggml.eot_token_id": 0})
    ckpt = gguf.read(tmp_path / "untied.gguf")
    assert not ckpt.config.tie_word_embeddings
    assert ckpt.config.eos_token_ids == (2, 0)
    model = gguf.load_model(ckpt)
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel.value).T,
                                  expected["lm_head.weight"])


def test_rope_freqs_divide_the_rotary_frequencies(tmp_path):
    """Llama 3.1-style files carry rope_freqs (llama.cpp divides each frequency by its factor)."""
    factors = np.linspace(1.0, 8.0, files.SHAPE["hidden"] // files.SHAPE["heads"] // 2,
                          dtype=np.float32)
    files.write_llama(tmp_path / "freqs.gguf", extra_tensors={"rope_freqs.weight": factors})
    files.write_llama(tmp_path / "plain.gguf")
    model, base = gguf.load_model(tmp_path / "freqs.gguf"), gguf.load_model(tmp_path / "plain.gguf")
    np.testing.assert_allclose(np.asarray(model.inv_freq.value),
                               np.asarray(base.inv_freq.value) / factors, rtol=1e-6)
    with pytest.raises(gguf.GGUFError, match="rope_freqs"):
        gguf.write_hf(gguf.read(tmp_path / "freqs.gguf"), tmp_path / "out")


@pytest.mark.slow
def test_engine_serves_a_gguf_file_as_transformers_reads_it(mixed):
    """`Engine.from_pretrained("x.gguf")`: logits within the float32 tolerance of transformers'
    own GGUF loader (its dequantization, its unpermute) on a Q4_K_M-like file."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    path, _ = mixed
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    engine = carajax.Engine.from_pretrained(str(path), config=carajax.EngineConfig(
        cold_start="async", max_batch_size=2))
    ids = [1, 5, 60, 100, 200, 300, 7, 8, 9, 10, 11, 12]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert_close(engine.logits(ids), ref, "float32")
    assert engine.model_config.tie_word_embeddings == hf.config.tie_word_embeddings


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tokenizer_and_chat_template_as_transformers_reads_them(tmp_path, kind):
    """Byte-level BPE (SmolLM2, Llama 3) and SentencePiece BPE from scores (Llama 2): the same
    ids and text as transformers' reading of the file, held-out text and special tokens alike;
    the chat template renders as transformers renders it."""
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    path = tmp_path / f"{kind}.gguf"
    files.write_llama(path, tokenizer=kind)
    ours = gguf.read(path).tokenizer()
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in [*files.HELD_OUT, "<s>hello</s> <unk> world", "  "]:
        ids = theirs(text).input_ids
        assert ours.encode(text).ids == ids, text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    chat = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}]
    template = load_chat_template(path)
    assert template.render(chat) == theirs.apply_chat_template(chat, add_generation_prompt=True,
                                                                tokenize=False)
    assert template.special_tokens["eos_token"] == theirs.eos_token


def test_write_hf_gives_a_checkpoint_carajax_and_transformers_read(mixed, tmp_path):
    """The converted directory holds the dequantized weights exactly (float32) and the tokenizer
    and template, so loading it equals loading the GGUF."""
    path, expected = mixed
    gguf.write_hf(gguf.read(path), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors",
                                                    "tokenizer.json", "tokenizer_config.json"}
    model = load_hf(tmp_path)
    np.testing.assert_array_equal(np.asarray(model.layers[1].self_attn.k_proj.kernel.value).T,
                                  expected["model.layers.1.self_attn.k_proj.weight"])
    ours = load_tokenizer(str(tmp_path), model.config)
    direct = load_tokenizer(str(path), gguf.read(path).config)
    assert [ours.encode(t) for t in files.HELD_OUT] == [direct.encode(t) for t in files.HELD_OUT]
    assert load_chat_template(tmp_path).source == files.CHATML


# -- files carajax cannot serve: one GGUFError line, before any weight is read ------------------
def _truncated(tmp_path):
    files.write_llama(tmp_path / "full.gguf")
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "bad.gguf").write_bytes(data[:len(data) // 2])


def _unknown_type(tmp_path):
    """Patch attn_v's type id in its tensor info (name, dims, then the u32 type) to 99."""
    files.write_llama(tmp_path / "full.gguf")
    data = bytearray((tmp_path / "full.gguf").read_bytes())
    name = b"blk.0.attn_v.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8  # n_dims u32, two u64 dims
    data[at:at + 4] = (99).to_bytes(4, "little")
    (tmp_path / "bad.gguf").write_bytes(bytes(data))


BAD_FILES = {
    "not gguf": (lambda p: (p / "bad.gguf").write_text("hello"), "not a GGUF file"),
    "truncated": (_truncated, "truncated or corrupt"),
    "unknown type": (_unknown_type, "unknown type"),
    "architecture": (lambda p: files.write_llama(p / "bad.gguf", arch="qwen2"),
                     "architecture 'qwen2' is not supported"),
    "unsupported type": (lambda p: files.write_llama(p / "bad.gguf", types={"attn_v": "IQ4_NL"}),
                         "blk.0.attn_v.weight has type IQ4_NL"),
    "experts": (lambda p: files.write_llama(p / "bad.gguf", metadata={"llama.expert_count": 8}),
                "mixture of experts"),
    "pre-tokenizer": (lambda p: files.write_llama(p / "bad.gguf",
                                                  metadata={"tokenizer.ggml.pre": "qwen35"}),
                      "pre-tokenizer 'qwen35' is not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_are_one_clear_error(tmp_path, case):
    make, message = BAD_FILES[case]
    make(tmp_path)
    with pytest.raises(carajax.CheckpointError, match=message) as err:
        carajax.Engine.from_pretrained(str(tmp_path / "bad.gguf"))
    assert isinstance(err.value, gguf.GGUFError)
    assert "\n" not in str(err.value) and str(tmp_path / "bad.gguf") in str(err.value)


def test_cli_names_a_bad_gguf_in_one_line(tmp_path):
    from carajax.cli.args import UsageError, model_config_arg

    files.write_llama(tmp_path / "bad.gguf", arch="qwen2")
    with pytest.raises(UsageError, match=r"--model .*bad.gguf: .*architecture 'qwen2'") as err:
        model_config_arg(str(tmp_path / "bad.gguf"))
    assert "\n" not in str(err.value)
    files.write_llama(tmp_path / "good.gguf")
    assert model_config_arg(str(tmp_path / "good.gguf")).num_layers == files.SHAPE["layers"]
