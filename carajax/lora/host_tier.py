"""The host tier: adapters' weights in host memory, least recently used first, within a byte
budget; behind it the disk, read by a thread of its own.

Three tiers (vLLM keeps `max_cpu_loras` in host memory and reads the rest from disk; S-LoRA and
LoRAX serve thousands of adapters per GPU the same way):
- **disk**: every registered adapter, as its `AdapterSpec` (name, path, shapes, ranks);
- **host**: the adapters whose weights are in host memory, once each, in the layout a copy to the
  device moves (`pages.flat_pages`; CPU assist reads views of the same buffer), LRU within
  `budget` bytes;
- **device**: the paged pool (`carajax.lora.residency`).

An adapter only on disk is read on the reader thread (`request`), never on the engine's: its
bytes are reserved first, evicting least recently used host copies that nobody needs (pinned,
used by a running request, wanted by a queued one, being copied to the device, or registered from
memory: never); with no room it waits (`pending`) until some is freed. A read checks the file
again as registration did (a deleted, corrupted or reshaped file fails that read, with its cause,
and the requests waiting on it; nothing else). Reads are timed: `seconds` predicts one from the
measured bandwidth and latency (`stats`), which `auto`, the routers and the simulator price.

Bookkeeping only runs under the pool's lock; the reader thread calls back into the pool
(`on_read`) once a read ends, and touches nothing else.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from carajax.config import ModelConfig
from carajax.lora.adapter import AdapterError, LoraAdapter, load_adapter
from carajax.lora.pages import MODULE_ORDER, copy_bytes, flat_pages, module_views
from carajax.lora.residency import Entry
from carajax.lora.spec import spec_of

# Until reads are measured, predictions assume a local SSD through the page cache.
PRIOR_BYTES_PER_S, PRIOR_LATENCY_S = 1e9, 1e-3


def host_nbytes(host: tuple) -> int:
    """Host bytes of a host copy: (flat pages, ranks, scales)."""
    return sum(x.nbytes for x in host)


@dataclasses.dataclass(eq=False)
class Read:
    """One disk read: bytes reserved in the budget when it starts, its host copy (or error)
    written by the reader thread."""

    entry: Entry
    nbytes: int  # host bytes reserved for its copy
    started: float = dataclasses.field(default_factory=time.monotonic)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    host: tuple | None = None
    error: BaseException | None = None
    cancelled: bool = False  # unregistered meanwhile: the result is dropped


class HostTier:
    """LRU host copies within `budget` bytes (None: unlimited), in the layout of a pool of
    `page_rank` pages in `dtype`; reads in flight and waiting, read timings, the reader thread."""

    def __init__(self, config: ModelConfig, *, budget: int | None, page_rank: int, dtype,
                 max_rank: int, on_read: Callable[[Read], None],
                 on_evict: Callable[[str], None] | None = None):
        self.config, self.page_rank, self.dtype, self.max_rank = config, page_rank, dtype, max_rank
        self.budget = budget
        self.lru: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self.bytes_used = 0  # host copies + reads in flight
        self.reads: set[Read] = set()
        self.pending: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self.failures = self.done = 0  # reads that failed, that landed
        self.times: collections.deque[tuple[int, float]] = collections.deque(maxlen=64)
        self.on_evict = on_evict  # called with a name when its host copy is dropped
        self._on_read = on_read
        self._queue: queue.Queue[Read | None] = queue.Queue()
        self.thread = threading.Thread(target=self._reader, name="carajax-adapter-reader",
                                       daemon=True)
        self.thread.start()

    # -- the layout -----------------------------------------------------------------------------
    def nbytes(self, adapter) -> int:
        """Host bytes of an adapter's (`LoraAdapter` or `AdapterSpec`) copy: pages, ranks, scales."""
        return (copy_bytes(adapter, self.config, self.page_rank, self.dtype.itemsize)
                + 2 * 4 * len(MODULE_ORDER) * self.config.num_layers)

    def stage(self, adapter: LoraAdapter) -> tuple:
        """An adapter parsed from its file, as the host tier keeps it (`pages.flat_pages`)."""
        return flat_pages(adapter, self.config, -(-adapter.rank // self.page_rank),
                          self.page_rank, self.dtype)

    def view(self, e: Entry) -> LoraAdapter:
        """`e` as `LoraModule` views of its host copy (what CPU assist computes from)."""
        return module_views(e.spec, e.host, self.config, self.page_rank)

    def read(self, e: Entry) -> tuple:
        """`e`'s file read, checked as at registration, and staged (on the reader thread)."""
        spec = e.spec
        adapter = load_adapter(spec.path, self.config, max_rank=self.max_rank, name=spec.name)
        if not spec_of(adapter, self.config).same_shape(spec):
            raise AdapterError(f"{spec.path}: its projections, ranks or scales changed since it "
                               f"was registered as {spec.name!r}")
        return self.stage(adapter)

    # -- bookkeeping (under the pool's lock) -----------------------------------------------------
    @staticmethod
    def keeps(e: Entry) -> bool:
        """Whether `e`'s host copy must stay: held, being copied, or nowhere else to read from."""
        return e.held or e.state == "loading" or e.device_wanted or not e.on_disk

    def room(self, nbytes: int) -> bool:
        """Whether `nbytes` fit now without evicting anything."""
        return self.budget is None or self.bytes_used + nbytes <= self.budget

    def make_room(self, nbytes: int) -> bool:
        """Evict least recently used host copies nobody keeps until `nbytes` fit; False (evicting
        nothing) if they cannot."""
        if self.room(nbytes):
            return True
        over, victims = self.bytes_used + nbytes - self.budget, []
        for e in self.lru.values():
            if over <= 0:
                break
            if not self.keeps(e):
                victims.append(e)
                over -= host_nbytes(e.host)
        if over > 0:
            return False
        for e in victims:
            self.drop(e)
        return True

    def add(self, e: Entry, host: tuple, reserved: int = 0) -> None:
        """`e`'s host copy joins the tier (its bytes counted: `reserved` of them already were)."""
        e.host = host
        self.bytes_used += host_nbytes(host) - reserved
        self.lru[e.name] = e

    def touch(self, e: Entry) -> None:
        if e.name in self.lru:
            self.lru.move_to_end(e.name)

    def drop(self, e: Entry) -> None:
        """Forget `e`'s host copy (evicted, or unregistered)."""
        if self.lru.pop(e.name, None) is not None:
            self.bytes_used -= host_nbytes(e.host)
            e.host = None
            if self.on_evict is not None:
                self.on_evict(e.name)

    def request(self, e: Entry) -> bool:
        """Start reading `e` from disk unless its copy is here or coming; True if it is, False
        if it waits for room (`pending`, retried by `retry`)."""
        if e.host is not None or e.read is not None:
            return True
        nbytes = self.nbytes(e.spec)
        if not self.make_room(nbytes):
            self.pending[e.name] = e
            return False
        self.pending.pop(e.name, None)
        r = Read(e, nbytes)
        e.read, e.read_error = r, None
        self.bytes_used += nbytes
        self.reads.add(r)
        self._queue.put(r)
        return True

    def retry(self) -> None:
        """Start the waiting reads that fit now, oldest first; drop those nobody wants anymore."""
        for name, e in list(self.pending.items()):
            if not (e.wanted or e.refcount):  # its requests ended
                del self.pending[name]
                e.device_wanted = False
            elif not self.request(e):
                break

    def cancel(self, e: Entry) -> None:
        """`e` is unregistered: drop its copy, its wait, and the result of a read in flight."""
        self.drop(e)
        self.pending.pop(e.name, None)
        if e.read is not None:
            e.read.cancelled = True
            e.read = None

    def landed(self, r: Read) -> None:
        """A read ended: its reservation becomes its copy, or is given back."""
        self.reads.discard(r)
        e = r.entry
        if r.cancelled or r.error is not None:
            self.bytes_used -= r.nbytes
            if not r.cancelled:
                self.failures += 1
                e.read, e.read_error = None, f"{type(r.error).__name__}: {r.error}"
            return
        e.read = None
        self.done += 1
        self.times.append((e.spec.file_bytes, time.monotonic() - r.started))
        self.add(e, r.host, reserved=r.nbytes)

    # -- predictions and stats ------------------------------------------------------------------
    def link(self) -> tuple[float, float]:
        """(bytes per second, latency in seconds) of disk reads: fitted to the recent reads (a
        line through (bytes, seconds) when their sizes differ, else their mean rate), the prior
        before any."""
        if not self.times:
            return PRIOR_BYTES_PER_S, PRIOR_LATENCY_S
        nbytes, secs = np.array(self.times, np.float64).T
        if len(self.times) >= 4 and nbytes.max() > 1.5 * nbytes.min():
            slope, latency = np.polyfit(nbytes, secs, 1)
            if slope > 0 and latency >= 0:
                return 1.0 / slope, float(latency)
        return float(nbytes.sum() / max(secs.sum(), 1e-9)), 0.0

    def seconds(self, file_bytes: int, *, alone: bool = False) -> float:
        """Predicted seconds until a read of `file_bytes` started now lands: the reads queued
        before it (unless `alone`), then its own."""
        bandwidth, latency = self.link()
        ahead = [] if alone else list(self.reads)
        queued = sum(r.entry.spec.file_bytes for r in ahead)
        return (len(ahead) + 1) * latency + (queued + file_bytes) / bandwidth

    def stats(self) -> dict:
        bandwidth, latency = self.link()
        return {"host_adapters": len(self.lru), "reading": sorted(r.entry.name for r in self.reads),
                "reads_waiting_for_memory": len(self.pending), "reads": self.done,
                "read_failures": self.failures, "read_bytes_per_s": bandwidth,
                "read_latency_ms": 1e3 * latency}

    # -- the reader thread ------------------------------------------------------------------------
    def close(self) -> None:
        self._queue.put(None)
        self.thread.join(timeout=10)

    def _reader(self) -> None:
        while (r := self._queue.get()) is not None:
            if not r.cancelled:
                try:
                    r.host = self.read(r.entry)
                except Exception as err:  # the requests waiting on it fail; the engine serves on
                    r.error = err
            self._on_read(r)
            r.done.set()


__all__ = ["HostTier", "Read", "host_nbytes"]
