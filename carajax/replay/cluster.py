"""A local cluster for a replay: `carajax serve` worker subprocesses and a router in this process.

Why subprocesses: each worker's engine loop is Python between device calls, so two engines in one
process would take turns on one interpreter lock and behave like one worker. As processes they
run side by side the way separate machines would; on a small machine they still share its cores
(the replay says so). The router is light (it forwards streams), so it runs here, on loopback
gRPC, like any client would reach it.

Compiles dominate a worker's start on CPU (seconds per step variant), so workers share JAX's
persistent compilation cache: every worker after the first loads what the first compiled.
Variants with host callbacks (CPU assist) cannot be cached and compile in each worker. All the
clusters of an invocation start before its first replay (see `start_workers`).
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
from collections.abc import Iterator, Sequence
from pathlib import Path

from carajax import paths
from carajax.config import DEMO_MODEL

_READY = re.compile(r"carajax worker (\S+) ready on (\S+)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """Workers (one engine each) behind a router. `engine_config`: extra EngineConfig fields as
    sorted (name, value) pairs (frozen), passed to `carajax serve --engine-config`."""

    model: str = DEMO_MODEL
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
    # JAX's persistent compilation cache (None: none); default jax/ under carajax.paths.home().
    compile_cache: str | None = dataclasses.field(default_factory=lambda: str(paths.home() / "jax"))
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

    def last_line(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return lines[-1].strip() if lines else ""

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


def launch(spec: ClusterSpec, index: int, adapters_dir: str, log_dir: str | os.PathLike,
           tag: str) -> WorkerProcess:
    """Start worker `index` of `spec` (returns at once; see `wait_ready`)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)
    return WorkerProcess(worker_argv(spec, index, adapters_dir), worker_env(spec),
                         log_dir / f"{safe}-w{index}.log")


def wait_ready(workers: Sequence[WorkerProcess], timeout_s: float, log=None, t0: float | None = None,
               heartbeat_s: float = 20.0) -> None:
    """Until every worker printed its ready line. `log` (a print-like callable): a line per
    worker as it becomes ready, and one every `heartbeat_s` naming who is still compiling and
    the last line of its log, so a start of minutes is never silent."""
    t0 = time.monotonic() if t0 is None else t0
    deadline = time.monotonic() + timeout_s
    ready: set[int] = set()
    last = time.monotonic()
    while True:
        for i, w in enumerate(workers):
            if i not in ready and w.poll_ready():
                ready.add(i)
                last = time.monotonic()
                if log:
                    log(f"   {w.log.stem} ready after {last - t0:.0f} s ({len(ready)} of "
                        f"{len(workers)} here)")
        if len(ready) == len(workers):
            return
        if time.monotonic() > deadline:
            logs = [str(w.log) for w in workers]
            raise TimeoutError(f"workers not ready after {timeout_s} s; logs: {logs}")
        if log and time.monotonic() - last >= heartbeat_s:
            last = time.monotonic()
            waiting = [w for i, w in enumerate(workers) if i not in ready]
            tail = waiting[0].last_line()
            log(f"   {last - t0:.0f} s: {len(waiting)} still compiling"
                + (f"; {waiting[0].log.stem}: {tail[:70]}" if tail else ""))
        time.sleep(0.2)


def start_workers(specs: Sequence[tuple[str, ClusterSpec]], adapters_dir: str,
                  log_dir: str | os.PathLike, log=None) -> dict[str, list[WorkerProcess]]:
    """Start the workers of every cluster of an invocation ({tag: spec}); all are ready (done
    compiling) when this returns.

    One worker starts alone first, so the others load its compiled step variants from the
    persistent cache (the clusters share step shapes) instead of compiling the same ones side by
    side; then all the rest start at once and compile only what the cache cannot hold (CPU-assist
    variants, which carry host callbacks). Nothing is replayed until every worker is ready, so no
    replay shares the CPU with a compiling worker; a worker waiting for its turn costs memory only.
    `log`: progress lines (see `wait_ready`).
    """
    t0 = time.monotonic()
    out: dict[str, list[WorkerProcess]] = {tag: [] for tag, _ in specs}
    try:
        tag0, spec0 = specs[0]
        out[tag0].append(launch(spec0, 0, adapters_dir, log_dir, tag0))
        wait_ready(out[tag0], spec0.startup_timeout_s, log, t0)
        for tag, spec in specs:
            for i in range(len(out[tag]), spec.workers):
                out[tag].append(launch(spec, i, adapters_dir, log_dir, tag))
        wait_ready([w for ws in out.values() for w in ws][1:],
                   max(s.startup_timeout_s for _, s in specs), log, t0)
    except BaseException:
        for ws in out.values():
            for w in ws:
                w.stop()
        raise
    return out


@dataclasses.dataclass
class Cluster:
    """A running cluster: `address` is the router's."""

    address: str
    workers: list[WorkerProcess]
    router: object


@contextlib.contextmanager
def serve_cluster(spec: ClusterSpec, workers: Sequence[WorkerProcess]) -> Iterator[Cluster]:
    """Put a router (in this process) in front of ready workers; stop both on exit."""
    from carajax.server.router import serve_router, wait_until_healthy

    router = None
    try:
        router = serve_router([w.address for w in workers], 0, host="127.0.0.1",
                              policy=spec.router_policy, slo_tpot=spec.slo_tpot_s,
                              avg_output_len=spec.avg_output_len, poll_interval=spec.poll_interval_s)
        wait_until_healthy(router, len(workers))
        yield Cluster(router.address, list(workers), router)
    finally:
        if router is not None:
            # RouterServer.stop closes the worker channels without joining its Stats poller, which
            # then dies on a closed channel mid-poll; park the poller in a long wait first.
            router.poll_interval = 1e9
            time.sleep(0.3)
            router.stop(grace=0)
        for w in workers:
            w.stop()
