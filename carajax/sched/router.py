"""Routing policies: which worker serves a new request.

One interface serves both the simulator (virtual time) and the gRPC router (wall time): a policy
sees a list of `WorkerState`s, what a router knows about each worker, and returns one of them. The
policies only *read* worker state; whoever owns the states (simulator or router) applies the
dispatch afterwards, so a policy is tested once and used twice.

Policies (`POLICIES`, built by `make_policy(name, **kw)`):
    caraserve    the paper's Algorithm 1 (rank-aware, priced with the worker's own cost model);
    carajax      ours: caraserve's price plus cold start, queueing delay, KV headroom, locality,
                 and the expected SLO misses a placement causes (learned output lengths);
    random, round_robin, first_fit, most_idle   the paper's baselines;
    adapter_affinity   the rule Ray Serve LLM applies to LoRA (multiplexed models): a worker
                 already holding the adapter first, then the least loaded.

caraserve and carajax price every worker at once: `carajax.sched.pricing.price` gives Algorithm
1's inputs as arrays over the workers (asked of each `WorkerState`, or answered by the simulator's
table of running totals), and the scores are a few numpy operations on them.

Every policy first restricts itself to the *candidates*: healthy workers that host the base model
and have adapter memory for the request (`candidates`). With no candidate it raises
`NoWorkerError`, because routing to a worker that cannot run the request only moves the failure.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random as _random
from typing import Protocol

import numpy as np

from carajax.sched.cost_model import Batch
from carajax.sched.output_lengths import OutputLengths
from carajax.sched.pricing import Prices, price


class CostModel(Protocol):
    """What a router needs from a worker's fitted cost model (duck-typed)."""

    def prefill_time(self, batch: Batch) -> float: ...

    def decode_time(self, batch: Batch) -> float: ...

    def load_seconds(self, rank: int) -> float: ...


class NoWorkerError(LookupError):
    """No healthy worker hosts the base model with memory for the request's adapter."""


@dataclasses.dataclass
class WorkerState:
    """What a router knows about one worker, from its own dispatches or the worker's Stats.

    `queue` holds waiting/prefilling requests as (prompt_tokens, rank); `batch` holds decoding
    requests as (context_len, rank), and `decode_ages` (if known) the tokens each has produced so
    far, in the same order: a young request has few tokens to amortise a stall over.
    `pages_free` counts adapter pages that are free *or* hold an idle adapter the worker may evict
    (LRU): with thousands of adapters the pool is always full, so counting only empty pages would
    rule every worker out after warm-up. An adapter of rank r
    needs ceil(r / page_rank) pages. `kv_free_rows` is the KV-cache token rows not reserved.

    The Batch/time helpers below read the lists; the simulator subclasses this class and answers
    them from running totals so that routing stays O(workers) per request.
    """

    name: str
    cost: CostModel
    hosts_base: bool = True
    queue: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    batch: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    decode_ages: list[int] = dataclasses.field(default_factory=list)
    resident: set[str] = dataclasses.field(default_factory=set)
    pages_free: int = 1 << 30
    page_rank: int = 8
    kv_free_rows: int = 1 << 30
    max_batch: int = 32
    healthy: bool = True
    # The worker's host tier, if it reports one: adapters in host memory (or on the device); the
    # others are read from disk first, at `read_bytes_per_s` after `read_latency_s`, each of
    # `adapter_bytes` (else rank x `read_bytes_per_rank`). None: every adapter in host memory.
    in_host: set[str] | None = None
    read_bytes_per_s: float = 0.0
    read_latency_s: float = 0.0
    adapter_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    read_bytes_per_rank: float = 0.0

    def read_seconds(self, adapter: str, rank: int) -> float:
        """Seconds a request for `adapter` waits for its disk read here (0 if in host memory)."""
        if (rank <= 0 or self.in_host is None or adapter in self.in_host
                or adapter in self.resident or self.read_bytes_per_s <= 0):
            return 0.0
        nbytes = self.adapter_bytes.get(adapter, rank * self.read_bytes_per_rank)
        return self.read_latency_s + nbytes / self.read_bytes_per_s

    def pages_needed(self, rank: int) -> int:
        """Adapter pages one adapter of `rank` occupies (0 for the base model)."""
        return -(-rank // self.page_rank) if rank > 0 else 0

    def has_memory_for(self, adapter: str, rank: int) -> bool:
        """True if the adapter is resident or its pages fit in free/evictable memory."""
        return rank <= 0 or adapter in self.resident or self.pages_needed(rank) <= self.pages_free

    def n_requests(self) -> int:
        """Requests on the worker: queued plus decoding."""
        return len(self.queue) + len(self.batch)

    def n_decoding(self) -> int:
        return len(self.batch)

    def queued_prompts(self) -> list[int]:
        """Prompt tokens still to prefill, per queued or prefilling request."""
        return [p for p, _ in self.queue]

    def young_decode_ages(self, limit: float) -> list[int]:
        """Tokens produced so far by each decoding request that has produced fewer than `limit`.
        Unknown ages (no `decode_ages`) count as 1: the cautious reading."""
        ages = self.decode_ages if len(self.decode_ages) == len(self.batch) else [1] * len(self.batch)
        return [a for a in ages if a < limit]

    def prefill_batch(self, extra: tuple[int, int] | None = None) -> Batch:
        """The queue as one prefill batch, optionally with one more (prompt_tokens, rank)."""
        items = self.queue if extra is None else [*self.queue, extra]
        toks = sum(p for p, _ in items)
        # A prefill reads the KV it writes, so its context is its own prompt tokens.
        return Batch(ranks=tuple(r for _, r in items), tokens=toks, context=toks)

    def decode_batch(self, extra: tuple[int, int] | None = None) -> Batch:
        """The running batch as one decode step, optionally with one more (context_len, rank)."""
        items = self.batch if extra is None else [*self.batch, extra]
        return Batch(ranks=tuple(r for _, r in items), tokens=len(items), context=sum(c for c, _ in items))

    def marginal_seconds(self, prompt_tokens: int, rank: int) -> tuple[float, float, float, float]:
        """(Pre(queue + r), Pre(queue), Dec(batch + r), Dec(batch)) for a request r that joins
        decoding with its prompt (+ first token) as context: what Algorithm 1 compares."""
        cost = self.cost
        return (cost.prefill_time(self.prefill_batch((prompt_tokens, rank))), self.queued_prefill_seconds(),
                cost.decode_time(self.decode_batch((prompt_tokens + 1, rank))), self.decode_seconds())

    def queued_prefill_seconds(self) -> float:
        """Pre(queue); 0 when the queue is empty (no prefill step would run at all)."""
        return self.cost.prefill_time(self.prefill_batch()) if self.queue else 0.0

    def decode_seconds(self) -> float:
        """Dec(batch); 0 when nothing decodes (no decode step would run at all)."""
        return self.cost.decode_time(self.decode_batch()) if self.batch else 0.0


@dataclasses.dataclass(frozen=True)
class RouteRequest:
    """What the router knows about an arriving request."""

    adapter: str
    rank: int
    prompt_tokens: int
    expected_output_tokens: int


class Policy(Protocol):
    """A routing policy: picks one of `workers` for `request` (raises NoWorkerError if none fits)."""

    name: str

    def choose(self, request: RouteRequest, workers: list[WorkerState]) -> WorkerState: ...


def candidates(request: RouteRequest, workers: list[WorkerState]) -> list[int]:
    """Indices of workers that may serve the request: healthy, hosting the base, with adapter memory."""
    out = [
        i
        for i, w in enumerate(workers)
        if w.healthy and w.hosts_base and w.has_memory_for(request.adapter, request.rank)
    ]
    if not out:
        raise _no_worker(request)
    return out


def _no_worker(request: RouteRequest) -> NoWorkerError:
    return NoWorkerError(f"no worker can serve adapter {request.adapter!r} (rank {request.rank})")


def _eligible(request: RouteRequest, prices: Prices) -> np.ndarray:
    """Indices of the workers `prices` marks eligible (`candidates`, from the prices)."""
    idx = np.flatnonzero(prices.eligible)
    if not idx.size:
        raise _no_worker(request)
    return idx


def _lowest(request: RouteRequest, scores: np.ndarray, prices: Prices) -> int:
    """Index of the eligible worker with the lowest score (ties: lowest index)."""
    idx = _eligible(request, prices)
    return int(idx[np.argmin(scores[idx])])


def _request_weight(n: np.ndarray, mode: str) -> np.ndarray:
    if mode == "n_plus_1":
        return n + 1
    if mode == "n":
        return n
    if mode == "max1":
        return np.maximum(1, n)
    raise ValueError(f"unknown weight mode {mode!r}")


# Engine cold-start policies a router may be told its workers run (carajax.config).
COLD_STARTS = ("auto", "cpu_assist", "async", "wait", "cached")


class CaraServePolicy:
    """The paper's rank-aware Algorithm 1.

    For each candidate worker, with r the new request and its own fitted cost model:
        Δprefill = Pre(queue + r) − Pre(queue),    Δdecode = Dec(batch + r) − Dec(batch)
        cost     = Δprefill / avg_output_len + Δdecode   (prefill amortised over the tokens it buys)
        cost    += slo_penalty                  if Dec(batch + r) > slo_tpot
        total    = cost × weight(n),  n = requests on the worker (queue + batch)
    and route to the argmin (ties: lowest index). Pre/Dec of an empty set are 0: no step runs.

    weight(n): the paper multiplies by the worker's request count, and so do we by default
    (`"n"`): an idle worker scores 0 and the first idle worker (lowest index) wins, so the policy
    spreads requests while there are idle workers and prices placements by rank only once every
    worker is busy. We first read that as a flaw and defaulted to `"n_plus_1"` (the new request
    counted too, so idle workers keep their real price); in the simulator on the Azure trace that
    variant consolidates requests onto busy workers (the decode intercept is paid once per step, so
    joining a batch looks cheap) and lost 3 points of SLO attainment at every load (see
    BENCHMARKS.md). `"n_plus_1"` and `"max1"` are kept for comparison.
    """

    name = "caraserve"

    def __init__(
        self,
        slo_tpot: float = 0.1,
        avg_output_len: float = 128.0,
        slo_penalty: float = 10.0,
        weight: str = "n",
    ):
        _request_weight(np.zeros(1), weight)  # validate early
        self.slo_tpot = slo_tpot
        self.avg_output_len = avg_output_len
        self.slo_penalty = slo_penalty
        self.weight = weight

    def scores(self, request: RouteRequest, workers: list[WorkerState]) -> tuple[np.ndarray, Prices]:
        """[W] Algorithm 1's total cost of placing `request` on each worker (lower is better)."""
        p = price(request, workers)
        cost = (p.pre_with - p.pre_now) / self.avg_output_len + (p.dec_with - p.dec_now)
        cost = np.where(p.dec_with > self.slo_tpot, cost + self.slo_penalty, cost)
        return cost * _request_weight(p.n, self.weight), p

    def score(self, request: RouteRequest, w: WorkerState) -> float:
        """Algorithm 1's total cost of placing `request` on `w` alone."""
        return float(self.scores(request, [w])[0][0])

    def choose(self, request: RouteRequest, workers: list[WorkerState]) -> WorkerState:
        return workers[_lowest(request, *self.scores(request, workers))]


class CarajaxPolicy:
    """Ours: caraserve's rank-aware price, plus the costs it does not see, plus SLO risk.

        score = n × bracket + ttft_weight × ttft + risk_weight × misses
                + slo_penalty·[Dec(batch + r) > slo_tpot] + kv_penalty·[kv_free_rows == 0]
                − locality_bonus·[adapter resident]

    bracket — caraserve's Δprefill / avg_output_len + Δdecode, plus the cold start's stall
        cold / avg_output_len (cold as in the TTFT below): under `cold_start="wait"` a synchronous
        load stalls every request in the batch for one step; under "cpu_assist" the slower
        CPU-side LoRA prefill lengthens the steps it runs in (the engine's host callbacks sit
        inside the step's prefill forward, before its decode forward), so every request decoding
        on the worker waits for it too. Either costs each of them that much per output token.
        Weighted by n, the requests already on the worker, as in Algorithm 1.
    ttft — what the new request itself waits for its first token:
        Pre(queue + r)            the prefill work already queued ahead is batched with ours;
        + Dec(batch)              the step in flight (prefill and decode share a step);
        + cold                    load_seconds(r) under "wait"; under "cpu_assist" no wait for
                                  the copy, only the slower CPU-side LoRA prefill,
                                  cpu_slowdown × Pre([r]) (an upper bound: chunks after the
                                  copy lands run on the device);
        + batch-full wait         if queue + batch ≥ max_batch, the request waits for slots:
                                  ≈ Dec(batch) × avg_output_len × (overflow + 1) / max_batch.
        Unlike the bracket it does not vanish on an idle worker, so among idle workers the one
        that already holds the adapter (no load) and has nothing queued wins, where caraserve
        takes the lowest index.
    misses — the expected number of requests whose time-per-token SLO this placement breaks
        (`slo_misses`). The bracket prices a stall as if every request had avg_output_len tokens
        to spread it over; the SLO is broken by the short ones. A long prompt's prefill stalls
        every request decoding beside it, and a request that has produced few tokens and will
        produce few more cannot absorb it; nor can a short reply that starts decoding while a
        longer prompt queued beside it is still prefilling. `slo_misses` prices exactly that with
        the output-length distribution the router learns from finished replies
        (`observe_output`, `OutputLengths`). On the Azure traces this term is what lets carajax
        sustain higher load than caraserve (BENCHMARKS.md).
    slo_penalty — outside the n weight, so it also counts on an idle worker: the new request's
        own time per token is at risk there, not only the others'.
    kv_penalty — a worker with no KV rows free cannot admit anything; it is heavily penalised
        rather than dropped so that a cluster with every worker full still routes somewhere.
    locality_bonus — an optional extra preference for a worker holding the adapter (fewer evictions
        of its other requests' adapter later); 0 by default.

    `ttft_weight` converts seconds of TTFT into the TPOT units of the bracket; its default
    1/avg_output_len amortises the wait over the request's tokens, as caraserve does for prefill.
    `risk_weight` is what one expected SLO miss costs in those units.
    """

    name = "carajax"

    def __init__(
        self,
        slo_tpot: float = 0.1,
        avg_output_len: float = 128.0,
        slo_penalty: float = 10.0,
        ttft_weight: float | None = None,
        cold_start: str = "wait",
        cpu_slowdown: float = 0.5,
        kv_penalty: float = 1e3,
        locality_bonus: float = 0.0,
        risk_weight: float = 0.5,
    ):
        if cold_start not in COLD_STARTS:
            raise ValueError(f"unknown cold_start {cold_start!r}; expected one of {COLD_STARTS}")
        if risk_weight < 0:
            raise ValueError(f"risk_weight must be >= 0, got {risk_weight}")
        self.slo_tpot = slo_tpot
        self.avg_output_len = avg_output_len
        self.slo_penalty = slo_penalty
        self.ttft_weight = 1.0 / avg_output_len if ttft_weight is None else ttft_weight
        self.cold_start = cold_start
        self.cpu_slowdown = cpu_slowdown
        self.kv_penalty = kv_penalty
        self.locality_bonus = locality_bonus
        self.risk_weight = risk_weight
        self.outputs = OutputLengths(prior_mean=avg_output_len)

    def observe_output(self, tokens: int) -> None:
        """A reply on some worker ended after `tokens` tokens (learned for `slo_misses`)."""
        self.outputs.observe(tokens)

    def _miss(self, extra: float, step: float, produced: int) -> float:
        """P(a request that has produced `produced` tokens misses the TPOT SLO) if `extra` seconds
        of stall are added to its remaining steps and every step costs `step`, as so far.

        Its tokens so far took (produced − 1)·step; with L tokens in all, TPOT = step +
        extra / (L − 1) > slo  <=>  L < 1 + extra / (slo − step)."""
        slack = self.slo_tpot - step
        if slack <= 0:
            return 1.0
        return self.outputs.stop_before(1.0 + extra / slack, produced)

    def slo_misses(self, request: RouteRequest, w: WorkerState, d_pre: float, dec_with: float,
                   dec_now: float) -> float:
        """Expected SLO misses this placement causes on `w` (its own request included).

        Our prefill (Δprefill seconds) runs beside the decoding requests: each decoding request
        of age k misses with P(L < 1 + Δprefill/slack | L > k); only ages under that bound can.
        A request still prefilling with q < p tokens left starts decoding while our p are still
        being prefilled (the engine gives every prefilling request a chunk per step), and takes
        the stall of our last p − q tokens; symmetrically ours takes the others' tokens beyond
        p. Our own request also misses if the step it joins is already too slow. Decoding
        requests already missing (Dec(batch) > slo) cannot be harmed further.
        """
        if dec_now > self.slo_tpot:
            return 1.0  # joining a batch that already misses: our own request will miss
        p = request.prompt_tokens
        per_tok = d_pre / p if p > 0 else 0.0
        misses = 0.0
        slack = self.slo_tpot - dec_with
        if d_pre > 0:
            limit = 1.0 + d_pre / slack if slack > 0 else math.inf
            for age in w.young_decode_ages(limit):
                misses += self._miss(d_pre, dec_with, age)
        behind = 0  # tokens the others still prefill after ours is done
        for q in w.queued_prompts():
            if q < p:
                misses += self._miss((p - q) * per_tok, dec_with, 1)
            else:
                behind += q - p
        if behind:  # with nothing behind, our own request misses only if its steps are too slow
            misses += self._miss(behind * per_tok, dec_with, 1)
        elif slack <= 0:
            misses += 1.0
        return misses

    def _cold_seconds(self, request: RouteRequest, p: Prices) -> tuple[np.ndarray, np.ndarray]:
        """[W] x 2: the cold start's wait for the request itself, and its stall of everyone else
        on the worker (0 where the adapter is resident). `wait`: the step blocks on the copy
        (both); `async`: the request waits in the queue for it (only its own); `cpu_assist`:
        the slower CPU-side prefill lengthens the steps it runs in (both); `auto`: whichever of
        async and cpu_assist is faster, as the engine chooses. An adapter only on the worker's
        disk is read first, queued, on every path: its read adds to the request's own wait."""
        zero = np.zeros(len(p.resident))
        if self.cold_start == "cached" or p.resident.all():
            return zero, zero
        rank, toks = request.rank, request.prompt_tokens
        alone = Batch(ranks=(rank,), tokens=toks, context=toks)
        load = cpu = zero
        if self.cold_start != "cpu_assist":
            load = p.per_cost(lambda c: c.load_seconds(rank))
        if self.cold_start in ("cpu_assist", "auto"):
            cpu = p.per_cost(lambda c: self.cpu_slowdown * c.prefill_time(alone))
        read = p.read_s if p.read_s is not None else zero
        if self.cold_start == "wait":
            own, others = load + read, load
        elif self.cold_start == "async":
            own, others = load + read, zero
        elif self.cold_start == "cpu_assist":
            own, others = cpu + read, cpu
        else:  # auto
            via_cpu = cpu < load
            own, others = np.where(via_cpu, cpu, load) + read, np.where(via_cpu, cpu, 0.0)
        return np.where(p.resident, 0.0, own), np.where(p.resident, 0.0, others)

    def base_scores(
        self, request: RouteRequest, workers: list[WorkerState]
    ) -> tuple[np.ndarray, np.ndarray, Prices]:
        """[W] the score without its risk term; [W] the stall our prefill adds (Δprefill + cold,
        `slo_misses`' `d_pre`); and the prices they came from."""
        p, avg = price(request, workers), self.avg_output_len
        d_pre = p.pre_with - p.pre_now
        cold, stall = self._cold_seconds(request, p)
        bracket = d_pre / avg + (p.dec_with - p.dec_now) + stall / avg
        ttft = p.pre_with + p.dec_now + cold
        overflow = p.n - p.max_batch
        ttft = np.where(overflow >= 0, ttft + p.dec_now * avg * (overflow + 1) / p.max_batch, ttft)
        score = bracket * p.n + self.ttft_weight * ttft
        score = np.where(p.dec_with > self.slo_tpot, score + self.slo_penalty, score)
        score = np.where(p.kv_free <= 0, score + self.kv_penalty, score)
        if self.locality_bonus:
            score = np.where(p.resident, score - self.locality_bonus, score)
        return score, d_pre + stall, p

    def score(self, request: RouteRequest, w: WorkerState) -> float:
        """n × (caraserve bracket + cold stall) + ttft_weight × TTFT + penalties + risk_weight × misses,
        for `request` on `w` alone."""
        base, stall, p = self.base_scores(request, [w])
        if not self.risk_weight:
            return float(base[0])
        misses = self.slo_misses(request, w, float(stall[0]), float(p.dec_with[0]), float(p.dec_now[0]))
        return float(base[0]) + self.risk_weight * misses

    def choose(self, request: RouteRequest, workers: list[WorkerState]) -> WorkerState:
        """argmin of `score` (ties: lowest index), by branch and bound: the risk term is never
        negative, so workers are visited in order of their score without it, and once that alone
        exceeds the best total no later worker can win. The same choice as scoring every worker;
        `slo_misses` (a loop over the worker's requests) runs on the few workers that could win."""
        base, stall, p = self.base_scores(request, workers)
        if not self.risk_weight:
            return workers[_lowest(request, base, p)]
        idx = _eligible(request, p)
        order = idx[np.lexsort((idx, base[idx]))].tolist()  # by base score, then index
        base_l, stall_l = base.tolist(), stall.tolist()
        with_l, now_l = p.dec_with.tolist(), p.dec_now.tolist()
        best_t, best_i = math.inf, len(workers)
        for i in order:
            b = base_l[i]
            if b > best_t:
                break
            t = b + self.risk_weight * self.slo_misses(request, workers[i], stall_l[i], with_l[i], now_l[i])
            if t < best_t or (t == best_t and i < best_i):
                best_t, best_i = t, i
        return workers[best_i]


class RandomPolicy:
    """Uniform among the candidates; seeded so runs repeat."""

    name = "random"

    def __init__(self, seed: int = 0):
        self._rng = _random.Random(seed)

    def choose(self, request: RouteRequest, workers: list[WorkerState]) -> WorkerState:
        idx = candidates(request, workers)
        return workers[idx[self._rng.randrange(len(idx))]]


class RoundRobinPolicy:
    """Cycles through the workers by index, skipping non-candidates.

    The cursor is a worker index, not a position among candidates, so a worker dropping out of
    the candidate set does not shift everyone else's turn.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: RouteRequest, workers: list[WorkerState]) -> WorkerState:
        idx = candidates(request, workers)
        start = self._next % len(workers)
        pick = next((i for i in idx if i >= start), idx[0])  # first candidate at/after the cursor
        self._next = pick + 1
        return workers[pick]


class FirstFitPolicy:
    """The first candidate (by index) with room: queue + batch < max_batch and KV rows free.

    Our reading of the paper's first-fit: fill workers in a fixed order, moving on only when a
    worker's batch is full. That packs load onto the first workers, which is why it does worst
    on time-per-token SLOs. If no candidate has room, the first candidate gets the request.
    """

    name = "first_fit"

    def choose(self, request: RouteRequest, workers: list[WorkerState]) -> WorkerState:
        idx = candidates(request, workers)
        for i in idx:
            w = workers[i]
            if w.n_requests() < w.max_batch and w.kv_free_rows > 0:
                return w
        return workers[idx[0]]


class MostIdlePolicy:
    """The candidate with the fewest requests (queue + batch); ties: lowest index."""

    name = "most_idle"

    def choose(self, request: RouteRequest, workers: list[WorkerState]) -> WorkerState:
        idx = candidates(request, workers)
        return workers[min(idx, key=lambda i: (workers[i].n_requests(), i))]


class AdapterAffinityPolicy:
    """Among the candidates holding the request's adapter on the device, the one with the fewest
    requests; if none holds it (or the request has none), the least loaded of all; ties: lowest
    index. Ray Serve LLM's rule for LoRA (its multiplexed-model routing prefers replicas with the
    model loaded, then shorter queues): adapter locality first, no price of rank or SLO."""

    name = "adapter_affinity"

    def choose(self, request: RouteRequest, workers: list[WorkerState]) -> WorkerState:
        idx = candidates(request, workers)
        holding = [i for i in idx if request.adapter and request.adapter in workers[i].resident]
        return workers[min(holding or idx, key=lambda i: (workers[i].n_requests(), i))]


_REGISTRY: dict[str, type] = {
    "caraserve": CaraServePolicy,
    "carajax": CarajaxPolicy,
    "random": RandomPolicy,
    "round_robin": RoundRobinPolicy,
    "first_fit": FirstFitPolicy,
    "most_idle": MostIdlePolicy,
    "adapter_affinity": AdapterAffinityPolicy,
}
POLICIES: tuple[str, ...] = tuple(_REGISTRY)


def make_policy(name: str, **kw) -> Policy:
    """Builds a policy by name; keyword arguments the policy does not take are ignored.

    Ignoring extras lets one call site pass the shared knobs (slo_tpot, avg_output_len, seed)
    to whichever policy is being compared.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {POLICIES}") from None
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kw.items() if k in params})


__all__ = [
    "POLICIES",
    "AdapterAffinityPolicy",
    "Batch",
    "CaraServePolicy",
    "CarajaxPolicy",
    "CostModel",
    "FirstFitPolicy",
    "MostIdlePolicy",
    "NoWorkerError",
    "Policy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "RouteRequest",
    "WorkerState",
    "candidates",
    "make_policy",
]
