"""The host-to-device link the adapter pool's copies cross, and the thread that feeds it.

A copy (`Copy`) is reserved by the pool, staged (`carajax.lora.pages.stage`: host pages, one
`jax.device_put`) on the loader thread or on the caller's, and installed by the pool on the engine
thread once it is ready. The link knows what a copy costs: its bandwidth and latency, measured
once with `device_put` on a real device, or emulated. On machines without an accelerator
`device_put` is near-instant, so `emulated_gbps` delays each copy's readiness to what a PCIe link
of that bandwidth would take; emulated copies share one link, one after another.

Not locked itself: the pool calls it under its own lock, except for staging (`run`), which
touches only its copy.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable

import jax
import numpy as np

from carajax.lora.spec import AdapterSpec


@dataclasses.dataclass(eq=False)
class Copy:
    """One host-to-device copy: reserved by `AdapterPool.prefetch`, staged on the loader thread,
    installed on the engine thread. The stager writes `staged`/`error` before setting `done`."""

    spec: AdapterSpec
    n_pages: int
    ready_at: float  # emulated link deadline (time.monotonic); 0: no emulation
    nbytes: int = 0  # what crosses the link (`AdapterPool.copy_bytes`)
    host: tuple | None = None  # the entry's host copy (flat pages, ranks, scales): what it moves
    started: float = 0.0  # time.monotonic() when the copy was queued
    predicted_s: float = 0.0  # `Link.predict` when it was queued
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    staged: tuple | None = None  # `pages.stage`: (device arrays, install fn, its args)
    error: BaseException | None = None
    cancelled: bool = False

    def is_ready(self, now: float) -> bool:
        """Staged, its arrays on the device and (emulated) its deadline passed; or failed."""
        if not self.done.is_set():
            return False
        if self.error is not None:
            return True  # the pool's install reports it
        return now >= self.ready_at and all(x.is_ready() for x in self.staged[0])


class Link:
    """Bandwidth and latency (emulated or measured), emulated deadlines, predicted copy times,
    and the loader thread that runs `stage(copy)` for queued copies."""

    def __init__(self, stage: Callable[[Copy], tuple], *, emulated_gbps: float | None = None,
                 latency_ms: float = 0.0):
        self.emulated_gbps = emulated_gbps
        self.latency_s = latency_ms / 1e3  # emulated only
        self.free_at = 0.0  # when the emulated link finishes its queued copies
        self._measured: tuple[float, float] | None = None  # (bytes/s, latency s)
        # (predicted, real) seconds of recent copies, real = queued -> installed by the pool.
        self.copies: collections.deque[tuple[float, float]] = collections.deque(maxlen=256)
        self._stage = stage
        self._queue: queue.Queue[Copy | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loader, name="carajax-adapter-loader", daemon=True)
        self.thread.start()

    def measure(self, nbytes: int = 16 << 20, repeats: int = 3) -> tuple[float, float]:
        """(bytes per second, latency in seconds) of host -> device copies, measured once with
        `jax.device_put` of a buffer of `nbytes` and of a tiny one (medians of `repeats`); the
        emulated link's own numbers when one is set."""
        if self.emulated_gbps is not None:
            return self.emulated_gbps * 1e9, self.latency_s
        if self._measured is None:
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
            self._measured = (nbytes / max(big - small, 1e-9), small)
        return self._measured

    def predict(self, nbytes: int, in_flight: Iterable[Copy]) -> float:
        """Seconds until a copy of `nbytes` started now lands: the backlog (the emulated link's
        queue, or the bytes of the copies in flight), its latency, bytes / bandwidth."""
        bandwidth, latency = self.measure()
        backlog = max(0.0, self.free_at - time.monotonic()) if self.emulated_gbps else (
            sum(c.nbytes for c in in_flight) / bandwidth)
        return backlog + latency + nbytes / bandwidth

    def deadline(self, nbytes: int) -> float:
        """When an emulated copy of `nbytes` started now finishes (copies serialize over one
        link); 0 without emulation (ready once staged)."""
        if self.emulated_gbps is None:
            return 0.0
        start = max(time.monotonic(), self.free_at)
        self.free_at = start + self.latency_s + nbytes / (self.emulated_gbps * 1e9)
        return self.free_at

    def landed(self, copy: Copy) -> None:
        """`copy` was installed just now: its predicted and real seconds join `copies`."""
        self.copies.append((copy.predicted_s, time.monotonic() - copy.started))

    def stats(self) -> dict:
        """How many copies `copies` holds, and their median predicted and real milliseconds."""
        def median_ms(xs: list[float]) -> float | None:
            return 1e3 * float(np.median(xs)) if xs else None
        return {"copies": len(self.copies),
                "copy_predicted_ms_median": median_ms([p for p, _ in self.copies]),
                "copy_real_ms_median": median_ms([r for _, r in self.copies])}

    def submit(self, copy: Copy) -> None:
        """Stage `copy` on the loader thread."""
        self._queue.put(copy)

    def run(self, copy: Copy) -> None:
        """Stage `copy` on the calling thread (or the loader's); errors wait in `copy.error`."""
        if not copy.cancelled:
            try:
                copy.staged = self._stage(copy)
            except Exception as err:  # reported on the engine thread by the pool's install
                copy.error = err
        copy.done.set()

    def close(self) -> None:
        """Stop the loader thread (after the copies queued before)."""
        self._queue.put(None)
        self.thread.join(timeout=10)

    def _loader(self) -> None:
        """Background thread: host pages -> device (`jax.device_put`); never touches the pool."""
        while (copy := self._queue.get()) is not None:
            self.run(copy)


__all__ = ["Copy", "Link"]
