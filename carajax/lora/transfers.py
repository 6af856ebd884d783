"""Moving adapters between the pool's tiers: disk reads into the host tier, copies to the device,
their installs, and what each is predicted to take.

`Transfers` is the part of `carajax.lora.pool.AdapterPool` that moves weights; the pool itself
registers adapters, answers where they are and who holds them. A read runs on the host tier's
reader thread (`carajax.lora.host_tier`); a copy is staged on the link's loader thread, on the
reader thread right after the read it waited for, or on a caller's (`prefetch(here=True)`); the
install runs on the engine thread (`poll`, `load_now`). Methods named with an underscore run under
the pool's lock.
"""

from __future__ import annotations

import time

import jax

from carajax.lora.adapter import AdapterError, LoraAdapter
from carajax.lora.host_tier import Read
from carajax.lora.link import Copy
from carajax.lora.pages import copy_bytes, staged_modules
from carajax.lora.residency import Entry
from carajax.lora.spec import AdapterSpec


class PoolFullError(RuntimeError):
    """The pool cannot take an adapter now: pinned, in-use and loading adapters hold the device
    pages or slots it needs, or the host memory its read needs."""


class Transfers:
    """Reads, copies and installs of `AdapterPool` (its `_lock`, `_table`, `host`, `link`,
    `arrays`)."""

    # -- the host tier -------------------------------------------------------------------------
    def fetch(self, name: str) -> str | None:
        """Make sure the adapter's weights are in host memory or coming (a disk read on the reader
        thread, or waiting for room in the host budget): None once they are in host memory or on
        the device; "reading" meanwhile; or why its last read failed (the next `fetch` retries)."""
        with self._lock:
            e = self._table.get(name)
            self.host.touch(e)
            if e.host is not None or e.state == "device":
                return None
            if e.read_error is not None:
                error, e.read_error = e.read_error, None
                return f"adapter {name!r} could not be read from {e.spec.path}: {error}"
            self._fetch(e)
            return "reading"

    def _fetch(self, e: Entry) -> bool:
        return e.host is not None or self.host.request(e)

    def _on_read(self, r: Read) -> None:
        """The reader thread, once a read ends: the copy joins the host tier, and its copy to the
        device starts here if one was asked for meanwhile."""
        job = None
        with self._lock:
            self.host.landed(r)
            e = r.entry
            if r.cancelled or r.error is not None:
                e.device_wanted = False
                return
            if e.device_wanted and e.state == "host" and not self._closed:
                e.device_wanted = False
                if self._start_load(e, queue=False):
                    job = e.load
        if job is not None:
            self.link.run(job)

    # -- device tier ---------------------------------------------------------------------------
    def prefetch(self, name: str, *, here: bool = False) -> bool:
        """Start an asynchronous copy to the device (no-op if resident or loading); an adapter
        only on disk is read first, on the reader thread, and copied from there. Pages and a slot
        are reserved now, evicting least-recently-used adapters that are neither pinned nor in
        use nor wanted; returns False (evicting nothing) if that cannot make room now, or the
        read cannot start for lack of host memory (both are retried by the next prefetch).

        `here`: stage the copy on the calling thread (host page layout + `device_put`, which is
        asynchronous on an accelerator) instead of the loader thread: for threads that are not
        the engine's, e.g. a request's submitter, it saves the hand-off to the loader."""
        with self._lock:
            e = self._table.get(name)
            self._table.touch(e)
            self.host.touch(e)
            if e.state != "host":
                return True
            if e.host is None:
                if self._closed:
                    raise RuntimeError("the adapter pool is closed")
                e.device_wanted = True
                return self._fetch(e)
            if not self._start_load(e, queue=not here):
                return False
            job = e.load
        self.link.run(job)
        return True

    def poll(self) -> list[str]:
        """Non-blocking: start the reads that wait for host memory if some is free now, install
        every finished copy (staged arrays ready and the emulated deadline passed); returns the
        names that became resident, in copy order."""
        with self._lock:
            if self.host.pending:
                self.host.retry()
            now = time.monotonic()
            ready = [n for n, job in self._table.loading.items() if job.is_ready(now)]
            for name in ready:
                self._finish(name)
            return ready

    def load_now(self, name: str) -> float:
        """Blocking load (the `wait` policy; `Engine.logits`, pins): returns once the adapter is
        resident, including a disk read and the emulated link delay; returns the seconds blocked.
        `PoolFullError` if it cannot fit now; `AdapterError` if its file cannot be read."""
        t0 = time.monotonic()
        with self._lock:
            e = self._table.get(name)
            read = None
            if e.host is None and e.state == "host":
                if not self._fetch(e):
                    self._host_full(e)
                read, e.device_wanted = e.read, True  # copied from the reader thread once read
        if read is not None:
            read.done.wait()
            if read.error is not None:
                raise AdapterError(f"adapter {name!r} could not be read from {e.spec.path}: "
                                   f"{type(read.error).__name__}: {read.error}")
        with self._lock:
            e = self._table.get(name)
            self._table.touch(e)
            if e.state == "device":
                return time.monotonic() - t0
            if e.state == "host" and e.host is None:  # read, but evicted before its copy began
                self._host_full(e)
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

    def _host_full(self, e: Entry) -> None:
        e.device_wanted = False
        raise PoolFullError(f"adapter {e.name!r} needs {self.host_bytes(e.spec)} bytes of host "
                            "memory to be read; adapters that cannot be evicted fill "
                            f"host_budget_bytes={self.host_budget_bytes}")

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
                if self._table.entries[name].host is not None:
                    self.prefetch(name)
        for name in names:
            self.load_now(name)

    # -- internals (callers hold the lock) -----------------------------------------------------
    def _start_load(self, e: Entry, queue: bool = True) -> bool:
        if self._closed:
            raise RuntimeError("the adapter pool is closed")
        if not self._table.reserve(e):
            return False
        nbytes = e.copy_bytes
        predicted = self.link.predict(nbytes, self._table.loading.values())
        self._table.loading_started(e, Copy(
            spec=e.spec, n_pages=e.n_pages, ready_at=self.link.deadline(nbytes), nbytes=nbytes,
            host=e.host, started=time.monotonic(), predicted_s=predicted))
        if queue:
            self.link.submit(e.load)
        return True

    # -- the link -----------------------------------------------------------------------------
    def copy_bytes(self, adapter: LoraAdapter | AdapterSpec) -> int:
        """Bytes one copy of `adapter` moves: its pages of the projections it targets
        (`pages.staged_modules`; the pool reserves its pages in every projection)."""
        return copy_bytes(adapter, self.config, self.page_rank, self.dtype.itemsize)

    def read_seconds(self, name: str) -> float:
        """Predicted seconds until the adapter's weights are in host memory (0 if they are)."""
        with self._lock:
            e = self._table.get(name)
            if e.host is not None or e.state != "host":
                return 0.0
            if e.read is not None:
                return max(0.0, e.read.started + self.host.seconds(e.spec.file_bytes, alone=True)
                           - time.monotonic())
            return self.host.seconds(e.spec.file_bytes)

    def copy_seconds(self, name: str) -> float:
        """Predicted seconds until `name` is resident if its copy started now (0 if it is; the
        time left if it is loading): a disk read first if it is only on disk, then the link's
        backlog, its latency, bytes / bandwidth (the emulated link's numbers, or `measure_link`'s
        on a real device)."""
        read_s = self.read_seconds(name)
        with self._lock:
            e = self._table.get(name)
            if e.state == "device":
                return 0.0
            if e.state == "loading":
                return max(0.0, e.load.started + e.load.predicted_s - time.monotonic())
            return read_s + self.link.predict(e.copy_bytes, self._table.loading.values())

    def measure_link(self, nbytes: int = 16 << 20, repeats: int = 3) -> tuple[float, float]:
        """(bytes per second, latency in seconds) of host -> device copies (`Link.measure`)."""
        return self.link.measure(nbytes, repeats)

    def _finish(self, name: str) -> None:
        """Install a staged copy: pages, page-table row, ranks and scales of its slot."""
        e, job = self._table.entries[name], self._table.loading.pop(name)
        if job.error is not None:
            self._table.free(e)
            raise RuntimeError(f"copying adapter {name!r} to the device failed: {job.error}") from job.error
        self.arrays.install(job.staged, e.slot, e.pages, staged_modules(e.spec))
        # Seen at the first poll after it landed: the time a request waiting on it saw.
        self.link.landed(job)
        self._table.installed(e)

    def _stage(self, job: Copy) -> tuple:
        """(device arrays to wait for, the install function, its staged arguments): run by the
        link on the loader thread, the reader's or a `prefetch(here=True)` caller's."""
        return self.arrays.stage(job.spec, job.n_pages, job.host)


__all__ = ["PoolFullError", "Transfers"]
