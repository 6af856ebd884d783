"""Workload traces: parse them, cut a window, scale time, clip lengths, give requests adapters.

    trace = read_trace("data/traces/azure_llm_2023/azure2023_conv.jsonl")   # or the Azure CSV
    reqs = prepare(trace.requests, TraceOptions(duration_s=60, rate_scale=2.0, context_len=1024,
                                                 n_adapters=128))

Two formats:
  * JSONL, one object a line: `arrival_s`, `prompt_tokens`, `output_tokens`, optional `adapter`
    (a name) and `rank`;
  * the Azure LLM Inference 2023 CSV (Splitwise, ISCA 2024): header `TIMESTAMP,ContextTokens,
    GeneratedTokens`, wall-clock timestamps (arrivals become seconds since the earliest one).

A malformed line raises `TraceError` naming the file and line; with `skip_bad=True` it is skipped
and counted instead (`Trace.skipped`). The traces carry no text and no adapter: requests get a
Zipf-popular adapter (CaraServe took adapter popularity from the Azure Functions trace, whose skew
is about 1.8) with a rank from a set. Everything random is drawn from `seed`.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
from collections.abc import Sequence

import numpy as np

__all__ = [
    "Prepared", "Trace", "TraceError", "TraceOptions", "TraceRequest", "assign_adapters",
    "clip_lengths", "draw_adapters", "load_trace", "poisson_workload", "prepare", "read_trace",
    "scale_time", "time_window", "with_adapters", "zipf_probabilities",
]


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    """One request of a workload: arrival time (s), prompt/output token counts, adapter and rank
    ("" and 0: none assigned yet, or the base model)."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    adapter: str = ""
    rank: int = 0


class TraceError(ValueError):
    """A malformed trace line; `path` and `line` (1-based) say where."""

    def __init__(self, path: str, line: int, message: str):
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line = path, line


@dataclasses.dataclass(frozen=True)
class Trace:
    """A parsed trace file, requests sorted by arrival (stable). `skipped` malformed lines were
    left out (`skip_bad=True`); `skipped_lines` names the first 20 of them."""

    path: str
    format: str  # "jsonl" or "azure_csv"
    requests: tuple[TraceRequest, ...]
    skipped: int = 0
    skipped_lines: tuple[int, ...] = ()


# -- parsing ----------------------------------------------------------------------------------
def _count(value, field: str) -> int:
    """A non-negative integer token count (JSON floats like 12.0 are accepted, 12.5 is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{field} must be a number, got {value!r}")
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{field} must be a number, got {value!r}") from None
    if not math.isfinite(x) or x != int(x) or x < 0:
        raise ValueError(f"{field} must be a non-negative integer, got {value!r}")
    return int(x)


def _jsonl_request(text: str) -> TraceRequest:
    row = json.loads(text)
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    missing = [f for f in ("arrival_s", "prompt_tokens", "output_tokens") if f not in row]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    t = row["arrival_s"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ValueError(f"arrival_s must be a finite number, got {t!r}")
    adapter = row.get("adapter") or ""
    if not isinstance(adapter, str):
        raise ValueError(f"adapter must be a string, got {adapter!r}")
    rank = _count(row.get("rank", 8 if adapter else 0), "rank")
    return TraceRequest(float(t), _count(row["prompt_tokens"], "prompt_tokens"),
                        _count(row["output_tokens"], "output_tokens"), adapter, rank)


def _timestamp(text: str) -> tuple[int, float]:
    """'2023-11-16 18:15:46.6805900' -> (whole seconds since the epoch, fraction). Kept apart
    because a float epoch second holds only ~7 significant digits after the point."""
    whole, _, frac = text.strip().partition(".")
    if frac and not frac.isdigit():
        raise ValueError(f"bad fractional seconds in TIMESTAMP {text!r}")
    dt = datetime.datetime.fromisoformat(whole)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return int(dt.timestamp()), float(f"0.{frac}") if frac else 0.0


def _parse_lines(path: str, fmt: str, skip_bad: bool) -> tuple[list[tuple[int, object]], list[int]]:
    """[(line number, parsed row)] and the numbers of the skipped lines."""
    rows: list[tuple[int, object]] = []
    bad: list[int] = []

    def fail(line: int, why: str) -> None:
        if not skip_bad:
            raise TraceError(path, line, why)
        bad.append(line)

    with open(path, newline="") as f:
        if fmt == "jsonl":
            for n, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    rows.append((n, _jsonl_request(text)))
                except ValueError as e:  # json.JSONDecodeError is a ValueError
                    fail(n, str(e))
            return rows, bad
        reader = csv.reader(f)
        header = next(reader, None)
        cols = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
        if header is None or any(c not in [h.strip() for h in header] for c in cols):
            raise TraceError(path, 1, f"expected an Azure LLM trace header with columns {cols}, "
                                      f"got {header}")  # not skippable: nothing else can be read
        idx = [[h.strip() for h in header].index(c) for c in cols]
        for fields in reader:
            n = reader.line_num
            if not fields or all(not x.strip() for x in fields):
                continue
            try:
                if len(fields) != len(header):
                    raise ValueError(f"expected {len(header)} fields, got {len(fields)}")
                ts, ctx, gen = (fields[i] for i in idx)
                rows.append((n, (_timestamp(ts), _count(ctx.strip(), "ContextTokens"),
                                 _count(gen.strip(), "GeneratedTokens"))))
            except ValueError as e:
                fail(n, str(e))
    return rows, bad


def read_trace(path: str | os.PathLike, *, format: str | None = None,
               skip_bad: bool = False) -> Trace:
    """Parse a JSONL trace or an Azure LLM 2023 CSV (`format` "jsonl" / "azure_csv"; None: by the
    file's extension). Malformed lines raise `TraceError` (file and line number) unless
    `skip_bad`, which skips and counts them. Arrivals of the CSV are seconds since its earliest
    timestamp; JSONL arrivals are kept as written. Requests come sorted by arrival."""
    path = os.fspath(path)
    fmt = format or ("azure_csv" if path.lower().endswith(".csv") else "jsonl")
    if fmt not in ("jsonl", "azure_csv"):
        raise ValueError(f"format must be 'jsonl' or 'azure_csv', got {format!r}")
    rows, bad = _parse_lines(path, fmt, skip_bad)
    if fmt == "jsonl":
        reqs = [r for _, r in rows]
    elif rows:
        base_s, base_f = min(r[0] for _, r in rows)
        reqs = [TraceRequest((s - base_s) + (fr - base_f), ctx, gen) for _, ((s, fr), ctx, gen) in rows]
    else:
        reqs = []
    reqs.sort(key=lambda r: r.arrival_s)  # stable: ties keep file order
    return Trace(path, fmt, tuple(reqs), len(bad), tuple(bad[:20]))


# -- transformations (pure: new lists, inputs untouched) ------------------------------------
def time_window(reqs: Sequence[TraceRequest], start_s: float = 0.0, duration_s: float | None = None,
                max_requests: int | None = None) -> list[TraceRequest]:
    """Requests arriving in [first + start_s, first + start_s + duration_s), at most
    `max_requests` of them, with times re-based so the window starts at 0."""
    if not reqs:
        return []
    t0 = min(r.arrival_s for r in reqs) + start_s
    end = math.inf if duration_s is None else t0 + duration_s
    out = [dataclasses.replace(r, arrival_s=r.arrival_s - t0) for r in reqs if t0 <= r.arrival_s < end]
    return out if max_requests is None else out[:max_requests]


def scale_time(reqs: Sequence[TraceRequest], rate_scale: float) -> list[TraceRequest]:
    """Multiply the arrival rate by `rate_scale` (arrival times are divided by it: 2.0 replays
    the trace twice as fast, 0.5 at half speed)."""
    if not rate_scale > 0:
        raise ValueError(f"rate_scale must be positive, got {rate_scale}")
    return [dataclasses.replace(r, arrival_s=r.arrival_s / rate_scale) for r in reqs]


def clip_lengths(reqs: Sequence[TraceRequest], context_len: int | None = None,
                 max_prompt: int | None = None, max_output: int | None = None,
                 ) -> tuple[list[TraceRequest], int]:
    """Clip lengths so each request fits a model: prompt <= max_prompt, 1 <= output <= max_output
    and prompt + output <= context_len (the prompt gives way first: decoding is what a user waits
    on token by token). Prompts keep at least one token. Returns (requests, how many changed)."""
    if context_len is not None and context_len < 2:
        raise ValueError(f"context_len must be at least 2, got {context_len}")
    out, changed = [], 0
    for r in reqs:
        p = max(1, r.prompt_tokens if max_prompt is None else min(r.prompt_tokens, max_prompt))
        o = max(1, r.output_tokens if max_output is None else min(r.output_tokens, max_output))
        if context_len is not None and p + o > context_len:
            o = min(o, context_len - 1)
            p = context_len - o
        changed += (p, o) != (r.prompt_tokens, r.output_tokens)
        out.append(dataclasses.replace(r, prompt_tokens=p, output_tokens=o))
    return out, changed


def zipf_probabilities(n_adapters: int, exponent: float) -> np.ndarray:
    """P(adapter k) ∝ k^-exponent for k = 1..n (k = 1 is the most popular)."""
    w = np.arange(1, n_adapters + 1, dtype=np.float64) ** -exponent
    return w / w.sum()


def _rank_table(n_adapters: int, ranks: Sequence[int], rank_weights: Sequence[float] | None,
                rng: np.random.Generator) -> np.ndarray:
    if n_adapters < 1 or not ranks:
        raise ValueError("need at least one adapter and one rank")
    if rank_weights is None:
        return rng.choice(np.asarray(ranks), size=n_adapters)
    w = np.asarray(rank_weights, dtype=np.float64)
    if w.shape != (len(ranks),) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"rank_weights {rank_weights} must be {len(ranks)} non-negative numbers")
    return rng.choice(np.asarray(ranks), size=n_adapters, p=w / w.sum())


def draw_adapters(n_requests: int, n_adapters: int, exponent: float = 1.8,
                  ranks: Sequence[int] = (8, 16, 32, 64), seed: int = 0,
                  rank_weights: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(adapter index per request, Zipf(`exponent`) over `n_adapters`; rank of every adapter,
    drawn once from `ranks`, uniformly or by `rank_weights`).

    The two come from separate streams of `seed`, so an adapter's rank does not depend on how
    many requests were drawn: "a7" has the same rank in every slice of every trace (and its
    random weights can be written once and reused)."""
    table = _rank_table(n_adapters, ranks, rank_weights, np.random.default_rng([seed, 1]))
    ids = np.random.default_rng([seed, 0]).choice(n_adapters, size=n_requests,
                                                 p=zipf_probabilities(n_adapters, exponent))
    return ids, table


def assign_adapters(n_requests: int, n_adapters: int, exponent: float = 1.8,
                    ranks: Sequence[int] = (8, 16, 32, 64), seed: int = 0,
                    rank_weights: Sequence[float] | None = None) -> tuple[list[str], list[int]]:
    """Zipf-popular adapter names ("a0" most popular) for each request, and their ranks.

    Each adapter's rank is drawn once, so an adapter always has one rank. Adapter "a{k}" has
    popularity rank k + 1, which keeps the statistics easy to check; routers only see names, so
    the ordering cannot leak into routing. (This is the simulator's original stream: ids, then
    ranks, from one generator; `draw_adapters` keeps ranks independent of the request count.)
    """
    if n_adapters < 1 or not ranks:
        raise ValueError("need at least one adapter and one rank")
    rng = np.random.default_rng(seed)
    ids = rng.choice(n_adapters, size=n_requests, p=zipf_probabilities(n_adapters, exponent))
    adapter_rank = _rank_table(n_adapters, ranks, rank_weights, rng)
    return [f"a{i}" for i in ids.tolist()], adapter_rank[ids].tolist()


def with_adapters(reqs: Sequence[TraceRequest], n_adapters: int, exponent: float = 1.8,
                  ranks: Sequence[int] = (8, 16, 32, 64), seed: int = 0,
                  rank_weights: Sequence[float] | None = None) -> list[TraceRequest]:
    """Zipf adapters (`draw_adapters`) for the requests that name none; the others keep theirs."""
    ids, table = draw_adapters(len(reqs), n_adapters, exponent, ranks, seed, rank_weights)
    return [r if r.adapter else dataclasses.replace(r, adapter=f"a{k}", rank=int(table[k]))
            for r, k in zip(reqs, ids.tolist())]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TraceOptions:
    """What `prepare` does, in this order: window (trace seconds), time scaling, length clipping,
    adapter assignment."""

    start_s: float = 0.0
    duration_s: float | None = None
    max_requests: int | None = None
    rate_scale: float = 1.0
    context_len: int | None = None
    max_prompt: int | None = None
    max_output: int | None = None
    n_adapters: int = 100
    zipf_exponent: float = 1.8
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    rank_weights: tuple[float, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        if not self.rate_scale > 0:
            raise ValueError(f"rate_scale must be positive, got {self.rate_scale}")
        if self.n_adapters < 1 or not self.ranks or min(self.ranks) < 1:
            raise ValueError("need n_adapters >= 1 and positive ranks")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be positive, got {self.duration_s}")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """`prepare`'s result: the requests and what was done to them (for the report)."""

    requests: tuple[TraceRequest, ...]
    options: TraceOptions
    clipped: int  # requests whose lengths were clipped
    source_requests: int  # requests in the window before the cut to max_requests
    adapters: dict[str, int]  # every adapter (used or not: a0..a{n-1}, then the trace's) -> rank

    @property
    def span_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0


def prepare(reqs: Sequence[TraceRequest], options: TraceOptions) -> Prepared:
    """Window, scale, clip and assign adapters (see `TraceOptions`); deterministic for a seed."""
    o = options
    window = time_window(reqs, o.start_s, o.duration_s)
    cut = window if o.max_requests is None else window[:o.max_requests]
    clipped, n_clipped = clip_lengths(scale_time(cut, o.rate_scale), o.context_len, o.max_prompt,
                                      o.max_output)
    ids, adapter_rank = draw_adapters(len(clipped), o.n_adapters, o.zipf_exponent, o.ranks, o.seed,
                                      o.rank_weights)
    table = {f"a{k}": int(r) for k, r in enumerate(adapter_rank.tolist())}
    out = []
    for r, k in zip(clipped, ids.tolist()):
        if r.adapter:  # the trace names it: keep it (and its rank)
            table.setdefault(r.adapter, r.rank)
            out.append(r)
        else:
            out.append(dataclasses.replace(r, adapter=f"a{k}", rank=table[f"a{k}"]))
    return Prepared(tuple(out), o, n_clipped, len(window), table)


# -- workloads for the simulator ------------------------------------------------------------
def load_trace(path: str, *, n_requests: int | None = None, rate_scale: float = 1.0,
               n_adapters: int = 100, exponent: float = 1.8, ranks: Sequence[int] = (8, 16, 32, 64),
               seed: int = 0, max_prompt: int | None = None, max_output: int | None = None,
               skip_bad: bool = False) -> list[TraceRequest]:
    """A trace file (JSONL or Azure CSV, see `read_trace`) as a simulator workload.

    `rate_scale` multiplies the arrival rate (arrival times are divided by it). `n_requests` cuts
    the trace, or tiles it back to back (each copy shifted by the trace's span plus its mean gap)
    when the trace is shorter. Requests without an adapter get a Zipf(`exponent`) adapter over
    `n_adapters` with a rank from `ranks` (see `assign_adapters`). Prompt/output lengths can be
    clipped to fit a worker; outputs are at least 1 token. Deterministic for a seed.
    """
    rows = read_trace(path, skip_bad=skip_bad).requests
    if not rows:
        return []
    base_t = np.array([r.arrival_s for r in rows])
    base_t -= base_t.min()
    total = len(rows) if n_requests is None else n_requests
    span = float(base_t.max()) + (float(base_t.max()) / max(1, len(rows) - 1))
    names, rks = assign_adapters(total, n_adapters, exponent, ranks, seed)
    out = []
    for i in range(total):
        r = rows[i % len(rows)]
        t = (base_t[i % len(rows)] + span * (i // len(rows))) / rate_scale
        p, o = r.prompt_tokens, max(1, r.output_tokens)
        if max_prompt is not None:
            p = min(p, max_prompt)
        if max_output is not None:
            o = min(o, max_output)
        ad, rk = (r.adapter, r.rank) if r.adapter else (names[i], rks[i])
        out.append(TraceRequest(float(t), p, o, ad, rk))
    return out


def poisson_workload(n_requests: int, rate: float, *, prompt_tokens: int = 256,
                     output_tokens: int = 64, n_adapters: int = 100, exponent: float = 1.8,
                     ranks: Sequence[int] = (8, 16, 32, 64), seed: int = 0) -> list[TraceRequest]:
    """Synthetic Poisson arrivals at `rate` req/s with fixed lengths and Zipf adapters."""
    rng = np.random.default_rng(seed + 1)
    t = np.cumsum(rng.exponential(1.0 / rate, size=n_requests)) if n_requests else np.zeros(0)
    names, rks = assign_adapters(n_requests, n_adapters, exponent, ranks, seed)
    return [TraceRequest(float(t[i]), prompt_tokens, output_tokens, names[i], rks[i])
            for i in range(n_requests)]
