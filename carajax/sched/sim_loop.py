"""The simulator's event loop: one `simulate` run, in virtual time.

`simulator.py` says what is modelled (admission, chunked prefill, step prices, cold starts, the
measured mode); this module is the machinery that plays it out, in the order a request meets it:

* arrivals (`arrive`): steps ending before the arrival are finished first, so the router sees
  fresh state; the policy picks a worker (`route`); a cold request under cpu_assist / async / auto
  gets its path (`cold_path`) and, under async, its copy started (`pin_and_copy`);
* a worker's step (`start_step`): admission from its FIFO (`admit`), the prefill chunks under the
  token budget (`plan_chunks`), the step's duration (`step_seconds`), then one event at its end;
* decode runs (`decode_run`, `sync_runs`, `cut_run`): a worker that only decodes runs its steps up
  to its next completion as one event, kept up to date for the router, cut short by an arrival;
* the end of a step (`end_step`): finished replies leave, finished prompts join the decode batch,
  and the worker plans its next step.

An event is (end time, seq, worker, the step's chunked requests, decode steps, is a run); `seq`
orders events that end together, and marks a cut run's old event stale.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence
from typing import Any

import numpy as np

from carajax.sched.router import Batch, NoWorkerError, Policy, RouteRequest
from carajax.sched.sim_config import SimConfig
from carajax.sched.sim_worker import SimCluster, SimWorker, _batch, _Running
from carajax.trace import TraceRequest as SimRequest

_UNLIMITED = 1 << 62  # a chunk cap / token budget that never binds (prefill_chunk=0)


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


def read(w: SimWorker, adapter: str, rank: int) -> float:
    """The adapter is copied to w's device now: into its host tier first (LRU out beyond
    `host_adapters`), read from disk if it was not there; the read's seconds."""
    if w.in_host is None or rank <= 0:
        return 0.0
    read_s = 0.0 if adapter in w.in_host else (
        w.read_latency_s + rank * w.read_bytes_per_rank / w.read_bytes_per_s)
    w.in_host[adapter] = None
    w.in_host.move_to_end(adapter)
    while len(w.in_host) > w.host_adapters:
        w.in_host.popitem(last=False)
    return read_s


class EventLoop:
    """One simulation: the event queue, the workers' runs, and the per-request results it fills
    in (`first`, `finish`, `tokens`, `placed`: NaN / -1 until known) with its counters."""

    def __init__(self, requests: Sequence[SimRequest], policy: Policy, workers: SimCluster,
                 cfg: SimConfig, noise: list[Any] | None):
        n = len(requests)
        self.requests, self.policy, self.workers, self.cfg = requests, policy, workers, cfg
        self.noise = noise  # per worker, its stream of step residuals (None: the oracle mode)
        # A policy that learns from finished replies (carajax: output lengths) hears of each one.
        self.observe = getattr(policy, "observe_output", None) or (lambda tokens: None)
        self.first = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.tokens = np.zeros(n, dtype=np.int64)
        self.placed = np.full(n, -1, dtype=np.int64)
        self.loads = self.fallbacks = self.cpu_tokens = 0
        self.wait_loads = cfg.cold_start == "wait"
        self.assisting = cfg.cold_start in ("cpu_assist", "async", "auto")  # copies beside the batch
        # Per request routed cold under cpu_assist / async / auto: "cpu" or "async" (auto: by price).
        self.paths: dict[int, str] = {}
        self.chunk_cap = cfg.prefill_chunk or _UNLIMITED  # 0: whole prompts, no per-step budget
        self.step_budget = cfg.max_prefill_tokens if cfg.prefill_chunk else _UNLIMITED
        self.events: list[tuple[float, int, int, list[_Running], int, bool]] = []
        self.seq = 0
        self.runs: dict[int, _Run] = {}  # worker index -> its decode run in flight

    def run(self) -> None:
        """Every request in arrival order (ties by index), then every step left."""
        requests = self.requests
        for rid in sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i)):
            self.arrive(rid)
        while self.events:
            self.pop_event()

    def _push(self, end: float, wi: int, chunked: list[_Running], steps: int, is_run: bool) -> int:
        self.seq += 1
        heapq.heappush(self.events, (end, self.seq, wi, chunked, steps, is_run))
        return self.seq

    # -- arrivals and routing -------------------------------------------------------------------
    def arrive(self, rid: int) -> None:
        req = self.requests[rid]
        t = req.arrival_s
        events = self.events
        while events and events[0][0] <= t:  # finish steps first so the router sees fresh state
            self.pop_event()
        if self.runs:
            self.sync_runs(t)
        w = self.route(RouteRequest(req.adapter, req.rank, req.prompt_tokens, req.output_tokens))
        wi = w.index
        self.placed[rid] = wi
        if self.assisting and self.cold_on(w, req, t):
            path = self.paths[rid] = self.cold_path(w, req, t)
            if path == "async":  # the engine starts the copy at submit
                self.pin_and_copy(w, rid, req, t)  # (no pages now: retried at admission)
        w.enqueue(rid, req)
        if not w.busy:
            self.start_step(wi, t)
        elif wi in self.runs:
            self.cut_run(wi)

    def route(self, rr: RouteRequest) -> SimWorker:
        try:
            return self.policy.choose(rr, self.workers)
        except NoWorkerError:
            # Every worker's adapter pages are pinned by running requests right now. The request
            # is not lost: the policy routes it as if memory were free and it waits in that
            # worker's queue until a release frees pages. Counted in the summary.
            self.fallbacks += 1
            with self.workers.memory_ignored():
                return self.policy.choose(rr, self.workers)

    # -- cold adapters --------------------------------------------------------------------------
    def cold_path(self, w: SimWorker, req: SimRequest, now: float) -> str:
        """The path of a request routed cold to w: the policy's, or under auto the cheaper."""
        cfg = self.cfg
        if cfg.cold_start != "auto":
            return "cpu" if cfg.cold_start == "cpu_assist" else "async"
        toks = req.prompt_tokens
        read_s = w.read_seconds(req.adapter, req.rank)  # both paths wait for a disk read first
        cpu_s = read_s + cfg.cpu_slowdown * w.cost.prefill_time(_batch((req.rank,), toks, toks))
        land = w.landing.get(req.adapter, 0.0)
        copy_s = land - now if land > now else (
            max(now + read_s, w.link_free) - now + w.cost.load_seconds(req.rank))
        return "cpu" if cpu_s < copy_s else "async"

    @staticmethod
    def cold_on(w: SimWorker, req: SimRequest, now: float) -> bool:
        """The request's adapter is not usable on w yet: not resident, or its copy in flight."""
        return req.rank > 0 and (req.adapter not in w.resident
                                 or w.landing.get(req.adapter, 0.0) > now)

    def pin_and_copy(self, w: SimWorker, rid: int, req: SimRequest, now: float) -> bool:
        """async: pin the adapter's pages for a queued request and start its copy unless it is
        resident (the engine `want`s it at submit); False if no pages can be had now."""
        got = w.acquire(req.adapter, req.rank)
        if got is None:
            return False
        w.pre_pinned.add(rid)
        if got:
            self.loads += 1
            w.start_copy(req.adapter, req.rank, now, read(w, req.adapter, req.rank))
        return True

    # -- a worker's step ------------------------------------------------------------------------
    def start_step(self, wi: int, now: float) -> None:
        """Plan and price worker wi's next step at `now` and queue its end, or leave the worker
        idle (waking when a queued request's copy lands, if one waits on it)."""
        w = self.workers[wi]
        copying = self.admit(w, now)
        chunked, chunks, cpu, load_s = self.plan_chunks(w, now)
        dur = self.step_seconds(wi, w, chunked, chunks, cpu, load_s)
        w.set_in_flight()
        if not chunked and not w.n_run:
            w.busy = False  # nothing runnable: wait for an arrival (or a release, which cannot be pending)
            if copying is not None:  # or for a queued request's copy to land
                self._push(copying, wi, [], 0, False)
            return
        w.busy = True
        # A decode run would run past a landing copy whose request could join: step by step.
        if (not chunked and self.cfg.fast_forward and copying is None
                and (run := self.decode_run(w, now, dur)) is not None):
            self.runs[wi] = run
            run.seq = self._push(run.end, wi, chunked, run.k, True)
            return
        if not chunked and self.noise is not None:
            dur *= self.noise[wi].take("decode")  # a decode-only step: dur is its price alone
        self._push(now + dur, wi, chunked, 1, False)

    def admit(self, w: SimWorker, now: float) -> float | None:
        """Moves queued requests into the running set, in order (engine: BatchPlanner._plan), while
        the batch, KV rows and adapter pages allow. Returns the earliest landing of a copy that an
        async request still waits for (None if none)."""
        room = w.max_batch - w.n_run - len(w.prefilling)
        paths = self.paths
        i, copying = 0, None
        while i < len(w.waiting) and room > 0:
            rid, req = w.waiting[i]
            path = paths.get(rid)
            if path is None and self.assisting and self.cold_on(w, req, now):
                path = paths[rid] = self.cold_path(w, req, now)  # warm when routed, cold now
            if path == "async":
                # Queued until its copy lands (started at routing, or now if the pages were
                # short then); the requests behind it go ahead, also when it has no pages yet.
                if rid not in w.pre_pinned and not self.pin_and_copy(w, rid, req, now):
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
                self.loads += 1
                if self.wait_loads:
                    r.load_due = True
                elif path == "cpu":
                    w.start_copy(req.adapter, req.rank, now, read(w, req.adapter, req.rank))
            if path == "cpu" and w.landing:
                r.ready_at = w.landing.get(req.adapter, 0.0)  # resident but maybe still landing
            w._dequeue_at(i)
            w.kv_free_rows -= rows
            w.prefilling.append(r)
            room -= 1
        return copying

    def plan_chunks(self, w: SimWorker, now: float
                    ) -> tuple[list[_Running], Batch, Batch | None, float]:
        """The step's prefill chunks (engine: Scheduler.schedule): in admission order under the
        token budget, each request's `chunk` set. Returns (the chunked requests, their batch, the
        batch of those whose LoRA runs on the CPU (cpu_assist, copy not landed) or None, seconds
        of synchronous adapter loads the step waits for (wait))."""
        chunked: list[_Running] = []
        budget, chunk_cap, load_s = self.step_budget, self.chunk_cap, 0.0
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
                # (its disk read too, here: the engine keeps the request queued for that)
                load_s += read(w, r.adapter, r.rank) + w.cost.load_seconds(r.rank)
                r.load_due = False
            if r.ready_at > now:  # cpu_assist: the copy has not landed, LoRA on the CPU
                cpu_ranks.append(r.rank)
                cpu_toks += c
                cpu_ctx += r.done + c
        cpu = None
        if cpu_ranks:
            cpu = _batch(tuple(cpu_ranks), cpu_toks, cpu_ctx)
            self.cpu_tokens += cpu_toks
        return chunked, _batch(tuple(ranks), toks, ctx), cpu, load_s

    def step_seconds(self, wi: int, w: SimWorker, chunked: list[_Running], chunks: Batch,
                     cpu: Batch | None, load_s: float) -> float:
        """The step's price (a decode-only step's residual is drawn by the caller, once it is
        known whether the step starts a decode run)."""
        # Measured mode: the forward's residual. Each term is scaled on its own, so that e = 1
        # adds the very floats the oracle adds.
        noise = self.noise
        e = noise[wi].take("mixed" if w.n_run else "prefill") if noise is not None and chunked else 1.0
        fused = self.cfg.fused_step
        dur = load_s
        if chunked and fused:  # one forward: the decodes (first, as the planner orders them), the chunks
            merged = _batch(w._run_ranks() + chunks.ranks, w.n_run + chunks.tokens,
                            w.ctx_sum + chunks.context)
            dur += w.cost.step_time(merged) * e
        elif chunked:
            dur += w.cost.prefill_time(chunks) * e
        if cpu is not None:
            dur += self.cfg.cpu_slowdown * w.cost.prefill_time(cpu) * e
        if w.n_run and not (chunked and fused):
            dur += w.step_decode_seconds() * e
        return dur

    # -- decode runs ----------------------------------------------------------------------------
    def decode_run(self, w: SimWorker, now: float, dur: float) -> _Run | None:
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
        if self.noise is None:
            t = now + dur
            for j in range(1, k_max):  # step j + 1 ends at t_j + dur + j·slope, as stepping adds them
                t = t + dur + j * slope
            return _Run(now + dur, dur, slope, k_max, w.decode_steps, w.ctx_sum, t)
        es = self.noise[w.index].peek("decode", k_max)  # step j + 1 takes (dur + j·slope)·es[j]
        t = first = now + dur * es[0]
        for j in range(1, k_max):  # e = 1 adds the oracle's floats: x·1.0 is x
            e = es[j]
            t = t + dur * e + j * slope * e
        return _Run(first, dur, slope, k_max, w.decode_steps, w.ctx_sum, t, es=es)

    def sync_runs(self, now: float) -> None:
        """Brings every worker in a decode run to the steps it has finished by `now` (what the
        router would see had each step been an event)."""
        for wi, run in self.runs.items():
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
                w = self.workers[wi]
                w.decode_progressed(run.base_steps + j, run.base_ctx + j * w.n_run)

    def cut_run(self, wi: int) -> None:
        """A request was routed to a worker in a decode run: the run ends with its step in flight,
        after which the worker plans its next step with the request queued (as stepping would)."""
        run = self.runs[wi]
        if run.j + 1 >= run.k:
            return  # the step in flight is the run's last anyway
        run.k, run.end = run.j + 1, run.next_end
        run.seq = self._push(run.end, wi, [], run.k, True)

    # -- the end of a step ----------------------------------------------------------------------
    def pop_event(self) -> None:
        end, sq, wi, chunked, steps, is_run = heapq.heappop(self.events)
        if steps == 0 and not is_run:  # an idle worker's copy landed: plan (unless busy again)
            if not self.workers[wi].busy:
                self.start_step(wi, end)
            return
        if is_run:
            run = self.runs.get(wi)
            if run is None or run.seq != sq:
                return  # a run cut short: its replacement event ends it
            del self.runs[wi]
            if self.noise is not None:
                self.noise[wi].skip("decode", run.k)  # the residuals of the steps it ran
            w = self.workers[wi]
            w.decode_steps, w.ctx_sum = run.base_steps, run.base_ctx  # end_step adds all k steps
        self.end_step(end, wi, chunked, steps)

    def end_step(self, now: float, wi: int, chunked: list[_Running], steps: int = 1) -> None:
        """`steps` decode steps (and the chunks of the first) ended at `now`: replies that are
        complete leave, prompts that are complete join the decode batch; then the next step."""
        w = self.workers[wi]
        if w.n_run:
            self._finish_decodes(now, w, steps)
        completed = False
        for r in chunked:
            r.done += r.chunk
            r.chunk = 0
            if r.done < r.prompt:
                continue
            completed = True
            self.first[r.rid] = now
            if r.out == 1:
                self._finished(now, w, r, 1)
            else:
                w.join(r)
        if completed:
            w.prefilling = [r for r in w.prefilling if r.done < r.prompt]
        self.start_step(wi, now)

    def _finish_decodes(self, now: float, w: SimWorker, steps: int) -> None:
        w.decode_steps += steps
        w.ctx_sum += w.n_run * steps
        w.decode_changed()
        heap = w.done_heap
        while heap and heap[0][0] <= w.decode_steps:
            _, rid, r = heapq.heappop(heap)
            w.leave(r)
            self._finished(now, w, r, r.out)

    def _finished(self, now: float, w: SimWorker, r: _Running, out: int) -> None:
        """A reply of `out` tokens is complete: its KV rows and its adapter are given back."""
        self.finish[r.rid] = now
        self.tokens[r.rid] = out
        self.observe(out)
        w.kv_free_rows += r.rows
        w.release(r.adapter, r.rank)


__all__ = ["EventLoop"]
