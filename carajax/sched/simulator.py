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
import heapq
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from carajax.sched.router import (
    Batch,
    CostModel,
    NoWorkerError,
    Policy,
    RouteRequest,
    make_policy,
)
from carajax.sched.sim_worker import SimCluster, SimWorker, _batch, _Running
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


SIM_COLD_STARTS = ("wait", "cpu_assist", "async", "auto", "cached")


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """Cluster shape and SLOs (seconds).

    `adapter_pages` pages of `page_rank` rank each per worker (an adapter of rank r needs
    ceil(r / page_rank)); `kv_rows` KV-cache token rows per worker.
    """

    n_workers: int = 4
    max_batch: int = 32
    kv_rows: int = 1 << 20
    adapter_pages: int = 256
    page_rank: int = 8
    cold_start: str = "wait"  # "wait" | "cpu_assist" | "async" | "auto" | "cached"
    # Slowdown of prefill chunks run with their LoRA on the CPU (cold adapter under "cpu_assist"):
    # the step pays cpu_slowdown × Pre(those chunks as one batch) on top of its own price (its step
    # model, or Pre(all chunks) + Dec with two forwards, where a step of only CPU chunks then costs
    # (1 + cpu_slowdown) × Pre). 0.26 is the measured mean-TTFT overhead of
    # cpu_assist over cached in BENCHMARKS.md ("Cold starts", llama-test on a 2-core CPU, emulated
    # 25 GB/s link, every request cold), read as a prefill slowdown; it is rough (that TTFT also
    # holds queueing and mid-prefill handovers), and close to the paper's A10 figure (+22% TTFT).
    cpu_slowdown: float = 0.26
    # Chunked prefill, the engine's EngineConfig defaults: at most `prefill_chunk` prompt tokens per
    # request and `max_prefill_tokens` over all requests per step. prefill_chunk=0: whole prompts
    # in the admission step, no budget (the simulator before chunking; old results reproduce).
    prefill_chunk: int = 256
    max_prefill_tokens: int = 2048
    slo_tpot: float = 0.1
    slo_ttft: float = 2.0
    # What `slo_tpot` bounds. "tpot" = decode time per token after the first: what Algorithm 1
    # prices (its penalty compares Dec(batch + r) with this SLO) and what a user sees while a reply
    # streams; queueing and prefill are judged by the separate TTFT SLO. "latency_per_token" =
    # latency / output_tokens folds the prompt into the per-token figure, so a 4k-token prompt with a
    # 10-token answer misses a 40 ms SLO even alone on an idle cluster (on the Azure conversation
    # trace ~10% of requests miss it at any load); kept for comparison.
    slo_metric: str = "tpot"
    # Run a worker's decode-only steps up to its next completion as one event (`decode_run`); False
    # simulates every step (the reference the fast path is tested against).
    fast_forward: bool = True
    # True: a step is one fused forward over all its sequences, priced `cost.step_time(merged batch)`
    # (the engine since issue 15; needs a cost model with a step model). False: Pre(chunks) +
    # Dec(decoders), two forwards (the engine before; the older results reproduce with it).
    fused_step: bool = True
    # Measured mode: each step's time is its price x a residual drawn from these samples (worker w's
    # k-th step of a kind takes the k-th draw of its own stream seeded by (noise_seed, w)). None: the
    # oracle mode, every step exactly its price. `StepNoise.ones()` reproduces the oracle exactly.
    step_noise: StepNoise | None = None
    noise_seed: int = 0

    def __post_init__(self):
        if self.slo_metric not in ("latency_per_token", "tpot"):
            raise ValueError(f"slo_metric must be 'latency_per_token' or 'tpot', got {self.slo_metric!r}")
        if self.cold_start not in SIM_COLD_STARTS:
            raise ValueError(f"cold_start must be one of {SIM_COLD_STARTS}, got {self.cold_start!r}")
        if self.cpu_slowdown < 0:
            raise ValueError(f"cpu_slowdown must be >= 0, got {self.cpu_slowdown}")
        if self.prefill_chunk < 0 or self.max_prefill_tokens < 1:
            raise ValueError("prefill_chunk must be >= 0 (0 = whole prompts) and max_prefill_tokens >= 1")
        if self.n_workers < 1 or self.max_batch < 1:
            raise ValueError("need at least one worker and a batch of at least one")
        if self.step_noise is not None and not isinstance(self.step_noise, StepNoise):
            raise ValueError(f"step_noise must be a StepNoise or None, got {type(self.step_noise).__name__}")


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


@dataclasses.dataclass(slots=True)
class _Run:
    """A worker's decode-only run in flight: its first step started at `next_end` − `d0`, step j + 1
    takes d0 + j·slope, and it has `k` steps (ending at `end`) of which `j` are done; the worker
    had `base_steps` decode steps and `base_ctx` context rows when it began. Measured mode: step
    j + 1 takes (d0 + j·slope)·es[j], `es` the worker's next `k` decode residuals (consumed when
    the run ends, as many as it ran)."""

    next_end: float
    d0: float
    slope: float
    k: int
    base_steps: int
    base_ctx: int
    end: float
    j: int = 0
    seq: int = 0
    es: list[float] | None = None


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
    order = sorted(range(n), key=lambda i: (requests[i].arrival_s, i))
    if isinstance(policy, str):
        avg_out = float(np.mean([r.output_tokens for r in requests])) if n else 128.0
        # The router knows the workers' cold-start policy and CPU slowdown (carajax prices them).
        kw = {"slo_tpot": cfg.slo_tpot, "avg_output_len": avg_out, "cold_start": cfg.cold_start,
              "cpu_slowdown": cfg.cpu_slowdown, **policy_kw}
        policy = make_policy(policy, **kw)
    # A policy that learns from finished replies (carajax: output lengths) hears of each one.
    observe = getattr(policy, "observe_output", None) or (lambda tokens: None)
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
    workers = SimCluster([SimWorker(i, c, cfg) for i, c in enumerate(costs)], cfg)
    # Measured mode: each worker's residuals, one seeded stream per worker (None: the oracle mode).
    noise = (None if cfg.step_noise is None else
             [cfg.step_noise.stream(cfg.noise_seed, i) for i in range(cfg.n_workers)])
    for r in requests:  # a request that can never fit would stall its worker forever
        if r.prompt_tokens + r.output_tokens > cfg.kv_rows or (
            r.rank > 0 and -(-r.rank // cfg.page_rank) > cfg.adapter_pages
        ):
            raise ValueError(f"request {r} can never fit a worker ({cfg})")
        if r.output_tokens < 1 or r.prompt_tokens < 0:
            raise ValueError(f"request {r} needs output_tokens >= 1")

    first = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    tokens = np.zeros(n, dtype=np.int64)
    placed = np.full(n, -1, dtype=np.int64)
    loads = fallbacks = cpu_tokens = 0
    wait_loads = cfg.cold_start == "wait"
    assisting = cfg.cold_start in ("cpu_assist", "async", "auto")  # copies beside the batch
    # Per request routed cold under cpu_assist / async / auto: "cpu" or "async" (auto: by price).
    paths: dict[int, str] = {}
    unlimited = 1 << 62
    chunk_cap = cfg.prefill_chunk or unlimited  # 0: whole prompts, no per-step budget
    step_budget = cfg.max_prefill_tokens if cfg.prefill_chunk else unlimited
    slowdown, fused = cfg.cpu_slowdown, cfg.fused_step
    # (end time, seq, worker, chunked, decode steps, is a run): one event is one step, or a run of
    # decode-only steps up to the worker's next completion (`decode_run`), which an arrival routed
    # to the worker cuts short (`cut_run`); a cut run's old event is stale and skipped.
    events: list[tuple[float, int, int, list[_Running], int, bool]] = []
    seq = 0
    runs: dict[int, _Run] = {}  # worker index -> its decode run in flight

    def cold_path(w: SimWorker, req: SimRequest, now: float) -> str:
        """The path of a request routed cold to w: the policy's, or under auto the cheaper."""
        if cfg.cold_start != "auto":
            return "cpu" if cfg.cold_start == "cpu_assist" else "async"
        toks = req.prompt_tokens
        cpu_s = cfg.cpu_slowdown * w.cost.prefill_time(_batch((req.rank,), toks, toks))
        land = w.landing.get(req.adapter, 0.0)
        copy_s = land - now if land > now else (
            max(now, w.link_free) - now + w.cost.load_seconds(req.rank))
        return "cpu" if cpu_s < copy_s else "async"

    def cold_on(w: SimWorker, req: SimRequest, now: float) -> bool:
        """The request's adapter is not usable on w yet: not resident, or its copy in flight."""
        return req.rank > 0 and (req.adapter not in w.resident
                                 or w.landing.get(req.adapter, 0.0) > now)

    def pin_and_copy(w: SimWorker, rid: int, req: SimRequest, now: float) -> bool:
        """async: pin the adapter's pages for a queued request and start its copy unless it is
        resident (the engine `want`s it at submit); False if no pages can be had now."""
        nonlocal loads
        got = w.acquire(req.adapter, req.rank)
        if got is None:
            return False
        w.pre_pinned.add(rid)
        if got:
            loads += 1
            w.start_copy(req.adapter, req.rank, now)
        return True

    def start_step(wi: int, now: float) -> None:
        nonlocal seq, loads, cpu_tokens
        w = workers[wi]
        room = w.max_batch - w.n_run - len(w.prefilling)
        i, copying = 0, None  # copying: the earliest landing an async request waits for
        while i < len(w.waiting) and room > 0:  # admit in order (engine: BatchPlanner._plan)
            rid, req = w.waiting[i]
            path = paths.get(rid)
            if path is None and assisting and cold_on(w, req, now):
                path = paths[rid] = cold_path(w, req, now)  # warm when routed, cold now
            if path == "async":
                # Queued until its copy lands (started at routing, or now if the pages were
                # short then); the requests behind it go ahead, also when it has no pages yet.
                if rid not in w.pre_pinned and not pin_and_copy(w, rid, req, now):
                    i += 1
                    continue
                land = w.landing.get(req.adapter, 0.0)
                if land > now:
                    copying = land if copying is None else min(copying, land)
                    i += 1
                    continue
            rows = req.prompt_tokens + req.output_tokens
            if rows > w.kv_free_rows:
                break  # FIFO: the head waits for KV rows; later requests do not overtake it
            if rid in w.pre_pinned:
                w.pre_pinned.discard(rid)
                got = False  # pinned and copied at routing
            else:
                got = w.acquire(req.adapter, req.rank)
            if got is None:
                if w.pre_pinned:  # queued requests pin pages for their copies: no FIFO wait on
                    i += 1  # pages they hold (they are admitted once landed)
                    continue
                break  # no adapter pages until a running request releases its adapter
            r = _Running(rid, req.prompt_tokens, req.output_tokens, req.adapter, req.rank, rows)
            if got:
                loads += 1
                if wait_loads:
                    r.load_due = True
                elif path == "cpu":
                    w.start_copy(req.adapter, req.rank, now)
            if path == "cpu" and w.landing:
                r.ready_at = w.landing.get(req.adapter, 0.0)  # resident but maybe still landing
            w._dequeue_at(i)
            w.kv_free_rows -= rows
            w.prefilling.append(r)
            room -= 1
        # Plan the step (engine: Scheduler.schedule): chunks in admission order under the budget.
        chunked: list[_Running] = []
        budget, load_s = step_budget, 0.0
        ranks: list[int] = []
        toks = ctx = 0
        cpu_ranks: list[int] = []
        cpu_toks = cpu_ctx = 0
        for r in w.prefilling:
            rest = r.prompt - r.done
            c = min(chunk_cap, rest, budget)
            if c <= 0 and rest > 0:
                r.chunk = 0  # no budget left this step: waits, still admitted
                continue
            r.chunk = c
            budget -= c
            chunked.append(r)
            ranks.append(r.rank)
            toks += c
            ctx += r.done + c
            if r.load_due:  # wait: the step loads the adapter first, the whole batch waits
                load_s += w.cost.load_seconds(r.rank)
                r.load_due = False
            if r.ready_at > now:  # cpu_assist: the copy has not landed, LoRA on the CPU
                cpu_ranks.append(r.rank)
                cpu_toks += c
                cpu_ctx += r.done + c
        # Measured mode: the forward's residual (a step with chunks; a decode-only step's is drawn
        # below, once it is known whether it starts a decode run). Each term is scaled on its own, so
        # that e = 1 adds the very floats the oracle adds.
        e = noise[wi].take("mixed" if w.n_run else "prefill") if noise is not None and chunked else 1.0
        dur = load_s
        if chunked and fused:  # one forward: the decodes (first, as the planner orders them), the chunks
            merged = _batch(w._run_ranks() + tuple(ranks), w.n_run + toks, w.ctx_sum + ctx)
            dur += w.cost.step_time(merged) * e
        elif chunked:
            dur += w.cost.prefill_time(_batch(tuple(ranks), toks, ctx)) * e
        if cpu_ranks:
            dur += slowdown * w.cost.prefill_time(_batch(tuple(cpu_ranks), cpu_toks, cpu_ctx)) * e
            cpu_tokens += cpu_toks
        if w.n_run and not (chunked and fused):
            dur += w.step_decode_seconds() * e
        w.set_in_flight()
        if not chunked and not w.n_run:
            w.busy = False  # nothing runnable: wait for an arrival (or a release, which cannot be pending)
            if copying is not None:  # or for a queued request's copy to land
                seq += 1
                heapq.heappush(events, (copying, seq, wi, [], 0, False))
            return
        w.busy = True
        seq += 1
        # A decode run would run past a landing copy whose request could join: step by step.
        if (not chunked and cfg.fast_forward and copying is None
                and (run := decode_run(w, now, dur)) is not None):
            runs[wi] = run
            run.seq = seq
            heapq.heappush(events, (run.end, seq, wi, chunked, run.k, True))
            return
        if not chunked and noise is not None:
            dur *= noise[wi].take("decode")  # a decode-only step: dur is its price alone
        heapq.heappush(events, (now + dur, seq, wi, chunked, 1, False))

    def decode_run(w: SimWorker, now: float, dur: float) -> _Run | None:
        """Fast-forward: a worker that only decodes runs the same kind of step until its next
        completion unless a request is routed to it, so those steps are one event. The step time
        grows with the context by n_run rows a step; it is extrapolated from two points when the
        cost model is affine in context (a third point checks), else there is no run."""
        k_max = w.done_heap[0][0] - w.decode_steps
        if k_max <= 1:
            return None
        ranks, n, price = w._run_ranks(), w.n_run, w.decode_step_time  # as `step_decode_seconds`
        d1 = price(_batch(ranks, n, w.ctx_sum + n))
        d2 = price(_batch(ranks, n, w.ctx_sum + 2 * n))
        slope = d1 - dur
        if abs(d2 - d1 - slope) > 1e-9 * max(d2, 1e-9):
            return None  # not affine in context: step by step
        if noise is None:
            t = now + dur
            for j in range(1, k_max):  # step j + 1 ends at t_j + dur + j·slope, as stepping adds them
                t = t + dur + j * slope
            return _Run(now + dur, dur, slope, k_max, w.decode_steps, w.ctx_sum, t)
        es = noise[w.index].peek("decode", k_max)  # step j + 1 takes (dur + j·slope)·es[j]
        t = first = now + dur * es[0]
        for j in range(1, k_max):  # e = 1 adds the oracle's floats: x·1.0 is x
            e = es[j]
            t = t + dur * e + j * slope * e
        return _Run(first, dur, slope, k_max, w.decode_steps, w.ctx_sum, t, es=es)

    def sync_runs(now: float) -> None:
        """Brings every worker in a decode run to the steps it has finished by `now` (what the
        router would see had each step been an event)."""
        for wi, run in runs.items():
            j, k = run.j, run.k
            es = run.es
            while j + 1 < k and run.next_end <= now:
                if es is None:
                    run.next_end = run.next_end + run.d0 + (j + 1) * run.slope
                else:  # as `decode_run` adds them
                    e = es[j + 1]
                    run.next_end = run.next_end + run.d0 * e + (j + 1) * run.slope * e
                j += 1
            if j != run.j:
                run.j = j
                w = workers[wi]
                w.decode_progressed(run.base_steps + j, run.base_ctx + j * w.n_run)

    def cut_run(wi: int) -> None:
        """A request was routed to a worker in a decode run: the run ends with its step in flight,
        after which the worker plans its next step with the request queued (as stepping would)."""
        nonlocal seq
        run = runs[wi]
        if run.j + 1 >= run.k:
            return  # the step in flight is the run's last anyway
        seq += 1
        run.k, run.end, run.seq = run.j + 1, run.next_end, seq
        heapq.heappush(events, (run.end, seq, wi, [], run.k, True))

    def pop_event() -> None:
        end, sq, wi, adm, steps, is_run = heapq.heappop(events)
        if steps == 0 and not is_run:  # an idle worker's copy landed: plan (unless busy again)
            if not workers[wi].busy:
                start_step(wi, end)
            return
        if is_run:
            run = runs.get(wi)
            if run is None or run.seq != sq:
                return  # a run cut short: its replacement event ends it
            del runs[wi]
            if noise is not None:
                noise[wi].skip("decode", run.k)  # the residuals of the steps it ran
            w = workers[wi]
            w.decode_steps, w.ctx_sum = run.base_steps, run.base_ctx  # end_step adds all k steps
        end_step(end, wi, adm, steps)

    def end_step(now: float, wi: int, chunked: list[_Running], steps: int = 1) -> None:
        w = workers[wi]
        if w.n_run:
            w.decode_steps += steps
            w.ctx_sum += w.n_run * steps
            w.decode_changed()
            heap = w.done_heap
            while heap and heap[0][0] <= w.decode_steps:
                _, rid, r = heapq.heappop(heap)
                finish[rid] = now
                tokens[rid] = r.out
                observe(r.out)
                w.leave(r)
                w.kv_free_rows += r.rows
                w.release(r.adapter, r.rank)
        completed = False
        for r in chunked:
            r.done += r.chunk
            r.chunk = 0
            if r.done < r.prompt:
                continue
            completed = True
            first[r.rid] = now
            if r.out == 1:
                finish[r.rid] = now
                tokens[r.rid] = 1
                observe(1)
                w.kv_free_rows += r.rows
                w.release(r.adapter, r.rank)
            else:
                w.join(r)
        if completed:
            w.prefilling = [r for r in w.prefilling if r.done < r.prompt]
        start_step(wi, now)

    for rid in order:
        req = requests[rid]
        t = req.arrival_s
        while events and events[0][0] <= t:  # finish steps first so the router sees fresh state
            pop_event()
        if runs:
            sync_runs(t)
        rr = RouteRequest(req.adapter, req.rank, req.prompt_tokens, req.output_tokens)
        try:
            w = policy.choose(rr, workers)
        except NoWorkerError:
            # Every worker's adapter pages are pinned by running requests right now. The request
            # is not lost: the policy routes it as if memory were free and it waits in that
            # worker's queue until a release frees pages. Counted in the summary.
            fallbacks += 1
            with workers.memory_ignored():
                w = policy.choose(rr, workers)
        wi = w.index
        placed[rid] = wi
        if assisting and cold_on(w, req, t):
            paths[rid] = cold_path(w, req, t)
            if paths[rid] == "async":  # the engine starts the copy at submit
                pin_and_copy(w, rid, req, t)  # (no pages now: retried at admission)
        w.enqueue(rid, req)
        if not w.busy:
            start_step(wi, t)
        elif wi in runs:
            cut_run(wi)
    while events:
        pop_event()

    arrival = np.array([r.arrival_s for r in requests], dtype=np.float64)
    out = np.array([r.output_tokens for r in requests], dtype=np.float64)
    ttft = first - arrival
    tpot = np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), 0.0)
    return SimResult(
        policy=getattr(policy, "name", type(policy).__name__),
        ttft=ttft,
        tpot=tpot,
        latency=finish - arrival,
        tokens=tokens,
        worker=placed,
        loads=loads,
        memory_fallbacks=fallbacks,
        wall_s=time.perf_counter() - t0,
        cfg=cfg,
        cpu_prefill_tokens=cpu_tokens,
    )


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
