"""What a carajax replica tells Ray's router, and how our router reads it (no Ray import here).

A replica publishes `replica_stats(...)` through Ray Serve's `record_routing_stats`; Ray's router
sees it as `RunningReplica.routing_stats`. Our router turns each into the same
`carajax.sched.router.WorkerState` the gRPC router and the simulator build (`worker_state`) and asks
the same policy object (`rank_replicas`): one pricing code path.

The stats (a JSON-able dict):
    name, time            the replica's name; when the snapshot was taken (time.time())
    serving               False while draining
    queue                 [[prompt_tokens, rank]] waiting or prefilling (the policy's queue)
    batch, decode_ages    [[context_len, rank]] decoding, and the tokens each has produced
    registered            how many adapters it has registered (on disk at least)
    in_host               names in host memory or on the device (bounded by the budgets);
                          resident: on the device; loading: being copied
    read_bytes_per_s, read_latency_s, read_bytes_per_rank   its disk reads, measured: what an
                          adapter not in host memory adds before its copy
    pages_free, page_rank adapter pages free or held by an idle, unpinned adapter (evictable)
    kv_pages_free, kv_page_size, max_batch, max_seq_len
    cost_model            the replica's own fitted cost model as JSON ("" when it has none)

A request's route (adapter, rank, prompt length) travels as the `route` keyword argument of the
handle call (`route_kwarg`), set by the ingress; without it our router falls back to Ray's default.
"""

from __future__ import annotations

import dataclasses
import time
import weakref

from carajax.sched import router as policies
from carajax.sched.cost_model import CostModel, RankBlindModelError, require_rank_terms

ROUTE_KWARG = "route"
LIVE_ROUTERS: weakref.WeakSet = weakref.WeakSet()  # this process's CarajaxRequestRouters (/router)


def replica_stats(engine, servicer, *, name: str, cost_model_json: str = "", serving: bool = True) -> dict:
    """One routing-stats snapshot of a replica's engine and its worker servicer (which knows the
    prompt lengths of requests not admitted yet). Its size follows the batch and the memory
    budgets, never the registry: the adapters are summarised by tier (names only of those in
    host memory or on the device; the others are read from disk first, priced by the router
    at the replica's measured read speed)."""
    st = engine.stats()  # one snapshot under the engine lock
    where = engine.pool.in_memory()  # {name: "device" | "loading" | "host"}
    specs = {n: engine.get_adapter(n) for n in where}
    specs = {n: a for n, a in specs.items() if a is not None}
    queue, batch, ages = [], [], []
    for r in st["running"]:
        if r["phase"] == "decode":
            batch.append([r["prompt_tokens"] + r["output_tokens"], r["rank"]])
            ages.append(max(1, r["output_tokens"]))
        else:
            queue.append([r["prompt_tokens"], r["rank"]])
    queue += [[a.prompt_tokens, a.rank] for _, a in servicer._queued(st["running"])]
    pool, page_rank = st["adapters"], max(1, engine.config.lora_page_rank)
    busy = set(pool["pinned"]) | set(pool["in_use"])
    evictable = sum(-(-specs[n].rank // page_rank) for n in pool["on_device"]
                    if n not in busy and n in specs)
    rank_sum = sum(a.rank for a in specs.values())
    kv = st["kv_cache"]
    return {"name": name, "time": time.time(), "serving": serving, "queue": queue, "batch": batch,
            "decode_ages": ages, "registered": pool["adapters"], "in_host": sorted(where),
            "resident": list(pool["on_device"]), "loading": list(pool["loading"]),
            "pages_free": pool["pages_free"] + evictable, "page_rank": page_rank,
            "read_bytes_per_s": pool["read_bytes_per_s"],
            "read_latency_s": pool["read_latency_ms"] / 1e3,
            # A file's bytes per unit of rank, from those in memory (0 until one is).
            "read_bytes_per_rank": (sum(a.file_bytes for a in specs.values()) / rank_sum
                                    if rank_sum else 0.0),
            "kv_pages_free": kv["pages_free"], "kv_page_size": kv["page_size"],
            "max_batch": engine.config.max_batch_size, "max_seq_len": engine.runner.seq_len,
            "cost_model": cost_model_json, "finished_count": st["finished"]["count"],
            "recent_outputs": st["finished"]["recent_output_tokens"]}


def new_outputs(stats: dict, seen: int) -> tuple[list[int], int]:
    """(output lengths of the replies this snapshot reports that a router which had seen `seen`
    of them has not, the new count). Only the recent ones are kept, so a router that polls too
    rarely learns from the latest at most."""
    count = int(stats.get("finished_count", 0))
    recent = list(stats.get("recent_outputs", ()))
    fresh = max(0, min(count - seen, len(recent)))
    return (recent[len(recent) - fresh:] if fresh else []), count


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """A request our router sent to a replica, not finished yet (its stats may not show it)."""

    replica: str
    routed_at: float
    prompt_tokens: int
    rank: int


def worker_state(stats: dict, cost, dispatched: list[Dispatch] = ()) -> policies.WorkerState:
    """The policy's view of one replica: its stats, plus the requests routed to it after the
    snapshot was taken (queued: they cannot have started before it saw them)."""
    late = [(d.prompt_tokens, d.rank) for d in dispatched if d.routed_at > stats["time"]]
    return policies.WorkerState(
        name=stats["name"], cost=cost, healthy=bool(stats.get("serving", True)),
        queue=[tuple(q) for q in stats["queue"]] + late, batch=[tuple(b) for b in stats["batch"]],
        decode_ages=list(stats["decode_ages"]), resident=set(stats["resident"]),
        pages_free=stats["pages_free"], page_rank=stats["page_rank"],
        kv_free_rows=stats["kv_pages_free"] * stats["kv_page_size"], max_batch=stats["max_batch"],
        # The host tier, where the replica reports it: adapters not in it are read from disk.
        in_host=set(stats["in_host"]) if "in_host" in stats else None,
        read_bytes_per_s=float(stats.get("read_bytes_per_s", 0.0)),
        read_latency_s=float(stats.get("read_latency_s", 0.0)),
        read_bytes_per_rank=float(stats.get("read_bytes_per_rank", 0.0)))


class CostModels:
    """Each replica's cost model: its own (parsed once per distinct JSON) unless it has none or a
    rank-aware policy would get a rank-blind one; then the router's default."""

    def __init__(self, default: CostModel, policy: str):
        self.default, self.policy = default, policy
        self._parsed: dict[str, CostModel] = {}
        self.pricing: dict[str, str] = {}  # replica name -> which model prices it, in words

    def of(self, stats: dict) -> CostModel:
        text = stats.get("cost_model") or ""
        name = str(stats.get("name"))
        if not text:
            self.pricing[name] = f"router default, the replica reports none: {self.default.describe()}"
            return self.default
        if text not in self._parsed:
            try:
                cost = CostModel.from_json(text)
                require_rank_terms(cost, self.policy, f" (replica {name})")
            except (RankBlindModelError, ValueError, KeyError):
                cost = self.default
            self._parsed[text] = cost
        cost = self._parsed[text]
        self.pricing[name] = (f"its own: {cost.describe()}" if cost is not self.default else
                              f"router default, its own unusable for {self.policy}: "
                              f"{self.default.describe()}")
        return cost


def route_of(kwargs: dict) -> policies.RouteRequest | None:
    """The request's route from the handle call's keyword arguments; None without one."""
    r = kwargs.get(ROUTE_KWARG) if kwargs else None
    if not isinstance(r, dict):
        return None
    try:
        return policies.RouteRequest(str(r.get("adapter") or ""), int(r["rank"]), int(r["prompt_tokens"]),
                                     int(r.get("expected_output_tokens", 16)))
    except (KeyError, TypeError, ValueError):
        return None


def rank_replicas(policy: policies.Policy, route: policies.RouteRequest,
                  states: list[policies.WorkerState]) -> list[int]:
    """Indices of `states` in the order Ray should try them: the policy's choice first, then the
    other candidates by fewest requests (used only when the first refuses: its queue is full).
    Raises NoWorkerError when no state can serve the request."""
    chosen = states.index(policy.choose(route, states))
    rest = [i for i in policies.candidates(route, states) if i != chosen]
    return [chosen] + sorted(rest, key=lambda i: (states[i].n_requests(), i))


def request_route(adapter: str | None, rank: int, prompt_tokens: int, max_tokens: int,
                  avg_output_len: float = 128.0) -> dict:
    """The `route` keyword argument the ingress sends with a request."""
    return {"adapter": adapter or "", "rank": rank, "prompt_tokens": prompt_tokens,
            "expected_output_tokens": min(max_tokens, int(avg_output_len))}
