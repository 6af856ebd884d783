"""The cost model a worker prices itself with: fitted on its own device, model and engine.

A router that prices every worker with a model measured elsewhere (another device, another model)
predicts the wrong step times, and the rank-aware policies are only as good as those predictions.
So `carajax serve --cost-model auto` (the default) profiles its serving engine once, in place,
before it reports SERVING (`profiler.profile_engine`: the engine's own runner, KV cache and adapter
pool, so the weights are held once: a second engine beside it would double weight memory, which a
7B model on one GPU cannot afford), with a small grid (`QUICK`: a minute or so on a CPU for a
small model; points that do not fit the engine's budgets are skipped), fits the rich form, and
caches the result on disk under a key of everything that changes step times: the device, the
model's configuration, the engine's shapes and budgets (dtype, batch, token buckets, KV pages,
adapter pool, LoRA implementation and kernel) and the grid. The worker reports it in its Stats,
and the router prices that worker with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax

from carajax import paths
from carajax.engine.engine import Engine
from carajax.sched import cost_model as cm
from carajax.sched import profiler

# Small enough for a worker's start-up, wide enough for the rank terms (ranks 8-64, base rows).
QUICK = profiler.ProfileGrid(batch_sizes=(1, 2, 4), prompt_tokens=(16, 64), contexts=(0, 128),
                             rank_mixes=("base", "uniform8", "uniform64", "mixed 8..64"),
                             kernels=("padded",), warmup=1, repeats=3, load_ranks=(8, 64),
                             load_repeats=2)
KEY_VERSION = 2  # v2: profiled in place on the serving engine, keyed by its shapes and budgets

# EngineConfig fields that set the compiled steps' shapes, the kernels run, or which grid points
# fit (`profiler.fitted_points`); the others (queues, cold-start policy, links) do not change a
# step's time.
ENGINE_FIELDS = ("dtype", "max_batch_size", "kv_page_size", "kv_cache_bytes", "max_step_tokens",
                 "prefill_chunk", "max_prefill_tokens", "min_prefill_bucket", "max_loras",
                 "max_lora_rank", "lora_page_rank", "device_lora_budget_bytes",
                 "host_lora_budget_bytes", "lora_kernel", "tp")


def cache_dir() -> Path:
    """Where fitted models are kept between runs: cost_models/ under `carajax.paths.home()`."""
    return paths.home() / "cost_models"


def cache_key(engine: Engine, grid: profiler.ProfileGrid = QUICK) -> str:
    """File stem naming the device, the model, and what else of the engine sets step times."""
    dev = jax.devices()[0]
    cfg = engine.config
    fields = json.dumps({
        "version": KEY_VERSION, "device": dev.device_kind, "platform": dev.platform,
        "jax": jax.__version__, "model": dataclasses.asdict(engine.model_config),
        "engine": {f: getattr(cfg, f) for f in ENGINE_FIELDS},
        "seq_len": engine.runner.seq_len, "lora_impl": engine.runner.lora_impl,
        "grid": dataclasses.asdict(grid)}, sort_keys=True)
    digest = hashlib.sha256(fields.encode()).hexdigest()[:12]
    kind = "".join(c if c.isalnum() else "-" for c in dev.device_kind.lower())
    return f"{kind}_{engine.model_config.name}_{cfg.dtype}_{digest}"


def local_cost_model(engine: Engine, *, grid: profiler.ProfileGrid = QUICK, progress: bool = False
                     ) -> tuple[cm.CostModel, Path, bool]:
    """(the model, its file, whether it came from the cache) for `engine`: read from the cache,
    else profiled on `engine` itself (`profiler.profile_engine`, in place, the engine idle) and
    saved. Call it before the worker reports SERVING: requests submitted meanwhile wait."""
    path = cache_dir() / f"{cache_key(engine, grid)}.json"
    if path.exists():
        try:
            return cm.load(path), path, True
        except (ValueError, KeyError, json.JSONDecodeError):
            pass  # a torn or stale file: measure again
    doc = profiler.profile_engine(engine, grid, progress=progress)
    fitted = profiler.fit_profile(doc, "rich")
    fitted = dataclasses.replace(fitted, source="--cost-model auto (carajax serve or a Ray "
                                 "replica): a quick profile of its serving engine, in place")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fitted.save(tmp)
    os.replace(tmp, path)  # atomic: a concurrent worker reads the old file or the new one
    return fitted, path, False
