"""Tensor-parallel checks, run by tests/test_tensor_parallel.py in a subprocess.

XLA_FLAGS (the CPU device count) must be set before JAX initialises, so these checks cannot run
in the pytest process. Prints one JSON object: per tp, last-token logits with and without
adapters of mixed ranks, greedy tokens under `cached`, `wait` (tp=2) and `cpu_assist`
(tp=4), the pool's shardings, and
the collectives in the compiled decode step.
"""

from __future__ import annotations

import json
import re
import sys
import time

import numpy as np

import carajax
from carajax import runner as runner_mod
from carajax.config import ATTENTION_MODULES, TARGET_MODULES, EngineConfig
from carajax.models import weights
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


def engine(tp: int, dirs: dict, policy: str) -> carajax.Engine:
    model = weights.random_model(CONFIG, seed=0, init_std=0.1)
    link = {} if policy == "cached" else dict(emulated_link_gbps=1.0, emulated_link_latency_ms=20)
    e = carajax.Engine(model, ByteTokenizer(), EngineConfig(
        tp=tp, max_batch_size=4, prefill_chunk=16, max_seq_len=64, cold_start=policy, **link),
        background=False)
    for name, path in dirs.items():
        e.add_adapter(name, path)
    return e


def logits(e: carajax.Engine) -> list:
    """Full-sequence logits [4, 16, V] of one batch whose rows use no adapter and ranks 8, 16, 32."""
    r, T = e.runner, len(PROMPTS[0])
    tokens = np.zeros((4, 16), np.int32)
    tokens[:, :T] = PROMPTS[0]
    slots = np.array([-1, *(e.pool.slot(a) for a in RANKS)], np.int32)
    out = runner_mod._score(r.graphdef, r.state, e.pool.weights, tokens, slots,
                            np.full(4, T, np.int32), use_lora=True, impl=r.lora_impl, pad=r.pad)
    return np.asarray(out)[:, :T].tolist()


def collectives(e: carajax.Engine) -> dict:
    """all-reduce count and all-gather result shapes of the compiled decode step (B=4)."""
    r, B = e.runner, 4
    z = np.zeros((B, 1), np.int32)
    slots = np.array([e.pool.slot(a) if a else -1 for a in ADAPTERS], np.int32)
    text = runner_mod._step.lower(
        r.graphdef, r.state, e.pool.weights, r.cache, z, z, np.arange(B, dtype=np.int32), slots,
        np.full(B, -1, np.int32), np.ones(B, np.int32), np.zeros(B, np.int32),
        use_lora=True, impl=r.lora_impl, bridge=None, pad=r.pad).compile().as_text()
    gathers = re.findall(r"= (\w+\[[\d,]*\])[^=\n]*? all-gather(?:-start)?\(", text)
    return {"all_reduce": len(re.findall(r" all-reduce(?:-start)?\(", text)), "all_gather": gathers,
            "all_gather_ops": len(re.findall(r" all-gather(?:-start)?\(", text))}


def main(out_dir: str) -> None:
    dirs = {n: write_random_adapter(f"{out_dir}/{n}", CONFIG, rank=r, seed=i,
                                    target_modules=TARGET_MODULES if i % 2 == 0 else ATTENTION_MODULES)
            for i, (n, r) in enumerate(RANKS.items())}
    res, t0 = {}, time.perf_counter()
    for tp in (1, 2, 4):
        out = res[tp] = {}
        with engine(tp, dirs, "cached") as e:
            out["logits"] = logits(e)
            out["cached"] = [o.token_ids for o in e.generate(PROMPTS, adapters=ADAPTERS, sampling=GREEDY)]
            out["specs"] = {k: str(getattr(x.sharding, "spec", None)) for k, x in (
                ("pool_a_q", e.pool.weights.a["q_proj"]), ("pool_b_q", e.pool.weights.b["q_proj"]),
                ("pool_a_down", e.pool.weights.a["down_proj"]),
                ("pool_b_down", e.pool.weights.b["down_proj"]), ("cache", e.runner.cache.k[0]),
                ("q_kernel", e.runner.state["layers"][0]["self_attn"]["q_proj"]["kernel"].value),
                ("o_kernel", e.runner.state["layers"][0]["self_attn"]["o_proj"]["kernel"].value))}
            print(f"tp={tp} cached {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            out["hlo"] = collectives(e)
            print(f"tp={tp} hlo {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        # The reference for every policy is tp=1 `cached` (tests/test_engine.py shows the
        # policies agree on one device). `wait` reuses the `cached` variants; `cpu_assist`
        # compiles its own, so it runs at tp=4 only to keep this check short.
        policy = {2: "wait", 4: "cpu_assist"}.get(tp)
        if policy:
            with engine(tp, dirs, policy) as e:
                outs = e.generate(PROMPTS, adapters=ADAPTERS, sampling=GREEDY)
                out[policy] = [o.token_ids for o in outs]
                out["cpu_tokens"] = sum(o.metrics.cpu_prefill_tokens for o in outs)
                out["stalled"] = sum(o.metrics.stalled_s > 0 for o in outs)
            print(f"tp={tp} {policy} {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1])
