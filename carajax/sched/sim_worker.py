"""One simulated worker: the router's `WorkerState`, answered from running totals.

The event loop (`carajax.sched.sim_loop`) owns the steps and their arithmetic; this module
holds what a worker *is* between steps (its FIFO, the requests prefilling and decoding, its adapter
pages and host-to-device link) and what the router reads of it, kept as running totals so that
routing stays O(workers) per request.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
from collections.abc import Iterator

import numpy as np

from carajax.sched.pricing import Prices, price_each
from carajax.sched.router import Batch, CostModel, RouteRequest, WorkerState
from carajax.sched.sim_config import SimConfig
from carajax.trace import TraceRequest as SimRequest

_new = object.__new__


def _batch(ranks: tuple[int, ...], tokens: int, context: int) -> Batch:
    """A Batch without re-validating its ranks: the simulator's ranks are already checked ints, and
    the validation in `Batch.__post_init__` was the largest single cost of routing a request.
    (Frozen dataclasses only block attribute *assignment*; filling __dict__ is how copy does it.)"""
    b = _new(Batch)
    b.__dict__.update(ranks=ranks, tokens=tokens, context=context)
    return b


class _Running:
    """One admitted request on a worker (slots keep attribute access fast).

    `done`: prompt tokens prefilled in finished steps; `chunk`: its prompt tokens in the step in
    flight (0 if none); `ready_at`: when its adapter is usable on the device (cpu_assist; before
    that its chunks take the CPU path); `load_due`: a synchronous load still to run (wait)."""

    __slots__ = ("rid", "prompt", "out", "adapter", "rank", "rows", "done", "chunk", "ready_at", "load_due")

    def __init__(self, rid: int, prompt: int, out: int, adapter: str, rank: int, rows: int):
        self.rid, self.prompt, self.out = rid, prompt, out
        self.adapter, self.rank, self.rows = adapter, rank, rows
        self.done = self.chunk = 0
        self.ready_at = 0.0
        self.load_due = False


class SimWorker(WorkerState):
    """A simulated worker: the router's `WorkerState`, answered from running totals.

    The inherited `queue`/`batch` lists stay empty: the FIFO lives in `waiting`, admitted requests
    still prefilling in `prefilling`, and the decoding set is kept as a rank multiset, a context
    sum and a count instead of per-request contexts, because those change every step and the router
    only needs their totals. Policies read the state through `n_requests`, `prefill_batch`,
    `decode_batch` and the `*_seconds` helpers, which this class overrides. `resident` is an
    LRU-ordered dict (membership tests work as on a set).

    What the router sees while a step is in flight: a request whose last prompt chunk is in the
    step counts in the decode batch it is joining (it is no longer queued prefill work); a request
    with prompt tokens left after this step counts as queued prefill work for those tokens, like
    the waiting queue (`prefill_batch`). Every admitted request counts in `n_requests`, so a worker
    in a long prefill is never idle to the router.
    """

    def __init__(self, index: int, cost: CostModel, cfg: SimConfig):
        super().__init__(
            name=f"w{index}",
            cost=cost,
            pages_free=cfg.adapter_pages,
            page_rank=cfg.page_rank,
            kv_free_rows=cfg.kv_rows,
            max_batch=cfg.max_batch,
        )
        self.index = index
        # A decode-only step of the engine: its fused step (since issue 15) or the decode forward.
        self.decode_step_time = cost.step_time if cfg.fused_step else cost.decode_time
        self.ignore_memory = False  # set while re-routing a request no worker has pages for now
        self.resident = collections.OrderedDict()  # type: ignore[assignment]  # adapter -> pages, LRU first
        self.pinned: dict[str, int] = {}  # adapter -> running requests using it
        self.landing: dict[str, float] = {}  # cpu_assist / async: adapter -> when its copy lands
        # The host tier (`read_seconds`, `read`): adapters in host memory, LRU first (None: all).
        self.host_adapters = cfg.host_adapters
        self.in_host = collections.OrderedDict() if cfg.host_adapters else None  # type: ignore
        self.read_bytes_per_s, self.read_latency_s = cfg.disk_read_gbps * 1e9, cfg.disk_read_latency_ms / 1e3
        self.read_bytes_per_rank = getattr(cost, "load_bytes_per_rank", None) or 0.0
        self.link_free = 0.0  # when the host-to-device link finishes its queued copies
        self.pre_pinned: set[int] = set()  # async: queued requests whose adapter is pinned (copying)
        self.pages_total = cfg.adapter_pages
        self.pages_used = 0  # pages holding adapters (pinned or not)
        self.pages_pinned = 0
        self.waiting: collections.deque[tuple[int, SimRequest]] = collections.deque()
        self.prefilling: list[_Running] = []  # admitted, prompt not done, in admission order
        self.rank_count: dict[int, int] = {}
        self.n_run = 0
        self.ctx_sum = 0
        self.decode_steps = 0
        self.done_heap: list[tuple[int, int, _Running]] = []  # (finish decode step, rid, request)
        # rid -> decode step it joined at, in join order (so the youngest are last).
        self.joined_at: dict[int, int] = {}
        self.busy = False
        self.stale = True  # changed since the router's table (`SimCluster`) last read its totals
        self.row: np.ndarray | None = None  # this worker's row of that table, once it has one
        self._ranks: tuple[int, ...] = ()
        self._ranks_dirty = False
        self._qranks: tuple[int, ...] = ()
        self._qtokens = 0  # waiting prompts
        self._qdirty = False
        # Totals for the router's pricing (`marginal_seconds`), and the tuples they were taken of.
        self._stats_cost = hasattr(cost, "prefill_time_stats") and hasattr(cost, "decode_time_stats")
        self._qstats_of: tuple[int, ...] | None = None
        self._qstats = (0, 0, 0)
        self._dstats_of: tuple[tuple[int, ...] | None, tuple[int, ...] | None] = (None, None)
        self._dstats = (0, 0, 0)
        self._pre_cache: float | None = None
        self._dec_cache: float | None = None  # the router's Dec(batch): running + finishing prefill
        self._step_dec_cache: float | None = None  # this step's decode: running only
        # Prefill left after the step in flight (partly prefilled requests): queued work.
        self.left_ranks: tuple[int, ...] = ()
        self.left_tokens = 0
        self.left_prompts: list[int] = []
        # Last prompt chunk in the step in flight: they join the decode batch when it ends.
        self.pend_ranks: tuple[int, ...] = ()
        self.pend_ctx = 0

    # -- what the router reads ------------------------------------------------------------------
    def n_requests(self) -> int:
        return len(self.waiting) + self.n_run + len(self.prefilling)

    def n_decoding(self) -> int:
        return self.n_run

    def _run_ranks(self) -> tuple[int, ...]:
        if self._ranks_dirty:
            self._ranks = tuple(r for r, c in self.rank_count.items() for _ in range(c))
            self._ranks_dirty = False
        return self._ranks

    def _queue_ranks(self) -> tuple[int, ...]:
        if self._qdirty:
            self._qranks = self.left_ranks + tuple(r.rank for _, r in self.waiting)
            self._qdirty = False
        return self._qranks

    def queued_prompts(self) -> list[int]:
        return self.left_prompts + [req.prompt_tokens for _, req in self.waiting]

    def young_decode_ages(self, limit: float) -> list[int]:
        # The youngest joined last: walk back from the end until the ages reach the limit.
        # Requests joining at the end of the step in flight have their first token: age 1.
        ages = [1] * len(self.pend_ranks) if limit > 1 else []
        now = self.decode_steps + 1
        for js in reversed(self.joined_at.values()):
            age = now - js
            if age >= limit:
                break
            ages.append(age)
        return ages

    def prefill_batch(self, extra: tuple[int, int] | None = None) -> Batch:
        ranks, toks = self._queue_ranks(), self._qtokens + self.left_tokens
        if extra is not None:
            ranks, toks = ranks + (extra[1],), toks + extra[0]
        return _batch(ranks, toks, toks)

    def decode_batch(self, extra: tuple[int, int] | None = None) -> Batch:
        ranks, ctx = self._run_ranks() + self.pend_ranks, self.ctx_sum + self.pend_ctx
        if extra is not None:
            ranks, ctx = ranks + (extra[1],), ctx + extra[0]
        return _batch(ranks, len(ranks), ctx)

    def _queue_stats(self) -> tuple[int, int, int]:
        # (n, Σrank, max rank) of the queue, recomputed when its rank tuple is rebuilt (kept by
        # reference, so `is` cannot be fooled by a reused id).
        q = self._queue_ranks()
        if q is not self._qstats_of:
            self._qstats_of, self._qstats = q, (len(q), sum(q), max(q, default=0))
        return self._qstats

    def _decode_stats(self) -> tuple[int, int, int]:
        run, pend = self._run_ranks(), self.pend_ranks
        if run is not self._dstats_of[0] or pend is not self._dstats_of[1]:
            d = run + pend
            self._dstats_of, self._dstats = (run, pend), (len(d), sum(d), max(d, default=0))
        return self._dstats

    def marginal_seconds(self, prompt_tokens: int, rank: int) -> tuple[float, float, float, float]:
        # The four prices in one call from the totals (the router's innermost loop).
        if not self._stats_cost:
            return super().marginal_seconds(prompt_tokens, rank)
        cost = self.cost
        n, s, mx = self._queue_stats()
        toks = self._qtokens + self.left_tokens + prompt_tokens
        pre_with = cost.prefill_time_stats(n + 1, s + rank, max(mx, rank), toks, toks)
        n, s, mx = self._decode_stats()
        ctx = self.ctx_sum + self.pend_ctx + prompt_tokens + 1
        dec_with = cost.decode_time_stats(n + 1, s + rank, max(mx, rank), n + 1, ctx)
        return pre_with, self.queued_prefill_seconds(), dec_with, self.decode_seconds()

    def queued_prefill_seconds(self) -> float:
        # Cached until the queue changes: many arrivals are priced between two queue changes.
        if self._pre_cache is None:
            queued = self.waiting or self.left_ranks
            self._pre_cache = self.cost.prefill_time(self.prefill_batch()) if queued else 0.0
        return self._pre_cache

    def decode_seconds(self) -> float:
        if self._dec_cache is None:
            if not (self.n_run or self.pend_ranks):
                self._dec_cache = 0.0
            elif self._stats_cost:  # a decode run moves the context every arrival: keep this cheap
                n, s, mx = self._decode_stats()
                self._dec_cache = self.cost.decode_time_stats(n, s, mx, n, self.ctx_sum + self.pend_ctx)
            else:
                self._dec_cache = self.cost.decode_time(self.decode_batch())
        return self._dec_cache

    def step_decode_seconds(self) -> float:
        """The decode part of the step starting now, the requests already decoding: with fused
        steps, the whole of a decode-only step; otherwise the decode forward of any step."""
        if self._step_dec_cache is None:
            batch = _batch(self._run_ranks(), self.n_run, self.ctx_sum)
            self._step_dec_cache = self.decode_step_time(batch) if self.n_run else 0.0
        return self._step_dec_cache

    def set_in_flight(self) -> None:
        """Refresh the router's view after planning a step (each prefilling request's `chunk` set)."""
        pend, left, left_toks, pend_ctx, left_prompts = [], [], 0, 0, []
        for r in self.prefilling:
            rest = r.prompt - r.done - r.chunk
            if rest > 0:
                left.append(r.rank)
                left_toks += rest
                left_prompts.append(rest)
            else:
                pend.append(r.rank)
                pend_ctx += r.prompt + 1
        self.pend_ranks, self.pend_ctx = tuple(pend), pend_ctx
        self.left_ranks, self.left_tokens = tuple(left), left_toks
        self.left_prompts = left_prompts
        self._qdirty = True
        self._pre_cache = self._dec_cache = None
        self.stale = True

    # -- bookkeeping ----------------------------------------------------------------------------
    def enqueue(self, rid: int, req: SimRequest) -> None:
        self.waiting.append((rid, req))
        self._qtokens += req.prompt_tokens
        self._qdirty = True
        self._pre_cache = None
        self.stale = True

    def _dequeue(self) -> tuple[int, SimRequest]:
        return self._dequeue_at(0)

    def _dequeue_at(self, i: int) -> tuple[int, SimRequest]:
        """Take the i-th queued request (0: FIFO; later ones when async requests wait on copies)."""
        rid, req = self.waiting[i]
        del self.waiting[i]
        self._qtokens -= req.prompt_tokens
        self._qdirty = True
        self._pre_cache = None
        self.stale = True
        return rid, req

    def _sync_pages_free(self) -> None:
        # Free or evictable: everything not pinned by a running request.
        self.pages_free = self.pages_total - self.pages_pinned
        self.stale = True

    def has_memory_for(self, adapter: str, rank: int) -> bool:
        # Inlined (no super() call): this runs once per worker per arrival.
        if self.ignore_memory or rank <= 0 or adapter in self.resident:
            return True
        return -(-rank // self.page_rank) <= self.pages_free

    def acquire(self, adapter: str, rank: int) -> bool | None:
        """Pins the adapter for one more request: True if it had to be loaded, False if resident,
        None if its pages cannot be freed now (every page is pinned by running requests)."""
        if rank <= 0:
            return False
        cold = adapter not in self.resident
        if cold:
            pages = self.pages_needed(rank)
            if self.pages_total - self.pages_pinned < pages:
                return None
            while self.pages_total - self.pages_used < pages:  # evict LRU adapters nobody uses
                victim = next(a for a in self.resident if a not in self.pinned)
                self.pages_used -= self.resident.pop(victim)
                self.landing.pop(victim, None)
            self.resident[adapter] = pages
            self.pages_used += pages
        else:
            self.resident.move_to_end(adapter)
            pages = self.resident[adapter]  # what it occupies, even if a caller names another rank
        n = self.pinned.get(adapter, 0)
        if n == 0:
            self.pages_pinned += pages
        self.pinned[adapter] = n + 1
        self._sync_pages_free()
        return cold

    def release(self, adapter: str, rank: int) -> None:
        if rank <= 0:
            return
        n = self.pinned[adapter] - 1
        if n == 0:
            del self.pinned[adapter]
            self.pages_pinned -= self.resident[adapter]  # pinned adapters are never evicted
            self._sync_pages_free()
        else:
            self.pinned[adapter] = n

    def decode_changed(self) -> None:
        """The decode batch or its context moved (a join, a leave, decode steps done)."""
        self._dec_cache = self._step_dec_cache = None
        self.stale = True

    def decode_progressed(self, steps: int, ctx_sum: int) -> None:
        """Decode steps done inside a decode run: only the step count and the context moved, so
        the router's table gets its context cell rewritten, not the whole row (runs advance at
        nearly every arrival on nearly every worker)."""
        self.decode_steps, self.ctx_sum = steps, ctx_sum
        self._dec_cache = self._step_dec_cache = None
        if self.row is None or self.stale:
            self.stale = True
        else:
            self.row[SimCluster.D_CONTEXT] = ctx_sum + self.pend_ctx

    def start_copy(self, adapter: str, rank: int, now: float, read_s: float = 0.0) -> float:
        """cpu_assist / async: queue the adapter's copy on this worker's link, after `read_s` of
        disk read; returns when it lands."""
        t = max(now + read_s, self.link_free) + self.cost.load_seconds(rank)
        self.link_free = self.landing[adapter] = t
        return t

    def join(self, r: _Running) -> None:
        self.rank_count[r.rank] = self.rank_count.get(r.rank, 0) + 1
        self._ranks_dirty = True
        self.n_run += 1
        self.ctx_sum += r.prompt + 1
        self.decode_changed()
        heapq.heappush(self.done_heap, (self.decode_steps + r.out - 1, r.rid, r))
        self.joined_at[r.rid] = self.decode_steps

    def leave(self, r: _Running) -> None:
        c = self.rank_count[r.rank] - 1
        if c:
            self.rank_count[r.rank] = c
        else:
            del self.rank_count[r.rank]
        self._ranks_dirty = True
        self.n_run -= 1
        self.ctx_sum -= r.prompt + r.out
        del self.joined_at[r.rid]
        self.decode_changed()


class SimCluster(list):
    """The simulator's workers, priced all at once: a list of `SimWorker`s that answers
    `prices(request)` (see `carajax.sched.pricing`) from a table of their running totals.

    Row i of the table holds worker i's totals: its queue (requests, Σrank, max rank, tokens,
    Pre(queue)), its decode batch (requests, Σrank, max rank, context), requests on it, KV rows
    and adapter pages free. A worker marks itself `stale` whenever any of them moves, and its row
    is rewritten the next time the router asks, so an arrival rereads only the workers that
    changed since the last one; a worker in a decode run, whose context moves at nearly every
    arrival, writes its context cell itself (`SimWorker.decode_progressed`). Pricing a request is
    then three calls of the cost model's `*_time_arrays` over the table (Dec(batch), Dec(batch + r),
    Pre(queue + r)): the same floats as each worker's `marginal_seconds`.

    That needs one cost model for all workers with array predictions (a fitted `CostModel`); with
    anything else (per-worker models, `AnalyticCost`) `prices` asks each worker (`price_each`).
    Simulated workers are always healthy and host the base model.
    """

    COLUMNS = ("q_n", "q_sum_rank", "q_max_rank", "q_tokens", "pre_now",
               "d_n", "d_sum_rank", "d_max_rank", "d_context", "n", "kv_free", "pages_free")
    D_CONTEXT = COLUMNS.index("d_context")

    def __init__(self, workers: list[SimWorker], cfg: SimConfig):
        super().__init__(workers)
        costs = {id(w.cost): w.cost for w in workers}
        (cost,) = costs.values() if len(costs) == 1 else (None,)
        arrays = hasattr(cost, "prefill_time_arrays") and hasattr(cost, "decode_time_arrays")
        self.cost = cost if arrays else None
        self.page_rank = cfg.page_rank
        self.cfg_host_adapters = cfg.host_adapters  # workers read adapters from disk: price it
        self.ignore_memory = False
        self._tab = np.zeros((len(workers), len(self.COLUMNS)))  # [worker, column]
        for w, row in zip(workers, self._tab, strict=True):
            w.row, w.stale = row, True
        self._max_batch = np.full(len(workers), float(cfg.max_batch))
        self._cost_index = np.zeros(len(workers), dtype=np.int64)

    @contextlib.contextmanager
    def memory_ignored(self) -> Iterator[None]:
        """Route as if every worker had adapter pages (a request nobody has pages for right now
        waits in some worker's queue rather than being lost)."""
        for w in self:
            w.ignore_memory = True
        self.ignore_memory = True
        try:
            yield
        finally:
            for w in self:
                w.ignore_memory = False
            self.ignore_memory = False

    def _refresh(self) -> None:
        for w in self:
            if w.stale:
                w.stale = False
                qn, qs, qmx = w._queue_stats()
                dn, ds, dmx = w._decode_stats()
                w.row[:] = (qn, qs, qmx, w._qtokens + w.left_tokens, w.queued_prefill_seconds(),
                            dn, ds, dmx, w.ctx_sum + w.pend_ctx, w.n_requests(), w.kv_free_rows, w.pages_free)

    def prices(self, request: RouteRequest) -> Prices:
        """`Prices` of `request` on every worker (what `price_each` would give, from the table)."""
        if self.cost is None:
            return price_each(request, self)
        self._refresh()
        qn, qs, qmx, qtok, pre_now, dn, ds, dmx, dctx, n, kv, pages = self._tab.T
        adapter, rank, p = request.adapter, request.rank, request.prompt_tokens
        cost = self.cost
        toks = qtok + p
        # As `SimWorker.marginal_seconds`: r joins the queue with its prompt, then the decode
        # batch with its prompt and first token as context; Dec(batch) as `decode_seconds`.
        pre_with = cost.prefill_time_arrays(qn + 1, qs + rank, np.maximum(qmx, rank), toks, toks)
        dec_with = cost.decode_time_arrays(dn + 1, ds + rank, np.maximum(dmx, rank), dn + 1, dctx + (p + 1))
        dec_now = np.where(dn > 0, cost.decode_time_arrays(dn, ds, dmx, dn, dctx), 0.0)
        if rank <= 0:
            resident = np.ones(len(self), dtype=bool)
        else:
            resident = np.fromiter((adapter in w.resident for w in self), dtype=bool, count=len(self))
        read_s = (np.fromiter((w.read_seconds(adapter, rank) for w in self), np.float64, len(self))
                  if rank > 0 and self.cfg_host_adapters else None)
        if rank <= 0 or self.ignore_memory:
            eligible = np.ones(len(self), dtype=bool)
        else:
            eligible = resident | (pages >= -(-rank // self.page_rank))
        return Prices(eligible, resident, pre_with, pre_now, dec_with, dec_now, n, self._max_batch, kv,
                      costs=(self.cost,), cost_index=self._cost_index, read_s=read_s)


__all__ = ["SimCluster", "SimWorker"]
