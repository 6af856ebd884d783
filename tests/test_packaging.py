"""A plain install (a wheel, or a non-editable `pip install .`) carries every file the code reads
at run time, not only a clone does: the demo model and adapters, the default cost models, the trace
of `carajax replay` / `carajax simulate` (with its licence) and the gRPC schema. And the shipped
copies under carajax/data/ stay equal to the repository's data/ they were copied from."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from carajax import data as packaged
from carajax.sched import cost_model as cm

REPO = Path(__file__).resolve().parents[1]
RUNTIME_FILES = [  # read by the code from the installed package
    "carajax/data/cost_models/cpu_llama-test.json",  # cost_model.default_cost_model, simulate
    "carajax/data/cost_models/a10_paper.json",
    "carajax/data/traces/azure2023_conv.jsonl",  # replay's and simulate's default trace
    "carajax/data/traces/LICENSE_CC-BY-4.0.txt",  # the trace's licence and attribution
    "carajax/data/traces/AzureLLMInferenceDataset2023.md",
    "carajax/data/kernel_tables/verified.json",  # autotune: the kernel forms verified per device
    "carajax/demo/manifest.json",
    "carajax/demo/model/config.json",
    "carajax/demo/model/model.safetensors",
    *(f"carajax/demo/adapters/{name}/{file}" for name in ("upper", "rot13", "reverse", "vowels")
      for file in ("adapter_config.json", "adapter_model.safetensors")),
    "carajax/demo/smollm2/manifest.json",  # the SmolLM2 adapters (carajax.demo.smollm2)
    "carajax/demo/smollm2/loss_curves.png",
    *(f"carajax/demo/smollm2/adapters/{name}/{file}" for name in ("shout", "json", "bullets")
      for file in ("adapter_config.json", "adapter_model.safetensors")),
    "carajax/server/carajax.proto",
    "carajax/__main__.py",
]


def test_the_code_reads_its_data_from_the_package():
    root = Path(packaged.__file__).parent
    assert packaged.CONV_TRACE == root / "traces" / "azure2023_conv.jsonl"
    assert cm.COST_MODEL_DIR == root / "cost_models"
    assert cm.default_cost_model().model_name == "llama-test"  # cpu_llama-test.json, first found


@pytest.mark.parametrize("shipped, source", [
    ("cost_models/cpu_llama-test.json", "data/cost_models/cpu_llama-test.json"),
    ("cost_models/a10_paper.json", "data/cost_models/a10_paper.json"),
    ("traces/azure2023_conv.jsonl", "data/traces/azure_llm_2023/azure2023_conv.jsonl"),
    ("traces/LICENSE_CC-BY-4.0.txt", "data/traces/azure_llm_2023/LICENSE_CC-BY-4.0.txt"),
])
def test_shipped_data_equals_the_repository_copy(shipped, source):
    # A refit (`carajax profile --fit data/cost_models/...`) must be copied here too.
    assert filecmp.cmp(packaged.DATA_DIR / shipped, REPO / source, shallow=False), (
        f"carajax/data/{shipped} differs from {source}: copy it over")


def test_shipped_kernel_tables_equal_the_repository_copies():
    """The record of verified kernel forms and every measured table (data/kernel_tables/*.json,
    what scripts/gpu_check.sh brings back) ship, byte for byte, in the package."""
    source, shipped = REPO / "data" / "kernel_tables", packaged.KERNEL_TABLES
    names = sorted(p.name for p in source.glob("*.json"))
    assert "verified.json" in names
    assert names == sorted(p.name for p in shipped.glob("*.json")), "copy them over"
    for name in names:
        assert filecmp.cmp(shipped / name, source / name, shallow=False), (
            f"carajax/data/kernel_tables/{name} differs from data/kernel_tables/{name}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of what the build reads (pyproject, README, the package), so no
    build output or egg-info of the clone can supply a file the package data misses."""
    src = tmp_path_factory.mktemp("src")
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    shutil.copytree(REPO / "carajax", src / "carajax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--quiet", "-w", str(out), str(src)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("carajax-*.whl")
    return whl


@pytest.mark.slow
def test_the_wheel_carries_every_runtime_file_and_stays_small(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        sizes = {i.filename: i.compress_size for i in z.infolist()}
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    missing = [f for f in RUNTIME_FILES if f not in names]
    assert not missing, missing
    assert "carajax = carajax.cli:main" in entry_points
    assert not [n for n in names if n.startswith(("tests/", "data/", "scripts/"))]  # the clone's own
    # ~6 MB of demo weights and ~14 MB of SmolLM2 adapters (bfloat16, which barely compresses)
    assert sum(sizes.values()) < 24 * 2**20, sum(sizes.values())
