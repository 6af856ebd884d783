"""Prometheus metrics of one worker server, on a registry of its own (several servers can live in
one process, e.g. in tests), plus the plain counters that the Stats RPC reports.

Recorded as requests finish or are refused:
    carajax_requests_total{outcome}            finish reason (stop / length / cancelled) or, for a
                                               refused or failed request, its gRPC code name
    carajax_time_to_first_token_seconds, carajax_time_per_output_token_seconds,
    carajax_e2e_request_latency_seconds        histograms
    carajax_prompt_tokens_total, carajax_generation_tokens_total, carajax_cpu_prefill_tokens_total
    carajax_cold_starts_total{path}            adapter requests by how their adapter was served:
                                               warm (resident), cpu_assist, wait
Read from the engine at scrape time (one `Engine.stats()` per scrape):
    carajax_num_requests_waiting, carajax_num_requests_running
    carajax_adapters{residency}                disk / host / loading / device; carajax_adapters_pinned
    carajax_adapter_device_bytes_used, carajax_adapter_device_budget_bytes,
    carajax_adapter_host_bytes_used, carajax_adapter_disk_read_bytes_per_s,
    carajax_adapter_read_failures_total, carajax_engine_steps_total
    carajax_lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}
                                               vLLM's lora_requests_info shape: value = unix time
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from carajax.engine.request import RequestOutput

# vLLM's buckets, so dashboards built for it read these too.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector(Collector):
    """Gauges read from the engine when Prometheus scrapes (never from the engine thread)."""

    def __init__(self, engine, queued_adapters: Callable[[list[dict]], list[str]]):
        self.engine = engine
        self.queued_adapters = queued_adapters

    def collect(self) -> Iterable:
        st = self.engine.stats()
        pool = st["adapters"]
        yield GaugeMetricFamily("carajax_num_requests_waiting", "Requests in the waiting queue",
                                value=st["waiting"])
        yield GaugeMetricFamily("carajax_num_requests_running", "Requests holding a KV-cache row",
                                value=len(st["running"]))
        g = GaugeMetricFamily("carajax_adapters", "Registered adapters by residency",
                              labels=["residency"])
        device, loading, disk = len(pool["on_device"]), len(pool["loading"]), pool["disk_only"]
        for label, n in (("disk", disk), ("host", pool["adapters"] - device - loading - disk),
                         ("loading", loading), ("device", device)):
            g.add_metric([label], n)
        yield g
        yield GaugeMetricFamily("carajax_adapters_pinned", "Pinned adapters", value=len(pool["pinned"]))
        yield GaugeMetricFamily("carajax_adapter_device_bytes_used",
                                "Device bytes of adapter pages in use (resident + loading)",
                                value=pool["device_bytes_used"])
        yield GaugeMetricFamily("carajax_adapter_device_budget_bytes", "Device bytes for adapter pages",
                                value=pool["device_budget_bytes"])
        yield GaugeMetricFamily("carajax_adapter_host_bytes_used",
                                "Host bytes of adapters in host memory (and reads in flight)",
                                value=pool["host_bytes_used"])
        yield GaugeMetricFamily("carajax_adapter_disk_read_bytes_per_s",
                                "Measured disk read bandwidth of adapters", value=pool["read_bytes_per_s"])
        yield CounterMetricFamily("carajax_adapter_read_failures",
                                  "Adapter disk reads that failed (their requests failed)",
                                  value=pool["read_failures"])
        yield CounterMetricFamily("carajax_engine_steps", "Engine steps run", value=st["steps"])
        kv = st["kv_cache"]
        yield GaugeMetricFamily("carajax_kv_pages_free", "Free KV-cache pages", value=kv["pages_free"])
        yield GaugeMetricFamily("carajax_kv_pages_total", "KV-cache pages", value=kv["pages_total"])
        yield CounterMetricFamily("carajax_preemptions", "Requests preempted for KV pages",
                                  value=kv["preemptions"])
        for key, doc in (("step_host_ms", "Median host time per engine step (recent steps), ms"),
                         ("step_ms", "Median engine step time (recent steps), ms"),
                         ("step_wait_ms", "Median wait for a step's tokens (recent steps), ms")):
            if st[key] is not None:
                yield GaugeMetricFamily(f"carajax_{key}", doc, value=st[key])
        ad = st["adapters"]
        for key, doc in (("copy_predicted_ms_median", "Median predicted adapter copy time, ms"),
                         ("copy_real_ms_median", "Median real adapter copy time (queued to "
                                                 "installed), ms")):
            if ad.get(key) is not None:
                yield GaugeMetricFamily(f"carajax_{key}", doc, value=ad[key])
        paths = CounterMetricFamily("carajax_cold_start_choices",
                                    "Cold requests by the path the engine gave them", labels=["path"])
        for path, n in st["cold_paths"].items():
            paths.add_metric([path], n)
        yield paths
        info = GaugeMetricFamily(
            "carajax_lora_requests_info", "Running and waiting adapters (vLLM lora_requests_info)",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        running = ",".join(dict.fromkeys(r["adapter"] for r in st["running"] if r["adapter"]))
        waiting = ",".join(dict.fromkeys(a for a in self.queued_adapters(st["running"]) if a))
        info.add_metric([running, waiting, str(self.engine.config.max_loras)], time.time())
        yield info


class ServerMetrics:
    """Everything one worker server counts; `registry` is what its /metrics endpoint serves."""

    def __init__(self, engine, queued_adapters: Callable[[list[dict]], list[str]] = lambda running: []):
        """`queued_adapters(running)`: adapters of the queued requests, given the running ones
        (the engine's stats count queued requests but do not list them)."""
        self.registry = r = CollectorRegistry()
        self._requests = Counter("carajax_requests", "Requests by outcome: finish reason or gRPC code",
                                 ["outcome"], registry=r)
        self._ttft = Histogram("carajax_time_to_first_token_seconds", "Arrival to first token",
                               buckets=TTFT_BUCKETS, registry=r)
        self._tpot = Histogram("carajax_time_per_output_token_seconds",
                               "Mean time per output token after the first", buckets=TPOT_BUCKETS,
                               registry=r)
        self._latency = Histogram("carajax_e2e_request_latency_seconds", "Arrival to finish",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self._prompt = Counter("carajax_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self._output = Counter("carajax_generation_tokens", "Generated tokens", registry=r)
        self._cpu = Counter("carajax_cpu_prefill_tokens",
                            "Prompt tokens whose LoRA delta came from the CPU", registry=r)
        self._cold = Counter("carajax_cold_starts",
                             "Adapter requests by path: warm, cpu_assist, async, wait", ["path"],
                             registry=r)
        for path in ("warm", "cpu_assist", "async", "wait"):
            self._cold.labels(path)  # present from the start, so rates work from zero
        r.register(_EngineCollector(engine, queued_adapters))
        # Plain mirrors for the Stats RPC (reading prometheus values back needs private API).
        self._lock = threading.Lock()
        self._outcomes: collections.Counter[str] = collections.Counter()
        self._paths: collections.Counter[str] = collections.Counter()
        self._tokens = collections.Counter()
        self._http = None

    def finished(self, out: RequestOutput, path: str, outcome: str | None = None) -> None:
        """Count a request the engine finished; `outcome` overrides its finish reason (e.g. a
        cancellation that was really a passed deadline)."""
        m, outcome = out.metrics, outcome or out.finish_reason
        self._requests.labels(outcome).inc()
        for hist, value in ((self._ttft, m.ttft_s), (self._tpot, m.tpot_s), (self._latency, m.latency_s)):
            if value is not None:
                hist.observe(value)
        self._prompt.inc(m.prompt_tokens)
        self._output.inc(m.output_tokens)
        self._cpu.inc(m.cpu_prefill_tokens)
        if path:
            self._cold.labels(path).inc()
        with self._lock:
            self._outcomes[outcome] += 1
            if path:
                self._paths[path] += 1
            self._tokens.update(prompt=m.prompt_tokens, output=m.output_tokens,
                                cpu_prefill=m.cpu_prefill_tokens)

    def refused(self, code_name: str) -> None:
        """Count a request refused before it reached the engine (its gRPC code name)."""
        self._requests.labels(code_name).inc()
        with self._lock:
            self._outcomes[code_name] += 1

    def snapshot(self) -> dict:
        """Counters for the Stats RPC: requests by outcome, cold starts by path, token totals."""
        with self._lock:
            return {"requests": dict(self._outcomes), "cold_starts": dict(self._paths),
                    "prompt_tokens": self._tokens["prompt"], "output_tokens": self._tokens["output"],
                    "cpu_prefill_tokens": self._tokens["cpu_prefill"]}

    def start_http(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics over HTTP on a daemon thread; returns the bound port (port 0: any free)."""
        self._http, _ = start_http_server(port, addr=addr, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
