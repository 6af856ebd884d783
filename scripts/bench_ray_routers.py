"""Our router against Ray Serve's, on one machine: both-SLO attainment under rising load.

`carajax ray` with N replicas of the demo model (each with a device pool of `--pool` adapters)
serves `carajax replay --target http://...` (the Azure conversation trace, prompts <= 256 and
outputs <= 64 tokens, `--adapters` random adapters of ranks 8/16/32/64 with Zipf(1.8)
popularity, copied into one adapter root every replica reads), at each `--scales` arrival rate,
`--repeats` times, under three routers:

    carajax            ours (`--router carajax --policy carajax`): rank- and SLO-aware prices;
    ray_default        Ray Serve's default router (power of two choices on queue length);
    adapter_affinity   the rule Ray Serve LLM applies to LoRA: a replica holding the adapter
                       first, then the least loaded (`--policy adapter_affinity`).

Each router gets a fresh Ray cluster (the replicas compile, and profile their own cost models
once, before the first replay; later clusters read the caches). The repeats of one router run
back to back; the load average after each replay is recorded, since other work on the machine
shifts whole runs.

    python scripts/bench_ray_routers.py                                  # 4 replicas, 3 scales, 3 repeats
    python scripts/bench_ray_routers.py --replicas 2 --scales 1 --repeats 1 --duration 5   # a smoke run

The defaults suit a 2-core CPU box, where the replicas, Ray's proxy and the client share the
cores: at the trace's full rate (`--scales 1`, ~5 requests/s) it is already overloaded.

Prints a table (median both-SLO attainment and its min..max per router and scale, and ours over
Ray's default) and writes JSON (default data/benchmarks/ray_routers_<date>.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROUTERS = {"carajax": ["--router", "carajax", "--policy", "carajax"],
           "ray_default": ["--router", "ray"],
           "adapter_affinity": ["--router", "carajax", "--policy", "adapter_affinity"]}
RANKS = (8, 16, 32, 64)


def write_adapters(root: Path, n: int, seed: int = 0) -> None:
    """`n` random PEFT adapters (q/k/v/o) of the demo model, ranks cycling 8/16/32/64, named so
    that their sorted order (the replay's Zipf order) mixes the ranks."""
    from carajax.config import DEMO_MODEL, ModelConfig
    from carajax.testing import write_random_adapter

    config = ModelConfig.from_name(DEMO_MODEL)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = root / f"lora-{i:03d}"
        if not (path / "adapter_config.json").exists():
            write_random_adapter(path, config, rank=RANKS[i % len(RANKS)], seed=seed + i)


class Cluster:
    """`carajax ray` in a subprocess, ready when it prints its URL; stopped with SIGTERM."""

    def __init__(self, router: str, args, port: int, log: Path):
        engine = {"max_loras": args.pool, "max_batch_size": args.max_batch}
        cmd = [sys.executable, "-m", "carajax", "ray", "--replicas", str(args.replicas),
               "--num-cpus", str(args.num_cpus), "--http-port", str(port),
               "--adapter-root", str(args.root), "--engine-config", json.dumps(engine),
               "--slo-tpot-ms", str(args.slo_tpot_ms), *ROUTERS[router]]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if "ready at" in line:
                self.ready.set()

    def wait(self, timeout_s: float) -> None:
        t0 = time.monotonic()
        while not self.ready.wait(5):
            if self.proc.poll() is not None:
                raise RuntimeError(f"carajax ray exited ({self.proc.returncode}); see {self.log.name}")
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"carajax ray not ready after {timeout_s} s; see {self.log.name}")
            print(f"   {time.monotonic() - t0:.0f} s: replicas starting", flush=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def replay(port: int, scale: float, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "carajax", "replay", "--target", f"http://127.0.0.1:{port}",
           "--adapter-dir", str(args.root), "--scale", str(scale), "--duration", str(args.duration),
           "--slo-tpot-ms", str(args.slo_tpot_ms), "--slo-ttft-s", str(args.slo_ttft_s),
           "--out", str(out), "--no-progress"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"replay failed ({proc.returncode}): {proc.stderr[-2000:]}")
    doc = json.loads((out / "replay.json").read_text())
    (summary,) = doc["summaries"].values()
    return {"both_slo": summary["slo_attainment"]["both"], "ttft_slo": summary["slo_attainment"]["ttft"],
            "tpot_slo": summary["slo_attainment"]["tpot"], "ttft_p50_s": summary["ttft_s"]["p50"],
            "ttft_p99_s": summary["ttft_s"]["p99"], "requests": summary["requests"],
            "completed": summary["completed"], "errors": summary["errors"],
            "per_replica": summary["per_worker"], "send_lag_max_s": summary["max_send_lag_s"],
            "wall_s": time.monotonic() - t0, "load_avg_after": os.getloadavg()[0]}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--replicas", type=int, default=4, help="replicas of each cluster")
    p.add_argument("--num-cpus", type=float, default=0.5, help="Ray CPUs per replica")
    p.add_argument("--pool", type=int, default=8, help="device adapter slots per replica")
    p.add_argument("--max-batch", type=int, default=8, help="sequences per replica step")
    p.add_argument("--adapters", type=int, default=128, help="random adapters in the root")
    p.add_argument("--scales", default="0.25,0.5,1", help="arrival-rate multipliers")
    p.add_argument("--repeats", type=int, default=3, help="replays per router and scale")
    p.add_argument("--duration", type=float, default=15.0, help="trace seconds per replay")
    p.add_argument("--routers", default=",".join(ROUTERS), help="comma-separated, of " + ", ".join(ROUTERS))
    p.add_argument("--slo-ttft-s", type=float, default=0.5, help="time-to-first-token SLO")
    p.add_argument("--slo-tpot-ms", type=float, default=30.0, help="time-per-token SLO")
    p.add_argument("--port", type=int, default=8123, help="HTTP port of the clusters")
    p.add_argument("--work", default=None, help="adapters and replay outputs (none: a temp dir)")
    p.add_argument("--out", default=None, help="the JSON (none: data/benchmarks/ray_routers_<date>.json)")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-ray-routers-"))
    args.root = work / "adapters"
    write_adapters(args.root, args.adapters)
    scales = [float(s) for s in args.scales.split(",")]
    routers = args.routers.split(",")
    results: dict = {r: {} for r in routers}
    for router in routers:
        print(f"== {router}: {args.replicas} replicas", flush=True)
        t0 = time.monotonic()
        cluster = Cluster(router, args, args.port, work / f"ray_{router}.log")
        try:
            cluster.wait(timeout_s=900)
            print(f"   ready in {time.monotonic() - t0:.0f} s", flush=True)
            for scale in scales:
                runs = []
                for k in range(args.repeats):
                    r = replay(args.port, scale, args, work / f"{router}_x{scale}_{k}")
                    runs.append(r)
                    print(f"   x{scale} repeat {k + 1}: both SLOs {100 * r['both_slo']:.1f}%, TTFT p50 "
                          f"{1e3 * r['ttft_p50_s']:.0f} ms, load {r['load_avg_after']:.1f}", flush=True)
                results[router][str(scale)] = {
                    "runs": runs, "both_slo": spread([r["both_slo"] for r in runs]),
                    "ttft_p50_s": spread([r["ttft_p50_s"] for r in runs])}
        finally:
            cluster.stop()
    head = f"{'scale':>6} | " + " | ".join(f"{r:>26}" for r in routers) + " | ours / ray_default"
    print("\nboth-SLO attainment, median (min..max) over repeats\n" + head + "\n" + "-" * len(head))
    for scale in scales:
        cells = []
        for r in routers:
            s = results[r][str(scale)]["both_slo"]
            cells.append(f"{100 * s['median']:6.1f}% ({100 * s['min']:.1f}..{100 * s['max']:.1f})".rjust(26))
        ratio = ""
        if "carajax" in results and "ray_default" in results:
            ray = results["ray_default"][str(scale)]["both_slo"]["median"]
            ours = results["carajax"][str(scale)]["both_slo"]["median"]
            ratio = f"{ours / ray:.2f}x" if ray > 0 else ("n/a" if ours == 0 else "inf")
        print(f"{scale:>6} | " + " | ".join(cells) + f" | {ratio}")
    out = Path(args.out or f"data/benchmarks/ray_routers_{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    out.write_text(json.dumps({"command": " ".join(sys.argv), "cpu": cpu, "cores": os.cpu_count(),
                               "date": datetime.datetime.now().isoformat(timespec="seconds"),
                               "args": {k: str(v) for k, v in vars(args).items()},
                               "results": results}, indent=1))
    print(f"\nwrote {out}")
    if not args.work:  # a temp dir of ours: the adapters and replay outputs go with it
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
