"""The cost model a worker prices itself with: fitted on its own device and model.

A router that prices every worker with a model measured elsewhere (another device, another model)
predicts the wrong step times, and the rank-aware policies are only as good as those predictions.
So `carajax serve --cost-model auto` (the default) profiles its own engine shape once, with a small
grid (`QUICK`: a minute or so on a CPU for a small model), fits the rich form, and caches the result
on disk under a key of everything that changes step times: the device kind, the model's
configuration, the dtype and the LoRA implementation. The worker reports it in its Stats, and
the router prices that worker with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax

from carajax.config import ModelConfig
from carajax.sched import cost_model as cm
from carajax.sched import profiler

# Small enough for a worker's start-up, wide enough for the rank terms (ranks 8-64, base rows).
QUICK = profiler.ProfileGrid(batch_sizes=(1, 2, 4), prompt_tokens=(16, 64), contexts=(0, 128),
                             rank_mixes=("base", "uniform8", "uniform64", "mixed 8..64"),
                             kernels=("padded",), warmup=1, repeats=3, load_ranks=(8, 64),
                             load_repeats=2)


def cache_dir() -> Path:
    """$CARAJAX_CACHE, else ~/.cache/carajax: where fitted models are kept between runs."""
    return Path(os.environ.get("CARAJAX_CACHE") or Path.home() / ".cache" / "carajax") / "cost_models"


def cache_key(model_config: ModelConfig, dtype: str, lora_impl: str, lora_kernel: str) -> str:
    """File stem naming the device, model and what else sets step times."""
    dev = jax.devices()[0]
    fields = json.dumps({"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
                         "model": dataclasses.asdict(model_config), "dtype": dtype,
                         "lora_impl": lora_impl, "lora_kernel": lora_kernel}, sort_keys=True)
    digest = hashlib.sha256(fields.encode()).hexdigest()[:12]
    kind = "".join(c if c.isalnum() else "-" for c in dev.device_kind.lower())
    return f"{kind}_{model_config.name}_{dtype}_{digest}"


def local_cost_model(model: str, model_config: ModelConfig, *, dtype: str = "float32",
                     lora_impl: str = "auto", lora_kernel: str = "padded",
                     grid: profiler.ProfileGrid = QUICK, progress: bool = False
                     ) -> tuple[cm.CostModel, Path, bool]:
    """(the model, its file, whether it came from the cache). `model` is what `profile` takes:
    a preset name (random weights: step times depend on shapes only) or a checkpoint dir."""
    path = cache_dir() / f"{cache_key(model_config, dtype, lora_impl, lora_kernel)}.json"
    if path.exists():
        try:
            return cm.load(path), path, True
        except (ValueError, KeyError, json.JSONDecodeError):
            pass  # a torn or stale file: measure again
    name = model if os.path.isdir(model) else model_config.name
    doc = profiler.profile(name, grid, dtype=dtype, lora_impl=lora_impl, progress=progress)
    fitted = profiler.fit_profile(doc, "rich", kernel=lora_kernel if lora_kernel in
                                  doc["metadata"]["kernels_profiled"] else None)
    fitted = dataclasses.replace(fitted, source="carajax serve --cost-model auto (quick profile "
                                 "of this worker's device and model)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fitted.save(tmp)
    os.replace(tmp, path)  # atomic: a concurrent worker reads the old file or the new one
    return fitted, path, False
