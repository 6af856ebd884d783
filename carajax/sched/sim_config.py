"""The simulated cluster's shape, SLOs and modelling switches (`SimConfig`).

Below both the worker model (`sim_worker`) and the event loop (`sim_loop`), which read it, so that
neither has to import the other or the simulator's entry point (`simulator.simulate`).
"""

from __future__ import annotations

import dataclasses

from carajax.sched.step_noise import StepNoise

SIM_COLD_STARTS = ("wait", "cpu_assist", "async", "auto", "cached")


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """Cluster shape and SLOs (seconds).

    `adapter_pages` pages of `page_rank` rank each per worker (an adapter of rank r needs
    ceil(r / page_rank)); `kv_rows` KV-cache token rows per worker.
    """

    n_workers: int = 4
    max_batch: int = 32
    kv_rows: int = 1 << 20
    adapter_pages: int = 256
    page_rank: int = 8
    cold_start: str = "wait"  # "wait" | "cpu_assist" | "async" | "auto" | "cached"
    # Slowdown of prefill chunks run with their LoRA on the CPU (cold adapter under "cpu_assist"):
    # the step pays cpu_slowdown × Pre(those chunks as one batch) on top of its own price (its step
    # model, or Pre(all chunks) + Dec with two forwards, where a step of only CPU chunks then costs
    # (1 + cpu_slowdown) × Pre). 0.26 is the measured mean-TTFT overhead of
    # cpu_assist over cached in BENCHMARKS.md ("Cold starts", llama-test on a 2-core CPU, emulated
    # 25 GB/s link, every request cold), read as a prefill slowdown; it is rough (that TTFT also
    # holds queueing and mid-prefill handovers), and close to the paper's A10 figure (+22% TTFT).
    cpu_slowdown: float = 0.26
    # Chunked prefill, the engine's EngineConfig defaults: at most `prefill_chunk` prompt tokens per
    # request and `max_prefill_tokens` over all requests per step. prefill_chunk=0: whole prompts
    # in the admission step, no budget (the simulator before chunking; old results reproduce).
    prefill_chunk: int = 256
    max_prefill_tokens: int = 2048
    slo_tpot: float = 0.1
    slo_ttft: float = 2.0
    # What `slo_tpot` bounds. "tpot" = decode time per token after the first: what Algorithm 1
    # prices (its penalty compares Dec(batch + r) with this SLO) and what a user sees while a reply
    # streams; queueing and prefill are judged by the separate TTFT SLO. "latency_per_token" =
    # latency / output_tokens folds the prompt into the per-token figure, so a 4k-token prompt with a
    # 10-token answer misses a 40 ms SLO even alone on an idle cluster (on the Azure conversation
    # trace ~10% of requests miss it at any load); kept for comparison.
    slo_metric: str = "tpot"
    # Run a worker's decode-only steps up to its next completion as one event (`decode_run`); False
    # simulates every step (the reference the fast path is tested against).
    fast_forward: bool = True
    # True: a step is one fused forward over all its sequences, priced `cost.step_time(merged batch)`
    # (the engine since issue 15; needs a cost model with a step model). False: Pre(chunks) +
    # Dec(decoders), two forwards (the engine before; the older results reproduce with it).
    fused_step: bool = True
    # Measured mode: each step's time is its price x a residual drawn from these samples (worker w's
    # k-th step of a kind takes the k-th draw of its own stream seeded by (noise_seed, w)). None: the
    # oracle mode, every step exactly its price. `StepNoise.ones()` reproduces the oracle exactly.
    step_noise: StepNoise | None = None
    noise_seed: int = 0
    # Each worker's host tier (the engine's `host_lora_budget_bytes`): how many adapters it keeps
    # in host memory, least recently used out first; a cold adapter not there is read from disk
    # before its copy: `disk_read_latency_ms` + rank x the cost model's `load_bytes_per_rank` /
    # `disk_read_gbps`. 0: every adapter in host memory (no reads).
    host_adapters: int = 0
    disk_read_gbps: float = 2.0
    disk_read_latency_ms: float = 0.2

    def __post_init__(self):
        if self.slo_metric not in ("latency_per_token", "tpot"):
            raise ValueError(f"slo_metric must be 'latency_per_token' or 'tpot', got {self.slo_metric!r}")
        if self.cold_start not in SIM_COLD_STARTS:
            raise ValueError(f"cold_start must be one of {SIM_COLD_STARTS}, got {self.cold_start!r}")
        if self.cpu_slowdown < 0:
            raise ValueError(f"cpu_slowdown must be >= 0, got {self.cpu_slowdown}")
        if self.prefill_chunk < 0 or self.max_prefill_tokens < 1:
            raise ValueError("prefill_chunk must be >= 0 (0 = whole prompts) and max_prefill_tokens >= 1")
        if self.n_workers < 1 or self.max_batch < 1:
            raise ValueError("need at least one worker and a batch of at least one")
        if self.host_adapters < 0 or self.disk_read_gbps <= 0 or self.disk_read_latency_ms < 0:
            raise ValueError("host_adapters and disk_read_latency_ms must be >= 0, disk_read_gbps > 0")
        if self.step_noise is not None and not isinstance(self.step_noise, StepNoise):
            raise ValueError(f"step_noise must be a StepNoise or None, got {type(self.step_noise).__name__}")


__all__ = ["SIM_COLD_STARTS", "SimConfig"]
