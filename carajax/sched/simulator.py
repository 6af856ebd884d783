"""A discrete-event simulator of a LoRA serving cluster, in virtual time.

It answers "what at 60 workers and 40k adapters" with the same routing code the gRPC router uses
(`carajax.sched.router`). Each worker is modelled like the engine's planner
(`carajax/engine/planner.py`):

* continuous batching: at the start of every step the worker admits requests from its FIFO queue
  (up to `max_batch` running, prefilling ones included; KV rows reserved for prompt + output;
  adapter pages available);
* chunked prefill (`prefill_chunk`, `max_prefill_tokens`, the engine's defaults 256 / 2048): every
  step gives each prefilling request, in admission order, a chunk of at most `prefill_chunk` of its
  remaining prompt tokens, at most `max_prefill_tokens` over all of them, and every decoding
  request one token. `prefill_chunk=0` is the old whole-prompt simulator: a request's whole prompt
  is prefilled in the step that admits it, with no per-step token budget;
* the step time (`fused_step=True`, the engine since issue 15): the engine runs every step as ONE
  forward over all of its tokens, decodes and prefill chunks alike (`ModelRunner.run`), so a step
  costs `cost.step_time` of the merged batch: every sequence's rank, all tokens, and context =
  Σ KV positions read (chunk start + chunk length for a chunk, context + 1 for a decode, the
  profiler's conventions), with one fixed cost and one read of the weights. `fused_step=False` is
  the engine before issue 15, which ran a step's prefill chunks and its decode tokens as two
  forwards: Pre(chunks) + Dec(decoders), each with its own fixed cost (old results reproduce with
  it). The router prices placements with the prefill and decode views in both modes;
* adapters: a per-worker page budget with LRU eviction of adapters no running request uses. A cold
  adapter under `cold_start="wait"` is loaded synchronously in the request's first step (the whole
  step waits `load_seconds(rank)`), as in the engine's `wait` policy; under `"cpu_assist"` the copy
  starts at admission on the worker's one host-to-device link (copies queue behind each other) and
  the request starts at once: its prefill chunks that begin before the copy lands run on the CPU
  path and add `cpu_slowdown` × Pre of those chunks to the step, which stalls it as the
  engine's host callbacks do; later chunks run on the device, and decode always does (the engine
  would decode on the CPU path too while a copy is in flight; not modelled: a copy of 5-50 ms
  almost always lands during the prefill); `"cached"` makes every load free. Under `"async"` a cold
  request's copy starts when it is routed (its pages pinned from then, as the engine `want`s them)
  and the request stays queued until the copy lands, while the requests behind it are admitted; a
  worker with nothing else to run wakes when the copy lands. `"auto"` takes, per cold request at
  routing, `cpu_assist` if `cpu_slowdown` x Pre(its prompt alone) is less than the copy's wait
  (the link's backlog + `load_seconds(rank)`), else `async`: the router's prices for both.
  With `host_adapters` > 0 each worker keeps that many adapters in host memory (LRU); a cold one
  not there is read from disk first (`disk_read_latency_ms` + its bytes / `disk_read_gbps`): a
  copy starts after the read, `auto` and the router add it to both paths; under `wait` the step
  waits for it with the copy (the engine keeps the request queued instead: an upper bound), and
  under `cpu_assist` the request starts before it (a lower bound);

* the step's duration: in the oracle mode (default) the price above, exactly what the router's
  cost model predicts, so the router never mispredicts; in the measured mode (`step_noise`, see
  `carajax.sched.step_noise`) that price times a relative residual drawn from a profile (measured /
  predicted of the fitted step model on its own rows, per step kind: prefill-only, decode-only,
  mixed), so steps run longer or shorter than the router expects. A synchronous adapter load is a
  copy, not a forward, and is not scaled.

A request's first token comes at the end of the step with its last prefill chunk; each later decode
step yields one more. TTFT = first token − arrival; TPOT = (finish − first token) /
(output_tokens − 1) (0 for a one-token output); latency = finish − arrival.

Speed: token bookkeeping is lazy. A running request's finish is known when it joins (the decode
step count it will finish at), so a step costs O(prefilling) plus its completions, and the running
batch's ranks tuple and context sum are kept as running totals for both the step and the router.
A worker that only decodes runs its steps up to its next completion as one event, brought up to
date lazily when a request arrives and cut short when one is routed to it
(`SimConfig.fast_forward`; the per-step reference agrees to rounding).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from carajax.sched.router import Batch, CostModel, Policy, make_policy
from carajax.sched.sim_config import SIM_COLD_STARTS, SimConfig
from carajax.sched.sim_loop import EventLoop
from carajax.sched.sim_worker import SimCluster, SimWorker
from carajax.sched.step_noise import StepNoise
from carajax.trace import (  # workloads live in carajax.trace; re-exported here
    TraceRequest,
    assign_adapters,
    load_trace,
    poisson_workload,
    zipf_probabilities,
)

# A workload request is a trace request: arrival (s), prompt/output tokens, adapter and rank.
SimRequest = TraceRequest


@dataclasses.dataclass(frozen=True)
class AnalyticCost:
    """A closed-form step-latency model for benchmarks and tests when no fitted model is at hand.

    prefill = beta + pre_tok·tokens + alpha·R·tokens/|S|
    decode  = beta + dec_tok·|S| + ctx·context + alpha·R
    step    = beta + dec_tok·|S| + pre_tok·(tokens − |S|) + ctx·context + alpha·R·tokens/|S|
    with R = |S|·max_rank when `padded` (BGMV) else Σrank (MBGMV); load = load_fixed + load_per_rank·r.
    The fused step pays beta once; each sequence costs what a decode row does and each token past a
    sequence's first what a prompt token does, so a decode-only step costs exactly `decode_time`.
    The defaults are in the range of the paper's A10 numbers (Llama-2-7B: ~30 ms decode steps,
    5-50 ms loads); they are a placeholder, not a fit.
    """

    beta: float = 0.02
    pre_tok: float = 1e-4
    dec_tok: float = 2e-4
    ctx: float = 5e-8
    alpha: float = 5e-6
    padded: bool = False
    load_fixed: float = 2e-3
    load_per_rank: float = 3.5e-4

    def _rank_term(self, ranks: tuple[int, ...]) -> float:
        if not ranks:
            return 0.0
        return len(ranks) * max(ranks) if self.padded else sum(ranks)

    def prefill_time(self, batch: Batch) -> float:
        n = max(1, len(batch.ranks))
        lora = self.alpha * self._rank_term(batch.ranks) * batch.tokens / n
        return self.beta + self.pre_tok * batch.tokens + lora

    def decode_time(self, batch: Batch) -> float:
        return (
            self.beta
            + self.dec_tok * len(batch.ranks)
            + self.ctx * batch.context
            + self.alpha * self._rank_term(batch.ranks)
        )

    def step_time(self, batch: Batch) -> float:
        n = len(batch.ranks)
        lora = self.alpha * self._rank_term(batch.ranks) * batch.tokens / max(1, n)
        return (self.beta + self.dec_tok * n + self.pre_tok * (batch.tokens - n)
                + self.ctx * batch.context + lora)

    def load_seconds(self, rank: int) -> float:
        return self.load_fixed + self.load_per_rank * rank



@dataclasses.dataclass
class SimResult:
    """Per-request timings of one simulation (seconds; index = request index) and the summary."""

    policy: str
    ttft: np.ndarray
    tpot: np.ndarray
    latency: np.ndarray
    tokens: np.ndarray  # output tokens generated per request
    worker: np.ndarray  # worker index each request went to
    loads: int  # adapter loads performed
    memory_fallbacks: int  # arrivals routed while no worker had free adapter pages (they queued)
    wall_s: float  # host seconds the simulation took
    cfg: SimConfig
    cpu_prefill_tokens: int = 0  # prompt tokens prefilled on the CPU path (cpu_assist cold starts)

    def summary(self) -> dict[str, Any]:
        """A JSON-able dict: SLO attainment, mean/p99 TTFT, TPOT, latency, loads, wall time."""

        def stats(x: np.ndarray) -> dict[str, float]:
            p50, p99 = np.percentile(x, [50, 99])
            return {"mean": float(np.mean(x)), "p50": float(p50), "p99": float(p99)}

        per_token = self.latency / np.maximum(self.tokens, 1)
        metric = per_token if self.cfg.slo_metric == "latency_per_token" else self.tpot
        ok_tpot = metric <= self.cfg.slo_tpot
        ok_ttft = self.ttft <= self.cfg.slo_ttft
        return {
            "policy": self.policy,
            "requests": int(len(self.ttft)),
            "slo_tpot_s": self.cfg.slo_tpot,
            "slo_ttft_s": self.cfg.slo_ttft,
            "slo_metric": self.cfg.slo_metric,
            "slo_attainment": float(np.mean(ok_tpot)),
            "ttft_slo_attainment": float(np.mean(ok_ttft)),
            "both_slo_attainment": float(np.mean(ok_tpot & ok_ttft)),
            "ttft": stats(self.ttft),
            "tpot": stats(self.tpot),
            "latency": stats(self.latency),
            "latency_per_token": stats(per_token),
            "adapter_loads": self.loads,
            "cpu_prefill_tokens": self.cpu_prefill_tokens,
            "memory_fallbacks": self.memory_fallbacks,
            "workers_used": int(len(np.unique(self.worker))),
            "wall_s": self.wall_s,
        }

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=2)



def simulate(
    requests: Sequence[SimRequest],
    policy: Policy | str,
    cost: CostModel | Sequence[CostModel] | None = None,
    cfg: SimConfig = SimConfig(),  # noqa: B008 - frozen, so a shared default is safe
    **policy_kw: Any,
) -> SimResult:
    """Runs `requests` (sorted by arrival or not) through a cluster routed by `policy`.

    `cost` is one cost model for every worker or one per worker (heterogeneous clusters);
    None uses `AnalyticCost()`. A policy given by name is built with `make_policy(policy,
    slo_tpot=cfg.slo_tpot, avg_output_len=<mean output of the workload>, **policy_kw)`.
    `cfg.step_noise` switches on the measured mode (see the module docstring).
    Deterministic: the only randomness is the policy's own seed and `cfg.noise_seed`.
    """
    t0 = time.perf_counter()
    n = len(requests)
    if isinstance(policy, str):
        avg_out = float(np.mean([r.output_tokens for r in requests])) if n else 128.0
        # The router knows the workers' cold-start policy and CPU slowdown (carajax prices them).
        kw = {"slo_tpot": cfg.slo_tpot, "avg_output_len": avg_out, "cold_start": cfg.cold_start,
              "cpu_slowdown": cfg.cpu_slowdown, **policy_kw}
        policy = make_policy(policy, **kw)
    costs = _worker_costs(cost, cfg)
    _check_fits(requests, cfg)
    workers = SimCluster([SimWorker(i, c, cfg) for i, c in enumerate(costs)], cfg)
    # Measured mode: each worker's residuals, one seeded stream per worker (None: the oracle mode).
    noise = (None if cfg.step_noise is None else
             [cfg.step_noise.stream(cfg.noise_seed, i) for i in range(cfg.n_workers)])
    loop = EventLoop(requests, policy, workers, cfg, noise)
    loop.run()

    arrival = np.array([r.arrival_s for r in requests], dtype=np.float64)
    out = np.array([r.output_tokens for r in requests], dtype=np.float64)
    first, finish = loop.first, loop.finish
    return SimResult(
        policy=getattr(policy, "name", type(policy).__name__),
        ttft=first - arrival,
        tpot=np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), 0.0),
        latency=finish - arrival,
        tokens=loop.tokens,
        worker=loop.placed,
        loads=loop.loads,
        memory_fallbacks=loop.fallbacks,
        wall_s=time.perf_counter() - t0,
        cfg=cfg,
        cpu_prefill_tokens=loop.cpu_tokens,
    )


def _worker_costs(cost: CostModel | Sequence[CostModel] | None, cfg: SimConfig) -> list:
    """One cost model per worker, each able to price the steps `cfg` asks for."""
    costs = [cost or AnalyticCost()] * cfg.n_workers if not isinstance(cost, Sequence) else list(cost)
    if len(costs) != cfg.n_workers:
        raise ValueError(f"{len(costs)} cost models for {cfg.n_workers} workers")
    if cfg.fused_step:
        for c in costs:
            if getattr(c, "step", True) is None or not hasattr(c, "step_time"):
                name = getattr(c, "model_name", "") or type(c).__name__
                raise ValueError(
                    f"SimConfig(fused_step=True) prices each step with the cost model's step model, and "
                    f"{name} ({getattr(c, 'device', '') or 'device unknown'}) has none: it was fitted "
                    "before the engine fused its steps. Refit it from a new profile (`carajax profile "
                    "--fit`), or pass fused_step=False for the old two-forward pricing (Pre + Dec).")
    return costs


def _check_fits(requests: Sequence[SimRequest], cfg: SimConfig) -> None:
    for r in requests:  # a request that can never fit would stall its worker forever
        if r.prompt_tokens + r.output_tokens > cfg.kv_rows or (
            r.rank > 0 and -(-r.rank // cfg.page_rank) > cfg.adapter_pages
        ):
            raise ValueError(f"request {r} can never fit a worker ({cfg})")
        if r.output_tokens < 1 or r.prompt_tokens < 0:
            raise ValueError(f"request {r} needs output_tokens >= 1")



def compare(
    requests: Sequence[SimRequest],
    policies: Iterable[str],
    cost: CostModel | Sequence[CostModel] | None = None,
    cfg: SimConfig = SimConfig(),  # noqa: B008
    **policy_kw: Any,
) -> dict[str, dict[str, Any]]:
    """`simulate` for each named policy on the same workload; {policy: summary}."""
    return {p: simulate(requests, p, cost, cfg, **policy_kw).summary() for p in policies}


__all__ = [
    "SIM_COLD_STARTS",
    "AnalyticCost",
    "SimConfig",
    "SimRequest",
    "SimResult",
    "SimWorker",
    "StepNoise",
    "assign_adapters",
    "compare",
    "load_trace",
    "poisson_workload",
    "simulate",
    "zipf_probabilities",
]
