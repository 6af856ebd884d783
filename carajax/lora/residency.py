"""Which adapter is where in the adapter pool: bookkeeping only, no arrays and no lock (the pool's).

Every registered adapter has an `Entry`: its state ("host"; "loading": pages and a slot reserved,
its copy in flight; "device": ready to serve), the device pages and page-table slot it holds, and
who holds it there: requests running with it (`refcount`), queued requests whose copy started
at submit (`wanted`), a pin. A copy makes room by evicting the least recently used adapters that
nobody holds (`reserve`); a loading adapter is never evicted. An evicted adapter's weights stay
in the pool arrays until its pages and slot are reused.
"""

from __future__ import annotations

import dataclasses
import itertools

from carajax.lora.adapter import AdapterError, LoraAdapter
from carajax.lora.link import Copy


@dataclasses.dataclass(eq=False)
class Entry:
    adapter: LoraAdapter
    n_pages: int
    copy_bytes: int  # its pages of the projections it targets: what a copy moves
    host: tuple | None = None  # its staged copy (`AdapterPool.stage_host`), None when sharded
    state: str = "host"  # "host" | "loading" | "device"
    slot: int | None = None  # reserved from prefetch on
    pages: list[int] = dataclasses.field(default_factory=list)
    load: Copy | None = None
    refcount: int = 0
    wanted: int = 0  # queued requests whose copy started at submit (`AdapterPool.want`)
    pinned: bool = False
    last_used: int = 0


class Residency:
    """The entries by name, the copies in flight (in start order), the free pages and slots."""

    def __init__(self, num_pages: int, max_slots: int):
        self.entries: dict[str, Entry] = {}
        self.loading: dict[str, Copy] = {}
        self.free_pages, self.free_slots = set(range(num_pages)), set(range(max_slots))
        self._clock = itertools.count(1)  # LRU timestamps

    def get(self, name: str) -> Entry:
        if name not in self.entries:
            raise AdapterError(f"unknown adapter {name!r}")
        return self.entries[name]

    def touch(self, e: Entry) -> None:
        """Used now: the last to be evicted."""
        e.last_used = next(self._clock)

    def names(self, state: str) -> list[str]:
        return [n for n, e in self.entries.items() if e.state == state]

    def victims(self, n_pages: int) -> list[Entry] | None:
        """Least-recently-used evictable adapters whose pages and slot make room, or None."""
        free_pages, free_slots = len(self.free_pages), len(self.free_slots)
        candidates = sorted((e for e in self.entries.values()
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

    def reserve(self, e: Entry) -> bool:
        """Pages and a slot for `e`'s copy, evicting `victims`; False (evicting nothing) if no
        room can be made now."""
        victims = self.victims(e.n_pages)
        if victims is None:
            return False
        for v in victims:  # their weights stay in the pool until the pages are overwritten
            self.free(v)
        e.pages = sorted(self.free_pages)[:e.n_pages]
        self.free_pages.difference_update(e.pages)
        e.slot = min(self.free_slots)
        self.free_slots.remove(e.slot)
        return True

    def loading_started(self, e: Entry, copy: Copy) -> None:
        e.load, e.state = copy, "loading"
        self.loading[e.adapter.name] = copy

    def installed(self, e: Entry) -> None:
        e.state, e.load = "device", None
        self.touch(e)

    def free(self, e: Entry) -> None:
        """Back to host only: free its pages and slot (cancelling a copy in flight)."""
        if e.load is not None:
            e.load.cancelled = True
            self.loading.pop(e.adapter.name, None)
        self.free_pages.update(e.pages)
        if e.slot is not None:
            self.free_slots.add(e.slot)
        e.state, e.slot, e.pages, e.load = "host", None, [], None


__all__ = ["Entry", "Residency"]
