"""Serving metrics of one benchmark run: latency percentiles, throughput, per-tenant service and fairness.

Everything here is a pure function of the per-request records the driver collects, so a run can be
summarized again later (or by another tool) from its records alone. Summaries are strict JSON: a statistic
over no values is ``None``, never NaN, and the report prints it as "n/a".

Service is counted in the units of the engine's VTC policy (prompt tokens x ``PROMPT_TOKEN_COST``, generated
tokens x ``OUTPUT_TOKEN_COST``), so the fairness numbers here measure the quantity the scheduler equalizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from fs_engine.sched.policies import OUTPUT_TOKEN_COST, PROMPT_TOKEN_COST

PERCENTILES = (50, 95, 99, 99.9)

# engine counters worth comparing across configs; the engine reports many more (block counts, config echoes)
ENGINE_KEYS = (
    "num_preemptions", "num_swap_outs", "num_swap_ins", "swap_out_bytes", "swap_in_bytes",
    "reused_swap_out_bytes", "reused_prefix_tokens", "reused_resident_tokens", "swap_wait_s", "num_recomputed_tokens",
    "swap_copies", "swap_commands", "swap_s", "sim_stall_s", "sim_time_s", "sim_steps", "wall_frontend_s",
)


@dataclass
class RequestRecord:
    """What the client saw of one request. Times are seconds since the run started, on one clock."""

    request_id: str
    conversation_id: str
    tenant: str
    turn: int  # 0-based turn index in its conversation
    sent_s: float
    token_times: list[float]  # arrival time of each generated token, in order; several may share a time
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # prompt tokens the engine did not recompute (prefix or swap reuse)
    finish_reason: str | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        """Time to first token; None for a request that produced none (aborted before its first token)."""
        return self.token_times[0] - self.sent_s if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return self.token_times[-1] - self.sent_s if self.token_times else None

    @property
    def tbts(self) -> list[float]:
        """Gaps between consecutive tokens. Tokens delivered in one message give gaps of 0."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None below two tokens."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n >= 2 else None


@dataclass(frozen=True)
class SLO:
    """Per-request latency targets: the first token within ``ttft_s``, no gap between tokens above ``tbt_s``.
    ``math.inf`` leaves that side unconstrained."""

    ttft_s: float
    tbt_s: float

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tbt_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"SLO.{name}={value!r}: must be a positive number of seconds")


def percentiles(values: Iterable[float], ps: Sequence[float] = PERCENTILES) -> dict[str, float | None]:
    """``{"p50": ..., "p99.9": ...}`` with numpy's linear interpolation; every value None for no input."""
    array = np.asarray(list(values), dtype=float)
    keys = [f"p{p:g}" for p in ps]
    if array.size == 0:
        return dict.fromkeys(keys)
    return {key: float(v) for key, v in zip(keys, np.percentile(array, ps))}


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index ``(sum x)^2 / (n * sum x^2)``: 1 when all equal, 1/n when one gets everything.

    No values, or all zero, count as perfectly fair (1.0): nobody received more than anybody else.
    """
    array = np.asarray(values, dtype=float)
    square_sum = float(np.sum(array * array))
    if array.size == 0 or square_sum == 0.0:
        return 1.0
    return float(np.sum(array)) ** 2 / (array.size * square_sum)


def service_cost(prompt_tokens: int, output_tokens: int) -> float:
    """Service in the VTC policy's units: prompt tokens x 1, generated tokens x 2."""
    return PROMPT_TOKEN_COST * prompt_tokens + OUTPUT_TOKEN_COST * output_tokens


def _served_prompt_tokens(record: RequestRecord) -> int:
    # A prompt counts as served once its first token arrives (the client's only evidence that prefill ran),
    # and in full even when the engine reused cached KV: the tenant received the same service either way,
    # so fairness stays comparable between configs that reuse and configs that recompute.
    return record.num_prompt_tokens if record.token_times else 0


def _record_service(record: RequestRecord) -> float:
    return service_cost(_served_prompt_tokens(record), record.num_output_tokens)


def _stats(values: list[float]) -> dict[str, float | None]:
    return {**percentiles(values), "mean": float(np.mean(values)) if values else None}


def _latency_summary(records: list[RequestRecord]) -> dict[str, dict[str, float | None]]:
    ttfts = [r.ttft for r in records if r.ttft is not None]
    gaps = [gap for r in records for gap in r.tbts]
    tpots = [r.tpot for r in records if r.tpot is not None]
    e2es = [r.e2e for r in records if r.e2e is not None]
    return {"ttft_s": _stats(ttfts), "tbt_s": _stats(gaps), "tpot_s": _stats(tpots), "e2e_s": _stats(e2es)}


def _tenant_summary(records: list[RequestRecord], tenant_weights: dict[str, float]) -> dict[str, dict]:
    """Per tenant that sent requests; a tenant missing from ``tenant_weights`` has weight 1, as in VTC."""
    tenants: dict[str, dict] = {}
    for tenant in sorted({r.tenant for r in records}):
        mine = [r for r in records if r.tenant == tenant]
        service = sum(_record_service(r) for r in mine)
        tenants[tenant] = {
            "service": service,
            "normalized_service": service / tenant_weights.get(tenant, 1.0),
            "requests": len(mine),
            "output_tokens": sum(r.num_output_tokens for r in mine),
            "ttft_p95_s": percentiles([r.ttft for r in mine if r.ttft is not None], (95,))["p95"],
        }
    return tenants


def _slo_summary(records: list[RequestRecord], slo: SLO) -> dict[str, float | None]:
    """A request meets the TTFT target if its first token came within it (no token: missed), and the TBT
    target if its largest gap is within it (one token or none: met, there is no gap to miss)."""
    ttft_ok = [r.ttft is not None and r.ttft <= slo.ttft_s for r in records]
    tbt_ok = [max(r.tbts, default=0.0) <= slo.tbt_s for r in records]

    def fraction(flags: list[bool]) -> float | None:
        return sum(flags) / len(flags) if flags else None

    return {
        # an infinite target means "no target on this one" and is stored as None to keep the summary strict JSON
        "ttft_s": slo.ttft_s if math.isfinite(slo.ttft_s) else None,
        "tbt_s": slo.tbt_s if math.isfinite(slo.tbt_s) else None,
        "ttft_attainment": fraction(ttft_ok),
        "tbt_attainment": fraction(tbt_ok),
        "attainment": fraction([a and b for a, b in zip(ttft_ok, tbt_ok)]),
    }


def summarize(records: list[RequestRecord], duration_s: float, tenant_weights: dict[str, float],
              slo: SLO | None = None, engine_stats: dict | None = None) -> dict:
    """One run's numbers as a JSON-serializable dict; ``duration_s`` is the wall time of the whole run."""
    if not duration_s > 0:
        raise ValueError(f"duration_s={duration_s!r}: must be positive to compute throughput")
    num_output = sum(r.num_output_tokens for r in records)
    num_prompt = sum(_served_prompt_tokens(r) for r in records)
    tenants = _tenant_summary(records, tenant_weights)
    summary: dict = {
        "num_requests": len(records),
        "num_prompt_tokens": num_prompt,
        "num_output_tokens": num_output,
        "duration_s": duration_s,
        "throughput_tokens_per_s": num_output / duration_s,
        "throughput_requests_per_s": len(records) / duration_s,
        "total_tokens_per_s": (num_prompt + num_output) / duration_s,
        **_latency_summary(records),
        "tenants": tenants,
        "jain_index": jain_index([t["normalized_service"] for t in tenants.values()]),
    }
    if slo is not None:
        summary["slo"] = _slo_summary(records, slo)
    if engine_stats is not None:
        engine = {key: engine_stats[key] for key in ENGINE_KEYS if key in engine_stats}
        if "swap_out_bytes" in engine and engine_stats.get("kv_block_bytes"):
            engine["swap_out_blocks"] = engine["swap_out_bytes"] // engine_stats["kv_block_bytes"]
        if engine.get("swap_commands"):
            engine["mean_swap_ms"] = 1000 * engine["swap_s"] / engine["swap_commands"]
        summary["engine"] = engine
    return summary


def _service_events(records: list[RequestRecord], tenant_weights: dict[str, float]) -> dict[str, np.ndarray]:
    """Per tenant, normalized service as ``[n, 2]`` rows of (time, cost) sorted by time: the prompt counts at
    its first token, each generated token at its arrival."""
    events: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        weight = tenant_weights.get(record.tenant, 1.0)
        tenant_events = events.setdefault(record.tenant, [])
        if record.token_times:
            tenant_events.append((record.token_times[0], PROMPT_TOKEN_COST * record.num_prompt_tokens / weight))
        tenant_events.extend((t, OUTPUT_TOKEN_COST / weight) for t in record.token_times)
    return {tenant: np.array(sorted(rows), dtype=float).reshape(-1, 2) for tenant, rows in events.items()}


def service_over_time(records: list[RequestRecord], tenant_weights: dict[str, float],
                      bin_s: float) -> dict[str, list[tuple[float, float]]]:
    """Per tenant, ``(bin_end_s, cumulative normalized service)`` at the end of each ``bin_s``-wide bin.

    All tenants share the bins, from 0 to the last token of the run, so their curves can be compared point by
    point; the last value of each tenant equals its ``normalized_service`` in ``summarize``.
    """
    if not bin_s > 0:
        raise ValueError(f"bin_s={bin_s!r}: must be a positive number of seconds")
    events = _service_events(records, tenant_weights)
    last_s = max((r.token_times[-1] for r in records if r.token_times), default=0.0)
    ends = np.arange(1, max(1, math.ceil(last_s / bin_s)) + 1) * bin_s
    ends[-1] = max(ends[-1], last_s)  # ceil of a rounded quotient may land one ulp short of the last token
    curves: dict[str, list[tuple[float, float]]] = {}
    for tenant in sorted(events):
        times, costs = events[tenant][:, 0], events[tenant][:, 1]
        cumulative = np.concatenate([[0.0], np.cumsum(costs)])
        counts = np.searchsorted(times, ends, side="right")  # events at or before each bin end
        curves[tenant] = [(float(end), float(cumulative[n])) for end, n in zip(ends, counts)]
    return curves
