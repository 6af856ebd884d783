"""The tiered adapter pool: every adapter in host memory, a byte-budgeted page pool on the device.

CaraServe / S-LoRA style. Registered adapters live on the host as parsed `LoraAdapter`s (numpy).
The device side is a pool of *pages* sized in bytes, so an adapter costs what it weighs: a page
holds `page_rank` rank rows of all seven target projections in every layer, and an adapter of
rank r takes ceil(r / page_rank) pages (a fixed count of r_max-padded slots wastes memory on small
ranks and caps how many adapters fit whatever their size). Slots are rows of a page table:
cheap metadata, `max_slots` of them. The layout and the staging of a copy are
`carajax.lora.pages`; the link it crosses, and the loader thread, `carajax.lora.link`.

This module decides *which* pages and slot, and when: registration against the host budget, LRU
eviction that spares pinned, in-use, wanted and loading adapters, and the install of finished
copies. A copy is staged on the background loader thread, or on the caller's
(`prefetch(here=True)`: a request's submitter). The engine thread installs finished copies into
the pool arrays in `poll` (non-blocking) or `load_now` (blocking) with a jitted scatter that
donates the pool, so all mutation of device arrays happens on the engine thread, never while a
step holds them.
"""

from __future__ import annotations

import collections
import math
import threading
import time

import jax
import jax.numpy as jnp

from carajax.config import TARGET_MODULES, ModelConfig
from carajax.lora.adapter import AdapterError, LoraAdapter
from carajax.lora.link import Copy, Link
from carajax.lora.pages import (
    MODULE_ORDER,
    PagedLoraWeights,
    PoolArrays,
    copy_bytes,
    flat_pages,
    page_bytes,
    staged_modules,
)
from carajax.lora.residency import Entry, Residency


class PoolFullError(RuntimeError):
    """The device pool cannot take an adapter now: pinned, in-use and loading adapters hold the
    pages or slots it needs."""


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
        self.page_bytes = page_bytes(config, page_rank, self.dtype.itemsize)
        self.device_budget_bytes, self.host_budget_bytes = device_budget_bytes, host_budget_bytes
        self.num_pages = device_budget_bytes // self.page_bytes
        if self.num_pages < 1:
            raise ValueError(f"device_budget_bytes={device_budget_bytes} is less than one page "
                             f"({self.page_bytes} bytes: {page_rank} rank rows of every projection)")
        self.emulated_link_gbps = emulated_link_gbps

        self.arrays = PoolArrays(config, self.num_pages, max_slots, self.pages_per_slot, page_rank,
                                 self.dtype, device)

        self._lock = threading.RLock()
        self._table = Residency(self.num_pages, max_slots)
        self._host_bytes = 0
        self._closed = False
        self.link = Link(self._stage, emulated_gbps=emulated_link_gbps,
                         latency_ms=emulated_link_latency_ms)

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
            self._table.entries[adapter.name] = Entry(adapter=adapter, n_pages=n_pages,
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
        if self.arrays.shardings is not None:
            return None
        return flat_pages(adapter, self.config, math.ceil(adapter.rank / self.page_rank),
                          self.page_rank, self.dtype)

    def host_bytes(self, adapter: LoraAdapter) -> int:
        """Host memory the adapter takes once registered: as parsed, plus its staged copy."""
        return adapter.nbytes + (self.copy_bytes(adapter) if self.arrays.shardings is None else 0)

    def _check_new(self, adapter: LoraAdapter, nbytes: int) -> None:
        """A new name, and room in the host budget for `nbytes`."""
        with self._lock:
            if adapter.name in self._table.entries:
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
            e = self._table.get(name)
            if e.refcount > 0:
                raise AdapterError(f"adapter {name!r} is in use by {e.refcount} request(s)")
            self._table.free(e)
            del self._table.entries[name]
            self._host_bytes -= e.adapter.nbytes + (0 if e.host is None else e.host[0].nbytes)

    def warmup(self, names: list[str] | None = None) -> int:
        """Compile the install step now for each (targeted projections, page count) the
        registered adapters (or `names`) need, so that no load stalls a serving step for
        compilation (~0.5 s a variant on CPU); with no adapter registered, every page count of
        a seven-projection adapter. Must run on the engine thread (or under its lock). Writes
        zeros into free pages and a free slot, which nothing references. Returns how many
        variants were compiled."""
        with self._lock:
            table = self._table
            entries = [table.get(n) for n in names] if names is not None else list(table.entries.values())
            want = {(staged_modules(e.adapter), e.n_pages) for e in entries}
            if names is None and not entries:
                want = {(MODULE_ORDER, n) for n in range(1, self.pages_per_slot + 1)}
            pages, slots = sorted(self._table.free_pages), sorted(self._table.free_slots)
        if not slots:
            return 0
        return self.arrays.warm(want, pages, slots[0])

    def __len__(self) -> int:
        """How many adapters are registered (in any tier)."""
        with self._lock:
            return len(self._table.entries)

    def adapter(self, name: str) -> LoraAdapter:
        """The registered adapter's host copy."""
        with self._lock:
            return self._table.get(name).adapter

    def where(self, name: str) -> str:
        """"host", "loading" (pages reserved, copy in flight) or "device" (ready to serve)."""
        with self._lock:
            return self._table.get(name).state

    def slot(self, name: str) -> int | None:
        """The adapter's page-table row if it is resident (ready), else None."""
        with self._lock:
            e = self._table.get(name)
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
            e = self._table.get(name)
            self._table.touch(e)
            if e.state != "host":
                return True
            if not self._start_load(e, queue=not here):
                return False
            job = e.load
        self.link.run(job)
        return True

    def poll(self) -> list[str]:
        """Non-blocking: install every finished copy (staged arrays ready and the emulated deadline
        passed) into the pool; returns the names that became resident, in copy order."""
        with self._lock:
            now = time.monotonic()
            ready = [n for n, job in self._table.loading.items() if job.is_ready(now)]
            for name in ready:
                self._finish(name)
            return ready

    def load_now(self, name: str) -> float:
        """Blocking load (the `wait` policy): returns once the adapter is resident, including the
        emulated link delay; returns the seconds blocked. `PoolFullError` if it cannot fit now."""
        t0 = time.monotonic()
        with self._lock:
            e = self._table.get(name)
            self._table.touch(e)
            if e.state == "device":
                return time.monotonic() - t0
            if e.state == "host" and not self._start_load(e):
                raise PoolFullError(f"adapter {name!r} needs {e.n_pages} free pages and a slot; "
                                    f"pinned, in-use and loading adapters hold the pool "
                                    f"({len(self._table.free_pages)} of {self.num_pages} pages free)")
            job = e.load
        job.done.wait()
        if job.staged is not None:
            jax.block_until_ready(job.staged[0])
        time.sleep(max(0.0, job.ready_at - time.monotonic()))  # the emulated blocking copy
        with self._lock:
            if job.cancelled:
                raise AdapterError(f"adapter {name!r}: its copy was dropped while loading "
                                   "(unregistered, or the pool closed)")
            if self._table.loading.get(name) is job:  # else another thread's poll installed it
                self._finish(name)
        return time.monotonic() - t0

    def load_all(self) -> None:
        """The `cached` policy: make every registered adapter resident. `AdapterError` naming the
        bytes needed against the budget if they do not all fit at once."""
        with self._lock:
            names = list(self._table.entries)
            pages = sum(e.n_pages for e in self._table.entries.values())
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
            e = self._table.get(name)
            e.refcount += 1
            self._table.touch(e)

    def release(self, name: str) -> None:
        """One request fewer uses the adapter (pairs with `acquire`)."""
        with self._lock:
            e = self._table.get(name)
            if e.refcount == 0:
                raise ValueError(f"adapter {name!r} released more often than acquired")
            e.refcount -= 1

    def want(self, name: str) -> None:
        """A queued request will use the adapter: its copy may start before the request is
        admitted, and no other adapter's copy evicts it meanwhile (pairs with `unwant`, at
        admission or when the request ends). Unlike `acquire` it does not stop `unregister`."""
        with self._lock:
            self._table.get(name).wanted += 1

    def unwant(self, name: str) -> None:
        """One queued request fewer waits for the adapter (a no-op once it is unregistered)."""
        with self._lock:
            e = self._table.entries.get(name)
            if e is not None and e.wanted > 0:
                e.wanted -= 1

    def pin(self, name: str) -> None:
        """Never evict this adapter (it may still be loaded, unregistered, or not yet resident)."""
        with self._lock:
            self._table.get(name).pinned = True

    def unpin(self, name: str) -> None:
        """Make the adapter evictable again (least recently used first)."""
        with self._lock:
            self._table.get(name).pinned = False

    def touch(self, name: str) -> None:
        """Mark the adapter used now (eviction takes the least recently used first)."""
        with self._lock:
            self._table.touch(self._table.get(name))

    @property
    def copies(self) -> collections.deque[tuple[float, float]]:
        """(predicted, real) seconds of recent copies (`Link.copies`)."""
        return self.link.copies

    @property
    def weights(self) -> PagedLoraWeights:
        """The current pool arrays. An install donates them: read this afresh for every step, on
        the thread that calls `poll`/`load_now`."""
        return self.arrays.weights

    def shard(self, shardings: PagedLoraWeights) -> None:
        """Place the device pool by `shardings` (a PagedLoraWeights of shardings, see
        `carajax.parallel.lora_shardings`); later copies are staged with the same page shardings,
        so installs stay on the mesh. Call before any adapter is loaded."""
        with self._lock:
            if self._table.loading or any(e.state != "host" for e in self._table.entries.values()):
                raise RuntimeError("shard the adapter pool before loading adapters")
            self.arrays.shard(shardings)

    def stats(self) -> dict:
        """Budgets and usage in bytes, pages and slots, and the adapters in each state."""
        with self._lock:
            names = self._table.names
            used = self.num_pages - len(self._table.free_pages)
            return {
                "device_budget_bytes": self.device_budget_bytes,
                "device_bytes_used": used * self.page_bytes,  # resident + reserved for loading
                "page_bytes": self.page_bytes, "pages_total": self.num_pages,
                "pages_free": len(self._table.free_pages),
                "slots_total": self.max_slots, "slots_free": len(self._table.free_slots),
                "host_budget_bytes": self.host_budget_bytes, "host_bytes_used": self._host_bytes,
                "on_device": names("device"), "loading": names("loading"), "host_only": names("host"),
                "pinned": [n for n, e in self._table.entries.items() if e.pinned],
                "in_use": {n: e.refcount for n, e in self._table.entries.items() if e.refcount},
                "wanted": {n: e.wanted for n, e in self._table.entries.items() if e.wanted},
                **self.link.stats(),  # copies: how many, their predicted and real medians
            }

    def close(self) -> None:
        """Stop the loader thread; copies in flight are dropped (their adapters go back to host)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for name in list(self._table.loading):
                self._table.free(self._table.entries[name])
        self.link.close()

    def __enter__(self) -> AdapterPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals (callers hold the lock) -----------------------------------------------------
    def _start_load(self, e: Entry, queue: bool = True) -> bool:
        if self._closed:
            raise RuntimeError("the adapter pool is closed")
        if not self._table.reserve(e):
            return False
        nbytes = e.copy_bytes
        predicted = self.link.predict(nbytes, self._table.loading.values())
        self._table.loading_started(e, Copy(
            adapter=e.adapter, n_pages=e.n_pages, ready_at=self.link.deadline(nbytes), nbytes=nbytes,
            host=e.host, started=time.monotonic(), predicted_s=predicted))
        if queue:
            self.link.submit(e.load)
        return True

    # -- the link -----------------------------------------------------------------------------
    def copy_bytes(self, adapter: LoraAdapter) -> int:
        """Bytes one copy of `adapter` moves: its pages of the projections it targets
        (`pages.staged_modules`; the pool reserves its pages in every projection)."""
        return copy_bytes(adapter, self.config, self.page_rank, self.dtype.itemsize)

    def copy_seconds(self, name: str) -> float:
        """Predicted seconds until `name` is resident if its copy started now (0 if it is; the
        time left if it is loading): the link's backlog, its latency, bytes / bandwidth. From
        the emulated link's numbers, or from `measure_link` on a real device."""
        with self._lock:
            e = self._table.get(name)
            if e.state == "device":
                return 0.0
            if e.state == "loading":
                return max(0.0, e.load.started + e.load.predicted_s - time.monotonic())
            return self.link.predict(e.copy_bytes, self._table.loading.values())

    def measure_link(self, nbytes: int = 16 << 20, repeats: int = 3) -> tuple[float, float]:
        """(bytes per second, latency in seconds) of host -> device copies (`Link.measure`)."""
        return self.link.measure(nbytes, repeats)

    def _finish(self, name: str) -> None:
        """Install a staged copy: pages, page-table row, ranks and scales of its slot."""
        e, job = self._table.entries[name], self._table.loading.pop(name)
        if job.error is not None:
            self._table.free(e)
            raise RuntimeError(f"copying adapter {name!r} to the device failed: {job.error}") from job.error
        self.arrays.install(job.staged, e.slot, e.pages, staged_modules(e.adapter))
        # Seen at the first poll after it landed: the time a request waiting on it saw.
        self.link.landed(job)
        self._table.installed(e)

    def _stage(self, job: Copy) -> tuple:
        """(device arrays to wait for, the install function, its staged arguments): run by the
        link on the loader thread or a `prefetch(here=True)` caller's; never touches the pool."""
        return self.arrays.stage(job.adapter, job.n_pages, job.host)
