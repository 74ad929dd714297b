"""fs-engine bench calibrate: a profile fitted to this machine, and the real-vs-simulated comparison."""

from __future__ import annotations

import json

import pytest

from fs_engine.bench.calibrate import compare, run_calibration
from fs_engine.bench.cli import main
from fs_engine.bench.workload import WorkloadConfig
from fs_engine.sim.devices import get_profile


def test_calibrate_writes_a_profile_and_compares_real_with_simulated(tmp_path, tiny_model_dirs):
    # a tiny validation trace (the command's own takes minutes), real, simulated with the profile, real again
    tiny = WorkloadConfig(num_conversations=4, request_rate=20.0, scale=0.05, max_context=160, seed=2)
    out = tmp_path / "cal"
    result = run_calibration(str(tiny_model_dirs["llama"]), out, {}, quick=True, configs=("reuse",), progress=False,
                             trace_config=tiny, validation_engine={"num_gpu_blocks": 64, "policy": "priority"})
    profile = get_profile(str(out / "profile.json"))
    assert profile.serial and profile.attention_kernel == "reference" and profile.dtype_bytes == 4
    assert 0 < profile.duplex_factor <= 1 and profile.copy_interference >= 0 and profile.pcie_bw > 1e6
    measured = json.loads((out / "calibration.json").read_text())
    report = measured["report"]
    assert report["grid_steps"] >= 10 and report["serving_steps"] > 10 and len(measured["copies"]) >= 6
    # the fit describes the measurements: most steps within a factor of 2 even on a busy shared machine
    assert report["step_fit_median_error"] < 0.5
    rows = result["validation"]["+ KV reuse (fs-engine)"]
    assert [r["metric"] for r in rows][:2] == ["P50 TTFT", "P95 TTFT"]
    for row in rows:
        if row["metric"] != "Swap-out bytes":  # a light trace may swap nothing
            assert row["real"] is not None and row["real_again"] is not None and row["simulated"] is not None
    assert "| + KV reuse (fs-engine) | Throughput |" in (out / "validation.md").read_text()


def test_calibrate_command_line_says_what_to_change(tmp_path, capsys):
    assert main(["calibrate", "--out", str(tmp_path), "--no-validate", "--quick", "--device", "sim:a10"]) == 2
    assert "calibrate measures the in-process engine" in capsys.readouterr().err


def test_compare_reports_relative_errors_against_tolerances():
    real = {"ttft_s": {"p50": 1.0, "p95": 2.0}, "tbt_s": {"p50": 0.1, "p95": 0.2}, "throughput_tokens_per_s": 100.0,
            "engine": {"num_preemptions": 10, "swap_out_bytes": 0}}
    sim = {"ttft_s": {"p50": 1.1, "p95": 3.0}, "tbt_s": {"p50": 0.1, "p95": 0.2}, "throughput_tokens_per_s": 90.0,
           "engine": {"num_preemptions": 13, "swap_out_bytes": 0}}
    rows = {r["metric"]: r for r in compare(real, sim)}
    assert rows["P50 TTFT"]["error"] == pytest.approx(0.1)
    assert rows["P50 TTFT"]["ok"] and not rows["P95 TTFT"]["ok"]
    assert rows["Preemptions"]["ok"] and rows["Swap-out bytes"]["error"] == 0.0
    # with a second real run, the error is the distance from their span: inside it is no error at all
    again = {**real, "ttft_s": {"p50": 1.3, "p95": 2.5}, "throughput_tokens_per_s": 120.0}
    rows = {r["metric"]: r for r in compare(real, sim, again)}
    assert rows["P50 TTFT"]["error"] == 0.0 and rows["P50 TTFT"]["run_to_run"] == pytest.approx(0.3)
    assert rows["P95 TTFT"]["error"] == pytest.approx(0.2) and rows["P95 TTFT"]["ok"]  # 3.0 against 2.5
    assert rows["Throughput"]["error"] == pytest.approx(0.1)  # 90 below the span [100, 120]
