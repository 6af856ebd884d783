"""Where a decode step and a 512-token prefill chunk spend their time, op by op, carajax and HF
PEFT side by side, beside the physical floor (issue 24 item 1: profile before optimising).

Models (each a random float32 Llama written once as a HF checkpoint, so both stacks load the SAME
weights, with 8 PEFT adapters of ranks 8, 16, 32, 64, 8, 16, 32, 64 on q/k/v/o, lora_B random):
  * bench: the bench_vs_hf model (4 layers, hidden 512, intermediate 1376, 8 heads / 8 KV heads,
    vocab 32000, untied);
  * smollm2: the SmolLM2-135M shape (`ModelConfig.from_name("smollm2-135m")`: 30 layers, hidden
    576, intermediate 1536, 9 / 3 heads, vocab 49152, tied embeddings).

Workloads: `decode`: one step of 16 sequences decoding at context ~64 (request i uses adapter
i % 8); `prefill`: one 512-token prefill chunk of one sequence (the rank-16 adapter); each also
without LoRA (carajax: the same engine before any adapter is registered, i.e. the base-only
compiled variant; HF: `PeftModel.disable_adapter()`).

carajax, per workload (an Engine with background=False and async_scheduling=False, so one
`engine.step()` is one whole step: plan, inputs, forward + sampling, results):
  * engine step: `engine.step()` wall time over steady steps (steps that compiled excluded), and
    the engine's own host time per step (planning, inputs, results);
  * device step: the step's captured `StepInputs` relaunched through `ModelRunner.launch` (the
    engine's jitted forward, whatever pieces it is made of, and its sampler) and waited for;
  * op by op, in situ (the XLA profile): the relaunched step under `jax.profiler.trace` (Python
    tracer off). XLA:CPU's thunk executor emits one trace event per HLO thunk (fusion, dot,
    while, conditional, copy...) with its HLO name. The runner's module-level jitted functions
    are wrapped for the run to record their last arguments, and each one's compiled HLO text
    (`lower(...).compile().as_text()` with those argument shapes: a compile-cache hit) carries
    every instruction's Python stack (the HLO StackFrames table), so each thunk is attributed
    to a component by the carajax source line that emitted it (a fusion by its dot, else its
    gather / scatter / reduce, else its root). Independent thunks run at once on XLA's threads,
    so wall time is attributed by a sweep: each instant is split evenly among the thunks running
    then (per thread the innermost; a while / conditional only while nothing else runs); the
    per-thread self time is kept too (JSON `components_thread_ms`). Reported beside: the
    execution window (first op to last), idle time inside it, the host time inside the jit
    calls (dispatch, overlapping earlier calls' ops), and the profiled wall. The profiler adds a
    cost per thunk: the profiled step is slower than the unprofiled device step;
  * op by op, isolated: each component jitted alone at the step's shapes on the real weights
    (every layer in one call): the embedding gather, q / k / v / o / gate / up / down matmuls,
    the LoRA delta (`carajax.lora.hook.BatchLora` on the pool's real pages and the step's
    segments, i.e. `jnp_ops.sgmv_compact` / `sgmv_blocked`), `paged_attention` on the step's real
    KV cache and block tables, the KV write (`write_pages`, donated), rope, RMSNorms,
    elementwise (silu * up, residual adds), lm_head, and the runner's sampler. The sum of the
    isolated parts vs the device step: the gap is what fusion saves or the step's glue costs;
    each isolated call also carries one jit dispatch (measured and shown).

HF (transformers + peft, same process): a decode step is one forward of the 16 sequences' next
token on a DynamicCache of the 64-token prompts (copied per run, outside the timing) with mixed
`adapter_names`, then the argmax; a prefill is one forward of 512 tokens (`adapter_names=[one]`,
a fresh cache, `logits_to_keep=1` as `generate` does). Timed at 1 torch thread and at all
cores (the faster is the baseline); `torch.profiler` (CPU) at the faster setting: every op's self
CPU time, attributed to a component by the innermost labelled module (forward hooks open a
`record_function` per module: projections' base_layer, PEFT's LoRA layers (their
`_mixed_batch_forward` loop over adapters), attention (SDPA split from the rest: rope apply, KV
cache update, reshapes), RMSNorms, MLP / decoder elementwise, lm_head), plus the top ops by self
time. "framework overhead" is the Python time inside the labelled modules between their ops
(the hooks' own cost included); the table adds the unprofiled estimate, best step - op self
times. "other": ops outside every labelled module (masks, glue).

Physical floor, per workload: bytes the step must read (all layers' weights, the embedding rows,
lm_head, the adapters it uses, the KV it reads and writes, the logits it samples) over the
measured memory bandwidth (the best of a jitted `x + 1`, `np.copyto` and torch `x + 1` on
--copy-mb MB, read + write bytes counted), and FLOPs over the measured matmul peak (jnp.dot and
torch.mm of 512x2048 by 2048x2048 float32: carajax's floor uses jax's, HF's uses torch's best); the
floor is the larger of the two. Per component too, where it is defined.

    python scripts/profile_step.py [--models bench,smollm2] [--parts decode,prefill]
                                   [--out results/profile_step.json]
    python scripts/profile_step.py --quick        # tiny sizes, a smoke test

Prints markdown tables (one per model x workload x system, and a summary) and writes JSON with
machine info and every number. Progress goes to stderr. A busy machine skews everything: the
JSON records the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import glob
import gzip
import inspect
import json
import linecache
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

# Progress log and machine record: bench_step's / bench_vs_hf's (this script's directory is on
# sys.path when it runs).
from bench_step import log
from bench_vs_hf import build_adapters, machine_info, quiet_hf

PROJ_GROUP = {"q_proj": "q/k/v", "k_proj": "q/k/v", "v_proj": "q/k/v", "o_proj": "o",
              "gate_proj": "gate/up", "up_proj": "gate/up", "down_proj": "down"}
# Components, in forward order (both systems; a system's table shows those it has).
CATEGORIES = ("embedding", "q/k/v proj", "LoRA q/k/v", "rope", "KV cache write", "attention",
              "attention other", "o proj", "LoRA o", "LoRA other", "norm", "gate/up proj",
              "down proj", "elementwise", "lm_head", "sampling", "step glue",
              "framework overhead", "other")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bench,smollm2", help="comma-separated: bench, smollm2")
    p.add_argument("--parts", default="decode,prefill", help="comma-separated: decode, prefill")
    p.add_argument("--no-base", action="store_true", help="skip the workloads without LoRA")
    p.add_argument("--out", default=os.path.join("results", "profile_step.json"))
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test (2 layers, hidden 128 / 96, vocab 1000, "
                        "4 sequences at context 16, a 64-token prefill)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", default="8,16,32,64,8,16,32,64",
                   help="one adapter per rank, on q/k/v/o; decode request i uses adapter i %% n")
    p.add_argument("--lora-std", type=float, default=0.05, help="std of lora_A and lora_B")
    w = p.add_argument_group("workloads")
    w.add_argument("--batch", type=int, default=16, help="decode: sequences")
    w.add_argument("--context", type=int, default=64, help="decode: prompt tokens per sequence")
    w.add_argument("--prefill-tokens", type=int, default=512, help="prefill: chunk length")
    w.add_argument("--prefill-rank", type=int, default=16, help="prefill: the adapter's rank")
    t = p.add_argument_group("timing")
    t.add_argument("--steps", type=int, default=10, help="engine.step() timings per workload")
    t.add_argument("--runs", type=int, default=20, help="decode: timed runs (device step, "
                   "isolated parts, HF); prefill: half as many, at least 3")
    t.add_argument("--profile-runs", type=int, default=5,
                   help="steps under the XLA / torch profiler (prefill: half, at least 2)")
    t.add_argument("--torch-threads", default="1,all",
                   help="torch thread counts to time HF at ('all' = os.cpu_count())")
    t.add_argument("--copy-mb", type=int, default=256, help="bandwidth test size (MB)")
    t.add_argument("--gemm", default="512,2048,2048", help="m,k,n of the matmul peak test")
    t.add_argument("--no-hf", action="store_true", help="carajax only")
    t.add_argument("--no-isolated", action="store_true", help="skip the isolated components")
    t.add_argument("--no-xla-profile", action="store_true", help="skip the XLA profile")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.context, args.prefill_tokens = 4, 16, 64
        args.steps, args.runs, args.profile_runs = 3, 5, 2
        args.copy_mb, args.gemm = 32, "128,512,512"
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    for m in args.models:
        if m not in ("bench", "smollm2"):
            p.error(f"unknown model {m!r}; choose from bench, smollm2")
    for x in args.parts:
        if x not in ("decode", "prefill"):
            p.error(f"unknown part {x!r}; choose from decode, prefill")
    args.ranks = [int(r) for r in args.ranks.split(",")]
    if args.prefill_rank not in args.ranks:
        p.error(f"--prefill-rank {args.prefill_rank} is not among --ranks {args.ranks}")
    ncpu = os.cpu_count() or 1
    args.torch_threads = sorted({ncpu if x.strip() == "all" else int(x)
                                 for x in args.torch_threads.split(",") if x.strip()})
    args.gemm = tuple(int(x) for x in args.gemm.split(","))
    return args


# -- models -----------------------------------------------------------------------------------
def model_spec(name: str, quick: bool) -> dict:
    """The HF LlamaConfig fields of a model."""
    if name == "bench":
        spec = dict(num_hidden_layers=4, hidden_size=512, intermediate_size=1376,
                    num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
                    tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=2048)
        if quick:
            spec.update(num_hidden_layers=2, hidden_size=128, intermediate_size=344,
                        num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
                        max_position_embeddings=512)
        return spec
    from carajax.config import ModelConfig

    c = ModelConfig.from_name("smollm2-135m")
    spec = dict(num_hidden_layers=c.num_layers, hidden_size=c.hidden_size,
                intermediate_size=c.intermediate_size, num_attention_heads=c.num_heads,
                num_key_value_heads=c.num_kv_heads, vocab_size=c.vocab_size,
                tie_word_embeddings=c.tie_word_embeddings, rope_theta=c.rope_theta,
                max_position_embeddings=c.max_position_embeddings)
    if quick:  # the same structure (GQA 3:1, tied) in miniature
        spec.update(num_hidden_layers=2, hidden_size=96, intermediate_size=256,
                    num_attention_heads=3, num_key_value_heads=1, vocab_size=1000,
                    max_position_embeddings=512)
    return spec


def build_checkpoint(spec: dict, root: str, seed: int) -> str:
    """A random HF LlamaForCausalLM (float32) saved with save_pretrained: the one set of weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**spec, initializer_range=0.02, rms_norm_eps=1e-5, bos_token_id=None,
                      eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    path = os.path.join(root, "model")
    model.save_pretrained(path)
    del model
    return path


@dataclasses.dataclass
class Workload:
    name: str  # decode | prefill | decode_base | prefill_base
    kind: str  # decode | prefill
    lora: bool
    seqs: int
    prompt: int  # prompt tokens per sequence
    adapters: list  # per sequence: adapter name (None without LoRA)
    ranks: list  # per sequence: the adapter's rank (0 without LoRA)

    @property
    def tokens(self) -> int:  # tokens the step computes
        return self.seqs if self.kind == "decode" else self.prompt

    @property
    def label(self) -> str:
        what = (f"decode, {self.seqs} sequences at context {self.prompt}" if self.kind == "decode"
                else f"prefill chunk of {self.prompt} tokens")
        if not self.lora:
            return what + ", no LoRA"
        if self.kind == "decode":
            return what + f", ranks {sorted(set(self.ranks))} mixed"
        return what + f", one rank-{self.ranks[0]} adapter"


def make_workloads(args, adapters: dict[str, tuple[str, int]]) -> list[Workload]:
    names = list(adapters)
    pre = next(n for n, (_, r) in adapters.items() if r == args.prefill_rank)
    out = []
    for part in args.parts:
        for lora in ((False, True) if not args.no_base else (True,)):
            if part == "decode":
                ads = [names[i % len(names)] if lora else None for i in range(args.batch)]
                out.append(Workload(part + ("" if lora else "_base"), part, lora, args.batch,
                                    args.context, ads, [adapters[a][1] if a else 0 for a in ads]))
            else:
                out.append(Workload(part + ("" if lora else "_base"), part, lora, 1,
                                    args.prefill_tokens, [pre if lora else None],
                                    [args.prefill_rank if lora else 0]))
    return out


# -- timing -----------------------------------------------------------------------------------
def timeit(fn, runs: int, warm: int = 2) -> float:
    """Median seconds of fn() (which must block)."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def med(xs):
    return statistics.median(xs) if xs else None


def fmt(x, nd=2):
    return "n/a" if x is None else f"{x:,.{nd}f}"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def pct(x, total):
    return "" if x is None or not total else f"{100 * x / total:.1f}%"


# -- physical limits --------------------------------------------------------------------------
def measure_limits(args) -> dict:
    """Memory bandwidth (read + write bytes) and float32 matmul GFLOP/s, jax and torch."""
    import jax
    import jax.numpy as jnp
    import torch

    log("limits: bandwidth and matmul peak ...")
    n = args.copy_mb * (1 << 20) // 4
    out = {"copy_mb": args.copy_mb}
    big = jnp.ones((n,), jnp.float32)
    add = jax.jit(lambda a: a + 1.0)
    t = timeit(lambda: jax.block_until_ready(add(big)), 7, warm=2)
    out["bw_jax_gbps"] = 2 * n * 4 / t / 1e9
    a = np.ones(n, np.float32)
    b = np.empty_like(a)
    t = timeit(lambda: np.copyto(b, a), 7, warm=2)
    out["bw_numpy_gbps"] = 2 * n * 4 / t / 1e9
    ta = torch.from_numpy(a)
    t = timeit(lambda: torch.add(ta, 1.0, out=torch.from_numpy(b)), 7, warm=2)
    out["bw_torch_gbps"] = 2 * n * 4 / t / 1e9
    out["bandwidth_gbps"] = max(out["bw_jax_gbps"], out["bw_numpy_gbps"], out["bw_torch_gbps"])
    m, k, nn = args.gemm
    flops = 2 * m * k * nn
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    A = jax.random.normal(ka, (m, k), jnp.float32)
    B = jax.random.normal(kb, (k, nn), jnp.float32)
    mm = jax.jit(lambda x, y: jnp.dot(x, y))
    out["gemm_jax_gflops"] = flops / timeit(lambda: jax.block_until_ready(mm(A, B)), 7) / 1e9
    tA, tB = torch.from_numpy(np.array(A)), torch.from_numpy(np.array(B))
    threads0 = torch.get_num_threads()
    out["gemm_torch_gflops"] = {}
    for th in args.torch_threads:
        torch.set_num_threads(th)
        out["gemm_torch_gflops"][th] = flops / timeit(lambda: torch.mm(tA, tB), 7) / 1e9
    torch.set_num_threads(threads0)
    out["gemm_torch_best_gflops"] = max(out["gemm_torch_gflops"].values())
    out["gemm"] = f"{m}x{k} @ {k}x{nn} float32"
    out["bandwidth_test"] = (f"{args.copy_mb} MB float32: jit(x + 1), np.copyto, torch.add(x, 1); "
                             "read + write bytes; the best of the three")
    log(f"  bandwidth {out['bandwidth_gbps']:.1f} GB/s (jax {out['bw_jax_gbps']:.1f}, numpy "
        f"{out['bw_numpy_gbps']:.1f}, torch {out['bw_torch_gbps']:.1f}); matmul jax "
        f"{out['gemm_jax_gflops']:.1f} GFLOP/s, torch "
        + ", ".join(f"{th} thr {g:.1f}" for th, g in out["gemm_torch_gflops"].items()))
    return out


def step_costs(mc, wl: Workload) -> dict[str, tuple[float, float]]:
    """component -> (bytes it must read or write, FLOPs) for one step: the physical floor's
    terms (float32). Weights are read once per step; KV read once per sequence."""
    f4 = 4
    d, f, V, L = mc.hidden_size, mc.intermediate_size, mc.vocab_size, mc.num_layers
    q_out, kv_out = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    T = wl.tokens
    R = wl.seqs  # logit rows the step needs
    kvb = 2 * kv_out * f4  # K and V bytes per position per layer
    out = {
        "embedding": (T * d * f4, 0.0),
        "q/k/v proj": (L * d * (q_out + 2 * kv_out) * f4, 2 * T * L * d * (q_out + 2 * kv_out)),
        "o proj": (L * q_out * d * f4, 2 * T * L * q_out * d),
        "gate/up proj": (L * 2 * d * f * f4, 2 * T * L * 2 * d * f),
        "down proj": (L * f * d * f4, 2 * T * L * f * d),
        "lm_head": (V * d * f4, 2 * R * V * d),
        "sampling": (R * V * f4, 0.0),
        "KV cache write": (T * L * kvb, 0.0),
    }
    if wl.kind == "decode":  # each sequence reads its previous `prompt` positions
        ctx = wl.prompt + 1
        out["attention"] = (wl.seqs * wl.prompt * L * kvb, 4 * wl.seqs * L * ctx * q_out)
    else:  # causal within the chunk: token i attends to i + 1 positions (read once)
        out["attention"] = (T * L * kvb, 2 * L * q_out * T * (T + 1))
    if wl.lora:
        shapes = {m: mc.projection_shape(m) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
        tok_per_adapter = collections.Counter(wl.adapters)
        rank_of = dict(zip(wl.adapters, wl.ranks))
        per_tok = 1 if wl.kind == "decode" else wl.prompt
        for group, mods in (("LoRA q/k/v", ("q_proj", "k_proj", "v_proj")), ("LoRA o", ("o_proj",))):
            by = fl = 0.0
            for a, n in tok_per_adapter.items():
                r = rank_of[a]
                io = sum(sum(shapes[m]) for m in mods)
                by += L * r * io * f4
                fl += 2 * n * per_tok * L * r * io
            out[group] = (by, fl)
    return out


def floor_ms(costs: dict, bw_gbps: float, gflops: float) -> dict:
    by = sum(b for b, _ in costs.values())
    fl = sum(x for _, x in costs.values())
    bw_ms, fl_ms = by / (bw_gbps * 1e9) * 1e3, fl / (gflops * 1e9) * 1e3
    return {"bytes": by, "flops": fl, "bandwidth_ms": bw_ms, "compute_ms": fl_ms,
            "floor_ms": max(bw_ms, fl_ms), "bound": "memory" if bw_ms >= fl_ms else "compute"}


def comp_floor(costs: dict, cat: str, bw: float, gf: float) -> float | None:
    if cat not in costs:
        return None
    b, x = costs[cat]
    return max(b / (bw * 1e9), x / (gf * 1e9)) * 1e3


# -- the XLA profile: HLO text -> each instruction's Python stack ---------------------------
_SECTIONS = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s}\])])([a-z][a-z0-9\-]*)\(")
_PRIMARY = (("dot", "convolution", "custom-call"),
            ("gather", "scatter", "dynamic-slice", "dynamic-update-slice", "sort", "reduce"))


class HloIndex:
    """An HLO module's text (`Compiled.as_text()`): each instruction's opcode, called
    computation and stack frame, and the StackFrames tables that resolve a frame to the Python
    call stack that emitted it."""

    def __init__(self, text: str):
        self.tables: dict[str, dict] = {s: {} for s in _SECTIONS}
        self.instr: dict[str, dict] = {}
        self.comps: dict[str, list[str]] = collections.defaultdict(list)
        self.roots: dict[str, str] = {}
        section = comp = None
        for line in text.splitlines():
            s = line.strip()
            if s in _SECTIONS:
                section = s
                continue
            if section:
                m = re.match(r"^(\d+) (.*)$", s)
                if m:
                    i, rest = int(m.group(1)), m.group(2)
                    self.tables[section][i] = (rest.strip('"') if rest.startswith('"') else
                                               {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", rest)})
                    continue
                section = None
            if s.endswith("{") and (s.startswith("%") or s.startswith("ENTRY")) \
                    and " = " not in s.split("(")[0]:
                comp = s.split()[1 if s.startswith("ENTRY") else 0].lstrip("%")
                continue
            if s == "}":
                comp = None
                continue
            m = _INSTR.match(line)
            if m is None or comp is None:
                continue
            name, rest = m.group(1), m.group(2)
            oc = _OPCODE.search(rest)
            calls = re.search(r"calls=%([\w.\-]+)", rest)
            frame = re.search(r"stack_frame_id=(\d+)", rest)
            self.instr[name] = {"opcode": oc.group(1) if oc else "?",
                                "calls": calls.group(1) if calls else None,
                                "frame": int(frame.group(1)) if frame else None}
            self.comps[comp].append(name)
            if s.startswith("ROOT"):
                self.roots[comp] = name
        self._stacks: dict[int, list] = {}

    def stack(self, frame: int | None) -> list[tuple[str, str, int, int]]:
        """(file, function, line, end_line) innermost first. StackFrames print their parent as
        parent id + 1 (0: none)."""
        if frame is None:
            return []
        if frame not in self._stacks:
            frames, locs = self.tables["StackFrames"], self.tables["FileLocations"]
            files, funcs = self.tables["FileNames"], self.tables["FunctionNames"]
            out, fid, seen = [], frame, set()
            while fid and fid in frames and fid not in seen:
                seen.add(fid)
                loc = locs.get(frames[fid].get("file_location_id"), {})
                out.append((files.get(loc.get("file_name_id"), "?"),
                            funcs.get(loc.get("function_name_id"), "?"),
                            loc.get("line", 0), loc.get("end_line", loc.get("line", 0))))
                fid = frames[fid].get("parent_frame_id", 0) - 1
            self._stacks[frame] = out
        return self._stacks[frame]

    def primary(self, name: str) -> tuple[str, int | None]:
        """(opcode, frame) that stands for an instruction: a fusion by its dot, else its
        gather / scatter / reduce, else its root."""
        ins = self.instr.get(name)
        if ins is None:
            return "?", None
        if ins["opcode"] != "fusion" or not ins["calls"]:
            return ins["opcode"], ins["frame"]
        body = [self.instr[n] for n in self.comps.get(ins["calls"], []) if n in self.instr]
        for ops in _PRIMARY:
            for b in body:
                if b["opcode"] in ops and b["frame"] is not None:
                    return f"fusion({b['opcode']})", b["frame"]
        root = self.instr.get(self.roots.get(ins["calls"], ""), {})
        return f"fusion({root.get('opcode', '?')})", root.get("frame") or ins["frame"]


def _source(file: str, line: int, end: int) -> str:
    return " ".join(linecache.getline(file, i).strip() for i in range(line, max(line, end) + 1))


def _proj_group(stack) -> str | None:
    """The projection group of the innermost model call site in a stack."""
    for file, func, line, end in stack:
        if os.path.basename(file) == "llama.py" and func.split(".")[0] in ("Attention", "MLP",
                                                                           "Llama"):
            text = _source(file, line, end)
            if "lm_head" in text or "logits" in text:
                return "lm_head"
            for m, g in PROJ_GROUP.items():
                if m in text:
                    return g
            return None
    return None


def categorize(module: str, stack) -> str:
    """A component for an HLO instruction, from the carajax source that emitted it."""
    if "sample" in module:
        return "sampling"
    for file, func, line, end in stack:
        base = os.path.basename(file)
        if base == "sampling.py" or func in ("_sample", "sample_tokens"):
            return "sampling"
        if base in ("jnp_ops.py", "kernels.py", "fused_kernels.py", "hook.py", "cpu_assist.py") \
                or "BatchLora" in func:
            g = _proj_group(stack)
            return f"LoRA {g}" if g in ("q/k/v", "o") else "LoRA other"
        if func.startswith("write_pages"):
            return "KV cache write"
        if func in ("rms_norm",) or func.startswith("RMSNorm"):
            return "norm"
        if func == "output_logits":
            return "lm_head"
        if base in ("attention.py", "attention_blocks.py") or base.startswith("paged_attention") \
                or "paged_attention" in func:
            return "attention"
        if func == "apply_rope":
            return "rope"
        if func.startswith("RMSNorm"):
            return "norm"
        if func.startswith("Linear"):
            g = _proj_group(stack)
            return "lm_head" if g == "lm_head" else f"{g} proj" if g else "other"
        if base == "llama.py":
            text = _source(file, line, end)
            cls = func.split(".")[0]
            if func == "_project":  # the LoRA delta's add onto the base output
                if "+" in text:
                    g = _proj_group(stack)
                    return f"LoRA {g}" if g in ("q/k/v", "o") else "LoRA other"
                continue
            if cls == "Llama":
                if "logits" in text or "lm_head" in text or ".T" in text:
                    return "lm_head"
                if "embed_tokens" in text:
                    return "embedding"
                if "norm" in text:
                    return "norm"
                return "step glue"
            if cls in ("MLP", "Block"):
                return "elementwise"
            if cls == "Attention":
                if "slots" in text or "write_pages" in text:
                    return "KV cache write"
                if "apply_rope" in text:
                    return "rope"
                return "attention other"
        if base == "runner.py":
            text = _source(file, line, end)
            if func == "_embed" or "embed" in text and "where" not in text:
                return "embedding"
            if func == "_head":
                return "lm_head"
            if "compact" in func:
                return "LoRA other"
            return "step glue"
    return "other"


def union_us(intervals) -> float:
    """Total length of a set of (start, end) intervals, overlaps counted once."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


def newest_trace(logdir: str) -> str | None:
    files = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
    return max(files, key=os.path.getmtime) if files else None


def thread_pieces(events: list[dict]) -> list[tuple[float, float, tuple]]:
    """Per thread, the intervals in which each thunk event is the innermost one running there
    (its duration less its nested thunks'): (start us, end us, (module, hlo_op))."""
    out = []
    by_tid = collections.defaultdict(list)
    for e in events:
        by_tid[e["tid"]].append(e)
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[tuple[tuple, float]] = []  # (key, end)
        cursor = None

        def emit(a, b, key):
            if b > a:
                out.append((a, b, key))

        for e in evs:
            s, end = e["ts"], e["ts"] + e["dur"]
            while stack and stack[-1][1] <= s:
                key, top_end = stack.pop()
                emit(cursor, top_end, key)
                cursor = top_end
            if stack:
                emit(cursor, s, stack[-1][0])
                end = min(end, stack[-1][1])  # a child never outlives its parent
            cursor = s
            stack.append(((e["args"].get("hlo_module"), e["args"]["hlo_op"]), end))
        while stack:
            key, top_end = stack.pop()
            emit(cursor, top_end, key)
            cursor = top_end
    return out


def wall_shares(pieces, is_control) -> tuple[dict, dict, float]:
    """Wall time attributed to each op: every instant split evenly among the ops running at
    it on any thread (control-flow thunks, which wait for their bodies, only when nothing else
    runs). Returns (wall us per key, thread us per key, busy us)."""
    thread = collections.Counter()
    for a, b, key in pieces:
        thread[key] += b - a
    marks = sorted([(a, 1, i) for i, (a, _, _) in enumerate(pieces)]
                   + [(b, -1, i) for i, (_, b, _) in enumerate(pieces)])
    wall = collections.Counter()
    active: dict[int, tuple] = {}
    busy, last = 0.0, None
    for t, kind, i in marks:
        if active and last is not None and t > last:
            keys = list(active.values())
            work = [k for k in keys if not is_control(k)] or keys
            share = (t - last) / len(work)
            for k in work:
                wall[k] += share
            busy += t - last
        last = t
        if kind > 0:
            active[i] = pieces[i][2]
        else:
            active.pop(i, None)
    return wall, thread, busy


class JitRecorder:
    """Wraps the jitted functions of `carajax.engine.runner` (module globals the runner calls)
    to record each one's last arguments, so the profile can ask the same function for its
    compiled HLO text (`lower(*args).compile()`: a compile-cache hit for the same shapes)."""

    def __init__(self):
        from carajax.engine import runner as runner_mod

        self.mod = runner_mod
        self.calls: dict[str, tuple] = {}
        self.orig: dict[str, object] = {}
        for name, obj in list(vars(runner_mod).items()):
            if callable(obj) and hasattr(obj, "lower") and hasattr(obj, "trace"):
                self.orig[name] = obj
                setattr(runner_mod, name, self._wrap(name, obj))

    def _wrap(self, name, fn):
        calls = self.calls

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            calls[name] = (args, kwargs)
            return fn(*args, **kwargs)

        wrapper.lower = fn.lower  # warmup lowers ahead of time through the same name
        return wrapper

    def restore(self):
        for name, obj in self.orig.items():
            setattr(self.mod, name, obj)

    def hlo_texts(self) -> dict[str, str]:
        """HLO module name ("jit_" + function name) -> compiled text, for each recorded call."""
        import jax

        def spec(x):  # donated arguments are deleted by now: their shapes, not their values
            if isinstance(x, jax.Array):
                try:
                    sharding = x.sharding
                except Exception:
                    sharding = None
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding,
                                            weak_type=getattr(x, "weak_type", False))
            if isinstance(x, np.ndarray):
                return jax.ShapeDtypeStruct(x.shape, x.dtype)
            return x  # static arguments (graph definition, flags) and None

        out = {}
        for name, (args, kwargs) in self.calls.items():
            fn = self.orig[name]
            a, kw = jax.tree.map(spec, (args, kwargs))
            out[f"jit_{getattr(fn, '__name__', name)}"] = fn.lower(*a, **kw).compile().as_text()
        return out


def profiler_options():
    """No Python tracer (it would slow every jit call's argument handling several-fold); the
    host tracer keeps XLA:CPU's per-thunk events."""
    import jax

    try:
        opts = jax.profiler.ProfileOptions()
        opts.python_tracer_level = 0
        return opts
    except Exception:
        return None


def xla_profile(run_step, recorder: JitRecorder, runs: int, logdir: str) -> dict:
    """`runs` calls of run_step() under jax.profiler.trace. Per step (= per call): each
    component's share of the wall time (ms) and its thread time, the top ops, the execution
    window, the host time inside jit calls (dispatch; it overlaps the execution of earlier
    calls), and the wall time."""
    import jax

    run_step()  # the recorder holds this step's arguments
    texts = recorder.hlo_texts()
    index = {m: HloIndex(t) for m, t in texts.items()}
    os.makedirs(logdir, exist_ok=True)
    walls = []
    opts = profiler_options()
    ctx = (jax.profiler.trace(logdir, profiler_options=opts) if opts is not None
           else jax.profiler.trace(logdir))
    with ctx:
        for _ in range(runs):
            t0 = time.perf_counter()
            run_step()
            walls.append(time.perf_counter() - t0)
    path = newest_trace(logdir)
    if path is None:
        raise RuntimeError(f"no trace written under {logdir}")
    with gzip.open(path) as f:
        data = json.load(f)
    xs = [e for e in data.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    thunks = [e for e in xs if "hlo_op" in e.get("args", {})]
    events = [e for e in thunks if e["args"].get("hlo_module") in index]
    if not events:
        raise RuntimeError("the trace has no per-thunk (hlo_op) events of the step's modules")
    foreign = collections.Counter()
    for e in thunks:
        if e["args"].get("hlo_module") not in index:
            foreign[e["args"].get("hlo_module")] += e["dur"] / 1e3 / runs
    pieces = thread_pieces(events)

    def is_control(key):
        ins = index[key[0]].instr.get(key[1])
        return ins is not None and ins["opcode"] in ("while", "conditional", "call")

    wall, thread, busy = wall_shares(pieces, is_control)
    module_ms = collections.Counter()
    module_calls = collections.defaultdict(set)
    instances = collections.Counter()
    for e in events:
        module_calls[e["args"]["hlo_module"]].add(e["args"].get("run_id"))
        instances[(e["args"]["hlo_module"], e["args"]["hlo_op"])] += 1
    cats: dict[str, float] = collections.Counter()
    cats_thread: dict[str, float] = collections.Counter()
    ops: dict[tuple, list] = collections.defaultdict(lambda: [0.0, 0, 0.0])
    unknown = set()
    for key in thread:
        module, op = key
        idx = index[module]
        if op not in idx.instr:
            unknown.add(op)
        opcode, frame = idx.primary(op)
        stack = idx.stack(frame)
        cat = categorize(module, stack)
        ms, tms = wall[key] / 1e3 / runs, thread[key] / 1e3 / runs
        cats[cat] += ms
        cats_thread[cat] += tms
        module_ms[module] += ms
        inner = next(((os.path.basename(fl), fn, ln) for fl, fn, ln, _ in stack
                      if "site-packages" not in fl), None)
        where = f"{inner[1]} ({inner[0]}:{inner[2]})" if inner else "(no source: XLA)"
        k = (cat, opcode, where)
        ops[k][0] += ms
        ops[k][1] += instances[key]
        ops[k][2] += tms
    spans = collections.defaultdict(list)  # jit calls' host intervals (nested ones: once)
    for e in xs:
        if e["name"].startswith("PjitFunction("):
            spans[e["name"][len("PjitFunction("):-1]].append((e["ts"], e["ts"] + e["dur"]))
    dispatch = {name: union_us(iv) / 1e3 / runs for name, iv in spans.items()}
    all_spans = [iv for ivs in spans.values() for iv in ivs]
    t_first = min(e["ts"] for e in events)
    t_last = max(e["ts"] + e["dur"] for e in events)
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])
    return {"components_ms": dict(cats), "ops_sum_ms": sum(cats.values()),
            "components_thread_ms": dict(cats_thread),
            "thread_sum_ms": sum(cats_thread.values()), "busy_ms": busy / 1e3 / runs,
            "profiled_step_ms": med(walls) * 1e3, "profiled_runs": runs,
            "execution_window_ms": (t_last - t_first) / 1e3 / runs,
            "modules": {m: {"ms": module_ms[m], "calls_per_step": len(module_calls[m]) / runs,
                            "hlo_instructions": len(index[m].instr)} for m in module_ms},
            "dispatch_ms": dispatch, "dispatch_sum_ms": union_us(all_spans) / 1e3 / runs,
            "other_modules_ms": dict(foreign),
            "top_ops": [{"component": c, "op": o, "source": w, "ms": v[0], "thread_ms": v[2],
                         "count_per_step": v[1] / runs} for (c, o, w), v in top[:25]],
            "ops_not_in_hlo_text": len(unknown), "trace_file": os.path.basename(path),
            "method": "jax.profiler.trace (python tracer off): XLA:CPU thunk events; each "
                      "instant of wall time split among the thunks running then (innermost per "
                      "thread; control flow only when nothing else runs); components by the HLO "
                      "instruction's stack frames. components_thread_ms: self time per thread "
                      "(concurrent thunks overlap, so it can exceed the wall)"}


# -- carajax ----------------------------------------------------------------------------------
def engine_config(args, mc):
    import carajax

    ps = 16
    longest = max(args.context + args.steps + 32, args.prefill_tokens + 16)
    max_seq_len = -(-longest // ps) * ps
    positions = args.batch * (max_seq_len + 2 * ps) + args.prefill_tokens + 4 * ps
    step_tokens = max(args.prefill_tokens, args.batch)
    return carajax.EngineConfig(
        dtype="float32", max_seq_len=max_seq_len, max_batch_size=args.batch,
        kv_cache_bytes=positions * mc.kv_bytes_per_token(4), kv_page_size=ps,
        prefill_chunk=args.prefill_tokens, max_step_tokens=step_tokens,
        max_prefill_tokens=step_tokens, cold_start="cached", async_scheduling=False,
        max_lora_rank=max(64, max(args.ranks)))


def trace_count() -> int:
    from carajax.engine.runner import ModelRunner

    return sum(ModelRunner.compiled_variants().values())


@contextlib.contextmanager
def capture_launch(runner):
    """Record the StepInputs of every `runner.launch` (an instance attribute shadowing the
    method for the duration)."""
    seen: list = []
    orig = runner.launch

    def launch(inputs):
        seen.append(inputs)
        return orig(inputs)

    runner.launch = launch
    try:
        yield seen
    finally:
        del runner.launch


def engine_steps(engine, wl: Workload, args, rng) -> tuple[dict, object]:
    """Steady engine.step() timings of a workload; returns (timings, the last timed step's
    StepInputs). Decode: the sequences prefill untimed, then `steps` decode steps are timed.
    Prefill: each timed step is a fresh request's whole prompt (max_tokens 1)."""
    import carajax

    V = engine.model_config.vocab_size
    times, host, compiled = [], [], 0
    st_times = getattr(engine, "_step_times", None)  # (host s, period s, wait s) per step

    def timed_step() -> bool:
        nonlocal compiled
        before = trace_count()
        t0 = time.perf_counter()
        if not engine.step():
            return False
        dt = time.perf_counter() - t0
        if trace_count() != before:
            compiled += 1
            return True
        times.append(dt)
        if st_times:
            host.append(st_times[-1][0])
        return True

    with capture_launch(engine.runner) as seen:
        if wl.kind == "decode":
            sampling = carajax.SamplingParams(max_tokens=args.steps + 16, temperature=0.0,
                                              stop_token_ids=())
            handles = [engine.submit(rng.integers(0, V, wl.prompt).tolist(), adapter=a,
                                     sampling=sampling) for a in wl.adapters]
            for _ in range(10 * wl.seqs + 10):  # prefill every prompt
                st = engine.stats()
                if st["waiting"] == 0 and len(st["running"]) == wl.seqs and \
                        all(r["output_tokens"] >= 1 for r in st["running"]):
                    break
                engine.step()
            else:
                raise RuntimeError("the decode batch never formed")
            while len(times) < args.steps and compiled < 3:
                last = len(seen)
                if not timed_step():
                    break
                if len(seen) == last:
                    raise RuntimeError("a decode step launched nothing")
            inputs = seen[-1]
        else:
            sampling = carajax.SamplingParams(max_tokens=1, temperature=0.0, stop_token_ids=())
            handles = []
            while len(times) < max(3, args.steps // 2) and compiled < 3:
                handles.append(engine.submit(rng.integers(0, V, wl.prompt).tolist(),
                                             adapter=wl.adapters[0], sampling=sampling))
                timed_step()
                while engine.step():  # nothing should be left; be safe
                    pass
            inputs = seen[-1]
    res = {"steps_timed": len(times), "compile_steps_excluded": compiled,
           "step_ms": med(times) * 1e3 if times else None,
           "step_ms_min": min(times) * 1e3 if times else None,
           "host_ms": med(host) * 1e3 if host else engine.stats().get("step_host_ms"),
           "host_source": "engine._step_times (planning + inputs + results) of the timed steps"
           if host else "engine.stats()['step_host_ms'] (median of recent steps)",
           "tokens_bucket": int(np.asarray(inputs.batch.tokens).shape[0]),
           "query_block": getattr(inputs, "block", None)}
    return res, (inputs, handles)


def finish(engine, handles) -> None:
    while engine.step():
        pass
    for h in handles:
        h.result(timeout=120)


def _val(var):
    """An nnx Variable's array (`var[...]`; `.value` on older flax)."""
    try:
        return var[...]
    except Exception:
        return var.value


def isolated_parts(engine, model, inputs, wl: Workload, runs: int) -> dict:
    """Each component of the forward jitted alone (all layers in one call) at the step's shapes,
    on the real weights, the pool's real LoRA pages and the step's real KV cache; ms per step."""
    import jax
    import jax.numpy as jnp

    from carajax.engine import runner as runner_mod
    from carajax.lora.hook import BatchLora
    from carajax.models.attention import paged_attention, write_pages
    from carajax.models.llama import apply_rope

    mc = model.config
    runner = engine.runner
    b = inputs.batch
    tokens = jnp.asarray(b.tokens)
    T = tokens.shape[0]
    R = np.asarray(b.logit_rows).shape[0]
    L, d, f = mc.num_layers, mc.hidden_size, mc.intermediate_size
    H, K, D = mc.num_heads, mc.num_kv_heads, mc.head_dim
    eps = mc.rms_norm_eps
    key = jax.random.PRNGKey(1)
    ks = jax.random.split(key, 8)
    xd = jax.random.normal(ks[0], (T, d), jnp.float32)
    xq = jax.random.normal(ks[1], (T, H * D), jnp.float32)
    xf = jax.random.normal(ks[2], (T, f), jnp.float32)
    q3 = jax.random.normal(ks[3], (T, H, D), jnp.float32)
    k3 = jax.random.normal(ks[4], (T, K, D), jnp.float32)
    xr = jax.random.normal(ks[5], (R, d), jnp.float32)
    # Per-layer inputs where the same input would let XLA share work across layers (CSE).
    xL = jax.random.normal(ks[7], (2, L, T, d), jnp.float32)
    qL = jax.random.normal(ks[3], (L, T, H, D), jnp.float32)
    kL = jax.random.normal(ks[4], (L, T, K, D), jnp.float32)
    blocks = list(model.layers)
    W = {m: [_val(getattr(blk.self_attn if m in ("q_proj", "k_proj", "v_proj", "o_proj")
                          else blk.mlp, m).kernel) for blk in blocks] for m in PROJ_GROUP}
    ln = [(_val(blk.input_layernorm.weight), _val(blk.post_attention_layernorm.weight))
          for blk in blocks]
    embed = _val(model.embed_tokens)
    tied = mc.tie_word_embeddings
    head = embed if tied else _val(model.lm_head.kernel)
    inv_freq = _val(model.inv_freq)
    positions = jnp.asarray(b.positions)
    out: dict[str, dict] = {}

    def run(name, fn, *a, group=None):
        try:
            jf = jax.jit(fn)
            ms = timeit(lambda: jax.block_until_ready(jf(*a)), runs) * 1e3
            out[name] = {"ms": ms, "component": group or name}
        except Exception as e:  # a changed model / runner API: record and go on
            out[name] = {"ms": None, "component": group or name, "error": f"{type(e).__name__}: {e}"}
            log(f"    isolated {name}: {type(e).__name__}: {e}")

    run("dispatch (jit of x + 1)", lambda x: x + 1, xr, group="-")
    run("embedding", lambda E, t: E[t], embed, tokens)
    inputs_of = {"q_proj": xd, "k_proj": xd, "v_proj": xd, "o_proj": xq, "gate_proj": xd,
                 "up_proj": xd, "down_proj": xf}
    for m, g in PROJ_GROUP.items():
        run(m, lambda ws, x: [x @ w for w in ws], W[m], inputs_of[m], group=f"{g} proj")

    def rms(x, w):  # llama.RMSNorm
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return w * x32.astype(x.dtype)

    run("norm", lambda lns, x, xr, w: [(rms(x[0, i], a), rms(x[1, i], c))
                                       for i, (a, c) in enumerate(lns)] + [rms(xr, w)],
        ln, xL, xr, _val(model.norm.weight))
    run("rope", lambda q, k, p, fr: [(apply_rope(q[i], p, fr), apply_rope(k[i], p, fr))
                                     for i in range(L)], qL, kL, positions, inv_freq)
    run("elementwise", lambda g, u, x, h: [(jax.nn.silu(g + i) * u, x + h + i, x + 2 * h + i)
                                           for i in range(L)], xf, xf, xd, xd)
    run("lm_head", lambda x, w: (x @ (w.T if tied else w)).astype(jnp.float32), xr, head)
    cache = runner.cache
    bt, sl, qs = (jnp.asarray(b.block_tables), jnp.asarray(b.seq_lens),
                  jnp.asarray(b.query_starts))
    block = getattr(inputs, "block", None)

    def attn(q, kc, vc, bt, sl, qs):
        N = kc.shape[1]
        kf, vf = kc.reshape(L * N, *kc.shape[2:]), vc.reshape(L * N, *vc.shape[2:])
        return [paged_attention(q, kf, vf, bt + i * N, sl, qs, query_block=block)
                for i in range(L)]

    run("attention", attn, q3, cache.k, cache.v, bt, sl, qs)
    # The KV write, in place (the step donates the cache): a copy of the cache, donated back.
    try:
        N, ps = cache.k.shape[1], cache.k.shape[3]
        slots = jnp.asarray(b.slots)

        def kvw(kf, vf, k, v, slots):
            for i in range(L):
                s = jnp.where(slots >= 0, slots + i * N * ps, -1)
                kf, vf = write_pages(kf, vf, k, v, s)
            return kf, vf

        jw = jax.jit(kvw, donate_argnums=(0, 1))
        state = [jnp.array(cache.k).reshape(L * N, *cache.k.shape[2:]),
                 jnp.array(cache.v).reshape(L * N, *cache.v.shape[2:])]

        def once():
            state[0], state[1] = jax.block_until_ready(jw(state[0], state[1], k3, k3, slots))

        out["KV cache write"] = {"ms": timeit(once, runs) * 1e3, "component": "KV cache write"}
    except Exception as e:
        out["KV cache write"] = {"ms": None, "component": "KV cache write",
                                 "error": f"{type(e).__name__}: {e}"}
        log(f"    isolated KV cache write: {type(e).__name__}: {e}")
    if wl.lora:
        weights = runner.pool.weights
        impl = getattr(runner, "lora_impl", "reference")
        pad = getattr(runner, "pad", False)
        seg_slots = jnp.asarray(inputs.seg_slots)
        # The step's compact-form plan, where the runner builds it once per step outside the
        # layers (then the isolated LoRA takes it as an input, as the layers do).
        plan = None
        try:
            if "compact" in inspect.signature(BatchLora).parameters and hasattr(runner, "_compact"):
                plan = runner._compact(jax.device_put(b), seg_slots, True)
        except Exception as e:
            log(f"    isolated LoRA: no step plan ({type(e).__name__}: {e}); built per call")
        extra = {} if plan is None else {"compact": plan}
        out["_lora_plan"] = {"ms": None, "component": "-",
                             "note": "step plan passed in" if plan is not None else "plan per call"}

        def lora(mods, x):
            def fn(w, qs, slots, x, extra):
                starts = qs[:-1]
                hook = BatchLora(w, starts, qs[1:] - starts, slots, impl, pad_to_max_rank=pad,
                                 **extra)
                return [y for i in range(L) for y in hook(i, mods, x) if y is not None]
            return fn

        run("LoRA q/k/v", lora(("q_proj", "k_proj", "v_proj"), xd), weights, qs, seg_slots, xd,
            extra)
        run("LoRA o", lora(("o_proj",), xq), weights, qs, seg_slots, xq, extra)
    # The runner's sampler on logits of the step's shape (its own jit).
    sampler = getattr(runner_mod, "_sample", None)
    logits = jax.random.normal(ks[6], (R, mc.vocab_size), jnp.float32)
    if sampler is not None:
        try:
            S = engine.config.max_batch_size
            smp = tuple(jnp.asarray(x) for x in inputs.sampling)
            ms = timeit(lambda: jax.block_until_ready(sampler(logits, smp, S)), runs) * 1e3
            out["sampling"] = {"ms": ms, "component": "sampling"}
        except Exception as e:
            out["sampling"] = {"ms": None, "component": "sampling",
                               "error": f"{type(e).__name__}: {e}"}
    return out


def carajax_model(args, ckpt: str, adapters: dict, workloads: list[Workload], costs_of,
                  limits: dict, root: str) -> dict:
    """Every workload of one model on one engine: base workloads first (no adapter registered:
    the base-only compiled variant), then the adapters are added and the LoRA workloads run."""
    import jax.numpy as jnp

    import carajax
    from carajax.config import ModelConfig
    from carajax.models import weights

    mc = ModelConfig.from_hf(ckpt)
    t0 = time.perf_counter()
    model = weights.load_hf(ckpt, mc, dtype=jnp.float32)
    engine = carajax.Engine(model, None, engine_config(args, mc), background=False)
    log(f"  carajax engine ready in {time.perf_counter() - t0:.1f}s "
        f"(lora_impl {getattr(engine.runner, 'lora_impl', '?')})")
    recorder = JitRecorder()
    rng = np.random.default_rng([args.seed, 99])
    results = {}
    runs_of = {"decode": args.runs, "prefill": max(3, args.runs // 2)}
    prof_of = {"decode": args.profile_runs, "prefill": max(2, args.profile_runs // 2)}
    try:
        for wl in sorted(workloads, key=lambda w: w.lora):
            if wl.lora and not engine.adapters:
                for name, (path, _) in adapters.items():
                    engine.add_adapter(name, path)
            log(f"  carajax {wl.name}: {wl.label}")
            res, (inputs, handles) = engine_steps(engine, wl, args, rng)
            runner = engine.runner

            def device_step(inputs=inputs, runner=runner):
                import jax

                jax.block_until_ready(runner.launch(inputs))

            res["device_step_ms"] = timeit(device_step, runs_of[wl.kind]) * 1e3
            log(f"    engine.step {fmt(res['step_ms'])} ms (host {fmt(res['host_ms'])}), device "
                f"step {res['device_step_ms']:.2f} ms")
            if not args.no_xla_profile:
                try:
                    res["xla_profile"] = xla_profile(
                        device_step, recorder, prof_of[wl.kind],
                        os.path.join(root, "xla_trace", f"{wl.name}_{time.time_ns()}"))
                    xp = res["xla_profile"]
                    log(f"    XLA profile: ops {xp['ops_sum_ms']:.2f} ms/step, profiled step "
                        f"{xp['profiled_step_ms']:.2f} ms")
                except Exception as e:
                    res["xla_profile"] = {"error": f"{type(e).__name__}: {e}"}
                    log(f"    XLA profile failed: {type(e).__name__}: {e}")
            if not args.no_isolated:
                res["isolated"] = isolated_parts(engine, model, inputs, wl, runs_of[wl.kind])
                tot = sum(v["ms"] or 0 for k, v in res["isolated"].items() if v["component"] != "-")
                log(f"    isolated parts: {tot:.2f} ms in all")
            finish(engine, handles)
            costs = costs_of(mc, wl)
            res["floor"] = floor_ms(costs, limits["bandwidth_gbps"], limits["gemm_jax_gflops"])
            res["component_floor_ms"] = {c: comp_floor(costs, c, limits["bandwidth_gbps"],
                                                       limits["gemm_jax_gflops"]) for c in costs}
            results[wl.name] = res
    finally:
        recorder.restore()
        engine.close()
    return results


# -- Hugging Face -----------------------------------------------------------------------------
def hf_label(name: str, mod) -> str | None:
    """The component a module's own ops belong to (None: its parent's)."""
    parts = name.split(".")
    last = parts[-1]
    cls = type(mod).__name__
    if last == "base_layer" and len(parts) > 1 and parts[-2] in PROJ_GROUP:
        return f"{PROJ_GROUP[parts[-2]]} proj"
    if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):  # a PEFT LoRA layer
        g = PROJ_GROUP.get(last)
        return f"LoRA {g}" if g in ("q/k/v", "o") else "LoRA other"
    if last in PROJ_GROUP and cls == "Linear":
        return f"{PROJ_GROUP[last]} proj"
    if last == "lm_head":
        return "lm_head"
    if last == "embed_tokens":
        return "embedding"
    if "RMSNorm" in cls:
        return "norm"
    if "RotaryEmbedding" in cls:
        return "rope"
    if cls.endswith("Attention"):
        return "attention"
    if cls.endswith("MLP") or cls.endswith("DecoderLayer"):
        return "elementwise"
    return None


_SDPA = ("scaled_dot_product", "sdpa", "flash", "_efficient_attention", "softmax", "bmm")


class TorchLabels:
    """Forward hooks that open a `record_function("cat::<component>")` around each labelled
    module, so the profiler's op tree says which component each op ran in."""

    def __init__(self, model):
        import torch

        self.torch = torch
        self.stack: list = []
        self.handles = []
        for name, mod in model.named_modules():
            label = hf_label(name, mod)
            if label is None:
                continue
            self.handles.append(mod.register_forward_pre_hook(self._pre(label)))
            self.handles.append(mod.register_forward_hook(self._post))

    def _pre(self, label):
        def hook(mod, args):
            rf = self.torch.profiler.record_function("cat::" + label)
            rf.__enter__()
            self.stack.append(rf)
        return hook

    def _post(self, mod, args, out):
        self.stack.pop().__exit__(None, None, None)

    def remove(self):
        for h in self.handles:
            h.remove()


def torch_categories(events, steps: int) -> tuple[dict, list, float]:
    """Per component and per op: self CPU ms per step; and the profiled step's ms."""
    cats: dict[str, float] = collections.Counter()
    ops: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    step_us = []
    for e in events:
        name = e.name
        if name == "cat::step":
            step_us.append(e.cpu_time_total)
        label, p = None, e
        while p is not None:
            if p.name.startswith("cat::"):
                label = p.name[5:]
                break
            p = p.cpu_parent
        if label is None:
            continue  # outside the timed steps (the profiler's own)
        if name.startswith("cat::"):  # Python inside a module, between its ops
            label = "sampling" if label == "sampling" else "framework overhead"
        elif label == "step":  # ops outside every labelled module: masks, cache, glue
            label = "other"
        elif label == "attention":
            label = "attention" if any(s in name for s in _SDPA) else "attention other"
        cats[label] += e.self_cpu_time_total / 1e3 / steps
        if not name.startswith("cat::"):
            ops[name][0] += e.self_cpu_time_total / 1e3 / steps
            ops[name][1] += 1
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])
    return (dict(cats), [{"op": k, "ms": v[0], "calls_per_step": v[1] / steps} for k, v in top[:15]],
            med(step_us) / 1e3 if step_us else None)


class HFSide:
    def __init__(self, ckpt: str, adapters: dict):
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
        self.attn = getattr(base.config, "_attn_implementation", None)
        params = inspect.signature(base.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep = "logits_to_keep" in params

    def step_fn(self, wl: Workload, vocab: int, seed: int):
        """A function running one step of the workload (forward + argmax), and the setup it
        needs per run (a fresh copy of the decode cache), untimed."""
        torch = self.torch
        g = torch.Generator().manual_seed(seed)
        kw = {"logits_to_keep": 1} if self.keep else {}
        lora = {"adapter_names": list(wl.adapters)} if wl.lora else {}
        ctx = contextlib.nullcontext if wl.lora else self.model.disable_adapter
        model = self.model
        if wl.kind == "decode":
            prompt = torch.randint(0, vocab, (wl.seqs, wl.prompt), generator=g)
            with torch.inference_mode(), ctx():
                out = model(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                            use_cache=True, **kw, **lora)
            cache0 = out[self.cache_kw] if self.cache_kw in out else out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.ones(wl.seqs, wl.prompt + 1, dtype=torch.long)
            state = {}

            def setup():
                state["cache"] = copy.deepcopy(cache0)

            def step():
                with torch.inference_mode(), ctx():
                    o = model(input_ids=nxt, attention_mask=mask, use_cache=True,
                              **{self.cache_kw: state["cache"]}, **kw, **lora)
                    with torch.profiler.record_function("cat::sampling"):
                        return o.logits[:, -1].argmax(-1)
        else:
            ids = torch.randint(0, vocab, (1, wl.prompt), generator=g)
            mask = torch.ones_like(ids)

            def setup():
                pass

            def step():
                with torch.inference_mode(), ctx():
                    o = model(input_ids=ids, attention_mask=mask, use_cache=True, **kw, **lora)
                    with torch.profiler.record_function("cat::sampling"):
                        return o.logits[:, -1].argmax(-1)
        return setup, step

    def measure(self, wl: Workload, vocab: int, args, runs: int, prof_runs: int) -> dict:
        torch = self.torch
        setup, step = self.step_fn(wl, vocab, args.seed)
        threads0 = torch.get_num_threads()
        times = {}
        for th in args.torch_threads:
            torch.set_num_threads(th)
            ts = []
            for i in range(runs + 2):
                setup()
                t0 = time.perf_counter()
                step()
                if i >= 2:
                    ts.append(time.perf_counter() - t0)
            times[th] = med(ts) * 1e3
        best = min(times, key=times.get)
        torch.set_num_threads(best)
        labels = TorchLabels(self.model)
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(prof_runs):
                    setup()
                    with torch.profiler.record_function("cat::step"):
                        step()
            cats, top, prof_ms = torch_categories(prof.events(), prof_runs)
        finally:
            labels.remove()
            torch.set_num_threads(threads0)
        return {"step_ms_by_threads": times, "best_threads": best, "step_ms": times[best],
                "profile": {"components_ms": cats, "ops_sum_ms": sum(cats.values()),
                            "profiled_step_ms": prof_ms, "profiled_runs": prof_runs,
                            "top_ops": top, "threads": best}}


# -- report -----------------------------------------------------------------------------------
def carajax_table(model: str, wl: Workload, r: dict, layers: int) -> str:
    xp = r.get("xla_profile") or {}
    iso = r.get("isolated") or {}
    fl = r.get("component_floor_ms") or {}
    dev = r.get("device_step_ms")
    prof_step = xp.get("profiled_step_ms")
    xc = xp.get("components_ms") or {}
    ic: dict[str, float] = collections.Counter()
    for v in iso.values():
        if v["component"] != "-" and v["ms"] is not None:
            ic[v["component"]] += v["ms"]
    lines = [f"### {model} / {wl.name}: carajax ({wl.label})", "",
             f"Device step {fmt(dev)} ms (relaunched, unprofiled); engine.step() "
             f"{fmt(r.get('step_ms'))} ms, of which host {fmt(r.get('host_ms'))} ms; "
             f"{r.get('tokens_bucket')} tokens (bucket), query block {r.get('query_block')}.", "",
             "| component | XLA profile ms (wall share) | % of profiled step | isolated ms | "
             "% of device step | floor ms |", "|---|---:|---:|---:|---:|---:|"]
    for c in CATEGORIES:
        if c not in xc and c not in ic:
            continue
        lines.append(f"| {c} | {fmt(xc.get(c))} | {pct(xc.get(c), prof_step)} | "
                     f"{fmt(ic.get(c))} | {pct(ic.get(c), dev)} | {fmt(fl.get(c), 3)} |")
    xsum, isum = xp.get("ops_sum_ms"), sum(ic.values()) if ic else None
    lines.append(f"| **sum of components** | {fmt(xsum)} | {pct(xsum, prof_step)} | {fmt(isum)} | "
                 f"{pct(isum, dev)} | {fmt(r['floor']['floor_ms'], 3)} |")
    win = xp.get("execution_window_ms")
    lines.append(f"| execution window (first to last op) | {fmt(win)} | {pct(win, prof_step)} "
                 "| | | |")
    idle = None if win is None or xsum is None else win - xsum
    lines.append(f"| idle inside the window (no op running) | {fmt(idle)} | {pct(idle, prof_step)} "
                 "| | | |")
    lines.append(f"| whole step: profiled wall / device step | {fmt(prof_step)} | 100% | {fmt(dev)} "
                 f"| 100% | {fmt(r['floor']['floor_ms'], 3)} |")
    disp = xp.get("dispatch_sum_ms")
    lines.append(f"| host time inside jit calls (dispatch, overlaps ops) | {fmt(disp)} | "
                 f"{pct(disp, prof_step)} | | | |")
    gap_x = None if xsum is None or prof_step is None else prof_step - xsum
    gap_i = None if isum is None or dev is None else dev - isum
    lines.append(f"| gap: step - sum (idle, dispatch before the first op; isolated: fusion) | "
                 f"{fmt(gap_x)} | "
                 f"{pct(gap_x, prof_step)} | {fmt(gap_i)} | {pct(gap_i, dev)} | |")
    fl_ = r["floor"]
    lines.append("")
    lines.append(f"Floor: {fl_['bytes'] / 1e6:.1f} MB / bandwidth = {fl_['bandwidth_ms']:.3f} ms, "
                 f"{fl_['flops'] / 1e9:.3f} GFLOP / jax matmul peak = {fl_['compute_ms']:.3f} ms "
                 f"({fl_['bound']}-bound); device step / floor = {ratio(dev, fl_['floor_ms'])}.")
    if xp.get("error"):
        lines.append(f"XLA profile: n/a ({xp['error']}).")
    if xp.get("thread_sum_ms") is not None:
        lines.append(f"Op time summed over threads: {xp['thread_sum_ms']:.2f} ms per step "
                     f"(XLA:CPU runs independent ops at once; the wall share splits each instant "
                     f"among them).")
    if xp.get("modules"):
        lines.append("Compiled pieces (wall share per step, calls per step): " + ", ".join(
            f"{m} {v['ms']:.2f} ms x{v['calls_per_step']:.0f}" for m, v in xp["modules"].items())
            + "; host inside jit calls: " + ", ".join(
            f"{m} {v:.2f} ms" for m, v in (xp.get("dispatch_ms") or {}).items()) + ".")
    disp1 = iso.get("dispatch (jit of x + 1)", {}).get("ms")
    per = [f"{m.split('_')[0]} {fmt(iso[m]['ms'] / layers, 3)}" for m in PROJ_GROUP
           if m in iso and iso[m]["ms"] is not None]
    if per:
        lines.append(f"Isolated matmuls per layer (ms): {', '.join(per)}; each isolated part is "
                     f"one jit call (dispatch alone: {fmt(disp1, 3)} ms).")
    errs = [f"{k}: {v['error']}" for k, v in iso.items() if v.get("error")]
    if errs:
        lines.append("Isolated parts that failed: " + "; ".join(errs))
    top = xp.get("top_ops") or []
    if top:
        lines += ["", "Top HLO ops (per step, all layers; grouped by component, op kind and "
                  "source line):", "",
                  "| component | op | source | wall-share ms | thread ms | per step |",
                  "|---|---|---|---:|---:|---:|"]
        for t in top[:10]:
            lines.append(f"| {t['component']} | {t['op']} | {t['source']} | {t['ms']:.3f} | "
                         f"{t.get('thread_ms', 0):.3f} | {t['count_per_step']:.0f} |")
    return "\n".join(lines)


def hf_table(model: str, wl: Workload, r: dict) -> str:
    p = r["profile"]
    cats = p["components_ms"]
    step = p["profiled_step_ms"]
    fl = r.get("component_floor_ms") or {}
    times = ", ".join(f"{th} thread{'s' if th > 1 else ''} {ms:.2f} ms"
                      for th, ms in r["step_ms_by_threads"].items())
    lines = [f"### {model} / {wl.name}: HF PEFT ({wl.label})", "",
             f"Step (forward + argmax): {times}; profiled at {p['threads']} thread(s): "
             f"{fmt(step)} ms under the profiler.", "",
             "| component | self CPU ms | % of profiled step | floor ms |", "|---|---:|---:|---:|"]
    for c in CATEGORIES:
        if c in cats:
            lines.append(f"| {c} | {cats[c]:.3f} | {pct(cats[c], step)} | {fmt(fl.get(c), 3)} |")
    lines.append(f"| **sum of components** | {p['ops_sum_ms']:.3f} | {pct(p['ops_sum_ms'], step)} "
                 f"| {fmt(r['floor']['floor_ms'], 3)} |")
    ops_only = p["ops_sum_ms"] - cats.get("framework overhead", 0.0)
    lines.append(f"| unprofiled step ({p['threads']} thread(s)) | {r['step_ms_by_threads'][p['threads']]:.3f}"
                 f" | | |")
    lines.append(f"| framework overhead, unprofiled estimate (step - op self times) | "
                 f"{r['step_ms_by_threads'][p['threads']] - ops_only:.3f} | | |")
    fl_ = r["floor"]
    lines.append("")
    lines.append(f"Floor (torch's best matmul peak): {fl_['floor_ms']:.3f} ms ({fl_['bound']}-bound); "
                 f"best step / floor = {r['step_ms'] / fl_['floor_ms']:.2f}x.")
    lines += ["", "Top ops by self CPU time:", "", "| op | ms | % | calls per step |",
              "|---|---:|---:|---:|"]
    for t in p["top_ops"][:10]:
        lines.append(f"| {t['op']} | {t['ms']:.3f} | {pct(t['ms'], step)} | "
                     f"{t['calls_per_step']:.0f} |")
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    lines = ["| model | workload | carajax engine.step ms | carajax device ms | host ms | "
             "HF ms (threads) | floor ms (bytes / bw, FLOPs / peak) | carajax device / floor | "
             "HF / floor | carajax speed-up (HF / engine.step) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, m in results.items():
        for name, w in m["workloads"].items():
            cj, hf = w.get("carajax") or {}, w.get("hf") or {}
            fl = (cj.get("floor") or hf.get("floor") or {})
            hf_ms, dev = hf.get("step_ms"), cj.get("device_step_ms")
            lines.append(
                f"| {model} | {name} | {fmt(cj.get('step_ms'))} | {fmt(cj.get('device_step_ms'))} | "
                f"{fmt(cj.get('host_ms'))} | "
                f"{fmt(hf_ms)} ({hf.get('best_threads', '-')}) | {fmt(fl.get('floor_ms'), 3)} "
                f"({fmt(fl.get('bandwidth_ms'), 3)}, {fmt(fl.get('compute_ms'), 3)}) | "
                f"{ratio(dev, fl.get('floor_ms'))} | "
                f"{ratio(hf_ms, (hf.get('floor') or {}).get('floor_ms'))} | "
                f"{ratio(hf_ms, cj.get('step_ms'))} |")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_hf()
    import jax

    machine = machine_info()
    log(f"{machine['cpu_count']} CPUs, jax {machine['jax']} {machine['jax_devices']}, torch "
        f"{machine['torch']}, transformers {machine['transformers']}, peft {machine['peft']}; "
        f"load {machine['loadavg_start'][0]:.1f}")
    if jax.default_backend() != "cpu":
        log(f"note: JAX backend is {jax.default_backend()}; HF runs on the CPU")
    limits = measure_limits(args)
    results: dict = {}
    md: list[str] = []
    root = tempfile.mkdtemp(prefix="profile_step_")
    try:
        for model in args.models:
            spec = model_spec(model, args.quick)
            mroot = os.path.join(root, model)
            t0 = time.perf_counter()
            ckpt = build_checkpoint(spec, mroot, args.seed)
            ns = argparse.Namespace(ranks=args.ranks, seed=args.seed, lora_std=args.lora_std)
            adapters = build_adapters(ns, ckpt, mroot)
            log(f"{model}: {spec['num_hidden_layers']} layers, hidden {spec['hidden_size']}, "
                f"vocab {spec['vocab_size']}, tied {spec['tie_word_embeddings']}; checkpoint + "
                f"{len(adapters)} adapters written in {time.perf_counter() - t0:.1f}s")
            from carajax.config import ModelConfig

            mc = ModelConfig.from_hf(ckpt)
            workloads = make_workloads(args, adapters)
            entry = {"spec": spec, "adapters": {n: r for n, (_, r) in adapters.items()},
                     "workloads": {w.name: {"label": w.label, "tokens": w.tokens, "seqs": w.seqs,
                                            "prompt": w.prompt, "adapters": w.adapters,
                                            "ranks": w.ranks} for w in workloads}}
            cj = carajax_model(args, ckpt, adapters, workloads, step_costs, limits, mroot)
            for name, r in cj.items():
                entry["workloads"][name]["carajax"] = r
            if not args.no_hf:
                import torch

                t0 = time.perf_counter()
                hf = HFSide(ckpt, adapters)
                log(f"  HF model + {len(adapters)} PEFT adapters loaded in "
                    f"{time.perf_counter() - t0:.1f}s (attn {hf.attn})")
                for wl in workloads:
                    log(f"  HF {wl.name}: {wl.label}")
                    runs = args.runs if wl.kind == "decode" else max(3, args.runs // 2)
                    prof = args.profile_runs if wl.kind == "decode" else max(2, args.profile_runs // 2)
                    r = hf.measure(wl, mc.vocab_size, args, runs, prof)
                    costs = step_costs(mc, wl)
                    r["floor"] = floor_ms(costs, limits["bandwidth_gbps"],
                                          limits["gemm_torch_best_gflops"])
                    r["component_floor_ms"] = {c: comp_floor(costs, c, limits["bandwidth_gbps"],
                                                             limits["gemm_torch_best_gflops"])
                                               for c in costs}
                    log("    " + ", ".join(f"{th} thr {ms:.2f} ms"
                                           for th, ms in r["step_ms_by_threads"].items()))
                    entry["workloads"][wl.name]["hf"] = r
                entry["hf_attn_implementation"] = hf.attn
                del hf
                torch.set_num_threads(os.cpu_count() or 1)
            results[model] = entry
            for wl in workloads:
                w = entry["workloads"][wl.name]
                if "carajax" in w:
                    md.append(carajax_table(model, wl, w["carajax"], mc.num_layers))
                if "hf" in w:
                    md.append(hf_table(model, wl, w["hf"]))
            shutil.rmtree(mroot, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    machine["loadavg_end"] = list(os.getloadavg())
    summary = summary_table(results)
    head = ("## Summary\n\n" + summary + "\n\n"
            f"Bandwidth {limits['bandwidth_gbps']:.1f} GB/s ({limits['bandwidth_test']}); matmul "
            f"peak jax {limits['gemm_jax_gflops']:.1f} GFLOP/s, torch "
            + ", ".join(f"{th} thread(s) {g:.1f}" for th, g in limits["gemm_torch_gflops"].items())
            + f" GFLOP/s ({limits['gemm']}). {machine['cpu_count']} CPUs, load average "
            f"{machine['loadavg_start'][0]:.1f} -> {machine['loadavg_end'][0]:.1f}.")
    text = head + "\n\n" + "\n\n".join(md)
    print(text)
    report = {"benchmark": "profile_step", "machine": machine,
              "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
              "limits": limits, "models": results, "markdown": text}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
