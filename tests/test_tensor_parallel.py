"""Tensor parallelism (carajax.parallel): sharding rules in-process, and the model over 2 and 4
(forced) CPU devices in a subprocess (XLA_FLAGS must be set before JAX initialises): logits and
greedy tokens (cached, wait, cpu_assist) equal the single-device ones, the compiled decode and
prefill steps communicate as Megatron does, and the Pallas LoRA kernels (interpret mode) run per
device shard under the mesh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import carajax
from carajax import parallel
from carajax.config import EngineConfig
from tests.conftest import assert_close

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


def test_cli_tp_errors_are_messages(capsys):
    from carajax import cli

    with pytest.raises(SystemExit,
                       match=r"carajax demo: error: --tp 3: tp=3 must divide ModelConfig.num_heads"):
        cli.main(["demo", "--model", "llama-test", "--tp", "3"])  # 4 heads, 2 KV heads
    with pytest.raises(SystemExit, match="num_kv_heads"):
        cli.main(["serve", "--model", "llama-test", "--tp", "4"])
    with pytest.raises(SystemExit):  # argparse: exit status 2 and a usage line
        cli.main(["serve", "--tp", "0"])
    assert "--tp: must be >= 1" in capsys.readouterr().err
    if len(jax.devices()) == 1:  # this process has one device unless XLA_FLAGS says otherwise
        with pytest.raises(SystemExit,
                           match="carajax serve: error: --tp 2: tp=2 needs 2 devices; 1 available"):
            cli.main(["serve", "--model", "llama-test", "--tp", "2"])


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags,
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "tp_check.py"),
                           str(tmp_path_factory.mktemp("tp-adapters"))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {int(k): v for k, v in json.loads(proc.stdout).items()}


@pytest.mark.parametrize("tp", [2])  # tp=4: the greedy tokens below (time: one engine at tp=4)
def test_logits_match_single_device(tp_results, tp):
    # Rows: base model, then adapters of rank 8, 16 and 32 (mixed in one batch).
    ref, ours = np.array(tp_results[1]["logits"]), np.array(tp_results[tp]["logits"])
    assert ref.shape == ours.shape == (4, 16, 256)
    for row in range(4):
        np.testing.assert_allclose(ours[row], ref[row], rtol=1e-4, atol=1e-4)
    assert np.abs(ref[1:] - ref[:1]).max() > 1e-2  # the adapters do change the logits


@pytest.mark.parametrize("tp, policy", [(2, "cached"), (2, "wait"), (4, "cpu_assist")])
def test_greedy_generation_identical(tp_results, tp, policy):
    out = tp_results[tp]
    assert out[policy] == tp_results[1]["cached"]
    if policy == "wait":
        assert out["stalled"] > 0 and out["wait_cpu_tokens"] == 0  # cold adapters loaded in-step
    if policy == "cpu_assist":
        assert out["cpu_tokens"] > 0  # cold prefills did run on the CPU, under the mesh


@pytest.mark.parametrize("tp", [2, 4])
def test_placement_and_collectives(tp_results, tp):
    specs = tp_results[tp]["specs"]
    # Per-layer kernels [d_in, d_out]: q column-parallel, o row-parallel.
    assert specs["q_kernel"] == str(P(None, "tp"))
    assert specs["o_kernel"] == str(P("tp", None))
    assert specs["cache"] == str(P(None, None, "tp"))  # [L, pages, KV heads, page, dim]
    assert specs["pool_a_q"] == str(P()) and specs["pool_b_q"] == str(P(None, None, "tp"))
    assert specs["pool_a_down"] == str(P(None, None, None, "tp")) and specs["pool_b_down"] == str(P())
    hlo = tp_results[tp]["hlo"]
    # The compiled layer (every layer runs it): one hidden-sized all-reduce after o_proj and one
    # after down_proj, and the LoRA row-parallel reductions of o and down, rank-sized: x A
    # against the compact rows [4 tokens, K x 16] in each branch of the page-count switch
    # (K = 1, 4, 8: 4 slots x 2 pages; jnp_ops.sgmv_compact), never hidden-sized; no
    # all-gather at all (so none of a full weight).
    # Hidden size 64: the hidden sums and the K = 4 branch's are both f32[4,64].
    want = ["f32[4,64]"] * 2 + ["f32[4,16]", "f32[4,64]", "f32[4,128]"] * 2
    assert sorted(hlo["all_reduce_shapes"]) == sorted(want), hlo["all_reduce_shapes"]
    assert hlo["all_gather_ops"] == 0 and hlo["all_gather"] == []
    for one in ("hlo", "hlo_prefill"):
        assert tp_results[1][one]["all_reduce"] == tp_results[1][one]["all_gather_ops"] == 0


@pytest.mark.parametrize("tp", [2, 4])
def test_prefill_collectives(tp_results, tp):
    # The compiled step of 4 prefill chunks of 16 tokens (adapters of ranks 8/16/32 and none),
    # flattened to T = 64: no all-gather; in the compiled layer a hidden-sized all-reduce
    # [T, hidden] after o_proj and after down_proj, and the jnp path's row-parallel LoRA sums,
    # rank-sized, in both forms a prefill step may take (`jnp_ops.prefill_uses_compact`): x A
    # per token block [5 blocks, 64 tokens, 16 or 32 rank rows] in the two branches of the
    # blocked form's page-count switch, and [64 tokens, K x 16] in the compact form's (K = 1,
    # 4, 8), never hidden-sized (hidden 64: the K = 4 branch's sum is f32[64,64] too); and the
    # same of the step's decodes, run apart (`jnp_ops.sgmv_prefill_group`): [4 rows, K x 16].
    hlo = tp_results[tp]["hlo_prefill"]
    assert hlo["all_gather_ops"] == 0 and hlo["all_gather"] == []
    want = (["f32[5,64,16]", "f32[5,64,32]"] * 2 + ["f32[64,16]", "f32[64,64]", "f32[64,128]"] * 2
            + ["f32[4,16]", "f32[4,64]", "f32[4,128]"] * 2 + ["f32[64,64]"] * 2)
    assert sorted(hlo["all_reduce_shapes"]) == sorted(want)


def test_pallas_kernels_under_mesh(tp_results):
    # lora_impl="interpret" at tp=2: the Pallas kernels run on each device's shard of the pages
    # (jax.shard_map), equal to the tp=1 jnp reference; rows: base, ranks 8, 16, 32.
    ref, out = np.array(tp_results[1]["logits"]), tp_results[2]["interpret"]
    ours, first = np.array(out["logits"]), np.array(out["logits_1"])  # sgmv / bgmv (1 token)
    assert ours.shape == ref.shape and first.shape == (4, 1, 256)
    for row in range(4):
        assert_close(ours[row], ref[row])
        assert_close(first[row], ref[row, :1])
    # No all-gather (left to GSPMD, a Pallas call's sharded pages would be gathered whole); in
    # each layer of the scoring program (2 layers, unrolled) an all-reduce of the base output
    # after o_proj and after down_proj, and the row-parallel LoRA psum [T, hidden] of each (in
    # the branch that runs when some sequence's adapter has the projection).
    for one in ("hlo", "hlo_prefill"):
        hlo = out[one]
        assert hlo["all_gather_ops"] == 0 and hlo["all_reduce"] == 4 * 2, (one, hlo)


def test_triton_kernels_lower_per_shard_for_cuda(tp_results):
    # No GPU here: the hook's Triton kernels under a tp=2 mesh are lowered for CUDA (not
    # compiled). Each device's kernels see its [tokens, d / 2] slice: B's output columns for
    # q_proj (no collective), x's input columns for o_proj (one psum of the partial deltas).
    low = tp_results[0]["cuda_lowering"]
    assert sorted(low) == ["o_proj/1", "o_proj/16", "q_proj/1", "q_proj/16"]
    for key, got in low.items():
        row_parallel = key.startswith("o_proj")
        assert got == {"triton": True, "per_device": True, "all_reduce": int(row_parallel),
                       "all_gather": 0}, key


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CARAJAX_MULTIPROCESS") != "1",
                    reason="~40 s on 2 cores; set CARAJAX_MULTIPROCESS=1")
def test_multiprocess_engine(tp_results, tmp_path):
    # jax.distributed across 2 processes (as on 2 hosts) of 2 CPU devices each: one tp=4 engine
    # over both, greedy tokens equal to one device's. Opt-in to keep CI short.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "tp_check.py"), str(tmp_path),
                               "--process", str(i), "--processes", "2",
                               "--coordinator", f"127.0.0.1:{port}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["process"] for r in results) == [0, 1]
    for r in results:
        assert r["processes"] == 2 and r["tp"] == 4 and r["mesh_processes"] == [0, 1]
        assert r["cached"] == tp_results[1]["cached"]
