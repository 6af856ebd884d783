"""Helpers shared by tests, the demo and benchmarks: random PEFT-format adapters on disk.

The files written here are exactly what PEFT's `save_pretrained` writes for a LoRA adapter
(`adapter_config.json` + `adapter_model.safetensors`, keys without the adapter name), so the whole
loading path is exercised; the HF parity tests additionally use PEFT itself.
"""

from __future__ import annotations

import json
import os

import numpy as np

from carajax import _safetensors
from carajax.config import ATTENTION_MODULES, ModelConfig


def write_random_adapter(
    path: str | os.PathLike,
    config: ModelConfig,
    *,
    rank: int,
    alpha: float | None = None,
    target_modules: tuple[str, ...] = ATTENTION_MODULES,
    seed: int = 0,
    use_rslora: bool = False,
    std: float = 0.05,
    extra_config: dict | None = None,
) -> str:
    """Write a random LoRA adapter (both A and B non-zero) in PEFT's on-disk format."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for module in target_modules:
            group = "self_attn" if module in ATTENTION_MODULES else "mlp"
            d_in, d_out = config.projection_shape(module)
            key = f"base_model.model.model.layers.{layer}.{group}.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, d_in)) * std).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((d_out, rank)) * std).astype(np.float32)
    _safetensors.save(os.path.join(path, "adapter_model.safetensors"), tensors)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": float(alpha if alpha is not None else 2 * rank),
        "target_modules": list(target_modules), "bias": "none", "use_rslora": use_rslora,
        "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "lora_dropout": 0.0, "fan_in_fan_out": False, "base_model_name_or_path": config.name,
    }
    cfg.update(extra_config or {})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return path
