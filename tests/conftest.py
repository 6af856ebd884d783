"""Shared fixtures and the one tolerance table.

Comparisons are made in float32 as a relative Frobenius error: ||ours - ref|| / ||ref||.
"""

from __future__ import annotations

import gc
import os

import jax
import numpy as np
import pytest

from carajax.config import ModelConfig

# `carajax serve` profiles its device for a cost model at start-up by default (cached on disk);
# the servers tests start (subprocesses inherit this) skip it unless a test asks for it.
os.environ.setdefault("CARAJAX_COST_MODEL", "none")

# Relative error bounds by compute dtype.
TOLERANCE = {
    # float32 against HF/torch float32: different op order only.
    "float32": 1e-4,
    # bfloat16 has an 8-bit mantissa (~4e-3 per rounding); errors compound over layers and the
    # residual stream, so a tiny model's logits drift by about 1e-2.
    "bfloat16": 3e-2,
}


def rel_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    ref_norm = np.linalg.norm(ref)
    # An all-zero reference (e.g. no token has LoRA) demands an all-zero answer: absolute error.
    return float(np.linalg.norm(ours - ref) / (ref_norm if ref_norm > 0 else 1.0))


def assert_close(ours, ref, dtype: str = "float32"):
    err = rel_error(ours, ref)
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e} > {TOLERANCE[dtype]:.0e} ({dtype})"


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig.from_name("llama-test")


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Each test file ends by dropping JAX's compiled executables. A test worker lives for
    hundreds of files, and every compile keeps ~3 memory mappings of JIT code (150 compiles:
    +514 mappings, back to +73 after `jax.clear_caches`): a full run reached the kernel's
    per-process limit (vm.max_map_count, 65,530) and XLA crashed compiling, a call through a
    null pointer."""
    yield
    jax.clear_caches()
    gc.collect()
