"""Tensor-parallel checks, run by tests/test_tensor_parallel.py in a subprocess.

XLA_FLAGS (the CPU device count) must be set before JAX initialises, so these checks cannot run
in the pytest process. Prints one JSON object: per tp, greedy tokens (`cached` at tp=1 and 2,
`wait` at tp=2, `cpu_assist` at tp=4), the pool's shardings and the collectives in the compiled
decode and prefill steps; full-sequence logits with and without adapters of mixed ranks at tp=1
and 2 (tp=4 runs one engine only, to keep this check short); at
tp=2 also logits and collectives with the Pallas kernels (interpret mode) run per shard, and
the Triton kernels under the mesh lowered for CUDA.

`tp_check.py OUT_DIR --process I --processes N --coordinator HOST:PORT` is instead one process
of a multi-process run (`jax.distributed.initialize`, CPU collectives over gloo): every process
runs this same program, with tp = all processes' devices, and prints its greedy tokens.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import carajax
from carajax import parallel
from carajax.config import ATTENTION_MODULES, TARGET_MODULES, EngineConfig
from carajax.engine import runner as runner_mod
from carajax.lora.hook import BatchLora
from carajax.lora.pool import PagedLoraWeights
from carajax.models import weights
from carajax.models.llama import PagedKVCache, dense_batch
from carajax.models.tokenizer import ByteTokenizer
from carajax.testing import write_random_adapter

# 4 KV heads so tp=4 divides them (llama-test has 2).
CONFIG = carajax.ModelConfig(name="tp-test", vocab_size=256, hidden_size=64, intermediate_size=128,
                             num_layers=2, num_heads=4, num_kv_heads=4, bos_token_id=2,
                             eos_token_ids=(3,), max_position_embeddings=256)
RANKS = {"r8": 8, "r16": 16, "r32": 32}
GREEDY = carajax.SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=())
# Prompts of one chunk each and one batch of 4 rows: every run compiles only one prefill and one
# decode variant (XLA compiles dominate this check's time on CPU).
PROMPTS = [[2, *np.random.default_rng(i).integers(4, 256, n).tolist()]
           for i, n in enumerate([15, 4, 11, 8])]
ADAPTERS = ["r8", None, "r32", "r16"]
R_MAX = 32  # the pool's padded rank; not hidden_size, so HLO shapes tell rank-sized from hidden-sized


def engine(tp: int, dirs: dict, policy: str, lora_impl: str = "auto") -> carajax.Engine:
    model = weights.random_model(CONFIG, seed=0, init_std=0.1)
    link = {} if policy == "cached" else dict(emulated_link_gbps=1.0, emulated_link_latency_ms=20)
    e = carajax.Engine(model, ByteTokenizer(), EngineConfig(
        tp=tp, max_batch_size=4, prefill_chunk=16, max_seq_len=64, cold_start=policy,
        max_lora_rank=R_MAX, lora_impl=lora_impl, **link), background=False)
    for name, path in dirs.items():
        e.add_adapter(name, path)
    return e


def logits(e: carajax.Engine, T: int = 16) -> tuple[list, dict]:
    """Full-sequence logits [4, T, V] of PROMPTS[0][:T] in one batch whose rows use no adapter
    and ranks 8, 16, 32 (T > 1 runs the LoRA prefill ops, sgmv; T = 1 the decode ones, bgmv),
    and the collectives of that compiled program (lowered with the same arguments, so the
    compile comes from JAX's cache)."""
    r = e.runner
    batch, pages = dense_batch(4, T, r.layout.page_size)
    batch = dataclasses.replace(batch, tokens=np.tile(np.array(PROMPTS[0][:T], np.int32), 4))
    cache = PagedKVCache.zeros(CONFIG, pages, r.layout.page_size, r.dtype)
    slots = np.array([-1, *(e.pool.slot(a) for a in RANKS)], np.int32)
    args = (r.graphdef, r.state, e.pool.weights, batch, cache, slots)
    kw = dict(use_lora=True, impl=r.lora_impl, pad=r.pad)
    out = np.asarray(runner_mod._score(*args, **kw)).reshape(4, T, -1)
    return out.tolist(), _collectives(runner_mod._score.lower(*args, **kw).compile().as_text())


def collectives(e: carajax.Engine, Tq: int = 1) -> dict:
    """all-reduce count and all-gather result shapes of the compiled decoder layer (the piece of
    the step every layer runs) for 4 sequences with adapters of mixed ranks: decode (Tq=1) or
    prefill chunks (Tq=16), as one flattened batch."""
    r, B = e.runner, 4
    T = r.token_bucket(B * Tq, Tq == 1)
    batch, slots, cpu_rows, cpu_ids, _ = r._dry_inputs(T, None, 0)
    slots[:B] = [e.pool.slot(a) if a else -1 for a in ADAPTERS]
    x = jax.ShapeDtypeStruct((T, CONFIG.hidden_size), r.dtype)
    lowered = runner_mod._layer.lower(
        r.layer_graphdef, r.layer_states[0], r.layer_ids[0], x, r.cache, batch, r.inv_freq,
        e.pool.weights, slots, cpu_rows, cpu_ids, r._compact(batch, slots, True), use_lora=True,
        impl=r.lora_impl, pad=r.pad, bridge=None, block=r.query_block(T, Tq == 1))
    return _collectives(lowered.compile().as_text())


def _collectives(text: str) -> dict:
    """Collectives in compiled HLO text: all-reduce count and result shapes (a tuple where XLA
    combined several into one op; layouts dropped), all-gather count and result shapes."""
    gathers = re.findall(r"= (\w+\[[\d,]*\])[^=\n]*? all-gather(?:-start)?\(", text)
    reduces = [re.sub(r"\{[^}]*\}", "", shape) for shape in
               re.findall(r"= (\S+|\([^)]*\)) all-reduce(?:-start)?\(", text)]
    return {"all_reduce": len(re.findall(r" all-reduce(?:-start)?\(", text)),
            "all_reduce_shapes": reduces, "all_gather": gathers,
            "all_gather_ops": len(re.findall(r" all-gather(?:-start)?\(", text))}


def cuda_lowering() -> dict:
    """The hook's Triton kernels (lora_impl="pallas") under a tp=2 mesh, lowered for CUDA without
    a GPU (tracing and lowering only, no compile), for a column- (q_proj) and a row-parallel
    (o_proj) module, decode (bgmv) and prefill (sgmv): whether the Triton calls are there, whether
    they see per-device [tokens, d / 2] shapes, and the collectives of the lowered program."""
    sds, bf16, i32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.int32
    d, pages, pr, S, B = 256, 8, 16, 4, 4  # one layer; S slots of r_max 2 * pr
    mods = ("q_proj", "o_proj")
    w = PagedLoraWeights(a={m: sds((1, pages, pr, d), bf16) for m in mods},
                         b={m: sds((1, pages, d, pr), bf16) for m in mods},
                         page_table=sds((S, 2), i32), ranks={m: sds((1, S), i32) for m in mods},
                         scales={m: sds((1, S), jnp.float32) for m in mods},
                         mesh=parallel.make_mesh(2))
    out = {}
    for m in mods:
        for Tq in (1, 16):
            def delta(w, x, starts, lens, slots, m=m):
                return BatchLora(w, starts, lens, slots, "pallas")(0, (m,), x)[0]

            text = jax.jit(delta).trace(w, sds((B * Tq, d), bf16), sds((B,), i32), sds((B,), i32),
                                        sds((B,), i32)).lower(lowering_platforms=("cuda",)).as_text()
            out[f"{m}/{Tq}"] = {"triton": "triton" in text.lower(),
                                "per_device": f"tensor<{B * Tq}x{d // 2}xbf16>" in text,
                                "all_reduce": text.count("all_reduce"),
                                "all_gather": text.count("all_gather")}
    return out


def adapters(out_dir: str) -> dict:
    return {n: write_random_adapter(f"{out_dir}/{n}", CONFIG, rank=r, seed=i,
                                    target_modules=TARGET_MODULES if i % 2 == 0 else ATTENTION_MODULES)
            for i, (n, r) in enumerate(RANKS.items())}


def multiprocess(out_dir: str, process: int, processes: int, coordinator: str) -> None:
    """One of `processes` processes (one per host in real use) that together run one engine over
    every process's devices. JAX is multi-controller: each process runs the same steps in the
    same order, which `cached` and the same `generate` call everywhere guarantee."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; GPUs use NCCL
    jax.distributed.initialize(coordinator, num_processes=processes, process_id=process)
    with engine(jax.device_count(), adapters(f"{out_dir}/p{process}"), "cached") as e:
        tokens = [o.token_ids for o in e.generate(PROMPTS, adapters=ADAPTERS, sampling=GREEDY)]
        mesh = e.runner.mesh
        print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                          "tp": mesh.size, "mesh_processes": sorted({d.process_index
                                                                     for d in mesh.devices.flat}),
                          "cached": tokens}))


def main(out_dir: str) -> None:
    dirs = adapters(out_dir)
    res, t0 = {}, time.perf_counter()
    res[0] = {"cuda_lowering": cuda_lowering()}  # key 0: no engine
    print(f"cuda lowering {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for tp in (1, 2, 4):
        out = res[tp] = {}
        # tp=1 and 2: `cached` (the reference, and logits beside it); tp=4 runs `cpu_assist` only
        # (it compiles variants of its own; a second tp=4 engine would double this check's time).
        with engine(tp, dirs, "cpu_assist" if tp == 4 else "cached") as e:
            if tp < 4:
                out["logits"], _ = logits(e)
            outs = e.generate(PROMPTS, adapters=ADAPTERS, sampling=GREEDY)
            out[e.config.cold_start] = [o.token_ids for o in outs]
            out["cpu_tokens"] = sum(o.metrics.cpu_prefill_tokens for o in outs)
            out["specs"] = {k: str(getattr(x.sharding, "spec", None)) for k, x in (
                ("pool_a_q", e.pool.weights.a["q_proj"]), ("pool_b_q", e.pool.weights.b["q_proj"]),
                ("pool_a_down", e.pool.weights.a["down_proj"]),
                ("pool_b_down", e.pool.weights.b["down_proj"]), ("cache", e.runner.cache.k),
                ("q_kernel", e.runner.state["layers"][0]["self_attn"]["q_proj"]["kernel"].value),
                ("o_kernel", e.runner.state["layers"][0]["self_attn"]["o_proj"]["kernel"].value))}
            print(f"tp={tp} {e.config.cold_start} {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            out["hlo"] = collectives(e)
            out["hlo_prefill"] = collectives(e, Tq=16)
            print(f"tp={tp} hlo {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if tp == 2:  # the Pallas kernels (interpret mode) run per device shard (shard_map)
            with engine(tp, dirs, "cached", lora_impl="interpret") as e:
                out["interpret"] = dict(zip(("logits", "hlo_prefill"), logits(e)))
                # One token: the decode kernels (bgmv) in the same forward; position 0's logits.
                out["interpret"]["logits_1"], out["interpret"]["hlo"] = logits(e, T=1)
            print(f"tp={tp} interpret {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            # The reference for every policy is tp=1 `cached` (tests/test_engine.py shows the
            # policies agree on one device); `wait` reuses the `cached` variants.
            with engine(tp, dirs, "wait") as e:
                outs = e.generate(PROMPTS, adapters=ADAPTERS, sampling=GREEDY)
                out["wait"] = [o.token_ids for o in outs]
                out["wait_cpu_tokens"] = sum(o.metrics.cpu_prefill_tokens for o in outs)
                out["stalled"] = sum(o.metrics.stalled_s > 0 for o in outs)
            print(f"tp={tp} wait {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    if "--process" in sys.argv:
        import argparse

        ap = argparse.ArgumentParser()
        ap.add_argument("out_dir")
        ap.add_argument("--process", type=int, required=True)
        ap.add_argument("--processes", type=int, required=True)
        ap.add_argument("--coordinator", required=True)
        a = ap.parse_args()
        multiprocess(a.out_dir, a.process, a.processes, a.coordinator)
    else:
        main(sys.argv[1])
