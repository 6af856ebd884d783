"""Which path a cold request takes (`cold_start="auto"`): CPU-assisted prefill now, or wait in
the queue while its adapter's copy runs (`async`).

CPU assist pays off when the copy takes longer than the host needs to compute the request's LoRA
for its prompt: slow links, big adapters, slow accelerators (CaraServe's A10 over PCIe). On a fast
link with a long prompt, waiting for the copy is cheaper, and the warm rows beside it never stall
on host callbacks. Both paths then run the prompt's base model on the device, so the comparison is

    cpu_s  = prompt MACs of its LoRA x measured seconds per MAC + chunks x layers x callback time
    copy_s = the link's backlog + latency + adapter bytes / bandwidth   (`AdapterPool.copy_seconds`)

and the request takes CPU assist iff cpu_s < copy_s (it hands over to the device when the copy
lands, as `cpu_assist` does). The numbers are measured where the engine runs: the host's LoRA
throughput at the prefill chunk's size (its thread split included) and a host-callback round trip,
once per process and model shape; the link from the emulated settings or `measure_link`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from carajax.config import ModelConfig
from carajax.lora.adapter import LoraAdapter, LoraModule

PATHS = ("cpu_assist", "async")


@dataclasses.dataclass(frozen=True)
class HostLoraCost:
    """Measured host costs of CPU-assisted LoRA."""

    seconds_per_mac: float  # wall seconds per multiply-add at the chunk's size, threads included
    callback_s: float  # one host-callback round trip from a jitted step
    chunk: int  # prompt tokens per step (EngineConfig.prefill_chunk)

    def prefill_seconds(self, adapter: LoraAdapter, prompt_tokens: int, num_layers: int) -> float:
        """Host seconds the CPU path adds to a prefill of `prompt_tokens` with `adapter`."""
        macs_per_token = sum(m.rank * (m.a.shape[1] + m.b.shape[0]) for m in adapter.modules.values())
        chunks = max(1, math.ceil(prompt_tokens / self.chunk))
        return (prompt_tokens * macs_per_token * self.seconds_per_mac
                + chunks * num_layers * self.callback_s)


def measure_host_lora(worker, config: ModelConfig, rank: int, chunk: int,
                      repeats: int = 5) -> HostLoraCost:
    """Time the CPU worker on one q-projection-shaped job of `chunk` tokens at `rank` (what a
    CPU-assisted step sends, per projection), and a no-op host callback from a jitted function."""
    rng = np.random.default_rng(0)
    d = config.hidden_size
    module = LoraModule(a=rng.standard_normal((rank, d), np.float32) * 0.02,
                        b=rng.standard_normal((d, rank), np.float32) * 0.02, scale=1.0)
    x = rng.standard_normal((chunk, d), np.float32)
    worker.delta(x, module)  # warm: weights cached, threads started, CPU backend compiled
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        worker.delta(x, module)
        times.append(time.perf_counter() - t0)
    worker.evict(module)
    macs = chunk * rank * 2 * d
    noop = jax.jit(lambda v: jax.pure_callback(lambda h: h, jax.ShapeDtypeStruct(v.shape, v.dtype), v))
    v = jnp.zeros(8, jnp.float32)
    jax.block_until_ready(noop(v))
    calls = []
    for _ in range(repeats * 4):
        t0 = time.perf_counter()
        jax.block_until_ready(noop(v))
        calls.append(time.perf_counter() - t0)
    return HostLoraCost(seconds_per_mac=statistics.median(times) / macs,
                        callback_s=statistics.median(calls), chunk=chunk)


@dataclasses.dataclass(frozen=True)
class ColdChoice:
    """One cold request's decision and the two predictions behind it (seconds)."""

    path: str  # "cpu_assist" | "async"
    cpu_s: float
    copy_s: float


def choose(cost: HostLoraCost, adapter: LoraAdapter, prompt_tokens: int, num_layers: int,
           copy_s: float) -> ColdChoice:
    """CPU assist iff the host finishes the prompt's LoRA before the copy would land."""
    cpu_s = cost.prefill_seconds(adapter, prompt_tokens, num_layers)
    return ColdChoice("cpu_assist" if cpu_s < copy_s else "async", cpu_s, copy_s)
