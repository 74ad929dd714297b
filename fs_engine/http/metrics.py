"""Prometheus metrics of ``fs-engine serve``, with ``prometheus_client``.

Two sources. Latencies are measured here, per request, as the HTTP client sees them (histograms: time to
first token, inter-token latency, end to end, labelled by tenant). Everything else is the engine's own
``stats()``, polled once a second by the server and exposed as gauges and counters under vLLM's names where
the meaning is the same (``fs_engine:num_requests_running``, ``fs_engine:prompt_tokens_total``, ...), plus
what only this engine has: preemptions, swap bytes and time, KV reused from the device and from the host,
recomputed tokens, and each tenant's fair-share service.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0)

# engine counter -> (metric name, help); the engine's stats() counts them from its start
_COUNTERS = {
    "num_prompt_tokens": ("fs_engine:prompt_tokens", "Prompt tokens processed (first computation only)"),
    "num_generated_tokens": ("fs_engine:generation_tokens", "Tokens generated"),
    "num_finished_requests": ("fs_engine:request_success", "Requests that finished (stop or length)"),
    "num_aborted_requests": ("fs_engine:request_aborted", "Requests aborted (by the client or a disconnect)"),
    "num_failed_requests": ("fs_engine:request_failed", "Requests failed by an internal error"),
    "num_preemptions": ("fs_engine:num_preemptions", "Requests preempted (swapped out or recomputed)"),
    "num_swap_outs": ("fs_engine:swap_outs", "Swap-outs of a request's KV to host memory"),
    "num_swap_ins": ("fs_engine:swap_ins", "Swap-ins of a request's KV back to the device"),
    "swap_out_bytes": ("fs_engine:swap_out_bytes", "KV bytes copied device -> host"),
    "swap_in_bytes": ("fs_engine:swap_in_bytes", "KV bytes copied host -> device"),
    "swap_s": ("fs_engine:swap_seconds", "Time the swap copies took, summed"),
    "swap_commands": ("fs_engine:swap_commands", "Copy commands completed (swap-outs, swap-ins, write-backs)"),
    "reused_resident_tokens": ("fs_engine:reused_device_tokens",
                               "Prompt tokens whose KV a finished turn left on the device (no copy)"),
    "reused_prefix_tokens": ("fs_engine:reused_prefix_tokens",
                             "Prompt tokens whose KV came from earlier turns (device or host) instead of prefill"),
    "reused_swap_out_bytes": ("fs_engine:reused_swap_out_bytes",
                              "Swap-out bytes not copied: the host copy was still valid"),
    "num_recomputed_tokens": ("fs_engine:recomputed_tokens", "Tokens recomputed after a recompute preemption"),
}
_GAUGES = {
    "num_running": ("fs_engine:num_requests_running", "Requests running (KV on the device)"),
    "num_waiting": ("fs_engine:num_requests_waiting", "Requests waiting (no KV yet, or preempted by recompute)"),
    "num_swapped": ("fs_engine:num_requests_swapped", "Requests swapped out (KV in host memory)"),
    "num_swaps_in_flight": ("fs_engine:num_swaps_in_flight", "KV copies in flight"),
}
_TENANT_SERVICE = re.compile(r"vtc_service_(.+)")


class EngineStats:
    """A collector of the engine's last polled ``stats()`` (``update``)."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}

    def update(self, stats: dict[str, Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        if not stats:
            return
        for key, (name, doc) in _COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(name, doc, value=float(stats[key]))
        for key, (name, doc) in _GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))
        total, free = stats.get("num_gpu_blocks", 0), stats.get("num_free_gpu_blocks", 0)
        yield GaugeMetricFamily("fs_engine:kv_cache_usage_perc", "Device KV blocks in use (1 = full)",
                                value=(total - free) / total if total else 0.0)
        total, free = stats.get("num_cpu_blocks", 0), stats.get("num_free_cpu_blocks", 0)
        yield GaugeMetricFamily("fs_engine:cpu_kv_cache_usage_perc", "Host KV blocks in use, cached copies included",
                                value=(total - free) / total if total else 0.0)
        service = CounterMetricFamily("fs_engine:tenant_service_tokens",
                                      "Fair-share service (weighted tokens) each tenant received (vtc)",
                                      labels=["tenant"])
        for key, value in stats.items():
            match = _TENANT_SERVICE.fullmatch(key)
            if match:
                service.add_metric([match.group(1)], float(value))
        yield service


class Metrics:
    """Every metric of one server, in a registry of its own (``/metrics`` renders it)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.engine = EngineStats()
        self.registry.register(self.engine)
        self.ttft = Histogram("fs_engine:time_to_first_token_seconds", "Request received to first token",
                              ["tenant"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("fs_engine:inter_token_latency_seconds", "Between two streamed token events",
                             ["tenant"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("fs_engine:e2e_request_latency_seconds", "Request received to its last token",
                             ["tenant"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.http = Counter("fs_engine:http_requests", "HTTP API requests by endpoint and status",
                            ["endpoint", "status"], registry=self.registry)
