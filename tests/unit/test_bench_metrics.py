"""Benchmark metrics and report: hand-computed latencies, fairness, SLO attainment, and the files a run leaves."""

from __future__ import annotations

import json
import math

import pytest

from fs_engine.bench.metrics import (
    SLO,
    RequestRecord,
    jain_index,
    percentiles,
    service_cost,
    service_over_time,
    summarize,
)
from fs_engine.bench.report import markdown_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rec(tenant: str, sent_s: float, token_times: list[float], prompt: int = 10, request_id: str = "r",
        cached: int = 0) -> RequestRecord:
    return RequestRecord(request_id=request_id, conversation_id=f"c-{request_id}", tenant=tenant, turn=0,
                         sent_s=sent_s, token_times=token_times, num_prompt_tokens=prompt, num_cached_tokens=cached)


def records() -> list[RequestRecord]:
    """Tenant a (weight 1): 2 requests; tenant b (weight 2): 1 request. Gaps: a0 0.1,0.1; a1 0.5; b0 0.2,0.2,0.2."""
    return [
        rec("a", 0.0, [0.5, 0.6, 0.7], prompt=10, request_id="a0"),
        rec("a", 1.0, [1.2, 1.7], prompt=20, request_id="a1", cached=15),
        rec("b", 0.0, [2.0, 2.2, 2.4, 2.6], prompt=40, request_id="b0"),
    ]


WEIGHTS = {"a": 1.0, "b": 2.0}


def test_record_latencies():
    r = rec("a", 1.0, [1.5, 1.75, 2.25, 2.5])
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.5)
    assert r.tbts == pytest.approx([0.25, 0.5, 0.25])
    assert r.tpot == pytest.approx(1.0 / 3)
    assert r.num_output_tokens == 4


def test_record_with_one_or_no_token():
    one = rec("a", 0.0, [0.3])
    assert (one.ttft, one.e2e, one.tbts, one.tpot) == (pytest.approx(0.3), pytest.approx(0.3), [], None)
    none = rec("a", 0.0, [])
    assert (none.ttft, none.e2e, none.tbts, none.tpot, none.num_output_tokens) == (None, None, [], None, 0)


def test_percentiles_linear_interpolation():
    p = percentiles(range(1, 101))
    assert p == pytest.approx({"p50": 50.5, "p95": 95.05, "p99": 99.01, "p99.9": 99.901})
    assert percentiles([0.0, 10.0], ps=(25,)) == {"p25": 2.5}
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None, "p99.9": None}


def test_jain_index():
    assert jain_index([1, 1, 1]) == pytest.approx(1.0)
    assert jain_index([1, 0, 0]) == pytest.approx(1 / 3)
    assert jain_index([1, 3]) == pytest.approx(16 / 20)
    assert jain_index([]) == 1.0 and jain_index([0, 0]) == 1.0


def test_service_cost_matches_vtc_units():
    assert service_cost(10, 3) == 16.0


def test_weights_normalize_service_for_fairness():
    # b has weight 3 and receives 3x a's service: perfectly fair once normalized
    runs = [rec("a", 0.0, [1.0] * 5, prompt=10), rec("b", 0.0, [1.0] * 15, prompt=30)]
    summary = summarize(runs, duration_s=1.0, tenant_weights={"a": 1.0, "b": 3.0})
    assert summary["tenants"]["b"]["service"] == 3 * summary["tenants"]["a"]["service"]
    assert summary["jain_index"] == pytest.approx(1.0)
    assert summarize(runs, duration_s=1.0, tenant_weights={})["jain_index"] == pytest.approx(0.8)


def test_summarize_throughput_latency_and_tenants():
    s = summarize(records(), duration_s=4.0, tenant_weights=WEIGHTS)
    assert s["num_requests"] == 3 and s["num_output_tokens"] == 9
    assert s["throughput_tokens_per_s"] == pytest.approx(9 / 4)
    assert s["throughput_requests_per_s"] == pytest.approx(3 / 4)
    assert s["total_tokens_per_s"] == pytest.approx((70 + 9) / 4)
    assert s["ttft_s"]["p50"] == pytest.approx(0.5) and s["ttft_s"]["mean"] == pytest.approx((0.5 + 0.2 + 2.0) / 3)
    assert s["tbt_s"]["mean"] == pytest.approx((0.1 + 0.1 + 0.5 + 0.2 * 3) / 6)  # every gap of every request
    assert s["tbt_s"]["p99.9"] == pytest.approx(0.4985)  # sorted gaps 0.1 0.1 0.2 0.2 0.2 0.5
    assert s["e2e_s"]["p50"] == pytest.approx(0.7)
    assert s["tpot_s"]["mean"] == pytest.approx((0.1 + 0.5 + 0.2) / 3)
    # full prompts count as service even when cached: a1 reused 15 of its 20 prompt tokens
    assert s["tenants"]["a"] == {"service": 30 + 2 * 5, "normalized_service": 40.0, "requests": 2,
                                 "output_tokens": 5, "ttft_p95_s": pytest.approx(0.485)}
    assert s["tenants"]["b"]["service"] == 40 + 2 * 4 and s["tenants"]["b"]["normalized_service"] == 24.0
    assert s["jain_index"] == pytest.approx(64**2 / (2 * (40**2 + 24**2)))
    assert "slo" not in s and "engine" not in s
    assert json.loads(json.dumps(s)) == s


def test_summarize_slo_attainment_and_engine_counters():
    stats = {"num_preemptions": 3, "swap_out_bytes": 2_000_000, "num_gpu_blocks": 100}
    s = summarize(records(), 4.0, WEIGHTS, slo=SLO(ttft_s=0.6, tbt_s=0.3), engine_stats=stats)
    # a0 meets both; a1 meets TTFT (0.2) but has a 0.5 s gap; b0 has TTFT 2.0 and gaps of 0.2
    assert s["slo"] == {"ttft_s": 0.6, "tbt_s": 0.3, "ttft_attainment": pytest.approx(2 / 3),
                        "tbt_attainment": pytest.approx(2 / 3), "attainment": pytest.approx(1 / 3)}
    assert s["engine"] == {"num_preemptions": 3, "swap_out_bytes": 2_000_000}
    unbounded = summarize(records(), 4.0, WEIGHTS, slo=SLO(ttft_s=math.inf, tbt_s=0.3))["slo"]
    assert unbounded["ttft_s"] is None and unbounded["attainment"] == pytest.approx(2 / 3)


def test_summarize_rejects_bad_input():
    with pytest.raises(ValueError, match="duration_s"):
        summarize(records(), 0.0, WEIGHTS)
    with pytest.raises(ValueError, match="tbt_s"):
        SLO(ttft_s=1.0, tbt_s=0.0)


def test_service_over_time_is_cumulative_and_ends_at_total():
    curves = service_over_time(records(), WEIGHTS, bin_s=0.5)
    summary = summarize(records(), 4.0, WEIGHTS)
    for tenant, points in curves.items():
        times = [t for t, _ in points]
        values = [v for _, v in points]
        assert times == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])  # shared bins up to the last token (2.6)
        assert all(b >= a for a, b in zip(values, values[1:]))
        assert values[-1] == pytest.approx(summary["tenants"][tenant]["normalized_service"])
    # a0's prompt (10) and first token (2) land at 0.5; the rest of a0 by 1.0; a1's prompt + token by 1.5
    assert [v for _, v in curves["a"]] == pytest.approx([12, 16, 38, 40, 40, 40])
    assert [v for _, v in curves["b"]][:3] == [0.0, 0.0, 0.0]


def result(ttft_p95: float, throughput: float, swap_bytes: int | None = None) -> dict:
    summary: dict = {"ttft_s": {"p95": ttft_p95}, "throughput_tokens_per_s": throughput}
    if swap_bytes is not None:
        summary["engine"] = {"swap_out_bytes": swap_bytes}
    return summary


def row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_markdown_table_ratios_point_to_better():
    results = {"base": result(2.0, 100.0, 4_000_000), "fast": result(0.5, 150.0, 0), "slow": result(4.0, 50.0)}
    table = markdown_table(results, baseline="base")
    assert table.splitlines()[0] == "| Metric | base | fast | slow |"
    assert row(table, "P95 TTFT (s)") == ["2", "0.5 (4x)", "4 (0.5x)"]  # lower is better: baseline / value
    assert row(table, "Throughput (tokens/s)") == ["100", "150 (1.5x)", "50 (0.5x)"]  # higher: value / baseline
    assert row(table, "Swap-out (MB)") == ["4", "0 (inf)", "n/a"]  # bytes shown in MB; eliminated -> inf
    assert "P99 TTFT (s)" not in table  # no config has it
    with pytest.raises(ValueError, match="baseline"):
        markdown_table(results, baseline="missing")


def test_write_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    runs = {"baseline": records(), "+ reuse": [rec("a", 0.0, [0.1, 0.1, 0.3]), rec("b", 0.0, [0.2, 0.4])]}
    results = {name: summarize(rs, 4.0, WEIGHTS) for name, rs in runs.items()}
    paths = write_report(tmp_path / "out", results, runs, WEIGHTS, baseline="baseline")
    assert set(paths) == {"results", "table", "latency_cdf", "service_over_time"}
    assert json.loads(paths["results"].read_text()) == json.loads(json.dumps(results))
    assert paths["table"].read_text().startswith("| Metric | baseline | + reuse |")
    for name in ("latency_cdf", "service_over_time"):
        data = paths[name].read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_write_report_without_matplotlib_keeps_the_numbers(tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    results = {"baseline": summarize(records(), 4.0, WEIGHTS)}
    paths = write_report(tmp_path, results, {"baseline": records()}, WEIGHTS, baseline="baseline")
    assert set(paths) == {"results", "table"} and all(p.exists() for p in paths.values())
    assert not list(tmp_path.glob("*.png"))
    assert "matplotlib is not installed" in capsys.readouterr().err
