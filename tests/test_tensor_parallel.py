"""Tensor parallelism (carajax.parallel): sharding rules in-process, and the model over 2 and 4
(forced) CPU devices in a subprocess (XLA_FLAGS must be set before JAX initialises): logits and
greedy tokens (cached, wait, cpu_assist) equal the single-device ones, and the compiled step
communicates as Megatron does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import carajax
from carajax import parallel
from carajax.config import EngineConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def _path(*names):
    return tuple(jax.tree_util.DictKey(n) for n in names)


def test_megatron_rules():
    kernel = lambda layer, group, m: _path("layers", layer, group, m, "kernel")  # noqa: E731
    for m in ("q_proj", "k_proj", "v_proj"):
        assert parallel.param_spec(kernel(0, "self_attn", m), 2) == P(None, "tp")
    for m in ("gate_proj", "up_proj"):
        assert parallel.param_spec(kernel(1, "mlp", m), 2) == P(None, "tp")
    assert parallel.param_spec(kernel(0, "self_attn", "o_proj"), 2) == P("tp", None)
    assert parallel.param_spec(kernel(0, "mlp", "down_proj"), 2) == P("tp", None)
    for path, ndim in ((_path("embed_tokens"), 2), (_path("lm_head", "kernel"), 2),
                       (_path("norm", "weight"), 1), (_path("inv_freq"), 1)):
        assert parallel.param_spec(path, ndim) == P()
    # LoRA pages follow the base weight: column-parallel B along d_out, row-parallel A along d_in.
    assert parallel.lora_page_specs("q_proj") == (P(), P(None, None, "tp", None))
    assert parallel.lora_page_specs("down_proj") == (P(None, None, None, "tp"), P())


def test_tp_validation():
    cfg = carajax.ModelConfig.from_name("llama-test")  # 4 heads, 2 KV heads
    parallel.check_tp(cfg, 2)
    with pytest.raises(ValueError, match="num_kv_heads"):
        parallel.check_tp(cfg, 4)
    with pytest.raises(ValueError, match="devices"):
        parallel.make_mesh(len(jax.devices()) + 1)
    with pytest.raises(ValueError, match="tp"):
        EngineConfig(tp=0)
    assert EngineConfig().tp == 1


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "tp_check.py"),
                           str(tmp_path_factory.mktemp("tp-adapters"))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {int(k): v for k, v in json.loads(proc.stdout).items()}


@pytest.mark.parametrize("tp", [2, 4])
def test_logits_match_single_device(tp_results, tp):
    # Rows: base model, then adapters of rank 8, 16 and 32 (mixed in one batch).
    ref, ours = np.array(tp_results[1]["logits"]), np.array(tp_results[tp]["logits"])
    assert ref.shape == ours.shape == (4, 16, 256)
    for row in range(4):
        np.testing.assert_allclose(ours[row], ref[row], rtol=1e-4, atol=1e-4)
    assert np.abs(ref[1:] - ref[:1]).max() > 1e-2  # the adapters do change the logits


@pytest.mark.parametrize("tp, policy", [(2, "cached"), (2, "wait"), (4, "cached"), (4, "cpu_assist")])
def test_greedy_generation_identical(tp_results, tp, policy):
    out = tp_results[tp]
    assert out[policy] == tp_results[1]["cached"]
    if policy == "wait":
        assert out["stalled"] > 0 and out["cpu_tokens"] == 0  # cold adapters loaded in-step
    if policy == "cpu_assist":
        assert out["cpu_tokens"] > 0  # cold prefills did run on the CPU, under the mesh


@pytest.mark.parametrize("tp", [2, 4])
def test_placement_and_collectives(tp_results, tp):
    specs = tp_results[tp]["specs"]
    assert specs["q_kernel"] == str(P(None, "tp")) and specs["o_kernel"] == str(P("tp", None))
    assert specs["cache"] == str(P(None, None, "tp"))  # KV heads
    assert specs["pool_a_q"] == str(P()) and specs["pool_b_q"] == str(P(None, None, "tp"))
    assert specs["pool_a_down"] == str(P(None, None, None, "tp")) and specs["pool_b_down"] == str(P())
    hlo = tp_results[tp]["hlo"]
    # One all-reduce after o_proj and one after down_proj per layer (2 layers), the LoRA
    # row-parallel reduction included; no all-gather at all (so none of a full weight).
    assert hlo["all_reduce"] == 4
    assert hlo["all_gather_ops"] == 0 and hlo["all_gather"] == []
    assert tp_results[1]["hlo"] == {"all_reduce": 0, "all_gather": [], "all_gather_ops": 0}
