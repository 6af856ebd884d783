"""lora_impl="auto" by measurement: a kernel table (what scripts/bench_kernels.py --write-table
writes) picks the implementation per step shape; without a table, or off GPU, the reference."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import carajax
from carajax.lora import hook, kernel_table, kernels

# Hand-written: few tokens in many segments (decode) -> fused; one long segment -> padded;
# many tokens in a few segments -> the reference; a pool of r_max 16 -> pallas.
TABLE = {"device": "test", "entries": [
    {"tokens": 8, "segments": 8, "max_rank": 32, "best": "fused"},
    {"tokens": 8, "segments": 1, "max_rank": 32, "best": "padded"},
    {"tokens": 256, "segments": 2, "max_rank": 32, "best": "reference"},
    {"tokens": 8, "segments": 8, "max_rank": 16, "best": "pallas"},
]}


@pytest.fixture
def table_file(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(TABLE))
    monkeypatch.setenv(kernel_table.ENV_TABLE, str(path))
    kernel_table.load.cache_clear()
    yield path
    kernel_table.load.cache_clear()


def test_bucket_and_device_name():
    assert [kernel_table.bucket(n) for n in (0, 1, 2, 3, 8, 9, 4096)] == [1, 1, 2, 4, 8, 16, 4096]
    assert kernel_table.device_name("NVIDIA H200") == "nvidia_h200"


def test_choose_nearest_bucket():
    t = kernel_table.KernelTable.from_json(TABLE)
    assert t.choose(8, 8, 32) == "fused"
    assert t.choose(5, 7, 32) == "fused"  # buckets 8, 8
    assert t.choose(6, 1, 32) == "padded"
    assert t.choose(300, 2, 32) == "reference"  # bucket 512: nearest is 256
    assert t.choose(8, 8, 16) == "pallas"
    assert t.choose(8, 8, 8) == "pallas"  # nearest max rank first
    with pytest.raises(ValueError, match="unknown choices"):
        kernel_table.KernelTable("x", {(1, 1, 16): "triton"})


def test_table_from_rows_sums_a_bucket():
    rows = [  # two rank mixes with one max rank fall in one bucket: their times add up
        {"tokens": 60, "segments": 4, "max_rank": 64,
         "choice_ms": {"fused": 1.0, "pallas": 3.0, "padded": 2.0, "reference": 4.0}},
        {"tokens": 64, "segments": 4, "max_rank": 64,
         "choice_ms": {"fused": 5.0, "pallas": 1.0, "padded": 1.5, "reference": 4.0}},
        {"tokens": 1, "segments": 1, "max_rank": 8,
         "choice_ms": {"fused": 1.0, "pallas": 1.0, "padded": 1.0, "reference": 0.5}},
    ]
    doc = kernel_table.table_from_rows(rows, device="test")
    best = {(e["tokens"], e["segments"], e["max_rank"]): e["best"] for e in doc["entries"]}
    # Bucket (64, 4, 64): fused 1 + 5 = 6, pallas 3 + 1 = 4, padded 2 + 1.5 = 3.5, reference 8.
    assert best == {(64, 4, 64): "padded", (1, 1, 8): "reference"}
    assert kernel_table.KernelTable.from_json(json.loads(json.dumps(doc))).choose(64, 4, 64) \
        == "padded"


def test_auto_without_table_or_off_gpu_is_the_reference(tmp_path, monkeypatch, table_file):
    assert hook.resolve_lora_impl("auto", platform="cpu") == "reference"  # a table changes nothing
    assert hook.resolve_lora_impl("auto", platform="gpu") == "table"
    monkeypatch.setenv(kernel_table.ENV_TABLE, str(tmp_path / "missing.json"))
    kernel_table.load.cache_clear()
    assert hook.resolve_lora_impl("auto", platform="gpu") == "reference"
    assert hook.table_choice(8, 8, 32) == "reference"
    assert hook.resolve_lora_impl("fused") == "fused"
    assert carajax.EngineConfig(lora_impl="fused").lora_impl == "fused"


def test_auto_picks_what_the_table_says(monkeypatch, table_file):
    """The hook with a table runs, per step shape, the table's choice (interpreted off GPU): spies
    record which implementation ran; every one gives the reference's answer."""
    assert hook.resolve_lora_impl("auto", platform="gpu") == "table"
    ran = []

    def spy(name, real):
        def call(*args, **kw):
            ran.append((name, kw.get("pad_to_max_rank")))
            return real(*args, **kw)
        return call

    monkeypatch.setattr(hook, "sgmv_fused", spy("fused", hook.sgmv_fused))
    monkeypatch.setattr(kernels, "sgmv", spy("pallas", kernels.sgmv))
    monkeypatch.setattr(kernels, "sgmv_reference", spy("reference", kernels.sgmv_reference))
    monkeypatch.setattr(hook.jnp_ops, "sgmv_compact", spy("reference", hook.jnp_ops.sgmv_compact))
    monkeypatch.setattr(hook.jnp_ops, "sgmv_blocked", spy("reference", hook.jnp_ops.sgmv_blocked))
    P, pr, d = 4, 16, 8
    rng = np.random.default_rng(0)
    w = carajax.lora.pool.PagedLoraWeights(
        a={"q_proj": jnp.asarray(rng.standard_normal((1, P, pr, d)), jnp.float32)},
        b={"q_proj": jnp.asarray(rng.standard_normal((1, P, d, pr)), jnp.float32)},
        page_table=jnp.array([[0, 1], [2, 3]], jnp.int32),  # r_max 32
        ranks={"q_proj": jnp.array([[32, 5]], jnp.int32)},
        scales={"q_proj": jnp.ones((1, 2), jnp.float32)})

    def run(impl, T, G):  # G segments of T // G tokens, slots alternating 0, 1
        n = T // G
        lora = hook.BatchLora(w, jnp.arange(G, dtype=jnp.int32) * n, jnp.full(G, n, jnp.int32),
                              jnp.arange(G, dtype=jnp.int32) % 2, impl)
        x = jnp.asarray(np.random.default_rng(T).standard_normal((T, d)), jnp.float32)
        return lora(0, ("q_proj",), x)[0]

    for (T, G), want in {(8, 8): ("fused", False), (8, 1): ("pallas", True),
                         (256, 2): ("reference", None)}.items():
        ran.clear()
        got = run("table", T, G)
        # A prefill shape traces both jnp forms (each step runs one: `prefill_uses_compact`).
        assert sorted(set(ran)) == [want] and len(ran) == (2 if T == 256 else 1), (T, G, ran)
        np.testing.assert_allclose(got, run("reference", T, G), rtol=1e-5, atol=1e-5)
