"""A local cluster for a replay: `carajax serve` worker subprocesses and a router in this process.

Why subprocesses: each worker's engine loop is Python between device calls, so two engines in one
process would take turns on one interpreter lock and behave like one worker. As processes they
run side by side the way separate machines would; on a small machine they still share its cores
(the replay says so). The router is light (it forwards streams), so it runs here, on loopback
gRPC, like any client would reach it.

Compiles dominate a worker's start on CPU (seconds per step variant), so workers share JAX's
persistent compilation cache: the second worker, and the next policy's workers, load what the
first compiled. Variants with host callbacks (CPU assist) cannot be cached and compile each time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

DEFAULT_COMPILE_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "carajax" / "jax"
_READY = re.compile(r"carajax worker (\S+) ready on (\S+)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """Workers (one engine each) behind a router. `engine_config`: extra EngineConfig fields as
    sorted (name, value) pairs (frozen), passed to `carajax serve --engine-config`."""

    model: str = "llama-test"
    workers: int = 2
    cold_start: str = "cpu_assist"
    router_policy: str = "carajax"
    max_batch: int = 8
    link_gbps: float | None = None
    link_latency_ms: float = 0.0
    engine_config: tuple[tuple[str, object], ...] = ()
    poll_interval_s: float = 0.2
    slo_tpot_s: float = 0.1  # what the router's policy prices
    avg_output_len: float = 128.0
    compile_cache: str | None = str(DEFAULT_COMPILE_CACHE)
    startup_timeout_s: float = 900.0

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError("a cluster needs at least one worker")


class WorkerProcess:
    """One `carajax serve` subprocess; its output goes to `log`."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.log = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.name = self.address = None

    def poll_ready(self) -> bool:
        """True once the worker printed its ready line; raises if it died first."""
        m = _READY.search(self.log.read_text(errors="replace"))
        if m:
            self.name, self.address = m.group(1), m.group(2)
            return True
        if self.proc.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"worker exited with status {self.proc.returncode} before it was ready "
                               f"(log {self.log}):\n{tail}")
        return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the worker drains and exits), then SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def worker_argv(spec: ClusterSpec, index: int, adapters_dir: str) -> list[str]:
    argv = [sys.executable, "-m", "carajax.cli", "serve", "--model", spec.model,
            "--adapters", adapters_dir, "--host", "127.0.0.1", "--port", "0", "--name", f"w{index}",
            "--cold-start", spec.cold_start, "--max-batch", str(spec.max_batch), "--grace", "2",
            "--engine-config", json.dumps(dict(spec.engine_config))]
    if spec.link_gbps is not None:
        argv += ["--link-gbps", str(spec.link_gbps), "--link-latency-ms", str(spec.link_latency_ms)]
    return argv


def worker_env(spec: ClusterSpec) -> dict[str, str]:
    env = dict(os.environ)
    if spec.compile_cache:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", spec.compile_cache)
        # Cache every executable, not only slow compiles: on CPU even small ones take seconds here.
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    # Several workers may share one accelerator: no worker may grab most of its memory up front.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


@dataclasses.dataclass
class Cluster:
    """A running cluster: `address` is the router's."""

    address: str
    workers: list[WorkerProcess]
    router: object
    startup_s: float


@contextlib.contextmanager
def start_cluster(spec: ClusterSpec, adapters_dir: str, log_dir: str | os.PathLike, *,
                  stagger: bool = False) -> Iterator[Cluster]:
    """Start `spec.workers` workers, wait until each printed its ready line (it compiled every
    step variant first), put a router in front, and stop everything on exit.

    `stagger`: start one worker first and the rest once it is ready, so they load its compiled
    variants from the persistent cache instead of compiling the same ones side by side (on a
    machine with few cores that costs as much as compiling them one after the other)."""
    from carajax.server.router import serve_router, wait_until_healthy

    t0 = time.monotonic()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = worker_env(spec)
    workers: list[WorkerProcess] = []
    router = None
    deadline = time.monotonic() + spec.startup_timeout_s

    def start(indices: range) -> None:
        for i in indices:
            workers.append(WorkerProcess(worker_argv(spec, i, adapters_dir), env,
                                         log_dir / f"{spec.cold_start}-w{i}.log"))
        while not all(w.poll_ready() for w in workers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready after {spec.startup_timeout_s} s; logs in {log_dir}")
            time.sleep(0.2)

    try:
        first = 1 if stagger else spec.workers
        start(range(first))
        start(range(first, spec.workers))
        router = serve_router([w.address for w in workers], 0, host="127.0.0.1",
                              policy=spec.router_policy, slo_tpot=spec.slo_tpot_s,
                              avg_output_len=spec.avg_output_len, poll_interval=spec.poll_interval_s)
        wait_until_healthy(router, spec.workers)
        yield Cluster(router.address, workers, router, time.monotonic() - t0)
    finally:
        if router is not None:
            router.stop(grace=0)
        for w in workers:
            w.stop()
