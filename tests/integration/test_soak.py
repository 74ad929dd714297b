"""tools/soak.py end to end at tiny size: a short run with every behaviour that leaves no KV block behind, and a
worker killed mid-run that ends every pending call and the frontend, without leftovers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launcher import ENGINE_FLAGS

SOAK = Path(__file__).resolve().parents[2] / "tools" / "soak.py"

pytestmark = pytest.mark.slow


def soak(model: Path, out: Path, *args: str, timeout_s: float) -> tuple[subprocess.CompletedProcess, dict, float]:
    """Run the tool on the tiny test model with the tests' tight KV memory (so that requests are preempted and
    swapped): its completed process, its JSON report and how long it took."""
    engine = [f"--{name.replace('_', '-')}={value}" for name, value in ENGINE_FLAGS.items()]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SOAK), *args, "--json", str(out), "--", "--model", str(model), *engine],
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    return proc, json.loads(out.read_text()), time.monotonic() - start


@pytest.fixture(scope="module")
def model(tiny_model_dirs):
    return tiny_model_dirs["qwen3"]


def test_a_short_soak_serves_every_behaviour_and_leaks_no_kv_block(model, tmp_path):
    proc, report, _ = soak(model, tmp_path / "soak.json", "--streams", "20", "--seconds", "6", "--malformed", "0.1",
                           "--slow-read-s", "0.05", timeout_s=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "leaked 0" in proc.stdout and "result: PASS" in proc.stdout
    assert report["served_requests"] > 0 and report["tokens"] > 0
    assert all(b["calls"] for b in report["behaviours"].values()), report["behaviours"]
    assert report["kv"]["idle"] and report["kv"]["leaked_gpu_blocks"] == report["kv"]["leaked_cpu_blocks"] == 0
    assert report["latency_ms"]["ttft"]["n"] > 0
    assert report["frontend_exit"] == 0 and report["left_behind"] == {"processes": [], "run_dirs": []}


def test_a_killed_worker_ends_every_pending_call_and_the_frontend(model, tmp_path):
    # every call pending at the fault ends with the fatal error, long before --client-timeout (the silence limit)
    proc, report, seconds = soak(model, tmp_path / "soak.json", "--streams", "20", "--seconds", "10",
                                 "--fault", "kill-worker@3", "--client-timeout", "10", timeout_s=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert report["hangs"] == 0 and seconds < 90  # nobody waited out the call timeout
    (fault,) = report["faults"]
    assert fault["target"].startswith("worker rank 0") and fault["pending_calls"] > 0
    assert fault["pending_ended_within_s"] < 12, fault
    assert any(kind.startswith("EngineDeadError") for kind in fault["clients_saw"]), fault
    assert fault["frontend_exit"] == report["frontend_exit"] == 1 and fault["frontend_exit_after_s"] < 10
    assert "frontend exit code 1" in proc.stdout
    assert report["left_behind"] == {"processes": [], "run_dirs": []}
