"""Shared fixtures and the one tolerance table.

Comparisons are made in float32 as a relative Frobenius error: ||ours - ref|| / ||ref||.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

from carajax.config import ModelConfig

# `carajax serve` profiles its device for a cost model at start-up by default (cached on disk);
# the servers tests start (subprocesses inherit this) skip it unless a test asks for it.
os.environ.setdefault("CARAJAX_COST_MODEL", "none")

# Tests compile far more than they compute (tiny models, an engine or two per test, most steps
# run a few times): XLA:CPU's LLVM back end at -O0 compiles ~25% faster (test_engine.py 90 ->
# 73 s here); the few compute-bound tests (SmolLM2) run slower. Set before JAX starts its backend;
# the servers and subprocesses tests start inherit it. Logits move by ~1e-6 (tests/tp_check.py).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    _flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()

# One persistent compilation cache for the whole run: each test file drops JAX's in-memory
# caches (below), and most files, the servers and subprocesses they start included (they
# inherit the variable), compile the same few engines' step variants. Shared by the xdist workers
# of one run (same run id), removed when the run ends; a user's $JAX_COMPILATION_CACHE_DIR wins.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
_COMPILE_CACHE = os.path.join(tempfile.gettempdir(), f"carajax-tests-jax-{_RUN_ID}")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILE_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the xdist controller, or a plain run
        shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)

# The longest files first. pytest-xdist (--dist loadfile) hands whole files to whichever worker is
# free, in collection order: a long file collected last keeps one worker busy while the other
# idles at the end (measured on the 2-core CI-like box).
LONGEST_FILES = ("test_smollm2.py", "test_tensor_parallel.py", "test_demo.py", "test_ray_serve.py",
                 "test_server.py", "test_hf_parity.py", "test_engine.py", "test_attention.py",
                 "test_cold_start.py")


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest in order


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
