"""Which adapter is where in the adapter pool: bookkeeping only, no arrays and no lock (the pool's).

Every registered adapter has an `Entry`: its spec (`carajax.lora.spec`: shapes and ranks, no
weights), its host copy while it is in the host tier (`carajax.lora.host_tier`), its device state
("host": not on the device, whether its weights are in host memory or only on disk; "loading":
pages and a slot reserved, its copy in flight; "device": ready to serve), the device pages and
page-table slot it holds, and who holds it: requests running with it (`refcount`), queued requests
whose copy or read started at submit (`wanted`), a pin. A copy makes room by evicting the least
recently used device adapters that nobody holds (`reserve`); a loading adapter is never evicted.
An evicted adapter's weights stay in the pool arrays until its pages and slot are reused.

Nothing here walks every registered adapter: the device-resident ones (at most a slot each) and
the held ones (pinned, in use, wanted: at most the requests and pins) are kept apart, so an
engine with 10,000 adapters registered plans a copy and reports its state as one with ten does.
"""

from __future__ import annotations

import dataclasses
import itertools

from carajax.lora.adapter import AdapterError
from carajax.lora.link import Copy
from carajax.lora.spec import AdapterSpec


@dataclasses.dataclass(eq=False)
class Entry:
    spec: AdapterSpec
    n_pages: int
    copy_bytes: int  # its pages of the projections it targets: what a copy moves
    order: int = 0  # registration order (lists of adapters follow it)
    host: tuple | None = None  # its host copy (`pages.flat_pages`) while in the host tier
    on_disk: bool = True  # False: registered from memory, so it never leaves the host tier
    read: object | None = None  # its disk read in flight (`host_tier.Read`)
    read_error: str | None = None  # why its last read failed (cleared by the next read)
    device_wanted: bool = False  # copy it to the device once its read lands
    state: str = "host"  # "host" (not on the device) | "loading" | "device"
    slot: int | None = None  # reserved from prefetch on
    pages: list[int] = dataclasses.field(default_factory=list)
    load: Copy | None = None
    refcount: int = 0
    wanted: int = 0  # queued requests whose copy started at submit (`AdapterPool.want`)
    pinned: bool = False
    last_used: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def held(self) -> bool:
        """Pinned, used by a running request, or wanted by a queued one."""
        return self.pinned or self.refcount > 0 or self.wanted > 0


class Residency:
    """The entries by name, the device-resident and held ones, the copies in flight (in start
    order), the free pages and slots."""

    def __init__(self, num_pages: int, max_slots: int):
        self.entries: dict[str, Entry] = {}
        self.loading: dict[str, Copy] = {}
        self.resident: dict[str, Entry] = {}  # state "device"
        self.holding: dict[str, Entry] = {}  # `Entry.held`
        self.free_pages, self.free_slots = set(range(num_pages)), set(range(max_slots))
        self._clock = itertools.count(1)  # LRU timestamps
        self._order = itertools.count()

    def get(self, name: str) -> Entry:
        e = self.entries.get(name)
        if e is None:
            raise AdapterError(f"unknown adapter {name!r}")
        return e

    def add(self, e: Entry) -> None:
        e.order = next(self._order)
        self.entries[e.name] = e

    def remove(self, e: Entry) -> None:
        self.free(e)
        self.holding.pop(e.name, None)
        del self.entries[e.name]

    def touch(self, e: Entry) -> None:
        """Used now: the last to be evicted."""
        e.last_used = next(self._clock)

    def hold_changed(self, e: Entry) -> None:
        """Call after changing a pin, a refcount or a want."""
        if e.held:
            self.holding[e.name] = e
        else:
            self.holding.pop(e.name, None)

    def names(self, state: str) -> list[str]:
        """Adapters in the device state "loading" or "device", in registration order."""
        found = self.resident.values() if state == "device" else (
            self.entries[n] for n in self.loading)
        return [e.name for e in sorted(found, key=lambda e: e.order)]

    def victims(self, n_pages: int) -> list[Entry] | None:
        """Least-recently-used evictable adapters whose pages and slot make room, or None."""
        free_pages, free_slots = len(self.free_pages), len(self.free_slots)
        candidates = sorted((e for e in self.resident.values() if not e.held),
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
        self.loading[e.name] = copy

    def installed(self, e: Entry) -> None:
        e.state, e.load = "device", None
        self.resident[e.name] = e
        self.touch(e)

    def free(self, e: Entry) -> None:
        """Off the device: free its pages and slot (cancelling a copy in flight)."""
        if e.load is not None:
            e.load.cancelled = True
            self.loading.pop(e.name, None)
        self.resident.pop(e.name, None)
        self.free_pages.update(e.pages)
        if e.slot is not None:
            self.free_slots.add(e.slot)
        e.state, e.slot, e.pages, e.load = "host", None, [], None


__all__ = ["Entry", "Residency"]
