"""`auto` on a GPU never runs an untested kernel by default (carajax.autotune): a shipped table
decides; else the forms recorded as verified compiled on the device kind, measured at warm-up
against the reference; else the reference. On CPU `auto` is the jnp path. A GPU is simulated
here (`autotune.device`, `platform=` overrides), the Pallas forms timed in interpret mode."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

import carajax
from carajax import autotune
from carajax.config import EngineConfig
from carajax.engine import kernel_timing
from carajax.lora import hook, kernel_table
from carajax.models import attention, paged_attention_pallas
from tests.conftest import rel_error
from tests.test_attention import make_case

REPO = Path(__file__).resolve().parents[1]
GPU = "Simulated GPU"  # a device kind no record or table names
ENGINE = EngineConfig(max_batch_size=2, max_step_tokens=32, max_prefill_tokens=32,
                      prefill_chunk=16, max_seq_len=64, kv_page_size=8, max_lora_rank=32,
                      lora_page_rank=16)


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """No measured choice, no table, the shipped record, before and after each test."""
    monkeypatch.setenv(kernel_table.ENV_TABLE, str(tmp_path / "no_table.json"))
    monkeypatch.delenv(autotune.ENV_RECORD, raising=False)
    autotune.reset()
    kernel_table.load.cache_clear()
    yield
    autotune.reset()
    kernel_table.load.cache_clear()


@pytest.fixture
def simulated_gpu(monkeypatch):
    monkeypatch.setattr(autotune, "device", lambda: ("gpu", GPU))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Calls of the attention's Pallas kernel, which runs interpreted here (compiled Pallas
    does not lower on CPU)."""
    calls = []
    real = paged_attention_pallas.paged_attention_pallas

    def spy(*args, interpret=False, **kw):
        calls.append(interpret)
        return real(*args, interpret=True, **kw)

    monkeypatch.setattr(paged_attention_pallas, "paged_attention_pallas", spy)
    return calls


def cases():
    """A decode-shaped (one token per sequence: query block 1) and a prefill-shaped case."""
    kw = dict(page_size=4, heads=4, kv_heads=2, head_dim=16)
    return {"decode": make_case(np.random.default_rng(0), [(9, 1), (5, 1)], num_tokens=2, **kw),
            "prefill": make_case(np.random.default_rng(1), [(12, 6), (4, 4)], **kw)}


# -- the decision -------------------------------------------------------------------------------
def test_decide():
    t = {"reference": 2.0, "pallas": 1.0, "fused": 3.0, "padded": 0.1}
    assert autotune.decide("cpu", table=True, verified={"pallas"}, timings=t) == "reference"
    assert autotune.decide("gpu", table=True, verified={"pallas"}, timings=t) == "table"
    # The fastest verified form; "padded" is faster but not verified: never chosen.
    assert autotune.decide("gpu", verified={"pallas", "fused"}, timings=t) == "pallas"
    assert autotune.decide("gpu", verified={"fused"}, timings=t) == "reference"
    assert autotune.decide("gpu", verified={"pallas"},
                           timings={"reference": 1.0, "pallas": 1.0}) == "reference"  # a tie
    assert autotune.decide("gpu", verified={"pallas"},
                           timings={"reference": 1.0, "pallas": float("nan")}) == "reference"
    assert autotune.decide("gpu", verified=(), timings=t) == "reference"  # nothing verified
    assert autotune.decide("gpu", verified={"pallas"}, timings=None) == "reference"  # unmeasured
    assert autotune.decide("gpu") == "reference"


# -- the measurement ----------------------------------------------------------------------------
def test_measure_times_the_callables():
    calls = {}

    def sleeper(name, seconds, value):
        def call():
            calls[name] = calls.get(name, 0) + 1
            time.sleep(seconds)
            return np.full(4, value, np.float32)
        return call

    def broken():
        raise RuntimeError("does not lower here")

    got = kernel_timing.measure({"slow": sleeper("slow", 0.02, 1.0), "wrong": sleeper("wrong", 0, 2.0),
                            "broken": broken, "reference": sleeper("reference", 0.002, 1.0)},
                           repeats=3, reference="reference", tolerance=1e-3)
    # A form that raises or disagrees with the reference is left out.
    assert set(got) == {"reference", "slow"}
    assert got["slow"] >= 0.02 and 0.002 <= got["reference"] < got["slow"]
    assert calls == {"reference": 4, "slow": 4, "wrong": 1}  # one untimed call + 3 rounds
    with pytest.raises(RuntimeError):  # the reference itself must run
        kernel_timing.measure({"reference": broken}, reference="reference")


@pytest.mark.slow  # ~25 s: interpret-mode kernels compile
def test_warm_up_times_the_verified_forms_on_a_simulated_gpu(simulated_gpu, tiny_config):
    """The GPU branch for real: every verified form and the reference timed on the engine's
    decode and prefill shapes (the Pallas forms interpreted); the choice is the fastest, and
    `auto` then runs it. The fused form has no interpret mode in the hook: compiled, it fails
    on CPU and is left out, as a form that fails on a device would be."""
    verified = {"attention": ["pallas"], "lora": ["pallas", "padded", "fused"]}
    choices = kernel_timing.warm_up(tiny_config, ENGINE, "float32", platform="gpu", device_kind=GPU,
                               verified=verified, interpret=True, repeats=2)
    for op, timed in (("attention", {"reference", "pallas"}),
                      ("lora", {"reference", "pallas", "padded"})):
        c = choices[op]
        assert c.source == "measured" and set(c.timings) == {"decode", "prefill"}
        for cls, t in c.timings.items():
            assert set(t) == timed and all(s > 0 for s in t.values())
            assert c.forms[cls] == min(t, key=lambda f: (t[f], f != "reference"))
    assert autotune.current(GPU) == choices
    att = choices["attention"].forms
    assert autotune.attention_impl(decode=True) == att["decode"]
    assert autotune.attention_impl(decode=False) == att["prefill"]
    lora = choices["lora"].forms
    impl = hook.resolve_lora_impl("auto")
    assert impl == (lora["decode"] if lora["decode"] == lora["prefill"] else "table")
    s = choices["lora"].shapes
    for cls in ("decode", "prefill"):  # the hook's per-step choice, from the measured table
        assert autotune.lora_table().choose(s.segments(cls)[0], s.seqs, s.max_rank) == lora[cls]
    # Once per process for the same engine: no second measurement.
    assert kernel_timing.warm_up(tiny_config, ENGINE, "float32", platform="gpu", device_kind=GPU,
                            verified=verified, interpret=True) is choices


def test_auto_runs_the_measured_fastest(monkeypatch, simulated_gpu, kernel_calls, tiny_config):
    """Injected timings: the kernel fastest on decode steps, the reference on prefill steps.
    paged_attention(auto) runs the kernel on a decode-shaped call only; the LoRA choice becomes
    a two-entry table."""
    fake = {"decode": {"reference": 2.0, "pallas": 1.0, "padded": 3.0},
            "prefill": {"reference": 1.0, "pallas": 2.0, "padded": 0.5}}
    timed = []

    def measure(candidates, repeats, **kw):
        cls = "decode" if len(timed) % 2 == 0 else "prefill"  # warm_up asks decode first
        timed.append(sorted(candidates))
        return {f: fake[cls][f] for f in candidates if f in fake[cls]}  # fused: left out

    monkeypatch.setattr(kernel_timing, "measure", measure)
    choices = kernel_timing.warm_up(tiny_config, ENGINE, "float32", verified={
        "attention": ["pallas"], "lora": ["pallas", "padded", "fused"]})
    assert timed == [["pallas", "reference"]] * 2 + [["fused", "padded", "pallas", "reference"]] * 2
    assert choices["attention"].forms == {"decode": "pallas", "prefill": "reference"}
    assert choices["lora"].forms == {"decode": "pallas", "prefill": "padded"}
    for cls, case in cases().items():
        kernel_calls.clear()
        out = attention.paged_attention(*case.args(), impl="auto")
        assert kernel_calls == ([False] if cls == "decode" else [])  # compiled, on a real GPU
        ref = attention.paged_attention(*case.args(), impl="reference")
        assert rel_error(out, ref) <= 1e-5
    assert hook.resolve_lora_impl("auto") == "table"
    s = choices["lora"].shapes
    assert hook.table_choice(s.decode_tokens, s.seqs, s.max_rank) == "pallas"
    assert hook.table_choice(s.prefill_tokens, s.seqs, s.max_rank) == "padded"


def test_auto_on_a_gpu_with_nothing_verified_runs_the_reference(monkeypatch, simulated_gpu,
                                                                kernel_calls, tiny_config):
    """No record entry for the device kind: warm-up measures nothing and `auto` never reaches
    the Pallas kernel; a record entry without a warm-up measurement changes nothing either."""
    def measure(*args, **kw):
        raise AssertionError("nothing to measure")

    monkeypatch.setattr(kernel_timing, "measure", measure)
    choices = kernel_timing.warm_up(tiny_config, ENGINE, "float32")  # the shipped record
    assert {op: c.source for op, c in choices.items()} == {"attention": "reference",
                                                           "lora": "reference"}
    for case in cases().values():
        np.testing.assert_array_equal(attention.paged_attention(*case.args(), impl="auto"),
                                      attention.paged_attention(*case.args(), impl="reference"))
    record = autotune.update_record({"devices": {}}, GPU, "attention", passed=["pallas"])
    monkeypatch.setattr(autotune, "load_record", lambda path=None: record)
    assert autotune.verified_forms(GPU)["attention"] == {"pallas"}
    for case in cases().values():
        attention.paged_attention(*case.args(), impl="auto")
    assert kernel_calls == []
    assert hook.resolve_lora_impl("auto") == "reference"
    assert hook.table_choice(8, 2, 32) == "reference"


def test_a_shipped_table_decides_first(monkeypatch, tmp_path, simulated_gpu, kernel_calls,
                                       tiny_config):
    table = {"device": "simulated_gpu", "attention": {"decode": "pallas", "prefill": "reference"},
             "entries": [{"tokens": 8, "segments": 2, "max_rank": 32, "best": "fused"}]}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(kernel_table.ENV_TABLE, str(path))
    kernel_table.load.cache_clear()
    monkeypatch.setattr(kernel_timing, "measure", lambda *a, **k: pytest.fail("a table ships"))
    choices = kernel_timing.warm_up(tiny_config, ENGINE, "float32",
                               verified={"attention": ["pallas"], "lora": ["pallas"]})
    assert {op: c.source for op, c in choices.items()} == {"attention": "table", "lora": "table"}
    assert autotune.attention_impl(decode=True) == "pallas"
    assert autotune.attention_impl(decode=False) == "reference"
    assert hook.resolve_lora_impl("auto") == "table"
    assert hook.table_choice(8, 2, 32) == "fused"
    attention.paged_attention(*cases()["decode"].args(), impl="auto")
    assert kernel_calls == [False]
    # A LoRA-only or attention-only table decides its own op alone.
    only = kernel_table.KernelTable.from_json({"attention": {"decode": "pallas"}})
    assert only.entries == {} and only.attention == {"decode": "pallas"}
    with pytest.raises(ValueError, match="attention"):
        kernel_table.KernelTable("x", {}, {"decode": "triton"})
    with pytest.raises(ValueError, match="no entries"):
        kernel_table.KernelTable("x", {})


def test_on_cpu_auto_is_the_jnp_path(tiny_config):
    if carajax.autotune.device()[0] == "gpu":
        pytest.skip("a CPU check")
    verified = {"attention": ["pallas"], "lora": ["pallas"]}
    choices = kernel_timing.warm_up(tiny_config, ENGINE, "float32", verified=verified)
    assert all(c.source == "reference" for c in choices.values())
    assert autotune.attention_impl(decode=True) == "reference"
    assert hook.resolve_lora_impl("auto") == "reference"
    assert hook.resolve_lora_impl("auto", platform="cpu") == "reference"
    assert autotune.current() == {}


def test_a_tensor_parallel_engine_is_not_measured(monkeypatch, simulated_gpu, tiny_config):
    monkeypatch.setattr(kernel_timing, "measure", lambda *a, **k: pytest.fail("measured under tp"))
    choices = kernel_timing.warm_up(tiny_config, EngineConfig(max_batch_size=2, tp=2), "float32",
                               verified={"attention": ["pallas"]})
    assert choices["attention"].source == "reference"


# -- the record -----------------------------------------------------------------------------------
def test_update_record_adds_and_removes_forms():
    doc = autotune.update_record({"about": "x", "devices": {}}, GPU, "lora",
                                 passed=["pallas", "padded"], provenance={"date": "d"})
    assert doc["devices"][GPU]["lora"] == {"pallas": {"date": "d"}, "padded": {"date": "d"}}
    assert autotune.verified_forms(GPU, doc) == {"attention": frozenset(),
                                                 "lora": {"pallas", "padded"}}
    doc = autotune.update_record(doc, GPU, "lora", failed=["pallas", "padded"])
    assert doc == {"about": "x", "devices": {}}  # empty entries go
    with pytest.raises(ValueError, match="unknown"):
        autotune.update_record(doc, GPU, "attention", passed=["fused"])


def test_the_shipped_record_is_package_data_and_well_formed():
    """Found from the package (not a clone's data/), and every entry a known form with its
    provenance, as the scripts write it (it ships empty until a GPU run fills it)."""
    root = Path(carajax.data.__file__).parent / "kernel_tables"
    assert autotune.RECORD_PATH == root / "verified.json" and kernel_table.TABLE_DIR == root
    doc = json.loads(autotune.RECORD_PATH.read_text())
    assert autotune.load_record() == doc
    for kind, ops in doc["devices"].items():
        for op, forms in ops.items():
            assert op in autotune.OPS and set(forms) <= set(autotune.FORMS[op]), (kind, op)
            for prov in forms.values():
                assert {"date", "commit", "jax", "check"} <= set(prov), (kind, op, prov)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def junit(cases: dict[str, list[str]]) -> str:
    """A JUnit report: per class, one test case per outcome ("passed", "failure", "skipped")."""
    rows = []
    for cls, outcomes in cases.items():
        for i, o in enumerate(outcomes):
            body = "" if o == "passed" else f"<{o} message='x'/>"
            rows.append(f"<testcase classname='tests.test_x.{cls}' name='t{i}'>{body}</testcase>")
    return f"<testsuites><testsuite>{''.join(rows)}</testsuite></testsuites>"


def test_record_verified_reads_the_compiled_classes():
    rv = _script("record_verified")
    for (path, cls), _ in rv.CHECKS.items():  # the classes it reads exist
        assert f"class {cls}(" in (REPO / path).read_text(), (path, cls)
    base = autotune.update_record({"devices": {}}, GPU, "lora", passed=["pallas", "fused"])
    doc = rv.update(base, junit({
        "TestPagedAttentionKernelGPU": ["passed", "passed"],  # all passed: recorded
        "TestKernelsGPU": ["passed", "failure"],  # a failure: pallas and padded removed
        "TestFusedGPU": ["skipped"],  # not a compiled run: fused left as it was
        "TestKernelsInterpret": ["passed"],  # interpret classes verify nothing
    }), GPU, {"date": "2026-12-03", "commit": "abc", "jax": "0"})
    assert autotune.verified_forms(GPU, doc) == {"attention": {"pallas"}, "lora": {"fused"}}
    prov = doc["devices"][GPU]["attention"]["pallas"]
    assert prov["commit"] == "abc" and "TestPagedAttentionKernelGPU (2 passed)" in prov["check"]
