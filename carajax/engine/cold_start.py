"""Which path a cold request takes (`cold_start="auto"`): CPU-assisted prefill now, or wait in
the queue while its adapter's copy runs (`async`).

CPU assist pays off when the copy takes longer than the host needs to compute the request's LoRA
for its prompt: slow links, big adapters, slow accelerators (CaraServe's A10 over PCIe). On a fast
link with a long prompt, waiting for the copy is cheaper, and the warm rows beside it never stall
on host callbacks. Both paths then run the prompt's base model on the device, so the comparison is

    cpu_s  = read + chunks x the CPU-assisted step's fixed cost + prompt MACs x seconds per MAC
    copy_s = read + the link's backlog + latency + adapter bytes / bandwidth (`copy_seconds`)

where `read` is 0 for an adapter in host memory, else its predicted disk read (the reads queued
before it, latency, file bytes / bandwidth, as measured: `AdapterPool.read_seconds`).

and the request takes CPU assist iff cpu_s < copy_s (it hands over to the device when the copy
lands, as `cpu_assist` does).

Both host terms are measured as the step runs them (`measure_host_path`): the engine's own
CPU-assisted step of one prefill chunk, every row cold, timed against the same step with no cold
row (the four callbacks a layer that move the chunk's activations to the host and back: the
fixed cost) and against the plain step, at two ranks (the MACs' cost: linear in rank). Live
CPU-assisted steps then refine the seconds per MAC (`HostPath.observe`, from the bridge's own
clock). Where the device IS the host (a CPU backend), none of this is run: the host's LoRA
would compete for the cores the step runs on, and `auto` sends every cold request to `async`
(`host_only`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np

from carajax.config import TARGET_MODULES, ModelConfig
from carajax.lora.adapter import LoraAdapter, LoraModule
from carajax.lora.spec import AdapterSpec

PATHS = ("cpu_assist", "async")
# Weight of a live step's observation in the running seconds-per-MAC estimate.
REFINE_WEIGHT = 0.2


def lora_macs_per_token(adapter: LoraAdapter | AdapterSpec) -> int:
    """Multiply-adds of an adapter's LoRA for one token, over all its layers and projections."""
    if isinstance(adapter, AdapterSpec):
        return adapter.macs_per_token
    return sum(m.rank * (m.a.shape[1] + m.b.shape[0]) for m in adapter.modules.values())


@dataclasses.dataclass(frozen=True)
class HostLoraCost:
    """Measured host costs of a CPU-assisted prefill."""

    seconds_per_mac: float  # host LoRA compute, threads included, at the chunk's size
    step_fixed_s: float  # one CPU-assisted chunk step's extra cost with nothing to compute
    chunk: int  # prompt tokens per step (EngineConfig.prefill_chunk)

    def prefill_seconds(self, adapter: LoraAdapter | AdapterSpec, prompt_tokens: int) -> float:
        """Seconds the CPU path adds to a prefill of `prompt_tokens` with `adapter`."""
        chunks = max(1, math.ceil(prompt_tokens / self.chunk))
        return (chunks * self.step_fixed_s
                + prompt_tokens * lora_macs_per_token(adapter) * self.seconds_per_mac)


def random_adapter(config: ModelConfig, rank: int, seed: int = 0) -> LoraAdapter:
    """An adapter of `rank` on every target projection of every layer (timing only)."""
    rng = np.random.default_rng(seed)
    modules = {}
    for layer in range(config.num_layers):
        for name in TARGET_MODULES:
            d_in, d_out = config.projection_shape(name)
            modules[(layer, name)] = LoraModule(
                a=(rng.standard_normal((rank, d_in)) * 0.02).astype(np.float32),
                b=(rng.standard_normal((d_out, rank)) * 0.02).astype(np.float32), scale=1.0)
    return LoraAdapter(name=f"timing-rank-{rank}", path="", modules=modules)


def measure_host_path(step: Callable[[int], None], register: Callable[[LoraAdapter], int],
                      unregister: Callable[[int], None], config: ModelConfig, chunk: int,
                      ranks: tuple[int, int], repeats: int = 5) -> HostLoraCost:
    """Time the engine's CPU-assisted step as it runs: `step(cold_id)` runs one prefill chunk
    step of `chunk` tokens, every row cold under bridge id `cold_id` (-1: the CPU-assisted
    variant with no cold row; None: the plain step) and waits for it. The fixed cost is the
    no-cold-row step over the plain one; the seconds per MAC come from the steps with adapters
    of the two `ranks` (on every projection), over their MACs.

    The variants run in interleaved rounds and each keeps its fastest time: a busy neighbour
    slows whole stretches of time, so timing one variant after another in blocks can make the
    fixed cost (a fraction of a millisecond per step) vanish into the load's drift."""
    adapters = [random_adapter(config, rank) for rank in sorted(set(ranks))]
    ids = [register(a) for a in adapters]
    try:
        variants = [None, -1, *ids]
        for cold_id in variants:
            step(cold_id)  # compile, first touch of the adapter's weights
        best = {cold_id: math.inf for cold_id in variants}
        for _ in range(repeats):
            for cold_id in variants:
                t0 = time.perf_counter()
                step(cold_id)
                best[cold_id] = min(best[cold_id], time.perf_counter() - t0)
    finally:
        for cid in ids:
            unregister(cid)
    plain, empty = best[None], best[-1]
    per_mac = [max(best[cid] - empty, 0.0) / (chunk * lora_macs_per_token(a))
               for cid, a in zip(ids, adapters)]
    return HostLoraCost(seconds_per_mac=max(statistics.fmean(per_mac), 1e-15),
                        step_fixed_s=max(empty - plain, 0.0), chunk=chunk)


@dataclasses.dataclass(frozen=True)
class ColdChoice:
    """One cold request's decision and the two predictions behind it (seconds; cpu_s is inf
    where CPU assist is not an option)."""

    path: str  # "cpu_assist" | "async"
    cpu_s: float
    copy_s: float


class HostPath:
    """`auto`'s view of the host path: the measured cost, refined from live steps, or none at
    all on a host-only device (where `choose` always answers `async`)."""

    def __init__(self, cost: HostLoraCost | None, *, host_only: bool):
        self.cost, self.host_only = cost, host_only
        self.observations = 0
        self._lock = threading.Lock()

    def choose(self, adapter: LoraAdapter | AdapterSpec, prompt_tokens: int, copy_s: float, *,
               read_s: float = 0.0) -> ColdChoice:
        """CPU assist iff the host finishes the prompt's LoRA before the copy would land. An
        adapter only on disk is read first either way: `read_s` (also inside `copy_s`) delays
        the host path too."""
        with self._lock:
            cost = self.cost
        if self.host_only or cost is None:
            return ColdChoice("async", math.inf, copy_s)
        cpu_s = read_s + cost.prefill_seconds(adapter, prompt_tokens)
        return ColdChoice("cpu_assist" if cpu_s < copy_s else "async", cpu_s, copy_s)

    def observe(self, host_s: float, macs: int) -> None:
        """A live CPU-assisted step's host work by the bridge's own clock: `host_s` seconds
        inside its callbacks while they computed `macs` multiply-adds (the callbacks' transfers
        lie outside that clock, in the measured fixed cost). Refines the seconds per MAC."""
        with self._lock:
            if self.cost is None or macs <= 0:
                return
            blended = ((1 - REFINE_WEIGHT) * self.cost.seconds_per_mac
                       + REFINE_WEIGHT * host_s / macs)
            self.cost = dataclasses.replace(self.cost, seconds_per_mac=blended)
            self.observations += 1

    def stats(self) -> dict:
        with self._lock:
            cost = self.cost
        if self.host_only:
            return {"host_only": True,
                    "note": "the device is this host's CPU: auto never picks cpu_assist"}
        return {"host_only": False, "observations": self.observations,
                **({"seconds_per_mac": cost.seconds_per_mac, "step_fixed_ms":
                    cost.step_fixed_s * 1e3, "chunk": cost.chunk} if cost else {})}
