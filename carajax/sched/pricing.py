"""What placing one request costs on every worker at once: Algorithm 1's inputs as arrays.

A rank-aware router prices a new request r on every worker: Pre(queue + r), Pre(queue),
Dec(batch + r), Dec(batch) from the worker's cost model, plus what it knows of the worker (requests
on it, KV rows free, whether it holds r's adapter, whether it can take r at all). `Prices` holds
these as arrays over the workers, so a policy scores the whole cluster in a few numpy operations
instead of a Python loop per worker (the simulator routes 100,000 requests over 60 workers).

Two producers, one result:
* `price_each` asks each `WorkerState` (`marginal_seconds` etc.): any cost model, any worker; what
  the gRPC router's handful of workers and hand-built test states use;
* a worker table that keeps its workers' running totals (the simulator's `SimCluster`) answers
  `prices(request)` itself, from one cost model's `*_time_arrays` (the same floats).
`price(request, workers)` picks: the table's own method if it has one, else `price_each`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Prices:
    """Algorithm 1's inputs for one request on each of W workers (index = worker position).

    The arrays may be views of the producer's own state (the simulator's table): read them before
    the workers change, as a policy does within one `choose`."""

    eligible: np.ndarray  # [W] bool: healthy, hosts the base model, has memory for the adapter
    resident: np.ndarray  # [W] bool: holds the adapter already (always True for a base-only request)
    pre_with: np.ndarray  # [W] s: Pre(queue + r)
    pre_now: np.ndarray  # [W] s: Pre(queue); 0 with nothing queued
    dec_with: np.ndarray  # [W] s: Dec(batch + r), r joining with its prompt (+ first token) as context
    dec_now: np.ndarray  # [W] s: Dec(batch); 0 with nothing decoding
    n: np.ndarray  # [W] float: requests on the worker (queued + decoding)
    max_batch: np.ndarray  # [W] float
    kv_free: np.ndarray  # [W] float: KV rows not reserved
    costs: tuple[Any, ...]  # the distinct cost models among the workers
    cost_index: np.ndarray  # [W] int: each worker's cost model, an index into `costs`
    read_s: np.ndarray | None = None  # [W] s: its adapter's disk read first (None: no reads)

    def per_cost(self, fn: Callable[[Any], float]) -> np.ndarray:
        """[W] fn(worker's cost model), evaluated once per distinct model (e.g. a load time)."""
        return np.array([fn(c) for c in self.costs], dtype=np.float64)[self.cost_index]


def price_each(request: Any, workers: Sequence[Any]) -> Prices:
    """`Prices` by asking each `WorkerState` in turn (duck-typed: any cost model works)."""
    adapter, rank, prompt = request.adapter, request.rank, request.prompt_tokens
    w_count = len(workers)
    cols = np.zeros((7, w_count))  # pre_with, pre_now, dec_with, dec_now, n, max_batch, kv_free
    eligible = np.zeros(w_count, dtype=bool)
    resident = np.zeros(w_count, dtype=bool)
    costs: dict[int, tuple[int, Any]] = {}  # id(cost) -> (index, cost)
    cost_index = np.zeros(w_count, dtype=np.int64)
    read_s = np.zeros(w_count)
    for i, w in enumerate(workers):
        eligible[i] = w.healthy and w.hosts_base and w.has_memory_for(adapter, rank)
        resident[i] = rank <= 0 or adapter in w.resident
        cols[:4, i] = w.marginal_seconds(prompt, rank)
        cols[4:, i] = (w.n_requests(), w.max_batch, w.kv_free_rows)
        cost_index[i] = costs.setdefault(id(w.cost), (len(costs), w.cost))[0]
        if hasattr(w, "read_seconds"):
            read_s[i] = w.read_seconds(adapter, rank)
    return Prices(eligible, resident, *cols, costs=tuple(c for _, c in costs.values()),
                  cost_index=cost_index, read_s=read_s if read_s.any() else None)


def price(request: Any, workers: Sequence[Any]) -> Prices:
    """`workers.prices(request)` if the worker table answers it from its own totals, else
    `price_each(request, workers)`."""
    own = getattr(workers, "prices", None)
    return own(request) if own is not None else price_each(request, workers)


__all__ = ["Prices", "price", "price_each"]
