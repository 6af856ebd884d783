"""carajax against Hugging Face `transformers` + `peft`: same model, adapters and requests, greedy.

Both stacks run in this one process on the same random Llama, saved once as a HF checkpoint
directory (so both load the SAME float32 weights), with the same PEFT LoRA adapters (ranks 8, 16,
32, 64, ... on q/k/v/o, lora_B random: PEFT initialises it to zero) and the same prompts.

Workloads (each request uses adapter i % n_adapters):
  * fixed: 16 requests x 64 random prompt tokens x 32 new tokens;
  * trace: the first 48 requests of the Azure LLM 2023 conversation trace (prompt clipped to 512,
    output to 128, random token ids). HF runs them as a user would: batches of 16 in arrival
    order, left padding, `generate(..., adapter_names=[...])`, each batch generating its longest
    request's length; only each request's own output length counts as useful tokens. carajax
    gets all requests at once (`Engine.generate`, per-request `SamplingParams(max_tokens=L_i)`).

EOS never stops a request early on either side: the checkpoint has no EOS token
(`eos_token_id=None`, which HF's generate then never checks), and carajax requests pass
`stop_token_ids=()`. Every output's length is checked.

Before timing: carajax compiles (`Engine.warmup`) and runs one untimed generate of the same
workload shape (different prompt tokens); HF runs one untimed batch. Timed run r uses prompts
drawn from seed + r, identical for both systems; with --repeats N the tok/s are medians.

    python scripts/bench_vs_hf.py [--workloads fixed,trace] [--repeats 1] [--out results/bench_vs_hf.json]
    python scripts/bench_vs_hf.py --quick          # tiny sizes, a smoke test

Prints a markdown table (useful tokens/s per system, carajax/HF ratio, requests whose greedy
token ids are identical, and carajax again with async scheduling off, the same engine
waiting for every step's tokens, run right after it on the same prompts) and writes JSON with
machine info and per-request disagreements (first differing position). Progress: stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

# The machine record, paths and progress log are bench_step's (this script's directory is on
# sys.path when it runs).
from bench_step import TRACE, log
from bench_step import machine_info as base_machine_info


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="fixed,trace", help="comma-separated: fixed, trace")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per system (median)")
    p.add_argument("--out", default=os.path.join("results", "bench_vs_hf.json"))
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test (2 layers, hidden 128, vocab 1000, 4 requests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="time HF at this thread count only (default: at 1 thread and at all "
                        "cores, each run, the faster median is HF's number). On a busy 2-core "
                        "box, 2 OpenMP threads can be several times slower than 1")
    p.add_argument("--model", default=None, help="a real model instead of the random Llama: a "
                   "name carajax pulls (smollm2-135m-instruct) or an HF-layout directory, with its "
                   "shipped adapters (carajax.demo.adapter_dirs) unless --adapter-dirs says otherwise "
                   "(default: the random Llama below)")
    p.add_argument("--adapter-dirs", default=None, metavar="NAME=DIR,...",
                   help="with --model: these PEFT adapters (default: the model's shipped ones)")
    m = p.add_argument_group("base model (random Llama, float32)")
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--hidden", type=int, default=512)
    m.add_argument("--intermediate", type=int, default=1376)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    m.add_argument("--vocab", type=int, default=32000)
    m.add_argument("--init-std", type=float, default=0.02, help="HF initializer_range")
    m.add_argument("--max-positions", type=int, default=2048)
    m.add_argument("--tie-embeddings", action="store_true", help="lm_head = the embedding (SmolLM2)")
    m.add_argument("--smollm2-shape", action="store_true",
                   help="SmolLM2-135M's shape: 30 layers, hidden 576, intermediate 1536, 9 / 3 "
                        "heads, vocab 49,152, tied embeddings (random weights)")
    a = p.add_argument_group("adapters")
    a.add_argument("--ranks", default="8,16,32,64,8,16,32,64",
                   help="one adapter per rank, on q/k/v/o; request i uses adapter i %% n")
    a.add_argument("--lora-std", type=float, default=0.05, help="std of lora_A and lora_B")
    w = p.add_argument_group("workloads")
    w.add_argument("--requests", type=int, default=16, help="fixed: requests")
    w.add_argument("--prompt-len", type=int, default=64, help="fixed: prompt tokens")
    w.add_argument("--new-tokens", type=int, default=32, help="fixed: generated tokens")
    w.add_argument("--trace", default=TRACE)
    w.add_argument("--trace-requests", type=int, default=48, help="trace: first N rows")
    w.add_argument("--max-prompt", type=int, default=512, help="trace: prompt clip")
    w.add_argument("--max-output", type=int, default=128, help="trace: output clip")
    w.add_argument("--batch-size", type=int, default=16,
                   help="HF batch size and carajax max_batch_size")
    e = p.add_argument_group("carajax engine")
    e.add_argument("--max-seq-len", type=int, default=None,
                   help="longest context per request; default: --max-positions (the model's)")
    e.add_argument("--max-lora-rank", type=int, default=64)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.heads = 2, 128, 344, 4
        args.vocab, args.max_positions = 1000, 512
        args.requests, args.prompt_len, args.new_tokens = 4, 16, 8
        args.trace_requests, args.max_prompt, args.max_output, args.batch_size = 4, 96, 48, 2
    if args.smollm2_shape:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads = 30, 576, 1536, 9, 3
        args.vocab, args.tie_embeddings = 49152, True
    args.kv_heads = args.kv_heads or args.heads
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for wl in args.workloads:
        if wl not in ("fixed", "trace"):
            p.error(f"unknown workload {wl!r}; choose from fixed, trace")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


# -- machine ----------------------------------------------------------------------------------
def quiet_hf() -> None:
    """No download/shard progress bars or deprecation chatter from transformers on stderr."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def machine_info() -> dict:
    """bench_step's record of the machine, plus the torch / transformers / peft side."""
    import peft
    import torch
    import transformers

    return {**base_machine_info(), "torch": torch.__version__,
            "torch_num_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "peft": peft.__version__}


# -- model and adapters -----------------------------------------------------------------------
def build_checkpoint(args, root: str) -> str:
    """A random HF LlamaForCausalLM saved with save_pretrained: the one set of weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=args.max_positions, initializer_range=args.init_std,
                      rms_norm_eps=1e-5, tie_word_embeddings=args.tie_embeddings,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    path = os.path.join(root, "model")
    model.save_pretrained(path)
    return path


def build_adapters(args, ckpt: str, root: str) -> dict[str, tuple[str, int]]:
    """name -> (PEFT adapter dir, rank): random A and B (carajax.testing.write_random_adapter)."""
    from carajax.config import ATTENTION_MODULES, ModelConfig
    from carajax.testing import write_random_adapter

    config = ModelConfig.from_hf(ckpt)
    out = {}
    for i, rank in enumerate(args.ranks):
        name = f"a{i}_r{rank}"
        path = os.path.join(root, "adapters", name)
        write_random_adapter(path, config, rank=rank, target_modules=ATTENTION_MODULES,
                             seed=args.seed * 1000 + i + 1, std=args.lora_std)
        out[name] = (path, rank)
    return out


def real_model(args) -> tuple[str, dict[str, tuple[str, int]]]:
    """(HF-layout checkpoint dir, adapters) of `--model`: for a pulled GGUF model, the directory
    carajax converted it to (dequantized; tests/test_smollm2.py checks it against transformers'
    own reading of the GGUF file). Sets the workload's vocabulary from the model."""
    from carajax import demo
    from carajax.config import ModelConfig
    from carajax.models import hub

    ckpt = str(hub.resolve(args.model))
    if not os.path.isdir(ckpt):
        raise SystemExit(f"--model {args.model}: needs an HF-layout directory (got {ckpt})")
    config = ModelConfig.from_hf(ckpt)
    args.vocab, args.layers, args.hidden = config.vocab_size, config.num_layers, config.hidden_size
    args.intermediate, args.heads, args.kv_heads = (config.intermediate_size, config.num_heads,
                                                    config.num_kv_heads)
    args.tie_embeddings = config.tie_word_embeddings
    dirs = (dict(kv.split("=", 1) for kv in args.adapter_dirs.split(",")) if args.adapter_dirs
            else demo.adapter_dirs(args.model))
    adapters = {}
    for name, path in dirs.items():
        with open(os.path.join(path, "adapter_config.json")) as f:
            adapters[name] = (path, int(json.load(f)["r"]))
    args.ranks = [r for _, r in adapters.values()]
    return ckpt, adapters


# -- workloads --------------------------------------------------------------------------------
@dataclasses.dataclass
class Workload:
    name: str
    prompt_lens: list[int]
    output_lens: list[int]
    adapters: list[str]
    batch_size: int  # HF batch size (arrival order)
    vocab: int
    seed: int

    @property
    def n(self) -> int:
        return len(self.prompt_lens)

    @property
    def useful_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def longest(self) -> int:
        return max(p + o for p, o in zip(self.prompt_lens, self.output_lens))

    def prompts(self, run: int) -> list[list[int]]:
        """Random token ids; run -1 is the warm-up set, run r >= 0 the r-th timed set."""
        rng = np.random.default_rng([self.seed, 7919, run + 1])
        return [rng.integers(0, self.vocab, p).tolist() for p in self.prompt_lens]

    def batches(self) -> list[range]:
        return [range(i, min(i + self.batch_size, self.n)) for i in range(0, self.n, self.batch_size)]


def make_workloads(args, adapter_names: list[str]) -> dict[str, Workload]:
    out = {}
    for name in args.workloads:
        if name == "fixed":
            prompts, outputs = [args.prompt_len] * args.requests, [args.new_tokens] * args.requests
        else:
            from carajax.trace import clip_lengths, read_trace

            rows = read_trace(args.trace).requests[:args.trace_requests]
            rows, _ = clip_lengths(rows, max_prompt=args.max_prompt, max_output=args.max_output)
            prompts = [r.prompt_tokens for r in rows]
            outputs = [r.output_tokens for r in rows]
        n = len(prompts)
        out[name] = Workload(name, prompts, outputs,
                             [adapter_names[i % len(adapter_names)] for i in range(n)],
                             args.batch_size, args.vocab, args.seed)
    return out


# -- Hugging Face -----------------------------------------------------------------------------
class HFRunner:
    """The base model with every adapter loaded into one PeftModel (mixed-adapter batches)."""

    def __init__(self, ckpt: str, adapters: dict[str, tuple[str, int]]):
        import torch
        from peft import PeftModel
        from transformers import LlamaForCausalLM

        self.torch = torch
        base = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        names = list(adapters)
        model = PeftModel.from_pretrained(base, adapters[names[0]][0], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name][0], adapter_name=name)
        self.model = model.eval()
        gc = self.model.generation_config
        gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, 0, None
        self.attn_implementation = getattr(base.config, "_attn_implementation", None)

    def batch(self, prompts: list[list[int]], adapters: list[str], new_tokens: int) -> list[list[int]]:
        """Left-padded greedy generation of exactly `new_tokens` tokens per row."""
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, adapter_names=adapters,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
        gen = out[:, width:].tolist()
        if any(len(g) != new_tokens for g in gen):
            raise RuntimeError(f"HF generated {[len(g) for g in gen]} tokens, wanted {new_tokens}")
        return gen

    def run(self, wl: Workload, prompts: list[list[int]]) -> tuple[list[list[int]], float]:
        """All batches in arrival order; each request's own output length of tokens, seconds."""
        tokens: list[list[int]] = [[] for _ in range(wl.n)]
        t0 = time.perf_counter()
        for k, rows in enumerate(wl.batches()):
            new = max(wl.output_lens[i] for i in rows)
            gen = self.batch([prompts[i] for i in rows], [wl.adapters[i] for i in rows], new)
            for i, g in zip(rows, gen):
                tokens[i] = g[:wl.output_lens[i]]
            log(f"  HF batch {k + 1}/{len(wl.batches())}: {len(rows)} requests x {new} new tokens")
        return tokens, time.perf_counter() - t0


# -- carajax ----------------------------------------------------------------------------------
def carajax_engine(args, ckpt: str, adapters: dict[str, tuple[str, int]], max_seq_len: int):
    import carajax

    config = carajax.EngineConfig(max_batch_size=args.batch_size, cold_start="cached",
                                  max_lora_rank=args.max_lora_rank, max_seq_len=max_seq_len)
    engine = carajax.Engine.from_pretrained(ckpt, dtype="float32", config=config)
    for name, (path, _) in adapters.items():
        engine.add_adapter(name, path)
    return engine, config


def carajax_run(engine, wl: Workload, prompts: list[list[int]]) -> tuple[list[list[int]], float]:
    import carajax

    sampling = [carajax.SamplingParams(max_tokens=n, temperature=0.0, stop_token_ids=())
                for n in wl.output_lens]
    t0 = time.perf_counter()
    outs = engine.generate(prompts, adapters=wl.adapters, sampling=sampling)
    wall = time.perf_counter() - t0
    for i, o in enumerate(outs):
        if o.error or len(o.token_ids) != wl.output_lens[i]:
            raise RuntimeError(f"carajax request {i}: {len(o.token_ids)} tokens (wanted "
                               f"{wl.output_lens[i]}), finish {o.finish_reason!r}, error {o.error!r}")
    return [list(o.token_ids) for o in outs], wall


# -- comparison -------------------------------------------------------------------------------
def compare(wl: Workload, hf: list[list[int]], cj: list[list[int]]) -> dict:
    diffs = []
    for i, (a, b) in enumerate(zip(hf, cj)):
        if a != b:
            first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            diffs.append({"request": i, "adapter": wl.adapters[i], "output_len": wl.output_lens[i],
                          "first_diff": first, "hf_token": a[first] if first < len(a) else None,
                          "carajax_token": b[first] if first < len(b) else None})
    return {"identical": wl.n - len(diffs), "n": wl.n, "disagreements": diffs}


def same(runs: list) -> bool | None:
    """Whether every timed run produced the same tokens (None: one run)."""
    return all(r == runs[0] for r in runs[1:]) if len(runs) > 1 else None


def run_workload(args, wl: Workload, hf: HFRunner, ckpt: str, adapters) -> dict:
    log(f"workload {wl.name}: {wl.n} requests, prompts {min(wl.prompt_lens)}..{max(wl.prompt_lens)}"
        f", outputs {min(wl.output_lens)}..{max(wl.output_lens)}, {wl.useful_tokens} useful tokens")
    # HF warm-up: one untimed batch (the workload's first, with warm-up prompts).
    warm = wl.prompts(-1)
    rows = wl.batches()[0]
    t0 = time.perf_counter()
    hf.batch([warm[i] for i in rows], [wl.adapters[i] for i in rows],
             max(wl.output_lens[i] for i in rows))
    hf_warm = time.perf_counter() - t0
    log(f"  HF warm-up batch: {hf_warm:.1f}s")
    # carajax: engine, adapters, compile, one untimed generate of the workload's shape.
    # The paged cache's capacity costs nothing per step (attention reads the pages in use), so
    # by default the engine takes the model's whole context, as a server would.
    max_seq_len = args.max_seq_len or args.max_positions
    t0 = time.perf_counter()
    engine, config = carajax_engine(args, ckpt, adapters, max_seq_len)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    variants = engine.warmup()
    compile_s = time.perf_counter() - t0
    log(f"  carajax engine ready in {load_s:.1f}s, warmup() compiled {variants} variants in "
        f"{compile_s:.1f}s (max_seq_len {max_seq_len})")
    _, gen_warm = carajax_run(engine, wl, warm)
    log(f"  carajax warm-up generate: {gen_warm:.1f}s")
    compiled_before = sum(engine.compiled_variants().values())
    import torch

    threads = ([args.torch_threads] if args.torch_threads is not None
               else sorted({1, os.cpu_count() or 1}))
    hf_by_threads: dict[int, list[float]] = {n: [] for n in threads}
    hf_runs, cj_runs, agreement, hf_tokens_runs, cj_tokens_runs = [], [], [], [], []
    sync_runs, sync_same = [], True  # the same engine waiting for every step's tokens
    try:
        for r in range(args.repeats):
            prompts = wl.prompts(r)
            for n in threads:  # HF at each thread count; its best is the baseline
                torch.set_num_threads(n)
                hf_tokens, hf_s = hf.run(wl, prompts)
                hf_by_threads[n].append(hf_s)
                log(f"  run {r + 1}/{args.repeats} HF ({n} threads): {hf_s:.1f}s, "
                    f"{wl.useful_tokens / hf_s:.1f} tok/s")
            cj_tokens, cj_s = carajax_run(engine, wl, prompts)
            log(f"  run {r + 1}/{args.repeats} carajax: {cj_s:.1f}s, "
                f"{wl.useful_tokens / cj_s:.1f} tok/s")
            # The same engine with async scheduling off (it reads its config every step).
            engine.config = dataclasses.replace(config, async_scheduling=False)
            sync_tokens, sync_s = carajax_run(engine, wl, prompts)
            engine.config = config
            log(f"  run {r + 1}/{args.repeats} carajax, waiting for every step: {sync_s:.1f}s, "
                f"{wl.useful_tokens / sync_s:.1f} tok/s")
            sync_runs.append(sync_s)
            sync_same &= sync_tokens == cj_tokens
            cj_runs.append(cj_s)
            agreement.append(compare(wl, hf_tokens, cj_tokens))
            hf_tokens_runs.append(hf_tokens)
            cj_tokens_runs.append(cj_tokens)
        compiled_during = sum(engine.compiled_variants().values()) - compiled_before
        stats = engine.stats()
    finally:
        engine.close()
    best_threads = min(threads, key=lambda n: statistics.median(hf_by_threads[n]))
    hf_runs = hf_by_threads[best_threads]
    hf_s, cj_s = statistics.median(hf_runs), statistics.median(cj_runs)
    hf_tps, cj_tps = wl.useful_tokens / hf_s, wl.useful_tokens / cj_s
    first = agreement[0]
    log(f"  {wl.name}: HF {hf_tps:.1f} tok/s, carajax {cj_tps:.1f} tok/s, ratio {cj_tps / hf_tps:.2f}, "
        f"greedy identical {first['identical']}/{first['n']}")
    return {
        "requests": wl.n, "useful_tokens": wl.useful_tokens, "prompt_lens": wl.prompt_lens,
        "output_lens": wl.output_lens, "adapters": wl.adapters,
        "prompt_tokens": sum(wl.prompt_lens),
        "hf": {"tok_s": hf_tps, "wall_s": hf_s, "runs_s": hf_runs, "warmup_batch_s": hf_warm,
               "threads": best_threads,
               "tok_s_by_threads": {str(n): wl.useful_tokens / statistics.median(t)
                                    for n, t in hf_by_threads.items()},
               "batches": len(wl.batches()), "batch_size": wl.batch_size,
               "generated_tokens": sum(max(wl.output_lens[i] for i in b) * len(b)
                                       for b in wl.batches()),
               "same_tokens_every_run": same(hf_tokens_runs)},
        "carajax": {"tok_s": cj_tps, "wall_s": cj_s, "runs_s": cj_runs, "load_s": load_s,
                    "warmup_compile_s": compile_s, "warmup_variants": variants,
                    "warmup_generate_s": gen_warm, "compiled_during_timed_runs": compiled_during,
                    "max_seq_len": max_seq_len, "steps": stats.get("steps"),
                    "step_host_ms": stats.get("step_host_ms"), "step_ms": stats.get("step_ms"),
                    "step_wait_ms": stats.get("step_wait_ms"),
                    "sync_tok_s": wl.useful_tokens / statistics.median(sync_runs),
                    "sync_runs_s": sync_runs, "sync_same_tokens": sync_same,
                    "same_tokens_every_run": same(cj_tokens_runs),
                    "engine_config": dataclasses.asdict(config)},
        "ratio": cj_tps / hf_tps,
        "greedy_identical": first["identical"], "greedy_n": first["n"],
        "disagreements": first["disagreements"],
        "greedy_identical_per_run": [a["identical"] for a in agreement],
    }


def table(results: dict) -> str:
    lines = ["| workload | requests | useful tokens | HF PEFT tok/s (best threads) | carajax tok/s | ratio | "
             "greedy identical | carajax waiting for every step, tok/s | HF wall s | "
             "carajax wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        cj = r["carajax"]
        lines.append(f"| {name} | {r['requests']} | {r['useful_tokens']} | {r['hf']['tok_s']:.1f} "
                     f"({r['hf']['threads']}) | "
                     f"{cj['tok_s']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['greedy_identical']}/{r['greedy_n']} | {cj['sync_tok_s']:.1f} "
                     f"({'same' if cj['sync_same_tokens'] else 'DIFFERENT'} tokens) | "
                     f"{r['hf']['wall_s']:.2f} | {cj['wall_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_hf()
    if args.torch_threads is not None:
        import torch

        torch.set_num_threads(args.torch_threads)
    machine = machine_info()
    log(f"{machine['cpu_count']} CPUs, torch threads {machine['torch_num_threads']}, "
        f"jax {machine['jax']} {machine['jax_devices']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, peft {machine['peft']}")
    root = tempfile.mkdtemp(prefix="bench_vs_hf_")
    try:
        t0 = time.perf_counter()
        if args.model:
            ckpt, adapters = real_model(args)
            names = ", ".join(f"{n} (r={r})" for n, (_, r) in adapters.items())
            log(f"{args.model} ({ckpt}) with adapters {names}")
        else:
            ckpt = build_checkpoint(args, root)
            adapters = build_adapters(args, ckpt, root)
            log(f"random Llama ({args.layers} layers, hidden {args.hidden}, vocab {args.vocab}) and "
                f"{len(adapters)} adapters (ranks {args.ranks}) written in "
                f"{time.perf_counter() - t0:.1f}s")
        workloads = make_workloads(args, list(adapters))
        t0 = time.perf_counter()
        hf = HFRunner(ckpt, adapters)
        log(f"HF model + PEFT adapters loaded in {time.perf_counter() - t0:.1f}s "
            f"(attn {hf.attn_implementation})")
        results = {name: run_workload(args, wl, hf, ckpt, adapters) for name, wl in workloads.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    machine["loadavg_end"] = list(os.getloadavg())  # other work on the box skews the timings
    md = table(results)
    print(md)
    for name, r in results.items():
        for d in r["disagreements"]:
            print(f"{name}: request {d['request']} ({d['adapter']}, {d['output_len']} tokens) first "
                  f"differs at position {d['first_diff']}: HF {d['hf_token']}, carajax "
                  f"{d['carajax_token']}")
    print(f"\ntorch threads {machine['torch_num_threads']}"
          f"{'' if args.torch_threads is None else ' (--torch-threads)'}, {machine['cpu_count']} CPUs, "
          f"load average {machine['loadavg_start'][0]:.1f} -> {machine['loadavg_end'][0]:.1f}; medians of "
          f"{args.repeats} timed run(s); carajax warm-up (compile + one generate) not timed: "
          + ", ".join(f"{n} {r['carajax']['warmup_compile_s']:.0f}s + "
                      f"{r['carajax']['warmup_generate_s']:.0f}s" for n, r in results.items()))
    report = {
        "benchmark": "bench_vs_hf", "machine": machine,
        "args": {k: v for k, v in vars(args).items()},
        "model": {"name": args.model or "random Llama",
                  "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                  "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab,
                  "tied": args.tie_embeddings, "dtype": "float32", "init_std": args.init_std},
        "adapters": {name: rank for name, (_, rank) in adapters.items()},
        "hf_attn_implementation": hf.attn_implementation,
        "eos": "disabled: checkpoint eos_token_id=None (HF generate eos_token_id=None, "
               "min_new_tokens=max_new_tokens); carajax stop_token_ids=()",
        "workloads": results, "table": md,
    }
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
