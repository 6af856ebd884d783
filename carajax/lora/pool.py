"""The tiered adapter pool: every adapter in host memory, a byte-budgeted page pool on the device.

CaraServe / S-LoRA style. Registered adapters live on the host as parsed `LoraAdapter`s (numpy).
The device side is a pool of *pages* sized in bytes, so an adapter costs what it weighs: a page
holds `page_rank` rank rows of all seven target projections in every layer, and an adapter of
rank r takes ceil(r / page_rank) pages (a fixed count of r_max-padded slots wastes memory on small
ranks and caps how many adapters fit whatever their size). Slots are rows of a page table:
cheap metadata, `max_slots` of them. The kernels read pages through that table
(`carajax.lora.kernels`, `page_table=`).

A copy moves only the projections the adapter targets (an attention-only adapter is 45% of a
seven-projection page), as one flat buffer: one `jax.device_put` (the real host-to-device copy on
a GPU), staged on a background loader thread, or on the caller's (`prefetch(here=True)`: a
request's submitter). The engine thread installs finished copies into the pool arrays in `poll`
(non-blocking) or `load_now` (blocking) with a jitted scatter that donates the pool, so all
mutation of device arrays happens on the engine thread, never while a step holds them. A page's
untargeted projections keep what they held; the slot's rank and scale there are 0, so no
kernel reads them.

On machines without an accelerator `device_put` is near-instant, so `emulated_link_gbps` delays
each copy's readiness to what a PCIe link of that bandwidth would take; copies share one link.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from carajax.config import TARGET_MODULES, ModelConfig
from carajax.lora.adapter import AdapterError, LoraAdapter


class PoolFullError(RuntimeError):
    """The device pool cannot take an adapter now: pinned, in-use and loading adapters hold the
    pages or slots it needs."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedLoraWeights:
    """The device page pool of every target projection, as the jitted step receives it.

    Slot s at layer l of module m: rank `ranks[m][l, s]` (0: no LoRA there), scale
    `scales[m][l, s]`, rank rows [k * page_rank, (k + 1) * page_rank) in page `page_table[s, k]`.
    """

    a: dict[str, jax.Array]  # module -> [L, P, page_rank, d_in]
    b: dict[str, jax.Array]  # module -> [L, P, d_out, page_rank]
    page_table: jax.Array  # int32 [S, r_max // page_rank]
    ranks: dict[str, jax.Array]  # module -> int32 [L, S] (0 = slot unused at that layer)
    scales: dict[str, jax.Array]  # module -> float32 [L, S]
    # Tensor parallel: the mesh the pages are sharded over (`carajax.parallel.lora_shardings`),
    # so the LoRA hook runs its kernels per shard; None: one device. Static (in the tree
    # structure, so in jit cache keys).
    mesh: jax.sharding.Mesh | None = dataclasses.field(default=None, metadata=dict(static=True))


def host_pages(adapter: LoraAdapter, config: ModelConfig, module: str, n_pages: int,
               page_rank: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One projection of an adapter in page shape, as the loader copies it.

    Returns a [L, n_pages, page_rank, d_in], b [L, n_pages, d_out, page_rank], ranks int32 [L],
    scales float32 [L]; rows past the rank (and untouched layers) are zero, as in `stacked`.
    """
    a, b, ranks, scales = adapter.stacked(config, module, n_pages * page_rank, dtype)
    L, _, d_in = a.shape
    d_out = b.shape[1]
    a = a.reshape(L, n_pages, page_rank, d_in)
    b = np.ascontiguousarray(b.reshape(L, d_out, n_pages, page_rank).transpose(0, 2, 1, 3))
    return a, b, ranks, scales


MODULE_ORDER = tuple(sorted(TARGET_MODULES))  # jax flattens dicts by sorted key: staging agrees


def _scatter(w: PagedLoraWeights, slot, pages, table_row, a, b, ranks, scales) -> PagedLoraWeights:
    """Staged pages into the pool and slot `slot`'s metadata. a / b hold only the projections
    the adapter targets: the others keep whatever their pages held (an evicted adapter's
    weights, finite) and are never read, as the slot's rank and scale there are 0. ranks /
    scales: [M, L] for every projection in MODULE_ORDER (two arguments, not fourteen: each
    argument is a transfer per install)."""
    return PagedLoraWeights(
        a={m: w.a[m].at[:, pages].set(a[m], unique_indices=True) if m in a else w.a[m]
           for m in w.a},  # [L, n, pr, d_in]
        b={m: w.b[m].at[:, pages].set(b[m], unique_indices=True) if m in b else w.b[m]
           for m in w.b},  # [L, n, d_out, pr]
        page_table=w.page_table.at[slot].set(table_row),
        ranks={m: w.ranks[m].at[:, slot].set(ranks[i]) for i, m in enumerate(MODULE_ORDER)},
        scales={m: w.scales[m].at[:, slot].set(scales[i]) for i, m in enumerate(MODULE_ORDER)},
        mesh=w.mesh)


@functools.partial(jax.jit, donate_argnums=0)
def _install(w: PagedLoraWeights, slot, pages, table_row, a, b, ranks, scales) -> PagedLoraWeights:
    """Scatter per-projection staged pages (the sharded pool's staging) in place (donated).
    Compiles once per (page count, targeted projections): the dicts' keys are its structure."""
    return _scatter(w, slot, pages, table_row, a, b, ranks, scales)


@functools.partial(jax.jit, donate_argnums=0, static_argnames="modules")
def _install_flat(w: PagedLoraWeights, slot, pages, table_row, flat, ranks, scales, *,
                  modules: tuple[str, ...]) -> PagedLoraWeights:
    """`_install` from one flat staged buffer: each of `modules`' A pages then B pages
    (`flat_pages`). One host-to-device copy per adapter instead of one per array (on the CPU
    backend each costs ~30 us beside a loaded engine); the split is free under jit. Compiles
    once per (page count, targeted projections)."""
    n, a, b, k = pages.shape[0], {}, {}, 0
    for m in modules:
        L, _, pr, d_in = w.a[m].shape
        d_out = w.b[m].shape[2]
        a[m] = flat[k:k + L * n * pr * d_in].reshape(L, n, pr, d_in)
        k += L * n * pr * d_in
        b[m] = flat[k:k + L * n * d_out * pr].reshape(L, n, d_out, pr)
        k += L * n * d_out * pr
    return _scatter(w, slot, pages, table_row, a, b, ranks, scales)


def staged_modules(adapter: LoraAdapter) -> tuple[str, ...]:
    """The projections whose pages cross the link for this adapter (MODULE_ORDER): the ones it
    targets. Typical adapters target q/v or the four attention projections: a copy of all
    seven would move 2-3x the bytes for pages that are never read."""
    present = set(adapter.target_modules)
    return tuple(m for m in MODULE_ORDER if m in present)


def flat_pages(adapter: LoraAdapter, config: ModelConfig, n_pages: int, page_rank: int, dtype
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An adapter as one staged buffer (`_install_flat`'s layout: its `staged_modules`) and its
    ranks int32 [M, L] and scales float32 [M, L] for every projection, M in MODULE_ORDER (0
    where it has none)."""
    staged, parts = set(staged_modules(adapter)), []
    ranks = np.zeros((len(MODULE_ORDER), config.num_layers), np.int32)
    scales = np.zeros((len(MODULE_ORDER), config.num_layers), np.float32)
    for i, m in enumerate(MODULE_ORDER):
        if m in staged:
            a, b, ranks[i], scales[i] = host_pages(adapter, config, m, n_pages, page_rank, dtype)
            parts += [a.reshape(-1), b.reshape(-1)]
    return np.concatenate(parts), ranks, scales


def _median_ms(xs: list[float]) -> float | None:
    return 1e3 * float(np.median(xs)) if xs else None


@dataclasses.dataclass(eq=False)
class _Load:
    """One host-to-device copy: reserved by `prefetch`, staged on the loader thread, installed on
    the engine thread. The loader writes `staged`/`error` before setting `done`."""

    adapter: LoraAdapter
    n_pages: int
    ready_at: float  # emulated link deadline (time.monotonic); 0: no emulation
    nbytes: int = 0  # what crosses the link (`AdapterPool.copy_bytes`)
    host: tuple | None = None  # the entry's staged copy (flat pages, ranks, scales), if any
    started: float = 0.0  # time.monotonic() when the copy was queued
    predicted_s: float = 0.0  # `copy_seconds` when it was queued
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    staged: tuple | None = None  # `AdapterPool._stage`: (device arrays, install fn, its args)
    error: BaseException | None = None
    cancelled: bool = False


@dataclasses.dataclass(eq=False)
class _Entry:
    adapter: LoraAdapter
    n_pages: int
    copy_bytes: int  # its pages of the projections it targets: what a copy moves
    host: tuple | None = None  # its staged copy (`AdapterPool.stage_host`), None when sharded
    state: str = "host"  # "host" | "loading" | "device"
    slot: int | None = None  # reserved from prefetch on
    pages: list[int] = dataclasses.field(default_factory=list)
    load: _Load | None = None
    refcount: int = 0
    wanted: int = 0  # queued requests whose copy started at submit (`want`)
    pinned: bool = False
    last_used: int = 0


class AdapterPool:
    """Host tier (every registered adapter) + device tier (a byte-budgeted page pool).

    - `num_pages = device_budget_bytes // page_bytes`; an adapter of rank r (its largest module
      rank) takes ceil(r / page_rank) pages and one of `max_slots` page-table rows. Its slot
      (`slot(name)`) is that row: what batch rows pass to the kernels, with
      `page_table=weights.page_table`. page_rank is the kernels' rank block, so on a GPU it must
      be a power of two >= 16.
    - Pages and the slot are reserved when a copy starts ("loading") and count in
      `device_bytes_used`; the slot's row, ranks and scales are written only when the copy is
      installed, so until then `weights` holds whatever that row held before. A slot is valid
      while its adapter is "device": `acquire` it for as long as requests use it. Evicted
      adapters' weights stay in place until their pages and row are reused.
    - Loading adapters are never evicted; pinned, acquired and wanted ones neither.
    - Not a general thread-safe container: bookkeeping is locked, so any thread may register,
      prefetch, acquire or read stats, but `poll`, `load_now`, `load_all` and `weights` mutate or
      hand out the donated pool arrays and belong to the one engine thread that runs the steps.
    - `emulated_link_latency_ms` applies only with `emulated_link_gbps` set.
    """

    def __init__(self, config: ModelConfig, *, dtype, max_lora_rank: int, device_budget_bytes: int,
                 host_budget_bytes: int | None = None, max_slots: int = 64, page_rank: int = 16,
                 emulated_link_gbps: float | None = None, emulated_link_latency_ms: float = 0.0,
                 device: jax.Device | None = None):
        for field, value in (("max_lora_rank", max_lora_rank), ("max_slots", max_slots),
                             ("page_rank", page_rank)):
            if value <= 0:
                raise ValueError(f"AdapterPool {field} must be positive, got {value}")
        if emulated_link_gbps is not None and emulated_link_gbps <= 0:
            raise ValueError(f"emulated_link_gbps must be positive, got {emulated_link_gbps}")
        self.config, self.dtype, self.device = config, jnp.dtype(dtype), device
        self.max_lora_rank, self.max_slots, self.page_rank = max_lora_rank, max_slots, page_rank
        self.pages_per_slot = math.ceil(max_lora_rank / page_rank)
        self.r_max = self.pages_per_slot * page_rank
        L = config.num_layers
        self.page_bytes = sum(L * page_rank * sum(config.projection_shape(m)) * self.dtype.itemsize
                              for m in TARGET_MODULES)
        self.device_budget_bytes, self.host_budget_bytes = device_budget_bytes, host_budget_bytes
        self.num_pages = device_budget_bytes // self.page_bytes
        if self.num_pages < 1:
            raise ValueError(f"device_budget_bytes={device_budget_bytes} is less than one page "
                             f"({self.page_bytes} bytes: {page_rank} rank rows of every projection)")
        self.emulated_link_gbps = emulated_link_gbps
        self._latency_s = emulated_link_latency_ms / 1e3

        P, S = self.num_pages, max_slots
        zeros = functools.partial(jnp.zeros, device=device)
        a, b, ranks, scales = {}, {}, {}, {}
        for m in TARGET_MODULES:
            d_in, d_out = config.projection_shape(m)
            a[m] = zeros((L, P, page_rank, d_in), self.dtype)
            b[m] = zeros((L, P, d_out, page_rank), self.dtype)
            ranks[m] = zeros((L, S), jnp.int32)
            scales[m] = zeros((L, S), jnp.float32)
        self._weights = PagedLoraWeights(a=a, b=b, page_table=zeros((S, self.pages_per_slot), jnp.int32),
                                         ranks=ranks, scales=scales)
        self._page_shardings: dict[str, tuple] | None = None  # set by `shard` (tensor parallel)

        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._loading: dict[str, _Load] = {}  # in start order
        self._free_pages, self._free_slots = set(range(P)), set(range(S))
        self._host_bytes = 0
        self._clock = itertools.count(1)  # LRU timestamps
        self._link_free_at = 0.0
        self._link: tuple[float, float] | None = None  # measured (bytes/s, latency s)
        # (predicted, real) seconds of recent copies, real = queued -> installed by `poll`.
        self.copies: collections.deque[tuple[float, float]] = collections.deque(maxlen=256)
        self._closed = False
        self._compiled: set[tuple[tuple[str, ...], int]] = set()  # install variants run so far
        self._queue: queue.Queue[_Load | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loader, name="carajax-adapter-loader", daemon=True)
        self._thread.start()

    # -- host tier -----------------------------------------------------------------------------
    def register(self, adapter: LoraAdapter, staged: tuple | None = None) -> None:
        """Add an adapter to the host tier. `AdapterError` (nothing changes) if its rank exceeds
        `max_lora_rank`, its name is taken, it does not fit the model, or the host budget is full.

        The host tier keeps each adapter twice: as parsed (the CPU-assist path computes from it)
        and as its staged copy (`stage_host`: the pages a copy moves, in the pool's dtype and
        layout), built once here so that a copy is one `device_put` of a ready buffer. Building
        it for a Llama-2-7B rank-64 q/k/v/o adapter takes 0.2-0.5 s; every copy of it would
        otherwise pay that, ~50x the link's time. Pass `staged` (from `stage_host`) to build it
        outside a caller's lock. `host_budget_bytes` counts both (`host_bytes`)."""
        n_pages = self._check_fits(adapter)
        nbytes = self.host_bytes(adapter)
        self._check_new(adapter, nbytes)  # before the build: fail fast
        if staged is None:
            staged = self.stage_host(adapter)
        with self._lock:
            self._check_new(adapter, nbytes)
            self._entries[adapter.name] = _Entry(adapter=adapter, n_pages=n_pages,
                                                 copy_bytes=self.copy_bytes(adapter), host=staged)
            self._host_bytes += nbytes

    def _check_fits(self, adapter: LoraAdapter) -> int:
        """`AdapterError` unless the adapter fits the model and the pool; its page count."""
        if adapter.rank > self.max_lora_rank:
            raise AdapterError(f"adapter {adapter.name!r} has rank {adapter.rank}; the pool's "
                               f"max_lora_rank is {self.max_lora_rank}")
        for (layer, module), m in adapter.modules.items():
            if layer >= self.config.num_layers or module not in TARGET_MODULES or (
                    m.a.shape[1], m.b.shape[0]) != self.config.projection_shape(module):
                raise AdapterError(f"adapter {adapter.name!r}: layer {layer} {module} does not fit "
                                   f"the base model {self.config.name!r}")
        n_pages = math.ceil(adapter.rank / self.page_rank)
        if n_pages > self.num_pages:
            raise AdapterError(f"adapter {adapter.name!r} needs {n_pages * self.page_bytes} bytes of "
                               f"device memory but the pool holds {self.num_pages * self.page_bytes}")
        return n_pages

    def stage_host(self, adapter: LoraAdapter) -> tuple | None:
        """The adapter's staged copy for `register`: (flat pages, ranks, scales) of
        `flat_pages`; None for a sharded pool (tensor parallel), which stages per projection
        at each copy. `AdapterError` (as `register`) if it does not fit."""
        self._check_fits(adapter)
        if self._page_shardings is not None:
            return None
        return flat_pages(adapter, self.config, math.ceil(adapter.rank / self.page_rank),
                          self.page_rank, self.dtype)

    def host_bytes(self, adapter: LoraAdapter) -> int:
        """Host memory the adapter takes once registered: as parsed, plus its staged copy."""
        return adapter.nbytes + (self.copy_bytes(adapter) if self._page_shardings is None else 0)

    def _check_new(self, adapter: LoraAdapter, nbytes: int) -> None:
        """A new name, and room in the host budget for `nbytes`."""
        with self._lock:
            if adapter.name in self._entries:
                raise AdapterError(f"adapter name {adapter.name!r} is already registered")
            if (self.host_budget_bytes is not None
                    and self._host_bytes + nbytes > self.host_budget_bytes):
                raise AdapterError(
                    f"adapter {adapter.name!r} needs {nbytes} bytes of host memory (parsed and "
                    f"staged); {self._host_bytes} of host_budget_bytes={self.host_budget_bytes} "
                    "are used")

    def unregister(self, name: str) -> None:
        """Remove an adapter from both tiers, freeing its pages (a copy in flight is dropped).
        `AdapterError` if unknown or in use; pinning does not prevent it."""
        with self._lock:
            e = self._get(name)
            if e.refcount > 0:
                raise AdapterError(f"adapter {name!r} is in use by {e.refcount} request(s)")
            self._release_device(e)
            del self._entries[name]
            self._host_bytes -= e.adapter.nbytes + (0 if e.host is None else e.host[0].nbytes)

    def warmup(self, names: list[str] | None = None) -> int:
        """Compile the install step now for each (targeted projections, page count) the
        registered adapters (or `names`) need, so that no load stalls a serving step for
        compilation (~0.5 s a variant on CPU); with no adapter registered, every page count of
        a seven-projection adapter. Must run on the engine thread (or under its lock). Writes
        zeros into free pages and a free slot, which nothing references. Returns how many
        variants were compiled."""
        with self._lock:
            entries = [self._get(n) for n in names] if names is not None else list(self._entries.values())
            want = {(staged_modules(e.adapter), e.n_pages) for e in entries}
            if names is None and not entries:
                want = {(MODULE_ORDER, n) for n in range(1, self.pages_per_slot + 1)}
            pages, slots = sorted(self._free_pages), sorted(self._free_slots)
        if not slots:
            return 0
        L, M, done = self.config.num_layers, len(MODULE_ORDER), 0
        for modules, n in sorted(want - self._compiled, key=lambda v: (v[1], v[0])):
            if n > len(pages):
                continue
            empty = (np.zeros((M, L), np.int32), np.zeros((M, L), np.float32))
            args = (np.int32(slots[0]), np.asarray(pages[:n], np.int32),
                    np.zeros(self.pages_per_slot, np.int32))
            if self._page_shardings is None:
                size = L * n * self.page_rank * sum(sum(self.config.projection_shape(m))
                                                    for m in modules)
                self._weights = _install_flat(self._weights, *args, jnp.zeros(size, self.dtype),
                                              *empty, modules=modules)
            else:
                a, b = {}, {}
                for m in modules:
                    d_in, d_out = self.config.projection_shape(m)
                    a[m] = jnp.zeros((L, n, self.page_rank, d_in), self.dtype)
                    b[m] = jnp.zeros((L, n, d_out, self.page_rank), self.dtype)
                self._weights = _install(self._weights, *args, a, b, *empty)
            self._compiled.add((modules, n))
            done += 1
        return done

    def __len__(self) -> int:
        """How many adapters are registered (in any tier)."""
        with self._lock:
            return len(self._entries)

    def adapter(self, name: str) -> LoraAdapter:
        """The registered adapter's host copy."""
        with self._lock:
            return self._get(name).adapter

    def where(self, name: str) -> str:
        """"host", "loading" (pages reserved, copy in flight) or "device" (ready to serve)."""
        with self._lock:
            return self._get(name).state

    def slot(self, name: str) -> int | None:
        """The adapter's page-table row if it is resident (ready), else None."""
        with self._lock:
            e = self._get(name)
            return e.slot if e.state == "device" else None

    # -- device tier ---------------------------------------------------------------------------
    def prefetch(self, name: str, *, here: bool = False) -> bool:
        """Start an asynchronous copy to the device (no-op if resident or loading). Pages and a
        slot are reserved now, evicting least-recently-used adapters that are neither pinned nor
        in use nor wanted; returns False (evicting nothing) if that cannot make room now.

        `here`: stage the copy on the calling thread (host page layout + `device_put`, which is
        asynchronous on an accelerator) instead of the loader thread: for threads that are not
        the engine's, e.g. a request's submitter, it saves the hand-off to the loader (~0.3 ms
        plus GIL waits on a busy 2-core host: staging took 1.5 ms on the loader, 0.5 here)."""
        with self._lock:
            e = self._get(name)
            self._touch(e)
            if e.state != "host":
                return True
            if not self._start_load(e, queue=not here):
                return False
            job = e.load
        self._run_job(job)
        return True

    def poll(self) -> list[str]:
        """Non-blocking: install every finished copy (staged arrays ready and the emulated deadline
        passed) into the pool; returns the names that became resident, in copy order."""
        with self._lock:
            now = time.monotonic()
            ready = [n for n, job in self._loading.items() if self._is_ready(job, now)]
            for name in ready:
                self._finish(name)
            return ready

    def load_now(self, name: str) -> float:
        """Blocking load (the `wait` policy): returns once the adapter is resident, including the
        emulated link delay; returns the seconds blocked. `PoolFullError` if it cannot fit now."""
        t0 = time.monotonic()
        with self._lock:
            e = self._get(name)
            self._touch(e)
            if e.state == "device":
                return time.monotonic() - t0
            if e.state == "host" and not self._start_load(e):
                raise PoolFullError(f"adapter {name!r} needs {e.n_pages} free pages and a slot; "
                                    f"pinned, in-use and loading adapters hold the pool "
                                    f"({len(self._free_pages)} of {self.num_pages} pages free)")
            job = e.load
        job.done.wait()
        if job.staged is not None:
            jax.block_until_ready(job.staged[0])
        time.sleep(max(0.0, job.ready_at - time.monotonic()))  # the emulated blocking copy
        with self._lock:
            if job.cancelled:
                raise AdapterError(f"adapter {name!r}: its copy was dropped while loading "
                                   "(unregistered, or the pool closed)")
            if self._loading.get(name) is job:  # else another thread's poll installed it
                self._finish(name)
        return time.monotonic() - t0

    def load_all(self) -> None:
        """The `cached` policy: make every registered adapter resident. `AdapterError` naming the
        bytes needed against the budget if they do not all fit at once."""
        with self._lock:
            names = list(self._entries)
            pages = sum(e.n_pages for e in self._entries.values())
            if pages > self.num_pages:
                raise AdapterError(
                    f"load_all: {len(names)} adapters need {pages} pages = {pages * self.page_bytes} "
                    f"bytes of device memory, but device_budget_bytes={self.device_budget_bytes} holds "
                    f"{self.num_pages} pages = {self.num_pages * self.page_bytes} bytes")
            if len(names) > self.max_slots:
                raise AdapterError(f"load_all: {len(names)} adapters need as many slots; "
                                   f"max_slots={self.max_slots}")
            for name in names:  # all fit, so this evicts nothing; copies queue on the link
                self.prefetch(name)
        for name in names:
            self.load_now(name)

    def acquire(self, name: str) -> None:
        """One more request uses the adapter: never evicted or unregistered while any does."""
        with self._lock:
            e = self._get(name)
            e.refcount += 1
            self._touch(e)

    def release(self, name: str) -> None:
        """One request fewer uses the adapter (pairs with `acquire`)."""
        with self._lock:
            e = self._get(name)
            if e.refcount == 0:
                raise ValueError(f"adapter {name!r} released more often than acquired")
            e.refcount -= 1

    def want(self, name: str) -> None:
        """A queued request will use the adapter: its copy may start before the request is
        admitted, and no other adapter's copy evicts it meanwhile (pairs with `unwant`, at
        admission or when the request ends). Unlike `acquire` it does not stop `unregister`."""
        with self._lock:
            self._get(name).wanted += 1

    def unwant(self, name: str) -> None:
        """One queued request fewer waits for the adapter (a no-op once it is unregistered)."""
        with self._lock:
            e = self._entries.get(name)
            if e is not None and e.wanted > 0:
                e.wanted -= 1

    def pin(self, name: str) -> None:
        """Never evict this adapter (it may still be loaded, unregistered, or not yet resident)."""
        with self._lock:
            self._get(name).pinned = True

    def unpin(self, name: str) -> None:
        """Make the adapter evictable again (least recently used first)."""
        with self._lock:
            self._get(name).pinned = False

    def touch(self, name: str) -> None:
        """Mark the adapter used now (eviction takes the least recently used first)."""
        with self._lock:
            self._touch(self._get(name))

    @property
    def weights(self) -> PagedLoraWeights:
        """The current pool arrays. An install donates them: read this afresh for every step, on
        the thread that calls `poll`/`load_now`."""
        return self._weights

    def shard(self, shardings: PagedLoraWeights) -> None:
        """Place the device pool by `shardings` (a PagedLoraWeights of shardings, see
        `carajax.parallel.lora_shardings`); later copies are staged with the same page shardings,
        so installs stay on the mesh. Call before any adapter is loaded."""
        with self._lock:
            if self._loading or any(e.state != "host" for e in self._entries.values()):
                raise RuntimeError("shard the adapter pool before loading adapters")
            self._weights = jax.device_put(dataclasses.replace(self._weights, mesh=shardings.mesh),
                                           shardings)
            self._page_shardings = {m: (shardings.a[m], shardings.b[m]) for m in shardings.a}

    def stats(self) -> dict:
        """Budgets and usage in bytes, pages and slots, and the adapters in each state."""
        with self._lock:
            names = lambda state: [n for n, e in self._entries.items() if e.state == state]  # noqa: E731
            used = self.num_pages - len(self._free_pages)
            return {
                "device_budget_bytes": self.device_budget_bytes,
                "device_bytes_used": used * self.page_bytes,  # resident + reserved for loading
                "page_bytes": self.page_bytes, "pages_total": self.num_pages,
                "pages_free": len(self._free_pages),
                "slots_total": self.max_slots, "slots_free": len(self._free_slots),
                "host_budget_bytes": self.host_budget_bytes, "host_bytes_used": self._host_bytes,
                "on_device": names("device"), "loading": names("loading"), "host_only": names("host"),
                "pinned": [n for n, e in self._entries.items() if e.pinned],
                "in_use": {n: e.refcount for n, e in self._entries.items() if e.refcount},
                "wanted": {n: e.wanted for n, e in self._entries.items() if e.wanted},
                "copies": len(self.copies),
                "copy_predicted_ms_median": _median_ms([p for p, _ in self.copies]),
                "copy_real_ms_median": _median_ms([r for _, r in self.copies]),
            }

    def close(self) -> None:
        """Stop the loader thread; copies in flight are dropped (their adapters go back to host)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for name in list(self._loading):
                self._release_device(self._entries[name])
        self._queue.put(None)
        self._thread.join(timeout=10)

    def __enter__(self) -> AdapterPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals (callers hold the lock) -----------------------------------------------------
    def _get(self, name: str) -> _Entry:
        if name not in self._entries:
            raise AdapterError(f"unknown adapter {name!r}")
        return self._entries[name]

    def _touch(self, e: _Entry) -> None:
        e.last_used = next(self._clock)

    def _victims(self, n_pages: int) -> list[_Entry] | None:
        """Least-recently-used evictable adapters whose pages and slot make room, or None."""
        free_pages, free_slots = len(self._free_pages), len(self._free_slots)
        candidates = sorted((e for e in self._entries.values()
                             if e.state == "device" and not e.pinned and e.refcount == 0
                             and e.wanted == 0),
                            key=lambda e: e.last_used)
        victims = []
        for e in candidates:
            if free_pages >= n_pages and free_slots >= 1:
                break
            victims.append(e)
            free_pages, free_slots = free_pages + len(e.pages), free_slots + 1
        return victims if free_pages >= n_pages and free_slots >= 1 else None

    def _start_load(self, e: _Entry, queue: bool = True) -> bool:
        if self._closed:
            raise RuntimeError("the adapter pool is closed")
        victims = self._victims(e.n_pages)
        if victims is None:
            return False
        for v in victims:  # their weights stay in the pool until the pages are overwritten
            self._release_device(v)
        e.pages = sorted(self._free_pages)[:e.n_pages]
        self._free_pages.difference_update(e.pages)
        e.slot = min(self._free_slots)
        self._free_slots.remove(e.slot)
        nbytes = e.copy_bytes
        predicted = self._predict_copy(nbytes)
        e.load = _Load(adapter=e.adapter, n_pages=e.n_pages, ready_at=self._link_deadline(nbytes),
                       nbytes=nbytes, host=e.host,
                       started=time.monotonic(), predicted_s=predicted)
        e.state = "loading"
        self._loading[e.adapter.name] = e.load
        if queue:
            self._queue.put(e.load)
        return True

    # -- the link -----------------------------------------------------------------------------
    def copy_bytes(self, adapter: LoraAdapter) -> int:
        """Bytes one copy of `adapter` moves: its pages of the projections it targets
        (`staged_modules`; the pool reserves its pages in every projection)."""
        rows = math.ceil(adapter.rank / self.page_rank) * self.page_rank * self.config.num_layers
        return sum(rows * sum(self.config.projection_shape(m)) * self.dtype.itemsize
                   for m in staged_modules(adapter))

    def copy_seconds(self, name: str) -> float:
        """Predicted seconds until `name` is resident if its copy started now (0 if it is; the
        time left if it is loading): the link's backlog, its latency, bytes / bandwidth. From
        the emulated link's numbers, or from `measure_link` on a real device."""
        with self._lock:
            e = self._get(name)
            if e.state == "device":
                return 0.0
            if e.state == "loading":
                return max(0.0, e.load.started + e.load.predicted_s - time.monotonic())
            return self._predict_copy(e.copy_bytes)

    def measure_link(self, nbytes: int = 16 << 20, repeats: int = 3) -> tuple[float, float]:
        """(bytes per second, latency in seconds) of host -> device copies, measured once with
        `jax.device_put` of a buffer of `nbytes` and of a tiny one (medians of `repeats`); the
        emulated link's own numbers when one is set."""
        if self.emulated_link_gbps is not None:
            return self.emulated_link_gbps * 1e9, self._latency_s
        if self._link is None:
            def put(n: int) -> float:
                host = np.ones(n // 4, np.float32)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(jax.device_put(host))
                    times.append(time.perf_counter() - t0)
                return float(np.median(times))
            put(nbytes)  # first touch
            small, big = put(4096), put(nbytes)
            self._link = (nbytes / max(big - small, 1e-9), small)
        return self._link

    def _predict_copy(self, nbytes: int) -> float:
        bandwidth, latency = self.measure_link()
        backlog = max(0.0, self._link_free_at - time.monotonic()) if self.emulated_link_gbps else (
            sum(j.nbytes for j in self._loading.values()) / bandwidth)
        return backlog + latency + nbytes / bandwidth

    def _link_deadline(self, nbytes: int) -> float:
        """When an emulated copy of `nbytes` finishes: copies serialize over one link."""
        if self.emulated_link_gbps is None:
            return 0.0
        start = max(time.monotonic(), self._link_free_at)
        self._link_free_at = start + self._latency_s + nbytes / (self.emulated_link_gbps * 1e9)
        return self._link_free_at

    def _release_device(self, e: _Entry) -> None:
        """Back to host only: free its pages and slot (cancelling a copy in flight)."""
        if e.load is not None:
            e.load.cancelled = True
            self._loading.pop(e.adapter.name, None)
        self._free_pages.update(e.pages)
        if e.slot is not None:
            self._free_slots.add(e.slot)
        e.state, e.slot, e.pages, e.load = "host", None, [], None

    @staticmethod
    def _is_ready(job: _Load, now: float) -> bool:
        if not job.done.is_set():
            return False
        if job.error is not None:
            return True  # `_finish` reports it
        return now >= job.ready_at and all(x.is_ready() for x in job.staged[0])

    def _finish(self, name: str) -> None:
        """Install a staged copy: pages, page-table row, ranks and scales of its slot."""
        e, job = self._entries[name], self._loading.pop(name)
        if job.error is not None:
            self._release_device(e)
            raise RuntimeError(f"copying adapter {name!r} to the device failed: {job.error}") from job.error
        arrays, install, args = job.staged
        row = np.zeros(self.pages_per_slot, np.int32)  # entries past the rank are never read
        row[:e.n_pages] = e.pages
        self._weights = install(self._weights, np.int32(e.slot), np.asarray(e.pages, np.int32),
                                row, *args)
        self._compiled.add((staged_modules(e.adapter), e.n_pages))
        # Seen at the first poll after it landed: the time a request waiting on it saw.
        self.copies.append((job.predicted_s, time.monotonic() - job.started))
        e.state, e.load = "device", None
        self._touch(e)

    def _loader(self) -> None:
        """Background thread: host pages -> device (`jax.device_put`); never touches the pool."""
        while (job := self._queue.get()) is not None:
            self._run_job(job)

    def _run_job(self, job: _Load) -> None:
        if not job.cancelled:
            try:
                job.staged = self._stage(job)
            except Exception as err:  # reported on the engine thread by poll / load_now
                job.error = err
        job.done.set()

    def _stage(self, job: _Load) -> tuple:
        """(device arrays to wait for, the install function, its staged arguments)."""
        modules = staged_modules(job.adapter)
        if self._page_shardings is None:
            flat, ranks, scales = job.host or flat_pages(job.adapter, self.config, job.n_pages,
                                                         self.page_rank, self.dtype)
            flat = jax.device_put(flat, self.device)
            return (flat,), functools.partial(_install_flat, modules=modules), (flat, ranks, scales)
        a, b = {}, {}
        ranks = np.zeros((len(MODULE_ORDER), self.config.num_layers), np.int32)
        scales = np.zeros((len(MODULE_ORDER), self.config.num_layers), np.float32)
        for i, m in enumerate(MODULE_ORDER):
            if m in modules:
                pa, pb, ranks[i], scales[i] = host_pages(job.adapter, self.config, m, job.n_pages,
                                                         self.page_rank, self.dtype)
                sa, sb = self._page_shardings[m]  # pages placed as the pool's shards
                a[m], b[m] = jax.device_put(pa, sa), jax.device_put(pb, sb)
        return (*a.values(), *b.values()), _install, (a, b, ranks, scales)
