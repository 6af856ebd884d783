"""The tiered adapter pool: every adapter registered (disk), some in host memory, a byte-budgeted
page pool on the device.

CaraServe / S-LoRA style, with vLLM's host tier in front of the disk. A registered adapter is its
`AdapterSpec` (shapes and ranks); its weights are in host memory while it is in the host tier
(`carajax.lora.host_tier`: LRU within `host_budget_bytes`, one copy in the layout a copy to the
device moves), else read from disk on the reader thread when a request needs it. The device side
is a pool of *pages* sized in bytes, so an adapter costs what it weighs: a page holds `page_rank`
rank rows of all seven target projections in every layer, and an adapter of rank r takes
ceil(r / page_rank) pages. Slots are rows of a page table: cheap metadata, `max_slots` of them.
The layout and the staging of a copy are `carajax.lora.pages`; the link it crosses, and the
loader thread, `carajax.lora.link`; reads, copies and installs, `carajax.lora.transfers`.

This module registers adapters, says where they are and who holds them (LRU eviction from either
tier spares pinned, in-use, wanted and loading adapters), and reports both tiers. The engine
thread installs finished copies into the pool arrays (`poll`, `load_now`) with a jitted scatter
that donates the pool, so all mutation of device arrays happens on the engine thread, never while
a step holds them.
"""

from __future__ import annotations

import collections
import math
import threading

import jax
import jax.numpy as jnp

from carajax.config import TARGET_MODULES, ModelConfig
from carajax.lora.adapter import AdapterError, LoraAdapter
from carajax.lora.host_tier import HostTier
from carajax.lora.link import Link
from carajax.lora.pages import (
    MODULE_ORDER,
    PagedLoraWeights,
    PoolArrays,
    page_bytes,
    staged_modules,
)
from carajax.lora.residency import Entry, Residency
from carajax.lora.spec import AdapterSpec, spec_of
from carajax.lora.transfers import PoolFullError, Transfers


class AdapterPool(Transfers):
    """Disk (every registered adapter) + host tier (LRU within a byte budget) + device tier (a
    byte-budgeted page pool).

    - `num_pages = device_budget_bytes // page_bytes`; an adapter of rank r (its largest module
      rank) takes ceil(r / page_rank) pages and one of `max_slots` page-table rows. Its slot
      (`slot(name)`) is that row: what batch rows pass to the kernels, with
      `page_table=weights.page_table`. page_rank is the kernels' rank block, so on a GPU it must
      be a power of two >= 16.
    - Pages and the slot are reserved when a copy starts ("loading") and count in
      `device_bytes_used`; the slot's row, ranks and scales are written only when the copy is
      installed. A slot is valid while its adapter is "device": `acquire` it for as long as
      requests use it. Evicted adapters' weights stay in place until their pages are reused.
    - A copy needs the adapter's host copy: one only on disk is read first (`prefetch` reads,
      then copies; `fetch` only reads). Neither tier evicts a pinned, acquired or wanted
      adapter, nor one being read or copied.
    - Not a general thread-safe container: bookkeeping is locked, so any thread may register,
      prefetch, acquire or read stats, but `poll`, `load_now`, `load_all` and `weights` mutate or
      hand out the donated pool arrays and belong to the one engine thread that runs the steps.
    - `emulated_link_latency_ms` applies only with `emulated_link_gbps` set.
    """

    def __init__(self, config: ModelConfig, *, dtype, max_lora_rank: int, device_budget_bytes: int,
                 host_budget_bytes: int | None = None, max_slots: int = 64, page_rank: int = 16,
                 emulated_link_gbps: float | None = None, emulated_link_latency_ms: float = 0.0,
                 device: jax.Device | None = None, on_host_evict=None):
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
        self._variants: set[tuple[tuple[str, ...], int]] = set()  # registered (projections, pages)
        self._closed = False
        self.link = Link(self._stage, emulated_gbps=emulated_link_gbps,
                         latency_ms=emulated_link_latency_ms)
        self.host = HostTier(config, budget=host_budget_bytes, page_rank=page_rank,
                             dtype=self.dtype, max_rank=max_lora_rank, on_read=self._on_read,
                             on_evict=on_host_evict)

    # -- registration ----------------------------------------------------------------------------
    def register(self, adapter: LoraAdapter, staged: tuple | None = None) -> None:
        """Register an adapter held in memory (it has no file to read again, so it stays in the
        host tier until unregistered; least recently used host copies of others make room).
        `AdapterError` (nothing changes) if its rank exceeds `max_lora_rank`, its name is taken,
        it does not fit the model, or the host budget cannot hold it. `staged`: its host copy
        from `stage_host`, built outside a caller's lock."""
        spec = spec_of(adapter, self.config)
        self._check_fits(adapter)
        self._check_new(spec)  # before the build: fail fast
        staged = staged if staged is not None else self.stage_host(adapter)
        with self._lock:
            self._check_new(spec)
            if not self.host.make_room(self.host_bytes(spec)):
                raise AdapterError(
                    f"adapter {spec.name!r} needs {self.host_bytes(spec)} bytes of host memory; "
                    f"{self.host.bytes_used} of host_budget_bytes={self.host_budget_bytes} are "
                    "used by adapters that cannot be evicted")
            self.host.add(self._add(spec, on_disk=False), staged)

    def register_spec(self, spec: AdapterSpec, staged: tuple | None = None) -> None:
        """Register an adapter that lives on disk at `spec.path` (`spec.read_spec` checked it).
        `staged` (its host copy) joins the host tier if it fits beside what is there, evicting
        nothing; otherwise the adapter is read when a request needs it. `AdapterError` as
        `register`, or if its host copy alone exceeds the host budget."""
        self._check_fits(spec)
        nbytes = self.host_bytes(spec)
        if self.host_budget_bytes is not None and nbytes > self.host_budget_bytes:
            raise AdapterError(f"adapter {spec.name!r} needs {nbytes} bytes of host memory; "
                               f"host_budget_bytes is {self.host_budget_bytes}")
        with self._lock:
            self._check_new(spec)
            e = self._add(spec, on_disk=True)
            if staged is not None and self.host.room(nbytes):
                self.host.add(e, staged)

    def _add(self, spec: AdapterSpec, on_disk: bool) -> Entry:
        e = Entry(spec=spec, n_pages=math.ceil(spec.rank / self.page_rank),
                  copy_bytes=self.copy_bytes(spec), on_disk=on_disk)
        self._table.add(e)
        self._variants.add((staged_modules(spec), e.n_pages))
        return e

    def _check_fits(self, adapter: LoraAdapter | AdapterSpec) -> int:
        """`AdapterError` unless the adapter fits the model and the pool; its page count."""
        if adapter.rank > self.max_lora_rank:
            raise AdapterError(f"adapter {adapter.name!r} has rank {adapter.rank}; the pool's "
                               f"max_lora_rank is {self.max_lora_rank}")
        for (layer, module), m in adapter.modules.items():
            if layer >= self.config.num_layers or module not in TARGET_MODULES or (
                    isinstance(adapter, LoraAdapter) and (m.a.shape[1], m.b.shape[0])
                    != self.config.projection_shape(module)):
                raise AdapterError(f"adapter {adapter.name!r}: layer {layer} {module} does not fit "
                                   f"the base model {self.config.name!r}")
        n_pages = math.ceil(adapter.rank / self.page_rank)
        if n_pages > self.num_pages:
            raise AdapterError(f"adapter {adapter.name!r} needs {n_pages * self.page_bytes} bytes of "
                               f"device memory but the pool holds {self.num_pages * self.page_bytes}")
        return n_pages

    def _check_new(self, spec: AdapterSpec) -> None:
        with self._lock:
            if spec.name in self._table.entries:
                raise AdapterError(f"adapter name {spec.name!r} is already registered")

    def stage_host(self, adapter: LoraAdapter) -> tuple:
        """The adapter's host copy (`pages.flat_pages`: flat pages, ranks, scales), what the host
        tier keeps. `AdapterError` (as `register`) if it does not fit."""
        self._check_fits(adapter)
        return self.host.stage(adapter)

    def host_bytes(self, adapter: LoraAdapter | AdapterSpec) -> int:
        """Host memory the adapter takes in the host tier: its staged pages, ranks and scales."""
        return self.host.nbytes(adapter)

    def host_room(self, adapter: LoraAdapter | AdapterSpec) -> bool:
        """Whether its host copy fits in the host budget now, evicting nothing."""
        with self._lock:
            return self.host.room(self.host_bytes(adapter))

    def unregister(self, name: str) -> None:
        """Remove an adapter from every tier, freeing its pages (a copy or read in flight is
        dropped). `AdapterError` if unknown or in use; pinning does not prevent it."""
        with self._lock:
            e = self._table.get(name)
            if e.refcount > 0:
                raise AdapterError(f"adapter {name!r} is in use by {e.refcount} request(s)")
            self.host.cancel(e)
            self._table.remove(e)

    def warmup(self, names: list[str] | None = None) -> int:
        """Compile the install step now for each (targeted projections, page count) the
        registered adapters (or `names`) need, so that no load stalls a serving step for
        compilation (~0.5 s a variant on CPU); with no adapter registered, every page count of a
        seven-projection adapter. Must run on the engine thread (or under its lock). Writes zeros
        into free pages and a free slot, which nothing references. Returns how many variants
        were compiled."""
        with self._lock:
            want = set(self._variants) or {(MODULE_ORDER, n)
                                           for n in range(1, self.pages_per_slot + 1)}
            if names is not None:
                want = {(staged_modules(e.spec), e.n_pages)
                        for e in (self._table.get(n) for n in names)}
            pages, slots = sorted(self._table.free_pages), sorted(self._table.free_slots)
        return self.arrays.warm(want, pages, slots[0]) if slots else 0

    def __len__(self) -> int:
        """How many adapters are registered (in any tier)."""
        return len(self._table.entries)

    def adapter(self, name: str) -> AdapterSpec:
        """The registered adapter's spec (shapes, ranks; no weights)."""
        with self._lock:
            return self._table.get(name).spec

    def where(self, name: str) -> str:
        """"device" (ready to serve), "loading" (pages reserved, copy in flight), "host" (its
        weights in host memory) or "disk" (only there, or being read)."""
        with self._lock:
            e = self._table.get(name)
            return e.state if e.state != "host" else ("host" if e.host is not None else "disk")

    def slot(self, name: str) -> int | None:
        """The adapter's page-table row if it is resident (ready), else None."""
        with self._lock:
            e = self._table.get(name)
            return e.slot if e.state == "device" else None

    def in_memory(self) -> dict[str, str]:
        """{name: "device" | "loading" | "host"} of the adapters in host memory or on the device
        (as many as the two budgets hold; the others are on disk only)."""
        with self._lock:
            out = dict.fromkeys(self.host.lru, "host")
            out.update(dict.fromkeys(self._table.loading, "loading"))
            out.update(dict.fromkeys(self._table.resident, "device"))
            return out

    def host_view(self, name: str) -> LoraAdapter:
        """The adapter as `LoraModule` views of its host copy (CPU assist's weights); valid while
        the copy is held (`acquire`). `AdapterError` if its weights are not in host memory."""
        with self._lock:
            e = self._table.get(name)
            if e.host is None:
                raise AdapterError(f"adapter {name!r} is not in host memory")
            return self.host.view(e)

    def _hold(self, name: str, attr: str, delta: int) -> Entry:
        with self._lock:
            e = self._table.get(name)
            if attr == "refcount" and e.refcount + delta < 0:
                raise ValueError(f"adapter {name!r} released more often than acquired")
            setattr(e, attr, max(0, getattr(e, attr) + delta))
            self._table.hold_changed(e)
            if delta > 0:
                self._table.touch(e)
                self.host.touch(e)
            return e

    def acquire(self, name: str) -> None:
        """One more request uses the adapter: never evicted or unregistered while any does."""
        self._hold(name, "refcount", 1)

    def release(self, name: str) -> None:
        """One request fewer uses the adapter (pairs with `acquire`)."""
        self._hold(name, "refcount", -1)

    def want(self, name: str) -> None:
        """A queued request will use the adapter: its read and copy may start before the request
        is admitted, and no other adapter's read or copy evicts it meanwhile (pairs with `unwant`,
        at admission or when the request ends). Unlike `acquire` it does not stop `unregister`."""
        with self._lock:
            e = self._table.get(name)
            e.wanted += 1
            self._table.hold_changed(e)

    def unwant(self, name: str) -> None:
        """One queued request fewer waits for the adapter (a no-op once it is unregistered)."""
        with self._lock:
            if name in self._table.entries:
                self._hold(name, "wanted", -1)

    def pin(self, name: str) -> None:
        """Never evict this adapter (it may still be loaded, unregistered, or not yet resident)."""
        with self._lock:
            e = self._table.get(name)
            e.pinned = True
            self._table.hold_changed(e)

    def unpin(self, name: str) -> None:
        """Make the adapter evictable again (least recently used first)."""
        with self._lock:
            e = self._table.get(name)
            e.pinned = False
            self._table.hold_changed(e)

    def touch(self, name: str) -> None:
        """Mark the adapter used now (eviction takes the least recently used first)."""
        with self._lock:
            e = self._table.get(name)
            self._table.touch(e)
            self.host.touch(e)

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
            if self._table.loading or self._table.resident:
                raise RuntimeError("shard the adapter pool before loading adapters")
            self.arrays.shard(shardings)

    def stats(self) -> dict:
        """Budgets and usage of both tiers, and a summary of where the adapters are: counts per
        tier, and by name only those on the device, loading, being read or held (bounded by the
        slots and the requests, never by how many are registered)."""
        with self._lock:
            table, held = self._table, self._table.holding.values()
            host = self.host.stats()
            return {
                "adapters": len(table.entries),
                "device_budget_bytes": self.device_budget_bytes,
                "device_bytes_used": (self.num_pages - len(table.free_pages)) * self.page_bytes,
                "page_bytes": self.page_bytes, "pages_total": self.num_pages,
                "pages_free": len(table.free_pages),
                "slots_total": self.max_slots, "slots_free": len(table.free_slots),
                "host_budget_bytes": self.host_budget_bytes, "host_bytes_used": self.host.bytes_used,
                "on_device": table.names("device"), "loading": table.names("loading"),
                "disk_only": len(table.entries) - host["host_adapters"] - sum(
                    e.host is None for e in (*table.resident.values(),
                                             *(table.entries[n] for n in table.loading))),
                "pinned": sorted(e.name for e in held if e.pinned),
                "in_use": {e.name: e.refcount for e in held if e.refcount},
                "wanted": {e.name: e.wanted for e in held if e.wanted},
                **host, **self.link.stats(),
            }

    def close(self) -> None:
        """Stop the loader and reader threads; copies in flight are dropped (their adapters go
        back to host)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for name in list(self._table.loading):
                self._table.free(self._table.entries[name])
        self.link.close()
        self.host.close()

    def __enter__(self) -> AdapterPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["AdapterPool", "PoolFullError"]
