"""Reference checkpoints, adapters and outputs made with Hugging Face `transformers` + `peft`.

Everything is generated offline in a temporary directory: random `LlamaForCausalLM` models saved
with `save_pretrained`, PEFT LoRA adapters made with `get_peft_model` (lora_B randomised, since
PEFT initialises it to zero and every adapter would look like the base), and the logits and
greedy tokens HF computes for them.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np

SEQ_LEN = 24
NEW_TOKENS = 16

# Base models: GQA; llama3 rope scaling with an odd hidden size (96); tied embeddings with MQA.
MODELS = {
    "gqa": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "llama3_rope": dict(vocab_size=300, hidden_size=96, intermediate_size=160,
                        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                        max_position_embeddings=256, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 32}),
    "tied": dict(vocab_size=200, hidden_size=48, intermediate_size=112, num_hidden_layers=3,
                 num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=128,
                 tie_word_embeddings=True, rms_norm_eps=1e-6),
}

# Adapters (PEFT LoraConfig kwargs): ranks 1, 8, 16; attention-only and all-linear; rsLoRA;
# rank_pattern and alpha_pattern; layers_to_transform.
ADAPTERS = {
    "attn_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all_r16_patterns": dict(r=16, lora_alpha=32, target_modules="all-linear",
                             rank_pattern={"q_proj": 1, "down_proj": 4},
                             alpha_pattern={"v_proj": 8}),
    "rslora_r1": dict(r=1, lora_alpha=4, use_rslora=True,
                      target_modules=["q_proj", "v_proj", "gate_proj"], layers_to_transform=[0]),
}


@dataclasses.dataclass
class Case:
    name: str
    model_dir: str
    adapter_dirs: dict[str, str]
    tokens: np.ndarray  # int [SEQ_LEN]
    logits: dict[str | None, np.ndarray]  # adapter (None: base) -> float32 [SEQ_LEN, vocab]
    greedy: dict[str | None, list[int]]  # adapter -> NEW_TOKENS greedy tokens after `tokens`


def build_case(name: str, root: str, seed: int = 0) -> Case:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**MODELS[name], initializer_range=0.1, eos_token_id=None,
                      bos_token_id=None, pad_token_id=None, attn_implementation="eager")
    base = LlamaForCausalLM(cfg).eval()
    model_dir = os.path.join(root, name, "model")
    base.save_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, SEQ_LEN)
    ids = torch.tensor(tokens[None], dtype=torch.long)

    def reference(model) -> tuple[np.ndarray, list[int]]:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float().numpy()
            # An explicit mask: otherwise generate masks prompt tokens equal to pad_token_id.
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        return logits, out[0, SEQ_LEN:].tolist()

    logits, greedy = {}, {}
    logits[None], greedy[None] = reference(base)
    adapter_dirs = {}
    for i, (adapter, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed * 100 + i + 1)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs)).eval()
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0.0, 0.1)
        adapter_dirs[adapter] = os.path.join(root, name, adapter)
        peft_model.save_pretrained(adapter_dirs[adapter])
        logits[adapter], greedy[adapter] = reference(peft_model)
        # The adapter must really change the output, or the comparison proves nothing.
        assert np.abs(logits[adapter] - logits[None]).max() > 1e-2, adapter
    return Case(name, model_dir, adapter_dirs, tokens, logits, greedy)
