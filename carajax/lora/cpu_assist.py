"""CPU-assisted prefill (CaraServe section 4): LoRA deltas of cold adapters computed on the host.

While a request's adapter is still being copied to the accelerator ("cold"), its prefill runs
anyway: the base projections run on the accelerator and, at each LoRA target projection, a host
callback hands that request's activation rows to the CPU, which returns `scale * (x A^T) B^T`
computed from the adapter's host weights (views of the host tier's one copy of it,
`carajax.lora.pages.module_views`). The two are added in the model's hook.

Two pieces:
- `CpuLoraWorker` computes deltas on the JAX CPU backend, slicing the tokens over a thread pool
  (JAX releases the GIL while it executes, so threads run in parallel). How many threads a call
  gets follows CaraServe's profiling-guided parallelism: `profile` measures c, the tokens one
  core handles within the accelerator's time for a projection, and a call with N tokens uses
  ceil(N / c) threads, so the CPU finishes about when the accelerator does, without taking
  cores it does not need.
- `CpuAssistBridge` is the callback: `bridge.delta(...)` is called inside the jitted step and
  returns the delta of every cold row (zeros elsewhere). Adapters are named by small integer
  ids passed to the step as data, so a new cold adapter does not recompile the step.

The callback never raises into XLA: a failed execution could invalidate donated buffers such as
the KV cache. Failures are recorded per cold id (`take_errors`) and those rows get zeros; the
engine fails those requests and keeps serving.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
import statistics
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from carajax.config import ModelConfig
from carajax.lora.adapter import LoraAdapter, LoraModule

# Slice lengths are padded to a bucket so the CPU function compiles for few shapes: 2^k and
# 3 * 2^(k-1) (8, 12, 16, 24, 32, 48, ...) waste at most a third of a slice, where powers of two
# alone would waste up to half (e.g. 300 tokens over 2 threads: 150 -> 256 vs 192).
MIN_BUCKET = 8
MAX_BUCKET = 4096  # longer slices are cut into pieces of at most this many tokens
_ALIGN = 64  # bytes; XLA:CPU aliases (does not copy) numpy buffers aligned like this


# Below this many multiply-adds a job runs in numpy on the calling thread: dispatching a jitted
# JAX CPU computation costs ~0.3-0.4 ms here, far more than a tiny LoRA product (~0.05 ms).
SMALL_JOB_FLOPS = 1 << 20


def bucket(n: int) -> int:
    """The padded length of an n-token slice: the smallest of 8, 12, 16, 24, 32, 48, ... >= n."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    p = 1 << (n - 1).bit_length()  # smallest power of two >= n
    return 3 * p // 4 if 3 * p // 4 >= n else p


def _aligned_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Zeros in a 64-byte aligned buffer, so `jax.device_put` to the CPU aliases it for free."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.zeros(n + _ALIGN, np.uint8)
    off = -raw.ctypes.data % _ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


@jax.jit
def _lora_cpu(x, a, b, scale):
    """scale * (x @ a.T) @ b.T in float32; x [n, d_in], a [r, d_in], b [d_out, r] -> [n, d_out]."""
    hp = jax.lax.Precision.HIGHEST
    xa = jnp.dot(x, a.T, precision=hp, preferred_element_type=jnp.float32)  # [n, r]
    return scale * jnp.dot(xa, b.T, precision=hp, preferred_element_type=jnp.float32)


def _check_job(x: np.ndarray, module: LoraModule) -> None:
    a, b = np.shape(module.a), np.shape(module.b)
    if x.ndim != 2 or len(a) != 2 or len(b) != 2 or a[1] != x.shape[1] or b[1] != a[0]:
        raise ValueError(f"LoRA shapes do not fit: x {x.shape}, a {a} (want [r, {x.shape[-1]}]), "
                         f"b {b} (want [d_out, r])")


class CpuLoraWorker:
    """LoRA deltas on the JAX CPU backend, token slices spread over a thread pool.

    Thread-safe: several threads may call `delta`/`delta_many` at once (they share the pool).
    The calling thread computes one slice itself, so a one-thread call never touches the pool.
    Host weights are copied to CPU-backend arrays once and kept in an LRU cache of at most
    `weight_cache_bytes` (`evict` drops a module's entry early).
    """

    def __init__(self, *, max_threads: int | None = None, tokens_per_core: float | None = None,
                 weight_cache_bytes: int = 512 << 20):
        """max_threads: cores the worker may use (default: all, `os.cpu_count()`).
        tokens_per_core: c, tokens one core handles within the accelerator's time for one
        projection (None until `profile` sets it: then every call uses `max_threads`)."""
        self.max_threads = max_threads or os.cpu_count() or 1
        if self.max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {self.max_threads}")
        if tokens_per_core is not None and tokens_per_core <= 0:
            raise ValueError(f"tokens_per_core must be positive, got {tokens_per_core}")
        self.tokens_per_core = tokens_per_core
        self.weight_cache_bytes = weight_cache_bytes
        self.device = jax.devices("cpu")[0]
        self._pool = (concurrent.futures.ThreadPoolExecutor(self.max_threads - 1,
                                                            thread_name_prefix="cpu-lora")
                      if self.max_threads > 1 else None)
        self._lock = threading.Lock()
        # id(module) -> (module, a, b, scale on the CPU device, bytes), in LRU order. Holding the
        # module keeps its id from being reused by another object while the entry exists.
        self._cache: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self._cached_bytes = 0

    # -- parallelism ---------------------------------------------------------------------------
    def threads_for(self, num_tokens: int) -> int:
        """Threads for a call with `num_tokens` tokens: ceil(num_tokens / tokens_per_core),
        at least 1 and at most `max_threads`; `max_threads` when not profiled; 0 for no tokens."""
        if num_tokens <= 0:
            return 0
        if self.tokens_per_core is None:
            return self.max_threads
        return min(self.max_threads, max(1, math.ceil(num_tokens / self.tokens_per_core)))

    def profile(self, d_in: int, d_out: int, rank: int, budget_s: float, *, repeats: int = 5,
                max_tokens: int = MAX_BUCKET) -> float:
        """Measure c: how many tokens one core handles for a [d_in -> d_out] rank-`rank`
        projection within `budget_s` (the accelerator's time for that projection).

        Times one slice on the calling thread (median of `repeats` after a warm-up) at 8, 16,
        32, ... tokens until a slice takes longer than the budget (or `max_tokens`), then
        interpolates linearly between the last two sizes (extrapolates past `max_tokens`; below
        8 tokens assumes time proportional to tokens). Stores and returns tokens_per_core.
        """
        if budget_s <= 0:
            raise ValueError(f"budget_s must be positive, got {budget_s}")
        rng = np.random.default_rng(0)
        module = LoraModule(a=rng.standard_normal((rank, d_in), np.float32),
                            b=rng.standard_normal((d_out, rank), np.float32), scale=1.0)
        weights = self._weights(module, cache=False)
        points: list[tuple[int, float]] = []  # (tokens, median seconds)
        n = MIN_BUCKET
        while n <= max_tokens:
            x = rng.standard_normal((n, d_in), np.float32)
            self._compute(x, weights)  # warm-up: compiles this bucket
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self._compute(x, weights)
                times.append(time.perf_counter() - t0)
            points.append((n, statistics.median(times)))
            if points[-1][1] > budget_s:
                break
            n *= 2
        under = [p for p in points if p[1] <= budget_s]
        if not under:  # even 8 tokens overrun the budget
            c = MIN_BUCKET * budget_s / points[0][1]
        elif len(under) < len(points):  # between the last size under and the first over
            (n0, t0), (n1, t1) = under[-1], points[len(under)]
            c = n0 + (budget_s - t0) / (t1 - t0) * (n1 - n0)
        else:  # everything up to max_tokens fits: extend the last segment's slope
            (n0, t0), (n1, t1) = (points[-2] if len(points) > 1 else (0, 0.0)), points[-1]
            per_token = (t1 - t0) / (n1 - n0) if t1 > t0 else t1 / n1
            c = n1 + (budget_s - t1) / per_token
        self.tokens_per_core = float(c)
        return self.tokens_per_core

    # -- computation -------------------------------------------------------------------------
    def delta(self, x: np.ndarray, module: LoraModule) -> np.ndarray:
        """x [N, d_in] -> float32 [N, d_out] = module.scale * (x @ a.T) @ b.T, over
        `threads_for(N)` threads. Raises what the computation raised (e.g. a shape mismatch)."""
        (result,) = self.delta_many([(x, module)])
        if isinstance(result, BaseException):
            raise result
        return result

    def delta_many(self, jobs: Sequence[tuple[np.ndarray, LoraModule]]
                   ) -> list[np.ndarray | BaseException]:
        """Several (x [N_j, d_in_j], module_j) at once; their tokens together are cut into
        `threads_for(sum N_j)` equal runs computed concurrently. Per job: the float32 delta
        [N_j, d_out_j], or the exception its computation raised (other jobs are unaffected)."""
        results: list[np.ndarray | BaseException | None] = [None] * len(jobs)
        work = []  # (job index, x [n, d_in] float32, weights)
        for j, (x, module) in enumerate(jobs):
            try:
                x = np.asarray(x)
                _check_job(x, module)
                results[j] = np.zeros((x.shape[0], np.shape(module.b)[0]), np.float32)
                if x.shape[0]:
                    # Multiply-adds of both products: n * r * d_in (x A^T) + n * r * d_out (.. B^T).
                    flops = x.shape[0] * module.rank * (x.shape[1] + np.shape(module.b)[0])
                    small = flops < SMALL_JOB_FLOPS
                    work.append((j, x, module if small else self._weights(module)))
            except Exception as e:  # reported per job
                results[j] = e
        total = sum(x.shape[0] for _, x, _ in work)
        lanes = self._lanes(work, self.threads_for(total))
        futures = [self._pool.submit(self._run_lane, lane, results) for lane in lanes[1:]]
        self._run_lane(lanes[0] if lanes else [], results)
        for f in futures:
            f.result()  # _run_lane catches everything; this only waits
        return results  # type: ignore[return-value]

    def evict(self, module: LoraModule) -> None:
        """Drop a module's CPU-backend copy (e.g. once its adapter is on the accelerator)."""
        with self._lock:
            self._drop(id(module))

    def close(self) -> None:
        """Stop the thread pool and drop cached weights."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0

    def __enter__(self) -> CpuLoraWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    @staticmethod
    def _lanes(work, threads: int) -> list[list[tuple]]:
        """Cut the concatenated tokens of `work` into `threads` runs of about equal length, each
        a list of pieces (job index, x slice, weights) of at most MAX_BUCKET tokens."""
        total = sum(x.shape[0] for _, x, _ in work)
        if total == 0:
            return []
        per_lane = math.ceil(total / threads)
        lanes: list[list[tuple]] = [[]]
        room = per_lane
        for j, x, w in work:
            start = 0
            while start < x.shape[0]:
                if room == 0:
                    lanes.append([])
                    room = per_lane
                end = min(x.shape[0], start + room, start + MAX_BUCKET)
                lanes[-1].append((j, start, x[start:end], w))
                room -= end - start
                start = end
        return lanes

    def _run_lane(self, lane, results) -> None:
        for j, start, x, w in lane:
            out = results[j]  # held here: another lane may swap the job's entry for its error
            if isinstance(out, BaseException):
                continue  # an earlier piece of this job failed
            try:
                out[start:start + x.shape[0]] = self._compute(x, w)
            except Exception as e:  # reported per job; the first failure is the one kept
                if not isinstance(results[j], BaseException):
                    results[j] = e

    def _compute(self, x: np.ndarray, weights) -> np.ndarray:
        """One slice on the calling thread: x [n, d_in] -> float32 [n, d_out] (padded to a bucket)."""
        if isinstance(weights, LoraModule):  # a small job: numpy, no JAX dispatch
            a, b = (np.asarray(w, np.float32) for w in (weights.a, weights.b))  # views if float32
            return (np.asarray(x, np.float32) @ a.T) @ b.T * np.float32(weights.scale)
        a, b, scale = weights
        n = x.shape[0]
        xp = _aligned_zeros((bucket(n), x.shape[1]))  # [bucket, d_in]; padding rows stay 0
        xp[:n] = x
        y = _lora_cpu(jax.device_put(xp, self.device), a, b, scale)  # [bucket, d_out]
        return np.asarray(y)[:n]

    def _weights(self, module: LoraModule, cache: bool = True):
        """(a, b, scale) of a module as CPU-backend arrays, from the LRU cache when possible."""
        key = id(module)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] is module:
                self._cache.move_to_end(key)
                return hit[1:4]
        weights = tuple(jax.device_put(_aligned_copy(v), self.device)
                        for v in (module.a, module.b, np.float32(module.scale)))
        nbytes = module.a.nbytes + module.b.nbytes
        if not cache or nbytes > self.weight_cache_bytes:
            return weights
        with self._lock:
            self._drop(key)
            self._cache[key] = (module, *weights, nbytes)
            self._cached_bytes += nbytes
            while self._cached_bytes > self.weight_cache_bytes:
                self._drop(next(iter(self._cache)))
        return weights

    def _drop(self, key: int) -> None:  # with self._lock held
        hit = self._cache.pop(key, None)
        if hit is not None:
            self._cached_bytes -= hit[-1]


def _aligned_copy(v) -> np.ndarray:
    """A float32 copy in an aligned buffer: the device_put that follows aliases it, no 2nd copy."""
    v = np.asarray(v, np.float32)
    out = _aligned_zeros(v.shape)
    out[...] = v
    return out


@dataclasses.dataclass(frozen=True)
class BridgeStats:
    """Counters of the host callback since construction (or `reset_stats`)."""

    calls: int  # callback invocations
    cold_calls: int  # invocations that had at least one cold token to compute
    tokens: int  # cold tokens whose delta was computed (summed over projections)
    host_s: float  # seconds spent inside the callback
    recent_call_s: tuple[float, ...]  # duration of each of the last 1024 invocations
    macs: int = 0  # multiply-adds of the deltas computed
    cold_host_s: float = 0.0  # seconds inside the invocations that had cold tokens

    @property
    def mean_call_us(self) -> float:
        return 1e6 * self.host_s / self.calls if self.calls else 0.0


class CpuAssistBridge:
    """The host side of CPU-assisted prefill: an id registry of cold adapters and the callback.

    Usage (the engine's step; `cold` is a static flag, so warm steps compile without callbacks):

        cid = bridge.register(adapter)                   # when a request's adapter is cold
        ...inside the jitted step, in the LoRA hook:
        y = device_delta + bridge.delta(layer, module, x, cpu_ids, row_lens)   # if cold
        # or, once per shared input: dq, dk, dv = bridge.deltas(layer, ("q_proj", ...), x, ...)
        ...after the step:
        failed = bridge.take_errors()                    # {cpu id: exception}: fail those requests
        bridge.unregister(cid)                           # once the adapter is on the accelerator

    `register`/`unregister`/`take_errors`/`stats` may be called from any thread while a step runs.
    """

    def __init__(self, worker: CpuLoraWorker, config: ModelConfig):
        self.worker = worker
        self.config = config
        self._lock = threading.Lock()
        self._adapters: dict[int, LoraAdapter] = {}
        self._next_id = 0
        self._errors: dict[int, BaseException] = {}
        self.reset_stats()

    # -- registry ----------------------------------------------------------------------------
    def register(self, adapter: LoraAdapter) -> int:
        """Make an adapter reachable from the callback; returns its id (>= 0) to put in
        `cpu_ids`. Ids are never reused, so a step still in flight with an old id can only miss
        (an error for that id), never compute with another adapter's weights."""
        with self._lock:
            cid = self._next_id
            self._next_id += 1
            self._adapters[cid] = adapter
        return cid

    def unregister(self, cid: int) -> None:
        """Forget an id (unknown ids are ignored) and drop its weights from the worker's cache.
        Call it after the last step that used the id has finished."""
        with self._lock:
            adapter = self._adapters.pop(cid, None)
        if adapter is not None:
            for module in adapter.modules.values():
                self.worker.evict(module)

    def take_errors(self) -> dict[int, BaseException]:
        """Failures since the last call, by cpu id (the rows of those ids got zeros); clears them."""
        with self._lock:
            errors, self._errors = self._errors, {}
        return errors

    def stats(self) -> BridgeStats:
        with self._lock:
            return BridgeStats(self._calls, self._cold_calls, self._tokens, self._host_s,
                               tuple(self._recent), self._macs, self._cold_host_s)

    def reset_stats(self) -> None:
        with self._lock:
            self._calls = self._cold_calls = self._tokens = self._macs = 0
            self._host_s = self._cold_host_s = 0.0
            self._recent: collections.deque[float] = collections.deque(maxlen=1024)

    # -- in jit ------------------------------------------------------------------------------
    def delta(
        self,
        layer: int | jax.Array,  # a Python int, or a traced int32 scalar (inside a scan over layers)
        module: str,  # static: the projection name, e.g. "q_proj"
        x: jax.Array,  # [B, Tq, d_in]
        cpu_ids: jax.Array,  # int32 [B]: the row's bridge id; -1: not cold (delta 0)
        row_lens: jax.Array,  # int32 [B]: valid tokens per row (the rest is padding: delta 0)
    ) -> jax.Array:  # [B, Tq, d_out], x.dtype
        """The CPU-computed LoRA delta of every cold row (call inside `jax.jit`).

            for b in range(B):
                m = adapter(cpu_ids[b]).modules.get((layer, module)) if cpu_ids[b] >= 0 else None
                y[b, :row_lens[b]] = m.scale * (x[b, :row_lens[b]] @ m.a.T) @ m.b.T if m else 0
                y[b, row_lens[b]:] = 0

        All cold rows of one call are computed together (their tokens sliced over the worker's
        threads). Under `jax.vmap` the mapped axis is folded into the rows: still one callback.
        """
        (y,) = self.deltas(layer, (module,), x, cpu_ids, row_lens)
        return y

    def deltas(self, layer: int | jax.Array, modules: Sequence[str], x: jax.Array,
               cpu_ids: jax.Array, row_lens: jax.Array) -> tuple[jax.Array, ...]:
        """`delta` of several projections that read the same x (q/k/v, or gate/up), in ONE
        callback: 4 callbacks per layer instead of 7, each worth ~0.1-0.3 ms of fixed cost.
        Returns one [B, Tq, d_out_m] array per module, in order."""
        modules = tuple(modules)
        shapes = [self.config.projection_shape(m) for m in modules]
        for m, (d_in, _) in zip(modules, shapes):
            if x.shape[-1] != d_in:
                raise ValueError(f"{m}: x has d_in {x.shape[-1]}, the model config says {d_in}")
        cpu_ids = jnp.asarray(cpu_ids, jnp.int32)
        layers = jnp.broadcast_to(jnp.asarray(layer, jnp.int32), cpu_ids.shape)
        # One int32 operand [B, 3] of (layer, id, length) per row: every callback operand costs
        # its own transfer (~50 us each measured on CPU), so the per-row scalars travel together.
        meta = jnp.stack([layers, cpu_ids, jnp.asarray(row_lens, jnp.int32)], axis=-1)
        d_outs = tuple(d_out for _, d_out in shapes)
        out = tuple(jax.ShapeDtypeStruct((*x.shape[:-1], d), x.dtype) for d in d_outs)
        # broadcast_all: under vmap the callback gets every operand with the mapped axis in
        # front and treats it as more rows; one host call instead of one per mapped element
        # ("sequential"), each of which would pay the callback's fixed cost again.
        return jax.pure_callback(functools.partial(self._host, modules, d_outs), out, meta, x,
                                 vmap_method="broadcast_all")

    # -- on the host -------------------------------------------------------------------------
    def _host(self, modules: tuple[str, ...], d_outs: tuple[int, ...], meta, x
              ) -> tuple[np.ndarray, ...]:
        """The callback: numpy in, numpy out; never raises (failures go to `take_errors`)."""
        t0 = time.perf_counter()
        x = np.asarray(x)  # [..., Tq, d_in]
        ys = tuple(np.zeros((*x.shape[:-1], d), x.dtype) for d in d_outs)  # [..., Tq, d_out]
        tokens, macs, errors, cold_ids = 0, 0, {}, []
        try:
            meta = np.asarray(meta).reshape(-1, 3)  # rows of (layer, id, length)
            cold = np.flatnonzero((meta[:, 1] >= 0) & (meta[:, 2] > 0))
            if cold.size:  # a step with no cold row returns zeros straight away
                cold_ids = sorted({int(i) for i in meta[cold, 1]})
                tokens, macs, errors = self._cold_rows(modules, meta, cold, x, ys)
        except BaseException as e:  # nothing may propagate into XLA
            for y in ys:
                y[...] = 0
            tokens = macs = 0
            errors = {cid: e for cid in cold_ids} or {-1: e}
        dt = time.perf_counter() - t0
        with self._lock:
            self._errors.update(errors)
            self._calls += 1
            self._cold_calls += bool(cold_ids)
            self._tokens += tokens
            self._host_s += dt
            self._macs += macs
            self._cold_host_s += dt if cold_ids else 0.0
            self._recent.append(dt)
        return ys

    def _cold_rows(self, modules, meta, cold, x, ys) -> tuple[int, int, dict]:
        """Fill the outputs' cold rows in place; returns (tokens computed, their multiply-adds,
        {cpu id: exception})."""
        Tq, d_in = x.shape[-2:]
        xr = x.reshape(-1, Tq, d_in)  # [rows, Tq, d_in] (a view)
        yrs = [y.reshape(-1, Tq, y.shape[-1]) for y in ys]  # views
        ids, lens = meta[:, 1], np.minimum(meta[:, 2], Tq)
        groups: dict[tuple[int, int], list[int]] = {}  # (layer, id) -> rows
        for row in cold:
            groups.setdefault((int(meta[row, 0]), int(ids[row])), []).append(int(row))
        with self._lock:
            adapters = {cid: self._adapters.get(cid) for _, cid in groups}
        errors, jobs, targets = {}, [], []  # targets: (output index, cid, rows) per job
        for (layer, cid), rows in groups.items():
            try:
                adapter = adapters[cid]
                if adapter is None:
                    raise KeyError(f"cpu id {cid} is not registered (unregistered mid-step?)")
                found = [(i, adapter.modules.get((layer, name))) for i, name in enumerate(modules)]
                found = [(i, m) for i, m in found if m is not None]  # absent: delta 0
                for i, m in found:
                    if np.shape(m.b)[0] != ys[i].shape[-1]:
                        raise ValueError(f"{adapter.name} layer {layer} {modules[i]}: lora_B is "
                                         f"{np.shape(m.b)}, the model needs [{ys[i].shape[-1]}, r]")
                if found:
                    xs = np.concatenate([xr[r, :lens[r]] for r in rows])  # [n, d_in]
                    jobs += [(xs, m) for _, m in found]
                    targets += [(i, cid, rows) for i, _ in found]
            except Exception as e:  # reported per cold id
                errors[cid] = e
        done = []  # (cid, rows) computed
        for (i, cid, rows), res in zip(targets, self.worker.delta_many(jobs)):
            if isinstance(res, BaseException):
                errors[cid] = res
                continue
            start = 0
            for r in rows:
                yrs[i][r, :lens[r]] = res[start:start + lens[r]]
                start += lens[r]
            done.append((cid, rows))
        for cid in errors:  # every row of a failed id is zero, even those computed fine
            for yr in yrs:
                yr[ids == cid] = 0
        tokens = sum(int(lens[rows].sum()) for cid, rows in done if cid not in errors)
        macs = sum(xs.shape[0] * m.rank * (xs.shape[1] + np.shape(m.b)[0])
                   for (xs, m), (_, cid, _) in zip(jobs, targets) if cid not in errors)
        return tokens, macs, errors
