"""Helpers shared by tests, the demo and benchmarks: random PEFT-format adapters on disk.

The files written here are exactly what PEFT's `save_pretrained` writes for a LoRA adapter
(`adapter_config.json` + `adapter_model.safetensors`, keys without the adapter name), so the whole
loading path is exercised; the HF parity tests additionally use PEFT itself.
"""

from __future__ import annotations

import os

import numpy as np

from carajax.config import ATTENTION_MODULES, ModelConfig
from carajax.lora.adapter import save_adapter


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
    rng = np.random.default_rng(seed)
    modules = {}
    for layer in range(config.num_layers):
        for module in target_modules:
            d_in, d_out = config.projection_shape(module)
            modules[(layer, module)] = ((rng.standard_normal((rank, d_in)) * std).astype(np.float32),
                                        (rng.standard_normal((d_out, rank)) * std).astype(np.float32))
    return save_adapter(path, config, modules, rank=rank,
                        alpha=alpha if alpha is not None else 2 * rank, use_rslora=use_rslora,
                        extra_config=extra_config)


def run_chunks(engine, chunks) -> np.ndarray:
    """One engine step of hand-made chunks, through the real runner: `chunks` lists
    (request, start, length) in batch order (each request's adapter loaded, KV pages grown as
    needed from the engine's allocator); returns float32 logits [len(chunks), vocab] at each
    chunk's last token. For tests that build mixed prefill + decode batches directly."""
    from carajax.engine.planner import Schedule, SeqChunk

    planner, runner = engine.planner, engine.runner
    plan = []
    for req, start, n in chunks:
        if not planner.pages.grow(req, runner.layout.pages_for(start + n)):
            raise RuntimeError("the test engine's KV cache is too small for these chunks")
        path = "base"
        if req.adapter is not None:
            engine.pool.load_now(req.adapter)
            path = "device"
        plan.append(SeqChunk(req, start, n, path, samples=start + n == req.num_tokens))
    inputs = runner.prepare(Schedule(tuple(plan)), planner.pages.table, {})
    _, logits = runner.launch(inputs)
    return np.asarray(logits[:len(chunks)])
