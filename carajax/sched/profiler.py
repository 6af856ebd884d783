"""Profile real engine steps on this device, for fitting step-latency cost models (CaraServe §5).

`profile(model, grid)` builds an engine for the model (random weights for a preset, or a local HF
checkpoint; `carajax profile`), and `profile_engine(engine, grid)` profiles an engine that already
exists, in place (`carajax serve --cost-model auto`: the serving engine itself, never a second
copy of the weights); both register in-memory random adapters of the ranks the grid needs and
time what serving runs: `ModelRunner.run(Schedule)` (the forward plus sampling) for

- prefill steps: B requests, each a chunk of T prompt tokens starting at context offset c;
- decode steps: B requests, one token each, with c tokens already in the KV cache;
- mixed steps: those B decodes plus ONE prefill chunk of T prompt tokens at offset c from one more
  request, in one `Schedule` (decodes first, then the chunk, as the planner orders them): the
  engine's fused step, which the cost model's `step` form is fitted to (with the other two);

for every rank mix and LoRA kernel mode of a `ProfileGrid`. Each point runs `warmup` times (the
first compiles), then `repeats` timed times (`jax.block_until_ready`) interleaved with the other
points of its rank mix (`time_interleaved`); rows keep the median and every repeat. The engine
always has adapters registered, so base-model rows run the LoRA variant as in serving (the
references do LoRA work for them too). It also measures adapter load time vs rank through the
pool (`load_now`: host page layout, `jax.device_put`, install). The profile's adapters are
acquired while in use and removed after each rank mix, and its KV pages come from the engine's own
allocator and go back to it, so an engine profiled in place ends as it began (see
`profile_engine`). The result is a JSON-able dict
(`save_profile`) whose rows `cost_model.fit_cost_model` reads; `fit_profile` adds provenance and
the load table."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from carajax.config import TARGET_MODULES, EngineConfig, ModelConfig
from carajax.engine.engine import Engine
from carajax.engine.planner import Schedule, SeqChunk
from carajax.engine.request import Request, RequestHandle, RequestMetrics
from carajax.engine.sampling import SamplingParams
from carajax.lora.adapter import LoraAdapter, LoraModule
from carajax.lora.hook import resolve_lora_impl
from carajax.lora.pool import AdapterPool, PoolFullError
from carajax.models import hub
from carajax.models.attention import KV_CHUNK_PAGES, decode_chunk_pages
from carajax.sched import cost_model as cm

FORMAT = "carajax.profile/v1"
# Names of the profiler's temporary adapters (in the pool only, never in `Engine.adapters`).
TEMP_PREFIX = "carajax-profile/"
_MIXED = re.compile(r"^mixed\s*(\d+)\s*\.\.\s*(\d+)$")
_UNIFORM = re.compile(r"^uniform(\d+)$")


def mix_ranks(mix: str, batch_size: int) -> tuple[int, ...]:
    """The LoRA rank of each of `batch_size` requests under a named rank mix.

    "base": no adapter (0). "uniformN": all rank N. "mixed A..B": the powers of two from B down to
    A, cycled; starting at the largest keeps max_rank = B at every size, so the padded kernel's
    cost (|S| * max_rank) and the unpadded one's (sum of ranks) differ as much as they can."""
    if mix == "base":
        return (0,) * batch_size
    if m := _UNIFORM.match(mix):
        return (int(m.group(1)),) * batch_size
    if m := _MIXED.match(mix):
        lo, hi = int(m.group(1)), int(m.group(2))
        levels = [r for r in (1 << i for i in range(hi.bit_length() + 1)) if lo <= r <= hi][::-1]
        if not levels:
            raise ValueError(f"rank mix {mix!r}: no power of two in [{lo}, {hi}]")
        return tuple(levels[i % len(levels)] for i in range(batch_size))
    raise ValueError(f"unknown rank mix {mix!r}; use 'base', 'uniformN' or 'mixed A..B'")


@dataclasses.dataclass(frozen=True)
class ProfileGrid:
    """What to measure. Every (batch size, prompt tokens, context) is a prefill point and a mixed
    point (batch size = its decodes; the chunk takes `mixed_prompt_tokens`, default
    `prompt_tokens`; () for none), and every (batch size, context) a decode point, for each rank
    mix and kernel mode; `load_ranks` are the adapter ranks whose load time is measured
    (`load_repeats` each, after one warm-up load)."""

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    prompt_tokens: tuple[int, ...] = (16, 64)  # per request per prefill step (one chunk)
    contexts: tuple[int, ...] = (0, 256)  # prefill: chunk offset; decode: tokens already cached
    rank_mixes: tuple[str, ...] = ("base", "uniform8", "uniform64", "mixed 8..64")
    kernels: tuple[str, ...] = ("unpadded", "padded")
    warmup: int = 1
    repeats: int = 5
    load_ranks: tuple[int, ...] = (8, 16, 32, 64)
    load_repeats: int = 5
    # The engine's longest context per request (EngineConfig.max_seq_len; None: the serving
    # default). The attention walks pages only up to the step's longest context, so this sets the
    # KV pages' capacity, not the steps' cost.
    seq_len: int | None = None
    mixed_prompt_tokens: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.mixed_prompt_tokens is not None:
            object.__setattr__(self, "mixed_prompt_tokens", tuple(self.mixed_prompt_tokens))
            if any(t <= 0 for t in self.mixed_prompt_tokens):
                raise ValueError("ProfileGrid.mixed_prompt_tokens must be positive")
        for f in ("batch_sizes", "prompt_tokens", "contexts", "rank_mixes", "kernels", "load_ranks"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        for f in ("batch_sizes", "prompt_tokens", "load_ranks"):
            if not getattr(self, f) or min(getattr(self, f)) <= 0:
                raise ValueError(f"ProfileGrid.{f} must be non-empty and positive")
        if not self.contexts or min(self.contexts) < 0:
            raise ValueError("ProfileGrid.contexts must be non-empty and >= 0")
        if self.seq_len is not None and self.seq_len < max(self.contexts) + self.max_chunk:
            raise ValueError("ProfileGrid.seq_len must hold max(contexts) + the longest chunk")
        if self.warmup < 1 or self.repeats < 1 or self.load_repeats < 1:
            raise ValueError("ProfileGrid needs warmup >= 1 (compilation) and repeats >= 1")
        if not self.kernels or any(k not in cm.KERNELS for k in self.kernels):
            raise ValueError(f"ProfileGrid.kernels must be drawn from {cm.KERNELS}")
        if not self.rank_mixes:
            raise ValueError("ProfileGrid.rank_mixes must be non-empty")
        for mix in self.rank_mixes:
            mix_ranks(mix, 1)  # fails early on a bad name

    @property
    def max_rank(self) -> int:
        """The largest adapter rank any point or load needs."""
        ranks = [r for mix in self.rank_mixes for r in mix_ranks(mix, 8)] + list(self.load_ranks)
        return max(ranks)

    @property
    def mixed_tokens(self) -> tuple[int, ...]:
        """The chunk lengths of the mixed points."""
        return self.prompt_tokens if self.mixed_prompt_tokens is None else self.mixed_prompt_tokens

    @property
    def max_chunk(self) -> int:
        return max(self.prompt_tokens + self.mixed_tokens)

    def points(self) -> list[tuple[str, str, int, int, int]]:
        """(phase, mix, batch size, chunk tokens, context) for one kernel mode. Mixed points: the
        batch size counts their decodes (one more request brings the chunk)."""
        pts = [("prefill", mix, b, t, c) for mix in self.rank_mixes for b in self.batch_sizes
               for t in self.prompt_tokens for c in self.contexts]
        pts += [("decode", mix, b, 1, c) for mix in self.rank_mixes for b in self.batch_sizes
                for c in self.contexts]
        return pts + [("mixed", mix, b, t, c) for mix in self.rank_mixes for b in self.batch_sizes
                      for t in self.mixed_tokens for c in self.contexts]


GRIDS = {
    # ~2-3 minutes for llama-test on a 2-core CPU (most of it compiling the step variants).
    "quick": ProfileGrid(warmup=2),
    # Minutes to hours depending on the model: a fit worth committing on a GPU.
    "full": ProfileGrid(batch_sizes=(1, 2, 4, 8, 16, 32), prompt_tokens=(16, 64, 128, 256, 512),
                        contexts=(0, 128, 256), warmup=2, repeats=7, load_ranks=(8, 16, 32, 64, 128),
                        rank_mixes=("base", "uniform8", "uniform16", "uniform64", "uniform128",
                                    "mixed 8..64", "mixed 8..128")),
}


def random_adapter(name: str, config: ModelConfig, rank: int, seed: int = 0,
                   target_modules: tuple[str, ...] = TARGET_MODULES) -> LoraAdapter:
    """An in-memory random adapter (what `load_adapter` returns), with no files involved."""
    rng = np.random.default_rng(seed)
    mods = {}
    for layer in range(config.num_layers):
        for m in target_modules:
            d_in, d_out = config.projection_shape(m)
            mods[(layer, m)] = LoraModule(
                a=(rng.standard_normal((rank, d_in), np.float32) * 0.02),
                b=(rng.standard_normal((d_out, rank), np.float32) * 0.02), scale=2.0)
    return LoraAdapter(name=name, path="<random>", modules=mods)


def time_interleaved(fns: list[Callable[[], Any]], warmup: int, repeats: int, seed: int = 0,
                     tick: Callable[[], Any] = lambda: None) -> list[list[float]]:
    """Seconds of `repeats` calls of each fn (`jax.block_until_ready` on its result), after
    `warmup` untimed calls each (the first compiles). The timed calls go in rounds, every fn once
    per round in a fresh random order, so a burst of load from elsewhere on the machine spreads
    over many points instead of inflating every repeat of one."""
    for fn in fns:
        for _ in range(warmup):
            jax.block_until_ready(fn())
            tick()
    times: list[list[float]] = [[] for _ in fns]
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        for i in rng.permutation(len(fns)):
            t0 = time.perf_counter()
            jax.block_until_ready(fns[i]())
            times[i].append(time.perf_counter() - t0)
            tick()
    return times


def _request(i: int, prompt: list[int], adapter: str | None, output: list[int]) -> Request:
    rid = f"profile-{i}"
    return Request(request_id=rid, prompt_ids=prompt, adapter=adapter, sampling=SamplingParams(),
                   seed=i, stop_ids=frozenset(), handle=RequestHandle(rid),
                   metrics=RequestMetrics(arrival_time=0.0, prompt_tokens=len(prompt)),
                   output_ids=output)


class _Session:
    """One engine (one kernel mode) plus lazily registered adapters: request i of rank r uses
    adapter "r{r}-{i}" (under `TEMP_PREFIX`), so every request in a batch has its own adapter and
    its own slot (the paper's workload). Adapters of one rank share their host arrays and their
    staged copy (a step's cost does not depend on the values), so the host holds one copy per
    rank however many requests use it; the pool still counts each registration in its host
    budget. Each adapter is acquired while registered, so nothing evicts it between the steps
    that use it; `end_mix` removes all but the one kept registered, `close` that one too.

    KV pages: request i's pages belong to owner `(TEMP_PREFIX, i)` in the engine's own page
    allocator (`planner.pages`), grown as the steps need and freed by `close`."""

    def __init__(self, engine: Engine, cache: dict[str, LoraAdapter], seed: int):
        self.engine, self.cache = engine, cache  # `cache`: host adapters, shared across engines
        self.registered: set[str] = set()
        self.rng = np.random.default_rng(seed)
        self._staged: dict[int, tuple | None] = {}  # rank -> the pool's staged copy
        self._owners: list[tuple[str, int]] = []  # KV page owners, by request index
        # A serving engine with adapters registered runs the LoRA variant for every step, base
        # rows included (`ModelRunner._use_lora`); one adapter kept registered makes the base mix
        # measure that, not the LoRA-free variant of an engine that has none.
        self.keep = self.adapters((self.engine.config.lora_page_rank,))[0]

    def _adapter(self, name: str, rank: int) -> LoraAdapter:
        if name not in self.cache:
            base = next((a for a in self.cache.values() if a.rank == rank), None)
            self.cache[name] = (random_adapter(name, self.engine.model_config, rank, seed=rank)
                                if base is None else dataclasses.replace(base, name=name))
        return self.cache[name]

    def adapters(self, ranks: tuple[int, ...]) -> list[str | None]:
        names = [None if r == 0 else f"{TEMP_PREFIX}r{r}-{i}" for i, r in enumerate(ranks)]
        pool = self.engine.pool
        for name, r in zip(names, ranks):
            if name is None:
                continue
            adapter = self._adapter(name, r)
            if name not in self.registered:
                if r not in self._staged:
                    self._staged[r] = pool.stage_host(adapter)
                pool.register(adapter, staged=self._staged[r])
                self.registered.add(name)
                pool.acquire(name)  # never evicted (e.g. by a submitter's prefetch) while here
            pool.load_now(name)  # before timing: the step measures compute, not copies
        return names

    def end_mix(self) -> None:
        """Remove the adapters of the mix just measured (all but the one kept registered), so
        that the next mix's adapters find the pool's pages free."""
        for name in sorted(self.registered - {self.keep}):
            self._remove(name)

    def _remove(self, name: str) -> None:
        self.engine.pool.release(name)
        self.engine.pool.unregister(name)
        self.registered.discard(name)

    def close(self) -> None:
        """Give back everything the session took: its adapters, its KV pages, and the runner's
        reference to its last step's requests."""
        for name in sorted(self.registered):
            self._remove(name)
        pages = self.engine.planner.pages
        for owner in self._owners:
            pages.free(owner)
        self._owners.clear()
        self.engine.runner._prev_rows = {}  # the profile's requests; no step reads them again

    def _pages(self, i: int, need: int) -> list[int]:
        """Request i's first `need` KV pages, from the engine's allocator."""
        pages = self.engine.planner.pages
        while len(self._owners) <= i:
            self._owners.append((TEMP_PREFIX, len(self._owners)))
        if not pages.grow(self._owners[i], need):
            raise RuntimeError(f"the KV cache has {pages.num_free} free pages; the profile's "
                               f"request {i} needs {need}")
        return list(pages.table(self._owners[i])[:need])

    def step(self, phase: str, ranks: tuple[int, ...], tokens: int, context: int) -> Callable:
        """One step as the planner would schedule it: decodes first, then prefill chunks. A mixed
        step's last rank is its chunk's request; the others decode."""
        names = self.adapters(ranks)
        vocab = self.engine.model_config.vocab_size
        ids = lambda n: self.rng.integers(4, vocab, n).tolist()  # noqa: E731
        paths = ["base" if n is None else "device" for n in names]
        n_dec = {"prefill": 0, "decode": len(names), "mixed": len(names) - 1}[phase]
        # Decodes: `context` tokens cached; the newest generated token sits at position `context`.
        reqs = [_request(i, ids(max(context, 1)), n, ids(1)) for i, n in enumerate(names[:n_dec])]
        chunks = [SeqChunk(r, r.num_tokens - 1, 1, p, samples=True) for r, p in zip(reqs, paths)]
        for i in range(n_dec, len(names)):  # prompt chunks of `tokens` at offset `context`
            reqs.append(_request(i, ids(context + tokens), names[i], []))
            chunks.append(SeqChunk(reqs[-1], context, tokens, paths[i], samples=True))
        runner = self.engine.runner
        # Request i owns its own pages (owner i of the engine's allocator), as many as the
        # step's longest sequence needs.
        need = runner.layout.pages_for(max(r.num_tokens for r in reqs))
        tables = {r: self._pages(i, need) for i, r in enumerate(reqs)}
        plan = Schedule(tuple(chunks))
        # `run` returns host ints (it syncs on the sampled tokens); the cache is the rest of the step.
        return lambda: (runner.run(plan, tables.__getitem__, {}), runner.cache)[1]


def engine_config(grid: ProfileGrid, model_config: ModelConfig, dtype: str, impl: str, kernel: str,
                  page_rank: int = 16) -> EngineConfig:
    """An engine sized for the grid: sequences and a KV-cache row's worth of pages for each
    request of the largest step (the largest batch, plus the chunk's request of a mixed step),
    prefill chunks as long as the longest, and device pages for one max-rank adapter per request
    (plus the one `_Session` keeps registered)."""
    max_b, max_t = max(grid.batch_sizes), grid.max_chunk
    seqs = max_b + (1 if grid.mixed_tokens else 0)
    r_max = -(-grid.max_rank // page_rank) * page_rank
    # As EngineConfig.lora_budget_bytes, but for seqs adapters of the largest rank rather than 8.
    per_rank = sum(sum(model_config.projection_shape(m)) for m in TARGET_MODULES)
    itemsize = np.dtype(jax.numpy.dtype(dtype)).itemsize
    budget = (seqs * r_max + page_rank) * per_rank * model_config.num_layers * itemsize
    return EngineConfig(dtype=dtype, max_seq_len=grid.seq_len, max_batch_size=seqs,
                        prefill_chunk=max_t, max_prefill_tokens=max_b * max_t, max_lora_rank=r_max,
                        lora_page_rank=page_rank, max_loras=max(64, seqs + 1),
                        device_lora_budget_bytes=budget, cold_start="wait", lora_impl=impl,
                        lora_kernel=kernel)


def measure_loads(engine: Engine, ranks: tuple[int, ...], repeats: int) -> list[dict]:
    """Median seconds of `pool.load_now` per rank (host page layout + device_put + install), from
    the host tier each time (unregister + register between loads); one warm-up load per rank.
    Each adapter is registered for its own load only (one at a time in the pool)."""
    pool, rows = engine.pool, []
    for r in ranks:
        adapter = random_adapter(f"{TEMP_PREFIX}load-r{r}", engine.model_config, r, seed=r)
        staged = pool.stage_host(adapter)
        times = []
        for k in range(1 + repeats):
            pool.register(adapter, staged=staged)
            try:
                t0 = time.perf_counter()
                pool.load_now(adapter.name)
                jax.block_until_ready(pool.weights)
                if k:  # the first load compiles the install for this page count
                    times.append(time.perf_counter() - t0)
            except PoolFullError:  # see `_measure`: a serving pool taken meanwhile
                break
            finally:
                pool.unregister(adapter.name)
        if len(times) < repeats:
            continue
        pages = -(-r // pool.page_rank)
        rows.append({"rank": r, "pages": pages, "bytes": pages * pool.page_bytes,
                     "seconds": statistics.median(times), "repeats": times})
    return rows


def host_info() -> dict[str, Any]:
    """The host a measurement ran on: core count, CPU model (from /proc/cpuinfo where there is
    one), platform and Python. Shared with `carajax replay`'s provenance."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu, "platform": platform.platform(),
            "python": platform.python_version()}


Point = tuple[str, str, int, int, int]  # (phase, mix, batch size, chunk tokens, context)


def _measure(session: _Session, grid: ProfileGrid, kernel: str, seed: int, tick,
             points: list[Point] | None = None) -> list[dict]:
    """The rows of every grid point (or of `points`) on one engine (one kernel mode)."""
    impl, rows = session.engine.runner.lora_impl, []
    points = grid.points() if points is None else points
    for mix in grid.rank_mixes:  # one mix at a time: its adapters (one per request) fit the pool
        group = [p for p in points if p[1] == mix]
        if not group:
            continue
        # A mixed step's chunk comes from one more request, with the mix's next rank.
        ranks = [mix_ranks(mix, b + (ph == "mixed")) for ph, _, b, _, _ in group]
        try:
            fns = [session.step(ph, r, t, c) for (ph, _, _, t, c), r in zip(group, ranks)]
        except PoolFullError:
            # A serving engine's pool, taken meanwhile by a submitter's prefetch (requests sent
            # before SERVING): this mix is skipped rather than the worker's start failed.
            session.end_mix()
            continue
        for (phase, _, b, t, c), r, times in zip(group, ranks, time_interleaved(
                fns, grid.warmup, grid.repeats, seed, tick)):
            times = [round(x, 7) for x in times]  # 0.1 us: far below the noise
            # Tokens computed and KV positions read: a chunk reads its start + its length, a
            # decode its context + the newest token (the cost model's Batch conventions).
            tokens, context = {"prefill": (b * t, b * (c + t)), "decode": (b, b * (max(c, 1) + 1)),
                               "mixed": (b + t, b * (max(c, 1) + 1) + c + t)}[phase]
            # The flattened step's padded token count (one forward over every token).
            shape = [session.engine.runner.token_bucket(tokens, phase == "decode")]
            rows.append({"phase": phase, "kernel": kernel, "impl": impl, "mix": mix, "batch_size": b,
                         "ranks": list(r), "chunk": t, "tokens": tokens,
                         "context_per_request": c, "context": context, "padded_shape": shape,
                         "seconds": statistics.median(times), "repeats": times})
        session.end_mix()
    return rows


def _notes(impl: str, seq_len: int, r_max: int, kv_heads: int) -> list[str]:
    notes = [
        "seconds: median of `repeats` timed ModelRunner.run(Schedule) calls (forward + sampling, "
        "jax.block_until_ready), after `warmup` untimed calls that include compilation; timed "
        "calls interleave the points of one rank mix in shuffled rounds.",
        "Every request has its own adapter (all seven projections); rank-0 rows are base-model "
        "rows, which still run the LoRA variant, as the engine does once adapters are registered; "
        "that variant skips each projection no sequence's adapter has (lax.cond), so a step of "
        "base rows only does no LoRA work.",
        "mixed rows: batch_size decodes (context_per_request cached each) plus one prefill chunk "
        "of `chunk` prompt tokens at offset context_per_request from one more request (the last "
        "of `ranks`), run as one Schedule, decodes first: the engine's fused step.",
        f"Attention walks each query block's KV pages (head-major pages) in chunks (of "
        f"{decode_chunk_pages(kv_heads)} on decode-only steps, {KV_CHUNK_PAGES} with "
        f"prefill chunks) and skips the chunks past the step's longest context, so a step's "
        f"attention cost follows the longest context it reads, not the KV capacity "
        f"(seq_len {seq_len}).",
        "load_time: pool.load_now from the host tier (host page layout + jax.device_put + "
        "install), median of load_repeats after one warm-up load per rank.",
    ]
    if impl == "reference":
        notes.append(
            "lora_impl=reference (jnp): it ignores lora_kernel; its work follows the ranks of the "
            "adapters a step uses (never the pool's max_lora_rank "
            f"{r_max}): a step of up to 4 padded tokens per sequence slot (decode-like) gathers the "
            "step's distinct adapters' pages, their count rounded up to a power of 4, for two "
            "GEMMs over all its tokens (jnp_ops.sgmv_compact); a longer step runs that form or "
            "blocks of 64 tokens of one sequence each (ceil(T / 64) + max_batch_size blocks), each "
            "at the step's largest page count rounded up to a power of two (jnp_ops.sgmv_blocked), "
            "whichever costs less for its adapters (jnp_ops.prefill_uses_compact). Only "
            "one kernel mode was profiled, labelled 'padded'. Profile with --impl "
            "interpret/pallas to compare the kernels.")
    if jax.devices()[0].platform == "cpu":
        notes.append("On CPU jax.device_put is a host memcpy: load_time is not a PCIe transfer.")
    return notes


def _metadata(mcfg: ModelConfig, *, t0: float, load_before, dtype: str, lora_impl: str, impl: str,
              kernels, seq_len: int, cfg: EngineConfig, seed: int, grid: ProfileGrid) -> dict:
    dev = jax.devices()[0]
    return {
        "device": {"platform": dev.platform, "device_kind": dev.device_kind,
                   "count": jax.device_count()},
        "host": {**host_info(), "loadavg_1_5_15_before": load_before,
                 "loadavg_1_5_15_after": os.getloadavg()},
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "model_name": mcfg.name, "model_config": dataclasses.asdict(mcfg),
        "model_params": mcfg.num_params(), "dtype": dtype, "lora_impl_requested": lora_impl,
        "lora_impl": impl, "kernels_profiled": list(kernels), "seq_len": seq_len,
        "lora_page_rank": cfg.lora_page_rank, "max_lora_rank": cfg.max_lora_rank, "seed": seed,
        "grid": dataclasses.asdict(grid), "notes": _notes(impl, seq_len, cfg.max_lora_rank,
                                                        mcfg.num_kv_heads),
    }


def profile(model: str = "llama-test", grid: ProfileGrid = GRIDS["quick"], *, dtype: str = "float32",
            lora_impl: str = "auto", seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Time real engine steps and adapter loads for `model` (a preset name, random weights, or a
    local HF checkpoint dir) over `grid`; returns the profile document (see `save_profile`).
    It builds the model and an engine sized for the grid (`carajax profile`); to profile an
    engine that already holds the model (a serving worker), use `profile_engine`.

    With the jnp references (CPU, `lora_impl` "auto"/"reference") the kernel mode changes nothing,
    so only one mode is profiled and labelled "padded" (the references pad every slot to the
    pool's max rank, further than the batch's max): see the document's `metadata.notes`."""
    from tqdm.auto import tqdm

    t0, load_before = time.monotonic(), os.getloadavg()
    impl = resolve_lora_impl(lora_impl)
    kernels = grid.kernels
    if impl == "reference":
        kernels = ("padded",) if "padded" in kernels else kernels[:1]
    jdtype = jax.numpy.dtype(dtype)
    llama, _ = hub.load(model, dtype=jdtype, seed=seed)  # a checkpoint, GGUF, pulled model or preset
    mcfg = llama.config
    rows: list[dict] = []
    loads: list[dict] = []
    cache: dict[str, LoraAdapter] = {}  # host adapters, shared by the engines of each kernel mode
    calls = len(grid.points()) * len(kernels) * (grid.warmup + grid.repeats) + 1
    bar = tqdm(total=calls, desc=f"profile {mcfg.name}", disable=not progress)
    for kernel in kernels:
        cfg = engine_config(grid, mcfg, dtype, impl, kernel)
        with Engine(llama, None, cfg) as engine:
            seq_len = engine.runner.seq_len
            if seq_len < max(grid.contexts) + grid.max_chunk:
                raise ValueError(f"the grid's longest prefill ends past the KV-cache row ({seq_len} "
                                 f"tokens for {mcfg.name}); lower contexts or prompt_tokens")
            if not loads:
                loads = measure_loads(engine, grid.load_ranks, grid.load_repeats)
                bar.update(1)
            session = _Session(engine, cache, seed)
            try:
                rows += _measure(session, grid, kernel, seed, lambda: bar.update(1))
            finally:
                session.close()
    bar.close()
    meta = _metadata(mcfg, t0=t0, load_before=load_before, dtype=dtype, lora_impl=lora_impl,
                     impl=impl, kernels=kernels, seq_len=seq_len, cfg=cfg, seed=seed, grid=grid)
    return {"format": FORMAT, "metadata": meta, "measurements": rows, "load_time": loads}


# -- profiling a serving engine in place ------------------------------------------------------
@contextlib.contextmanager
def exclusive(engine: Engine, poll_s: float = 0.01):
    """Hold `engine`'s lock while it is idle (no request queued or running, no step in flight):
    its loop thread runs no step meanwhile, and `submit` waits at the lock (its requests run
    after). Waits for a background engine to go idle; an engine driven by `step()` must be idle
    already. (Engine has no public hook for this yet: it reads `_lock` and `_inflight`.)"""
    lock = engine._lock
    while True:
        lock.acquire()
        if engine._closed:
            lock.release()
            raise RuntimeError("the engine is closed")
        if not engine.planner.has_work and engine._inflight is None:
            break
        lock.release()
        if not engine.background:
            raise RuntimeError("profile an idle engine: it has requests queued or running")
        time.sleep(poll_s)
    try:
        yield engine
    finally:
        lock.release()


def _temp_host_bytes(pool: AdapterPool, config: ModelConfig, rank: int) -> int:
    """Host bytes one of the profile's rank-`rank` adapters counts in the pool's host budget
    (`AdapterPool.host_bytes`: its staged pages in the pool's dtype, its ranks and scales)."""
    per_rank = config.num_layers * sum(sum(config.projection_shape(m)) for m in TARGET_MODULES)
    padded = math.ceil(rank / pool.page_rank) * pool.page_rank
    return padded * per_rank * pool.dtype.itemsize + 2 * 4 * len(TARGET_MODULES) * config.num_layers


def fitted_points(grid: ProfileGrid, engine: Engine) -> tuple[list[Point], tuple[int, ...]]:
    """The grid's points (and load ranks) that `engine` can run as it is configured, within its
    budgets: at most `max_batch_size` sequences, `max_step_tokens` tokens a step, chunks within
    `prefill_chunk` and `max_prefill_tokens`, sequences within its KV-cache row, KV pages from
    its free pages, and adapters of ranks up to `max_lora_rank` whose pages, slots and host bytes
    fit beside the engine's pinned, in-use, wanted and loading adapters (those the profile cannot
    evict; others it may, and `profile_engine` loads them back). Call it idle, under `exclusive`."""
    cfg, runner, pool, mcfg = engine.config, engine.runner, engine.pool, engine.model_config
    st = pool.stats()
    held = set(st["pinned"]) | set(st["in_use"]) | set(st["wanted"])
    held = (held & set(st["on_device"])) | set(st["loading"])
    pages_of = lambda r: math.ceil(r / pool.page_rank) if r else 0  # noqa: E731
    avail_pages = st["pages_total"] - sum(pages_of(pool.adapter(n).rank) for n in held)
    avail_slots = st["slots_total"] - len(held)
    host_room = (math.inf if st["host_budget_bytes"] is None
                 else st["host_budget_bytes"] - st["host_bytes_used"])
    keep = cfg.lora_page_rank  # `_Session` keeps one adapter of this rank registered throughout

    def adapters_fit(ranks: list[int]) -> bool:
        ranks = [r for r in ranks if r]
        return (all(r <= pool.max_lora_rank for r in ranks)
                and sum(map(pages_of, ranks)) <= avail_pages
                and len(ranks) <= avail_slots
                and sum(_temp_host_bytes(pool, mcfg, r) for r in ranks) <= host_room)

    def longest(phase: str, t: int, c: int) -> int:  # tokens of the step's longest sequence
        return {"prefill": c + t, "decode": max(c, 1) + 1, "mixed": max(c + t, max(c, 1) + 1)}[phase]

    kept = []
    for phase, mix, b, t, c in grid.points():
        n = b + (phase == "mixed")
        tokens = {"prefill": b * t, "decode": b, "mixed": b + t}[phase]
        prefill = {"prefill": b * t, "decode": 0, "mixed": t}[phase]
        if (n <= cfg.max_batch_size and tokens <= cfg.max_step_tokens
                and (phase == "decode" or t <= cfg.prefill_chunk)
                and prefill <= cfg.max_prefill_tokens
                and longest(phase, t, c) <= runner.seq_len
                and adapters_fit([keep, *mix_ranks(mix, n)])):
            kept.append((phase, mix, b, t, c))

    # KV pages: request i's owner holds the most any kept point gives request i (`_Session`).
    def kv_pages(points: list[Point]) -> int:
        need: dict[int, int] = {}
        for phase, _, b, t, c in points:
            p = runner.layout.pages_for(longest(phase, t, c))
            for i in range(b + (phase == "mixed")):
                need[i] = max(need.get(i, 0), p)
        return sum(need.values())

    free = engine.planner.pages.num_free
    while kept and kv_pages(kept) > free:  # drop the hungriest point until the rest fit
        kept.remove(max(kept, key=lambda p: (p[2] + (p[0] == "mixed"))
                        * runner.layout.pages_for(longest(p[0], p[3], p[4]))))
    loads = tuple(r for r in grid.load_ranks if adapters_fit([r]))
    return kept, loads


def profile_engine(engine: Engine, grid: ProfileGrid = GRIDS["quick"], *, seed: int = 0,
                   progress: bool = False) -> dict[str, Any]:
    """Profile `engine` itself, in place: its own runner (parameters, KV cache, compiled steps),
    adapter pool and page allocator; no model or engine is built, so the weights are held once.
    Measures the points of `grid` that fit the engine's configuration and budgets
    (`fitted_points`) in the one kernel mode it runs, and the load time of the load ranks that
    fit. Returns the profile document (`save_profile`, `fit_profile`).

    It runs under `exclusive` (the engine idle, its loop thread held off: requests submitted
    meanwhile wait and run afterwards) and leaves the engine as it found it: the profile's
    temporary adapters (under `TEMP_PREFIX`, registered in the pool only, within its device
    budget: pages and slots that pinned, in-use, wanted or loading adapters hold are never
    taken, and within its host budget) are removed, its KV pages freed, adapters of the
    engine's that it evicted loaded back, and the pool's copy-time record restored."""
    from tqdm.auto import tqdm

    t0, load_before = time.monotonic(), os.getloadavg()
    runner, pool, cfg = engine.runner, engine.pool, engine.config
    impl = runner.lora_impl
    # The references ignore the kernel mode and pad every slot: labelled "padded" (`_notes`).
    kernel = "padded" if impl == "reference" else cfg.lora_kernel
    with exclusive(engine):
        points, load_ranks = fitted_points(grid, engine)
        if not points:
            raise ValueError(f"no point of the profile grid fits this engine (max_batch_size "
                             f"{cfg.max_batch_size}, max_step_tokens {cfg.max_step_tokens}, "
                             f"KV-cache row {runner.seq_len} tokens, adapter pool "
                             f"{pool.stats()['pages_total']} pages)")
        resident = list(pool.stats()["on_device"])  # the engine's own adapters on the device
        copies = list(pool.copies)
        calls = len(points) * (grid.warmup + grid.repeats) + 1
        bar = tqdm(total=calls, desc=f"profile {engine.model_config.name}", disable=not progress)
        session = None
        try:
            loads = measure_loads(engine, load_ranks, grid.load_repeats)
            bar.update(1)
            session = _Session(engine, {}, seed)
            rows = _measure(session, grid, kernel, seed, lambda: bar.update(1), points)
            if not rows:
                raise RuntimeError("the adapter pool was taken while profiling (requests sent "
                                   "before the worker reported SERVING); no step was measured")
        finally:
            bar.close()
            if session is not None:
                session.close()
            for name in resident:  # evicted by the profile's adapters: back where they were
                if pool.where(name) in ("host", "disk"):
                    pool.load_now(name)
            pool.copies.clear()
            pool.copies.extend(copies)
    meta = _metadata(engine.model_config, t0=t0, load_before=load_before, dtype=cfg.dtype,
                     lora_impl=cfg.lora_impl, impl=impl, kernels=(kernel,), seq_len=runner.seq_len,
                     cfg=cfg, seed=seed, grid=grid)
    meta["engine"] = {"in_place": True, "max_batch_size": cfg.max_batch_size,
                      "max_step_tokens": cfg.max_step_tokens, "kv_pages": runner.layout.num_pages,
                      "adapter_pages": pool.num_pages, "points": len(points),
                      "points_skipped": len(grid.points()) - len(points)}
    meta["notes"].append(
        "Profiled in place on a serving engine (carajax serve --cost-model auto): its own "
        "runner, KV cache and adapter pool; grid points that do not fit its configuration or "
        "budgets were skipped (metadata.engine).")
    return {"format": FORMAT, "metadata": meta, "measurements": rows, "load_time": loads}


def save_profile(doc: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a profile document as JSON: metadata indented, one measurement per line (diffable
    and a fraction of the size of indenting every repeat)."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    head = json.dumps({k: v for k, v in doc.items() if k != "measurements"}, indent=1)
    rows = ",\n".join("  " + json.dumps(r) for r in doc["measurements"])
    with open(path, "w") as f:
        f.write(f'{head[:-2]},\n "measurements": [\n{rows}\n ]\n}}\n')


def load_profile(path: str | os.PathLike) -> dict[str, Any]:
    """Read a document written by `save_profile`."""
    with open(path) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} document (format={doc.get('format')!r})")
    return doc


def device_label(meta: Mapping[str, Any]) -> str:
    d, h = meta["device"], meta["host"]
    return f"{d['platform']}: {d['device_kind']} ({h['cpu_model']}, {h['cpu_count']} host CPUs)"


def fit_profile(doc: Mapping[str, Any], form: str = "rich", kernel: str | None = None,
                step_form: str | None = None) -> cm.CostModel:
    """Fit a CostModel of `form` to a profile's rows of one kernel (default: the first profiled),
    with provenance metadata and the measured load-time table; its step model in `step_form`
    (default: `form`)."""
    meta = doc["metadata"]
    kernel = kernel or meta["kernels_profiled"][0]
    loads = doc.get("load_time", [])
    # Loads move whole pages: bytes per unit of page capacity, not per rank (rank 8 moves a
    # 16-rank page), so that `load_seconds(nbytes=...)` prices bytes as the pool moves them.
    per_rank = [row["bytes"] / (row["pages"] * meta["lora_page_rank"]) for row in loads]
    step = f" (step model: {step_form})" if step_form not in (None, form) else ""
    notes = " ".join([f"form={form}{step}, kernel={kernel}, lora_impl={meta['lora_impl']}, "
                      f"dtype={meta['dtype']}, jax {meta['jax_version']}, "
                      f"{len(doc['measurements'])} measured steps."] + meta["notes"])
    return cm.fit_cost_model(
        doc["measurements"], form=form, kernel=kernel, step_form=step_form,
        source="profiled by carajax profile",
        device=device_label(meta), model_name=meta["model_name"], date=meta["date"], notes=notes,
        load_time=tuple((row["rank"], row["seconds"]) for row in loads),
        load_bytes_per_rank=float(np.mean(per_rank)) if per_rank else None)


def report(doc: Mapping[str, Any], forms: tuple[str, ...] = tuple(cm.FORMS), seed: int = 0) -> dict:
    """{kernel: {form: {phase: {r2, mape, n_train, n_test}}}}: held-out (20%) fit quality."""
    rows = doc["measurements"]
    return {k: {f: cm.fit_report(rows, form=f, seed=seed, kernel=k) for f in forms}
            for k in doc["metadata"]["kernels_profiled"]}


def format_report(rep: Mapping[str, Any]) -> str:
    """A plain-text table of `report`'s R^2 and MAPE."""
    lines = [f"{'kernel':<9} {'form':<9} {'phase':<8} {'R2':>7} {'MAPE %':>7} {'train':>6} {'test':>5}"]
    lines.append("-" * len(lines[0]))
    for kernel, forms in rep.items():
        for form, phases in forms.items():
            for phase, m in phases.items():
                lines.append(f"{kernel:<9} {form:<9} {phase:<8} {m['r2']:>7.3f} "
                             f"{100 * m['mape']:>7.1f} {m['n_train']:>6} {m['n_test']:>5}")
    return "\n".join(lines)


def plot_profile(doc: Mapping[str, Any], model: cm.CostModel, path: str | os.PathLike) -> bool:
    """Predicted vs measured (log-log, y = x) for prefill and decode, points coloured by rank mix,
    and, when the model has one, the fused step model on every row, coloured by phase; False
    (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in doc["measurements"] if r["kernel"] == model.kernel]
    panels = [(phase, getattr(model, phase), [r for r in rows if r["phase"] == phase], "mix")
              for phase in cm.PHASES]
    if model.step is not None:
        panels.append(("step", model.step, rows, "phase"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2))
    for ax, (name, form, sub, colour) in zip(axes, panels):
        batches = [cm.Batch(tuple(r["ranks"]), r["tokens"], r["context"]) for r in sub]
        y = np.array([r["seconds"] for r in sub]) * 1e3
        pred = form.predict_many(batches) * 1e3
        for key in dict.fromkeys(r[colour] for r in sub):
            keep = np.array([r[colour] == key for r in sub])
            ax.scatter(y[keep], pred[keep], s=10, alpha=0.7, label=key)
        lo, hi = min(y.min(), pred.min()), max(y.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        m = cm.evaluate(form, batches, y / 1e3)
        ax.set(xscale="log", yscale="log", xlabel="measured (ms)", ylabel="predicted (ms)",
               title=f"{name}: R2={m['r2']:.3f}, MAPE={100 * m['mape']:.1f}% ({len(sub)} rows)")
        ax.legend(fontsize=7)
    meta = doc["metadata"]
    forms = model.prefill.name + (f" (step: {model.step.name})" if model.step is not None
                                  and model.step.name != model.prefill.name else "")
    fig.suptitle(f"{meta['model_name']} on {meta['device']['device_kind']}, {forms} form, "
                 f"kernel {model.kernel} ({meta['lora_impl']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
